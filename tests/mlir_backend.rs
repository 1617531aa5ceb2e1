//! The MLIR backend (feature `mlir`), all in one test binary because each binary that links
//! MLIR/LLVM statically is ~230 MB:
//! - every kernel spec, compiled by both backends, agrees to 1e-5 on seeded random shapes and
//!   data (including partial vectors, in-place aliasing and two-call row splits);
//! - the program modules of both example families pass MLIR's verifier in process and parse
//!   in `mlir-opt-22` with the `loop` dialect loaded from its IRDL file;
//! - whole models built with `--backend mlir` match the PyTorch fixtures to 1e-4 (the parity
//!   tests of `tests/parity.rs` and `tests/parity_families.rs`) and the Cranelift build's logits;
//! - both families at seeded random sizes with random weights: MLIR and Cranelift logits agree
//!   to 1e-5.
#![cfg(feature = "mlir")]

mod common;
use common::*;
use libloading::Library;
use loopc_compiler::backend::{cranelift, mlir};
use loopc_compiler::driver::{self, Backend, Options};
use loopc_runtime::artifact::{EwIn, EwOp, KernelDecl, KernelSpec, RopeStyle};
use loopc_runtime::{Artifact, Model, Weights};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

type KernelFn = unsafe extern "C" fn(*const *mut f32, *const i64);

// ---------------------------------------------------------------------------------------------
// Harness

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

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
    fn new(so: &[u8], tag: &str) -> Loaded {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "loopc-mlir-test-{tag}-{}-{}.so",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, so).unwrap();
        let lib = unsafe { Library::new(&path) }.unwrap_or_else(|e| panic!("dlopen failed: {e}"));
        Loaded { lib, path }
    }

    fn kernel(&self, symbol: &str) -> KernelFn {
        unsafe { *self.lib.get::<KernelFn>(symbol.as_bytes()).unwrap() }
    }
}

/// Both backends' builds of the same kernel list.
struct Pair {
    cl: Loaded,
    ml: Loaded,
}

impl Pair {
    fn new(decls: &[KernelDecl]) -> Pair {
        let cl = cranelift::compile_kernels(decls).unwrap_or_else(|e| panic!("cranelift: {e}"));
        let ml = mlir::native::compile_kernels(decls).unwrap_or_else(|e| panic!("mlir: {e}"));
        Pair {
            cl: Loaded::new(&cl.shared_object, "cl"),
            ml: Loaded::new(&ml.shared_object, "ml"),
        }
    }

    /// Run `symbol` of both builds on copies of `bufs` over items `0..n` as two calls split at
    /// `split` (two runtime threads); returns the worst `|Δ| / max(1, |cranelift|)` over all
    /// buffers, and checks it against [`TOL`].
    fn compare(
        &self,
        what: &str,
        symbol: &str,
        bufs: &[Vec<f32>],
        n: usize,
        split: usize,
        pos0: usize,
    ) -> f32 {
        let tol = TOL;
        let run = |lib: &Loaded| {
            let mut b = bufs.to_vec();
            let ptrs: Vec<*mut f32> = b.iter_mut().map(|v| v.as_mut_ptr()).collect();
            let k = lib.kernel(symbol);
            let split = split.min(n);
            for (lo, hi) in [(0, split), (split, n)] {
                let ints = [lo as i64, hi as i64, pos0 as i64, 0];
                unsafe { k(ptrs.as_ptr(), ints.as_ptr()) };
            }
            b
        };
        let want = run(&self.cl);
        let got = run(&self.ml);
        let mut worst = 0.0f32;
        for (k, (w, g)) in want.iter().zip(&got).enumerate() {
            for (i, (&a, &b)) in w.iter().zip(g).enumerate() {
                if a.is_nan() && b.is_nan() {
                    continue;
                }
                let d = (a - b).abs() / a.abs().max(1.0);
                assert!(
                    d <= tol,
                    "{what}: buffer {k} element {i}: cranelift {a}, mlir {b} (|Δ| {d:e} > {tol:e})"
                );
                worst = worst.max(d);
            }
        }
        worst
    }
}

const TOL: f32 = 1e-5;

fn decl(symbol: String, spec: KernelSpec) -> KernelDecl {
    KernelDecl { symbol, spec }
}

fn cols_of(rng: &mut Rng) -> usize {
    // Widths around the 16-lane vectors: below, at, and past chunk boundaries.
    [1, 3, 15, 16, 17, 31, 32, 33, 64, 100, 257][rng.below(11)]
}

// ---------------------------------------------------------------------------------------------
// Kernel agreement

fn unary_ops() -> Vec<fn(u32) -> EwOp> {
    vec![
        EwOp::Neg,
        EwOp::Exp,
        EwOp::Sigmoid,
        EwOp::Silu,
        EwOp::Relu,
        EwOp::Tanh,
        EwOp::GeluTanh,
    ]
}

/// A random elementwise program over `n_in` inputs.
fn random_ops(rng: &mut Rng, n_in: usize, len: usize) -> Vec<EwOp> {
    let mut ops: Vec<EwOp> = (0..n_in as u32).map(EwOp::Input).collect();
    let un = unary_ops();
    while ops.len() < n_in + len {
        let n = ops.len() as u32;
        let a = rng.below(n as usize) as u32;
        let b = rng.below(n as usize) as u32;
        let op = match rng.below(8) {
            0 => EwOp::Add(a, b),
            1 => EwOp::Sub(a, b),
            2 => EwOp::Mul(a, b),
            3 => EwOp::Max(a, b),
            4 => EwOp::Const(rng.uniform(-2.0, 2.0)),
            _ => un[rng.below(un.len())](a),
        };
        ops.push(op);
    }
    ops
}

#[test]
fn elementwise_and_glu_agree_with_cranelift() {
    let mut rng = Rng(11);
    let mut decls = vec![];
    let mut cases = vec![];
    for case in 0..24 {
        let cols = cols_of(&mut rng);
        let kinds = [EwIn::Rows, EwIn::Broadcast, EwIn::PerRow];
        let n_in = 1 + rng.below(3);
        let mut inputs: Vec<EwIn> = (0..n_in).map(|_| kinds[rng.below(3)]).collect();
        inputs[0] = EwIn::Rows;
        let len = 2 + rng.below(8);
        let mut ops = random_ops(&mut rng, n_in, len);
        // Division and sqrt need a safe domain: applied to 1.5 + x².
        let last = ops.len() as u32 - 1;
        ops.push(EwOp::Mul(last, last));
        ops.push(EwOp::Const(1.5));
        ops.push(EwOp::Add(last + 1, last + 2));
        ops.push(EwOp::Sqrt(last + 3));
        ops.push(EwOp::Div(0, last + 4));
        let n = ops.len() as u32;
        let outputs = vec![n - 1, rng.below(n as usize) as u32];
        let sym = format!("ew{case}");
        decls.push(decl(
            sym.clone(),
            KernelSpec::Elementwise {
                cols,
                inputs: inputs.clone(),
                ops,
                outputs: outputs.clone(),
            },
        ));
        cases.push((sym, cols, inputs, outputs.len()));
    }
    for case in 0..6 {
        let cols = cols_of(&mut rng);
        let len = 1 + rng.below(4);
        let mut ops = random_ops(&mut rng, 2, len);
        let n = ops.len() as u32;
        ops.push(EwOp::Mul(n - 1, 1));
        decls.push(decl(format!("glu{case}"), KernelSpec::Glu { cols, ops }));
    }
    // SwiGLU as the optimizer emits it.
    decls.push(decl(
        "swiglu".into(),
        KernelSpec::Glu {
            cols: 40,
            ops: vec![
                EwOp::Input(0),
                EwOp::Input(1),
                EwOp::Silu(0),
                EwOp::Mul(2, 1),
            ],
        },
    ));
    let pair = Pair::new(&decls);
    let mut worst = 0.0f32;
    let rows = 7;
    for (sym, cols, inputs, n_out) in &cases {
        let mut bufs: Vec<Vec<f32>> = inputs
            .iter()
            .map(|k| {
                let n = match k {
                    EwIn::Rows => rows * cols,
                    EwIn::Broadcast => *cols,
                    EwIn::PerRow => rows,
                };
                rng.vec(n, -4.0, 4.0)
            })
            .collect();
        bufs.extend((0..*n_out).map(|_| vec![0.0; rows * cols]));
        worst = worst.max(pair.compare(sym, sym, &bufs, rows, 3, 0));
    }
    for d in &decls[cases.len()..] {
        let KernelSpec::Glu { cols, .. } = d.spec else {
            unreachable!()
        };
        let bufs = vec![rng.vec(rows * 2 * cols, -4.0, 4.0), vec![0.0; rows * cols]];
        worst = worst.max(pair.compare(&d.symbol, &d.symbol, &bufs, rows, 4, 0));
    }
    eprintln!("elementwise/glu: max relative |Δ| = {worst:.2e}");
}

#[test]
fn elementwise_saturates_like_cranelift() {
    let probes = [
        0.0f32, -0.0, 1e-6, 0.62, 0.63, -0.63, 9.0, -9.0, 30.0, -30.0, 80.0, -80.0, 87.5, -87.5,
        100.0, -100.0, 1e30, -1e30,
    ];
    let un = unary_ops();
    let decls: Vec<KernelDecl> = un
        .iter()
        .enumerate()
        .map(|(i, op)| {
            decl(
                format!("sat{i}"),
                KernelSpec::Elementwise {
                    cols: probes.len(),
                    inputs: vec![EwIn::Rows],
                    ops: vec![EwOp::Input(0), op(0)],
                    outputs: vec![1],
                },
            )
        })
        .collect();
    let pair = Pair::new(&decls);
    for d in &decls {
        let bufs = vec![probes.to_vec(), vec![0.0; probes.len()]];
        pair.compare(&d.symbol, &d.symbol, &bufs, 1, 1, 0);
    }
}

#[test]
fn in_place_elementwise_and_residual_norm_agree() {
    // Output 0 aliases input 0 (same pointer twice): chunk loads precede stores.
    let cols = 37;
    let decls = vec![
        decl(
            "inplace".into(),
            KernelSpec::Elementwise {
                cols,
                inputs: vec![EwIn::Rows],
                ops: vec![EwOp::Input(0), EwOp::Silu(0)],
                outputs: vec![1],
            },
        ),
        decl(
            "rmsres".into(),
            KernelSpec::RmsNorm {
                cols,
                eps: 1e-6,
                residual: true,
                gain: true,
            },
        ),
    ];
    let pair = Pair::new(&decls);
    let mut rng = Rng(5);
    let run = |lib: &Loaded,
               sym: &str,
               ptr_of: &dyn Fn(&mut [Vec<f32>]) -> Vec<*mut f32>,
               bufs: &mut Vec<Vec<f32>>| {
        let ptrs = ptr_of(bufs);
        let ints = [0i64, 4, 0, 0];
        unsafe { lib.kernel(sym)(ptrs.as_ptr(), ints.as_ptr()) };
    };
    let x = rng.vec(4 * cols, -3.0, 3.0);
    let alias: &dyn Fn(&mut [Vec<f32>]) -> Vec<*mut f32> =
        &|b| vec![b[0].as_mut_ptr(), b[0].as_mut_ptr()];
    let mut a = vec![x.clone()];
    let mut b = vec![x.clone()];
    run(&pair.cl, "inplace", alias, &mut a);
    run(&pair.ml, "inplace", alias, &mut b);
    for (p, q) in a[0].iter().zip(&b[0]) {
        assert!(
            (p - q).abs() <= TOL * p.abs().max(1.0),
            "in place: {p} vs {q}"
        );
    }
    // RMSNorm with the residual sum written over `a` ([a, b, gain, sum = a, y]).
    let g = rng.vec(cols, 0.5, 1.5);
    let r = rng.vec(4 * cols, -3.0, 3.0);
    let alias: &dyn Fn(&mut [Vec<f32>]) -> Vec<*mut f32> = &|b| {
        vec![
            b[0].as_mut_ptr(),
            b[1].as_mut_ptr(),
            b[2].as_mut_ptr(),
            b[0].as_mut_ptr(),
            b[3].as_mut_ptr(),
        ]
    };
    let mut a = vec![x.clone(), r.clone(), g.clone(), vec![0.0; 4 * cols]];
    let mut b = a.clone();
    run(&pair.cl, "rmsres", alias, &mut a);
    run(&pair.ml, "rmsres", alias, &mut b);
    for k in [0, 3] {
        for (p, q) in a[k].iter().zip(&b[k]) {
            assert!(
                (p - q).abs() <= TOL * p.abs().max(1.0),
                "rmsnorm alias: {p} vs {q}"
            );
        }
    }
}

#[test]
fn norms_agree_with_cranelift() {
    let mut rng = Rng(21);
    let mut decls = vec![];
    for case in 0..16 {
        let cols = cols_of(&mut rng);
        let eps = [1e-6, 1e-5][rng.below(2)];
        let spec = match case % 5 {
            0..=3 => KernelSpec::RmsNorm {
                cols,
                eps,
                residual: case % 2 == 1,
                gain: case % 4 < 2,
            },
            _ => KernelSpec::LayerNorm { cols, eps },
        };
        decls.push(decl(format!("norm{case}"), spec));
    }
    let pair = Pair::new(&decls);
    let rows = 6;
    let mut worst = 0.0f32;
    for d in &decls {
        let bufs: Vec<Vec<f32>> = match d.spec {
            KernelSpec::RmsNorm {
                cols,
                residual,
                gain,
                ..
            } => {
                let mut b = vec![rng.vec(rows * cols, -3.0, 3.0)];
                if residual {
                    b.push(rng.vec(rows * cols, -3.0, 3.0));
                }
                if gain {
                    b.push(rng.vec(cols, 0.5, 1.5));
                }
                if residual {
                    b.push(vec![0.0; rows * cols]);
                }
                b.push(vec![0.0; rows * cols]);
                b
            }
            KernelSpec::LayerNorm { cols, .. } => {
                // An offset mean: the two-pass variance must not cancel.
                let x: Vec<f32> = rng
                    .vec(rows * cols, -1.0, 1.0)
                    .iter()
                    .map(|v| v + 20.0)
                    .collect();
                vec![
                    x,
                    rng.vec(cols, 0.5, 1.5),
                    rng.vec(cols, -1.0, 1.0),
                    vec![0.0; rows * cols],
                ]
            }
            _ => unreachable!(),
        };
        worst = worst.max(pair.compare(&d.symbol, &d.symbol, &bufs, rows, 2, 0));
    }
    eprintln!("norms: max relative |Δ| = {worst:.2e}");
}

fn rope_tables(positions: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = vec![0.0f32; positions * half];
    let mut sin = vec![0.0f32; positions * half];
    for p in 0..positions {
        for i in 0..half {
            let theta = p as f64 / 10000f64.powf(2.0 * i as f64 / head_dim as f64);
            cos[p * half + i] = theta.cos() as f32;
            sin[p * half + i] = theta.sin() as f32;
        }
    }
    (cos, sin)
}

#[test]
fn rope_agrees_with_cranelift() {
    let mut rng = Rng(31);
    let mut decls = vec![];
    for case in 0..16 {
        let heads = 1 + rng.below(4);
        let head_dim = 2 * [1, 3, 8, 15, 16, 17, 24, 32, 40, 64][rng.below(10)];
        let style = [RopeStyle::Interleaved, RopeStyle::Half][case % 2];
        let spec = if case % 4 < 2 {
            KernelSpec::Rope {
                heads,
                head_dim,
                style,
            }
        } else {
            KernelSpec::RopeBias {
                heads,
                head_dim,
                style,
            }
        };
        decls.push(decl(format!("rope{case}"), spec));
    }
    let pair = Pair::new(&decls);
    let rows = 5;
    let mut worst = 0.0f32;
    for d in &decls {
        let (heads, head_dim, bias) = match d.spec {
            KernelSpec::Rope {
                heads, head_dim, ..
            } => (heads, head_dim, false),
            KernelSpec::RopeBias {
                heads, head_dim, ..
            } => (heads, head_dim, true),
            _ => unreachable!(),
        };
        for pos0 in [0, 9] {
            let (cos, sin) = rope_tables(pos0 + rows + 2, head_dim);
            let mut bufs = vec![rng.vec(rows * heads * head_dim, -2.0, 2.0)];
            if bias {
                bufs.push(rng.vec(heads * head_dim, -1.0, 1.0));
            }
            bufs.push(cos);
            bufs.push(sin);
            worst = worst.max(pair.compare(&d.symbol, &d.symbol, &bufs, rows, 2, pos0));
        }
    }
    eprintln!("rope: max relative |Δ| = {worst:.2e}");
}

#[test]
fn attention_agrees_with_cranelift() {
    let mut rng = Rng(41);
    let mut decls = vec![];
    let mut shapes = vec![];
    for case in 0..12 {
        let kv_heads = 1 + rng.below(3);
        let heads = kv_heads * (1 + rng.below(3));
        let head_dim = [4, 8, 15, 16, 17, 32, 48, 64, 80, 128][rng.below(10)];
        let scale = 1.0 / (head_dim as f32).sqrt();
        decls.push(decl(
            format!("attn{case}"),
            KernelSpec::Attention {
                heads,
                kv_heads,
                head_dim,
                scale,
            },
        ));
        shapes.push((heads, kv_heads, head_dim));
    }
    let pair = Pair::new(&decls);
    let mut worst = 0.0f32;
    for (d, &(heads, kv_heads, head_dim)) in decls.iter().zip(&shapes) {
        for (rows, pos0) in [(1usize, 0usize), (5, 0), (1, 13), (3, 30)] {
            let cap = pos0 + rows;
            let kv = kv_heads * head_dim;
            let q = rng.vec(rows * heads * head_dim, -2.0, 2.0);
            let k = rng.vec(cap * kv, -2.0, 2.0);
            let v = rng.vec(cap * kv, -2.0, 2.0);
            let bufs = vec![q, k, v, vec![0.0; rows * heads * head_dim]];
            let what = format!("{} rows={rows} pos0={pos0}", d.symbol);
            let n = rows * heads;
            worst = worst.max(pair.compare(&what, &d.symbol, &bufs, n, n / 2, pos0));
        }
    }
    eprintln!("attention: max relative |Δ| = {worst:.2e}");
}

// ---------------------------------------------------------------------------------------------
// Modules of the example families

fn options(config: &str, set: &[&str], backend: Backend) -> Options {
    Options {
        set: set.iter().map(|s| s.to_string()).collect(),
        config: Some(fixture(config)),
        opt_level: 1,
        verify: true,
        backend,
        ..Default::default()
    }
}

const FAMILIES: &[(&str, &str, &[&str])] = &[
    ("huginn", "huginn_tiny/config.json", &["init_scale=0"]),
    ("ouro", "ouro_tiny/config.json", &[]),
    ("ltg", "ltg_tiny/config.json", &["positions=1", "inject=1"]),
];

fn example(name: &str) -> PathBuf {
    root().join("examples").join(format!("{name}.loop"))
}

#[test]
fn stage_mlir_verifies_and_parses_in_mlir_opt() {
    let opt = std::env::var("LOOPC_MLIR_OPT").unwrap_or_else(|_| "mlir-opt-22".into());
    let irdl = root().join("dialects/mlir/loop.irdl.mlir");
    for (name, cfg, set) in FAMILIES {
        let o = options(cfg, set, Backend::Mlir);
        // `stage_text` verifies the module in process (the `mlir` feature is on).
        let text = driver::stage_text(&example(name), "mlir", &o).unwrap();
        assert!(text.contains("\"loop.recur\""), "{name}: no recurrence");
        let path = std::env::temp_dir().join(format!("loopc-{name}-{}.mlir", std::process::id()));
        std::fs::write(&path, &text).unwrap();
        let out = std::process::Command::new(&opt)
            .arg(format!("--irdl-file={}", irdl.display()))
            .arg("--verify-each")
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {opt}: {e} (install: scripts/install-llvm.sh)"));
        let _ = std::fs::remove_file(&path);
        assert!(
            out.status.success(),
            "{opt} rejects the {name} module:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The round trip through mlir-opt keeps every loop op.
        let printed = String::from_utf8_lossy(&out.stdout);
        for op in [
            "loop.recur",
            "loop.kernel",
            "loop.kv_slot",
            "loop.exit",
            "loop.matmul",
        ] {
            assert_eq!(
                printed.matches(op).count(),
                text.matches(op).count(),
                "{name}: `{op}` count changed through mlir-opt"
            );
        }
        // loopc's own rewrite turns the recurrence into upstream `scf.for` over the body.
        let scf = mlir::rewrite::lower_recur_text(&text).unwrap();
        assert!(!scf.contains("\"loop.recur\""), "{name}: loop.recur left");
        assert!(scf.contains("scf.for"), "{name}: no scf.for");
        assert!(
            scf.contains("call @recur_body("),
            "{name}: the body is not called"
        );
        assert!(
            scf.contains("memref.copy"),
            "{name}: the state is not carried"
        );
        if std::env::var_os("LOOPC_SHOW_SCF").is_some() {
            eprintln!("{scf}");
        }
        // The lowered form is LLVM dialect only.
        let llvm = driver::stage_text(&example(name), "llvm", &o).unwrap();
        // Op names (after `%x = ` if any); `llvm.intr.vector.reduce.*` is fine.
        let ops: Vec<&str> = llvm
            .lines()
            .map(|l| {
                let l = l.trim_start();
                l.split_once(" = ").map_or(l, |(_, r)| r)
            })
            .collect();
        assert!(ops.iter().any(|o| o.starts_with("llvm.")), "{name}: {llvm}");
        for dialect in [
            "vector.", "scf.", "memref.", "arith.", "math.", "func.", "cf.",
        ] {
            if let Some(o) = ops.iter().find(|o| o.starts_with(dialect)) {
                panic!("{name}: `{o}` left after lowering");
            }
        }
    }
}

/// The Rust builders of the `loop` ops (`mlir::loop_ops`) make, for every family, exactly the
/// module that parsing the text emitter's `--stage mlir` form makes (MLIR prints both, value
/// numbering included), the built module verifies against the IRDL dialect, and loopc's own
/// rewrite lowers its recurrence.
#[test]
fn loop_op_builders_make_the_emitted_structure() {
    use mlir::melior::ir::operation::OperationLike;
    use mlir::melior::ir::BlockLike;
    let families: &[(&str, &str, &[&str])] = &[
        ("huginn", "huginn_tiny/config.json", &["init_scale=0"]),
        ("ouro", "ouro_tiny/config.json", &[]),
        ("ltg", "ltg_tiny/config.json", &["positions=1", "inject=1"]),
        ("parcae", "parcae_tiny/config.json", &["init_scale=0"]),
        ("mor", "mor_tiny/config.json", &["routing=1", "sharing=2"]),
        ("ut", "ut_tiny/config.json", &[]),
    ];
    let m = mlir::native::Mlir::new().unwrap();
    for (name, cfg, set) in families {
        let built = driver::build(&example(name), &options(cfg, set, Backend::Cranelift))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let manifest = &built.manifest;
        let text = mlir::program_module(manifest, false).unwrap();
        let parsed = m.parse(&text, name).unwrap();
        let mut from_builders = mlir::loop_ops::structure_module(&m, manifest)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            from_builders.as_operation().to_string(),
            parsed.as_operation().to_string(),
            "{name}: the builders and the text emitter disagree"
        );
        assert!(from_builders.as_operation().verify(), "{name}");
        assert_eq!(m.lower_recur(&mut from_builders).unwrap(), 1, "{name}");
    }
    // The dialect's constraints apply to built ops: a variadic kernel operand must be unranked.
    let ops = mlir::loop_ops::LoopOps::new(&m.context);
    let module = mlir::melior::ir::Module::new(ops.location);
    let buf = module.body().append_operation(
        ops.buffer(0, "x", ops.ty("memref<?x4xf32>").unwrap())
            .unwrap(),
    );
    let x = buf.result(0).unwrap().into();
    module
        .body()
        .append_operation(ops.kernel("k", "elementwise", &[x]).unwrap());
    assert!(
        !module.as_operation().verify(),
        "a ranked variadic operand passed"
    );
}

#[test]
fn a_broken_module_is_reported_with_mlir_diagnostics() {
    // A `loop` op with an operand of the wrong kind: IRDL's constraint rejects it.
    let bad = r#"module {
  func.func @f(%x: i32) {
    "loop.copy"(%x, %x) : (i32, i32) -> ()
    return
  }
}"#;
    let e = mlir::native::verify(bad).unwrap_err().to_string();
    assert!(e.contains("loop.copy") && e.contains("memref"), "{e}");
    // And an upstream type error.
    let bad = "module { func.func @f() { %0 = arith.constant 1.0 : f32\n %1 = arith.addi %0, %0 : f32\n return } }";
    let e = mlir::native::verify(bad).unwrap_err().to_string();
    assert!(e.contains("arith.addi"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Whole models

fn build(example_name: &str, config: &str, set: &[&str], backend: Backend) -> Artifact {
    let built = driver::build(&example(example_name), &options(config, set, backend))
        .unwrap_or_else(|e| panic!("build of {example_name} ({backend:?}) failed:\n{e}"));
    assert_eq!(built.manifest.backend, backend.name());
    Artifact::from_bytes(built.artifact_bytes()).unwrap()
}

fn model(example_name: &str, config: &str, weights: &str, set: &[&str], b: Backend) -> Model {
    Model::new(
        build(example_name, config, set, b),
        Weights::open(fixture(weights)).unwrap(),
    )
    .unwrap()
}

/// Prefill and decode logits of a fixture case.
fn run_case(m: &Model, case: &str, steps: usize) -> (Vec<f32>, Vec<f32>) {
    let f = fixture(case);
    let mut s = m.session();
    s.set_steps(Some(steps));
    let pre = s
        .prefill(&ids(&read(&f, "prompt")))
        .unwrap()
        .data()
        .to_vec();
    let mut dec = vec![];
    for &t in &ids(&read(&f, "decode_tokens")) {
        dec.extend_from_slice(s.step(t).unwrap().data());
    }
    (pre, dec)
}

fn parity(example_name: &str, cfg: &str, weights: &str, case: &str, steps: usize, set: &[&str]) {
    let ml = model(example_name, cfg, weights, set, Backend::Mlir);
    let cl = model(example_name, cfg, weights, set, Backend::Cranelift);
    let f = fixture(case);
    let (pre, dec) = run_case(&ml, case, steps);
    let d_pre = max_abs_diff(&pre, &read(&f, "prefill_logits").f32);
    let d_dec = max_abs_diff(&dec, &read(&f, "decode_logits").f32);
    let (cpre, cdec) = run_case(&cl, case, steps);
    let d_cl = max_abs_diff(&pre, &cpre).max(max_abs_diff(&dec, &cdec));
    eprintln!(
        "mlir parity {case} r={steps}: prefill {d_pre:.2e}, decode {d_dec:.2e}; vs cranelift {d_cl:.2e}"
    );
    assert!(d_pre <= 1e-4, "{case}: prefill max |Δ| = {d_pre:e}");
    assert!(d_dec <= 1e-4, "{case}: decode max |Δ| = {d_dec:e}");
    assert!(d_cl <= 1e-4, "{case}: MLIR vs Cranelift max |Δ| = {d_cl:e}");
}

#[test]
fn huginn_parity_with_mlir_backend() {
    for (case, steps) in [("r1", 1), ("r4", 4), ("r7", 7)] {
        parity(
            "huginn",
            "huginn_tiny/config.json",
            "huginn_tiny/model.safetensors",
            &format!("huginn_tiny/{case}.safetensors"),
            steps,
            &["init_scale=0"],
        );
    }
}

/// The third family (looped GPT-2: LayerNorm, GELU, biases, positions) with its fixture's
/// `inject`/`positions` variant.
#[test]
fn ltg_parity_with_mlir_backend() {
    for case in ["learned_inject_r3", "sinusoidal_r2", "nope_inject_r4"] {
        let f = fixture(&format!("ltg_tiny/{case}.safetensors"));
        let iters = read(&f, "iterations").i64[0] as usize;
        let set = [
            format!("inject={}", read(&f, "inject").i64[0]),
            format!("positions={}", read(&f, "positions").i64[0]),
        ];
        let set: Vec<&str> = set.iter().map(|s| s.as_str()).collect();
        parity(
            "ltg",
            "ltg_tiny/config.json",
            "ltg_tiny/model.safetensors",
            &format!("ltg_tiny/{case}.safetensors"),
            iters,
            &set,
        );
    }
}

#[test]
fn ouro_parity_with_mlir_backend() {
    parity(
        "ouro",
        "ouro_tiny/config.json",
        "ouro_tiny/model.safetensors",
        "ouro_tiny/t4.safetensors",
        4,
        &[],
    );
}

// ---------------------------------------------------------------------------------------------
// Speed (run by hand: `cargo test --features mlir --test mlir_backend -- --ignored --nocapture`)

/// Median seconds of `f` over `reps` runs after a warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = std::time::Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[reps / 2]
}

/// The kernels of the Huginn d=1024 config (bench/huginn_d1024.json) on one thread, both
/// backends; and the build time of that model with each.
#[test]
#[ignore]
fn kernel_speed_and_build_time_d1024() {
    let d = 1024;
    let ffn = 2816;
    let (heads, hd) = (16, 64);
    let decls = vec![
        decl(
            "rms".into(),
            KernelSpec::RmsNorm {
                cols: d,
                eps: 1e-6,
                residual: true,
                gain: true,
            },
        ),
        decl(
            "glu".into(),
            KernelSpec::Glu {
                cols: ffn,
                ops: vec![
                    EwOp::Input(0),
                    EwOp::Input(1),
                    EwOp::Silu(0),
                    EwOp::Mul(2, 1),
                ],
            },
        ),
        decl(
            "rope".into(),
            KernelSpec::RopeBias {
                heads,
                head_dim: hd,
                style: RopeStyle::Half,
            },
        ),
        decl(
            "attn".into(),
            KernelSpec::Attention {
                heads,
                kv_heads: heads,
                head_dim: hd,
                scale: 0.125,
            },
        ),
    ];
    let pair = Pair::new(&decls);
    if let Some(path) = std::env::var_os("LOOPC_DUMP_MLIR_SO") {
        // For inspecting the generated code (`objdump -d`).
        let so = mlir::native::compile_kernels(&decls).unwrap().shared_object;
        std::fs::write(path, so).unwrap();
    }
    let mut rng = Rng(1);
    let rows = 128;
    let (cos, sin) = rope_tables(rows + 1, hd);
    // (kernel, buffers, items, pos0, bytes moved or flops)
    type Case<'a> = (&'a str, Vec<Vec<f32>>, usize, usize, f64);
    let cases: Vec<Case> = vec![
        (
            "rms",
            vec![
                rng.vec(rows * d, -1.0, 1.0),
                rng.vec(rows * d, -1.0, 1.0),
                rng.vec(d, 0.5, 1.5),
                vec![0.0; rows * d],
                vec![0.0; rows * d],
            ],
            rows,
            0,
            (5 * rows * d * 4) as f64,
        ),
        (
            "glu",
            vec![rng.vec(rows * 2 * ffn, -3.0, 3.0), vec![0.0; rows * ffn]],
            rows,
            0,
            (3 * rows * ffn * 4) as f64,
        ),
        (
            "rope",
            vec![
                rng.vec(rows * d, -1.0, 1.0),
                rng.vec(d, -1.0, 1.0),
                cos.clone(),
                sin.clone(),
            ],
            rows,
            0,
            (2 * rows * d * 4) as f64,
        ),
        (
            "attn",
            vec![
                rng.vec(rows * d, -1.0, 1.0),
                rng.vec(rows * d, -1.0, 1.0),
                rng.vec(rows * d, -1.0, 1.0),
                vec![0.0; rows * d],
            ],
            rows * heads,
            0,
            // Causal prefill: 4·hd flops per (query, key) pair and head.
            (4 * hd * heads * rows * (rows + 1) / 2) as f64,
        ),
    ];
    for (sym, bufs, n, pos0, work) in &cases {
        let mut secs = vec![];
        for lib in [&pair.cl, &pair.ml] {
            let k = lib.kernel(sym);
            let mut b = bufs.clone();
            let ptrs: Vec<*mut f32> = b.iter_mut().map(|v| v.as_mut_ptr()).collect();
            let ints = [0i64, *n as i64, *pos0 as i64, 0];
            secs.push(time(21, || unsafe { k(ptrs.as_ptr(), ints.as_ptr()) }));
        }
        let unit = if *sym == "attn" { "GFLOP/s" } else { "GB/s" };
        eprintln!(
            "{sym:>5} prefill-{rows}: cranelift {:8.1} µs ({:6.1} {unit}), mlir {:8.1} µs ({:6.1} {unit}), mlir/cranelift speed {:.2}",
            secs[0] * 1e6,
            work / secs[0] / 1e9,
            secs[1] * 1e6,
            work / secs[1] / 1e9,
            secs[0] / secs[1]
        );
    }
    // Decode attention: one query row at position 511 over a 512-row cache.
    let cap = 512;
    let bufs = [
        rng.vec(d, -1.0, 1.0),
        rng.vec(cap * d, -1.0, 1.0),
        rng.vec(cap * d, -1.0, 1.0),
        vec![0.0; d],
    ];
    let mut secs = vec![];
    for lib in [&pair.cl, &pair.ml] {
        let k = lib.kernel("attn");
        let mut b = bufs.to_vec();
        let ptrs: Vec<*mut f32> = b.iter_mut().map(|v| v.as_mut_ptr()).collect();
        let ints = [0i64, heads as i64, cap as i64 - 1, 0];
        secs.push(time(51, || unsafe { k(ptrs.as_ptr(), ints.as_ptr()) }));
    }
    eprintln!(
        " attn decode@512: cranelift {:.1} µs, mlir {:.1} µs, mlir/cranelift speed {:.2}",
        secs[0] * 1e6,
        secs[1] * 1e6,
        secs[0] / secs[1]
    );

    let path = root().join("examples/huginn.loop");
    for backend in [Backend::Cranelift, Backend::Mlir] {
        let o = Options {
            config: Some(root().join("bench/huginn_d1024.json")),
            opt_level: 1,
            backend,
            ..Default::default()
        };
        let t = time(3, || {
            driver::build(&path, &o).unwrap();
        });
        eprintln!("build huginn d1024 with {}: {:.3} s", backend.name(), t);
    }
}

// ---------------------------------------------------------------------------------------------
// Whole models at random sizes

/// Both example families at seeded random sizes (odd head sizes, grouped KV heads, widths that
/// are not multiples of the vector length) with random weights: the MLIR build's logits match
/// the Cranelift build's, prefill (up to 40 tokens, so through the MLIR GEMM) and decode.
#[test]
fn random_sized_models_agree_with_cranelift() {
    let mut rng = Rng(77);
    for case in 0..6 {
        let family = ["huginn", "ouro"][case % 2];
        let heads = [1, 2, 3, 4][rng.below(4)];
        let head_dim = [6, 8, 12, 18, 20, 32][rng.below(6)];
        let dim = heads * head_dim;
        let ffn = [24, 40, 100][rng.below(3)];
        let vocab = [50, 97][rng.below(2)];
        let steps = 1 + rng.below(4);
        let mut set = vec![
            format!("dim={dim}"),
            format!("heads={heads}"),
            format!("ffn={ffn}"),
            format!("vocab={vocab}"),
            format!("steps={steps}"),
        ];
        if family == "huginn" {
            set.extend([
                "init_scale=0".into(),
                "n_prelude=1".into(),
                "n_core=2".into(),
            ]);
            set.push("n_coda=1".into());
        } else {
            let kv = [1, heads][rng.below(2)];
            set.extend([
                format!("kv_heads={kv}"),
                format!("head_dim={head_dim}"),
                "layers=2".into(),
            ]);
        }
        let set: Vec<&str> = set.iter().map(|s| s.as_str()).collect();
        let opts = |backend| Options {
            set: set.iter().map(|s| s.to_string()).collect(),
            opt_level: 1,
            verify: true,
            backend,
            ..Default::default()
        };
        let built: Vec<_> = [Backend::Cranelift, Backend::Mlir]
            .into_iter()
            .map(|b| {
                driver::build(&example(family), &opts(b))
                    .unwrap_or_else(|e| panic!("{family} {set:?}: {e}"))
            })
            .collect();
        // Random weights for every declared tensor, scaled by 1/√fan-in like a trained model
        // (with ±0.3 regardless of width a d=128 stack amplifies rounding differences by ~10³
        // over a few iterations, in either backend); norm gains near 1.
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = built[0]
            .manifest
            .weights
            .iter()
            .map(|w| {
                let n: usize = w.shape.iter().product();
                let v = if w.shape.len() == 1 {
                    rng.vec(n, 0.8, 1.2)
                } else {
                    let a = 0.5 * (3.0 / w.shape[1] as f32).sqrt();
                    rng.vec(n, -a, a)
                };
                (w.name.clone(), w.shape.clone(), v)
            })
            .collect();
        let logits: Vec<(Vec<f32>, Vec<f32>)> = built
            .iter()
            .map(|b| {
                let w = Weights::from_f32(
                    tensors
                        .iter()
                        .map(|(n, s, d)| (n.as_str(), s.clone(), d.as_slice())),
                )
                .unwrap();
                let m = Model::new(Artifact::from_bytes(b.artifact_bytes()).unwrap(), w).unwrap();
                let mut s = m.session();
                // Beyond 8 rows the MLIR build's products go through its own GEMM.
                let prompt: Vec<u32> = (0..[7, 19, 40][case % 3])
                    .map(|i| (i * 13 % vocab) as u32)
                    .collect();
                let pre = s.prefill(&prompt).unwrap().data().to_vec();
                let mut dec = vec![];
                for t in [3u32, 5, 8] {
                    dec.extend_from_slice(s.step(t).unwrap().data());
                }
                (pre, dec)
            })
            .collect();
        let rel = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() / x.abs().max(1.0))
                .fold(0.0f32, f32::max)
        };
        let d_pre = rel(&logits[0].0, &logits[1].0);
        let d_dec = rel(&logits[0].1, &logits[1].1);
        eprintln!("{family} {set:?}: prefill {d_pre:.2e}, decode {d_dec:.2e}");
        assert!(
            d_pre <= TOL && d_dec <= TOL,
            "{family} {set:?}: prefill {d_pre:e}, decode {d_dec:e}"
        );
    }
}

/// The families added beside the MLIR backend: Parcae (softplus-derived injection, per-head
/// q/k norm, value embeddings), MoR (routers, per-iteration weights) and the UT (ACT, timing
/// signals), each through the MLIR kernels against its PyTorch fixtures and Cranelift.
#[test]
fn parcae_mor_ut_parity_with_mlir_backend() {
    for case in ["r1", "r4_softcap", "r8_plain_tied"] {
        let f = fixture(&format!("parcae_tiny/{case}.safetensors"));
        let flag = |k: &str| read(&f, k).i64[0];
        let set = [
            "init_scale=0".to_string(),
            format!("qk_norm={}", flag("qk_norm")),
            format!("prelude_norm={}", flag("prelude_norm")),
            format!("tie_embeddings={}", flag("tie_embeddings")),
            format!("softcap={}", read(&f, "logit_softcap").f32[0]),
        ];
        let set: Vec<&str> = set.iter().map(|s| s.as_str()).collect();
        parity(
            "parcae",
            "parcae_tiny/config.json",
            "parcae_tiny/model.safetensors",
            &format!("parcae_tiny/{case}.safetensors"),
            flag("steps") as usize,
            &set,
        );
    }
    for case in [
        "vanilla_middle_cycle",
        "token_middle_cycle",
        "expert_middle_sequence",
    ] {
        let path = format!("mor_tiny/{case}.safetensors");
        let f = fixture(&path);
        let set = [
            format!("routing={}", read(&f, "routing").i64[0]),
            format!("sharing={}", read(&f, "sharing").i64[0]),
            format!("alpha={}", read(&f, "alpha").f32[0]),
            "threshold=0".to_string(),
        ];
        let set: Vec<&str> = set.iter().map(|s| s.as_str()).collect();
        parity("mor", "mor_tiny/config.json", &path, &path, 3, &set);
    }
    for (case, max) in [("act_m6", 6), ("act_m3", 3)] {
        let set = [format!("max_steps={max}")];
        let set: Vec<&str> = set.iter().map(|s| s.as_str()).collect();
        parity(
            "ut",
            "ut_tiny/config.json",
            "ut_tiny/model.safetensors",
            &format!("ut_tiny/{case}.safetensors"),
            max,
            &set,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The MLIR GEMM

/// The MLIR object's GEMMs, loaded the way the runtime loads an artifact that names them.
fn mlir_gemm() -> (
    loopc_runtime::kernels::Kernels,
    loopc_runtime::matmul::HostGemm,
) {
    let out = mlir::native::compile_kernels(&[]).unwrap();
    let so = out.shared_object;
    let decl = mlir::host_gemm(out.amx);
    let k = loopc_runtime::kernels::Kernels::load_with_gemm(&so, &[], Some(&decl)).unwrap();
    let g = k.gemm().expect("the GEMMs were resolved");
    (k, g)
}

/// `x · wᵀ` and `x · w` in f64, the reference of the GEMM tests.
fn gemm_reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, kn: bool) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k)
                .map(|kk| {
                    let b = if kn { w[kk * n + j] } else { w[j * k + kk] };
                    x[i * k + kk] as f64 * b as f64
                })
                .sum();
        }
    }
    out
}

/// Both layouts at seeded random shapes: rows that leave 4- and 1-row tiles, depths that are
/// not multiples of 16, widths that end in a partial panel, more rows than one L2 block, and
/// the runtime's two-thread column split; each result within 1e-5 (relative to the sum of
/// |products|) of an f64 reference, and the output buffer's padding untouched.
#[test]
fn mlir_gemm_matches_a_reference_on_every_shape() {
    let (_lib, g) = mlir_gemm();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut rng = Rng(2024);
    let mut shapes = vec![
        (9, 1, 1),
        (13, 17, 33),
        (300, 40, 70),
        (16, 16, 32),
        (21, 100, 257),
    ];
    for _ in 0..12 {
        shapes.push((9 + rng.below(120), 1 + rng.below(150), 1 + rng.below(150)));
    }
    for (m, k, n) in shapes {
        let x = rng.vec(m * k, -1.0, 1.0);
        let w = rng.vec(n * k, -1.0, 1.0);
        for kn in [false, true] {
            let want = gemm_reference(&x, &w, m, k, n, kn);
            let scale: Vec<f64> = {
                let (xa, wa): (Vec<f32>, Vec<f32>) = (
                    x.iter().map(|v| v.abs()).collect(),
                    w.iter().map(|v| v.abs()).collect(),
                );
                gemm_reference(&xa, &wa, m, k, n, kn)
            };
            for threads in [1, 2] {
                // A sentinel tail: the GEMM writes exactly m·n values.
                let mut out = vec![f32::NAN; m * n + 7];
                pool.install(|| {
                    if kn {
                        loopc_runtime::matmul::matmul_kn_on(
                            Some(g),
                            &x,
                            &w,
                            &mut out,
                            m,
                            k,
                            n,
                            threads,
                        )
                    } else {
                        loopc_runtime::matmul::matmul_epi_on(
                            Some(g),
                            &x,
                            &w,
                            &mut out,
                            m,
                            k,
                            n,
                            threads,
                            &Default::default(),
                        )
                    }
                });
                assert!(
                    out[m * n..].iter().all(|v| v.is_nan()),
                    "wrote past the output"
                );
                let worst = out[..m * n]
                    .iter()
                    .zip(&want)
                    .zip(&scale)
                    .map(|((o, r), s)| (*o as f64 - r).abs() / s.max(1.0))
                    .fold(0.0f64, f64::max);
                assert!(
                    worst <= 1e-5,
                    "m={m} k={k} n={n} kn={kn} threads={threads}: worst {worst:e}"
                );
            }
        }
    }
}

// Speed: `loopc bench --ceilings ARTIFACT` (a release build) times these GEMMs beside the
// runtime's own on the same operands; a test binary's dev profile would misreport both.

/// The AMX bf16 GEMM (on hosts with AMX-BF16, where the build includes it) against the
/// runtime's own tile kernel on the same rounded operands: the same `tdpbf16ps` sequence, so
/// the products must be bit-identical, at shapes with partial row and column blocks, depths
/// that are not multiples of 32, several L2 groups, and both thread counts; a bias epilogue
/// rides along. Without AMX the build must not include it.
#[test]
fn mlir_amx_gemm_matches_the_runtime_tile_kernel() {
    use loopc_runtime::matmul_bf16::{matmul_bf16_path, matmul_bf16_path_on, Path};
    let (_lib, g) = mlir_gemm();
    let host_amx = Path::supported().contains(&Path::Amx);
    assert_eq!(
        g.bf16_amx.is_some(),
        mlir::native::host_has_amx(),
        "the AMX GEMM is built exactly when LLVM sees AMX-BF16"
    );
    let Some(f) = g.bf16_amx.filter(|_| host_amx) else {
        eprintln!("no AMX on this host (or no permission): the AMX GEMM is not built or run");
        return;
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut rng = Rng(99);
    for (m, k, n) in [
        (9, 32, 32),
        (40, 100, 70),
        (64, 1024, 96),
        (77, 2900, 33),
        (130, 64, 1000),
    ] {
        let x = rng.vec(m * k, -1.0, 1.0);
        let w = rng.vec(n * k, -1.0, 1.0);
        let bias = rng.vec(n, -1.0, 1.0);
        let packed = loopc_runtime::bf16::Packed::from_f32(&w, n, k);
        let epi = loopc_runtime::matmul::Epi {
            bias: Some(&bias),
            ..Default::default()
        };
        for threads in [1, 2] {
            let (mut a, mut b) = (vec![f32::NAN; m * n + 5], vec![f32::NAN; m * n + 5]);
            pool.install(|| {
                matmul_bf16_path(&x, &packed, &mut a, m, threads, &epi, Path::Amx);
                matmul_bf16_path_on(Some(f), &x, &packed, &mut b, m, threads, &epi, Path::Amx);
            });
            assert!(
                b[m * n..].iter().all(|v| v.is_nan()),
                "wrote past the output"
            );
            let same = a[..m * n]
                .iter()
                .zip(&b[..m * n])
                .all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "m={m} k={k} n={n} threads={threads}: products differ");
        }
    }
}
