//! The runtime's error type. Every failure caused by user input (artifact bytes, weight files,
//! token ids, call arguments) is reported through [`RuntimeError`]; the runtime does not panic
//! on such input.

use std::path::PathBuf;

/// Result alias used throughout the runtime.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

fn fmt_shape(s: &[usize]) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

fn fmt_similar(similar: &[String]) -> String {
    if similar.is_empty() {
        String::new()
    } else {
        let quoted: Vec<String> = similar.iter().map(|s| format!("`{s}`")).collect();
        format!("; similar names in the checkpoint: {}", quoted.join(", "))
    }
}

fn fmt_more(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more declared weights are missing too)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot read `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The stability guard (in `error` mode) saw a state row go non-finite or blow up.
    #[error("unstable recurrence: {0} (see `--guard`: warn, clamp or off to continue)")]
    Unstable(String),

    /// The artifact file is not a well-formed loopc artifact.
    #[error("invalid artifact: {0}")]
    Artifact(String),

    /// The manifest decodes but is inconsistent (bad ids, mismatched shapes, ...).
    #[error("inconsistent artifact manifest: {0}")]
    Manifest(String),

    /// A safetensors file cannot be parsed, or a checkpoint directory is malformed.
    #[error("invalid checkpoint `{}`: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    #[error(
        "checkpoint has no tensor `{name}` (expected shape {}, declared at {origin}){}{}",
        fmt_shape(expected), fmt_similar(similar), fmt_more(*also_missing)
    )]
    MissingWeight {
        name: String,
        expected: Vec<usize>,
        origin: String,
        similar: Vec<String>,
        also_missing: usize,
    },

    #[error(
        "checkpoint tensor `{name}` has shape {} ({found_elems} elements) but the model declares {} ({expected_elems} elements) at {origin}",
        fmt_shape(found), fmt_shape(expected)
    )]
    WeightShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        expected_elems: usize,
        found_elems: usize,
        origin: String,
    },

    #[error("checkpoint tensor `{name}` has dtype {dtype}, which the runtime cannot load (supported: F32, BF16, F16, F64), declared at {origin}")]
    WeightDtype {
        name: String,
        dtype: String,
        origin: String,
    },

    /// The kernels' shared object cannot be loaded.
    #[error("cannot load the artifact's kernels: {0}")]
    KernelLoad(String),

    #[error("kernel symbol `{symbol}` (kernel #{kernel}) is missing from the artifact's shared object: {msg}")]
    MissingSymbol {
        symbol: String,
        kernel: usize,
        msg: String,
    },

    #[error("token id {token} at input index {index} is out of range (the embedding table has {limit} rows)")]
    TokenOutOfRange {
        token: u32,
        index: usize,
        limit: usize,
    },

    #[error("empty input: a call needs at least one token")]
    EmptyInput,

    #[error("the recurrence needs at least one iteration, but steps = 0 (from set_steps or the artifact's default)")]
    ZeroSteps,

    #[error("cannot allocate {} for {what}", bytes_text(*.bytes))]
    Alloc { bytes: u128, what: String },

    #[error("invalid setting: {0}")]
    Config(String),

    /// The CUDA device cannot be used (no driver, no device, a driver error, a capability below
    /// the artifact's).
    #[error("cuda: {0}")]
    Cuda(String),

    /// The artifact uses something the CUDA executor cannot run yet.
    #[error("unsupported on cuda: {0}")]
    Unsupported(String),
}

impl RuntimeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn manifest(msg: impl Into<String>) -> Self {
        RuntimeError::Manifest(msg.into())
    }
}

/// A `0`/`1` switch read from the environment variable `name` (`default` when unset); any
/// other value is a configuration error that names the variable.
pub(crate) fn env_switch(name: &str, default: bool) -> Result<bool> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.trim() {
            "1" => Ok(true),
            "0" => Ok(false),
            _ => Err(RuntimeError::Config(format!(
                "{name} must be 0 or 1, got `{v}`"
            ))),
        },
    }
}

/// A byte count for an allocation error; one past the address space says so (a KV cache asked
/// for an absurd depth or length, say), as its 39 digits would not.
fn bytes_text(bytes: u128) -> String {
    if bytes > usize::MAX as u128 {
        let gib = bytes as f64 / (1u64 << 30) as f64;
        format!("{gib:.3e} GiB (more than the address space)")
    } else {
        format!("{bytes} bytes")
    }
}
