//! `fewstep train-vae`: train an `AutoencoderKL` (32×32×3 → 8×8×4 by default) for latent
//! diffusion, with checkpoints and resume; writes a diffusers `vae/` folder and `report.json`
//! (PSNR, rFID, the scaling factor).

use std::path::PathBuf;

use super::DeviceArgs;
use super::gan::DistanceArg;
use crate::data::DataSource;
use crate::distill::gan::PixelDistance;
use crate::error::{Error, Result};
use crate::io;
use crate::models::VaeConfig;
use crate::pipeline;
use crate::train::vae::{self, VAE_RUN, VaeRun, VaeTrainConfig};

#[derive(Debug, clap::Args)]
pub struct TrainVaeArgs {
    /// Training images: `shapes` or a folder of png/jpeg/webp images.
    #[arg(long, default_value = "shapes")]
    pub data: String,
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub data_seed: u64,
    /// A diffusers AutoencoderKL config.json (default: the `shapes` VAE, 16-32-64 channels,
    /// ×4 downsampling to 4 latent channels).
    #[arg(long)]
    pub vae_config: Option<PathBuf>,
    #[arg(long, value_parser = super::values::count, default_value_t = 3000)]
    pub iters: usize,
    #[arg(long, value_parser = super::values::count, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, value_parser = super::values::positive_f64, default_value_t = 5e-4)]
    pub lr: f64,
    /// Reconstruction distance, summed over pixels.
    #[arg(long, value_enum, default_value = "l1")]
    pub reconstruction: DistanceArg,
    /// β of the KL term (summed over latent elements; LDM's autoencoders use 1e-6).
    #[arg(long, value_parser = super::values::non_negative_f64, default_value_t = 1e-6)]
    pub kl_weight: f64,
    /// Weight of a perceptual term: squared distance in the `shapes` feature network's features.
    #[arg(long, value_parser = super::values::non_negative_f64, default_value_t = 0.0)]
    pub perceptual: f64,
    /// The `shapes` feature network (perceptual term and rFID; default: the shipped one).
    #[arg(long)]
    pub feature_weights: Option<PathBuf>,
    /// Held-out images for PSNR, rFID and the scaling factor.
    #[arg(long, value_parser = super::values::count, default_value_t = 1000)]
    pub eval_images: usize,
    #[arg(long, value_parser = super::values::seed, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_parser = super::values::count, default_value_t = 250)]
    pub checkpoint_every: usize,
    /// Continue the run in --out (its stored settings win).
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub optimizer: super::OptimizerArgs,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The run folder (vae/, report.json, checkpoints, loss.csv).
    #[arg(long, default_value = "runs/vae")]
    pub out: PathBuf,
}

fn new_run(args: &TrainVaeArgs) -> Result<VaeRun> {
    let vae = match &args.vae_config {
        Some(path) => {
            VaeConfig::from_json_str(&io::read_text(path)?).map_err(|e| e.in_file(path))?
        }
        None => vae::shapes32_config(),
    };
    let feature_net = args
        .feature_weights
        .clone()
        .unwrap_or_else(|| io::shipped(crate::metrics::features::SHAPES_FEATURES));
    let config = VaeTrainConfig {
        iters: args.iters,
        batch: args.batch,
        lr: args.lr,
        reconstruction: match args.reconstruction {
            DistanceArg::L1 => PixelDistance::L1,
            DistanceArg::Mse => PixelDistance::Mse,
        },
        kl_weight: args.kl_weight,
        perceptual_weight: args.perceptual,
        seed: args.seed,
        checkpoint_every: args.checkpoint_every,
        eval_images: args.eval_images,
        optimizer: args
            .optimizer
            .config(crate::train::optim::OptimizerConfig::adam((0.9, 0.999)))?,
    };
    config.validate()?;
    crate::models::footprint::check_vae(
        &vae,
        args.vae_config
            .as_deref()
            .unwrap_or(std::path::Path::new("the default autoencoder")),
        None,
        crate::models::footprint::Use::Training { batch: args.batch },
    )?;
    Ok(VaeRun {
        kind: VAE_RUN.into(),
        vae,
        config,
        data: DataSource::from_flag(&args.data, args.data_seed)?,
        feature_net: feature_net.canonicalize().map_err(|_| {
            Error::file(
                &feature_net,
                "--feature-weights: not found (the `shapes` feature network, written by `fewstep train-features`)",
            )
        })?,
    })
}

pub fn run(args: TrainVaeArgs) -> Result<()> {
    let device = args.device.device()?;
    let run = if args.resume {
        super::warn_flags_on_resume(&[]);
        None
    } else {
        Some(new_run(&args)?)
    };
    crate::train::install_interrupt_handler();
    match vae::train_vae(&args.out, run, args.resume, &device, args.quiet)? {
        None => eprintln!(
            "interrupted; resume with the same command and --resume (--out {})",
            args.out.display()
        ),
        Some(r) => println!(
            "{}: PSNR {:.2} dB, rFID {:.2} (originals {:.2}) on {} held-out images, scaling_factor {:.5}, {:.0} s",
            args.out.join(pipeline::VAE_DIR).display(),
            r.psnr,
            r.rfid,
            r.original_fid,
            r.eval_images,
            r.scaling_factor,
            r.seconds
        ),
    }
    Ok(())
}
