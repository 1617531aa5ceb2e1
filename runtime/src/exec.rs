//! The interpreter for [`crate::artifact::Program`].
//!
//! A call runs the prelude, the recurrence (init, then `body` per iteration with `next → state`
//! and the exit policy) and the coda over `S` tokens at absolute positions `pos0..pos0 + S`.
//! Buffers are allocated once per `S` (a small cache of [`Workspace`]s), so repeated calls of the
//! same size (every decode step) allocate nothing, except when the KV cache or the rotary
//! tables double.

use crate::artifact::{Arg, CachePolicy, ExitPolicy, Instr, KernelSpec, Rows, StateInit};
use crate::error::{Result, RuntimeError};
use crate::exit::{History, Rule};
use crate::kernels::KernelFn;
use crate::kv::KvCache;
use crate::mem::AVec;
use crate::model::{Inner, Need};
use crate::rng::{fill_trunc_normal, mix, Rng};
use crate::rope::Rope;

mod per_row;
mod plan;
use std::time::{Duration, Instant};

/// Below this much estimated work (flops) a kernel call runs on the calling thread.
const INLINE_WORK: usize = 1 << 15;
/// Workspaces kept for distinct call sizes (decode's `S = 1` is always kept).
const MAX_WORKSPACES: usize = 4;

/// Categories of the optional per-operation timers.
pub(crate) const OP_NAMES: [&str; 9] = [
    "embed",
    "matmul",
    "concat/copy",
    "kv_write",
    "elementwise",
    "rmsnorm",
    "rope",
    "attention",
    "recur_control",
];

/// All buffers of the program for one call size `S`.
pub(crate) struct Workspace {
    pub(crate) s: usize,
    /// Per buffer: storage of its own, or a window of `arena` (see `plan`).
    bufs: Vec<AVec>,
    rows: Vec<usize>,
    ptrs: Vec<*mut f32>,
    /// Bytes allocated for the buffers: the arena and the buffers of their own.
    bytes: usize,
    /// Declared after `bufs`, whose windows point into it.
    _arena: AVec,
}

pub(crate) use plan::Plan as BufferPlan;

/// The model's buffer plan, made once at load (it depends on the program alone; each
/// workspace places its buffers by it). `LOOPC_SHARE_BUFFERS`: `1` (the default) lets buffers
/// whose live ranges do not overlap share storage; `0` gives every buffer its own, to rule
/// the plan out when chasing a wrong result.
pub(crate) fn buffer_plan(man: &crate::artifact::Manifest) -> Result<BufferPlan> {
    let share = crate::error::env_switch("LOOPC_SHARE_BUFFERS", true)?;
    Ok(plan::plan(man, share))
}

// SAFETY: the raw pointers in `ptrs` are scratch space rewritten before each use.
unsafe impl Send for Workspace {}

impl Workspace {
    fn new(m: &Inner, s: usize) -> Result<Self> {
        let man = &m.manifest;
        let plan = &m.buffer_plan;
        let arena_len = s.checked_mul(plan.arena_cols).ok_or(RuntimeError::Alloc {
            bytes: s as u128 * plan.arena_cols as u128 * 4,
            what: "activation buffers".into(),
        })?;
        let mut arena = AVec::zeroed(arena_len, "activation buffers")?;
        let mut bufs = Vec::with_capacity(man.buffers.len());
        let mut rows = Vec::with_capacity(man.buffers.len());
        let mut bytes = 4 * arena_len;
        for (b, off) in man.buffers.iter().zip(&plan.offset) {
            let r = match b.rows {
                Rows::Tokens => s,
                Rows::Fixed(n) => n,
            };
            let n = r.checked_mul(b.cols).ok_or(RuntimeError::Alloc {
                bytes: r as u128 * b.cols as u128 * 4,
                what: format!("buffer `{}`", b.name),
            })?;
            bufs.push(match off {
                // SAFETY: the plan places the buffer's `S · cols` floats inside the arena at a
                // 64-byte aligned offset, and only beside buffers whose live ranges do not
                // overlap its own, so no instruction sees two of them at once.
                Some(o) => unsafe { AVec::window(arena.as_mut_ptr().add(o * s), n) },
                None => {
                    bytes += 4 * n;
                    AVec::zeroed(n, &format!("buffer `{}`", b.name))?
                }
            });
            rows.push(r);
        }
        let ws = Workspace {
            s,
            bufs,
            rows,
            ptrs: Vec::with_capacity(8),
            bytes,
            _arena: arena,
        };
        ws.check_sizes(m)?;
        Ok(ws)
    }

    /// Size checks that depend on `S` (fixed-row buffers passed to row-wise kernels, ...).
    fn check_sizes(&self, m: &Inner) -> Result<()> {
        let man = &m.manifest;
        let s = self.s;
        let mut lists: Vec<(&str, &[Instr])> = vec![("prelude", &man.program.prelude)];
        if let Some(r) = &man.program.recur {
            lists.push(("recur body", &r.body));
        }
        lists.push(("coda", &man.program.coda));
        for (part, list) in lists {
            for (i, ins) in list.iter().enumerate() {
                let Instr::Kernel { kernel, args } = ins else {
                    continue;
                };
                for (j, (a, need)) in args.iter().zip(&m.needs[*kernel as usize]).enumerate() {
                    let (have, want) = match (a, need) {
                        (Arg::Buf(b), Need::PerRow(_)) => (self.rows[*b as usize], s),
                        (Arg::Buf(b), Need::Vector(c)) => (self.bufs[*b as usize].len(), *c),
                        (Arg::Weight(w), Need::PerRow(_)) => (w.rows, s),
                        _ => continue,
                    };
                    if have < want {
                        return Err(RuntimeError::manifest(format!(
                            "{part} instruction #{i} (Kernel `{}`), argument {j}: {have} available where {want} are needed for a call of {s} tokens",
                            man.kernels[*kernel as usize].symbol
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Rows of the logits buffer, `[S, vocab]`.
    pub(crate) fn buf(&self, b: u32) -> &[f32] {
        self.bufs[b as usize].as_slice()
    }
}

/// Per-token depth control and its results, kept across calls so decode reuses allocations.
#[derive(Default)]
pub(crate) struct Exits {
    /// Forced depth of each row of the next call (empty: none).
    pub(crate) depths: Vec<usize>,
    /// Run-time override of the policy's threshold (or the gate's `q`).
    pub(crate) threshold: Option<f64>,
    /// Iterations each row of the last call ran.
    pub(crate) row_depth: Vec<usize>,
    /// Rows the readout ran on in the last call (per-step criteria).
    pub(crate) readout_rows: usize,
    hist: History,
    active: Vec<usize>,
    keep: Vec<usize>,
    exiting: Vec<bool>,
    runs: Vec<(usize, usize, i64)>,
    /// Positions of the compact rows for a rotary matmul epilogue (reused: no allocation per
    /// step).
    rope_pos: Vec<usize>,
    final_state: Vec<f32>,
    saved: Vec<(u32, Vec<f32>)>,
    /// Routing (MoR): each call row's initial state (token choice), depth and weight, and the
    /// gate of each compact row in the current iteration (expert choice).
    route_init: Vec<f32>,
    route_depth: Vec<usize>,
    route_w: Vec<f32>,
    route_g: Vec<f32>,
    route_sig: Vec<f32>,
    route_idx: Vec<usize>,
    /// Compute the logits of each sequence's last row only (prefill when the caller samples).
    pub(crate) logits_last_only: bool,
    pub(crate) guard: crate::guard::Guard,
    /// Each call row's state norm after its first iteration (the guard's reference).
    guard_ref: Vec<f64>,
    /// Guard events since they were last taken.
    pub(crate) guard_events: Vec<crate::guard::GuardEvent>,
    /// Per-iteration trace of the state (`Session::set_trace`), when on.
    pub(crate) trace: Option<crate::trace::Tracer>,
}

/// Per-session mutable state of the interpreter.
pub(crate) struct ExecState {
    pub(crate) kv: KvCache,
    pub(crate) exits: Exits,
    ropes: Vec<Rope>,
    workspaces: Vec<Workspace>,
    /// Sigmoid of the exit gate, `[iteration][row]`, for the last call.
    pub(crate) gates: Vec<f32>,
    pub(crate) profile: Option<Box<[(Duration, u64); OP_NAMES.len()]>>,
}

/// What a call did.
pub(crate) struct CallInfo {
    pub(crate) iterations: usize,
    /// Index of the workspace holding the logits.
    pub(crate) ws: usize,
}

impl ExecState {
    pub(crate) fn new(m: &Inner) -> Self {
        let ring = m
            .manifest
            .program
            .recur
            .as_ref()
            .and_then(|r| r.cache.slots());
        ExecState {
            kv: KvCache::new(&m.manifest.kv_sites, ring),
            exits: Exits::default(),
            ropes: m.manifest.rope_tables.iter().map(Rope::new).collect(),
            workspaces: Vec::new(),
            gates: Vec::new(),
            // `LOOPC_PROFILE=1` turns the timers on for every session, single or batch.
            profile: std::env::var("LOOPC_PROFILE")
                .is_ok_and(|v| v == "1")
                .then(Box::default),
        }
    }

    /// Storage for `positions` positions in `kv` (this state's own cache when `None`) at the
    /// iteration count a call with `steps` would run, and the rotary tables to match: calls
    /// that stay within it allocate nothing and never move the cache.
    pub(crate) fn reserve(
        &mut self,
        m: &Inner,
        kv: Option<&mut KvCache>,
        positions: usize,
        steps: Option<usize>,
    ) -> Result<()> {
        let iterations = iterations_of(m, steps, &[]);
        kv.unwrap_or(&mut self.kv)
            .reserve_exact(iterations, positions)?;
        for r in &mut self.ropes {
            r.ensure(positions)?;
        }
        Ok(())
    }

    pub(crate) fn workspace(&self, i: usize) -> &Workspace {
        &self.workspaces[i]
    }

    /// Turn the per-operation timers on (keeping what they hold) or off.
    pub(crate) fn set_profiling(&mut self, on: bool) {
        match (on, &self.profile) {
            (true, None) => self.profile = Some(Box::default()),
            (false, _) => self.profile = None,
            (true, Some(_)) => {}
        }
    }

    /// The timers that ran, `(name, total time, count)`; empty when profiling is off.
    pub(crate) fn profile_table(&self) -> Vec<(&'static str, Duration, u64)> {
        self.profile.as_deref().map_or_else(Vec::new, |p| {
            OP_NAMES
                .iter()
                .zip(p.iter())
                .filter(|(_, (_, n))| *n > 0)
                .map(|(name, (d, n))| (*name, *d, *n))
                .collect()
        })
    }

    /// Bytes of the activation buffers of the workspaces held.
    pub(crate) fn activation_bytes(&self) -> usize {
        self.workspaces.iter().map(|w| w.bytes).sum()
    }

    fn workspace_for(&mut self, m: &Inner, s: usize) -> Result<usize> {
        if let Some(i) = self.workspaces.iter().position(|w| w.s == s) {
            return Ok(i);
        }
        let ws = Workspace::new(m, s)?;
        if self.workspaces.len() >= MAX_WORKSPACES {
            if let Some(evict) = self.workspaces.iter().position(|w| w.s != 1) {
                self.workspaces.remove(evict);
            }
        }
        self.workspaces.push(ws);
        Ok(self.workspaces.len() - 1)
    }

    /// Run the program on `tokens` at positions `pos0..`. `steps` overrides the recurrence
    /// length (a hard cap for convergence-based exits).
    pub(crate) fn forward(
        &mut self,
        m: &Inner,
        tokens: &[u32],
        pos0: usize,
        steps: Option<usize>,
    ) -> Result<CallInfo> {
        self.forward_segs(
            m,
            None,
            tokens,
            &[Seg {
                row0: 0,
                rows: tokens.len(),
                pos0,
            }],
            steps,
        )
    }

    /// Run the program on the rows of several sequences at once: `segs[b]` are sequence `b`'s
    /// rows of `tokens`, with its KV cache `kvs[b]` (`None`: this state's own cache, one segment).
    pub(crate) fn forward_segs(
        &mut self,
        m: &Inner,
        kvs: Option<&mut [KvCache]>,
        tokens: &[u32],
        segs: &[Seg],
        steps: Option<usize>,
    ) -> Result<CallInfo> {
        let s = tokens.len();
        if s == 0 {
            return Err(RuntimeError::EmptyInput);
        }
        for (i, &t) in tokens.iter().enumerate() {
            if t as usize >= m.token_limit {
                return Err(RuntimeError::TokenOutOfRange {
                    token: t,
                    index: i,
                    limit: m.token_limit,
                });
            }
        }
        if let Some(rec) = &m.manifest.program.recur {
            if cap_of(&rec.exit, rec.default_steps, steps, &self.exits.depths) == 0
                || self.exits.depths.contains(&0)
            {
                return Err(RuntimeError::ZeroSteps);
            }
        }
        let mut kv_len = 0;
        for sg in segs {
            let end = sg
                .pos0
                .checked_add(sg.rows)
                .ok_or_else(|| RuntimeError::Config("position overflow".into()))?;
            kv_len = kv_len.max(end);
        }
        for r in &mut self.ropes {
            r.ensure(kv_len)?;
        }
        let wi = self.workspace_for(m, s)?;
        let ExecState {
            kv,
            exits,
            ropes,
            workspaces,
            gates,
            profile,
        } = self;
        let kvs = match kvs {
            Some(k) => k,
            None => std::slice::from_mut(kv),
        };
        let iterations = iterations_of(m, steps, &exits.depths);
        for (kv, sg) in kvs.iter_mut().zip(segs) {
            kv.reserve(iterations, sg.pos0 + sg.rows)?;
        }
        let mut run = Run {
            m,
            kvs,
            segs,
            ex: exits,
            active: Vec::new(),
            n: s,
            ropes,
            ws: &mut workspaces[wi],
            tokens,
            profile: profile.as_deref_mut(),
        };
        let iterations = m.pool.install(|| match &m.team {
            Some(team) if s <= crate::par::TEAM_ROWS => team.install(|| run.program(steps, gates)),
            _ => run.program(steps, gates),
        })?;
        Ok(CallInfo { iterations, ws: wi })
    }
}

/// [`cap_of`] for the model's recurrence; 0 for a model without one.
pub(crate) fn iterations_of(m: &Inner, steps: Option<usize>, depths: &[usize]) -> usize {
    m.manifest
        .program
        .recur
        .as_ref()
        .map_or(0, |rec| cap_of(&rec.exit, rec.default_steps, steps, depths))
}

/// Recurrence length of a call: the forced depths' maximum, else the per-call override, else
/// the policy's cap.
pub(crate) fn cap_of(
    exit: &ExitPolicy,
    default_steps: usize,
    steps: Option<usize>,
    depths: &[usize],
) -> usize {
    if let Some(&d) = depths.iter().max() {
        return d;
    }
    match *exit {
        ExitPolicy::Fixed => steps.unwrap_or(default_steps),
        ExitPolicy::Converge { max_steps, .. }
        | ExitPolicy::Criterion { max_steps, .. }
        | ExitPolicy::Gate { max_steps, .. }
        | ExitPolicy::Act { max_steps, .. }
        | ExitPolicy::ExpertChoice { max_steps, .. }
        | ExitPolicy::TokenChoice { max_steps, .. } => steps.unwrap_or(max_steps),
    }
}

/// One sequence's rows of a call: rows `row0..row0 + rows` at positions `pos0..`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg {
    pub(crate) row0: usize,
    pub(crate) rows: usize,
    pub(crate) pos0: usize,
}

struct Run<'a> {
    m: &'a Inner,
    /// One KV cache per sequence (segment).
    kvs: &'a mut [KvCache],
    segs: &'a [Seg],
    ex: &'a mut Exits,
    /// Call rows held by the compacted buffers, in order (empty: all rows, uncompacted).
    active: Vec<usize>,
    /// Rows the buffers currently hold.
    n: usize,
    ropes: &'a mut [Rope],
    ws: &'a mut Workspace,
    tokens: &'a [u32],
    profile: Option<&'a mut [(Duration, u64); OP_NAMES.len()]>,
}

#[derive(Clone, Copy)]
struct SendPtr(*const *mut f32);
// SAFETY: the pointer array outlives the parallel loop that shares it; kernels only read it.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl<'a> Run<'a> {
    fn program(&mut self, steps: Option<usize>, gates: &mut Vec<f32>) -> Result<usize> {
        let m = self.m;
        let prog = &m.manifest.program;
        gates.clear();
        self.list(&prog.prelude, None)?;
        let mut iterations = 0;
        if let Some(rec) = &prog.recur {
            let t0 = self.profile.is_some().then(Instant::now);
            self.init_state(&rec.init, rec.state)?;
            if let Some(tr) = self.ex.trace.as_mut() {
                tr.begin(&m.manifest, rec, self.ws.s);
            }
            self.time(8, t0);
            let cap = cap_of(&rec.exit, rec.default_steps, steps, &self.ex.depths);
            if let Some(l) = m.iter_limit.filter(|&l| cap > l) {
                return Err(RuntimeError::Config(format!(
                    "this model has per-iteration weights for {l} iterations; it cannot run {cap}"
                )));
            }
            let converge = match rec.exit {
                ExitPolicy::Converge {
                    threshold,
                    min_steps,
                    ..
                } => Some((self.ex.threshold.unwrap_or(threshold), min_steps)),
                _ => None,
            };
            let rule = if self.ex.depths.is_empty() {
                Rule::of(&rec.exit, self.ex.threshold)
            } else {
                Rule::None
            };
            let s = self.ws.s;
            self.ex.readout_rows = 0;
            if !self.ex.depths.is_empty() || !matches!(rule, Rule::None) {
                let iterations = self.per_row(rec, cap, rule, gates)?;
                self.list(&prog.coda, None)?;
                return Ok(iterations);
            }
            while iterations < cap {
                self.list(&rec.body, Some(iterations))?;
                self.after_iteration(iterations, rec)?;
                let t0 = self.profile.is_some().then(Instant::now);
                if let Some(g) = rec.gate {
                    gates.extend(
                        self.ws.buf(g)[..s]
                            .iter()
                            .map(|&x| 1.0 / (1.0 + (-x).exp())),
                    );
                }
                let stop = match converge {
                    Some((thr, min)) if iterations + 1 >= min => {
                        self.rel_change(rec.next, rec.state) < thr
                    }
                    _ => false,
                };
                self.copy(rec.next, rec.state);
                self.time(8, t0);
                iterations += 1;
                if self.ex.trace.is_some() {
                    let last = stop || iterations == cap;
                    self.trace_decide(rec, false, &|_| last)?;
                }
                if stop {
                    break;
                }
            }
            if iterations == 0 {
                // The coda may read either buffer: both hold the initial state.
                self.copy(rec.state, rec.next);
            }
            self.ex.row_depth.clear();
            self.ex.row_depth.resize(s, iterations);
        }
        self.list(&prog.coda, None)?;
        Ok(iterations)
    }

    /// After each iteration: record the trace (when on) and run the stability guard on the rows
    /// the body just computed (`next`, against the previous `state`).
    fn after_iteration(&mut self, iteration: usize, rec: &crate::artifact::Recur) -> Result<()> {
        use crate::guard::{check, GuardMode};
        let cols = self.m.manifest.buffers[rec.state as usize].cols;
        let n = if self.active.is_empty() {
            self.ws.s
        } else {
            self.active.len()
        };
        let (active, segs) = (&self.active, self.segs);
        // (call row, absolute position) of compact row i.
        let row = |i: usize| {
            let c = if active.is_empty() { i } else { active[i] };
            (c, position_in(segs, c))
        };
        let (nb, sb) = (rec.next as usize, rec.state as usize);
        if let Some(tr) = self.ex.trace.as_mut() {
            let ws = &*self.ws;
            let (a, b) = (ws.bufs[nb].as_slice(), ws.bufs[sb].as_slice());
            let rows: Vec<(usize, usize)> = (0..n).map(row).collect();
            let layers: Vec<&[f32]> = tr
                .plan
                .as_ref()
                .map_or(&[][..], |p| &p.layers[..])
                .iter()
                .map(|&l| ws.bufs[l as usize].as_slice())
                .collect();
            tr.record(iteration, &rows, a, b, &layers, cols);
        }
        let guard = self.ex.guard;
        if guard.mode == GuardMode::Off {
            return Ok(());
        }
        if iteration == 0 {
            self.ex.guard_ref.clear();
            self.ex.guard_ref.resize(self.ws.s, f64::NAN);
        }
        // `next` and `state` are distinct buffers (validated), so one can be written while the
        // other is read, without copying the previous state on this per-iteration path.
        let (next, prev) = if nb < sb {
            let (lo, hi) = self.ws.bufs.split_at_mut(sb);
            (lo[nb].as_mut_slice(), hi[0].as_slice())
        } else {
            let (lo, hi) = self.ws.bufs.split_at_mut(nb);
            (hi[0].as_mut_slice(), lo[sb].as_slice())
        };
        let events = check(
            &guard,
            iteration,
            (0..n).map(row),
            &mut next[..n * cols],
            &prev[..n * cols],
            cols,
            &mut self.ex.guard_ref,
        );
        if guard.mode == GuardMode::Error {
            if let Some(e) = events.first() {
                return Err(RuntimeError::Unstable(e.to_string()));
            }
        }
        self.ex.guard_events.extend(events);
        Ok(())
    }

    /// Traced calls only, after an iteration's state update: the logit criteria (running the
    /// readout unless `logits_ready`) and the decision `exited(i)` of compact row `i`.
    pub(super) fn trace_decide(
        &mut self,
        rec: &crate::artifact::Recur,
        logits_ready: bool,
        exited: &dyn Fn(usize) -> bool,
    ) -> Result<()> {
        let man = &self.m.manifest;
        let has_readout = !rec.readout.is_empty();
        if has_readout && !logits_ready {
            // The readout must cover every row here, whatever the caller asked for the final
            // logits.
            let last_only = std::mem::replace(&mut self.ex.logits_last_only, false);
            for &i in &rec.readout {
                self.list(std::slice::from_ref(&man.program.coda[i as usize]), None)?;
            }
            self.ex.logits_last_only = last_only;
        }
        let n = self.n;
        let call: Vec<usize> = (0..n)
            .map(|i| {
                if self.active.is_empty() {
                    i
                } else {
                    self.active[i]
                }
            })
            .collect();
        let logits = has_readout.then(|| self.ws.buf(man.program.logits));
        if let Some(tr) = self.ex.trace.as_mut() {
            tr.decide(&call, logits, man.vocab, exited);
        }
        Ok(())
    }

    /// Traced calls only: each computed row's attention entropy per head at one attention site
    /// of the block, recomputed from the query rows and the cache slot the kernel just read.
    fn trace_attention(&mut self, spec: &KernelSpec, args: &[Arg], iter: usize) {
        let KernelSpec::Attention {
            heads,
            kv_heads,
            head_dim,
            scale,
        } = *spec
        else {
            return;
        };
        let (Some(Arg::Buf(q)), Some(Arg::KCache(site))) = (args.first(), args.get(1)) else {
            return;
        };
        let Some(tr) = self.ex.trace.as_mut() else {
            return;
        };
        let Some(off) = tr.plan.as_ref().and_then(|p| p.site_offset(*site)) else {
            return;
        };
        let total = tr.heads();
        let mut attn = std::mem::take(&mut tr.attn);
        let site = *site as usize;
        let recursion_wise = self
            .m
            .manifest
            .program
            .recur
            .as_ref()
            .is_some_and(|r| r.cache == CachePolicy::RecursionWise);
        let group = (heads / kv_heads.max(1)).max(1);
        let width = kv_heads * head_dim;
        let qb = self.ws.bufs[*q as usize].as_slice();
        let mut scores = Vec::new();
        for b in 0..self.segs.len() {
            let (ia, ib) = self.seg_range(b);
            let kv = &self.kvs[b];
            let slot = kv.slot_of(site, Some(iter));
            let Some((k, _)) = kv.slot_rows(site, slot) else {
                continue;
            };
            let filled = k.len() / width.max(1);
            for i in ia..ib {
                let len = if recursion_wise {
                    (filled + i + 1).saturating_sub(ib)
                } else {
                    self.position_of(i) + 1
                }
                .min(filled);
                let c = if self.active.is_empty() {
                    i
                } else {
                    self.active[i]
                };
                for h in 0..heads {
                    let qr = &qb[(i * heads + h) * head_dim..(i * heads + h + 1) * head_dim];
                    let e = crate::trace::attention_entropy(
                        qr,
                        k,
                        width,
                        (h / group) * head_dim,
                        len,
                        scale,
                        &mut scores,
                    );
                    if let Some(x) = attn.get_mut(c * total + off + h) {
                        *x = e;
                    }
                }
            }
        }
        if let Some(tr) = self.ex.trace.as_mut() {
            tr.attn = attn;
        }
    }

    #[inline]
    fn time(&mut self, cat: usize, t0: Option<Instant>) {
        if let (Some(p), Some(t0)) = (self.profile.as_deref_mut(), t0) {
            p[cat].0 += t0.elapsed();
            p[cat].1 += 1;
        }
    }

    fn init_state(&mut self, init: &StateInit, state: u32) -> Result<()> {
        match init {
            StateInit::Zeros => self.ws.bufs[state as usize].as_mut_slice().fill(0.0),
            StateInit::From(b) => self.copy(*b, state),
            StateInit::TruncNormal { std, scale, seed } => {
                let cols = self.m.manifest.buffers[state as usize].cols;
                let segs = self.segs;
                let out = self.ws.bufs[state as usize].as_mut_slice();
                // One generator per absolute position: the initial state of a token does not
                // depend on how the sequence was split into calls.
                for (r, row) in out.chunks_mut(cols.max(1)).enumerate().take(self.ws.s) {
                    let pos = segs
                        .iter()
                        .find(|g| r >= g.row0 && r < g.row0 + g.rows)
                        .map_or(r, |g| g.pos0 + r - g.row0);
                    let mut rng = Rng::new(mix(*seed, pos as u64));
                    fill_trunc_normal(row, *std, *scale, &mut rng);
                }
            }
        }
        Ok(())
    }

    /// Mean over rows of ‖a − b‖₂ / ‖a‖₂.
    fn rel_change(&self, next: u32, prev: u32) -> f64 {
        let cols = self.m.manifest.buffers[next as usize].cols;
        let s = self.ws.s;
        if cols == 0 || s == 0 {
            return 0.0;
        }
        let a = self.ws.buf(next);
        let b = self.ws.buf(prev);
        let mut total = 0.0;
        for r in 0..s {
            let (ra, rb) = (&a[r * cols..(r + 1) * cols], &b[r * cols..(r + 1) * cols]);
            let mut d = 0.0f64;
            let mut n = 0.0f64;
            for (&x, &y) in ra.iter().zip(rb) {
                d += (x as f64 - y as f64).powi(2);
                n += (x as f64).powi(2);
            }
            total += if n > 0.0 {
                d.sqrt() / n.sqrt()
            } else if d == 0.0 {
                0.0
            } else {
                f64::INFINITY
            };
        }
        total / s as f64
    }

    fn copy(&mut self, src: u32, dst: u32) {
        self.copy_n(src, dst, usize::MAX)
    }

    /// Compact rows `[ia, ib)` of segment `b` (the active rows of that sequence).
    fn seg_range(&self, b: usize) -> (usize, usize) {
        let g = self.segs[b];
        if self.active.is_empty() {
            (g.row0, g.row0 + g.rows)
        } else {
            (
                self.active.partition_point(|&r| r < g.row0),
                self.active.partition_point(|&r| r < g.row0 + g.rows),
            )
        }
    }

    /// Runs `(i0, i1, pos0)` of compact rows in `[ia, ia + len)` of segment `b` with consecutive
    /// positions, `pos0` shifted so that row `i` of the run is at its own position.
    fn pos_runs(&self, b: usize, ia: usize, ib: usize, out: &mut Vec<(usize, usize, i64)>) {
        out.clear();
        let g = self.segs[b];
        if self.active.is_empty() {
            out.push((ia, ib, g.pos0 as i64 - g.row0 as i64));
            return;
        }
        for (j0, j1) in crate::rows::runs(&self.active[ia..ib]) {
            let i0 = ia + j0;
            out.push((
                i0,
                ia + j1,
                (g.pos0 + self.active[i0] - g.row0) as i64 - i0 as i64,
            ));
        }
    }

    /// Absolute position of compact row `i` within its own sequence.
    fn position_of(&self, i: usize) -> usize {
        let c = if self.active.is_empty() {
            i
        } else {
            self.active[i]
        };
        position_in(self.segs, c)
    }

    /// Rows a buffer holds now (compacted per-token buffers hold `n`).
    fn rows_of(&self, b: u32) -> usize {
        match self.m.manifest.buffers[b as usize].rows {
            Rows::Tokens => self.n,
            Rows::Fixed(r) => r,
        }
    }

    fn copy_n(&mut self, src: u32, dst: u32, n: usize) {
        if src == dst {
            return;
        }
        let n = n
            .min(self.ws.bufs[src as usize].len())
            .min(self.ws.bufs[dst as usize].len());
        let sp = self.ws.bufs[src as usize].as_ptr();
        let dp = self.ws.bufs[dst as usize].as_mut_ptr();
        // SAFETY: distinct buffers, both at least n long.
        unsafe { std::ptr::copy_nonoverlapping(sp, dp, n) };
    }

    /// Positions of the compact rows `0..n` for a matmul with a rotary epilogue (`need`): row
    /// `i` at `pos0 + i` for one sequence in order, else each row's own position in its
    /// sequence, as the `Rope` kernel's per-run calls see it.
    fn row_pos(&mut self, need: bool) -> crate::matmul::RowPos<'a> {
        use crate::matmul::RowPos;
        let simple = self.segs.len() == 1
            && self.segs[0].row0 == 0
            && self.active.last().is_none_or(|&r| r + 1 == self.n);
        if !need || simple {
            return RowPos::From(self.segs.first().map_or(0, |g| g.pos0));
        }
        let mut pos = std::mem::take(&mut self.ex.rope_pos);
        pos.clear();
        pos.extend((0..self.n).map(|i| self.position_of(i)));
        self.ex.rope_pos = pos;
        let v = &self.ex.rope_pos;
        // SAFETY: the vector is not touched again until the next instruction asks for
        // positions, after this instruction's matmul (the only reader) has returned.
        RowPos::Rows(unsafe { std::slice::from_raw_parts(v.as_ptr(), v.len()) })
    }

    /// The epilogue of a matmul over rows `r0 .. r0 + rows` with `n` output columns; `pos`
    /// holds the positions of those rows.
    fn epi(
        &self,
        e: &crate::artifact::Epilogue,
        iter: Option<usize>,
        r0: usize,
        rows: usize,
        n: usize,
        pos: crate::matmul::RowPos<'a>,
    ) -> crate::matmul::Epi<'a> {
        let buf = |b: u32, w: usize| -> &'a [f32] {
            let v = &self.ws.bufs[b as usize];
            // SAFETY: the workspace outlives the call and these buffers are only read while the
            // matmul writes its own, different output buffer (validated by `Model::new`).
            unsafe { std::slice::from_raw_parts(v.as_ptr().add(r0 * w), rows * w) }
        };
        crate::matmul::Epi {
            row_scale: e.row_scale.map(|b| buf(b, 1)),
            residual: e.residual.map(|b| buf(b, n)),
            bias: e.bias.map(|b| weight(self.m, &b, iter)),
            glu: e.glu.map(|g| {
                let half = n / 2;
                // SAFETY: the gated output is a buffer of its own (validated by `Model::new`),
                // written only by this matmul.
                let o = unsafe { self.out_rows(g.out, r0 * half, rows * half) };
                crate::matmul::GluEpi::new(o, g.block, g.act)
            }),
            norm: e.norm.map(|nm| {
                crate::matmul::NormEpi::new(
                    nm.eps,
                    nm.normalize,
                    nm.gain.map(|g| weight(self.m, &g, iter)),
                    // SAFETY: as for the gated output: its own buffer, written only here.
                    nm.inv_rms.map(|q| unsafe { self.out_rows(q, r0, rows) }),
                )
            }),
            rope: e.rope.map(|rp| {
                let t = &self.ropes[rp.table as usize];
                // SAFETY: the tables were grown for this call's positions before it started
                // and are not resized while it runs.
                let (cos, sin) = unsafe {
                    (
                        std::slice::from_raw_parts(t.cos().as_ptr(), t.cos().len()),
                        std::slice::from_raw_parts(t.sin().as_ptr(), t.sin().len()),
                    )
                };
                crate::matmul::RopeEpi {
                    cos,
                    sin,
                    head_dim: rp.head_dim,
                    style: rp.style,
                    pos,
                }
            }),
        }
    }

    /// `len` elements of buffer `b` from `at`, writable while other buffers are read.
    ///
    /// # Safety
    /// No live slice may cover `b`.
    unsafe fn out_rows(&self, b: u32, at: usize, len: usize) -> &'a mut [f32] {
        let v = &self.ws.bufs[b as usize];
        assert!(at + len <= v.len(), "matmul output size");
        std::slice::from_raw_parts_mut(v.as_ptr().add(at) as *mut f32, len)
    }

    fn list(&mut self, list: &[Instr], iter: Option<usize>) -> Result<()> {
        for ins in list {
            let t0 = self.profile.is_some().then(Instant::now);
            let cat = self.instr(ins, iter)?;
            self.time(cat, t0);
        }
        Ok(())
    }

    /// Execute one instruction; returns its timer category.
    fn instr(&mut self, ins: &Instr, iter: Option<usize>) -> Result<usize> {
        let m = self.m;
        let bufs = &m.manifest.buffers;
        let s = self.n;
        match ins {
            Instr::Embed { table, out } if packed(m, table, iter, false).is_some() => {
                let p = packed(m, table, iter, false).expect("checked by the guard");
                let cols = table.cols;
                let o = self.ws.bufs[*out as usize].as_mut_slice();
                for r in 0..s {
                    let t = self.tokens[if self.active.is_empty() {
                        r
                    } else {
                        self.active[r]
                    }];
                    p.row_into(t as usize, &mut o[r * cols..(r + 1) * cols]);
                }
                Ok(0)
            }
            Instr::Embed { table, out } => {
                let cols = table.cols;
                let w = weight(m, table, iter).as_ptr();
                let o = self.ws.bufs[*out as usize].as_mut_slice();
                for r in 0..s {
                    let t = self.tokens[if self.active.is_empty() {
                        r
                    } else {
                        self.active[r]
                    }];
                    // SAFETY: tokens were checked against the smallest table's rows; the window
                    // was validated against the weight.
                    let row = unsafe { std::slice::from_raw_parts(w.add(t as usize * cols), cols) };
                    o[r * cols..(r + 1) * cols].copy_from_slice(row);
                }
                Ok(0)
            }
            Instr::MatMul { x, w, out, .. } | Instr::MatMulKN { x, w, out }
                if *out == m.manifest.program.logits
                    && self.ex.logits_last_only
                    && self.active.is_empty() =>
            {
                // The head on each sequence's last row only: a prefill that only samples the next
                // token skips (rows − 1) · vocab · dim multiply-adds.
                let (k, n) = if matches!(ins, Instr::MatMul { .. }) {
                    (w.cols, w.rows)
                } else {
                    (w.rows, w.cols)
                };
                let kn = matches!(ins, Instr::MatMulKN { .. });
                let pw = packed(m, w, iter, kn);
                let wd = if pw.is_some() {
                    &[][..]
                } else {
                    weight(m, w, iter)
                };
                for g in self.segs {
                    if g.rows == 0 {
                        continue;
                    }
                    let r = g.row0 + g.rows - 1;
                    let last_pos = crate::matmul::RowPos::From(g.pos0 + g.rows - 1);
                    let xs = self.ws.bufs[*x as usize].as_slice()[r * k..(r + 1) * k].to_vec();
                    if let Some(p) = pw {
                        let e = match ins {
                            Instr::MatMul { epi, .. } => self.epi(epi, iter, r, 1, n, last_pos),
                            _ => crate::matmul::Epi::default(),
                        };
                        // SAFETY: the epilogue's buffers differ from `out` (validated).
                        let os = unsafe { self.out_rows(*out, r * n, n) };
                        packed_matmul(None, &xs, p, os, 1, m.threads, &e);
                    } else if let Instr::MatMul { epi, .. } = ins {
                        let e = self.epi(epi, iter, r, 1, n, last_pos);
                        // SAFETY: the epilogue's buffers differ from `out` (validated).
                        let os = unsafe { self.out_rows(*out, r * n, n) };
                        crate::matmul::matmul_epi(&xs, wd, os, 1, k, n, m.threads, &e);
                    } else {
                        let os =
                            &mut self.ws.bufs[*out as usize].as_mut_slice()[r * n..(r + 1) * n];
                        crate::matmul::matmul_kn(&xs, wd, os, 1, k, n, m.threads);
                    }
                }
                Ok(1)
            }
            Instr::MatMul { x, w, out, epi } if packed(m, w, iter, false).is_some() => {
                let p = packed(m, w, iter, false).expect("checked by the guard");
                let rows = self.rows_of(*x);
                let pos = self.row_pos(epi.rope.is_some());
                let xb = &self.ws.bufs[*x as usize];
                // SAFETY: x != out (validated), so the two slices do not alias.
                let xs = unsafe { std::slice::from_raw_parts(xb.as_ptr(), xb.len()) };
                let e = self.epi(epi, iter, 0, rows, w.rows, pos);
                // SAFETY: the epilogue's buffers differ from `out` (validated).
                let os = unsafe { self.out_rows(*out, 0, rows * w.rows) };
                packed_matmul(m.kernels.gemm, xs, p, os, rows, m.threads, &e);
                Ok(1)
            }
            Instr::MatMulKN { x, w, out } if packed(m, w, iter, true).is_some() => {
                let p = packed(m, w, iter, true).expect("checked by the guard");
                let rows = self.rows_of(*x);
                let xb = &self.ws.bufs[*x as usize];
                // SAFETY: x != out (validated), so the two slices do not alias.
                let xs = unsafe { std::slice::from_raw_parts(xb.as_ptr(), xb.len()) };
                let os = self.ws.bufs[*out as usize].as_mut_slice();
                packed_matmul(
                    m.kernels.gemm,
                    xs,
                    p,
                    os,
                    rows,
                    m.threads,
                    &Default::default(),
                );
                Ok(1)
            }
            Instr::MatMul { x, w, out, epi } => {
                let rows = self.rows_of(*x);
                let pos = self.row_pos(epi.rope.is_some());
                let wd = weight(m, w, iter);
                let xb = &self.ws.bufs[*x as usize];
                // SAFETY: x != out (validated), so the two slices do not alias.
                let xs = unsafe { std::slice::from_raw_parts(xb.as_ptr(), xb.len()) };
                let e = self.epi(epi, iter, 0, rows, w.rows, pos);
                // SAFETY: the epilogue's buffers differ from `out` (validated).
                let os = unsafe { self.out_rows(*out, 0, rows * w.rows) };
                crate::matmul::matmul_epi_on(
                    m.kernels.gemm,
                    xs,
                    wd,
                    os,
                    rows,
                    w.cols,
                    w.rows,
                    m.threads,
                    &e,
                );
                Ok(1)
            }
            Instr::MatMulParts { x, w, parts } if !m.packed.is_empty() => {
                // Each part packed as a matmul of its own rows (the plan's windows): f32
                // panels run as one pass over every part, bf16 one matmul per part.
                let rows = self.rows_of(*x);
                let pos = self.row_pos(parts.iter().any(|p| p.epi.rope.is_some()));
                let xb = &self.ws.bufs[*x as usize];
                // SAFETY: x is none of the outputs (validated), so the slices do not alias.
                let xs = unsafe { std::slice::from_raw_parts(xb.as_ptr(), xb.len()) };
                let widths = parts.iter().map(|p| bufs[p.out as usize].cols);
                // On the stack: no allocation per decode step.
                let mut jobs: [Option<crate::matmul::Job>; crate::matmul::MAX_PARTS] =
                    Default::default();
                for ((p, pw), job) in parts
                    .iter()
                    .zip(crate::dtype::part_windows(*w, widths))
                    .zip(jobs.iter_mut())
                {
                    let n = pw.rows;
                    let packed = packed(m, &pw, iter, false).ok_or_else(|| {
                        RuntimeError::Config(format!(
                            "part of `{}` was not packed at load",
                            m.manifest.buffers[p.out as usize].name
                        ))
                    })?;
                    let e = self.epi(&p.epi, iter, 0, rows, n, pos);
                    // SAFETY: the outputs are distinct and differ from every buffer read.
                    let os = unsafe { self.out_rows(p.out, 0, rows * n) };
                    match packed {
                        crate::dtype::PackedW::F32(w) => {
                            *job = Some(crate::matmul::Job { w, out: os, epi: e })
                        }
                        bf16 => packed_matmul(m.kernels.gemm, xs, bf16, os, rows, m.threads, &e),
                    }
                }
                crate::matmul::matmul_packed_jobs(xs, rows, m.threads, &mut jobs);
                Ok(1)
            }
            Instr::MatMulParts { x, w, parts } => {
                let rows = self.rows_of(*x);
                let pos = self.row_pos(parts.iter().any(|p| p.epi.rope.is_some()));
                let wd = weight(m, w, iter);
                let xb = &self.ws.bufs[*x as usize];
                // SAFETY: x is none of the outputs (validated), so the slices do not alias.
                let xs = unsafe { std::slice::from_raw_parts(xb.as_ptr(), xb.len()) };
                // On the stack: no allocation per decode step.
                let mut ps: [crate::matmul::Part; crate::matmul::MAX_PARTS] = Default::default();
                for (p, d) in parts.iter().zip(ps.iter_mut()) {
                    let n = bufs[p.out as usize].cols;
                    d.n = n;
                    d.epi = self.epi(&p.epi, iter, 0, rows, n, pos);
                    // SAFETY: the outputs are distinct and differ from every buffer read
                    // (validated by `Model::new`).
                    d.out = unsafe { self.out_rows(p.out, 0, rows * n) };
                }
                let ps = &mut ps[..parts.len()];
                crate::matmul::matmul_parts_on(m.kernels.gemm, xs, wd, ps, rows, w.cols, m.threads);
                Ok(1)
            }
            Instr::MatMulKN { x, w, out } => {
                let rows = self.rows_of(*x);
                let wd = weight(m, w, iter);
                let xb = &self.ws.bufs[*x as usize];
                // SAFETY: x != out (validated), so the two slices do not alias.
                let xs = unsafe { std::slice::from_raw_parts(xb.as_ptr(), xb.len()) };
                let os = self.ws.bufs[*out as usize].as_mut_slice();
                crate::matmul::matmul_kn_on(
                    m.kernels.gemm,
                    xs,
                    wd,
                    os,
                    rows,
                    w.rows,
                    w.cols,
                    m.threads,
                );
                Ok(1)
            }
            Instr::Concat { inputs, out } => {
                let oc = bufs[*out as usize].cols;
                let rows = self.rows_of(*out);
                let op = self.ws.bufs[*out as usize].as_mut_ptr();
                let mut off = 0;
                for b in inputs {
                    let c = bufs[*b as usize].cols;
                    let ip = self.ws.bufs[*b as usize].as_ptr();
                    for r in 0..rows {
                        // SAFETY: shapes validated (same rows, columns add up); out is not an input.
                        unsafe {
                            std::ptr::copy_nonoverlapping(ip.add(r * c), op.add(r * oc + off), c)
                        };
                    }
                    off += c;
                }
                Ok(2)
            }
            Instr::Copy { src, dst } => {
                let n = self.rows_of(*src) * bufs[*src as usize].cols;
                self.copy_n(*src, *dst, n);
                Ok(2)
            }
            Instr::KvWrite { site, k, v } => {
                let site = *site as usize;
                let in_loop = m.manifest.kv_sites[site].in_loop;
                let later = iter.is_some_and(|t| t > 0);
                let cache = m.manifest.program.recur.as_ref().map(|r| &r.cache);
                if in_loop && later && cache == Some(&CachePolicy::ShareFirst) {
                    // MoR recursive sharing: later iterations attend to the first one's entries.
                    return Ok(3);
                }
                let w = bufs[*k as usize].cols;
                for b in 0..self.segs.len() {
                    let (ia, ib) = self.seg_range(b);
                    if ia == ib {
                        continue;
                    }
                    let g = self.segs[b];
                    let kv = &mut self.kvs[b];
                    let slot = kv.slot_of(site, iter);
                    let (kb, vb) = (&self.ws.buf(*k)[ia * w..], &self.ws.buf(*v)[ia * w..]);
                    if in_loop && cache == Some(&CachePolicy::RecursionWise) {
                        kv.append(site, slot, ib - ia, kb, vb)?;
                    } else if self.active.is_empty() {
                        kv.write(site, slot, g.pos0, g.rows, kb, vb)?;
                    } else {
                        let prev = match iter {
                            Some(t) if in_loop && t > 0 => Some(kv.slot_of(site, Some(t - 1))),
                            _ => None,
                        };
                        let act = &self.active[ia..ib];
                        if g.row0 == 0 {
                            kv.write_rows(site, slot, prev, g.pos0, g.rows, act, kb, vb)?;
                        } else {
                            let rel: Vec<usize> = act.iter().map(|&r| r - g.row0).collect();
                            kv.write_rows(site, slot, prev, g.pos0, g.rows, &rel, kb, vb)?;
                        }
                    }
                }
                Ok(3)
            }
            Instr::SliceCols { src, start, out } => {
                let (sc, oc) = (bufs[*src as usize].cols, bufs[*out as usize].cols);
                let rows = self.rows_of(*out);
                let sp = self.ws.bufs[*src as usize].as_ptr();
                let op = self.ws.bufs[*out as usize].as_mut_ptr();
                for r in 0..rows {
                    // SAFETY: validated: distinct buffers, start + oc <= sc, same rows.
                    unsafe {
                        std::ptr::copy_nonoverlapping(sp.add(r * sc + start), op.add(r * oc), oc)
                    };
                }
                Ok(2)
            }
            Instr::PosEmbed { table, out } => {
                let cols = table.cols;
                let w = weight(m, table, iter);
                for r in 0..self.n {
                    let p = self.position_of(r);
                    if p >= table.rows {
                        return Err(crate::RuntimeError::Config(format!(
                            "position {p} is past the {} learned position embeddings of this model",
                            table.rows
                        )));
                    }
                    let o = self.ws.bufs[*out as usize].as_mut_slice();
                    o[r * cols..(r + 1) * cols].copy_from_slice(&w[p * cols..(p + 1) * cols]);
                }
                Ok(0)
            }
            Instr::Sinusoidal { base, out } => {
                let cols = bufs[*out as usize].cols;
                for r in 0..self.n {
                    let p = self.position_of(r) as f64;
                    let o = self.ws.bufs[*out as usize].as_mut_slice();
                    for c in (0..cols).step_by(2) {
                        let a = p * (-(c as f64) * base.ln() / cols as f64).exp();
                        o[r * cols + c] = a.sin() as f32;
                        if c + 1 < cols {
                            o[r * cols + c + 1] = a.cos() as f32;
                        }
                    }
                }
                Ok(0)
            }
            Instr::TimingSignal {
                min_timescale: lo,
                max_timescale: hi,
                step,
                out,
            } => {
                let cols = bufs[*out as usize].cols;
                let h = cols / 2;
                let inc = (hi / lo).ln() / (h.max(2) - 1) as f64;
                let t = iter.unwrap_or(0) as f64;
                for r in 0..self.n {
                    let p = if *step { t } else { self.position_of(r) as f64 };
                    let o =
                        &mut self.ws.bufs[*out as usize].as_mut_slice()[r * cols..(r + 1) * cols];
                    for i in 0..h {
                        let a = p * lo * (-(i as f64) * inc).exp();
                        o[i] = a.sin() as f32;
                        o[h + i] = a.cos() as f32;
                    }
                    if cols % 2 == 1 {
                        o[cols - 1] = 0.0;
                    }
                }
                Ok(0)
            }
            Instr::Kernel { kernel, args } => {
                let k = *kernel as usize;
                let spec = &m.manifest.kernels[k].spec;
                let items = m.manifest.kernel_items(*kernel, s);
                let per = items / s.max(1);
                let f = m.kernels.get(k);
                let attention = args
                    .iter()
                    .any(|a| matches!(a, Arg::KCache(_) | Arg::VCache(_)));
                let positional =
                    matches!(spec, KernelSpec::Rope { .. } | KernelSpec::RopeBias { .. })
                        || attention;
                let cat = match spec {
                    KernelSpec::Elementwise { .. } => 4,
                    KernelSpec::RmsNorm { .. }
                    | KernelSpec::LayerNorm { .. }
                    | KernelSpec::HeadRmsNorm { .. }
                    | KernelSpec::InvRms { .. } => 5,
                    KernelSpec::Rope { .. } | KernelSpec::RopeBias { .. } => 6,
                    KernelSpec::Attention { .. } => 7,
                    KernelSpec::Glu { .. } => 4,
                };
                let (unit, chunks_per_thread) = match spec {
                    KernelSpec::Elementwise { cols, ops, .. } => (cols * ops.len().max(1), 1),
                    KernelSpec::RmsNorm { cols, .. } | KernelSpec::LayerNorm { cols, .. } => {
                        (cols * 4, 1)
                    }
                    KernelSpec::InvRms { cols, .. } => (cols * 2, 1),
                    KernelSpec::Rope {
                        heads, head_dim, ..
                    } => (heads * head_dim * 3, 1),
                    KernelSpec::Attention { head_dim, .. } => (head_dim * 4, 4),
                    KernelSpec::Glu { cols, ops } => (cols * ops.len().max(1), 1),
                    KernelSpec::HeadRmsNorm {
                        heads, head_dim, ..
                    } => (heads * head_dim * 4, 1),
                    KernelSpec::RopeBias {
                        heads, head_dim, ..
                    } => (heads * head_dim * 4, 1),
                };
                // Decode and short prompts: the runtime's vector attention where it has one.
                let direct = match *spec {
                    KernelSpec::Attention {
                        heads,
                        kv_heads,
                        head_dim,
                        scale,
                    } if crate::attention::rows_supported() => Some(crate::attention::Shape {
                        heads,
                        kv_heads,
                        head_dim,
                        scale,
                    }),
                    _ => None,
                };
                let simple = !positional
                    || (self.segs.len() == 1
                        && self.segs[0].row0 == 0
                        && self.active.last().is_none_or(|&r| r + 1 == s));
                let mut runs = std::mem::take(&mut self.ex.runs);
                for b in 0..self.segs.len() {
                    let (ia, ib) = if simple { (0, s) } else { self.seg_range(b) };
                    if ia == ib {
                        continue;
                    }
                    let g = self.segs[b];
                    let kv_len = g.pos0 + g.rows;
                    // Growth moves the whole cache: every slot first, then the pointers.
                    for a in args {
                        if let Arg::KCache(st) | Arg::VCache(st) = a {
                            let kv = &mut self.kvs[b];
                            kv.ensure(*st as usize, kv.slot_of(*st as usize, iter), kv_len)?;
                        }
                    }
                    self.ws.ptrs.clear();
                    for a in args {
                        let p: *mut f32 = match a {
                            Arg::Buf(x) => self.ws.bufs[*x as usize].as_mut_ptr(),
                            Arg::Weight(w) => weight(m, w, iter).as_ptr() as *mut f32,
                            Arg::RopeCos(i) => self.ropes[*i as usize].cos_ptr(),
                            Arg::RopeSin(i) => self.ropes[*i as usize].sin_ptr(),
                            Arg::KCache(st) | Arg::VCache(st) => {
                                let st = *st as usize;
                                let kv = &mut self.kvs[b];
                                let (kp, vp) = kv.ptrs(st, kv.slot_of(st, iter));
                                if matches!(a, Arg::KCache(_)) {
                                    kp
                                } else {
                                    vp
                                }
                            }
                        };
                        self.ws.ptrs.push(p);
                    }
                    let cost = if attention {
                        kv_len.saturating_mul(unit)
                    } else {
                        unit
                    };
                    let compact_site = args.iter().find_map(|a| match a {
                        Arg::KCache(st) if m.manifest.kv_sites[*st as usize].in_loop => {
                            Some(*st as usize)
                        }
                        _ => None,
                    });
                    let recursion_wise = m
                        .manifest
                        .program
                        .recur
                        .as_ref()
                        .is_some_and(|r| r.cache == CachePolicy::RecursionWise);
                    if let (Some(st), true) = (compact_site, recursion_wise) {
                        // A recursion-wise slot holds exactly the rows that reached this
                        // iteration, in position order: row i attends to its first `base + i + 1`
                        // entries.
                        let kv = &self.kvs[b];
                        let base = kv.len(st, kv.slot_of(st, iter)) as i64 - (ib - ia) as i64;
                        launch(
                            f,
                            direct,
                            &self.ws.ptrs,
                            ia * per,
                            ib * per,
                            base - ia as i64,
                            kv_len,
                            cost,
                            chunks_per_thread,
                            m.threads,
                        );
                    } else if let (
                        true,
                        &KernelSpec::Attention {
                            heads,
                            kv_heads,
                            head_dim,
                            scale,
                        },
                    ) = (simple && s >= crate::attention::MIN_ROWS, spec)
                    {
                        // A long prefill: the same attention as two GEMMs per head and block.
                        let p = &self.ws.ptrs;
                        let shape = crate::attention::Shape {
                            heads,
                            kv_heads,
                            head_dim,
                            scale,
                        };
                        // SAFETY: the pointers were validated against the kernel's spec (q and
                        // out hold s rows, the caches kv_len = pos0 + s) and out is no input.
                        unsafe {
                            crate::attention::causal_gemm(
                                p[0],
                                p[1],
                                p[2],
                                p[3],
                                s,
                                g.pos0,
                                shape,
                                m.threads,
                                m.kernels.gemm,
                            )
                        };
                    } else if simple {
                        launch(
                            f,
                            direct,
                            &self.ws.ptrs,
                            0,
                            items,
                            g.pos0 as i64,
                            kv_len,
                            cost,
                            chunks_per_thread,
                            m.threads,
                        );
                    } else {
                        // Compacted rows or several sequences: one call per run of consecutive
                        // positions.
                        self.pos_runs(b, ia, ib, &mut runs);
                        for &(i0, i1, p0) in &runs {
                            launch(
                                f,
                                direct,
                                &self.ws.ptrs,
                                i0 * per,
                                i1 * per,
                                p0,
                                kv_len,
                                cost,
                                chunks_per_thread,
                                m.threads,
                            );
                        }
                    }
                    if simple {
                        break;
                    }
                }
                self.ex.runs = runs;
                if let (Some(t), true) = (iter, attention && self.ex.trace.is_some()) {
                    self.trace_attention(spec, args, t);
                }
                Ok(cat)
            }
        }
    }
}

/// The bf16 copy of a matmul weight window (`kn`: a `MatMulKN` weight), if the model holds
/// one; per-iteration weights resolve as in [`weight`].
fn packed<'x>(
    m: &'x Inner,
    w: &crate::artifact::WRef,
    iter: Option<usize>,
    kn: bool,
) -> Option<&'x crate::dtype::PackedW> {
    if m.packed.is_empty() {
        return None;
    }
    let vars = &m.iter_variants[w.weight as usize];
    let (id, base) = match (vars.is_empty(), iter) {
        (true, _) => (w.weight, 0),
        (false, t) => {
            let v = &vars[t.unwrap_or(0).min(vars.len() - 1)];
            (v.weight, v.offset)
        }
    };
    m.packed.get(&crate::dtype::key(id, base + w.offset, w, kn))
}

/// `out = x · Wᵀ` with its epilogue, on a weight packed at load (either kind).
fn packed_matmul(
    host: Option<crate::matmul::HostGemm>,
    x: &[f32],
    w: &crate::dtype::PackedW,
    out: &mut [f32],
    rows: usize,
    threads: usize,
    epi: &crate::matmul::Epi,
) {
    match w {
        crate::dtype::PackedW::Bf16(p) => {
            crate::matmul_bf16::matmul_bf16_epi_on(host, x, p, out, rows, threads, epi)
        }
        crate::dtype::PackedW::F32(p) => {
            crate::matmul::matmul_packed_epi(x, p, out, rows, threads, epi)
        }
    }
}

/// The validated window of a weight; a per-iteration weight resolves to the one iteration
/// `iter` reads (calls are checked against the iterations the variants cover).
fn weight<'x>(m: &'x Inner, w: &crate::artifact::WRef, iter: Option<usize>) -> &'x [f32] {
    let vars = &m.iter_variants[w.weight as usize];
    let (id, base) = match (vars.is_empty(), iter) {
        (true, _) => (w.weight, 0),
        (false, t) => {
            let v = &vars[t.unwrap_or(0).min(vars.len() - 1)];
            (v.weight, v.offset)
        }
    };
    let all = m.weights[id as usize].as_slice();
    &all[base + w.offset..base + w.offset + w.rows * w.cols]
}

/// Run kernel items `begin..end` in contiguous chunks over the current rayon pool (inline when
/// the work is small). One pointer array is shared by all chunks.
#[allow(clippy::too_many_arguments)]
fn launch(
    f: KernelFn,
    attention: Option<crate::attention::Shape>,
    ptrs: &[*mut f32],
    begin: usize,
    end: usize,
    pos0: i64,
    kv_len: usize,
    cost: usize,
    chunks_per_thread: usize,
    threads: usize,
) {
    if end <= begin {
        return;
    }
    if let Some(s) = attention {
        let heads = s.heads.max(1);
        debug_assert!(
            pos0 + (end / heads) as i64 <= kv_len as i64,
            "attention past kv_len"
        );
        // SAFETY: the pointers (q, k, v, out) were validated against the attention spec for
        // these rows; items are (row, head) pairs, whole rows.
        unsafe {
            crate::attention::causal_rows(
                ptrs[0],
                ptrs[1],
                ptrs[2],
                ptrs[3],
                begin / heads,
                end / heads,
                pos0,
                s,
                threads,
            )
        };
        return;
    }
    let items = end - begin;
    let kv_len = kv_len as i64;
    if threads <= 1 || items < 2 || items.saturating_mul(cost) < INLINE_WORK {
        let ints = [begin as i64, end as i64, pos0, kv_len];
        // SAFETY: pointers and sizes were validated against the kernel's spec.
        unsafe { f(ptrs.as_ptr(), ints.as_ptr()) };
        return;
    }
    let chunks = (threads * chunks_per_thread).min(items);
    let per = items.div_ceil(chunks);
    let n = items.div_ceil(per);
    let p = SendPtr(ptrs.as_ptr());
    crate::par::for_each(n, move |c| {
        let p = p;
        let b = begin + c * per;
        let e = (b + per).min(end);
        let ints = [b as i64, e as i64, pos0, kv_len];
        // SAFETY: as above; chunks write disjoint rows.
        unsafe { f(p.0, ints.as_ptr()) };
    });
}

/// Absolute position of call row `c` within its own sequence.
fn position_in(segs: &[Seg], c: usize) -> usize {
    let b = segs.partition_point(|g| g.row0 + g.rows <= c);
    let g = segs[b.min(segs.len() - 1)];
    g.pos0 + (c - g.row0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    static SEEN: Mutex<Vec<(i64, i64, i64, i64)>> = Mutex::new(Vec::new());
    static CALLS: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" fn record(ptrs: *const *mut f32, ints: *const i64) {
        let ints = std::slice::from_raw_parts(ints, 4);
        // Write the item index into row `i` of the first pointer.
        let out = *ptrs;
        for i in ints[0]..ints[1] {
            *out.add(i as usize) = i as f32;
        }
        CALLS.fetch_add(1, Ordering::Relaxed);
        SEEN.lock()
            .unwrap()
            .push((ints[0], ints[1], ints[2], ints[3]));
    }

    #[test]
    fn launch_covers_items_in_chunks() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let mut out = vec![-1f32; 100];
        let addr = out.as_mut_ptr() as usize;
        SEEN.lock().unwrap().clear();
        pool.install(move || {
            launch(
                record,
                None,
                &[addr as *mut f32],
                0,
                100,
                7,
                107,
                1 << 20,
                1,
                3,
            )
        });
        assert!(out.iter().enumerate().all(|(i, &x)| x == i as f32));
        let mut seen = SEEN.lock().unwrap().clone();
        seen.sort();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].0, 0);
        assert_eq!(seen.last().unwrap().1, 100);
        assert!(seen.windows(2).all(|w| w[0].1 == w[1].0));
        assert!(seen.iter().all(|s| s.2 == 7 && s.3 == 107));
        // Tiny work runs inline in one call.
        SEEN.lock().unwrap().clear();
        pool.install(move || launch(record, None, &[addr as *mut f32], 0, 100, 0, 100, 1, 1, 3));
        assert_eq!(SEEN.lock().unwrap().as_slice(), &[(0, 100, 0, 100)]);
    }
}
