//! CPU (flex) vs wgpu: the same weights give the same UNet forward and VAE decode, ≤ 1e-4
//! relative to the output's max, and the shipped latent student the same images (≤ 1e-3). Runs where the `wgpu` feature is compiled in; CI runs it on
//! Mesa's software Vulkan driver (lavapipe). Forward only and tiny: the first wgpu call compiles
//! its kernels.
#![cfg(feature = "wgpu")]

mod common;

use burn::prelude::*;
use fewstep::backend::{DeviceChoice, Precision, device};
use fewstep::io;
use fewstep::models::Conditioning;
use fewstep::pipeline::{self, Pipeline};
use fewstep::sample::{Generation, generate_images};
use fewstep_schedulers::Algorithm;

fn max_rel_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
    let a: Vec<f32> = a.into_data().try_to_vec().unwrap();
    let b: Vec<f32> = b.into_data().try_to_vec().unwrap();
    relative_and_mean_diff(&a, &b).0
}

#[test]
fn unet_forward_and_vae_decode_match_cpu_on_wgpu() {
    let cpu = device(DeviceChoice::Cpu).unwrap();
    let gpu = device(DeviceChoice::Wgpu).expect("a wgpu adapter (install mesa-vulkan-drivers)");
    let pipe = common::repo().join("tests/fixtures/models/pipe_latent");
    let (_, unet_cpu) = pipeline::load_unet(&pipe.join("unet"), &cpu).unwrap();
    let (_, unet_gpu) = pipeline::load_unet(&pipe.join("unet"), &gpu).unwrap();
    let x = io::read_safetensors(&pipe.join("unet/io.safetensors")).unwrap();
    let (xs, ts) = (&x["x"], &x["t"]);
    let out_cpu = unet_cpu.forward(
        xs.to_device::<4>(&cpu).unwrap(),
        ts.to_device::<1>(&cpu).unwrap(),
        &Conditioning::none(),
    );
    let out_gpu = unet_gpu.forward(
        xs.to_device::<4>(&gpu).unwrap(),
        ts.to_device::<1>(&gpu).unwrap(),
        &Conditioning::none(),
    );
    let d = max_rel_diff(out_cpu, out_gpu);
    assert!(d <= 1e-4, "UNet: wgpu differs from CPU by {d} (relative)");

    let (_, vae_cpu) = pipeline::load_vae(&pipe.join("vae"), &cpu).unwrap();
    let (_, vae_gpu) = pipeline::load_vae(&pipe.join("vae"), &gpu).unwrap();
    let z = io::read_safetensors(&pipe.join("vae/io.safetensors")).unwrap()["z"].clone();
    let d = max_rel_diff(
        vae_cpu.decode(z.to_device::<4>(&cpu).unwrap()),
        vae_gpu.decode(z.to_device::<4>(&gpu).unwrap()),
    );
    assert!(
        d <= 1e-4,
        "VAE decode: wgpu differs from CPU by {d} (relative)"
    );
}

/// A 4-bit UNet folder: packed codes dequantized by tensor ops on wgpu (bit shifts of i32 words),
/// in one host pass on the CPU — the same weights, the same forward.
#[test]
fn quantized_unet_matches_cpu_on_wgpu() {
    use fewstep::models::quant::{QuantFormat, QuantizationConfig, is_packed};
    let cpu = device(DeviceChoice::Cpu).unwrap();
    let gpu = device(DeviceChoice::Wgpu).expect("a wgpu adapter (install mesa-vulkan-drivers)");
    let pipe = common::repo().join("tests/fixtures/models/pipe_latent");
    let (mut config, unet) = pipeline::load_unet(&pipe.join("unet"), &cpu).unwrap();
    config.quantization_config = Some(QuantizationConfig::new(QuantFormat::Int4));
    let dir = common::scratch("wgpu", "unet-int4");
    std::fs::create_dir_all(&dir).unwrap();
    pipeline::save_unet(&dir, &config, &unet).unwrap();
    let (_, unet_cpu) = pipeline::load_unet(&dir, &cpu).unwrap();
    let (_, unet_gpu) = pipeline::load_unet(&dir, &gpu).unwrap();
    assert!(is_packed(&unet_gpu));
    let x = io::read_safetensors(&pipe.join("unet/io.safetensors")).unwrap();
    let (xs, ts) = (&x["x"], &x["t"]);
    let d = max_rel_diff(
        unet_cpu.forward(
            xs.to_device::<4>(&cpu).unwrap(),
            ts.to_device::<1>(&cpu).unwrap(),
            &Conditioning::none(),
        ),
        unet_gpu.forward(
            xs.to_device::<4>(&gpu).unwrap(),
            ts.to_device::<1>(&gpu).unwrap(),
            &Conditioning::none(),
        ),
    );
    assert!(
        d <= 1e-4,
        "int4 UNet: wgpu differs from CPU by {d} (relative)"
    );
}

fn shipped_latent_student_images(device: &Device, precision: Precision) -> Vec<f32> {
    let student = Pipeline::load(&io::shipped("shapes-latent-lcm"), device)
        .unwrap()
        .with_precision(precision);
    let request = Generation::new(2, 2, 3);
    // Two LCM steps: UNet, scheduler (with the injected noise of the second step) and VAE decode.
    generate_images(&student, Algorithm::Lcm, 2, &request, device)
        .unwrap()
        .0
}

fn relative_and_mean_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let max = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let mean = a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    (max / scale, mean)
}

/// The shipped latent pipeline (`weights/shapes-latent-lcm`) generates the same images on wgpu
/// as on the CPU: ≤ 1e-3 relative in f32. In f16 (where the adapter has `shader-f16`) the
/// images stay within 5e-2 relative and 5e-3 mean absolute of the f32 ones (measured on
/// lavapipe: 1.4e-2 and 8e-4).
#[test]
fn shipped_latent_pipeline_matches_cpu_on_wgpu() {
    let cpu = device(DeviceChoice::Cpu).unwrap();
    let gpu = device(DeviceChoice::Wgpu).expect("a wgpu adapter (install mesa-vulkan-drivers)");
    let on_cpu = shipped_latent_student_images(&cpu, Precision::F32);
    let on_gpu = shipped_latent_student_images(&gpu, Precision::F32);
    let (rel, _) = relative_and_mean_diff(&on_cpu, &on_gpu);
    assert!(
        rel <= 1e-3,
        "f32: wgpu differs from CPU by {rel} (relative)"
    );

    if gpu.supports_dtype(burn::tensor::DType::F16) {
        let half = shipped_latent_student_images(&gpu, Precision::F16);
        let (rel, mean) = relative_and_mean_diff(&on_cpu, &half);
        assert!(
            rel <= 5e-2 && mean <= 5e-3,
            "f16 on wgpu: {rel} relative, {mean} mean absolute from f32"
        );
    }
}

/// The whole text-to-image generation (tokenizer, text encoder, UNet2DConditionModel with
/// classifier-free guidance, scheduler, VAE decode) of the tiny SD-1.5-layout fixture on wgpu
/// matches the CPU: ≤ 1e-3 relative in f32; in f16 (where the adapter has `shader-f16`) within
/// 1e-1 relative and 3e-2 mean absolute (measured on lavapipe: 4.9e-2 and 1.5e-2 — guidance at
/// 7.5 multiplies f16's rounding of the conditional − unconditional difference).
#[test]
fn text_to_image_generation_matches_cpu_on_wgpu() {
    use fewstep::sample::{DeviceSample, TextPrompts, generate};
    let images = |device: &Device, precision: Precision| {
        let dir = common::repo().join("tests/fixtures/text_to_image/sd15");
        let pipeline = Pipeline::load(&dir, device)
            .unwrap()
            .with_precision(precision);
        let text = TextPrompts {
            prompts: vec!["a red circle".into(), "two blue squares".into()],
            negative: vec!["blurry".into()],
            per_prompt: 1,
            guidance_scale: 7.5,
            clip_skip: 0,
            height: None,
            width: None,
        };
        let request = Generation {
            text: Some(&text),
            ..Generation::new(2, 2, 5)
        };
        let mut scheduler: fewstep_schedulers::Scheduler<DeviceSample> =
            pipeline.scheduler.build(Some(Algorithm::Ddim)).unwrap();
        let mut out = Vec::new();
        generate(&pipeline, &mut scheduler, 2, &request, device, |_, x| {
            out.extend(x.into_data().try_to_vec::<f32>().unwrap());
            Ok(())
        })
        .unwrap();
        out
    };
    let cpu = device(DeviceChoice::Cpu).unwrap();
    let gpu = device(DeviceChoice::Wgpu).expect("a wgpu adapter (install mesa-vulkan-drivers)");
    let on_cpu = images(&cpu, Precision::F32);
    let (rel, _) = relative_and_mean_diff(&on_cpu, &images(&gpu, Precision::F32));
    eprintln!("text to image, f32 on wgpu vs CPU: {rel:.2e} relative");
    assert!(
        rel <= 1e-3,
        "f32: wgpu differs from CPU by {rel} (relative)"
    );
    if gpu.supports_dtype(burn::tensor::DType::F16) {
        let (rel, mean) = relative_and_mean_diff(&on_cpu, &images(&gpu, Precision::F16));
        eprintln!("text to image, f16 on wgpu vs f32 CPU: {rel:.2e} relative, {mean:.2e} mean");
        assert!(
            rel <= 1e-1 && mean <= 3e-2,
            "f16 on wgpu: {rel} relative, {mean} mean absolute from f32"
        );
    }
}
