//! The progressive-distillation loop: rounds of halving, each a fresh student initialised from
//! the current teacher, trained on `distill::progressive`'s objective with AdamW and a linearly
//! decaying learning rate (optimiser state reset every round, as in the paper), checkpointed
//! inside the round and written as a diffusers pipeline folder `round-<N>steps/` at its end.
//!
//! Run folder: `run.json` (teacher, settings, data), `loss.csv` (global iteration = round index ×
//! iterations per round + iteration), `checkpoints/{latest,previous}` (the round in progress),
//! `round-<N>steps/` (finished students). `--resume` continues from the last finished round and
//! the latest checkpoint of the round in progress, drawing exactly the batches an uninterrupted
//! run would.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use fewstep_schedulers::{Algorithm, Prediction, SchedulerConfig, TimestepSpacing};
use serde_json::json;

use super::consistency::{GUIDANCE_EMBEDDING_DIM, GuidanceRange};
use super::run_loop::{IterReport, LoopSpec, run_loop};
use super::teacher_conditioning::TeacherConditioning;
use super::{checkpoint, data_parallel, ema, open_images};
use crate::data::{DataSource, TrainImages};
use crate::distill::progressive::{
    Distance, StudentStep, guided_steps_target, guided_target, noised, progressive_loss,
    student_rollout, student_steps, teacher_target, x0_prediction,
};
use crate::error::{Error, Result};
use crate::io;
use crate::models::quant::{QuantizationConfig, QuantizeSpec};
use crate::models::{Conditioning, UNet, UNetConfig};
use crate::noise::NoiseStream;
use crate::pipeline::{self, Pipeline};

/// The `run.json` kind of a progressive-distillation run.
pub const PROGRESSIVE_RUN: &str = "distill-progressive";

/// The figures of a finished round, written beside its student.
pub const ROUND_RECORD: &str = super::DISTILL_RECORD;

/// Settings of a progressive-distillation run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProgressiveConfig {
    /// The teacher's step count; the first student samples in 1/`round_factor` as many.
    pub from_steps: usize,
    /// The last student's step count.
    pub to_steps: usize,
    /// Teacher DDIM steps per student step: each round divides the steps by it (2: the paper's
    /// halving; 8 distills a 32-step teacher into a 4-step student in one round).
    #[serde(default = "paper_round_factor")]
    pub round_factor: usize,
    pub iters_per_round: usize,
    pub batch: usize,
    /// Peak learning rate of each round (linear decay to 0 over the round).
    pub lr: f64,
    pub optimizer: super::optim::OptimizerConfig,
    /// EMA decay of the written student; `None` writes the raw weights (the paper uses none).
    pub ema_decay: Option<f32>,
    pub seed: u64,
    pub checkpoint_every: usize,
    /// Guided distillation (Meng et al. 2023): stage one distills the classifier-free guided
    /// teacher (w per row from this range) into a w-conditioned one-pass student sampled in
    /// `from_steps` (`round-<from>steps/`); the halving rounds then keep w as an input.
    #[serde(default)]
    pub guidance: Option<GuidanceRange>,
    /// Iterations of stage one (default: `iters_per_round`).
    #[serde(default)]
    pub guided_iters: Option<usize>,
    /// Stage one distills K steps of the guided teacher's `from_steps` sampler into one step
    /// of a w-conditioned student (`round-<from/K>steps/`, K = `round_factor`), the first round
    /// and the guidance in one stage, instead of a one-pass copy at `from_steps` that the rounds
    /// then divide.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guided_halving: bool,
    /// Quantization-aware distillation: each round's student learns under fake-quantized
    /// weights and is written quantized; a later round's student starts from those weights
    /// dequantized (the original teacher stays full precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<QuantizeSpec>,
    /// The fraction of each batch's rows noised along the student's own sampling trajectory
    /// (its DDIM sampler run from noise to the row's grid step, with the row's conditioning
    /// and w) instead of from data: the teacher is then fitted where the student samples.
    /// `None`: every row noised from data (the paper).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_fraction: Option<f32>,
    /// A cap on the loss weight max(SNR_t, 1) (min-SNR-γ); `None`: uncapped (the paper).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snr_weight_cap: Option<f64>,
    /// The distance between the student's x̂₀ and the teacher's x̃: L2 (the paper), or a
    /// perceptual one on the original teacher's encoder (whatever teacher a round learns from).
    #[serde(default, skip_serializing_if = "Distance::is_l2")]
    pub distance: Distance,
}

/// The paper's halving: two teacher steps per student step (`run.json`s written before
/// `round_factor` existed).
fn paper_round_factor() -> usize {
    2
}

/// One stretch of a progressive run: stage one of guided distillation, or a halving round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The guided teacher into a w-conditioned student: at the same step count, or with
    /// `halving` at 1/K of it (K guided teacher steps into one, K the round factor).
    Guided { steps: usize, halving: bool },
    /// K·N teacher steps into N student steps (K the round factor, 2 in the paper).
    Halving { steps: usize },
}

impl Stage {
    fn steps(self) -> usize {
        match self {
            Stage::Guided { steps, .. } | Stage::Halving { steps } => steps,
        }
    }

    /// The stage's name in the student's `distill.json`, `factor` being the round factor:
    /// "halving" for the paper's 2, "round" (K teacher steps into one) for any other.
    fn record_name(self, factor: usize) -> &'static str {
        match (self, factor == 2) {
            (Stage::Guided { halving: true, .. }, true) => "guided-halving",
            (Stage::Guided { halving: true, .. }, false) => "guided-round",
            (Stage::Guided { .. }, _) => "guided",
            (Stage::Halving { .. }, true) => "halving",
            (Stage::Halving { .. }, false) => "round",
        }
    }
}

impl ProgressiveConfig {
    /// Every stretch in order, with its iterations.
    fn stages(&self) -> Result<Vec<(Stage, usize)>> {
        let mut stages = Vec::new();
        let mut rounds = self.rounds()?.into_iter();
        if self.guidance.is_some() {
            let halving = self.guided_halving;
            let steps = if halving {
                rounds.next().expect("at least one round")
            } else {
                self.from_steps
            };
            stages.push((
                Stage::Guided { steps, halving },
                self.guided_iters.unwrap_or(self.iters_per_round),
            ));
        }
        stages.extend(rounds.map(|steps| (Stage::Halving { steps }, self.iters_per_round)));
        Ok(stages)
    }

    /// The students' step counts, from `from_steps / K` down to `to_steps`, each round dividing
    /// by the round factor K.
    pub fn rounds(&self) -> Result<Vec<usize>> {
        let (from, to, k) = (self.from_steps, self.to_steps, self.round_factor);
        if k < 2 {
            return Err(Error::Usage(format!(
                "--round-factor {k}: expected 2 or more teacher steps per student step"
            )));
        }
        if to == 0 {
            return Err(Error::Usage(format!(
                "--to-steps {to}: expected at least one step"
            )));
        }
        if to >= from {
            return Err(Error::Usage(format!(
                "--to-steps {to} must be below --from-steps {from}"
            )));
        }
        let mut rounds = Vec::new();
        let mut n = from;
        while n > to && n.is_multiple_of(k) {
            n /= k;
            rounds.push(n);
        }
        if n != to {
            let power = if k == 2 {
                "a power of two (each round halves the steps)".to_string()
            } else {
                format!("a power of {k} (--round-factor {k}: each round divides the steps by {k})")
            };
            return Err(Error::Usage(format!(
                "--from-steps {from}: expected --to-steps {to} times {power}"
            )));
        }
        Ok(rounds)
    }

    pub fn validate(&self) -> Result<()> {
        self.optimizer.validate()?;
        self.rounds()?;
        for (name, v) in [
            ("--iters-per-round", self.iters_per_round),
            ("--batch", self.batch),
            ("--checkpoint-every", self.checkpoint_every),
        ] {
            if v == 0 {
                return Err(Error::Usage(format!("{name} must be at least 1")));
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::Usage(format!(
                "--lr must be a positive number, got {}",
                self.lr
            )));
        }
        if let Some(decay) = self.ema_decay {
            super::ema::check_decay(decay)?;
        }
        if let Some(g) = self.guidance
            && !(g.min >= 0.0 && g.min <= g.max && g.max.is_finite())
        {
            return Err(Error::Usage(format!(
                "--guidance {},{}: expected scales of 0 or more, the first not above the second",
                g.min, g.max
            )));
        }
        if let Some(f) = self.rollout_fraction
            && !(f > 0.0 && f <= 1.0)
        {
            return Err(Error::Usage(format!(
                "--rollout-fraction {f}: expected a fraction above 0, at most 1"
            )));
        }
        if let Some(c) = self.snr_weight_cap
            && !(c >= 1.0 && c.is_finite())
        {
            return Err(Error::Usage(format!(
                "--snr-weight-cap {c}: expected a number of 1 or more (the weight is at least 1)"
            )));
        }
        if self.guided_iters == Some(0) {
            return Err(Error::Usage("--guided-iters must be at least 1".into()));
        }
        if self.guided_halving && self.guidance.is_none() {
            return Err(Error::Usage(
                "--guided-halving distills the guided teacher: give --guidance MIN,MAX too".into(),
            ));
        }
        Ok(())
    }

    /// Learning rate at `iter` of a stretch of `iters`: linear decay from `lr` to 0 (the
    /// paper's schedule).
    pub fn lr_at(&self, iter: usize, iters: usize) -> f64 {
        self.lr * (1.0 - iter as f64 / iters as f64)
    }
}

/// Everything that defines a progressive run (stored as `run.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProgressiveRun {
    pub kind: String,
    /// The original teacher's pipeline folder (absolute).
    pub teacher: PathBuf,
    /// The pipeline folder whose UNet the first stage's student starts from (absolute;
    /// default: the teacher's) — an f32 student, for quantization-aware fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    pub config: ProgressiveConfig,
    pub data: DataSource,
}

/// One finished round.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundOutcome {
    pub steps: usize,
    pub dir: PathBuf,
    /// Mean loss over the round's last 10 % of iterations (NaN for a round finished earlier and
    /// only found on disk).
    pub final_loss: f64,
    pub seconds: f64,
}

/// What a progressive run reports.
#[derive(Debug, Clone)]
pub struct ProgressiveOutcome {
    pub rounds: Vec<RoundOutcome>,
    pub interrupted: bool,
}

/// The folder of the student that samples in `steps` steps.
pub fn round_dir(run_dir: &Path, steps: usize) -> PathBuf {
    run_dir.join(format!("round-{steps}steps"))
}

/// The finished students of a run folder, `(N, round-<N>steps/)`, fewest steps first: every
/// subfolder named so that holds a pipeline (`model_index.json`).
pub fn finished_rounds(run_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut rounds: Vec<(usize, PathBuf)> = std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let steps = name
                .strip_prefix("round-")?
                .strip_suffix("steps")?
                .parse()
                .ok()?;
            let dir = e.path();
            dir.join("model_index.json")
                .is_file()
                .then_some((steps, dir))
        })
        .collect();
    rounds.sort();
    rounds
}

fn new_optimizer(cfg: &ProgressiveConfig) -> ModuleOptimizer {
    cfg.optimizer.init()
}

/// The prediction type the student is trained in: v (or x0) as the teacher, v for an ε teacher —
/// ε is degenerate at the high-noise end where one-step students must work (paper, §4).
pub fn student_prediction(teacher: Prediction) -> Prediction {
    match teacher {
        Prediction::Epsilon => Prediction::V,
        p => p,
    }
}

/// The teacher's scheduler config on the grids distillation runs on: trailing spacing. Its
/// student grids start at the last train timestep and nest the teacher's K·N-step grid inside
/// each N-step one; "leading" and "linspace" (Stable Diffusion's) end their grids on a step
/// 1 → x0 with no teacher step inside it, and leading's first teacher step sits above the
/// student's first timestep.
fn distillation_grid(teacher: &SchedulerConfig) -> SchedulerConfig {
    let mut s = teacher.clone();
    s.timestep_spacing = Some(TimestepSpacing::Trailing);
    s
}

/// The scheduler config written with a student: the teacher's DDIM config with the student's
/// prediction type and step count, on the grid it learned ([`distillation_grid`]).
fn student_scheduler(
    teacher: &SchedulerConfig,
    prediction: Prediction,
    steps: usize,
) -> SchedulerConfig {
    let mut s = distillation_grid(teacher);
    s.class = Some(Algorithm::Ddim);
    s.prediction_type = Some(prediction);
    s.distilled_steps = Some(steps);
    s
}

struct RoundState {
    student: UNet,
    ema: Option<UNet>,
    optim: ModuleOptimizer,
    iter: usize,
}

/// The f32 EMA weights of a quantization-aware round (the pipeline holds them quantized).
const EMA_WEIGHTS: &str = "ema.safetensors";

fn save_checkpoint(
    run_dir: &Path,
    teacher: &Pipeline,
    student_config: &UNetConfig,
    scheduler: &SchedulerConfig,
    steps: usize,
    state: &RoundState,
) -> Result<PathBuf> {
    let dir = checkpoint::incoming(run_dir)?;
    let written = state.ema.clone().unwrap_or_else(|| state.student.valid());
    pipeline::save_pipeline(
        &dir,
        student_config,
        &written,
        scheduler,
        Algorithm::Ddim,
        teacher.vae.as_ref().map(|(c, v)| (c, v)),
        teacher.text.as_ref(),
    )?;
    checkpoint::write_state(
        &dir,
        &state.student,
        &state.optim,
        &json!({ "round_steps": steps, "iter": state.iter }),
    )?;
    if let (Some(ema), Some(_)) = (&state.ema, &student_config.quantization_config) {
        // The pipeline above holds the EMA quantized; its f32 weights resume from here.
        io::save_weights(ema, &dir.join("state").join(EMA_WEIGHTS))?;
    }
    checkpoint::publish(run_dir)
}

/// The in-round checkpoint for the round of `steps`, if the latest checkpoint belongs to it.
fn load_checkpoint(
    run_dir: &Path,
    student_config: &UNetConfig,
    cfg: &ProgressiveConfig,
    steps: usize,
    device: &Device,
) -> Result<Option<RoundState>> {
    let Some(ckpt) = checkpoint::latest(run_dir) else {
        return Ok(None);
    };
    let ad = device.clone().autodiff();
    let fresh = |d: &Device| match &cfg.quantize {
        Some(q) => q.attach(student_config.init(d)),
        None => Ok(student_config.init(d)),
    };
    let st = checkpoint::read_state(&ckpt, fresh(&ad)?, new_optimizer(cfg))?;
    if st.progress["round_steps"].as_u64() != Some(steps as u64) {
        return Ok(None);
    }
    let iter = st.progress["iter"]
        .as_u64()
        .ok_or_else(|| Error::file(ckpt.join("state/state.json"), "no `iter`"))?
        as usize;
    let ema_weights = match cfg.quantize {
        Some(_) => ckpt.join("state").join(EMA_WEIGHTS),
        None => ckpt.join("unet").join(io::WEIGHTS_NAME),
    };
    let ema = match cfg.ema_decay {
        Some(_) => Some(io::load_weights_with_ids(
            fresh(device)?,
            &ema_weights,
            Some(&st.ids),
        )?),
        None => None,
    };
    let (student, optim) = (st.model, st.optim);
    Ok(Some(RoundState {
        student,
        ema,
        optim,
        iter,
    }))
}

/// Training images (or, for a latent teacher, their scaled VAE latents) and their conditioning
/// for one iteration, with the student steps, noise, noised samples and guidance scales.
struct Batch {
    z: Tensor<4>,
    /// The noise of each row (a rollout row's sampler starts from it).
    eps: Tensor<4>,
    steps: Vec<StudentStep>,
    /// Each row's index in the grid.
    grid_index: Vec<usize>,
    /// Whether the row's z is to come from the student's rollout ([`rollout_rows`]).
    rollout: Vec<bool>,
    cond: Conditioning,
    w: Vec<f32>,
}

fn draw_batch(
    teacher: &Pipeline,
    images: &TrainImages,
    conditioning: &TeacherConditioning,
    grid: &[StudentStep],
    cfg: &ProgressiveConfig,
    global_iter: usize,
    device: &Device,
) -> Result<Batch> {
    let mut rng = NoiseStream::for_step(cfg.seed, global_iter as u64);
    // Order of draws: images, grid steps, noise, guidance scales, caption wording (fixed:
    // resume relies on it).
    let (x, labels, rows) = images.random_rows(&mut rng, cfg.batch, device);
    let grid_index: Vec<usize> = (0..cfg.batch)
        .map(|_| rng.below(grid.len() as u64) as usize)
        .collect();
    let steps: Vec<StudentStep> = grid_index.iter().map(|&i| grid[i].clone()).collect();
    let x0 = super::model_space(teacher, x);
    let [b, c, h, w] = x0.dims();
    let eps = crate::sample::host_noise(&mut rng, [b, c, h, w], device);
    let w = cfg
        .guidance
        .map_or_else(Vec::new, |g| g.draw(&mut rng, cfg.batch));
    let cond = conditioning.batch(teacher, labels, &rows, &mut rng, device)?;
    Ok(Batch {
        z: noised(x0, eps.clone(), &steps),
        eps,
        steps,
        grid_index,
        rollout: rollout_rows(cfg.batch, cfg.rollout_fraction.unwrap_or(0.0)),
        cond,
        w,
    })
}

/// Which of `batch` rows are rollout rows at `fraction`: spread evenly (row i when
/// ⌊(i + 1)·f⌋ > ⌊i·f⌋), so that every data-parallel shard gets its share.
fn rollout_rows(batch: usize, fraction: f32) -> Vec<bool> {
    let f = f64::from(fraction);
    (0..batch)
        .map(|i| ((i + 1) as f64 * f).floor() > (i as f64 * f).floor())
        .collect()
}

/// `z` with its rollout rows (`rollout`, at least one) replaced by the student's own trajectory to their grid
/// step ([`student_rollout`], from the row's noise in `eps`).
#[allow(clippy::too_many_arguments)]
fn with_rollouts(
    student: &UNet,
    prediction: Prediction,
    z: Tensor<4>,
    eps: Tensor<4>,
    grid: &[StudentStep],
    grid_index: &[usize],
    rollout: &[bool],
    cond: &Conditioning,
) -> Tensor<4> {
    let rows: Vec<usize> = (0..rollout.len()).filter(|&i| rollout[i]).collect();
    let start = eps.select(0, crate::denoiser::row_index(&rows, &z.device()));
    let k: Vec<usize> = rows.iter().map(|&r| grid_index[r]).collect();
    let rolled = student_rollout(student, prediction, start, grid, &k, &cond.select(&rows));
    let mut next = 0;
    let pieces = (0..rollout.len())
        .map(|i| {
            if rollout[i] {
                next += 1;
                rolled.clone().narrow(0, next - 1, 1)
            } else {
                z.clone().narrow(0, i, 1)
            }
        })
        .collect();
    Tensor::cat(pieces, 0)
}

/// A DDIM grid of `steps` over `train_t` timesteps that is not evenly spaced can sample with
/// grain (the previous default shapes32 teacher at 16 of 1 000 steps; README "FID versus
/// steps"), which the first round's student then learns — or not (the present one scores best
/// at 32): the warning that says so and names the comparison to make.
fn uneven_grid_warning(train_t: usize, steps: usize) -> Option<String> {
    (steps > 0 && !train_t.is_multiple_of(steps)).then(|| {
        let divisor = (1..=steps).rev().find(|&d| train_t.is_multiple_of(d) && d.is_power_of_two());
        format!(
            "warning: --from-steps {steps}: the teacher's {train_t} train timesteps are not a multiple of {steps}, so its {steps}-step DDIM grid is uneven; some teachers sample with grain there, which the first round learns: compare its FID at {steps} steps with a divisor{} first (fewstep eval fid --steps N)",
            divisor.map_or(String::new(), |d| format!(" (e.g. {d})"))
        )
    })
}

/// Runs (or resumes) progressive distillation in `run_dir`; data-parallel over `devices` when
/// there are several (the first holds the models and the data).
pub fn distill_progressive(
    run_dir: &Path,
    run: Option<ProgressiveRun>,
    resume: bool,
    devices: &[Device],
    quiet: bool,
) -> Result<ProgressiveOutcome> {
    let device = devices
        .first()
        .ok_or_else(|| Error::Usage("--devices: give at least one device".into()))?;
    let mut images: Option<TrainImages> = None;
    let run = if resume {
        checkpoint::read_run_as::<ProgressiveRun>(run_dir, PROGRESSIVE_RUN)?
    } else {
        let run = run.ok_or_else(|| Error::Usage("nothing to distill: give a teacher".into()))?;
        run.config.validate()?;
        run.config.rounds()?;
        // The teacher loads and the data opens before the run folder is created: a truncated
        // teacher or an unreadable --data leaves nothing behind.
        let teacher = Pipeline::load(&run.teacher, device)?;
        if run.config.guidance.is_some()
            && teacher.text.is_none()
            && teacher.unet.num_classes().is_none()
        {
            return Err(Error::Usage(format!(
                "--guidance needs a class-conditional or text-to-image teacher; {} is unconditional",
                run.teacher.display()
            )));
        }
        let train_t = teacher
            .scheduler
            .resolve(Algorithm::Ddim)
            .num_train_timesteps;
        if let Some(warning) = uneven_grid_warning(train_t, run.config.from_steps) {
            // The FID table's teacher column at these steps does not warn of the grid again.
            crate::sample::warn_grid_once(Algorithm::Ddim, run.config.from_steps, train_t, || {
                warning
            });
        }
        images = Some(open_images(
            &run.data,
            super::image_size(&teacher),
            teacher.unet.num_classes(),
        )?);
        checkpoint::prepare_new_run(run_dir)?;
        io::write_json(
            &run_dir.join(checkpoint::RUN_FILE),
            &serde_json::to_value(&run).expect("run serialises"),
        )?;
        run
    };
    let cfg = &run.config;
    let stages = cfg.stages()?;
    // The perceptual distance runs the original teacher's encoder, whichever teacher a round
    // learns from (a halving round's is the last student, never trained at t = 0): one frozen
    // copy per device, gradients passing through it to the student's x̂₀.
    let feature_nets: Vec<UNet> = if cfg.distance == Distance::TeacherFeatures {
        let original = Pipeline::load(&run.teacher, device)?;
        data_parallel::frozen_through(&original.unet, device, devices)
    } else {
        Vec::new()
    };
    let csv_path = run_dir.join("loss.csv");
    let mut outcomes = Vec::new();
    let mut teacher_dir = run.teacher.clone();
    let mut first_global = 0;
    for (stage_index, &(stage, iters)) in stages.iter().enumerate() {
        let steps = stage.steps();
        let stage_first_global = first_global;
        first_global += iters;
        let dir = round_dir(run_dir, steps);
        if dir.join("model_index.json").is_file() {
            // A finished round: its figures were recorded beside the student.
            let recorded: serde_json::Value = io::read_text(&dir.join(ROUND_RECORD))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            outcomes.push(RoundOutcome {
                steps,
                dir: dir.clone(),
                final_loss: recorded["final_loss"].as_f64().unwrap_or(f64::NAN),
                seconds: recorded["seconds"].as_f64().unwrap_or(f64::NAN),
            });
            teacher_dir = dir;
            continue;
        }
        let teacher = Pipeline::load(&teacher_dir, device)?;
        let teachers = data_parallel::replicate(&teacher.unet, devices);
        let teacher_prediction = teacher.scheduler.resolve(Algorithm::Ddim).prediction;
        let prediction = student_prediction(teacher_prediction);
        let scheduler = student_scheduler(&teacher.scheduler, prediction, steps);
        let guided = matches!(stage, Stage::Guided { .. });
        let guided_halving = matches!(stage, Stage::Guided { halving: true, .. });
        // Stage one's student takes w through a guidance-scale embedding (LCM's
        // time_cond_proj_dim); later rounds inherit it from their teacher.
        let mut student_config = teacher.unet_config.clone();
        student_config.quantization_config =
            cfg.quantize.map(|q| QuantizationConfig::new(q.format));
        if guided {
            student_config.time_cond_proj_dim = Some(GUIDANCE_EMBEDDING_DIM);
        }
        // The first stage's student may be wider than its teacher (`fewstep widen`): it keeps
        // its width, and later rounds inherit it.
        if let (Some(init), 0) = (&run.init, stage_index)
            && let Some(wide) = super::wider_student(&student_config, init)?
        {
            student_config = wide;
        }
        // Guided stage one without --guided-halving targets one guided teacher step on the
        // student's own grid: no finer teacher grid to build (or to fail on).
        let factor = match stage {
            Stage::Guided { halving: false, .. } => 1,
            _ => cfg.round_factor,
        };
        let grid = student_steps(&distillation_grid(&teacher.scheduler), steps, factor)
            .map_err(|e| Error::file(&teacher_dir, e.0))?;
        if images.is_none() {
            images = Some(open_images(
                &run.data,
                super::image_size(&teacher),
                teacher.unet.num_classes(),
            )?);
        }
        let images = images.as_ref().expect("opened above");
        let conditioning = TeacherConditioning::new(&teacher, images, device)?;
        let state = match load_checkpoint(run_dir, &student_config, cfg, steps, device)? {
            Some(s) => s,
            None => {
                let ad = device.clone().autodiff();
                // The first stage's student may start from --init (its teacher's architecture).
                let init = match (&run.init, stage_index) {
                    (Some(init), 0) => init.clone(),
                    _ => teacher_dir.clone(),
                };
                let (init_config, student) = pipeline::load_unet(&init.join("unet"), &ad)?;
                let mut init_config = init_config;
                init_config.quantization_config = student_config.quantization_config.clone();
                if guided && init_config.time_cond_proj_dim.is_none() {
                    init_config.time_cond_proj_dim = student_config.time_cond_proj_dim;
                }
                if init_config != student_config {
                    return Err(Error::file(
                        &init,
                        "--init: its UNet config differs from the teacher's: the student must have the teacher's architecture, or a wider one (`fewstep widen`)",
                    ));
                }
                let mut student = crate::models::quant::trainable_weights(student);
                if guided && student.time_embedding.cond_proj.is_none() {
                    // The teacher's weights and a fresh guidance embedding.
                    student.time_embedding.cond_proj =
                        student_config.init(&ad).time_embedding.cond_proj;
                }
                let student = match &cfg.quantize {
                    Some(q) => q.attach(student)?,
                    None => student,
                };
                RoundState {
                    ema: cfg.ema_decay.map(|_| student.valid()),
                    student,
                    optim: new_optimizer(cfg),
                    iter: 0,
                }
            }
        };
        // The full-precision --init student the first stage's quantized one is tied to.
        let anchors = match (&run.init, cfg.quantize, stage_index) {
            (Some(init), Some(q), 0) if q.anchor > 0.0 => {
                let (_, unet) = pipeline::load_unet(&init.join("unet"), device)?;
                Some(data_parallel::replicate(
                    &crate::models::quant::trainable_weights(unet),
                    devices,
                ))
            }
            _ => None,
        };
        let name = match stage {
            Stage::Guided { steps, .. } => format!("guided {steps} steps"),
            Stage::Halving { steps } => format!("round {steps} steps"),
        };
        if !quiet {
            let what = if guided_halving {
                format!(
                    "guided teacher at {} steps → w-conditioned student at {steps} steps",
                    steps * cfg.round_factor
                )
            } else if guided {
                format!("guided teacher → w-conditioned student at {steps} steps")
            } else {
                format!("{} → {steps} steps", steps * cfg.round_factor)
            };
            eprintln!(
                "stage {}/{}: {what} (teacher {})",
                stage_index + 1,
                stages.len(),
                teacher_dir.display()
            );
        }
        let spec = LoopSpec {
            name: &name,
            iters,
            first_global: stage_first_global,
            checkpoint_every: cfg.checkpoint_every,
            csv_path: &csv_path,
            quiet,
        };
        let start = state.iter;
        let (state, end) = run_loop(
            &spec,
            start,
            state,
            |mut state, iter| {
                let global = spec.first_global + iter;
                let b = draw_batch(&teacher, images, &conditioning, &grid, cfg, global, device)?;
                let (value, grads) = data_parallel::loss_and_grads(
                    &state.student,
                    devices,
                    cfg.batch,
                    |student, shard| {
                        let (z, steps) = (shard.take(&b.z), shard.take_list(&b.steps));
                        let cond = shard.take_conditioning(&b.cond);
                        let w = (!b.w.is_empty()).then(|| shard.take_list(&b.w));
                        let cond_w = cond.clone().with_guidance(
                            w.as_ref()
                                .map(|w| Tensor::<1>::from_floats(w.as_slice(), &z.device())),
                        );
                        // Only shards with rollout rows pay for the student copy and the noise.
                        let rollout = shard.take_list(&b.rollout);
                        let z = if rollout.contains(&true) {
                            with_rollouts(
                                &student.valid(),
                                prediction,
                                z,
                                shard.take(&b.eps),
                                &grid,
                                &shard.take_list(&b.grid_index),
                                &rollout,
                                &cond_w,
                            )
                        } else {
                            z
                        };
                        let target = match (guided, &w) {
                            (true, Some(w)) => {
                                let uncond = conditioning
                                    .uncond(shard.rows.len(), &z.device())
                                    .expect("checked: a guidable teacher");
                                let target = if guided_halving {
                                    guided_steps_target
                                } else {
                                    guided_target
                                };
                                target(
                                    &teachers[shard.index],
                                    teacher_prediction,
                                    z.clone(),
                                    &steps,
                                    &cond,
                                    &uncond,
                                    w,
                                )
                            }
                            _ => teacher_target(
                                &teachers[shard.index],
                                teacher_prediction,
                                z.clone(),
                                &steps,
                                &cond_w,
                            ),
                        };
                        // Quantization-aware fine-tuning from a full-precision student: its
                        // x̂₀ joins the target, a·‖x̂₀ − T‖² + λ·‖x̂₀ − A‖² being
                        // (1 + λ)·‖x̂₀ − (T + λA)/(1 + λ)‖² up to a constant.
                        let (target, scale) = match (&anchors, cfg.quantize) {
                            (Some(a), Some(q)) => {
                                let anchor = x0_prediction(
                                    &a[shard.index],
                                    prediction,
                                    z.clone(),
                                    &steps,
                                    &cond_w,
                                );
                                let blended = (target + anchor.mul_scalar(q.anchor))
                                    .div_scalar(1.0 + q.anchor);
                                (blended, 1.0 + q.anchor)
                            }
                            _ => (target, 1.0),
                        };
                        // The teacher ran without autodiff; the student trains with it.
                        let ad_cond = cond.autodiff();
                        let features = feature_nets.get(shard.index).map(|net| (net, &ad_cond));
                        progressive_loss(
                            student,
                            prediction,
                            z.autodiff(),
                            target.autodiff(),
                            &steps,
                            &cond_w.autodiff(),
                            cfg.snr_weight_cap,
                            cfg.distance,
                            features,
                        )
                        .mean()
                        .mul_scalar(scale)
                    },
                )?;
                let lr = cfg.lr_at(iter, iters);
                state.student = state.optim.step(lr, state.student, grads);
                if let (Some(decay), Some(e)) = (cfg.ema_decay, state.ema.take()) {
                    state.ema = Some(ema::update(
                        e,
                        &state.student.valid(),
                        ema::decay_at(iter, decay),
                    ));
                }
                state.iter = iter + 1;
                Ok((
                    state,
                    IterReport {
                        loss: value,
                        lr,
                        note: String::new(),
                    },
                ))
            },
            |state, _| {
                save_checkpoint(run_dir, &teacher, &student_config, &scheduler, steps, state)
                    .map(|_| ())
            },
        )?;
        let Some((final_loss, seconds)) = end.finished() else {
            return Ok(ProgressiveOutcome {
                rounds: outcomes,
                interrupted: true,
            });
        };
        let written = state.ema.clone().unwrap_or_else(|| state.student.valid());
        super::write_student(
            &dir,
            &teacher,
            super::Student {
                unet_config: &student_config,
                unet: &written,
                scheduler: &scheduler,
                algorithm: Algorithm::Ddim,
            },
            &json!({
                "steps": steps,
                "stage": stage.record_name(cfg.round_factor),
                "teacher_steps_per_step": factor,
                "guidance": cfg.guidance,
                "teacher": teacher_dir,
                "final_loss": final_loss,
                "seconds": seconds,
                "iters": iters,
            }),
        )?;
        outcomes.push(RoundOutcome {
            steps,
            dir: dir.clone(),
            final_loss,
            seconds,
        });
        teacher_dir = dir;
    }
    Ok(ProgressiveOutcome {
        rounds: outcomes,
        interrupted: false,
    })
}

#[cfg(test)]
mod tests {
    fn config(from_steps: usize, to_steps: usize, round_factor: usize) -> super::ProgressiveConfig {
        super::ProgressiveConfig {
            from_steps,
            to_steps,
            round_factor,
            iters_per_round: 1,
            batch: 1,
            lr: 1e-4,
            optimizer: crate::train::optim::OptimizerConfig::distillation(),
            ema_decay: None,
            seed: 0,
            checkpoint_every: 1,
            guidance: None,
            guided_iters: None,
            guided_halving: false,
            quantize: None,
            rollout_fraction: None,
            snr_weight_cap: None,
            distance: super::Distance::L2,
        }
    }

    #[test]
    fn rounds_divide_the_steps_by_the_round_factor() {
        let rounds = |from, to, k| config(from, to, k).rounds();
        assert_eq!(rounds(16, 1, 2).unwrap(), vec![8, 4, 2, 1]);
        assert_eq!(rounds(32, 4, 8).unwrap(), vec![4]);
        assert_eq!(rounds(32, 2, 4).unwrap(), vec![8, 2]);
        assert_eq!(rounds(24, 3, 2).unwrap(), vec![12, 6, 3]);
        let err = |from, to, k| rounds(from, to, k).unwrap_err().to_string();
        assert!(err(12, 4, 2).contains("power of two"), "{}", err(12, 4, 2));
        let e = err(32, 2, 8);
        assert!(
            e.contains("--from-steps 32") && e.contains("power of 8"),
            "{e}"
        );
        assert!(err(16, 1, 1).contains("--round-factor 1"));
        assert!(err(8, 8, 2).contains("must be below"));
    }

    #[test]
    fn a_run_json_without_a_round_factor_halves() {
        let mut v = serde_json::to_value(config(16, 4, 2)).unwrap();
        v.as_object_mut().unwrap().remove("round_factor");
        let back: super::ProgressiveConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back.round_factor, 2);
    }

    #[test]
    fn a_leading_teacher_is_distilled_and_written_on_the_trailing_grid() {
        use fewstep_schedulers::{SchedulerConfig, TimestepSpacing};
        let leading = SchedulerConfig::from_json_str(
            r#"{"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1}"#,
        )
        .unwrap();
        // On its own grid a leading teacher's 8-step sampler starts above the 4-step one's
        // first timestep (876 > 751): no nesting.
        assert!(crate::distill::progressive::student_steps(&leading, 4, 2).is_err());
        let grid = super::distillation_grid(&leading);
        let steps = crate::distill::progressive::student_steps(&grid, 4, 2).unwrap();
        assert_eq!(steps[0].t, 999);
        let written = super::student_scheduler(&leading, fewstep_schedulers::Prediction::V, 4);
        assert_eq!(written.timestep_spacing, Some(TimestepSpacing::Trailing));
        assert_eq!(written.distilled_steps, Some(4));
    }

    #[test]
    fn rollout_rows_are_spread_over_the_batch() {
        let rows = |n, f| -> Vec<usize> {
            super::rollout_rows(n, f)
                .iter()
                .enumerate()
                .filter_map(|(i, &r)| r.then_some(i))
                .collect()
        };
        assert_eq!(rows(8, 0.5), vec![1, 3, 5, 7]);
        assert_eq!(rows(8, 0.25), vec![3, 7]);
        assert_eq!(rows(4, 1.0), vec![0, 1, 2, 3]);
        assert_eq!(rows(4, 0.0), Vec::<usize>::new());
    }

    #[test]
    fn an_uneven_first_grid_is_named_with_a_divisor_to_start_from() {
        assert_eq!(super::uneven_grid_warning(1000, 8), None);
        let w = super::uneven_grid_warning(1000, 16).expect("16 does not divide 1000");
        assert!(
            w.contains("--from-steps 16") && w.contains("(e.g. 8)") && w.contains("at 16 steps"),
            "{w}"
        );
    }
}
