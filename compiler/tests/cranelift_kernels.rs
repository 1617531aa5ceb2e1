//! The Cranelift kernels, compiled to a shared object, loaded and run against f64 references.

use libloading::Library;
use loopc_compiler::backend::cranelift::{compile_kernels, kernel_clif, BackendError};
use loopc_runtime::artifact::{EwIn, EwOp, KernelDecl, KernelSpec, RopeStyle};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

type KernelFn = unsafe extern "C" fn(*const *mut f32, *const i64);

// ---------------------------------------------------------------------------------------------
// Harness

/// splitmix64: a tiny seeded generator, enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// A compiled shared object, loaded.
struct Loaded {
    lib: Library,
    path: PathBuf,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Loaded {
    fn new(decls: &[KernelDecl]) -> Loaded {
        let compiled = compile_kernels(decls).unwrap_or_else(|e| panic!("compile failed: {e}"));
        assert_eq!(compiled.clif.len(), decls.len());
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "loopc-cl-test-{}-{}.so",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, &compiled.shared_object).unwrap();
        let lib = unsafe { Library::new(&path) }.unwrap_or_else(|e| panic!("dlopen failed: {e}"));
        Loaded { lib, path }
    }

    fn kernel(&self, symbol: &str) -> KernelFn {
        unsafe { *self.lib.get::<KernelFn>(symbol.as_bytes()).unwrap() }
    }
}

fn call(k: KernelFn, ptrs: &[*mut f32], begin: usize, end: usize, pos0: usize, kv_len: usize) {
    let ints = [begin as i64, end as i64, pos0 as i64, kv_len as i64];
    unsafe { k(ptrs.as_ptr(), ints.as_ptr()) }
}

/// Run items `0..n` as two calls, `[0, split)` and `[split, n)`, like two runtime threads.
fn call_split(k: KernelFn, ptrs: &[*mut f32], n: usize, split: usize, pos0: usize) {
    let split = split.min(n);
    call(k, ptrs, 0, split, pos0, 0);
    call(k, ptrs, split, n, pos0, 0);
}

fn ptrs_of(bufs: &mut [Vec<f32>]) -> Vec<*mut f32> {
    bufs.iter_mut().map(|b| b.as_mut_ptr()).collect()
}

/// `|got - want| ≤ rel·|want| + abs` everywhere.
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f64], rel: f64, abs: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        let tol = rel * w.abs() + abs;
        assert!(
            err <= tol,
            "{what}: element {i}: got {g}, want {w} (error {err:e} > {tol:e})"
        );
    }
}

fn decl(symbol: &str, spec: KernelSpec) -> KernelDecl {
    KernelDecl {
        symbol: symbol.into(),
        spec,
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn gelu_tanh(x: f64) -> f64 {
    let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
    0.5 * x * (1.0 + u.tanh())
}

/// Evaluate an elementwise kernel in f64.
fn ew_reference(
    rows: usize,
    cols: usize,
    inputs: &[EwIn],
    ops: &[EwOp],
    outputs: &[u32],
    data: &[Vec<f32>],
) -> Vec<Vec<f64>> {
    let mut outs = vec![vec![0.0; rows * cols]; outputs.len()];
    for r in 0..rows {
        for c in 0..cols {
            let mut v: Vec<f64> = Vec::with_capacity(ops.len());
            for op in ops {
                let a = |k: u32| v[k as usize];
                let x = match *op {
                    EwOp::Input(k) => {
                        let d = &data[k as usize];
                        (match inputs[k as usize] {
                            EwIn::Rows => d[r * cols + c],
                            EwIn::Broadcast => d[c],
                            EwIn::PerRow => d[r],
                        }) as f64
                    }
                    EwOp::Const(k) => k as f64,
                    EwOp::Add(x, y) => a(x) + a(y),
                    EwOp::Sub(x, y) => a(x) - a(y),
                    EwOp::Mul(x, y) => a(x) * a(y),
                    EwOp::Div(x, y) => a(x) / a(y),
                    EwOp::Max(x, y) => a(x).max(a(y)),
                    EwOp::Neg(x) => -a(x),
                    EwOp::Exp(x) => a(x).exp(),
                    EwOp::Sigmoid(x) => sigmoid(a(x)),
                    EwOp::Silu(x) => a(x) * sigmoid(a(x)),
                    EwOp::Relu(x) => a(x).max(0.0),
                    EwOp::Tanh(x) => a(x).tanh(),
                    EwOp::GeluTanh(x) => gelu_tanh(a(x)),
                    EwOp::Sqrt(x) => a(x).sqrt(),
                    EwOp::Softplus(x) => a(x).exp().ln_1p(),
                };
                v.push(x);
            }
            for (o, &id) in outs.iter_mut().zip(outputs) {
                o[r * cols + c] = v[id as usize];
            }
        }
    }
    outs
}

/// Input data for `kind`: `lo..hi`, with a few fixed probes mixed into `Rows` inputs.
fn ew_data(
    rng: &mut Rng,
    kind: EwIn,
    rows: usize,
    cols: usize,
    lo: f32,
    hi: f32,
    probes: &[f32],
) -> Vec<f32> {
    let n = match kind {
        EwIn::Rows => rows * cols,
        EwIn::Broadcast => cols,
        EwIn::PerRow => rows,
    };
    let mut d = rng.vec(n, lo, hi);
    if kind == EwIn::Rows {
        for (i, &p) in probes.iter().enumerate() {
            let at = (i * 7919) % n;
            d[at] = p;
        }
    }
    d
}

struct EwCase {
    name: &'static str,
    inputs: Vec<EwIn>,
    ops: Vec<EwOp>,
    outputs: Vec<u32>,
    /// Range of the data, and values planted in it.
    range: (f32, f32),
    probes: Vec<f32>,
    rel: f64,
    abs: f64,
}

fn unary(
    name: &'static str,
    op: fn(u32) -> EwOp,
    range: (f32, f32),
    probes: &[f32],
    rel: f64,
    abs: f64,
) -> EwCase {
    EwCase {
        name,
        inputs: vec![EwIn::Rows],
        ops: vec![EwOp::Input(0), op(0)],
        outputs: vec![1],
        range,
        probes: probes.to_vec(),
        rel,
        abs,
    }
}

fn ew_cases() -> Vec<EwCase> {
    // Values around the polynomial/exp switch of tanh, tiny values, and saturation.
    let wide: Vec<f32> = vec![
        0.0, -0.0, 1e-6, -1e-6, 1e-3, -1e-3, 0.3, -0.3, 0.62, -0.62, 0.63, -0.63, 1.0, -1.0, 5.0,
        -5.0, 9.0, -9.0, 15.0, -15.0, 30.0, -30.0, 80.0, -80.0, 100.0, -100.0,
    ];
    let exp_probes: Vec<f32> = vec![
        0.0, 1e-6, -1e-6, 0.34657, -0.34657, 1.0, -1.0, 20.0, -20.0, 80.0, -80.0, 86.9, -86.9,
    ];
    let mut cases = vec![
        unary("neg", EwOp::Neg, (-10.0, 10.0), &wide, 0.0, 0.0),
        unary("exp", EwOp::Exp, (-30.0, 30.0), &exp_probes, 2e-6, 0.0),
        unary("sigmoid", EwOp::Sigmoid, (-20.0, 20.0), &wide, 2e-6, 1e-30),
        unary("silu", EwOp::Silu, (-20.0, 20.0), &wide, 2e-6, 1e-30),
        unary("relu", EwOp::Relu, (-10.0, 10.0), &wide, 0.0, 0.0),
        unary("tanh", EwOp::Tanh, (-3.0, 3.0), &wide, 2e-6, 1e-30),
        unary("gelu_tanh", EwOp::GeluTanh, (-6.0, 6.0), &wide, 2e-6, 1e-12),
        // Below e^-87 the clamped exp leaves ~1e-38 instead of ~0.
        unary(
            "softplus",
            EwOp::Softplus,
            (-20.0, 20.0),
            &wide,
            2e-6,
            2e-38,
        ),
        unary(
            "sqrt",
            EwOp::Sqrt,
            (0.0, 100.0),
            &[0.0, 1e-6, 1.0, 4.0, 1e6],
            1e-7,
            0.0,
        ),
    ];
    for (name, op) in [
        ("add", EwOp::Add(0, 1) as EwOp),
        ("sub", EwOp::Sub(0, 1)),
        ("mul", EwOp::Mul(0, 1)),
        ("div", EwOp::Div(0, 1)),
        ("max", EwOp::Max(0, 1)),
    ] {
        cases.push(EwCase {
            name,
            inputs: vec![EwIn::Rows, EwIn::Rows],
            ops: vec![EwOp::Input(0), EwOp::Input(1), op],
            outputs: vec![2],
            range: (0.5, 4.0),
            probes: vec![-3.0, 3.0, 0.75],
            rel: 1e-7,
            abs: 0.0,
        });
    }
    // A fused kernel: every input kind, a constant, two outputs, a dead op.
    cases.push(EwCase {
        name: "fused",
        inputs: vec![EwIn::Rows, EwIn::Broadcast, EwIn::PerRow, EwIn::Rows],
        ops: vec![
            EwOp::Input(0),    // 0 x
            EwOp::Input(1),    // 1 bias
            EwOp::Input(2),    // 2 per-row scale
            EwOp::Input(3),    // 3 y
            EwOp::Add(0, 1),   // 4 x + bias
            EwOp::Silu(4),     // 5
            EwOp::Mul(5, 2),   // 6
            EwOp::Sub(6, 3),   // 7 output 0
            EwOp::Exp(3),      // 8 dead
            EwOp::Mul(3, 3),   // 9
            EwOp::Const(1.5),  // 10
            EwOp::Add(9, 10),  // 11 y² + 1.5
            EwOp::Sqrt(11),    // 12
            EwOp::GeluTanh(0), // 13
            EwOp::Div(13, 12), // 14
            EwOp::Tanh(2),     // 15
            EwOp::Max(14, 15), // 16 output 1
            EwOp::Sigmoid(16), // 17 output 2
        ],
        outputs: vec![7, 16, 17],
        range: (-4.0, 4.0),
        probes: vec![80.0, -80.0],
        rel: 1e-5,
        abs: 1e-5,
    });
    cases
}

#[test]
fn elementwise_ops_match_reference() {
    let shapes = [
        (5usize, 1usize),
        (4, 3),
        (3, 7),
        (4, 64),
        (3, 96),
        (3, 130),
        (2, 301),
    ];
    let cases = ew_cases();
    let mut decls = Vec::new();
    for case in &cases {
        for &(_, cols) in &shapes {
            decls.push(decl(
                &format!("ew_{}_{cols}", case.name),
                KernelSpec::Elementwise {
                    cols,
                    inputs: case.inputs.clone(),
                    ops: case.ops.clone(),
                    outputs: case.outputs.clone(),
                },
            ));
        }
    }
    let lib = Loaded::new(&decls);
    let mut rng = Rng(1);
    for case in &cases {
        for &(rows, cols) in &shapes {
            let k = lib.kernel(&format!("ew_{}_{cols}", case.name));
            let data: Vec<Vec<f32>> = case
                .inputs
                .iter()
                .map(|&kind| {
                    ew_data(
                        &mut rng,
                        kind,
                        rows,
                        cols,
                        case.range.0,
                        case.range.1,
                        &case.probes,
                    )
                })
                .collect();
            let want = ew_reference(rows, cols, &case.inputs, &case.ops, &case.outputs, &data);
            let mut bufs = data.clone();
            bufs.extend(case.outputs.iter().map(|_| vec![f32::NAN; rows * cols]));
            let ptrs = ptrs_of(&mut bufs);
            call_split(k, &ptrs, rows, rows / 2, 0);
            for (j, w) in want.iter().enumerate() {
                let got = &bufs[case.inputs.len() + j];
                assert_close(
                    &format!("{} cols={cols} output {j}", case.name),
                    got,
                    w,
                    case.rel,
                    case.abs,
                );
            }
        }
    }
}

#[test]
fn elementwise_large_arguments_saturate_without_nan() {
    let ops = vec![
        EwOp::Input(0),
        EwOp::Sigmoid(0),
        EwOp::Silu(0),
        EwOp::Tanh(0),
        EwOp::GeluTanh(0),
        EwOp::Exp(0),
    ];
    let cols = 12;
    let lib = Loaded::new(&[decl(
        "sat",
        KernelSpec::Elementwise {
            cols,
            inputs: vec![EwIn::Rows],
            ops,
            outputs: vec![1, 2, 3, 4, 5],
        },
    )]);
    let x: Vec<f32> = vec![
        -1e4, -200.0, -100.0, -88.5, -87.5, -80.0, 80.0, 87.5, 88.5, 100.0, 200.0, 1e4,
    ];
    let mut bufs = vec![x.clone()];
    bufs.extend((0..5).map(|_| vec![f32::NAN; cols]));
    let ptrs = ptrs_of(&mut bufs);
    call(lib.kernel("sat"), &ptrs, 0, 1, 0, 0);
    for (i, &v) in x.iter().enumerate() {
        let (sg, si, th, ge, ex) = (bufs[1][i], bufs[2][i], bufs[3][i], bufs[4][i], bufs[5][i]);
        for out in [sg, si, th, ge, ex] {
            assert!(out.is_finite(), "x = {v}: non-finite output {out}");
        }
        let vd = v as f64;
        assert!(
            (sg as f64 - sigmoid(vd)).abs() < 1e-30 + 1e-6 * sigmoid(vd),
            "sigmoid({v}) = {sg}"
        );
        assert!(
            (si as f64 - vd * sigmoid(vd)).abs() < 1e-6 * (1.0 + vd.abs() * sigmoid(vd)),
            "silu({v}) = {si}"
        );
        assert!((th as f64 - vd.tanh()).abs() < 1e-6, "tanh({v}) = {th}");
        assert!(
            (ge as f64 - gelu_tanh(vd)).abs() < 1e-6 * (1.0 + gelu_tanh(vd).abs()),
            "gelu({v}) = {ge}"
        );
        assert!(ex >= 0.0, "exp({v}) = {ex}");
    }
}

#[test]
fn elementwise_in_place_output_may_alias_input() {
    let cols = 37;
    let rows = 3;
    let lib = Loaded::new(&[decl(
        "inplace",
        KernelSpec::Elementwise {
            cols,
            inputs: vec![EwIn::Rows, EwIn::Rows],
            ops: vec![
                EwOp::Input(0),
                EwOp::Input(1),
                EwOp::Add(0, 1),
                EwOp::Mul(0, 1),
            ],
            outputs: vec![2, 3],
        },
    )]);
    let mut rng = Rng(7);
    let mut x = rng.vec(rows * cols, -1.0, 1.0);
    let mut y = rng.vec(rows * cols, -1.0, 1.0);
    let want_sum: Vec<f64> = x
        .iter()
        .zip(&y)
        .map(|(&a, &b)| a as f64 + b as f64)
        .collect();
    let want_prod: Vec<f64> = x
        .iter()
        .zip(&y)
        .map(|(&a, &b)| a as f64 * b as f64)
        .collect();
    // out0 = x (in place), out1 = y (in place).
    let ptrs = [
        x.as_mut_ptr(),
        y.as_mut_ptr(),
        x.as_mut_ptr(),
        y.as_mut_ptr(),
    ];
    call_split(lib.kernel("inplace"), &ptrs, rows, 1, 0);
    assert_close("sum in place", &x, &want_sum, 1e-7, 0.0);
    assert_close("product in place", &y, &want_prod, 1e-7, 0.0);
}

// ---------------------------------------------------------------------------------------------
// RmsNorm

#[test]
fn rmsnorm_matches_reference() {
    let shapes = [1usize, 7, 64, 96, 130, 301];
    let mut decls = Vec::new();
    let variants = [(false, false), (false, true), (true, false), (true, true)];
    for &cols in &shapes {
        for &(residual, gain) in &variants {
            decls.push(decl(
                &format!("rms_{cols}_{residual}_{gain}"),
                KernelSpec::RmsNorm {
                    cols,
                    eps: 1e-5,
                    residual,
                    gain,
                },
            ));
        }
    }
    let lib = Loaded::new(&decls);
    let mut rng = Rng(2);
    let rows = 5;
    for &cols in &shapes {
        for &(residual, gain) in &variants {
            let k = lib.kernel(&format!("rms_{cols}_{residual}_{gain}"));
            let a = rng.vec(rows * cols, -3.0, 3.0);
            let b = rng.vec(rows * cols, -3.0, 3.0);
            let g = rng.vec(cols, 0.5, 1.5);
            let x: Vec<f64> = if residual {
                a.iter()
                    .zip(&b)
                    .map(|(&p, &q)| p as f64 + q as f64)
                    .collect()
            } else {
                a.iter().map(|&p| p as f64).collect()
            };
            let mut want = vec![0.0; rows * cols];
            for r in 0..rows {
                let row = &x[r * cols..(r + 1) * cols];
                let ms = row.iter().map(|v| v * v).sum::<f64>() / cols as f64;
                let inv = 1.0 / (ms + 1e-5f32 as f64).sqrt();
                for c in 0..cols {
                    want[r * cols + c] = row[c] * inv * if gain { g[c] as f64 } else { 1.0 };
                }
            }
            let mut bufs = vec![a.clone()];
            if residual {
                bufs.push(b.clone());
            }
            if gain {
                bufs.push(g.clone());
            }
            if residual {
                bufs.push(vec![f32::NAN; rows * cols]);
            }
            bufs.push(vec![f32::NAN; rows * cols]);
            let ptrs = ptrs_of(&mut bufs);
            call_split(k, &ptrs, rows, 2, 0);
            let what = format!("rmsnorm cols={cols} residual={residual} gain={gain}");
            assert_close(&what, bufs.last().unwrap(), &want, 1e-5, 1e-5);
            if residual {
                assert_close(&format!("{what} sum"), &bufs[bufs.len() - 2], &x, 1e-7, 0.0);
            }
        }
    }
}

#[test]
fn head_rmsnorm_matches_reference() {
    let shapes = [
        (1usize, 1usize),
        (2, 16),
        (4, 16),
        (3, 7),
        (6, 64),
        (2, 130),
    ];
    let eps = f32::EPSILON;
    let decls: Vec<KernelDecl> = shapes
        .iter()
        .map(|&(heads, head_dim)| {
            decl(
                &format!("hrms_{heads}_{head_dim}"),
                KernelSpec::HeadRmsNorm {
                    heads,
                    head_dim,
                    eps,
                },
            )
        })
        .collect();
    let lib = Loaded::new(&decls);
    let mut rng = Rng(5);
    let rows = 5;
    for &(heads, hd) in &shapes {
        let cols = heads * hd;
        let x = rng.vec(rows * cols, -3.0, 3.0);
        let mut want = vec![0.0; rows * cols];
        for (g, chunk) in x.chunks(hd).enumerate() {
            let ms = chunk.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / hd as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for (c, &v) in chunk.iter().enumerate() {
                want[g * hd + c] = v as f64 * inv;
            }
        }
        let mut bufs = vec![x, vec![f32::NAN; rows * cols]];
        let ptrs = ptrs_of(&mut bufs);
        call_split(lib.kernel(&format!("hrms_{heads}_{hd}")), &ptrs, rows, 2, 0);
        assert_close(
            &format!("head_rmsnorm heads={heads} head_dim={hd}"),
            &bufs[1],
            &want,
            1e-5,
            1e-5,
        );
    }
}

#[test]
fn layernorm_matches_reference() {
    let shapes = [1usize, 3, 7, 64, 96, 130, 301];
    let decls: Vec<KernelDecl> = shapes
        .iter()
        .map(|&cols| {
            decl(
                &format!("ln_{cols}"),
                KernelSpec::LayerNorm { cols, eps: 1e-5 },
            )
        })
        .collect();
    let lib = Loaded::new(&decls);
    let mut rng = Rng(21);
    let rows = 5;
    for &cols in &shapes {
        let k = lib.kernel(&format!("ln_{cols}"));
        // An offset mean makes the naive E[x²] − E[x]² formula lose digits; the kernel must not.
        let x: Vec<f32> = rng
            .vec(rows * cols, -3.0, 3.0)
            .iter()
            .map(|v| v + 40.0)
            .collect();
        let g = rng.vec(cols, 0.5, 1.5);
        let b = rng.vec(cols, -0.5, 0.5);
        let mut want = vec![0.0; rows * cols];
        for r in 0..rows {
            let row: Vec<f64> = x[r * cols..(r + 1) * cols]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let mean = row.iter().sum::<f64>() / cols as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / cols as f64;
            let inv = 1.0 / (var + 1e-5f32 as f64).sqrt();
            for c in 0..cols {
                want[r * cols + c] = (row[c] - mean) * inv * g[c] as f64 + b[c] as f64;
            }
        }
        let mut bufs = vec![x.clone(), g.clone(), b.clone(), vec![f32::NAN; rows * cols]];
        let ptrs = ptrs_of(&mut bufs);
        call_split(k, &ptrs, rows, 2, 0);
        // cols = 1 has zero variance: the output is the bias exactly.
        assert_close(
            &format!("layernorm cols={cols}"),
            &bufs[3],
            &want,
            1e-4,
            2e-4,
        );
    }
}

#[test]
fn rmsnorm_residual_sum_may_alias_input() {
    let cols = 45;
    let rows = 2;
    let lib = Loaded::new(&[decl(
        "rms",
        KernelSpec::RmsNorm {
            cols,
            eps: 1e-6,
            residual: true,
            gain: false,
        },
    )]);
    let mut rng = Rng(11);
    let mut a = rng.vec(rows * cols, -2.0, 2.0);
    let mut b = rng.vec(rows * cols, -2.0, 2.0);
    let mut y = vec![0.0f32; rows * cols];
    let x: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(&p, &q)| p as f64 + q as f64)
        .collect();
    let mut want = vec![0.0; rows * cols];
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let inv =
            1.0 / (row.iter().map(|v| v * v).sum::<f64>() / cols as f64 + 1e-6f32 as f64).sqrt();
        for c in 0..cols {
            want[r * cols + c] = row[c] * inv;
        }
    }
    let ptrs = [
        a.as_mut_ptr(),
        b.as_mut_ptr(),
        a.as_mut_ptr(),
        y.as_mut_ptr(),
    ];
    call(lib.kernel("rms"), &ptrs, 0, rows, 0, 0);
    assert_close("aliased sum", &a, &x, 1e-7, 0.0);
    assert_close("aliased y", &y, &want, 1e-5, 1e-5);
}

// ---------------------------------------------------------------------------------------------
// Rope

#[test]
fn rope_matches_reference() {
    let shapes = [
        (1usize, 2usize),
        (2, 6),
        (3, 10),
        (4, 16),
        (2, 96),
        (1, 130),
    ];
    let styles = [(RopeStyle::Interleaved, "il"), (RopeStyle::Half, "half")];
    let mut decls = Vec::new();
    for &(heads, head_dim) in &shapes {
        for &(style, s) in &styles {
            decls.push(decl(
                &format!("rope_{heads}_{head_dim}_{s}"),
                KernelSpec::Rope {
                    heads,
                    head_dim,
                    style,
                },
            ));
        }
    }
    let lib = Loaded::new(&decls);
    let mut rng = Rng(3);
    let rows = 5;
    for &(heads, head_dim) in &shapes {
        for &(style, s) in &styles {
            for pos0 in [0usize, 9] {
                let k = lib.kernel(&format!("rope_{heads}_{head_dim}_{s}"));
                let half = head_dim / 2;
                let positions = pos0 + rows + 3;
                let mut cos = vec![0.0f32; positions * half];
                let mut sin = vec![0.0f32; positions * half];
                for p in 0..positions {
                    for i in 0..half {
                        let theta = p as f64 / 10000f64.powf(2.0 * i as f64 / head_dim as f64);
                        cos[p * half + i] = theta.cos() as f32;
                        sin[p * half + i] = theta.sin() as f32;
                    }
                }
                let x = rng.vec(rows * heads * head_dim, -2.0, 2.0);
                let mut want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
                for r in 0..rows {
                    let p = pos0 + r;
                    for h in 0..heads {
                        let base = (r * heads + h) * head_dim;
                        for i in 0..half {
                            let (ia, ib) = match style {
                                RopeStyle::Interleaved => (base + 2 * i, base + 2 * i + 1),
                                RopeStyle::Half => (base + i, base + i + half),
                            };
                            let (a, b) = (x[ia] as f64, x[ib] as f64);
                            let (c, sn) = (cos[p * half + i] as f64, sin[p * half + i] as f64);
                            want[ia] = a * c - b * sn;
                            want[ib] = b * c + a * sn;
                        }
                    }
                }
                let mut bufs = vec![x, cos, sin];
                let ptrs = ptrs_of(&mut bufs);
                call_split(k, &ptrs, rows, 3, pos0);
                assert_close(
                    &format!("rope {s} heads={heads} head_dim={head_dim} pos0={pos0}"),
                    &bufs[0],
                    &want,
                    1e-6,
                    1e-6,
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention

struct AttnCase {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
}

fn attn_symbol(c: &AttnCase) -> String {
    format!(
        "attn_{}_{}_{}_{}",
        c.heads,
        c.kv_heads,
        c.head_dim,
        c.scale.to_bits()
    )
}

/// Run one attention case; cache rows past `pos0 + rows` hold NaN, so reading past the causal
/// limit of the last row would poison the output.
fn check_attention(
    lib: &Loaded,
    c: &AttnCase,
    rows: usize,
    pos0: usize,
    split: usize,
    rng: &mut Rng,
) {
    let hd = c.head_dim;
    let capacity = pos0 + rows + 5;
    let q = rng.vec(rows * c.heads * hd, -1.0, 1.0);
    let mut kc = rng.vec(capacity * c.kv_heads * hd, -1.0, 1.0);
    let mut vc = rng.vec(capacity * c.kv_heads * hd, -2.0, 2.0);
    for j in pos0 + rows..capacity {
        for e in 0..c.kv_heads * hd {
            kc[j * c.kv_heads * hd + e] = f32::NAN;
            vc[j * c.kv_heads * hd + e] = f32::NAN;
        }
    }
    let group = c.heads / c.kv_heads;
    let mut want = vec![0.0f64; rows * c.heads * hd];
    for r in 0..rows {
        for h in 0..c.heads {
            let g = h / group;
            let qv = &q[(r * c.heads + h) * hd..][..hd];
            let n = pos0 + r + 1;
            let scores: Vec<f64> = (0..n)
                .map(|j| {
                    let kv = &kc[(j * c.kv_heads + g) * hd..][..hd];
                    c.scale as f64
                        * qv.iter()
                            .zip(kv)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let l: f64 = w.iter().sum();
            for d in 0..hd {
                let acc: f64 = (0..n)
                    .map(|j| w[j] * vc[(j * c.kv_heads + g) * hd + d] as f64)
                    .sum();
                want[(r * c.heads + h) * hd + d] = acc / l;
            }
        }
    }
    let mut bufs = vec![q, kc, vc, vec![f32::NAN; rows * c.heads * hd]];
    let ptrs = ptrs_of(&mut bufs);
    call_split(
        lib.kernel(&attn_symbol(c)),
        &ptrs,
        rows * c.heads,
        split,
        pos0,
    );
    assert_close(
        &format!(
            "attention heads={} kv_heads={} head_dim={} scale={} rows={rows} pos0={pos0}",
            c.heads, c.kv_heads, c.head_dim, c.scale
        ),
        &bufs[3],
        &want,
        1e-5,
        1e-5,
    );
}

fn attn_cases() -> Vec<AttnCase> {
    let mut cases = Vec::new();
    for (heads, kv_heads) in [(4, 2), (4, 4), (2, 1), (1, 1)] {
        for head_dim in [16usize, 96, 6, 18, 36] {
            cases.push(AttnCase {
                heads,
                kv_heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            });
        }
    }
    // Large scores: the running maximum moves a lot, exercising the rescaling.
    cases.push(AttnCase {
        heads: 2,
        kv_heads: 1,
        head_dim: 16,
        scale: 4.0,
    });
    cases.push(AttnCase {
        heads: 2,
        kv_heads: 2,
        head_dim: 64,
        scale: 2.0,
    });
    cases
}

#[test]
fn attention_matches_reference() {
    let cases = attn_cases();
    let decls: Vec<KernelDecl> = cases
        .iter()
        .map(|c| {
            decl(
                &attn_symbol(c),
                KernelSpec::Attention {
                    heads: c.heads,
                    kv_heads: c.kv_heads,
                    head_dim: c.head_dim,
                    scale: c.scale,
                },
            )
        })
        .collect();
    let lib = Loaded::new(&decls);
    let mut rng = Rng(4);
    for c in &cases {
        for (rows, pos0) in [(1usize, 0usize), (6, 0), (3, 5), (1, 13), (9, 2)] {
            // Split inside a row, between two heads of the same query row.
            let split = (rows * c.heads) / 2 + 1;
            check_attention(&lib, c, rows, pos0, split, &mut rng);
        }
    }
}

#[test]
fn attention_concurrent_calls_on_disjoint_items() {
    let c = AttnCase {
        heads: 4,
        kv_heads: 2,
        head_dim: 96,
        scale: 0.1,
    };
    let lib = Loaded::new(&[decl(
        &attn_symbol(&c),
        KernelSpec::Attention {
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            scale: c.scale,
        },
    )]);
    let k = lib.kernel(&attn_symbol(&c));
    let (rows, pos0, hd) = (16usize, 20usize, c.head_dim);
    let mut rng = Rng(5);
    let cap = pos0 + rows;
    let mut q = rng.vec(rows * c.heads * hd, -1.0, 1.0);
    let mut kc = rng.vec(cap * c.kv_heads * hd, -1.0, 1.0);
    let mut vc = rng.vec(cap * c.kv_heads * hd, -1.0, 1.0);
    let items = rows * c.heads;
    let mut serial = vec![0.0f32; items * hd];
    let ptrs = [
        q.as_mut_ptr(),
        kc.as_mut_ptr(),
        vc.as_mut_ptr(),
        serial.as_mut_ptr(),
    ];
    call(k, &ptrs, 0, items, pos0, cap);

    let mut parallel = vec![f32::NAN; items * hd];
    let ptrs = [
        q.as_mut_ptr(),
        kc.as_mut_ptr(),
        vc.as_mut_ptr(),
        parallel.as_mut_ptr(),
    ];
    let addrs: Vec<usize> = ptrs.iter().map(|&p| p as usize).collect();
    let threads = 4;
    std::thread::scope(|s| {
        for t in 0..threads {
            let addrs = addrs.clone();
            s.spawn(move || {
                let ptrs: Vec<*mut f32> = addrs.iter().map(|&a| a as *mut f32).collect();
                let (b, e) = (t * items / threads, (t + 1) * items / threads);
                for _ in 0..20 {
                    call(k, &ptrs, b, e, pos0, cap);
                }
            });
        }
    });
    assert_eq!(serial, parallel);
}

// ---------------------------------------------------------------------------------------------
// API behaviour

fn sample_decls() -> Vec<KernelDecl> {
    vec![
        decl(
            "s_rms",
            KernelSpec::RmsNorm {
                cols: 130,
                eps: 1e-6,
                residual: true,
                gain: true,
            },
        ),
        decl(
            "s_rope",
            KernelSpec::Rope {
                heads: 4,
                head_dim: 16,
                style: RopeStyle::Interleaved,
            },
        ),
        decl(
            "s_attn",
            KernelSpec::Attention {
                heads: 4,
                kv_heads: 2,
                head_dim: 96,
                scale: 0.125,
            },
        ),
        decl(
            "s_ew",
            KernelSpec::Elementwise {
                cols: 7,
                inputs: vec![EwIn::Rows, EwIn::Rows],
                ops: vec![
                    EwOp::Input(0),
                    EwOp::Input(1),
                    EwOp::Silu(0),
                    EwOp::Mul(2, 1),
                ],
                outputs: vec![3],
            },
        ),
    ]
}

#[test]
fn kernel_clif_is_deterministic() {
    for d in sample_decls() {
        let a = kernel_clif(&d).unwrap();
        let b = kernel_clif(&d).unwrap();
        assert_eq!(a, b, "{}", d.symbol);
        assert!(
            a.starts_with(&format!("function %{}(i64, i64)", d.symbol)),
            "{a}"
        );
    }
    let a = kernel_clif(&sample_decls()[0]).unwrap();
    let b = kernel_clif(&sample_decls()[1]).unwrap();
    assert_ne!(a, b);
}

#[test]
fn compile_reports_clif_and_object() {
    let decls = sample_decls();
    let out = compile_kernels(&decls).unwrap();
    assert!(out.object.starts_with(b"\x7fELF"));
    assert!(out.shared_object.starts_with(b"\x7fELF"));
    let names: Vec<&str> = out.clif.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(names, ["s_rms", "s_rope", "s_attn", "s_ew"]);
    for (_, text) in &out.clif {
        assert!(text.contains("function"), "{text}");
    }
    // Compiling twice gives the same object.
    assert_eq!(compile_kernels(&decls).unwrap().object, out.object);
    // An empty kernel list still links.
    assert!(compile_kernels(&[])
        .unwrap()
        .shared_object
        .starts_with(b"\x7fELF"));
}

#[test]
fn invalid_specs_are_errors() {
    let bad = [
        KernelSpec::Elementwise {
            cols: 4,
            inputs: vec![EwIn::Rows],
            ops: vec![EwOp::Add(0, 1)],
            outputs: vec![0],
        },
        KernelSpec::HeadRmsNorm {
            heads: 0,
            head_dim: 16,
            eps: 1e-6,
        },
        KernelSpec::HeadRmsNorm {
            heads: 2,
            head_dim: 16,
            eps: f32::NAN,
        },
        KernelSpec::Elementwise {
            cols: 4,
            inputs: vec![EwIn::Rows],
            ops: vec![EwOp::Input(1)],
            outputs: vec![0],
        },
        KernelSpec::Elementwise {
            cols: 4,
            inputs: vec![EwIn::Rows],
            ops: vec![EwOp::Input(0)],
            outputs: vec![3],
        },
        KernelSpec::Elementwise {
            cols: 0,
            inputs: vec![EwIn::Rows],
            ops: vec![EwOp::Input(0)],
            outputs: vec![0],
        },
        KernelSpec::Rope {
            heads: 2,
            head_dim: 7,
            style: RopeStyle::Half,
        },
        KernelSpec::Attention {
            heads: 4,
            kv_heads: 3,
            head_dim: 16,
            scale: 1.0,
        },
        KernelSpec::Attention {
            heads: 4,
            kv_heads: 0,
            head_dim: 16,
            scale: 1.0,
        },
        KernelSpec::RmsNorm {
            cols: 8,
            eps: f32::NAN,
            residual: false,
            gain: false,
        },
    ];
    for spec in bad {
        let d = decl("bad", spec.clone());
        let e = compile_kernels(std::slice::from_ref(&d)).unwrap_err();
        assert!(
            matches!(e, BackendError::InvalidSpec { .. }),
            "{spec:?}: {e}"
        );
        assert!(e.to_string().contains("bad"), "{e}");
        assert!(kernel_clif(&d).is_err());
    }
    let dup = [sample_decls()[0].clone(), sample_decls()[0].clone()];
    assert!(matches!(
        compile_kernels(&dup),
        Err(BackendError::DuplicateSymbol(_))
    ));
}

/// Physical early exit calls rope and attention on compacted rows: one call per run of
/// consecutive positions, items `[i0, i1)` with `pos0 = position(i0) - i0`. Each compacted row
/// must then equal the kernel run alone at its own position.
#[test]
fn compacted_rows_with_shifted_pos0_match_single_rows() {
    let (heads, kv_heads, hd) = (4usize, 2usize, 16usize);
    let decls = vec![
        decl(
            "rope_c",
            KernelSpec::Rope {
                heads,
                head_dim: hd,
                style: RopeStyle::Interleaved,
            },
        ),
        decl(
            "attn_c",
            KernelSpec::Attention {
                heads,
                kv_heads,
                head_dim: hd,
                scale: 0.25,
            },
        ),
    ];
    let lib = Loaded::new(&decls);
    let (rope, attn) = (lib.kernel("rope_c"), lib.kernel("attn_c"));
    let mut rng = Rng(11);
    let positions = [2usize, 3, 7, 8, 9];
    let runs = [(0usize, 2usize), (2, 5)];
    let n = positions.len();
    let (w, kvw) = (heads * hd, kv_heads * hd);
    let cap = 12;
    let half = hd / 2;
    let mut cos = vec![0.0f32; cap * half];
    let mut sin = vec![0.0f32; cap * half];
    for p in 0..cap {
        for i in 0..half {
            let th = p as f64 / 10000f64.powf(2.0 * i as f64 / hd as f64);
            cos[p * half + i] = th.cos() as f32;
            sin[p * half + i] = th.sin() as f32;
        }
    }
    let x = rng.vec(n * w, -1.0, 1.0);
    let kc = rng.vec(cap * kvw, -1.0, 1.0);
    let vc = rng.vec(cap * kvw, -1.0, 1.0);
    // Compacted calls.
    let mut bufs = vec![x.clone(), cos.clone(), sin.clone()];
    let p = ptrs_of(&mut bufs);
    for &(i0, i1) in &runs {
        call(rope, &p, i0, i1, positions[i0] - i0, 0);
    }
    let mut abufs = vec![
        bufs[0].clone(),
        kc.clone(),
        vc.clone(),
        vec![f32::NAN; n * w],
    ];
    let ap = ptrs_of(&mut abufs);
    for &(i0, i1) in &runs {
        call(attn, &ap, i0 * heads, i1 * heads, positions[i0] - i0, 0);
    }
    // One row at a time at its own position.
    for (i, &pos) in positions.iter().enumerate() {
        let mut one = vec![x[i * w..(i + 1) * w].to_vec(), cos.clone(), sin.clone()];
        let op = ptrs_of(&mut one);
        call(rope, &op, 0, 1, pos, 0);
        assert_eq!(
            &bufs[0][i * w..(i + 1) * w],
            &one[0][..],
            "rope row {i} at position {pos}"
        );
        let mut a1 = vec![one[0].clone(), kc.clone(), vc.clone(), vec![f32::NAN; w]];
        let a1p = ptrs_of(&mut a1);
        call(attn, &a1p, 0, heads, pos, 0);
        assert_eq!(
            &abufs[3][i * w..(i + 1) * w],
            &a1[3][..],
            "attention row {i} at position {pos}"
        );
    }
}
