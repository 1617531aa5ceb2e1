//! Tokens. Lexical errors are reported here and leave an [`TokKind::Invalid`] token behind, so
//! the parser can skip it without reporting a second error for the same text.

use super::ast::{Ident, StrLit, StrPart};
use super::diag::{self, Diagnostic};
use super::span::Span;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keyword {
    Model,
    Param,
    From,
    Layer,
    Forward,
    Weight,
    Let,
    For,
    In,
    Recur,
    State,
    Exit,
    Cache,
    ExitGate,
    Router,
    As,
    Return,
    If,
    Else,
    Ignore,
    Require,
}

const KEYWORDS: [(&str, Keyword); 21] = [
    ("model", Keyword::Model),
    ("param", Keyword::Param),
    ("from", Keyword::From),
    ("layer", Keyword::Layer),
    ("forward", Keyword::Forward),
    ("weight", Keyword::Weight),
    ("let", Keyword::Let),
    ("for", Keyword::For),
    ("in", Keyword::In),
    ("recur", Keyword::Recur),
    ("state", Keyword::State),
    ("exit", Keyword::Exit),
    ("cache", Keyword::Cache),
    ("exit_gate", Keyword::ExitGate),
    ("router", Keyword::Router),
    ("as", Keyword::As),
    ("return", Keyword::Return),
    ("if", Keyword::If),
    ("else", Keyword::Else),
    ("ignore", Keyword::Ignore),
    ("require", Keyword::Require),
];

impl Keyword {
    pub fn as_str(self) -> &'static str {
        KEYWORDS
            .iter()
            .find(|(_, k)| *k == self)
            .map_or("?", |(s, _)| s)
    }

    pub fn starts_item(self) -> bool {
        matches!(
            self,
            Keyword::Model
                | Keyword::Param
                | Keyword::Layer
                | Keyword::Forward
                | Keyword::Ignore
                | Keyword::Require
        )
    }

    pub fn starts_stmt(self) -> bool {
        matches!(
            self,
            Keyword::Weight
                | Keyword::Let
                | Keyword::For
                | Keyword::Recur
                | Keyword::State
                | Keyword::Exit
                | Keyword::Cache
                | Keyword::ExitGate
                | Keyword::Router
                | Keyword::Return
                | Keyword::If
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Punct {
    LParen,
    RParen,
    LBrace,
    RBrace,
    LBracket,
    RBracket,
    Comma,
    Eq,
    DotDot,
    EqEq,
    NotEq,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
}

impl Punct {
    pub fn as_str(self) -> &'static str {
        match self {
            Punct::LParen => "(",
            Punct::RParen => ")",
            Punct::LBrace => "{",
            Punct::RBrace => "}",
            Punct::LBracket => "[",
            Punct::RBracket => "]",
            Punct::Comma => ",",
            Punct::Eq => "=",
            Punct::DotDot => "..",
            Punct::EqEq => "==",
            Punct::NotEq => "!=",
            Punct::Plus => "+",
            Punct::Minus => "-",
            Punct::Star => "*",
            Punct::Slash => "/",
            Punct::Percent => "%",
        }
    }

    pub fn is_closer(self) -> bool {
        matches!(self, Punct::RParen | Punct::RBrace | Punct::RBracket)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum TokKind {
    Ident(String),
    Kw(Keyword),
    Int(i64),
    Float(f64),
    Str(StrLit),
    Punct(Punct),
    /// Text the lexer already reported as an error.
    Invalid,
    Eof,
}

impl TokKind {
    /// How the token is named in "expected X, found Y" messages.
    pub fn describe(&self) -> String {
        match self {
            TokKind::Ident(name) => format!("identifier `{name}`"),
            TokKind::Kw(k) => format!("keyword `{}`", k.as_str()),
            TokKind::Int(v) => format!("integer `{v}`"),
            TokKind::Float(v) => format!("number `{v:?}`"),
            TokKind::Str(_) => "string literal".to_string(),
            TokKind::Punct(p) => format!("`{}`", p.as_str()),
            TokKind::Invalid => "invalid token".to_string(),
            TokKind::Eof => "end of file".to_string(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub kind: TokKind,
    pub span: Span,
    /// First token on its line: statements normally start lines, which error recovery uses.
    pub line_start: bool,
}

/// Splits `src` into tokens, always ending with one `Eof` token.
pub fn lex(src: &str, file: usize) -> (Vec<Token>, Vec<Diagnostic>) {
    let mut lexer = Lexer {
        src,
        file,
        pos: 0,
        tokens: Vec::new(),
        diags: Vec::new(),
    };
    lexer.run();
    (lexer.tokens, lexer.diags)
}

struct Lexer<'a> {
    src: &'a str,
    file: usize,
    pos: usize,
    tokens: Vec<Token>,
    diags: Vec<Diagnostic>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

impl<'a> Lexer<'a> {
    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn peek2(&self) -> Option<char> {
        let mut chars = self.src[self.pos..].chars();
        chars.next();
        chars.next()
    }

    fn span(&self, start: usize, end: usize) -> Span {
        Span::new(self.file, start, end)
    }

    fn push(&mut self, kind: TokKind, start: usize) {
        let span = self.span(start, self.pos);
        self.push_token(kind, span);
    }

    fn push_token(&mut self, kind: TokKind, span: Span) {
        let prev_end = self.tokens.last().map_or(0, |t| t.span.end as usize);
        let gap = self.src.get(prev_end..span.start as usize).unwrap_or("");
        let line_start = self.tokens.is_empty() || gap.contains('\n');
        self.tokens.push(Token {
            kind,
            span,
            line_start,
        });
    }

    fn run(&mut self) {
        while let Some(c) = self.peek() {
            let start = self.pos;
            if c.is_whitespace() {
                self.pos += c.len_utf8();
            } else if c == '#' {
                self.pos = self.src[start..]
                    .find('\n')
                    .map_or(self.src.len(), |i| start + i);
            } else if is_ident_start(c) {
                self.ident();
            } else if c.is_ascii_digit() {
                self.number();
            } else if c == '"' {
                self.string();
            } else if let Some(p) = self.punct(c) {
                self.push(TokKind::Punct(p), start);
            } else {
                self.unexpected_chars();
            }
        }
        let end = self.src.len();
        self.push_token(TokKind::Eof, self.span(end, end));
    }

    fn ident(&mut self) {
        let start = self.pos;
        while self.peek().is_some_and(is_ident_char) {
            self.pos += 1;
        }
        let text = &self.src[start..self.pos];
        let kind = match KEYWORDS.iter().find(|(s, _)| *s == text) {
            Some((_, k)) => TokKind::Kw(*k),
            None => TokKind::Ident(text.to_string()),
        };
        self.push(kind, start);
    }

    fn punct(&mut self, c: char) -> Option<Punct> {
        let p = match c {
            '(' => Punct::LParen,
            ')' => Punct::RParen,
            '{' => Punct::LBrace,
            '}' => Punct::RBrace,
            '[' => Punct::LBracket,
            ']' => Punct::RBracket,
            ',' => Punct::Comma,
            '=' if self.peek2() == Some('=') => {
                self.pos += 2;
                return Some(Punct::EqEq);
            }
            '!' if self.peek2() == Some('=') => {
                self.pos += 2;
                return Some(Punct::NotEq);
            }
            '=' => Punct::Eq,
            '+' => Punct::Plus,
            '-' => Punct::Minus,
            '*' => Punct::Star,
            '/' => Punct::Slash,
            '%' => Punct::Percent,
            '.' if self.peek2() == Some('.') => {
                self.pos += 2;
                return Some(Punct::DotDot);
            }
            _ => return None,
        };
        self.pos += 1;
        Some(p)
    }

    /// Takes the longest run of characters that could belong to a number (so `12abc` or `1.5.2`
    /// is one bad literal, not several tokens), then validates it.
    fn number(&mut self) {
        let start = self.pos;
        while let Some(c) = self.peek() {
            let prev = self.src[start..self.pos].chars().last();
            let take = is_ident_char(c)
                || (c == '.' && self.peek2() != Some('.'))
                || ((c == '+' || c == '-') && matches!(prev, Some('e' | 'E')));
            if !take {
                break;
            }
            self.pos += c.len_utf8();
        }
        let text = &self.src[start..self.pos];
        let span = self.span(start, self.pos);
        let kind = match classify_number(text) {
            NumShape::Int => match text.parse::<i64>() {
                Ok(v) => TokKind::Int(v),
                Err(_) => self.bad_number(span, text, "does not fit in a 64-bit integer"),
            },
            NumShape::Float => match text.parse::<f64>() {
                Ok(v) if v.is_finite() => TokKind::Float(v),
                _ => self.bad_number(span, text, "is out of range for a 64-bit float"),
            },
            NumShape::Invalid => self.bad_number(span, text, "is not a valid number"),
        };
        self.push_token(kind, span);
    }

    fn bad_number(&mut self, span: Span, text: &str, why: &str) -> TokKind {
        self.diags.push(
            diag::error(
                diag::INVALID_NUMBER,
                format!("invalid number literal `{text}`"),
            )
            .with_labels(vec![diag::primary(span, format!("this {why}"))])
            .with_notes(vec![
                "help: numbers are written like `50000`, `1.0` or `1e-6`".into(),
            ]),
        );
        TokKind::Invalid
    }

    fn unexpected_chars(&mut self) {
        let start = self.pos;
        let first = self.peek().unwrap_or('\0');
        // One error per run of junk (`@@@`), ending at anything that could start a real token.
        while let Some(c) = self.peek() {
            let boundary = c.is_whitespace()
                || is_ident_char(c)
                || matches!(c, '"' | '#' | ';')
                || first == ';'
                || self.punct_at(c)
                || (c == '.' && self.peek2() == Some('.'));
            if self.pos > start && boundary {
                break;
            }
            self.pos += c.len_utf8();
        }
        let text = &self.src[start..self.pos];
        let span = self.span(start, self.pos);
        let mut d = diag::error(
            diag::UNEXPECTED_CHAR,
            format!("unexpected character `{text}`"),
        )
        .with_labels(vec![diag::primary(span, "not valid here")]);
        if first == ';' {
            // A stray `;` is harmless noise, so it leaves no token behind.
            d = d.with_notes(vec![
                "help: statements need no separator; remove the `;`".into()
            ]);
            self.diags.push(d);
            return;
        }
        if first == '.' {
            d = d.with_notes(vec!["help: ranges are written `start..end`".into()]);
        }
        self.diags.push(d);
        self.push(TokKind::Invalid, start);
    }

    fn punct_at(&self, c: char) -> bool {
        matches!(
            c,
            '(' | ')' | '{' | '}' | '[' | ']' | ',' | '=' | '+' | '-' | '*' | '/' | '%'
        )
    }

    /// Strings end at the closing quote or, unterminated, at the end of the line: a missing
    /// quote then damages one line rather than the rest of the file.
    fn string(&mut self) {
        let start = self.pos;
        self.pos += 1;
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut closed = false;
        loop {
            let Some(c) = self.peek() else {
                self.unterminated(start);
                break;
            };
            let at = self.pos;
            match c {
                '"' => {
                    self.pos += 1;
                    closed = true;
                    break;
                }
                '\n' | '\r' => {
                    self.unterminated(start);
                    break;
                }
                '\\' => {
                    self.pos += 1;
                    match self.peek() {
                        Some(e @ ('"' | '\\' | 'n' | 't')) => {
                            self.pos += 1;
                            text.push(match e {
                                'n' => '\n',
                                't' => '\t',
                                other => other,
                            });
                        }
                        Some(e) if e != '\n' && e != '\r' => {
                            self.pos += e.len_utf8();
                            let span = self.span(at, self.pos);
                            self.diags.push(
                                diag::error(diag::BAD_ESCAPE, format!("unknown escape `\\{e}`"))
                                    .with_labels(vec![diag::primary(span, "unknown escape")])
                                    .with_notes(vec![
                                        "help: the escapes are `\\\"`, `\\\\`, `\\n` and `\\t`"
                                            .into(),
                                    ]),
                            );
                            text.push(e);
                        }
                        _ => text.push('\\'),
                    }
                }
                '{' if self.peek2() == Some('{') => {
                    self.pos += 2;
                    text.push('{');
                }
                '}' if self.peek2() == Some('}') => {
                    self.pos += 2;
                    text.push('}');
                }
                '{' => {
                    if let Some(ident) = self.interpolation() {
                        if !text.is_empty() {
                            parts.push(StrPart::Text(std::mem::take(&mut text)));
                        }
                        parts.push(StrPart::Interp(ident));
                    }
                }
                '}' => {
                    self.pos += 1;
                    let span = self.span(at, self.pos);
                    self.diags.push(
                        diag::error(diag::BAD_INTERPOLATION, "unmatched `}` in string")
                            .with_labels(vec![diag::primary(span, "no `{` opens this")])
                            .with_notes(vec!["help: write `}}` for a literal brace".into()]),
                    );
                    text.push('}');
                }
                _ => {
                    self.pos += c.len_utf8();
                    text.push(c);
                }
            }
        }
        if !text.is_empty() {
            parts.push(StrPart::Text(text));
        }
        let span = self.span(start, self.pos);
        self.push_token(TokKind::Str(StrLit { parts, span }), span);
        if !closed {
            // The string probably swallowed what was meant to follow it; an invalid token makes
            // the parser skip ahead quietly instead of complaining about the missing rest.
            self.push_token(TokKind::Invalid, self.span(self.pos, self.pos));
        }
    }

    /// At `{`: reads `{name}`. On error, reports it and skips what was meant as the
    /// interpolation (up to `}` on this string, else just the `{`).
    fn interpolation(&mut self) -> Option<Ident> {
        let open = self.pos;
        self.pos += 1;
        let name_start = self.pos;
        while self.peek().is_some_and(is_ident_char) {
            self.pos += 1;
        }
        let name = &self.src[name_start..self.pos];
        let valid = name.chars().next().is_some_and(is_ident_start);
        if valid && self.peek() == Some('}') {
            let ident = Ident {
                name: name.to_string(),
                span: self.span(name_start, self.pos),
            };
            self.pos += 1;
            return Some(ident);
        }
        let rest = &self.src[open..];
        let line_end = rest.find(['"', '\n', '\r']).unwrap_or(rest.len());
        let end = match rest[..line_end].find('}') {
            Some(i) => open + i + 1,
            None => open + 1,
        };
        self.pos = end;
        let span = self.span(open, end);
        self.diags.push(
            diag::error(diag::BAD_INTERPOLATION, "malformed interpolation in string")
                .with_labels(vec![diag::primary(span, "expected `{name}`")])
                .with_notes(vec![
                    "help: write `{name}` to insert a name's value, or `{{` for a literal brace"
                        .into(),
                ]),
        );
        None
    }

    fn unterminated(&mut self, start: usize) {
        let span = self.span(start, self.pos);
        self.diags.push(
            diag::error(diag::UNTERMINATED_STRING, "unterminated string")
                .with_labels(vec![diag::primary(span, "this string is never closed")])
                .with_notes(vec![
                    "help: strings end on the line they start; add a `\"`".into()
                ]),
        );
    }
}

enum NumShape {
    Int,
    Float,
    Invalid,
}

/// `digits`, or `digits (. digits)? ([eE] [+-]? digits)?` with a fraction or an exponent.
fn classify_number(text: &str) -> NumShape {
    let b = text.as_bytes();
    let digits = |mut i: usize| {
        let s = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        (i, i > s)
    };
    let (mut i, ok) = digits(0);
    if !ok {
        return NumShape::Invalid;
    }
    if i == b.len() {
        return NumShape::Int;
    }
    if b[i] == b'.' {
        let (j, ok) = digits(i + 1);
        if !ok {
            return NumShape::Invalid;
        }
        i = j;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        let (j, ok) = digits(i);
        if !ok {
            return NumShape::Invalid;
        }
        i = j;
    }
    if i == b.len() {
        NumShape::Float
    } else {
        NumShape::Invalid
    }
}
