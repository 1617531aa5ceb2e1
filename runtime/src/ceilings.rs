//! This machine's measured ceilings, for rooflines next to the model benchmarks (`loopc bench
//! --ceilings`, issue 9): GEMM GFLOP/s through the runtime's own [`crate::matmul::matmul`], GEMV
//! GB/s through its row-split [`crate::matmul::gemv`], the same two for bf16 weights
//! ([`crate::matmul_bf16`]), and memory read / copy bandwidth at
//! working sets that sit in L2, in L3 and in DRAM.
//!
//! Each figure is the best of several timed passes after a warm-up (a ceiling, not a median),
//! run on a rayon pool of `threads` workers, as the model's own kernels are.

use rayon::prelude::*;
use std::time::Instant;

use crate::mem::AVec;

/// GFLOP/s (`flops` per call) of `product(None)` and, with `host`, of `product(host)` on a pool
/// of `threads`: the best of 5 rounds that alternate the two, so both see the same machine.
fn alternate(
    threads: usize,
    host: Option<crate::matmul::HostGemm>,
    flops: f64,
    mut product: impl FnMut(Option<crate::matmul::HostGemm>) + Send,
) -> (f64, Option<f64>) {
    let p = pool(threads);
    let mut run = |h| p.install(|| best_time(3, 0.1, || product(h)));
    let (mut own, mut art) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..5 {
        own = own.min(run(None));
        if host.is_some() {
            art = art.min(run(host));
        }
    }
    (flops / own / 1e9, host.map(|_| flops / art / 1e9))
}

/// A rayon pool of `threads` workers (what `Model` runs on).
pub fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .expect("rayon pool")
}

/// Calls `f` once to warm up, then until `min_s` seconds have passed (at least `min_reps`
/// times); returns the fastest call in seconds.
fn best_time(min_reps: usize, min_s: f64, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut n = 0;
    while n < min_reps || start.elapsed().as_secs_f64() < min_s {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        n += 1;
    }
    best
}

/// `n` pseudo-random floats in the runtime's own storage (64-byte aligned; huge pages when
/// large), as its weights and activations are: from `Vec`'s 16-byte aligned blocks every
/// 64-byte load of the f32 GEMM spans two lines, which measured ~20 % lower on one core.
fn fill(n: usize, seed: u32) -> AVec {
    let mut v = zeroed(n);
    for (i, x) in v.as_mut_slice().iter_mut().enumerate() {
        *x = ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 20) as f32 / 4096.0 - 0.5;
    }
    v
}

/// `n` zeros in the runtime's storage.
fn zeroed(n: usize) -> AVec {
    AVec::zeroed(n, "a ceiling measurement's buffer")
        .unwrap_or_else(|e| panic!("out of memory for the ceilings: {e}"))
}

/// GFLOP/s (2·m·k·n per product) of `out[m, n] = x[m, k] · w[n, k]ᵀ` through the runtime's
/// `matmul` (the kernel every `Linear` of a prefill runs) on `threads` threads.
pub fn gemm_gflops(m: usize, k: usize, n: usize, threads: usize) -> f64 {
    gemm_pair_gflops(None, m, k, n, threads).0
}

/// [`gemm_gflops`] of the runtime's own GEMM and, with `host`, of an artifact's GEMM (the MLIR
/// backend's) on the same operands, timed in alternating rounds so both see the same machine.
pub fn gemm_pair_gflops(
    host: Option<crate::matmul::HostGemm>,
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) -> (f64, Option<f64>) {
    let (x, w) = (fill(m * k, 1), fill(n * k, 2));
    let (x, w) = (x.as_slice(), w.as_slice());
    // The runtime's own kernel is the one a model loaded here runs: on f32 panels where it
    // packs them (never beside an artifact GEMM; a malformed switch is the model load's error).
    let packed = (host.is_none() && crate::matmul::packed::enabled().unwrap_or(false))
        .then(|| crate::matmul::PackedF32::from_f32(w, n, k));
    let mut out = zeroed(m * n);
    let out = out.as_mut_slice();
    alternate(threads, host, 2.0 * (m * k * n) as f64, |h| match &packed {
        Some(p) => crate::matmul::matmul_packed_epi(x, p, out, m, threads, &Default::default()),
        None => crate::matmul::matmul_epi_on(h, x, w, out, m, k, n, threads, &Default::default()),
    })
}

/// GB/s of weight bytes streamed by the runtime's decode GEMV, `out[n] = w[n, k] · x[k]` (a
/// decode step's `Linear`; on f32 panels where a model would pack them), on `threads` threads. The weight (n·k·4 bytes) should be larger
/// than the last-level cache for a DRAM figure: 4096 × 4096 is 64 MiB.
pub fn gemv_gbs(n: usize, k: usize, threads: usize) -> f64 {
    let (x, w) = (fill(k, 3), fill(n * k, 4));
    let (x, w) = (x.as_slice(), w.as_slice());
    let packed = crate::matmul::packed::enabled()
        .unwrap_or(false)
        .then(|| crate::matmul::PackedF32::from_f32(w, n, k));
    let mut out = zeroed(n);
    let out = out.as_mut_slice();
    let p = pool(threads);
    let s = p.install(|| {
        best_time(5, 0.5, || match &packed {
            Some(pw) => {
                crate::matmul::matmul_packed_epi(x, pw, out, 1, threads, &Default::default())
            }
            None => crate::matmul::gemv(x, w, out, threads),
        })
    });
    (n * k * 4) as f64 / s / 1e9
}

/// [`gemm_gflops`] with the weight in bf16 through [`crate::matmul_bf16`] (AMX where present).
pub fn gemm_bf16_gflops(m: usize, k: usize, n: usize, threads: usize) -> f64 {
    gemm_bf16_pair_gflops(None, m, k, n, threads).0
}

/// [`gemm_bf16_gflops`] and, with `host` (an artifact's AMX GEMM), the same products through
/// it, alternating as [`gemm_pair_gflops`].
pub fn gemm_bf16_pair_gflops(
    host: Option<crate::matmul::HostGemm>,
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) -> (f64, Option<f64>) {
    let host = host.filter(|h| h.bf16_amx.is_some());
    let (x, w) = (fill(m * k, 1), fill(n * k, 2));
    let w = crate::bf16::Packed::from_f32(w.as_slice(), n, k);
    let x = x.as_slice();
    let mut out = zeroed(m * n);
    let out = out.as_mut_slice();
    alternate(threads, host, 2.0 * (m * k * n) as f64, |h| {
        crate::matmul_bf16::matmul_bf16_epi_on(h, x, &w, out, m, threads, &Default::default())
    })
}

/// [`gemv_gbs`] for a bf16 weight (n·k·2 bytes streamed per call) through the decode kernel
/// of [`crate::matmul_bf16`].
pub fn gemv_bf16_gbs(n: usize, k: usize, threads: usize) -> f64 {
    let (x, w) = (fill(k, 3), fill(n * k, 4));
    let w = crate::bf16::Packed::from_f32(w.as_slice(), n, k);
    let x = x.as_slice();
    let mut out = zeroed(n);
    let out = out.as_mut_slice();
    let p = pool(threads);
    let s = p.install(|| {
        best_time(5, 0.5, || {
            crate::matmul_bf16::matmul_bf16(x, &w, out, 1, threads)
        })
    });
    (n * k * 2) as f64 / s / 1e9
}

#[inline(always)]
fn sum_lanes(v: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let mut it = v.chunks_exact(32);
    for c in &mut it {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_avx2(v: &[f32]) -> f32 {
    sum_lanes(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(v: &[f32]) -> f32 {
    sum_lanes(v)
}

/// Σ v, vectorized with the widest instructions this CPU has (a read-only stream).
fn read_sum(v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            return unsafe { sum_avx512(v) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { sum_avx2(v) };
        }
    }
    sum_lanes(v)
}

/// Read bandwidth in GB/s: the sum of a `bytes`-sized f32 buffer, split in equal parts over
/// `threads` threads (what a GEMV's weight stream can reach at best).
pub fn read_gbs(bytes: usize, threads: usize) -> f64 {
    let v = fill(bytes / 4, 5);
    let v = v.as_slice();
    let p = pool(threads);
    let part = v.len().div_ceil(threads.max(1));
    let mut sink = 0f32;
    let s = p.install(|| {
        best_time(5, 0.3, || {
            sink += v.par_chunks(part).map(read_sum).sum::<f32>();
        })
    });
    std::hint::black_box(sink);
    bytes as f64 / s / 1e9
}

/// Copy bandwidth in GB/s over a working set of `bytes` (half source, half destination), split
/// over `threads` threads; bytes moved = read + written = `bytes` per pass (STREAM's count).
pub fn copy_gbs(bytes: usize, threads: usize) -> f64 {
    let half = bytes / 8;
    let src = fill(half, 6);
    let src = src.as_slice();
    let mut dst = zeroed(half);
    let dst = dst.as_mut_slice();
    let p = pool(threads);
    let part = half.div_ceil(threads.max(1));
    let s = p.install(|| {
        best_time(5, 0.3, || {
            dst.par_chunks_mut(part)
                .zip(src.par_chunks(part))
                .for_each(|(d, s)| d.copy_from_slice(s));
        })
    });
    std::hint::black_box(&*dst);
    (2 * half * 4) as f64 / s / 1e9
}

#[cfg(test)]
mod tests {
    #[test]
    fn ceilings_run_and_are_positive() {
        assert!(super::gemm_gflops(16, 32, 48, 2) > 0.0);
        assert!(super::gemv_gbs(64, 32, 2) > 0.0);
        assert!(super::gemm_bf16_gflops(40, 32, 48, 2) > 0.0);
        assert!(super::gemv_bf16_gbs(64, 32, 2) > 0.0);
        assert!(super::read_gbs(1 << 16, 2) > 0.0);
        assert!(super::copy_gbs(1 << 16, 2) > 0.0);
        assert_eq!(super::read_sum(&[1.0; 37]), 37.0);
    }
}
