//! The cost model and the DAG-aware extractor.
//!
//! **Cost of a program** = bytes moved + FLOPs / [`FLOPS_PER_BYTE`], for a nominal call of
//! [`S_NOMINAL`] rows, f32 everywhere:
//! - an op reads each activation operand (`S·width·4` bytes), writes its results, and reads the
//!   part of each weight operand it touches (a matmul the whole view, an embedding `S` rows, a
//!   broadcast operand its elements);
//! - FLOPs: `2·S·n·k` per matmul, `4·S·L·d` for attention over `L = S` keys (+ `S·L·heads` when
//!   it must scale the scores), a few per element for pointwise ops and norms;
//! - **DAG-aware**: a value used twice is computed once (the sum is over the selected classes,
//!   not over a tree), and each weight is charged once per region at the largest read of it,
//!   so weights shared by several ops (and K/V, which attention reads in place) count once;
//! - inside a recur body, a loop-invariant value costs `1/steps` of its price: it is hoisted
//!   and computed once for all iterations;
//! - derived weights cost nothing at run time (the runtime computes them once at load);
//! - projections of a multi-result node are free (they alias one of its output buffers);
//! - **resident memory**: a derived weight whose source checkpoint tensor the program still
//!   reads directly (a tied embedding table scaled for the input but not for the head; a Q
//!   window scaled while K/V read the original) keeps two copies resident. Those duplicated
//!   bytes cost [`RESIDENT_PER_BYTE`] each ([`dup_bytes`]). A fold that replaces every read of
//!   its source costs nothing here: the original is then read only once, at load.
//!
//! The extractor first picks, per class, the node with the least tree cost (a fixed point that
//! tolerates cycles), then improves the selection as a DAG: a class switches to a node whose
//! operands are all already computed by the selection when that node is cheaper on its own
//! than what the class costs now. This is what picks `proj 0 (rmsnorm_res ...)` for a residual
//! sum whose fused norm is selected anyway, instead of adding the sum a second time.
use super::lang::{TGraph, TNode, TOp};
use egg::Id;
use loopc_dialects::{Op, Ty};
use std::collections::{HashMap, HashSet};

pub const S_NOMINAL: f64 = 16.0;
/// A rough machine balance: FLOPs a core does in the time it moves one byte from memory.
pub const FLOPS_PER_BYTE: f64 = 8.0;
/// Price of one duplicated resident weight byte, in bytes moved per nominal call: a copy must
/// save at least 1/64 of its size in traffic per call to be worth keeping. Steers the tied
/// table of Huginn-3.5B (1.4 GB for a 0.7 MB per-call saving) away from `embed-scale-fold`,
/// while the Q-scale fold of a Q window (a few MB, whose scale pass it removes) stays.
pub const RESIDENT_PER_BYTE: f64 = 1.0 / 64.0;

fn width(t: &Option<Ty>) -> f64 {
    match t {
        Some(Ty::Act(c)) => *c as f64,
        Some(Ty::Tuple(ts)) => ts.iter().map(|t| width(&Some(t.clone()))).sum(),
        _ => 0.0,
    }
}

fn numel(t: &Option<Ty>) -> f64 {
    match t {
        Some(Ty::Weight(s)) => s.iter().product::<usize>() as f64,
        _ => 0.0,
    }
}

/// Cost of one node without its weights, and the bytes it reads of each weight operand.
pub fn node_cost(eg: &TGraph, n: &TNode) -> (f64, Vec<(Id, f64)>) {
    let (b, flops, wreads) = node_parts(eg, n);
    (b + flops / FLOPS_PER_BYTE, wreads)
}

/// Activation bytes, FLOPs and weight reads of one node (per iteration inside a body).
pub fn node_parts(eg: &TGraph, n: &TNode) -> (f64, f64, Vec<(Id, f64)>) {
    if !super::lang::arity_ok(n) {
        return (f64::INFINITY, 0.0, vec![]);
    }
    let s = S_NOMINAL;
    let ty = |i: usize| eg[n.children[i]].data.ty.clone();
    let is_w = |i: usize| matches!(eg[n.children[i]].data.ty, Some(Ty::Weight(_)));
    let acts_in: f64 = (0..n.children.len())
        .filter(|&i| !is_w(i))
        .map(|i| width(&ty(i)))
        .sum();
    let out_w = eg.analysis.node_ty(eg, n);
    let out = width(&out_w);
    let mut wreads = vec![];
    let bytes = |cols: f64| 4.0 * s * cols;
    let (mut b, mut flops) = (bytes(acts_in + out), 0.0);
    match &n.op {
        TOp::Opaque(i) if is_parts(eg, *i) => {
            // Made after extraction (`sibling-matmul-merge`): one product over the stacked
            // weight, `x` read once, each part written once. A rotated part (`rope-epilogue`)
            // adds its bias and rotates in the store: FLOPs, no pass over q or k.
            let w = numel(&ty(1));
            wreads.push((n.children[1], 4.0 * w));
            flops = 2.0 * s * w;
            if let Some(Op::LinearParts {
                parts,
                row_scale,
                ropes,
            }) = eg.analysis.opaque.get(*i as usize)
            {
                let mut bi = 2 + usize::from(*row_scale);
                for (p, r) in parts.iter().zip(ropes) {
                    let Some(r) = r else { continue };
                    flops += 3.0 * s * *p as f64;
                    if r.bias {
                        wreads.push((n.children[bi], 4.0 * numel(&ty(bi))));
                        flops += s * *p as f64;
                        bi += 1;
                    }
                }
            }
        }
        TOp::Tokens | TOp::Param(_) | TOp::Weight { .. } | TOp::Opaque(_) | TOp::Proj(_) => b = 0.0,
        TOp::WSliceCols { .. } | TOp::WScale(_) | TOp::WMulCols | TOp::WConcatRows => b = 0.0,
        TOp::WTranspose | TOp::WInterleaveRows(_) => b = 0.0,
        // The `Conv1D` layout costs what the `Linear` one does; only the latter takes epilogues.
        TOp::Linear | TOp::LinearEp { .. } | TOp::MatMul => {
            // The epilogue's row scale and residual are read in the store of each product
            // block (counted in `acts_in`); the product is written once.
            let w = numel(&ty(1));
            wreads.push((n.children[1], 4.0 * w));
            flops = 2.0 * s * w;
            if matches!(n.op, TOp::LinearEp { bias: true, .. }) {
                let last = n.children.len() - 1;
                wreads.push((n.children[last], 4.0 * numel(&ty(last))));
                flops += s * out;
            }
        }
        TOp::LinearNorm { gain, .. } => {
            // One more pass over each stored row while it is in cache (sum of squares, and the
            // scaling with `normalize`): FLOPs, no extra traffic. `out` counts `y` and `q`.
            let w = numel(&ty(1));
            wreads.push((n.children[1], 4.0 * w));
            if *gain {
                let last = n.children.len() - 1;
                wreads.push((n.children[last], 4.0 * numel(&ty(last))));
            }
            flops = 2.0 * s * w + 4.0 * s * out;
        }
        TOp::LinearGlu { .. } => {
            // The `[S, 2n]` product goes to its scratch block by block (written once, never
            // read back from memory); the gated unit's `[S, n]` result is stored.
            let w = numel(&ty(1));
            wreads.push((n.children[1], 4.0 * w));
            flops = 2.0 * s * w + 2.0 * s * out;
            b += bytes(2.0 * out);
        }
        TOp::Embed => {
            b = bytes(out);
            wreads.push((n.children[1], bytes(out)));
        }
        TOp::Attention { heads, scale, .. } => {
            // K and V are read from the cache in place, L = S keys.
            flops = 4.0 * s * s * out;
            if f32::from_bits(*scale) != 1.0 {
                flops += s * s * *heads as f64;
            }
        }
        TOp::Concat | TOp::Slice { .. } => {}
        TOp::InvRms { .. } => flops = 2.0 * s * acts_in,
        TOp::RmsNorm { .. } | TOp::RmsNormRes { .. } => {
            flops = 4.0 * s * out;
            for i in 0..n.children.len() {
                if is_w(i) {
                    wreads.push((n.children[i], 4.0 * numel(&ty(i))));
                }
            }
        }
        _ => {
            flops = 2.0 * s * out;
            for i in 0..n.children.len() {
                if is_w(i) {
                    wreads.push((n.children[i], 4.0 * numel(&ty(i))));
                }
            }
        }
    }
    if eg.analysis.in_loop && node_invariant(eg, n) {
        let k = eg.analysis.steps.max(1) as f64;
        b /= k;
        flops /= k;
        for w in &mut wreads {
            w.1 /= k;
        }
    }
    (b, flops, wreads)
}

/// Whether opaque handle `i` is a `linear_parts` product (priced like a matmul).
pub fn is_parts(eg: &TGraph, i: u32) -> bool {
    matches!(
        eg.analysis.opaque.get(i as usize),
        Some(Op::LinearParts { .. })
    )
}

fn node_invariant(eg: &TGraph, n: &TNode) -> bool {
    match n.op {
        TOp::Param(i) => i != 0,
        TOp::Opaque(i) if is_parts(eg, i) => n.children.iter().all(|c| eg[*c].data.invariant),
        TOp::Attention { .. } | TOp::Opaque(_) => false,
        _ => n.children.iter().all(|c| eg[*c].data.invariant),
    }
}

/// A selection: one node per class reachable from the roots.
pub struct Selection {
    pub choice: HashMap<Id, TNode>,
    pub roots: Vec<Id>,
}

fn ill_typed(eg: &TGraph, n: &TNode) -> bool {
    eg.analysis.node_ty(eg, n).is_none()
}

pub fn extract(eg: &TGraph, roots: &[Id]) -> Selection {
    // Tree costs to a fixed point.
    let mut best: HashMap<Id, (f64, TNode)> = HashMap::new();
    let mut changed = true;
    while changed {
        changed = false;
        for class in eg.classes() {
            for n in &class.nodes {
                if ill_typed(eg, n) {
                    continue;
                }
                let mut total = 0.0;
                let mut ok = true;
                // `inv_rms x` exists only as the row scale of a matmul that also reads `x`
                // (`rmsnorm-rowscale`): a tree would count `x` twice, the DAG once.
                let shared_input = matches!(n.op, TOp::InvRms { .. });
                for ch in &n.children {
                    if shared_input {
                        if !best.contains_key(&eg.find(*ch)) {
                            ok = false;
                        }
                        continue;
                    }
                    match best.get(&eg.find(*ch)) {
                        Some((c, _)) => total += c,
                        None => {
                            ok = false;
                            break;
                        }
                    }
                }
                if !ok {
                    continue;
                }
                let (own, wr) = node_cost(eg, n);
                total += own + wr.iter().map(|w| w.1).sum::<f64>();
                let better = best.get(&class.id).is_none_or(|(c, b)| {
                    total < *c - 1e-9 || ((total - *c).abs() <= 1e-9 && n < b)
                });
                if better {
                    best.insert(class.id, (total, n.clone()));
                    changed = true;
                }
            }
        }
    }
    let roots: Vec<Id> = roots.iter().map(|r| eg.find(*r)).collect();
    let mut choice: HashMap<Id, TNode> = best.into_iter().map(|(k, (_, n))| (k, n)).collect();
    // DAG improvement: reuse what the selection computes anyway.
    for _ in 0..8 {
        let reach = reachable(eg, &choice, &roots);
        let mut switched = false;
        for &c in &reach {
            let cur = &choice[&c];
            let cur_own = node_cost(eg, cur).0;
            let mut pick: Option<TNode> = None;
            for n in &eg[c].nodes {
                if n == cur || ill_typed(eg, n) {
                    continue;
                }
                let kids: Vec<Id> = n.children.iter().map(|k| eg.find(*k)).collect();
                if !kids.iter().all(|k| reach.contains(k))
                    || kids.iter().any(|k| depends_on(eg, &choice, *k, c))
                {
                    continue;
                }
                let own = node_cost(eg, n).0;
                if own < cur_own - 1e-9 && pick.as_ref().is_none_or(|p| own < node_cost(eg, p).0) {
                    pick = Some(n.clone());
                }
            }
            if let Some(p) = pick {
                choice.insert(c, p);
                switched = true;
            }
        }
        if !switched {
            break;
        }
    }
    // Multi-result nodes: the tree pass prices a projection with its whole tuple, so a tuple
    // that replaces several classes at once (`linear_norm`: the product and its `inv_rms`) is
    // never picked class by class. Try switching every reached class that holds a projection
    // of a not yet computed tuple whose operands are computed anyway, and keep the switch when
    // the whole selection's DAG cost goes down.
    for _ in 0..8 {
        let reach = reachable(eg, &choice, &roots);
        let cost_of = |choice: &HashMap<Id, TNode>| {
            let sel = Selection {
                choice: choice.clone(),
                roots: roots.clone(),
            };
            dag_cost(eg, &prune(eg, &sel))
        };
        let base = cost_of(&choice);
        let mut tuples: Vec<Id> = vec![];
        for &c in &reach {
            for n in &eg[c].nodes {
                if let TOp::Proj(_) = n.op {
                    let t = eg.find(n.children[0]);
                    let ready = choice
                        .get(&t)
                        .is_some_and(|tn| tn.children.iter().all(|k| reach.contains(&eg.find(*k))));
                    if !reach.contains(&t) && ready && !tuples.contains(&t) {
                        tuples.push(t);
                    }
                }
            }
        }
        tuples.sort();
        let mut switched = false;
        for t in tuples {
            let mut cand = choice.clone();
            let mut any = false;
            for &c in &reach {
                let proj = eg[c]
                    .nodes
                    .iter()
                    .find(|n| matches!(n.op, TOp::Proj(_)) && eg.find(n.children[0]) == t);
                if let Some(p) = proj {
                    if !depends_on(eg, &cand, t, c) {
                        cand.insert(c, p.clone());
                        any = true;
                    }
                }
            }
            if any && cost_of(&cand) < base - 1e-9 {
                choice = cand;
                switched = true;
                break;
            }
        }
        if !switched {
            break;
        }
    }
    // Memory: a class that reads a duplicating derived weight tries its other nodes, keeping a
    // switch when the whole selection (duplicated bytes included) gets cheaper. Tree costs
    // cannot see duplication: it depends on what else the selection reads.
    let mut sel = Selection { choice, roots };
    for _ in 0..4 {
        if dup_bytes(eg, &sel) == 0.0 {
            break;
        }
        let mut cur = dag_cost(eg, &prune(eg, &sel));
        let reach = reachable(eg, &sel.choice, &sel.roots);
        let mut switched = false;
        for &c in &reach {
            let reads_derived = sel.choice[&c].children.iter().any(|k| {
                sel.choice
                    .get(&eg.find(*k))
                    .is_some_and(|n| is_derived(&n.op))
            });
            if !reads_derived {
                continue;
            }
            for n in eg[c].nodes.clone() {
                if n == sel.choice[&c] || ill_typed(eg, &n) {
                    continue;
                }
                let kids: Vec<Id> = n.children.iter().map(|k| eg.find(*k)).collect();
                if kids
                    .iter()
                    .any(|k| !sel.choice.contains_key(k) || depends_on(eg, &sel.choice, *k, c))
                {
                    continue;
                }
                let old = sel.choice.insert(c, n).expect("selected");
                let new_cost = dag_cost(eg, &prune(eg, &sel));
                if new_cost < cur - 1e-9 {
                    cur = new_cost;
                    switched = true;
                } else {
                    sel.choice.insert(c, old);
                }
            }
        }
        if !switched {
            break;
        }
    }
    prune(eg, &sel)
}

/// The selection restricted to what its roots reach.
fn prune(eg: &TGraph, sel: &Selection) -> Selection {
    let reach = reachable(eg, &sel.choice, &sel.roots);
    let mut choice = sel.choice.clone();
    choice.retain(|k, _| reach.contains(k));
    Selection {
        choice,
        roots: sel.roots.clone(),
    }
}

fn reachable(eg: &TGraph, choice: &HashMap<Id, TNode>, roots: &[Id]) -> HashSet<Id> {
    let mut seen = HashSet::new();
    let mut stack: Vec<Id> = roots.to_vec();
    while let Some(c) = stack.pop() {
        let c = eg.find(c);
        if !seen.insert(c) {
            continue;
        }
        if let Some(n) = choice.get(&c) {
            stack.extend(n.children.iter().copied());
        }
    }
    seen
}

/// Whether the selected DAG under `from` reaches `target` (a switch to `from` would cycle).
fn depends_on(eg: &TGraph, choice: &HashMap<Id, TNode>, from: Id, target: Id) -> bool {
    reachable(eg, choice, &[from]).contains(&target)
}

/// DAG cost of a selection (each class once, each weight once at its largest read).
pub fn dag_cost(eg: &TGraph, sel: &Selection) -> f64 {
    let (bytes, flops, dup) = dag_parts(eg, sel);
    bytes + flops / FLOPS_PER_BYTE + dup * RESIDENT_PER_BYTE
}

fn is_derived(op: &TOp) -> bool {
    matches!(
        op,
        TOp::WSliceCols { .. }
            | TOp::WScale(_)
            | TOp::WMulCols
            | TOp::WConcatRows
            | TOp::WTranspose
            | TOp::WInterleaveRows(_)
    )
}

/// Checkpoint tensors (by id) under a selected weight class, through derived weights.
fn sources(eg: &TGraph, choice: &HashMap<Id, TNode>, c: Id, out: &mut Vec<u32>) {
    match choice.get(&eg.find(c)) {
        Some(TNode {
            op: TOp::Weight { weight, .. },
            ..
        }) => out.push(*weight),
        Some(n) if is_derived(&n.op) => {
            for k in &n.children {
                sources(eg, choice, *k, out);
            }
        }
        _ => {}
    }
}

/// Resident bytes of the derived weights the program reads whose source tensor it also reads
/// directly, so both stay in memory.
pub fn dup_bytes(eg: &TGraph, sel: &Selection) -> f64 {
    let mut direct: HashSet<u32> = HashSet::new();
    let mut derived: HashSet<Id> = HashSet::new();
    for n in sel.choice.values() {
        if is_derived(&n.op) {
            continue;
        }
        for k in &n.children {
            let k = eg.find(*k);
            match sel.choice.get(&k) {
                Some(TNode {
                    op: TOp::Weight { weight, .. },
                    ..
                }) => {
                    direct.insert(*weight);
                }
                Some(d) if is_derived(&d.op) => {
                    derived.insert(k);
                }
                _ => {}
            }
        }
    }
    let mut total = 0.0;
    for d in derived {
        let mut src = vec![];
        sources(eg, &sel.choice, d, &mut src);
        if src.iter().any(|w| direct.contains(w)) {
            total += 4.0 * numel(&eg[d].data.ty);
        }
    }
    total
}

/// `(bytes moved, FLOPs, duplicated resident weight bytes)` of a selection for one call of
/// [`S_NOMINAL`] rows.
pub fn dag_parts(eg: &TGraph, sel: &Selection) -> (f64, f64, f64) {
    let (mut bytes, mut flops) = (0.0, 0.0);
    let mut wmax: HashMap<Id, f64> = HashMap::new();
    for n in sel.choice.values() {
        let (b, f, wr) = node_parts(eg, n);
        bytes += b;
        flops += f;
        for (w, b) in wr {
            let e = wmax.entry(eg.find(w)).or_insert(0.0);
            *e = e.max(b);
        }
    }
    (
        bytes + wmax.values().sum::<f64>(),
        flops,
        dup_bytes(eg, sel),
    )
}
