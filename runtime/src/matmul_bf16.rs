//! `out[m, n] = x[m, k] · W[n, k]ᵀ` with `W` in bf16 ([`Packed`]) and f32 accumulation.
//!
//! `x` is rounded to bf16 (nearest even) once per call; products of two bf16 values are exact
//! in f32 and are summed in f32, and the [`Epi`] epilogue runs on the f32 result as in
//! [`crate::matmul`]. Paths, picked at run time:
//! - up to [`SMALL_M`] rows (decode): each 64-byte row of a packed block is `vdpbf16ps`-ed
//!   against every input row's broadcast bf16 pair, giving 16 outputs per accumulator without
//!   horizontal sums; the weight is streamed once per call, output blocks split over the pool;
//! - more rows with AMX: 32×32 output blocks of four `tdpbf16ps` tiles, the activations as
//!   A tiles straight from the rounded rows, the packed weight as B tiles, summed in depth
//!   chunks into an L1/L2-resident accumulator where the whole epilogue (the gated unit and
//!   the rotation included) runs before `out` is written once;
//! - more rows without AMX, on Intel or without AVX-512-BF16 ([`Path::Widen`]): each task
//!   widens its columns of the packed weight to an f32 panel and runs the f32 GEMM on the
//!   rounded rows (still exact products of bf16 values, summed in f32);
//! - more rows with AVX-512-BF16 elsewhere ([`Path::Avx512Bf16`]): the decode kernel on groups
//!   of 8 rows over L2-sized weight blocks;
//! - without AVX-512-BF16 (or off x86): a portable scalar kernel over the same layout for the
//!   decode rows.

use crate::bf16::{from_bf16, Packed};
use crate::matmul::{AmxGemmFn, Epi, HostGemm};
use crate::mem::with_buffer;
use rayon::prelude::*;
use std::cell::RefCell;

/// Up to this many rows use the streaming (decode) kernel even when AMX is present.
const SMALL_M: usize = 8;

/// Depth steps (32 each) per chunk of the AMX kernel: 32 rows × 256 bf16 of activations
/// (16 KiB) stay in L1 while the chunk runs over every weight block of a group. Chunks of 4,
/// 8, 16 and the whole depth measured within noise of each other (`bench_amx_gemm`); the
/// gain of the accumulator was in the epilogue, not in the products.
const KC_STEPS: usize = 8;

/// Weight bytes per task block of the row-group fallback and per L2 sub-block of the AMX
/// kernel (half of a 2 MiB L2).
const BLOCK_BYTES: usize = 1 << 20;

/// Rows from which [`Path::Widen`] widens when `vdpbf16ps` is present (below, its decode
/// kernel in groups of 8 rows runs): 2 threads, `bench_amx_gemm`'s four shapes, GFLOP/s
/// widened against `vdpbf16ps` on an Emerald Rapids VM without AMX: 46–65 against 70–144 at
/// 16 rows, 147–154 against 124–150 at 128, 169–184 against 111–151 at 256, 208–253 against
/// 139–151 at 512.
const WIDEN_MIN_M: usize = 256;

/// Weight bytes (as f32) per widened panel of [`Path::Widen`]: a task widens at most this much
/// before its GEMM runs over it, so a wide head does not take a panel of its whole width.
const PANEL_BYTES: usize = 8 << 20;

/// Which kernel family runs (tests force each one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The scalar kernel for every row count.
    Portable,
    /// `vdpbf16ps` for every row count.
    Avx512Bf16,
    /// Widened f32 panels and the f32 GEMM from [`WIDEN_MIN_M`] rows (from [`SMALL_M`]
    /// without `vdpbf16ps`); below, the `vdpbf16ps` kernels where present, else the scalar
    /// ones.
    Widen,
    /// The decode kernel up to [`SMALL_M`] rows, AMX tiles above.
    Amx,
}

impl Path {
    /// The fastest path this CPU and process allow: AMX where the process may use it; else
    /// widening on Intel, whose cores issue `vdpbf16ps` at a quarter of the f32 FMA rate
    /// (measured on an Emerald Rapids VM with AMX hidden: 1.28 G instr/s against 5.24 G on
    /// one core, 82 against 168 GFLOP/s), so the f32 GEMM on widened panels wins (512 rows:
    /// 208–253 against 139–151 GFLOP/s on two cores). Other vendors keep `vdpbf16ps` for
    /// many rows: a core that issues it at its FMA rate does twice the MACs with it. That is
    /// not measured here, so `LOOPC_BF16_WIDEN=1` forces widening. Without `vdpbf16ps`,
    /// widening beats the scalar kernel by far.
    pub fn best() -> Path {
        // Once per process: `cpuid` traps to the hypervisor in a VM (15–20 µs a call here), and this
        // runs on every product.
        static BEST: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
        *BEST.get_or_init(Path::detect)
    }

    fn detect() -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::amx::available() {
                return Path::Amx;
            }
            let force = std::env::var("LOOPC_BF16_WIDEN").is_ok_and(|v| v == "1");
            if std::arch::is_x86_feature_detected!("avx512bf16") && !intel() && !force {
                return Path::Avx512Bf16;
            }
        }
        Path::Widen
    }

    /// Every path this CPU can run (the first is always the portable one).
    pub fn supported() -> Vec<Path> {
        [Path::Portable, Path::Widen, Path::Avx512Bf16, Path::Amx]
            .into_iter()
            .filter(|p| p.runs_here())
            .collect()
    }

    /// Whether this CPU can run the path (no allocation: every product asserts it).
    fn runs_here(self) -> bool {
        match self {
            Path::Portable | Path::Widen => true,
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Bf16 => std::arch::is_x86_feature_detected!("avx512bf16"),
            #[cfg(target_arch = "x86_64")]
            Path::Amx => crate::amx::available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Whether a product of `m` rows widens the weight on this path.
    fn widens(self, m: usize) -> bool {
        self == Path::Widen && (m >= WIDEN_MIN_M || (m > SMALL_M && self.small() == Path::Portable))
    }

    /// The kernel of the decode rows (at most [`SMALL_M`]) on this path.
    fn small(self) -> Path {
        match self {
            Path::Portable | Path::Avx512Bf16 => self,
            Path::Widen | Path::Amx => {
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx512bf16") {
                    return Path::Avx512Bf16;
                }
                Path::Portable
            }
        }
    }
}

/// Whether this is an Intel CPU (vendor string `GenuineIntel`).
#[cfg(target_arch = "x86_64")]
fn intel() -> bool {
    let c = std::arch::x86_64::__cpuid(0);
    let v: Vec<u8> = [c.ebx, c.edx, c.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    v == b"GenuineIntel"
}

thread_local! {
    /// The calling thread's rounded copy of `x` (bf16 pairs, rows padded to `kp`).
    static XQ: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's `x` rounded to bf16 values, as f32 ([`Path::Widen`]).
    static XR: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A task's widened weight panel ([`Path::Widen`]).
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// [`matmul_bf16_epi`] with no epilogue.
pub fn matmul_bf16(x: &[f32], w: &Packed, out: &mut [f32], m: usize, threads: usize) {
    matmul_bf16_epi(x, w, out, m, threads, &Epi::default())
}

/// `out = epi(x · Wᵀ)` for `x: [m, w.k()]`, `out: [m, w.n()]` on the fastest path.
pub fn matmul_bf16_epi(
    x: &[f32],
    w: &Packed,
    out: &mut [f32],
    m: usize,
    threads: usize,
    epi: &Epi,
) {
    matmul_bf16_epi_on(None, x, w, out, m, threads, epi)
}

/// [`matmul_bf16_epi`] with the artifact's AMX GEMM (when it has one) for the many-row
/// products.
pub fn matmul_bf16_epi_on(
    host: Option<HostGemm>,
    x: &[f32],
    w: &Packed,
    out: &mut [f32],
    m: usize,
    threads: usize,
    epi: &Epi,
) {
    let amx = host.and_then(|h| h.bf16_amx);
    matmul_bf16_path_on(amx, x, w, out, m, threads, epi, Path::best())
}

/// [`matmul_bf16_epi`] on a chosen path (which must be one of [`Path::supported`]).
pub fn matmul_bf16_path(
    x: &[f32],
    w: &Packed,
    out: &mut [f32],
    m: usize,
    threads: usize,
    epi: &Epi,
    path: Path,
) {
    matmul_bf16_path_on(None, x, w, out, m, threads, epi, path)
}

/// [`matmul_bf16_path`]; on the AMX path, `host` (an artifact's AMX GEMM) computes the
/// products in place of the runtime's tile kernel.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16_path_on(
    host: Option<AmxGemmFn>,
    x: &[f32],
    w: &Packed,
    out: &mut [f32],
    m: usize,
    threads: usize,
    epi: &Epi,
    path: Path,
) {
    let n = w.n();
    // The runtime's AMX kernel finishes 32-column blocks in its accumulator, so it takes the
    // gated unit and the rotation along when they fall on whole blocks. The other kernels'
    // column blocks follow the packed 16-output layout, not the gate/up blocks or the rotary
    // heads: they get the per-element terms, and the gated unit or the rotation runs over the
    // finished rows (still in cache for decode). A row reduction waits for every column.
    let tiles = path == Path::Amx && m > SMALL_M && host.is_none();
    let fused = tiles && epi.align().is_multiple_of(32);
    let late = !fused && (epi.glu.is_some() || epi.rope.is_some());
    let first = Epi {
        glu: if late { None } else { epi.glu },
        rope: if late { None } else { epi.rope },
        norm: None,
        ..*epi
    };
    product(host, x, w, out, m, threads, &first, path);
    if late {
        let last = Epi {
            glu: epi.glu,
            rope: epi.rope,
            ..Epi::default()
        };
        last.check(m, n);
        let rows = if threads > 1 && m > 1 {
            m.div_ceil(threads * 4).max(1)
        } else {
            m
        };
        let op = out.as_mut_ptr() as usize;
        let pass = |c: usize| {
            let r0 = c * rows;
            // SAFETY: `out` holds m·n products (asserted by the product); `check` sized the
            // gated output; disjoint row blocks.
            unsafe { last.apply(op as *mut f32, n, r0, (r0 + rows).min(m), 0, n) };
        };
        if rows < m {
            crate::par::for_each(m.div_ceil(rows), pass);
        } else {
            pass(0);
        }
    }
    if let Some(nm) = &epi.norm {
        nm.finish(out, m, n, threads);
    }
}

/// The product with `epi`'s terms (no row reduction; a gated unit or rotation only where the
/// path's blocks are whole ones, as [`matmul_bf16_path_on`] arranges).
#[allow(clippy::too_many_arguments)]
fn product(
    host: Option<AmxGemmFn>,
    x: &[f32],
    w: &Packed,
    out: &mut [f32],
    m: usize,
    threads: usize,
    epi: &Epi,
    path: Path,
) {
    let (k, n) = (w.k(), w.n());
    assert!(
        x.len() >= m * k && out.len() >= m * n,
        "bf16 matmul operand sizes"
    );
    assert!(path.runs_here(), "bf16 path {path:?}");
    epi.check(m, n);
    if m == 0 || n == 0 {
        return;
    }
    if path.widens(m) {
        widened_gemm(x, w, out, m, threads, epi, PANEL_BYTES);
        return;
    }
    let path = if path == Path::Amx && m > SMALL_M {
        path
    } else {
        path.small()
    };
    let amx = path == Path::Amx && m > SMALL_M;
    // AMX reads A tiles 32 rows at a time: pad with zero rows. The runtime's tile kernel
    // reads 32-row chunks of A from L1, so its rows are padded by one line off the 4 KiB
    // stride that would put them all in a few cache sets.
    let rows = if amx { m.next_multiple_of(32) } else { m };
    let kw = w.kp() / 2;
    let xld = if amx && host.is_none() { kw + 16 } else { kw };
    with_buffer(&XQ, |xq| {
        round_rows(
            &x[..m * k],
            m,
            k,
            xld,
            rows,
            xq,
            path != Path::Portable,
            threads,
        );
        let xq: &[u32] = xq;
        if amx {
            #[cfg(target_arch = "x86_64")]
            amx_gemm(xq, xld, w, out, m, threads, epi, host);
        } else {
            dot_gemm(xq, w, out, m, threads, epi, path);
        }
    });
}

/// [`Path::Widen`] for more than [`SMALL_M`] rows: `x` rounded to bf16 values kept in f32, the
/// columns split over the pool, and each task's packed 16-column blocks widened to an f32
/// `[k, columns]` panel of at most `panel_bytes` (one block at least) that the f32 GEMM
/// multiplies, followed by `epi`'s per-element terms. Products of two bf16 values are exact
/// in f32, so this is the arithmetic of the other paths summed in another order.
fn widened_gemm(
    x: &[f32],
    w: &Packed,
    out: &mut [f32],
    m: usize,
    threads: usize,
    epi: &Epi,
    panel_bytes: usize,
) {
    let (k, n) = (w.k(), w.n());
    let nb = n.div_ceil(16);
    with_buffer(&XR, |xr| {
        round_rows_f32(&x[..m * k], m, k, xr, threads);
        let xr: &[f32] = xr;
        let op = out.as_mut_ptr() as usize;
        let per_panel = (panel_bytes / (64 * k.max(1))).max(1);
        let task = |b0: usize, b1: usize| {
            with_buffer(&PANEL, |panel| {
                let mut p0 = b0;
                while p0 < b1 {
                    let p1 = (p0 + per_panel).min(b1);
                    let cols = 16 * (p1 - p0);
                    panel.resize(k * cols, 0.0);
                    widen_blocks(w, p0, p1, panel);
                    let (j0, j1) = (16 * p0, (16 * p1).min(n));
                    // SAFETY: this task owns columns j0..j1 of `out` (row stride n, m rows);
                    // `xr` is [m, k] row-major, the panel [k, cols] (rs = cols, cs = 1) covers
                    // columns j0..j1 of Wᵀ.
                    unsafe {
                        crate::matmul::gemm_block(
                            m,
                            j1 - j0,
                            k,
                            (op as *mut f32).add(j0),
                            n as isize,
                            xr.as_ptr(),
                            k as isize,
                            panel.as_ptr(),
                            cols as isize,
                            1,
                            gemm::Parallelism::None,
                            None,
                        );
                        epi.apply(op as *mut f32, n, 0, m, j0, j1 - j0);
                    }
                    p0 = p1;
                }
            })
        };
        if threads <= 1 || nb < 2 {
            task(0, nb);
            return;
        }
        // One column block per thread, each a single-threaded GEMM: the split `matmul` takes
        // for f32 products of this size.
        let chunk = nb.div_ceil(threads);
        crate::par::for_each(nb.div_ceil(chunk), |c| {
            let b0 = c * chunk;
            task(b0, (b0 + chunk).min(nb));
        });
    })
}

/// `x[m, k]` rounded to bf16 values (nearest even), kept as f32, into `dst`.
fn round_rows_f32(x: &[f32], m: usize, k: usize, dst: &mut Vec<f32>, threads: usize) {
    dst.resize(m * k, 0.0);
    let serial = |x: &[f32], d: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512bf16") {
            // SAFETY: the feature is present; `d` and `x` have the same length.
            unsafe { x86::round_f32(x, d) };
            return;
        }
        for (o, &v) in d.iter_mut().zip(x) {
            *o = crate::bf16::round_bf16(v);
        }
    };
    if threads > 1 && m * k >= 1 << 16 {
        let per = m.div_ceil(threads * 2) * k;
        dst.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(d, x)| serial(x, d));
    } else {
        serial(x, dst);
    }
}

/// Packed blocks `b0..b1` widened to f32 in `panel` as `[k, 16·(b1 - b0)]` (row `i` holds
/// `W[j, i]` for the blocks' columns `j`).
fn widen_blocks(w: &Packed, b0: usize, b1: usize, panel: &mut [f32]) {
    let (k, kw) = (w.k(), w.kp() / 2);
    let cols = 16 * (b1 - b0);
    assert!(panel.len() >= k * cols, "widened panel size");
    let words = w.words();
    for b in b0..b1 {
        let blk = &words[b * 16 * kw..(b + 1) * 16 * kw];
        let c0 = 16 * (b - b0);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature is present; `blk` holds kw rows of 16 words and the panel
            // k rows of `cols ≥ c0 + 16` floats.
            unsafe { x86::widen_block(blk, k, panel, cols, c0) };
            continue;
        }
        for (p, row) in blk.chunks_exact(16).enumerate() {
            for (i, half) in [(2 * p, 0u32), (2 * p + 1, 16)] {
                if i < k {
                    for (l, &v) in row.iter().enumerate() {
                        panel[i * cols + c0 + l] = f32::from_bits((v >> half) << 16);
                    }
                }
            }
        }
    }
}

/// `x[m, k]` rounded into `dst` as `rows` rows of `kw` words (bf16 pairs), zero beyond `m`
/// and `k` (row blocks split over the pool when large).
#[allow(clippy::too_many_arguments)]
fn round_rows(
    x: &[f32],
    m: usize,
    k: usize,
    kw: usize,
    rows: usize,
    dst: &mut Vec<u32>,
    simd: bool,
    threads: usize,
) {
    // Every word is written below (pairs, then zeros): the buffer is reused across calls
    // without a memset of the whole of it.
    dst.resize(rows * kw, 0);
    dst[m * kw..].fill(0);
    if threads > 1 && m * k >= 1 << 16 {
        let per = m.div_ceil(threads * 2);
        dst[..m * kw]
            .par_chunks_mut(per * kw)
            .zip(x[..m * k].par_chunks(per * k))
            .for_each(|(d, x)| round_rows_serial(x, x.len() / k, k, kw, d, simd));
    } else {
        round_rows_serial(x, m, k, kw, &mut dst[..m * kw], simd);
    }
}

fn round_rows_serial(x: &[f32], m: usize, k: usize, kw: usize, dst: &mut [u32], simd: bool) {
    for r in 0..m {
        let src = &x[r * k..(r + 1) * k];
        let d = &mut dst[r * kw..(r + 1) * kw];
        #[cfg(target_arch = "x86_64")]
        if simd && std::arch::is_x86_feature_detected!("avx512bf16") {
            // SAFETY: the feature is present; `d` holds k.div_ceil(2) words or more.
            unsafe { x86::round_row(src, d) };
            d[k.div_ceil(2)..].fill(0);
            continue;
        }
        let _ = simd;
        for (p, o) in d.iter_mut().enumerate().take(k.div_ceil(2)) {
            let lo = crate::bf16::to_bf16(src[2 * p]) as u32;
            let hi = src
                .get(2 * p + 1)
                .map_or(0, |&v| crate::bf16::to_bf16(v) as u32);
            *o = lo | (hi << 16);
        }
        d[k.div_ceil(2)..].fill(0);
    }
}

/// The streaming kernel over output blocks, split over the pool; more than [`SMALL_M`] rows go
/// in groups of 8 over blocks of at most [`BLOCK_BYTES`] of weight.
fn dot_gemm(
    xq: &[u32],
    w: &Packed,
    out: &mut [f32],
    m: usize,
    threads: usize,
    epi: &Epi,
    path: Path,
) {
    let (k, n) = (w.k(), w.n());
    let nb = n.div_ceil(16);
    let block_bytes = 16 * w.kp() * 2;
    let op = out.as_mut_ptr() as usize;
    let run = |b0: usize, b1: usize| {
        let mut t0 = 0;
        while t0 < m {
            let t1 = (t0 + SMALL_M).min(m);
            // SAFETY: callers own output columns 16·b0 .. 16·b1 of rows t0..t1.
            unsafe { dot_blocks(xq, w, op as *mut f32, n, t0, t1, b0, b1, path) };
            t0 = t1;
        }
        let (j0, j1) = (16 * b0, (16 * b1).min(n));
        // SAFETY: as above.
        unsafe { epi.apply(op as *mut f32, n, 0, m, j0, j1 - j0) };
    };
    let cap = (BLOCK_BYTES / block_bytes).max(1);
    let macs = m.saturating_mul(n).saturating_mul(k);
    if threads <= 1 || nb < 2 || macs < 1 << 16 {
        let mut b0 = 0;
        while b0 < nb {
            let b1 = (b0 + cap).min(nb);
            run(b0, b1);
            b0 = b1;
        }
        return;
    }
    // A few chunks per thread so that the threads can balance; multiples of 4 blocks for the kernel.
    let chunk = nb.div_ceil(threads * 4).next_multiple_of(4).min(cap.max(4));
    crate::par::for_each(nb.div_ceil(chunk), |c| {
        let b0 = c * chunk;
        run(b0, (b0 + chunk).min(nb));
    });
}

/// Rows `t0..t1` (at most 8) × output blocks `b0..b1` of `out` (row stride `n`).
///
/// # Safety
/// `out` covers `t1 · n` floats; no other thread writes these elements.
#[allow(clippy::too_many_arguments)]
unsafe fn dot_blocks(
    xq: &[u32],
    w: &Packed,
    out: *mut f32,
    n: usize,
    t0: usize,
    t1: usize,
    b0: usize,
    b1: usize,
    path: Path,
) {
    debug_assert!(t1 - t0 <= SMALL_M && b1 <= n.div_ceil(16));
    #[cfg(target_arch = "x86_64")]
    if path != Path::Portable {
        x86::dot_blocks(xq, w, out, n, t0, t1, b0, b1);
        return;
    }
    let _ = path;
    let kw = w.kp() / 2;
    let words = w.words();
    for b in b0..b1 {
        let blk = &words[b * 16 * kw..(b + 1) * 16 * kw];
        let valid = (n - 16 * b).min(16);
        for t in t0..t1 {
            let xr = &xq[t * kw..(t + 1) * kw];
            let mut acc = [0f32; 16];
            for (p, &xv) in xr.iter().enumerate() {
                let (xl, xh) = (from_bf16(xv as u16), from_bf16((xv >> 16) as u16));
                for (l, a) in acc.iter_mut().enumerate() {
                    let wv = blk[p * 16 + l];
                    *a += from_bf16(wv as u16) * xl + from_bf16((wv >> 16) as u16) * xh;
                }
            }
            let o = std::slice::from_raw_parts_mut(out.add(t * n + 16 * b), valid);
            o.copy_from_slice(&acc[..valid]);
        }
    }
}

/// The AMX GEMM: output block pairs (32 features) split over the pool, each task walking
/// L2-sized groups of block pairs and, for each, every 32-row block of `x` in depth chunks;
/// then the epilogue over the group's accumulator. Before, the tiles were stored straight to
/// `out` (rows 4 KiB apart, so a 32-row block crowded a few L1 sets) and the gated unit and
/// the rotation were a second pass over the whole product: this took bf16 prefill-512 of the
/// d=1024 model from 654–680 to 781–808 tok/s (BENCHMARKS.md).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn amx_gemm(
    xq: &[u32],
    xld: usize,
    w: &Packed,
    out: &mut [f32],
    m: usize,
    threads: usize,
    epi: &Epi,
    host: Option<AmxGemmFn>,
) {
    let n = w.n();
    let kp = w.kp();
    let pairs = n.div_ceil(32);
    let op = out.as_mut_ptr() as usize;
    let xp = xq.as_ptr() as usize;
    let wp = w.words().as_ptr() as usize;
    let per_pair = 32 * kp * 2;
    // Tasks and groups start at whole gate/up blocks or heads (`epi.align()`, a multiple of
    // 32 columns when the caller fuses those terms here).
    let unit = (epi.align() / 32).max(1);
    let group = (BLOCK_BYTES / per_pair).max(unit) / unit * unit;
    let steps = kp / 32;
    let task = |p0: usize, p1: usize| {
        if let Some(f) = host {
            // The artifact's kernel configures (and releases) the tiles itself.
            let mut scratch = [0f32; 32 * 32];
            let mut g0 = p0;
            while g0 < p1 {
                let g1 = (g0 + group).min(p1);
                // SAFETY: AMX is available (the Amx path); xq has m.next_multiple_of(32) rows
                // of kp bf16, the packed weight 2·pairs blocks; the call writes columns
                // 32·g0 .. min(32·g1, n) of this task's rows, as `artifact::HostGemm` says.
                unsafe {
                    f(
                        xp as *const u16,
                        wp as *const u32,
                        op as *mut f32,
                        scratch.as_mut_ptr(),
                        m as i64,
                        kp as i64,
                        n as i64,
                        n as i64,
                        g0 as i64,
                        g1 as i64,
                        (g1 - g0) as i64,
                    );
                    let j0 = g0 * 32;
                    epi.apply(op as *mut f32, n, 0, m, j0, (g1 * 32).min(n) - j0);
                }
                g0 = g1;
            }
            return;
        }
        // SAFETY: `amx_gemm` only runs on the Amx path, which requires `amx::available()`.
        let _tiles = unsafe { crate::amx::Tiles::new() };
        // The group's sums for one 32-row block, rows padded off the 4 KiB alias stride.
        let ld = group * 32 + 16;
        let mut acc = vec![0f32; 32 * ld];
        let ap = acc.as_mut_ptr();
        let mut g0 = p0;
        while g0 < p1 {
            let g1 = (g0 + group).min(p1);
            let (j0, j1) = (g0 * 32, (g1 * 32).min(n));
            for t0 in (0..m).step_by(32) {
                let tr = (m - t0).min(32);
                let mut s0 = 0;
                while s0 < steps {
                    let s1 = (s0 + KC_STEPS).min(steps);
                    for bp in g0..g1 {
                        // SAFETY: xq has m.next_multiple_of(32) rows of `xld` words covering
                        // kp bf16; the packed weight has 2·pairs blocks of `steps` 1 KiB
                        // steps; `acc` has 32 rows of `ld ≥ 32·group` floats.
                        unsafe {
                            crate::amx::block_2x2(
                                (xp as *const u16).add(2 * t0 * xld + 32 * s0),
                                xld * 4,
                                (wp as *const u32).add(2 * bp * 8 * kp + 256 * s0),
                                (wp as *const u32).add((2 * bp + 1) * 8 * kp + 256 * s0),
                                s1 - s0,
                                ap.add((bp - g0) * 32),
                                ld * 4,
                                s0 > 0,
                            );
                        }
                    }
                    s0 = s1;
                }
                // `acc` holds rows t0.., columns j0..: address (r, j) as `base + r·ld + j`.
                let base = ap.wrapping_sub(t0 * ld + j0);
                // SAFETY: the block is this task's; `fused` epilogues were checked by the
                // caller for [m, n] (`j0`, `j1` are whole gate/up blocks or heads).
                unsafe { epi.apply_ld(base, ld, n, t0, t0 + tr, j0, j1 - j0) };
                if epi.glu.is_none() {
                    for r in 0..tr {
                        // SAFETY: rows t0..t0+tr, columns j0..j1 belong to this task.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                ap.add(r * ld),
                                (op as *mut f32).add((t0 + r) * n + j0),
                                j1 - j0,
                            )
                        };
                    }
                }
            }
            g0 = g1;
        }
    };
    if threads <= 1 || pairs < 2 {
        task(0, pairs);
        return;
    }
    let chunk = pairs.div_ceil(threads).next_multiple_of(unit);
    crate::par::for_each(pairs.div_ceil(chunk), |c| {
        let p0 = c * chunk;
        task(p0, (p0 + chunk).min(pairs));
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Packed;
    use std::arch::x86_64::*;

    /// Round one row to bf16 pairs with `vcvtne2ps2bf16` (nearest even, as the scalar path).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_row(src: &[f32], dst: &mut [u32]) {
        let k = src.len();
        assert!(dst.len() >= k.div_ceil(2));
        let sp = src.as_ptr();
        let dp = dst.as_mut_ptr() as *mut __m512i;
        let mut i = 0;
        while i + 32 <= k {
            let lo = _mm512_loadu_ps(sp.add(i));
            let hi = _mm512_loadu_ps(sp.add(i + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dp.add(i / 32), v);
            i += 32;
        }
        if i < k {
            let r = k - i;
            let m0 = ((1u32 << r.min(16)) - 1) as u16;
            let m1 = if r > 16 {
                ((1u32 << (r - 16)) - 1) as u16
            } else {
                0
            };
            let lo = _mm512_maskz_loadu_ps(m0, sp.add(i));
            let hi = _mm512_maskz_loadu_ps(m1, sp.add(i + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            let words = r.div_ceil(2);
            _mm512_mask_storeu_epi32(dp.add(i / 32) as *mut i32, ((1u32 << words) - 1) as u16, v);
        }
    }

    /// `d = round_bf16(x)` elementwise with `vcvtneps2bf16` (nearest even, as the scalar path).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_f32(x: &[f32], d: &mut [f32]) {
        let n = x.len().min(d.len());
        let (xp, dp) = (x.as_ptr(), d.as_mut_ptr());
        let mut i = 0;
        while i < n {
            let mask = if n - i >= 16 {
                0xffff
            } else {
                ((1u32 << (n - i)) - 1) as u16
            };
            let v = _mm512_maskz_loadu_ps(mask, xp.add(i));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            let r = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
            _mm512_mask_storeu_ps(dp.add(i), mask, _mm512_castsi512_ps(r));
            i += 16;
        }
    }

    /// One packed block (`kw` rows of 16 words: bf16 pairs of 16 features) widened into
    /// columns `c0..c0 + 16` of the `[k, cols]` f32 panel.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen_block(
        blk: &[u32],
        k: usize,
        panel: &mut [f32],
        cols: usize,
        c0: usize,
    ) {
        let (bp, pp) = (blk.as_ptr(), panel.as_mut_ptr());
        let hi_mask = _mm512_set1_epi32(0xffff_0000u32 as i32);
        for p in 0..k.div_ceil(2) {
            let v = _mm512_loadu_si512(bp.add(16 * p) as *const __m512i);
            let lo = _mm512_slli_epi32::<16>(v);
            _mm512_storeu_ps(pp.add(2 * p * cols + c0), _mm512_castsi512_ps(lo));
            if 2 * p + 1 < k {
                let hi = _mm512_and_si512(v, hi_mask);
                _mm512_storeu_ps(pp.add((2 * p + 1) * cols + c0), _mm512_castsi512_ps(hi));
            }
        }
    }

    /// See `super::dot_blocks`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn dot_blocks(
        xq: &[u32],
        w: &Packed,
        out: *mut f32,
        n: usize,
        t0: usize,
        t1: usize,
        b0: usize,
        b1: usize,
    ) {
        macro_rules! go {
            ($t:literal, $nb:literal) => {{
                let mut b = b0;
                while b + $nb <= b1 {
                    group::<$t, $nb>(xq, w, out, n, t0, b);
                    b += $nb;
                }
                while b < b1 {
                    group::<$t, 1>(xq, w, out, n, t0, b);
                    b += 1;
                }
            }};
        }
        match t1 - t0 {
            1 => go!(1, 4),
            2 => go!(2, 4),
            3 => go!(3, 4),
            4 => go!(4, 2),
            5 => go!(5, 2),
            6 => go!(6, 2),
            7 => go!(7, 2),
            8 => go!(8, 2),
            _ => unreachable!("at most 8 rows per group"),
        }
    }

    /// `T` input rows from `t0` × `NB` output blocks from `b`: `T · NB` accumulators of 16
    /// outputs, one weight load per block and one broadcast per row per input pair.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::needless_range_loop)] // `acc` is indexed by block and row together
    unsafe fn group<const T: usize, const NB: usize>(
        xq: &[u32],
        w: &Packed,
        out: *mut f32,
        n: usize,
        t0: usize,
        b: usize,
    ) {
        let kw = w.kp() / 2;
        assert!(xq.len() >= (t0 + T) * kw && w.words().len() >= (b + NB) * 16 * kw);
        let xp = xq.as_ptr().add(t0 * kw);
        let wp = w.words().as_ptr().add(b * 16 * kw);
        let mut acc = [[_mm512_setzero_ps(); T]; NB];
        // With several input rows, the next group's blocks (they follow these in memory) are
        // prefetched into L2 at this group's offsets: a block is 16·k/2 words, each its own
        // stream of pages that the hardware prefetchers pick up late. d=1024 bf16 decode at
        // batch 8 went from 78–80 to 128–129 tok/s, at batch 1 from 26.6–27.0 to 27.8–31.0.
        // For one row of a short depth it cost d=256 decode 20 % (its groups are small and
        // the next is often another task's), so not there.
        let ahead = wp.wrapping_add(NB * 16 * kw) as *const i8;
        for p in 0..kw {
            if T > 1 || kw >= 512 {
                for u in 0..NB {
                    _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add((u * 16 * kw + p * 16) * 4));
                }
            }
            let mut wv = [_mm512_setzero_si512(); NB];
            for (u, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(wp.add(u * 16 * kw + p * 16) as *const __m512i);
            }
            for t in 0..T {
                let xb = _mm512_set1_epi32(*xp.add(t * kw + p) as i32);
                for u in 0..NB {
                    acc[u][t] = _mm512_dpbf16_ps(
                        acc[u][t],
                        std::mem::transmute::<__m512i, __m512bh>(wv[u]),
                        std::mem::transmute::<__m512i, __m512bh>(xb),
                    );
                }
            }
        }
        for (u, a) in acc.iter().enumerate() {
            let j0 = (b + u) * 16;
            if j0 >= n {
                break;
            }
            let valid = (n - j0).min(16);
            let mask = ((1u32 << valid) - 1) as u16;
            for (t, v) in a.iter().enumerate() {
                _mm512_mask_storeu_ps(out.add((t0 + t) * n + j0), mask, *v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16::round_bf16;
    use crate::test_util::{lcg, naive_with, pool};

    /// f64 sums of products of the bf16-rounded operands.
    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        naive_with(x, w, m, k, n, round_bf16)
    }

    /// f32 accumulation error only: the operands are the same bf16 values on both sides.
    fn close(a: &[f32], b: &[f32], k: usize, what: &str) {
        assert_eq!(a.len(), b.len());
        let tol = 2e-6 * (k as f32).sqrt().max(1.0);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what} index {i}: {x} vs {y} (k={k})"
            );
        }
    }

    #[test]
    fn every_path_matches_the_rounded_reference() {
        let mut s = 5u64;
        let p = pool(2);
        let paths = Path::supported();
        eprintln!("bf16 paths on this CPU: {paths:?}");
        for &(m, k, n) in &[
            (1usize, 1usize, 1usize),
            (1, 7, 5),
            (1, 64, 300),
            (1, 1000, 77),
            (2, 33, 17),
            (3, 64, 64),
            (5, 100, 40),
            (8, 96, 129),
            (9, 32, 16),
            (13, 70, 33),
            (40, 64, 100),
            (64, 128, 64),
            (65, 130, 95),
            (128, 256, 128),
            (150, 96, 300),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let want = reference(&x, &w, m, k, n);
            let packed = Packed::from_f32(&w, n, k);
            for &path in &paths {
                for threads in [1, 2] {
                    let mut o = vec![f32::NAN; m * n];
                    p.install(|| {
                        matmul_bf16_path(&x, &packed, &mut o, m, threads, &Epi::default(), path)
                    });
                    close(
                        &o,
                        &want,
                        k,
                        &format!("{path:?} ({m},{k},{n}) threads {threads}"),
                    );
                }
            }
        }
    }

    /// The widened GEMM on its own, below the row count where `Path::Widen` picks it too: odd
    /// depths (the last pair half empty), partial last blocks, panels of one block and of
    /// several, with the per-element epilogue terms on each panel's columns.
    #[test]
    fn widened_panels_match_the_rounded_reference() {
        let mut s = 41u64;
        let p = pool(2);
        for &(m, k, n) in &[
            (9usize, 33usize, 17usize),
            (40, 64, 100),
            (65, 127, 250),
            (300, 96, 48),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let bias: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
            let raw = reference(&x, &w, m, k, n);
            let want: Vec<f32> = (0..m * n).map(|i| raw[i] + bias[i % n]).collect();
            let packed = Packed::from_f32(&w, n, k);
            let epi = Epi {
                bias: Some(&bias),
                ..Epi::default()
            };
            // One block per panel, three blocks, and the whole width.
            for blocks in [1usize, 3, 64] {
                for threads in [1, 2] {
                    let mut o = vec![f32::NAN; m * n];
                    p.install(|| {
                        widened_gemm(&x, &packed, &mut o, m, threads, &epi, blocks * 64 * k)
                    });
                    close(
                        &o,
                        &want,
                        k,
                        &format!("widened ({m},{k},{n}) panels of {blocks} threads {threads}"),
                    );
                }
            }
        }
        // Which row counts widen: from the threshold with `vdpbf16ps`, past the decode rows
        // without it; never on the other paths.
        let small = Path::Widen.small() == Path::Portable;
        for m in [1, SMALL_M, SMALL_M + 1, WIDEN_MIN_M - 1, WIDEN_MIN_M, 4096] {
            let want = m >= WIDEN_MIN_M || (small && m > SMALL_M);
            assert_eq!(Path::Widen.widens(m), want, "Path::Widen at {m} rows");
            for other in [Path::Portable, Path::Avx512Bf16, Path::Amx] {
                assert!(!other.widens(m), "{other:?} at {m} rows");
            }
        }
        // Past the threshold, through the public entry.
        let (m, k, n) = (WIDEN_MIN_M + 3, 40, 33);
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let mut o = vec![f32::NAN; m * n];
        let packed = Packed::from_f32(&w, n, k);
        p.install(|| matmul_bf16_path(&x, &packed, &mut o, m, 2, &Epi::default(), Path::Widen));
        close(
            &o,
            &reference(&x, &w, m, k, n),
            k,
            "Path::Widen at the threshold",
        );
    }

    #[test]
    fn epilogue_on_every_path() {
        let mut s = 9u64;
        let p = pool(2);
        for &(m, k, n) in &[(1usize, 33usize, 9usize), (4, 64, 70), (40, 96, 100)] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let sc: Vec<f32> = (0..m).map(|_| 1.0 + lcg(&mut s)).collect();
            let res: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
            let bias: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
            let raw = reference(&x, &w, m, k, n);
            let want: Vec<f32> = (0..m * n)
                .map(|i| raw[i] * sc[i / n] + bias[i % n] + res[i])
                .collect();
            let epi = Epi {
                row_scale: Some(&sc),
                residual: Some(&res),
                bias: Some(&bias),
                ..Epi::default()
            };
            let packed = Packed::from_f32(&w, n, k);
            for path in Path::supported() {
                for threads in [1, 2] {
                    let mut o = vec![f32::NAN; m * n];
                    p.install(|| matmul_bf16_path(&x, &packed, &mut o, m, threads, &epi, path));
                    close(&o, &want, k, &format!("{path:?} ({m},{k},{n})"));
                }
            }
        }
    }

    /// The gated unit and the row norm (which the bf16 kernels run over finished rows) give
    /// what the f32 matmul's fused epilogues give on the same bf16-rounded operands.
    #[test]
    fn gated_and_norm_epilogues_match_f32_on_rounded_operands() {
        use crate::artifact::EwOp;
        use crate::matmul::{matmul_epi, GluEpi, NormEpi};
        let mut s = 21u64;
        let p = pool(2);
        // The last shape spans several L2 groups and depth chunks of the AMX kernel, which
        // finishes the gated unit in its accumulator.
        for &(m, k, half) in &[
            (1usize, 40usize, 48usize),
            (3, 64, 32),
            (20, 33, 40),
            (40, 1024, 704),
        ] {
            let n = 2 * half;
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let g: Vec<f32> = (0..n).map(|_| 1.0 + lcg(&mut s)).collect();
            let xr: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
            let wr: Vec<f32> = w.iter().map(|&v| round_bf16(v)).collect();
            let packed = Packed::from_f32(&w, n, k);
            for threads in [1, 2] {
                // Gated unit over blocks of 16 gate/up columns.
                let (mut want, mut got) = (vec![0f32; m * half], vec![0f32; m * half]);
                let (mut s1, mut s2) = (vec![0f32; m * n], vec![0f32; m * n]);
                let e = Epi {
                    glu: Some(GluEpi::new(&mut want, 16, EwOp::Silu(0))),
                    ..Epi::default()
                };
                p.install(|| matmul_epi(&xr, &wr, &mut s1, m, k, n, threads, &e));
                for path in Path::supported() {
                    got.iter_mut().for_each(|v| *v = f32::NAN);
                    let e = Epi {
                        glu: Some(GluEpi::new(&mut got, 16, EwOp::Silu(0))),
                        ..Epi::default()
                    };
                    p.install(|| matmul_bf16_path(&x, &packed, &mut s2, m, threads, &e, path));
                    close(
                        &got,
                        &want,
                        k,
                        &format!("glu {path:?} ({m},{k},{n}) threads {threads}"),
                    );
                }
                // RMSNorm with a gain, and the 1/rms of the result.
                let (mut q1, mut q2) = (vec![0f32; m], vec![0f32; m]);
                let (mut o1, mut o2) = (vec![0f32; m * n], vec![0f32; m * n]);
                let e = Epi {
                    norm: Some(NormEpi::new(1e-6, true, Some(&g), Some(&mut q1))),
                    ..Epi::default()
                };
                p.install(|| matmul_epi(&xr, &wr, &mut o1, m, k, n, threads, &e));
                let e = Epi {
                    norm: Some(NormEpi::new(1e-6, true, Some(&g), Some(&mut q2))),
                    ..Epi::default()
                };
                p.install(|| matmul_bf16_epi(&x, &packed, &mut o2, m, threads, &e));
                close(
                    &o2,
                    &o1,
                    k,
                    &format!("norm ({m},{k},{n}) threads {threads}"),
                );
                close(
                    &q2,
                    &q1,
                    k,
                    &format!("inv_rms ({m},{k},{n}) threads {threads}"),
                );
            }
        }
    }

    /// The rotary epilogue (a pass over the finished rows on the bf16 paths) gives what the
    /// f32 matmul's fused one gives on the same bf16-rounded operands, with a row scale and a
    /// bias before it, positions in order and scattered.
    #[test]
    fn rope_epilogue_matches_f32_on_rounded_operands() {
        use crate::artifact::{RopeStyle, RopeTable};
        use crate::matmul::{matmul_epi, RopeEpi, RowPos};
        let mut s = 23u64;
        let p = pool(2);
        for &(m, k, n, hd) in &[
            (1usize, 40usize, 48usize, 8usize),
            (3, 64, 96, 6),
            (20, 33, 128, 64),
            // Heads of 2 and 4 AMX column blocks, tasks and groups cut at whole heads.
            (40, 1024, 1280, 64),
            (33, 64, 384, 128),
        ] {
            let mut t = crate::rope::Rope::new(&RopeTable {
                head_dim: hd,
                base: 10000.0,
            });
            t.ensure(200).unwrap();
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let sc: Vec<f32> = (0..m).map(|_| 1.0 + lcg(&mut s)).collect();
            let bias: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
            let xr: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
            let wr: Vec<f32> = w.iter().map(|&v| round_bf16(v)).collect();
            let packed = Packed::from_f32(&w, n, k);
            let scattered = crate::test_util::test_positions(m, None);
            for (style, pos) in [
                (RopeStyle::Half, RowPos::From(5)),
                (RopeStyle::Interleaved, RowPos::Rows(&scattered)),
            ] {
                let e = Epi {
                    row_scale: Some(&sc),
                    bias: Some(&bias),
                    rope: Some(RopeEpi {
                        cos: t.cos(),
                        sin: t.sin(),
                        head_dim: hd,
                        style,
                        pos,
                    }),
                    ..Epi::default()
                };
                for threads in [1, 2] {
                    let (mut o1, mut o2) = (vec![0f32; m * n], vec![0f32; m * n]);
                    p.install(|| matmul_epi(&xr, &wr, &mut o1, m, k, n, threads, &e));
                    for path in Path::supported() {
                        o2.iter_mut().for_each(|v| *v = f32::NAN);
                        p.install(|| matmul_bf16_path(&x, &packed, &mut o2, m, threads, &e, path));
                        close(
                            &o2,
                            &o1,
                            k,
                            &format!("rope {style:?} {path:?} ({m},{k},{n}) threads {threads}"),
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn parallel_rounding_matches_serial() {
        let mut s = 2u64;
        let (m, k) = (300usize, 333usize);
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        // Rows padded past the pairs, as the AMX kernel lays them out.
        let kw = k.next_multiple_of(32) / 2 + 16;
        // A reused buffer: nothing of an earlier call's layout may survive.
        let (mut a, mut b) = (vec![u32::MAX; 2 * 320 * kw], Vec::new());
        pool(2).install(|| round_rows(&x, m, k, kw, 320, &mut a, true, 2));
        round_rows(&x, m, k, kw, 320, &mut b, false, 1);
        assert_eq!(a, b);
        assert!(a[k.div_ceil(2)..kw].iter().all(|&v| v == 0));
        assert!(a[m * kw..].iter().all(|&v| v == 0) && a.len() == 320 * kw);
    }

    #[test]
    fn rounding_rows_matches_the_scalar_rounding() {
        let mut s = 1u64;
        for k in [1usize, 2, 15, 16, 17, 31, 32, 33, 64, 70] {
            let x: Vec<f32> = (0..k).map(|_| lcg(&mut s) * 1e3).collect();
            let kp = k.next_multiple_of(32);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            round_rows(&x, 1, k, kp / 2, 2, &mut a, true, 1);
            round_rows(&x, 1, k, kp / 2, 2, &mut b, false, 1);
            assert_eq!(a, b, "k = {k}");
            assert!(a[kp / 2..].iter().all(|&v| v == 0));
        }
    }
}

#[cfg(test)]
mod bench {
    use super::*;
    use crate::test_util::{lcg, pool};

    /// The prefill GEMM's throughput at the d=1024 model's shapes (m = 512):
    /// `cargo test --release -p loopc-runtime bench_amx_gemm -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_amx_gemm() {
        let mut s = 3u64;
        let p = pool(2);
        // Where the best path is not `vdpbf16ps`, that kernel beside it.
        let mut paths = vec![Path::best()];
        if Path::best() == Path::Widen && Path::supported().contains(&Path::Avx512Bf16) {
            paths.push(Path::Avx512Bf16);
        }
        for (m, path) in [128usize, 512]
            .into_iter()
            .flat_map(|m| paths.iter().map(move |&p| (m, p)))
        {
            for &(k, n) in &[
                (1024usize, 3072usize),
                (1024, 1024),
                (1024, 5632),
                (2816, 1024),
            ] {
                let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
                let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
                let packed = Packed::from_f32(&w, n, k);
                let mut o = vec![0f32; m * n];
                for threads in [1, 2] {
                    let mut best = f64::MAX;
                    for _ in 0..7 {
                        let t = std::time::Instant::now();
                        p.install(|| {
                            matmul_bf16_path(&x, &packed, &mut o, m, threads, &Epi::default(), path)
                        });
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    let gf = 2.0 * (m * n * k) as f64 / best / 1e9;
                    eprintln!(
                        "{path:?} m={m} k={k} n={n} threads={threads}: {:.3} ms, {gf:.0} GFLOP/s",
                        best * 1e3
                    );
                }
            }
        }
    }
}
