//! Crash safety: a `train` run SIGKILLed at chosen moments — before its first checkpoint, while a
//! temporary file is written but not renamed (the first `run.json` among them), with a checkpoint
//! complete but unpublished, between the two steps of publishing one, and at arbitrary steps —
//! recovers every time (`--resume`, or the same command when the kill came before the first
//! `run.json`), keeps `checkpoints/latest` whenever a checkpoint was published, leaves no
//! temporary files, logs every step once, and ends with the weights of an uninterrupted run, bit
//! for bit.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{command, csv_lines, max_weight_difference, ok, scratch};

fn train_args(out: &Path) -> Vec<String> {
    [
        "train",
        "--model-config",
        "tiny",
        "--steps",
        "12",
        "--batch",
        "2",
        "--checkpoint-every",
        "3",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn fewstep(args: &[String], crash_at: Option<&str>) -> std::process::Output {
    let mut cmd = command();
    cmd.args(args);
    match crash_at {
        Some(spec) => cmd.env("FEWSTEP_CRASH_AT", spec),
        None => cmd.env_remove("FEWSTEP_CRASH_AT"),
    };
    cmd.output().unwrap()
}

fn killed(o: &std::process::Output) -> bool {
    use std::os::unix::process::ExitStatusExt;
    o.status.signal() == Some(9)
}

/// What a recovered run must look like: every step logged once, no temporary files left.
fn check_run(run: &Path, what: &str) {
    let csv = std::fs::read_to_string(run.join("loss.csv")).unwrap();
    let steps: Vec<usize> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=12).collect::<Vec<_>>(),
        "{what}: loss.csv steps"
    );
    for dir in [run.to_path_buf(), run.join("checkpoints")] {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                !name.contains(".tmp-") && !name.starts_with(".incoming"),
                "{what}: leftover {}",
                entry.path().display()
            );
        }
    }
}

/// Recovers a killed run: `--resume` when its run.json exists, else the same command again.
fn recover(run: &Path, what: &str) {
    let mut args = train_args(run);
    if run.join("run.json").exists() {
        args.push("--resume".into());
    }
    let o = fewstep(&args, None);
    assert!(
        o.status.success(),
        "{what}: recovery `fewstep {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn same_weights(run: &Path, reference: &Path, what: &str) {
    for file in [
        "checkpoints/latest/unet/diffusion_pytorch_model.safetensors",
        "checkpoints/latest/state/model.safetensors",
    ] {
        // Bit for bit: loaded weights are laid out as freshly built ones, and every step draws
        // its data and noise from its own seeded stream.
        let d = max_weight_difference(&run.join(file), &reference.join(file));
        assert!(
            d == 0.0,
            "{what}: {file} differs from the uninterrupted run by {d}"
        );
    }
}

#[test]
fn a_run_killed_anywhere_recovers_to_the_uninterrupted_weights() {
    let reference = scratch("crash", "reference");
    ok(&fewstep(&train_args(&reference), None));
    check_run(&reference, "uninterrupted");

    // Writes of one run: run.json (atomic-write:1), loss.csv's header (2), then the files of
    // each checkpoint (7 atomic writes: the pipeline folder and the training state; so the 9th
    // is inside the first, the 20th inside the third); checkpoints at steps 3, 6, 9, 12.
    let points = [
        "atomic-write:1",
        "atomic-write:2",
        "atomic-write:5",
        "atomic-write:9",
        "atomic-write:20",
        "checkpoint-written:1",
        "checkpoint-written:2",
        "checkpoint-swapped:1",
        "checkpoint-swapped:3",
    ];
    for point in points {
        let run = scratch("crash", &point.replace(':', "-"));
        let o = fewstep(&train_args(&run), Some(point));
        assert!(
            killed(&o),
            "{point}: not killed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // A published checkpoint is never missing, whenever the kill came.
        let published = point.starts_with("checkpoint-swapped")
            || point == "checkpoint-written:2"
            || point == "atomic-write:20";
        if published {
            assert!(
                run.join("checkpoints/latest/model_index.json").is_file(),
                "{point}: checkpoints/latest missing after the kill"
            );
        }
        recover(&run, point);
        check_run(&run, point);
        same_weights(&run, &reference, point);
        let _ = std::fs::remove_dir_all(&run);
    }

    // SIGKILL from outside at arbitrary moments: once loss.csv has k rows.
    for rows in [2, 6, 11] {
        let what = format!("SIGKILL after {} steps", rows - 1);
        let run = scratch("crash", &format!("rows-{rows}"));
        let mut child = command()
            .args(train_args(&run))
            .env_remove("FEWSTEP_CRASH_AT")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        loop {
            if csv_lines(&run.join("loss.csv")) >= rows || child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{what}: never got there"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        recover(&run, &what);
        check_run(&run, &what);
        same_weights(&run, &reference, &what);
        let _ = std::fs::remove_dir_all(&run);
    }
    let _ = std::fs::remove_dir_all(&reference);
}
