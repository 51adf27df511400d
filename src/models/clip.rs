//! transformers' `CLIPTextModel` (`models/clip/modeling_clip.py`), the text encoder of Stable
//! Diffusion 1.x/2.x: token + position embeddings, pre-norm transformer layers with a causal mask,
//! a final layer norm; the output is the last hidden state [B, 77, hidden].

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::transformer::chunked_attention;
use crate::error::{Error, Result};

fn quick_gelu_name() -> String {
    "quick_gelu".into()
}
fn seventy_seven() -> usize {
    77
}
fn layer_norm_eps() -> f64 {
    1e-5
}
fn clip_bos() -> usize {
    49406
}
fn clip_eos() -> usize {
    49407
}

/// The activation of the MLP (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenAct {
    /// x·σ(1.702x): OpenAI's CLIP (SD-1.x).
    QuickGelu,
    /// Exact GELU: OpenCLIP ViT-H (SD-2.x).
    Gelu,
}

/// `CLIPTextConfig`, the fields the text model reads (others in the file are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "seventy_seven")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu_name")]
    pub hidden_act: String,
    #[serde(default = "layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Ids of the start and end tokens (OpenAI CLIP's vocabulary: 49406, 49407); the end token's
    /// position is where [`ClipTextModel::pooled`] reads.
    #[serde(default = "clip_bos")]
    pub bos_token_id: usize,
    #[serde(default = "clip_eos")]
    pub eos_token_id: usize,
}

impl ClipTextConfig {
    /// Parses a transformers `config.json`; errors name the offending field.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: ClipTextConfig = super::parse_config(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.activation()?;
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("field `{field}` must be at least 1")));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::Config(format!(
                "field `hidden_size` ({}) must split into `num_attention_heads` ({}) heads",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }

    pub fn activation(&self) -> Result<HiddenAct> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(HiddenAct::QuickGelu),
            "gelu" => Ok(HiddenAct::Gelu),
            other => Err(Error::Config(format!(
                "field `hidden_act` = \"{other}\" is not supported by fewstep (supported: quick_gelu, gelu)"
            ))),
        }
    }

    /// The config as transformers writes it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let m = v.as_object_mut().expect("an object");
        m.insert("architectures".into(), serde_json::json!(["CLIPTextModel"]));
        m.insert("model_type".into(), "clip_text_model".into());
        v
    }

    /// Weights in the model (embeddings included).
    pub fn param_count(&self) -> f64 {
        let (d, f) = (self.hidden_size as f64, self.intermediate_size as f64);
        let layer = 4.0 * d * d + 2.0 * d * f;
        (self.vocab_size + self.max_position_embeddings) as f64 * d
            + self.num_hidden_layers as f64 * layer
    }

    pub fn init(&self, device: &Device) -> ClipTextModel {
        let d = self.hidden_size;
        let norm = || {
            LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let linear = |a: usize, b: usize| LinearConfig::new(a, b).init(device);
        ClipTextModel {
            embeddings: ClipEmbeddings {
                token_embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
                position_embedding: EmbeddingConfig::new(self.max_position_embeddings, d)
                    .init(device),
            },
            encoder: ClipEncoder {
                layers: (0..self.num_hidden_layers)
                    .map(|_| ClipEncoderLayer {
                        self_attn: ClipAttention {
                            q_proj: linear(d, d),
                            k_proj: linear(d, d),
                            v_proj: linear(d, d),
                            out_proj: linear(d, d),
                            heads: self.num_attention_heads,
                        },
                        layer_norm1: norm(),
                        mlp: ClipMlp {
                            fc1: linear(d, self.intermediate_size),
                            fc2: linear(self.intermediate_size, d),
                            quick_gelu: self.activation().ok() == Some(HiddenAct::QuickGelu),
                        },
                        layer_norm2: norm(),
                    })
                    .collect(),
            },
            final_layer_norm: norm(),
        }
    }
}

#[derive(Module, Debug)]
pub struct ClipEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
}

impl ClipAttention {
    /// [B, N, D] → [B, N, D], causal.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, d] = x.dims();
        let split = |t: Tensor<3>| {
            t.reshape([b, n, self.heads, d / self.heads])
                .swap_dims(1, 2)
        };
        let q = split(self.q_proj.forward(x.clone()));
        let k = split(self.k_proj.forward(x.clone()));
        let v = split(self.v_proj.forward(x));
        let out = chunked_attention(q, k, v, None, true); // [B, h, N, d/h]
        self.out_proj
            .forward(out.swap_dims(1, 2).reshape([b, n, d]))
    }
}

#[derive(Module, Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub quick_gelu: bool,
}

impl ClipMlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.fc1.forward(x);
        let h = if self.quick_gelu {
            h.clone() * burn::tensor::activation::sigmoid(h * 1.702)
        } else {
            burn::tensor::activation::gelu(h)
        };
        self.fc2.forward(h)
    }
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = self.self_attn.forward(self.layer_norm1.forward(x.clone())) + x;
        self.mlp.forward(self.layer_norm2.forward(x.clone())) + x
    }
}

#[derive(Module, Debug)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

/// The text encoder. Its state dict is transformers' `CLIPTextModel`'s: `text_model.` prefixed
/// (transformers 4 and the SD-1.x/2.x folders) or not (transformers 5); both load.
#[derive(Module, Debug)]
pub struct ClipTextModel {
    pub embeddings: ClipEmbeddings,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
}

impl ClipTextModel {
    /// ids: [B, N] → the last hidden state [B, N, D], final layer norm applied. With
    /// `clip_skip` k > 0, the hidden state k layers before the last, then the final layer norm
    /// (diffusers' `encode_prompt(clip_skip=k)`: `hidden_states[-(k + 1)]`).
    pub fn forward(&self, ids: Tensor<2, Int>, clip_skip: usize) -> Tensor<3> {
        let [b, n] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<1, Int>::arange(0..n as i64, &device)
            .reshape([1, n])
            .expand([b, n]);
        let mut x = self.embeddings.token_embedding.forward(ids)
            + self.embeddings.position_embedding.forward(positions); // [B, N, D]
        let used = self.encoder.layers.len().saturating_sub(clip_skip);
        for layer in &self.encoder.layers[..used] {
            x = layer.forward(x);
        }
        self.final_layer_norm.forward(x)
    }

    /// The pooled output (transformers' `pooler_output`): each row's last hidden state at its
    /// first end token, `eos_positions` [B].
    pub fn pooled(hidden: Tensor<3>, eos_positions: &[usize]) -> Tensor<2> {
        let [b, n, d] = hidden.dims();
        let rows: Vec<i64> = eos_positions
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * n + p) as i64)
            .collect();
        let rows = Tensor::<1, Int>::from_ints(rows.as_slice(), &hidden.device());
        hidden.reshape([b * n, d]).select(0, rows)
    }

    pub fn num_layers(&self) -> usize {
        self.encoder.layers.len()
    }
}
