//! Kernel specifications as `func.func`s over `arith`/`math`/`memref`/`vector`: each kernel is one
//! hand-built vector loop (rows × 16-lane chunks, the last chunk masked), so a fused
//! elementwise tree stays one loop body rather than a chain of ops over buffers.
//!
//! The ABI is the Cranelift backend's, unchanged (`KernelSpec` documents the pointer order):
//! `func.func @sym(%ptrs: !llvm.ptr, %ints: !llvm.ptr)`, which lowers to the C function
//! `void sym(float **ptrs, const int64_t *ints)`. Each pointer is wrapped in a `memref<?xf32>`
//! descriptor (`@__loopc_view`, inlined before lowering), so the loops address memory through
//! `memref`/`vector` ops and MLIR's lowering produces the address arithmetic.

use super::math;
use super::text::{for_chunks, sym, Fx, Ty, VF, W};
use loopc_runtime::artifact::{EwIn, EwOp, KernelDecl, KernelSpec, RopeStyle};
use loopc_runtime::ew::live_ops;

const DESC: &str = "!llvm.struct<(ptr, ptr, i64, array<1 x i64>, array<1 x i64>)>";

/// The helper every kernel uses to see a raw pointer as a `memref<?xf32>`. The size is unknown
/// to the kernel (the runtime sized the buffer); nothing checks it, so it is set to the maximum.
pub fn view_helper() -> String {
    format!(
        "  func.func private @__loopc_view(%p: !llvm.ptr) -> memref<?xf32> {{
    %u = llvm.mlir.undef : {DESC}
    %a = llvm.insertvalue %p, %u[0] : {DESC}
    %b = llvm.insertvalue %p, %a[1] : {DESC}
    %zero = llvm.mlir.constant(0 : i64) : i64
    %size = llvm.mlir.constant(4611686018427387903 : i64) : i64
    %one = llvm.mlir.constant(1 : i64) : i64
    %c = llvm.insertvalue %zero, %b[2] : {DESC}
    %d = llvm.insertvalue %size, %c[3, 0] : {DESC}
    %e = llvm.insertvalue %one, %d[4, 0] : {DESC}
    %m = builtin.unrealized_conversion_cast %e : {DESC} to memref<?xf32>
    return %m : memref<?xf32>
  }}
"
    )
}

/// The kernels as one module (what the backend parses, verifies and lowers).
/// With `amx`, the AMX bf16 GEMM too (only for hosts whose LLVM target has AMX-BF16).
pub fn kernels_module(kernels: &[KernelDecl], amx: bool) -> Result<String, String> {
    let mut s = String::from("module {\n");
    for k in kernels {
        s.push_str(&kernel_func(k)?);
    }
    s.push_str(&super::gemm::gemm_funcs());
    if amx {
        s.push_str(&super::gemm::amx_func());
    }
    s.push_str(&view_helper());
    s.push_str("}\n");
    Ok(s)
}

/// Arguments read in the entry block.
struct Params {
    begin: String,
    end: String,
    pos0: String,
    ptrs: String,
}

impl Params {
    fn enter(fx: &mut Fx) -> Params {
        let int = |fx: &mut Fx, k: usize| {
            let g = fx.op(format!(
                "llvm.getelementptr %ints[{k}] : (!llvm.ptr) -> !llvm.ptr, i64"
            ));
            let v = fx.op(format!("llvm.load {g} : !llvm.ptr -> i64"));
            fx.op(format!("arith.index_cast {v} : i64 to index"))
        };
        let begin = int(fx, 0);
        let end = int(fx, 1);
        let pos0 = int(fx, 2);
        Params {
            begin,
            end,
            pos0,
            ptrs: "%ptrs".into(),
        }
    }

    /// The same call seen as `per` items of each row (rows `begin..end` become items
    /// `begin·per..end·per`): a per-head kernel over rows of `per` heads.
    fn items_per_row(&self, fx: &mut Fx, per: usize) -> Params {
        Params {
            begin: fx.mul_k(&self.begin, per),
            end: fx.mul_k(&self.end, per),
            pos0: self.pos0.clone(),
            ptrs: self.ptrs.clone(),
        }
    }

    /// Pointer argument `k` as a memref.
    fn mem(&self, fx: &mut Fx, k: usize) -> String {
        let g = fx.op(format!(
            "llvm.getelementptr {}[{k}] : (!llvm.ptr) -> !llvm.ptr, !llvm.ptr",
            self.ptrs
        ));
        let p = fx.op(format!("llvm.load {g} : !llvm.ptr -> !llvm.ptr"));
        fx.op(format!(
            "func.call @__loopc_view({p}) : (!llvm.ptr) -> memref<?xf32>"
        ))
    }

    /// `scf.for %r = begin to end` around `body(fx, r)`.
    fn rows(&self, fx: &mut Fx, body: impl FnOnce(&mut Fx, &str)) {
        let one = fx.idx(1);
        let r = fx.fresh();
        fx.open(format!(
            "scf.for {r} = {} to {} step {one} {{",
            self.begin, self.end
        ));
        body(fx, &r);
        fx.close("}");
    }
}

/// The `func.func` of one kernel. The caller validated the spec (`cranelift::validate`).
#[allow(unreachable_patterns)]
pub fn kernel_func(decl: &KernelDecl) -> Result<String, String> {
    let mut fx = Fx::new(2);
    let p = Params::enter(&mut fx);
    match &decl.spec {
        KernelSpec::Elementwise {
            cols,
            inputs,
            ops,
            outputs,
        } => {
            let layout: Vec<Layout> = inputs
                .iter()
                .enumerate()
                .map(|(k, &kind)| Layout {
                    kind,
                    ptr: k,
                    stride: *cols,
                    col: 0,
                })
                .collect();
            elementwise(&mut fx, &p, *cols, &layout, inputs.len(), ops, outputs)
        }
        KernelSpec::Glu { cols, ops } => {
            let half = |col| Layout {
                kind: EwIn::Rows,
                ptr: 0,
                stride: 2 * cols,
                col,
            };
            let last = ops.len().saturating_sub(1) as u32;
            elementwise(&mut fx, &p, *cols, &[half(0), half(*cols)], 1, ops, &[last])
        }
        KernelSpec::RmsNorm {
            cols,
            eps,
            residual,
            gain,
        } => rmsnorm(&mut fx, &p, *cols, *eps, *residual, *gain),
        KernelSpec::LayerNorm { cols, eps } => layernorm(&mut fx, &p, *cols, *eps),
        KernelSpec::InvRms { cols, eps } => {
            rmsnorm_mode(&mut fx, &p, *cols, *eps, false, false, true)
        }
        KernelSpec::HeadRmsNorm {
            heads,
            head_dim,
            eps,
        } => {
            // Rows of `heads · head_dim` are `heads` contiguous rows of `head_dim`.
            let per_head = p.items_per_row(&mut fx, *heads);
            rmsnorm(&mut fx, &per_head, *head_dim, *eps, false, false)
        }
        KernelSpec::Rope {
            heads,
            head_dim,
            style,
        } => rope(&mut fx, &p, *heads, *head_dim, *style, false),
        KernelSpec::RopeBias {
            heads,
            head_dim,
            style,
        } => rope(&mut fx, &p, *heads, *head_dim, *style, true),
        KernelSpec::Attention {
            heads,
            kv_heads,
            head_dim,
            scale,
        } => attention(&mut fx, &p, *heads, *kv_heads, *head_dim, *scale),
        // Kernel kinds added after this backend fail the build with a message, not a panic.
        other => {
            return Err(format!(
                "kernel `{}`: the MLIR backend does not generate {other:?} yet",
                decl.symbol
            ));
        }
    }
    fx.line("return");
    Ok(format!(
        "  func.func {}(%ptrs: !llvm.ptr, %ints: !llvm.ptr) {{\n{}  }}\n",
        sym(&decl.symbol),
        fx.finish()
    ))
}

// ---------------------------------------------------------------------------------------------
// Elementwise and gated units

struct Layout {
    kind: EwIn,
    ptr: usize,
    stride: usize,
    col: usize,
}

fn elementwise(
    fx: &mut Fx,
    p: &Params,
    cols: usize,
    layout: &[Layout],
    n_in_ptrs: usize,
    ops: &[EwOp],
    outputs: &[u32],
) {
    let ins: Vec<String> = layout.iter().map(|l| p.mem(fx, l.ptr)).collect();
    let outs: Vec<String> = (0..outputs.len())
        .map(|k| p.mem(fx, n_in_ptrs + k))
        .collect();
    let live = live_ops(ops, outputs);
    p.rows(fx, |fx, r| {
        // Row starts of each input (in elements) and per-row scalars, splat once per row.
        enum Src {
            Row(String),
            Splat(String),
        }
        let srcs: Vec<Src> = layout
            .iter()
            .zip(&ins)
            .map(|(l, m)| match l.kind {
                EwIn::Rows => {
                    let o = fx.mul_k(r, l.stride);
                    Src::Row(fx.add_k(&o, l.col))
                }
                EwIn::Broadcast => Src::Row(fx.idx(0)),
                EwIn::PerRow => {
                    let s = fx.load_scalar(m, r);
                    Src::Splat(fx.splat(&s))
                }
            })
            .collect();
        let out_row = fx.mul_k(r, cols);
        let zero = fx.idx(0);
        for_chunks(fx, &zero, cols, vec![], VF, &mut |fx, c, mask, _| {
            // Every input of a chunk is read before any output is written, so an output may
            // alias an input (in-place updates).
            let mut loaded: Vec<Option<String>> = vec![None; layout.len()];
            let mut vals: Vec<Option<String>> = vec![None; ops.len()];
            let ty = Ty::Vector;
            for (i, op) in ops.iter().enumerate() {
                if !live[i] {
                    continue;
                }
                let a = |k: u32| vals[k as usize].clone().expect("operands precede uses");
                let v = match *op {
                    EwOp::Input(k) => {
                        let k = k as usize;
                        if loaded[k].is_none() {
                            loaded[k] = Some(match &srcs[k] {
                                Src::Row(start) => {
                                    let at = fx.add_i(start, c);
                                    fx.load(&ins[k], &at, mask)
                                }
                                Src::Splat(v) => v.clone(),
                            });
                        }
                        loaded[k].clone().unwrap()
                    }
                    EwOp::Const(x) => fx.cf(ty, x),
                    EwOp::Add(x, y) => fx.add(ty, &a(x), &a(y)),
                    EwOp::Sub(x, y) => fx.sub(ty, &a(x), &a(y)),
                    EwOp::Mul(x, y) => fx.mul(ty, &a(x), &a(y)),
                    EwOp::Div(x, y) => fx.div(ty, &a(x), &a(y)),
                    EwOp::Max(x, y) => fx.bin("maximumf", ty, &a(x), &a(y)),
                    EwOp::Neg(x) => fx.neg(ty, &a(x)),
                    EwOp::Exp(x) => math::exp(fx, ty, &a(x)),
                    EwOp::Sigmoid(x) => math::sigmoid(fx, ty, &a(x)),
                    EwOp::Silu(x) => math::silu(fx, ty, &a(x)),
                    EwOp::Relu(x) => {
                        let z = fx.cf(ty, 0.0);
                        fx.bin("maximumf", ty, &a(x), &z)
                    }
                    EwOp::Tanh(x) => math::tanh(fx, ty, &a(x)),
                    EwOp::GeluTanh(x) => math::gelu_tanh(fx, ty, &a(x)),
                    EwOp::Sqrt(x) => fx.unary("math.sqrt", ty, &a(x)),
                    EwOp::Softplus(x) => math::softplus(fx, ty, &a(x)),
                };
                vals[i] = Some(v);
            }
            let at = fx.add_i(&out_row, c);
            for (&o, m) in outputs.iter().zip(&outs) {
                let v = vals[o as usize].clone().expect("outputs are live");
                fx.store(&v, m, &at, mask);
            }
            vec![]
        });
    });
}

// ---------------------------------------------------------------------------------------------
// Normalization

fn rmsnorm(fx: &mut Fx, p: &Params, cols: usize, eps: f32, residual: bool, gain: bool) {
    rmsnorm_mode(fx, p, cols, eps, residual, gain, false)
}

fn rmsnorm_mode(
    fx: &mut Fx,
    p: &Params,
    cols: usize,
    eps: f32,
    residual: bool,
    gain: bool,
    inv_only: bool,
) {
    // Pointers: [x, gain?, y] or [a, b, gain?, sum, y]; `inv_only`: [x, s], `s[r] = 1/rms`.
    let mut next = 0;
    let mut take = |fx: &mut Fx| {
        next += 1;
        p.mem(fx, next - 1)
    };
    let a = take(fx);
    let b = residual.then(|| take(fx));
    let g = gain.then(|| take(fx));
    let sum = residual.then(|| take(fx));
    let y = take(fx);
    p.rows(fx, |fx, r| {
        let start = fx.mul_k(r, cols);
        let zero = fx.cf(Ty::Vector, 0.0);
        let acc = for_chunks(
            fx,
            &start,
            cols,
            vec![zero],
            VF,
            &mut |fx, at, mask, acc| {
                let mut x = fx.load(&a, at, mask);
                if let (Some(b), Some(sum)) = (&b, &sum) {
                    let xb = fx.load(b, at, mask);
                    x = fx.add(Ty::Vector, &x, &xb);
                    fx.store(&x, sum, at, mask);
                }
                vec![fx.fma(Ty::Vector, &x, &x, &acc[0])]
            },
        );
        let total = fx.hsum(&acc[0]);
        let n = fx.cf(Ty::Scalar, cols as f32);
        let mean = fx.div(Ty::Scalar, &total, &n);
        let eps = fx.cf(Ty::Scalar, eps);
        let var = fx.add(Ty::Scalar, &mean, &eps);
        let rms = fx.unary("math.sqrt", Ty::Scalar, &var);
        let one = fx.cf(Ty::Scalar, 1.0);
        let inv = fx.div(Ty::Scalar, &one, &rms);
        if inv_only {
            fx.line(format!("memref.store {inv}, {y}[{r}] : memref<?xf32>"));
            return;
        }
        let inv = fx.splat(&inv);
        // With the residual, `x` is re-read from `sum`, not recomputed: `sum` may alias `a`.
        let x_mem = sum.clone().unwrap_or_else(|| a.clone());
        for_chunks(fx, &start, cols, vec![], VF, &mut |fx, at, mask, _| {
            let x = fx.load(&x_mem, at, mask);
            let mut v = fx.mul(Ty::Vector, &x, &inv);
            if let Some(g) = &g {
                // The gain is indexed by column: the chunk's offset within the row.
                let col = fx.op(format!("arith.subi {at}, {start} : index"));
                let gv = fx.load(g, &col, mask);
                v = fx.mul(Ty::Vector, &v, &gv);
            }
            fx.store(&v, &y, at, mask);
            vec![]
        });
    });
}

fn layernorm(fx: &mut Fx, p: &Params, cols: usize, eps: f32) {
    let x = p.mem(fx, 0);
    let g = p.mem(fx, 1);
    let b = p.mem(fx, 2);
    let y = p.mem(fx, 3);
    p.rows(fx, |fx, r| {
        let start = fx.mul_k(r, cols);
        let n = fx.cf(Ty::Scalar, cols as f32);
        let zero = fx.cf(Ty::Vector, 0.0);
        let acc = for_chunks(
            fx,
            &start,
            cols,
            vec![zero.clone()],
            VF,
            &mut |fx, at, mask, acc| {
                let v = fx.load(&x, at, mask);
                vec![fx.add(Ty::Vector, &acc[0], &v)]
            },
        );
        let total = fx.hsum(&acc[0]);
        let mean = fx.div(Ty::Scalar, &total, &n);
        let mean_v = fx.splat(&mean);
        // Two passes (mean, then squared deviations): E[x²] − E[x]² cancels when |mean| ≫ std.
        // Like the Cranelift kernel, the partial 4-lane group of the row adds (0 − mean)² per
        // missing lane, taken back out below; lanes past that group are masked to 0.
        let tail = cols % W;
        let pad = (4 - cols % 4) % 4;
        let group = (tail > 0).then(|| fx.mask(tail + pad));
        let acc = for_chunks(
            fx,
            &start,
            cols,
            vec![zero.clone()],
            VF,
            &mut |fx, at, mask, acc| {
                let v = fx.load(&x, at, mask);
                let mut d = fx.sub(Ty::Vector, &v, &mean_v);
                if let (Some(_), Some(group)) = (mask, &group) {
                    d = fx.select(Ty::Vector, group, &d, &zero);
                }
                vec![fx.fma(Ty::Vector, &d, &d, &acc[0])]
            },
        );
        let mut sq = fx.hsum(&acc[0]);
        if pad > 0 {
            let m2 = fx.mul(Ty::Scalar, &mean, &mean);
            let p = fx.cf(Ty::Scalar, pad as f32);
            let extra = fx.mul(Ty::Scalar, &m2, &p);
            sq = fx.sub(Ty::Scalar, &sq, &extra);
        }
        let var = fx.div(Ty::Scalar, &sq, &n);
        let eps = fx.cf(Ty::Scalar, eps);
        let ve = fx.add(Ty::Scalar, &var, &eps);
        let sd = fx.unary("math.sqrt", Ty::Scalar, &ve);
        let one = fx.cf(Ty::Scalar, 1.0);
        let inv = fx.div(Ty::Scalar, &one, &sd);
        let inv = fx.splat(&inv);
        for_chunks(fx, &start, cols, vec![], VF, &mut |fx, at, mask, _| {
            let v = fx.load(&x, at, mask);
            let d = fx.sub(Ty::Vector, &v, &mean_v);
            let z = fx.mul(Ty::Vector, &d, &inv);
            let col = fx.op(format!("arith.subi {at}, {start} : index"));
            let gv = fx.load(&g, &col, mask);
            let bv = fx.load(&b, &col, mask);
            let out = fx.fma(Ty::Vector, &z, &gv, &bv);
            fx.store(&out, &y, at, mask);
            vec![]
        });
    });
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding

/// `(a, b) → (a·cos − b·sin, a·sin + b·cos)`, with the Cranelift kernel's roundings.
fn rotate(fx: &mut Fx, a: &str, b: &str, c: &str, s: &str) -> (String, String) {
    let t = Ty::Vector;
    let bs = fx.mul(t, b, s);
    let nbs = fx.neg(t, &bs);
    let a2 = fx.fma(t, a, c, &nbs);
    let bc = fx.mul(t, b, c);
    let b2 = fx.fma(t, a, s, &bc);
    (a2, b2)
}

fn rope(fx: &mut Fx, p: &Params, heads: usize, head_dim: usize, style: RopeStyle, bias: bool) {
    let x = p.mem(fx, 0);
    let k = usize::from(bias);
    let bm = bias.then(|| p.mem(fx, 1));
    let cos = p.mem(fx, 1 + k);
    let sin = p.mem(fx, 2 + k);
    let half = head_dim / 2;
    p.rows(fx, |fx, r| {
        let pos = fx.add_i(&p.pos0, r);
        let table_row = fx.mul_k(&pos, half);
        let x_row = fx.mul_k(r, heads * head_dim);
        let lo = fx.idx(0);
        let hi = fx.idx(heads);
        let one = fx.idx(1);
        let h = fx.fresh();
        fx.open(format!("scf.for {h} = {lo} to {hi} step {one} {{"));
        let head = fx.mul_k(&h, head_dim);
        let xh = fx.add_i(&x_row, &head);
        let zero = fx.idx(0);
        // Chunks count pairs: one element of the tables each.
        for_chunks(fx, &zero, half, vec![], VF, &mut |fx, i, mask, _| {
            let ti = fx.add_i(&table_row, i);
            let c = fx.load(&cos, &ti, mask);
            let s = fx.load(&sin, &ti, mask);
            match style {
                RopeStyle::Half => {
                    let at_a = fx.add_i(&xh, i);
                    let at_b = fx.add_k(&at_a, half);
                    let mut a = fx.load(&x, &at_a, mask);
                    let mut b = fx.load(&x, &at_b, mask);
                    if let Some(bm) = &bm {
                        let ba_at = fx.add_i(&head, i);
                        let bb_at = fx.add_k(&ba_at, half);
                        let ba = fx.load(bm, &ba_at, mask);
                        let bb = fx.load(bm, &bb_at, mask);
                        a = fx.add(Ty::Vector, &a, &ba);
                        b = fx.add(Ty::Vector, &b, &bb);
                    }
                    let (a2, b2) = rotate(fx, &a, &b, &c, &s);
                    fx.store(&a2, &x, &at_a, mask);
                    fx.store(&b2, &x, &at_b, mask);
                }
                RopeStyle::Interleaved => {
                    // Pairs (x[2i], x[2i+1]): 16 pairs span two vectors, de-interleaved into
                    // `a` and `b` lanes and interleaved back with shuffles.
                    let i2 = fx.mul_k(i, 2);
                    let at0 = fx.add_i(&xh, &i2);
                    let at1 = fx.add_k(&at0, W);
                    let (m0, m1) = match mask {
                        None => (None, None),
                        Some(_) => {
                            // The partial chunk has `t` pairs, `2t` floats.
                            let t = half % W;
                            let m0 = fx.mask((2 * t).min(W));
                            let m1 = (2 * t > W).then(|| fx.mask(2 * t - W));
                            (Some(m0), m1)
                        }
                    };
                    let second = mask.is_none() || m1.is_some();
                    let mut v0 = fx.load(&x, &at0, m0.as_deref());
                    let mut v1 = if second {
                        fx.load(&x, &at1, m1.as_deref())
                    } else {
                        fx.cf(Ty::Vector, 0.0)
                    };
                    if let Some(bm) = &bm {
                        let b0_at = fx.add_i(&head, &i2);
                        let b1_at = fx.add_k(&b0_at, W);
                        let b0 = fx.load(bm, &b0_at, m0.as_deref());
                        v0 = fx.add(Ty::Vector, &v0, &b0);
                        if second {
                            let b1 = fx.load(bm, &b1_at, m1.as_deref());
                            v1 = fx.add(Ty::Vector, &v1, &b1);
                        }
                    }
                    let evens: Vec<String> = (0..W).map(|j| (2 * j).to_string()).collect();
                    let odds: Vec<String> = (0..W).map(|j| (2 * j + 1).to_string()).collect();
                    let a = fx.op(format!(
                        "vector.shuffle {v0}, {v1} [{}] : {VF}, {VF}",
                        evens.join(", ")
                    ));
                    let b = fx.op(format!(
                        "vector.shuffle {v0}, {v1} [{}] : {VF}, {VF}",
                        odds.join(", ")
                    ));
                    let (a2, b2) = rotate(fx, &a, &b, &c, &s);
                    let lo: Vec<String> = (0..W / 2)
                        .flat_map(|j| [j.to_string(), (W + j).to_string()])
                        .collect();
                    let hi: Vec<String> = (W / 2..W)
                        .flat_map(|j| [j.to_string(), (W + j).to_string()])
                        .collect();
                    let o0 = fx.op(format!(
                        "vector.shuffle {a2}, {b2} [{}] : {VF}, {VF}",
                        lo.join(", ")
                    ));
                    fx.store(&o0, &x, &at0, m0.as_deref());
                    if second {
                        let o1 = fx.op(format!(
                            "vector.shuffle {a2}, {b2} [{}] : {VF}, {VF}",
                            hi.join(", ")
                        ));
                        fx.store(&o1, &x, &at1, m1.as_deref());
                    }
                }
            }
            vec![]
        });
        fx.close("}");
    });
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Keys per block of the main loop: the block's four scores come out as one vector (a 4×4
/// transpose of the dot products), their `exp` is one vector `exp`, and the online-softmax
/// rescaling (a serial chain through `m` and `l`) is paid once per block rather than per key.
const KEYS: usize = 4;

/// What one (query row, head) item needs to fold keys into its state.
struct Head<'a> {
    k: &'a str,
    v: &'a str,
    /// This head's query chunks, loaded once.
    qs: Vec<String>,
    /// Element offset of the item's kv head within a cache row.
    kv_head: String,
    kv_row: usize,
    scale: f32,
    mask: Option<String>,
}

impl Head<'_> {
    fn chunk_mask(&self, c: usize) -> Option<&str> {
        if c + 1 == self.qs.len() {
            self.mask.as_deref()
        } else {
            None
        }
    }

    /// The scaled score of each key of `rows` (cache row offsets): one scalar for a single key,
    /// a 4-lane vector for a block.
    fn scores(&self, fx: &mut Fx, rows: &[String]) -> String {
        let mut d = vec![];
        for row in rows {
            let mut acc = fx.cf(Ty::Vector, 0.0);
            for (c, qc) in self.qs.iter().enumerate() {
                let at = fx.add_k(row, c * W);
                let kc = fx.load(self.k, &at, self.chunk_mask(c));
                acc = fx.fma(Ty::Vector, qc, &kc, &acc);
            }
            d.push(acc);
        }
        if rows.len() == 1 {
            let s = fx.hsum(&d[0]);
            let sc = fx.cf(Ty::Scalar, self.scale);
            return fx.mul(Ty::Scalar, &s, &sc);
        }
        let q: Vec<String> = d.iter().map(|v| fx.quarters(v)).collect();
        let s = fx.transpose_sum([&q[0], &q[1], &q[2], &q[3]]);
        let sc = fx.cf(Ty::V4, self.scale);
        fx.mul(Ty::V4, &s, &sc)
    }

    /// Fold keys `j .. j + nkeys` (1 or [`KEYS`]) into `[m, l, acc…]`.
    fn keys(&self, fx: &mut Fx, j: &str, nkeys: usize, st: &[String]) -> Vec<String> {
        let (m, l) = (&st[0], &st[1]);
        let rows: Vec<String> = (0..nkeys)
            .map(|key| {
                let jk = fx.add_k(j, key);
                let row = fx.mul_k(&jk, self.kv_row);
                fx.add_i(&row, &self.kv_head)
            })
            .collect();
        let s = self.scores(fx, &rows);
        // The block's `exp`s are one vector `exp`, as in the Cranelift kernel.
        let (m_new, weights, p_sum) = if nkeys == 1 {
            let m_new = fx.bin("maximumf", Ty::Scalar, m, &s);
            let ds = fx.sub(Ty::Scalar, &s, &m_new);
            let p = math::exp(fx, Ty::Scalar, &ds);
            (m_new, vec![p.clone()], p)
        } else {
            let bmax = fx.op(format!(
                "vector.reduction <maximumf>, {s} : vector<4xf32> into f32"
            ));
            let m_new = fx.bin("maximumf", Ty::Scalar, m, &bmax);
            let mv = fx.op(format!("vector.broadcast {m_new} : f32 to vector<4xf32>"));
            let ds = fx.sub(Ty::V4, &s, &mv);
            let p = math::exp(fx, Ty::V4, &ds);
            let q = fx.op(format!(
                "vector.shuffle {p}, {p} [2, 3, 0, 1] : vector<4xf32>, vector<4xf32>"
            ));
            let h = fx.add(Ty::V4, &p, &q);
            let q = fx.op(format!(
                "vector.shuffle {h}, {h} [1, 0, 3, 2] : vector<4xf32>, vector<4xf32>"
            ));
            let h = fx.add(Ty::V4, &h, &q);
            let p_sum = fx.op(format!("vector.extract {h}[0] : f32 from vector<4xf32>"));
            let w: Vec<String> = (0..nkeys)
                .map(|k| fx.op(format!("vector.extract {p}[{k}] : f32 from vector<4xf32>")))
                .collect();
            (m_new, w, p_sum)
        };
        let dm = fx.sub(Ty::Scalar, m, &m_new);
        let alpha = math::exp(fx, Ty::Scalar, &dm);
        let l_new = fx.fma(Ty::Scalar, l, &alpha, &p_sum);
        let alpha_v = fx.splat(&alpha);
        let p_v: Vec<String> = weights.iter().map(|p| fx.splat(p)).collect();
        let mut next = vec![m_new, l_new];
        for c in 0..self.qs.len() {
            let mut a = fx.mul(Ty::Vector, &st[2 + c], &alpha_v);
            for (row, pk) in rows.iter().zip(&p_v) {
                let at = fx.add_k(row, c * W);
                let vc = fx.load(self.v, &at, self.chunk_mask(c));
                a = fx.fma(Ty::Vector, pk, &vc, &a);
            }
            next.push(a);
        }
        next
    }
}

/// `scf.for j = lo to hi step step` carrying `[m, l, acc…]` through `body`.
fn key_loop(
    fx: &mut Fx,
    lo: &str,
    hi: &str,
    step: usize,
    init: &[String],
    tys: &[String],
    body: impl FnOnce(&mut Fx, &str, &[String]) -> Vec<String>,
) -> Vec<String> {
    let step = fx.idx(step);
    let res = fx.fresh();
    let j = fx.fresh();
    let args: Vec<String> = init.iter().map(|_| fx.fresh()).collect();
    let inits: Vec<String> = args
        .iter()
        .zip(init)
        .map(|(a, v)| format!("{a} = {v}"))
        .collect();
    fx.open(format!(
        "{res}:{} = scf.for {j} = {lo} to {hi} step {step} iter_args({}) -> ({}) {{",
        init.len(),
        inits.join(", "),
        tys.join(", ")
    ));
    let next = body(fx, &j, &args);
    fx.line(format!(
        "scf.yield {} : {}",
        next.join(", "),
        tys.join(", ")
    ));
    fx.close("}");
    (0..init.len()).map(|k| format!("{res}#{k}")).collect()
}

/// One (query row, head) per item; keys in blocks of [`KEYS`] with an online softmax, then the
/// last `n % KEYS` one by one (nothing past the causal limit is read). The `head_dim`
/// accumulator is carried in vector registers (`scf.for` iteration arguments).
fn attention(fx: &mut Fx, p: &Params, heads: usize, kv_heads: usize, head_dim: usize, scale: f32) {
    let q = p.mem(fx, 0);
    let k = p.mem(fx, 1);
    let v = p.mem(fx, 2);
    let out = p.mem(fx, 3);
    let group = heads / kv_heads;
    let n_chunks = head_dim.div_ceil(W);
    let tail = head_dim % W;
    p.rows(fx, |fx, item| {
        let heads_c = fx.idx(heads);
        let r = fx.op(format!("arith.divui {item}, {heads_c} : index"));
        let h = fx.op(format!("arith.remui {item}, {heads_c} : index"));
        let group_c = fx.idx(group);
        let g = fx.op(format!("arith.divui {h}, {group_c} : index"));
        let q_row = fx.mul_k(&r, heads * head_dim);
        let q_head = fx.mul_k(&h, head_dim);
        let q_off = fx.add_i(&q_row, &q_head);
        let mask = (tail > 0).then(|| fx.mask(tail));
        let mut head = Head {
            k: &k,
            v: &v,
            qs: vec![],
            kv_head: fx.mul_k(&g, head_dim),
            kv_row: kv_heads * head_dim,
            scale,
            mask,
        };
        head.qs = (0..n_chunks)
            .map(|c| {
                let at = fx.add_k(&q_off, c * W);
                let m = if c + 1 == n_chunks {
                    head.mask.clone()
                } else {
                    None
                };
                fx.load(&q, &at, m.as_deref())
            })
            .collect();
        // Row r sees cache rows 0..=pos0 + r.
        let pos = fx.add_i(&p.pos0, &r);
        let n = fx.add_k(&pos, 1);
        let keys_c = fx.idx(KEYS);
        let blocks = fx.op(format!("arith.divui {n}, {keys_c} : index"));
        let n_blocked = fx.mul_i(&blocks, &keys_c);
        let lo = fx.idx(0);
        // A finite "minus infinity", so `m − m_new` never computes inf − inf.
        let mut init = vec![fx.cf(Ty::Scalar, f32::MIN), fx.cf(Ty::Scalar, 0.0)];
        let z = fx.cf(Ty::Vector, 0.0);
        init.extend(std::iter::repeat_n(z, n_chunks));
        let mut tys = vec!["f32".to_string(), "f32".to_string()];
        tys.extend(std::iter::repeat_n(VF.to_string(), n_chunks));
        let st = key_loop(fx, &lo, &n_blocked, KEYS, &init, &tys, |fx, j, st| {
            head.keys(fx, j, KEYS, st)
        });
        let st = key_loop(fx, &n_blocked, &n, 1, &st, &tys, |fx, j, st| {
            head.keys(fx, j, 1, st)
        });
        let l_v = fx.splat(&st[1]);
        for c in 0..n_chunks {
            let y = fx.div(Ty::Vector, &st[2 + c], &l_v);
            let at = fx.add_k(&q_off, c * W);
            fx.store(&y, &out, &at, head.chunk_mask(c));
        }
    });
}
