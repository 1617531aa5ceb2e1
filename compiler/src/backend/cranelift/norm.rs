//! RMS normalization, optionally fused with the residual add that precedes it.

use super::abi::Params;
use super::emit::{Fx, UNROLL_ALL};
use cranelift_codegen::ir::InstBuilder;

/// Independent accumulators for the sum of squares, to hide the add latency.
const ACCUMULATORS: usize = 4;

pub fn build(fx: &mut Fx, params: &Params, cols: usize, eps: f32, residual: bool, gain: bool) {
    build_mode(fx, params, cols, eps, residual, gain, false)
}

/// `KernelSpec::InvRms`: only the row factor `1/rms`, stored as one float per row. It shares
/// the sum order and `sqrt`-then-divide of `build`, so `x · s` equals the norm bit for bit.
pub fn build_inv(fx: &mut Fx, params: &Params, cols: usize, eps: f32) {
    build_mode(fx, params, cols, eps, false, false, true)
}

fn build_mode(
    fx: &mut Fx,
    params: &Params,
    cols: usize,
    eps: f32,
    residual: bool,
    gain: bool,
    inv_only: bool,
) {
    // Pointers: [x, gain?, y] or [a, b, gain?, sum, y]; inv_only: [x, s].
    let mut next = 0;
    let mut take = |fx: &mut Fx| {
        next += 1;
        params.ptr(fx, next - 1)
    };
    let (a, b) = if residual {
        let a = take(fx);
        (a, Some(take(fx)))
    } else {
        (take(fx), None)
    };
    let gain_ptr = if gain { Some(take(fx)) } else { None };
    let sum_ptr = if residual { Some(take(fx)) } else { None };
    let y_ptr = take(fx);
    let row_bytes = 4 * cols as i64;

    fx.counted_loop(params.begin, params.end, 1, vec![], |fx, r, _| {
        let row_off = fx.imul_imm(r, row_bytes);
        let a_row = fx.iadd(a, row_off);
        let b_row = b.map(|b| fx.iadd(b, row_off));
        let sum_row = sum_ptr.map(|s| fx.iadd(s, row_off));
        let y_row = if inv_only {
            let off = fx.imul_imm(r, 4);
            fx.iadd(y_ptr, off)
        } else {
            fx.iadd(y_ptr, row_off)
        };

        let zero = fx.splat(0.0);
        let mut acc = vec![zero; ACCUMULATORS];
        fx.for_chunks(
            cols,
            ACCUMULATORS,
            ACCUMULATORS,
            &mut acc,
            |fx, dyn_off, off, width, acc| {
                let at = fx.at(a_row, dyn_off);
                let mut x = fx.load(at, off, width);
                if let (Some(b_row), Some(sum_row)) = (b_row, sum_row) {
                    let at = fx.at(b_row, dyn_off);
                    let xb = fx.load(at, off, width);
                    x = fx.add(x, xb);
                    let at = fx.at(sum_row, dyn_off);
                    fx.store(x, at, off, width);
                }
                let k = (off as usize / 16) % ACCUMULATORS;
                acc[k] = fx.mul_add(x, x, acc[k]);
            },
        );
        let s01 = fx.add(acc[0], acc[1]);
        let s23 = fx.add(acc[2], acc[3]);
        let s = fx.add(s01, s23);
        let total = fx.hsum(s);
        let n = fx.splat(cols as f32);
        let mean = fx.div(total, n);
        let eps = fx.splat(eps);
        let var = fx.add(mean, eps);
        let rms = fx.b.ins().sqrt(var);
        let one = fx.splat(1.0);
        let inv = fx.div(one, rms);
        if inv_only {
            fx.store(inv, y_row, 0, 1);
            return;
        }

        // With the residual, `x` is re-read from `sum`, not recomputed: `sum` may alias `a`.
        let x_row = sum_row.unwrap_or(a_row);
        fx.for_chunks(
            cols,
            2,
            UNROLL_ALL,
            &mut vec![],
            |fx, dyn_off, off, width, _| {
                let at = fx.at(x_row, dyn_off);
                let x = fx.load(at, off, width);
                let mut y = fx.mul(x, inv);
                if let Some(g) = gain_ptr {
                    let at = fx.at(g, dyn_off);
                    let g = fx.load(at, off, width);
                    y = fx.mul(y, g);
                }
                let at = fx.at(y_row, dyn_off);
                fx.store(y, at, off, width);
            },
        );
    });
}
