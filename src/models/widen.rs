//! Function-preserving widening of a UNet (Net2Net's "wider" operator, Chen et al. 2016): every
//! feature channel of a diffusers `UNet2DModel` / `UNet2DConditionModel` is repeated `factor`
//! times, so a model with more capacity starts as the trained one and training continues from
//! there instead of from scratch.
//!
//! The layout is *interleaved*: new channel `c′` is a copy of old channel `c′ / factor`. Then
//! - a weight's output axis repeats each row, its input axis repeats each column divided by
//!   `factor` (the copies of an input sum back to the old value);
//! - concatenations (the up blocks' skip inputs, GEGLU's value/gate halves) commute with the
//!   repetition, and a GroupNorm with the *same* number of groups sees in each group every old
//!   channel of that group `factor` times — the same mean and variance; LayerNorm likewise;
//! - attention keeps its heads and widens each head, whose `q·k` then sums every product
//!   `factor` times while the scale is 1/√(factor·d): the query weights are multiplied by
//!   1/√factor to keep the logits;
//! - the sinusoidal timestep features (width = the first block's channels) gain frequencies: with
//!   `freq_shift` 0 the old ones are every `factor`-th of the new, which the first time-embedding
//!   layer (and the guidance-scale projection) read; the new frequencies start with zero weight.
//!
//! Copies receive equal gradients and would stay copies, so `noise` (relative to each weight
//! tensor's standard deviation) is added to the widened weights to break the symmetry, as Net2Net
//! does; with `noise` 0 the wide model computes exactly what the narrow one does.

use std::collections::HashMap;

use super::unet::{PerBlock, UNetConfig};
use crate::error::{Error, Result};
use crate::io::HostTensor;

/// How one axis of a weight tensor is widened.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Axis {
    /// Unchanged (image channels, the text context's width, a kernel's spatial axes).
    Fixed,
    /// An output axis over feature channels: each entry repeated.
    Out,
    /// An input axis over feature channels: each entry repeated and divided by the factor.
    In,
    /// The sinusoidal timestep features: old frequencies at every `factor`-th position, zero
    /// elsewhere.
    Sinusoid,
}

/// The axes of diffusers parameter `name` with `rank` dimensions; `None` for a parameter this
/// widening does not know.
fn axes(name: &str, rank: usize) -> Option<Vec<Axis>> {
    use Axis::*;
    let top = name.split('.').next().unwrap_or("");
    if !matches!(
        top,
        "conv_in"
            | "conv_out"
            | "conv_norm_out"
            | "time_embedding"
            | "class_embedding"
            | "down_blocks"
            | "mid_block"
            | "up_blocks"
    ) {
        return None;
    }
    let spatial = |mut v: Vec<Axis>| {
        v.resize(rank, Fixed);
        v
    };
    Some(match (name, rank) {
        ("conv_in.weight", 4) => spatial(vec![Out, Fixed]),
        ("conv_out.weight", 4) => spatial(vec![Fixed, In]),
        ("conv_out.bias", 1) => vec![Fixed],
        ("time_embedding.linear_1.weight", 2) => vec![Out, Sinusoid],
        ("time_embedding.cond_proj.weight", 2) => vec![Sinusoid, Fixed],
        ("time_embedding.cond_proj.bias", 1) => vec![Sinusoid],
        // nn.Embedding: [classes, time-embedding width].
        ("class_embedding.weight", 2) => vec![Fixed, Out],
        // Cross-attention keys and values read the text context, whose width stays.
        (n, 2) if n.ends_with("attn2.to_k.weight") || n.ends_with("attn2.to_v.weight") => {
            vec![Out, Fixed]
        }
        (_, 1) => vec![Out],
        (_, 2) => vec![Out, In],
        (_, 4) => spatial(vec![Out, In]),
        _ => return None,
    })
}

/// What [`widen`] is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct WidenSpec {
    /// How many times each feature channel is repeated (≥ 2).
    pub factor: usize,
    /// Symmetry-breaking noise added to every widened weight (rank ≥ 2), as a fraction of that
    /// tensor's standard deviation; 0 keeps the function exactly.
    pub noise: f32,
    /// Seed of the noise.
    pub seed: u64,
}

/// The config of `config` widened by `factor`: every block's channels (and an explicit
/// time-embedding width) times `factor`; a `UNet2DModel`'s channels per head too (its heads stay),
/// a `UNet2DConditionModel`'s head counts as they are; GroupNorm groups as they are.
pub fn widen_config(config: &UNetConfig, factor: usize) -> Result<UNetConfig> {
    if factor < 2 {
        return Err(Error::Usage(format!(
            "--factor {factor}: expected an integer of at least 2"
        )));
    }
    if config.quantization_config.is_some() {
        return Err(Error::Config(
            "a quantized UNet cannot be widened (widen the f32 model, then quantize)".into(),
        ));
    }
    if config.time_embedding_type != "positional" || config.freq_shift != 0.0 {
        return Err(Error::Config(format!(
            "widening keeps the timestep features only for time_embedding_type \"positional\" with freq_shift 0 (this config: {:?}, {})",
            config.time_embedding_type, config.freq_shift
        )));
    }
    if config.block_out_channels.first().is_none_or(|c| c % 2 == 1) {
        return Err(Error::Config(
            "widening needs an even first block width (the sinusoidal timestep features)".into(),
        ));
    }
    let mut wide = config.clone();
    wide.block_out_channels = config
        .block_out_channels
        .iter()
        .map(|c| c * factor)
        .collect();
    wide.time_embedding_dim = config.time_embedding_dim.map(|d| d * factor);
    if !config.is_conditional() {
        wide.attention_head_dim = config.attention_head_dim.as_ref().map(|d| match d {
            PerBlock::One(v) => PerBlock::One(v * factor),
            PerBlock::List(l) => PerBlock::List(l.iter().map(|v| v * factor).collect()),
        });
    }
    wide.validate()?;
    Ok(wide)
}

/// The weights of `config`'s UNet (diffusers names, PyTorch layout) widened by `spec.factor`,
/// with the widened config. Every tensor must be one the widening knows.
pub fn widen(
    config: &UNetConfig,
    tensors: &HashMap<String, HostTensor>,
    spec: WidenSpec,
) -> Result<(UNetConfig, Vec<(String, HostTensor)>)> {
    let wide = widen_config(config, spec.factor)?;
    let k = spec.factor;
    let half_old = config.block_out_channels[0] / 2;
    let half_new = half_old * k;
    // New sinusoid index → old one (cos half, then sin half, or the reverse: the same map).
    let sinusoid = |i: usize| -> Option<usize> {
        let (h, p) = (i / half_new, i % half_new);
        (h < 2 && p % k == 0).then(|| h * half_old + p / k)
    };
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    let mut rng = crate::data::shapes::SplitMix::new(spec.seed, 0x5749_4445); // "WIDE"
    for name in names {
        let t = &tensors[name];
        let kinds = axes(name, t.shape.len()).ok_or_else(|| {
            Error::Config(format!(
                "tensor `{name}` {:?}: not a parameter the widening knows (UNet2DModel / UNet2DConditionModel without add-ons)",
                t.shape
            ))
        })?;
        let new_shape: Vec<usize> = t
            .shape
            .iter()
            .zip(&kinds)
            .map(|(&n, a)| match a {
                Axis::Fixed => n,
                _ => n * k,
            })
            .collect();
        if kinds.contains(&Axis::Sinusoid)
            && t.shape[kinds.iter().position(|a| *a == Axis::Sinusoid).unwrap()] != 2 * half_old
        {
            return Err(Error::Config(format!(
                "tensor `{name}` {:?}: expected the timestep features' width {} on its sinusoid axis",
                t.shape,
                2 * half_old
            )));
        }
        let mut q_scale = 1.0f32;
        if name.ends_with("to_q.weight") || name.ends_with("to_q.bias") {
            q_scale = 1.0 / (k as f32).sqrt();
        }
        let count: usize = new_shape.iter().product();
        let mut data = vec![0.0f32; count];
        let rank = new_shape.len();
        let mut idx = vec![0usize; rank];
        for value in data.iter_mut() {
            // Old flat index and the product of the input-axis divisors.
            let mut old = 0usize;
            let mut scale = q_scale;
            let mut zero = false;
            for d in 0..rank {
                let i = match kinds[d] {
                    Axis::Fixed => idx[d],
                    Axis::Out => idx[d] / k,
                    Axis::In => {
                        scale /= k as f32;
                        idx[d] / k
                    }
                    Axis::Sinusoid => match sinusoid(idx[d]) {
                        Some(i) => i,
                        None => {
                            zero = true;
                            0
                        }
                    },
                };
                old = old * t.shape[d] + i;
            }
            if !zero {
                *value = t.data[old] * scale;
            }
            // Next multi-index, last axis fastest.
            for d in (0..rank).rev() {
                idx[d] += 1;
                if idx[d] < new_shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        let widened = kinds.iter().any(|a| matches!(a, Axis::Out | Axis::In));
        if spec.noise > 0.0 && rank >= 2 && widened {
            let n = data.len() as f32;
            let mean = data.iter().sum::<f32>() / n;
            let std = (data.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt();
            let sigma = spec.noise * std;
            for v in data.iter_mut() {
                // Box–Muller.
                let u1 = rng.uniform(f32::EPSILON, 1.0);
                let u2 = rng.uniform(0.0, 1.0);
                *v += sigma * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
            }
        }
        out.push((
            name.clone(),
            HostTensor {
                shape: new_shape,
                data,
            },
        ));
    }
    Ok((wide, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Conditioning, UNet};
    use burn::module::Module;
    use burn::tensor::{Distribution, Int, Tensor};

    /// `unet`'s weights as host tensors, and `tensors` loaded into `module` through a
    /// safetensors file (as `fewstep widen` writes and reloads them).
    fn host(unet: &UNet) -> HashMap<String, HostTensor> {
        let bytes = crate::io::weights_to_bytes(unet).unwrap();
        crate::io::read_safetensors_bytes(&bytes, std::path::Path::new("memory")).unwrap()
    }

    fn load(module: UNet, tensors: &[(String, HostTensor)], tag: &str) -> UNet {
        let dir = std::env::temp_dir().join(format!("fewstep-widen-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(crate::io::WEIGHTS_NAME);
        let list: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
            .iter()
            .map(|(n, t)| (n.as_str(), t.shape.clone(), t.data.clone()))
            .collect();
        crate::io::write_safetensors(&path, &list).unwrap();
        let net = crate::io::load_weights(module, &path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        net
    }

    /// `unet` widened by `spec`.
    fn widened(config: &UNetConfig, unet: &UNet, spec: WidenSpec, tag: &str) -> (UNetConfig, UNet) {
        let device = crate::backend::cpu_device().unwrap();
        let (wide, out) = widen(config, &host(unet), spec).unwrap();
        let net = load(wide.init(&device), &out, tag);
        (wide, net)
    }

    /// Every parameter drawn from U(−0.3, 0.3) (a freshly initialised UNet has zeroed output
    /// layers).
    fn randomised(unet: UNet, seed: u64) -> UNet {
        let mut rng = crate::data::shapes::SplitMix::new(seed, 1);
        let mut sorted: Vec<(String, HostTensor)> = host(&unet).into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let tensors: Vec<(String, HostTensor)> = sorted
            .into_iter()
            .map(|(n, t)| {
                let data = t.data.iter().map(|_| rng.uniform(-0.3, 0.3)).collect();
                (
                    n,
                    HostTensor {
                        shape: t.shape,
                        data,
                    },
                )
            })
            .collect();
        load(unet, &tensors, &format!("r{seed}"))
    }

    fn max_rel(a: Tensor<4>, b: Tensor<4>) -> f32 {
        let scale = a.clone().abs().max().into_scalar::<f32>();
        (a - b).abs().max().into_scalar::<f32>() / scale
    }

    #[test]
    fn a_widened_unet_computes_what_the_narrow_one_does() {
        let device = crate::backend::cpu_device().unwrap();
        let mut config = UNetConfig::tiny();
        config.time_cond_proj_dim = Some(16);
        config.num_class_embeds = Some(4);
        let unet = randomised(config.init(&device), 3);
        let exact = WidenSpec {
            factor: 2,
            noise: 0.0,
            seed: 0,
        };
        let (wide, net) = widened(&config, &unet, exact, "pixels");
        assert_eq!(wide.block_out_channels, vec![16, 32]);
        assert_eq!(wide.attention_head_dim, Some(PerBlock::One(16)));
        assert!(net.num_params() > 3 * unet.num_params());
        let x = Tensor::<4>::random([2, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
        let t = Tensor::<1>::from_floats([937.0, 41.0], &device);
        let cond = Conditioning {
            labels: Some(Tensor::<1, Int>::from_ints([1, 3], &device)),
            guidance: Some(Tensor::<1>::from_floats([2.5, 7.0], &device)),
            ..Conditioning::none()
        };
        let a = unet.forward(x.clone(), t.clone(), &cond);
        let b = net.forward(x.clone(), t.clone(), &cond);
        assert!(max_rel(a.clone(), b) < 1e-5);
        // The symmetry-breaking noise moves the output by about its own size, no more.
        let noisy = WidenSpec {
            noise: 0.01,
            ..exact
        };
        let (_, net) = widened(&config, &unet, noisy, "noisy");
        let d = max_rel(a, net.forward(x, t, &cond));
        assert!(d > 1e-5 && d < 0.1, "{d}");
    }

    #[test]
    fn a_widened_text_unet_computes_what_the_narrow_one_does() {
        let device = crate::backend::cpu_device().unwrap();
        let config = UNetConfig::from_json_str(
            r#"{"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4,
                "out_channels": 4, "block_out_channels": [8, 16], "layers_per_block": 1,
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "mid_block_type": "UNetMidBlock2DCrossAttn",
                "cross_attention_dim": 12, "attention_head_dim": 2, "norm_num_groups": 4,
                "time_cond_proj_dim": 8}"#,
        )
        .unwrap();
        let unet = randomised(config.init(&device), 5);
        let spec = WidenSpec {
            factor: 3,
            noise: 0.0,
            seed: 0,
        };
        let (wide, net) = widened(&config, &unet, spec, "text");
        assert_eq!(wide.block_out_channels, vec![24, 48]);
        assert_eq!(wide.attention_head_dim, config.attention_head_dim);
        let x = Tensor::<4>::random([2, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
        let t = Tensor::<1>::from_floats([500.0, 7.0], &device);
        let cond = Conditioning {
            context: Some(Tensor::<3>::random(
                [2, 5, 12],
                Distribution::Normal(0.0, 1.0),
                &device,
            )),
            guidance: Some(Tensor::<1>::from_floats([4.0, 11.0], &device)),
            ..Conditioning::none()
        };
        let d = max_rel(
            unet.forward(x.clone(), t.clone(), &cond),
            net.forward(x, t, &cond),
        );
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn widening_refuses_what_it_cannot_keep() {
        let mut config = UNetConfig::tiny();
        assert!(widen_config(&config, 1).is_err());
        config.freq_shift = 1.0;
        let e = widen_config(&config, 2).unwrap_err().to_string();
        assert!(e.contains("freq_shift"), "{e}");
        let tensors = HashMap::from([(
            "add_embedding.linear_1.weight".to_string(),
            HostTensor {
                shape: vec![2, 2],
                data: vec![0.0; 4],
            },
        )]);
        let spec = WidenSpec {
            factor: 2,
            noise: 0.0,
            seed: 0,
        };
        let e = widen(&UNetConfig::tiny(), &tensors, spec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("add_embedding"), "{e}");
    }
}
