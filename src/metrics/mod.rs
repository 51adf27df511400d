//! Sample-quality metrics: pure statistics over feature matrices (FID, KID, precision/recall),
//! the feature extractors, and reference sets with their statistics cache.

pub mod adherence;
pub mod curve_plot;
pub mod features;
pub mod fid;
pub mod kid;
pub mod npz;
pub mod precision_recall;
pub mod stats;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use serde_json::json;

pub use features::{FeatureExtractor, FeatureSink, InceptionFeatures, ShapesFeatures};
pub use kid::{Kid, KidConfig};
pub use precision_recall::PrecisionRecall;
pub use stats::{FeatureStats, Features};

use fewstep_schedulers::{Algorithm, Scheduler};

use crate::data::{ImageFolder, shapes, shapes_batch};
use crate::error::{Error, Result};
use crate::pipeline::Pipeline;
use crate::sample::{DeviceSample, Generation, generate};

/// Reference statistics, with the reference features when known (KID and precision/recall need
/// them; a statistics file alone yields FID only).
pub struct Reference {
    pub stats: FeatureStats,
    pub features: Option<Features>,
    /// What the reference set is (dataset, indices, extractor, count).
    pub protocol: serde_json::Value,
}

/// Every figure of one evaluation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scores {
    pub fid: f64,
    pub kid: Option<Kid>,
    pub precision_recall: Option<PrecisionRecall>,
    pub samples: usize,
}

/// FID needs at least 2 samples (an error naming `flag`), and more than the feature dimensions
/// for a full-rank covariance (a warning: the distance is still defined).
pub fn check_fid_samples(flag: &str, n: usize, dim: usize) -> Result<()> {
    if n < 2 {
        return Err(Error::Usage(format!(
            "{flag} {n}: FID needs at least 2 samples to estimate a covariance (and more than the extractor's {dim} feature dimensions for a full-rank one)"
        )));
    }
    if n <= dim {
        eprintln!(
            "warning: {flag} {n}: no more samples than the extractor's {dim} feature dimensions, so the covariance is singular; FID is still defined (as pytorch-fid and clean-fid compute it) but biased upward: use more than {dim} (KID, reported beside it, is unbiased)"
        );
    }
    Ok(())
}

/// Scores generated features against a reference.
pub fn score(generated: &Features, reference: &Reference) -> Result<Scores> {
    let n = generated.rows();
    let stats = FeatureStats::from_features(generated)?;
    let fid = fid::frechet_distance(&stats, &reference.stats)?;
    let (kid, pr) = match &reference.features {
        Some(real) => (
            Some(kid::kid(generated, real, KidConfig::default())?),
            Some(precision_recall::precision_recall(generated, real, 3)),
        ),
        None => (None, None),
    };
    Ok(Scores {
        fid,
        kid,
        precision_recall: pr,
        samples: n,
    })
}

/// The first few generated images (host, model space), for a grid.
#[derive(Debug, Default)]
pub struct Kept {
    pub pixels: Vec<f32>,
    pub count: usize,
    pub shape: [usize; 3],
}

/// Generated samples seen through an extractor.
pub struct Sampled {
    pub features: Features,
    pub kept: Kept,
    pub per_second: f64,
    /// Prompt adherence, when the samples were generated from judged prompts.
    pub adherence: Option<adherence::Adherence>,
}

/// Features of the images `generate` hands over (batch by batch, with the index of each batch's
/// first image), with a progress bar labelled `label`, keeping the first `keep` images.
fn collect_features(
    num: usize,
    label: &str,
    extractor: &dyn FeatureExtractor,
    keep: usize,
    judge: Option<&adherence::PromptJudge>,
    generate: impl FnOnce(&mut dyn FnMut(usize, Tensor<4>) -> Result<()>) -> Result<()>,
) -> Result<Sampled> {
    let mut scores = judge.map(|_| adherence::Adherence::default());
    let bar = indicatif::ProgressBar::new(num as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} samples | {msg} | {elapsed_precise} < {eta_precise}",
        )
        .expect("valid template"),
    );
    bar.set_message(label.to_string());
    let mut sink = FeatureSink::new(extractor);
    let mut kept = Kept::default();
    let started = std::time::Instant::now();
    // Without a terminal (nohup, CI logs) indicatif draws nothing: a line every tenth instead.
    let lines = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut done = 0;
    generate(&mut |first, x| {
        let [b, c, h, w] = x.dims();
        if first < keep {
            let rows = (keep - first).min(b);
            let head = x.clone().slice([0..rows, 0..c, 0..h, 0..w]);
            kept.pixels
                .extend(head.into_data().try_to_vec::<f32>().expect("f32 samples"));
            kept.count += rows;
            kept.shape = [c, h, w];
        }
        if let (Some(judge), Some(scores)) = (judge, scores.as_mut()) {
            judge.score(first, x.clone(), scores);
        }
        sink.add(x)?;
        bar.inc(b as u64);
        let before = done;
        done += b;
        if lines && (done * 10 / num.max(1) > before * 10 / num.max(1) || done >= num) {
            eprintln!(
                "{}",
                progress_line(label, done, num, started.elapsed().as_secs_f64())
            );
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(Sampled {
        features: sink.features,
        kept,
        per_second: num as f64 / started.elapsed().as_secs_f64(),
        adherence: scores,
    })
}

/// One line of sampling progress: `label: done/num samples | rate | ETA`.
fn progress_line(label: &str, done: usize, num: usize, seconds: f64) -> String {
    let rate = done as f64 / seconds.max(1e-9);
    let eta = num.saturating_sub(done) as f64 / rate.max(1e-9);
    format!("{label}: {done}/{num} samples | {rate:.2} samples/s | ETA {eta:.0} s")
}

/// Generates `request.num` images from `pipeline` with `algorithm` at `steps` steps (progress bar
/// labelled `label`) and extracts their features, keeping the first `keep` images. Prints the
/// scheduler's grid warning (DDIM at a step count that does not divide the train timesteps),
/// once per grid in a process.
#[allow(clippy::too_many_arguments)]
pub fn sample_features(
    pipeline: &Pipeline,
    algorithm: Algorithm,
    steps: usize,
    request: &Generation<'_>,
    extractor: &dyn FeatureExtractor,
    keep: usize,
    judge: Option<&adherence::PromptJudge>,
    label: &str,
    device: &Device,
) -> Result<Sampled> {
    let mut scheduler: Scheduler<DeviceSample> = pipeline.scheduler.build(Some(algorithm))?;
    crate::sample::configure_scheduler(&mut scheduler, request.eta, request.timesteps)?;
    scheduler
        .set_timesteps(steps)
        .map_err(|e| Error::Usage(format!("--steps {steps}: {}", e.0)))?;
    if let Some(w) = scheduler.grid_warning() {
        let train_t = scheduler.schedule().num_train_timesteps();
        crate::sample::warn_grid_once(algorithm, steps, train_t, || {
            format!("warning: {label} @ {steps} steps: {w}")
        });
    }
    collect_features(
        request.num,
        &format!("{label} @ {steps} steps"),
        extractor,
        keep,
        judge,
        |each| generate(pipeline, &mut scheduler, steps, request, device, each),
    )
}

/// Generates `request.num` images from a GAN generator and extracts their features, keeping the
/// first `keep` images.
pub fn gan_features(
    generator: &crate::models::gan::Generator,
    latent_dim: usize,
    request: &Generation<'_>,
    extractor: &dyn FeatureExtractor,
    keep: usize,
    label: &str,
    device: &Device,
) -> Result<Sampled> {
    collect_features(request.num, label, extractor, keep, None, |each| {
        crate::sample::generate_gan(generator, latent_dim, request, device, each)
    })
}

/// Where reference statistics are cached: `$FEWSTEP_CACHE`, else `$HOME/.cache/fewstep`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("FEWSTEP_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/fewstep")))
        .unwrap_or_else(|| PathBuf::from(".fewstep-cache"))
        .join("stats")
}

/// The reference set of the offline default: `n` held-out `shapes` images (indices
/// `EVAL_START ..`), cached in `cache_dir` by data seed, count and extractor.
pub fn shapes_reference(
    extractor: &dyn FeatureExtractor,
    data_seed: u64,
    n: usize,
    cache_dir: &Path,
    device: &Device,
) -> Result<Reference> {
    let protocol = json!({
        "dataset": "shapes",
        "data_seed": data_seed,
        "indices": format!("{}..{}", shapes::EVAL_START, shapes::EVAL_START + n as u64),
        "extractor": extractor.id(),
        "count": n,
    });
    let path = cache_dir.join(format!(
        "shapes-seed{data_seed}-n{n}-{}.safetensors",
        extractor.id()
    ));
    if path.is_file()
        && let Ok((stats, stored, features)) = FeatureStats::load(&path)
        && stored == protocol
    {
        return Ok(Reference {
            stats,
            features,
            protocol,
        });
    }
    let mut sink = FeatureSink::new(extractor);
    for first in (0..n).step_by(256) {
        let idx: Vec<u64> = (first..n.min(first + 256))
            .map(|i| shapes::EVAL_START + i as u64)
            .collect();
        sink.add(shapes_batch(data_seed, &idx, device).0)?;
    }
    let stats = FeatureStats::from_features(&sink.features)?;
    std::fs::create_dir_all(cache_dir).map_err(|e| {
        Error::file(
            cache_dir,
            format!("cannot create the statistics cache: {e}"),
        )
    })?;
    stats.save(&path, &protocol, Some(&sink.features))?;
    Ok(Reference {
        stats,
        features: Some(sink.features),
        protocol,
    })
}

/// Features of (up to `limit`) images of a folder, in file-name order.
pub fn folder_features(
    extractor: &dyn FeatureExtractor,
    dir: &Path,
    flag: &str,
    limit: Option<usize>,
    device: &Device,
) -> Result<Features> {
    let folder = ImageFolder::open_for(dir, extractor.image_size(), flag)?;
    if !folder.unreadable.is_empty() {
        eprintln!(
            "warning: skipped {} unreadable image file(s) in {}: {}",
            folder.unreadable.len(),
            dir.display(),
            crate::data::folder::describe_unreadable(&folder.unreadable)
        );
    }
    let n = limit.map_or(folder.len(), |l| l.min(folder.len()));
    let mut sink = FeatureSink::new(extractor);
    for first in (0..n).step_by(256) {
        let idx: Vec<usize> = (first..n.min(first + 256)).collect();
        let flips = vec![false; idx.len()];
        sink.add(folder.batch(&idx, &flips, device).0)?;
    }
    Ok(sink.features)
}

/// A reference from an image folder (not cached: folders change).
pub fn folder_reference(
    extractor: &dyn FeatureExtractor,
    dir: &Path,
    limit: Option<usize>,
    device: &Device,
) -> Result<Reference> {
    let features = folder_features(extractor, dir, "--data", limit, device)?;
    let stats = FeatureStats::from_features(&features)?;
    Ok(Reference {
        protocol: json!({
            "dataset": dir.display().to_string(),
            "extractor": extractor.id(),
            "count": features.rows(),
        }),
        stats,
        features: Some(features),
    })
}

/// A reference from a statistics file (FID only unless it holds features).
pub fn stats_reference(path: &Path) -> Result<Reference> {
    let (stats, protocol, features) = FeatureStats::load(path)?;
    Ok(Reference {
        stats,
        features,
        protocol: json!({ "statistics_file": path.display().to_string(), "stored_protocol": protocol }),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_progress_line_gives_the_rate_and_the_time_left() {
        assert_eq!(
            super::progress_line("teacher @ 50 steps", 250, 1000, 10.0),
            "teacher @ 50 steps: 250/1000 samples | 25.00 samples/s | ETA 30 s"
        );
        assert!(super::progress_line("x", 1000, 1000, 40.0).ends_with("ETA 0 s"));
    }
}
