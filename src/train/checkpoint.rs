//! Run folders and crash-safe checkpoints.
//!
//! ```text
//! RUN/run.json                      kind of run and its full configuration
//! RUN/loss.csv                      step, loss, lr, elapsed seconds
//! RUN/checkpoints/latest/           the newest checkpoint
//! RUN/checkpoints/previous/         the one before it
//!   model_index.json unet/ scheduler/   a diffusers pipeline folder (EMA weights)
//!   state/model.safetensors             raw weights
//!   state/param_ids.json                parameter ids by name (the optimizer's keys)
//!   state/optimizer.bpk                 optimizer moments (burnpack)
//!   state/state.json                    step
//! ```
//! A checkpoint is written to `checkpoints/.incoming`, then `latest` becomes `previous` and
//! `.incoming` becomes `latest`: at any instant one complete checkpoint exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io;

pub const RUN_FILE: &str = "run.json";

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// The newest complete checkpoint of a run, if any (`latest`, else `previous` when a crash hit
/// between the two renames).
pub fn latest(run: &Path) -> Option<PathBuf> {
    let dir = checkpoints_dir(run);
    ["latest", "previous"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.join("state").join("state.json").is_file())
}

/// Publishes a fully written `.incoming` checkpoint as `latest`, keeping the former as `previous`,
/// so that `checkpoints/latest` exists at every instant once a first checkpoint was published
/// (`sample --model RUN/checkpoints/latest` never finds it missing, whenever a crash hits):
/// on Linux the two folders are swapped in one atomic `renameat2(RENAME_EXCHANGE)`, then the
/// former `latest` (now `.incoming`) becomes `previous`. Where the exchange is not available the
/// two renames leave a window without `latest`, which [`latest`] covers by reading `previous`.
pub fn publish(run: &Path) -> Result<PathBuf> {
    let dir = checkpoints_dir(run);
    let incoming = dir.join(".incoming");
    let latest = dir.join("latest");
    let previous = dir.join("previous");
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to)
            .map_err(|e| Error::file(to, format!("cannot rename checkpoint: {e}")))
    };
    let remove = |p: &Path| {
        if p.exists() {
            std::fs::remove_dir_all(p)
                .map_err(|e| Error::file(p, format!("cannot remove old checkpoint: {e}")))
        } else {
            Ok(())
        }
    };
    io::crash_point("checkpoint-written");
    if latest.exists() {
        if exchange(&incoming, &latest) {
            // `latest` is the new checkpoint; `.incoming` holds the former one.
            io::crash_point("checkpoint-swapped");
            remove(&previous)?;
            rename(&incoming, &previous)?;
            return Ok(latest);
        }
        remove(&previous)?;
        rename(&latest, &previous)?;
    }
    rename(&incoming, &latest)?;
    Ok(latest)
}

/// Swaps two folders atomically; false where the system or file system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let (Ok(a), Ok(b)) = (
        CString::new(a.as_os_str().as_bytes()),
        CString::new(b.as_os_str().as_bytes()),
    ) else {
        return false;
    };
    // SAFETY: two NUL-terminated paths, relative to the current directory; no memory is shared.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> bool {
    false
}

/// Whether `name` is something a killed fewstep process leaves behind: a temporary file of
/// [`io::write_atomic`] (`.NAME.tmp-PID`), a write probe, or an unpublished folder
/// (`.incoming…`).
fn is_leftover(name: &str) -> bool {
    name.starts_with('.')
        && (name.contains(".tmp-")
            || name.starts_with(".write-test")
            || name.starts_with(".fewstep-write-test")
            || name.starts_with(".incoming"))
}

/// Removes what killed processes left in the run folder `run` (and in `run/checkpoints`): the
/// temporary files of interrupted atomic writes and unpublished checkpoints. Never touches a
/// published file.
pub fn clear_leftovers(run: &Path) {
    for dir in [run.to_path_buf(), checkpoints_dir(run)] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_leftover(&name) {
                continue;
            }
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// A fresh `.incoming` folder to write a checkpoint into.
pub fn incoming(run: &Path) -> Result<PathBuf> {
    let dir = checkpoints_dir(run).join(".incoming");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| Error::file(&dir, format!("cannot clear: {e}")))?;
    }
    std::fs::create_dir_all(dir.join("state"))
        .map_err(|e| Error::file(&dir, format!("cannot create: {e}")))?;
    Ok(dir)
}

/// Writes the training state into `ckpt/state/`: the raw (trained) weights, their parameter ids
/// (the optimizer's moments are keyed by them), the optimizer and `progress` (`state.json`).
pub fn write_state<M: burn::module::Module>(
    ckpt: &Path,
    model: &M,
    optim: &burn::optim::ModuleOptimizer,
    progress: &Value,
) -> Result<()> {
    let s = ckpt.join("state");
    io::save_weights(model, &s.join("model.safetensors"))?;
    write_param_ids(&s.join("param_ids.json"), &io::param_ids(model))?;
    optim.save(s.join("optimizer.bpk")).map_err(|e| {
        Error::file(
            s.join("optimizer.bpk"),
            format!("cannot save the optimizer state: {}", record_error(&e)),
        )
    })?;
    io::write_json(&s.join("state.json"), progress)
}

/// The training state written by [`write_state`]: the model loaded into `init` with its
/// parameter ids restored, the optimizer loaded into `optim`, `state.json`, and the ids (for
/// loading other copies of the model, such as the EMA, under the same ids).
pub struct TrainingState<M> {
    pub model: M,
    pub optim: burn::optim::ModuleOptimizer,
    pub progress: Value,
    pub ids: BTreeMap<String, u64>,
}

pub fn read_state<M: burn::module::Module>(
    ckpt: &Path,
    init: M,
    optim: burn::optim::ModuleOptimizer,
) -> Result<TrainingState<M>> {
    let s = ckpt.join("state");
    let ids = read_param_ids(&s.join("param_ids.json"))?;
    let model = io::load_weights_with_ids(init, &s.join("model.safetensors"), Some(&ids))?;
    let optim = optim.load(s.join("optimizer.bpk")).map_err(|e| {
        Error::file(
            s.join("optimizer.bpk"),
            format!(
                "not a readable optimizer state (corrupt or truncated?): {}",
                record_error(&e)
            ),
        )
    })?;
    let state_path = s.join("state.json");
    let progress: Value = serde_json::from_str(&io::read_text(&state_path)?)
        .map_err(|e| Error::file(&state_path, format!("not valid JSON: {e}")))?;
    Ok(TrainingState {
        model,
        optim,
        progress,
        ids,
    })
}

/// burn's record error as a plain sentence (its Debug text is `Io("Invalid magic number")`).
fn record_error(e: &burn::store::RecordError) -> String {
    match e {
        burn::store::RecordError::Io(m) | burn::store::RecordError::Validation(m) => {
            m.replace('\n', " ")
        }
    }
}

pub fn write_param_ids(path: &Path, ids: &BTreeMap<String, u64>) -> Result<()> {
    io::write_json(path, &serde_json::to_value(ids).expect("ids serialise"))
}

pub fn read_param_ids(path: &Path) -> Result<BTreeMap<String, u64>> {
    serde_json::from_str(&io::read_text(path)?)
        .map_err(|e| Error::file(path, format!("not a parameter id map: {e}")))
}

/// Reads `run.json` and checks that it is a run of `kind`.
pub fn read_run(run: &Path, kind: &str) -> Result<Value> {
    let path = run.join(RUN_FILE);
    if run.is_dir() {
        clear_leftovers(run);
    }
    if !path.is_file() {
        return Err(Error::file(
            run,
            "--resume: no run to resume here (run.json not found)",
        ));
    }
    let mut v: Value = serde_json::from_str(&io::read_text(&path)?)
        .map_err(|e| Error::file(&path, format!("not valid JSON: {e}")))?;
    super::optim::upgrade_stored_run(&mut v);
    match v.get("kind").and_then(Value::as_str) {
        Some(k) if k == kind => Ok(v),
        Some(k) => Err(Error::file(
            &path,
            format!("this folder holds a `{k}` run, not a `{kind}` run"),
        )),
        None => Err(Error::file(
            &path,
            "no `kind` field: not a fewstep run folder",
        )),
    }
}

/// Reads `run.json` as the settings of a `kind` run.
pub fn read_run_as<T: serde::de::DeserializeOwned>(run: &Path, kind: &str) -> Result<T> {
    let v = read_run(run, kind)?;
    serde_json::from_value(v)
        .map_err(|e| Error::file(run.join(RUN_FILE), format!("not a valid `{kind}` run: {e}")))
}

/// The iteration the newest complete checkpoint of `run` holds (0 without one).
pub fn latest_iteration(run: &Path) -> usize {
    latest(run)
        .and_then(|c| io::read_text(&c.join("state").join("state.json")).ok())
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["iter"].as_u64())
        .unwrap_or(0) as usize
}

/// `--resume --iters N`: rewrites the `kind` run's `run.json` in `run` with `N` total
/// iterations (`set_iters` stores them and validates the result), refusing fewer than its
/// latest checkpoint holds. A finished run then continues from its last checkpoint to `N`.
pub fn extend_run<T: serde::Serialize + serde::de::DeserializeOwned>(
    run: &Path,
    kind: &str,
    iters: usize,
    set_iters: impl FnOnce(&mut T, usize) -> Result<()>,
) -> Result<()> {
    let mut settings: T = read_run_as(run, kind)?;
    let done = latest_iteration(run);
    if iters < done {
        return Err(Error::Usage(format!(
            "--iters {iters}: the run in {} is already at iteration {done} (expected at least that)",
            run.display()
        )));
    }
    set_iters(&mut settings, iters)?;
    io::write_json(
        &run.join(RUN_FILE),
        &serde_json::to_value(&settings).expect("run serialises"),
    )
}

/// Undoes [`prepare_new_run`] after a failure before the run's first `run.json`: removes what
/// the run wrote, and the folder itself unless it `existed` (empty) before.
pub fn abandon_new_run(run: &Path, existed: bool) {
    if existed {
        if let Ok(entries) = std::fs::read_dir(run) {
            for entry in entries.flatten() {
                let p = entry.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    } else {
        let _ = std::fs::remove_dir_all(run);
    }
}

/// Checks that `run` can take a new run: absent, empty, or holding only what a killed run left
/// before its `run.json` was written (removed); and writable. Creates the folder.
pub fn prepare_new_run(run: &Path) -> Result<()> {
    if run.is_file() {
        return Err(Error::file(run, "--out: is a file, expected a run folder"));
    }
    if run.is_dir() && !run.join(RUN_FILE).exists() {
        clear_leftovers(run);
        let checkpoints = checkpoints_dir(run);
        if checkpoints.is_dir()
            && std::fs::read_dir(&checkpoints).is_ok_and(|mut d| d.next().is_none())
        {
            let _ = std::fs::remove_dir(&checkpoints);
        }
    }
    if run.exists() {
        let non_empty = std::fs::read_dir(run)
            .map_err(|e| Error::file(run, format!("cannot read: {e}")))?
            .next()
            .is_some();
        if non_empty {
            let what = if run.join(RUN_FILE).exists() {
                "already holds a run (add --resume to continue it)"
            } else {
                "is not empty"
            };
            return Err(Error::file(
                run,
                format!("--out {what}; choose another --out"),
            ));
        }
    }
    std::fs::create_dir_all(run)
        .map_err(|e| Error::file(run, format!("--out is not writable: {e}")))?;
    let probe = run.join(".write-test");
    std::fs::write(&probe, b"")
        .map_err(|e| Error::file(run, format!("--out is not writable: {e}")))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}
