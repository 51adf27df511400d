//! Training an `AutoencoderKL` (the latent space of few-step latent generation): the
//! reconstruction term (L1 or squared error, summed over pixels) + β·KL(q(z|x) ‖ N(0, I)) (summed
//! over latent elements), both per image as in Rombach et al.'s LDM autoencoders (β = 1e-6 there),
//! optionally + a perceptual term (squared distance in the `shapes` feature network's features).
//! Checkpoints, resume, Ctrl-C and the NaN guard are the shared loop's. At the end the
//! `scaling_factor` is set to 1/std of posterior samples of held-out images, as Stable
//! Diffusion's was, and reconstruction PSNR and rFID (FID of reconstructions against the
//! held-out reference) are measured and written to `report.json`.

use std::path::{Path, PathBuf};

use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use serde_json::json;

use super::run_loop::{IterReport, LoopSpec, run_loop};
use super::{checkpoint, open_images};
use crate::data::{DataSource, TrainImages, shapes, shapes_batch};
use crate::distill::gan::PixelDistance;
use crate::error::{Error, Result};
use crate::io;
use crate::metrics::{self, FeatureExtractor, FeatureSink, ShapesFeatures};
use crate::models::{Vae, VaeConfig};
use crate::noise::NoiseStream;
use crate::pipeline;

pub const VAE_RUN: &str = "train-vae";

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VaeTrainConfig {
    pub iters: usize,
    pub batch: usize,
    pub lr: f64,
    pub reconstruction: PixelDistance,
    /// β of the KL term.
    pub kl_weight: f64,
    /// Weight of the perceptual term (0: none).
    pub perceptual_weight: f64,
    pub seed: u64,
    pub checkpoint_every: usize,
    /// Held-out images for PSNR, rFID and the scaling factor.
    pub eval_images: usize,
    /// Adam (burn's defaults unless flags say otherwise).
    pub optimizer: super::optim::OptimizerConfig,
}

impl VaeTrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.optimizer.validate()?;
        if self.iters == 0 || self.batch == 0 || self.checkpoint_every == 0 {
            return Err(Error::Usage(
                "--iters, --batch and --checkpoint-every must be at least 1".into(),
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::Usage(format!(
                "--lr {}: expected a positive number",
                self.lr
            )));
        }
        for (flag, v) in [
            ("--kl-weight", self.kl_weight),
            ("--perceptual", self.perceptual_weight),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::Usage(format!(
                    "{flag} {v}: expected a weight of 0 or more"
                )));
            }
        }
        Ok(())
    }
}

/// Everything that defines a VAE run (`run.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VaeRun {
    pub kind: String,
    pub vae: VaeConfig,
    pub config: VaeTrainConfig,
    pub data: DataSource,
    /// The `shapes` feature network: the perceptual term's and the rFID's.
    pub feature_net: PathBuf,
}

/// What a finished run measured (also `report.json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct VaeReport {
    /// Mean PSNR (dB, images in [0, 1]) of decode(mean of q(z|x)) over the held-out images.
    pub psnr: f64,
    /// FID of those reconstructions against the held-out reference, `shapes` features.
    pub rfid: f64,
    /// FID of the held-out originals against the same reference (the floor rFID is read
    /// against: finite-sample FID is not 0).
    pub original_fid: f64,
    pub scaling_factor: f32,
    /// Std of the posterior samples before scaling.
    pub latent_std: f64,
    pub eval_images: usize,
    pub final_loss: f64,
    pub seconds: f64,
}

/// A small `AutoencoderKL` for 32×32 RGB: 16-32-64 channels, ×4 downsampling to 8×8×4.
pub fn shapes32_config() -> VaeConfig {
    VaeConfig {
        block_out_channels: vec![16, 32, 64],
        down_block_types: vec!["DownEncoderBlock2D".into(); 3],
        up_block_types: vec!["UpDecoderBlock2D".into(); 3],
        layers_per_block: 1,
        latent_channels: 4,
        norm_num_groups: 8,
        sample_size: Some(32),
        ..VaeConfig::default()
    }
}

fn optimizer(cfg: &VaeTrainConfig) -> ModuleOptimizer {
    cfg.optimizer.init()
}

/// KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²), summed over an image's latent elements,
/// averaged over the batch.
pub(crate) fn gaussian_kl(mean: Tensor<4>, logvar: Tensor<4>) -> Tensor<1> {
    let b = mean.dims()[0] as f64;
    (mean.powf_scalar(2.0) + logvar.clone().exp() - logvar - 1.0).sum() * (0.5 / b)
}

/// The training loss of one batch; `x` in [−1, 1] on an autodiff device.
fn vae_loss(
    vae: &Vae,
    x: Tensor<4>,
    eps: Tensor<4>,
    cfg: &VaeTrainConfig,
    perceptual: Option<&ShapesFeatures>,
) -> Tensor<1> {
    let b = x.dims()[0] as f64;
    let (mean, logvar) = vae.encode(x.clone());
    let z = mean.clone() + (logvar.clone() * 0.5).exp() * eps;
    let recon = vae.decode(z);
    let diff = recon.clone() - x.clone();
    let rec = match cfg.reconstruction {
        PixelDistance::L1 => diff.abs().sum(),
        PixelDistance::Mse => diff.powf_scalar(2.0).sum(),
    } / b;
    let mut loss = rec + gaussian_kl(mean, logvar) * cfg.kl_weight;
    if let Some(net) = perceptual
        && cfg.perceptual_weight > 0.0
    {
        let want = net.features_autodiff(x).detach();
        let got = net.features_autodiff(recon);
        loss = loss + (got - want).powf_scalar(2.0).sum() * (cfg.perceptual_weight / b);
    }
    loss
}

/// Runs (or resumes) a VAE training in `run_dir`; `None` when interrupted (a checkpoint was
/// written).
pub fn train_vae(
    run_dir: &Path,
    run: Option<VaeRun>,
    resume: bool,
    device: &Device,
    quiet: bool,
) -> Result<Option<VaeReport>> {
    let run = match (resume, run) {
        (true, _) => checkpoint::read_run_as::<VaeRun>(run_dir, VAE_RUN)?,
        (false, Some(run)) => run,
        (false, None) => return Err(Error::Usage("nothing to train".into())),
    };
    let cfg = &run.config;
    cfg.validate()?;
    run.vae.validate()?;
    let size = run.vae.sample_size.unwrap_or(32);
    let images: TrainImages = open_images(&run.data, size, None)?;
    let features = ShapesFeatures::load(&run.feature_net, device)?;
    if !resume {
        checkpoint::prepare_new_run(run_dir)?;
        io::write_json(
            &run_dir.join(checkpoint::RUN_FILE),
            &serde_json::to_value(&run).expect("run serialises"),
        )?;
    }
    let ad = device.clone().autodiff();
    let (vae, optim, start) = match checkpoint::latest(run_dir) {
        Some(ckpt) => {
            let s = checkpoint::read_state(&ckpt, run.vae.init(&ad), optimizer(cfg))?;
            let iter = s.progress["iter"]
                .as_u64()
                .ok_or_else(|| Error::file(ckpt.join("state/state.json"), "no `iter`"))?;
            (s.model, s.optim, iter as usize)
        }
        None => {
            ad.seed(cfg.seed);
            (run.vae.init(&ad), optimizer(cfg), 0)
        }
    };
    let csv_path = run_dir.join("loss.csv");
    let spec = LoopSpec {
        name: "vae",
        iters: cfg.iters,
        first_global: 0,
        checkpoint_every: cfg.checkpoint_every,
        csv_path: &csv_path,
        quiet,
    };
    let latent_side = size / run.vae.downsampling();
    let perceptual = (cfg.perceptual_weight > 0.0).then_some(&features);
    let (state, end) = run_loop(
        &spec,
        start,
        (vae, optim),
        |(vae, mut optim), iter| {
            let mut rng = NoiseStream::for_step(cfg.seed, iter as u64);
            // Order of draws: images, then the posterior noise (resume relies on it).
            let (x, _) = images.random_batch(&mut rng, cfg.batch, &ad);
            let eps = Tensor::<1>::from_floats(
                rng.gaussian(cfg.batch * run.vae.latent_channels * latent_side * latent_side)
                    .as_slice(),
                &ad,
            )
            .reshape([cfg.batch, run.vae.latent_channels, latent_side, latent_side]);
            let loss = vae_loss(&vae, x, eps, cfg, perceptual);
            let value: f32 = loss.clone().into_scalar::<f32>();
            let grads = GradientsParams::from_grads(loss.backward(), &vae);
            let vae = optim.step(cfg.lr, vae, grads);
            Ok((
                (vae, optim),
                IterReport {
                    loss: value,
                    lr: cfg.lr,
                    note: String::new(),
                },
            ))
        },
        |(vae, optim), iter| {
            let dir = checkpoint::incoming(run_dir)?;
            checkpoint::write_state(&dir, vae, optim, &json!({ "iter": iter }))?;
            checkpoint::publish(run_dir).map(|_| ())
        },
    )?;
    let Some((final_loss, seconds)) = end.finished() else {
        return Ok(None);
    };
    let vae = state.0.valid();
    let mut report = evaluate_vae(
        &vae,
        &features,
        cfg.eval_images,
        run_data_seed(&run.data),
        device,
    )?;
    report.final_loss = final_loss;
    report.seconds = seconds;
    let config = VaeConfig {
        scaling_factor: report.scaling_factor,
        ..run.vae.clone()
    };
    io::write_dir_atomic(&run_dir.join(pipeline::VAE_DIR), |dir| {
        pipeline::save_vae(dir, &config, &vae)
    })?;
    io::write_json(
        &run_dir.join("report.json"),
        &json!({
            "report": report,
            "run": run,
            "held_out": format!("shapes indices {}..{}", shapes::EVAL_START, shapes::EVAL_START + cfg.eval_images as u64),
        }),
    )?;
    Ok(Some(report))
}

fn run_data_seed(data: &DataSource) -> u64 {
    match data {
        DataSource::Shapes { seed } => *seed,
        DataSource::Folder { .. } => 0,
    }
}

/// PSNR, rFID and the scaling factor of `vae` on `n` held-out `shapes` images (seed
/// `data_seed`), scored against the cached 5000-image reference.
pub fn evaluate_vae(
    vae: &Vae,
    features: &ShapesFeatures,
    n: usize,
    data_seed: u64,
    device: &Device,
) -> Result<VaeReport> {
    metrics::check_fid_samples("--eval-images", n, features.dim())?;
    let reference = metrics::shapes_reference(
        features,
        data_seed,
        5000,
        &metrics::default_cache_dir(),
        device,
    )?;
    let mut recon_sink = FeatureSink::new(features);
    let mut original_sink = FeatureSink::new(features);
    let mut psnr_sum = 0.0;
    let (mut sum, mut sum_sq, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut rng = NoiseStream::new(0);
    for first in (0..n).step_by(100) {
        let idx: Vec<u64> = (first..n.min(first + 100))
            .map(|i| shapes::EVAL_START + i as u64)
            .collect();
        let b = idx.len();
        let (x, _) = shapes_batch(data_seed, &idx, device);
        let (mean, logvar) = vae.encode(x.clone());
        let recon = vae.decode(mean.clone()).clamp(-1.0, 1.0);
        // PSNR per image on [0, 1]: 10·log10(1 / MSE); the [−1, 1] difference is halved.
        let mse: Vec<f32> = ((recon.clone() - x.clone()) * 0.5)
            .powf_scalar(2.0)
            .reshape([b as i32, -1])
            .mean_dim(1)
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32");
        psnr_sum += mse
            .iter()
            .map(|&m| 10.0 * (1.0 / (m as f64).max(1e-12)).log10())
            .sum::<f64>();
        let eps = Tensor::<4>::from_floats(
            TensorData::new(rng.gaussian(mean.shape().num_elements()), mean.shape()),
            device,
        );
        let z = mean + (logvar * 0.5).exp() * eps;
        let zs: Vec<f32> = z.into_data().try_to_vec::<f32>().expect("f32");
        for v in zs {
            sum += v as f64;
            sum_sq += (v as f64) * (v as f64);
            count += 1;
        }
        recon_sink.add(recon)?;
        original_sink.add(x)?;
    }
    let mean = sum / count as f64;
    let std = (sum_sq / count as f64 - mean * mean).max(1e-12).sqrt();
    let rfid = metrics::score(&recon_sink.features, &reference)?.fid;
    let original_fid = metrics::score(&original_sink.features, &reference)?.fid;
    Ok(VaeReport {
        psnr: psnr_sum / n as f64,
        rfid,
        original_fid,
        scaling_factor: (1.0 / std) as f32,
        latent_std: std,
        eval_images: n,
        final_loss: f64::NAN,
        seconds: f64::NAN,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn the_shapes_vae_maps_32_pixels_to_an_8x8x4_latent() {
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let cfg = shapes32_config();
        cfg.validate().unwrap();
        assert_eq!(cfg.downsampling(), 4);
        let vae = cfg.init(&device);
        let x = Tensor::<4>::random([2, 3, 32, 32], Distribution::Uniform(-1.0, 1.0), &device);
        let (mean, logvar) = vae.encode(x);
        assert_eq!(mean.dims(), [2, 4, 8, 8]);
        assert_eq!(logvar.dims(), [2, 4, 8, 8]);
        assert_eq!(vae.decode(mean).dims(), [2, 3, 32, 32]);
    }

    #[test]
    fn the_kl_term_matches_its_closed_form() {
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let kl = |mu: f32, logvar: f32| {
            let m = Tensor::<4>::full([2, 4, 2, 2], mu, &device);
            let l = Tensor::<4>::full([2, 4, 2, 2], logvar, &device);
            gaussian_kl(m, l).into_scalar::<f32>()
        };
        assert!(kl(0.0, 0.0).abs() < 1e-6);
        // 16 elements per image, each ½(μ² + e^l − 1 − l).
        assert!((kl(1.0, 0.0) - 8.0).abs() < 1e-5);
        let per = 0.5 * (1f32.exp() - 2.0);
        assert!((kl(0.0, 1.0) - 16.0 * per).abs() < 1e-4);
    }
}
