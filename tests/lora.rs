//! LoRA interchange against PEFT + diffusers (fixture: tests/fixtures/make_lora_fixture.py):
//! fewstep's merge of its own LCM-LoRA file reproduces the PEFT-adapted diffusers UNet,
//! `fewstep sample --lora` and `fewstep lora merge` use it, and bad files are one clear line.

mod common;
use common::{
    assert_clean_failure, distill_tiny_lora, fewstep, max_weight_difference, ok, scratch,
};

use std::path::{Path, PathBuf};

use burn::prelude::*;
use fewstep::io;
use fewstep::pipeline::Pipeline;
use fewstep_schedulers::Algorithm;

fn fixtures() -> PathBuf {
    common::repo().join("tests/fixtures/models")
}

fn run_unet(p: &Pipeline, io: &std::collections::HashMap<String, io::HostTensor>) -> Vec<f32> {
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    let x: Tensor<4> = io["x"].to_device(&device).unwrap();
    let t: Tensor<1> = io["t"].to_device(&device).unwrap();
    p.unet
        .forward(x, t, &fewstep::models::Conditioning::none())
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn the_merged_lora_matches_peft_on_diffusers() {
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    let io = io::read_safetensors(&fixtures().join("lora/io.safetensors")).unwrap();
    let lora = fixtures().join("lora/lora.safetensors");
    let p = Pipeline::load_with_lora(&fixtures().join("pipe_pixel"), &lora, 1.0, &device).unwrap();
    let got = run_unet(&p, &io);
    let want = &io["out_lora"].data;
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
    let err = max_diff(&got, want);
    assert!(err <= 1e-4 * scale, "{err}");
    // The adapters change the output (so the comparison above means something), and the file
    // brought its LCM scheduler.
    assert!(max_diff(&got, &io["out_base"].data) > 100.0 * err.max(1e-5));
    assert_eq!(p.scheduler.class, Some(Algorithm::Lcm));
    // Scale 0 is the base model.
    let base =
        Pipeline::load_with_lora(&fixtures().join("pipe_pixel"), &lora, 0.0, &device).unwrap();
    assert!(max_diff(&run_unet(&base, &io), &io["out_base"].data) <= 1e-4 * scale);
}

#[test]
fn sample_and_merge_apply_the_adapters() {
    let base = fixtures().join("pipe_pixel");
    let lora = fixtures().join("lora/lora.safetensors");
    let out = scratch("lora", "merge");
    let o = fewstep(&[
        "sample",
        "--model",
        base.to_str().unwrap(),
        "--lora",
        lora.to_str().unwrap(),
        "--steps",
        "2",
        "--num",
        "2",
        "--out",
        scratch("lora", "grid.png").to_str().unwrap(),
    ]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("with lcm in 2 steps"), "{err}");

    ok(&fewstep(&[
        "lora",
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--lora",
        lora.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    let merged = Pipeline::load(
        &out,
        &fewstep::backend::cpu_device().expect("a CPU backend is compiled in"),
    )
    .unwrap();
    assert_eq!(merged.scheduler.class, Some(Algorithm::Lcm));
    let io = io::read_safetensors(&fixtures().join("lora/io.safetensors")).unwrap();
    let err = max_diff(&run_unet(&merged, &io), &io["out_lora"].data);
    assert!(err < 1e-4, "{err}");
    // A second merge into the same folder is refused; nothing is harmed.
    let o = fewstep(&[
        "lora",
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--lora",
        lora.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(o, "--out already holds files");
    assert!(
        Pipeline::load(
            &out,
            &fewstep::backend::cpu_device().expect("a CPU backend is compiled in")
        )
        .is_ok()
    );
}

#[test]
fn bad_lora_files_are_one_clear_line() {
    let pixel = fixtures().join("pipe_pixel");
    let other = common::repo().join("weights/shapes32");
    let lora = fixtures().join("lora/lora.safetensors");
    let grid = scratch("lora", "bad.png");
    let sample = |model: &Path, file: &Path| {
        fewstep(&[
            "sample",
            "--model",
            model.to_str().unwrap(),
            "--lora",
            file.to_str().unwrap(),
            "--num",
            "1",
            "--out",
            grid.to_str().unwrap(),
        ])
    };
    // Not a LoRA file: the UNet's own weights.
    assert_clean_failure(
        sample(
            &pixel,
            &pixel.join("unet/diffusion_pytorch_model.safetensors"),
        ),
        "not a LoRA factor",
    );
    // A LoRA for another base model.
    assert_clean_failure(sample(&other, &lora), "does not match the model");
    assert_clean_failure(
        sample(&pixel, Path::new("/no/lora.safetensors")),
        "not found",
    );
    assert!(!grid.exists());
}

#[test]
fn lcm_lora_distillation_writes_adapters_that_merge_to_the_student() {
    let teacher = fixtures().join("pipe_pixel");
    let out = scratch("lora", "distill");
    ok(&distill_tiny_lora(&teacher, &out, &["--iters", "4"]));
    // Attention-only adapters, and the merged student folder equals base + adapters.
    let names = io::read_safetensors(&out.join("lora.safetensors")).unwrap();
    assert!(
        names.keys().all(|k| k.contains(".to_")),
        "{:?}",
        names.keys()
    );
    let merged = scratch("lora", "distill-merged");
    ok(&fewstep(&[
        "lora",
        "merge",
        "--model",
        teacher.to_str().unwrap(),
        "--lora",
        out.join("lora.safetensors").to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]));
    let w = "unet/diffusion_pytorch_model.safetensors";
    assert!(max_weight_difference(&merged.join(w), &out.join("student").join(w)) < 1e-5);
    // The frozen teacher weights outside the adapted layers did not move.
    let student = io::read_safetensors(&out.join("student").join(w)).unwrap();
    let base = io::read_safetensors(&teacher.join(w)).unwrap();
    for (k, t) in &base {
        if !k.contains(".to_") {
            assert_eq!(t.data, student[k].data, "{k} moved");
        }
    }
    assert!(base.iter().any(|(k, t)| t.data != student[k].data));
    assert_clean_failure(
        fewstep(&[
            "distill",
            "consistency",
            "--teacher",
            teacher.to_str().unwrap(),
            "--out",
            scratch("lora", "bad-rank").to_str().unwrap(),
            "--lora-rank",
            "0",
            "--no-eval",
        ]),
        "--lora-rank",
    );
}
