//! Compile-time values of the elaborator. Tensors are graph nodes, tagged with the depth of the
//! region they live in so that a use from inside a `recur` body becomes a capture.
use loopc_dialects::ops::{CacheSpec, ExitSpec, StateInit};
use loopc_dialects::{NodeId, WeightView};

#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Int(i64),
    Float(f64),
    Str(String),
    /// A bare name that is not bound: `interleaved`, `fixed`, `per_step`, `zeros`...
    Sym(String),
    Tensor {
        depth: usize,
        node: NodeId,
    },
    Weight(WeightView),
    List(Vec<Val>),
    Init(InitVal),
    Exit(ExitSpec),
    Cache(CacheSpec),
    /// A value that depends on the iteration of the enclosing `recur` (its `as t` variable and
    /// what is computed from it): entry `t` is the value at iteration `t`. Integers, strings
    /// and weights only: it names per-iteration weights.
    PerIter(Vec<Val>),
    /// Poison: an error was already reported; uses stay silent.
    Error,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InitVal {
    pub init: StateInit,
    /// The value whose shape the state takes (Huginn's `like-init`), or the operand for
    /// `StateInit::Operand`.
    pub like: Option<(usize, NodeId)>,
}

impl Val {
    pub fn describe(&self) -> &'static str {
        match self {
            Val::Int(_) => "an integer",
            Val::Float(_) => "a float",
            Val::Str(_) => "a string",
            Val::Sym(_) => "a symbol",
            Val::Tensor { .. } => "a tensor",
            Val::Weight(_) => "a weight",
            Val::List(_) => "a list",
            Val::Init(_) => "a state initializer",
            Val::Exit(_) => "an exit policy",
            Val::Cache(_) => "a cache policy",
            Val::PerIter(_) => "a per-iteration value",
            Val::Error => "an erroneous value",
        }
    }

    pub fn num(&self) -> Option<f64> {
        match self {
            Val::Int(i) => Some(*i as f64),
            Val::Float(f) => Some(*f),
            _ => None,
        }
    }
}
