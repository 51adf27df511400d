//! Pipelines: what a diffusers folder holds, from its `model_index.json`, loaded into models and
//! written back. Above `models` (which it builds) and `io` (files, names, atomic writes).

use std::path::Path;

use burn::prelude::*;
use fewstep_schedulers::{Algorithm, SchedulerConfig};

use crate::error::{Error, Result};
use crate::io::{
    CONFIG_NAME, SCHEDULER_CONFIG_NAME, WEIGHTS_NAME, load_weights, read_text, save_weights,
    write_json,
};
use crate::models::footprint::{self, Use};
use crate::models::{UNet, UNetConfig, Vae, VaeConfig};

pub const VAE_DIR: &str = "vae";

/// `DIR/config.json` + `DIR/diffusion_pytorch_model.safetensors` of a UNet.
pub fn load_unet(dir: &Path, device: &Device) -> Result<(UNetConfig, UNet)> {
    let config_path = dir.join(CONFIG_NAME);
    let config = UNetConfig::from_json_str(&read_text(&config_path)?)
        .map_err(|e| e.in_file(&config_path))?;
    // One image must be computable before anything is allocated.
    footprint::check_unet(&config, &config_path, None, Use::Inference { batch: 1 })?;
    let unet = load_weights(config.init(device), &dir.join(WEIGHTS_NAME))?;
    Ok((config, unet))
}

pub fn save_unet(dir: &Path, config: &UNetConfig, unet: &UNet) -> Result<()> {
    write_json(&dir.join(CONFIG_NAME), &config.to_json())?;
    save_weights(unet, &dir.join(WEIGHTS_NAME))
}

pub fn load_vae(dir: &Path, device: &Device) -> Result<(VaeConfig, Vae)> {
    let config_path = dir.join(CONFIG_NAME);
    let config =
        VaeConfig::from_json_str(&read_text(&config_path)?).map_err(|e| e.in_file(&config_path))?;
    footprint::check_vae(&config, &config_path, None, Use::Inference { batch: 1 })?;
    let vae = load_weights(config.init(device), &dir.join(WEIGHTS_NAME))?;
    Ok((config, vae))
}

pub fn save_vae(dir: &Path, config: &VaeConfig, vae: &Vae) -> Result<()> {
    write_json(&dir.join(CONFIG_NAME), &config.to_json())?;
    save_weights(vae, &dir.join(WEIGHTS_NAME))
}

pub fn load_scheduler_config(dir: &Path) -> Result<SchedulerConfig> {
    let path = dir.join(SCHEDULER_CONFIG_NAME);
    SchedulerConfig::from_json_str(&read_text(&path)?).map_err(|e| Error::file(&path, e.0))
}

/// A diffusers pipeline folder: a UNet, its scheduler config, and optionally a VAE (then the UNet
/// works on latents).
pub struct Pipeline {
    pub unet_config: UNetConfig,
    pub unet: UNet,
    pub scheduler: SchedulerConfig,
    pub vae: Option<(VaeConfig, Vae)>,
}

impl Pipeline {
    /// The pipeline with its UNet and VAE in `precision` (the scheduler always computes in f32).
    pub fn with_precision(mut self, precision: crate::backend::Precision) -> Self {
        let dtype = precision.dtype();
        self.unet = crate::backend::cast_module(self.unet, dtype);
        self.vae = self
            .vae
            .map(|(config, vae)| (config, crate::backend::cast_module(vae, dtype)));
        self
    }

    /// Loads `DIR` (`model_index.json`, `unet/`, `scheduler/`, optional `vae/`).
    /// Loads the pipeline in `dir` with the adapters of a LoRA file merged at `scale`; the
    /// pipeline's scheduler becomes the one the file names (an LCM-LoRA's LCM scheduler), if any.
    pub fn load_with_lora(
        dir: &Path,
        lora_path: &Path,
        scale: f32,
        device: &Device,
    ) -> Result<Self> {
        use crate::models::lora;
        if !scale.is_finite() {
            return Err(Error::Usage(format!(
                "--lora-scale {scale}: expected a number"
            )));
        }
        let file = lora::LoraFile::read(lora_path)?;
        let mut pipeline = Pipeline::load(dir, device)?;
        pipeline.unet = lora::merge(pipeline.unet, &file, scale, lora_path)?;
        if let Some(text) = file.scheduler_config() {
            pipeline.scheduler = SchedulerConfig::from_json_str(text).map_err(|e| {
                Error::file(
                    lora_path,
                    format!("metadata `{}`: {}", lora::SCHEDULER_METADATA_KEY, e.0),
                )
            })?;
        }
        Ok(pipeline)
    }

    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if dir.is_file() {
            return Err(Error::file(
                dir,
                "is a file, expected a diffusers pipeline folder (model_index.json, unet/, scheduler/)",
            ));
        }
        if !dir.is_dir() {
            return Err(Error::file(dir, "pipeline folder not found"));
        }
        let index_path = dir.join("model_index.json");
        let index: serde_json::Value = serde_json::from_str(&read_text(&index_path)?)
            .map_err(|e| Error::file(&index_path, format!("not valid JSON: {e}")))?;
        if !index.is_object() {
            return Err(Error::file(&index_path, "expected a JSON object"));
        }
        let (unet_config, unet) = load_unet(&dir.join("unet"), device)?;
        let scheduler = load_scheduler_config(&dir.join("scheduler"))?;
        let vae = if dir.join(VAE_DIR).is_dir() {
            Some(load_vae(&dir.join(VAE_DIR), device)?)
        } else {
            None
        };
        if let Some((vc, _)) = &vae
            && vc.latent_channels != unet_config.in_channels
        {
            return Err(Error::file(
                dir,
                format!(
                    "vae latent_channels ({}) differs from unet in_channels ({})",
                    vc.latent_channels, unet_config.in_channels
                ),
            ));
        }
        Ok(Pipeline {
            unet_config,
            unet,
            scheduler,
            vae,
        })
    }

    /// Writes the pipeline as a diffusers folder with `algorithm`'s scheduler config.
    pub fn save(&self, dir: &Path, algorithm: Algorithm) -> Result<()> {
        save_pipeline(
            dir,
            &self.unet_config,
            &self.unet,
            &self.scheduler,
            algorithm,
            self.vae.as_ref().map(|(c, v)| (c, v)),
        )
    }

    /// The shape of one sample in model space: [C, H, W] of the UNet's input.
    /// An upper bound on the largest single tensor one generated image needs (UNet step or VAE
    /// decode), in elements.
    pub fn peak_tensor_elements_per_image(&self) -> Result<usize> {
        let [_, size, _] = self.sample_shape()?;
        let unet = self.unet_config.peak_tensor_elements(size);
        Ok(match &self.vae {
            Some((config, _)) => unet.max(config.decoder_peak_tensor_elements(size)),
            None => unet,
        })
    }

    pub fn sample_shape(&self) -> Result<[usize; 3]> {
        let size = self.unet_config.sample_size.ok_or_else(|| {
            Error::Config(
                "unet config.json has no `sample_size`: cannot tell the sample resolution".into(),
            )
        })?;
        Ok([self.unet_config.in_channels, size, size])
    }
}

/// Writes a diffusers pipeline folder.
pub fn save_pipeline(
    dir: &Path,
    unet_config: &UNetConfig,
    unet: &UNet,
    scheduler: &SchedulerConfig,
    algorithm: Algorithm,
    vae: Option<(&VaeConfig, &Vae)>,
) -> Result<()> {
    let mut index = serde_json::json!({
        "_class_name": "DDPMPipeline",
        "_diffusers_version": "0.31.0",
        "scheduler": ["diffusers", algorithm.class_name()],
        "unet": ["diffusers", "UNet2DModel"],
    });
    if let Some((vc, v)) = vae {
        index["vae"] = serde_json::json!(["diffusers", "AutoencoderKL"]);
        save_vae(&dir.join(VAE_DIR), vc, v)?;
    }
    save_unet(&dir.join("unet"), unet_config, unet)?;
    write_json(
        &dir.join("scheduler").join(SCHEDULER_CONFIG_NAME),
        &scheduler.to_json(algorithm),
    )?;
    write_json(&dir.join("model_index.json"), &index)
}
