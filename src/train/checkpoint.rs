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

/// Publishes a fully written `.incoming` checkpoint as `latest`, keeping the former as `previous`.
pub fn publish(run: &Path) -> Result<PathBuf> {
    let dir = checkpoints_dir(run);
    let incoming = dir.join(".incoming");
    let latest = dir.join("latest");
    let previous = dir.join("previous");
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to)
            .map_err(|e| Error::file(to, format!("cannot rename checkpoint: {e}")))
    };
    if latest.exists() {
        if previous.exists() {
            std::fs::remove_dir_all(&previous).map_err(|e| {
                Error::file(&previous, format!("cannot remove old checkpoint: {e}"))
            })?;
        }
        rename(&latest, &previous)?;
    }
    rename(&incoming, &latest)?;
    Ok(latest)
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
            format!("cannot save optimizer state: {e:?}"),
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
            format!("cannot load optimizer state: {e:?}"),
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
    if !path.is_file() {
        return Err(Error::file(
            run,
            "--resume: no run to resume here (run.json not found)",
        ));
    }
    let v: Value = serde_json::from_str(&io::read_text(&path)?)
        .map_err(|e| Error::file(&path, format!("not valid JSON: {e}")))?;
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

/// Checks that `run` can take a new run: absent or empty, and writable.
pub fn prepare_new_run(run: &Path) -> Result<()> {
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
