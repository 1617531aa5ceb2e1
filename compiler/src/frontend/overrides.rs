//! Values that replace `param` defaults: `--set` arguments and a HF config.json.

use super::diag::{self, Diagnostic, SourceMap};
use super::params::Value;
use super::span::Span;

/// One `--set name=value`: param name, value text, and where it was given (for diagnostics).
pub type SetArg = (String, String, Option<Span>);

/// Values that replace param defaults.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--set name=value` arguments: DSL param name, value text, and where the argument is (see
    /// [`Overrides::parse_set_args`]) for diagnostics.
    pub set: Vec<SetArg>,
    /// A HF config.json: its path (for messages) and its top-level object. Keys match the
    /// params' `from` keys.
    pub config: Option<(String, serde_json::Map<String, serde_json::Value>)>,
}

impl Overrides {
    /// Splits `--set` arguments (`name=value`) and records them as a `<command line>` file in
    /// `source_map`, so that diagnostics about them can point at the argument.
    pub fn parse_set_args(
        source_map: &mut SourceMap,
        args: &[String],
    ) -> (Vec<SetArg>, Vec<Diagnostic>) {
        let mut text = String::new();
        let mut ranges = Vec::new();
        for arg in args {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str("--set ");
            ranges.push(text.len()..text.len() + arg.len());
            text.push_str(arg);
        }
        let file = source_map.add("<command line>", text);
        let mut set = Vec::new();
        let mut diags = Vec::new();
        for (arg, range) in args.iter().zip(ranges) {
            let span = Span::new(file, range.start, range.end);
            match arg.split_once('=') {
                Some((name, value)) if !name.trim().is_empty() => {
                    set.push((
                        name.trim().to_string(),
                        value.trim().to_string(),
                        Some(span),
                    ));
                }
                _ => diags.push(
                    diag::error(diag::MALFORMED_SET, format!("malformed `--set {arg}`"))
                        .with_labels(vec![diag::primary(span, "expected `name=value`")])
                        .with_notes(vec!["help: for example `--set dim=64`".into()]),
                ),
            }
        }
        (set, diags)
    }
}

pub(super) fn parse_number(text: &str) -> Option<Value> {
    let text = text.trim();
    if let Ok(i) = text.parse::<i64>() {
        return Some(Value::Int(i));
    }
    // Rust also parses `inf` and `NaN`; a hyperparameter is never meant to be either.
    let looks_numeric = text
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    match text.parse::<f64>() {
        Ok(f) if looks_numeric && f.is_finite() => Some(Value::Float(f)),
        _ => None,
    }
}

/// The candidate nearest to `name` by edit distance, if near enough to be a plausible typo.
pub(super) fn closest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    let mut best: Option<(usize, &'a str)> = None;
    for &c in candidates {
        let d = edit_distance(name, c);
        if d <= limit && best.is_none_or(|(bd, bc)| (d, c) < (bd, bc)) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev_diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            let next = (row[j + 1] + 1).min(row[j] + 1).min(prev_diag + cost);
            prev_diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}
