//! The one place that knows which burn backends were compiled in (cargo features `flex`,
//! `ndarray`, `wgpu`, `tch`) and turns `--device` into a burn [`Device`].
//!
//! The CPU default is `flex`, burn's pure-Rust backend, with fewstep's own convolution, fused
//! GroupNorm, attention and upsampling kernels added to it through burn's backend extension
//! ([`cpu_conv`], [`cpu_norm`], [`cpu_attention`], [`cpu_upsample`], `flex_ops.rs`): on the
//! 2.74 M-parameter UNet of `benches/unet.rs` a batch-16 forward in ~0.11 s and a batch-32 AdamW
//! step in ~0.73 s (burn's generic ops: 0.25 s and 1.7 s; PyTorch on the same machine ~0.11 s
//! and ~0.66 s; the deprecated `ndarray`, `--device ndarray` with `--features ndarray`: 1.05 s
//! and ~66 s). The kernels apply on flex only, with no flag; [`set_fast_cpu_ops`] turns them off
//! to measure or test against burn's ops.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::ops::ConvOptions;

use crate::error::{Error, Result};

/// Defines `fn $name` twice over the same body: compiled for AVX2 + FMA, taken when the CPU has
/// them (checked once, cached by std), and as the crate is built (baseline x86-64: SSE2, 4 lanes).
macro_rules! with_avx2 {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            fn kernel($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                fn wide($($arg: $ty),*) $(-> $ret)? {
                    kernel($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `wide` is compiled for (checked above).
                    return unsafe { wide($($arg),*) };
                }
            }
            kernel($($arg),*)
        }
    };
}

pub mod cpu_attention;
pub mod cpu_conv;
pub mod cpu_norm;
pub mod cpu_upsample;
#[cfg(feature = "flex")]
mod flex_ops;

/// Deterministic values in [−1, 1] for the kernels' unit tests.
#[cfg(test)]
fn test_values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

/// Whether [`conv2d`] uses fewstep's CPU kernels on flex (on by default; off only to measure or
/// test against burn's generic ops).
static FAST_CPU_OPS: AtomicBool = AtomicBool::new(true);

/// Turns fewstep's CPU kernels on or off for the whole process (benchmarks and parity tests
/// compare them with burn's generic ops this way).
pub fn set_fast_cpu_ops(on: bool) {
    FAST_CPU_OPS.store(on, Ordering::Relaxed);
}

/// `burn::tensor::module::conv2d`; on flex (groups 1, f32) through fewstep's im2col GEMM
/// kernels ([`cpu_conv`]), with their own backward, the same on every other backend.
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if FAST_CPU_OPS.load(Ordering::Relaxed) && flex_ops::conv2d_applies(&x, &weight, &options) {
        return flex_ops::conv2d(x, weight, bias, options);
    }
    burn::tensor::module::conv2d(x, weight, bias, options)
}

/// `GroupNorm` (then SiLU when `silu`) fused into one op on flex (f32, affine): `None` where
/// it does not apply, for the caller to run burn's `GroupNorm::forward` (models::blocks).
pub fn fused_group_norm<const D: usize>(
    norm: &burn::nn::GroupNorm,
    x: &Tensor<D>,
    silu: bool,
) -> Option<Tensor<D>> {
    #[cfg(feature = "flex")]
    if FAST_CPU_OPS.load(Ordering::Relaxed) && flex_ops::group_norm_applies(x, norm) {
        return Some(flex_ops::group_norm(x.clone(), norm, silu));
    }
    let _ = (norm, x, silu);
    None
}

/// `softmax(q·kᵀ/√d)·v` without a mask (q `[B, h, N, d]`, k `[B, h, M, d]`, v `[B, h, M, d_v]`):
/// on flex (f32) fewstep's fused kernel ([`cpu_attention`]) with its own backward, burn's
/// `attention` elsewhere.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if attention_is_fused(&q, &k, &v) {
        return flex_ops::attention(q, k, v);
    }
    burn::tensor::module::attention(q, k, v, None, None, Default::default())
}

/// Whether [`attention`] runs fewstep's fused kernel on these tensors (which needs no query
/// chunking to bound its memory).
pub fn attention_is_fused(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> bool {
    #[cfg(feature = "flex")]
    if FAST_CPU_OPS.load(Ordering::Relaxed) {
        return flex_ops::attention_applies(q, k, v);
    }
    let _ = (q, k, v);
    false
}

/// Nearest-neighbour 2× upsampling `[B, C, H, W]` → `[B, C, 2H, 2W]`: fewstep's parallel kernel
/// on flex (f32, [`cpu_upsample`]) with its own backward, a reshape/expand elsewhere.
pub fn upsample_nearest2x(x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if FAST_CPU_OPS.load(Ordering::Relaxed) && flex_ops::upsample_applies(&x) {
        return flex_ops::upsample_nearest2x(x);
    }
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, 2, w, 2])
        .reshape([b, c, 2 * h, 2 * w])
}

/// `Conv2d::forward` through [`conv2d`] (explicit and valid padding; `Same` stays burn's).
pub fn conv2d_forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    use burn::nn::PaddingConfig2d;
    let padding = match conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) => [(top, bottom), (left, right)],
        PaddingConfig2d::Valid => [(0, 0), (0, 0)],
        PaddingConfig2d::Same => return conv.forward(x),
    };
    let options = ConvOptions::new_with_padding(conv.stride, padding, conv.dilation, conv.groups);
    conv2d(
        x,
        conv.weight.val(),
        conv.bias.as_ref().map(|b| b.val()),
        options,
    )
}

/// What `--device` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The default pure-Rust CPU backend (`flex`, else `ndarray`).
    Cpu,
    Flex,
    Ndarray,
    /// wgpu on the system's first adapter (Vulkan, Metal, DX12; Mesa lavapipe on a CPU).
    Wgpu,
    /// LibTorch on the CPU.
    TchCpu,
    /// LibTorch on CUDA GPU 0.
    Cuda,
}

impl DeviceChoice {
    pub const NAMES: &'static str = "cpu, flex, ndarray, wgpu, tch-cpu, cuda";

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "cpu" => DeviceChoice::Cpu,
            "flex" => DeviceChoice::Flex,
            "ndarray" => DeviceChoice::Ndarray,
            "wgpu" => DeviceChoice::Wgpu,
            "tch-cpu" => DeviceChoice::TchCpu,
            "cuda" => DeviceChoice::Cuda,
            other => {
                return Err(Error::Usage(format!(
                    "--device {other}: unknown device (expected one of {})",
                    Self::NAMES
                )));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Flex => "flex",
            DeviceChoice::Ndarray => "ndarray",
            DeviceChoice::Wgpu => "wgpu",
            DeviceChoice::TchCpu => "tch-cpu",
            DeviceChoice::Cuda => "cuda",
        }
    }
}

fn not_compiled(choice: DeviceChoice, feature: &str, extra: &str) -> Error {
    Error::Backend(format!(
        "--device {}: this build has no `{feature}` backend; rebuild with `cargo build --release --features {feature}`{extra}",
        choice.name()
    ))
}

/// The burn device for a choice, or a clear error naming the cargo feature to enable.
pub fn device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => cpu_device().ok_or_else(|| not_compiled(choice, "flex", "")),
        DeviceChoice::Flex => flex_device().ok_or_else(|| not_compiled(choice, "flex", "")),
        DeviceChoice::Ndarray => {
            ndarray_device().ok_or_else(|| not_compiled(choice, "ndarray", ""))
        }
        DeviceChoice::Wgpu => wgpu_device(),
        DeviceChoice::TchCpu | DeviceChoice::Cuda => tch_device(choice),
    }
}

/// wgpu when this build has it and an adapter exists, else the CPU (printing why), for the
/// examples that run "on a laptop GPU when there is one"; prints what was chosen.
pub fn wgpu_or_cpu() -> Result<(DeviceChoice, Device)> {
    let (choice, device) = match device(DeviceChoice::Wgpu) {
        Ok(d) => (DeviceChoice::Wgpu, d),
        Err(why) => {
            println!("no wgpu adapter here ({why}); generating on the CPU");
            (DeviceChoice::Cpu, device(DeviceChoice::Cpu)?)
        }
    };
    println!(
        "generating on {}: {}",
        choice.name(),
        describe(choice, &device).replace('\n', "; ")
    );
    Ok((choice, device))
}

/// Every backend compiled into this build that can run here, by `--device` name (for benchmarks
/// and cross-backend tests). wgpu appears only where an adapter exists.
pub fn compiled_devices() -> Vec<(&'static str, Device)> {
    let mut out = Vec::new();
    if let Some(d) = flex_device() {
        out.push(("flex", d));
    }
    if let Some(d) = ndarray_device() {
        out.push(("ndarray", d));
    }
    if cfg!(feature = "wgpu")
        && let Ok(d) = wgpu_device()
    {
        out.push(("wgpu", d));
    }
    if cfg!(feature = "tch")
        && let Ok(d) = tch_device(DeviceChoice::TchCpu)
    {
        out.push(("tch-cpu", d));
    }
    out
}

/// Whether `device` is flex (with or without autodiff): its tensors live in this process's
/// memory in their own dtype, so host-side code may read and build them without a transfer.
pub fn is_flex(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    if matches!(
        device.clone().inner().as_dispatch(),
        burn::backend::DispatchDevice::Flex(_)
    ) {
        return true;
    }
    let _ = device;
    false
}

/// The default CPU device.
pub fn cpu_device() -> Option<Device> {
    flex_device().or_else(ndarray_device)
}

#[cfg(feature = "flex")]
fn flex_device() -> Option<Device> {
    Some(Device::flex())
}
#[cfg(not(feature = "flex"))]
fn flex_device() -> Option<Device> {
    None
}

#[cfg(feature = "ndarray")]
#[allow(deprecated)]
fn ndarray_device() -> Option<Device> {
    Some(Device::ndarray())
}
#[cfg(not(feature = "ndarray"))]
fn ndarray_device() -> Option<Device> {
    None
}

#[cfg(feature = "wgpu")]
fn wgpu_device() -> Result<Device> {
    crate::backend::wgpu_adapter::device()
}
#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Result<Device> {
    Err(not_compiled(
        DeviceChoice::Wgpu,
        "wgpu",
        " (on a machine without a GPU, Mesa's software Vulkan driver `mesa-vulkan-drivers` provides an adapter)",
    ))
}

#[cfg(feature = "wgpu")]
mod wgpu_adapter {
    use std::sync::OnceLock;

    use super::*;

    /// The default wgpu device and a description of its adapter, brought up once per process;
    /// `Err` says why there is none.
    static ADAPTER: OnceLock<std::result::Result<Adapter, String>> = OnceLock::new();

    struct Adapter {
        device: Device,
        description: String,
        max_binding_bytes: u64,
    }

    /// Brings up wgpu's default device (adapter, logical device, kernel compiler) and describes it.
    fn init() -> std::result::Result<Adapter, String> {
        let (device, setup) = Device::wgpu_options()
            .init_with_setup()
            .map_err(|e| e.to_string())?;
        let info = setup.adapter.get_info();
        let limits = setup.device.limits();
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let description = format!(
            "wgpu adapter: {} ({:?}, {:?} backend; driver {} {})\n\
             limits: max buffer {:.0} MiB, max storage binding {:.0} MiB, \
             {} invocations per workgroup, {} workgroups per dimension, {} KiB workgroup storage",
            info.name,
            info.device_type,
            info.backend,
            info.driver,
            info.driver_info,
            mib(limits.max_buffer_size),
            mib(limits.max_storage_buffer_binding_size),
            limits.max_compute_invocations_per_workgroup,
            limits.max_compute_workgroups_per_dimension,
            limits.max_compute_workgroup_storage_size / 1024,
        );
        Ok(Adapter {
            device,
            description,
            max_binding_bytes: limits.max_storage_buffer_binding_size,
        })
    }

    /// A wgpu device on the system's default adapter, or a clear error when there is none.
    pub fn device() -> Result<Device> {
        match ADAPTER.get_or_init(init) {
            Ok(adapter) => Ok(adapter.device.clone()),
            Err(why) => Err(Error::Backend(format!(
                "--device wgpu: no usable GPU adapter ({why}); install a Vulkan/Metal/DX12 driver \
                 (on Linux without a GPU: `apt-get install mesa-vulkan-drivers` for the lavapipe software adapter)"
            ))),
        }
    }

    /// The adapter's name, backend, driver and limits (after [`device`] found one).
    pub fn describe() -> Option<String> {
        ADAPTER
            .get()
            .and_then(|a| a.as_ref().ok().map(|a| a.description.clone()))
    }

    /// The adapter's largest storage buffer binding, in bytes (after [`device`] found one).
    pub fn max_binding_bytes() -> Option<u64> {
        ADAPTER
            .get()
            .and_then(|a| a.as_ref().ok().map(|a| a.max_binding_bytes))
    }
}

/// The largest buffer one kernel can bind on a device, in bytes (a wgpu adapter's
/// `max_storage_buffer_binding_size`); `None` where no such limit applies (CPU backends, CUDA).
pub fn max_binding_bytes(choice: DeviceChoice) -> Option<u64> {
    match choice {
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu => wgpu_adapter::max_binding_bytes(),
        _ => None,
    }
}

/// What a device is, for `-v`: the wgpu adapter (name, graphics backend, driver, limits), or
/// the CPU backend and the cores it may use; with whether it computes in f16.
pub fn describe(choice: DeviceChoice, device: &Device) -> String {
    let what = match choice {
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu => wgpu_adapter::describe().unwrap_or_else(|| "wgpu".into()),
        DeviceChoice::Cpu | DeviceChoice::Flex | DeviceChoice::Ndarray => format!(
            "{} (CPU, {} cores)",
            if choice == DeviceChoice::Ndarray || flex_device().is_none() {
                "ndarray"
            } else {
                "flex"
            },
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        other => format!("{} ({device:?})", other.name()),
    };
    let f16 = if device.supports_dtype(burn::tensor::DType::F16) {
        "supported"
    } else {
        "not supported"
    };
    format!("{what}\nf16: {f16}")
}

/// The float precision models compute in at inference (`--precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    /// Half precision weights and activations (wgpu needs the adapter's `shader-f16`); the
    /// scheduler's arithmetic and the timestep features stay f32, as in diffusers' fp16 pipelines.
    F16,
}

impl Precision {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            other => Err(Error::Usage(format!(
                "--precision {other}: expected f32 or f16"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::F16 => 2,
        }
    }

    pub fn dtype(self) -> burn::tensor::FloatDType {
        match self {
            Precision::F32 => burn::tensor::FloatDType::F32,
            Precision::F16 => burn::tensor::FloatDType::F16,
        }
    }

    /// Checks that `device` computes in this precision (a clear error naming the flag if not).
    pub fn check(self, device: &Device, device_name: &str) -> Result<()> {
        if self == Precision::F16 && !device.supports_dtype(burn::tensor::DType::F16) {
            return Err(Error::Usage(format!(
                "--precision f16: --device {device_name} does not compute in f16 (a wgpu adapter needs the `shader-f16` feature); use --precision f32"
            )));
        }
        Ok(())
    }
}

struct CastFloats {
    dtype: burn::tensor::FloatDType,
    /// Depth inside parameters' reparameterizations, whose own state (LoRA factors, quantized
    /// weights' scales) keeps its dtype: a packed weight computes in its placeholder's.
    reparameterization: usize,
}

impl burn::module::ModuleMapper for CastFloats {
    fn enter_module(&mut self, _: &str, container: &str) {
        self.reparameterization += usize::from(container == "Reparameterization");
    }
    fn exit_module(&mut self, _: &str, container: &str) {
        self.reparameterization -= usize::from(container == "Reparameterization");
    }
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<burn::prelude::Tensor<D>>,
    ) -> burn::module::Param<burn::prelude::Tensor<D>> {
        if self.reparameterization > 0 {
            return param;
        }
        let dtype = self.dtype;
        param.map(|t| t.cast(dtype))
    }
}

/// `module` with every float parameter (and buffer) cast to `dtype` (a reparameterization's own
/// state excepted).
pub fn cast_module<M: burn::module::Module>(module: M, dtype: burn::tensor::FloatDType) -> M {
    module.map(&mut CastFloats {
        dtype,
        reparameterization: 0,
    })
}

#[cfg(feature = "tch")]
#[allow(deprecated)]
fn tch_device(choice: DeviceChoice) -> Result<Device> {
    Ok(match choice {
        DeviceChoice::Cuda => Device::libtorch_cuda(0),
        _ => Device::libtorch(),
    })
}
#[cfg(not(feature = "tch"))]
fn tch_device(choice: DeviceChoice) -> Result<Device> {
    Err(not_compiled(
        choice,
        "tch",
        " (needs LibTorch: `pip install torch==2.9.0` and `LIBTORCH_USE_PYTORCH=1`)",
    ))
}

/// The devices of a data-parallel run (`--devices`): a count N — N replicas of `choice` (CPU
/// backends: N worker threads sharing the machine's cores; `cuda`: CUDA GPUs 0..N; `wgpu`:
/// discrete GPUs 0..N) — or a comma-separated list of devices, each `NAME` or `NAME:INDEX` for
/// the GPU backends (e.g. `cuda:0,cuda:1`, `wgpu:0,wgpu:1`). The first device is the main one.
pub fn data_parallel_devices(spec: &str, choice: DeviceChoice) -> Result<Vec<Device>> {
    let spec = spec.trim();
    if let Ok(n) = spec.parse::<usize>() {
        if n == 0 {
            return Err(Error::Usage(
                "--devices 0: expected at least one device".into(),
            ));
        }
        return match choice {
            DeviceChoice::Cuda | DeviceChoice::Wgpu if n > 1 => {
                (0..n).map(|i| indexed_device(choice, i)).collect()
            }
            _ => {
                let d = device(choice)?;
                Ok(vec![d; n])
            }
        };
    }
    spec.split(',')
        .map(|item| {
            let item = item.trim();
            let (name, index) = match item.split_once(':') {
                Some((name, index)) => {
                    let index = index.parse::<usize>().map_err(|_| {
                        Error::Usage(format!(
                            "--devices {spec}: `{item}` has no device index after `:` (expected e.g. cuda:1)"
                        ))
                    })?;
                    (name, Some(index))
                }
                None => (item, None),
            };
            let choice = DeviceChoice::parse(name).map_err(|_| {
                Error::Usage(format!(
                    "--devices {spec}: unknown device `{name}` (expected a count or a list of {})",
                    DeviceChoice::NAMES
                ))
            })?;
            match index {
                None => device(choice),
                Some(i) => indexed_device(choice, i),
            }
        })
        .collect()
}

/// GPU `index` of a GPU backend (`cuda:1`, `wgpu:1` = the second discrete GPU).
fn indexed_device(choice: DeviceChoice, index: usize) -> Result<Device> {
    match choice {
        DeviceChoice::Cuda => cuda_device(index),
        DeviceChoice::Wgpu => wgpu_discrete_gpu(index),
        other => Err(Error::Usage(format!(
            "--devices: {}:{index}: only cuda and wgpu devices take an index",
            other.name()
        ))),
    }
}

#[cfg(feature = "tch")]
#[allow(deprecated)]
fn cuda_device(index: usize) -> Result<Device> {
    Ok(Device::libtorch_cuda(index))
}
#[cfg(not(feature = "tch"))]
fn cuda_device(_index: usize) -> Result<Device> {
    tch_device(DeviceChoice::Cuda)
}

#[cfg(feature = "wgpu")]
fn wgpu_discrete_gpu(index: usize) -> Result<Device> {
    Device::wgpu_options()
        .device_kind(burn::tensor::DeviceKind::DiscreteGpu(index))
        .init()
        .map_err(|e| {
            Error::Backend(format!(
                "--devices wgpu:{index}: no discrete GPU {index} ({e})"
            ))
        })
}
#[cfg(not(feature = "wgpu"))]
fn wgpu_discrete_gpu(_index: usize) -> Result<Device> {
    wgpu_device()
}
