//! DCGAN-style generator and discriminator for 32×32 RGB, with a width multiplier (the knob
//! KD-GAN compresses along) and optional class conditioning.
//!
//! Generator: z [B, latent] (plus a class embedding added to z) → linear → BatchNorm → ReLU →
//! [B, C0, 4, 4] → three (4×4 transposed convolution, stride 2 → BatchNorm → ReLU) stages to
//! 32×32 → 3×3 convolution → tanh. The three stage outputs are its feature maps for feature
//! distillation. Batch normalisation is DCGAN's (Radford et al. 2016: it is what keeps the
//! generator from collapsing every z to one image; with GroupNorm in its place this generator
//! collapsed within 100 iterations on `shapes`). It normalises with the batch's statistics on an
//! autodiff device and with its running statistics (saved with the weights) otherwise.
//! Discriminator (Miyato et al.'s SN-DCGAN): 3×3 convolution, then three 4×4 stride-2
//! convolutions to 4×4, LeakyReLU(0.2) after each, a linear logit, plus the projection term
//! ⟨embed(y), pooled features⟩ when class-conditional. Every discriminator weight is spectrally
//! normalised (W/σ(W), σ by one power iteration per step, u kept between steps) — the Lipschitz
//! control that replaces gradient penalties, which need second-order autodiff burn lacks.

use crate::backend::conv2d;
use crate::backend::conv2d_forward;
use burn::module::{Module, Param};
use burn::nn::conv::{ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::ops::ConvOptions;

use super::blocks::conv;

/// Channels of a stage at `width` (multiplier of `base`), rounded up to a multiple of `multiple`.
fn scaled(base: usize, width: f32, multiple: usize) -> usize {
    let c = (base as f32 * width).round() as usize;
    c.div_ceil(multiple).max(1) * multiple
}

fn batch_norm(channels: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(channels).init(device)
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GeneratorConfig {
    pub latent_dim: usize,
    /// Channels of the 4×4 stage at width 1; each later stage halves them.
    pub base_channels: usize,
    pub width: f32,
    /// Stage channels are rounded up to a multiple of this.
    pub channel_multiple: usize,
    pub image_size: usize,
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// fewstep's quantized weights (`distill gan --quantize`): the format the convolution and
    /// linear weights of `model.safetensors` are stored in (see `models::quant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<super::quant::QuantizationConfig>,
}

impl GeneratorConfig {
    /// The `shapes` teacher: 128-64-32-16 channels.
    pub fn shapes32() -> Self {
        GeneratorConfig {
            latent_dim: 128,
            base_channels: 128,
            width: 1.0,
            channel_multiple: 8,
            image_size: 32,
            num_classes: None,
            quantization_config: None,
        }
    }

    pub fn with_width(&self, width: f32) -> Self {
        GeneratorConfig {
            width,
            ..self.clone()
        }
    }

    pub fn from_json_str(text: &str) -> crate::error::Result<Self> {
        let config: Self = super::parse_config(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects what this generator does not build, naming the field.
    pub fn validate(&self) -> crate::error::Result<()> {
        check_common(
            self.image_size,
            self.width,
            self.base_channels,
            self.num_classes,
        )?;
        if self.latent_dim == 0 || self.channel_multiple == 0 {
            return Err(crate::error::Error::Config(
                "fields `latent_dim` and `channel_multiple` must be at least 1".into(),
            ));
        }
        if let Some(q) = &self.quantization_config {
            q.validate()?;
        }
        Ok(())
    }

    /// Channels of the 4×4, 8×8, 16×16 and 32×32 maps.
    pub fn channels(&self) -> [usize; 4] {
        let g = self.channel_multiple;
        [
            scaled(self.base_channels, self.width, g),
            scaled(self.base_channels / 2, self.width, g),
            scaled(self.base_channels / 4, self.width, g),
            scaled(self.base_channels / 8, self.width, g),
        ]
    }

    pub fn init(&self, device: &Device) -> Generator {
        let c = self.channels();
        Generator {
            class_embedding: self
                .num_classes
                .map(|k| EmbeddingConfig::new(k, self.latent_dim).init(device)),
            project: LinearConfig::new(self.latent_dim, c[0] * 16).init(device),
            norm0: batch_norm(c[0], device),
            stages: (0..3)
                .map(|i| GenStage {
                    up: ConvTranspose2dConfig::new([c[i], c[i + 1]], [4, 4])
                        .with_stride([2, 2])
                        .with_padding([1, 1])
                        .init(device),
                    norm: batch_norm(c[i + 1], device),
                })
                .collect(),
            to_rgb: conv(c[3], 3, 3, device),
            base: c[0],
        }
    }

    /// Multiply-accumulates per generated image, counted from the layer shapes.
    pub fn macs_per_image(&self) -> u64 {
        let c = self.channels();
        let mut macs = (self.latent_dim * c[0] * 16) as u64;
        let mut side = 4u64;
        for i in 0..3 {
            // A transposed convolution does c_in·c_out·k² MACs per input pixel.
            macs += side * side * (c[i] * c[i + 1] * 16) as u64;
            side *= 2;
        }
        macs + side * side * (c[3] * 3 * 9) as u64
    }
}

#[derive(Module, Debug)]
pub struct GenStage {
    pub up: ConvTranspose2d,
    pub norm: BatchNorm,
}

#[derive(Module, Debug)]
pub struct Generator {
    pub class_embedding: Option<Embedding>,
    pub project: Linear,
    pub norm0: BatchNorm,
    pub stages: Vec<GenStage>,
    pub to_rgb: burn::nn::conv::Conv2d,
    pub base: usize,
}

impl Generator {
    /// z [B, latent] (labels [B]) → images in [−1, 1], [B, 3, 32, 32], and the three stage
    /// outputs ([B, C, 8, 8], [B, C, 16, 16], [B, C, 32, 32]).
    pub fn forward_features(
        &self,
        z: Tensor<2>,
        labels: Option<Tensor<1, Int>>,
    ) -> (Tensor<4>, Vec<Tensor<4>>) {
        let [b, _] = z.dims();
        let z = match (&self.class_embedding, labels) {
            (Some(e), Some(y)) => {
                let emb = e.forward(y.reshape([b, 1])); // [B, 1, latent]
                let d = emb.dims()[2];
                z + emb.reshape([b, d])
            }
            _ => z,
        };
        let h = self.project.forward(z).reshape([b, self.base, 4, 4]); // [B, C0, 4, 4]
        let mut h = burn::tensor::activation::relu(self.norm0.forward(h));
        let mut features = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            h = burn::tensor::activation::relu(stage.norm.forward(stage.up.forward(h))); // [B, C, 2H, 2W]
            features.push(h.clone());
        }
        (conv2d_forward(&self.to_rgb, h).tanh(), features)
    }

    pub fn forward(&self, z: Tensor<2>, labels: Option<Tensor<1, Int>>) -> Tensor<4> {
        self.forward_features(z, labels).0
    }

    pub fn num_classes(&self) -> Option<usize> {
        self.class_embedding.as_ref().map(|e| e.weight.dims()[0])
    }
}

/// A spectrally normalised convolution (or, with a 1×1 kernel on a 1×1 map, linear layer):
/// y = conv(x, W/σ(W)) + b, σ(W) = uᵀWv from one power iteration on the stored u (u and v
/// without gradient, as `torch.nn.utils.spectral_norm`).
#[derive(Module, Debug)]
pub struct SpectralConv {
    pub weight: Param<Tensor<4>>,
    pub bias: Param<Tensor<1>>,
    /// The left singular vector estimate [C_out] (not trained; moved by `power_iteration`).
    pub u: Param<Tensor<1>>,
    pub stride: usize,
    pub padding: usize,
}

impl SpectralConv {
    pub fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        device: &Device,
    ) -> Self {
        let fan_in = (c_in * k * k) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let u = Tensor::<1>::random([c_out], Distribution::Normal(0.0, 1.0), device);
        let norm = u.clone().powf_scalar(2.0).sum().sqrt();
        SpectralConv {
            weight: Param::from_tensor(Tensor::random(
                [c_out, c_in, k, k],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            bias: Param::from_tensor(Tensor::zeros([c_out], device)),
            u: Param::from_tensor(u / norm).set_require_grad(false),
            stride,
            padding,
        }
    }

    /// (σ, the next u): one power iteration from the stored u.
    fn sigma(&self) -> (Tensor<1>, Tensor<1>) {
        let w = self.weight.val();
        let [o, i, kh, kw] = w.dims();
        let w = w.reshape([o, i * kh * kw]); // [O, I·k²]
        let u = self.u.val().detach().reshape([1, o]);
        let normalize =
            |x: Tensor<2>| x.clone() / (x.powf_scalar(2.0).sum().sqrt() + 1e-12).reshape([1, 1]);
        let v = normalize(u.matmul(w.clone().detach())).detach(); // [1, I·k²]
        let wv = w.matmul(v.transpose()); // [O, 1]
        let u_next = normalize(wv.clone().detach().transpose()).detach(); // [1, O]
        let sigma = u_next.clone().matmul(wv).reshape([1]); // uᵀWv
        (sigma, u_next.reshape([o]))
    }

    /// [B, C_in, H, W] → [B, C_out, H', W'].
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let (sigma, _) = self.sigma();
        let w = self.weight.val() / sigma.reshape([1, 1, 1, 1]);
        let options = ConvOptions::new([self.stride; 2], [self.padding; 2], [1, 1], 1);
        conv2d(x, w, Some(self.bias.val()), options)
    }

    /// Moves u one power iteration (call after each optimiser step).
    pub fn power_iteration(mut self) -> Self {
        let (_, u) = self.sigma();
        let id = self.u.id;
        self.u = Param::initialized(id, u.detach()).set_require_grad(false);
        self
    }
}

/// The checks both GAN configs share: these networks are built for 32×32 images (a 4×4 map
/// upsampled three times, or downsampled three times to 4×4), a positive finite width and at
/// least 8 base channels (the generator halves them three times), and no zero class count.
fn check_common(
    image_size: usize,
    width: f32,
    base_channels: usize,
    num_classes: Option<usize>,
) -> crate::error::Result<()> {
    use crate::error::Error;
    if image_size != 32 {
        return Err(Error::Config(format!(
            "field `image_size` = {image_size}: fewstep's DCGAN pair is built for 32×32 images (expected 32)"
        )));
    }
    if !(width.is_finite() && width > 0.0 && base_channels as f32 * width <= 65536.0) {
        return Err(Error::Config(format!(
            "field `width` = {width}: expected a positive width multiplier with at most 65536 channels ({base_channels} × width)"
        )));
    }
    if !(8..=1 << 16).contains(&base_channels) {
        return Err(Error::Config(format!(
            "field `base_channels` = {base_channels}: expected 8 to 65536"
        )));
    }
    if num_classes == Some(0) {
        return Err(Error::Config(
            "field `num_classes` must be at least 1 (or null)".into(),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DiscriminatorConfig {
    /// Channels of the first stage at width 1; they double at each downsampling.
    pub base_channels: usize,
    pub width: f32,
    pub image_size: usize,
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// Append ProGAN's minibatch standard deviation (one channel: the mean over features of
    /// the across-batch std of the 4×4 map) before the logit, so a generator that collapses
    /// to few outputs is visible to D.
    #[serde(default)]
    pub minibatch_std: bool,
}

impl DiscriminatorConfig {
    /// The `shapes` teacher: 32-64-128 channels.
    pub fn shapes32() -> Self {
        DiscriminatorConfig {
            base_channels: 32,
            width: 1.0,
            image_size: 32,
            num_classes: None,
            minibatch_std: true,
        }
    }

    pub fn with_width(&self, width: f32) -> Self {
        DiscriminatorConfig {
            width,
            ..self.clone()
        }
    }

    pub fn from_json_str(text: &str) -> crate::error::Result<Self> {
        let config: Self = super::parse_config(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects what this discriminator does not build, naming the field.
    pub fn validate(&self) -> crate::error::Result<()> {
        check_common(
            self.image_size,
            self.width,
            self.base_channels,
            self.num_classes,
        )
    }

    fn channels(&self) -> [usize; 3] {
        [
            scaled(self.base_channels, self.width, 4),
            scaled(self.base_channels * 2, self.width, 4),
            scaled(self.base_channels * 4, self.width, 4),
        ]
    }

    pub fn init(&self, device: &Device) -> Discriminator {
        let c = self.channels();
        Discriminator {
            convs: vec![
                SpectralConv::new(3, c[0], 3, 1, 1, device),    // 32×32
                SpectralConv::new(c[0], c[0], 4, 2, 1, device), // → 16×16
                SpectralConv::new(c[0], c[1], 4, 2, 1, device), // → 8×8
                SpectralConv::new(c[1], c[2], 4, 2, 1, device), // → 4×4
            ],
            // The linear logit as a 4×4 convolution over the whole 4×4 map.
            logit: SpectralConv::new(c[2] + self.minibatch_std as usize, 1, 4, 1, 0, device),
            class_embedding: self
                .num_classes
                .map(|k| EmbeddingConfig::new(k, c[2]).init(device)),
            minibatch_std: self.minibatch_std,
        }
    }

    /// Multiply-accumulates per image, counted from the layer shapes.
    pub fn macs_per_image(&self) -> u64 {
        let c = self.channels();
        let s = self.image_size as u64;
        let conv = |side: u64, cin: usize, cout: usize, k: usize| {
            side * side * (cin * cout * k * k) as u64
        };
        conv(s, 3, c[0], 3)
            + conv(s / 2, c[0], c[0], 4)
            + conv(s / 4, c[0], c[1], 4)
            + conv(s / 8, c[1], c[2], 4)
            + conv(1, c[2] + self.minibatch_std as usize, 1, 16)
    }
}

#[derive(Module, Debug)]
pub struct Discriminator {
    pub convs: Vec<SpectralConv>,
    pub logit: SpectralConv,
    pub class_embedding: Option<Embedding>,
    pub minibatch_std: bool,
}

impl Discriminator {
    /// Images [B, 3, 32, 32] in [−1, 1] (labels [B]) → logits [B].
    pub fn forward(&self, x: Tensor<4>, labels: Option<Tensor<1, Int>>) -> Tensor<1> {
        let mut h = x;
        for conv in &self.convs {
            h = burn::tensor::activation::leaky_relu(conv.forward(h), 0.2);
        }
        let [b, c, hh, ww] = h.dims();
        let logit_input = if self.minibatch_std {
            // std over the batch of every feature, averaged: one scalar per batch, as a channel.
            let std = (h.clone().var_bias(0) + 1e-8).sqrt().mean(); // [1]
            let channel = std.reshape([1, 1, 1, 1]).expand([b, 1, hh, ww]);
            Tensor::cat(vec![h.clone(), channel], 1) // [B, C + 1, 4, 4]
        } else {
            h.clone()
        };
        let logit = self.logit.forward(logit_input).reshape([b]); // [B]
        match (&self.class_embedding, labels) {
            (Some(e), Some(y)) => {
                // Projection discriminator: + ⟨embed(y), Σ_spatial h⟩.
                let pooled = h.sum_dim(3).sum_dim(2).reshape([b, c]);
                let emb = e.forward(y.reshape([b, 1])).reshape([b, c]);
                logit + (pooled * emb).sum_dim(1).reshape([b])
            }
            _ => logit,
        }
    }

    /// Every spectral norm's u one power iteration further.
    pub fn power_iteration(mut self) -> Self {
        self.convs = self
            .convs
            .into_iter()
            .map(SpectralConv::power_iteration)
            .collect();
        self.logit = self.logit.power_iteration();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_widths_and_macs() {
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let cfg = GeneratorConfig::shapes32();
        let g = cfg.init(&device);
        let z = Tensor::<2>::random([2, 128], Distribution::Normal(0.0, 1.0), &device);
        let (x, feats) = g.forward_features(z, None);
        assert_eq!(x.dims(), [2, 3, 32, 32]);
        let sides: Vec<usize> = feats.iter().map(|f| f.dims()[2]).collect();
        assert_eq!(sides, vec![8, 16, 32]);
        let quarter = cfg.with_width(0.25);
        assert_eq!(quarter.channels(), [32, 16, 8, 8]);
        // Counted by hand: 128·128·16 + 16·128·64·16 + 64·64·32·16 + 256·32·16·16 + 1024·16·27.
        assert_eq!(cfg.macs_per_image(), 6_995_968);
        // A quarter-width generator: the 8-channel floor keeps it from 1/16 of the work.
        let ratio = cfg.macs_per_image() as f64 / quarter.macs_per_image() as f64;
        assert!((8.0..9.0).contains(&ratio), "{ratio}");
        let d = DiscriminatorConfig::shapes32().init(&device);
        assert_eq!(d.forward(x, None).dims(), [2]);
    }

    #[test]
    fn power_iterations_converge_to_the_largest_singular_value() {
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let mut layer = SpectralConv::new(4, 6, 3, 1, 1, &device);
        for _ in 0..50 {
            layer = layer.power_iteration();
        }
        let (sigma, _) = layer.sigma();
        let w = layer.weight.val().reshape([6, 36]);
        // σ² is the largest eigenvalue of WWᵀ: check ‖Wᵀu‖ = σ for the converged u.
        let u = layer.u.val().reshape([1, 6]);
        let norm: f32 = u
            .matmul(w)
            .powf_scalar(2.0)
            .sum()
            .sqrt()
            .into_scalar::<f32>();
        let s: f32 = sigma.into_scalar::<f32>();
        assert!((norm - s).abs() < 1e-3 * s, "{norm} vs {s}");
        let x = Tensor::<4>::random([1, 4, 5, 5], Distribution::Normal(0.0, 1.0), &device);
        assert_eq!(layer.forward(x).dims(), [1, 6, 5, 5]);
    }
}

/// A GAN folder: `DIR/generator/` and `DIR/discriminator/`, each `config.json` +
/// `model.safetensors` (PyTorch-style names, f32).
pub mod folder {
    use std::path::Path;

    use burn::prelude::*;

    use super::{Discriminator, DiscriminatorConfig, Generator, GeneratorConfig};
    use crate::error::{Error, Result};
    use crate::io;
    use crate::models::quant;

    pub const GENERATOR: &str = "generator";
    pub const DISCRIMINATOR: &str = "discriminator";
    pub const WEIGHTS: &str = "model.safetensors";

    /// Whether `dir` holds a GAN (a `generator/config.json`).
    pub fn is_gan(dir: &Path) -> bool {
        dir.join(GENERATOR).join(io::CONFIG_NAME).is_file()
    }

    /// Refuses a training run's folder whose networks are not all written: a run writes
    /// `generator/`, `discriminator/` and then its record `gan.json`, so a run folder (it holds
    /// `run.json`) without `gan.json` was interrupted or killed while finishing.
    fn check_finished(dir: &Path) -> Result<()> {
        if dir.join("run.json").is_file() && !dir.join("gan.json").is_file() {
            return Err(Error::file(
                dir,
                "an unfinished GAN run (no gan.json): continue it with --resume before using it",
            ));
        }
        Ok(())
    }

    pub fn load_generator(dir: &Path, device: &Device) -> Result<(GeneratorConfig, Generator)> {
        let d = dir.join(GENERATOR);
        if !d.join(io::CONFIG_NAME).is_file() {
            return Err(Error::file(
                dir,
                "not a GAN folder (expected generator/config.json and generator/model.safetensors)",
            ));
        }
        check_finished(dir)?;
        let path = d.join(io::CONFIG_NAME);
        let c =
            GeneratorConfig::from_json_str(&io::read_text(&path)?).map_err(|e| e.in_file(&path))?;
        let weights = d.join(WEIGHTS);
        let g = match &c.quantization_config {
            None => io::load_weights(c.init(device), &weights)?,
            Some(q) => quant::load_quantized(c.init(device), &weights, q.weights, |m, skip| {
                io::load_weights_except(m, &weights, false, skip)
            })?,
        };
        Ok((c, g))
    }

    pub fn load_discriminator(
        dir: &Path,
        device: &Device,
    ) -> Result<(DiscriminatorConfig, Discriminator)> {
        check_finished(dir)?;
        let d = dir.join(DISCRIMINATOR);
        let path = d.join(io::CONFIG_NAME);
        let c = DiscriminatorConfig::from_json_str(&io::read_text(&path)?)
            .map_err(|e| e.in_file(&path))?;
        let m = io::load_weights(c.init(device), &d.join(WEIGHTS))?;
        Ok((c, m))
    }

    /// Writes both networks into `dir` (created).
    pub fn save(
        dir: &Path,
        g: (&GeneratorConfig, &Generator),
        d: (&DiscriminatorConfig, &Discriminator),
    ) -> Result<()> {
        let gd = dir.join(GENERATOR);
        io::write_json(
            &gd.join(io::CONFIG_NAME),
            &serde_json::to_value(g.0).expect("config"),
        )?;
        match &g.0.quantization_config {
            None => io::save_weights(g.1, &gd.join(WEIGHTS))?,
            Some(q) => quant::save_quantized(g.1, q.weights, &gd.join(WEIGHTS))?,
        }
        let dd = dir.join(DISCRIMINATOR);
        io::write_json(
            &dd.join(io::CONFIG_NAME),
            &serde_json::to_value(d.0).expect("config"),
        )?;
        io::save_weights(d.1, &dd.join(WEIGHTS))
    }
}
