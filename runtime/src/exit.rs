//! Per-token exit decisions: Huginn's zero-shot criteria and Ouro's learned gate, evaluated per
//! row after every iteration. Per-row history (previous distribution, entropy, argmax, gate
//! survival) is indexed by the row's position in the call, so compaction never moves it.

use crate::artifact::{Criterion, ExitPolicy};

/// What decides when a row stops, resolved for one call.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Rule {
    /// Every row runs `cap` iterations unless a forced depth says otherwise.
    None,
    Criterion {
        c: Criterion,
        threshold: f64,
        min_steps: usize,
        every: usize,
    },
    Gate {
        q: f32,
        min_steps: usize,
    },
    /// ACT halting at cumulative probability `thr = 1 − eps`.
    Act {
        thr: f32,
    },
    /// MoR expert choice: the router selects the rows that run each iteration.
    Expert {
        alpha: f32,
        threshold: f32,
    },
    /// MoR token choice: the router picks each row's depth before the first iteration.
    Token {
        alpha: f32,
    },
}

impl Rule {
    /// The per-row rule of a policy (`None` for whole-call policies), with an optional
    /// run-time threshold override.
    pub(crate) fn of(exit: &ExitPolicy, threshold: Option<f64>) -> Rule {
        match *exit {
            ExitPolicy::Criterion {
                criterion,
                threshold: t,
                min_steps,
                every,
                ..
            } => Rule::Criterion {
                c: criterion,
                threshold: threshold.unwrap_or(t),
                min_steps,
                every: every.max(1),
            },
            ExitPolicy::Gate { q, min_steps, .. } => Rule::Gate {
                q: threshold.unwrap_or(q) as f32,
                min_steps,
            },
            ExitPolicy::Act { eps, .. } => Rule::Act {
                thr: (1.0 - threshold.unwrap_or(eps)) as f32,
            },
            ExitPolicy::ExpertChoice {
                alpha,
                threshold: t,
                ..
            } => Rule::Expert {
                alpha: alpha as f32,
                threshold: threshold.unwrap_or(t) as f32,
            },
            ExitPolicy::TokenChoice { alpha, .. } => Rule::Token {
                alpha: alpha as f32,
            },
            _ => Rule::None,
        }
    }

    pub(crate) fn needs_logits(&self) -> bool {
        matches!(self, Rule::Criterion { c, .. } if c.needs_logits())
    }

    pub(crate) fn needs_latent(&self) -> bool {
        matches!(
            self,
            Rule::Criterion {
                c: Criterion::LatentDiff | Criterion::Cosine,
                ..
            }
        )
    }
}

/// Per-row history of the criteria, reused across calls (decode allocates nothing).
#[derive(Default)]
pub(crate) struct History {
    vocab: usize,
    prev_logp: Vec<f32>,
    prev_h: Vec<f64>,
    prev_am: Vec<u32>,
    count: Vec<u32>,
    rem: Vec<f32>,
    cdf: Vec<f32>,
    logp: Vec<f32>,
}

impl History {
    pub(crate) fn reset(&mut self, rows: usize, vocab: usize, rule: &Rule) {
        self.vocab = vocab;
        if rule.needs_logits() {
            let u = -(vocab.max(1) as f32).ln();
            self.prev_logp.clear();
            self.prev_logp.resize(rows * vocab, u);
            self.logp.resize(vocab, 0.0);
        }
        self.prev_h.clear();
        self.prev_h.resize(rows, 100.0);
        self.prev_am.clear();
        self.prev_am.resize(rows, u32::MAX);
        self.count.clear();
        self.count.resize(rows, 0);
        self.rem.clear();
        self.rem.resize(rows, 1.0);
        self.cdf.clear();
        self.cdf.resize(rows, 0.0);
    }

    /// Update row `row`'s history with this step's logits and return the criterion's value.
    pub(crate) fn logits_value(&mut self, c: Criterion, row: usize, logits: &[f32]) -> f64 {
        let v = self.vocab;
        let prev = match c {
            Criterion::Kl | Criterion::MinpKl => &mut self.prev_logp[row * v..(row + 1) * v],
            _ => &mut [][..],
        };
        let h = RowHistory {
            prev_logp: prev,
            prev_h: &mut self.prev_h[row],
            prev_am: &mut self.prev_am[row],
            count: &mut self.count[row],
        };
        logits_step(c, logits, &mut self.logp, h)
    }

    /// UT/ACT halting in f32: returns the update weight of this step and whether the row halts.
    pub(crate) fn act_weight(&mut self, row: usize, p: f32, thr: f32) -> (f32, bool) {
        let h = self.cdf[row];
        if h + p > thr {
            self.cdf[row] = 1.0;
            (1.0 - h, true)
        } else {
            self.cdf[row] = h + p;
            (p, false)
        }
    }

    /// Ouro's survival bookkeeping in f32: returns the CDF after this step.
    pub(crate) fn gate_cdf(&mut self, row: usize, lambda: f32, last: bool) -> f32 {
        let p = if last {
            self.rem[row]
        } else {
            lambda * self.rem[row]
        };
        self.rem[row] *= 1.0 - lambda;
        self.cdf[row] += p;
        self.cdf[row]
    }
}

/// One row's history of a logit criterion (the CUDA emulator keeps it in device buffers).
pub(crate) struct RowHistory<'a> {
    /// The previous step's log-probabilities (KL criteria; may be empty for the others).
    pub prev_logp: &'a mut [f32],
    pub prev_h: &'a mut f64,
    pub prev_am: &'a mut u32,
    pub count: &'a mut u32,
}

/// A logit criterion's value for one row and this step's logits, updating its history;
/// `logp` is scratch of the vocabulary's length.
pub(crate) fn logits_step(
    c: Criterion,
    logits: &[f32],
    logp: &mut [f32],
    h: RowHistory<'_>,
) -> f64 {
    log_softmax(logits, logp);
    if c == Criterion::MinpKl {
        minp(logp);
    }
    match c {
        Criterion::Kl | Criterion::MinpKl => {
            // KL(p_{t−1} ‖ p_t), the direction of `F.kl_div(logp_t, logp_{t−1}, log_target=True)`.
            let mut kl = 0.0f64;
            for (&a, &b) in h.prev_logp.iter().zip(logp.iter()) {
                kl += (a as f64).exp() * (a as f64 - b as f64);
            }
            h.prev_logp.copy_from_slice(logp);
            kl
        }
        Criterion::EntropyDiff => {
            let e: f64 = -logp
                .iter()
                .map(|&l| (l as f64).exp() * ((l as f64).exp() + 1e-10).ln())
                .sum::<f64>();
            let d = (e - *h.prev_h).abs();
            *h.prev_h = e;
            d
        }
        Criterion::ArgmaxStability => {
            let am = crate::sampler::argmax(logits);
            if am == *h.prev_am {
                *h.count += 1;
            } else {
                *h.count = 0;
            }
            *h.prev_am = am;
            *h.count as f64
        }
        Criterion::LatentDiff | Criterion::Cosine => {
            unreachable!("latent criteria read the state")
        }
    }
}

/// MoR's router gate σ(z) in f32, as the CPU executor computes it.
pub(crate) fn sigmoid_rn(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// MoR token choice for one row of router logits: the depth `argmax + 1` (the first maximum
/// on ties, at most `cap`, at least 1) and the weight `alpha · softmax(z)[argmax]`.
pub(crate) fn token_route(row: &[f32], cap: usize, alpha: f32) -> (usize, f32) {
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| (x - mx).exp()).sum();
    let mut d = 0;
    for (j, &x) in row.iter().enumerate() {
        if x > row[d] {
            d = j;
        }
    }
    ((d + 1).min(cap.max(1)), (row[d] - mx).exp() / sum * alpha)
}

/// A run-time threshold override, refused when it is not a finite number.
pub(crate) fn checked_threshold(t: Option<f64>) -> crate::error::Result<Option<f64>> {
    match t {
        Some(x) if !x.is_finite() => Err(crate::error::RuntimeError::Config(format!(
            "the exit threshold must be a finite number, got {x}"
        ))),
        _ => Ok(t),
    }
}

/// Whether a criterion value stops the row.
pub(crate) fn passes(c: Criterion, value: f64, threshold: f64) -> bool {
    match c {
        Criterion::ArgmaxStability => value >= threshold,
        _ => value < threshold,
    }
}

/// ‖a − b‖ / ‖a‖ (latent-diff) or 1 − cos(a, b) (cosine) of one row.
pub(crate) fn latent_value(c: Criterion, a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut na, mut nb, mut dot) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        d += (x - y) * (x - y);
        na += x * x;
        nb += y * y;
        dot += x * y;
    }
    match c {
        Criterion::Cosine => {
            if na == 0.0 || nb == 0.0 {
                1.0
            } else {
                1.0 - dot / (na.sqrt() * nb.sqrt())
            }
        }
        _ => {
            if na > 0.0 {
                d.sqrt() / na.sqrt()
            } else if d == 0.0 {
                0.0
            } else {
                f64::INFINITY
            }
        }
    }
}

fn log_softmax(x: &[f32], out: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
    let lz = m as f64 + z.ln();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v as f64 - lz) as f32;
    }
}

/// Huginn's min-p filter on log-probabilities: p < 0.1·max becomes 1/V, then renormalize.
fn minp(logp: &mut [f32]) {
    let v = logp.len() as f64;
    let mx = logp.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let cut = mx.exp() * 0.1;
    let mut z = 0.0f64;
    for l in logp.iter_mut() {
        let p = (*l as f64).exp();
        let p = if p < cut { 1.0 / v } else { p };
        *l = p as f32;
        z += p;
    }
    for l in logp.iter_mut() {
        *l = ((*l as f64) / z).ln() as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_from_uniform_then_zero() {
        let mut h = History::default();
        let rule = Rule::Criterion {
            c: Criterion::Kl,
            threshold: 1e-3,
            min_steps: 1,
            every: 1,
        };
        h.reset(2, 4, &rule);
        let l = [1.0f32, 2.0, 3.0, 4.0];
        // KL(uniform ‖ p) = Σ ¼ (ln ¼ − ln p_i).
        let lse = l.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
        let want: f64 = l
            .iter()
            .map(|&x| 0.25 * ((0.25f64).ln() - (x as f64 - lse)))
            .sum();
        let got = h.logits_value(Criterion::Kl, 1, &l);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert!(h.logits_value(Criterion::Kl, 1, &l).abs() < 1e-7);
    }

    #[test]
    fn entropy_argmax_and_gate() {
        let mut h = History::default();
        let rule = Rule::Criterion {
            c: Criterion::EntropyDiff,
            threshold: 1e-3,
            min_steps: 1,
            every: 1,
        };
        h.reset(1, 3, &rule);
        let l = [0.0f32, 0.0, 0.0];
        let e = h.logits_value(Criterion::EntropyDiff, 0, &l);
        assert!((e - (100.0 - 3f64.ln())).abs() < 1e-6);
        assert_eq!(
            h.logits_value(Criterion::ArgmaxStability, 0, &[0.0, 1.0, 0.0]),
            0.0
        );
        assert_eq!(
            h.logits_value(Criterion::ArgmaxStability, 0, &[0.0, 2.0, 0.0]),
            1.0
        );
        assert_eq!(
            h.logits_value(Criterion::ArgmaxStability, 0, &[3.0, 2.0, 0.0]),
            0.0
        );
        assert_eq!(h.gate_cdf(0, 0.25, false), 0.25);
        assert_eq!(h.gate_cdf(0, 0.5, false), 0.25 + 0.5 * 0.75);
        assert_eq!(h.gate_cdf(0, 0.1, true), 1.0);
        assert!(passes(Criterion::ArgmaxStability, 5.0, 5.0) && !passes(Criterion::Kl, 1e-3, 1e-3));
        assert!((latent_value(Criterion::Cosine, &[1.0, 0.0], &[2.0, 0.0])).abs() < 1e-12);
        assert_eq!(
            latent_value(Criterion::LatentDiff, &[3.0, 4.0], &[3.0, 4.0]),
            0.0
        );
    }
}
