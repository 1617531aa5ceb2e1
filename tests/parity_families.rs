//! Parity of the further families (`examples/ltg.loop`, ...) with the PyTorch references in
//! `tools/reference/`: every prefill position and decode step within 1e-4 (f32).
mod common;
use common::*;

const TOL: f32 = 1e-4;

fn ltg_case(case: &str, opt_level: u8) {
    let f = fixture(&format!("ltg_tiny/{case}.safetensors"));
    let iters = read(&f, "iterations").i64[0] as usize;
    let inject = read(&f, "inject").i64[0];
    let positions = read(&f, "positions").i64[0];
    let set = [format!("inject={inject}"), format!("positions={positions}")];
    let set: Vec<&str> = set.iter().map(|s| s.as_str()).collect();
    let model = model(
        "ltg",
        "ltg_tiny/config.json",
        "ltg_tiny/model.safetensors",
        &set,
        opt_level,
    );
    let mut s = model.session();
    s.set_steps(Some(iters));
    let pre = s.prefill(&ids(&read(&f, "prompt"))).unwrap();
    let d_pre = max_abs_diff(pre.data(), &read(&f, "prefill_logits").f32);
    let mut dec = vec![];
    for &t in &ids(&read(&f, "decode_tokens")) {
        dec.extend_from_slice(s.step(t).unwrap().data());
    }
    let d_dec = max_abs_diff(&dec, &read(&f, "decode_logits").f32);
    eprintln!(
        "parity ltg/{case} r={iters} opt{opt_level}: prefill {d_pre:.2e}, decode {d_dec:.2e}"
    );
    assert!(
        d_pre <= TOL && d_dec <= TOL,
        "ltg/{case}: prefill {d_pre:e}, decode {d_dec:e}"
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
