//! `fewstep quantize`: post-training quantization of a pipeline's UNet or a GAN folder's generator
//! (int8 or 4-bit blocks, f16 scales; `models::quant`) — the baseline quantization-aware
//! distillation must beat.

use std::path::PathBuf;

use burn::prelude::*;

use super::DeviceArgs;
use crate::error::{Error, Result};
use crate::models::gan::folder;
use crate::models::quant::{QuantFormat, QuantizationConfig, weight_bytes};
use crate::pipeline::Pipeline;

#[derive(Debug, clap::Args)]
pub struct QuantizeArgs {
    /// The pipeline folder to quantize (its UNet; the VAE and text encoder stay as they are), or a
    /// GAN folder (its generator; the discriminator stays f32).
    #[arg(long)]
    pub model: PathBuf,
    /// Weight format: int8 or int4 (blocks of 32 weights with an f16 scale).
    #[arg(long)]
    pub format: String,
    /// Where to write the quantized pipeline folder (must be absent or empty).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let format = QuantFormat::parse(&args.format, "--format")?;
    crate::io::check_new_folder(&args.out, "--out")?;
    let device = args.device.device()?;
    if folder::is_gan(&args.model) {
        return quantize_gan(&args, format, &device);
    }
    let pipeline = Pipeline::load(&args.model, &device)?;
    let before = weight_bytes(&pipeline.unet);
    let pipeline = pipeline.quantized(format, &args.model)?;
    let algorithm = crate::sample::choose_algorithm(None, &pipeline.scheduler);
    crate::io::write_dir_atomic(&args.out, |incoming| pipeline.save(incoming, algorithm))?;
    let after = weight_bytes(&Pipeline::load(&args.out, &device)?.unet);
    report(&args, "UNet", format, before, after);
    Ok(())
}

fn report(args: &QuantizeArgs, what: &str, format: QuantFormat, before: usize, after: usize) {
    eprintln!(
        "wrote {} ({what} weights {} in memory: {:.2} MB f32 → {:.2} MB, {:.3}×)",
        args.out.display(),
        format.name(),
        before as f64 / 1e6,
        after as f64 / 1e6,
        after as f64 / before as f64
    );
}

fn quantize_gan(args: &QuantizeArgs, format: QuantFormat, device: &Device) -> Result<()> {
    let (mut gc, g) = folder::load_generator(&args.model, device)?;
    let (dc, d) = folder::load_discriminator(&args.model, device)?;
    if gc.quantization_config.is_some() {
        return Err(Error::file(
            &args.model,
            "the generator is already quantized (its config.json has a quantization_config)",
        ));
    }
    gc.quantization_config = Some(QuantizationConfig::new(format));
    let record = args.model.join("gan.json");
    crate::io::write_dir_atomic(&args.out, |incoming| {
        folder::save(incoming, (&gc, &g), (&dc, &d))?;
        let text = crate::io::read_text(&record)?;
        crate::io::write_atomic(&incoming.join("gan.json"), text.as_bytes())
    })?;
    let after = weight_bytes(&folder::load_generator(&args.out, device)?.1);
    report(args, "generator", format, weight_bytes(&g), after);
    Ok(())
}
