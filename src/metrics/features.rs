//! Feature extractors behind one trait. `shapes` is the in-domain network of the offline default
//! (see `models::feature_net`); every extractor takes images in [−1, 1], NCHW.

use std::path::Path;

use burn::module::Module;
use burn::prelude::*;

use super::stats::Features;
use crate::error::{Error, Result};
use crate::io;
use crate::models::inception::{self, FidInception};
use crate::models::{FeatureNet, FeatureNetConfig};

pub trait FeatureExtractor {
    /// Name plus a fingerprint of the weights: reports and statistics caches key on it.
    fn id(&self) -> String;
    fn dim(&self) -> usize;
    /// The image side the extractor expects (folders are decoded at this size).
    fn image_size(&self) -> usize;
    /// Whether images must have exactly `image_size` (false: the extractor resizes itself).
    fn fixed_size(&self) -> bool {
        true
    }
    /// [B, 3, S, S] in [−1, 1] -> [B, dim].
    fn features(&self, images: Tensor<4>) -> Tensor<2>;
}

/// The shipped `shapes` feature network's folder name under `weights/`.
pub const SHAPES_FEATURES: &str = "shapes-features";

/// FNV-1a of the weight bytes, as 8 hex digits: changes whenever the weights do.
fn fingerprint(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:08x}", (h >> 32) as u32 ^ h as u32)
}

/// The `shapes` extractor: the feature network's penultimate layer.
pub struct ShapesFeatures {
    net: FeatureNet,
    config: FeatureNetConfig,
    fingerprint: String,
}

impl ShapesFeatures {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::file(
                dir,
                "no `shapes` feature network here (expected config.json and diffusion_pytorch_model.safetensors, as written by `fewstep train-features`)",
            ));
        }
        let config = FeatureNetConfig::from_json_str(&io::read_text(&config_path)?)
            .map_err(|e| e.in_file(&config_path))?;
        let weights = dir.join(io::WEIGHTS_NAME);
        let net = io::load_weights(config.init(device), &weights)?;
        let bytes = std::fs::read(&weights)
            .map_err(|e| Error::file(&weights, format!("cannot read: {e}")))?;
        Ok(ShapesFeatures {
            net,
            config,
            fingerprint: fingerprint(&bytes),
        })
    }
}

impl ShapesFeatures {
    /// Features of images on an autodiff device with gradients flowing back to the images (a
    /// perceptual loss); the network itself stays frozen.
    pub fn features_autodiff(&self, images: Tensor<4>) -> Tensor<2> {
        self.net
            .clone()
            .fork(&images.device())
            .no_grad()
            .features(images)
    }
}

impl FeatureExtractor for ShapesFeatures {
    fn id(&self) -> String {
        format!("shapes-{}", self.fingerprint)
    }
    fn dim(&self) -> usize {
        self.config.feature_dim
    }
    fn image_size(&self) -> usize {
        self.config.image_size
    }
    fn features(&self, images: Tensor<4>) -> Tensor<2> {
        self.net.features(images)
    }
}

/// The `inception` extractor: pytorch-fid's FID Inception-v3, 2048-d pool3 features of images
/// resized bilinearly to 299×299, from the user's `pt_inception-2015-12-05-6726825d.pth`.
pub struct InceptionFeatures {
    net: FidInception,
    fingerprint: String,
}

impl InceptionFeatures {
    /// Loads the weights file (`.pth` or a `.safetensors` conversion).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let net = FidInception::load(path, device)?;
        let bytes =
            std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        Ok(InceptionFeatures {
            net,
            fingerprint: fingerprint(&bytes),
        })
    }

    /// The network with the parity fixture's formula weights (tests; not for real FIDs).
    pub fn formula_weights(device: &Device) -> Self {
        InceptionFeatures {
            net: FidInception::formula_weights(device),
            fingerprint: "formula".into(),
        }
    }
}

impl FeatureExtractor for InceptionFeatures {
    fn id(&self) -> String {
        format!("inception-{}", self.fingerprint)
    }
    fn dim(&self) -> usize {
        inception::FEATURES
    }
    fn image_size(&self) -> usize {
        299
    }
    fn fixed_size(&self) -> bool {
        false
    }
    fn features(&self, images: Tensor<4>) -> Tensor<2> {
        // The network takes [0, 1] (and scales to [−1, 1] itself, as pytorch-fid does).
        self.net.features((images + 1.0) / 2.0)
    }
}

/// Accumulates features batch by batch, checking the image size.
pub struct FeatureSink<'a> {
    extractor: &'a dyn FeatureExtractor,
    pub features: Features,
}

impl<'a> FeatureSink<'a> {
    pub fn new(extractor: &'a dyn FeatureExtractor) -> Self {
        FeatureSink {
            extractor,
            features: Features {
                dim: extractor.dim(),
                data: Vec::new(),
            },
        }
    }

    /// Adds the features of `images` ([B, 3, S, S] in [−1, 1]; clamped first, as images are).
    pub fn add(&mut self, images: Tensor<4>) -> Result<()> {
        let [_, c, h, w] = images.dims();
        let s = self.extractor.image_size();
        if c != 3 || (self.extractor.fixed_size() && (h != s || w != s)) {
            return Err(Error::Usage(format!(
                "images are {c}×{h}×{w} but the {} extractor takes 3×{s}×{s}",
                self.extractor.id()
            )));
        }
        let f = self.extractor.features(images.clamp(-1.0, 1.0));
        self.features
            .data
            .extend(f.into_data().try_to_vec::<f32>().expect("f32 features"));
        Ok(())
    }
}
