//! Discriminator heads on a frozen diffusion model's encoder features, the discriminator of
//! latent adversarial diffusion distillation (LADD, Sauer et al. 2024: the teacher's own
//! features as the backbone, small trainable heads on each map; ADD before it used a frozen
//! DINOv2 the same way). The backbone is [`UNet::encoder_features`](super::UNet::encoder_features)
//! of the frozen teacher, run by the caller; these heads turn each of its maps into a map of
//! logits, one per position (a patch discriminator per resolution).

use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::activation::leaky_relu;

use crate::backend::conv2d_forward;

/// One head: 3×3 convolution to `hidden` channels, LeakyReLU(0.2), 1×1 convolution to a logit.
#[derive(Module, Debug)]
pub struct FeatureHead {
    pub conv: Conv2d,
    pub logit: Conv2d,
}

/// One head per encoder map.
#[derive(Module, Debug)]
pub struct FeatureHeads {
    pub heads: Vec<FeatureHead>,
}

impl FeatureHeads {
    /// Heads for maps of `channels` channels (in the order the encoder yields them).
    pub fn new(channels: &[usize], hidden: usize, device: &Device) -> Self {
        FeatureHeads {
            heads: channels
                .iter()
                .map(|&c| FeatureHead {
                    conv: Conv2dConfig::new([c, hidden], [3, 3])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .init(device),
                    logit: Conv2dConfig::new([hidden, 1], [1, 1]).init(device),
                })
                .collect(),
        }
    }

    /// Each map's logits, [B, H·W] per head (the maps are cast to f32 first).
    pub fn forward(&self, features: Vec<Tensor<4>>) -> Vec<Tensor<2>> {
        assert_eq!(
            features.len(),
            self.heads.len(),
            "one encoder map per discriminator head"
        );
        self.heads
            .iter()
            .zip(features)
            .map(|(head, f)| {
                let f = f.cast(FloatDType::F32);
                let h = leaky_relu(conv2d_forward(&head.conv, f), 0.2);
                let logits = conv2d_forward(&head.logit, h); // [B, 1, H, W]
                let [b, _, hh, ww] = logits.dims();
                logits.reshape([b, hh * ww])
            })
            .collect()
    }
}

/// The discriminator of adversarial consistency distillation: heads on the frozen teacher's
/// encoder maps, or a spectral-norm convolutional discriminator on the images themselves
/// (the KD-GAN's, for 3-channel 32×32 teachers), trained from scratch.
#[derive(Module, Debug)]
pub struct ConsistencyDiscriminator {
    pub heads: Option<FeatureHeads>,
    pub pixels: Option<crate::models::gan::Discriminator>,
}

impl ConsistencyDiscriminator {
    /// Logits of `z` (already re-noised), [B, positions] per map; `features` runs the frozen
    /// teacher's encoder for the heads.
    pub fn forward(
        &self,
        z: Tensor<4>,
        features: impl FnOnce(Tensor<4>) -> Vec<Tensor<4>>,
    ) -> Vec<Tensor<2>> {
        match (&self.heads, &self.pixels) {
            (Some(heads), _) => heads.forward(features(z)),
            (None, Some(d)) => {
                let logits = d.forward(z.cast(FloatDType::F32), None);
                let [b] = logits.dims();
                vec![logits.reshape([b, 1])]
            }
            (None, None) => unreachable!("a discriminator has heads or a pixel network"),
        }
    }

    /// A spectral-norm discriminator's power iteration after its step (heads: unchanged).
    pub fn power_iteration(mut self) -> Self {
        self.pixels = self.pixels.map(|d| d.power_iteration());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Conditioning, UNetConfig};

    #[test]
    fn one_head_per_encoder_map_gives_a_logit_per_position() {
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let unet = UNetConfig::tiny().init(&device);
        let channels = unet.encoder_channels();
        let x = Tensor::<4>::zeros([2, 3, 32, 32], &device);
        let t = Tensor::<1>::from_floats([0.0, 500.0], &device);
        let feats = unet.encoder_features(x, t, &Conditioning::none());
        let dims: Vec<usize> = feats.iter().map(|f| f.dims()[1]).collect();
        assert_eq!(channels, dims, "encoder_channels names every map's width");
        let sizes: Vec<usize> = feats.iter().map(|f| f.dims()[2] * f.dims()[3]).collect();
        let heads = FeatureHeads::new(&channels, 8, &device);
        let logits = heads.forward(feats);
        assert_eq!(logits.len(), channels.len());
        for (l, n) in logits.iter().zip(sizes) {
            assert_eq!(l.dims(), [2, n]);
        }
    }
}
