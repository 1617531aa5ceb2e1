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

/// `v[r, :]` (`[m, n]`, f64) with each head of `head_dim` columns rotated at position `pos[r]`
/// from the runtime's own `cos`/`sin` tables: the `Rope`/`RopeBias` kernels' maths in f64.
pub fn rope_rows(
    v: &mut [f64],
    n: usize,
    head_dim: usize,
    style: crate::artifact::RopeStyle,
    pos: &[usize],
    cos: &[f32],
    sin: &[f32],
) {
    let half = head_dim / 2;
    for (r, row) in v.chunks_mut(n).enumerate() {
        let p = pos[r];
        for h in row.chunks_mut(head_dim) {
            for i in 0..half {
                let (c, s) = (cos[p * half + i] as f64, sin[p * half + i] as f64);
                let (ia, ib) = match style {
                    crate::artifact::RopeStyle::Half => (i, i + half),
                    crate::artifact::RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                };
                let (a, b) = (h[ia], h[ib]);
                h[ia] = a * c - b * s;
                h[ib] = b * c + a * s;
            }
        }
    }
}

/// Row positions for rotary tests: in order from `pos0` (`None`), or scattered and repeating
/// as in a batch of sequences with per-row exits.
pub fn test_positions(m: usize, pos0: Option<usize>) -> Vec<usize> {
    (0..m)
        .map(|r| match pos0 {
            Some(p) => p + r,
            None => (r * 37 + 3) % 101,
        })
        .collect()
}
