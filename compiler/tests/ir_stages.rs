//! Snapshots of every IR stage of both example families (at the tiny fixture sizes, so the
//! text stays reviewable), and round trips of the graph IR's text form.
use loopc_compiler::driver::{self, Options};
use loopc_dialects::parse::parse_module;
use loopc_dialects::print::print_module;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn opts(config: &str) -> Options {
    Options {
        config: Some(root().join("tests/fixtures").join(config)),
        set: vec![],
        verify: true,
        opt_level: 1,
        ..Default::default()
    }
}

fn stage(example: &str, config: &str, stage: &str) -> String {
    let path = root().join("examples").join(format!("{example}.loop"));
    let mut o = opts(config);
    if example == "huginn" {
        o.set.push("init_scale=0".into());
    }
    let f = driver::front_from_source(&format!("examples/{example}.loop"), &std::fs::read_to_string(path).unwrap(), &o)
        .unwrap_or_else(|e| panic!("{e}"));
    driver::stage_text_front(&f, stage, &o).unwrap_or_else(|e| panic!("{e}"))
}

macro_rules! stage_snapshots {
    ($($name:ident: $ex:literal, $cfg:literal, $stage:literal;)*) => {$(
        #[test]
        fn $name() {
            insta::assert_snapshot!(stage($ex, $cfg, $stage));
        }
    )*};
}

stage_snapshots! {
    huginn_ast: "huginn", "huginn_tiny/config.json", "ast";
    huginn_graph: "huginn", "huginn_tiny/config.json", "graph";
    huginn_egraph: "huginn", "huginn_tiny/config.json", "egraph";
    huginn_lowered: "huginn", "huginn_tiny/config.json", "lowered";
    huginn_program: "huginn", "huginn_tiny/config.json", "program";
    ouro_ast: "ouro", "ouro_tiny/config.json", "ast";
    ouro_graph: "ouro", "ouro_tiny/config.json", "graph";
    ouro_egraph: "ouro", "ouro_tiny/config.json", "egraph";
    ouro_lowered: "ouro", "ouro_tiny/config.json", "lowered";
    ouro_program: "ouro", "ouro_tiny/config.json", "program";
}

#[test]
fn graph_text_round_trips() {
    for (ex, cfg) in [("huginn", "huginn_tiny/config.json"), ("ouro", "ouro_tiny/config.json")] {
        for st in ["graph", "egraph", "lowered"] {
            let text = stage(ex, cfg, st);
            let m = parse_module(&text).unwrap_or_else(|e| panic!("{ex}/{st}: {e}"));
            assert_eq!(print_module(&m), text, "{ex}/{st} does not round-trip");
            loopc_dialects::verify::verify_module(&m).unwrap();
        }
    }
}

#[test]
fn verifier_rejects_a_broken_module() {
    let text = stage("ouro", "ouro_tiny/config.json", "graph");
    // Corrupt one stored type: the verifier must name the node.
    let bad = text.replacen(": [S, 64]", ": [S, 65]", 1);
    let m = parse_module(&bad).unwrap();
    let err = loopc_dialects::verify::verify_module(&m).unwrap_err();
    assert!(err.message.contains("stored type [S, 65]"), "{err}");
}

#[test]
fn full_size_huginn_elaborates() {
    // The defaults are the released 3.5B model: 8 blocks, 32 steps.
    let path = root().join("examples/huginn.loop");
    let o = Options { verify: true, opt_level: 1, ..Default::default() };
    let f = driver::front(&path, &o).unwrap();
    let (mut m, _) = driver::graph(&f, &o).unwrap();
    driver::optimize(&mut m, &o).unwrap();
    let p = driver::program(&m).unwrap();
    assert_eq!(p.hidden, 5280);
    assert_eq!(p.vocab, 65536);
    assert_eq!(p.kv_sites.iter().filter(|s| s.in_loop).count(), 4);
    assert_eq!(p.kv_sites.len(), 8);
    assert_eq!(p.program.recur.as_ref().unwrap().default_steps, 32);
}
