//! The graph IR: a module of checkpoint weights and one `forward` region; a region is a petgraph
//! DAG whose edges carry operand positions, so the operands of a node are its incoming edges
//! sorted by weight. A recur node owns its body region (nested, not shared).
use crate::ops::Op;
use crate::types::Ty;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

pub type NodeId = NodeIndex<u32>;

#[derive(Debug, Clone, PartialEq)]
pub struct WeightDecl {
    /// The checkpoint's own tensor name.
    pub name: String,
    pub shape: Vec<usize>,
    /// `file:line:col` of the declaration, for load-time errors.
    pub origin: String,
}

/// A contiguous window of a declared weight, `offset` elements in, with its own shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WeightView {
    pub weight: u32,
    pub offset: usize,
    pub shape: Vec<usize>,
}

impl WeightView {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub op: Op,
    pub ty: Ty,
}

#[derive(Debug, Clone, Default)]
pub struct Region {
    pub graph: DiGraph<Node, u32>,
    /// Types of the region parameters (`Op::Param(i)`).
    pub params: Vec<Ty>,
    /// The yielded values: `[result]` for forward; `[next_state, gate?]` for a recur body.
    pub results: Vec<NodeId>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    pub name: String,
    pub weights: Vec<WeightDecl>,
    /// Evaluated parameters, recorded for the artifact and the text form.
    pub params: Vec<(String, f64)>,
    pub forward: Region,
}

impl Region {
    pub fn add(&mut self, op: Op, ty: Ty, operands: &[NodeId]) -> NodeId {
        let n = self.graph.add_node(Node { op, ty });
        for (i, &o) in operands.iter().enumerate() {
            self.graph.add_edge(o, n, i as u32);
        }
        n
    }

    pub fn operands(&self, n: NodeId) -> Vec<NodeId> {
        let mut v: Vec<(u32, NodeId)> = self
            .graph
            .edges_directed(n, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        v.sort_by_key(|p| p.0);
        v.into_iter().map(|p| p.1).collect()
    }

    pub fn users(&self, n: NodeId) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .graph
            .edges_directed(n, Direction::Outgoing)
            .map(|e| e.target())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn node(&self, n: NodeId) -> &Node {
        &self.graph[n]
    }

    pub fn ty(&self, n: NodeId) -> &Ty {
        &self.graph[n].ty
    }

    /// Nodes in a deterministic topological order: Kahn's algorithm, ties broken by creation
    /// order, so the text form does not depend on petgraph's internal iteration.
    pub fn topo_order(&self) -> Vec<NodeId> {
        let n = self.graph.node_count();
        let mut indeg = vec![0usize; n];
        for e in self.graph.edge_references() {
            indeg[e.target().index()] += 1;
        }
        let mut ready: std::collections::BTreeSet<usize> =
            (0..n).filter(|&i| indeg[i] == 0).collect();
        let mut out = Vec::with_capacity(n);
        while let Some(&i) = ready.iter().next() {
            ready.remove(&i);
            let id = NodeIndex::new(i);
            out.push(id);
            for e in self.graph.edges_directed(id, Direction::Outgoing) {
                let t = e.target().index();
                indeg[t] -= 1;
                if indeg[t] == 0 {
                    ready.insert(t);
                }
            }
        }
        out
    }

    /// Nodes reachable backwards from the results (and the body results of nested recurs are
    /// inside their own region), i.e. the live part of the region.
    pub fn live(&self) -> Vec<bool> {
        let mut live = vec![false; self.graph.node_count()];
        let mut stack: Vec<NodeId> = self.results.clone();
        while let Some(n) = stack.pop() {
            if live[n.index()] {
                continue;
            }
            live[n.index()] = true;
            stack.extend(self.operands(n));
        }
        live
    }

    /// Rebuild the region keeping only live nodes, renumbered in topological order.
    /// Passes call this after rewriting so that dead nodes never reach the printer.
    pub fn compact(&mut self) {
        let live = self.live();
        let order = self.topo_order();
        let mut map = vec![None; self.graph.node_count()];
        let mut g = DiGraph::new();
        for &n in &order {
            if !live[n.index()] {
                continue;
            }
            let mut node = self.graph[n].clone();
            if let Op::Recur { body, .. } = &mut node.op {
                body.compact();
            }
            map[n.index()] = Some(g.add_node(node));
        }
        for e in self.graph.edge_references() {
            if let (Some(s), Some(t)) = (map[e.source().index()], map[e.target().index()]) {
                g.add_edge(s, t, *e.weight());
            }
        }
        self.results = self
            .results
            .iter()
            .map(|r| map[r.index()].expect("result is live"))
            .collect();
        self.graph = g;
    }

    /// Point every use of `old` at `new` (operand positions preserved).
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) {
        let uses: Vec<(NodeId, u32)> = self
            .graph
            .edges_directed(old, Direction::Outgoing)
            .map(|e| (e.target(), *e.weight()))
            .collect();
        let ids: Vec<_> = self
            .graph
            .edges_directed(old, Direction::Outgoing)
            .map(|e| e.id())
            .collect();
        for id in ids {
            self.graph.remove_edge(id);
        }
        for (t, w) in uses {
            self.graph.add_edge(new, t, w);
        }
        for r in &mut self.results {
            if *r == old {
                *r = new;
            }
        }
    }
}

/// Structural equality: same nodes in the same canonical order with the same operands.
impl PartialEq for Region {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.topo_order(), other.topo_order());
        if a.len() != b.len() || self.params != other.params {
            return false;
        }
        let ia: std::collections::HashMap<NodeId, usize> =
            a.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let ib: std::collections::HashMap<NodeId, usize> =
            b.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        a.iter().zip(&b).all(|(&x, &y)| {
            self.graph[x] == other.graph[y]
                && self
                    .operands(x)
                    .iter()
                    .map(|o| ia[o])
                    .eq(other.operands(y).iter().map(|o| ib[o]))
        }) && self
            .results
            .iter()
            .map(|r| ia[r])
            .eq(other.results.iter().map(|r| ib[r]))
    }
}

impl Module {
    /// Number of nodes, nested regions included.
    pub fn node_count(&self) -> usize {
        fn count(r: &Region) -> usize {
            r.graph
                .node_weights()
                .map(|n| match &n.op {
                    Op::Recur { body, .. } => 1 + count(body),
                    _ => 1,
                })
                .sum()
        }
        count(&self.forward)
    }
}
