//! `out[m, n] = x[m, k] · W[n, k]ᵀ` with `W` packed once at load ([`PackedF32`]): panels of
//! [`NR`] weight rows, depth-major (`panel[kk][r] = W[p·NR + r, kk]`).
//!
//! Every row count runs one register tile: per input row, the panel's [`NR`] outputs as two
//! 16-lane vectors, each lane a fused multiply-add chain over the depth in order, one input
//! element broadcast per step. There are no lane sums, and an output does not depend on how
//! many rows the call has or where the depth is split into chunks: a row's product has the
//! same bits in a prefill, a decode step or a batch.
//!
//! Why the layout: a decode step streams each panel as one contiguous run (the row-major
//! GEMV read four rows 4 KiB apart), and a batched step does 16 lanes of work per weight
//! load with no horizontal sums, where the row-major kernel needed an input load per
//! multiply-add pair and a lane sum per output (`bench_packed`, three runs: eight rows at
//! 32–41 against 22–30 GB/s of weights from L3, 20–22 against 17–19 from DRAM; one row 24–27
//! against 22–25 GB/s from DRAM).

use super::{Epi, PAR_MIN_MACS};
use crate::error::Result;
use crate::mem::AVec;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Weight rows per panel (two 16-lane vectors).
pub const NR: usize = 32;
/// Most input rows per register tile (24 accumulators).
const MR: usize = 12;
/// Depth per chunk when more than one tile of rows passes over a panel: the panel's chunk
/// (`KC × NR` floats, 24 KiB) stays in L1 while every tile uses it.
const KC: usize = 192;
/// Software prefetch distances (floats ahead in the panel) when one tile streams a panel
/// whole, into L1 and into L2: the hardware prefetcher alone left the batched kernel at
/// 12 GB/s from DRAM (19–21 with these; `bench_packed`).
const PF_L1: usize = 512;
const PF_L2: usize = 2048;

/// Whether the vector kernels run on this CPU (else the scalar one, same sums).
pub(crate) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether f32 matmul weights are packed on this CPU: AVX-512, and `LOOPC_PACK_F32` not 0
/// (any value but 0 and 1 is an error).
pub(crate) fn enabled() -> Result<bool> {
    Ok(supported() && crate::error::env_switch("LOOPC_PACK_F32", true)?)
}

/// An f32 weight `[n, k]` in panels of 32 rows, depth-major (rows past `n` are zero).
pub struct PackedF32 {
    n: usize,
    k: usize,
    data: AVec,
}

impl std::fmt::Debug for PackedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedF32([{}, {}])", self.n, self.k)
    }
}

impl PackedF32 {
    /// Pack `W[j, i] = get(j, i)` for `j < n`, `i < k`; panels are filled in parallel on
    /// `pool`.
    pub(crate) fn build(
        n: usize,
        k: usize,
        what: &str,
        pool: &rayon::ThreadPool,
        get: impl Fn(usize, usize) -> f32 + Sync,
    ) -> Result<Self> {
        use rayon::prelude::*;
        let mut data = AVec::zeroed(n.div_ceil(NR) * NR * k, what)?;
        if k > 0 {
            pool.install(|| {
                data.as_mut_slice()
                    .par_chunks_mut(NR * k)
                    .enumerate()
                    .for_each(|(p, panel)| {
                        for r in 0..NR.min(n - p * NR) {
                            let j = p * NR + r;
                            for i in 0..k {
                                panel[i * NR + r] = get(j, i);
                            }
                        }
                    })
            });
        }
        Ok(PackedF32 { n, k, data })
    }

    /// Pack a row-major `[n, k]` matrix.
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        assert!(w.len() >= n * k, "packed weight size");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("one-thread pool");
        Self::build(n, k, "f32 weight", &pool, |j, i| w[j * k + i]).expect("weight allocation")
    }

    pub fn n(&self) -> usize {
        self.n
    }
    pub fn k(&self) -> usize {
        self.k
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * self.data.len()
    }
    pub(crate) fn data_len(&self) -> usize {
        self.data.len()
    }

    /// Moves the packed data to `dst` (`data_len()` floats) and keeps a window of it there.
    ///
    /// # Safety
    /// `dst` is 64-byte aligned, valid for `data_len()` floats, outlives `self`, and no other
    /// value uses that range.
    pub(crate) unsafe fn move_to(&mut self, dst: *mut f32) {
        self.data.move_to(dst);
    }

    /// `W[j, :]` into `out[..k]` (a token embedding gathered from a tied table).
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        let d = self.data.as_slice();
        let base = (j / NR) * NR * self.k + j % NR;
        for (i, o) in out[..self.k].iter_mut().enumerate() {
            *o = d[base + i * NR];
        }
    }
}

/// One product of a [`matmul_packed_jobs`] call: `out` holds `m × w.n()` floats (row stride
/// `w.n()`), and `epi` is applied to it.
pub struct Job<'a> {
    pub w: &'a PackedF32,
    pub out: &'a mut [f32],
    pub epi: Epi<'a>,
}

/// `out = x · Wᵀ` for one packed weight, with its epilogue.
pub fn matmul_packed_epi(
    x: &[f32],
    w: &PackedF32,
    out: &mut [f32],
    m: usize,
    threads: usize,
    epi: &Epi,
) {
    matmul_packed_jobs(x, m, threads, &mut [Some(Job { w, out, epi: *epi })]);
}

/// Every job's product of the same `x` (`[m, k]`) in one parallel pass (`None`s, the unused
/// slots of a caller's fixed array, are skipped): the tasks split each
/// job's columns at whole panels and whole epilogue blocks (gate/up pairs, rotary heads), each
/// computes its columns for all `m` rows, then runs the epilogue on them while they are in
/// cache; a normalization's row reduction runs after the pass.
pub fn matmul_packed_jobs(x: &[f32], m: usize, threads: usize, jobs: &mut [Option<Job>]) {
    assert!(
        jobs.len() <= super::MAX_PARTS,
        "packed matmul: too many parts"
    );
    let Some(k) = jobs.iter().flatten().next().map(|j| j.w.k) else {
        return;
    };
    let mut macs = 0usize;
    for j in jobs.iter().flatten() {
        let n = j.w.n;
        assert!(
            x.len() >= m * k && j.out.len() >= m * n && j.w.k == k,
            "packed matmul operand sizes"
        );
        j.epi.check(m, n);
        macs = macs.saturating_add(m.saturating_mul(n).saturating_mul(k));
    }
    if m == 0 {
        return;
    }
    let chunks = if threads <= 1 || macs < PAR_MIN_MACS {
        1
    } else {
        threads * 4
    };
    crate::mem::with_buffer(&ROWS, |rows| {
        let xp = if m > 1 {
            pack_rows(x, m, k, rows);
            rows.as_ptr() as usize
        } else {
            x.as_ptr() as usize
        };
        run_tasks(xp, m, chunks, jobs);
    });
    for j in jobs.iter_mut().flatten() {
        if let Some(nm) = &j.epi.norm {
            nm.finish(j.out, m, j.w.n, threads);
        }
    }
}

/// The tasks of [`matmul_packed_jobs`] over the rows at `xp` ([`pack_rows`]' layout).
fn run_tasks(xp: usize, m: usize, chunks: usize, jobs: &mut [Option<Job>]) {
    // Per job: columns per task (a multiple of the panel and of the epilogue's block) and
    // the first task's index, on the stack: no allocation per decode step.
    let mut step = [0usize; super::MAX_PARTS];
    let mut first = [0usize; super::MAX_PARTS + 1];
    let total_n: usize = jobs.iter().flatten().map(|j| j.w.n).sum();
    for (q, j) in jobs.iter().enumerate() {
        let (n, align) = j.as_ref().map_or((0, 1), |j| (j.w.n, j.epi.align()));
        let unit = lcm(NR, align);
        let share = (chunks * n).div_ceil(total_n.max(1)).max(1);
        step[q] = n.div_ceil(share).next_multiple_of(unit).max(unit);
        first[q + 1] = first[q] + n.div_ceil(step[q]);
    }
    let tasks = first[jobs.len()];
    let firsts = &first[..=jobs.len()];
    let mut outs = [0usize; super::MAX_PARTS];
    for (o, j) in outs.iter_mut().zip(jobs.iter_mut()) {
        if let Some(j) = j {
            *o = j.out.as_mut_ptr() as usize;
        }
    }
    let run = |t: usize| {
        let q = firsts.partition_point(|&f| f <= t) - 1;
        let j = jobs[q].as_ref().expect("a job with tasks");
        let n = j.w.n;
        let c0 = (t - firsts[q]) * step[q];
        let c1 = (c0 + step[q]).min(n);
        let out = outs[q] as *mut f32;
        // SAFETY: this task alone writes columns c0..c1 of every row of job q's output
        // (checked to hold m rows of n); the epilogue was checked for (m, n) and sees only
        // whole blocks of its columns (c0 is a multiple of `align()`, c1 one or n).
        unsafe {
            products(
                m,
                n,
                j.w.k,
                xp as *const f32,
                j.w.data.as_ptr(),
                c0 / NR,
                c1.div_ceil(NR),
                out,
            );
            let e = Epi {
                norm: None,
                ..j.epi
            };
            e.apply(out, n, 0, m, c0, c1 - c0);
        }
    };
    if tasks == 1 {
        run(0);
    } else {
        crate::par::for_each(tasks, run);
    }
}

fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

thread_local! {
    /// The calling thread's input rows in tile order ([`pack_rows`]).
    static ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Depth per chunk for `m` rows: one tile of rows streams each panel whole, in one pass.
fn chunk_len(m: usize, k: usize) -> usize {
    if m <= MR {
        k.max(1)
    } else {
        KC
    }
}

/// `x` (`[m, k]`) rearranged once per call so that each tile of [`MR`] rows reads its chunk of
/// depth as one run: chunk at depth `k0` (length `kc`), tile `t` (`g` rows) starts at
/// `k0·tiles·MR + t·MR·kc` and holds `[kk][i]` at `kk·g + i`. One row is already that.
fn pack_rows(x: &[f32], m: usize, k: usize, rows: &mut Vec<f32>) {
    let tiles = m.div_ceil(MR);
    let kcmax = chunk_len(m, k);
    if rows.len() < tiles * MR * k {
        rows.resize(tiles * MR * k, 0.0);
    }
    let dst = rows.as_mut_ptr() as usize;
    // One tile's rows, every chunk: written in order, read as `g` row streams.
    let tile = |t: usize| {
        let g = MR.min(m - t * MR);
        let src = &x[t * MR * k..(t * MR + g) * k];
        let mut k0 = 0;
        while k0 < k {
            let kc = kcmax.min(k - k0);
            // SAFETY: tile t's block of each chunk, `kc·g` floats inside `rows` (sized
            // above); tiles write disjoint blocks.
            let d = unsafe {
                std::slice::from_raw_parts_mut(
                    (dst as *mut f32).add(k0 * tiles * MR + t * MR * kc),
                    kc * g,
                )
            };
            for (kk, o) in d.chunks_exact_mut(g).enumerate() {
                for (i, v) in o.iter_mut().enumerate() {
                    *v = src[i * k + k0 + kk];
                }
            }
            k0 += kc;
        }
    };
    // A prefill's rows in parallel: on one thread the other one waited for the copy (by count,
    // m·k copies against m·n·k/2 multiply-add pairs per thread: 2–6 % at d=1024's shapes, not
    // timed apart).
    if tiles > 1 && m * k >= 1 << 16 {
        crate::par::for_each(tiles, tile);
    } else {
        (0..tiles).for_each(tile);
    }
}

/// Panels `p0..p1` of the packed weight at `w` (`n` rows, depth `k`) times the `m` rows at
/// `xp` (laid out by [`pack_rows`]), into `out` (row stride `n`).
///
/// # Safety
/// `xp` covers `tiles·MR·k` floats (`m·k` for one row), `w` the panels, `out` the `m × n`
/// block; no other thread writes columns `p0·NR..min(p1·NR, n)`.
#[allow(clippy::too_many_arguments)]
unsafe fn products(
    m: usize,
    n: usize,
    k: usize,
    xp: *const f32,
    w: *const f32,
    p0: usize,
    p1: usize,
    out: *mut f32,
) {
    if k == 0 {
        let c0 = p0 * NR;
        for i in 0..m {
            std::ptr::write_bytes(out.add(i * n + c0), 0, (p1 * NR).min(n) - c0);
        }
        return;
    }
    let tiles = m.div_ceil(MR);
    let kcmax = chunk_len(m, k);
    let mut k0 = 0;
    while k0 < k {
        let kc = kcmax.min(k - k0);
        for p in p0..p1 {
            let cols = NR.min(n - p * NR);
            let wc = w.add(p * k * NR + k0 * NR);
            // The next panel chunk (this chunk's next panel, or the next chunk's first), into
            // L2 a share per tile: the tiles of this one hide its latency.
            let next = if p + 1 < p1 {
                Some((w.add((p + 1) * k * NR + k0 * NR), kc))
            } else if k0 + kc < k {
                Some((w.add(p0 * k * NR + (k0 + kc) * NR), kcmax.min(k - k0 - kc)))
            } else {
                None
            };
            for t in 0..tiles {
                if let (Some((nw, nkc)), true) = (next, tiles > 1) {
                    let lines = nkc * NR / 16;
                    for l in lines * t / tiles..lines * (t + 1) / tiles {
                        prefetch_l2(nw.add(l * 16));
                    }
                }
                let g = MR.min(m - t * MR);
                let x = xp.add(k0 * tiles * MR + t * MR * kc);
                let o = out.add(t * MR * n + p * NR);
                tile_any(g, tiles == 1, x, wc, kc, o, n, cols, k0 > 0);
            }
        }
        k0 += kc;
    }
}

#[inline(always)]
fn prefetch_l2(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch does not fault.
    unsafe {
        _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// [`tile`] for `g ≤ MR` rows, on this CPU's kernel.
///
/// # Safety
/// As [`tile`].
#[allow(clippy::too_many_arguments)]
unsafe fn tile_any(
    g: usize,
    stream: bool,
    xp: *const f32,
    wc: *const f32,
    kc: usize,
    o: *mut f32,
    ldo: usize,
    cols: usize,
    acc: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if supported() {
        macro_rules! go {
            ($($g:literal),*) => {
                match (g, stream) {
                    $(
                        ($g, true) => tile::<$g, true>(xp, wc, kc, o, ldo, cols, acc),
                        ($g, false) => tile::<$g, false>(xp, wc, kc, o, ldo, cols, acc),
                    )*
                    _ => unreachable!("tile of {g} rows"),
                }
            };
        }
        return go!(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12);
    }
    tile_portable(g, xp, wc, kc, o, ldo, cols, acc)
}

/// One tile: `GG` input rows (depth-major: `xp[kk·GG + i]`) by a panel chunk at `wp`
/// (`kc × NR`), stored to (with `acc`, continued from) `out[i·ldo + r]` for `r < cols`.
/// `PF`: prefetch the panel ahead (it streams from memory once).
///
/// # Safety
/// AVX-512F; `xp` covers `kc·GG` floats, `wp` `kc·NR` (64-byte aligned), `out` the tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const GG: usize, const PF: bool>(
    xp: *const f32,
    wp: *const f32,
    kc: usize,
    out: *mut f32,
    ldo: usize,
    cols: usize,
    acc: bool,
) {
    let m0 = if cols >= 16 {
        0xffff
    } else {
        ((1u32 << cols) - 1) as __mmask16
    };
    let m1 = if cols >= 32 {
        0xffff
    } else if cols > 16 {
        ((1u32 << (cols - 16)) - 1) as __mmask16
    } else {
        0
    };
    let mut c = [[_mm512_setzero_ps(); 2]; GG];
    if acc {
        for (i, ci) in c.iter_mut().enumerate() {
            ci[0] = _mm512_maskz_loadu_ps(m0, out.add(i * ldo));
            ci[1] = _mm512_maskz_loadu_ps(m1, out.add(i * ldo + 16));
        }
    }
    for kk in 0..kc {
        let wk = wp.add(kk * NR);
        if PF {
            _mm_prefetch::<_MM_HINT_T0>(wk.wrapping_add(PF_L1) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(wk.wrapping_add(PF_L1 + 16) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(wk.wrapping_add(PF_L2) as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(wk.wrapping_add(PF_L2 + 16) as *const i8);
        }
        let w0 = _mm512_load_ps(wk);
        let w1 = _mm512_load_ps(wk.add(16));
        for (i, ci) in c.iter_mut().enumerate() {
            let xb = _mm512_set1_ps(*xp.add(kk * GG + i));
            ci[0] = _mm512_fmadd_ps(w0, xb, ci[0]);
            ci[1] = _mm512_fmadd_ps(w1, xb, ci[1]);
        }
    }
    for (i, ci) in c.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(i * ldo), m0, ci[0]);
        _mm512_mask_storeu_ps(out.add(i * ldo + 16), m1, ci[1]);
    }
}

/// [`tile`]'s sums in scalar code (each a fused multiply-add chain in the same order, so the
/// same bits).
///
/// # Safety
/// As [`tile`], without the CPU feature.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_portable(
    g: usize,
    xp: *const f32,
    wp: *const f32,
    kc: usize,
    out: *mut f32,
    ldo: usize,
    cols: usize,
    acc: bool,
) {
    for i in 0..g {
        for r in 0..cols {
            let o = out.add(i * ldo + r);
            let mut s = if acc { *o } else { 0.0 };
            for kk in 0..kc {
                s = (*wp.add(kk * NR + r)).mul_add(*xp.add(kk * g + i), s);
            }
            *o = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{lcg, pool};

    fn naive(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut o = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k)
                    .map(|q| x[i * k + q] as f64 * w[j * k + q] as f64)
                    .sum();
            }
        }
        o
    }

    /// Every tile height, partial panels, one and several depth chunks, serial and threaded,
    /// against f64 sums; and every row's bits equal to the same row computed alone.
    #[test]
    fn matches_f64_sums_and_rows_alone() {
        let mut s = 11u64;
        for &(m, n, k) in &[
            (1usize, 1usize, 1usize),
            (1, 70, 300),
            (3, 33, 17),
            (8, 64, 1024),
            (12, 96, 200),
            (13, 70, 300),
            (30, 100, 450),
            (2, 5, 0),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let p = PackedF32::from_f32(&w, n, k);
            let want = naive(&x, &w, m, n, k);
            for threads in [1usize, 2] {
                let mut o = vec![f32::NAN; m * n];
                pool(threads)
                    .install(|| matmul_packed_epi(&x, &p, &mut o, m, threads, &Epi::default()));
                for (i, (&g, &e)) in o.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - e).abs() <= 1e-5 * (k as f64).sqrt().max(1.0),
                        "({m},{n},{k}) t{threads} [{i}]: {g} vs {e}"
                    );
                }
                for i in 0..m {
                    let mut one = vec![0f32; n];
                    matmul_packed_epi(&x[i * k..(i + 1) * k], &p, &mut one, 1, 1, &Epi::default());
                    assert_eq!(
                        one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        o[i * n..(i + 1) * n]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>(),
                        "({m},{n},{k}) row {i} alone"
                    );
                }
            }
            // The gathered rows are the weight's.
            let mut row = vec![0f32; k];
            for j in 0..n {
                p.row_into(j, &mut row);
                assert_eq!(row, w[j * k..(j + 1) * k]);
            }
        }
    }

    /// Several jobs in one pass (a fused QKV's parts, each with its own epilogue and a width
    /// that is no multiple of a panel) give each job's bits computed alone.
    #[test]
    fn jobs_equal_single_products() {
        let mut s = 3u64;
        let k = 200;
        let widths = [64usize, 32, 70];
        let ws: Vec<Vec<f32>> = widths
            .iter()
            .map(|&n| (0..n * k).map(|_| lcg(&mut s)).collect())
            .collect();
        let ps: Vec<PackedF32> = ws
            .iter()
            .zip(widths)
            .map(|(w, n)| PackedF32::from_f32(w, n, k))
            .collect();
        for m in [1usize, 5, 30] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let bias: Vec<f32> = (0..70).map(|_| lcg(&mut s)).collect();
            let res: Vec<f32> = (0..m * 64).map(|_| lcg(&mut s)).collect();
            let epis = [
                Epi {
                    residual: Some(&res[..]),
                    ..Epi::default()
                },
                Epi::default(),
                Epi {
                    bias: Some(&bias[..]),
                    ..Epi::default()
                },
            ];
            let alone: Vec<Vec<f32>> = (0..3)
                .map(|q| {
                    let mut o = vec![0f32; m * widths[q]];
                    matmul_packed_epi(&x, &ps[q], &mut o, m, 1, &epis[q]);
                    o
                })
                .collect();
            for threads in [1usize, 2] {
                let mut outs: Vec<Vec<f32>> =
                    widths.iter().map(|&n| vec![f32::NAN; m * n]).collect();
                let mut jobs: Vec<Option<Job>> = outs
                    .iter_mut()
                    .zip(&ps)
                    .zip(epis)
                    .map(|((out, w), epi)| Some(Job { w, out, epi }))
                    .collect();
                jobs.insert(1, None);
                pool(threads).install(|| matmul_packed_jobs(&x, m, threads, &mut jobs));
                drop(jobs);
                for q in 0..3 {
                    assert_eq!(
                        outs[q].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        alone[q].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "m={m} threads={threads} job {q}"
                    );
                }
            }
        }
    }

    /// The scalar kernel gives the vector kernel's bits.
    #[test]
    fn portable_tile_matches_vector_tile() {
        if !supported() {
            eprintln!("no AVX-512F: only the scalar kernel runs here");
            return;
        }
        let mut s = 5u64;
        let (g, kc, cols) = (5usize, 77usize, 27usize);
        let x: Vec<f32> = (0..g * kc).map(|_| lcg(&mut s)).collect();
        let mut wv = AVec::zeroed(kc * NR, "w").unwrap();
        for v in wv.as_mut_slice() {
            *v = lcg(&mut s);
        }
        let (mut a, mut b) = (vec![0.5f32; g * 40], vec![0.5f32; g * 40]);
        // SAFETY: the buffers cover the tile; the feature is present.
        unsafe {
            tile_any(
                g,
                false,
                x.as_ptr(),
                wv.as_ptr(),
                kc,
                a.as_mut_ptr(),
                40,
                cols,
                true,
            );
            tile_portable(
                g,
                x.as_ptr(),
                wv.as_ptr(),
                kc,
                b.as_mut_ptr(),
                40,
                cols,
                true,
            );
        }
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}

#[cfg(test)]
mod bench {
    use super::*;
    use crate::test_util::lcg;

    /// The packed kernels beside the row-major ones on the same weights, two threads: one
    /// and eight rows from DRAM (24 matrices of 4096 × 1024 in turn) and from L3, and
    /// prefill-sized products against the dot kernel (128 rows) and `gemm` (512)
    /// (`cargo test --release -p loopc-runtime --lib bench_packed -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn bench_packed() {
        let team = crate::par::Team::new(1).unwrap();
        let mut s = 5u64;
        let cases: [(usize, usize, usize, usize); 8] = [
            (1, 1024, 4096, 24),
            (8, 1024, 4096, 24),
            (1, 1024, 3072, 1),
            (8, 1024, 3072, 1),
            (8, 2816, 1024, 1),
            (128, 1024, 3072, 1),
            (128, 2816, 1024, 1),
            (512, 1024, 3072, 1),
        ];
        for (m, k, n, mats) in cases {
            let mut wv = AVec::zeroed(mats * n * k, "w").unwrap();
            for v in wv.as_mut_slice() {
                *v = lcg(&mut s);
            }
            let packs: Vec<PackedF32> = (0..mats)
                .map(|q| PackedF32::from_f32(&wv.as_slice()[q * n * k..], n, k))
                .collect();
            let mut xv = AVec::zeroed(m * k, "x").unwrap();
            for v in xv.as_mut_slice() {
                *v = lcg(&mut s);
            }
            let mut o = vec![0f32; m * n];
            let calls = if mats > 1 {
                96
            } else if m <= 8 {
                200
            } else {
                4
            };
            let mut best = [f64::MAX; 2];
            for _ in 0..3 {
                for (kind, b) in best.iter_mut().enumerate() {
                    let t = std::time::Instant::now();
                    team.install(|| {
                        for c in 0..calls {
                            let q = c % mats;
                            if kind == 1 {
                                matmul_packed_epi(
                                    xv.as_slice(),
                                    &packs[q],
                                    &mut o,
                                    m,
                                    2,
                                    &Epi::default(),
                                );
                            } else {
                                let w = &wv.as_slice()[q * n * k..(q + 1) * n * k];
                                super::super::matmul(xv.as_slice(), w, &mut o, m, k, n, 2);
                            }
                        }
                    });
                    *b = b.min(t.elapsed().as_secs_f64());
                }
            }
            let gb = |t: f64| (calls * n * k * 4) as f64 / t / 1e9;
            let gf = |t: f64| 2.0 * (calls * m * n * k) as f64 / t / 1e9;
            eprintln!(
                "m={m} k={k} n={n} ({}): row-major {:.1} GB/s {:.0} GFLOP/s, packed {:.1} GB/s {:.0} GFLOP/s",
                if mats > 1 { "DRAM" } else { "cache" },
                gb(best[0]),
                gf(best[0]),
                gb(best[1]),
                gf(best[1])
            );
        }
    }
}
