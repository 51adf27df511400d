//! `scheduler_config.json`: the union of the diffusers fields of every algorithm here.
//!
//! Each field is optional; an algorithm fills the missing ones with *its own* diffusers default
//! (Heun and LCM default to other betas than DDPM), so switching algorithm keeps the shared fields
//! exactly as diffusers' `SchedulerMixin.from_config` does. Unknown keys are ignored; a known key
//! of the wrong type is an error naming the key.

use serde_json::{Map, Value};

use crate::schedule::NoiseSchedule;
use crate::{SampleOps, Scheduler, ddim, ddpm, dpmpp_2m, euler, heun, lcm};

/// A configuration error: one line naming the field and what was expected.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError(pub String);

impl ConfigError {
    pub fn new(msg: impl Into<String>) -> Self {
        ConfigError(msg.into())
    }
}
impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ConfigError {}

/// The sampling algorithms, with their diffusers class names and CLI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Ddpm,
    Ddim,
    Euler,
    Heun,
    DpmPp2m,
    Lcm,
}

impl Algorithm {
    pub const ALL: [Algorithm; 6] = [
        Algorithm::Ddpm,
        Algorithm::Ddim,
        Algorithm::Euler,
        Algorithm::Heun,
        Algorithm::DpmPp2m,
        Algorithm::Lcm,
    ];

    /// diffusers' `_class_name`.
    pub fn class_name(self) -> &'static str {
        match self {
            Algorithm::Ddpm => "DDPMScheduler",
            Algorithm::Ddim => "DDIMScheduler",
            Algorithm::Euler => "EulerDiscreteScheduler",
            Algorithm::Heun => "HeunDiscreteScheduler",
            Algorithm::DpmPp2m => "DPMSolverMultistepScheduler",
            Algorithm::Lcm => "LCMScheduler",
        }
    }

    /// The name used on the command line (`--scheduler`).
    pub fn cli_name(self) -> &'static str {
        match self {
            Algorithm::Ddpm => "ddpm",
            Algorithm::Ddim => "ddim",
            Algorithm::Euler => "euler",
            Algorithm::Heun => "heun",
            Algorithm::DpmPp2m => "dpmpp-2m",
            Algorithm::Lcm => "lcm",
        }
    }

    pub fn from_class_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.class_name() == name)
    }

    pub fn from_cli_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.cli_name() == name)
    }

    /// Whether the algorithm draws fresh noise during sampling (so is not deterministic).
    pub fn is_stochastic(self) -> bool {
        matches!(self, Algorithm::Ddpm | Algorithm::Lcm)
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.cli_name())
    }
}

/// `beta_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

/// `prediction_type`: what the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    V,
    Sample,
}

impl Prediction {
    pub fn name(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::V => "v_prediction",
            Prediction::Sample => "sample",
        }
    }
}

/// `timestep_spacing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// `final_sigmas_type` (Euler, DPM-Solver++).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmas {
    Zero,
    SigmaMin,
}

/// `solver_type` (DPM-Solver++).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    Midpoint,
    Heun,
}

/// The parsed `scheduler_config.json`. `None` means "the algorithm's own default".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerConfig {
    /// `_class_name`, when the file names a class this crate implements.
    pub class: Option<Algorithm>,
    /// `_class_name` as the file gives it (also when this crate does not implement it).
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<BetaSchedule>,
    pub trained_betas: Option<Vec<f32>>,
    pub prediction_type: Option<Prediction>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: Option<usize>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f32>,
    pub set_alpha_to_one: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f32>,
    pub solver_order: Option<usize>,
    pub solver_type: Option<SolverType>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub final_sigmas_type: Option<FinalSigmas>,
    /// fewstep's own key `fewstep_distilled_steps`: the step count a distilled student was trained
    /// for (the default of `fewstep sample`; diffusers ignores the key with a warning).
    pub distilled_steps: Option<usize>,
}

/// A field read from JSON: `Ok(None)` when absent or `null`.
fn field<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).filter(|v| !v.is_null())
}

fn bad(key: &str, expected: &str, got: &Value) -> ConfigError {
    ConfigError::new(format!("field `{key}`: expected {expected}, got {got}"))
}

fn get_f64(map: &Map<String, Value>, key: &str) -> Result<Option<f64>, ConfigError> {
    field(map, key)
        .map(|v| v.as_f64().ok_or_else(|| bad(key, "a number", v)))
        .transpose()
}

fn get_usize(map: &Map<String, Value>, key: &str) -> Result<Option<usize>, ConfigError> {
    field(map, key)
        .map(|v| {
            v.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| bad(key, "a non-negative integer", v))
        })
        .transpose()
}

fn get_bool(map: &Map<String, Value>, key: &str) -> Result<Option<bool>, ConfigError> {
    field(map, key)
        .map(|v| v.as_bool().ok_or_else(|| bad(key, "true or false", v)))
        .transpose()
}

/// A string field restricted to `choices`, mapped to an enum.
fn get_choice<E: Copy>(
    map: &Map<String, Value>,
    key: &str,
    choices: &[(&str, E)],
) -> Result<Option<E>, ConfigError> {
    let Some(v) = field(map, key) else {
        return Ok(None);
    };
    let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
    let expected = format!("one of {}", names.join(", "));
    let s = v.as_str().ok_or_else(|| bad(key, &expected, v))?;
    choices
        .iter()
        .find(|(n, _)| *n == s)
        .map(|(_, e)| Some(*e))
        .ok_or_else(|| bad(key, &expected, v))
}

/// Requires a field to hold one of the values this crate implements (`supported`), when present.
fn require(
    map: &Map<String, Value>,
    key: &str,
    supported: &[Value],
    what: &str,
) -> Result<(), ConfigError> {
    match field(map, key) {
        Some(v) if !supported.contains(v) => Err(ConfigError::new(format!(
            "field `{key}` = {v} is not supported by fewstep (supported: {what})"
        ))),
        _ => Ok(()),
    }
}

/// The algorithm a folder samples with when its `_class_name` is one this crate does not
/// implement (PNDMScheduler in Stable Diffusion folders, say) or absent: DDIM — deterministic,
/// good at tens of steps, and the update rule the distillation objectives use. One answer for
/// `sample`, `eval` and `lora merge` alike.
pub const FALLBACK_ALGORITHM: Algorithm = Algorithm::Ddim;

impl SchedulerConfig {
    /// The folder's own algorithm, or [`FALLBACK_ALGORITHM`]; the second value says, in one line,
    /// when the fallback was taken.
    pub fn algorithm(&self) -> (Algorithm, Option<String>) {
        match self.class {
            Some(a) => (a, None),
            None => (
                FALLBACK_ALGORITHM,
                Some(format!(
                    "scheduler `{}` is not implemented by fewstep; sampling with {} on the folder's noise schedule and prediction type (choose another with --scheduler)",
                    self.class_name.as_deref().unwrap_or("(no _class_name)"),
                    FALLBACK_ALGORITHM.class_name()
                )),
            ),
        }
    }

    /// Parses a `scheduler_config.json` text. Python's `json.dumps` writes `-Infinity` for
    /// DPM-Solver's `lambda_min_clipped`; such non-JSON literals are accepted.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let text = text
            .replace("-Infinity", "null")
            .replace("Infinity", "null")
            .replace("NaN", "null");
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| ConfigError::new(format!("not valid JSON: {e}")))?;
        let map = value
            .as_object()
            .ok_or_else(|| ConfigError::new("expected a JSON object"))?;
        Self::from_map(map)
    }

    pub fn from_map(map: &Map<String, Value>) -> Result<Self, ConfigError> {
        use BetaSchedule::*;
        let (class, class_name) = match field(map, "_class_name") {
            Some(Value::String(name)) => (Algorithm::from_class_name(name), Some(name.clone())),
            Some(v) => return Err(bad("_class_name", "a string", v)),
            None => (None, None),
        };
        let trained_betas = match field(map, "trained_betas") {
            None => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| v.as_f64().map(|x| x as f32))
                    .collect::<Option<Vec<f32>>>()
                    .ok_or_else(|| bad("trained_betas", "a list of numbers", &items[0]))?,
            ),
            Some(v) => return Err(bad("trained_betas", "a list of numbers", v)),
        };
        require(map, "thresholding", &[Value::Bool(false)], "false")?;
        require(map, "use_karras_sigmas", &[Value::Bool(false)], "false")?;
        require(
            map,
            "use_exponential_sigmas",
            &[Value::Bool(false)],
            "false",
        )?;
        require(map, "use_beta_sigmas", &[Value::Bool(false)], "false")?;
        require(map, "use_lu_lambdas", &[Value::Bool(false)], "false")?;
        require(map, "interpolation_type", &["linear".into()], "\"linear\"")?;
        require(map, "timestep_type", &["discrete".into()], "\"discrete\"")?;
        require(
            map,
            "algorithm_type",
            &["dpmsolver++".into()],
            "\"dpmsolver++\"",
        )?;
        require(
            map,
            "variance_type",
            &["fixed_small".into()],
            "\"fixed_small\" (DDPM), or null",
        )?;
        let cfg = SchedulerConfig {
            class,
            class_name,
            num_train_timesteps: get_usize(map, "num_train_timesteps")?,
            beta_start: get_f64(map, "beta_start")?,
            beta_end: get_f64(map, "beta_end")?,
            beta_schedule: get_choice(
                map,
                "beta_schedule",
                &[
                    ("linear", Linear),
                    ("scaled_linear", ScaledLinear),
                    ("squaredcos_cap_v2", SquaredcosCapV2),
                ],
            )?,
            trained_betas,
            prediction_type: get_choice(
                map,
                "prediction_type",
                &[
                    ("epsilon", Prediction::Epsilon),
                    ("v_prediction", Prediction::V),
                    ("sample", Prediction::Sample),
                ],
            )?,
            timestep_spacing: get_choice(
                map,
                "timestep_spacing",
                &[
                    ("leading", TimestepSpacing::Leading),
                    ("trailing", TimestepSpacing::Trailing),
                    ("linspace", TimestepSpacing::Linspace),
                ],
            )?,
            steps_offset: get_usize(map, "steps_offset")?,
            clip_sample: get_bool(map, "clip_sample")?,
            clip_sample_range: get_f64(map, "clip_sample_range")?.map(|x| x as f32),
            set_alpha_to_one: get_bool(map, "set_alpha_to_one")?,
            rescale_betas_zero_snr: get_bool(map, "rescale_betas_zero_snr")?,
            original_inference_steps: get_usize(map, "original_inference_steps")?,
            distilled_steps: get_usize(map, "fewstep_distilled_steps")?,
            timestep_scaling: get_f64(map, "timestep_scaling")?.map(|x| x as f32),
            solver_order: get_usize(map, "solver_order")?,
            solver_type: get_choice(
                map,
                "solver_type",
                &[
                    ("midpoint", SolverType::Midpoint),
                    ("heun", SolverType::Heun),
                ],
            )?,
            lower_order_final: get_bool(map, "lower_order_final")?,
            euler_at_final: get_bool(map, "euler_at_final")?,
            final_sigmas_type: get_choice(
                map,
                "final_sigmas_type",
                &[
                    ("zero", FinalSigmas::Zero),
                    ("sigma_min", FinalSigmas::SigmaMin),
                ],
            )?,
        };
        if let Some(order) = cfg.solver_order
            && !(1..=2).contains(&order)
        {
            return Err(ConfigError::new(format!(
                "field `solver_order` = {order} is not supported by fewstep (supported: 1, 2)"
            )));
        }
        if cfg.num_train_timesteps == Some(0) {
            return Err(ConfigError::new(
                "field `num_train_timesteps` must be at least 1",
            ));
        }
        Ok(cfg)
    }

    /// Writes the config back as a diffusers `scheduler_config.json` for `algorithm`, with every
    /// field resolved (so diffusers reads the same numbers whatever its version's defaults).
    pub fn to_json(&self, algorithm: Algorithm) -> Value {
        let r = self.resolve(algorithm);
        let mut m = Map::new();
        m.insert("_class_name".into(), algorithm.class_name().into());
        m.insert("_diffusers_version".into(), "0.31.0".into());
        m.insert("num_train_timesteps".into(), r.num_train_timesteps.into());
        m.insert("beta_start".into(), r.beta_start.into());
        m.insert("beta_end".into(), r.beta_end.into());
        let schedule = match r.beta_schedule {
            BetaSchedule::Linear => "linear",
            BetaSchedule::ScaledLinear => "scaled_linear",
            BetaSchedule::SquaredcosCapV2 => "squaredcos_cap_v2",
        };
        m.insert("beta_schedule".into(), schedule.into());
        m.insert(
            "trained_betas".into(),
            self.trained_betas.clone().map_or(Value::Null, |b| b.into()),
        );
        m.insert("prediction_type".into(), r.prediction.name().into());
        let spacing = match r.timestep_spacing {
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
            TimestepSpacing::Linspace => "linspace",
        };
        m.insert("timestep_spacing".into(), spacing.into());
        m.insert("steps_offset".into(), r.steps_offset.into());
        m.insert(
            "rescale_betas_zero_snr".into(),
            r.rescale_betas_zero_snr.into(),
        );
        match algorithm {
            Algorithm::Ddpm | Algorithm::Ddim | Algorithm::Heun | Algorithm::Lcm => {
                m.insert("clip_sample".into(), r.clip_sample.into());
                m.insert("clip_sample_range".into(), r.clip_sample_range.into());
            }
            _ => {}
        }
        if matches!(
            algorithm,
            Algorithm::Ddpm | Algorithm::Ddim | Algorithm::Lcm | Algorithm::DpmPp2m
        ) {
            m.insert("thresholding".into(), false.into());
        }
        if matches!(algorithm, Algorithm::Ddim | Algorithm::Lcm) {
            m.insert("set_alpha_to_one".into(), r.set_alpha_to_one.into());
        }
        if algorithm == Algorithm::Ddpm {
            m.insert("variance_type".into(), "fixed_small".into());
        }
        if algorithm == Algorithm::Lcm {
            m.insert(
                "original_inference_steps".into(),
                r.original_inference_steps.into(),
            );
            m.insert("timestep_scaling".into(), r.timestep_scaling.into());
        }
        if matches!(algorithm, Algorithm::Euler | Algorithm::DpmPp2m) {
            let fs = match r.final_sigmas_type {
                FinalSigmas::Zero => "zero",
                FinalSigmas::SigmaMin => "sigma_min",
            };
            m.insert("final_sigmas_type".into(), fs.into());
        }
        if algorithm == Algorithm::DpmPp2m {
            m.insert("solver_order".into(), r.solver_order.into());
            m.insert("algorithm_type".into(), "dpmsolver++".into());
            let st = match r.solver_type {
                SolverType::Midpoint => "midpoint",
                SolverType::Heun => "heun",
            };
            m.insert("solver_type".into(), st.into());
            m.insert("lower_order_final".into(), r.lower_order_final.into());
            m.insert("euler_at_final".into(), r.euler_at_final.into());
        }
        if let Some(n) = self.distilled_steps {
            m.insert("fewstep_distilled_steps".into(), n.into());
        }
        Value::Object(m)
    }

    /// Every field with `algorithm`'s diffusers default filled in.
    pub fn resolve(&self, algorithm: Algorithm) -> Resolved {
        use Algorithm::*;
        let (beta_start, beta_end, beta_schedule) = match algorithm {
            Heun => (0.00085, 0.012, BetaSchedule::Linear),
            Lcm => (0.00085, 0.012, BetaSchedule::ScaledLinear),
            _ => (0.0001, 0.02, BetaSchedule::Linear),
        };
        let spacing = match algorithm {
            Ddpm | Ddim | Lcm => TimestepSpacing::Leading,
            Euler | Heun | DpmPp2m => TimestepSpacing::Linspace,
        };
        Resolved {
            num_train_timesteps: self.num_train_timesteps.unwrap_or(1000),
            beta_start: self.beta_start.unwrap_or(beta_start),
            beta_end: self.beta_end.unwrap_or(beta_end),
            beta_schedule: self.beta_schedule.unwrap_or(beta_schedule),
            prediction: self.prediction_type.unwrap_or(Prediction::Epsilon),
            timestep_spacing: self.timestep_spacing.unwrap_or(spacing),
            steps_offset: self.steps_offset.unwrap_or(0),
            clip_sample: self.clip_sample.unwrap_or(matches!(algorithm, Ddpm | Ddim)),
            clip_sample_range: self.clip_sample_range.unwrap_or(1.0),
            set_alpha_to_one: self.set_alpha_to_one.unwrap_or(true),
            rescale_betas_zero_snr: self.rescale_betas_zero_snr.unwrap_or(false),
            original_inference_steps: self.original_inference_steps.unwrap_or(50),
            timestep_scaling: self.timestep_scaling.unwrap_or(10.0),
            solver_order: self.solver_order.unwrap_or(2),
            solver_type: self.solver_type.unwrap_or(SolverType::Midpoint),
            lower_order_final: self.lower_order_final.unwrap_or(true),
            euler_at_final: self.euler_at_final.unwrap_or(false),
            final_sigmas_type: self.final_sigmas_type.unwrap_or(FinalSigmas::Zero),
        }
    }

    /// The noise schedule `algorithm` would build from this config.
    pub fn noise_schedule(&self, algorithm: Algorithm) -> Result<NoiseSchedule, ConfigError> {
        let r = self.resolve(algorithm);
        NoiseSchedule::new(
            r.num_train_timesteps,
            r.beta_start,
            r.beta_end,
            r.beta_schedule,
            self.trained_betas.as_deref(),
            // diffusers' Heun has no zero-terminal-SNR option; Euler and DPM-Solver keep σ finite.
            r.rescale_betas_zero_snr && algorithm != Algorithm::Heun,
            matches!(algorithm, Algorithm::Euler | Algorithm::DpmPp2m),
        )
    }

    /// Builds a scheduler of `algorithm` (the file's own class when `None`, else DDPM), without
    /// timesteps: call [`Scheduler::set_timesteps`] next.
    pub fn build<T: SampleOps>(
        &self,
        algorithm: Option<Algorithm>,
    ) -> Result<Scheduler<T>, ConfigError> {
        let algorithm = algorithm.or(self.class).unwrap_or(Algorithm::Ddpm);
        let r = self.resolve(algorithm);
        let schedule = self.noise_schedule(algorithm)?;
        Ok(match algorithm {
            Algorithm::Ddpm => Scheduler::Ddpm(ddpm::Ddpm::new(schedule, r)),
            Algorithm::Ddim => Scheduler::Ddim(ddim::Ddim::new(schedule, r)),
            Algorithm::Euler => Scheduler::Euler(euler::Euler::new(schedule, r)),
            Algorithm::Heun => Scheduler::Heun(heun::Heun::new(schedule, r)),
            Algorithm::DpmPp2m => Scheduler::DpmPp2m(dpmpp_2m::DpmPp2m::new(schedule, r)),
            Algorithm::Lcm => {
                if r.original_inference_steps == 0
                    || r.original_inference_steps > r.num_train_timesteps
                {
                    return Err(ConfigError::new(format!(
                        "field `original_inference_steps` must be between 1 and num_train_timesteps ({}), got {}",
                        r.num_train_timesteps, r.original_inference_steps
                    )));
                }
                Scheduler::Lcm(lcm::Lcm::new(schedule, r))
            }
        })
    }
}

/// A config with every field decided for one algorithm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction: Prediction,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub clip_sample: bool,
    pub clip_sample_range: f32,
    pub set_alpha_to_one: bool,
    pub rescale_betas_zero_snr: bool,
    pub original_inference_steps: usize,
    pub timestep_scaling: f32,
    pub solver_order: usize,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub final_sigmas_type: FinalSigmas,
}
