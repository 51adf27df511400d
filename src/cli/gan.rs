//! `fewstep train-gan` (a teacher GAN) and `fewstep distill gan` (KD-GAN co-distillation of a
//! smaller generator and discriminator).

use std::path::{Path, PathBuf};

use super::DeviceArgs;
use crate::data::DataSource;
use crate::distill::gan::{GanLoss, PixelDistance};
use crate::error::{Error, Result};
use crate::io;
use crate::models::gan::{DiscriminatorConfig, GeneratorConfig, folder};
use crate::train::gan::{
    GAN_RUN, GanMode, GanOutcome, GanRun, GanTrainConfig, KD_GAN_RUN, KdWeights, train_gan,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LossArg {
    Hinge,
    NonSaturating,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DistanceArg {
    L1,
    Mse,
}

/// Optimisation flags shared by both commands.
#[derive(Debug, clap::Args)]
pub struct GanOptimArgs {
    /// Training images: `shapes` or a folder of png/jpeg/webp images.
    #[arg(long, default_value = "shapes")]
    pub data: String,
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub data_seed: u64,
    /// Iterations (one discriminator and one generator step each).
    #[arg(long, value_parser = super::values::count, default_value_t = 4000)]
    pub iters: usize,
    #[arg(long, value_parser = super::values::count, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, value_parser = super::values::positive_f64, default_value_t = 2e-4)]
    pub lr_g: f64,
    #[arg(long, value_parser = super::values::positive_f64, default_value_t = 2e-4)]
    pub lr_d: f64,
    #[arg(long, value_enum, default_value = "hinge")]
    pub loss: LossArg,
    #[command(flatten)]
    pub optimizer: super::OptimizerArgs,
    /// EMA decay of the written generator (0 for none).
    #[arg(long, value_parser = super::values::decay, default_value_t = 0.999)]
    pub ema: f32,
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_parser = super::values::count, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Continue the run in --out (its stored settings win).
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl GanOptimArgs {
    fn config(&self) -> Result<GanTrainConfig> {
        Ok(GanTrainConfig {
            iters: self.iters,
            batch: self.batch,
            lr_g: self.lr_g,
            lr_d: self.lr_d,
            optimizer: self
                .optimizer
                .config(crate::train::optim::OptimizerConfig::adam((0.5, 0.999)))?,
            loss: match self.loss {
                LossArg::Hinge => GanLoss::Hinge,
                LossArg::NonSaturating => GanLoss::NonSaturating,
            },
            ema_decay: (self.ema > 0.0).then_some(self.ema),
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
        })
    }

    fn data(&self) -> Result<DataSource> {
        DataSource::from_flag(&self.data, self.data_seed)
    }

    /// Trains `run` (built only for a new run: `--resume` reads the stored one).
    fn run(&self, out: &Path, run: impl FnOnce() -> Result<GanRun>) -> Result<()> {
        crate::train::ema::check_decay(self.ema)?;
        let device = self.device.device()?;
        crate::train::install_interrupt_handler();
        let run = if self.resume {
            super::warn_flags_on_resume(&[]);
            None
        } else {
            Some(run()?)
        };
        let outcome: GanOutcome = train_gan(out, run, self.resume, &device, self.quiet)?;
        match outcome.folder {
            None => eprintln!(
                "interrupted; resume with the same command and --resume (--out {})",
                out.display()
            ),
            Some(dir) => eprintln!(
                "{}: generator loss {:.4} (last 10 %), {:.0} s",
                dir.display(),
                outcome.final_loss,
                outcome.seconds
            ),
        }
        Ok(())
    }
}

#[derive(Debug, clap::Args)]
pub struct TrainGanArgs {
    #[command(flatten)]
    pub optim: GanOptimArgs,
    /// Width multiplier of the generator (128-64-32-16 channels at 1).
    #[arg(long, value_parser = super::values::positive_f32, default_value_t = 1.0)]
    pub width: f32,
    /// Width multiplier of the discriminator (32-64-128 channels at 1).
    #[arg(long, value_parser = super::values::positive_f32, default_value_t = 1.0)]
    pub d_width: f32,
    /// Condition on the kind of the largest shape (or the image folder's sub-folders).
    #[arg(long)]
    pub class_conditional: bool,
    /// The run folder (generator/, discriminator/, checkpoints, loss.csv).
    #[arg(long, default_value = "runs/gan")]
    pub out: PathBuf,
}

fn check_width(flag: &str, w: f32) -> Result<()> {
    if !(w > 0.0 && w <= 4.0) {
        return Err(Error::Usage(format!(
            "{flag} {w}: expected a multiplier in (0, 4]"
        )));
    }
    Ok(())
}

pub fn run_train(args: TrainGanArgs) -> Result<()> {
    check_width("--width", args.width)?;
    check_width("--d-width", args.d_width)?;
    args.optim.run(&args.out, || teacher_run(&args))
}

fn teacher_run(args: &TrainGanArgs) -> Result<GanRun> {
    let data = args.optim.data()?;
    let classes = if args.class_conditional {
        Some(match &data {
            DataSource::Shapes { .. } => crate::data::shapes::KINDS.len(),
            DataSource::Folder { path } => {
                let classes = crate::data::folder::class_names(path)?;
                if classes.is_empty() {
                    return Err(Error::file(
                        path,
                        "--class-conditional: the folder has no class sub-folders (put each class's images in its own sub-folder)",
                    ));
                }
                classes.len()
            }
        })
    } else {
        None
    };
    let mut generator = GeneratorConfig::shapes32().with_width(args.width);
    generator.num_classes = classes;
    let mut discriminator = DiscriminatorConfig::shapes32().with_width(args.d_width);
    discriminator.num_classes = classes;
    generator
        .validate()
        .map_err(|e| Error::Usage(format!("--width: {e}")))?;
    discriminator
        .validate()
        .map_err(|e| Error::Usage(format!("--d-width: {e}")))?;
    Ok(GanRun {
        kind: GAN_RUN.into(),
        mode: GanMode::Teacher {
            generator,
            discriminator,
        },
        config: args.optim.config()?,
        data,
    })
}

#[derive(Debug, clap::Args)]
pub struct DistillGanArgs {
    #[command(flatten)]
    pub optim: GanOptimArgs,
    /// The teacher GAN folder (generator/, discriminator/; default: the shipped weights/shapes-gan).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Width of the student generator relative to the teacher's.
    #[arg(long, value_parser = super::values::positive_f32, default_value_t = 0.25)]
    pub width: f32,
    /// Width of the student discriminator relative to the teacher's.
    #[arg(long, value_parser = super::values::positive_f32, default_value_t = 0.5)]
    pub d_width: f32,
    /// Weight of the output term d(G_S(z), G_T(z)).
    #[arg(long, value_parser = super::values::non_negative_f32, default_value_t = 10.0)]
    pub lambda_out: f32,
    #[arg(long, value_enum, default_value = "l1")]
    pub out_distance: DistanceArg,
    /// Weight of the feature term (1×1 regressors onto the teacher's stage outputs).
    #[arg(long, value_parser = super::values::non_negative_f32, default_value_t = 1.0)]
    pub lambda_feat: f32,
    /// Weight of the perceptual term (distance in the `shapes` feature network's features).
    #[arg(long, value_parser = super::values::non_negative_f32, default_value_t = 0.0)]
    pub lambda_perc: f32,
    /// Weight of the adversarial term from the student discriminator.
    #[arg(long, value_parser = super::values::non_negative_f32, default_value_t = 1.0)]
    pub lambda_adv: f32,
    /// Weight of the student discriminator's logit matching to the teacher's (0 by default: on
    /// `shapes` it made the student worse — FID 151.5 at 0.1 and a collapse at 1, against 99.1
    /// without, `cargo bench --bench kd_gan`).
    #[arg(long, value_parser = super::values::non_negative_f32, default_value_t = 0.0)]
    pub lambda_kd: f32,
    /// The `shapes` feature network for --lambda-perc (default: the shipped one).
    #[arg(long)]
    pub feature_weights: Option<PathBuf>,
    /// The run folder (the student GAN's generator/ and discriminator/, checkpoints, loss.csv).
    #[arg(long, default_value = "runs/kd-gan")]
    pub out: PathBuf,
    /// Quantization-aware distillation: the student generator learns under simulated int8 or
    /// 4-bit weights (blocks of 32, f16 scales) and is written quantized.
    #[arg(long, value_parser = ["int8", "int4"])]
    pub quantize: Option<String>,
    /// With --quantize: learned block scales (LSQ) instead of max-abs ones.
    #[arg(long, requires = "quantize")]
    pub lsq: bool,
    /// A GAN folder of students of these widths to start from (e.g. the f32 KD students).
    #[arg(long)]
    pub init: Option<PathBuf>,
}

pub fn run_distill(args: DistillGanArgs) -> Result<()> {
    check_width("--width", args.width)?;
    check_width("--d-width", args.d_width)?;
    args.optim.run(&args.out, || distill_run(&args))
}

fn distill_run(args: &DistillGanArgs) -> Result<GanRun> {
    let teacher = args
        .teacher
        .clone()
        .unwrap_or_else(|| io::shipped("shapes-gan"));
    if !folder::is_gan(&teacher) {
        return Err(Error::file(
            &teacher,
            "--teacher: not a GAN folder (expected generator/config.json; train one with `fewstep train-gan`)",
        ));
    }
    for (flag, v) in [
        ("--lambda-out", args.lambda_out),
        ("--lambda-feat", args.lambda_feat),
        ("--lambda-perc", args.lambda_perc),
        ("--lambda-adv", args.lambda_adv),
        ("--lambda-kd", args.lambda_kd),
    ] {
        if !(v >= 0.0 && v.is_finite()) {
            return Err(Error::Usage(format!(
                "{flag} {v}: expected a weight of 0 or more"
            )));
        }
    }
    let perceptual_net = (args.lambda_perc > 0.0).then(|| {
        args.feature_weights
            .clone()
            .unwrap_or_else(|| io::shipped(crate::metrics::features::SHAPES_FEATURES))
    });
    Ok(GanRun {
        kind: KD_GAN_RUN.into(),
        mode: GanMode::Distill {
            teacher: teacher
                .canonicalize()
                .map_err(|_| Error::file(&teacher, "--teacher: not found"))?,
            generator_width: args.width,
            discriminator_width: args.d_width,
            weights: KdWeights {
                output: args.lambda_out,
                output_distance: match args.out_distance {
                    DistanceArg::L1 => PixelDistance::L1,
                    DistanceArg::Mse => PixelDistance::Mse,
                },
                feature: args.lambda_feat,
                perceptual: args.lambda_perc,
                adversarial: args.lambda_adv,
                logit: args.lambda_kd,
            },
            perceptual_net,
            quantize: args
                .quantize
                .as_deref()
                .map(|f| {
                    Ok::<_, Error>(crate::models::quant::QuantizeSpec {
                        format: crate::models::quant::QuantFormat::parse(f, "--quantize")?,
                        lsq: args.lsq,
                        anchor: 0.0,
                    })
                })
                .transpose()?,
            init: args
                .init
                .as_ref()
                .map(|p| {
                    p.canonicalize()
                        .map_err(|_| Error::file(p, "--init: not found"))
                })
                .transpose()?,
        },
        config: args.optim.config()?,
        data: args.optim.data()?,
    })
}
