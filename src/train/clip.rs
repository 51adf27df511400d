//! `fewstep train-clip`: the text encoder of the `shapes-text` teacher, trained contrastively
//! against the images it describes. No pretrained CLIP is reachable offline, and the `shapes`
//! feature network already sees what the captions talk about, so the image tower is that network,
//! locked (LiT: "locked-image text tuning", Zhai et al. 2022): only the text tower (a
//! transformers `CLIPTextModel`), both projections and the temperature train, with CLIP's
//! symmetric InfoNCE loss (Radford et al. 2021) over the batch.
//!
//! The tokenizer is a CLIP BPE whose vocabulary is CLIP's byte symbols plus one token per word of
//! the `shapes-text` grammar ([`crate::text::write_word_tokenizer`]), so transformers'
//! `CLIPTokenizer` reads it and a word outside the grammar is spelt out, not lost.
//!
//! Run folder: `run.json`, `loss.csv`, `checkpoints/{latest,previous}`, `tokenizer/` (written
//! first), and at the end `text_encoder/` (config.json + model.safetensors) — so the folder is a
//! `--text-encoder` for `fewstep train` — `clip.safetensors` (text tower, projections,
//! temperature) and `report.json` (held-out retrieval accuracy).

use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use serde_json::json;

use super::checkpoint;
use super::feature_net::FEATURE_TEST_START;
use super::run_loop::{IterReport, LoopSpec, run_loop};
use crate::data::captions::{self, Caption, Facts};
use crate::data::shapes::{self, Scene};
use crate::data::shapes_scene_batch;
use crate::error::{Error, Result};
use crate::io;
use crate::metrics::features::{FeatureExtractor, ShapesFeatures};
use crate::models::{ClipTextConfig, ClipTextModel};
use crate::noise::NoiseStream;
use crate::pipeline::{TOKENIZER_DIR, TextEncoder};
use crate::text::ClipTokenizer;

/// The `run.json` kind of a `train-clip` run.
pub const CLIP_RUN: &str = "train-clip";
/// The whole trained text side (text tower, projections, temperature).
pub const CLIP_WEIGHTS: &str = "clip.safetensors";
/// The locked image tower, copied into the finished run (the folder is self-contained).
pub const IMAGE_TOWER_DIR: &str = "image_tower";
/// Tokens per caption (the longest `shapes-text` caption is 21 with start and end).
pub const MAX_TOKENS: usize = 32;

/// Everything that defines a `train-clip` run (stored as `run.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClipRun {
    pub kind: String,
    /// The text tower's config (vocab_size and token ids from the written tokenizer).
    pub text: ClipTextConfig,
    pub projection_dim: usize,
    /// The locked image tower: a `shapes` feature network folder (absolute).
    pub image_tower: PathBuf,
    pub data_seed: u64,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    pub optimizer: super::optim::OptimizerConfig,
    pub seed: u64,
    pub checkpoint_every: usize,
}

impl ClipRun {
    /// A text tower of `hidden` width and `layers` layers for the vocabulary in `tokenizer`.
    pub fn text_config(vocab_size: usize, hidden: usize, layers: usize) -> ClipTextConfig {
        ClipTextConfig {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: 4 * hidden,
            num_hidden_layers: layers,
            num_attention_heads: (hidden / 16).max(1),
            max_position_embeddings: MAX_TOKENS,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            bos_token_id: vocab_size - 2,
            eos_token_id: vocab_size - 1,
        }
    }
}

/// The trained part: the text tower, both projections into the joint space, and the
/// temperature (log of CLIP's logit scale, initialised at ln(1/0.07), capped at ln 100).
#[derive(Module, Debug)]
pub struct ClipTextTower {
    pub text: ClipTextModel,
    pub text_projection: Linear,
    pub image_projection: Linear,
    pub logit_scale: Param<Tensor<1>>,
}

impl ClipTextTower {
    pub fn init(run: &ClipRun, image_dim: usize, device: &Device) -> Self {
        let proj = |d_in| {
            LinearConfig::new(d_in, run.projection_dim)
                .with_bias(false)
                .init(device)
        };
        ClipTextTower {
            text: run.text.init(device),
            text_projection: proj(run.text.hidden_size),
            image_projection: proj(image_dim),
            logit_scale: Param::from_tensor(Tensor::from_floats([(1.0f32 / 0.07).ln()], device)),
        }
    }

    /// Unit-norm text embeddings [B, P] of token ids [B, N].
    pub fn text_embeds(&self, ids: Tensor<2, Int>, eos_positions: &[usize]) -> Tensor<2> {
        let hidden = self.text.forward(ids, 0);
        normalize(
            self.text_projection
                .forward(ClipTextModel::pooled(hidden, eos_positions)),
        )
    }

    /// Unit-norm image embeddings [B, P] of locked-tower features [B, F].
    pub fn image_embeds(&self, features: Tensor<2>) -> Tensor<2> {
        normalize(self.image_projection.forward(features))
    }

    /// CLIP's symmetric cross-entropy over the B × B similarities (row i's match is column i).
    pub fn loss(&self, text: Tensor<2>, image: Tensor<2>) -> Tensor<1> {
        let device = text.device();
        let b = text.dims()[0];
        let scale = self
            .logit_scale
            .val()
            .clamp_max(100f32.ln())
            .exp()
            .reshape([1, 1]);
        let logits = text.matmul(image.transpose()) * scale;
        let targets = Tensor::<1, Int>::arange(0..b as i64, &device);
        let ce = CrossEntropyLossConfig::new().init(&device);
        (ce.forward(logits.clone(), targets.clone()) + ce.forward(logits.transpose(), targets))
            / 2.0
    }
}

fn normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(1e-6);
    x / norm
}

/// A finished `train-clip` folder, for scoring: the tower, its locked image network, the
/// tokenizer.
pub struct TrainedClip {
    pub tower: ClipTextTower,
    pub image_tower: ShapesFeatures,
    pub tokenizer: ClipTokenizer,
}

impl TrainedClip {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let weights = dir.join(CLIP_WEIGHTS);
        if !weights.is_file() {
            return Err(Error::file(
                dir,
                "--clip: not a finished `fewstep train-clip` run (no clip.safetensors)",
            ));
        }
        let run = checkpoint::read_run_as::<ClipRun>(dir, CLIP_RUN)?;
        let image_tower = ShapesFeatures::load(&dir.join(IMAGE_TOWER_DIR), device)?;
        let tower = io::load_weights(
            ClipTextTower::init(&run, image_tower.dim(), device),
            &weights,
        )?;
        Ok(TrainedClip {
            tower,
            image_tower,
            tokenizer: ClipTokenizer::load(&dir.join(TOKENIZER_DIR))?,
        })
    }

    /// Unit-norm embeddings [N, P] of `texts`.
    pub fn text_embeds(&self, texts: &[String], device: &Device) -> Result<Tensor<2>> {
        let (ids, eos) = tokenize(&self.tokenizer, texts, device)?;
        Ok(self.tower.text_embeds(ids, &eos))
    }

    /// Unit-norm embeddings [B, P] of images in [−1, 1].
    pub fn image_embeds(&self, images: Tensor<4>) -> Tensor<2> {
        self.tower.image_embeds(self.image_tower.features(images))
    }
}

/// Token ids [B, N] of `texts` and each row's end-token position.
pub fn tokenize(
    tokenizer: &ClipTokenizer,
    texts: &[String],
    device: &Device,
) -> Result<(Tensor<2, Int>, Vec<usize>)> {
    let n = tokenizer.max_length();
    let mut ids = Vec::with_capacity(texts.len() * n);
    let mut eos = Vec::with_capacity(texts.len());
    for t in texts {
        let row = tokenizer.encode(t)?;
        eos.push(
            row.iter()
                .position(|&i| i == tokenizer.eos_id())
                .expect("encode ends every row with the end token"),
        );
        ids.extend(row.into_iter().map(|i| i as i64));
    }
    Ok((
        Tensor::<1, Int>::from_ints(ids.as_slice(), device).reshape([texts.len(), n]),
        eos,
    ))
}

/// Held-out text → image retrieval: for each caption, the most similar of a pool of images
/// (its own and `pool − 1` others); right when the retrieved image shows what the caption states
/// (its own image, or another with the same facts).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Retrieval {
    pub top1: f64,
    /// The share of a pool that would count as right, averaged: the accuracy of a random pick.
    pub chance: f64,
    pub captions: usize,
    pub pool: usize,
}

/// Whether an image showing `shown` satisfies a caption stating `stated`.
fn satisfies(stated: &Facts, shown: &Facts) -> bool {
    stated.pairs == shown.pairs && stated.relation.is_none_or(|r| shown.relation == Some(r))
}

pub fn retrieval(
    tower: &ClipTextTower,
    image_tower: &ShapesFeatures,
    tokenizer: &ClipTokenizer,
    data_seed: u64,
    captions_n: usize,
    pool: usize,
    device: &Device,
) -> Result<Retrieval> {
    let (mut right, mut chance) = (0usize, 0f64);
    for start in (0..captions_n).step_by(pool) {
        let idx: Vec<u64> = (start..captions_n.min(start + pool))
            .map(|i| FEATURE_TEST_START + i as u64)
            .collect();
        let (x, scenes) = shapes_scene_batch(data_seed, &idx, device);
        let caps: Vec<Caption> = idx
            .iter()
            .map(|&i| captions::fixed_caption(data_seed, i))
            .collect();
        let texts: Vec<String> = caps.iter().map(|c| c.text.clone()).collect();
        let (ids, eos) = tokenize(tokenizer, &texts, device)?;
        let t = tower.text_embeds(ids, &eos);
        let i = tower.image_embeds(image_tower.features(x));
        let best: Vec<i64> = t
            .matmul(i.transpose())
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .expect("int tensor");
        let shown: Vec<Facts> = scenes.iter().map(Facts::of_scene).collect();
        for (c, &b) in caps.iter().zip(&best) {
            right += satisfies(&c.facts, &shown[b as usize]) as usize;
            chance +=
                shown.iter().filter(|s| satisfies(&c.facts, s)).count() as f64 / shown.len() as f64;
        }
    }
    Ok(Retrieval {
        top1: right as f64 / captions_n as f64,
        chance: chance / captions_n as f64,
        captions: captions_n,
        pool,
    })
}

/// One step's training pairs: `batch` training-range images and a freshly worded caption each.
fn draw(run: &ClipRun, step: usize, device: &Device) -> (Tensor<4>, Vec<String>) {
    let mut rng = NoiseStream::for_step(run.seed, step as u64);
    let idx: Vec<u64> = (0..run.batch)
        .map(|_| rng.below(shapes::EVAL_START))
        .collect();
    let (x, scenes) = shapes_scene_batch(run.data_seed, &idx, device);
    let texts = scenes
        .iter()
        .map(|s: &Scene| captions::caption(s, &mut rng).text)
        .collect();
    (x, texts)
}

struct State {
    tower: ClipTextTower,
    optim: ModuleOptimizer,
}

/// What a finished run reports.
pub struct ClipOutcome {
    pub retrieval: Option<Retrieval>,
    pub seconds: f64,
}

/// Trains (or resumes) a `train-clip` run in `run_dir`.
pub fn train_clip(
    run_dir: &Path,
    run: Option<ClipRun>,
    steps_override: Option<usize>,
    device: &Device,
    quiet: bool,
) -> Result<ClipOutcome> {
    let run = match run {
        None => {
            let mut run = checkpoint::read_run_as::<ClipRun>(run_dir, CLIP_RUN)?;
            if let Some(steps) = steps_override {
                run.steps = steps;
                io::write_json(
                    &run_dir.join(checkpoint::RUN_FILE),
                    &serde_json::to_value(&run).expect("run serialises"),
                )?;
            }
            run
        }
        Some(mut run) => {
            let image_tower = ShapesFeatures::load(&run.image_tower, device)?;
            drop(image_tower);
            checkpoint::prepare_new_run(run_dir)?;
            let words = captions::vocabulary();
            let vocab = crate::text::write_word_tokenizer(
                &run_dir.join(TOKENIZER_DIR),
                &words,
                MAX_TOKENS,
            )?;
            // The caller's width and depth, with the written tokenizer's vocabulary.
            run.text =
                ClipRun::text_config(vocab, run.text.hidden_size, run.text.num_hidden_layers);
            run.text.validate()?;
            io::write_json(
                &run_dir.join(checkpoint::RUN_FILE),
                &serde_json::to_value(&run).expect("run serialises"),
            )?;
            run
        }
    };
    let tokenizer = ClipTokenizer::load(&run_dir.join(TOKENIZER_DIR))?;
    let image_tower = ShapesFeatures::load(&run.image_tower, device)?;
    let image_dim = image_tower.dim();
    let ad = device.clone().autodiff();
    let (state, start) = match checkpoint::latest(run_dir) {
        Some(ckpt) => {
            let st = checkpoint::read_state(
                &ckpt,
                ClipTextTower::init(&run, image_dim, &ad),
                run.optimizer.init(),
            )?;
            let step = st.progress["step"]
                .as_u64()
                .ok_or_else(|| Error::file(ckpt.join("state/state.json"), "no `step`"))?
                as usize;
            (
                State {
                    tower: st.model,
                    optim: st.optim,
                },
                step,
            )
        }
        None => {
            ad.seed(run.seed);
            (
                State {
                    tower: ClipTextTower::init(&run, image_dim, &ad),
                    optim: run.optimizer.init(),
                },
                0,
            )
        }
    };
    let csv_path = run_dir.join("loss.csv");
    let spec = LoopSpec {
        name: "train-clip",
        iters: run.steps,
        first_global: 0,
        checkpoint_every: run.checkpoint_every,
        csv_path: &csv_path,
        quiet,
    };
    let (state, end) = run_loop(
        &spec,
        start,
        state,
        |mut state: State, step| {
            let (x, texts) = draw(&run, step, device);
            // The locked tower runs without autodiff; its features are constants.
            let features = image_tower.features(x).autodiff();
            let (ids, eos) = tokenize(&tokenizer, &texts, &ad)?;
            let tower = &state.tower;
            let loss = tower.loss(tower.text_embeds(ids, &eos), tower.image_embeds(features));
            let value = loss.clone().into_scalar::<f32>();
            let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &state.tower);
            let progress = step.saturating_sub(run.warmup) as f64
                / run.steps.saturating_sub(run.warmup).max(1) as f64;
            let lr = run.lr * super::warmup_factor(step, run.warmup) * super::half_cosine(progress);
            state.tower = state.optim.step(lr, state.tower, grads);
            Ok((
                state,
                IterReport {
                    loss: value,
                    lr,
                    note: String::new(),
                },
            ))
        },
        |state, done| {
            let dir = checkpoint::incoming(run_dir)?;
            checkpoint::write_state(&dir, &state.tower, &state.optim, &json!({ "step": done }))?;
            checkpoint::publish(run_dir).map(|_| ())
        },
    )?;
    let Some((final_loss, seconds)) = end.finished() else {
        return Ok(ClipOutcome {
            retrieval: None,
            seconds: f64::NAN,
        });
    };
    let tower = state.tower.valid();
    let retrieval = retrieval(
        &tower,
        &image_tower,
        &tokenizer,
        run.data_seed,
        1000,
        100,
        device,
    )?;
    let text = TextEncoder {
        tokenizer,
        config: run.text.clone(),
        model: tower.text.clone(),
    };
    text.save(run_dir)?;
    io::save_weights(&tower, &run_dir.join(CLIP_WEIGHTS))?;
    for name in [io::CONFIG_NAME, io::WEIGHTS_NAME] {
        let from = run.image_tower.join(name);
        let bytes =
            std::fs::read(&from).map_err(|e| Error::file(&from, format!("cannot read: {e}")))?;
        io::write_atomic(&run_dir.join(IMAGE_TOWER_DIR).join(name), &bytes)?;
    }
    io::write_json(
        &run_dir.join("report.json"),
        &json!({
            "retrieval": retrieval,
            "final_loss": final_loss,
            "seconds": seconds,
            "held_out_range": format!("shapes seed {} indices {}..", run.data_seed, FEATURE_TEST_START),
            "text_encoder_parameters": tower.text.num_params(),
        }),
    )?;
    Ok(ClipOutcome {
        retrieval: Some(retrieval),
        seconds,
    })
}
