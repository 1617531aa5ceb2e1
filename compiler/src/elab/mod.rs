//! Elaboration: the AST with evaluated params becomes the graph IR. Layers are inlined at each
//! call, `for` loops are unrolled, `recur` becomes a `loop.recur` node whose body captures the
//! loop-invariant values it reads, and every new node is typed by the dialect's own `infer`, so
//! shape errors surface here with a span instead of in a later pass.
//!
//! Error codes (continuing the front end's table):
//! | code  | meaning |
//! |-------|---------|
//! | E0301 | shape or type mismatch in a tensor op |
//! | E0302 | unknown name |
//! | E0303 | bad arguments to a builtin or layer (count, kind, unknown keyword) |
//! | E0304 | invalid policy or policy parameter (`exit`, `cache`, state init, steps) |
//! | E0305 | misplaced statement (`state`/`exit` outside `recur`, `return` in `recur`, ...) |
//! | E0306 | a layer or forward without `return`, or with statements after it |
//! | E0307 | structural error in `recur` (no `state`, two states, nested `recur`, assignment to a loop-external value) |
//! | E0308 | a weight name declared twice with different shapes |
//! | E0309 | layer recursion too deep |
mod builtins;
mod value;

use crate::frontend::ast::{self, BinOp, Block, Expr, ExprKind, StmtKind, StrPart};
use crate::frontend::diag::{self, Diagnostic, SourceMap};
use crate::frontend::{ParamEnv, Span, Value};
use codespan_reporting::files::Files;
use loopc_dialects::ops::{Binary, CacheSpec, ExitSpec, FusedOp, StateInit, Unary};

/// The pointwise op of a DSL operator (`%` has none: it is integer-only).
fn binary_op(op: BinOp) -> Option<Binary> {
    match op {
        BinOp::Add => Some(Binary::Add),
        BinOp::Sub => Some(Binary::Sub),
        BinOp::Mul => Some(Binary::Mul),
        BinOp::Div => Some(Binary::Div),
        BinOp::Rem => None,
    }
}

const EXIT_HINT: &str = "expected `fixed`, `converge(threshold = ..., max = ...)`, a criterion (`latent_diff`, `cosine`, `kl`, `minp_kl`, `entropy_diff`, `argmax_stability`: `kl(threshold = 5e-4, min_steps = 1, every = 1, max = 32)`), `gate(q = 0.5)` or `act(eps = 0.01)`";
const EXIT_CALLS: &[&str] = &[
    "converge",
    "latent_diff",
    "cosine",
    "kl",
    "minp_kl",
    "entropy_diff",
    "argmax_stability",
    "gate",
    "act",
    "expert_choice",
    "token_choice",
];
const CACHE_HINT: &str =
    "expected `per_step`, `ring(c)`, `share_first`, `last_step` or `recursion_wise`";
use loopc_dialects::verify::infer;
use loopc_dialects::{graph::WeightDecl, Module, NodeId, Op, Region, Ty, WeightView};
use std::collections::HashMap;
pub use value::{InitVal, Val};

pub const SHAPE: &str = "E0301";
pub const UNKNOWN: &str = "E0302";
pub const BAD_ARGS: &str = "E0303";
pub const BAD_POLICY: &str = "E0304";
pub const MISPLACED: &str = "E0305";
pub const NO_RETURN: &str = "E0306";
pub const BAD_RECUR: &str = "E0307";
pub const WEIGHT_CLASH: &str = "E0308";
pub const TOO_DEEP: &str = "E0309";

struct RegionCtx {
    region: Region,
    /// (outer node, param node) for each loop-invariant value the body reads.
    captures: Vec<(NodeId, NodeId)>,
    weight_nodes: HashMap<WeightView, NodeId>,
}

struct Scope {
    vars: HashMap<String, Val>,
    depth: usize,
    /// A layer body: names of the caller are invisible past this scope.
    barrier: bool,
}

pub(crate) struct Elab<'a> {
    sm: &'a SourceMap,
    layers: HashMap<String, &'a ast::Layer>,
    globals: HashMap<String, Val>,
    regions: Vec<RegionCtx>,
    scopes: Vec<Scope>,
    weights: Vec<WeightDecl>,
    weight_ids: HashMap<String, (u32, Span)>,
    diags: Vec<Diagnostic>,
    next_site: u32,
    call_depth: usize,
}

/// Elaborate a parsed file. Returns the module only when no error was reported.
pub fn elaborate(
    sm: &SourceMap,
    file: &ast::File,
    env: &ParamEnv,
) -> (Option<Module>, Vec<Diagnostic>) {
    let mut e = Elab {
        sm,
        layers: HashMap::new(),
        globals: HashMap::new(),
        regions: vec![],
        scopes: vec![],
        weights: vec![],
        weight_ids: HashMap::new(),
        diags: vec![],
        next_site: 0,
        call_depth: 0,
    };
    let mut name = String::from("model");
    let mut forward = None;
    for (k, v) in env.iter() {
        e.globals.insert(
            k.to_string(),
            match v {
                Value::Int(i) => Val::Int(i),
                Value::Float(f) => Val::Float(f),
            },
        );
    }
    for item in &file.items {
        match item {
            ast::Item::Model(m) => name = m.name.as_plain().unwrap_or(name),
            ast::Item::Layer(l) => {
                if e.layers.insert(l.name.name.clone(), l).is_some() {
                    e.err(
                        BAD_ARGS,
                        l.name.span,
                        format!("layer `{}` is defined twice", l.name.name),
                        "second definition",
                    );
                }
            }
            ast::Item::Forward(f) => {
                if forward.is_some() {
                    e.err(
                        MISPLACED,
                        f.span,
                        "a file has one `forward`".into(),
                        "second `forward`",
                    );
                }
                forward = Some(f);
            }
            ast::Item::Param(_) | ast::Item::Ignore(_) | ast::Item::Require(_) => {}
        }
    }
    let Some(fwd) = forward else {
        e.diags.push(
            diag::error(NO_RETURN, "the file has no `forward(tokens) { ... }` block").with_notes(
                vec!["help: the model's entry point reads token ids and returns logits".into()],
            ),
        );
        return (None, e.diags);
    };
    e.regions.push(RegionCtx {
        region: Region::default(),
        captures: vec![],
        weight_nodes: HashMap::new(),
    });
    let tokens = e.regions[0].region.add(Op::Tokens, Ty::Tokens, &[]);
    let mut vars = HashMap::new();
    vars.insert(
        fwd.input.name.clone(),
        Val::Tensor {
            depth: 0,
            node: tokens,
        },
    );
    e.scopes.push(Scope {
        vars,
        depth: 0,
        barrier: true,
    });
    let result = e.block(&fwd.body);
    e.scopes.pop();
    let mut ctx = e.regions.pop().expect("forward region");
    match result {
        Some((v, span)) => {
            if let Some(n) = e.tensor_in(&mut ctx, &v, span, "the forward result") {
                if ctx.region.ty(n).cols().is_none() {
                    e.err(
                        SHAPE,
                        span,
                        "forward must return logits [S, vocab]".into(),
                        "not an activation",
                    );
                }
                ctx.region.results.push(n);
            }
        }
        None => e.err(
            NO_RETURN,
            fwd.span,
            "`forward` has no `return`".into(),
            "add `return <logits>` at the end",
        ),
    }
    if diag::has_errors(&e.diags) {
        return (None, e.diags);
    }
    let mut params: Vec<(String, f64)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_f64()))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let mut module = Module {
        name,
        weights: e.weights,
        params,
        forward: ctx.region,
    };
    module.forward.compact();
    (Some(module), e.diags)
}

impl<'a> Elab<'a> {
    pub(crate) fn err(&mut self, code: &str, span: Span, msg: String, label: &str) {
        self.diags
            .push(diag::error(code, msg).with_labels(vec![diag::primary(span, label)]));
    }

    fn depth(&self) -> usize {
        self.regions.len() - 1
    }

    fn origin(&self, span: Span) -> String {
        let name = self.sm.name(span.file).unwrap_or("?").to_string();
        match self.sm.files().location(span.file, span.start as usize) {
            Ok(loc) => format!("{name}:{}:{}", loc.line_number, loc.column_number),
            Err(_) => name,
        }
    }

    fn lookup(&self, name: &str) -> Option<Val> {
        for s in self.scopes.iter().rev() {
            if let Some(v) = s.vars.get(name) {
                return Some(v.clone());
            }
            if s.barrier {
                break;
            }
        }
        self.globals.get(name).cloned()
    }

    /// Rebind an existing name where it was defined. Only names of the current region may change
    /// inside a `recur`: the body cannot write a value that outlives one iteration except the state.
    fn assign(&mut self, name: &ast::Ident, v: Val) {
        let cur = self.depth();
        for i in (0..self.scopes.len()).rev() {
            if self.scopes[i].vars.contains_key(&name.name) {
                if self.scopes[i].depth < cur {
                    self.err(
                        BAD_RECUR,
                        name.span,
                        format!("cannot assign `{}` inside `recur`: it is defined outside the loop", name.name),
                        "only the `state` (or names defined inside the loop) can change per iteration",
                    );
                    return;
                }
                self.scopes[i].vars.insert(name.name.clone(), v);
                return;
            }
            if self.scopes[i].barrier {
                break;
            }
        }
        let msg = if self.globals.contains_key(&name.name) {
            format!("`{}` is a param and cannot be assigned", name.name)
        } else {
            format!(
                "cannot assign `{}`: no such local (use `let` to define it)",
                name.name
            )
        };
        self.err(UNKNOWN, name.span, msg, "assigned here");
    }

    fn define(&mut self, name: &str, v: Val) {
        self.scopes
            .last_mut()
            .expect("a scope")
            .vars
            .insert(name.to_string(), v);
    }

    /// Run a block; returns the `return` value (and its span) if the block returns.
    fn block(&mut self, b: &Block) -> Option<(Val, Span)> {
        let mut ret = None;
        for st in &b.stmts {
            if ret.is_some() {
                self.err(
                    NO_RETURN,
                    st.span,
                    "statement after `return`".into(),
                    "unreachable",
                );
                break;
            }
            ret = self.stmt(st);
        }
        ret
    }

    fn stmt(&mut self, st: &ast::Stmt) -> Option<(Val, Span)> {
        match &st.kind {
            StmtKind::Weight { name, key, shape } => {
                let v = self.weight(key, shape, st.span);
                self.define(&name.name, v);
            }
            StmtKind::Let { names, value } => {
                let v = self.eval(value);
                if names.len() == 1 {
                    self.define(&names[0].name, v);
                } else {
                    match v {
                        Val::List(items) if items.len() == names.len() => {
                            for (n, it) in names.iter().zip(items) {
                                self.define(&n.name, it);
                            }
                        }
                        Val::Error => {
                            for n in names {
                                self.define(&n.name, Val::Error);
                            }
                        }
                        other => {
                            let got = match &other {
                                Val::List(items) => format!("{} values", items.len()),
                                v => v.describe().to_string(),
                            };
                            self.err(
                                BAD_ARGS,
                                value.span,
                                format!("cannot unpack {got} into {} names", names.len()),
                                "this value",
                            );
                            for n in names {
                                self.define(&n.name, Val::Error);
                            }
                        }
                    }
                }
            }
            StmtKind::Assign { name, value } => {
                let v = self.eval(value);
                self.assign(name, v);
            }
            StmtKind::For {
                var,
                start,
                end,
                body,
            } => {
                let (a, b) = (self.eval(start), self.eval(end));
                let (Val::Int(a), Val::Int(b)) = (a.clone(), b.clone()) else {
                    if a != Val::Error && b != Val::Error {
                        self.err(
                            BAD_ARGS,
                            start.span.to(end.span),
                            "a `for` range needs integer bounds".into(),
                            "not integers",
                        );
                    }
                    return None;
                };
                for i in a..b {
                    let d = self.depth();
                    self.scopes.push(Scope {
                        vars: HashMap::from([(var.name.clone(), Val::Int(i))]),
                        depth: d,
                        barrier: false,
                    });
                    let r = self.block(body);
                    self.scopes.pop();
                    if let Some((_, span)) = r {
                        self.err(
                            MISPLACED,
                            span,
                            "`return` inside a `for` loop".into(),
                            "return after the loop instead",
                        );
                    }
                }
            }
            StmtKind::Recur { steps, var, body } => self.recur(steps, var.as_ref(), body, st.span),
            StmtKind::State { .. }
            | StmtKind::Exit(_)
            | StmtKind::Cache(_)
            | StmtKind::ExitGate(_)
            | StmtKind::Router(_) => {
                self.err(
                    MISPLACED,
                    st.span,
                    "this statement belongs directly inside a `recur` block".into(),
                    "outside `recur`",
                );
            }
            StmtKind::Return(e) => {
                let v = self.eval(e);
                return Some((v, e.span));
            }
            StmtKind::If { .. } => {
                let branch = self.branch_of(st)?;
                if let Some(b) = branch {
                    // Names a branch defines stay visible after it, like the statements of a layer:
                    // the branch is spliced into the enclosing block.
                    for st in &b.stmts {
                        if let Some(r) = self.stmt(st) {
                            return Some(r);
                        }
                    }
                }
            }
        }
        None
    }

    /// The branch an `if` statement takes (`Some(None)`: no branch); `None` after an error.
    fn branch_of<'b>(&mut self, st: &'b ast::Stmt) -> Option<Option<&'b Block>> {
        let StmtKind::If {
            lhs,
            cmp,
            then,
            els,
        } = &st.kind
        else {
            return Some(None);
        };
        let a = self.eval(lhs);
        let truth = match (cmp, &a) {
            (_, Val::Error) => return None,
            (None, v) if v.num().is_some() => v.num() != Some(0.0),
            (Some((op, rhs)), _) => {
                let b = self.eval(rhs);
                let eq = match (&a, &b) {
                    (_, Val::Error) => return None,
                    (x, y) if x.num().is_some() && y.num().is_some() => x.num() == y.num(),
                    (Val::Str(x), Val::Str(y)) | (Val::Sym(x), Val::Sym(y)) => x == y,
                    (x, y) => {
                        self.err(
                            BAD_ARGS,
                            st.span,
                            format!("cannot compare {} with {}", x.describe(), y.describe()),
                            "condition",
                        );
                        return None;
                    }
                };
                if *op == ast::CmpOp::Eq {
                    eq
                } else {
                    !eq
                }
            }
            (None, v) => {
                self.err(
                    BAD_ARGS,
                    lhs.span,
                    format!(
                        "an `if` condition must be a number or a comparison, got {}",
                        show(v)
                    ),
                    "condition",
                );
                return None;
            }
        };
        Some(if truth { Some(then) } else { els.as_ref() })
    }

    /// The statements of a `recur` body with its build-time `if`s resolved (a branch is
    /// spliced into the block), so `exit`, `cache` and `router` may depend on parameters.
    fn flatten<'b>(&mut self, stmts: &'b [ast::Stmt], out: &mut Vec<&'b ast::Stmt>) {
        for st in stmts {
            if matches!(st.kind, StmtKind::If { .. }) {
                if let Some(Some(b)) = self.branch_of(st) {
                    self.flatten(&b.stmts, out);
                }
            } else {
                out.push(st);
            }
        }
    }

    fn weight(&mut self, key: &ast::StrLit, shape: &[Expr], span: Span) -> Val {
        let name = match self.interp_val(key) {
            Some(Val::Str(n)) => n,
            Some(Val::PerIter(names)) => {
                // One checkpoint tensor per iteration; the body reads them through `w.per_iter`.
                let mut views = vec![];
                for n in names {
                    let Val::Str(n) = n else { return Val::Error };
                    match self.weight_named(n, shape, span) {
                        Val::Error => return Val::Error,
                        v => views.push(v),
                    }
                }
                return Val::PerIter(views);
            }
            _ => return Val::Error,
        };
        self.weight_named(name, shape, span)
    }

    fn weight_named(&mut self, name: String, shape: &[Expr], span: Span) -> Val {
        let mut dims = vec![];
        for d in shape {
            match self.eval(d) {
                Val::Int(i) if i > 0 => dims.push(i as usize),
                Val::Error => return Val::Error,
                other => {
                    self.err(
                        SHAPE,
                        d.span,
                        format!(
                            "a weight dimension must be a positive integer, got {}",
                            show(&other)
                        ),
                        "here",
                    );
                    return Val::Error;
                }
            }
        }
        let id = match self.weight_ids.get(&name) {
            Some(&(id, first)) => {
                if self.weights[id as usize].shape != dims {
                    self.diags.push(
                        diag::error(
                            WEIGHT_CLASH,
                            format!("weight `{name}` is declared with two shapes"),
                        )
                        .with_labels(vec![
                            diag::primary(span, format!("declared here as {:?}", dims)),
                            diag::secondary(
                                first,
                                format!("and here as {:?}", self.weights[id as usize].shape),
                            ),
                        ]),
                    );
                    return Val::Error;
                }
                id
            }
            None => {
                let id = self.weights.len() as u32;
                self.weights.push(WeightDecl {
                    name: name.clone(),
                    shape: dims.clone(),
                    origin: self.origin(span),
                });
                self.weight_ids.insert(name, (id, span));
                id
            }
        };
        Val::Weight(WeightView {
            weight: id,
            offset: 0,
            shape: dims,
        })
    }

    /// A string literal with its `{name}`s filled in: a string, or one string per iteration
    /// when a name depends on the iteration of the enclosing `recur`.
    fn interp_val(&mut self, s: &ast::StrLit) -> Option<Val> {
        let mut vals = vec![];
        for p in &s.parts {
            if let StrPart::Interp(id) = p {
                if let Some(v) = self.lookup(&id.name) {
                    vals.push(v);
                }
            }
        }
        let Some(n) = per_iter_len(&vals.iter().collect::<Vec<_>>()) else {
            return self.interp_at(s, None).map(Val::Str);
        };
        let mut out = Vec::with_capacity(n);
        for t in 0..n {
            out.push(Val::Str(self.interp_at(s, Some(t))?));
        }
        Some(if out.iter().all(|v| *v == out[0]) {
            out.swap_remove(0)
        } else {
            Val::PerIter(out)
        })
    }

    fn interp_at(&mut self, s: &ast::StrLit, t: Option<usize>) -> Option<String> {
        let mut out = String::new();
        for p in &s.parts {
            match p {
                StrPart::Text(t) => out.push_str(t),
                StrPart::Interp(id) => match self.lookup(&id.name).map(|v| match t {
                    Some(t) => at_iter(&v, t),
                    None => v,
                }) {
                    Some(Val::Int(i)) => out.push_str(&i.to_string()),
                    Some(Val::Str(t)) => out.push_str(&t),
                    Some(Val::Error) => return None,
                    Some(other) => {
                        self.err(
                            BAD_ARGS,
                            id.span,
                            format!("cannot put {} into a string", other.describe()),
                            "here",
                        );
                        return None;
                    }
                    None => {
                        self.unknown(id);
                        return None;
                    }
                },
            }
        }
        Some(out)
    }

    /// The name of a bare identifier that is not bound to a value: a policy or style symbol.
    pub(crate) fn symbol_of(&self, e: &Expr) -> Option<String> {
        match &e.kind {
            ExprKind::Name(id) if self.lookup(&id.name).is_none() => Some(id.name.clone()),
            _ => None,
        }
    }

    fn unknown(&mut self, id: &ast::Ident) {
        let mut names: Vec<String> = self.globals.keys().cloned().collect();
        for s in self.scopes.iter().rev() {
            names.extend(s.vars.keys().cloned());
            if s.barrier {
                break;
            }
        }
        names.extend(self.layers.keys().cloned());
        names.extend(builtins::NAMES.iter().map(|s| s.to_string()));
        let best = names
            .iter()
            .map(|n| (strsim_distance(n, &id.name), n))
            .filter(|(d, _)| *d <= 2)
            .min();
        let mut d = diag::error(UNKNOWN, format!("unknown name `{}`", id.name))
            .with_labels(vec![diag::primary(id.span, "not defined here")]);
        if let Some((_, n)) = best {
            d = d.with_notes(vec![format!("help: did you mean `{n}`?")]);
        }
        self.diags.push(d);
    }

    pub(crate) fn eval(&mut self, e: &Expr) -> Val {
        match &e.kind {
            ExprKind::Int(i) => Val::Int(*i),
            ExprKind::Float(f) => Val::Float(*f),
            ExprKind::Str(s) => self.interp_val(s).unwrap_or(Val::Error),
            ExprKind::Name(id) => match self.lookup(&id.name) {
                Some(v) => v,
                None if builtins::SYMBOLS.contains(&id.name.as_str()) => Val::Sym(id.name.clone()),
                None => {
                    self.unknown(id);
                    Val::Error
                }
            },
            ExprKind::Neg(x) => match self.eval(x) {
                Val::Int(i) => Val::Int(-i),
                Val::Float(f) => Val::Float(-f),
                Val::Error => Val::Error,
                v @ (Val::Tensor { .. } | Val::Weight(_)) => self.unary(Unary::Neg, v, e.span),
                other => {
                    self.err(
                        BAD_ARGS,
                        e.span,
                        format!("cannot negate {}", other.describe()),
                        "here",
                    );
                    Val::Error
                }
            },
            ExprKind::Binary {
                op,
                op_span,
                lhs,
                rhs,
            } => {
                let (a, b) = (self.eval(lhs), self.eval(rhs));
                self.binary(*op, a, b, *op_span, e.span)
            }
            ExprKind::Call { callee, args } => self.call(callee, args, e.span),
            ExprKind::Index { base, index } => {
                let (b, i) = (self.eval(base), self.eval(index));
                if let Val::PerIter(items) = &b {
                    let items = items.clone();
                    return Val::PerIter(
                        items
                            .into_iter()
                            .map(|w| self.index_val(w, i.clone(), index.span, e.span))
                            .collect(),
                    );
                }
                self.index_val(b, i, index.span, e.span)
            }
            ExprKind::List(items) => Val::List(items.iter().map(|x| self.eval(x)).collect()),
            ExprKind::Error => Val::Error,
        }
    }

    fn index_val(&mut self, b: Val, i: Val, ispan: Span, espan: Span) -> Val {
        {
            {
                match (b, i) {
                    (Val::Error, _) | (_, Val::Error) => Val::Error,
                    (Val::List(items), Val::Int(i)) => match items
                        .get(i as usize)
                        .filter(|_| i >= 0)
                    {
                        Some(v) => v.clone(),
                        None => {
                            self.err(
                                SHAPE,
                                ispan,
                                format!("index {i} is out of range for a list of {}", items.len()),
                                "here",
                            );
                            Val::Error
                        }
                    },
                    (Val::Weight(w), Val::Int(i)) => {
                        if w.shape.is_empty() || i < 0 || i as usize >= w.shape[0] {
                            self.err(
                                SHAPE,
                                ispan,
                                format!(
                                    "index {i} is out of range for a weight of shape {:?}",
                                    w.shape
                                ),
                                "here",
                            );
                            return Val::Error;
                        }
                        let inner: usize = w.shape[1..].iter().product();
                        Val::Weight(WeightView {
                            weight: w.weight,
                            offset: w.offset + i as usize * inner,
                            shape: w.shape[1..].to_vec(),
                        })
                    }
                    (b, i) => {
                        self.err(
                            BAD_ARGS,
                            espan,
                            format!("cannot index {} with {}", b.describe(), i.describe()),
                            "here",
                        );
                        Val::Error
                    }
                }
            }
        }
    }

    fn binary(&mut self, op: BinOp, a: Val, b: Val, op_span: Span, span: Span) -> Val {
        use Val::*;
        // A per-iteration weight in tensor arithmetic is one `w.per_iter` node.
        let as_tensor = |e: &mut Self, v: Val| match &v {
            PerIter(items) if items.iter().any(|x| matches!(x, Weight(_))) => {
                match e.tensor(&v, span, "an operand") {
                    Some(node) => Tensor {
                        depth: e.depth(),
                        node,
                    },
                    None => Error,
                }
            }
            _ => v,
        };
        let (a, b) = (as_tensor(self, a), as_tensor(self, b));
        if let Some(n) = per_iter_len(&[&a, &b]) {
            // Arithmetic on the iteration index (or on values computed from it) is done per
            // iteration: names such as "layers.{1 + t}" are then per-iteration names.
            let mut out = Vec::with_capacity(n);
            for t in 0..n {
                let (x, y) = (at_iter(&a, t), at_iter(&b, t));
                if !matches!(x, Int(_) | Float(_) | Error)
                    || !matches!(y, Int(_) | Float(_) | Error)
                {
                    self.err(
                        BAD_ARGS,
                        op_span,
                        "the iteration index can only be used in integer arithmetic and names"
                            .into(),
                        "here",
                    );
                    return Error;
                }
                out.push(self.binary(op, x, y, op_span, span));
            }
            return PerIter(out);
        }
        match (&a, &b) {
            (Error, _) | (_, Error) => Error,
            (Int(x), Int(y)) => {
                let r = match op {
                    BinOp::Add => x.checked_add(*y),
                    BinOp::Sub => x.checked_sub(*y),
                    BinOp::Mul => x.checked_mul(*y),
                    BinOp::Div => {
                        if *y == 0 {
                            self.err(SHAPE, span, "division by zero".into(), "here");
                            return Error;
                        }
                        if x % y != 0 {
                            self.err(
                                SHAPE,
                                span,
                                format!("{x} / {y} does not divide exactly"),
                                "integer division must be exact",
                            );
                            return Error;
                        }
                        Some(x / y)
                    }
                    BinOp::Rem => {
                        if *y == 0 {
                            self.err(SHAPE, span, "remainder by zero".into(), "here");
                            return Error;
                        }
                        Some(x.rem_euclid(*y))
                    }
                };
                r.map(Int).unwrap_or_else(|| {
                    self.err(SHAPE, span, "integer overflow".into(), "here");
                    Error
                })
            }
            (x, y) if x.num().is_some() && y.num().is_some() => {
                let (x, y) = (x.num().unwrap(), y.num().unwrap());
                Float(match op {
                    BinOp::Add => x + y,
                    BinOp::Sub => x - y,
                    BinOp::Mul => x * y,
                    BinOp::Div => x / y,
                    BinOp::Rem => x % y,
                })
            }
            (Tensor { .. } | Weight(_), Tensor { .. } | Weight(_))
            | (Tensor { .. } | Weight(_), Int(_) | Float(_))
            | (Int(_) | Float(_), Tensor { .. } | Weight(_))
                if (self.is_weight(&a) || a.num().is_some())
                    && (self.is_weight(&b) || b.num().is_some()) =>
            {
                self.weight_binary(op, a, b, op_span, span)
            }
            (Tensor { .. } | Weight(_), Tensor { .. } | Weight(_)) => {
                let Some(bop) = binary_op(op) else {
                    return self.rem_of_tensors(op_span);
                };
                self.op(Op::Binary(bop), &[(a, span), (b, span)], op_span)
            }
            (Tensor { .. }, n) | (n, Tensor { .. })
                if n.num().is_some() && matches!(op, BinOp::Mul) =>
            {
                let t = if matches!(a, Tensor { .. }) {
                    a.clone()
                } else {
                    b.clone()
                };
                self.op(Op::Scale(n.num().unwrap() as f32), &[(t, span)], op_span)
            }
            (Tensor { .. }, n) if n.num().is_some() && matches!(op, BinOp::Div) => self.op(
                Op::Scale((1.0 / n.num().unwrap()) as f32),
                &[(a.clone(), span)],
                op_span,
            ),
            _ => {
                self.err(
                    BAD_ARGS,
                    op_span,
                    format!(
                        "cannot apply `{}` to {} and {}",
                        op.symbol(),
                        a.describe(),
                        b.describe()
                    ),
                    "this operator",
                );
                Error
            }
        }
    }

    pub(crate) fn unary(&mut self, u: Unary, v: Val, span: Span) -> Val {
        if self.is_weight(&v) {
            let body = vec![FusedOp::Arg(0), FusedOp::Unary(u, 0)];
            return self.op(Op::WMap { body }, &[(v, span)], span);
        }
        self.op(Op::Unary(u), &[(v, span)], span)
    }

    /// Arithmetic whose operands are weights and numbers: a weight derived once at load.
    fn weight_binary(&mut self, op: BinOp, a: Val, b: Val, op_span: Span, span: Span) -> Val {
        let Some(bop) = binary_op(op) else {
            return self.rem_of_tensors(op_span);
        };
        match (a.num(), b.num()) {
            (None, Some(k)) if matches!(op, BinOp::Mul | BinOp::Div) => {
                let by = if op == BinOp::Mul { k } else { 1.0 / k };
                return self.op(Op::WScale(by as f32), &[(a, span)], op_span);
            }
            (Some(k), None) if op == BinOp::Mul => {
                return self.op(Op::WScale(k as f32), &[(b, span)], op_span);
            }
            _ => {}
        }
        let mut body = vec![];
        let mut args = vec![];
        for v in [a, b] {
            match v.num() {
                Some(k) => body.push(FusedOp::Const(k as f32)),
                None => {
                    body.push(FusedOp::Arg(args.len() as u32));
                    args.push((v, span));
                }
            }
        }
        body.push(FusedOp::Binary(bop, 0, 1));
        self.op(Op::WMap { body }, &args, op_span)
    }

    fn rem_of_tensors(&mut self, op_span: Span) -> Val {
        self.err(
            BAD_ARGS,
            op_span,
            "`%` applies to integers only".into(),
            "this operator",
        );
        Val::Error
    }

    /// Materialize a value as a node of the current region (capturing outer tensors).
    pub(crate) fn tensor(&mut self, v: &Val, span: Span, what: &str) -> Option<NodeId> {
        let mut ctx = self.regions.pop().expect("a region");
        let r = self.tensor_in(&mut ctx, v, span, what);
        self.regions.push(ctx);
        r
    }

    fn tensor_in(
        &mut self,
        ctx: &mut RegionCtx,
        v: &Val,
        span: Span,
        what: &str,
    ) -> Option<NodeId> {
        let cur = self.regions.len();
        match v {
            Val::Tensor { depth, node } if *depth == cur => Some(*node),
            Val::Tensor { depth, node }
                if *depth + 1 == cur
                    && matches!(self.regions[*depth].region.ty(*node), Ty::Weight(_)) =>
            {
                // A derived weight is computed once at load wherever it sits: the body gets
                // its own copy instead of a capture.
                Some(self.clone_weight(ctx, *depth, *node))
            }
            Val::Tensor { depth, node } if *depth + 1 == cur => {
                if let Some(&(_, p)) = ctx.captures.iter().find(|(o, _)| o == node) {
                    return Some(p);
                }
                let ty = self.regions[*depth].region.ty(*node).clone();
                let i = ctx.region.params.len() as u32;
                ctx.region.params.push(ty.clone());
                let p = ctx.region.add(Op::Param(i), ty, &[]);
                ctx.captures.push((*node, p));
                Some(p)
            }
            Val::Tensor { .. } => {
                self.err(
                    BAD_RECUR,
                    span,
                    "nested `recur` blocks are not supported".into(),
                    "value from two loops out",
                );
                None
            }
            Val::Weight(w) => {
                if let Some(&n) = ctx.weight_nodes.get(w) {
                    return Some(n);
                }
                let n = ctx
                    .region
                    .add(Op::Weight(w.clone()), Ty::Weight(w.shape.clone()), &[]);
                ctx.weight_nodes.insert(w.clone(), n);
                Some(n)
            }
            Val::PerIter(items) if items.iter().all(|v| matches!(v, Val::Weight(_))) => {
                let mut nodes = vec![];
                for v in items.clone() {
                    nodes.push(self.tensor_in(ctx, &v, span, what)?);
                }
                let ty = ctx.region.ty(nodes[0]).clone();
                match infer(&Op::WPerIter, &vec![ty.clone(); nodes.len()], &[]) {
                    Ok(ty) => Some(ctx.region.add(Op::WPerIter, ty, &nodes)),
                    Err(msg) => {
                        self.err(SHAPE, span, msg, "per-iteration weight");
                        None
                    }
                }
            }
            Val::Error => None,
            other => {
                self.err(
                    BAD_ARGS,
                    span,
                    format!("{what} must be a tensor, got {}", show(other)),
                    "here",
                );
                None
            }
        }
    }

    /// Copy the weight-typed node `n` of region `depth` (and the derived weights it reads) into
    /// `ctx`'s region.
    fn clone_weight(&self, ctx: &mut RegionCtx, depth: usize, n: NodeId) -> NodeId {
        let outer = &self.regions[depth].region;
        let node = outer.node(n);
        if let Op::Weight(w) = &node.op {
            if let Some(&m) = ctx.weight_nodes.get(w) {
                return m;
            }
            let m = ctx.region.add(node.op.clone(), node.ty.clone(), &[]);
            ctx.weight_nodes.insert(w.clone(), m);
            return m;
        }
        let ops: Vec<NodeId> = outer
            .operands(n)
            .into_iter()
            .map(|o| self.clone_weight(ctx, depth, o))
            .collect();
        ctx.region.add(node.op.clone(), node.ty.clone(), &ops)
    }

    /// Whether `v` is a weight: a checkpoint tensor or a derived weight node.
    fn is_weight(&self, v: &Val) -> bool {
        match v {
            Val::Weight(_) => true,
            Val::Tensor { depth, node } => self
                .regions
                .get(*depth)
                .is_some_and(|r| matches!(r.region.ty(*node), Ty::Weight(_))),
            _ => false,
        }
    }

    /// Add a typed node; shape errors become diagnostics at `span`.
    pub(crate) fn op(&mut self, op: Op, args: &[(Val, Span)], span: Span) -> Val {
        let mut nodes = vec![];
        for (i, (v, s)) in args.iter().enumerate() {
            match self.tensor(v, *s, &format!("operand {} of `{}`", i + 1, op.mnemonic())) {
                Some(n) => nodes.push(n),
                None => return Val::Error,
            }
        }
        let d = self.depth();
        let ctx = self.regions.last_mut().expect("a region");
        let tys: Vec<Ty> = nodes.iter().map(|&n| ctx.region.ty(n).clone()).collect();
        match infer(&op, &tys, &ctx.region.params) {
            Ok(ty) => {
                let n = ctx.region.add(op, ty, &nodes);
                Val::Tensor { depth: d, node: n }
            }
            Err(msg) => {
                let shapes: Vec<String> = tys.iter().map(|t| t.to_string()).collect();
                self.diags.push(
                    diag::error(SHAPE, format!("shape mismatch: {msg}")).with_labels(vec![
                        diag::primary(span, format!("operands: {}", shapes.join(", "))),
                    ]),
                );
                Val::Error
            }
        }
    }

    pub(crate) fn new_site(&mut self) -> u32 {
        self.next_site += 1;
        self.next_site - 1
    }

    fn recur(&mut self, steps: &Expr, var: Option<&ast::Ident>, body: &Block, span: Span) {
        let steps_v = self.eval(steps);
        let steps_n = match steps_v {
            Val::Int(n) if n >= 1 => n as usize,
            Val::Error => 1,
            other => {
                self.err(
                    BAD_POLICY,
                    steps.span,
                    format!("`recur` needs a step count ≥ 1, got {}", show(&other)),
                    "steps",
                );
                1
            }
        };
        if self.depth() > 0 {
            self.err(
                BAD_RECUR,
                span,
                "nested `recur` blocks are not supported".into(),
                "inner loop",
            );
            return;
        }
        let mut flat = vec![];
        self.flatten(&body.stmts, &mut flat);
        let states: Vec<_> = flat
            .iter()
            .copied()
            .filter(|s| matches!(s.kind, StmtKind::State { .. }))
            .collect();
        let Some(state_stmt) = states.first() else {
            self.err(
                BAD_RECUR,
                span,
                "`recur` has no `state`".into(),
                "add `state s = <init>` to name the loop-carried value",
            );
            return;
        };
        for extra in &states[1..] {
            self.err(
                BAD_RECUR,
                extra.span,
                "`recur` has more than one `state`".into(),
                "second state",
            );
        }
        let StmtKind::State { name: sname, init } = &state_stmt.kind else {
            unreachable!()
        };
        let init_v = self.eval(init);
        let iv = match init_v {
            Val::Tensor { depth, node } => InitVal {
                init: StateInit::Operand,
                like: Some((depth, node)),
            },
            Val::Init(iv) => iv,
            Val::Error => return,
            other => {
                self.err(
                    BAD_POLICY,
                    init.span,
                    format!("a state starts from a tensor, `zeros(like)` or `trunc_normal(like, std = ...)`, got {}", show(&other)),
                    "initial state",
                );
                return;
            }
        };
        let Some((like_depth, like)) = iv.like else {
            return;
        };
        let state_ty = self.regions[like_depth].region.ty(like).clone();
        if state_ty.cols().is_none() {
            self.err(
                SHAPE,
                init.span,
                format!("the state must be an activation, got {state_ty}"),
                "initial state",
            );
            return;
        }
        let mut exit = ExitSpec::Fixed;
        let mut exit_span = None;
        let mut cache = CacheSpec::PerStep;
        for st in flat.iter().copied() {
            match &st.kind {
                StmtKind::Exit(e) if self.symbol_of(e).is_some() => {
                    let name = self.symbol_of(e).unwrap();
                    if name != "fixed" {
                        self.err(
                            BAD_POLICY,
                            e.span,
                            format!("unknown exit policy `{name}`"),
                            EXIT_HINT,
                        );
                    }
                }
                StmtKind::Cache(e) if self.symbol_of(e).is_some() => {
                    let name = self.symbol_of(e).unwrap();
                    match name.as_str() {
                        "per_step" => cache = CacheSpec::PerStep,
                        "share_first" => cache = CacheSpec::ShareFirst,
                        "last_step" => cache = CacheSpec::LastStep,
                        "recursion_wise" => cache = CacheSpec::RecursionWise,
                        _ => self.err(
                            BAD_POLICY,
                            e.span,
                            format!("unknown cache policy `{name}`"),
                            CACHE_HINT,
                        ),
                    }
                }
                StmtKind::Exit(Expr {
                    kind: ExprKind::Call { callee, .. },
                    span,
                    ..
                }) if !EXIT_CALLS.contains(&callee.name.as_str()) => {
                    let near = EXIT_CALLS
                        .iter()
                        .min_by_key(|n| strsim_distance(n, &callee.name))
                        .filter(|n| strsim_distance(n, &callee.name) <= 3);
                    let label = match near {
                        Some(n) => format!("did you mean `{n}`?"),
                        None => EXIT_HINT.to_string(),
                    };
                    self.err(
                        BAD_POLICY,
                        *span,
                        format!("unknown exit policy `{}`", callee.name),
                        &label,
                    );
                }
                StmtKind::Exit(e) => match self.eval(e) {
                    Val::Sym(s) if s == "fixed" => exit = ExitSpec::Fixed,
                    Val::Exit(x) => {
                        exit = x;
                        exit_span = Some(e.span);
                    }
                    Val::Error => {}
                    other => self.err(
                        BAD_POLICY,
                        e.span,
                        format!("unknown exit policy {}", show(&other)),
                        EXIT_HINT,
                    ),
                },
                StmtKind::Cache(e) => match self.eval(e) {
                    Val::Sym(s) if s == "per_step" => cache = CacheSpec::PerStep,
                    Val::Cache(c) => cache = c,
                    Val::Error => {}
                    other => self.err(
                        BAD_POLICY,
                        e.span,
                        format!("unknown cache policy {}", show(&other)),
                        CACHE_HINT,
                    ),
                },
                _ => {}
            }
        }
        let mut region = Region {
            params: vec![state_ty.clone()],
            ..Default::default()
        };
        let p0 = region.add(Op::Param(0), state_ty, &[]);
        self.regions.push(RegionCtx {
            region,
            captures: vec![],
            weight_nodes: HashMap::new(),
        });
        let mut vars = HashMap::from([(sname.name.clone(), Val::Tensor { depth: 1, node: p0 })]);
        if let Some(v) = var {
            let iters = (0..steps_n as i64).map(Val::Int).collect();
            vars.insert(v.name.clone(), Val::PerIter(iters));
        }
        self.scopes.push(Scope {
            vars,
            depth: 1,
            barrier: false,
        });
        let mut gate = None;
        let mut router = None;
        for st in flat.iter().copied() {
            match &st.kind {
                StmtKind::State { .. } | StmtKind::Exit(_) | StmtKind::Cache(_) => {}
                StmtKind::ExitGate(e) => {
                    if gate.is_some() {
                        self.err(
                            BAD_RECUR,
                            st.span,
                            "`recur` has two `exit_gate`s".into(),
                            "second gate",
                        );
                    }
                    let v = self.eval(e);
                    gate = Some((v, e.span));
                }
                StmtKind::Router(e) => {
                    if router.is_some() {
                        self.err(
                            BAD_RECUR,
                            st.span,
                            "`recur` has two `router`s".into(),
                            "second router",
                        );
                    }
                    let v = self.eval(e);
                    router = Some((v, e.span));
                }
                StmtKind::Return(_) => self.err(
                    MISPLACED,
                    st.span,
                    "`return` inside `recur`".into(),
                    "return after the loop",
                ),
                _ => {
                    self.stmt(st);
                }
            }
        }
        let next_v = self
            .scopes
            .last()
            .and_then(|s| s.vars.get(&sname.name).cloned())
            .unwrap_or(Val::Error);
        let next = self.tensor(&next_v, sname.span, "the next state");
        let gate_n = match &gate {
            Some((v, s)) => {
                let n = self.tensor(v, *s, "the exit gate");
                if let Some(n) = n {
                    let ty = self.regions.last().unwrap().region.ty(n).clone();
                    if ty != Ty::Act(1) {
                        self.err(
                            SHAPE,
                            *s,
                            format!("the exit gate must be one logit per token [S, 1], got {ty}"),
                            "gate",
                        );
                    }
                }
                n
            }
            None => None,
        };
        let router_n = match &router {
            Some((v, s)) => {
                let n = self.tensor(v, *s, "the router");
                if let Some(n) = n {
                    let ty = self.regions.last().unwrap().region.ty(n).clone();
                    if ty.cols().is_none() {
                        self.err(
                            SHAPE,
                            *s,
                            format!("the router must give logits per token [S, n], got {ty}"),
                            "router",
                        );
                    }
                }
                n
            }
            None => None,
        };
        self.scopes.pop();
        let mut ctx = self.regions.pop().expect("body region");
        let (Some(next), true, true) = (
            next,
            gate.is_none() || gate_n.is_some(),
            router.is_none() || router_n.is_some(),
        ) else {
            return;
        };
        ctx.region.results.push(next);
        if let Some(g) = gate_n {
            ctx.region.results.push(g);
        }
        if let Some(r) = router_n {
            ctx.region.results.push(r);
        }
        // Unused captures stay in `params` (identified by index), so dropping their nodes is safe.
        ctx.region.compact();
        let mut operands = vec![];
        if iv.init == StateInit::Operand {
            operands.push(like);
        }
        // Captures are renumbered by compaction; the param index order is unchanged.
        operands.extend(ctx.captures.iter().map(|(o, _)| *o));
        // `max` defaults to the recurrence's own step count.
        match &mut exit {
            ExitSpec::Criterion {
                max_steps,
                min_steps,
                ..
            }
            | ExitSpec::Gate {
                max_steps,
                min_steps,
                ..
            } if *max_steps == 0 => {
                *max_steps = steps_n;
                *min_steps = (*min_steps).min(steps_n);
            }
            ExitSpec::Act { max_steps, .. }
            | ExitSpec::ExpertChoice { max_steps, .. }
            | ExitSpec::TokenChoice { max_steps, .. }
                if *max_steps == 0 =>
            {
                *max_steps = steps_n
            }
            _ => {}
        }
        let routed = matches!(
            exit,
            ExitSpec::ExpertChoice { .. } | ExitSpec::TokenChoice { .. }
        );
        if let (true, None, Some(sp)) = (routed, &router, exit_span) {
            self.err(
                BAD_POLICY,
                sp,
                "`exit expert_choice(...)` and `exit token_choice(...)` need a `router` in this `recur`".into(),
                "routing without a router",
            );
        }
        if let (false, Some((_, sp))) = (routed, &router) {
            self.err(
                BAD_POLICY,
                *sp,
                "a `router` needs `exit expert_choice(...)` or `exit token_choice(...)`".into(),
                "router without a routing policy",
            );
        }
        if let (ExitSpec::ExpertChoice { capacity, .. }, Some(sp)) = (&exit, exit_span) {
            if !capacity.is_empty() && capacity.len() < steps_n {
                self.err(
                    BAD_POLICY,
                    sp,
                    format!(
                        "`expert_choice` gives {} capacities for a `recur` of {steps_n} steps",
                        capacity.len()
                    ),
                    "one capacity per recursion",
                );
            }
        }
        if let (ExitSpec::Gate { .. } | ExitSpec::Act { .. }, None, Some(sp)) =
            (&exit, &gate, exit_span)
        {
            self.err(
                BAD_POLICY,
                sp,
                "`exit gate(...)` and `exit act(...)` need an `exit_gate` in this `recur`".into(),
                "learned exit without a gate",
            );
        }
        let op = Op::Recur {
            steps: steps_n,
            init: iv.init,
            exit,
            cache,
            gate: gate.is_some(),
            router: router.is_some(),
            body: Box::new(ctx.region),
        };
        let parent = self.regions.last_mut().expect("forward region");
        let tys: Vec<Ty> = operands
            .iter()
            .map(|&n| parent.region.ty(n).clone())
            .collect();
        match infer(&op, &tys, &parent.region.params) {
            Ok(ty) => {
                let n = parent.region.add(op, ty, &operands);
                self.define(&sname.name, Val::Tensor { depth: 0, node: n });
            }
            Err(msg) => self.err(
                SHAPE,
                span,
                format!("invalid recurrence: {msg}"),
                "this loop",
            ),
        }
    }
}

fn show(v: &Val) -> String {
    match v {
        Val::Int(i) => format!("the integer {i}"),
        Val::Float(f) => format!("the float {f}"),
        Val::Str(s) => format!("the string {s:?}"),
        Val::Sym(s) => format!("`{s}`"),
        other => other.describe().to_string(),
    }
}

fn strsim_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let c = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + c);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The iteration count of the per-iteration values among `vals`, if any.
fn per_iter_len(vals: &[&Val]) -> Option<usize> {
    vals.iter().find_map(|v| match v {
        Val::PerIter(items) => Some(items.len()),
        _ => None,
    })
}

/// The value at iteration `t` (a value that does not depend on the iteration is itself).
fn at_iter(v: &Val, t: usize) -> Val {
    match v {
        Val::PerIter(items) => items.get(t).cloned().unwrap_or(Val::Error),
        other => other.clone(),
    }
}
