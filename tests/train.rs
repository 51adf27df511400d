//! `fewstep train` on the tiny preset: exact resume, loadable checkpoints, Ctrl-C, NaN guard,
//! bad input.

mod common;
use common::{
    assert_clean_failure, fewstep, losses, max_weight_difference, ok, scratch, wait_for_csv_lines,
};

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use fewstep::pipeline::Pipeline;

fn train(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--model-config",
        "tiny",
        "--batch",
        "4",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    fewstep(&args)
}

/// `fewstep train --out RUN --resume --steps N --quiet`.
fn resume(run: &Path, steps: &str) -> Output {
    fewstep(&[
        "train",
        "--out",
        run.to_str().unwrap(),
        "--resume",
        "--steps",
        steps,
        "--quiet",
    ])
}

#[test]
fn resumed_run_reaches_the_uninterrupted_weights() {
    let (a, b) = (scratch("train", "whole"), scratch("train", "split"));
    ok(&train(&a, &["--steps", "6", "--checkpoint-every", "3"]));
    ok(&train(&b, &["--steps", "3", "--checkpoint-every", "3"]));
    ok(&resume(&b, "6"));
    let max = max_run_difference(&a, &b);
    // Same data, noise, ids and optimizer moments, and loaded weights laid out as built ones:
    // bit for bit.
    assert!(max == 0.0, "resumed weights differ by {max}");
    let rows = std::fs::read_to_string(b.join("loss.csv")).unwrap();
    assert_eq!(
        rows.lines().count(),
        7,
        "header + one row per step, none duplicated"
    );
}

/// Largest absolute difference between two runs' raw weights.
fn max_run_difference(a: &Path, b: &Path) -> f32 {
    let raw = "checkpoints/latest/state/model.safetensors";
    max_weight_difference(&a.join(raw), &b.join(raw))
}

#[test]
fn data_parallel_over_cpu_devices_trains_the_single_device_run() {
    // Batch 4 over 3 devices shards 2 + 1 + 1 rows: each shard's loss must be weighted by its
    // share for the sum to be the batch's gradient. Class labels shard with the images.
    let common = [
        "--steps",
        "3",
        "--warmup",
        "0",
        "--lr",
        "1e-3",
        "--class-conditional",
    ];
    let one = scratch("train", "dp-one");
    let three = scratch("train", "dp-three");
    let listed = scratch("train", "dp-list");
    let reseeded = scratch("train", "dp-seed");
    ok(&train(&one, &common));
    ok(&train(&three, &[&common[..], &["--devices", "3"]].concat()));
    ok(&train(
        &listed,
        &[&common[..], &["--devices", "cpu,cpu"]].concat(),
    ));
    ok(&train(
        &reseeded,
        &[&common[..], &["--data-seed", "1"]].concat(),
    ));
    for run in [&three, &listed] {
        for (a, b) in losses(&one).iter().zip(losses(run)) {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "loss {a} vs {b}");
        }
        let diff = max_run_difference(&one, run);
        assert!(diff <= 2e-5, "data-parallel weights differ by {diff}");
    }
    // Other data moves the weights far more than float rounding does.
    assert!(max_run_difference(&one, &reseeded) > 1e-4);
}

#[test]
fn checkpoint_is_a_pipeline_folder_that_samples() {
    let run = scratch("train", "pipeline");
    ok(&train(
        &run,
        &[
            "--steps",
            "2",
            "--checkpoint-every",
            "1",
            "--class-conditional",
        ],
    ));
    let latest = run.join("checkpoints/latest");
    assert!(run.join("checkpoints/previous/state/state.json").is_file());
    let device = fewstep::backend::cpu_device().unwrap();
    let pipeline = Pipeline::load(&latest, &device).unwrap();
    assert_eq!(pipeline.unet.num_classes(), Some(4));
    let png = run.join("grid.png");
    ok(&fewstep(&[
        "sample",
        "--model",
        latest.to_str().unwrap(),
        "--steps",
        "2",
        "--num",
        "2",
        "--out",
        png.to_str().unwrap(),
    ]));
    assert!(png.is_file());
}

#[test]
fn diverging_loss_stops_and_keeps_the_last_good_checkpoint() {
    let run = scratch("train", "nan");
    let o = train(
        &run,
        &[
            "--steps",
            "50",
            "--checkpoint-every",
            "1",
            "--lr",
            "1e30",
            "--warmup",
            "0",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("the loss became"), "{err}");
    let state = std::fs::read_to_string(run.join("checkpoints/latest/state/state.json")).unwrap();
    let step: serde_json::Value = serde_json::from_str(&state).unwrap();
    let step = step["step"].as_u64().unwrap();
    assert!((1..50).contains(&step), "checkpoint at step {step}");
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let run = scratch("train", "interrupt");
    let child = common::command()
        .args([
            "train",
            "--model-config",
            "tiny",
            "--batch",
            "2",
            "--quiet",
            "--steps",
            "100000",
            "--checkpoint-every",
            "100000",
            "--out",
            run.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_csv_lines(
        &run.join("loss.csv"),
        2,
        Duration::from_secs(60),
        "training never started",
    );
    std::thread::sleep(Duration::from_millis(300));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("interrupted at step"), "{err}");
    assert!(run.join("checkpoints/latest/state/state.json").is_file());
}

#[test]
fn bad_input_is_one_clear_line_and_harms_nothing() {
    let run = scratch("train", "bad");
    let r = run.to_str().unwrap();
    assert_clean_failure(
        fewstep(&["train", "--model-config", "huge", "--out", r]),
        "unknown preset",
    );
    assert_clean_failure(
        fewstep(&[
            "train",
            "--model-config",
            "tiny",
            "--batch",
            "0",
            "--out",
            r,
        ]),
        "--batch",
    );
    assert_clean_failure(
        fewstep(&["train", "--out", r, "--resume"]),
        "no run to resume",
    );
    assert_clean_failure(train(&run, &["--data", "/no/images"]), "--data");
    assert_clean_failure(train(&run, &["--devices", "0"]), "--devices 0");
    assert_clean_failure(train(&run, &["--devices", "cpu,gpu9"]), "gpu9");
    assert_clean_failure(train(&run, &["--devices", "cpu:1"]), "index");

    // A folder that already holds a run is not overwritten.
    ok(&train(&run, &["--steps", "1"]));
    let before = std::fs::read(run.join("checkpoints/latest/state/model.safetensors")).unwrap();
    assert_clean_failure(train(&run, &["--steps", "1"]), "already holds a run");
    assert_eq!(
        before,
        std::fs::read(run.join("checkpoints/latest/state/model.safetensors")).unwrap()
    );

    // A run folder of another kind.
    let other = scratch("train", "other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("run.json"), r#"{"kind": "train-gan"}"#).unwrap();
    assert_clean_failure(
        fewstep(&["train", "--out", other.to_str().unwrap(), "--resume"]),
        "train-gan",
    );

    // An invalid config file names the field.
    let cfg = scratch("train", "cfg");
    std::fs::create_dir_all(&cfg).unwrap();
    let path = cfg.join("config.json");
    std::fs::write(&path, r#"{"block_out_channels": [16, "x"]}"#).unwrap();
    assert_clean_failure(
        fewstep(&[
            "train",
            "--model-config",
            path.to_str().unwrap(),
            "--out",
            cfg.join("run").to_str().unwrap(),
        ]),
        "block_out_channels",
    );
}

#[test]
fn trains_on_an_image_folder_with_class_subfolders() {
    let data = scratch("train", "folder-data");
    for (class, colour) in [("red", [220u8, 30, 30]), ("blue", [30, 30, 220])] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..3u32 {
            // Sizes other than 32 and non-square: resized and centre-cropped.
            image::RgbImage::from_fn(40 + 8 * i, 36, |x, _| {
                image::Rgb(if x % 7 == 0 { [250, 250, 250] } else { colour })
            })
            .save(data.join(class).join(format!("{i}.png")))
            .unwrap();
        }
    }
    std::fs::write(data.join("red/corrupt.jpg"), b"\xff\xd8 truncated").unwrap();
    let run = scratch("train", "folder-run");
    let o = train(
        &run,
        &[
            "--data",
            data.to_str().unwrap(),
            "--class-conditional",
            "--steps",
            "2",
        ],
    );
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("skipped 1 unreadable") && err.contains("corrupt.jpg"),
        "{err}"
    );
    let run_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(run_json["unet"]["num_class_embeds"], 3);
    assert_eq!(
        run_json["data"]["Folder"]["path"].as_str().unwrap(),
        data.canonicalize().unwrap().to_str().unwrap()
    );
    // Resume re-opens the folder from run.json.
    ok(&resume(&run, "3"));

    // Class-conditional training needs class sub-folders.
    let flat = scratch("train", "folder-flat");
    std::fs::create_dir_all(&flat).unwrap();
    std::fs::copy(data.join("red/0.png"), flat.join("0.png")).unwrap();
    assert_clean_failure(
        train(
            &scratch("train", "folder-flat-run"),
            &["--data", flat.to_str().unwrap(), "--class-conditional"],
        ),
        "no class sub-folders",
    );
    // A folder with nothing readable.
    let junk = scratch("train", "folder-junk");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("a.png"), b"junk").unwrap();
    assert_clean_failure(
        train(
            &scratch("train", "folder-junk-run"),
            &["--data", junk.to_str().unwrap(), "--steps", "1"],
        ),
        "none of the 1 image files",
    );
}

#[test]
fn resume_names_the_flags_it_ignores_and_keeps_the_stored_settings() {
    let run = scratch("train", "resume-flags");
    ok(&train(&run, &["--steps", "2"]));
    let stored = std::fs::read_to_string(run.join("run.json")).unwrap();
    // The same command plus --resume (and another --lr and --model-config): the stored run
    // continues, and the warning names what was not applied.
    let o = fewstep(&[
        "train",
        "--model-config",
        "shapes32",
        "--lr",
        "1",
        "--steps",
        "3",
        "--cooldown",
        "1",
        "--devices",
        "1",
        "--quiet",
        "--out",
        run.to_str().unwrap(),
        "--resume",
    ]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    // --steps, --cooldown and --devices apply to a resumed run: not named.
    assert!(
        err.contains("warning: --model-config, --lr: ignored with --resume, which"),
        "{err}"
    );
    let now: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    let before: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(
        now["unet"], before["unet"],
        "the stored model config is kept"
    );
    assert_eq!(now["train"]["lr"], before["train"]["lr"]);
    assert_eq!(now["train"]["steps"], 3, "--steps extends a resumed run");
    assert_eq!(
        now["train"]["cooldown"], 1,
        "--cooldown applies to a resumed run"
    );
    assert_eq!(
        now["train"]["optimizer"]["kind"], "adamw",
        "the optimizer is recorded"
    );
}

/// One step of the tiny model (batch 4, seed 0) with `extra` flags: its loss, the `train` object
/// of its run.json and the run folder.
fn first_step(name: &str, extra: &[&str]) -> (f32, serde_json::Value, common::Scratch) {
    let run = scratch("train", name);
    ok(&train(&run, &[&["--steps", "1"], extra].concat()));
    let stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    (losses(&run)[0], stored["train"].clone(), run)
}

#[test]
fn snr_gamma_weights_each_sample_and_is_kept_in_the_run() {
    // One step, the same seeded batch: with ε prediction and γ above every SNR of the schedule
    // each weight is 1, so the loss is the plain one; with v prediction and γ = 5 every weight,
    // min(SNR, 5) / (SNR + 1), is below 1, so the loss is smaller.
    let first = |name: &str, extra: &[&str]| {
        let (loss, stored, _) = first_step(name, extra);
        (loss, stored["snr_gamma"].clone())
    };
    let (eps, none) = first("snr-eps-plain", &["--prediction", "epsilon"]);
    assert!(none.is_null(), "a plain run records no snr_gamma: {none}");
    let (eps_capped, gamma) = first(
        "snr-eps-huge",
        &["--prediction", "epsilon", "--snr-gamma", "1e12"],
    );
    assert_eq!(gamma, 1e12);
    assert!(
        (eps - eps_capped).abs() <= 1e-6 * eps,
        "{eps} vs {eps_capped}"
    );
    let (v, _) = first("snr-v-plain", &[]);
    let (v_weighted, gamma) = first("snr-v-5", &["--snr-gamma", "5"]);
    assert_eq!(gamma, 5.0);
    assert!(v_weighted < 0.99 * v, "weighted {v_weighted} vs plain {v}");
}

#[test]
fn timestep_sampling_draws_from_its_law_and_is_kept_in_the_run() {
    // One step of the same seeded images and noise with every row's timestep drawn near one end
    // of the schedule. An untrained model's output is small, so the v loss is about the mean
    // square of the target: ε's (1) at σ ≈ e^−6 (t = 0), x0's (the images', well under 1) at
    // σ ≈ e^6 (t = 999). run.json records the law; a uniform run records nothing.
    let first = |name: &str, extra: &[&str]| {
        let (loss, stored, run) = first_step(name, extra);
        (loss, stored["timestep_sampling"].clone(), run)
    };
    let (low, law, run) = first("ts-low", &["--timestep-sampling", "lognormal:-6,0.1"]);
    assert_eq!(
        law,
        serde_json::json!({"log_normal": {"mean": -6.0, "std": 0.1}})
    );
    let (high, _, _) = first("ts-high", &["--timestep-sampling", "lognormal:6,0.1"]);
    assert!(low > 2.0 * high, "t ≈ 0: {low}, t ≈ 999: {high}");
    let (uniform, none, _) = first("ts-uniform", &[]);
    assert!(none.is_null(), "a uniform run records no law: {none}");
    assert!(
        uniform < low && uniform > high,
        "{high} < {uniform} < {low}"
    );
    // A resumed run keeps drawing from the stored law.
    ok(&resume(&run, "2"));
    let stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(stored["train"]["timestep_sampling"], law);
    assert_eq!(losses(&run).len(), 2);
}

/// `fewstep train --init` of the tiny model's narrow and `fewstep widen`ed folders for one
/// step of batch 4 (seed 0), the run's loss.
fn first_loss(init: &Path, out: &Path) -> f32 {
    ok(&fewstep(&[
        "train",
        "--init",
        init.to_str().unwrap(),
        "--steps",
        "1",
        "--batch",
        "4",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]));
    losses(out)[0]
}

#[test]
fn a_widened_model_trains_on_from_where_the_narrow_one_stood() {
    let narrow = common::tiny_model("train", "widen-narrow");
    let wide = scratch("train", "widen-wide");
    ok(&fewstep(&[
        "widen",
        "--model",
        narrow.to_str().unwrap(),
        "--factor",
        "2",
        "--noise",
        "0",
        "--out",
        wide.to_str().unwrap(),
    ]));
    let device = fewstep::backend::cpu_device().unwrap();
    let p = Pipeline::load(&wide, &device).unwrap();
    assert_eq!(p.unet_config.block_out_channels, vec![16, 32]);
    // The same data, noise and timesteps through the same function: the same first loss.
    let (a, b) = (
        first_loss(&narrow, &scratch("train", "widen-run-narrow")),
        first_loss(&wide, &scratch("train", "widen-run-wide")),
    );
    assert!((a - b).abs() <= 1e-5 * a.abs().max(1e-3), "{a} vs {b}");
    // Bad input: one line each, nothing written.
    let bad = scratch("train", "widen-bad");
    assert_clean_failure(
        fewstep(&[
            "train",
            "--init",
            wide.to_str().unwrap(),
            "--model-config",
            "tiny",
            "--out",
            bad.to_str().unwrap(),
        ]),
        "--init and --model-config",
    );
    assert_clean_failure(
        fewstep(&[
            "train",
            "--init",
            "/nonexistent/pipeline",
            "--out",
            bad.to_str().unwrap(),
        ]),
        "--init: not found",
    );
    assert_clean_failure(
        fewstep(&[
            "train",
            "--init",
            wide.to_str().unwrap(),
            "--prediction",
            "epsilon",
            "--out",
            bad.to_str().unwrap(),
        ]),
        "give --prediction v_prediction",
    );
    assert!(!bad.exists());
    assert_clean_failure(
        fewstep(&[
            "widen",
            "--model",
            narrow.to_str().unwrap(),
            "--factor",
            "1",
            "--out",
            bad.to_str().unwrap(),
        ]),
        "--factor 1",
    );
    assert_clean_failure(
        fewstep(&[
            "widen",
            "--model",
            narrow.to_str().unwrap(),
            "--out",
            wide.to_str().unwrap(),
        ]),
        "--out",
    );
    let quantized = scratch("train", "widen-int8");
    ok(&fewstep(&[
        "quantize",
        "--model",
        narrow.to_str().unwrap(),
        "--format",
        "int8",
        "--out",
        quantized.to_str().unwrap(),
    ]));
    assert_clean_failure(
        fewstep(&[
            "widen",
            "--model",
            quantized.to_str().unwrap(),
            "--out",
            bad.to_str().unwrap(),
        ]),
        "a quantized UNet cannot be widened",
    );
    assert!(!bad.exists());
}
