//! Noise schedules, timestep grids and sampler update rules, numbers only.
//!
//! Every algorithm mirrors one diffusers file (`schedulers/scheduling_<name>.py`) and reads the
//! same `scheduler_config.json` fields with the same defaults, so a config means the same thing in
//! both tools. The schedulers never see a model: the sampling loop calls
//! [`Scheduler::scale_model_input`], runs the model, then [`Scheduler::step`].
//!
//! Tensors are abstract ([`SampleOps`]): the crate implements the trait for `Vec<f32>` (tests,
//! host-side use) and the `fewstep` crate implements it for burn tensors, so the whole loop stays
//! on the device.

pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpmpp_2m;
pub mod euler;
pub mod heun;
pub mod lcm;
pub mod schedule;

pub use config::{
    Algorithm, BetaSchedule, ConfigError, FALLBACK_ALGORITHM, FinalSigmas, Prediction,
    SchedulerConfig, SolverType, TimestepSpacing,
};
pub use schedule::NoiseSchedule;

/// The element-wise arithmetic a scheduler needs from a sample tensor.
pub trait SampleOps: Clone {
    /// `a·self + b·other`.
    fn axpby(&self, a: f32, other: &Self, b: f32) -> Self;
    /// `a·self`.
    fn scale(&self, a: f32) -> Self;
    /// Element-wise clamp to `[min, max]`.
    fn clamp(&self, min: f32, max: f32) -> Self;
}

impl SampleOps for Vec<f32> {
    fn axpby(&self, a: f32, other: &Self, b: f32) -> Self {
        self.iter().zip(other).map(|(x, y)| a * x + b * y).collect()
    }
    fn scale(&self, a: f32) -> Self {
        self.iter().map(|x| a * x).collect()
    }
    fn clamp(&self, min: f32, max: f32) -> Self {
        self.iter().map(|x| x.clamp(min, max)).collect()
    }
}

/// What one [`Scheduler::step`] returns: the next sample and the model's clean-sample estimate
/// (diffusers' `pred_original_sample`, or LCM's `denoised`, which is the result of the last step).
#[derive(Debug, Clone)]
pub struct StepOutput<T> {
    pub prev_sample: T,
    pub denoised: T,
}

/// Errors of a running scheduler (configuration errors are [`ConfigError`]).
#[derive(Debug, Clone, PartialEq)]
pub enum StepError {
    /// `step` was called more times than `set_timesteps` provided.
    Finished,
    /// The step injects fresh noise (DDPM, LCM) and none was passed.
    NoiseRequired,
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Finished => write!(f, "scheduler stepped past its last timestep"),
            StepError::NoiseRequired => write!(f, "this scheduler step needs a noise sample"),
        }
    }
}
impl std::error::Error for StepError {}

/// One running scheduler of any algorithm, built by [`SchedulerConfig::build`].
#[derive(Debug, Clone)]
pub enum Scheduler<T> {
    Ddpm(ddpm::Ddpm),
    Ddim(ddim::Ddim),
    Euler(euler::Euler),
    Heun(heun::Heun<T>),
    DpmPp2m(dpmpp_2m::DpmPp2m<T>),
    Lcm(lcm::Lcm),
}

macro_rules! dispatch {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Scheduler::Ddpm($s) => $e,
            Scheduler::Ddim($s) => $e,
            Scheduler::Euler($s) => $e,
            Scheduler::Heun($s) => $e,
            Scheduler::DpmPp2m($s) => $e,
            Scheduler::Lcm($s) => $e,
        }
    };
}

impl<T: SampleOps> Scheduler<T> {
    /// Which algorithm this is.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Scheduler::Ddpm(_) => Algorithm::Ddpm,
            Scheduler::Ddim(_) => Algorithm::Ddim,
            Scheduler::Euler(_) => Algorithm::Euler,
            Scheduler::Heun(_) => Algorithm::Heun,
            Scheduler::DpmPp2m(_) => Algorithm::DpmPp2m,
            Scheduler::Lcm(_) => Algorithm::Lcm,
        }
    }

    /// The noise schedule (betas, cumulative alphas) this scheduler runs on.
    pub fn schedule(&self) -> &NoiseSchedule {
        dispatch!(self, s => &s.schedule)
    }

    /// Sets the inference grid for `n` steps and resets the step counter and any history.
    pub fn set_timesteps(&mut self, n: usize) -> Result<(), ConfigError> {
        let train = self.schedule().num_train_timesteps();
        if n == 0 || n > train {
            return Err(ConfigError::new(format!(
                "--steps must be between 1 and num_train_timesteps ({train}), got {n}"
            )));
        }
        dispatch!(self, s => s.set_timesteps(n))
    }

    /// DDIM's stochasticity η (the pipelines' `eta`: 0 deterministic, 1 DDPM's posterior
    /// variance); an error for any other algorithm unless `eta` is 0.
    pub fn set_eta(&mut self, eta: f32) -> Result<(), ConfigError> {
        match self {
            Scheduler::Ddim(s) if eta.is_finite() && eta >= 0.0 => {
                s.eta = eta;
                Ok(())
            }
            Scheduler::Ddim(_) => Err(ConfigError::new(format!(
                "--eta {eta}: expected a number of 0 or more"
            ))),
            _ if eta == 0.0 => Ok(()),
            other => Err(ConfigError::new(format!(
                "--eta {eta}: only the ddim scheduler takes eta, this one is {}",
                other.algorithm().cli_name()
            ))),
        }
    }

    /// Custom timesteps for the LCM scheduler (diffusers' `timesteps=` argument of
    /// `LCMScheduler.set_timesteps` and the LCM pipelines): later [`Self::set_timesteps`] calls
    /// must ask for as many steps. An error for any other algorithm unless `timesteps` is empty.
    pub fn set_custom_timesteps(&mut self, timesteps: &[i64]) -> Result<(), ConfigError> {
        match self {
            Scheduler::Lcm(s) => s.set_custom_timesteps(timesteps),
            _ if timesteps.is_empty() => Ok(()),
            other => Err(ConfigError::new(format!(
                "--timesteps: only the lcm scheduler takes custom timesteps, this one is {}",
                other.algorithm().cli_name()
            ))),
        }
    }

    /// A one-line warning when the current grid makes this algorithm sample badly (DDIM at a
    /// step count that does not divide `num_train_timesteps`: [`ddim::Ddim::grid_warning`]).
    pub fn grid_warning(&self) -> Option<String> {
        match self {
            Scheduler::Ddim(s) => s.grid_warning(),
            Scheduler::Lcm(s) => s.grid_warning(),
            _ => None,
        }
    }

    /// The model-input timesteps of every model call, in order (Heun calls the model twice per step).
    pub fn timesteps(&self) -> &[f32] {
        dispatch!(self, s => &s.timesteps)
    }

    /// Index of the next model call in [`Self::timesteps`].
    pub fn step_index(&self) -> usize {
        dispatch!(self, s => s.step_index)
    }

    /// The timestep of the next model call.
    pub fn current_timestep(&self) -> Option<f32> {
        self.timesteps().get(self.step_index()).copied()
    }

    /// Standard deviation of the initial noise (the noise is `init_noise_sigma · N(0, I)`).
    pub fn init_noise_sigma(&self) -> f32 {
        match self {
            Scheduler::Euler(s) => s.init_noise_sigma(),
            Scheduler::Heun(s) => s.init_noise_sigma(),
            _ => 1.0,
        }
    }

    /// The factor `scale_model_input` multiplies the sample by at the current step.
    pub fn model_input_scale(&self) -> f32 {
        match self {
            Scheduler::Euler(s) => s.model_input_scale(),
            Scheduler::Heun(s) => s.model_input_scale(),
            _ => 1.0,
        }
    }

    /// diffusers' `scale_model_input`: what the model sees at the current step.
    pub fn scale_model_input(&self, sample: &T) -> T {
        let c = self.model_input_scale();
        if c == 1.0 {
            sample.clone()
        } else {
            sample.scale(c)
        }
    }

    /// Whether the current step injects fresh noise (and so needs `noise` in [`Self::step`]).
    pub fn needs_noise(&self) -> bool {
        match self {
            Scheduler::Ddpm(s) => s.needs_noise(),
            Scheduler::Lcm(s) => s.needs_noise(),
            Scheduler::Ddim(s) => s.needs_noise(),
            _ => false,
        }
    }

    /// One update from the model output at the current timestep; advances the step counter.
    pub fn step(
        &mut self,
        model_output: &T,
        sample: &T,
        noise: Option<&T>,
    ) -> Result<StepOutput<T>, StepError> {
        if self.step_index() >= self.timesteps().len() {
            return Err(StepError::Finished);
        }
        if self.needs_noise() && noise.is_none() {
            return Err(StepError::NoiseRequired);
        }
        Ok(match self {
            Scheduler::Ddpm(s) => s.step(model_output, sample, noise),
            Scheduler::Ddim(s) => s.step(model_output, sample, noise),
            Scheduler::Euler(s) => s.step(model_output, sample),
            Scheduler::Heun(s) => s.step(model_output, sample),
            Scheduler::DpmPp2m(s) => s.step(model_output, sample),
            Scheduler::Lcm(s) => s.step(model_output, sample, noise),
        })
    }

    /// diffusers' `add_noise` at the integer training timestep `t`: `√ᾱ_t·x0 + √(1−ᾱ_t)·noise`
    /// for the variance-preserving schedulers, `x0 + σ_t·noise` for Euler and Heun, which work in
    /// the variance-exploding σ space (`scheduling_euler_discrete.py`).
    pub fn add_noise(&self, x0: &T, noise: &T, t: usize) -> T {
        let (a, b) = match self {
            Scheduler::Euler(_) | Scheduler::Heun(_) => (1.0, self.schedule().sigma(t)),
            _ => self.schedule().add_noise_coefficients(t),
        };
        x0.axpby(a, noise, b)
    }
}
