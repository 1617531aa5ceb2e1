//! Batches of independent sequences in one call: each has its own position, KV cache and
//! per-token depths; their rows share every matmul and kernel launch, and a row that exits
//! leaves the active set whatever its sequence (so a batch with unequal depths costs the sum of
//! its tokens' depths, not batch × max depth).

use crate::error::{Result, RuntimeError};
use crate::exec::{ExecState, Seg};
use crate::kv::KvCache;
use crate::model::Model;
use crate::session::{DepthSchedule, Logits};

pub struct BatchSession {
    model: Model,
    st: ExecState,
    kvs: Vec<KvCache>,
    pos: Vec<usize>,
    steps: Option<usize>,
    schedules: Vec<Option<DepthSchedule>>,
    segs: Vec<Seg>,
    /// The sequence of each segment of the last call.
    seq_ids: Vec<usize>,
    tokens: Vec<u32>,
}

impl BatchSession {
    pub(crate) fn new(model: Model, n: usize) -> Self {
        let m = &model.inner;
        let st = ExecState::new(m);
        let ring = m
            .manifest
            .program
            .recur
            .as_ref()
            .and_then(|r| r.cache.slots());
        let kvs = (0..n)
            .map(|_| KvCache::new(&m.manifest.kv_sites, ring))
            .collect();
        BatchSession {
            st,
            kvs,
            pos: vec![0; n],
            steps: None,
            schedules: vec![None; n],
            segs: Vec::new(),
            seq_ids: Vec::new(),
            tokens: Vec::new(),
            model,
        }
    }

    /// [`crate::Session::reserve`] for every sequence: storage for `positions` positions each.
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        let m = &self.model.inner;
        for kv in &mut self.kvs {
            self.st.reserve(m, Some(kv), positions, self.steps)?;
        }
        Ok(())
    }

    /// Turn the per-operation timers on (they cost a clock read per instruction; see
    /// [`BatchSession::profile`]) or off.
    pub fn set_profiling(&mut self, on: bool) {
        self.st.set_profiling(on);
    }

    /// The per-operation timers since profiling was turned on, `(name, total time, count)` as
    /// in [`crate::Stats::profile`]; empty when it is off.
    pub fn profile(&self) -> Vec<(&'static str, std::time::Duration, u64)> {
        self.st.profile_table()
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.kvs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kvs.is_empty()
    }

    pub fn set_steps(&mut self, steps: Option<usize>) {
        self.steps = steps;
    }

    /// [`crate::Session::set_exit_threshold`] for every sequence.
    pub fn set_exit_threshold(&mut self, threshold: Option<f64>) -> Result<()> {
        self.st.exits.threshold = crate::exit::checked_threshold(threshold)?;
        Ok(())
    }

    /// Force the depth of every token of sequence `b` ([`crate::Session::set_depth_schedule`]);
    /// either every sequence of a batch has a schedule or none.
    pub fn set_depth_schedule(&mut self, b: usize, schedule: Option<DepthSchedule>) -> Result<()> {
        self.check_index(b)?;
        self.schedules[b] = schedule;
        Ok(())
    }

    fn check_index(&self, b: usize) -> Result<()> {
        let n = self.kvs.len();
        if b < n {
            Ok(())
        } else {
            Err(RuntimeError::Config(format!(
                "no sequence {b} in a batch of {n}"
            )))
        }
    }

    /// Start sequence `b` over: position 0 and an empty KV cache whose storage is kept; the
    /// other sequences go on where they are. A finished request's place in the batch can so be
    /// taken by the next one (continuous batching) without allocating.
    pub fn reset(&mut self, b: usize) -> Result<()> {
        self.check_index(b)?;
        self.kvs[b].reset();
        self.pos[b] = 0;
        Ok(())
    }

    /// Positions of the next token of each sequence.
    pub fn positions(&self) -> &[usize] {
        &self.pos
    }

    /// Process `chunks[b]` for each sequence `b` (an empty chunk sits this call out); returns
    /// the logits of every row of each sequence.
    pub fn prefill(&mut self, chunks: &[&[u32]]) -> Result<Vec<Logits>> {
        let r = self.run(chunks);
        if r.is_err() {
            // A failed call ran no sequence: `last_depths` must not read its partial plan.
            self.segs.clear();
            self.seq_ids.clear();
        }
        r
    }

    fn run(&mut self, chunks: &[&[u32]]) -> Result<Vec<Logits>> {
        if self.model.inner.dev.is_some() {
            return Err(RuntimeError::Unsupported(
                "batch sessions (run one Session per sequence)".into(),
            ));
        }
        let n = self.kvs.len();
        if chunks.len() != n {
            return Err(RuntimeError::Config(format!(
                "a batch of {n} sequences got {} token lists",
                chunks.len()
            )));
        }
        let scheduled = self.schedules.iter().filter(|s| s.is_some()).count();
        if scheduled != 0 && scheduled != n {
            return Err(RuntimeError::Config(
                "either every sequence of a batch has a depth schedule or none".into(),
            ));
        }
        self.segs.clear();
        self.tokens.clear();
        self.st.exits.depths.clear();
        self.seq_ids.clear();
        // Every check that can fail runs before any cache leaves `self.kvs`: an error must leave
        // the batch as it was.
        for (b, c) in chunks.iter().enumerate() {
            if c.is_empty() {
                continue;
            }
            self.segs.push(Seg {
                row0: self.tokens.len(),
                rows: c.len(),
                pos0: self.pos[b],
            });
            self.tokens.extend_from_slice(c);
            if let Some(s) = &self.schedules[b] {
                for p in self.pos[b]..self.pos[b] + c.len() {
                    let d = s.depth(p).ok_or_else(|| {
                        RuntimeError::Config("the depth schedule is empty".into())
                    })?;
                    self.st.exits.depths.push(d);
                }
            }
            self.seq_ids.push(b);
        }
        if self.tokens.is_empty() {
            return Err(RuntimeError::EmptyInput);
        }
        let mut kvs: Vec<KvCache> = self
            .seq_ids
            .iter()
            .map(|&b| std::mem::replace(&mut self.kvs[b], KvCache::new(&[], None)))
            .collect();
        let m = &self.model.inner;
        let r = self
            .st
            .forward_segs(m, Some(&mut kvs), &self.tokens, &self.segs, self.steps);
        // The caches go back whatever happened.
        for (kv, &b) in kvs.into_iter().zip(&self.seq_ids) {
            self.kvs[b] = kv;
        }
        let info = r?;
        let vocab = m.manifest.vocab;
        let all = self.st.workspace(info.ws).buf(m.manifest.program.logits);
        let mut out = vec![Logits::new(vocab); n];
        let last_only = self.st.exits.logits_last_only;
        for (g, &b) in self.segs.iter().zip(&self.seq_ids) {
            // Only the last row of each sequence holds logits when the head ran last-only.
            let r0 = if last_only {
                g.row0 + g.rows - 1
            } else {
                g.row0
            };
            out[b] = Logits {
                data: all[r0 * vocab..(g.row0 + g.rows) * vocab].to_vec(),
                rows: g.row0 + g.rows - r0,
                vocab,
            };
            self.pos[b] += g.rows;
        }
        Ok(out)
    }

    /// As [`BatchSession::prefill`], but computes only each sequence's last row of logits (what
    /// generation needs, without the head on every prompt row); each returned [`Logits`] has one
    /// row (none for a sequence that sat the call out).
    pub fn prefill_last(&mut self, chunks: &[&[u32]]) -> Result<Vec<Logits>> {
        self.st.exits.logits_last_only = true;
        let r = self.prefill(chunks);
        self.st.exits.logits_last_only = false;
        r
    }

    /// One token per sequence (`None` sits a sequence out).
    pub fn step(&mut self, tokens: &[Option<u32>]) -> Result<Vec<Logits>> {
        let chunks: Vec<&[u32]> = tokens
            .iter()
            .map(|t| t.as_ref().map_or(&[][..], std::slice::from_ref))
            .collect();
        self.prefill(&chunks)
    }

    /// Iterations each token of sequence `b` ran in the last call (empty if it sat out or the
    /// call failed).
    pub fn last_depths(&self, b: usize) -> &[usize] {
        let Some(i) = self.seq_ids.iter().position(|&x| x == b) else {
            return &[];
        };
        let g = self.segs[i];
        &self.st.exits.row_depth[g.row0..g.row0 + g.rows]
    }

    /// Σ iterations over the rows of the last call (block evaluations).
    pub fn last_block_evaluations(&self) -> usize {
        self.st.exits.row_depth.iter().sum()
    }

    /// KV bytes holding filled positions, per sequence.
    pub fn kv_bytes_used(&self) -> Vec<usize> {
        self.kvs.iter().map(|k| k.bytes_used()).collect()
    }

    /// Bytes of KV storage each sequence holds (filled or not).
    pub fn kv_bytes_allocated(&self) -> Vec<usize> {
        self.kvs.iter().map(|k| k.bytes_allocated()).collect()
    }
}
