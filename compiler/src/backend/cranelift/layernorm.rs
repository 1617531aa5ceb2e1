//! Layer normalization with gain and bias (GPT-2 style). Two reductions (mean, then the mean
//! of squared deviations) rather than E[x²] − E[x]², which cancels badly when |mean| ≫ std.

use super::abi::Params;
use super::emit::{Fx, UNROLL_ALL};
use cranelift_codegen::ir::{InstBuilder, Value};

const ACCUMULATORS: usize = 4;

fn reduce(fx: &mut Fx, acc: &[Value]) -> Value {
    let s01 = fx.add(acc[0], acc[1]);
    let s23 = fx.add(acc[2], acc[3]);
    let s = fx.add(s01, s23);
    fx.hsum(s)
}

pub fn build(fx: &mut Fx, params: &Params, cols: usize, eps: f32) {
    // Pointers: [x, gain, bias, y].
    let x_ptr = params.ptr(fx, 0);
    let g_ptr = params.ptr(fx, 1);
    let b_ptr = params.ptr(fx, 2);
    let y_ptr = params.ptr(fx, 3);
    let row_bytes = 4 * cols as i64;

    fx.counted_loop(params.begin, params.end, 1, vec![], |fx, r, _| {
        let row_off = fx.imul_imm(r, row_bytes);
        let x_row = fx.iadd(x_ptr, row_off);
        let y_row = fx.iadd(y_ptr, row_off);
        let n = fx.splat(cols as f32);

        let zero = fx.splat(0.0);
        let mut acc = vec![zero; ACCUMULATORS];
        fx.for_chunks(
            cols,
            ACCUMULATORS,
            ACCUMULATORS,
            &mut acc,
            |fx, dyn_off, off, width, acc| {
                let at = fx.at(x_row, dyn_off);
                let x = fx.load(at, off, width);
                let k = (off as usize / 16) % ACCUMULATORS;
                acc[k] = fx.add(acc[k], x);
            },
        );
        let total = reduce(fx, &acc);
        let mean = fx.div(total, n);

        let mut acc = vec![zero; ACCUMULATORS];
        fx.for_chunks(
            cols,
            ACCUMULATORS,
            ACCUMULATORS,
            &mut acc,
            |fx, dyn_off, off, width, acc| {
                let at = fx.at(x_row, dyn_off);
                let x = fx.load(at, off, width);
                let d = fx.sub(x, mean);
                let k = (off as usize / 16) % ACCUMULATORS;
                acc[k] = fx.mul_add(d, d, acc[k]);
            },
        );
        let sq = reduce(fx, &acc);
        // The lanes past the row end load as zero, so each added (0 − mean)²: take them back out.
        let pad = (4 - cols % 4) % 4;
        let sq = if pad > 0 {
            let m2 = fx.mul(mean, mean);
            let p = fx.splat(pad as f32);
            let extra = fx.mul(m2, p);
            fx.sub(sq, extra)
        } else {
            sq
        };
        let var = fx.div(sq, n);
        let eps = fx.splat(eps);
        let ve = fx.add(var, eps);
        let sd = fx.b.ins().sqrt(ve);
        let one = fx.splat(1.0);
        let inv = fx.div(one, sd);

        fx.for_chunks(
            cols,
            2,
            UNROLL_ALL,
            &mut vec![],
            |fx, dyn_off, off, width, _| {
                let at = fx.at(x_row, dyn_off);
                let x = fx.load(at, off, width);
                let d = fx.sub(x, mean);
                let z = fx.mul(d, inv);
                let at = fx.at(g_ptr, dyn_off);
                let g = fx.load(at, off, width);
                let at = fx.at(b_ptr, dyn_off);
                let b = fx.load(at, off, width);
                let y = fx.mul_add(z, g, b);
                let at = fx.at(y_row, dyn_off);
                fx.store(y, at, off, width);
            },
        );
    });
}
