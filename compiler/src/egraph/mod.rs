//! The e-graph optimizer (pass `egraph`): each region of the graph IR is loaded into an egg
//! e-graph, rewritten by named one-directional rules in stages ([`rules`]), and the cheapest
//! equivalent program is extracted with a DAG-aware cost model ([`cost`]).
//!
//! Regions are optimized inside out: a recur body first (its parameters are leaves: the state
//! and the captured loop invariants), then loop-invariant work of the body is hoisted in front
//! of the loop as new captures, then the enclosing region, where the recur node is opaque.
//! A region is only replaced when the extracted program is cheaper than the one it came from.
pub mod cost;
pub mod lang;
pub mod merge;
pub mod rope_fold;
pub mod rules;

use egg::{Id, Runner, SimpleScheduler};
use lang::{to_op, to_top, TGraph, TNode, TensorAnalysis};
use loopc_dialects::{Module, NodeId, Op, Region, Ty};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::time::Instant;

/// What the optimizer did to one region.
#[derive(Debug, Clone, Default)]
pub struct RegionReport {
    pub path: String,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub enodes: usize,
    pub eclasses: usize,
    pub cost_before: f64,
    pub cost_after: f64,
    /// `(bytes, FLOPs, duplicated resident weight bytes)` per call of the cost model's nominal
    /// size, before and after (see `cost::dup_bytes`).
    pub parts_before: (f64, f64, f64),
    pub parts_after: (f64, f64, f64),
    /// Applications per rule (a rule applied to a class already equal to its result counts 0).
    pub fired: BTreeMap<&'static str, usize>,
    /// (stage, microseconds, e-nodes after the stage; for `extract`, the classes selected)
    pub stages: Vec<(&'static str, u128, usize)>,
    /// Values of the body computed once before the loop instead.
    pub hoisted: usize,
    /// False when extraction found nothing cheaper and the region was left as it was.
    pub replaced: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub regions: Vec<RegionReport>,
    pub micros: u128,
}

impl Report {
    pub fn fired(&self, rule: &str) -> usize {
        self.regions
            .iter()
            .map(|r| r.fired.get(rule).copied().unwrap_or(0))
            .sum()
    }

    /// The text of `loopc explain`.
    pub fn text(&self) -> String {
        let mut s = String::new();
        writeln!(
            s,
            "egraph: {} region(s) in {:.1} ms",
            self.regions.len(),
            self.micros as f64 / 1e3
        )
        .unwrap();
        writeln!(
            s,
            "cost model: bytes + flops/{} + duplicated weight bytes/{} at S = {} rows, weights once per region, loop-invariant work / steps",
            cost::FLOPS_PER_BYTE,
            1.0 / cost::RESIDENT_PER_BYTE,
            cost::S_NOMINAL
        )
        .unwrap();
        for r in &self.regions {
            writeln!(s, "region {}", r.path).unwrap();
            writeln!(
                s,
                "  nodes {} -> {}, e-graph {} nodes in {} classes",
                r.nodes_before, r.nodes_after, r.enodes, r.eclasses
            )
            .unwrap();
            let pct = if r.cost_before > 0.0 {
                100.0 * (r.cost_after - r.cost_before) / r.cost_before
            } else {
                0.0
            };
            writeln!(
                s,
                "  cost {:.0} -> {:.0} ({pct:+.1}%){}",
                r.cost_before,
                r.cost_after,
                if r.replaced {
                    ""
                } else {
                    ", kept the original"
                }
            )
            .unwrap();
            let s_rows = cost::S_NOMINAL;
            writeln!(
                s,
                "  per token: {:.0} -> {:.0} bytes moved, {:.0} -> {:.0} flops",
                r.parts_before.0 / s_rows,
                r.parts_after.0 / s_rows,
                r.parts_before.1 / s_rows,
                r.parts_after.1 / s_rows
            )
            .unwrap();
            if r.parts_before.2 > 0.0 || r.parts_after.2 > 0.0 {
                writeln!(
                    s,
                    "  derived weights duplicating a tensor still read: {:.0} -> {:.0} bytes resident",
                    r.parts_before.2, r.parts_after.2
                )
                .unwrap();
            }
            for (st, us, n) in &r.stages {
                let what = if *st == "extract" {
                    "classes selected"
                } else if *st == "merge" {
                    "graph nodes"
                } else {
                    "e-nodes"
                };
                writeln!(s, "  stage {st}: {:.2} ms, {n} {what}", *us as f64 / 1e3).unwrap();
            }
            for rule in rules::all() {
                let n = r.fired.get(rule.name).copied().unwrap_or(0);
                if n > 0 {
                    writeln!(s, "  fired {} x{n}", rule.name).unwrap();
                }
            }
            for rule in [merge::RULE, rope_fold::RULE] {
                if let Some(n) = r.fired.get(rule) {
                    writeln!(s, "  fired {rule} x{n} (after extraction)").unwrap();
                }
            }
            if r.hoisted > 0 {
                writeln!(s, "  hoisted {} value(s) out of the loop", r.hoisted).unwrap();
            }
        }
        s
    }
}

pub struct EGraphPass;

impl crate::passes::Pass for EGraphPass {
    fn name(&self) -> &'static str {
        "egraph"
    }
    fn run(&self, m: &mut Module) {
        optimize(m);
    }
}

/// Optimize every region of `m` in place.
pub fn optimize(m: &mut Module) -> Report {
    let t = Instant::now();
    let mut report = Report::default();
    opt_region(&mut m.forward, "forward", false, 1, &mut report.regions);
    m.forward.compact();
    report.micros = t.elapsed().as_micros();
    report
}

fn opt_region(
    r: &mut Region,
    path: &str,
    in_loop: bool,
    steps: usize,
    out: &mut Vec<RegionReport>,
) {
    let order = r.topo_order();
    for (i, &n) in order.iter().enumerate() {
        let Op::Recur {
            body, steps: st, ..
        } = &mut r.graph[n].op
        else {
            continue;
        };
        let st = *st;
        let mut b = std::mem::take(body.as_mut());
        opt_region(&mut b, &format!("{path}/%{i}"), true, st, out);
        let h = hoist(r, n, &mut b);
        if let Op::Recur { body, .. } = &mut r.graph[n].op {
            **body = b;
        }
        if let Some(last) = out
            .iter_mut()
            .rev()
            .find(|x| x.path == format!("{path}/%{i}"))
        {
            last.hoisted = h;
        }
    }
    out.push(rewrite_region(r, path, in_loop, steps));
}

fn rewrite_region(r: &mut Region, path: &str, in_loop: bool, steps: usize) -> RegionReport {
    let mut rep = RegionReport {
        path: path.to_string(),
        nodes_before: r.graph.node_count(),
        ..Default::default()
    };
    let (mut eg, before) = load(r, in_loop, steps);
    let roots = before.roots.clone();
    rep.cost_before = cost::dag_cost(&eg, &before);
    rep.parts_before = cost::dag_parts(&eg, &before);

    let rules = rules::all();
    for stage in rules::STAGES {
        let t = Instant::now();
        let rw: Vec<_> = rules
            .iter()
            .filter(|x| x.stage == *stage && !disabled(x.name))
            .map(|x| x.rewrite())
            .collect();
        let runner = Runner::default()
            .with_egraph(eg)
            .with_scheduler(SimpleScheduler)
            .with_iter_limit(6)
            .with_node_limit(200_000)
            .with_time_limit(std::time::Duration::from_secs(5))
            .run(rw.iter());
        for it in &runner.iterations {
            for (name, n) in &it.applied {
                if let Some(rule) = rules.iter().find(|x| x.name == name.as_str()) {
                    *rep.fired.entry(rule.name).or_insert(0) += n;
                }
            }
        }
        eg = runner.egraph;
        rep.stages
            .push((stage, t.elapsed().as_micros(), eg.total_number_of_nodes()));
    }
    rep.enodes = eg.total_number_of_nodes();
    rep.eclasses = eg.number_of_classes();
    let t = Instant::now();
    let sel = cost::extract(&eg, &roots);
    rep.cost_after = cost::dag_cost(&eg, &sel);
    rep.parts_after = cost::dag_parts(&eg, &sel);
    rep.stages
        .push(("extract", t.elapsed().as_micros(), sel.choice.len()));
    if rep.cost_after < rep.cost_before * (1.0 - 1e-9) {
        if let Some(new) = build_region(&eg, &sel, &r.params) {
            *r = new;
            rep.replaced = true;
        }
    }
    if !rep.replaced {
        rep.cost_after = rep.cost_before;
        rep.parts_after = rep.parts_before;
    }
    let t = Instant::now();
    let merged = if disabled(merge::RULE) {
        0
    } else {
        merge::merge_siblings(r)
    };
    let folded = if disabled(rope_fold::RULE) {
        0
    } else {
        rope_fold::fold_ropes(r)
    };
    if merged + folded > 0 {
        r.compact();
        if merged > 0 {
            rep.fired.insert(merge::RULE, merged);
        }
        if folded > 0 {
            rep.fired.insert(rope_fold::RULE, folded);
        }
        rep.stages
            .push(("merge", t.elapsed().as_micros(), r.graph.node_count()));
        // The steps after extraction are priced like the rest: the region as it now is.
        let (eg, sel) = load(r, in_loop, steps);
        rep.cost_after = cost::dag_cost(&eg, &sel);
        rep.parts_after = cost::dag_parts(&eg, &sel);
    }
    rep.nodes_after = r.graph.node_count();
    rep
}

/// The rules named (comma-separated) in `LOOPC_DISABLE_RULES`, for measuring one rule's effect
/// (`loopc explain` then shows it unfired). Read per call: the pass is run once per compile.
pub fn disabled(rule: &str) -> bool {
    std::env::var("LOOPC_DISABLE_RULES").is_ok_and(|v| v.split(',').any(|r| r.trim() == rule))
}

/// `r` as an e-graph with its own nodes as the selection (what the program costs as it is).
fn load(r: &Region, in_loop: bool, steps: usize) -> (TGraph, cost::Selection) {
    let analysis = TensorAnalysis {
        params: r.params.clone(),
        opaque: vec![],
        in_loop,
        steps,
        roots: vec![],
    };
    let mut eg: TGraph = egg::EGraph::new(analysis);
    let mut ids: HashMap<NodeId, Id> = HashMap::new();
    let mut original: HashMap<Id, TNode> = HashMap::new();
    for n in r.topo_order() {
        let children: Vec<Id> = r.operands(n).iter().map(|o| ids[o]).collect();
        let top = to_top(&r.node(n).op, &mut eg.analysis.opaque);
        let node = TNode::new(top, children);
        let id = eg.add(node.clone());
        original.entry(id).or_insert(node);
        ids.insert(n, id);
    }
    eg.rebuild();
    let roots: Vec<Id> = r.results.iter().map(|n| ids[n]).collect();
    eg.analysis.roots = roots.clone();
    (
        eg,
        cost::Selection {
            choice: original,
            roots,
        },
    )
}

/// The graph IR of an extracted selection (`None` if some class has no typed node).
fn build_region(eg: &TGraph, sel: &cost::Selection, params: &[Ty]) -> Option<Region> {
    let mut r = Region {
        params: params.to_vec(),
        ..Default::default()
    };
    let mut made: HashMap<Id, NodeId> = HashMap::new();
    // Post-order without recursion: deep bodies would overflow the stack.
    for &root in &sel.roots {
        let mut stack: Vec<(Id, bool)> = vec![(eg.find(root), false)];
        while let Some((c, expanded)) = stack.pop() {
            if made.contains_key(&c) {
                continue;
            }
            let node = sel.choice.get(&c)?;
            if !expanded {
                stack.push((c, true));
                for ch in node.children.iter().rev() {
                    let ch = eg.find(*ch);
                    if !made.contains_key(&ch) {
                        stack.push((ch, false));
                    }
                }
                continue;
            }
            let ops: Vec<NodeId> = node
                .children
                .iter()
                .map(|ch| made.get(&eg.find(*ch)).copied())
                .collect::<Option<_>>()?;
            let ty = eg[c].data.ty.clone()?;
            let id = r.add(to_op(&node.op, &eg.analysis.opaque), ty, &ops);
            made.insert(c, id);
        }
    }
    r.results = sel
        .roots
        .iter()
        .map(|c| made.get(&eg.find(*c)).copied())
        .collect::<Option<_>>()?;
    Some(r)
}

/// Move the loop-invariant values of `body` (recur node `rn` of `r`) in front of the loop:
/// each becomes a new capture. Returns how many values were hoisted.
fn hoist(r: &mut Region, rn: NodeId, body: &mut Region) -> usize {
    let Op::Recur { init, .. } = &r.node(rn).op else {
        return 0;
    };
    let n_init = usize::from(*init == loopc_dialects::ops::StateInit::Operand);
    let outer_ops = r.operands(rn);
    let order = body.topo_order();
    let mut inv = vec![false; body.graph.node_count()];
    for &n in &order {
        inv[n.index()] = match body.node(n).op {
            Op::Param(i) => i != 0,
            // The step signal changes every iteration although it reads nothing.
            Op::Attention { .. } | Op::Recur { .. } | Op::TimingSignal { step: true, .. } => false,
            _ => body.operands(n).iter().all(|o| inv[o.index()]),
        };
    }
    // Hoist the invariant activations read by variant nodes (or yielded); leaves stay.
    let frontier: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|&n| {
            inv[n.index()]
                && matches!(body.ty(n), Ty::Act(_))
                && !matches!(body.node(n).op, Op::Param(_))
                // Yielded values stay: the runtime swaps the state buffers.
                && !body.results.contains(&n)
                && body.users(n).iter().any(|u| !inv[u.index()])
        })
        .collect();
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    for &f in &frontier {
        let outer = clone_cone(r, body, f, n_init, &outer_ops, &mut map);
        let Some(outer) = outer else { continue };
        let idx = r.operands(rn).len() as u32;
        r.graph.add_edge(outer, rn, idx);
        body.params.push(body.ty(f).clone());
        let p = body.add(
            Op::Param((body.params.len() - 1) as u32),
            body.ty(f).clone(),
            &[],
        );
        body.replace_uses(f, p);
    }
    body.compact();
    frontier.len()
}

fn clone_cone(
    r: &mut Region,
    body: &Region,
    n: NodeId,
    n_init: usize,
    outer_ops: &[NodeId],
    map: &mut HashMap<NodeId, NodeId>,
) -> Option<NodeId> {
    if let Some(&m) = map.get(&n) {
        return Some(m);
    }
    let node = body.node(n);
    let m = match node.op {
        Op::Param(i) if i >= 1 => *outer_ops.get(n_init + i as usize - 1)?,
        Op::Param(_) => return None,
        _ => {
            let mut ops = vec![];
            for o in body.operands(n) {
                ops.push(clone_cone(r, body, o, n_init, outer_ops, map)?);
            }
            r.add(node.op.clone(), node.ty.clone(), &ops)
        }
    };
    map.insert(n, m);
    Some(m)
}
