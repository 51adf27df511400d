//! Memory a model needs, estimated from its config before anything is allocated: an absurd config
//! (`block_out_channels: [65536]`, `sample_size: 100000000`) is refused in one line naming the
//! file, the fields and the estimate, instead of aborting the process in the allocator.
//!
//! The estimates count f32 weights (and, for training, their gradients, the two AdamW moments and
//! the EMA copy) and the feature maps of a batch (all of them for training, which keeps them for
//! the backward pass; the largest few for inference). They are meant to tell "fits" from "cannot
//! possibly fit", not to plan memory to the byte.

use std::path::Path;

use super::{UNetConfig, VaeConfig};
use crate::error::{Error, Result};

const F32_BYTES: f64 = 4.0;

/// What a model will be used for, and on how many images at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Only the weights (loading a folder).
    Load,
    /// Forward passes without gradients over batches of `batch`.
    Inference { batch: usize },
    /// Forward and backward passes over batches of `batch`, with AdamW and an EMA copy.
    Training { batch: usize },
}

/// Bytes of memory this machine can still give (Linux: `MemAvailable` of `/proc/meminfo`, plus
/// free swap); `None` where that is unknown, and then nothing is refused.
pub fn available_bytes() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024.0)
    };
    Some(field("MemAvailable:")? + field("SwapFree:").unwrap_or(0.0))
}

/// Bytes of a model with `params` weights and `elements` feature-map elements per image, used as
/// `usage`; `peak` is the largest single tensor per image (inference keeps a few of those).
fn bytes(params: f64, elements: f64, peak: f64, usage: Use) -> f64 {
    match usage {
        Use::Load => params * F32_BYTES,
        Use::Inference { batch } => (params + 3.0 * batch as f64 * peak) * F32_BYTES,
        // Weights, gradients, two AdamW moments, the EMA copy; every feature map kept twice (the
        // layer output and the normalised / activated copy the backward pass reads).
        Use::Training { batch } => (5.0 * params + 2.0 * batch as f64 * elements) * F32_BYTES,
    }
}

fn gb(bytes: f64) -> String {
    format!("{:.1} GB", bytes / 1e9)
}

/// Refuses `estimate` bytes when this machine has less available, naming `path` and `what`.
fn check(path: &Path, what: String, estimate: f64) -> Result<()> {
    match available_bytes() {
        // A NaN estimate (an overflowing config) is refused too.
        Some(available) if estimate.is_nan() || estimate > available => Err(Error::file(
            path,
            format!(
                "{what}: needs about {} of memory, more than the {} available",
                gb(estimate),
                gb(available)
            ),
        )),
        _ => Ok(()),
    }
}

/// "a UNet of ~0.003 G weights (`block_out_channels` [..], `layers_per_block` 2) at
/// `sample_size` 32, training batches of 32": the fields an estimate comes from.
fn describe(
    model: &str,
    params: f64,
    channels: &[usize],
    layers: usize,
    side: usize,
    usage: Use,
) -> String {
    let purpose = match usage {
        Use::Load => String::new(),
        Use::Inference { batch } => format!(", sampling batches of {batch}"),
        Use::Training { batch } => format!(", training batches of {batch}"),
    };
    format!(
        "{model} of ~{:.3} G weights (`block_out_channels` {channels:?}, `layers_per_block` {layers}) at `sample_size` {side}{purpose}",
        params / 1e9
    )
}

/// Bytes the UNet of `config` needs at `side`×`side` inputs for `usage`.
pub fn unet_bytes(config: &UNetConfig, side: usize, usage: Use) -> f64 {
    bytes(
        config.param_count(),
        config.activation_elements(side),
        config.peak_tensor_elements(side) as f64,
        usage,
    )
}

/// Checks that the UNet of `config` (read from `path`) fits this machine at `side`×`side` inputs
/// (its `sample_size` when `None`) for `usage`.
pub fn check_unet(config: &UNetConfig, path: &Path, side: Option<usize>, usage: Use) -> Result<()> {
    let side = side.or(config.sample_size).unwrap_or(32);
    let what = describe(
        "a UNet",
        config.param_count(),
        &config.block_out_channels,
        config.layers_per_block,
        side,
        usage,
    );
    check(path, what, unet_bytes(config, side, usage))
}

impl VaeConfig {
    /// Weights of the convolutions and the mid attention (norms and biases left out).
    pub fn param_count(&self) -> f64 {
        let ch: Vec<f64> = self.block_out_channels.iter().map(|&c| c as f64).collect();
        let layers = self.layers_per_block as f64;
        let (first, last) = (ch[0], ch[ch.len() - 1]);
        let latent = self.latent_channels as f64;
        let mut params =
            9.0 * self.in_channels as f64 * first + 9.0 * first * self.out_channels as f64;
        let mut prev = first;
        for &c in &ch {
            // Encoder: `layers` resnets (+ a 1×1 shortcut) and a downsampler; decoder: one more
            // resnet per block and an upsampler.
            params += layers * 18.0 * c * c
                + 9.0 * prev * c
                + (layers + 1.0) * 18.0 * c * c
                + 18.0 * c * c;
            prev = c;
        }
        // Two mid blocks (2 resnets + attention each), latent convolutions.
        params
            + 2.0 * (36.0 * last * last + 4.0 * last * last)
            + 18.0 * last * latent
            + 4.0 * latent * latent
    }

    /// Feature-map elements of one image's encode and decode at `side`×`side` pixels.
    pub fn activation_elements(&self, side: usize) -> f64 {
        let layers = self.layers_per_block as f64;
        let mut elements = 0.0;
        let mut s = side as f64;
        for &c in &self.block_out_channels {
            elements += s * s * c as f64 * (2.0 * layers + 1.0) * 2.0 + s * s * c as f64 * 2.0;
            s = (s / 2.0).floor().max(1.0);
        }
        let tokens = s * s;
        elements + 2.0 * tokens * tokens
    }
}

/// Checks that the autoencoder of `config` (read from `path`) fits this machine at `side`×`side`
/// images (its `sample_size` when `None`) for `usage`.
pub fn check_vae(config: &VaeConfig, path: &Path, side: Option<usize>, usage: Use) -> Result<()> {
    let side = side.or(config.sample_size).unwrap_or(32);
    let latent = (side / config.downsampling()).max(1);
    let estimate = bytes(
        config.param_count(),
        config.activation_elements(side),
        config.decoder_peak_tensor_elements(latent) as f64,
        usage,
    );
    let what = describe(
        "an autoencoder",
        config.param_count(),
        &config.block_out_channels,
        config.layers_per_block,
        side,
        usage,
    );
    check(path, what, estimate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_presets_fit_and_absurd_configs_do_not() {
        let unet = UNetConfig::shapes32();
        let small = unet_bytes(&unet, 32, Use::Training { batch: 32 });
        assert!(small < 4e9, "shapes32 training estimate {small}");
        let mut wide = unet.clone();
        wide.block_out_channels = vec![65536; wide.block_out_channels.len()];
        assert!(unet_bytes(&wide, 32, Use::Load) > 1e12);
        assert!(unet_bytes(&unet, 100_000_000, Use::Inference { batch: 1 }) > 1e15);
        let vae = VaeConfig::default();
        assert!(vae.param_count() > 1e4 && vae.param_count() < 1e8);
        assert!(
            check_vae(
                &vae,
                Path::new("vae/config.json"),
                Some(32),
                Use::Training { batch: 32 }
            )
            .is_ok()
        );
        let mut huge = vae.clone();
        huge.block_out_channels = vec![65536; huge.block_out_channels.len()];
        let e = check_vae(&huge, Path::new("vae/config.json"), Some(32), Use::Load)
            .expect_err("a 65536-channel autoencoder cannot fit")
            .to_string();
        assert!(
            e.starts_with("vae/config.json: an autoencoder") && e.contains("block_out_channels"),
            "{e}"
        );
    }

    #[test]
    fn the_parameter_count_is_close_to_the_built_model() {
        use burn::module::Module;
        let config = UNetConfig::tiny();
        let built = config
            .init(&crate::backend::cpu_device().expect("a CPU backend is compiled in"))
            .num_params() as f64;
        let estimate = config.param_count();
        assert!(
            (estimate / built - 1.0).abs() < 0.05,
            "estimate {estimate} vs {built}"
        );
    }
}
