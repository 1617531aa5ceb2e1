//! loopc compiler: the `.loop` front end, the passes, and the backends.
pub mod backend;
pub mod driver;
pub mod egraph;
pub mod elab;
pub mod frontend;
pub mod lower;
pub mod passes;
