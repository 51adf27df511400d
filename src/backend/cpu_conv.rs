//! 2-D convolution on the CPU as im2col GEMMs in NCHW, with the three passes training needs:
//!
//! - forward, per sample: `y_n [C_out, P] = W [C_out, R] · col_n [R, P]`, written straight into
//!   the NCHW output (which *is* `[C_out, P]` per sample) with the bias pre-filled;
//! - input gradient: `dcol_n [R, P] = Wᵀ · dY_n`, scattered back by col2im;
//! - weight gradient, the one burn's generic rule computes as a convolution with dY as the
//!   kernel (a skinny GEMM over ~9× duplicated data): `dW [C_out, R] = Σ_n dY_n · col_nᵀ`, one
//!   well-shaped GEMM per sample accumulated per thread, and the bias gradient in the same pass;
//!   its columns are built transposed from a channels-last copy of the sample (`colᵀ [P, R]`,
//!   taps ordered (k_i, k_j, c_in)), so that the GEMM reads both operands along their rows
//!   instead of gathering `col_n` column by column while packing it.
//!
//! `R = C_in·k_h·k_w` rows of `col_n`, one per kernel tap, each the input plane shifted by that
//! tap (zeros outside); `P = H_out·W_out` output pixels. A 1×1 convolution with unit stride and no
//! padding has `col_n = x_n` and skips the copy. Threads: one sample per task when the batch can
//! feed every thread, else the GEMM itself is parallel (batch-1 inference).

use burn::tensor::ops::ConvOptions;
use std::ops::Range;

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
    /// Floats of im2col columns per tile ([`COL_BUDGET`]).
    pub col_budget: usize,
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
            col_budget: COL_BUDGET,
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

    /// Output rows per tile: whole rows, at most `col_budget` floats of columns, and at least
    /// one tile per thread when the batch is smaller than the thread pool (batch-1 inference
    /// splits each image into row bands rather than leaving threads idle).
    fn tile_rows(&self) -> usize {
        let budget = (self.col_budget / (self.rows() * self.out[1])).max(1);
        let per_sample = rayon::current_num_threads().div_ceil(self.batch.max(1));
        budget
            .min(self.out[0].div_ceil(per_sample))
            .clamp(1, self.out[0])
    }

    /// The output-row ranges of one sample's tiles.
    fn tiles(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let rows = self.tile_rows();
        (0..self.out[0])
            .step_by(rows)
            .map(move |r| r..(r + rows).min(self.out[0]))
    }

    /// `col [R, T]` of the output rows `rows` (T = their pixels) of one sample `x [C_in, H, W]`.
    fn im2col(&self, x: &[f32], rows: &Range<usize>, col: &mut [f32]) {
        let ([kh, kw], ow) = (self.k, self.out[1]);
        let t = rows.len() * ow;
        if self.stride == [1, 1] && ow == self.w {
            return self.im2col_same_width(x, rows, col);
        }
        for ci in 0..self.c_in {
            let plane = &x[ci * self.h * self.w..][..self.h * self.w];
            for ki in 0..kh {
                for kj in 0..kw {
                    let row = &mut col[((ci * kh + ki) * kw + kj) * t..][..t];
                    let off = (kj * self.dilation[1]) as isize - self.pad[1] as isize;
                    for (dst, oi) in row.chunks_exact_mut(ow).zip(rows.clone()) {
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

    /// [`Self::im2col`] for unit stride with output rows as wide as the input's (a "same"
    /// convolution): one output row further is one input row further, so each tap's column row
    /// is one contiguous copy of the shifted plane, then the columns that wrapped around a row
    /// edge and the rows outside the image are zeroed — a few calls per tap instead of three
    /// per tap and output row.
    fn im2col_same_width(&self, x: &[f32], rows: &Range<usize>, col: &mut [f32]) {
        let ([kh, kw], ow, (h, w)) = (self.k, self.out[1], (self.h, self.w));
        let t = rows.len() * ow;
        for ci in 0..self.c_in {
            let plane = &x[ci * h * w..][..h * w];
            for ki in 0..kh {
                // Output rows whose input row is inside: [a, b).
                let dy = (ki * self.dilation[0]) as isize - self.pad[0] as isize;
                let a = (-dy).clamp(rows.start as isize, rows.end as isize) as usize;
                let b = (h as isize - dy).clamp(a as isize, rows.end as isize) as usize;
                for kj in 0..kw {
                    let dst = &mut col[((ci * kh + ki) * kw + kj) * t..][..t];
                    let off = (kj * self.dilation[1]) as isize - self.pad[1] as isize;
                    let (d0, d1) = ((a - rows.start) * ow, (b - rows.start) * ow);
                    dst[..d0].fill(0.0);
                    dst[d1..].fill(0.0);
                    if d0 == d1 {
                        continue;
                    }
                    // dst[d] = plane[d + base] inside [d0, d1), clipped to the plane.
                    let base = (rows.start as isize + dy) * w as isize + off;
                    let c0 = (d0 as isize).max(-base) as usize;
                    let c1 = (d1 as isize).min((h * w) as isize - base).max(c0 as isize) as usize;
                    let s0 = (c0 as isize + base) as usize;
                    dst[c0..c1].copy_from_slice(&plane[s0..s0 + (c1 - c0)]);
                    // The clipped ends and the wrapped columns of each row: zeros.
                    let (lo, hi) = self.valid_columns(off);
                    for row in dst[d0..d1].chunks_exact_mut(ow) {
                        for v in &mut row[..lo] {
                            *v = 0.0;
                        }
                        for v in &mut row[hi..] {
                            *v = 0.0;
                        }
                    }
                }
            }
        }
    }

    /// One sample `x [C_in, H, W]` in channels-last order `[H, W, C_in]`, so that one tap's
    /// values for one pixel are contiguous. Channels in blocks of 16: each pixel's block is one
    /// contiguous write gathered from 16 sequential read streams (a pixel-major order would read
    /// from all `C_in` planes at once, more streams than the prefetcher follows).
    fn copy_channels_last(&self, x: &[f32], out: &mut Vec<f32>) {
        const BLOCK: usize = 16;
        let (c, hw) = (self.c_in, self.h * self.w);
        out.resize(c * hw, 0.0);
        for c0 in (0..c).step_by(BLOCK) {
            let block = c0..(c0 + BLOCK).min(c);
            let planes = &x[c0 * hw..block.end * hw];
            for (p, dst) in out.chunks_exact_mut(c).enumerate() {
                for (i, d) in dst[block.clone()].iter_mut().enumerate() {
                    *d = planes[i * hw + p];
                }
            }
        }
    }

    /// `colᵀ [T, R]` of the output rows `rows` from one channels-last sample `x [H, W, C_in]`,
    /// each pixel's row ordered (k_i, k_j, c_in) — the weight's taps permuted, which
    /// [`Self::taps_to_weight_order`] undoes. Contiguous copies of `C_in` values, so that the
    /// weight gradient's GEMM reads both operands along their rows.
    fn im2col_channels_last(&self, x: &[f32], rows: &Range<usize>, col: &mut [f32]) {
        let ([kh, kw], ow, c, r) = (self.k, self.out[1], self.c_in, self.rows());
        for (q, (oi, oj)) in rows
            .clone()
            .flat_map(|oi| (0..ow).map(move |oj| (oi, oj)))
            .enumerate()
        {
            let dst = &mut col[q * r..][..r];
            for ki in 0..kh {
                let iy = self.input_row(oi, ki);
                for kj in 0..kw {
                    let d = &mut dst[(ki * kw + kj) * c..][..c];
                    let ix = (oj * self.stride[1] + kj * self.dilation[1]) as isize
                        - self.pad[1] as isize;
                    match iy {
                        Some(iy) if (0..self.w as isize).contains(&ix) => {
                            d.copy_from_slice(&x[(iy * self.w + ix as usize) * c..][..c])
                        }
                        _ => d.fill(0.0),
                    }
                }
            }
        }
    }

    /// `[C_out, (k_i, k_j, c_in)]` → the weight's `[C_out, (c_in, k_i, k_j)]`.
    fn taps_to_weight_order(&self, taps: &[f32]) -> Vec<f32> {
        let ([kh, kw], c) = (self.k, self.c_in);
        let mut w = vec![0.0f32; taps.len()];
        for (w, taps) in w
            .chunks_exact_mut(self.rows())
            .zip(taps.chunks_exact(self.rows()))
        {
            for (tap, values) in taps.chunks_exact(c).enumerate() {
                for (ci, &v) in values.iter().enumerate() {
                    w[ci * kh * kw + tap] = v;
                }
            }
        }
        w
    }

    /// Adds `col [R, T]` of the output rows `rows` back into one sample's input gradient
    /// `dx [C_in, H, W]` (the adjoint of [`Self::im2col`]).
    fn col2im_add(&self, col: &[f32], rows: &Range<usize>, dx: &mut [f32]) {
        let ([kh, kw], ow) = (self.k, self.out[1]);
        let t = rows.len() * ow;
        for ci in 0..self.c_in {
            let plane = &mut dx[ci * self.h * self.w..][..self.h * self.w];
            for ki in 0..kh {
                for kj in 0..kw {
                    let row = &col[((ci * kh + ki) * kw + kj) * t..][..t];
                    let off = (kj * self.dilation[1]) as isize - self.pad[1] as isize;
                    for (src, oi) in row.chunks_exact(ow).zip(rows.clone()) {
                        let Some(iy) = self.input_row(oi, ki) else {
                            continue;
                        };
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

/// Floats of one im2col tile (2 MiB): a 32×32 sample of the shapes UNets is one tile, a 64×64 or
/// 128×128 one is cut into row bands whose columns stay in the core's cache (a whole 128×128
/// sample's would be 19 MB at 32 channels).
const COL_BUDGET: usize = 1 << 19;

/// A strided f32 matrix operand for [`gemm`]: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(super) struct Operand<'a> {
    pub data: &'a [f32],
    pub rs: isize,
    pub cs: isize,
}

/// A row-major destination `[m, n]` with row stride `rs` (a column block of a wider matrix).
struct Destination {
    ptr: *mut f32,
    rs: isize,
}

/// `dst [m, n] = (accumulate ? dst : 0) + lhs [m, k] · rhs [k, n]`.
///
/// # Safety
/// `dst.ptr` must be valid for writes at `i·rs + j` for every `i < m`, `j < n`, and no other
/// thread may touch those elements during the call.
unsafe fn gemm(
    [m, n, k]: [usize; 3],
    dst: Destination,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    parallel: bool,
) {
    let reach = |o: &Operand, rows: usize, cols: usize| {
        (rows.max(1) - 1) as isize * o.rs + (cols.max(1) - 1) as isize * o.cs
    };
    assert!(
        reach(&lhs, m, k) < lhs.data.len() as isize,
        "gemm: lhs too small"
    );
    assert!(
        reach(&rhs, k, n) < rhs.data.len() as isize,
        "gemm: rhs too small"
    );
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the operands' reach is checked above; the destination's is the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            1,
            dst.rs,
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

/// `dst [m, n] = (accumulate ? dst : 0) + lhs [m, k] · rhs [k, n]` into a contiguous row-major
/// `dst`, on the calling thread.
pub(super) fn matmul(
    dst: &mut [f32],
    [m, n, k]: [usize; 3],
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
) {
    assert!(dst.len() >= m * n, "matmul: destination too small");
    let dst = Destination {
        ptr: dst.as_mut_ptr(),
        rs: n as isize,
    };
    // SAFETY: `dst` is an exclusive borrow of at least m·n elements, row stride n.
    unsafe { gemm([m, n, k], dst, accumulate, lhs, rhs, false) }
}

/// A pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct SharedOutput(*mut f32);
// SAFETY: the tasks given one write disjoint (sample, tile) blocks.
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    /// The pointer (a method, so that closures capture the `Send` wrapper, not its field).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Every (sample, output-row tile) of a batch, the unit of parallel work.
fn tasks(g: &ConvGeometry) -> Vec<(usize, Range<usize>)> {
    (0..g.batch)
        .flat_map(|n| g.tiles().map(move |rows| (n, rows)))
        .collect()
}

/// Forward: `x [N, C_in, H, W]`, `weight [C_out, C_in, kh, kw]`, `bias [C_out]` → `[N, C_out, OH, OW]`.
/// Tasks are (sample, tile) pairs, each writing its own column block of `y_n [C_out, P]`.
pub fn forward(g: &ConvGeometry, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (r, p, ow) = (g.rows(), g.pixels(), g.out[1]);
    let plane = g.c_in * g.h * g.w;
    assert_eq!(x.len(), g.batch * plane, "conv2d: input size");
    assert_eq!(weight.len(), g.c_out * r, "conv2d: weight size");
    // Not zeroed: every element is written once below, by the task of its (sample, tile) — the
    // bias pre-fill then an accumulating GEMM, or a GEMM that does not read its destination.
    // (A zeroed `vec!` of a size the allocator recycles is a serial memset of the whole output.)
    let len = g.batch * g.c_out * p;
    let mut y = Vec::<f32>::with_capacity(len);
    let out = SharedOutput(y.as_mut_ptr());
    let w = Operand {
        data: weight,
        rs: r as isize,
        cs: 1,
    };
    tasks(g)
        .into_par_iter()
        .for_each_init(Vec::new, |col, (n, rows)| {
            let x_n = &x[n * plane..][..plane];
            let t = rows.len() * ow;
            let c = if g.is_pointwise() {
                // col_n is x_n: the tile is a column block of it.
                Operand {
                    data: &x_n[rows.start * ow..],
                    rs: p as isize,
                    cs: 1,
                }
            } else {
                col.resize(r * t, 0.0);
                g.im2col(x_n, &rows, col);
                Operand {
                    data: col,
                    rs: t as isize,
                    cs: 1,
                }
            };
            // SAFETY: the block rows × columns [start·ow, start·ow + t) of sample n is this
            // task's alone, inside y.
            let block = unsafe { out.ptr().add(n * g.c_out * p + rows.start * ow) };
            if let Some(b) = bias {
                for (co, &b) in b.iter().enumerate() {
                    // SAFETY: row co of the block, as above; written through the raw pointer,
                    // never read before.
                    for j in 0..t {
                        unsafe { block.add(co * p + j).write(b) };
                    }
                }
            }
            let dst = Destination {
                ptr: block,
                rs: p as isize,
            };
            // SAFETY: as above; without a bias the GEMM only writes its destination.
            unsafe { gemm([g.c_out, t, r], dst, bias.is_some(), w, c, false) };
        });
    // SAFETY: the tasks cover every (sample, channel, pixel) of the output and wrote each.
    unsafe { y.set_len(len) };
    y
}

/// Input gradient `[N, C_in, H, W]` from the output gradient `dy [N, C_out, OH, OW]`: one
/// sample per task (tiles of a sample overlap in the input), the GEMM parallel for batch 1.
pub fn input_grad(g: &ConvGeometry, weight: &[f32], dy: &[f32]) -> Vec<f32> {
    let (r, p, ow) = (g.rows(), g.pixels(), g.out[1]);
    assert_eq!(
        dy.len(),
        g.batch * g.c_out * p,
        "conv2d backward: output gradient size"
    );
    assert_eq!(weight.len(), g.c_out * r, "conv2d backward: weight size");
    let plane = g.c_in * g.h * g.w;
    let mut dx = vec![0.0f32; g.batch * plane];
    let per_sample = g.per_sample_tasks();
    // Wᵀ [R, C_out]: element (r, c) at weight[c·R + r].
    let wt = Operand {
        data: weight,
        rs: 1,
        cs: r as isize,
    };
    let sample = |n: usize, dx_n: &mut [f32], dcol: &mut Vec<f32>| {
        let dy_n = &dy[n * g.c_out * p..][..g.c_out * p];
        if g.is_pointwise() {
            let d = Operand {
                data: dy_n,
                rs: p as isize,
                cs: 1,
            };
            let dst = Destination {
                ptr: dx_n.as_mut_ptr(),
                rs: p as isize,
            };
            // SAFETY: dx_n is [R, P] = [C_in, H·W], this sample's alone.
            unsafe { gemm([r, p, g.c_out], dst, false, wt, d, !per_sample) };
            return;
        }
        for rows in g.tiles() {
            let t = rows.len() * ow;
            dcol.resize(r * t, 0.0);
            let d = Operand {
                data: &dy_n[rows.start * ow..],
                rs: p as isize,
                cs: 1,
            };
            let dst = Destination {
                ptr: dcol.as_mut_ptr(),
                rs: t as isize,
            };
            // SAFETY: dcol holds R × t.
            unsafe { gemm([r, t, g.c_out], dst, false, wt, d, !per_sample) };
            g.col2im_add(dcol, &rows, dx_n);
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
/// output gradient `dy`: the (sample, tile) tasks split into one contiguous run per thread, each
/// accumulating its own (dW, db), summed at the end.
pub fn weight_grad(g: &ConvGeometry, x: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (r, p, ow) = (g.rows(), g.pixels(), g.out[1]);
    let plane = g.c_in * g.h * g.w;
    assert_eq!(x.len(), g.batch * plane, "conv2d backward: input size");
    assert_eq!(
        dy.len(),
        g.batch * g.c_out * p,
        "conv2d backward: output gradient size"
    );
    let tasks = tasks(g);
    let runs = rayon::current_num_threads().min(tasks.len()).max(1);
    // With fewer tasks than threads the GEMM itself goes parallel.
    let parallel_gemm = tasks.len() < rayon::current_num_threads();
    let run = |run: &[(usize, Range<usize>)]| {
        let (mut dw, mut db) = (vec![0.0f32; g.c_out * r], vec![0.0f32; g.c_out]);
        let (mut x_cl, mut col, mut last) = (Vec::new(), Vec::new(), None);
        for (n, rows) in run {
            if last != Some(*n) {
                g.copy_channels_last(&x[n * plane..][..plane], &mut x_cl);
                last = Some(*n);
            }
            let dy_n = &dy[n * g.c_out * p..][..g.c_out * p];
            let t = rows.len() * ow;
            let d = Operand {
                data: &dy_n[rows.start * ow..],
                rs: p as isize,
                cs: 1,
            };
            // colᵀ [T, R], taps ordered (k_i, k_j, c_in).
            let ct = if g.is_pointwise() {
                Operand {
                    data: &x_cl[rows.start * ow * r..],
                    rs: r as isize,
                    cs: 1,
                }
            } else {
                col.resize(r * t, 0.0);
                g.im2col_channels_last(&x_cl, rows, &mut col);
                Operand {
                    data: &col,
                    rs: r as isize,
                    cs: 1,
                }
            };
            let dst = Destination {
                ptr: dw.as_mut_ptr(),
                rs: r as isize,
            };
            // SAFETY: dw is this run's own [C_out, R].
            unsafe { gemm([g.c_out, r, t], dst, true, d, ct, parallel_gemm) };
            for (b, row) in db.iter_mut().zip(dy_n.chunks_exact(p)) {
                *b += row[rows.start * ow..][..t].iter().sum::<f32>();
            }
        }
        (dw, db)
    };
    tasks
        .par_chunks(tasks.len().div_ceil(runs))
        .map(run)
        .reduce_with(|(mut dw, mut db), (dw2, db2)| {
            dw.iter_mut().zip(&dw2).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(&db2).for_each(|(a, b)| *a += b);
            (dw, db)
        })
        .map(|(dw, db)| (g.taps_to_weight_order(&dw), db))
        .expect("a convolution has at least one task")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_values as values;

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
        check_tiled(x_shape, w_shape, options, COL_BUDGET);
    }

    fn check_tiled(
        x_shape: [usize; 4],
        w_shape: [usize; 4],
        options: ConvOptions<2>,
        col_budget: usize,
    ) {
        let g = ConvGeometry {
            col_budget,
            ..ConvGeometry::new(x_shape, w_shape, &options).expect("geometry")
        };
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
    fn images_of_several_tiles_match_the_definition() {
        // 7 output rows of 6 columns, R = 18: 2 rows per tile at a budget of 216 floats (tiles
        // of 2, 2, 2 and 1 rows), 1 row at 100 floats.
        for budget in [216, 100] {
            let same = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
            check_tiled([2, 2, 7, 6], [3, 2, 3, 3], same, budget);
            let strided = ConvOptions::new([2, 1], [1, 0], [1, 2], 1);
            check_tiled([1, 2, 14, 10], [2, 2, 3, 3], strided, budget);
            // Same-width convolutions with dilation and with asymmetric padding (the contiguous
            // copy of `im2col_same_width`, clipped at the plane's ends).
            let dilated = ConvOptions::new([1, 1], [2, 2], [2, 2], 1);
            check_tiled([1, 2, 7, 6], [2, 2, 3, 3], dilated, budget);
            let asymmetric = ConvOptions::new_with_padding([1, 1], [(0, 2), (2, 0)], [1, 1], 1);
            check_tiled([2, 2, 7, 6], [3, 2, 3, 3], asymmetric, budget);
            let pointwise = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
            check_tiled([2, 18, 7, 6], [2, 18, 1, 1], pointwise, budget);
        }
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
