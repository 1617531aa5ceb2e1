//! Value types. Activations are `[S, cols]` where `S`, the number of tokens of a call, is only
//! known at run time; every other dimension is static after parameter evaluation.
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ty {
    /// The token ids of the call: `i32[S]`.
    Tokens,
    /// An activation `f32[S, cols]`.
    Act(usize),
    /// A (view of a) checkpoint tensor with a static shape.
    Weight(Vec<usize>),
    /// The results of a multi-result node, read by `proj i` nodes (never stored in a buffer).
    Tuple(Vec<Ty>),
}

impl Ty {
    pub fn cols(&self) -> Option<usize> {
        match self {
            Ty::Act(c) => Some(*c),
            _ => None,
        }
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ty::Tokens => write!(f, "tokens"),
            Ty::Act(c) => write!(f, "[S, {c}]"),
            Ty::Weight(s) => {
                write!(f, "w[")?;
                for (i, d) in s.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{d}")?;
                }
                write!(f, "]")
            }
            Ty::Tuple(ts) => {
                write!(f, "(")?;
                for (i, t) in ts.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{t}")?;
                }
                write!(f, ")")
            }
        }
    }
}
