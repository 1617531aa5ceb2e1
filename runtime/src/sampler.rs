//! Token sampling: greedy, temperature, top-k and top-p (nucleus), with a seeded [`Rng`].
//!
//! Order of operations (as in HF `generate`): temperature, then top-k, then top-p, then a draw.

pub use crate::rng::Rng;

/// How to pick the next token from a row of logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// `0` (or anything not positive/finite) means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`;
    /// `>= 1` disables.
    pub top_p: f32,
    /// Seed for [`crate::generate`]'s generator.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
    pub fn temperature(t: f32) -> Self {
        SamplerConfig {
            temperature: t,
            ..Self::greedy()
        }
    }
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = k;
        self
    }
    pub fn with_top_p(mut self, p: f32) -> Self {
        self.top_p = p;
        self
    }
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    pub fn is_greedy(&self) -> bool {
        !(self.temperature.is_finite() && self.temperature > 0.0) || self.top_k == 1
    }
}

/// Index of the largest logit (first one on ties; NaNs are ignored). Empty input gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in logits.iter().enumerate() {
        if !v.is_nan() && (!found || v > bv) {
            best = i;
            bv = v;
            found = true;
        }
    }
    best as u32
}

/// Pick a token from one row of logits. Never panics: empty logits give 0, and rows without a
/// finite logit fall back to [`argmax`].
pub fn sample(logits: &[f32], cfg: &SamplerConfig, rng: &mut Rng) -> u32 {
    if logits.is_empty() || cfg.is_greedy() {
        return argmax(logits);
    }
    let t = cfg.temperature as f64;
    // Candidates sorted by logit, descending (NaNs dropped).
    let mut idx: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| !logits[i as usize].is_nan())
        .collect();
    if idx.is_empty() {
        return 0;
    }
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if cfg.top_k > 0 && cfg.top_k < idx.len() {
        idx.select_nth_unstable_by(cfg.top_k - 1, by_logit);
        idx.truncate(cfg.top_k);
    }
    idx.sort_unstable_by(by_logit);
    let max = logits[idx[0] as usize] as f64;
    if !max.is_finite() {
        return argmax(logits);
    }
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i as usize] as f64 - max) / t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return idx[0];
    }
    for p in &mut probs {
        *p /= total;
    }
    let top_p = cfg.top_p as f64;
    if top_p.is_finite() && top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
        idx.truncate(keep.max(1));
    }
    let total: f64 = probs.iter().sum();
    let u = rng.next_f64() * total;
    let mut cum = 0.0;
    for (i, p) in probs.iter().enumerate() {
        cum += p;
        if u < cum {
            return idx[i];
        }
    }
    *idx.last().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![0.1, 2.0, -1.0, 1.9, 0.5, f32::NAN, 1.0, -3.0]
    }

    #[test]
    fn greedy_is_argmax() {
        let l = logits();
        let mut r = Rng::new(0);
        assert_eq!(sample(&l, &SamplerConfig::greedy(), &mut r), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, 5.0, 5.0]), 2);
        assert_eq!(sample(&[], &SamplerConfig::temperature(1.0), &mut r), 0);
        assert_eq!(
            sample(&[f32::NAN; 3], &SamplerConfig::temperature(1.0), &mut r),
            0
        );
        assert_eq!(
            sample(
                &[f32::NEG_INFINITY, 1.0],
                &SamplerConfig::temperature(1.0),
                &mut r
            ),
            1
        );
    }

    #[test]
    fn top_k_1_is_greedy() {
        let l = logits();
        let cfg = SamplerConfig::temperature(5.0).with_top_k(1);
        let mut r = Rng::new(3);
        for _ in 0..50 {
            assert_eq!(sample(&l, &cfg, &mut r), 1);
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let l = logits();
        let cfg = SamplerConfig::temperature(1.5).with_top_p(0.95);
        let a: Vec<u32> = {
            let mut r = Rng::new(99);
            (0..64).map(|_| sample(&l, &cfg, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = Rng::new(99);
            (0..64).map(|_| sample(&l, &cfg, &mut r)).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != a[0]),
            "temperature 1.5 should vary: {a:?}"
        );
        assert!(a.iter().all(|&t| t != 5), "NaN logit never sampled");
    }

    #[test]
    fn top_k_restricts() {
        let l = logits();
        let cfg = SamplerConfig::temperature(10.0).with_top_k(3);
        let mut r = Rng::new(5);
        for _ in 0..200 {
            let t = sample(&l, &cfg, &mut r);
            assert!([1, 3, 6].contains(&t), "{t}");
        }
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        // probabilities 0.5, 0.3, 0.15, 0.05 (as logits = ln p, temperature 1).
        let l: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let mut r = Rng::new(8);
        let mut seen = [0usize; 4];
        let cfg = SamplerConfig::temperature(1.0).with_top_p(0.79);
        for _ in 0..2000 {
            seen[sample(&l, &cfg, &mut r) as usize] += 1;
        }
        // 0.5 + 0.3 = 0.8 reaches p = 0.79: tokens 2 and 3 are excluded, 0 and 1 are kept.
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[0] > 0 && seen[1] > 0);
        let frac = seen[0] as f64 / 2000.0;
        assert!((frac - 0.625).abs() < 0.05, "{frac}");
        let cfg = SamplerConfig::temperature(1.0).with_top_p(0.81);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sample(&l, &cfg, &mut r) as usize] += 1;
        }
        assert!(seen[2] > 0 && seen[3] == 0, "{seen:?}");
        // A tiny p keeps the single most likely token.
        let cfg = SamplerConfig::temperature(1.0).with_top_p(0.01);
        assert!((0..100).all(|_| sample(&l, &cfg, &mut r) == 0));
    }
}
