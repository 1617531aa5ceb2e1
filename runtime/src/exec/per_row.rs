//! The recurrence with per-token depth: the active-row loop behind per-token exit policies,
//! forced depth schedules and ACT (see `ARCHITECTURE.md`, "Per-token depth").

use super::Run;
use crate::artifact::Recur;
use crate::error::Result;
use crate::exit::{latent_value, passes, Rule};
use std::time::Instant;

impl Run<'_> {
    /// The recurrence with per-row exits: rows that stop leave the active set, and the body
    /// (and the readout) run only on the rows still active, compacted to the front of every
    /// per-token buffer. Returns the deepest row's iteration count.
    pub(super) fn per_row(
        &mut self,
        rec: &Recur,
        cap: usize,
        rule: Rule,
        gates: &mut Vec<f32>,
    ) -> Result<usize> {
        let m = self.m;
        let man = &m.manifest;
        let s = self.ws.s;
        let cols = man.buffers[rec.state as usize].cols;
        let vocab = man.vocab;
        let logits_buf = man.program.logits;
        let live = if s > 1 {
            crate::rows::live_ins(man, rec)
        } else {
            Vec::new()
        };
        {
            let ex = &mut *self.ex;
            ex.hist.reset(s, vocab, &rule);
            ex.row_depth.clear();
            ex.row_depth.resize(s, 0);
            ex.final_state.resize(s * cols, 0.0);
            ex.saved.clear();
            for &b in &live {
                let c = man.buffers[b as usize].cols;
                ex.saved
                    .push((b, self.ws.bufs[b as usize].as_slice()[..s * c].to_vec()));
            }
        }
        let mut active = std::mem::take(&mut self.ex.active);
        active.clear();
        active.extend(0..s);
        self.active = active;
        let token = matches!(rule, Rule::Token { .. });
        if let Rule::Token { alpha } = rule {
            self.token_route(rec, alpha, cap)?;
        }
        let mut t = 0;
        while !self.active.is_empty() && t < cap {
            if let Rule::Expert { alpha, threshold } = rule {
                self.expert_route(rec, t, alpha, threshold, &live)?;
                if self.active.is_empty() {
                    break;
                }
            }
            self.n = self.active.len();
            let n = self.n;
            self.list(&rec.body, Some(t))?;
            if matches!(rule, Rule::Expert { .. }) {
                // MoR's gated update of the rows that ran: h ← h + g·f(h).
                let (nb, sb) = (rec.next as usize, rec.state as usize);
                let np = self.ws.bufs[nb].as_mut_ptr();
                let sp = self.ws.bufs[sb].as_ptr();
                for (i, &g) in self.ex.route_g[..n].iter().enumerate() {
                    for c in i * cols..(i + 1) * cols {
                        // SAFETY: distinct buffers (validated) of at least n·cols elements.
                        unsafe { *np.add(c) = *sp.add(c) + g * *np.add(c) };
                    }
                }
            }
            self.after_iteration(t, rec)?;
            let t0 = self.profile.is_some().then(Instant::now);
            let step = t + 1;
            let mut exiting = std::mem::take(&mut self.ex.exiting);
            exiting.clear();
            for &r in &self.active {
                let d = match token {
                    true => self.ex.route_depth[r],
                    false => self.ex.depths.get(r).copied().unwrap_or(cap),
                };
                exiting.push(step >= d.min(cap));
            }
            if let Some(g) = rec.gate {
                let base = gates.len();
                gates.resize(base + s, 0.0);
                for (i, &r) in self.active.iter().enumerate() {
                    let l = 1.0 / (1.0 + (-self.ws.buf(g)[i]).exp());
                    gates[base + r] = l;
                    if let Rule::Gate { q, min_steps } = rule {
                        let cdf = self.ex.hist.gate_cdf(r, l, step == cap);
                        exiting[i] |= step >= min_steps && cdf >= q;
                    }
                    if let Rule::Act { thr } = rule {
                        let (w, halted) = self.ex.hist.act_weight(r, l, thr);
                        exiting[i] |= halted;
                        // The state is the running halting-weighted average of the iterates.
                        let (nb, sb) = (rec.next as usize, rec.state as usize);
                        let np = self.ws.bufs[nb].as_mut_ptr();
                        let sp = self.ws.bufs[sb].as_ptr();
                        for c in i * cols..(i + 1) * cols {
                            // SAFETY: distinct buffers of at least n·cols elements.
                            unsafe { *np.add(c) = *np.add(c) * w + *sp.add(c) * (1.0 - w) };
                        }
                    }
                }
            }
            if let Rule::Criterion {
                c,
                threshold,
                min_steps,
                every,
            } = rule
            {
                let check = step >= min_steps && step % every == 0;
                if rule.needs_latent() {
                    let (a, b) = (self.ws.buf(rec.next), self.ws.buf(rec.state));
                    for i in 0..n {
                        let v = latent_value(
                            c,
                            &a[i * cols..(i + 1) * cols],
                            &b[i * cols..(i + 1) * cols],
                        );
                        exiting[i] |= check && passes(c, v, threshold);
                    }
                }
                self.copy_n(rec.next, rec.state, n * cols);
                if rule.needs_logits() {
                    self.time(8, t0);
                    for &i in &rec.readout {
                        self.list(std::slice::from_ref(&man.program.coda[i as usize]), None)?;
                    }
                    self.ex.readout_rows += n;
                    let l = self.ws.buf(logits_buf);
                    for (i, &r) in self.active.iter().enumerate() {
                        let v = self
                            .ex
                            .hist
                            .logits_value(c, r, &l[i * vocab..(i + 1) * vocab]);
                        exiting[i] |= check && passes(c, v, threshold);
                    }
                }
            } else {
                self.copy_n(rec.next, rec.state, n * cols);
            }
            if self.ex.trace.is_some() {
                self.trace_decide(rec, rule.needs_logits(), &|i| exiting[i])?;
            }
            let t0 = self.profile.is_some().then(Instant::now);
            let mut keep = std::mem::take(&mut self.ex.keep);
            keep.clear();
            let active = std::mem::take(&mut self.active);
            for (i, &r) in active.iter().enumerate() {
                if exiting[i] {
                    self.finish_row(rec, i, r, step, token);
                } else {
                    keep.push(i);
                }
            }
            self.active = active;
            self.compact(rec, &live, &keep, &exiting);
            self.ex.keep = keep;
            self.ex.exiting = exiting;
            self.time(8, t0);
            t = step;
        }
        // Rows still active at the cap end with the state they have.
        let active = std::mem::take(&mut self.active);
        for (i, &r) in active.iter().enumerate() {
            self.finish_row(rec, i, r, t, token);
        }
        self.active = active;
        for (b, data) in &self.ex.saved {
            self.ws.bufs[*b as usize].as_mut_slice()[..data.len()].copy_from_slice(data);
        }
        self.ws.bufs[rec.state as usize].as_mut_slice()[..s * cols]
            .copy_from_slice(&self.ex.final_state[..s * cols]);
        self.copy(rec.state, rec.next);
        self.ex.active = std::mem::take(&mut self.active);
        self.n = s;
        Ok(t)
    }

    /// Record compact row `i` (call row `r`) as finished after `step` iterations. Under token
    /// choice the result is MoR's `h_0 + w·h_d` (the input plus the weighted final state).
    fn finish_row(&mut self, rec: &Recur, i: usize, r: usize, step: usize, token: bool) {
        let cols = self.m.manifest.buffers[rec.state as usize].cols;
        let st = &self.ws.buf(rec.state)[i * cols..(i + 1) * cols];
        let out = &mut self.ex.final_state[r * cols..(r + 1) * cols];
        if token {
            let w = self.ex.route_w[r];
            let h0 = &self.ex.route_init[r * cols..(r + 1) * cols];
            for ((o, x), h) in out.iter_mut().zip(st).zip(h0) {
                *o = h + w * x;
            }
        } else {
            out.copy_from_slice(st);
        }
        self.ex.row_depth[r] = step;
    }

    /// Token choice: the router runs once on every row's initial state; each row's depth is
    /// `argmax softmax(z) + 1` (the first maximum on ties) and its weight `alpha·P[d]`.
    fn token_route(&mut self, rec: &Recur, alpha: f32, cap: usize) -> Result<()> {
        let s = self.ws.s;
        let cols = self.m.manifest.buffers[rec.state as usize].cols;
        self.n = s;
        self.list(&rec.router, Some(0))?;
        let out = rec.router_out.expect("validated: routing has a router");
        let nz = self.m.manifest.buffers[out as usize].cols;
        let z = self.ws.buf(out);
        let ex = &mut *self.ex;
        ex.route_depth.clear();
        ex.route_w.clear();
        for r in 0..s {
            let (d, w) = crate::exit::token_route(&z[r * nz..(r + 1) * nz], cap, alpha);
            ex.route_depth.push(d);
            ex.route_w.push(w);
        }
        ex.route_init.clear();
        ex.route_init
            .extend_from_slice(&self.ws.buf(rec.state)[..s * cols]);
        Ok(())
    }

    /// Expert choice before iteration `t`: score the active rows, keep per sequence the top
    /// `max(1, ⌊capacity_t·S⌋)` (a multi-token call) or those with `σ(z) ≥ threshold` (one
    /// token), retire the rest at depth `t`, and keep the gates of the rows that run.
    fn expert_route(
        &mut self,
        rec: &Recur,
        t: usize,
        alpha: f32,
        threshold: f32,
        live: &[u32],
    ) -> Result<()> {
        let n = self.active.len();
        self.n = n;
        self.list(&rec.router, Some(t))?;
        let out = rec.router_out.expect("validated: routing has a router");
        let (cap_t, n_rec) = match &rec.exit {
            crate::artifact::ExitPolicy::ExpertChoice {
                capacity,
                max_steps,
                ..
            } => (capacity.get(t).copied(), *max_steps),
            _ => (None, 1),
        };
        // MoR's default capacity schedule, in the reference's float arithmetic.
        let cap_t = cap_t.unwrap_or((n_rec.saturating_sub(t)) as f64 / n_rec as f64);
        // Scratch vectors live in `Exits`: decode allocates nothing per iteration.
        let ex = &mut *self.ex;
        ex.route_sig.clear();
        ex.route_sig.extend(
            self.ws.buf(out)[..n]
                .iter()
                .map(|&z| crate::exit::sigmoid_rn(z)),
        );
        let sig = &ex.route_sig;
        ex.exiting.clear();
        ex.exiting.resize(n, true);
        for g in self.segs {
            let idx = &mut ex.route_idx;
            idx.clear();
            idx.extend((0..n).filter(|&i| (g.row0..g.row0 + g.rows).contains(&self.active[i])));
            if g.rows > 1 {
                let k = ((cap_t * g.rows as f64) as usize).max(1);
                // Highest gate first; ties go to the earlier position.
                idx.sort_by(|&a, &b| sig[b].total_cmp(&sig[a]).then(a.cmp(&b)));
                for &i in idx.iter().take(k) {
                    ex.exiting[i] = false;
                }
            } else {
                for &i in idx.iter() {
                    ex.exiting[i] = sig[i] < threshold;
                }
            }
        }
        let mut keep = std::mem::take(&mut self.ex.keep);
        let mut exiting = std::mem::take(&mut self.ex.exiting);
        keep.clear();
        self.ex.route_g.clear();
        let active = std::mem::take(&mut self.active);
        for (i, &r) in active.iter().enumerate() {
            if exiting[i] {
                self.finish_row(rec, i, r, t, false);
            } else {
                keep.push(i);
                let g = self.ex.route_sig[i] * alpha;
                self.ex.route_g.push(g);
            }
        }
        self.active = active;
        self.compact(rec, live, &keep, &exiting);
        exiting.clear();
        self.ex.keep = keep;
        self.ex.exiting = exiting;
        Ok(())
    }

    /// Keep the rows `keep` (increasing) of the state and the live-in buffers, in order, and drop
    /// the others from the active set (`exiting[i]` marks compact row `i` as leaving).
    fn compact(&mut self, rec: &Recur, live: &[u32], keep: &[usize], exiting: &[bool]) {
        let man = &self.m.manifest;
        let n = self.active.len();
        if keep.len() < n && !keep.is_empty() {
            let cols = man.buffers[rec.state as usize].cols;
            crate::rows::gather(self.ws.bufs[rec.state as usize].as_mut_slice(), cols, keep);
            for &b in live {
                let c = man.buffers[b as usize].cols;
                crate::rows::gather(self.ws.bufs[b as usize].as_mut_slice(), c, keep);
            }
        }
        let mut j = 0;
        self.active.retain(|_| {
            j += 1;
            !exiting[j - 1]
        });
    }
}
