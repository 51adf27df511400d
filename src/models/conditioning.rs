//! What a denoiser call is conditioned on besides (x, t): one value passed to every model call,
//! instead of positional optional arguments.

use burn::prelude::*;

/// The conditioning of a batch of B rows. Each part is optional; a model uses the parts it was
/// built for and ignores the others (as diffusers does: `class_labels` for a UNet without a class
/// embedding, `timestep_cond` without `time_cond_proj_dim`).
#[derive(Debug, Clone, Default)]
pub struct Conditioning {
    /// Class labels [B] (`class_labels`).
    pub labels: Option<Tensor<1, Int>>,
    /// The guidance scale w [B] a guidance-conditioned student takes (LCM's `timestep_cond`,
    /// embedded by `get_guidance_scale_embedding(w, time_cond_proj_dim)`).
    pub guidance: Option<Tensor<1>>,
    /// Text context [B, tokens, dim] (`encoder_hidden_states`).
    pub context: Option<Tensor<3>>,
    /// Context tokens to ignore [B, tokens], true where masked (`encoder_attention_mask`).
    pub context_mask: Option<Tensor<2, Bool>>,
}

impl Conditioning {
    /// No conditioning.
    pub fn none() -> Self {
        Self::default()
    }

    /// Class labels only (None: unconditional).
    pub fn labels(labels: Option<Tensor<1, Int>>) -> Self {
        Conditioning {
            labels,
            ..Self::default()
        }
    }

    /// Text context only.
    pub fn text(context: Tensor<3>) -> Self {
        Conditioning {
            context: Some(context),
            ..Self::default()
        }
    }

    /// The same conditioning on the autodiff device (for the model that trains on it).
    pub fn autodiff(self) -> Self {
        Conditioning {
            labels: self.labels.map(Tensor::autodiff),
            guidance: self.guidance.map(Tensor::autodiff),
            context: self.context.map(Tensor::autodiff),
            context_mask: self.context_mask.map(Tensor::autodiff),
        }
    }

    /// The rows `rows` of every part, in that order (a gather along the batch dimension).
    pub fn select(&self, rows: &[usize]) -> Self {
        let Some(device) = self.device() else {
            return Self::default();
        };
        let idx = crate::denoiser::row_index(rows, &device);
        Conditioning {
            labels: self.labels.clone().map(|t| t.select(0, idx.clone())),
            guidance: self.guidance.clone().map(|t| t.select(0, idx.clone())),
            context: self.context.clone().map(|t| t.select(0, idx.clone())),
            context_mask: self.context_mask.clone().map(|t| t.select(0, idx)),
        }
    }

    /// The device of the first part present (None: no conditioning).
    fn device(&self) -> Option<Device> {
        self.labels
            .as_ref()
            .map(Tensor::device)
            .or_else(|| self.guidance.as_ref().map(Tensor::device))
            .or_else(|| self.context.as_ref().map(Tensor::device))
            .or_else(|| self.context_mask.as_ref().map(Tensor::device))
    }

    pub fn with_guidance(mut self, guidance: Option<Tensor<1>>) -> Self {
        self.guidance = guidance;
        self
    }

    /// The rows of `self` followed by the rows of `other` (classifier-free guidance's one batch of
    /// [unconditional; conditional]). Parts present in only one of the two are an error of the
    /// caller, reported by panic.
    pub fn concat(self, other: Conditioning) -> Self {
        macro_rules! cat {
            ($field:ident) => {
                match (self.$field, other.$field) {
                    (Some(a), Some(b)) => Some(Tensor::cat(vec![a, b], 0)),
                    (None, None) => None,
                    _ => panic!(concat!(
                        "conditioning `",
                        stringify!($field),
                        "` present in only one half of a batch"
                    )),
                }
            };
        }
        Conditioning {
            labels: cat!(labels),
            guidance: cat!(guidance),
            context: cat!(context),
            context_mask: cat!(context_mask),
        }
    }
}
