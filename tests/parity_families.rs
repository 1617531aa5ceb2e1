//! Parity of the further families (`examples/ltg.loop`, ...) with the PyTorch references in
//! `tools/reference/`: every prefill position and decode step within 1e-4 (f32).
mod common;
use common::*;

const TOL: f32 = PARITY_TOL;

fn ltg_case(case: &str, opt_level: u8) {
    let path = format!("ltg_tiny/{case}.safetensors");
    let f = fixture(&path);
    let iters = read(&f, "iterations").i64[0] as usize;
    let inject = read(&f, "inject").i64[0];
    let positions = read(&f, "positions").i64[0];
    let set = [format!("inject={inject}"), format!("positions={positions}")];
    let set: Vec<&str> = set.iter().map(|s| s.as_str()).collect();
    check_case(
        "ltg",
        "ltg_tiny/config.json",
        "ltg_tiny/model.safetensors",
        &path,
        iters,
        &set,
        opt_level,
    );
}

#[test]
fn ltg_learned_positions_with_injection() {
    ltg_case("learned_inject_r3", 1);
}

#[test]
fn ltg_sinusoidal_positions() {
    ltg_case("sinusoidal_r2", 1);
}

#[test]
fn ltg_no_positions_with_injection() {
    ltg_case("nope_inject_r4", 1);
    ltg_case("nope_inject_r4", 0);
}

#[test]
fn prefill_last_equals_the_last_row_of_prefill() {
    for (ex, cfg, w, set) in [
        (
            "huginn",
            "huginn_tiny/config.json",
            "huginn_tiny/model.safetensors",
            vec!["init_scale=0"],
        ),
        (
            "ltg",
            "ltg_tiny/config.json",
            "ltg_tiny/model.safetensors",
            vec!["positions=1"],
        ),
        (
            "parcae",
            "parcae_tiny/config.json",
            "parcae_tiny/model.safetensors",
            vec![],
        ),
    ] {
        let m = model(ex, cfg, w, &set, 1);
        let prompt = [5, 17, 3, 99, 42];
        let full = m.session().prefill(&prompt).unwrap();
        let mut s = m.session();
        let last = s.prefill_last(&prompt).unwrap();
        assert_eq!(last.rows(), 1);
        assert_eq!(last.data(), full.last_row(), "{ex}");
        // The session goes on from there exactly as after a full prefill.
        let mut t = m.session();
        t.prefill(&prompt).unwrap();
        assert_eq!(s.step(7).unwrap().data(), t.step(7).unwrap().data(), "{ex}");
    }
}

/// One Mixture-of-Recursions case (`tools/reference/gen_mor_fixtures.py`): prefill logits and
/// per-token recursion counts, then cached decode steps. Without a decode threshold the
/// reference's top-k keeps every decoded token, which loopc's rule reproduces at threshold 0.
fn mor_case(case: &str, opt_level: u8) {
    let f = fixture(&format!("mor_tiny/{case}.safetensors"));
    let routing = read(&f, "routing").i64[0];
    let sharing = read(&f, "sharing").i64[0];
    let alpha = read(&f, "alpha").f32[0];
    let thr = read(&f, "threshold").f32[0];
    let kv = read(&f, "kv_sharing").i64[0];
    let set = [
        format!("routing={routing}"),
        format!("sharing={sharing}"),
        format!("alpha={alpha}"),
        format!("kv_share={kv}"),
    ];
    let set: Vec<&str> = set.iter().map(|s| s.as_str()).collect();
    let weights = format!("mor_tiny/{case}.safetensors");
    let model = model("mor", "mor_tiny/config.json", &weights, &set, opt_level);
    let mut s = model.session();
    s.set_exit_threshold(Some(if thr < 0.0 { 0.0 } else { thr as f64 }))
        .unwrap();
    let pre = s.prefill(&ids(&read(&f, "prompt"))).unwrap();
    let d_pre = max_abs_diff(pre.data(), &read(&f, "prefill_logits").f32);
    let depths: Vec<i64> = s.last_depths().iter().map(|&d| d as i64).collect();
    assert_eq!(
        depths,
        read(&f, "prefill_depths").i64,
        "mor/{case}: prefill depths"
    );
    let mut dec = vec![];
    let mut dec_depths = vec![];
    for &t in &ids(&read(&f, "decode_tokens")) {
        dec.extend_from_slice(s.step(t).unwrap().data());
        dec_depths.push(s.last_depths()[0] as i64);
    }
    assert_eq!(
        dec_depths,
        read(&f, "decode_depths").i64,
        "mor/{case}: decode depths"
    );
    let d_dec = max_abs_diff(&dec, &read(&f, "decode_logits").f32);
    eprintln!(
        "parity mor/{case} opt{opt_level}: prefill {d_pre:.2e}, decode {d_dec:.2e}, depths {depths:?} / {dec_depths:?}"
    );
    assert!(
        d_pre <= TOL && d_dec <= TOL,
        "mor/{case}: prefill {d_pre:e}, decode {d_dec:e}"
    );
}

#[test]
fn mor_vanilla_recursive_model() {
    mor_case("vanilla_middle_cycle", 1);
}

#[test]
fn mor_expert_choice() {
    mor_case("expert_middle_cycle", 1);
    mor_case("expert_middle_cycle", 0);
}

#[test]
fn mor_expert_choice_threshold_decode() {
    mor_case("expert_middle_cycle_thr", 1);
}

#[test]
fn mor_expert_choice_sequence_sharing_per_iteration_weights() {
    mor_case("expert_middle_sequence", 1);
    mor_case("expert_middle_sequence", 0);
}

#[test]
fn mor_token_choice() {
    mor_case("token_middle_cycle", 1);
    mor_case("token_cycle", 1);
    mor_case("token_cycle", 0);
}

/// Recursive KV sharing: only the first recursion writes, later ones attend to its entries.
/// The authors run every token through the block and keep the selected rows; loopc skips the
/// unselected rows, which is exact because a row's result reads only its own state and the
/// shared cache.
#[test]
fn mor_recursive_kv_sharing() {
    mor_case("expert_middle_cycle_kvshare", 1);
    mor_case("token_middle_cycle_kvshare", 1);
}

/// A batch of four sequences of unequal lengths, each routed to its own depths, gives every
/// sequence exactly what it gets alone: top-k capacity is per sequence, the router's threshold
/// per decoded token, and the recursion-wise caches are per sequence.
#[test]
fn mor_batch_of_unequal_sequences_equals_single_sessions() {
    for (case, thr) in [
        ("expert_middle_cycle_thr", 0.4),
        ("token_middle_cycle", 0.0),
        ("expert_middle_sequence", 0.0),
    ] {
        let f = fixture(&format!("mor_tiny/{case}.safetensors"));
        let set = [
            format!("routing={}", read(&f, "routing").i64[0]),
            format!("sharing={}", read(&f, "sharing").i64[0]),
            format!("alpha={}", read(&f, "alpha").f32[0]),
        ];
        let set: Vec<&str> = set.iter().map(|s| s.as_str()).collect();
        let weights = format!("mor_tiny/{case}.safetensors");
        let model = model("mor", "mor_tiny/config.json", &weights, &set, 1);
        let prompts: [&[u32]; 4] = [&[3, 9, 27, 81, 115, 7], &[5, 2], &[44, 1, 90, 3, 3], &[12]];
        let steps = [
            [Some(4), Some(8), None, Some(15)],
            [Some(16), None, Some(23), Some(42)],
            [Some(99), Some(100), Some(101), None],
        ];
        // Exact on f32 panels (a row's matmul bits do not depend on the batch), as in
        // `variable_depth.rs`.
        let tol = if model.packs_f32() { 0.0 } else { 1e-5 };
        let mut batch = model.batch_session(4);
        batch.set_exit_threshold(Some(thr)).unwrap();
        let mut singles: Vec<_> = (0..4).map(|_| model.session()).collect();
        let got = batch.prefill(&prompts).unwrap();
        let mut depths = vec![];
        for b in 0..4 {
            singles[b].set_exit_threshold(Some(thr)).unwrap();
            let want = singles[b].prefill(prompts[b]).unwrap();
            let d = max_abs_diff(got[b].data(), want.data());
            assert!(d <= tol, "{case}: prefill of sequence {b} differs by {d:e}");
            assert_eq!(
                batch.last_depths(b),
                singles[b].last_depths(),
                "{case} seq {b}"
            );
            depths.extend_from_slice(singles[b].last_depths());
        }
        // The routers did route: not every token ran every recursion.
        assert!(depths.iter().any(|&d| d < 3), "{case}: {depths:?}");
        for toks in &steps {
            let got = batch.step(toks).unwrap();
            for b in 0..4 {
                if let Some(t) = toks[b] {
                    let want = singles[b].step(t).unwrap().data().to_vec();
                    let d = max_abs_diff(got[b].data(), &want);
                    assert!(d <= tol, "{case}: decode of sequence {b} differs by {d:e}");
                    assert_eq!(batch.last_depths(b), singles[b].last_depths());
                }
            }
        }
    }
}

/// Per-iteration weights cover the recursions they name: asking for more is a clear error.
#[test]
fn mor_more_recursions_than_per_iteration_weights_is_an_error() {
    let f = "mor_tiny/expert_middle_cycle.safetensors";
    let model = model(
        "mor",
        "mor_tiny/config.json",
        f,
        &["routing=1", "sharing=2"],
        1,
    );
    let mut s = model.session();
    s.set_steps(Some(5));
    let e = s.prefill(&[1, 2, 3]).unwrap_err().to_string();
    assert!(e.contains("per-iteration weights for 3 iterations"), "{e}");
}

/// The Universal Transformer with ACT (`examples/ut.loop`) against `tools/reference/utref.py`:
/// the same per-token halting depths and logits in prefill and in cached decode, for two
/// `act_max_steps`, with and without the optimizer.
fn ut_case(case: &str, opt_level: u8) {
    let f = fixture(&format!("ut_tiny/{case}.safetensors"));
    let max = read(&f, "max_steps").i64[0];
    let set = format!("max_steps={max}");
    let model = model(
        "ut",
        "ut_tiny/config.json",
        "ut_tiny/model.safetensors",
        &[&set],
        opt_level,
    );
    let depths =
        |name: &str| -> Vec<usize> { read(&f, name).i64.iter().map(|&d| d as usize).collect() };
    let mut s = model.session();
    let pre = s.prefill(&ids(&read(&f, "prompt"))).unwrap();
    assert_eq!(
        s.last_depths(),
        &depths("prompt_depths")[..],
        "{case}: prefill depths"
    );
    let d_pre = max_abs_diff(pre.data(), &read(&f, "prefill_logits").f32);
    let want = depths("decode_depths");
    let mut dec = vec![];
    for (i, &t) in ids(&read(&f, "decode_tokens")).iter().enumerate() {
        dec.extend_from_slice(s.step(t).unwrap().data());
        assert_eq!(s.last_depths(), &[want[i]], "{case}: decode step {i}");
    }
    let d_dec = max_abs_diff(&dec, &read(&f, "decode_logits").f32);
    eprintln!("parity ut/{case} opt{opt_level}: prefill {d_pre:.2e}, decode {d_dec:.2e}");
    assert!(
        d_pre <= TOL && d_dec <= TOL,
        "ut/{case}: prefill {d_pre:e}, decode {d_dec:e}"
    );
}

#[test]
fn ut_act_matches_reference() {
    ut_case("act_m6", 1);
    ut_case("act_m3", 1);
    ut_case("act_m6", 0);
}

/// Token choice decides each token's depth from its own state, and recursion-wise attention
/// only looks back: cached decode equals recomputing the whole sequence in one prefill.
/// (Expert choice's prefill top-k looks at the whole prompt, so it has no such identity.)
#[test]
fn mor_token_choice_decode_equals_recompute() {
    let f = fixture("mor_tiny/token_cycle.safetensors");
    let m = model(
        "mor",
        "mor_tiny/config.json",
        "mor_tiny/token_cycle.safetensors",
        &["routing=2", "sharing=0", "alpha=1"],
        1,
    );
    let prompt = ids(&read(&f, "prompt"));
    let dec = ids(&read(&f, "decode_tokens"));
    let mut s = m.session();
    s.prefill(&prompt).unwrap();
    let mut got = vec![];
    for &t in &dec {
        got.extend_from_slice(s.step(t).unwrap().data());
    }
    let all: Vec<u32> = prompt.iter().chain(&dec).copied().collect();
    let full = m.session().prefill(&all).unwrap();
    let vocab = full.data().len() / all.len();
    let d = max_abs_diff(&got, &full.data()[prompt.len() * vocab..]);
    assert!(d <= 1e-5, "decode vs recompute {d:e}");
}
