//! How a training row's timestep is drawn: uniformly, or with the probability that a log-normal
//! noise level falls in the timestep's span.
//!
//! The noise level is σ = √((1 − ᾱ)/ᾱ), the scale of the noise against the signal (EDM's σ for a
//! variance-preserving schedule). ln σ ~ N(mean, std²) is EDM's training distribution (Karras et
//! al. 2022: −1.2, 1.2), iCT's over a consistency grid (Song & Dhariwal 2023: −1.1, 2.0) and, since
//! logit t = ln σ in rectified-flow time, SD3's logit-normal (Esser et al. 2024: 0, 1).

use crate::noise::NoiseStream;

/// The law of a row's timestep.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSampling {
    /// Every timestep (or grid point) equally often: DDPM, CD, LCM.
    #[default]
    Uniform,
    /// A span from ᾱ_lo to ᾱ_hi with the probability that σ, ln σ ~ N(mean, std²), falls between
    /// their σ's.
    LogNormal { mean: f64, std: f64 },
}

impl TimestepSampling {
    /// iCT's setting for consistency training: more rows at low noise.
    pub const ICT: Self = Self::LogNormal {
        mean: -1.1,
        std: 2.0,
    };

    /// EDM's setting for training a denoiser.
    pub const EDM: Self = Self::LogNormal {
        mean: -1.2,
        std: 1.2,
    };

    pub fn is_uniform(&self) -> bool {
        *self == Self::Uniform
    }

    /// The probability of each span, each given as (ᾱ at its low-noise edge, ᾱ at its high-noise
    /// edge). Uniform gives every span the same weight, whatever its width.
    pub fn weights(&self, spans: &[(f64, f64)]) -> Vec<f64> {
        let uniform = || vec![1.0 / spans.len() as f64; spans.len()];
        match *self {
            Self::Uniform => uniform(),
            Self::LogNormal { mean, std } => {
                let cdf = |alpha_bar: f64| {
                    if alpha_bar >= 1.0 {
                        return 0.0; // σ = 0
                    }
                    let sigma = ((1.0 - alpha_bar) / alpha_bar).sqrt();
                    0.5 * (1.0 + erf((sigma.ln() - mean) / (std * 2f64.sqrt())))
                };
                let mass: Vec<f64> = spans
                    .iter()
                    .map(|&(lo, hi)| (cdf(hi) - cdf(lo)).max(0.0))
                    .collect();
                let total: f64 = mass.iter().sum();
                if total > 0.0 {
                    mass.iter().map(|m| m / total).collect()
                } else {
                    uniform()
                }
            }
        }
    }
}

/// Draws a row's span (a timestep, or a consistency grid point) under a law.
///
/// Uniform draws one integer per row: the stream every uniform run was trained on, kept so those
/// runs resume and reproduce exactly. Any other law maps one uniform number per row through the
/// spans' cumulative weights.
#[derive(Debug, Clone)]
pub enum SpanDraw {
    Uniform(usize),
    Weighted(Picker),
}

impl SpanDraw {
    /// A draw over `spans`, each (ᾱ at its low-noise edge, ᾱ at its high-noise edge).
    pub fn new(sampling: TimestepSampling, spans: &[(f64, f64)]) -> Self {
        match sampling {
            TimestepSampling::Uniform => Self::Uniform(spans.len()),
            law => Self::Weighted(Picker::new(&law.weights(spans))),
        }
    }

    /// A draw over timesteps 0..T of a schedule whose ᾱ_t is `alpha_bars[t]`: the span of t runs
    /// from ᾱ_{t−1} (1 for t = 0) to ᾱ_t.
    pub fn over_timesteps(sampling: TimestepSampling, alpha_bars: &[f64]) -> Self {
        Self::new(sampling, &timestep_spans(alpha_bars))
    }

    pub fn draw(&self, rng: &mut NoiseStream) -> usize {
        match self {
            Self::Uniform(n) => rng.below(*n as u64) as usize,
            Self::Weighted(picker) => picker.pick(rng.uniform()),
        }
    }
}

fn timestep_spans(alpha_bars: &[f64]) -> Vec<(f64, f64)> {
    alpha_bars
        .iter()
        .enumerate()
        .map(|(t, &a)| (if t == 0 { 1.0 } else { alpha_bars[t - 1] }, a))
        .collect()
}

/// Draws an index with given probabilities from a uniform number in [0, 1).
#[derive(Debug, Clone)]
pub struct Picker {
    cumulative: Vec<f64>,
}

impl Picker {
    pub fn new(weights: &[f64]) -> Self {
        let cumulative = weights
            .iter()
            .scan(0.0, |acc, w| {
                *acc += w;
                Some(*acc)
            })
            .collect();
        Picker { cumulative }
    }

    /// The index whose cumulative span holds `u`.
    pub fn pick(&self, u: f64) -> usize {
        self.cumulative
            .partition_point(|&c| c <= u)
            .min(self.cumulative.len() - 1)
    }
}

/// The error function (Abramowitz & Stegun 7.1.26; |error| < 1.5e-7).
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.3275911 * x.abs());
    let poly = t
        * (0.254829592
            + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    (1.0 - poly * (-x * x).exp()).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The picker a log-normal (or uniform) law builds over timesteps 0..T.
    fn picker_over_timesteps(law: TimestepSampling, alpha_bars: &[f64]) -> Picker {
        Picker::new(&law.weights(&timestep_spans(alpha_bars)))
    }

    #[test]
    fn erf_matches_tabulated_values() {
        assert!((erf(0.5) - 0.520_499_877_8).abs() < 1e-6);
        assert!((erf(-1.5) + 0.966_105_146_5).abs() < 1e-6);
        assert!(erf(0.0).abs() < 1e-8);
    }

    #[test]
    fn log_normal_over_timesteps_puts_the_median_sigma_at_its_mean() {
        // A cosine-like ᾱ over 1000 timesteps, strictly decreasing.
        let alpha_bars: Vec<f64> = (0..1000)
            .map(|t| {
                let x = (t as f64 + 1.0) / 1000.0;
                ((x + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                    .cos()
                    .powi(2)
                    .max(1e-6)
            })
            .collect();
        let sigma = |t: usize| ((1.0 - alpha_bars[t]) / alpha_bars[t]).sqrt();
        let uniform = picker_over_timesteps(TimestepSampling::Uniform, &alpha_bars);
        assert_eq!(uniform.pick(0.0), 0);
        assert_eq!(uniform.pick(0.5005), 500);
        assert_eq!(uniform.pick(0.999_999), 999);
        for mean in [-1.2, 0.0, 1.0] {
            let p =
                picker_over_timesteps(TimestepSampling::LogNormal { mean, std: 1.0 }, &alpha_bars);
            // Half the draws fall below the timestep where σ crosses e^mean.
            let median = p.pick(0.5);
            assert!(
                sigma(median - 1) < mean.exp() * 1.001 && sigma(median + 1) > mean.exp() * 0.999,
                "mean {mean}: median t {median}, σ {}",
                sigma(median)
            );
            assert!((p.cumulative.last().unwrap() - 1.0).abs() < 1e-9);
        }
        // SD3's logit-normal (0, 1) leaves the ends of the schedule rarely drawn.
        let sd3 = TimestepSampling::LogNormal {
            mean: 0.0,
            std: 1.0,
        };
        let w = sd3.weights(&[(1.0, alpha_bars[99]), (alpha_bars[99], alpha_bars[899])]);
        assert!(w[0] < 0.05 && w[1] > 0.9, "{w:?}");
    }

    #[test]
    fn a_picker_follows_its_weights() {
        let p = Picker::new(&[0.25, 0.0, 0.75]);
        assert_eq!(p.pick(0.0), 0);
        assert_eq!(p.pick(0.2499), 0);
        assert_eq!(p.pick(0.25), 2, "an empty span is never drawn");
        assert_eq!(p.pick(0.999_999_999), 2);
    }

    #[test]
    fn a_uniform_span_draw_keeps_the_integer_stream_and_a_law_maps_uniform_numbers() {
        // Ten spans of falling ᾱ, from nearly clean to nearly pure noise.
        let alpha_bars: Vec<f64> = (0..10).map(|t| 0.999 - 0.1 * t as f64).collect();
        let uniform = SpanDraw::over_timesteps(TimestepSampling::Uniform, &alpha_bars);
        let (mut a, mut b) = (NoiseStream::for_step(3, 7), NoiseStream::for_step(3, 7));
        for _ in 0..200 {
            assert_eq!(uniform.draw(&mut a), b.below(10) as usize);
        }
        let law = TimestepSampling::LogNormal {
            mean: 2.0,
            std: 0.5,
        };
        let weighted = SpanDraw::over_timesteps(law, &alpha_bars);
        let picker = picker_over_timesteps(law, &alpha_bars);
        let (mut a, mut b) = (NoiseStream::for_step(3, 7), NoiseStream::for_step(3, 7));
        let drawn: Vec<usize> = (0..200).map(|_| weighted.draw(&mut a)).collect();
        assert!(drawn.iter().all(|&i| i == picker.pick(b.uniform())));
        // The law's median σ = e² ≈ 7.4 lies past the noisiest span (σ 2.0 to 3.0), which holds
        // most of the mass the spans cover.
        assert!(drawn.iter().filter(|&&i| i == 9).count() > 150, "{drawn:?}");
    }
}
