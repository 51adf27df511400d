//! diffusers folders ↔ modules: safetensors weights with diffusers' parameter names, configs,
//! pipeline folders (`model_index.json`, `unet/`, `scheduler/`, `vae/`), atomic writes.
//!
//! burn stores a `Linear` weight as [in, out] and a `GroupNorm`'s affine parameters as
//! `gamma`/`beta`; PyTorch stores [out, in] and `weight`/`bias`. The mapping happens here, once,
//! by walking the module tree with its parameter paths.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::TensorData;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

pub const WEIGHTS_NAME: &str = "diffusion_pytorch_model.safetensors";
pub const CONFIG_NAME: &str = "config.json";
pub const SCHEDULER_CONFIG_NAME: &str = "scheduler_config.json";

/// Fault injection for the crash-safety tests: when `FEWSTEP_CRASH_AT` is `NAME:N`, the N-th
/// time (from 1) the process reaches the crash point `NAME` it kills itself with SIGKILL — no
/// destructors, no flushing, as a power cut or the OOM killer would. Points: `atomic-write`
/// (a temporary file written, not yet renamed), `checkpoint-written` (a checkpoint complete in
/// `.incoming`, not yet published), `checkpoint-swapped` (published as `latest`, the former one
/// not yet moved to `previous`). Unset, it costs one environment lookup per call.
pub fn crash_point(name: &str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static HITS: std::sync::Mutex<Vec<(String, AtomicUsize)>> = std::sync::Mutex::new(Vec::new());
    let Some(spec) = std::env::var_os("FEWSTEP_CRASH_AT") else {
        return;
    };
    let spec = spec.to_string_lossy();
    let Some((point, n)) = spec.split_once(':') else {
        return;
    };
    if point != name {
        return;
    }
    let target: usize = n.parse().unwrap_or(1);
    let mut hits = HITS.lock().unwrap_or_else(|e| e.into_inner());
    let count = match hits.iter().find(|(p, _)| p == name) {
        Some((_, c)) => c.fetch_add(1, Ordering::SeqCst) + 1,
        None => {
            hits.push((name.to_string(), AtomicUsize::new(1)));
            1
        }
    };
    if count == target {
        eprintln!("FEWSTEP_CRASH_AT={spec}: killing the process at `{name}`");
        #[cfg(target_os = "linux")]
        // SAFETY: sends a signal to this process; no memory is involved.
        unsafe {
            libc::kill(std::process::id() as libc::pid_t, libc::SIGKILL);
        }
        std::process::abort();
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a crash
/// leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::file(dir, format!("cannot create folder: {e}")))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| Error::file(path, format!("cannot write: {e}")))?;
    crash_point("atomic-write");
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::file(path, format!("cannot replace: {e}"))
    })
}

/// Writes the folder `dir` whole: `write` fills a temporary sibling (`.incoming-<name>`), which
/// then replaces `dir`, so a crash never leaves a half-written folder under the final name.
pub fn write_dir_atomic(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .map_or_else(|| "folder".into(), |n| n.to_string_lossy().into_owned());
    let incoming = parent.join(format!(".incoming-{name}"));
    if incoming.exists() {
        std::fs::remove_dir_all(&incoming)
            .map_err(|e| Error::file(&incoming, format!("cannot clear: {e}")))?;
    }
    if let Err(e) = write(&incoming) {
        let _ = std::fs::remove_dir_all(&incoming);
        // Name the folder the user asked for, not the temporary one.
        return Err(match e {
            Error::File { path, message } => Error::File {
                path: path
                    .strip_prefix(&incoming)
                    .map(|rest| dir.join(rest))
                    .unwrap_or(path),
                message,
            },
            other => other,
        });
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|e| Error::file(dir, format!("cannot replace: {e}")))?;
    }
    std::fs::rename(&incoming, dir)
        .map_err(|e| Error::file(dir, format!("cannot rename the new folder into place: {e}")))
}

/// The nearest folder at or above `path` that exists, checked writable by creating and removing
/// a probe file in it (nothing is left behind). `flag` names the option in errors.
fn writable_ancestor(path: &Path, start: &Path, flag: &str) -> Result<PathBuf> {
    let mut at = start.to_path_buf();
    loop {
        if at.as_os_str().is_empty() {
            at = PathBuf::from(".");
        }
        if at.exists() {
            break;
        }
        match at.parent() {
            Some(p) => at = p.to_path_buf(),
            None => {
                return Err(Error::file(
                    path,
                    format!("{flag}: no existing folder above it"),
                ));
            }
        }
    }
    if !at.is_dir() {
        return Err(Error::file(
            path,
            format!("{flag}: {} is a file, not a folder", at.display()),
        ));
    }
    let probe = at.join(format!(".fewstep-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| {
        Error::file(
            path,
            format!("{flag}: cannot write in {}: {e}", at.display()),
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(at)
}

/// Checks, before any work, that a command can create the folder `dir` for its output: absent or
/// empty, and writable (or creatable under a writable folder). Creates nothing.
pub fn check_new_folder(dir: &Path, flag: &str) -> Result<()> {
    if dir.is_file() {
        return Err(Error::file(
            dir,
            format!("{flag}: is a file, expected a folder"),
        ));
    }
    if dir.is_dir() {
        let non_empty = std::fs::read_dir(dir)
            .map_err(|e| Error::file(dir, format!("{flag}: cannot read: {e}")))?
            .next()
            .is_some();
        if non_empty {
            return Err(Error::file(
                dir,
                format!(
                    "{flag} already holds files; choose another {flag} (nothing is overwritten)"
                ),
            ));
        }
    }
    writable_ancestor(dir, dir, flag).map(|_| ())
}

/// Checks, before any work, that a command can write the file `path`: not a folder, and in a
/// writable (or creatable) folder. Creates nothing.
pub fn check_output_file(path: &Path, flag: &str) -> Result<()> {
    if path.is_dir() {
        return Err(Error::file(
            path,
            format!("{flag}: is a folder, expected a file name"),
        ));
    }
    if path.file_name().is_none() {
        return Err(Error::file(path, format!("{flag}: expected a file name")));
    }
    writable_ancestor(path, path.parent().unwrap_or(Path::new(".")), flag).map(|_| ())
}

pub fn read_text(path: &Path) -> Result<String> {
    if path.is_dir() {
        return Err(Error::file(path, "is a folder, expected a file"));
    }
    std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::file(path, "file not found"),
        _ => Error::file(path, format!("cannot read: {e}")),
    })
}

/// The PyTorch name of a burn parameter and whether its layout is transposed.
fn torch_name(path: &[String], container: &str) -> (String, bool) {
    let mut parts: Vec<String> = path.to_vec();
    let mut transpose = false;
    if let Some(last) = parts.last_mut() {
        match (container, last.as_str()) {
            ("Struct:GroupNorm" | "Struct:LayerNorm" | "Struct:BatchNorm", "gamma") => {
                *last = "weight".into()
            }
            ("Struct:GroupNorm" | "Struct:LayerNorm" | "Struct:BatchNorm", "beta") => {
                *last = "bias".into()
            }
            ("Struct:Linear", "weight") => transpose = true,
            _ => {}
        }
    }
    (parts.join("."), transpose)
}

/// Tracks the module path (`down_blocks.0.resnets.1.conv1.weight`) during a walk.
#[derive(Default)]
pub struct PathTracker {
    path: Vec<String>,
    containers: Vec<String>,
}

impl PathTracker {
    /// An enum's variant (a module that is one of several kinds, e.g. a UNet block's spatial
    /// attention or transformer) adds no segment: diffusers names the field, not the kind.
    pub fn enter(&mut self, name: &str, container: &str) {
        if !container.starts_with("Enum:") {
            self.path.push(name.to_string());
        }
        self.containers.push(container.to_string());
    }
    pub fn exit(&mut self) {
        if !self
            .containers
            .pop()
            .is_some_and(|c| c.starts_with("Enum:"))
        {
            self.path.pop();
        }
    }
    /// The module path as burn names it, dot-joined (enum variants left out).
    pub fn joined(&self) -> String {
        self.path.join(".")
    }
    /// The container type of the innermost module entered (`Struct:Conv2d`, …).
    pub fn container(&self) -> &str {
        self.containers.last().map(String::as_str).unwrap_or("")
    }
    /// Whether the walk is inside a parameter's reparameterization (LoRA factors, learned
    /// quantization scales, packed codes).
    pub fn in_reparameterization(&self) -> bool {
        self.containers.iter().any(|c| c == "Reparameterization")
    }
    /// The PyTorch name of the current parameter and whether its layout is transposed.
    pub fn torch_name(&self) -> (String, bool) {
        self.current()
    }
    fn current(&self) -> (String, bool) {
        torch_name(
            &self.path,
            self.containers.last().map(String::as_str).unwrap_or(""),
        )
    }
}

/// A folder shipped under `weights/`: relative to the current directory, else under the source
/// tree this binary was built from (so the embedded defaults work from anywhere on the machine
/// that built it).
pub fn shipped(name: &str) -> PathBuf {
    let local = Path::new("weights").join(name);
    if local.is_dir() {
        local
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("weights")
            .join(name)
    }
}

/// A tensor read from a safetensors file, as f32 in PyTorch layout, on the host.
#[derive(Debug, Clone)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Uploads as a rank-`D` tensor; `None` when the rank differs.
    pub fn to_device<const D: usize>(&self, device: &Device) -> Option<Tensor<D>> {
        (self.shape.len() == D).then(|| {
            Tensor::<D>::from_data(
                TensorData::new(self.data.clone(), self.shape.clone()),
                device,
            )
        })
    }
}

pub(crate) fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        _ => return None,
    })
}

/// Reads every tensor of a safetensors file (f32, f16, bf16 or f64) as f32.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, HostTensor>> {
    read_safetensors_bytes(&map_file(path)?, path)
}

/// [`read_safetensors`] of a file's bytes already in memory (`path` names it in errors).
pub fn read_safetensors_bytes(bytes: &[u8], path: &Path) -> Result<HashMap<String, HostTensor>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::file(path, format!("corrupt or truncated safetensors file ({e})")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let data = to_f32(view.dtype(), view.data()).ok_or_else(|| {
            Error::file(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}; expected F32, F16, BF16 or F64",
                    view.dtype()
                ),
            )
        })?;
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// The bytes of a file, memory-mapped: a multi-gigabyte checkpoint is read from the page cache
/// tensor by tensor, not first copied whole into memory.
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    if path.is_dir() {
        return Err(Error::file(
            path,
            "is a folder, expected a safetensors file",
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::file(path, "file not found"),
        _ => Error::file(path, format!("cannot read: {e}")),
    })?;
    // SAFETY: the map is read-only and lives only while this process parses it; a file
    // truncated underneath by another process is the one hazard, as for any mmap reader.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(path, format!("cannot read: {e}")))
}

/// The string metadata of a safetensors file's header (empty when it has none).
pub fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = map_file(path)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::file(path, format!("corrupt or truncated safetensors file ({e})")))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Streams a safetensors file's tensors into a module's parameters, one tensor at a time from the
/// memory map: the host never holds more than one converted tensor.
struct Loader<'a> {
    tracker: PathTracker,
    file: SafeTensors<'a>,
    /// Module name → the file's name, for the tensors not yet used.
    names: HashMap<String, String>,
    errors: Vec<String>,
    /// Parameter ids to restore by name (training state), else the module's own.
    ids: Option<&'a BTreeMap<String, u64>>,
    /// Upload as f16 (else f32).
    half: bool,
    /// Parameters loaded otherwise (packed quantized weights), with everything beneath them.
    skip: Option<&'a BTreeSet<String>>,
}

/// [rows, cols] row-major → [cols, rows].
fn transpose_host<T: Copy + Default>(data: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.tracker.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.tracker.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (name, transpose) = self.tracker.current();
        if let Some(skip) = self.skip
            && skip.iter().any(|s| {
                name.strip_prefix(s.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
            })
        {
            return param;
        }
        let mut expected: Vec<usize> = param.lazy_shape().dims::<D>().to_vec();
        if transpose {
            expected.reverse();
        }
        let Some(file_name) = self.names.remove(&name) else {
            self.errors.push(format!(
                "missing tensor `{name}` (expected shape {expected:?})"
            ));
            return param;
        };
        let view = self
            .file
            .tensor(&file_name)
            .expect("a name the file listed");
        if view.shape() != expected.as_slice() {
            self.errors.push(format!(
                "tensor `{file_name}` has shape {:?} but the config needs {expected:?}",
                view.shape()
            ));
            return param;
        }
        let Some(values) = to_f32(view.dtype(), view.data()) else {
            self.errors.push(format!(
                "tensor `{file_name}` has dtype {:?}; expected F32, F16, BF16 or F64",
                view.dtype()
            ));
            return param;
        };
        let device = param.lazy_device();
        // A PyTorch [out, in] Linear weight becomes burn's [in, out] on the host, so the device
        // tensor is contiguous as a freshly built one is: a strided (transposed) view would take
        // other matmul paths and round differently, and a resumed run would drift (~1e-7) from an
        // uninterrupted one.
        let (values, shape) = if transpose && expected.len() == 2 {
            let (rows, cols) = (expected[0], expected[1]);
            (transpose_host(&values, rows, cols), vec![cols, rows])
        } else {
            (values, expected.clone())
        };
        let tensor = if self.half {
            let halves: Vec<half::f16> = values.into_iter().map(half::f16::from_f32).collect();
            Tensor::<D>::from_data(
                TensorData::new(halves, shape),
                (&device, burn::tensor::DType::F16),
            )
        } else {
            Tensor::<D>::from_data(TensorData::new(values, shape), &device)
        };
        let id = match self.ids.and_then(|ids| ids.get(&name)) {
            Some(&id) => ParamId::from(id),
            None => param.id,
        };
        param.transform_for_load(tensor, id)
    }
}

/// Loads diffusers-named weights from a safetensors file into `module`. Every parameter must be
/// present with the config's shape, and every tensor in the file must be used.
pub fn load_weights<M: Module>(module: M, path: &Path) -> Result<M> {
    load_weights_with_ids(module, path, None)
}

/// [`load_weights`], also restoring each parameter's id from `ids` (by diffusers name), so that
/// optimizer state saved against those ids applies again after a restart.
pub fn load_weights_with_ids<M: Module>(
    module: M,
    path: &Path,
    ids: Option<&BTreeMap<String, u64>>,
) -> Result<M> {
    load_tensors(
        module,
        path,
        |name| Some(name.to_string()),
        ids,
        false,
        None,
    )
}

/// [`load_weights`] where the file's names go through `rename` first: `Some(name)` is the
/// module's name for a tensor, `None` a tensor the model does not use and may ignore (a buffer
/// such as CLIP's `position_ids`); every other tensor must still be used. With `half`, the
/// weights go to the device as f16 (f16 files unchanged; others rounded on the host, one tensor
/// at a time): an f16 checkpoint never exists as f32 on the host or the device.
pub fn load_weights_renamed<M: Module>(
    module: M,
    path: &Path,
    rename: impl Fn(&str) -> Option<String>,
    half: bool,
) -> Result<M> {
    load_tensors(module, path, rename, None, half, None)
}

/// [`load_weights_renamed`] (names as they are) for a module some of whose parameters were
/// loaded otherwise: `skip` names them (and the file tensors they took), with everything
/// beneath them.
pub fn load_weights_except<M: Module>(
    module: M,
    path: &Path,
    half: bool,
    skip: &BTreeSet<String>,
) -> Result<M> {
    load_tensors(
        module,
        path,
        |name| (!skip.contains(name)).then(|| name.to_string()),
        None,
        half,
        Some(skip),
    )
}

fn load_tensors<M: Module>(
    module: M,
    path: &Path,
    rename: impl Fn(&str) -> Option<String>,
    ids: Option<&BTreeMap<String, u64>>,
    half: bool,
    skip: Option<&BTreeSet<String>>,
) -> Result<M> {
    let bytes = map_file(path)?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::file(path, format!("corrupt or truncated safetensors file ({e})")))?;
    let names = file
        .names()
        .into_iter()
        .filter_map(|n| rename(n).map(|m| (m, n.to_string())))
        .collect();
    let mut loader = Loader {
        tracker: PathTracker::default(),
        file,
        names,
        errors: Vec::new(),
        ids,
        half,
        skip,
    };
    let module = module.map(&mut loader);
    if let Some(first) = loader.errors.first() {
        let more = loader.errors.len() - 1;
        let suffix = if more > 0 {
            format!(" (and {more} more problems)")
        } else {
            String::new()
        };
        return Err(Error::file(path, format!("{first}{suffix}")));
    }
    if !loader.names.is_empty() {
        let mut extra: Vec<&String> = loader.names.values().collect();
        extra.sort();
        return Err(Error::file(
            path,
            format!(
                "unexpected tensor `{}` not in the model the config describes ({} unexpected in all)",
                extra[0],
                extra.len()
            ),
        ));
    }
    Ok(module)
}

struct Collector {
    tracker: PathTracker,
    tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.tracker.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.tracker.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let (name, transpose) = self.tracker.current();
        let mut tensor = param.val();
        if transpose {
            tensor = tensor.transpose();
        }
        let shape = tensor.dims().to_vec();
        let data = tensor.into_data();
        let values: Vec<f32> = data.try_to_vec::<f32>().expect("f32 data");
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensors.insert(name, (shape, bytes));
    }
}

/// Writes named f32 tensors ([shape], data) as a safetensors file, atomically.
pub fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Result<()> {
    write_safetensors_with_metadata(path, tensors, None)
}

/// [`write_safetensors`] with string metadata in the header.
pub fn write_safetensors_with_metadata(
    path: &Path,
    tensors: &[(&str, Vec<usize>, Vec<f32>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, data)| data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
                .expect("shape matches data");
            (name.to_string(), view)
        })
        .collect();
    let out = safetensors::serialize(views, metadata)
        .map_err(|e| Error::file(path, format!("cannot serialise tensors: {e}")))?;
    write_atomic(path, &out)
}

struct IdCollector {
    tracker: PathTracker,
    ids: BTreeMap<String, u64>,
}

impl ModuleVisitor for IdCollector {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.tracker.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.tracker.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.ids.insert(self.tracker.current().0, param.id.val());
    }
}

/// Every parameter's id by diffusers name.
pub fn param_ids<M: Module>(module: &M) -> BTreeMap<String, u64> {
    let mut c = IdCollector {
        tracker: PathTracker::default(),
        ids: BTreeMap::new(),
    };
    module.visit(&mut c);
    c.ids
}

/// The module's parameters under their diffusers names, as safetensors bytes (f32).
pub fn weights_to_bytes<M: Module>(module: &M) -> Result<Vec<u8>> {
    weights_to_bytes_prefixed(module, "")
}

/// [`weights_to_bytes`] with `prefix` before every name (`text_model.` for a CLIP text model).
pub fn weights_to_bytes_prefixed<M: Module>(module: &M, prefix: &str) -> Result<Vec<u8>> {
    let mut c = Collector {
        tracker: PathTracker::default(),
        tensors: BTreeMap::new(),
    };
    module.visit(&mut c);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = c
        .tensors
        .iter()
        .map(|(name, (shape, bytes))| {
            let name = format!("{prefix}{name}");
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .expect("shape matches data");
            (name, view)
        })
        .collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Config(format!("cannot serialise weights: {e}")))
}

/// A tensor as a file stores it: dtype, shape, little-endian bytes.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// [`weights_to_bytes`] where the tensors of `stored` take the place of the parameters of the
/// same names (and of everything beneath them: a quantized weight's fake-quantization state), and
/// its other tensors are added (their scales).
pub fn weights_to_bytes_stored<M: Module>(
    module: &M,
    stored: &BTreeMap<String, RawTensor>,
) -> Result<Vec<u8>> {
    let mut c = Collector {
        tracker: PathTracker::default(),
        tensors: BTreeMap::new(),
    };
    module.visit(&mut c);
    let replaced = |name: &str| {
        stored.keys().any(|s| {
            name.strip_prefix(s.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
    };
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = c
        .tensors
        .iter()
        .filter(|(name, _)| !replaced(name))
        .map(|(name, (shape, bytes))| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .expect("shape matches data");
            (name.clone(), view)
        })
        .collect();
    for (name, t) in stored {
        let view = safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
            .map_err(|e| Error::Config(format!("tensor `{name}`: {e}")))?;
        views.push((name.clone(), view));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Config(format!("cannot serialise weights: {e}")))
}

/// Saves the module's weights (diffusers names, f32) atomically.
pub fn save_weights<M: Module>(module: &M, path: &Path) -> Result<()> {
    write_atomic(path, &weights_to_bytes(module)?)
}

pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON serialises");
    write_atomic(path, format!("{text}\n").as_bytes())
}
