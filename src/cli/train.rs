//! `fewstep train`: train a diffusion model (the teacher) on `shapes` or an image folder, with checkpoints and resume.

use std::path::PathBuf;

use fewstep_schedulers::{Algorithm, SchedulerConfig};

use super::DeviceArgs;
use crate::error::{Error, Result};
use crate::io;
use crate::models::{UNetConfig, VaeConfig};
use crate::train::latents::LatentSpec;
use crate::train::{self, DataSource, DiffusionRun, TrainConfig};

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Training data: `shapes` (the procedural default) or a folder of png/jpeg/webp images
    /// (resized and centre-cropped to the model's sample_size; sub-folders are classes).
    #[arg(long, default_value = "shapes")]
    pub data: String,
    /// Seed of the `shapes` images.
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub data_seed: u64,
    /// A preset (tiny, shapes32, bench32; shapes-latent8 with --vae) or a diffusers UNet
    /// config.json [default: shapes32].
    #[arg(long)]
    pub model_config: Option<String>,
    /// Start from this pipeline folder's UNet (its config and weights) instead of a seeded
    /// initialisation — e.g. a `fewstep widen` of a trained teacher. Not with --model-config; its
    /// scheduler must have the --prediction and --beta-schedule given.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Latent diffusion: a VAE folder (or a pipeline / `train-vae` run holding `vae/`); the data
    /// is encoded once (`latent_cache.safetensors` in the run) and the UNet learns its scaled
    /// posterior samples. The written pipeline includes the VAE.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Text-to-image: the frozen text encoder (a folder with tokenizer/ and text_encoder/: a
    /// `train-clip` run or a pipeline). The model config must be a UNet2DConditionModel (preset
    /// shapes-t2i8); its cross_attention_dim is set to the encoder's width. Captions: `shapes-text`
    /// for --data shapes / shapes-text, a folder's metadata.jsonl or kohya .txt sidecars.
    #[arg(long)]
    pub text_encoder: Option<PathBuf>,
    /// Probability of training on the empty caption (classifier-free guidance).
    #[arg(long, value_parser = super::values::probability, default_value_t = 0.1)]
    pub caption_dropout: f32,
    /// The caption column of a folder's metadata.jsonl (Hugging Face imagefolder).
    #[arg(long, default_value = "text")]
    pub caption_column: String,
    /// Images encoded into the latent cache (the first N `shapes` images; a folder's first N).
    #[arg(long, value_parser = super::values::count, default_value_t = 20_000)]
    pub latent_cache: usize,
    /// The run folder (checkpoints, loss.csv, run.json).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_parser = super::values::count)]
    pub steps: Option<usize>,
    #[arg(long, value_parser = super::values::count, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, value_parser = super::values::positive_f64, default_value_t = 2e-4)]
    pub lr: f64,
    /// Linear learning-rate warm-up steps.
    #[arg(long, value_parser = super::values::whole, default_value_t = 200)]
    pub warmup: usize,
    /// Decay the learning rate linearly to 0 over the run's last N steps (default: none, constant
    /// after warm-up). With --resume it replaces the stored value, so a finished run extended by
    /// --steps can end on a decay.
    #[arg(long, value_parser = super::values::whole)]
    pub cooldown: Option<usize>,
    /// EMA decay of the weights written to the pipeline folder.
    #[arg(long, value_parser = super::values::decay, default_value_t = 0.999)]
    pub ema: f32,
    #[command(flatten)]
    pub optimizer: super::OptimizerArgs,
    #[arg(long, value_parser = ["epsilon", "v_prediction", "sample"], default_value = "v_prediction")]
    pub prediction: String,
    /// Min-SNR-γ loss weighting (Hang et al. 2023; diffusers' `--snr_gamma`, 5 in both): each
    /// sample's error counts as if its x0 error were weighted min(SNR_t, γ), which takes weight
    /// off the nearly clean timesteps. Default: the plain mean squared error.
    #[arg(long, value_parser = super::values::positive_f64)]
    pub snr_gamma: Option<f64>,
    /// The law of each row's timestep: `uniform` (DDPM's), `lognormal` (EDM's: ln σ ~ N(−1.2,
    /// 1.2²), σ = √((1−ᾱ_t)/ᾱ_t), more rows at low noise) or `lognormal:MEAN,STD` (SD3's
    /// logit-normal is lognormal:0,1: the middle of the schedule, few rows at either end).
    #[arg(long, value_parser = super::values::timestep_sampling, default_value = "uniform")]
    pub timestep_sampling: crate::train::timesteps::TimestepSampling,
    #[arg(long, value_parser = ["linear", "scaled_linear", "squaredcos_cap_v2"], default_value = "squaredcos_cap_v2")]
    pub beta_schedule: String,
    /// Condition on the kind of the largest shape (3 classes + a null class for guidance).
    #[arg(long)]
    pub class_conditional: bool,
    /// Probability of dropping the class label (classifier-free guidance).
    #[arg(long, value_parser = super::values::probability, default_value_t = 0.1)]
    pub label_dropout: f32,
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_parser = super::values::count, default_value_t = 500)]
    pub checkpoint_every: usize,
    /// Continue the run in --out from its latest checkpoint (its stored configuration wins;
    /// --steps may extend it).
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub data_parallel: super::DataParallelArgs,
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
        "--model-config {arg}: unknown preset (expected tiny, shapes32, bench32, shapes-latent8, shapes-t2i8 or a config.json path)"
    )))
}

pub fn run(args: TrainArgs) -> Result<()> {
    let devices = args.data_parallel.devices(&args.device)?;
    let run = if args.resume {
        super::warn_flags_on_resume(&["--steps", "--cooldown"]);
        None
    } else {
        let init = match &args.init {
            None => None,
            Some(dir) => {
                if args.model_config.is_some() {
                    return Err(Error::Usage(
                        "--init and --model-config: the --init folder's UNet config is the model's; give one of them".into(),
                    ));
                }
                let dir = dir.canonicalize().map_err(|_| {
                    Error::file(
                        dir,
                        "--init: not found (expected a pipeline folder with unet/)",
                    )
                })?;
                if !dir.join("unet").join(io::CONFIG_NAME).is_file() {
                    return Err(Error::file(
                        &dir,
                        "--init: no unet/config.json here (expected a pipeline folder with unet/)",
                    ));
                }
                Some(dir)
            }
        };
        let config_arg = match (&init, &args.model_config) {
            (Some(dir), _) => dir.join("unet").join(io::CONFIG_NAME).display().to_string(),
            (None, Some(c)) => c.clone(),
            (None, None) => "shapes32".into(),
        };
        let mut unet = model_config(&config_arg)?;
        // An --init model's class embedding is fixed by its weights.
        let init_classes = unet.num_class_embeds;
        let data = DataSource::from_flag(&args.data, args.data_seed)?;
        let text = match (&args.text_encoder, unet.is_conditional()) {
            (Some(dir), true) => {
                let encoder = dir.canonicalize().map_err(|_| {
                    Error::file(dir, "--text-encoder: not found (expected a folder with tokenizer/ and text_encoder/, e.g. a `fewstep train-clip` run)")
                })?;
                let cfg_path = encoder
                    .join(crate::pipeline::TEXT_ENCODER_DIR)
                    .join(io::CONFIG_NAME);
                if !cfg_path.is_file() {
                    return Err(Error::file(
                        dir,
                        "--text-encoder: no text_encoder/config.json here (expected a folder with tokenizer/ and text_encoder/, e.g. a finished `fewstep train-clip` run)",
                    ));
                }
                let text_cfg =
                    crate::models::ClipTextConfig::from_json_str(&io::read_text(&cfg_path)?)
                        .map_err(|e| e.in_file(&cfg_path))?;
                unet.cross_attention_dim = Some(text_cfg.hidden_size);
                Some(crate::train::TextSpec {
                    encoder,
                    caption_dropout: args.caption_dropout,
                    caption_column: args.caption_column.clone(),
                })
            }
            (None, false) => None,
            (Some(_), false) => {
                return Err(Error::Usage(format!(
                    "--text-encoder: --model-config {} is not a UNet2DConditionModel (use the shapes-t2i8 preset or a text-conditioned config.json)",
                    config_arg
                )));
            }
            (None, true) => {
                return Err(Error::Usage(format!(
                    "--model-config {} is a text-conditioned UNet2DConditionModel: give --text-encoder (e.g. a `fewstep train-clip` run)",
                    config_arg
                )));
            }
        };
        if text.is_some() && args.class_conditional {
            return Err(Error::Usage(
                "--class-conditional and --text-encoder: choose one conditioning".into(),
            ));
        }
        let latent = match &args.vae {
            None => None,
            Some(path) => Some(LatentSpec {
                vae: LatentSpec::resolve_vae(path)?,
                cache_images: args.latent_cache,
            }),
        };
        // The side and channels of what the UNet sees: images, or the VAE's latents.
        let (side, channels, what) = match &latent {
            None => (crate::data::shapes::SIZE, 3, "training images are RGB"),
            Some(spec) => {
                let cfg_path = spec.vae.join(io::CONFIG_NAME);
                let vae = VaeConfig::from_json_str(&io::read_text(&cfg_path)?)
                    .map_err(|e| e.in_file(&cfg_path))?;
                if args.latent_cache == 0 {
                    return Err(Error::Usage("--latent-cache must be at least 1".into()));
                }
                (
                    vae.sample_size.unwrap_or(crate::data::shapes::SIZE) / vae.downsampling(),
                    vae.latent_channels,
                    "the VAE's latents",
                )
            }
        };
        match &data {
            DataSource::Shapes { .. } => {
                if args.class_conditional {
                    unet.num_class_embeds = Some(crate::data::shapes::KINDS.len() + 1);
                }
                if unet.sample_size.is_some_and(|s| s != side) {
                    return Err(Error::Usage(format!(
                        "--model-config {}: the UNet sees {side}×{side} inputs here (`shapes` images are 32×32{}); the config needs sample_size {side}",
                        config_arg,
                        if latent.is_some() {
                            ", encoded by --vae"
                        } else {
                            ""
                        }
                    )));
                }
                unet.sample_size = Some(side);
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
                        config_arg
                    )));
                }
            }
        }
        if let Some(dir) = &init
            && unet.num_class_embeds != init_classes
        {
            let what = match (init_classes, unet.num_class_embeds) {
                (None, _) => "--init: the model has no class embedding; drop --class-conditional, or start from a class-conditional model".to_string(),
                (Some(a), b) => format!(
                    "--init: the model has {a} class embeddings (num_class_embeds), --class-conditional on this data needs {} (its classes and the null class)",
                    b.unwrap_or(0)
                ),
            };
            return Err(Error::file(dir.join("unet"), what));
        }
        crate::models::footprint::check_unet(
            &unet,
            std::path::Path::new(&config_arg),
            unet.sample_size,
            crate::models::footprint::Use::Training { batch: args.batch },
        )?;
        if unet.in_channels != channels || unet.out_channels != channels {
            return Err(Error::Usage(format!(
                "--model-config {}: {what}; the config needs {channels} in and out channels",
                config_arg
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
        if let Some(dir) = &init {
            let theirs = crate::pipeline::load_scheduler_config(&dir.join("scheduler"))?
                .to_json(Algorithm::Ddim);
            let ours = scheduler.to_json(Algorithm::Ddim);
            for (key, flag) in [
                ("prediction_type", "--prediction"),
                ("beta_schedule", "--beta-schedule"),
            ] {
                if theirs[key] != ours[key] {
                    return Err(Error::file(
                        dir.join("scheduler"),
                        format!(
                            "--init: the model was trained with {key} {}, the run would use {} (give {flag} {})",
                            theirs[key],
                            ours[key],
                            theirs[key].as_str().unwrap_or("?")
                        ),
                    ));
                }
            }
        }
        let train = TrainConfig {
            steps: args.steps.unwrap_or(TrainConfig::default().steps),
            batch: args.batch,
            lr: args.lr,
            warmup: args.warmup,
            cooldown: args.cooldown.unwrap_or(0),
            ema_decay: args.ema,
            optimizer: args
                .optimizer
                .config(crate::train::optim::OptimizerConfig::diffusion())?,
            label_dropout: args.label_dropout,
            seed: args.seed,
            checkpoint_every: args.checkpoint_every,
            snr_gamma: args.snr_gamma,
            timestep_sampling: args.timestep_sampling,
        };
        train.validate()?;
        Some(DiffusionRun {
            unet,
            scheduler,
            train,
            data,
            latent,
            text,
            init,
        })
    };
    let folder = args.data_parallel.join("train", &args.out, args.resume)?;
    train::install_interrupt_handler();
    let outcome = train::train_diffusion(
        folder.path(),
        run,
        args.resume,
        args.steps,
        args.cooldown,
        &devices,
        args.quiet || !folder.is_main(),
    )?;
    if !folder.is_main() {
        return Ok(());
    }
    folder.report_overhead(args.quiet);
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
            "interrupted; resume with: fewstep train --out {} --resume",
            args.out.display()
        );
    }
    Ok(())
}
