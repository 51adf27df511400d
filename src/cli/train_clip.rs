//! `fewstep train-clip`: train the `shapes-text` text encoder (LiT against the locked `shapes`
//! feature network; see `train::clip`).

use std::path::PathBuf;

use super::DeviceArgs;
use crate::error::{Error, Result};
use crate::train::clip::{self, CLIP_RUN, ClipRun};

#[derive(Debug, clap::Args)]
pub struct TrainClipArgs {
    /// The run folder: tokenizer/ and, at the end, text_encoder/ (a --text-encoder for
    /// `fewstep train`), clip.safetensors, report.json.
    #[arg(long)]
    pub out: PathBuf,
    /// The locked image tower: a `shapes` feature network folder.
    #[arg(long, default_value = "weights/shapes-features")]
    pub image_tower: PathBuf,
    /// Optimisation steps (with --resume: a new total, the cosine schedule stretched or cut).
    #[arg(long, value_parser = super::values::count)]
    pub steps: Option<usize>,
    #[arg(long, value_parser = super::values::count, default_value_t = 128)]
    pub batch: usize,
    /// Peak learning rate (linear warm-up, then half a cosine to 0).
    #[arg(long, value_parser = super::values::positive_f64, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, value_parser = super::values::whole, default_value_t = 100)]
    pub warmup: usize,
    /// Width of the text tower (hidden_size; heads of 16, MLP ×4) and of the joint space.
    #[arg(long, value_parser = super::values::count, default_value_t = 64)]
    pub hidden: usize,
    #[arg(long, value_parser = super::values::count, default_value_t = 3)]
    pub layers: usize,
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub seed: u64,
    /// Seed of the `shapes` images.
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub data_seed: u64,
    #[arg(long, value_parser = super::values::count, default_value_t = 250)]
    pub checkpoint_every: usize,
    #[command(flatten)]
    pub optimizer: super::OptimizerArgs,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: TrainClipArgs) -> Result<()> {
    let device = args.device.device()?;
    crate::train::install_interrupt_handler();
    let run = if args.resume {
        None
    } else {
        if !args.hidden.is_multiple_of(16) {
            return Err(Error::Usage(format!(
                "--hidden {}: expected a multiple of 16 (heads of 16)",
                args.hidden
            )));
        }
        let image_tower = args.image_tower.canonicalize().map_err(|_| {
            Error::file(
                &args.image_tower,
                "--image-tower: not found (expected a `shapes` feature network folder such as weights/shapes-features)",
            )
        })?;
        Some(ClipRun {
            kind: CLIP_RUN.into(),
            // Replaced once the tokenizer is written (its vocabulary size).
            text: ClipRun::text_config(2, args.hidden, args.layers),
            projection_dim: args.hidden,
            image_tower,
            data_seed: args.data_seed,
            steps: args.steps.unwrap_or(2000),
            batch: args.batch,
            lr: args.lr,
            warmup: args.warmup,
            optimizer: args
                .optimizer
                .config(crate::train::optim::OptimizerConfig::adamw(1e-4, Some(1.0)))?,
            seed: args.seed,
            checkpoint_every: args.checkpoint_every,
        })
    };
    let outcome = clip::train_clip(
        &args.out,
        run,
        args.steps.filter(|_| args.resume),
        &device,
        args.quiet,
    )?;
    match outcome.retrieval {
        Some(r) => println!(
            "held-out text→image retrieval ({} captions, pools of {}): top-1 {:.4} (chance {:.4}); {:.0} s; text encoder in {}",
            r.captions,
            r.pool,
            r.top1,
            r.chance,
            outcome.seconds,
            args.out.display()
        ),
        None => eprintln!(
            "interrupted; resume with: fewstep train-clip --out {} --resume",
            args.out.display()
        ),
    }
    Ok(())
}
