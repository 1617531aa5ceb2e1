//! Syntax tree of a `.loop` file. Every node carries the [`Span`] of the source text it came from;
//! parentheses are not kept as nodes (the printer re-derives them from precedence), but a
//! parenthesized expression's span includes its parentheses.

use super::span::Span;

/// A whole source file: its items in source order.
#[derive(Clone, Debug, PartialEq)]
pub struct File {
    pub items: Vec<Item>,
    pub span: Span,
}

/// A name as written (identifier token).
#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A string literal, already unescaped and split at `{name}` interpolations.
#[derive(Clone, Debug, PartialEq)]
pub struct StrLit {
    pub parts: Vec<StrPart>,
    pub span: Span,
}

/// One piece of a string literal.
#[derive(Clone, Debug, PartialEq)]
pub enum StrPart {
    /// Literal text (escapes resolved, `{{`/`}}` turned into single braces).
    Text(String),
    /// `{name}`: replaced by the value of `name` (e.g. a layer prefix or loop index).
    Interp(Ident),
}

impl StrLit {
    /// The text when the literal has no interpolation (`model`, `from` strings), else `None`.
    pub fn as_plain(&self) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                StrPart::Text(t) => out.push_str(t),
                StrPart::Interp(_) => return None,
            }
        }
        Some(out)
    }
}

/// A top-level declaration.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// `model "name"`.
    Model(Model),
    /// `param name = expr (from "config_key")?`.
    Param(Param),
    /// `layer name(args) { ... }`: a reusable sub-graph, called like a function.
    Layer(Layer),
    /// `forward(input) { ... }`: the model's entry point.
    Forward(Forward),
    /// `ignore "key", ...`: config keys the model knows and deliberately does not read.
    Ignore(Ignore),
    /// `require lhs (== | !=) rhs, "message"`: a check on the params once they are bound.
    Require(Require),
}

/// `ignore "key", ...`.
#[derive(Clone, Debug, PartialEq)]
pub struct Ignore {
    pub keys: Vec<StrLit>,
    pub span: Span,
}

/// `require lhs (== | !=) rhs, "message"`.
#[derive(Clone, Debug, PartialEq)]
pub struct Require {
    pub lhs: Expr,
    pub cmp: CmpOp,
    pub rhs: Expr,
    pub message: StrLit,
    pub span: Span,
}

impl Item {
    pub fn span(&self) -> Span {
        match self {
            Item::Model(m) => m.span,
            Item::Param(p) => p.span,
            Item::Layer(l) => l.span,
            Item::Forward(f) => f.span,
            Item::Ignore(i) => i.span,
            Item::Require(r) => r.span,
        }
    }
}

/// `model "name"`: the model's display name.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub name: StrLit,
    pub span: Span,
}

/// `param name = value from "key"`: a compile-time hyperparameter; `from` names the HF
/// config.json key that overrides the default.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: Ident,
    pub value: Expr,
    pub from: Option<StrLit>,
    pub span: Span,
}

/// `layer name(params) body`.
#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    pub name: Ident,
    pub params: Vec<Ident>,
    pub body: Block,
    pub span: Span,
}

/// `forward(input) body`.
#[derive(Clone, Debug, PartialEq)]
pub struct Forward {
    pub input: Ident,
    pub body: Block,
    pub span: Span,
}

/// `{ stmt* }`; the span covers both braces.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub stmts: Vec<Stmt>,
    pub span: Span,
}

/// A statement with its span (first token to last token).
#[derive(Clone, Debug, PartialEq)]
pub struct Stmt {
    pub kind: StmtKind,
    pub span: Span,
}

/// The statement forms.
#[derive(Clone, Debug, PartialEq)]
pub enum StmtKind {
    /// `weight name = "checkpoint.key" [d0, d1, ...]`: a checkpoint tensor of the given shape.
    Weight {
        name: Ident,
        key: StrLit,
        shape: Vec<Expr>,
    },
    /// `let a, b = value`: binds one name, or destructures a multi-result value (e.g. `split`).
    Let { names: Vec<Ident>, value: Expr },
    /// `name = value`: rebinds an existing name.
    Assign { name: Ident, value: Expr },
    /// `for var in start..end body`: unrolled loop over the half-open integer range.
    For {
        var: Ident,
        start: Expr,
        end: Expr,
        body: Block,
    },
    /// `recur steps [as t] body`: the recurrent-depth loop, run `steps` times; `t`, the
    /// iteration index, may appear in names (per-iteration weights).
    Recur {
        steps: Expr,
        var: Option<Ident>,
        body: Block,
    },
    /// `state name = init`: the loop-carried state of the enclosing `recur` and its initial value.
    State { name: Ident, init: Expr },
    /// `exit policy`: the recurrence's exit policy (e.g. `fixed`).
    Exit(Expr),
    /// `cache policy`: the KV-cache policy of the recurrence (e.g. `per_step`).
    Cache(Expr),
    /// `exit_gate expr`: the per-step exit-gate logit of a learned early exit.
    ExitGate(Expr),
    /// `router expr`: the routing logits of the enclosing `recur`, read from the state at the
    /// start of each iteration (MoR's routers).
    Router(Expr),
    /// `return value`: the result of the enclosing layer or forward.
    Return(Expr),
    /// `if lhs (== | !=) rhs { ... } else { ... }`: a build-time choice (e.g. the positional
    /// embedding of a family); without a comparison, a non-zero number is true.
    If {
        lhs: Expr,
        cmp: Option<(CmpOp, Expr)>,
        then: Block,
        els: Option<Block>,
    },
}

/// Comparison operators of `if`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
}

impl CmpOp {
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
        }
    }
}

/// An expression with its span.
#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

/// The expression forms.
#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    /// Integer literal (`50000`).
    Int(i64),
    /// Float literal (`1e-6`, `1.0`); always finite.
    Float(f64),
    /// String literal (possibly interpolated).
    Str(StrLit),
    /// A name: a param, a local, a weight, or a bare symbol like `interleaved`.
    Name(Ident),
    /// `-operand`.
    Neg(Box<Expr>),
    /// `lhs op rhs`.
    Binary {
        op: BinOp,
        op_span: Span,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    /// `callee(args)`: a builtin or a `layer`; only names can be called.
    Call { callee: Ident, args: Vec<Arg> },
    /// `base[index]`.
    Index { base: Box<Expr>, index: Box<Expr> },
    /// `[a, b, ...]`.
    List(Vec<Expr>),
    /// Stand-in for an expression that failed to parse; a diagnostic was already reported.
    Error,
}

/// A call argument: positional (`x`) or keyword (`std = 0.1`).
#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
    pub span: Span,
}

/// Binary operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    /// `%`: integer remainder (non-negative for a positive divisor), e.g. `require dim % heads == 0`.
    Rem,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
        }
    }

    /// Binding strength: higher binds tighter. All binary operators are left-associative.
    pub fn precedence(self) -> u8 {
        match self {
            BinOp::Add | BinOp::Sub => 1,
            BinOp::Mul | BinOp::Div | BinOp::Rem => 2,
        }
    }
}
