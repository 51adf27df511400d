//! The distribution-matching loop (`distill::dmd`'s objective, DMD2's two time-scale form): the
//! generator starts from `--init` (a consistency student, or the teacher read as a consistency
//! function), the fake score network from the teacher. Each iteration takes `fake_updates`
//! denoising steps of the fake score network on fresh generator samples, then, after
//! `fake_warmup` iterations, one generator step on the distribution-matching gradient (plus an
//! optional regression term towards the frozen `--init` generator's output for the same input).
//! With `gan`, DMD2's adversarial term: heads on the fake score network's encoder learn to tell
//! noised data from noised generator samples (their loss joins the fake network's, which it
//! also trains), and the generator takes their non-saturating loss. Each step is data-parallel
//! over `--devices` and `--nodes` ([`data_parallel::loss_and_grads`]): the iteration's draws are
//! of the whole batch, and each shard takes its rows.
//!
//! Run folder: `run.json`, `loss.csv` (the generator's loss; the fake score's denoising loss, and
//! with `gan` the heads' classification loss and the generator's adversarial loss, in the progress
//! line), `checkpoints/{latest,previous}` (generator and its optimiser in `state/`, its EMA in
//! `state/ema.safetensors`, the fake score network and its optimiser in `fake/state/`, the
//! adversarial heads and theirs in `gan/state/`), and `student/` at the end: an `LCMScheduler`
//! pipeline folder that samples in 1, 2, 4 … steps.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use fewstep_schedulers::{Algorithm, Prediction, SchedulerConfig};
use serde_json::json;

use super::run_loop::{IterReport, LoopSpec, run_loop};
use super::teacher_conditioning::TeacherConditioning;
use super::{checkpoint, data_parallel, ema, open_images};
use crate::data::{DataSource, TrainImages};
use crate::denoiser::{guided_output, model_output, noise_to, per_row, x0_from_output};
use crate::distill::consistency::{
    At, ConsistencyStep, Distance, HEAD_WIDTH, adversarial_discriminator_loss,
    adversarial_generator_loss, consistency_output, discriminator_logits, distance,
};
use crate::distill::dmd::{distribution_matching_loss, generator_steps, score_timesteps};
use crate::distill::gan::GanLoss;
use crate::error::{Error, Result};
use crate::io;
use crate::models::feature_heads::{ConsistencyDiscriminator, FeatureHeads};
use crate::models::{Conditioning, UNet, UNetConfig};
use crate::noise::NoiseStream;
use crate::pipeline::{self, Pipeline};

/// The `run.json` kind of a distribution-matching run.
pub const DMD_RUN: &str = "distill-dmd";

/// The folder of the finished generator inside the run folder.
pub const STUDENT_DIR: &str = "student";

/// Settings of a distribution-matching run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DmdConfig {
    pub iters: usize,
    pub batch: usize,
    /// The generator's learning rate (after its warm-up).
    pub lr: f64,
    /// The fake score network's learning rate.
    pub fake_lr: f64,
    /// Fake-score steps per generator step (DMD2: 5).
    pub fake_updates: usize,
    /// Iterations at the start in which only the fake score network learns (it starts as the
    /// teacher, not as the score of the generator's samples).
    pub fake_warmup: usize,
    /// Linear learning-rate warm-up of the generator, in its own steps.
    pub warmup: usize,
    /// LCM sampling steps the generator is trained at (DMD2's backward simulation): each
    /// iteration picks one of them; inputs to the later ones come from the generator's own
    /// earlier steps.
    pub sampling_steps: usize,
    /// The skipping grid (`original_inference_steps`) when `--init` is not an LCM pipeline.
    pub scales: usize,
    pub timestep_scaling: f32,
    /// Classifier-free guidance of the teacher's ("real") score, w in c + w·(c − u).
    pub guidance: Option<f32>,
    /// Weight of the regression term towards the frozen `--init` generator (0: none).
    pub regression: f32,
    pub regression_distance: Distance,
    /// DMD2's adversarial term (`None`: none).
    #[serde(default)]
    pub gan: Option<DmdGan>,
    pub optimizer: super::optim::OptimizerConfig,
    /// EMA decay of the written generator (`None`: the raw generator).
    pub ema_decay: Option<f32>,
    pub seed: u64,
    pub checkpoint_every: usize,
}

/// DMD2's adversarial term: a head on each of the fake score network's encoder maps tells noised
/// data from noised generator samples (both at the score's timesteps, with the non-saturating
/// loss); the heads and the fake network learn it, the generator learns to fool them.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DmdGan {
    /// Weight of the generator's adversarial loss against the distribution-matching loss's 1
    /// (DMD2: 3e-3 on ImageNet 64×64, 5e-3 on SDXL).
    pub generator_weight: f32,
    /// Weight of the classification loss in the fake network's objective, against its
    /// denoising loss's 1 (DMD2: 1e-2).
    pub fake_weight: f32,
}

impl DmdConfig {
    pub fn validate(&self) -> Result<()> {
        self.optimizer.validate()?;
        for (name, v) in [
            ("--iters", self.iters),
            ("--batch", self.batch),
            ("--checkpoint-every", self.checkpoint_every),
            ("--fake-updates", self.fake_updates),
            ("--sampling-steps", self.sampling_steps),
            ("--scales", self.scales),
        ] {
            if v == 0 {
                return Err(Error::Usage(format!("{name} must be at least 1")));
            }
        }
        if self.fake_warmup >= self.iters {
            return Err(Error::Usage(format!(
                "--fake-warmup {}: expected fewer than --iters ({}), or the generator never learns",
                self.fake_warmup, self.iters
            )));
        }
        for (name, lr) in [("--lr", self.lr), ("--fake-lr", self.fake_lr)] {
            if !(lr > 0.0 && lr.is_finite()) {
                return Err(Error::Usage(format!(
                    "{name} must be a positive number, got {lr}"
                )));
            }
        }
        if !(self.timestep_scaling > 0.0 && self.timestep_scaling.is_finite()) {
            return Err(Error::Usage(format!(
                "--timestep-scaling {}: expected a positive number",
                self.timestep_scaling
            )));
        }
        if !(self.regression >= 0.0 && self.regression.is_finite()) {
            return Err(Error::Usage(format!(
                "--regression {}: expected a weight of 0 or more",
                self.regression
            )));
        }
        if let Some(w) = self.guidance
            && !(w >= 0.0 && w.is_finite())
        {
            return Err(Error::Usage(format!(
                "--guidance {w}: expected a scale of 0 or more"
            )));
        }
        if let Some(decay) = self.ema_decay {
            ema::check_decay(decay)?;
        }
        if let Some(g) = self.gan {
            for (name, w) in [
                ("--gan-weight", g.generator_weight),
                ("--gan-fake-weight", g.fake_weight),
            ] {
                if !(w > 0.0 && w.is_finite()) {
                    return Err(Error::Usage(format!(
                        "{name} {w}: expected a positive weight"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The generator's learning rate at `iter`: 0 during the fake-score warm-up, then a linear
    /// warm-up to `lr`.
    pub fn lr_at(&self, iter: usize) -> f64 {
        match iter.checked_sub(self.fake_warmup) {
            None => 0.0,
            Some(k) => self.lr * super::warmup_factor(k, self.warmup),
        }
    }
}

/// Everything that defines a distribution-matching run (stored as `run.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DmdRun {
    pub kind: String,
    /// The teacher's pipeline folder (absolute): the real score, and the fake score's start.
    pub teacher: PathBuf,
    /// The pipeline folder the generator starts from (absolute).
    pub init: PathBuf,
    pub config: DmdConfig,
    /// Where the conditioning (labels, captions) of each batch is drawn from.
    pub data: DataSource,
}

/// What a distribution-matching run reports.
#[derive(Debug, Clone)]
pub struct DmdOutcome {
    /// The generator's pipeline folder (absent when interrupted).
    pub student: Option<PathBuf>,
    pub final_loss: f64,
    pub seconds: f64,
}

/// The scheduler the generator samples with: `init`'s own when it is an `LCMScheduler`, else
/// `init`'s noise schedule and prediction as an `LCMScheduler` over `cfg.scales`.
pub fn generator_scheduler(init: &SchedulerConfig, cfg: &DmdConfig) -> SchedulerConfig {
    if init.class == Some(Algorithm::Lcm) {
        return init.clone();
    }
    let mut s = init.clone();
    s.prediction_type = Some(init.resolve(Algorithm::Lcm).prediction);
    s.class = Some(Algorithm::Lcm);
    s.original_inference_steps = Some(cfg.scales);
    s.timestep_scaling = Some(cfg.timestep_scaling);
    s.distilled_steps = None;
    s
}

struct State {
    generator: UNet,
    optim: ModuleOptimizer,
    ema: Option<UNet>,
    critic: Critic,
    fake_optim: ModuleOptimizer,
    /// The adversarial heads' optimiser (the fake network's settings and rate, as DMD2 trains
    /// them as one).
    heads_optim: Option<ModuleOptimizer>,
}

/// What each fake-score step trains in one backward pass: the fake score network and, with the
/// adversarial term, the heads on its encoder (each with its own optimiser, checkpointed apart).
#[derive(Module, Debug)]
struct Critic {
    score: UNet,
    heads: Option<ConsistencyDiscriminator>,
}

/// Fresh adversarial heads for `fake`'s encoder maps on `device` (an autodiff device), from the
/// run's seed.
fn new_heads(fake: &UNet, cfg: &DmdConfig, device: &Device) -> ConsistencyDiscriminator {
    device.seed(cfg.seed);
    ConsistencyDiscriminator {
        heads: Some(FeatureHeads::new(
            &fake.encoder_channels(),
            HEAD_WIDTH,
            device,
        )),
        pixels: None,
    }
}

const EMA_WEIGHTS: &str = "ema.safetensors";
/// The fake score network's training state inside a checkpoint (`fake/state/`).
const FAKE_DIR: &str = "fake";
/// The adversarial heads' training state inside a checkpoint (`gan/state/`).
const GAN_DIR: &str = "gan";

fn written(state: &State) -> UNet {
    state.ema.clone().unwrap_or_else(|| state.generator.valid())
}

fn save_checkpoint(
    run_dir: &Path,
    teacher: &Pipeline,
    unet_config: &UNetConfig,
    scheduler: &SchedulerConfig,
    state: &State,
    iter: usize,
) -> Result<()> {
    let dir = checkpoint::incoming(run_dir)?;
    pipeline::save_pipeline(
        &dir,
        unet_config,
        &written(state),
        scheduler,
        Algorithm::Lcm,
        teacher.vae.as_ref().map(|(c, v)| (c, v)),
        teacher.text.as_ref(),
    )?;
    let progress = json!({ "iter": iter });
    checkpoint::write_state(&dir, &state.generator, &state.optim, &progress)?;
    if let Some(ema) = &state.ema {
        io::save_weights(ema, &dir.join("state").join(EMA_WEIGHTS))?;
    }
    checkpoint::write_state(
        &dir.join(FAKE_DIR),
        &state.critic.score,
        &state.fake_optim,
        &progress,
    )?;
    if let (Some(heads), Some(optim)) = (&state.critic.heads, &state.heads_optim) {
        checkpoint::write_state(&dir.join(GAN_DIR), heads, optim, &progress)?;
    }
    checkpoint::publish(run_dir).map(|_| ())
}

fn load_checkpoint(
    run_dir: &Path,
    unet_config: &UNetConfig,
    fake_config: &UNetConfig,
    cfg: &DmdConfig,
    device: &Device,
) -> Result<Option<(State, usize)>> {
    let Some(ckpt) = checkpoint::latest(run_dir) else {
        return Ok(None);
    };
    let ad = device.clone().autodiff();
    let st = checkpoint::read_state(&ckpt, unet_config.init(&ad), cfg.optimizer.init())?;
    let iter = st.progress["iter"]
        .as_u64()
        .ok_or_else(|| Error::file(ckpt.join("state/state.json"), "no `iter`"))?
        as usize;
    let ema = match cfg.ema_decay {
        Some(_) => Some(io::load_weights_with_ids(
            unet_config.init(device),
            &ckpt.join("state").join(EMA_WEIGHTS),
            Some(&st.ids),
        )?),
        None => None,
    };
    let fake = checkpoint::read_state(
        &ckpt.join(FAKE_DIR),
        fake_config.init(&ad),
        cfg.optimizer.init(),
    )?;
    let (heads, heads_optim) = match cfg.gan {
        Some(_) => {
            let fresh = new_heads(&fake.model, cfg, &ad);
            let hs = checkpoint::read_state(&ckpt.join(GAN_DIR), fresh, cfg.optimizer.init())?;
            (Some(hs.model), Some(hs.optim))
        }
        None => (None, None),
    };
    Ok(Some((
        State {
            generator: st.model,
            optim: st.optim,
            ema,
            critic: Critic {
                score: fake.model,
                heads,
            },
            fake_optim: fake.optim,
            heads_optim,
        },
        iter,
    )))
}

/// What the generator and both scores need to run.
struct Sides<'a> {
    teacher: &'a Pipeline,
    teacher_prediction: Prediction,
    generator_prediction: Prediction,
    steps: &'a [ConsistencyStep],
    alpha_bars: &'a [f64],
    schedule: &'a fewstep_schedulers::NoiseSchedule,
    conditioning: &'a TeacherConditioning,
    shape: [usize; 4],
}

impl Sides<'_> {
    /// The input of sampling step `level` for a batch: noise at the first step; for later
    /// steps, the generator's own LCM sampler run (without gradients) from noise to there.
    fn generator_input(
        &self,
        generator: &UNet,
        level: usize,
        cond: &Conditioning,
        rng: &mut NoiseStream,
        device: &Device,
    ) -> Tensor<4> {
        let mut x = crate::sample::host_noise(rng, self.shape, device);
        for i in 0..level {
            let step = self.steps[i];
            let x0 = consistency_output(
                generator,
                self.generator_prediction,
                x,
                &vec![step; self.shape[0]],
                At::Start,
                cond,
                None,
            );
            let next = self.steps[i + 1].alpha_bar_t;
            let noise = crate::sample::host_noise(rng, self.shape, device);
            x = noise_to(x0, noise, &vec![next; self.shape[0]]);
        }
        x
    }

    /// A level drawn uniformly from the generator's sampling steps.
    fn level(&self, rng: &mut NoiseStream) -> usize {
        rng.below(self.steps.len() as u64) as usize
    }

    /// x̂0 of `unet` (of the teacher's prediction type) at `xt`, timesteps `t`; with `guidance`,
    /// classifier-free guided against the unconditional conditioning.
    fn score_x0(
        &self,
        unet: &UNet,
        xt: Tensor<4>,
        t: &[usize],
        cond: &Conditioning,
        guidance: Option<f32>,
    ) -> Tensor<4> {
        let device = xt.device();
        let t_i: Vec<i64> = t.iter().map(|&t| t as i64).collect();
        let a: Vec<f64> = t.iter().map(|&t| self.alpha_bars[t]).collect();
        let uncond = guidance.and_then(|_| self.conditioning.uncond(t.len(), &device));
        let out = match (guidance, uncond) {
            (Some(w), Some(uncond)) => {
                let t_in: Vec<f32> = t.iter().map(|&t| t as f32).collect();
                guided_output(
                    unet,
                    xt.clone(),
                    Tensor::<1>::from_floats(t_in.as_slice(), &device),
                    &uncond.concat(cond.clone()),
                    per_row(vec![w + 1.0; t.len()], &device),
                )
            }
            _ => model_output(unet, xt.clone(), &t_i, cond),
        };
        x0_from_output(self.teacher_prediction, xt, out, &a)
    }

    /// The adversarial heads' logits for `x0` (on the autodiff device) noised to timesteps `t`
    /// with `eps`: [`discriminator_logits`] with `fake`'s encoder as the backbone.
    fn realism(
        &self,
        fake: &UNet,
        heads: &ConsistencyDiscriminator,
        x0: Tensor<4>,
        eps: Tensor<4>,
        t: &[usize],
        cond: &Conditioning,
    ) -> Vec<Tensor<2>> {
        let t_i: Vec<i64> = t.iter().map(|&t| t as i64).collect();
        let a: Vec<f64> = t.iter().map(|&t| self.alpha_bars[t]).collect();
        discriminator_logits(Some(fake), heads, x0, eps, &t_i, &a, cond)
    }

    /// The draws of one fake-score step for the whole batch (its shards take their rows): the
    /// denoising loss's timesteps and noise, then with `gan` the heads' timesteps and the noise
    /// of the real and of the generated rows.
    fn critic_draws(&self, gan: bool, rng: &mut NoiseStream, device: &Device) -> CriticDraws {
        let t: Vec<usize> = (0..self.shape[0])
            .map(|_| rng.below(self.alpha_bars.len() as u64) as usize)
            .collect();
        let eps = crate::sample::host_noise(rng, self.shape, device);
        let judged = gan.then(|| {
            let uniform: Vec<f64> = (0..self.shape[0]).map(|_| rng.uniform()).collect();
            let t = score_timesteps(self.alpha_bars.len(), &uniform);
            let real = crate::sample::host_noise(rng, self.shape, device);
            let fake = crate::sample::host_noise(rng, self.shape, device);
            JudgeDraws { t, real, fake }
        });
        CriticDraws { t, eps, judged }
    }

    /// One shard's losses of a fake-score step, on generator samples `x0` (autodiff side): the
    /// fake network's denoising loss (the teacher's objective,
    /// [`super::diffusion::denoising_loss`]) and, with heads and `real` rows, the heads'
    /// non-saturating classification loss of noised `real` against noised `x0`.
    fn critic_losses(
        &self,
        critic: &Critic,
        x0: Tensor<4>,
        real: Option<Tensor<4>>,
        draws: &CriticDraws,
        shard: &data_parallel::Shard<'_>,
        cond: &Conditioning,
    ) -> (Tensor<1>, Option<Tensor<1>>) {
        let denoising = super::diffusion::denoising_loss(
            &critic.score,
            x0.clone(),
            shard.take(&draws.eps).autodiff(),
            &shard.take_list(&draws.t),
            cond,
            self.schedule,
            self.teacher_prediction,
            None,
        );
        let heads = match (&critic.heads, real, &draws.judged) {
            (Some(heads), Some(real), Some(j)) => {
                let t = shard.take_list(&j.t);
                let judge = |x: Tensor<4>, eps: &Tensor<4>| {
                    let eps = shard.take(eps).autodiff();
                    self.realism(&critic.score, heads, x, eps, &t, cond)
                };
                let (on_real, on_fake) = (judge(real, &j.real), judge(x0, &j.fake));
                Some(adversarial_discriminator_loss(
                    GanLoss::NonSaturating,
                    on_real,
                    on_fake,
                ))
            }
            _ => None,
        };
        (denoising, heads)
    }
}

/// See [`Sides::critic_draws`].
struct CriticDraws {
    t: Vec<usize>,
    eps: Tensor<4>,
    judged: Option<JudgeDraws>,
}

struct JudgeDraws {
    t: Vec<usize>,
    real: Tensor<4>,
    fake: Tensor<4>,
}

/// Row-weighted means of the loss parts the progress line shows, summed over the shards of a
/// data-parallel step (each shard adds its own mean with its row count; in a multi-process run,
/// over this process's rows).
#[derive(Default)]
struct ShownParts(std::sync::Mutex<[(f64, usize); 3]>);

impl ShownParts {
    const FAKE: usize = 0;
    const HEADS: usize = 1;
    const ADVERSARIAL: usize = 2;

    fn add(&self, part: usize, mean: &Tensor<1>, rows: usize) {
        let value = mean.clone().into_scalar::<f32>() as f64;
        let mut parts = self.0.lock().expect("no shard panicked holding the lock");
        parts[part].0 += value * rows as f64;
        parts[part].1 += rows;
    }

    /// The part's mean over the rows added; `None` if no shard added it.
    fn mean(&self, part: usize) -> Option<f32> {
        let (sum, rows) = self.0.lock().expect("no shard panicked holding the lock")[part];
        (rows > 0).then(|| (sum / rows as f64) as f32)
    }
}

/// One batch of rows drawn from the run's data: their images (in the teacher's space: the
/// adversarial term's real side) and their conditioning (labels or captions).
fn draw_rows(
    sides: &Sides<'_>,
    images: &TrainImages,
    rng: &mut NoiseStream,
    device: &Device,
) -> Result<(Tensor<4>, Conditioning)> {
    let (x, labels, rows) = images.random_rows(rng, sides.shape[0], device);
    let cond = sides
        .conditioning
        .batch(sides.teacher, labels, &rows, rng, device)?;
    Ok((x, cond))
}

/// Raises a stored run's iterations to `iters` (`--resume --iters N`): the run continues from
/// its latest checkpoint to the new total, a finished one included, and rewrites its generator.
/// The learning rate is constant after its warm-up, so the extended run is the longer run.
pub fn extend_run(run_dir: &Path, iters: usize) -> Result<()> {
    checkpoint::extend_run(run_dir, DMD_RUN, iters, |run: &mut DmdRun, n| {
        run.config.iters = n;
        run.config.validate()
    })
}

/// Runs (or resumes) distribution-matching distillation in `run_dir` on `device`.
pub fn distill_dmd(
    run_dir: &Path,
    run: Option<DmdRun>,
    resume: bool,
    devices: &[Device],
    quiet: bool,
) -> Result<DmdOutcome> {
    let device = devices
        .first()
        .ok_or_else(|| Error::Usage("--devices: expected at least one device".into()))?;
    let run = match (resume, run) {
        (true, _) => checkpoint::read_run_as::<DmdRun>(run_dir, DMD_RUN)?,
        (false, None) => return Err(Error::Usage("nothing to distill: give a teacher".into())),
        (false, Some(run)) => run,
    };
    let cfg = &run.config;
    let student_dir = run_dir.join(STUDENT_DIR);
    // A finished run returns its generator, unless `extend_run` raised its iterations since.
    if resume && let Some((final_loss, seconds)) = super::finished_student(&student_dir, cfg.iters)
    {
        return Ok(DmdOutcome {
            student: Some(student_dir),
            final_loss,
            seconds,
        });
    }
    // Everything is checked against the teacher and the init before a run folder is made.
    cfg.validate()?;
    let teacher = Pipeline::load(&run.teacher, device)?;
    let init = Pipeline::load(&run.init, device)?;
    if init.unet_config.time_cond_proj_dim.is_some() {
        return Err(Error::file(
            &run.init,
            "--init: a guidance-conditioned student (time_cond_proj_dim) is not supported by distill dmd; start from an unconditioned student or the teacher",
        ));
    }
    if init.unet_config.in_channels != teacher.unet_config.in_channels
        || init.unet_config.sample_size != teacher.unet_config.sample_size
        || init.vae.is_some() != teacher.vae.is_some()
    {
        return Err(Error::file(
            &run.init,
            "--init: expected a generator in the teacher's image space (same channels, sample size and VAE)",
        ));
    }
    let scheduler = generator_scheduler(&init.scheduler, cfg);
    let steps = generator_steps(&scheduler, cfg.sampling_steps).map_err(|e| {
        Error::Usage(format!(
            "--sampling-steps {}: {} (the generator's grid has {} scales)",
            cfg.sampling_steps,
            e.0,
            scheduler.resolve(Algorithm::Lcm).original_inference_steps
        ))
    })?;
    let schedule = teacher
        .scheduler
        .noise_schedule(Algorithm::Lcm)
        .map_err(|e| Error::file(&run.teacher, e.0))?;
    let alpha_bars: Vec<f64> = (0..schedule.num_train_timesteps())
        .map(|t| schedule.alpha_bar(t) as f64)
        .collect();
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
    let size = teacher
        .unet_config
        .sample_size
        .unwrap_or(crate::data::shapes::SIZE);
    let sides = Sides {
        teacher: &teacher,
        teacher_prediction: teacher.scheduler.resolve(Algorithm::Lcm).prediction,
        generator_prediction: scheduler.resolve(Algorithm::Lcm).prediction,
        steps: &steps,
        alpha_bars: &alpha_bars,
        schedule: &schedule,
        conditioning: &conditioning,
        shape: [cfg.batch, teacher.unet_config.in_channels, size, size],
    };
    // The regression term's frozen reference, and the teacher on the autodiff side for the
    // teacher-feature distance.
    let anchors = (cfg.regression > 0.0).then(|| {
        data_parallel::replicate(
            &crate::models::quant::trainable_weights(init.unet.clone()),
            devices,
        )
    });
    let feature_nets =
        if cfg.regression > 0.0 && cfg.regression_distance == Distance::TeacherFeatures {
            data_parallel::frozen_through(&teacher.unet, device, devices)
        } else {
            Vec::new()
        };
    let teachers = data_parallel::replicate(&teacher.unet, devices);
    let unet_config = {
        let mut c = init.unet_config.clone();
        c.quantization_config = None;
        c
    };
    let fake_config = {
        let mut c = teacher.unet_config.clone();
        c.quantization_config = None;
        c
    };
    if !resume {
        checkpoint::prepare_new_run(run_dir)?;
        io::write_json(
            &run_dir.join(checkpoint::RUN_FILE),
            &serde_json::to_value(&run).expect("run serialises"),
        )?;
    }
    let ad = device.clone().autodiff();
    let state = match load_checkpoint(run_dir, &unet_config, &fake_config, cfg, device)? {
        Some(s) => s,
        None => {
            let (_, generator) = pipeline::load_unet(&run.init.join("unet"), &ad)?;
            let generator = crate::models::quant::trainable_weights(generator);
            let (_, fake) = pipeline::load_unet(&run.teacher.join("unet"), &ad)?;
            let fake = crate::models::quant::trainable_weights(fake);
            (
                State {
                    ema: cfg.ema_decay.map(|_| generator.valid()),
                    generator,
                    optim: cfg.optimizer.init(),
                    critic: Critic {
                        heads: cfg.gan.map(|_| new_heads(&fake, cfg, &ad)),
                        score: fake,
                    },
                    fake_optim: cfg.optimizer.init(),
                    heads_optim: cfg.gan.map(|_| cfg.optimizer.init()),
                },
                0,
            )
        }
    };
    let (state, start) = state;
    if !quiet {
        eprintln!(
            "distribution matching distillation of {} from {} ({} sampling step{}, {} iterations of batch {}, {} fake-score step{} each)",
            run.teacher.display(),
            run.init.display(),
            cfg.sampling_steps,
            if cfg.sampling_steps == 1 { "" } else { "s" },
            cfg.iters,
            cfg.batch,
            cfg.fake_updates,
            if cfg.fake_updates == 1 { "" } else { "s" },
        );
    }
    let csv_path = run_dir.join("loss.csv");
    let spec = LoopSpec {
        name: "dmd",
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
            // Order of draws: rows, then per fake step its level, sampler noise, denoising
            // timesteps and noise (with `gan`: then the heads' timesteps and the real and
            // generated rows' noise), then the generator step's level, sampler noise, score
            // timesteps and noise (fixed: resume relies on it). Every draw is of the whole
            // batch; a data-parallel shard takes its rows.
            let mut rng = NoiseStream::for_step(cfg.seed, iter as u64);
            let (real, cond) = draw_rows(&sides, &images, &mut rng, device)?;
            let real = cfg.gan.map(|_| super::model_space(&teacher, real));
            // The fake-score network's denoising loss, and with `gan` the heads' classification
            // loss (2·ln 2 ≈ 1.386 at chance) and the generator's adversarial loss, unweighted,
            // for the progress line.
            let shown = ShownParts::default();
            // The generator does not change during the fake-score steps.
            let generator = state.generator.valid();
            let generators = data_parallel::replicate(&generator, devices);
            for _ in 0..cfg.fake_updates {
                let level = sides.level(&mut rng);
                let x = sides.generator_input(&generator, level, &cond, &mut rng, device);
                let draws = sides.critic_draws(cfg.gan.is_some(), &mut rng, device);
                let (_, mut grads) = data_parallel::loss_and_grads(
                    &state.critic,
                    devices,
                    cfg.batch,
                    |critic, shard| {
                        let rows = shard.rows.len();
                        let cond = shard.take_conditioning(&cond);
                        let x0 = consistency_output(
                            &generators[shard.index],
                            sides.generator_prediction,
                            shard.take(&x),
                            &vec![steps[level]; rows],
                            At::Start,
                            &cond,
                            None,
                        );
                        let real = real.as_ref().map(|r| shard.take(r).autodiff());
                        let ad_cond = cond.autodiff();
                        let (denoising, heads) = sides.critic_losses(
                            critic,
                            x0.autodiff(),
                            real,
                            &draws,
                            shard,
                            &ad_cond,
                        );
                        shown.add(ShownParts::FAKE, &denoising, rows);
                        match (heads, cfg.gan) {
                            (Some(heads), Some(g)) => {
                                shown.add(ShownParts::HEADS, &heads, rows);
                                denoising + heads.mul_scalar(g.fake_weight)
                            }
                            _ => denoising,
                        }
                    },
                )?;
                let Critic { score, heads } = state.critic;
                let heads = match (heads, state.heads_optim.as_mut()) {
                    (Some(heads), Some(optim)) => {
                        let g = data_parallel::take_grads(&mut grads, &heads);
                        Some(optim.step(cfg.fake_lr, heads, g))
                    }
                    (heads, _) => heads,
                };
                let score = state.fake_optim.step(cfg.fake_lr, score, grads);
                state.critic = Critic { score, heads };
            }
            let level = sides.level(&mut rng);
            let x = sides.generator_input(&generator, level, &cond, &mut rng, device);
            let uniform: Vec<f64> = (0..cfg.batch).map(|_| rng.uniform()).collect();
            let t = score_timesteps(alpha_bars.len(), &uniform);
            let eps = crate::sample::host_noise(&mut rng, sides.shape, device);
            let fakes = data_parallel::replicate(&state.critic.score.valid(), devices);
            // The adversarial term's critic, frozen: gradients pass through it to the generator.
            let judges = match cfg.gan {
                Some(_) => data_parallel::frozen_through(&state.critic.valid(), device, devices),
                None => Vec::new(),
            };
            let (value, grads) = data_parallel::loss_and_grads(
                &state.generator,
                devices,
                cfg.batch,
                |generator, shard| {
                    let rows = shard.rows.len();
                    let (x, t, eps) = (shard.take(&x), shard.take_list(&t), shard.take(&eps));
                    let cond = shard.take_conditioning(&cond);
                    let ad_cond = cond.clone().autodiff();
                    let row_steps = vec![steps[level]; rows];
                    let x0 = consistency_output(
                        generator,
                        sides.generator_prediction,
                        x.clone().autodiff(),
                        &row_steps,
                        At::Start,
                        &ad_cond,
                        None,
                    );
                    let a: Vec<f64> = t.iter().map(|&t| alpha_bars[t]).collect();
                    let xt = noise_to(x0.clone().inner(), eps.clone(), &a);
                    let teacher = &teachers[shard.index];
                    let real = sides.score_x0(teacher, xt.clone(), &t, &cond, cfg.guidance);
                    let fake = sides.score_x0(&fakes[shard.index], xt, &t, &cond, None);
                    let mut loss =
                        distribution_matching_loss(x0.clone(), real.autodiff(), fake.autodiff());
                    if let Some(anchors) = &anchors {
                        let reference = consistency_output(
                            &anchors[shard.index],
                            sides.generator_prediction,
                            x,
                            &row_steps,
                            At::Start,
                            &cond,
                            None,
                        );
                        let features = feature_nets.get(shard.index).map(|net| (net, &ad_cond));
                        loss = loss
                            + distance(
                                x0.clone(),
                                reference.autodiff(),
                                cfg.regression_distance,
                                features,
                            )
                            .mul_scalar(cfg.regression);
                    }
                    let loss = loss.mean();
                    match (cfg.gan, judges.get(shard.index)) {
                        // The same timesteps and noise as the distribution-matching term,
                        // through the fake network and the heads.
                        (
                            Some(g),
                            Some(Critic {
                                score,
                                heads: Some(heads),
                            }),
                        ) => {
                            let logits =
                                sides.realism(score, heads, x0, eps.autodiff(), &t, &ad_cond);
                            let adversarial =
                                adversarial_generator_loss(GanLoss::NonSaturating, logits);
                            shown.add(ShownParts::ADVERSARIAL, &adversarial, rows);
                            loss + adversarial.mul_scalar(g.generator_weight)
                        }
                        _ => loss,
                    }
                },
            )?;
            let lr = cfg.lr_at(iter);
            if lr > 0.0 {
                state.generator = state.optim.step(lr, state.generator, grads);
                if let (Some(decay), Some(e)) = (cfg.ema_decay, state.ema.take()) {
                    let k = iter - cfg.fake_warmup;
                    state.ema = Some(ema::update(
                        e,
                        &state.generator.valid(),
                        ema::decay_at(k, decay),
                    ));
                }
            }
            Ok((
                state,
                IterReport {
                    loss: value,
                    lr,
                    note: {
                        let fake = shown.mean(ShownParts::FAKE).unwrap_or(f32::NAN);
                        let heads = shown.mean(ShownParts::HEADS).unwrap_or(f32::NAN);
                        match shown.mean(ShownParts::ADVERSARIAL) {
                            Some(adv) => format!(
                                " | fake {fake:.4} | heads {heads:.3} | adversarial {adv:.3}"
                            ),
                            None => format!(" | fake {fake:.4}"),
                        }
                    },
                },
            ))
        },
        |state, done| save_checkpoint(run_dir, &teacher, &unet_config, &scheduler, state, done),
    )?;
    let Some((final_loss, seconds)) = end.finished() else {
        return Ok(DmdOutcome {
            student: None,
            final_loss: f64::NAN,
            seconds: f64::NAN,
        });
    };
    super::write_student(
        &student_dir,
        &teacher,
        super::Student {
            unet_config: &unet_config,
            unet: &written(&state),
            scheduler: &scheduler,
            algorithm: Algorithm::Lcm,
        },
        &json!({
            "method": "dmd",
            "teacher": run.teacher,
            "init": run.init,
            "final_loss": final_loss,
            "seconds": seconds,
            "iters": cfg.iters,
            "sampling_steps": cfg.sampling_steps,
        }),
    )?;
    Ok(DmdOutcome {
        student: Some(student_dir),
        final_loss,
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DmdConfig {
        DmdConfig {
            iters: 10,
            batch: 2,
            lr: 1e-5,
            fake_lr: 1e-5,
            fake_updates: 1,
            fake_warmup: 4,
            warmup: 2,
            sampling_steps: 1,
            scales: 20,
            timestep_scaling: 10.0,
            guidance: None,
            regression: 0.0,
            regression_distance: Distance::L2,
            gan: None,
            optimizer: crate::train::optim::OptimizerConfig::distillation(),
            ema_decay: None,
            seed: 0,
            checkpoint_every: 5,
        }
    }

    #[test]
    fn the_generator_rests_through_the_fake_warmup_then_warms_up() {
        let cfg = config();
        assert!((0..4).all(|i| cfg.lr_at(i) == 0.0));
        assert!((cfg.lr_at(4) - 5e-6).abs() < 1e-15);
        assert!((cfg.lr_at(6) - 1e-5).abs() < 1e-15);
        let mut bad = config();
        bad.fake_warmup = 10;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn a_teacher_init_samples_as_an_lcm_scheduler_over_the_given_scales() {
        let teacher = crate::distill::test_scheduler_config();
        let s = generator_scheduler(&teacher, &config());
        assert_eq!(s.class, Some(Algorithm::Lcm));
        let r = s.resolve(Algorithm::Lcm);
        assert_eq!(r.original_inference_steps, 20);
        assert_eq!(r.prediction, Prediction::V);
        // An LCM pipeline keeps its own grid.
        let mut lcm = s.clone();
        lcm.original_inference_steps = Some(50);
        assert_eq!(generator_scheduler(&lcm, &config()), lcm);
    }
}
