//! UNet, VAE and whole-pipeline parity with diffusers, on the fixtures of
//! `tests/fixtures/make_model_fixtures.py` (random, perturbed weights saved by diffusers).

mod common;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use fewstep::io::{self, HostTensor};
use fewstep::noise::NoiseStream;
use fewstep::pipeline::{self, Pipeline};
use fewstep::sample::{DeviceSample, sample};
use fewstep_schedulers::{Algorithm, Scheduler};

fn device() -> Device {
    fewstep::backend::cpu_device().expect("a CPU backend is compiled in")
}

fn fixture(rel: &str) -> PathBuf {
    common::repo().join("tests/fixtures/models").join(rel)
}

fn io_tensors(dir: &Path) -> std::collections::HashMap<String, HostTensor> {
    io::read_safetensors(&dir.join("io.safetensors")).unwrap()
}

/// max |got − want| ≤ 1e-4 · max |want|.
fn assert_close(what: &str, got: Tensor<4>, want: &HostTensor) {
    assert_eq!(got.dims().to_vec(), want.shape, "{what}: shape");
    let got: Vec<f32> = got.into_data().try_to_vec().unwrap();
    let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(&want.data)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    assert!(
        diff <= 1e-4 * scale,
        "{what}: max |diff| {diff} > 1e-4 * {scale}"
    );
}

fn unet_matches(rel: &str) {
    let dev = device();
    let dir = fixture(rel);
    let (_, unet) = pipeline::load_unet(&dir, &dev).unwrap();
    let t = io_tensors(&dir);
    let x = t["x"].to_device::<4>(&dev).unwrap();
    let ts = t["t"].to_device::<1>(&dev).unwrap();
    let labels = t.get("labels").map(|l| {
        let ints: Vec<i64> = l.data.iter().map(|v| *v as i64).collect();
        Tensor::<1, Int>::from_ints(ints.as_slice(), &dev)
    });
    assert_close(
        rel,
        unet.forward(x, ts, &fewstep::models::Conditioning::labels(labels)),
        &t["out"],
    );
}

#[test]
fn unet_with_attention_matches_diffusers() {
    unet_matches("pipe_pixel/unet");
}

#[test]
fn unet_latent_matches_diffusers() {
    unet_matches("pipe_latent/unet");
}

#[test]
fn unet_without_attention_blocks_odd_channels_matches_diffusers() {
    // Three levels, 6/12/18 channels, 2 → 5 channels, one 18-wide mid attention head,
    // freq_shift 1, sin-then-cos, downsample_padding 0, centred input, mid scale 1.414.
    unet_matches("unet_plain_odd");
}

#[test]
fn class_conditional_unet_with_uneven_heads_matches_diffusers() {
    // attention_head_dim 5 on 8 and 12 channels: inner widths 5 and 10.
    unet_matches("unet_class");
}

#[test]
fn vae_encode_and_decode_match_diffusers() {
    let dev = device();
    let dir = fixture("pipe_latent/vae");
    let (_, vae) = pipeline::load_vae(&dir, &dev).unwrap();
    let t = io_tensors(&dir);
    let (mean, logvar) = vae.encode(t["x"].to_device::<4>(&dev).unwrap());
    assert_close("vae mean", mean, &t["mean"]);
    assert_close("vae logvar", logvar, &t["logvar"]);
    assert_close(
        "vae decode",
        vae.decode(t["z"].to_device::<4>(&dev).unwrap()),
        &t["decoded"],
    );
}

fn pipeline_matches(rel: &str) {
    let dev = device();
    let dir = fixture(rel);
    let pipeline = Pipeline::load(&dir, &dev).unwrap();
    let t = io_tensors(&dir);
    let latents = t["latents"].to_device::<4>(&dev).unwrap();
    let mut checked = 0;
    for (name, want) in &t {
        let Some((algo, steps)) = name.split_once('_') else {
            continue;
        };
        let algo = Algorithm::from_cli_name(algo).unwrap();
        let mut scheduler: Scheduler<DeviceSample> = pipeline.scheduler.build(Some(algo)).unwrap();
        scheduler.set_timesteps(steps.parse().unwrap()).unwrap();
        let got = sample(
            &pipeline,
            &mut scheduler,
            latents.clone(),
            None,
            None,
            &mut NoiseStream::new(0),
        )
        .unwrap();
        assert_close(&format!("{rel} {name}"), got, want);
        checked += 1;
    }
    assert_eq!(checked, 4, "ddim, euler, heun and dpmpp-2m fixtures");
}

#[test]
fn pixel_pipeline_sampling_matches_diffusers_for_every_deterministic_scheduler() {
    pipeline_matches("pipe_pixel");
}

#[test]
fn latent_pipeline_sampling_and_decode_match_diffusers() {
    pipeline_matches("pipe_latent");
}

#[test]
fn saved_pipeline_reloads_to_identical_outputs() {
    let dev = device();
    let pipeline = Pipeline::load(&fixture("pipe_latent"), &dev).unwrap();
    let out = std::env::temp_dir().join(format!("fewstep-roundtrip-{}", std::process::id()));
    pipeline.save(&out, Algorithm::Ddim).unwrap();
    let again = Pipeline::load(&out, &dev).unwrap();
    assert_eq!(again.unet_config, pipeline.unet_config);
    assert_eq!(
        again.scheduler.resolve(Algorithm::Ddim),
        pipeline.scheduler.resolve(Algorithm::Ddim)
    );
    let x = Tensor::<4>::ones([1, 4, 4, 4], &dev);
    let t = Tensor::<1>::from_floats([250.0], &dev);
    let a: Vec<f32> = pipeline
        .unet
        .forward(x.clone(), t.clone(), &fewstep::models::Conditioning::none())
        .into_data()
        .try_to_vec()
        .unwrap();
    let b: Vec<f32> = again
        .unet
        .forward(x, t, &fewstep::models::Conditioning::none())
        .into_data()
        .try_to_vec()
        .unwrap();
    assert_eq!(a, b, "weights survive save + load bit for bit");
    std::fs::remove_dir_all(&out).unwrap();
}
