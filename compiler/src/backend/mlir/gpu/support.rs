//! The runtime's own operations as device kernels (the contract's `support` list): one row a
//! block of 256 threads, the threads striding over the row's columns (the widths are runtime
//! values here, unlike the generated kernels'); the row reductions (`row_norm`, `exit_latent`)
//! are block-wide.

use super::super::math;
use super::super::text::{Fx, Ty};
use super::emit::*;
use super::kernels::{inv_rms_dyn, rotate};
use super::math64;
use loopc_runtime::artifact::cuda::support as names;
use loopc_runtime::artifact::CudaKernel;

const BLOCK: usize = 256;

/// A scalar activation of `math`.
type Act = fn(&mut Fx, Ty, &str) -> String;

/// Every support kernel: `(name, gpu.func text, launch)`, in [`names::ALL`]'s order.
pub fn all() -> Vec<(&'static str, String, CudaKernel)> {
    names::ALL
        .iter()
        .map(|&n| {
            let (text, launch) = kernel(n).expect("every listed support kernel is generated");
            (n, text, launch)
        })
        .collect()
}

/// The support kernel of that name, or `None` for a name the contract does not list.
pub fn kernel(name: &str) -> Option<(String, CudaKernel)> {
    use P::*;
    let k = match name {
        names::EMBED => embed(Kern::new(
            name,
            &[
                ("out", Ptr),
                ("table", Ptr),
                ("tokens", Ptr),
                ("rows", I64),
                ("cols", I64),
            ],
            BLOCK,
            1,
        )),
        names::COPY_COLS => copy_cols(Kern::new(
            name,
            &[
                ("dst", Ptr),
                ("src", Ptr),
                ("rows", I64),
                ("cols", I64),
                ("dst_stride", I64),
                ("dst_off", I64),
                ("src_stride", I64),
                ("src_off", I64),
            ],
            BLOCK,
            1,
        )),
        names::SINUSOIDAL => sinusoidal(Kern::new(
            name,
            &[
                ("out", Ptr),
                ("rows", I64),
                ("cols", I64),
                ("pos0", I64),
                ("base", F64),
            ],
            BLOCK,
            1,
        )),
        names::TIMING_SIGNAL => timing_signal(Kern::new(
            name,
            &[
                ("out", Ptr),
                ("rows", I64),
                ("cols", I64),
                ("t0", I64),
                ("t_step", I64),
                ("min_timescale", F64),
                ("max_timescale", F64),
            ],
            BLOCK,
            1,
        )),
        names::EPILOGUE => epilogue(Kern::new(
            name,
            &[
                ("out", Ptr),
                ("p", Ptr),
                ("row_scale", Ptr),
                ("residual", Ptr),
                ("bias", Ptr),
                ("rows", I64),
                ("n", I64),
                ("p_stride", I64),
                ("p_off", I64),
            ],
            BLOCK,
            1,
        )),
        names::GLU => glu(Kern::new(
            name,
            &[
                ("out", Ptr),
                ("p", Ptr),
                ("rows", I64),
                ("n", I64),
                ("block", I64),
                ("act", I64),
            ],
            BLOCK,
            1,
        )),
        names::ROW_NORM => row_norm(Kern::new(
            name,
            &[
                ("out", Ptr),
                ("gain", Ptr),
                ("inv_rms", Ptr),
                ("rows", I64),
                ("n", I64),
                ("normalize", I64),
                ("eps", F32),
            ],
            BLOCK,
            1,
        )),
        names::EXIT_LATENT => exit_latent(Kern::new(
            name,
            &[
                ("value", Ptr),
                ("a", Ptr),
                ("b", Ptr),
                ("rows", I64),
                ("n", I64),
                ("kind", I64),
            ],
            BLOCK,
            1,
        )),
        names::EXIT_LOGITS => exit_logits(Kern::new(
            name,
            &[
                ("value", Ptr),
                ("logits", Ptr),
                ("prev_logp", Ptr),
                ("prev_h", Ptr),
                ("prev_am", Ptr),
                ("count", Ptr),
                ("active", Ptr),
                ("rows", I64),
                ("vocab", I64),
                ("kind", I64),
                ("first", I64),
                ("uniform", F32),
            ],
            BLOCK,
            1,
        )),
        names::ROUTE_EXPERT => route_expert(Kern::new(
            name,
            &[
                ("keep", Ptr),
                ("gate", Ptr),
                ("z", Ptr),
                ("active", Ptr),
                ("rows", I64),
                ("k", I64),
                ("threshold", F32),
                ("alpha", F32),
            ],
            BLOCK,
            1,
        )),
        names::ROUTE_TOKEN => route_token(Kern::new(
            name,
            &[
                ("depth", Ptr),
                ("weight", Ptr),
                ("z", Ptr),
                ("rows", I64),
                ("n", I64),
                ("cap", I64),
                ("alpha", F32),
            ],
            BLOCK,
            1,
        )),
        names::SELECT_ROWS => select_rows(Kern::new(
            name,
            &[
                ("dst", Ptr),
                ("src", Ptr),
                ("mask", Ptr),
                ("rows", I64),
                ("n", I64),
            ],
            BLOCK,
            1,
        )),
        names::ROPE_ROWS => rope_rows(Kern::new(
            name,
            &[
                ("out", Ptr),
                ("cos", Ptr),
                ("sin", Ptr),
                ("rows", I64),
                ("n", I64),
                ("head_dim", I64),
                ("style", I64),
                ("pos0", I64),
            ],
            BLOCK,
            1,
        )),
        _ => return None,
    };
    Some(k.finish())
}

/// `body(kern, row)` for the block's row when it is below `rows` (uniform across the block).
fn each_row(mut k: Kern, body: impl FnOnce(&mut Kern, &str)) -> Kern {
    let row = k.bid.clone();
    let rows = k.param("rows");
    let ok = cmp(&mut k.fx, "slt", &row, &rows);
    k.fx.open(format!("scf.if {ok} {{"));
    body(&mut k, &row);
    k.fx.close("}");
    k
}

/// The thread's columns `tid, tid + 256, … < n`.
fn columns(k: &mut Kern, n: &str, body: impl FnOnce(&mut Fx, &str)) {
    let tid = k.tid.clone();
    strided(&mut k.fx, &tid, n, BLOCK, body)
}

/// `p != 0` for an optional pointer parameter.
fn present(fx: &mut Fx, p: &str) -> String {
    let zero = c64(fx, 0);
    cmp(fx, "ne", p, &zero)
}

fn embed(mut k: Kern) -> Kern {
    let out = k.ptr("out");
    let table = k.ptr("table");
    let tokens = k.ptr("tokens");
    let cols = k.param("cols");
    each_row(k, |k, r| {
        let t = load(&mut k.fx, &tokens, r, "i32");
        let t = k.fx.op(format!("arith.extsi {t} : i32 to i64"));
        let src = mul(&mut k.fx, &t, &cols);
        let dst = mul(&mut k.fx, r, &cols);
        columns(k, &cols, |fx, c| {
            let from = add(fx, &src, c);
            let v = ld(fx, &table, &from);
            let to = add(fx, &dst, c);
            st(fx, &v, &out, &to);
        });
    })
}

fn copy_cols(mut k: Kern) -> Kern {
    let dst = k.ptr("dst");
    let src = k.ptr("src");
    let [cols, ds, doff, ss, soff] =
        ["cols", "dst_stride", "dst_off", "src_stride", "src_off"].map(|n| k.param(n));
    each_row(k, |k, r| {
        let fx = &mut k.fx;
        let d = mul(fx, r, &ds);
        let d = add(fx, &d, &doff);
        let s = mul(fx, r, &ss);
        let s = add(fx, &s, &soff);
        columns(k, &cols, |fx, c| {
            let from = add(fx, &s, c);
            let v = ld(fx, &src, &from);
            let to = add(fx, &d, c);
            st(fx, &v, &dst, &to);
        });
    })
}

/// `f64` → `f32` and store.
fn st64(fx: &mut Fx, v: &str, p: &str, at: &str) {
    let f = fx.op(format!("arith.truncf {v} : f64 to f32"));
    st(fx, &f, p, at);
}

/// Even column `c`: `sin(p · e^(−c·ln(base)/cols))`, odd column `c + 1` its `cos` (the host's
/// operation order, in `f64`).
fn sinusoidal(mut k: Kern) -> Kern {
    let out = k.ptr("out");
    let [cols, pos0, base] = ["cols", "pos0", "base"].map(|n| k.param(n));
    let ln_base = math64::ln(&mut k.fx, &base);
    each_row(k, |k, r| {
        let fx = &mut k.fx;
        let pos = add(fx, &pos0, r);
        let p = i64_to_f64(fx, &pos);
        let row = mul(fx, r, &cols);
        let one = c64(fx, 1);
        let pairs = add(fx, &cols, &one);
        let two = c64(fx, 2);
        let pairs = ibin(fx, "divui", &pairs, &two);
        let cf = i64_to_f64(fx, &cols);
        columns(k, &pairs, |fx, i| {
            let c = mul(fx, i, &two);
            let cf64 = i64_to_f64(fx, &c);
            let neg = fx.op(format!("arith.negf {cf64} : f64"));
            let x = fx.op(format!("arith.mulf {neg}, {ln_base} : f64"));
            let x = fx.op(format!("arith.divf {x}, {cf} : f64"));
            let e = math64::exp(fx, &x);
            let a = fx.op(format!("arith.mulf {p}, {e} : f64"));
            let (s, co) = math64::sin_cos(fx, &a);
            let at = add(fx, &row, &c);
            st64(fx, &s, &out, &at);
            let c1 = add(fx, &c, &one);
            let has = cmp(fx, "slt", &c1, &cols);
            let at1 = add(fx, &at, &one);
            when(fx, &has, |fx| st64(fx, &co, &out, &at1));
        });
    })
}

/// Column `i < h = cols/2`: `sin(t·min·e^(−i·inc))`, column `h + i` its `cos`, with
/// `inc = ln(max/min) / (max(h, 2) − 1)`; a last zero column for odd widths.
fn timing_signal(mut k: Kern) -> Kern {
    let out = k.ptr("out");
    let [cols, t0, t_step, lo, hi] =
        ["cols", "t0", "t_step", "min_timescale", "max_timescale"].map(|n| k.param(n));
    let fx = &mut k.fx;
    let two = c64(fx, 2);
    let h = ibin(fx, "divui", &cols, &two);
    let hm = ibin(fx, "maxsi", &h, &two);
    let one = c64(fx, 1);
    let hm = ibin(fx, "subi", &hm, &one);
    let hmf = i64_to_f64(fx, &hm);
    let ratio = fx.op(format!("arith.divf {hi}, {lo} : f64"));
    let lr = math64::ln(fx, &ratio);
    let inc = fx.op(format!("arith.divf {lr}, {hmf} : f64"));
    each_row(k, |k, r| {
        let fx = &mut k.fx;
        let step = mul(fx, r, &t_step);
        let t = add(fx, &t0, &step);
        let tf = i64_to_f64(fx, &t);
        let tl = fx.op(format!("arith.mulf {tf}, {lo} : f64"));
        let row = mul(fx, r, &cols);
        columns(k, &h, |fx, i| {
            let i_f = i64_to_f64(fx, i);
            let neg = fx.op(format!("arith.negf {i_f} : f64"));
            let x = fx.op(format!("arith.mulf {neg}, {inc} : f64"));
            let e = math64::exp(fx, &x);
            let a = fx.op(format!("arith.mulf {tl}, {e} : f64"));
            let (s, co) = math64::sin_cos(fx, &a);
            let at = add(fx, &row, i);
            st64(fx, &s, &out, &at);
            let at = add(fx, &at, &h);
            st64(fx, &co, &out, &at);
        });
        let fx = &mut k.fx;
        let odd = ibin(fx, "remui", &cols, &two);
        let zero = c64(fx, 0);
        let odd = cmp(fx, "ne", &odd, &zero);
        let first = cmp(fx, "eq", &k.tid.clone(), &zero);
        let both = fx.op(format!("arith.andi {odd}, {first} : i1"));
        when(fx, &both, |fx| {
            let last = add(fx, &row, &cols);
            let last = ibin(fx, "subi", &last, &one);
            let z = fx.cf(Ty::Scalar, 0.0);
            st(fx, &z, &out, &last);
        });
    })
}

/// `out = residual? + row_scale? · p + bias?`, in the host's order: `p · s`, `+ bias`,
/// `+ residual`.
fn epilogue(mut k: Kern) -> Kern {
    let out = k.ptr("out");
    let p = k.ptr("p");
    let rs = k.ptr("row_scale");
    let res = k.ptr("residual");
    let bias = k.ptr("bias");
    let [n, ps, po] = ["n", "p_stride", "p_off"].map(|x| k.param(x));
    let [has_rs, has_res, has_bias] = ["row_scale", "residual", "bias"].map(|x| {
        let v = k.param(x);
        present(&mut k.fx, &v)
    });
    each_row(k, |k, r| {
        let fx = &mut k.fx;
        let one = fx.cf(Ty::Scalar, 1.0);
        let s = if_else(fx, &has_rs, "f32", |fx| ld(fx, &rs, r), |_| one.clone());
        let prow = mul(fx, r, &ps);
        let prow = add(fx, &prow, &po);
        let orow = mul(fx, r, &n);
        columns(k, &n, |fx, j| {
            let at = add(fx, &prow, j);
            let v = ld(fx, &p, &at);
            let v = fx.mul(Ty::Scalar, &v, &s);
            let v = if_else(
                fx,
                &has_bias,
                "f32",
                |fx| {
                    let b = ld(fx, &bias, j);
                    fx.add(Ty::Scalar, &v, &b)
                },
                |_| v.clone(),
            );
            let o = add(fx, &orow, j);
            let v = if_else(
                fx,
                &has_res,
                "f32",
                |fx| {
                    let a = ld(fx, &res, &o);
                    fx.add(Ty::Scalar, &v, &a)
                },
                |_| v.clone(),
            );
            st(fx, &v, &out, &o);
        });
    })
}

/// `out[r, i·block + c] = act(p[r, 2·i·block + c]) · p[r, 2·i·block + b + c]`,
/// `b = min(block, n − i·block)`; `act` is `support::act_code`'s code.
fn glu(mut k: Kern) -> Kern {
    let out = k.ptr("out");
    let p = k.ptr("p");
    let [n, blk, act] = ["n", "block", "act"].map(|x| k.param(x));
    let act_i = k.fx.op(format!("arith.index_cast {act} : i64 to index"));
    each_row(k, |k, r| {
        let fx = &mut k.fx;
        let two_n = add(fx, &n, &n);
        let prow = mul(fx, r, &two_n);
        let orow = mul(fx, r, &n);
        columns(k, &n, |fx, j| {
            let i = ibin(fx, "divui", j, &blk);
            let c = ibin(fx, "remui", j, &blk);
            let ib = mul(fx, &i, &blk);
            let left = ibin(fx, "subi", &n, &ib);
            let b = ibin(fx, "minsi", &blk, &left);
            let g0 = add(fx, &ib, &ib);
            let g0 = add(fx, &prow, &g0);
            let g_at = add(fx, &g0, &c);
            let u_at = add(fx, &g_at, &b);
            let g = ld(fx, &p, &g_at);
            let u = ld(fx, &p, &u_at);
            let a = fx.fresh();
            fx.open(format!("{a} = scf.index_switch {act_i} -> f32"));
            let cases: [(&str, Act); 4] = [
                ("case 0", math::silu),
                ("case 1", math::gelu_tanh),
                ("case 3", math::sigmoid),
                ("case 4", math::tanh),
            ];
            for (case, f) in cases {
                fx.between(format!("{case} {{"));
                let v = f(fx, Ty::Scalar, &g);
                fx.line(format!("scf.yield {v} : f32"));
                fx.between("}");
            }
            // Code 2 (and anything else the runtime never passes): relu.
            fx.between("default {");
            let z = fx.cf(Ty::Scalar, 0.0);
            let v = fx.bin("maximumf", Ty::Scalar, &g, &z);
            fx.line(format!("scf.yield {v} : f32"));
            fx.close("}");
            let y = fx.mul(Ty::Scalar, &a, &u);
            let o = add(fx, &orow, j);
            st(fx, &y, &out, &o);
        });
    })
}

/// Normalize the row (`out · rms [· gain]`) and/or store `rms` of the final row.
fn row_norm(mut k: Kern) -> Kern {
    let out = k.ptr("out");
    let gain = k.ptr("gain");
    let inv = k.ptr("inv_rms");
    let [n, normalize, eps] = ["n", "normalize", "eps"].map(|x| k.param(x));
    let g = k.param("gain");
    let has_gain = present(&mut k.fx, &g);
    let q = k.param("inv_rms");
    let has_inv = present(&mut k.fx, &q);
    let norm = {
        let zero = c64(&mut k.fx, 0);
        cmp(&mut k.fx, "ne", &normalize, &zero)
    };
    each_row(k, |k, r| {
        let row = mul(&mut k.fx, r, &n);
        let sum_sq = |k: &mut Kern| {
            let tid = k.tid.clone();
            let part = strided_sum(&mut k.fx, &tid, &n, BLOCK, "f32", |fx, j, acc| {
                let at = add(fx, &row, j);
                let v = ld(fx, &out, &at);
                fx.fma(Ty::Scalar, &v, &v, acc)
            });
            let total = block_sum(k, &part, "f32");
            inv_rms_dyn(&mut k.fx, &total, &n, &eps)
        };
        // The condition is uniform, so the barriers inside are reached by the whole block.
        k.fx.open(format!("scf.if {norm} {{"));
        let s = sum_sq(k);
        columns(k, &n, |fx, j| {
            let at = add(fx, &row, j);
            let v = ld(fx, &out, &at);
            let v = fx.mul(Ty::Scalar, &v, &s);
            let v = if_else(
                fx,
                &has_gain,
                "f32",
                |fx| {
                    let gv = ld(fx, &gain, j);
                    fx.mul(Ty::Scalar, &v, &gv)
                },
                |_| v.clone(),
            );
            st(fx, &v, &out, &at);
        });
        k.fx.close("}");
        k.fx.open(format!("scf.if {has_inv} {{"));
        let s = sum_sq(k);
        let fx = &mut k.fx;
        let zero = c64(fx, 0);
        let first = cmp(fx, "eq", &k.tid.clone(), &zero);
        when(fx, &first, |fx| st(fx, &s, &inv, r));
        k.fx.close("}");
    })
}

/// `‖a − b‖ / ‖a‖` (kind 0) or `1 − cos(a, b)` (kind 1) of the row, summed in `f64` as the host.
fn exit_latent(mut k: Kern) -> Kern {
    let value = k.ptr("value");
    let a = k.ptr("a");
    let b = k.ptr("b");
    let [n, kind] = ["n", "kind"].map(|x| k.param(x));
    each_row(k, |k, r| {
        let row = mul(&mut k.fx, r, &n);
        let tid = k.tid.clone();
        let fx = &mut k.fx;
        let s = c64(fx, BLOCK as i64);
        let zero = fx.op("arith.constant 0.0 : f64");
        let init = vec![zero.clone(), zero.clone(), zero.clone(), zero];
        let parts = for_carry(fx, &tid, &n, &s, &init, &["f64"; 4], |fx, j, acc| {
            let at = add(fx, &row, j);
            let x = ld(fx, &a, &at);
            let y = ld(fx, &b, &at);
            let x = fx.op(format!("arith.extf {x} : f32 to f64"));
            let y = fx.op(format!("arith.extf {y} : f32 to f64"));
            let d = fx.op(format!("arith.subf {x}, {y} : f64"));
            let terms = [(&d, &d), (&x, &x), (&y, &y), (&x, &y)];
            terms
                .iter()
                .zip(acc)
                .map(|((u, v), acc)| {
                    let m = fx.op(format!("arith.mulf {u}, {v} : f64"));
                    fx.op(format!("arith.addf {acc}, {m} : f64"))
                })
                .collect()
        });
        let [d, na, nb, dot] = [0, 1, 2, 3].map(|i| block_sum(k, &parts[i], "f64"));
        let fx = &mut k.fx;
        let sqrt = |fx: &mut Fx, v: &str| {
            fx.op(format!(
                "llvm.inline_asm \"sqrt.rn.f64 $0, $1;\", \"=d,d\" {v} : (f64) -> f64"
            ))
        };
        let (sd, sa, sb) = (sqrt(fx, &d), sqrt(fx, &na), sqrt(fx, &nb));
        let z = fx.op("arith.constant 0.0 : f64");
        let one = fx.op("arith.constant 1.0 : f64");
        let inf = fx.op("arith.constant 0x7FF0000000000000 : f64");
        // Cosine: 1 − dot / (‖a‖·‖b‖), 1 when either norm is 0.
        let den = fx.op(format!("arith.mulf {sa}, {sb} : f64"));
        let q = fx.op(format!("arith.divf {dot}, {den} : f64"));
        let cosv = fx.op(format!("arith.subf {one}, {q} : f64"));
        let za = fx.op(format!("arith.cmpf oeq, {na}, {z} : f64"));
        let zb = fx.op(format!("arith.cmpf oeq, {nb}, {z} : f64"));
        let zab = fx.op(format!("arith.ori {za}, {zb} : i1"));
        let cosv = fx.op(format!("arith.select {zab}, {one}, {cosv} : f64"));
        // Latent diff: ‖a − b‖ / ‖a‖; with ‖a‖ = 0, 0 when a = b, else infinity.
        let lat = fx.op(format!("arith.divf {sd}, {sa} : f64"));
        let dz = fx.op(format!("arith.cmpf oeq, {d}, {z} : f64"));
        let degenerate = fx.op(format!("arith.select {dz}, {z}, {inf} : f64"));
        let pos = fx.op(format!("arith.cmpf ogt, {na}, {z} : f64"));
        let lat = fx.op(format!("arith.select {pos}, {lat}, {degenerate} : f64"));
        let zero = c64(fx, 0);
        let is_lat = cmp(fx, "eq", &kind, &zero);
        let v = fx.op(format!("arith.select {is_lat}, {lat}, {cosv} : f64"));
        let first = cmp(fx, "eq", &tid, &zero);
        when(fx, &first, |fx| st64(fx, &v, &value, r));
    })
}

/// `dst[r, :] = src[r, :]` where `mask[r] != 0`.
fn select_rows(mut k: Kern) -> Kern {
    let dst = k.ptr("dst");
    let src = k.ptr("src");
    let mask = k.ptr("mask");
    let n = k.param("n");
    each_row(k, |k, r| {
        let fx = &mut k.fx;
        let m = load(fx, &mask, r, "i32");
        let z = fx.op("arith.constant 0 : i32");
        let on = fx.op(format!("arith.cmpi ne, {m}, {z} : i32"));
        let row = mul(fx, r, &n);
        fx.open(format!("scf.if {on} {{"));
        columns(k, &n, |fx, j| {
            let at = add(fx, &row, j);
            let v = ld(fx, &src, &at);
            st(fx, &v, &dst, &at);
        });
        k.fx.close("}");
    })
}

/// Rotates each head of row `r` in place at position `pos0 + r`, one pair a thread over the
/// row's `n / 2` pairs, with the generated `Rope` kernel's roundings; `style` 1 pairs
/// `(i, i + d/2)`, else `(2i, 2i + 1)`.
fn rope_rows(mut k: Kern) -> Kern {
    let out = k.ptr("out");
    let cos = k.ptr("cos");
    let sin = k.ptr("sin");
    let [n, hd, style, pos0] = ["n", "head_dim", "style", "pos0"].map(|x| k.param(x));
    let fx = &mut k.fx;
    let two = c64(fx, 2);
    let one = c64(fx, 1);
    let half = ibin(fx, "divui", &hd, &two);
    let pairs = ibin(fx, "divui", &n, &two);
    let zero = c64(fx, 0);
    let split = cmp(fx, "ne", &style, &zero);
    each_row(k, |k, r| {
        let fx = &mut k.fx;
        let pos = add(fx, &pos0, r);
        let table_row = mul(fx, &pos, &half);
        let row = mul(fx, r, &n);
        columns(k, &pairs, |fx, e| {
            let h = ibin(fx, "divui", e, &half);
            let i = ibin(fx, "remui", e, &half);
            let ti = add(fx, &table_row, &i);
            let c = ld(fx, &cos, &ti);
            let s = ld(fx, &sin, &ti);
            let head = mul(fx, &h, &hd);
            let head = add(fx, &row, &head);
            // Offsets of the pair within the head.
            let i2 = mul(fx, &i, &two);
            let ia = fx.op(format!("arith.select {split}, {i}, {i2} : i64"));
            let ih = add(fx, &i, &half);
            let i21 = add(fx, &i2, &one);
            let ib = fx.op(format!("arith.select {split}, {ih}, {i21} : i64"));
            let at_a = add(fx, &head, &ia);
            let at_b = add(fx, &head, &ib);
            let a = ld(fx, &out, &at_a);
            let b = ld(fx, &out, &at_b);
            let (a2, b2) = rotate(fx, &a, &b, &c, &s);
            st(fx, &a2, &out, &at_a);
            st(fx, &b2, &out, &at_b);
        });
    })
}

/// The block-wide maximum of an `f32` (NaN-propagating, as `arith.maximumf`), in every thread.
fn block_max(k: &mut Kern, v: &str) -> String {
    let fx = &mut k.fx;
    let width = fx.op("arith.constant 32 : i32");
    let mut w = v.to_string();
    for off in [16, 8, 4, 2, 1] {
        let o = fx.op(format!("arith.constant {off} : i32"));
        let r = fx.fresh();
        fx.line(format!("{r}:2 = gpu.shuffle xor {w}, {o}, {width} : f32"));
        w = fx.op(format!("arith.maximumf {w}, {r}#0 : f32"));
    }
    let (red, ty) = k.shared_buf("%redmax", BLOCK / WARP);
    let tid = k.tid.clone();
    let fx = &mut k.fx;
    let (warp, lane) = divrem_k(fx, &tid, WARP);
    let zero = c64(fx, 0);
    let first = cmp(fx, "eq", &lane, &zero);
    let wi = fx.op(format!("arith.index_cast {warp} : i64 to index"));
    when(fx, &first, |fx| {
        fx.line(format!("memref.store {w}, {red}[{wi}] : {ty}"))
    });
    fx.line("gpu.barrier");
    let mut total = String::new();
    for i in 0..BLOCK / WARP {
        let at = fx.idx(i);
        let x = fx.op(format!("memref.load {red}[{at}] : {ty}"));
        total = if i == 0 {
            x
        } else {
            fx.op(format!("arith.maximumf {total}, {x} : f32"))
        };
    }
    fx.line("gpu.barrier");
    total
}

/// The better of two argmax candidates `(value, index)`, index −1 for none: the greater value,
/// the lower index on ties (so the block's result is the host's first maximum).
fn argmax_pick(fx: &mut Fx, a: (&str, &str), b: (&str, &str)) -> (String, String) {
    let zero = c64(fx, 0);
    let a_none = cmp(fx, "slt", a.1, &zero);
    let b_some = cmp(fx, "sge", b.1, &zero);
    let gt = fx.op(format!("arith.cmpf ogt, {}, {} : f32", b.0, a.0));
    let eq = fx.op(format!("arith.cmpf oeq, {}, {} : f32", b.0, a.0));
    let lower = cmp(fx, "slt", b.1, a.1);
    let tie = fx.op(format!("arith.andi {eq}, {lower} : i1"));
    let better = fx.op(format!("arith.ori {gt}, {tie} : i1"));
    let better = fx.op(format!("arith.ori {a_none}, {better} : i1"));
    let take = fx.op(format!("arith.andi {b_some}, {better} : i1"));
    let v = fx.op(format!("arith.select {take}, {}, {} : f32", b.0, a.0));
    let i = fx.op(format!("arith.select {take}, {}, {} : i64", b.1, a.1));
    (v, i)
}

/// The row's argmax of `logits` (the first maximum, NaNs skipped, 0 when all are NaN), in
/// every thread.
fn block_argmax(k: &mut Kern, logits: &str, row: &str, vocab: &str) -> String {
    let tid = k.tid.clone();
    let fx = &mut k.fx;
    let s = c64(fx, BLOCK as i64);
    let ninf = fx.op("arith.constant 0xFF800000 : f32");
    let none = c64(fx, -1);
    let init = [ninf, none];
    let best = for_carry(fx, &tid, vocab, &s, &init, &["f32", "i64"], |fx, j, acc| {
        let at = add(fx, row, j);
        let v = ld(fx, logits, &at);
        let num = fx.op(format!("arith.cmpf oeq, {v}, {v} : f32"));
        let (bv, bi) = argmax_pick(fx, (&acc[0], &acc[1]), (&v, j));
        let bv = fx.op(format!("arith.select {num}, {bv}, {} : f32", acc[0]));
        let bi = fx.op(format!("arith.select {num}, {bi}, {} : i64", acc[1]));
        vec![bv, bi]
    });
    let width = fx.op("arith.constant 32 : i32");
    let (mut v, mut ix) = (best[0].clone(), best[1].clone());
    for off in [16, 8, 4, 2, 1] {
        let o = fx.op(format!("arith.constant {off} : i32"));
        let rv = fx.fresh();
        fx.line(format!("{rv}:2 = gpu.shuffle xor {v}, {o}, {width} : f32"));
        let ri = fx.fresh();
        fx.line(format!("{ri}:2 = gpu.shuffle xor {ix}, {o}, {width} : i64"));
        (v, ix) = argmax_pick(fx, (&v, &ix), (&format!("{rv}#0"), &format!("{ri}#0")));
    }
    let (sv, tv) = k.shared_buf("%amv", BLOCK / WARP);
    let (si, ti) = k.shared_typed("%ami", BLOCK / WARP, "i64");
    let fx = &mut k.fx;
    let (warp, lane) = divrem_k(fx, &tid, WARP);
    let zero = c64(fx, 0);
    let first = cmp(fx, "eq", &lane, &zero);
    let wi = fx.op(format!("arith.index_cast {warp} : i64 to index"));
    when(fx, &first, |fx| {
        fx.line(format!("memref.store {v}, {sv}[{wi}] : {tv}"));
        fx.line(format!("memref.store {ix}, {si}[{wi}] : {ti}"));
    });
    fx.line("gpu.barrier");
    let (mut bv, mut bi) = (String::new(), String::new());
    for w in 0..BLOCK / WARP {
        let at = fx.idx(w);
        let x = fx.op(format!("memref.load {sv}[{at}] : {tv}"));
        let y = fx.op(format!("memref.load {si}[{at}] : {ti}"));
        (bv, bi) = if w == 0 {
            (x, y)
        } else {
            argmax_pick(fx, (&bv, &bi), (&x, &y))
        };
    }
    fx.line("gpu.barrier");
    let _ = bv;
    let none = cmp(fx, "slt", &bi, &zero);
    fx.op(format!("arith.select {none}, {zero}, {bi} : i64"))
}

fn ld64(fx: &mut Fx, p: &str, at: &str) -> String {
    load(fx, p, at, "f64")
}

fn st_f64(fx: &mut Fx, v: &str, p: &str, at: &str) {
    store(fx, v, p, at, "f64")
}

/// The logit criteria with each row's history on the device, in the host's arithmetic
/// (`exit.rs`): the log-softmax's max in `f32`, its sum and every criterion's sum in `f64`,
/// log-probabilities rounded to `f32` where the host stores them. Sums are block-parallel, so
/// they differ from the host's serial ones by reassociation only (a few ulp of `f64`).
fn exit_logits(mut k: Kern) -> Kern {
    let value = k.ptr("value");
    let logits = k.ptr("logits");
    let prev_logp = k.ptr("prev_logp");
    let prev_h = k.ptr("prev_h");
    let prev_am = k.ptr("prev_am");
    let count = k.ptr("count");
    let active = k.ptr("active");
    let [vocab, kind, first, uniform] = ["vocab", "kind", "first", "uniform"].map(|x| k.param(x));
    let fx = &mut k.fx;
    let zero = c64(fx, 0);
    let is_first = cmp(fx, "ne", &first, &zero);
    let three = c64(fx, 3);
    let four = c64(fx, 4);
    let is_kl = cmp(fx, "sle", &kind, &three);
    let is_minp = cmp(fx, "eq", &kind, &three);
    let is_ent = cmp(fx, "eq", &kind, &four);
    let vf = i64_to_f64(fx, &vocab);
    let one = math64::c(fx, 1.0);
    let inv_v = fx.op(format!("arith.divf {one}, {vf} : f64"));
    each_row(k, |k, r| {
        let fx = &mut k.fx;
        let a = load(fx, &active, r, "i32");
        let z32 = fx.op("arith.constant 0 : i32");
        let on = fx.op(format!("arith.cmpi ne, {a}, {z32} : i32"));
        fx.open(format!("scf.if {on} {{"));
        let row = mul(fx, r, &vocab);
        let tid = k.tid.clone();
        let fx = &mut k.fx;
        let s = c64(fx, BLOCK as i64);
        let ninf = fx.op("arith.constant 0xFF800000 : f32");
        let part = for_carry(fx, &tid, &vocab, &s, &[ninf], &["f32"], |fx, j, acc| {
            let at = add(fx, &row, j);
            let v = ld(fx, &logits, &at);
            vec![fx.op(format!("arith.maximumf {}, {v} : f32", acc[0]))]
        });
        let m = block_max(k, &part[0]);
        let fx = &mut k.fx;
        let part = strided_sum(fx, &tid, &vocab, BLOCK, "f64", |fx, j, acc| {
            let at = add(fx, &row, j);
            let v = ld(fx, &logits, &at);
            let d = fx.op(format!("arith.subf {v}, {m} : f32"));
            let d = fx.op(format!("arith.extf {d} : f32 to f64"));
            let e = math64::exp(fx, &d);
            fx.op(format!("arith.addf {acc}, {e} : f64"))
        });
        let z = block_sum(k, &part, "f64");
        let fx = &mut k.fx;
        let mf = fx.op(format!("arith.extf {m} : f32 to f64"));
        let lnz = math64::ln(fx, &z);
        let lz = fx.op(format!("arith.addf {mf}, {lnz} : f64"));
        // The rounded log-probability of logit `v`.
        let logp = |fx: &mut Fx, v: &str| {
            let x = fx.op(format!("arith.extf {v} : f32 to f64"));
            let l = fx.op(format!("arith.subf {x}, {lz} : f64"));
            fx.op(format!("arith.truncf {l} : f64 to f32"))
        };
        // Min-p: rounding is monotone, so the largest log-probability is the max logit's.
        let mx = logp(fx, &m);
        let mx = fx.op(format!("arith.extf {mx} : f32 to f64"));
        let emx = math64::exp(fx, &mx);
        let tenth = math64::c(fx, 0.1);
        let cut = fx.op(format!("arith.mulf {emx}, {tenth} : f64"));
        let filtered = |fx: &mut Fx, v: &str| {
            let l = logp(fx, v);
            let l = fx.op(format!("arith.extf {l} : f32 to f64"));
            let p = math64::exp(fx, &l);
            let small = fx.op(format!("arith.cmpf olt, {p}, {cut} : f64"));
            fx.op(format!("arith.select {small}, {inv_v}, {p} : f64"))
        };
        let z2 = fx.fresh();
        fx.open(format!("{z2} = scf.if {is_minp} -> (f64) {{"));
        let part = strided_sum(fx, &tid, &vocab, BLOCK, "f64", |fx, j, acc| {
            let at = add(fx, &row, j);
            let v = ld(fx, &logits, &at);
            let p = filtered(fx, &v);
            fx.op(format!("arith.addf {acc}, {p} : f64"))
        });
        let t = block_sum(k, &part, "f64");
        let fx = &mut k.fx;
        fx.line(format!("scf.yield {t} : f64"));
        fx.between("} else {");
        fx.line(format!("scf.yield {one} : f64"));
        fx.close("}");
        // This step's (filtered) log-probability of logit `v`, as the host stores it.
        let cur = |fx: &mut Fx, v: &str| {
            if_else(
                fx,
                &is_minp,
                "f32",
                |fx| {
                    let p = filtered(fx, v);
                    let pf = fx.op(format!("arith.truncf {p} : f64 to f32"));
                    let pd = fx.op(format!("arith.extf {pf} : f32 to f64"));
                    let q = fx.op(format!("arith.divf {pd}, {z2} : f64"));
                    let l = math64::ln(fx, &q);
                    fx.op(format!("arith.truncf {l} : f64 to f32"))
                },
                |fx| logp(fx, v),
            )
        };
        let lead = cmp(fx, "eq", &tid, &zero);
        let val = fx.fresh();
        fx.open(format!("{val} = scf.if {is_kl} -> (f64) {{"));
        // KL(p_{t−1} ‖ p_t) = Σ p_{t−1}·(log p_{t−1} − log p_t); the new distribution replaces
        // the old one column by column (each thread owns its columns).
        let part = strided_sum(fx, &tid, &vocab, BLOCK, "f64", |fx, j, acc| {
            let at = add(fx, &row, j);
            let v = ld(fx, &logits, &at);
            let b = cur(fx, &v);
            let a = if_else(
                fx,
                &is_first,
                "f32",
                |_| uniform.clone(),
                |fx| ld(fx, &prev_logp, &at),
            );
            st(fx, &b, &prev_logp, &at);
            let a = fx.op(format!("arith.extf {a} : f32 to f64"));
            let b = fx.op(format!("arith.extf {b} : f32 to f64"));
            let ea = math64::exp(fx, &a);
            let d = fx.op(format!("arith.subf {a}, {b} : f64"));
            let t = fx.op(format!("arith.mulf {ea}, {d} : f64"));
            fx.op(format!("arith.addf {acc}, {t} : f64"))
        });
        let kl = block_sum(k, &part, "f64");
        let fx = &mut k.fx;
        fx.line(format!("scf.yield {kl} : f64"));
        fx.between("} else {");
        let inner = fx.fresh();
        fx.open(format!("{inner} = scf.if {is_ent} -> (f64) {{"));
        // H = −Σ p·ln(p + 1e-10); the value is |H_t − H_{t−1}|.
        let part = strided_sum(fx, &tid, &vocab, BLOCK, "f64", |fx, j, acc| {
            let at = add(fx, &row, j);
            let v = ld(fx, &logits, &at);
            let l = logp(fx, &v);
            let l = fx.op(format!("arith.extf {l} : f32 to f64"));
            let p = math64::exp(fx, &l);
            let eps = math64::c(fx, 1e-10);
            let pe = fx.op(format!("arith.addf {p}, {eps} : f64"));
            let lp = math64::ln(fx, &pe);
            let t = fx.op(format!("arith.mulf {p}, {lp} : f64"));
            fx.op(format!("arith.addf {acc}, {t} : f64"))
        });
        let sum = block_sum(k, &part, "f64");
        let fx = &mut k.fx;
        let h = fx.op(format!("arith.negf {sum} : f64"));
        let hundred = math64::c(fx, 100.0);
        // Only the lead thread touches the row's history word (and its value is the one stored).
        let d = if_else(
            fx,
            &lead,
            "f64",
            |fx| {
                let prev = if_else(
                    fx,
                    &is_first,
                    "f64",
                    |_| hundred.clone(),
                    |fx| ld64(fx, &prev_h, r),
                );
                st_f64(fx, &h, &prev_h, r);
                let d = fx.op(format!("arith.subf {h}, {prev} : f64"));
                let nd = fx.op(format!("arith.negf {d} : f64"));
                fx.op(format!("arith.maximumf {d}, {nd} : f64"))
            },
            |_| h.clone(),
        );
        fx.line(format!("scf.yield {d} : f64"));
        fx.between("} else {");
        // Argmax stability: the streak of steps whose argmax equals the previous one's.
        let am = block_argmax(k, &logits, &row, &vocab);
        let fx = &mut k.fx;
        let am32 = fx.op(format!("arith.trunci {am} : i64 to i32"));
        let m1 = fx.op("arith.constant -1 : i32");
        let z32 = fx.op("arith.constant 0 : i32");
        let c = if_else(
            fx,
            &lead,
            "i32",
            |fx| {
                let prev = if_else(
                    fx,
                    &is_first,
                    "i32",
                    |_| m1.clone(),
                    |fx| load(fx, &prev_am, r, "i32"),
                );
                let cnt = if_else(
                    fx,
                    &is_first,
                    "i32",
                    |_| z32.clone(),
                    |fx| load(fx, &count, r, "i32"),
                );
                let same = fx.op(format!("arith.cmpi eq, {am32}, {prev} : i32"));
                let one32 = fx.op("arith.constant 1 : i32");
                let inc = fx.op(format!("arith.addi {cnt}, {one32} : i32"));
                let c = fx.op(format!("arith.select {same}, {inc}, {z32} : i32"));
                store(fx, &am32, &prev_am, r, "i32");
                store(fx, &c, &count, r, "i32");
                c
            },
            |_| z32.clone(),
        );
        let c64v = fx.op(format!("arith.extsi {c} : i32 to i64"));
        let cf = i64_to_f64(fx, &c64v);
        fx.line(format!("scf.yield {cf} : f64"));
        fx.close("}");
        fx.line(format!("scf.yield {inner} : f64"));
        fx.close("}");
        when(fx, &lead, |fx| st_f64(fx, &val, &value, r));
        k.fx.close("}");
    })
}

/// `e^x` of an `f32` through `f64`, rounded once: what a correctly rounded `expf` returns.
fn exp_rn(fx: &mut Fx, x: &str) -> String {
    let d = fx.op(format!("arith.extf {x} : f32 to f64"));
    let e = math64::exp(fx, &d);
    fx.op(format!("arith.truncf {e} : f64 to f32"))
}

/// MoR expert choice for one sequence in one block: σ of every row into `gate`, then each
/// row's rank among the active rows (higher σ first, the earlier row on ties) against `k`,
/// or `σ ≥ threshold` for a single row; `gate` becomes `σ·alpha` for the kept rows, 0 else.
fn route_expert(mut k: Kern) -> Kern {
    let keep = k.ptr("keep");
    let gate = k.ptr("gate");
    let z = k.ptr("z");
    let active = k.ptr("active");
    let [rows, kk, threshold, alpha] = ["rows", "k", "threshold", "alpha"].map(|x| k.param(x));
    let tid = k.tid.clone();
    let bid = k.bid.clone();
    let fx = &mut k.fx;
    let zero = c64(fx, 0);
    let one = c64(fx, 1);
    // One block does the whole sequence (the barriers below are reached by all its threads).
    let first_block = cmp(fx, "eq", &bid, &zero);
    fx.open(format!("scf.if {first_block} {{"));
    let one_f = fx.cf(Ty::Scalar, 1.0);
    strided(fx, &tid, &rows, BLOCK, |fx, r| {
        let zr = ld(fx, &z, r);
        let nz = fx.op(format!("arith.negf {zr} : f32"));
        let e = exp_rn(fx, &nz);
        let den = fx.add(Ty::Scalar, &one_f, &e);
        let sig = fx.div(Ty::Scalar, &one_f, &den);
        st(fx, &sig, &gate, r);
    });
    fx.line("gpu.barrier");
    let z32 = fx.op("arith.constant 0 : i32");
    let single = cmp(fx, "eq", &rows, &one);
    // The decisions go to `keep` (each thread its own rows): `gate` is read by every thread
    // until the barrier, and only then becomes `σ·alpha`.
    strided(fx, &tid, &rows, BLOCK, |fx, r| {
        let sig = ld(fx, &gate, r);
        let a = load(fx, &active, r, "i32");
        let on = fx.op(format!("arith.cmpi ne, {a}, {z32} : i32"));
        let by_thr = fx.op(format!("arith.cmpf oge, {sig}, {threshold} : f32"));
        let rank = for_carry(
            fx,
            &zero,
            &rows,
            &one,
            std::slice::from_ref(&zero),
            &["i64"],
            |fx, q, acc| {
                let sq = ld(fx, &gate, q);
                let aq = load(fx, &active, q, "i32");
                let onq = fx.op(format!("arith.cmpi ne, {aq}, {z32} : i32"));
                let gt = fx.op(format!("arith.cmpf ogt, {sq}, {sig} : f32"));
                let eq = fx.op(format!("arith.cmpf oeq, {sq}, {sig} : f32"));
                let before = cmp(fx, "slt", q, r);
                let tie = fx.op(format!("arith.andi {eq}, {before} : i1"));
                let ahead = fx.op(format!("arith.ori {gt}, {tie} : i1"));
                let ahead = fx.op(format!("arith.andi {onq}, {ahead} : i1"));
                let inc = fx.op(format!("arith.extui {ahead} : i1 to i64"));
                vec![add(fx, &acc[0], &inc)]
            },
        );
        let in_k = cmp(fx, "slt", &rank[0], &kk);
        let chosen = fx.op(format!("arith.select {single}, {by_thr}, {in_k} : i1"));
        let kept = fx.op(format!("arith.andi {on}, {chosen} : i1"));
        let kept32 = fx.op(format!("arith.extui {kept} : i1 to i32"));
        store(fx, &kept32, &keep, r, "i32");
    });
    fx.line("gpu.barrier");
    strided(fx, &tid, &rows, BLOCK, |fx, r| {
        let sig = ld(fx, &gate, r);
        let kv = load(fx, &keep, r, "i32");
        let kept = fx.op(format!("arith.cmpi ne, {kv}, {z32} : i32"));
        let g = fx.mul(Ty::Scalar, &sig, &alpha);
        let zf = fx.cf(Ty::Scalar, 0.0);
        let g = fx.op(format!("arith.select {kept}, {g}, {zf} : f32"));
        st(fx, &g, &gate, r);
    });
    fx.close("}");
    k
}

/// MoR token choice per row (one thread: `n` is the number of recursions): the first maximum
/// `d`, `depth = min(d + 1, max(cap, 1))`, `weight = alpha · e^(z_d − max) / Σ e^(z_j − max)`
/// with the sum in column order, as the host.
fn route_token(mut k: Kern) -> Kern {
    let depth = k.ptr("depth");
    let weight = k.ptr("weight");
    let z = k.ptr("z");
    let [n, cap, alpha] = ["n", "cap", "alpha"].map(|x| k.param(x));
    each_row(k, |k, r| {
        let tid = k.tid.clone();
        let fx = &mut k.fx;
        let zero = c64(fx, 0);
        let one = c64(fx, 1);
        let lead = cmp(fx, "eq", &tid, &zero);
        when(fx, &lead, |fx| {
            let row = mul(fx, r, &n);
            let ninf = fx.op("arith.constant 0xFF800000 : f32");
            let mx = for_carry(fx, &zero, &n, &one, &[ninf], &["f32"], |fx, j, acc| {
                let at = add(fx, &row, j);
                let v = ld(fx, &z, &at);
                vec![fx.op(format!("arith.maximumf {}, {v} : f32", acc[0]))]
            });
            let mx = mx[0].clone();
            let zf = fx.cf(Ty::Scalar, 0.0);
            let z0 = ld(fx, &z, &row);
            let init = [zf, zero.clone(), z0];
            let acc = for_carry(
                fx,
                &zero,
                &n,
                &one,
                &init,
                &["f32", "i64", "f32"],
                |fx, j, acc| {
                    let at = add(fx, &row, j);
                    let v = ld(fx, &z, &at);
                    let d = fx.sub(Ty::Scalar, &v, &mx);
                    let e = exp_rn(fx, &d);
                    let sum = fx.add(Ty::Scalar, &acc[0], &e);
                    let gt = fx.op(format!("arith.cmpf ogt, {v}, {} : f32", acc[2]));
                    let bi = fx.op(format!("arith.select {gt}, {j}, {} : i64", acc[1]));
                    let bv = fx.op(format!("arith.select {gt}, {v}, {} : f32", acc[2]));
                    vec![sum, bi, bv]
                },
            );
            let (sum, d, zd) = (&acc[0], &acc[1], &acc[2]);
            let d1 = add(fx, d, &one);
            let capm = ibin(fx, "maxsi", &cap, &one);
            let dep = ibin(fx, "minsi", &d1, &capm);
            let dep32 = fx.op(format!("arith.trunci {dep} : i64 to i32"));
            store(fx, &dep32, &depth, r, "i32");
            let x = fx.sub(Ty::Scalar, zd, &mx);
            let e = exp_rn(fx, &x);
            let w = fx.div(Ty::Scalar, &e, sum);
            let w = fx.mul(Ty::Scalar, &w, &alpha);
            st(fx, &w, &weight, r);
        });
    })
}
