//! Recording what the loop does: with tracing on, every iteration appends, for every row it
//! computed, the state itself and its norm, relative update and cosine to the previous state,
//! the value of every exit criterion and the decision the policy took, the state after each layer
//! of the block, and per head the entropy of the attention distribution. `analyze` then finds,
//! per token, whether the trajectory settled on a fixed point or a short cycle (the behaviour the
//! mechanistic analyses of looped models describe).
//!
//! All of it is computed only when tracing is on: the generated attention kernel is an online
//! softmax that never forms the probabilities, so the entropies are recomputed here from the
//! query rows and the KV cache, and the readout behind the logit criteria runs every iteration
//! only for traced calls.

use crate::artifact::{Arg, BufId, Criterion, Instr, KernelSpec, Manifest, Recur, Rows};
use crate::exit::{latent_value, History, Rule};

/// Every exit criterion's value after one iteration, as the per-token policies compute it (each
/// against its own history, so they do not depend on which policy runs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Criteria {
    /// ‖s_t − s_{t−1}‖ / ‖s_t‖.
    pub latent_diff: f64,
    /// 1 − cos(s_t, s_{t−1}).
    pub cosine: f64,
    /// The logit criteria; `None` when the model has no readout to run.
    pub kl: Option<f64>,
    pub minp_kl: Option<f64>,
    pub entropy_diff: Option<f64>,
    /// Consecutive iterations with an unchanged argmax.
    pub argmax_stability: Option<f64>,
    /// Entropy (nats) of the readout's distribution, and its argmax.
    pub entropy: Option<f64>,
    pub argmax: Option<u32>,
}

/// The state after one layer of the block (the residual stream where the next layer reads it).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStep {
    pub norm: f32,
    /// Against the same layer's output one iteration earlier (the initial state at iteration 0).
    pub rel_update: f32,
    pub cosine: f32,
    pub state: Vec<f32>,
}

/// One token's state after one iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceStep {
    /// 0-based iteration.
    pub iteration: usize,
    /// Absolute position of the token.
    pub position: usize,
    pub norm: f32,
    /// ‖s_t − s_{t−1}‖ / ‖s_t‖ (s_{−1} is the initial state).
    pub rel_update: f32,
    /// cos(s_t, s_{t−1}); 0 when either is zero.
    pub cosine: f32,
    pub state: Vec<f32>,
    pub criteria: Criteria,
    /// Whether the token stopped after this iteration: the exit policy's decision, or the last
    /// iteration of a fixed depth.
    pub exited: bool,
    /// Per layer of the block, in order (empty when the block's layers cannot be told apart).
    pub layers: Vec<LayerStep>,
    /// Per attention site of the block (program order), per head: the entropy (nats) of this
    /// token's attention distribution.
    pub attn_entropy: Vec<Vec<f32>>,
}

/// Where a token's trajectory ended up.
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    /// The last update is below the tolerance.
    FixedPoint { distance: f32 },
    /// The state returns to where it was `period` iterations earlier (period ≥ 2).
    Cycle { period: usize, distance: f32 },
    /// Neither, within the recorded iterations.
    Moving { rel_update: f32 },
}

fn dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt() as f32
}

fn norm(a: &[f32]) -> f32 {
    a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32
}

/// Statistics of one row given its previous state.
pub fn step(iteration: usize, position: usize, state: &[f32], prev: &[f32]) -> TraceStep {
    let n = norm(state);
    let np = norm(prev);
    let dot: f64 = state
        .iter()
        .zip(prev)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    TraceStep {
        iteration,
        position,
        norm: n,
        rel_update: if n > 0.0 { dist(state, prev) / n } else { 0.0 },
        cosine: if n > 0.0 && np > 0.0 {
            (dot / (n as f64 * np as f64)) as f32
        } else {
            0.0
        },
        state: state.to_vec(),
        criteria: Criteria {
            latent_diff: latent_value(Criterion::LatentDiff, state, prev),
            cosine: latent_value(Criterion::Cosine, state, prev),
            ..Criteria::default()
        },
        exited: false,
        layers: vec![],
        attn_entropy: vec![],
    }
}

fn layer_step(state: &[f32], prev: &[f32]) -> LayerStep {
    let t = step(0, 0, state, prev);
    LayerStep {
        norm: t.norm,
        rel_update: t.rel_update,
        cosine: t.cosine,
        state: t.state,
    }
}

/// Where the trace reads the block's layers and attention heads, found once per model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// The buffer holding each layer's output, in order (the last is the block's output).
    pub layers: Vec<BufId>,
    /// The block's attention sites in program order, with their head counts.
    pub sites: Vec<(u32, usize)>,
}

impl Plan {
    /// A layer is one attention site of the block; its output is the residual stream where the
    /// next layer starts. The residual stream is followed backwards from the block's output
    /// through the adds that write it (each add's residual operand is the one written first: the
    /// branch is computed from it), so pre-norm, post-norm and sandwich blocks are all covered.
    /// Anything else (no attention, a buffer written twice, layers that share an output) leaves
    /// `layers` empty rather than guessing.
    pub fn of(man: &Manifest, rec: &Recur) -> Plan {
        let hidden = man.buffers[rec.state as usize].cols;
        let mut writer: std::collections::HashMap<BufId, usize> = Default::default();
        let mut twice = std::collections::HashSet::new();
        let mut site_at = vec![];
        let mut sites = vec![];
        for (i, ins) in rec.body.iter().enumerate() {
            for b in man.reads_writes(ins).1 {
                if writer.insert(b, i).is_some() {
                    twice.insert(b);
                }
            }
            match ins {
                Instr::KvWrite { site, .. } => site_at.push((*site, i)),
                Instr::Kernel { kernel, args } => {
                    if let KernelSpec::Attention { heads, .. } = man.kernels[*kernel as usize].spec
                    {
                        if let Some(Arg::KCache(st)) =
                            args.iter().find(|a| matches!(a, Arg::KCache(_)))
                        {
                            sites.push((*st, heads));
                        }
                    }
                }
                _ => {}
            }
        }
        let mut chain = vec![rec.next];
        let mut cur = rec.next;
        while let Some(&w) = writer.get(&cur) {
            // A matmul that adds the residual as it stores its product (the GEMM epilogue,
            // possibly normalizing the sum too): the stream goes on through that residual.
            if let Instr::MatMul { out, epi, .. } = &rec.body[w] {
                match epi.residual {
                    Some(r) if *out == cur && !chain.contains(&r) && writer.contains_key(&r) => {
                        chain.push(r);
                        cur = r;
                        continue;
                    }
                    _ => break,
                }
            }
            let Instr::Kernel { kernel, args } = &rec.body[w] else {
                break;
            };
            let spec = &man.kernels[*kernel as usize].spec;
            let residual_out = match spec {
                KernelSpec::Elementwise { .. } => true,
                KernelSpec::RmsNorm { residual: true, .. } => {
                    let sum = args.get(args.len().wrapping_sub(2));
                    if let (Some(Arg::Buf(y)), Some(&Arg::Buf(sm))) = (args.last(), sum) {
                        // The normed output of a fused add + norm (Ouro's in-loop final norm):
                        // the stream goes on through the sum it normalizes.
                        if *y == cur && sm != cur && !chain.contains(&sm) {
                            chain.push(sm);
                            cur = sm;
                            continue;
                        }
                    }
                    sum == Some(&Arg::Buf(cur))
                }
                _ => false,
            };
            if !residual_out {
                break;
            }
            let outs = spec.output_ptrs(args.len());
            let pred = args
                .iter()
                .enumerate()
                .filter_map(|(j, a)| match a {
                    Arg::Buf(b) if !outs.contains(&j) => Some(*b),
                    _ => None,
                })
                .filter(|&b| {
                    let d = &man.buffers[b as usize];
                    d.cols == hidden && d.rows == Rows::Tokens
                })
                .min_by_key(|b| writer.get(b).map_or(-1, |&i| i as i64));
            match pred.and_then(|b| writer.get(&b).map(|_| b)) {
                Some(b) if !chain.contains(&b) => {
                    chain.push(b);
                    cur = b;
                }
                _ => break,
            }
        }
        chain.reverse();
        let mut layers = vec![];
        for &(_, at) in site_at.iter().skip(1) {
            match chain.iter().rev().find(|b| writer[b] < at) {
                Some(&b) => layers.push(b),
                None => break,
            }
        }
        layers.push(rec.next);
        let mut uniq = layers.clone();
        uniq.sort_unstable();
        uniq.dedup();
        let valid = !site_at.is_empty()
            && layers.len() == site_at.len()
            && uniq.len() == layers.len()
            && layers.iter().all(|b| !twice.contains(b));
        Plan {
            layers: if valid { layers } else { vec![] },
            sites,
        }
    }

    fn heads(&self) -> usize {
        self.sites.iter().map(|s| s.1).sum()
    }

    /// Offset of a site's heads in a row's flat entropy vector.
    pub(crate) fn site_offset(&self, site: u32) -> Option<usize> {
        let i = self.sites.iter().position(|s| s.0 == site)?;
        Some(self.sites[..i].iter().map(|s| s.1).sum())
    }
}

/// The recording state of a traced session.
#[derive(Default)]
pub(crate) struct Tracer {
    pub(crate) steps: Vec<TraceStep>,
    pub(crate) plan: Option<Plan>,
    /// Per logit criterion, its own history (KL and min-p KL both keep a previous distribution).
    hist: Vec<(Criterion, History)>,
    /// Each call row's layer outputs one iteration earlier, `[row][layer][cols]`.
    prev_layers: Vec<f32>,
    /// This iteration's attention entropies, `[call row][heads of all sites]`.
    pub(crate) attn: Vec<f32>,
    rows: usize,
}

const LOGIT_CRITERIA: [Criterion; 4] = [
    Criterion::Kl,
    Criterion::MinpKl,
    Criterion::EntropyDiff,
    Criterion::ArgmaxStability,
];

impl Tracer {
    /// Prepare for a call of `rows` rows (at its first iteration).
    pub(crate) fn begin(&mut self, man: &Manifest, rec: &Recur, rows: usize) {
        if self.plan.is_none() {
            self.plan = Some(Plan::of(man, rec));
        }
        self.rows = rows;
        self.hist = LOGIT_CRITERIA
            .iter()
            .map(|&c| {
                let mut h = History::default();
                let rule = Rule::Criterion {
                    c,
                    threshold: 0.0,
                    min_steps: 1,
                    every: 1,
                };
                h.reset(rows, man.vocab, &rule);
                (c, h)
            })
            .collect();
        self.prev_layers.clear();
        let heads = self.plan.as_ref().map_or(0, Plan::heads);
        self.attn.clear();
        self.attn.resize(rows * heads, f32::NAN);
    }

    pub(crate) fn heads(&self) -> usize {
        self.plan.as_ref().map_or(0, Plan::heads)
    }

    /// Record compact rows `0..n` (call rows `call[i]`, positions `pos[i]`) after `iteration`:
    /// `next`/`prev` the new and previous state, `layer_bufs[l]` each layer's output.
    pub(crate) fn record(
        &mut self,
        iteration: usize,
        rows: &[(usize, usize)],
        next: &[f32],
        prev: &[f32],
        layer_bufs: &[&[f32]],
        cols: usize,
    ) {
        let nl = layer_bufs.len();
        if iteration == 0 || self.prev_layers.len() != self.rows * nl * cols {
            // Every layer's previous value starts as the initial state.
            self.prev_layers.resize(self.rows * nl * cols, 0.0);
            for (i, &(c, _)) in rows.iter().enumerate() {
                for l in 0..nl {
                    let o = (c * nl + l) * cols;
                    self.prev_layers[o..o + cols].copy_from_slice(&prev[i * cols..(i + 1) * cols]);
                }
            }
        }
        let heads = self.heads();
        for (i, &(c, pos)) in rows.iter().enumerate() {
            let r = i * cols..(i + 1) * cols;
            let mut st = step(iteration, pos, &next[r.clone()], &prev[r]);
            for (l, buf) in layer_bufs.iter().enumerate() {
                let o = (c * nl + l) * cols;
                let cur = &buf[i * cols..(i + 1) * cols];
                st.layers
                    .push(layer_step(cur, &self.prev_layers[o..o + cols]));
                self.prev_layers[o..o + cols].copy_from_slice(cur);
            }
            if let Some(plan) = &self.plan {
                let e = &self.attn[c * heads..(c + 1) * heads];
                let mut off = 0;
                for &(_, h) in &plan.sites {
                    st.attn_entropy.push(e[off..off + h].to_vec());
                    off += h;
                }
            }
            self.steps.push(st);
        }
        self.attn.iter_mut().for_each(|x| *x = f32::NAN);
    }

    /// Fill in the last `n` steps (compact rows, call rows `call`): the logit criteria from the
    /// readout's `logits` (`[n][vocab]`, when there is a readout) and the exit decisions.
    pub(crate) fn decide(
        &mut self,
        call: &[usize],
        logits: Option<&[f32]>,
        vocab: usize,
        exited: &dyn Fn(usize) -> bool,
    ) {
        let n = call.len();
        let base = self.steps.len() - n;
        for (i, &r) in call.iter().enumerate() {
            let st = &mut self.steps[base + i];
            st.exited = exited(i);
            let Some(l) = logits else { continue };
            let row = &l[i * vocab..(i + 1) * vocab];
            for (c, h) in &mut self.hist {
                let v = h.logits_value(*c, r, row);
                match c {
                    Criterion::Kl => st.criteria.kl = Some(v),
                    Criterion::MinpKl => st.criteria.minp_kl = Some(v),
                    Criterion::EntropyDiff => st.criteria.entropy_diff = Some(v),
                    _ => st.criteria.argmax_stability = Some(v),
                }
            }
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
            let ent: f64 = row
                .iter()
                .map(|&x| {
                    let p = ((x - m) as f64).exp() / z;
                    if p > 0.0 {
                        -p * p.ln()
                    } else {
                        0.0
                    }
                })
                .sum();
            st.criteria.entropy = Some(ent);
            st.criteria.argmax = Some(crate::sampler::argmax(row));
        }
    }
}

/// Entropy (nats) of `softmax(scale · q·kⱼ)` over the first `len` rows of `k` (row stride
/// `stride`, the head's columns at `off`).
pub(crate) fn attention_entropy(
    q: &[f32],
    k: &[f32],
    stride: usize,
    off: usize,
    len: usize,
    scale: f32,
    scores: &mut Vec<f64>,
) -> f32 {
    scores.clear();
    for j in 0..len {
        let kr = &k[j * stride + off..j * stride + off + q.len()];
        let d: f64 = q.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum();
        scores.push(d * scale as f64);
    }
    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
    let mut h = 0.0;
    for s in scores.iter() {
        let p = (s - m).exp() / z;
        if p > 0.0 {
            h -= p * p.ln();
        }
    }
    h as f32
}

/// Classify one token's trajectory (its steps in iteration order): a fixed point when the last
/// relative update is below `tol`, else the smallest period p ≤ `max_period` with
/// ‖s_T − s_{T−p}‖ / ‖s_T‖ < `tol`.
pub fn analyze(steps: &[&TraceStep], tol: f32, max_period: usize) -> Settled {
    let Some(last) = steps.last() else {
        return Settled::Moving {
            rel_update: f32::NAN,
        };
    };
    if last.rel_update < tol {
        return Settled::FixedPoint {
            distance: last.rel_update,
        };
    }
    let n = last.norm.max(f32::MIN_POSITIVE);
    for p in 2..=max_period {
        if steps.len() > p {
            let d = dist(&last.state, &steps[steps.len() - 1 - p].state) / n;
            if d < tol {
                return Settled::Cycle {
                    period: p,
                    distance: d,
                };
            }
        }
    }
    Settled::Moving {
        rel_update: last.rel_update,
    }
}

/// Principal components of a set of states (rows of `x`, `n × d`): the top `k` directions of the
/// centered data by power iteration with deflation on the covariance, and each row's coordinates
/// along them. Directions are normalized with their largest-magnitude entry positive, so the
/// result is unique up to ties. Returns `(components k × d, projections n × k, variances k)`.
pub fn pca(x: &[f32], n: usize, d: usize, k: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let k = k.min(d).min(n);
    let mut mean = vec![0.0f64; d];
    for r in 0..n {
        for c in 0..d {
            mean[c] += x[r * d + c] as f64 / n as f64;
        }
    }
    let xc: Vec<f64> = (0..n * d).map(|i| x[i] as f64 - mean[i % d]).collect();
    let mut cov = vec![0.0f64; d * d];
    for r in 0..n {
        let row = &xc[r * d..(r + 1) * d];
        for i in 0..d {
            if row[i] == 0.0 {
                continue;
            }
            for j in 0..d {
                cov[i * d + j] += row[i] * row[j];
            }
        }
    }
    let mut comps = vec![0.0f64; k * d];
    let mut vars = vec![0.0f64; k];
    for c in 0..k {
        // Deterministic start that is not orthogonal to any axis.
        let mut v: Vec<f64> = (0..d).map(|i| 1.0 + (i as f64 * 0.618).fract()).collect();
        let mut lambda = 0.0;
        for _ in 0..500 {
            let mut w = vec![0.0f64; d];
            for i in 0..d {
                w[i] = (0..d).map(|j| cov[i * d + j] * v[j]).sum();
            }
            let nw = w.iter().map(|a| a * a).sum::<f64>().sqrt();
            if nw == 0.0 {
                break;
            }
            let next: Vec<f64> = w.iter().map(|a| a / nw).collect();
            let delta: f64 = next.iter().zip(&v).map(|(a, b)| (a - b).abs()).sum();
            v = next;
            lambda = nw;
            if delta < 1e-13 {
                break;
            }
        }
        let imax = (0..d)
            .max_by(|&a, &b| v[a].abs().total_cmp(&v[b].abs()))
            .unwrap_or(0);
        if v[imax] < 0.0 {
            v.iter_mut().for_each(|a| *a = -*a);
        }
        // Deflate: remove this direction's variance before finding the next.
        for i in 0..d {
            for j in 0..d {
                cov[i * d + j] -= lambda * v[i] * v[j];
            }
        }
        comps[c * d..(c + 1) * d].copy_from_slice(&v);
        vars[c] = lambda / n.max(1) as f64;
    }
    let mut proj = vec![0.0f64; n * k];
    for r in 0..n {
        for c in 0..k {
            proj[r * k + c] = (0..d).map(|i| xc[r * d + i] * comps[c * d + i]).sum();
        }
    }
    (comps, proj, vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traj(states: &[[f32; 2]]) -> Vec<TraceStep> {
        let mut prev = [0.0f32; 2];
        states
            .iter()
            .enumerate()
            .map(|(t, s)| {
                let st = step(t, 0, s, &prev);
                prev = *s;
                st
            })
            .collect()
    }

    #[test]
    fn finds_fixed_points_and_cycles() {
        let fixed = traj(&[[1.0, 0.0], [2.0, 1.0], [2.0, 1.0]]);
        assert!(matches!(
            analyze(&fixed.iter().collect::<Vec<_>>(), 1e-3, 4),
            Settled::FixedPoint { .. }
        ));
        let cyc = traj(&[
            [1.0, 0.0],
            [0.0, 1.0],
            [-1.0, 0.0],
            [1.0, 0.0],
            [0.0, 1.0],
            [-1.0, 0.0],
        ]);
        assert_eq!(
            analyze(&cyc.iter().collect::<Vec<_>>(), 1e-3, 4),
            Settled::Cycle {
                period: 3,
                distance: 0.0
            }
        );
        let moving = traj(&[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]);
        assert!(matches!(
            analyze(&moving.iter().collect::<Vec<_>>(), 1e-3, 4),
            Settled::Moving { .. }
        ));
        assert!((cyc[1].cosine - 0.0).abs() < 1e-6 && (fixed[2].cosine - 1.0).abs() < 1e-6);
    }
}
