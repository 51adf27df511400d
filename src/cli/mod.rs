//! The command line: clap derive, one file per subcommand, each a thin call into the library.

use clap::{Parser, Subcommand};

use crate::backend::{DeviceChoice, describe, device};
use crate::error::Result;

pub mod distill;
pub mod eval;
pub mod gan;
pub mod lora;
pub mod sample;
pub mod train;
pub mod train_features;
pub mod train_vae;

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
    /// Distill a teacher into a few-step student.
    #[command(subcommand)]
    Distill(distill::DistillCommand),
    /// Measure sample quality: FID/KID/precision/recall, and FID-versus-steps curves.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Train a GAN teacher (DCGAN generator, spectrally normalised discriminator).
    TrainGan(gan::TrainGanArgs),
    /// Train the `shapes` feature network (the in-domain FID extractor).
    TrainFeatures(train_features::TrainFeaturesArgs),
    /// Train an AutoencoderKL (the latent space of latent diffusion) with checkpoints and resume.
    TrainVae(train_vae::TrainVaeArgs),
    /// Low-rank adapters: merge a LoRA file into a pipeline.
    #[command(subcommand)]
    Lora(lora::LoraCommand),
}

/// `--device`, shared by every command that computes.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Where to compute: cpu (flex), flex, ndarray, wgpu, tch-cpu, cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print what the device is: the wgpu adapter's name, graphics backend (Vulkan, Metal, DX12),
    /// driver and limits, or the CPU backend; and whether it computes in f16.
    #[arg(short, long)]
    pub verbose: bool,
}

/// `--devices`: data-parallel training (train and distill commands).
#[derive(Debug, clap::Args)]
pub struct DataParallelArgs {
    /// Data-parallel training: a count N (N replicas of --device: worker threads sharing the
    /// cores on a CPU backend, GPUs 0..N for cuda and wgpu) or a list such as `cuda:0,cuda:1`
    /// (the first device is the main one; a list overrides --device). --batch is the global
    /// batch, split evenly; the result is that of one device up to float rounding.
    #[arg(long, default_value = "1")]
    pub devices: String,
}

impl DataParallelArgs {
    /// The devices to train on; the first is where models, optimiser and data live.
    pub fn devices(&self, device: &DeviceArgs) -> Result<Vec<burn::prelude::Device>> {
        let devices = crate::backend::data_parallel_devices(&self.devices, device.choice()?)?;
        if device.verbose {
            if self.devices.trim().parse::<usize>().is_ok() {
                // N replicas of --device: describe it.
                device.device()?;
            }
            let names: Vec<String> = devices.iter().map(|d| format!("{d:?}")).collect();
            eprintln!(
                "data parallel over {} device(s): {}",
                names.len(),
                names.join(", ")
            );
        }
        Ok(devices)
    }
}

impl DeviceArgs {
    pub fn choice(&self) -> Result<DeviceChoice> {
        DeviceChoice::parse(&self.device)
    }

    pub fn device(&self) -> Result<burn::prelude::Device> {
        let choice = self.choice()?;
        let device = device(choice)?;
        if self.verbose {
            eprintln!("{}", describe(choice, &device));
        }
        Ok(device)
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Sample(args) => sample::run(args),
        Command::Train(args) => train::run(args),
        Command::Distill(command) => distill::run(command),
        Command::Eval(command) => eval::run(command),
        Command::TrainFeatures(args) => train_features::run(args),
        Command::Lora(command) => lora::run(command),
        Command::TrainGan(args) => gan::run_train(args),
        Command::TrainVae(args) => train_vae::run(args),
    }
}
