//! Pipelines: what a diffusers folder holds, from its `model_index.json`, loaded into models and
//! written back. Above `models` (which it builds) and `io` (files, names, atomic writes).

use std::path::Path;

use burn::prelude::*;
use fewstep_schedulers::{Algorithm, SchedulerConfig};

use crate::backend::Precision;
use crate::error::{Error, Result};
use crate::io::{
    CONFIG_NAME, SCHEDULER_CONFIG_NAME, WEIGHTS_NAME, read_text, save_weights, write_json,
};
use crate::models::footprint::{self, Use};
use crate::models::quant;
use crate::models::{ClipTextConfig, ClipTextModel, UNet, UNetConfig, Vae, VaeConfig};
use crate::text::ClipTokenizer;

/// A pipeline's VAE sub-folder (also where `train-vae` writes its autoencoder).
pub const VAE_DIR: &str = "vae";

/// A diffusers weights file loaded into `module` in `precision`.
fn load_in<M: burn::module::Module>(module: M, path: &Path, precision: Precision) -> Result<M> {
    crate::io::load_weights_renamed(
        module,
        path,
        |name| Some(name.to_string()),
        precision == Precision::F16,
    )
}
pub const TEXT_ENCODER_DIR: &str = "text_encoder";
pub const TOKENIZER_DIR: &str = "tokenizer";
/// transformers' weights file name.
pub const TEXT_ENCODER_WEIGHTS: &str = "model.safetensors";

/// A pipeline's text side: the CLIP tokenizer and text encoder (`tokenizer/`, `text_encoder/`).
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    pub config: ClipTextConfig,
    pub model: ClipTextModel,
}

impl TextEncoder {
    /// Loads `text_encoder/` (config.json + model.safetensors; `text_model.`-prefixed names or
    /// not, `position_ids` buffers ignored) and `tokenizer/`.
    pub fn load(dir: &Path, device: &Device, precision: Precision) -> Result<Self> {
        let tokenizer = ClipTokenizer::load(&dir.join(TOKENIZER_DIR))?;
        let enc_dir = dir.join(TEXT_ENCODER_DIR);
        let config_path = enc_dir.join(CONFIG_NAME);
        let config = ClipTextConfig::from_json_str(&read_text(&config_path)?)
            .map_err(|e| e.in_file(&config_path))?;
        let weights = enc_dir.join(TEXT_ENCODER_WEIGHTS);
        if !weights.is_file() && enc_dir.join("pytorch_model.bin").is_file() {
            return Err(Error::file(
                &weights,
                "file not found (this folder has only pytorch_model.bin: convert it to safetensors)",
            ));
        }
        let model = crate::io::load_weights_renamed(
            config.init(device),
            &weights,
            |name| {
                let name = name.strip_prefix("text_model.").unwrap_or(name);
                // Buffers transformers 4 saved; not parameters.
                (name != "embeddings.position_ids").then(|| name.to_string())
            },
            precision == Precision::F16,
        )?;
        Ok(TextEncoder {
            tokenizer,
            config,
            model,
        })
    }

    /// Writes `text_encoder/` (with transformers 4's `text_model.` prefix, which transformers 5
    /// reads too) and copies `tokenizer/` from `source`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let enc_dir = dir.join(TEXT_ENCODER_DIR);
        write_json(&enc_dir.join(CONFIG_NAME), &self.config.to_json())?;
        crate::io::write_atomic(
            &enc_dir.join(TEXT_ENCODER_WEIGHTS),
            &crate::io::weights_to_bytes_prefixed(&self.model, "text_model.")?,
        )?;
        self.tokenizer.save(&dir.join(TOKENIZER_DIR))
    }

    /// Prompt embeddings [P, 77, D] of `prompts` (diffusers' `encode_prompt`).
    pub fn encode(
        &self,
        prompts: &[String],
        clip_skip: usize,
        device: &Device,
    ) -> Result<Tensor<3>> {
        let n = self.tokenizer.max_length();
        if n > self.config.max_position_embeddings {
            return Err(Error::Config(format!(
                "the tokenizer's model_max_length ({n}) exceeds the text encoder's max_position_embeddings ({})",
                self.config.max_position_embeddings
            )));
        }
        let mut ids = Vec::with_capacity(prompts.len() * n);
        for p in prompts {
            ids.extend(self.tokenizer.encode(p)?.into_iter().map(|i| i as i64));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab_size) {
            return Err(Error::Config(format!(
                "token id {bad} is outside the text encoder's vocab_size ({}): tokenizer and text encoder differ",
                self.config.vocab_size
            )));
        }
        let ids = Tensor::<1, Int>::from_ints(ids.as_slice(), device).reshape([prompts.len(), n]);
        Ok(self.model.forward(ids, clip_skip))
    }
}

/// `DIR/config.json` + `DIR/diffusion_pytorch_model.safetensors` of a UNet.
pub fn load_unet(dir: &Path, device: &Device) -> Result<(UNetConfig, UNet)> {
    load_unet_in(dir, device, Precision::F32)
}

/// [`load_unet`] with the weights uploaded in `precision` (f16: never f32 on the device).
pub fn load_unet_in(
    dir: &Path,
    device: &Device,
    precision: Precision,
) -> Result<(UNetConfig, UNet)> {
    let config_path = dir.join(CONFIG_NAME);
    let config = UNetConfig::from_json_str(&read_text(&config_path)?)
        .map_err(|e| e.in_file(&config_path))?;
    // One image must be computable before anything is allocated.
    footprint::check_unet(&config, &config_path, None, Use::Inference { batch: 1 })?;
    let weights = dir.join(WEIGHTS_NAME);
    let unet = match &config.quantization_config {
        None => load_in(config.init(device), &weights, precision)?,
        Some(q) => {
            let half = precision == Precision::F16;
            let unet =
                quant::load_quantized(config.init(device), &weights, q.weights, |m, skip| {
                    crate::io::load_weights_except(m, &weights, half, skip)
                })?;
            if half {
                crate::backend::cast_module(unet, precision.dtype())
            } else {
                unet
            }
        }
    };
    Ok((config, unet))
}

/// Writes `DIR/config.json` and the weights; with a `quantization_config`, the convolution and
/// linear weights quantized in its format (at the scales of an attached fake quantization).
pub fn save_unet(dir: &Path, config: &UNetConfig, unet: &UNet) -> Result<()> {
    write_json(&dir.join(CONFIG_NAME), &config.to_json())?;
    match &config.quantization_config {
        None => save_weights(unet, &dir.join(WEIGHTS_NAME)),
        Some(q) => quant::save_quantized(unet, q.weights, &dir.join(WEIGHTS_NAME)),
    }
}

pub fn load_vae(dir: &Path, device: &Device) -> Result<(VaeConfig, Vae)> {
    load_vae_in(dir, device, Precision::F32)
}

/// [`load_vae`] with the weights uploaded in `precision`.
pub fn load_vae_in(dir: &Path, device: &Device, precision: Precision) -> Result<(VaeConfig, Vae)> {
    let config_path = dir.join(CONFIG_NAME);
    let config =
        VaeConfig::from_json_str(&read_text(&config_path)?).map_err(|e| e.in_file(&config_path))?;
    footprint::check_vae(&config, &config_path, None, Use::Inference { batch: 1 })?;
    let vae = load_in(config.init(device), &dir.join(WEIGHTS_NAME), precision)?;
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
    /// `model_index.json`'s `_class_name` (`StableDiffusionPipeline`, …).
    pub class_name: String,
    pub unet_config: UNetConfig,
    pub unet: UNet,
    pub scheduler: SchedulerConfig,
    pub vae: Option<(VaeConfig, Vae)>,
    /// The text encoder of a text-to-image pipeline.
    pub text: Option<TextEncoder>,
    /// Decode latents in tiles of the VAE's `sample_size` (diffusers' `enable_vae_tiling()`):
    /// bounded memory for large images, seams blended.
    pub vae_tiling: bool,
}

/// Pipeline classes that need components fewstep does not have, with what is missing.
const UNSUPPORTED_PIPELINES: &[(&str, &str)] = &[
    (
        "StableDiffusionXL",
        "SDXL (two text encoders, added time embeddings) is not supported yet",
    ),
    (
        "StableDiffusion3",
        "SD3 (an MMDiT, not a UNet) is not supported",
    ),
    ("Flux", "Flux (a transformer, not a UNet) is not supported"),
    (
        "Kandinsky",
        "Kandinsky (a prior and a MoVQ) is not supported",
    ),
    (
        "IF",
        "DeepFloyd IF (a T5 encoder, cascaded UNets) is not supported",
    ),
];

impl Pipeline {
    /// The pipeline with its UNet and VAE in `precision` (the scheduler always computes in f32).
    pub fn with_precision(mut self, precision: crate::backend::Precision) -> Self {
        let dtype = precision.dtype();
        self.unet = crate::backend::cast_module(self.unet, dtype);
        self.vae = self
            .vae
            .map(|(config, vae)| (config, crate::backend::cast_module(vae, dtype)));
        self.text = self.text.map(|text| TextEncoder {
            model: crate::backend::cast_module(text.model, dtype),
            ..text
        });
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
        Self::load_with_lora_in(dir, lora_path, scale, device, Precision::F32)
    }

    /// [`load_with_lora`](Self::load_with_lora) with the weights uploaded in `precision`.
    pub fn load_with_lora_in(
        dir: &Path,
        lora_path: &Path,
        scale: f32,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        use crate::models::lora;
        if !scale.is_finite() {
            return Err(Error::Usage(format!(
                "--lora-scale {scale}: expected a number"
            )));
        }
        let file = lora::LoraFile::read(lora_path)?;
        let mut pipeline = Pipeline::load_in(dir, device, precision)?;
        pipeline.unet = lora::merge(pipeline.unet, &file, scale, lora_path)?;
        if let Some(text) = pipeline.text.take() {
            let model = lora::merge_into(
                text.model,
                &file,
                lora::LoraTarget::TextEncoder,
                scale,
                lora_path,
            )?;
            pipeline.text = Some(TextEncoder { model, ..text });
        } else if file.for_target(lora::LoraTarget::TextEncoder).is_some() {
            return Err(Error::file(
                lora_path,
                "has text-encoder adapters (`lora_te_…`/`text_encoder.…`) but this pipeline has no text encoder",
            ));
        }
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
        Self::load_in(dir, device, Precision::F32)
    }

    /// [`load`](Self::load) with every weight uploaded in `precision`: in f16, a checkpoint is
    /// never f32 on the device, and on the host one tensor at a time (read from the memory map).
    pub fn load_in(dir: &Path, device: &Device, precision: Precision) -> Result<Self> {
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
        let class_name = index["_class_name"]
            .as_str()
            .unwrap_or("DDPMPipeline")
            .to_string();
        if let Some((_, why)) = UNSUPPORTED_PIPELINES
            .iter()
            .find(|(prefix, _)| class_name.starts_with(prefix))
        {
            return Err(Error::file(
                &index_path,
                format!("_class_name `{class_name}`: {why}"),
            ));
        }
        for component in [
            "text_encoder_2",
            "tokenizer_2",
            "image_encoder",
            "transformer",
            "prior",
        ] {
            if index[component]
                .as_array()
                .is_some_and(|a| a.iter().any(|v| !v.is_null()))
            {
                return Err(Error::file(
                    &index_path,
                    format!(
                        "component `{component}` is not supported by fewstep (SDXL-class and later pipelines are not supported yet)"
                    ),
                ));
            }
        }
        let (unet_config, unet) = load_unet_in(&dir.join("unet"), device, precision)?;
        let scheduler = load_scheduler_config(&dir.join("scheduler"))?;
        let vae = if dir.join(VAE_DIR).is_dir() {
            Some(load_vae_in(&dir.join(VAE_DIR), device, precision)?)
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
        let listed = |c: &str| {
            index[c]
                .as_array()
                .is_some_and(|a| a.iter().all(|v| !v.is_null()))
        };
        let text = if listed(TEXT_ENCODER_DIR) || unet_config.is_conditional() {
            if !unet_config.is_conditional() {
                return Err(Error::file(
                    &index_path,
                    "lists a text_encoder but the UNet is not a UNet2DConditionModel",
                ));
            }
            let text = TextEncoder::load(dir, device, precision)?;
            let want = unet_config.cross_attention_dim.unwrap_or(0);
            if text.config.hidden_size != want {
                return Err(Error::file(
                    dir,
                    format!(
                        "text_encoder hidden_size ({}) differs from unet cross_attention_dim ({want})",
                        text.config.hidden_size
                    ),
                ));
            }
            Some(text)
        } else {
            None
        };
        Ok(Pipeline {
            class_name,
            unet_config,
            unet,
            scheduler,
            vae,
            text,
            vae_tiling: false,
        })
    }

    /// Decodes unscaled latents with the pipeline's VAE, tiled when [`Self::vae_tiling`] is set.
    pub fn decode(&self, z: Tensor<4>) -> Option<Tensor<4>> {
        let (config, vae) = self.vae.as_ref()?;
        Some(if self.vae_tiling {
            vae.decode_tiled(z, config)
        } else {
            vae.decode(z)
        })
    }

    /// The pipeline with its UNet's convolution and linear weights to be written in `format`
    /// (post-training quantization, max-abs scales, when saved). `source` names the folder in
    /// errors.
    pub fn quantized(mut self, format: quant::QuantFormat, source: &Path) -> Result<Self> {
        if self.unet_config.quantization_config.is_some() {
            return Err(Error::file(
                source,
                "the UNet is already quantized (its config.json has a quantization_config)",
            ));
        }
        self.unet_config.quantization_config = Some(quant::QuantizationConfig::new(format));
        Ok(self)
    }

    /// Whether prompts condition this pipeline (a text encoder and a UNet2DConditionModel).
    pub fn is_text_to_image(&self) -> bool {
        self.text.is_some()
    }

    /// Writes the pipeline as a diffusers folder with `algorithm`'s scheduler config.
    pub fn save(&self, dir: &Path, algorithm: Algorithm) -> Result<()> {
        write_pipeline(
            dir,
            &self.unet_config,
            &self.unet,
            &self.scheduler,
            algorithm,
            self.vae.as_ref().map(|(c, v)| (c, v)),
            self.text.as_ref().map(|t| (t, self.class_name.as_str())),
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

    /// Pixels per latent pixel: 2^(VAE levels − 1), 1 without a VAE (diffusers'
    /// `vae_scale_factor`).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.as_ref().map_or(1, |(c, _)| c.downsampling())
    }

    /// The latent shape [C, h, w] of an image `height` × `width` (default: the UNet's
    /// sample_size at the VAE's factor); each side must be a multiple of the VAE's factor times
    /// the UNet's downsampling.
    pub fn latent_shape(&self, height: Option<usize>, width: Option<usize>) -> Result<[usize; 3]> {
        let [c, size, _] = self.sample_shape()?;
        let f = self.vae_scale_factor();
        let multiple = f << self.unet_config.block_out_channels.len().saturating_sub(1);
        let side = |v: Option<usize>, flag: &str| match v {
            None => Ok(size),
            Some(px) if px == 0 || px % multiple != 0 => Err(Error::Usage(format!(
                "{flag} {px}: expected a positive multiple of {multiple} (the VAE's factor {f} × the UNet's downsampling {})",
                multiple / f
            ))),
            Some(px) => Ok(px / f),
        };
        Ok([c, side(height, "--height")?, side(width, "--width")?])
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

/// Writes a diffusers pipeline folder; with a text encoder, a `StableDiffusionPipeline` (or
/// `LatentConsistencyModelPipeline` for a guidance-embedded LCM UNet).
pub fn save_pipeline(
    dir: &Path,
    unet_config: &UNetConfig,
    unet: &UNet,
    scheduler: &SchedulerConfig,
    algorithm: Algorithm,
    vae: Option<(&VaeConfig, &Vae)>,
    text: Option<&TextEncoder>,
) -> Result<()> {
    let text = text.map(|t| (t, STABLE_DIFFUSION));
    write_pipeline(dir, unet_config, unet, scheduler, algorithm, vae, text)
}

/// The components, then `model_index.json`; a text encoder with its pipeline class.
fn write_pipeline(
    dir: &Path,
    unet_config: &UNetConfig,
    unet: &UNet,
    scheduler: &SchedulerConfig,
    algorithm: Algorithm,
    vae: Option<(&VaeConfig, &Vae)>,
    text: Option<(&TextEncoder, &str)>,
) -> Result<()> {
    let mut index = write_components(dir, unet_config, unet, scheduler, algorithm, vae)?;
    if let Some((text, class_name)) = text {
        text.save(dir)?;
        add_text_components(&mut index, class_name, unet_config, algorithm);
    }
    write_json(&dir.join("model_index.json"), &index)
}

/// diffusers' text-to-image pipeline class.
pub const STABLE_DIFFUSION: &str = "StableDiffusionPipeline";

/// Writes a pipeline's UNet, scheduler and VAE folders; returns its `model_index.json`.
fn write_components(
    dir: &Path,
    unet_config: &UNetConfig,
    unet: &UNet,
    scheduler: &SchedulerConfig,
    algorithm: Algorithm,
    vae: Option<(&VaeConfig, &Vae)>,
) -> Result<serde_json::Value> {
    let mut index = serde_json::json!({
        "_class_name": "DDPMPipeline",
        "_diffusers_version": "0.31.0",
        "scheduler": ["diffusers", algorithm.class_name()],
        "unet": ["diffusers", unet_config.class_name],
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
    Ok(index)
}

/// A text-to-image pipeline's entries in `model_index.json`: its class (an LCM-distilled UNet
/// with a guidance embedding samples in LatentConsistencyModelPipeline), the CLIP text encoder
/// and tokenizer, no safety checker.
fn add_text_components(
    index: &mut serde_json::Value,
    class_name: &str,
    unet_config: &UNetConfig,
    algorithm: Algorithm,
) {
    index["_class_name"] =
        if unet_config.time_cond_proj_dim.is_some() && algorithm == Algorithm::Lcm {
            "LatentConsistencyModelPipeline".into()
        } else {
            class_name.into()
        };
    index["text_encoder"] = serde_json::json!(["transformers", "CLIPTextModel"]);
    index["tokenizer"] = serde_json::json!(["transformers", "CLIPTokenizer"]);
    index["safety_checker"] = serde_json::json!([null, null]);
    index["feature_extractor"] = serde_json::json!([null, null]);
    index["requires_safety_checker"] = false.into();
}
