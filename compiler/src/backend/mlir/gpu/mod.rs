//! The CUDA road (`loopc build --target cuda`): every kernel of a manifest and every support
//! kernel of the contract (`loopc_runtime::artifact::cuda`) as one `gpu.module` of
//! `gpu.func … kernel`s, with a launch configuration chosen per kernel (the
//! [`CudaImage`] of the artifact). Emission is plain Rust text like the host kernels'
//! (`loopc ir --stage gpu` needs no LLVM); under the `mlir` feature [`native`](super::native)
//! verifies it and runs [`PTX_PIPELINE`] to PTX, which needs no CUDA toolkit.
//!
//! Kernels read and write through raw device addresses (`llvm.ptr`s from the `u64`
//! parameters), so nothing in the module depends on MLIR's CUDA runtime library, and the
//! transcendental functions are inline polynomials rather than libdevice calls.

mod emit;
mod kernels;
mod math64;
mod support;

use super::MlirError;
use loopc_runtime::artifact::cuda::SupportKernel;
use loopc_runtime::artifact::{CudaImage, CudaKernel, KernelDecl};

/// The PTX target of the CUDA artifacts (Hopper: H100/H200).
pub const ARCH: &str = "sm_90";
/// `Manifest::target` of a CUDA artifact.
pub const TARGET: &str = "cuda-sm_90";

/// From the emitted module to PTX: attach the NVVM target, lower the structured control flow
/// and the `gpu`/`arith`/`llvm` ops to NVVM, and serialize each `gpu.module` to PTX text
/// (`format=isa`: LLVM's NVPTX back end, no `ptxas` or CUDA toolkit involved).
pub const PTX_PIPELINE: &str = "builtin.module(nvvm-attach-target{chip=sm_90 O=3}, \
     gpu.module(convert-scf-to-cf, convert-gpu-to-nvvm{use-bare-ptr-memref-call-conv=1}, \
     canonicalize, cse), reconcile-unrealized-casts, gpu-module-to-binary{format=isa})";

/// The name of the one `gpu.module`.
pub const MODULE: &str = "loopc";

/// The module text and its launch table.
#[derive(Debug, Clone)]
pub struct GpuModule {
    pub text: String,
    pub image: CudaImage,
}

fn wrap(funcs: &str) -> String {
    format!("module attributes {{gpu.container_module}} {{\n  gpu.module @{MODULE} {{\n{funcs}  }}\n}}\n")
}

/// Every kernel of the manifest, in order, then every support kernel.
pub fn gpu_module(kernels: &[KernelDecl]) -> Result<GpuModule, MlirError> {
    super::check(kernels)?;
    let mut funcs = String::new();
    let mut launches = vec![];
    for decl in kernels {
        let (text, launch) = kernel_func(decl)?;
        funcs.push_str(&text);
        launches.push(launch);
    }
    let mut support = vec![];
    for (name, text, launch) in support::all() {
        funcs.push_str(&text);
        support.push(SupportKernel {
            name: name.to_string(),
            launch,
        });
    }
    Ok(GpuModule {
        text: wrap(&funcs),
        image: CudaImage {
            arch: ARCH.into(),
            kernels: launches,
            support,
        },
    })
}

/// One kernel's `gpu.func` and launch configuration (for tests and dumps).
pub fn kernel_func(decl: &KernelDecl) -> Result<(String, CudaKernel), MlirError> {
    super::check(std::slice::from_ref(decl))?;
    kernels::kernel(decl).map_err(|message| MlirError::Unsupported {
        symbol: decl.symbol.clone(),
        message,
    })
}

/// A module of the support kernels alone.
pub fn support_module() -> GpuModule {
    let mut funcs = String::new();
    let mut support = vec![];
    for (name, text, launch) in support::all() {
        funcs.push_str(&text);
        support.push(SupportKernel {
            name: name.to_string(),
            launch,
        });
    }
    GpuModule {
        text: wrap(&funcs),
        image: CudaImage {
            arch: ARCH.into(),
            kernels: vec![],
            support,
        },
    }
}

/// A module of one kernel alone (`gpu.module @loopc` holding its `gpu.func`).
pub fn kernel_module(decl: &KernelDecl) -> Result<String, MlirError> {
    Ok(wrap(&kernel_func(decl)?.0))
}
