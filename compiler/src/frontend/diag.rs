//! Diagnostics: the source map, rendering, and the table of error codes.
//!
//! | code  | meaning                                                              |
//! |-------|----------------------------------------------------------------------|
//! | E0001 | unexpected token (the message says what was expected)                |
//! | E0002 | unterminated string literal                                          |
//! | E0003 | invalid number literal (malformed, or out of range)                  |
//! | E0004 | unclosed delimiter `(` `[` `{` (labels the opener and where it ended) |
//! | E0005 | unexpected character                                                 |
//! | E0006 | unknown escape sequence in a string                                  |
//! | E0007 | malformed `{name}` interpolation in a string                         |
//! | E0008 | call of something that is not a name                                 |
//! | E0009 | too many syntax errors; parsing stopped                              |
//! | E0101 | duplicate `param`                                                    |
//! | E0102 | unknown name in a `param` expression                                 |
//! | E0103 | `param` used before its definition                                   |
//! | E0104 | integer division that does not divide exactly                        |
//! | E0105 | division by zero                                                     |
//! | E0106 | expression not allowed in a `param` (only numbers, params, `+ - * /`, `sqrt`) |
//! | E0107 | integer overflow in a `param`                                        |
//! | E0108 | bad `sqrt` call (argument count, negative argument)                  |
//! | E0201 | `--set` names no param                                               |
//! | E0202 | malformed `--set` argument (not `name=value`)                        |
//! | E0203 | `--set` value is not a number                                        |
//! | E0204 | config.json value has the wrong JSON type                            |
//! | E0205 | override value does not fit an integer param (fractional, too large) |
//! | E0206 | config.json key that no param reads and no `ignore` lists            |
//! | E0207 | a `require` does not hold for the bound params                       |
//! | W0201 | warning: config.json keys that no param reads (`ParamEnv::unused_config_warning`) |

use codespan_reporting::diagnostic::{Label, Severity};
use codespan_reporting::files::SimpleFiles;
use codespan_reporting::term;
use codespan_reporting::term::termcolor::{Buffer, WriteColor};

use super::span::Span;

pub type Diagnostic = codespan_reporting::diagnostic::Diagnostic<usize>;

pub const UNEXPECTED_TOKEN: &str = "E0001";
pub const UNTERMINATED_STRING: &str = "E0002";
pub const INVALID_NUMBER: &str = "E0003";
pub const UNCLOSED_DELIMITER: &str = "E0004";
pub const UNEXPECTED_CHAR: &str = "E0005";
pub const BAD_ESCAPE: &str = "E0006";
pub const BAD_INTERPOLATION: &str = "E0007";
pub const CALL_NON_NAME: &str = "E0008";
pub const TOO_MANY_ERRORS: &str = "E0009";
pub const DUPLICATE_PARAM: &str = "E0101";
pub const UNKNOWN_NAME: &str = "E0102";
pub const USE_BEFORE_DEF: &str = "E0103";
pub const INEXACT_DIVISION: &str = "E0104";
pub const DIVISION_BY_ZERO: &str = "E0105";
pub const UNSUPPORTED_PARAM_EXPR: &str = "E0106";
pub const INT_OVERFLOW: &str = "E0107";
pub const BAD_SQRT: &str = "E0108";
pub const UNKNOWN_SET_NAME: &str = "E0201";
pub const MALFORMED_SET: &str = "E0202";
pub const BAD_SET_VALUE: &str = "E0203";
pub const CONFIG_WRONG_TYPE: &str = "E0204";
pub const NOT_AN_INTEGER: &str = "E0205";
pub const UNKNOWN_CONFIG_KEY: &str = "E0206";
pub const REQUIREMENT_FAILED: &str = "E0207";
pub const UNUSED_CONFIG_KEYS: &str = "W0201";

/// The source texts that spans point into. File ids are those of the wrapped `SimpleFiles`.
#[derive(Debug, Default)]
pub struct SourceMap {
    files: SimpleFiles<String, String>,
    len: usize,
}

impl SourceMap {
    pub fn new() -> SourceMap {
        SourceMap::default()
    }

    /// Adds a file and returns its id (ids are 0, 1, 2, ... in order of addition).
    pub fn add(&mut self, name: impl Into<String>, text: impl Into<String>) -> usize {
        self.len += 1;
        self.files.add(name.into(), text.into())
    }

    pub fn name(&self, file: usize) -> Option<&str> {
        self.files.get(file).ok().map(|f| f.name().as_str())
    }

    pub fn source(&self, file: usize) -> Option<&str> {
        self.files.get(file).ok().map(|f| f.source().as_str())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn files(&self) -> &SimpleFiles<String, String> {
        &self.files
    }
}

/// An error diagnostic with its code and message.
pub fn error(code: &str, message: impl Into<String>) -> Diagnostic {
    Diagnostic::error()
        .with_code(code)
        .with_message(message.into())
}

pub fn primary(span: Span, message: impl Into<String>) -> Label<usize> {
    Label::primary(span.file, span.range()).with_message(message.into())
}

pub fn secondary(span: Span, message: impl Into<String>) -> Label<usize> {
    Label::secondary(span.file, span.range()).with_message(message.into())
}

pub fn has_errors(diags: &[Diagnostic]) -> bool {
    diags.iter().any(|d| d.severity >= Severity::Error)
}

/// Renders diagnostics as the terminal would show them (ANSI colors only when `color`).
pub fn render(source_map: &SourceMap, diags: &[Diagnostic], color: bool) -> String {
    let mut buffer = if color {
        Buffer::ansi()
    } else {
        Buffer::no_color()
    };
    let config = term::Config::default();
    for diag in diags {
        if term::emit(&mut buffer, &config, source_map.files(), diag).is_err() {
            // A label pointing outside its file is a compiler bug, but the message must still
            // reach the user, so fall back to a plain line.
            fallback(&mut buffer, diag);
        }
    }
    String::from_utf8_lossy(buffer.as_slice()).into_owned()
}

fn fallback(out: &mut dyn WriteColor, diag: &Diagnostic) {
    let severity = match diag.severity {
        Severity::Bug => "bug",
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Note => "note",
        Severity::Help => "help",
    };
    let code = diag
        .code
        .as_deref()
        .map(|c| format!("[{c}]"))
        .unwrap_or_default();
    let _ = writeln!(out, "{severity}{code}: {}", diag.message);
    for note in &diag.notes {
        let _ = writeln!(out, "  = {note}");
    }
}
