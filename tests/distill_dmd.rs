//! `fewstep distill dmd` on tiny teachers: the generator is an LCM pipeline folder that samples
//! in 1 and 2 steps, started from a consistency student or the teacher; an interrupted run
//! resumes to the uninterrupted generator and a finished one extends with `--resume --iters`;
//! DMD2's adversarial term trains heads on the fake network and resumes exactly; two devices
//! train the one-device generator; bad input is one clear line.

mod common;
use common::{
    assert_clean_failure, csv_lines, fewstep, interrupt_after_rows, max_weight_difference, ok,
    scratch, tiny_model,
};

use std::path::Path;

use fewstep::pipeline::Pipeline;
use fewstep_schedulers::Algorithm;

const WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";

fn dmd_args<'a>(teacher: &'a Path, out: &'a Path, iters: &'a str) -> Vec<&'a str> {
    vec![
        "distill",
        "dmd",
        "--teacher",
        teacher.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--iters",
        iters,
        "--batch",
        "2",
        "--fake-updates",
        "2",
        "--fake-warmup",
        "1",
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "3",
        "--no-eval",
        "--quiet",
    ]
}

/// `distill dmd --resume` of the run in `out`, with `extra` flags.
fn resume(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "distill",
        "dmd",
        "--out",
        out.to_str().unwrap(),
        "--resume",
        "--no-eval",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    fewstep(&args)
}

fn samples_in(dir: &Path, steps: usize) {
    let o = fewstep(&[
        "sample",
        "--model",
        dir.to_str().unwrap(),
        "--steps",
        &steps.to_string(),
        "--num",
        "2",
        "--out",
        dir.join(format!("grid{steps}.png")).to_str().unwrap(),
    ]);
    ok(&o);
}

#[test]
fn the_generator_is_an_lcm_pipeline_from_the_teacher_or_a_consistency_student() {
    let teacher = tiny_model("dmd", "teacher-a");
    // From the teacher itself: read as a consistency function on a 10-scale grid.
    let out = scratch("dmd", "from-teacher");
    let mut args = dmd_args(&teacher, &out, "3");
    args.extend_from_slice(&["--scales", "10", "--sampling-steps", "2", "--ema", "0.9"]);
    ok(&fewstep(&args));
    let dir = out.join("student");
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    let p = Pipeline::load(&dir, &device).unwrap();
    assert_eq!(p.scheduler.class, Some(Algorithm::Lcm));
    assert_eq!(
        p.scheduler.resolve(Algorithm::Lcm).original_inference_steps,
        10
    );
    for steps in [1, 2] {
        samples_in(&dir, steps);
    }
    assert!(max_weight_difference(&teacher.join(WEIGHTS), &dir.join(WEIGHTS)) > 0.0);
    assert!(
        out.join("checkpoints/latest/fake/state/model.safetensors")
            .is_file(),
        "the fake score network is checkpointed"
    );
    // From that generator as --init (an LCM pipeline: its own 10-point grid is kept, not
    // --scales), with the regression term towards it.
    let again = scratch("dmd", "from-student");
    let mut args = dmd_args(&teacher, &again, "2");
    args.extend_from_slice(&[
        "--init",
        dir.to_str().unwrap(),
        "--regression",
        "0.25",
        "--scales",
        "5",
    ]);
    ok(&fewstep(&args));
    let p = Pipeline::load(&again.join("student"), &device).unwrap();
    assert_eq!(
        p.scheduler.resolve(Algorithm::Lcm).original_inference_steps,
        10
    );
    samples_in(&again.join("student"), 1);
}

#[test]
fn an_interrupted_run_resumes_to_the_uninterrupted_generator() {
    // The fake score network, both optimisers and the generator's EMA are in the checkpoint:
    // without any of them the resumed run would differ.
    let teacher = tiny_model("dmd", "teacher-b");
    let args = |out: &Path| -> Vec<String> {
        let mut a: Vec<String> = dmd_args(&teacher, out, "12")
            .into_iter()
            .map(String::from)
            .collect();
        for x in ["--scales", "10", "--sampling-steps", "2", "--ema", "0.9"] {
            a.push(x.into());
        }
        a
    };
    let whole = scratch("dmd", "whole");
    let a = args(&whole);
    ok(&fewstep(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let split = scratch("dmd", "split");
    let a = args(&split);
    interrupt_after_rows(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        &split.join("loss.csv"),
        5,
    );
    assert!(!split.join("student").exists());
    ok(&resume(&split, &[]));
    let w = format!("student/{WEIGHTS}");
    let max = max_weight_difference(&whole.join(&w), &split.join(&w));
    assert!(max == 0.0, "resumed differs by {max}");
    // A finished 8-iteration run, extended with `--resume --iters 12`, is the 12-iteration run;
    // fewer iterations than it has done are refused and leave it as it was.
    let short = scratch("dmd", "short");
    let mut a = args(&short);
    let at = a.iter().position(|x| x == "--iters").unwrap();
    a[at + 1] = "8".into();
    ok(&fewstep(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let extend = |iters: &str| resume(&short, &["--iters", iters]);
    let run_json = std::fs::read_to_string(short.join("run.json")).unwrap();
    assert_clean_failure(extend("5"), "--iters 5");
    assert_eq!(
        std::fs::read_to_string(short.join("run.json")).unwrap(),
        run_json
    );
    ok(&extend("12"));
    let max = max_weight_difference(&whole.join(&w), &short.join(&w));
    assert!(max == 0.0, "extended differs by {max}");
    assert_eq!(
        csv_lines(&short.join("loss.csv")),
        13,
        "loss.csv: a header and 12 iterations"
    );
}

#[test]
fn the_adversarial_term_trains_heads_on_the_fake_network_and_resumes_exactly() {
    let teacher = tiny_model("dmd", "teacher-g");
    let args = |out: &Path, gan: bool| -> Vec<String> {
        let mut a: Vec<String> = dmd_args(&teacher, out, "8")
            .into_iter()
            .map(String::from)
            .collect();
        if gan {
            for x in ["--gan-weight", "0.5", "--gan-fake-weight", "0.5"] {
                a.push(x.into());
            }
        }
        a
    };
    let run = |a: Vec<String>| ok(&fewstep(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let plain = scratch("dmd", "gan-plain");
    run(args(&plain, false));
    let whole = scratch("dmd", "gan-whole");
    run(args(&whole, true));
    let stored = std::fs::read_to_string(whole.join("run.json")).unwrap();
    assert!(stored.contains("\"generator_weight\": 0.5"), "{stored}");
    let heads = whole.join("checkpoints/latest/gan/state/model.safetensors");
    assert!(heads.is_file(), "the heads are checkpointed");
    assert!(!plain.join("checkpoints/latest/gan").exists());
    let w = format!("student/{WEIGHTS}");
    let gap = max_weight_difference(&plain.join(&w), &whole.join(&w));
    assert!(gap > 0.0, "the adversarial term changes the generator");
    samples_in(&whole.join("student"), 1);
    // Interrupted after 3 iterations: the heads and their optimiser come back with the rest.
    let split = scratch("dmd", "gan-split");
    let a = args(&split, true);
    interrupt_after_rows(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        &split.join("loss.csv"),
        3,
    );
    ok(&resume(&split, &[]));
    let max = max_weight_difference(&whole.join(&w), &split.join(&w));
    assert!(max == 0.0, "resumed differs by {max}");
}

#[test]
fn two_devices_train_the_one_device_generator() {
    // Every term at once: the adversarial heads (trained with the fake network in one backward
    // pass, stepped by their own optimiser) and the regression term, sharded over two workers.
    let teacher = tiny_model("dmd", "teacher-dp");
    let (one, two) = (scratch("dmd", "dp-one"), scratch("dmd", "dp-two"));
    for (out, devices) in [(&one, "1"), (&two, "2")] {
        let mut args = dmd_args(&teacher, out, "4");
        let terms = ["--gan-weight", "0.5", "--regression", "0.25"];
        args.extend_from_slice(&terms);
        args.extend_from_slice(&["--devices", devices]);
        ok(&fewstep(&args));
    }
    for w in [
        format!("student/{WEIGHTS}"),
        "checkpoints/latest/fake/state/model.safetensors".into(),
        "checkpoints/latest/gan/state/model.safetensors".into(),
    ] {
        let max = max_weight_difference(&one.join(&w), &two.join(&w));
        assert!(max < 1e-4, "{w}: two devices differ from one by {max}");
    }
}

#[test]
fn bad_dmd_input_is_one_clear_line_and_writes_nothing() {
    let teacher = tiny_model("dmd", "teacher-c");
    let cases: [(&str, &[&str], &str); 7] = [
        ("1", &[], "--fake-warmup 1"),
        ("3", &["--gan-weight", "0"], "--gan-weight"),
        ("3", &["--gan-fake-weight", "0.1"], "--gan-weight"),
        (
            "3",
            &["--scales", "10", "--sampling-steps", "11"],
            "--sampling-steps 11",
        ),
        ("3", &["--quantize", "int8"], "--quantize"),
        ("3", &["--devices", "0"], "--devices"),
        ("3", &["--guidance", "2"], "--guidance"),
    ];
    for (i, (iters, extra, needle)) in cases.iter().enumerate() {
        let out = scratch("dmd", &format!("bad-{i}"));
        let mut args = dmd_args(&teacher, &out, iters);
        args.extend_from_slice(extra);
        assert_clean_failure(fewstep(&args), needle);
        assert!(!out.exists(), "{needle}: nothing written on bad input");
    }
}
