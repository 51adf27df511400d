//! `shapes`: the procedural default dataset, made in Rust so fewstep needs no download.
//!
//! Generative rules (image `i` under seed `s` is a pure function of `(s, i)`):
//! - 32×32 RGB. A per-image RNG (SplitMix64 of `s` and `i`) draws everything below, in order.
//! - Background: a grey tone `g ~ U[0.2, 0.8]` with a small tint `U[−0.06, 0.06]` per channel.
//! - 1–3 shapes (uniform count), drawn in order, each:
//!   - kind: circle, square or triangle (uniform);
//!   - colour: one of the 8 [`PALETTE`] entries (uniform);
//!   - size `d ~ U[6, 14]` px (circle diameter; square side; equilateral triangle side × 1.1);
//!   - centre uniform in `[d/2, 32 − d/2]²`;
//!   - rotation `θ ~ U[0, 2π)` for squares and triangles (circles are rotation-invariant).
//! - Anti-aliasing: each pixel's coverage is the fraction of 4×4 sub-pixel samples inside the
//!   shape; the colour is blended over what is already drawn with that coverage.
//! - Labels ([`ShapeLabels`]): the kind of the largest shape (class label for class-conditional
//!   models), counts per kind and per colour (targets of the evaluation feature network).
//! - Pixels are returned in [−1, 1], CHW order.
//!
//! Indices `0 .. EVAL_START` are the training range; indices from [`EVAL_START`] on are held out
//! for evaluation.

/// First index of the held-out evaluation range.
pub const EVAL_START: u64 = 1 << 40;
pub const SIZE: usize = 32;
pub const KINDS: [&str; 3] = ["circle", "square", "triangle"];
/// The fixed colour palette (RGB in [0, 1]).
pub const PALETTE: [[f32; 3]; 8] = [
    [0.90, 0.12, 0.12], // red
    [0.12, 0.75, 0.22], // green
    [0.15, 0.30, 0.95], // blue
    [0.97, 0.85, 0.10], // yellow
    [0.85, 0.20, 0.85], // magenta
    [0.10, 0.85, 0.90], // cyan
    [0.97, 0.55, 0.10], // orange
    [0.05, 0.05, 0.05], // black
];

/// What an image holds.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeLabels {
    /// Kind of the largest shape: 0 circle, 1 square, 2 triangle.
    pub largest_kind: usize,
    pub kind_counts: [u8; 3],
    pub colour_counts: [u8; 8],
}

/// SplitMix64: a tiny, well-mixed, seedable generator (Steele et al. 2014).
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub(crate) fn new(seed: u64, index: u64) -> Self {
        let mut s = SplitMix(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        s.next();
        s
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    pub(crate) fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One drawn shape (pixel coordinates, y down).
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// Index into [`KINDS`].
    pub kind: usize,
    /// Index into [`PALETTE`].
    pub colour: usize,
    pub size: f32,
    pub cx: f32,
    pub cy: f32,
    pub theta: f32,
}

/// Everything drawn in one image: the background's grey tone and the shapes in drawing order.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub background: f32,
    pub shapes: Vec<Shape>,
}

impl Scene {
    /// The labels of the feature network.
    pub fn labels(&self) -> ShapeLabels {
        let largest = self
            .shapes
            .iter()
            .max_by(|a, b| a.size.total_cmp(&b.size))
            .expect("at least one shape");
        let mut labels = ShapeLabels {
            largest_kind: largest.kind,
            kind_counts: [0; 3],
            colour_counts: [0; 8],
        };
        for s in &self.shapes {
            labels.kind_counts[s.kind] += 1;
            labels.colour_counts[s.colour] += 1;
        }
        labels
    }
}

impl Shape {
    /// Whether point (x, y) lies inside.
    fn contains(&self, x: f32, y: f32) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        // Rotate the point into the shape's frame.
        let (s, c) = self.theta.sin_cos();
        let (u, v) = (c * dx + s * dy, -s * dx + c * dy);
        match self.kind {
            0 => dx * dx + dy * dy <= (self.size / 2.0).powi(2),
            1 => u.abs() <= self.size / 2.0 && v.abs() <= self.size / 2.0,
            _ => {
                // Equilateral triangle with side a, centroid at the origin, apex up (−v).
                let a = self.size * 1.1;
                let h = a * 3f32.sqrt() / 2.0;
                let (top, bottom) = (-2.0 * h / 3.0, h / 3.0);
                if v < top || v > bottom {
                    return false;
                }
                let half_width = (v - top) / h * a / 2.0;
                u.abs() <= half_width
            }
        }
    }
}

/// Renders image `index` under `seed`: ([3·32·32] pixels in [−1, 1], CHW; labels).
pub fn render(seed: u64, index: u64) -> (Vec<f32>, ShapeLabels) {
    let (img, scene) = render_scene(seed, index);
    (img, scene.labels())
}

/// Renders image `index` under `seed`: ([3·32·32] pixels in [−1, 1], CHW; what was drawn).
pub fn render_scene(seed: u64, index: u64) -> (Vec<f32>, Scene) {
    let mut rng = SplitMix::new(seed, index);
    let g = rng.uniform(0.2, 0.8);
    let bg: [f32; 3] = std::array::from_fn(|_| (g + rng.uniform(-0.06, 0.06)).clamp(0.0, 1.0));
    let n = 1 + rng.below(3);
    let shapes: Vec<Shape> = (0..n)
        .map(|_| {
            let kind = rng.below(3);
            let colour = rng.below(PALETTE.len());
            let size = rng.uniform(6.0, 14.0);
            let r = size / 2.0;
            let cx = rng.uniform(r, SIZE as f32 - r);
            let cy = rng.uniform(r, SIZE as f32 - r);
            let theta = if kind == 0 {
                0.0
            } else {
                rng.uniform(0.0, std::f32::consts::TAU)
            };
            Shape {
                kind,
                colour,
                size,
                cx,
                cy,
                theta,
            }
        })
        .collect();
    let mut img = vec![0f32; 3 * SIZE * SIZE];
    for y in 0..SIZE {
        for x in 0..SIZE {
            let mut px = bg;
            for shape in &shapes {
                let mut inside = 0;
                for sy in 0..4 {
                    for sx in 0..4 {
                        let (fx, fy) = (
                            x as f32 + (sx as f32 + 0.5) / 4.0,
                            y as f32 + (sy as f32 + 0.5) / 4.0,
                        );
                        inside += shape.contains(fx, fy) as u32;
                    }
                }
                let alpha = inside as f32 / 16.0;
                for (c, p) in px.iter_mut().enumerate() {
                    *p = *p * (1.0 - alpha) + PALETTE[shape.colour][c] * alpha;
                }
            }
            for c in 0..3 {
                img[c * SIZE * SIZE + y * SIZE + x] = px[c] * 2.0 - 1.0;
            }
        }
    }
    (
        img,
        Scene {
            background: g,
            shapes,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_pure_functions_of_seed_and_index() {
        assert_eq!(render(3, 17), render(3, 17));
        assert_ne!(render(3, 17).0, render(3, 18).0);
        assert_ne!(render(3, 17).0, render(4, 17).0);
    }

    #[test]
    fn pixels_in_range_and_labels_consistent() {
        for i in 0..200 {
            let (img, l) = render(0, i);
            assert_eq!(img.len(), 3 * 32 * 32);
            assert!(img.iter().all(|v| (-1.0..=1.0).contains(v)));
            let n: u8 = l.kind_counts.iter().sum();
            assert!((1..=3).contains(&n));
            assert_eq!(n, l.colour_counts.iter().sum::<u8>());
            assert!(l.kind_counts[l.largest_kind] >= 1);
        }
    }

    #[test]
    fn every_kind_and_colour_occurs() {
        let mut kinds = [0; 3];
        let mut colours = [0; 8];
        for i in 0..500 {
            let (_, l) = render(1, i);
            kinds[l.largest_kind] += 1;
            for (total, &n) in colours.iter_mut().zip(&l.colour_counts) {
                *total += n as usize;
            }
        }
        assert!(kinds.iter().all(|&k| k > 100), "{kinds:?}");
        assert!(colours.iter().all(|&c| c > 40), "{colours:?}");
    }
}
