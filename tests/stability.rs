//! Long loops: at r = 128, far past any training depth, every family either produces finite
//! logits or stops with a clean guard error; a diverging recurrence is never a silent NaN.
mod common;
use common::*;
use loopc_runtime::guard::{EventKind, Guard, GuardMode};
use loopc_runtime::{Model, RuntimeError};

fn finite(x: &[f32]) -> bool {
    x.iter().all(|v| v.is_finite())
}

#[test]
fn every_family_at_r128_is_finite_or_a_clean_guard_error() {
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "huginn",
            "huginn_tiny/config.json",
            "huginn_tiny/model.safetensors",
            &["init_scale=1"],
        ),
        (
            "ouro",
            "ouro_tiny/config.json",
            "ouro_tiny/model.safetensors",
            &[],
        ),
        (
            "ltg",
            "ltg_tiny/config.json",
            "ltg_tiny/model.safetensors",
            &["inject=1", "positions=1"],
        ),
        (
            "parcae",
            "parcae_tiny/config.json",
            "parcae_tiny/model.safetensors",
            &["init_scale=1"],
        ),
        (
            "mor",
            "mor_tiny/config.json",
            "mor_tiny/vanilla_middle_cycle.safetensors",
            &["routing=0", "sharing=2"],
        ),
        (
            "ut",
            "ut_tiny/config.json",
            "ut_tiny/model.safetensors",
            &[],
        ),
    ];
    for &(ex, cfg, w, set) in cases {
        let m = model(ex, cfg, w, set, 1);
        for mode in [GuardMode::Warn, GuardMode::Error] {
            let mut s = m.session();
            s.set_steps(Some(128));
            s.set_guard(Guard {
                mode,
                max_growth: 1e4,
            });
            match s.prefill(&[3, 1, 4, 1, 5]) {
                Ok(l) => {
                    let step = s.step(9).map(|l| finite(l.data()));
                    let events = s.take_guard_events();
                    let all_finite = finite(l.data()) && step.as_ref().is_ok_and(|f| *f);
                    assert!(
                        all_finite || !events.is_empty(),
                        "{ex}: non-finite logits with no guard event"
                    );
                    eprintln!(
                        "{ex} r=128 {mode:?}: finite={all_finite}, guard events {}",
                        events.len()
                    );
                }
                Err(RuntimeError::Unstable(msg)) => {
                    assert_eq!(mode, GuardMode::Error, "{ex}: only error mode stops");
                    assert!(
                        msg.contains("iteration") && msg.contains("position"),
                        "{msg}"
                    );
                }
                Err(e) => panic!("{ex}: unexpected error {e}"),
            }
        }
    }
    // A model whose recursions have weights of their own (MoR's per-recursion routers) cannot
    // run past them: a clear error, not a silent reuse.
    let m = model(
        "mor",
        "mor_tiny/config.json",
        "mor_tiny/expert_middle_cycle.safetensors",
        &["routing=1", "sharing=2"],
        1,
    );
    let mut s = m.session();
    s.set_steps(Some(128));
    let e = s.prefill(&[3, 1, 4]).unwrap_err().to_string();
    assert!(e.contains("cannot run 128"), "{e}");
}

/// A recurrence that multiplies the state by 10 each step overflows f32 within 40 steps.
fn exploding() -> Model {
    let src = r#"
param dim = 4
param vocab = 8
forward(tokens) {
  weight wte = "wte" [vocab, dim]
  weight w = "w" [dim, dim]
  let e = embed(tokens, wte)
  recur 64 {
    state h = e
    h = linear(h, w)
  }
  return linear(h, wte)
}"#;
    let wte: Vec<f32> = (0..32).map(|i| ((i % 7) as f32 - 3.0) / 4.0).collect();
    let mut w = vec![0.0f32; 16];
    for i in 0..4 {
        w[i * 4 + i] = 10.0;
    }
    toy_model(src, &[("wte", vec![8, 4], &wte), ("w", vec![4, 4], &w)])
}

#[test]
fn guard_reports_the_iteration_and_token_of_a_divergence() {
    let m = exploding();
    // error: stops at the first event, naming where it happened: the norm after the first
    // iteration is 10‖e‖, so the 10⁴ limit is passed at the sixth (10⁶‖e‖ = 10⁵ × 10‖e‖).
    let mut s = m.session();
    s.set_guard(Guard {
        mode: GuardMode::Error,
        max_growth: 1e4,
    });
    let err = s.prefill(&[1, 2, 3]).unwrap_err().to_string();
    assert!(
        err.contains("iteration 6") && err.contains("position 0") && err.contains("grew"),
        "{err}"
    );
    // warn: runs on, and the events say growth first, then non-finite values.
    let mut s = m.session();
    let l = s.prefill(&[1, 2, 3]).unwrap();
    let ev = s.take_guard_events();
    assert!(
        matches!(ev[0].kind, EventKind::Growth(_)) && ev[0].iteration == 5,
        "{:?}",
        ev[0]
    );
    assert!(
        ev.iter().any(|e| e.kind == EventKind::NonFinite),
        "the state overflows by iteration 40"
    );
    assert!(!finite(l.data()), "warn does not change the computation");
    // clamp: the state is held at the growth limit, the logits stay finite.
    let mut s = m.session();
    s.set_guard(Guard {
        mode: GuardMode::Clamp,
        max_growth: 1e4,
    });
    let l = s.prefill(&[1, 2, 3]).unwrap();
    assert!(finite(l.data()));
    assert!(!s.take_guard_events().is_empty());
    // off: no checks, no events.
    let mut s = m.session();
    s.set_guard(Guard {
        mode: GuardMode::Off,
        max_growth: 1e4,
    });
    s.prefill(&[1, 2, 3]).unwrap();
    assert!(s.take_guard_events().is_empty());
}

#[test]
fn cli_guard_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopc"))
        .args([
            "run",
            "examples/ouro.loop",
            "--config",
            "tests/fixtures/ouro_tiny/config.json",
            "--weights",
            "tests/fixtures/ouro_tiny/model.safetensors",
            "--tokens",
            "1 2",
            "--steps",
            "256",
            "--max-new-tokens",
            "2",
            "--guard",
            "error",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Ouro renormalizes every loop, so 256 steps stay finite and the guard stays quiet.
    assert!(out.status.success(), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopc"))
        .args([
            "run",
            "examples/ouro.loop",
            "--weights",
            "x",
            "--tokens",
            "1",
            "--guard",
            "loud",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown guard mode"));
}
