//! Builtin functions of the DSL and calls of user layers.
use super::{show, Elab, InitVal, Scope, Val, BAD_ARGS, BAD_POLICY, TOO_DEEP};
use crate::frontend::ast::{self, Ident};
use crate::frontend::diag;
use crate::frontend::Span;
use loopc_dialects::ops::{CacheSpec, Criterion, ExitSpec, RopeStyle, StateInit, Unary};
use loopc_dialects::Op;
use std::collections::HashMap;

/// Names callable as builtins (for "did you mean" suggestions).
pub const NAMES: &[&str] = &[
    "embed",
    "linear",
    "matmul",
    "rmsnorm",
    "layernorm",
    "rope",
    "attention",
    "concat",
    "split",
    "silu",
    "sigmoid",
    "relu",
    "gelu_tanh",
    "exp",
    "tanh",
    "sqrt",
    "softplus",
    "head_rmsnorm",
    "repeat_rows",
    "zeros",
    "trunc_normal",
    "converge",
    "pos_embed",
    "sinusoidal",
    "timing_signal",
    "step_signal",
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
    "idiv",
    "imod",
    "ring",
];

/// Bare names that stand for themselves when not bound.
pub const SYMBOLS: &[&str] = &[
    "interleaved",
    "half",
    "fixed",
    "per_step",
    "share_first",
    "last_step",
    "recursion_wise",
];

struct Bound {
    vals: Vec<Option<(Val, Span)>>,
}

impl Bound {
    fn get(&self, i: usize) -> Option<(Val, Span)> {
        self.vals[i].clone()
    }
}

impl<'a> Elab<'a> {
    /// Bind positional then keyword arguments to `names`; the first `required` are mandatory.
    fn bind(
        &mut self,
        callee: &Ident,
        args: &[ast::Arg],
        names: &[&str],
        required: usize,
        span: Span,
    ) -> Option<Bound> {
        let mut vals: Vec<Option<(Val, Span)>> = vec![None; names.len()];
        let mut ok = true;
        let mut pos = 0;
        for a in args {
            let v = self.eval(&a.value);
            let slot = match &a.name {
                None => {
                    let i = pos;
                    pos += 1;
                    if i >= names.len() {
                        self.err(
                            BAD_ARGS,
                            a.span,
                            format!(
                                "`{}` takes at most {} arguments ({})",
                                callee.name,
                                names.len(),
                                names.join(", ")
                            ),
                            "extra argument",
                        );
                        ok = false;
                        continue;
                    }
                    i
                }
                Some(k) => match names.iter().position(|n| *n == k.name) {
                    Some(i) => i,
                    None => {
                        self.err(
                            BAD_ARGS,
                            k.span,
                            format!(
                                "`{}` has no argument `{}`; its arguments are: {}",
                                callee.name,
                                k.name,
                                names.join(", ")
                            ),
                            "unknown keyword",
                        );
                        ok = false;
                        continue;
                    }
                },
            };
            if vals[slot].is_some() {
                self.err(
                    BAD_ARGS,
                    a.span,
                    format!(
                        "argument `{}` of `{}` is given twice",
                        names[slot], callee.name
                    ),
                    "again here",
                );
                ok = false;
            }
            if v == Val::Error {
                ok = false;
            }
            vals[slot] = Some((v, a.value.span));
        }
        for (i, n) in names.iter().enumerate().take(required) {
            if vals[i].is_none() {
                self.err(
                    BAD_ARGS,
                    span,
                    format!("`{}` is missing its argument `{n}`", callee.name),
                    "in this call",
                );
                ok = false;
            }
        }
        ok.then_some(Bound { vals })
    }

    fn int_arg(&mut self, v: &(Val, Span), what: &str, min: i64) -> Option<usize> {
        match v.0 {
            Val::Int(i) if i >= min => Some(i as usize),
            _ => {
                self.err(
                    BAD_ARGS,
                    v.1,
                    format!("{what} must be an integer ≥ {min}, got {}", show(&v.0)),
                    "here",
                );
                None
            }
        }
    }

    fn num_arg(
        &mut self,
        v: &(Val, Span),
        what: &str,
        code: &str,
        ok: impl Fn(f64) -> bool,
        expect: &str,
    ) -> Option<f64> {
        match v.0.num() {
            Some(x) if x.is_finite() && ok(x) => Some(x),
            _ => {
                self.err(
                    code,
                    v.1,
                    format!("{what} must be {expect}, got {}", show(&v.0)),
                    "here",
                );
                None
            }
        }
    }

    pub(crate) fn call(&mut self, callee: &Ident, args: &[ast::Arg], span: Span) -> Val {
        if let Some(layer) = self.layers.get(&callee.name).copied() {
            return self.call_layer(layer, callee, args, span);
        }
        let unary = match callee.name.as_str() {
            "silu" => Some(Unary::Silu),
            "sigmoid" => Some(Unary::Sigmoid),
            "relu" => Some(Unary::Relu),
            "gelu_tanh" => Some(Unary::GeluTanh),
            "exp" => Some(Unary::Exp),
            "tanh" => Some(Unary::Tanh),
            "softplus" => Some(Unary::Softplus),
            _ => None,
        };
        if let Some(u) = unary {
            let Some(b) = self.bind(callee, args, &["x"], 1, span) else {
                return Val::Error;
            };
            let (x, s) = b.get(0).unwrap();
            return self.unary(u, x, s);
        }
        match callee.name.as_str() {
            "sqrt" => {
                let Some(b) = self.bind(callee, args, &["x"], 1, span) else {
                    return Val::Error;
                };
                match b.get(0).unwrap() {
                    (v, s) if v.num().is_some() => {
                        let x = v.num().unwrap();
                        if x < 0.0 {
                            self.err(
                                BAD_ARGS,
                                s,
                                format!("sqrt of a negative number ({x})"),
                                "here",
                            );
                            return Val::Error;
                        }
                        Val::Float(x.sqrt())
                    }
                    (v, s) => self.unary(Unary::Sqrt, v, s),
                }
            }
            "embed" => {
                let Some(b) = self.bind(callee, args, &["tokens", "table"], 2, span) else {
                    return Val::Error;
                };
                let (t, w) = (b.get(0).unwrap(), b.get(1).unwrap());
                // A token lookup is loop-invariant and the runtime reads the call's tokens by
                // row: one written inside `recur` is placed in front of the loop instead.
                if let (Val::Tensor { depth, .. }, Val::Weight(_)) = (&t.0, &w.0) {
                    if *depth + 1 < self.regions.len() {
                        let inner = self.regions.split_off(depth + 1);
                        let v = self.op(Op::Embed, &[t, w], span);
                        self.regions.extend(inner);
                        return v;
                    }
                }
                self.op(Op::Embed, &[t, w], span)
            }
            "linear" | "matmul" => {
                let Some(b) = self.bind(callee, args, &["x", "weight", "bias"], 2, span) else {
                    return Val::Error;
                };
                let op = if callee.name == "linear" {
                    Op::Linear
                } else {
                    Op::MatMul
                };
                let y = self.op(op, &[b.get(0).unwrap(), b.get(1).unwrap()], span);
                match b.get(2) {
                    Some(bias) => self.op(
                        Op::Binary(loopc_dialects::ops::Binary::Add),
                        &[(y, span), bias],
                        span,
                    ),
                    None => y,
                }
            }
            "gelu" => {
                self.diags.push(
                    diag::error(BAD_ARGS, "exact (erf) GELU is not available")
                        .with_labels(vec![diag::primary(callee.span, "here")])
                        .with_notes(vec!["help: GPT-2 and most looped GPT-2 models use the tanh approximation: `gelu_tanh(x)`".into()]),
                );
                Val::Error
            }
            "layernorm" => {
                let Some(b) = self.bind(callee, args, &["x", "gain", "bias", "eps"], 4, span)
                else {
                    return Val::Error;
                };
                let Some(eps) = self.num_arg(
                    &b.get(3).unwrap(),
                    "`layernorm` eps",
                    BAD_ARGS,
                    |x| x >= 0.0,
                    "a number ≥ 0",
                ) else {
                    return Val::Error;
                };
                self.op(
                    Op::LayerNorm { eps: eps as f32 },
                    &[b.get(0).unwrap(), b.get(1).unwrap(), b.get(2).unwrap()],
                    span,
                )
            }
            "pos_embed" => {
                let Some(b) = self.bind(callee, args, &["table"], 1, span) else {
                    return Val::Error;
                };
                self.op(Op::PosEmbed, &[b.get(0).unwrap()], span)
            }
            "sinusoidal" => {
                let Some(b) = self.bind(callee, args, &["dim", "base"], 1, span) else {
                    return Val::Error;
                };
                let Some(cols) = self.int_arg(&b.get(0).unwrap(), "`sinusoidal` dim", 1) else {
                    return Val::Error;
                };
                let base = match b.get(1) {
                    Some(v) => match self.num_arg(
                        &v,
                        "`sinusoidal` base",
                        BAD_ARGS,
                        |x| x > 1.0,
                        "a number > 1",
                    ) {
                        Some(x) => x,
                        None => return Val::Error,
                    },
                    None => 10000.0,
                };
                self.op(Op::Sinusoidal { cols, base }, &[], span)
            }
            "timing_signal" | "step_signal" => {
                let names = ["dim", "min_timescale", "max_timescale"];
                let Some(b) = self.bind(callee, args, &names, 1, span) else {
                    return Val::Error;
                };
                let what = format!("`{}` dim", callee.name);
                let Some(cols) = self.int_arg(&b.get(0).unwrap(), &what, 1) else {
                    return Val::Error;
                };
                let mut ts = [1.0, 1.0e4];
                for (i, t) in ts.iter_mut().enumerate() {
                    if let Some(v) = b.get(1 + i) {
                        let what = format!("`{}` {}", callee.name, names[1 + i]);
                        match self.num_arg(&v, &what, BAD_ARGS, |x| x > 0.0, "a number > 0") {
                            Some(x) => *t = x,
                            None => return Val::Error,
                        }
                    }
                }
                if ts[1] < ts[0] {
                    self.err(
                        BAD_ARGS,
                        span,
                        format!(
                            "`{}` needs min_timescale ≤ max_timescale, got {} and {}",
                            callee.name, ts[0], ts[1]
                        ),
                        "here",
                    );
                    return Val::Error;
                }
                let step = callee.name == "step_signal";
                if step && self.depth() == 0 {
                    self.err(
                        BAD_ARGS,
                        span,
                        "`step_signal` is the recurrence index: it is only defined inside a `recur` body".into(),
                        "outside `recur`",
                    );
                    return Val::Error;
                }
                let op = Op::TimingSignal {
                    cols,
                    min_timescale: ts[0],
                    max_timescale: ts[1],
                    step,
                };
                self.op(op, &[], span)
            }
            "rmsnorm" => {
                let Some(b) = self.bind(callee, args, &["x", "gain", "eps"], 3, span) else {
                    return Val::Error;
                };
                let Some(eps) = self.num_arg(
                    &b.get(2).unwrap(),
                    "`rmsnorm` eps",
                    BAD_ARGS,
                    |x| x >= 0.0,
                    "a number ≥ 0",
                ) else {
                    return Val::Error;
                };
                self.op(
                    Op::RmsNorm { eps: eps as f32 },
                    &[b.get(0).unwrap(), b.get(1).unwrap()],
                    span,
                )
            }
            "head_rmsnorm" => {
                // torch's `F.rms_norm` without `eps` uses the dtype's machine epsilon.
                let Some(b) = self.bind(callee, args, &["x", "heads", "eps"], 2, span) else {
                    return Val::Error;
                };
                let Some(heads) = self.int_arg(&b.get(1).unwrap(), "`head_rmsnorm` heads", 1)
                else {
                    return Val::Error;
                };
                let eps = match b.get(2) {
                    None => f32::EPSILON as f64,
                    Some(e) => match self.num_arg(
                        &e,
                        "`head_rmsnorm` eps",
                        BAD_ARGS,
                        |x| x >= 0.0,
                        "a number ≥ 0",
                    ) {
                        Some(x) => x,
                        None => return Val::Error,
                    },
                };
                self.op(
                    Op::HeadRmsNorm {
                        heads,
                        eps: eps as f32,
                    },
                    &[b.get(0).unwrap()],
                    span,
                )
            }
            "repeat_rows" => {
                let Some(b) = self.bind(callee, args, &["w", "times"], 2, span) else {
                    return Val::Error;
                };
                let Some(times) = self.int_arg(&b.get(1).unwrap(), "`repeat_rows` times", 1) else {
                    return Val::Error;
                };
                self.op(Op::WRepeatRows(times), &[b.get(0).unwrap()], span)
            }
            "rope" => {
                let style_expr = args
                    .iter()
                    .find(|a| a.name.as_ref().is_some_and(|n| n.name == "style"))
                    .or_else(|| args.iter().filter(|a| a.name.is_none()).nth(2));
                if let Some(a) = style_expr {
                    if let Some(name) = self
                        .symbol_of(&a.value)
                        .filter(|n| RopeStyle::from_name(n).is_none())
                    {
                        self.diags.push(
                            diag::error(BAD_ARGS, format!("unknown rope style `{name}`"))
                                .with_labels(vec![diag::primary(a.value.span, "style")])
                                .with_notes(vec!["help: use `interleaved` (Huginn: pairs x[2i], x[2i+1]) or `half` (HF rotate_half: pairs x[i], x[i+d/2])".into()]),
                        );
                        return Val::Error;
                    }
                }
                let Some(b) = self.bind(callee, args, &["x", "heads", "style", "base"], 4, span)
                else {
                    return Val::Error;
                };
                let Some(heads) = self.int_arg(&b.get(1).unwrap(), "`rope` heads", 1) else {
                    return Val::Error;
                };
                let (sv, ss) = b.get(2).unwrap();
                let style = match &sv {
                    Val::Sym(s) => RopeStyle::from_name(s),
                    _ => None,
                };
                let Some(style) = style else {
                    self.err(
                        BAD_ARGS,
                        ss,
                        format!(
                            "`rope` style must be `interleaved` or `half`, got {}",
                            show(&sv)
                        ),
                        "style",
                    );
                    return Val::Error;
                };
                let Some(base) = self.num_arg(
                    &b.get(3).unwrap(),
                    "`rope` base",
                    BAD_ARGS,
                    |x| x > 1.0,
                    "a number > 1",
                ) else {
                    return Val::Error;
                };
                self.op(Op::Rope { heads, style, base }, &[b.get(0).unwrap()], span)
            }
            "attention" => {
                let Some(b) = self.bind(
                    callee,
                    args,
                    &["q", "k", "v", "heads", "kv_heads", "scale"],
                    5,
                    span,
                ) else {
                    return Val::Error;
                };
                let Some(heads) = self.int_arg(&b.get(3).unwrap(), "`attention` heads", 1) else {
                    return Val::Error;
                };
                let Some(kv_heads) = self.int_arg(&b.get(4).unwrap(), "`attention` kv_heads", 1)
                else {
                    return Val::Error;
                };
                let q = b.get(0).unwrap();
                let scale = match b.get(5) {
                    Some(s) => match self.num_arg(
                        &s,
                        "`attention` scale",
                        BAD_ARGS,
                        |x| x > 0.0,
                        "a number > 0",
                    ) {
                        Some(x) => x as f32,
                        None => return Val::Error,
                    },
                    None => {
                        // 1/sqrt(head_dim), from the query width.
                        let Some(n) = self.tensor(&q.0, q.1, "the query") else {
                            return Val::Error;
                        };
                        let cols = self
                            .regions
                            .last()
                            .unwrap()
                            .region
                            .ty(n)
                            .cols()
                            .unwrap_or(heads);
                        (1.0 / ((cols / heads).max(1) as f64).sqrt()) as f32
                    }
                };
                let site = self.new_site();
                self.op(
                    Op::Attention {
                        heads,
                        kv_heads,
                        scale,
                        site,
                    },
                    &[q, b.get(1).unwrap(), b.get(2).unwrap()],
                    span,
                )
            }
            "concat" => {
                let vals: Vec<(Val, Span)> = args
                    .iter()
                    .map(|a| {
                        if let Some(k) = &a.name {
                            self.err(
                                BAD_ARGS,
                                k.span,
                                "`concat` takes positional arguments only".into(),
                                "keyword",
                            );
                        }
                        (self.eval(&a.value), a.value.span)
                    })
                    .collect();
                if vals.is_empty() {
                    self.err(
                        BAD_ARGS,
                        span,
                        "`concat` needs at least one tensor".into(),
                        "empty",
                    );
                    return Val::Error;
                }
                self.op(Op::Concat, &vals, span)
            }
            "split" => {
                let Some(b) = self.bind(callee, args, &["x", "sizes"], 2, span) else {
                    return Val::Error;
                };
                let (x, xs) = b.get(0).unwrap();
                let (sizes, ss) = b.get(1).unwrap();
                let Val::List(items) = sizes else {
                    self.err(
                        BAD_ARGS,
                        ss,
                        format!(
                            "`split` sizes must be a list like [dim, dim], got {}",
                            show(&sizes)
                        ),
                        "sizes",
                    );
                    return Val::Error;
                };
                let mut lens = vec![];
                for it in &items {
                    let Some(len) = self.int_arg(&(it.clone(), ss), "a `split` size", 1) else {
                        return Val::Error;
                    };
                    lens.push(len);
                }
                let total: usize = lens.iter().sum();
                let Some(n) = self.tensor(&x, xs, "the value to split") else {
                    return Val::Error;
                };
                let cols = self.regions.last().unwrap().region.ty(n).cols();
                if cols.is_some_and(|c| c != total) {
                    self.err(
                        super::SHAPE,
                        ss,
                        format!(
                            "`split` sizes add up to {total} but the value has width {}",
                            cols.unwrap()
                        ),
                        "sizes",
                    );
                    return Val::Error;
                }
                let mut start = 0;
                let mut out = vec![];
                for len in lens {
                    out.push(self.op(Op::Slice { start, len }, &[(x.clone(), xs)], span));
                    start += len;
                }
                Val::List(out)
            }
            "zeros" => {
                let Some(b) = self.bind(callee, args, &["like"], 1, span) else {
                    return Val::Error;
                };
                self.init(StateInit::Zeros, b.get(0).unwrap())
            }
            "trunc_normal" => {
                let Some(b) = self.bind(callee, args, &["like", "std", "scale", "seed"], 2, span)
                else {
                    return Val::Error;
                };
                let Some(std) = self.num_arg(
                    &b.get(1).unwrap(),
                    "`trunc_normal` std",
                    BAD_POLICY,
                    |x| x >= 0.0,
                    "a number ≥ 0",
                ) else {
                    return Val::Error;
                };
                let scale = match b.get(2) {
                    Some(s) => match self.num_arg(
                        &s,
                        "`trunc_normal` scale",
                        BAD_POLICY,
                        |_| true,
                        "a finite number",
                    ) {
                        Some(x) => x,
                        None => return Val::Error,
                    },
                    None => 1.0,
                };
                let seed = match b.get(3) {
                    Some(s) => match self.int_arg(&s, "`trunc_normal` seed", 0) {
                        Some(x) => x as u64,
                        None => return Val::Error,
                    },
                    None => 0,
                };
                self.init(
                    StateInit::TruncNormal { std, scale, seed },
                    b.get(0).unwrap(),
                )
            }
            "converge" => {
                let Some(b) = self.bind(callee, args, &["threshold", "max", "min"], 2, span) else {
                    return Val::Error;
                };
                let Some(threshold) = self.num_arg(
                    &b.get(0).unwrap(),
                    "`converge` threshold",
                    BAD_POLICY,
                    |x| x > 0.0,
                    "a number > 0",
                ) else {
                    return Val::Error;
                };
                let mx = b.get(1).unwrap();
                let Some(max_steps) = self.policy_int(&mx, "`converge` max", 1) else {
                    return Val::Error;
                };
                let min_steps = match b.get(2) {
                    Some(m) => match self.policy_int(&m, "`converge` min", 1) {
                        Some(x) if x <= max_steps => x,
                        Some(x) => {
                            self.err(
                                BAD_POLICY,
                                m.1,
                                format!("`converge` min ({x}) exceeds max ({max_steps})"),
                                "min",
                            );
                            return Val::Error;
                        }
                        None => return Val::Error,
                    },
                    None => 1,
                };
                Val::Exit(ExitSpec::Converge {
                    threshold,
                    min_steps,
                    max_steps,
                })
            }
            "gate" => {
                let Some(b) = self.bind(callee, args, &["q", "min_steps", "max"], 1, span) else {
                    return Val::Error;
                };
                let q = self.num_arg(
                    &b.get(0).unwrap(),
                    "`gate` q",
                    BAD_POLICY,
                    |x| x > 0.0 && x <= 1.0,
                    "a number in (0, 1]",
                );
                let Ok((min_steps, max_steps)) = self.step_bounds("gate", b.get(1), b.get(2))
                else {
                    return Val::Error;
                };
                match q {
                    Some(q) => Val::Exit(ExitSpec::Gate {
                        q,
                        min_steps,
                        max_steps,
                    }),
                    None => Val::Error,
                }
            }
            "act" => {
                let Some(b) = self.bind(callee, args, &["eps", "max"], 0, span) else {
                    return Val::Error;
                };
                let eps = self.policy_num_or(
                    b.get(0),
                    "`act` eps",
                    |x| x > 0.0 && x < 1.0,
                    "a number in (0, 1)",
                    0.01,
                );
                let Ok((_, max_steps)) = self.step_bounds("act", None, b.get(1)) else {
                    return Val::Error;
                };
                match eps {
                    Some(eps) => Val::Exit(ExitSpec::Act { eps, max_steps }),
                    None => Val::Error,
                }
            }
            "expert_choice" => {
                let Some(b) = self.bind(
                    callee,
                    args,
                    &["alpha", "capacity", "threshold", "max"],
                    0,
                    span,
                ) else {
                    return Val::Error;
                };
                let alpha = self.policy_num_or(
                    b.get(0),
                    "`expert_choice` alpha",
                    |x| x > 0.0 && x.is_finite(),
                    "a positive number",
                    0.1,
                );
                let threshold = self.policy_num_or(
                    b.get(2),
                    "`expert_choice` threshold",
                    |x| (0.0..=1.0).contains(&x),
                    "a probability in [0, 1]",
                    0.5,
                );
                let mut capacity = vec![];
                if let Some((v, sp)) = b.get(1) {
                    let items = match v {
                        Val::List(items) => items,
                        Val::Error => return Val::Error,
                        other => vec![other],
                    };
                    for it in items {
                        let c = self.num_arg(
                            &(it, sp),
                            "`expert_choice` capacity",
                            BAD_POLICY,
                            |x| x > 0.0 && x <= 1.0,
                            "fractions in (0, 1]",
                        );
                        match c {
                            Some(c) => capacity.push(c),
                            None => return Val::Error,
                        }
                    }
                }
                let Ok((_, max_steps)) = self.step_bounds("expert_choice", None, b.get(3)) else {
                    return Val::Error;
                };
                match (alpha, threshold) {
                    (Some(alpha), Some(threshold)) => Val::Exit(ExitSpec::ExpertChoice {
                        alpha,
                        capacity,
                        threshold,
                        max_steps,
                    }),
                    _ => Val::Error,
                }
            }
            "token_choice" => {
                let Some(b) = self.bind(callee, args, &["alpha", "max"], 0, span) else {
                    return Val::Error;
                };
                let alpha = self.policy_num_or(
                    b.get(0),
                    "`token_choice` alpha",
                    |x| x > 0.0 && x.is_finite(),
                    "a positive number",
                    1.0,
                );
                let Ok((_, max_steps)) = self.step_bounds("token_choice", None, b.get(1)) else {
                    return Val::Error;
                };
                match alpha {
                    Some(alpha) => Val::Exit(ExitSpec::TokenChoice { alpha, max_steps }),
                    None => Val::Error,
                }
            }
            "idiv" | "imod" => {
                // Floor division and its remainder on integers (per iteration when either side
                // depends on the iteration index): MoR's sharing maps `u // N` and `u mod B`.
                let Some(b) = self.bind(callee, args, &["a", "b"], 2, span) else {
                    return Val::Error;
                };
                let ((a, _), (d, dspan)) = (b.get(0).unwrap(), b.get(1).unwrap());
                let n = [&a, &d].iter().find_map(|v| match v {
                    Val::PerIter(items) => Some(items.len()),
                    _ => None,
                });
                let at = |v: &Val, t: usize| match v {
                    Val::PerIter(items) => items[t].clone(),
                    o => o.clone(),
                };
                let one = |x: Val, y: Val| -> Result<Val, String> {
                    match (x, y) {
                        (Val::Int(_), Val::Int(0)) => Err("division by zero".into()),
                        (Val::Int(x), Val::Int(y)) => Ok(Val::Int(if callee.name == "idiv" {
                            x.div_euclid(y)
                        } else {
                            x.rem_euclid(y)
                        })),
                        (Val::Error, _) | (_, Val::Error) => Ok(Val::Error),
                        (x, y) => Err(format!(
                            "`{}` needs two integers, got {} and {}",
                            callee.name,
                            x.describe(),
                            y.describe()
                        )),
                    }
                };
                let r = match n {
                    None => one(a, d),
                    Some(n) => (0..n)
                        .map(|t| one(at(&a, t), at(&d, t)))
                        .collect::<Result<Vec<_>, _>>()
                        .map(Val::PerIter),
                };
                match r {
                    Ok(v) => v,
                    Err(msg) => {
                        self.err(BAD_ARGS, dspan, msg, "here");
                        Val::Error
                    }
                }
            }
            "ring" => {
                let Some(b) = self.bind(callee, args, &["c"], 1, span) else {
                    return Val::Error;
                };
                match self.policy_int(&b.get(0).unwrap(), "`ring` size", 1) {
                    Some(c) => Val::Cache(CacheSpec::Ring(c)),
                    None => Val::Error,
                }
            }
            name if Criterion::from_name(name).is_some() => {
                let kind = Criterion::from_name(name).unwrap();
                let names = ["threshold", "min_steps", "every", "max"];
                let Some(b) = self.bind(callee, args, &names, 1, span) else {
                    return Val::Error;
                };
                let what = format!("`{name}` threshold");
                let threshold = if kind == Criterion::ArgmaxStability {
                    self.policy_int(&b.get(0).unwrap(), &what, 1)
                        .map(|x| x as f64)
                } else {
                    self.num_arg(
                        &b.get(0).unwrap(),
                        &what,
                        BAD_POLICY,
                        |x| x > 0.0,
                        "a number > 0",
                    )
                };
                let every = match b.get(2) {
                    Some(e) => self.policy_int(&e, &format!("`{name}` every"), 1),
                    None => Some(1),
                };
                let Ok((min_steps, max_steps)) = self.step_bounds(name, b.get(1), b.get(3)) else {
                    return Val::Error;
                };
                match (threshold, every) {
                    (Some(threshold), Some(every)) => Val::Exit(ExitSpec::Criterion {
                        kind,
                        threshold,
                        min_steps,
                        every,
                        max_steps,
                    }),
                    _ => Val::Error,
                }
            }
            _ => {
                self.unknown(callee);
                Val::Error
            }
        }
    }

    /// `min_steps` (default 1) and `max` (default 0: the `recur`'s own step count).
    /// An optional numeric policy argument: its value when given and valid (`None` after the
    /// diagnostic), `default` when absent.
    fn policy_num_or(
        &mut self,
        v: Option<(Val, Span)>,
        what: &str,
        ok: impl Fn(f64) -> bool,
        expect: &str,
        default: f64,
    ) -> Option<f64> {
        match v {
            Some(v) => self.num_arg(&v, what, BAD_POLICY, ok, expect),
            None => Some(default),
        }
    }

    fn step_bounds(
        &mut self,
        name: &str,
        min: Option<(Val, Span)>,
        max: Option<(Val, Span)>,
    ) -> Result<(usize, usize), ()> {
        let max_steps = match max {
            Some(m) => self.policy_int(&m, &format!("`{name}` max"), 1).ok_or(())?,
            None => 0,
        };
        let min_steps = match min {
            Some(m) => {
                let x = self
                    .policy_int(&m, &format!("`{name}` min_steps"), 1)
                    .ok_or(())?;
                if max_steps > 0 && x > max_steps {
                    self.err(
                        BAD_POLICY,
                        m.1,
                        format!("`{name}` min_steps ({x}) exceeds max ({max_steps})"),
                        "min_steps",
                    );
                    return Err(());
                }
                x
            }
            None => 1,
        };
        Ok((min_steps, max_steps))
    }

    fn policy_int(&mut self, v: &(Val, Span), what: &str, min: i64) -> Option<usize> {
        match v.0 {
            Val::Int(i) if i >= min => Some(i as usize),
            _ => {
                self.err(
                    BAD_POLICY,
                    v.1,
                    format!("{what} must be an integer ≥ {min}, got {}", show(&v.0)),
                    "here",
                );
                None
            }
        }
    }

    fn init(&mut self, init: StateInit, like: (Val, Span)) -> Val {
        match &like.0 {
            Val::Tensor { depth, node } => Val::Init(InitVal {
                init,
                like: Some((*depth, *node)),
            }),
            Val::Error => Val::Error,
            other => {
                self.err(
                    BAD_POLICY,
                    like.1,
                    format!("the state is shaped like a tensor; got {}", show(other)),
                    "like",
                );
                Val::Error
            }
        }
    }

    fn call_layer(
        &mut self,
        layer: &'a ast::Layer,
        callee: &Ident,
        args: &[ast::Arg],
        span: Span,
    ) -> Val {
        if self.call_depth > 64 {
            self.err(
                TOO_DEEP,
                span,
                format!("layer `{}` calls itself too deeply", callee.name),
                "recursive call",
            );
            return Val::Error;
        }
        let names: Vec<&str> = layer.params.iter().map(|p| p.name.as_str()).collect();
        let Some(b) = self.bind(callee, args, &names, names.len(), span) else {
            return Val::Error;
        };
        let mut vars = HashMap::new();
        for (n, v) in names.iter().zip(b.vals) {
            vars.insert(n.to_string(), v.map(|p| p.0).unwrap_or(Val::Error));
        }
        let d = self.regions.len() - 1;
        self.scopes.push(Scope {
            vars,
            depth: d,
            barrier: true,
        });
        self.call_depth += 1;
        let r = self.block(&layer.body);
        self.call_depth -= 1;
        self.scopes.pop();
        match r {
            Some((v, _)) => v,
            None => {
                self.diags.push(
                    diag::error(
                        super::NO_RETURN,
                        format!("layer `{}` ends without `return`", layer.name.name),
                    )
                    .with_labels(vec![
                        diag::primary(layer.name.span, "this layer"),
                        diag::secondary(span, "called here"),
                    ]),
                );
                Val::Error
            }
        }
    }
}
