//! The f32 GEMM of the MLIR backend: `C[m, n] = A[m, k] · B[k, n]` as one hand-built vector
//! loop nest, compiled with the kernels into the artifact's object, which the runtime calls for
//! every product of more than a few rows (prefill) in place of its own (`artifact::HostGemm`).
//!
//! The shape is the classic packed-panel GEMM:
//! - rows in blocks of [`MC`] so a block of `A` stays in L2 while every panel passes over it;
//! - columns in panels of [`NR`]: each panel of `B` is first packed into the caller's scratch
//!   as `[k][NR]` (one 128-byte row per depth step), transposing it on the way for the
//!   `Linear` layout (16×16 blocks through `vector.transpose`, lowered to AVX-512 shuffles);
//! - an [`MR`]×[`NR`] register tile (16 zmm accumulators, one `vbroadcastss` of `A` and two
//!   FMAs per row and depth step), then 4- and 1-row tiles for the rows left over.
//!
//! Columns past `n` are computed from a clamped (repeated) row of `B` and never stored: every
//! store of `C` is masked by the panel's width, so no shape needs padding.
//!
//! The ABI (`void sym(const float *a, const float *b, float *c, float *scratch, int64_t m,
//! int64_t k, int64_t n, int64_t lda, int64_t ldb, int64_t ldc)`) is documented for the
//! runtime on `artifact::HostGemm`.

use std::fmt::Write;

/// `B` given as `w[n, k]` (the `Linear` layout: element `(kk, j)` at `b[j·ldb + kk]`).
pub const GEMM_NK: &str = "loopc_gemm_f32_nk";
/// `B` given as `w[k, n]` (the `Conv1D` layout: element `(kk, j)` at `b[kk·ldb + j]`).
pub const GEMM_KN: &str = "loopc_gemm_f32_kn";

/// Rows of the main register tile.
pub const MR: usize = 8;
/// Columns of a packed panel: two 16-lane vectors.
pub const NR: usize = 32;
/// Rows of `A` per L2 block.
pub const MC: usize = 256;

const VF: &str = "vector<16xf32>";
const VM: &str = "vector<16xi1>";
const NV: usize = NR / 16;

/// The manifest's entry for an object built with these GEMMs (`amx`: with [`amx_func`]).
pub fn host_gemm(amx: bool) -> loopc_runtime::artifact::HostGemm {
    loopc_runtime::artifact::HostGemm {
        nk: GEMM_NK.into(),
        kn: GEMM_KN.into(),
        panel: NR,
        bf16_amx: amx.then(|| GEMM_BF16_AMX.into()),
    }
}

/// Both GEMM functions (they call `@__loopc_view`, which the kernel module defines).
pub fn gemm_funcs() -> String {
    let mut s = String::new();
    s.push_str(&gemm_func(GEMM_NK, true));
    s.push_str(&gemm_func(GEMM_KN, false));
    s
}

/// Lines of one function; `%cN` index constants are collected and declared at the top.
struct G {
    body: String,
    consts: std::collections::BTreeSet<usize>,
}

impl G {
    fn l(&mut self, depth: usize, line: impl AsRef<str>) {
        for _ in 0..depth {
            self.body.push_str("  ");
        }
        self.body.push_str(line.as_ref());
        self.body.push('\n');
    }

    /// The index constant `c`, declared once in the entry block.
    fn c(&mut self, c: usize) -> String {
        self.consts.insert(c);
        format!("%c{c}")
    }
}

fn gemm_func(name: &str, transposed: bool) -> String {
    let mut g = G {
        body: String::new(),
        consts: Default::default(),
    };
    let (c0, c1, c16, cnr, cmr, cmc) = (g.c(0), g.c(1), g.c(16), g.c(NR), g.c(MR), g.c(MC));
    g.l(2, format!("%zv = arith.constant dense<0.0> : {VF}"));
    g.l(2, format!("%nm1 = arith.subi %n, {c1} : index"));
    g.l(2, format!("scf.for %ib = {c0} to %m step {cmc} {{"));
    g.l(3, format!("%ibe0 = arith.addi %ib, {cmc} : index"));
    g.l(3, "%ibe = arith.minui %ibe0, %m : index");
    g.l(3, format!("scf.for %jp = {c0} to %n step {cnr} {{"));
    if transposed {
        pack_transposed(&mut g, c0.clone(), c16.clone());
    } else {
        pack_plain(&mut g, c0.clone(), c1.clone());
    }
    g.l(4, "%nleft = arith.subi %n, %jp : index");
    for h in 0..NV {
        let ch = g.c(16 * h);
        g.l(4, format!("%nl{h} = arith.subi %nleft, {ch} : index"));
        g.l(4, format!("%nmask{h} = vector.create_mask %nl{h} : {VM}"));
    }
    // Rows ib..ibe: MR-row tiles, then one 4-row tile, then single rows.
    g.l(4, "%blen = arith.subi %ibe, %ib : index");
    g.l(4, format!("%r8 = arith.remui %blen, {cmr} : index"));
    g.l(4, "%e8 = arith.subi %ibe, %r8 : index");
    let c4 = g.c(4);
    g.l(4, format!("%r4 = arith.remui %r8, {c4} : index"));
    g.l(4, "%e4 = arith.subi %ibe, %r4 : index");
    tile(&mut g, MR, "%ib", "%e8", &cmr, "t");
    tile(&mut g, 4, "%e8", "%e4", &c4, "q");
    tile(&mut g, 1, "%e4", "%ibe", &c1, "s");
    g.l(3, "}");
    g.l(2, "}");
    g.l(2, "return");

    let mut s = String::new();
    let _ = writeln!(
        s,
        "  func.func @{name}(%pa: !llvm.ptr, %pb: !llvm.ptr, %pc: !llvm.ptr, %ps: !llvm.ptr, \
         %m64: i64, %k64: i64, %n64: i64, %lda64: i64, %ldb64: i64, %ldc64: i64) {{"
    );
    for (v, p) in [("A", "pa"), ("B", "pb"), ("C", "pc"), ("S", "ps")] {
        let _ = writeln!(
            s,
            "    %{v} = func.call @__loopc_view(%{p}) : (!llvm.ptr) -> memref<?xf32>"
        );
    }
    for v in ["m", "k", "n", "lda", "ldb", "ldc"] {
        let _ = writeln!(s, "    %{v} = arith.index_cast %{v}64 : i64 to index");
    }
    for c in &g.consts {
        let _ = writeln!(s, "    %c{c} = arith.constant {c} : index");
    }
    s.push_str(&g.body);
    s.push_str("  }\n");
    s
}

/// `S[kk·NR + jj] = b[(jp + jj)·ldb + kk]`: 16×16 blocks loaded row by row (masked past `k`),
/// transposed in registers, stored as 16 panel rows. Rows past `n` repeat row `n − 1`.
fn pack_transposed(g: &mut G, c0: String, c16: String) {
    g.l(4, format!("scf.for %kk0 = {c0} to %k step {c16} {{"));
    g.l(5, "%kleft = arith.subi %k, %kk0 : index");
    g.l(5, format!("%kmask = vector.create_mask %kleft : {VM}"));
    for h in 0..NV {
        g.l(
            5,
            format!("%t{h}_0 = arith.constant dense<0.0> : vector<16x16xf32>"),
        );
        for r in 0..16 {
            let cr = g.c(16 * h + r);
            g.l(5, format!("%jr{h}_{r} = arith.addi %jp, {cr} : index"));
            g.l(
                5,
                format!("%jc{h}_{r} = arith.minui %jr{h}_{r}, %nm1 : index"),
            );
            g.l(
                5,
                format!("%bo{h}_{r}a = arith.muli %jc{h}_{r}, %ldb : index"),
            );
            g.l(
                5,
                format!("%bo{h}_{r} = arith.addi %bo{h}_{r}a, %kk0 : index"),
            );
            g.l(
                5,
                format!(
                    "%bv{h}_{r} = vector.maskedload %B[%bo{h}_{r}], %kmask, %zv : \
                     memref<?xf32>, {VM}, {VF} into {VF}"
                ),
            );
            g.l(
                5,
                format!(
                    "%t{h}_{} = vector.insert %bv{h}_{r}, %t{h}_{r} [{r}] : {VF} into \
                     vector<16x16xf32>",
                    r + 1
                ),
            );
        }
        g.l(
            5,
            format!(
                "%tt{h} = vector.transpose %t{h}_16, [1, 0] : vector<16x16xf32> to \
                 vector<16x16xf32>"
            ),
        );
        for c in 0..16 {
            let (cc, cnr, ch) = (g.c(c), g.c(NR), g.c(16 * h));
            g.l(
                5,
                format!("%row{h}_{c} = vector.extract %tt{h}[{c}] : {VF} from vector<16x16xf32>"),
            );
            g.l(5, format!("%so{h}_{c}a = arith.addi %kk0, {cc} : index"));
            g.l(
                5,
                format!("%so{h}_{c}b = arith.muli %so{h}_{c}a, {cnr} : index"),
            );
            g.l(
                5,
                format!("%so{h}_{c} = arith.addi %so{h}_{c}b, {ch} : index"),
            );
            g.l(
                5,
                format!("vector.store %row{h}_{c}, %S[%so{h}_{c}] : memref<?xf32>, {VF}"),
            );
        }
    }
    g.l(4, "}");
}

/// `S[kk·NR + jj] = b[kk·ldb + jp + jj]`: each depth step is two masked row loads.
fn pack_plain(g: &mut G, c0: String, c1: String) {
    let cnr = g.c(NR);
    g.l(4, "%pleft = arith.subi %n, %jp : index");
    for h in 0..NV {
        let ch = g.c(16 * h);
        g.l(4, format!("%pl{h} = arith.subi %pleft, {ch} : index"));
        g.l(4, format!("%pmask{h} = vector.create_mask %pl{h} : {VM}"));
    }
    g.l(4, format!("scf.for %kk = {c0} to %k step {c1} {{"));
    g.l(5, "%bo = arith.muli %kk, %ldb : index");
    g.l(5, "%bo1 = arith.addi %bo, %jp : index");
    g.l(5, format!("%so = arith.muli %kk, {cnr} : index"));
    for h in 0..NV {
        let ch = g.c(16 * h);
        g.l(5, format!("%bo2_{h} = arith.addi %bo1, {ch} : index"));
        g.l(5, format!("%so2_{h} = arith.addi %so, {ch} : index"));
        g.l(
            5,
            format!(
                "%bv{h} = vector.maskedload %B[%bo2_{h}], %pmask{h}, %zv : memref<?xf32>, \
                 {VM}, {VF} into {VF}"
            ),
        );
        g.l(
            5,
            format!("vector.store %bv{h}, %S[%so2_{h}] : memref<?xf32>, {VF}"),
        );
    }
    g.l(4, "}");
}

/// Rows `lo..hi` in tiles of `rows` (the caller makes `hi − lo` a multiple of it): the whole
/// depth accumulated in registers, then masked stores of the panel's columns.
fn tile(g: &mut G, rows: usize, lo: &str, hi: &str, step: &str, t: &str) {
    let (c0, c1, cnr) = (g.c(0), g.c(1), g.c(NR));
    let accs: Vec<(usize, usize)> = (0..rows)
        .flat_map(|r| (0..NV).map(move |h| (r, h)))
        .collect();
    let tys = vec![VF; accs.len()].join(", ");
    g.l(4, format!("scf.for %i{t} = {lo} to {hi} step {step} {{"));
    let res: Vec<String> = accs
        .iter()
        .map(|(r, h)| format!("%res{t}_{r}_{h}"))
        .collect();
    let iters: Vec<String> = accs
        .iter()
        .map(|(r, h)| format!("%acc{t}_{r}_{h} = %zv"))
        .collect();
    g.l(
        5,
        format!(
            "{} = scf.for %kk{t} = {c0} to %k step {c1} iter_args({}) -> ({tys}) {{",
            res.join(", "),
            iters.join(", ")
        ),
    );
    g.l(6, format!("%sb{t} = arith.muli %kk{t}, {cnr} : index"));
    for h in 0..NV {
        let ch = g.c(16 * h);
        g.l(6, format!("%sbo{t}{h} = arith.addi %sb{t}, {ch} : index"));
        g.l(
            6,
            format!("%b{t}{h} = vector.load %S[%sbo{t}{h}] : memref<?xf32>, {VF}"),
        );
    }
    let mut next = Vec::new();
    for r in 0..rows {
        let cr = g.c(r);
        g.l(6, format!("%ar{t}{r} = arith.addi %i{t}, {cr} : index"));
        g.l(
            6,
            format!("%ao{t}{r}a = arith.muli %ar{t}{r}, %lda : index"),
        );
        g.l(
            6,
            format!("%ao{t}{r} = arith.addi %ao{t}{r}a, %kk{t} : index"),
        );
        g.l(
            6,
            format!("%as{t}{r} = memref.load %A[%ao{t}{r}] : memref<?xf32>"),
        );
        g.l(
            6,
            format!("%av{t}{r} = vector.broadcast %as{t}{r} : f32 to {VF}"),
        );
        for h in 0..NV {
            g.l(
                6,
                format!("%nx{t}_{r}_{h} = vector.fma %av{t}{r}, %b{t}{h}, %acc{t}_{r}_{h} : {VF}"),
            );
            next.push(format!("%nx{t}_{r}_{h}"));
        }
    }
    g.l(6, format!("scf.yield {} : {tys}", next.join(", ")));
    g.l(5, "}");
    for r in 0..rows {
        let cr = g.c(r);
        g.l(5, format!("%cr{t}{r} = arith.addi %i{t}, {cr} : index"));
        g.l(
            5,
            format!("%co{t}{r}a = arith.muli %cr{t}{r}, %ldc : index"),
        );
        g.l(
            5,
            format!("%co{t}{r}b = arith.addi %co{t}{r}a, %jp : index"),
        );
        for h in 0..NV {
            let ch = g.c(16 * h);
            g.l(
                5,
                format!("%co{t}{r}_{h} = arith.addi %co{t}{r}b, {ch} : index"),
            );
            g.l(
                5,
                format!(
                    "vector.maskedstore %C[%co{t}{r}_{h}], %nmask{h}, %res{t}_{r}_{h} : \
                     memref<?xf32>, {VM}, {VF}"
                ),
            );
        }
    }
    g.l(4, "}");
}

/// The bf16 GEMM on AMX tiles (`tdpbf16ps` through MLIR's `amx` dialect), over the runtime's
/// bf16 layouts: `a` is the activations rounded to bf16 (`kp` per row, rows padded to 32),
/// `b` the packed weight (16-feature blocks of `[kp/2][16]` bf16 pairs, `bf16::Packed`).
pub const GEMM_BF16_AMX: &str = "loopc_gemm_bf16_amx";

/// Depth steps (32 each) per trip of the AMX loop: the four accumulator tiles stay in tile
/// registers across them and go through the scratch between trips (MLIR cannot carry tiles
/// in a loop's arguments).
const AMX_UNROLL: usize = 8;

const TA: &str = "!amx.tile<16x32xbf16>";
const TC: &str = "!amx.tile<16x16xf32>";
const MA: &str = "memref<?x?xbf16, strided<[?, 1]>>";
const MB: &str = "memref<?x32xbf16, strided<[32, 1]>>";
const MS: &str = "memref<32x32xf32, strided<[32, 1]>>";

/// `void f(const uint16_t *a, const uint32_t *b, float *c, float *scratch, int64_t m,
/// int64_t kp, int64_t n, int64_t ldc, int64_t p0, int64_t p1, int64_t group)`: output
/// columns `32·p0 .. min(32·p1, n)` of rows `0..m`, in groups of `group` column pairs (so a
/// group of `b` stays in L2 while every 32-row block of `a` passes), each 32×32 block
/// accumulated in four tiles and copied to `c` with masked stores. `scratch` holds 32×32 f32.
pub fn amx_func() -> String {
    let mut g = G {
        body: String::new(),
        consts: Default::default(),
    };
    let (c0, c1, c2, c16, c32, cu) = (g.c(0), g.c(1), g.c(2), g.c(16), g.c(32), g.c(AMX_UNROLL));
    g.l(2, "%big = arith.constant 4611686018427387903 : index");
    g.l(
        2,
        "%A1 = func.call @__loopc_view_bf16(%pa) : (!llvm.ptr) -> memref<?xbf16>",
    );
    g.l(2, format!("%A = memref.reinterpret_cast %A1 to offset: [0], sizes: [%big, %kp], strides: [%kp, 1] : memref<?xbf16> to {MA}"));
    g.l(
        2,
        "%B1 = func.call @__loopc_view_bf16(%pb) : (!llvm.ptr) -> memref<?xbf16>",
    );
    g.l(2, format!("%B = memref.reinterpret_cast %B1 to offset: [0], sizes: [%big, 32], strides: [32, 1] : memref<?xbf16> to {MB}"));
    g.l(
        2,
        "%S1 = func.call @__loopc_view(%ps) : (!llvm.ptr) -> memref<?xf32>",
    );
    g.l(2, format!("%S = memref.reinterpret_cast %S1 to offset: [0], sizes: [32, 32], strides: [32, 1] : memref<?xf32> to {MS}"));
    g.l(
        2,
        "%C = func.call @__loopc_view(%pc) : (!llvm.ptr) -> memref<?xf32>",
    );
    g.l(2, format!("%half = arith.divui %kp, {c2} : index"));
    g.l(2, format!("%steps = arith.divui %kp, {c32} : index"));
    g.l(2, format!("%srem = arith.remui %steps, {cu} : index"));
    g.l(2, "%smain = arith.subi %steps, %srem : index");
    g.l(2, "scf.for %g0 = %p0 to %p1 step %grp {");
    g.l(3, "%g1a = arith.addi %g0, %grp : index");
    g.l(3, "%g1 = arith.minui %g1a, %p1 : index");
    g.l(3, format!("scf.for %t0 = {c0} to %m step {c32} {{"));
    g.l(4, format!("%t16 = arith.addi %t0, {c16} : index"));
    g.l(4, format!("scf.for %bp = %g0 to %g1 step {c1} {{"));
    g.l(5, format!("%bb0 = arith.muli %bp, {c2} : index"));
    g.l(5, format!("%bb1 = arith.addi %bb0, {c1} : index"));
    g.l(5, "%rb0 = arith.muli %bb0, %half : index");
    g.l(5, "%rb1 = arith.muli %bb1, %half : index");
    g.l(5, format!("%z = amx.tile_zero : {TC}"));
    let quads = [
        ("00", &c0, &c0),
        ("01", &c0, &c16),
        ("10", &c16, &c0),
        ("11", &c16, &c16),
    ];
    for (_, r, c) in quads {
        g.l(5, format!("amx.tile_store %S[{r}, {c}], %z : {MS}, {TC}"));
    }
    amx_steps(&mut g, "%smain", &cu, AMX_UNROLL, "u", &quads);
    amx_steps(&mut g, "%steps", &c1, 1, "r", &quads);
    // The block's valid rows and columns into c.
    g.l(5, format!("%j0 = arith.muli %bp, {c32} : index"));
    g.l(5, "%jl0 = arith.subi %n, %j0 : index");
    g.l(5, format!("%jl1 = arith.subi %jl0, {c16} : index"));
    g.l(5, format!("%mk0 = vector.create_mask %jl0 : {VM}"));
    g.l(5, format!("%mk1 = vector.create_mask %jl1 : {VM}"));
    g.l(5, "%tl0 = arith.subi %m, %t0 : index");
    g.l(5, format!("%tl = arith.minui %tl0, {c32} : index"));
    g.l(5, format!("scf.for %r = {c0} to %tl step {c1} {{"));
    g.l(6, "%cr = arith.addi %t0, %r : index");
    g.l(6, "%co = arith.muli %cr, %ldc : index");
    g.l(6, "%co0 = arith.addi %co, %j0 : index");
    g.l(6, format!("%co1 = arith.addi %co0, {c16} : index"));
    for (h, c) in [(0, &c0), (1, &c16)] {
        g.l(6, format!("%v{h} = vector.load %S[%r, {c}] : {MS}, {VF}"));
        g.l(
            6,
            format!("vector.maskedstore %C[%co{h}], %mk{h}, %v{h} : memref<?xf32>, {VM}, {VF}"),
        );
    }
    g.l(5, "}");
    g.l(4, "}");
    g.l(3, "}");
    g.l(2, "}");
    g.l(2, "return");

    let mut s = String::new();
    let _ = writeln!(
        s,
        "  func.func @{GEMM_BF16_AMX}(%pa: !llvm.ptr, %pb: !llvm.ptr, %pc: !llvm.ptr, \
         %ps: !llvm.ptr, %m64: i64, %kp64: i64, %n64: i64, %ldc64: i64, %p064: i64, \
         %p164: i64, %grp64: i64) {{"
    );
    for v in ["m", "kp", "n", "ldc", "p0", "p1", "grp"] {
        let _ = writeln!(s, "    %{v} = arith.index_cast %{v}64 : i64 to index");
    }
    for c in &g.consts {
        let _ = writeln!(s, "    %c{c} = arith.constant {c} : index");
    }
    s.push_str(&g.body);
    s.push_str("  }\n");
    s.push_str(&view_bf16_helper());
    s
}

/// Steps `lo..hi` (`lo` is `%smain` for the remainder trip, 0 otherwise) in trips of `u`:
/// accumulators loaded from the scratch, `u` steps of 3 tile loads and 4 `tdpbf16ps` each
/// (plus the second row block's load), stored back.
fn amx_steps(
    g: &mut G,
    hi: &str,
    step: &str,
    u: usize,
    t: &str,
    quads: &[(&str, &String, &String); 4],
) {
    let lo = if t == "r" {
        "%smain".to_string()
    } else {
        g.c(0)
    };
    let (c16, c32, c0) = (g.c(16), g.c(32), g.c(0));
    g.l(5, format!("scf.for %s{t} = {lo} to {hi} step {step} {{"));
    for (q, r, c) in quads {
        g.l(
            6,
            format!("%acc{t}{q}_0 = amx.tile_load %S[{r}, {c}] : {MS} into {TC}"),
        );
    }
    for i in 0..u {
        let ci = g.c(i);
        g.l(6, format!("%st{t}{i} = arith.addi %s{t}, {ci} : index"));
        g.l(
            6,
            format!("%col{t}{i} = arith.muli %st{t}{i}, {c32} : index"),
        );
        g.l(
            6,
            format!("%brow{t}{i} = arith.muli %st{t}{i}, {c16} : index"),
        );
        g.l(
            6,
            format!("%br0{t}{i} = arith.addi %rb0, %brow{t}{i} : index"),
        );
        g.l(
            6,
            format!("%br1{t}{i} = arith.addi %rb1, %brow{t}{i} : index"),
        );
        g.l(
            6,
            format!("%a0{t}{i} = amx.tile_load %A[%t0, %col{t}{i}] : {MA} into {TA}"),
        );
        g.l(
            6,
            format!("%b0{t}{i} = amx.tile_load %B[%br0{t}{i}, {c0}] : {MB} into {TA}"),
        );
        g.l(
            6,
            format!("%b1{t}{i} = amx.tile_load %B[%br1{t}{i}, {c0}] : {MB} into {TA}"),
        );
        let n = i + 1;
        g.l(6, format!("%acc{t}00_{n} = amx.tile_mulf %a0{t}{i}, %b0{t}{i}, %acc{t}00_{i} : {TA}, {TA}, {TC}"));
        g.l(6, format!("%acc{t}01_{n} = amx.tile_mulf %a0{t}{i}, %b1{t}{i}, %acc{t}01_{i} : {TA}, {TA}, {TC}"));
        g.l(
            6,
            format!("%a1{t}{i} = amx.tile_load %A[%t16, %col{t}{i}] : {MA} into {TA}"),
        );
        g.l(6, format!("%acc{t}10_{n} = amx.tile_mulf %a1{t}{i}, %b0{t}{i}, %acc{t}10_{i} : {TA}, {TA}, {TC}"));
        g.l(6, format!("%acc{t}11_{n} = amx.tile_mulf %a1{t}{i}, %b1{t}{i}, %acc{t}11_{i} : {TA}, {TA}, {TC}"));
    }
    for (q, r, c) in quads {
        g.l(
            6,
            format!("amx.tile_store %S[{r}, {c}], %acc{t}{q}_{u} : {MS}, {TC}"),
        );
    }
    g.l(5, "}");
}

/// `@__loopc_view` for bf16 memory (the element type only changes the address arithmetic).
fn view_bf16_helper() -> String {
    super::kernels::view_helper()
        .replace("@__loopc_view(", "@__loopc_view_bf16(")
        .replace("memref<?xf32>", "memref<?xbf16>")
}
