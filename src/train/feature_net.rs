//! Training the `shapes` feature network (the FID extractor of the offline default): cross-entropy
//! on every label head over freshly rendered `shapes` images, then accuracy on a held-out range.

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::prelude::*;
use serde_json::json;

use crate::data::captions::{Facts, PAIRS, Relation};
use crate::data::shapes::{self, KINDS, PALETTE, Scene, ShapeLabels};
use crate::data::{shapes_labelled_batch, shapes_scene_batch};
use crate::error::Result;
use crate::io;
use crate::metrics::adherence::{Adherence, facts_from_logits};
use crate::models::feature_net::{
    ATTRIBUTE_LOGITS, FeatureNet, FeatureNetConfig, Heads, MAX_COUNT, RELATION_CLASSES,
};
use crate::noise::NoiseStream;

/// Held-out images for the feature network's accuracy start here (above the FID reference set,
/// which uses `EVAL_START ..`).
pub const FEATURE_TEST_START: u64 = shapes::EVAL_START + (1 << 36);

#[derive(Debug, Clone, serde::Serialize)]
pub struct FeatureNetTrainConfig {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    pub data_seed: u64,
    pub test_images: usize,
    /// AdamW with weight decay 1e-4, no clipping, by default.
    pub optimizer: super::optim::OptimizerConfig,
    /// Start from this feature network's trunk (its heads replaced by the config's).
    pub init: Option<std::path::PathBuf>,
}

/// Held-out accuracy of an attribute classifier: how often the facts it reads from real
/// `shapes` images equal what they hold — the ceiling of prompt adherence.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttributeAccuracy {
    /// Per (kind, colour) pair head.
    pub pair_counts: f64,
    /// On images with two shapes of different pairs.
    pub relation: f64,
    /// Facts of real images scored as prompts of themselves (relation always stated).
    pub adherence: serde_json::Value,
    pub images: usize,
}

/// Held-out accuracy of either head layout.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum HeldOutAccuracy {
    Labels(FeatureNetAccuracy),
    Attributes(AttributeAccuracy),
}

impl std::fmt::Display for HeldOutAccuracy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeldOutAccuracy::Labels(a) => write!(
                f,
                "held-out accuracy ({} images): largest kind {:.4}, kind counts {:.4}, colour counts {:.4}, all labels {:.4}",
                a.images, a.largest_kind, a.kind_counts, a.colour_counts, a.all_labels
            ),
            HeldOutAccuracy::Attributes(a) => write!(
                f,
                "held-out accuracy ({} images): pair counts {:.4}, relation {:.4}; real images as their own prompts: {}",
                a.images, a.pair_counts, a.relation, a.adherence
            ),
        }
    }
}

/// The attribute heads' targets per image: 24 pair counts, then the relation class.
fn attribute_targets(scenes: &[Scene]) -> Vec<i64> {
    scenes
        .iter()
        .flat_map(|s| {
            let f = Facts::of_scene(s);
            f.pairs
                .iter()
                .map(|&c| c as i64)
                .chain(std::iter::once(Relation::class(f.relation) as i64))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Sum of the attribute heads' cross-entropies (the relation head weighted ×2).
fn attribute_loss(net: &FeatureNet, x: Tensor<4>, scenes: &[Scene]) -> Tensor<1> {
    let device = x.device();
    let logits = net.logits(net.features(x));
    let b = scenes.len();
    let t = Tensor::<1, Int>::from_ints(attribute_targets(scenes).as_slice(), &device)
        .reshape([b, PAIRS + 1]);
    let ce = CrossEntropyLossConfig::new().init(&device);
    let counts = PAIRS * (MAX_COUNT + 1);
    let pairs = ce.forward(
        logits
            .clone()
            .slice([0..b, 0..counts])
            .reshape([b * PAIRS, MAX_COUNT + 1]),
        t.clone().slice([0..b, 0..PAIRS]).reshape([b * PAIRS]),
    );
    let relation = ce.forward(
        logits.slice([0..b, counts..ATTRIBUTE_LOGITS]),
        t.slice([0..b, PAIRS..PAIRS + 1]).reshape([b]),
    );
    debug_assert_eq!(ATTRIBUTE_LOGITS - counts, RELATION_CLASSES);
    pairs * PAIRS as f32 + relation * 2.0
}

/// Attribute accuracy on `n` held-out images.
pub fn attribute_accuracy(
    net: &FeatureNet,
    data_seed: u64,
    n: usize,
    device: &Device,
) -> AttributeAccuracy {
    let (mut pair_right, mut rel_right, mut rel_total) = (0usize, 0usize, 0usize);
    let mut adherence = Adherence::default();
    for start in (0..n).step_by(256) {
        let idx: Vec<u64> = (start..n.min(start + 256))
            .map(|i| FEATURE_TEST_START + i as u64)
            .collect();
        let (x, scenes) = shapes_scene_batch(data_seed, &idx, device);
        let shown = facts_from_logits(net.logits(net.features(x)));
        for (scene, pred) in scenes.iter().zip(&shown) {
            let truth = Facts::of_scene(scene);
            pair_right += truth
                .pairs
                .iter()
                .zip(&pred.pairs)
                .filter(|(a, b)| a == b)
                .count();
            if truth.relation.is_some() {
                rel_total += 1;
                rel_right += (truth.relation == pred.relation) as usize;
            }
            adherence.add(&truth, pred);
        }
    }
    AttributeAccuracy {
        pair_counts: pair_right as f64 / (n * PAIRS) as f64,
        relation: rel_right as f64 / rel_total.max(1) as f64,
        adherence: adherence.rates(),
        images: n,
    }
}

/// Held-out accuracy per head group.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FeatureNetAccuracy {
    pub largest_kind: f64,
    pub kind_counts: f64,
    pub colour_counts: f64,
    /// Share of images with every head right.
    pub all_labels: f64,
    pub images: usize,
}

/// Class targets in the head layout: [largest kind, kind counts…, colour counts…].
fn targets(labels: &[ShapeLabels]) -> Vec<usize> {
    labels
        .iter()
        .flat_map(|l| {
            std::iter::once(l.largest_kind)
                .chain(l.kind_counts.iter().map(|&c| c as usize))
                .chain(l.colour_counts.iter().map(|&c| c as usize))
        })
        .collect()
}

const HEADS: usize = 1 + KINDS.len() + PALETTE.len();

/// Sum of the heads' cross-entropies. `logits` [B, NUM_LOGITS].
fn label_loss(net: &FeatureNet, x: Tensor<4>, labels: &[ShapeLabels]) -> Tensor<1> {
    let device = x.device();
    let logits = net.logits(net.features(x));
    let b = labels.len();
    let t: Vec<i64> = targets(labels).into_iter().map(|v| v as i64).collect();
    let t = Tensor::<1, Int>::from_ints(t.as_slice(), &device).reshape([b, HEADS]);
    let ce = CrossEntropyLossConfig::new().init(&device);
    let kind = ce.forward(
        logits.clone().slice([0..b, 0..KINDS.len()]),
        t.clone().slice([0..b, 0..1]).reshape([b]),
    );
    let counts = logits
        .slice([0..b, KINDS.len()..crate::models::feature_net::NUM_LOGITS])
        .reshape([b * (HEADS - 1), MAX_COUNT + 1]);
    let count_targets = t.slice([0..b, 1..HEADS]).reshape([b * (HEADS - 1)]);
    kind + ce.forward(counts, count_targets) * (HEADS - 1) as f32
}

/// Accuracy on `n` held-out images.
pub fn accuracy(net: &FeatureNet, data_seed: u64, n: usize, device: &Device) -> FeatureNetAccuracy {
    let mut right = [0usize; 3];
    let mut all = 0usize;
    for start in (0..n).step_by(256) {
        let idx: Vec<u64> = (start..n.min(start + 256))
            .map(|i| FEATURE_TEST_START + i as u64)
            .collect();
        let (x, labels) = shapes_labelled_batch(data_seed, &idx, device);
        let logits = net.logits(net.features(x));
        let b = idx.len();
        let kind_pred = logits
            .clone()
            .slice([0..b, 0..KINDS.len()])
            .argmax(1)
            .reshape([b]);
        let count_pred = logits
            .slice([0..b, KINDS.len()..crate::models::feature_net::NUM_LOGITS])
            .reshape([b, HEADS - 1, MAX_COUNT + 1])
            .argmax(2)
            .reshape([b, HEADS - 1]);
        let kind_pred: Vec<i64> = kind_pred
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap();
        let count_pred: Vec<i64> = count_pred
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap();
        let t = targets(&labels);
        for i in 0..b {
            let row = &t[i * HEADS..(i + 1) * HEADS];
            let pred = std::iter::once(kind_pred[i])
                .chain(
                    count_pred[i * (HEADS - 1)..(i + 1) * (HEADS - 1)]
                        .iter()
                        .copied(),
                )
                .map(|v| v as usize);
            let ok: Vec<bool> = pred.zip(row).map(|(p, &r)| p == r).collect();
            right[0] += ok[0] as usize;
            right[1] += ok[1..1 + KINDS.len()].iter().filter(|&&o| o).count();
            right[2] += ok[1 + KINDS.len()..].iter().filter(|&&o| o).count();
            all += ok.iter().all(|&o| o) as usize;
        }
    }
    let n = n as f64;
    FeatureNetAccuracy {
        largest_kind: right[0] as f64 / n,
        kind_counts: right[1] as f64 / (n * KINDS.len() as f64),
        colour_counts: right[2] as f64 / (n * PALETTE.len() as f64),
        all_labels: all as f64 / n,
        images: n as usize,
    }
}

/// Trains a feature network and writes `config.json`, `model.safetensors` and `report.json`
/// (settings, held-out accuracy, wall time) into `out`.
pub fn train_feature_net(
    out: &Path,
    config: &FeatureNetConfig,
    cfg: &FeatureNetTrainConfig,
    device: &Device,
    quiet: bool,
) -> Result<HeldOutAccuracy> {
    io::check_new_folder(out, "--out")?;
    let ad = device.clone().autodiff();
    ad.seed(cfg.seed);
    let mut net = match &cfg.init {
        None => config.init(&ad),
        Some(dir) => {
            let path = dir.join(crate::io::CONFIG_NAME);
            let base = FeatureNetConfig::from_json_str(&io::read_text(&path)?)
                .map_err(|e| e.in_file(&path))?;
            if base.channels != config.channels || base.feature_dim != config.feature_dim {
                return Err(crate::error::Error::file(
                    &path,
                    "--init: a feature network of another size (expected the shapes32 trunk)",
                ));
            }
            io::load_weights(base.init(&ad), &dir.join(io::WEIGHTS_NAME))?.with_heads(config, &ad)
        }
    };
    cfg.optimizer.validate()?;
    let mut optim = cfg.optimizer.init();
    let bar = super::progress_bar(cfg.steps, 0, quiet);
    let log_lines = super::log_lines(quiet);
    let started = Instant::now();
    let mut smoothed = None;
    for step in 0..cfg.steps {
        let mut rng = NoiseStream::for_step(cfg.seed, step as u64);
        let idx: Vec<u64> = (0..cfg.batch)
            .map(|_| rng.below(shapes::EVAL_START))
            .collect();
        let loss = match config.heads {
            Heads::Labels => {
                let (x, labels) = shapes_labelled_batch(cfg.data_seed, &idx, &ad);
                label_loss(&net, x, &labels)
            }
            Heads::Attributes => {
                let (x, scenes) = shapes_scene_batch(cfg.data_seed, &idx, &ad);
                attribute_loss(&net, x, &scenes)
            }
        };
        let value: f32 = loss.clone().into_scalar::<f32>();
        // Cosine decay to 5 % of the peak rate.
        let progress = step as f64 / cfg.steps as f64;
        let lr = cfg.lr * (0.05 + 0.95 * super::half_cosine(progress));
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        net = optim.step(lr, net, grads);
        let s = smoothed.map_or(value, |s: f32| 0.98 * s + 0.02 * value);
        smoothed = Some(s);
        if log_lines && (step + 1) % 50 == 0 {
            eprintln!(
                "step {}/{} | loss {s:.4} | lr {lr:.2e}",
                step + 1,
                cfg.steps
            );
        }
        bar.set_position(step as u64 + 1);
        bar.set_message(format!(
            "loss {s:.4} | {:.2} it/s",
            (step + 1) as f64 / started.elapsed().as_secs_f64()
        ));
    }
    bar.finish_and_clear();
    let net = net.valid();
    let acc = match config.heads {
        Heads::Labels => {
            HeldOutAccuracy::Labels(accuracy(&net, cfg.data_seed, cfg.test_images, device))
        }
        Heads::Attributes => HeldOutAccuracy::Attributes(attribute_accuracy(
            &net,
            cfg.data_seed,
            cfg.test_images,
            device,
        )),
    };
    // Written whole under a temporary name, then renamed: never a half feature network.
    io::write_dir_atomic(out, |dir| {
        io::write_json(
            &dir.join("config.json"),
            &serde_json::to_value(config).expect("config"),
        )?;
        io::save_weights(&net, &dir.join(io::WEIGHTS_NAME))?;
        io::write_json(
            &dir.join("report.json"),
            &json!({
                "train": cfg,
                "held_out_accuracy": acc,
                "held_out_range": format!("shapes seed {} indices {}..", cfg.data_seed, FEATURE_TEST_START),
                "seconds": started.elapsed().as_secs_f64(),
            }),
        )
    })?;
    Ok(acc)
}
