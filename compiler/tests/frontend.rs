//! Front-end tests: the examples parse and print canonically, params evaluate with overrides,
//! and every bad input in `tests/diagnostics/` renders the expected diagnostics.

use std::path::PathBuf;

use loopc_compiler::frontend::ast::{File, Item};
use loopc_compiler::frontend::params::ValueSource;
use loopc_compiler::frontend::{
    eval_params, parse, print, render, Diagnostic, Overrides, SourceMap, Value,
};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Loads `rel` (relative to the repository root) under its relative name, so rendered
/// diagnostics are independent of where the checkout lives.
fn load(sm: &mut SourceMap, rel: &str) -> usize {
    let text =
        std::fs::read_to_string(repo_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    sm.add(rel, text)
}

fn parse_clean(rel: &str) -> File {
    let mut sm = SourceMap::new();
    let id = load(&mut sm, rel);
    let (file, diags) = parse(&sm, id);
    assert!(diags.is_empty(), "{}", render(&sm, &diags, false));
    file
}

fn parse_text(text: &str) -> (File, Vec<Diagnostic>) {
    let mut sm = SourceMap::new();
    let id = sm.add("text.loop", text);
    parse(&sm, id)
}

fn config(json: &str) -> Option<(String, serde_json::Map<String, serde_json::Value>)> {
    let serde_json::Value::Object(map) = serde_json::from_str(json).unwrap() else {
        panic!("not an object")
    };
    Some(("config.json".to_string(), map))
}

fn set_args(
    sm: &mut SourceMap,
    args: &[&str],
) -> Vec<(String, String, Option<loopc_compiler::frontend::Span>)> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (set, diags) = Overrides::parse_set_args(sm, &args);
    assert!(diags.is_empty(), "{}", render(sm, &diags, false));
    set
}

const EXAMPLES: [&str; 4] = [
    "examples/huginn.loop",
    "examples/ouro.loop",
    "examples/ltg.loop",
    "examples/parcae.loop",
];

#[test]
fn examples_parse_without_diagnostics() {
    for ex in EXAMPLES {
        let file = parse_clean(ex);
        assert!(
            file.items.iter().any(|i| matches!(i, Item::Forward(_))),
            "{ex}"
        );
    }
}

#[test]
fn printer_is_a_fixed_point() {
    for ex in EXAMPLES {
        let once = print(&parse_clean(ex));
        let (reparsed, diags) = parse_text(&once);
        assert!(diags.is_empty(), "{ex}: printed form does not re-parse");
        let twice = print(&reparsed);
        assert_eq!(once, twice, "{ex}");
    }
}

#[test]
fn printed_huginn() {
    insta::assert_snapshot!(print(&parse_clean("examples/huginn.loop")));
}

#[test]
fn printed_ouro() {
    insta::assert_snapshot!(print(&parse_clean("examples/ouro.loop")));
}

#[test]
fn ast_with_spans() {
    let (file, diags) = parse_text(
        "param d = -(2 + x) * 3 from \"k\"\nforward(t) { let a, b = f(t[0], s = \"{t}.w\") }",
    );
    assert!(diags.is_empty());
    insta::assert_debug_snapshot!(file);
}

#[test]
fn printer_parenthesizes_only_where_needed() {
    let src = "param a = (1 - (2 - 3)) - (4 * (5 / 6)) + -(7 + 8) * (9) + (-x)[0]\n";
    let (file, diags) = parse_text(src);
    assert!(diags.is_empty());
    assert_eq!(
        print(&file),
        "param a = 1 - (2 - 3) - 4 * (5 / 6) + -(7 + 8) * 9 + (-x)[0]\n"
    );
}

#[test]
fn numbers_and_strings_round_trip() {
    let src = "param a = 1e-6\nparam b = 1000000.0\nparam c = 2.5e300\nparam d = 0.1\nmodel \"q\\\"{{x}}\\\\\\t\"\n";
    let (file, diags) = parse_text(src);
    assert!(diags.is_empty());
    let printed = print(&file);
    assert_eq!(printed, "param a = 1e-6\nparam b = 1000000.0\nparam c = 2.5e300\nparam d = 0.1\n\nmodel \"q\\\"{{x}}\\\\\\t\"\n");
    let (again, _) = parse_text(&printed);
    assert_eq!(print(&again), printed);
}

#[test]
fn huginn_params_follow_set_overrides() {
    let mut sm = SourceMap::new();
    let id = load(&mut sm, "examples/huginn.loop");
    let (file, _) = parse(&sm, id);
    let overrides = Overrides {
        set: set_args(&mut sm, &["dim=64", "heads=4"]),
        config: None,
    };
    let (env, diags) = eval_params(&file, &overrides);
    assert!(diags.is_empty(), "{}", render(&sm, &diags, false));
    assert_eq!(env.get("dim"), Some(Value::Int(64)));
    assert_eq!(env.get("heads"), Some(Value::Int(4)));
    assert_eq!(env.get("head_dim"), Some(Value::Int(16)));
    assert_eq!(env.get("eps"), Some(Value::Float(1e-6)));
    assert_eq!(env.get("init_scale"), Some(Value::Float(1.0)));
    let names: Vec<&str> = env.iter().map(|(n, _)| n).collect();
    assert_eq!(names[..3], ["dim", "heads", "head_dim"]);
    assert_eq!(env.params[0].source, ValueSource::Set);
    assert_eq!(env.params[2].source, ValueSource::Default);

    let (env, _) = eval_params(&file, &Overrides::default());
    assert_eq!(env.get("head_dim"), Some(Value::Int(96)));
}

#[test]
fn huginn_params_follow_config() {
    let mut sm = SourceMap::new();
    let id = load(&mut sm, "examples/huginn.loop");
    let (file, _) = parse(&sm, id);
    let overrides = Overrides {
        set: set_args(&mut sm, &["steps=8"]),
        config: config(
            r#"{"n_embd": 128, "n_heads": 8.0, "norm_eps": 1e-5, "rope_base": 10000,
                "mean_recurrence": 32, "architectures": ["RavenForCausalLM"], "n_layers_in_coda": null}"#,
        ),
    };
    let (env, diags) = eval_params(&file, &overrides);
    assert!(diags.is_empty(), "{}", render(&sm, &diags, false));
    assert_eq!(env.get("dim"), Some(Value::Int(128)));
    assert_eq!(env.get("heads"), Some(Value::Int(8)));
    assert_eq!(env.get("head_dim"), Some(Value::Int(16)));
    assert_eq!(env.get("eps"), Some(Value::Float(1e-5)));
    // An int param keeps its kind; rope_base is an int param in huginn.
    assert_eq!(env.get("rope_base"), Some(Value::Int(10000)));
    // `--set` beats the config.
    assert_eq!(env.get("steps"), Some(Value::Int(8)));
    // `null` means "use the default".
    assert_eq!(env.get("n_coda"), Some(Value::Int(2)));
    assert_eq!(env.params[0].source, ValueSource::Config("n_embd".into()));
    assert_eq!(env.unused_config_keys, ["architectures"]);
    assert!(env.used_config_keys.contains(&"n_embd".to_string()));
    let warning = env.unused_config_warning("config.json").unwrap();
    insta::assert_snapshot!(render(&sm, &[warning], false));
}

#[test]
fn ouro_head_dim_is_overridable_independently() {
    let mut sm = SourceMap::new();
    let id = load(&mut sm, "examples/ouro.loop");
    let (file, _) = parse(&sm, id);
    // 1000 / 12 is not exact, but head_dim comes from the config, so the default is not evaluated.
    let overrides = Overrides {
        set: Vec::new(),
        config: config(
            r#"{"hidden_size": 1000, "num_attention_heads": 12, "head_dim": 80, "rope_theta": 10000}"#,
        ),
    };
    let (env, diags) = eval_params(&file, &overrides);
    assert!(diags.is_empty(), "{}", render(&sm, &diags, false));
    assert_eq!(env.get("head_dim"), Some(Value::Int(80)));
    assert_eq!(env.get("rope_base"), Some(Value::Float(10000.0)));
}

#[test]
fn integral_float_overrides_an_int_param() {
    let (file, _) = parse_text("param dim = 64\nparam half = dim / 2\n");
    let overrides = Overrides {
        set: vec![("dim".into(), "128.0".into(), None)],
        config: None,
    };
    let (env, diags) = eval_params(&file, &overrides);
    assert!(diags.is_empty());
    assert_eq!(env.get("half"), Some(Value::Int(64)));
}

#[test]
fn config_flags_nested_keys_and_remainders() {
    // The authors' Parcae config: booleans, a nested `rope_settings`, `null` for "none".
    let (file, d) = parse_text(
        "param qk = 0 from \"qk_norm\"\nparam base = 10000.0 from \"rope_settings.rope_base\"\n\
         param cap = 0.0 from \"logit_softcap\"\nparam odd = (base - 1) % 2\nparam r = 7 % 3\n",
    );
    assert!(d.is_empty(), "{d:?}");
    let overrides = Overrides {
        set: vec![],
        config: config(
            r#"{"qk_norm": true, "rope_settings": {"rope_base": 50000}, "logit_softcap": null}"#,
        ),
    };
    let (env, diags) = eval_params(&file, &overrides);
    assert!(diags.is_empty(), "{diags:?}");
    assert_eq!(env.get("qk"), Some(Value::Int(1)));
    assert_eq!(env.get("base"), Some(Value::Float(50000.0)));
    assert_eq!(env.get("cap"), Some(Value::Float(0.0)));
    assert_eq!(env.get("odd"), Some(Value::Float(1.0)));
    assert_eq!(env.get("r"), Some(Value::Int(1)));
    assert!(env.unused_config_keys.is_empty());
    assert_eq!(print(&file).lines().nth(4), Some("param r = 7 % 3"));
    // Unread keys are errors, inside a nested object that is read into as well.
    let overrides = Overrides {
        set: vec![],
        config: config(r#"{"rope_settings": {"rope_base": 50000, "use_rope": true}, "extra": 1}"#),
    };
    let (_, diags) = eval_params(&file, &overrides);
    let msgs: Vec<&str> = diags.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(diags.len(), 2, "{msgs:?}");
    assert!(msgs.iter().any(|m| m.contains("`extra`")), "{msgs:?}");
    assert!(
        msgs.iter().any(|m| m.contains("`rope_settings.use_rope`")),
        "{msgs:?}"
    );
}

// ---- diagnostics ----

/// Parses `tests/diagnostics/NAME.loop`, evaluates its params when it parses cleanly, and
/// renders every diagnostic. `set` and `config` build the overrides.
fn diagnostics(name: &str, set: &[&str], config_json: Option<&str>) -> String {
    let mut sm = SourceMap::new();
    let id = load(&mut sm, &format!("tests/diagnostics/{name}.loop"));
    let (file, mut diags) = parse(&sm, id);
    if diags.is_empty() {
        let args: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        let (set, set_diags) = Overrides::parse_set_args(&mut sm, &args);
        diags.extend(set_diags);
        let overrides = Overrides {
            set,
            config: config_json.and_then(config),
        };
        let (_, param_diags) = eval_params(&file, &overrides);
        diags.extend(param_diags);
    }
    assert!(!diags.is_empty(), "{name}: expected diagnostics");
    for d in &diags {
        assert!(
            d.code.is_some(),
            "{name}: diagnostic without a code: {}",
            d.message
        );
    }
    render(&sm, &diags, false)
}

macro_rules! diag_test {
    ($name:ident $(, [$($set:expr),*])? $(, config = $cfg:expr)?) => {
        #[test]
        fn $name() {
            let set: &[&str] = &[$($($set),*)?];
            let cfg: Option<&str> = None $(.or(Some($cfg)))?;
            insta::assert_snapshot!(diagnostics(stringify!($name), set, cfg));
        }
    };
}

diag_test!(missing_eq);
diag_test!(unterminated_string);
diag_test!(unclosed_brace);
diag_test!(unclosed_paren);
diag_test!(bad_number);
diag_test!(bad_interpolation);
diag_test!(unexpected_char);
diag_test!(keyword_name);
diag_test!(many_errors);
diag_test!(unknown_set, ["dims=64", "headz=2", "vocab=100", "heads"]);
diag_test!(inexact_division, ["heads=64"]);
diag_test!(
    config_wrong_type,
    config = r#"{"n_embd": "5280", "n_heads": 55, "norm_eps": [1e-6]}"#
);
diag_test!(
    not_integer,
    ["heads=4.5", "eps=abc"],
    config = r#"{"hidden_size": 64.5}"#
);
diag_test!(
    unknown_config_key,
    config = r#"{"hidden_size": 64, "num_attention_heads": 4, "hidden_act": "silu",
                "architectures": ["X"], "num_atention_heads": 4, "rope_scaling": null}"#
);
diag_test!(
    requirement_failed,
    config = r#"{"hidden_size": 64, "num_attention_heads": 6, "num_key_value_heads": 4,
                "tie_word_embeddings": true}"#
);
diag_test!(duplicate_param);
diag_test!(later_param);
diag_test!(unknown_name);
diag_test!(param_expr);

#[test]
fn many_errors_are_all_reported() {
    let mut sm = SourceMap::new();
    let id = load(&mut sm, "tests/diagnostics/many_errors.loop");
    let (file, diags) = parse(&sm, id);
    assert!(diags.len() >= 6, "{}", render(&sm, &diags, false));
    // Recovery keeps the items around the errors.
    assert_eq!(file.items.len(), 3);
}

#[test]
fn error_count_is_capped() {
    let src = "forward(x) {\n".to_string() + &"  let = 1\n".repeat(50) + "}\n";
    let (_, diags) = parse_text(&src);
    assert_eq!(diags.len(), 21);
    assert_eq!(diags[20].code.as_deref(), Some("E0009"));
}

#[test]
fn garbage_never_panics() {
    let inputs = [
        "",
        "\"",
        "{",
        "}",
        "(((",
        "param",
        "param x =",
        "layer",
        "forward(",
        "1e",
        "1.",
        "\"{",
        "\"\\",
        "\u{e9}\u{1F600} param x = 1",
        "let x = f(a)(b)",
        "forward(x) { x = (1)(2) }",
        "param x = --1",
        "forward(x) { for i in 0.. { } }",
        "param a = 9223372036854775807 + 1",
        "param a = 1 / 0.0",
    ];
    for src in inputs {
        let mut sm = SourceMap::new();
        let id = sm.add("g.loop", src);
        let (file, diags) = parse(&sm, id);
        let _ = render(&sm, &diags, false);
        let _ = print(&file);
        let (_, diags) = eval_params(&file, &Overrides::default());
        let _ = render(&sm, &diags, true);
    }
}
