//! Rendered diagnostics of the elaborator (semantic errors: names, shapes, policies, loop
//! structure), one bad file each under `tests/diagnostics/elab/`.
use loopc_compiler::driver::{self, CompileError, Options};
use std::path::PathBuf;

fn render(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/diagnostics/elab")
        .join(format!("{name}.loop"));
    let text = std::fs::read_to_string(&path).unwrap();
    let opts = Options {
        verify: true,
        opt_level: 1,
        ..Default::default()
    };
    let front = driver::front_from_source(&format!("{name}.loop"), &text, &opts)
        .unwrap_or_else(|e| panic!("{e}"));
    match driver::graph(&front, &opts) {
        Err(CompileError::Diagnostics(s)) => s,
        Err(other) => panic!("{name}: expected diagnostics, got {other}"),
        Ok(_) => panic!("{name}: expected an error"),
    }
}

macro_rules! diag_snapshots {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let text = render(stringify!($name));
            assert!(text.contains("error[E03"), "{text}");
            insta::assert_snapshot!(text);
        }
    )*};
}

diag_snapshots!(
    unknown_name,
    shape_mismatch,
    bad_exit_policy,
    unknown_cache_policy,
    recur_without_state,
    assign_outside_loop,
    layer_without_return,
    unknown_keyword,
    split_sizes,
    weight_two_shapes,
    bad_rope_style,
    several_errors,
    bad_criterion_param,
    unknown_criterion_keyword,
    unknown_criterion,
    gate_exit_without_gate,
    routing_without_router,
    iteration_index_misuse,
);

#[test]
fn several_errors_are_all_reported() {
    let text = render("several_errors");
    assert!(text.matches("error[").count() >= 3, "{text}");
}
