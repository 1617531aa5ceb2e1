//! The CUDA executor: runs a `--target cuda` artifact's [`Program`](crate::artifact::Program)
//! with device buffers, per the contract in [`crate::artifact::cuda`].
//!
//! The executor ([`exec`]) speaks to a [`Gpu`]: the cudarc driver ([`driver`], cargo feature
//! `cuda`) or the host emulator ([`emu`]), which runs the same launches on host memory with the
//! CPU artifact's kernels and Rust versions of the support kernels. The emulator is what tests the
//! executor's bookkeeping (offsets, strides, masks, cache slots, grids) on machines with no GPU:
//! `Device::CudaEmulated` runs a CPU artifact through this executor.

mod check;
#[cfg(feature = "cuda")]
mod driver;
mod emu;
pub(crate) mod exec;
mod gpu;
mod kv;

pub(crate) use check::check_program;
pub use gpu::{DevMem, Gemm, Gpu, Param};

use crate::artifact::{cuda::support, CudaImage, CudaKernel, Manifest};
use crate::error::{Result, RuntimeError};
use std::sync::Arc;

/// Where a [`crate::Model`] runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Device {
    /// The host, with the artifact's shared object (`cpu-*` artifacts).
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal, with the artifact's PTX (`cuda-*` artifacts; cargo feature
    /// `cuda`).
    Cuda(usize),
    /// The CUDA executor over host memory with a CPU artifact's kernels: checks the executor
    /// without a GPU (slow; for tests and `scripts/gpu-check.sh --dry-run`).
    CudaEmulated,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "cuda-emu" => Ok(Device::CudaEmulated),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!(
                    "unknown device `{s}` (expected cpu, cuda, cuda:N or cuda-emu)"
                )),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::CudaEmulated => f.write_str("cuda-emu"),
        }
    }
}

/// True for a manifest built for the GPU (`--target cuda`).
pub(crate) fn is_cuda_target(m: &Manifest) -> bool {
    m.target.starts_with("cuda") || m.cuda.is_some()
}

/// The artifact/device pairing, checked before anything is loaded.
pub(crate) fn check_target(m: &Manifest, device: Device) -> Result<()> {
    let cuda = is_cuda_target(m);
    match (device, cuda) {
        (Device::Cpu, true) => Err(RuntimeError::Config(format!(
            "this artifact was built for `{}` (`loopc build --target cuda`): run it with `--device cuda`, or rebuild it without `--target cuda` for the CPU",
            m.target
        ))),
        (Device::Cuda(_), false) => Err(RuntimeError::Config(format!(
            "this artifact was built for `{}`, not for CUDA: rebuild it with `loopc build --target cuda` to run it with `--device cuda`",
            m.target
        ))),
        (Device::CudaEmulated, true) => Err(RuntimeError::Config(
            "`cuda-emu` runs a CPU artifact (its kernels are host code); this one holds PTX: use `--device cuda`".into(),
        )),
        (Device::Cuda(_), true) if m.cuda.is_none() => Err(RuntimeError::Artifact(format!(
            "the manifest's target is `{}` but it has no CUDA launch table (`cuda`)",
            m.target
        ))),
        _ => Ok(()),
    }
}

/// The launch table the emulator uses for a CPU artifact: one entry per kernel under its symbol
/// and every support kernel, with a small block so that multi-block grids are exercised.
pub(crate) fn emulated_image(m: &Manifest) -> CudaImage {
    let launch = |entry: &str| CudaKernel {
        entry: entry.to_string(),
        block: 128,
        items_per_block: 2,
        shared_bytes: 0,
    };
    CudaImage {
        arch: "sm_90".into(),
        kernels: m.kernels.iter().map(|k| launch(&k.symbol)).collect(),
        support: support::ALL
            .iter()
            .map(|n| crate::artifact::cuda::SupportKernel {
                name: n.to_string(),
                launch: launch(&format!("loopc_support_{n}")),
            })
            .collect(),
    }
}

/// `sm_90` → `(9, 0)`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn parse_arch(arch: &str) -> Result<(i32, i32)> {
    let bad = || {
        RuntimeError::Artifact(format!(
            "CUDA arch `{arch}` is not of the form sm_XY (e.g. sm_90)"
        ))
    };
    let d = arch
        .strip_prefix("sm_")
        .or_else(|| arch.strip_prefix("compute_"))
        .ok_or_else(bad)?;
    let d = d.trim_end_matches(['a', 'f']);
    if d.len() < 2 || !d.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let (maj, min) = d.split_at(d.len() - 1);
    Ok((
        maj.parse().map_err(|_| bad())?,
        min.parse().map_err(|_| bad())?,
    ))
}

/// Refuses a device whose compute capability is below the image's PTX target.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn check_capability(arch: &str, cc: (i32, i32), name: &str) -> Result<()> {
    let want = parse_arch(arch)?;
    if cc < want {
        return Err(RuntimeError::Cuda(format!(
            "device `{name}` has compute capability {}.{}, below the artifact's {arch}: rebuild with a lower `--arch`, or use a newer GPU",
            cc.0, cc.1
        )));
    }
    Ok(())
}

/// A device of the caller's own, made from the image's entries in launch-index order (see
/// [`Gpu::launch`]).
pub(crate) type CustomGpu<'a> = Box<dyn FnOnce(&[CudaKernel]) -> Result<Arc<dyn Gpu>> + 'a>;

/// Open the device of a CUDA model: the driver's GPU, or the host emulator over the model's CPU
/// kernels (which therefore must be loaded first).
pub(crate) fn open(
    device: Device,
    custom: Option<CustomGpu<'_>>,
    image: &CudaImage,
    ptx: &[u8],
    kernels: Option<&crate::kernels::Kernels>,
) -> Result<Arc<dyn Gpu>> {
    let entries = gpu::entries(image)?;
    if let Some(make) = custom {
        let launches: Vec<CudaKernel> = entries.iter().map(|e| e.launch.clone()).collect();
        return make(&launches);
    }
    match device {
        Device::Cpu => Err(RuntimeError::Config("no device to open for the CPU".into())),
        Device::CudaEmulated => {
            let k = kernels
                .ok_or_else(|| RuntimeError::Config("cuda-emu needs the CPU kernels".into()))?;
            Ok(Arc::new(emu::Emu::new(&entries, k)))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => Ok(Arc::new(driver::CudaGpu::open(n, image, ptx, &entries)?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            let _ = ptx;
            Err(RuntimeError::Cuda(
                "this loopc was built without CUDA support: rebuild it with `--features cuda`"
                    .into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_below_the_image_arch_is_refused() {
        assert_eq!(parse_arch("sm_90").unwrap(), (9, 0));
        assert_eq!(parse_arch("sm_90a").unwrap(), (9, 0));
        assert_eq!(parse_arch("sm_120").unwrap(), (12, 0));
        assert!(parse_arch("hopper").is_err());
        assert!(check_capability("sm_90", (9, 0), "H200").is_ok());
        assert!(check_capability("sm_80", (9, 0), "H200").is_ok());
        let e = check_capability("sm_90", (8, 6), "RTX 3090")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("8.6") && e.contains("sm_90") && e.contains("RTX 3090"),
            "{e}"
        );
    }
}
