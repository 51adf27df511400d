//! An SD-1.5-size text-to-image pipeline with random weights (configs as SD-1.5's: UNet 860 M
//! parameters, CLIP ViT-L/14 text encoder 123 M, VAE 84 M; nothing downloaded): time of the text
//! encoder, of one UNet step, of the VAE decode and of a whole 4-step LCM image (LCM-LoRA style,
//! no classifier-free guidance), at 256² and (with `FEWSTEP_T2I_SIZES=256,512`) 512², f32 and f16,
//! on every compiled backend; with the estimated weight and peak activation memory.
//!
//! `cargo bench --bench text_to_image` (CPU), `cargo bench --features wgpu --bench text_to_image`
//! (adds wgpu when an adapter exists). One timed run per figure after one warm-up run (a UNet
//! step at 512² is minutes on 2 CPU cores): a table, not a criterion statistic.

use std::time::Instant;

use burn::prelude::*;
use fewstep::backend::{Precision, compiled_devices};
use fewstep::models::{ClipTextConfig, UNetConfig, VaeConfig};
use fewstep::pipeline::{Pipeline, TextEncoder};
use fewstep::sample::{DeviceSample, Generation, TextPrompts, generate};
use fewstep::text::ClipTokenizer;
use fewstep_schedulers::{Algorithm, Scheduler, SchedulerConfig};

fn sd15_unet() -> UNetConfig {
    UNetConfig::from_json_str(
        r#"{"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4,
            "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#,
    )
    .expect("SD-1.5 UNet config")
}

fn sd15_text() -> ClipTextConfig {
    ClipTextConfig::from_json_str(
        r#"{"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "quick_gelu"}"#,
    )
    .expect("CLIP ViT-L/14 text config")
}

fn sd15_vae() -> VaeConfig {
    VaeConfig::from_json_str(
        r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
            "norm_num_groups": 32, "sample_size": 512,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
    )
    .expect("SD-1.5 VAE config")
}

fn pipeline(device: &Device) -> Pipeline {
    let tokenizer_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/text_to_image/sd15/tokenizer");
    let (unet_config, text_config, vae_config) = (sd15_unet(), sd15_text(), sd15_vae());
    let scheduler = SchedulerConfig::from_json_str(
        r#"{"_class_name": "LCMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "set_alpha_to_one": false, "steps_offset": 1}"#,
    )
    .expect("LCM scheduler config");
    Pipeline {
        class_name: "StableDiffusionPipeline".into(),
        unet: unet_config.init(device),
        unet_config,
        scheduler,
        vae: Some((vae_config.clone(), vae_config.init(device))),
        text: Some(TextEncoder {
            tokenizer: ClipTokenizer::load(&tokenizer_dir).expect("fixture tokenizer"),
            model: text_config.init(device),
            config: text_config,
        }),
        vae_tiling: false,
    }
}

/// Seconds of `f` after one warm-up run.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let started = Instant::now();
    f();
    started.elapsed().as_secs_f64()
}

fn main() {
    let sizes: Vec<usize> = std::env::var("FEWSTEP_T2I_SIZES")
        .unwrap_or_else(|_| "256".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let unet = sd15_unet();
    println!(
        "SD-1.5-size pipeline: UNet {:.0} M weights ({:.2} GB f32 / {:.2} GB f16), text encoder {:.0} M, VAE {:.0} M",
        unet.param_count() / 1e6,
        unet.param_count() * 4.0 / 1e9,
        unet.param_count() * 2.0 / 1e9,
        sd15_text().param_count() / 1e6,
        sd15_vae().param_count() / 1e6,
    );
    println!(
        "| backend | precision | size | text encoder | UNet step | VAE decode | 4-step LCM image | UNet peak tensor |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, device) in compiled_devices() {
        for precision in [Precision::F32, Precision::F16] {
            if precision.check(&device, name).is_err() {
                continue;
            }
            let p = pipeline(&device).with_precision(precision);
            for &size in &sizes {
                let latent = size / 8;
                let prompts = vec!["a photograph of an astronaut riding a horse".to_string()];
                let text = p.text.as_ref().unwrap();
                let t_text = time(|| {
                    let e = text.encode(&prompts, 0, &device).unwrap();
                    let _ = e.into_data();
                });
                let context = text.encode(&prompts, 0, &device).unwrap();
                let x = Tensor::<4>::zeros([1, 4, latent, latent], &device);
                let t = Tensor::<1>::full([1], 500.0, &device);
                let cond = fewstep::models::Conditioning::text(context);
                let t_unet = time(|| {
                    let _ = p.unet.forward(x.clone(), t.clone(), &cond).into_data();
                });
                let (_, vae) = p.vae.as_ref().unwrap();
                let t_vae = time(|| {
                    let _ = vae.decode(x.clone()).into_data();
                });
                let request_text = TextPrompts {
                    prompts: prompts.clone(),
                    negative: vec![],
                    per_prompt: 1,
                    guidance_scale: 1.0,
                    clip_skip: 0,
                    height: Some(size),
                    width: Some(size),
                };
                let request = Generation {
                    text: Some(&request_text),
                    ..Generation::new(1, 1, 0)
                };
                let t_image = time(|| {
                    let mut scheduler: Scheduler<DeviceSample> =
                        p.scheduler.build(Some(Algorithm::Lcm)).unwrap();
                    generate(&p, &mut scheduler, 4, &request, &device, |_, x| {
                        let _ = x.into_data();
                        Ok(())
                    })
                    .unwrap();
                });
                let peak = unet.peak_tensor_elements(latent) as f64 * 4.0 / 1e9;
                println!(
                    "| {} | {} | {size}² | {t_text:.3} s | {t_unet:.2} s | {t_vae:.2} s | {t_image:.2} s | {peak:.2} GB |",
                    name,
                    precision.name(),
                );
            }
        }
    }
}
