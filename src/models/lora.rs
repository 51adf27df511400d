//! Low-rank adapters (LoRA, Hu et al. 2021) on a UNet, and their exchange format.
//!
//! Training uses burn's own reparameterization: every targeted weight W gets a
//! [`LoraAdapter`] (its effective value is W + (α/r)·a·b, W frozen) and every other parameter is
//! frozen, so only the factors receive gradients. Targets are named as PEFT's
//! `target_modules` are matched — a module whose name equals a target or ends with `.target`:
//! attention projections always (`to_q`, `to_k`, `to_v`, `to_out.0`), optionally the resnet,
//! down- and upsampling convolutions and the resnets' time-embedding projections.
//!
//! The file written ([`lora_file`]) is what PEFT and diffusers load: per module
//! `<module>.lora_A.weight` [r, in] (convolutions [r, in, k, k]) and `<module>.lora_B.weight`
//! [out, r] (convolutions [out, r, 1, 1]), ΔW = (α/r)·B·A, with the `LoraConfig` (`r`,
//! `lora_alpha`, `target_modules`) as JSON under the metadata key `lora_adapter_metadata`, as
//! diffusers' `save_lora_adapter` writes it. In burn's layouts the factors are stored as
//! a = Aᵀ, b = Bᵀ for a linear weight ([in, out]) and a = B, b = A flattened for a convolution
//! ([out, in, k, k]), so that a·b reshaped is ΔW in either case.
//!
//! Files read ([`LoraFile::read`]) may be that layout (`unet.`/`text_encoder.` prefixed or bare) or
//! kohya's (`lora_unet_<path_with_underscores>` / `lora_te_…` with `.lora_down.weight`,
//! `.lora_up.weight`, `.alpha`: the published LCM-LoRA for SD-1.5 and most community LoRAs); both
//! reduce to ΔW per module keyed by the module path with `_` for `.`, merged into a UNet or a CLIP
//! text model ([`merge_into`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{LoraAdapter, Module, ModuleMapper, ModuleVisitor, Param, Reparameterizer};
use burn::prelude::*;
use burn::tensor::Distribution;

use crate::error::{Error, Result};
use crate::io;
use crate::models::UNet;

/// Metadata key of the PEFT `LoraConfig` JSON (diffusers' `LORA_ADAPTER_METADATA_KEY`).
pub const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";
/// Metadata key of the scheduler config the adapters were distilled for (fewstep's own).
pub const SCHEDULER_METADATA_KEY: &str = "fewstep_scheduler_config";

const ATTENTION: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
const CONVOLUTIONS: [&str; 5] = [
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
];
const LINEARS: [&str; 1] = ["time_emb_proj"];

/// Which layers get adapters, and their rank and α.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f32,
    /// Also the resnet, downsampling and upsampling convolutions.
    pub convolutions: bool,
    /// Also the resnets' time-embedding projections.
    pub linears: bool,
}

impl LoraSpec {
    /// PEFT `target_modules`.
    pub fn target_modules(&self) -> Vec<&'static str> {
        let mut t: Vec<&'static str> = ATTENTION.to_vec();
        if self.convolutions {
            t.extend(CONVOLUTIONS);
        }
        if self.linears {
            t.extend(LINEARS);
        }
        t
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::Usage("--lora-rank must be at least 1".into()));
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return Err(Error::Usage(format!(
                "--lora-alpha {}: expected a positive number",
                self.alpha
            )));
        }
        Ok(())
    }
}

/// Whether `module` (a dotted module name) is one of `targets`, PEFT's way.
fn targeted(module: &str, targets: &[&str]) -> bool {
    targets
        .iter()
        .any(|t| module == *t || module.ends_with(&format!(".{t}")))
}

struct Attach<'a> {
    spec: &'a LoraSpec,
    targets: Vec<&'static str>,
    adapted: usize,
}

impl Reparameterizer for &mut Attach<'_> {
    type Reparam = LoraAdapter;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<LoraAdapter>) {
        let dims = param.val().dims();
        let device = param.val().device();
        let base = param.set_require_grad(false);
        let Some(module) = path.strip_suffix(".weight") else {
            return (base, None);
        };
        if !targeted(module, &self.targets) {
            return (base, None);
        }
        let r = self.spec.rank;
        // One factor random, the other zero: ΔW = 0 when attached (PEFT's initialisation).
        let (a, b) = match D {
            // Linear, burn layout [in, out]: a = Aᵀ [in, r], b = Bᵀ [r, out].
            2 => (
                Tensor::<2>::random(
                    [dims[0], r],
                    Distribution::Normal(0.0, 1.0 / r as f64),
                    &device,
                ),
                Tensor::<2>::zeros([r, dims[1]], &device),
            ),
            // Convolution [out, in, k, k]: a = B [out, r], b = A [r, in·k·k].
            4 => {
                let fan_in = dims[1] * dims[2] * dims[3];
                (
                    Tensor::<2>::zeros([dims[0], r], &device),
                    Tensor::<2>::random(
                        [r, fan_in],
                        Distribution::Normal(0.0, 1.0 / (fan_in as f64).sqrt()),
                        &device,
                    ),
                )
            }
            _ => return (base, None),
        };
        self.adapted += 1;
        (
            base,
            Some(LoraAdapter {
                a: Param::from_tensor(a),
                b: Param::from_tensor(b),
                scale: self.spec.alpha as f64 / r as f64,
            }),
        )
    }
}

/// Freezes `unet` and attaches trainable adapters to the targeted layers. Errors when no layer
/// matches (a UNet without attention and no other targets).
pub fn attach(unet: UNet, spec: &LoraSpec) -> Result<UNet> {
    let mut attach = Attach {
        spec,
        targets: spec.target_modules(),
        adapted: 0,
    };
    let unet = unet.apply_reparameterization(&mut attach);
    if attach.adapted == 0 {
        return Err(Error::Usage(format!(
            "--lora-rank: no layer of this UNet matches the LoRA targets {:?} (add --lora-convs)",
            spec.target_modules()
        )));
    }
    Ok(unet)
}

/// Collects every float parameter's values and shape by module path.
#[derive(Default)]
struct Values {
    path: io::PathTracker,
    found: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl ModuleVisitor for Values {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let shape = t.dims().to_vec();
        let data = t.into_data().try_to_vec::<f32>().expect("f32 weights");
        self.found.insert(self.path.joined(), (shape, data));
    }
}

/// The adapters of `unet` (from [`attach`]) as PEFT-named tensors: (name, shape, data).
pub fn lora_tensors(unet: &UNet) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut v = Values::default();
    unet.visit(&mut v);
    let mut out = Vec::new();
    for (path, (a_shape, a)) in &v.found {
        let Some(weight) = path.strip_suffix(".lora.a") else {
            continue;
        };
        let module = weight.strip_suffix(".weight").unwrap_or(weight);
        let (b_shape, b) = &v.found[&format!("{weight}.lora.b")];
        let (base_shape, _) = &v.found[weight];
        let r = a_shape[1];
        if base_shape.len() == 4 {
            // a = B [out, r], b = A [r, in·k·k].
            let (out_c, in_c, kh, kw) =
                (base_shape[0], base_shape[1], base_shape[2], base_shape[3]);
            out.push((
                format!("{module}.lora_A.weight"),
                vec![r, in_c, kh, kw],
                b.clone(),
            ));
            out.push((
                format!("{module}.lora_B.weight"),
                vec![out_c, r, 1, 1],
                a.clone(),
            ));
        } else {
            // a = Aᵀ [in, r], b = Bᵀ [r, out].
            out.push((
                format!("{module}.lora_A.weight"),
                vec![r, a_shape[0]],
                transpose(a, a_shape[0], r),
            ));
            out.push((
                format!("{module}.lora_B.weight"),
                vec![b_shape[1], r],
                transpose(b, r, b_shape[1]),
            ));
        }
    }
    out
}

/// Row-major [rows, cols] → [cols, rows].
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = x[i * cols + j];
        }
    }
    t
}

/// Writes `unet`'s adapters as a PEFT/diffusers LoRA file with the `LoraConfig` and the
/// scheduler config in the metadata.
/// The key layout of a written LoRA file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraFormat {
    /// PEFT / diffusers: `….lora_A.weight`, `….lora_B.weight`, the adapter config in the
    /// metadata; UNet names bare for a UNet2DModel pipeline, `unet.`-prefixed for a
    /// text-to-image one (as `StableDiffusionPipeline.save_lora_weights` writes them).
    #[default]
    Peft,
    /// kohya-ss: `lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
}

/// [`lora_tensors`] renamed into `format` (with kohya's `alpha` scalars).
fn formatted_tensors(
    unet: &UNet,
    spec: &LoraSpec,
    format: LoraFormat,
    text_pipeline: bool,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let tensors = lora_tensors(unet);
    match format {
        LoraFormat::Peft if text_pipeline => tensors
            .into_iter()
            .map(|(n, s, d)| (format!("unet.{n}"), s, d))
            .collect(),
        LoraFormat::Peft => tensors,
        LoraFormat::Kohya => {
            let mut out = Vec::new();
            for (name, shape, data) in tensors {
                let (module, kohya) = if let Some(m) = name.strip_suffix(".lora_A.weight") {
                    (m, "lora_down.weight")
                } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
                    (m, "lora_up.weight")
                } else {
                    continue;
                };
                let stem = format!("lora_unet_{}", flat_key(module));
                if kohya == "lora_down.weight" {
                    out.push((format!("{stem}.alpha"), vec![], vec![spec.alpha]));
                }
                out.push((format!("{stem}.{kohya}"), shape, data));
            }
            out
        }
    }
}

pub fn lora_file(
    path: &Path,
    unet: &UNet,
    spec: &LoraSpec,
    scheduler: Option<&serde_json::Value>,
    format: LoraFormat,
    text_pipeline: bool,
) -> Result<()> {
    let tensors = formatted_tensors(unet, spec, format, text_pipeline);
    let config = serde_json::json!({
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "target_modules": spec.target_modules(),
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": true,
        "use_dora": false,
    });
    // A pipeline's adapter configs are keyed per component (`unet.r`, …), as
    // `StableDiffusionPipeline.save_lora_weights` writes them.
    let config = match config {
        serde_json::Value::Object(fields) if text_pipeline => serde_json::Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| (format!("unet.{k}"), v))
                .collect(),
        ),
        c => c,
    };
    let mut metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    if format == LoraFormat::Peft {
        metadata.insert(ADAPTER_METADATA_KEY.to_string(), config.to_string());
    }
    if let Some(s) = scheduler {
        metadata.insert(SCHEDULER_METADATA_KEY.to_string(), s.to_string());
    }
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.as_str(), s.clone(), d.clone()))
        .collect();
    io::write_safetensors_with_metadata(path, &refs, Some(metadata))
}

/// What an adapter applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraTarget {
    Unet,
    TextEncoder,
}

/// One adapter read back: ΔW in torch layout (scale α/r applied) and the file's name for it.
#[derive(Debug, Clone)]
pub struct LoraDelta {
    pub key: String,
    pub shape: Vec<usize>,
    pub delta: Vec<f32>,
}

/// A LoRA file read back: ΔW per module of the UNet and of the text encoder, keyed by the module
/// path with `_` for `.` (the one spelling both layouts reduce to), and its metadata.
pub struct LoraFile {
    pub deltas: HashMap<LoraTarget, HashMap<String, LoraDelta>>,
    pub metadata: HashMap<String, String>,
}

/// The layout-independent key of a module path: `down_blocks.0.attentions.0.to_q` →
/// `down_blocks_0_attentions_0_to_q`, as kohya writes it.
fn flat_key(module: &str) -> String {
    module.replace('.', "_")
}

/// (target, module key) of a PEFT/diffusers module name (`unet.…`, `text_encoder.…`, or bare UNet
/// names as fewstep writes them).
fn peft_module(module: &str) -> (LoraTarget, String) {
    if let Some(rest) = module.strip_prefix("text_encoder.") {
        let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
        (LoraTarget::TextEncoder, flat_key(rest))
    } else {
        (
            LoraTarget::Unet,
            flat_key(module.strip_prefix("unet.").unwrap_or(module)),
        )
    }
}

/// (target, module key) of a kohya name (`lora_unet_…`, `lora_te_text_model_…`), or an error
/// naming what the key is instead.
fn kohya_module(stem: &str) -> std::result::Result<(LoraTarget, String), String> {
    if let Some(rest) = stem.strip_prefix("lora_unet_") {
        Ok((LoraTarget::Unet, rest.to_string()))
    } else if let Some(rest) = stem.strip_prefix("lora_te_") {
        Ok((
            LoraTarget::TextEncoder,
            rest.strip_prefix("text_model_").unwrap_or(rest).to_string(),
        ))
    } else if stem.starts_with("lora_te1_") || stem.starts_with("lora_te2_") {
        Err(format!(
            "`{stem}` adapts one of SDXL's two text encoders (SDXL is not supported yet)"
        ))
    } else {
        Err(format!(
            "`{stem}`: expected a kohya name starting `lora_unet_` or `lora_te_`"
        ))
    }
}

/// ΔW = scale·B·A of factors a [r, in…] and b [out, r(, 1, 1)], checked; torch layout [out, in…].
fn delta_of(
    (a_name, a): (&str, &io::HostTensor),
    (b_name, b): (&str, &io::HostTensor),
    alpha: Option<f64>,
    path: &Path,
) -> Result<(Vec<usize>, Vec<f32>)> {
    // A [r, in] (linear) or [r, in, k, k] (convolution); B [out, r] or [out, r, 1, 1], of the
    // same rank.
    if !matches!(a.shape.len(), 2 | 4) || a.shape.contains(&0) {
        return Err(Error::file(
            path,
            format!(
                "`{a_name}`: shape {:?}, expected [rank, in] or [rank, in, k, k] with no zero size",
                a.shape
            ),
        ));
    }
    if b.shape.len() != a.shape.len() || b.shape.contains(&0) {
        return Err(Error::file(
            path,
            format!(
                "`{b_name}`: shape {:?}, expected [out, rank{}] to match `{a_name}` {:?}",
                b.shape,
                if a.shape.len() == 4 { ", 1, 1" } else { "" },
                a.shape
            ),
        ));
    }
    let r = a.shape[0];
    let delta_len = b.shape[0].checked_mul(a.shape[1..].iter().product());
    if delta_len.is_none_or(|n| n > 1 << 31) {
        return Err(Error::file(
            path,
            format!(
                "`{b_name}` {:?} × `{a_name}` {:?} is larger than any model weight",
                b.shape, a.shape
            ),
        ));
    }
    if b.shape[1] != r || b.shape[2..].iter().any(|&d| d != 1) {
        return Err(Error::file(
            path,
            format!(
                "`{b_name}`: shape {:?} does not match `{a_name}` shape {:?}",
                b.shape, a.shape
            ),
        ));
    }
    let scale = (alpha.unwrap_or(r as f64) / r as f64) as f32;
    let out_c = b.shape[0];
    let fan_in: usize = a.shape[1..].iter().product();
    let mut delta = vec![0f32; out_c * fan_in];
    for o in 0..out_c {
        for k in 0..r {
            let bk = b.data[o * r + k] * scale;
            if bk == 0.0 {
                continue;
            }
            let row = &a.data[k * fan_in..(k + 1) * fan_in];
            for (d, &x) in delta[o * fan_in..(o + 1) * fan_in].iter_mut().zip(row) {
                *d += bk * x;
            }
        }
    }
    let mut shape = vec![out_c];
    shape.extend_from_slice(&a.shape[1..]);
    Ok((shape, delta))
}

impl LoraFile {
    /// Reads a LoRA file in either layout users have:
    /// - PEFT/diffusers: `<module>.lora_A.weight` / `.lora_B.weight`, prefixed `unet.` or
    ///   `text_encoder.` (or bare UNet names); α from `lora_adapter_metadata`, else α = r.
    /// - kohya (the published LCM-LoRA, most community LoRAs): `lora_unet_<module_with_underscores>`
    ///   / `lora_te_…` with `.lora_down.weight`, `.lora_up.weight` and `.alpha`.
    pub fn read(path: &Path) -> Result<Self> {
        let tensors = io::read_safetensors(path)?;
        let metadata = io::read_safetensors_metadata(path)?;
        let config: Option<serde_json::Value> = metadata
            .get(ADAPTER_METADATA_KEY)
            .map(|s| {
                serde_json::from_str(s).map_err(|e| {
                    Error::file(
                        path,
                        format!("metadata `{ADAPTER_METADATA_KEY}` is not JSON: {e}"),
                    )
                })
            })
            .transpose()?;
        // α of a component: its own (`unet.lora_alpha`, `text_encoder.lora_alpha`) or the file's.
        let peft_alpha = |target: LoraTarget| {
            let prefixed = match target {
                LoraTarget::Unet => "unet.lora_alpha",
                LoraTarget::TextEncoder => "text_encoder.lora_alpha",
            };
            config
                .as_ref()
                .and_then(|c| c[prefixed].as_f64().or_else(|| c["lora_alpha"].as_f64()))
        };
        let mut deltas: HashMap<LoraTarget, HashMap<String, LoraDelta>> = HashMap::new();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for name in names {
            let a = &tensors[name];
            let (stem, b_name, alpha, (target, key)) = if let Some(stem) =
                name.strip_suffix(".lora_A.weight")
            {
                let module = peft_module(stem);
                (
                    stem,
                    format!("{stem}.lora_B.weight"),
                    peft_alpha(module.0),
                    module,
                )
            } else if let Some(stem) = name.strip_suffix(".lora_down.weight") {
                let alpha = match tensors.get(&format!("{stem}.alpha")) {
                    Some(t) if t.data.len() == 1 => Some(t.data[0] as f64),
                    Some(t) => {
                        return Err(Error::file(
                            path,
                            format!("`{stem}.alpha`: shape {:?}, expected a scalar", t.shape),
                        ));
                    }
                    None => None,
                };
                let module = kohya_module(stem).map_err(|e| Error::file(path, e))?;
                (stem, format!("{stem}.lora_up.weight"), alpha, module)
            } else if name.ends_with(".lora_B.weight")
                || name.ends_with(".lora_up.weight")
                || name.ends_with(".alpha")
            {
                continue;
            } else {
                return Err(Error::file(
                    path,
                    format!(
                        "tensor `{name}` is not a LoRA factor (`….lora_A.weight`/`….lora_B.weight`, or kohya's `….lora_down.weight`/`….lora_up.weight`/`….alpha`; LoHa, LoKr and DoRA are not supported)"
                    ),
                ));
            };
            let b = tensors
                .get(&b_name)
                .ok_or_else(|| Error::file(path, format!("`{name}` has no matching `{b_name}`")))?;
            let (shape, delta) = delta_of((name, a), (&b_name, b), alpha, path)?;
            deltas.entry(target).or_default().insert(
                key,
                LoraDelta {
                    key: stem.to_string(),
                    shape,
                    delta,
                },
            );
        }
        if deltas.is_empty() {
            return Err(Error::file(
                path,
                "no LoRA factors (`….lora_A.weight` or `….lora_down.weight`) in this file",
            ));
        }
        Ok(LoraFile { deltas, metadata })
    }

    /// The adapters for `target` (empty when the file has none).
    pub fn for_target(&self, target: LoraTarget) -> Option<&HashMap<String, LoraDelta>> {
        self.deltas.get(&target)
    }

    /// The scheduler config the adapters were distilled for, if the file names one.
    pub fn scheduler_config(&self) -> Option<&str> {
        self.metadata
            .get(SCHEDULER_METADATA_KEY)
            .map(String::as_str)
    }
}

struct Merge<'a> {
    path: io::PathTracker,
    deltas: &'a HashMap<String, LoraDelta>,
    scale: f32,
    used: Vec<String>,
    errors: Vec<String>,
}

impl ModuleMapper for Merge<'_> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.joined();
        let Some(module) = path.strip_suffix(".weight") else {
            return param;
        };
        let Some(LoraDelta { key, shape, delta }) = self.deltas.get(&flat_key(module)) else {
            return param;
        };
        let w = param.val();
        let dims = w.dims();
        // Torch layout [out, in…]; burn's Linear stores [in, out].
        let torch_dims: Vec<usize> = if D == 2 {
            vec![dims[1], dims[0]]
        } else {
            dims.to_vec()
        };
        if *shape != torch_dims {
            self.errors.push(format!(
                "`{key}`: the adapter's weight shape {shape:?} does not match the model's {torch_dims:?} (`{module}`)"
            ));
            return param;
        }
        self.used.push(flat_key(module));
        let device = w.device();
        let mut d = Tensor::<1>::from_floats(delta.as_slice(), &device);
        d = d * self.scale;
        let delta: Tensor<D> = if D == 2 {
            d.reshape([dims[1], dims[0]]).transpose().reshape(dims)
        } else {
            d.reshape(dims)
        };
        // In the weights' precision (an f16 pipeline merges in f16, as diffusers' fuse_lora).
        let dtype = burn::tensor::FloatDType::from(w.dtype());
        param.map(|w| w + delta.cast(dtype))
    }
}

/// Adds `scale`·ΔW of every UNet adapter in `file` to `unet`'s weights. Errors (naming `path`)
/// when an adapter's module is missing from the UNet or has another shape.
pub fn merge(unet: UNet, file: &LoraFile, scale: f32, path: &Path) -> Result<UNet> {
    merge_into(unet, file, LoraTarget::Unet, scale, path)
}

/// Adds `scale`·ΔW of `file`'s adapters for `target` to `module` (a UNet or a CLIP text model).
pub fn merge_into<M: Module>(
    module: M,
    file: &LoraFile,
    target: LoraTarget,
    scale: f32,
    path: &Path,
) -> Result<M> {
    let empty = HashMap::new();
    let deltas = file.for_target(target).unwrap_or(&empty);
    let mut m = Merge {
        path: io::PathTracker::default(),
        deltas,
        scale,
        used: Vec::new(),
        errors: Vec::new(),
    };
    let module = module.map(&mut m);
    if let Some(e) = m.errors.first() {
        return Err(Error::file(path, e.clone()));
    }
    let mut missing: Vec<&LoraDelta> = deltas
        .iter()
        .filter(|(k, _)| !m.used.contains(k))
        .map(|(_, d)| d)
        .collect();
    missing.sort_by(|a, b| a.key.cmp(&b.key));
    if let Some(first) = missing.first() {
        let what = match target {
            LoraTarget::Unet => "UNet",
            LoraTarget::TextEncoder => "text encoder",
        };
        return Err(Error::file(
            path,
            format!(
                "adapter `{}` matches no module of this {what} (a LoRA for another base model?)",
                first.key
            ),
        ));
    }
    Ok(module)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::UNetConfig;

    fn spec(convolutions: bool) -> LoraSpec {
        LoraSpec {
            rank: 2,
            alpha: 4.0,
            convolutions,
            linears: true,
        }
    }

    /// Moves every adapter factor (not the bases) randomly, so that ΔW ≠ 0.
    #[derive(Default)]
    struct Perturb {
        path: Vec<String>,
    }
    impl ModuleMapper for Perturb {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if !self.path.iter().any(|p| p == "lora") {
                return param;
            }
            param.map(|t| {
                let dims = t.dims();
                t.clone() + Tensor::<D>::random(dims, Distribution::Normal(0.0, 0.05), &t.device())
            })
        }
    }

    #[test]
    fn the_written_file_merges_to_the_adapted_model() {
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let base = UNetConfig::tiny().init(&device);
        let adapted = attach(base.clone(), &spec(true))
            .unwrap()
            .map(&mut Perturb::default());
        let dir = std::env::temp_dir().join(format!("fewstep-lora-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lora.safetensors");
        lora_file(&file, &adapted, &spec(true), None, LoraFormat::Peft, false).unwrap();
        let names = io::read_safetensors(&file).unwrap();
        assert!(names.contains_key("mid_block.attentions.0.to_q.lora_A.weight"));
        assert!(names.contains_key("down_blocks.0.resnets.0.conv1.lora_B.weight"));
        assert!(names.contains_key("down_blocks.0.resnets.0.time_emb_proj.lora_A.weight"));
        let kohya = dir.join("kohya.safetensors");
        lora_file(&kohya, &adapted, &spec(true), None, LoraFormat::Kohya, true).unwrap();
        let names = io::read_safetensors(&kohya).unwrap();
        assert!(names.contains_key("lora_unet_mid_block_attentions_0_to_q.lora_down.weight"));
        assert!(names.contains_key("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"));
        assert_eq!(
            names["lora_unet_mid_block_attentions_0_to_q.alpha"].data,
            vec![spec(true).alpha]
        );
        let x = Tensor::<4>::random([1, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
        let t = Tensor::<1>::from_floats([500.0], &device);
        let want = adapted.forward(x.clone(), t.clone(), &crate::models::Conditioning::none());
        for file in [&file, &kohya] {
            let read = LoraFile::read(file).unwrap();
            let merged = merge(base.clone(), &read, 1.0, file).unwrap();
            let got = merged.forward(x.clone(), t.clone(), &crate::models::Conditioning::none());
            let err: f32 = (want.clone() - got).abs().max().into_scalar::<f32>();
            assert!(err < 1e-4, "{}: {err}", file.display());
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn attention_only_adapters_leave_convolutions_alone() {
        let device = crate::backend::cpu_device().expect("a CPU backend is compiled in");
        let adapted = attach(UNetConfig::tiny().init(&device), &spec(false)).unwrap();
        let names: Vec<String> = lora_tensors(&adapted).into_iter().map(|t| t.0).collect();
        assert!(names.iter().all(|n| !n.contains("conv")), "{names:?}");
        assert!(names.iter().any(|n| n.contains("to_out.0.lora_B")));
    }
}
