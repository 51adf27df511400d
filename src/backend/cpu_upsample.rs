//! Nearest-neighbour 2× upsampling of NCHW planes (diffusers' `Upsample2D` before its conv) and
//! its adjoint, in parallel over planes — instead of flex's serial strided copy of a
//! reshape/expand/reshape chain and, under autodiff, sums over the expanded axes.

use rayon::prelude::*;

/// `x [planes, h, w]` → `[planes, 2h, 2w]`, each value repeated in a 2×2 block.
pub fn forward(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    assert_eq!(x.len(), planes * h * w, "upsample: input size");
    let mut y = vec![0.0f32; planes * 4 * h * w];
    y.par_chunks_mut(4 * h * w)
        .zip(x.par_chunks(h * w))
        .for_each(|(y, x)| {
            for (rows, src) in y.chunks_exact_mut(4 * w).zip(x.chunks_exact(w)) {
                let (top, bottom) = rows.split_at_mut(2 * w);
                for (pair, &v) in top.chunks_exact_mut(2).zip(src) {
                    pair[0] = v;
                    pair[1] = v;
                }
                bottom.copy_from_slice(top);
            }
        });
    y
}

/// The adjoint: `dy [planes, 2h, 2w]` → `dx [planes, h, w]`, each 2×2 block summed.
pub fn backward(dy: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    assert_eq!(
        dy.len(),
        planes * 4 * h * w,
        "upsample backward: gradient size"
    );
    let mut dx = vec![0.0f32; planes * h * w];
    dx.par_chunks_mut(h * w)
        .zip(dy.par_chunks(4 * h * w))
        .for_each(|(dx, dy)| {
            for (dst, rows) in dx.chunks_exact_mut(w).zip(dy.chunks_exact(4 * w)) {
                let (top, bottom) = rows.split_at(2 * w);
                for ((d, t), b) in dst
                    .iter_mut()
                    .zip(top.chunks_exact(2))
                    .zip(bottom.chunks_exact(2))
                {
                    *d = t[0] + t[1] + b[0] + b[1];
                }
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_value_fills_its_block_and_the_adjoint_sums_it() {
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect(); // 2 planes of 2×3
        let y = forward(&x, 2, 2, 3);
        for p in 0..2 {
            for i in 0..4 {
                for j in 0..6 {
                    assert_eq!(y[(p * 4 + i) * 6 + j], x[(p * 2 + i / 2) * 3 + j / 2]);
                }
            }
        }
        // ⟨up(x), dy⟩ = ⟨x, up*(dy)⟩ for any dy.
        let dy: Vec<f32> = (0..48).map(|v| ((v * 7) % 11) as f32 - 5.0).collect();
        let dx = backward(&dy, 2, 2, 3);
        let lhs: f32 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
        let rhs: f32 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
        assert_eq!(lhs, rhs);
    }
}
