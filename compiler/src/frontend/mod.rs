//! The `.loop` front end: lexing, parsing (with error recovery), the AST, the canonical
//! printer, diagnostics, and evaluation of `param` items.

pub mod ast;
pub mod diag;
pub mod lexer;
pub mod overrides;
pub mod params;
pub mod parser;
pub mod printer;
pub mod span;

pub use diag::{render, Diagnostic, SourceMap};
pub use params::{eval_params, Overrides, ParamEnv, Value};
pub use parser::parse;
pub use printer::print;
pub use span::Span;
