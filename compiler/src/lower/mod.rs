//! Lowering of the optimized graph IR to the runtime's program: buffers, instructions, the kernel
//! list the backend compiles, KV sites and RoPE tables. The forward region splits at its one
//! recurrence into prelude / recur / coda.
mod print;
mod readout;

pub use print::print_manifest;

use loopc_dialects::ops::{
    Binary, CacheSpec, Criterion as DCriterion, ExitSpec, FusedOp, RopeStyle as DRope,
    StateInit as DInit, Unary,
};
use loopc_dialects::{Module, NodeId, Op, Region, Ty};
use loopc_runtime::artifact::MatPart;
use loopc_runtime::artifact::{
    Arg, BufId, BufferDecl, CachePolicy, Criterion, Derive, DerivedWeight, Epilogue, EwIn, EwOp,
    ExitPolicy, GluEpilogue, Instr, KernelDecl, KernelSpec, KvSite, Manifest, NormEpilogue,
    Program, Recur, RopeEpilogue, RopeStyle, RopeTable, Rows, StateInit, WRef, WeightDecl,
    FORMAT_VERSION,
};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
#[error("lowering: {0}")]
pub struct LowerError(pub String);

struct Lowerer {
    buffers: Vec<BufferDecl>,
    kernels: Vec<KernelDecl>,
    kernel_ids: HashMap<String, u32>,
    rope_tables: Vec<RopeTable>,
    kv_sites: Vec<Option<KvSite>>,
    recur: Option<Recur>,
    /// Derived weights, deduplicated by recipe (a hoisted matmul and the body may share one).
    derived: Vec<DerivedWeight>,
    derived_ids: HashMap<String, u32>,
    n_weights: usize,
    /// Buffers of multi-result nodes, keyed by (inside the recurrence, node).
    tuples: HashMap<(bool, NodeId), Vec<BufId>>,
}

pub fn lower(module: &Module, target: &str, backend: &str) -> Result<Manifest, LowerError> {
    let mut l = Lowerer {
        buffers: vec![],
        kernels: vec![],
        kernel_ids: HashMap::new(),
        rope_tables: vec![],
        kv_sites: vec![],
        recur: None,
        derived: vec![],
        derived_ids: HashMap::new(),
        n_weights: module.weights.len(),
        tuples: HashMap::new(),
    };
    let r = &module.forward;
    let mut vals: HashMap<NodeId, BufId> = HashMap::new();
    let mut prelude = vec![];
    let mut coda = vec![];
    let order = r.topo_order();
    let mut after = false;
    for &n in &order {
        let out = if after { &mut coda } else { &mut prelude };
        if let Op::Recur { .. } = r.node(n).op {
            if after {
                return Err(LowerError(
                    "a program with more than one `recur` is not supported by this runtime".into(),
                ));
            }
            l.lower_recur(r, n, &mut vals)?;
            after = true;
            continue;
        }
        l.lower_node(r, n, &mut vals, out, false)?;
    }
    let logits_node = r.results[0];
    let logits = *vals
        .get(&logits_node)
        .ok_or_else(|| LowerError("forward must return an activation".into()))?;
    let vocab = l.buffers[logits as usize].cols;
    let hidden = module
        .params
        .iter()
        .find(|(k, _)| k == "dim")
        .map(|(_, v)| *v as usize)
        .unwrap_or(0);
    let kv_sites = l
        .kv_sites
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.ok_or_else(|| LowerError(format!("attention site {i} is not used"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Manifest {
        format_version: FORMAT_VERSION,
        model: module.name.clone(),
        target: target.into(),
        backend: backend.into(),
        params: module.params.iter().cloned().collect(),
        vocab,
        hidden,
        weights: module
            .weights
            .iter()
            .map(|w| WeightDecl {
                name: w.name.clone(),
                shape: w.shape.clone(),
                origin: w.origin.clone(),
            })
            .collect(),
        buffers: l.buffers,
        kernels: l.kernels,
        rope_tables: l.rope_tables,
        kv_sites,
        program: Program {
            prelude,
            recur: l.recur.map(|mut r| {
                r.readout = readout::readout(&coda, r.state, r.next);
                r
            }),
            coda,
            logits,
        },
        derived: l.derived,
        cuda: None,
        host_gemm: None,
    })
}

fn criterion(c: DCriterion) -> Criterion {
    match c {
        DCriterion::LatentDiff => Criterion::LatentDiff,
        DCriterion::Cosine => Criterion::Cosine,
        DCriterion::Kl => Criterion::Kl,
        DCriterion::MinpKl => Criterion::MinpKl,
        DCriterion::EntropyDiff => Criterion::EntropyDiff,
        DCriterion::ArgmaxStability => Criterion::ArgmaxStability,
    }
}

fn wref(op: &Op) -> Option<WRef> {
    let Op::Weight(v) = op else { return None };
    let (rows, cols) = match v.shape.as_slice() {
        [n, k] => (*n, *k),
        _ => (1, v.numel()),
    };
    Some(WRef {
        weight: v.weight,
        offset: v.offset,
        rows,
        cols,
    })
}

impl Lowerer {
    /// The weight window a weight-typed node denotes; derived weights are registered (once).
    fn wref(&mut self, r: &Region, n: NodeId) -> Result<Option<WRef>, LowerError> {
        let op = &r.node(n).op;
        if !op.is_derived_weight() {
            return Ok(wref(op));
        }
        let mut srcs = vec![];
        for o in r.operands(n) {
            srcs.push(
                self.wref(r, o)?
                    .ok_or_else(|| LowerError("a derived weight reads a non-weight".into()))?,
            );
        }
        let recipe = match op {
            Op::WSliceCols { start, len } => Derive::SliceCols {
                src: srcs[0],
                start: *start,
                len: *len,
            },
            Op::WScale(c) => Derive::Scale {
                src: srcs[0],
                by: *c,
            },
            Op::WMulCols => Derive::MulCols {
                src: srcs[0],
                gain: srcs[1],
            },
            Op::WConcatRows => Derive::ConcatRows { srcs },
            Op::WPerIter => Derive::PerIter { srcs },
            Op::WMap { body } => Derive::Map {
                srcs,
                ops: body.iter().map(ew_op).collect(),
            },
            Op::WRepeatRows(times) => Derive::RepeatRows {
                src: srcs[0],
                times: *times,
            },
            Op::WTranspose => Derive::Transpose { src: srcs[0] },
            Op::WInterleaveRows(block) => Derive::InterleaveRows {
                src: srcs[0],
                block: *block,
            },
            _ => unreachable!("is_derived_weight"),
        };
        self.register(recipe, op.mnemonic()).map(Some)
    }

    /// The per-iteration variants of a derived weight, if it is a `PerIter` one.
    fn per_iter_of(&self, w: &WRef) -> Option<Vec<WRef>> {
        let d = self
            .derived
            .get((w.weight as usize).checked_sub(self.n_weights)?)?;
        match &d.recipe {
            Derive::PerIter { srcs } => Some(srcs.clone()),
            _ => None,
        }
    }

    /// Register a derived weight (once per recipe). A recipe that reads a per-iteration weight
    /// is itself per-iteration: it is distributed over the iterations, so the runtime only ever
    /// derives from checkpoint tensors and selects among whole weights per iteration.
    fn register(&mut self, recipe: Derive, mnemonic: &str) -> Result<WRef, LowerError> {
        if !matches!(recipe, Derive::PerIter { .. }) {
            let srcs: Vec<WRef> = recipe.sources().into_iter().copied().collect();
            let variants: Vec<Option<Vec<WRef>>> =
                srcs.iter().map(|s| self.per_iter_of(s)).collect();
            if let Some(n) = variants.iter().flatten().map(|v| v.len()).max() {
                let mut per = vec![];
                for t in 0..n {
                    let pick = |i: usize| match &variants[i] {
                        Some(v) => v[t.min(v.len() - 1)],
                        None => srcs[i],
                    };
                    let rt = match &recipe {
                        Derive::SliceCols { start, len, .. } => Derive::SliceCols {
                            src: pick(0),
                            start: *start,
                            len: *len,
                        },
                        Derive::Scale { by, .. } => Derive::Scale {
                            src: pick(0),
                            by: *by,
                        },
                        Derive::MulCols { .. } => Derive::MulCols {
                            src: pick(0),
                            gain: pick(1),
                        },
                        Derive::ConcatRows { .. } => Derive::ConcatRows {
                            srcs: (0..srcs.len()).map(pick).collect(),
                        },
                        Derive::Map { ops, .. } => Derive::Map {
                            srcs: (0..srcs.len()).map(pick).collect(),
                            ops: ops.clone(),
                        },
                        Derive::RepeatRows { times, .. } => Derive::RepeatRows {
                            src: pick(0),
                            times: *times,
                        },
                        Derive::Transpose { .. } => Derive::Transpose { src: pick(0) },
                        Derive::InterleaveRows { block, .. } => Derive::InterleaveRows {
                            src: pick(0),
                            block: *block,
                        },
                        Derive::PerIter { .. } => unreachable!(),
                    };
                    per.push(self.register(rt, mnemonic)?);
                }
                return self.register(Derive::PerIter { srcs: per }, "w.per_iter");
            }
        }
        let (rows, cols) = recipe
            .out_shape()
            .map_err(|e| LowerError(format!("derived weight: {e}")))?;
        let key = format!("{recipe:?}");
        let id = match self.derived_ids.get(&key) {
            Some(&i) => i,
            None => {
                let i = (self.n_weights + self.derived.len()) as u32;
                let name = format!(
                    "{}({})",
                    mnemonic,
                    recipe
                        .sources()
                        .iter()
                        .map(|w| format!("#{}+{}", w.weight, w.offset))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                self.derived.push(DerivedWeight {
                    name,
                    shape: vec![rows, cols],
                    recipe,
                });
                self.derived_ids.insert(key, i);
                i
            }
        };
        Ok(WRef {
            weight: id,
            offset: 0,
            rows,
            cols,
        })
    }

    fn buffer(&mut self, name: String, cols: usize) -> BufId {
        self.buffers.push(BufferDecl {
            name,
            rows: Rows::Tokens,
            cols,
        });
        (self.buffers.len() - 1) as BufId
    }

    fn kernel(&mut self, spec: KernelSpec) -> u32 {
        let key = format!("{spec:?}");
        if let Some(&k) = self.kernel_ids.get(&key) {
            return k;
        }
        let kind = match &spec {
            KernelSpec::Elementwise { .. } => "ew",
            KernelSpec::RmsNorm { .. } => "rmsnorm",
            KernelSpec::HeadRmsNorm { .. } => "headnorm",
            KernelSpec::Rope { .. } => "rope",
            KernelSpec::Attention { .. } => "attn",
            KernelSpec::LayerNorm { .. } => "layernorm",
            KernelSpec::Glu { .. } => "glu",
            KernelSpec::RopeBias { .. } => "rope",
            KernelSpec::InvRms { .. } => "invrms",
        };
        let id = self.kernels.len() as u32;
        self.kernels.push(KernelDecl {
            symbol: format!("loopc_k{id}_{kind}"),
            spec,
        });
        self.kernel_ids.insert(key, id);
        id
    }

    fn rope_table(&mut self, head_dim: usize, base: f64) -> u32 {
        let t = RopeTable { head_dim, base };
        if let Some(i) = self.rope_tables.iter().position(|x| *x == t) {
            return i as u32;
        }
        self.rope_tables.push(t);
        (self.rope_tables.len() - 1) as u32
    }

    fn arg(
        &mut self,
        r: &Region,
        n: NodeId,
        vals: &HashMap<NodeId, BufId>,
    ) -> Result<Arg, LowerError> {
        if let Some(w) = self.wref(r, n)? {
            return Ok(Arg::Weight(w));
        }
        vals.get(&n)
            .map(|&b| Arg::Buf(b))
            .ok_or_else(|| LowerError(format!("value {n:?} has no buffer")))
    }

    fn buf(&self, n: NodeId, vals: &HashMap<NodeId, BufId>) -> Result<BufId, LowerError> {
        vals.get(&n)
            .copied()
            .ok_or_else(|| LowerError(format!("value {n:?} has no buffer")))
    }

    fn lower_recur(
        &mut self,
        r: &Region,
        n: NodeId,
        vals: &mut HashMap<NodeId, BufId>,
    ) -> Result<(), LowerError> {
        let Op::Recur {
            steps,
            init,
            exit,
            cache,
            gate,
            router,
            body,
        } = &r.node(n).op
        else {
            unreachable!()
        };
        // The router's cone runs before the rest of the body, on the state at the start of the
        // iteration, with buffers of its own (the rows it scores are not the rows the body
        // then runs on); the body lowers only what the next state and gate need.
        let router_root = router.then(|| body.results[body.results.len() - 1]);
        let cone = |roots: &[NodeId]| -> std::collections::HashSet<NodeId> {
            let mut seen: std::collections::HashSet<NodeId> = roots.iter().copied().collect();
            let mut stack = roots.to_vec();
            while let Some(x) = stack.pop() {
                for o in body.operands(x) {
                    if seen.insert(o) {
                        stack.push(o);
                    }
                }
            }
            seen
        };
        let body_roots: Vec<NodeId> = body.results[..1 + usize::from(*gate)].to_vec();
        let body_cone = cone(&body_roots);
        let router_cone = router_root.map(|x| cone(&[x])).unwrap_or_default();
        let ops = r.operands(n);
        let cols = r
            .ty(n)
            .cols()
            .ok_or_else(|| LowerError("the recurrence state must be an activation".into()))?;
        let state = self.buffer("state".into(), cols);
        let init = match init {
            DInit::Zeros => StateInit::Zeros,
            DInit::Operand => StateInit::From(self.buf(ops[0], vals)?),
            DInit::TruncNormal { std, scale, seed } => StateInit::TruncNormal {
                std: *std,
                scale: *scale,
                seed: *seed,
            },
        };
        let n_init = usize::from(matches!(init, StateInit::From(_)));
        let mut router_instrs = vec![];
        let mut router_out = None;
        if let Some(root) = router_root {
            let mut rvals: HashMap<NodeId, BufId> = HashMap::new();
            for bn in body.topo_order() {
                if !router_cone.contains(&bn) {
                    continue;
                }
                match body.node(bn).op {
                    Op::Param(0) => {
                        rvals.insert(bn, state);
                    }
                    Op::Param(i) => {
                        let outer = ops[n_init + i as usize - 1];
                        rvals.insert(bn, self.buf(outer, vals)?);
                    }
                    Op::Attention { .. } | Op::Recur { .. } => {
                        return Err(LowerError(
                            "a router reads the state only through per-token ops, not attention"
                                .into(),
                        ))
                    }
                    _ => self.lower_node(body, bn, &mut rvals, &mut router_instrs, true)?,
                }
            }
            let mut out = self.buf(root, &rvals)?;
            if out == state {
                let b = self.buffer("router".into(), cols);
                router_instrs.push(Instr::Copy { src: state, dst: b });
                out = b;
            }
            router_out = Some(out);
        }
        let mut bvals: HashMap<NodeId, BufId> = HashMap::new();
        let mut instrs = vec![];
        for bn in body.topo_order() {
            if !body_cone.contains(&bn) {
                continue;
            }
            match body.node(bn).op {
                Op::Param(0) => {
                    bvals.insert(bn, state);
                }
                Op::Param(i) => {
                    let outer = ops[n_init + i as usize - 1];
                    let b = match r.ty(outer) {
                        Ty::Weight(_) => {
                            return Err(LowerError(
                                "a weight captured by `recur` must be declared inside it".into(),
                            ))
                        }
                        _ => self.buf(outer, vals)?,
                    };
                    bvals.insert(bn, b);
                }
                Op::Recur { .. } => {
                    return Err(LowerError(
                        "nested `recur` is not supported by this runtime".into(),
                    ))
                }
                _ => self.lower_node(body, bn, &mut bvals, &mut instrs, true)?,
            }
        }
        let mut next = self.buf(body.results[0], &bvals)?;
        if next == state {
            // The body did not change the state; the runtime still needs a distinct buffer.
            let b = self.buffer("state_next".into(), cols);
            instrs.push(Instr::Copy { src: state, dst: b });
            next = b;
        }
        let gate = if *gate {
            Some(self.buf(body.results[1], &bvals)?)
        } else {
            None
        };
        self.recur = Some(Recur {
            state,
            next,
            init,
            body: instrs,
            default_steps: *steps,
            exit: match exit {
                ExitSpec::Fixed => ExitPolicy::Fixed,
                ExitSpec::Converge {
                    threshold,
                    min_steps,
                    max_steps,
                } => ExitPolicy::Converge {
                    threshold: *threshold,
                    min_steps: *min_steps,
                    max_steps: *max_steps,
                },
                ExitSpec::Criterion {
                    kind,
                    threshold,
                    min_steps,
                    every,
                    max_steps,
                } => ExitPolicy::Criterion {
                    criterion: criterion(*kind),
                    threshold: *threshold,
                    min_steps: *min_steps,
                    every: *every,
                    max_steps: *max_steps,
                },
                ExitSpec::Gate {
                    q,
                    min_steps,
                    max_steps,
                } => ExitPolicy::Gate {
                    q: *q,
                    min_steps: *min_steps,
                    max_steps: *max_steps,
                },
                ExitSpec::Act { eps, max_steps } => ExitPolicy::Act {
                    eps: *eps,
                    max_steps: *max_steps,
                },
                ExitSpec::ExpertChoice {
                    alpha,
                    capacity,
                    threshold,
                    max_steps,
                } => ExitPolicy::ExpertChoice {
                    alpha: *alpha,
                    capacity: capacity.clone(),
                    threshold: *threshold,
                    max_steps: *max_steps,
                },
                ExitSpec::TokenChoice { alpha, max_steps } => ExitPolicy::TokenChoice {
                    alpha: *alpha,
                    max_steps: *max_steps,
                },
            },
            cache: match cache {
                CacheSpec::PerStep => CachePolicy::PerStep,
                CacheSpec::Ring(c) => CachePolicy::Ring(*c),
                CacheSpec::ShareFirst => CachePolicy::ShareFirst,
                CacheSpec::LastStep => CachePolicy::LastStep,
                CacheSpec::RecursionWise => CachePolicy::RecursionWise,
            },
            gate,
            readout: vec![],
            router: router_instrs,
            router_out,
        });
        // After the loop, the recur node's value is the final state.
        vals.insert(n, state);
        Ok(())
    }

    /// The operands every matmul form starts with: `x`, the weight, then the optional row scale
    /// and residual in that order. Returns the epilogue so far and the index of the next operand.
    fn matmul_operands(
        &mut self,
        r: &Region,
        ops: &[NodeId],
        vals: &HashMap<NodeId, BufId>,
        what: &str,
        row_scale: bool,
        residual: bool,
    ) -> Result<(BufId, WRef, Epilogue, usize), LowerError> {
        let w = self
            .wref(r, ops[1])?
            .ok_or_else(|| LowerError(format!("`{what}` needs a weight")))?;
        let x = self.buf(ops[0], vals)?;
        let mut i = 2;
        let mut epi = Epilogue::default();
        if row_scale {
            epi.row_scale = Some(self.buf(ops[i], vals)?);
            i += 1;
        }
        if residual {
            epi.residual = Some(self.buf(ops[i], vals)?);
            i += 1;
        }
        Ok((x, w, epi, i))
    }

    fn lower_node(
        &mut self,
        r: &Region,
        n: NodeId,
        vals: &mut HashMap<NodeId, BufId>,
        out: &mut Vec<Instr>,
        in_loop: bool,
    ) -> Result<(), LowerError> {
        let node = r.node(n);
        let ops = r.operands(n);
        match &node.op {
            Op::RmsNormRes { eps } => {
                let Ty::Tuple(ts) = &node.ty else {
                    return Err(LowerError("`rmsnorm_res` must be a pair".into()));
                };
                let cols = ts
                    .first()
                    .and_then(|t| t.cols())
                    .ok_or_else(|| LowerError("`rmsnorm_res` of a non-activation".into()))?;
                let (a, b) = (self.buf(ops[0], vals)?, self.buf(ops[1], vals)?);
                let gain = ops.get(2).map(|&g| self.arg(r, g, vals)).transpose()?;
                let k = self.kernel(KernelSpec::RmsNorm {
                    cols,
                    eps: *eps,
                    residual: true,
                    gain: gain.is_some(),
                });
                let sum = self.buffer("rmsnorm_res_sum".into(), cols);
                let y = self.buffer("rmsnorm_res".into(), cols);
                let mut args = vec![Arg::Buf(a), Arg::Buf(b)];
                args.extend(gain);
                args.extend([Arg::Buf(sum), Arg::Buf(y)]);
                out.push(Instr::Kernel { kernel: k, args });
                self.tuples.insert((in_loop, n), vec![sum, y]);
                return Ok(());
            }
            Op::LinearParts {
                parts,
                row_scale,
                ropes,
            } => {
                let (x, w, epi, mut i) =
                    self.matmul_operands(r, &ops, vals, "linear_parts", *row_scale, false)?;
                let mut epis = vec![epi; parts.len()];
                for (j, rot) in ropes.iter().enumerate() {
                    let (Some(rot), Some(e)) = (rot, epis.get_mut(j)) else {
                        continue;
                    };
                    let head_dim = parts[j] / rot.heads;
                    e.rope = Some(RopeEpilogue {
                        table: self.rope_table(head_dim, rot.base),
                        head_dim,
                        style: match rot.style {
                            DRope::Interleaved => RopeStyle::Interleaved,
                            DRope::Half => RopeStyle::Half,
                        },
                    });
                    if rot.bias {
                        e.bias = Some(self.wref(r, ops[i])?.ok_or_else(|| {
                            LowerError("`linear_parts` rope bias must be a weight".into())
                        })?);
                        i += 1;
                    }
                }
                let outs: Vec<BufId> = parts
                    .iter()
                    .map(|&c| self.buffer("linear_part".into(), c))
                    .collect();
                if let ([o], [e]) = (&outs[..], &epis[..]) {
                    // One part (a lone rotated q or k): the plain matmul with that epilogue.
                    out.push(Instr::MatMul {
                        x,
                        w,
                        out: *o,
                        epi: *e,
                    });
                } else {
                    out.push(Instr::MatMulParts {
                        x,
                        w,
                        parts: outs
                            .iter()
                            .zip(epis)
                            .map(|(&o, epi)| MatPart { out: o, epi })
                            .collect(),
                    });
                }
                self.tuples.insert((in_loop, n), outs);
                return Ok(());
            }
            Op::LinearNorm {
                row_scale,
                residual,
                normalize,
                gain,
                eps,
            } => {
                let cols = match &node.ty {
                    Ty::Tuple(ts) => ts.first().and_then(|t| t.cols()),
                    _ => None,
                }
                .ok_or_else(|| LowerError("`linear_norm` must be a pair".into()))?;
                let (x, w, mut epi, i) =
                    self.matmul_operands(r, &ops, vals, "linear_norm", *row_scale, *residual)?;
                let g =
                    if *gain {
                        Some(self.wref(r, ops[i])?.ok_or_else(|| {
                            LowerError("`linear_norm` gain must be a weight".into())
                        })?)
                    } else {
                        None
                    };
                let o = self.buffer("linear_norm".into(), cols);
                let q = self.buffer("linear_norm_inv_rms".into(), 1);
                epi.norm = Some(NormEpilogue {
                    eps: *eps,
                    normalize: *normalize,
                    gain: g,
                    inv_rms: Some(q),
                });
                out.push(Instr::MatMul { x, w, out: o, epi });
                self.tuples.insert((in_loop, n), vec![o, q]);
                return Ok(());
            }
            Op::Proj(i) => {
                let b = self
                    .tuples
                    .get(&(in_loop, ops[0]))
                    .and_then(|v| v.get(*i as usize))
                    .copied()
                    .ok_or_else(|| LowerError("`proj` of a value with no results".into()))?;
                vals.insert(n, b);
                return Ok(());
            }
            _ => {}
        }
        let cols = match node.ty {
            Ty::Act(c) => c,
            _ => return Ok(()), // tokens and weights need no buffer
        };
        let name = node.op.mnemonic().replace('.', "_");
        match &node.op {
            Op::Embed => {
                let table = self
                    .wref(r, ops[1])?
                    .ok_or_else(|| LowerError("`embed` needs a weight table".into()))?;
                let o = self.buffer(name, cols);
                out.push(Instr::Embed { table, out: o });
                vals.insert(n, o);
            }
            Op::Linear => {
                let w = self
                    .wref(r, ops[1])?
                    .ok_or_else(|| LowerError("`linear` needs a weight".into()))?;
                let x = self.buf(ops[0], vals)?;
                let o = self.buffer(name, cols);
                out.push(Instr::MatMul {
                    x,
                    w,
                    out: o,
                    epi: Epilogue::default(),
                });
                vals.insert(n, o);
            }
            Op::LinearEp {
                row_scale,
                residual,
                bias,
            } => {
                let (x, w, mut epi, i) =
                    self.matmul_operands(r, &ops, vals, "linear_ep", *row_scale, *residual)?;
                if *bias {
                    epi.bias =
                        Some(self.wref(r, ops[i])?.ok_or_else(|| {
                            LowerError("`linear_ep` bias must be a weight".into())
                        })?);
                }
                let o = self.buffer(name, cols);
                out.push(Instr::MatMul { x, w, out: o, epi });
                vals.insert(n, o);
            }
            Op::LinearGlu {
                act,
                block,
                row_scale,
            } => {
                let (x, w, mut epi, _) =
                    self.matmul_operands(r, &ops, vals, "linear_glu", *row_scale, false)?;
                // The product goes to a scratch of its own: the epilogue reads each gate/up block
                // of it while writing the (narrower) result.
                let scratch = self.buffer(format!("{name}_product"), 2 * cols);
                let o = self.buffer(name, cols);
                epi.glu = Some(GluEpilogue {
                    out: o,
                    block: *block,
                    act: ew_op(&FusedOp::Unary(*act, 0)),
                });
                out.push(Instr::MatMul {
                    x,
                    w,
                    out: scratch,
                    epi,
                });
                vals.insert(n, o);
            }
            Op::InvRms { eps } => {
                let x = self.buf(ops[0], vals)?;
                let xc = r
                    .ty(ops[0])
                    .cols()
                    .ok_or_else(|| LowerError("`inv_rms` of a non-activation".into()))?;
                let k = self.kernel(KernelSpec::InvRms {
                    cols: xc,
                    eps: *eps,
                });
                let o = self.buffer(name, cols);
                out.push(Instr::Kernel {
                    kernel: k,
                    args: vec![Arg::Buf(x), Arg::Buf(o)],
                });
                vals.insert(n, o);
            }
            Op::RmsNorm { eps } => {
                let x = self.buf(ops[0], vals)?;
                let gain = ops.get(1).map(|&g| self.arg(r, g, vals)).transpose()?;
                let k = self.kernel(KernelSpec::RmsNorm {
                    cols,
                    eps: *eps,
                    residual: false,
                    gain: gain.is_some(),
                });
                let o = self.buffer(name, cols);
                let mut args = vec![Arg::Buf(x)];
                args.extend(gain);
                args.push(Arg::Buf(o));
                out.push(Instr::Kernel { kernel: k, args });
                vals.insert(n, o);
            }
            Op::HeadRmsNorm { heads, eps } => {
                let x = self.buf(ops[0], vals)?;
                let k = self.kernel(KernelSpec::HeadRmsNorm {
                    heads: *heads,
                    head_dim: cols / heads,
                    eps: *eps,
                });
                let o = self.buffer(name, cols);
                out.push(Instr::Kernel {
                    kernel: k,
                    args: vec![Arg::Buf(x), Arg::Buf(o)],
                });
                vals.insert(n, o);
            }
            Op::Rope { heads, style, base } => {
                let x = self.buf(ops[0], vals)?;
                let head_dim = cols / heads;
                // Rotate in place when nothing else reads the input (the usual q/k projection).
                let src = ops[0];
                let private = r.users(src).len() == 1
                    && !matches!(r.node(src).op, Op::Param(_))
                    && !r.results.contains(&src);
                let o = if private {
                    x
                } else {
                    let o = self.buffer(name, cols);
                    out.push(Instr::Copy { src: x, dst: o });
                    o
                };
                let t = self.rope_table(head_dim, *base);
                let style = match style {
                    DRope::Interleaved => RopeStyle::Interleaved,
                    DRope::Half => RopeStyle::Half,
                };
                let (k, mut args) = match ops.get(1) {
                    Some(&b) => {
                        let bias = self.arg(r, b, vals)?;
                        (
                            self.kernel(KernelSpec::RopeBias {
                                heads: *heads,
                                head_dim,
                                style,
                            }),
                            vec![Arg::Buf(o), bias],
                        )
                    }
                    None => (
                        self.kernel(KernelSpec::Rope {
                            heads: *heads,
                            head_dim,
                            style,
                        }),
                        vec![Arg::Buf(o)],
                    ),
                };
                args.extend([Arg::RopeCos(t), Arg::RopeSin(t)]);
                out.push(Instr::Kernel { kernel: k, args });
                vals.insert(n, o);
            }
            Op::Attention {
                heads,
                kv_heads,
                scale,
                site,
            } => {
                let (q, kb, vb) = (
                    self.buf(ops[0], vals)?,
                    self.buf(ops[1], vals)?,
                    self.buf(ops[2], vals)?,
                );
                let head_dim = cols / heads;
                let s = *site as usize;
                if self.kv_sites.len() <= s {
                    self.kv_sites.resize(s + 1, None);
                }
                self.kv_sites[s] = Some(KvSite {
                    name: format!("site{s}"),
                    kv_heads: *kv_heads,
                    head_dim,
                    in_loop,
                });
                out.push(Instr::KvWrite {
                    site: *site,
                    k: kb,
                    v: vb,
                });
                let k = self.kernel(KernelSpec::Attention {
                    heads: *heads,
                    kv_heads: *kv_heads,
                    head_dim,
                    scale: *scale,
                });
                let o = self.buffer(name, cols);
                out.push(Instr::Kernel {
                    kernel: k,
                    args: vec![
                        Arg::Buf(q),
                        Arg::KCache(*site),
                        Arg::VCache(*site),
                        Arg::Buf(o),
                    ],
                });
                vals.insert(n, o);
            }
            Op::Glu(u) => {
                let x = self.buf(ops[0], vals)?;
                let act = ew_op(&FusedOp::Unary(*u, 0));
                let k = self.kernel(KernelSpec::Glu {
                    cols,
                    ops: vec![EwOp::Input(0), act, EwOp::Input(1), EwOp::Mul(1, 2)],
                });
                let o = self.buffer(name, cols);
                out.push(Instr::Kernel {
                    kernel: k,
                    args: vec![Arg::Buf(x), Arg::Buf(o)],
                });
                vals.insert(n, o);
            }
            Op::Concat => {
                let inputs = ops
                    .iter()
                    .map(|&o| self.buf(o, vals))
                    .collect::<Result<Vec<_>, _>>()?;
                let o = self.buffer(name, cols);
                out.push(Instr::Concat { inputs, out: o });
                vals.insert(n, o);
            }
            Op::Slice { start, .. } => {
                let src = self.buf(ops[0], vals)?;
                let o = self.buffer(name, cols);
                out.push(Instr::SliceCols {
                    src,
                    start: *start,
                    out: o,
                });
                vals.insert(n, o);
            }
            Op::LayerNorm { eps } => {
                let x = self.buf(ops[0], vals)?;
                let g = self.arg(r, ops[1], vals)?;
                let b = self.arg(r, ops[2], vals)?;
                let k = self.kernel(KernelSpec::LayerNorm { cols, eps: *eps });
                let o = self.buffer(name, cols);
                out.push(Instr::Kernel {
                    kernel: k,
                    args: vec![Arg::Buf(x), g, b, Arg::Buf(o)],
                });
                vals.insert(n, o);
            }
            Op::MatMul => {
                let w = wref(&r.node(ops[1]).op)
                    .ok_or_else(|| LowerError("`matmul` needs a weight".into()))?;
                let x = self.buf(ops[0], vals)?;
                let o = self.buffer(name, cols);
                out.push(Instr::MatMulKN { x, w, out: o });
                vals.insert(n, o);
            }
            Op::PosEmbed => {
                let table = wref(&r.node(ops[0]).op)
                    .ok_or_else(|| LowerError("`pos_embed` needs a weight table".into()))?;
                let o = self.buffer(name, cols);
                out.push(Instr::PosEmbed { table, out: o });
                vals.insert(n, o);
            }
            Op::Sinusoidal { base, .. } => {
                let o = self.buffer(name, cols);
                out.push(Instr::Sinusoidal {
                    base: *base,
                    out: o,
                });
                vals.insert(n, o);
            }
            Op::TimingSignal {
                min_timescale,
                max_timescale,
                step,
                ..
            } => {
                let o = self.buffer(name, cols);
                out.push(Instr::TimingSignal {
                    min_timescale: *min_timescale,
                    max_timescale: *max_timescale,
                    step: *step,
                    out: o,
                });
                vals.insert(n, o);
            }
            Op::Unary(_) | Op::Binary(_) | Op::Scale(_) | Op::Fused { .. } => {
                let body = match &node.op {
                    Op::Unary(u) => vec![FusedOp::Arg(0), FusedOp::Unary(*u, 0)],
                    Op::Binary(b) => {
                        vec![FusedOp::Arg(0), FusedOp::Arg(1), FusedOp::Binary(*b, 0, 1)]
                    }
                    Op::Scale(c) => vec![
                        FusedOp::Arg(0),
                        FusedOp::Const(*c),
                        FusedOp::Binary(Binary::Mul, 0, 1),
                    ],
                    Op::Fused { body } => body.clone(),
                    _ => unreachable!(),
                };
                let mut args = vec![];
                let mut inputs = vec![];
                for &o in &ops {
                    let a = self.arg(r, o, vals)?;
                    inputs.push(if matches!(a, Arg::Weight(_)) {
                        EwIn::Broadcast
                    } else {
                        EwIn::Rows
                    });
                    args.push(a);
                }
                let ew: Vec<EwOp> = body.iter().map(ew_op).collect();
                let last = (ew.len() - 1) as u32;
                let k = self.kernel(KernelSpec::Elementwise {
                    cols,
                    inputs,
                    ops: ew,
                    outputs: vec![last],
                });
                let o = self.buffer(
                    if matches!(node.op, Op::Fused { .. }) {
                        "fused".into()
                    } else {
                        name
                    },
                    cols,
                );
                args.push(Arg::Buf(o));
                out.push(Instr::Kernel { kernel: k, args });
                vals.insert(n, o);
            }
            // Weights (derived ones too) need no buffer; multi-result nodes were handled above.
            Op::Param(_)
            | Op::Recur { .. }
            | Op::Tokens
            | Op::Weight(_)
            | Op::RmsNormRes { .. }
            | Op::LinearParts { .. }
            | Op::LinearNorm { .. }
            | Op::Proj(_)
            | Op::WSliceCols { .. }
            | Op::WScale(_)
            | Op::WMulCols
            | Op::WConcatRows
            | Op::WPerIter
            | Op::WMap { .. }
            | Op::WRepeatRows(_)
            | Op::WTranspose
            | Op::WInterleaveRows(_) => {}
        }
        Ok(())
    }
}

fn ew_op(f: &FusedOp) -> EwOp {
    match *f {
        FusedOp::Arg(i) => EwOp::Input(i),
        FusedOp::Const(c) => EwOp::Const(c),
        FusedOp::Unary(u, a) => match u {
            Unary::Neg => EwOp::Neg(a),
            Unary::Exp => EwOp::Exp(a),
            Unary::Sigmoid => EwOp::Sigmoid(a),
            Unary::Silu => EwOp::Silu(a),
            Unary::Relu => EwOp::Relu(a),
            Unary::Tanh => EwOp::Tanh(a),
            Unary::GeluTanh => EwOp::GeluTanh(a),
            Unary::Sqrt => EwOp::Sqrt(a),
            Unary::Softplus => EwOp::Softplus(a),
        },
        FusedOp::Binary(b, x, y) => match b {
            Binary::Add => EwOp::Add(x, y),
            Binary::Sub => EwOp::Sub(x, y),
            Binary::Mul => EwOp::Mul(x, y),
            Binary::Div => EwOp::Div(x, y),
            Binary::Max => EwOp::Max(x, y),
        },
    }
}
