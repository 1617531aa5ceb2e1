//! The rewrite rules: each one-directional and named, in stages (no associativity or
//! commutativity, so saturation of each stage ends in a few iterations).
//!
//! A rule is a pair of plain functions wrapped as an egg [`Searcher`] and [`Applier`]: the
//! searcher returns matches as positional values (class ids and, where a rule needs an
//! attribute of the matched op, its bits), which travel to the applier in egg's `Subst`.
use super::lang::{
    act_width, nodes_where, weight_shape, TGraph, TNode, TOp, TensorAnalysis, ADD, MUL,
};
use egg::{Applier, Id, PatternAst, Rewrite, SearchMatches, Searcher, Subst, Symbol, Var};

/// Positional match values: class ids or attribute bits, each below 2³² (egg ids are u32;
/// wider attributes are split in halves).
pub type Match = Vec<usize>;

pub struct Rule {
    pub name: &'static str,
    pub stage: &'static str,
    pub search: fn(&TGraph, Id) -> Vec<Match>,
    pub apply: fn(&mut TGraph, Id, &Match) -> bool,
}

const MAX_VALS: usize = 16;

fn var(i: usize) -> Var {
    format!("?m{i}").parse().expect("valid egg variable")
}

struct FnSearcher(fn(&TGraph, Id) -> Vec<Match>);
struct FnApplier(fn(&mut TGraph, Id, &Match) -> bool);

impl Searcher<TNode, TensorAnalysis> for FnSearcher {
    fn search_eclass_with_limit(
        &self,
        eg: &TGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<SearchMatches<'_, TNode>> {
        let mut substs = vec![];
        for m in (self.0)(eg, eclass).into_iter().take(limit) {
            if m.len() >= MAX_VALS || m.iter().any(|&v| v > u32::MAX as usize) {
                continue;
            }
            let mut s = Subst::with_capacity(m.len() + 1);
            // ?m0 holds the count, so matches of different lengths decode unambiguously.
            s.insert(var(0), Id::from(m.len()));
            for (i, v) in m.iter().enumerate() {
                s.insert(var(i + 1), Id::from(*v));
            }
            substs.push(s);
        }
        (!substs.is_empty()).then_some(SearchMatches {
            eclass,
            substs,
            ast: None,
        })
    }
    fn vars(&self) -> Vec<Var> {
        (0..MAX_VALS).map(var).collect()
    }
}

impl Applier<TNode, TensorAnalysis> for FnApplier {
    fn apply_one(
        &self,
        eg: &mut TGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<TNode>>,
        _: Symbol,
    ) -> Vec<Id> {
        let n: usize = subst.get(var(0)).map_or(0, |i| usize::from(*i));
        let m: Match = (0..n)
            .filter_map(|i| subst.get(var(i + 1)).map(|v| usize::from(*v)))
            .collect();
        if (self.0)(eg, eclass, &m) {
            vec![eclass]
        } else {
            vec![]
        }
    }
}

impl Rule {
    pub fn rewrite(&self) -> Rewrite<TNode, TensorAnalysis> {
        Rewrite::new(self.name, FnSearcher(self.search), FnApplier(self.apply))
            .expect("rule is well-formed")
    }
}

/// LICM first: splitting the adapter exposes a residual add in front of the first norm.
pub const STAGES: &[&str] = &["licm", "fuse-norm", "fold-weights", "epilogue"];

pub fn all() -> Vec<Rule> {
    vec![
        Rule {
            name: "rmsnorm-residual",
            stage: "fuse-norm",
            search: rmsnorm_residual_search,
            apply: rmsnorm_residual_apply,
        },
        Rule {
            name: "scale-identity",
            stage: "fold-weights",
            search: scale_identity_search,
            apply: scale_identity_apply,
        },
        Rule {
            name: "embed-scale-fold",
            stage: "fold-weights",
            search: embed_scale_search,
            apply: embed_scale_apply,
        },
        Rule {
            name: "q-scale-fold",
            stage: "fold-weights",
            search: q_scale_search,
            apply: q_scale_apply,
        },
        Rule {
            name: "rmsnorm-gain-fold",
            stage: "fold-weights",
            search: gain_fold_search,
            apply: gain_fold_apply,
        },
        Rule {
            name: "swiglu-fuse",
            stage: "epilogue",
            search: swiglu_search,
            apply: swiglu_apply,
        },
        Rule {
            name: "rope-bias-epilogue",
            stage: "epilogue",
            search: rope_bias_search,
            apply: rope_bias_apply,
        },
        Rule {
            name: "rmsnorm-rowscale",
            stage: "epilogue",
            search: rowscale_search,
            apply: rowscale_apply,
        },
        Rule {
            name: "residual-epilogue",
            stage: "epilogue",
            search: residual_epi_search,
            apply: residual_epi_apply,
        },
        Rule {
            name: "concat-linear-split",
            stage: "licm",
            search: concat_linear_search,
            apply: concat_linear_apply,
        },
        Rule {
            name: "transpose-fold",
            stage: "fold-weights",
            search: transpose_fold_search,
            apply: transpose_fold_apply,
        },
        Rule {
            name: "bias-epilogue",
            stage: "epilogue",
            search: bias_epi_search,
            apply: bias_epi_apply,
        },
        Rule {
            name: "glu-epilogue",
            stage: "epilogue",
            search: glu_epi_search,
            apply: glu_epi_apply,
        },
        Rule {
            name: "norm-epilogue",
            stage: "epilogue",
            search: norm_epi_search,
            apply: norm_epi_apply,
        },
    ]
}

const NONE: usize = u32::MAX as usize;

fn id(v: usize) -> Id {
    Id::from(v)
}

fn union_new(eg: &mut TGraph, class: Id, new: Id) -> bool {
    let ty_ok = eg[class].data.ty == eg[new].data.ty;
    // A rule must never equate values of different types; refuse rather than corrupt the graph.
    ty_ok && eg.union(class, new)
}

/// `rmsnorm(x + a, g)` = `proj 1 (rmsnorm_res x a g)`, and `x + a` = `proj 0` of the same
/// node: one kernel reads `x` and `a` once and writes both the sum and the normalized value.
/// Covers Huginn's post-norm `norm(x + attn)`, Ouro's `x + norm(branch)` feeding the next
/// pre-norm, and any pre-norm block whose input is a residual sum.
fn rmsnorm_residual_search(eg: &TGraph, c: Id) -> Vec<Match> {
    let mut out = vec![];
    for n in nodes_where(eg, c, |o| matches!(o, TOp::RmsNorm { .. })) {
        let TOp::RmsNorm { eps } = n.op else { continue };
        let s = n.children[0];
        let g = n.children.get(1).map_or(NONE, |g| usize::from(*g));
        let Some(w) = act_width(eg, s) else { continue };
        for a in nodes_where(eg, s, |o| *o == TOp::Binary(ADD)) {
            let (x, y) = (a.children[0], a.children[1]);
            if act_width(eg, x) == Some(w) && act_width(eg, y) == Some(w) {
                out.push(vec![
                    usize::from(s),
                    usize::from(x),
                    usize::from(y),
                    g,
                    eps as usize,
                ]);
            }
        }
    }
    out
}

fn rmsnorm_residual_apply(eg: &mut TGraph, c: Id, m: &Match) -> bool {
    let [s, x, y, g, eps] = m[..] else {
        return false;
    };
    let mut kids = vec![id(x), id(y)];
    if g != NONE {
        kids.push(id(g));
    }
    let t = eg.add(TNode::new(TOp::RmsNormRes { eps: eps as u32 }, kids));
    let p0 = eg.add(TNode::new(TOp::Proj(0), vec![t]));
    let p1 = eg.add(TNode::new(TOp::Proj(1), vec![t]));
    let a = union_new(eg, c, p1);
    let b = union_new(eg, id(s), p0);
    a || b
}

/// `embed(t, T) · c` = `embed(t, T·c)`: the scale moves into a derived table computed at load.
fn embed_scale_search(eg: &TGraph, c: Id) -> Vec<Match> {
    let mut out = vec![];
    for n in nodes_where(eg, c, |o| matches!(o, TOp::Scale(_))) {
        let TOp::Scale(k) = n.op else { continue };
        // By 1 is `scale-identity`'s; by 0 would store a table of zeros to save one pass.
        if f32::from_bits(k) == 1.0 || f32::from_bits(k) == 0.0 {
            continue;
        }
        for e in nodes_where(eg, n.children[0], |o| *o == TOp::Embed) {
            // A table that is also read elsewhere (a tied head) would be stored twice: the copy
            // costs vocab × dim floats of memory to save one pass over S × dim activations.
            if eg[e.children[1]].parents().len() > 1 {
                continue;
            }
            out.push(vec![
                usize::from(e.children[0]),
                usize::from(e.children[1]),
                k as usize,
            ]);
        }
    }
    out
}

fn embed_scale_apply(eg: &mut TGraph, c: Id, m: &Match) -> bool {
    let [tok, table, k] = m[..] else { return false };
    let t = eg.add(TNode::new(TOp::WScale(k as u32), vec![id(table)]));
    let e = eg.add(TNode::new(TOp::Embed, vec![id(tok), t]));
    union_new(eg, c, e)
}

/// `attention(rope(x·Wᵀ [+ b]), k, v, scale=s)` = `attention(rope(x·(sW)ᵀ [+ s·b]), k, v, 1)`:
/// RoPE and the bias add are linear, so the softmax scale folds into the Q weight (and bias).
fn q_scale_search(eg: &TGraph, c: Id) -> Vec<Match> {
    let mut out = vec![];
    for n in nodes_where(eg, c, |o| matches!(o, TOp::Attention { .. })) {
        let TOp::Attention {
            heads,
            kv_heads,
            scale,
            site,
        } = n.op
        else {
            continue;
        };
        if f32::from_bits(scale) == 1.0 {
            continue;
        }
        let (q, k, v) = (n.children[0], n.children[1], n.children[2]);
        for r in
            nodes_where(eg, q, |o| matches!(o, TOp::Rope { .. })).filter(|r| r.children.len() == 1)
        {
            let TOp::Rope {
                heads: rh,
                interleaved,
                base,
            } = r.op
            else {
                continue;
            };
            let q1 = r.children[0];
            let pack = |lin: &TNode, bias: Option<Id>| -> Option<Match> {
                weight_shape(eg, lin.children[1])?;
                Some(vec![
                    usize::from(k),
                    usize::from(v),
                    usize::from(lin.children[0]),
                    usize::from(lin.children[1]),
                    bias.map_or(NONE, usize::from),
                    heads,
                    kv_heads,
                    scale as usize,
                    site as usize,
                    rh,
                    interleaved as usize,
                    (base >> 32) as usize,
                    (base & 0xffff_ffff) as usize,
                ])
            };
            for l in nodes_where(eg, q1, |o| *o == TOp::Linear) {
                out.extend(pack(l, None));
            }
            for a in nodes_where(eg, q1, |o| *o == TOp::Binary(ADD)) {
                let (l, b) = (a.children[0], a.children[1]);
                if weight_shape(eg, b).is_none() {
                    continue;
                }
                for ln in nodes_where(eg, l, |o| *o == TOp::Linear) {
                    out.extend(pack(ln, Some(b)));
                }
            }
        }
    }
    out
}

fn q_scale_apply(eg: &mut TGraph, c: Id, m: &Match) -> bool {
    let [k, v, x, w, bias, heads, kv_heads, scale, site, rh, interleaved, base_hi, base_lo] = m[..]
    else {
        return false;
    };
    let base = ((base_hi as u64) << 32) | base_lo as u64;
    let ws = eg.add(TNode::new(TOp::WScale(scale as u32), vec![id(w)]));
    let mut q = eg.add(TNode::new(TOp::Linear, vec![id(x), ws]));
    if bias != NONE {
        let bs = eg.add(TNode::new(TOp::WScale(scale as u32), vec![id(bias)]));
        q = eg.add(TNode::new(TOp::Binary(ADD), vec![q, bs]));
    }
    let q = eg.add(TNode::new(
        TOp::Rope {
            heads: rh,
            interleaved: interleaved != 0,
            base,
        },
        vec![q],
    ));
    let att = TOp::Attention {
        heads,
        kv_heads,
        scale: 1.0f32.to_bits(),
        site: site as u32,
    };
    let a = eg.add(TNode::new(att, vec![q, id(k), id(v)]));
    union_new(eg, c, a)
}

/// `linear(concat(s, e), W)` = `linear(s, W[:, :|s|]) + linear(e, W[:, |s|:])`. Column windows
/// are derived weights. Searched only in a recur body where some part is loop-invariant: that
/// part is then computed once before the loop (Huginn's adapter over `[state, embedded]`).
fn concat_linear_search(eg: &TGraph, c: Id) -> Vec<Match> {
    if !eg.analysis.in_loop {
        return vec![];
    }
    let mut out = vec![];
    for n in nodes_where(eg, c, |o| *o == TOp::Linear) {
        let (cat, w) = (n.children[0], n.children[1]);
        let Some(ws) = weight_shape(eg, w) else {
            continue;
        };
        for cn in nodes_where(eg, cat, |o| *o == TOp::Concat) {
            let parts = &cn.children;
            let inv = parts.iter().filter(|p| eg[**p].data.invariant).count();
            if parts.len() < 2 || parts.len() + 1 >= MAX_VALS || inv == 0 || inv == parts.len() {
                continue;
            }
            let widths: Option<usize> = parts.iter().map(|p| act_width(eg, *p)).sum();
            if ws.len() != 2 || widths != Some(ws[1]) {
                continue;
            }
            let mut m = vec![usize::from(w)];
            m.extend(parts.iter().map(|p| usize::from(*p)));
            out.push(m);
        }
    }
    out
}

fn concat_linear_apply(eg: &mut TGraph, c: Id, m: &Match) -> bool {
    let Some((&w, parts)) = m.split_first() else {
        return false;
    };
    let mut start = 0;
    let mut acc: Option<Id> = None;
    for &p in parts {
        let Some(len) = act_width(eg, id(p)) else {
            return false;
        };
        let wp = eg.add(TNode::new(TOp::WSliceCols { start, len }, vec![id(w)]));
        let l = eg.add(TNode::new(TOp::Linear, vec![id(p), wp]));
        acc = Some(match acc {
            None => l,
            Some(a) => eg.add(TNode::new(TOp::Binary(ADD), vec![a, l])),
        });
        start += len;
    }
    match acc {
        Some(a) => union_new(eg, c, a),
        None => false,
    }
}

/// `linear(rmsnorm(x, g), W)` = `linear(rmsnorm(x), W·diag(g))` when every user of the norm is
/// a matmul (then the norm runs without its gain; otherwise both norms would be needed). Also
/// for the normalized result of a fused residual norm, whose sum stays available.
fn gain_fold_search(eg: &TGraph, c: Id) -> Vec<Match> {
    let mut out = vec![];
    for l in nodes_where(eg, c, |o| *o == TOp::Linear) {
        let (n, w) = (eg.find(l.children[0]), l.children[1]);
        if weight_shape(eg, w).is_none_or(|s| s.len() != 2) || !only_matmul_users(eg, n) {
            continue;
        }
        for nn in eg[n].nodes.iter().filter(|x| super::lang::arity_ok(x)) {
            match nn.op {
                TOp::RmsNorm { eps } if nn.children.len() == 2 => {
                    out.push(vec![
                        usize::from(w),
                        0,
                        usize::from(nn.children[0]),
                        NONE,
                        usize::from(nn.children[1]),
                        eps as usize,
                        NONE,
                    ]);
                }
                TOp::Proj(1) => {
                    let t = nn.children[0];
                    for tn in nodes_where(eg, t, |o| matches!(o, TOp::RmsNormRes { .. })) {
                        let TOp::RmsNormRes { eps } = tn.op else {
                            continue;
                        };
                        if tn.children.len() == 3 {
                            let k = &tn.children;
                            out.push(vec![
                                usize::from(w),
                                1,
                                usize::from(k[0]),
                                usize::from(k[1]),
                                usize::from(k[2]),
                                eps as usize,
                                usize::from(t),
                            ]);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    out
}

fn only_matmul_users(eg: &TGraph, n: Id) -> bool {
    let n = eg.find(n);
    !eg.analysis.roots.iter().any(|r| eg.find(*r) == n)
        && eg[n].parents().all(|p| {
            let node = eg.id_to_node(p);
            node.op == TOp::Linear
                && node.children.len() == 2
                && eg.find(node.children[0]) == n
                && eg.find(node.children[1]) != n
        })
}

fn gain_fold_apply(eg: &mut TGraph, c: Id, m: &Match) -> bool {
    let [w, residual, x, a, g, eps, t] = m[..] else {
        return false;
    };
    let wg = eg.add(TNode::new(TOp::WMulCols, vec![id(w), id(g)]));
    let normed = if residual == 0 {
        eg.add(TNode::new(TOp::RmsNorm { eps: eps as u32 }, vec![id(x)]))
    } else {
        let t2 = eg.add(TNode::new(
            TOp::RmsNormRes { eps: eps as u32 },
            vec![id(x), id(a)],
        ));
        // Both forms compute the same sum.
        let (s_old, s_new) = (
            eg.add(TNode::new(TOp::Proj(0), vec![id(t)])),
            eg.add(TNode::new(TOp::Proj(0), vec![t2])),
        );
        union_new(eg, s_old, s_new);
        eg.add(TNode::new(TOp::Proj(1), vec![t2]))
    };
    let l = eg.add(TNode::new(TOp::Linear, vec![normed, wg]));
    union_new(eg, c, l)
}

/// `act(x·Waᵀ) · (x·Wbᵀ)` = `glu_act(x·[Wa; Wb]ᵀ)`: gate and up as one matmul over the stacked
/// weight, then one kernel reading both halves. The stacked weight is the checkpoint's own
/// fused tensor when the two are adjacent windows of it (Huginn's `fc`), else derived.
fn swiglu_search(eg: &TGraph, c: Id) -> Vec<Match> {
    let mut out = vec![];
    for m in nodes_where(eg, c, |o| *o == TOp::Binary(MUL)) {
        let (p, q) = (m.children[0], m.children[1]);
        for a in nodes_where(eg, p, |o| matches!(o, TOp::Unary(_))) {
            let TOp::Unary(act) = a.op else { continue };
            for lg in nodes_where(eg, a.children[0], |o| *o == TOp::Linear) {
                for lu in nodes_where(eg, q, |o| *o == TOp::Linear) {
                    let (x, wa, wb) = (lg.children[0], lg.children[1], lu.children[1]);
                    if eg.find(x) != eg.find(lu.children[0]) {
                        continue;
                    }
                    let (Some(sa), Some(sb)) = (weight_shape(eg, wa), weight_shape(eg, wb)) else {
                        continue;
                    };
                    if sa.len() == 2 && sa == sb {
                        out.push(vec![
                            usize::from(x),
                            usize::from(wa),
                            usize::from(wb),
                            act as usize,
                        ]);
                    }
                }
            }
        }
    }
    out
}

fn swiglu_apply(eg: &mut TGraph, c: Id, m: &Match) -> bool {
    let [x, wa, wb, act] = m[..] else {
        return false;
    };
    let Some(w) = stack_rows(eg, id(wa), id(wb)) else {
        return false;
    };
    let l = eg.add(TNode::new(TOp::Linear, vec![id(x), w]));
    let g = eg.add(TNode::new(TOp::Glu(act as u8), vec![l]));
    union_new(eg, c, g)
}

/// A weight holding the rows of `a` then those of `b`, preferring no copy: one view when they
/// are adjacent windows of a tensor, the gain factored out when both carry the same folded
/// gain, else a derived concatenation.
fn stack_rows(eg: &mut TGraph, a: Id, b: Id) -> Option<Id> {
    let view = |eg: &TGraph, c: Id| {
        eg[c].nodes.iter().find_map(|n| match &n.op {
            TOp::Weight {
                weight,
                offset,
                shape,
            } if shape.len() == 2 => Some((*weight, *offset, shape.clone())),
            _ => None,
        })
    };
    if let (Some((wa, oa, sa)), Some((wb, ob, sb))) = (view(eg, a), view(eg, b)) {
        if wa == wb && sa[1] == sb[1] && ob == oa + sa[0] * sa[1] {
            return Some(eg.add(TNode::new(
                TOp::Weight {
                    weight: wa,
                    offset: oa,
                    shape: vec![sa[0] + sb[0], sa[1]],
                },
                vec![],
            )));
        }
    }
    let gained = |eg: &TGraph, c: Id| -> Vec<(Id, Id)> {
        nodes_where(eg, c, |o| *o == TOp::WMulCols)
            .map(|n| (n.children[0], eg.find(n.children[1])))
            .collect()
    };
    let (ga, gb) = (gained(eg, a), gained(eg, b));
    for (ia, g) in &ga {
        if let Some((ib, _)) = gb.iter().find(|(_, g2)| g2 == g) {
            let inner = stack_rows(eg, *ia, *ib)?;
            return Some(eg.add(TNode::new(TOp::WMulCols, vec![inner, *g])));
        }
    }
    Some(eg.add(TNode::new(TOp::WConcatRows, vec![a, b])))
}

/// `rope(y + b)` = `rope(y, b)`: the q/k bias is added by the rotary kernel as it loads the
/// projection, so the QKV matmul output is read and written once more instead of twice.
fn rope_bias_search(eg: &TGraph, c: Id) -> Vec<Match> {
    let mut out = vec![];
    for r in nodes_where(eg, c, |o| matches!(o, TOp::Rope { .. })).filter(|r| r.children.len() == 1)
    {
        let TOp::Rope {
            heads,
            interleaved,
            base,
        } = r.op
        else {
            continue;
        };
        let Some(w) = act_width(eg, r.children[0]) else {
            continue;
        };
        for (y, b) in add_operand_orders(eg, r.children[0]) {
            let numel = weight_shape(eg, b).map(|s| s.iter().product::<usize>());
            if act_width(eg, y) == Some(w) && numel == Some(w) {
                out.push(vec![
                    usize::from(y),
                    usize::from(b),
                    heads,
                    interleaved as usize,
                    (base >> 32) as usize,
                    (base & 0xffff_ffff) as usize,
                ]);
            }
        }
    }
    out
}

fn rope_bias_apply(eg: &mut TGraph, c: Id, m: &Match) -> bool {
    let [y, b, heads, interleaved, base_hi, base_lo] = m[..] else {
        return false;
    };
    let base = ((base_hi as u64) << 32) | base_lo as u64;
    let r = eg.add(TNode::new(
        TOp::Rope {
            heads,
            interleaved: interleaved != 0,
            base,
        },
        vec![id(y), id(b)],
    ));
    union_new(eg, c, r)
}

/// `x · 1` = `x` (LTG's `e · (1 − inject)` with `inject = 0`).
fn scale_identity_search(eg: &TGraph, c: Id) -> Vec<Match> {
    nodes_where(eg, c, |o| *o == TOp::Scale(1.0f32.to_bits()))
        .map(|n| vec![usize::from(n.children[0])])
        .collect()
}

fn scale_identity_apply(eg: &mut TGraph, c: Id, m: &Match) -> bool {
    let [x] = m[..] else { return false };
    union_new(eg, c, id(x))
}

/// `linear(rmsnorm(x), W)` = `linear_ep(x, W, row_scale = inv_rms(x))`: a gainless norm (its
/// gain already folded into `W`) is a per-row factor, which the matmul applies to its product
/// rows; `x` is read directly and the normalized copy is never written. Only when every user
/// of the norm is a matmul (else the copy is needed anyway). Also for the normalized half of a
/// gainless `rmsnorm_res`, whose sum is then the matmul input.
fn rowscale_search(eg: &TGraph, c: Id) -> Vec<Match> {
    let mut out = vec![];
    for l in nodes_where(eg, c, |o| *o == TOp::Linear) {
        let (n, w) = (eg.find(l.children[0]), l.children[1]);
        if weight_shape(eg, w).is_none_or(|s| s.len() != 2) || !only_matmul_users(eg, n) {
            continue;
        }
        for nn in eg[n].nodes.iter().filter(|x| super::lang::arity_ok(x)) {
            match nn.op {
                TOp::RmsNorm { eps } if nn.children.len() == 1 => {
                    out.push(vec![
                        usize::from(w),
                        usize::from(nn.children[0]),
                        eps as usize,
                        0,
                    ]);
                }
                TOp::Proj(1) => {
                    let t = nn.children[0];
                    for tn in nodes_where(eg, t, |o| matches!(o, TOp::RmsNormRes { .. })) {
                        let TOp::RmsNormRes { eps } = tn.op else {
                            continue;
                        };
                        if tn.children.len() == 2 {
                            out.push(vec![usize::from(w), usize::from(t), eps as usize, 1]);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    out
}

fn rowscale_apply(eg: &mut TGraph, c: Id, m: &Match) -> bool {
    let [w, src, eps, from_tuple] = m[..] else {
        return false;
    };
    // The matmul reads the residual sum itself (`proj 0` is the class of `a + b`).
    let x = if from_tuple == 1 {
        eg.add(TNode::new(TOp::Proj(0), vec![id(src)]))
    } else {
        id(src)
    };
    let s = eg.add(TNode::new(TOp::InvRms { eps: eps as u32 }, vec![x]));
    let l = eg.add(TNode::new(
        TOp::LinearEp {
            row_scale: true,
            residual: false,
            bias: false,
        },
        vec![x, id(w), s],
    ));
    union_new(eg, c, l)
}

/// `r + linear(a, W)` = `linear_ep(a, W, residual = r)`: the residual add happens as the matmul
/// stores its product (output projection, MLP down projection, the adapter's state half plus
/// its hoisted input half), so the product is never written and read back. Only when every
/// consumer of the product is an add of the same `r` (or the fused norm built from that add):
/// otherwise the plain product is needed too and the matmul would run twice.
fn residual_epi_search(eg: &TGraph, c: Id) -> Vec<Match> {
    let mut out = vec![];
    let Some(width) = act_width(eg, c) else {
        return out;
    };
    for (y, r) in add_operand_orders(eg, c) {
        let (y, r) = (eg.find(y), eg.find(r));
        if y == r || act_width(eg, r) != Some(width) || !only_added_to(eg, y, r) {
            continue;
        }
        for l in eg[y].nodes.iter().filter(|x| super::lang::arity_ok(x)) {
            let (scale, bias) = match l.op {
                TOp::Linear => (None, None),
                TOp::LinearEp {
                    row_scale,
                    residual: false,
                    bias,
                } => (
                    row_scale.then(|| l.children[2]),
                    bias.then(|| l.children[l.children.len() - 1]),
                ),
                _ => continue,
            };
            let (x, w) = (l.children[0], l.children[1]);
            out.push(vec![
                usize::from(x),
                usize::from(w),
                scale.map_or(NONE, usize::from),
                usize::from(r),
                bias.map_or(NONE, usize::from),
            ]);
        }
    }
    out
}

/// Every user of `y` adds it to `r` (directly, or in a fused residual norm), and `y` is not a
/// region result.
fn only_added_to(eg: &TGraph, y: Id, r: Id) -> bool {
    !eg.analysis.roots.iter().any(|x| eg.find(*x) == y)
        && eg[y].parents().all(|p| {
            let node = eg.id_to_node(p);
            let kids: Vec<Id> = node.children.iter().map(|k| eg.find(*k)).collect();
            matches!(node.op, TOp::Binary(ADD) | TOp::RmsNormRes { .. })
                && kids.len() >= 2
                && ((kids[0] == y && kids[1] == r) || (kids[0] == r && kids[1] == y))
        })
}

fn residual_epi_apply(eg: &mut TGraph, c: Id, m: &Match) -> bool {
    let [x, w, s, r, b] = m[..] else {
        return false;
    };
    let mut kids = vec![id(x), id(w)];
    if s != NONE {
        kids.push(id(s));
    }
    kids.push(id(r));
    if b != NONE {
        kids.push(id(b));
    }
    let l = eg.add(TNode::new(
        TOp::LinearEp {
            row_scale: s != NONE,
            residual: true,
            bias: b != NONE,
        },
        kids,
    ));
    union_new(eg, c, l)
}

/// `matmul(x, W)` = `linear(x, Wᵀ)` with `Wᵀ` derived once at load: GPT-2's `Conv1D` weights
/// (`[k, n]`) in the layout the GEMV streams row by row and whose product takes an epilogue
/// (bias, residual). When every read of `W` is folded the original is read only at load, so
/// the copy costs no memory (`cost::dup_bytes`); otherwise the memory term prices it.
fn transpose_fold_search(eg: &TGraph, c: Id) -> Vec<Match> {
    nodes_where(eg, c, |o| *o == TOp::MatMul)
        .filter(|n| weight_shape(eg, n.children[1]).is_some_and(|s| s.len() == 2))
        .map(|n| vec![usize::from(n.children[0]), usize::from(n.children[1])])
        .collect()
}

fn transpose_fold_apply(eg: &mut TGraph, c: Id, m: &Match) -> bool {
    let [x, w] = m[..] else { return false };
    let wt = eg.add(TNode::new(TOp::WTranspose, vec![id(w)]));
    let l = eg.add(TNode::new(TOp::Linear, vec![id(x), wt]));
    union_new(eg, c, l)
}

/// `linear(x, W) + b` = `linear_ep(x, W, bias = b)` (also over a row-scaled product): the bias
/// is added as the product block is stored instead of in a pass of its own. Only when every
/// user of the product adds that same `b` (else the plain product is needed as well).
fn bias_epi_search(eg: &TGraph, c: Id) -> Vec<Match> {
    let mut out = vec![];
    let Some(width) = act_width(eg, c) else {
        return out;
    };
    for (y, b) in add_operand_orders(eg, c) {
        let (y, b) = (eg.find(y), eg.find(b));
        let numel = weight_shape(eg, b).map(|s| s.iter().product::<usize>());
        if act_width(eg, y) != Some(width) || numel != Some(width) || !only_added_to(eg, y, b) {
            continue;
        }
        for l in eg[y].nodes.iter().filter(|x| super::lang::arity_ok(x)) {
            let Some(scale) = scaled_product(l) else {
                continue;
            };
            out.push(vec![
                usize::from(l.children[0]),
                usize::from(l.children[1]),
                scale.map_or(NONE, usize::from),
                usize::from(b),
            ]);
        }
    }
    out
}

fn bias_epi_apply(eg: &mut TGraph, c: Id, m: &Match) -> bool {
    let [x, w, s, b] = m[..] else {
        return false;
    };
    let mut kids = vec![id(x), id(w)];
    if s != NONE {
        kids.push(id(s));
    }
    kids.push(id(b));
    let l = eg.add(TNode::new(
        TOp::LinearEp {
            row_scale: s != NONE,
            residual: false,
            bias: true,
        },
        kids,
    ));
    union_new(eg, c, l)
}

/// Rows per gate/up block of the interleaved weight read by `linear_glu`: 2·16 product
/// columns are one block, a multiple of the GEMV's 4-row and the column split's 16-column
/// granularity, and 16 floats fill an AVX-512 register in the activation loop.
pub const GLU_BLOCK: usize = 16;

/// `glu_act(linear(x, [Wg; Wu]))` = `linear_glu(x, interleave([Wg; Wu]))` (also over a
/// row-scaled product): the activation and the product run in the matmul's epilogue on each
/// block of gate/up columns while it is in cache, so the `[S, 2n]` product is never read back.
/// The rows of the stacked weight are interleaved at load in blocks of [`GLU_BLOCK`] so every
/// block of product columns holds matching gate and up halves. Only when every user of the
/// product is a gated unit.
fn glu_epi_search(eg: &TGraph, c: Id) -> Vec<Match> {
    let mut out = vec![];
    for g in nodes_where(eg, c, |o| matches!(o, TOp::Glu(_))) {
        let TOp::Glu(act) = g.op else { continue };
        let p = eg.find(g.children[0]);
        let only_glu = !eg.analysis.roots.iter().any(|r| eg.find(*r) == p)
            && eg[p]
                .parents()
                .all(|u| matches!(eg.id_to_node(u).op, TOp::Glu(_)));
        if !only_glu {
            continue;
        }
        for l in eg[p].nodes.iter().filter(|x| super::lang::arity_ok(x)) {
            let Some(scale) = scaled_product(l) else {
                continue;
            };
            if weight_shape(eg, l.children[1]).is_none_or(|s| s.len() != 2 || s[0] % 2 != 0) {
                continue;
            }
            out.push(vec![
                usize::from(l.children[0]),
                usize::from(l.children[1]),
                scale.map_or(NONE, usize::from),
                act as usize,
            ]);
        }
    }
    out
}

fn glu_epi_apply(eg: &mut TGraph, c: Id, m: &Match) -> bool {
    let [x, w, s, act] = m[..] else {
        return false;
    };
    let wi = eg.add(TNode::new(TOp::WInterleaveRows(GLU_BLOCK), vec![id(w)]));
    let mut kids = vec![id(x), wi];
    if s != NONE {
        kids.push(id(s));
    }
    let l = eg.add(TNode::new(
        TOp::LinearGlu {
            act: act as u8,
            block: GLU_BLOCK,
            row_scale: s != NONE,
        },
        kids,
    ));
    union_new(eg, c, l)
}

/// A matmul without a bias as `(x, w, row scale, residual)`, the operands an epilogue that
/// adds a row reduction keeps.
fn product_parts(l: &TNode) -> Option<(Id, Id, Option<Id>, Option<Id>)> {
    match l.op {
        TOp::Linear => Some((l.children[0], l.children[1], None, None)),
        TOp::LinearEp {
            row_scale,
            residual,
            bias: false,
        } => Some((
            l.children[0],
            l.children[1],
            row_scale.then(|| l.children[2]),
            residual.then(|| l.children[2 + usize::from(row_scale)]),
        )),
        _ => None,
    }
}

/// `inv_rms(p)` and `inv_rms(rmsnorm(p[, g]))` of a matmul's result `p` as results of that
/// matmul (`linear_norm`): the row's sum of squares is taken once all its column blocks are
/// stored, while the row is in cache, so neither the norm nor the `inv_rms` pass reads `p`
/// from memory again. Huginn's sandwich blocks (`rmsnorm(r + o_proj(a), g)` whose result the
/// next matmuls read with a row scale) and the adapter (`inv_rms` of its product). The norm
/// form only when every user of `p` is a norm (else `p` would be needed as well).
fn norm_epi_search(eg: &TGraph, c: Id) -> Vec<Match> {
    let mut out = vec![];
    let mut push = |kind: usize, y: Id, l: &TNode, g: Option<Id>, eps: u32| {
        if let Some((x, w, s, r)) = product_parts(l) {
            if weight_shape(eg, w).is_some_and(|s| s.len() == 2) {
                out.push(vec![
                    kind,
                    usize::from(y),
                    usize::from(x),
                    usize::from(w),
                    s.map_or(NONE, usize::from),
                    r.map_or(NONE, usize::from),
                    g.map_or(NONE, usize::from),
                    eps as usize,
                ]);
            }
        }
    };
    for q in nodes_where(eg, c, |o| matches!(o, TOp::InvRms { .. })) {
        let TOp::InvRms { eps } = q.op else { continue };
        let y = eg.find(q.children[0]);
        for l in eg[y].nodes.iter().filter(|x| super::lang::arity_ok(x)) {
            push(0, y, l, None, eps);
        }
        for nn in nodes_where(eg, y, move |o| *o == TOp::RmsNorm { eps }) {
            let p = eg.find(nn.children[0]);
            // Every user is this norm (or an equal one): a second, different norm of `p`
            // would need `p` itself, which the fused form never stores.
            let only_normed = !eg.analysis.roots.iter().any(|r| eg.find(*r) == p)
                && eg[p]
                    .parents()
                    .all(|u| matches!(eg.id_to_node(u).op, TOp::RmsNorm { .. }) && eg.find(u) == y);
            if !only_normed {
                continue;
            }
            for l in eg[p].nodes.iter().filter(|x| super::lang::arity_ok(x)) {
                push(1, y, l, nn.children.get(1).copied(), eps);
            }
        }
    }
    out
}

fn norm_epi_apply(eg: &mut TGraph, c: Id, m: &Match) -> bool {
    let [kind, y, x, w, s, r, g, eps] = m[..] else {
        return false;
    };
    let mut kids = vec![id(x), id(w)];
    for k in [s, r, g] {
        if k != NONE {
            kids.push(id(k));
        }
    }
    let t = eg.add(TNode::new(
        TOp::LinearNorm {
            row_scale: s != NONE,
            residual: r != NONE,
            normalize: kind == 1,
            gain: g != NONE,
            eps: eps as u32,
        },
        kids,
    ));
    let p0 = eg.add(TNode::new(TOp::Proj(0), vec![t]));
    let p1 = eg.add(TNode::new(TOp::Proj(1), vec![t]));
    let a = union_new(eg, c, p1);
    let b = union_new(eg, id(y), p0);
    a || b
}

/// Both operand orders `(y, other)` of every `add` node in class `c`: the rules that look for
/// `y + other` try each side as `y`.
fn add_operand_orders(eg: &TGraph, c: Id) -> impl Iterator<Item = (Id, Id)> + '_ {
    nodes_where(eg, c, |o| *o == TOp::Binary(ADD)).flat_map(|a| {
        [
            (a.children[0], a.children[1]),
            (a.children[1], a.children[0]),
        ]
    })
}

/// For a plain product (`linear`, or `linear_ep` with only a row scale), `Some(row scale)`;
/// `None` for any other node. The epilogue rules that add one more term start from these.
fn scaled_product(l: &TNode) -> Option<Option<Id>> {
    match l.op {
        TOp::Linear => Some(None),
        TOp::LinearEp {
            row_scale: true,
            residual: false,
            bias: false,
        } => Some(Some(l.children[2])),
        _ => None,
    }
}
