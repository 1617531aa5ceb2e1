//! The interpreter for [`crate::artifact::Program`].
//!
//! A call runs the prelude, the recurrence (init, then `body` per iteration with `next → state`
//! and the exit policy) and the coda over `S` tokens at absolute positions `pos0..pos0 + S`.
//! Buffers are allocated once per `S` (a small cache of [`Workspace`]s), so repeated calls of the
//! same size (every decode step) allocate nothing, except when the KV cache or the rotary
//! tables double.

use crate::artifact::{Arg, ExitPolicy, Instr, KernelSpec, Rows, StateInit};
use crate::error::{Result, RuntimeError};
use crate::kernels::KernelFn;
use crate::kv::KvCache;
use crate::matmul::matmul;
use crate::mem::AVec;
use crate::model::{Inner, Need};
use crate::rng::{fill_trunc_normal, mix, Rng};
use crate::rope::Rope;
use rayon::prelude::*;
use std::time::{Duration, Instant};

/// Below this much estimated work (flops) a kernel call runs on the calling thread.
const INLINE_WORK: usize = 1 << 15;
/// Workspaces kept for distinct call sizes (decode's `S = 1` is always kept).
const MAX_WORKSPACES: usize = 4;

/// Categories of the optional per-operation timers.
pub(crate) const OP_NAMES: [&str; 9] =
    ["embed", "matmul", "concat/copy", "kv_write", "elementwise", "rmsnorm", "rope", "attention", "recur_control"];

/// All buffers of the program for one call size `S`.
pub(crate) struct Workspace {
    pub(crate) s: usize,
    bufs: Vec<AVec>,
    rows: Vec<usize>,
    ptrs: Vec<*mut f32>,
}

// SAFETY: the raw pointers in `ptrs` are scratch space rewritten before each use.
unsafe impl Send for Workspace {}

impl Workspace {
    fn new(m: &Inner, s: usize) -> Result<Self> {
        let man = &m.manifest;
        let mut bufs = Vec::with_capacity(man.buffers.len());
        let mut rows = Vec::with_capacity(man.buffers.len());
        for b in &man.buffers {
            let r = match b.rows {
                Rows::Tokens => s,
                Rows::Fixed(n) => n,
            };
            let n = r.checked_mul(b.cols).ok_or(RuntimeError::Alloc {
                bytes: r as u128 * b.cols as u128 * 4,
                what: format!("buffer `{}`", b.name),
            })?;
            bufs.push(AVec::zeroed(n, &format!("buffer `{}`", b.name))?);
            rows.push(r);
        }
        let ws = Workspace { s, bufs, rows, ptrs: Vec::with_capacity(8) };
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
                let Instr::Kernel { kernel, args } = ins else { continue };
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

/// Per-session mutable state of the interpreter.
pub(crate) struct ExecState {
    pub(crate) kv: KvCache,
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
        ExecState {
            kv: KvCache::new(&m.manifest.kv_sites),
            ropes: m.manifest.rope_tables.iter().map(Rope::new).collect(),
            workspaces: Vec::new(),
            gates: Vec::new(),
            profile: None,
        }
    }

    pub(crate) fn workspace(&self, i: usize) -> &Workspace {
        &self.workspaces[i]
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
    pub(crate) fn forward(&mut self, m: &Inner, tokens: &[u32], pos0: usize, steps: Option<usize>) -> Result<CallInfo> {
        let s = tokens.len();
        if s == 0 {
            return Err(RuntimeError::EmptyInput);
        }
        for (i, &t) in tokens.iter().enumerate() {
            if t as usize >= m.token_limit {
                return Err(RuntimeError::TokenOutOfRange { token: t, index: i, limit: m.token_limit });
            }
        }
        if let Some(rec) = &m.manifest.program.recur {
            let cap = match rec.exit {
                ExitPolicy::Fixed => steps.unwrap_or(rec.default_steps),
                ExitPolicy::Converge { max_steps, .. } => steps.unwrap_or(max_steps),
            };
            if cap == 0 {
                return Err(RuntimeError::ZeroSteps);
            }
        }
        let kv_len = pos0
            .checked_add(s)
            .ok_or_else(|| RuntimeError::Config("position overflow".into()))?;
        for r in &mut self.ropes {
            r.ensure(kv_len)?;
        }
        let wi = self.workspace_for(m, s)?;
        let ExecState { kv, ropes, workspaces, gates, profile } = self;
        let mut run = Run {
            m,
            kv,
            ropes,
            ws: &mut workspaces[wi],
            tokens,
            pos0,
            kv_len,
            profile: profile.as_deref_mut(),
        };
        let iterations = m.pool.install(|| run.program(steps, gates))?;
        Ok(CallInfo { iterations, ws: wi })
    }
}

struct Run<'a> {
    m: &'a Inner,
    kv: &'a mut KvCache,
    ropes: &'a mut [Rope],
    ws: &'a mut Workspace,
    tokens: &'a [u32],
    pos0: usize,
    kv_len: usize,
    profile: Option<&'a mut [(Duration, u64); OP_NAMES.len()]>,
}

#[derive(Clone, Copy)]
struct SendPtr(*const *mut f32);
// SAFETY: the pointer array outlives the parallel loop that shares it; kernels only read it.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl Run<'_> {
    fn program(&mut self, steps: Option<usize>, gates: &mut Vec<f32>) -> Result<usize> {
        let m = self.m;
        let prog = &m.manifest.program;
        gates.clear();
        self.list(&prog.prelude, None)?;
        let mut iterations = 0;
        if let Some(rec) = &prog.recur {
            let t0 = self.profile.is_some().then(Instant::now);
            self.init_state(&rec.init, rec.state)?;
            self.time(8, t0);
            let (cap, converge) = match rec.exit {
                ExitPolicy::Fixed => (steps.unwrap_or(rec.default_steps), None),
                ExitPolicy::Converge { threshold, min_steps, max_steps } => {
                    (steps.unwrap_or(max_steps), Some((threshold, min_steps)))
                }
            };
            let s = self.ws.s;
            while iterations < cap {
                self.list(&rec.body, Some(iterations))?;
                let t0 = self.profile.is_some().then(Instant::now);
                if let Some(g) = rec.gate {
                    gates.extend(self.ws.buf(g)[..s].iter().map(|&x| 1.0 / (1.0 + (-x).exp())));
                }
                let stop = match converge {
                    Some((thr, min)) if iterations + 1 >= min => self.rel_change(rec.next, rec.state) < thr,
                    _ => false,
                };
                self.copy(rec.next, rec.state);
                self.time(8, t0);
                iterations += 1;
                if stop {
                    break;
                }
            }
            if iterations == 0 {
                // The coda may read either buffer: both hold the initial state.
                self.copy(rec.state, rec.next);
            }
        }
        self.list(&prog.coda, None)?;
        Ok(iterations)
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
                let pos0 = self.pos0;
                let out = self.ws.bufs[state as usize].as_mut_slice();
                // One generator per absolute position: the initial state of a token does not
                // depend on how the sequence was split into calls.
                for (r, row) in out.chunks_mut(cols.max(1)).enumerate() {
                    let mut rng = Rng::new(mix(*seed, (pos0 + r) as u64));
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
        if src == dst {
            return;
        }
        let n = self.ws.bufs[src as usize].len().min(self.ws.bufs[dst as usize].len());
        let sp = self.ws.bufs[src as usize].as_ptr();
        let dp = self.ws.bufs[dst as usize].as_mut_ptr();
        // SAFETY: distinct buffers, both at least n long.
        unsafe { std::ptr::copy_nonoverlapping(sp, dp, n) };
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
        let s = self.ws.s;
        match ins {
            Instr::Embed { table, out } => {
                let cols = table.cols;
                let w = weight(m, table).as_ptr();
                let o = self.ws.bufs[*out as usize].as_mut_slice();
                for (r, &t) in self.tokens.iter().enumerate() {
                    // SAFETY: tokens were checked against the smallest table's rows; the window
                    // was validated against the weight.
                    let row = unsafe { std::slice::from_raw_parts(w.add(t as usize * cols), cols) };
                    o[r * cols..(r + 1) * cols].copy_from_slice(row);
                }
                Ok(0)
            }
            Instr::MatMul { x, w, out } => {
                let rows = self.ws.rows[*x as usize];
                let wd = weight(m, w);
                let xb = &self.ws.bufs[*x as usize];
                // SAFETY: x != out (validated), so the two slices do not alias.
                let xs = unsafe { std::slice::from_raw_parts(xb.as_ptr(), xb.len()) };
                let os = self.ws.bufs[*out as usize].as_mut_slice();
                matmul(xs, wd, os, rows, w.cols, w.rows, m.threads);
                Ok(1)
            }
            Instr::Concat { inputs, out } => {
                let oc = bufs[*out as usize].cols;
                let rows = self.ws.rows[*out as usize];
                let op = self.ws.bufs[*out as usize].as_mut_ptr();
                let mut off = 0;
                for b in inputs {
                    let c = bufs[*b as usize].cols;
                    let ip = self.ws.bufs[*b as usize].as_ptr();
                    for r in 0..rows {
                        // SAFETY: shapes validated (same rows, columns add up); out is not an input.
                        unsafe { std::ptr::copy_nonoverlapping(ip.add(r * c), op.add(r * oc + off), c) };
                    }
                    off += c;
                }
                Ok(2)
            }
            Instr::Copy { src, dst } => {
                self.copy(*src, *dst);
                Ok(2)
            }
            Instr::KvWrite { site, k, v } => {
                let site = *site as usize;
                let slot = self.kv.slot_of(site, iter);
                let (kb, vb) = (self.ws.buf(*k), self.ws.buf(*v));
                self.kv.write(site, slot, self.pos0, s, kb, vb)?;
                Ok(3)
            }
            Instr::Kernel { kernel, args } => {
                let k = *kernel as usize;
                let spec = &m.manifest.kernels[k].spec;
                let items = m.manifest.kernel_items(*kernel, s);
                self.ws.ptrs.clear();
                for a in args {
                    let p: *mut f32 = match a {
                        Arg::Buf(b) => self.ws.bufs[*b as usize].as_mut_ptr(),
                        Arg::Weight(w) => weight(m, w).as_ptr() as *mut f32,
                        Arg::RopeCos(i) => self.ropes[*i as usize].cos_ptr(),
                        Arg::RopeSin(i) => self.ropes[*i as usize].sin_ptr(),
                        Arg::KCache(st) | Arg::VCache(st) => {
                            let st = *st as usize;
                            let slot = self.kv.slot_of(st, iter);
                            self.kv.ensure(st, slot, self.kv_len)?;
                            let (kp, vp) = self.kv.ptrs(st, slot);
                            if matches!(a, Arg::KCache(_)) {
                                kp
                            } else {
                                vp
                            }
                        }
                    };
                    self.ws.ptrs.push(p);
                }
                let (cost, chunks_per_thread, cat) = match spec {
                    KernelSpec::Elementwise { cols, ops, .. } => (cols * ops.len().max(1), 1, 4),
                    KernelSpec::RmsNorm { cols, .. } => (cols * 4, 1, 5),
                    KernelSpec::Rope { heads, head_dim, .. } => (heads * head_dim * 3, 1, 6),
                    KernelSpec::Attention { head_dim, .. } => (self.kv_len.saturating_mul(head_dim * 4), 4, 7),
                    KernelSpec::Glu { cols, ops } => (cols * ops.len().max(1), 1, 4),
                    KernelSpec::RopeBias { heads, head_dim, .. } => (heads * head_dim * 4, 1, 6),
                };
                launch(m.kernels.get(k), &self.ws.ptrs, items, self.pos0, self.kv_len, cost, chunks_per_thread, m.threads);
                Ok(cat)
            }
        }
    }
}

/// The validated window of a weight.
fn weight<'x>(m: &'x Inner, w: &crate::artifact::WRef) -> &'x [f32] {
    let all = m.weights[w.weight as usize].as_slice();
    &all[w.offset..w.offset + w.rows * w.cols]
}

/// Run kernel items `0..items` in contiguous chunks over the current rayon pool (inline when
/// the work is small). One pointer array is shared by all chunks.
#[allow(clippy::too_many_arguments)]
fn launch(f: KernelFn, ptrs: &[*mut f32], items: usize, pos0: usize, kv_len: usize, cost: usize, chunks_per_thread: usize, threads: usize) {
    if items == 0 {
        return;
    }
    let (pos0, kv_len) = (pos0 as i64, kv_len as i64);
    if threads <= 1 || items < 2 || items.saturating_mul(cost) < INLINE_WORK {
        let ints = [0, items as i64, pos0, kv_len];
        // SAFETY: pointers and sizes were validated against the kernel's spec.
        unsafe { f(ptrs.as_ptr(), ints.as_ptr()) };
        return;
    }
    let chunks = (threads * chunks_per_thread).min(items);
    let per = items.div_ceil(chunks);
    let n = items.div_ceil(per);
    let p = SendPtr(ptrs.as_ptr());
    (0..n).into_par_iter().for_each(move |c| {
        let p = p;
        let b = c * per;
        let e = (b + per).min(items);
        let ints = [b as i64, e as i64, pos0, kv_len];
        // SAFETY: as above; chunks write disjoint rows.
        unsafe { f(p.0, ints.as_ptr()) };
    });
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
        SEEN.lock().unwrap().push((ints[0], ints[1], ints[2], ints[3]));
    }

    #[test]
    fn launch_covers_items_in_chunks() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let mut out = vec![-1f32; 100];
        let addr = out.as_mut_ptr() as usize;
        SEEN.lock().unwrap().clear();
        pool.install(move || launch(record, &[addr as *mut f32], 100, 7, 107, 1 << 20, 1, 3));
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
        pool.install(move || launch(record, &[addr as *mut f32], 100, 0, 100, 1, 1, 3));
        assert_eq!(SEEN.lock().unwrap().as_slice(), &[(0, 100, 0, 100)]);
    }
}
