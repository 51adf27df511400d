//! The denoising objective every diffusion model here is trained with (Ho et al. 2020, with the
//! target chosen by `prediction_type`: ε, v (Salimans & Ho 2022) or x0), optionally weighted by
//! min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy").

use burn::prelude::*;
use fewstep_schedulers::{NoiseSchedule, Prediction};

use crate::denoiser::{per_row, training_target};
use crate::models::{Conditioning, UNet};

/// The min-SNR-γ weight of one sample's squared error on the `prediction` target at ᾱ_t.
///
/// The paper weights the error of the x0 estimate by min(SNR_t, γ), SNR_t = ᾱ_t / (1 − ᾱ_t). An
/// error on ε is SNR_t times one on x0, an error on v is SNR_t + 1 times one on x0, so the weight
/// on the target's error is min(SNR_t, γ) / SNR_t for ε, min(SNR_t, γ) / (SNR_t + 1) for v and
/// min(SNR_t, γ) for x0 (the weights of diffusers' training scripts' `--snr_gamma`). For ε at
/// SNR_t = 0 it is the limit, 1.
pub fn min_snr_weight(prediction: Prediction, alpha_bar: f32, gamma: f64) -> f32 {
    let alpha_bar = f64::from(alpha_bar);
    let snr = alpha_bar / (1.0 - alpha_bar);
    let capped = snr.min(gamma);
    let w = match prediction {
        Prediction::Epsilon if snr <= gamma => 1.0,
        Prediction::Epsilon => gamma / snr,
        Prediction::V => capped / (snr + 1.0),
        Prediction::Sample => capped,
    };
    w as f32
}

/// Mean squared error between the UNet's output on z_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε and its target,
/// averaged over the batch: a scalar [1]. With `snr_gamma`, each sample's error is weighted by
/// [`min_snr_weight`] before the mean.
#[allow(clippy::too_many_arguments)]
pub fn denoising_loss(
    unet: &UNet,
    x0: Tensor<4>,
    eps: Tensor<4>,
    t: &[usize],
    cond: &Conditioning,
    schedule: &NoiseSchedule,
    prediction: Prediction,
    snr_gamma: Option<f64>,
) -> Tensor<1> {
    let device = x0.device();
    let coeffs: Vec<(f32, f32)> = t
        .iter()
        .map(|&t| schedule.add_noise_coefficients(t))
        .collect();
    let a = per_row(coeffs.iter().map(|c| c.0).collect(), &device);
    let s = per_row(coeffs.iter().map(|c| c.1).collect(), &device);
    let z = x0.clone() * a + eps.clone() * s; // [B, C, H, W]
    let alpha_bar: Vec<f64> = t.iter().map(|&t| schedule.alpha_bar(t) as f64).collect();
    let target = training_target(prediction, x0, eps, &alpha_bar);
    let t_in: Vec<f32> = t.iter().map(|&t| t as f32).collect();
    let out = unet.forward(z, Tensor::<1>::from_floats(t_in.as_slice(), &device), cond);
    let err = (out - target).powf_scalar(2.0);
    match snr_gamma {
        None => err.mean(),
        Some(gamma) => {
            let w: Vec<f32> = t
                .iter()
                .map(|&t| min_snr_weight(prediction, schedule.alpha_bar(t), gamma))
                .collect();
            (err * per_row(w, &device)).mean()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_snr_weight_caps_the_x0_weight_at_gamma_for_every_target() {
        // ᾱ = 0.5: SNR 1, below γ = 5: the x0 weight is SNR itself.
        assert!((min_snr_weight(Prediction::Epsilon, 0.5, 5.0) - 1.0).abs() < 1e-6);
        assert!((min_snr_weight(Prediction::V, 0.5, 5.0) - 0.5).abs() < 1e-6);
        assert!((min_snr_weight(Prediction::Sample, 0.5, 5.0) - 1.0).abs() < 1e-6);
        // ᾱ = 0.95: SNR 19, capped at γ = 5.
        assert!((min_snr_weight(Prediction::Epsilon, 0.95, 5.0) - 5.0 / 19.0).abs() < 1e-5);
        assert!((min_snr_weight(Prediction::V, 0.95, 5.0) - 0.25).abs() < 1e-5);
        assert!((min_snr_weight(Prediction::Sample, 0.95, 5.0) - 5.0).abs() < 1e-5);
        // SNR 0: the x0 weight min(0, γ) is 0, so v's is 0 too; ε keeps 1, the limit of min(SNR, γ)/SNR.
        assert_eq!(min_snr_weight(Prediction::Epsilon, 0.0, 5.0), 1.0);
        assert_eq!(min_snr_weight(Prediction::V, 0.0, 5.0), 0.0);
        // In x0 terms the three agree: weight × (SNR for ε, SNR + 1 for v, 1 for x0).
        for ab in [0.01f32, 0.3, 0.8, 0.99] {
            let snr = f64::from(ab) / (1.0 - f64::from(ab));
            let x0 = snr.min(5.0);
            let eps = f64::from(min_snr_weight(Prediction::Epsilon, ab, 5.0)) * snr;
            let v = f64::from(min_snr_weight(Prediction::V, ab, 5.0)) * (snr + 1.0);
            assert!((eps - x0).abs() < 1e-4 * x0.max(1.0), "ε at ᾱ {ab}");
            assert!((v - x0).abs() < 1e-4 * x0.max(1.0), "v at ᾱ {ab}");
        }
    }
}
