//! Canonical source form: 2-space indent, one statement per line, single spaces around binary
//! operators and `=`, no comments, the fewest parentheses that keep the tree. Printing a parsed
//! file and parsing the output gives the same tree back.

use super::ast::*;
use std::fmt::Write;

pub fn print(file: &File) -> String {
    let mut p = Printer {
        out: String::new(),
        indent: 0,
    };
    for (i, item) in file.items.iter().enumerate() {
        // Consecutive `param` lines form one paragraph; blank lines separate the rest.
        if i > 0 {
            let grouped = matches!(
                (&file.items[i - 1], item),
                (Item::Param(_), Item::Param(_)) | (Item::Require(_), Item::Require(_))
            );
            if !grouped {
                p.out.push('\n');
            }
        }
        p.item(item);
    }
    p.out
}

/// One expression in canonical form (e.g. for messages that quote source).
pub fn print_expr(expr: &Expr) -> String {
    let mut p = Printer {
        out: String::new(),
        indent: 0,
    };
    p.expr(expr, 0);
    p.out
}

/// A number literal that re-lexes to the same value and kind (floats always get `.` or `e`).
pub fn format_float(v: f64) -> String {
    format!("{v:?}")
}

struct Printer {
    out: String,
    indent: usize,
}

/// Strength of an expression's outermost operator; an operand weaker than its context needs
/// parentheses.
fn strength(e: &Expr) -> u8 {
    match &e.kind {
        ExprKind::Binary { op, .. } => op.precedence(),
        ExprKind::Neg(_) => 3,
        _ => 4,
    }
}

impl Printer {
    fn line_start(&mut self) {
        for _ in 0..self.indent {
            self.out.push_str("  ");
        }
    }

    fn item(&mut self, item: &Item) {
        match item {
            Item::Model(m) => {
                self.out.push_str("model ");
                self.string(&m.name);
            }
            Item::Param(p) => {
                let _ = write!(self.out, "param {} = ", p.name.name);
                self.expr(&p.value, 0);
                if let Some(from) = &p.from {
                    self.out.push_str(" from ");
                    self.string(from);
                }
            }
            Item::Layer(l) => {
                let params: Vec<&str> = l.params.iter().map(|i| i.name.as_str()).collect();
                let _ = write!(self.out, "layer {}({}) ", l.name.name, params.join(", "));
                self.block(&l.body);
            }
            Item::Forward(f) => {
                let _ = write!(self.out, "forward({}) ", f.input.name);
                self.block(&f.body);
            }
            Item::Ignore(i) => {
                self.out.push_str("ignore ");
                for (j, k) in i.keys.iter().enumerate() {
                    if j > 0 {
                        self.out.push_str(", ");
                    }
                    self.string(k);
                }
            }
            Item::Require(r) => {
                self.out.push_str("require ");
                self.expr(&r.lhs, 0);
                let _ = write!(self.out, " {} ", r.cmp.symbol());
                self.expr(&r.rhs, 0);
                self.out.push_str(", ");
                self.string(&r.message);
            }
        }
        self.out.push('\n');
    }

    fn block(&mut self, block: &Block) {
        self.out.push_str("{\n");
        self.indent += 1;
        for (i, stmt) in block.stmts.iter().enumerate() {
            // The weight declarations heading a block are set apart from the computation.
            let after_weights = i > 0
                && matches!(block.stmts[i - 1].kind, StmtKind::Weight { .. })
                && !matches!(stmt.kind, StmtKind::Weight { .. });
            if after_weights {
                self.out.push('\n');
            }
            self.line_start();
            self.stmt(stmt);
            self.out.push('\n');
        }
        self.indent -= 1;
        self.line_start();
        self.out.push('}');
    }

    fn stmt(&mut self, stmt: &Stmt) {
        match &stmt.kind {
            StmtKind::Weight { name, key, shape } => {
                let _ = write!(self.out, "weight {} = ", name.name);
                self.string(key);
                self.out.push_str(" [");
                self.list(shape);
                self.out.push(']');
            }
            StmtKind::Let { names, value } => {
                let names: Vec<&str> = names.iter().map(|i| i.name.as_str()).collect();
                let _ = write!(self.out, "let {} = ", names.join(", "));
                self.expr(value, 0);
            }
            StmtKind::Assign { name, value } => {
                let _ = write!(self.out, "{} = ", name.name);
                self.expr(value, 0);
            }
            StmtKind::For {
                var,
                start,
                end,
                body,
            } => {
                let _ = write!(self.out, "for {} in ", var.name);
                self.expr(start, 0);
                self.out.push_str("..");
                self.expr(end, 0);
                self.out.push(' ');
                self.block(body);
            }
            StmtKind::Recur { steps, var, body } => {
                self.out.push_str("recur ");
                self.expr(steps, 0);
                if let Some(v) = var {
                    let _ = write!(self.out, " as {}", v.name);
                }
                self.out.push(' ');
                self.block(body);
            }
            StmtKind::State { name, init } => {
                let _ = write!(self.out, "state {} = ", name.name);
                self.expr(init, 0);
            }
            StmtKind::Exit(e) => self.keyword_expr("exit", e),
            StmtKind::Cache(e) => self.keyword_expr("cache", e),
            StmtKind::ExitGate(e) => self.keyword_expr("exit_gate", e),
            StmtKind::Router(e) => self.keyword_expr("router", e),
            StmtKind::Return(e) => self.keyword_expr("return", e),
            StmtKind::If {
                lhs,
                cmp,
                then,
                els,
            } => {
                self.out.push_str("if ");
                self.expr(lhs, 0);
                if let Some((op, rhs)) = cmp {
                    let _ = write!(self.out, " {} ", op.symbol());
                    self.expr(rhs, 0);
                }
                self.out.push(' ');
                self.block(then);
                if let Some(b) = els {
                    self.out.push_str(" else ");
                    self.block(b);
                }
            }
        }
    }

    fn keyword_expr(&mut self, keyword: &str, e: &Expr) {
        self.out.push_str(keyword);
        self.out.push(' ');
        self.expr(e, 0);
    }

    fn list(&mut self, items: &[Expr]) {
        for (i, e) in items.iter().enumerate() {
            if i > 0 {
                self.out.push_str(", ");
            }
            self.expr(e, 0);
        }
    }

    /// Prints `e`, parenthesized when it binds less tightly than `min` requires.
    fn expr(&mut self, e: &Expr, min: u8) {
        let parens = strength(e) < min;
        if parens {
            self.out.push('(');
        }
        match &e.kind {
            ExprKind::Int(v) => {
                let _ = write!(self.out, "{v}");
            }
            ExprKind::Float(v) => self.out.push_str(&format_float(*v)),
            ExprKind::Str(s) => self.string(s),
            ExprKind::Name(i) => self.out.push_str(&i.name),
            ExprKind::Neg(operand) => {
                self.out.push('-');
                self.expr(operand, 3);
            }
            ExprKind::Binary { op, lhs, rhs, .. } => {
                // Left-associative: an equally strong operator needs parentheses only on the right.
                self.expr(lhs, op.precedence());
                let _ = write!(self.out, " {} ", op.symbol());
                self.expr(rhs, op.precedence() + 1);
            }
            ExprKind::Call { callee, args } => {
                self.out.push_str(&callee.name);
                self.out.push('(');
                for (i, arg) in args.iter().enumerate() {
                    if i > 0 {
                        self.out.push_str(", ");
                    }
                    if let Some(name) = &arg.name {
                        let _ = write!(self.out, "{} = ", name.name);
                    }
                    self.expr(&arg.value, 0);
                }
                self.out.push(')');
            }
            ExprKind::Index { base, index } => {
                self.expr(base, 4);
                self.out.push('[');
                self.expr(index, 0);
                self.out.push(']');
            }
            ExprKind::List(items) => {
                self.out.push('[');
                self.list(items);
                self.out.push(']');
            }
            ExprKind::Error => self.out.push_str("<error>"),
        }
        if parens {
            self.out.push(')');
        }
    }

    fn string(&mut self, s: &StrLit) {
        self.out.push('"');
        for part in &s.parts {
            match part {
                StrPart::Text(text) => {
                    for c in text.chars() {
                        match c {
                            '"' => self.out.push_str("\\\""),
                            '\\' => self.out.push_str("\\\\"),
                            '\n' => self.out.push_str("\\n"),
                            '\t' => self.out.push_str("\\t"),
                            '{' => self.out.push_str("{{"),
                            '}' => self.out.push_str("}}"),
                            c => self.out.push(c),
                        }
                    }
                }
                StrPart::Interp(name) => {
                    let _ = write!(self.out, "{{{}}}", name.name);
                }
            }
        }
        self.out.push('"');
    }
}
