//! `out[m, n] = x[m, k] · w[n, k]ᵀ` (the checkpoint's `Linear` layout, all row-major).
//!
//! For `m > 1` this calls `gemm` (packed, multithreaded over the current rayon pool). For
//! `m == 1` (decode) `gemm` would run on one thread, so a bandwidth-oriented GEMV splits the
//! output rows over the pool and streams each weight row exactly once, with AVX-512 or
//! AVX2+FMA dot products picked at run time (portable fallback elsewhere).

use crate::artifact::{EwOp, RopeStyle};

/// The C signature of an artifact's GEMM (`artifact::HostGemm`).
pub type GemmFn =
    unsafe extern "C" fn(*const f32, *const f32, *mut f32, *mut f32, i64, i64, i64, i64, i64, i64);

/// The C signature of an artifact's AMX bf16 GEMM (`artifact::HostGemm::bf16_amx`).
pub type AmxGemmFn = unsafe extern "C" fn(
    *const u16,
    *const u32,
    *mut f32,
    *mut f32,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
);

/// The artifact's own GEMMs, resolved: the MLIR backend compiles them into its object, and
/// every product of more than [`SMALL_M`] rows goes through them instead of `gemm` (and, for
/// bf16 weights on AMX, instead of the runtime's own tile kernel).
#[derive(Clone, Copy, Debug)]
pub struct HostGemm {
    pub nk: GemmFn,
    pub kn: GemmFn,
    pub panel: usize,
    pub bf16_amx: Option<AmxGemmFn>,
}

thread_local! {
    /// Each thread's packed-panel scratch for [`HostGemm`] calls; grows to the largest depth.
    static GEMM_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl HostGemm {
    /// The GEMM for `B`'s strides and its `ldb`: the `Linear` layout (`rhs_rs = 1`) or the
    /// `Conv1D` one (`rhs_cs = 1`); `None` for any other, which stays on `gemm`.
    fn pick(&self, rhs_rs: isize, rhs_cs: isize) -> Option<(GemmFn, isize)> {
        if rhs_rs == 1 {
            Some((self.nk, rhs_cs))
        } else if rhs_cs == 1 {
            Some((self.kn, rhs_rs))
        } else {
            None
        }
    }
}

/// One call of `f` (the artifact's GEMM for `B`'s layout, see [`HostGemm::pick`]) on this
/// thread, with this thread's packed-panel scratch.
///
/// # Safety
/// As [`gemm_block`].
#[allow(clippy::too_many_arguments)]
unsafe fn host_call(
    f: GemmFn,
    panel: usize,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    x: *const f32,
    x_rs: isize,
    rhs: *const f32,
    ldb: isize,
) {
    let len = k.next_multiple_of(16) * panel;
    GEMM_SCRATCH.with_borrow_mut(|s| {
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(
            x,
            rhs,
            dst,
            s.as_mut_ptr(),
            m as i64,
            k as i64,
            n as i64,
            x_rs as i64,
            ldb as i64,
            dst_rs as i64,
        )
    });
}

/// `dst[m, n] = x[m, k] · B` (all row strides in elements) where element `(kk, j)` of `B` is at
/// `rhs + kk·rhs_rs + j·rhs_cs`: one call shape for the `Linear` (Wᵀ) and `Conv1D` (W) layouts
/// and for column blocks of either. With `host`, the artifact's GEMM computes it (its own
/// column split over the pool when `par` asks for threads); else, for the `Linear` layout at
/// the row counts where it wins, the unpacked dot-product kernel (`dot`); else `gemm`.
///
/// # Safety
/// Every pointer must cover the elements the strides address.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_block(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    x: *const f32,
    x_rs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    par: gemm::Parallelism,
    host: Option<HostGemm>,
) {
    if let Some((h, (f, ldb))) = host.and_then(|h| Some((h, h.pick(rhs_rs, rhs_cs)?))) {
        let threads = match par {
            gemm::Parallelism::Rayon(t) => t.max(1),
            _ => 1,
        };
        if threads == 1 || n <= h.panel {
            host_call(f, h.panel, m, n, k, dst, dst_rs, x, x_rs, rhs, ldb);
            return;
        }
        let cols = n.div_ceil(threads).next_multiple_of(h.panel);
        let (d, xa, r) = (dst as usize, x as usize, rhs as usize);
        crate::par::for_each(n.div_ceil(cols), |c| {
            let j0 = c * cols;
            let nc = cols.min(n - j0);
            // SAFETY: each task writes its own columns j0..j0+nc of dst from B's columns
            // j0..j0+nc; the caller's pointers cover all of them.
            unsafe {
                host_call(
                    f,
                    h.panel,
                    m,
                    nc,
                    k,
                    (d as *mut f32).add(j0),
                    dst_rs,
                    xa as *const f32,
                    x_rs,
                    (r as *const f32).offset(j0 as isize * rhs_cs),
                    ldb,
                );
            }
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if rhs_rs == 1 && x_rs > 0 && rhs_cs > 0 && dst_rs > 0 && dot::wins(m, k) {
        // `B` is row-major `W` (the `Linear` layout): the unpacked dot-product kernel, on
        // column blocks over the pool when `par` asks for threads.
        let (ldx, ldw, ldo) = (x_rs as usize, rhs_cs as usize, dst_rs as usize);
        let threads = match par {
            gemm::Parallelism::Rayon(t) => t.max(1),
            _ => 1,
        };
        if threads == 1 {
            dot::gemm_dot(m, n, k, x, ldx, rhs, ldw, dst, ldo);
            return;
        }
        let cols = n.div_ceil(threads * 2).next_multiple_of(16);
        let (d, xa, r) = (dst as usize, x as usize, rhs as usize);
        crate::par::for_each(n.div_ceil(cols), |c| {
            let j0 = c * cols;
            // SAFETY: each task writes its own columns j0.. of dst from weight rows j0..; the
            // caller's pointers cover all of them.
            unsafe {
                dot::gemm_dot(
                    m,
                    cols.min(n - j0),
                    k,
                    xa as *const f32,
                    ldx,
                    (r as *const f32).add(j0 * ldw),
                    ldw,
                    (d as *mut f32).add(j0),
                    ldo,
                )
            };
        });
        return;
    }
    gemm::gemm(
        m, n, k, dst, 1, dst_rs, false, x, 1, x_rs, rhs, rhs_cs, rhs_rs, 0.0f32, 1.0f32, false,
        false, false, par,
    )
}

/// Below this many multiply-adds a product runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 16;

/// The matmul epilogue (`artifact::Epilogue`) resolved to slices, for rows `0..m` of one call:
/// `out[r, j] = residual[r·n + j] + row_scale[r] · p[r, j] + bias[j]`.
#[derive(Clone, Copy, Default)]
pub struct Epi<'a> {
    /// `[m]`: one factor per output row.
    pub row_scale: Option<&'a [f32]>,
    /// `[m, n]`, a different buffer from `out`.
    pub residual: Option<&'a [f32]>,
    /// `[n]`.
    pub bias: Option<&'a [f32]>,
    /// The gated unit over interleaved gate/up blocks (`artifact::GluEpilogue`): the product
    /// (in `out`) is a scratch and this writes the `[m, n/2]` result.
    pub glu: Option<GluEpi<'a>>,
    /// The row reduction after the split joins (`artifact::NormEpilogue`).
    pub norm: Option<NormEpi<'a>>,
    /// Rotary embedding of each head after the other per-element terms
    /// (`artifact::RopeEpilogue`).
    pub rope: Option<RopeEpi<'a>>,
}

/// Absolute positions of the rows `0..m` of one call.
#[derive(Clone, Copy, Debug)]
pub enum RowPos<'a> {
    /// Row `r` at position `pos0 + r` (one sequence, rows in order).
    From(usize),
    /// Row `r` at `pos[r]` (a batch of sequences, or compacted rows of per-row exits).
    Rows(&'a [usize]),
}

impl RowPos<'_> {
    #[inline]
    fn of(&self, r: usize) -> usize {
        match self {
            RowPos::From(p) => p + r,
            RowPos::Rows(p) => p[r],
        }
    }

    /// One past the largest position of rows `0..m`.
    fn end(&self, m: usize) -> usize {
        match self {
            RowPos::From(p) => p + m,
            RowPos::Rows(p) => p[..m].iter().map(|&q| q + 1).max().unwrap_or(0),
        }
    }
}

/// The rotary epilogue: `cos`/`sin` tables `[positions, head_dim/2]` (`rope::Rope`) and the
/// rows' positions.
#[derive(Clone, Copy)]
pub struct RopeEpi<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub head_dim: usize,
    pub style: RopeStyle,
    pub pos: RowPos<'a>,
}

impl RopeEpi<'_> {
    /// Rotates every head of `o` (whole heads: callers split at `align()`) at position `pos`,
    /// as the `Rope` kernel: `(a, b) → (a·cos − b·sin, b·cos + a·sin)` per pair.
    #[inline(always)]
    pub fn rotate(&self, o: &mut [f32], pos: usize) {
        let half = self.head_dim / 2;
        let c = &self.cos[pos * half..(pos + 1) * half];
        let s = &self.sin[pos * half..(pos + 1) * half];
        for h in o.chunks_exact_mut(self.head_dim) {
            match self.style {
                RopeStyle::Half => {
                    let (lo, hi) = h.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * c[i] - b * s[i];
                        hi[i] = b * c[i] + a * s[i];
                    }
                }
                RopeStyle::Interleaved => {
                    // Blocks of 8 pairs as fixed-size arrays, so the pair shuffles vectorize.
                    let mut blocks = h.chunks_exact_mut(16);
                    let mut i0 = 0;
                    for blk in &mut blocks {
                        let blk: &mut [f32; 16] = blk.try_into().expect("16 floats");
                        let cb: &[f32; 8] = c[i0..i0 + 8].try_into().expect("8 pairs");
                        let sb: &[f32; 8] = s[i0..i0 + 8].try_into().expect("8 pairs");
                        let mut out = [0f32; 16];
                        for j in 0..8 {
                            let (a, b) = (blk[2 * j], blk[2 * j + 1]);
                            out[2 * j] = a * cb[j] - b * sb[j];
                            out[2 * j + 1] = b * cb[j] + a * sb[j];
                        }
                        *blk = out;
                        i0 += 8;
                    }
                    for (i, p) in blocks.into_remainder().chunks_exact_mut(2).enumerate() {
                        let (a, b) = (p[0], p[1]);
                        p[0] = a * c[i0 + i] - b * s[i0 + i];
                        p[1] = b * c[i0 + i] + a * s[i0 + i];
                    }
                }
            }
        }
    }
}

/// The second phase of an epilogue: per finished row, optionally normalize it (RMSNorm with
/// an optional gain) and store `1/rms` of the result.
#[derive(Clone, Copy)]
pub struct NormEpi<'a> {
    eps: f32,
    normalize: bool,
    gain: Option<&'a [f32]>,
    /// `[m]` output, as an address: rows are finished from several threads.
    inv_rms: Option<(usize, usize)>,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> NormEpi<'a> {
    pub fn new(
        eps: f32,
        normalize: bool,
        gain: Option<&'a [f32]>,
        inv_rms: Option<&'a mut [f32]>,
    ) -> Self {
        NormEpi {
            eps,
            normalize,
            gain,
            inv_rms: inv_rms.map(|q| (q.as_mut_ptr() as usize, q.len())),
            _out: std::marker::PhantomData,
        }
    }

    /// `1 / sqrt(mean(v²) + eps)`, `sqrt` then divide as the `RmsNorm` kernel (8 partial sums
    /// so the loop vectorizes; the kernels' own order differs in the last bits).
    fn rms(&self, v: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let mut it = v.chunks_exact(8);
        for c in &mut it {
            for l in 0..8 {
                acc[l] += c[l] * c[l];
            }
        }
        let tail: f32 = it.remainder().iter().map(|x| x * x).sum();
        let ss = acc.iter().sum::<f32>() + tail;
        1.0 / (ss / v.len() as f32 + self.eps).sqrt()
    }

    /// Finish rows `0..m` of `out` (row stride `n`), once every column block is stored.
    pub(crate) fn finish(&self, out: &mut [f32], m: usize, n: usize, threads: usize) {
        if n == 0 || m == 0 {
            return;
        }
        let row = |r: usize, o: &mut [f32]| {
            if self.normalize {
                let s = self.rms(o);
                match self.gain {
                    Some(g) => o.iter_mut().zip(g).for_each(|(v, g)| *v = *v * s * g),
                    None => o.iter_mut().for_each(|v| *v *= s),
                }
            }
            if let Some((q, _)) = self.inv_rms {
                // SAFETY: `check` sized the buffer to `m` rows; each row is finished once.
                unsafe { *(q as *mut f32).add(r) = self.rms(o) };
            }
        };
        let rows = &mut out[..m * n];
        if threads > 1 && m > 1 && m * n >= PAR_MIN_MACS / 16 {
            let rp = rows.as_mut_ptr() as usize;
            crate::par::for_each(m, |r| {
                // SAFETY: row r of the m rows of n, owned by this chunk.
                row(r, unsafe {
                    std::slice::from_raw_parts_mut((rp as *mut f32).add(r * n), n)
                })
            });
        } else {
            rows.chunks_mut(n).enumerate().for_each(|(r, o)| row(r, o));
        }
    }
}

/// The output of a gated epilogue. Blocks of it are written from several threads (each its
/// own columns), hence an address rather than a slice.
#[derive(Clone, Copy)]
pub struct GluEpi<'a> {
    out: usize,
    len: usize,
    pub block: usize,
    pub act: EwOp,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> GluEpi<'a> {
    pub fn new(out: &'a mut [f32], block: usize, act: EwOp) -> Self {
        GluEpi {
            out: out.as_mut_ptr() as usize,
            len: out.len(),
            block: block.max(1),
            act,
            _out: std::marker::PhantomData,
        }
    }
}

/// Cephes `expf` as in the generated kernels (`backend/cranelift/math.rs`): clamped to
/// [-87, 88], `2^n · e^r` with a two-part `ln 2` and a degree-6 polynomial. Plain arithmetic
/// (no `mul_add`, which is a libm call without FMA) so the loops over a block vectorize.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = n * -0.693_359_375 + x;
    let r = n * 2.121_944_4e-4 + r;
    let z = r * r;
    let mut p = 1.987_569_15e-4f32;
    for c in [
        1.398_199_950_7e-3,
        8.333_451_907_3e-3,
        4.166_579_589_4e-2,
        1.666_666_545_9e-1,
        5.000_000_120_1e-1,
    ] {
        p = p * r + c;
    }
    let y = p * z + r + 1.0;
    let e = (t.to_bits() as i32 - (MAGIC.to_bits() as i32 - 127)) << 23;
    y * f32::from_bits(e as u32)
}

/// `out[c] = act(g[c]) · u[c]`, the activation in the generated kernels' forms (silu and
/// gelu_tanh as `x / (1 + e^-(k·x))`); other unary ops through the scalar semantics.
#[inline(always)]
fn glu_block(act: EwOp, g: &[f32], u: &[f32], out: &mut [f32]) {
    // Whole blocks of 16 as fixed-size arrays: the short loops of a per-block epilogue then
    // compile to straight vector code instead of a vectorized loop with a scalar tail.
    if let (Ok(g), Ok(u), Ok(o)) = (
        <&[f32; 16]>::try_from(g),
        <&[f32; 16]>::try_from(u),
        <&mut [f32; 16]>::try_from(&mut *out),
    ) {
        return glu_fixed(act, g, u, o);
    }
    glu_slices(act, g, u, out)
}

#[inline(always)]
fn glu_fixed(act: EwOp, g: &[f32; 16], u: &[f32; 16], out: &mut [f32; 16]) {
    glu_slices(act, g, u, out)
}

#[allow(clippy::excessive_precision)]
#[inline(always)]
fn glu_slices(act: EwOp, g: &[f32], u: &[f32], out: &mut [f32]) {
    let it = out.iter_mut().zip(g.iter().zip(u));
    match act {
        EwOp::Silu(_) => it.for_each(|(o, (&g, &u))| *o = g / (1.0 + exp_f32(-g)) * u),
        EwOp::GeluTanh(_) => {
            const K: f32 = 2.0 * 0.797_884_560_802_865_4;
            it.for_each(|(o, (&g, &u))| {
                let two_u = g * (g * g * (K * 0.044_715) + K);
                *o = g / (1.0 + exp_f32(-two_u)) * u
            })
        }
        EwOp::Relu(_) => it.for_each(|(o, (&g, &u))| *o = g.max(0.0) * u),
        EwOp::Sigmoid(_) => it.for_each(|(o, (&g, &u))| *o = 1.0 / (1.0 + exp_f32(-g)) * u),
        _ => it.for_each(|(o, (&g, &u))| {
            *o = crate::ew::eval(&[EwOp::Input(0), act], &[g as f64]) as f32 * u
        }),
    }
}

impl Epi<'_> {
    pub fn is_none(&self) -> bool {
        self.row_scale.is_none()
            && self.residual.is_none()
            && self.bias.is_none()
            && self.glu.is_none()
            && self.norm.is_none()
            && self.rope.is_none()
    }

    pub(crate) fn check(&self, m: usize, n: usize) {
        assert!(
            self.row_scale.is_none_or(|s| s.len() >= m)
                && self.residual.is_none_or(|r| r.len() >= m * n)
                && self.bias.is_none_or(|b| b.len() >= n)
                && self
                    .glu
                    .is_none_or(|g| n.is_multiple_of(2) && g.len >= m * (n / 2))
                && self.norm.is_none_or(|nm| {
                    self.glu.is_none()
                        && nm.gain.is_none_or(|g| g.len() >= n)
                        && nm.inv_rms.is_none_or(|q| q.1 >= m)
                })
                && self.rope.is_none_or(|rp| {
                    let half = rp.head_dim / 2;
                    self.glu.is_none()
                        && self.norm.is_none()
                        && half > 0
                        && n.is_multiple_of(rp.head_dim)
                        && match rp.pos {
                            RowPos::From(_) => true,
                            RowPos::Rows(p) => p.len() >= m,
                        }
                        && rp.pos.end(m) * half <= rp.cos.len().min(rp.sin.len())
                }),
            "matmul epilogue operand sizes"
        );
    }

    /// Product column blocks must start at multiples of this (a whole gate/up block, a whole
    /// rotary head).
    pub(crate) fn align(&self) -> usize {
        match (self.glu, self.rope) {
            (Some(g), _) => 2 * g.block,
            (None, Some(rp)) => rp.head_dim,
            (None, None) => 1,
        }
    }

    /// Applies the epilogue to rows `r0..r1`, columns `j0..j0 + nc` of `out` (row stride `n`),
    /// which hold the raw product. Called on each block right after it is computed, while it
    /// is still in cache.
    ///
    /// # Safety
    /// `out` covers `r1 · n` elements and no other thread touches this block; `check` passed.
    #[inline]
    pub(crate) unsafe fn apply(
        &self,
        out: *mut f32,
        n: usize,
        r0: usize,
        r1: usize,
        j0: usize,
        nc: usize,
    ) {
        self.apply_ld(out, n, n, r0, r1, j0, nc)
    }

    /// [`Epi::apply`] on a block held apart from `out`: element `(r, j)` of the product is at
    /// `blk + r·ld + j` (a base that may lie outside the block's buffer; only rows `r0..r1`,
    /// columns `j0..j0 + nc` are touched). The residual and the gated output keep their own
    /// `[m, n]` and `[m, n/2]` layouts. The AMX GEMM finishes each block in a cache-resident
    /// accumulator this way, and writes `out` once.
    ///
    /// # Safety
    /// Those elements of `blk` are valid and this thread's alone; `check(m, n)` passed for
    /// the operands the terms read.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn apply_ld(
        &self,
        blk: *mut f32,
        ld: usize,
        n: usize,
        r0: usize,
        r1: usize,
        j0: usize,
        nc: usize,
    ) {
        if self.is_none() {
            return;
        }
        // The per-element terms, the gated unit's `exp` and the rotation run over whole
        // blocks after a prefill GEMM: compiled for AVX-512 they take a third of the baseline
        // (SSE2) code's time.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return self.apply_avx512(blk, ld, n, r0, r1, j0, nc);
        }
        self.apply_rows(blk, ld, n, r0, r1, j0, nc)
    }

    /// # Safety
    /// As [`Epi::apply_ld`], on a CPU with AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn apply_avx512(
        &self,
        blk: *mut f32,
        ld: usize,
        n: usize,
        r0: usize,
        r1: usize,
        j0: usize,
        nc: usize,
    ) {
        self.apply_rows(blk, ld, n, r0, r1, j0, nc)
    }

    /// # Safety
    /// As [`Epi::apply_ld`].
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn apply_rows(
        &self,
        blk: *mut f32,
        ld: usize,
        n: usize,
        r0: usize,
        r1: usize,
        j0: usize,
        nc: usize,
    ) {
        for r in r0..r1 {
            let o = std::slice::from_raw_parts_mut(blk.wrapping_add(r * ld + j0), nc);
            if let Some(s) = self.row_scale {
                let s = s[r];
                o.iter_mut().for_each(|v| *v *= s);
            }
            if let Some(b) = self.bias {
                o.iter_mut().zip(&b[j0..j0 + nc]).for_each(|(v, b)| *v += b);
            }
            if let Some(res) = self.residual {
                let rr = &res[r * n + j0..r * n + j0 + nc];
                o.iter_mut().zip(rr).for_each(|(v, a)| *v += a);
            }
            if let Some(g) = self.glu {
                // `j0` starts a gate/up block (callers split at `align()`), so every block in
                // the range is whole: `2·b` columns reduce to `b` outputs.
                let half = n / 2;
                let mut c = 0;
                while c < nc {
                    let b0 = (j0 + c) / 2;
                    let b = g.block.min(half - b0);
                    let dst =
                        std::slice::from_raw_parts_mut((g.out as *mut f32).add(r * half + b0), b);
                    glu_block(g.act, &o[c..c + b], &o[c + b..c + 2 * b], dst);
                    c += 2 * b;
                }
            }
            if let Some(rp) = &self.rope {
                // `j0` starts a head and `nc` covers whole heads (callers split at `align()`).
                debug_assert!(j0.is_multiple_of(rp.head_dim) && nc.is_multiple_of(rp.head_dim));
                rp.rotate(o, rp.pos.of(r));
            }
        }
    }
}

/// `out = x · wᵀ` with `x: [m, k]`, `w: [n, k]`, `out: [m, n]`.
/// `threads` is the size of the current rayon pool.
pub fn matmul(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, threads: usize) {
    matmul_epi(x, w, out, m, k, n, threads, &Epi::default())
}

/// [`matmul`] followed by the epilogue, applied per output block inside the parallel split (so
/// the product is not streamed through memory a second time); a row reduction
/// ([`NormEpi`]) runs once the split has joined, over rows that were just written.
#[allow(clippy::too_many_arguments)]
pub fn matmul_epi(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
    epi: &Epi,
) {
    matmul_epi_on(None, x, w, out, m, k, n, threads, epi)
}

/// [`matmul_epi`] with the artifact's GEMM (when it has one) for the many-row products.
#[allow(clippy::too_many_arguments)]
pub fn matmul_epi_on(
    host: Option<HostGemm>,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
    epi: &Epi,
) {
    matmul_blocks(host, x, w, out, m, k, n, threads, epi);
    if let Some(nm) = &epi.norm {
        nm.finish(out, m, n, threads);
    }
}

/// The product with the per-block epilogue terms.
#[allow(clippy::too_many_arguments)]
fn matmul_blocks(
    host: Option<HostGemm>,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
    epi: &Epi,
) {
    assert!(
        x.len() >= m * k && w.len() >= n * k && out.len() >= m * n,
        "matmul operand sizes"
    );
    epi.check(m, n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        // SAFETY: checked sizes; a single caller owns `out`.
        unsafe { epi.apply(out.as_mut_ptr(), n, 0, m, 0, n) };
        return;
    }
    if m == 1 {
        gemv_epi(&x[..k], &w[..n * k], &mut out[..n], threads, epi);
        return;
    }
    if m <= SMALL_M {
        gemv_multi_epi(&x[..m * k], &w[..n * k], &mut out[..m * n], m, threads, epi);
        return;
    }
    let macs = m.saturating_mul(n).saturating_mul(k);
    // gemm's own threading splits poorly when n is small (n = d_model in most projections):
    // at m = 128, n = 1024 it reached ~90 GFLOP/s on two cores where one column block per
    // thread, each a single-threaded gemm, reached ~160. Large products keep gemm's split.
    if threads > 1 && macs >= 64 * PAR_MIN_MACS && m <= 512 && n >= 64 * threads {
        let cols = n
            .div_ceil(threads)
            .next_multiple_of(host.map_or(16, |h| h.panel))
            .next_multiple_of(epi.align());
        let op = out.as_mut_ptr() as usize;
        crate::par::for_each(threads, |p| {
            let j0 = p * cols;
            if j0 >= n {
                return;
            }
            let nc = cols.min(n - j0);
            // SAFETY: sizes checked above; each task writes its own columns j0..j0+nc of `out`
            // (row stride n) from weight rows j0..j0+nc, then applies the epilogue to them.
            unsafe {
                gemm_block(
                    m,
                    nc,
                    k,
                    (op as *mut f32).add(j0),
                    n as isize,
                    x.as_ptr(),
                    k as isize,
                    w.as_ptr().add(j0 * k),
                    1,
                    k as isize,
                    gemm::Parallelism::None,
                    host,
                );
                epi.apply(op as *mut f32, n, 0, m, j0, nc);
            }
        });
        return;
    }
    let par = if threads > 1 && macs >= 64 * PAR_MIN_MACS {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the sizes were checked above; dst is [m, n] row-major (rs = n, cs = 1), lhs is
    // [m, k] row-major, rhs is wᵀ: element (kk, j) lives at w[j * k + kk] (rs = 1, cs = k).
    unsafe {
        gemm_block(
            m,
            n,
            k,
            out.as_mut_ptr(),
            n as isize,
            x.as_ptr(),
            k as isize,
            w.as_ptr(),
            1,
            k as isize,
            par,
            host,
        )
    }
    if !epi.is_none() {
        // gemm's own split gives no per-block hook: one pass over row blocks afterwards.
        let rows = if matches!(par, gemm::Parallelism::None) {
            m
        } else {
            m.div_ceil(threads * 4).max(1)
        };
        let op = out.as_mut_ptr() as usize;
        crate::par::for_each(m.div_ceil(rows), |c| {
            let r0 = c * rows;
            // SAFETY: disjoint row blocks of `out`.
            unsafe { epi.apply(op as *mut f32, n, r0, (r0 + rows).min(m), 0, n) };
        });
    }
}

/// `out = x · w` with `x: [m, k]`, `w: [k, n]` (GPT-2's `Conv1D` layout), `out: [m, n]`.
/// For one row the output columns are split over the pool, each chunk streaming its columns of
/// every weight row.
pub fn matmul_kn(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    matmul_kn_on(None, x, w, out, m, k, n, threads)
}

/// [`matmul_kn`] with the artifact's GEMM (when it has one) for the many-row products.
#[allow(clippy::too_many_arguments)]
pub fn matmul_kn_on(
    host: Option<HostGemm>,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    assert!(
        x.len() >= m * k && w.len() >= k * n && out.len() >= m * n,
        "matmul_kn operand sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    let macs = m.saturating_mul(n).saturating_mul(k);
    let gemm_cols = |out: &mut [f32], j0: usize, nc: usize, par: gemm::Parallelism| {
        // SAFETY: sizes checked above; dst [m, nc] with row stride n starting at column j0, lhs
        // [m, k] row-major, rhs element (kk, j) at w[kk·n + j0 + j] (rs = n, cs = 1).
        unsafe {
            gemm_block(
                m,
                nc,
                k,
                out.as_mut_ptr().add(j0),
                n as isize,
                x.as_ptr(),
                k as isize,
                w.as_ptr().add(j0),
                n as isize,
                1,
                par,
                host,
            )
        }
    };
    if m == 1 && threads > 1 && macs >= PAR_MIN_MACS && n >= 64 {
        let chunk = n.div_ceil(threads * 2).next_multiple_of(16);
        let base = out.as_mut_ptr() as usize;
        crate::par::for_each(n.div_ceil(chunk), |c| {
            let j0 = c * chunk;
            let nc = chunk.min(n - j0);
            // SAFETY: chunks write disjoint columns of the single output row.
            let o = unsafe { std::slice::from_raw_parts_mut(base as *mut f32, n) };
            gemm_cols(o, j0, nc, gemm::Parallelism::None);
        });
        return;
    }
    let par = if threads > 1 && macs >= 64 * PAR_MIN_MACS {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_cols(out, 0, n, par);
}

/// `out[j] = Σ_i x[i] · w[j·k + i]` with `k = x.len()`, rows split over the rayon pool.
pub fn gemv(x: &[f32], w: &[f32], out: &mut [f32], threads: usize) {
    gemv_epi(x, w, out, threads, &Epi::default())
}

/// [`gemv`] with the epilogue of its single row applied to each chunk of outputs as it is
/// produced.
pub fn gemv_epi(x: &[f32], w: &[f32], out: &mut [f32], threads: usize, epi: &Epi) {
    let k = x.len();
    let n = out.len();
    assert!(w.len() >= n * k, "gemv operand sizes");
    epi.check(1, n);
    if threads <= 1 || n < 8 || n.saturating_mul(k) < PAR_MIN_MACS {
        gemv_rows(x, w, out);
        // SAFETY: sizes checked; one caller.
        unsafe { epi.apply(out.as_mut_ptr(), n, 0, 1, 0, n) };
        return;
    }
    // A few chunks per thread so that the threads can balance; rows in multiples of 4.
    let chunks = threads * 4;
    let rows = n
        .div_ceil(chunks)
        .next_multiple_of(4)
        .max(4)
        .next_multiple_of(epi.align());
    let op = out.as_mut_ptr() as usize;
    crate::par::for_each(n.div_ceil(rows), |c| {
        let r0 = c * rows;
        let len = rows.min(n - r0);
        // SAFETY: chunk c owns outputs r0..r0+len.
        let o = unsafe { std::slice::from_raw_parts_mut((op as *mut f32).add(r0), len) };
        gemv_rows(x, &w[r0 * k..(r0 + len) * k], o);
        // SAFETY: this task's columns r0..r0+len of the single output row.
        unsafe { epi.apply(op as *mut f32, n, 0, 1, r0, len) };
    });
}

/// Up to this many rows (a decode step of a small batch) use `gemv_multi`: `gemm` packs the
/// whole weight for a handful of rows and loses to streaming it.
const SMALL_M: usize = 8;

/// Weight bytes per block of the serial multi-row GEMV (half of a 2 MiB L2).
const SERIAL_BLOCK_BYTES: usize = 1 << 20;

/// GEMV for a few rows at once: the output columns (weight rows) are split over the pool and
/// each block of weight rows is applied to every `x` row while it is hot in cache, so the
/// weights are streamed from memory once per call, not once per row.
pub fn gemv_multi(x: &[f32], w: &[f32], out: &mut [f32], m: usize, threads: usize) {
    gemv_multi_epi(x, w, out, m, threads, &Epi::default())
}

/// [`gemv_multi`] with the epilogue applied to each block of outputs as it is produced.
pub fn gemv_multi_epi(x: &[f32], w: &[f32], out: &mut [f32], m: usize, threads: usize, epi: &Epi) {
    let k = x.len() / m.max(1);
    let n = out.len() / m.max(1);
    assert!(
        w.len() >= n * k && x.len() >= m * k && out.len() >= m * n,
        "gemv_multi operand sizes"
    );
    epi.check(m, n);
    let block = |r0: usize, r1: usize, out: *mut f32| {
        // SAFETY: blocks [r0, r1) are disjoint across callers; every row of out is n long.
        unsafe { gemv_rows_multi(x, m, k, &w[r0 * k..r1 * k], out.add(r0), n) };
        // SAFETY: as above, columns r0..r1 of every row belong to this caller.
        unsafe { epi.apply(out, n, 0, m, r0, r1 - r0) };
    };
    let op = out.as_mut_ptr() as usize;
    if threads <= 1 || n < 8 || m.saturating_mul(n).saturating_mul(k) < PAR_MIN_MACS {
        // Blocks of weight rows that stay in L2 while every input row streams over them: the
        // weights are read from memory once per call, not once per input row.
        let rows = (SERIAL_BLOCK_BYTES / (4 * k.max(1)))
            .max(4)
            .next_multiple_of(epi.align())
            .min(n.max(1));
        let mut r0 = 0;
        while r0 < n {
            let r1 = (r0 + rows).min(n);
            block(r0, r1, op as *mut f32);
            r0 = r1;
        }
        return;
    }
    let rows = n
        .div_ceil(threads * 4)
        .next_multiple_of(4)
        .max(4)
        .next_multiple_of(epi.align());
    crate::par::for_each(n.div_ceil(rows), |c| {
        let r0 = c * rows;
        block(r0, (r0 + rows).min(n), op as *mut f32);
    });
}

/// `out[i·n + j] = x[i]·w[j]` for the `m` rows of `x` and every row `j` of the weight block
/// `w`. With AVX-512 and 2 ≤ m ≤ 8 each weight row is loaded once for all `m` inputs (a batch
/// decode step then streams its weights once, not once per sequence, and at L2 speed the
/// FMAs are no longer starved); each output keeps `gemv_rows`'s own summation order, so a
/// sequence's result does not depend on what else is in the batch.
///
/// # Safety
/// `out` addresses `m` rows of stride `n`, each with `w.len() / k` writable columns that no
/// other thread touches.
pub(super) unsafe fn gemv_rows_multi(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    out: *mut f32,
    n: usize,
) {
    let len = w.len().checked_div(k).unwrap_or(0);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if k > 0 && (2..=8).contains(&m) && std::arch::is_x86_feature_detected!("avx512f") {
        // `gemv_avx512` sums rows in groups of four one way and the last `len % 4` another.
        done = len / 4 * 4;
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        // SAFETY: the feature is present; x holds m rows of k, w holds len rows of k.
        match m {
            2 => x86::gemv_multi_avx512::<2>(xp, k, wp, done, out, n),
            3 => x86::gemv_multi_avx512::<3>(xp, k, wp, done, out, n),
            4 => x86::gemv_multi_avx512::<4>(xp, k, wp, done, out, n),
            5 => x86::gemv_multi_avx512::<5>(xp, k, wp, done, out, n),
            6 => x86::gemv_multi_avx512::<6>(xp, k, wp, done, out, n),
            7 => x86::gemv_multi_avx512::<7>(xp, k, wp, done, out, n),
            _ => x86::gemv_multi_avx512::<8>(xp, k, wp, done, out, n),
        }
    }
    if done < len {
        for i in 0..m {
            let o = std::slice::from_raw_parts_mut(out.add(i * n + done), len - done);
            gemv_rows(&x[i * k..(i + 1) * k], &w[done * k..len * k], o);
        }
    }
}

/// Serial GEMV on one block of rows.
pub fn gemv_rows(x: &[f32], w: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature is present; sizes are checked inside.
            unsafe { x86::gemv_avx512(x, w, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            unsafe { x86::gemv_avx2(x, w, out) };
            return;
        }
    }
    gemv_portable(x, w, out)
}

/// Portable GEMV: 8 independent partial sums per row (auto-vectorises).
pub fn gemv_portable(x: &[f32], w: &[f32], out: &mut [f32]) {
    let k = x.len();
    for (j, o) in out.iter_mut().enumerate() {
        let row = &w[j * k..(j + 1) * k];
        let mut acc = [0f32; 8];
        let mut xc = x.chunks_exact(8);
        let mut wc = row.chunks_exact(8);
        for (xa, wa) in (&mut xc).zip(&mut wc) {
            for l in 0..8 {
                acc[l] = xa[l].mul_add(wa[l], acc[l]);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (a, b) in xc.remainder().iter().zip(wc.remainder()) {
            s += a * b;
        }
        *o = s;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Prefetches into L2 the two lines at float offset `i` of each of the `R` rows (`k`
    /// apart) from `next`: the weight block after the current one, which is read at the same
    /// pace. Each weight row is its own page-sized stream, and the hardware prefetchers stop
    /// at a page's end and restart late on the next row. Worth 10–13 % of d=1024 decode at
    /// batch 8 (68–70 to 75–78 tok/s, alternating binaries); in the single-row GEMV it cost
    /// 3–4 % (that stream already runs at the bandwidth ceiling), so only the multi-row
    /// kernel uses it.
    #[inline(always)]
    unsafe fn fetch_next<const R: usize>(next: *const f32, k: usize, i: usize) {
        for r in 0..R {
            let p = next.wrapping_add(r * k + i) as *const i8;
            _mm_prefetch::<_MM_HINT_T1>(p);
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(64));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemv_avx512(x: &[f32], w: &[f32], out: &mut [f32]) {
        let k = x.len();
        let n = out.len();
        assert!(w.len() >= n * k);
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let kb = k / 16 * 16;
        let tail = k - kb;
        let mask: __mmask16 = ((1u32 << tail) - 1) as u16;
        let mut j = 0;
        while j + 4 <= n {
            let w0 = wp.add(j * k);
            let w1 = w0.add(k);
            let w2 = w1.add(k);
            let w3 = w2.add(k);
            let (mut a0, mut a1, mut a2, mut a3) = (
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
            );
            let (mut b0, mut b1, mut b2, mut b3) = (
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
            );
            let mut i = 0;
            while i + 32 <= kb {
                let x0 = _mm512_loadu_ps(xp.add(i));
                let x1 = _mm512_loadu_ps(xp.add(i + 16));
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0.add(i)), x0, a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1.add(i)), x0, a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2.add(i)), x0, a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3.add(i)), x0, a3);
                b0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0.add(i + 16)), x1, b0);
                b1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1.add(i + 16)), x1, b1);
                b2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2.add(i + 16)), x1, b2);
                b3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3.add(i + 16)), x1, b3);
                i += 32;
            }
            if i < kb {
                let x0 = _mm512_loadu_ps(xp.add(i));
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0.add(i)), x0, a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1.add(i)), x0, a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2.add(i)), x0, a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3.add(i)), x0, a3);
                i += 16;
            }
            if tail > 0 {
                let x0 = _mm512_maskz_loadu_ps(mask, xp.add(i));
                b0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, w0.add(i)), x0, b0);
                b1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, w1.add(i)), x0, b1);
                b2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, w2.add(i)), x0, b2);
                b3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, w3.add(i)), x0, b3);
            }
            *out.get_unchecked_mut(j) = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0));
            *out.get_unchecked_mut(j + 1) = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
            *out.get_unchecked_mut(j + 2) = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2));
            *out.get_unchecked_mut(j + 3) = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3));
            j += 4;
        }
        while j < n {
            let w0 = wp.add(j * k);
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i + 64 <= kb {
                for (u, a) in acc.iter_mut().enumerate() {
                    let o = i + 16 * u;
                    *a =
                        _mm512_fmadd_ps(_mm512_loadu_ps(w0.add(o)), _mm512_loadu_ps(xp.add(o)), *a);
                }
                i += 64;
            }
            while i < kb {
                acc[0] = _mm512_fmadd_ps(
                    _mm512_loadu_ps(w0.add(i)),
                    _mm512_loadu_ps(xp.add(i)),
                    acc[0],
                );
                i += 16;
            }
            if tail > 0 {
                acc[1] = _mm512_fmadd_ps(
                    _mm512_maskz_loadu_ps(mask, w0.add(i)),
                    _mm512_maskz_loadu_ps(mask, xp.add(i)),
                    acc[1],
                );
            }
            let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            *out.get_unchecked_mut(j) = _mm512_reduce_add_ps(s);
            j += 1;
        }
    }

    /// `out[r·n + j] = x[r]·w[j]` for `M` input rows and weight rows `0..rows`, in register
    /// blocks of two weight rows by up to four inputs: each load of a weight chunk feeds four
    /// products and each load of an input chunk two, where one weight row at a time needed an
    /// input load per multiply-add (the batch-8 decode step was load-bound at half the
    /// memory's speed). Per output the same order of sums as `gemv_avx512`'s blocks of four
    /// rows (even 16-lane chunks into `a`, odd ones and the masked tail into `b`), so a row's
    /// result does not depend on the batch.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemv_multi_avx512<const M: usize>(
        x: *const f32,
        k: usize,
        w: *const f32,
        rows: usize,
        out: *mut f32,
        n: usize,
    ) {
        gemv_multi_rg::<M, 2, 4>(x, k, w, rows, out, n)
    }

    /// Blocks of `R` weight rows by `G ≤ 8` inputs (the last rows one at a time).
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn gemv_multi_rg<const M: usize, const R: usize, const G: usize>(
        x: *const f32,
        k: usize,
        w: *const f32,
        rows: usize,
        out: *mut f32,
        n: usize,
    ) {
        const { assert!(R >= 1 && G >= 1 && G <= 8) };
        let mut j = 0;
        while j < rows {
            let full = j + R <= rows;
            let mut g = 0;
            while g < M {
                let (xg, og) = (x.add(g * k), out.add(g * n + j));
                let (wj, left) = (w.add(j * k), (M - g).min(G));
                // `R` is the block height itself (a const parameter); only the inputs left
                // for the last group (fewer than `G` when `G` does not divide `M`) are matched.
                macro_rules! go {
                    ($r:expr) => {
                        match left {
                            1 => multi_block::<{ $r }, 1>(xg, k, wj, og, n, g == 0),
                            2 => multi_block::<{ $r }, 2>(xg, k, wj, og, n, g == 0),
                            3 => multi_block::<{ $r }, 3>(xg, k, wj, og, n, g == 0),
                            4 => multi_block::<{ $r }, 4>(xg, k, wj, og, n, g == 0),
                            5 => multi_block::<{ $r }, 5>(xg, k, wj, og, n, g == 0),
                            6 => multi_block::<{ $r }, 6>(xg, k, wj, og, n, g == 0),
                            7 => multi_block::<{ $r }, 7>(xg, k, wj, og, n, g == 0),
                            _ => multi_block::<{ $r }, 8>(xg, k, wj, og, n, g == 0),
                        }
                    };
                }
                if full {
                    go!(R)
                } else {
                    go!(1)
                }
                g += G;
            }
            j += if full { R } else { 1 };
        }
    }

    /// `R` weight rows at `w` by `G` input rows at `x` (rows `k` apart); output `(g, r)` at
    /// `out[g·n + r]`. With `fetch`, the next `R` rows are prefetched on the way.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn multi_block<const R: usize, const G: usize>(
        x: *const f32,
        k: usize,
        w: *const f32,
        out: *mut f32,
        n: usize,
        fetch: bool,
    ) {
        let kb = k / 16 * 16;
        let tail = k - kb;
        let mask: __mmask16 = ((1u32 << tail) - 1) as u16;
        let mut a = [[_mm512_setzero_ps(); G]; R];
        let mut b = [[_mm512_setzero_ps(); G]; R];
        // The next block's rows, at this block's offsets (see `fetch_next`); the first group
        // of inputs streams the block from memory, the others find it in L1.
        let next = w.wrapping_add(R * k);
        let mut i = 0;
        while i + 32 <= kb {
            if fetch {
                fetch_next::<R>(next, k, i);
            }
            let mut x0 = [_mm512_setzero_ps(); G];
            let mut x1 = [_mm512_setzero_ps(); G];
            for q in 0..G {
                x0[q] = _mm512_loadu_ps(x.add(q * k + i));
                x1[q] = _mm512_loadu_ps(x.add(q * k + i + 16));
            }
            for r in 0..R {
                let wr = w.add(r * k + i);
                let w0 = _mm512_loadu_ps(wr);
                let w1 = _mm512_loadu_ps(wr.add(16));
                for q in 0..G {
                    a[r][q] = _mm512_fmadd_ps(w0, x0[q], a[r][q]);
                    b[r][q] = _mm512_fmadd_ps(w1, x1[q], b[r][q]);
                }
            }
            i += 32;
        }
        if i < kb {
            for r in 0..R {
                let w0 = _mm512_loadu_ps(w.add(r * k + i));
                for q in 0..G {
                    a[r][q] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x.add(q * k + i)), a[r][q]);
                }
            }
            i += 16;
        }
        if tail > 0 {
            for r in 0..R {
                let w0 = _mm512_maskz_loadu_ps(mask, w.add(r * k + i));
                for q in 0..G {
                    let xq = _mm512_maskz_loadu_ps(mask, x.add(q * k + i));
                    b[r][q] = _mm512_fmadd_ps(w0, xq, b[r][q]);
                }
            }
        }
        for r in 0..R {
            for q in 0..G {
                *out.add(q * n + r) = _mm512_reduce_add_ps(_mm512_add_ps(a[r][q], b[r][q]));
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemv_avx2(x: &[f32], w: &[f32], out: &mut [f32]) {
        let k = x.len();
        let n = out.len();
        assert!(w.len() >= n * k);
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let kb = k / 8 * 8;
        let mut j = 0;
        while j + 4 <= n {
            let rows = [
                wp.add(j * k),
                wp.add((j + 1) * k),
                wp.add((j + 2) * k),
                wp.add((j + 3) * k),
            ];
            let mut a = [_mm256_setzero_ps(); 4];
            let mut b = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 16 <= kb {
                let x0 = _mm256_loadu_ps(xp.add(i));
                let x1 = _mm256_loadu_ps(xp.add(i + 8));
                for r in 0..4 {
                    a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[r].add(i)), x0, a[r]);
                    b[r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[r].add(i + 8)), x1, b[r]);
                }
                i += 16;
            }
            if i < kb {
                let x0 = _mm256_loadu_ps(xp.add(i));
                for r in 0..4 {
                    a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[r].add(i)), x0, a[r]);
                }
                i += 8;
            }
            for r in 0..4 {
                let mut s = hsum256(_mm256_add_ps(a[r], b[r]));
                for t in i..k {
                    s += *xp.add(t) * *rows[r].add(t);
                }
                *out.get_unchecked_mut(j + r) = s;
            }
            j += 4;
        }
        while j < n {
            let w0 = wp.add(j * k);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= kb {
                for (u, a) in acc.iter_mut().enumerate() {
                    let o = i + 8 * u;
                    *a =
                        _mm256_fmadd_ps(_mm256_loadu_ps(w0.add(o)), _mm256_loadu_ps(xp.add(o)), *a);
                }
                i += 32;
            }
            while i < kb {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(w0.add(i)),
                    _mm256_loadu_ps(xp.add(i)),
                    acc[0],
                );
                i += 8;
            }
            let mut s = hsum256(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ));
            for t in i..k {
                s += *xp.add(t) * *w0.add(t);
            }
            *out.get_unchecked_mut(j) = s;
            j += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{lcg, naive, pool};

    fn close(a: &[f32], b: &[f32], k: usize) {
        assert_eq!(a.len(), b.len());
        let tol = 1e-5 * (k as f32).sqrt().max(1.0);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "index {i}: {x} vs {y} (k={k})"
            );
        }
    }

    #[test]
    fn column_split_matmul_matches_naive() {
        // Large enough for the two-thread column split (m ≤ 512, n not a multiple of the block).
        let (m, k, n) = (64, 256, 300);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 60.0)
            .collect();
        let mut out = vec![f32::NAN; m * n];
        matmul(&x, &w, &mut out, m, k, n, 2);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64)
                    .sum();
                assert!(
                    (out[i * n + j] as f64 - want).abs() < 1e-3,
                    "[{i},{j}] {} vs {want}",
                    out[i * n + j]
                );
            }
        }
    }

    #[test]
    fn matmul_kn_matches_naive() {
        for &(m, k, n) in &[(1, 7, 5), (1, 64, 300), (3, 33, 70), (17, 64, 129)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0)
                .collect();
            for threads in [1, 2] {
                let mut out = vec![0.0; m * n];
                matmul_kn(&x, &w, &mut out, m, k, n, threads);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|kk| x[i * k + kk] as f64 * w[kk * n + j] as f64)
                            .sum();
                        assert!(
                            (out[i * n + j] as f64 - want).abs() < 1e-3,
                            "({m},{k},{n}) [{i},{j}]"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gemv_matches_naive_all_paths() {
        let mut s = 7u64;
        for &k in &[1usize, 3, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 257] {
            for &n in &[1usize, 2, 3, 4, 5, 7, 9, 13] {
                let x: Vec<f32> = (0..k).map(|_| lcg(&mut s)).collect();
                let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
                let want = naive(&x, &w, 1, k, n);
                let mut o = vec![f32::NAN; n];
                gemv_portable(&x, &w, &mut o);
                close(&o, &want, k);
                let mut o = vec![f32::NAN; n];
                gemv_rows(&x, &w, &mut o);
                close(&o, &want, k);
                #[cfg(target_arch = "x86_64")]
                {
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        let mut o = vec![f32::NAN; n];
                        unsafe { x86::gemv_avx2(&x, &w, &mut o) };
                        close(&o, &want, k);
                    }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        let mut o = vec![f32::NAN; n];
                        unsafe { x86::gemv_avx512(&x, &w, &mut o) };
                        close(&o, &want, k);
                    }
                }
            }
        }
    }

    #[test]
    fn gemv_parallel_matches_naive() {
        let mut s = 11u64;
        let (k, n) = (300usize, 1001usize);
        let x: Vec<f32> = (0..k).map(|_| lcg(&mut s)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let want = naive(&x, &w, 1, k, n);
        let mut o = vec![f32::NAN; n];
        pool(3).install(|| gemv(&x, &w, &mut o, 3));
        close(&o, &want, k);
    }

    #[test]
    fn gemv_multi_matches_naive_serial_and_parallel() {
        let mut s = 13u64;
        // The last shape takes several weight blocks on the serial path.
        for &(m, k, n) in &[
            (2usize, 17usize, 5usize),
            (4, 300, 1001),
            (8, 64, 33),
            (3, 70000, 21),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let want = naive(&x, &w, m, k, n);
            for threads in [1, 3] {
                let mut o = vec![f32::NAN; m * n];
                pool(threads).install(|| gemv_multi(&x, &w, &mut o, m, threads));
                close(&o, &want, k);
            }
        }
    }

    /// A row's product must not depend on the other rows of a small batch: the multi-row GEMV
    /// gives, bit for bit, what the single-row GEMV gives each row alone (so a batched decode
    /// step reproduces independent sessions exactly), on every k tail and every n remainder.
    #[test]
    fn gemv_multi_rows_equal_single_row_gemv_bitwise() {
        let mut s = 29u64;
        for m in 2..=8usize {
            for &k in &[1usize, 15, 16, 17, 32, 33, 48, 100, 1031] {
                for &n in &[1usize, 3, 4, 5, 8, 67] {
                    let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
                    let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
                    for threads in [1, 2] {
                        let mut o = vec![f32::NAN; m * n];
                        pool(threads).install(|| gemv_multi(&x, &w, &mut o, m, threads));
                        for i in 0..m {
                            let mut one = vec![f32::NAN; n];
                            pool(threads)
                                .install(|| gemv(&x[i * k..(i + 1) * k], &w, &mut one, threads));
                            let got: Vec<u32> =
                                o[i * n..(i + 1) * n].iter().map(|v| v.to_bits()).collect();
                            let want: Vec<u32> = one.iter().map(|v| v.to_bits()).collect();
                            assert_eq!(got, want, "m={m} k={k} n={n} threads={threads} row {i}");
                        }
                    }
                }
            }
        }
    }

    /// `matmul_epi`, or with `packed` the same product on the weight packed into f32 panels
    /// (`packed::matmul_packed_epi`).
    #[allow(clippy::too_many_arguments)]
    fn either(
        packed: bool,
        x: &[f32],
        w: &[f32],
        out: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        threads: usize,
        epi: &Epi,
    ) {
        if packed {
            let pw = PackedF32::from_f32(w, n, k);
            matmul_packed_epi(x, &pw, out, m, threads, epi)
        } else {
            matmul_epi(x, w, out, m, k, n, threads, epi)
        }
    }

    /// Every path (serial and parallel GEMV, the multi-row GEMV, the column-split and the
    /// whole-matrix gemm, the packed panels) with every combination of epilogue terms against
    /// the formula.
    #[test]
    fn epilogue_matches_formula_on_every_path() {
        let mut s = 17u64;
        let p = pool(2);
        for &(m, k, n) in &[
            (1usize, 33usize, 9usize),
            (1, 300, 1001),
            (3, 64, 70),
            (8, 300, 257),
            (40, 96, 300),
            // The dot-product kernel (9 ≤ m ≤ 256, k ≥ 256; k ≤ 1024 past m = 128): block and
            // depth tails.
            (40, 300, 257),
            (120, 1100, 100),
            (600, 64, 200),
            (20, 17, 5),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let sc: Vec<f32> = (0..m).map(|_| 1.0 + lcg(&mut s)).collect();
            let res: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
            let bias: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
            let raw = naive(&x, &w, m, k, n);
            for mask in 0..8u32 {
                let epi = Epi {
                    row_scale: (mask & 1 != 0).then_some(&sc[..]),
                    residual: (mask & 2 != 0).then_some(&res[..]),
                    bias: (mask & 4 != 0).then_some(&bias[..]),
                    glu: None,
                    norm: None,
                    rope: None,
                };
                let want: Vec<f32> = (0..m * n)
                    .map(|i| {
                        let (r, j) = (i / n, i % n);
                        let mut v = raw[i];
                        if mask & 1 != 0 {
                            v *= sc[r];
                        }
                        if mask & 4 != 0 {
                            v += bias[j];
                        }
                        if mask & 2 != 0 {
                            v += res[i];
                        }
                        v
                    })
                    .collect();
                for (threads, packed) in [(1, false), (2, false), (1, true), (2, true)] {
                    let mut o = vec![f32::NAN; m * n];
                    p.install(|| either(packed, &x, &w, &mut o, m, k, n, threads, &epi));
                    close(&o, &want, k);
                }
            }
        }
    }

    /// The gated epilogue on every path (serial and threaded GEMV, the few-row GEMV, the
    /// column-split gemm, gemm's own split with the row-block pass, k = 0), block sizes that
    /// do and do not divide `n`, with and without a row scale, against the naive product of the
    /// interleaved weight reduced by the scalar semantics of the activation.
    #[test]
    fn glu_epilogue_matches_reference_on_every_path() {
        use crate::artifact::{interleaved_source_row, EwOp};
        let mut s = 23u64;
        let p = pool(2);
        let acts = [
            EwOp::Silu(0),
            EwOp::GeluTanh(0),
            EwOp::Relu(0),
            EwOp::Tanh(0),
        ];
        for &(m, k, half, block) in &[
            (1usize, 33usize, 9usize, 16usize),
            (1, 300, 520, 16),
            (1, 64, 50, 3),
            (3, 64, 70, 16),
            (40, 300, 70, 16),
            (8, 300, 257, 8),
            (40, 96, 300, 16),
            (600, 64, 200, 16),
            (100, 128, 200, 16),
            (64, 256, 150, 16),
            (20, 17, 5, 2),
            (5, 0, 12, 4),
        ] {
            let n = 2 * half;
            let x: Vec<f32> = (0..m * k).map(|_| 2.0 * lcg(&mut s)).collect();
            // Stacked [Wg; Wu] and its interleaved rows.
            let wgu: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let mut wi = vec![0f32; n * k];
            for r in 0..n {
                let src = interleaved_source_row(half, block, r);
                wi[r * k..(r + 1) * k].copy_from_slice(&wgu[src * k..(src + 1) * k]);
            }
            let sc: Vec<f32> = (0..m).map(|_| 1.0 + lcg(&mut s)).collect();
            let raw = naive(&x, &wgu, m, k, n);
            for (ai, &act) in acts.iter().enumerate() {
                let scaled = ai % 2 == 1;
                let want: Vec<f32> = (0..m * half)
                    .map(|i| {
                        let (r, j) = (i / half, i % half);
                        let f = if scaled { sc[r] as f64 } else { 1.0 };
                        let g = raw[r * n + j] as f64 * f;
                        let u = raw[r * n + half + j] as f64 * f;
                        (crate::ew::eval(&[EwOp::Input(0), act], &[g]) * u) as f32
                    })
                    .collect();
                for (threads, packed) in [(1, false), (2, false), (1, true), (2, true)] {
                    let mut scratch = vec![f32::NAN; m * n];
                    let mut o = vec![f32::NAN; m * half];
                    let epi = Epi {
                        row_scale: scaled.then_some(&sc[..]),
                        glu: Some(GluEpi::new(&mut o, block, act)),
                        ..Epi::default()
                    };
                    p.install(|| either(packed, &x, &wi, &mut scratch, m, k, n, threads, &epi));
                    close(&o, &want, k.max(16));
                }
            }
        }
    }

    /// The row-reduction epilogue (normalize with and without gain, inv_rms of the result,
    /// with a residual and a row scale in the first phase) on every path against the naive
    /// product normalized in f64.
    #[test]
    fn norm_epilogue_matches_reference_on_every_path() {
        let mut s = 29u64;
        let p = pool(2);
        for &(m, k, n) in &[
            (1usize, 33usize, 9usize),
            (1, 300, 1001),
            (3, 64, 70),
            (8, 300, 257),
            (40, 96, 300),
            (40, 300, 257),
            (100, 128, 400),
            (600, 64, 200),
            (5, 0, 12),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let sc: Vec<f32> = (0..m).map(|_| 1.0 + lcg(&mut s)).collect();
            let res: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
            let gain: Vec<f32> = (0..n).map(|_| 1.0 + lcg(&mut s)).collect();
            let raw = naive(&x, &w, m, k, n);
            let eps = 1e-6f64;
            let rms =
                |v: &[f64]| 1.0 / (v.iter().map(|a| a * a).sum::<f64>() / n as f64 + eps).sqrt();
            for mask in 0..8u32 {
                let (normalize, with_gain, first_phase) =
                    (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0);
                if with_gain && !normalize {
                    continue;
                }
                let mut want = vec![0f32; m * n];
                let mut want_q = vec![0f32; m];
                for r in 0..m {
                    let mut v: Vec<f64> = (0..n)
                        .map(|j| {
                            let p = raw[r * n + j] as f64;
                            if first_phase {
                                p * sc[r] as f64 + res[r * n + j] as f64
                            } else {
                                p
                            }
                        })
                        .collect();
                    if normalize {
                        let f = rms(&v);
                        for (j, a) in v.iter_mut().enumerate() {
                            *a *= f * if with_gain { gain[j] as f64 } else { 1.0 };
                        }
                    }
                    want_q[r] = rms(&v) as f32;
                    for j in 0..n {
                        want[r * n + j] = v[j] as f32;
                    }
                }
                for (threads, packed) in [(1, false), (2, false), (1, true), (2, true)] {
                    let mut o = vec![f32::NAN; m * n];
                    let mut q = vec![f32::NAN; m];
                    let epi = Epi {
                        row_scale: first_phase.then_some(&sc[..]),
                        residual: first_phase.then_some(&res[..]),
                        norm: Some(NormEpi::new(
                            eps as f32,
                            normalize,
                            with_gain.then_some(&gain[..]),
                            Some(&mut q),
                        )),
                        ..Epi::default()
                    };
                    p.install(|| either(packed, &x, &w, &mut o, m, k, n, threads, &epi));
                    close(&o, &want, k.max(16));
                    close(&q, &want_q, k.max(16));
                }
            }
        }
    }

    /// The rotary epilogue (with and without a row scale and a bias before it, both styles,
    /// positions in order and scattered) on every path against the naive product rotated in
    /// f64: head sizes that do and do not divide the paths' blocks of 4/16 columns.
    #[test]
    fn rope_epilogue_matches_reference_on_every_path() {
        use crate::artifact::{RopeStyle, RopeTable};
        use crate::test_util::{rope_rows, test_positions};
        let mut s = 41u64;
        let p = pool(2);
        for &(m, k, n, hd) in &[
            (1usize, 33usize, 24usize, 8usize),
            (1, 300, 1020, 6),
            (1, 256, 1024, 64),
            (3, 64, 72, 8),
            (8, 300, 258, 6),
            (100, 128, 390, 6),
            (100, 128, 384, 64),
            (100, 300, 384, 64),
            (600, 64, 192, 8),
            (5, 0, 12, 4),
        ] {
            let mut table = crate::rope::Rope::new(&RopeTable {
                head_dim: hd,
                base: 10000.0,
            });
            table.ensure(1000).unwrap();
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
            let sc: Vec<f32> = (0..m).map(|_| 1.0 + lcg(&mut s)).collect();
            let bias: Vec<f32> = (0..n).map(|_| lcg(&mut s)).collect();
            let raw = naive(&x, &w, m, k, n);
            for (style, terms, pos0) in [
                (RopeStyle::Half, false, Some(0)),
                (RopeStyle::Interleaved, true, Some(7)),
                (RopeStyle::Half, true, None),
                (RopeStyle::Interleaved, false, None),
            ] {
                let pos = test_positions(m, pos0);
                let mut want: Vec<f64> = (0..m * n)
                    .map(|i| {
                        let (r, j) = (i / n, i % n);
                        let v = raw[i] as f64;
                        if terms {
                            v * sc[r] as f64 + bias[j] as f64
                        } else {
                            v
                        }
                    })
                    .collect();
                rope_rows(&mut want, n, hd, style, &pos, table.cos(), table.sin());
                let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
                for (threads, packed) in [(1, false), (2, false), (1, true), (2, true)] {
                    let mut o = vec![f32::NAN; m * n];
                    let epi = Epi {
                        row_scale: terms.then_some(&sc[..]),
                        bias: terms.then_some(&bias[..]),
                        rope: Some(RopeEpi {
                            cos: table.cos(),
                            sin: table.sin(),
                            head_dim: hd,
                            style,
                            pos: match pos0 {
                                Some(p0) => RowPos::From(p0),
                                None => RowPos::Rows(&pos),
                            },
                        }),
                        ..Epi::default()
                    };
                    p.install(|| either(packed, &x, &w, &mut o, m, k, n, threads, &epi));
                    close(&o, &want, k.max(16));
                }
            }
        }
    }

    #[test]
    fn interleaved_rows_are_a_permutation_with_matching_blocks() {
        use crate::artifact::interleaved_source_row;
        for (half, block) in [(1, 1), (5, 2), (16, 16), (17, 16), (50, 3)] {
            let src: Vec<usize> = (0..2 * half)
                .map(|r| interleaved_source_row(half, block, r))
                .collect();
            let mut sorted = src.clone();
            sorted.sort();
            assert_eq!(sorted, (0..2 * half).collect::<Vec<_>>());
            // Each block: gate rows j.. then the up rows half + j.. of the same count.
            let mut r = 0;
            while r < 2 * half {
                let b = block.min(half - r / 2);
                for c in 0..b {
                    assert_eq!(src[r + b + c], src[r + c] + half);
                }
                r += 2 * b;
            }
        }
    }

    #[test]
    fn derived_transpose_and_interleave_match_their_definitions() {
        use crate::artifact::{Derive, WRef};
        let (k, n) = (5usize, 6usize);
        let data: Vec<f32> = (0..k * n).map(|i| i as f32).collect();
        let src = WRef {
            weight: 0,
            offset: 0,
            rows: k,
            cols: n,
        };
        let t = Derive::Transpose { src }.compute(|_| &data[..]);
        assert_eq!(Derive::Transpose { src }.out_shape(), Ok((n, k)));
        for r in 0..n {
            for c in 0..k {
                assert_eq!(t[r * k + c], data[c * n + r]);
            }
        }
        // 6 rows of 5 = gate rows 0..3, up rows 3..6, blocks of 2: g0 g1 u0 u1 g2 u2.
        let src = WRef {
            weight: 0,
            offset: 0,
            rows: 6,
            cols: 5,
        };
        let d = Derive::InterleaveRows { src, block: 2 };
        let v = d.compute(|_| &data[..]);
        let order: Vec<usize> = (0..6).map(|r| v[r * 5] as usize / 5).collect();
        assert_eq!(order, vec![0, 1, 3, 4, 2, 5]);
        assert!(Derive::InterleaveRows { src, block: 0 }
            .out_shape()
            .is_err());
        let odd = WRef { rows: 5, ..src };
        assert!(Derive::InterleaveRows { src: odd, block: 2 }
            .out_shape()
            .is_err());
    }

    #[test]
    fn cephes_exp_matches_std_to_a_few_ulp() {
        for i in -2000..2000 {
            let x = i as f32 * 0.043;
            let (a, b) = (exp_f32(x), x.exp());
            assert!((a - b).abs() <= 4.0 * f32::EPSILON * b, "{x}: {a} vs {b}");
        }
    }

    /// The gemm path on windows of a larger weight (a `WRef` with an offset).
    #[test]
    fn gemm_path_matches_naive_with_offsets() {
        let mut s = 3u64;
        let p = pool(2);
        for &(m, k, n, off) in &[
            (2usize, 5usize, 3usize, 7usize),
            (7, 33, 19, 1),
            (64, 96, 80, 123),
            (130, 64, 257, 64),
            (200, 128, 300, 5),
            // The dot-product kernel on an unaligned window.
            (50, 300, 70, 3),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
            let big: Vec<f32> = (0..off + n * k + 11).map(|_| lcg(&mut s)).collect();
            let w = &big[off..off + n * k];
            let want = naive(&x, w, m, k, n);
            let mut o = vec![f32::NAN; m * n];
            p.install(|| matmul(&x, &big[off..], &mut o, m, k, n, 2));
            close(&o, &want, k);
            // Single-row through matmul uses the GEMV.
            let mut o1 = vec![f32::NAN; n];
            p.install(|| matmul(&x[..k], &big[off..], &mut o1, 1, k, n, 2));
            close(&o1, &want[..n], k);
        }
        let mut o = vec![1f32; 6];
        matmul(&[], &[], &mut o, 2, 0, 3, 1);
        assert_eq!(o, vec![0.0; 6]);
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    fn min_time(reps: usize, mut f: impl FnMut()) -> f64 {
        (0..reps)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// The fused epilogues against the product followed by a separate pass, at Huginn-d1024
    /// decode and prefill shapes (minimum over repetitions, so a loaded machine's noise mostly
    /// drops out). The separate passes here are Rust loops standing in for the `Glu` /
    /// `RmsNorm` / `InvRms` kernels.
    /// `cargo test -p loopc-runtime --lib bench_fused_epilogues -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_fused_epilogues() {
        let (d, f) = (1024usize, 2816usize);
        let lcg = |i: usize| ((i.wrapping_mul(2654435761) >> 7) % 1000) as f32 / 1000.0 - 0.5;
        let w: Vec<f32> = (0..2 * f * d).map(lcg).collect();
        let wo: Vec<f32> = (0..d * d).map(|i| lcg(i + 7)).collect();
        let g: Vec<f32> = (0..d).map(|i| 1.0 + lcg(i)).collect();
        for threads in [1usize, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for m in [1usize, 64] {
                let x: Vec<f32> = (0..m * d).map(|i| lcg(i + 3)).collect();
                let mut scratch = vec![0f32; m * 2 * f];
                let mut o = vec![0f32; m * f];
                let reps = if m == 1 { 200 } else { 20 };
                let sep = |scratch: &mut [f32], o: &mut [f32]| {
                    matmul(&x, &w, scratch, m, d, 2 * f, threads);
                    for r in 0..m {
                        let p = &scratch[r * 2 * f..(r + 1) * 2 * f];
                        glu_block(EwOp::Silu(0), &p[..f], &p[f..], &mut o[r * f..(r + 1) * f]);
                    }
                };
                let fused = |scratch: &mut [f32], o: &mut [f32]| {
                    let epi = Epi {
                        glu: Some(GluEpi::new(o, 16, EwOp::Silu(0))),
                        ..Epi::default()
                    };
                    matmul_epi(&x, &w, scratch, m, d, 2 * f, threads, &epi);
                };
                let (mut a, mut b) = (f64::INFINITY, f64::INFINITY);
                for _ in 0..3 {
                    a = a.min(pool.install(|| min_time(reps, || sep(&mut scratch, &mut o))));
                    b = b.min(pool.install(|| min_time(reps, || fused(&mut scratch, &mut o))));
                }
                println!(
                    "glu   m={m:<3} threads={threads}: product + pass {:.3} ms, epilogue {:.3} ms",
                    a * 1e3,
                    b * 1e3
                );
                let res: Vec<f32> = (0..m * d).map(|i| lcg(i + 5)).collect();
                let mut y = vec![0f32; m * d];
                let mut y2 = vec![0f32; m * d];
                let mut q = vec![0f32; m];
                let sep = |y: &mut [f32], y2: &mut [f32], q: &mut [f32]| {
                    let epi = Epi {
                        residual: Some(&res),
                        ..Epi::default()
                    };
                    matmul_epi(&x, &wo, y, m, d, d, threads, &epi);
                    let n = NormEpi::new(1e-6, true, Some(&g), None);
                    for r in 0..m {
                        let s = n.rms(&y[r * d..(r + 1) * d]);
                        for c in 0..d {
                            y2[r * d + c] = y[r * d + c] * s * g[c];
                        }
                        q[r] = n.rms(&y2[r * d..(r + 1) * d]);
                    }
                };
                let fused = |y: &mut [f32], q: &mut [f32]| {
                    let epi = Epi {
                        residual: Some(&res),
                        norm: Some(NormEpi::new(1e-6, true, Some(&g), Some(q))),
                        ..Epi::default()
                    };
                    matmul_epi(&x, &wo, y, m, d, d, threads, &epi);
                };
                let (mut a, mut b) = (f64::INFINITY, f64::INFINITY);
                for _ in 0..3 {
                    a = a.min(pool.install(|| min_time(reps, || sep(&mut y, &mut y2, &mut q))));
                    b = b.min(pool.install(|| min_time(reps, || fused(&mut y, &mut q))));
                }
                println!(
                    "norm  m={m:<3} threads={threads}: product + passes {:.3} ms, epilogue {:.3} ms",
                    a * 1e3,
                    b * 1e3
                );
            }
        }
    }

    /// `cargo test --release -p loopc-runtime bench_gemv -- --ignored --nocapture`
    /// The register blocks of the multi-row GEMV side by side on 8 input rows, with the
    /// weights in L2 and past the L3, next to the single-row GEMV on the same weights
    /// (`cargo test --release -p loopc-runtime bench_gemv_multi -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn bench_gemv_multi() {
        type F = unsafe fn(*const f32, usize, *const f32, usize, *mut f32, usize);
        unsafe fn one(
            x: *const f32,
            k: usize,
            w: *const f32,
            rows: usize,
            out: *mut f32,
            _: usize,
        ) {
            unsafe {
                x86::gemv_avx512(
                    std::slice::from_raw_parts(x, k),
                    std::slice::from_raw_parts(w, rows * k),
                    std::slice::from_raw_parts_mut(out, rows),
                )
            }
        }
        let kinds: [(&str, F); 5] = [
            ("one input row (reference)", one),
            ("1x8", x86::gemv_multi_rg::<8, 1, 8>),
            ("2x4 (used)", x86::gemv_multi_rg::<8, 2, 4>),
            ("4x2", x86::gemv_multi_rg::<8, 4, 2>),
            ("4x4", x86::gemv_multi_rg::<8, 4, 4>),
        ];
        let team = crate::par::Team::new(1).unwrap();
        let (m, k) = (8usize, 1024usize);
        for (place, n, mats) in [("L2", 256usize, 1usize), ("DRAM", 4096, 24)] {
            // 64-byte aligned, as the runtime's weights and activations are.
            let mut wv = crate::mem::AVec::zeroed(mats * n * k, "w").unwrap();
            let mut xv = crate::mem::AVec::zeroed(m * k, "x").unwrap();
            for (i, v) in wv.as_mut_slice().iter_mut().enumerate() {
                *v = (i % 13) as f32 * 0.01;
            }
            for (i, v) in xv.as_mut_slice().iter_mut().enumerate() {
                *v = (i % 7) as f32 * 0.1;
            }
            let (w, x) = (wv.as_slice(), xv.as_slice());
            let mut out = vec![0f32; m * n];
            let calls = 200 / mats * mats;
            let mut best = [f64::MAX; 5];
            for _ in 0..5 {
                for (i, (_, f)) in kinds.iter().enumerate() {
                    let op = out.as_mut_ptr() as usize;
                    let t = std::time::Instant::now();
                    team.install(|| {
                        for mi in (0..calls).map(|c| c % mats) {
                            let wm = &w[mi * n * k..(mi + 1) * n * k];
                            let rows = n / 16;
                            crate::par::for_each(16, |c| unsafe {
                                let (wp, o) = (wm.as_ptr().add(c * rows * k), op as *mut f32);
                                f(x.as_ptr(), k, wp, rows, o.add(c * rows), n)
                            });
                        }
                    });
                    best[i] = best[i].min(t.elapsed().as_secs_f64());
                }
            }
            for (i, (name, _)) in kinds.iter().enumerate() {
                let gbs = (calls * n * k * 4) as f64 / best[i] / 1e9;
                println!("weights in {place}: {name}: {gbs:.1} GB/s");
            }
        }
    }

    /// d=256 decode's GEMV sequence (36 layers of 768×256, 256×256, 1408×256, 256×704, then the
    /// 32000×256 head) on the team, weights packed in one huge-page block as the arena does,
    /// vs one GEMV over as many bytes.
    #[test]
    #[ignore]
    fn bench_gemv_sequence() {
        use crate::mem::AVec;
        let team = crate::par::Team::new(1).unwrap();
        // Distinct weights: 8 layers (prelude 2, block 4, coda 2), the adapter, the head; the
        // sequence reads the block and the adapter 8 times, as decode at r = 8 does.
        let layer = [(768, 256), (256, 256), (1408, 256), (256, 704)];
        let mut distinct: Vec<(usize, usize)> = (0..8).flat_map(|_| layer).collect();
        distinct.push((256, 512));
        distinct.push((32000, 256));
        let mut offs = vec![0];
        for &(n, k) in &distinct {
            offs.push(offs.last().unwrap() + n * k);
        }
        let lay = |l: usize| (4 * l..4 * l + 4).collect::<Vec<usize>>();
        let mut seq: Vec<usize> = lay(0).into_iter().chain(lay(1)).collect();
        for _ in 0..8 {
            seq.extend(std::iter::once(32).chain((2..6).flat_map(lay)));
        }
        seq.extend(lay(6).into_iter().chain(lay(7)).chain([33]));
        let shapes: Vec<(usize, usize)> = seq.iter().map(|&i| distinct[i]).collect();
        let total: usize = *offs.last().unwrap();
        let read: usize = shapes.iter().map(|&(n, k)| n * k).sum();
        let mut all = AVec::zeroed(total, "w").unwrap();
        for (i, x) in all.as_mut_slice().iter_mut().enumerate() {
            *x = (i % 13) as f32 * 0.01;
        }
        let x: Vec<f32> = (0..1408).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut o = vec![0f32; total / 256];
        for _ in 0..3 {
            let mut best = f64::MAX;
            for _ in 0..20 {
                let t = std::time::Instant::now();
                team.install(|| {
                    for &i in &seq {
                        let ((n, k), at) = (distinct[i], offs[i]);
                        gemv(&x[..k], &all.as_slice()[at..at + n * k], &mut o[..n], 2);
                    }
                });
                best = best.min(t.elapsed().as_secs_f64());
            }
            let mut one = f64::MAX;
            for _ in 0..20 {
                let t = std::time::Instant::now();
                team.install(|| gemv(&x[..256], all.as_slice(), &mut o, 2));
                one = one.min(t.elapsed().as_secs_f64());
            }
            let (b, r) = (total as f64 * 4.0, read as f64 * 4.0);
            eprintln!(
                "{} jobs, {:.1} MB read: sequence {:.3} ms ({:.1} GB/s); one GEMV over the {:.1} MB: {:.3} ms ({:.1} GB/s)",
                shapes.len(),
                r / 1e6,
                best * 1e3,
                r / best / 1e9,
                b / 1e6,
                one * 1e3,
                b / one / 1e9
            );
        }
    }

    #[test]
    #[ignore]
    fn bench_gemv() {
        let (k, n) = (4096usize, 4096usize);
        let x: Vec<f32> = (0..k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 13) as f32 * 0.01).collect();
        let mut o = vec![0f32; n];
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for (name, th) in [("gemv 1 thread", 1), ("gemv all threads", threads)] {
            pool.install(|| gemv(&x, &w, &mut o, th));
            let t = std::time::Instant::now();
            let reps = 20;
            for _ in 0..reps {
                pool.install(|| gemv(&x, &w, &mut o, th));
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{name}: {:.2} ms, {:.1} GFLOP/s, {:.1} GB/s",
                s * 1e3,
                2.0 * (n * k) as f64 / s / 1e9,
                (n * k * 4) as f64 / s / 1e9
            );
        }
        let t = std::time::Instant::now();
        for _ in 0..5 {
            unsafe {
                gemm_block(
                    1,
                    n,
                    k,
                    o.as_mut_ptr(),
                    n as isize,
                    x.as_ptr(),
                    k as isize,
                    w.as_ptr(),
                    1,
                    k as isize,
                    gemm::Parallelism::None,
                    None,
                )
            }
        }
        let s = t.elapsed().as_secs_f64() / 5.0;
        println!(
            "gemm m=1: {:.2} ms, {:.1} GFLOP/s",
            s * 1e3,
            2.0 * (n * k) as f64 / s / 1e9
        );
    }
}

pub(crate) mod dot;
pub(crate) mod packed;
mod parts;
pub use packed::{matmul_packed_epi, matmul_packed_jobs, Job, PackedF32};
pub use parts::{matmul_parts, matmul_parts_on, Part, MAX_PARTS};
