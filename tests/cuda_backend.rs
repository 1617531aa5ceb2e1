//! The CUDA road (`loopc build --target cuda`) as far as a machine without a GPU can check it:
//! - always: insta snapshots of the `gpu`-dialect module of fused kernels, a launch table that
//!   covers every kernel and every support kernel of the contract, and (without the `mlir`
//!   feature) a clear error for `--target cuda`;
//! - with the `mlir` feature: every emitted module passes MLIR's verifier, the PTX of every
//!   example family, of a zoo of every kernel kind at awkward shapes and of the support kernels
//!   assembles with `ptxas -arch=sm_90`, and the artifact carries the PTX and the launch table.
//!
//! `ptxas` comes from the PyPI package `nvidia-cuda-nvcc-cu12` (`scripts/install-ptxas.sh`);
//! the test finds it through `LOOPC_PTXAS` or the `python3` on the path, and fails with
//! instructions when it cannot (no silent skip).

mod common;
use common::*;
use loopc_compiler::backend::mlir::gpu;
use loopc_compiler::driver::{self, Options, Target};
use loopc_runtime::artifact::cuda::support;
use loopc_runtime::artifact::{EwIn, EwOp, KernelDecl, KernelSpec, RopeStyle};
use std::path::PathBuf;

/// Example families with the fixture configs the parity tests use.
const FAMILIES: &[(&str, &str, &[&str])] = &[
    ("huginn", "huginn_tiny/config.json", &["init_scale=0"]),
    ("ouro", "ouro_tiny/config.json", &[]),
    ("ltg", "ltg_tiny/config.json", &["positions=1", "inject=1"]),
    ("parcae", "parcae_tiny/config.json", &["init_scale=0"]),
    ("mor", "mor_tiny/config.json", &[]),
    ("ut", "ut_tiny/config.json", &[]),
];

fn options(config: &str, set: &[&str], target: Target) -> Options {
    Options {
        set: set.iter().map(|s| s.to_string()).collect(),
        config: Some(fixture(config)),
        opt_level: 1,
        verify: true,
        target,
        ..Default::default()
    }
}

fn example(name: &str) -> PathBuf {
    root().join("examples").join(format!("{name}.loop"))
}

fn decl(symbol: &str, spec: KernelSpec) -> KernelDecl {
    KernelDecl {
        symbol: symbol.into(),
        spec,
    }
}

/// Every kernel kind, at shapes that exercise partial warps (head_dim 80, 40 columns), GQA,
/// both rotary styles and every elementwise op.
fn zoo() -> Vec<KernelDecl> {
    use EwOp::*;
    let all_ops = vec![
        Input(0),
        Input(1),
        Input(2),
        Const(0.5),
        Add(0, 1),
        Sub(4, 2),
        Mul(5, 3),
        Div(6, 1),
        Max(7, 0),
        Neg(8),
        Exp(9),
        Sigmoid(10),
        Silu(11),
        Relu(12),
        Tanh(13),
        GeluTanh(14),
        Sqrt(15),
        Softplus(16),
    ];
    vec![
        decl(
            "zoo_ew",
            KernelSpec::Elementwise {
                cols: 40,
                inputs: vec![EwIn::Rows, EwIn::Broadcast, EwIn::PerRow],
                ops: all_ops,
                outputs: vec![17, 4],
            },
        ),
        decl(
            "zoo_glu",
            KernelSpec::Glu {
                cols: 70,
                ops: vec![Input(0), Input(1), GeluTanh(0), Mul(2, 1)],
            },
        ),
        decl(
            "zoo_rms_res_gain",
            KernelSpec::RmsNorm {
                cols: 1000,
                eps: 1e-6,
                residual: true,
                gain: true,
            },
        ),
        decl(
            "zoo_rms",
            KernelSpec::RmsNorm {
                cols: 24,
                eps: 1e-5,
                residual: false,
                gain: false,
            },
        ),
        decl(
            "zoo_ln",
            KernelSpec::LayerNorm {
                cols: 333,
                eps: 1e-5,
            },
        ),
        decl(
            "zoo_invrms",
            KernelSpec::InvRms {
                cols: 64,
                eps: 1e-6,
            },
        ),
        decl(
            "zoo_headnorm",
            KernelSpec::HeadRmsNorm {
                heads: 12,
                head_dim: 80,
                eps: 1e-6,
            },
        ),
        decl(
            "zoo_rope_half",
            KernelSpec::Rope {
                heads: 6,
                head_dim: 80,
                style: RopeStyle::Half,
            },
        ),
        decl(
            "zoo_ropebias_il",
            KernelSpec::RopeBias {
                heads: 4,
                head_dim: 64,
                style: RopeStyle::Interleaved,
            },
        ),
        decl(
            "zoo_attn_gqa",
            KernelSpec::Attention {
                heads: 12,
                kv_heads: 4,
                head_dim: 80,
                scale: 0.111_803_4,
            },
        ),
        decl(
            "zoo_attn",
            KernelSpec::Attention {
                heads: 16,
                kv_heads: 16,
                head_dim: 128,
                scale: 0.088_388_35,
            },
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Without LLVM

/// The fused RMSNorm with the residual add and a gain, and attention: the `gpu`-dialect text.
#[test]
fn snapshot_fused_kernels() {
    let k = decl(
        "rmsnorm_residual",
        KernelSpec::RmsNorm {
            cols: 64,
            eps: 1e-6,
            residual: true,
            gain: true,
        },
    );
    let (text, launch) = gpu::kernel_func(&k).unwrap();
    assert_eq!((launch.block, launch.items_per_block), (64, 1));
    insta::assert_snapshot!("gpu_rmsnorm_residual_gain", gpu::kernel_module(&k).unwrap());
    assert!(
        text.contains("gpu.barrier"),
        "a block reduction has barriers"
    );
    let a = decl(
        "attention_gqa",
        KernelSpec::Attention {
            heads: 4,
            kv_heads: 2,
            head_dim: 48,
            scale: 0.144_337_57,
        },
    );
    insta::assert_snapshot!("gpu_attention_gqa", gpu::kernel_module(&a).unwrap());
}

/// The launch table has one entry per manifest kernel (same order and entry names as the
/// symbols) and every support kernel of the contract, each a `gpu.func` of the module.
#[test]
fn launch_table_covers_every_kernel_and_support_kernel() {
    let check = |kernels: &[KernelDecl], what: &str| {
        let g = gpu::gpu_module(kernels).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(g.image.arch, gpu::ARCH);
        assert_eq!(g.image.kernels.len(), kernels.len(), "{what}");
        for (d, l) in kernels.iter().zip(&g.image.kernels) {
            assert_eq!(l.entry, d.symbol, "{what}");
            assert!(
                l.block >= 32 && l.block % 32 == 0 && l.block <= 1024,
                "{what}: {l:?}"
            );
            assert!(l.items_per_block >= 1, "{what}: {l:?}");
            assert!(
                g.text.contains(&format!("gpu.func @{}(", d.symbol)),
                "{what}: no gpu.func for {}",
                d.symbol
            );
        }
        for name in support::ALL {
            let l = g
                .image
                .support(name)
                .unwrap_or_else(|| panic!("{what}: support kernel `{name}` missing"));
            assert_eq!(l.entry, *name);
            assert!(
                g.text.contains(&format!("gpu.func @{name}(")),
                "{what}: no gpu.func for `{name}`"
            );
        }
        assert_eq!(g.image.support.len(), support::ALL.len(), "{what}");
    };
    for (name, cfg, set) in FAMILIES {
        let m = build(name, cfg, set, 1).manifest;
        check(&m.kernels, name);
    }
    check(&zoo(), "zoo");
}

/// Every kernel's parameters are the contract's: a `u64` (`i64`) per pointer, then
/// `begin, end, pos0, kv_len`.
#[test]
fn kernel_parameters_follow_the_contract() {
    for d in zoo() {
        let (text, _) = gpu::kernel_func(&d).unwrap();
        let header = text.lines().next().unwrap();
        let ptrs: Vec<String> = (0..d.spec.num_ptrs())
            .map(|i| format!("%p{i}: i64"))
            .collect();
        let expect = format!(
            "gpu.func @{}({}, %begin: i64, %end: i64, %pos0: i64, %kv_len: i64)",
            d.symbol,
            ptrs.join(", ")
        );
        assert!(
            header.trim_start().starts_with(&expect),
            "{header}\nexpected {expect}"
        );
    }
}

#[cfg(not(feature = "mlir"))]
#[test]
fn target_cuda_without_the_mlir_feature_is_a_clear_error() {
    let (name, cfg, set) = FAMILIES[0];
    let e = match driver::build(&example(name), &options(cfg, set, Target::Cuda)) {
        Ok(_) => panic!("built a CUDA artifact without the MLIR backend"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("--features mlir"), "{e}");
    let e = driver::stage_text(&example(name), "ptx", &options(cfg, set, Target::Cpu))
        .expect_err("--stage ptx needs the feature")
        .to_string();
    assert!(e.contains("--features mlir"), "{e}");
    // `--stage gpu` needs no LLVM.
    let g = driver::stage_text(&example(name), "gpu", &options(cfg, set, Target::Cpu)).unwrap();
    assert!(g.contains("gpu.module @loopc"));
}

// ---------------------------------------------------------------------------------------------
// With MLIR/LLVM

#[cfg(feature = "mlir")]
mod with_mlir {
    use super::*;
    use loopc_compiler::backend::mlir::native;
    use loopc_runtime::artifact;
    use std::process::Command;

    /// `ptxas` from `LOOPC_PTXAS`, else from the `nvidia-cuda-nvcc-cu12` package of `python3`.
    fn ptxas() -> PathBuf {
        const HELP: &str = "ptxas not found: install it with `scripts/install-ptxas.sh` (a venv \
            with the PyPI package nvidia-cuda-nvcc-cu12) and set LOOPC_PTXAS to the path it \
            prints, or `python3 -m pip install --user nvidia-cuda-nvcc-cu12`";
        if let Some(p) = std::env::var_os("LOOPC_PTXAS") {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "LOOPC_PTXAS={} is not a file; {HELP}",
                p.display()
            );
            return p;
        }
        // The package is a namespace package: `__file__` is None, `__path__` has the folder.
        let out = Command::new("python3")
            .args([
                "-c",
                "import nvidia.cuda_nvcc as m, os; print(os.path.join(list(m.__path__)[0], 'bin', 'ptxas'))",
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
                assert!(p.is_file(), "{} is missing; {HELP}", p.display());
                p
            }
            _ => panic!("{HELP}"),
        }
    }

    /// Assemble `ptx` for sm_90; panics with ptxas's messages.
    fn assemble(ptx: &str, what: &str) {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("loopc-cuda-{what}-{}.ptx", std::process::id()));
        std::fs::write(&path, ptx).unwrap();
        let out = Command::new(ptxas())
            .args(["-arch=sm_90", "-o", "/dev/null"])
            .arg(&path)
            .output()
            .expect("ptxas runs");
        let _ = std::fs::remove_file(&path);
        assert!(
            out.status.success(),
            "ptxas rejects the PTX of {what}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn entries(ptx: &str) -> Vec<String> {
        ptx.lines()
            .filter_map(|l| l.strip_prefix(".visible .entry "))
            .map(|l| l.trim_end_matches('(').to_string())
            .collect()
    }

    #[test]
    fn gpu_modules_pass_the_verifier() {
        for (name, cfg, set) in FAMILIES {
            // `--stage gpu` verifies in process with the feature on.
            let text = driver::stage_text(&example(name), "gpu", &options(cfg, set, Target::Cpu))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(text.contains("gpu.container_module"), "{name}");
        }
        native::verify(&gpu::gpu_module(&zoo()).unwrap().text).unwrap();
        native::verify(&gpu::support_module().text).unwrap();
        for d in zoo() {
            native::verify(&gpu::kernel_module(&d).unwrap()).unwrap();
        }
    }

    /// The PTX of every family, of every kernel kind and of the support kernels assembles.
    #[test]
    fn ptx_assembles_with_ptxas() {
        let _ = ptxas();
        for (name, cfg, set) in FAMILIES {
            let built = driver::build(&example(name), &options(cfg, set, Target::Cuda))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let ptx = String::from_utf8(built.shared_object.clone()).expect("PTX is text");
            assemble(&ptx, name);
            let image = built.manifest.cuda.as_ref().expect("launch table");
            let have = entries(&ptx);
            for k in image
                .kernels
                .iter()
                .chain(image.support.iter().map(|s| &s.launch))
            {
                assert!(have.contains(&k.entry), "{name}: no .entry {}", k.entry);
            }
        }
        let zoo_ptx = native::compile_ptx(&zoo()).unwrap();
        assemble(&zoo_ptx.ptx, "zoo");
        assert_eq!(
            entries(&zoo_ptx.ptx).len(),
            zoo().len() + support::ALL.len()
        );
        let support_ptx = native::ptx_of_text(&gpu::support_module().text).unwrap();
        assemble(&support_ptx, "support");
        assert_eq!(entries(&support_ptx).len(), support::ALL.len());
        // Nothing calls out of the module (libdevice, MLIR's CUDA runtime).
        for ptx in [&zoo_ptx.ptx, &support_ptx] {
            assert!(!ptx.contains(".extern"), "external symbol in:\n{ptx}");
        }
    }

    /// `--target cuda` writes the contract's artifact: target, PTX object, launch table.
    #[test]
    fn cuda_artifact_follows_the_contract() {
        let (name, cfg, set) = FAMILIES[1];
        let built = driver::build(&example(name), &options(cfg, set, Target::Cuda)).unwrap();
        let bytes = built.artifact_bytes();
        let (m, obj) = artifact::decode(&bytes).unwrap();
        assert_eq!(m.target, "cuda-sm_90");
        let image = m.cuda.as_ref().expect("manifest.cuda");
        assert_eq!(image.arch, "sm_90");
        assert_eq!(image.kernels.len(), m.kernels.len());
        let ptx = std::str::from_utf8(obj).unwrap();
        assert!(
            ptx.contains(".target sm_90"),
            "{}",
            &ptx[..200.min(ptx.len())]
        );
        // The CPU build of the same program is the same program (only the code differs).
        let cpu = driver::build(&example(name), &options(cfg, set, Target::Cpu)).unwrap();
        assert_eq!(cpu.manifest.program, m.program);
        assert_eq!(cpu.manifest.kernels, m.kernels);
    }
}

// ---------------------------------------------------------------------------------------------
// The device kernels' maths on the CPU: the emitted `gpu` modules run in a SIMT interpreter
// (tests/cuda_sim) against the Cranelift kernels and against the runtime's formulas.

mod cuda_sim;
use cuda_sim::{Mem, V};
use libloading::Library;
use loopc_compiler::backend::cranelift;

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

/// Run a generated kernel in the simulator over items `0..n` as two launches split at
/// `split` (as two runtime calls would), per the contract's grid rule.
fn simulate(
    d: &KernelDecl,
    bufs: &[Vec<f32>],
    n: usize,
    split: usize,
    pos0: usize,
) -> Vec<Vec<f32>> {
    let (text, launch) = gpu::kernel_func(d).unwrap();
    let f = &cuda_sim::parse(&text)[0];
    let mut mem = Mem::new();
    let addrs: Vec<i64> = bufs.iter().map(|b| mem.f32s(b)).collect();
    for (lo, hi) in [(0, split.min(n)), (split.min(n), n)] {
        if hi == lo {
            continue;
        }
        let grid = (hi - lo).div_ceil(launch.items_per_block as usize);
        let mut args: Vec<V> = addrs.iter().map(|&a| V::I(a)).collect();
        args.extend([lo, hi, pos0, 0].map(|x| V::I(x as i64)));
        f.launch(&mut mem, grid, launch.block as usize, &args);
    }
    addrs.iter().map(|&a| mem.read(a)).collect()
}

/// The same kernel built by Cranelift and called like the CPU runtime calls it.
fn on_host(
    lib: &Library,
    d: &KernelDecl,
    bufs: &[Vec<f32>],
    n: usize,
    pos0: usize,
) -> Vec<Vec<f32>> {
    type KernelFn = unsafe extern "C" fn(*const *mut f32, *const i64);
    let mut b = bufs.to_vec();
    let ptrs: Vec<*mut f32> = b.iter_mut().map(|v| v.as_mut_ptr()).collect();
    let k = unsafe { *lib.get::<KernelFn>(d.symbol.as_bytes()).unwrap() };
    let ints = [0, n as i64, pos0 as i64, 0];
    unsafe { k(ptrs.as_ptr(), ints.as_ptr()) };
    b
}

/// Buffers for `rows` rows of a kernel (caches and tables cover `pos0 + rows` positions) and
/// its item count.
fn buffers(spec: &KernelSpec, rows: usize, pos0: usize, rng: &mut Rng) -> (Vec<Vec<f32>>, usize) {
    let positions = pos0 + rows;
    match spec {
        KernelSpec::Elementwise {
            cols,
            inputs,
            outputs,
            ..
        } => {
            let mut b: Vec<Vec<f32>> = inputs
                .iter()
                .map(|i| match i {
                    EwIn::Rows => rng.vec(rows * cols, -3.0, 3.0),
                    EwIn::Broadcast => rng.vec(*cols, -3.0, 3.0),
                    EwIn::PerRow => rng.vec(rows, 0.1, 2.0),
                })
                .collect();
            b.extend(outputs.iter().map(|_| vec![0.0; rows * cols]));
            (b, rows)
        }
        KernelSpec::Glu { cols, .. } => (
            vec![rng.vec(rows * 2 * cols, -4.0, 4.0), vec![0.0; rows * cols]],
            rows,
        ),
        KernelSpec::RmsNorm {
            cols,
            residual,
            gain,
            ..
        } => {
            let mut b = vec![rng.vec(rows * cols, -2.0, 2.0)];
            if *residual {
                b.push(rng.vec(rows * cols, -2.0, 2.0));
            }
            if *gain {
                b.push(rng.vec(*cols, 0.5, 1.5));
            }
            if *residual {
                b.push(vec![0.0; rows * cols]);
            }
            b.push(vec![0.0; rows * cols]);
            (b, rows)
        }
        KernelSpec::LayerNorm { cols, .. } => (
            vec![
                rng.vec(rows * cols, -2.0, 3.0),
                rng.vec(*cols, 0.5, 1.5),
                rng.vec(*cols, -0.5, 0.5),
                vec![0.0; rows * cols],
            ],
            rows,
        ),
        KernelSpec::InvRms { cols, .. } => {
            (vec![rng.vec(rows * cols, -2.0, 2.0), vec![0.0; rows]], rows)
        }
        KernelSpec::HeadRmsNorm {
            heads, head_dim, ..
        } => {
            let n = rows * heads * head_dim;
            (vec![rng.vec(n, -2.0, 2.0), vec![0.0; n]], rows)
        }
        KernelSpec::Rope {
            heads, head_dim, ..
        }
        | KernelSpec::RopeBias {
            heads, head_dim, ..
        } => {
            let half = head_dim / 2;
            let mut b = vec![rng.vec(rows * heads * head_dim, -2.0, 2.0)];
            if matches!(spec, KernelSpec::RopeBias { .. }) {
                b.push(rng.vec(heads * head_dim, -1.0, 1.0));
            }
            let theta: Vec<f32> = (0..positions * half)
                .map(|i| {
                    (i / half) as f32 * 10000f32.powf(-2.0 * (i % half) as f32 / *head_dim as f32)
                })
                .collect();
            b.push(theta.iter().map(|t| t.cos()).collect());
            b.push(theta.iter().map(|t| t.sin()).collect());
            (b, rows)
        }
        KernelSpec::Attention {
            heads,
            kv_heads,
            head_dim,
            ..
        } => {
            let kv = kv_heads * head_dim;
            (
                vec![
                    rng.vec(rows * heads * head_dim, -2.0, 2.0),
                    rng.vec(positions * kv, -2.0, 2.0),
                    rng.vec(positions * kv, -2.0, 2.0),
                    vec![0.0; rows * heads * head_dim],
                ],
                rows * heads,
            )
        }
    }
}

/// Worst `|Δ| / max(1, |a|)` over all buffers (NaN matching NaN is equal).
fn worst_rel(what: &str, want: &[Vec<f32>], got: &[Vec<f32>], tol: f32) -> f32 {
    let mut worst = 0.0f32;
    for (k, (w, g)) in want.iter().zip(got).enumerate() {
        assert_eq!(w.len(), g.len());
        for (i, (&a, &b)) in w.iter().zip(g).enumerate() {
            if a.is_nan() && b.is_nan() {
                continue;
            }
            let d = (a - b).abs() / a.abs().max(1.0);
            assert!(
                d <= tol,
                "{what}: buffer {k} element {i}: want {a}, device {b} (|Δ| {d:e})"
            );
            worst = worst.max(d);
        }
    }
    worst
}

/// The Cranelift build of `decls`, loaded.
fn host_kernels(decls: &[KernelDecl], tag: &str) -> Library {
    let so = cranelift::compile_kernels(decls).unwrap().shared_object;
    let path = std::env::temp_dir().join(format!("loopc-cuda-sim-{tag}-{}.so", std::process::id()));
    std::fs::write(&path, &so).unwrap();
    let lib = unsafe { Library::new(&path) }.unwrap();
    let _ = std::fs::remove_file(&path);
    lib
}

/// Every kernel kind of the zoo, simulated as the device runs it, agrees with the Cranelift
/// kernel to 1e-5 (row sums and attention add in a different order), over several row counts,
/// positions and launch splits.
#[test]
fn device_kernels_agree_with_cranelift_in_the_simulator() {
    agree_in_simulator(&zoo(), "zoo", &[(1, 0), (3, 0), (2, 9), (7, 33)]);
}

/// The same for every kernel of every example family, at the fixtures' shapes.
#[test]
fn family_kernels_agree_with_cranelift_in_the_simulator() {
    for (name, cfg, set) in FAMILIES {
        let m = build(name, cfg, set, 1).manifest;
        agree_in_simulator(&m.kernels, name, &[(1, 4), (3, 0)]);
    }
}

fn agree_in_simulator(decls: &[KernelDecl], tag: &str, shapes: &[(usize, usize)]) {
    let lib = host_kernels(decls, tag);
    let mut rng = Rng(7);
    for d in decls {
        let mut worst = 0.0f32;
        for &(rows, pos0) in shapes {
            let (bufs, n) = buffers(&d.spec, rows, pos0, &mut rng);
            let split = rng.below(n + 1);
            let want = on_host(&lib, d, &bufs, n, pos0);
            let got = simulate(d, &bufs, n, split, pos0);
            let what = format!("{} rows={rows} pos0={pos0} split={split}", d.symbol);
            worst = worst.max(worst_rel(&what, &want, &got, 1e-5));
        }
        eprintln!("{tag} {}: max relative |Δ| = {worst:.1e}", d.symbol);
    }
}

/// The support kernels of a simulated module, by name.
fn support_funcs() -> Vec<cuda_sim::Func> {
    cuda_sim::parse(&gpu::support_module().text)
}

fn run_support(name: &str, mem: &mut Mem, rows: usize, args: &[V]) {
    let funcs = support_funcs();
    let f = funcs.iter().find(|f| f.name == name).unwrap();
    let image = gpu::support_module().image;
    let l = image.support(name).unwrap();
    let grid = rows.div_ceil(l.items_per_block as usize);
    f.launch(mem, grid, l.block as usize, args);
}

fn i(x: usize) -> V {
    V::I(x as i64)
}

#[test]
fn support_kernels_match_the_runtime_formulas_in_the_simulator() {
    let mut rng = Rng(11);
    // embed
    {
        let (rows, cols, vocab) = (5, 300, 9);
        let table = rng.vec(vocab * cols, -1.0, 1.0);
        let tokens: Vec<i32> = (0..rows).map(|_| rng.below(vocab) as i32).collect();
        let mut mem = Mem::new();
        let out = mem.f32s(&vec![0.0; rows * cols]);
        let (t, k) = (mem.f32s(&table), mem.i32s(&tokens));
        run_support(
            support::EMBED,
            &mut mem,
            rows,
            &[V::I(out), V::I(t), V::I(k), i(rows), i(cols)],
        );
        let want: Vec<f32> = tokens
            .iter()
            .flat_map(|&t| table[t as usize * cols..(t as usize + 1) * cols].to_vec())
            .collect();
        assert_eq!(mem.read(out), want, "embed");
    }
    // copy_cols
    {
        let (rows, cols, ds, doff, ss, soff) = (4, 37, 50, 13, 41, 3);
        let src = rng.vec(rows * ss, -1.0, 1.0);
        let dst0 = rng.vec(rows * ds, -1.0, 1.0);
        let mut mem = Mem::new();
        let (d, s) = (mem.f32s(&dst0), mem.f32s(&src));
        let args = [
            V::I(d),
            V::I(s),
            i(rows),
            i(cols),
            i(ds),
            i(doff),
            i(ss),
            i(soff),
        ];
        run_support(support::COPY_COLS, &mut mem, rows, &args);
        let mut want = dst0.clone();
        for r in 0..rows {
            for c in 0..cols {
                want[r * ds + doff + c] = src[r * ss + soff + c];
            }
        }
        assert_eq!(mem.read(d), want, "copy_cols");
    }
    // sinusoidal (exec.rs's formula in f64), at large positions for the range reduction
    for (cols, pos0) in [(64usize, 0usize), (37, 5000), (300, 123_456)] {
        let rows = 3;
        let base = 10000.0f64;
        let mut mem = Mem::new();
        let out = mem.f32s(&vec![0.0; rows * cols]);
        let args = [V::I(out), i(rows), i(cols), i(pos0), V::D(base)];
        run_support(support::SINUSOIDAL, &mut mem, rows, &args);
        let mut want = vec![0.0f32; rows * cols];
        for r in 0..rows {
            let p = (pos0 + r) as f64;
            for c in (0..cols).step_by(2) {
                let a = p * (-(c as f64) * base.ln() / cols as f64).exp();
                want[r * cols + c] = a.sin() as f32;
                if c + 1 < cols {
                    want[r * cols + c + 1] = a.cos() as f32;
                }
            }
        }
        let got = mem.read(out);
        let worst = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        // The f64 values round to the same f32 (or, at a rounding tie, its neighbour).
        assert!(
            worst <= 1.2e-7,
            "sinusoidal cols={cols} pos0={pos0}: |Δ| {worst:e}"
        );
    }
    // timing_signal (exec.rs's formula), positions and steps
    for (cols, t0, t_step) in [(64usize, 0usize, 1usize), (33, 700, 1), (20, 3, 0)] {
        let rows = 4;
        let (lo, hi) = (1.0f64, 1.0e4f64);
        let mut mem = Mem::new();
        let out = mem.f32s(&vec![7.0; rows * cols]);
        let args = [
            V::I(out),
            i(rows),
            i(cols),
            i(t0),
            i(t_step),
            V::D(lo),
            V::D(hi),
        ];
        run_support(support::TIMING_SIGNAL, &mut mem, rows, &args);
        let h = cols / 2;
        let inc = (hi / lo).ln() / (h.max(2) - 1) as f64;
        let mut want = vec![0.0f32; rows * cols];
        for r in 0..rows {
            let p = (t0 + r * t_step) as f64;
            for k in 0..h {
                let a = p * lo * (-(k as f64) * inc).exp();
                want[r * cols + k] = a.sin() as f32;
                want[r * cols + h + k] = a.cos() as f32;
            }
        }
        let got = mem.read(out);
        let worst = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            worst <= 1.2e-7,
            "timing_signal cols={cols} t0={t0}: |Δ| {worst:e}"
        );
    }
    // epilogue: every combination of the optional terms, the host's order of operations
    for mask in 0..8 {
        let (rows, n, ps, po) = (3, 45, 60, 7);
        let p = rng.vec(rows * ps, -2.0, 2.0);
        let scale = rng.vec(rows, 0.5, 2.0);
        let res = rng.vec(rows * n, -1.0, 1.0);
        let bias = rng.vec(n, -1.0, 1.0);
        let mut mem = Mem::new();
        let out = mem.f32s(&vec![0.0; rows * n]);
        let pa = mem.f32s(&p);
        let opt = |mem: &mut Mem, on: bool, v: &[f32]| if on { mem.f32s(v) } else { 0 };
        let (s_a, r_a, b_a) = (
            opt(&mut mem, mask & 1 != 0, &scale),
            opt(&mut mem, mask & 2 != 0, &res),
            opt(&mut mem, mask & 4 != 0, &bias),
        );
        let args = [
            V::I(out),
            V::I(pa),
            V::I(s_a),
            V::I(r_a),
            V::I(b_a),
            i(rows),
            i(n),
            i(ps),
            i(po),
        ];
        run_support(support::EPILOGUE, &mut mem, rows, &args);
        let mut want = vec![0.0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let mut v = p[r * ps + po + j];
                if mask & 1 != 0 {
                    v *= scale[r];
                }
                if mask & 4 != 0 {
                    v += bias[j];
                }
                if mask & 2 != 0 {
                    v += res[r * n + j];
                }
                want[r * n + j] = v;
            }
        }
        assert_eq!(mem.read(out), want, "epilogue terms {mask:03b}");
    }
    // glu: every activation code, a partial last block
    for (act, op) in [
        (0, EwOp::Silu(0)),
        (1, EwOp::GeluTanh(0)),
        (2, EwOp::Relu(0)),
        (3, EwOp::Sigmoid(0)),
        (4, EwOp::Tanh(0)),
    ] {
        assert_eq!(support::act_code(&op), Some(act));
        let (rows, n, block) = (2, 20, 8);
        let p = rng.vec(rows * 2 * n, -4.0, 4.0);
        let mut mem = Mem::new();
        let out = mem.f32s(&vec![0.0; rows * n]);
        let pa = mem.f32s(&p);
        let args = [V::I(out), V::I(pa), i(rows), i(n), i(block), V::I(act)];
        run_support(support::GLU, &mut mem, rows, &args);
        let mut want = vec![0.0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let (b0, c) = (j / block * block, j % block);
                let b = block.min(n - b0);
                let g = p[r * 2 * n + 2 * b0 + c] as f64;
                let u = p[r * 2 * n + 2 * b0 + b + c] as f64;
                let a = loopc_runtime::ew::eval(&[EwOp::Input(0), op], &[g]);
                want[r * n + j] = (a * u) as f32;
            }
        }
        let worst = worst_rel(&format!("glu act {act}"), &[want], &[mem.read(out)], 2e-6);
        eprintln!("glu act {act}: max relative |Δ| = {worst:.1e}");
    }
    // row_norm: normalize with and without a gain, inv_rms of the final row
    for (normalize, gain, inv) in [
        (true, true, true),
        (true, false, false),
        (false, false, true),
    ] {
        let (rows, n, eps) = (3, 700, 1e-6f32);
        let x = rng.vec(rows * n, -2.0, 2.0);
        let g = rng.vec(n, 0.5, 1.5);
        let mut mem = Mem::new();
        let out = mem.f32s(&x);
        let ga = if gain { mem.f32s(&g) } else { 0 };
        let qa = if inv { mem.f32s(&vec![0.0; rows]) } else { 0 };
        let args = [
            V::I(out),
            V::I(ga),
            V::I(qa),
            i(rows),
            i(n),
            i(normalize as usize),
            V::F(eps),
        ];
        run_support(support::ROW_NORM, &mut mem, rows, &args);
        let rms = |v: &[f32]| {
            let ss: f64 = v.iter().map(|&a| a as f64 * a as f64).sum();
            (1.0 / (ss / v.len() as f64 + eps as f64).sqrt()) as f32
        };
        let mut want = x.clone();
        let mut want_q = vec![0.0f32; rows];
        for r in 0..rows {
            let row = &mut want[r * n..(r + 1) * n];
            if normalize {
                let s = rms(row);
                for (j, v) in row.iter_mut().enumerate() {
                    *v = *v * s * if gain { g[j] } else { 1.0 };
                }
            }
            want_q[r] = rms(row);
        }
        let what = format!("row_norm normalize={normalize} gain={gain} inv={inv}");
        worst_rel(&what, &[want], &[mem.read(out)], 1e-5);
        if inv {
            worst_rel(&what, &[want_q], &[mem.read(qa)], 1e-5);
        }
    }
    // exit_latent: both criteria, with equal rows and a zero row (the degenerate cases)
    for kind in [0i64, 1] {
        let (rows, n) = (4, 513);
        let a = rng.vec(rows * n, -1.0, 1.0);
        let mut b = rng.vec(rows * n, -1.0, 1.0);
        b[n..2 * n].copy_from_slice(&a[n..2 * n]);
        let mut a = a;
        a[2 * n..3 * n].iter_mut().for_each(|v| *v = 0.0);
        let mut mem = Mem::new();
        let val = mem.f32s(&vec![0.0; rows]);
        let (aa, ba) = (mem.f32s(&a), mem.f32s(&b));
        let args = [V::I(val), V::I(aa), V::I(ba), i(rows), i(n), V::I(kind)];
        run_support(support::EXIT_LATENT, &mut mem, rows, &args);
        let got = mem.read(val);
        for r in 0..rows {
            let (x, y) = (&a[r * n..(r + 1) * n], &b[r * n..(r + 1) * n]);
            let (mut d, mut na, mut nb, mut dot) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
            for (&p, &q) in x.iter().zip(y) {
                let (p, q) = (p as f64, q as f64);
                d += (p - q) * (p - q);
                na += p * p;
                nb += q * q;
                dot += p * q;
            }
            let want = if kind == 1 {
                if na == 0.0 || nb == 0.0 {
                    1.0
                } else {
                    1.0 - dot / (na.sqrt() * nb.sqrt())
                }
            } else if na > 0.0 {
                d.sqrt() / na.sqrt()
            } else if d == 0.0 {
                0.0
            } else {
                f64::INFINITY
            } as f32;
            let ok = want == got[r] || ((want - got[r]) / want).abs() <= 1e-6;
            assert!(
                ok,
                "exit_latent kind {kind} row {r}: want {want}, device {}",
                got[r]
            );
        }
    }
    // select_rows
    {
        let (rows, n) = (5, 70);
        let dst = rng.vec(rows * n, -1.0, 1.0);
        let src = rng.vec(rows * n, -1.0, 1.0);
        let mask = [1, 0, 0, 3, 1];
        let mut mem = Mem::new();
        let (d, s, m) = (mem.f32s(&dst), mem.f32s(&src), mem.i32s(&mask));
        run_support(
            support::SELECT_ROWS,
            &mut mem,
            rows,
            &[V::I(d), V::I(s), V::I(m), i(rows), i(n)],
        );
        let mut want = dst.clone();
        for r in 0..rows {
            if mask[r] != 0 {
                want[r * n..(r + 1) * n].copy_from_slice(&src[r * n..(r + 1) * n]);
            }
        }
        assert_eq!(mem.read(d), want, "select_rows");
    }
    // exit_logits: in `exit_logits_match_the_runtime_formulas_in_the_simulator`
}

/// `exit.rs`'s logit criteria on the host (f32 max, f64 sums, f32 log-probabilities): one row's
/// step, updating its history; `kind` as the contract's `exit_logits`.
fn host_logits_step(
    kind: i64,
    l: &[f32],
    prev: &mut [f32],
    prev_h: &mut f64,
    prev_am: &mut i32,
    count: &mut i32,
) -> f64 {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = l.iter().map(|&v| ((v - m) as f64).exp()).sum();
    let lz = m as f64 + z.ln();
    let mut lp: Vec<f32> = l.iter().map(|&v| (v as f64 - lz) as f32).collect();
    if kind == 3 {
        let vf = lp.len() as f64;
        let mx = lp.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let cut = mx.exp() * 0.1;
        let mut z = 0.0f64;
        for x in lp.iter_mut() {
            let p = (*x as f64).exp();
            let p = if p < cut { 1.0 / vf } else { p };
            *x = p as f32;
            z += p;
        }
        for x in lp.iter_mut() {
            *x = ((*x as f64) / z).ln() as f32;
        }
    }
    match kind {
        2 | 3 => {
            let kl = prev
                .iter()
                .zip(&lp)
                .map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64))
                .sum();
            prev.copy_from_slice(&lp);
            kl
        }
        4 => {
            let h: f64 = -lp
                .iter()
                .map(|&x| (x as f64).exp() * ((x as f64).exp() + 1e-10).ln())
                .sum::<f64>();
            let d = (h - *prev_h).abs();
            *prev_h = h;
            d
        }
        _ => {
            let mut best = 0usize;
            let mut found = false;
            for (i, &v) in l.iter().enumerate() {
                if !v.is_nan() && (!found || v > l[best]) {
                    best = i;
                    found = true;
                }
            }
            *count = if best as i32 == *prev_am {
                *count + 1
            } else {
                0
            };
            *prev_am = best as i32;
            *count as f64
        }
    }
}

/// `exit_logits` against the host's formulas over three steps: the first (reset history),
/// later ones reading the device history, a row that is inactive in the second step (its
/// history must not move), a row with a tied maximum (argmax: the first), a peaked row (min-p
/// filters most of it) and a vocabulary that is not a multiple of the block.
#[test]
fn exit_logits_match_the_runtime_formulas_in_the_simulator() {
    let mut rng = Rng(23);
    let (rows, vocab) = (4usize, 777usize);
    let uniform = -(vocab as f32).ln();
    for kind in [2i64, 3, 4, 5] {
        let mut mem = Mem::new();
        let value = mem.f64s(&vec![0.0; rows]);
        let prev_a = mem.f32s(&vec![0.0; rows * vocab]);
        let h_a = mem.f64s(&vec![0.0; rows]);
        let am_a = mem.i32s(&vec![0; rows]);
        let cnt_a = mem.i32s(&vec![0; rows]);
        let mut prev = vec![uniform; rows * vocab];
        let mut ph = vec![100.0f64; rows];
        let mut pam = vec![-1i32; rows];
        let mut cnt = vec![0i32; rows];
        let mut want_v = vec![0.0f64; rows];
        let base = rng.vec(rows * vocab, -3.0, 3.0);
        for step in 0..3 {
            // Small moves of a fixed landscape, so argmax streaks and small KLs happen.
            let mut l: Vec<f32> = base
                .iter()
                .map(|&x| x + rng.uniform(-0.05, 0.05) * step as f32)
                .collect();
            // Row 1: a tied maximum at two columns; row 3: one dominant column.
            l[vocab + 5] = 9.0;
            l[vocab + 600] = 9.0;
            l[3 * vocab + 300] = 12.0;
            let act: Vec<i32> = (0..rows).map(|r| (step != 1 || r != 2) as i32).collect();
            let la = mem.f32s(&l);
            let aa = mem.i32s(&act);
            let args = [
                V::I(value),
                V::I(la),
                V::I(prev_a),
                V::I(h_a),
                V::I(am_a),
                V::I(cnt_a),
                V::I(aa),
                i(rows),
                i(vocab),
                V::I(kind),
                i((step == 0) as usize),
                V::F(uniform),
            ];
            run_support(support::EXIT_LOGITS, &mut mem, rows, &args);
            for r in (0..rows).filter(|&r| act[r] != 0) {
                want_v[r] = host_logits_step(
                    kind,
                    &l[r * vocab..(r + 1) * vocab],
                    &mut prev[r * vocab..(r + 1) * vocab],
                    &mut ph[r],
                    &mut pam[r],
                    &mut cnt[r],
                );
            }
            let got = mem.read64(value);
            for r in 0..rows {
                let (w, g) = (want_v[r], got[r]);
                // Reassociated f64 sums and a few-ulp exp/ln; a log-probability may round to the
                // neighbouring f32, which moves a KL term by p·ulp.
                assert!(
                    (w - g).abs() <= 1e-9 + 1e-9 * w.abs(),
                    "exit_logits kind {kind} step {step} row {r}: host {w:e}, device {g:e}"
                );
            }
            match kind {
                2 | 3 => {
                    let d = mem.read(prev_a);
                    for (j, (a, b)) in prev.iter().zip(&d).enumerate() {
                        assert!(
                            (a - b).abs() <= 2.0 * f32::EPSILON * a.abs().max(1e-3),
                            "prev_logp[{j}] kind {kind} step {step}: host {a}, device {b}"
                        );
                    }
                }
                4 => assert!(
                    mem.read64(h_a)
                        .iter()
                        .zip(&ph)
                        .all(|(a, b)| (a - b).abs() <= 1e-12 * b.abs().max(1.0)),
                    "prev_h step {step}"
                ),
                _ => {
                    assert_eq!(mem.read_i32(am_a), pam, "argmax step {step}");
                    assert_eq!(mem.read_i32(cnt_a), cnt, "streak step {step}");
                }
            }
        }
        if kind == 5 {
            // The tie resolves to the first column, and unchanged argmaxes made streaks.
            assert_eq!(pam[1], 5);
            assert!(cnt.iter().any(|&c| c >= 2), "{cnt:?}");
        }
    }
}

/// MoR's routers against the host's rules (`runtime/src/exec/per_row.rs`): expert choice's
/// top-k over a sequence longer than the block (ties to the earlier row, inactive rows never
/// chosen) and its single-token threshold; token choice's first-maximum depth and weight.
#[test]
fn routers_match_the_runtime_rules_in_the_simulator() {
    let mut rng = Rng(31);
    let sig = |z: f32| 1.0 / (1.0 + (-z).exp());
    // expert choice, several sequence lengths and capacities
    for (rows, k) in [(300usize, 100usize), (7, 3), (5, 5)] {
        let mut z = rng.vec(rows, -3.0, 3.0);
        // Ties: equal scores must go to the earlier row.
        z[rows - 1] = z[0];
        z[rows / 2] = z[1];
        let act: Vec<i32> = (0..rows).map(|r| (r % 4 != 3) as i32).collect();
        let (alpha, thr) = (0.1f32, 0.5f32);
        let mut mem = Mem::new();
        let keep = mem.i32s(&vec![7; rows]);
        let gate = mem.f32s(&vec![7.0; rows]);
        let (za, aa) = (mem.f32s(&z), mem.i32s(&act));
        let args = [
            V::I(keep),
            V::I(gate),
            V::I(za),
            V::I(aa),
            i(rows),
            i(k),
            V::F(thr),
            V::F(alpha),
        ];
        run_support(support::ROUTE_EXPERT, &mut mem, 1, &args);
        let s: Vec<f32> = z.iter().map(|&x| sig(x)).collect();
        let mut idx: Vec<usize> = (0..rows).filter(|&r| act[r] != 0).collect();
        idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        let mut want = vec![0i32; rows];
        for &r in idx.iter().take(k) {
            want[r] = 1;
        }
        assert_eq!(
            mem.read_i32(keep),
            want,
            "route_expert keep rows={rows} k={k}"
        );
        let g = mem.read(gate);
        for r in 0..rows {
            let w = if want[r] != 0 { s[r] * alpha } else { 0.0 };
            assert!(
                (w - g[r]).abs() <= 2.0 * f32::EPSILON * w.abs(),
                "route_expert gate {r}: host {w}, device {}",
                g[r]
            );
        }
    }
    // expert choice, one decoded token: the threshold decides
    for z in [-0.3f32, 0.0, 0.4] {
        let mut mem = Mem::new();
        let keep = mem.i32s(&[7]);
        let gate = mem.f32s(&[7.0]);
        let (za, aa) = (mem.f32s(&[z]), mem.i32s(&[1]));
        let args = [
            V::I(keep),
            V::I(gate),
            V::I(za),
            V::I(aa),
            i(1),
            i(1),
            V::F(0.5),
            V::F(0.1),
        ];
        run_support(support::ROUTE_EXPERT, &mut mem, 1, &args);
        assert_eq!(mem.read_i32(keep), vec![(sig(z) >= 0.5) as i32], "z = {z}");
    }
    // token choice
    {
        let (rows, n, cap, alpha) = (6usize, 4usize, 3usize, 0.7f32);
        let mut z = rng.vec(rows * n, -2.0, 2.0);
        // A tie for the maximum (the first wins) and a maximum past the cap.
        z[n + 1] = 5.0;
        z[n + 3] = 5.0;
        z[2 * n + 3] = 6.0;
        let mut mem = Mem::new();
        let depth = mem.i32s(&vec![0; rows]);
        let weight = mem.f32s(&vec![0.0; rows]);
        let za = mem.f32s(&z);
        let args = [
            V::I(depth),
            V::I(weight),
            V::I(za),
            i(rows),
            i(n),
            i(cap),
            V::F(alpha),
        ];
        run_support(support::ROUTE_TOKEN, &mut mem, rows, &args);
        let (dd, ww) = (mem.read_i32(depth), mem.read(weight));
        for r in 0..rows {
            let row = &z[r * n..(r + 1) * n];
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|&x| (x - mx).exp()).sum();
            let mut d = 0;
            for (j, &x) in row.iter().enumerate() {
                if x > row[d] {
                    d = j;
                }
            }
            let w = (row[d] - mx).exp() / sum * alpha;
            assert_eq!(
                dd[r] as usize,
                (d + 1).min(cap),
                "route_token depth row {r}"
            );
            assert!(
                (w - ww[r]).abs() <= 4.0 * f32::EPSILON * w,
                "route_token weight row {r}: host {w}, device {}",
                ww[r]
            );
        }
        assert_eq!(dd[1], 2);
        assert_eq!(dd[2], 3);
    }
}

/// `rope_rows` (the rotary epilogue term) against the runtime's own rotation of the CPU
/// epilogue, both styles, head sizes with an odd half (6) and the families' (64, 80), several
/// heads a row, rows at `pos0 + r` past the first positions of the tables.
#[test]
fn rope_rows_matches_the_runtime_rotation_in_the_simulator() {
    use loopc_runtime::matmul::{RopeEpi, RowPos};
    let mut rng = Rng(29);
    for style in [RopeStyle::Interleaved, RopeStyle::Half] {
        for (head_dim, heads, rows, pos0) in [
            (6usize, 5usize, 3usize, 0usize),
            (64, 3, 4, 17),
            (80, 2, 3, 300),
        ] {
            let (n, half) = (heads * head_dim, head_dim / 2);
            let positions = pos0 + rows + 5;
            // The runtime's table formula (`rope.rs`): `pos / base^(2i/d)` in f64, rounded.
            let (mut cos, mut sin) = (
                vec![0.0f32; positions * half],
                vec![0.0f32; positions * half],
            );
            for p in 0..positions {
                for k in 0..half {
                    let t = p as f64 / 10000f64.powf((2 * k) as f64 / head_dim as f64);
                    cos[p * half + k] = t.cos() as f32;
                    sin[p * half + k] = t.sin() as f32;
                }
            }
            let x = rng.vec(rows * n, -2.0, 2.0);
            let mut mem = Mem::new();
            let out = mem.f32s(&x);
            let (ca, sa) = (mem.f32s(&cos), mem.f32s(&sin));
            let args = [
                V::I(out),
                V::I(ca),
                V::I(sa),
                i(rows),
                i(n),
                i(head_dim),
                V::I(support::rope_style_code(style)),
                i(pos0),
            ];
            run_support(support::ROPE_ROWS, &mut mem, rows, &args);
            let rp = RopeEpi {
                cos: &cos,
                sin: &sin,
                head_dim,
                style,
                pos: RowPos::From(pos0),
            };
            let mut want = x.clone();
            for (r, row) in want.chunks_mut(n).enumerate() {
                rp.rotate(row, pos0 + r);
            }
            let got = mem.read(out);
            // The device rounds `a·c − b·s` once less (an fma, as the generated `Rope` kernel).
            let what = format!("rope_rows {style:?} head_dim={head_dim} pos0={pos0}");
            let worst = worst_rel(&what, &[want], std::slice::from_ref(&got), 1e-6);
            eprintln!("{what}: max relative |Δ| = {worst:.1e}");
            assert_ne!(got, x, "{what}: nothing was rotated");
        }
    }
}
