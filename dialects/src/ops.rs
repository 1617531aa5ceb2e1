//! The ops of both levels. Each op has one spelling in the text form ([`Op::mnemonic`]).
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RopeStyle {
    /// Pairs `(x[2i], x[2i+1])`: Huginn's complex-like rotation.
    Interleaved,
    /// Pairs `(x[i], x[i + d/2])`: HF `rotate_half` (Llama, Qwen2, Ouro).
    Half,
}

impl RopeStyle {
    pub fn name(self) -> &'static str {
        match self {
            RopeStyle::Interleaved => "interleaved",
            RopeStyle::Half => "half",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "interleaved" => Some(RopeStyle::Interleaved),
            "half" => Some(RopeStyle::Half),
            _ => None,
        }
    }
}

/// Pointwise functions of one operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unary {
    Neg,
    Exp,
    Sigmoid,
    Silu,
    Relu,
    Tanh,
    GeluTanh,
    Sqrt,
    /// `ln(1 + eˣ)` (torch's `softplus`, β = 1).
    Softplus,
}

impl Unary {
    pub const ALL: [Unary; 9] = [
        Unary::Neg,
        Unary::Exp,
        Unary::Sigmoid,
        Unary::Silu,
        Unary::Relu,
        Unary::Tanh,
        Unary::GeluTanh,
        Unary::Sqrt,
        Unary::Softplus,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Unary::Neg => "neg",
            Unary::Exp => "exp",
            Unary::Sigmoid => "sigmoid",
            Unary::Silu => "silu",
            Unary::Relu => "relu",
            Unary::Tanh => "tanh",
            Unary::GeluTanh => "gelu_tanh",
            Unary::Sqrt => "sqrt",
            Unary::Softplus => "softplus",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|u| u.name() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Max,
}

impl Binary {
    pub const ALL: [Binary; 5] = [
        Binary::Add,
        Binary::Sub,
        Binary::Mul,
        Binary::Div,
        Binary::Max,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
            Binary::Max => "max",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|u| u.name() == s)
    }
}

/// One instruction of a fused elementwise body; operands index earlier instructions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FusedOp {
    /// The i-th operand of the fused node.
    Arg(u32),
    Const(f32),
    Unary(Unary, u32),
    Binary(Binary, u32, u32),
}

#[derive(Debug, Clone, PartialEq)]
pub enum StateInit {
    Zeros,
    /// Start from the recur node's first operand (Ouro: the embeddings).
    Operand,
    /// Truncated normal at ±3σ times `scale` (Huginn's `like-init`); `std = 0` gives zeros.
    TruncNormal {
        std: f64,
        scale: f64,
        seed: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExitSpec {
    Fixed,
    Converge {
        threshold: f64,
        min_steps: usize,
        max_steps: usize,
    },
    /// A per-token zero-shot criterion (Huginn), checked after step `n` when `n ≥ min_steps`
    /// and `n % every == 0`; `max_steps` is the hard cap.
    Criterion {
        kind: Criterion,
        threshold: f64,
        min_steps: usize,
        every: usize,
        max_steps: usize,
    },
    /// Ouro's learned gate: exit at the first step whose exit-probability CDF reaches `q`.
    Gate {
        q: f64,
        min_steps: usize,
        max_steps: usize,
    },
    /// ACT / Universal-Transformer halting on the exit gate: the state is the running
    /// halting-weighted average; a token halts once its cumulative probability passes 1 − eps.
    Act {
        eps: f64,
        max_steps: usize,
    },
    /// MoR expert-choice routing: before iteration `t` the router (one logit per token, read
    /// from the state) scores every active token, `g = σ(z)·alpha`; a multi-token call keeps the
    /// top `max(1, ⌊capacity[t]·S⌋)` active tokens of each sequence, a single-token call those
    /// with `σ(z) ≥ threshold`; the others exit. Kept tokens update `h ← h + g·f(h)`.
    ExpertChoice {
        alpha: f64,
        /// Per-iteration capacity fractions; empty means MoR's default `(N − t)/N`.
        capacity: Vec<f64>,
        threshold: f64,
        max_steps: usize,
    },
    /// MoR token-choice routing: the router (N logits per token) runs once on the initial
    /// state, `P = softmax(z)·alpha`, the token runs `argmax P + 1` iterations and ends as
    /// `h_0 + P[d]·h_d`.
    TokenChoice {
        alpha: f64,
        max_steps: usize,
    },
}

/// Huginn's per-token exit criteria (families.md §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Criterion {
    LatentDiff,
    Cosine,
    Kl,
    MinpKl,
    EntropyDiff,
    ArgmaxStability,
}

impl Criterion {
    pub const ALL: [Criterion; 6] = [
        Criterion::LatentDiff,
        Criterion::Cosine,
        Criterion::Kl,
        Criterion::MinpKl,
        Criterion::EntropyDiff,
        Criterion::ArgmaxStability,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Criterion::LatentDiff => "latent_diff",
            Criterion::Cosine => "cosine",
            Criterion::Kl => "kl",
            Criterion::MinpKl => "minp_kl",
            Criterion::EntropyDiff => "entropy_diff",
            Criterion::ArgmaxStability => "argmax_stability",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSpec {
    PerStep,
    /// `c` slots per layer reused round-robin by the iterations (Huginn's compress-s, in
    /// recurrences rather than layers).
    Ring(usize),
    /// Only the first iteration writes; later iterations attend to its entries (MoR sharing).
    ShareFirst,
    /// One slot per layer holding the latest iteration (Ouro's decode-time sharing); `ring(1)`.
    LastStep,
    /// One slot per iteration holding only the tokens that reached it (MoR recursion-wise).
    RecursionWise,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    // ---- loop level ----
    /// The i-th parameter of the enclosing region (in a recur body: 0 is the state, then the
    /// captured loop-invariant values in operand order).
    Param(u32),
    /// The recurrence. Operands: the init operand (if `init` is `Operand`) then the captures.
    /// The body region yields the next state and, when `gate` is set, the exit-gate logits.
    Recur {
        steps: usize,
        init: StateInit,
        exit: ExitSpec,
        cache: CacheSpec,
        gate: bool,
        /// The body yields a router value after the next state (and the gate): computed from
        /// the state at the start of an iteration, before the rest of the body (MoR routing).
        router: bool,
        body: Box<crate::graph::Region>,
    },
    // ---- tensor level ----
    Tokens,
    /// A checkpoint tensor (or a contiguous window of one).
    Weight(crate::graph::WeightView),
    /// `table[tokens]`. Operands: tokens, table.
    Embed,
    /// `x · wᵀ` with `w: [n, k]`. Operands: x, w.
    Linear,
    /// `x · rsqrt(mean(x²) + eps) · g`. Operands: x, g (or only x: no gain, after folding).
    RmsNorm {
        eps: f32,
    },
    /// Rotary embedding on `heads` heads. Operands: x (and optionally a bias added first).
    Rope {
        heads: usize,
        style: RopeStyle,
        base: f64,
    },
    /// Causal attention with a KV cache slot per site (and per iteration inside a recur).
    /// Operands: q, k, v.
    Attention {
        heads: usize,
        kv_heads: usize,
        scale: f32,
        site: u32,
    },
    Unary(Unary),
    /// Operands of equal width, or a weight whose element count is the width (broadcast over rows).
    Binary(Binary),
    /// Multiply by a build-time constant.
    Scale(f32),
    Concat,
    /// Columns `start .. start + len`.
    Slice {
        start: usize,
        len: usize,
    },
    /// A fused elementwise kernel created by the passes; `outputs` has one entry.
    Fused {
        body: Vec<FusedOp>,
    },
    /// Parameter-free RMSNorm of each of the `heads` column groups of a row (q/k norm).
    /// Operand: x.
    HeadRmsNorm {
        heads: usize,
        eps: f32,
    },
    /// `(x − mean) · rsqrt(var + eps) · g + b`. Operands: x, g, b.
    LayerNorm {
        eps: f32,
    },
    /// `x · w` with `w: [k, n]` (GPT-2's `Conv1D` layout). Operands: x, w.
    MatMul,
    /// Learned absolute position embeddings `table[position]`. Operand: table.
    PosEmbed,
    /// Sinusoidal position embeddings of width `cols`.
    Sinusoidal {
        cols: usize,
        base: f64,
    },
    /// tensor2tensor's `get_timing_signal_1d` of width `cols`: `sin` of `t·inv_i` in the first
    /// `cols/2` columns, `cos` in the next `cols/2` (a zero column pads an odd width), with
    /// `inv_i = min·exp(−i·ln(max/min)/max(cols/2 − 1, 1))`. `t` is the token's position, or
    /// with `step` the recurrence iteration (UT's `add_step_timing_signal`, recur bodies only).
    TimingSignal {
        cols: usize,
        min_timescale: f64,
        max_timescale: f64,
        step: bool,
    },
    /// `s = a + b; y = rmsnorm(s, g)` as one kernel with two results `(s, y)`, read by `proj`.
    /// Operands: a, b, g (or only a, b: no gain).
    RmsNormRes {
        eps: f32,
    },
    /// The `index`-th result of a multi-result node.
    Proj(u32),
    // ---- derived weights: computed once by the runtime at load, from checkpoint tensors ----
    /// Columns `start .. start + len` of a 2-D weight (not contiguous, hence a copy).
    WSliceCols {
        start: usize,
        len: usize,
    },
    /// Every element times a build-time constant.
    WScale(f32),
    /// `W · diag(g)`: column `j` of a 2-D weight times `g[j]`. Operands: W, g.
    WMulCols,
    /// Rows of 2-D weights with equal column counts, stacked.
    WConcatRows,
    /// Per-iteration specialization: inside a recur body, operand `t` is the weight that
    /// iteration `t` reads (all of one shape). Weights of MoR's per-recursion routers and of
    /// sharing schemes whose layer changes with the recursion.
    WPerIter,
    /// An elementwise function of weights with equal element counts (the shape of the first):
    /// weight-only arithmetic such as Parcae's `exp(−softplus(dt_bias)·exp(A_log))`.
    WMap {
        body: Vec<FusedOp>,
    },
    /// Every row of a 2-D weight repeated `times` times in place (`[n, k]` → `[n·times, k]`):
    /// a per-head gate widened to per-column.
    WRepeatRows(usize),
    /// A gated unit over the two halves of its operand `[S, 2n]` → `[S, n]`:
    /// `act(x[:, :n]) · x[:, n:]` (SwiGLU with `silu`). Operand: the gate|up matmul.
    Glu(Unary),
    /// `1 / sqrt(mean(x²) + eps)` per row, `[S, n]` → `[S, 1]`: the factor of a gainless
    /// RMSNorm that a `linear_ep` applies to its product rows instead of reading `x` normalized.
    /// Operand: x.
    InvRms {
        eps: f32,
    },
    /// A matmul with its epilogue: `[r +] [s ⊙] (x · wᵀ)`, with `s: [S, 1]` scaling each product
    /// row and `r: [S, n]` added (the residual stream). Operands: x, w, then s when
    /// `row_scale`, then r when `residual`.
    LinearEp {
        row_scale: bool,
        residual: bool,
        /// A last operand `b` (a weight of `n` elements) added to each product row before the
        /// residual: `[r +] [s ⊙] (x · wᵀ) + b` (a linear layer's bias).
        bias: bool,
    },
    /// The transpose of a 2-D weight, `[k, n]` → `[n, k]`: a `Conv1D` (`matmul`) weight in the
    /// `Linear` layout that the GEMV streams and whose product takes an epilogue.
    WTranspose,
    /// The rows of a stacked gate|up weight `[2n, k]` interleaved in blocks of `block`: block
    /// `i` holds gate rows `i·block ..` then the same up rows (a shorter last block when
    /// `block` does not divide `n`), so every block of `2·block` product columns holds matching
    /// gate/up halves for `linear_glu`.
    WInterleaveRows(usize),
    /// `act(g) · u` of a gate|up matmul as its epilogue: `[S, n]` from `x` and the
    /// interleaved weight `w.interleave_rows block=B` of `[Wg; Wu]` (`[2n, k]`), with `g`/`u`
    /// the gate/up product columns `[s ⊙] (x · [Wg; Wu]ᵀ)`. Operands: x, w, then s when
    /// `row_scale`. The product never reaches memory as a whole.
    LinearGlu {
        act: Unary,
        block: usize,
        row_scale: bool,
    },
    /// `linear_ep` whose epilogue also reduces each output row once all its column blocks are
    /// stored (a second phase after the split joins). Results `(y, q)`: with `normalize`,
    /// `y = rmsnorm(p[, g])` of the epilogue's result `p` (a sandwich block's norm after the
    /// residual add), else `y = p`; `q = inv_rms(y)` (`[S, 1]`), the row scale of the matmuls
    /// that read `y` next. One `eps` for both. Operands: x, w, then s when `row_scale`, r when
    /// `residual`, g when `gain` (only with `normalize`).
    LinearNorm {
        row_scale: bool,
        residual: bool,
        normalize: bool,
        gain: bool,
        eps: f32,
    },
    /// Sibling matmuls as one product: `x · wᵀ` over the stacked weight `w: [Σ parts, k]`, whose
    /// columns are cut into `parts.len()` results of widths `parts` (read by `proj i`), each
    /// `[s ⊙]` scaled per row when `row_scale`. With `ropes` (empty, or one entry per part with
    /// at least one rotated), part `i` with `Some(r)` is `rope([s ⊙] pᵢ [+ bᵢ])` as the `rope`
    /// op computes it: the rotation in the product's store. Operands: x, w, then s when
    /// `row_scale`, then `bᵢ` of each part whose rope has a `bias`, in part order.
    LinearParts {
        parts: Vec<usize>,
        row_scale: bool,
        ropes: Vec<Option<PartRope>>,
    },
}

/// The rotary epilogue of one part of a `linear_parts` (the `rope` op's attributes, and
/// whether a bias operand is added before the rotation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartRope {
    pub heads: usize,
    pub style: RopeStyle,
    pub base: f64,
    pub bias: bool,
}

impl PartRope {
    /// `heads:style:base:bias` (one part of the `rope=` attribute; `-` for an unrotated part).
    pub fn text(r: &Option<PartRope>) -> String {
        match r {
            None => "-".into(),
            Some(r) => format!(
                "{}:{}:{}:{}",
                r.heads,
                r.style.name(),
                fnum(r.base),
                u8::from(r.bias)
            ),
        }
    }

    pub fn parse(t: &str) -> Option<Option<PartRope>> {
        if t == "-" {
            return Some(None);
        }
        let f: Vec<&str> = t.split(':').collect();
        let [h, st, b, bias] = f.as_slice() else {
            return None;
        };
        Some(Some(PartRope {
            heads: h.parse().ok()?,
            style: RopeStyle::from_name(st)?,
            base: b.parse().ok()?,
            bias: match *bias {
                "0" => false,
                "1" => true,
                _ => return None,
            },
        }))
    }
}

impl Op {
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Param(_) => "param",
            Op::Recur { .. } => "loop.recur",
            Op::Tokens => "tokens",
            Op::Weight(_) => "weight",
            Op::Embed => "embed",
            Op::Linear => "linear",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Scale(_) => "scale",
            Op::Concat => "concat",
            Op::Slice { .. } => "slice",
            Op::Fused { .. } => "fused",
            Op::HeadRmsNorm { .. } => "head_rmsnorm",
            Op::LayerNorm { .. } => "layernorm",
            Op::MatMul => "matmul",
            Op::PosEmbed => "pos_embed",
            Op::Sinusoidal { .. } => "sinusoidal",
            Op::TimingSignal { .. } => "timing_signal",
            Op::RmsNormRes { .. } => "rmsnorm_res",
            Op::Proj(_) => "proj",
            Op::WSliceCols { .. } => "w.slice_cols",
            Op::WScale(_) => "w.scale",
            Op::WMulCols => "w.mul_cols",
            Op::WConcatRows => "w.concat_rows",
            Op::WPerIter => "w.per_iter",
            Op::WMap { .. } => "w.map",
            Op::WRepeatRows(_) => "w.repeat_rows",
            Op::Glu(_) => "glu",
            Op::InvRms { .. } => "inv_rms",
            Op::LinearEp { .. } => "linear_ep",
            Op::LinearParts { .. } => "linear_parts",
            Op::WTranspose => "w.transpose",
            Op::WInterleaveRows(_) => "w.interleave_rows",
            Op::LinearGlu { .. } => "linear_glu",
            Op::LinearNorm { .. } => "linear_norm",
        }
    }
}

impl Op {
    /// Ops whose value is a weight computed at load time from other weights.
    pub fn is_derived_weight(&self) -> bool {
        matches!(
            self,
            Op::WSliceCols { .. }
                | Op::WScale(_)
                | Op::WMulCols
                | Op::WConcatRows
                | Op::WPerIter
                | Op::WMap { .. }
                | Op::WRepeatRows(_)
                | Op::WTranspose
                | Op::WInterleaveRows(_)
        )
    }
}

impl fmt::Display for StateInit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateInit::Zeros => write!(f, "zeros"),
            StateInit::Operand => write!(f, "operand"),
            StateInit::TruncNormal { std, scale, seed } => {
                write!(
                    f,
                    "trunc_normal(std={},scale={},seed={seed})",
                    fnum(*std),
                    fnum(*scale)
                )
            }
        }
    }
}

impl fmt::Display for ExitSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitSpec::Fixed => write!(f, "fixed"),
            ExitSpec::Converge {
                threshold,
                min_steps,
                max_steps,
            } => write!(
                f,
                "converge(threshold={},min={min_steps},max={max_steps})",
                fnum(*threshold)
            ),
            ExitSpec::Criterion {
                kind,
                threshold,
                min_steps,
                every,
                max_steps,
            } => write!(
                f,
                "{}(threshold={},min={min_steps},every={every},max={max_steps})",
                kind.name(),
                fnum(*threshold)
            ),
            ExitSpec::Gate {
                q,
                min_steps,
                max_steps,
            } => {
                write!(f, "gate(q={},min={min_steps},max={max_steps})", fnum(*q))
            }
            ExitSpec::Act { eps, max_steps } => {
                write!(f, "act(eps={},max={max_steps})", fnum(*eps))
            }
            ExitSpec::ExpertChoice {
                alpha,
                capacity,
                threshold,
                max_steps,
            } => {
                // `;` separates the fractions: the attribute list splits on `,` and spaces.
                let caps: Vec<String> = capacity.iter().map(|c| fnum(*c)).collect();
                let caps = if caps.is_empty() {
                    "default".to_string()
                } else {
                    caps.join(";")
                };
                write!(
                    f,
                    "expert_choice(alpha={},capacity={caps},threshold={},max={max_steps})",
                    fnum(*alpha),
                    fnum(*threshold)
                )
            }
            ExitSpec::TokenChoice { alpha, max_steps } => {
                write!(f, "token_choice(alpha={},max={max_steps})", fnum(*alpha))
            }
        }
    }
}

impl fmt::Display for CacheSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheSpec::PerStep => write!(f, "per_step"),
            CacheSpec::Ring(c) => write!(f, "ring({c})"),
            CacheSpec::ShareFirst => write!(f, "share_first"),
            CacheSpec::LastStep => write!(f, "last_step"),
            CacheSpec::RecursionWise => write!(f, "recursion_wise"),
        }
    }
}

/// Shortest text that parses back to the same f64 (Rust's `{:?}` is round-trip exact).
pub fn fnum(x: f64) -> String {
    format!("{x:?}")
}

/// Shortest text that parses back to the same f32.
pub fn fnum32(x: f32) -> String {
    format!("{x:?}")
}
