//! Helpers shared by the matmul kernels' unit tests.

/// A seeded value in [-0.5, 0.5).
pub fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

/// `x · wᵀ` (`x: [m, k]`, `w: [n, k]`) summed in f64 over `round`ed operands.
pub fn naive_with(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    round: impl Fn(f32) -> f32,
) -> Vec<f32> {
    let mut o = vec![0f32; m * n];
    for r in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|i| round(x[r * k + i]) as f64 * round(w[j * k + i]) as f64)
                .sum();
            o[r * n + j] = s as f32;
        }
    }
    o
}

/// `x · wᵀ` summed in f64.
pub fn naive(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    naive_with(x, w, m, k, n, |v| v)
}

pub fn pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
}
