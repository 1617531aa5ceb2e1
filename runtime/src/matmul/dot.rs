//! `out[i, j] = Σ_k x[i, k] · w[j, k]` for prefill-sized `m` straight from the row-major
//! weight, with no packing of either operand (AVX-512).
//!
//! The `gemm` crate multiplies `x · wᵀ` by packing `wᵀ` into its panels on every call: at
//! m = 128 that repacks as many bytes as the product reads, and it reached 187–218 GFLOP/s on
//! two cores where MKL reached 278–288. Here the register block is 6 weight rows × 4 input
//! rows of 16-lane partial sums along `k` (24 accumulators, 10 loads per 24 FMAs), the 6
//! weight rows of one depth chunk stay in L1 while every input row passes, the inputs come
//! from L2, and each weight byte is read from memory once per call. The partial sums are
//! reduced across lanes four at a time by shuffles when a block's chunk ends.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Weight rows per register block.
const R: usize = 6;
/// Input rows per register block.
const G: usize = 4;
/// Most floats of depth per chunk: 6 weight rows of 1024 floats are 24 KiB of the 48 KiB L1.
const KC_MAX: usize = 1024;

/// Whether [`gemm_dot`] may run on this CPU.
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

/// The depth chunks of a product of depth `k`: equal lengths, multiples of 16 but the last.
fn chunk_len(k: usize) -> usize {
    let chunks = k.div_ceil(KC_MAX);
    k.div_ceil(chunks).next_multiple_of(16)
}

/// Whether a product of `m` rows and depth `k` runs here rather than in `gemm`: measured on
/// two cores (`bench_gemm_dot`, aligned operands, d=1024 shapes), this kernel ran 252–276
/// GFLOP/s at m = 128 where `gemm` ran 187–212, 239–267 against 131–160 at m = 64, and 3–10×
/// `gemm` at m = 16; the two were even at m = 256 and `gemm` led from m = 384 (its packed
/// panels of `x` stay in L2; these rows come from L3). Short depths (attention's head-sized
/// products) would spend too much in the lane sums. Past 128 rows a depth over one chunk
/// tips it too: at m = 256, k = 2816 `gemm` ran 269–304 where this ran 233–279.
pub(crate) fn wins(m: usize, k: usize) -> bool {
    (2..=MAX_M).contains(&m) && k >= 256 && (m <= 128 || k <= KC_MAX) && supported()
}

/// Most rows [`wins`] takes.
const MAX_M: usize = 256;

/// `out[i·ldo + j] = Σ_kk x[i·ldx + kk] · w[j·ldw + kk]` for `i < m`, `j < n`.
///
/// # Safety
/// [`supported`] returned true; `x` covers `m` rows of `k` floats at stride `ldx`, `w` `n`
/// rows at stride `ldw`; `out` covers the `m × n` block at row stride `ldo ≥ n`, and no other
/// thread touches it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_dot(
    m: usize,
    n: usize,
    k: usize,
    x: *const f32,
    ldx: usize,
    w: *const f32,
    ldw: usize,
    out: *mut f32,
    ldo: usize,
) {
    if k == 0 {
        for i in 0..m {
            std::ptr::write_bytes(out.add(i * ldo), 0, n);
        }
        return;
    }
    let kc = chunk_len(k);
    let mut k0 = 0;
    while k0 < k {
        let len = kc.min(k - k0);
        let acc = k0 > 0;
        let mut j = 0;
        while j < n {
            let rows = R.min(n - j);
            let wj = w.add(j * ldw + k0);
            let next = next_panel(n, k, kc, j + rows, k0, len);
            let blocks = m.div_ceil(G);
            let mut fetched = 0;
            let mut i = 0;
            while i < m {
                if let Some((nj, nk0, nlen)) = next {
                    // Spread the next panel's loads over this panel's row blocks: it comes
                    // from memory, and the hardware prefetchers stop at the panel's end, so
                    // each panel's first block waited on it. Worth 6–8 % of f32 prefill-128
                    // (245–249 against 226–235 tok/s, alternating). Into L2, not L1: two
                    // panels and the input rows overflow L1 (T0 took one core from 152 to
                    // 135 GFLOP/s at n = 768).
                    let per_row = nlen.div_ceil(16);
                    let lines = R.min(n - nj) * per_row;
                    let until = lines * (i / G + 1) / blocks;
                    while fetched < until {
                        let (r, c) = (fetched / per_row, fetched % per_row);
                        _mm_prefetch::<_MM_HINT_T1>(
                            w.add((nj + r) * ldw + nk0 + c * 16) as *const i8
                        );
                        fetched += 1;
                    }
                }
                let ins = G.min(m - i);
                let xi = x.add(i * ldx + k0);
                let o = out.add(i * ldo + j);
                macro_rules! go {
                    ($($r:literal),*) => {
                        match (rows, ins) {
                            $(
                                ($r, 4) => block::<$r, 4>(xi, ldx, wj, ldw, len, o, ldo, acc),
                                ($r, 3) => block::<$r, 3>(xi, ldx, wj, ldw, len, o, ldo, acc),
                                ($r, 2) => block::<$r, 2>(xi, ldx, wj, ldw, len, o, ldo, acc),
                                ($r, 1) => block::<$r, 1>(xi, ldx, wj, ldw, len, o, ldo, acc),
                            )*
                            _ => unreachable!("block {rows}×{ins}"),
                        }
                    };
                }
                go!(6, 5, 4, 3, 2, 1);
                i += ins;
            }
            j += rows;
        }
        k0 += len;
    }
}

/// The panel after the one at columns `..j_next` of the chunk `k0..k0 + len`: `(first
/// column, chunk start, chunk length)`, or `None` after the last.
fn next_panel(
    n: usize,
    k: usize,
    kc: usize,
    j_next: usize,
    k0: usize,
    len: usize,
) -> Option<(usize, usize, usize)> {
    if j_next < n {
        Some((j_next, k0, len))
    } else if k0 + len < k {
        Some((0, k0 + len, kc.min(k - k0 - len)))
    } else {
        None
    }
}

/// One `RR × GG` register block over `len` floats of depth: weight rows at `w + r·ldw`, input
/// rows at `x + q·ldx`, sums stored to (or, with `acc`, added to) `out[q·ldo + r]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const RR: usize, const GG: usize>(
    x: *const f32,
    ldx: usize,
    w: *const f32,
    ldw: usize,
    len: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    let mut a = [[_mm512_setzero_ps(); GG]; RR];
    let full = len / 16 * 16;
    let mut p = 0;
    while p < full {
        let mut xs = [_mm512_setzero_ps(); GG];
        for (q, v) in xs.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(x.add(q * ldx + p));
        }
        for (r, ar) in a.iter_mut().enumerate() {
            let wv = _mm512_loadu_ps(w.add(r * ldw + p));
            for q in 0..GG {
                ar[q] = _mm512_fmadd_ps(wv, xs[q], ar[q]);
            }
        }
        p += 16;
    }
    if p < len {
        let mask = ((1u32 << (len - p)) - 1) as __mmask16;
        let mut xs = [_mm512_setzero_ps(); GG];
        for (q, v) in xs.iter_mut().enumerate() {
            *v = _mm512_maskz_loadu_ps(mask, x.add(q * ldx + p));
        }
        for (r, ar) in a.iter_mut().enumerate() {
            let wv = _mm512_maskz_loadu_ps(mask, w.add(r * ldw + p));
            for q in 0..GG {
                ar[q] = _mm512_fmadd_ps(wv, xs[q], ar[q]);
            }
        }
    }
    for (r, ar) in a.iter().enumerate() {
        let sums: [f32; GG] = if GG == 4 {
            let mut s = [0f32; GG];
            _mm_storeu_ps(
                s.as_mut_ptr(),
                reduce4(ar[0], ar[1 % GG], ar[2 % GG], ar[3 % GG]),
            );
            s
        } else {
            let mut s = [0f32; GG];
            for q in 0..GG {
                s[q] = _mm512_reduce_add_ps(ar[q]);
            }
            s
        };
        for (q, &s) in sums.iter().enumerate() {
            let o = out.add(q * ldo + r);
            *o = if acc { *o + s } else { s };
        }
    }
}

/// The lane sums of four vectors, as one 4-lane vector. (`attention`'s `reduce4_ordered`
/// sums in `_mm512_reduce_add_ps`'s order instead; used here it took this kernel from ~320
/// to ~108 GFLOP/s at m = 128, so the two stay apart.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn reduce4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then [Σa, Σb, Σc, Σd] of the lane.
    let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    let s = _mm512_add_ps(
        _mm512_shuffle_ps::<0b01_00_01_00>(ab, cd),
        _mm512_shuffle_ps::<0b11_10_11_10>(ab, cd),
    );
    // The four 128-bit lanes.
    // (`extractf64x4` is AVX-512F; the f32x8 form would need DQ, and an intrinsic this
    // function cannot inline becomes a call that spills every accumulator.)
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)));
    let h = _mm256_add_ps(_mm512_castps512_ps256(s), hi);
    _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;

    /// Every block shape and tail (rows of 6 and 4, depth chunks, a masked depth tail),
    /// summing into a wider output, against f64 sums.
    #[test]
    fn matches_f64_sums() {
        if !supported() {
            eprintln!("no AVX-512F: the dot GEMM is not used on this CPU");
            return;
        }
        let mut s = 17u64;
        for &(m, n, k) in &[
            (1usize, 1usize, 1usize),
            (4, 6, 16),
            (5, 7, 17),
            (9, 13, 100),
            (13, 25, 2100),
            (8, 12, 1024),
            (3, 2, 0),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let ldo = n + 3;
            let mut out = vec![f32::NAN; m * ldo];
            // SAFETY: the feature is present; the buffers have the sizes the call reads.
            unsafe { gemm_dot(m, n, k, x.as_ptr(), k, w.as_ptr(), k, out.as_mut_ptr(), ldo) };
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                        .sum();
                    let got = out[i * ldo + j];
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * (k as f64).sqrt().max(1.0),
                        "({m},{n},{k}) [{i},{j}]: {got} vs {want}"
                    );
                }
                assert!(out[i * ldo + n..(i + 1) * ldo].iter().all(|v| v.is_nan()));
            }
        }
    }
}

#[cfg(test)]
mod bench {
    use super::*;
    use crate::test_util::{lcg, pool};

    /// This kernel beside the `gemm` crate, each on one thread per half of the columns:
    /// `cargo test --release -p loopc-runtime bench_gemm_dot -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_gemm_dot() {
        let mut s = 3u64;
        let p = pool(2);
        for &m in &[16usize, 64, 128, 256, 384, 512] {
            for &(k, n) in &[
                (1024usize, 3072usize),
                (1024, 1024),
                (1024, 5632),
                (2816, 1024),
            ] {
                // 64-byte aligned operands, as the runtime's arena and weights are.
                let xv: Vec<f32> = (0..m * k + 16).map(|_| lcg(&mut s)).collect();
                let wv: Vec<f32> = (0..n * k + 16).map(|_| lcg(&mut s)).collect();
                let x = &xv[xv.as_ptr().align_offset(64)..];
                let w = &wv[wv.as_ptr().align_offset(64)..];
                let mut o = vec![0f32; m * n];
                let (xp, wp, op) = (
                    x.as_ptr() as usize,
                    w.as_ptr() as usize,
                    o.as_mut_ptr() as usize,
                );
                let half = n / 2;
                let mut line = format!("m={m} k={k} n={n}:");
                for dot in [false, true, false, true] {
                    let mut best = f64::MAX;
                    for _ in 0..5 {
                        let t = std::time::Instant::now();
                        p.install(|| {
                            crate::par::for_each(2, |c| {
                                let j0 = c * half;
                                // SAFETY: each task its own columns of the product.
                                unsafe {
                                    let (x, w, o) = (
                                        xp as *const f32,
                                        (wp as *const f32).add(j0 * k),
                                        (op as *mut f32).add(j0),
                                    );
                                    if dot {
                                        gemm_dot(m, half, k, x, k, w, k, o, n);
                                    } else {
                                        gemm::gemm(
                                            m,
                                            half,
                                            k,
                                            o,
                                            1,
                                            n as isize,
                                            false,
                                            x,
                                            1,
                                            k as isize,
                                            w,
                                            k as isize,
                                            1,
                                            0.0f32,
                                            1.0f32,
                                            false,
                                            false,
                                            false,
                                            gemm::Parallelism::None,
                                        );
                                    }
                                }
                            })
                        });
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    let gf = 2.0 * (m * n * k) as f64 / best / 1e9;
                    line += &format!(" {}={gf:.0}", if dot { "dot" } else { "gemm" });
                }
                eprintln!("{line} GFLOP/s");
            }
        }
    }
}
