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
use rayon::prelude::*;
use std::cell::RefCell;

/// Query rows per work unit: `S` for one unit is `ROWS × keys` floats (128 KiB at 512 keys).
const ROWS: usize = 64;

/// Prefill chunks of at least this many rows go through [`causal_gemm`].
pub(crate) const MIN_ROWS: usize = 32;

thread_local! {
    /// A thread's `S`/`P` block.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
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
        (0..units).into_par_iter().for_each(unit);
    } else {
        (0..units).for_each(unit);
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
    let mut mx = [f32::MIN; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
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
    for e in x.iter_mut() {
        *e = exp_f32(*e * scale - mx);
    }
    let mut sum = [0f32; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        for (a, v) in sum.iter_mut().zip(c) {
            *a += v;
        }
    }
    let inv = 1.0 / (sum.iter().sum::<f32>() + it.remainder().iter().sum::<f32>());
    for e in x.iter_mut() {
        *e *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;

    /// The definition in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(q: &[f32], k: &[f32], v: &[f32], rows: usize, pos0: usize, s: Shape) -> Vec<f32> {
        let (hd, group) = (s.head_dim, s.heads / s.kv_heads);
        let (qrow, kvrow) = (s.heads * hd, s.kv_heads * hd);
        let mut out = vec![0f32; rows * qrow];
        for r in 0..rows {
            for h in 0..s.heads {
                let g = h / group;
                let n = pos0 + r + 1;
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
    /// KV heads and a head size that is not a multiple of 16, on one and two threads.
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
            let k = rand(n * kv_heads * head_dim, 4.0);
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
                let worst = out
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst <= 2e-6,
                    "rows={rows} pos0={pos0} heads={heads}/{kv_heads} hd={head_dim} threads={threads}: {worst:e}"
                );
            }
        }
    }
}
