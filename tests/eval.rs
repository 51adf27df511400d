//! `fewstep eval fid|curve` end to end on a tiny model and a briefly trained feature network:
//! JSON output with the protocol, the reference-statistics cache, the curve files, image-folder
//! scoring, and bad input.

mod common;
use common::{assert_clean_failure, distill_tiny_lora, fewstep, ok, scratch, train_tiny};

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// (tiny model pipeline folder, feature network folder), made once per test binary.
fn fixtures() -> &'static (PathBuf, PathBuf) {
    static F: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    F.get_or_init(|| {
        let folder = common::fixture_folder("eval");
        let (model, features) = (folder.join("model"), folder.join("features"));
        train_tiny(&model, &[]);
        let model = model.join("checkpoints/latest");
        ok(&fewstep(&[
            "train-features",
            "--steps",
            "3",
            "--batch",
            "8",
            "--test-images",
            "16",
            "--quiet",
            "--out",
            features.to_str().unwrap(),
        ]));
        (model, features)
    })
}

fn common<'a>(features: &'a Path, cache: &'a Path) -> Vec<&'a str> {
    vec![
        "--feature-weights",
        features.to_str().unwrap(),
        "--ref-samples",
        "200",
        "--cache",
        cache.to_str().unwrap(),
        "--num-samples",
        "130",
        "--batch",
        "65",
    ]
}

/// `fewstep eval fid --model <model> --steps 2 --json` plus `extra` with the test protocol.
fn eval_fid_args<'a>(model: &'a Path, cache: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let (_, features) = fixtures();
    let mut args = vec![
        "eval",
        "fid",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "2",
        "--json",
    ];
    args.extend(common(features, cache));
    args.extend_from_slice(extra);
    args
}

/// `eval_fid_args` of `model`, run and parsed.
fn eval_fid_json_of(model: &Path, cache: &Path, extra: &[&str]) -> serde_json::Value {
    let o = fewstep(&eval_fid_args(model, cache, extra));
    ok(&o);
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `eval_fid_json_of` the tiny model.
fn eval_fid_json(cache: &Path, extra: &[&str]) -> serde_json::Value {
    eval_fid_json_of(&fixtures().0, cache, extra)
}

#[test]
fn fid_prints_every_figure_and_the_protocol_and_caches_the_reference() {
    let cache = scratch("eval", "cache");
    let v = eval_fid_json(&cache, &[]);
    let fid = v["fid"].as_f64().unwrap();
    assert!(fid.is_finite() && fid > 0.0, "{v}");
    assert!(v["kid"]["mean"].as_f64().is_some(), "{v}");
    assert!(v["precision_recall"]["precision"].as_f64().is_some(), "{v}");
    assert_eq!(v["samples"], 130);
    assert_eq!(v["source"]["steps"], 2);
    assert!(v["source"]["params"].as_u64().unwrap() > 0);
    assert!(
        v["source"]["macs_per_step"].as_u64().unwrap() > v["source"]["params"].as_u64().unwrap()
    );
    assert_eq!(v["protocol"]["reference"]["count"], 200);
    assert!(
        v["protocol"]["extractor"]
            .as_str()
            .unwrap()
            .starts_with("shapes-")
    );
    let cached: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(cached.len(), 1);
    // The same command again reads the cache and gives the same FID.
    assert_eq!(eval_fid_json(&cache, &[])["fid"], v["fid"]);

    // The statistics file alone: FID only, same value.
    let stats = cached[0].as_ref().unwrap().path();
    let s = eval_fid_json(&cache, &["--ref-stats", stats.to_str().unwrap()]);
    assert!((s["fid"].as_f64().unwrap() - fid).abs() < 1e-9 * fid.max(1.0));
}

#[test]
fn fewer_samples_than_feature_dimensions_give_a_fid_and_a_warning() {
    // As pytorch-fid and clean-fid: a singular covariance still has a Fréchet distance.
    let cache = scratch("eval", "few-cache");
    let (model, features) = fixtures();
    let o = fewstep(&[
        "eval",
        "fid",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "2",
        "--json",
        "--feature-weights",
        features.to_str().unwrap(),
        "--ref-samples",
        "200",
        "--cache",
        cache.to_str().unwrap(),
        "--num-samples",
        "10",
    ]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning: --num-samples 10: no more samples than"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["fid"].as_f64().unwrap().is_finite(), "{v}");
    assert_eq!(v["samples"], 10);
}

/// `fewstep eval curve` of `models` at `steps` with the test protocol.
fn curve_args<'a>(
    models: &[&'a Path],
    steps: &'a str,
    out: &'a Path,
    cache: &'a Path,
) -> Vec<&'a str> {
    let (_, features) = fixtures();
    let mut args = vec![
        "eval",
        "curve",
        "--steps",
        steps,
        "--out",
        out.to_str().unwrap(),
    ];
    for m in models {
        args.extend(["--model", m.to_str().unwrap()]);
    }
    args.extend(common(features, cache));
    args
}

#[test]
fn curve_writes_csv_json_plot_and_grids() {
    let (model, _) = fixtures();
    let out = scratch("eval", "curve");
    let cache = scratch("eval", "curve-cache");
    ok(&fewstep(&curve_args(&[model], "1,2", &out, &cache)));
    let csv = std::fs::read_to_string(out.join("curve.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(csv.lines().nth(2).unwrap().contains(",2,"), "{csv}");
    let png = image::open(out.join("curve.png")).unwrap();
    assert_eq!((png.width(), png.height()), (900, 560));
    assert!(out.join("grid-checkpoints-latest-1steps.png").is_file());
    assert!(out.join("grid-checkpoints-latest-2steps.png").is_file());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("curve.json")).unwrap()).unwrap();
    assert_eq!(report["protocol"]["num_samples"], 130);
    assert_eq!(report["results"].as_array().unwrap().len(), 2);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn curve_draws_a_progressive_run_as_its_students_each_at_its_own_steps() {
    let (model, features) = fixtures();
    // A run folder as `distill progressive` leaves it: students round-<N>steps/ beside files.
    let run = scratch("eval", "curve-run");
    for n in [1, 2, 4] {
        copy_dir(model, &run.join(format!("round-{n}steps")));
    }
    std::fs::write(run.join("loss.csv"), "round,iter,loss\n").unwrap();
    let out = scratch("eval", "curve-run-out");
    let cache = scratch("eval", "curve-run-cache");
    ok(&fewstep(&curve_args(&[model, &run], "1,2", &out, &cache)));
    let csv = std::fs::read_to_string(out.join("curve.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    // The model at 1 and 2 steps; the run's 1- and 2-step students at theirs, not its 4-step one.
    assert_eq!(rows.len(), 4, "{csv}");
    assert!(
        rows[2].contains("round-1steps,") && rows[2].contains(",1,"),
        "{csv}"
    );
    assert!(
        rows[3].contains("round-2steps,") && rows[3].contains(",2,"),
        "{csv}"
    );
    // Each student matches the model it copies at the same step count (same seed, same noise).
    let fid = |row: &str| row.split(',').nth(3).unwrap().to_string();
    assert_eq!(fid(rows[0]), fid(rows[2]), "{csv}");
    assert_eq!(fid(rows[1]), fid(rows[3]), "{csv}");

    // A run none of whose students is among --steps, and a folder that is neither: one line each.
    assert_clean_failure(
        fewstep(&curve_args(&[model, &run], "8", &out, &cache)),
        "students sample at 1, 2, 4 steps",
    );
    assert_clean_failure(
        fewstep(&curve_args(&[model, features], "8", &out, &cache)),
        "nor a progressive run folder",
    );
}

#[test]
fn fid_with_lora_scores_the_merged_model_with_the_files_scheduler() {
    let (model, _) = fixtures();
    // LCM-LoRA adapters on the tiny model, and the merged student the run writes beside them.
    let run = scratch("eval", "lora-run");
    ok(&distill_tiny_lora(
        model,
        &run,
        &["--lora-convs", "--iters", "3"],
    ));
    let lora = run.join("lora.safetensors");
    let cache = scratch("eval", "lora-cache");
    let with_lora = eval_fid_json(&cache, &["--lora", lora.to_str().unwrap()]);
    assert_eq!(with_lora["source"]["scheduler"], "lcm", "{with_lora}");
    assert_eq!(with_lora["source"]["lora"]["scale"], 1.0, "{with_lora}");
    // The same figure as the merged student folder (same seed, same noise, same scheduler).
    let merged = eval_fid_json_of(&run.join("student"), &cache, &[]);
    let (a, b) = (
        with_lora["fid"].as_f64().unwrap(),
        merged["fid"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "{a} vs {b}");
    // At scale 0 the adapters vanish: the base model, sampled with the file's LCM scheduler.
    let base = eval_fid_json(
        &cache,
        &[
            "--lora",
            lora.to_str().unwrap(),
            "--lora-scale",
            "0",
            "--scheduler",
            "lcm",
        ],
    );
    let plain = eval_fid_json(&cache, &["--scheduler", "lcm"]);
    assert_eq!(base["fid"], plain["fid"]);
    assert_ne!(base["fid"], with_lora["fid"]);
    // A progressive run's students take no LoRA file.
    let out = scratch("eval", "lora-curve");
    let rounds = scratch("eval", "lora-rounds");
    copy_dir(model, &rounds.join("round-1steps"));
    let mut args = curve_args(&[&rounds], "1", &out, &cache);
    args.extend(["--lora", lora.to_str().unwrap()]);
    assert_clean_failure(fewstep(&args), "--lora applies to pipeline folders");
    // Nor does a GAN generator.
    let gan = common::repo().join("weights/shapes-gan-kd");
    let lora_arg = ["--lora", lora.to_str().unwrap()];
    assert_clean_failure(
        fewstep(&eval_fid_args(&gan, &cache, &lora_arg)),
        "takes no LoRA file",
    );
}

#[test]
fn an_image_folder_scores_against_the_reference() {
    let (_, features) = fixtures();
    // 140 images of the reference distribution (held-out shapes rendered by the library) score
    // far better than 140 flat grey images.
    let real = scratch("eval", "real-images");
    let grey = scratch("eval", "grey-images");
    std::fs::create_dir_all(&real).unwrap();
    std::fs::create_dir_all(&grey).unwrap();
    for i in 0..140u64 {
        let (pixels, _) = fewstep::data::shapes::render(7, 1_000_000 + i);
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            let p = |c: usize| {
                fewstep::image_grid::to_u8(pixels[(c * 32 + y as usize) * 32 + x as usize])
            };
            image::Rgb([p(0), p(1), p(2)])
        });
        img.save(real.join(format!("{i:03}.png"))).unwrap();
        image::RgbImage::from_pixel(32, 32, image::Rgb([128, 128, 128]))
            .save(grey.join(format!("{i:03}.png")))
            .unwrap();
    }
    let cache = scratch("eval", "folder-cache");
    let score = |dir: &Path| {
        let mut args = vec!["eval", "fid", "--images", dir.to_str().unwrap(), "--json"];
        args.extend(common(features, &cache));
        let o = fewstep(&args);
        ok(&o);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["fid"].as_f64().unwrap()
    };
    let (good, bad) = (score(&real), score(&grey));
    assert!(good < bad, "real {good} vs grey {bad}");
}

#[test]
fn bad_input_is_one_clear_line() {
    let (model, features) = fixtures();
    let cache = scratch("eval", "bad-cache");
    let m = model.to_str().unwrap();
    let f = features.to_str().unwrap();
    let c = cache.to_str().unwrap();
    let out = scratch("eval", "bad-out");
    let o = out.to_str().unwrap();
    assert_clean_failure(
        fewstep(&[
            "eval",
            "curve",
            "--model",
            m,
            "--steps",
            "1,x",
            "--out",
            o,
            "--feature-weights",
            f,
        ]),
        "--steps 1,x",
    );
    assert_clean_failure(
        fewstep(&[
            "eval",
            "fid",
            "--model",
            m,
            "--num-samples",
            "1",
            "--feature-weights",
            f,
            "--cache",
            c,
        ]),
        "--num-samples 1: FID needs at least 2 samples",
    );
    assert_clean_failure(
        fewstep(&[
            "eval",
            "fid",
            "--model",
            m,
            "--feature-weights",
            "/no/features",
        ]),
        "feature network",
    );
    assert_clean_failure(
        fewstep(&[
            "eval",
            "fid",
            "--model",
            m,
            "--ref-stats",
            "/no/stats.safetensors",
            "--feature-weights",
            f,
        ]),
        "statistics file not found",
    );
    assert!(!out.exists());
}

/// `fewstep eval denoise --json` of `model` with `extra`, parsed.
fn denoise_json(model: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "eval",
        "denoise",
        "--model",
        model.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = fewstep(&args);
    ok(&o);
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn denoise_profiles_the_schedule_in_bands_and_recovers_from_each_start() {
    let (model, _) = fixtures();
    let dir = scratch("eval", "denoise");
    std::fs::create_dir_all(&dir).unwrap();
    let grid = dir.join("grid.png");
    let flags = [
        "--images", "5", "--bands", "4", "--starts", "1,900", "--stride", "100",
    ];
    let mut with_grid = flags.to_vec();
    with_grid.extend(["--batch", "5", "--grid", grid.to_str().unwrap()]);
    let report = denoise_json(model, &with_grid);
    let bands = report["bands"].as_array().unwrap();
    let edges: Vec<(u64, u64)> = bands
        .iter()
        .map(|b| (b["from"].as_u64().unwrap(), b["to"].as_u64().unwrap()))
        .collect();
    assert_eq!(edges, vec![(0, 250), (250, 500), (500, 750), (750, 1000)]);
    for b in bands {
        for key in ["loss", "x0_mse"] {
            let v = b[key].as_f64().unwrap();
            assert!(v.is_finite() && v > 0.0, "{key}: {b}");
        }
    }
    // The x0 error of any model grows with the noise: at t < 250 the noisy image is nearly x0.
    assert!(
        bands[0]["x0_mse"].as_f64().unwrap() < bands[3]["x0_mse"].as_f64().unwrap(),
        "{report}"
    );
    let recovery = report["recovery"].as_array().unwrap();
    assert_eq!(recovery[0]["t0"], 1);
    assert_eq!(recovery[0]["steps"], 1);
    assert_eq!(recovery[1]["steps"], 9);
    // From t0 = 1 any model returns (nearly) the image it was given; from 900 a two-step model
    // returns something else.
    assert!(
        recovery[0]["mse"].as_f64().unwrap() < 1e-3 && recovery[1]["mse"].as_f64().unwrap() > 0.01,
        "{report}"
    );
    // Three rows (originals, two starts) of three images, 32 px with 2 px gaps.
    let png = image::open(&grid).unwrap();
    assert_eq!((png.width(), png.height()), (100, 100));
    // Each image draws from its own noise stream: the figures do not depend on --batch.
    let mut batched = flags.to_vec();
    batched.extend(["--batch", "2"]);
    let again = denoise_json(model, &batched);
    for key in ["bands", "recovery"] {
        let (a, b) = (
            again[key].as_array().unwrap(),
            report[key].as_array().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        for (a, b) in a.iter().zip(b) {
            for (name, x) in a.as_object().unwrap() {
                let (x, y) = (x.as_f64().unwrap(), b[name].as_f64().unwrap());
                // Equal up to the order of the sums.
                assert!(
                    (x - y).abs() <= 1e-5 * y.abs().max(1e-3),
                    "{key} {name}: {x} vs {y}"
                );
            }
        }
    }
    // What it cannot measure is one line.
    let latent = common::repo().join("tests/fixtures/models/pipe_latent");
    assert_clean_failure(
        fewstep(&["eval", "denoise", "--model", latent.to_str().unwrap()]),
        "a latent one",
    );
    assert_clean_failure(
        fewstep(&[
            "eval",
            "denoise",
            "--model",
            model.to_str().unwrap(),
            "--starts",
            "1000",
        ]),
        "--starts: 1000",
    );
}
