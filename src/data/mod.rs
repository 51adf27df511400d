//! Training data: the procedural `shapes` default and batching.

pub mod shapes;

use burn::prelude::*;

/// A batch of `shapes` images (indices `indices` under `seed`): ([B, 3, 32, 32] in [−1, 1],
/// largest-shape class labels [B]). Rendering runs in parallel.
pub fn shapes_batch(seed: u64, indices: &[u64], device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
    use rayon::prelude::*;
    let rendered: Vec<(Vec<f32>, shapes::ShapeLabels)> = indices
        .par_iter()
        .map(|&i| shapes::render(seed, i))
        .collect();
    let b = indices.len();
    let pixels: Vec<f32> = rendered
        .iter()
        .flat_map(|(p, _)| p.iter().copied())
        .collect();
    let labels: Vec<i64> = rendered
        .iter()
        .map(|(_, l)| l.largest_kind as i64)
        .collect();
    (
        Tensor::<1>::from_floats(pixels.as_slice(), device).reshape([
            b,
            3,
            shapes::SIZE,
            shapes::SIZE,
        ]),
        Tensor::<1, Int>::from_ints(labels.as_slice(), device),
    )
}
