//! Seeded Gaussian noise made on the host, so a seed means the same noise on every backend
//! (burn's own random tensors differ across backends).

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// A reproducible stream of N(0, 1) samples.
pub struct NoiseStream {
    rng: StdRng,
}

impl NoiseStream {
    pub fn new(seed: u64) -> Self {
        NoiseStream {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The stream of training step `step` of a run seeded `seed`: every step draws from its own
    /// stream, so a resumed run draws exactly what an uninterrupted one would.
    pub fn for_step(seed: u64, step: u64) -> Self {
        Self::new(seed ^ step.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// Uniform integer in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.rng.random_range(0..n)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// `n` standard normal samples (Box–Muller on f64 uniforms).
    pub fn gaussian(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1: f64 = 1.0 - self.rng.random::<f64>(); // (0, 1]
            let u2: f64 = self.rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let theta = std::f64::consts::TAU * u2;
            out.push((r * theta.cos()) as f32);
            out.push((r * theta.sin()) as f32);
        }
        out.truncate(n);
        out
    }
}
