//! Evaluation protocols above the metrics: a model under test (a pipeline with its sampling
//! algorithm, precision, LoRA and batch), the lines of an FID-versus-steps curve (a pipeline at
//! every step count, or a progressive run's students each at its own), and the cached evaluator
//! of the distillation reports. `fewstep eval` and `fewstep distill` parse flags and call these;
//! examples and benches use the same code.

pub mod denoising;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use fewstep_schedulers::Algorithm;

use crate::backend::Precision;
use crate::error::{Error, Result};
use crate::metrics::adherence::PromptJudge;
use crate::metrics::{self, FeatureExtractor, Reference, Scores};
use crate::pipeline::Pipeline;
use crate::sample::Generation;

/// How generated samples are drawn (`eval`'s sampling flags).
#[derive(Debug, Clone)]
pub struct Sampling {
    /// The algorithm; `None`: the folder's own scheduler (or the fallback).
    pub scheduler: Option<Algorithm>,
    pub num_samples: usize,
    pub batch: usize,
    /// Seed of the samples' noise.
    pub seed: u64,
    /// Guidance scale of a guidance-conditioned student (w + 1).
    pub guidance_scale: Option<f32>,
    /// DDIM's stochasticity η (0: deterministic).
    pub eta: f32,
    /// Custom timesteps of the LCM scheduler; empty: its grid.
    pub timesteps: Vec<i64>,
    pub precision: Precision,
    /// A LoRA file merged into every model's UNet, at `lora_scale`.
    pub lora: Option<PathBuf>,
    pub lora_scale: f32,
    /// The device's name as given (`--device`), for messages.
    pub device_name: String,
    /// The device's largest storage binding (GPUs), to which batches are fitted.
    pub max_binding_bytes: Option<u64>,
}

impl Sampling {
    /// The `lora` and `lora_scale` of a JSON report (null without a LoRA file).
    pub fn lora_json(&self) -> serde_json::Value {
        match &self.lora {
            Some(path) => {
                serde_json::json!({ "file": path.display().to_string(), "scale": self.lora_scale })
            }
            None => serde_json::Value::Null,
        }
    }

    /// Refuses what cannot give an FID with an extractor of `dim` features, naming the flag.
    pub fn check(&self, dim: usize) -> Result<()> {
        if self.batch == 0 {
            return Err(Error::Usage("--batch must be at least 1".into()));
        }
        metrics::check_fid_samples("--num-samples", self.num_samples, dim)
    }
}

/// A model evaluated at several step counts.
pub struct ModelUnderTest {
    pub dir: PathBuf,
    /// The LoRA file merged into its UNet (--lora).
    pub lora: Option<PathBuf>,
    pub pipeline: Pipeline,
    pub algorithm: Algorithm,
    pub precision: Precision,
    /// `--batch`, fitted to the device's largest storage binding.
    pub batch: usize,
}

impl ModelUnderTest {
    /// Loads the pipeline in `dir` (with `sampling`'s LoRA merged) in its precision on `device`.
    pub fn load(dir: &Path, sampling: &Sampling, device: &Device) -> Result<Self> {
        sampling.precision.check(device, &sampling.device_name)?;
        let precision = sampling.precision;
        let pipeline = match &sampling.lora {
            Some(lora) => Pipeline::load_with_lora(dir, lora, sampling.lora_scale, device)?,
            None => Pipeline::load(dir, device)?,
        }
        .with_precision(precision);
        let algorithm = crate::sample::choose_algorithm(sampling.scheduler, &pipeline.scheduler);
        let batch = crate::sample::fitted_batch(
            &pipeline,
            precision,
            sampling.batch,
            sampling.max_binding_bytes,
        )?;
        Ok(ModelUnderTest {
            dir: dir.to_path_buf(),
            lora: sampling.lora.clone(),
            pipeline,
            algorithm,
            precision,
            batch,
        })
    }

    /// `parent/name`: students of different runs share folder names (`student`,
    /// `round-4steps`), so the run folder is part of a model's name in labels and file names.
    /// With --lora, `parent/name+lora-parent/lora-name`.
    pub fn short_name(&self) -> String {
        match &self.lora {
            Some(lora) => format!("{}+{}", two_components(&self.dir), two_components(lora)),
            None => two_components(&self.dir),
        }
    }

    pub fn label(&self) -> String {
        match self.precision {
            Precision::F32 => format!("{} ({})", self.short_name(), self.algorithm),
            p => format!("{} ({}, {})", self.short_name(), self.algorithm, p.name()),
        }
    }

    /// Samples `sampling.num_samples` images at `steps` steps and returns their features, the
    /// first `keep` images and the samples per second; a text-to-image pipeline samples from
    /// `judge`'s prompts and reports adherence.
    pub fn sample_features(
        &self,
        steps: usize,
        sampling: &Sampling,
        extractor: &dyn FeatureExtractor,
        keep: usize,
        judge: Option<&PromptJudge>,
        device: &Device,
    ) -> Result<metrics::Sampled> {
        let prompts = text_prompts(&self.pipeline, &self.dir, sampling, judge)?;
        let request = Generation {
            guidance_scale: sampling.guidance_scale,
            text: prompts.as_ref(),
            eta: sampling.eta,
            timesteps: &sampling.timesteps,
            ..Generation::new(sampling.num_samples, self.batch, sampling.seed)
        };
        metrics::sample_features(
            &self.pipeline,
            self.algorithm,
            steps,
            &request,
            extractor,
            keep,
            prompts.as_ref().and(judge),
            &self.label(),
            device,
        )
    }
}

/// The guidance scale a text-to-image evaluation uses without `--guidance-scale`
/// (diffusers' `StableDiffusionPipeline` default).
pub const DEFAULT_TEXT_GUIDANCE: f32 = 7.5;

/// The prompts of a text-to-image pipeline's evaluation: one image per held-out prompt of
/// `judge` (None for other pipelines).
pub fn text_prompts(
    pipeline: &Pipeline,
    dir: &Path,
    sampling: &Sampling,
    judge: Option<&PromptJudge>,
) -> Result<Option<crate::sample::TextPrompts>> {
    if !pipeline.is_text_to_image() {
        return Ok(None);
    }
    let judge = judge.ok_or_else(|| {
        Error::file(
            dir,
            "a text-to-image pipeline: evaluation needs its prompts and attribute classifier (--attributes)",
        )
    })?;
    if judge.prompts.len() < sampling.num_samples {
        return Err(Error::Usage(format!(
            "--num-samples {}: only {} prompts",
            sampling.num_samples,
            judge.prompts.len()
        )));
    }
    Ok(Some(crate::sample::TextPrompts {
        prompts: judge.prompts[..sampling.num_samples].to_vec(),
        negative: Vec::new(),
        per_prompt: 1,
        guidance_scale: sampling.guidance_scale.unwrap_or(DEFAULT_TEXT_GUIDANCE),
        clip_skip: 0,
        height: None,
        width: None,
    }))
}

impl ModelUnderTest {}

/// The last two components of `path` (`parent/name`), or its last one.
pub fn two_components(path: &Path) -> String {
    let parts: Vec<String> = path
        .components()
        .rev()
        .take(2)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts.as_slice() {
        [n, p] if p != "." && p != "/" => format!("{p}/{n}"),
        [n, ..] => n.clone(),
        [] => path.display().to_string(),
    }
}

/// One line of `eval curve`: a pipeline at every step count, or a progressive run folder's
/// students (`round-<N>steps/`), each at its own step count N where N is among `--steps`.
pub enum CurveLine {
    Pipeline(Box<ModelUnderTest>),
    Rounds {
        dir: PathBuf,
        rounds: Vec<(usize, ModelUnderTest)>,
    },
}

impl CurveLine {
    /// The line of `dir` at `steps`: a pipeline folder, or a progressive run folder.
    pub fn load(dir: &Path, steps: &[usize], sampling: &Sampling, device: &Device) -> Result<Self> {
        if dir.join("model_index.json").is_file() {
            return Ok(CurveLine::Pipeline(Box::new(ModelUnderTest::load(
                dir, sampling, device,
            )?)));
        }
        let finished = crate::train::progressive::finished_rounds(dir);
        if sampling.lora.is_some() && !finished.is_empty() {
            return Err(Error::file(
                dir,
                "--model: --lora applies to pipeline folders, not to a progressive run's students",
            ));
        }
        if finished.is_empty() {
            return Err(Error::file(
                dir,
                "--model: not a diffusers pipeline folder (no model_index.json) nor a progressive \
                 run folder (no round-<N>steps/ student)",
            ));
        }
        let counts: Vec<String> = finished.iter().map(|(n, _)| n.to_string()).collect();
        let rounds: Vec<(usize, ModelUnderTest)> = finished
            .into_iter()
            .filter(|(n, _)| steps.contains(n))
            .map(|(n, round)| Ok((n, ModelUnderTest::load(&round, sampling, device)?)))
            .collect::<Result<_>>()?;
        if rounds.is_empty() {
            return Err(Error::file(
                dir,
                format!(
                    "--model: a progressive run whose students sample at {} steps, none of them in --steps",
                    counts.join(", ")
                ),
            ));
        }
        Ok(CurveLine::Rounds {
            dir: dir.to_path_buf(),
            rounds,
        })
    }

    /// (model, step count) of every point, in order of steps.
    pub fn points(&self, steps: &[usize]) -> Vec<(&ModelUnderTest, usize)> {
        match self {
            CurveLine::Pipeline(model) => steps.iter().map(|&n| (model.as_ref(), n)).collect(),
            CurveLine::Rounds { rounds, .. } => rounds.iter().map(|(n, m)| (m, *n)).collect(),
        }
    }

    pub fn label(&self) -> String {
        match self {
            CurveLine::Pipeline(model) => model.label(),
            CurveLine::Rounds { dir, rounds } => {
                let name = dir
                    .file_name()
                    .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
                format!("{name} students ({})", rounds[0].1.algorithm)
            }
        }
    }
}

/// A GAN generator under test: its config and weights, checked against the sampling settings
/// (GANs sample in f32 and take no LoRA file).
pub struct GanUnderTest {
    pub dir: PathBuf,
    pub config: crate::models::gan::GeneratorConfig,
    pub generator: crate::models::gan::Generator,
}

impl GanUnderTest {
    pub fn load(dir: &Path, sampling: &Sampling, device: &Device) -> Result<Self> {
        if sampling.precision != Precision::F32 {
            return Err(Error::Usage(format!(
                "--precision {}: GAN generators are evaluated in f32 only",
                sampling.precision.name()
            )));
        }
        if sampling.lora.is_some() {
            return Err(Error::file(
                dir,
                "--lora: a GAN generator folder takes no LoRA file (a diffusers pipeline does)",
            ));
        }
        let (config, generator) = crate::models::gan::folder::load_generator(dir, device)?;
        Ok(GanUnderTest {
            dir: dir.to_path_buf(),
            config,
            generator,
        })
    }

    /// `sampling.num_samples` generated images seen through `extractor`.
    pub fn sample_features(
        &self,
        sampling: &Sampling,
        extractor: &dyn FeatureExtractor,
        device: &Device,
    ) -> Result<metrics::Sampled> {
        let request = Generation::new(sampling.num_samples, sampling.batch, sampling.seed);
        metrics::gan_features(
            &self.generator,
            self.config.latent_dim,
            &request,
            extractor,
            0,
            "generator",
            device,
        )
    }
}

/// FID evaluations of pipeline folders at (algorithm, steps), each computed once: the teacher and
/// student rows of the distillation reports.
pub struct Evaluator<'a> {
    pub extractor: &'a dyn FeatureExtractor,
    pub reference: &'a Reference,
    /// Samples per evaluation.
    pub num: usize,
    /// Guidance scale for guidance-conditioned students.
    pub guidance_scale: Option<f32>,
    /// Prompts and their judge for text-to-image pipelines.
    pub judge: Option<&'a PromptJudge>,
    pub device: &'a Device,
    done: BTreeMap<(PathBuf, &'static str, usize), (Scores, Option<metrics::adherence::Adherence>)>,
}

impl<'a> Evaluator<'a> {
    pub fn new(
        extractor: &'a dyn FeatureExtractor,
        reference: &'a Reference,
        num: usize,
        guidance_scale: Option<f32>,
        device: &'a Device,
    ) -> Self {
        Evaluator {
            extractor,
            reference,
            num,
            guidance_scale,
            judge: None,
            device,
            done: BTreeMap::new(),
        }
    }

    /// The scores of the pipeline in `dir` sampled with `algorithm` in `steps` steps (seed 0).
    pub fn eval(&mut self, dir: &Path, algorithm: Algorithm, steps: usize) -> Result<Scores> {
        Ok(self.eval_judged(dir, algorithm, steps)?.0)
    }

    /// [`eval`](Self::eval) with the prompt adherence of a text-to-image pipeline.
    pub fn eval_judged(
        &mut self,
        dir: &Path,
        algorithm: Algorithm,
        steps: usize,
    ) -> Result<(Scores, Option<metrics::adherence::Adherence>)> {
        let key = (dir.to_path_buf(), algorithm.cli_name(), steps);
        if let Some(s) = self.done.get(&key) {
            return Ok(s.clone());
        }
        let pipeline = Pipeline::load(dir, self.device)?;
        let sampling = Sampling {
            scheduler: Some(algorithm),
            num_samples: self.num,
            batch: 100,
            seed: 0,
            guidance_scale: self.guidance_scale,
            eta: 0.0,
            timesteps: Vec::new(),
            precision: Precision::F32,
            lora: None,
            lora_scale: 1.0,
            device_name: String::new(),
            max_binding_bytes: None,
        };
        let prompts = text_prompts(&pipeline, dir, &sampling, self.judge)?;
        let request = Generation {
            guidance_scale: self.guidance_scale,
            text: prompts.as_ref(),
            ..Generation::new(self.num, 100, 0)
        };
        let label = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
        let sampled = metrics::sample_features(
            &pipeline,
            algorithm,
            steps,
            &request,
            self.extractor,
            0,
            prompts.as_ref().and(self.judge),
            &label,
            self.device,
        )?;
        let scores = metrics::score(&sampled.features, self.reference)?;
        let result = (scores, sampled.adherence);
        self.done.insert(key, result.clone());
        Ok(result)
    }
}
