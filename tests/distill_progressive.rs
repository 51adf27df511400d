//! `fewstep distill progressive` on a tiny teacher: rounds write loadable student folders,
//! an interrupted run resumes to the uninterrupted result, bad input is one clear line.

mod common;
use common::{
    assert_clean_failure, csv_lines, fewstep, interrupt_after_rows, max_weight_difference, ok,
    scratch, tiny_model, tiny_model_with, widened,
};

use std::path::Path;

use fewstep::io;
use fewstep::pipeline::Pipeline;

fn distill_args<'a>(teacher: &'a Path, out: &'a Path, iters: &'a str) -> Vec<&'a str> {
    vec![
        "distill",
        "progressive",
        "--teacher",
        teacher.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--from-steps",
        "4",
        "--to-steps",
        "1",
        "--iters-per-round",
        iters,
        "--batch",
        "2",
        "--checkpoint-every",
        "3",
        "--no-eval",
        "--quiet",
    ]
}

fn student_weights(out: &Path, steps: usize) -> std::collections::HashMap<String, io::HostTensor> {
    io::read_safetensors(&out.join(format!(
        "round-{steps}steps/unet/diffusion_pytorch_model.safetensors"
    )))
    .unwrap()
}

#[test]
fn rounds_write_students_that_sample_at_their_step_count() {
    let teacher = tiny_model("pd", "teacher-a");
    let out = scratch("pd", "rounds");
    ok(&fewstep(&distill_args(&teacher, &out, "2")));
    for steps in [2usize, 1] {
        let dir = out.join(format!("round-{steps}steps"));
        let p = Pipeline::load(
            &dir,
            &fewstep::backend::cpu_device().expect("a CPU backend is compiled in"),
        )
        .unwrap();
        assert_eq!(p.scheduler.distilled_steps, Some(steps));
        let o = fewstep(&[
            "sample",
            "--model",
            dir.to_str().unwrap(),
            "--num",
            "2",
            "--out",
            out.join(format!("grid{steps}.png")).to_str().unwrap(),
        ]);
        ok(&o);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&format!("in {steps} steps")), "{err}");
    }
    // The student moved away from the teacher.
    let teacher_w =
        io::read_safetensors(&teacher.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let student_w = student_weights(&out, 1);
    let moved = teacher_w.iter().any(|(k, t)| t.data != student_w[k].data);
    assert!(moved);
    // Everything done: --resume finds nothing left and succeeds.
    ok(&fewstep(&[
        "distill",
        "progressive",
        "--out",
        out.to_str().unwrap(),
        "--resume",
        "--no-eval",
        "--quiet",
    ]));
}

#[test]
fn a_round_factor_of_four_makes_one_student_at_a_quarter_of_the_steps() {
    let teacher = tiny_model("pd", "teacher-k");
    let out = scratch("pd", "factor");
    let mut args = distill_args(&teacher, &out, "2");
    args.extend_from_slice(&["--round-factor", "4"]);
    ok(&fewstep(&args));
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["config"]["round_factor"], 4);
    // 4 → 1 in one round: no 2-step student in between.
    assert!(!out.join("round-2steps").exists());
    let dir = out.join("round-1steps");
    let p = Pipeline::load(
        &dir,
        &fewstep::backend::cpu_device().expect("a CPU backend is compiled in"),
    )
    .unwrap();
    assert_eq!(p.scheduler.distilled_steps, Some(1));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("distill.json")).unwrap()).unwrap();
    assert_eq!(record["stage"], "round", "not a halving: {record}");
    assert_eq!(record["teacher_steps_per_step"], 4);
    let teacher_w =
        io::read_safetensors(&teacher.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let student_w = student_weights(&out, 1);
    assert!(teacher_w.iter().any(|(k, t)| t.data != student_w[k].data));
}

#[test]
fn rollout_rows_and_a_capped_weight_train_an_unconditional_student() {
    let teacher = tiny_model("pd", "teacher-d");
    let out = scratch("pd", "rollout");
    let mut args = distill_args(&teacher, &out, "2");
    args.extend_from_slice(&["--rollout-fraction", "1", "--snr-weight-cap", "5"]);
    ok(&fewstep(&args));
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["config"]["rollout_fraction"], 1.0);
    assert_eq!(run["config"]["snr_weight_cap"], 5.0);
    let teacher_w =
        io::read_safetensors(&teacher.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let student_w = student_weights(&out, 1);
    assert!(teacher_w.iter().any(|(k, t)| t.data != student_w[k].data));
}

#[test]
fn a_perceptual_distance_trains_a_class_conditional_student_on_two_devices() {
    let teacher = tiny_model_with("pd", "teacher-lpips", &["--class-conditional"]);
    let first_loss = |loss: &str| {
        let out = scratch("pd", &format!("loss-{loss}"));
        let mut args = distill_args(&teacher, &out, "2");
        args.extend_from_slice(&["--loss", loss, "--devices", "2"]);
        ok(&fewstep(&args));
        let run: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
        let rows = std::fs::read_to_string(out.join("loss.csv")).unwrap();
        let loss_value: f64 = rows
            .lines()
            .nth(1)
            .unwrap()
            .split(',')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert!(loss_value.is_finite() && loss_value > 0.0, "{loss}: {rows}");
        assert!(out.join("round-1steps/model_index.json").is_file());
        (run["config"]["distance"].clone(), loss_value)
    };
    let (l2_recorded, l2) = first_loss("l2");
    let (tf_recorded, tf) = first_loss("teacher-features");
    // L2, the paper's, is not written (old run.json files read as L2).
    assert_eq!(l2_recorded, serde_json::Value::Null);
    assert_eq!(tf_recorded, "teacher_features");
    // Same rows, same student, another distance.
    assert!(
        (tf - l2).abs() > 1e-3 * l2.max(tf),
        "l2 {l2}, teacher-features {tf}"
    );
}

#[test]
fn an_interrupted_run_resumes_to_the_uninterrupted_students() {
    let teacher = tiny_model("pd", "teacher-b");
    let whole = scratch("pd", "whole");
    ok(&fewstep(&distill_args(&teacher, &whole, "30")));

    let split = scratch("pd", "split");
    interrupt_after_rows(
        &distill_args(&teacher, &split, "30"),
        &split.join("loss.csv"),
        8,
    );
    ok(&fewstep(&[
        "distill",
        "progressive",
        "--out",
        split.to_str().unwrap(),
        "--resume",
        "--no-eval",
        "--quiet",
    ]));
    for steps in [2usize, 1] {
        let weights = format!("round-{steps}steps/unet/diffusion_pytorch_model.safetensors");
        let max = max_weight_difference(&whole.join(&weights), &split.join(&weights));
        assert!(max == 0.0, "{steps} steps: resumed differs by {max}");
    }
}

#[test]
fn data_parallel_rounds_match_one_device() {
    let teacher = tiny_model("pd", "teacher-dp");
    let (one, two) = (scratch("pd", "dp-one"), scratch("pd", "dp-two"));
    for (out, devices) in [(&one, "1"), (&two, "2")] {
        let mut args = distill_args(&teacher, out, "3");
        args.extend_from_slice(&["--devices", devices]);
        ok(&fewstep(&args));
    }
    for steps in [2usize, 1] {
        let weights = format!("round-{steps}steps/unet/diffusion_pytorch_model.safetensors");
        let max = max_weight_difference(&one.join(&weights), &two.join(&weights));
        assert!(max < 1e-5, "{steps} steps: {max}");
    }
}

#[test]
fn bad_input_is_one_clear_line() {
    let teacher = tiny_model("pd", "teacher-c");
    let t = teacher.to_str().unwrap();
    let out = scratch("pd", "bad");
    let o = out.to_str().unwrap();
    let base = ["distill", "progressive", "--no-eval", "--out", o];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        fewstep(&a)
    };
    assert_clean_failure(
        with(&["--teacher", t, "--from-steps", "12"]),
        "power of two",
    );
    assert_clean_failure(
        with(&["--teacher", t, "--from-steps", "8", "--to-steps", "8"]),
        "must be below",
    );
    assert_clean_failure(
        with(&[
            "--teacher",
            t,
            "--from-steps",
            "16",
            "--to-steps",
            "2",
            "--round-factor",
            "4",
        ]),
        "power of 4",
    );
    assert_clean_failure(
        with(&["--teacher", t, "--round-factor", "1"]),
        "--round-factor 1",
    );
    assert_clean_failure(with(&["--teacher", "/no/teacher"]), "model_index.json");
    assert_clean_failure(with(&["--teacher", t, "--batch", "0"]), "--batch");
    assert_clean_failure(with(&["--teacher", t, "--ema", "1.5"]), "--ema 1.5");
    assert_clean_failure(
        with(&["--teacher", t, "--rollout-fraction", "0"]),
        "--rollout-fraction 0",
    );
    assert_clean_failure(
        with(&["--teacher", t, "--snr-weight-cap", "0.5"]),
        "--snr-weight-cap 0.5",
    );
    assert_clean_failure(
        fewstep(&["distill", "progressive", "--out", o, "--resume"]),
        "no run to resume",
    );
    assert!(!out.exists(), "nothing written on bad input");
}

#[test]
fn a_widened_teacher_starts_a_wider_student_line() {
    let teacher = tiny_model("pd", "teacher-w");
    let wide = widened("pd", "widened", &teacher);
    let out = scratch("pd", "wide-line");
    let mut args = distill_args(&teacher, &out, "2");
    args.extend_from_slice(&["--init", wide.to_str().unwrap()]);
    ok(&fewstep(&args));
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    for steps in [2usize, 1] {
        let p = Pipeline::load(&out.join(format!("round-{steps}steps")), &device).unwrap();
        assert_eq!(p.unet_config.block_out_channels, vec![16, 32], "{steps}");
    }
    // A different architecture, not a widening, is refused in one line.
    let other_class = scratch("pd", "other-init");
    ok(&fewstep(&[
        "train",
        "--model-config",
        "tiny",
        "--class-conditional",
        "--steps",
        "1",
        "--batch",
        "2",
        "--quiet",
        "--out",
        other_class.to_str().unwrap(),
    ]));
    let bad = scratch("pd", "wide-bad");
    let init = other_class.join("checkpoints/latest");
    let mut args = distill_args(&teacher, &bad, "2");
    args.extend_from_slice(&["--init", init.to_str().unwrap()]);
    assert_clean_failure(fewstep(&args), "or a wider one");
}

#[test]
fn guided_halving_makes_the_first_student_at_half_the_teachers_steps() {
    // Two guided teacher steps (4-step grid) into one w-conditioned student step (2 steps),
    // then one halving round to 1 step: no one-pass student at 4 steps in between.
    let teacher = tiny_model_with("pd", "teacher-g", &["--class-conditional"]);
    let out = scratch("pd", "guided-halving");
    let mut args = distill_args(&teacher, &out, "2");
    args.extend_from_slice(&[
        "--guidance",
        "0,3",
        "--guided-iters",
        "3",
        "--guided-halving",
    ]);
    ok(&fewstep(&args));
    assert!(!out.join("round-4steps").exists());
    let json = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(
        json(&out.join("run.json"))["config"]["guided_halving"],
        true
    );
    assert_eq!(
        json(&out.join("round-2steps/distill.json"))["stage"],
        "guided-halving"
    );
    assert_eq!(
        json(&out.join("round-1steps/distill.json"))["stage"],
        "halving"
    );
    for steps in [2, 1] {
        let config = json(&out.join(format!("round-{steps}steps/unet/config.json")));
        assert_eq!(config["time_cond_proj_dim"], 256, "{steps}");
    }
    // 3 guided + 2 halving iterations, each logged once.
    assert_eq!(csv_lines(&out.join("loss.csv")), 1 + 5);
}
