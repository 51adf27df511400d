//! The in-domain feature network of the `shapes` FID: a small CNN classifier trained on the
//! `shapes` labels (kind of the largest shape, counts per kind, counts per colour). Its
//! penultimate layer plays the role Inception's pool3 plays for natural images: features that
//! separate what the dataset varies in, so that FID/KID over them measure sample quality here.

use crate::backend::conv2d_forward;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;

use super::blocks::{conv, group_norm, group_norm_silu, silu};
use crate::data::shapes::{KINDS, PALETTE};

/// Most shapes an image holds: counts are classified over 0..=MAX_COUNT.
pub const MAX_COUNT: usize = 3;
/// Logits: largest kind (3), then per-kind counts (3 × 4), then per-colour counts (8 × 4).
pub const NUM_LOGITS: usize = KINDS.len() + (KINDS.len() + PALETTE.len()) * (MAX_COUNT + 1);
/// Classes of the attribute classifier's relation head: none, above, below, left of, right of.
pub const RELATION_CLASSES: usize = 5;
/// Logits of the attribute classifier: the count of each (kind, colour) pair (24 × 4), then the
/// relation ([`crate::data::captions::Facts`]).
pub const ATTRIBUTE_LOGITS: usize =
    crate::data::captions::PAIRS * (MAX_COUNT + 1) + RELATION_CLASSES;

/// What the heads predict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Heads {
    /// The `shapes` labels (the FID feature network): [`NUM_LOGITS`].
    #[default]
    Labels,
    /// The `shapes-text` facts (the prompt-adherence classifier): [`ATTRIBUTE_LOGITS`].
    Attributes,
}

impl Heads {
    pub fn num_logits(self) -> usize {
        match self {
            Heads::Labels => NUM_LOGITS,
            Heads::Attributes => ATTRIBUTE_LOGITS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FeatureNetConfig {
    /// Channels of each stage; every stage after the first halves the resolution.
    pub channels: Vec<usize>,
    pub feature_dim: usize,
    pub norm_num_groups: usize,
    pub image_size: usize,
    #[serde(default)]
    pub heads: Heads,
}

impl FeatureNetConfig {
    pub fn shapes32() -> Self {
        FeatureNetConfig {
            channels: vec![32, 64, 128, 128],
            feature_dim: 128,
            norm_num_groups: 8,
            image_size: 32,
            heads: Heads::Labels,
        }
    }

    pub fn from_json_str(text: &str) -> crate::error::Result<Self> {
        super::parse_config(text)
    }

    pub fn init(&self, device: &Device) -> FeatureNet {
        let g = self.norm_num_groups;
        let mut stages = Vec::new();
        let mut c_in = 3;
        for (i, &c) in self.channels.iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            stages.push(Stage {
                down: Conv2dConfig::new([c_in, c], [3, 3])
                    .with_stride([stride, stride])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(device),
                norm1: group_norm(g, c, 1e-5, device),
                conv: conv(c, c, 3, device),
                norm2: group_norm(g, c, 1e-5, device),
            });
            c_in = c;
        }
        FeatureNet {
            stages,
            proj: LinearConfig::new(2 * c_in, self.feature_dim).init(device),
            head: LinearConfig::new(self.feature_dim, self.heads.num_logits()).init(device),
        }
    }
}

#[derive(Module, Debug)]
pub struct Stage {
    down: Conv2d,
    norm1: GroupNorm,
    conv: Conv2d,
    norm2: GroupNorm,
}

impl Stage {
    /// [B, C_in, H, W] -> [B, C, H/s, W/s]
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = group_norm_silu(&self.norm1, conv2d_forward(&self.down, x));
        group_norm_silu(&self.norm2, conv2d_forward(&self.conv, x))
    }
}

#[derive(Module, Debug)]
pub struct FeatureNet {
    stages: Vec<Stage>,
    proj: Linear,
    head: Linear,
}

impl FeatureNet {
    /// Penultimate features: [B, 3, S, S] in [−1, 1] -> [B, feature_dim].
    pub fn features(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = x;
        for stage in &self.stages {
            x = stage.forward(x);
        }
        let [b, c, h, w] = x.dims();
        let x = x.reshape([b, c, h * w]);
        // Mean and max pooling: the max answers "is this pattern (a corner, an arc) anywhere",
        // which shape kinds need; the mean carries amounts (colours, counts).
        let pooled = Tensor::cat(
            vec![
                x.clone().mean_dim(2).reshape([b, c]),
                x.max_dim(2).reshape([b, c]),
            ],
            1,
        ); // [B, 2C]
        silu(self.proj.forward(pooled))
    }

    /// The same trunk with freshly initialised `heads` of `config` (fine-tuning a feature network
    /// into an attribute classifier).
    pub fn with_heads(mut self, config: &FeatureNetConfig, device: &Device) -> FeatureNet {
        self.head = LinearConfig::new(config.feature_dim, config.heads.num_logits()).init(device);
        self
    }

    /// Label logits from features: [B, F] -> [B, heads' logits] (layout in [`Heads`]).
    pub fn logits(&self, features: Tensor<2>) -> Tensor<2> {
        self.head.forward(features)
    }
}
