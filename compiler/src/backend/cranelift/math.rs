//! Transcendental functions as inline `f32x4` code (the kernels must not call libm).
//!
//! `exp` is Cephes' `expf`: `exp(x) = 2^n · e^r` with `n = round(x / ln 2)`, `r` reduced with a
//! two-part `ln 2` so the reduction is exact, and a degree-6 polynomial for `e^r` on
//! `|r| ≤ ln2/2` (about 1 ulp). The others are built on it, in forms that neither overflow nor
//! cancel catastrophically. NaN inputs propagate.

// The Cephes coefficients are kept digit for digit as published.
#![allow(clippy::excessive_precision)]

use super::emit::{Fx, F32X4};
use cranelift_codegen::ir::{condcodes::FloatCC, types, InstBuilder, MemFlagsData, Value};

/// Adding 1.5·2²³ to a float of magnitude < 2²² rounds it to an integer that then sits in the low
/// mantissa bits: a float→int conversion without `cvtps2dq`'s dependence on the rounding mode.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Clamp bounds: `n` stays within the normal exponent range, so `2^n` needs no special cases.
/// `e^88 ≈ 1.65e38` is finite; below `e^-87 ≈ 1.6e-38` results are negligible in every use here.
const EXP_HI: f32 = 88.0;
const EXP_LO: f32 = -87.0;

/// `e^x` on each lane.
pub fn exp(fx: &mut Fx, x: Value) -> Value {
    // Operand order keeps NaN: `pmin(a, b)` yields `b` when the comparison is false.
    let hi = fx.splat(EXP_HI);
    let x = fx.pmin(hi, x);
    let lo = fx.splat(EXP_LO);
    let x = fx.pmax(lo, x);

    let log2e = fx.splat(std::f32::consts::LOG2_E);
    let magic = fx.splat(ROUND_MAGIC);
    let t = fx.mul_add(x, log2e, magic);
    let n = fx.sub(t, magic);
    // ln 2 = 0.693359375 - 2.12194440e-4 (the first part has 9 bits, so n·C1 is exact).
    let c1 = fx.splat(-0.693_359_375);
    let r = fx.mul_add(n, c1, x);
    let c2 = fx.splat(2.121_944_4e-4);
    let r = fx.mul_add(n, c2, r);

    let z = fx.mul(r, r);
    let mut p = fx.splat(1.987_569_15e-4);
    for c in [
        1.398_199_950_7e-3,
        8.333_451_907_3e-3,
        4.166_579_589_4e-2,
        1.666_666_545_9e-1,
        5.000_000_120_1e-1,
    ] {
        let c = fx.splat(c);
        p = fx.mul_add(p, r, c);
    }
    let y = fx.mul_add(p, z, r);
    let one = fx.splat(1.0);
    let y = fx.add(y, one);

    // 2^n: the bits of `t` are those of ROUND_MAGIC plus n; rebias to an IEEE exponent.
    let bits = fx.b.ins().bitcast(types::I32X4, MemFlagsData::new(), t);
    let bias =
        fx.b.ins()
            .iconst(types::I32, i64::from(ROUND_MAGIC.to_bits()) - 127);
    let bias = fx.b.ins().splat(types::I32X4, bias);
    let e = fx.b.ins().isub(bits, bias);
    let e = fx.b.ins().ishl_imm_u(e, 23);
    let scale = fx.b.ins().bitcast(F32X4, MemFlagsData::new(), e);
    fx.mul(y, scale)
}

/// `x / (1 + e^-(k·x))`; `x = 1` gives the sigmoid of `k·x`. For very negative `k·x` the clamped
/// `exp` is huge and the quotient ~0; for very positive it is `x`: no overflow, no NaN.
fn div_one_plus_exp_neg(fx: &mut Fx, num: Value, arg: Value) -> Value {
    let neg = fx.neg(arg);
    let e = exp(fx, neg);
    let one = fx.splat(1.0);
    let d = fx.add(one, e);
    fx.div(num, d)
}

pub fn sigmoid(fx: &mut Fx, x: Value) -> Value {
    let one = fx.splat(1.0);
    div_one_plus_exp_neg(fx, one, x)
}

/// `x · sigmoid(x)`.
pub fn silu(fx: &mut Fx, x: Value) -> Value {
    div_one_plus_exp_neg(fx, x, x)
}

/// Cephes `tanhf`: an odd polynomial below |x| = 0.625, where `1 - 2/(e^2x + 1)` would cancel;
/// that form above (it saturates to ±1 through the clamped `exp`).
pub fn tanh(fx: &mut Fx, x: Value) -> Value {
    let z = fx.mul(x, x);
    let mut p = fx.splat(-5.704_988_727_45e-3);
    for c in [
        2.063_908_879_54e-2,
        -5.373_971_555_31e-2,
        1.333_144_220_36e-1,
        -3.333_328_194_22e-1,
    ] {
        let c = fx.splat(c);
        p = fx.mul_add(p, z, c);
    }
    let xz = fx.mul(x, z);
    let small = fx.mul_add(xz, p, x);

    let two = fx.splat(2.0);
    let x2 = fx.mul(x, two);
    let e = exp(fx, x2);
    let one = fx.splat(1.0);
    let d = fx.add(e, one);
    let q = fx.div(two, d);
    let large = fx.sub(one, q);

    let ax = fx.b.ins().fabs(x);
    let threshold = fx.splat(0.625);
    fx.select_cmp(FloatCC::LessThan, ax, threshold, small, large)
}

/// `0.5·x·(1 + tanh(u))` with `u = √(2/π)(x + 0.044715x³)`, computed as the identical
/// `x · sigmoid(2u)`: no cancellation in `1 + tanh(u)` for negative `x`.
pub fn gelu_tanh(fx: &mut Fx, x: Value) -> Value {
    const K: f32 = 2.0 * 0.797_884_560_802_865_4; // 2·√(2/π)
    let w = fx.mul(x, x);
    let kc = fx.splat(K * 0.044_715);
    let k = fx.splat(K);
    let inner = fx.mul_add(w, kc, k);
    let two_u = fx.mul(x, inner);
    div_one_plus_exp_neg(fx, x, two_u)
}

/// `ln(1 + e^x) = max(x, 0) + ln(1 + u)` with `u = e^-|x|` in (0, 1]: `ln(1 + u)` is
/// `2·atanh(s)`, `s = u / (2 + u)` ≤ 1/3, summed as an odd series to s¹⁷ (error below 1e-9).
/// `s` carries no cancellation, so tiny `u` keep their relative precision.
pub fn softplus(fx: &mut Fx, x: Value) -> Value {
    let ax = fx.b.ins().fabs(x);
    let nax = fx.neg(ax);
    let u = exp(fx, nax);
    let two = fx.splat(2.0);
    let d = fx.add(two, u);
    let s = fx.div(u, d);
    let z = fx.mul(s, s);
    let mut p = fx.splat(1.0 / 17.0);
    for k in (0..8).rev() {
        let c = fx.splat(1.0 / (2 * k + 1) as f32);
        p = fx.mul_add(p, z, c);
    }
    let s2 = fx.add(s, s);
    let zero = fx.splat(0.0);
    let pos = fx.b.ins().fmax(x, zero);
    fx.mul_add(s2, p, pos)
}
