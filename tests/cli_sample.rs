//! `fewstep sample` end to end: diffusers parity through the CLI, and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use fewstep::io;

fn fixtures() -> PathBuf {
    common::repo().join("tests/fixtures/models")
}

/// An empty scratch folder, removed when the test passes.
fn scratch(name: &str) -> common::Scratch {
    let dir = common::scratch("cli", name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fewstep(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fewstep"))
        .args(args)
        .output()
        .unwrap()
}

/// A copy of a fixture folder, to be damaged by a test.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn sample_with_latents_file_reproduces_diffusers_for_each_deterministic_scheduler() {
    let dir = scratch("parity");
    let pipe = fixtures().join("pipe_pixel");
    let reference = io::read_safetensors(&pipe.join("io.safetensors")).unwrap();
    let latents = &reference["latents"];
    let latents_file = dir.join("latents.safetensors");
    io::write_safetensors(
        &latents_file,
        &[("latents", latents.shape.clone(), latents.data.clone())],
    )
    .unwrap();
    for (algo, steps) in [
        ("ddim", "4"),
        ("euler", "4"),
        ("heun", "3"),
        ("dpmpp-2m", "5"),
    ] {
        let out = dir.join(format!("{algo}.safetensors"));
        let png = dir.join(format!("{algo}.png"));
        let o = fewstep(&[
            "sample",
            "--model",
            pipe.to_str().unwrap(),
            "--scheduler",
            algo,
            "--steps",
            steps,
            "--latents",
            latents_file.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
            "--save-tensors",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(png.exists());
        let got = &io::read_safetensors(&out).unwrap()["samples"];
        let want = &reference[&format!("{algo}_{steps}")];
        assert_eq!(got.shape, want.shape);
        let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got
            .data
            .iter()
            .zip(&want.data)
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        assert!(diff <= 1e-4 * scale, "{algo}: {diff} > 1e-4 * {scale}");
    }
}

/// DDIM at η > 0 draws its step noise from --seed's stream: the same seed gives the same samples,
/// and they differ from the deterministic ones.
#[test]
fn ddim_eta_is_seeded_and_stochastic() {
    let dir = scratch("eta");
    let pipe = fixtures().join("pipe_pixel");
    let run = |eta: &str, name: &str| {
        let out = dir.join(format!("{name}.safetensors"));
        let png = dir.join(format!("{name}.png"));
        let o = fewstep(&[
            "sample",
            "--model",
            pipe.to_str().unwrap(),
            "--scheduler",
            "ddim",
            "--steps",
            "4",
            "--num",
            "2",
            "--seed",
            "3",
            "--eta",
            eta,
            "--out",
            png.to_str().unwrap(),
            "--save-tensors",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        io::read_safetensors(&out).unwrap()["samples"].data.clone()
    };
    let (a, b, det) = (run("1", "a"), run("1", "b"), run("0", "det"));
    assert_eq!(a, b, "same seed, same η: same samples");
    let moved = a
        .iter()
        .zip(&det)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        moved > 1e-3,
        "η = 1 changes the samples (max difference {moved})"
    );
}

/// The command fails with exit code 1 (2: refused by the argument parser) and one `error:` line
/// that mentions `needle`.
fn assert_clean_failure(args: &[&str], needle: &str) {
    let o = fewstep(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        matches!(o.status.code(), Some(1 | 2)),
        "exit code for {args:?}: {err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line for {args:?}, got: {err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{args:?}: {err}"
    );
}

#[test]
fn bad_input_is_one_clear_line_and_a_nonzero_exit() {
    let dir = scratch("bad");
    let pipe = fixtures().join("pipe_pixel");
    let p = pipe.to_str().unwrap();
    let png = dir.join("x.png");
    let png = png.to_str().unwrap();

    assert_clean_failure(
        &["sample", "--model", "/no/such/folder", "--out", png],
        "/no/such/folder",
    );
    assert_clean_failure(
        &["sample", "--model", p, "--steps", "0", "--out", png],
        "--steps",
    );
    assert_clean_failure(
        &["sample", "--model", p, "--steps", "1001", "--out", png],
        "--steps",
    );
    assert_clean_failure(
        &["sample", "--model", p, "--device", "nope", "--out", png],
        "--device nope",
    );
    assert_clean_failure(
        &[
            "sample",
            "--model",
            p,
            "--scheduler",
            "euler",
            "--eta",
            "0.5",
            "--out",
            png,
        ],
        "--eta 0.5: only the ddim scheduler",
    );
    assert_clean_failure(
        &["sample", "--model", p, "--eta", "-1", "--out", png],
        "--eta",
    );
    let gan = common::repo().join("weights/shapes-gan-kd");
    assert_clean_failure(
        &[
            "sample",
            "--model",
            gan.to_str().unwrap(),
            "--precision",
            "f16",
            "--out",
            png,
        ],
        "--precision f16",
    );

    // Truncated weights.
    let broken = dir.join("truncated");
    copy_dir(&pipe, &broken);
    let weights = broken.join("unet").join(io::WEIGHTS_NAME);
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_failure(
        &["sample", "--model", broken.to_str().unwrap(), "--out", png],
        "corrupt or truncated",
    );

    // A config whose shapes disagree with the weights: name the tensor and both shapes.
    let mismatch = dir.join("mismatch");
    copy_dir(&pipe, &mismatch);
    let cfg = mismatch.join("unet").join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"out_channels\": 3", "\"out_channels\": 4");
    std::fs::write(&cfg, text).unwrap();
    assert_clean_failure(
        &[
            "sample",
            "--model",
            mismatch.to_str().unwrap(),
            "--out",
            png,
        ],
        "conv_out.weight",
    );

    // An unknown block type.
    let unknown = dir.join("unknown");
    copy_dir(&pipe, &unknown);
    let cfg = unknown.join("unet").join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"AttnDownBlock2D\"", "\"CrossAttnDownBlock2D\"");
    std::fs::write(&cfg, text).unwrap();
    assert_clean_failure(
        &["sample", "--model", unknown.to_str().unwrap(), "--out", png],
        "CrossAttnDownBlock2D",
    );

    // Latents of the wrong shape.
    let latents = dir.join("latents.safetensors");
    io::write_safetensors(&latents, &[("latents", vec![1, 3, 4, 4], vec![0.0; 48])]).unwrap();
    assert_clean_failure(
        &[
            "sample",
            "--model",
            p,
            "--latents",
            latents.to_str().unwrap(),
            "--out",
            png,
        ],
        "[N, 3, 8, 8]",
    );
    assert!(!Path::new(png).exists(), "nothing written on failure");
}

/// `--precision f16` runs the shipped latent student's UNet and VAE in half precision (here on
/// the CPU backend) close to f32; `-v` says what the device is and whether it computes in f16.
#[test]
fn sample_in_f16_stays_close_to_f32_and_verbose_describes_the_device() {
    let dir = scratch("f16");
    let model = common::repo().join("weights/shapes-latent-lcm");
    if !cfg!(feature = "flex") {
        // ndarray computes in f32 only: the request is refused in one line.
        assert_clean_failure(
            &[
                "sample",
                "--model",
                model.to_str().unwrap(),
                "--precision",
                "f16",
                "--out",
                dir.join("f16.png").to_str().unwrap(),
            ],
            "does not compute in f16",
        );
        return;
    }
    let mut samples = Vec::new();
    for precision in ["f32", "f16"] {
        let tensors = dir.join(format!("{precision}.safetensors"));
        let o = fewstep(&[
            "sample",
            "--model",
            model.to_str().unwrap(),
            "--steps",
            "2",
            "--num",
            "2",
            "--precision",
            precision,
            "-v",
            "--out",
            dir.join(format!("{precision}.png")).to_str().unwrap(),
            "--save-tensors",
            tensors.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{precision}: {err}");
        assert!(
            err.contains("(CPU, ") && err.contains("f16: supported"),
            "-v: {err}"
        );
        assert!(err.contains(&format!("in {precision}")), "{err}");
        samples.push(
            io::read_safetensors(&tensors).unwrap()["samples"]
                .data
                .clone(),
        );
    }
    let (f32s, f16s) = (&samples[0], &samples[1]);
    let scale = f32s.iter().fold(0f32, |m, v| m.max(v.abs()));
    let max = f32s
        .iter()
        .zip(f16s)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(max > 0.0, "f16 gave bit-identical samples: was it f16?");
    assert!(
        max / scale <= 5e-2,
        "f16 differs from f32 by {} (relative)",
        max / scale
    );
}
