//! `fewstep distill progressive`: halve a teacher's sampling steps round by round (or divide them
//! by `--round-factor K`), then print the FID-versus-steps table (teacher at N and K·N steps
//! against each round's student at N).
//! `fewstep distill consistency`: a consistency (LCM) student, then its FID at 1, 2, 4 … steps
//! against the teacher's.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use fewstep_schedulers::Algorithm;
use serde_json::json;

use super::DeviceArgs;
use crate::data::DataSource;
use crate::distill::consistency::{AdversarialSpec, DiscriminatorBackbone, Distance, Solver};
use crate::error::{Error, Result};
use crate::eval::Evaluator;
use crate::io;
use crate::metrics::{self, FeatureExtractor, Reference, ShapesFeatures};
use crate::models::lora::{LoraFormat, LoraSpec};
use crate::models::quant::{QuantFormat, QuantizeSpec};
use crate::train::consistency::{
    self, CONSISTENCY_RUN, ConsistencyConfig, ConsistencyOutcome, ConsistencyRun, GuidanceRange,
    LrDecay,
};
use crate::train::progressive::{
    self, PROGRESSIVE_RUN, ProgressiveConfig, ProgressiveOutcome, ProgressiveRun,
};
use crate::train::timesteps::TimestepSampling;
use crate::train::{self, checkpoint};

#[derive(Debug, clap::Subcommand)]
pub enum DistillCommand {
    /// Progressive distillation (Salimans & Ho): each round halves the sampling steps.
    Progressive(ProgressiveArgs),
    /// Consistency distillation (Song et al.; LCM): a student that samples in 1–4 steps.
    Consistency(ConsistencyArgs),
    /// KD-GAN co-distillation: a smaller generator and discriminator from a teacher GAN.
    Gan(super::gan::DistillGanArgs),
    /// Distribution matching distillation (DMD2): a 1–4 step generator whose samples match the
    /// teacher's distribution, judged by the teacher's score against one learned online.
    Dmd(super::dmd::DmdArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Budget {
    /// Minutes on 2 CPU cores, 300 evaluation samples. progressive: 16 → 8 → 4 steps, 120
    /// iterations of batch 16 per round; consistency: 300 iterations of batch 16, teacher
    /// reference at 8 steps.
    Quick,
    /// The budget for shipped students (hours on a CPU), 2000 evaluation samples. progressive:
    /// 16 → 8 → 4 → 2 → 1 steps (the teacher's best DDIM step count is 16), 1500 iterations
    /// of batch 32 per round; consistency: 3000 iterations of batch 32, student weight EMA
    /// 0.999, teacher reference at 250 steps.
    Full,
}

impl Budget {
    /// The teacher's DDIM step count an LCM student's ratio column divides by: quick 8, full
    /// 250 (the many-step reference, a divisor of the 1000 train timesteps).
    pub fn reference_steps(self) -> usize {
        match self {
            Budget::Quick => 8,
            Budget::Full => 250,
        }
    }
}

/// What every distillation command takes: teacher, data, run folder, evaluation, device.
#[derive(Debug, clap::Args)]
pub struct DistillArgs {
    /// The teacher's pipeline folder (default: the shipped weights/shapes32).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Training images: `shapes` or a folder of png/jpeg/webp images.
    #[arg(long, default_value = "shapes")]
    pub data: String,
    /// Seed of the `shapes` images.
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub data_seed: u64,
    /// Budget preset; the flags below override its values.
    #[arg(long, value_enum, default_value = "quick")]
    pub preset: Budget,
    /// Seed of the batches and noise.
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoint every K iterations.
    #[arg(long, value_parser = super::values::count, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Continue the run in --out (its stored settings win).
    #[arg(long)]
    pub resume: bool,
    /// Generated samples per FID evaluation (default: 300 quick, 2000 full).
    #[arg(long, value_parser = super::values::count)]
    pub eval_samples: Option<usize>,
    /// Skip the FID table.
    #[arg(long)]
    pub no_eval: bool,
    /// Folder of the `shapes` feature network (default: the shipped one).
    #[arg(long)]
    pub feature_weights: Option<PathBuf>,
    #[arg(long)]
    pub quiet: bool,
    /// Quantization-aware distillation: the student learns under simulated int8 or 4-bit
    /// weights (blocks of 32 with f16 scales, straight-through estimator) against the
    /// full-precision teacher, and is written quantized.
    #[arg(long, value_parser = ["int8", "int4"])]
    pub quantize: Option<String>,
    /// With --quantize: learned block scales (LSQ, Esser et al. 2020) instead of max-abs ones.
    #[arg(long, requires = "quantize")]
    pub lsq: bool,
    /// With --quantize and --init: weight of the term that ties the quantized student's output
    /// to the full-precision --init model's at the same input (distillation from the f32
    /// student to its quantized copy); 0 trains on the distillation objective alone.
    #[arg(long, value_parser = super::values::non_negative_f32, default_value_t = 1.0, requires = "quantize")]
    pub quant_anchor: f32,
    /// A pipeline folder whose UNet the student starts from instead of the teacher's (same
    /// architecture): e.g. the f32 student, fine-tuned under --quantize. A wider one (`fewstep
    /// widen` of the teacher) makes a wider student: in `distill progressive` its first student,
    /// and every later round's, keeps that width; `distill consistency` takes it for a full
    /// student, not with --lora-rank.
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub data_parallel: super::DataParallelArgs,
    #[command(flatten)]
    pub optimizer: super::OptimizerArgs,
}

impl DistillArgs {
    /// `--quantize` / `--lsq`.
    fn quantize(&self) -> Result<Option<QuantizeSpec>> {
        self.quantize
            .as_deref()
            .map(|f| {
                Ok(QuantizeSpec {
                    format: QuantFormat::parse(f, "--quantize")?,
                    lsq: self.lsq,
                    anchor: if self.init.is_some() {
                        self.quant_anchor
                    } else {
                        0.0
                    },
                })
            })
            .transpose()
    }

    /// `--init`, absolute, checked to be a pipeline folder.
    pub(super) fn init(&self) -> Result<Option<PathBuf>> {
        match &self.init {
            None => Ok(None),
            Some(dir) => {
                let dir = absolute(dir, "--init")?;
                if !dir.join("unet").is_dir() {
                    return Err(Error::file(
                        &dir,
                        "--init: expected a pipeline folder with unet/",
                    ));
                }
                Ok(Some(dir))
            }
        }
    }

    /// The distillation optimizer (AdamW, weight decay 1e-4, clip 1) with the flags applied.
    pub(super) fn optimizer(&self) -> Result<crate::train::optim::OptimizerConfig> {
        self.optimizer
            .config(crate::train::optim::OptimizerConfig::distillation())
    }

    fn eval_samples(&self) -> usize {
        self.eval_samples.unwrap_or(match self.preset {
            Budget::Quick => 300,
            Budget::Full => 2000,
        })
    }

    /// The teacher folder and data of a new run, checked.
    pub(super) fn teacher_and_data(&self) -> Result<(PathBuf, DataSource)> {
        let teacher = self
            .teacher
            .clone()
            .unwrap_or_else(|| io::shipped("shapes32"));
        if !teacher.join("model_index.json").is_file() {
            return Err(Error::file(
                &teacher,
                "--teacher: not a diffusers pipeline folder (no model_index.json)",
            ));
        }
        let data = DataSource::from_flag(&self.data, self.data_seed)?;
        Ok((absolute(&teacher, "--teacher")?, data))
    }

    /// The feature extractor and the reference statistics of the run's data.
    pub(super) fn reference(
        &self,
        data: &DataSource,
        device: &Device,
    ) -> Result<(ShapesFeatures, Reference, usize)> {
        let extractor = ShapesFeatures::load(
            &self
                .feature_weights
                .clone()
                .unwrap_or_else(|| io::shipped(metrics::features::SHAPES_FEATURES)),
            device,
        )?;
        let num = self.eval_samples();
        metrics::check_fid_samples("--eval-samples", num, extractor.dim())?;
        let reference = match data {
            DataSource::Shapes { seed } => metrics::shapes_reference(
                &extractor,
                *seed,
                5000,
                &metrics::default_cache_dir(),
                device,
            )?,
            DataSource::Folder { path } => {
                metrics::folder_reference(&extractor, path, Some(5000), device)?
            }
        };
        Ok((extractor, reference, num))
    }
}

#[derive(Debug, clap::Args)]
pub struct ProgressiveArgs {
    #[command(flatten)]
    pub common: DistillArgs,
    /// The teacher's step count (--to-steps times a power of --round-factor; quick and full 16).
    #[arg(long, value_parser = super::values::count)]
    pub from_steps: Option<usize>,
    /// The last student's step count (quick 4, full 1).
    #[arg(long, value_parser = super::values::count)]
    pub to_steps: Option<usize>,
    /// Teacher DDIM steps per student step: each round divides the steps by it (default 2, the
    /// paper's halving; e.g. 8 with --from-steps 32 --to-steps 4 distills the teacher's 32-step
    /// sampler into a 4-step student in one round, on targets from the teacher itself).
    #[arg(long, value_parser = super::values::count)]
    pub round_factor: Option<usize>,
    /// Optimiser steps per halving round (quick 120, full 1500).
    #[arg(long, value_parser = super::values::count)]
    pub iters_per_round: Option<usize>,
    /// Images per step (quick 16, full 32).
    #[arg(long, value_parser = super::values::count)]
    pub batch: Option<usize>,
    /// Peak learning rate of each round, decayed linearly to 0 (default 1e-4).
    #[arg(long, value_parser = super::values::positive_f64)]
    pub lr: Option<f64>,
    /// EMA decay of the written students (default: none, as in the paper).
    #[arg(long, value_parser = super::values::decay)]
    pub ema: Option<f32>,
    /// Guided distillation (Meng et al. 2023) of a class-conditional or text-to-image teacher:
    /// stage one distills the classifier-free guided teacher, x0 = c + w·(c − u) with w drawn per
    /// row from MIN,MAX, into a student that takes w as an input (a guidance-scale embedding,
    /// time_cond_proj_dim) at --from-steps; the halving rounds keep w as an input. Students
    /// sample in one pass with `--guidance-scale w+1`.
    #[arg(long, value_parser = super::values::non_negative_f32, value_delimiter = ',', num_args = 1..=2)]
    pub guidance: Option<Vec<f32>>,
    /// Iterations of guided stage one (default: --iters-per-round).
    #[arg(long, value_parser = super::values::count, requires = "guidance")]
    pub guided_iters: Option<usize>,
    /// Guided stage one as the first halving round: the student learns to do in one step what
    /// the guided teacher does in two (--round-factor K: in K) of its --from-steps sampler, so the
    /// first student samples in --from-steps/2 (/K) (default: stage one at --from-steps, as in
    /// Meng et al., then halving).
    #[arg(long, requires = "guidance")]
    pub guided_halving: bool,
    /// The fraction of each batch's rows (0 to 1) noised along the student's own sampling
    /// trajectory (its DDIM sampler from noise to the row's step, no gradients; ~steps/2 extra
    /// passes per such row) instead of from data, so the teacher is also fitted where the student
    /// samples (default: none, as in the papers).
    #[arg(long, value_parser = super::values::probability)]
    pub rollout_fraction: Option<f32>,
    /// Cap the loss weight max(SNR_t, 1) at this value (min-SNR-γ, e.g. 5): the high-noise steps,
    /// where content is decided, weigh more against the low-noise ones (default: uncapped, as in
    /// the paper).
    #[arg(long, value_parser = super::values::positive_f64)]
    pub snr_weight_cap: Option<f64>,
    /// Distance between the student's x̂₀ and the teacher's x̃, under the same SNR weight: l2 (the
    /// paper), huber, or teacher-features (LPIPS's form on the original teacher's encoder, as
    /// `distill consistency --loss teacher-features`; one more encoder pass over both images).
    #[arg(long, value_enum, default_value = "l2")]
    pub loss: LossKind,
    #[command(flatten)]
    pub huber: HuberArgs,
    /// The run folder (round-<N>steps/ students, checkpoints, loss.csv, report.{json,csv}).
    #[arg(long, default_value = "runs/progressive")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LossKind {
    /// Mean squared error.
    L2,
    /// Pseudo-Huber √((a − b)² + c²) − c per element (LCM).
    Huber,
    /// LPIPS's form on the teacher's own encoder: channel-normalised features of every
    /// encoder map, squared differences summed (the consistency-models paper's perceptual
    /// distance, with the teacher as the network; gradients pass through the frozen teacher).
    TeacherFeatures,
}

/// `--huber-c`, the constant of every distillation command's pseudo-Huber distance.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct HuberArgs {
    /// c of the pseudo-Huber distance √((a − b)² + c²) − c, where a loss flag names huber (LCM:
    /// 0.001).
    #[arg(long, value_parser = super::values::positive_f32, default_value_t = 0.001)]
    pub huber_c: f32,
}

impl HuberArgs {
    /// The distance a loss flag names.
    pub fn distance(self, kind: LossKind) -> Distance {
        match kind {
            LossKind::L2 => Distance::L2,
            LossKind::Huber => Distance::PseudoHuber { c: self.huber_c },
            LossKind::TeacherFeatures => Distance::TeacherFeatures,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackboneKind {
    TeacherFeatures,
    Pixels,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SolverKind {
    Ddim,
    Heun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LrDecayKind {
    Constant,
    Cosine,
}

#[derive(Debug, clap::Args)]
pub struct ConsistencyArgs {
    #[command(flatten)]
    pub common: DistillArgs,
    /// Optimiser steps (quick 300, full 3000); with --resume a new total, which extends a
    /// finished run.
    #[arg(long, value_parser = super::values::count)]
    pub iters: Option<usize>,
    /// Images per step (quick 16, full 32).
    #[arg(long, value_parser = super::values::count)]
    pub batch: Option<usize>,
    /// Learning rate after the warm-up (default 1e-4).
    #[arg(long, value_parser = super::values::positive_f64)]
    pub lr: Option<f64>,
    /// Linear warm-up iterations (default 100).
    #[arg(long, value_parser = super::values::whole, default_value_t = 100)]
    pub warmup: usize,
    /// The learning rate after the warm-up: constant (LCM, CD) or cosine (half a cosine to 0
    /// at the last iteration).
    #[arg(long, value_enum, default_value = "constant")]
    pub lr_decay: LrDecayKind,
    /// How each row's grid point is drawn: uniform (CD, LCM), iCT's log-normal over σ
    /// (`lognormal`: ln σ ~ N(−1.1, 2²), more rows at low noise and fewer at high) or
    /// `lognormal:MEAN,STD`, each point with the probability that σ falls in its span.
    #[arg(long, value_parser = super::values::consistency_timestep_sampling, default_value = "uniform")]
    pub timestep_sampling: TimestepSampling,
    /// Scales N of the skipping grid, the teacher's DDIM solver taking T/N timesteps per step
    /// (LCM: 50); the written LCM scheduler's original_inference_steps.
    #[arg(long, value_parser = super::values::count, default_value_t = 50)]
    pub scales: usize,
    /// Start a doubling curriculum of scales here (N doubles in equal stages up to --scales,
    /// the target EMA rate following as in the CT paper); default: N fixed.
    #[arg(long, value_parser = super::values::count)]
    pub scales_start: Option<usize>,
    /// EMA rate μ of the target network (LCM and CD: 0.95).
    #[arg(long, value_parser = super::values::decay, default_value_t = 0.95)]
    pub target_ema: f32,
    /// `timestep_scaling` of the boundary scalings (LCM: 10).
    #[arg(long, value_parser = super::values::positive_f32, default_value_t = 10.0)]
    pub timestep_scaling: f32,
    /// Distance between the student's and the target's outputs.
    #[arg(long, value_enum, default_value = "huber")]
    pub loss: LossKind,
    /// The teacher's solver between grid points: ddim (LCM, one teacher call) or heun (the
    /// consistency-models paper's second-order step, two calls).
    #[arg(long, value_enum, default_value = "ddim")]
    pub solver: SolverKind,
    /// Add an adversarial term of this weight: heads on the frozen teacher's encoder features
    /// (LADD's discriminator) judge the student's one-step samples against the training images,
    /// both re-noised to a timestep in 0..=--adversarial-max-t; the student minimises the hinge
    /// generator loss × WEIGHT beside the consistency distance (e.g. 0.1).
    #[arg(long, value_parser = super::values::positive_f32, value_name = "WEIGHT")]
    pub adversarial: Option<f32>,
    /// With --adversarial: the highest timestep the discriminator's inputs are re-noised to.
    #[arg(long, value_parser = super::values::whole, default_value_t = 500, requires = "adversarial")]
    pub adversarial_max_t: usize,
    /// With --adversarial: what the discriminator looks at — heads on the frozen teacher's
    /// encoder maps (LADD), or the images through a spectral-norm convolutional network trained
    /// from scratch (the KD-GAN's; 3-channel 32×32 teachers).
    #[arg(
        long,
        value_enum,
        default_value = "teacher-features",
        requires = "adversarial"
    )]
    pub adversarial_backbone: BackboneKind,
    /// With --adversarial: iterations the discriminator trains alone before the student's
    /// adversarial term starts.
    #[arg(long, value_parser = super::values::whole, default_value_t = 0, requires = "adversarial")]
    pub adversarial_start: usize,
    /// With --adversarial: the discriminator's learning rate (Adam, β = 0.5, 0.999).
    #[arg(long, value_parser = super::values::positive_f64, default_value_t = 2e-4, requires = "adversarial")]
    pub adversarial_lr: f64,
    #[command(flatten)]
    pub huber: HuberArgs,
    /// Classifier-free guidance of the teacher's targets, x0 = c + w·(c − u), for a
    /// class-conditional teacher: one scale `w`, or a range `w_min,w_max` drawn per example —
    /// the student then takes w through a guidance-scale embedding (LCM's time_cond_proj_dim)
    /// and samples with `--guidance-scale w+1`.
    #[arg(long, value_parser = super::values::non_negative_f32, value_delimiter = ',', num_args = 1..=2)]
    pub guidance: Option<Vec<f32>>,
    /// EMA decay of the written student (default: none for quick, as LCM; 0.999 for full;
    /// `--ema 0` writes the raw weights).
    #[arg(long, value_parser = super::values::decay)]
    pub ema: Option<f32>,
    /// Train rank-r adapters on the frozen teacher (LCM-LoRA) instead of a full student; writes
    /// lora.safetensors (PEFT/diffusers format) beside the merged student/.
    #[arg(long, value_parser = super::values::count)]
    pub lora_rank: Option<usize>,
    /// LoRA α (the adapters are scaled by α/r; default: r).
    #[arg(long, value_parser = super::values::positive_f32)]
    pub lora_alpha: Option<f32>,
    /// Key layout of lora.safetensors: peft (diffusers/PEFT: `….lora_A.weight`, `unet.`-prefixed
    /// for a text-to-image teacher) or kohya (`lora_unet_….lora_down.weight`, `.alpha`); both
    /// load with diffusers' `load_lora_weights` and `fewstep sample --lora`.
    #[arg(long, value_parser = ["peft", "kohya"], default_value = "peft", requires = "lora_rank")]
    pub lora_format: String,
    /// Also adapt the resnet, down- and upsampling convolutions.
    #[arg(long)]
    pub lora_convs: bool,
    /// Also adapt the resnets' time-embedding projections.
    #[arg(long)]
    pub lora_linears: bool,
    /// Sampling steps of the FID table (comma-separated).
    #[arg(long, value_parser = super::values::count, default_value = "1,2,4", value_delimiter = ',')]
    pub eval_steps: Vec<usize>,
    /// The teacher's DDIM step count the ratio column divides by (quick 8, full 250: the
    /// many-step reference, a divisor of the 1000 train timesteps, which DDIM samples cleanly).
    #[arg(long, value_parser = super::values::count)]
    pub reference_steps: Option<usize>,
    /// The run folder (student/, checkpoints, loss.csv, report.{json,csv}).
    #[arg(long, default_value = "runs/consistency")]
    pub out: PathBuf,
}

pub(super) fn absolute(path: &Path, flag: &str) -> Result<PathBuf> {
    path.canonicalize()
        .map_err(|_| Error::file(path, format!("{flag}: not found")))
}

impl ProgressiveArgs {
    fn config(&self) -> Result<ProgressiveConfig> {
        let (from, to, iters, batch, lr) = match self.common.preset {
            Budget::Quick => (16, 4, 120, 16, 1e-4),
            Budget::Full => (16, 1, 1500, 32, 1e-4),
        };
        Ok(ProgressiveConfig {
            from_steps: self.from_steps.unwrap_or(from),
            to_steps: self.to_steps.unwrap_or(to),
            round_factor: self.round_factor.unwrap_or(2),
            iters_per_round: self.iters_per_round.unwrap_or(iters),
            batch: self.batch.unwrap_or(batch),
            lr: self.lr.unwrap_or(lr),
            optimizer: self.common.optimizer()?,
            ema_decay: self.ema,
            seed: self.common.seed,
            checkpoint_every: self.common.checkpoint_every,
            guidance: self.guidance.as_ref().map(|g| GuidanceRange {
                min: g[0],
                max: *g.last().expect("one or two values"),
            }),
            guided_iters: self.guided_iters,
            guided_halving: self.guided_halving,
            rollout_fraction: self.rollout_fraction,
            snr_weight_cap: self.snr_weight_cap,
            distance: self.huber.distance(self.loss),
            quantize: self.common.quantize()?,
        })
    }
}

/// Evaluates the teacher and every finished round, prints the table, writes report.{json,csv}.
fn report(
    args: &ProgressiveArgs,
    run: &ProgressiveRun,
    outcome: &ProgressiveOutcome,
    device: &Device,
) -> Result<()> {
    let (extractor, reference, num) = args.common.reference(&run.data, device)?;
    let mut ev = Evaluator::new(&extractor, &reference, num, None, device);
    let mut rows = Vec::new();
    // The teacher at the K·N steps each student learned from (K = 2: the paper's halving).
    let k = run.config.round_factor;
    let mut csv = format!(
        "steps,student_fid,student_kid,teacher_fid_at_steps,teacher_fid_at_{k}x_steps,final_loss,seconds\n",
    );
    let mut table = format!(
        "FID vs steps ({num} samples per entry, DDIM, {} features, reference {})\n  steps | teacher @ {k}N | teacher @ N | student @ N | student / teacher@{k}N\n",
        extractor.id(),
        reference.protocol["dataset"].as_str().unwrap_or("images")
    );
    for round in &outcome.rounds {
        let n = round.steps;
        let t2 = ev.eval(&run.teacher, Algorithm::Ddim, k * n)?;
        let t1 = ev.eval(&run.teacher, Algorithm::Ddim, n)?;
        let s = ev.eval(&round.dir, Algorithm::Ddim, n)?;
        table += &format!(
            "  {n:>5} | {:>12.3} | {:>11.3} | {:>11.3} | {:>8.3}\n",
            t2.fid,
            t1.fid,
            s.fid,
            s.fid / t2.fid
        );
        let kid = s.kid.map_or(f64::NAN, |k| k.mean);
        csv += &format!(
            "{n},{:.6},{kid:.6},{:.6},{:.6},{:.6},{:.1}\n",
            s.fid, t1.fid, t2.fid, round.final_loss, round.seconds
        );
        rows.push(json!({
            "steps": n,
            "student": s,
            "teacher_at_steps": t1,
            format!("teacher_at_{k}x_steps"): t2,
            "final_loss": round.final_loss,
            "seconds": round.seconds,
            "folder": round.dir.display().to_string(),
        }));
    }
    print!("{table}");
    let protocol = json!({
        "extractor": extractor.id(),
        "reference": reference.protocol,
        "num_samples": num,
        "seed": 0,
        "scheduler": "ddim",
    });
    io::write_json(
        &args.out.join("report.json"),
        &json!({ "protocol": protocol, "config": run.config, "teacher": run.teacher, "rounds": rows }),
    )?;
    io::write_atomic(&args.out.join("report.csv"), csv.as_bytes())?;
    eprintln!("wrote {}/report.{{json,csv}}", args.out.display());
    Ok(())
}

fn run_progressive(args: ProgressiveArgs) -> Result<()> {
    let devices = args.common.data_parallel.devices(&args.common.device)?;
    let device = devices[0].clone();
    let run = if args.common.resume {
        super::warn_flags_on_resume(&[]);
        None
    } else {
        let (teacher, data) = args.common.teacher_and_data()?;
        let config = args.config()?;
        config.validate()?;
        Some(ProgressiveRun {
            kind: PROGRESSIVE_RUN.into(),
            teacher,
            init: args.common.init()?,
            config,
            data,
        })
    };
    let folder =
        args.common
            .data_parallel
            .join("distill progressive", &args.out, args.common.resume)?;
    train::install_interrupt_handler();
    let outcome = progressive::distill_progressive(
        folder.path(),
        run,
        args.common.resume,
        &devices,
        args.common.quiet || !folder.is_main(),
    )?;
    if !folder.is_main() {
        return Ok(());
    }
    folder.report_overhead(args.common.quiet);
    if outcome.interrupted {
        eprintln!(
            "interrupted; resume with: fewstep distill progressive --out {} --resume",
            args.out.display()
        );
        return Ok(());
    }
    for r in &outcome.rounds {
        eprintln!(
            "{}: {} steps, final loss {:.5}, {:.0} s",
            r.dir.display(),
            r.steps,
            r.final_loss,
            r.seconds
        );
    }
    if args.common.no_eval {
        return Ok(());
    }
    let run: ProgressiveRun = checkpoint::read_run_as(&args.out, PROGRESSIVE_RUN)?;
    if let Some(last) = outcome.rounds.last()
        && let Some(hint) = text_teacher_eval_hint(&run.teacher, &args.out)
    {
        eprintln!("{hint} (last student: {})", last.dir.display());
        return Ok(());
    }
    if run.config.guidance.is_some() {
        eprintln!(
            "guided students: evaluate with `fewstep eval curve --model {} --guidance-scale G`",
            args.out.display()
        );
        return Ok(());
    }
    report(&args, &run, &outcome, &device)
}

impl ConsistencyArgs {
    fn config(&self) -> Result<ConsistencyConfig> {
        let (iters, batch) = match self.common.preset {
            Budget::Quick => (300, 16),
            Budget::Full => (3000, 32),
        };
        // The full budget writes the weight EMA: without it the 1- and 2-step FIDs drift up
        // over the last thousands of iterations at a constant learning rate (README).
        let ema = match self.common.preset {
            Budget::Quick => None,
            Budget::Full => Some(0.999),
        };
        Ok(ConsistencyConfig {
            scales: self.scales,
            scales_start: self.scales_start,
            target_ema: self.target_ema,
            timestep_scaling: self.timestep_scaling,
            distance: self.huber.distance(self.loss),
            solver: match self.solver {
                SolverKind::Ddim => Solver::Ddim,
                SolverKind::Heun => Solver::Heun,
            },
            guidance: self.guidance.as_ref().map(|g| GuidanceRange {
                min: g[0],
                max: *g.last().expect("clap gives 1 or 2 values"),
            }),
            iters: self.iters.unwrap_or(iters),
            batch: self.batch.unwrap_or(batch),
            lr: self.lr.unwrap_or(1e-4),
            warmup: self.warmup,
            lr_decay: match self.lr_decay {
                LrDecayKind::Constant => LrDecay::Constant,
                LrDecayKind::Cosine => LrDecay::Cosine,
            },
            timestep_sampling: self.timestep_sampling,
            optimizer: self.common.optimizer()?,
            ema_decay: self.ema.or(ema),
            seed: self.common.seed,
            checkpoint_every: self.common.checkpoint_every,
            lora: self.lora_rank.map(|rank| LoraSpec {
                rank,
                alpha: self.lora_alpha.unwrap_or(rank as f32),
                convolutions: self.lora_convs,
                linears: self.lora_linears,
            }),
            lora_format: if self.lora_format == "kohya" {
                LoraFormat::Kohya
            } else {
                LoraFormat::Peft
            },
            quantize: self.common.quantize()?,
            adversarial: self.adversarial.map(|weight| AdversarialSpec {
                weight,
                max_t: self.adversarial_max_t,
                lr: self.adversarial_lr,
                start: self.adversarial_start,
                backbone: match self.adversarial_backbone {
                    BackboneKind::TeacherFeatures => DiscriminatorBackbone::TeacherFeatures,
                    BackboneKind::Pixels => DiscriminatorBackbone::Pixels,
                },
            }),
        })
    }

    fn reference_steps(&self) -> usize {
        self.reference_steps
            .unwrap_or(self.common.preset.reference_steps())
    }
}

/// What the FID table of an LCM-sampled student needs.
pub(super) struct LcmReport<'a> {
    pub(super) common: &'a DistillArgs,
    /// The run folder report.{json,csv} go to.
    pub(super) out: &'a Path,
    pub(super) eval_steps: &'a [usize],
    pub(super) reference_steps: usize,
    pub(super) teacher: &'a Path,
    pub(super) data: &'a DataSource,
    /// The guidance scale a w-conditioned student is sampled at.
    pub(super) guidance_scale: Option<f32>,
    /// The run's config, recorded in report.json.
    pub(super) config: serde_json::Value,
    pub(super) final_loss: f64,
    pub(super) seconds: f64,
}

/// Evaluates an LCM-sampled student (consistency, distribution matching) and the teacher (DDIM)
/// at each of `--eval-steps`, and the teacher at `--reference-steps`; prints the table, writes
/// report.{json,csv}.
pub(super) fn lcm_report(r: LcmReport<'_>, student: &Path, device: &Device) -> Result<()> {
    let (extractor, reference, num) = r.common.reference(r.data, device)?;
    let mut ev = Evaluator::new(&extractor, &reference, num, r.guidance_scale, device);
    let rs = r.reference_steps;
    let teacher_ref = ev.eval(r.teacher, Algorithm::Ddim, rs)?;
    let mut table = format!(
        "FID vs steps ({num} samples per entry, {} features, reference {}); teacher @ {rs} DDIM steps: {:.3}\n  steps | teacher (DDIM) | student (LCM) | student / teacher@{rs}\n",
        extractor.id(),
        reference.protocol["dataset"].as_str().unwrap_or("images"),
        teacher_ref.fid
    );
    let mut csv = String::from(
        "steps,student_fid,student_kid,teacher_fid_at_steps,teacher_fid_at_reference,reference_steps\n",
    );
    let mut rows = Vec::new();
    for &n in r.eval_steps {
        let t = ev.eval(r.teacher, Algorithm::Ddim, n)?;
        let s = ev.eval(student, Algorithm::Lcm, n)?;
        table += &format!(
            "  {n:>5} | {:>14.3} | {:>13.3} | {:>8.3}\n",
            t.fid,
            s.fid,
            s.fid / teacher_ref.fid
        );
        let kid = s.kid.map_or(f64::NAN, |k| k.mean);
        csv += &format!(
            "{n},{:.6},{kid:.6},{:.6},{:.6},{rs}\n",
            s.fid, t.fid, teacher_ref.fid
        );
        rows.push(json!({ "steps": n, "student": s, "teacher_at_steps": t }));
    }
    print!("{table}");
    let protocol = json!({
        "extractor": extractor.id(),
        "reference": reference.protocol,
        "num_samples": num,
        "seed": 0,
        "student_scheduler": "lcm",
        "teacher_scheduler": "ddim",
    });
    io::write_json(
        &r.out.join("report.json"),
        &json!({
            "protocol": protocol,
            "config": r.config,
            "teacher": r.teacher,
            "teacher_at_reference": { "steps": rs, "scores": teacher_ref },
            "final_loss": r.final_loss,
            "seconds": r.seconds,
            "steps": rows,
        }),
    )?;
    io::write_atomic(&r.out.join("report.csv"), csv.as_bytes())?;
    eprintln!("wrote {}/report.{{json,csv}}", r.out.display());
    Ok(())
}

/// The FID table of a consistency student.
fn consistency_report(
    args: &ConsistencyArgs,
    run: &ConsistencyRun,
    outcome: &ConsistencyOutcome,
    student: &Path,
    device: &Device,
) -> Result<()> {
    lcm_report(
        LcmReport {
            common: &args.common,
            out: &args.out,
            eval_steps: &args.eval_steps,
            reference_steps: args.reference_steps(),
            teacher: &run.teacher,
            data: &run.data,
            // A w-conditioned student is evaluated at the middle of its range.
            guidance_scale: run.config.guidance.map(|g| 1.0 + (g.min + g.max) / 2.0),
            config: serde_json::to_value(&run.config).expect("config serialises"),
            final_loss: outcome.final_loss,
            seconds: outcome.seconds,
        },
        student,
        device,
    )
}

fn run_consistency(args: ConsistencyArgs) -> Result<()> {
    let devices = args.common.data_parallel.devices(&args.common.device)?;
    let device = devices[0].clone();
    if let Some(&bad) = args.eval_steps.iter().find(|&&n| n == 0 || n > args.scales) {
        return Err(Error::Usage(format!(
            "--eval-steps {bad}: expected 1 to --scales ({})",
            args.scales
        )));
    }
    if args.lora_rank.is_none()
        && (args.lora_alpha.is_some() || args.lora_convs || args.lora_linears)
    {
        return Err(Error::Usage(
            "--lora-alpha, --lora-convs and --lora-linears need --lora-rank".into(),
        ));
    }
    let run = if args.common.resume {
        super::warn_flags_on_resume(&["--iters"]);
        None
    } else {
        let (teacher, data) = args.common.teacher_and_data()?;
        let config = args.config()?;
        config.validate()?;
        Some(ConsistencyRun {
            kind: CONSISTENCY_RUN.into(),
            teacher,
            init: args.common.init()?,
            config,
            data,
        })
    };
    let folder =
        args.common
            .data_parallel
            .join("distill consistency", &args.out, args.common.resume)?;
    if args.common.resume
        && let Some(iters) = args.iters
    {
        consistency::extend_run(folder.path(), iters)?;
    }
    train::install_interrupt_handler();
    let outcome = consistency::distill_consistency(
        folder.path(),
        run,
        args.common.resume,
        &devices,
        args.common.quiet || !folder.is_main(),
    )?;
    if !folder.is_main() {
        return Ok(());
    }
    folder.report_overhead(args.common.quiet);
    let Some(student) = &outcome.student else {
        eprintln!(
            "interrupted; resume with: fewstep distill consistency --out {} --resume",
            args.out.display()
        );
        return Ok(());
    };
    eprintln!(
        "{}: final loss {:.5}, {:.0} s",
        student.display(),
        outcome.final_loss,
        outcome.seconds
    );
    if args.common.no_eval {
        return Ok(());
    }
    let run: ConsistencyRun = checkpoint::read_run_as(&args.out, CONSISTENCY_RUN)?;
    if let Some(hint) = text_teacher_eval_hint(&run.teacher, student) {
        eprintln!("{hint}");
        return Ok(());
    }
    consistency_report(&args, &run, &outcome, student, &device)
}

/// For a text-to-image teacher, the commands that evaluate it and its student (FID and prompt
/// adherence over steps and guidance scales); the built-in table covers unconditional and
/// class-conditional teachers.
fn text_teacher_eval_hint(teacher: &Path, student: &Path) -> Option<String> {
    let index = io::read_text(&teacher.join("model_index.json")).ok()?;
    let index: serde_json::Value = serde_json::from_str(&index).ok()?;
    index.get("text_encoder")?;
    Some(format!(
        "text-to-image teacher: evaluate FID and prompt adherence with\n  fewstep eval curve --model {} --scheduler ddim --steps 50 --guidance-scales 1,2,4,7.5 --out runs/eval-teacher\n  fewstep eval curve --model {} --steps 1,2,4,8 --guidance-scale 1 --out runs/eval-student",
        teacher.display(),
        student.display()
    ))
}

pub fn run(command: DistillCommand) -> Result<()> {
    match command {
        DistillCommand::Progressive(args) => run_progressive(args),
        DistillCommand::Consistency(args) => run_consistency(args),
        DistillCommand::Gan(args) => super::gan::run_distill(args),
        DistillCommand::Dmd(args) => super::dmd::run(args),
    }
}
