//! `fewstep train-features`: train the `shapes` feature network used by `eval --features shapes`.

use std::path::PathBuf;

use super::DeviceArgs;
use crate::error::{Error, Result};
use crate::models::FeatureNetConfig;
use crate::models::feature_net::Heads;
use crate::train::feature_net::{self, FeatureNetTrainConfig};

#[derive(Debug, clap::Args)]
pub struct TrainFeaturesArgs {
    /// Output folder (config.json, diffusion_pytorch_model.safetensors, report.json).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_parser = super::values::count, default_value_t = 3000)]
    pub steps: usize,
    #[arg(long, value_parser = super::values::count, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, value_parser = super::values::positive_f64, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub seed: u64,
    /// Seed of the `shapes` images.
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub data_seed: u64,
    /// Held-out images for the reported accuracy.
    #[arg(long, value_parser = super::values::count, default_value_t = 5000)]
    pub test_images: usize,
    /// What the heads predict: the `shapes` labels (the FID feature network) or the
    /// `shapes-text` attributes (the prompt-adherence classifier: count of each colour–kind
    /// pair, relative position of two shapes).
    #[arg(long, value_parser = ["labels", "attributes"], default_value = "labels")]
    pub heads: String,
    /// Start from this feature network's trunk (e.g. weights/shapes-features), heads new.
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[command(flatten)]
    pub optimizer: super::OptimizerArgs,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: TrainFeaturesArgs) -> Result<()> {
    if args.batch == 0 || args.steps == 0 || args.test_images == 0 {
        return Err(Error::Usage(
            "--batch, --steps and --test-images must be at least 1".into(),
        ));
    }
    let device = args.device.device()?;
    let cfg = FeatureNetTrainConfig {
        steps: args.steps,
        batch: args.batch,
        lr: args.lr,
        seed: args.seed,
        data_seed: args.data_seed,
        test_images: args.test_images,
        optimizer: args
            .optimizer
            .config(crate::train::optim::OptimizerConfig::adamw(1e-4, None))?,
        init: args.init,
    };
    let config = FeatureNetConfig {
        heads: if args.heads == "attributes" {
            Heads::Attributes
        } else {
            Heads::Labels
        },
        ..FeatureNetConfig::shapes32()
    };
    let acc = feature_net::train_feature_net(&args.out, &config, &cfg, &device, args.quiet)?;
    println!("{acc}");
    Ok(())
}
