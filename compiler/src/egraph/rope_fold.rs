//! `rope-epilogue`: a RoPE (with or without its q/k bias) whose input is a part of a
//! `linear_parts` product, or a plain / row-scaled `linear`, and nothing else's, becomes that
//! part's rotary epilogue: `rope(proj i (linear_parts x, W [, s]), [b])` →
//! `proj i (linear_parts x, W [, s], [b] rope=…)`, and `rope(linear[_ep](x, W [, s] [, b]))` →
//! `proj 0` of a one-part product. The matmul then adds the bias and rotates each head of q and
//! k while the block of output columns is in cache, so q and k are not read and written again
//! by a `RopeBias` pass.
//!
//! It runs after `sibling-matmul-merge`, on the extracted graph IR, for the same reason: the
//! parts exist only after the merge (the e-graph never sees a `linear_parts`), and the fold
//! never adds work (the same bias and rotation, one pass over q and k fewer).
use loopc_dialects::ops::PartRope;
use loopc_dialects::{NodeId, Op, Region, Ty};
use std::collections::BTreeMap;

pub const RULE: &str = "rope-epilogue";

/// A foldable RoPE: its node, its bias operand, and the rotation.
struct Fold {
    rope: NodeId,
    bias: Option<NodeId>,
    rot: PartRope,
}

/// Folds every foldable RoPE of `r` (not in nested bodies); returns how many were folded.
pub fn fold_ropes(r: &mut Region) -> usize {
    // Product node → part index → fold (a `BTreeMap` keeps the rewrite order deterministic).
    let mut parts: BTreeMap<NodeId, BTreeMap<usize, Fold>> = BTreeMap::new();
    let mut singles: Vec<(NodeId, Fold)> = vec![];
    for rp in r.topo_order() {
        let Op::Rope { heads, style, base } = r.node(rp).op else {
            continue;
        };
        let ops = r.operands(rp);
        let src = ops[0];
        // The rotation happens in place: the unrotated value must have no other reader.
        if r.users(src).len() != 1 || r.results.contains(&src) {
            continue;
        }
        let fold = |bias: Option<NodeId>| Fold {
            rope: rp,
            bias,
            rot: PartRope {
                heads,
                style,
                base,
                bias: bias.is_some(),
            },
        };
        match &r.node(src).op {
            Op::Proj(i) => {
                let lp = r.operands(src)[0];
                let rotated = match &r.node(lp).op {
                    Op::LinearParts { ropes, .. } => ropes.get(*i as usize).copied().flatten(),
                    _ => continue,
                };
                // One projection of the part, read by this RoPE only.
                let same_part = r
                    .users(lp)
                    .into_iter()
                    .filter(|&u| r.node(u).op == Op::Proj(*i))
                    .count();
                if rotated.is_none() && same_part == 1 {
                    parts
                        .entry(lp)
                        .or_default()
                        .insert(*i as usize, fold(ops.get(1).copied()));
                }
            }
            Op::Linear => singles.push((src, fold(ops.get(1).copied()))),
            Op::LinearEp {
                residual: false,
                bias,
                ..
            } => {
                // One bias: the product's own (a `bias-epilogue`) or the RoPE's.
                let b = match (bias, ops.get(1)) {
                    (true, Some(_)) => continue,
                    (true, None) => r.operands(src).last().copied(),
                    (false, b) => b.copied(),
                };
                singles.push((src, fold(b)));
            }
            _ => {}
        }
    }
    let mut made = 0;
    for (lp, folds) in parts {
        made += folds.len();
        refold_parts(r, lp, folds);
    }
    for (mm, f) in singles {
        made += 1;
        single_part(r, mm, f);
    }
    made
}

/// Rebuilds product `lp` with the new rotated parts (keeping those it has) and points every
/// reader of its results, and of the folded RoPEs, at the new node's projections.
fn refold_parts(r: &mut Region, lp: NodeId, mut folds: BTreeMap<usize, Fold>) {
    let Op::LinearParts {
        parts,
        row_scale,
        ropes,
    } = r.node(lp).op.clone()
    else {
        return;
    };
    let old_ops = r.operands(lp);
    let head = 2 + usize::from(row_scale);
    let mut ops = old_ops[..head].to_vec();
    let mut old_bias = old_ops[head..].iter();
    let mut new_ropes = vec![None; parts.len()];
    for (i, slot) in new_ropes.iter_mut().enumerate() {
        if let Some(rot) = ropes.get(i).copied().flatten() {
            *slot = Some(rot);
            if rot.bias {
                ops.extend(old_bias.next());
            }
        } else if let Some(f) = folds.get(&i) {
            *slot = Some(f.rot);
            ops.extend(f.bias);
        }
    }
    let ty = r.ty(lp).clone();
    let new = r.add(
        Op::LinearParts {
            parts: parts.clone(),
            row_scale,
            ropes: new_ropes,
        },
        ty,
        &ops,
    );
    for u in r.users(lp) {
        let Op::Proj(i) = r.node(u).op else { continue };
        let p = r.add(Op::Proj(i), r.ty(u).clone(), &[new]);
        match folds.remove(&(i as usize)) {
            Some(f) => r.replace_uses(f.rope, p),
            None => r.replace_uses(u, p),
        }
    }
}

/// `rope(linear[_ep](x, W [, s]))` → `proj 0 (linear_parts x, W [, s], [b] parts=n rope=…)`.
fn single_part(r: &mut Region, mm: NodeId, f: Fold) {
    let ops = r.operands(mm);
    let row_scale = matches!(
        r.node(mm).op,
        Op::LinearEp {
            row_scale: true,
            ..
        }
    );
    let Ty::Act(n) = *r.ty(mm) else { return };
    let mut new_ops = ops[..2 + usize::from(row_scale)].to_vec();
    new_ops.extend(f.bias);
    let lp = r.add(
        Op::LinearParts {
            parts: vec![n],
            row_scale,
            ropes: vec![Some(f.rot)],
        },
        Ty::Tuple(vec![Ty::Act(n)]),
        &new_ops,
    );
    let p = r.add(Op::Proj(0), Ty::Act(n), &[lp]);
    r.replace_uses(f.rope, p);
}
