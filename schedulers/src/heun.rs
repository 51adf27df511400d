//! Heun's second-order method in σ space (Karras et al. 2022, Algorithm 1 without churn):
//! `scheduling_heun_discrete.py`. The model is called twice per step, so the timestep list
//! repeats every interior timestep.

use crate::config::{ConfigError, FinalSigmas, Resolved};
use crate::euler::{grid_sigmas, sigma_space_init_noise, sigma_space_input_scale, sigma_space_x0};
use crate::schedule::{NoiseSchedule, float_timesteps};
use crate::{SampleOps, StepOutput};

#[derive(Debug, Clone)]
pub struct Heun<T> {
    pub schedule: NoiseSchedule,
    pub config: Resolved,
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    pub step_index: usize,
    /// (derivative, dt, sample) saved by the first-order half of a step.
    first_order: Option<(T, f32, T)>,
}

impl<T: SampleOps> Heun<T> {
    pub fn new(schedule: NoiseSchedule, config: Resolved) -> Self {
        let mut s = Heun {
            schedule,
            config,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: 0,
            first_order: None,
        };
        let n = s.config.num_train_timesteps;
        s.set_timesteps(n)
            .expect("the training grid is always valid");
        s
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<(), ConfigError> {
        let c = &self.config;
        let ts = float_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset);
        let t64: Vec<f64> = ts.iter().map(|&t| t as f64).collect();
        let sigmas = grid_sigmas(&self.schedule, &t64, FinalSigmas::Zero);
        // [σ0, σ1, σ1, σ2, σ2, …, σ_{n-1}, σ_{n-1}, 0] and [t0, t1, t1, …, t_{n-1}, t_{n-1}].
        self.sigmas = std::iter::once(sigmas[0])
            .chain(sigmas[1..sigmas.len() - 1].iter().flat_map(|&s| [s, s]))
            .chain(std::iter::once(0.0))
            .collect();
        self.timesteps = std::iter::once(ts[0])
            .chain(ts[1..].iter().flat_map(|&t| [t, t]))
            .collect();
        self.step_index = 0;
        self.first_order = None;
        Ok(())
    }

    pub fn init_noise_sigma(&self) -> f32 {
        sigma_space_init_noise(&self.sigmas, self.config.timestep_spacing)
    }

    pub fn model_input_scale(&self) -> f32 {
        sigma_space_input_scale(&self.sigmas, self.step_index)
    }

    pub fn step(&mut self, model_output: &T, sample: &T) -> StepOutput<T> {
        let i = self.step_index;
        let clip = self
            .config
            .clip_sample
            .then_some(self.config.clip_sample_range);
        let clipped = |x: T| match clip {
            Some(r) => x.clamp(-r, r),
            None => x,
        };
        let (prev_sample, x0) = match self.first_order.take() {
            None => {
                let (sigma, sigma_next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = clipped(sigma_space_x0(
                    self.config.prediction,
                    sigma,
                    model_output,
                    sample,
                ));
                let derivative = sample.axpby(1.0 / sigma, &x0, -1.0 / sigma);
                let dt = sigma_next - sigma;
                let prev = sample.axpby(1.0, &derivative, dt);
                self.first_order = Some((derivative, dt, sample.clone()));
                (prev, x0)
            }
            Some((prev_derivative, dt, first_sample)) => {
                let sigma_next = self.sigmas[i];
                let x0 = clipped(sigma_space_x0(
                    self.config.prediction,
                    sigma_next,
                    model_output,
                    sample,
                ));
                let derivative = sample.axpby(1.0 / sigma_next, &x0, -1.0 / sigma_next);
                let derivative = prev_derivative.axpby(0.5, &derivative, 0.5);
                (first_sample.axpby(1.0, &derivative, dt), x0)
            }
        };
        self.step_index += 1;
        StepOutput {
            prev_sample,
            denoised: x0,
        }
    }
}
