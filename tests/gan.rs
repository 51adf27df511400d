//! `fewstep train-gan` and `fewstep distill gan` on tiny budgets: GAN folders that sample and
//! evaluate (with parameter and MAC counts), exact resume, and bad input as one clear line.

mod common;
use common::{
    Scratch, assert_clean_failure, fewstep, interrupt_after_rows, max_weight_difference, ok,
    scratch,
};

use std::path::Path;

const G_WEIGHTS: &str = "generator/model.safetensors";

fn teacher_args<'a>(out: &'a Path, iters: &'a str) -> Vec<&'a str> {
    vec![
        "train-gan",
        "--out",
        out.to_str().unwrap(),
        "--iters",
        iters,
        "--batch",
        "4",
        "--width",
        "0.25",
        "--d-width",
        "0.25",
        "--checkpoint-every",
        "3",
        "--quiet",
    ]
}

/// A teacher at full width (so that a quarter-width student is 8× cheaper), trained 2 steps.
fn tiny_teacher(name: &str) -> Scratch {
    let out = scratch("gan", name);
    ok(&fewstep(&[
        "train-gan",
        "--out",
        out.to_str().unwrap(),
        "--iters",
        "2",
        "--batch",
        "4",
        "--quiet",
    ]));
    out
}

#[test]
fn a_teacher_and_its_students_sample_and_evaluate() {
    let teacher = tiny_teacher("teacher-a");
    let student = scratch("gan", "student-a");
    ok(&fewstep(&[
        "distill",
        "gan",
        "--teacher",
        teacher.to_str().unwrap(),
        "--out",
        student.to_str().unwrap(),
        "--iters",
        "2",
        "--batch",
        "4",
        "--lambda-perc",
        "1",
        "--quiet",
    ]));
    let record = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("gan.json")).unwrap()).unwrap()
    };
    let (t, s) = (record(&teacher), record(&student));
    let t_macs = t["generator_macs_per_image"].as_u64().unwrap();
    let s_macs = s["generator_macs_per_image"].as_u64().unwrap();
    assert!(s_macs * 8 < t_macs, "{s_macs} vs {t_macs}");
    assert!(s["discriminator_params"].as_u64() < t["discriminator_params"].as_u64());

    let grid = student.join("grid.png");
    let o = fewstep(&[
        "sample",
        "--model",
        student.to_str().unwrap(),
        "--num",
        "4",
        "--out",
        grid.to_str().unwrap(),
    ]);
    ok(&o);
    assert!(grid.is_file());
    let o = fewstep(&[
        "eval",
        "fid",
        "--model",
        student.to_str().unwrap(),
        "--num-samples",
        "150",
        "--ref-samples",
        "150",
        "--json",
    ]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["source"]["macs_per_image"].as_u64(), Some(s_macs));
    assert!(v["source"]["params"].as_u64().unwrap() > 0);
    assert!(v["fid"].as_f64().unwrap().is_finite());
}

#[test]
fn an_interrupted_teacher_run_resumes_to_the_uninterrupted_weights() {
    let whole = scratch("gan", "whole");
    ok(&fewstep(&teacher_args(&whole, "20")));
    let split = scratch("gan", "split");
    interrupt_after_rows(&teacher_args(&split, "20"), &split.join("loss.csv"), 6);
    let mut resume = teacher_args(&split, "20");
    resume.push("--resume");
    ok(&fewstep(&resume));
    let max = max_weight_difference(&whole.join(G_WEIGHTS), &split.join(G_WEIGHTS));
    assert!(max == 0.0, "resumed differs by {max}");
    // Finished: --resume reports and changes nothing.
    ok(&fewstep(&resume));
}

#[test]
fn bad_input_is_one_clear_line() {
    let out = scratch("gan", "bad");
    let o = out.to_str().unwrap();
    assert_clean_failure(
        fewstep(&["train-gan", "--out", o, "--width", "0"]),
        "--width",
    );
    assert_clean_failure(
        fewstep(&["train-gan", "--out", o, "--batch", "0"]),
        "--batch",
    );
    assert_clean_failure(fewstep(&["train-gan", "--out", o, "--ema", "1.5"]), "--ema");
    assert_clean_failure(
        fewstep(&["train-gan", "--out", o, "--adam-betas", "0.5,1.5"]),
        "--adam-betas",
    );
    assert_clean_failure(
        fewstep(&["distill", "gan", "--teacher", "/tmp", "--out", o]),
        "not a GAN folder",
    );
    let teacher = tiny_teacher("teacher-bad");
    let t = teacher.to_str().unwrap();
    assert_clean_failure(
        fewstep(&[
            "distill",
            "gan",
            "--teacher",
            t,
            "--out",
            o,
            "--lambda-adv=-1",
        ]),
        "--lambda-adv",
    );
    assert_clean_failure(
        fewstep(&["train-gan", "--out", o, "--resume"]),
        "no run to resume",
    );
    assert!(!out.exists(), "nothing written on bad input");
}
