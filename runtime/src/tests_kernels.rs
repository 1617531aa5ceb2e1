//! The kernel ABI end to end: hand-written C kernels (compiled with the system `cc` when there
//! is one; the test is skipped otherwise) in a toy one-layer looped transformer, against a Rust
//! reference. Exercises pointer resolution (buffers, weight windows, rope tables, KV slots per
//! iteration), the `[begin, end, pos0, kv_len]` integers and the chunked parallel launch.

use crate::artifact::*;
use crate::{Artifact, Model, Weights};
use std::collections::BTreeMap;

const V: usize = 7;
const D: usize = 8; // hidden = 2 heads × 4
const HD: usize = 4;
const KVD: usize = 4; // 1 kv head
const STEPS: usize = 2;
const SCALE: f32 = 0.5;
const EPS: f32 = 1e-5;

const C_SRC: &str = r#"
#include <math.h>
#include <stdint.h>
static void rope(float* x, const float* c, const float* s, int64_t b, int64_t e, int64_t pos0, int heads, int hd) {
    int half = hd / 2;
    for (int64_t r = b; r < e; r++) {
        int64_t p = pos0 + r;
        for (int h = 0; h < heads; h++) for (int i = 0; i < half; i++) {
            float* v = x + r * heads * hd + h * hd + 2 * i;
            float cc = c[p * half + i], ss = s[p * half + i];
            float a = v[0], bb = v[1];
            v[0] = a * cc - bb * ss;
            v[1] = bb * cc + a * ss;
        }
    }
}
void k_rope_q(float** p, const int64_t* n) { rope(p[0], p[1], p[2], n[0], n[1], n[2], 2, 4); }
void k_rope_k(float** p, const int64_t* n) { rope(p[0], p[1], p[2], n[0], n[1], n[2], 1, 4); }
void k_rms(float** p, const int64_t* n) {
    for (int64_t r = n[0]; r < n[1]; r++) {
        const float* x = p[0] + r * 8; float* y = p[2] + r * 8;
        float ss = 0; for (int c = 0; c < 8; c++) ss += x[c] * x[c];
        float k = 1.0f / sqrtf(ss / 8 + 1e-5f);
        for (int c = 0; c < 8; c++) y[c] = x[c] * k * p[1][c];
    }
}
void k_add(float** p, const int64_t* n) {
    for (int64_t r = n[0]; r < n[1]; r++) for (int c = 0; c < 8; c++) p[2][r * 8 + c] = p[0][r * 8 + c] + p[1][r * 8 + c];
}
void k_attn(float** p, const int64_t* n) {
    const float *q = p[0], *kc = p[1], *vc = p[2]; float* o = p[3];
    for (int64_t i = n[0]; i < n[1]; i++) {
        int64_t row = i / 2, h = i % 2, kvh = h / 2, L = n[2] + row + 1;
        if (L > n[3]) L = -1000000; /* poison: attending past kv_len is a bug */
        const float* qq = q + row * 8 + h * 4;
        float m = -INFINITY, sum = 0, acc[4] = {0, 0, 0, 0};
        for (int64_t j = 0; j < L; j++) {
            const float* k = kc + j * 4 + kvh * 4; const float* v = vc + j * 4 + kvh * 4;
            float sc = 0; for (int d = 0; d < 4; d++) sc += qq[d] * k[d];
            sc *= 0.5f;
            float mn = sc > m ? sc : m, a = expf(m - mn), w = expf(sc - mn);
            sum = sum * a + w;
            for (int d = 0; d < 4; d++) acc[d] = acc[d] * a + w * v[d];
            m = mn;
        }
        for (int d = 0; d < 4; d++) o[row * 8 + h * 4 + d] = acc[d] / sum;
    }
}
"#;

fn compile() -> Option<Vec<u8>> {
    let dir = std::env::temp_dir().join(format!("loopc-rt-cc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let c = dir.join("k.c");
    let so = dir.join("k.so");
    std::fs::write(&c, C_SRC).ok()?;
    let st = std::process::Command::new("cc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&c)
        .arg("-lm")
        .status()
        .ok()?;
    let bytes = if st.success() {
        std::fs::read(&so).ok()
    } else {
        None
    };
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

fn gen(n: usize, seed: usize, mul: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((((i + 3) * (seed * 2 + 31) + seed) % 23) as f32 / 23.0 - 0.5) * mul)
        .collect()
}

struct W {
    emb: Vec<f32>,
    norms: Vec<f32>, // [2, D]; the gain is row 1
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    head: Vec<f32>,
}

fn wdata() -> W {
    W {
        emb: gen(V * D, 1, 2.0),
        norms: gen(2 * D, 2, 1.0).iter().map(|x| x + 1.0).collect(),
        wq: gen(D * D, 3, 1.0),
        wk: gen(KVD * D, 4, 1.0),
        wv: gen(KVD * D, 5, 1.0),
        wo: gen(D * D, 6, 0.5),
        head: gen(V * D, 7, 1.0),
    }
}

fn manifest() -> Manifest {
    let wr = |weight: u32, offset: usize, rows: usize, cols: usize| WRef {
        weight,
        offset,
        rows,
        cols,
    };
    let b = |name: &str, cols: usize| BufferDecl {
        name: name.into(),
        rows: Rows::Tokens,
        cols,
    };
    let wd = |name: &str, shape: Vec<usize>| WeightDecl {
        name: name.into(),
        shape,
        origin: "t.loop:1:1".into(),
    };
    let kd = |symbol: &str, spec: KernelSpec| KernelDecl {
        symbol: symbol.into(),
        spec,
    };
    // buffers: 0 e, 1 s, 2 n, 3 xn, 4 q, 5 k, 6 v, 7 att, 8 o, 9 logits
    Manifest {
        format_version: FORMAT_VERSION,
        model: "toy-attn".into(),
        target: "cpu-x86_64".into(),
        backend: "c".into(),
        params: BTreeMap::new(),
        vocab: V,
        hidden: D,
        weights: vec![
            wd("emb", vec![V, D]),
            wd("norms", vec![2, D]),
            wd("wq", vec![D, D]),
            wd("wk", vec![KVD, D]),
            wd("wv", vec![KVD, D]),
            wd("wo", vec![D, D]),
            wd("head", vec![V, D]),
        ],
        buffers: vec![
            b("e", D),
            b("s", D),
            b("n", D),
            b("xn", D),
            b("q", D),
            b("k", KVD),
            b("v", KVD),
            b("att", D),
            b("o", D),
            b("logits", V),
        ],
        kernels: vec![
            kd(
                "k_rms",
                KernelSpec::RmsNorm {
                    cols: D,
                    eps: EPS,
                    residual: false,
                    gain: true,
                },
            ),
            kd(
                "k_rope_q",
                KernelSpec::Rope {
                    heads: 2,
                    head_dim: HD,
                    style: RopeStyle::Interleaved,
                },
            ),
            kd(
                "k_rope_k",
                KernelSpec::Rope {
                    heads: 1,
                    head_dim: HD,
                    style: RopeStyle::Interleaved,
                },
            ),
            kd(
                "k_attn",
                KernelSpec::Attention {
                    heads: 2,
                    kv_heads: 1,
                    head_dim: HD,
                    scale: SCALE,
                },
            ),
            kd(
                "k_add",
                KernelSpec::Elementwise {
                    cols: D,
                    inputs: vec![EwIn::Rows, EwIn::Rows],
                    ops: vec![EwOp::Input(0), EwOp::Input(1), EwOp::Add(0, 1)],
                    outputs: vec![2],
                },
            ),
        ],
        rope_tables: vec![RopeTable {
            head_dim: HD,
            base: 100.0,
        }],
        kv_sites: vec![KvSite {
            name: "core.attn".into(),
            kv_heads: 1,
            head_dim: HD,
            in_loop: true,
        }],
        program: Program {
            prelude: vec![Instr::Embed {
                table: wr(0, 0, V, D),
                out: 0,
            }],
            recur: Some(Recur {
                state: 1,
                next: 2,
                init: StateInit::From(0),
                body: vec![
                    Instr::Kernel {
                        kernel: 0,
                        args: vec![Arg::Buf(1), Arg::Weight(wr(1, D, 1, D)), Arg::Buf(3)],
                    },
                    Instr::MatMul {
                        x: 3,
                        w: wr(2, 0, D, D),
                        out: 4,
                        epi: Default::default(),
                    },
                    Instr::MatMul {
                        x: 3,
                        w: wr(3, 0, KVD, D),
                        out: 5,
                        epi: Default::default(),
                    },
                    Instr::MatMul {
                        x: 3,
                        w: wr(4, 0, KVD, D),
                        out: 6,
                        epi: Default::default(),
                    },
                    Instr::Kernel {
                        kernel: 1,
                        args: vec![Arg::Buf(4), Arg::RopeCos(0), Arg::RopeSin(0)],
                    },
                    Instr::Kernel {
                        kernel: 2,
                        args: vec![Arg::Buf(5), Arg::RopeCos(0), Arg::RopeSin(0)],
                    },
                    Instr::KvWrite {
                        site: 0,
                        k: 5,
                        v: 6,
                    },
                    Instr::Kernel {
                        kernel: 3,
                        args: vec![Arg::Buf(4), Arg::KCache(0), Arg::VCache(0), Arg::Buf(7)],
                    },
                    Instr::MatMul {
                        x: 7,
                        w: wr(5, 0, D, D),
                        out: 8,
                        epi: Default::default(),
                    },
                    Instr::Kernel {
                        kernel: 4,
                        args: vec![Arg::Buf(1), Arg::Buf(8), Arg::Buf(2)],
                    },
                ],
                default_steps: STEPS,
                exit: ExitPolicy::Fixed,
                cache: CachePolicy::PerStep,
                gate: None,
                readout: vec![],
                router: vec![],
                router_out: None,
            }),
            coda: vec![Instr::MatMul {
                x: 1,
                w: wr(6, 0, V, D),
                out: 9,
                epi: Default::default(),
            }],
            logits: 9,
        },
        derived: vec![],
        cuda: None,
        host_gemm: None,
    }
}

fn lin(x: &[f32], w: &[f32], n: usize) -> Vec<f32> {
    let k = x.len();
    (0..n)
        .map(|j| {
            (0..k)
                .map(|i| x[i] as f64 * w[j * k + i] as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

fn rope(x: &mut [f32], pos: usize) {
    for h in 0..x.len() / HD {
        for i in 0..HD / 2 {
            let th = pos as f64 / 100f64.powf(2.0 * i as f64 / HD as f64);
            let (s, c) = (th.sin() as f32, th.cos() as f32);
            let (a, b) = (x[h * HD + 2 * i], x[h * HD + 2 * i + 1]);
            x[h * HD + 2 * i] = a * c - b * s;
            x[h * HD + 2 * i + 1] = b * c + a * s;
        }
    }
}

/// Full-sequence reference: logits per position.
fn reference(tokens: &[u32]) -> Vec<Vec<f32>> {
    let w = wdata();
    let n = tokens.len();
    let mut s: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&t| w.emb[t as usize * D..(t as usize + 1) * D].to_vec())
        .collect();
    for _ in 0..STEPS {
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (p, x) in s.iter().enumerate() {
            let ms: f32 = x.iter().map(|v| v * v).sum::<f32>() / D as f32;
            let xn: Vec<f32> = x
                .iter()
                .zip(&w.norms[D..])
                .map(|(v, g)| v / (ms + EPS).sqrt() * g)
                .collect();
            let mut q = lin(&xn, &w.wq, D);
            let mut k = lin(&xn, &w.wk, KVD);
            rope(&mut q, p);
            rope(&mut k, p);
            qs.push(q);
            ks.push(k);
            vs.push(lin(&xn, &w.wv, KVD));
        }
        let mut next = vec![];
        for p in 0..n {
            let mut att = vec![0f32; D];
            for h in 0..2 {
                let q = &qs[p][h * HD..(h + 1) * HD];
                let sc: Vec<f64> = (0..=p)
                    .map(|j| {
                        q.iter()
                            .zip(&ks[j])
                            .map(|(a, b)| (a * b) as f64)
                            .sum::<f64>()
                            * SCALE as f64
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..HD {
                    att[h * HD + d] =
                        ((0..=p).map(|j| e[j] * vs[j][d] as f64).sum::<f64>() / z) as f32;
                }
            }
            let o = lin(&att, &w.wo, D);
            next.push(
                s[p].iter()
                    .zip(&o)
                    .map(|(a, b)| a + b)
                    .collect::<Vec<f32>>(),
            );
        }
        s = next;
    }
    s.iter().map(|x| lin(x, &w.head, V)).collect()
}

#[test]
fn c_kernels_through_the_abi() {
    let Some(object) = compile() else {
        eprintln!("skipping: no working `cc`");
        return;
    };
    let w = wdata();
    let weights = Weights::from_f32([
        ("emb", vec![V, D], &w.emb[..]),
        ("norms", vec![2, D], &w.norms[..]),
        ("wq", vec![D, D], &w.wq[..]),
        ("wk", vec![KVD, D], &w.wk[..]),
        ("wv", vec![KVD, D], &w.wv[..]),
        ("wo", vec![D, D], &w.wo[..]),
        ("head", vec![V, D], &w.head[..]),
    ])
    .unwrap();
    let model = Model::with_threads(Artifact::new(manifest(), object), weights, 2).unwrap();
    // 70 prompt tokens so that attention runs chunked in parallel, then 3 decode steps
    // (the rotary tables grow past 64 positions, the KV cache past 64 rows).
    let tokens: Vec<u32> = (0..73).map(|i| ((i * 5 + i / 7) % V) as u32).collect();
    let want = reference(&tokens);
    let mut s = model.session();
    let l = s.prefill(&tokens[..70]).unwrap();
    let mut got: Vec<Vec<f32>> = l.iter_rows().map(|r| r.to_vec()).collect();
    for &t in &tokens[70..] {
        got.push(s.step(t).unwrap().to_vec());
    }
    for (p, (g, r)) in got.iter().zip(&want).enumerate() {
        for (a, b) in g.iter().zip(r) {
            assert!(
                (a - b).abs() < 2e-4 * (1.0 + b.abs()),
                "position {p}: {g:?} vs {r:?}"
            );
        }
    }
    assert_eq!(s.kv_lens()[0].1, vec![73, 73]);
}
