//! The command line: clap derive, one file per subcommand, each a thin call into the library.

use clap::{Parser, Subcommand};

use crate::backend::{DeviceChoice, device};
use crate::error::Result;

pub mod sample;
pub mod train;

#[derive(Debug, Parser)]
#[command(
    name = "fewstep",
    version,
    about = "Few-step diffusion and GAN generation by distillation"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sample images from a diffusers pipeline folder.
    Sample(sample::SampleArgs),
    /// Train a diffusion model (a teacher) with checkpoints and resume.
    Train(train::TrainArgs),
}

/// `--device`, shared by every command that computes.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Where to compute: cpu (flex), flex, ndarray, wgpu, tch-cpu, cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl DeviceArgs {
    pub fn device(&self) -> Result<burn::prelude::Device> {
        device(DeviceChoice::parse(&self.device)?)
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Sample(args) => sample::run(args),
        Command::Train(args) => train::run(args),
    }
}
