//! An `AutoencoderKL`-compatible VAE (diffusers `models/autoencoders/autoencoder_kl.py` and
//! `vae.py`: `Encoder`, `Decoder` with `DownEncoderBlock2D` / `UpDecoderBlock2D` and a mid block
//! with attention). Parameter names follow diffusers' state dict.

use crate::backend::conv2d_forward;
use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

use super::blocks::{
    BlockSpec, Downsample, MidBlock, ResnetBlock, Upsample, conv, group_norm, group_norm_silu,
};
use crate::error::{Error, Result};

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn silu_name() -> String {
    "silu".into()
}
fn down_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn up_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn channels() -> Vec<usize> {
    vec![64]
}
fn scaling() -> f32 {
    0.18215
}

/// diffusers' `AutoencoderKL` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "down_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "up_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu_name")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "scaling")]
    pub scaling_factor: f32,
    #[serde(default)]
    pub shift_factor: Option<f32>,
    #[serde(default = "yes")]
    pub force_upcast: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

/// The VAE's norm epsilon (fixed in diffusers' Encoder/Decoder).
const EPS: f64 = 1e-6;

impl VaeConfig {
    /// An upper bound on the largest single tensor the decoder needs for one image, in elements,
    /// decoding a `latent_size`×`latent_size` latent: a 3×3 convolution's unfolded input at the
    /// widest map (9 × channels × H × W, channels doubled across an upsampling) or the mid
    /// block's single-head attention scores (tokens²).
    pub fn decoder_peak_tensor_elements(&self, latent_size: usize) -> usize {
        let tokens = latent_size * latent_size;
        let mut peak = tokens * tokens;
        for (i, &c) in self.block_out_channels.iter().rev().enumerate() {
            let side = latent_size << i;
            peak = peak.max(9 * 2 * c * side * side);
        }
        peak
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: VaeConfig = super::parse_config(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> serde_json::Value {
        super::diffusers_json(self, "AutoencoderKL")
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Config(format!(
                "`down_block_types` ({}) and `up_block_types` ({}) must have one entry per `block_out_channels` ({n}), at least one",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(Error::Config(format!(
                "field `down_block_types` = {t:?} is not supported by fewstep (supported: DownEncoderBlock2D)"
            )));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(Error::Config(format!(
                "field `up_block_types` = {t:?} is not supported by fewstep (supported: UpDecoderBlock2D)"
            )));
        }
        if self.act_fn != "silu" {
            return Err(Error::Config(format!(
                "field `act_fn` = {:?} is not supported by fewstep (supported: silu)",
                self.act_fn
            )));
        }
        let g = self.norm_num_groups;
        if g == 0
            || self
                .block_out_channels
                .iter()
                .any(|&c| c == 0 || c % g != 0)
        {
            return Err(Error::Config(format!(
                "every `block_out_channels` entry must be a positive multiple of norm_num_groups ({g})"
            )));
        }
        if self.latent_channels == 0 || self.layers_per_block == 0 {
            return Err(Error::Config(
                "`latent_channels` and `layers_per_block` must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The spatial downsampling factor: 2^(blocks − 1).
    pub fn downsampling(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    pub fn init(&self, device: &Device) -> Vae {
        let ch = &self.block_out_channels;
        let n = ch.len();
        let spec = BlockSpec {
            groups: self.norm_num_groups,
            eps: EPS,
            temb: None,
            dropout: 0.0,
            output_scale_factor: 1.0,
        };
        let last = ch[n - 1];
        let mut down_blocks = Vec::with_capacity(n);
        let mut c_out = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let c_in = c_out;
            c_out = c;
            down_blocks.push(EncoderBlock {
                resnets: (0..self.layers_per_block)
                    .map(|j| {
                        ResnetBlock::new(if j == 0 { c_in } else { c_out }, c_out, spec, device)
                    })
                    .collect(),
                downsamplers: if i + 1 < n {
                    vec![Downsample::new(c_out, 0, device)]
                } else {
                    vec![]
                },
            });
        }
        let encoder = Encoder {
            conv_in: conv(self.in_channels, ch[0], 3, device),
            down_blocks,
            mid_block: MidBlock::new(last, last, self.mid_block_add_attention, spec, device),
            conv_norm_out: group_norm(self.norm_num_groups, last, EPS, device),
            conv_out: conv(last, 2 * self.latent_channels, 3, device),
        };
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut c_out = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let prev = c_out;
            c_out = c;
            up_blocks.push(DecoderBlock {
                resnets: (0..self.layers_per_block + 1)
                    .map(|j| {
                        ResnetBlock::new(if j == 0 { prev } else { c_out }, c_out, spec, device)
                    })
                    .collect(),
                upsamplers: if i + 1 < n {
                    vec![Upsample::new(c_out, device)]
                } else {
                    vec![]
                },
            });
        }
        let decoder = Decoder {
            conv_in: conv(self.latent_channels, last, 3, device),
            mid_block: MidBlock::new(last, last, self.mid_block_add_attention, spec, device),
            up_blocks,
            conv_norm_out: group_norm(self.norm_num_groups, ch[0], EPS, device),
            conv_out: conv(ch[0], self.out_channels, 3, device),
        };
        let l = self.latent_channels;
        Vae {
            encoder,
            decoder,
            quant_conv: self.use_quant_conv.then(|| conv(2 * l, 2 * l, 1, device)),
            post_quant_conv: self.use_post_quant_conv.then(|| conv(l, l, 1, device)),
        }
    }
}

/// `DownEncoderBlock2D`.
#[derive(Module, Debug)]
pub struct EncoderBlock {
    pub resnets: Vec<ResnetBlock>,
    pub downsamplers: Vec<Downsample>,
}

/// `UpDecoderBlock2D`.
#[derive(Module, Debug)]
pub struct DecoderBlock {
    pub resnets: Vec<ResnetBlock>,
    pub upsamplers: Vec<Upsample>,
}

#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<EncoderBlock>,
    pub mid_block: MidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    /// [B, C, H, W] → [B, 2L, H/f, W/f]
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = conv2d_forward(&self.conv_in, x);
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(x, None);
            }
            if let Some(down) = block.downsamplers.first() {
                x = down.forward(x);
            }
        }
        x = self.mid_block.forward(x, None);
        conv2d_forward(&self.conv_out, group_norm_silu(&self.conv_norm_out, x))
    }
}

#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<DecoderBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    /// [B, L, h, w] → [B, C, h·f, w·f]
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let mut x = self
            .mid_block
            .forward(conv2d_forward(&self.conv_in, z), None);
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(x, None);
            }
            if let Some(up) = block.upsamplers.first() {
                x = up.forward(x);
            }
        }
        conv2d_forward(&self.conv_out, group_norm_silu(&self.conv_norm_out, x))
    }
}

/// diffusers' `blend_v` (axis 2) / `blend_h` (axis 3): the first `extent` rows (columns) of `b`
/// become a linear ramp from `a`'s last `extent` to `b`'s own: a·(1 − y/extent) + b·(y/extent).
fn blend_edges(a: &Tensor<4>, b: Tensor<4>, extent: usize, axis: usize) -> Tensor<4> {
    let extent = extent.min(a.dims()[axis]).min(b.dims()[axis]);
    if extent == 0 {
        return b;
    }
    let device = b.device();
    let full = b.dims()[axis];
    let a_len = a.dims()[axis];
    let a_edge = a.clone().narrow(axis, a_len - extent, extent);
    let b_edge = b.clone().narrow(axis, 0, extent);
    let weights: Vec<f32> = (0..extent).map(|y| y as f32 / extent as f32).collect();
    let mut shape = [1usize; 4];
    shape[axis] = extent;
    let wgt = Tensor::<1>::from_floats(weights.as_slice(), &device)
        .reshape(shape)
        .cast(FloatDType::from(b.dtype()));
    let blended = a_edge * (wgt.clone().neg() + 1.0) + b_edge * wgt;
    if extent == full {
        blended
    } else {
        Tensor::cat(vec![blended, b.narrow(axis, extent, full - extent)], axis)
    }
}

/// The VAE: `encode` gives the diagonal Gaussian posterior, `decode` maps latents to images.
#[derive(Module, Debug)]
pub struct Vae {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
}

impl Vae {
    /// The precision the weights are in (inputs are cast to it; outputs come out in it).
    pub fn dtype(&self) -> FloatDType {
        self.decoder.conv_in.weight.val().dtype().into()
    }

    /// [B, C, H, W] → (mean, logvar), each [B, L, H/f, W/f]; logvar clamped to [−30, 20] as
    /// diffusers' `DiagonalGaussianDistribution` does.
    pub fn encode(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let h = self.encoder.forward(x.cast(self.dtype()));
        let moments = match &self.quant_conv {
            Some(c) => conv2d_forward(c, h),
            None => h,
        };
        let mut halves = moments.chunk(2, 1);
        let logvar = halves.pop().expect("two halves").clamp(-30.0, 20.0);
        let mean = halves.pop().expect("two halves");
        (mean, logvar)
    }

    /// [`decode`](Self::decode) in overlapping tiles, as diffusers' `AutoencoderKL.tiled_decode`
    /// (`enable_vae_tiling()`): image tiles of the config's `sample_size` pixels, latent tiles of
    /// `sample_size / 2^(levels − 1)` with a quarter overlap, each decoded alone, blended linearly over the overlap (in diffusers' order,
    /// each tile blended with its already-blended upper and left neighbours), cropped and joined.
    /// Peak memory is one tile's decode instead of the whole image's; latents no larger than one
    /// tile decode whole, as does a config without `sample_size`.
    pub fn decode_tiled(&self, z: Tensor<4>, config: &VaeConfig) -> Tensor<4> {
        let [_, _, h, w] = z.dims();
        let tile_sample = config.sample_size.unwrap_or(0);
        let tile_latent = tile_sample / config.downsampling();
        if tile_latent == 0 || (h <= tile_latent && w <= tile_latent) {
            return self.decode(z);
        }
        let overlap = ((tile_latent as f64) * 0.75) as usize; // stride between tiles
        let blend = ((tile_sample as f64) * 0.25) as usize;
        let keep = tile_sample - blend;
        let mut rows: Vec<Vec<Tensor<4>>> = Vec::new();
        for i in (0..h).step_by(overlap.max(1)) {
            let mut row = Vec::new();
            for j in (0..w).step_by(overlap.max(1)) {
                let tile = z.clone().slice([
                    0..z.dims()[0],
                    0..z.dims()[1],
                    i..(i + tile_latent).min(h),
                    j..(j + tile_latent).min(w),
                ]);
                row.push(self.decode(tile));
            }
            rows.push(row);
        }
        for i in 0..rows.len() {
            for j in 0..rows[i].len() {
                let mut tile = rows[i][j].clone();
                if i > 0 {
                    tile = blend_edges(&rows[i - 1][j], tile, blend, 2);
                }
                if j > 0 {
                    tile = blend_edges(&rows[i][j - 1], tile, blend, 3);
                }
                rows[i][j] = tile;
            }
        }
        let joined: Vec<Tensor<4>> = rows
            .into_iter()
            .map(|row| {
                let cropped: Vec<Tensor<4>> = row
                    .into_iter()
                    .map(|t| {
                        let [b, c, th, tw] = t.dims();
                        t.slice([0..b, 0..c, 0..th.min(keep), 0..tw.min(keep)])
                    })
                    .collect();
                Tensor::cat(cropped, 3)
            })
            .collect();
        Tensor::cat(joined, 2)
    }

    /// [B, L, h, w] (unscaled latents) → [B, C, h·f, w·f]
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        let z = z.cast(self.dtype());
        let z = match &self.post_quant_conv {
            Some(c) => conv2d_forward(c, z),
            None => z,
        };
        self.decoder.forward(z)
    }
}
