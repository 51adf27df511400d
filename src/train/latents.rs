//! Latent-diffusion training data: the dataset encoded once by a frozen `AutoencoderKL` (the
//! posterior mean and log-variance of each image, kept on the device and in the run folder as
//! `latent_cache.safetensors`), from which every step draws images and samples
//! z = (μ + σ·ε − shift)·scaling_factor, as Stable Diffusion trained on `latent_dist.sample()`.

use std::path::{Path, PathBuf};

use burn::prelude::*;

use crate::data::{DataSource, TrainImages, shapes_batch};
use crate::error::{Error, Result};
use crate::io;
use crate::models::{Vae, VaeConfig};
use crate::noise::NoiseStream;
use crate::pipeline;

pub const LATENT_CACHE: &str = "latent_cache.safetensors";

/// The latent side of a run (`run.json`'s `latent`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatentSpec {
    /// The VAE folder (`config.json` + `diffusion_pytorch_model.safetensors`), absolute.
    pub vae: PathBuf,
    /// How many images are encoded: the first N `shapes` images, or the whole folder (N caps it).
    pub cache_images: usize,
}

impl LatentSpec {
    /// Accepts a `vae/` folder itself, or a folder that holds one (a pipeline, a `train-vae` run).
    pub fn resolve_vae(path: &Path) -> Result<PathBuf> {
        let dir = if path.join(io::CONFIG_NAME).is_file() {
            path.to_path_buf()
        } else {
            path.join(pipeline::VAE_DIR)
        };
        if !dir.join(io::CONFIG_NAME).is_file() {
            return Err(Error::file(
                path,
                "--vae: not a VAE folder (expected config.json and diffusion_pytorch_model.safetensors, or a vae/ sub-folder; train one with `fewstep train-vae`)",
            ));
        }
        dir.canonicalize()
            .map_err(|e| Error::file(&dir, format!("--vae: cannot resolve: {e}")))
    }
}

/// The encoded dataset.
pub struct LatentCache {
    pub config: VaeConfig,
    pub vae: Vae,
    mean: Tensor<4>,
    logvar: Tensor<4>,
    labels: Tensor<1, Int>,
}

impl LatentCache {
    /// Loads the cache from `run_dir`, or encodes the data and writes it there.
    pub fn open(
        spec: &LatentSpec,
        data: &DataSource,
        run_dir: &Path,
        device: &Device,
    ) -> Result<Self> {
        let (config, vae) = pipeline::load_vae(&spec.vae, device)?;
        let path = run_dir.join(LATENT_CACHE);
        let [mean, logvar, labels] = if path.is_file() {
            let mut t = io::read_safetensors(&path)?;
            let mut take = |name: &str| {
                t.remove(name)
                    .and_then(|h| h.to_device::<4>(device))
                    .ok_or_else(|| Error::file(&path, format!("no 4-d tensor `{name}`")))
            };
            [take("mean")?, take("logvar")?, take("labels")?]
        } else {
            let [mean, logvar, labels] = encode(&vae, &config, data, spec.cache_images, device)?;
            let host = |t: &Tensor<4>| {
                (
                    t.dims().to_vec(),
                    t.clone()
                        .into_data()
                        .try_to_vec::<f32>()
                        .expect("f32 tensor"),
                )
            };
            let (ms, md) = host(&mean);
            let (ls, ld) = host(&logvar);
            let (ys, yd) = host(&labels);
            io::write_safetensors(
                &path,
                &[("mean", ms, md), ("logvar", ls, ld), ("labels", ys, yd)],
            )?;
            [mean, logvar, labels]
        };
        let n = mean.dims()[0];
        Ok(LatentCache {
            config,
            vae,
            mean,
            logvar,
            labels: labels.reshape([n]).int(),
        })
    }

    pub fn len(&self) -> usize {
        self.mean.dims()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `b` random cached images as scaled posterior samples [B, L, h, w], with their labels and
    /// rows (the `shapes` index or folder position of each).
    pub fn random_batch(
        &self,
        rng: &mut NoiseStream,
        b: usize,
        device: &Device,
    ) -> (Tensor<4>, Tensor<1, Int>, Vec<u64>) {
        let idx: Vec<i64> = (0..b)
            .map(|_| rng.below(self.len() as u64) as i64)
            .collect();
        let rows: Vec<u64> = idx.iter().map(|&i| i as u64).collect();
        let idx = Tensor::<1, Int>::from_ints(idx.as_slice(), &self.mean.device());
        let mean = self.mean.clone().select(0, idx.clone());
        let logvar = self.logvar.clone().select(0, idx.clone());
        let [_, c, h, w] = mean.dims();
        let eps = crate::sample::host_noise(rng, [b, c, h, w], &self.mean.device());
        let z = mean + (logvar * 0.5).exp() * eps;
        let z = match self.config.shift_factor {
            Some(s) => z - s,
            None => z,
        } * self.config.scaling_factor;
        (
            z.to_device(device),
            self.labels.clone().select(0, idx).to_device(device),
            rows,
        )
    }
}

/// (mean, log-variance, labels as [N, 1, 1, 1] floats) of the first `n` images of `data`.
fn encode(
    vae: &Vae,
    config: &VaeConfig,
    data: &DataSource,
    n: usize,
    device: &Device,
) -> Result<[Tensor<4>; 3]> {
    let size = config.sample_size.unwrap_or(crate::data::shapes::SIZE);
    let images = data.open(size)?;
    let total = match &images {
        TrainImages::Shapes { .. } => n,
        TrainImages::Folder(f) => f.len().min(n),
    };
    if total == 0 {
        return Err(Error::Usage(
            "--latent-cache: no images to encode (0 images or a cache of 0)".into(),
        ));
    }
    let (mut means, mut logvars, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for first in (0..total).step_by(256) {
        let last = total.min(first + 256);
        let (x, y) = match &images {
            TrainImages::Shapes { seed } => {
                let idx: Vec<u64> = (first as u64..last as u64).collect();
                shapes_batch(*seed, &idx, device)
            }
            TrainImages::Folder(f) => {
                let idx: Vec<usize> = (first..last).collect();
                f.batch(&idx, &vec![false; idx.len()], device)
            }
        };
        let (m, l) = vae.encode(x);
        means.push(m);
        logvars.push(l);
        let b = last - first;
        labels.push(y.float().reshape([b, 1, 1, 1]));
    }
    Ok([
        Tensor::cat(means, 0),
        Tensor::cat(logvars, 0),
        Tensor::cat(labels, 0),
    ])
}
