//! The MLIR backend's emission, which needs no LLVM: snapshots of the `loop`-dialect module of
//! both example families (kernels declared only, so the structure stays reviewable) and of one
//! kernel function. Verification, `mlir-opt-22` and execution are in `tests/mlir_backend.rs`
//! (feature `mlir`).
use loopc_compiler::backend::mlir;
use loopc_compiler::driver::{self, Options};
use loopc_runtime::artifact::{KernelDecl, KernelSpec, Manifest};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifest(example: &str, config: &str, set: &[&str]) -> Manifest {
    let o = Options {
        config: Some(root().join("tests/fixtures").join(config)),
        set: set.iter().map(|s| s.to_string()).collect(),
        verify: true,
        opt_level: 1,
        ..Default::default()
    };
    let path = root().join("examples").join(format!("{example}.loop"));
    let f = driver::front_from_source(
        &format!("examples/{example}.loop"),
        &std::fs::read_to_string(path).unwrap(),
        &o,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (mut m, _) = driver::graph(&f, &o).unwrap_or_else(|e| panic!("{e}"));
    driver::optimize(&mut m, &o).unwrap_or_else(|e| panic!("{e}"));
    driver::program(&m).unwrap_or_else(|e| panic!("{e}"))
}

fn structure(example: &str, config: &str, set: &[&str]) -> String {
    let m = manifest(example, config, set);
    let text = mlir::program_module(&m, false).unwrap();
    // Every kernel the structure calls is declared, and every declared kernel is called.
    for k in &m.kernels {
        assert!(
            text.contains(&format!("func.func private @{}(", k.symbol)),
            "{} is not declared",
            k.symbol
        );
        assert!(
            text.contains(&format!("callee = @{},", k.symbol)),
            "{} is never called",
            k.symbol
        );
    }
    assert_eq!(
        text,
        mlir::program_module(&m, false).unwrap(),
        "emission is deterministic"
    );
    text
}

#[test]
fn huginn_loop_dialect_module() {
    insta::assert_snapshot!(structure(
        "huginn",
        "huginn_tiny/config.json",
        &["init_scale=0"]
    ));
}

#[test]
fn ouro_loop_dialect_module() {
    insta::assert_snapshot!(structure("ouro", "ouro_tiny/config.json", &[]));
}

#[test]
fn rmsnorm_kernel_function() {
    let decl = KernelDecl {
        symbol: "rmsnorm_res_gain".into(),
        spec: KernelSpec::RmsNorm {
            cols: 40,
            eps: 1e-6,
            residual: true,
            gain: true,
        },
    };
    insta::assert_snapshot!(mlir::kernel_func(&decl).unwrap());
}

#[test]
fn full_module_has_a_body_for_every_kernel() {
    let m = manifest("ouro", "ouro_tiny/config.json", &[]);
    let text = mlir::program_module(&m, true).unwrap();
    for k in &m.kernels {
        assert!(
            text.contains(&format!(
                "func.func @{}(%ptrs: !llvm.ptr, %ints: !llvm.ptr) {{",
                k.symbol
            )),
            "{} has no body",
            k.symbol
        );
    }
    assert!(text.contains("func.func private @__loopc_view"));
}

#[test]
fn invalid_specs_are_errors_not_panics() {
    let decl = KernelDecl {
        symbol: "bad".into(),
        spec: KernelSpec::Rope {
            heads: 2,
            head_dim: 7,
            style: loopc_runtime::artifact::RopeStyle::Half,
        },
    };
    let e = mlir::kernel_func(&decl).unwrap_err().to_string();
    assert!(e.contains("must be even"), "{e}");
}
