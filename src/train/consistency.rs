//! The consistency-distillation loop (`distill::consistency`'s objective): the student starts as
//! a copy of the teacher, the target network as a copy of the student; each iteration draws
//! images, a training point of the skipping grid and noise per row, runs the frozen teacher's
//! solver step and the target network without gradients, takes an AdamW step on the student
//! (constant learning rate after a linear warm-up, as LCM) and moves the target network towards
//! the student at the curriculum's rate μ.
//!
//! Run folder: `run.json`, `loss.csv`, `checkpoints/{latest,previous}` (student, optimiser,
//! target network in `state/target.safetensors`, optional evaluation EMA as the pipeline's
//! weights), and `student/` at the end: a diffusers pipeline folder with an `LCMScheduler` config
//! (`original_inference_steps` = the final number of scales) that samples in 1, 2, 4 … steps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use fewstep_schedulers::{Algorithm, Prediction, SchedulerConfig};
use serde_json::json;

use super::progressive::student_prediction;
use super::run_loop::{IterReport, LoopSpec, run_loop};
use super::teacher_conditioning::TeacherConditioning;
use super::timesteps::{SpanDraw, TimestepSampling};
use super::{checkpoint, data_parallel, ema, open_images};
use crate::data::{DataSource, TrainImages};
use crate::distill::consistency::{
    AdversarialSpec, At, ConsistencyStep, Curriculum, DiscriminatorBackbone, Distance, HEAD_WIDTH,
    Solver, adversarial_discriminator_loss, adversarial_generator_loss, consistency_output,
    discriminator_logits, distance, noised, skipping_grid, teacher_solver_step,
};
use crate::distill::gan::GanLoss;
use crate::error::{Error, Result};
use crate::io;
use crate::models::feature_heads::{ConsistencyDiscriminator, FeatureHeads};
use crate::models::gan::DiscriminatorConfig;
use crate::models::lora::{self, LoraFormat, LoraSpec};
use crate::models::quant::{QuantizationConfig, QuantizeSpec};
use crate::models::{Conditioning, UNet, UNetConfig};
use crate::noise::NoiseStream;
use crate::pipeline::{self, Pipeline};

/// The `run.json` kind of a consistency-distillation run.
pub const CONSISTENCY_RUN: &str = "distill-consistency";

/// The folder of the finished student inside the run folder.
pub const STUDENT_DIR: &str = "student";

/// The adapters of a LoRA run, in the run folder (PEFT/diffusers format).
pub const LORA_FILE: &str = "lora.safetensors";

/// Settings of a consistency-distillation run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConsistencyConfig {
    /// Number of scales N of the skipping grid at the end of the run (LCM: 50); also the written
    /// scheduler's `original_inference_steps`.
    pub scales: usize,
    /// N at the start of a doubling curriculum (`None`: N fixed).
    pub scales_start: Option<usize>,
    /// EMA rate μ of the target network (at the curriculum's start).
    pub target_ema: f32,
    /// `timestep_scaling` of the boundary scalings (LCM: 10).
    pub timestep_scaling: f32,
    pub distance: Distance,
    /// The teacher's ODE solver between grid points.
    #[serde(default)]
    pub solver: Solver,
    /// Classifier-free guidance of the teacher's target (class-conditional teachers): w per row
    /// from this range; a range (min < max) also conditions the student on w.
    pub guidance: Option<GuidanceRange>,
    pub iters: usize,
    pub batch: usize,
    /// Learning rate after the warm-up.
    pub lr: f64,
    pub warmup: usize,
    /// How the learning rate moves after the warm-up.
    #[serde(default)]
    pub lr_decay: LrDecay,
    /// How each row's grid point is drawn.
    #[serde(default)]
    pub timestep_sampling: TimestepSampling,
    pub optimizer: super::optim::OptimizerConfig,
    /// EMA decay of the written student (`None`: the raw student, as LCM).
    pub ema_decay: Option<f32>,
    pub seed: u64,
    pub checkpoint_every: usize,
    /// Train low-rank adapters on the frozen teacher instead of a full student (LCM-LoRA).
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    /// The key layout lora.safetensors is written in.
    #[serde(default)]
    pub lora_format: LoraFormat,
    /// Quantization-aware distillation: the student learns under fake-quantized weights and is
    /// written quantized (the teacher stays full precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<QuantizeSpec>,
    /// An adversarial term on the student's one-step samples, judged by heads on the frozen
    /// teacher's encoder (`distill::consistency::AdversarialSpec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adversarial: Option<AdversarialSpec>,
}

impl ConsistencyConfig {
    pub fn validate(&self) -> Result<()> {
        self.optimizer.validate()?;
        for (name, v) in [
            ("--iters", self.iters),
            ("--batch", self.batch),
            ("--checkpoint-every", self.checkpoint_every),
            ("--scales", self.scales),
        ] {
            if v == 0 {
                return Err(Error::Usage(format!("{name} must be at least 1")));
            }
        }
        if let Some(start) = self.scales_start
            && (start == 0 || start > self.scales)
        {
            return Err(Error::Usage(format!(
                "--scales-start {start}: expected 1 to --scales ({})",
                self.scales
            )));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::Usage(format!(
                "--lr must be a positive number, got {}",
                self.lr
            )));
        }
        if !(0.0..1.0).contains(&self.target_ema) {
            return Err(Error::Usage(format!(
                "--target-ema {}: expected a rate in [0, 1)",
                self.target_ema
            )));
        }
        if let Some(decay) = self.ema_decay {
            ema::check_decay(decay)?;
        }
        if !(self.timestep_scaling > 0.0 && self.timestep_scaling.is_finite()) {
            return Err(Error::Usage(format!(
                "--timestep-scaling {}: expected a positive number",
                self.timestep_scaling
            )));
        }
        if let Distance::PseudoHuber { c } = self.distance
            && !(c > 0.0 && c.is_finite())
        {
            return Err(Error::Usage(format!(
                "--huber-c {c}: expected a positive number"
            )));
        }
        if let Some(a) = self.adversarial {
            if !(a.weight > 0.0 && a.weight.is_finite()) {
                return Err(Error::Usage(format!(
                    "--adversarial {}: expected a positive weight",
                    a.weight
                )));
            }
            if !(a.lr > 0.0 && a.lr.is_finite()) {
                return Err(Error::Usage(format!(
                    "--adversarial-lr {}: expected a positive number",
                    a.lr
                )));
            }
        }
        if let Some(spec) = &self.lora {
            spec.validate()?;
            if self.quantize.is_some() {
                return Err(Error::Usage(
                    "--quantize with --lora-rank: quantize the merged student instead (`fewstep lora merge`, then `fewstep quantize`)".into(),
                ));
            }
        }
        if let Some(g) = self.guidance
            && !(g.min >= 0.0 && g.min <= g.max && g.max.is_finite())
        {
            return Err(Error::Usage(format!(
                "--guidance {},{}: expected scales of 0 or more, the first not above the second",
                g.min, g.max
            )));
        }
        Ok(())
    }

    pub fn curriculum(&self) -> Curriculum {
        Curriculum {
            scales_start: self.scales_start.unwrap_or(self.scales),
            scales_end: self.scales,
            target_ema: self.target_ema,
            iters: self.iters,
        }
    }

    /// Learning rate at `iter`: linear warm-up, then `lr_decay`.
    pub fn lr_at(&self, iter: usize) -> f64 {
        let decay = match self.lr_decay {
            LrDecay::Constant => 1.0,
            LrDecay::Cosine => {
                // From 1 at the end of the warm-up to 0 after the last iteration.
                let span = self.iters.saturating_sub(self.warmup).max(1) as f64;
                super::half_cosine(iter.saturating_sub(self.warmup) as f64 / span)
            }
        };
        self.lr * super::warmup_factor(iter, self.warmup) * decay
    }
}

/// The learning rate after the warm-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrDecay {
    /// Constant (LCM, CD).
    #[default]
    Constant,
    /// Half a cosine from the peak to 0 over the iterations after the warm-up.
    Cosine,
}

/// The span of each point of `grid` (lowest timestep first): from its ᾱ_{n−1} to its ᾱ_n.
fn grid_spans(grid: &[ConsistencyStep]) -> Vec<(f64, f64)> {
    grid.iter()
        .map(|g| (g.alpha_bar_prev, g.alpha_bar_t))
        .collect()
}

/// The classifier-free guidance scales w a run draws from (uniformly, per row).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GuidanceRange {
    pub min: f32,
    pub max: f32,
}

impl GuidanceRange {
    /// `n` scales drawn uniformly from the range (one per batch row).
    pub fn draw(&self, rng: &mut NoiseStream, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| self.min + (self.max - self.min) * rng.uniform() as f32)
            .collect()
    }

    /// Whether the student is conditioned on w (a range, not a single scale).
    pub fn conditions_student(&self) -> bool {
        self.min < self.max
    }
}

/// Width of the guidance-scale embedding of a w-conditioned student (LCM's
/// `time_cond_proj_dim`).
pub const GUIDANCE_EMBEDDING_DIM: usize = 256;

/// The student's UNet config: the teacher's, with a guidance-scale embedding when the run
/// conditions the student on w.
pub fn student_unet_config(teacher: &UNetConfig, cfg: &ConsistencyConfig) -> UNetConfig {
    let mut c = teacher.clone();
    c.quantization_config = cfg.quantize.map(|q| QuantizationConfig::new(q.format));
    if cfg.guidance.is_some_and(|g| g.conditions_student()) {
        c.time_cond_proj_dim = Some(GUIDANCE_EMBEDDING_DIM);
    }
    c
}

/// Everything that defines a consistency run (stored as `run.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConsistencyRun {
    pub kind: String,
    /// The teacher's pipeline folder (absolute).
    pub teacher: PathBuf,
    /// The pipeline folder whose UNet the student starts from (absolute; default: the
    /// teacher's) — an f32 student, for quantization-aware fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    pub config: ConsistencyConfig,
    pub data: DataSource,
}

/// What a consistency run reports.
#[derive(Debug, Clone)]
pub struct ConsistencyOutcome {
    /// The student's pipeline folder (absent when interrupted).
    pub student: Option<PathBuf>,
    pub final_loss: f64,
    pub seconds: f64,
}

/// The student's prediction type: the teacher's for adapters (they are applied to the teacher
/// and sampled with its parameterisation), else v for an ε teacher as in progressive distillation.
pub fn consistency_prediction(teacher: &SchedulerConfig, cfg: &ConsistencyConfig) -> Prediction {
    let p = teacher.resolve(Algorithm::Lcm).prediction;
    match cfg.lora {
        Some(_) => p,
        None => student_prediction(p),
    }
}

/// The scheduler config written with the student: the teacher's noise schedule as an
/// `LCMScheduler` over the final skipping grid.
pub fn student_scheduler(teacher: &SchedulerConfig, cfg: &ConsistencyConfig) -> SchedulerConfig {
    let mut s = teacher.clone();
    s.class = Some(Algorithm::Lcm);
    s.prediction_type = Some(consistency_prediction(teacher, cfg));
    s.original_inference_steps = Some(cfg.scales);
    s.timestep_scaling = Some(cfg.timestep_scaling);
    s.distilled_steps = None;
    s
}

fn new_optimizer(cfg: &ConsistencyConfig) -> ModuleOptimizer {
    cfg.optimizer.init()
}

/// A trainable student on `device` (an autodiff device): the teacher's UNet, with adapters
/// attached for a LoRA run, fake quantization for a quantization-aware one.
fn trainable(unet: UNet, cfg: &ConsistencyConfig) -> Result<UNet> {
    match (&cfg.lora, &cfg.quantize) {
        (Some(spec), _) => lora::attach(unet, spec),
        (None, Some(q)) => q.attach(unet),
        (None, None) => Ok(unet),
    }
}

/// The weights written as a pipeline: the EMA copy or the student, adapters merged; fake
/// quantization kept (the writer quantizes at its scales).
fn written(state: &State, cfg: &ConsistencyConfig) -> UNet {
    let unet = state.ema.clone().unwrap_or_else(|| state.student.valid());
    if cfg.quantize.is_some() {
        unet
    } else {
        unet.materialize()
    }
}

struct State {
    student: UNet,
    target: UNet,
    ema: Option<UNet>,
    optim: ModuleOptimizer,
    discriminator: Option<Discriminator>,
}

/// An adversarial run's discriminator and its optimiser.
struct Discriminator {
    net: ConsistencyDiscriminator,
    optim: ModuleOptimizer,
}

impl Discriminator {
    /// A fresh discriminator for `teacher` on `device` (an autodiff device), initialised from
    /// `seed`.
    fn new(teacher: &UNet, spec: &AdversarialSpec, seed: u64, device: &Device) -> Self {
        device.seed(seed);
        let net = match spec.backbone {
            DiscriminatorBackbone::TeacherFeatures => ConsistencyDiscriminator {
                heads: Some(FeatureHeads::new(
                    &teacher.encoder_channels(),
                    HEAD_WIDTH,
                    device,
                )),
                pixels: None,
            },
            DiscriminatorBackbone::Pixels => ConsistencyDiscriminator {
                heads: None,
                pixels: Some(DiscriminatorConfig::shapes32().init(device)),
            },
        };
        Discriminator {
            net,
            optim: discriminator_optimizer(),
        }
    }
}

/// The discriminator heads' optimiser: Adam with β₁ = 0.5, the usual GAN setting.
fn discriminator_optimizer() -> ModuleOptimizer {
    super::optim::OptimizerConfig::adam((0.5, 0.999)).init()
}

const TARGET_WEIGHTS: &str = "target.safetensors";
const EMA_WEIGHTS: &str = "ema.safetensors";
/// The discriminator's training state inside a checkpoint (`discriminator/state/`).
const DISCRIMINATOR_DIR: &str = "discriminator";

fn save_checkpoint(
    run_dir: &Path,
    teacher: &Pipeline,
    unet_config: &UNetConfig,
    scheduler: &SchedulerConfig,
    state: &State,
    cfg: &ConsistencyConfig,
    iter: usize,
) -> Result<()> {
    let dir = checkpoint::incoming(run_dir)?;
    let ema = state.ema.clone();
    pipeline::save_pipeline(
        &dir,
        unet_config,
        &written(state, cfg),
        scheduler,
        Algorithm::Lcm,
        teacher.vae.as_ref().map(|(c, v)| (c, v)),
        teacher.text.as_ref(),
    )?;
    checkpoint::write_state(&dir, &state.student, &state.optim, &json!({ "iter": iter }))?;
    io::save_weights(&state.target, &dir.join("state").join(TARGET_WEIGHTS))?;
    if let Some(ema) = ema {
        io::save_weights(&ema, &dir.join("state").join(EMA_WEIGHTS))?;
    }
    if let Some(d) = &state.discriminator {
        checkpoint::write_state(
            &dir.join(DISCRIMINATOR_DIR),
            &d.net,
            &d.optim,
            &json!({ "iter": iter }),
        )?;
    }
    checkpoint::publish(run_dir).map(|_| ())
}

fn load_checkpoint(
    run_dir: &Path,
    unet_config: &UNetConfig,
    cfg: &ConsistencyConfig,
    teacher: &UNet,
    device: &Device,
) -> Result<Option<(State, usize)>> {
    let Some(ckpt) = checkpoint::latest(run_dir) else {
        return Ok(None);
    };
    let ad = device.clone().autodiff();
    let fresh = |d: &Device| trainable(unet_config.init(d), cfg);
    let st = checkpoint::read_state(&ckpt, fresh(&ad)?, new_optimizer(cfg))?;
    let iter = st.progress["iter"]
        .as_u64()
        .ok_or_else(|| Error::file(ckpt.join("state/state.json"), "no `iter`"))?
        as usize;
    let target = io::load_weights_with_ids(
        fresh(device)?,
        &ckpt.join("state").join(TARGET_WEIGHTS),
        Some(&st.ids),
    )?;
    let ema = match cfg.ema_decay {
        Some(_) => Some(io::load_weights_with_ids(
            fresh(device)?,
            &ckpt.join("state").join(EMA_WEIGHTS),
            Some(&st.ids),
        )?),
        None => None,
    };
    let discriminator = match cfg.adversarial {
        Some(a) => {
            let fresh = Discriminator::new(teacher, &a, cfg.seed, &ad);
            let ds = checkpoint::read_state(&ckpt.join(DISCRIMINATOR_DIR), fresh.net, fresh.optim)?;
            Some(Discriminator {
                net: ds.model,
                optim: ds.optim,
            })
        }
        None => None,
    };
    Ok(Some((
        State {
            student: st.model,
            target,
            ema,
            optim: st.optim,
            discriminator,
        },
        iter,
    )))
}

/// One iteration's rows: noised samples at their training points, conditioning, guidance
/// scales.
struct Batch {
    z: Tensor<4>,
    steps: Vec<ConsistencyStep>,
    cond: Conditioning,
    w: Vec<f32>,
    adversarial: Option<AdversarialRows>,
}

/// An adversarial run's rows: the student's one-step samples start from `noise`; the real
/// images `x0` (the batch's) and those samples are re-noised with `eps` to each row's `t`.
struct AdversarialRows {
    x0: Tensor<4>,
    noise: Tensor<4>,
    eps: Tensor<4>,
    t: Vec<i64>,
    alpha_bar: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn draw_batch(
    teacher: &Pipeline,
    images: &TrainImages,
    conditioning: &TeacherConditioning,
    grid: &[ConsistencyStep],
    alpha_bars: &[f64],
    cfg: &ConsistencyConfig,
    iter: usize,
    device: &Device,
) -> Result<Batch> {
    let mut rng = NoiseStream::for_step(cfg.seed, iter as u64);
    // Order of draws: images, grid points, noise, guidance scales, caption wording, then an
    // adversarial run's sampling noise, re-noising noise and timesteps (fixed: resume relies
    // on it).
    let (x, labels, rows) = images.random_rows(&mut rng, cfg.batch, device);
    let spans = SpanDraw::new(cfg.timestep_sampling, &grid_spans(grid));
    let steps: Vec<ConsistencyStep> = (0..cfg.batch).map(|_| grid[spans.draw(&mut rng)]).collect();
    let x0 = super::model_space(teacher, x);
    let eps = crate::sample::host_noise(&mut rng, x0.dims(), device);
    let w = cfg
        .guidance
        .map_or_else(Vec::new, |g| g.draw(&mut rng, cfg.batch));
    let cond = conditioning.batch(teacher, labels, &rows, &mut rng, device)?;
    let adversarial = cfg.adversarial.map(|a| {
        let noise = crate::sample::host_noise(&mut rng, x0.dims(), device);
        let eps = crate::sample::host_noise(&mut rng, x0.dims(), device);
        let t: Vec<i64> = (0..cfg.batch)
            .map(|_| rng.below(a.max_t as u64 + 1) as i64)
            .collect();
        AdversarialRows {
            x0: x0.clone(),
            noise,
            eps,
            alpha_bar: t.iter().map(|&t| alpha_bars[t as usize]).collect(),
            t,
        }
    });
    Ok(Batch {
        z: noised(x0, eps, &steps),
        steps,
        cond,
        w,
        adversarial,
    })
}

/// Raises a stored run's iterations to `iters` (`--resume --iters N`): the run continues from
/// its latest checkpoint to the new total, a finished one included, and rewrites its student (and
/// LoRA file). Learning-rate decay and the scale curriculum are stretched to the new total.
pub fn extend_run(run_dir: &Path, iters: usize) -> Result<()> {
    checkpoint::extend_run(
        run_dir,
        CONSISTENCY_RUN,
        iters,
        |run: &mut ConsistencyRun, n| {
            run.config.iters = n;
            run.config.validate()
        },
    )
}

/// Runs (or resumes) consistency distillation in `run_dir`; data-parallel over `devices` when
/// there are several (the first holds the models and the data).
pub fn distill_consistency(
    run_dir: &Path,
    run: Option<ConsistencyRun>,
    resume: bool,
    devices: &[Device],
    quiet: bool,
) -> Result<ConsistencyOutcome> {
    let device = devices
        .first()
        .ok_or_else(|| Error::Usage("--devices: give at least one device".into()))?;
    let run = match (resume, run) {
        (true, _) => checkpoint::read_run_as::<ConsistencyRun>(run_dir, CONSISTENCY_RUN)?,
        (false, None) => return Err(Error::Usage("nothing to distill: give a teacher".into())),
        (false, Some(run)) => run,
    };
    let cfg = &run.config;
    let student_dir = run_dir.join(STUDENT_DIR);
    // A finished run returns its student, unless `extend_run` raised its iterations since.
    if resume && let Some((final_loss, seconds)) = super::finished_student(&student_dir, cfg.iters)
    {
        return Ok(ConsistencyOutcome {
            student: Some(student_dir),
            final_loss,
            seconds,
        });
    }
    // Everything is checked against the teacher before a new run folder is made.
    cfg.validate()?;
    let teacher = Pipeline::load(&run.teacher, device)?;
    let teachers = data_parallel::replicate(&teacher.unet, devices);
    // The teacher-feature distance and the adversarial term backpropagate through the frozen
    // teacher: one copy per device on its autodiff side, its weights out of the gradient.
    let feature_nets: Vec<UNet> = if cfg.distance == Distance::TeacherFeatures
        || cfg
            .adversarial
            .is_some_and(|a| a.backbone == DiscriminatorBackbone::TeacherFeatures)
    {
        data_parallel::frozen_through(&teacher.unet, device, devices)
    } else {
        Vec::new()
    };
    let schedule = teacher
        .scheduler
        .noise_schedule(Algorithm::Lcm)
        .map_err(|e| Error::file(&run.teacher, e.0))?;
    let alpha_bars: Vec<f64> = (0..schedule.num_train_timesteps())
        .map(|t| schedule.alpha_bar(t) as f64)
        .collect();
    if let Some(a) = cfg.adversarial
        && a.backbone == DiscriminatorBackbone::Pixels
    {
        let (c, size) = (teacher.unet_config.in_channels, super::image_size(&teacher));
        if c != 3 || size != 32 {
            return Err(Error::Usage(format!(
                "--adversarial-backbone pixels: expected a teacher on 3-channel 32×32 images, {} is {c}-channel {size}×{size} (use teacher-features)",
                run.teacher.display()
            )));
        }
    }
    if let Some(a) = cfg.adversarial
        && a.max_t >= alpha_bars.len()
    {
        return Err(Error::Usage(format!(
            "--adversarial-max-t {}: expected a timestep below the teacher's num_train_timesteps ({})",
            a.max_t,
            alpha_bars.len()
        )));
    }
    let teacher_prediction = teacher.scheduler.resolve(Algorithm::Lcm).prediction;
    let prediction = consistency_prediction(&teacher.scheduler, cfg);
    let scheduler = student_scheduler(&teacher.scheduler, cfg);
    let mut unet_config = student_unet_config(&teacher.unet_config, cfg);
    // A student wider than the teacher (`fewstep widen`) keeps its width.
    if let Some(init) = &run.init
        && let Some(wide) = super::wider_student(&unet_config, init)?
    {
        if cfg.lora.is_some() {
            return Err(Error::file(
                init,
                "--init: wider than the teacher, but --lora-rank trains adapters for the teacher itself (drop --lora-rank for a wider full student)",
            ));
        }
        unet_config = wide;
    }
    let conditioned = cfg.guidance.is_some_and(|g| g.conditions_student());
    let curriculum = cfg.curriculum();
    let mut grids: HashMap<usize, Vec<ConsistencyStep>> = HashMap::new();
    for n in (0..cfg.iters).map(|k| curriculum.scales_at(k)) {
        if let std::collections::hash_map::Entry::Vacant(e) = grids.entry(n) {
            e.insert(
                skipping_grid(&teacher.scheduler, n, cfg.timestep_scaling as f64)
                    .map_err(|e| Error::Usage(e.0))?,
            );
        }
    }
    let images = open_images(
        &run.data,
        super::image_size(&teacher),
        teacher.unet.num_classes(),
    )?;
    let conditioning = TeacherConditioning::new(&teacher, &images, device)?;
    if cfg.guidance.is_some() && !conditioning.guidable() {
        return Err(Error::Usage(format!(
            "--guidance needs a class-conditional or text-to-image teacher; {} is unconditional",
            run.teacher.display()
        )));
    }
    if !resume {
        checkpoint::prepare_new_run(run_dir)?;
        io::write_json(
            &run_dir.join(checkpoint::RUN_FILE),
            &serde_json::to_value(&run).expect("run serialises"),
        )?;
    }
    let (state, start) = match load_checkpoint(run_dir, &unet_config, cfg, &teacher.unet, device)? {
        Some(s) => s,
        None => {
            let ad = device.clone().autodiff();
            let init = run.init.as_ref().unwrap_or(&run.teacher);
            let (init_config, student) = pipeline::load_unet(&init.join("unet"), &ad)?;
            if student_unet_config(&init_config, cfg) != unet_config {
                return Err(Error::file(
                    init,
                    "--init: its UNet config differs from the teacher's: the student must have the teacher's architecture, or a wider one (`fewstep widen`)",
                ));
            }
            let mut student = crate::models::quant::trainable_weights(student);
            if conditioned && init_config.time_cond_proj_dim.is_none() {
                // The teacher's weights and a zero guidance embedding: the student starts as
                // the teacher.
                student.time_embedding.cond_proj = unet_config.init(&ad).time_embedding.cond_proj;
            }
            let student = trainable(student, cfg)?;
            (
                State {
                    target: student.valid(),
                    ema: cfg.ema_decay.map(|_| student.valid()),
                    student,
                    optim: new_optimizer(cfg),
                    discriminator: cfg
                        .adversarial
                        .map(|a| Discriminator::new(&teacher.unet, &a, cfg.seed, &ad)),
                },
                0,
            )
        }
    };
    // Quantization-aware fine-tuning from a full-precision student: that student, frozen, whose
    // outputs the quantized one is also tied to.
    let anchors = match (&run.init, cfg.quantize) {
        (Some(init), Some(q)) if q.anchor > 0.0 => {
            let (_, unet) = pipeline::load_unet(&init.join("unet"), device)?;
            Some(data_parallel::replicate(
                &crate::models::quant::trainable_weights(unet),
                devices,
            ))
        }
        _ => None,
    };
    if !quiet {
        eprintln!(
            "consistency distillation of {} ({} scales{}, {} iterations of batch {})",
            run.teacher.display(),
            cfg.scales,
            cfg.guidance.map_or(String::new(), |g| format!(
                ", guidance w in [{}, {}]",
                g.min, g.max
            )),
            cfg.iters,
            cfg.batch
        );
    }
    let csv_path = run_dir.join("loss.csv");
    let spec = LoopSpec {
        name: "consistency",
        iters: cfg.iters,
        first_global: 0,
        checkpoint_every: cfg.checkpoint_every,
        csv_path: &csv_path,
        quiet,
    };
    let (state, end) = run_loop(
        &spec,
        start,
        state,
        |mut state, iter| {
            let grid = &grids[&curriculum.scales_at(iter)];
            let b = draw_batch(
                &teacher,
                &images,
                &conditioning,
                grid,
                &alpha_bars,
                cfg,
                iter,
                device,
            )?;
            let targets = data_parallel::replicate(&state.target, devices);
            // One-step samples start at the grid's highest timestep, as the LCM sampler's one
            // step does.
            let top = *grid.last().expect("a grid has at least one scale");
            let judges: Vec<ConsistencyDiscriminator> =
                state.discriminator.as_ref().map_or_else(Vec::new, |d| {
                    data_parallel::frozen_through(&d.net.valid(), device, devices)
                });
            let (value, grads) = data_parallel::loss_and_grads(
                &state.student,
                devices,
                cfg.batch,
                |student, shard| {
                    let (z, steps) = (shard.take(&b.z), shard.take_list(&b.steps));
                    let cond = shard.take_conditioning(&b.cond);
                    let w = if b.w.is_empty() {
                        Vec::new()
                    } else {
                        shard.take_list(&b.w)
                    };
                    let uncond = cfg
                        .guidance
                        .and_then(|_| conditioning.uncond(shard.rows.len(), &z.device()));
                    let guidance = uncond.as_ref().map(|u| (w.as_slice(), u));
                    let student_w = conditioned.then_some(w.as_slice());
                    let x_prev = teacher_solver_step(
                        &teachers[shard.index],
                        teacher_prediction,
                        z.clone(),
                        &steps,
                        &cond,
                        guidance,
                        cfg.solver,
                    );
                    let target = consistency_output(
                        &targets[shard.index],
                        prediction,
                        x_prev,
                        &steps,
                        At::Prev,
                        &cond,
                        student_w,
                    );
                    let anchor = anchors.as_ref().map(|a| {
                        consistency_output(
                            &a[shard.index],
                            prediction,
                            z.clone(),
                            &steps,
                            At::Start,
                            &cond,
                            student_w,
                        )
                    });
                    // The teacher and target ran without autodiff; the student trains with it.
                    let ad_cond = cond.autodiff();
                    let online = consistency_output(
                        student,
                        prediction,
                        z.autodiff(),
                        &steps,
                        At::Start,
                        &ad_cond,
                        student_w,
                    );
                    let features = feature_nets.get(shard.index).map(|net| (net, &ad_cond));
                    let loss = distance(online.clone(), target.autodiff(), cfg.distance, features);
                    let loss = match (anchor, cfg.quantize) {
                        (Some(anchor), Some(q)) => (loss
                            + distance(online, anchor.autodiff(), cfg.distance, features)
                                .mul_scalar(q.anchor))
                        .mean(),
                        _ => loss.mean(),
                    };
                    match (cfg.adversarial, &b.adversarial) {
                        // The student's term on its one-step samples. (The pixel
                        // discriminator's minibatch statistic is over this shard's rows.)
                        (Some(a), Some(rows)) if iter >= a.start => {
                            let fake = consistency_output(
                                student,
                                prediction,
                                shard.take(&rows.noise).autodiff(),
                                &vec![top; shard.rows.len()],
                                At::Start,
                                &ad_cond,
                                student_w,
                            );
                            let logits = discriminator_logits(
                                feature_nets.get(shard.index),
                                &judges[shard.index],
                                fake,
                                shard.take(&rows.eps).autodiff(),
                                &shard.take_list(&rows.t),
                                &shard.take_list(&rows.alpha_bar),
                                &ad_cond,
                            );
                            loss + adversarial_generator_loss(GanLoss::Hinge, logits)
                                .mul_scalar(a.weight)
                        }
                        _ => loss,
                    }
                },
            )?;
            let lr = cfg.lr_at(iter);
            state.student = state.optim.step(lr, state.student, grads);
            let inner = state.student.valid();
            state.target = ema::update(state.target, &inner, curriculum.target_ema_at(iter));
            if let (Some(decay), Some(e)) = (cfg.ema_decay, state.ema.take()) {
                state.ema = Some(ema::update(e, &inner, ema::decay_at(iter, decay)));
            }
            let mut note = String::new();
            if let (Some(a), Some(rows), Some(d)) =
                (cfg.adversarial, &b.adversarial, state.discriminator.take())
            {
                // The discriminator's step: the training images against the updated student's
                // one-step samples from the same noise the student's step saw.
                let w = conditioned.then_some(b.w.as_slice());
                let fake = consistency_output(
                    &inner,
                    prediction,
                    rows.noise.clone(),
                    &vec![top; cfg.batch],
                    At::Start,
                    &b.cond,
                    w,
                );
                // The frozen teacher on the main device's autodiff side (nothing below it
                // requires a gradient, so the backward pass stops at the discriminator). Real
                // and generated rows in separate passes (the minibatch statistic of the pixel
                // discriminator must not mix them).
                let logits = |x: Tensor<4>| {
                    discriminator_logits(
                        feature_nets.first(),
                        &d.net,
                        x.autodiff(),
                        rows.eps.clone().autodiff(),
                        &rows.t,
                        &rows.alpha_bar,
                        &b.cond.clone().autodiff(),
                    )
                };
                let d_loss = adversarial_discriminator_loss(
                    GanLoss::Hinge,
                    logits(rows.x0.clone()),
                    logits(fake),
                );
                let d_value: f32 = d_loss.clone().into_scalar::<f32>();
                let grads = GradientsParams::from_grads(d_loss.backward(), &d.net);
                let Discriminator { net, mut optim } = d;
                let net = optim.step(a.lr, net, grads).power_iteration();
                state.discriminator = Some(Discriminator { net, optim });
                note = format!(" | D {d_value:.3}");
            }
            Ok((
                state,
                IterReport {
                    loss: value,
                    lr,
                    note,
                },
            ))
        },
        |state, done| {
            save_checkpoint(
                run_dir,
                &teacher,
                &unet_config,
                &scheduler,
                state,
                cfg,
                done,
            )
        },
    )?;
    let Some((final_loss, seconds)) = end.finished() else {
        return Ok(ConsistencyOutcome {
            student: None,
            final_loss: f64::NAN,
            seconds: f64::NAN,
        });
    };
    if let Some(spec) = &cfg.lora {
        let adapters = state.ema.clone().unwrap_or_else(|| state.student.valid());
        lora::lora_file(
            &run_dir.join(LORA_FILE),
            &adapters,
            spec,
            Some(&scheduler.to_json(Algorithm::Lcm)),
            cfg.lora_format,
            teacher.text.is_some(),
        )?;
    }
    super::write_student(
        &student_dir,
        &teacher,
        super::Student {
            unet_config: &unet_config,
            unet: &written(&state, cfg),
            scheduler: &scheduler,
            algorithm: Algorithm::Lcm,
        },
        &json!({
            "method": "consistency",
            "teacher": run.teacher,
            "final_loss": final_loss,
            "seconds": seconds,
            "iters": cfg.iters,
            "scales": cfg.scales,
            "guidance": cfg.guidance,
        }),
    )?;
    Ok(ConsistencyOutcome {
        student: Some(student_dir),
        final_loss,
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(lr_decay: LrDecay) -> ConsistencyConfig {
        ConsistencyConfig {
            scales: 50,
            scales_start: None,
            target_ema: 0.95,
            timestep_scaling: 10.0,
            distance: Distance::L2,
            solver: Solver::Ddim,
            guidance: None,
            iters: 110,
            batch: 1,
            lr: 1e-3,
            warmup: 10,
            lr_decay,
            timestep_sampling: TimestepSampling::Uniform,
            optimizer: crate::train::optim::OptimizerConfig::distillation(),
            ema_decay: None,
            seed: 0,
            checkpoint_every: 10,
            lora: None,
            lora_format: LoraFormat::Peft,
            quantize: None,
            adversarial: None,
        }
    }

    #[test]
    fn log_normal_sampling_favours_the_middle_of_the_noise_range() {
        let sched = SchedulerConfig::from_map(
            serde_json::json!({
                "_class_name": "DDIMScheduler",
                "num_train_timesteps": 1000,
                "beta_schedule": "scaled_linear",
                "beta_start": 0.00085,
                "beta_end": 0.012,
            })
            .as_object()
            .unwrap(),
        )
        .unwrap();
        let grid = crate::distill::consistency::skipping_grid(&sched, 50, 10.0).unwrap();
        assert!(grid[0].t < grid[49].t, "lowest timestep first");
        let uniform = TimestepSampling::Uniform.weights(&grid_spans(&grid));
        assert!(uniform.iter().all(|w| (w - 0.02).abs() < 1e-12));
        let w = TimestepSampling::ICT.weights(&grid_spans(&grid));
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        // Low noise gets the rows (σ = e^−1.1 ≈ 0.33 is the density's mode in ln σ), and
        // the weights fall toward the highest noise.
        assert!(w[0] > 10.0 * w[49], "{w:?}");
        assert!(w[1..].windows(2).all(|p| p[0] >= p[1]), "{w:?}");
        assert!(w.iter().all(|&x| x > 0.0), "{w:?}");
        // Draws follow the weights.
        let picker = crate::train::timesteps::Picker::new(&w);
        assert_eq!(picker.pick(0.0), 0);
        assert_eq!(picker.pick(w[0] + 1e-9), 1);
        assert_eq!(picker.pick(0.999_999_999), w.len() - 1);
    }

    #[test]
    fn learning_rate_warms_up_then_holds_or_follows_half_a_cosine_to_zero() {
        let constant = config(LrDecay::Constant);
        let cosine = config(LrDecay::Cosine);
        for cfg in [&constant, &cosine] {
            assert!((cfg.lr_at(0) - 1e-4).abs() < 1e-12);
            assert!((cfg.lr_at(4) - 5e-4).abs() < 1e-12);
            assert!((cfg.lr_at(10) - 1e-3).abs() < 1e-12);
        }
        assert!((constant.lr_at(109) - 1e-3).abs() < 1e-12);
        // Halfway through the 100 iterations after the warm-up: half the peak.
        assert!((cosine.lr_at(60) - 5e-4).abs() < 1e-12);
        assert!(cosine.lr_at(109) < 1e-6 && cosine.lr_at(109) > 0.0);
        assert!((1..110).all(|i| i <= 10 || cosine.lr_at(i) < cosine.lr_at(i - 1)));
    }

    #[test]
    fn runs_stored_before_lr_decay_read_as_constant() {
        let mut json = serde_json::to_value(config(LrDecay::Cosine)).unwrap();
        json.as_object_mut().unwrap().remove("lr_decay");
        let read: ConsistencyConfig = serde_json::from_value(json).unwrap();
        assert_eq!(read.lr_decay, LrDecay::Constant);
    }
}
