//! A small seeded generator (SplitMix64) for sampling and the random initial state.
//!
//! It is **not** bit-identical to torch's RNG: a Huginn run with a random initial state
//! (`init_scale > 0`) matches the reference only in distribution. Use a zero initial state
//! (`init_scale = 0`) for exact parity.

/// SplitMix64: fast, statistically solid, and trivially seedable.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
    spare: Option<f64>,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng {
            state: seed,
            spare: None,
        }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller, both values used).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // u1 in (0, 1] so that ln(u1) is finite.
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }

    /// Standard normal truncated to `[-3, 3]` (by rejection; acceptance 99.73%).
    pub fn trunc_normal3(&mut self) -> f64 {
        loop {
            let z = self.normal();
            if z.abs() <= 3.0 {
                return z;
            }
        }
    }
}

/// Mix a seed and a stream index (e.g. a token position) into an independent seed.
pub(crate) fn mix(seed: u64, stream: u64) -> u64 {
    let mut r = Rng::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
    r.next_u64()
}

/// Fill `out` with `scale · std · z`, `z` a standard normal truncated at ±3 (so values are
/// clipped at ±3·std before scaling), like Huginn's `initialize_state`. `std == 0` gives zeros.
pub(crate) fn fill_trunc_normal(out: &mut [f32], std: f64, scale: f64, rng: &mut Rng) {
    if std == 0.0 {
        out.fill(0.0);
        return;
    }
    for o in out {
        *o = (rng.trunc_normal3() * std * scale) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_uniform() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut r = Rng::new(1);
        let n = 100_000;
        let mean: f64 = (0..n).map(|_| r.next_f64()).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }

    #[test]
    fn truncated_normal_stats() {
        let (std, scale) = (0.2, 8.0);
        let mut out = vec![0f32; 200_000];
        fill_trunc_normal(&mut out, std, scale, &mut Rng::new(7));
        let n = out.len() as f64;
        let mean = out.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = out.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let bound = 3.0 * std * scale;
        assert!(out.iter().all(|&x| (x as f64).abs() <= bound + 1e-5));
        // Variance of a standard normal truncated at ±3: 1 − 6φ(3)/(2Φ(3) − 1) ≈ 0.97334.
        let want_var = 0.97334 * (std * scale).powi(2);
        assert!(mean.abs() < 0.01 * std * scale * 3.0, "mean {mean}");
        assert!(
            (var / want_var - 1.0).abs() < 0.02,
            "var {var} want {want_var}"
        );
        // Something lands near the edges: the tails are not clipped to a spike.
        let near_edge = out
            .iter()
            .filter(|&&x| (x as f64).abs() > 2.5 * std * scale)
            .count();
        assert!(near_edge > 0);
        let mut z = vec![1f32; 10];
        fill_trunc_normal(&mut z, 0.0, 8.0, &mut Rng::new(7));
        assert!(z.iter().all(|&x| x == 0.0));
    }
}
