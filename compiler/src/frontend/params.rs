//! Evaluation of the `param` items, with `--set` and config.json overrides.
//!
//! Params are evaluated in source order, each from the values of earlier ones, so overriding
//! `dim` also changes a later `head_dim = dim / heads` unless `head_dim` is overridden itself.
//! A param's kind (integer or float) is fixed by its default expression, not by the values that
//! flow in: int/int division must be exact and stays an integer, anything touching a float or
//! `sqrt` is a float.

use std::collections::HashMap;
use std::fmt;

use super::ast::{self, BinOp, Expr, ExprKind, Item};
use super::diag::{self, Diagnostic};
use super::overrides::{closest, parse_number};
pub use super::overrides::{Overrides, SetArg};
use super::printer::{format_float, print_expr};
use super::span::Span;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
}

impl Value {
    pub fn as_f64(self) -> f64 {
        match self {
            Value::Int(v) => v as f64,
            Value::Float(v) => v,
        }
    }

    pub fn as_int(self) -> Option<i64> {
        match self {
            Value::Int(v) => Some(v),
            Value::Float(_) => None,
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Value::Int(_) => Kind::Int,
            Value::Float(_) => Kind::Float,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) => f.write_str(&format_float(*v)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Int,
    Float,
}

/// Where a param's value came from.
#[derive(Clone, Debug, PartialEq)]
pub enum ValueSource {
    /// The default expression in the `.loop` file.
    Default,
    /// A `--set` argument.
    Set,
    /// The config.json key named by the param's `from`.
    Config(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamValue {
    pub name: String,
    pub value: Value,
    pub source: ValueSource,
    /// The param's name in its `param` item.
    pub span: Span,
}

/// The evaluated params, in source order. Params whose evaluation failed are absent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamEnv {
    pub params: Vec<ParamValue>,
    /// Config keys that some param's `from` read, in param order.
    pub used_config_keys: Vec<String>,
    /// Config keys that no param reads (sorted): the file's `ignore` lists and HF bookkeeping
    /// ([`HF_BOOKKEEPING_KEYS`]); any other key is an error (E0206).
    pub unused_config_keys: Vec<String>,
}

impl ParamEnv {
    pub fn get(&self, name: &str) -> Option<Value> {
        self.params.iter().find(|p| p.name == name).map(|p| p.value)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Value)> {
        self.params.iter().map(|p| (p.name.as_str(), p.value))
    }

    /// A warning listing the unused config keys, for callers that want to show it.
    pub fn unused_config_warning(&self, config_path: &str) -> Option<Diagnostic> {
        if self.unused_config_keys.is_empty() {
            return None;
        }
        let keys: Vec<String> = self
            .unused_config_keys
            .iter()
            .map(|k| format!("`{k}`"))
            .collect();
        Some(
            Diagnostic::warning()
                .with_code(diag::UNUSED_CONFIG_KEYS)
                .with_message(format!(
                    "{} key{} of `{config_path}` {} read by no param",
                    keys.len(),
                    if keys.len() == 1 { "" } else { "s" },
                    if keys.len() == 1 { "is" } else { "are" },
                ))
                .with_notes(vec![format!("unused: {}", keys.join(", "))]),
        )
    }
}

/// Evaluates every `param` of `file` with `overrides` applied. All errors are collected; a param
/// that fails is left out of the env, and params depending on it fail silently.
/// A config key, or a dotted path into nested objects (`rope_settings.rope_base`) when no
/// top-level key has that exact name.
fn config_lookup<'a>(
    map: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Option<&'a serde_json::Value> {
    if let Some(v) = map.get(key) {
        return Some(v);
    }
    let mut parts = key.split('.');
    let mut v = map.get(parts.next()?)?;
    for p in parts {
        v = v.as_object()?.get(p)?;
    }
    Some(v)
}

pub fn eval_params(file: &ast::File, overrides: &Overrides) -> (ParamEnv, Vec<Diagnostic>) {
    let mut ev = Evaluator::default();
    let params = ev.collect(file);
    let set = ev.set_overrides(&params, overrides);
    let config = overrides.config.as_ref();
    for (index, param) in params.iter().enumerate() {
        ev.param(index, param, set.get(param.name.name.as_str()), config);
    }
    if let Some((path, map)) = config {
        ev.env.unused_config_keys = map
            .keys()
            .filter(|k| {
                !params.iter().any(|p| {
                    from_key(p).is_some_and(|f| f == **k || f.split('.').next() == Some(k))
                })
            })
            .cloned()
            .collect();
        ev.unknown_keys(file, &params, path, map);
    }
    let n = params.len();
    for item in &file.items {
        if let Item::Require(r) = item {
            ev.require(r, n, config.map(|(p, _)| p.as_str()));
        }
    }
    (ev.env, ev.diags)
}

/// Config keys of HF bookkeeping (identity, serialization, generation and training settings)
/// that no model's forward pass reads: accepted in every config without an `ignore`.
pub const HF_BOOKKEEPING_KEYS: &[&str] = &[
    "_name_or_path",
    "architectures",
    "auto_map",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "use_cache",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "initializer_range",
    "id2label",
    "label2id",
    "problem_type",
];

/// The param names an expression reads, first occurrence first.
fn names_in(e: &Expr, out: &mut Vec<String>) {
    match &e.kind {
        ExprKind::Name(i) if !out.contains(&i.name) => out.push(i.name.clone()),
        ExprKind::Name(_) => {}
        ExprKind::Neg(x) => names_in(x, out),
        ExprKind::Binary { lhs, rhs, .. } => {
            names_in(lhs, out);
            names_in(rhs, out);
        }
        ExprKind::Call { args, .. } => args.iter().for_each(|a| names_in(&a.value, out)),
        _ => {}
    }
}

fn from_key(p: &ast::Param) -> Option<String> {
    p.from.as_ref().and_then(|s| s.as_plain())
}

/// A parsed `--set` value and where it was given.
struct SetValue<'a> {
    value: Value,
    text: &'a str,
    span: Option<Span>,
}

#[derive(Default)]
struct Evaluator {
    /// Declaration order index and name span of each (first) param.
    decls: HashMap<String, (usize, Span)>,
    /// Results so far: `None` for params that failed.
    results: HashMap<String, Option<(Kind, Value, ValueSource)>>,
    env: ParamEnv,
    diags: Vec<Diagnostic>,
}

impl Evaluator {
    /// Every config key that no param reads, no `ignore` lists and HF bookkeeping does not
    /// cover is an error naming the file and the key, with the closest known key.
    fn unknown_keys(
        &mut self,
        file: &ast::File,
        params: &[&ast::Param],
        path: &str,
        map: &serde_json::Map<String, serde_json::Value>,
    ) {
        let ignores: Vec<&ast::Ignore> = file
            .items
            .iter()
            .filter_map(|i| match i {
                Item::Ignore(g) => Some(g),
                _ => None,
            })
            .collect();
        let ignored: Vec<String> = ignores
            .iter()
            .flat_map(|g| g.keys.iter().filter_map(|k| k.as_plain()))
            .collect();
        let read: Vec<String> = params.iter().filter_map(|p| from_key(p)).collect();
        let known: Vec<&str> = read
            .iter()
            .chain(&ignored)
            .map(|s| s.as_str())
            .chain(HF_BOOKKEEPING_KEYS.iter().copied())
            .collect();
        // A nested object (`rope_settings`) that some param reads into (`rope_settings.rope_base`)
        // is checked key by key under its dotted names.
        let mut keys: Vec<String> = vec![];
        for (key, v) in map {
            let prefix = format!("{key}.");
            match v.as_object() {
                Some(obj) if known.iter().any(|k| k.starts_with(&prefix)) => {
                    keys.extend(obj.keys().map(|sub| format!("{prefix}{sub}")))
                }
                _ => keys.push(key.clone()),
            }
        }
        for key in &keys {
            if known.contains(&key.as_str()) {
                continue;
            }
            let mut d = diag::error(
                diag::UNKNOWN_CONFIG_KEY,
                format!("config `{path}` has the key `{key}`, which this model does not know"),
            );
            let mut candidates: Vec<&str> = read.iter().map(|s| s.as_str()).collect();
            candidates.extend(ignored.iter().map(|s| s.as_str()));
            if let Some(c) = closest(key, &candidates) {
                d.notes.push(format!("help: did you mean `{c}`?"));
                if let Some(p) = params.iter().find(|p| from_key(p).as_deref() == Some(c)) {
                    d.labels.push(diag::secondary(
                        p.from.as_ref().map_or(p.name.span, |f| f.span),
                        format!("`{c}` is read here"),
                    ));
                }
            }
            if let Some(last) = ignores.last() {
                d.labels.push(diag::secondary(
                    last.span,
                    "keys the model knows but does not read",
                ));
            }
            d.notes.push(format!(
                "note: every key must be read by a `param ... from \"key\"` or listed in an `ignore`; \
                 if `{key}` changes the model, the `.loop` file does not implement it"
            ));
            self.diags.push(d);
        }
    }

    /// Checks a `require` against the bound params (`n`: all of them are visible).
    fn require(&mut self, r: &ast::Require, n: usize, config: Option<&str>) {
        let before = self.diags.len();
        let (lk, rk) = (self.kind_of(&r.lhs, n), self.kind_of(&r.rhs, n));
        if lk.is_none() || rk.is_none() || self.diags.len() > before {
            return;
        }
        let (Some(l), Some(v)) = (self.eval(&r.lhs), self.eval(&r.rhs)) else {
            return;
        };
        let equal = match (l, v) {
            (Value::Int(a), Value::Int(b)) => a == b,
            (a, b) => a.as_f64() == b.as_f64(),
        };
        if equal == (r.cmp == ast::CmpOp::Eq) {
            return;
        }
        let message = r.message.as_plain().unwrap_or_default();
        let cond = r.lhs.span.to(r.rhs.span);
        let mut d = diag::error(
            diag::REQUIREMENT_FAILED,
            format!("requirement failed: {message}"),
        )
        .with_labels(vec![diag::primary(
            cond,
            format!(
                "`{}` is {l}, `{}` is {v}",
                print_expr(&r.lhs),
                print_expr(&r.rhs)
            ),
        )]);
        let mut names = Vec::new();
        names_in(&r.lhs, &mut names);
        names_in(&r.rhs, &mut names);
        for name in names {
            let Some((_, value, source)) = self.results.get(name.as_str()).cloned().flatten()
            else {
                continue;
            };
            let origin = match source {
                ValueSource::Default => "its default".to_string(),
                ValueSource::Set => "`--set`".to_string(),
                ValueSource::Config(key) => {
                    format!("config key `{key}` in `{}`", config.unwrap_or("the config"))
                }
            };
            d.notes
                .push(format!("note: `{name}` is {value}, from {origin}"));
        }
        self.diags.push(d);
    }

    /// The params in order, minus duplicates (reported).
    fn collect<'f>(&mut self, file: &'f ast::File) -> Vec<&'f ast::Param> {
        let mut params = Vec::new();
        for item in &file.items {
            let Item::Param(p) = item else { continue };
            if let Some((_, first)) = self.decls.get(&p.name.name) {
                self.diags.push(
                    diag::error(
                        diag::DUPLICATE_PARAM,
                        format!("duplicate param `{}`", p.name.name),
                    )
                    .with_labels(vec![
                        diag::primary(p.name.span, "declared again here"),
                        diag::secondary(*first, "first declared here"),
                    ]),
                );
                continue;
            }
            self.decls
                .insert(p.name.name.clone(), (params.len(), p.name.span));
            params.push(p);
        }
        params
    }

    fn set_overrides<'o>(
        &mut self,
        params: &[&ast::Param],
        overrides: &'o Overrides,
    ) -> HashMap<&'o str, SetValue<'o>> {
        let mut out = HashMap::new();
        for (name, text, span) in &overrides.set {
            let labels = |msg: &str| {
                span.map(|s| vec![diag::primary(s, msg)])
                    .unwrap_or_default()
            };
            if !self.decls.contains_key(name) {
                let names: Vec<&str> = params.iter().map(|p| p.name.name.as_str()).collect();
                let note = match closest(name, &names) {
                    Some(c) => format!("help: did you mean `{c}`?"),
                    None => format!("note: the params are: {}", names.join(", ")),
                };
                self.diags.push(
                    diag::error(
                        diag::UNKNOWN_SET_NAME,
                        format!("`--set {name}`: there is no param `{name}`"),
                    )
                    .with_labels(labels("unknown param"))
                    .with_notes(vec![note]),
                );
                continue;
            }
            let Some(value) = parse_number(text) else {
                let mut d = diag::error(
                    diag::BAD_SET_VALUE,
                    format!("`--set {name}={text}`: `{text}` is not a number"),
                )
                .with_labels(labels("expected an integer or a float"));
                if let Some((_, decl)) = self.decls.get(name) {
                    d.labels.push(diag::secondary(*decl, "param declared here"));
                }
                self.diags.push(d);
                continue;
            };
            out.insert(
                name.as_str(),
                SetValue {
                    value,
                    text,
                    span: *span,
                },
            );
        }
        out
    }

    fn param(
        &mut self,
        index: usize,
        p: &ast::Param,
        set: Option<&SetValue>,
        config: Option<&(String, serde_json::Map<String, serde_json::Value>)>,
    ) {
        // The default is checked even when overridden: a broken file is broken for every config.
        let kind = self.kind_of(&p.value, index);
        let from = match &p.from {
            Some(lit) => match lit.as_plain() {
                Some(key) => Some((key, lit.span)),
                None => {
                    self.diags.push(
                        diag::error(
                            diag::UNSUPPORTED_PARAM_EXPR,
                            "a config key cannot contain `{...}`",
                        )
                        .with_labels(vec![diag::primary(
                            lit.span,
                            "interpolation in a `from` key",
                        )]),
                    );
                    None
                }
            },
            None => None,
        };
        let config_value = match (from, config) {
            (Some((key, key_span)), Some((path, map))) => match config_lookup(map, &key) {
                Some(json) => {
                    self.env.used_config_keys.push(key.clone());
                    self.config_value(p, &key, key_span, path, json)
                        .map(|v| (v, key, key_span, path))
                }
                None => None,
            },
            _ => None,
        };
        let result = if let Some(set) = set {
            let convert = kind.map_or(Some(set.value), |k| {
                self.convert(p, k, set.value, || {
                    let place = set.span.map(|s| diag::primary(s, "given here"));
                    let msg = format!("`--set {}={}`", p.name.name, set.text);
                    (msg, place)
                })
            });
            convert.map(|v| (v, ValueSource::Set))
        } else if let Some((v, key, key_span, path)) = config_value {
            let convert = kind.map_or(Some(v), |k| {
                self.convert(p, k, v, || {
                    let msg = format!("config key `{key}` in `{path}`");
                    (msg, Some(diag::primary(key_span, format!("reads `{key}`"))))
                })
            });
            convert.map(|v| (v, ValueSource::Config(key)))
        } else if kind.is_some() {
            self.eval(&p.value).map(|v| (v, ValueSource::Default))
        } else {
            None
        };
        let name = p.name.name.clone();
        match (result, kind) {
            (Some((value, source)), _) => {
                self.env.params.push(ParamValue {
                    name: name.clone(),
                    value,
                    source: source.clone(),
                    span: p.name.span,
                });
                self.results
                    .insert(name, Some((kind.unwrap_or(value.kind()), value, source)));
            }
            _ => {
                self.results.insert(name, None);
            }
        }
    }

    /// Reads a config value as a number; `null` counts as absent (HF configs use it for "default").
    fn config_value(
        &mut self,
        p: &ast::Param,
        key: &str,
        key_span: Span,
        path: &str,
        json: &serde_json::Value,
    ) -> Option<Value> {
        use serde_json::Value as J;
        let found = match json {
            J::Null => return None,
            J::Number(n) => {
                if let Some(i) = n.as_i64() {
                    return Some(Value::Int(i));
                }
                match n.as_f64() {
                    Some(f) if f.is_finite() => return Some(Value::Float(f)),
                    _ => "a number out of range",
                }
            }
            // HF flags (`tie_word_embeddings`, `qk_norm`) read as 0 / 1: `require` checks the
            // variant a file implements, `if flag == 1` selects one.
            J::Bool(b) => return Some(Value::Int(i64::from(*b))),
            J::String(_) => "a string",
            J::Array(_) => "an array",
            J::Object(_) => "an object",
        };
        self.diags.push(
            diag::error(
                diag::CONFIG_WRONG_TYPE,
                format!(
                    "config key `{key}` in `{path}` is {found}, but param `{}` needs a number",
                    p.name.name
                ),
            )
            .with_labels(vec![
                diag::primary(key_span, format!("`{key}` is read here")),
                diag::secondary(p.name.span, "for this param"),
            ])
            .with_notes(vec![format!("found: {json}")]),
        );
        None
    }

    /// Converts an override to the param's kind; a fractional or huge value for an integer
    /// param is an error (`what` describes where the value came from).
    fn convert(
        &mut self,
        p: &ast::Param,
        kind: Kind,
        value: Value,
        what: impl FnOnce() -> (String, Option<codespan_reporting::diagnostic::Label<usize>>),
    ) -> Option<Value> {
        match (kind, value) {
            (Kind::Float, v) => Some(Value::Float(v.as_f64())),
            (Kind::Int, Value::Int(v)) => Some(Value::Int(v)),
            (Kind::Int, Value::Float(f)) => {
                // 2^63 itself is out of range: the bound is exclusive.
                if f.fract() == 0.0
                    && (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f)
                {
                    return Some(Value::Int(f as i64));
                }
                let (source, label) = what();
                let mut d = diag::error(
                    diag::NOT_AN_INTEGER,
                    format!(
                        "{source}: param `{}` is an integer, but the value is {}",
                        p.name.name, value
                    ),
                );
                d.labels.extend(label);
                d.labels
                    .push(diag::secondary(p.name.span, "integer param declared here"));
                self.diags.push(d);
                None
            }
        }
    }

    /// The kind an expression has, reporting names that are unknown or not yet defined and
    /// forms that a param cannot use. `None` after an error (reported here or earlier).
    fn kind_of(&mut self, e: &Expr, index: usize) -> Option<Kind> {
        match &e.kind {
            ExprKind::Int(_) => Some(Kind::Int),
            ExprKind::Float(_) => Some(Kind::Float),
            ExprKind::Neg(x) => self.kind_of(x, index),
            ExprKind::Binary { lhs, rhs, .. } => {
                let (l, r) = (self.kind_of(lhs, index), self.kind_of(rhs, index));
                match (l?, r?) {
                    (Kind::Int, Kind::Int) => Some(Kind::Int),
                    _ => Some(Kind::Float),
                }
            }
            ExprKind::Name(ident) => self.name_kind(ident, index),
            ExprKind::Call { callee, args } if callee.name == "sqrt" => {
                let kinds: Vec<_> = args.iter().map(|a| self.kind_of(&a.value, index)).collect();
                if args.len() != 1 || args[0].name.is_some() {
                    self.diags.push(
                        diag::error(
                            diag::BAD_SQRT,
                            "`sqrt` takes exactly one positional argument",
                        )
                        .with_labels(vec![diag::primary(e.span, "expected `sqrt(x)`")]),
                    );
                    return None;
                }
                kinds[0].map(|_| Kind::Float)
            }
            ExprKind::Error => None,
            _ => {
                let what = match &e.kind {
                    ExprKind::Call { callee, .. } => format!("a call of `{}`", callee.name),
                    ExprKind::Str(_) => "a string".into(),
                    ExprKind::List(_) => "a list".into(),
                    _ => "indexing".into(),
                };
                self.diags.push(
                    diag::error(diag::UNSUPPORTED_PARAM_EXPR, format!("{what} cannot be used in a param"))
                        .with_labels(vec![diag::primary(e.span, "not allowed in a param")])
                        .with_notes(vec![
                            "note: a param is computed from numbers, earlier params, `+ - * /` and `sqrt`".into(),
                        ]),
                );
                None
            }
        }
    }

    fn name_kind(&mut self, ident: &ast::Ident, index: usize) -> Option<Kind> {
        let name = &ident.name;
        match self.decls.get(name) {
            Some(&(at, _)) if at < index => {
                self.results.get(name).cloned().flatten().map(|(k, _, _)| k)
            }
            Some(&(_, decl)) => {
                self.diags.push(
                    diag::error(
                        diag::USE_BEFORE_DEF,
                        format!("param `{name}` is used before its definition"),
                    )
                    .with_labels(vec![
                        diag::primary(ident.span, "used here"),
                        diag::secondary(decl, "defined here"),
                    ])
                    .with_notes(vec![
                        "help: params are evaluated in order; move the definition up".into(),
                    ]),
                );
                None
            }
            None => {
                let earlier: Vec<&str> = self
                    .decls
                    .iter()
                    .filter(|(_, (at, _))| *at < index)
                    .map(|(n, _)| n.as_str())
                    .collect();
                let mut d = diag::error(
                    diag::UNKNOWN_NAME,
                    format!("unknown name `{name}` in a param"),
                )
                .with_labels(vec![diag::primary(ident.span, "not a param defined above")]);
                if let Some(c) = closest(name, &earlier) {
                    d.notes.push(format!("help: did you mean `{c}`?"));
                }
                self.diags.push(d);
                None
            }
        }
    }

    /// Evaluates a default whose names and forms [`kind_of`](Self::kind_of) already accepted.
    fn eval(&mut self, e: &Expr) -> Option<Value> {
        match &e.kind {
            ExprKind::Int(v) => Some(Value::Int(*v)),
            ExprKind::Float(v) => Some(Value::Float(*v)),
            ExprKind::Name(ident) => self
                .results
                .get(&ident.name)
                .cloned()
                .flatten()
                .map(|(_, v, _)| v),
            ExprKind::Neg(x) => match self.eval(x)? {
                Value::Int(v) => match v.checked_neg() {
                    Some(n) => Some(Value::Int(n)),
                    None => self.overflow(e, format!("-({v})")),
                },
                Value::Float(v) => Some(Value::Float(-v)),
            },
            ExprKind::Binary {
                op,
                op_span,
                lhs,
                rhs,
            } => {
                let (l, r) = (self.eval(lhs), self.eval(rhs));
                self.binary(e, *op, *op_span, lhs, rhs, l?, r?)
            }
            ExprKind::Call { args, .. } => {
                let x = self.eval(&args.first()?.value)?.as_f64();
                if x < 0.0 {
                    self.diags.push(
                        diag::error(
                            diag::BAD_SQRT,
                            format!("square root of a negative number ({x:?})"),
                        )
                        .with_labels(vec![diag::primary(
                            e.span,
                            format!("the argument is {x:?}"),
                        )]),
                    );
                    return None;
                }
                Some(Value::Float(x.sqrt()))
            }
            _ => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn binary(
        &mut self,
        e: &Expr,
        op: BinOp,
        op_span: Span,
        lhs: &Expr,
        rhs: &Expr,
        l: Value,
        r: Value,
    ) -> Option<Value> {
        let shown = format!("{l} {} {r}", op.symbol());
        if matches!(op, BinOp::Div | BinOp::Rem) && r.as_f64() == 0.0 {
            let mut d = diag::error(
                diag::DIVISION_BY_ZERO,
                format!("division by zero in `{}`", print_expr(e)),
            )
            .with_labels(vec![
                diag::primary(rhs.span, "this is zero"),
                diag::secondary(e.span, format!("evaluates to `{shown}`")),
            ]);
            d.notes.extend(self.origin_note(rhs));
            self.diags.push(d);
            return None;
        }
        match (l, r) {
            (Value::Int(a), Value::Int(b)) => {
                let result = match op {
                    BinOp::Add => a.checked_add(b),
                    BinOp::Sub => a.checked_sub(b),
                    BinOp::Mul => a.checked_mul(b),
                    BinOp::Div => {
                        if matches!(a.checked_rem(b), Some(rem) if rem != 0) {
                            let mut d = diag::error(
                                diag::INEXACT_DIVISION,
                                format!(
                                    "`{}` is not an exact division: {a} is not a multiple of {b}",
                                    print_expr(e)
                                ),
                            )
                            .with_labels(vec![
                                diag::primary(
                                    op_span,
                                    format!("{a} / {b} = {:?}", a as f64 / b as f64),
                                ),
                                diag::secondary(lhs.span, format!("this is {a}")),
                                diag::secondary(rhs.span, format!("this is {b}")),
                            ]);
                            d.notes.extend(self.origin_note(lhs));
                            d.notes.extend(self.origin_note(rhs));
                            d.notes.push(
                                "help: integer params divide exactly; override the operands (or this param) \
                                 with values that divide"
                                    .into(),
                            );
                            self.diags.push(d);
                            return None;
                        }
                        a.checked_div(b)
                    }
                    BinOp::Rem => a.checked_rem_euclid(b),
                };
                match result {
                    Some(v) => Some(Value::Int(v)),
                    None => self.overflow(e, shown),
                }
            }
            _ => {
                let (a, b) = (l.as_f64(), r.as_f64());
                let v = match op {
                    BinOp::Add => a + b,
                    BinOp::Sub => a - b,
                    BinOp::Mul => a * b,
                    BinOp::Div => a / b,
                    BinOp::Rem => a.rem_euclid(b),
                };
                if v.is_finite() {
                    Some(Value::Float(v))
                } else {
                    self.overflow(e, shown)
                }
            }
        }
    }

    fn overflow(&mut self, e: &Expr, shown: String) -> Option<Value> {
        self.diags.push(
            diag::error(
                diag::INT_OVERFLOW,
                format!("overflow in `{}`", print_expr(e)),
            )
            .with_labels(vec![diag::primary(
                e.span,
                format!("`{shown}` is out of range"),
            )]),
        );
        None
    }

    /// "`dim` is 64 (from `--set`)" for a bare param name, so that a failure caused by an
    /// override says so.
    fn origin_note(&self, e: &Expr) -> Option<String> {
        let ExprKind::Name(ident) = &e.kind else {
            return None;
        };
        let (_, value, source) = self.results.get(&ident.name).cloned().flatten()?;
        let origin = match source {
            ValueSource::Default => "its default".to_string(),
            ValueSource::Set => "`--set`".to_string(),
            ValueSource::Config(key) => format!("config key `{key}`"),
        };
        Some(format!("note: `{}` is {value}, from {origin}", ident.name))
    }
}
