//! Euler method on the probability-flow ODE in σ space (Karras et al. 2022, Algorithm 2 without
//! churn): `scheduling_euler_discrete.py` with `interpolation_type = linear`.

use crate::config::{ConfigError, FinalSigmas, Prediction, Resolved, TimestepSpacing};
use crate::schedule::{NoiseSchedule, float_timesteps};
use crate::{SampleOps, StepOutput};

#[derive(Debug, Clone)]
pub struct Euler {
    pub schedule: NoiseSchedule,
    pub config: Resolved,
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    pub step_index: usize,
}

/// x0 from a model output at noise level σ in the σ-space parameterisation of Euler/Heun.
pub(crate) fn sigma_space_x0<T: SampleOps>(
    prediction: Prediction,
    sigma: f32,
    model_output: &T,
    sample: &T,
) -> T {
    match prediction {
        Prediction::Epsilon => sample.axpby(1.0, model_output, -sigma),
        Prediction::V => {
            let s2 = sigma * sigma + 1.0;
            model_output.axpby(-sigma / s2.sqrt(), sample, 1.0 / s2)
        }
        Prediction::Sample => model_output.clone(),
    }
}

/// Interpolated σ at each timestep plus the final σ (`set_timesteps` of Euler and DPM-Solver).
pub(crate) fn grid_sigmas(
    schedule: &NoiseSchedule,
    timesteps: &[f64],
    last: FinalSigmas,
) -> Vec<f32> {
    let mut sigmas: Vec<f32> = schedule
        .interp_sigmas(timesteps)
        .into_iter()
        .map(|s| s as f32)
        .collect();
    sigmas.push(match last {
        FinalSigmas::Zero => 0.0,
        FinalSigmas::SigmaMin => schedule.sigma(0),
    });
    sigmas
}

/// `scale_model_input`'s factor 1/√(σ² + 1) at step `i` of a σ grid.
pub(crate) fn sigma_space_input_scale(sigmas: &[f32], i: usize) -> f32 {
    let sigma = sigmas[i.min(sigmas.len() - 1)];
    1.0 / (sigma * sigma + 1.0).sqrt()
}

/// `init_noise_sigma` of the σ-space schedulers: σ_max, or √(σ_max² + 1) for `leading` spacing.
pub(crate) fn sigma_space_init_noise(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max = sigmas.iter().copied().fold(0.0f32, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    }
}

impl Euler {
    pub fn new(schedule: NoiseSchedule, config: Resolved) -> Self {
        let mut s = Euler {
            schedule,
            config,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: 0,
        };
        let n = s.config.num_train_timesteps;
        s.set_timesteps(n)
            .expect("the training grid is always valid");
        s
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<(), ConfigError> {
        let c = &self.config;
        self.timesteps =
            float_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset);
        let t64: Vec<f64> = self.timesteps.iter().map(|&t| t as f64).collect();
        self.sigmas = grid_sigmas(&self.schedule, &t64, c.final_sigmas_type);
        self.step_index = 0;
        Ok(())
    }

    pub fn init_noise_sigma(&self) -> f32 {
        sigma_space_init_noise(&self.sigmas, self.config.timestep_spacing)
    }

    /// 1/√(σ² + 1) at the current step.
    pub fn model_input_scale(&self) -> f32 {
        sigma_space_input_scale(&self.sigmas, self.step_index)
    }

    pub fn step<T: SampleOps>(&mut self, model_output: &T, sample: &T) -> StepOutput<T> {
        let sigma = self.sigmas[self.step_index];
        let x0 = sigma_space_x0(self.config.prediction, sigma, model_output, sample);
        let derivative = sample.axpby(1.0 / sigma, &x0, -1.0 / sigma);
        let dt = self.sigmas[self.step_index + 1] - sigma;
        let prev_sample = sample.axpby(1.0, &derivative, dt);
        self.step_index += 1;
        StepOutput {
            prev_sample,
            denoised: x0,
        }
    }
}
