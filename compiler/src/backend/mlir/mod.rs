//! MLIR backend: the program as an MLIR module (the `loop` dialect for its structure, kernels as
//! `func.func`s over `arith`/`math`/`memref`/`vector`), lowered by MLIR's passes to the `llvm`
//! dialect and by LLVM to native code for the host, then linked into a shared object exactly
//! like the Cranelift backend's, so the runtime loads either the same way.
//!
//! Emission is plain Rust (always built, so `--stage mlir` and its snapshots need no LLVM);
//! parsing, verification, lowering and code generation go through melior and the MLIR/LLVM 22
//! libraries behind the `mlir` feature ([`native`]).

mod gemm;
pub mod gpu;
mod kernels;
mod math;
mod structure;
mod text;

#[cfg(feature = "mlir")]
pub mod loop_ops;
/// For programs that build `loop` ops with [`loop_ops`] (and the tests).
#[cfg(feature = "mlir")]
pub use melior;
#[cfg(feature = "mlir")]
pub mod native;
#[cfg(feature = "mlir")]
pub mod rewrite;

pub use gemm::host_gemm;

use super::cranelift::BackendError;
use loopc_runtime::artifact::{KernelDecl, Manifest};
use std::collections::HashSet;

/// The `loop` dialect in IRDL, loaded at run time (`native::load_dialect`).
pub const LOOP_DIALECT_IRDL: &str = include_str!("../../../../dialects/mlir/loop.irdl.mlir");

/// The lowering pipeline from the emitted module to the `llvm` dialect. `inline` folds the
/// memref views into the kernels before the memref descriptors are lowered, so each pointer
/// becomes a plain base address again; masked vector ops lower to AVX-512 masked moves; the
/// GEMM's 16×16 transposes lower to the AVX-512 shuffle sequence.
pub const LOWERING_PIPELINE: &str = "builtin.module(inline, canonicalize, cse, \
     convert-vector-to-scf, convert-scf-to-cf, \
     convert-vector-to-llvm{vector-transpose-lowering=shuffle16x16 enable-amx}, expand-strided-metadata, \
     finalize-memref-to-llvm, convert-math-to-llvm, convert-arith-to-llvm, convert-index-to-llvm, \
     convert-cf-to-llvm, convert-func-to-llvm, reconcile-unrealized-casts, canonicalize, cse)";

/// A failure of the MLIR backend: an invalid kernel spec or a linking problem (shared with the
/// Cranelift backend), or MLIR's or LLVM's diagnostics.
#[derive(Debug, thiserror::Error)]
pub enum MlirError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("kernel `{symbol}`: {message}")]
    Unsupported { symbol: String, message: String },
    #[error("MLIR: {0}")]
    Mlir(String),
}

fn check(kernels: &[KernelDecl]) -> Result<(), BackendError> {
    let mut seen = HashSet::new();
    for decl in kernels {
        super::cranelift::validate(decl)?;
        if !seen.insert(decl.symbol.as_str()) {
            return Err(BackendError::DuplicateSymbol(decl.symbol.clone()));
        }
    }
    Ok(())
}

/// The kernels alone as a module: what [`native::compile_kernels`] lowers. With `amx`, the AMX
/// bf16 GEMM is included (it needs a host whose LLVM target has AMX-BF16).
pub fn kernels_module(kernels: &[KernelDecl], amx: bool) -> Result<String, MlirError> {
    check(kernels)?;
    kernels::kernels_module(kernels, amx).map_err(MlirError::Mlir)
}

/// The module of `loopc ir --stage mlir`: the program in the `loop` dialect with every kernel,
/// before any upstream pass. With `kernel_bodies = false` kernels are only declared (the
/// snapshot form).
pub fn program_module(m: &Manifest, kernel_bodies: bool) -> Result<String, MlirError> {
    check(&m.kernels)?;
    structure::program_module(m, kernel_bodies).map_err(MlirError::Mlir)
}

/// The MLIR text of one kernel's function (for tests and dumps).
pub fn kernel_func(decl: &KernelDecl) -> Result<String, MlirError> {
    check(std::slice::from_ref(decl))?;
    kernels::kernel_func(decl).map_err(|message| MlirError::Unsupported {
        symbol: decl.symbol.clone(),
        message,
    })
}
