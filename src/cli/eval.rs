//! `fewstep eval fid` and `fewstep eval curve`: sample quality (FID, KID, precision/recall) of a
//! pipeline at N steps, or across a list of step counts, against a reference set.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use fewstep_schedulers::Algorithm;
use serde_json::json;

use super::DeviceArgs;
use crate::backend::Precision;
use crate::error::{Error, Result};
use crate::eval::{CurveLine, GanUnderTest, ModelUnderTest, Sampling};
use crate::io;
use crate::metrics::adherence::{Adherence, AttributeClassifier, PromptJudge};
use crate::metrics::curve_plot::{Series, plot_fid_curve};
use crate::metrics::{
    self, FeatureExtractor, InceptionFeatures, Reference, Scores, ShapesFeatures,
};
use crate::models::inception;
use crate::train::clip::TrainedClip;

#[derive(Debug, clap::Subcommand)]
pub enum EvalCommand {
    /// FID, KID, precision and recall of one model at one step count (or of an image folder).
    Fid(FidArgs),
    /// FID-versus-steps curves of one or more models: CSV, PNG plot and sample grids.
    Curve(CurveArgs),
    /// Feature statistics (mu, sigma) of images, a dataset or a model's samples, written as
    /// pytorch-fid's `.npz` (by extension) or fewstep's `.safetensors` (with the features).
    Stats(StatsArgs),
    /// Where along the noise schedule a pixel model of `shapes` is weak: its error per
    /// timestep band and how well it recovers held-out images noised to t0 (SDEdit).
    Denoise(DenoiseArgs),
}

/// `fewstep eval denoise`.
#[derive(Debug, clap::Args)]
pub struct DenoiseArgs {
    /// A pixel-space diffusers pipeline folder (unconditional or class-conditional, 32×32 RGB).
    #[arg(long)]
    pub model: PathBuf,
    /// Held-out `shapes` images measured (the same for every model at the same seeds).
    #[arg(long, value_parser = super::values::count, default_value_t = 64)]
    pub images: usize,
    /// Equal timestep bands of the error profile.
    #[arg(long, value_parser = super::values::count, default_value_t = 10)]
    pub bands: usize,
    /// Recovery starts t0, comma-separated: images noised to t0, then DDIM back to 0.
    #[arg(long, value_parser = super::values::count, value_delimiter = ',', default_value = "200,400,600,800")]
    pub starts: Vec<usize>,
    /// DDIM stride of the recovery, in timesteps.
    #[arg(long, value_parser = super::values::count, default_value_t = 20)]
    pub stride: usize,
    /// Seed of the noise and timesteps.
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub seed: u64,
    /// Seed of the `shapes` images.
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub data_seed: u64,
    /// Images per forward pass.
    #[arg(long, value_parser = super::values::count, default_value_t = 64)]
    pub batch: usize,
    /// Also write a PNG grid: a row of originals, then a row recovered from each start.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `fewstep eval stats`.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// A folder of images.
    #[arg(long, conflicts_with_all = ["model", "dataset"], required_unless_present_any = ["model", "dataset"])]
    pub images: Option<PathBuf>,
    /// A dataset: `shapes` (its held-out reference images, --ref-samples of them) or a folder.
    #[arg(long = "data", conflicts_with = "model")]
    pub dataset: Option<String>,
    /// A pipeline (or GAN) folder whose --num-samples samples at --steps are summarised.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_parser = super::values::count, default_value_t = 50)]
    pub steps: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub extractor: FeatureArgs,
    /// Seed of the `shapes` images.
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub data_seed: u64,
    /// Images of --data to summarise.
    #[arg(long, value_parser = super::values::count, default_value_t = 5000)]
    pub ref_samples: usize,
    /// Where `shapes` statistics are cached (default $FEWSTEP_CACHE or ~/.cache/fewstep).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// The statistics file: `.npz` (pytorch-fid's `mu`, `sigma`) or `.safetensors` (fewstep's,
    /// with the features and the protocol).
    #[arg(long)]
    pub out: PathBuf,
    /// Text-to-image --model: the attribute classifier (default: weights/shapes-attributes).
    #[arg(long)]
    pub attributes: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// The feature extractor (`eval fid`, `eval curve`, `eval stats`).
#[derive(Debug, Clone, clap::Args)]
pub struct FeatureArgs {
    /// Feature extractor: `shapes` (the in-domain network shipped in weights/shapes-features) or
    /// `inception` (pytorch-fid's FID Inception-v3; needs --inception-weights).
    #[arg(long, default_value = "shapes", value_parser = ["shapes", "inception"])]
    pub features: String,
    /// pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or a .safetensors conversion) for
    /// `--features inception`; fewstep never downloads it.
    #[arg(long)]
    pub inception_weights: Option<PathBuf>,
    /// Folder of the `shapes` feature network (default: the shipped one).
    #[arg(long)]
    pub feature_weights: Option<PathBuf>,
}

/// The feature extractor and the reference set.
#[derive(Debug, Clone, clap::Args)]
pub struct ReferenceArgs {
    #[command(flatten)]
    pub extractor: FeatureArgs,
    /// Reference images: `shapes` (held-out indices) or a folder of images.
    #[arg(long, default_value = "shapes")]
    pub data: String,
    /// Seed of the `shapes` reference images.
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub data_seed: u64,
    /// Reference images to use (their statistics are cached).
    #[arg(long, value_parser = super::values::count, default_value_t = 5000)]
    pub ref_samples: usize,
    /// A statistics file (tensors `mu`, `sigma`; written by fewstep's cache) instead of --data.
    #[arg(long)]
    pub ref_stats: Option<PathBuf>,
    /// Where reference statistics are cached (default $FEWSTEP_CACHE or ~/.cache/fewstep).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Text-to-image models: the attribute classifier that judges prompt adherence (default:
    /// the shipped weights/shapes-attributes); the prompts are the held-out `shapes-text`
    /// captions of the reference images (seed --data-seed), one image each.
    #[arg(long)]
    pub attributes: Option<PathBuf>,
    /// Text-to-image models: a `train-clip` run for the CLIP score (100 × the cosine between
    /// image and prompt embeddings; default: the shipped weights/shapes-clip).
    #[arg(long)]
    pub clip: Option<PathBuf>,
}

impl ReferenceArgs {
    /// The prompts and judge of a text-to-image evaluation of `num` samples, when `needed`.
    fn judge(&self, needed: bool, num: usize, device: &Device) -> Result<Option<PromptJudge>> {
        if !needed {
            return Ok(None);
        }
        let dir = self
            .attributes
            .clone()
            .unwrap_or_else(|| io::shipped(SHAPES_ATTRIBUTES));
        let classifier = AttributeClassifier::load(&dir, device)?;
        let judge = PromptJudge::shapes_text(classifier, self.data_seed, num);
        let clip = self
            .clip
            .clone()
            .unwrap_or_else(|| io::shipped(SHAPES_CLIP));
        if self.clip.is_none() && !clip.is_dir() {
            return Ok(Some(judge));
        }
        Ok(Some(
            judge.with_clip(TrainedClip::load(&clip, device)?, device)?,
        ))
    }
}

/// The shipped attribute classifier (prompt adherence on `shapes-text`).
pub const SHAPES_ATTRIBUTES: &str = "shapes-attributes";
/// The shipped `shapes-text` CLIP (the text encoder's training run).
pub const SHAPES_CLIP: &str = "shapes-clip";

/// "adherence 0.812 (colours 0.95, kinds 0.90, count 0.97, pairs 0.85, relation 0.70)".
fn adherence_text(a: &Adherence) -> String {
    let r = a.rates();
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    format!(
        "adherence {:.4} (colours {:.3}, kinds {:.3}, count {:.3}, pairs {:.3}, relation {:.3} of {}) | CLIP score {:.2}",
        f("adherence"),
        f("colours"),
        f("kinds"),
        f("count"),
        f("pairs"),
        f("relation"),
        a.relation_prompts,
        f("clip_score")
    )
}

impl FeatureArgs {
    fn extractor(&self, device: &Device) -> Result<Box<dyn FeatureExtractor>> {
        if self.features == "inception" {
            let path = self.inception_weights.as_ref().ok_or_else(|| {
                Error::Usage(format!(
                    "--features inception needs --inception-weights PATH: pytorch-fid's {} (from {}); fewstep does not download it",
                    inception::FID_WEIGHTS_FILE,
                    inception::FID_WEIGHTS_URL
                ))
            })?;
            return Ok(Box::new(InceptionFeatures::load(path, device)?));
        }
        if self.inception_weights.is_some() {
            return Err(Error::Usage(
                "--inception-weights is for --features inception".into(),
            ));
        }
        let dir = self
            .feature_weights
            .clone()
            .unwrap_or_else(|| io::shipped(metrics::features::SHAPES_FEATURES));
        Ok(Box::new(ShapesFeatures::load(&dir, device)?))
    }
}

impl ReferenceArgs {
    fn extractor(&self, device: &Device) -> Result<Box<dyn FeatureExtractor>> {
        self.extractor.extractor(device)
    }

    fn reference(&self, extractor: &dyn FeatureExtractor, device: &Device) -> Result<Reference> {
        if let Some(path) = &self.ref_stats {
            let reference = metrics::stats_reference(path)?;
            check_dims(path, "--ref-stats", reference.stats.mu.len(), extractor)?;
            return Ok(reference);
        }
        if self.ref_samples < 2 {
            return Err(Error::Usage("--ref-samples must be at least 2".into()));
        }
        if self.data == "shapes" {
            let cache = self
                .cache
                .clone()
                .unwrap_or_else(metrics::default_cache_dir);
            metrics::shapes_reference(extractor, self.data_seed, self.ref_samples, &cache, device)
        } else {
            metrics::folder_reference(
                extractor,
                Path::new(&self.data),
                Some(self.ref_samples),
                device,
            )
        }
    }
}

/// How generated samples are drawn.
#[derive(Debug, Clone, clap::Args)]
pub struct SamplingArgs {
    /// Sampling algorithm; default: the folder's own scheduler.
    #[arg(long, value_parser = ["ddpm", "ddim", "euler", "heun", "dpmpp-2m", "lcm"])]
    pub scheduler: Option<String>,
    /// Generated images per evaluation (more than the extractor's feature dimension for FID).
    #[arg(long, value_parser = super::values::count, default_value_t = 1000)]
    pub num_samples: usize,
    #[arg(long, value_parser = super::values::count, default_value_t = 125)]
    pub batch: usize,
    /// Seed of the generated samples' noise.
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub seed: u64,
    /// Guidance scale of a guidance-conditioned consistency student (w + 1).
    #[arg(long, value_parser = super::values::non_negative_f32)]
    pub guidance_scale: Option<f32>,
    /// DDIM's stochasticity η, as the diffusers pipelines' `eta`: 0 deterministic, 1 DDPM's
    /// posterior noise (--scheduler ddim only).
    #[arg(long, value_parser = super::values::non_negative_f32, default_value_t = 0.0)]
    pub eta: f32,
    /// The LCM scheduler's timesteps, comma-separated and decreasing (the pipelines'
    /// `timesteps`, e.g. 999,339 for two steps; --steps is then their number); default: its
    /// skipping-step grid. Not with eval curve.
    #[arg(long, value_parser = super::values::timesteps)]
    pub timesteps: Option<super::values::Timesteps>,
    /// Precision of the UNet and VAE: f32, or f16 where the device computes in it (the
    /// scheduler's arithmetic stays f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16"])]
    pub precision: String,
    /// A LoRA file (PEFT/diffusers format) merged into every --model's UNet before sampling;
    /// the LCM scheduler config a fewstep LCM-LoRA file carries replaces the folder's.
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// Scale of the LoRA update (0: the base model).
    #[arg(long, value_parser = super::values::finite_f32, default_value_t = 1.0, requires = "lora")]
    pub lora_scale: f32,
}

impl SamplingArgs {
    /// The step count: as many as --timesteps gives, else `steps` (--steps).
    fn steps(&self, steps: usize) -> usize {
        self.timesteps.as_ref().map_or(steps, |t| t.0.len())
    }

    /// The library's sampling settings for `device`.
    fn sampling(&self, device: &DeviceArgs) -> Result<Sampling> {
        let choice = device.choice()?;
        Ok(Sampling {
            scheduler: self.scheduler.as_deref().and_then(Algorithm::from_cli_name),
            num_samples: self.num_samples,
            batch: self.batch,
            seed: self.seed,
            guidance_scale: self.guidance_scale,
            eta: self.eta,
            timesteps: self.timesteps.clone().map(|t| t.0).unwrap_or_default(),
            precision: Precision::parse(&self.precision)?,
            lora: self.lora.clone(),
            lora_scale: self.lora_scale,
            device_name: device.device.clone(),
            max_binding_bytes: crate::backend::max_binding_bytes(choice),
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct FidArgs {
    /// A diffusers pipeline folder (or a GAN folder) to sample from.
    #[arg(long, conflicts_with_all = ["images", "stats"], required_unless_present_any = ["images", "stats"])]
    pub model: Option<PathBuf>,
    /// A folder of images to score instead of a model.
    #[arg(long, conflicts_with = "stats")]
    pub images: Option<PathBuf>,
    /// A statistics file (pytorch-fid `.npz` or fewstep `.safetensors`) to score instead of a
    /// model: with --ref-stats, the Fréchet distance of two statistics files, as
    /// `python -m pytorch_fid a.npz b.npz`.
    #[arg(long)]
    pub stats: Option<PathBuf>,
    #[arg(long, value_parser = super::values::count, default_value_t = 50)]
    pub steps: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub reference: ReferenceArgs,
    /// Print one JSON object (every figure and the protocol) instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, clap::Args)]
pub struct CurveArgs {
    /// Pipeline folders, one line each at every --steps; or a progressive run folder, one line
    /// of its students (round-<N>steps/), each at its own N (repeat --model for several lines).
    #[arg(long, required = true)]
    pub model: Vec<PathBuf>,
    /// Step counts, comma-separated (DDIM samples best at divisors of the 1000 train timesteps:
    /// the default ends at 125 and 250 rather than 128 and 256).
    #[arg(long, default_value = "1,2,4,8,16,32,64,125,250")]
    pub steps: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub reference: ReferenceArgs,
    /// Text-to-image models: guidance scales, comma-separated; every point is sampled at each
    /// (a curve over guidance scale). Default: --guidance-scale.
    #[arg(long)]
    pub guidance_scales: Option<String>,
    /// Output folder: curve.csv, curve.json, curve.png and a sample grid per (model, steps).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Parses "1,2,4" into step counts.
pub fn parse_steps(text: &str) -> Result<Vec<usize>> {
    let steps: Vec<usize> = text
        .split(',')
        .map(|s| s.trim().parse::<usize>().ok().filter(|&n| n > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            Error::Usage(format!(
                "--steps {text}: expected positive integers separated by commas, e.g. 1,2,4,8"
            ))
        })?;
    Ok(steps)
}

fn scores_text(s: &Scores) -> String {
    let mut t = format!("FID {:.4}", s.fid);
    if let Some(k) = &s.kid {
        t += &format!(" | KID {:.5} ± {:.5}", k.mean, k.std);
    }
    if let Some(pr) = &s.precision_recall {
        t += &format!(" | precision {:.3} | recall {:.3}", pr.precision, pr.recall);
    }
    t
}

/// Statistics files must come from the extractor in use: a dimension mismatch names the file
/// and the flag before any sampling.
fn check_dims(path: &Path, flag: &str, dim: usize, extractor: &dyn FeatureExtractor) -> Result<()> {
    if dim != extractor.dim() {
        return Err(Error::file(
            path,
            format!(
                "{flag}: statistics of {dim} features, but the `{}` extractor gives {} (made with another --features?)",
                extractor.id(),
                extractor.dim()
            ),
        ));
    }
    Ok(())
}

/// What `eval fid` scores, loaded and checked before the reference is computed.
enum FidSource {
    Gan(Box<GanUnderTest>),
    Pipeline(PathBuf, Box<ModelUnderTest>),
    Images(PathBuf, metrics::Features),
    Stats(PathBuf, metrics::FeatureStats),
}

fn fid_source(
    args: &FidArgs,
    sampling: &Sampling,
    extractor: &dyn FeatureExtractor,
    device: &Device,
) -> Result<FidSource> {
    match (&args.model, &args.images, &args.stats) {
        (Some(dir), _, _) if crate::models::gan::folder::is_gan(dir) => {
            sampling.check(extractor.dim())?;
            Ok(FidSource::Gan(Box::new(GanUnderTest::load(
                dir, sampling, device,
            )?)))
        }
        (Some(dir), _, _) => {
            sampling.check(extractor.dim())?;
            let model = ModelUnderTest::load(dir, sampling, device)?;
            Ok(FidSource::Pipeline(dir.clone(), Box::new(model)))
        }
        (None, Some(dir), _) => {
            // Decoded before the reference: an empty or unreadable folder fails at once.
            let features = metrics::folder_features(extractor, dir, "--images", None, device)?;
            metrics::check_fid_samples("--images", features.rows(), extractor.dim())?;
            Ok(FidSource::Images(dir.clone(), features))
        }
        (None, None, Some(path)) => {
            let (stats, _, _) = metrics::FeatureStats::load(path)?;
            check_dims(path, "--stats", stats.mu.len(), extractor)?;
            Ok(FidSource::Stats(path.clone(), stats))
        }
        (None, None, None) => Err(Error::Usage("give --model, --images or --stats".into())),
    }
}

/// `eval fid --stats A --ref-stats B`: the Fréchet distance of two statistics files, as
/// `python -m pytorch_fid a.npz b.npz` (no extractor, no device).
fn fid_of_files(stats: &Path, reference: &Path, json: bool) -> Result<()> {
    let (a, _, _) = metrics::FeatureStats::load(stats)?;
    let (b, _, _) = metrics::FeatureStats::load(reference)?;
    if a.mu.len() != b.mu.len() {
        return Err(Error::file(
            stats,
            format!(
                "--stats: statistics of {} features, but --ref-stats {} holds {} (made by different extractors?)",
                a.mu.len(),
                reference.display(),
                b.mu.len()
            ),
        ));
    }
    let fid = metrics::fid::frechet_distance(&a, &b)?;
    if json {
        println!(
            "{}",
            json!({
                "fid": fid,
                "source": { "statistics_file": stats.display().to_string() },
                "protocol": { "reference": { "statistics_file": reference.display().to_string() } },
            })
        );
    } else {
        println!("FID {fid:.4}");
    }
    Ok(())
}

fn run_fid(args: FidArgs) -> Result<()> {
    if let (Some(stats), Some(reference)) = (&args.stats, &args.reference.ref_stats) {
        return fid_of_files(stats, reference, args.json);
    }
    let device = args.device.device()?;
    let extractor = args.reference.extractor(&device)?;
    let extractor: &dyn FeatureExtractor = extractor.as_ref();
    // Everything cheap first: the model loads, the flags are in range; then the reference
    // statistics (minutes on a first run), then sampling.
    let sampling = args.sampling.sampling(&args.device)?;
    let source = fid_source(&args, &sampling, extractor, &device)?;
    let judge = args.reference.judge(
        matches!(&source, FidSource::Pipeline(_, m) if m.pipeline.is_text_to_image()),
        sampling.num_samples,
        &device,
    )?;
    let reference = args.reference.reference(extractor, &device)?;
    let mut adherence = None;
    let (scores, source, per_sec) = match source {
        FidSource::Gan(gan) => {
            let sampled = gan.sample_features(&sampling, extractor, &device)?;
            let scores = metrics::score(&sampled.features, &reference)?;
            let source = json!({
                "model": gan.dir.display().to_string(),
                "kind": "gan",
                "seed": args.sampling.seed,
                // From the config: a quantized generator's parameters are packed codes.
                "params": burn::module::Module::num_params(&gan.config.init(&device)),
                "weight_bytes": crate::models::quant::weight_bytes(&gan.generator),
                "weights": gan.config.quantization_config.as_ref().map_or("f32", |q| q.weights.name()),
                "macs_per_image": gan.config.macs_per_image(),
            });
            (scores, source, Some(sampled.per_second))
        }
        FidSource::Pipeline(dir, model) => {
            let steps = args.sampling.steps(args.steps);
            let sampled =
                model.sample_features(steps, &sampling, extractor, 0, judge.as_ref(), &device)?;
            let per_sec = sampled.per_second;
            let scores = metrics::score(&sampled.features, &reference)?;
            adherence = sampled.adherence;
            let source = json!({
                "model": dir.display().to_string(),
                "lora": sampling.lora_json(),
                "guidance_scale": model.pipeline.is_text_to_image().then(|| sampling.guidance_scale.unwrap_or(crate::eval::DEFAULT_TEXT_GUIDANCE)),
                "scheduler": model.algorithm.to_string(),
                "eta": sampling.eta,
                "timesteps": (!sampling.timesteps.is_empty()).then_some(&sampling.timesteps),
                "precision": model.precision.name(),
                "steps": steps,
                "seed": args.sampling.seed,
                // From the config: a quantized UNet's parameters are packed codes.
                "params": burn::module::Module::num_params(&model.pipeline.unet_config.init(&device)),
                "weight_bytes": crate::models::quant::weight_bytes(&model.pipeline.unet),
                "weights": model.pipeline.unet_config.quantization_config.as_ref().map_or("f32", |q| q.weights.name()),
                "macs_per_step": model.pipeline.unet_config.macs_per_step(),
            });
            (scores, source, Some(per_sec))
        }
        FidSource::Images(dir, features) => {
            let scores = metrics::score(&features, &reference)?;
            (scores, json!({ "images": dir.display().to_string() }), None)
        }
        FidSource::Stats(path, stats) => {
            let fid = metrics::fid::frechet_distance(&stats, &reference.stats)?;
            let scores = Scores {
                fid,
                kid: None,
                precision_recall: None,
                samples: stats.count,
            };
            (
                scores,
                json!({ "statistics_file": path.display().to_string() }),
                None,
            )
        }
    };
    if args.json {
        println!(
            "{}",
            json!({
                "fid": scores.fid,
                "kid": scores.kid,
                "precision_recall": scores.precision_recall,
                "adherence": adherence.as_ref().map(Adherence::rates),
                "samples": scores.samples,
                "samples_per_second": per_sec,
                "source": source,
                "protocol": { "extractor": extractor.id(), "reference": reference.protocol },
            })
        );
    } else {
        println!("{}", scores_text(&scores));
        if let Some(a) = &adherence {
            println!("{}", adherence_text(a));
        }
        if let Some(r) = per_sec {
            println!("{} samples at {r:.2} samples/s", scores.samples);
        }
        println!(
            "protocol: extractor {}, reference {}",
            extractor.id(),
            reference.protocol
        );
    }
    Ok(())
}

fn run_curve(args: CurveArgs) -> Result<()> {
    let steps = parse_steps(&args.steps)?;
    if args.sampling.timesteps.is_some() {
        return Err(Error::Usage(
            "--timesteps: eval curve samples each --steps on the scheduler's own grid; score custom timesteps with eval fid".into(),
        ));
    }
    let device = args.device.device()?;
    let sampling = args.sampling.sampling(&args.device)?;
    let extractor = args.reference.extractor(&device)?;
    let extractor: &dyn FeatureExtractor = extractor.as_ref();
    sampling.check(extractor.dim())?;
    let lines: Vec<CurveLine> = args
        .model
        .iter()
        .map(|dir| CurveLine::load(dir, &steps, &sampling, &device))
        .collect::<Result<_>>()?;
    if args.out.is_file() {
        return Err(Error::file(
            &args.out,
            "--out: is a file, expected a folder",
        ));
    }
    io::check_output_file(&args.out.join("curve.csv"), "--out")?;
    let judge = args.reference.judge(
        lines.iter().any(|l| {
            l.points(&steps)
                .iter()
                .any(|(m, _)| m.pipeline.is_text_to_image())
        }),
        sampling.num_samples,
        &device,
    )?;
    let guidance_scales: Vec<Option<f32>> = match &args.guidance_scales {
        None => vec![sampling.guidance_scale],
        Some(text) => text
            .split(',')
            .map(|g| {
                g.trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|g| g.is_finite() && *g >= 0.0)
                    .map(Some)
                    .ok_or_else(|| {
                        Error::Usage(format!(
                            "--guidance-scales {text}: expected numbers of 0 or more separated by commas, e.g. 1,2,4,7.5"
                        ))
                    })
            })
            .collect::<Result<_>>()?,
    };
    let reference = args.reference.reference(extractor, &device)?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::file(&args.out, format!("--out: cannot create: {e}")))?;
    let protocol = json!({
        "extractor": extractor.id(),
        "reference": reference.protocol,
        "num_samples": args.sampling.num_samples,
        "seed": args.sampling.seed,
        "lora": sampling.lora_json(),
    });
    let mut rows = Vec::new();
    let mut csv = String::from(
        "model,scheduler,steps,guidance_scale,fid,kid,kid_std,precision,recall,adherence,colours,kinds,count,pairs,relation,clip_score,samples_per_second\n",
    );
    let mut series = Vec::new();
    for line in &lines {
        for &g in &guidance_scales {
            let mut points = Vec::new();
            let sampling = Sampling {
                guidance_scale: g,
                ..sampling.clone()
            };
            for (model, n) in line.points(&steps) {
                let sampled =
                    model.sample_features(n, &sampling, extractor, 36, judge.as_ref(), &device)?;
                let (kept, per_sec) = (&sampled.kept, sampled.per_second);
                let scores = metrics::score(&sampled.features, &reference)?;
                let label = model.label();
                let text_g = model
                    .pipeline
                    .is_text_to_image()
                    .then(|| g.unwrap_or(crate::eval::DEFAULT_TEXT_GUIDANCE));
                let at_g = text_g.map_or(String::new(), |g| format!(", guidance {g}"));
                eprintln!(
                    "{label} @ {n} steps{at_g}: {}{} ({per_sec:.1} samples/s)",
                    scores_text(&scores),
                    sampled
                        .adherence
                        .as_ref()
                        .map_or(String::new(), |a| format!(" | {}", adherence_text(a)))
                );
                let name = model.short_name().replace('/', "-");
                let g_name = text_g.map_or(String::new(), |g| format!("-g{g}"));
                crate::image_grid::write_grid(
                    &args.out.join(format!("grid-{name}-{n}steps{g_name}.png")),
                    &kept.pixels,
                    kept.count,
                    kept.shape,
                )?;
                let (kid, kid_std) = scores.kid.map_or((f64::NAN, f64::NAN), |k| (k.mean, k.std));
                let (p, r) = scores
                    .precision_recall
                    .map_or((f64::NAN, f64::NAN), |pr| (pr.precision, pr.recall));
                let rates = sampled.adherence.as_ref().map(Adherence::rates);
                let rate = |k: &str| {
                    rates
                        .as_ref()
                        .and_then(|r| r[k].as_f64())
                        .map_or(String::new(), |v| format!("{v:.4}"))
                };
                csv += &format!(
                    "{},{},{n},{},{:.6},{kid:.6},{kid_std:.6},{p:.4},{r:.4},{},{},{},{},{},{},{},{per_sec:.3}\n",
                    model.dir.display(),
                    model.algorithm,
                    text_g.map_or(String::new(), |g| g.to_string()),
                    scores.fid,
                    rate("adherence"),
                    rate("colours"),
                    rate("kinds"),
                    rate("count"),
                    rate("pairs"),
                    rate("relation"),
                    rate("clip_score"),
                );
                rows.push(json!({
                    "model": model.dir.display().to_string(),
                    "scheduler": model.algorithm.to_string(),
                    "eta": sampling.eta,
                    "precision": model.precision.name(),
                    "steps": n,
                    "guidance_scale": text_g,
                    "fid": scores.fid,
                    "kid": scores.kid,
                    "precision_recall": scores.precision_recall,
                    "adherence": rates,
                    "samples_per_second": per_sec,
                }));
                points.push((n, scores.fid));
            }
            let label = match (g, guidance_scales.len()) {
                (Some(g), n) if n > 1 => format!("{} g={g}", line.label()),
                _ => line.label(),
            };
            series.push(Series { label, points });
        }
    }
    io::write_atomic(&args.out.join("curve.csv"), csv.as_bytes())?;
    let report = json!({ "protocol": protocol, "results": rows });
    io::write_json(&args.out.join("curve.json"), &report)?;
    let title = format!(
        "FID vs steps ({} samples, {} features)",
        args.sampling.num_samples,
        extractor.id()
    );
    plot_fid_curve(&args.out.join("curve.png"), &title, &series)?;
    if args.json {
        println!("{report}");
    } else {
        print!("{csv}");
        eprintln!("wrote {}/curve.{{csv,json,png}}", args.out.display());
    }
    Ok(())
}

pub fn run(command: EvalCommand) -> Result<()> {
    match command {
        EvalCommand::Fid(args) => run_fid(args),
        EvalCommand::Curve(args) => run_curve(args),
        EvalCommand::Stats(args) => run_stats(args),
        EvalCommand::Denoise(args) => run_denoise(args),
    }
}

fn run_denoise(args: DenoiseArgs) -> Result<()> {
    use crate::eval::denoising::{ProfileRequest, denoising_profile};
    if let Some(grid) = &args.grid {
        io::check_output_file(grid, "--grid")?;
    }
    let device = args.device.device()?;
    let pipeline = crate::pipeline::Pipeline::load(&args.model, &device)?;
    let request = ProfileRequest {
        images: args.images,
        data_seed: args.data_seed,
        bands: args.bands,
        starts: args.starts.clone(),
        stride: args.stride,
        batch: args.batch,
        seed: args.seed,
    };
    // A square grid: as many examples as rows.
    let rows = args.starts.len() + 1;
    let started = std::time::Instant::now();
    let profile = denoising_profile(&pipeline, &request, rows, &device)?;
    if let Some(grid) = &args.grid {
        let mut pixels = Vec::new();
        let mut n = 0;
        for row in &profile.examples {
            n += row.dims()[0];
            pixels.extend(
                row.clone()
                    .into_data()
                    .try_to_vec::<f32>()
                    .expect("f32 images"),
            );
        }
        let [_, c, h, w] = profile.examples[0].dims();
        crate::image_grid::write_grid(grid, &pixels, n, [c, h, w])?;
    }
    if args.json {
        let report = json!({
            "model": args.model.display().to_string(),
            "prediction": profile.prediction.name(),
            "images": args.images,
            "data_seed": args.data_seed,
            "seed": args.seed,
            "bands": profile.bands.iter().map(|b| json!({
                "from": b.from, "to": b.to, "loss": b.loss, "x0_mse": b.x0_mse,
            })).collect::<Vec<_>>(),
            "recovery": profile.recovery.iter().map(|r| json!({
                "t0": r.t0, "steps": r.steps, "mse": r.mse,
            })).collect::<Vec<_>>(),
            "seconds": started.elapsed().as_secs_f64(),
        });
        println!("{report}");
        return Ok(());
    }
    println!(
        "{}: {} held-out shapes images (data seed {}), noise seed {}, {} target",
        args.model.display(),
        args.images,
        args.data_seed,
        args.seed,
        profile.prediction.name()
    );
    println!("timesteps   loss     x0 MSE");
    for b in &profile.bands {
        println!(
            "{:>4}-{:<4}  {:.5}  {:.5}",
            b.from,
            b.to - 1,
            b.loss,
            b.x0_mse
        );
    }
    for r in &profile.recovery {
        println!(
            "recovered from t0 = {} ({} DDIM steps): MSE {:.5}",
            r.t0, r.steps, r.mse
        );
    }
    Ok(())
}

fn run_stats(args: StatsArgs) -> Result<()> {
    let npz = metrics::npz::is_npz(&args.out);
    let safetensors = args
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if !npz && !safetensors {
        return Err(Error::file(
            &args.out,
            "--out: expected a .npz (pytorch-fid) or .safetensors file name",
        ));
    }
    io::check_output_file(&args.out, "--out")?;
    let device = args.device.device()?;
    let sampling = args.sampling.sampling(&args.device)?;
    let reference = ReferenceArgs {
        extractor: args.extractor.clone(),
        data: args.dataset.clone().unwrap_or_else(|| "shapes".into()),
        data_seed: args.data_seed,
        ref_samples: args.ref_samples,
        ref_stats: None,
        cache: args.cache.clone(),
        attributes: args.attributes.clone(),
        clip: None,
    };
    let extractor = reference.extractor(&device)?;
    let extractor: &dyn FeatureExtractor = extractor.as_ref();
    let (features, protocol) = match (&args.images, &args.dataset, &args.model) {
        (Some(dir), _, _) => {
            let f = metrics::folder_features(extractor, dir, "--images", None, &device)?;
            (f, json!({ "images": dir.display().to_string() }))
        }
        (None, Some(_), _) => {
            let r = reference.reference(extractor, &device)?;
            let f = r.features.ok_or_else(|| {
                Error::Usage("--data: the reference statistics hold no features".into())
            })?;
            (f, r.protocol)
        }
        (None, None, Some(dir)) => {
            sampling.check(extractor.dim())?;
            if crate::models::gan::folder::is_gan(dir) {
                let gan = GanUnderTest::load(dir, &sampling, &device)?;
                let sampled = gan.sample_features(&sampling, extractor, &device)?;
                (
                    sampled.features,
                    json!({ "model": dir.display().to_string(), "kind": "gan", "num_samples": args.sampling.num_samples, "seed": args.sampling.seed }),
                )
            } else {
                let model = ModelUnderTest::load(dir, &sampling, &device)?;
                let judge = reference.judge(
                    model.pipeline.is_text_to_image(),
                    sampling.num_samples,
                    &device,
                )?;
                let steps = args.sampling.steps(args.steps);
                let sampled = model.sample_features(
                    steps,
                    &sampling,
                    extractor,
                    0,
                    judge.as_ref(),
                    &device,
                )?;
                (
                    sampled.features,
                    json!({ "model": dir.display().to_string(), "scheduler": model.algorithm.to_string(), "steps": steps, "num_samples": args.sampling.num_samples, "seed": args.sampling.seed }),
                )
            }
        }
        (None, None, None) => return Err(Error::Usage("give --images, --data or --model".into())),
    };
    let flag = if args.images.is_some() {
        "--images"
    } else {
        "--num-samples"
    };
    metrics::check_fid_samples(flag, features.rows(), extractor.dim())?;
    let stats = metrics::FeatureStats::from_features(&features)?;
    if npz {
        metrics::npz::write(&args.out, &stats)?;
    } else {
        let protocol = json!({ "extractor": extractor.id(), "source": protocol });
        stats.save(&args.out, &protocol, Some(&features))?;
    }
    eprintln!(
        "wrote {} ({} features of {} samples, {})",
        args.out.display(),
        stats.mu.len(),
        stats.count,
        extractor.id()
    );
    Ok(())
}
