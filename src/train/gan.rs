//! GAN training: the teacher (`fewstep train-gan`) and KD-GAN co-distillation
//! (`fewstep distill gan`) share this loop — per iteration one discriminator step, then one
//! generator step (two Adam optimisers), a power iteration of every spectral norm, and an EMA of
//! the generator, with the distillation loop's progress, checkpoints, resume, Ctrl-C and NaN
//! guard.
//!
//! Teacher: the ordinary adversarial game on the data. Co-distillation (Aguinaldo et al. 2019
//! with GAN Compression's feature term): the student G_S sees the teacher's z and minimises
//!
//! ```text
//! λ_out·d(G_S(z), G_T(z)) + λ_feat·Σ_l ‖r_l(f_S,l) − f_T,l‖² + λ_perc·‖φ(G_S(z)) − φ(G_T(z))‖²
//!     + λ_adv·L_G(D_S(G_S(z)))
//! ```
//!
//! (r_l: learned 1×1 convolutions, φ: the `shapes` feature network when given); the student D_S
//! minimises L_D on real images and G_S's samples plus λ_kd·(D_S(x) − D_T(x))² on both.
//!
//! Run folder: `run.json`, `loss.csv` (generator loss; the discriminator's is in the progress
//! line), `checkpoints/{latest,previous}/` and, at the end, the GAN folder `OUT/generator/`,
//! `OUT/discriminator/` (EMA generator).

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use serde_json::json;

use super::run_loop::{IterReport, LoopSpec, run_loop};
use super::{checkpoint, ema, open_images};
use crate::data::DataSource;
use crate::distill::gan::{
    GanLoss, PixelDistance, discriminator_loss, feature_loss, generator_loss, logit_loss,
    output_loss,
};
use crate::error::{Error, Result};
use crate::io;
use crate::metrics::ShapesFeatures;
use crate::models::gan::{Discriminator, DiscriminatorConfig, Generator, GeneratorConfig, folder};
use crate::models::quant::{self, QuantizationConfig, QuantizeSpec};
use crate::noise::NoiseStream;

/// The `run.json` kind of a GAN teacher run.
pub const GAN_RUN: &str = "train-gan";
/// The `run.json` kind of a KD-GAN co-distillation run.
pub const KD_GAN_RUN: &str = "distill-gan";

/// Optimisation settings shared by teacher training and co-distillation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GanTrainConfig {
    pub iters: usize,
    pub batch: usize,
    pub lr_g: f64,
    pub lr_d: f64,
    /// Adam for both networks (the GAN default: β = (0.5, 0.999), no clipping).
    pub optimizer: super::optim::OptimizerConfig,
    pub loss: GanLoss,
    /// EMA decay of the written generator (`None`: the raw one).
    pub ema_decay: Option<f32>,
    pub seed: u64,
    pub checkpoint_every: usize,
}

impl GanTrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.optimizer.validate()?;
        for (name, v) in [
            ("--iters", self.iters),
            ("--batch", self.batch),
            ("--checkpoint-every", self.checkpoint_every),
        ] {
            if v == 0 {
                return Err(Error::Usage(format!("{name} must be at least 1")));
            }
        }
        for (name, v) in [("--lr-g", self.lr_g), ("--lr-d", self.lr_d)] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(Error::Usage(format!(
                    "{name} must be a positive number, got {v}"
                )));
            }
        }
        Ok(())
    }
}

/// The weights of the co-distillation terms.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KdWeights {
    pub output: f32,
    pub output_distance: PixelDistance,
    pub feature: f32,
    pub perceptual: f32,
    pub adversarial: f32,
    pub logit: f32,
}

/// What a GAN run trains.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum GanMode {
    /// A teacher from scratch.
    Teacher {
        generator: GeneratorConfig,
        discriminator: DiscriminatorConfig,
    },
    /// Students distilled from the teacher GAN folder `teacher`.
    Distill {
        teacher: PathBuf,
        generator_width: f32,
        discriminator_width: f32,
        weights: KdWeights,
        /// The `shapes` feature network for the perceptual term (absent: no perceptual term).
        perceptual_net: Option<PathBuf>,
        /// Quantization-aware distillation of the student generator (written quantized).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quantize: Option<QuantizeSpec>,
        /// A GAN folder of students (the widths' architecture) both start from, instead of
        /// fresh initialisations: e.g. the f32 KD students, fine-tuned under `quantize`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        init: Option<PathBuf>,
    },
}

/// Everything that defines a GAN run (`run.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GanRun {
    pub kind: String,
    pub mode: GanMode,
    pub config: GanTrainConfig,
    pub data: DataSource,
}

/// What a GAN run reports.
#[derive(Debug, Clone)]
pub struct GanOutcome {
    /// The written GAN folder (absent when interrupted).
    pub folder: Option<PathBuf>,
    pub final_loss: f64,
    pub seconds: f64,
}

/// Learned 1×1 convolutions from the student's feature maps to the teacher's channels.
#[derive(Module, Debug)]
pub struct Regressors {
    pub convs: Vec<Conv2d>,
}

impl Regressors {
    fn new(student: &GeneratorConfig, teacher: &GeneratorConfig, device: &Device) -> Self {
        let (s, t) = (student.channels(), teacher.channels());
        Regressors {
            convs: (1..4)
                .map(|i| Conv2dConfig::new([s[i], t[i]], [1, 1]).init(device))
                .collect(),
        }
    }
}

/// The student generator with its regressors (optimised together).
#[derive(Module, Debug)]
pub struct StudentG {
    pub g: Generator,
    pub regressors: Option<Regressors>,
}

struct State {
    g: StudentG,
    d: Discriminator,
    g_opt: ModuleOptimizer,
    d_opt: ModuleOptimizer,
    ema: Option<Generator>,
}

/// The frozen teacher of a co-distillation.
struct Teacher {
    g: Generator,
    g_config: GeneratorConfig,
    d: Discriminator,
    perceptual: Option<ShapesFeatures>,
    /// `--init`: the GAN folder the students start from (checked against their configs).
    init: Option<PathBuf>,
    quantize: Option<QuantizeSpec>,
}

fn optimizer(cfg: &GanTrainConfig) -> ModuleOptimizer {
    cfg.optimizer.init()
}

/// The configs of the networks a run trains.
fn configs(
    run: &GanRun,
    device: &Device,
) -> Result<(GeneratorConfig, DiscriminatorConfig, Option<Teacher>)> {
    match &run.mode {
        GanMode::Teacher {
            generator,
            discriminator,
        } => Ok((generator.clone(), discriminator.clone(), None)),
        GanMode::Distill {
            teacher,
            generator_width,
            discriminator_width,
            perceptual_net,
            quantize,
            init,
            ..
        } => {
            let (gc, g) = folder::load_generator(teacher, device)?;
            let (dc, d) = folder::load_discriminator(teacher, device)?;
            let perceptual = perceptual_net
                .as_ref()
                .map(|p| ShapesFeatures::load(p, device))
                .transpose()?;
            let (student_g, student_d) = (
                gc.with_width(gc.width * generator_width),
                dc.with_width(dc.width * discriminator_width),
            );
            student_g
                .validate()
                .and_then(|_| student_d.validate())
                .map_err(|e| Error::Usage(format!("--width/--d-width: {e}")))?;
            let mut student_g = student_g;
            student_g.quantization_config = quantize.map(|q| QuantizationConfig::new(q.format));
            if let Some(dir) = init {
                let (ig, _) = folder::load_generator(dir, device)?;
                let (id, _) = folder::load_discriminator(dir, device)?;
                let quantized = student_g.quantization_config.clone();
                if (GeneratorConfig {
                    quantization_config: quantized,
                    ..ig
                }) != student_g
                    || id != student_d
                {
                    return Err(Error::file(
                        dir,
                        "--init: its generator or discriminator differs from the students --width/--d-width describe",
                    ));
                }
            }
            Ok((
                student_g,
                student_d,
                Some(Teacher {
                    g,
                    g_config: gc,
                    d,
                    perceptual,
                    init: init.clone(),
                    quantize: *quantize,
                }),
            ))
        }
    }
}

const G_STATE: &str = "g";
const D_STATE: &str = "d";
const EMA_WEIGHTS: &str = "ema.safetensors";

fn save_checkpoint(
    run_dir: &Path,
    state: &State,
    iter: usize,
    configs: (&GeneratorConfig, &DiscriminatorConfig),
) -> Result<()> {
    let dir = checkpoint::incoming(run_dir)?;
    checkpoint::write_state(&dir.join(G_STATE), &state.g, &state.g_opt, &json!({}))?;
    checkpoint::write_state(&dir.join(D_STATE), &state.d, &state.d_opt, &json!({}))?;
    if let Some(e) = &state.ema {
        io::save_weights(e, &dir.join("state").join(EMA_WEIGHTS))?;
    }
    let written = state.ema.clone().unwrap_or_else(|| state.g.g.valid());
    folder::save(&dir, (configs.0, &written), (configs.1, &state.d.valid()))?;
    io::write_json(
        &dir.join("state").join("state.json"),
        &json!({ "iter": iter }),
    )?;
    checkpoint::publish(run_dir).map(|_| ())
}

/// The student generator (with its regressors) and discriminator on `device`: fresh, or the
/// `--init` students'; fake quantization attached to the generator for a quantization-aware
/// run.
fn fresh_students(
    gc: &GeneratorConfig,
    dc: &DiscriminatorConfig,
    teacher: Option<&Teacher>,
    with_regressors: bool,
    device: &Device,
) -> Result<(StudentG, Discriminator)> {
    let (g, d) = match teacher.and_then(|t| t.init.as_ref()) {
        Some(dir) => (
            quant::trainable_weights(folder::load_generator(dir, device)?.1),
            folder::load_discriminator(dir, device)?.1,
        ),
        None => (gc.init(device), dc.init(device)),
    };
    let g = match teacher.and_then(|t| t.quantize) {
        Some(q) => q.attach(g)?,
        None => g,
    };
    Ok((
        StudentG {
            g,
            regressors: match teacher {
                Some(t) if with_regressors => Some(Regressors::new(gc, &t.g_config, device)),
                _ => None,
            },
        },
        d,
    ))
}

fn load_checkpoint(
    run_dir: &Path,
    cfg: &GanTrainConfig,
    fresh: impl Fn(&Device) -> Result<(StudentG, Discriminator)>,
    device: &Device,
) -> Result<Option<(State, usize)>> {
    let Some(ckpt) = checkpoint::latest(run_dir) else {
        return Ok(None);
    };
    let ad = device.clone().autodiff();
    let (g0, d0) = fresh(&ad)?;
    let gs = checkpoint::read_state(&ckpt.join(G_STATE), g0, optimizer(cfg))?;
    let ds = checkpoint::read_state(&ckpt.join(D_STATE), d0, optimizer(cfg))?;
    let state_path = ckpt.join("state").join("state.json");
    let progress: serde_json::Value = serde_json::from_str(&io::read_text(&state_path)?)
        .map_err(|e| Error::file(&state_path, format!("not valid JSON: {e}")))?;
    let iter = progress["iter"]
        .as_u64()
        .ok_or_else(|| Error::file(&state_path, "no `iter`"))? as usize;
    let ema = match cfg.ema_decay {
        Some(_) => {
            let ids: std::collections::BTreeMap<String, u64> = gs
                .ids
                .iter()
                .filter_map(|(k, v)| k.strip_prefix("g.").map(|k| (k.to_string(), *v)))
                .collect();
            Some(io::load_weights_with_ids(
                fresh(device)?.0.g,
                &ckpt.join("state").join(EMA_WEIGHTS),
                Some(&ids),
            )?)
        }
        None => None,
    };
    Ok(Some((
        State {
            g: gs.model,
            d: ds.model,
            g_opt: gs.optim,
            d_opt: ds.optim,
            ema,
        },
        iter,
    )))
}

/// Runs (or resumes) a GAN teacher training or a co-distillation in `run_dir`.
pub fn train_gan(
    run_dir: &Path,
    run: Option<GanRun>,
    resume: bool,
    device: &Device,
    quiet: bool,
) -> Result<GanOutcome> {
    let run = match (resume, run) {
        (true, _) => {
            let kind = checkpoint::read_run(run_dir, GAN_RUN)
                .map(|_| GAN_RUN)
                .or_else(|_| checkpoint::read_run(run_dir, KD_GAN_RUN).map(|_| KD_GAN_RUN))?;
            checkpoint::read_run_as::<GanRun>(run_dir, kind)?
        }
        (false, None) => return Err(Error::Usage("nothing to train".into())),
        (false, Some(run)) => run,
    };
    let record = run_dir.join("gan.json");
    if resume && record.is_file() {
        // Finished: report what was recorded.
        let v: serde_json::Value = serde_json::from_str(&io::read_text(&record)?)
            .map_err(|e| Error::file(&record, format!("not valid JSON: {e}")))?;
        return Ok(GanOutcome {
            folder: Some(run_dir.to_path_buf()),
            final_loss: v["final_loss"].as_f64().unwrap_or(f64::NAN),
            seconds: v["seconds"].as_f64().unwrap_or(f64::NAN),
        });
    }
    let cfg = &run.config;
    cfg.validate()?;
    let (gc, dc, teacher) = configs(&run, device)?;
    let kd = match &run.mode {
        GanMode::Distill { weights, .. } => Some(weights.clone()),
        GanMode::Teacher { .. } => None,
    };
    let with_regressors = kd.as_ref().is_some_and(|w| w.feature > 0.0);
    let images = open_images(&run.data, gc.image_size, gc.num_classes)?;
    if !resume {
        checkpoint::prepare_new_run(run_dir)?;
        io::write_json(
            &run_dir.join(checkpoint::RUN_FILE),
            &serde_json::to_value(&run).expect("run serialises"),
        )?;
    }
    let fresh = |d: &Device| fresh_students(&gc, &dc, teacher.as_ref(), with_regressors, d);
    let (state, start) = match load_checkpoint(run_dir, cfg, fresh, device)? {
        Some(s) => s,
        None => {
            let ad = device.clone().autodiff();
            // Seeded initialisation: the same --seed gives the same run on this backend.
            ad.seed(cfg.seed);
            let (g, d) = fresh(&ad)?;
            (
                State {
                    ema: cfg.ema_decay.map(|_| g.g.valid()),
                    g,
                    d,
                    g_opt: optimizer(cfg),
                    d_opt: optimizer(cfg),
                },
                0,
            )
        }
    };
    let csv_path = run_dir.join("loss.csv");
    let spec = LoopSpec {
        name: if kd.is_some() { "kd-gan" } else { "gan" },
        iters: cfg.iters,
        first_global: 0,
        checkpoint_every: cfg.checkpoint_every,
        csv_path: &csv_path,
        quiet,
    };
    let conditional = gc.num_classes.is_some();
    let (state, end) = run_loop(
        &spec,
        start,
        state,
        |mut state, iter| {
            let mut rng = NoiseStream::for_step(cfg.seed, iter as u64);
            // Order of draws: images, z for D, z for G (fixed: resume relies on it).
            let (real, labels) = images.random_batch(&mut rng, cfg.batch, device);
            let b = cfg.batch;
            let mut z = || {
                Tensor::<1>::from_floats(rng.gaussian(b * gc.latent_dim).as_slice(), device)
                    .reshape([b, gc.latent_dim])
            };
            let (z_d, z_g) = (z(), z());
            let labels = conditional.then_some(labels);
            let ad_labels = labels.clone().map(Tensor::autodiff);

            // Discriminator step: real vs the current generator's samples (no G gradient). G runs
            // in training mode, normalising with this batch's statistics as in its own step.
            let fake = state
                .g
                .g
                .forward(z_d.clone().autodiff(), ad_labels.clone())
                .detach();
            let real_logits = state.d.forward(real.clone().autodiff(), ad_labels.clone());
            let fake_logits = state.d.forward(fake.clone(), ad_labels.clone());
            let mut d_loss = discriminator_loss(cfg.loss, real_logits.clone(), fake_logits.clone());
            if let (Some(w), Some(t)) = (&kd, &teacher)
                && w.logit > 0.0
            {
                let t_real = t.d.forward(real.clone(), labels.clone()).autodiff();
                let t_fake = t.d.forward(fake.inner(), labels.clone()).autodiff();
                d_loss = d_loss
                    + (logit_loss(real_logits, t_real) + logit_loss(fake_logits, t_fake)) * w.logit;
            }
            let d_value: f32 = d_loss.clone().into_scalar::<f32>();
            let grads = GradientsParams::from_grads(d_loss.backward(), &state.d);
            state.d = state.d_opt.step(cfg.lr_d, state.d, grads).power_iteration();

            // Generator step.
            let z_ad = z_g.clone().autodiff();
            let (fake, features) = state.g.g.forward_features(z_ad, ad_labels.clone());
            let adv = generator_loss(cfg.loss, state.d.forward(fake.clone(), ad_labels));
            let g_loss = match (&kd, &teacher) {
                (Some(w), Some(t)) => {
                    let (t_img, t_feats) = t.g.forward_features(z_g, labels);
                    let mut loss = adv * w.adversarial
                        + output_loss(fake.clone(), t_img.clone().autodiff(), w.output_distance)
                            * w.output;
                    if let Some(r) = &state.g.regressors {
                        let regressed = r
                            .convs
                            .iter()
                            .zip(features)
                            .map(|(c, f)| c.forward(f))
                            .collect();
                        let targets = t_feats.into_iter().map(Tensor::autodiff).collect();
                        loss = loss + feature_loss(regressed, targets) * w.feature;
                    }
                    if let Some(net) = &t.perceptual
                        && w.perceptual > 0.0
                    {
                        use crate::metrics::FeatureExtractor;
                        let want = net.features(t_img).autodiff();
                        let got = net.features_autodiff(fake);
                        loss = loss + (got - want).powf_scalar(2.0).mean() * w.perceptual;
                    }
                    loss
                }
                _ => adv,
            };
            let g_value: f32 = g_loss.clone().into_scalar::<f32>();
            let grads = GradientsParams::from_grads(g_loss.backward(), &state.g);
            state.g = state.g_opt.step(cfg.lr_g, state.g, grads);
            if let (Some(decay), Some(e)) = (cfg.ema_decay, state.ema.take()) {
                state.ema = Some(ema::update(
                    e,
                    &state.g.g.valid(),
                    ema::decay_at(iter, decay),
                ));
            }
            let note = format!(" | d {d_value:.3}");
            let loss = if d_value.is_finite() {
                g_value
            } else {
                d_value
            };
            Ok((
                state,
                IterReport {
                    loss,
                    lr: cfg.lr_g,
                    note,
                },
            ))
        },
        |state, done| save_checkpoint(run_dir, state, done, (&gc, &dc)),
    )?;
    let Some((final_loss, seconds)) = end.finished() else {
        return Ok(GanOutcome {
            folder: None,
            final_loss: f64::NAN,
            seconds: f64::NAN,
        });
    };
    // The GAN folder, written whole under a temporary name and moved into place, its record
    // gan.json last: until then the run folder reads as unfinished (`folder::load_generator`),
    // and a resume writes it again.
    let incoming = run_dir.join(".incoming-gan");
    if incoming.exists() {
        std::fs::remove_dir_all(&incoming)
            .map_err(|e| Error::file(&incoming, format!("cannot clear: {e}")))?;
    }
    let written = state.ema.clone().unwrap_or_else(|| state.g.g.valid());
    folder::save(&incoming, (&gc, &written), (&dc, &state.d.valid()))?;
    for part in [folder::GENERATOR, folder::DISCRIMINATOR] {
        let (from, to) = (incoming.join(part), run_dir.join(part));
        if to.exists() {
            std::fs::remove_dir_all(&to)
                .map_err(|e| Error::file(&to, format!("cannot replace: {e}")))?;
        }
        std::fs::rename(&from, &to).map_err(|e| Error::file(&to, format!("cannot write: {e}")))?;
    }
    let _ = std::fs::remove_dir_all(&incoming);
    io::write_json(
        &run_dir.join("gan.json"),
        &json!({
            "final_loss": final_loss,
            "seconds": seconds,
            "generator_params": written.num_params(),
            "generator_macs_per_image": gc.macs_per_image(),
            "discriminator_params": state.d.valid().num_params(),
            "discriminator_macs_per_image": dc.macs_per_image(),
        }),
    )?;
    Ok(GanOutcome {
        folder: Some(run_dir.to_path_buf()),
        final_loss,
        seconds,
    })
}
