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
        .err()
        .expect("--stage ptx needs the feature")
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
