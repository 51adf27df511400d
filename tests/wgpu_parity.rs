//! CPU (flex) vs wgpu: the same weights give the same UNet forward and VAE decode, ≤ 1e-4
//! relative to the output's max. Runs where the `wgpu` feature is compiled in; CI runs it on
//! Mesa's software Vulkan driver (lavapipe). Forward only and tiny: the first wgpu call compiles
//! its kernels.
#![cfg(feature = "wgpu")]

use std::path::Path;

use burn::prelude::*;
use fewstep::backend::{DeviceChoice, device};
use fewstep::io;

fn max_rel_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
    let a: Vec<f32> = a.into_data().try_to_vec().unwrap();
    let b: Vec<f32> = b.into_data().try_to_vec().unwrap();
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn unet_forward_and_vae_decode_match_cpu_on_wgpu() {
    let cpu = device(DeviceChoice::Cpu).unwrap();
    let gpu = device(DeviceChoice::Wgpu).expect("a wgpu adapter (install mesa-vulkan-drivers)");
    let pipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/pipe_latent");
    let (_, unet_cpu) = io::load_unet(&pipe.join("unet"), &cpu).unwrap();
    let (_, unet_gpu) = io::load_unet(&pipe.join("unet"), &gpu).unwrap();
    let x = io::read_safetensors(&pipe.join("unet/io.safetensors")).unwrap();
    let (xs, ts) = (&x["x"], &x["t"]);
    let out_cpu = unet_cpu.forward(
        xs.to_device::<4>(&cpu).unwrap(),
        ts.to_device::<1>(&cpu).unwrap(),
        None,
    );
    let out_gpu = unet_gpu.forward(
        xs.to_device::<4>(&gpu).unwrap(),
        ts.to_device::<1>(&gpu).unwrap(),
        None,
    );
    let d = max_rel_diff(out_cpu, out_gpu);
    assert!(d <= 1e-4, "UNet: wgpu differs from CPU by {d} (relative)");

    let (_, vae_cpu) = io::load_vae(&pipe.join("vae"), &cpu).unwrap();
    let (_, vae_gpu) = io::load_vae(&pipe.join("vae"), &gpu).unwrap();
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
