//! diffusers' `Transformer2DModel` with continuous input, as UNet2DConditionModel's cross-attention
//! blocks build it (`models/transformers/transformer_2d.py`, `models/attention.py`
//! `BasicTransformerBlock`, `attention_processor.py` `Attention`), with diffusers' parameter names.

use crate::backend::conv2d_forward;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{
    Dropout, DropoutConfig, GroupNorm, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::blocks::{conv, group_norm, group_norm_forward};
use super::conditioning::Conditioning;

/// Query rows per attention call, so that the [B, heads, rows, keys] score tensor stays under
/// ~256 MiB in f32: a 64×64 latent's self-attention (4096² scores per head) would otherwise take
/// 0.5 GB per image and layer at SD-1.5's 8 heads. Chunks give the same numbers (each query row's
/// softmax is independent).
pub const ATTENTION_SCORE_BUDGET: usize = 64 << 20;

/// Multi-head attention over tokens (`Attention` without group norm or residual): self-attention
/// when no context is given, else cross-attention to the context. q/k/v have no bias, the output
/// projection has one, as in diffusers' defaults (`attention_bias=False`).
#[derive(Module, Debug)]
pub struct CrossAttention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Vec<Linear>,
    pub heads: usize,
    /// Attention in f32 under f16 weights (`upcast_attention`, SD-2.1: its scores overflow f16).
    pub upcast: bool,
}

impl CrossAttention {
    pub fn new(
        dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        device: &Device,
    ) -> Self {
        let inner = heads * head_dim;
        let proj = |c_in: usize| LinearConfig::new(c_in, inner).with_bias(false).init(device);
        CrossAttention {
            to_q: proj(dim),
            to_k: proj(context_dim),
            to_v: proj(context_dim),
            to_out: vec![LinearConfig::new(inner, dim).init(device)],
            heads,
            upcast: false,
        }
    }

    /// x: [B, N, C], context: [B, M, C_ctx] (None: self-attention), mask: [B, M] true where a
    /// context token is masked → [B, N, C].
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: Option<&Tensor<3>>,
        mask: Option<&Tensor<2, Bool>>,
    ) -> Tensor<3> {
        let [b, n, _] = x.dims();
        let context = context.cloned().unwrap_or_else(|| x.clone());
        let m = context.dims()[1];
        let split = |t: Tensor<3>, len: usize| {
            let inner = t.dims()[2];
            t.reshape([b, len, self.heads, inner / self.heads])
                .swap_dims(1, 2) // [B, h, len, d]
        };
        let q = split(self.to_q.forward(x), n);
        let k = split(self.to_k.forward(context.clone()), m);
        let v = split(self.to_v.forward(context), m);
        let d = q.dims()[3];
        let mask = mask.map(|mask| mask.clone().reshape([b, 1, 1, m]));
        let dtype = burn::tensor::FloatDType::from(q.dtype());
        let out = if self.upcast && dtype != burn::tensor::FloatDType::F32 {
            let f32 = burn::tensor::FloatDType::F32;
            chunked_attention(q.cast(f32), k.cast(f32), v.cast(f32), mask, false).cast(dtype)
        } else {
            chunked_attention(q, k, v, mask, false)
        }; // [B, h, N, d]
        let merged = out.swap_dims(1, 2).reshape([b, n, self.heads * d]);
        self.to_out[0].forward(merged)
    }
}

/// softmax(q·kᵀ/√d)·v in query chunks that keep each score tensor within
/// [`ATTENTION_SCORE_BUDGET`] elements. q: [B, h, N, d], k/v: [B, h, M, d], mask broadcast from
/// [B, 1, 1, M] (true = masked) → [B, h, N, d].
pub fn chunked_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    causal: bool,
) -> Tensor<4> {
    let [b, h, n, _] = q.dims();
    let m = k.dims()[2];
    let options = AttentionModuleOptions {
        is_causal: causal,
        ..Default::default()
    };
    let rows = (ATTENTION_SCORE_BUDGET / (b * h * m).max(1)).max(1);
    let full_mask = |mask: &Tensor<4, Bool>, rows: usize| mask.clone().expand([b, h, rows, m]);
    if mask.is_none() && !causal && crate::backend::attention_is_fused(&q, &k, &v) {
        // fewstep's fused kernel on flex, which blocks queries itself.
        return crate::backend::attention(q, k, v);
    }
    if rows >= n || causal {
        let mask = mask.map(|mask| full_mask(&mask, n));
        return attention(q, k, v, mask, None, options);
    }
    let chunks: Vec<Tensor<4>> = (0..n)
        .step_by(rows)
        .map(|start| {
            let end = (start + rows).min(n);
            let qc = q.clone().slice([0..b, 0..h, start..end]);
            let mask = mask.as_ref().map(|mask| full_mask(mask, end - start));
            attention(qc, k.clone(), v.clone(), mask, None, options)
        })
        .collect();
    Tensor::cat(chunks, 2)
}

/// GEGLU: one projection to 2·inner, split into value and gate, value · GELU(gate) (exact GELU).
#[derive(Module, Debug)]
pub struct Geglu {
    pub proj: Linear,
}

/// The feed-forward's layers by position, so that they carry diffusers' names `net.0.proj`
/// (GEGLU), `net.1` (dropout, no weights) and `net.2` (output projection).
#[derive(Module, Debug)]
pub enum FeedForwardLayer {
    Geglu(Geglu),
    Dropout(Dropout),
    Linear(Linear),
}

/// `FeedForward(dim, mult=4, activation_fn="geglu")`.
#[derive(Module, Debug)]
pub struct FeedForward {
    pub net: Vec<FeedForwardLayer>,
}

impl FeedForward {
    pub fn new(dim: usize, dropout: f64, device: &Device) -> Self {
        let inner = dim * 4;
        FeedForward {
            net: vec![
                FeedForwardLayer::Geglu(Geglu {
                    proj: LinearConfig::new(dim, inner * 2).init(device),
                }),
                FeedForwardLayer::Dropout(DropoutConfig::new(dropout).init()),
                FeedForwardLayer::Linear(LinearConfig::new(inner, dim).init(device)),
            ],
        }
    }

    /// [B, N, C] → [B, N, C]
    pub fn forward(&self, mut x: Tensor<3>) -> Tensor<3> {
        for layer in &self.net {
            x = match layer {
                FeedForwardLayer::Geglu(geglu) => {
                    let projected = geglu.proj.forward(x); // [B, N, 2·inner]
                    let [value, gate] = projected
                        .chunk(2, 2)
                        .try_into()
                        .expect("an even projection width splits in two");
                    value * burn::tensor::activation::gelu(gate)
                }
                FeedForwardLayer::Dropout(dropout) => dropout.forward(x),
                FeedForwardLayer::Linear(linear) => linear.forward(x),
            };
        }
        x
    }
}

/// `BasicTransformerBlock` (layer norms, no `only_cross_attention`): self-attention, cross-attention
/// to the text context, GEGLU feed-forward, each pre-normed and residual.
#[derive(Module, Debug)]
pub struct TransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: CrossAttention,
    pub norm2: LayerNorm,
    pub attn2: CrossAttention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl TransformerBlock {
    pub fn new(
        dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        dropout: f64,
        device: &Device,
    ) -> Self {
        let norm = || LayerNormConfig::new(dim).with_epsilon(1e-5).init(device);
        TransformerBlock {
            norm1: norm(),
            attn1: CrossAttention::new(dim, dim, heads, head_dim, device),
            norm2: norm(),
            attn2: CrossAttention::new(dim, context_dim, heads, head_dim, device),
            norm3: norm(),
            ff: FeedForward::new(dim, dropout, device),
        }
    }

    /// [B, N, C] → [B, N, C]
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: Option<&Tensor<3>>,
        mask: Option<&Tensor<2, Bool>>,
    ) -> Tensor<3> {
        let x = self
            .attn1
            .forward(self.norm1.forward(x.clone()), None, None)
            + x;
        let x = self
            .attn2
            .forward(self.norm2.forward(x.clone()), context, mask)
            + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}

/// `proj_in`/`proj_out`: a 1×1 convolution (SD-1.x) or a linear layer over tokens
/// (`use_linear_projection`, SD-2.x).
#[derive(Module, Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// Which attention a UNet block carries: diffusers' spatial self-attention (`AttnDownBlock2D`…) or
/// a `Transformer2DModel` (`CrossAttnDownBlock2D`…). Both sit at `attentions.<i>` in the state dict.
#[derive(Module, Debug)]
pub enum AttentionBlock {
    Spatial(super::blocks::Attention),
    Transformer(Transformer2D),
}

impl AttentionBlock {
    /// [B, C, H, W] → [B, C, H, W]
    pub fn forward(&self, x: Tensor<4>, cond: &Conditioning) -> Tensor<4> {
        match self {
            AttentionBlock::Spatial(attn) => attn.forward(x),
            AttentionBlock::Transformer(t) => {
                t.forward(x, cond.context.as_ref(), cond.context_mask.as_ref())
            }
        }
    }
}

/// `Transformer2DModel`: group norm (ε 1e-6), projection in, transformer blocks, projection out,
/// plus the input (residual).
#[derive(Module, Debug)]
pub struct Transformer2D {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<TransformerBlock>,
    pub proj_out: Projection,
}

/// The shape of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
    pub dropout: f64,
    /// `upcast_attention`: both attentions of every block in f32 under f16 weights.
    pub upcast: bool,
}

impl Transformer2D {
    pub fn new(spec: TransformerSpec, device: &Device) -> Self {
        let c = spec.channels;
        let head_dim = c / spec.heads;
        let inner = spec.heads * head_dim;
        let projection = |c_in: usize, c_out: usize| {
            if spec.linear_projection {
                Projection::Linear(LinearConfig::new(c_in, c_out).init(device))
            } else {
                Projection::Conv(conv(c_in, c_out, 1, device))
            }
        };
        Transformer2D {
            norm: group_norm(spec.groups, c, 1e-6, device),
            proj_in: projection(c, inner),
            transformer_blocks: (0..spec.layers)
                .map(|_| {
                    let mut block = TransformerBlock::new(
                        inner,
                        spec.context_dim,
                        spec.heads,
                        head_dim,
                        spec.dropout,
                        device,
                    );
                    block.attn1.upcast = spec.upcast;
                    block.attn2.upcast = spec.upcast;
                    block
                })
                .collect(),
            proj_out: projection(inner, c),
        }
    }

    /// x: [B, C, H, W], context: [B, M, C_ctx] → [B, C, H, W]
    pub fn forward(
        &self,
        x: Tensor<4>,
        context: Option<&Tensor<3>>,
        mask: Option<&Tensor<2, Bool>>,
    ) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let n = h * w;
        let normed = group_norm_forward(&self.norm, x.clone());
        let to_tokens = |t: Tensor<4>| {
            let ch = t.dims()[1];
            t.reshape([b, ch, n]).swap_dims(1, 2) // [B, N, C]
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv2d_forward(conv, normed)),
            Projection::Linear(linear) => linear.forward(to_tokens(normed)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context, mask);
        }
        let inner = tokens.dims()[2];
        let to_map = |t: Tensor<3>, ch: usize| t.swap_dims(1, 2).reshape([b, ch, h, w]);
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv2d_forward(conv, to_map(tokens, inner)),
            Projection::Linear(linear) => to_map(linear.forward(tokens), c),
        };
        out + x
    }
}
