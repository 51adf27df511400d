//! Distillation objectives, one per file, as pure functions returning a per-sample loss, and the
//! teacher-side DDIM arithmetic they share.

pub mod consistency;
pub mod gan;
pub mod progressive;

use burn::prelude::*;
use fewstep_schedulers::Prediction;
use fewstep_schedulers::schedule::{eps_coefficients, x0_coefficients};

use crate::models::{Conditioning, UNet};
use crate::sample::per_row;

/// `unet`'s output at one timestep per row.
pub(crate) fn run_model(unet: &UNet, z: Tensor<4>, t: &[i64], cond: &Conditioning) -> Tensor<4> {
    let device = z.device();
    let t_in: Vec<f32> = t.iter().map(|&t| t as f32).collect();
    unet.forward(z, Tensor::<1>::from_floats(t_in.as_slice(), &device), cond)
}

/// x0 = a·z + b·out per row at ᾱ `alpha_bar`, for a model of `prediction` type.
pub(crate) fn x0_from_output(
    prediction: Prediction,
    z: Tensor<4>,
    out: Tensor<4>,
    alpha_bar: &[f64],
) -> Tensor<4> {
    let device = z.device();
    let (a, b): (Vec<f32>, Vec<f32>) = alpha_bar
        .iter()
        .map(|&a| x0_coefficients(prediction, a as f32))
        .unzip();
    z * per_row(a, &device) + out * per_row(b, &device)
}

/// One deterministic DDIM move per row: from z at ᾱ `from`, with the model output `out` there,
/// to ᾱ `to` (x0 and ε recovered from `out`, then recombined).
pub(crate) fn ddim_move(
    prediction: Prediction,
    z: Tensor<4>,
    out: Tensor<4>,
    from: &[f64],
    to: &[f64],
) -> Tensor<4> {
    let device = z.device();
    let x0 = x0_from_output(prediction, z.clone(), out.clone(), from);
    let (ea, eb): (Vec<f32>, Vec<f32>) = from
        .iter()
        .map(|&a| eps_coefficients(prediction, a as f32))
        .unzip();
    let eps = z * per_row(ea, &device) + out * per_row(eb, &device);
    let a_to = per_row(to.iter().map(|&a| a.sqrt() as f32).collect(), &device);
    let s_to = per_row(
        to.iter().map(|&a| (1.0 - a).sqrt() as f32).collect(),
        &device,
    );
    x0 * a_to + eps * s_to
}

/// z = √ᾱ·x0 + √(1 − ᾱ)·ε per row.
pub(crate) fn noise_to(x0: Tensor<4>, eps: Tensor<4>, alpha_bar: &[f64]) -> Tensor<4> {
    let device = x0.device();
    let a = per_row(
        alpha_bar.iter().map(|&a| a.sqrt() as f32).collect(),
        &device,
    );
    let s = per_row(
        alpha_bar.iter().map(|&a| (1.0 - a).sqrt() as f32).collect(),
        &device,
    );
    x0 * a + eps * s
}

/// A v-prediction, cosine-schedule, trailing-spacing DDIM config (the shipped teacher's) for the
/// objectives' unit tests.
#[cfg(test)]
pub(crate) fn test_scheduler_config() -> fewstep_schedulers::SchedulerConfig {
    fewstep_schedulers::SchedulerConfig::from_json_str(
        r#"{"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "v_prediction", "timestep_spacing": "trailing",
            "set_alpha_to_one": true, "clip_sample": false}"#,
    )
    .unwrap()
}
