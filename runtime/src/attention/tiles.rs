//! The prefill attention's products in register tiles (AVX-512), in place of two `gemm` calls per
//! (head, row block).
//!
//! A profile of one d=1024 layer at 512 rows (`bench_causal_gemm`) had `gemm`'s packing at 27 % of
//! the time, its microkernel at 35 % and the softmax at 17–26 %: `gemm` repacked each kv head's K
//! for every row block and the softmax made three passes. Here each kv head's Kᵀ (in 32-key tiles,
//! [`pack_kt`]) and V are packed once per call, `S = Q·Kᵀ` runs in 8-row × 32-key tiles (only the
//! key tiles a row group can see), one pass takes the maximum, another the exponentials and their
//! sum, and `E·V` runs in 6-row × 64-column tiles over the visible keys, then a pass scales it by
//! 1/sum into the output. The queries, Kᵀ and V are laid out so that no operand walks a
//! power-of-two stride (the cache's rows are 4 KiB apart at d=1024). Measured: 3.8–4.1 ms per
//! 512-row layer against 4.2–5.0 with `gemm`, and bf16 prefill-512 of the d=1024 model from 676–714
//! to 752–790 tok/s, alternating binaries in one run. Past [`LONG`] keys a unit walks the keys in
//! chunks with an online softmax ([`keys_in_chunks`]), so that its working set stays in L2.

use super::Shape;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Query rows per work unit (as the `gemm` path).
pub(super) const ROWS: usize = 64;

/// Whether the tiles run for this shape on this CPU.
pub(super) fn supported(s: &Shape) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        s.head_dim > 0
            && s.head_dim.is_multiple_of(16)
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = s;
        false
    }
}

/// Floats per row of the scores for `nk` keys (and `head_dim ·` this bounds the packed Kᵀ):
/// whole 32-key tiles plus one line, so that rows a power of two apart (2 KiB at 512 keys) do
/// not crowd a few L1 sets.
pub(super) fn padded(nk: usize) -> usize {
    nk.next_multiple_of(32) + 16
}

/// Kᵀ of kv head `g` into `dst` in 32-key tiles: tile `t` is `head_dim` rows of its 32 keys,
/// contiguous (`32 · head_dim` floats from `t · 32 · head_dim`), zero past `nk`. An S tile
/// then reads one contiguous 8 KiB block (at head size 64) where rows of the whole Kᵀ put each
/// of its 64 row pieces on its own page: a `perf` profile of a 4096-row layer had a quarter
/// of the attention's samples on that load.
///
/// # Safety
/// `k` holds `nk` rows of `kvrow` floats; `dst` holds `head_dim · nk.next_multiple_of(32)`.
pub(super) unsafe fn pack_kt(
    k: *const f32,
    kvrow: usize,
    g: usize,
    hd: usize,
    nk: usize,
    dst: *mut f32,
) {
    for j in 0..nk {
        let row = k.add(j * kvrow + g * hd);
        let tile = dst.add(j / 32 * 32 * hd + j % 32);
        for d in 0..hd {
            *tile.add(d * 32) = *row.add(d);
        }
    }
    let end = nk.next_multiple_of(32);
    if end > nk {
        let tile = dst.add(nk / 32 * 32 * hd);
        for d in 0..hd {
            std::ptr::write_bytes(tile.add(d * 32 + nk % 32), 0, end - nk);
        }
    }
}

/// V of kv head `g` into `dst` as `nk` contiguous rows of `head_dim`: in the cache its rows
/// lie a whole cache row apart (4 KiB at d=1024), so walking the keys touched one line per
/// page, in a handful of L1 sets, out of the prefetchers' reach.
///
/// # Safety
/// `v` holds `nk` rows of `kvrow` floats; `dst` holds `nk · head_dim`.
pub(super) unsafe fn pack_v(
    v: *const f32,
    kvrow: usize,
    g: usize,
    hd: usize,
    nk: usize,
    dst: *mut f32,
) {
    for j in 0..nk {
        std::ptr::copy_nonoverlapping(v.add(j * kvrow + g * hd), dst.add(j * hd), hd);
    }
}

/// One unit: rows `r0..r1` of query head `h`, given its kv head's packed Kᵀ ([`pack_kt`]'s
/// tiles) and V (`head_dim` wide), a scratch `sc` of `(r1 − r0) · nkp` floats, and `qb` and
/// `ob` of `(r1 − r0) · head_dim` each.
///
/// # Safety
/// [`supported`]; `q`/`out` hold rows `r0..r1` of `heads · head_dim`; `kt` covers the tiles
/// of `pos0 + r1` keys, `nkp ≥ padded(pos0 + r1)`, `v` `pos0 + r1` packed rows; this unit's
/// block of `out` is its own.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn unit(
    q: *const f32,
    kt: *const f32,
    nkp: usize,
    v: *const f32,
    out: *mut f32,
    h: usize,
    r0: usize,
    r1: usize,
    pos0: usize,
    s: Shape,
    sc: *mut f32,
    qb: *mut f32,
    ob: *mut f32,
) {
    let hd = s.head_dim;
    let qrow = s.heads * hd;
    let m = r1 - r0;
    let lim = |i: usize| pos0 + r0 + i + 1;
    let nk = lim(m - 1);
    // The block's queries side by side: in `q` their rows are a cache row apart too.
    for i in 0..m {
        std::ptr::copy_nonoverlapping(q.add((r0 + i) * qrow + h * hd), qb.add(i * hd), hd);
    }
    let chunk = if nk > LONG { KEY_CHUNK } else { nk };
    keys_in_chunks(qb, kt, nkp, v, out, h, r0, m, pos0, s, sc, ob, chunk);
}

/// Units that see more keys than this walk them in chunks of [`KEY_CHUNK`]; the others in one.
pub(super) const LONG: usize = 1024;

/// Keys per chunk past [`LONG`] (a multiple of the 32-key tiles): its scores, Kᵀ and V come to
/// 3 × 128 KiB at 64 rows and head size 64, which stay in L2.
const KEY_CHUNK: usize = 512;

/// A unit's products and softmax over its keys, `chunk` keys at a time with a running maximum
/// and sum per row (the online softmax of FlashAttention): the whole row of scores, Kᵀ and V
/// of a 4096-key unit were 1 MiB each, more than L2, and every 8-row group streamed Kᵀ again
/// from L3. Each chunk's exponentials take the row's maximum so far; the output so far and
/// the sum are rescaled by `exp(scale · (old max − new max))` when it grows. With one chunk
/// these are the operations of a plain softmax (max, exponentials and sum, E·V, times 1/sum).
/// `qb` holds the unit's queries side by side, `ob` `m · head_dim` floats of scratch.
///
/// # Safety
/// As [`unit`]; `chunk` is a multiple of 32 or at least the unit's keys.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn keys_in_chunks(
    qb: *const f32,
    kt: *const f32,
    nkp: usize,
    v: *const f32,
    out: *mut f32,
    h: usize,
    r0: usize,
    m: usize,
    pos0: usize,
    s: Shape,
    sc: *mut f32,
    ob: *mut f32,
    chunk: usize,
) {
    let hd = s.head_dim;
    let qrow = s.heads * hd;
    let lim = |i: usize| pos0 + r0 + i + 1;
    let nk = lim(m - 1);
    let mut mx = [f32::NEG_INFINITY; ROWS];
    let mut sum = [0f32; ROWS];
    let mut alpha = [0f32; ROWS];
    let mut c0 = 0;
    while c0 < nk {
        let c1 = (c0 + chunk).min(nk);
        // S over the chunk's key tiles that each 8-row group sees.
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(8);
            let seen = lim(i + rows - 1).min(c1);
            let qi = qb.add(i * hd);
            for t in c0 / 32..seen.div_ceil(32) {
                let (kt_t, s_t) = (kt.add(32 * hd * t), sc.add(i * nkp + 32 * t));
                macro_rules! go {
                    ($($r:literal),*) => {
                        match rows {
                            $($r => s_tile::<$r>(qi, hd, kt_t, hd, s_t, nkp),)*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(8, 7, 6, 5, 4, 3, 2, 1);
            }
            i += rows;
        }
        // Each row's exponentials against its maximum so far; zeros past its last key.
        for i in 0..m {
            let hi = lim(i).min(c1);
            let row = sc.add(i * nkp);
            if hi > c0 {
                let seen = std::slice::from_raw_parts_mut(row.add(c0), hi - c0);
                let top = mx[i].max(row_max(seen));
                alpha[i] = if c0 == 0 {
                    0.0
                } else {
                    crate::matmul::exp_f32(s.scale * (mx[i] - top))
                };
                mx[i] = top;
                sum[i] = sum[i] * alpha[i] + exp_below(seen, s.scale, top);
            } else {
                alpha[i] = 1.0;
            }
            let from = hi.max(c0);
            std::ptr::write_bytes(row.add(from), 0, c1 - from);
        }
        // O ← α·O + E·V over the chunk's keys, 6 rows at a time.
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(6);
            let keys = lim(i + rows - 1).min(c1).saturating_sub(c0);
            let mut c = 0;
            while keys > 0 && c < hd {
                let cols = ((hd - c) / 16).min(4);
                let (e, vc) = (sc.add(i * nkp + c0), v.add(c0 * hd + c));
                let (o, a) = (ob.add(i * hd + c), alpha.as_ptr().add(i));
                let first = c0 == 0;
                macro_rules! go {
                    ($($r:literal),*) => {
                        match (rows, cols) {
                            $(
                                ($r, 4) => acc_tile::<$r, 4>(e, nkp, vc, hd, keys, a, o, first),
                                ($r, 3) => acc_tile::<$r, 3>(e, nkp, vc, hd, keys, a, o, first),
                                ($r, 2) => acc_tile::<$r, 2>(e, nkp, vc, hd, keys, a, o, first),
                                ($r, 1) => acc_tile::<$r, 1>(e, nkp, vc, hd, keys, a, o, first),
                            )*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(6, 5, 4, 3, 2, 1);
                c += 16 * cols;
            }
            i += rows;
        }
        c0 = c1;
    }
    for (i, &z) in sum.iter().enumerate().take(m) {
        let f = _mm512_set1_ps(1.0 / z);
        let (src, dst) = (ob.add(i * hd), out.add((r0 + i) * qrow + h * hd));
        for c in (0..hd).step_by(16) {
            _mm512_storeu_ps(dst.add(c), _mm512_mul_ps(_mm512_loadu_ps(src.add(c)), f));
        }
    }
}

/// `acc[r, 0..16·C] ← α[r] · acc[r, ..] + Σ_{j < keys} e[r, j] · V[j, 0..16·C]` for `R` rows
/// (`acc` rows `vrow` apart; with `first`, the old `acc` is not read).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn acc_tile<const R: usize, const C: usize>(
    e: *const f32,
    nkp: usize,
    v: *const f32,
    vrow: usize,
    keys: usize,
    alpha: *const f32,
    acc: *mut f32,
    first: bool,
) {
    let mut a = [[_mm512_setzero_ps(); C]; R];
    if !first {
        for (r, ar) in a.iter_mut().enumerate() {
            let f = _mm512_set1_ps(*alpha.add(r));
            for (c, x) in ar.iter_mut().enumerate() {
                *x = _mm512_mul_ps(_mm512_loadu_ps(acc.add(r * vrow + 16 * c)), f);
            }
        }
    }
    for j in 0..keys {
        let mut vs = [_mm512_setzero_ps(); C];
        for (c, x) in vs.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(v.add(j * vrow + 16 * c));
        }
        for (r, ar) in a.iter_mut().enumerate() {
            let p = _mm512_set1_ps(*e.add(r * nkp + j));
            for c in 0..C {
                ar[c] = _mm512_fmadd_ps(p, vs[c], ar[c]);
            }
        }
    }
    for (r, ar) in a.iter().enumerate() {
        for (c, &x) in ar.iter().enumerate() {
            _mm512_storeu_ps(acc.add(r * vrow + 16 * c), x);
        }
    }
}

/// The largest element of a non-empty row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_max(x: &[f32]) -> f32 {
    let (n, p) = (x.len(), x.as_ptr());
    let full = n / 16 * 16;
    let mut mx = _mm512_set1_ps(f32::MIN);
    let mut i = 0;
    while i < full {
        mx = _mm512_max_ps(mx, _mm512_loadu_ps(p.add(i)));
        i += 16;
    }
    let tail = ((1u32 << (n - full)) - 1) as __mmask16;
    if tail != 0 {
        mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, p.add(i)));
    }
    _mm512_reduce_max_ps(mx)
}

/// `x ← exp(scale·x − scale·top)`; returns the sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_below(x: &mut [f32], scale: f32, top: f32) -> f32 {
    let (n, p) = (x.len(), x.as_mut_ptr());
    let full = n / 16 * 16;
    let tail = ((1u32 << (n - full)) - 1) as __mmask16;
    let (mx, sv) = (_mm512_set1_ps(top * scale), _mm512_set1_ps(scale));
    let mut sum = _mm512_setzero_ps();
    let mut i = 0;
    while i < full {
        let e = exp16(_mm512_sub_ps(
            _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), sv),
            mx,
        ));
        _mm512_storeu_ps(p.add(i), e);
        sum = _mm512_add_ps(sum, e);
        i += 16;
    }
    if tail != 0 {
        let e = exp16(_mm512_sub_ps(
            _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, p.add(i)), sv),
            mx,
        ));
        _mm512_mask_storeu_ps(p.add(i), tail, e);
        sum = _mm512_mask_add_ps(sum, tail, sum, e);
    }
    _mm512_reduce_add_ps(sum)
}

/// `S[r, 0..32] = Σ_d q[r, d] · Kᵀ[d, 0..32]` for `R` rows, from one packed Kᵀ tile (rows of
/// 32 keys) into rows of `S` `srow` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn s_tile<const R: usize>(
    q: *const f32,
    qrow: usize,
    kt: *const f32,
    hd: usize,
    s: *mut f32,
    srow: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for d in 0..hd {
        let b0 = _mm512_loadu_ps(kt.add(d * 32));
        let b1 = _mm512_loadu_ps(kt.add(d * 32 + 16));
        for (r, a) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*q.add(r * qrow + d));
            a[0] = _mm512_fmadd_ps(x, b0, a[0]);
            a[1] = _mm512_fmadd_ps(x, b1, a[1]);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(s.add(r * srow), a[0]);
        _mm512_storeu_ps(s.add(r * srow + 16), a[1]);
    }
}

/// `crate::matmul::exp_f32` in 16 lanes (the same operations, unfused, so the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::excessive_precision)]
unsafe fn exp16(x: __m512) -> __m512 {
    const MAGIC: f32 = 12_582_912.0;
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
        _mm512_set1_ps(88.0),
    );
    let magic = _mm512_set1_ps(MAGIC);
    let t = _mm512_add_ps(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        magic,
    );
    let n = _mm512_sub_ps(t, magic);
    let r = _mm512_add_ps(_mm512_mul_ps(n, _mm512_set1_ps(-0.693_359_375)), x);
    let r = _mm512_add_ps(_mm512_mul_ps(n, _mm512_set1_ps(2.121_944_4e-4)), r);
    let z = _mm512_mul_ps(r, r);
    let mut y = _mm512_set1_ps(1.987_569_15e-4);
    for c in [
        1.398_199_950_7e-3f32,
        8.333_451_907_3e-3,
        4.166_579_589_4e-2,
        1.666_666_545_9e-1,
        5.000_000_120_1e-1,
    ] {
        y = _mm512_add_ps(_mm512_mul_ps(y, r), _mm512_set1_ps(c));
    }
    let y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(y, z), r), _mm512_set1_ps(1.0));
    let e = _mm512_slli_epi32::<23>(_mm512_sub_epi32(
        _mm512_castps_si512(t),
        _mm512_set1_epi32(MAGIC.to_bits() as i32 - 127),
    ));
    _mm512_mul_ps(y, _mm512_castsi512_ps(e))
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The 16-lane `exp` gives the scalar one's bits over the clamped range and beyond it.
    #[test]
    fn exp16_matches_exp_f32_bitwise() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let xs: Vec<f32> = (0..4096).map(|i| -100.0 + i as f32 * 0.0477).collect();
        for c in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: the feature is present.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_loadu_ps(c.as_ptr()))) };
            for (g, &x) in got.iter().zip(c) {
                assert_eq!(g.to_bits(), crate::matmul::exp_f32(x).to_bits(), "x = {x}");
            }
        }
    }
}
