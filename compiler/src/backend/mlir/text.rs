//! A small SSA text builder for MLIR's generic-free custom assembly.
//!
//! The kernels are emitted as text rather than through melior's op builders so that emission
//! (and `loopc ir --stage mlir`, and its snapshots) needs no LLVM: only parsing, verification
//! and lowering are behind the `mlir` feature.

use std::fmt::Write;

/// Lanes of the vectors the kernels compute on: one AVX-512 register of `f32`. On hosts with
/// narrower vectors LLVM splits them, so the width is a performance choice, not a correctness one.
pub const W: usize = 16;
pub const VF: &str = "vector<16xf32>";
pub const VI: &str = "vector<16xi32>";
pub const VM: &str = "vector<16xi1>";

/// Scalar `f32` or a full vector of them: the transcendental helpers serve both.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Scalar,
    Vector,
    /// Four lanes: the scores of a block of keys in attention.
    V4,
}

impl Ty {
    pub fn f(self) -> &'static str {
        match self {
            Ty::Scalar => "f32",
            Ty::Vector => VF,
            Ty::V4 => "vector<4xf32>",
        }
    }

    pub fn i(self) -> &'static str {
        match self {
            Ty::Scalar => "i32",
            Ty::Vector => VI,
            Ty::V4 => "vector<4xi32>",
        }
    }
}

/// An `f32` literal MLIR reads back to the same bits: the shortest decimal when it survives
/// MLIR's parse (through `double`), the bit pattern otherwise.
pub fn f32_lit(x: f32) -> String {
    if x.is_finite() {
        let s = format!("{x:?}");
        let ok = s.parse::<f64>().map(|d| d as f32 == x).unwrap_or(false);
        if ok {
            // MLIR's float literals need a fraction part before any exponent.
            return match s.find('e') {
                Some(i) if !s[..i].contains('.') => format!("{}.0{}", &s[..i], &s[i..]),
                _ => s,
            };
        }
    }
    format!("0x{:08X}", x.to_bits())
}

/// A symbol name as MLIR prints it: bare when it is a valid identifier, quoted otherwise.
pub fn sym(name: &str) -> String {
    let bare = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$' || c == '.');
    if bare {
        format!("@{name}")
    } else {
        format!("@{name:?}")
    }
}

pub struct Fx {
    out: String,
    next: usize,
    indent: usize,
    /// Device code: `convert-gpu-to-nvvm` turns `math.fma`/`sqrt`/`absf` into calls of
    /// libdevice (`__nv_fmaf`, ...), which a PTX module without a CUDA toolkit cannot link, so
    /// these are emitted as an LLVM intrinsic, inline PTX and a sign-bit mask instead.
    gpu: bool,
}

impl Fx {
    pub fn new(indent: usize) -> Fx {
        Fx {
            out: String::new(),
            next: 0,
            indent,
            gpu: false,
        }
    }

    /// A builder for device code (scalar `f32` only for the ops it rewrites).
    pub fn gpu(indent: usize) -> Fx {
        Fx {
            gpu: true,
            ..Fx::new(indent)
        }
    }

    pub fn finish(self) -> String {
        self.out
    }

    pub fn line(&mut self, s: impl AsRef<str>) {
        for _ in 0..self.indent {
            self.out.push_str("  ");
        }
        self.out.push_str(s.as_ref());
        self.out.push('\n');
    }

    pub fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%{}", self.next - 1)
    }

    /// `%n = rhs`, returns `%n`.
    pub fn op(&mut self, rhs: impl AsRef<str>) -> String {
        let v = self.fresh();
        let mut s = String::new();
        let _ = write!(s, "{v} = {}", rhs.as_ref());
        self.line(s);
        v
    }

    pub fn open(&mut self, s: impl AsRef<str>) {
        self.line(s);
        self.indent += 1;
    }

    pub fn close(&mut self, s: impl AsRef<str>) {
        self.indent -= 1;
        self.line(s);
    }

    /// A line between two regions of one op (`} else {`).
    pub fn between(&mut self, s: impl AsRef<str>) {
        self.indent -= 1;
        self.line(s);
        self.indent += 1;
    }

    // ---- constants ----

    pub fn idx(&mut self, v: usize) -> String {
        self.op(format!("arith.constant {v} : index"))
    }

    pub fn cf(&mut self, ty: Ty, x: f32) -> String {
        match ty {
            Ty::Scalar => self.op(format!("arith.constant {} : f32", f32_lit(x))),
            Ty::Vector | Ty::V4 => {
                self.op(format!("arith.constant dense<{}> : {}", f32_lit(x), ty.f()))
            }
        }
    }

    pub fn ci(&mut self, ty: Ty, x: i32) -> String {
        match ty {
            Ty::Scalar => self.op(format!("arith.constant {x} : i32")),
            Ty::Vector | Ty::V4 => self.op(format!("arith.constant dense<{x}> : {}", ty.i())),
        }
    }

    /// A mask with the first `n` of [`W`] lanes set.
    pub fn mask(&mut self, n: usize) -> String {
        self.op(format!("vector.constant_mask [{n}] : {VM}"))
    }

    // ---- index arithmetic ----

    pub fn add_i(&mut self, a: &str, b: &str) -> String {
        self.op(format!("arith.addi {a}, {b} : index"))
    }

    pub fn mul_i(&mut self, a: &str, b: &str) -> String {
        self.op(format!("arith.muli {a}, {b} : index"))
    }

    /// `a · k` for a constant `k` (`a` itself when `k == 1`).
    pub fn mul_k(&mut self, a: &str, k: usize) -> String {
        if k == 1 {
            return a.to_string();
        }
        let k = self.idx(k);
        self.mul_i(a, &k)
    }

    /// `a + k` for a constant `k` (`a` itself when `k == 0`).
    pub fn add_k(&mut self, a: &str, k: usize) -> String {
        if k == 0 {
            return a.to_string();
        }
        let k = self.idx(k);
        self.add_i(a, &k)
    }

    // ---- float arithmetic ----

    pub fn bin(&mut self, op: &str, ty: Ty, a: &str, b: &str) -> String {
        self.op(format!("arith.{op} {a}, {b} : {}", ty.f()))
    }

    pub fn add(&mut self, ty: Ty, a: &str, b: &str) -> String {
        self.bin("addf", ty, a, b)
    }

    pub fn sub(&mut self, ty: Ty, a: &str, b: &str) -> String {
        self.bin("subf", ty, a, b)
    }

    pub fn mul(&mut self, ty: Ty, a: &str, b: &str) -> String {
        self.bin("mulf", ty, a, b)
    }

    pub fn div(&mut self, ty: Ty, a: &str, b: &str) -> String {
        self.bin("divf", ty, a, b)
    }

    /// `a · b + c` with one rounding.
    pub fn fma(&mut self, ty: Ty, a: &str, b: &str, c: &str) -> String {
        if self.gpu {
            let t = ty.f();
            return self.op(format!(
                "llvm.intr.fma({a}, {b}, {c}) : ({t}, {t}, {t}) -> {t}"
            ));
        }
        self.op(format!("math.fma {a}, {b}, {c} : {}", ty.f()))
    }

    pub fn neg(&mut self, ty: Ty, a: &str) -> String {
        self.op(format!("arith.negf {a} : {}", ty.f()))
    }

    pub fn unary(&mut self, op: &str, ty: Ty, a: &str) -> String {
        if self.gpu && ty == Ty::Scalar {
            match op {
                "math.sqrt" => {
                    return self.op(format!(
                        "llvm.inline_asm \"sqrt.rn.f32 $0, $1;\", \"=f,f\" {a} : (f32) -> f32"
                    ))
                }
                "math.absf" => {
                    let bits = self.op(format!("arith.bitcast {a} : f32 to i32"));
                    let m = self.op("arith.constant 2147483647 : i32");
                    let abs = self.op(format!("arith.andi {bits}, {m} : i32"));
                    return self.op(format!("arith.bitcast {abs} : i32 to f32"));
                }
                _ => {}
            }
        }
        self.op(format!("{op} {a} : {}", ty.f()))
    }

    /// `cond ? a : b` per lane.
    pub fn select(&mut self, ty: Ty, cond: &str, a: &str, b: &str) -> String {
        match ty {
            Ty::Scalar => self.op(format!("arith.select {cond}, {a}, {b} : f32")),
            Ty::Vector => self.op(format!("arith.select {cond}, {a}, {b} : {VM}, {VF}")),
            Ty::V4 => self.op(format!(
                "arith.select {cond}, {a}, {b} : vector<4xi1>, vector<4xf32>"
            )),
        }
    }

    pub fn splat(&mut self, s: &str) -> String {
        self.op(format!("vector.broadcast {s} : f32 to {VF}"))
    }

    /// The sum of the lanes of `v`, added in the Cranelift backend's order: its four `f32x4`
    /// accumulators are lanes 0–3, 4–7, 8–11, 12–15 here, summed pairwise, then across lanes.
    /// Row reductions (norms) of the two backends then round identically, and a plain
    /// `vector.reduction <add>` (strictly sequential without reassociation) is no faster.
    pub fn hsum(&mut self, v: &str) -> String {
        const V4: &str = "vector<4xf32>";
        let s = self.quarters(v);
        let t = self.op(format!("vector.shuffle {s}, {s} [2, 3, 0, 1] : {V4}, {V4}"));
        let s = self.op(format!("arith.addf {s}, {t} : {V4}"));
        let t = self.op(format!("vector.shuffle {s}, {s} [1, 0, 3, 2] : {V4}, {V4}"));
        let s = self.op(format!("arith.addf {s}, {t} : {V4}"));
        self.op(format!("vector.extract {s}[0] : f32 from {V4}"))
    }

    /// `v` folded to four lanes: `(v[0..4] + v[4..8]) + (v[8..12] + v[12..16])`.
    pub fn quarters(&mut self, v: &str) -> String {
        const V4: &str = "vector<4xf32>";
        let mut q = vec![];
        for k in 0..4 {
            let lanes: Vec<String> = (4 * k..4 * k + 4).map(|l| l.to_string()).collect();
            q.push(self.op(format!(
                "vector.shuffle {v}, {v} [{}] : {VF}, {VF}",
                lanes.join(", ")
            )));
        }
        let a = self.op(format!("arith.addf {}, {} : {V4}", q[0], q[1]));
        let b = self.op(format!("arith.addf {}, {} : {V4}", q[2], q[3]));
        self.op(format!("arith.addf {a}, {b} : {V4}"))
    }

    /// `[Σd0, Σd1, Σd2, Σd3]` of four 4-lane vectors (a 4×4 transpose and two adds, the
    /// Cranelift attention's order).
    pub fn transpose_sum(&mut self, d: [&str; 4]) -> String {
        const V4: &str = "vector<4xf32>";
        let mut sh = |a: &str, b: &str, idx: &str| {
            self.op(format!("vector.shuffle {a}, {b} [{idx}] : {V4}, {V4}"))
        };
        let t0 = sh(d[0], d[1], "0, 4, 1, 5");
        let t1 = sh(d[0], d[1], "2, 6, 3, 7");
        let t2 = sh(d[2], d[3], "0, 4, 1, 5");
        let t3 = sh(d[2], d[3], "2, 6, 3, 7");
        let u0 = self.op(format!("arith.addf {t0}, {t1} : {V4}"));
        let u1 = self.op(format!("arith.addf {t2}, {t3} : {V4}"));
        let lo = self.op(format!(
            "vector.shuffle {u0}, {u1} [0, 1, 4, 5] : {V4}, {V4}"
        ));
        let hi = self.op(format!(
            "vector.shuffle {u0}, {u1} [2, 3, 6, 7] : {V4}, {V4}"
        ));
        self.op(format!("arith.addf {lo}, {hi} : {V4}"))
    }

    // ---- memory ----

    /// A vector of `m[at ..]`: all [`W`] lanes, or the lanes of `mask` (the others read 0).
    pub fn load(&mut self, m: &str, at: &str, mask: Option<&str>) -> String {
        match mask {
            None => self.op(format!("vector.load {m}[{at}] : memref<?xf32>, {VF}")),
            Some(mask) => {
                let zero = self.cf(Ty::Vector, 0.0);
                self.op(format!(
                    "vector.maskedload {m}[{at}], {mask}, {zero} : memref<?xf32>, {VM}, {VF} into {VF}"
                ))
            }
        }
    }

    pub fn store(&mut self, v: &str, m: &str, at: &str, mask: Option<&str>) {
        match mask {
            None => self.line(format!("vector.store {v}, {m}[{at}] : memref<?xf32>, {VF}")),
            Some(mask) => self.line(format!(
                "vector.maskedstore {m}[{at}], {mask}, {v} : memref<?xf32>, {VM}, {VF}"
            )),
        }
    }

    pub fn load_scalar(&mut self, m: &str, at: &str) -> String {
        self.op(format!("memref.load {m}[{at}] : memref<?xf32>"))
    }
}

/// Chunks of a row of `n` elements: `(first element, lanes)`; only the last may be partial.
pub struct Chunks {
    pub full: usize,
    pub tail: usize,
}

impl Chunks {
    pub fn of(n: usize) -> Chunks {
        Chunks {
            full: n / W,
            tail: n % W,
        }
    }
}

/// `(fx, first element, mask of the partial chunk, carried values) -> next carried values`.
pub type ChunkBody<'a> = dyn FnMut(&mut Fx, &str, Option<&str>, &[String]) -> Vec<String> + 'a;

/// Run `body(fx, offset, mask, carried)` over the chunks of a row of `n` elements starting at
/// index `base`: a `scf.for` over the full chunks (with `carried` as iteration arguments of
/// type `carried_ty`), then the partial chunk straight-line with a mask. Returns the carried
/// values after the row.
pub fn for_chunks(
    fx: &mut Fx,
    base: &str,
    n: usize,
    carried: Vec<String>,
    carried_ty: &str,
    body: &mut ChunkBody,
) -> Vec<String> {
    let ch = Chunks::of(n);
    let mut carried = carried;
    if ch.full == 1 {
        carried = body(fx, base, None, &carried);
    } else if ch.full > 1 {
        let lo = fx.idx(0);
        let hi = fx.idx(ch.full * W);
        let step = fx.idx(W);
        let c = fx.fresh();
        let results = if carried.is_empty() {
            fx.open(format!("scf.for {c} = {lo} to {hi} step {step} {{"));
            vec![]
        } else {
            let res = fx.fresh();
            let args: Vec<String> = carried.iter().map(|_| fx.fresh()).collect();
            let inits: Vec<String> = args
                .iter()
                .zip(&carried)
                .map(|(a, v)| format!("{a} = {v}"))
                .collect();
            let tys = vec![carried_ty; carried.len()].join(", ");
            fx.open(format!(
                "{res}:{} = scf.for {c} = {lo} to {hi} step {step} iter_args({}) -> ({tys}) {{",
                carried.len(),
                inits.join(", ")
            ));
            let out: Vec<String> = (0..carried.len()).map(|k| format!("{res}#{k}")).collect();
            carried = args;
            out
        };
        let at = fx.add_i(base, &c);
        let next = body(fx, &at, None, &carried);
        if next.is_empty() {
            fx.close("}");
        } else {
            let tys = vec![carried_ty; next.len()].join(", ");
            fx.line(format!("scf.yield {} : {tys}", next.join(", ")));
            fx.close("}");
        }
        carried = results;
    }
    if ch.tail > 0 {
        let at = fx.add_k(base, ch.full * W);
        let mask = fx.mask(ch.tail);
        carried = body(fx, &at, Some(&mask), &carried);
    }
    carried
}
