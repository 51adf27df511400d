//! DPM-Solver++(2M), the multistep second-order solver in data (x0) prediction
//! (Lu et al. 2022, Algorithm 2): `scheduling_dpmsolver_multistep.py` with
//! `algorithm_type = dpmsolver++`, `solver_order` 1 or 2.

use crate::config::{ConfigError, FinalSigmas, Prediction, Resolved, SolverType, TimestepSpacing};
use crate::euler::grid_sigmas;
use crate::schedule::{NoiseSchedule, np_linspace, trailing_grid};
use crate::{SampleOps, StepOutput};

#[derive(Debug, Clone)]
pub struct DpmPp2m<T> {
    pub schedule: NoiseSchedule,
    pub config: Resolved,
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    pub step_index: usize,
    /// The previous step's x0 estimate (the multistep history).
    previous_x0: Option<T>,
    lower_order_nums: usize,
}

/// (α_t, σ_t) of the VP process from the VE noise level σ.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log α − log σ (half the log-SNR).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl<T: SampleOps> DpmPp2m<T> {
    pub fn new(schedule: NoiseSchedule, config: Resolved) -> Self {
        DpmPp2m {
            schedule,
            config,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: 0,
            previous_x0: None,
            lower_order_nums: 0,
        }
    }

    pub fn set_timesteps(&mut self, n: usize) -> Result<(), ConfigError> {
        let c = &self.config;
        let last = c.num_train_timesteps; // lambda_min_clipped = -inf clips nothing
        let ts: Vec<i64> = match c.timestep_spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (last - 1) as f64, n + 1)
                .into_iter()
                .rev()
                .take(n)
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = last / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + c.steps_offset) as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => trailing_grid(last as f64, n, c.num_train_timesteps)
                .into_iter()
                .map(|t| t.round_ties_even() as i64 - 1)
                .collect(),
        };
        let t64: Vec<f64> = ts.iter().map(|&t| t as f64).collect();
        self.sigmas = grid_sigmas(&self.schedule, &t64, c.final_sigmas_type);
        self.timesteps = ts.iter().map(|&t| t as f32).collect();
        self.step_index = 0;
        self.previous_x0 = None;
        self.lower_order_nums = 0;
        Ok(())
    }

    /// `convert_model_output` for dpmsolver++: the model's x0 estimate.
    fn x0(&self, model_output: &T, sample: &T) -> T {
        let (alpha, sigma) = alpha_sigma(self.sigmas[self.step_index]);
        match self.config.prediction {
            Prediction::Epsilon => sample.axpby(1.0 / alpha, model_output, -sigma / alpha),
            Prediction::V => sample.axpby(alpha, model_output, -sigma),
            Prediction::Sample => model_output.clone(),
        }
    }

    pub fn step(&mut self, model_output: &T, sample: &T) -> StepOutput<T> {
        let c = self.config;
        let i = self.step_index;
        let len = self.timesteps.len();
        let lower_order_final = i == len - 1
            && (c.euler_at_final
                || (c.lower_order_final && len < 15)
                || c.final_sigmas_type == FinalSigmas::Zero);
        let x0 = self.x0(model_output, sample);

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let phi = alpha_t * ((-h).exp() - 1.0);

        // With solver_order ≤ 2 every step that is not first order is the second-order update
        // (diffusers' `lower_order_second` only matters for order 3).
        let first_order = c.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final;
        let prev_sample = match (&self.previous_x0, first_order) {
            (Some(m1), false) => {
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
                let h0 = lambda_s0 - lambda(alpha_s1, sigma_s1);
                let r0 = h0 / h;
                // D0 = m0, D1 = (m0 − m1)/r0
                let d1 = x0.axpby(1.0 / r0, m1, -1.0 / r0);
                let d1_coeff = match c.solver_type {
                    SolverType::Midpoint => -0.5 * phi,
                    SolverType::Heun => alpha_t * (((-h).exp() - 1.0) / h + 1.0),
                };
                sample
                    .axpby(sigma_t / sigma_s0, &x0, -phi)
                    .axpby(1.0, &d1, d1_coeff)
            }
            _ => sample.axpby(sigma_t / sigma_s0, &x0, -phi),
        };
        if self.lower_order_nums < c.solver_order {
            self.lower_order_nums += 1;
        }
        self.previous_x0 = Some(x0.clone());
        self.step_index += 1;
        StepOutput {
            prev_sample,
            denoised: x0,
        }
    }
}
