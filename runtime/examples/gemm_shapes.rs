//! GFLOP/s of the runtime's matmul on the shapes of a d=1024 Huginn-style model, for judging
//! how far prefill is from this machine's GEMM ceiling.
//!     cargo run --release -p loopc-runtime --example gemm_shapes [threads]
use loopc_runtime::matmul::matmul;
use std::time::Instant;

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    for &(m, k, n) in &[
        (128, 1024, 1024),
        (128, 1024, 3072),
        (128, 1024, 5632),
        (128, 2816, 1024),
        (128, 2048, 1024),
        (512, 1024, 1024),
        (1024, 1024, 1024),
        (1, 1024, 5632),
    ] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.01).collect();
        let mut o = vec![0.0f32; m * n];
        pool.install(|| matmul(&x, &w, &mut o, m, k, n, threads));
        let reps = (2e10 / (2.0 * (m * n * k) as f64)).clamp(3.0, 2000.0) as usize;
        let t = Instant::now();
        for _ in 0..reps {
            pool.install(|| matmul(&x, &w, &mut o, m, k, n, threads));
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "m={m:5} k={k:5} n={n:5}: {:7.1} GFLOP/s ({:.3} ms)",
            2.0 * (m * n * k) as f64 / s / 1e9,
            s * 1e3
        );
    }
}
