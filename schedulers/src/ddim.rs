//! DDIM (Song et al. 2021): `scheduling_ddim.py`, deterministic at η = 0 (the default); η > 0
//! injects σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev) of fresh noise per step, η = 1 being
//! DDPM's posterior variance (the pipelines' `eta` argument).

use crate::config::{ConfigError, Resolved};
use crate::schedule::{NoiseSchedule, eps_coefficients, integer_timesteps, predict_x0};
use crate::{SampleOps, StepOutput};

#[derive(Debug, Clone)]
pub struct Ddim {
    pub schedule: NoiseSchedule,
    pub config: Resolved,
    pub timesteps: Vec<f32>,
    pub step_index: usize,
    int_timesteps: Vec<i64>,
    /// ᾱ used past the last timestep: 1 with `set_alpha_to_one`, else ᾱ_0.
    final_alpha_cumprod: f32,
    /// The stochasticity η (0: deterministic DDIM).
    pub eta: f32,
}

impl Ddim {
    pub fn new(schedule: NoiseSchedule, config: Resolved) -> Self {
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ddim {
            schedule,
            config,
            timesteps: Vec::new(),
            step_index: 0,
            int_timesteps: Vec::new(),
            final_alpha_cumprod,
            eta: 0.0,
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

    /// Each step's (model timestep, destination timestep) after `set_timesteps`: the model runs at
    /// the first and the sample moves to the ᾱ of the second (negative: the final ᾱ).
    pub fn transitions(&self) -> Vec<(i64, i64)> {
        let stride = (self.config.num_train_timesteps / self.int_timesteps.len().max(1)) as i64;
        self.int_timesteps
            .iter()
            .map(|&t| (t, t - stride))
            .collect()
    }

    /// Why this grid samples badly, if it does: diffusers' DDIM (matched here) moves every
    /// sample to `t − num_train_timesteps / n`, but where `n` does not divide
    /// `num_train_timesteps` the next model call runs at another timestep (`trailing`/`linspace`
    /// grids), so the model is told less noise than the sample holds and every step leaves some
    /// of it (diffusers issues #9261, #12633). The residue grows with the number of steps.
    pub fn grid_warning(&self) -> Option<String> {
        let transitions = self.transitions();
        let off = transitions
            .iter()
            .zip(self.int_timesteps.iter().skip(1))
            .filter(|((_, dest), next)| dest != *next)
            .count();
        if off == 0 {
            return None;
        }
        let train = self.config.num_train_timesteps;
        let n = self.int_timesteps.len();
        let nearest = (1..=train)
            .filter(|d| train.is_multiple_of(*d))
            .min_by_key(|&d| (d as i64 - n as i64).abs())
            .unwrap_or(1);
        Some(format!(
            "DDIM at {n} steps: {train} train timesteps are not a multiple of {n}, so each step moves the sample to t − {} while {off} of the {} next model calls run at another timestep; samples keep noise that grows with the step count (diffusers' DDIMScheduler does the same). A step count dividing {train}, such as {nearest}, avoids it",
            train / n.max(1),
            n.saturating_sub(1),
        ))
    }

    /// ᾱ at an integer timestep, or the final ᾱ before timestep 0.
    pub fn alpha_bar_or_final(&self, t: i64) -> f32 {
        if t >= 0 {
            self.schedule.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// σ_t of a step from ᾱ_t to ᾱ_prev: η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev))
    /// (`_get_variance`).
    fn noise_std(&self, alpha_t: f32, alpha_prev: f32) -> f32 {
        if self.eta == 0.0 {
            return 0.0;
        }
        let variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev);
        self.eta * variance.max(0.0).sqrt()
    }

    /// Whether the current step takes noise: every step at η > 0, as diffusers draws it (the
    /// last step's σ is 0 where `set_alpha_to_one`), so both consume one noise stream alike.
    pub fn needs_noise(&self) -> bool {
        self.eta > 0.0 && self.step_index < self.int_timesteps.len()
    }

    pub fn step<T: SampleOps>(
        &mut self,
        model_output: &T,
        sample: &T,
        noise: Option<&T>,
    ) -> StepOutput<T> {
        // diffusers steps back by train/n whatever the spacing (scheduling_ddim.py, `step`).
        let (t, prev_t) = self.transitions()[self.step_index];
        let alpha_t = self.schedule.alphas_cumprod[t as usize];
        let alpha_prev = self.alpha_bar_or_final(prev_t);
        let std = self.noise_std(alpha_t, alpha_prev);
        let clip = self
            .config
            .clip_sample
            .then_some(self.config.clip_sample_range);
        let x0 = predict_x0(self.config.prediction, alpha_t, model_output, sample, clip);
        // The direction term uses the unclipped ε.
        let (ea, eb) = eps_coefficients(self.config.prediction, alpha_t);
        let eps = sample.axpby(ea, model_output, eb);
        let direction = (1.0 - alpha_prev - std * std).max(0.0).sqrt();
        let mut prev_sample = x0.axpby(alpha_prev.sqrt(), &eps, direction);
        if let Some(noise) = noise.filter(|_| self.eta > 0.0) {
            prev_sample = prev_sample.axpby(1.0, noise, std);
        }
        self.step_index += 1;
        StepOutput {
            prev_sample,
            denoised: x0,
        }
    }
}
