//! `fewstep train`: train a diffusion model (the teacher) on `shapes` or an image folder, with checkpoints and resume.

use std::path::PathBuf;

use fewstep_schedulers::{Algorithm, SchedulerConfig};

use super::DeviceArgs;
use crate::error::{Error, Result};
use crate::io;
use crate::models::UNetConfig;
use crate::train::{self, DataSource, DiffusionRun, TrainConfig};

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Training data: `shapes` (the procedural default) or a folder of png/jpeg/webp images
    /// (resized and centre-cropped to the model's sample_size; sub-folders are classes).
    #[arg(long, default_value = "shapes")]
    pub data: String,
    /// Seed of the `shapes` images.
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// A preset (tiny, shapes32, bench32) or a diffusers UNet config.json.
    #[arg(long, default_value = "shapes32")]
    pub model_config: String,
    /// The run folder (checkpoints, loss.csv, run.json).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Linear learning-rate warm-up steps.
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    /// EMA decay of the weights written to the pipeline folder.
    #[arg(long, default_value_t = 0.999)]
    pub ema: f32,
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f32,
    #[arg(long, value_parser = ["epsilon", "v_prediction", "sample"], default_value = "v_prediction")]
    pub prediction: String,
    #[arg(long, value_parser = ["linear", "scaled_linear", "squaredcos_cap_v2"], default_value = "squaredcos_cap_v2")]
    pub beta_schedule: String,
    /// Condition on the kind of the largest shape (3 classes + a null class for guidance).
    #[arg(long)]
    pub class_conditional: bool,
    /// Probability of dropping the class label (classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    pub label_dropout: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: usize,
    /// Continue the run in --out from its latest checkpoint (its stored configuration wins;
    /// --steps may extend it).
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn model_config(arg: &str) -> Result<UNetConfig> {
    if let Some(c) = UNetConfig::preset(arg) {
        return Ok(c);
    }
    let path = PathBuf::from(arg);
    if arg.ends_with(".json") || path.exists() {
        return UNetConfig::from_json_str(&io::read_text(&path)?).map_err(|e| e.in_file(&path));
    }
    Err(Error::Usage(format!(
        "--model-config {arg}: unknown preset (expected tiny, shapes32, bench32 or a config.json path)"
    )))
}

/// `shapes`, or an image folder (stored as an absolute path so that `--resume` works from
/// anywhere).
fn data_source(arg: &str, seed: u64) -> Result<DataSource> {
    if arg == "shapes" {
        return Ok(DataSource::Shapes { seed });
    }
    let path = PathBuf::from(arg);
    if !path.is_dir() {
        return Err(Error::Usage(format!(
            "--data {arg}: expected `shapes` or a folder of png/jpeg/webp images"
        )));
    }
    let path = path
        .canonicalize()
        .map_err(|e| Error::file(&path, format!("--data: cannot resolve: {e}")))?;
    Ok(DataSource::Folder { path })
}

pub fn run(args: TrainArgs) -> Result<()> {
    let device = args.device.device()?;
    let run = if args.resume {
        None
    } else {
        let mut unet = model_config(&args.model_config)?;
        let data = data_source(&args.data, args.data_seed)?;
        match &data {
            DataSource::Shapes { .. } => {
                if args.class_conditional {
                    unet.num_class_embeds = Some(crate::data::shapes::KINDS.len() + 1);
                }
                if unet
                    .sample_size
                    .is_some_and(|s| s != crate::data::shapes::SIZE)
                {
                    return Err(Error::Usage(format!(
                        "--model-config {}: `shapes` images are 32×32; the config needs sample_size 32",
                        args.model_config
                    )));
                }
                unet.sample_size = Some(crate::data::shapes::SIZE);
            }
            DataSource::Folder { path } => {
                if args.class_conditional {
                    let classes = crate::data::folder::class_names(path)?;
                    if classes.is_empty() {
                        return Err(Error::file(
                            path,
                            "--class-conditional: the folder has no class sub-folders (put each class's images in its own sub-folder)",
                        ));
                    }
                    unet.num_class_embeds = Some(classes.len() + 1);
                }
                if unet.sample_size.is_none() {
                    return Err(Error::Usage(format!(
                        "--model-config {}: training on an image folder needs `sample_size` in the config",
                        args.model_config
                    )));
                }
            }
        }
        if unet.in_channels != 3 || unet.out_channels != 3 {
            return Err(Error::Usage(format!(
                "--model-config {}: training images are RGB; the config needs 3 in and out channels",
                args.model_config
            )));
        }
        let scheduler = SchedulerConfig::from_map(
            serde_json::json!({
                "_class_name": Algorithm::Ddim.class_name(),
                "num_train_timesteps": 1000,
                "beta_schedule": args.beta_schedule,
                "prediction_type": args.prediction,
                "clip_sample": false,
                "timestep_spacing": "trailing",
                "set_alpha_to_one": true,
            })
            .as_object()
            .expect("object"),
        )?;
        let train = TrainConfig {
            steps: args.steps.unwrap_or(TrainConfig::default().steps),
            batch: args.batch,
            lr: args.lr,
            warmup: args.warmup,
            ema_decay: args.ema,
            grad_clip: args.grad_clip,
            weight_decay: 0.0,
            label_dropout: args.label_dropout,
            seed: args.seed,
            checkpoint_every: args.checkpoint_every,
        };
        train.validate()?;
        Some(DiffusionRun {
            unet,
            scheduler,
            train,
            data,
        })
    };
    train::install_interrupt_handler();
    let outcome =
        train::train_diffusion(&args.out, run, args.resume, args.steps, &device, args.quiet)?;
    let what = if outcome.interrupted {
        "interrupted"
    } else {
        "finished"
    };
    eprintln!(
        "{what} at step {} (loss {:.4}) after {:.1} s; checkpoint: {}",
        outcome.step,
        outcome.last_loss,
        outcome.seconds,
        outcome.checkpoint.display()
    );
    if outcome.interrupted {
        eprintln!(
            "resume with: fewstep train --out {} --resume",
            args.out.display()
        );
    }
    Ok(())
}
