//! Attention `softmax(scale·q·kᵀ)·v` (no mask) fused on the CPU, forward and backward, instead
//! of flex's per-element naive kernel (a libm `exp` per score) and, under autodiff, burn's
//! decomposition into matmul, softmax and matmul with an autodiff node each.
//!
//! Per (batch, head) task and per block of queries (scores kept within [`SCORE_BLOCK`] floats,
//! so that a 4 096-token image does not allocate a 4 096² matrix): `S = Q·Kᵀ` (GEMM),
//! `P = softmax(scale·S)` row by row (the vectorisable `exp` of [`super::cpu_norm`], the scale
//! folded into its argument), `O = P·V` (GEMM).
//! The backward recomputes `P` per block rather than keeping it (flash attention's trade):
//! `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P∘(dP − rowsum(dP∘P))`, `dQ = scale·dS·K`,
//! `dK += scale·dSᵀ·Q`.

use rayon::prelude::*;

use super::cpu_conv::{Operand, matmul};
use super::cpu_norm::{LANES, exp};

/// Floats of scores per query block.
pub const SCORE_BLOCK: usize = 1 << 16;

/// The sizes of one attention: q `[BH, N, d]`, k `[BH, M, d]`, v `[BH, M, d_v]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionGeometry {
    /// Batch × heads.
    pub batch_heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_dim: usize,
    pub value_dim: usize,
    pub scale: f32,
}

impl AttentionGeometry {
    /// From the 4-D shapes `[B, h, N, d]`, `[B, h, M, d]`, `[B, h, M, d_v]`; `None` when they
    /// disagree or are empty.
    pub fn new(q: [usize; 4], k: [usize; 4], v: [usize; 4]) -> Option<Self> {
        let consistent = q[..2] == k[..2] && k[..3] == v[..3] && q[3] == k[3];
        let nonempty = q.iter().chain(&k).chain(&v).all(|&d| d > 0);
        (consistent && nonempty).then(|| Self {
            batch_heads: q[0] * q[1],
            queries: q[2],
            keys: k[2],
            head_dim: q[3],
            value_dim: v[3],
            scale: 1.0 / (q[3] as f32).sqrt(),
        })
    }

    /// Query rows per block.
    fn block_rows(&self) -> usize {
        (SCORE_BLOCK / self.keys).clamp(1, self.queries)
    }

    fn blocks(&self) -> impl Iterator<Item = std::ops::Range<usize>> {
        let (rows, n) = (self.block_rows(), self.queries);
        (0..n).step_by(rows).map(move |r| r..(r + rows).min(n))
    }
}

/// A row-major matrix with `cols` columns as a GEMM operand, or its transpose.
fn rows(data: &[f32], cols: usize) -> Operand<'_> {
    Operand {
        data,
        rs: cols as isize,
        cs: 1,
    }
}

fn transposed(data: &[f32], cols: usize) -> Operand<'_> {
    Operand {
        data,
        rs: 1,
        cs: cols as isize,
    }
}

with_avx2! {
    /// Raw scores `q·kᵀ` → probabilities `softmax(scale·s)` in place, one row of `keys` values at
    /// a time (the scale folded into the exponent: no separate pass).
    fn softmax_rows(scores: &mut [f32], keys: usize, scale: f32) {
        for row in scores.chunks_exact_mut(keys) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut lanes = [0.0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for (l, v) in lanes.iter_mut().zip(c.iter_mut()) {
                    *v = exp((*v - max) * scale);
                    *l += *v;
                }
            }
            let mut sum: f32 = lanes.iter().sum();
            for v in chunks.into_remainder() {
                *v = exp((*v - max) * scale);
                sum += *v;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

with_avx2! {
    /// `dP → scale·P∘(dP − rowsum(dP∘P))` in place (`grad` holds dP, `probs` P).
    fn softmax_backward_rows(grad: &mut [f32], probs: &[f32], keys: usize, scale: f32) {
        for (g, p) in grad.chunks_exact_mut(keys).zip(probs.chunks_exact(keys)) {
            let mut lanes = [0.0f32; LANES];
            let mut chunks = g.chunks_exact(LANES).zip(p.chunks_exact(LANES));
            for (g, p) in &mut chunks {
                for l in 0..LANES {
                    lanes[l] += g[l] * p[l];
                }
            }
            let done = keys / LANES * LANES;
            let dot: f32 =
                lanes.iter().sum::<f32>() + g[done..].iter().zip(&p[done..]).map(|(a, b)| a * b).sum::<f32>();
            for (g, &p) in g.iter_mut().zip(p) {
                *g = scale * p * (*g - dot);
            }
        }
    }
}

/// The probabilities of the query rows `block` of one (batch, head): `[rows, M]` into `probs`.
fn probabilities(
    g: &AttentionGeometry,
    q: &[f32],
    k: &[f32],
    block: &std::ops::Range<usize>,
    probs: &mut Vec<f32>,
) {
    let (d, m) = (g.head_dim, g.keys);
    probs.resize(block.len() * m, 0.0);
    let q_block = &q[block.start * d..block.end * d];
    matmul(
        probs,
        [block.len(), m, d],
        false,
        rows(q_block, d),
        transposed(k, d),
    );
    softmax_rows(probs, m, g.scale);
}

/// `out [BH, N, d_v]`.
pub fn forward(g: &AttentionGeometry, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let (n, m, d, dv) = (g.queries, g.keys, g.head_dim, g.value_dim);
    assert!(
        q.len() == g.batch_heads * n * d
            && k.len() == g.batch_heads * m * d
            && v.len() == g.batch_heads * m * dv,
        "attention: input sizes"
    );
    let mut out = vec![0.0f32; g.batch_heads * n * dv];
    out.par_chunks_mut(n * dv)
        .enumerate()
        .for_each_init(Vec::new, |probs, (i, out)| {
            let (q, k, v) = (
                &q[i * n * d..][..n * d],
                &k[i * m * d..][..m * d],
                &v[i * m * dv..][..m * dv],
            );
            for block in g.blocks() {
                probabilities(g, q, k, &block, probs);
                let o = &mut out[block.start * dv..block.end * dv];
                matmul(o, [block.len(), dv, m], false, rows(probs, m), rows(v, dv));
            }
        });
    out
}

/// `(dq, dk, dv)` from the output gradient `dout [BH, N, d_v]`.
pub fn backward(
    g: &AttentionGeometry,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, m, d, dvd) = (g.queries, g.keys, g.head_dim, g.value_dim);
    assert_eq!(
        dout.len(),
        g.batch_heads * n * dvd,
        "attention backward: output gradient size"
    );
    let mut dq = vec![0.0f32; g.batch_heads * n * d];
    let mut dk = vec![0.0f32; g.batch_heads * m * d];
    let mut dv = vec![0.0f32; g.batch_heads * m * dvd];
    dq.par_chunks_mut(n * d)
        .zip(dk.par_chunks_mut(m * d))
        .zip(dv.par_chunks_mut(m * dvd))
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(probs, grad), (i, ((dq, dk), dv))| {
                let (q, k, v) = (
                    &q[i * n * d..][..n * d],
                    &k[i * m * d..][..m * d],
                    &v[i * m * dvd..][..m * dvd],
                );
                let dout = &dout[i * n * dvd..][..n * dvd];
                for (b, block) in g.blocks().enumerate() {
                    probabilities(g, q, k, &block, probs);
                    let rows_n = block.len();
                    let (do_block, q_block) = (
                        &dout[block.start * dvd..block.end * dvd],
                        &q[block.start * d..block.end * d],
                    );
                    // dV += Pᵀ·dO
                    matmul(
                        dv,
                        [m, dvd, rows_n],
                        b > 0,
                        transposed(probs, m),
                        rows(do_block, dvd),
                    );
                    // dP = dO·Vᵀ, then dS (scaled) in place.
                    grad.resize(rows_n * m, 0.0);
                    matmul(
                        grad,
                        [rows_n, m, dvd],
                        false,
                        rows(do_block, dvd),
                        transposed(v, dvd),
                    );
                    softmax_backward_rows(grad, probs, m, g.scale);
                    // dQ = dS·K; dK += dSᵀ·Q
                    let dq_block = &mut dq[block.start * d..block.end * d];
                    matmul(dq_block, [rows_n, d, m], false, rows(grad, m), rows(k, d));
                    matmul(
                        dk,
                        [m, d, rows_n],
                        b > 0,
                        transposed(grad, m),
                        rows(q_block, d),
                    );
                }
            },
        );
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_values as values;

    /// The definition in f64: out[i] = Σ_j softmax_j(scale·q_i·k_j)·v_j.
    fn reference(g: &AttentionGeometry, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
        let (n, m, d, dv) = (g.queries, g.keys, g.head_dim, g.value_dim);
        let mut out = vec![0.0f64; g.batch_heads * n * dv];
        for h in 0..g.batch_heads {
            for i in 0..n {
                let s: Vec<f64> = (0..m)
                    .map(|j| {
                        (0..d)
                            .map(|c| q[(h * n + i) * d + c] as f64 * k[(h * m + j) * d + c] as f64)
                            .sum::<f64>()
                            * g.scale as f64
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..dv {
                    out[(h * n + i) * dv + c] = (0..m)
                        .map(|j| e[j] / z * v[(h * m + j) * dv + c] as f64)
                        .sum();
                }
            }
        }
        out
    }

    fn check(shape_q: [usize; 4], shape_k: [usize; 4], shape_v: [usize; 4]) {
        let g = AttentionGeometry::new(shape_q, shape_k, shape_v).unwrap();
        let size = |s: [usize; 4]| s.iter().product::<usize>();
        let q: Vec<f32> = values(size(shape_q), 1).iter().map(|v| v * 2.0).collect();
        let k = values(size(shape_k), 2);
        let v = values(size(shape_v), 3);
        let out = forward(&g, &q, &k, &v);
        for (a, b) in out.iter().zip(reference(&g, &q, &k, &v)) {
            assert!((*a as f64 - b).abs() < 1e-5, "forward: {a} vs {b}");
        }
        // Gradients of Σ probe·out against central differences of the f64 reference.
        let probe = values(out.len(), 4);
        let (dq, dk, dv) = backward(&g, &q, &k, &v, &probe);
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            reference(&g, q, k, v)
                .iter()
                .zip(&probe)
                .map(|(a, &b)| a * b as f64)
                .sum()
        };
        let h = 1e-3f32;
        for (which, grad, len) in [(0, &dq, q.len()), (1, &dk, k.len()), (2, &dv, v.len())] {
            for idx in [0, len / 3, len - 1] {
                let bump = |delta: f32| {
                    let (mut q2, mut k2, mut v2) = (q.clone(), k.clone(), v.clone());
                    [&mut q2, &mut k2, &mut v2][which][idx] += delta;
                    loss(&q2, &k2, &v2)
                };
                let want = (bump(h) - bump(-h)) / (2.0 * h as f64);
                let got = grad[idx] as f64;
                assert!(
                    (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "grad {which}[{idx}]: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn self_attention_matches_the_definition_in_values_and_gradients() {
        check([2, 3, 20, 8], [2, 3, 20, 8], [2, 3, 20, 8]);
    }

    #[test]
    fn cross_attention_with_another_value_width_matches_the_definition() {
        check([1, 2, 7, 4], [1, 2, 33, 4], [1, 2, 33, 6]);
    }

    #[test]
    fn query_blocks_give_the_same_result_as_one_block() {
        // 300 keys → 218 query rows per block: two blocks for 400 queries.
        let g = AttentionGeometry::new([1, 1, 400, 4], [1, 1, 300, 4], [1, 1, 300, 4]).unwrap();
        assert!(g.blocks().count() == 2);
        check([1, 1, 400, 4], [1, 1, 300, 4], [1, 1, 300, 4]);
    }
}
