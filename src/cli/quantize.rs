//! `fewstep quantize`: post-training quantization of a pipeline's UNet (int8 or 4-bit blocks,
//! f16 scales; `models::quant`) — the baseline quantization-aware distillation must beat.

use std::path::PathBuf;

use super::DeviceArgs;
use crate::error::Result;
use crate::models::quant::{QuantFormat, weight_bytes};
use crate::pipeline::Pipeline;

#[derive(Debug, clap::Args)]
pub struct QuantizeArgs {
    /// The pipeline folder to quantize (its UNet; the VAE and text encoder stay as they are).
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
    let pipeline = Pipeline::load(&args.model, &device)?;
    let before = weight_bytes(&pipeline.unet);
    let pipeline = pipeline.quantized(format, &args.model)?;
    let algorithm = crate::sample::choose_algorithm(None, &pipeline.scheduler);
    crate::io::write_dir_atomic(&args.out, |incoming| pipeline.save(incoming, algorithm))?;
    let after = weight_bytes(&Pipeline::load(&args.out, &device)?.unet);
    eprintln!(
        "wrote {} (UNet weights {} in memory: {:.2} MB f32 → {:.2} MB, {:.3}×)",
        args.out.display(),
        format.name(),
        before as f64 / 1e6,
        after as f64 / 1e6,
        after as f64 / before as f64
    );
    Ok(())
}
