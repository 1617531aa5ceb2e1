//! The tensor-level e-graph language: one e-node per graph-IR op, attributes in the operator
//! (floats as bit patterns, so nodes hash and compare exactly), operands as children. Ops the
//! optimizer does not look into (a `loop.recur` with its body, a fused tree) are `Opaque`
//! handles into a side table, with their operands as children, so they stay in place.
//!
//! The analysis carries each class's type (the width of `[S, n]` activations, the shape of
//! weight views) from the dialect's own `infer`, so rules check shapes against the same typing
//! rules as the verifier, and whether the value is loop-invariant inside a recur body.
use egg::{Analysis, DidMerge, EGraph, Id, Language};
use loopc_dialects::ops::{Binary, RopeStyle, Unary};
use loopc_dialects::verify::infer;
use loopc_dialects::{Op, Ty, WeightView};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TOp {
    Tokens,
    Param(u32),
    Weight {
        weight: u32,
        offset: usize,
        shape: Vec<usize>,
    },
    Embed,
    Linear,
    RmsNorm {
        eps: u32,
    },
    Rope {
        heads: usize,
        interleaved: bool,
        base: u64,
    },
    Attention {
        heads: usize,
        kv_heads: usize,
        scale: u32,
        site: u32,
    },
    Unary(u8),
    Binary(u8),
    Scale(u32),
    Concat,
    Slice {
        start: usize,
        len: usize,
    },
    RmsNormRes {
        eps: u32,
    },
    Proj(u32),
    WSliceCols {
        start: usize,
        len: usize,
    },
    WScale(u32),
    WMulCols,
    WConcatRows,
    Glu(u8),
    InvRms {
        eps: u32,
    },
    LinearEp {
        row_scale: bool,
        residual: bool,
        bias: bool,
    },
    /// Index into [`TensorAnalysis::opaque`].
    Opaque(u32),
    MatMul,
    WTranspose,
    WInterleaveRows(usize),
    LinearGlu {
        act: u8,
        block: usize,
        row_scale: bool,
    },
    LinearNorm {
        row_scale: bool,
        residual: bool,
        normalize: bool,
        gain: bool,
        eps: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TNode {
    pub op: TOp,
    pub children: Vec<Id>,
}

impl Language for TNode {
    type Discriminant = TOp;
    fn discriminant(&self) -> TOp {
        self.op.clone()
    }
    fn matches(&self, other: &Self) -> bool {
        self.op == other.op && self.children.len() == other.children.len()
    }
    fn children(&self) -> &[Id] {
        &self.children
    }
    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

impl TNode {
    pub fn new(op: TOp, children: Vec<Id>) -> Self {
        TNode { op, children }
    }
}

fn unary_ix(u: Unary) -> u8 {
    Unary::ALL.iter().position(|x| *x == u).unwrap_or(0) as u8
}
fn binary_ix(b: Binary) -> u8 {
    Binary::ALL.iter().position(|x| *x == b).unwrap_or(0) as u8
}

/// The e-graph operator of a graph-IR op; ops kept whole go to `opaque`.
pub fn to_top(op: &Op, opaque: &mut Vec<Op>) -> TOp {
    match op {
        Op::Tokens => TOp::Tokens,
        Op::Param(i) => TOp::Param(*i),
        Op::Weight(v) => TOp::Weight {
            weight: v.weight,
            offset: v.offset,
            shape: v.shape.clone(),
        },
        Op::Embed => TOp::Embed,
        Op::Linear => TOp::Linear,
        Op::RmsNorm { eps } => TOp::RmsNorm { eps: eps.to_bits() },
        Op::Rope { heads, style, base } => TOp::Rope {
            heads: *heads,
            interleaved: *style == RopeStyle::Interleaved,
            base: base.to_bits(),
        },
        Op::Attention {
            heads,
            kv_heads,
            scale,
            site,
        } => TOp::Attention {
            heads: *heads,
            kv_heads: *kv_heads,
            scale: scale.to_bits(),
            site: *site,
        },
        Op::Unary(u) => TOp::Unary(unary_ix(*u)),
        Op::Binary(b) => TOp::Binary(binary_ix(*b)),
        Op::Scale(c) => TOp::Scale(c.to_bits()),
        Op::Concat => TOp::Concat,
        Op::Slice { start, len } => TOp::Slice {
            start: *start,
            len: *len,
        },
        Op::RmsNormRes { eps } => TOp::RmsNormRes { eps: eps.to_bits() },
        Op::Proj(i) => TOp::Proj(*i),
        Op::WSliceCols { start, len } => TOp::WSliceCols {
            start: *start,
            len: *len,
        },
        Op::WScale(c) => TOp::WScale(c.to_bits()),
        Op::WMulCols => TOp::WMulCols,
        Op::WConcatRows => TOp::WConcatRows,
        Op::Glu(u) => TOp::Glu(unary_ix(*u)),
        Op::InvRms { eps } => TOp::InvRms { eps: eps.to_bits() },
        Op::LinearEp {
            row_scale,
            residual,
            bias,
        } => TOp::LinearEp {
            row_scale: *row_scale,
            residual: *residual,
            bias: *bias,
        },
        Op::MatMul => TOp::MatMul,
        Op::LinearNorm {
            row_scale,
            residual,
            normalize,
            gain,
            eps,
        } => TOp::LinearNorm {
            row_scale: *row_scale,
            residual: *residual,
            normalize: *normalize,
            gain: *gain,
            eps: eps.to_bits(),
        },
        Op::WTranspose => TOp::WTranspose,
        Op::WInterleaveRows(b) => TOp::WInterleaveRows(*b),
        Op::LinearGlu {
            act,
            block,
            row_scale,
        } => TOp::LinearGlu {
            act: unary_ix(*act),
            block: *block,
            row_scale: *row_scale,
        },
        // Kept whole: the optimizer has no rules for them yet.
        Op::Recur { .. }
        | Op::Fused { .. }
        | Op::LayerNorm { .. }
        | Op::PosEmbed
        | Op::WPerIter
        | Op::Sinusoidal { .. }
        | Op::TimingSignal { .. }
        | Op::HeadRmsNorm { .. }
        | Op::WMap { .. }
        | Op::WRepeatRows(_)
        // Made after extraction (`merge`); a region that already has one keeps it whole.
        | Op::LinearParts { .. } => {
            opaque.push(op.clone());
            TOp::Opaque((opaque.len() - 1) as u32)
        }
    }
}

pub fn to_op(t: &TOp, opaque: &[Op]) -> Op {
    match t {
        TOp::Tokens => Op::Tokens,
        TOp::Param(i) => Op::Param(*i),
        TOp::Weight {
            weight,
            offset,
            shape,
        } => Op::Weight(WeightView {
            weight: *weight,
            offset: *offset,
            shape: shape.clone(),
        }),
        TOp::Embed => Op::Embed,
        TOp::Linear => Op::Linear,
        TOp::RmsNorm { eps } => Op::RmsNorm {
            eps: f32::from_bits(*eps),
        },
        TOp::Rope {
            heads,
            interleaved,
            base,
        } => Op::Rope {
            heads: *heads,
            style: if *interleaved {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Half
            },
            base: f64::from_bits(*base),
        },
        TOp::Attention {
            heads,
            kv_heads,
            scale,
            site,
        } => Op::Attention {
            heads: *heads,
            kv_heads: *kv_heads,
            scale: f32::from_bits(*scale),
            site: *site,
        },
        TOp::Unary(u) => Op::Unary(Unary::ALL[*u as usize]),
        TOp::Binary(b) => Op::Binary(Binary::ALL[*b as usize]),
        TOp::Scale(c) => Op::Scale(f32::from_bits(*c)),
        TOp::Concat => Op::Concat,
        TOp::Slice { start, len } => Op::Slice {
            start: *start,
            len: *len,
        },
        TOp::RmsNormRes { eps } => Op::RmsNormRes {
            eps: f32::from_bits(*eps),
        },
        TOp::Proj(i) => Op::Proj(*i),
        TOp::WSliceCols { start, len } => Op::WSliceCols {
            start: *start,
            len: *len,
        },
        TOp::WScale(c) => Op::WScale(f32::from_bits(*c)),
        TOp::WMulCols => Op::WMulCols,
        TOp::WConcatRows => Op::WConcatRows,
        TOp::Glu(u) => Op::Glu(Unary::ALL[*u as usize]),
        TOp::InvRms { eps } => Op::InvRms {
            eps: f32::from_bits(*eps),
        },
        TOp::LinearEp {
            row_scale,
            residual,
            bias,
        } => Op::LinearEp {
            row_scale: *row_scale,
            residual: *residual,
            bias: *bias,
        },
        TOp::MatMul => Op::MatMul,
        TOp::LinearNorm {
            row_scale,
            residual,
            normalize,
            gain,
            eps,
        } => Op::LinearNorm {
            row_scale: *row_scale,
            residual: *residual,
            normalize: *normalize,
            gain: *gain,
            eps: f32::from_bits(*eps),
        },
        TOp::WTranspose => Op::WTranspose,
        TOp::WInterleaveRows(b) => Op::WInterleaveRows(*b),
        TOp::LinearGlu {
            act,
            block,
            row_scale,
        } => Op::LinearGlu {
            act: Unary::ALL[*act as usize],
            block: *block,
            row_scale: *row_scale,
        },
        TOp::Opaque(i) => opaque[*i as usize].clone(),
    }
}

pub const ADD: u8 = 0; // index of Binary::Add in Binary::ALL
pub const MUL: u8 = 2;

#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    /// `None` only for a class whose every node is ill-typed (never built by a sound rule).
    pub ty: Option<Ty>,
    /// Inside a recur body: the value reads no state and no per-iteration KV cache, so it is
    /// the same in every iteration and can be computed once before the loop.
    pub invariant: bool,
}

#[derive(Debug, Default)]
pub struct TensorAnalysis {
    pub params: Vec<Ty>,
    pub opaque: Vec<Op>,
    /// True for a recur body (parameter 0 is the loop-carried state).
    pub in_loop: bool,
    /// Iterations of the enclosing recurrence (prices loop-invariant work in the cost model).
    pub steps: usize,
    /// The region's results: users outside the graph, which rules must respect.
    pub roots: Vec<Id>,
}

pub type TGraph = EGraph<TNode, TensorAnalysis>;

impl TensorAnalysis {
    /// The type of `node` from its children's types, through the dialect's typing rules.
    pub fn node_ty(&self, eg: &TGraph, node: &TNode) -> Option<Ty> {
        let mut args = Vec::with_capacity(node.children.len());
        for c in &node.children {
            args.push(eg[*c].data.ty.clone()?);
        }
        infer(&to_op(&node.op, &self.opaque), &args, &self.params).ok()
    }
}

impl Analysis<TNode> for TensorAnalysis {
    type Data = Info;

    fn make(eg: &mut TGraph, enode: &TNode, _id: Id) -> Info {
        let ty = eg.analysis.node_ty(eg, enode);
        let invariant = match &enode.op {
            TOp::Param(i) => !eg.analysis.in_loop || *i != 0,
            TOp::Opaque(i) if matches!(eg.analysis.opaque[*i as usize], Op::LinearParts { .. }) => {
                enode.children.iter().all(|c| eg[*c].data.invariant)
            }
            TOp::Attention { .. } | TOp::Opaque(_) => !eg.analysis.in_loop,
            _ => enode.children.iter().all(|c| eg[*c].data.invariant),
        };
        Info { ty, invariant }
    }

    fn merge(&mut self, a: &mut Info, b: Info) -> DidMerge {
        let mut changed_a = false;
        if a.ty.is_none() && b.ty.is_some() {
            a.ty = b.ty.clone();
            changed_a = true;
        }
        // Equal values: if one form is invariant, the value is.
        if !a.invariant && b.invariant {
            a.invariant = true;
            changed_a = true;
        }
        DidMerge(changed_a, a.invariant != b.invariant || a.ty != b.ty)
    }
}

/// Whether a node has an operand count its op allows, so rules can index operands freely.
pub fn arity_ok(n: &TNode) -> bool {
    let k = n.children.len();
    match n.op {
        TOp::Linear | TOp::Binary(_) | TOp::Embed | TOp::WMulCols => k == 2,
        TOp::Attention { .. } => k == 3,
        TOp::Unary(_) | TOp::Scale(_) | TOp::Proj(_) | TOp::Slice { .. } => k == 1,
        TOp::Rope { .. } => k == 1 || k == 2,
        TOp::WScale(_) | TOp::WSliceCols { .. } | TOp::Glu(_) => k == 1,
        TOp::RmsNorm { .. } => k == 1 || k == 2,
        TOp::RmsNormRes { .. } => k == 2 || k == 3,
        TOp::InvRms { .. } => k == 1,
        TOp::LinearEp {
            row_scale,
            residual,
            bias,
        } => k == 2 + usize::from(row_scale) + usize::from(residual) + usize::from(bias),
        TOp::MatMul => k == 2,
        TOp::WTranspose | TOp::WInterleaveRows(_) => k == 1,
        TOp::LinearGlu { row_scale, .. } => k == 2 + usize::from(row_scale),
        TOp::LinearNorm {
            row_scale,
            residual,
            gain,
            ..
        } => k == 2 + usize::from(row_scale) + usize::from(residual) + usize::from(gain),
        _ => true,
    }
}

/// Nodes of class `id` with operator matching `f` (and a sound operand count).
pub fn nodes_where<'a>(
    eg: &'a TGraph,
    id: Id,
    f: impl Fn(&TOp) -> bool + 'a,
) -> impl Iterator<Item = &'a TNode> + 'a {
    eg[id].nodes.iter().filter(move |n| f(&n.op) && arity_ok(n))
}

pub fn act_width(eg: &TGraph, id: Id) -> Option<usize> {
    match &eg[id].data.ty {
        Some(Ty::Act(c)) => Some(*c),
        _ => None,
    }
}

pub fn weight_shape(eg: &TGraph, id: Id) -> Option<Vec<usize>> {
    match &eg[id].data.ty {
        Some(Ty::Weight(s)) => Some(s.clone()),
        _ => None,
    }
}
