//! Transcendental functions as inline `arith`/`math` code, the same polynomials as the Cranelift
//! backend's (`backend/cranelift/math.rs`, Cephes `expf`/`tanhf`), so both backends agree to
//! rounding and neither needs libm (the shared object is linked with `-z defs`).
//! `math.exp` with MLIR's own polynomial approximation would also avoid libm, but its error
//! differs from Cranelift's, and the two backends are tested against each other.

// The Cephes coefficients are kept digit for digit as published.
#![allow(clippy::excessive_precision)]

use super::text::{Fx, Ty};

const ROUND_MAGIC: f32 = 12_582_912.0;
const EXP_HI: f32 = 88.0;
const EXP_LO: f32 = -87.0;

/// `e^x`: `2^n · e^r` with `n = round(x / ln 2)` (by the magic-number add, so no float→int
/// conversion), a two-part `ln 2` reduction and a degree-6 polynomial; NaN propagates through
/// `minimumf`/`maximumf`.
pub fn exp(fx: &mut Fx, ty: Ty, x: &str) -> String {
    let hi = fx.cf(ty, EXP_HI);
    let x = fx.bin("minimumf", ty, &hi, x);
    let lo = fx.cf(ty, EXP_LO);
    let x = fx.bin("maximumf", ty, &lo, &x);
    let log2e = fx.cf(ty, std::f32::consts::LOG2_E);
    let magic = fx.cf(ty, ROUND_MAGIC);
    let t = fx.fma(ty, &x, &log2e, &magic);
    let n = fx.sub(ty, &t, &magic);
    let c1 = fx.cf(ty, -0.693_359_375);
    let r = fx.fma(ty, &n, &c1, &x);
    let c2 = fx.cf(ty, 2.121_944_4e-4);
    let r = fx.fma(ty, &n, &c2, &r);
    let z = fx.mul(ty, &r, &r);
    let mut p = fx.cf(ty, 1.987_569_15e-4);
    for c in [
        1.398_199_950_7e-3,
        8.333_451_907_3e-3,
        4.166_579_589_4e-2,
        1.666_666_545_9e-1,
        5.000_000_120_1e-1,
    ] {
        let c = fx.cf(ty, c);
        p = fx.fma(ty, &p, &r, &c);
    }
    let y = fx.fma(ty, &p, &z, &r);
    let one = fx.cf(ty, 1.0);
    let y = fx.add(ty, &y, &one);
    // 2^n: `t` holds ROUND_MAGIC's bits plus n; rebias them into an IEEE exponent.
    let bits = fx.op(format!("arith.bitcast {t} : {} to {}", ty.f(), ty.i()));
    let bias = fx.ci(ty, (ROUND_MAGIC.to_bits() as i32) - 127);
    let e = fx.op(format!("arith.subi {bits}, {bias} : {}", ty.i()));
    let sh = fx.ci(ty, 23);
    let e = fx.op(format!("arith.shli {e}, {sh} : {}", ty.i()));
    let scale = fx.op(format!("arith.bitcast {e} : {} to {}", ty.i(), ty.f()));
    fx.mul(ty, &y, &scale)
}

/// `num / (1 + e^-arg)`: saturates to 0 or `num` without overflow or NaN.
fn div_one_plus_exp_neg(fx: &mut Fx, ty: Ty, num: &str, arg: &str) -> String {
    let neg = fx.neg(ty, arg);
    let e = exp(fx, ty, &neg);
    let one = fx.cf(ty, 1.0);
    let d = fx.add(ty, &one, &e);
    fx.div(ty, num, &d)
}

pub fn sigmoid(fx: &mut Fx, ty: Ty, x: &str) -> String {
    let one = fx.cf(ty, 1.0);
    div_one_plus_exp_neg(fx, ty, &one, x)
}

pub fn silu(fx: &mut Fx, ty: Ty, x: &str) -> String {
    div_one_plus_exp_neg(fx, ty, x, x)
}

/// Odd polynomial below |x| = 0.625 (where `1 − 2/(e^2x + 1)` cancels), that form above.
pub fn tanh(fx: &mut Fx, ty: Ty, x: &str) -> String {
    let z = fx.mul(ty, x, x);
    let mut p = fx.cf(ty, -5.704_988_727_45e-3);
    for c in [
        2.063_908_879_54e-2,
        -5.373_971_555_31e-2,
        1.333_144_220_36e-1,
        -3.333_328_194_22e-1,
    ] {
        let c = fx.cf(ty, c);
        p = fx.fma(ty, &p, &z, &c);
    }
    let xz = fx.mul(ty, x, &z);
    let small = fx.fma(ty, &xz, &p, x);
    let two = fx.cf(ty, 2.0);
    let x2 = fx.mul(ty, x, &two);
    let e = exp(fx, ty, &x2);
    let one = fx.cf(ty, 1.0);
    let d = fx.add(ty, &e, &one);
    let q = fx.div(ty, &two, &d);
    let large = fx.sub(ty, &one, &q);
    let ax = fx.unary("math.absf", ty, x);
    let threshold = fx.cf(ty, 0.625);
    let lt = fx.op(format!("arith.cmpf olt, {ax}, {threshold} : {}", ty.f()));
    fx.select(ty, &lt, &small, &large)
}

/// `x · sigmoid(2u)` with `u = √(2/π)(x + 0.044715x³)`: the tanh form without its cancellation.
pub fn gelu_tanh(fx: &mut Fx, ty: Ty, x: &str) -> String {
    const K: f32 = 2.0 * 0.797_884_560_802_865_4;
    let w = fx.mul(ty, x, x);
    let kc = fx.cf(ty, K * 0.044_715);
    let k = fx.cf(ty, K);
    let inner = fx.fma(ty, &w, &kc, &k);
    let two_u = fx.mul(ty, x, &inner);
    div_one_plus_exp_neg(fx, ty, x, &two_u)
}

/// `max(x, 0) + log(1 + e^−|x|)`, the log through `log(1 + u) = 2·atanh(u / (2 + u))` as a
/// series in `s = u/(2+u) ≤ 1/3` (the same terms as the Cranelift kernel, so both agree).
pub fn softplus(fx: &mut Fx, ty: Ty, x: &str) -> String {
    let ax = fx.unary("math.absf", ty, x);
    let nax = fx.neg(ty, &ax);
    let u = exp(fx, ty, &nax);
    let two = fx.cf(ty, 2.0);
    let d = fx.add(ty, &two, &u);
    let s = fx.div(ty, &u, &d);
    let z = fx.mul(ty, &s, &s);
    let mut p = fx.cf(ty, 1.0 / 17.0);
    for k in (0..8).rev() {
        let c = fx.cf(ty, 1.0 / (2 * k + 1) as f32);
        p = fx.fma(ty, &p, &z, &c);
    }
    let s2 = fx.add(ty, &s, &s);
    let zero = fx.cf(ty, 0.0);
    let pos = fx.bin("maximumf", ty, x, &zero);
    fx.fma(ty, &s2, &p, &pos)
}
