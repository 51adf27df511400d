//! The FID Inception-v3 against pytorch-fid (fixture: tests/fixtures/make_inception_fixture.py,
//! closed-formula weights, no download), the pickle-free `.pth` reader, and its errors.

mod common;
use common::assert_clean_failure;

use std::path::PathBuf;

use burn::prelude::*;
use fewstep::io;
use fewstep::models::inception::{FID_WEIGHTS_FILE, FidInception, read_weights};

fn fixture(name: &str) -> PathBuf {
    common::repo().join("tests/fixtures/inception").join(name)
}

#[test]
fn pool3_features_match_pytorch_fid() {
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    let io = io::read_safetensors(&fixture("io.safetensors")).unwrap();
    let images: Tensor<4> = io["images"].to_device(&device).unwrap();
    let got = FidInception::formula_weights(&device)
        .features(images)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let want = &io["features"].data;
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("max |Δ| {err} vs max |feature| {scale}");
    assert!(
        err <= 1e-4 * scale,
        "max |Δ| {err} vs max |feature| {scale}"
    );
}

#[test]
fn the_pth_reader_gets_tensors_without_running_pickle() {
    let t = read_weights(&fixture("conv1a.pth")).unwrap();
    let w = &t["Conv2d_1a_3x3.bn.weight"];
    assert_eq!(w.shape, vec![32]);
    // The fixture's formula: 1 + 0.1·sin(0.7·i + 2πh), h = (Σ bytes mod 97)/97.
    let h = ("Conv2d_1a_3x3.bn.weight"
        .bytes()
        .map(|b| b as u64)
        .sum::<u64>()
        % 97) as f64
        / 97.0;
    for (i, v) in w.data.iter().enumerate() {
        let want = 1.0 + 0.1 * (0.7 * i as f64 + 2.0 * std::f64::consts::PI * h).sin();
        assert!((*v as f64 - want).abs() < 1e-6, "{i}: {v} vs {want}");
    }
    assert_eq!(t["Conv2d_1a_3x3.conv.weight"].shape, vec![32, 3, 3, 3]);
    assert!(!t.keys().any(|k| k.ends_with("num_batches_tracked")));
    // A file with only the first block is not the Inception weights: the error says what is
    // missing and which file was expected.
    let err = FidInception::load(
        &fixture("conv1a.pth"),
        &fewstep::backend::cpu_device().expect("a CPU backend is compiled in"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("Conv2d_2a_3x3.conv.weight") && err.contains(FID_WEIGHTS_FILE),
        "{err}"
    );
}

#[test]
fn eval_explains_where_the_inception_weights_come_from() {
    let o = common::fewstep(&["eval", "fid", "--images", "/tmp", "--features", "inception"]);
    assert_clean_failure(o, "does not download");
    let o = common::fewstep(&[
        "eval",
        "fid",
        "--images",
        "/tmp",
        "--features",
        "inception",
        "--inception-weights",
        "/no/such.pth",
    ]);
    assert_clean_failure(o, FID_WEIGHTS_FILE);
    // A file that is not a PyTorch archive.
    let o = common::fewstep(&[
        "eval",
        "fid",
        "--images",
        "/tmp",
        "--features",
        "inception",
        "--inception-weights",
        fixture("io.safetensors").to_str().unwrap(),
    ]);
    assert_clean_failure(o, "missing tensor");
}
