//! Parity of `examples/parcae.loop` with the PyTorch reference (`tools/reference/parcaeref.py`):
//! every prefill position and every cached decode step within 1e-4 (f32), at r = 1, 4, 8, with
//! and without q/k norm, prelude norm, softcap and the tied head. The fixture config has GQA, a
//! state narrower than the model and value embeddings in prelude, core and coda blocks.
mod common;
use common::*;

/// `--set`s that select the case's variant; `init_scale=0` is the reference's zero state.
fn case_set(f: &std::path::Path) -> Vec<String> {
    let flag = |k: &str| read(f, k).i64[0];
    vec![
        "init_scale=0".into(),
        format!("qk_norm={}", flag("qk_norm")),
        format!("prelude_norm={}", flag("prelude_norm")),
        format!("tie_embeddings={}", flag("tie_embeddings")),
        format!("softcap={}", read(f, "logit_softcap").f32[0]),
    ]
}

fn parcae_case(case: &str, opt_level: u8) -> (f32, f32) {
    let path = format!("parcae_tiny/{case}.safetensors");
    let f = fixture(&path);
    let steps = read(&f, "steps").i64[0] as usize;
    let set = case_set(&f);
    let set: Vec<&str> = set.iter().map(|s| s.as_str()).collect();
    check_case(
        "parcae",
        "parcae_tiny/config.json",
        "parcae_tiny/model.safetensors",
        &path,
        steps,
        &set,
        opt_level,
    )
}

#[test]
fn parcae_r1_qk_norm() {
    parcae_case("r1", 1);
    parcae_case("r1", 0);
}

#[test]
fn parcae_r4_softcap_without_prelude_norm() {
    parcae_case("r4_softcap", 1);
}

#[test]
fn parcae_r8_tied_head_without_qk_norm() {
    parcae_case("r8_plain_tied", 1);
    parcae_case("r8_plain_tied", 0);
}

#[test]
fn the_fixture_variants_differ() {
    // The flags must matter: the r=4 case run as r=1 is far from its own fixture.
    let f = fixture("parcae_tiny/r4_softcap.safetensors");
    let set = case_set(&f);
    let set: Vec<&str> = set.iter().map(|s| s.as_str()).collect();
    let m = model(
        "parcae",
        "parcae_tiny/config.json",
        "parcae_tiny/model.safetensors",
        &set,
        1,
    );
    let mut s = m.session();
    s.set_steps(Some(1));
    let pre = s.prefill(&ids(&read(&f, "prompt"))).unwrap();
    assert!(max_abs_diff(pre.data(), &read(&f, "prefill_logits").f32) > 1e-2);
}

#[test]
fn injection_factors_are_derived_weights() {
    // softplus(dt_bias), exp(A_log) and the decay are computed at load, not per token: the
    // program has no kernel with a softplus.
    let a = build("parcae", "parcae_tiny/config.json", &["init_scale=0"], 1);
    let m = &a.manifest;
    assert!(
        m.derived.iter().any(
            |d| matches!(&d.recipe, loopc_runtime::artifact::Derive::Map { ops, .. }
                if ops.iter().any(|o| matches!(o, loopc_runtime::artifact::EwOp::Softplus(_))))
        ),
        "{:?}",
        m.derived
    );
    for k in &m.kernels {
        let ops = match &k.spec {
            loopc_runtime::artifact::KernelSpec::Elementwise { ops, .. } => ops,
            _ => continue,
        };
        assert!(
            !ops.iter()
                .any(|o| matches!(o, loopc_runtime::artifact::EwOp::Softplus(_))),
            "{}",
            k.symbol
        );
    }
}
