//! Fused elementwise kernels: the SSA op list evaluated on each `f32x4` chunk of a row.

use super::abi::Params;
use super::emit::{Fx, UNROLL_ALL};
use super::math;
use cranelift_codegen::ir::{InstBuilder, Value};
use loopc_runtime::artifact::{EwIn, EwOp};
use loopc_runtime::ew::{live_ops, operands};

pub fn validate(inputs: &[EwIn], ops: &[EwOp], outputs: &[u32]) -> Result<(), String> {
    if outputs.is_empty() {
        return Err("an elementwise kernel needs at least one output".into());
    }
    for (i, op) in ops.iter().enumerate() {
        if let EwOp::Input(k) = op {
            if *k as usize >= inputs.len() {
                return Err(format!(
                    "op {i} reads input {k} but the kernel has {} inputs",
                    inputs.len()
                ));
            }
        }
        for a in operands(op) {
            if a as usize >= i {
                return Err(format!(
                    "op {i} ({op:?}) uses op {a}, which does not precede it"
                ));
            }
        }
    }
    for &o in outputs {
        if o as usize >= ops.len() {
            return Err(format!("output op {o} does not exist ({} ops)", ops.len()));
        }
    }
    Ok(())
}

/// Where an input's values of the current row come from.
#[derive(Clone, Copy)]
enum Source {
    /// Row start (or the vector, for broadcasts); the chunk is at its column offset.
    Memory(Value),
    /// A per-row scalar, already splat.
    Splat(Value),
}

/// Where an input lives: its pointer, and for `Rows` inputs the row stride and first column
/// (in floats), so one buffer can feed several inputs (the halves of a gate|up matmul).
struct Layout {
    kind: EwIn,
    ptr: usize,
    stride: usize,
    col: usize,
}

pub fn build(
    fx: &mut Fx,
    params: &Params,
    cols: usize,
    inputs: &[EwIn],
    ops: &[EwOp],
    outputs: &[u32],
) {
    let layout: Vec<Layout> = inputs
        .iter()
        .enumerate()
        .map(|(k, &kind)| Layout {
            kind,
            ptr: k,
            stride: cols,
            col: 0,
        })
        .collect();
    build_with(fx, params, cols, &layout, inputs.len(), ops, outputs);
}

/// `y = ops(x[:, :cols], x[:, cols:])` with pointers `[x, y]` (see `KernelSpec::Glu`).
pub fn build_glu(fx: &mut Fx, params: &Params, cols: usize, ops: &[EwOp]) {
    let layout = [
        Layout {
            kind: EwIn::Rows,
            ptr: 0,
            stride: 2 * cols,
            col: 0,
        },
        Layout {
            kind: EwIn::Rows,
            ptr: 0,
            stride: 2 * cols,
            col: cols,
        },
    ];
    let last = ops.len().saturating_sub(1) as u32;
    build_with(fx, params, cols, &layout, 1, ops, &[last]);
}

fn build_with(
    fx: &mut Fx,
    params: &Params,
    cols: usize,
    layout: &[Layout],
    n_in_ptrs: usize,
    ops: &[EwOp],
    outputs: &[u32],
) {
    let inputs: Vec<EwIn> = layout.iter().map(|l| l.kind).collect();
    let in_ptrs: Vec<Value> = layout.iter().map(|l| params.ptr(fx, l.ptr)).collect();
    let out_ptrs: Vec<Value> = (0..outputs.len())
        .map(|k| params.ptr(fx, n_in_ptrs + k))
        .collect();
    let live = live_ops(ops, outputs);
    let row_bytes = 4 * cols as i64;

    fx.counted_loop(params.begin, params.end, 1, vec![], |fx, r, _| {
        let row_off = fx.imul_imm(r, row_bytes);
        let sources: Vec<Source> = layout
            .iter()
            .zip(&in_ptrs)
            .map(|(l, &ptr)| match l.kind {
                EwIn::Rows if l.stride == cols && l.col == 0 => {
                    Source::Memory(fx.iadd(ptr, row_off))
                }
                EwIn::Rows => {
                    let off = fx.imul_imm(r, 4 * l.stride as i64);
                    let col = fx.iconst(4 * l.col as i64);
                    let off = fx.iadd(off, col);
                    Source::Memory(fx.iadd(ptr, off))
                }
                EwIn::Broadcast => Source::Memory(ptr),
                EwIn::PerRow => {
                    let at = fx.offset(ptr, r, 4);
                    Source::Splat(fx.load_splat(at, 0))
                }
            })
            .collect();
        let out_rows: Vec<Value> = out_ptrs.iter().map(|&p| fx.iadd(p, row_off)).collect();

        fx.for_chunks(
            cols,
            2,
            UNROLL_ALL,
            &mut vec![],
            |fx, dyn_off, off, width, _| {
                // Every input of the chunk is read before any output is written, so an output may
                // alias an input (in-place updates).
                let mut loaded: Vec<Option<Value>> = vec![None; inputs.len()];
                let mut vals: Vec<Option<Value>> = vec![None; ops.len()];
                for (i, op) in ops.iter().enumerate() {
                    if !live[i] {
                        continue;
                    }
                    let arg = |k: u32| vals[k as usize].expect("operands precede their uses");
                    let v = match *op {
                        EwOp::Input(k) => {
                            let k = k as usize;
                            *loaded[k].get_or_insert_with(|| match sources[k] {
                                Source::Memory(base) => {
                                    let at = fx.at(base, dyn_off);
                                    fx.load(at, off, width)
                                }
                                Source::Splat(v) => v,
                            })
                        }
                        EwOp::Const(c) => fx.splat(c),
                        EwOp::Add(a, b) => fx.add(arg(a), arg(b)),
                        EwOp::Sub(a, b) => fx.sub(arg(a), arg(b)),
                        EwOp::Mul(a, b) => fx.mul(arg(a), arg(b)),
                        EwOp::Div(a, b) => fx.div(arg(a), arg(b)),
                        EwOp::Max(a, b) => fx.b.ins().fmax(arg(a), arg(b)),
                        EwOp::Neg(a) => fx.neg(arg(a)),
                        EwOp::Exp(a) => math::exp(fx, arg(a)),
                        EwOp::Sigmoid(a) => math::sigmoid(fx, arg(a)),
                        EwOp::Silu(a) => math::silu(fx, arg(a)),
                        EwOp::Relu(a) => {
                            let zero = fx.splat(0.0);
                            fx.b.ins().fmax(arg(a), zero)
                        }
                        EwOp::Tanh(a) => math::tanh(fx, arg(a)),
                        EwOp::GeluTanh(a) => math::gelu_tanh(fx, arg(a)),
                        EwOp::Sqrt(a) => fx.b.ins().sqrt(arg(a)),
                        EwOp::Softplus(a) => math::softplus(fx, arg(a)),
                    };
                    vals[i] = Some(v);
                }
                for (&o, &row) in outputs.iter().zip(&out_rows) {
                    let v = vals[o as usize].expect("outputs are live");
                    let at = fx.at(row, dyn_off);
                    fx.store(v, at, off, width);
                }
            },
        );
    });
}
