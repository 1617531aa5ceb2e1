//! Causal attention of a long prefill through GEMMs: per head and block of query rows,
//! `S = Q·Kᵀ`, a causal softmax over each row of `S`, then `O = P·V`, with the products on the
//! runtime's GEMM (or the artifact's, `matmul::HostGemm`).
//!
//! The generated attention kernel folds one key at a time into one (row, head) state: every
//! key's K and V rows are loaded once per query row, so a 512-token prefill is bound by those
//! loads (~20 GFLOP/s a core) while the same arithmetic as two GEMMs runs at GEMM speed. It
//! stays the kernel for decode and short prompts, where the products would be tiny.
//!
//! Semantics are the kernel's (`artifact::KernelSpec::Attention`): row `r` of the chunk sees
//! cache rows `0..=pos0 + r`; query head `h` reads kv head `h / (heads / kv_heads)`.

use crate::matmul::{exp_f32, gemm_block, HostGemm};
use std::cell::RefCell;

mod tiles;

/// Query rows per work unit: `S` for one unit is `ROWS × keys` floats (128 KiB at 512 keys).
const ROWS: usize = 64;

/// Prefill chunks of at least this many rows go through [`causal_gemm`].
pub(crate) const MIN_ROWS: usize = 32;

thread_local! {
    /// A thread's `S`/`P` block.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's packed Kᵀ and V of every kv head (the register-tile path).
    static KT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The shapes of one call.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// `out[r, h] = softmax_j(scale · q[r, h] · k[j, g]) · v[j, g]` over `j ≤ pos0 + r`, for rows
/// `0..rows` of `q`/`out` (`heads · head_dim` wide) and cache rows of `kv_heads · head_dim`,
/// with (head, row block) units spread over the current rayon pool.
///
/// # Safety
/// `q` and `out` hold `rows` rows, `k` and `v` at least `pos0 + rows`; `out` overlaps none of
/// them.
#[allow(clippy::too_many_arguments)]
pub unsafe fn causal_gemm(
    q: *const f32,
    k: *const f32,
    v: *const f32,
    out: *mut f32,
    rows: usize,
    pos0: usize,
    s: Shape,
    threads: usize,
    host: Option<HostGemm>,
) {
    if host.is_none() && tiles::supported(&s) {
        return causal_tiles(q, k, v, out, rows, pos0, s, threads);
    }
    let group = s.heads / s.kv_heads.max(1);
    let (qrow, kvrow) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let blocks = rows.div_ceil(ROWS);
    let (q, k, v, out) = (q as usize, k as usize, v as usize, out as usize);
    let unit = move |u: usize| {
        // Row blocks from the last: the largest units start first.
        let (h, b) = (u % s.heads, blocks - 1 - u / s.heads);
        let (r0, r1) = (b * ROWS, ((b + 1) * ROWS).min(rows));
        let (m, nk) = (r1 - r0, pos0 + r1);
        let g = h / group;
        SCORES.with_borrow_mut(|sc| {
            if sc.len() < m * nk {
                sc.resize(m * nk, 0.0);
            }
            // SAFETY (both products): the caller's buffers cover rows r0..r1 of q/out and cache
            // rows 0..nk; S is this thread's; units write disjoint (rows, head) blocks of out.
            unsafe {
                gemm_block(
                    m,
                    nk,
                    s.head_dim,
                    sc.as_mut_ptr(),
                    nk as isize,
                    (q as *const f32).add(r0 * qrow + h * s.head_dim),
                    qrow as isize,
                    (k as *const f32).add(g * s.head_dim),
                    1,
                    kvrow as isize,
                    gemm::Parallelism::None,
                    host,
                );
            }
            for i in 0..m {
                let lim = pos0 + r0 + i + 1;
                let row = &mut sc[i * nk..(i + 1) * nk];
                softmax_prefix(&mut row[..lim], s.scale);
                row[lim..].fill(0.0);
            }
            unsafe {
                gemm_block(
                    m,
                    s.head_dim,
                    nk,
                    (out as *mut f32).add(r0 * qrow + h * s.head_dim),
                    qrow as isize,
                    sc.as_ptr(),
                    nk as isize,
                    (v as *const f32).add(g * s.head_dim),
                    kvrow as isize,
                    1,
                    gemm::Parallelism::None,
                    host,
                );
            }
        });
    };
    let units = blocks * s.heads;
    if threads > 1 && units > 1 {
        crate::par::for_each(units, unit);
    } else {
        (0..units).for_each(unit);
    }
}

/// [`causal_gemm`] in register tiles: every kv head's Kᵀ and V packed once (over the pool),
/// then the (head, row block) units as in the `gemm` path.
///
/// # Safety
/// As [`causal_gemm`]; [`tiles::supported`] returned true.
#[allow(clippy::too_many_arguments)]
unsafe fn causal_tiles(
    q: *const f32,
    k: *const f32,
    v: *const f32,
    out: *mut f32,
    rows: usize,
    pos0: usize,
    s: Shape,
    threads: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let group = s.heads / s.kv_heads.max(1);
        let (hd, kvrow) = (s.head_dim, s.kv_heads * s.head_dim);
        let (nk, nkp) = (pos0 + rows, tiles::padded(pos0 + rows));
        // Per kv head: Kᵀ, then V.
        let per_head = hd * nkp + nk * hd;
        crate::mem::with_buffer(&KT, |kt| {
            if kt.len() < s.kv_heads * per_head {
                kt.resize(s.kv_heads * per_head, 0.0);
            }
            let (ktp, k, q, v, out) = (
                kt.as_mut_ptr() as usize,
                k as usize,
                q as usize,
                v as usize,
                out as usize,
            );
            let pack = |g: usize| {
                let dst = (ktp as *mut f32).wrapping_add(g * per_head);
                // SAFETY: the caller's cache holds nk rows; head g's block is this task's.
                unsafe {
                    tiles::pack_kt(k as *const f32, kvrow, g, hd, nk, dst);
                    tiles::pack_v(v as *const f32, kvrow, g, hd, nk, dst.add(hd * nkp));
                }
            };
            let blocks = rows.div_ceil(tiles::ROWS);
            let unit = |u: usize| {
                // Row blocks from the last: the largest units start first.
                let (h, b) = (u % s.heads, blocks - 1 - u / s.heads);
                let (r0, r1) = (b * tiles::ROWS, ((b + 1) * tiles::ROWS).min(rows));
                let g = h / group;
                SCORES.with_borrow_mut(|sc| {
                    let need = tiles::ROWS * (nkp + 2 * hd);
                    if sc.len() < need {
                        sc.resize(need, 0.0);
                    }
                    // SAFETY: Kᵀ of head g is packed (the pack loop joined); the scratch is
                    // this thread's; units write disjoint (rows, head) blocks of out.
                    unsafe {
                        let kt = (ktp as *const f32).add(g * per_head);
                        tiles::unit(
                            q as *const f32,
                            kt,
                            nkp,
                            kt.add(hd * nkp),
                            out as *mut f32,
                            h,
                            r0,
                            r1,
                            pos0,
                            s,
                            sc.as_mut_ptr(),
                            sc.as_mut_ptr().add(tiles::ROWS * nkp),
                            sc.as_mut_ptr().add(tiles::ROWS * (nkp + hd)),
                        )
                    };
                });
            };
            let units = blocks * s.heads;
            if threads > 1 && units > 1 {
                crate::par::for_each(s.kv_heads, pack);
                crate::par::for_each(units, unit);
            } else {
                (0..s.kv_heads).for_each(pack);
                (0..units).for_each(unit);
            }
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (q, k, v, out, rows, pos0, s, threads);
        unreachable!("tiles::supported is false off x86_64");
    }
}

/// Below this many multiply-adds (`units · keys · head_dim`), [`causal_rows`] stays on the
/// calling thread: a decode step of a small model is over before a second thread would start.
const ROWS_PAR_WORK: usize = 1 << 14;

/// Whether [`causal_rows`] has vector code for this CPU; without it the generated kernel runs.
pub fn rows_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Decode steps and short prompts: rows `r0..r1` of `q`/`out`, row `r` seeing cache rows
/// `0..=pos0 + r` (the kernel's contract, `pos0` possibly shifted below zero by compaction).
/// Per (row, span of heads): one dot product per key, the prefix softmax, then the weighted
/// sum of V rows, in 16-lane code. The generated kernel folds keys into an online softmax four
/// at a time in 4-lane vectors, a dependent chain: a d=256 decode step's attention took ~43 µs
/// on one thread (~4 GFLOP/s); here the scores are independent and only the max and the sum
/// are reductions (a `perf` profile of d=256 decode: ~25 % fewer attention samples).
///
/// # Safety
/// [`rows_supported`] is true; `q` and `out` hold rows `r0..r1`, the caches every row any of
/// them sees; `out` overlaps none of the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn causal_rows(
    q: *const f32,
    k: *const f32,
    v: *const f32,
    out: *mut f32,
    r0: usize,
    r1: usize,
    pos0: i64,
    s: Shape,
    threads: usize,
) {
    let group = s.heads / s.kv_heads.max(1);
    let (qrow, kvrow) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let rows = r1 - r0;
    let keys = |r: usize| (pos0 + r as i64 + 1).max(0) as usize;
    let work = (rows * s.heads)
        .saturating_mul(keys(r1.saturating_sub(1)))
        .saturating_mul(s.head_dim);
    let parallel = threads > 1 && rows * s.heads > 1 && work >= ROWS_PAR_WORK;
    // Units are (row, span of heads); a single decode row splits its heads over the threads.
    let spans = if parallel && rows < threads {
        threads.min(s.heads)
    } else {
        1
    };
    let units = rows * spans;
    let (q, k, v, out) = (q as usize, k as usize, v as usize, out as usize);
    let run = move |u0: usize, u1: usize| {
        SCORES.with_borrow_mut(|sc| {
            for u in u0..u1 {
                let (r, span) = (r0 + u / spans, u % spans);
                let (h0, h1) = (span * s.heads / spans, (span + 1) * s.heads / spans);
                let n = keys(r);
                if sc.len() < n {
                    sc.resize(n, 0.0);
                }
                // SAFETY: per the caller; units write disjoint (row, heads) slices of out.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    x86::heads_row(
                        (q as *const f32).add(r * qrow),
                        k as *const f32,
                        v as *const f32,
                        (out as *mut f32).add(r * qrow),
                        &mut sc[..n],
                        n,
                        (h0, h1, group),
                        s.head_dim,
                        kvrow,
                        s.scale,
                    )
                };
            }
        })
    };
    if parallel {
        // Equal contiguous shares: the units of one call differ by at most `rows` keys.
        let per = units.div_ceil(threads);
        crate::par::for_each(units.div_ceil(per), |c| {
            run(c * per, ((c + 1) * per).min(units))
        });
    } else {
        run(0, units);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Lanes of chunk `c` (of 16) of a head of `hd`.
    #[inline(always)]
    fn mask(hd: usize, c: usize) -> __mmask16 {
        let w = hd.saturating_sub(16 * c).min(16);
        ((1u32 << w) - 1) as __mmask16
    }

    /// Heads `h0..h1` of one row: `out_h = softmax(scale · q_h·Kᵀ)·V` over the first `n` cache
    /// rows, query head `h` on kv head `h / group`, K and V rows `kvrow` apart; `sc` holds `n`
    /// floats. One head at a time, its query and its output in registers: the scores four keys
    /// at a time with one shared shuffle reduction, the prefix softmax, then the weighted V
    /// rows. The first version reduced every score on its own and added each V row into `out`
    /// in memory, a store-to-load chain per key: d=256 decode spent 13 % of its samples here,
    /// at half the GEMV's bandwidth. (Keys-outer over all heads measured the
    /// same as heads-outer at d=1024: both are bound by the KV stream. So did keys-outer over
    /// groups of up to four heads with the cache on huge pages, at d=256 and 160 or 1040
    /// positions and at d=1024.)
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn heads_row(
        q: *const f32,
        k: *const f32,
        v: *const f32,
        out: *mut f32,
        sc: &mut [f32],
        n: usize,
        (h0, h1, group): (usize, usize, usize),
        hd: usize,
        kvrow: usize,
        scale: f32,
    ) {
        for h in h0..h1 {
            let (qh, oh) = (q.add(h * hd), out.add(h * hd));
            let (kh, vh) = (k.add(h / group * hd), v.add(h / group * hd));
            macro_rules! go {
                ($($c:literal),*) => {
                    match hd.div_ceil(16) {
                        $($c => head::<$c>(qh, kh, vh, oh, sc, n, hd, kvrow, scale),)*
                        _ => head_wide(qh, kh, vh, oh, sc, n, hd, kvrow, scale),
                    }
                };
            }
            go!(1, 2, 3, 4, 5, 6, 7, 8);
        }
    }

    /// How many keys ahead [`head`] prefetches K and V rows.
    const AHEAD: usize = 16;

    /// One head of [`heads_row`] with `C` chunks of 16 lanes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn head<const C: usize>(
        q: *const f32,
        k: *const f32,
        v: *const f32,
        out: *mut f32,
        sc: &mut [f32],
        n: usize,
        hd: usize,
        kvrow: usize,
        scale: f32,
    ) {
        let mut qv = [_mm512_setzero_ps(); C];
        for (c, x) in qv.iter_mut().enumerate() {
            *x = _mm512_maskz_loadu_ps(mask(hd, c), q.add(16 * c));
        }
        let sp = sc.as_mut_ptr();
        // Per key the sum over chunks alternates two accumulators and the lanes are summed in
        // `_mm512_reduce_add_ps`'s order (`reduce4_ordered`): the same bits as one key at a
        // time, so the bf16 parity fixture (which a flipped bf16 rounding downstream would
        // miss by ~0.02) sees no change of summation order.
        let score = |kr: *const f32| {
            let (mut a, mut b) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut c = 0;
            while c + 2 <= C {
                a = _mm512_fmadd_ps(qv[c], _mm512_maskz_loadu_ps(mask(hd, c), kr.add(16 * c)), a);
                let m1 = mask(hd, c + 1);
                b = _mm512_fmadd_ps(qv[c + 1], _mm512_maskz_loadu_ps(m1, kr.add(16 * c + 16)), b);
                c += 2;
            }
            if c < C {
                a = _mm512_fmadd_ps(qv[c], _mm512_maskz_loadu_ps(mask(hd, c), kr.add(16 * c)), a);
            }
            _mm512_add_ps(a, b)
        };
        // Key rows are `kvrow` apart (a 4 KiB page each at d = 1024), too far for the hardware
        // prefetchers to follow: fetch the rows `AHEAD` keys on while these are summed. At
        // d = 256 (bf16 decode, 128–192 positions) attention went from 87–115 to 84–99 ms of
        // `--profile`'s time over three alternating rounds; 8, 32 or 64 keys ahead, or V fetched
        // during the scores too, measured the same.
        let fetch = |base: *const f32, j: usize| {
            if j < n {
                for c in 0..C {
                    _mm_prefetch::<_MM_HINT_T0>(base.add(j * kvrow + 16 * c) as *const i8);
                }
            }
        };

        for j in 0..AHEAD.min(n) {
            fetch(k, j);
        }
        let mut j = 0;
        while j + 4 <= n {
            for d in 0..4 {
                fetch(k, j + AHEAD + d);
            }
            let t = [
                score(k.add(j * kvrow)),
                score(k.add((j + 1) * kvrow)),
                score(k.add((j + 2) * kvrow)),
                score(k.add((j + 3) * kvrow)),
            ];
            _mm_storeu_ps(sp.add(j), reduce4_ordered(t[0], t[1], t[2], t[3]));
            j += 4;
        }
        while j < n {
            *sp.add(j) = _mm512_reduce_add_ps(score(k.add(j * kvrow)));
            j += 1;
        }
        super::softmax_lanes(&mut sc[..n], scale);
        // The weighted V rows in registers, keys in order (the order of the sum through `out`).
        let mut acc = [_mm512_setzero_ps(); C];
        for j in 0..AHEAD.min(n) {
            fetch(v, j);
        }
        for j in 0..n {
            fetch(v, j + AHEAD);
            let (p, vr) = (_mm512_set1_ps(*sp.add(j)), v.add(j * kvrow));
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask(hd, c), vr.add(16 * c)), p, *a);
            }
        }
        for (c, &a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(16 * c), mask(hd, c), a);
        }
    }

    /// The lane sums of four vectors as one 4-lane vector, each summed in the order of
    /// `_mm512_reduce_add_ps` (LLVM halves the vector: lanes `i + 8`, then `i + 4`, `i + 2`,
    /// `i + 1`), with the shuffles shared by the four.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn reduce4_ordered(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
        // Lanes 0..8: a_i + a_{i+8}; lanes 8..16: b_i + b_{i+8} (and c, d in `y`).
        let x = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
        );
        let y = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(c, d),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(c, d),
        );
        // 128-bit block q: (i + 4) sums of a, b, c, d.
        let z = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
        );
        let z = _mm512_add_ps(z, _mm512_permute_ps::<0b01_00_11_10>(z));
        let z = _mm512_add_ps(z, _mm512_permute_ps::<0b10_11_00_01>(z));
        _mm512_castps512_ps128(_mm512_permutexvar_ps(
            _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0),
            z,
        ))
    }

    /// One head wider than 128: per key, then the weighted sum through `out`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn head_wide(
        q: *const f32,
        k: *const f32,
        v: *const f32,
        out: *mut f32,
        sc: &mut [f32],
        n: usize,
        hd: usize,
        kvrow: usize,
        scale: f32,
    ) {
        let chunks = hd.div_ceil(16);
        for (j, s) in sc[..n].iter_mut().enumerate() {
            let kr = k.add(j * kvrow);
            let mut a = _mm512_setzero_ps();
            for c in 0..chunks {
                let m = mask(hd, c);
                a = _mm512_fmadd_ps(
                    _mm512_maskz_loadu_ps(m, q.add(16 * c)),
                    _mm512_maskz_loadu_ps(m, kr.add(16 * c)),
                    a,
                );
            }
            *s = _mm512_reduce_add_ps(a);
        }
        super::softmax_lanes(&mut sc[..n], scale);
        for c in 0..chunks {
            _mm512_mask_storeu_ps(out.add(16 * c), mask(hd, c), _mm512_setzero_ps());
        }
        for (j, &p) in sc[..n].iter().enumerate() {
            let (p, vr) = (_mm512_set1_ps(p), v.add(j * kvrow));
            for c in 0..chunks {
                let m = mask(hd, c);
                let o = _mm512_maskz_loadu_ps(m, out.add(16 * c));
                let x = _mm512_maskz_loadu_ps(m, vr.add(16 * c));
                _mm512_mask_storeu_ps(out.add(16 * c), m, _mm512_fmadd_ps(x, p, o));
            }
        }
    }
}

/// `x ← softmax(scale · x)` in place, with the kernels' `exp`: vector code for the widest
/// instructions this CPU has (the reductions run in 16 lanes, so nothing is left scalar).
fn softmax_prefix(x: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            return unsafe { softmax_avx512(x, scale) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { softmax_avx2(x, scale) };
        }
    }
    softmax_lanes(x, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(x: &mut [f32], scale: f32) {
    softmax_lanes(x, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(x: &mut [f32], scale: f32) {
    softmax_lanes(x, scale)
}

#[inline(always)]
fn softmax_lanes(x: &mut [f32], scale: f32) {
    // Whole blocks of 16 as fixed-size arrays, so each pass is straight 16-lane code (a plain
    // loop over the slice vectorized to 8 lanes with a scalar tail), and the exponentials and
    // their sum in one pass.
    let mut mx = [f32::MIN; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        let c: &[f32; 16] = c.try_into().expect("16 floats");
        for (m, v) in mx.iter_mut().zip(c) {
            *m = m.max(*v);
        }
    }
    let mx = it
        .remainder()
        .iter()
        .chain(&mx)
        .fold(f32::MIN, |a, &b| a.max(b))
        * scale;
    let mut sum = [0f32; 16];
    let mut it = x.chunks_exact_mut(16);
    for c in &mut it {
        let c: &mut [f32; 16] = c.try_into().expect("16 floats");
        for (e, a) in c.iter_mut().zip(sum.iter_mut()) {
            *e = exp_f32(*e * scale - mx);
            *a += *e;
        }
    }
    let mut tail = 0f32;
    for e in it.into_remainder() {
        *e = exp_f32(*e * scale - mx);
        tail += *e;
    }
    let inv = 1.0 / (sum.iter().sum::<f32>() + tail);
    let mut it = x.chunks_exact_mut(16);
    for c in &mut it {
        let c: &mut [f32; 16] = c.try_into().expect("16 floats");
        for e in c.iter_mut() {
            *e *= inv;
        }
    }
    for e in it.into_remainder() {
        *e *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;

    /// The definition in f64.
    fn reference(q: &[f32], k: &[f32], v: &[f32], rows: usize, pos0: usize, s: Shape) -> Vec<f32> {
        reference_from(q, k, v, 0, rows, pos0 as i64, s)
    }

    /// Rows `r0..r1` (others left 0), row `r` seeing keys `0..=pos0 + r`.
    fn reference_from(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        r0: usize,
        r1: usize,
        pos0: i64,
        s: Shape,
    ) -> Vec<f32> {
        let rows = q.len() / (s.heads * s.head_dim);
        let (hd, group) = (s.head_dim, s.heads / s.kv_heads);
        let (qrow, kvrow) = (s.heads * hd, s.kv_heads * hd);
        let mut out = vec![0f32; rows * qrow];
        for r in r0..r1 {
            for h in 0..s.heads {
                let g = h / group;
                let n = (pos0 + r as i64 + 1) as usize;
                let sc: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..hd)
                            .map(|d| {
                                q[r * qrow + h * hd + d] as f64 * k[j * kvrow + g * hd + d] as f64
                            })
                            .sum::<f64>()
                            * s.scale as f64
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                let p: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = p.iter().sum();
                for d in 0..hd {
                    let o: f64 = (0..n)
                        .map(|j| p[j] * v[j * kvrow + g * hd + d] as f64)
                        .sum();
                    out[r * qrow + h * hd + d] = (o / z) as f32;
                }
            }
        }
        out
    }

    /// Row counts around the block size, a chunk after earlier positions (`pos0 > 0`), grouped
    /// KV heads, head sizes that are not multiples of 16 (the `gemm` path) and that are (the
    /// register tiles on AVX-512), on one and two threads.
    #[test]
    fn matches_the_definition() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut seed = 7u64;
        for (rows, pos0, heads, kv_heads, head_dim) in [
            (32, 0, 2, 2, 16),
            (65, 0, 4, 2, 8),
            (130, 37, 3, 1, 20),
            (64, 200, 2, 1, 64),
            // Register tiles (head sizes of 16·c): row and column-chunk tails, GQA, pos0 > 0.
            (65, 0, 4, 2, 80),
            (130, 37, 3, 1, 32),
            (100, 5, 2, 2, 128),
            // Past `tiles::LONG` keys: key chunks with a running maximum, a chunk boundary
            // inside a row group, rows whose last chunk is partial.
            (70, 1100, 2, 1, 64),
            (9, 1530, 3, 3, 16),
        ] {
            let s = Shape {
                heads,
                kv_heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            };
            let n = pos0 + rows;
            let mut rand =
                |len: usize, a: f32| -> Vec<f32> { (0..len).map(|_| a * lcg(&mut seed)).collect() };
            let q = rand(rows * heads * head_dim, 4.0);
            let mut k = rand(n * kv_heads * head_dim, 4.0);
            if n > tiles::LONG {
                // Larger keys late in the row: the running maximum grows from chunk to chunk.
                for (j, row) in k.chunks_mut(kv_heads * head_dim).enumerate() {
                    let f = 1.0 + (j / 512) as f32 * 0.5;
                    row.iter_mut().for_each(|x| *x *= f);
                }
            }
            let v = rand(n * kv_heads * head_dim, 2.0);
            let want = reference(&q, &k, &v, rows, pos0, s);
            for threads in [1, 2] {
                let mut out = vec![f32::NAN; rows * heads * head_dim];
                pool.install(|| unsafe {
                    causal_gemm(
                        q.as_ptr(),
                        k.as_ptr(),
                        v.as_ptr(),
                        out.as_mut_ptr(),
                        rows,
                        pos0,
                        s,
                        threads,
                        None,
                    )
                });
                let worst = max_abs_diff(&out, &want);
                assert!(
                    worst <= 2e-6,
                    "rows={rows} pos0={pos0} heads={heads}/{kv_heads} hd={head_dim} threads={threads}: {worst:e}"
                );
            }
        }
    }

    /// The shared reduction of four score vectors gives `_mm512_reduce_add_ps`'s bits for
    /// each (values of mixed magnitudes, where the order of the sums shows).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn four_key_reduction_keeps_the_single_key_order() {
        use std::arch::x86_64::*;
        if !rows_supported() {
            return;
        }
        let mut seed = 11u64;
        for _ in 0..500 {
            let v: Vec<f32> = (0..64)
                .map(|i| lcg(&mut seed) * [1e-3f32, 1.0, 1e4][i % 3])
                .collect();
            // SAFETY: AVX-512F is present; `v` holds four vectors.
            unsafe {
                let l = |i: usize| _mm512_loadu_ps(v.as_ptr().add(16 * i));
                let mut got = [0f32; 4];
                _mm_storeu_ps(
                    got.as_mut_ptr(),
                    x86::reduce4_ordered(l(0), l(1), l(2), l(3)),
                );
                for (i, g) in got.iter().enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        _mm512_reduce_add_ps(l(i)).to_bits(),
                        "vector {i}"
                    );
                }
            }
        }
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    /// The decode path: single rows and short runs, a run whose positions are shifted below its
    /// row index (compacted rows), grouped KV heads, head sizes that leave partial 16-lane
    /// chunks and span several 64-wide passes, serial and split over two threads.
    #[test]
    fn rows_match_the_definition() {
        if !rows_supported() {
            eprintln!("no AVX-512: the generated kernel serves every attention call");
            return;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut seed = 11u64;
        for (r0, r1, pos0, heads, kv_heads, head_dim) in [
            (0, 1, 0, 1, 1, 16),
            (0, 1, 150, 16, 16, 64),
            (2, 5, 40, 4, 2, 20),
            (3, 7, -3, 3, 1, 80),
            (0, 8, 9, 2, 1, 128),
            (0, 2, 300, 4, 4, 7),
            // Wider than 8 chunks (the per-key path), and key counts around the blocks of 4.
            (0, 3, 5, 2, 2, 144),
            (0, 4, 2, 2, 1, 64),
        ] {
            let s = Shape {
                heads,
                kv_heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            };
            let keys = (pos0 + r1 as i64) as usize;
            let mut rand =
                |len: usize, a: f32| -> Vec<f32> { (0..len).map(|_| a * lcg(&mut seed)).collect() };
            let q = rand(r1 * heads * head_dim, 4.0);
            let k = rand(keys * kv_heads * head_dim, 4.0);
            let v = rand(keys * kv_heads * head_dim, 2.0);
            let want = reference_from(&q, &k, &v, r0, r1, pos0, s);
            for threads in [1, 2] {
                let mut out = vec![0f32; r1 * heads * head_dim];
                pool.install(|| unsafe {
                    causal_rows(
                        q.as_ptr(),
                        k.as_ptr(),
                        v.as_ptr(),
                        out.as_mut_ptr(),
                        r0,
                        r1,
                        pos0,
                        s,
                        threads,
                    )
                });
                let worst = max_abs_diff(&out, &want);
                assert!(
                    worst <= 2e-6,
                    "rows {r0}..{r1} pos0={pos0} heads={heads}/{kv_heads} hd={head_dim} threads={threads}: {worst:e}"
                );
            }
        }
    }
}

#[cfg(test)]
mod bench {
    use super::*;
    use crate::test_util::{lcg, pool};

    /// One layer's prefill attention of the d=1024 model (16 heads of 64, 128 to 4096 rows):
    /// `cargo test --release -p loopc-runtime bench_causal_gemm -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_causal_gemm() {
        let mut s = 5u64;
        let p = pool(2);
        let sh = Shape {
            heads: 16,
            kv_heads: 16,
            head_dim: 64,
            scale: 0.125,
        };
        for rows in [128usize, 512, 2048, 4096] {
            let w = sh.heads * sh.head_dim;
            let q: Vec<f32> = (0..rows * w).map(|_| lcg(&mut s)).collect();
            let k: Vec<f32> = (0..rows * w).map(|_| lcg(&mut s)).collect();
            let v: Vec<f32> = (0..rows * w).map(|_| lcg(&mut s)).collect();
            let mut o = vec![0f32; rows * w];
            let flops = 4.0 * (sh.heads * rows * rows / 2 * sh.head_dim) as f64;
            let mut best = f64::MAX;
            for _ in 0..20 {
                let t = std::time::Instant::now();
                p.install(|| unsafe {
                    causal_gemm(
                        q.as_ptr(),
                        k.as_ptr(),
                        v.as_ptr(),
                        o.as_mut_ptr(),
                        rows,
                        0,
                        sh,
                        2,
                        None,
                    )
                });
                best = best.min(t.elapsed().as_secs_f64());
            }
            eprintln!(
                "rows {rows}: {:.3} ms, {:.0} GFLOP/s (causal half)",
                best * 1e3,
                flops / best / 1e9
            );
        }
    }
}
