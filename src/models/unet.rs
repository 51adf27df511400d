//! diffusers' `UNet2DModel` (`models/unets/unet_2d.py`) and `UNet2DConditionModel`
//! (`unet_2d_condition.py`, the Stable Diffusion 1.x/2.x UNet) as one model: the config is
//! diffusers' `config.json` of either class, the parameters carry diffusers' state-dict names. The
//! two differ only in what sits at `attentions.<i>`: a spatial self-attention or a
//! `Transformer2DModel` attending to a text context.

use crate::backend::conv2d_forward;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, EmbeddingConfig, GroupNorm};
use burn::prelude::*;
use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

use super::blocks::{
    Attention, BlockSpec, Downsample, MidBlock, ResnetBlock, TimestepEmbedding, Upsample, conv,
    group_norm, group_norm_silu, guidance_scale_embedding, silu, timestep_embedding,
};
use super::conditioning::Conditioning;
use super::transformer::{AttentionBlock, Transformer2D, TransformerSpec};
use crate::error::{Error, Result};

/// diffusers' class names of the two UNets.
pub const UNET_2D: &str = "UNet2DModel";
pub const UNET_2D_CONDITION: &str = "UNet2DConditionModel";

/// A config value given once for all blocks or once per block (`attention_head_dim: 8` or
/// `[5, 10, 20, 20]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    List(Vec<usize>),
}

impl PerBlock {
    /// The value for down block `i` (lists are indexed by down block; up blocks read them
    /// reversed, the mid block the last entry).
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::List(list) => list[i.min(list.len() - 1)],
        }
    }
    /// Positive, and one per block when a list.
    fn is_valid_for(&self, n: usize) -> bool {
        match self {
            PerBlock::One(v) => *v > 0,
            PerBlock::List(list) => list.len() == n && list.iter().all(|&v| v > 0),
        }
    }
}

/// UNet2DConditionModel fields this implementation does not compute, with the value that means
/// "not used" and what the field is for: a config setting one of them is refused naming it.
fn condition_fields_unused() -> Vec<(&'static str, serde_json::Value, &'static str)> {
    use serde_json::{Value, json};
    vec![
        (
            "addition_embed_type",
            Value::Null,
            "SDXL's added text/time embeddings (SDXL pipelines are not supported yet)",
        ),
        (
            "encoder_hid_dim",
            Value::Null,
            "a projected encoder (SDXL / IF)",
        ),
        (
            "encoder_hid_dim_type",
            Value::Null,
            "a projected encoder (SDXL / IF)",
        ),
        ("dual_cross_attention", json!(false), "dual cross-attention"),
        (
            "only_cross_attention",
            json!(false),
            "cross-attention in place of self-attention",
        ),
        (
            "reverse_transformer_layers_per_block",
            Value::Null,
            "separate up-block transformer depths",
        ),
        ("attention_type", json!("default"), "gated attention"),
        ("conv_in_kernel", json!(3), "another conv_in kernel"),
        ("conv_out_kernel", json!(3), "another conv_out kernel"),
        (
            "time_embedding_act_fn",
            Value::Null,
            "an activation after the time embedding",
        ),
        (
            "timestep_post_act",
            Value::Null,
            "an activation in the time embedding",
        ),
        (
            "resnet_skip_time_act",
            json!(false),
            "resnets without the time activation",
        ),
        (
            "cross_attention_norm",
            Value::Null,
            "a norm on the text context",
        ),
        (
            "class_embeddings_concat",
            json!(false),
            "concatenated class embeddings",
        ),
        (
            "addition_time_embed_dim",
            Value::Null,
            "SDXL's added time embedding",
        ),
    ]
}

/// Block type names as the config stores them.
fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}
fn default_down() -> Vec<String> {
    names(&[
        "DownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
    ])
}
fn default_up() -> Vec<String> {
    names(&[
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "UpBlock2D",
    ])
}
fn default_channels() -> Vec<usize> {
    vec![224, 448, 672, 896]
}
fn three() -> usize {
    3
}
fn two() -> usize {
    2
}
fn one() -> usize {
    1
}
fn one_f() -> f32 {
    1.0
}
fn yes() -> bool {
    true
}
fn eight() -> Option<PerBlock> {
    Some(PerBlock::One(8))
}
fn thirty_two() -> Option<usize> {
    Some(32)
}
fn norm_eps() -> f64 {
    1e-5
}
fn positional() -> String {
    "positional".into()
}
fn mid() -> Option<String> {
    Some("UNetMidBlock2D".into())
}
fn conv_type() -> String {
    "conv".into()
}
fn silu_name() -> String {
    "silu".into()
}
fn default_shift() -> String {
    "default".into()
}

/// diffusers' `UNet2DModel` config, field for field (names, defaults, meanings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub freq_shift: f32,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default = "default_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f32,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "conv_type")]
    pub downsample_type: String,
    #[serde(default = "conv_type")]
    pub upsample_type: String,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "silu_name")]
    pub act_fn: String,
    /// UNet2DModel: channels per head. UNet2DConditionModel: the number of heads when
    /// `num_attention_heads` is not given (diffusers' historical naming), per block or for all.
    #[serde(default = "eight")]
    pub attention_head_dim: Option<PerBlock>,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: Option<usize>,
    #[serde(default)]
    pub attn_norm_num_groups: Option<usize>,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "yes")]
    pub add_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub num_train_timesteps: Option<usize>,
    /// Width of the guidance-scale embedding a consistency student is conditioned on
    /// (`UNet2DConditionModel`'s field; fewstep's extension of `UNet2DModel`, written only when
    /// set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_cond_proj_dim: Option<usize>,
    /// The class the config describes: `UNet2DModel` or `UNet2DConditionModel` (diffusers'
    /// `_class_name`; absent means UNet2DModel).
    #[serde(rename = "_class_name", default = "unet_2d", skip_serializing)]
    pub class_name: String,
    /// UNet2DConditionModel: width of the text context (`encoder_hidden_states`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_attention_dim: Option<usize>,
    /// UNet2DConditionModel: heads per block (overrides `attention_head_dim`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<PerBlock>,
    /// UNet2DConditionModel: transformer blocks per `Transformer2DModel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transformer_layers_per_block: Option<PerBlock>,
    /// UNet2DConditionModel: linear `proj_in`/`proj_out` (SD-2.x) instead of 1×1 convolutions.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_linear_projection: bool,
    /// UNet2DConditionModel: attention scores in f32 under f16 weights (SD-2.1).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub upcast_attention: bool,
    /// fewstep's quantized weights (`fewstep quantize`, `--quantize`): the format the
    /// convolution and linear weights of the weights file are stored in (see `models::quant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<super::quant::QuantizationConfig>,
}

fn unet_2d() -> String {
    UNET_2D.into()
}

impl Default for UNetConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

fn unsupported(field: &str, value: impl std::fmt::Debug, supported: &str) -> Error {
    Error::Config(format!(
        "field `{field}` = {value:?} is not supported by fewstep (supported: {supported})"
    ))
}

/// What [`UNetConfig::walk`] counts.
#[derive(Clone, Copy)]
enum Count {
    Macs,
    Params,
    Activations,
}

impl UNetConfig {
    /// The 32×32 config of issue #2's benchmark: diffusers'
    /// `UNet2DModel(block_out_channels=(32, 64, 128), layers_per_block=1, down_block_types=(DownBlock2D,
    /// DownBlock2D, AttnDownBlock2D), up_block_types=(AttnUpBlock2D, UpBlock2D, UpBlock2D), norm_num_groups=8)`.
    pub fn bench32() -> Self {
        UNetConfig {
            sample_size: Some(32),
            block_out_channels: vec![32, 64, 128],
            layers_per_block: 1,
            down_block_types: names(&["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]),
            up_block_types: names(&["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
            norm_num_groups: Some(8),
            ..Default::default()
        }
    }

    /// `tiny`: a ≤ 100 k-parameter 32×32 UNet with one attention level, so that every training
    /// test runs in seconds.
    pub fn tiny() -> Self {
        UNetConfig {
            sample_size: Some(32),
            block_out_channels: vec![8, 16],
            layers_per_block: 1,
            down_block_types: names(&["DownBlock2D", "AttnDownBlock2D"]),
            up_block_types: names(&["AttnUpBlock2D", "UpBlock2D"]),
            norm_num_groups: Some(4),
            attention_head_dim: Some(PerBlock::One(8)),
            ..Default::default()
        }
    }

    /// `shapes32`: the default teacher for the `shapes` data (32×32, three levels, attention
    /// at 8×8), sized so that training fits in about two hours on two CPU cores.
    pub fn shapes32() -> Self {
        UNetConfig {
            sample_size: Some(32),
            block_out_channels: vec![32, 48, 64],
            layers_per_block: 1,
            down_block_types: names(&["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]),
            up_block_types: names(&["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
            norm_num_groups: Some(8),
            attention_head_dim: Some(PerBlock::One(32)),
            ..Default::default()
        }
    }

    /// The latent `shapes` teacher: 8×8×4 latents of the `shapes` VAE (`fewstep train-vae`),
    /// 64/128 channels, attention at 4×4.
    pub fn shapes_latent8() -> Self {
        UNetConfig {
            sample_size: Some(8),
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![64, 128],
            layers_per_block: 1,
            down_block_types: names(&["DownBlock2D", "AttnDownBlock2D"]),
            up_block_types: names(&["AttnUpBlock2D", "UpBlock2D"]),
            norm_num_groups: Some(16),
            attention_head_dim: Some(PerBlock::One(32)),
            ..Default::default()
        }
    }

    /// The latent `shapes-text` teacher: a `UNet2DConditionModel` on the 8×8×4 latents of the
    /// `shapes` VAE, 64/128 channels, cross-attention to the text at both levels and in the
    /// middle (4 heads), context width 64 (set to the text encoder's by `fewstep train`).
    pub fn shapes_t2i8() -> Self {
        Self::from_json_str(
            &serde_json::json!({
                "_class_name": UNET_2D_CONDITION,
                "sample_size": 8,
                "block_out_channels": [64, 128],
                "layers_per_block": 1,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "norm_num_groups": 16,
                "attention_head_dim": 4,
                "cross_attention_dim": 64,
            })
            .to_string(),
        )
        .expect("a valid preset")
    }

    /// A named preset (`tiny`, `shapes32`, `bench32`, `shapes-latent8`, `shapes-t2i8`).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::tiny()),
            "shapes32" => Some(Self::shapes32()),
            "shapes-latent8" => Some(Self::shapes_latent8()),
            "shapes-t2i8" => Some(Self::shapes_t2i8()),
            "bench32" => Some(Self::bench32()),
            _ => None,
        }
    }

    /// Parses a diffusers `config.json`; errors name the offending field.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let mut value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("not a valid config.json: {e}")))?;
        if let Some(fields) = value.as_object_mut()
            && fields.get("_class_name").and_then(|v| v.as_str()) == Some(UNET_2D_CONDITION)
        {
            for (field, unused, what) in condition_fields_unused() {
                if let Some(v) = fields.get(field)
                    && *v != unused
                {
                    return Err(Error::Config(format!(
                        "field `{field}` = {v} is not supported by fewstep ({what}); expected {unused}"
                    )));
                }
            }
            // UNet2DConditionModel's own defaults for what the file leaves out.
            let defaults = serde_json::json!({
                "in_channels": 4, "out_channels": 4,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "mid_block_type": "UNetMidBlock2DCrossAttn",
                "block_out_channels": [320, 640, 1280, 1280],
                "cross_attention_dim": 1280,
            });
            for (k, v) in defaults.as_object().expect("an object") {
                fields.entry(k.clone()).or_insert(v.clone());
            }
        }
        let cfg: UNetConfig = super::parse_config(&value.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether this is a text-conditioned `UNet2DConditionModel`.
    pub fn is_conditional(&self) -> bool {
        self.class_name == UNET_2D_CONDITION
    }

    /// The config as diffusers writes it (with `_class_name`).
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = super::diffusers_json(self, &self.class_name);
        if self.is_conditional() {
            // Fields UNet2DModel has and UNet2DConditionModel does not.
            let fields = json.as_object_mut().expect("a config is a JSON object");
            for k in [
                "add_attention",
                "attn_norm_num_groups",
                "downsample_type",
                "upsample_type",
                "num_train_timesteps",
            ] {
                fields.remove(k);
            }
        }
        json
    }

    /// Whether `other` differs from `self` at most in width — block channels, channels per head
    /// or head counts, the time embedding's width — so that it takes the same inputs and
    /// conditioning and gives the same outputs (a `fewstep widen` of this model).
    pub fn same_but_width(&self, other: &UNetConfig) -> bool {
        let mut o = other.clone();
        o.block_out_channels = self.block_out_channels.clone();
        o.attention_head_dim = self.attention_head_dim.clone();
        o.num_attention_heads = self.num_attention_heads.clone();
        o.time_embedding_dim = self.time_embedding_dim;
        other.block_out_channels.len() == self.block_out_channels.len() && o == *self
    }

    /// Heads of the attention in down block `i` (the mid block: `i = n − 1`) with `c` channels.
    fn heads(&self, i: usize, c: usize) -> usize {
        if self.is_conditional() {
            self.num_attention_heads
                .as_ref()
                .or(self.attention_head_dim.as_ref())
                .map_or(8, |h| h.get(i))
        } else {
            (c / self
                .attention_head_dim
                .as_ref()
                .map_or(c, |d| d.get(i))
                .max(1))
            .max(1)
        }
    }

    /// Channels per head of the attention in down block `i` with `c` channels.
    fn head_dim(&self, i: usize, c: usize) -> usize {
        if self.is_conditional() {
            c / self.heads(i, c)
        } else {
            self.attention_head_dim.as_ref().map_or(c, |d| d.get(i))
        }
    }

    /// Whether a block type carries attention.
    fn has_attention(kind: &str) -> bool {
        kind.starts_with("Attn") || kind.starts_with("CrossAttn")
    }

    /// Rejects what this implementation does not compute, naming the field.
    pub fn validate(&self) -> Result<()> {
        if let Some(q) = &self.quantization_config {
            q.validate()?;
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::Config("field `block_out_channels` is empty".into()));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Config(format!(
                "`down_block_types` ({}) and `up_block_types` ({}) must have one entry per `block_out_channels` ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        let (down, mid, up): (&[&str], &str, &[&str]) = if self.is_conditional() {
            (
                &["DownBlock2D", "CrossAttnDownBlock2D"],
                "UNetMidBlock2DCrossAttn",
                &["UpBlock2D", "CrossAttnUpBlock2D"],
            )
        } else {
            (
                &["DownBlock2D", "AttnDownBlock2D"],
                "UNetMidBlock2D",
                &["UpBlock2D", "AttnUpBlock2D"],
            )
        };
        for t in &self.down_block_types {
            if !down.contains(&t.as_str()) {
                return Err(unsupported("down_block_types", t, &down.join(", ")));
            }
        }
        for t in &self.up_block_types {
            if !up.contains(&t.as_str()) {
                return Err(unsupported("up_block_types", t, &up.join(", ")));
            }
        }
        if self.mid_block_type.as_deref() != Some(mid) {
            return Err(unsupported("mid_block_type", &self.mid_block_type, mid));
        }
        if self.class_name != UNET_2D && self.class_name != UNET_2D_CONDITION {
            return Err(unsupported(
                "_class_name",
                &self.class_name,
                "UNet2DModel, UNet2DConditionModel",
            ));
        }
        if self.is_conditional() {
            if self.cross_attention_dim.is_none_or(|d| d == 0) {
                return Err(Error::Config(
                    "field `cross_attention_dim` must be a positive width (the text encoder's hidden size)".into(),
                ));
            }
            for (field, value) in [
                ("num_attention_heads", &self.num_attention_heads),
                ("attention_head_dim", &self.attention_head_dim),
                (
                    "transformer_layers_per_block",
                    &self.transformer_layers_per_block,
                ),
            ] {
                if value.as_ref().is_some_and(|v| !v.is_valid_for(n)) {
                    return Err(Error::Config(format!(
                        "field `{field}` must be a positive number or one per block ({n} entries), got {value:?}"
                    )));
                }
            }
            for (i, &c) in self.block_out_channels.iter().enumerate() {
                let heads = self.heads(i, c);
                if c % heads != 0 {
                    return Err(Error::Config(format!(
                        "block {i}: {c} channels do not split into {heads} attention heads (`attention_head_dim`/`num_attention_heads`)"
                    )));
                }
            }
        }
        if self.time_embedding_type != "positional" {
            return Err(unsupported(
                "time_embedding_type",
                &self.time_embedding_type,
                "positional",
            ));
        }
        if self.act_fn != "silu" {
            return Err(unsupported("act_fn", &self.act_fn, "silu"));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(unsupported(
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "default",
            ));
        }
        if self.downsample_type != "conv" || self.upsample_type != "conv" {
            return Err(unsupported(
                "downsample_type/upsample_type",
                (&self.downsample_type, &self.upsample_type),
                "conv",
            ));
        }
        if self.class_embed_type.is_some() {
            return Err(unsupported(
                "class_embed_type",
                &self.class_embed_type,
                "null (use num_class_embeds)",
            ));
        }
        if self.num_class_embeds == Some(0) {
            return Err(Error::Config(
                "field `num_class_embeds` must be at least 1".into(),
            ));
        }
        let groups = self.groups();
        if groups == 0 {
            return Err(Error::Config(
                "field `norm_num_groups` must be at least 1".into(),
            ));
        }
        for &c in &self.block_out_channels {
            if c == 0 || c % groups != 0 {
                return Err(Error::Config(format!(
                    "every `block_out_channels` entry must be a positive multiple of norm_num_groups ({groups}), got {c}"
                )));
            }
        }
        if self
            .attn_norm_num_groups
            .is_some_and(|g| g == 0 || self.block_out_channels.iter().any(|c| c % g != 0))
        {
            return Err(Error::Config(
                "field `attn_norm_num_groups` must divide every block_out_channels entry".into(),
            ));
        }
        if self
            .attention_head_dim
            .as_ref()
            .is_some_and(|d| !d.is_valid_for(n))
        {
            return Err(Error::Config(
                "field `attention_head_dim` must be at least 1 (one value or one per block)".into(),
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.layers_per_block == 0 {
            return Err(Error::Config(
                "`in_channels`, `out_channels` and `layers_per_block` must be at least 1".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Config(format!(
                "field `dropout` must lie in [0, 1), got {}",
                self.dropout
            )));
        }
        Ok(())
    }

    fn groups(&self) -> usize {
        self.norm_num_groups
            .unwrap_or_else(|| (self.block_out_channels[0] / 4).min(32))
    }

    /// Width of the time embedding.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }

    /// Multiply-accumulates of one forward pass (one sampling step) for one sample of
    /// `sample_size`, counted from the layer shapes as [`init`](Self::init) builds them:
    /// convolutions, linear layers, attention projections and the two attention matmuls
    /// (normalisations and element-wise ops are not counted). `None` without `sample_size`.
    pub fn macs_per_step(&self) -> Option<u64> {
        let side = self.sample_size?;
        Some(self.walk(side as f64, Count::Macs) as u64)
    }

    /// The number of weights of the convolutions, linear layers and attention projections (biases
    /// and norms, well under 1 %, left out), counted from the config without building anything:
    /// what [`footprint`](crate::models::footprint) checks before `init` allocates.
    pub fn param_count(&self) -> f64 {
        self.walk(1.0, Count::Params)
    }

    /// Elements of the feature maps one image's forward pass produces at `side`×`side` input
    /// (convolution outputs, attention projections and scores): what training keeps for the
    /// backward pass.
    pub fn activation_elements(&self, side: usize) -> f64 {
        self.walk(side as f64, Count::Activations)
    }

    /// One walk over the layers as [`init`](Self::init) builds them, counting `what`; f64 so that
    /// an absurd config gives a huge number rather than an overflow.
    fn walk(&self, side: f64, what: Count) -> f64 {
        let ch = &self.block_out_channels;
        let n = ch.len();
        let temb = self.time_embed_dim() as f64;
        let conv = |s: f64, cin: usize, cout: usize, k: f64| {
            let (cin, cout) = (cin as f64, cout as f64);
            match what {
                Count::Macs => s * s * cin * cout * k * k,
                Count::Params => cin * cout * k * k,
                Count::Activations => s * s * cout,
            }
        };
        let linear = |cin: f64, cout: f64| match what {
            Count::Macs | Count::Params => cin * cout,
            Count::Activations => cout,
        };
        let resnet = |s: f64, cin: usize, cout: usize| {
            conv(s, cin, cout, 3.0)
                + linear(temb, cout as f64)
                + conv(s, cout, cout, 3.0)
                + if cin != cout {
                    conv(s, cin, cout, 1.0)
                } else {
                    0.0
                }
        };
        // Spatial self-attention: q, k, v and out projections over N = s² tokens, plus QKᵀ and
        // softmax·V. A Transformer2DModel per layer adds cross-attention to M = 77 context tokens
        // and the GEGLU feed-forward (8c + 4c wide), with 1×1/linear projections in and out.
        let attention = |s: f64, c: usize, i: usize| {
            let (tokens, cf, h) = (s * s, c as f64, self.heads(i, c) as f64);
            let spatial = match what {
                Count::Macs => 4.0 * tokens * cf * cf + 2.0 * tokens * tokens * cf,
                Count::Params => 4.0 * cf * cf,
                Count::Activations => 4.0 * tokens * cf + h * tokens * tokens,
            };
            if !self.is_conditional() {
                return spatial;
            }
            let (ctx, m) = (self.cross_attention_dim.unwrap_or(c) as f64, 77.0);
            let layers = self
                .transformer_layers_per_block
                .as_ref()
                .map_or(1, |l| l.get(i)) as f64;
            let per_layer = spatial
                + match what {
                    Count::Macs => {
                        2.0 * tokens * cf * cf
                            + 2.0 * m * ctx * cf
                            + 2.0 * tokens * m * cf
                            + 12.0 * tokens * cf * cf
                    }
                    Count::Params => 2.0 * cf * cf + 2.0 * ctx * cf + 12.0 * cf * cf,
                    Count::Activations => {
                        2.0 * tokens * cf + 2.0 * m * cf + h * tokens * m + 12.0 * tokens * cf
                    }
                };
            let projections = match what {
                Count::Macs => 2.0 * tokens * cf * cf,
                Count::Params => 2.0 * cf * cf,
                Count::Activations => 2.0 * tokens * cf,
            };
            layers * per_layer + projections
        };
        let mut total = conv(side, self.in_channels, ch[0], 3.0)
            + linear(ch[0] as f64, temb)
            + linear(temb, temb)
            + self
                .time_cond_proj_dim
                .map_or(0.0, |d| linear(d as f64, ch[0] as f64));
        let mut s = side;
        let mut c_out = ch[0];
        let mut skips = vec![ch[0]];
        for (i, kind) in self.down_block_types.iter().enumerate() {
            let c_in = c_out;
            c_out = ch[i];
            for j in 0..self.layers_per_block {
                total += resnet(s, if j == 0 { c_in } else { c_out }, c_out);
                if Self::has_attention(kind) {
                    total += attention(s, c_out, i);
                }
                skips.push(c_out);
            }
            if i + 1 < n {
                s = (s / 2.0).floor();
                total += conv(s, c_out, c_out, 3.0);
                skips.push(c_out);
            }
        }
        total += 2.0 * resnet(s, ch[n - 1], ch[n - 1])
            + if self.add_attention || self.is_conditional() {
                attention(s, ch[n - 1], n - 1)
            } else {
                0.0
            };
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut c_out = rev[0];
        for (i, kind) in self.up_block_types.iter().enumerate() {
            let prev_out = c_out;
            c_out = rev[i];
            for j in 0..=self.layers_per_block {
                let skip = skips.pop().unwrap_or(c_out);
                let res_in = if j == 0 { prev_out } else { c_out };
                total += resnet(s, res_in + skip, c_out);
                if Self::has_attention(kind) {
                    total += attention(s, c_out, n - 1 - i);
                }
            }
            if i + 1 < n {
                s *= 2.0;
                total += conv(s, c_out, c_out, 3.0);
            }
        }
        total + conv(side, ch[0], self.out_channels, 3.0)
    }

    /// An upper bound on the largest single tensor one image needs in a forward pass, in
    /// elements: a 3×3 convolution's unfolded input (9 × channels × H × W, channels doubled where
    /// an up block concatenates a skip) or an attention block's scores (heads × tokens²), at
    /// `size`×`size` input. Used to keep batches within a GPU's largest storage binding.
    pub fn peak_tensor_elements(&self, size: usize) -> usize {
        let mut peak = 9 * self.in_channels * size * size;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            let side = (size >> i).max(1);
            let tokens = side * side;
            peak = peak.max(9 * 2 * c * tokens);
            let attn = self
                .down_block_types
                .get(i)
                .is_some_and(|k| Self::has_attention(k))
                || (i + 1 == self.block_out_channels.len()
                    && (self.add_attention || self.is_conditional()));
            if attn {
                let scores = self.heads(i, c) * tokens * tokens;
                // A Transformer2DModel's attention runs in query chunks within a budget.
                peak = peak.max(if self.is_conditional() {
                    scores.min(super::transformer::ATTENTION_SCORE_BUDGET)
                } else {
                    scores
                });
            }
        }
        peak
    }

    /// Builds the UNet with freshly initialised weights.
    pub fn init(&self, device: &Device) -> UNet {
        let ch = &self.block_out_channels;
        let temb = self.time_embed_dim();
        let spec = BlockSpec {
            groups: self.groups(),
            eps: self.norm_eps,
            temb: Some(temb),
            dropout: self.dropout,
            output_scale_factor: 1.0,
        };
        let n = ch.len();
        // The attention block of block `i` (the mid block: n − 1) at `c` channels.
        let attention_block = |i: usize, c: usize, spec: BlockSpec| {
            if self.is_conditional() {
                AttentionBlock::Transformer(Transformer2D::new(
                    TransformerSpec {
                        channels: c,
                        heads: self.heads(i, c),
                        layers: self
                            .transformer_layers_per_block
                            .as_ref()
                            .map_or(1, |l| l.get(i)),
                        context_dim: self.cross_attention_dim.unwrap_or(c),
                        groups: spec.groups,
                        linear_projection: self.use_linear_projection,
                        dropout: self.dropout,
                        upcast: self.upcast_attention,
                    },
                    device,
                ))
            } else {
                AttentionBlock::Spatial(Attention::new(c, self.head_dim(i, c), spec, device))
            }
        };
        let mut down_blocks = Vec::with_capacity(n);
        let mut c_out = ch[0];
        for (i, kind) in self.down_block_types.iter().enumerate() {
            let c_in = c_out;
            c_out = ch[i];
            let attn = Self::has_attention(kind);
            down_blocks.push(DownBlock {
                resnets: (0..self.layers_per_block)
                    .map(|j| {
                        ResnetBlock::new(if j == 0 { c_in } else { c_out }, c_out, spec, device)
                    })
                    .collect(),
                attentions: if attn {
                    (0..self.layers_per_block)
                        .map(|_| attention_block(i, c_out, spec))
                        .collect()
                } else {
                    vec![]
                },
                downsamplers: if i + 1 < n {
                    vec![Downsample::new(c_out, self.downsample_padding, device)]
                } else {
                    vec![]
                },
            });
        }
        let mid_spec = BlockSpec {
            output_scale_factor: self.mid_block_scale_factor,
            ..spec
        };
        let mid_attn_spec = BlockSpec {
            groups: self.attn_norm_num_groups.unwrap_or(spec.groups),
            ..mid_spec
        };
        let mut mid_block = MidBlock::new(
            ch[n - 1],
            self.head_dim(n - 1, ch[n - 1]),
            false,
            mid_spec,
            device,
        );
        if self.add_attention || self.is_conditional() {
            // UNetMidBlock2DCrossAttn's transformer keeps output_scale_factor 1 and the resnets' groups.
            let spec = if self.is_conditional() {
                spec
            } else {
                mid_attn_spec
            };
            mid_block.attentions = vec![attention_block(n - 1, ch[n - 1], spec)];
        }
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut c_out = rev[0];
        for (i, kind) in self.up_block_types.iter().enumerate() {
            let prev_out = c_out;
            c_out = rev[i];
            let c_in = rev[(i + 1).min(n - 1)];
            let layers = self.layers_per_block + 1;
            let attn = Self::has_attention(kind);
            up_blocks.push(UpBlock {
                resnets: (0..layers)
                    .map(|j| {
                        let skip = if j == layers - 1 { c_in } else { c_out };
                        let res_in = if j == 0 { prev_out } else { c_out };
                        ResnetBlock::new(res_in + skip, c_out, spec, device)
                    })
                    .collect(),
                attentions: if attn {
                    (0..layers)
                        .map(|_| attention_block(n - 1 - i, c_out, spec))
                        .collect()
                } else {
                    vec![]
                },
                upsamplers: if i + 1 < n {
                    vec![Upsample::new(c_out, device)]
                } else {
                    vec![]
                },
            });
        }
        UNet {
            conv_in: conv(self.in_channels, ch[0], 3, device),
            time_embedding: TimestepEmbedding {
                // Zero-initialised: a student made from a teacher starts as the teacher.
                cond_proj: self.time_cond_proj_dim.map(|d| {
                    burn::nn::LinearConfig::new(d, ch[0])
                        .with_bias(false)
                        .with_initializer(burn::nn::Initializer::Zeros)
                        .init(device)
                }),
                ..TimestepEmbedding::new(ch[0], temb, device)
            },
            class_embedding: self
                .num_class_embeds
                .map(|k| EmbeddingConfig::new(k, temb).init(device)),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(spec.groups, ch[0], self.norm_eps, device),
            conv_out: conv(ch[0], self.out_channels, 3, device),
            time_proj_dim: ch[0],
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            center_input_sample: self.center_input_sample,
        }
    }
}

/// `DownBlock2D` (no attentions) or `AttnDownBlock2D`.
#[derive(Module, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock>,
    pub attentions: Vec<AttentionBlock>,
    pub downsamplers: Vec<Downsample>,
}

impl DownBlock {
    /// Returns the block output and every skip activation it produced, in order.
    fn forward(
        &self,
        mut x: Tensor<4>,
        temb: &Tensor<2>,
        cond: &Conditioning,
        skips: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, Some(temb));
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(x, cond);
            }
            skips.push(x.clone());
        }
        if let Some(down) = self.downsamplers.first() {
            x = down.forward(x); // [B, C, H, W] -> [B, C, H/2, W/2]
            skips.push(x.clone());
        }
        x
    }
}

/// `UpBlock2D` (no attentions) or `AttnUpBlock2D`.
#[derive(Module, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock>,
    pub attentions: Vec<AttentionBlock>,
    pub upsamplers: Vec<Upsample>,
}

impl UpBlock {
    fn forward(
        &self,
        mut x: Tensor<4>,
        temb: &Tensor<2>,
        cond: &Conditioning,
        skips: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("one skip per up-block resnet");
            x = resnet.forward(Tensor::cat(vec![x, skip], 1), Some(temb)); // [B, C + C_skip, H, W] -> [B, C_out, H, W]
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(x, cond);
            }
        }
        if let Some(up) = self.upsamplers.first() {
            x = up.forward(x); // [B, C, H, W] -> [B, C, 2H, 2W]
        }
        x
    }
}

/// The UNet. `forward(x, t, class_labels)` predicts what the scheduler config's
/// `prediction_type` says (ε, v or x0); the model does not know.
#[derive(Module, Debug)]
pub struct UNet {
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub class_embedding: Option<Embedding>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub time_proj_dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub center_input_sample: bool,
}

impl UNet {
    /// x: [B, C_in, H, W], t: [B] (fractional timesteps allowed) → [B, C_out, H, W]. The
    /// conditioning supplies class labels (a class-conditional model), the guidance scale w (a
    /// model with `time_cond_proj_dim`, embedded as diffusers'
    /// `get_guidance_scale_embedding(w, time_cond_proj_dim)`) and the text context (a
    /// UNet2DConditionModel); parts the model was not built for are ignored.
    pub fn forward(&self, x: Tensor<4>, t: Tensor<1>, cond: &Conditioning) -> Tensor<4> {
        let (mut x, mut skips, emb, cond) = self.encode(x, t, cond);
        x = self.mid_block.forward_conditioned(x, Some(&emb), &cond);
        for block in &self.up_blocks {
            x = block.forward(x, &emb, &cond, &mut skips);
        }
        let x = group_norm_silu(&self.conv_norm_out, x);
        conv2d_forward(&self.conv_out, x) // [B, C_out, H, W]
    }

    /// The encoder's activations — `conv_in`'s output, every down-block resnet's and
    /// downsampler's (the skips the decoder takes) and the mid block's — from fine to coarse: the
    /// multi-scale features a perceptual distance compares ([`crate::distill::consistency`]'s
    /// teacher-feature distance). The decoder does not run.
    pub fn encoder_features(
        &self,
        x: Tensor<4>,
        t: Tensor<1>,
        cond: &Conditioning,
    ) -> Vec<Tensor<4>> {
        let (x, mut skips, emb, cond) = self.encode(x, t, cond);
        skips.push(self.mid_block.forward_conditioned(x, Some(&emb), &cond));
        skips
    }

    /// The down path: its output, the skips, the (SiLU-ed) embedding and the conditioning in
    /// the weights' precision.
    fn encode(
        &self,
        x: Tensor<4>,
        t: Tensor<1>,
        cond: &Conditioning,
    ) -> (Tensor<4>, Vec<Tensor<4>>, Tensor<2>, Conditioning) {
        // Compute in the weights' precision (f16 after `cast_module`); the sinusoidal features
        // are made in the timesteps' own precision (f32) and cast after, as diffusers does.
        let dtype: FloatDType = self.conv_in.weight.val().dtype().into();
        let x = x.cast(dtype);
        let x = if self.center_input_sample {
            x * 2.0 - 1.0
        } else {
            x
        };
        let t_emb =
            timestep_embedding(t, self.time_proj_dim, self.flip_sin_to_cos, self.freq_shift)
                .cast(dtype);
        let condition = match (&self.time_embedding.cond_proj, &cond.guidance) {
            (Some(proj), Some(w)) => {
                Some(guidance_scale_embedding(w.clone(), proj.weight.dims()[0]).cast(dtype))
            }
            _ => None,
        };
        let mut emb = self.time_embedding.forward(t_emb, condition); // [B, temb]
        if let (Some(embedding), Some(labels)) = (&self.class_embedding, cond.labels.clone()) {
            let [b] = labels.dims();
            let class_emb = embedding.forward(labels.reshape([b, 1])); // [B, 1, temb]
            let d = class_emb.dims()[2];
            emb = emb + class_emb.reshape([b, d]);
        }
        // Every resnet applies SiLU to the embedding before its projection: do it once here.
        let emb = silu(emb);

        let cond = Conditioning {
            context: cond.context.clone().map(|c| c.cast(dtype)),
            ..cond.clone()
        };
        let mut x = conv2d_forward(&self.conv_in, x); // [B, C0, H, W]
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, &emb, &cond, &mut skips);
        }
        (x, skips, emb, cond)
    }

    /// The channel count of each map [`encoder_features`](Self::encoder_features) returns, in
    /// its order: conv_in, every down-block resnet (after its attention) and downsampler, the
    /// mid block.
    pub fn encoder_channels(&self) -> Vec<usize> {
        let out = |c: &Conv2d| c.weight.dims()[0];
        let mut channels = vec![out(&self.conv_in)];
        for block in &self.down_blocks {
            channels.extend(block.resnets.iter().map(|r| out(&r.conv2)));
            channels.extend(block.downsamplers.iter().map(|d| out(&d.conv)));
        }
        channels.push(*channels.last().expect("conv_in's map"));
        channels
    }

    /// Whether the model takes a guidance scale (has a guidance-scale embedding).
    pub fn takes_guidance(&self) -> bool {
        self.time_embedding.cond_proj.is_some()
    }

    /// Whether the model takes class labels.
    pub fn num_classes(&self) -> Option<usize> {
        self.class_embedding.as_ref().map(|e| e.weight.dims()[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn macs_per_step_count_every_weight_at_its_resolution() {
        // Every weight is used at least once per pixel of the smallest map (4×4 here, at
        // 32×32 with three levels) and at most once per pixel of the full map, plus attention's
        // token-by-token products.
        let config = UNetConfig::shapes32();
        let macs = config.macs_per_step().unwrap();
        let params = config
            .init(&crate::backend::cpu_device().expect("a CPU backend is compiled in"))
            .num_params() as u64;
        assert!(
            macs > params * 16 && macs < params * 32 * 32 + 2 * 64 * 64 * 64 * 4,
            "{macs}"
        );
        // A tenth of the channels costs about a hundredth of the work.
        let mut narrow = config.clone();
        narrow.block_out_channels = vec![8, 8, 8];
        narrow.norm_num_groups = Some(4);
        narrow.attention_head_dim = Some(PerBlock::One(8));
        assert!(narrow.macs_per_step().unwrap() * 20 < macs);
        let mut no_size = config;
        no_size.sample_size = None;
        assert_eq!(no_size.macs_per_step(), None);
    }

    #[test]
    fn the_guidance_embedding_starts_at_zero_and_then_conditions_on_w() {
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let mut config = UNetConfig::tiny();
        config.time_cond_proj_dim = Some(16);
        let mut unet = config.init(&device);
        let x = Tensor::<4>::random([2, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
        let t = Tensor::<1>::from_floats([900.0, 100.0], &device);
        let w = |v: f32| Some(Tensor::<1>::full([2], v, &device));
        let run = |u: &UNet, g: Option<Tensor<1>>| {
            u.forward(x.clone(), t.clone(), &Conditioning::none().with_guidance(g))
        };
        let plain = run(&unet, None);
        let diff = |a: Tensor<4>, b: Tensor<4>| -> f32 { (a - b).abs().max().into_scalar::<f32>() };
        assert_eq!(diff(run(&unet, w(3.0)), plain.clone()), 0.0);
        let proj = unet.time_embedding.cond_proj.take().unwrap();
        unet.time_embedding.cond_proj = Some(burn::nn::Linear {
            weight: proj.weight.map(|p| {
                p.clone() + Tensor::random(p.dims(), Distribution::Normal(0.0, 0.1), &device)
            }),
            bias: None,
        });
        assert!(diff(run(&unet, w(1.0)), run(&unet, w(4.0))) > 1e-4);
        // Without a guidance scale the embedding is skipped, as in diffusers.
        assert_eq!(diff(run(&unet, None), plain), 0.0);
    }
}
