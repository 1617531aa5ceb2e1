//! `loopc trace` and `Session::set_trace`: per-iteration statistics checked against a loop whose
//! trajectory is known in closed form, and the JSON schema of the CLI output.
mod common;
use common::*;
use loopc_runtime::trace::{analyze, Settled};
use loopc_runtime::Model;

/// `h ← h · diag(a)`: with a = 2 the norm doubles each step (rel update 1/2, cosine 1); with
/// a = −1 the state flips sign (a cycle of period 2); with a = 1 it is a fixed point.
fn diagonal(a: f32) -> Model {
    let src = r#"
param dim = 4
param vocab = 8
forward(tokens) {
  weight wte = "wte" [vocab, dim]
  weight w = "w" [dim, dim]
  recur 6 {
    state h = embed(tokens, wte)
    h = linear(h, w)
  }
  return linear(h, wte)
}"#;
    let wte: Vec<f32> = (0..32)
        .map(|i| ((i % 5) as f32 - 2.0) / 3.0 + 0.1)
        .collect();
    let mut w = vec![0.0f32; 16];
    for i in 0..4 {
        w[i * 4 + i] = a;
    }
    toy_model(src, &[("wte", vec![8, 4], &wte), ("w", vec![4, 4], &w)])
}

#[test]
fn trace_statistics_follow_the_closed_form() {
    let m = diagonal(2.0);
    let mut s = m.session();
    s.set_trace(true);
    s.prefill(&[1, 2, 3]).unwrap();
    let t = s.take_trace();
    assert_eq!(t.len(), 3 * 6, "one row per token and iteration");
    for st in &t {
        assert!((st.rel_update - 0.5).abs() < 1e-6, "{st:?}");
        assert!((st.cosine - 1.0).abs() < 1e-6);
    }
    let p0: Vec<_> = t.iter().filter(|x| x.position == 0).collect();
    assert!((p0[5].norm / p0[0].norm - 32.0).abs() < 1e-3);
    assert!(matches!(analyze(&p0, 1e-3, 4), Settled::Moving { .. }));

    let mut s = diagonal(-1.0).session();
    s.set_trace(true);
    s.prefill(&[4]).unwrap();
    let t = s.take_trace();
    assert_eq!(
        analyze(&t.iter().collect::<Vec<_>>(), 1e-3, 4),
        Settled::Cycle {
            period: 2,
            distance: 0.0
        }
    );
    assert!(t.iter().all(|x| (x.cosine + 1.0).abs() < 1e-6));

    let mut s = diagonal(1.0).session();
    s.set_trace(true);
    s.prefill(&[4]).unwrap();
    let t = s.take_trace();
    assert!(matches!(
        analyze(&t.iter().collect::<Vec<_>>(), 1e-3, 4),
        Settled::FixedPoint { .. }
    ));
    // Off by default: nothing is recorded.
    let mut s = diagonal(1.0).session();
    s.prefill(&[4]).unwrap();
    assert!(s.take_trace().is_empty());
}

#[test]
fn trace_json_schema() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopc"))
        .args([
            "trace",
            "examples/ouro.loop",
            "--config",
            "tests/fixtures/ouro_tiny/config.json",
            "--weights",
            "tests/fixtures/ouro_tiny/model.safetensors",
            "--tokens",
            "5 6 7",
            "--steps",
            "5",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The schema: top-level keys, then the keys of a row and of a settled entry.
    let keys = |o: &serde_json::Value| {
        let mut k: Vec<String> = o.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k.join(",")
    };
    let schema = format!(
        "{}\nrows[]: {}\nsettled[]: {}",
        keys(&v),
        keys(&v["rows"][0]),
        keys(&v["settled"][0])
    );
    insta::assert_snapshot!(schema);
    assert_eq!(v["rows"].as_array().unwrap().len(), 3 * 5);
    assert_eq!(v["iterations"], 5);
}

#[test]
fn trace_svg_has_one_series_per_token() {
    let svg = std::env::temp_dir().join(format!("loopc-trace-{}.svg", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopc"))
        .args([
            "trace",
            "examples/ltg.loop",
            "--config",
            "tests/fixtures/ltg_tiny/config.json",
            "--set",
            "positions=2",
            "--weights",
            "tests/fixtures/ltg_tiny/model.safetensors",
            "--tokens",
            "5 6 7 8",
            "--steps",
            "4",
            "--format",
            "csv",
            "--svg",
        ])
        .arg(&svg)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        csv.lines().count(),
        1 + 4 * 4,
        "header + one line per token and iteration"
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert_eq!(
        text.matches("<polyline").count(),
        4,
        "one trajectory per token"
    );
    assert_eq!(
        text.matches("<circle").count(),
        16,
        "one point per token and iteration"
    );
}
