//! Recursive-descent parser with error recovery: a failed statement or item is reported once,
//! then tokens are skipped to the next place a statement or item can start.

use super::ast::*;
use super::diag::{self, Diagnostic, SourceMap};
use super::lexer::{lex, Keyword, Punct, TokKind, Token};
use super::span::Span;

/// Errors reported before parsing stops (further ones would mostly be follow-on noise).
pub const MAX_ERRORS: usize = 20;

/// Parses file `file` of `source_map`. The returned tree is complete enough to print or inspect
/// even when there are diagnostics; failed expressions appear as [`ExprKind::Error`].
pub fn parse(source_map: &SourceMap, file: usize) -> (File, Vec<Diagnostic>) {
    let Some(src) = source_map.source(file) else {
        let d = diag::error(
            diag::UNEXPECTED_TOKEN,
            format!("no source file with id {file}"),
        );
        return (
            File {
                items: Vec::new(),
                span: Span::new(file, 0, 0),
            },
            vec![d],
        );
    };
    let (tokens, diags) = lex(src, file);
    let mut p = Parser {
        tokens,
        pos: 0,
        diags,
        stopped: false,
    };
    let items = p.items();
    if p.stopped || p.diags.len() > MAX_ERRORS {
        p.diags.truncate(MAX_ERRORS);
        let at = p.tokens[p.pos.min(p.tokens.len() - 1)].span;
        p.diags.push(
            diag::error(
                diag::TOO_MANY_ERRORS,
                format!("too many errors; stopped after {MAX_ERRORS}"),
            )
            .with_labels(vec![diag::primary(at, "parsing stopped here")]),
        );
    }
    (
        File {
            items,
            span: Span::new(file, 0, src.len()),
        },
        p.diags,
    )
}

/// Marks a failure that has already been reported (or deliberately not, after a lexer error).
struct Reported;

type PResult<T> = Result<T, Reported>;

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    diags: Vec<Diagnostic>,
    /// Set once the error cap is hit: from then on every token reads as end of file, so all
    /// open constructs unwind quickly.
    stopped: bool,
}

const STMT_FORMS: &str = "a statement starts with `weight`, `let`, `for`, `recur`, `state`, \
`exit`, `cache`, `exit_gate`, `return`, or a name followed by `=`";

impl Parser {
    // ---- token access ----

    fn peek(&self) -> &TokKind {
        self.peek_at(0)
    }

    fn peek_at(&self, n: usize) -> &TokKind {
        if self.stopped {
            return &TokKind::Eof;
        }
        // The token list always ends with Eof, so clamping keeps returning it.
        let i = (self.pos + n).min(self.tokens.len() - 1);
        &self.tokens[i].kind
    }

    fn span(&self) -> Span {
        self.tokens[self.pos.min(self.tokens.len() - 1)].span
    }

    fn prev_span(&self) -> Span {
        match self.pos {
            0 => self.span(),
            n => self.tokens[n - 1].span,
        }
    }

    fn bump(&mut self) -> Token {
        let tok = self.tokens[self.pos.min(self.tokens.len() - 1)].clone();
        if self.pos < self.tokens.len() - 1 {
            self.pos += 1;
        }
        tok
    }

    fn at_punct(&self, p: Punct) -> bool {
        *self.peek() == TokKind::Punct(p)
    }

    fn at_kw(&self, k: Keyword) -> bool {
        *self.peek() == TokKind::Kw(k)
    }

    fn eat_punct(&mut self, p: Punct) -> Option<Span> {
        self.at_punct(p).then(|| self.bump().span)
    }

    /// Item keywords and end of file end any block, whatever is open.
    fn at_item_boundary(&self) -> bool {
        match self.peek() {
            TokKind::Eof => true,
            TokKind::Kw(k) => k.starts_item(),
            _ => false,
        }
    }

    // ---- reporting ----

    fn report(&mut self, d: Diagnostic) {
        if self.stopped {
            return;
        }
        self.diags.push(d);
        if self.diags.len() >= MAX_ERRORS {
            self.stopped = true;
        }
    }

    /// "expected X, found Y" at the current token; silent when the lexer already reported it.
    fn expected(&mut self, what: &str) -> Reported {
        self.expected_with(what, Vec::new())
    }

    fn expected_with(&mut self, what: &str, notes: Vec<String>) -> Reported {
        let found = self.peek().clone();
        if found != TokKind::Invalid {
            let d = diag::error(
                diag::UNEXPECTED_TOKEN,
                format!("expected {what}, found {}", found.describe()),
            )
            .with_labels(vec![diag::primary(self.span(), format!("expected {what}"))])
            .with_notes(notes);
            self.report(d);
        }
        Reported
    }

    fn expect_punct(&mut self, p: Punct) -> PResult<Span> {
        match self.eat_punct(p) {
            Some(span) => Ok(span),
            None => Err(self.expected(&format!("`{}`", p.as_str()))),
        }
    }

    fn expect_kw(&mut self, k: Keyword) -> PResult<Span> {
        if self.at_kw(k) {
            return Ok(self.bump().span);
        }
        Err(self.expected(&format!("`{}`", k.as_str())))
    }

    fn expect_ident(&mut self, what: &str) -> PResult<Ident> {
        if let TokKind::Ident(name) = self.peek() {
            let name = name.clone();
            return Ok(Ident {
                name,
                span: self.bump().span,
            });
        }
        let notes = match self.peek() {
            TokKind::Kw(k) => vec![format!(
                "note: `{}` is a keyword and cannot be a name",
                k.as_str()
            )],
            _ => Vec::new(),
        };
        Err(self.expected_with(what, notes))
    }

    fn expect_string(&mut self, what: &str) -> PResult<StrLit> {
        if let TokKind::Str(s) = self.peek() {
            let s = s.clone();
            self.bump();
            return Ok(s);
        }
        Err(self.expected(what))
    }

    /// Expects the closer of the delimiter opened at `open`. Running into something that can
    /// only come after the construct (a keyword, another closer, end of file) means the
    /// delimiter was left open, which is reported with both ends labeled.
    fn expect_closer(&mut self, open: Span, close: Punct, expected: &str) -> PResult<Span> {
        if let Some(span) = self.eat_punct(close) {
            return Ok(span);
        }
        let structural = match self.peek() {
            TokKind::Eof => true,
            TokKind::Kw(k) => k.starts_item() || k.starts_stmt(),
            TokKind::Punct(p) => p.is_closer(),
            _ => false,
        };
        if !structural {
            return Err(self.expected(expected));
        }
        let opener = match close {
            Punct::RParen => "(",
            Punct::RBracket => "[",
            _ => "{",
        };
        let found = self.peek().describe();
        let d = diag::error(diag::UNCLOSED_DELIMITER, format!("unclosed `{opener}`")).with_labels(
            vec![
                diag::primary(open, format!("this `{opener}` is never closed")),
                diag::secondary(
                    self.span(),
                    format!("expected `{}` before {found}", close.as_str()),
                ),
            ],
        );
        self.report(d);
        Err(Reported)
    }

    /// `open item (, item)* ,? close` (the opener is the current token). Returns the items and
    /// the span from opener to closer.
    fn delimited<T>(
        &mut self,
        open: Punct,
        close: Punct,
        allow_empty: bool,
        mut item: impl FnMut(&mut Parser) -> PResult<T>,
    ) -> PResult<(Vec<T>, Span)> {
        let open_span = self.expect_punct(open)?;
        let mut items = Vec::new();
        let sep_or_close = format!("`,` or `{}`", close.as_str());
        if self.at_punct(close) {
            if !allow_empty {
                return Err(self.expected("an expression"));
            }
            let end = self.bump().span;
            return Ok((items, open_span.to(end)));
        }
        loop {
            items.push(item(self)?);
            if self.eat_punct(Punct::Comma).is_some() {
                // A trailing comma is accepted.
                if let Some(end) = self.eat_punct(close) {
                    return Ok((items, open_span.to(end)));
                }
                continue;
            }
            let end = self.expect_closer(open_span, close, &sep_or_close)?;
            return Ok((items, open_span.to(end)));
        }
    }

    // ---- items ----

    fn items(&mut self) -> Vec<Item> {
        let mut items = Vec::new();
        while *self.peek() != TokKind::Eof {
            let item = match self.peek() {
                TokKind::Kw(Keyword::Model) => self.model().map(Item::Model),
                TokKind::Kw(Keyword::Param) => self.param().map(Item::Param),
                TokKind::Kw(Keyword::Layer) => self.layer().map(Item::Layer),
                TokKind::Kw(Keyword::Forward) => self.forward().map(Item::Forward),
                _ => {
                    let notes = vec![
                        "note: a file is a sequence of `model`, `param`, `layer` and `forward` items"
                            .to_string(),
                    ];
                    Err(self.expected_with("an item", notes))
                }
            };
            match item {
                Ok(item) => items.push(item),
                Err(Reported) => self.recover_item(),
            }
        }
        items
    }

    /// Skips to the next item keyword. Item keywords never occur inside items, so any of them,
    /// at any nesting depth, is a safe place to resume.
    fn recover_item(&mut self) {
        loop {
            match self.peek() {
                TokKind::Eof => return,
                TokKind::Kw(k) if k.starts_item() => return,
                _ => {
                    self.bump();
                }
            }
        }
    }

    fn model(&mut self) -> PResult<Model> {
        let start = self.bump().span;
        let name = self.expect_string("the model name (a string)")?;
        Ok(Model {
            span: start.to(name.span),
            name,
        })
    }

    fn param(&mut self) -> PResult<Param> {
        let start = self.bump().span;
        let name = self.expect_ident("a param name")?;
        self.expect_punct(Punct::Eq)?;
        let value = self.expr()?;
        let from = if self.at_kw(Keyword::From) {
            self.bump();
            Some(self.expect_string("a config key (a string)")?)
        } else {
            None
        };
        let span = start.to(self.prev_span());
        Ok(Param {
            name,
            value,
            from,
            span,
        })
    }

    fn layer(&mut self) -> PResult<Layer> {
        let start = self.bump().span;
        let name = self.expect_ident("a layer name")?;
        if !self.at_punct(Punct::LParen) {
            return Err(self.expected("`(` and the layer's parameters"));
        }
        let (params, _) = self.delimited(Punct::LParen, Punct::RParen, true, |p| {
            p.expect_ident("a parameter name")
        })?;
        let body = self.block()?;
        Ok(Layer {
            name,
            params,
            span: start.to(body.span),
            body,
        })
    }

    fn forward(&mut self) -> PResult<Forward> {
        let start = self.bump().span;
        let open = self.expect_punct(Punct::LParen)?;
        let input = self.expect_ident("the input's name")?;
        self.expect_closer(open, Punct::RParen, "`)`")?;
        let body = self.block()?;
        Ok(Forward {
            input,
            span: start.to(body.span),
            body,
        })
    }

    // ---- statements ----

    /// `{ stmt* }`. A block cut short by an item keyword or end of file is reported as unclosed
    /// but still returned, so its statements survive.
    fn block(&mut self) -> PResult<Block> {
        let open = self.expect_punct(Punct::LBrace)?;
        let mut stmts = Vec::new();
        loop {
            if let Some(close) = self.eat_punct(Punct::RBrace) {
                return Ok(Block {
                    stmts,
                    span: open.to(close),
                });
            }
            if self.at_item_boundary() {
                let _ = self.expect_closer(open, Punct::RBrace, "`}`");
                return Ok(Block {
                    stmts,
                    span: open.to(self.prev_span()),
                });
            }
            let before = self.pos;
            match self.stmt() {
                Ok(stmt) => stmts.push(stmt),
                Err(Reported) => {
                    self.recover_stmt();
                    if self.pos == before {
                        self.bump();
                    }
                }
            }
        }
    }

    /// Skips to the next statement start in this block: a statement keyword, a name that
    /// starts a line or is followed by `=`, the block's `}`, or an item boundary. A `{ ... }`
    /// met on the way is the body of the failed statement and is skipped whole. Keywords
    /// override open `(`/`[` (expressions cannot contain them), not open braces.
    fn recover_stmt(&mut self) {
        let mut braces = 0usize;
        let mut parens = 0usize;
        loop {
            let tok = &self.tokens[self.pos.min(self.tokens.len() - 1)];
            let line_start = tok.line_start;
            match self.peek() {
                TokKind::Eof => return,
                TokKind::Kw(k) if k.starts_item() => return,
                TokKind::Kw(k) if k.starts_stmt() && braces == 0 => return,
                TokKind::Ident(_)
                    if braces == 0
                        && (line_start
                            || parens == 0 && *self.peek_at(1) == TokKind::Punct(Punct::Eq)) =>
                {
                    return
                }
                TokKind::Punct(Punct::RBrace) if braces == 0 => return,
                TokKind::Punct(Punct::LBrace) => braces += 1,
                TokKind::Punct(Punct::RBrace) => braces -= 1,
                TokKind::Punct(Punct::LParen | Punct::LBracket) => parens += 1,
                TokKind::Punct(Punct::RParen | Punct::RBracket) => {
                    parens = parens.saturating_sub(1)
                }
                _ => {}
            }
            self.bump();
        }
    }

    /// The expression in `recur EXPR {` or `for v in a..EXPR {`. When it is missing, the error
    /// is reported and the body is still parsed, so its statements are checked too.
    fn expr_before_block(&mut self) -> PResult<Expr> {
        if self.at_punct(Punct::LBrace) {
            let span = self.span();
            self.expected("an expression");
            return Ok(Expr {
                kind: ExprKind::Error,
                span,
            });
        }
        self.expr()
    }

    fn stmt(&mut self) -> PResult<Stmt> {
        let start = self.span();
        let kind = match self.peek().clone() {
            TokKind::Kw(Keyword::Weight) => {
                self.bump();
                let name = self.expect_ident("a weight name")?;
                self.expect_punct(Punct::Eq)?;
                let key = self.expect_string("the checkpoint key (a string)")?;
                if !self.at_punct(Punct::LBracket) {
                    return Err(self.expected("the weight's shape `[...]`"));
                }
                let (shape, _) =
                    self.delimited(Punct::LBracket, Punct::RBracket, false, |p| p.expr())?;
                StmtKind::Weight { name, key, shape }
            }
            TokKind::Kw(Keyword::Let) => {
                self.bump();
                let mut names = vec![self.expect_ident("a name")?];
                while self.eat_punct(Punct::Comma).is_some() {
                    names.push(self.expect_ident("a name")?);
                }
                self.expect_punct(Punct::Eq)?;
                StmtKind::Let {
                    names,
                    value: self.expr()?,
                }
            }
            TokKind::Ident(name) => {
                let line_start = self.tokens[self.pos].line_start;
                let name = Ident {
                    name,
                    span: self.bump().span,
                };
                if !self.at_punct(Punct::Eq) && !line_start {
                    // `return s s`: the name is more likely junk after the previous statement
                    // than the start of an assignment.
                    let d = diag::error(
                        diag::UNEXPECTED_TOKEN,
                        format!("unexpected identifier `{}`", name.name),
                    )
                    .with_labels(vec![diag::primary(
                        name.span,
                        "not part of the previous statement, and not followed by `=`",
                    )]);
                    self.report(d);
                    return Err(Reported);
                }
                if !self.at_punct(Punct::Eq) {
                    let notes = if self.at_punct(Punct::LParen) {
                        vec!["help: a call's result must be bound: `let name = f(...)`".to_string()]
                    } else {
                        Vec::new()
                    };
                    return Err(self.expected_with("`=`", notes));
                }
                self.bump();
                StmtKind::Assign {
                    name,
                    value: self.expr()?,
                }
            }
            TokKind::Kw(Keyword::For) => {
                self.bump();
                let var = self.expect_ident("a loop variable")?;
                self.expect_kw(Keyword::In)?;
                let start = self.expr()?;
                self.expect_punct(Punct::DotDot)?;
                let end = self.expr_before_block()?;
                StmtKind::For {
                    var,
                    start,
                    end,
                    body: self.block()?,
                }
            }
            TokKind::Kw(Keyword::Recur) => {
                self.bump();
                let steps = self.expr_before_block()?;
                StmtKind::Recur {
                    steps,
                    body: self.block()?,
                }
            }
            TokKind::Kw(Keyword::State) => {
                self.bump();
                let name = self.expect_ident("the state's name")?;
                self.expect_punct(Punct::Eq)?;
                StmtKind::State {
                    name,
                    init: self.expr()?,
                }
            }
            TokKind::Kw(Keyword::Exit) => {
                self.bump();
                StmtKind::Exit(self.expr()?)
            }
            TokKind::Kw(Keyword::Cache) => {
                self.bump();
                StmtKind::Cache(self.expr()?)
            }
            TokKind::Kw(Keyword::ExitGate) => {
                self.bump();
                StmtKind::ExitGate(self.expr()?)
            }
            TokKind::Kw(Keyword::Return) => {
                self.bump();
                StmtKind::Return(self.expr()?)
            }
            TokKind::Kw(Keyword::If) => {
                self.bump();
                let lhs = self.expr_before_block()?;
                let cmp = match self.peek() {
                    TokKind::Punct(Punct::EqEq) => Some(CmpOp::Eq),
                    TokKind::Punct(Punct::NotEq) => Some(CmpOp::Ne),
                    _ => None,
                };
                let cmp = match cmp {
                    Some(op) => {
                        self.bump();
                        Some((op, self.expr_before_block()?))
                    }
                    None => None,
                };
                let then = self.block()?;
                let els = if matches!(self.peek(), TokKind::Kw(Keyword::Else)) {
                    self.bump();
                    Some(self.block()?)
                } else {
                    None
                };
                StmtKind::If {
                    lhs,
                    cmp,
                    then,
                    els,
                }
            }
            _ => return Err(self.expected_with("a statement", vec![format!("note: {STMT_FORMS}")])),
        };
        Ok(Stmt {
            kind,
            span: start.to(self.prev_span()),
        })
    }

    // ---- expressions ----

    fn expr(&mut self) -> PResult<Expr> {
        let mut lhs = self.term()?;
        loop {
            let op = match self.peek() {
                TokKind::Punct(Punct::Plus) => BinOp::Add,
                TokKind::Punct(Punct::Minus) => BinOp::Sub,
                _ => return Ok(lhs),
            };
            lhs = self.binary_rhs(lhs, op, Parser::term)?;
        }
    }

    fn term(&mut self) -> PResult<Expr> {
        let mut lhs = self.unary()?;
        loop {
            let op = match self.peek() {
                TokKind::Punct(Punct::Star) => BinOp::Mul,
                TokKind::Punct(Punct::Slash) => BinOp::Div,
                TokKind::Punct(Punct::Percent) => BinOp::Rem,
                _ => return Ok(lhs),
            };
            lhs = self.binary_rhs(lhs, op, Parser::unary)?;
        }
    }

    fn binary_rhs(
        &mut self,
        lhs: Expr,
        op: BinOp,
        operand: fn(&mut Parser) -> PResult<Expr>,
    ) -> PResult<Expr> {
        let op_span = self.bump().span;
        if !self.at_expr_start() {
            let found = self.peek().clone();
            if found != TokKind::Invalid {
                let d = diag::error(
                    diag::UNEXPECTED_TOKEN,
                    format!(
                        "expected an expression after `{}`, found {}",
                        op.symbol(),
                        found.describe()
                    ),
                )
                .with_labels(vec![
                    diag::primary(self.span(), "expected an expression"),
                    diag::secondary(op_span, "this operator has no right operand"),
                ]);
                self.report(d);
            }
            return Err(Reported);
        }
        let rhs = operand(self)?;
        let span = lhs.span.to(rhs.span);
        Ok(Expr {
            kind: ExprKind::Binary {
                op,
                op_span,
                lhs: Box::new(lhs),
                rhs: Box::new(rhs),
            },
            span,
        })
    }

    fn at_expr_start(&self) -> bool {
        matches!(
            self.peek(),
            TokKind::Int(_)
                | TokKind::Float(_)
                | TokKind::Str(_)
                | TokKind::Ident(_)
                | TokKind::Invalid
                | TokKind::Punct(Punct::LParen | Punct::LBracket | Punct::Minus)
        )
    }

    fn unary(&mut self) -> PResult<Expr> {
        if let Some(minus) = self.eat_punct(Punct::Minus) {
            let operand = self.unary()?;
            let span = minus.to(operand.span);
            return Ok(Expr {
                kind: ExprKind::Neg(Box::new(operand)),
                span,
            });
        }
        self.postfix()
    }

    fn postfix(&mut self) -> PResult<Expr> {
        let mut e = self.primary()?;
        loop {
            if self.at_punct(Punct::LParen) {
                let paren = self.span();
                let (args, args_span) =
                    self.delimited(Punct::LParen, Punct::RParen, true, |p| p.arg())?;
                let span = e.span.to(args_span);
                e = match e.kind {
                    ExprKind::Name(callee) => Expr {
                        kind: ExprKind::Call { callee, args },
                        span,
                    },
                    ExprKind::Error => Expr {
                        kind: ExprKind::Error,
                        span,
                    },
                    _ => {
                        self.report(
                            diag::error(diag::CALL_NON_NAME, "only names can be called")
                                .with_labels(vec![
                                    diag::primary(paren, "call here"),
                                    diag::secondary(e.span, "this is not a function or layer name"),
                                ]),
                        );
                        Expr {
                            kind: ExprKind::Error,
                            span,
                        }
                    }
                };
            } else if let Some(open) = self.eat_punct(Punct::LBracket) {
                let index = self.expr()?;
                let close = self.expect_closer(open, Punct::RBracket, "`]`")?;
                let span = e.span.to(close);
                e = Expr {
                    kind: ExprKind::Index {
                        base: Box::new(e),
                        index: Box::new(index),
                    },
                    span,
                };
            } else {
                return Ok(e);
            }
        }
    }

    fn arg(&mut self) -> PResult<Arg> {
        let name = match (self.peek(), self.peek_at(1)) {
            (TokKind::Ident(name), TokKind::Punct(Punct::Eq)) => {
                let ident = Ident {
                    name: name.clone(),
                    span: self.bump().span,
                };
                self.bump();
                Some(ident)
            }
            _ => None,
        };
        let value = self.expr()?;
        let span = name.as_ref().map_or(value.span, |n| n.span.to(value.span));
        Ok(Arg { name, value, span })
    }

    fn primary(&mut self) -> PResult<Expr> {
        let span = self.span();
        let kind = match self.peek().clone() {
            TokKind::Int(v) => ExprKind::Int(v),
            TokKind::Float(v) => ExprKind::Float(v),
            TokKind::Str(s) => ExprKind::Str(s),
            TokKind::Ident(name) => ExprKind::Name(Ident { name, span }),
            // Already reported by the lexer: stand in for it so the statement still parses.
            TokKind::Invalid => ExprKind::Error,
            TokKind::Punct(Punct::LParen) => {
                let open = self.bump().span;
                let inner = self.expr()?;
                let close = self.expect_closer(open, Punct::RParen, "`)`")?;
                return Ok(Expr {
                    kind: inner.kind,
                    span: open.to(close),
                });
            }
            TokKind::Punct(Punct::LBracket) => {
                let (items, span) =
                    self.delimited(Punct::LBracket, Punct::RBracket, false, |p| p.expr())?;
                return Ok(Expr {
                    kind: ExprKind::List(items),
                    span,
                });
            }
            _ => return Err(self.expected("an expression")),
        };
        self.bump();
        Ok(Expr { kind, span })
    }
}
