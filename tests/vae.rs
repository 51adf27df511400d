//! `fewstep train-vae` on a tiny budget: a diffusers `vae/` folder with the measured scaling
//! factor, a report with PSNR and rFID, exact resume, and bad input as one clear line.

mod common;
use common::{
    assert_clean_failure, fewstep, interrupt_after_rows, max_weight_difference, ok, scratch,
};

use std::path::Path;

const VAE_WEIGHTS: &str = "vae/diffusion_pytorch_model.safetensors";

/// A two-block VAE (×2 downsampling) small enough for seconds of training.
fn tiny_config(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("tiny_vae.json");
    std::fs::write(
        &path,
        r#"{"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
            "latent_channels": 2, "layers_per_block": 1, "sample_size": 32}"#,
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn args<'a>(out: &'a Path, config: &'a str, iters: &'a str) -> Vec<&'a str> {
    vec![
        "train-vae",
        "--out",
        out.to_str().unwrap(),
        "--vae-config",
        config,
        "--iters",
        iters,
        "--batch",
        "4",
        "--checkpoint-every",
        "3",
        "--eval-images",
        "300",
        "--quiet",
    ]
}

#[test]
fn a_trained_vae_is_a_diffusers_folder_with_its_scaling_factor_and_report() {
    let out = scratch("vae", "trained");
    let config_dir = scratch("vae", "config-trained");
    let config = tiny_config(&config_dir);
    let o = fewstep(&args(&out, &config, "8"));
    ok(&o);
    let line = String::from_utf8_lossy(&o.stdout);
    assert!(line.contains("PSNR") && line.contains("rFID"), "{line}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("vae/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["_class_name"], "AutoencoderKL");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let r = &report["report"];
    // The written scaling factor is the measured one: 1 / std of the posterior samples.
    let scaling = cfg["scaling_factor"].as_f64().unwrap();
    assert!((scaling - r["scaling_factor"].as_f64().unwrap()).abs() < 1e-6);
    assert!((scaling * r["latent_std"].as_f64().unwrap() - 1.0).abs() < 1e-4);
    assert!(r["psnr"].as_f64().unwrap() > 5.0);
    // Eight steps do not make a good autoencoder: its rFID is far above the originals' floor.
    assert!(r["rfid"].as_f64().unwrap() > r["original_fid"].as_f64().unwrap());
    assert!(out.join(VAE_WEIGHTS).is_file());
}

#[test]
fn an_interrupted_run_resumes_to_the_uninterrupted_weights() {
    let config_dir = scratch("vae", "config-resume");
    let config = tiny_config(&config_dir);
    let whole = scratch("vae", "whole");
    ok(&fewstep(&args(&whole, &config, "9")));
    let split = scratch("vae", "split");
    interrupt_after_rows(&args(&split, &config, "9"), &split.join("loss.csv"), 4);
    let mut resume = args(&split, &config, "9");
    resume.push("--resume");
    ok(&fewstep(&resume));
    let max = max_weight_difference(&whole.join(VAE_WEIGHTS), &split.join(VAE_WEIGHTS));
    assert!(max < 1e-5, "{max}");
}

#[test]
fn bad_input_is_one_clear_line() {
    let out = scratch("vae", "bad");
    let o = out.to_str().unwrap();
    assert_clean_failure(
        fewstep(&["train-vae", "--out", o, "--kl-weight=-1"]),
        "--kl-weight",
    );
    assert_clean_failure(
        fewstep(&["train-vae", "--out", o, "--iters", "0"]),
        "--iters",
    );
    assert_clean_failure(
        fewstep(&["train-vae", "--out", o, "--data", "/no/such/folder"]),
        "--data",
    );
    assert_clean_failure(
        fewstep(&["train-vae", "--out", o, "--vae-config", "/no/such.json"]),
        "/no/such.json",
    );
    assert_clean_failure(
        fewstep(&["train-vae", "--out", o, "--resume"]),
        "no run to resume",
    );
    assert!(!out.exists(), "nothing written on bad input");
}

/// A tiny UNet for the tiny VAE's 16×16×2 latents.
fn tiny_latent_unet(dir: &Path) -> String {
    let path = dir.join("tiny_latent_unet.json");
    std::fs::write(
        &path,
        r#"{"_class_name": "UNet2DModel", "sample_size": 16, "in_channels": 2, "out_channels": 2,
            "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8}"#,
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_latent_teacher_trains_on_cached_latents_resumes_exactly_and_samples_through_its_vae() {
    let dir = scratch("vae", "latent");
    let config = tiny_config(&dir);
    let vae_run = dir.join("vae-run");
    ok(&fewstep(&args(&vae_run, &config, "2")));
    let unet = tiny_latent_unet(&dir);
    let train = |out: &Path| {
        vec![
            "train".to_string(),
            "--vae".into(),
            vae_run.to_str().unwrap().into(),
            "--model-config".into(),
            unet.clone(),
            "--latent-cache".into(),
            "40".into(),
            "--steps".into(),
            "8".into(),
            "--batch".into(),
            "4".into(),
            "--checkpoint-every".into(),
            "3".into(),
            "--quiet".into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ]
    };
    let whole = dir.join("whole");
    let a = train(&whole);
    ok(&fewstep(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    // The encoded dataset is cached in the run: 40 images of 2×16×16 latents.
    let cache = std::fs::read(whole.join("latent_cache.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(cache[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&cache[8..8 + header_len]).unwrap();
    assert_eq!(header["mean"]["shape"], serde_json::json!([40, 2, 16, 16]));
    let pipeline = whole.join("checkpoints/latest");
    assert!(
        pipeline.join("vae/config.json").is_file(),
        "the pipeline carries its VAE"
    );
    let grid = dir.join("grid.png");
    ok(&fewstep(&[
        "sample",
        "--model",
        pipeline.to_str().unwrap(),
        "--steps",
        "2",
        "--num",
        "2",
        "--out",
        grid.to_str().unwrap(),
    ]));
    assert!(grid.is_file());
    // Interrupted and resumed (the cache read back from disk): the same weights.
    let split = dir.join("split");
    let b = train(&split);
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    interrupt_after_rows(&b, &split.join("loss.csv"), 4);
    ok(&fewstep(&[
        "train",
        "--out",
        split.to_str().unwrap(),
        "--resume",
        "--quiet",
    ]));
    let weights = "checkpoints/latest/unet/diffusion_pytorch_model.safetensors";
    let max = max_weight_difference(&whole.join(weights), &split.join(weights));
    assert!(max < 1e-5, "{max}");
    // A UNet whose channels do not match the latents is refused before anything is written.
    let bad = dir.join("bad");
    assert_clean_failure(
        fewstep(&[
            "train",
            "--vae",
            vae_run.to_str().unwrap(),
            "--model-config",
            "tiny",
            "--out",
            bad.to_str().unwrap(),
        ]),
        "--model-config",
    );
    assert!(!bad.exists());
}

/// Batches are lowered to what a GPU's largest storage binding holds (lavapipe: 128 MiB), twice
/// as many images in f16; without a limit (CPU) the requested batch stands.
#[test]
fn batches_fit_the_largest_storage_binding() {
    use fewstep::backend::Precision;
    use fewstep::sample::fit_batch;
    let device = fewstep::backend::device(fewstep::backend::DeviceChoice::Cpu).unwrap();
    let pipeline =
        fewstep::pipeline::Pipeline::load(&fewstep::io::shipped("shapes-latent-lcm"), &device)
            .unwrap();
    let per_image = pipeline.peak_tensor_elements_per_image().unwrap();
    // The VAE decoder's last 3×3 convolution at 32×32 (16 channels, 32 across the upsampling).
    assert_eq!(per_image, 9 * 2 * 16 * 32 * 32);
    let limit = Some(128 * 1024 * 1024);
    let f32_fit = fit_batch(&pipeline, Precision::F32, 10_000, limit).unwrap();
    assert_eq!(f32_fit, 128 * 1024 * 1024 / (per_image * 4));
    assert_eq!(
        fit_batch(&pipeline, Precision::F16, 10_000, limit).unwrap(),
        2 * f32_fit + 1
    );
    assert_eq!(fit_batch(&pipeline, Precision::F32, 16, limit).unwrap(), 16);
    assert_eq!(
        fit_batch(&pipeline, Precision::F32, 16, Some(1)).unwrap(),
        1
    );
    assert_eq!(
        fit_batch(&pipeline, Precision::F32, 10_000, None).unwrap(),
        10_000
    );
}
