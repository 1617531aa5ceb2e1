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
    if example == "ltg" {
        o.set.extend(["positions=1".into(), "inject=1".into()]);
    }
    if example == "mor" {
        // Expert choice over sequence sharing: per-recursion routers and layer weights.
        o.set.extend(["routing=1".into(), "sharing=3".into()]);
    }
    let f = driver::front_from_source(
        &format!("examples/{example}.loop"),
        &std::fs::read_to_string(path).unwrap(),
        &o,
    )
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
    ltg_ast: "ltg", "ltg_tiny/config.json", "ast";
    ltg_graph: "ltg", "ltg_tiny/config.json", "graph";
    ltg_program: "ltg", "ltg_tiny/config.json", "program";
    mor_graph: "mor", "mor_tiny/config.json", "graph";
    mor_program: "mor", "mor_tiny/config.json", "program";
    parcae_ast: "parcae", "parcae_tiny/config.json", "ast";
    parcae_graph: "parcae", "parcae_tiny/config.json", "graph";
    parcae_egraph: "parcae", "parcae_tiny/config.json", "egraph";
    parcae_program: "parcae", "parcae_tiny/config.json", "program";
}

#[test]
fn graph_text_round_trips() {
    for (ex, cfg) in [
        ("huginn", "huginn_tiny/config.json"),
        ("ouro", "ouro_tiny/config.json"),
        ("ltg", "ltg_tiny/config.json"),
        ("mor", "mor_tiny/config.json"),
        ("parcae", "parcae_tiny/config.json"),
    ] {
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
    let o = Options {
        verify: true,
        opt_level: 1,
        ..Default::default()
    };
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

#[test]
fn printed_ast_is_a_fixed_point_for_every_example() {
    use loopc_compiler::frontend::{parse, print, SourceMap};
    for ex in ["huginn", "ouro", "ltg", "mor", "parcae"] {
        let text = std::fs::read_to_string(root().join(format!("examples/{ex}.loop"))).unwrap();
        let mut sm = SourceMap::new();
        let f = sm.add(ex, text);
        let (ast, d) = parse(&sm, f);
        assert!(d.is_empty(), "{ex}: {d:?}");
        let once = print(&ast);
        let mut sm2 = SourceMap::new();
        let f2 = sm2.add(ex, once.clone());
        let (ast2, d2) = parse(&sm2, f2);
        assert!(d2.is_empty(), "{ex} printed form re-parses: {d2:?}");
        assert_eq!(print(&ast2), once, "{ex}");
    }
}

/// The new exit and cache policies survive the graph IR's text form.
#[test]
fn variable_depth_policies_round_trip() {
    let src = std::fs::read_to_string(root().join("examples/huginn.loop")).unwrap();
    for (exit, cache) in [
        (
            "kl(threshold = 5e-4, min_steps = 2, every = 3, max = 9)",
            "ring(2)",
        ),
        ("argmax_stability(threshold = 5)", "share_first"),
        ("latent_diff(threshold = 0.03)", "last_step"),
        ("minp_kl(threshold = 1e-5)", "recursion_wise"),
    ] {
        let text = src
            .replace("exit fixed", &format!("exit {exit}"))
            .replace("cache per_step", &format!("cache {cache}"));
        let mut o = opts("huginn_tiny/config.json");
        o.set.push("init_scale=0".into());
        let f =
            driver::front_from_source("huginn.loop", &text, &o).unwrap_or_else(|e| panic!("{e}"));
        let g = driver::stage_text_front(&f, "graph", &o).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            g.contains(&format!("cache={}", cache.replace(' ', ""))),
            "{g}"
        );
        let m = parse_module(&g).unwrap_or_else(|e| panic!("{exit}: {e}"));
        assert_eq!(print_module(&m), g, "{exit} / {cache} does not round-trip");
    }
    let ouro = std::fs::read_to_string(root().join("examples/ouro.loop")).unwrap();
    for exit in ["act(eps = 0.01, max = 6)", "gate(q = 0.5, min_steps = 2)"] {
        let o = opts("ouro_tiny/config.json");
        let f = driver::front_from_source(
            "ouro.loop",
            &ouro.replace("exit fixed", &format!("exit {exit}")),
            &o,
        )
        .unwrap();
        let g = driver::stage_text_front(&f, "graph", &o).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            print_module(&parse_module(&g).unwrap()),
            g,
            "{exit} does not round-trip"
        );
    }
    let text = src.replace("exit fixed", "exit gate(q = 0.5)");
    let f =
        driver::front_from_source("huginn.loop", &text, &opts("huginn_tiny/config.json")).unwrap();
    assert!(
        driver::graph(&f, &opts("huginn_tiny/config.json")).is_err(),
        "gate exit without exit_gate"
    );
}

/// The authors' published config files (as downloaded, every field) configure the families at
/// full size: each field is read, deliberately ignored or checked by a `require`.
#[test]
fn published_configs_configure_their_families() {
    for (ex, cfg, want) in [
        ("huginn", "huginn-0125.json", ("dim", 5280.0)),
        ("ouro", "ouro-1.4b.json", ("layers", 24.0)),
        ("mor", "smollm-360m.json", ("kv_heads", 5.0)),
        ("ltg", "gpt2.json", ("ffn", 3072.0)),
    ] {
        let o = Options {
            config: Some(root().join("tests/fixtures/configs").join(cfg)),
            verify: true,
            opt_level: 1,
            ..Default::default()
        };
        let path = root().join("examples").join(format!("{ex}.loop"));
        let f = driver::front(&path, &o).unwrap_or_else(|e| panic!("{ex}/{cfg}: {e}"));
        let (m, _) = driver::graph(&f, &o).unwrap_or_else(|e| panic!("{ex}/{cfg}: {e}"));
        let got = m.params.iter().find(|(n, _)| n == want.0).map(|(_, v)| *v);
        assert_eq!(got, Some(want.1), "{ex}/{cfg}");
    }
    // A field the file neither reads nor ignores is an error, not silently dropped.
    let text = std::fs::read_to_string(root().join("tests/fixtures/configs/ouro-1.4b.json"))
        .unwrap()
        .replace(
            "\"use_cache\": true",
            "\"use_cache\": true, \"num_experts\": 8",
        );
    let dir = std::env::temp_dir().join(format!("loopc-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), text).unwrap();
    let o = Options {
        config: Some(dir.join("config.json")),
        ..Default::default()
    };
    let Err(e) = driver::front(&root().join("examples/ouro.loop"), &o) else {
        panic!("an unknown config field must be an error");
    };
    assert!(e.to_string().contains("num_experts"), "{e}");
}
