//! KD-GAN co-distillation through the library, in one page: train a small teacher GAN on the
//! `shapes` data, distill a quarter-width generator and a half-width discriminator from it, and
//! compare their sizes and samples.
//!
//! `cargo run --release --example kd_gan -- [OUT_DIR]` (a short budget: 200 teacher and 200
//! student iterations; the CLI's `fewstep train-gan` and `fewstep distill gan` are the full
//! jobs). OUT_DIR must be absent or empty.

use std::path::PathBuf;

use fewstep::data::DataSource;
use fewstep::distill::gan::{GanLoss, PixelDistance};
use fewstep::models::gan::{DiscriminatorConfig, GeneratorConfig, folder};
use fewstep::sample::{Generation, generate_gan};
use fewstep::train::gan::{
    GAN_RUN, GanMode, GanRun, GanTrainConfig, KD_GAN_RUN, KdWeights, train_gan,
};

fn main() -> fewstep::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "runs/example-kd-gan".into()),
    );
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    let optim = GanTrainConfig {
        iters: 200,
        batch: 32,
        lr_g: 2e-4,
        lr_d: 2e-4,
        // One D step per G step: SN-GAN's settings B/C.
        optimizer: fewstep::train::optim::OptimizerConfig::adam((0.5, 0.999)),
        loss: GanLoss::Hinge,
        ema_decay: Some(0.99),
        seed: 0,
        checkpoint_every: 100,
    };

    // The teacher: the ordinary adversarial game.
    let teacher_dir = out.join("teacher");
    let teacher = GanRun {
        kind: GAN_RUN.into(),
        mode: GanMode::Teacher {
            generator: GeneratorConfig::shapes32(),
            discriminator: DiscriminatorConfig::shapes32(),
        },
        config: optim.clone(),
        data: DataSource::Shapes { seed: 0 },
    };
    train_gan(&teacher_dir, Some(teacher), false, &device, false)?;

    // The students: output, feature and adversarial distillation for G_S; the real/fake task for
    // D_S (logit matching to the teacher's D is `logit` > 0: it hurt on `shapes`, see the README).
    let student_dir = out.join("student");
    let student = GanRun {
        kind: KD_GAN_RUN.into(),
        mode: GanMode::Distill {
            teacher: teacher_dir.canonicalize().expect("written above"),
            generator_width: 0.25,
            discriminator_width: 0.5,
            weights: KdWeights {
                output: 10.0,
                output_distance: PixelDistance::L1,
                feature: 1.0,
                perceptual: 0.0,
                adversarial: 1.0,
                logit: 0.0,
            },
            perceptual_net: None,
            quantize: None, // Some(QuantizeSpec { .. }): a quantization-aware student generator
            init: None,
        },
        config: optim,
        data: DataSource::Shapes { seed: 0 },
    };
    train_gan(&student_dir, Some(student), false, &device, false)?;

    let request = Generation::new(16, 16, 0);
    for dir in [&teacher_dir, &student_dir] {
        let (config, g) = folder::load_generator(dir, &device)?;
        let mut pixels = Vec::new();
        generate_gan(&g, config.latent_dim, &request, &device, |_, x| {
            pixels.extend(x.into_data().try_to_vec::<f32>().expect("f32"));
            Ok(())
        })?;
        let grid = dir.join("samples.png");
        fewstep::image_grid::write_grid(&grid, &pixels, 16, [3, 32, 32])?;
        println!(
            "{}: {} parameters, {:.1} M MACs per image; wrote {}",
            dir.display(),
            burn::module::Module::num_params(&g),
            config.macs_per_image() as f64 / 1e6,
            grid.display()
        );
    }
    Ok(())
}
