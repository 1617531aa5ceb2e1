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
        let mut t = 0;
        while !self.active.is_empty() && t < cap {
            self.n = self.active.len();
            let n = self.n;
            self.list(&rec.body, Some(t))?;
            self.after_iteration(t, rec)?;
            let t0 = self.profile.is_some().then(Instant::now);
            let step = t + 1;
            let mut exiting = std::mem::take(&mut self.ex.exiting);
            exiting.clear();
            for &r in &self.active {
                let d = self.ex.depths.get(r).copied().unwrap_or(cap);
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
            let t0 = self.profile.is_some().then(Instant::now);
            let mut keep = std::mem::take(&mut self.ex.keep);
            keep.clear();
            for (i, &r) in self.active.iter().enumerate() {
                if exiting[i] {
                    let st = self.ws.buf(rec.state);
                    self.ex.final_state[r * cols..(r + 1) * cols]
                        .copy_from_slice(&st[i * cols..(i + 1) * cols]);
                    self.ex.row_depth[r] = step;
                } else {
                    keep.push(i);
                }
            }
            if keep.len() < n && !keep.is_empty() {
                crate::rows::gather(self.ws.bufs[rec.state as usize].as_mut_slice(), cols, &keep);
                for &b in &live {
                    let c = man.buffers[b as usize].cols;
                    crate::rows::gather(self.ws.bufs[b as usize].as_mut_slice(), c, &keep);
                }
            }
            let mut j = 0;
            self.active.retain(|_| {
                j += 1;
                !exiting[j - 1]
            });
            self.ex.keep = keep;
            self.ex.exiting = exiting;
            self.time(8, t0);
            t = step;
        }
        // Rows still active at the cap end with the state they have.
        for (i, &r) in self.active.iter().enumerate() {
            let st = self.ws.buf(rec.state);
            self.ex.final_state[r * cols..(r + 1) * cols]
                .copy_from_slice(&st[i * cols..(i + 1) * cols]);
            self.ex.row_depth[r] = t;
        }
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
}
