//! Consistency distillation through the library, in one page: load the shipped teacher, distill
//! a consistency (LCM) student on the `shapes` data, and sample it in 1, 2 and 4 steps.
//!
//! `cargo run --release --example consistency -- [OUT_DIR]` (a short budget: 60 iterations; the
//! CLI's `fewstep distill consistency` is the full job). OUT_DIR must be absent or empty.

use std::path::PathBuf;

use fewstep::data::DataSource;
use fewstep::distill::consistency::{Distance, Solver};
use fewstep::io;
use fewstep::pipeline::Pipeline;
use fewstep::sample::{Generation, write_sample_grid};
use fewstep::train::consistency::{
    CONSISTENCY_RUN, ConsistencyConfig, ConsistencyRun, LrDecay, distill_consistency,
};
use fewstep_schedulers::Algorithm;

fn main() -> fewstep::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "runs/example-consistency".into()),
    );
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");

    let run = ConsistencyRun {
        kind: CONSISTENCY_RUN.into(),
        teacher: io::shipped("shapes32")
            .canonicalize()
            .expect("weights/shapes32"),
        init: None, // Some(dir): the student starts from that folder's UNet
        config: ConsistencyConfig {
            scales: 50,             // LCM's skipping grid: 1000/50 timesteps per teacher step
            scales_start: None,     // N fixed (Some(n): doubling curriculum)
            target_ema: 0.95,       // the target network's EMA rate
            timestep_scaling: 10.0, // LCM's boundary scalings
            distance: Distance::PseudoHuber { c: 0.001 }, // LCM's loss
            solver: Solver::Ddim,   // the teacher's step (Solver::Heun: 2nd order)
            guidance: None,         // unconditional teacher
            iters: 60,
            batch: 8,
            lr: 1e-4,
            warmup: 10,
            lr_decay: LrDecay::Constant, // LrDecay::Cosine: to 0 at the last iteration
            timestep_sampling: Default::default(), // TimestepSampling::ICT: iCT's log-normal
            optimizer: fewstep::train::optim::OptimizerConfig::distillation(),
            ema_decay: None,
            seed: 0,
            checkpoint_every: 20,
            lora: None, // Some(LoraSpec { .. }): adapters instead of a full student (examples/lcm_lora.rs)
            lora_format: Default::default(),
            quantize: None, // Some(QuantizeSpec { .. }): quantization-aware (weights int8/int4)
            adversarial: None, // Some(AdversarialSpec { .. }): a one-step GAN term (LADD heads)
        },
        data: DataSource::Shapes { seed: 0 },
    };
    let outcome =
        distill_consistency(&out, Some(run), false, std::slice::from_ref(&device), false)?;
    let dir = outcome.student.expect("not interrupted");
    println!(
        "{}: final loss {:.5} in {:.0} s",
        dir.display(),
        outcome.final_loss,
        outcome.seconds
    );

    // The student is a diffusers folder with an LCMScheduler config: sample it in 1, 2, 4 steps.
    let student = Pipeline::load(&dir, &device)?;
    let request = Generation::new(16, 16, 0);
    for steps in [1, 2, 4] {
        let grid = out.join(format!("student-{steps}step.png"));
        write_sample_grid(&student, Algorithm::Lcm, steps, &request, &device, &grid)?;
        println!("wrote {}", grid.display());
    }
    Ok(())
}
