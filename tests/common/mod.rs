//! Helpers shared by the integration tests: build an example against a fixture config, read
//! fixture tensors, compare logits.
#![allow(dead_code)]
use loopc_compiler::driver::{self, Options};
use loopc_runtime::{Artifact, Model, Weights};
use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(p: &str) -> PathBuf {
    root().join("tests/fixtures").join(p)
}

/// Compile `examples/{example}.loop` with a fixture's config.json and extra `--set`s.
pub fn build(example: &str, config: &str, set: &[&str], opt_level: u8) -> Artifact {
    let opts = Options {
        set: set.iter().map(|s| s.to_string()).collect(),
        config: Some(fixture(config)),
        opt_level,
        verify: true,
        ..Default::default()
    };
    let built = driver::build(
        &root().join("examples").join(format!("{example}.loop")),
        &opts,
    )
    .unwrap_or_else(|e| panic!("build of {example} failed:\n{e}"));
    Artifact::from_bytes(built.artifact_bytes()).expect("artifact loads")
}

pub fn model(example: &str, config: &str, weights: &str, set: &[&str], opt_level: u8) -> Model {
    let a = build(example, config, set, opt_level);
    let w = Weights::open(fixture(weights)).expect("weights open");
    Model::new(a, w).expect("weights bind")
}

pub struct Tensor {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

pub fn read(path: &Path, name: &str) -> Tensor {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("{name} missing in {}", path.display()));
    let shape = t.shape().to_vec();
    let data = t.data();
    match t.dtype() {
        safetensors::Dtype::F32 => Tensor {
            shape,
            f32: data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            i64: vec![],
        },
        safetensors::Dtype::I64 => Tensor {
            shape,
            f32: vec![],
            i64: data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        },
        d => panic!("unexpected dtype {d:?}"),
    }
}

pub fn ids(t: &Tensor) -> Vec<u32> {
    t.i64.iter().map(|&x| x as u32).collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Compile `src` (a `.loop` program) and bind it to in-memory f32 tensors: small hand-made
/// models whose behaviour is known in closed form.
pub fn toy_model(src: &str, tensors: &[(&str, Vec<usize>, &[f32])]) -> Model {
    let opts = Options {
        verify: true,
        opt_level: 1,
        ..Default::default()
    };
    let f = driver::front_from_source("toy.loop", src, &opts).unwrap_or_else(|e| panic!("{e}"));
    let built = driver::build_front(&f, &opts, vec![]).unwrap_or_else(|e| panic!("{e}"));
    let weights = Weights::from_f32(tensors.iter().map(|(n, s, d)| (*n, s.clone(), *d))).unwrap();
    Model::new(
        Artifact::from_bytes(built.artifact_bytes()).unwrap(),
        weights,
    )
    .unwrap()
}

/// Max |Δ| allowed between loopc's f32 logits and a PyTorch fixture.
pub const PARITY_TOL: f32 = 1e-4;

/// Prefill the fixture's prompt and decode its tokens with the cache at `steps` iterations;
/// both within [`PARITY_TOL`] of the fixture's logits. Returns the two max |Δ|.
pub fn check_case(
    example: &str,
    cfg: &str,
    weights: &str,
    case: &str,
    steps: usize,
    set: &[&str],
    opt_level: u8,
) -> (f32, f32) {
    let model = model(example, cfg, weights, set, opt_level);
    let f = fixture(case);
    let prompt = ids(&read(&f, "prompt"));
    let decode = ids(&read(&f, "decode_tokens"));
    let want_pre = read(&f, "prefill_logits");
    let want_dec = read(&f, "decode_logits");
    let mut s = model.session();
    s.set_steps(Some(steps));
    let pre = s.prefill(&prompt).unwrap();
    let d_pre = max_abs_diff(pre.data(), &want_pre.f32);
    let mut got_dec = vec![];
    for &t in &decode {
        got_dec.extend_from_slice(s.step(t).unwrap().data());
    }
    let d_dec = max_abs_diff(&got_dec, &want_dec.f32);
    assert!(
        d_pre <= PARITY_TOL,
        "{case} opt{opt_level}: prefill max |Δ| = {d_pre:e}"
    );
    assert!(
        d_dec <= PARITY_TOL,
        "{case} opt{opt_level}: decode max |Δ| = {d_dec:e}"
    );
    eprintln!("parity {case} r={steps} opt{opt_level}: prefill {d_pre:.2e}, decode {d_dec:.2e}");
    (d_pre, d_dec)
}
