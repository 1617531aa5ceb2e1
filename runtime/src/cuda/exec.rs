//! The device executor: runs the [`Program`](crate::artifact::Program) with device buffers.
//!
//! Every call keeps all its rows in place: per-token exits use an active mask instead of the
//! CPU's compaction. Exited rows keep their state (`select_rows` after each iteration), their KV
//! entries at later iterations are the previous iteration's (as the CPU's compacted write leaves
//! them), and the decision needs one small read per iteration (the exit values or the gate), never
//! one per layer. Matrix products go to the [`Gpu`]'s GEMM and then the `epilogue` / `glu` /
//! `row_norm` support kernels.

use super::gpu::{bytes, bytes_mut, bytes_mut64, DevMem, Entry, Gpu, Param, What};
use super::kv::{DevKv, Masks};
use crate::artifact::{
    cuda::support, Criterion, CudaImage, ExitPolicy, Instr, Recur, Rows, StateInit, WRef,
};
use crate::error::{Result, RuntimeError};
use crate::exit::{passes, History, Rule};
use crate::model::Inner;
use crate::rope::Rope;
use std::collections::HashMap;
use std::sync::Arc;

mod instr;

const MAX_WORKSPACES: usize = 4;

/// A model's device side: the GPU, the image's entries and the uploaded weights.
pub(crate) struct DevModel {
    pub(crate) gpu: Arc<dyn Gpu>,
    sup: HashMap<&'static str, usize>,
    kernels: Vec<usize>,
    /// By weight id (checkpoint then derived); `None` for weights with no data of their own.
    weights: Vec<Option<DevMem>>,
}

impl DevModel {
    /// Upload every weight that holds data (derived weights were computed on the host).
    pub(crate) fn new(
        gpu: Arc<dyn Gpu>,
        image: &CudaImage,
        manifest: &crate::artifact::Manifest,
        weights: &[crate::weights::Bound],
    ) -> Result<Self> {
        let entries: Vec<Entry> = super::gpu::entries(image)?;
        let mut sup = HashMap::new();
        let mut kernels = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match e.what {
                What::Support(n) => {
                    sup.insert(n, i);
                }
                What::Kernel(_) => kernels.push(i),
            }
        }
        let mut dw = Vec::with_capacity(weights.len());
        for (id, w) in weights.iter().enumerate() {
            let data = w.as_slice();
            if data.is_empty() {
                dw.push(None);
                continue;
            }
            let name = match manifest.weights.get(id) {
                Some(w) => w.name.clone(),
                None => manifest
                    .derived
                    .get(id - manifest.weights.len())
                    .map_or_else(|| format!("weight #{id}"), |d| d.name.clone()),
            };
            let mem = gpu.alloc(4 * data.len(), &format!("`{name}`"))?;
            gpu.upload(mem.addr, bytes(data))?;
            dw.push(Some(mem));
        }
        Ok(DevModel {
            gpu,
            sup,
            kernels,
            weights: dw,
        })
    }
}

/// The buffers of one call size.
struct Ws {
    s: usize,
    /// Per buffer: an allocation of its own, or a window of `_arena` (the CPU workspace's
    /// plan, `exec::plan`).
    bufs: Vec<DevMem>,
    /// Bytes allocated for `bufs`: the arena and the buffers of their own.
    bytes: usize,
    /// The product of a `MatMulParts` before its parts' epilogues.
    scratch: Option<DevMem>,
    tokens: DevMem,
    active: DevMem,
    exited: DevMem,
    value: DevMem,
    /// ACT: each row's weight `w` then `1 − w` (`2·S` floats), and `w·next` (`[S, state cols]`).
    act: Option<(DevMem, DevMem)>,
    /// The history of a criterion that reads the logits (`exit_logits`).
    logit_hist: Option<LogitHist>,
    /// MoR routing: expert choice's keep mask and gates, or token choice's depths, weights
    /// and initial states.
    route: Option<Route>,
    /// Declared after `bufs`, whose windows point into it.
    _arena: Option<DevMem>,
}

struct Route {
    /// `[S]` i32: expert choice's kept rows, token choice's depths.
    sel: DevMem,
    /// `[S]` f32: expert choice's gates `σ·α`, token choice's weights.
    w: DevMem,
    /// `[S, state cols]`: token choice's states before the first iteration.
    h0: Option<DevMem>,
}

/// Each row's history of a logit criterion, kept on the device across iterations.
struct LogitHist {
    /// `[S]` f64 values read back once per iteration.
    value: DevMem,
    /// `[S, vocab]` previous log-probabilities (KL criteria only).
    prev_logp: Option<DevMem>,
    prev_h: DevMem,
    prev_am: DevMem,
    count: DevMem,
}

struct DevRope {
    host: Rope,
    cos: Option<DevMem>,
    sin: Option<DevMem>,
    uploaded: usize,
}

/// A session's device state.
pub(crate) struct DevState {
    pub(crate) kv: DevKv,
    ropes: Vec<DevRope>,
    ws: Vec<Ws>,
    /// The last call's logits, `[S, vocab]`, read back to the host.
    pub(crate) logits: Vec<f32>,
    pub(crate) row_depth: Vec<usize>,
    /// Sigmoid of the exit gate, `[iteration][row]`, for the last call.
    pub(crate) gates: Vec<f32>,
    hist: History,
}

/// Per-call settings, from the session.
pub(crate) struct Call<'a> {
    pub tokens: &'a [u32],
    pub pos0: usize,
    pub steps: Option<usize>,
    pub depths: &'a [usize],
    pub threshold: Option<f64>,
}

impl DevState {
    pub(crate) fn new(m: &Inner) -> Self {
        let ring = m
            .manifest
            .program
            .recur
            .as_ref()
            .and_then(|r| r.cache.slots());
        DevState {
            kv: DevKv::new(&m.manifest.kv_sites, ring),
            ropes: m
                .manifest
                .rope_tables
                .iter()
                .map(|t| DevRope {
                    host: Rope::new(t),
                    cos: None,
                    sin: None,
                    uploaded: 0,
                })
                .collect(),
            ws: Vec::new(),
            logits: Vec::new(),
            row_depth: Vec::new(),
            gates: Vec::new(),
            hist: History::default(),
        }
    }

    /// Bytes of the activation buffers of the workspaces held.
    pub(crate) fn activation_bytes(&self) -> usize {
        self.ws.iter().map(|w| w.bytes).sum()
    }

    fn workspace_for(&mut self, m: &Inner, d: &DevModel, s: usize) -> Result<usize> {
        if let Some(i) = self.ws.iter().position(|w| w.s == s) {
            return Ok(i);
        }
        let gpu = &*d.gpu;
        let man = &m.manifest;
        // Launches run in order on one stream, so the CPU's plan holds here as it stands: a
        // buffer's storage is reused only by buffers no instruction sees at the same time.
        let plan = &m.buffer_plan;
        let arena = match s
            .checked_mul(plan.arena_cols)
            .and_then(|e| e.checked_mul(4))
        {
            Some(0) => None,
            Some(bytes) => Some(gpu.alloc(bytes, "activation buffers")?),
            None => {
                return Err(RuntimeError::Alloc {
                    bytes: s as u128 * plan.arena_cols as u128 * 4,
                    what: "activation buffers".into(),
                })
            }
        };
        let mut bufs = Vec::with_capacity(man.buffers.len());
        let mut buf_bytes = 4 * s * plan.arena_cols;
        for ((id, b), off) in man.buffers.iter().enumerate().zip(&plan.offset) {
            let r = match b.rows {
                Rows::Tokens => s,
                Rows::Fixed(n) => n,
            };
            let bytes = r.checked_mul(b.cols).and_then(|e| e.checked_mul(4)).ok_or(
                RuntimeError::Alloc {
                    bytes: r as u128 * b.cols as u128 * 4,
                    what: format!("buffer `{}`", b.name),
                },
            )?;
            bufs.push(match (off, &arena) {
                // The plan places the buffer's `S · cols` floats inside the arena, 64-byte
                // aligned; the window frees nothing.
                (Some(o), Some(a)) => DevMem::new(a.at(o * s), Box::new(())),
                _ => {
                    buf_bytes += bytes.max(4);
                    gpu.alloc(bytes.max(4), &format!("buf{id} `{}`", b.name))?
                }
            });
        }
        let mut prod = 0;
        let mut scan = |list: &[Instr]| {
            for i in list {
                if let Instr::MatMulParts { w, .. } = i {
                    prod = prod.max(s * w.rows);
                }
            }
        };
        scan(&man.program.prelude);
        scan(&man.program.coda);
        if let Some(r) = &man.program.recur {
            scan(&r.body);
        }
        let scratch = match prod {
            0 => None,
            n => Some(gpu.alloc(4 * n, "matmul parts product")?),
        };
        let act = match &man.program.recur {
            Some(r) if matches!(r.exit, ExitPolicy::Act { .. }) => {
                let cols = man.buffers[r.state as usize].cols;
                Some((
                    gpu.alloc(8 * s, "ACT weights")?,
                    gpu.alloc(4 * s * cols, "ACT weighted next")?,
                ))
            }
            _ => None,
        };
        let logit_hist = match &man.program.recur {
            Some(Recur {
                exit: ExitPolicy::Criterion { criterion: c, .. },
                ..
            }) if c.needs_logits() => {
                let kl = matches!(c, Criterion::Kl | Criterion::MinpKl);
                let what = "exit criterion history";
                Some(LogitHist {
                    value: gpu.alloc(8 * s, "exit values (f64)")?,
                    prev_logp: match kl {
                        true => Some(gpu.alloc(4 * s * man.vocab.max(1), what)?),
                        false => None,
                    },
                    prev_h: gpu.alloc(8 * s, what)?,
                    prev_am: gpu.alloc(4 * s, what)?,
                    count: gpu.alloc(4 * s, what)?,
                })
            }
            _ => None,
        };
        let route = match &man.program.recur {
            Some(
                r @ Recur {
                    exit: ExitPolicy::ExpertChoice { .. } | ExitPolicy::TokenChoice { .. },
                    ..
                },
            ) => {
                let token = matches!(r.exit, ExitPolicy::TokenChoice { .. });
                let cols = man.buffers[r.state as usize].cols;
                Some(Route {
                    sel: gpu.alloc(4 * s, "router decisions")?,
                    w: gpu.alloc(4 * s, "router weights")?,
                    h0: match token {
                        true => Some(gpu.alloc(4 * s * cols, "token-choice initial states")?),
                        false => None,
                    },
                })
            }
            _ => None,
        };
        let ws = Ws {
            act,
            logit_hist,
            route,
            s,
            bufs,
            bytes: buf_bytes,
            scratch,
            tokens: gpu.alloc(4 * s, "token ids")?,
            active: gpu.alloc(4 * s, "active mask")?,
            exited: gpu.alloc(4 * s, "exited mask")?,
            value: gpu.alloc(4 * s, "exit values")?,
            _arena: arena,
        };
        if self.ws.len() >= MAX_WORKSPACES {
            if let Some(evict) = self.ws.iter().position(|w| w.s != 1) {
                self.ws.remove(evict);
            }
        }
        self.ws.push(ws);
        Ok(self.ws.len() - 1)
    }

    /// Rotary tables for `positions` positions, on the device.
    fn ensure_ropes(&mut self, gpu: &dyn Gpu, positions: usize) -> Result<()> {
        for r in &mut self.ropes {
            r.host.ensure(positions)?;
            let n = r.host.positions_held();
            if n > r.uploaded {
                let half = r.host.half();
                // Named apart so that the launch log shows which table a kernel reads where.
                let (cos, sin) = (
                    gpu.alloc(4 * n * half, "rotary cos")?,
                    gpu.alloc(4 * n * half, "rotary sin")?,
                );
                gpu.upload(cos.addr, bytes(r.host.cos()))?;
                gpu.upload(sin.addr, bytes(r.host.sin()))?;
                r.cos = Some(cos);
                r.sin = Some(sin);
                r.uploaded = n;
            }
        }
        Ok(())
    }

    /// The device side of [`crate::Session::reserve`]: every slot a call with `steps` would
    /// use, and the rotary tables, for `positions` positions.
    pub(crate) fn reserve(
        &mut self,
        m: &Inner,
        d: &DevModel,
        positions: usize,
        steps: Option<usize>,
    ) -> Result<()> {
        let gpu = &*d.gpu;
        let iterations = crate::exec::iterations_of(m, steps, &[]);
        for site in 0..m.manifest.kv_sites.len() {
            let slots = if self.kv.in_loop(site) {
                (0..iterations.max(1))
                    .map(|t| self.kv.slot_of(site, Some(t)))
                    .max()
                    .map_or(1, |s| s + 1)
            } else {
                1
            };
            for slot in 0..slots {
                self.kv.reserve_exact(gpu, site, slot, positions)?;
            }
        }
        self.ensure_ropes(gpu, positions)
    }

    /// Run one call; the logits are left in [`DevState::logits`]. Returns the iterations run.
    pub(crate) fn forward(&mut self, m: &Inner, d: &DevModel, c: &Call<'_>) -> Result<usize> {
        let s = c.tokens.len();
        if s == 0 {
            return Err(RuntimeError::EmptyInput);
        }
        for (i, &t) in c.tokens.iter().enumerate() {
            if t as usize >= m.token_limit {
                return Err(RuntimeError::TokenOutOfRange {
                    token: t,
                    index: i,
                    limit: m.token_limit,
                });
            }
        }
        let man = &m.manifest;
        if let Some(rec) = &man.program.recur {
            if crate::exec::cap_of(&rec.exit, rec.default_steps, c.steps, c.depths) == 0
                || c.depths.contains(&0)
            {
                return Err(RuntimeError::ZeroSteps);
            }
        }
        let kv_len = c
            .pos0
            .checked_add(s)
            .ok_or_else(|| RuntimeError::Config("position overflow".into()))?;
        let gpu = &*d.gpu;
        self.ensure_ropes(gpu, kv_len)?;
        let wi = self.workspace_for(m, d, s)?;
        let toks: Vec<i32> = c.tokens.iter().map(|&t| t as i32).collect();
        gpu.upload(self.ws[wi].tokens.addr, bytes(&toks))?;
        let DevState {
            kv,
            ropes,
            ws,
            logits,
            row_depth,
            gates,
            hist,
        } = self;
        let mut run = Run {
            m,
            d,
            gpu,
            ws: &ws[wi],
            kv,
            ropes,
            s,
            pos0: c.pos0,
            masks: None,
            rows_on: Vec::new(),
        };
        let iterations = run.program(c, row_depth, gates, hist)?;
        let lb = man.program.logits;
        let n = s * man.vocab;
        logits.resize(n, 0.0);
        gpu.download(ws[wi].bufs[lb as usize].addr, bytes_mut(&mut logits[..n]))?;
        Ok(iterations)
    }
}

struct Run<'a> {
    m: &'a Inner,
    d: &'a DevModel,
    gpu: &'a dyn Gpu,
    ws: &'a Ws,
    kv: &'a mut DevKv,
    ropes: &'a [DevRope],
    s: usize,
    pos0: usize,
    /// Set while some rows of the call have exited.
    masks: Option<Masks>,
    /// The rows still running, as last uploaded in the masks (empty: every row), for the
    /// recursion-wise cache, whose slots and attention follow the active rows.
    rows_on: Vec<bool>,
}

fn p(a: u64) -> Param {
    Param::Ptr(a)
}
fn i(v: usize) -> Param {
    Param::I64(v as i64)
}

impl Run<'_> {
    fn buf(&self, b: u32) -> u64 {
        self.ws.bufs[b as usize].addr
    }

    fn cols(&self, b: u32) -> usize {
        self.m.manifest.buffers[b as usize].cols
    }

    fn rows_of(&self, b: u32) -> usize {
        match self.m.manifest.buffers[b as usize].rows {
            Rows::Tokens => self.s,
            Rows::Fixed(r) => r,
        }
    }

    /// The device address of a weight window; a per-iteration weight resolves to the one
    /// iteration `iter` reads, as on the CPU.
    fn weight(&self, w: &WRef, iter: Option<usize>) -> Result<u64> {
        let vars = &self.m.iter_variants[w.weight as usize];
        let (id, base) = match (vars.is_empty(), iter) {
            (true, _) => (w.weight, 0),
            (false, t) => {
                let v = &vars[t.unwrap_or(0).min(vars.len() - 1)];
                (v.weight, v.offset)
            }
        };
        let mem = self.d.weights[id as usize].as_ref().ok_or_else(|| {
            RuntimeError::Manifest(format!("weight #{id} has no data on the device"))
        })?;
        Ok(mem.at(base + w.offset))
    }

    fn sup(&self, name: &str, items: usize, params: &[Param]) -> Result<()> {
        let f = *self.d.sup.get(name).ok_or_else(|| {
            RuntimeError::Artifact(format!("the CUDA image lacks the support kernel `{name}`"))
        })?;
        self.gpu.launch(f, items, params)
    }

    fn copy_cols(
        &self,
        dst: u64,
        src: u64,
        rows: usize,
        cols: usize,
        strides: [usize; 4],
    ) -> Result<()> {
        let [ds, doff, ss, soff] = strides;
        self.sup(
            support::COPY_COLS,
            rows,
            &[
                p(dst),
                p(src),
                i(rows),
                i(cols),
                i(ds),
                i(doff),
                i(ss),
                i(soff),
            ],
        )
    }

    fn select(&self, dst: u64, src: u64, mask: u64, rows: usize, n: usize) -> Result<()> {
        self.sup(
            support::SELECT_ROWS,
            rows,
            &[p(dst), p(src), p(mask), i(rows), i(n)],
        )
    }

    fn copy_buf(&self, src: u32, dst: u32) -> Result<()> {
        if src == dst {
            return Ok(());
        }
        let n = (self.rows_of(src) * self.cols(src)).min(self.rows_of(dst) * self.cols(dst));
        self.gpu.copy(self.buf(dst), self.buf(src), 4 * n)
    }

    fn program(
        &mut self,
        c: &Call<'_>,
        row_depth: &mut Vec<usize>,
        gates: &mut Vec<f32>,
        hist: &mut History,
    ) -> Result<usize> {
        let m = self.m;
        let prog = &m.manifest.program;
        gates.clear();
        self.list(&prog.prelude, None)?;
        let mut iterations = 0;
        if let Some(rec) = &prog.recur {
            self.init_state(&rec.init, rec.state)?;
            let cap = crate::exec::cap_of(&rec.exit, rec.default_steps, c.steps, c.depths);
            if let Some(l) = m.iter_limit.filter(|&l| cap > l) {
                return Err(RuntimeError::Config(format!(
                    "this model has per-iteration weights for {l} iterations; it cannot run {cap}"
                )));
            }
            let rule = if c.depths.is_empty() {
                Rule::of(&rec.exit, c.threshold)
            } else {
                Rule::None
            };
            if !c.depths.is_empty() || !matches!(rule, Rule::None) {
                iterations = self.per_row(rec, cap, rule, c.depths, row_depth, gates, hist)?;
            } else {
                let converge = match rec.exit {
                    ExitPolicy::Converge {
                        threshold,
                        min_steps,
                        ..
                    } => Some((c.threshold.unwrap_or(threshold), min_steps)),
                    _ => None,
                };
                while iterations < cap {
                    self.list(&rec.body, Some(iterations))?;
                    if let Some(g) = rec.gate {
                        let v = self.read_rows(g)?;
                        gates.extend(v.iter().map(|&x| 1.0 / (1.0 + (-x).exp())));
                    }
                    let stop = match converge {
                        Some((thr, min)) if iterations + 1 >= min => {
                            let v = self.latent(rec, 0)?;
                            v.iter().map(|&x| x as f64).sum::<f64>() / (self.s as f64) < thr
                        }
                        _ => false,
                    };
                    self.copy_buf(rec.next, rec.state)?;
                    iterations += 1;
                    if stop {
                        break;
                    }
                }
                if iterations == 0 {
                    self.copy_buf(rec.state, rec.next)?;
                }
                row_depth.clear();
                row_depth.resize(self.s, iterations);
            }
        }
        self.list(&prog.coda, None)?;
        Ok(iterations)
    }

    /// The first `S` values of a `[rows, 1]` buffer, read back.
    fn read_rows(&self, b: u32) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.s];
        self.gpu.download(self.buf(b), bytes_mut(&mut v))?;
        Ok(v)
    }

    /// Per-row latent exit values between `next` and `state` (`kind` as `exit_latent`).
    fn latent(&self, rec: &Recur, kind: usize) -> Result<Vec<f32>> {
        let s = self.s;
        let cols = self.cols(rec.state);
        self.sup(
            support::EXIT_LATENT,
            s,
            &[
                p(self.ws.value.addr),
                p(self.buf(rec.next)),
                p(self.buf(rec.state)),
                i(s),
                i(cols),
                i(kind),
            ],
        )?;
        let mut v = vec![0f32; s];
        self.gpu.download(self.ws.value.addr, bytes_mut(&mut v))?;
        Ok(v)
    }

    #[allow(clippy::too_many_arguments)]
    fn per_row(
        &mut self,
        rec: &Recur,
        cap: usize,
        rule: Rule,
        depths: &[usize],
        row_depth: &mut Vec<usize>,
        gates: &mut Vec<f32>,
        hist: &mut History,
    ) -> Result<usize> {
        let s = self.s;
        let cols = self.cols(rec.state);
        hist.reset(s, self.m.manifest.vocab, &rule);
        row_depth.clear();
        row_depth.resize(s, 0);
        let mut active = vec![true; s];
        let masks = Masks {
            active: self.ws.active.addr,
            exited: self.ws.exited.addr,
        };
        self.upload_masks(&active)?;
        self.masks = None;
        let mut t = 0;
        let mut exiting = vec![false; s];
        let route_depth = match rule {
            Rule::Token { alpha } => self.token_route(rec, alpha, cap)?,
            _ => Vec::new(),
        };
        while active.iter().any(|&a| a) && t < cap {
            if let Rule::Expert { alpha, threshold } = rule {
                // Rows the router does not pick stop before iteration t, with their state.
                let keep = self.expert_route(rec, t, alpha, threshold)?;
                if retire(&mut active, row_depth, t, |r, a| a && keep[r] == 0) {
                    self.upload_masks(&active)?;
                    self.masks = Some(masks);
                }
                if !active.iter().any(|&a| a) {
                    break;
                }
            }
            self.list(&rec.body, Some(t))?;
            if let Rule::Expert { .. } = rule {
                // MoR's gated update of the rows that ran: h ← h + g·f(h) (other rows' `next`
                // is never read: the state update below is masked).
                let (next, state) = (self.buf(rec.next), self.buf(rec.state));
                let g = self.route()?.w.addr;
                self.sup(
                    support::EPILOGUE,
                    s,
                    &[
                        p(next),
                        p(next),
                        p(g),
                        p(state),
                        p(0),
                        i(s),
                        i(cols),
                        i(cols),
                        i(0),
                    ],
                )?;
            }
            let step = t + 1;
            for r in 0..s {
                let d = match rule {
                    Rule::Token { .. } => route_depth[r],
                    _ => depths.get(r).copied().unwrap_or(cap),
                };
                exiting[r] = active[r] && step >= d.min(cap);
            }
            if let Some(g) = rec.gate {
                let z = self.read_rows(g)?;
                let base = gates.len();
                gates.resize(base + s, 0.0);
                let mut act_w = vec![0f32; 2 * s];
                for r in (0..s).filter(|&r| active[r]) {
                    let l = 1.0 / (1.0 + (-z[r]).exp());
                    gates[base + r] = l;
                    if let Rule::Gate { q, min_steps } = rule {
                        let cdf = hist.gate_cdf(r, l, step == cap);
                        exiting[r] |= step >= min_steps && cdf >= q;
                    }
                    if let Rule::Act { thr } = rule {
                        let (w, halted) = hist.act_weight(r, l, thr);
                        exiting[r] |= halted;
                        act_w[r] = w;
                        act_w[s + r] = 1.0 - w;
                    }
                }
                if let Rule::Act { .. } = rule {
                    self.act_blend(rec, &act_w)?;
                }
            }
            if let Rule::Criterion {
                c,
                threshold,
                min_steps,
                every,
            } = rule
            {
                if rule.needs_latent() {
                    let check = step >= min_steps && step % every == 0;
                    let kind = match c {
                        Criterion::Cosine => 1,
                        _ => 0,
                    };
                    let v = self.latent(rec, kind)?;
                    for r in (0..s).filter(|&r| active[r]) {
                        exiting[r] |= check && passes(c, v[r] as f64, threshold);
                    }
                }
            }
            // The rows that ran take the new state; exited rows keep theirs.
            if active.iter().all(|&a| a) {
                self.copy_buf(rec.next, rec.state)?;
            } else {
                self.select(
                    self.buf(rec.state),
                    self.buf(rec.next),
                    masks.active,
                    s,
                    cols,
                )?;
            }
            if let Rule::Criterion {
                c,
                threshold,
                min_steps,
                every,
            } = rule
            {
                if rule.needs_logits() {
                    // After the state update, as on the CPU: the readout sees the new states.
                    let check = step >= min_steps && step % every == 0;
                    let v = self.logits_values(rec, c, t == 0)?;
                    for r in (0..s).filter(|&r| active[r]) {
                        exiting[r] |= check && passes(c, v[r], threshold);
                    }
                }
            }
            if retire(&mut active, row_depth, step, |r, _| exiting[r]) {
                self.upload_masks(&active)?;
                self.masks = Some(masks);
            }
            t = step;
        }
        for r in (0..s).filter(|&r| active[r]) {
            row_depth[r] = t;
        }
        self.masks = None;
        self.rows_on.clear();
        if let Rule::Token { .. } = rule {
            // MoR token choice's result: h_0 + w·h_d.
            let r = self.route()?;
            let h0 = r.h0.as_ref().map_or(0, |m| m.addr);
            let (w, state) = (r.w.addr, self.buf(rec.state));
            self.sup(
                support::EPILOGUE,
                s,
                &[
                    p(state),
                    p(state),
                    p(w),
                    p(h0),
                    p(0),
                    i(s),
                    i(cols),
                    i(cols),
                    i(0),
                ],
            )?;
        }
        self.copy_buf(rec.state, rec.next)?;
        Ok(t)
    }

    /// The runs of consecutive running rows `(first, end, running rows before first)`.
    pub(super) fn active_runs(&self) -> Vec<(usize, usize, usize)> {
        if self.rows_on.is_empty() {
            return vec![(0, self.s, 0)];
        }
        let mut runs = Vec::new();
        let (mut r, mut before) = (0, 0);
        while r < self.s {
            if !self.rows_on[r] {
                r += 1;
                continue;
            }
            let r0 = r;
            while r < self.s && self.rows_on[r] {
                r += 1;
            }
            runs.push((r0, r, before));
            before += r - r0;
        }
        runs
    }

    fn route(&self) -> Result<&Route> {
        self.ws
            .route
            .as_ref()
            .ok_or_else(|| RuntimeError::Manifest("no router buffers".into()))
    }

    fn router_out(&self, rec: &Recur) -> Result<u32> {
        rec.router_out
            .ok_or_else(|| RuntimeError::Manifest("a routed recurrence without a router".into()))
    }

    /// Token choice: the router on every row's initial state, each row's depth read back (the
    /// one read of the call), the weights and initial states kept on the device.
    fn token_route(&mut self, rec: &Recur, alpha: f32, cap: usize) -> Result<Vec<usize>> {
        let s = self.s;
        self.list(&rec.router, Some(0))?;
        let out = self.router_out(rec)?;
        let r = self.route()?;
        let (sel, w) = (r.sel.addr, r.w.addr);
        let h0 = r.h0.as_ref().map_or(0, |m| m.addr);
        self.sup(
            support::ROUTE_TOKEN,
            s,
            &[
                p(sel),
                p(w),
                p(self.buf(out)),
                i(s),
                i(self.cols(out)),
                i(cap),
                Param::F32(alpha),
            ],
        )?;
        let cols = self.cols(rec.state);
        self.gpu.copy(h0, self.buf(rec.state), 4 * s * cols)?;
        let mut d = vec![0f32; s];
        self.gpu.download(sel, bytes_mut(&mut d))?;
        Ok(d.iter().map(|x| x.to_bits() as i32 as usize).collect())
    }

    /// Expert choice before iteration `t`: the router on the state, then `route_expert` keeps
    /// the top `max(1, ⌊capacity_t·S⌋)` active rows (a multi-token call) or those with
    /// `σ(z) ≥ threshold` (one token); returns the keep mask, read back.
    fn expert_route(
        &mut self,
        rec: &Recur,
        t: usize,
        alpha: f32,
        threshold: f32,
    ) -> Result<Vec<i32>> {
        let s = self.s;
        self.list(&rec.router, Some(t))?;
        let out = self.router_out(rec)?;
        let (cap_t, n_rec) = match &rec.exit {
            ExitPolicy::ExpertChoice {
                capacity,
                max_steps,
                ..
            } => (capacity.get(t).copied(), *max_steps),
            _ => (None, 1),
        };
        // MoR's default capacity schedule, in the reference's float arithmetic (as the CPU).
        let cap_t = cap_t.unwrap_or((n_rec.saturating_sub(t)) as f64 / n_rec as f64);
        let k = ((cap_t * s as f64) as usize).max(1);
        let r = self.route()?;
        let (sel, w) = (r.sel.addr, r.w.addr);
        self.sup(
            support::ROUTE_EXPERT,
            1,
            &[
                p(sel),
                p(w),
                p(self.buf(out)),
                p(self.ws.active.addr),
                i(s),
                i(k),
                Param::F32(threshold),
                Param::F32(alpha),
            ],
        )?;
        let mut keep = vec![0f32; s];
        self.gpu.download(sel, bytes_mut(&mut keep))?;
        Ok(keep.iter().map(|x| x.to_bits() as i32).collect())
    }

    /// A logit criterion's per-row values after an iteration: the readout (the coda
    /// instructions that depend on the state) over the call's rows, then `exit_logits` on the
    /// active ones, whose history stays on the device; one read of `S` values.
    fn logits_values(&mut self, rec: &Recur, c: Criterion, first: bool) -> Result<Vec<f64>> {
        let man = &self.m.manifest;
        for &ix in &rec.readout {
            let ins = man.program.coda.get(ix as usize).ok_or_else(|| {
                RuntimeError::Manifest("recur: readout index past the end of the coda".into())
            })?;
            self.instr(ins, None)?;
        }
        let kind = support::logits_kind(c).ok_or_else(|| {
            RuntimeError::Unsupported(format!("the exit criterion {c:?} on the logits"))
        })?;
        let h =
            self.ws.logit_hist.as_ref().ok_or_else(|| {
                RuntimeError::Manifest("no exit criterion history buffers".into())
            })?;
        let (s, vocab) = (self.s, man.vocab);
        let uniform = -(vocab.max(1) as f32).ln();
        self.sup(
            support::EXIT_LOGITS,
            s,
            &[
                p(h.value.addr),
                p(self.buf(man.program.logits)),
                p(h.prev_logp.as_ref().map_or(0, |m| m.addr)),
                p(h.prev_h.addr),
                p(h.prev_am.addr),
                p(h.count.addr),
                p(self.ws.active.addr),
                i(s),
                i(vocab),
                Param::I64(kind),
                i(first as usize),
                Param::F32(uniform),
            ],
        )?;
        let mut v = vec![0f64; s];
        self.gpu.download(h.value.addr, bytes_mut64(&mut v))?;
        Ok(v)
    }

    /// ACT's running average on the device: `next = state·(1 − w) + next·w` per row, as two
    /// `epilogue` launches (a row scale, then a row scale and a residual).
    fn act_blend(&self, rec: &Recur, w: &[f32]) -> Result<()> {
        let (s, cols) = (self.s, self.cols(rec.state));
        let (wm, tmp) = self
            .ws
            .act
            .as_ref()
            .ok_or_else(|| RuntimeError::Manifest("no ACT buffers".into()))?;
        self.gpu.upload(wm.addr, bytes(w))?;
        let (next, state) = (self.buf(rec.next), self.buf(rec.state));
        self.sup(
            support::EPILOGUE,
            s,
            &[
                p(tmp.addr),
                p(next),
                p(wm.addr),
                p(0),
                p(0),
                i(s),
                i(cols),
                i(cols),
                i(0),
            ],
        )?;
        self.sup(
            support::EPILOGUE,
            s,
            &[
                p(next),
                p(state),
                p(wm.at(s)),
                p(tmp.addr),
                p(0),
                i(s),
                i(cols),
                i(cols),
                i(0),
            ],
        )
    }

    fn upload_masks(&mut self, active: &[bool]) -> Result<()> {
        self.rows_on.clear();
        self.rows_on.extend_from_slice(active);
        let a: Vec<i32> = active.iter().map(|&x| x as i32).collect();
        let e: Vec<i32> = active.iter().map(|&x| (!x) as i32).collect();
        self.gpu.upload(self.ws.active.addr, bytes(&a))?;
        self.gpu.upload(self.ws.exited.addr, bytes(&e))
    }

    fn init_state(&mut self, init: &StateInit, state: u32) -> Result<()> {
        let cols = self.cols(state);
        let n = self.rows_of(state) * cols;
        match init {
            StateInit::Zeros => self.gpu.zero(self.buf(state), 4 * n),
            StateInit::From(b) => self.copy_buf(*b, state),
            StateInit::TruncNormal { std, scale, seed } => {
                // One generator per absolute position, as on the CPU (drawn on the host: a few
                // rows per call).
                let mut v = vec![0f32; self.s * cols];
                for (r, row) in v.chunks_mut(cols.max(1)).enumerate() {
                    let mut rng =
                        crate::rng::Rng::new(crate::rng::mix(*seed, (self.pos0 + r) as u64));
                    crate::rng::fill_trunc_normal(row, *std, *scale, &mut rng);
                }
                self.gpu.upload(self.buf(state), bytes(&v))
            }
        }
    }

    fn list(&mut self, list: &[Instr], iter: Option<usize>) -> Result<()> {
        for ins in list {
            self.instr(ins, iter)?;
        }
        Ok(())
    }
}

/// Rows that `leave(row, active)` picks stop at `depth`; whether any did (the device's masks
/// then need uploading).
fn retire(
    active: &mut [bool],
    row_depth: &mut [usize],
    depth: usize,
    leave: impl Fn(usize, bool) -> bool,
) -> bool {
    let mut changed = false;
    for (r, a) in active.iter_mut().enumerate() {
        if leave(r, *a) {
            *a = false;
            row_depth[r] = depth;
            changed = true;
        }
    }
    changed
}
