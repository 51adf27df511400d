//! The parameterisation seam: what a model's output means (ε, v or x0 per the scheduler config's
//! `prediction_type`) on a noise schedule, turned into x0, ε or a DDIM move; classifier-free
//! guidance; the consistency boundary scalings. Distillation objectives and the sampling loop
//! read the model through these functions only (k-diffusion's denoiser wrappers; diffusers'
//! `scheduling_ddim.py` step arithmetic).

use burn::prelude::*;
use fewstep_schedulers::Prediction;
use fewstep_schedulers::schedule::{eps_coefficients, target_coefficients, x0_coefficients};

use crate::models::{Conditioning, UNet};

/// Per-row coefficients (one per batch row) as a [B, 1, 1, 1] tensor.
pub fn per_row(values: Vec<f32>, device: &Device) -> Tensor<4> {
    let b = values.len();
    Tensor::<1>::from_floats(values.as_slice(), device).reshape([b, 1, 1, 1])
}

/// Batch row indices as an index tensor (for `select` along dimension 0).
pub fn row_index(rows: &[usize], device: &Device) -> Tensor<1, Int> {
    let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Tensor::<1, Int>::from_ints(idx.as_slice(), device)
}

/// `unet`'s output at one (integer) timestep per row.
pub fn model_output(unet: &UNet, z: Tensor<4>, t: &[i64], cond: &Conditioning) -> Tensor<4> {
    let device = z.device();
    let t_in: Vec<f32> = t.iter().map(|&t| t as f32).collect();
    unet.forward(z, Tensor::<1>::from_floats(t_in.as_slice(), &device), cond)
}

/// x0 = a·z + b·out per row at ᾱ `alpha_bar`, for a model of `prediction` type.
pub fn x0_from_output(
    prediction: Prediction,
    z: Tensor<4>,
    out: Tensor<4>,
    alpha_bar: &[f64],
) -> Tensor<4> {
    combine_per_row(z, out, alpha_bar, |a| x0_coefficients(prediction, a))
}

/// The training target a·x0 + b·ε per row at ᾱ `alpha_bar`, for a model of `prediction` type
/// (ε, v or x0) on z = √ᾱ·x0 + √(1 − ᾱ)·ε.
pub fn training_target(
    prediction: Prediction,
    x0: Tensor<4>,
    eps: Tensor<4>,
    alpha_bar: &[f64],
) -> Tensor<4> {
    combine_per_row(x0, eps, alpha_bar, |a| target_coefficients(prediction, a))
}

/// a·u + b·w per row, with (a, b) = `coefficients`(ᾱ) at each row's ᾱ.
fn combine_per_row(
    u: Tensor<4>,
    w: Tensor<4>,
    alpha_bar: &[f64],
    coefficients: impl Fn(f32) -> (f32, f32),
) -> Tensor<4> {
    let device = u.device();
    let (a, b): (Vec<f32>, Vec<f32>) = alpha_bar.iter().map(|&a| coefficients(a as f32)).unzip();
    u * per_row(a, &device) + w * per_row(b, &device)
}

/// One deterministic DDIM move per row: from z at ᾱ `from`, with the model output `out` there,
/// to ᾱ `to` (x0 and ε recovered from `out`, then recombined).
pub fn ddim_move(
    prediction: Prediction,
    z: Tensor<4>,
    out: Tensor<4>,
    from: &[f64],
    to: &[f64],
) -> Tensor<4> {
    let device = z.device();
    let x0 = x0_from_output(prediction, z.clone(), out.clone(), from);
    let eps = combine_per_row(z, out, from, |a| eps_coefficients(prediction, a));
    let a_to = per_row(to.iter().map(|&a| a.sqrt() as f32).collect(), &device);
    let s_to = per_row(
        to.iter().map(|&a| (1.0 - a).sqrt() as f32).collect(),
        &device,
    );
    x0 * a_to + eps * s_to
}

/// z = √ᾱ·x0 + √(1 − ᾱ)·ε per row.
pub fn noise_to(x0: Tensor<4>, eps: Tensor<4>, alpha_bar: &[f64]) -> Tensor<4> {
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

/// Classifier-free guidance: u + g·(c − u) per row (g: [B, 1, 1, 1] or a scalar broadcast), the
/// combination diffusers' pipelines apply (`noise_pred_uncond + guidance_scale · (text − uncond)`);
/// the consistency objective's c + w·(c − u) is the same with g = w + 1.
pub fn guidance_combination(uncond: Tensor<4>, cond: Tensor<4>, g: Tensor<4>) -> Tensor<4> {
    uncond.clone() + (cond - uncond) * g
}

/// The guided output of `unet` at `t` ([B]): both passes as one batch [uncond; cond] of 2B rows,
/// combined by [`guidance_combination`].
pub fn guided_output(
    unet: &UNet,
    x: Tensor<4>,
    t: Tensor<1>,
    uncond_and_cond: &Conditioning,
    g: Tensor<4>,
) -> Tensor<4> {
    let b = x.dims()[0];
    let out = unet.forward(
        Tensor::cat(vec![x.clone(), x], 0),
        Tensor::cat(vec![t.clone(), t], 0),
        uncond_and_cond,
    );
    guidance_combination(out.clone().narrow(0, 0, b), out.narrow(0, b, b), g)
}

/// A consistency model's output f = c_skip·z + c_out·x̂0 per row (the boundary scalings of
/// Song et al. 2023, eq. 7; LCM's `c_skip`/`c_out` in diffusers' `scheduling_lcm.py`).
pub fn consistency_combination(
    z: Tensor<4>,
    x0: Tensor<4>,
    c_skip: Vec<f32>,
    c_out: Vec<f32>,
) -> Tensor<4> {
    let device = z.device();
    z * per_row(c_skip, &device) + x0 * per_row(c_out, &device)
}
