//! The CUDA part of the artifact contract (`loopc build --target cuda`).
//!
//! Such an artifact is the same `LOOPCAR1` file with `Manifest::target == "cuda-sm_90"`
//! (`cuda-<arch>`); its object section holds the PTX text (UTF-8, one module) of every kernel
//! instead of a shared object, and [`Manifest::cuda`](super::Manifest::cuda) says how to launch
//! each one. The program, buffers, weights and derived weights are the CPU contract unchanged:
//! the runtime executes the same [`Program`](super::Program) with device buffers.
//!
//! ## Kernel ABI
//! Every entry takes scalar parameters only (no pointer arrays, so a launch needs no device
//! copy of its arguments):
//! - a `u64` device address per pointer, in the order the kernel's ABI lists them, then
//! - the kernel's `i64` (and, where listed, `f64`/`f32`) scalars in the listed order.
//!
//! A [`KernelSpec`](super::KernelSpec) kernel keeps its CPU pointer order (`Arg` order) and
//! takes [`KernelInts`](super::KernelInts) as four `i64`s: `(ptrs…, begin, end, pos0,
//! kv_len)`. Work item `i ∈ begin..end` (a row, or `(row, head)` for attention) is handled by
//! block `(i − begin) / items_per_block` of a launch with
//! `grid.x = ceil((end − begin) / items_per_block)`, `block.x = block` and `shared_bytes` of
//! dynamic shared memory. Blocks past `end` return at once.
//!
//! Matrix products (`MatMul`, `MatMulKN`, `MatMulParts`) are not kernels of the image: the
//! runtime runs them with cuBLAS and then the [`support`] epilogue kernels.
//!
//! ## Support kernels
//! The runtime's own operations (everything that is neither a generated kernel nor a product)
//! are entries of the same module, listed in [`CudaImage::support`] by the names of
//! [`support`]; a runtime refuses an image that lacks one it needs. The compiler generates
//! them (through the same `gpu`-dialect pipeline) so the runtime ships no device code.

use serde::{Deserialize, Serialize};

/// The launch table of a CUDA artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CudaImage {
    /// The PTX target, e.g. `sm_90`: the runtime refuses a device of a lower compute capability.
    pub arch: String,
    /// One per [`Manifest::kernels`](super::Manifest::kernels), in the same order.
    pub kernels: Vec<CudaKernel>,
    /// The support kernels, each under one of the names in [`support`].
    pub support: Vec<SupportKernel>,
}

/// How to launch one PTX entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CudaKernel {
    /// The PTX `.entry` name.
    pub entry: String,
    /// Threads per block (`block.x`).
    pub block: u32,
    /// Work items per block (rows, or `(row, head)` pairs for attention).
    pub items_per_block: u32,
    /// Dynamic shared memory per block, in bytes.
    #[serde(default)]
    pub shared_bytes: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SupportKernel {
    /// One of the names in [`support`].
    pub name: String,
    pub launch: CudaKernel,
}

impl CudaImage {
    pub fn support(&self, name: &str) -> Option<&CudaKernel> {
        self.support
            .iter()
            .find(|s| s.name == name)
            .map(|s| &s.launch)
    }
}

/// The support kernels: names and parameter lists (pointers are `u64` device addresses of
/// `f32` data unless stated; `?` marks a pointer that may be 0 for "absent"). Work items are
/// rows `0..rows`, spread over blocks as for generated kernels (`items_per_block` rows a block).
pub mod support {
    /// `out[r, :] = table[tokens[r], :]`.
    /// `(out, table, tokens: *const i32, rows: i64, cols: i64)`.
    pub const EMBED: &str = "embed";
    /// `dst[r·dst_stride + dst_off + c] = src[r·src_stride + src_off + c]` for `c < cols`:
    /// `Copy`, `Concat` (one launch per input), `SliceCols`, `PosEmbed` (`src` offset to row
    /// `pos0` of the table) and `KvWrite` (into the slot's rows).
    /// `(dst, src, rows: i64, cols: i64, dst_stride: i64, dst_off: i64, src_stride: i64,
    /// src_off: i64)`.
    pub const COPY_COLS: &str = "copy_cols";
    /// `Instr::Sinusoidal` for rows at positions `pos0 + r`, computed in f64.
    /// `(out, rows: i64, cols: i64, pos0: i64, base: f64)`.
    pub const SINUSOIDAL: &str = "sinusoidal";
    /// `Instr::TimingSignal` with `t = t0 + r·t_step` (`t_step` 1 for positions, 0 for the
    /// recurrence step), computed in f64.
    /// `(out, rows: i64, cols: i64, t0: i64, t_step: i64, min_timescale: f64,
    /// max_timescale: f64)`.
    pub const TIMING_SIGNAL: &str = "timing_signal";
    /// The first phase of an [`Epilogue`](crate::artifact::Epilogue) after the product `p`
    /// (`p` may be `out` itself, `p_stride = n`, `p_off = 0`):
    /// `out[r, j] = residual?[r, j] + row_scale?[r] · p[r·p_stride + p_off + j] + bias?[j]`.
    /// `(out, p, row_scale?, residual?, bias?, rows: i64, n: i64, p_stride: i64, p_off: i64)`.
    pub const EPILOGUE: &str = "epilogue";
    /// [`GluEpilogue`](crate::artifact::GluEpilogue): `out` is `glu.out` (`[rows, n]`), `p` the
    /// `[rows, 2n]` product; `act` is an [`act_code`].
    /// `(out, p, rows: i64, n: i64, block: i64, act: i64)`.
    pub const GLU: &str = "glu";
    /// [`NormEpilogue`](crate::artifact::NormEpilogue) over finished rows of `out`.
    /// `(out, gain?, inv_rms?, rows: i64, n: i64, normalize: i64, eps: f32)`.
    pub const ROW_NORM: &str = "row_norm";
    /// Per-row latent exit value between two states (`Criterion::LatentDiff` = 0:
    /// `‖a − b‖ / ‖a‖`; `Criterion::Cosine` = 1: `1 − cos(a, b)`), into `value[r]` (f32).
    /// `(value, a, b, rows: i64, n: i64, kind: i64)`.
    pub const EXIT_LATENT: &str = "exit_latent";
    /// Per-row exit value of a criterion that judges the output distribution, with each row's
    /// history kept on the device (the host's `exit.rs` maths, `f64` where it uses `f64`), for
    /// the rows whose `active[r]` (`i32`) is non-zero; other rows are left untouched.
    /// `kind`: 2 `Kl` (`KL(p_{t−1} ‖ p_t)`), 3 `MinpKl` (the same after the min-p filter),
    /// 4 `EntropyDiff` (`|H_t − H_{t−1}|`), 5 `ArgmaxStability` (the argmax's streak).
    /// History: `prev_logp` (`[rows, vocab]` f32 log-probabilities, for 2/3), `prev_h`
    /// (`[rows]` f64 entropies, for 4), `prev_am` / `count` (`[rows]` i32 argmax and streak,
    /// for 5). With `first != 0` the history is taken as the host's reset values (uniform
    /// `prev_logp = uniform`, `prev_h = 100`, no previous argmax) instead of being read.
    /// `value` is `[rows]` f64.
    /// `(value, logits, prev_logp, prev_h, prev_am: *i32, count: *i32, active: *const i32,
    /// rows: i64, vocab: i64, kind: i64, first: i64, uniform: f32)`.
    pub const EXIT_LOGITS: &str = "exit_logits";
    /// MoR expert choice before an iteration, for one sequence in one block (launched over one
    /// item): `σ = 1 / (1 + e^(−z[r]))` in f32 (the device rounds an f64 `e^x`, which is what a
    /// correctly rounded `expf` gives); with `rows > 1` the `k` active rows of highest `σ` are kept (ties to the earlier
    /// row), with one row it is kept when `σ ≥ threshold`; `keep[r]` (i32) is 1 for kept rows,
    /// `gate[r] = σ·alpha` for them and 0 for the others.
    /// `(keep: *i32, gate, z, active: *const i32, rows: i64, k: i64, threshold: f32,
    /// alpha: f32)`.
    pub const ROUTE_EXPERT: &str = "route_expert";
    /// MoR token choice, per row of `z` (`[rows, n]`): `d` the first maximum, `depth[r] =
    /// min(d + 1, cap)` (i32), `weight[r] = alpha · e^(z_d − max) / Σ e^(z_j − max)` (f32 sum in
    /// column order, `e^x` as in [`ROUTE_EXPERT`]).
    /// `(depth: *i32, weight, z, rows: i64, n: i64, cap: i64, alpha: f32)`.
    pub const ROUTE_TOKEN: &str = "route_token";
    /// `dst[r, :] = mask[r] != 0 ? src[r, :] : dst[r, :]` (`mask: *const i32`): freezes the
    /// state of exited rows while the active ones take the new one.
    /// `(dst, src, mask: *const i32, rows: i64, n: i64)`.
    pub const SELECT_ROWS: &str = "select_rows";
    /// [`RopeEpilogue`](crate::artifact::RopeEpilogue), in place after the other terms of a
    /// product's (or part's) epilogue: each head of `head_dim` columns of row `r` of `out`
    /// (`[rows, n]`, `n` a multiple of `head_dim`) rotated at position `pos0 + r` with the
    /// `cos`/`sin` tables `[positions, head_dim/2]`; `style` is a [`rope_style_code`].
    /// `(out, cos, sin, rows: i64, n: i64, head_dim: i64, style: i64, pos0: i64)`.
    pub const ROPE_ROWS: &str = "rope_rows";

    /// Every support kernel, in a stable order.
    pub const ALL: &[&str] = &[
        EMBED,
        COPY_COLS,
        SINUSOIDAL,
        TIMING_SIGNAL,
        EPILOGUE,
        GLU,
        ROW_NORM,
        EXIT_LATENT,
        SELECT_ROWS,
        EXIT_LOGITS,
        ROUTE_EXPERT,
        ROUTE_TOKEN,
        ROPE_ROWS,
    ];

    /// The `style` code of [`ROPE_ROWS`]: pairs `(2i, 2i + 1)` are 0, pairs `(i, i + d/2)` 1.
    pub fn rope_style_code(style: crate::artifact::RopeStyle) -> i64 {
        match style {
            crate::artifact::RopeStyle::Interleaved => 0,
            crate::artifact::RopeStyle::Half => 1,
        }
    }

    /// The `kind` of [`EXIT_LOGITS`] for a criterion that reads the logits.
    pub fn logits_kind(c: crate::artifact::Criterion) -> Option<i64> {
        use crate::artifact::Criterion::*;
        Some(match c {
            Kl => 2,
            MinpKl => 3,
            EntropyDiff => 4,
            ArgmaxStability => 5,
            LatentDiff | Cosine => return None,
        })
    }

    /// The `act` code of [`GLU`] for a unary [`EwOp`](crate::artifact::EwOp) of operand 0, or
    /// `None` when the device has no such activation.
    pub fn act_code(op: &crate::artifact::EwOp) -> Option<i64> {
        use crate::artifact::EwOp::*;
        Some(match op {
            Silu(0) => 0,
            GeluTanh(0) => 1,
            Relu(0) => 2,
            Sigmoid(0) => 3,
            Tanh(0) => 4,
            _ => return None,
        })
    }
}
