//! Timings for notes/variable-depth.md (ignored; run with
//! `LOOPC_BENCH_WEIGHTS=... LOOPC_BENCH_CONFIG=... cargo test --release --test bench_variable_depth -- --ignored --nocapture`).
mod common;
use common::*;
use loopc_compiler::driver::{self, Options};
use loopc_runtime::{Artifact, DepthSchedule, Model, Weights};
use std::time::Instant;

fn load() -> Option<Model> {
    let w = std::env::var("LOOPC_BENCH_WEIGHTS").ok()?;
    let c = std::env::var("LOOPC_BENCH_CONFIG").ok()?;
    let opts = Options {
        set: vec!["init_scale=0".into()],
        config: Some(c.into()),
        opt_level: 1,
        ..Default::default()
    };
    let built = driver::build(&root().join("examples/huginn.loop"), &opts).unwrap();
    Some(
        Model::new(
            Artifact::from_bytes(built.artifact_bytes()).unwrap(),
            Weights::open(w).unwrap(),
        )
        .unwrap(),
    )
}

#[test]
#[ignore]
fn batch_decode_throughput() {
    let Some(model) = load() else { return };
    let n = 4;
    let steps = 32;
    for sched in [None, Some(vec![2usize, 4, 8, 6])] {
        let set = |b: &mut loopc_runtime::BatchSession| {
            for i in 0..n {
                b.set_depth_schedule(i, sched.clone().map(DepthSchedule::Cycle))
                    .unwrap();
            }
        };
        let prompts: Vec<Vec<u32>> = (0..n)
            .map(|b| {
                (0..(16 + 8 * b as u32))
                    .map(|t| (t * 7 + b as u32) % 1000)
                    .collect()
            })
            .collect();
        let refs: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
        // Batched.
        let mut bs = model.batch_session(n);
        bs.set_steps(Some(8));
        set(&mut bs);
        bs.prefill(&refs).unwrap();
        let t = Instant::now();
        for i in 0..steps {
            let toks: Vec<Option<u32>> = (0..n).map(|b| Some((i * 13 + b) as u32 % 1000)).collect();
            bs.step(&toks).unwrap();
        }
        let tb = t.elapsed().as_secs_f64();
        // Sequential sessions.
        let mut ss: Vec<_> = (0..n).map(|_| model.session()).collect();
        for (b, s) in ss.iter_mut().enumerate() {
            s.set_steps(Some(8));
            s.set_depth_schedule(sched.clone().map(DepthSchedule::Cycle));
            s.prefill(refs[b]).unwrap();
        }
        let t = Instant::now();
        for i in 0..steps {
            for (b, s) in ss.iter_mut().enumerate() {
                s.step((i * 13 + b) as u32 % 1000).unwrap();
            }
        }
        let ts = t.elapsed().as_secs_f64();
        eprintln!(
            "schedule {sched:?}: batch of {n}: {:.1} tok/s, {n} sequential sessions: {:.1} tok/s",
            (n * steps) as f64 / tb,
            (n * steps) as f64 / ts
        );
    }
}
