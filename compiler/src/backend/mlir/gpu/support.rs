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
