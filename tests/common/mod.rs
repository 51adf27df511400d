//! Helpers shared by the end-to-end tests: scratch folders, running the binary, checking that
//! bad input fails with one clear line.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The repository root. cargo sets CARGO_MANIFEST_DIR when it runs a test, so this is the checkout
/// being tested even when the test binary was compiled in another checkout sharing the target
/// folder (the compile-time value, the fallback, would then name that other checkout).
pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A fresh, absent scratch path unique to this test process, removed (file or folder) when the
/// guard is dropped — unless the test is failing: then it stays, named on stderr, to be looked at.
pub fn scratch(group: &str, name: &str) -> Scratch {
    let root = std::env::temp_dir().join(format!("fewstep-{group}-{name}-{}", std::process::id()));
    remove(&root);
    Scratch {
        path: root.clone(),
        root,
    }
}

/// A folder for fixtures that a test binary makes once and keeps in a static, which is never
/// dropped: a fixed name under cargo's target tmp folder, emptied when the binary first asks for
/// it, so that runs replace it rather than pile up.
pub fn fixture_folder(group: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fewstep-{group}"));
    remove(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A scratch path (see [`scratch`]); derefs to the path it stands for, which may lie inside the
/// scratch root ([`Scratch::at`]).
pub struct Scratch {
    root: PathBuf,
    path: PathBuf,
}

impl Scratch {
    /// The same scratch root, standing for `relative` inside it.
    pub fn at(self, relative: &str) -> Scratch {
        let mut scratch = self;
        scratch.path = scratch.root.join(relative);
        scratch
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.path.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for a look: {}", self.root.display());
        } else {
            remove(&self.root);
        }
    }
}

fn remove(path: &Path) {
    if path.is_dir() {
        let _ = std::fs::remove_dir_all(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

/// The `fewstep` binary on one compute thread. rayon's parallel reductions split where work is
/// stolen, so on a loaded machine two runs of the same step can round differently in the last
/// bit (seen once: 1.5e-8 with a training run beside the tests); the tests compare runs bit for
/// bit across resume, interruption and crashes, not across thread scheduling (the CPU kernels'
/// own tests, in-process, keep the threads). Tiny models run faster so, too.
pub fn command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fewstep"));
    cmd.env("RAYON_NUM_THREADS", "1");
    cmd
}

pub fn fewstep(args: &[&str]) -> Output {
    command().args(args).output().unwrap()
}

/// `fewstep distill consistency --lora-rank 2` of `teacher` into `out` at a high learning rate
/// (adapters that move in a few iterations), plus `extra` (`--iters` among them).
pub fn distill_tiny_lora(teacher: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "distill",
        "consistency",
        "--teacher",
        teacher.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--lora-rank",
        "2",
        "--lr",
        "1e-2",
        "--batch",
        "2",
        "--scales",
        "10",
        "--warmup",
        "1",
        "--no-eval",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    fewstep(&args)
}

pub fn ok(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Exit status 1 (or 2: refused by the argument parser) and a single `error: …` line
/// containing `needle`.
pub fn assert_clean_failure(o: Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(matches!(o.status.code(), Some(1 | 2)), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
}

/// `model` widened 2× by `fewstep widen` (default noise), in the scratch folder `name`.
pub fn widened(group: &str, name: &str, model: &Path) -> Scratch {
    let wide = scratch(group, name);
    ok(&fewstep(&[
        "widen",
        "--model",
        model.to_str().unwrap(),
        "--out",
        wide.to_str().unwrap(),
    ]));
    wide
}

/// A tiny v-prediction model trained for two steps, as a pipeline folder (the run's latest
/// checkpoint): enough for everything that needs a model but not a good one.
pub fn tiny_model(group: &str, name: &str) -> Scratch {
    tiny_model_with(group, name, &[])
}

/// [`tiny_model`] with more `fewstep train` flags (`--class-conditional`, …).
pub fn tiny_model_with(group: &str, name: &str, extra: &[&str]) -> Scratch {
    let run = scratch(group, name);
    train_tiny(&run, extra);
    run.at("checkpoints/latest")
}

/// Trains the tiny v-prediction model for two steps into the run folder `run`.
pub fn train_tiny(run: &Path, extra: &[&str]) {
    let mut args = vec![
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
    ];
    args.extend_from_slice(extra);
    ok(&fewstep(&args));
}

/// The lines of a run's `loss.csv` at `csv`, its header included; 0 while it does not exist.
pub fn csv_lines(csv: &Path) -> usize {
    std::fs::read_to_string(csv)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Waits until `csv` has `lines` lines, failing with `what` after `limit`.
pub fn wait_for_csv_lines(csv: &Path, lines: usize, limit: Duration, what: &str) {
    let started = Instant::now();
    while csv_lines(csv) < lines {
        assert!(started.elapsed() < limit, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `fewstep args`, sends it Ctrl-C (SIGINT) once `csv` has `rows` lines, and returns its
/// output after checking that it stopped cleanly and said how to resume.
pub fn interrupt_after_rows(args: &[&str], csv: &Path, rows: usize) -> Output {
    let child = command().args(args).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_csv_lines(csv, rows, Duration::from_secs(60), "never started");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let o = child.wait_with_output().unwrap();
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("interrupted; resume with"), "{err}");
    o
}

/// The largest absolute difference between same-named tensors of two safetensors files.
pub fn max_weight_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (
        fewstep::io::read_safetensors(a).unwrap(),
        fewstep::io::read_safetensors(b).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    a.iter()
        .flat_map(|(k, t)| t.data.iter().zip(&b[k].data).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max)
}

/// The losses of a run's `loss.csv`, by step.
pub fn losses(run: &Path) -> Vec<f32> {
    std::fs::read_to_string(run.join("loss.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect()
}
