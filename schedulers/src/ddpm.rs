//! DDPM ancestral sampling (Ho et al. 2020), `variance_type = fixed_small`: `scheduling_ddpm.py`.

use crate::config::{ConfigError, Resolved};
use crate::schedule::{NoiseSchedule, integer_timesteps, predict_x0};
use crate::{SampleOps, StepOutput};

#[derive(Debug, Clone)]
pub struct Ddpm {
    pub schedule: NoiseSchedule,
    pub config: Resolved,
    pub timesteps: Vec<f32>,
    pub step_index: usize,
    int_timesteps: Vec<i64>,
}

impl Ddpm {
    pub fn new(schedule: NoiseSchedule, config: Resolved) -> Self {
        Ddpm {
            schedule,
            config,
            timesteps: Vec::new(),
            step_index: 0,
            int_timesteps: Vec::new(),
        }
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<(), ConfigError> {
        let c = &self.config;
        self.int_timesteps =
            integer_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset);
        self.timesteps = self.int_timesteps.iter().map(|&t| t as f32).collect();
        self.step_index = 0;
        Ok(())
    }

    /// Noise is added on every step but the one from t = 0.
    pub fn needs_noise(&self) -> bool {
        self.int_timesteps
            .get(self.step_index)
            .is_some_and(|&t| t > 0)
    }

    pub fn step<T: SampleOps>(
        &mut self,
        model_output: &T,
        sample: &T,
        noise: Option<&T>,
    ) -> StepOutput<T> {
        let i = self.step_index;
        let t = self.int_timesteps[i];
        let prev_t = self.int_timesteps.get(i + 1).copied().unwrap_or(-1);
        let alpha_t = self.schedule.alphas_cumprod[t as usize];
        let alpha_prev = if prev_t >= 0 {
            self.schedule.alphas_cumprod[prev_t as usize]
        } else {
            1.0
        };
        let (beta_t, beta_prev) = (1.0 - alpha_t, 1.0 - alpha_prev);
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;
        let clip = self
            .config
            .clip_sample
            .then_some(self.config.clip_sample_range);
        let x0 = predict_x0(self.config.prediction, alpha_t, model_output, sample, clip);
        // Posterior mean, Ho et al. eq. 7.
        let x0_coeff = alpha_prev.sqrt() * current_beta / beta_t;
        let sample_coeff = current_alpha.sqrt() * beta_prev / beta_t;
        let mut prev_sample = x0.axpby(x0_coeff, sample, sample_coeff);
        if t > 0
            && let Some(noise) = noise
        {
            let variance = (beta_prev / beta_t * current_beta).max(1e-20);
            prev_sample = prev_sample.axpby(1.0, noise, variance.sqrt());
        }
        self.step_index += 1;
        StepOutput {
            prev_sample,
            denoised: x0,
        }
    }
}
