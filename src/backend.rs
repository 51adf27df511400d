//! The one place that knows which burn backends were compiled in (cargo features `flex`,
//! `ndarray`, `wgpu`, `tch`) and turns `--device` into a burn [`Device`].
//!
//! The CPU default is `flex`, burn's pure-Rust backend: on the 2.74 M-parameter UNet of
//! `benches/unet.rs` it runs a batch-16 forward in 0.37 s and a batch-32 AdamW step in 2.5 s,
//! against 1.05 s and ~66 s for the deprecated `ndarray`, which stays selectable as
//! `--device ndarray` with `--features ndarray`.

use burn::prelude::Device;

use crate::error::{Error, Result};

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
    use super::*;
    use burn::tensor::DeviceKind;

    /// A wgpu device, after checking that an adapter exists (wgpu itself panics without one).
    pub fn device() -> Result<Device> {
        let device = std::panic::catch_unwind(|| {
            let d = Device::wgpu(DeviceKind::DefaultDevice);
            // Touch the device so that adapter selection happens here, not mid-sampling.
            let _ = burn::tensor::Tensor::<1>::zeros([1], &d).into_data();
            d
        });
        device.map_err(|_| {
            Error::Backend(
                "--device wgpu: no GPU adapter found; install a Vulkan/Metal/DX12 driver \
                 (on Linux without a GPU: `apt-get install mesa-vulkan-drivers` for the lavapipe software adapter)"
                    .into(),
            )
        })
    }
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
