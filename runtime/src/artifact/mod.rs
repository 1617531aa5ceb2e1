//! The artifact: what `loopc build` writes and the runtime loads.
//!
//! The compiler targets this format (IREE-style: the runtime owns the contract), so the runtime
//! never needs a compiler crate. An artifact is one file:
//!
//! ```text
//! b"LOOPCAR1" | u64 LE manifest length | manifest (JSON) | u64 LE object length | shared object
//! ```
//!
//! The shared object holds the generated kernels; each kernel has the C ABI
//! `extern "C" fn(ptrs: *const *mut f32, ints: *const i64)` (see [`KernelSpec`] for the pointer
//! order of each kind and [`KernelInts`] for the integers).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub mod cuda;
pub use cuda::{CudaImage, CudaKernel};

pub const MAGIC: &[u8; 8] = b"LOOPCAR1";
pub const FORMAT_VERSION: u32 = 1;

/// Index into [`Manifest::buffers`].
pub type BufId = u32;
/// Index into [`Manifest::kernels`].
pub type KernelId = u32;
/// Index into [`Manifest::weights`].
pub type WeightId = u32;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub model: String,
    /// `cpu-x86_64` for host code (Cranelift or MLIR), `cuda-sm_90` for PTX ([`cuda`]).
    pub target: String,
    pub backend: String,
    /// Evaluated DSL parameters, for display and for checking a config against the artifact.
    pub params: BTreeMap<String, f64>,
    pub vocab: usize,
    pub hidden: usize,
    pub weights: Vec<WeightDecl>,
    pub buffers: Vec<BufferDecl>,
    pub kernels: Vec<KernelDecl>,
    pub rope_tables: Vec<RopeTable>,
    /// One entry per attention site in the program; inside the recurrence a site has one cache
    /// slot per iteration (`per-step` policy).
    pub kv_sites: Vec<KvSite>,
    pub program: Program,
    /// Weights the runtime computes once at load from checkpoint tensors (compile-time constant
    /// folding on weights). Derived weight `i` has the id `weights.len() + i`, so a [`WRef`]
    /// names it like a checkpoint tensor. Absent from artifacts that need none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub derived: Vec<DerivedWeight>,
    /// Present in artifacts built with `--target cuda`: the object section then holds PTX text,
    /// and this table says how to launch each kernel (see [`cuda`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda: Option<CudaImage>,
    /// Present in artifacts whose object also exports GEMMs (the MLIR backend's): the runtime
    /// calls them for products of more than a few rows in place of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_gemm: Option<HostGemm>,
}

/// The symbols of the object's f32 GEMMs. Each has the C signature
/// `void f(const float *a, const float *b, float *c, float *scratch, int64_t m, int64_t k,
/// int64_t n, int64_t lda, int64_t ldb, int64_t ldc)` and computes `c[i·ldc + j] =
/// Σ_kk a[i·lda + kk] · B(kk, j)` for `i < m`, `j < n`, overwriting `c`. `scratch` holds
/// [`HostGemm::scratch_len`] floats for the packed panel; calls on different threads need
/// different scratch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostGemm {
    /// `B(kk, j) = b[j·ldb + kk]`: the `Linear` layout, `w[n, k]`.
    pub nk: String,
    /// `B(kk, j) = b[kk·ldb + j]`: the `Conv1D` layout, `w[k, n]`.
    pub kn: String,
    /// Columns of the packed panel.
    pub panel: usize,
    /// The AMX bf16 GEMM, in objects built on hosts with AMX-BF16: `void f(const uint16_t *a,
    /// const uint32_t *b, float *c, float *scratch, int64_t m, int64_t kp, int64_t n,
    /// int64_t ldc, int64_t p0, int64_t p1, int64_t group)` over the runtime's bf16 layouts
    /// (`a`: `kp` bf16 per row, rows padded to 32; `b`: `bf16::Packed`'s words): output columns
    /// `32·p0 .. min(32·p1, n)` of rows `0..m`, overwriting `c`, in groups of `group` column
    /// pairs; `scratch` holds 32×32 floats. The caller has AMX permission (`amx::available`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bf16_amx: Option<String>,
}

impl HostGemm {
    /// Floats of scratch a call with depth `k` needs.
    pub fn scratch_len(&self, k: usize) -> usize {
        k.next_multiple_of(16) * self.panel
    }
}

/// A weight computed at load; its sources are checkpoint tensors or earlier derived weights.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DerivedWeight {
    /// For messages: how it was made, e.g. `slice_cols(adapter, 64..128)`.
    pub name: String,
    pub shape: Vec<usize>,
    pub recipe: Derive,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Derive {
    /// Columns `start .. start + len` of `src` (a `rows × cols` window).
    SliceCols { src: WRef, start: usize, len: usize },
    /// `src · by`.
    Scale { src: WRef, by: f32 },
    /// `src · diag(gain)`: column `j` times `gain[j]`; `gain` holds `src.cols` values.
    MulCols { src: WRef, gain: WRef },
    /// The rows of every source (equal `cols`), stacked.
    ConcatRows { srcs: Vec<WRef> },
    /// Per-iteration specialization: no data of its own; inside the recurrence, iteration `t`
    /// reads source `t` (whole weights of one shape). Only the recurrence body may read it.
    PerIter { srcs: Vec<WRef> },
    /// `ops` evaluated per element over sources of equal element count (`Input(k)` is source
    /// `k`), in f64; the result has the first source's shape.
    Map { srcs: Vec<WRef>, ops: Vec<EwOp> },
    /// Every row of `src` repeated `times` times in place.
    RepeatRows { src: WRef, times: usize },
    /// `srcᵀ`: a `[k, n]` (`Conv1D`) weight in the `[n, k]` (`Linear`) layout.
    Transpose { src: WRef },
    /// A stacked gate|up weight (`2n` rows: gate rows then up rows) with its rows interleaved
    /// in blocks: output block `i` is gate rows `i·block .. i·block + b` then up rows
    /// `n + i·block ..` of the same count, `b = min(block, n − i·block)`. Read by a matmul with
    /// an [`GluEpilogue`] of the same `block`.
    InterleaveRows { src: WRef, block: usize },
}

impl Derive {
    pub fn sources(&self) -> Vec<&WRef> {
        match self {
            Derive::SliceCols { src, .. }
            | Derive::Scale { src, .. }
            | Derive::RepeatRows { src, .. }
            | Derive::Transpose { src }
            | Derive::InterleaveRows { src, .. } => vec![src],
            Derive::MulCols { src, gain } => vec![src, gain],
            Derive::ConcatRows { srcs } | Derive::PerIter { srcs } | Derive::Map { srcs, .. } => {
                srcs.iter().collect()
            }
        }
    }

    /// `(rows, cols)` of the result, or why the recipe is inconsistent.
    pub fn out_shape(&self) -> Result<(usize, usize), String> {
        match self {
            Derive::SliceCols { src, start, len } => {
                if start.checked_add(*len).is_none_or(|e| e > src.cols) || *len == 0 {
                    return Err(format!(
                        "columns {start}..{} of a {}-column weight",
                        start + len,
                        src.cols
                    ));
                }
                Ok((src.rows, *len))
            }
            Derive::Scale { src, .. } => Ok((src.rows, src.cols)),
            Derive::MulCols { src, gain } => {
                if gain.rows.checked_mul(gain.cols) != Some(src.cols) {
                    return Err(format!(
                        "{} gains for {} columns",
                        gain.rows * gain.cols,
                        src.cols
                    ));
                }
                Ok((src.rows, src.cols))
            }
            Derive::ConcatRows { srcs } => {
                let cols = srcs.first().map(|s| s.cols).ok_or("no sources")?;
                if srcs.iter().any(|s| s.cols != cols) {
                    return Err("sources with different column counts".into());
                }
                Ok((srcs.iter().map(|s| s.rows).sum(), cols))
            }
            Derive::PerIter { srcs } => {
                let first = srcs.first().ok_or("no sources")?;
                if srcs
                    .iter()
                    .any(|s| (s.rows, s.cols) != (first.rows, first.cols))
                {
                    return Err("per-iteration sources of different shapes".into());
                }
                Ok((first.rows, first.cols))
            }
            Derive::Map { srcs, ops } => {
                let first = srcs.first().ok_or("no sources")?;
                let n = first.rows * first.cols;
                if srcs.iter().any(|s| s.rows * s.cols != n) {
                    return Err("sources with different element counts".into());
                }
                crate::ew::validate(ops, srcs.len())?;
                Ok((first.rows, first.cols))
            }
            Derive::RepeatRows { src, times } => match src.rows.checked_mul(*times) {
                Some(rows) if *times > 0 => Ok((rows, src.cols)),
                _ => Err(format!("{} rows repeated {times} times", src.rows)),
            },
            Derive::Transpose { src } => Ok((src.cols, src.rows)),
            Derive::InterleaveRows { src, block } => {
                if *block == 0 || src.rows % 2 != 0 {
                    return Err(format!(
                        "{} rows interleaved in blocks of {block} (needs an even row count and a block ≥ 1)",
                        src.rows
                    ));
                }
                Ok((src.rows, src.cols))
            }
        }
    }

    /// Compute the derived values; `get` yields the data of a validated source window.
    pub fn compute<'a>(&self, get: impl Fn(&WRef) -> &'a [f32]) -> Vec<f32> {
        let (rows, cols) = self.out_shape().unwrap_or((0, 0));
        let mut out = vec![0.0; rows * cols];
        self.compute_rows(&get, 0, &mut out);
        out
    }

    /// Rows `first ..` of the result into `out` (whole rows), so a caller can split the work.
    pub fn compute_rows<'a>(
        &self,
        get: &impl Fn(&WRef) -> &'a [f32],
        first: usize,
        out: &mut [f32],
    ) {
        let (_, cols) = self.out_shape().unwrap_or((0, 1));
        for (i, row) in out.chunks_mut(cols.max(1)).enumerate() {
            let r = first + i;
            match self {
                Derive::SliceCols { src, start, len } => {
                    row.copy_from_slice(&get(src)[r * src.cols + start..r * src.cols + start + len])
                }
                Derive::Scale { src, by } => {
                    for (o, x) in row.iter_mut().zip(&get(src)[r * cols..(r + 1) * cols]) {
                        *o = x * by;
                    }
                }
                Derive::MulCols { src, gain } => {
                    for ((o, x), g) in row
                        .iter_mut()
                        .zip(&get(src)[r * cols..(r + 1) * cols])
                        .zip(get(gain))
                    {
                        *o = x * g;
                    }
                }
                // Selected per iteration, never materialized.
                Derive::PerIter { .. } => {}
                Derive::Map { srcs, ops } => {
                    let data: Vec<&[f32]> = srcs.iter().map(get).collect();
                    let mut x = vec![0.0; srcs.len()];
                    for (c, o) in row.iter_mut().enumerate() {
                        for (xi, d) in x.iter_mut().zip(&data) {
                            *xi = d[r * cols + c] as f64;
                        }
                        *o = crate::ew::eval(ops, &x) as f32;
                    }
                }
                Derive::RepeatRows { src, times } => {
                    let k = r / times;
                    row.copy_from_slice(&get(src)[k * cols..(k + 1) * cols]);
                }
                Derive::Transpose { src } => {
                    let s = get(src);
                    for (c, o) in row.iter_mut().enumerate() {
                        *o = s[c * src.cols + r];
                    }
                }
                Derive::InterleaveRows { src, block } => {
                    let k = interleaved_source_row(src.rows / 2, *block, r);
                    row.copy_from_slice(&get(src)[k * cols..(k + 1) * cols]);
                }
                Derive::ConcatRows { srcs } => {
                    let mut k = r;
                    for s in srcs {
                        if k < s.rows {
                            row.copy_from_slice(&get(s)[k * cols..(k + 1) * cols]);
                            break;
                        }
                        k -= s.rows;
                    }
                }
            }
        }
    }
}

/// The source row of row `r` of [`Derive::InterleaveRows`] over `2·n` rows.
pub fn interleaved_source_row(n: usize, block: usize, r: usize) -> usize {
    let b0 = r / (2 * block) * block;
    let b = block.min(n - b0);
    let c = r - 2 * b0;
    if c < b {
        b0 + c
    } else {
        n + b0 + c - b
    }
}

/// A checkpoint tensor, bound by the checkpoint's own name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WeightDecl {
    pub name: String,
    pub shape: Vec<usize>,
    /// `file:line:col` of the DSL declaration, so load errors can point at the source.
    pub origin: String,
}

/// A contiguous window of a weight, seen as a `rows × cols` row-major matrix.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct WRef {
    pub weight: WeightId,
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Rows {
    /// One row per token of the current call (prefill length, or 1 in decode).
    Tokens,
    Fixed(usize),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BufferDecl {
    pub name: String,
    pub rows: Rows,
    pub cols: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KernelDecl {
    pub symbol: String,
    pub spec: KernelSpec,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (x[2i], x[2i+1]) (Huginn, "complex-like").
    Interleaved,
    /// Pairs (x[i], x[i + d/2]) (HF `rotate_half`: Llama, Qwen2, Ouro).
    Half,
}

/// `cos`/`sin` tables of shape `[positions, head_dim/2]`, built by the runtime at load:
/// `theta_i = pos / base^(2i/head_dim)`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeTable {
    pub head_dim: usize,
    pub base: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KvSite {
    pub name: String,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// True for sites inside the recurrence: one slot per iteration.
    pub in_loop: bool,
}

/// Integers passed to every kernel: `ints[0..4] = [begin, end, pos0, kv_len]`.
/// Work items `begin..end` are rows, except for attention where item `i` is
/// `(row = i / heads, head = i % heads)`. Row `r` of the call has absolute position `pos0 + r`.
pub struct KernelInts;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum EwIn {
    /// A `[rows, cols]` buffer.
    Rows,
    /// A `[cols]` vector broadcast over rows (a bias, a gain).
    Broadcast,
    /// A `[rows, 1]` buffer broadcast over columns (a per-row scale).
    PerRow,
}

/// One SSA instruction of a fused elementwise kernel; operands index earlier instructions.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub enum EwOp {
    Input(u32),
    Const(f32),
    Add(u32, u32),
    Sub(u32, u32),
    Mul(u32, u32),
    Div(u32, u32),
    Max(u32, u32),
    Neg(u32),
    Exp(u32),
    Sigmoid(u32),
    /// x · sigmoid(x)
    Silu(u32),
    Relu(u32),
    Tanh(u32),
    /// 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))
    GeluTanh(u32),
    Sqrt(u32),
    /// ln(1 + eˣ)
    Softplus(u32),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum KernelSpec {
    /// `outputs[k][r, c] = ops[outputs[k]]` evaluated per element.
    /// Pointers: each input in order, then each output in order.
    Elementwise {
        cols: usize,
        inputs: Vec<EwIn>,
        ops: Vec<EwOp>,
        outputs: Vec<u32>,
    },
    /// `y = x · rsqrt(mean(x²) + eps) [· gain]`; with `residual`, `x = a + b` and `x` is also
    /// written. Pointers: `[x, gain?, y]` or `[a, b, gain?, sum, y]`.
    RmsNorm {
        cols: usize,
        eps: f32,
        residual: bool,
        gain: bool,
    },
    /// Rotary embedding in place on `heads` heads of `head_dim` per row.
    /// Pointers: `[x, cos, sin]`, tables `[positions, head_dim/2]`, row `r` at position `pos0 + r`.
    Rope {
        heads: usize,
        head_dim: usize,
        style: RopeStyle,
    },
    /// Causal softmax attention of query rows over a cache slot, online softmax, no score matrix.
    /// Pointers: `[q, k_cache, v_cache, out]`; q/out `[rows, heads·head_dim]`, caches
    /// `[capacity, kv_heads·head_dim]`. Query row `r` attends to cache rows `0..=pos0 + r`.
    /// Head `h` reads kv head `h / (heads / kv_heads)`.
    Attention {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scale: f32,
    },
    /// `y = (x − mean(x)) · rsqrt(var(x) + eps) · gain + bias` (biased variance, as torch).
    /// Pointers: `[x, gain, bias, y]`.
    LayerNorm { cols: usize, eps: f32 },
    /// A gated unit over the two halves of one matmul output (gate|up):
    /// `y[r, c] = ops(x[r, c], x[r, cols + c])`, where `Input(0)` is the gate half and
    /// `Input(1)` the up half, and the last op is the result (SwiGLU: `silu(g) · u`).
    /// Pointers: `[x (rows × 2·cols), y (rows × cols)]`.
    Glu { cols: usize, ops: Vec<EwOp> },
    /// Parameter-free RMSNorm of each head: `y[r, h] = x[r, h] · rsqrt(mean(x[r, h]²) + eps)`
    /// over the `head_dim` columns of head `h` (q/k norm). Pointers: `[x, y]`.
    HeadRmsNorm {
        heads: usize,
        head_dim: usize,
        eps: f32,
    },
    /// `x = rope(x + bias)` in place: the q/k bias add as the rotary kernel's prologue (the
    /// attention epilogue of the QKV matmul). Pointers: `[x, bias (heads·head_dim), cos, sin]`.
    RopeBias {
        heads: usize,
        head_dim: usize,
        style: RopeStyle,
    },
    /// `s[r] = 1 / sqrt(mean_c(x[r, c]²) + eps)`: the row factor of a gainless RMSNorm, for a
    /// matmul that applies it in its epilogue ([`Epilogue::row_scale`]) instead of reading a
    /// normalized copy of `x`. Same sum order and `sqrt` then divide as `RmsNorm`, so
    /// `x[r, c] · s[r]` equals `RmsNorm`'s output bit for bit.
    /// Pointers: `[x (rows × cols), s (rows × 1)]`.
    InvRms { cols: usize, eps: f32 },
}

impl KernelSpec {
    pub fn num_ptrs(&self) -> usize {
        match self {
            KernelSpec::Elementwise {
                inputs, outputs, ..
            } => inputs.len() + outputs.len(),
            KernelSpec::RmsNorm { residual, gain, .. } => {
                (if *residual { 4 } else { 2 }) + usize::from(*gain)
            }
            KernelSpec::Rope { .. } => 3,
            KernelSpec::Attention { .. } => 4,
            KernelSpec::LayerNorm { .. } => 4,
            KernelSpec::Glu { .. } | KernelSpec::HeadRmsNorm { .. } => 2,
            KernelSpec::RopeBias { .. } => 4,
            KernelSpec::InvRms { .. } => 2,
        }
    }
}

/// An argument of a kernel call, resolved to a pointer by the runtime.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub enum Arg {
    Buf(BufId),
    Weight(WRef),
    RopeCos(u32),
    RopeSin(u32),
    /// Key or value rows of the current slot of a KV site.
    KCache(u32),
    VCache(u32),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Instr {
    /// `out[r] = table[tokens[r]]`.
    Embed {
        table: WRef,
        out: BufId,
    },
    /// `out = x · wᵀ` (`w` is `[n_out, k_in]`, the checkpoint's `Linear` layout), then the
    /// [`Epilogue`] (absent from the JSON when it does nothing).
    MatMul {
        x: BufId,
        w: WRef,
        out: BufId,
        #[serde(default, skip_serializing_if = "Epilogue::is_none")]
        epi: Epilogue,
    },
    /// Column-wise concatenation.
    Concat {
        inputs: Vec<BufId>,
        out: BufId,
    },
    Copy {
        src: BufId,
        dst: BufId,
    },
    /// Append the call's key/value rows to the current slot of `site`.
    KvWrite {
        site: u32,
        k: BufId,
        v: BufId,
    },
    /// A generated kernel; `items` is [`Rows::Tokens`] rows, times heads for attention.
    Kernel {
        kernel: KernelId,
        args: Vec<Arg>,
    },
    /// `out = x · w` with `w: [k_in, n_out]` (GPT-2's `Conv1D` layout); `w.rows` is `k_in`.
    MatMulKN {
        x: BufId,
        w: WRef,
        out: BufId,
    },
    /// Columns `start .. start + out.cols` of `src`.
    SliceCols {
        src: BufId,
        start: usize,
        out: BufId,
    },
    /// `out[r] = table[pos0 + r]`: learned absolute position embeddings.
    PosEmbed {
        table: WRef,
        out: BufId,
    },
    /// Sinusoidal position embeddings (Vaswani et al.): even columns `sin(p·base^(−c/d))`, odd
    /// columns `cos` of the same angle, computed in f64.
    Sinusoidal {
        base: f64,
        out: BufId,
    },
    /// tensor2tensor's timing signal (`get_timing_signal_1d`): with `h = cols/2`,
    /// `inv_i = min·exp(−i·ln(max/min)/max(h − 1, 1))`, column `i < h` is `sin(t·inv_i)` and
    /// column `h + i` is `cos(t·inv_i)` (a last zero column for odd widths), computed in f64.
    /// `t` is the row's position, or with `step` the recurrence iteration (0-based; 0 outside
    /// the recurrence): UT's `add_step_timing_signal`.
    TimingSignal {
        min_timescale: f64,
        max_timescale: f64,
        step: bool,
        out: BufId,
    },
    /// One product `x · wᵀ` whose output columns go to several buffers: part `i` receives the
    /// next `parts[i].out.cols` columns (the parts' widths add up to `w.rows`), then its own
    /// [`Epilogue`] (a bias is a window of that part's width). `x` is read once and the weight
    /// streamed once, in one dispatch (Q, K and V of an attention block reading the same
    /// normed input); each destination stays a contiguous buffer. At most [`MAX_MATMUL_PARTS`].
    MatMulParts {
        x: BufId,
        w: WRef,
        parts: Vec<MatPart>,
    },
}

/// Most destinations of one [`Instr::MatMulParts`] (the runtime keeps them on the stack).
pub const MAX_MATMUL_PARTS: usize = 8;

/// A destination of [`Instr::MatMulParts`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct MatPart {
    pub out: BufId,
    #[serde(default, skip_serializing_if = "Epilogue::is_none")]
    pub epi: Epilogue,
}

/// What a [`Instr::MatMul`] does with each product element before storing it (the GEMM
/// epilogue), with `p = x · wᵀ` of shape `[rows, n_out]`:
///
/// `out[r, j] = residual[r, j] + row_scale[r, 0] · p[r, j] + bias[j]`
///
/// Each term is optional; absent, it is 0 (residual, bias) or 1 (row scale), so the default
/// epilogue stores `p` unchanged. Contract (checked by `Model::new`):
/// - `row_scale` is a `[rows, 1]` buffer with the matmul's row count (`Rows::Tokens` like `x`):
///   the folded RMSNorm's `1/rms` of `x` (see [`KernelSpec::InvRms`]), so that
///   `linear(rmsnorm(x), W·diag(g)) = row_scale ⊙ (x · (W·diag(g))ᵀ)` reads `x` directly.
/// - `residual` has the shape of `out` and is a different buffer from `out` (it may be `x`): the
///   residual stream `x + o_proj(a)` added as the product is stored.
/// - `bias` is a window of `n_out` elements.
/// - The scale multiplies the product only, not the bias or the residual (the order is the
///   one of `rmsnorm → linear → + bias → + residual`).
///
/// Backends may apply it inside the GEMM's store or as a pass over each output block while it
/// is in cache; the result must match the formula to f32 rounding of the product.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Epilogue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_scale: Option<BufId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual: Option<BufId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<WRef>,
    /// A gated unit as the last step: the matmul's `out` is then the product scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glu: Option<GluEpilogue>,
    /// A row reduction over the finished rows (after every other term).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm: Option<NormEpilogue>,
    /// Rotary embedding of each head of the output row, after the other per-element terms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope: Option<RopeEpilogue>,
}

/// `out[r, :] = rope(p[r, :], pos(r))`: each head of `head_dim` columns of the epilogue's
/// result `p` (after row scale, bias and residual) rotated as [`KernelSpec::Rope`] does, with
/// the `cos`/`sin` of rope table `table` at row `r`'s absolute position (the row's position in
/// its own sequence, as the `Rope` kernel gets it through `pos0` and the runtime's per-run
/// calls). With a bias this is `RopeBias` in the product's store: `rope(s ⊙ (x · Wᵀ) + b)`.
/// A backend computes whole heads per block of output columns and rotates each while it is in
/// cache. Not combined with [`GluEpilogue`] or [`NormEpilogue`]; `n_out` is a multiple of
/// `head_dim`, which is the table's.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct RopeEpilogue {
    pub table: u32,
    pub head_dim: usize,
    pub style: RopeStyle,
}

/// The second phase of an epilogue, once every column block of a row is stored: with
/// `rms(v) = 1 / sqrt(mean(v²) + eps)` over the row's `n_out` values,
/// - `normalize`: `out[r, :] = out[r, :] · rms(out[r, :]) [· gain]` (RMSNorm of the result);
/// - `inv_rms`: a `[rows, 1]` buffer (not `out`, `x` or another epilogue operand) receiving
///   `rms` of the final `out` row (the row scale of the next matmuls).
///
/// Not combined with [`GluEpilogue`]. The sum order may differ from the `RmsNorm` / `InvRms`
/// kernels (f32 rounding).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct NormEpilogue {
    pub eps: f32,
    pub normalize: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gain: Option<WRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inv_rms: Option<BufId>,
}

/// `glu.out[r, i·block + c] = act(p[r, 2·i·block + c]) · p[r, 2·i·block + b + c]` for
/// `c < b = min(block, n − i·block)`, where `p` (`[rows, 2n]`) is the product after the other
/// epilogue terms, whose columns are gate/up halves interleaved in blocks
/// ([`Derive::InterleaveRows`] of `[Wg; Wu]`). The matmul's own `out` holds `p` (a scratch
/// buffer, different from `glu.out`). A backend computes whole blocks of `2·block` product
/// columns and reduces each while it is in cache. `act` is a unary [`EwOp`] of operand 0
/// (`Silu(0)`, `GeluTanh(0)`, `Relu(0)`, ...), with the scalar semantics of `ew::eval`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct GluEpilogue {
    pub out: BufId,
    pub block: usize,
    pub act: EwOp,
}

impl Epilogue {
    pub fn is_none(&self) -> bool {
        self.row_scale.is_none()
            && self.residual.is_none()
            && self.bias.is_none()
            && self.glu.is_none()
            && self.norm.is_none()
            && self.rope.is_none()
    }

    /// The buffers the epilogue reads.
    pub fn reads(&self) -> impl Iterator<Item = BufId> {
        self.row_scale.into_iter().chain(self.residual)
    }

    /// The buffers the epilogue writes besides the matmul's `out`.
    pub fn writes(&self) -> impl Iterator<Item = BufId> {
        self.glu
            .map(|g| g.out)
            .into_iter()
            .chain(self.norm.and_then(|m| m.inv_rms))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum StateInit {
    Zeros,
    /// Start from the value of another buffer (Ouro: the embeddings).
    From(BufId),
    /// Huginn's `like-init`: truncated normal at ±3σ, times `scale`, from a seeded generator.
    TruncNormal {
        std: f64,
        scale: f64,
        seed: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum ExitPolicy {
    /// Run exactly `steps` iterations (overridable per call).
    Fixed,
    /// Stop once the mean over rows of ‖s_t − s_{t−1}‖ / ‖s_t‖ falls below `threshold`,
    /// after at least `min_steps`, and never past `max_steps`.
    Converge {
        threshold: f64,
        min_steps: usize,
        max_steps: usize,
    },
    /// Per token: after step `n` (1-based) with `n ≥ min_steps` and `n % every == 0`, a row whose
    /// criterion value passes `threshold` stops (physically: it leaves the active set); no row
    /// runs past `max_steps`.
    Criterion {
        criterion: Criterion,
        threshold: f64,
        min_steps: usize,
        every: usize,
        max_steps: usize,
    },
    /// Per token, Ouro's learned gate: `λ_t = σ(gate_t)`, `p_t = λ_t·Π_{j<t}(1−λ_j)` (the last
    /// step takes the remaining mass); a row stops after the first step whose CDF reaches `q`
    /// (in f32), at the earliest after `min_steps`.
    Gate {
        q: f64,
        min_steps: usize,
        max_steps: usize,
    },
    /// ACT / Universal-Transformer halting per token on the gate buffer: `p = σ(gate)`; while
    /// `h + p ≤ 1 − eps` the row continues with `h += p`, `w = p`, else it halts with
    /// `w = 1 − h`; the state becomes `next·w + state·(1 − w)` (a running weighted average).
    Act { eps: f64, max_steps: usize },
    /// MoR expert-choice routing. Before iteration `t` the router ([`Recur::router`], one
    /// logit per row, on the state) gives `g = σ(z)·alpha`. In a call of `S > 1` tokens of a
    /// sequence the top `max(1, ⌊capacity[t]·S⌋)` of its still-active rows by `g` run iteration
    /// `t` (ties to the earlier position); with `S = 1` a row runs it when `σ(z) ≥ threshold`.
    /// The others exit with their state. Rows that run update `h ← h + g·body(h)`. `capacity`
    /// empty means MoR's default `(N − t)/N` with `N = max_steps`.
    ExpertChoice {
        alpha: f64,
        capacity: Vec<f64>,
        threshold: f64,
        max_steps: usize,
    },
    /// MoR token-choice routing: the router (N logits per row) runs once on the initial state;
    /// `P = softmax(z)·alpha`, `d = argmax P`; the row runs `d + 1` iterations and ends as
    /// `h_0 + P[d]·h_{d+1}`.
    TokenChoice { alpha: f64, max_steps: usize },
}

/// Huginn's zero-shot exit criteria (see `shared/reference/families.md` §1.3).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Criterion {
    /// ‖s_t − s_{t−1}‖ / ‖s_t‖ < threshold (s_{−1} is the initial state).
    LatentDiff,
    /// 1 − cos(s_t, s_{t−1}) < threshold.
    Cosine,
    /// KL(p_{t−1} ‖ p_t) < threshold, p_{−1} uniform; needs the readout every step.
    Kl,
    /// As `Kl` after setting probabilities below 0.1·max to 1/V and renormalizing.
    MinpKl,
    /// |H_t − H_{t−1}| < threshold with H_{−1} = 100.
    EntropyDiff,
    /// The argmax has not changed for `threshold` consecutive steps.
    ArgmaxStability,
}

impl Criterion {
    /// True when the value is computed from the logits, so the coda runs every step.
    pub fn needs_logits(self) -> bool {
        !matches!(self, Criterion::LatentDiff | Criterion::Cosine)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum CachePolicy {
    /// One KV slot per (iteration, layer).
    PerStep,
    /// `c` slots per layer; iteration `t` uses slot `t mod c`.
    Ring(usize),
    /// Only iteration 0 writes; every iteration attends to slot 0 (MoR recursive sharing).
    ShareFirst,
    /// One slot per layer, overwritten by every iteration (`Ring(1)`).
    LastStep,
    /// MoR recursion-wise caching: slot `t` holds, in position order, only the tokens that ran
    /// iteration `t`, and attention at iteration `t` sees only those (Huginn's `skip` read).
    RecursionWise,
}

impl CachePolicy {
    /// Slots per in-loop site, `None` for one per iteration.
    pub fn slots(&self) -> Option<usize> {
        match self {
            CachePolicy::PerStep | CachePolicy::RecursionWise => None,
            CachePolicy::Ring(c) => Some((*c).max(1)),
            CachePolicy::ShareFirst | CachePolicy::LastStep => Some(1),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Recur {
    /// Loop-carried state; the body reads it and writes `next`.
    pub state: BufId,
    pub next: BufId,
    pub init: StateInit,
    pub body: Vec<Instr>,
    pub default_steps: usize,
    pub exit: ExitPolicy,
    pub cache: CachePolicy,
    /// `[rows, 1]` buffer holding the learned exit gate's logit for this iteration (Ouro);
    /// the runtime turns the per-step values into exit probabilities.
    pub gate: Option<BufId>,
    /// Indices into [`Program::coda`] of the instructions that depend on the state: the
    /// readout that per-step criteria run on the active rows after every iteration.
    #[serde(default)]
    pub readout: Vec<u32>,
    /// Run before each iteration on the active rows (expert choice) or once before the first
    /// (token choice): computes the routing logits into `router_out` from the state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub router: Vec<Instr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_out: Option<BufId>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Program {
    pub prelude: Vec<Instr>,
    pub recur: Option<Recur>,
    pub coda: Vec<Instr>,
    pub logits: BufId,
}

impl Instr {
    /// Every weight window the instruction reads.
    pub fn weights(&self) -> Vec<WRef> {
        match self {
            Instr::Embed { table: w, .. }
            | Instr::PosEmbed { table: w, .. }
            | Instr::MatMulKN { w, .. } => vec![*w],
            Instr::MatMul { w, epi, .. } => std::iter::once(*w)
                .chain(epi.bias)
                .chain(epi.norm.and_then(|m| m.gain))
                .collect(),
            Instr::MatMulParts { w, parts, .. } => std::iter::once(*w)
                .chain(parts.iter().filter_map(|p| p.epi.bias))
                .collect(),
            Instr::Kernel { args, .. } => args
                .iter()
                .filter_map(|a| {
                    if let Arg::Weight(w) = a {
                        Some(*w)
                    } else {
                        None
                    }
                })
                .collect(),
            Instr::Concat { .. }
            | Instr::Copy { .. }
            | Instr::KvWrite { .. }
            | Instr::SliceCols { .. }
            | Instr::Sinusoidal { .. }
            | Instr::TimingSignal { .. } => {
                vec![]
            }
        }
    }

    /// Every buffer the instruction reads or writes (kernels: all their buffer arguments).
    pub fn buffers(&self) -> Vec<BufId> {
        match self {
            Instr::Embed { out, .. }
            | Instr::PosEmbed { out, .. }
            | Instr::Sinusoidal { out, .. }
            | Instr::TimingSignal { out, .. } => vec![*out],
            Instr::MatMulKN { x, out, .. } => vec![*x, *out],
            Instr::MatMul { x, out, epi, .. } => std::iter::once(*x)
                .chain(epi.reads())
                .chain([*out])
                .chain(epi.writes())
                .collect(),
            Instr::MatMulParts { x, parts, .. } => std::iter::once(*x)
                .chain(parts.iter().flat_map(|p| p.epi.reads()))
                .chain(parts.iter().map(|p| p.out))
                .collect(),
            Instr::SliceCols { src, out, .. } => vec![*src, *out],
            Instr::Concat { inputs, out } => inputs.iter().copied().chain([*out]).collect(),
            Instr::Copy { src, dst } => vec![*src, *dst],
            Instr::KvWrite { k, v, .. } => vec![*k, *v],
            Instr::Kernel { args, .. } => args
                .iter()
                .filter_map(|a| if let Arg::Buf(b) = a { Some(*b) } else { None })
                .collect(),
        }
    }
}

impl KernelSpec {
    /// The pointer positions the kernel writes (in place for RoPE); the others it only reads.
    pub fn output_ptrs(&self, n: usize) -> std::ops::Range<usize> {
        match self {
            KernelSpec::Elementwise { inputs, .. } => inputs.len()..n,
            KernelSpec::RmsNorm { residual: true, .. } => n - 2..n,
            KernelSpec::RmsNorm { .. } => n - 1..n,
            KernelSpec::Rope { .. } | KernelSpec::RopeBias { .. } => 0..1,
            KernelSpec::Attention { .. } | KernelSpec::LayerNorm { .. } => 3..4,
            KernelSpec::Glu { .. } | KernelSpec::HeadRmsNorm { .. } | KernelSpec::InvRms { .. } => {
                1..2
            }
        }
    }
}

impl Manifest {
    /// The buffers an instruction reads and those it writes.
    pub fn reads_writes(&self, ins: &Instr) -> (Vec<BufId>, Vec<BufId>) {
        match ins {
            Instr::Embed { out, .. }
            | Instr::PosEmbed { out, .. }
            | Instr::Sinusoidal { out, .. }
            | Instr::TimingSignal { out, .. } => (vec![], vec![*out]),
            Instr::MatMul { x, out, epi, .. } => (
                std::iter::once(*x).chain(epi.reads()).collect(),
                std::iter::once(*out).chain(epi.writes()).collect(),
            ),
            Instr::MatMulParts { x, parts, .. } => (
                std::iter::once(*x)
                    .chain(parts.iter().flat_map(|p| p.epi.reads()))
                    .collect(),
                parts.iter().map(|p| p.out).collect(),
            ),
            Instr::MatMulKN { x, out, .. } | Instr::SliceCols { src: x, out, .. } => {
                (vec![*x], vec![*out])
            }
            Instr::Concat { inputs, out } => (inputs.clone(), vec![*out]),
            Instr::Copy { src, dst } => (vec![*src], vec![*dst]),
            Instr::KvWrite { k, v, .. } => (vec![*k, *v], vec![]),
            Instr::Kernel { kernel, args } => {
                let outs = self.kernels[*kernel as usize].spec.output_ptrs(args.len());
                let (mut r, mut w) = (vec![], vec![]);
                for (j, a) in args.iter().enumerate() {
                    if let Arg::Buf(b) = a {
                        if outs.contains(&j) {
                            w.push(*b)
                        } else {
                            r.push(*b)
                        }
                    }
                }
                (r, w)
            }
        }
    }

    pub fn kernel_items(&self, k: KernelId, rows: usize) -> usize {
        match &self.kernels[k as usize].spec {
            KernelSpec::Attention { heads, .. } => rows * heads,
            _ => rows,
        }
    }
}

/// Serialize an artifact to bytes.
pub fn encode(manifest: &Manifest, object: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec_pretty(manifest).expect("manifest serializes");
    let mut out = Vec::with_capacity(24 + json.len() + object.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&(object.len() as u64).to_le_bytes());
    out.extend_from_slice(object);
    out
}

/// Split artifact bytes into the manifest and the shared object.
pub fn decode(bytes: &[u8]) -> Result<(Manifest, &[u8]), String> {
    let take = |at: usize, n: usize| -> Result<&[u8], String> {
        bytes
            .get(at..at + n)
            .ok_or_else(|| format!("artifact truncated at byte {at}"))
    };
    if take(0, 8)? != MAGIC {
        return Err("not a loopc artifact (bad magic; expected LOOPCAR1)".into());
    }
    let n = u64::from_le_bytes(take(8, 8)?.try_into().unwrap()) as usize;
    let json = take(16, n)?;
    let manifest: Manifest =
        serde_json::from_slice(json).map_err(|e| format!("artifact manifest is invalid: {e}"))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(format!(
            "artifact format version {} is not supported by this runtime (expects {FORMAT_VERSION}); rebuild it with this loopc",
            manifest.format_version
        ));
    }
    let m = u64::from_le_bytes(take(16 + n, 8)?.try_into().unwrap()) as usize;
    let obj = take(24 + n, m)?;
    Ok((manifest, obj))
}
