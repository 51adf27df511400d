//! LCM-LoRA through the library, in one page: train rank-8 adapters on the frozen shipped
//! teacher's attention projections with the consistency objective, write them as a PEFT/diffusers
//! LoRA file, then apply that file to the untouched teacher and sample in 4 steps.
//!
//! `cargo run --release --example lcm_lora -- [OUT_DIR]` (a short budget: 60 iterations; the CLI
//! is `fewstep distill consistency --lora-rank 8`, and `fewstep sample --model weights/shapes32
//! --lora OUT_DIR/lora.safetensors` samples with the result). OUT_DIR must be absent or empty.

use std::path::PathBuf;

use fewstep::data::DataSource;
use fewstep::distill::consistency::{Distance, Solver};
use fewstep::io;
use fewstep::models::lora::{LoraFormat, LoraSpec};
use fewstep::sample::{Generation, write_sample_grid};
use fewstep::train::consistency::{
    CONSISTENCY_RUN, ConsistencyConfig, ConsistencyRun, LORA_FILE, LrDecay, distill_consistency,
};
use fewstep_schedulers::Algorithm;

fn main() -> fewstep::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "runs/example-lcm-lora".into()),
    );
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    let teacher = io::shipped("shapes32")
        .canonicalize()
        .expect("weights/shapes32");

    let run = ConsistencyRun {
        kind: CONSISTENCY_RUN.into(),
        teacher: teacher.clone(),
        init: None,
        config: ConsistencyConfig {
            scales: 50,
            scales_start: None,
            target_ema: 0.95,
            timestep_scaling: 10.0,
            distance: Distance::PseudoHuber { c: 0.001 },
            solver: Solver::Ddim,
            guidance: None,
            iters: 60,
            batch: 8,
            lr: 1e-3, // adapters take a larger rate than a full student
            warmup: 10,
            lr_decay: LrDecay::Constant, // LrDecay::Cosine: to 0 at the last iteration
            timestep_sampling: Default::default(), // TimestepSampling::ICT: iCT's log-normal
            optimizer: fewstep::train::optim::OptimizerConfig::distillation(),
            ema_decay: None,
            seed: 0,
            checkpoint_every: 20,
            lora: Some(LoraSpec {
                rank: 8,
                alpha: 8.0,
                convolutions: false, // true: also the resnet and resampling convolutions
                linears: false,      // true: also the resnets' time-embedding projections
            }),
            lora_format: LoraFormat::Peft, // or Kohya: lora_unet_….lora_down/lora_up/alpha
            quantize: None, // adapters are not quantized: merge, then `fewstep quantize`
            adversarial: None,
        },
        data: DataSource::Shapes { seed: 0 },
    };
    distill_consistency(&out, Some(run), false, std::slice::from_ref(&device), false)?;

    // The adapters alone, applied to the untouched teacher; the file also carries the LCM
    // scheduler config they were distilled for.
    let lora = out.join(LORA_FILE);
    let pipeline = fewstep::pipeline::Pipeline::load_with_lora(&teacher, &lora, 1.0, &device)?;
    let request = Generation::new(16, 16, 0);
    let grid = out.join("teacher-with-lora-4steps.png");
    write_sample_grid(&pipeline, Algorithm::Lcm, 4, &request, &device, &grid)?;
    println!(
        "wrote {} ({} applied to {})",
        grid.display(),
        lora.display(),
        teacher.display()
    );
    Ok(())
}
