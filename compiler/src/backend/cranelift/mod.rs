//! Cranelift CPU backend: kernel specifications to native code in a shared object.
//!
//! Every kernel is generated as its own CLIF function with the C ABI of
//! [`loopc_runtime::artifact`] (`fn(ptrs: *const *mut f32, ints: *const i64)`). All shapes of a
//! spec are baked in as constants, so the only dynamic values are the item range and positions.
//! Cranelift has no 256/512-bit vectors, so the code is vectorized with `f32x4` over the
//! contiguous dimension, with a partial last chunk instead of a separate scalar path.
//!
//! No libm: `exp`, `tanh`, … are inline polynomials ([`math`]), and the shared object is linked
//! with `-z defs` so that an unexpected libcall fails the build rather than the first call.

mod abi;
mod attention;
mod elementwise;
mod emit;
mod layernorm;
pub(crate) mod link;
mod math;
mod norm;
mod rope;
mod target;

use cranelift_codegen::ir::{Function, UserFuncName};
use cranelift_codegen::settings;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{Linkage, Module};
use cranelift_object::{ObjectBuilder, ObjectModule};
use loopc_runtime::artifact::{EwIn, KernelDecl, KernelSpec};
use std::collections::HashSet;

pub use target::Features;

/// The generated code of a kernel list.
#[derive(Debug, Clone)]
pub struct CompiledKernels {
    /// The relocatable object produced by Cranelift.
    pub object: Vec<u8>,
    /// `object` linked into a shared object, ready for `dlopen`.
    pub shared_object: Vec<u8>,
    /// `(symbol, CLIF)` of each kernel after Cranelift's optimizations, for dumps.
    pub clif: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("kernel `{symbol}`: invalid specification: {reason}")]
    InvalidSpec { symbol: String, reason: String },
    #[error("kernel symbol `{0}` is declared twice")]
    DuplicateSymbol(String),
    #[error("the Cranelift backend cannot target this host: {0}")]
    UnsupportedHost(String),
    #[error("kernel `{symbol}`: Cranelift rejected the generated code: {message}")]
    Codegen { symbol: String, message: String },
    #[error("cannot write the object file: {0}")]
    Object(String),
    #[error(
        "cannot link the kernels into a shared object: the C compiler driver `cc` was not found \
         on PATH (install gcc or clang)"
    )]
    LinkerMissing,
    #[error("linking the kernels with `cc -shared` failed ({status}):\n{stderr}")]
    LinkFailed { status: String, stderr: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// Compile every kernel into one object, exported under its symbol, and link it into a shared
/// object. The code uses the vector extensions of the host it is compiled on.
pub fn compile_kernels(kernels: &[KernelDecl]) -> Result<CompiledKernels, BackendError> {
    let (isa, features) = target::host_isa()?;
    let mut seen = HashSet::new();
    for decl in kernels {
        validate(decl)?;
        if !seen.insert(decl.symbol.as_str()) {
            return Err(BackendError::DuplicateSymbol(decl.symbol.clone()));
        }
    }

    // An unexpected libcall gets a name no library defines, so `-z defs` reports it at link time.
    let libcalls = Box::new(|lc| format!("__loopc_unexpected_libcall_{lc:?}"));
    let builder = ObjectBuilder::new(isa, "loopc_kernels", libcalls)
        .map_err(|e| BackendError::Object(e.to_string()))?;
    let mut module = ObjectModule::new(builder);
    let mut ctx = module.make_context();
    let mut fctx = FunctionBuilderContext::new();
    let mut clif = Vec::with_capacity(kernels.len());

    for decl in kernels {
        let codegen_err = |message: String| BackendError::Codegen {
            symbol: decl.symbol.clone(),
            message,
        };
        let id = module
            .declare_function(&decl.symbol, Linkage::Export, &abi::signature())
            .map_err(|e| codegen_err(e.to_string()))?;
        ctx.func = build(decl, features, &mut fctx);
        if let Err(e) = module.define_function(id, &mut ctx) {
            let message = match &e {
                cranelift_module::ModuleError::Compilation(
                    cranelift_codegen::CodegenError::Verifier(errors),
                ) => cranelift_codegen::print_errors::pretty_verifier_error(
                    &ctx.func,
                    None,
                    errors.clone(),
                ),
                _ => e.to_string(),
            };
            return Err(codegen_err(message));
        }
        clif.push((decl.symbol.clone(), ctx.func.display().to_string()));
        module.clear_context(&mut ctx);
    }

    let object = module
        .finish()
        .emit()
        .map_err(|e| BackendError::Object(e.to_string()))?;
    let shared_object = link::shared_object(&object)?;
    Ok(CompiledKernels {
        object,
        shared_object,
        clif,
    })
}

/// The CLIF of one kernel as generated, before Cranelift's optimizations.
///
/// The text is the same on every machine: it is generated for [`Features::CANONICAL`] (FMA
/// available) rather than for the host, so it can be snapshot-tested.
pub fn kernel_clif(decl: &KernelDecl) -> Result<String, BackendError> {
    validate(decl)?;
    let func = build(
        decl,
        Features::CANONICAL,
        &mut FunctionBuilderContext::new(),
    );
    let flags = settings::Flags::new(settings::builder());
    cranelift_codegen::verify_function(&func, &flags).map_err(|errors| BackendError::Codegen {
        symbol: decl.symbol.clone(),
        message: cranelift_codegen::print_errors::pretty_verifier_error(&func, None, errors),
    })?;
    Ok(func.display().to_string())
}

fn build(decl: &KernelDecl, features: Features, fctx: &mut FunctionBuilderContext) -> Function {
    let mut func =
        Function::with_name_signature(UserFuncName::testcase(&decl.symbol), abi::signature());
    let b = FunctionBuilder::new(&mut func, fctx);
    let mut fx = emit::Fx::new(b, features);
    let params = abi::Params::enter(&mut fx);
    match &decl.spec {
        KernelSpec::Elementwise {
            cols,
            inputs,
            ops,
            outputs,
        } => elementwise::build(&mut fx, &params, *cols, inputs, ops, outputs),
        KernelSpec::RmsNorm {
            cols,
            eps,
            residual,
            gain,
        } => norm::build(&mut fx, &params, *cols, *eps, *residual, *gain),
        KernelSpec::Rope {
            heads,
            head_dim,
            style,
        } => rope::build(&mut fx, &params, *heads, *head_dim, *style),
        KernelSpec::Attention {
            heads,
            kv_heads,
            head_dim,
            scale,
        } => attention::build(&mut fx, &params, *heads, *kv_heads, *head_dim, *scale),
        KernelSpec::LayerNorm { cols, eps } => layernorm::build(&mut fx, &params, *cols, *eps),
        KernelSpec::HeadRmsNorm {
            heads,
            head_dim,
            eps,
        } => {
            // Rows of `heads · head_dim` are `heads` contiguous rows of `head_dim`.
            let per_head = params.items_per_row(&mut fx, *heads);
            norm::build(&mut fx, &per_head, *head_dim, *eps, false, false)
        }
        KernelSpec::Glu { cols, ops } => elementwise::build_glu(&mut fx, &params, *cols, ops),
        KernelSpec::RopeBias {
            heads,
            head_dim,
            style,
        } => rope::build_with_bias(&mut fx, &params, *heads, *head_dim, *style),
        KernelSpec::InvRms { cols, eps } => norm::build_inv(&mut fx, &params, *cols, *eps),
    }
    fx.finish();
    func
}

/// Largest row length or head size accepted, so every byte offset fits Cranelift's `i32`
/// immediates with room to spare.
const MAX_DIM: usize = 1 << 24;

pub(crate) fn validate(decl: &KernelDecl) -> Result<(), BackendError> {
    let invalid = |reason: String| BackendError::InvalidSpec {
        symbol: decl.symbol.clone(),
        reason,
    };
    if decl.symbol.is_empty()
        || decl
            .symbol
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(format!(
            "symbol {:?} is not a valid symbol name",
            decl.symbol
        )));
    }
    let dim = |name: &str, v: usize| {
        if v == 0 || v > MAX_DIM {
            Err(invalid(format!("{name} = {v} must be in 1..={MAX_DIM}")))
        } else {
            Ok(())
        }
    };
    match &decl.spec {
        KernelSpec::Elementwise {
            cols,
            inputs,
            ops,
            outputs,
        } => {
            dim("cols", *cols)?;
            elementwise::validate(inputs, ops, outputs).map_err(invalid)
        }
        KernelSpec::RmsNorm { cols, eps, .. }
        | KernelSpec::LayerNorm { cols, eps }
        | KernelSpec::InvRms { cols, eps } => {
            dim("cols", *cols)?;
            if !eps.is_finite() || *eps < 0.0 {
                return Err(invalid(format!(
                    "eps = {eps} must be finite and non-negative"
                )));
            }
            Ok(())
        }
        KernelSpec::Rope {
            heads, head_dim, ..
        }
        | KernelSpec::RopeBias {
            heads, head_dim, ..
        } => {
            dim("heads", *heads)?;
            dim("head_dim", *head_dim)?;
            dim("heads * head_dim", heads.saturating_mul(*head_dim))?;
            if head_dim % 2 != 0 {
                return Err(invalid(format!("rope head_dim = {head_dim} must be even")));
            }
            Ok(())
        }
        KernelSpec::Attention {
            heads,
            kv_heads,
            head_dim,
            scale,
        } => {
            dim("heads", *heads)?;
            dim("kv_heads", *kv_heads)?;
            dim("head_dim", *head_dim)?;
            dim("heads * head_dim", heads.saturating_mul(*head_dim))?;
            if *head_dim > attention::MAX_HEAD_DIM {
                return Err(invalid(format!(
                    "head_dim = {head_dim} exceeds the supported {}",
                    attention::MAX_HEAD_DIM
                )));
            }
            if heads % kv_heads != 0 {
                return Err(invalid(format!(
                    "heads = {heads} is not a multiple of kv_heads = {kv_heads}"
                )));
            }
            if !scale.is_finite() {
                return Err(invalid(format!("scale = {scale} must be finite")));
            }
            Ok(())
        }
        KernelSpec::HeadRmsNorm {
            heads,
            head_dim,
            eps,
        } => {
            dim("heads", *heads)?;
            dim("head_dim", *head_dim)?;
            dim("heads * head_dim", heads.saturating_mul(*head_dim))?;
            if !eps.is_finite() || *eps < 0.0 {
                return Err(invalid(format!(
                    "eps = {eps} must be finite and non-negative"
                )));
            }
            Ok(())
        }
        KernelSpec::Glu { cols, ops } => {
            dim("2 * cols", cols.saturating_mul(2))?;
            dim("cols", *cols)?;
            let last = ops
                .len()
                .checked_sub(1)
                .ok_or_else(|| invalid("a gated unit needs ops".into()))?;
            elementwise::validate(&[EwIn::Rows, EwIn::Rows], ops, &[last as u32]).map_err(invalid)
        }
    }
}
