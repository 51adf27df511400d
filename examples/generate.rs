//! Few-step latent generation: the shipped latent consistency student
//! (`weights/shapes-latent-lcm`, a diffusers pipeline folder with `unet/`, `vae/` and an
//! `LCMScheduler` config) samples a grid in 1, 2 and 4 steps — on wgpu when this build has the
//! `wgpu` feature and an adapter exists, else on the CPU, saying which.
//!
//! `cargo run --release --example generate -- [OUT_DIR]` (CPU), or
//! `cargo run --release --features wgpu --example generate` (GPU when one is found).

use std::path::PathBuf;
use std::time::Instant;

use fewstep::backend::wgpu_or_cpu;
use fewstep::io;
use fewstep::pipeline::Pipeline;
use fewstep::sample::{Generation, write_sample_grid};
use fewstep_schedulers::Algorithm;

fn main() -> fewstep::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "runs/example-generate".into()),
    );
    std::fs::create_dir_all(&out)
        .map_err(|e| fewstep::Error::file(&out, format!("cannot create: {e}")))?;
    let (_, device) = wgpu_or_cpu()?;
    // Weights are uploaded once; every step and the VAE decode run on `device`.
    let student = Pipeline::load(&io::shipped("shapes-latent-lcm"), &device)?;
    let request = Generation::new(16, 16, 0);
    for steps in [1, 2, 4] {
        let grid = out.join(format!("latent-lcm-{steps}step.png"));
        let started = Instant::now();
        write_sample_grid(&student, Algorithm::Lcm, steps, &request, &device, &grid)?;
        println!(
            "{steps} step(s): 16 images in {:.3} s -> {}",
            started.elapsed().as_secs_f64(),
            grid.display()
        );
    }
    Ok(())
}
