//! Progressive distillation through the library, in one page: load the shipped teacher, run two
//! halving rounds (16 → 8 → 4 steps) on the `shapes` data, and sample the 4-step student.
//!
//! `cargo run --release --example progressive -- [OUT_DIR]` (a short budget: 30 iterations per
//! round; the CLI's `fewstep distill progressive` is the full job). OUT_DIR must be absent or empty.

use std::path::PathBuf;

use fewstep::data::DataSource;
use fewstep::distill::progressive::Distance;
use fewstep::io;
use fewstep::pipeline::Pipeline;
use fewstep::sample::{Generation, write_sample_grid};
use fewstep::train::progressive::{
    PROGRESSIVE_RUN, ProgressiveConfig, ProgressiveRun, distill_progressive, round_dir,
};
use fewstep_schedulers::Algorithm;

fn main() -> fewstep::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "runs/example-progressive".into()),
    );
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");

    let run = ProgressiveRun {
        kind: PROGRESSIVE_RUN.into(),
        teacher: io::shipped("shapes32")
            .canonicalize()
            .expect("weights/shapes32"),
        init: None, // Some(dir): the first round's student starts from that folder's UNet
        config: ProgressiveConfig {
            from_steps: 16,
            to_steps: 4,
            round_factor: 2, // teacher steps per student step: 16 -> 8 -> 4
            iters_per_round: 30,
            batch: 8,
            lr: 1e-4,
            optimizer: fewstep::train::optim::OptimizerConfig::distillation(),
            ema_decay: None,
            seed: 0,
            checkpoint_every: 10,
            // A class-conditional or text-to-image teacher can be distilled with its guidance
            // (Meng et al.): a w range here adds the guided stage one.
            guidance: None,
            guided_iters: None,
            guided_halving: false,
            rollout_fraction: None,
            snr_weight_cap: None,
            // Distance::TeacherFeatures: a perceptual distance on the teacher's encoder.
            distance: Distance::L2,
            // Some(QuantizeSpec { .. }): quantization-aware rounds, students written int8/int4.
            quantize: None,
        },
        data: DataSource::Shapes { seed: 0 },
    };
    let outcome =
        distill_progressive(&out, Some(run), false, std::slice::from_ref(&device), false)?;
    for r in &outcome.rounds {
        println!(
            "{} steps: final loss {:.5} in {:.0} s",
            r.steps, r.final_loss, r.seconds
        );
    }

    // The last student is an ordinary diffusers folder: load it and sample at its step count.
    let student = Pipeline::load(&round_dir(&out, 4), &device)?;
    let steps = student
        .scheduler
        .distilled_steps
        .expect("a distilled student");
    let request = Generation::new(16, 16, 0);
    let grid = out.join("student-4steps.png");
    write_sample_grid(&student, Algorithm::Ddim, steps, &request, &device, &grid)?;
    println!("wrote {}", grid.display());
    Ok(())
}
