//! Sessions: a KV cache and a position over one sequence, with prefill/step calls.

use crate::error::{Result, RuntimeError};
use crate::exec::ExecState;
use crate::model::Model;
use crate::sampler::{sample, Rng, SamplerConfig};
use std::time::{Duration, Instant};

/// Logits of every position of a call: `rows × vocab`, row-major.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Logits {
    pub data: Vec<f32>,
    pub rows: usize,
    pub vocab: usize,
}

impl Logits {
    pub fn new(vocab: usize) -> Self {
        Logits {
            data: Vec::new(),
            rows: 0,
            vocab,
        }
    }

    /// Row `i` (panics if `i >= rows`, like slice indexing).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    /// The last row (empty if there are no rows).
    pub fn last_row(&self) -> &[f32] {
        if self.rows == 0 {
            &[]
        } else {
            self.row(self.rows - 1)
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// All rows, `[rows, vocab]` row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn iter_rows(&self) -> impl Iterator<Item = &[f32]> {
        self.data.chunks(self.vocab.max(1)).take(self.rows)
    }

    /// Append one row (must be `vocab` long).
    pub fn push_row(&mut self, row: &[f32]) {
        assert_eq!(row.len(), self.vocab, "row length");
        self.data.extend_from_slice(row);
        self.rows += 1;
    }
}

impl std::ops::Deref for Logits {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data
    }
}

/// Exit probabilities from a learned gate (Ouro), for the rows of the last call:
/// `λ_t = sigmoid(gate_t)`, `p_t = λ_t·Π_{j<t}(1−λ_j)` for `t < T−1`, `p_{T−1} = Π_{j<T−1}(1−λ_j)`,
/// where `T` is the number of iterations run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExitProbs {
    pub rows: usize,
    pub steps: usize,
    /// `[rows, steps]`: λ per row and iteration.
    pub lambdas: Vec<f32>,
    /// `[rows, steps]`: p per row and iteration (each row sums to 1).
    pub probs: Vec<f32>,
}

/// Derefs to `probs`, `[rows, steps]` row-major.
impl std::ops::Deref for ExitProbs {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.probs
    }
}

impl ExitProbs {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.probs[r * self.steps..(r + 1) * self.steps]
    }

    pub fn lambda_row(&self, r: usize) -> &[f32] {
        &self.lambdas[r * self.steps..(r + 1) * self.steps]
    }

    /// Ouro's `exit_threshold` rule: the first iteration whose cumulative probability reaches
    /// `q`, else the last one.
    pub fn exit_step(&self, r: usize, q: f32) -> usize {
        let mut cdf = 0.0f32;
        for (t, p) in self.row(r).iter().enumerate() {
            cdf += p;
            if cdf >= q {
                return t;
            }
        }
        self.steps.saturating_sub(1)
    }

    fn compute(&mut self, gates: &[f32], rows: usize, steps: usize) {
        self.rows = rows;
        self.steps = steps;
        self.lambdas.clear();
        self.probs.clear();
        self.lambdas.resize(rows * steps, 0.0);
        self.probs.resize(rows * steps, 0.0);
        for r in 0..rows {
            let mut rem = 1.0f32;
            for t in 0..steps {
                let l = gates[t * rows + r];
                self.lambdas[r * steps + t] = l;
                if t + 1 < steps {
                    self.probs[r * steps + t] = l * rem;
                    rem *= 1.0 - l;
                } else {
                    self.probs[r * steps + t] = rem;
                }
            }
        }
    }
}

/// A forced per-token recurrence depth (Huginn's `NumStepsGenerator`): it overrides the exit
/// policy, and the token at absolute position `p` runs exactly `depth(p)` iterations.
#[derive(Clone)]
pub enum DepthSchedule {
    /// `v[p]` for position `p`; positions past the end take the last entry.
    Positions(Vec<usize>),
    /// `v[p mod v.len()]`.
    Cycle(Vec<usize>),
    Fn(std::sync::Arc<dyn Fn(usize) -> usize + Send + Sync>),
}

impl DepthSchedule {
    pub fn from_fn(f: impl Fn(usize) -> usize + Send + Sync + 'static) -> Self {
        DepthSchedule::Fn(std::sync::Arc::new(f))
    }

    pub fn depth(&self, pos: usize) -> Option<usize> {
        match self {
            DepthSchedule::Positions(v) => v.get(pos).or(v.last()).copied(),
            DepthSchedule::Cycle(v) => (!v.is_empty()).then(|| v[pos % v.len()]),
            DepthSchedule::Fn(f) => Some(f(pos)),
        }
    }
}

impl std::fmt::Debug for DepthSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DepthSchedule::Positions(v) => write!(f, "Positions({v:?})"),
            DepthSchedule::Cycle(v) => write!(f, "Cycle({v:?})"),
            DepthSchedule::Fn(_) => write!(f, "Fn(..)"),
        }
    }
}

/// Time and work counters of a session.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub prefill_calls: usize,
    pub prefill_tokens: usize,
    pub prefill_time: Duration,
    pub decode_calls: usize,
    pub decode_time: Duration,
    /// Recurrence iterations run by each call, in order.
    pub iterations: Vec<usize>,
    /// Σ iterations over calls.
    pub total_iterations: usize,
    /// Σ tokens × iterations over calls (recurrent-block applications to a token).
    pub token_iterations: usize,
    /// KV-cache bytes allocated / holding filled positions (after the last call).
    pub kv_bytes_allocated: usize,
    pub kv_bytes_used: usize,
    /// Positions the KV cache holds (the sequence length so far).
    pub kv_positions: usize,
    /// Bytes of activation buffers held now: one workspace per recent call size, its buffers
    /// placed by the memory plan (`LOOPC_SHARE_BUFFERS`).
    pub activation_bytes: usize,
    /// `depth_histogram[d]`: tokens that ran exactly `d` recurrence iterations.
    pub depth_histogram: Vec<usize>,
    /// Token rows the readout (coda and head) ran on inside the recurrence, for per-step
    /// criteria; the final coda pass is not counted.
    pub readout_rows: usize,
    /// Per-operation timers `(name, total time, count)`; empty unless profiling is on
    /// (`LOOPC_PROFILE=1` or [`Session::set_profiling`]).
    pub profile: Vec<(&'static str, Duration, u64)>,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "prefill: {} call(s), {} tokens, {:.3} s ({:.1} tok/s)",
            self.prefill_calls,
            self.prefill_tokens,
            self.prefill_time.as_secs_f64(),
            self.prefill_tokens_per_s()
        )?;
        writeln!(
            f,
            "decode: {} step(s), {:.3} s ({:.1} tok/s)",
            self.decode_calls,
            self.decode_time.as_secs_f64(),
            self.decode_tokens_per_s()
        )?;
        let calls = self.iterations.len().max(1) as f64;
        writeln!(
            f,
            "recurrence: {} iterations over {} call(s) (mean {:.2}), {} token-iterations",
            self.total_iterations,
            self.iterations.len(),
            self.total_iterations as f64 / calls,
            self.token_iterations
        )?;
        let tokens = (self.prefill_tokens + self.decode_calls).max(1);
        writeln!(
            f,
            "block evaluations: {:.2} per token, readout rows in the loop: {}",
            self.token_iterations as f64 / tokens as f64,
            self.readout_rows
        )?;
        let hist: Vec<String> = self
            .depth_histogram
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(d, n)| format!("{d}:{n}"))
            .collect();
        writeln!(f, "depth histogram (depth:tokens): {}", hist.join(" "))?;
        write!(
            f,
            "kv cache: {:.1} KiB used, {:.1} KiB allocated, {} bytes per token, {} bytes per sequence",
            self.kv_bytes_used as f64 / 1024.0,
            self.kv_bytes_allocated as f64 / 1024.0,
            self.kv_bytes_used / self.kv_positions.max(1),
            self.kv_bytes_used
        )?;
        write!(
            f,
            "\nactivations: {:.1} KiB allocated",
            self.activation_bytes as f64 / 1024.0
        )?;
        if !self.profile.is_empty() {
            write!(f, "\n{}", profile_text(&self.profile))?;
        }
        Ok(())
    }
}

impl Stats {
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_time.is_zero() {
            0.0
        } else {
            self.decode_calls as f64 / self.decode_time.as_secs_f64()
        }
    }
    pub fn prefill_tokens_per_s(&self) -> f64 {
        if self.prefill_time.is_zero() {
            0.0
        } else {
            self.prefill_tokens as f64 / self.prefill_time.as_secs_f64()
        }
    }
}

/// One sequence being processed: its KV cache, position and counters.
///
/// Every call continues the sequence at [`Session::position`]. The number of recurrence
/// iterations is [`Session::set_steps`] (or the artifact's default); with a convergence exit
/// it is the cap. Huginn's random initial state is drawn per absolute position from the
/// artifact's seed, so it does not depend on how the sequence is split into calls (and is not
/// bit-identical to torch's generator).
pub struct Session {
    model: Model,
    steps: Option<usize>,
    schedule: Option<DepthSchedule>,
    pos: usize,
    st: ExecState,
    /// The last step's logits (reused: decode allocates nothing).
    step_out: Logits,
    exit: Option<ExitProbs>,
    stats: Stats,
    last_iterations: usize,
    /// The device state when the model runs on a GPU (`st` then holds only the exit results).
    dev: Option<crate::cuda::exec::DevState>,
}

/// Where a call left its logits.
const ON_DEVICE: usize = usize::MAX;

enum Kind {
    Prefill,
    Decode,
}

impl Session {
    pub(crate) fn new(model: Model) -> Self {
        let st = ExecState::new(&model.inner);
        let vocab = model.inner.manifest.vocab;
        let dev = model
            .inner
            .dev
            .as_ref()
            .map(|_| crate::cuda::exec::DevState::new(&model.inner));
        Session {
            model,
            steps: None,
            schedule: None,
            pos: 0,
            st,
            step_out: Logits::new(vocab),
            exit: None,
            stats: Stats::default(),
            last_iterations: 0,
            dev,
        }
    }

    /// The logits of the call that returned `wi`: `[S, vocab]`.
    fn logits_of(&self, wi: usize) -> &[f32] {
        match (&self.dev, wi) {
            (Some(d), ON_DEVICE) => &d.logits,
            _ => {
                let m = &self.model.inner;
                self.st.workspace(wi).buf(m.manifest.program.logits)
            }
        }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Recurrence iterations for the next calls (`None`: the artifact's default).
    pub fn set_steps(&mut self, steps: Option<usize>) {
        self.steps = steps;
    }

    pub fn steps(&self) -> Option<usize> {
        self.steps
    }

    /// Force the depth of every token (overrides the exit policy); `None` restores it.
    pub fn set_depth_schedule(&mut self, schedule: Option<DepthSchedule>) {
        self.schedule = schedule;
    }

    /// The stability guard for the next calls (default: warn at 10⁴× norm growth or non-finite).
    pub fn set_guard(&mut self, guard: crate::guard::Guard) {
        self.st.exits.guard = guard;
    }

    /// What the guard saw since the last call of this method (iteration, position, kind).
    pub fn take_guard_events(&mut self) -> Vec<crate::guard::GuardEvent> {
        std::mem::take(&mut self.st.exits.guard_events)
    }

    /// Record every token's state after every iteration (see [`crate::trace`]).
    pub fn set_trace(&mut self, on: bool) {
        self.st.exits.trace = on.then(crate::trace::Tracer::default);
    }

    /// The trace recorded since tracing was turned on or last taken.
    pub fn take_trace(&mut self) -> Vec<crate::trace::TraceStep> {
        self.st
            .exits
            .trace
            .as_mut()
            .map(|t| std::mem::take(&mut t.steps))
            .unwrap_or_default()
    }

    /// Override the exit policy's threshold (`q` for a gate exit) for the next calls; `None`
    /// restores the artifact's. A threshold that is not a finite number is an error (NaN
    /// would compare false everywhere and silently run every token to the cap).
    pub fn set_exit_threshold(&mut self, threshold: Option<f64>) -> Result<()> {
        self.st.exits.threshold = crate::exit::checked_threshold(threshold)?;
        Ok(())
    }

    /// Iterations each token of the last call ran.
    pub fn last_depths(&self) -> &[usize] {
        &self.st.exits.row_depth
    }

    /// Allocate the KV cache (every slot the current step setting uses) and the rotary tables
    /// for `positions` positions in all, so that the calls up to there allocate nothing and
    /// never move the cache: without it the cache grows as calls need it, and the call that
    /// grows it copies every slot into the new storage (d=1024, r=8: 47 MB at 160 positions).
    /// Reserving more than is used costs address space, not memory (the pages stay untouched).
    /// Calls past the reservation still grow the cache.
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        let m = &self.model.inner;
        self.stats.kv_bytes_allocated = match (&mut self.dev, &m.dev) {
            (Some(dev), Some(dm)) => {
                dev.reserve(m, dm, positions, self.steps)?;
                dev.kv.bytes_allocated()
            }
            _ => {
                self.st.reserve(m, None, positions, self.steps)?;
                self.st.kv.bytes_allocated()
            }
        };
        Ok(())
    }

    /// Number of tokens processed so far (the position of the next token).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Process `tokens` (one or more) at the current position; returns the logits of every
    /// position, `[tokens.len(), vocab]`.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Logits> {
        let wi = self.forward(tokens, Kind::Prefill)?;
        let vocab = self.model.inner.manifest.vocab;
        let l = &self.logits_of(wi)[..tokens.len() * vocab];
        Ok(Logits {
            data: l.to_vec(),
            rows: tokens.len(),
            vocab,
        })
    }

    /// As [`Session::prefill`], but computes (and returns) only the last position's logits:
    /// what generation needs, without the head's cost on every prompt row.
    pub fn prefill_last(&mut self, tokens: &[u32]) -> Result<Logits> {
        self.st.exits.logits_last_only = true;
        let r = self.forward(tokens, Kind::Prefill);
        self.st.exits.logits_last_only = false;
        let wi = r?;
        let vocab = self.model.inner.manifest.vocab;
        let s = tokens.len();
        let l = &self.logits_of(wi)[(s - 1) * vocab..s * vocab];
        Ok(Logits {
            data: l.to_vec(),
            rows: 1,
            vocab,
        })
    }

    /// Process one token; returns its logits (one row of `vocab`; reused by the next call).
    pub fn step(&mut self, token: u32) -> Result<&Logits> {
        let wi = self.forward(&[token], Kind::Decode)?;
        let vocab = self.model.inner.manifest.vocab;
        let mut out = std::mem::take(&mut self.step_out);
        out.data.clear();
        out.data.extend_from_slice(&self.logits_of(wi)[..vocab]);
        self.step_out = out;
        let out = &mut self.step_out;
        out.rows = 1;
        Ok(&self.step_out)
    }

    /// Run one call; returns the index of the workspace holding its logits.
    fn forward(&mut self, tokens: &[u32], kind: Kind) -> Result<usize> {
        if tokens.is_empty() {
            return Err(RuntimeError::EmptyInput);
        }
        let t0 = Instant::now();
        let m = &self.model.inner;
        self.st.exits.depths.clear();
        if let Some(sch) = &self.schedule {
            for p in self.pos..self.pos + tokens.len() {
                let d = sch
                    .depth(p)
                    .ok_or_else(|| RuntimeError::Config("the depth schedule is empty".into()))?;
                self.st.exits.depths.push(d);
            }
        }
        let info = match (&mut self.dev, &m.dev) {
            (Some(dev), Some(dm)) => {
                if self.st.exits.trace.is_some() {
                    return Err(RuntimeError::Unsupported("tracing (`set_trace`)".into()));
                }
                let call = crate::cuda::exec::Call {
                    tokens,
                    pos0: self.pos,
                    steps: self.steps,
                    depths: &self.st.exits.depths,
                    threshold: self.st.exits.threshold,
                };
                let iterations = dev.forward(m, dm, &call)?;
                let ex = &mut self.st.exits;
                ex.row_depth.clone_from(&dev.row_depth);
                ex.readout_rows = 0;
                self.st.gates.clone_from(&dev.gates);
                crate::exec::CallInfo {
                    iterations,
                    ws: ON_DEVICE,
                }
            }
            _ => self.st.forward(m, tokens, self.pos, self.steps)?,
        };
        let dt = t0.elapsed();
        let s = tokens.len();
        self.pos += s;
        self.last_iterations = info.iterations;
        // Exit probabilities of a gated recurrence.
        let gated = m
            .manifest
            .program
            .recur
            .as_ref()
            .is_some_and(|r| r.gate.is_some());
        if gated {
            let e = self.exit.get_or_insert_with(ExitProbs::default);
            e.compute(&self.st.gates, s, info.iterations);
        } else {
            self.exit = None;
        }
        let st = &mut self.stats;
        match kind {
            Kind::Prefill => {
                st.prefill_calls += 1;
                st.prefill_tokens += s;
                st.prefill_time += dt;
            }
            Kind::Decode => {
                st.decode_calls += 1;
                st.decode_time += dt;
            }
        }
        st.iterations.push(info.iterations);
        st.total_iterations += info.iterations;
        match &self.dev {
            Some(d) => {
                st.kv_bytes_allocated = d.kv.bytes_allocated();
                st.kv_bytes_used = d.kv.bytes_used();
            }
            None => {
                st.kv_bytes_allocated = self.st.kv.bytes_allocated();
                st.kv_bytes_used = self.st.kv.bytes_used();
            }
        }
        st.kv_positions = self.pos;
        st.readout_rows += self.st.exits.readout_rows;
        if m.manifest.program.recur.is_some() {
            for &d in &self.st.exits.row_depth {
                st.token_iterations += d;
                if st.depth_histogram.len() <= d {
                    st.depth_histogram.resize(d + 1, 0);
                }
                st.depth_histogram[d] += 1;
            }
        }
        Ok(info.ws)
    }

    /// Exit probabilities of the last call (only for artifacts with an exit gate).
    pub fn exit_probs(&self) -> Option<&ExitProbs> {
        self.exit.as_ref()
    }

    /// Recurrence iterations run by the last call.
    pub fn last_iterations(&self) -> usize {
        self.last_iterations
    }

    /// Counters (profile timers are filled in when profiling is on).
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.profile = self.st.profile_table();
        s.activation_bytes = match &self.dev {
            Some(d) => d.activation_bytes(),
            None => self.st.activation_bytes(),
        };
        s
    }

    /// Turn the per-operation timers on or off (they cost a clock read per instruction).
    pub fn set_profiling(&mut self, on: bool) {
        self.st.set_profiling(on);
    }

    pub fn reset_stats(&mut self) {
        self.stats = Stats::default();
        if let Some(p) = &mut self.st.profile {
            **p = Default::default();
        }
    }

    /// Start a new sequence: position 0, empty KV cache (allocations kept), no exit
    /// probabilities. Counters are kept (see [`Session::reset_stats`]).
    pub fn reset(&mut self) {
        self.pos = 0;
        self.st.kv.reset();
        if let Some(d) = &mut self.dev {
            d.kv.reset();
        }
        self.exit = None;
        self.last_iterations = 0;
        self.stats.kv_bytes_used = 0;
        self.stats.kv_positions = 0;
    }

    /// The device operations (launches, products, copies, with symbolic addresses) recorded
    /// since the last call, recording from now on when `on`; only `Device::CudaEmulated` records.
    /// For tests and debugging of the CUDA executor.
    #[doc(hidden)]
    pub fn device_log(&mut self, on: bool) -> Vec<String> {
        self.model
            .inner
            .dev
            .as_ref()
            .map_or_else(Vec::new, |d| d.gpu.take_log(on))
    }

    /// Filled length of every KV slot: `(site name, lengths per slot)`.
    pub fn kv_lens(&self) -> Vec<(String, Vec<usize>)> {
        match &self.dev {
            Some(d) => d.kv.lens(),
            None => self.st.kv.lens(),
        }
    }

    /// Keys and values (`[len, kv_heads·head_dim]` each) of a KV slot, for inspection (host
    /// caches only: `None` on a GPU).
    pub fn kv_slot(&self, site: usize, slot: usize) -> Option<(&[f32], &[f32])> {
        self.st.kv.slot_rows(site, slot)
    }
}

/// Everything a generation produced, so that callers can dump every logit.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateOutput {
    /// The new tokens (the prompt excluded), including a final stop token if one was drawn.
    pub tokens: Vec<u32>,
    /// Logits of every prompt position (`[P, vocab]`), or of the last one only (`[1, vocab]`)
    /// from [`generate_with`] with [`PromptLogits::Last`].
    pub prefill_logits: Logits,
    /// Logits of each decode step, one row per step (the step that consumed `tokens[i]` gives
    /// row `i`, which produced `tokens[i + 1]`).
    pub step_logits: Logits,
    /// Recurrence iterations of each call (prefill first).
    pub iterations: Vec<usize>,
    /// True when generation ended on a stop token.
    pub stopped: bool,
    /// Wall time of the prefill call, and of all decode steps (sampling included).
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl GenerateOutput {
    /// Write `prompt` and `tokens` (I64) and `prefill_logits` `[P, vocab]` and `decode_logits`
    /// `[steps, vocab]` (F32) to a safetensors file.
    pub fn write_safetensors(
        &self,
        path: impl AsRef<std::path::Path>,
        prompt: &[u32],
    ) -> Result<()> {
        use safetensors::tensor::TensorView;
        use safetensors::Dtype;
        let path = path.as_ref();
        let i64b =
            |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|&t| (t as i64).to_le_bytes()).collect() };
        let f32b = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let iters: Vec<u8> = self
            .iterations
            .iter()
            .flat_map(|&t| (t as i64).to_le_bytes())
            .collect();
        let data: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
            ("prompt", Dtype::I64, vec![prompt.len()], i64b(prompt)),
            (
                "tokens",
                Dtype::I64,
                vec![self.tokens.len()],
                i64b(&self.tokens),
            ),
            ("iterations", Dtype::I64, vec![self.iterations.len()], iters),
            (
                "prefill_logits",
                Dtype::F32,
                vec![self.prefill_logits.rows, self.prefill_logits.vocab],
                f32b(&self.prefill_logits.data),
            ),
            (
                "decode_logits",
                Dtype::F32,
                vec![self.step_logits.rows, self.step_logits.vocab],
                f32b(&self.step_logits.data),
            ),
        ];
        let views = data
            .iter()
            .map(|(n, dt, s, d)| {
                TensorView::new(*dt, s.clone(), d)
                    .map(|v| (n.to_string(), v))
                    .map_err(|e| RuntimeError::Config(format!("cannot serialize `{n}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, None, path).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(io) => RuntimeError::io(path, io),
            e => RuntimeError::Config(format!("cannot write `{}`: {e}", path.display())),
        })
    }
}

/// Per-operation timers `(name, total time, count)` as lines of a table (time, share of the
/// total, calls), as [`Stats`]' display ends with.
pub fn profile_text(profile: &[(&str, Duration, u64)]) -> String {
    let total: f64 = profile.iter().map(|p| p.1.as_secs_f64()).sum();
    profile
        .iter()
        .map(|(name, d, n)| {
            format!(
                "  {name:<14} {:>9.3} ms {:>5.1}% {:>8} calls",
                d.as_secs_f64() * 1e3,
                100.0 * d.as_secs_f64() / total.max(1e-12),
                n
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Which of the prompt's logits [`generate_with`] computes and keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptLogits {
    /// Every position's, as [`Session::prefill`] (what a dump of the run needs).
    #[default]
    All,
    /// The last position's only, as [`Session::prefill_last`]: the head skips the other rows,
    /// a quarter of a prompt's arithmetic at r = 1 for the d=1024 Huginn model, and 524 MB of
    /// logits (and their copy) at 4096 tokens. On f32 panels (`Model::packs_f32`) the last row
    /// is [`PromptLogits::All`]'s bit for bit; with row-major or bf16 weights it is the same
    /// product through another kernel, and may differ in the last bits.
    Last,
}

/// Prefill `prompt`, then sample up to `max_new_tokens` tokens, stopping after a token in
/// `stop_tokens`. Sampling uses a generator seeded with `cfg.seed`. Keeps every prompt
/// position's logits ([`generate_with`] can skip them).
pub fn generate(
    session: &mut Session,
    prompt: &[u32],
    max_new_tokens: usize,
    cfg: &SamplerConfig,
    stop_tokens: &[u32],
) -> Result<GenerateOutput> {
    generate_with(
        session,
        prompt,
        max_new_tokens,
        cfg,
        stop_tokens,
        PromptLogits::All,
    )
}

/// [`generate`] computing the prompt's logits that `prompt_logits` asks for.
pub fn generate_with(
    session: &mut Session,
    prompt: &[u32],
    max_new_tokens: usize,
    cfg: &SamplerConfig,
    stop_tokens: &[u32],
    prompt_logits: PromptLogits,
) -> Result<GenerateOutput> {
    let vocab = session.model.inner.manifest.vocab;
    let mut rng = Rng::new(cfg.seed);
    // The last sampled token is never fed back. A failed reservation (more positions than this
    // machine can map) is no error: the calls grow the cache as they go, and fail only if
    // the tokens actually generated need more memory than there is.
    let positions =
        (session.position() + prompt.len()).saturating_add(max_new_tokens.saturating_sub(1));
    let _ = session.reserve(positions);
    let t0 = Instant::now();
    let prefill_logits = match prompt_logits {
        PromptLogits::All => session.prefill(prompt)?,
        PromptLogits::Last => session.prefill_last(prompt)?,
    };
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let mut out = GenerateOutput {
        prefill_seconds,
        decode_seconds: 0.0,
        tokens: Vec::with_capacity(max_new_tokens),
        step_logits: Logits::new(vocab),
        iterations: vec![session.last_iterations()],
        prefill_logits,
        stopped: false,
    };
    if max_new_tokens == 0 {
        return Ok(out);
    }
    let mut next = sample(out.prefill_logits.last_row(), cfg, &mut rng);
    let t1 = Instant::now();
    loop {
        out.tokens.push(next);
        if stop_tokens.contains(&next) {
            out.stopped = true;
            break;
        }
        if out.tokens.len() >= max_new_tokens {
            break;
        }
        let l = session.step(next)?;
        out.step_logits.push_row(l.data());
        out.iterations.push(session.last_iterations());
        next = sample(out.step_logits.last_row(), cfg, &mut rng);
    }
    out.decode_seconds = t1.elapsed().as_secs_f64();
    Ok(out)
}
