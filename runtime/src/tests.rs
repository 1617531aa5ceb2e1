//! Executor tests on hand-written manifests that need no generated kernels.

use crate::artifact::*;
use crate::{generate, Artifact, Model, RuntimeError, SamplerConfig, Weights};
use std::collections::BTreeMap;

const V: usize = 5;
const H: usize = 4;

struct Ws {
    emb: Vec<f32>,
    adapter: Vec<f32>,
    /// `[7, H]`; the head is rows 2..7.
    headpack: Vec<f32>,
    gate: Vec<f32>,
}

fn weights_data() -> Ws {
    let f = |n: usize, mul: f32, add: f32| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 37 + 11) % 17) as f32 / 17.0 - 0.5) * mul + add)
            .collect()
    };
    Ws {
        emb: f(V * H, 2.0, 0.1),
        adapter: f(H * 2 * H, 0.5, 0.0),
        headpack: f(7 * H, 1.5, 0.0),
        gate: f(H, 3.0, 0.0),
    }
}

fn weights() -> Weights {
    let w = weights_data();
    Weights::from_f32([
        ("emb", vec![V, H], &w.emb[..]),
        ("adapter", vec![H, 2 * H], &w.adapter[..]),
        ("headpack", vec![7, H], &w.headpack[..]),
        ("gate", vec![1, H], &w.gate[..]),
        ("extra.unused", vec![3], &[1.0, 2.0, 3.0][..]),
    ])
    .unwrap()
}

fn buf(name: &str, cols: usize) -> BufferDecl {
    BufferDecl {
        name: name.into(),
        rows: Rows::Tokens,
        cols,
    }
}

fn manifest(init: StateInit, exit: ExitPolicy, gate: bool, default_steps: usize) -> Manifest {
    let wd = |name: &str, shape: Vec<usize>| WeightDecl {
        name: name.into(),
        shape,
        origin: format!("test.loop:1:{}", name.len()),
    };
    let wr = |weight: u32, offset: usize, rows: usize, cols: usize| WRef {
        weight,
        offset,
        rows,
        cols,
    };
    let mut body = vec![
        Instr::Concat {
            inputs: vec![1, 0],
            out: 3,
        },
        Instr::MatMul {
            x: 3,
            w: wr(1, 0, H, 2 * H),
            out: 2,
            epi: Default::default(),
        },
        Instr::KvWrite {
            site: 0,
            k: 2,
            v: 1,
        },
    ];
    if gate {
        body.push(Instr::MatMul {
            x: 2,
            w: wr(3, 0, 1, H),
            out: 5,
            epi: Default::default(),
        });
    }
    Manifest {
        format_version: FORMAT_VERSION,
        model: "toy".into(),
        target: "cpu-x86_64".into(),
        backend: "none".into(),
        params: BTreeMap::new(),
        vocab: V,
        hidden: H,
        weights: vec![
            wd("emb", vec![V, H]),
            wd("adapter", vec![H, 2 * H]),
            wd("headpack", vec![7, H]),
            wd("gate", vec![1, H]),
        ],
        buffers: vec![
            buf("e", H),
            buf("s", H),
            buf("n", H),
            buf("c", 2 * H),
            buf("logits", V),
            buf("g", 1),
            buf("h", H),
        ],
        kernels: vec![],
        rope_tables: vec![],
        kv_sites: vec![
            KvSite {
                name: "core".into(),
                kv_heads: 2,
                head_dim: 2,
                in_loop: true,
            },
            KvSite {
                name: "coda".into(),
                kv_heads: 1,
                head_dim: 4,
                in_loop: false,
            },
        ],
        program: Program {
            prelude: vec![Instr::Embed {
                table: wr(0, 0, V, H),
                out: 0,
            }],
            recur: Some(Recur {
                state: 1,
                next: 2,
                init,
                body,
                default_steps,
                exit,
                cache: CachePolicy::PerStep,
                gate: if gate { Some(5) } else { None },
                readout: vec![],
                router: vec![],
                router_out: None,
            }),
            coda: vec![
                Instr::Copy { src: 1, dst: 6 },
                Instr::MatMul {
                    x: 6,
                    w: wr(2, 2 * H, V, H),
                    out: 4,
                    epi: Default::default(),
                },
                Instr::KvWrite {
                    site: 1,
                    k: 6,
                    v: 0,
                },
            ],
            logits: 4,
        },
        derived: vec![],
        cuda: None,
        host_gemm: None,
    }
}

fn model(m: Manifest) -> Model {
    Model::with_threads(Artifact::new(m, vec![]), weights(), 2).unwrap()
}

/// Reference: per token, the states after each iteration (index 0 = initial state).
fn reference_states(tok: u32, init: &[f32], steps: usize) -> Vec<Vec<f32>> {
    let w = weights_data();
    let e = &w.emb[tok as usize * H..(tok as usize + 1) * H];
    let mut states = vec![init.to_vec()];
    for _ in 0..steps {
        let s = states.last().unwrap();
        let c: Vec<f32> = s.iter().chain(e).copied().collect();
        let n: Vec<f32> = (0..H)
            .map(|j| {
                (0..2 * H)
                    .map(|i| c[i] as f64 * w.adapter[j * 2 * H + i] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        states.push(n);
    }
    states
}

fn reference_logits(s: &[f32]) -> Vec<f32> {
    let w = weights_data();
    (0..V)
        .map(|j| {
            (0..H)
                .map(|i| s[i] as f64 * w.headpack[(2 + j) * H + i] as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{a:?} vs {b:?}");
    }
}

#[test]
fn prefill_step_and_kv_slots() {
    let m = model(manifest(StateInit::Zeros, ExitPolicy::Fixed, false, 3));
    let mut s = m.session();
    let prompt = [1u32, 4, 0];
    let l = s.prefill(&prompt).unwrap();
    assert_eq!((l.rows, l.vocab), (3, V));
    for (r, &t) in prompt.iter().enumerate() {
        let st = reference_states(t, &[0.0; H], 3);
        close(l.row(r), &reference_logits(&st[3]));
    }
    assert_eq!(s.position(), 3);
    assert_eq!(s.last_iterations(), 3);

    // One step with 1 iteration, then one with 3: the fill rule copies position 3 into slots 1, 2.
    s.set_steps(Some(1));
    let l1 = s.step(2).unwrap().to_vec();
    close(
        &l1,
        &reference_logits(&reference_states(2, &[0.0; H], 1)[1]),
    );
    let p1 = s.step(3).unwrap().as_ptr();
    s.set_steps(None);
    let l2 = s.step(3).unwrap();
    let p2 = l2.as_ptr();
    close(l2, &reference_logits(&reference_states(3, &[0.0; H], 3)[3]));
    assert_eq!(p1, p2, "decode reuses its buffers");
    assert_eq!(s.position(), 6);
    let lens = s.kv_lens();
    assert_eq!(lens[0], ("core".to_string(), vec![6, 6, 6]));
    assert_eq!(lens[1], ("coda".to_string(), vec![6]));
    // Slot 2 at position 3 (token 2 ran 1 iteration) holds slot 0's keys; at position 5 its own.
    let (k2, v2) = s.kv_slot(0, 2).unwrap();
    let (k0, _) = s.kv_slot(0, 0).unwrap();
    assert_eq!(&k2[3 * H..4 * H], &k0[3 * H..4 * H]);
    let st5 = reference_states(3, &[0.0; H], 3);
    close(&k2[5 * H..6 * H], &st5[3]);
    close(&v2[5 * H..6 * H], &st5[2]);
    // The coda site holds the final state as keys, the embeddings as values.
    let (kc, vc) = s.kv_slot(1, 0).unwrap();
    close(&kc[0..H], &reference_states(1, &[0.0; H], 3)[3]);
    close(&vc[4 * H..5 * H], &weights_data().emb[3 * H..4 * H]);

    let st = s.stats();
    assert_eq!(st.iterations, vec![3, 1, 1, 3]);
    assert_eq!(st.total_iterations, 8);
    assert_eq!(st.token_iterations, 9 + 1 + 1 + 3);
    assert_eq!(
        (st.prefill_calls, st.prefill_tokens, st.decode_calls),
        (1, 3, 3)
    );
    assert_eq!(st.kv_bytes_used, (3 * 6 * 4 + 6 * 4) * 2 * 4);
    assert!(st.kv_bytes_allocated >= st.kv_bytes_used);
    assert!(s.exit_probs().is_none());

    s.reset();
    assert_eq!(s.position(), 0);
    let again = s.prefill(&prompt).unwrap();
    assert_eq!(again, l);
}

#[test]
fn chunked_prefill_matches_full_and_init_from() {
    for init in [
        StateInit::From(0),
        StateInit::TruncNormal {
            std: 0.3,
            scale: 2.0,
            seed: 42,
        },
    ] {
        let m = model(manifest(init.clone(), ExitPolicy::Fixed, false, 2));
        let mut a = m.session();
        let full = a.prefill(&[3, 1, 2, 2]).unwrap();
        let mut b = m.session();
        let head = b.prefill(&[3, 1]).unwrap();
        let mid = b.prefill(&[2]).unwrap();
        let last = b.step(2).unwrap().to_vec();
        close(head.row(0), full.row(0));
        close(head.row(1), full.row(1));
        close(mid.row(0), full.row(2));
        close(&last, full.row(3));
        if init == StateInit::From(0) {
            let w = weights_data();
            let e = &w.emb[3 * H..4 * H];
            close(
                full.row(0),
                &reference_logits(&reference_states(3, e, 2)[2]),
            );
        }
    }
    // The random initial state differs per position.
    let m = model(manifest(
        StateInit::TruncNormal {
            std: 0.3,
            scale: 2.0,
            seed: 42,
        },
        ExitPolicy::Fixed,
        false,
        1,
    ));
    let mut s = m.session();
    let l = s.prefill(&[1, 1]).unwrap();
    assert_ne!(
        l.row(0),
        l.row(1),
        "different positions draw different states"
    );
    // Zero iterations is an error, not a panic, and leaves the session as it was.
    s.set_steps(Some(0));
    assert!(matches!(s.step(1), Err(RuntimeError::ZeroSteps)));
    assert_eq!(s.position(), 2);
    let m0 = model(manifest(StateInit::Zeros, ExitPolicy::Fixed, false, 0));
    assert!(matches!(
        m0.session().prefill(&[1]),
        Err(RuntimeError::ZeroSteps)
    ));
    let mc = model(manifest(
        StateInit::Zeros,
        ExitPolicy::Converge {
            threshold: 0.1,
            min_steps: 0,
            max_steps: 0,
        },
        false,
        0,
    ));
    assert!(matches!(
        mc.session().prefill(&[1]),
        Err(RuntimeError::ZeroSteps)
    ));
}

#[test]
fn converge_policy_and_cap() {
    let thr = 1e-3;
    let m = model(manifest(
        StateInit::Zeros,
        ExitPolicy::Converge {
            threshold: thr,
            min_steps: 2,
            max_steps: 60,
        },
        false,
        0,
    ));
    let toks = [0u32, 4];
    // Reference: stop after iteration t (t + 1 >= 2) when the mean relative change < thr.
    let states: Vec<Vec<Vec<f32>>> = toks
        .iter()
        .map(|&t| reference_states(t, &[0.0; H], 60))
        .collect();
    let mut want = 60;
    for t in 1..=60 {
        let mean: f64 = states
            .iter()
            .map(|st| {
                let (a, b) = (&st[t], &st[t - 1]);
                let d: f64 = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let n: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                d / n
            })
            .sum::<f64>()
            / 2.0;
        if t >= 2 && mean < thr {
            want = t;
            break;
        }
    }
    assert!(
        want > 2 && want < 60,
        "the toy recurrence should converge mid-way ({want})"
    );
    let mut s = m.session();
    let l = s.prefill(&toks).unwrap();
    assert_eq!(s.last_iterations(), want);
    close(l.row(1), &reference_logits(&states[1][want]));
    // A per-call step count is the hard cap.
    s.set_steps(Some(2));
    s.step(1).unwrap();
    assert_eq!(s.last_iterations(), 2);
}

#[test]
fn exit_gate_probabilities() {
    let m = model(manifest(StateInit::Zeros, ExitPolicy::Fixed, true, 4));
    let mut s = m.session();
    s.prefill(&[2, 3]).unwrap();
    let e = s.exit_probs().unwrap().clone();
    assert_eq!((e.rows, e.steps), (2, 4));
    let w = weights_data();
    for (r, &tok) in [2u32, 3].iter().enumerate() {
        let st = reference_states(tok, &[0.0; H], 4);
        let lam: Vec<f32> = (1..=4)
            .map(|t| {
                let g: f32 = st[t].iter().zip(&w.gate).map(|(a, b)| a * b).sum();
                1.0 / (1.0 + (-g).exp())
            })
            .collect();
        close(e.lambda_row(r), &lam);
        let p = [
            lam[0],
            lam[1] * (1.0 - lam[0]),
            lam[2] * (1.0 - lam[0]) * (1.0 - lam[1]),
            (1.0 - lam[0]) * (1.0 - lam[1]) * (1.0 - lam[2]),
        ];
        close(e.row(r), &p);
        assert!((e.row(r).iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(e.exit_step(r, 1.0) <= 3);
        assert_eq!(e.exit_step(r, 0.0), 0);
    }
    s.set_steps(Some(1));
    s.step(1).unwrap();
    let e = s.exit_probs().unwrap();
    assert_eq!((e.rows, e.steps), (1, 1));
    assert_eq!(e.row(0), &[1.0]);
}

#[test]
fn bad_inputs_are_errors() {
    let m = model(manifest(StateInit::Zeros, ExitPolicy::Fixed, false, 2));
    let mut s = m.session();
    assert!(matches!(s.prefill(&[]), Err(RuntimeError::EmptyInput)));
    let e = s.prefill(&[1, 5]).unwrap_err();
    assert!(
        matches!(
            e,
            RuntimeError::TokenOutOfRange {
                token: 5,
                index: 1,
                limit: 5
            }
        ),
        "{e}"
    );
    assert!(s.step(u32::MAX).is_err());
    assert_eq!(s.position(), 0, "failed calls do not advance");
    s.prefill(&[1]).unwrap();
    assert_eq!(s.position(), 1);
}

#[test]
fn generate_dumps_all_logits() {
    let m = model(manifest(StateInit::Zeros, ExitPolicy::Fixed, false, 2));
    let mut s = m.session();
    let out = generate(&mut s, &[1, 2], 4, &SamplerConfig::greedy(), &[]).unwrap();
    assert_eq!(out.tokens.len(), 4);
    assert_eq!(out.prefill_logits.rows, 2);
    assert_eq!(out.step_logits.rows, 3);
    assert_eq!(out.iterations, vec![2, 2, 2, 2]);
    assert_eq!(out.tokens[0], crate::argmax(out.prefill_logits.last_row()));
    for i in 1..4 {
        assert_eq!(out.tokens[i], crate::argmax(out.step_logits.row(i - 1)));
    }
    assert_eq!(s.position(), 5);
    // Stop token.
    s.reset();
    let first = out.tokens[0];
    let o2 = generate(&mut s, &[1, 2], 4, &SamplerConfig::greedy(), &[first]).unwrap();
    assert_eq!(o2.tokens, vec![first]);
    assert!(o2.stopped);
    assert_eq!(o2.step_logits.rows, 0);
    s.reset();
    let o3 = generate(&mut s, &[1, 2], 0, &SamplerConfig::greedy(), &[]).unwrap();
    assert!(o3.tokens.is_empty());
    // Seeded sampling is reproducible.
    let cfg = SamplerConfig::temperature(1.0).with_seed(9);
    s.reset();
    let a = generate(&mut s, &[1], 6, &cfg, &[]).unwrap();
    s.reset();
    let b = generate(&mut s, &[1], 6, &cfg, &[]).unwrap();
    assert_eq!(a.tokens, b.tokens);
}

/// `PromptLogits::Last` (what `loopc run` uses without `--dump-logits`): the prompt's last
/// row only, the same tokens and decode logits as keeping every row.
#[test]
fn generate_can_skip_the_prompts_other_logits() {
    let m = model(manifest(StateInit::Zeros, ExitPolicy::Fixed, false, 2));
    let mut s = m.session();
    let prompt = [1, 2, 3, 1, 2];
    let all = generate(&mut s, &prompt, 4, &SamplerConfig::greedy(), &[]).unwrap();
    s.reset();
    let cfg = SamplerConfig::greedy();
    let last =
        crate::generate_with(&mut s, &prompt, 4, &cfg, &[], crate::PromptLogits::Last).unwrap();
    assert_eq!((all.prefill_logits.rows, last.prefill_logits.rows), (5, 1));
    let d = all
        .prefill_logits
        .last_row()
        .iter()
        .zip(last.prefill_logits.last_row())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // Exact on f32 panels (one kernel for every row count); row-major, a GEMV against a GEMM.
    let tol = if m.packs_f32() { 0.0 } else { 1e-5 };
    assert!(d <= tol, "last prompt row differs by {d}");
    assert_eq!(all.tokens, last.tokens);
    assert_eq!(all.step_logits, last.step_logits);
    assert_eq!(all.iterations, last.iterations);
    assert_eq!(s.position(), 8);
}

#[test]
fn artifact_bytes_roundtrip_and_garbage() {
    let man = manifest(StateInit::Zeros, ExitPolicy::Fixed, false, 2);
    let a = Artifact::new(man, vec![]);
    let bytes = a.to_bytes();
    assert_eq!(Artifact::from_bytes(&bytes).unwrap(), a);
    assert!(matches!(
        Artifact::from_bytes(b"nope"),
        Err(RuntimeError::Artifact(_))
    ));
    assert!(matches!(
        Artifact::from_bytes(&bytes[..bytes.len() / 2]),
        Err(RuntimeError::Artifact(_))
    ));
    let mut huge = bytes.clone();
    huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        Artifact::from_bytes(&huge),
        Err(RuntimeError::Artifact(_))
    ));
    let mut huge = bytes.clone();
    let n = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    huge[16 + n..24 + n].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    assert!(matches!(
        Artifact::from_bytes(&huge),
        Err(RuntimeError::Artifact(_))
    ));
    let mut bad_json = bytes.clone();
    bad_json[20] = b'#';
    assert!(matches!(
        Artifact::from_bytes(&bad_json),
        Err(RuntimeError::Artifact(_))
    ));
    let dir = std::env::temp_dir().join(format!("loopc-rt-art-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("toy.loopc");
    std::fs::write(&p, &bytes).unwrap();
    assert_eq!(Artifact::load(&p).unwrap(), a);
    assert!(matches!(
        Artifact::load(dir.join("missing.loopc")),
        Err(RuntimeError::Io { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn manifest_validation() {
    let base = || manifest(StateInit::Zeros, ExitPolicy::Fixed, false, 2);
    let check = |m: Manifest, want: &str| {
        let e = Model::with_threads(Artifact::new(m, vec![]), weights(), 1).unwrap_err();
        assert!(e.to_string().contains(want), "expected `{want}` in: {e}");
    };
    let mut m = base();
    m.program.prelude.push(Instr::Copy { src: 0, dst: 99 });
    check(m, "buffer #99 does not exist");
    let mut m = base();
    m.program.coda[1] = Instr::MatMul {
        x: 6,
        w: WRef {
            weight: 2,
            offset: 3 * H,
            rows: V,
            cols: H,
        },
        out: 4,
        epi: Default::default(),
    };
    check(m, "exceeds weight `headpack`");
    let mut m = base();
    m.program.coda[1] = Instr::MatMul {
        x: 3,
        w: WRef {
            weight: 2,
            offset: 0,
            rows: V,
            cols: H,
        },
        out: 4,
        epi: Default::default(),
    };
    check(m, "does not fit");
    let mut m = base();
    m.program.coda.push(Instr::KvWrite {
        site: 0,
        k: 2,
        v: 1,
    });
    check(m, "written outside the recurrence");
    let mut m = base();
    m.program.coda.push(Instr::Kernel {
        kernel: 0,
        args: vec![],
    });
    check(m, "kernel #0 does not exist");
    let mut m = base();
    m.buffers[4].cols = 3;
    check(m, "logits buffer");
    let mut m = base();
    m.weights[0].name = "embed".into();
    check(m, "checkpoint has no tensor `embed`");
    let mut m = base();
    m.weights[1].shape = vec![2 * H, H];
    check(m, "has shape [4, 8]");
    // Kernels declared without a shared object.
    let mut m = base();
    m.kernels.push(KernelDecl {
        symbol: "k".into(),
        spec: KernelSpec::RmsNorm {
            cols: H,
            eps: 1e-6,
            residual: false,
            gain: false,
        },
    });
    m.program.coda.insert(
        0,
        Instr::Kernel {
            kernel: 0,
            args: vec![Arg::Buf(1), Arg::Buf(6)],
        },
    );
    check(m, "no shared object");
    let mut m = base();
    m.kernels.push(KernelDecl {
        symbol: "k".into(),
        spec: KernelSpec::RmsNorm {
            cols: H,
            eps: 1e-6,
            residual: false,
            gain: true,
        },
    });
    m.program.coda.insert(
        0,
        Instr::Kernel {
            kernel: 0,
            args: vec![Arg::Buf(1), Arg::Buf(6)],
        },
    );
    check(m, "takes 3 pointers");
    let mut m = base();
    m.kernels.push(KernelDecl {
        symbol: "att".into(),
        spec: KernelSpec::Attention {
            heads: 2,
            kv_heads: 1,
            head_dim: 2,
            scale: 1.0,
        },
    });
    m.program.coda.insert(
        0,
        Instr::Kernel {
            kernel: 0,
            args: vec![Arg::Buf(1), Arg::KCache(1), Arg::VCache(1), Arg::Buf(6)],
        },
    );
    check(m, "stores 4 values per row, the kernel expects 2");
    let mut m = base();
    m.program.recur.as_mut().unwrap().next = 1;
    check(m, "must be different buffers");
    // Rotary epilogues: a table that does not exist, heads that do not divide the output, a
    // table of another head size, a rotation combined with a norm.
    let rope = |table: u32, head_dim: usize| RopeEpilogue {
        table,
        head_dim,
        style: RopeStyle::Half,
    };
    let rotated = |m: &mut Manifest, epi: Epilogue| {
        m.program.coda.push(Instr::MatMul {
            x: 6,
            w: WRef {
                weight: 2,
                offset: 0,
                rows: H,
                cols: H,
            },
            out: 2,
            epi,
        });
    };
    let table = |head_dim| RopeTable {
        head_dim,
        base: 100.0,
    };
    let mut m = base();
    rotated(
        &mut m,
        Epilogue {
            rope: Some(rope(0, 2)),
            ..Default::default()
        },
    );
    check(m, "rope epilogue table #0 does not exist");
    let mut m = base();
    m.rope_tables.push(table(2));
    if let Instr::MatMul { epi, .. } = &mut m.program.coda[1] {
        epi.rope = Some(rope(0, 2));
    }
    check(m, "which must divide");
    let mut m = base();
    m.rope_tables.push(table(2));
    rotated(
        &mut m,
        Epilogue {
            rope: Some(rope(0, 4)),
            ..Default::default()
        },
    );
    check(m, "must match head_dim 4");
    let mut m = base();
    m.rope_tables.push(table(2));
    rotated(
        &mut m,
        Epilogue {
            rope: Some(rope(0, 2)),
            norm: Some(NormEpilogue {
                eps: 1e-6,
                normalize: true,
                gain: None,
                inv_rms: None,
            }),
            ..Default::default()
        },
    );
    check(m, "not combined with a gated unit or a norm");
    let mut m = base();
    m.rope_tables.push(table(2));
    rotated(
        &mut m,
        Epilogue {
            rope: Some(rope(0, 2)),
            ..Default::default()
        },
    );
    Model::with_threads(Artifact::new(m, vec![]), weights(), 1).unwrap();
    // Threads.
    let e = Model::with_threads(Artifact::new(base(), vec![]), weights(), 0).unwrap_err();
    assert!(matches!(e, RuntimeError::Config(_)));
}

#[test]
fn matmul_with_many_tokens_uses_gemm_path() {
    // 40 tokens: the gemm path in MatMul (rows > 1) against the per-row reference.
    let m = model(manifest(StateInit::Zeros, ExitPolicy::Fixed, false, 3));
    let mut s = m.session();
    let toks: Vec<u32> = (0..40).map(|i| (i * 7 % V) as u32).collect();
    let l = s.prefill(&toks).unwrap();
    for (r, &t) in toks.iter().enumerate() {
        close(
            l.row(r),
            &reference_logits(&reference_states(t, &[0.0; H], 3)[3]),
        );
    }
    // With f32 packing (AVX-512, `LOOPC_PACK_F32` not 0) the matmul windows are held in
    // panels of 32 rows padded with zero rows: the adapter `[2H, H]` read as `[k, n]` and the
    // head's `[V, H]` window of `headpack`. The table is no matmul's weight, so it stays
    // f32; nothing reads `headpack` or `gate` in f32 any more, so their copies are gone.
    let want = if m.packs_f32() {
        let pad = |n: usize| n.next_multiple_of(crate::matmul::packed::NR);
        V * H + pad(H) * 2 * H + pad(V) * H
    } else {
        V * H + 2 * H * H + 7 * H + H
    };
    assert_eq!(m.weight_bytes().0 + m.weight_bytes().1, 4 * want);
}

#[test]
fn thread_safety_of_public_types() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Model>();
    send_sync::<Weights>();
    send_sync::<Artifact>();
    send::<crate::Session>();
    // Sessions of one model run concurrently.
    let m = model(manifest(StateInit::Zeros, ExitPolicy::Fixed, false, 2));
    let outs: Vec<Vec<f32>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let m = m.clone();
                sc.spawn(move || m.session().prefill(&[1, 2, 3]).unwrap().data)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(outs.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn check_weights_lists_every_problem() {
    let mut m = manifest(StateInit::Zeros, ExitPolicy::Fixed, false, 2);
    let w = weights();
    assert!(crate::check_weights(&w, &m.weights).is_empty());
    m.weights[0].name = "emb.weight".into();
    m.weights[1].shape = vec![H, H];
    m.weights[3].name = "gaet".into();
    let p = crate::check_weights(&w, &m.weights);
    assert_eq!(p.len(), 3, "{p:#?}");
    assert!(
        p[0].contains("`emb.weight`") && p[0].contains("`emb`") && p[0].contains("test.loop:1:"),
        "{}",
        p[0]
    );
    assert!(
        p[1].contains("[4, 8]") && p[1].contains("[4, 4]"),
        "{}",
        p[1]
    );
    assert!(p[2].contains("`gate`"), "{}", p[2]);
}

#[test]
fn generate_output_writes_safetensors_and_stats_display() {
    let m = model(manifest(StateInit::Zeros, ExitPolicy::Fixed, false, 2));
    let mut s = m.session();
    s.set_profiling(true);
    let out = generate(&mut s, &[1, 2, 3], 3, &SamplerConfig::greedy(), &[]).unwrap();
    assert!(out.prefill_seconds > 0.0 && out.decode_seconds > 0.0);
    let dir = std::env::temp_dir().join(format!("loopc-rt-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("dump.safetensors");
    out.write_safetensors(&p, &[1, 2, 3]).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("prefill_logits").unwrap().shape(), &[3, V]);
    assert_eq!(st.tensor("decode_logits").unwrap().shape(), &[2, V]);
    assert_eq!(st.tensor("tokens").unwrap().shape(), &[3]);
    let dec: Vec<f32> = st
        .tensor("decode_logits")
        .unwrap()
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(dec, out.step_logits.data);
    assert!(out
        .write_safetensors(dir.join("no/such/dir/x.safetensors"), &[1])
        .is_err());
    let _ = std::fs::remove_dir_all(&dir);
    let stats = s.stats();
    let text = stats.to_string();
    assert!(
        text.contains("prefill: 1 call(s), 3 tokens") && text.contains("decode: 2 step(s)"),
        "{text}"
    );
    assert!(
        stats
            .profile
            .iter()
            .any(|(n, _, c)| *n == "matmul" && *c > 0),
        "{text}"
    );
    assert!(text.contains("matmul"), "{text}");
}
