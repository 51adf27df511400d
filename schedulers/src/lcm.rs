//! Multistep latent-consistency sampling (Luo et al. 2023): `scheduling_lcm.py`. Each step maps
//! the sample to the consistency function's x0 with the discrete boundary scalings
//! (c_skip, c_out at `timestep_scaling`·t), then re-noises it to the next timestep; the last
//! step's `denoised` is the result.

use crate::config::{ConfigError, Resolved};
use crate::schedule::{NoiseSchedule, predict_x0};
use crate::{SampleOps, StepOutput};

/// σ_data of the consistency parameterisation (Song et al. 2023).
pub const SIGMA_DATA: f64 = 0.5;

/// (c_skip, c_out) at discrete timestep t: `get_scalings_for_boundary_condition_discrete`.
/// Computed in f64 as diffusers does in Python floats.
pub fn boundary_scalings(t: f64, timestep_scaling: f64) -> (f64, f64) {
    let s = t * timestep_scaling;
    let sd2 = SIGMA_DATA * SIGMA_DATA;
    (sd2 / (s * s + sd2), s / (s * s + sd2).sqrt())
}

#[derive(Debug, Clone)]
pub struct Lcm {
    pub schedule: NoiseSchedule,
    pub config: Resolved,
    pub timesteps: Vec<f32>,
    pub step_index: usize,
    int_timesteps: Vec<i64>,
    /// A grid given by the caller (diffusers' `set_timesteps(timesteps=…)`), used by every
    /// [`Self::set_timesteps`] of its length.
    custom: Option<Vec<i64>>,
}

impl Lcm {
    pub fn new(schedule: NoiseSchedule, config: Resolved) -> Self {
        Lcm {
            schedule,
            config,
            timesteps: Vec::new(),
            step_index: 0,
            int_timesteps: Vec::new(),
            custom: None,
        }
    }

    /// Samples on `timesteps` (strictly decreasing training timesteps, the first below
    /// `num_train_timesteps`) instead of the skipping-step grid, as diffusers'
    /// `set_timesteps(timesteps=…)` does; empty: back to the grid.
    pub fn set_custom_timesteps(&mut self, timesteps: &[i64]) -> Result<(), ConfigError> {
        let train = self.config.num_train_timesteps as i64;
        let list = timesteps
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(",");
        if timesteps.windows(2).any(|p| p[1] >= p[0]) {
            return Err(ConfigError::new(format!(
                "--timesteps {list}: expected strictly decreasing timesteps, e.g. 999,339"
            )));
        }
        if timesteps.iter().any(|&t| t < 0 || t >= train) {
            return Err(ConfigError::new(format!(
                "--timesteps {list}: expected training timesteps from 0 to {}",
                train - 1
            )));
        }
        self.custom = (!timesteps.is_empty()).then(|| timesteps.to_vec());
        Ok(())
    }

    /// The skipping-step grid: `original_inference_steps` evenly spaced training timesteps
    /// (k·i − 1), of which `n` are taken evenly from the top.
    pub fn set_timesteps(&mut self, n: usize) -> Result<(), ConfigError> {
        if let Some(custom) = &self.custom {
            if custom.len() != n {
                return Err(ConfigError::new(format!(
                    "--steps {n}: --timesteps gives {} steps",
                    custom.len()
                )));
            }
            self.int_timesteps = custom.clone();
            self.timesteps = custom.iter().map(|&t| t as f32).collect();
            self.step_index = 0;
            return Ok(());
        }
        let orig = self.config.original_inference_steps;
        if n > orig {
            return Err(ConfigError::new(format!(
                "--steps {n} exceeds the LCM scheduler's original_inference_steps ({orig})"
            )));
        }
        let k = self.config.num_train_timesteps / orig;
        let origin: Vec<i64> = (1..=orig).rev().map(|i| (i * k) as i64 - 1).collect();
        self.int_timesteps = (0..n)
            .map(|j| origin[(j as f64 * orig as f64 / n as f64).floor() as usize])
            .collect();
        self.timesteps = self.int_timesteps.iter().map(|&t| t as f32).collect();
        self.step_index = 0;
        Ok(())
    }

    /// Custom timesteps off the distillation grid (`k·i − 1`, k = train / original steps), which
    /// the model was not trained at, named as diffusers warns of them; `None` on the grid.
    pub fn grid_warning(&self) -> Option<String> {
        let custom = self.custom.as_ref()?;
        let k = (self.config.num_train_timesteps / self.config.original_inference_steps) as i64;
        let off: Vec<String> = custom
            .iter()
            .filter(|&&t| (t + 1) % k != 0)
            .map(|t| t.to_string())
            .collect();
        (!off.is_empty()).then(|| {
            format!(
                "--timesteps: {} not on the {}-step distillation grid (multiples of {k}, minus 1) the model was trained on; samples may suffer",
                off.join(", "),
                self.config.original_inference_steps
            )
        })
    }

    /// Every step but the last re-injects noise.
    pub fn needs_noise(&self) -> bool {
        self.step_index + 1 < self.int_timesteps.len()
    }

    pub fn step<T: SampleOps>(
        &mut self,
        model_output: &T,
        sample: &T,
        noise: Option<&T>,
    ) -> StepOutput<T> {
        let i = self.step_index;
        let t = self.int_timesteps[i];
        let prev_t = self.int_timesteps.get(i + 1).copied().unwrap_or(t);
        let alpha_t = self.schedule.alphas_cumprod[t as usize];
        let alpha_prev = self.schedule.alphas_cumprod[prev_t as usize];
        let (c_skip, c_out) = boundary_scalings(t as f64, self.config.timestep_scaling as f64);
        let clip = self
            .config
            .clip_sample
            .then_some(self.config.clip_sample_range);
        let x0 = predict_x0(self.config.prediction, alpha_t, model_output, sample, clip);
        let denoised = x0.axpby(c_out as f32, sample, c_skip as f32);
        let prev_sample = match noise {
            Some(noise) if i + 1 < self.int_timesteps.len() => {
                denoised.axpby(alpha_prev.sqrt(), noise, (1.0 - alpha_prev).sqrt())
            }
            _ => denoised.clone(),
        };
        self.step_index += 1;
        StepOutput {
            prev_sample,
            denoised,
        }
    }
}
