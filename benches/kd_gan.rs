//! The KD-GAN ablation (`cargo bench --bench kd_gan`): from the shipped teacher GAN
//! `weights/shapes-gan`, co-distillations that add one loss term at a time — output only,
//! then features, then adversarial (D_S), then D_S logit matching (at λ_kd 1 and 0.1) — each
//! scored with the evaluation protocol (FID and KID in the shipped `shapes` features, 1000
//! samples against 5000 held-out images), beside the teacher, with parameters,
//! multiply-accumulates per image and CPU latency per image.
//!
//! `FEWSTEP_KD_ITERS` iterations per student (default 1500), batch 32, seed 0. Runs live in
//! `target/kd_gan/<variant>` and resume when the bench is interrupted and run again. Writes the
//! table to `target/kd_gan_ablation.md` and prints it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::Distribution;
use fewstep::models::gan::folder;

const FEWSTEP: &str = env!("CARGO_BIN_EXE_fewstep");

fn fewstep(args: &[&str]) -> Vec<u8> {
    let out = Command::new(FEWSTEP)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run fewstep");
    if !out.status.success() {
        eprintln!("fewstep {} failed", args.join(" "));
        std::process::exit(1);
    }
    out.stdout
}

/// (batch-1 latency, per-image time at batch 64), both in milliseconds, medians.
fn latency(dir: &Path) -> (f64, f64) {
    let device = fewstep::backend::cpu_device().expect("a CPU backend");
    let (config, g) = folder::load_generator(dir, &device).expect("generator");
    let time = |b: usize, reps: usize| {
        let z = Tensor::<2>::random(
            [b, config.latent_dim],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let _ = g.forward(z.clone(), None).into_data(); // warm-up
        let mut times: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                let _ = g.forward(z.clone(), None).into_data();
                t.elapsed().as_secs_f64() * 1e3 / b as f64
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[reps / 2]
    };
    (time(1, 101), time(64, 21))
}

struct Row {
    name: String,
    params: u64,
    macs: u64,
    fid: f64,
    kid: f64,
    ms_single: f64,
    ms_batched: f64,
}

fn score(name: &str, dir: &Path) -> Row {
    let text = fewstep(&[
        "eval",
        "fid",
        "--model",
        dir.to_str().unwrap(),
        "--num-samples",
        "1000",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&text).expect("eval JSON");
    let (ms_single, ms_batched) = latency(dir);
    Row {
        name: name.into(),
        params: v["source"]["params"].as_u64().unwrap(),
        macs: v["source"]["macs_per_image"].as_u64().unwrap(),
        fid: v["fid"].as_f64().unwrap(),
        kid: v["kid"]["mean"]
            .as_f64()
            .or_else(|| v["kid"].as_f64())
            .unwrap_or(f64::NAN),
        ms_single,
        ms_batched,
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let iters = std::env::var("FEWSTEP_KD_ITERS").unwrap_or_else(|_| "1500".into());
    let teacher = root.join("weights/shapes-gan");
    let out = root.join("target/kd_gan");
    // Each variant adds one term to the one before (the λ not named keep their defaults:
    // output 10 (L1), features 1, adversarial 1); logit matching at two weights.
    let variants: [(&str, &[&str]); 5] = [
        (
            "output only",
            &[
                "--lambda-feat",
                "0",
                "--lambda-adv",
                "0",
                "--lambda-kd",
                "0",
            ],
        ),
        ("+ features", &["--lambda-adv", "0", "--lambda-kd", "0"]),
        ("+ adversarial (D_S; the default)", &["--lambda-kd", "0"]),
        ("+ D_S logit matching, λ_kd 1", &["--lambda-kd", "1"]),
        ("+ D_S logit matching, λ_kd 0.1", &["--lambda-kd", "0.1"]),
    ];
    let mut rows = vec![score("teacher", &teacher)];
    for (i, (name, flags)) in variants.iter().enumerate() {
        let dir: PathBuf = out.join(format!("variant-{i}"));
        let mut args = vec![
            "distill",
            "gan",
            "--quiet",
            "--teacher",
            teacher.to_str().unwrap(),
            "--iters",
            &iters,
            "--batch",
            "32",
            "--out",
            dir.to_str().unwrap(),
        ];
        args.extend_from_slice(flags);
        if dir.join("run.json").is_file() {
            args.push("--resume");
        }
        eprintln!("{name}: fewstep {}", args.join(" "));
        fewstep(&args);
        rows.push(score(name, &dir));
    }
    let teacher_fid = rows[0].fid;
    let teacher_macs = rows[0].macs as f64;
    let mut table = String::from(
        "| generator | params | MACs/image | MAC reduction | CPU ms/image (batch 1 / 64) | FID | KID | FID / teacher |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        table += &format!(
            "| {} | {} | {:.2} M | {:.1}× | {:.3} / {:.4} | {:.2} | {:.2} | {:.2} |\n",
            r.name,
            r.params,
            r.macs as f64 / 1e6,
            teacher_macs / r.macs as f64,
            r.ms_single,
            r.ms_batched,
            r.fid,
            r.kid,
            r.fid / teacher_fid
        );
    }
    table += &format!(
        "\n{iters} iterations per student, batch 32, seed 0 (`FEWSTEP_KD_ITERS={iters} cargo bench --bench kd_gan`).\n"
    );
    std::fs::write(root.join("target/kd_gan_ablation.md"), &table).expect("write table");
    print!("{table}");
}
