//! Parity with the PyTorch reference (`tools/reference/`): loopc's logits must match the
//! fixtures to 1e-4 (f32) for every prefill position and every decode step, and decoding with
//! the KV cache must equal recomputing the whole sequence.
mod common;
use common::*;

const TOL: f32 = PARITY_TOL;

const HUGINN: &[&str] = &["init_scale=0"];

#[test]
fn huginn_r1() {
    check_case(
        "huginn",
        "huginn_tiny/config.json",
        "huginn_tiny/model.safetensors",
        "huginn_tiny/r1.safetensors",
        1,
        HUGINN,
        1,
    );
}

#[test]
fn huginn_r4() {
    check_case(
        "huginn",
        "huginn_tiny/config.json",
        "huginn_tiny/model.safetensors",
        "huginn_tiny/r4.safetensors",
        4,
        HUGINN,
        1,
    );
}

#[test]
fn huginn_r7() {
    check_case(
        "huginn",
        "huginn_tiny/config.json",
        "huginn_tiny/model.safetensors",
        "huginn_tiny/r7.safetensors",
        7,
        HUGINN,
        1,
    );
}

#[test]
fn huginn_r4_unoptimized() {
    check_case(
        "huginn",
        "huginn_tiny/config.json",
        "huginn_tiny/model.safetensors",
        "huginn_tiny/r4.safetensors",
        4,
        HUGINN,
        0,
    );
}

#[test]
fn huginn_steps_from_the_dsl_default() {
    // The fixture config sets mean_recurrence = 4, which the DSL reads as `steps`.
    let model = model(
        "huginn",
        "huginn_tiny/config.json",
        "huginn_tiny/model.safetensors",
        HUGINN,
        1,
    );
    let f = fixture("huginn_tiny/r4.safetensors");
    let mut s = model.session();
    let pre = s.prefill(&ids(&read(&f, "prompt"))).unwrap();
    assert!(max_abs_diff(pre.data(), &read(&f, "prefill_logits").f32) <= TOL);
}

#[test]
fn ouro_t4() {
    check_case(
        "ouro",
        "ouro_tiny/config.json",
        "ouro_tiny/model.safetensors",
        "ouro_tiny/t4.safetensors",
        4,
        &[],
        1,
    );
}

#[test]
fn ouro_t4_unoptimized() {
    check_case(
        "ouro",
        "ouro_tiny/config.json",
        "ouro_tiny/model.safetensors",
        "ouro_tiny/t4.safetensors",
        4,
        &[],
        0,
    );
}

#[test]
fn ouro_exit_probabilities() {
    let model = model(
        "ouro",
        "ouro_tiny/config.json",
        "ouro_tiny/model.safetensors",
        &[],
        1,
    );
    let f = fixture("ouro_tiny/t4.safetensors");
    let mut s = model.session();
    s.prefill(&ids(&read(&f, "prompt"))).unwrap();
    let want = read(&f, "prefill_exit_probs");
    let got = s.exit_probs().expect("ouro has an exit gate");
    assert_eq!(got.len(), want.f32.len());
    let d = max_abs_diff(got, &want.f32);
    assert!(d <= 1e-5, "prefill exit probabilities differ by {d:e}");
    let want = read(&f, "decode_exit_probs");
    for (i, &t) in ids(&read(&f, "decode_tokens")).iter().enumerate() {
        s.step(t).unwrap();
        let got = s.exit_probs().unwrap();
        let d = max_abs_diff(got, &want.f32[i * 4..(i + 1) * 4]);
        assert!(
            d <= 1e-5,
            "decode step {i}: exit probabilities differ by {d:e}"
        );
    }
}

/// Decoding token by token with the cache gives the same logits as one prefill of the whole
/// sequence (which uses no cached state at all).
fn decode_equals_recompute(
    example: &str,
    cfg: &str,
    weights: &str,
    case: &str,
    steps: usize,
    set: &[&str],
) {
    let model = model(example, cfg, weights, set, 1);
    let f = fixture(case);
    let prompt = ids(&read(&f, "prompt"));
    let decode = ids(&read(&f, "decode_tokens"));
    let mut s = model.session();
    s.set_steps(Some(steps));
    s.prefill(&prompt).unwrap();
    let mut cached = vec![];
    for &t in &decode {
        cached.extend_from_slice(s.step(t).unwrap().data());
    }
    let mut all = prompt.clone();
    all.extend_from_slice(&decode[..decode.len() - 1]);
    let mut fresh = model.session();
    fresh.set_steps(Some(steps));
    let full = fresh.prefill(&all).unwrap();
    let vocab = full.vocab();
    let tail = &full.data()[(prompt.len() - 1) * vocab..];
    // The cached run's step i sees prompt + decode[..=i]; the full run's row P-1+i+1 sees the same.
    let recompute: Vec<f32> = tail[vocab..].to_vec();
    let d = max_abs_diff(&cached[..cached.len() - vocab], &recompute);
    assert!(
        d <= 1e-5,
        "{case}: cached decode differs from recomputation by {d:e}"
    );
}

#[test]
fn huginn_decode_equals_recompute() {
    decode_equals_recompute(
        "huginn",
        "huginn_tiny/config.json",
        "huginn_tiny/model.safetensors",
        "huginn_tiny/r7.safetensors",
        7,
        HUGINN,
    );
}

#[test]
fn ouro_decode_equals_recompute() {
    decode_equals_recompute(
        "ouro",
        "ouro_tiny/config.json",
        "ouro_tiny/model.safetensors",
        "ouro_tiny/t4.safetensors",
        4,
        &[],
    );
}

#[test]
fn chunked_prefill_equals_one_prefill() {
    let model = model(
        "huginn",
        "huginn_tiny/config.json",
        "huginn_tiny/model.safetensors",
        HUGINN,
        1,
    );
    let f = fixture("huginn_tiny/r4.safetensors");
    let prompt = ids(&read(&f, "prompt"));
    let want = read(&f, "prefill_logits");
    let mut s = model.session();
    s.set_steps(Some(4));
    let a = s.prefill(&prompt[..3]).unwrap();
    let b = s.prefill(&prompt[3..]).unwrap();
    let mut got = a.data().to_vec();
    got.extend_from_slice(b.data());
    let d = max_abs_diff(&got, &want.f32);
    assert!(d <= TOL, "chunked prefill differs by {d:e}");
}

/// Prefills of 32 rows or more run attention as two GEMMs per head and row block
/// (`runtime/src/attention.rs`); decode steps run the generated kernel. A 90-token sequence
/// prefilled whole, prefilled in two long chunks (the second at positions 40.., so past cached
/// keys), and fed token by token must give the same logits at every position, for both
/// families (Ouro with grouped KV heads' shapes from its config).
#[test]
fn long_prefill_attention_equals_the_decode_kernel() {
    for (example, cfg, weights, steps, set) in [
        (
            "huginn",
            "huginn_tiny/config.json",
            "huginn_tiny/model.safetensors",
            4,
            HUGINN,
        ),
        (
            "ouro",
            "ouro_tiny/config.json",
            "ouro_tiny/model.safetensors",
            4,
            &[][..],
        ),
    ] {
        let model = model(example, cfg, weights, set, 1);
        let vocab = model.manifest().vocab;
        let tokens: Vec<u32> = (0..90u32).map(|i| (i * 37 + 11) % vocab as u32).collect();
        let run = |chunks: &[usize]| -> Vec<f32> {
            let mut s = model.session();
            s.set_steps(Some(steps));
            let mut out = vec![];
            let mut at = 0;
            for &n in chunks {
                out.extend_from_slice(s.prefill(&tokens[at..at + n]).unwrap().data());
                at += n;
            }
            out
        };
        let whole = run(&[90]);
        let chunked = run(&[40, 50]);
        let mut s = model.session();
        s.set_steps(Some(steps));
        let mut stepped = s.prefill(&tokens[..1]).unwrap().data().to_vec();
        for &t in &tokens[1..] {
            stepped.extend_from_slice(s.step(t).unwrap().data());
        }
        let d_chunk = max_abs_diff(&whole, &chunked);
        let d_step = max_abs_diff(&whole, &stepped);
        assert!(
            d_chunk <= 1e-5 && d_step <= 1e-5,
            "{example}: whole vs chunked {d_chunk:e}, whole vs token by token {d_step:e}"
        );
    }
}
