//! 2-D convolution on the CPU as im2col GEMMs in NCHW, with the three passes training needs:
//!
//! - forward, per sample: `y_n [C_out, P] = W [C_out, R] · col_n [R, P]`, written straight into
//!   the NCHW output (which *is* `[C_out, P]` per sample) with the bias pre-filled;
//! - input gradient: `dcol_n [R, P] = Wᵀ · dY_n`, scattered back by col2im;
//! - weight gradient, the one burn's generic rule computes as a convolution with dY as the
//!   kernel (a skinny GEMM over ~9× duplicated data): `dW [C_out, R] = Σ_n dY_n · col_nᵀ`, one
//!   well-shaped GEMM per sample accumulated per thread, and the bias gradient in the same pass.
//!
//! `R = C_in·k_h·k_w` rows of `col_n`, one per kernel tap, each the input plane shifted by that
//! tap (zeros outside); `P = H_out·W_out` output pixels. A 1×1 convolution with unit stride and no
//! padding has `col_n = x_n` and skips the copy. Threads: one sample per task when the batch can
//! feed every thread, else the GEMM itself is parallel (batch-1 inference).

use burn::tensor::ops::ConvOptions;
use rayon::prelude::*;

/// The sizes of one convolution: input `[batch, c_in, h, w]`, weight `[c_out, c_in, k_h, k_w]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub k: [usize; 2],
    pub stride: [usize; 2],
    /// Padding before (top, left); the padding after only changes the output size.
    pub pad: [usize; 2],
    pub dilation: [usize; 2],
    pub out: [usize; 2],
}

impl ConvGeometry {
    /// `None` for grouped convolutions (not handled here) or an empty output.
    pub fn new(x: [usize; 4], weight: [usize; 4], options: &ConvOptions<2>) -> Option<Self> {
        let [batch, c_in, h, w] = x;
        let [c_out, c_in_w, kh, kw] = weight;
        if options.groups != 1 || c_in_w != c_in {
            return None;
        }
        let out = |i: usize, size: usize, k: usize| -> Option<usize> {
            let (before, after) = options.padding[i];
            let span = options.dilation[i] * (k - 1) + 1;
            let padded = size + before + after;
            (padded >= span).then(|| (padded - span) / options.stride[i] + 1)
        };
        let out = [out(0, h, kh)?, out(1, w, kw)?];
        (out[0] > 0 && out[1] > 0).then_some(Self {
            batch,
            c_in,
            h,
            w,
            c_out,
            k: [kh, kw],
            stride: options.stride,
            pad: [options.padding[0].0, options.padding[1].0],
            dilation: options.dilation,
            out,
        })
    }

    /// Rows of `col_n`: one per (input channel, kernel tap).
    fn rows(&self) -> usize {
        self.c_in * self.k[0] * self.k[1]
    }

    /// Output pixels per sample.
    fn pixels(&self) -> usize {
        self.out[0] * self.out[1]
    }

    /// `col_n` is `x_n` itself.
    fn is_pointwise(&self) -> bool {
        self.k == [1, 1]
            && self.stride == [1, 1]
            && self.pad == [0, 0]
            && self.out == [self.h, self.w]
    }

    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.c_out, self.out[0], self.out[1]]
    }

    /// Whether samples run one per task (the GEMM serial) or one after another (the GEMM parallel).
    fn per_sample_tasks(&self) -> bool {
        self.batch > 1 && self.batch >= rayon::current_num_threads()
    }

    /// The input columns `oj` of one output row that read inside the input row for a tap
    /// offset `off = kj·d − pad` (unit stride): `[lo, hi)`.
    fn valid_columns(&self, off: isize) -> (usize, usize) {
        let (ow, w) = (self.out[1] as isize, self.w as isize);
        let lo = (-off).clamp(0, ow) as usize;
        let hi = (w - off).clamp(0, ow) as usize;
        (lo, hi.max(lo))
    }

    /// The input row read by output row `oi` at kernel row `ki`, if inside.
    fn input_row(&self, oi: usize, ki: usize) -> Option<usize> {
        let iy = (oi * self.stride[0] + ki * self.dilation[0]) as isize - self.pad[0] as isize;
        (0..self.h as isize).contains(&iy).then_some(iy as usize)
    }

    /// `col [R, P]` of one sample `x [C_in, H, W]`.
    fn im2col(&self, x: &[f32], col: &mut [f32]) {
        let (p, [kh, kw], ow) = (self.pixels(), self.k, self.out[1]);
        for ci in 0..self.c_in {
            let plane = &x[ci * self.h * self.w..][..self.h * self.w];
            for ki in 0..kh {
                for kj in 0..kw {
                    let row = &mut col[((ci * kh + ki) * kw + kj) * p..][..p];
                    let off = (kj * self.dilation[1]) as isize - self.pad[1] as isize;
                    for oi in 0..self.out[0] {
                        let dst = &mut row[oi * ow..][..ow];
                        let Some(iy) = self.input_row(oi, ki) else {
                            dst.fill(0.0);
                            continue;
                        };
                        let src = &plane[iy * self.w..][..self.w];
                        if self.stride[1] == 1 {
                            let (lo, hi) = self.valid_columns(off);
                            dst[..lo].fill(0.0);
                            dst[hi..].fill(0.0);
                            let start = (lo as isize + off) as usize;
                            dst[lo..hi].copy_from_slice(&src[start..start + hi - lo]);
                        } else {
                            for (oj, d) in dst.iter_mut().enumerate() {
                                let ix = (oj * self.stride[1]) as isize + off;
                                *d = if (0..self.w as isize).contains(&ix) {
                                    src[ix as usize]
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adds `col [R, P]` back into one sample's input gradient `dx [C_in, H, W]` (the adjoint
    /// of [`Self::im2col`]).
    fn col2im_add(&self, col: &[f32], dx: &mut [f32]) {
        let (p, [kh, kw], ow) = (self.pixels(), self.k, self.out[1]);
        for ci in 0..self.c_in {
            let plane = &mut dx[ci * self.h * self.w..][..self.h * self.w];
            for ki in 0..kh {
                for kj in 0..kw {
                    let row = &col[((ci * kh + ki) * kw + kj) * p..][..p];
                    let off = (kj * self.dilation[1]) as isize - self.pad[1] as isize;
                    for oi in 0..self.out[0] {
                        let Some(iy) = self.input_row(oi, ki) else {
                            continue;
                        };
                        let src = &row[oi * ow..][..ow];
                        let dst = &mut plane[iy * self.w..][..self.w];
                        if self.stride[1] == 1 {
                            let (lo, hi) = self.valid_columns(off);
                            let start = (lo as isize + off) as usize;
                            for (d, s) in dst[start..start + hi - lo].iter_mut().zip(&src[lo..hi]) {
                                *d += s;
                            }
                        } else {
                            for (oj, s) in src.iter().enumerate() {
                                let ix = (oj * self.stride[1]) as isize + off;
                                if (0..self.w as isize).contains(&ix) {
                                    dst[ix as usize] += s;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A strided f32 matrix operand for [`gemm`]: element (i, j) at `ptr[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    rs: isize,
    cs: isize,
}

/// `dst [m, n] (row-major) = (accumulate ? dst : 0) + lhs [m, k] · rhs [k, n]`.
fn gemm(
    [m, n, k]: [usize; 3],
    dst: &mut [f32],
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    parallel: bool,
) {
    assert!(dst.len() >= m * n, "gemm: destination too small");
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index the strides reach lies inside the slices (the callers' layouts are
    // dense [m, k] / [k, n] views of them, checked by the length asserts at the call sites).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs,
            lhs.rs,
            rhs.data.as_ptr(),
            rhs.cs,
            rhs.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Forward: `x [N, C_in, H, W]`, `weight [C_out, C_in, kh, kw]`, `bias [C_out]` → `[N, C_out, OH, OW]`.
pub fn forward(g: &ConvGeometry, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (r, p) = (g.rows(), g.pixels());
    assert_eq!(x.len(), g.batch * g.c_in * g.h * g.w, "conv2d: input size");
    assert_eq!(weight.len(), g.c_out * r, "conv2d: weight size");
    let mut y = vec![0.0f32; g.batch * g.c_out * p];
    let per_sample = g.per_sample_tasks();
    let sample = |n: usize, y_n: &mut [f32], col: &mut Vec<f32>| {
        let x_n = &x[n * g.c_in * g.h * g.w..][..g.c_in * g.h * g.w];
        let col: &[f32] = if g.is_pointwise() {
            x_n
        } else {
            col.resize(r * p, 0.0);
            g.im2col(x_n, col);
            col
        };
        if let Some(b) = bias {
            for (row, &b) in y_n.chunks_exact_mut(p).zip(b) {
                row.fill(b);
            }
        }
        let w = Operand {
            data: weight,
            rs: r as isize,
            cs: 1,
        };
        let c = Operand {
            data: col,
            rs: p as isize,
            cs: 1,
        };
        gemm([g.c_out, p, r], y_n, bias.is_some(), w, c, !per_sample);
    };
    if per_sample {
        y.par_chunks_mut(g.c_out * p)
            .enumerate()
            .for_each_init(Vec::new, |col, (n, y_n)| sample(n, y_n, col));
    } else {
        let mut col = Vec::new();
        for (n, y_n) in y.chunks_mut(g.c_out * p).enumerate() {
            sample(n, y_n, &mut col);
        }
    }
    y
}

/// Input gradient `[N, C_in, H, W]` from the output gradient `dy [N, C_out, OH, OW]`.
pub fn input_grad(g: &ConvGeometry, weight: &[f32], dy: &[f32]) -> Vec<f32> {
    let (r, p) = (g.rows(), g.pixels());
    assert_eq!(
        dy.len(),
        g.batch * g.c_out * p,
        "conv2d backward: output gradient size"
    );
    assert_eq!(weight.len(), g.c_out * r, "conv2d backward: weight size");
    let plane = g.c_in * g.h * g.w;
    let mut dx = vec![0.0f32; g.batch * plane];
    let per_sample = g.per_sample_tasks();
    let sample = |n: usize, dx_n: &mut [f32], dcol: &mut Vec<f32>| {
        let dy_n = &dy[n * g.c_out * p..][..g.c_out * p];
        // Wᵀ [R, C_out]: element (r, c) at weight[c·R + r].
        let wt = Operand {
            data: weight,
            rs: 1,
            cs: r as isize,
        };
        let d = Operand {
            data: dy_n,
            rs: p as isize,
            cs: 1,
        };
        if g.is_pointwise() {
            gemm([r, p, g.c_out], dx_n, false, wt, d, !per_sample);
        } else {
            dcol.resize(r * p, 0.0);
            gemm([r, p, g.c_out], dcol, false, wt, d, !per_sample);
            g.col2im_add(dcol, dx_n);
        }
    };
    if per_sample {
        dx.par_chunks_mut(plane)
            .enumerate()
            .for_each_init(Vec::new, |dcol, (n, dx_n)| sample(n, dx_n, dcol));
    } else {
        let mut dcol = Vec::new();
        for (n, dx_n) in dx.chunks_mut(plane).enumerate() {
            sample(n, dx_n, &mut dcol);
        }
    }
    dx
}

/// Weight gradient `[C_out, C_in, kh, kw]` and bias gradient `[C_out]` from the input `x` and the
/// output gradient `dy`.
pub fn weight_grad(g: &ConvGeometry, x: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (r, p) = (g.rows(), g.pixels());
    assert_eq!(
        x.len(),
        g.batch * g.c_in * g.h * g.w,
        "conv2d backward: input size"
    );
    assert_eq!(
        dy.len(),
        g.batch * g.c_out * p,
        "conv2d backward: output gradient size"
    );
    let plane = g.c_in * g.h * g.w;
    let per_sample = g.per_sample_tasks();
    // Accumulates samples `range` into one (dW, db) pair.
    let partial = |range: std::ops::Range<usize>| {
        let mut dw = vec![0.0f32; g.c_out * r];
        let mut db = vec![0.0f32; g.c_out];
        let mut col = Vec::new();
        for n in range {
            let x_n = &x[n * plane..][..plane];
            let dy_n = &dy[n * g.c_out * p..][..g.c_out * p];
            let col: &[f32] = if g.is_pointwise() {
                x_n
            } else {
                col.resize(r * p, 0.0);
                g.im2col(x_n, &mut col);
                &col
            };
            let d = Operand {
                data: dy_n,
                rs: p as isize,
                cs: 1,
            };
            // colᵀ [P, R]: element (q, r) at col[r·P + q].
            let ct = Operand {
                data: col,
                rs: 1,
                cs: p as isize,
            };
            gemm([g.c_out, r, p], &mut dw, true, d, ct, !per_sample);
            for (b, row) in db.iter_mut().zip(dy_n.chunks_exact(p)) {
                *b += row.iter().sum::<f32>();
            }
        }
        (dw, db)
    };
    if !per_sample {
        return partial(0..g.batch);
    }
    let tasks = rayon::current_num_threads().min(g.batch);
    let chunk = g.batch.div_ceil(tasks);
    (0..tasks)
        .into_par_iter()
        .map(|t| partial(t * chunk..((t + 1) * chunk).min(g.batch)))
        .reduce_with(|(mut dw, mut db), (dw2, db2)| {
            dw.iter_mut().zip(&dw2).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(&db2).for_each(|(a, b)| *a += b);
            (dw, db)
        })
        .expect("at least one task")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct convolution by the definition, in f64: the reference for all three passes.
    fn reference(g: &ConvGeometry, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f64> {
        let [oh, ow] = g.out;
        let mut y = vec![0.0f64; g.batch * g.c_out * oh * ow];
        for n in 0..g.batch {
            for co in 0..g.c_out {
                for oi in 0..oh {
                    for oj in 0..ow {
                        let mut s = b.map_or(0.0, |b| b[co] as f64);
                        for ci in 0..g.c_in {
                            for ki in 0..g.k[0] {
                                for kj in 0..g.k[1] {
                                    let iy = (oi * g.stride[0] + ki * g.dilation[0]) as isize
                                        - g.pad[0] as isize;
                                    let ix = (oj * g.stride[1] + kj * g.dilation[1]) as isize
                                        - g.pad[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((n * g.c_in + ci) * g.h + iy as usize) * g.w
                                        + ix as usize]
                                        as f64;
                                    let wv =
                                        w[((co * g.c_in + ci) * g.k[0] + ki) * g.k[1] + kj] as f64;
                                    s += xv * wv;
                                }
                            }
                        }
                        y[((n * g.c_out + co) * oh + oi) * ow + oj] = s;
                    }
                }
            }
        }
        y
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn close(a: &[f32], b: &[f64], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: length");
        for (i, (&a, &b)) in a.iter().zip(b).enumerate() {
            assert!(
                (a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{what}[{i}]: {a} vs {b}"
            );
        }
    }

    /// Forward against the definition; each element of the input, weight and bias gradients
    /// against `<dy, ∂y/∂θ_i>`: the definition's response to a one-hot θ (exact: the
    /// convolution is linear in each argument).
    fn check(x_shape: [usize; 4], w_shape: [usize; 4], options: ConvOptions<2>) {
        let g = ConvGeometry::new(x_shape, w_shape, &options).expect("geometry");
        let x = values(x_shape.iter().product(), 1);
        let w = values(w_shape.iter().product(), 2);
        let b = values(g.c_out, 3);
        close(
            &forward(&g, &x, &w, Some(&b)),
            &reference(&g, &x, &w, Some(&b)),
            "forward",
        );
        close(
            &forward(&g, &x, &w, None),
            &reference(&g, &x, &w, None),
            "forward, no bias",
        );
        let dy = values(g.output_shape().iter().product(), 4);
        // dx[i] = Σ dy · ∂y/∂x[i]: the reference convolution of a one-hot input.
        let dx = input_grad(&g, &w, &dy);
        let (dw, db) = weight_grad(&g, &x, &dy);
        let dot = |y: &[f64]| y.iter().zip(&dy).map(|(a, &b)| a * b as f64).sum::<f64>();
        let mut dx_ref = vec![0.0; x.len()];
        for (i, d) in dx_ref.iter_mut().enumerate() {
            let mut e = vec![0.0f32; x.len()];
            e[i] = 1.0;
            *d = dot(&reference(&g, &e, &w, None));
        }
        close(&dx, &dx_ref, "input gradient");
        let mut dw_ref = vec![0.0; w.len()];
        for (i, d) in dw_ref.iter_mut().enumerate() {
            let mut e = vec![0.0f32; w.len()];
            e[i] = 1.0;
            *d = dot(&reference(&g, &x, &e, None));
        }
        close(&dw, &dw_ref, "weight gradient");
        let db_ref: Vec<f64> = (0..g.c_out)
            .map(|co| {
                let mut e = vec![0.0f32; g.c_out];
                e[co] = 1.0;
                let zero = vec![0.0f32; w.len()];
                dot(&reference(&g, &x, &zero, Some(&e)))
            })
            .collect();
        close(&db, &db_ref, "bias gradient");
    }

    #[test]
    fn three_by_three_same_padding_matches_the_definition() {
        check(
            [3, 2, 5, 6],
            [4, 2, 3, 3],
            ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
        );
    }

    #[test]
    fn strided_dilated_and_asymmetric_padding_match_the_definition() {
        check(
            [2, 3, 7, 6],
            [2, 3, 3, 3],
            ConvOptions::new([2, 2], [1, 1], [1, 1], 1),
        );
        check(
            [2, 2, 7, 8],
            [3, 2, 3, 2],
            ConvOptions::new([1, 2], [2, 0], [2, 1], 1),
        );
        check(
            [1, 2, 6, 6],
            [2, 2, 2, 2],
            ConvOptions::new_with_padding([1, 1], [(0, 1), (1, 0)], [1, 1], 1),
        );
    }

    #[test]
    fn pointwise_and_batch_one_match_the_definition() {
        check(
            [3, 4, 4, 5],
            [2, 4, 1, 1],
            ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
        );
        check(
            [1, 3, 5, 5],
            [4, 3, 3, 3],
            ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
        );
    }

    #[test]
    fn grouped_convolutions_are_left_to_burn() {
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 2);
        assert_eq!(
            ConvGeometry::new([1, 4, 5, 5], [4, 2, 3, 3], &options),
            None
        );
    }
}
