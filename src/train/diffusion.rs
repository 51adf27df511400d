//! The denoising objective every diffusion model here is trained with (Ho et al. 2020, with the
//! target chosen by `prediction_type`: ε, v (Salimans & Ho 2022) or x0).

use burn::prelude::*;
use fewstep_schedulers::schedule::target_coefficients;
use fewstep_schedulers::{NoiseSchedule, Prediction};

use crate::denoiser::per_row;
use crate::models::{Conditioning, UNet};

/// Mean squared error between the UNet's output on z_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε and its target,
/// averaged over the batch: a scalar [1].
pub fn denoising_loss(
    unet: &UNet,
    x0: Tensor<4>,
    eps: Tensor<4>,
    t: &[usize],
    cond: &Conditioning,
    schedule: &NoiseSchedule,
    prediction: Prediction,
) -> Tensor<1> {
    let device = x0.device();
    let coeffs: Vec<(f32, f32)> = t
        .iter()
        .map(|&t| schedule.add_noise_coefficients(t))
        .collect();
    let a = per_row(coeffs.iter().map(|c| c.0).collect(), &device);
    let s = per_row(coeffs.iter().map(|c| c.1).collect(), &device);
    let z = x0.clone() * a + eps.clone() * s; // [B, C, H, W]
    let targets: Vec<(f32, f32)> = t
        .iter()
        .map(|&t| target_coefficients(prediction, schedule.alpha_bar(t)))
        .collect();
    let ta = per_row(targets.iter().map(|c| c.0).collect(), &device);
    let tb = per_row(targets.iter().map(|c| c.1).collect(), &device);
    let target = x0 * ta + eps * tb;
    let t_in: Vec<f32> = t.iter().map(|&t| t as f32).collect();
    let out = unet.forward(z, Tensor::<1>::from_floats(t_in.as_slice(), &device), cond);
    (out - target).powf_scalar(2.0).mean()
}
