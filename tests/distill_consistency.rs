//! `fewstep distill consistency` on tiny teachers: the student is an LCM pipeline folder that
//! samples in 1, 2 and 4 steps (pixel, latent, guided class-conditional), an interrupted run
//! resumes to the uninterrupted student, bad input is one clear line.

mod common;
use common::{
    assert_clean_failure, csv_lines, fewstep, interrupt_after_rows, losses, max_weight_difference,
    ok, scratch, tiny_model, tiny_model_with, widened,
};

use std::path::Path;

use fewstep::pipeline::Pipeline;
use fewstep_schedulers::Algorithm;

const WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";

fn distill_args<'a>(teacher: &'a Path, out: &'a Path, iters: &'a str) -> Vec<&'a str> {
    vec![
        "distill",
        "consistency",
        "--teacher",
        teacher.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--iters",
        iters,
        "--batch",
        "2",
        "--scales",
        "10",
        "--warmup",
        "2",
        "--checkpoint-every",
        "3",
        "--no-eval",
        "--quiet",
    ]
}

/// Samples `steps` steps from `dir` with its own (LCM) scheduler.
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
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("in {steps} steps")), "{err}");
}

#[test]
fn the_student_is_an_lcm_pipeline_that_samples_in_one_to_four_steps() {
    let teacher = tiny_model("cd", "teacher-a");
    let out = scratch("cd", "student");
    ok(&fewstep(&distill_args(&teacher, &out, "3")));
    let dir = out.join("student");
    let p = Pipeline::load(
        &dir,
        &fewstep::backend::cpu_device().expect("a CPU backend is compiled in"),
    )
    .unwrap();
    assert_eq!(p.scheduler.class, Some(Algorithm::Lcm));
    let resolved = p.scheduler.resolve(Algorithm::Lcm);
    assert_eq!(resolved.original_inference_steps, 10);
    assert_eq!(resolved.timestep_scaling, 10.0);
    for steps in [1, 2, 4] {
        samples_in(&dir, steps);
    }
    assert!(max_weight_difference(&teacher.join(WEIGHTS), &dir.join(WEIGHTS)) > 0.0);
    // Done: --resume finds nothing left and succeeds.
    ok(&fewstep(&[
        "distill",
        "consistency",
        "--out",
        out.to_str().unwrap(),
        "--resume",
        "--no-eval",
        "--quiet",
    ]));
}

#[test]
fn latent_and_guided_class_conditional_teachers_distill() {
    let latent = common::repo().join("tests/fixtures/models/pipe_latent");
    let out = scratch("cd", "latent");
    let mut args = distill_args(&latent, &out, "2");
    args.extend_from_slice(&["--solver", "heun"]);
    ok(&fewstep(&args));
    let dir = out.join("student");
    assert!(dir.join("vae/config.json").is_file());
    samples_in(&dir, 2);
    // The teacher-feature discriminator judges latents; the pixel one takes 3-channel images.
    let out = scratch("cd", "latent-adversarial");
    let mut args = distill_args(&latent, &out, "2");
    args.extend_from_slice(&["--adversarial", "0.1"]);
    ok(&fewstep(&args));
    samples_in(&out.join("student"), 1);
    let out = scratch("cd", "latent-pixels");
    let mut args = distill_args(&latent, &out, "2");
    args.extend_from_slice(&["--adversarial", "0.1", "--adversarial-backbone", "pixels"]);
    assert_clean_failure(fewstep(&args), "--adversarial-backbone pixels");
    assert!(!out.exists(), "nothing written on bad input");

    let teacher = tiny_model_with("cd", "teacher-class", &["--class-conditional"]);
    let out = scratch("cd", "guided");
    let mut args = distill_args(&teacher, &out, "2");
    args.extend_from_slice(&["--guidance", "2.5", "--scales-start", "5"]);
    ok(&fewstep(&args));
    samples_in(&out.join("student"), 1);
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["config"]["guidance"]["min"], 2.5);
    assert_eq!(run["config"]["scales_start"], 5);
    // A fixed w keeps the student a plain UNet2DModel.
    let config = std::fs::read_to_string(out.join("student/unet/config.json")).unwrap();
    assert!(!config.contains("time_cond_proj_dim"), "{config}");

    // A range of w: the student takes w through a guidance-scale embedding.
    let out = scratch("cd", "guided-range");
    let mut args = distill_args(&teacher, &out, "2");
    args.extend_from_slice(&["--guidance", "1,4"]);
    ok(&fewstep(&args));
    let dir = out.join("student");
    let p = Pipeline::load(
        &dir,
        &fewstep::backend::cpu_device().expect("a CPU backend is compiled in"),
    )
    .unwrap();
    assert_eq!(p.unet_config.time_cond_proj_dim, Some(256));
    assert!(p.unet.takes_guidance());
    let grid = dir.join("g.png");
    let sample = |extra: &[&str]| {
        let mut a = vec![
            "sample",
            "--model",
            dir.to_str().unwrap(),
            "--steps",
            "2",
            "--num",
            "2",
            "--out",
            grid.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        fewstep(&a)
    };
    assert_clean_failure(sample(&[]), "--guidance-scale");
    ok(&sample(&["--guidance-scale", "3.5"]));
}

/// Runs `args` (a run into `out`), interrupts it after `rows` iterations, checks that no student
/// was written, and resumes it to the end.
fn interrupt_and_resume(args: &[&str], out: &Path, rows: usize) {
    interrupt_after_rows(args, &out.join("loss.csv"), rows);
    assert!(!out.join("student").exists());
    ok(&fewstep(&[
        "distill",
        "consistency",
        "--out",
        out.to_str().unwrap(),
        "--resume",
        "--no-eval",
        "--quiet",
    ]));
}

#[test]
fn an_interrupted_run_resumes_to_the_uninterrupted_student() {
    let teacher = tiny_model("cd", "teacher-b");
    let whole = scratch("cd", "whole");
    ok(&fewstep(&distill_args(&teacher, &whole, "20")));
    let split = scratch("cd", "split");
    interrupt_and_resume(&distill_args(&teacher, &split, "20"), &split, 6);
    let w = format!("student/{WEIGHTS}");
    let max = max_weight_difference(&whole.join(&w), &split.join(&w));
    assert!(max == 0.0, "resumed differs by {max}");
}

#[test]
fn an_interrupted_adversarial_run_resumes_to_the_uninterrupted_student() {
    // The discriminator's weights and optimiser are part of the checkpoint: without them the
    // resumed run would judge with fresh ones and differ.
    let teacher = tiny_model("cd", "teacher-adv");
    let plain = scratch("cd", "adv-plain");
    ok(&fewstep(&distill_args(&teacher, &plain, "12")));
    for backbone in ["teacher-features", "pixels"] {
        let args = |out: &Path| -> Vec<String> {
            let mut a: Vec<String> = distill_args(&teacher, out, "12")
                .into_iter()
                .map(String::from)
                .collect();
            for x in [
                "--adversarial",
                "0.5",
                "--adversarial-backbone",
                backbone,
                "--adversarial-start",
                "2",
                "--adversarial-max-t",
                "100",
            ] {
                a.push(x.into());
            }
            a
        };
        let whole = scratch("cd", &format!("adv-whole-{backbone}"));
        let a = args(&whole);
        ok(&fewstep(&a.iter().map(String::as_str).collect::<Vec<_>>()));
        assert!(
            whole
                .join("checkpoints/latest/discriminator/state/model.safetensors")
                .is_file(),
            "{backbone}: the discriminator is checkpointed"
        );
        let w = format!("student/{WEIGHTS}");
        let gap = max_weight_difference(&whole.join(&w), &plain.join(&w));
        assert!(
            gap > 0.0,
            "{backbone}: the adversarial term changes the student"
        );
        let split = scratch("cd", &format!("adv-split-{backbone}"));
        let a = args(&split);
        interrupt_and_resume(&a.iter().map(String::as_str).collect::<Vec<_>>(), &split, 7);
        let max = max_weight_difference(&whole.join(&w), &split.join(&w));
        assert!(max == 0.0, "{backbone}: resumed differs by {max}");
    }
}

#[test]
fn a_finished_run_extends_with_resume_iters_to_the_longer_runs_student() {
    let teacher = tiny_model("cd", "teacher-x");
    let whole = scratch("cd", "x-whole");
    ok(&fewstep(&distill_args(&teacher, &whole, "20")));
    let short = scratch("cd", "x-short");
    ok(&fewstep(&distill_args(&teacher, &short, "12")));
    let resume = |iters: &str| {
        fewstep(&[
            "distill",
            "consistency",
            "--out",
            short.to_str().unwrap(),
            "--resume",
            "--iters",
            iters,
            "--no-eval",
            "--quiet",
        ])
    };
    assert_clean_failure(resume("6"), "--iters 6");
    ok(&resume("20"));
    let w = format!("student/{WEIGHTS}");
    let max = max_weight_difference(&whole.join(&w), &short.join(&w));
    assert!(max == 0.0, "extended differs by {max}");
    assert_eq!(
        csv_lines(&short.join("loss.csv")),
        21,
        "loss.csv: a header and 20 iterations"
    );
}

#[test]
fn data_parallel_distillation_matches_one_device() {
    // Guided class-conditional: labels and per-example guidance scales shard with the images;
    // the teacher-feature distance and the adversarial term's generator loss run a frozen
    // teacher (and discriminator) per device on its autodiff side.
    let teacher = tiny_model_with("cd", "teacher-dp", &["--class-conditional"]);
    let adversarial = ["--adversarial", "0.5", "--adversarial-max-t", "100"];
    for (loss, extra, stored) in [
        ("huber", &[][..], "pseudo_huber"),
        ("teacher-features", &[][..], "teacher_features"),
        ("huber", &adversarial[..], "backbone"),
    ] {
        let name = format!("{loss}{}", extra.len());
        let (one, two) = (
            scratch("cd", &format!("dp-one-{name}")),
            scratch("cd", &format!("dp-two-{name}")),
        );
        for (out, devices) in [(&one, "1"), (&two, "2")] {
            let mut args = distill_args(&teacher, out, "3");
            args.extend_from_slice(&["--guidance", "1,4", "--devices", devices, "--loss", loss]);
            args.extend_from_slice(extra);
            ok(&fewstep(&args));
        }
        let run = std::fs::read_to_string(two.join("run.json")).unwrap();
        assert!(run.contains(&format!("\"{stored}\"")), "{name}: {run}");
        let student = format!("student/{WEIGHTS}");
        let max = max_weight_difference(&one.join(&student), &two.join(&student));
        assert!(max < 1e-5, "{loss}: {max}");
        let (a, b) = (losses(&one), losses(&two));
        assert_eq!(a.len(), 3);
        for (a, b) in a.iter().zip(b) {
            assert!(a.is_finite() && *a > 0.0, "{loss}: loss {a}");
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1e-3),
                "{loss}: loss {a} vs {b}"
            );
        }
    }
}

#[test]
fn bad_input_is_one_clear_line() {
    let teacher = tiny_model("cd", "teacher-c");
    let t = teacher.to_str().unwrap();
    let out = scratch("cd", "bad");
    let o = out.to_str().unwrap();
    let base = ["distill", "consistency", "--no-eval", "--out", o];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        fewstep(&a)
    };
    assert_clean_failure(
        with(&["--teacher", t, "--guidance", "3"]),
        "class-conditional",
    );
    assert_clean_failure(with(&["--teacher", t, "--scales", "0"]), "--scales");
    assert_clean_failure(with(&["--teacher", t, "--ema", "1"]), "--ema 1:");
    assert_clean_failure(
        with(&["--teacher", t, "--scales", "1001"]),
        "num_train_timesteps",
    );
    assert_clean_failure(
        with(&["--teacher", t, "--scales", "20", "--scales-start", "40"]),
        "--scales-start",
    );
    assert_clean_failure(with(&["--teacher", t, "--eval-steps", "0"]), "--eval-steps");
    assert_clean_failure(
        with(&["--teacher", t, "--target-ema", "1.5"]),
        "--target-ema",
    );
    assert_clean_failure(with(&["--teacher", "/no/teacher"]), "model_index.json");
    assert_clean_failure(
        with(&["--teacher", t, "--adversarial", "0"]),
        "--adversarial",
    );
    assert_clean_failure(
        with(&[
            "--teacher",
            t,
            "--adversarial",
            "0.1",
            "--adversarial-max-t",
            "1000",
        ]),
        "--adversarial-max-t 1000",
    );
    assert_clean_failure(
        with(&["--teacher", t, "--adversarial-lr", "1e-3"]),
        "--adversarial",
    );
    assert_clean_failure(
        fewstep(&["distill", "consistency", "--out", o, "--resume"]),
        "no run to resume",
    );
    assert!(!out.exists(), "nothing written on bad input");
}

#[test]
fn a_widened_teacher_starts_a_wider_consistency_student() {
    let teacher = tiny_model("cd", "teacher-w");
    let wide = widened("cd", "widened", &teacher);
    let out = scratch("cd", "wide-student");
    let mut args = distill_args(&teacher, &out, "2");
    args.extend_from_slice(&["--init", wide.to_str().unwrap()]);
    ok(&fewstep(&args));
    let device = fewstep::backend::cpu_device().expect("a CPU backend is compiled in");
    let p = Pipeline::load(&out.join("student"), &device).unwrap();
    assert_eq!(p.unet_config.block_out_channels, vec![16, 32]);
    samples_in(&out.join("student"), 1);
    // Adapters belong to the teacher's own architecture.
    let lora = scratch("cd", "wide-lora");
    let mut args = distill_args(&teacher, &lora, "2");
    args.extend_from_slice(&["--init", wide.to_str().unwrap(), "--lora-rank", "2"]);
    assert_clean_failure(fewstep(&args), "drop --lora-rank");
}
