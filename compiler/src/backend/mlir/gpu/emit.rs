//! The pieces every device kernel is made of: its `gpu.func` header (scalar parameters only,
//! per the contract), `i64` index arithmetic, `f32` loads and stores through raw addresses,
//! thread-strided loops and warp/block reductions.
//!
//! Addresses are `llvm.ptr`s made from the `u64` parameters, not memrefs: the kernels index
//! buffers whose sizes only the runtime knows, and NVPTX turns a kernel parameter's pointer into
//! global loads by itself. Index arithmetic is `i64` throughout so that no `index` casts are
//! needed around the pointer arithmetic.

use super::super::text::Fx;
use loopc_runtime::artifact::CudaKernel;

pub const WARP: usize = 32;

/// The type of a scalar parameter.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum P {
    /// A `u64` device address (`?`-pointers may be 0).
    Ptr,
    I64,
    F64,
    F32,
}

impl P {
    fn ty(self) -> &'static str {
        match self {
            P::Ptr | P::I64 => "i64",
            P::F64 => "f64",
            P::F32 => "f32",
        }
    }
}

/// Shared memory for block reductions: one slot per warp.
pub const SHARED_F32: &str = "memref<32xf32, #gpu.address_space<workgroup>>";
pub const SHARED_F64: &str = "memref<32xf64, #gpu.address_space<workgroup>>";

/// A kernel under construction: its parameters, launch shape and the ids every kernel reads.
pub struct Kern {
    pub fx: Fx,
    name: String,
    params: Vec<(String, P)>,
    pub launch: CudaKernel,
    /// `f32` (and `f64`) block-reduction scratch, declared as workgroup attributions.
    shared: Vec<(String, String)>,
    /// Thread and block index (`i64`).
    pub tid: String,
    pub bid: String,
}

impl Kern {
    /// Start kernel `name` with `params` (names without `%`), launched with `block` threads and
    /// `items_per_block` work items a block.
    pub fn new(name: &str, params: &[(&str, P)], block: usize, items_per_block: usize) -> Kern {
        let mut fx = Fx::gpu(3);
        let t = fx.op("gpu.thread_id x");
        let tid = fx.op(format!("arith.index_cast {t} : index to i64"));
        let b = fx.op("gpu.block_id x");
        let bid = fx.op(format!("arith.index_cast {b} : index to i64"));
        Kern {
            fx,
            name: name.to_string(),
            params: params.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
            launch: CudaKernel {
                entry: name.to_string(),
                block: block as u32,
                items_per_block: items_per_block as u32,
                shared_bytes: 0,
            },
            shared: vec![],
            tid,
            bid,
        }
    }

    pub fn block(&self) -> usize {
        self.launch.block as usize
    }

    /// `%name` of a parameter.
    pub fn param(&self, name: &str) -> String {
        debug_assert!(self.params.iter().any(|(n, _)| n == name), "{name}");
        format!("%{name}")
    }

    /// Pointer parameter `name` as an `!llvm.ptr`.
    pub fn ptr(&mut self, name: &str) -> String {
        let p = self.param(name);
        self.fx.op(format!("llvm.inttoptr {p} : i64 to !llvm.ptr"))
    }

    /// The `memref` of the block's `f32` reduction slots (declared on first use).
    pub fn shared_f32(&mut self) -> &'static str {
        if !self.shared.iter().any(|(n, _)| n == "%red") {
            self.shared.push(("%red".into(), SHARED_F32.into()));
        }
        "%red"
    }

    /// A workgroup buffer of `len` `f32`s named `name`: its name and type.
    pub fn shared_buf(&mut self, name: &str, len: usize) -> (String, String) {
        let ty = format!("memref<{len}xf32, #gpu.address_space<workgroup>>");
        if !self.shared.iter().any(|(n, _)| n == name) {
            self.shared.push((name.to_string(), ty.clone()));
        }
        (name.to_string(), ty)
    }

    /// A workgroup buffer of `len` elements of `elem` (`f32`, `i64`, …) named `name`: its name
    /// and type.
    pub fn shared_typed(&mut self, name: &str, len: usize, elem: &str) -> (String, String) {
        let ty = format!("memref<{len}x{elem}, #gpu.address_space<workgroup>>");
        if !self.shared.iter().any(|(n, _)| n == name) {
            self.shared.push((name.to_string(), ty.clone()));
        }
        (name.to_string(), ty)
    }

    pub fn shared_f64(&mut self) -> &'static str {
        if !self.shared.iter().any(|(n, _)| n == "%red64") {
            self.shared.push(("%red64".into(), SHARED_F64.into()));
        }
        "%red64"
    }

    /// The finished `gpu.func` text and its launch configuration.
    pub fn finish(mut self) -> (String, CudaKernel) {
        self.fx.line("gpu.return");
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(n, p)| format!("%{n}: {}", p.ty()))
            .collect();
        let shared = if self.shared.is_empty() {
            String::new()
        } else {
            let s: Vec<String> = self
                .shared
                .iter()
                .map(|(n, t)| format!("{n} : {t}"))
                .collect();
            format!(" workgroup({})", s.join(", "))
        };
        let text = format!(
            "    gpu.func {}({}){shared} kernel attributes {{known_block_size = array<i32: {}, 1, 1>}} {{\n{}    }}\n",
            super::super::text::sym(&self.name),
            params.join(", "),
            self.launch.block,
            self.fx.finish()
        );
        (text, self.launch)
    }
}

// ---- i64 arithmetic ----

pub fn c64(fx: &mut Fx, v: i64) -> String {
    fx.op(format!("arith.constant {v} : i64"))
}

pub fn ibin(fx: &mut Fx, op: &str, a: &str, b: &str) -> String {
    fx.op(format!("arith.{op} {a}, {b} : i64"))
}

pub fn add(fx: &mut Fx, a: &str, b: &str) -> String {
    ibin(fx, "addi", a, b)
}

pub fn mul(fx: &mut Fx, a: &str, b: &str) -> String {
    ibin(fx, "muli", a, b)
}

/// `a + k` (`a` itself for 0).
pub fn add_k(fx: &mut Fx, a: &str, k: usize) -> String {
    if k == 0 {
        return a.to_string();
    }
    let k = c64(fx, k as i64);
    add(fx, a, &k)
}

/// `a · k` (`a` itself for 1).
pub fn mul_k(fx: &mut Fx, a: &str, k: usize) -> String {
    if k == 1 {
        return a.to_string();
    }
    let k = c64(fx, k as i64);
    mul(fx, a, &k)
}

/// `a / k` and `a % k` for non-negative `a`.
pub fn divrem_k(fx: &mut Fx, a: &str, k: usize) -> (String, String) {
    if k == 1 {
        return (a.to_string(), c64(fx, 0));
    }
    let k = c64(fx, k as i64);
    (ibin(fx, "divui", a, &k), ibin(fx, "remui", a, &k))
}

pub fn cmp(fx: &mut Fx, pred: &str, a: &str, b: &str) -> String {
    fx.op(format!("arith.cmpi {pred}, {a}, {b} : i64"))
}

pub fn i64_to_f64(fx: &mut Fx, a: &str) -> String {
    fx.op(format!("arith.sitofp {a} : i64 to f64"))
}

// ---- memory ----

fn gep(fx: &mut Fx, p: &str, at: &str, elem: &str) -> String {
    fx.op(format!(
        "llvm.getelementptr {p}[{at}] : (!llvm.ptr, i64) -> !llvm.ptr, {elem}"
    ))
}

/// `p[at]` of `elem` (`f32`, `i32`).
pub fn load(fx: &mut Fx, p: &str, at: &str, elem: &str) -> String {
    let g = gep(fx, p, at, elem);
    fx.op(format!("llvm.load {g} : !llvm.ptr -> {elem}"))
}

pub fn store(fx: &mut Fx, v: &str, p: &str, at: &str, elem: &str) {
    let g = gep(fx, p, at, elem);
    fx.line(format!("llvm.store {v}, {g} : {elem}, !llvm.ptr"));
}

pub fn ld(fx: &mut Fx, p: &str, at: &str) -> String {
    load(fx, p, at, "f32")
}

pub fn st(fx: &mut Fx, v: &str, p: &str, at: &str) {
    store(fx, v, p, at, "f32")
}

// ---- control flow ----

/// `scf.if cond { body }` (no results).
pub fn when(fx: &mut Fx, cond: &str, body: impl FnOnce(&mut Fx)) {
    fx.open(format!("scf.if {cond} {{"));
    body(fx);
    fx.close("}");
}

/// `scf.if cond -> ty { then } else { other }`.
pub fn if_else(
    fx: &mut Fx,
    cond: &str,
    ty: &str,
    then: impl FnOnce(&mut Fx) -> String,
    other: impl FnOnce(&mut Fx) -> String,
) -> String {
    let r = fx.fresh();
    fx.open(format!("{r} = scf.if {cond} -> ({ty}) {{"));
    let a = then(fx);
    fx.line(format!("scf.yield {a} : {ty}"));
    fx.between("} else {");
    let b = other(fx);
    fx.line(format!("scf.yield {b} : {ty}"));
    fx.close("}");
    r
}

/// `scf.for i = lo to hi step step : i64` around `body(fx, i)`.
pub fn for_range(fx: &mut Fx, lo: &str, hi: &str, step: &str, body: impl FnOnce(&mut Fx, &str)) {
    let i = fx.fresh();
    fx.open(format!("scf.for {i} = {lo} to {hi} step {step} : i64 {{"));
    body(fx, &i);
    fx.close("}");
}

/// As [`for_range`], carrying `init` (all of type `ty`) through `body`; returns the results.
pub fn for_carry(
    fx: &mut Fx,
    lo: &str,
    hi: &str,
    step: &str,
    init: &[String],
    ty: &[&str],
    body: impl FnOnce(&mut Fx, &str, &[String]) -> Vec<String>,
) -> Vec<String> {
    let res = fx.fresh();
    let i = fx.fresh();
    let args: Vec<String> = init.iter().map(|_| fx.fresh()).collect();
    let inits: Vec<String> = args
        .iter()
        .zip(init)
        .map(|(a, v)| format!("{a} = {v}"))
        .collect();
    let tys = ty.join(", ");
    fx.open(format!(
        "{res}:{} = scf.for {i} = {lo} to {hi} step {step} iter_args({}) -> ({tys}) : i64 {{",
        init.len(),
        inits.join(", ")
    ));
    let next = body(fx, &i, &args);
    fx.line(format!("scf.yield {} : {tys}", next.join(", ")));
    fx.close("}");
    (0..init.len()).map(|k| format!("{res}#{k}")).collect()
}

/// `for e = start; e < n; e += stride` (a thread's share of `n` elements).
pub fn strided(fx: &mut Fx, start: &str, n: &str, stride: usize, body: impl FnOnce(&mut Fx, &str)) {
    let s = c64(fx, stride as i64);
    for_range(fx, start, n, &s, body)
}

/// As [`strided`], summing `body`'s value per element into an `f32` (or `f64`) accumulator.
pub fn strided_sum(
    fx: &mut Fx,
    start: &str,
    n: &str,
    stride: usize,
    ty: &str,
    body: impl FnOnce(&mut Fx, &str, &str) -> String,
) -> String {
    let s = c64(fx, stride as i64);
    let zero = fx.op(format!("arith.constant 0.0 : {ty}"));
    for_carry(fx, start, n, &s, &[zero], &[ty], |fx, e, acc| {
        vec![body(fx, e, &acc[0])]
    })
    .remove(0)
}

// ---- reductions ----

/// The sum over the 32 lanes of a warp, in every lane (butterfly: every lane adds in the same
/// order, so all lanes hold the same bits).
pub fn warp_sum(fx: &mut Fx, v: &str, ty: &str) -> String {
    let width = fx.op("arith.constant 32 : i32");
    let mut v = v.to_string();
    for off in [16, 8, 4, 2, 1] {
        let o = fx.op(format!("arith.constant {off} : i32"));
        let r = fx.fresh();
        fx.line(format!("{r}:2 = gpu.shuffle xor {v}, {o}, {width} : {ty}"));
        v = fx.op(format!("arith.addf {v}, {r}#0 : {ty}"));
    }
    v
}

/// The sum of `v` over the whole block, in every thread: warp sums, one slot per warp in shared
/// memory, then every thread adds the slots in order. Every thread of the block must call it
/// (it has barriers); the second barrier lets the slots be reused by the next reduction.
pub fn block_sum(k: &mut Kern, v: &str, ty: &str) -> String {
    let warps = k.block() / WARP;
    let w = warp_sum(&mut k.fx, v, ty);
    if warps <= 1 {
        return w;
    }
    let red = if ty == "f64" {
        k.shared_f64()
    } else {
        k.shared_f32()
    };
    let mty = if ty == "f64" { SHARED_F64 } else { SHARED_F32 };
    let tid = k.tid.clone();
    let fx = &mut k.fx;
    let (warp, lane) = divrem_k(fx, &tid, WARP);
    let zero = c64(fx, 0);
    let first = cmp(fx, "eq", &lane, &zero);
    let wi = fx.op(format!("arith.index_cast {warp} : i64 to index"));
    when(fx, &first, |fx| {
        fx.line(format!("memref.store {w}, {red}[{wi}] : {mty}"))
    });
    fx.line("gpu.barrier");
    let mut total = String::new();
    for i in 0..warps {
        let at = fx.idx(i);
        let x = fx.op(format!("memref.load {red}[{at}] : {mty}"));
        total = if i == 0 {
            x
        } else {
            fx.op(format!("arith.addf {total}, {x} : {ty}"))
        };
    }
    fx.line("gpu.barrier");
    total
}

/// Threads for a row of `n` elements handled by one block: a multiple of the warp size, at
/// most 256.
pub fn row_block(n: usize) -> usize {
    n.div_ceil(WARP).clamp(1, 8) * WARP
}
