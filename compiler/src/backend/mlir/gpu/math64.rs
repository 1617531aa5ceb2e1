//! `f64` `exp`, `ln`, `sin` and `cos` as inline arithmetic for the position-signal kernels
//! (the host computes them in `f64` and rounds to `f32`). `convert-gpu-to-nvvm` would make
//! them libdevice calls, which a PTX module built without a CUDA toolkit cannot link, and
//! NVPTX has no `f64` transcendental instructions. Accuracy is a few ulp of `f64`, far below
//! the `f32` rounding of the results.

use super::super::text::Fx;

/// An `f64` constant.
pub(super) fn c(fx: &mut Fx, x: f64) -> String {
    // `{:e}` prints the shortest round-trip form with an exponent, which MLIR reads back.
    let s = format!("{x:e}");
    let s = match s.find('e') {
        Some(i) if !s[..i].contains('.') => format!("{}.0{}", &s[..i], &s[i..]),
        _ => s,
    };
    fx.op(format!("arith.constant {s} : f64"))
}

fn bin(fx: &mut Fx, op: &str, a: &str, b: &str) -> String {
    fx.op(format!("arith.{op} {a}, {b} : f64"))
}

fn fma(fx: &mut Fx, a: &str, b: &str, c: &str) -> String {
    fx.op(format!(
        "llvm.intr.fma({a}, {b}, {c}) : (f64, f64, f64) -> f64"
    ))
}

/// Horner's scheme, highest coefficient first.
fn poly(fx: &mut Fx, x: &str, coeffs: &[f64]) -> String {
    let mut p = c(fx, coeffs[0]);
    for &k in &coeffs[1..] {
        let kc = c(fx, k);
        p = fma(fx, &p, x, &kc);
    }
    p
}

/// `1.5 · 2^52`: adding it rounds to an integer held in the low mantissa bits.
const MAGIC: f64 = 6_755_399_441_055_744.0;

/// `e^x` for `x` in about `[-700, 700]`: `2^n · e^r`, `|r| ≤ ln2 / 2`, Taylor to degree 13.
pub fn exp(fx: &mut Fx, x: &str) -> String {
    let hi = c(fx, 700.0);
    let lo = c(fx, -700.0);
    let x = bin(fx, "minimumf", x, &hi);
    let x = bin(fx, "maximumf", &x, &lo);
    let log2e = c(fx, std::f64::consts::LOG2_E);
    let magic = c(fx, MAGIC);
    let t = fma(fx, &x, &log2e, &magic);
    let n = bin(fx, "subf", &t, &magic);
    // fdlibm's split of ln 2: the high part has trailing zero bits, so `n·ln2_hi` is exact.
    let ln2_hi = c(fx, f64::from_bits(0x3FE6_2E42_FEE0_0000));
    let ln2_lo = c(fx, f64::from_bits(0x3DEA_39EF_3579_3C76));
    let nn = fx.op(format!("arith.negf {n} : f64"));
    let r = fma(fx, &nn, &ln2_hi, &x);
    let r = fma(fx, &nn, &ln2_lo, &r);
    let coeffs: Vec<f64> = (0..=13)
        .rev()
        .map(|k| 1.0 / (1..=k).map(|i| i as f64).product::<f64>())
        .collect();
    let p = poly(fx, &r, &coeffs);
    // 2^n from n's bits in `t`: (n + 1023) << 52.
    let bits = fx.op(format!("arith.bitcast {t} : f64 to i64"));
    let bias = fx.op(format!(
        "arith.constant {} : i64",
        MAGIC.to_bits() as i64 - 1023
    ));
    let e = fx.op(format!("arith.subi {bits}, {bias} : i64"));
    let sh = fx.op("arith.constant 52 : i64");
    let e = fx.op(format!("arith.shli {e}, {sh} : i64"));
    let scale = fx.op(format!("arith.bitcast {e} : i64 to f64"));
    bin(fx, "mulf", &p, &scale)
}

/// `ln x` for finite `x > 0` (normal numbers): `x = 2^e · m` with `m ∈ [√½, √2)`, then
/// `ln m = 2·atanh(s)`, `s = (m − 1)/(m + 1)`, `|s| ≤ 0.172`, a series to `s^23`.
pub fn ln(fx: &mut Fx, x: &str) -> String {
    let bits = fx.op(format!("arith.bitcast {x} : f64 to i64"));
    // Subtracting the bits of √½ puts the mantissa boundary at √½ instead of 1.
    let off = fx.op(format!(
        "arith.constant {} : i64",
        std::f64::consts::FRAC_1_SQRT_2.to_bits() as i64
    ));
    let k = fx.op(format!("arith.subi {bits}, {off} : i64"));
    let sh = fx.op("arith.constant 52 : i64");
    let e = fx.op(format!("arith.shrsi {k}, {sh} : i64"));
    let eb = fx.op(format!("arith.shli {e}, {sh} : i64"));
    let mb = fx.op(format!("arith.subi {bits}, {eb} : i64"));
    let m = fx.op(format!("arith.bitcast {mb} : i64 to f64"));
    let one = c(fx, 1.0);
    let num = bin(fx, "subf", &m, &one);
    let den = bin(fx, "addf", &m, &one);
    let s = bin(fx, "divf", &num, &den);
    let z = bin(fx, "mulf", &s, &s);
    let coeffs: Vec<f64> = (0..=11).rev().map(|k| 2.0 / (2 * k + 1) as f64).collect();
    let p = poly(fx, &z, &coeffs);
    let lm = bin(fx, "mulf", &s, &p);
    let ef = fx.op(format!("arith.sitofp {e} : i64 to f64"));
    let ln2 = c(fx, std::f64::consts::LN_2);
    fma(fx, &ef, &ln2, &lm)
}

/// `(sin a, cos a)`: `a = k·π/2 + r` with `|r| ≤ π/4` (a two-part `π/2` through FMAs, exact
/// enough for the arguments of position signals), Taylor polynomials, and the quadrant `k mod 4`.
pub fn sin_cos(fx: &mut Fx, a: &str) -> (String, String) {
    let two_over_pi = c(fx, std::f64::consts::FRAC_2_PI);
    let magic = c(fx, MAGIC);
    let t = fma(fx, a, &two_over_pi, &magic);
    let k = bin(fx, "subf", &t, &magic);
    let nk = fx.op(format!("arith.negf {k} : f64"));
    let p1 = c(fx, std::f64::consts::FRAC_PI_2);
    let p2 = c(fx, 6.123_233_995_736_766e-17);
    let r = fma(fx, &nk, &p1, a);
    let r = fma(fx, &nk, &p2, &r);
    let z = bin(fx, "mulf", &r, &r);
    // sin r = r · S(z), cos r = C(z), with S and C the Taylor series to r^19 / r^20.
    let fact = |n: u32| (1..=n).map(|i| i as f64).product::<f64>();
    let sc: Vec<f64> = (0..=9)
        .rev()
        .map(|k| if k % 2 == 0 { 1.0 } else { -1.0 } / fact(2 * k + 1))
        .collect();
    let cc: Vec<f64> = (0..=10)
        .rev()
        .map(|k| if k % 2 == 0 { 1.0 } else { -1.0 } / fact(2 * k))
        .collect();
    let sp = poly(fx, &z, &sc);
    let s = bin(fx, "mulf", &r, &sp);
    let co = poly(fx, &z, &cc);
    // The quadrant from k's low bits in `t` (two's complement, so negative k works too).
    let bits = fx.op(format!("arith.bitcast {t} : f64 to i64"));
    let three = fx.op("arith.constant 3 : i64");
    let q = fx.op(format!("arith.andi {bits}, {three} : i64"));
    let one = fx.op("arith.constant 1 : i64");
    let two = fx.op("arith.constant 2 : i64");
    let odd_b = fx.op(format!("arith.andi {q}, {one} : i64"));
    let even = fx.op(format!("arith.cmpi ne, {odd_b}, {one} : i64"));
    // Odd quadrants swap sin and cos.
    let sin0 = fx.op(format!("arith.select {even}, {s}, {co} : f64"));
    let cos0 = fx.op(format!("arith.select {even}, {co}, {s} : f64"));
    // sin is negative in quadrants 2, 3; cos in quadrants 1, 2.
    let hi_b = fx.op(format!("arith.andi {q}, {two} : i64"));
    let zero = fx.op("arith.constant 0 : i64");
    let sin_neg = fx.op(format!("arith.cmpi ne, {hi_b}, {zero} : i64"));
    let q1 = fx.op(format!("arith.cmpi eq, {q}, {one} : i64"));
    let q2 = fx.op(format!("arith.cmpi eq, {q}, {two} : i64"));
    let cos_neg = fx.op(format!("arith.ori {q1}, {q2} : i1"));
    let ns = fx.op(format!("arith.negf {sin0} : f64"));
    let nc = fx.op(format!("arith.negf {cos0} : f64"));
    let sin = fx.op(format!("arith.select {sin_neg}, {ns}, {sin0} : f64"));
    let cos = fx.op(format!("arith.select {cos_neg}, {nc}, {cos0} : f64"));
    (sin, cos)
}
