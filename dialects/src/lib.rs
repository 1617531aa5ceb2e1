//! The op sets of loopc's IR levels, their types, their text forms and their verifier.
//!
//! Two levels share one graph representation ([`graph::Region`], a petgraph DAG of [`ops::Op`]):
//! - the **loop level**: [`ops::Op::Recur`] (a nested region run up to N times, with its state
//!   init, exit policy, cache policy and optional exit gate) and region parameters;
//! - the **tensor level**: embedding, matmul (`linear`), rmsnorm, rope, attention, elementwise,
//!   concat/slice, and the fused elementwise ops the passes create.
//!
//! Every level prints to one canonical text form ([`print`]) that [`parse`] reads back.
pub mod graph;
pub mod ops;
pub mod parse;
pub mod print;
pub mod types;
pub mod verify;

pub use graph::{Module, NodeId, Region, WeightDecl, WeightView};
pub use ops::Op;
pub use types::Ty;
