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
        "{}\nrows[]: {}\nrows[].criteria: {}\nrows[].layers[]: {}\nsettled[]: {}\nsettled[].layers[]: {}",
        keys(&v),
        keys(&v["rows"][0]),
        keys(&v["rows"][0]["criteria"]),
        keys(&v["rows"][0]["layers"][0]),
        keys(&v["settled"][0]),
        keys(&v["settled"][0]["layers"][0])
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

/// `h ← h + attention(h, h, h)` with two heads of width 2: at iteration 0 the queries and keys
/// are the embedding rows, so each head's attention entropy has a closed form.
fn self_attention(exit: &str) -> Model {
    let src = format!(
        r#"
param dim = 4
param vocab = 8
forward(tokens) {{
  weight wte = "wte" [vocab, dim]
  recur 4 {{
    state h = embed(tokens, wte)
    exit {exit}
    h = h + attention(h, h, h, 2, 2)
  }}
  return linear(h, wte)
}}"#
    );
    let wte: Vec<f32> = (0..32).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
    toy_model(&src, &[("wte", vec![8, 4], &wte)])
}

#[test]
fn trace_attention_entropy_criteria_and_decisions() {
    let wte: Vec<f32> = (0..32).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
    let tokens = [3u32, 1, 6, 2];
    let mut s = self_attention("fixed").session();
    s.set_trace(true);
    s.prefill(&tokens).unwrap();
    let t = s.take_trace();
    assert_eq!(t.len(), 4 * 4);
    for st in t.iter().filter(|x| x.iteration == 0) {
        assert_eq!(st.attn_entropy.len(), 1, "one attention site");
        for h in 0..2 {
            let q = &wte[tokens[st.position] as usize * 4 + 2 * h..][..2];
            let scores: Vec<f64> = (0..=st.position)
                .map(|j| {
                    let k = &wte[tokens[j] as usize * 4 + 2 * h..][..2];
                    (q[0] * k[0] + q[1] * k[1]) as f64 / 2f64.sqrt()
                })
                .collect();
            let z: f64 = scores.iter().map(|s| s.exp()).sum();
            let want: f64 = scores
                .iter()
                .map(|s| -(s.exp() / z) * (s.exp() / z).ln())
                .sum();
            let got = st.attn_entropy[0][h] as f64;
            assert!(
                (got - want).abs() < 1e-4,
                "pos {} head {h}: {got} vs {want}",
                st.position
            );
        }
        // One layer: its output is the block's.
        assert_eq!(st.layers.len(), 1);
        assert_eq!(st.layers[0].norm, st.norm);
        assert!((st.criteria.latent_diff - st.rel_update as f64).abs() < 1e-5);
        assert!((st.criteria.cosine - (1.0 - st.cosine as f64)).abs() < 1e-5);
    }
    for st in &t {
        // The readout runs every traced iteration: every logit criterion has a value.
        assert!(st.criteria.kl.is_some() && st.criteria.argmax.is_some());
        assert_eq!(
            st.exited,
            st.iteration == 3,
            "fixed depth: stop at the last"
        );
    }
    // Argmax stability 1: a token stops at the first iteration whose argmax repeats, and its
    // trace shows the criterion's value at that step.
    let mut s = self_attention("argmax_stability(threshold = 1, max = 4)").session();
    s.set_trace(true);
    s.prefill(&tokens).unwrap();
    let t = s.take_trace();
    for p in 0..4 {
        let mine: Vec<_> = t.iter().filter(|x| x.position == p).collect();
        let last = mine.last().unwrap();
        assert!(last.exited);
        assert!(mine[..mine.len() - 1].iter().all(|x| !x.exited));
        let v = last.criteria.argmax_stability.unwrap();
        assert!(v >= 1.0 || mine.len() == 4, "{last:?}");
        for x in &mine[..mine.len() - 1] {
            assert_eq!(x.criteria.argmax_stability, Some(0.0));
        }
    }
}

#[test]
fn trace_layers_follow_the_residual_stream() {
    let m = model(
        "ltg",
        "ltg_tiny/config.json",
        "ltg_tiny/model.safetensors",
        &["inject=1", "positions=1"],
        1,
    );
    let layers = m.manifest().params["layers"] as usize;
    let mut s = m.session();
    s.set_steps(Some(3));
    s.set_trace(true);
    s.prefill(&[1, 5, 9]).unwrap();
    let t = s.take_trace();
    for st in &t {
        assert_eq!(st.layers.len(), layers, "one entry per GPT-2 block");
        assert_eq!(st.attn_entropy.len(), layers);
        // The last layer's output is the state; the others differ from it.
        assert_eq!(st.layers[layers - 1].state, st.state);
        if layers > 1 {
            assert_ne!(st.layers[0].state, st.state);
        }
        for (p, e) in st.attn_entropy.iter().flatten().enumerate() {
            let bound = ((st.position + 1) as f32).ln() + 1e-5;
            assert!(
                (0.0..=bound).contains(e),
                "head {p}: {e} > ln(positions) {bound}"
            );
        }
    }
}

#[test]
fn trace_png_decodes_with_the_expected_size() {
    let png = std::env::temp_dir().join(format!("loopc-trace-{}.png", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopc"))
        .args([
            "trace",
            "examples/ltg.loop",
            "--config",
            "tests/fixtures/ltg_tiny/config.json",
            "--weights",
            "tests/fixtures/ltg_tiny/model.safetensors",
            "--tokens",
            "5 6 7",
            "--steps",
            "3",
            "--png",
        ])
        .arg(&png)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    let img = tiny_skia::Pixmap::decode_png(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (1280, 480));
    // Something was drawn: not every pixel is the white background.
    assert!(img.pixels().iter().any(|p| p.red() < 200 && p.blue() > 200));
}
