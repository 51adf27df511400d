//! `fewstep widen`: a pipeline whose UNet has `--factor` times the channels and computes what the
//! original does (Net2Net's function-preserving widening, `models::widen`) — the start of a
//! teacher or student with more capacity that does not begin from scratch.

use std::path::PathBuf;

use burn::module::Module;
use burn::prelude::*;

use super::DeviceArgs;
use crate::error::{Error, Result};
use crate::models::Conditioning;
use crate::models::widen::{WidenSpec, widen};
use crate::pipeline::Pipeline;

#[derive(Debug, clap::Args)]
pub struct WidenArgs {
    /// The pipeline folder whose UNet is widened (the VAE, text encoder and scheduler are copied).
    #[arg(long)]
    pub model: PathBuf,
    /// How many times each feature channel is repeated.
    #[arg(long, value_parser = super::values::count, default_value_t = 2)]
    pub factor: usize,
    /// Symmetry-breaking noise on the widened weights, as a fraction of each tensor's standard
    /// deviation (copies would otherwise stay copies under training); 0 keeps the function
    /// exactly.
    #[arg(long, value_parser = super::values::non_negative_f32, default_value_t = 0.01)]
    pub noise: f32,
    /// Seed of the noise.
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the widened pipeline folder (must be absent or empty).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: WidenArgs) -> Result<()> {
    if args.factor < 2 {
        return Err(Error::Usage(format!(
            "--factor {}: expected an integer of at least 2",
            args.factor
        )));
    }
    crate::io::check_new_folder(&args.out, "--out")?;
    let device = args.device.device()?;
    let narrow = Pipeline::load(&args.model, &device)?;
    let unet_dir = args.model.join("unet");
    let in_config = |e: Error| Error::file(unet_dir.join(crate::io::CONFIG_NAME), e.to_string());
    // What the config allows, before the weights are read.
    crate::models::widen::widen_config(&narrow.unet_config, args.factor).map_err(in_config)?;
    let bytes = crate::io::weights_to_bytes(&narrow.unet)?;
    let tensors = crate::io::read_safetensors_bytes(&bytes, &unet_dir)?;
    let spec = WidenSpec {
        factor: args.factor,
        noise: args.noise,
        seed: args.seed,
    };
    let (config, wide) = widen(&narrow.unet_config, &tensors, spec).map_err(in_config)?;
    let algorithm = crate::sample::choose_algorithm(None, &narrow.scheduler);
    let params = |m: &crate::models::UNet| m.num_params() as f64 / 1e6;
    let before = (
        params(&narrow.unet),
        narrow.unet_config.block_out_channels.clone(),
    );
    let mut narrow = narrow;
    let (mut deviation, mut wide_params) = (0.0, 0.0);
    crate::io::write_dir_atomic(&args.out, |incoming| {
        let dir = incoming.join("unet");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::file(&dir, format!("cannot create: {e}")))?;
        let list: Vec<(&str, Vec<usize>, Vec<f32>)> = wide
            .iter()
            .map(|(n, t)| (n.as_str(), t.shape.clone(), t.data.clone()))
            .collect();
        let weights = dir.join(crate::io::WEIGHTS_NAME);
        crate::io::write_safetensors(&weights, &list)?;
        let unet = crate::io::load_weights(config.init(&device), &weights)?;
        deviation = output_deviation(&narrow, &unet, &device)?;
        wide_params = params(&unet);
        narrow.unet = unet;
        narrow.unet_config = config.clone();
        narrow.save(incoming, algorithm)
    })?;
    eprintln!(
        "wrote {} (UNet {:.2} M → {:.2} M parameters, channels {:?} → {:?}; the noise {} moved its output by {:.2e} of the largest value)",
        args.out.display(),
        before.0,
        wide_params,
        before.1,
        config.block_out_channels,
        args.noise,
        deviation,
    );
    Ok(())
}

/// max |wide − narrow| / max |narrow| of the two UNets' outputs on seeded noise at four
/// timesteps, conditioned as the pipeline would be (a zero context, the middle class, w = 4).
fn output_deviation(narrow: &Pipeline, wide: &crate::models::UNet, device: &Device) -> Result<f32> {
    let [c, h, w] = narrow.sample_shape()?;
    device.seed(0);
    let x = Tensor::<4>::random(
        [4, c, h, w],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        device,
    );
    let t = Tensor::<1>::from_floats([999.0, 700.0, 300.0, 20.0], device);
    let cfg = &narrow.unet_config;
    let cond = Conditioning {
        labels: narrow
            .unet
            .num_classes()
            .map(|k| Tensor::<1, Int>::full([4], (k / 2) as i64, device)),
        guidance: cfg
            .time_cond_proj_dim
            .map(|_| Tensor::<1>::full([4], 4.0, device)),
        context: cfg
            .cross_attention_dim
            .map(|d| Tensor::<3>::zeros([4, 8, d], device)),
        ..Conditioning::none()
    };
    let a = narrow.unet.forward(x.clone(), t.clone(), &cond);
    let b = wide.forward(x, t, &cond);
    let scale = a
        .clone()
        .abs()
        .max()
        .into_scalar::<f32>()
        .max(f32::MIN_POSITIVE);
    Ok((a - b).abs().max().into_scalar::<f32>() / scale)
}
