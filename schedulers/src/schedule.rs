//! Shared schedule math: betas and cumulative alphas (computed in f32 exactly as diffusers does),
//! timestep grids for each `timestep_spacing`, σ interpolation, and the parameterisation
//! conversions (ε / v / x0) every algorithm and the training code use.

use crate::config::{BetaSchedule, ConfigError, Prediction, TimestepSpacing};

/// `torch.linspace(start, end, steps, dtype=torch.float32)` bit for bit: ATen computes the step in
/// f32 and fills the first half forward from `start`, the second half backward from `end`, each
/// value one fused multiply-add (its vectorised CPU kernel).
pub fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in f64 (the last value is exactly `stop`).
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| start + i as f64 * step).collect();
    v[num - 1] = stop;
    v
}

/// `betas_for_alpha_bar` with the cosine transform (Nichol & Dhariwal), capped at 0.999.
fn squaredcos_cap_v2(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod` of an f32 tensor on the CPU: ATen accumulates in f64 (`acc_type<float>`) and
/// rounds each partial product to f32. (A pure-f32 running product drifts by ~3e-7.)
fn cumprod(alphas: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1.0f64;
    alphas
        .map(|a| {
            acc *= a as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, Algorithm 1), in f32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac = cumprod(betas.iter().map(|b| 1.0 - b));
    let sqrt: Vec<f32> = ac.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let bar: Vec<f32> = sqrt
        .iter()
        .map(|s| {
            let s = (s - last) * (first / (first - last));
            s * s
        })
        .collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// The discrete variance-preserving noise schedule: z_t = √ᾱ_t·x + √(1−ᾱ_t)·ε.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    pub betas: Vec<f32>,
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    pub fn new(
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
        schedule: BetaSchedule,
        trained_betas: Option<&[f32]>,
        rescale_zero_snr: bool,
        finite_terminal_sigma: bool,
    ) -> Result<Self, ConfigError> {
        let mut betas = match trained_betas {
            Some(b) => {
                if b.is_empty() {
                    return Err(ConfigError::new("field `trained_betas` is empty"));
                }
                b.to_vec()
            }
            None => match schedule {
                BetaSchedule::Linear => {
                    torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
                }
                BetaSchedule::ScaledLinear => {
                    torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredcosCapV2 => squaredcos_cap_v2(num_train_timesteps),
            },
        };
        if let Some(b) = betas.iter().find(|b| !(**b > 0.0 && **b <= 0.999)) {
            return Err(ConfigError::new(format!(
                "betas must lie in (0, 1), found {b} (check beta_start, beta_end, trained_betas)"
            )));
        }
        if rescale_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let mut alphas_cumprod = cumprod(betas.iter().map(|b| 1.0 - b));
        if rescale_zero_snr && finite_terminal_sigma {
            // As diffusers' Euler/DPM do, so that σ stays finite at the last timestep.
            *alphas_cumprod.last_mut().unwrap() = 2f32.powi(-24);
        }
        Ok(NoiseSchedule {
            betas,
            alphas_cumprod,
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// ᾱ_t.
    pub fn alpha_bar(&self, t: usize) -> f32 {
        self.alphas_cumprod[t]
    }

    /// σ_t = √((1 − ᾱ_t)/ᾱ_t), the variance-exploding noise level of timestep t (Euler, Heun).
    pub fn sigma(&self, t: usize) -> f32 {
        let a = self.alphas_cumprod[t];
        ((1.0 - a) / a).sqrt()
    }

    /// All σ_t, computed as diffusers does in f32.
    pub fn sigmas(&self) -> Vec<f32> {
        (0..self.num_train_timesteps())
            .map(|t| self.sigma(t))
            .collect()
    }

    /// (√ᾱ_t, √(1 − ᾱ_t)): `add_noise`'s coefficients of x0 and of the noise.
    pub fn add_noise_coefficients(&self, t: usize) -> (f32, f32) {
        let a = self.alphas_cumprod[t];
        (a.sqrt(), (1.0 - a).sqrt())
    }

    /// σ(t) at fractional timesteps by linear interpolation of σ over 0..T, as `np.interp` does.
    pub fn interp_sigmas(&self, timesteps: &[f64]) -> Vec<f64> {
        let sigmas = self.sigmas();
        let last = sigmas.len() - 1;
        timesteps
            .iter()
            .map(|&t| {
                if t <= 0.0 {
                    return sigmas[0] as f64;
                }
                if t >= last as f64 {
                    return sigmas[last] as f64;
                }
                let i = t.floor() as usize;
                let w = t - i as f64;
                let (lo, hi) = (sigmas[i] as f64, sigmas[i + 1] as f64);
                // numpy's interp: slope·(x − xp[j]) + fp[j]
                (hi - lo) * w + lo
            })
            .collect()
    }
}

/// The integer timestep grid shared by DDPM, DDIM and LCM-free schedulers
/// (`set_timesteps` in `scheduling_ddim.py`), high to low.
pub fn integer_timesteps(
    spacing: TimestepSpacing,
    n: usize,
    train: usize,
    steps_offset: usize,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as i64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing_grid(train as f64, n, train)
            .into_iter()
            .map(|t| t.round_ties_even() as i64 - 1)
            .collect(),
    }
}

/// `np.arange(last, 0, -train/n)` in f64, the raw grid of `trailing` spacing before rounding.
pub fn trailing_grid(last: f64, n: usize, train: usize) -> Vec<f64> {
    let step = train as f64 / n as f64;
    let len = (last / step).ceil() as usize;
    (0..len).map(|i| last - i as f64 * step).collect()
}

/// The float timestep grid of Euler and Heun (`scheduling_euler_discrete.py`), high to low, in f32.
pub fn float_timesteps(
    spacing: TimestepSpacing,
    n: usize,
    train: usize,
    steps_offset: usize,
) -> Vec<f32> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f32 + steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => trailing_grid(train as f64, n, train)
            .into_iter()
            .map(|t| t.round_ties_even() as f32 - 1.0)
            .collect(),
    }
}

/// Coefficients (a, b) with x0 = a·sample + b·model_output at ᾱ, for a prediction type
/// (the `pred_original_sample` formulas of `scheduling_ddim.py`).
pub fn x0_coefficients(prediction: Prediction, alpha_bar: f32) -> (f32, f32) {
    let (sa, sb) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
    match prediction {
        Prediction::Epsilon => (1.0 / sa, -sb / sa),
        Prediction::V => (sa, -sb),
        Prediction::Sample => (0.0, 1.0),
    }
}

/// Coefficients (a, b) with ε = a·sample + b·model_output at ᾱ.
pub fn eps_coefficients(prediction: Prediction, alpha_bar: f32) -> (f32, f32) {
    let (sa, sb) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
    match prediction {
        Prediction::Epsilon => (0.0, 1.0),
        Prediction::V => (sb, sa),
        Prediction::Sample => (1.0 / sb, -sa / sb),
    }
}

/// Coefficients (a, b) with the model's target = a·x0 + b·ε, for training a model of this
/// prediction type on z_t = √ᾱ·x0 + √(1−ᾱ)·ε.
pub fn target_coefficients(prediction: Prediction, alpha_bar: f32) -> (f32, f32) {
    let (sa, sb) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
    match prediction {
        Prediction::Epsilon => (0.0, 1.0),
        Prediction::V => (-sb, sa),
        Prediction::Sample => (1.0, 0.0),
    }
}

/// The x0 estimate from a model output, clipped when the config asks for it.
pub(crate) fn predict_x0<T: crate::SampleOps>(
    prediction: Prediction,
    alpha_bar: f32,
    model_output: &T,
    sample: &T,
    clip: Option<f32>,
) -> T {
    let (a, b) = x0_coefficients(prediction, alpha_bar);
    let x0 = if prediction == Prediction::Sample {
        model_output.clone()
    } else {
        sample.axpby(a, model_output, b)
    };
    match clip {
        Some(r) => x0.clamp(-r, r),
        None => x0,
    }
}
