//! The generated kernels ([`KernelSpec`]) as `gpu.func`s, each with the launch shape that fits
//! its work:
//! - elementwise and gated units: several rows a block, one element a thread (a flat strided
//!   loop over the block's rows, so narrow rows still fill the block);
//! - row norms (`RmsNorm`, `InvRms`, `LayerNorm`): one row a block, a block-wide reduction
//!   (warp shuffles, then one shared slot per warp);
//! - per-head norms: one row a block, one warp a head (warp reductions only, no barrier);
//! - rotary embeddings: one row a block, one pair a thread;
//! - attention: one (query row, head) a block of eight warps that split its keys; each lane owns
//!   `head_dim / 32` dimensions, the score is a warp reduction and the online softmax state
//!   (`m`, `l`, the accumulators) stays in registers while the keys stream from the cache; the
//!   warps' states are merged through shared memory at the end.
//!
//! The scalar maths (the `exp`/`tanh`/... polynomials) are the host backends', so the device
//! rounds like them up to FMA contraction and the order of the row sums.

use super::super::math;
use super::super::text::{Fx, Ty};
use super::emit::*;
use loopc_runtime::artifact::{CudaKernel, EwIn, EwOp, KernelDecl, KernelSpec, RopeStyle};
use loopc_runtime::ew::live_ops;

/// Threads of the elementwise kernels' blocks.
const EW_BLOCK: usize = 256;
/// Warps of an attention block (one (row, head) item; the warps split its keys).
const ATTN_WARPS: usize = 8;

/// The `gpu.func` of one kernel and how to launch it.
#[allow(unreachable_patterns)]
pub fn kernel(decl: &KernelDecl) -> Result<(String, CudaKernel), String> {
    let n = decl.spec.num_ptrs();
    let names: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
    let mut params: Vec<(&str, P)> = names.iter().map(|s| (s.as_str(), P::Ptr)).collect();
    params.extend([
        ("begin", P::I64),
        ("end", P::I64),
        ("pos0", P::I64),
        ("kv_len", P::I64),
    ]);
    let mk = |block, items| Kern::new(&decl.symbol, &params, block, items);
    let k = match &decl.spec {
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
            let mut k = mk(EW_BLOCK, ew_rows(*cols));
            elementwise(&mut k, *cols, &layout, inputs.len(), ops, outputs);
            k
        }
        KernelSpec::Glu { cols, ops } => {
            let half = |col| Layout {
                kind: EwIn::Rows,
                ptr: 0,
                stride: 2 * cols,
                col,
            };
            let last = ops.len().saturating_sub(1) as u32;
            let mut k = mk(EW_BLOCK, ew_rows(*cols));
            elementwise(&mut k, *cols, &[half(0), half(*cols)], 1, ops, &[last]);
            k
        }
        KernelSpec::RmsNorm {
            cols,
            eps,
            residual,
            gain,
        } => {
            let mut k = mk(row_block(*cols), 1);
            rmsnorm(&mut k, *cols, *eps, *residual, *gain, false);
            k
        }
        KernelSpec::InvRms { cols, eps } => {
            let mut k = mk(row_block(*cols), 1);
            rmsnorm(&mut k, *cols, *eps, false, false, true);
            k
        }
        KernelSpec::LayerNorm { cols, eps } => {
            let mut k = mk(row_block(*cols), 1);
            layernorm(&mut k, *cols, *eps);
            k
        }
        KernelSpec::HeadRmsNorm {
            heads,
            head_dim,
            eps,
        } => {
            let mut k = mk(WARP * (*heads).clamp(1, 8), 1);
            head_rmsnorm(&mut k, *heads, *head_dim, *eps);
            k
        }
        KernelSpec::Rope {
            heads,
            head_dim,
            style,
        } => {
            let mut k = mk(row_block(heads * head_dim / 2), 1);
            rope(&mut k, *heads, *head_dim, *style, false);
            k
        }
        KernelSpec::RopeBias {
            heads,
            head_dim,
            style,
        } => {
            let mut k = mk(row_block(heads * head_dim / 2), 1);
            rope(&mut k, *heads, *head_dim, *style, true);
            k
        }
        KernelSpec::Attention {
            heads,
            kv_heads,
            head_dim,
            scale,
        } => {
            let mut k = mk(WARP * ATTN_WARPS, 1);
            attention(&mut k, *heads, *kv_heads, *head_dim, *scale);
            k
        }
        // Kernel kinds added after this backend fail the build with a message, not a panic.
        other => return Err(format!("the CUDA backend does not generate {other:?} yet")),
    };
    Ok(k.finish())
}

/// Rows of an elementwise block: enough for about 1024 elements.
fn ew_rows(cols: usize) -> usize {
    (1024 / cols.max(1)).clamp(1, 64)
}

/// The block's first item, `begin + block_id · items_per_block`.
fn first_item(k: &mut Kern) -> String {
    let items = k.launch.items_per_block as usize;
    let (begin, bid) = (k.param("begin"), k.bid.clone());
    let off = mul_k(&mut k.fx, &bid, items);
    add(&mut k.fx, &begin, &off)
}

/// Run `body(kern, row)` for the block's single row when it is below `end` (uniform across the
/// block, so the body may hold barriers).
fn one_row(k: &mut Kern, body: impl FnOnce(&mut Kern, &str)) {
    let row = first_item(k);
    let end = k.param("end");
    let ok = cmp(&mut k.fx, "slt", &row, &end);
    k.fx.open(format!("scf.if {ok} {{"));
    body(k, &row);
    k.fx.close("}");
}

// ---------------------------------------------------------------------------------------------
// Elementwise and gated units

struct Layout {
    kind: EwIn,
    ptr: usize,
    stride: usize,
    col: usize,
}

/// `ops` at one element; `input(fx, k)` yields input `k`.
pub fn eval_ops(
    fx: &mut Fx,
    ops: &[EwOp],
    live: &[bool],
    mut input: impl FnMut(&mut Fx, usize) -> String,
) -> Vec<Option<String>> {
    let ty = Ty::Scalar;
    let mut vals: Vec<Option<String>> = vec![None; ops.len()];
    let mut loaded: Vec<Option<String>> = vec![];
    for (i, op) in ops.iter().enumerate() {
        if !live[i] {
            continue;
        }
        let a = |k: u32| vals[k as usize].clone().expect("operands precede uses");
        let v = match *op {
            EwOp::Input(k) => {
                let k = k as usize;
                if loaded.len() <= k {
                    loaded.resize(k + 1, None);
                }
                if loaded[k].is_none() {
                    loaded[k] = Some(input(fx, k));
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
    vals
}

/// One element a thread over the block's rows (flattened), so an output may alias an input:
/// each element's inputs are read before its outputs are written.
fn elementwise(
    k: &mut Kern,
    cols: usize,
    layout: &[Layout],
    n_in_ptrs: usize,
    ops: &[EwOp],
    outputs: &[u32],
) {
    let rows = k.launch.items_per_block as usize;
    let ins: Vec<String> = layout
        .iter()
        .map(|l| k.ptr(&format!("p{}", l.ptr)))
        .collect();
    let outs: Vec<String> = (0..outputs.len())
        .map(|o| k.ptr(&format!("p{}", n_in_ptrs + o)))
        .collect();
    let live = live_ops(ops, outputs);
    let base = first_item(k);
    let end = k.param("end");
    let tid = k.tid.clone();
    let fx = &mut k.fx;
    let total = c64(fx, (rows * cols) as i64);
    strided(fx, &tid, &total, EW_BLOCK, |fx, e| {
        let (rl, c) = divrem_k(fx, e, cols);
        let row = add(fx, &base, &rl);
        let ok = cmp(fx, "slt", &row, &end);
        when(fx, &ok, |fx| {
            let vals = eval_ops(fx, ops, &live, |fx, i| {
                let l = &layout[i];
                let at = match l.kind {
                    EwIn::Rows => {
                        let r = mul_k(fx, &row, l.stride);
                        let r = add_k(fx, &r, l.col);
                        add(fx, &r, &c)
                    }
                    EwIn::Broadcast => c.clone(),
                    EwIn::PerRow => row.clone(),
                };
                ld(fx, &ins[i], &at)
            });
            let r = mul_k(fx, &row, cols);
            let at = add(fx, &r, &c);
            for (&o, p) in outputs.iter().zip(&outs) {
                let v = vals[o as usize].clone().expect("outputs are live");
                st(fx, &v, p, &at);
            }
        });
    });
}

// ---------------------------------------------------------------------------------------------
// Normalization

/// `1 / sqrt(sum / n + eps)`, the host kernels' `sqrt` then divide.
pub fn inv_rms(fx: &mut Fx, sum: &str, n: usize, eps: f32) -> String {
    let nf = fx.cf(Ty::Scalar, n as f32);
    let mean = fx.div(Ty::Scalar, sum, &nf);
    let e = fx.cf(Ty::Scalar, eps);
    let v = fx.add(Ty::Scalar, &mean, &e);
    let r = fx.unary("math.sqrt", Ty::Scalar, &v);
    let one = fx.cf(Ty::Scalar, 1.0);
    fx.div(Ty::Scalar, &one, &r)
}

/// [`inv_rms`] over a runtime count `n` (`i64`) and `eps` (`f32`).
pub fn inv_rms_dyn(fx: &mut Fx, sum: &str, n: &str, eps: &str) -> String {
    let nf = fx.op(format!("arith.sitofp {n} : i64 to f32"));
    let mean = fx.div(Ty::Scalar, sum, &nf);
    let v = fx.add(Ty::Scalar, &mean, eps);
    let r = fx.unary("math.sqrt", Ty::Scalar, &v);
    let one = fx.cf(Ty::Scalar, 1.0);
    fx.div(Ty::Scalar, &one, &r)
}

fn rmsnorm(k: &mut Kern, cols: usize, eps: f32, residual: bool, gain: bool, inv_only: bool) {
    // Pointers: [x, gain?, y] or [a, b, gain?, sum, y]; `inv_only`: [x, s].
    let mut next = 0;
    let mut take = |k: &mut Kern| {
        next += 1;
        k.ptr(&format!("p{}", next - 1))
    };
    let a = take(k);
    let b = residual.then(|| take(k));
    let g = gain.then(|| take(k));
    let sum = residual.then(|| take(k));
    let y = take(k);
    let block = k.block();
    one_row(k, |k, row| {
        let tid = k.tid.clone();
        let fx = &mut k.fx;
        let start = mul_k(fx, row, cols);
        let n = c64(fx, cols as i64);
        let part = strided_sum(fx, &tid, &n, block, "f32", |fx, c, acc| {
            let at = add(fx, &start, c);
            let mut x = ld(fx, &a, &at);
            if let (Some(b), Some(sum)) = (&b, &sum) {
                let xb = ld(fx, b, &at);
                x = fx.add(Ty::Scalar, &x, &xb);
                st(fx, &x, sum, &at);
            }
            fx.fma(Ty::Scalar, &x, &x, acc)
        });
        let total = block_sum(k, &part, "f32");
        let fx = &mut k.fx;
        let inv = inv_rms(fx, &total, cols, eps);
        if inv_only {
            let zero = c64(fx, 0);
            let first = cmp(fx, "eq", &tid, &zero);
            when(fx, &first, |fx| st(fx, &inv, &y, row));
            return;
        }
        // Each thread re-reads the columns it wrote to `sum` itself: no barrier needed.
        let x_mem = sum.clone().unwrap_or_else(|| a.clone());
        strided(fx, &tid, &n, block, |fx, c| {
            let at = add(fx, &start, c);
            let x = ld(fx, &x_mem, &at);
            let mut v = fx.mul(Ty::Scalar, &x, &inv);
            if let Some(g) = &g {
                let gv = ld(fx, g, c);
                v = fx.mul(Ty::Scalar, &v, &gv);
            }
            st(fx, &v, &y, &at);
        });
    });
}

/// Two passes over the row (mean, then the centred sum of squares), as torch.
fn layernorm(k: &mut Kern, cols: usize, eps: f32) {
    let x = k.ptr("p0");
    let g = k.ptr("p1");
    let b = k.ptr("p2");
    let y = k.ptr("p3");
    let block = k.block();
    one_row(k, |k, row| {
        let tid = k.tid.clone();
        let fx = &mut k.fx;
        let start = mul_k(fx, row, cols);
        let n = c64(fx, cols as i64);
        let part = strided_sum(fx, &tid, &n, block, "f32", |fx, c, acc| {
            let at = add(fx, &start, c);
            let v = ld(fx, &x, &at);
            fx.add(Ty::Scalar, acc, &v)
        });
        let total = block_sum(k, &part, "f32");
        let fx = &mut k.fx;
        let nf = fx.cf(Ty::Scalar, cols as f32);
        let mean = fx.div(Ty::Scalar, &total, &nf);
        let part = strided_sum(fx, &tid, &n, block, "f32", |fx, c, acc| {
            let at = add(fx, &start, c);
            let v = ld(fx, &x, &at);
            let d = fx.sub(Ty::Scalar, &v, &mean);
            fx.fma(Ty::Scalar, &d, &d, acc)
        });
        let sq = block_sum(k, &part, "f32");
        let fx = &mut k.fx;
        let var = fx.div(Ty::Scalar, &sq, &nf);
        let e = fx.cf(Ty::Scalar, eps);
        let ve = fx.add(Ty::Scalar, &var, &e);
        let sd = fx.unary("math.sqrt", Ty::Scalar, &ve);
        let one = fx.cf(Ty::Scalar, 1.0);
        let inv = fx.div(Ty::Scalar, &one, &sd);
        strided(fx, &tid, &n, block, |fx, c| {
            let at = add(fx, &start, c);
            let v = ld(fx, &x, &at);
            let d = fx.sub(Ty::Scalar, &v, &mean);
            let z = fx.mul(Ty::Scalar, &d, &inv);
            let gv = ld(fx, &g, c);
            let bv = ld(fx, &b, c);
            let o = fx.fma(Ty::Scalar, &z, &gv, &bv);
            st(fx, &o, &y, &at);
        });
    });
}

/// One warp per head of the row; the warps take heads `w, w + warps, …`.
fn head_rmsnorm(k: &mut Kern, heads: usize, head_dim: usize, eps: f32) {
    let x = k.ptr("p0");
    let y = k.ptr("p1");
    let warps = k.block() / WARP;
    one_row(k, |k, row| {
        let tid = k.tid.clone();
        let fx = &mut k.fx;
        let (warp, lane) = divrem_k(fx, &tid, WARP);
        let row_start = mul_k(fx, row, heads * head_dim);
        let nh = c64(fx, heads as i64);
        strided(fx, &warp, &nh, warps, |fx, h| {
            let hs = mul_k(fx, h, head_dim);
            let start = add(fx, &row_start, &hs);
            let n = c64(fx, head_dim as i64);
            let part = strided_sum(fx, &lane, &n, WARP, "f32", |fx, d, acc| {
                let at = add(fx, &start, d);
                let v = ld(fx, &x, &at);
                fx.fma(Ty::Scalar, &v, &v, acc)
            });
            let total = warp_sum(fx, &part, "f32");
            let inv = inv_rms(fx, &total, head_dim, eps);
            strided(fx, &lane, &n, WARP, |fx, d| {
                let at = add(fx, &start, d);
                let v = ld(fx, &x, &at);
                let o = fx.mul(Ty::Scalar, &v, &inv);
                st(fx, &o, &y, &at);
            });
        });
    });
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding

/// `(a, b) → (a·cos − b·sin, a·sin + b·cos)`, with the host kernels' roundings.
pub fn rotate(fx: &mut Fx, a: &str, b: &str, c: &str, s: &str) -> (String, String) {
    let t = Ty::Scalar;
    let bs = fx.mul(t, b, s);
    let nbs = fx.neg(t, &bs);
    let a2 = fx.fma(t, a, c, &nbs);
    let bc = fx.mul(t, b, c);
    let b2 = fx.fma(t, a, s, &bc);
    (a2, b2)
}

/// One pair a thread over the row's `heads · head_dim / 2` pairs.
fn rope(k: &mut Kern, heads: usize, head_dim: usize, style: RopeStyle, bias: bool) {
    let x = k.ptr("p0");
    let o = usize::from(bias);
    let bm = bias.then(|| k.ptr("p1"));
    let cos = k.ptr(&format!("p{}", 1 + o));
    let sin = k.ptr(&format!("p{}", 2 + o));
    let pos0 = k.param("pos0");
    let half = head_dim / 2;
    let block = k.block();
    one_row(k, |k, row| {
        let tid = k.tid.clone();
        let fx = &mut k.fx;
        let pos = add(fx, &pos0, row);
        let table_row = mul_k(fx, &pos, half);
        let x_row = mul_k(fx, row, heads * head_dim);
        let pairs = c64(fx, (heads * half) as i64);
        strided(fx, &tid, &pairs, block, |fx, e| {
            let (h, i) = divrem_k(fx, e, half);
            let ti = add(fx, &table_row, &i);
            let c = ld(fx, &cos, &ti);
            let s = ld(fx, &sin, &ti);
            let head = mul_k(fx, &h, head_dim);
            // Offsets of the pair within the head.
            let (ia, ib) = match style {
                RopeStyle::Half => {
                    let ib = add_k(fx, &i, half);
                    (i.clone(), ib)
                }
                RopeStyle::Interleaved => {
                    let ia = mul_k(fx, &i, 2);
                    let ib = add_k(fx, &ia, 1);
                    (ia, ib)
                }
            };
            let ha = add(fx, &head, &ia);
            let hb = add(fx, &head, &ib);
            let at_a = add(fx, &x_row, &ha);
            let at_b = add(fx, &x_row, &hb);
            let mut a = ld(fx, &x, &at_a);
            let mut b = ld(fx, &x, &at_b);
            if let Some(bm) = &bm {
                let ba = ld(fx, bm, &ha);
                let bb = ld(fx, bm, &hb);
                a = fx.add(Ty::Scalar, &a, &ba);
                b = fx.add(Ty::Scalar, &b, &bb);
            }
            let (a2, b2) = rotate(fx, &a, &b, &c, &s);
            st(fx, &a2, &x, &at_a);
            st(fx, &b2, &x, &at_b);
        });
    });
}

// ---------------------------------------------------------------------------------------------
// Attention

/// One (query row, head) a block; its warps split the keys (warp `w` takes keys `w, w + W, …`
/// up to the causal limit, so a decode step's few heads still spread over many warps). In a warp,
/// lane `l` owns dimensions `l + 32·j`: the query stays in registers, each key's score is one
/// warp reduction, and an online softmax folds the value rows straight from the cache. The
/// warps' states `(m, l, acc)` are then merged through shared memory: with `M = max m_w`,
/// `out = Σ_w acc_w·e^(m_w − M) / Σ_w l_w·e^(m_w − M)`.
fn attention(k: &mut Kern, heads: usize, kv_heads: usize, head_dim: usize, scale: f32) {
    let q = k.ptr("p0");
    let kc = k.ptr("p1");
    let vc = k.ptr("p2");
    let out = k.ptr("p3");
    let pos0 = k.param("pos0");
    let group = heads / kv_heads;
    let per_lane = head_dim.div_ceil(WARP);
    let warps = k.block() / WARP;
    // Shared: m and l of each warp, then each warp's accumulators (32 · per_lane each).
    let stride = per_lane * WARP;
    let (sh, sh_ty) = k.shared_buf("%att", warps * (2 + stride));
    one_row(k, |k, item| {
        let tid = k.tid.clone();
        let block = k.block();
        let fx = &mut k.fx;
        let (warp, lane) = divrem_k(fx, &tid, WARP);
        let (r, h) = divrem_k(fx, item, heads);
        let (g, _) = divrem_k(fx, &h, group);
        let q_row = mul_k(fx, &r, heads * head_dim);
        let q_head = mul_k(fx, &h, head_dim);
        let q_off = add(fx, &q_row, &q_head);
        let kv_head = mul_k(fx, &g, head_dim);
        // Lane dimensions; past `head_dim` a lane reads dimension 0 with a zero query, so it
        // adds nothing to the scores and its accumulator is never stored.
        let mut dims = vec![];
        let mut qs = vec![];
        for j in 0..per_lane {
            let d = add_k(fx, &lane, j * WARP);
            let partial = (j + 1) * WARP > head_dim;
            let (d_safe, ok) = if partial {
                let hd = c64(fx, head_dim as i64);
                let ok = cmp(fx, "slt", &d, &hd);
                let zero = c64(fx, 0);
                let ds = fx.op(format!("arith.select {ok}, {d}, {zero} : i64"));
                (ds, Some(ok))
            } else {
                (d.clone(), None)
            };
            let at = add(fx, &q_off, &d_safe);
            let mut qv = ld(fx, &q, &at);
            if let Some(ok) = &ok {
                let z = fx.cf(Ty::Scalar, 0.0);
                qv = fx.select(Ty::Scalar, ok, &qv, &z);
            }
            dims.push(d_safe);
            qs.push(qv);
        }
        // Row r sees cache rows 0..=pos0 + r.
        let pos = add(fx, &pos0, &r);
        let n = add_k(fx, &pos, 1);
        let step = c64(fx, warps as i64);
        // A finite "minus infinity", so `m − m_new` never computes inf − inf.
        let mut init = vec![fx.cf(Ty::Scalar, f32::MIN), fx.cf(Ty::Scalar, 0.0)];
        let z = fx.cf(Ty::Scalar, 0.0);
        init.extend(std::iter::repeat_n(z, per_lane));
        let tys = vec!["f32"; init.len()];
        let state = for_carry(fx, &warp, &n, &step, &init, &tys, |fx, j, st| {
            let (m, l) = (&st[0], &st[1]);
            let row = mul_k(fx, j, kv_heads * head_dim);
            let row = add(fx, &row, &kv_head);
            let mut dot = fx.cf(Ty::Scalar, 0.0);
            let mut ats = vec![];
            for (d, qv) in dims.iter().zip(&qs) {
                let at = add(fx, &row, d);
                let kv = ld(fx, &kc, &at);
                dot = fx.fma(Ty::Scalar, qv, &kv, &dot);
                ats.push(at);
            }
            let s = warp_sum(fx, &dot, "f32");
            let sc = fx.cf(Ty::Scalar, scale);
            let s = fx.mul(Ty::Scalar, &s, &sc);
            let m_new = fx.bin("maximumf", Ty::Scalar, m, &s);
            let ds = fx.sub(Ty::Scalar, &s, &m_new);
            let p = math::exp(fx, Ty::Scalar, &ds);
            let dm = fx.sub(Ty::Scalar, m, &m_new);
            let alpha = math::exp(fx, Ty::Scalar, &dm);
            let l_new = fx.fma(Ty::Scalar, l, &alpha, &p);
            let mut next = vec![m_new, l_new];
            for (c, at) in ats.iter().enumerate() {
                let vv = ld(fx, &vc, at);
                let a = fx.mul(Ty::Scalar, &st[2 + c], &alpha);
                next.push(fx.fma(Ty::Scalar, &p, &vv, &a));
            }
            next
        });
        // Publish the warp's state: m and l from lane 0, every lane's accumulators.
        let idx = |fx: &mut Fx, at: &str| fx.op(format!("arith.index_cast {at} : i64 to index"));
        let zero = c64(fx, 0);
        let first = cmp(fx, "eq", &lane, &zero);
        let wi = idx(fx, &warp);
        let wl = add_k(fx, &warp, warps);
        let wli = idx(fx, &wl);
        when(fx, &first, |fx| {
            fx.line(format!("memref.store {}, {sh}[{wi}] : {sh_ty}", state[0]));
            fx.line(format!("memref.store {}, {sh}[{wli}] : {sh_ty}", state[1]));
        });
        let acc_base = mul_k(fx, &warp, stride);
        let acc_base = add_k(fx, &acc_base, 2 * warps);
        for c in 0..per_lane {
            let d = add_k(fx, &lane, c * WARP);
            let at = add(fx, &acc_base, &d);
            let ai = idx(fx, &at);
            fx.line(format!(
                "memref.store {}, {sh}[{ai}] : {sh_ty}",
                state[2 + c]
            ));
        }
        fx.line("gpu.barrier");
        // Every thread merges the warps in the same order (so all agree on M and L), then the
        // block's threads take the dimensions.
        let load = |fx: &mut Fx, at: usize| {
            let i = fx.idx(at);
            fx.op(format!("memref.load {sh}[{i}] : {sh_ty}"))
        };
        let mut big = load(fx, 0);
        for w in 1..warps {
            let m = load(fx, w);
            big = fx.bin("maximumf", Ty::Scalar, &big, &m);
        }
        let mut weights = vec![];
        let mut total = String::new();
        for w in 0..warps {
            let m = load(fx, w);
            let l = load(fx, warps + w);
            let dm = fx.sub(Ty::Scalar, &m, &big);
            let e = math::exp(fx, Ty::Scalar, &dm);
            total = if w == 0 {
                fx.mul(Ty::Scalar, &l, &e)
            } else {
                fx.fma(Ty::Scalar, &l, &e, &total)
            };
            weights.push(e);
        }
        let hd = c64(fx, head_dim as i64);
        strided(fx, &tid, &hd, block, |fx, d| {
            let mut acc = String::new();
            for (w, e) in weights.iter().enumerate() {
                let at = add_k(fx, d, 2 * warps + w * stride);
                let ai = idx(fx, &at);
                let a = fx.op(format!("memref.load {sh}[{ai}] : {sh_ty}"));
                acc = if w == 0 {
                    fx.mul(Ty::Scalar, &a, e)
                } else {
                    fx.fma(Ty::Scalar, &a, e, &acc)
                };
            }
            let y = fx.div(Ty::Scalar, &acc, &total);
            let at = add(fx, &q_off, d);
            st(fx, &y, &out, &at);
        });
    });
}
