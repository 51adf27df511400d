//! Training: the only autodiff-aware code. A plain loop over burn's AdamW with warm-up, gradient
//! clipping and EMA, crash-safe checkpoints every K steps, exact resume, Ctrl-C and NaN guards.

pub mod checkpoint;
pub mod clip;
pub mod consistency;
pub mod data_parallel;
pub mod diffusion;
pub mod dmd;
pub mod ema;
pub mod feature_net;
pub mod gan;
pub mod latents;
pub mod optim;
pub mod progressive;
pub(crate) mod run_loop;
pub(crate) mod teacher_conditioning;
pub mod timesteps;
pub mod vae;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use fewstep_schedulers::{Algorithm, SchedulerConfig};
use serde_json::json;

pub use crate::data::DataSource;
use crate::data::{self, TrainImages};
use crate::error::{Error, Result};
use crate::io;
use crate::models::{Conditioning, UNet, UNetConfig};
use crate::noise::NoiseStream;
use crate::pipeline;
use latents::{LatentCache, LatentSpec};
use timesteps::{SpanDraw, TimestepSampling};

/// The `run.json` kind of a diffusion training run.
pub const DIFFUSION_RUN: &str = "train-diffusion";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C has asked the running loop to checkpoint and stop.
pub(crate) fn interrupt_requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Makes Ctrl-C request a checkpoint and a clean stop instead of killing the process.
pub fn install_interrupt_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    });
}

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    /// Linear warm-up steps from 0 to `lr`.
    pub warmup: usize,
    /// Linear decay of the learning rate to 0 over the run's last `cooldown` steps (0: constant
    /// after warm-up). A warm-up–stable–decay schedule: a finished run can be extended with
    /// `--resume --steps N --cooldown M` and still end on a decay.
    #[serde(default)]
    pub cooldown: usize,
    pub ema_decay: f32,
    pub optimizer: optim::OptimizerConfig,
    /// Probability of replacing a class label by the null class (classifier-free guidance).
    pub label_dropout: f32,
    pub seed: u64,
    pub checkpoint_every: usize,
    /// Min-SNR-γ loss weighting (Hang et al. 2023): each sample's error weighted as if its x0
    /// error counted min(SNR_t, γ) (`diffusion::min_snr_weight`); `None`: the plain mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snr_gamma: Option<f64>,
    /// The law of each row's timestep (uniform: DDPM's); recorded only when not uniform, so
    /// older runs read unchanged.
    #[serde(default, skip_serializing_if = "TimestepSampling::is_uniform")]
    pub timestep_sampling: TimestepSampling,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 10_000,
            batch: 32,
            lr: 2e-4,
            warmup: 200,
            cooldown: 0,
            ema_decay: 0.999,
            optimizer: optim::OptimizerConfig::diffusion(),
            label_dropout: 0.1,
            seed: 0,
            checkpoint_every: 500,
            snr_gamma: None,
            timestep_sampling: TimestepSampling::Uniform,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 {
            return Err(Error::Usage("--batch must be at least 1".into()));
        }
        if self.steps == 0 {
            return Err(Error::Usage("--steps must be at least 1".into()));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::Usage(format!(
                "--lr must be a positive number, got {}",
                self.lr
            )));
        }
        ema::check_decay(self.ema_decay)?;
        self.optimizer.validate()?;
        if !(0.0..=1.0).contains(&self.label_dropout) {
            return Err(Error::Usage(format!(
                "--label-dropout {}: expected a probability in [0, 1]",
                self.label_dropout
            )));
        }
        if self.checkpoint_every == 0 {
            return Err(Error::Usage("--checkpoint-every must be at least 1".into()));
        }
        if let Some(g) = self.snr_gamma
            && !(g > 0.0 && g.is_finite())
        {
            return Err(Error::Usage(format!(
                "--snr-gamma {g}: expected a positive number (5 in the paper and diffusers' scripts)"
            )));
        }
        if let TimestepSampling::LogNormal { mean, std } = self.timestep_sampling
            && !(mean.is_finite() && std > 0.0 && std.is_finite())
        {
            return Err(Error::Usage(format!(
                "--timestep-sampling lognormal:{mean},{std}: expected a finite mean and a positive std"
            )));
        }
        if self.cooldown > self.steps {
            return Err(Error::Usage(format!(
                "--cooldown {}: expected at most the run's --steps ({})",
                self.cooldown, self.steps
            )));
        }
        Ok(())
    }

    /// Learning rate at `step`: linear warm-up, constant, then (with `cooldown`) linear decay to 0
    /// over the last `cooldown` steps.
    pub fn lr_at(&self, step: usize) -> f64 {
        let decay_start = self.steps - self.cooldown;
        let decay = if self.cooldown > 0 && step >= decay_start {
            (self.steps - step.min(self.steps)) as f64 / self.cooldown as f64
        } else {
            1.0
        };
        self.lr * warmup_factor(step, self.warmup) * decay
    }
}

/// The learning-rate factor of a linear warm-up over `warmup` steps at `step`: (step + 1) / warmup,
/// then 1 (1 throughout without warm-up).
pub fn warmup_factor(step: usize, warmup: usize) -> f64 {
    ((step + 1) as f64 / warmup.max(1) as f64).min(1.0)
}

/// Half a cosine over `progress` in [0, 1]: 1 at the start, 0 at the end (clamped beyond).
pub fn half_cosine(progress: f64) -> f64 {
    0.5 * (1.0 + (std::f64::consts::PI * progress.clamp(0.0, 1.0)).cos())
}

/// Everything that defines a diffusion training run (stored as `run.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct DiffusionRun {
    pub unet: UNetConfig,
    pub scheduler: SchedulerConfig,
    pub train: TrainConfig,
    pub data: DataSource,
    /// Latent diffusion: the frozen VAE whose latents the UNet learns (None: pixels).
    pub latent: Option<LatentSpec>,
    /// Text-to-image: the frozen text encoder and how captions are read and dropped.
    pub text: Option<TextSpec>,
    /// The pipeline folder whose UNet weights the run starts from (absolute; `None`: a seeded
    /// initialisation) — e.g. a `fewstep widen` of a trained model.
    pub init: Option<PathBuf>,
}

/// The text side of a text-to-image training run (`run.json`'s `text`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TextSpec {
    /// A folder with `tokenizer/` and `text_encoder/` (a `train-clip` run, a pipeline), absolute.
    pub encoder: PathBuf,
    /// Probability of training on the empty caption (classifier-free guidance, as SD's 10 %).
    pub caption_dropout: f32,
    /// The caption column of a folder's `metadata.jsonl`.
    pub caption_column: String,
}

impl DiffusionRun {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "kind": DIFFUSION_RUN,
            "unet": self.unet.to_json(),
            "scheduler": self.scheduler.to_json(Algorithm::Ddim),
            "train": self.train,
            "data": self.data,
            "latent": self.latent,
            "text": self.text,
            "init": self.init,
        })
    }

    fn from_json(v: &serde_json::Value, path: &Path) -> Result<Self> {
        let bad = |what: &str, e: String| Error::file(path, format!("{what}: {e}"));
        Ok(DiffusionRun {
            unet: UNetConfig::from_json_str(&v["unet"].to_string())
                .map_err(|e| bad("unet", e.to_string()))?,
            scheduler: SchedulerConfig::from_map(
                v["scheduler"]
                    .as_object()
                    .ok_or_else(|| bad("scheduler", "missing".into()))?,
            )
            .map_err(|e| bad("scheduler", e.0))?,
            train: serde_json::from_value(v["train"].clone())
                .map_err(|e| bad("train", e.to_string()))?,
            data: serde_json::from_value(v["data"].clone())
                .map_err(|e| bad("data", e.to_string()))?,
            latent: optional_field(v, "latent").map_err(|e| bad("latent", e))?,
            text: optional_field(v, "text").map_err(|e| bad("text", e))?,
            init: optional_field(v, "init").map_err(|e| bad("init", e))?,
        })
    }
}

/// `run.json`'s field `key` when present and not null (fields added after a run was stored read as
/// absent).
fn optional_field<T: serde::de::DeserializeOwned>(
    v: &serde_json::Value,
    key: &str,
) -> std::result::Result<Option<T>, String> {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => serde_json::from_value(x.clone())
            .map(Some)
            .map_err(|e| e.to_string()),
    }
}

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub step: usize,
    pub last_loss: f32,
    pub interrupted: bool,
    pub checkpoint: PathBuf,
    pub seconds: f64,
}

struct State {
    model: UNet,
    ema: UNet,
    optim: ModuleOptimizer,
    step: usize,
}

fn new_optimizer(cfg: &TrainConfig) -> ModuleOptimizer {
    cfg.optimizer.init()
}

fn save_checkpoint(
    run_dir: &Path,
    run: &DiffusionRun,
    state: &State,
    vae: Option<(&crate::models::VaeConfig, &crate::models::Vae)>,
    text: Option<&pipeline::TextEncoder>,
) -> Result<PathBuf> {
    let dir = checkpoint::incoming(run_dir)?;
    pipeline::save_pipeline(
        &dir,
        &run.unet,
        &state.ema,
        &run.scheduler,
        Algorithm::Ddim,
        vae,
        text,
    )?;
    checkpoint::write_state(
        &dir,
        &state.model,
        &state.optim,
        &json!({ "step": state.step }),
    )?;
    checkpoint::publish(run_dir)
}

fn load_checkpoint(ckpt: &Path, run: &DiffusionRun, device: &Device) -> Result<State> {
    let ad = device.clone().autodiff();
    let st = checkpoint::read_state(ckpt, run.unet.init(&ad), new_optimizer(&run.train))?;
    let ema = io::load_weights_with_ids(
        run.unet.init(device),
        &ckpt.join("unet").join(io::WEIGHTS_NAME),
        Some(&st.ids),
    )?;
    let state_path = ckpt.join("state/state.json");
    let step = st.progress["step"]
        .as_u64()
        .ok_or_else(|| Error::file(&state_path, "no `step`"))? as usize;
    Ok(State {
        model: st.model,
        ema,
        optim: st.optim,
        step,
    })
}

/// One batch of training data for `step`.
struct Batch {
    x0: Tensor<4>,
    eps: Tensor<4>,
    t: Vec<usize>,
    labels: Option<Tensor<1, Int>>,
    /// Text-to-image: the frozen encoder's embeddings of the captions (some dropped).
    context: Option<Tensor<3>>,
}

/// A text-to-image run's frozen encoder and captions.
struct TextData {
    encoder: pipeline::TextEncoder,
    captions: data::Captions,
    dropout: f32,
}

/// What a diffusion model trains on: images, or their cached VAE latents.
enum TrainData {
    Pixels(TrainImages),
    Latents(Box<LatentCache>),
}

fn draw_batch(
    run: &DiffusionRun,
    data: &TrainData,
    text: Option<&TextData>,
    step: usize,
    timesteps: &SpanDraw,
    device: &Device,
) -> Result<Batch> {
    let cfg = &run.train;
    let mut rng = NoiseStream::for_step(cfg.seed, step as u64);
    // Order of draws: images (and a latent's posterior noise), timesteps, noise, label dropout,
    // caption wording and dropout (fixed: resume relies on it).
    let (x0, labels, rows) = match data {
        TrainData::Pixels(images) => images.random_rows(&mut rng, cfg.batch, device),
        TrainData::Latents(cache) => cache.random_batch(&mut rng, cfg.batch, device),
    };
    let t: Vec<usize> = (0..cfg.batch).map(|_| timesteps.draw(&mut rng)).collect();
    let [b, c, h, w] = x0.dims();
    let eps = crate::sample::host_noise(&mut rng, [b, c, h, w], device);
    let labels = run.unet.num_class_embeds.map(|k| {
        // The last class index is the null label used for classifier-free guidance.
        let null = (k - 1) as i64;
        let keep: Vec<i64> = (0..b)
            .map(|_| (rng.uniform() >= cfg.label_dropout as f64) as i64)
            .collect();
        let keep = Tensor::<1, Int>::from_ints(keep.as_slice(), device);
        labels.clone() * keep.clone() + (keep.neg() + 1) * null
    });
    let context = match text {
        Some(text) => {
            let captions = text.captions.for_rows(&rows, text.dropout, &mut rng);
            Some(text.encoder.encode(&captions, 0, device)?)
        }
        None => None,
    };
    Ok(Batch {
        x0,
        eps,
        t,
        labels,
        context,
    })
}

/// Trains (or resumes) a diffusion model in `run_dir`, printing progress unless `quiet`. The
/// first of `devices` holds the model, the optimiser and the data; with more, each step is
/// data-parallel over all of them ([`data_parallel`]), the same run up to float rounding.
pub fn train_diffusion(
    run_dir: &Path,
    run: Option<DiffusionRun>,
    resume: bool,
    steps_override: Option<usize>,
    cooldown_override: Option<usize>,
    devices: &[Device],
    quiet: bool,
) -> Result<TrainOutcome> {
    let device = devices
        .first()
        .ok_or_else(|| Error::Usage("--devices: give at least one device".into()))?;
    // A fresh state from the run's seed: a new run, or a resumed one killed before its first
    // checkpoint (which then starts over from its stored settings).
    let fresh = |run: &DiffusionRun| -> Result<State> {
        let ad = device.clone().autodiff();
        // Seeded initialisation: the same --seed gives the same run on this backend.
        ad.seed(run.train.seed);
        let model = match &run.init {
            None => run.unet.init(&ad),
            Some(dir) => {
                let unet_dir = dir.join("unet");
                let (config, model) = crate::pipeline::load_unet(&unet_dir, &ad)?;
                if config != run.unet {
                    return Err(Error::file(
                        &unet_dir,
                        "--init: its UNet config is not the run's (was the folder changed after the run began?)",
                    ));
                }
                model
            }
        };
        let ema = model.valid();
        Ok(State {
            model,
            ema,
            optim: new_optimizer(&run.train),
            step: 0,
        })
    };
    let (mut run, state) = if resume {
        let v = checkpoint::read_run(run_dir, DIFFUSION_RUN)?;
        let run = DiffusionRun::from_json(&v, &run_dir.join(checkpoint::RUN_FILE))?;
        let state = match checkpoint::latest(run_dir) {
            Some(ckpt) => load_checkpoint(&ckpt, &run, device)?,
            None => fresh(&run)?,
        };
        (run, state)
    } else {
        let run =
            run.ok_or_else(|| Error::Usage("nothing to train: give a model config".into()))?;
        run.unet.validate()?;
        run.train.validate()?;
        let state = fresh(&run)?;
        (run, state)
    };
    if let Some(steps) = steps_override {
        run.train.steps = steps;
    }
    if let Some(cooldown) = cooldown_override {
        run.train.cooldown = cooldown;
    }
    run.train.validate()?;
    let (algorithm, _) = run.scheduler.algorithm();
    let schedule = run.scheduler.noise_schedule(algorithm)?;
    let prediction = run.scheduler.resolve(algorithm).prediction;
    let alpha_bars: Vec<f64> = (0..schedule.num_train_timesteps())
        .map(|t| f64::from(schedule.alpha_bar(t)))
        .collect();
    let timesteps = SpanDraw::over_timesteps(run.train.timestep_sampling, &alpha_bars);

    // A text run's encoder and captions load before the run folder is created: a bad
    // --text-encoder or a missing caption leaves nothing behind.
    let text = match &run.text {
        None => None,
        Some(spec) => {
            let images = run
                .data
                .open(run.unet.sample_size.unwrap_or(data::shapes::SIZE))?;
            Some(TextData {
                encoder: pipeline::TextEncoder::load(
                    &spec.encoder,
                    device,
                    crate::backend::Precision::F32,
                )?,
                captions: data::Captions::open(&images, &spec.caption_column)?,
                dropout: spec.caption_dropout,
            })
        }
    };

    // The data opens (and a latent run's VAE loads) before the run folder is created: a bad
    // --data or --vae leaves nothing behind.
    let data = match &run.latent {
        None => TrainData::Pixels(open_images(
            &run.data,
            run.unet.sample_size.unwrap_or(data::shapes::SIZE),
            run.unet.num_class_embeds,
        )?),
        Some(spec) => {
            // The cache is written into the run folder, so a new one is created first and
            // removed again if the VAE or the data fail.
            let existed = run_dir.exists();
            if !resume {
                checkpoint::prepare_new_run(run_dir)?;
            }
            match LatentCache::open(spec, &run.data, run_dir, device) {
                Ok(cache) => TrainData::Latents(Box::new(cache)),
                Err(e) => {
                    if !resume {
                        checkpoint::abandon_new_run(run_dir, existed);
                    }
                    return Err(e);
                }
            }
        }
    };
    if !resume && run.latent.is_none() {
        checkpoint::prepare_new_run(run_dir)?;
    }
    io::write_json(&run_dir.join(checkpoint::RUN_FILE), &run.to_json())?;
    let vae = match &data {
        TrainData::Latents(cache) => Some((&cache.config, &cache.vae)),
        TrainData::Pixels(_) => None,
    };
    let text_encoder = text.as_ref().map(|t| &t.encoder);

    let csv_path = run_dir.join("loss.csv");
    let spec = run_loop::LoopSpec {
        name: "training",
        iters: run.train.steps,
        first_global: 0,
        checkpoint_every: run.train.checkpoint_every,
        csv_path: &csv_path,
        quiet,
    };
    let started = Instant::now();
    let start = state.step;
    let mut checkpoint_path = checkpoint::latest(run_dir).unwrap_or_else(|| run_dir.to_path_buf());
    let mut last_loss = f32::NAN;
    let (state, end) = run_loop::run_loop(
        &spec,
        start,
        state,
        |mut state: State, step| {
            // Drawn without autodiff: each shard moves its rows to its device.
            let batch = draw_batch(&run, &data, text.as_ref(), step, &timesteps, device)?;
            let (loss, grads) = data_parallel::loss_and_grads(
                &state.model,
                devices,
                run.train.batch,
                |model, shard| {
                    let ad = |x: Tensor<4>| x.autodiff();
                    diffusion::denoising_loss(
                        model,
                        ad(shard.take(&batch.x0)),
                        ad(shard.take(&batch.eps)),
                        &shard.take_list(&batch.t),
                        &Conditioning {
                            labels: batch.labels.as_ref().map(|l| shard.take(l).autodiff()),
                            context: batch.context.as_ref().map(|c| shard.take(c).autodiff()),
                            ..Conditioning::none()
                        },
                        &schedule,
                        prediction,
                        run.train.snr_gamma,
                    )
                },
            )?;
            let lr = run.train.lr_at(step);
            state.model = state.optim.step(lr, state.model, grads);
            state.ema = ema::update(
                state.ema,
                &state.model.valid(),
                ema::decay_at(step, run.train.ema_decay),
            );
            state.step += 1;
            last_loss = loss;
            Ok((
                state,
                run_loop::IterReport {
                    loss,
                    lr,
                    note: String::new(),
                },
            ))
        },
        |state, _| {
            checkpoint_path = save_checkpoint(run_dir, &run, state, vae, text_encoder)?;
            Ok(())
        },
    )?;
    let interrupted = end.finished().is_none();
    // The last step is checkpointed too when it is not a multiple of --checkpoint-every.
    if !interrupted && state.step % run.train.checkpoint_every != 0 {
        checkpoint_path = save_checkpoint(run_dir, &run, &state, vae, text_encoder)?;
    }
    Ok(TrainOutcome {
        step: state.step,
        last_loss,
        interrupted,
        checkpoint: checkpoint_path,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The config of a distillation student that starts from `init`'s UNet when that UNet is a
/// wider copy of the student's architecture (`fewstep widen` of the teacher): `student` with the
/// init's widths, its quantization and guidance embedding kept. `None`: not wider (the same
/// architecture or another one, which loading the weights then refuses).
pub(crate) fn wider_student(student: &UNetConfig, init: &Path) -> Result<Option<UNetConfig>> {
    let path = init.join("unet").join(io::CONFIG_NAME);
    let mut wide =
        UNetConfig::from_json_str(&io::read_text(&path)?).map_err(|e| e.in_file(&path))?;
    wide.quantization_config = student.quantization_config.clone();
    if wide.time_cond_proj_dim.is_none() {
        wide.time_cond_proj_dim = student.time_cond_proj_dim;
    }
    Ok((wide != *student && student.same_but_width(&wide)).then_some(wide))
}

/// The side of the images a pipeline's UNet works on: its `sample_size`, times the VAE's
/// downsampling factor (2^(blocks − 1)) for a latent pipeline.
pub(crate) fn image_size(p: &pipeline::Pipeline) -> usize {
    let factor = p.vae.as_ref().map_or(1, |(c, _)| {
        1 << (c.block_out_channels.len().saturating_sub(1))
    });
    p.unet_config
        .sample_size
        .map_or(data::shapes::SIZE, |s| s * factor)
}

/// Images as the UNet sees them: unchanged for a pixel pipeline, the scaled (and shifted) VAE
/// latent mean for a latent one.
pub(crate) fn model_space(p: &pipeline::Pipeline, images: Tensor<4>) -> Tensor<4> {
    match &p.vae {
        Some((vc, vae)) => {
            let (mean, _) = vae.encode(images);
            let mean = match vc.shift_factor {
                Some(shift) => mean - shift,
                None => mean,
            };
            mean * vc.scaling_factor
        }
        None => images,
    }
}

/// A distilled student's UNet and the scheduler it samples with.
pub(crate) struct Student<'a> {
    pub unet_config: &'a UNetConfig,
    pub unet: &'a UNet,
    pub scheduler: &'a SchedulerConfig,
    pub algorithm: Algorithm,
}

/// Writes a finished student as a diffusers pipeline folder `dir` (the teacher's VAE beside it)
/// with `record` as `distill.json`, whole under a temporary name, then renamed.
pub(crate) fn write_student(
    dir: &Path,
    teacher: &pipeline::Pipeline,
    student: Student<'_>,
    record: &serde_json::Value,
) -> Result<()> {
    io::write_dir_atomic(dir, |incoming| {
        pipeline::save_pipeline(
            incoming,
            student.unet_config,
            student.unet,
            student.scheduler,
            student.algorithm,
            teacher.vae.as_ref().map(|(c, v)| (c, v)),
            teacher.text.as_ref(),
        )?;
        io::write_json(&incoming.join(DISTILL_RECORD), record)
    })
}

/// The figures of a finished student, written beside it.
pub const DISTILL_RECORD: &str = "distill.json";

/// The final loss and seconds of the student a finished run wrote in `student_dir`, or `None`
/// when there is none yet, or its record holds fewer than `iters` iterations (`--resume
/// --iters N` raised them since).
pub(crate) fn finished_student(student_dir: &Path, iters: usize) -> Option<(f64, f64)> {
    if !student_dir.join("model_index.json").is_file() {
        return None;
    }
    let recorded: serde_json::Value = io::read_text(&student_dir.join(DISTILL_RECORD))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    recorded["iters"]
        .as_u64()
        .is_none_or(|done| done as usize >= iters)
        .then(|| {
            (
                recorded["final_loss"].as_f64().unwrap_or(f64::NAN),
                recorded["seconds"].as_f64().unwrap_or(f64::NAN),
            )
        })
}

/// Opens the run's data at the model's sample size, reporting unreadable files once and checking
/// that a class-conditional model gets labelled images.
pub(crate) fn open_images(
    data: &DataSource,
    size: usize,
    num_class_embeds: Option<usize>,
) -> Result<TrainImages> {
    let images = data.open(size)?;
    if let TrainImages::Folder(folder) = &images {
        if !folder.unreadable.is_empty() {
            eprintln!(
                "warning: skipped {} unreadable image file(s) in {}: {}",
                folder.unreadable.len(),
                folder.root.display(),
                data::folder::describe_unreadable(&folder.unreadable)
            );
        }
        if let Some(k) = num_class_embeds
            && (!folder.fully_labelled() || folder.classes.len() + 1 != k)
        {
            return Err(Error::file(
                &folder.root,
                format!(
                    "--data: a class-conditional model with {} classes needs every image in one of {} class sub-folders (found {} sub-folders{})",
                    k - 1,
                    k - 1,
                    folder.classes.len(),
                    if folder.fully_labelled() {
                        ""
                    } else {
                        " and images directly under the root"
                    }
                ),
            ));
        }
    }
    Ok(images)
}

/// Opens `loss.csv` for appending, dropping rows past `step` (a resumed run rewrites them);
/// also returns the training seconds already spent (the last kept row's), so that the column
/// counts the whole run's wall time across restarts.
pub(crate) fn open_loss_csv(
    path: &Path,
    step: usize,
) -> Result<(std::io::BufWriter<std::fs::File>, f64)> {
    let kept: Vec<String> = match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .skip(1)
            .filter(|l| {
                l.split(',')
                    .next()
                    .and_then(|s| s.parse::<usize>().ok())
                    .is_some_and(|s| s <= step)
            })
            .map(String::from)
            .collect(),
        Err(_) => Vec::new(),
    };
    let spent = kept
        .last()
        .and_then(|l| l.rsplit(',').next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(0.0);
    let mut text = String::from("step,loss,lr,seconds\n");
    for l in kept {
        text.push_str(&l);
        text.push('\n');
    }
    io::write_atomic(path, text.as_bytes())?;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    Ok((std::io::BufWriter::new(f), spent))
}

/// Whether a loop should print progress lines: without a terminal (nohup, CI logs) indicatif
/// draws nothing, so the loops print a line every 50 steps instead.
pub(crate) fn log_lines(quiet: bool) -> bool {
    !quiet && !std::io::IsTerminal::is_terminal(&std::io::stderr())
}

pub(crate) fn progress_bar(total: usize, at: usize, quiet: bool) -> indicatif::ProgressBar {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} step {pos}/{len} | {msg} | {elapsed_precise} < {eta_precise}",
        )
        .expect("valid template"),
    );
    bar.set_position(at as u64);
    bar
}

#[cfg(test)]
mod tests {
    use super::TrainConfig;

    #[test]
    fn cooldown_decays_the_learning_rate_linearly_to_zero_over_the_last_steps() {
        let config = TrainConfig {
            steps: 100,
            lr: 1e-3,
            warmup: 10,
            cooldown: 20,
            ..TrainConfig::default()
        };
        config.validate().unwrap();
        assert!((config.lr_at(4) - 5e-4).abs() < 1e-12);
        assert!((config.lr_at(79) - 1e-3).abs() < 1e-12);
        assert!((config.lr_at(80) - 1e-3).abs() < 1e-12);
        assert!((config.lr_at(90) - 5e-4).abs() < 1e-12);
        assert!((config.lr_at(99) - 5e-5).abs() < 1e-12);
        let constant = TrainConfig {
            cooldown: 0,
            ..config.clone()
        };
        assert!((constant.lr_at(99) - 1e-3).abs() < 1e-12);
        let too_long = TrainConfig {
            cooldown: 101,
            ..config
        };
        assert!(too_long.validate().is_err());
    }
}
