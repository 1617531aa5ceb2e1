//! `sibling-matmul-merge`: matmuls that read the same `x` with the same row scale (and no
//! residual) become one `linear_parts` product over their stacked weights, each old value a
//! `proj i` of it. This is the single QKV product: `x` is read once, one dispatch instead of
//! three, and the decode GEMV is one parallel split over all rows of Wqkv, while Q, K and V
//! still land in their own contiguous buffers (RoPE, attention and the KV write unchanged).
//!
//! It runs on the extracted graph IR of each region, right after the e-graph. Within the e-graph
//! it would be a multi-pattern over the class of `x` whose extracted form the tree cost model
//! cannot price (each `proj` would carry the whole product); after extraction the decision is
//! simple, since merging never adds work: the product is the same, `x` and the weights are read
//! once instead of once per sibling.
//!
//! The stacked weight is one derived weight over the checkpoint's own tensor when the parts are
//! adjacent row windows of it folded with one gain (Huginn's `Wqkv`: `w.mul_cols(Wqkv, g)`, no
//! copy per window); `q-scale-fold` gave Q its own `w.scale`, so where the merge needs it the
//! softmax scale moves back into the attention (and out of the q bias), exactly the unfolded
//! form. Otherwise the parts' weights are stacked by `w.concat_rows` (Ouro's separate q/k/v
//! tensors), with a shared gain factored out.
use loopc_dialects::{NodeId, Op, Region, Ty, WeightView};
use std::collections::BTreeMap;

pub const RULE: &str = "sibling-matmul-merge";

/// Most parts of one product (the runtime's [`loopc_runtime::artifact::MAX_MATMUL_PARTS`]).
const MAX_PARTS: usize = loopc_runtime::artifact::MAX_MATMUL_PARTS;

/// A matmul that may join a merge: its weight node and the row scale operand.
struct Sibling {
    node: NodeId,
    w: NodeId,
    rows: usize,
}

/// Merges sibling matmuls in `r` (not in nested bodies); returns the number of products made.
pub fn merge_siblings(r: &mut Region) -> usize {
    let mut made = 0;
    for x in r.topo_order() {
        if !matches!(r.ty(x), Ty::Act(_)) {
            continue;
        }
        // Siblings keyed by their row scale (None: a plain `linear`).
        let mut groups: BTreeMap<Option<NodeId>, Vec<Sibling>> = BTreeMap::new();
        for u in r.users(x) {
            if let Some((s, sib)) = sibling(r, x, u) {
                groups.entry(s).or_default().push(sib);
            }
        }
        for (s, mut sibs) in groups {
            // Checkpoint order first, so adjacent windows stay adjacent in the stack.
            sibs.sort_by_key(|sb| (source_pos(r, sb.w), sb.node.index()));
            for chunk in sibs.chunks(MAX_PARTS) {
                if chunk.len() >= 2 && merge(r, x, s, chunk) {
                    made += 1;
                }
            }
        }
    }
    made
}

/// `u` as a mergeable matmul reading `x` as its input (not as its residual or row scale).
fn sibling(r: &Region, x: NodeId, u: NodeId) -> Option<(Option<NodeId>, Sibling)> {
    let ops = r.operands(u);
    let s = match r.node(u).op {
        Op::Linear => None,
        // A biased product stays alone (the parts' epilogues could carry it, but no family
        // has biased siblings).
        Op::LinearEp {
            row_scale: true,
            residual: false,
            bias: false,
        } => Some(ops[2]),
        _ => return None,
    };
    let Ty::Weight(shape) = r.ty(*ops.get(1)?) else {
        return None;
    };
    // A region result stays its own matmul: the LM head keeps the runtime's last-row-only
    // path, and a tied head would otherwise be stacked with a copy of the embedding table.
    let own = r.results.contains(&u);
    (ops[0] == x && s != Some(x) && shape.len() == 2 && !own).then(|| {
        (
            s,
            Sibling {
                node: u,
                w: ops[1],
                rows: shape[0],
            },
        )
    })
}

/// A weight peeled of its folds: `w.mul_cols(w.scale(base, c), g)` (either nesting).
struct Peeled {
    base: NodeId,
    scale: Option<(NodeId, f32)>,
    gain: Option<NodeId>,
}

fn peel(r: &Region, w: NodeId) -> Peeled {
    let mut p = Peeled {
        base: w,
        scale: None,
        gain: None,
    };
    loop {
        match r.node(p.base).op {
            Op::WMulCols if p.gain.is_none() => {
                let ops = r.operands(p.base);
                p.gain = Some(ops[1]);
                p.base = ops[0];
            }
            Op::WScale(c) if p.scale.is_none() => {
                p.scale = Some((p.base, c));
                p.base = r.operands(p.base)[0];
            }
            _ => return p,
        }
    }
}

fn view(r: &Region, n: NodeId) -> Option<&WeightView> {
    match &r.node(n).op {
        Op::Weight(v) => Some(v),
        _ => None,
    }
}

/// Where a weight's base sits in the checkpoint, for ordering siblings.
fn source_pos(r: &Region, w: NodeId) -> (u32, usize) {
    view(r, peel(r, w).base).map_or((u32::MAX, 0), |v| (v.weight, v.offset))
}

fn same_weight(r: &Region, a: NodeId, b: NodeId) -> bool {
    a == b || matches!((view(r, a), view(r, b)), (Some(x), Some(y)) if x == y)
}

/// One view over the whole run when the bases are consecutive row windows of one tensor.
fn adjacent(r: &Region, bases: &[NodeId]) -> Option<WeightView> {
    let vs: Vec<&WeightView> = bases.iter().map(|&b| view(r, b)).collect::<Option<_>>()?;
    let (first, k) = (vs[0], *vs[0].shape.get(1)?);
    let mut next = first.offset;
    for v in &vs {
        if v.weight != first.weight || v.shape.len() != 2 || v.shape[1] != k || v.offset != next {
            return None;
        }
        next += v.numel();
    }
    let rows = vs.iter().map(|v| v.shape[0]).sum();
    Some(WeightView {
        weight: first.weight,
        offset: first.offset,
        shape: vec![rows, k],
    })
}

/// The attention nodes that read `q` (directly or through RoPE) as their query and nothing
/// else, and the RoPE nodes on the way; `None` if `q` has any other use. These are the uses
/// for which a factor `c` on the Q weight equals the same factor on the attention scale.
fn query_uses(r: &Region, q: NodeId) -> Option<(Vec<NodeId>, Vec<NodeId>)> {
    let only_slot0 = |from: NodeId, to: NodeId| {
        r.operands(to)
            .iter()
            .enumerate()
            .all(|(i, &o)| (o == from) == (i == 0))
    };
    let (mut ropes, mut atts) = (vec![], vec![]);
    if r.results.contains(&q) {
        return None;
    }
    for u in r.users(q) {
        match r.node(u).op {
            Op::Attention { .. } if only_slot0(q, u) => atts.push(u),
            Op::Rope { .. } if only_slot0(q, u) && !r.results.contains(&u) => {
                for a in r.users(u) {
                    match r.node(a).op {
                        Op::Attention { .. } if only_slot0(u, a) => atts.push(a),
                        _ => return None,
                    }
                }
                ropes.push(u);
            }
            _ => return None,
        }
    }
    Some((ropes, atts))
}

/// Moves a folded softmax scale `c` of sibling `q`'s weight back into its attention: the RoPE
/// bias `w.scale(b, c)` becomes `b`, the attention scale `s` becomes `s·c`. Returns false (and
/// changes nothing) when some use of `q` is not of that form.
fn unfold_q_scale(r: &mut Region, q: NodeId, c: f32) -> bool {
    let Some((ropes, atts)) = query_uses(r, q) else {
        return false;
    };
    let mut rebias = vec![];
    for &rp in &ropes {
        if let Some(&b) = r.operands(rp).get(1) {
            match r.node(b).op {
                Op::WScale(cb) if cb.to_bits() == c.to_bits() => {
                    rebias.push((rp, b, r.operands(b)[0]))
                }
                _ => return false,
            }
        }
    }
    for (rp, scaled, b) in rebias {
        let e = r.graph.find_edge(scaled, rp).expect("rope reads its bias");
        r.graph.remove_edge(e);
        r.graph.add_edge(b, rp, 1);
    }
    for a in atts {
        if let Op::Attention { scale, .. } = &mut r.graph[a].op {
            *scale *= c;
        }
    }
    true
}

/// Replaces the siblings by `proj i (linear_parts x, W [, s])`.
fn merge(r: &mut Region, x: NodeId, s: Option<NodeId>, sibs: &[Sibling]) -> bool {
    let k = match r.ty(sibs[0].w) {
        Ty::Weight(sh) => sh[1],
        _ => return false,
    };
    let peeled: Vec<Peeled> = sibs.iter().map(|sb| peel(r, sb.w)).collect();
    let gain = peeled[0].gain;
    let same_gain = peeled.iter().all(|p| match (p.gain, gain) {
        (Some(a), Some(b)) => same_weight(r, a, b),
        (None, None) => true,
        _ => false,
    });
    let bases: Vec<NodeId> = peeled.iter().map(|p| p.base).collect();
    let whole = if same_gain { adjacent(r, &bases) } else { None };
    // A stack over the checkpoint's own tensor needs every part unscaled: only Q carries a
    // scale, which moves back into its attention when all its uses allow it.
    let whole = whole.filter(|_| {
        peeled.iter().zip(sibs).all(|(p, sb)| {
            p.scale
                .is_none_or(|(_, c)| query_uses(r, sb.node).is_some() && can_unbias(r, sb.node, c))
        })
    });
    let n: usize = sibs.iter().map(|sb| sb.rows).sum();
    let wty = Ty::Weight(vec![n, k]);
    let w = if let Some(v) = whole {
        for (p, sb) in peeled.iter().zip(sibs) {
            if let Some((_, c)) = p.scale {
                let done = unfold_q_scale(r, sb.node, c);
                debug_assert!(done, "checked by query_uses and can_unbias");
            }
        }
        let wv = r.add(Op::Weight(v.clone()), Ty::Weight(v.shape.clone()), &[]);
        match gain {
            Some(g) => r.add(Op::WMulCols, wty.clone(), &[wv, g]),
            None => wv,
        }
    } else if copies_a_tensor_still_read(r, sibs) {
        return false;
    } else if let Some((inner, g)) = shared_gain(r, sibs) {
        // The shared gain once over the stack of the gainless parts.
        let st = r.add(Op::WConcatRows, wty.clone(), &inner);
        r.add(Op::WMulCols, wty.clone(), &[st, g])
    } else {
        let ws: Vec<NodeId> = sibs.iter().map(|sb| sb.w).collect();
        r.add(Op::WConcatRows, wty.clone(), &ws)
    };
    let parts: Vec<usize> = sibs.iter().map(|sb| sb.rows).collect();
    let mut ops = vec![x, w];
    ops.extend(s);
    let lp = r.add(
        Op::LinearParts {
            parts: parts.clone(),
            row_scale: s.is_some(),
            ropes: vec![],
        },
        Ty::Tuple(parts.iter().map(|&p| Ty::Act(p)).collect()),
        &ops,
    );
    for (i, sb) in sibs.iter().enumerate() {
        let p = r.add(Op::Proj(i as u32), Ty::Act(parts[i]), &[lp]);
        r.replace_uses(sb.node, p);
    }
    true
}

/// Whether every RoPE between `q` and its attention has no bias or the bias `w.scale(b, c)`.
fn can_unbias(r: &Region, q: NodeId, c: f32) -> bool {
    query_uses(r, q).is_some_and(|(ropes, _)| {
        ropes.iter().all(|&rp| {
            r.operands(rp).get(1).is_none_or(
                |&b| matches!(r.node(b).op, Op::WScale(cb) if cb.to_bits() == c.to_bits()),
            )
        })
    })
}

/// `(Wᵢ, g)` when every sibling's weight is `w.mul_cols(Wᵢ, g)` with one gain `g`.
fn shared_gain(r: &Region, sibs: &[Sibling]) -> Option<(Vec<NodeId>, NodeId)> {
    let mut g0 = None;
    let mut inner = vec![];
    for sb in sibs {
        if r.node(sb.w).op != Op::WMulCols {
            return None;
        }
        let ops = r.operands(sb.w);
        if g0.is_some_and(|g| !same_weight(r, g, ops[1])) {
            return None;
        }
        g0.get_or_insert(ops[1]);
        inner.push(ops[0]);
    }
    Some((inner, g0?))
}

/// Whether a stacked copy would leave a checkpoint tensor of some part resident twice: the
/// tensor is also read at run time by a node outside the parts' weight expressions. A read
/// through another copying derived weight does not count (the original is read once, at
/// load, and freed), a `w.per_iter` passes its sources through, so its readers count.
fn copies_a_tensor_still_read(r: &Region, sibs: &[Sibling]) -> bool {
    let mut cone = std::collections::BTreeSet::new();
    let mut stack: Vec<NodeId> = sibs.iter().map(|sb| sb.w).collect();
    while let Some(n) = stack.pop() {
        if cone.insert(n) {
            let ops = r.operands(n);
            // A gain is a factor of the stack, not part of its rows.
            let rows = if r.node(n).op == Op::WMulCols {
                1
            } else {
                ops.len()
            };
            stack.extend(&ops[..rows.min(ops.len())]);
        }
    }
    let tensors: std::collections::BTreeSet<u32> = cone
        .iter()
        .filter_map(|&n| view(r, n).map(|v| v.weight))
        .collect();
    let inside = |u: &NodeId| cone.contains(u) || sibs.iter().any(|sb| sb.node == *u);
    fn read_at_run_time(r: &Region, n: NodeId, inside: &dyn Fn(&NodeId) -> bool) -> bool {
        r.users(n)
            .iter()
            .filter(|u| !inside(u))
            .any(|&u| match r.node(u).op {
                Op::WPerIter => read_at_run_time(r, u, inside),
                ref op => !op.is_derived_weight(),
            })
    }
    r.graph.node_indices().any(|n| {
        view(r, n).is_some_and(|v| tensors.contains(&v.weight)) && read_at_run_time(r, n, &inside)
    })
}
