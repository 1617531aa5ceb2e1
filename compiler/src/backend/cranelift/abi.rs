//! The kernel ABI: `extern "C" fn(ptrs: *const *mut f32, ints: *const i64)`,
//! `ints[0..4] = [begin, end, pos0, kv_len]`.

use super::emit::Fx;
use cranelift_codegen::ir::{types, AbiParam, InstBuilder, MemFlagsData, Signature, Value};
use cranelift_codegen::isa::CallConv;

/// Fixed to System V rather than the host default so the CLIF text is the same everywhere; the
/// shared object is linked for ELF hosts, where this is the C ABI.
pub fn signature() -> Signature {
    let mut sig = Signature::new(CallConv::SystemV);
    sig.params.push(AbiParam::new(types::I64));
    sig.params.push(AbiParam::new(types::I64));
    sig
}

/// The arguments of a kernel, read in its entry block.
pub struct Params {
    ptrs: Value,
    pub begin: Value,
    pub end: Value,
    pub pos0: Value,
}

/// The argument arrays belong to the caller and don't change during the call.
fn arg_flags() -> MemFlagsData {
    MemFlagsData::trusted().with_readonly()
}

impl Params {
    /// Create the entry block and read the integers (`kv_len` is unused: causality is
    /// `0..=pos0 + r` by definition).
    pub fn enter(fx: &mut Fx) -> Params {
        let entry = fx.b.create_block();
        fx.b.append_block_params_for_function_params(entry);
        fx.b.switch_to_block(entry);
        fx.b.seal_block(entry);
        let ptrs = fx.b.block_params(entry)[0];
        let ints = fx.b.block_params(entry)[1];
        let int = |fx: &mut Fx, k: i32| fx.b.ins().load(types::I64, arg_flags(), ints, 8 * k);
        let begin = int(fx, 0);
        let end = int(fx, 1);
        let pos0 = int(fx, 2);
        Params {
            ptrs,
            begin,
            end,
            pos0,
        }
    }

    /// Pointer argument `k` (in the order documented on each `KernelSpec` variant).
    pub fn ptr(&self, fx: &mut Fx, k: usize) -> Value {
        fx.b.ins()
            .load(types::I64, arg_flags(), self.ptrs, 8 * k as i32)
    }

    /// The same call seen as `k` items per row: `begin·k .. end·k` (each head of a row as a
    /// row of its own, for kernels that treat heads independently).
    pub fn items_per_row(&self, fx: &mut Fx, k: usize) -> Params {
        Params {
            ptrs: self.ptrs,
            begin: fx.imul_imm(self.begin, k as i64),
            end: fx.imul_imm(self.end, k as i64),
            pos0: self.pos0,
        }
    }
}
