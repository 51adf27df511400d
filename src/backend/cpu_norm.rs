//! GroupNorm with an optional SiLU after it, forward and backward, fused on the CPU: one pass for
//! the statistics and one for the output, instead of burn's chain of ~9 primitive ops (each a
//! pass over the tensor, an allocation and an autodiff node), and the SiLU's two more.
//!
//! Per sample `n` and group `g` (a contiguous block of `C/G` channels × `HW` in NCHW):
//! `x̂ = (x − μ)·rstd`, `y = γ_c·x̂ + β_c`, `out = y·σ(y)` when fused with SiLU (as
//! `torch.nn.GroupNorm` + `F.silu`; statistics in f64, variance biased). Backward, with
//! `dy = dout·σ(y)·(1 + y·(1 − σ(y)))` (or `dout`) and `dx̂ = γ_c·dy`:
//! `dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))`, `dγ_c = Σ dy·x̂`, `dβ_c = Σ dy`.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// The sizes of one GroupNorm: input `[batch, channels, spatial…]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormGeometry {
    pub batch: usize,
    pub channels: usize,
    pub groups: usize,
    /// Elements per channel (H·W).
    pub spatial: usize,
    pub epsilon: f64,
    /// SiLU after the affine.
    pub silu: bool,
}

/// What the backward needs besides the input: per (sample, group) mean and 1/σ.
#[derive(Debug, Clone)]
pub struct NormStatistics {
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

impl NormGeometry {
    /// `None` when the channels do not split into `groups`.
    pub fn new(shape: &[usize], groups: usize, epsilon: f64, silu: bool) -> Option<Self> {
        let (&batch, &channels) = (shape.first()?, shape.get(1)?);
        (groups > 0 && channels % groups == 0 && shape.len() >= 3).then(|| Self {
            batch,
            channels,
            groups,
            spatial: shape[2..].iter().product(),
            epsilon,
            silu,
        })
    }

    fn channels_per_group(&self) -> usize {
        self.channels / self.groups
    }

    fn group_len(&self) -> usize {
        self.channels_per_group() * self.spatial
    }

    /// Elements of the input.
    pub fn elements(&self) -> usize {
        self.batch * self.channels * self.spatial
    }
}

/// `e^x` for f32 without a libm call, so that the loops around it vectorise: `x = n·ln2 + r`
/// with `|r| ≤ ln2/2` (n rounded by the 1.5·2²³ trick, whose low mantissa bits are then n itself,
/// so no saturating float → int conversion breaks the vector loop), `e^r` by its degree-6 Taylor
/// polynomial (relative error < 2e-7), `2^n` built in the exponent bits; `x` clamped to f32's
/// normal range.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `shifted`'s bits minus ROUND's are n (|n| ≤ 127 fits the 22 low mantissa bits).
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    f32::from_bits(n_int.wrapping_add(127) << 23) * p
}

/// Lanes of the partial sums below: wide enough for two AVX2 registers, so that a reduction
/// vectorises (a serial float sum cannot be reordered by the compiler).
pub(super) const LANES: usize = 16;

/// `Σ f(x)` with f32 partial sums in [`LANES`] lanes over blocks of 1 024 values, blocks summed
/// in f64.
#[inline(always)]
fn sum_of(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0.0f64;
    for block in x.chunks(1024) {
        let mut acc = [0.0f32; LANES];
        let mut lanes = block.chunks_exact(LANES);
        for c in &mut lanes {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f(v);
            }
        }
        let tail: f32 = lanes.remainder().iter().map(|&v| f(v)).sum();
        total += acc.iter().map(|&a| a as f64).sum::<f64>() + tail as f64;
    }
    total
}

#[inline(always)]
fn sigmoid(y: f32) -> f32 {
    1.0 / (1.0 + exp(-y))
}

with_avx2! {
    /// One (sample, group): `x`, `y` its `cpg` channels × `spatial` values, `gamma`/`beta` its
    /// channels' affine; returns (mean, 1/σ).
    fn forward_group(
        x: &[f32],
        y: &mut [MaybeUninit<f32>],
        gamma: &[f32],
        beta: &[f32],
        spatial: usize,
        epsilon: f64,
        silu: bool,
    ) -> (f32, f32) {
        let len = x.len() as f64;
        let mean = sum_of(x, |v| v) / len;
        let m = mean as f32;
        let var = sum_of(x, |v| (v - m) * (v - m)) / len;
        let rstd = 1.0 / (var + epsilon).sqrt();
        for (c, (y, x)) in y.chunks_exact_mut(spatial).zip(x.chunks_exact(spatial)).enumerate() {
            let a = (rstd * gamma[c] as f64) as f32;
            let b = beta[c] - m * a;
            if silu {
                for (y, &x) in y.iter_mut().zip(x) {
                    let v = x * a + b;
                    y.write(v * sigmoid(v));
                }
            } else {
                for (y, &x) in y.iter_mut().zip(x) {
                    y.write(x * a + b);
                }
            }
        }
        (m, rstd as f32)
    }
}

/// Output and statistics; `x`, `gamma` and `beta` as in `torch.nn.GroupNorm`.
pub fn forward(
    g: &NormGeometry,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
) -> (Vec<f32>, NormStatistics) {
    assert_eq!(x.len(), g.elements(), "group_norm: input size");
    assert!(
        gamma.len() == g.channels && beta.len() == g.channels,
        "group_norm: affine size"
    );
    let (len, cpg) = (g.group_len(), g.channels_per_group());
    // Written once per element by its group's task; not zeroed first (a zeroed `vec!` of a
    // recycled size is a serial memset).
    let mut y = Vec::<f32>::with_capacity(g.elements());
    let mut stats = vec![(0.0f32, 0.0f32); g.batch * g.groups];
    y.spare_capacity_mut()[..g.elements()]
        .par_chunks_mut(len)
        .zip(x.par_chunks(len))
        .zip(stats.par_iter_mut())
        .enumerate()
        .for_each(|(i, ((y, x), stat))| {
            let c = (i % g.groups) * cpg..(i % g.groups + 1) * cpg;
            *stat = forward_group(
                x,
                y,
                &gamma[c.clone()],
                &beta[c],
                g.spatial,
                g.epsilon,
                g.silu,
            );
        });
    // SAFETY: the groups partition the output and `forward_group` wrote every element of each.
    unsafe { y.set_len(g.elements()) };
    let (mean, rstd) = stats.into_iter().unzip();
    (y, NormStatistics { mean, rstd })
}

with_avx2! {
    /// Pass 1 of the backward over one channel: `dx̂ = γ·dy` into `dx`; returns (Σ dy·x̂, Σ dy).
    fn backward_channel(
        dx: &mut [f32],
        x: &[f32],
        dout: &[f32],
        mean: f32,
        rstd: f32,
        gamma: f32,
        beta: f32,
        silu: bool,
    ) -> (f32, f32) {
        let (mut sdy, mut sdy_xhat) = ([0.0f32; LANES], [0.0f32; LANES]);
        let one = |dx: &mut f32, x: f32, dout: f32, sdy: &mut f32, sdy_xhat: &mut f32| {
            let xhat = (x - mean) * rstd;
            let dy = if silu {
                let y = xhat * gamma + beta;
                let s = sigmoid(y);
                dout * s * (1.0 + y * (1.0 - s))
            } else {
                dout
            };
            *sdy += dy;
            *sdy_xhat += dy * xhat;
            *dx = dy * gamma;
        };
        let mut chunks = dx
            .chunks_exact_mut(LANES)
            .zip(x.chunks_exact(LANES))
            .zip(dout.chunks_exact(LANES));
        for ((dx, x), dout) in &mut chunks {
            for l in 0..LANES {
                one(&mut dx[l], x[l], dout[l], &mut sdy[l], &mut sdy_xhat[l]);
            }
        }
        let done = x.len() / LANES * LANES;
        for i in done..x.len() {
            one(&mut dx[i], x[i], dout[i], &mut sdy[0], &mut sdy_xhat[0]);
        }
        (sdy_xhat.iter().sum(), sdy.iter().sum())
    }
}

with_avx2! {
    /// Pass 2 of the backward over one group: `dx = rstd·(dx̂ − m1 − x̂·m2)` in place.
    fn backward_finish(dx: &mut [f32], x: &[f32], mean: f32, rstd: f32, m1: f32, m2: f32) {
        for (dx, &x) in dx.iter_mut().zip(x) {
            let xhat = (x - mean) * rstd;
            *dx = rstd * (*dx - m1 - xhat * m2);
        }
    }
}

/// `(dx, dgamma, dbeta)` from the output gradient `dout`.
pub fn backward(
    g: &NormGeometry,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &NormStatistics,
    dout: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(
        dout.len(),
        g.elements(),
        "group_norm backward: output gradient size"
    );
    let (len, cpg) = (g.group_len(), g.channels_per_group());
    let mut dx = vec![0.0f32; g.elements()];
    // Per (sample, channel): Σ dy·x̂ and Σ dy, summed over samples below.
    let mut partial = vec![(0.0f64, 0.0f64); g.batch * g.channels];
    dx.par_chunks_mut(len)
        .zip(x.par_chunks(len))
        .zip(dout.par_chunks(len))
        .zip(partial.par_chunks_mut(cpg))
        .enumerate()
        .for_each(|(i, (((dx, x), dout), partial))| {
            let (mean, rstd) = (stats.mean[i], stats.rstd[i]);
            let c0 = (i % g.groups) * cpg;
            // Pass 1: dx̂ into dx; the group sums of dx̂ and dx̂·x̂; the affine gradients.
            let (mut sum_dxhat, mut sum_dxhat_xhat) = (0.0f64, 0.0f64);
            for (c, ((dx, x), dout)) in dx
                .chunks_exact_mut(g.spatial)
                .zip(x.chunks_exact(g.spatial))
                .zip(dout.chunks_exact(g.spatial))
                .enumerate()
            {
                let (gm, bt) = (gamma[c0 + c], beta[c0 + c]);
                let (sdy_xhat, sdy) = backward_channel(dx, x, dout, mean, rstd, gm, bt, g.silu);
                partial[c] = (sdy_xhat as f64, sdy as f64);
                sum_dxhat += sdy as f64 * gm as f64;
                sum_dxhat_xhat += sdy_xhat as f64 * gm as f64;
            }
            // Pass 2: dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)).
            let m1 = (sum_dxhat / len as f64) as f32;
            let m2 = (sum_dxhat_xhat / len as f64) as f32;
            backward_finish(dx, x, mean, rstd, m1, m2);
        });
    let mut dgamma = vec![0.0f64; g.channels];
    let mut dbeta = vec![0.0f64; g.channels];
    for sample in partial.chunks_exact(g.channels) {
        for (c, &(dg, db)) in sample.iter().enumerate() {
            dgamma[c] += dg;
            dbeta[c] += db;
        }
    }
    let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    (dx, f32s(dgamma), f32s(dbeta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_values as values;

    /// The loss `Σ probe·out` in f64, for finite differences.
    fn loss(g: &NormGeometry, x: &[f32], gamma: &[f32], beta: &[f32], probe: &[f32]) -> f64 {
        let (y, _) = forward(g, x, gamma, beta);
        y.iter()
            .zip(probe)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum()
    }

    #[test]
    fn gradients_match_finite_differences_with_and_without_silu() {
        for silu in [false, true] {
            let g = NormGeometry::new(&[2, 6, 3, 4], 3, 1e-5, silu).unwrap();
            let x: Vec<f32> = values(g.elements(), 1)
                .iter()
                .map(|v| v * 3.0 + 0.5)
                .collect();
            let (gamma, beta) = (values(6, 2), values(6, 3));
            let probe = values(g.elements(), 4);
            let (_, stats) = forward(&g, &x, &gamma, &beta);
            let (dx, dgamma, dbeta) = backward(&g, &x, &gamma, &beta, &stats, &probe);
            let h = 1e-2f32;
            let numeric = |f: &dyn Fn(f32) -> f64| (f(h) - f(-h)) / (2.0 * h as f64);
            let check = |got: f32, want: f64, what: &str| {
                assert!(
                    (got as f64 - want).abs() < 2e-3 * (1.0 + want.abs()),
                    "silu {silu}: {what}: {got} vs {want}"
                );
            };
            for i in [0, 7, 30, 71, 143] {
                let want = numeric(&|d| {
                    let mut x = x.clone();
                    x[i] += d;
                    loss(&g, &x, &gamma, &beta, &probe)
                });
                check(dx[i], want, &format!("dx[{i}]"));
            }
            for c in 0..6 {
                let want = numeric(&|d| {
                    let mut gm = gamma.clone();
                    gm[c] += d;
                    loss(&g, &x, &gm, &beta, &probe)
                });
                check(dgamma[c], want, &format!("dgamma[{c}]"));
                let want = numeric(&|d| {
                    let mut bt = beta.clone();
                    bt[c] += d;
                    loss(&g, &x, &gamma, &bt, &probe)
                });
                check(dbeta[c], want, &format!("dbeta[{c}]"));
            }
        }
    }

    #[test]
    fn the_polynomial_exp_matches_libm() {
        let mut worst = 0.0f64;
        for i in -87_000..=88_000 {
            let x = i as f32 / 1000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
        }
        assert!(worst < 5e-7, "max relative error {worst}");
        assert!(sigmoid(-200.0) < 1e-37 && (sigmoid(200.0) - 1.0).abs() < 1e-7);
    }

    #[test]
    fn each_group_is_normalised_to_zero_mean_and_unit_variance() {
        let g = NormGeometry::new(&[2, 4, 5], 2, 0.0, false).unwrap();
        let x: Vec<f32> = values(g.elements(), 9)
            .iter()
            .map(|v| v * 5.0 + 2.0)
            .collect();
        let (y, _) = forward(&g, &x, &[1.0; 4], &[0.0; 4]);
        for group in y.chunks_exact(10) {
            let mean = group.iter().sum::<f32>() / 10.0;
            let var = group.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 10.0;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4,
                "{mean} {var}"
            );
        }
    }
}
