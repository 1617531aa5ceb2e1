//! Rotary position embedding, in place.

use super::abi::Params;
use super::emit::{Access, Fx, LANES, UNROLL_ALL};
use cranelift_codegen::ir::{InstBuilder, Value};
use loopc_runtime::artifact::RopeStyle;

pub fn build(fx: &mut Fx, params: &Params, heads: usize, head_dim: usize, style: RopeStyle) {
    build_impl(fx, params, heads, head_dim, style, false)
}

/// `x = rope(x + bias)`: pointers `[x, bias, cos, sin]`.
pub fn build_with_bias(
    fx: &mut Fx,
    params: &Params,
    heads: usize,
    head_dim: usize,
    style: RopeStyle,
) {
    build_impl(fx, params, heads, head_dim, style, true)
}

fn build_impl(
    fx: &mut Fx,
    params: &Params,
    heads: usize,
    head_dim: usize,
    style: RopeStyle,
    with_bias: bool,
) {
    let x = params.ptr(fx, 0);
    let bias = with_bias.then(|| params.ptr(fx, 1));
    let k = usize::from(with_bias);
    let cos = params.ptr(fx, 1 + k);
    let sin = params.ptr(fx, 2 + k);
    let half = head_dim / 2;
    let head_bytes = 4 * head_dim as i64;

    fx.counted_loop(params.begin, params.end, 1, vec![], |fx, r, _| {
        let pos = fx.iadd(params.pos0, r);
        let cos_row = fx.offset(cos, pos, 4 * half as i64);
        let sin_row = fx.offset(sin, pos, 4 * half as i64);
        let x_row = fx.offset(x, r, heads as i64 * head_bytes);
        let start = fx.iconst(0);
        let end = fx.iconst(heads as i64 * head_bytes);
        fx.counted_loop(start, end, head_bytes, vec![], |fx, head_off, _| {
            let xh = fx.iadd(x_row, head_off);
            let bh = bias.map(|b| fx.iadd(b, head_off));
            let tables = Tables {
                cos: cos_row,
                sin: sin_row,
            };
            match style {
                RopeStyle::Half => half_pairs(fx, xh, bh, tables, half),
                RopeStyle::Interleaved => interleaved_pairs(fx, xh, bh, tables, half),
            }
        });
    });
}

#[derive(Clone, Copy)]
struct Tables {
    cos: Value,
    sin: Value,
}

impl Tables {
    /// `cos`/`sin` of the pairs of one chunk.
    fn load(self, fx: &mut Fx, dyn_off: Option<Value>, off: i32, width: usize) -> (Value, Value) {
        let at = fx.at(self.cos, dyn_off);
        let c = fx.load_with(Access::ReadOnly, at, off, width);
        let at = fx.at(self.sin, dyn_off);
        let s = fx.load_with(Access::ReadOnly, at, off, width);
        (c, s)
    }
}

/// `(a, b) -> (a·cos - b·sin, b·cos + a·sin)`.
fn rotate(fx: &mut Fx, a: Value, b: Value, c: Value, s: Value) -> (Value, Value) {
    let bs = fx.mul(b, s);
    let nbs = fx.neg(bs);
    let a2 = fx.mul_add(a, c, nbs);
    let bc = fx.mul(b, c);
    let b2 = fx.mul_add(a, s, bc);
    (a2, b2)
}

/// Pairs `(x[i], x[i + d/2])`: both halves are contiguous, no shuffles.
fn half_pairs(fx: &mut Fx, xh: Value, bh: Option<Value>, tables: Tables, half: usize) {
    let second = 4 * half as i32;
    fx.for_chunks(
        half,
        1,
        UNROLL_ALL,
        &mut vec![],
        |fx, dyn_off, off, width, _| {
            let (c, s) = tables.load(fx, dyn_off, off, width);
            let at = fx.at(xh, dyn_off);
            let mut a = fx.load(at, off, width);
            let mut b = fx.load(at, off + second, width);
            if let Some(bh) = bh {
                let bat = fx.at(bh, dyn_off);
                let ba = fx.load_with(Access::ReadOnly, bat, off, width);
                let bb = fx.load_with(Access::ReadOnly, bat, off + second, width);
                a = fx.add(a, ba);
                b = fx.add(b, bb);
            }
            let (a2, b2) = rotate(fx, a, b, c, s);
            fx.store(a2, at, off, width);
            fx.store(b2, at, off + second, width);
        },
    );
}

/// Pairs `(x[2i], x[2i+1])`: four pairs span two vectors, de-interleaved into `a` and `b` lanes
/// (`shufps`) and interleaved back (`unpcklps`/`unpckhps`).
fn interleaved_pairs(fx: &mut Fx, xh: Value, bh: Option<Value>, tables: Tables, half: usize) {
    fx.for_chunks(
        half,
        1,
        UNROLL_ALL,
        &mut vec![],
        |fx, dyn_off, off, width, _| {
            let (c, s) = tables.load(fx, dyn_off, off, width);
            // Chunk offsets count pairs (one f32 of the tables); x has two f32 per pair.
            let x_dyn = dyn_off.map(|d| fx.b.ins().ishl_imm_u(d, 1));
            let at = fx.at(xh, x_dyn);
            let off = 2 * off;
            let w0 = (2 * width).min(LANES);
            let w1 = 2 * width - w0;
            let mut v0 = fx.load(at, off, w0);
            let mut v1 = if w1 > 0 {
                fx.load(at, off + 16, w1)
            } else {
                fx.splat(0.0)
            };
            if let Some(bh) = bh {
                let bat = fx.at(bh, x_dyn);
                let b0 = fx.load_with(Access::ReadOnly, bat, off, w0);
                v0 = fx.add(v0, b0);
                if w1 > 0 {
                    let b1 = fx.load_with(Access::ReadOnly, bat, off + 16, w1);
                    v1 = fx.add(v1, b1);
                }
            }
            let a = fx.shuffle(v0, v1, [0, 2, 4, 6]);
            let b = fx.shuffle(v0, v1, [1, 3, 5, 7]);
            let (a2, b2) = rotate(fx, a, b, c, s);
            let o0 = fx.shuffle(a2, b2, [0, 4, 1, 5]);
            fx.store(o0, at, off, w0);
            if w1 > 0 {
                let o1 = fx.shuffle(a2, b2, [2, 6, 3, 7]);
                fx.store(o1, at, off + 16, w1);
            }
        },
    );
}
