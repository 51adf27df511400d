//! Helpers shared by the end-to-end tests: scratch folders, running the binary, checking that
//! bad input fails with one clear line.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// A fresh, absent scratch path unique to this test process.
pub fn scratch(group: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fewstep-{group}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub fn fewstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fewstep"))
        .args(args)
        .output()
        .unwrap()
}

pub fn ok(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Exit status 1 and a single `error: …` line containing `needle`.
pub fn assert_clean_failure(o: Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
}

/// A tiny v-prediction model trained for two steps, as a pipeline folder (the run's latest
/// checkpoint): enough for everything that needs a model but not a good one.
pub fn tiny_model(group: &str, name: &str) -> PathBuf {
    let run = scratch(group, name);
    ok(&fewstep(&[
        "train",
        "--model-config",
        "tiny",
        "--steps",
        "2",
        "--batch",
        "2",
        "--quiet",
        "--out",
        run.to_str().unwrap(),
    ]));
    run.join("checkpoints/latest")
}
