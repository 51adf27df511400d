//! The FID-versus-steps curve of the shipped models (`cargo bench --bench fid_curve`): the shipped
//! teacher `weights/shapes32` with DDIM at 1…250 steps, beside the students of every shipped
//! progressive run (`weights/*/round-<N>steps`, DDIM at its own N) and every shipped consistency student
//! (`weights/*/` folders with an `LCMScheduler` config, LCM at 1, 2, 4, 8 steps) and every shipped
//! LCM-LoRA file (`weights/*/lora.safetensors`, merged into the teacher, LCM), all on one plot,
//! scored with the shipped `shapes` feature network against 5000 held-out `shapes` images.
//!
//! Protocol: `FEWSTEP_FID_SAMPLES` generated samples per point (default 300, sized so that the
//! teacher curve up to 250 steps takes about 45 minutes on 2 cores), seed 0.
//! Writes `target/fid_curve.csv`, `target/fid_curve.png` and the per-point grids and JSON under
//! `target/fid_curve/`.

use std::path::{Path, PathBuf};

use clap::Parser;
use fewstep::cli::{Cli, Command};
use fewstep::train::consistency::LORA_FILE;

/// The folders under `weights/` that `keep` selects, sorted.
fn shipped(weights: &Path, keep: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(weights)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| keep(p))
        .collect();
    found.sort();
    found
}

/// A progressive run folder (holding `round-<N>steps/` students).
fn is_progressive_run(dir: &Path) -> bool {
    !fewstep::train::progressive::finished_rounds(dir).is_empty()
}

/// A pipeline folder whose scheduler is an `LCMScheduler` (a consistency student).
fn is_consistency_student(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("scheduler/scheduler_config.json"))
        .is_ok_and(|t| t.contains("\"LCMScheduler\""))
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let samples = std::env::var("FEWSTEP_FID_SAMPLES").unwrap_or_else(|_| "300".into());
    let out = root.join("target/fid_curve");
    let teacher = root.join("weights/shapes32");
    let run =
        |models: &[PathBuf], scheduler: &str, steps: &str, out: &Path, lora: Option<&Path>| {
            let mut args: Vec<String> = vec!["fewstep".into(), "eval".into(), "curve".into()];
            if let Some(file) = lora {
                args.push("--lora".into());
                args.push(file.display().to_string());
            }
            for m in models {
                args.push("--model".into());
                args.push(m.display().to_string());
            }
            args.extend(
                [
                    "--steps",
                    steps,
                    "--num-samples",
                    &samples,
                    "--scheduler",
                    scheduler,
                    "--out",
                ]
                .iter()
                .map(|s| s.to_string()),
            );
            args.push(out.display().to_string());
            let cli = Cli::parse_from(args);
            let Command::Eval(cmd) = cli.command else {
                unreachable!()
            };
            if let Err(e) = fewstep::cli::eval::run(cmd) {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        };
    // The teacher at every step count and each progressive run's students at their own.
    let mut ddim_models = vec![teacher.clone()];
    ddim_models.extend(shipped(&root.join("weights"), is_progressive_run));
    run(
        &ddim_models,
        "ddim",
        "1,2,4,8,16,32,64,125,250",
        &out.join("ddim"),
        None,
    );
    let mut csv = std::fs::read_to_string(out.join("ddim/curve.csv")).expect("ddim curve");
    for student in shipped(&root.join("weights"), is_consistency_student) {
        let dir = out.join(student.file_name().unwrap());
        run(&[student], "lcm", "1,2,4,8", &dir, None);
        let text = std::fs::read_to_string(dir.join("curve.csv")).expect("student curve");
        csv.extend(text.lines().skip(1).map(|l| format!("{l}\n")));
    }
    // Every shipped LCM-LoRA file on the teacher; its rows name the adapters' folder.
    for adapters in shipped(&root.join("weights"), |d| d.join(LORA_FILE).is_file()) {
        let dir = out.join(adapters.file_name().unwrap());
        let file = adapters.join(LORA_FILE);
        run(
            std::slice::from_ref(&teacher),
            "lcm",
            "1,2,4,8",
            &dir,
            Some(&file),
        );
        let text = std::fs::read_to_string(dir.join("curve.csv")).expect("LoRA curve");
        csv.extend(text.lines().skip(1).map(|l| {
            let (_, rest) = l.split_once(',').expect("csv row");
            format!("{},{rest}\n", adapters.display())
        }));
    }
    std::fs::write(root.join("target/fid_curve.csv"), &csv).expect("write csv");
    let mut series: std::collections::BTreeMap<String, Vec<(usize, f64)>> = Default::default();
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let model = Path::new(f[0]);
        // Students of one run form one line; the teacher another.
        let label = if model
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("round-")
        {
            format!(
                "{} students",
                model
                    .parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
            )
        } else if model.join(LORA_FILE).is_file() {
            format!(
                "{} (LCM-LoRA on the teacher)",
                model.file_name().unwrap().to_string_lossy()
            )
        } else if f[1] == "lcm" {
            format!(
                "{} (consistency, LCM)",
                model.file_name().unwrap().to_string_lossy()
            )
        } else {
            format!(
                "{} (teacher, DDIM)",
                model.file_name().unwrap().to_string_lossy()
            )
        };
        series
            .entry(label)
            .or_default()
            .push((f[2].parse().unwrap(), f[3].parse().unwrap()));
    }
    let series: Vec<fewstep::metrics::curve_plot::Series> = series
        .into_iter()
        .map(|(label, mut points)| {
            points.sort_by_key(|p| p.0);
            fewstep::metrics::curve_plot::Series { label, points }
        })
        .collect();
    fewstep::metrics::curve_plot::plot_fid_curve(
        &root.join("target/fid_curve.png"),
        &format!("FID vs steps, shipped models ({samples} samples, shapes features)"),
        &series,
    )
    .expect("plot");
    print!("{csv}");
    eprintln!("wrote target/fid_curve.csv and target/fid_curve.png");
}
