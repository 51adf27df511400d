//! `fewstep lora merge`: fold a LoRA file (PEFT/diffusers format) into a pipeline's UNet and write
//! the merged pipeline folder, with the scheduler the adapters were distilled for.

use std::path::PathBuf;

use super::DeviceArgs;
use crate::error::Result;
use crate::pipeline::Pipeline;

#[derive(Debug, clap::Subcommand)]
pub enum LoraCommand {
    /// Merge adapters into a pipeline and write the merged pipeline folder.
    Merge(MergeArgs),
}

#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The base pipeline folder the adapters were trained on.
    #[arg(long)]
    pub model: PathBuf,
    /// The LoRA file (`…lora_A.weight` / `…lora_B.weight`, α in `lora_adapter_metadata`).
    #[arg(long)]
    pub lora: PathBuf,
    /// Multiplier of the adapters' contribution.
    #[arg(long, value_parser = super::values::finite_f32, default_value_t = 1.0)]
    pub lora_scale: f32,
    /// Where to write the merged pipeline folder (must be absent or empty).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn merge(args: MergeArgs) -> Result<()> {
    crate::io::check_new_folder(&args.out, "--out")?;
    let device = args.device.device()?;
    let pipeline = Pipeline::load_with_lora(&args.model, &args.lora, args.lora_scale, &device)?;
    let algorithm = crate::sample::choose_algorithm(None, &pipeline.scheduler);
    crate::io::write_dir_atomic(&args.out, |incoming| pipeline.save(incoming, algorithm))?;
    eprintln!(
        "wrote {} ({} + {} at scale {})",
        args.out.display(),
        args.model.display(),
        args.lora.display(),
        args.lora_scale
    );
    Ok(())
}

pub fn run(command: LoraCommand) -> Result<()> {
    match command {
        LoraCommand::Merge(args) => merge(args),
    }
}
