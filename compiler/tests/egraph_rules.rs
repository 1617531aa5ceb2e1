//! Every e-graph rule on a minimal program: the rule must fire, the rewritten program must
//! verify, and both sides, compiled by the real backend and run by the runtime on random weights
//! and tokens, must give the same logits (≤ 1e-5 relative to the logits' scale) over shapes
//! drawn by proptest. Snapshots pin the IR before and after each rule.
use loopc_compiler::backend::cranelift;
use loopc_compiler::driver;
use loopc_compiler::egraph;
use loopc_dialects::parse::parse_module;
use loopc_dialects::print::print_module;
use loopc_dialects::verify::verify_module;
use loopc_dialects::Module;
use loopc_runtime::{Artifact, Model, Weights};

/// A small deterministic generator (xorshift), so failures reproduce from the printed seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn pick(&mut self, xs: &[usize]) -> usize {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

fn run(m: &Module, rng_seed: u64, tokens: &[u32]) -> Vec<f32> {
    let model = compile(m, rng_seed);
    let mut s = model.session();
    let mut out = s
        .prefill(&tokens[..tokens.len() - 1])
        .unwrap()
        .data()
        .to_vec();
    out.extend_from_slice(s.step(tokens[tokens.len() - 1]).unwrap().data());
    out
}

/// A batch of two sequences at different positions (a short and a long prefill, then one
/// decode step each): rows of one call whose positions are not `pos0 + row`.
fn run_batch(m: &Module, rng_seed: u64, tokens: &[u32]) -> Vec<f32> {
    let model = compile(m, rng_seed);
    let mut b = model.batch_session(2);
    let n = tokens.len();
    let mut out = vec![];
    for l in b.prefill(&[&tokens[..2], &tokens[..n - 1]]).unwrap() {
        out.extend_from_slice(l.data());
    }
    for l in b.step(&[Some(tokens[n - 1]), Some(tokens[0])]).unwrap() {
        out.extend_from_slice(l.data());
    }
    out
}

/// `m` compiled by the Cranelift backend, on random weights from `rng_seed`.
fn compile(m: &Module, rng_seed: u64) -> Model {
    verify_module(m).unwrap_or_else(|e| panic!("{e}\n{}", print_module(m)));
    let manifest = driver::program(m).unwrap_or_else(|e| panic!("{e}\n{}", print_module(m)));
    let so = cranelift::compile_kernels(&manifest.kernels)
        .unwrap()
        .shared_object;
    let mut rng = Rng(rng_seed);
    let data: Vec<Vec<f32>> = m
        .weights
        .iter()
        .map(|w| {
            (0..w.shape.iter().product::<usize>())
                .map(|_| 0.5 * rng.uniform())
                .collect()
        })
        .collect();
    let weights = Weights::from_f32(
        m.weights
            .iter()
            .zip(&data)
            .map(|(w, d)| (w.name.as_str(), w.shape.clone(), d.as_slice())),
    )
    .unwrap();
    Model::with_threads(Artifact::new(manifest, so), weights, 2).unwrap()
}

/// Optimize a copy of `m`, check that `rule` fired, and compare both sides on the backend.
fn check_rule(text: &str, rule: &str, seed: u64) -> Module {
    let lhs = parse_module(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    verify_module(&lhs).unwrap();
    let mut rhs = lhs.clone();
    let report = egraph::optimize(&mut rhs);
    assert!(
        report.fired(rule) > 0,
        "rule {rule} did not fire:\n{}\n{text}",
        report.text()
    );
    assert!(
        report.regions.iter().any(|r| r.replaced),
        "{rule}: nothing was cheaper:\n{}",
        report.text()
    );
    verify_module(&rhs).unwrap_or_else(|e| panic!("{e}\n{}", print_module(&rhs)));
    let tokens: Vec<u32> = (0..5)
        .map(|i| ((seed as u32).wrapping_mul(7) + i * 3) % 16)
        .collect();
    let a = run(&lhs, seed, &tokens);
    let b = run(&rhs, seed, &tokens);
    let scale = a.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale;
    assert!(
        d <= 1e-5,
        "{rule} seed {seed}: sides differ by {d:e} (relative)\n{}",
        print_module(&rhs)
    );
    rhs
}

const V: usize = 16;

fn header(ws: &[(&str, Vec<usize>)]) -> String {
    let mut s = String::from("module \"t\"\n");
    for (i, (n, sh)) in ws.iter().enumerate() {
        let d: Vec<String> = sh.iter().map(|x| x.to_string()).collect();
        s += &format!("weight @{i} \"{n}\" [{}]\n", d.join(", "));
    }
    s
}

fn w(shape: &[usize]) -> String {
    let d: Vec<String> = shape.iter().map(|x| x.to_string()).collect();
    format!("w[{}]", d.join(", "))
}

fn residual_text(d: usize) -> String {
    // The branch is not a matmul, so `residual-epilogue` has nothing to take and the fused norm
    // is the cheapest form of `norm(x + branch)`.
    header(&[("emb", vec![V, d]), ("g", vec![d]), ("head", vec![V, d])])
        + &format!(
            "forward {{
  %0 = tokens : tokens
  %1 = weight @0 : {wv}
  %2 = embed %0, %1 : [S, {d}]
  %3 = tanh %2 : [S, {d}]
  %4 = silu %3 : [S, {d}]
  %5 = add %2, %4 : [S, {d}]
  %6 = weight @1 : w[{d}]
  %7 = rmsnorm %5, %6 eps=1e-6 : [S, {d}]
  %8 = add %5, %7 : [S, {d}]
  %9 = weight @2 : {wv}
  %10 = linear %8, %9 : [S, {V}]
  return %10
}}
",
            wv = w(&[V, d]),
        )
}

fn embed_scale_text(d: usize) -> String {
    header(&[("emb", vec![V, d]), ("head", vec![V, d])])
        + &format!(
            "forward {{
  %0 = tokens : tokens
  %1 = weight @0 : {wv}
  %2 = embed %0, %1 : [S, {d}]
  %3 = scale %2 by=2.5 : [S, {d}]
  %4 = weight @1 : {wv}
  %5 = linear %3, %4 : [S, {V}]
  return %5
}}
",
            wv = w(&[V, d])
        )
}

fn q_scale_text(heads: usize, hd: usize) -> String {
    let d = heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    header(&[
        ("emb", vec![V, d]),
        ("wq", vec![d, d]),
        ("wk", vec![d, d]),
        ("wv", vec![d, d]),
        ("bq", vec![d]),
        ("head", vec![V, d]),
    ]) + &format!(
        "forward {{
  %0 = tokens : tokens
  %1 = weight @0 : {wv}
  %2 = embed %0, %1 : [S, {d}]
  %3 = weight @1 : {wd}
  %4 = weight @2 : {wd}
  %5 = weight @3 : {wd}
  %6 = weight @4 : w[{d}]
  %7 = linear %2, %3 : [S, {d}]
  %8 = add %7, %6 : [S, {d}]
  %9 = rope %8 heads={heads} style=interleaved base=10000.0 : [S, {d}]
  %10 = linear %2, %4 : [S, {d}]
  %11 = rope %10 heads={heads} style=interleaved base=10000.0 : [S, {d}]
  %12 = linear %2, %5 : [S, {d}]
  %13 = attention %9, %11, %12 heads={heads} kv_heads={heads} scale={scale:?} site=0 : [S, {d}]
  %14 = weight @5 : {wv}
  %15 = linear %13, %14 : [S, {V}]
  return %15
}}
",
        wv = w(&[V, d]),
        wd = w(&[d, d])
    )
}

fn gain_fold_text(d: usize, n: usize, residual: bool) -> String {
    // Two matmuls read the norm (the rule needs every user to be one); with `residual`, the
    // norm's input is a residual sum that is also used later.
    header(&[
        ("emb", vec![V, d]),
        ("wa", vec![n, d]),
        ("wb", vec![n, d]),
        ("g", vec![d]),
        ("wo", vec![d, n]),
        ("head", vec![V, d]),
    ]) + &format!(
        "forward {{
  %0 = tokens : tokens
  %1 = weight @0 : {wv}
  %2 = embed %0, %1 : [S, {d}]
  %3 = {sum} : [S, {d}]
  %4 = weight @3 : w[{d}]
  %5 = rmsnorm %3, %4 eps=1e-5 : [S, {d}]
  %6 = weight @1 : {wn}
  %7 = linear %5, %6 : [S, {n}]
  %8 = weight @2 : {wn}
  %9 = linear %5, %8 : [S, {n}]
  %10 = mul %7, %9 : [S, {n}]
  %11 = weight @4 : w[{d}, {n}]
  %12 = linear %10, %11 : [S, {d}]
  %13 = add %3, %12 : [S, {d}]
  %14 = weight @5 : {wv}
  %15 = linear %13, %14 : [S, {V}]
  return %15
}}
",
        sum = if residual {
            "add %2, %2".to_string()
        } else {
            "tanh %2".to_string()
        },
        wv = w(&[V, d]),
        wn = w(&[n, d])
    )
}

fn swiglu_text(d: usize, f: usize, fused: bool, act: &str) -> String {
    // `fused`: gate and up are adjacent row windows of one [2f, d] tensor (Huginn's `fc`);
    // otherwise two tensors (Ouro's gate_proj / up_proj).
    let ws = if fused {
        vec![
            ("emb", vec![V, d]),
            ("fc", vec![2 * f, d]),
            ("down", vec![d, f]),
            ("head", vec![V, d]),
        ]
    } else {
        vec![
            ("emb", vec![V, d]),
            ("gate", vec![f, d]),
            ("up", vec![f, d]),
            ("down", vec![d, f]),
            ("head", vec![V, d]),
        ]
    };
    let (up, down, head) = if fused {
        (format!("weight @1+{}", f * d), 2, 3)
    } else {
        ("weight @2".to_string(), 3, 4)
    };
    header(&ws)
        + &format!(
            "forward {{
  %0 = tokens : tokens
  %1 = weight @0 : {wv}
  %2 = embed %0, %1 : [S, {d}]
  %3 = weight @1 : {wf}
  %4 = {up} : {wf}
  %5 = linear %2, %3 : [S, {f}]
  %6 = {act} %5 : [S, {f}]
  %7 = linear %2, %4 : [S, {f}]
  %8 = mul %6, %7 : [S, {f}]
  %9 = weight @{down} : w[{d}, {f}]
  %10 = linear %8, %9 : [S, {d}]
  %11 = weight @{head} : {wv}
  %12 = linear %10, %11 : [S, {V}]
  return %12
}}
",
            wv = w(&[V, d]),
            wf = w(&[f, d])
        )
}

fn rope_bias_text(heads: usize, hd: usize, style: &str, bias_first: bool) -> String {
    let d = heads * hd;
    let add = if bias_first {
        "add %5, %4"
    } else {
        "add %4, %5"
    };
    header(&[
        ("emb", vec![V, d]),
        ("wq", vec![d, d]),
        ("bq", vec![1, heads, hd]),
        ("head", vec![V, d]),
    ]) + &format!(
        "forward {{
  %0 = tokens : tokens
  %1 = weight @0 : {wv}
  %2 = embed %0, %1 : [S, {d}]
  %3 = weight @1 : w[{d}, {d}]
  %4 = linear %2, %3 : [S, {d}]
  %5 = weight @2 : w[1, {heads}, {hd}]
  %6 = {add} : [S, {d}]
  %7 = rope %6 heads={heads} style={style} base=500.0 : [S, {d}]
  %8 = add %7, %2 : [S, {d}]
  %9 = weight @3 : {wv}
  %10 = linear %8, %9 : [S, {V}]
  return %10
}}
",
        wv = w(&[V, d])
    )
}

fn concat_linear_text(d: usize, steps: usize) -> String {
    header(&[
        ("emb", vec![V, d]),
        ("adapter", vec![d, 2 * d]),
        ("head", vec![V, d]),
    ]) + &format!(
        "forward {{
  %0 = tokens : tokens
  %1 = weight @0 : {wv}
  %2 = embed %0, %1 : [S, {d}]
  %3 = loop.recur %2 steps={steps} init=zeros exit=fixed cache=per_step gate=false : [S, {d}] {{
    %0 = param 0 : [S, {d}]
    %1 = param 1 : [S, {d}]
    %2 = concat %0, %1 : [S, {d2}]
    %3 = weight @1 : {wa}
    %4 = linear %2, %3 : [S, {d}]
    %5 = tanh %4 : [S, {d}]
    yield %5
  }}
  %4 = weight @2 : {wv}
  %5 = linear %3, %4 : [S, {V}]
  return %5
}}
",
        d2 = 2 * d,
        wv = w(&[V, d]),
        wa = w(&[d, 2 * d])
    )
}

/// `swiglu_text` with a gainless norm in front of the gate/up matmuls (Huginn's MLP input),
/// so the product carries the norm's row scale.
fn swiglu_normed_text(d: usize, f: usize, fused: bool, act: &str) -> String {
    swiglu_text(d, f, fused, act).replace(
        &format!("  %2 = embed %0, %1 : [S, {d}]\n"),
        &format!("  %e = embed %0, %1 : [S, {d}]\n  %2 = rmsnorm %e eps=1e-6 : [S, {d}]\n"),
    )
}

/// A GPT-2 block's MLP with `Conv1D` weights (`[in, out]`, the `matmul` op), separate bias adds
/// (either operand order) and the residual add.
fn conv1d_text(d: usize, n: usize, bias_first: bool) -> String {
    let add = |y: &str, b: &str| {
        if bias_first {
            format!("add {b}, {y}")
        } else {
            format!("add {y}, {b}")
        }
    };
    header(&[
        ("emb", vec![V, d]),
        ("c_fc", vec![d, n]),
        ("c_fc_b", vec![n]),
        ("c_proj", vec![n, d]),
        ("c_proj_b", vec![d]),
        ("head", vec![V, d]),
    ]) + &format!(
        "forward {{
  %0 = tokens : tokens
  %1 = weight @0 : {wv}
  %2 = embed %0, %1 : [S, {d}]
  %3 = weight @1 : w[{d}, {n}]
  %4 = matmul %2, %3 : [S, {n}]
  %5 = weight @2 : w[{n}]
  %6 = {a6} : [S, {n}]
  %7 = gelu_tanh %6 : [S, {n}]
  %8 = weight @3 : w[{n}, {d}]
  %9 = matmul %7, %8 : [S, {d}]
  %10 = weight @4 : w[{d}]
  %11 = {a11} : [S, {d}]
  %12 = add %2, %11 : [S, {d}]
  %13 = weight @5 : {wv}
  %14 = linear %12, %13 : [S, {V}]
  return %14
}}
",
        wv = w(&[V, d]),
        a6 = add("%4", "%5"),
        a11 = add("%9", "%10"),
    )
}

/// A sandwich block's tail: `r + o_proj(a)` (residual epilogue), with `post_norm` the block's
/// norm of that sum (Huginn's `norm_2`), then the next pre-norm read by two matmuls (its gain
/// folded, its `inv_rms` a row scale) and the down projection adding the stream back.
fn sandwich_text(d: usize, n: usize, post_norm: bool) -> String {
    let stream = if post_norm {
        format!("  %g1 = weight @2 : w[{d}]\n  %h = rmsnorm %6, %g1 eps=1e-6 : [S, {d}]\n")
    } else {
        String::new()
    };
    let h = if post_norm { "%h" } else { "%6" };
    header(&[
        ("emb", vec![V, d]),
        ("wo", vec![d, d]),
        ("g1", vec![d]),
        ("g2", vec![d]),
        ("wa", vec![n, d]),
        ("wb", vec![n, d]),
        ("wd", vec![d, n]),
        ("head", vec![V, d]),
    ]) + &format!(
        "forward {{
  %0 = tokens : tokens
  %1 = weight @0 : {wv}
  %2 = embed %0, %1 : [S, {d}]
  %3 = weight @1 : w[{d}, {d}]
  %4 = tanh %2 : [S, {d}]
  %5 = linear %4, %3 : [S, {d}]
  %6 = add %2, %5 : [S, {d}]
{stream}  %g2 = weight @3 : w[{d}]
  %p = rmsnorm {h}, %g2 eps=1e-6 : [S, {d}]
  %wa = weight @4 : w[{n}, {d}]
  %a = linear %p, %wa : [S, {n}]
  %wb = weight @5 : w[{n}, {d}]
  %b = linear %p, %wb : [S, {n}]
  %m = mul %a, %b : [S, {n}]
  %wd = weight @6 : w[{d}, {n}]
  %dn = linear %m, %wd : [S, {d}]
  %o = add {h}, %dn : [S, {d}]
  %wh = weight @7 : {wv}
  %lg = linear %o, %wh : [S, {V}]
  return %lg
}}
",
        wv = w(&[V, d]),
    )
}

#[test]
fn rule_scale_identity_on_the_backend() {
    for (seed, d) in [(0, 3), (1, 16)] {
        let rhs = check_rule(
            &embed_scale_text(d).replace("by=2.5", "by=1.0"),
            "scale-identity",
            seed,
        );
        let text = print_module(&rhs);
        assert!(
            !text.contains("scale"),
            "neither a scale op nor a derived table: {text}"
        );
    }
}

#[test]
fn hoisting_with_an_operand_init_state_and_an_exit_gate() {
    // Ouro-style init (the first operand is the initial state) plus a capture and a learned
    // exit gate: the hoisted value must become the last capture, after the existing ones.
    let mut rng = Rng(0x5eed_0008);
    for seed in 0..3 {
        let d = rng.pick(&[4, 16, 33]);
        let text = concat_linear_text(d, 3)
            .replace("%3 = loop.recur %2 steps=3 init=zeros exit=fixed cache=per_step gate=false", "%3 = loop.recur %2, %2 steps=3 init=operand exit=fixed cache=per_step gate=true")
            .replace("    yield %5\n", &format!("    %6 = weight @2 : w[{V}, {d}]\n    %7 = linear %5, %6 : [S, {V}]\n    %8 = slice %7 start=0 len=1 : [S, 1]\n    yield %5, %8\n"));
        // The gate must be a matmul of width 1 for lowering: use a [1, d] window of the head.
        let text = text
            .replace(&format!("    %6 = weight @2 : w[{V}, {d}]\n    %7 = linear %5, %6 : [S, {V}]\n    %8 = slice %7 start=0 len=1 : [S, 1]\n"), &format!("    %6 = weight @2 : w[1, {d}]\n    %7 = linear %5, %6 : [S, 1]\n"))
            .replace("    yield %5, %8\n", "    yield %5, %7\n");
        let rhs = check_rule(&text, "concat-linear-split", seed);
        let out = print_module(&rhs);
        assert!(
            out.contains("init=operand") && out.contains("gate=true"),
            "{out}"
        );
    }
}

proptest::proptest! {
    // Few cases: each one compiles two artifacts with Cranelift.
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 6,
        failure_persistence: None,
        ..Default::default()
    })]

    /// `linear(rmsnorm(x), W·diag(g))` as `inv_rms` + a matmul with a row-scale epilogue, on
    /// both norm forms (plain, and the normalized half of a fused residual norm).
    #[test]
    fn rule_rmsnorm_rowscale_on_the_backend(
        d in proptest::sample::select(vec![1usize, 4, 16, 40]),
        n in proptest::sample::select(vec![1usize, 8, 24]),
        residual in proptest::bool::ANY,
        seed in 0u64..1 << 20,
    ) {
        check_rule(&gain_fold_text(d, n, residual), "rmsnorm-rowscale", seed);
    }

    /// `r + linear(a, W)` as a matmul that adds `r` while storing its product.
    #[test]
    fn rule_residual_epilogue_on_the_backend(
        d in proptest::sample::select(vec![1usize, 4, 16, 40]),
        n in proptest::sample::select(vec![1usize, 8, 24]),
        residual in proptest::bool::ANY,
        seed in 0u64..1 << 20,
    ) {
        check_rule(&gain_fold_text(d, n, residual), "residual-epilogue", seed);
    }

    /// `rmsnorm(x + a, g)` as the fused residual norm.
    #[test]
    fn rule_rmsnorm_residual_on_the_backend(
        d in proptest::sample::select(vec![1usize, 3, 8, 17, 64, 100]),
        seed in 0u64..1 << 20,
    ) {
        check_rule(&residual_text(d), "rmsnorm-residual", seed);
    }

    /// `embed(t, T)·c` with the scale folded into a derived table.
    #[test]
    fn rule_embed_scale_fold_on_the_backend(
        d in proptest::sample::select(vec![1usize, 5, 16, 33, 64]),
        seed in 0u64..1 << 20,
    ) {
        check_rule(&embed_scale_text(d), "embed-scale-fold", seed);
    }

    /// The softmax scale folded into the Q weight and bias, through RoPE.
    #[test]
    fn rule_q_scale_fold_on_the_backend(
        heads in proptest::sample::select(vec![1usize, 2, 4]),
        hd in proptest::sample::select(vec![2usize, 4, 8, 16]),
        seed in 0u64..1 << 20,
    ) {
        check_rule(&q_scale_text(heads, hd), "q-scale-fold", seed);
    }

    /// The adapter over `[state, e]` split so the invariant half is hoisted out of the loop.
    #[test]
    fn rule_concat_linear_split_and_hoist_on_the_backend(
        d in proptest::sample::select(vec![2usize, 7, 16, 48]),
        steps in proptest::sample::select(vec![2usize, 3, 5]),
        seed in 0u64..1 << 20,
    ) {
        let rhs = check_rule(&concat_linear_text(d, steps), "concat-linear-split", seed);
        // The embedded half of the adapter is computed once, in front of the loop.
        let text = print_module(&rhs);
        proptest::prop_assert!(text.contains("w.slice_cols"), "{}", text);
    }

    /// The norm's gain folded into the weights of every matmul reading it (plain norm and the
    /// normalized half of a fused residual norm).
    #[test]
    fn rule_rmsnorm_gain_fold_on_the_backend(
        d in proptest::sample::select(vec![1usize, 4, 16, 40]),
        n in proptest::sample::select(vec![1usize, 8, 24]),
        residual in proptest::bool::ANY,
        seed in 0u64..1 << 20,
    ) {
        check_rule(&gain_fold_text(d, n, residual), "rmsnorm-gain-fold", seed);
    }

    /// Gate and up as one matmul over the stacked weight, for three activations, from one
    /// fused checkpoint tensor (no copy) or two tensors (a derived concatenation).
    #[test]
    fn rule_swiglu_fuse_on_the_backend(
        d in proptest::sample::select(vec![1usize, 8, 24, 64]),
        f in proptest::sample::select(vec![1usize, 3, 16, 40]),
        act in proptest::sample::select(vec!["silu", "gelu_tanh", "relu"]),
        fused in proptest::bool::ANY,
        seed in 0u64..1 << 20,
    ) {
        let rhs = check_rule(&swiglu_text(d, f, fused, act), "swiglu-fuse", seed);
        let text = print_module(&rhs);
        proptest::prop_assert!(text.contains("glu"), "{}", text);
        // The fused checkpoint tensor is used as it is: no derived copy.
        proptest::prop_assert_eq!(text.contains("w.concat_rows"), !fused, "{}", text);
    }

    /// `rope(y + b)` with the bias added by the rotary kernel, both styles, odd head sizes,
    /// either operand order of the add.
    #[test]
    fn rule_rope_bias_epilogue_on_the_backend(
        heads in proptest::sample::select(vec![1usize, 2, 3]),
        hd in proptest::sample::select(vec![2usize, 4, 6, 8, 16, 34]),
        style in proptest::sample::select(vec!["interleaved", "half"]),
        bias_first in proptest::bool::ANY,
        seed in 0u64..1 << 20,
    ) {
        check_rule(&rope_bias_text(heads, hd, style, bias_first), "rope-bias-epilogue", seed);
    }

    /// The gated activation in the gate|up matmul's epilogue over the interleaved weight, with
    /// and without a row scale (a gainless norm in front), gate/up widths below, at and above
    /// the block size, fused and separate checkpoint weights.
    #[test]
    fn rule_glu_epilogue_on_the_backend(
        d in proptest::sample::select(vec![1usize, 8, 24, 64]),
        f in proptest::sample::select(vec![1usize, 3, 16, 17, 40, 100]),
        act in proptest::sample::select(vec!["silu", "gelu_tanh", "relu"]),
        fused in proptest::bool::ANY,
        normed in proptest::bool::ANY,
        seed in 0u64..1 << 20,
    ) {
        let text = if normed {
            swiglu_normed_text(d, f, fused, act)
        } else {
            swiglu_text(d, f, fused, act)
        };
        let rhs = check_rule(&text, "glu-epilogue", seed);
        let out = print_module(&rhs);
        proptest::prop_assert!(out.contains("linear_glu") && !out.contains("= glu"), "{}", out);
        // Without a norm there is no row scale to carry (with one, the cost model decides).
        proptest::prop_assert!(normed || !out.contains("row_scale=1"), "{}", out);
    }

    /// GPT-2 style: `Conv1D` matmuls folded to the `Linear` layout with a derived transposed
    /// weight, biases in the epilogue, and the residual added by the same matmul.
    #[test]
    fn rule_transpose_fold_and_bias_epilogue_on_the_backend(
        d in proptest::sample::select(vec![1usize, 4, 16, 40]),
        n in proptest::sample::select(vec![1usize, 8, 24, 70]),
        bias_first in proptest::bool::ANY,
        seed in 0u64..1 << 20,
    ) {
        let text = conv1d_text(d, n, bias_first);
        let rhs = check_rule(&text, "transpose-fold", seed);
        let again = check_rule(&text, "bias-epilogue", seed);
        proptest::prop_assert_eq!(print_module(&rhs), print_module(&again));
        let out = print_module(&rhs);
        proptest::prop_assert!(!out.contains("= matmul") && out.contains("w.transpose"), "{}", out);
        proptest::prop_assert!(out.contains("residual=1 bias=1"), "{}", out);
    }

    /// The next norm in the output projection's epilogue: `inv_rms` of the projection's result
    /// (no post-norm) or the post-norm and its `inv_rms` (sandwich), as results of the matmul.
    #[test]
    fn rule_norm_epilogue_on_the_backend(
        d in proptest::sample::select(vec![1usize, 4, 16, 40, 100]),
        n in proptest::sample::select(vec![1usize, 8, 24]),
        post_norm in proptest::bool::ANY,
        seed in 0u64..1 << 20,
    ) {
        let rhs = check_rule(&sandwich_text(d, n, post_norm), "norm-epilogue", seed);
        let out = print_module(&rhs);
        // At width 1 the norm is as cheap as its row scale and the cost model may keep it.
        if d > 1 {
            proptest::prop_assert!(out.contains("linear_norm"), "{}", out);
            proptest::prop_assert_eq!(out.contains("normalize=1"), post_norm, "{}", out);
            proptest::prop_assert!(!out.contains("= inv_rms"), "{}", out);
        }
    }
}

#[test]
fn residual_epilogue_needs_the_product_only_in_the_add() {
    // The down projection's product is added to two different values: one matmul cannot
    // carry both residuals, and two would compute the product twice.
    let text = gain_fold_text(8, 8, false).replace(
        "%15 = linear %13, %14",
        "%16 = add %12, %13 : [S, 8]\n  %15 = linear %16, %14",
    );
    let mut m = parse_module(&text).unwrap();
    let report = egraph::optimize(&mut m);
    assert_eq!(
        report.fired("residual-epilogue"),
        0,
        "{}\n{}",
        report.text(),
        print_module(&m)
    );
}

#[test]
fn gain_fold_needs_every_user_to_be_a_matmul() {
    // Here the normalized value also feeds the residual add: folding would need both norms.
    let text = gain_fold_text(8, 8, false).replace("%13 = add %3, %12", "%13 = add %5, %12");
    let mut m = parse_module(&text).unwrap();
    let report = egraph::optimize(&mut m);
    assert_eq!(report.fired("rmsnorm-gain-fold"), 0, "{}", report.text());
}

fn snapshot_pair(text: &str) -> String {
    let m = parse_module(text).unwrap();
    let mut o = m.clone();
    let report = egraph::optimize(&mut o);
    let fired: Vec<String> = report
        .regions
        .iter()
        .flat_map(|r| {
            r.fired
                .iter()
                .map(move |(k, v)| format!("{}: {k} x{v}", r.path))
        })
        .collect();
    format!(
        "# before\n{}\n# fired\n{}\n\n# after\n{}",
        print_module(&m),
        fired.join("\n"),
        print_module(&o)
    )
}

#[test]
fn snapshot_rule_rmsnorm_residual() {
    insta::assert_snapshot!(snapshot_pair(&residual_text(8)));
}

#[test]
fn snapshot_rule_embed_scale_fold() {
    insta::assert_snapshot!(snapshot_pair(&embed_scale_text(8)));
}

#[test]
fn snapshot_rule_q_scale_fold() {
    insta::assert_snapshot!(snapshot_pair(&q_scale_text(2, 4)));
}

#[test]
fn snapshot_rule_rmsnorm_gain_fold() {
    insta::assert_snapshot!(snapshot_pair(&gain_fold_text(8, 4, false)));
}

#[test]
fn snapshot_rule_swiglu_fuse() {
    insta::assert_snapshot!(snapshot_pair(&swiglu_text(8, 4, true, "silu")));
}

#[test]
fn snapshot_rule_swiglu_fuse_separate_weights() {
    insta::assert_snapshot!(snapshot_pair(&swiglu_text(8, 4, false, "silu")));
}

#[test]
fn snapshot_rule_rope_bias_epilogue() {
    insta::assert_snapshot!(snapshot_pair(&rope_bias_text(2, 4, "interleaved", false)));
}

#[test]
fn snapshot_rule_rmsnorm_rowscale_and_residual_epilogue() {
    insta::assert_snapshot!(snapshot_pair(&gain_fold_text(8, 4, false)));
}

#[test]
fn snapshot_rule_glu_epilogue() {
    insta::assert_snapshot!(snapshot_pair(&swiglu_normed_text(8, 4, true, "silu")));
}

#[test]
fn snapshot_rule_transpose_fold_and_bias_epilogue() {
    insta::assert_snapshot!(snapshot_pair(&conv1d_text(4, 8, false)));
}

#[test]
fn snapshot_rule_norm_epilogue() {
    insta::assert_snapshot!(snapshot_pair(&sandwich_text(8, 4, true)));
}

#[test]
fn snapshot_rule_concat_linear_split() {
    insta::assert_snapshot!(snapshot_pair(&concat_linear_text(8, 4)));
}

#[test]
fn multi_result_text_round_trips() {
    let mut m = parse_module(&residual_text(8)).unwrap();
    egraph::optimize(&mut m);
    let text = print_module(&m);
    assert!(
        text.contains("rmsnorm_res") && text.contains("proj"),
        "{text}"
    );
    let again = parse_module(&text).unwrap();
    assert_eq!(print_module(&again), text);
    verify_module(&again).unwrap();
}

/// A malformed derived-weight table is a load error naming the entry, never a panic.
#[test]
fn malformed_derived_weights_are_rejected() {
    let mut m = parse_module(&concat_linear_text(8, 2)).unwrap();
    egraph::optimize(&mut m);
    let manifest = driver::program(&m).unwrap();
    assert!(!manifest.derived.is_empty());
    let so = cranelift::compile_kernels(&manifest.kernels)
        .unwrap()
        .shared_object;
    let weights = || {
        let data: Vec<Vec<f32>> = m
            .weights
            .iter()
            .map(|w| vec![0.1; w.shape.iter().product()])
            .collect();
        Weights::from_f32(
            m.weights
                .iter()
                .zip(&data)
                .map(|(w, d)| (w.name.as_str(), w.shape.clone(), d.as_slice())),
        )
        .unwrap()
    };
    use loopc_runtime::artifact::Derive;
    let mut cases = vec![];
    let mut bad = manifest.clone();
    if let Derive::SliceCols { start, .. } = &mut bad.derived[0].recipe {
        *start = 1000;
    }
    cases.push(bad);
    let mut bad = manifest.clone();
    bad.derived[0].shape = vec![3, 3];
    cases.push(bad);
    let mut bad = manifest.clone();
    if let Derive::SliceCols { src, .. } = &mut bad.derived[0].recipe {
        src.weight = 99;
    }
    cases.push(bad);
    for bad in cases {
        let err = Model::with_threads(Artifact::new(bad, so.clone()), weights(), 1).unwrap_err();
        assert!(err.to_string().contains("derived weight #0"), "{err}");
    }
    Model::with_threads(Artifact::new(manifest, so), weights(), 1).unwrap();
}

/// An attention block whose Q, K and V read one normed input (with `norm`) or the scaled
/// embeddings: `fused` takes them as adjacent row windows of one `Wqkv` tensor (Huginn), else
/// from three tensors (Ouro); `bias` adds q/k biases before RoPE (Huginn's `qk_bias`). K and V
/// have `kvh` heads (GQA when fewer than `heads`).
fn qkv_text(
    d: usize,
    heads: usize,
    kvh: usize,
    hd: usize,
    fused: bool,
    norm: bool,
    bias: bool,
) -> String {
    let (nq, nk) = (heads * hd, kvh * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut ws: Vec<(&str, Vec<usize>)> = vec![("emb", vec![V, d]), ("g", vec![d])];
    if fused {
        ws.push(("wqkv", vec![nq + 2 * nk, d]));
    } else {
        ws.extend([
            ("wq", vec![nq, d]),
            ("wk", vec![nk, d]),
            ("wv", vec![nk, d]),
        ]);
    }
    let bq = ws.len();
    ws.extend([
        ("bq", vec![1, heads, hd]),
        ("bk", vec![1, kvh, hd]),
        ("head", vec![V, nq]),
    ]);
    let wref = |i: usize, off: usize, n: usize| {
        if fused {
            format!("weight @2+{} : {}", off * d, w(&[n, d]))
        } else {
            format!("weight @{} : {}", 2 + i, w(&[n, d]))
        }
    };
    let x = if norm {
        format!("rmsnorm %2, %3 eps=1e-6 : [S, {d}]")
    } else {
        format!("scale %2 by=1.5 : [S, {d}]")
    };
    let (q, k) = if bias {
        (
            format!("add %8, %11 : [S, {nq}]"),
            format!("add %9, %12 : [S, {nk}]"),
        )
    } else {
        // `x · 1` (removed by `scale-identity`) keeps the numbering: RoPE reads the matmul.
        (
            format!("scale %8 by=1.0 : [S, {nq}]"),
            format!("scale %9 by=1.0 : [S, {nk}]"),
        )
    };
    header(&ws)
        + &format!(
            "forward {{
  %0 = tokens : tokens
  %1 = weight @0 : {wv}
  %2 = embed %0, %1 : [S, {d}]
  %3 = weight @1 : w[{d}]
  %4 = {x}
  %5 = {wq}
  %6 = {wk}
  %7 = {wvv}
  %8 = linear %4, %5 : [S, {nq}]
  %9 = linear %4, %6 : [S, {nk}]
  %10 = linear %4, %7 : [S, {nk}]
  %11 = weight @{bq} : w[1, {heads}, {hd}]
  %12 = weight @{bk} : w[1, {kvh}, {hd}]
  %13 = {q}
  %14 = {k}
  %15 = rope %13 heads={heads} style=interleaved base=500.0 : [S, {nq}]
  %16 = rope %14 heads={kvh} style=interleaved base=500.0 : [S, {nk}]
  %17 = attention %15, %16, %10 heads={heads} kv_heads={kvh} scale={scale:?} site=0 : [S, {nq}]
  %18 = weight @{bh} : {wh}
  %19 = linear %17, %18 : [S, {V}]
  return %19
}}
",
            wv = w(&[V, d]),
            wq = wref(0, 0, nq),
            wk = wref(1, nq, nk),
            wvv = wref(2, nq + nk, nk),
            bk = bq + 1,
            bh = bq + 2,
            wh = w(&[V, nq]),
        )
}

/// `sibling-matmul-merge` on `text`: it fired, the program has one `linear_parts` and none of
/// the separate Q/K/V matmuls, and both sides agree on the backend (prefill + one decode step).
fn check_merge(text: &str, seed: u64) -> Module {
    let lhs = parse_module(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    verify_module(&lhs).unwrap();
    let mut rhs = lhs.clone();
    let report = egraph::optimize(&mut rhs);
    let rule = egraph::merge::RULE;
    assert_eq!(report.fired(rule), 1, "{}\n{text}", report.text());
    verify_module(&rhs).unwrap_or_else(|e| panic!("{e}\n{}", print_module(&rhs)));
    let out = print_module(&rhs);
    assert_eq!(out.matches("linear_parts").count(), 1, "{out}");
    let tokens: Vec<u32> = (0..6)
        .map(|i| ((seed as u32).wrapping_mul(7) + i * 3) % 16)
        .collect();
    let a = run(&lhs, seed, &tokens);
    let b = run(&rhs, seed, &tokens);
    let scale = a.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale;
    assert!(
        d <= 1e-5,
        "{rule} seed {seed}: sides differ by {d:e} (relative)\n{out}"
    );
    rhs
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 8,
        failure_persistence: None,
        ..Default::default()
    })]

    /// Q, K and V as one product on random shapes: different part widths, GQA with fewer KV
    /// heads, with and without the norm's row scale and the q/k bias. Adjacent windows of one
    /// tensor become one derived weight over the whole tensor (the softmax scale moves back
    /// into the attention); separate tensors are stacked by `w.concat_rows`.
    #[test]
    fn rule_sibling_matmul_merge_on_the_backend(
        d in proptest::sample::select(vec![4usize, 8, 24]),
        heads in proptest::sample::select(vec![1usize, 2, 4]),
        kv_div in proptest::sample::select(vec![1usize, 2, 4]),
        hd in proptest::sample::select(vec![2usize, 4, 8]),
        fused in proptest::bool::ANY,
        norm in proptest::bool::ANY,
        bias in proptest::bool::ANY,
        seed in 0u64..1 << 20,
    ) {
        let kvh = if heads % kv_div == 0 { heads / kv_div } else { heads };
        let m = check_merge(&qkv_text(d, heads, kvh, hd, fused, norm, bias), seed);
        let out = print_module(&m);
        if fused {
            proptest::prop_assert!(!out.contains("w.concat_rows"), "{}", out);
            let whole = format!("weight @2 : {}", w(&[(heads + 2 * kvh) * hd, d]));
            proptest::prop_assert!(out.contains(&whole), "{}", out);
        } else {
            proptest::prop_assert!(out.contains("w.concat_rows"), "{}", out);
        }
    }
}

/// The QKV product as the merge leaves it (`linear_parts`, then RoPE with or without the q/k
/// bias on Q and K): `lead` columns of another part first (so the rotated parts start at
/// columns that are not multiples of the head size), or with `single` Q as a matmul of its
/// own (plain, or row-scaled with `scale`) and K, V as the product.
#[allow(clippy::too_many_arguments)]
fn rope_parts_text(
    d: usize,
    heads: usize,
    kvh: usize,
    hd: usize,
    style: &str,
    bias: bool,
    scale: bool,
    lead: usize,
    single: bool,
) -> String {
    let (nq, nk) = (heads * hd, kvh * hd);
    let lead = if single { 0 } else { lead };
    let sc = 1.0 / (hd as f32).sqrt();
    let mut ws: Vec<(&str, Vec<usize>)> = vec![
        ("emb", vec![V, d]),
        ("w", vec![lead + nq + 2 * nk, d]),
        ("bq", vec![1, heads, hd]),
        ("bk", vec![1, kvh, hd]),
        ("head", vec![V, nq]),
    ];
    if lead > 0 {
        ws.push(("lead_head", vec![V, lead]));
    }
    let mut lines: Vec<String> = vec![];
    let mut def = |l: String| {
        lines.push(format!("  %{} = {l}", lines.len()));
        lines.len() - 1
    };
    def("tokens : tokens".into());
    let emb = def(format!("weight @0 : {}", w(&[V, d])));
    let x = def(format!("embed %0, %{emb} : [S, {d}]"));
    let s = scale.then(|| def(format!("inv_rms %{x} eps=1e-6 : [S, 1]")));
    let s_op = s.map_or(String::new(), |s| format!(", %{s}"));
    let rs = u8::from(scale);
    let bq = def(format!("weight @2 : {}", w(&[1, heads, hd])));
    let bk = def(format!("weight @3 : {}", w(&[1, kvh, hd])));
    let (q, k, v, lead_v) = if single {
        let wq = def(format!("weight @1 : {}", w(&[nq, d])));
        let wkv = def(format!("weight @1+{} : {}", nq * d, w(&[2 * nk, d])));
        let q = match s {
            Some(s) => def(format!(
                "linear_ep %{x}, %{wq}, %{s} row_scale=1 residual=0 : [S, {nq}]"
            )),
            None => def(format!("linear %{x}, %{wq} : [S, {nq}]")),
        };
        let p = def(format!(
            "linear_parts %{x}, %{wkv}{s_op} parts={nk};{nk} row_scale={rs} : ([S, {nk}], [S, {nk}])"
        ));
        let k = def(format!("proj %{p} index=0 : [S, {nk}]"));
        let v = def(format!("proj %{p} index=1 : [S, {nk}]"));
        (q, k, v, None)
    } else {
        let wall = def(format!("weight @1 : {}", w(&[lead + nq + 2 * nk, d])));
        let (widths, tys): (Vec<usize>, Vec<String>) = [lead, nq, nk, nk]
            .into_iter()
            .filter(|&c| c > 0)
            .map(|c| (c, format!("[S, {c}]")))
            .unzip();
        let ws: Vec<String> = widths.iter().map(|c| c.to_string()).collect();
        let p = def(format!(
            "linear_parts %{x}, %{wall}{s_op} parts={} row_scale={rs} : ({})",
            ws.join(";"),
            tys.join(", ")
        ));
        let o = usize::from(lead > 0);
        let lv = (lead > 0).then(|| def(format!("proj %{p} index=0 : [S, {lead}]")));
        let q = def(format!("proj %{p} index={o} : [S, {nq}]"));
        let k = def(format!("proj %{p} index={} : [S, {nk}]", o + 1));
        let v = def(format!("proj %{p} index={} : [S, {nk}]", o + 2));
        (q, k, v, lv)
    };
    let (bq, bk) = if bias {
        (format!(", %{bq}"), format!(", %{bk}"))
    } else {
        (String::new(), String::new())
    };
    let rq = def(format!(
        "rope %{q}{bq} heads={heads} style={style} base=500.0 : [S, {nq}]"
    ));
    let rk = def(format!(
        "rope %{k}{bk} heads={kvh} style={style} base=500.0 : [S, {nk}]"
    ));
    let a = def(format!(
        "attention %{rq}, %{rk}, %{v} heads={heads} kv_heads={kvh} scale={sc:?} site=0 : [S, {nq}]"
    ));
    let wh = def(format!("weight @4 : {}", w(&[V, nq])));
    let mut out = def(format!("linear %{a}, %{wh} : [S, {V}]"));
    if let Some(lv) = lead_v {
        let wl = def(format!("weight @5 : {}", w(&[V, lead])));
        let l = def(format!("linear %{lv}, %{wl} : [S, {V}]"));
        out = def(format!("add %{out}, %{l} : [S, {V}]"));
    }
    header(&ws) + &format!("forward {{\n{}\n  return %{out}\n}}\n", lines.join("\n"))
}

/// `rope-epilogue` on `text`: it folded both RoPEs (no `rope` op is left), and both sides agree
/// on the backend, for one sequence (prefill + a decode step) and for a batch of two at
/// different positions.
fn check_rope_fold(text: &str, seed: u64) -> Module {
    let lhs = parse_module(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    verify_module(&lhs).unwrap();
    let mut rhs = lhs.clone();
    let report = egraph::optimize(&mut rhs);
    let rule = egraph::rope_fold::RULE;
    assert_eq!(report.fired(rule), 2, "{}\n{text}", report.text());
    verify_module(&rhs).unwrap_or_else(|e| panic!("{e}\n{}", print_module(&rhs)));
    let out = print_module(&rhs);
    assert!(!out.contains(" rope %"), "{out}");
    let tokens: Vec<u32> = (0..6)
        .map(|i| ((seed as u32).wrapping_mul(7) + i * 3) % 16)
        .collect();
    for batch in [false, true] {
        let run = if batch { run_batch } else { run };
        let a = run(&lhs, seed, &tokens);
        let b = run(&rhs, seed, &tokens);
        let scale = a.iter().fold(1.0f32, |m, x| m.max(x.abs()));
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
            / scale;
        assert!(
            d <= 1e-5,
            "{rule} seed {seed} batch {batch}: sides differ by {d:e} (relative)\n{out}"
        );
    }
    rhs
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 8,
        failure_persistence: None,
        ..Default::default()
    })]

    /// RoPE (with and without the q/k bias, both styles) folded into the QKV product's parts,
    /// or into a lone Q matmul, with and without the row scale, GQA widths, rotated parts at
    /// offsets that are not whole heads: the rotation in the matmul's store against the
    /// separate `Rope`/`RopeBias` kernel.
    #[test]
    fn rule_rope_epilogue_on_the_backend(
        d in proptest::sample::select(vec![4usize, 8, 24]),
        heads in proptest::sample::select(vec![1usize, 2, 4]),
        kv_div in proptest::sample::select(vec![1usize, 2]),
        hd in proptest::sample::select(vec![2usize, 4, 6, 16]),
        style in proptest::sample::select(vec!["interleaved", "half"]),
        bias in proptest::bool::ANY,
        scale in proptest::bool::ANY,
        lead in proptest::sample::select(vec![0usize, 3]),
        single in proptest::bool::ANY,
        seed in 0u64..1 << 20,
    ) {
        let kvh = if heads % kv_div == 0 { heads / kv_div } else { heads };
        let text = rope_parts_text(d, heads, kvh, hd, style, bias, scale, lead, single);
        let m = check_rope_fold(&text, seed);
        let out = print_module(&m);
        proptest::prop_assert!(out.contains(" rope="), "{}", out);
    }
}

/// A RoPE whose input is also read elsewhere (here the unrotated K, by a second attention)
/// keeps its kernel: the rotation in the store would change what the other reader sees. Q's
/// RoPE still folds.
#[test]
fn rope_epilogue_needs_the_part_to_itself() {
    let text = rope_parts_text(8, 2, 1, 4, "half", true, true, 0, false);
    let tail = "  %16 = attention %11, %9, %10 heads=2 kv_heads=1 scale=0.5 site=1 : [S, 8]
  %17 = linear %16, %14 : [S, 16]
  %18 = add %15, %17 : [S, 16]
  return %18";
    assert!(
        text.contains("%9 = proj %7 index=1") && text.contains("  return %15"),
        "{text}"
    );
    let text = text.replace("  return %15", tail);
    let lhs = parse_module(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let mut rhs = lhs.clone();
    let report = egraph::optimize(&mut rhs);
    assert_eq!(
        report.fired(egraph::rope_fold::RULE),
        1,
        "{}",
        report.text()
    );
    let out = print_module(&rhs);
    assert_eq!(out.matches(" rope %").count(), 1, "{out}");
    let tokens = [1, 5, 9, 2, 7];
    let (a, b) = (run(&lhs, 3, &tokens), run(&rhs, 3, &tokens));
    let scale = a.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * scale, "{x} vs {y}\n{out}");
    }
}

#[test]
fn snapshot_rule_rope_epilogue() {
    insta::assert_snapshot!(snapshot_pair(&rope_parts_text(
        8, 2, 1, 4, "half", true, true, 3, false
    )));
}

#[test]
fn snapshot_rule_sibling_matmul_merge() {
    insta::assert_snapshot!(snapshot_pair(&qkv_text(8, 2, 1, 4, true, true, true)));
}

#[test]
fn snapshot_rule_sibling_matmul_merge_separate_weights() {
    insta::assert_snapshot!(snapshot_pair(&qkv_text(8, 2, 1, 4, false, true, false)));
}

/// A Q weight that carries the softmax scale and whose product is also read outside the
/// attention: the scale cannot move into the attention, so the stack is `w.concat_rows` (with
/// the shared gain factored out), and the merge still happens.
#[test]
fn merge_keeps_a_q_scale_it_cannot_move() {
    let text = qkv_text(8, 2, 2, 4, true, true, false)
        .replace(
            "  %8 = linear %4, %5 :",
            "  %5s = w.scale %5 by=0.5 : w[8, 8]\n  %8 = linear %4, %5s :",
        )
        .replace("scale=0.5 site=0", "scale=1.0 site=0")
        .replace(
            "  return %19",
            "  %20 = linear %8, %18 : [S, 16]\n  %21 = add %19, %20 : [S, 16]\n  return %21",
        );
    assert!(
        text.contains("%5s") && text.contains("scale=1.0") && text.contains("%21"),
        "{text}"
    );
    let out = print_module(&check_merge(&text, 5));
    assert!(
        out.contains("w.concat_rows") && out.contains("w.scale"),
        "{out}"
    );
}

#[test]
fn linear_parts_text_round_trips_and_is_verified() {
    let mut m = parse_module(&qkv_text(8, 2, 1, 4, true, true, true)).unwrap();
    egraph::optimize(&mut m);
    let text = print_module(&m);
    let rope = "rope=2:interleaved:500.0:1;1:interleaved:500.0:1;-";
    let attrs = format!("parts=8;4;4 row_scale=1 {rope}");
    assert!(text.contains(&attrs), "{text}");
    let again = parse_module(&text).unwrap();
    assert_eq!(print_module(&again), text);
    verify_module(&again).unwrap();
    // Parts that do not add up to the weight's rows, a zero-width part, a missing row scale;
    // rotations for too few parts, for none, of a width that is not whole heads, an unknown
    // style, a missing bias operand.
    let ops = ", %4, %5, %6 parts=";
    for (from, to) in [
        ("parts=8;4;4 row_scale=1".to_string(), "parts=8;4;2 row_scale=1".to_string()),
        (
            format!("{attrs} : ([S, 8], [S, 4], [S, 4])"),
            "parts=8;0;4;4 row_scale=1 rope=2:interleaved:500.0:1;-;1:interleaved:500.0:1;- : ([S, 8], [S, 0], [S, 4], [S, 4])".to_string(),
        ),
        (ops.to_string(), ", %5, %6 parts=".to_string()),
        (rope.to_string(), "rope=2:interleaved:500.0:1;1:interleaved:500.0:1".to_string()),
        (
            format!(", %4, %5, %6 {attrs}"),
            ", %4 parts=8;4;4 row_scale=1 rope=-;-;-".to_string(),
        ),
        (rope.to_string(), rope.replace("rope=2:", "rope=3:")),
        (rope.to_string(), rope.replace("1:interleaved", "1:sideways")),
        (ops.to_string(), ", %4, %5 parts=".to_string()),
    ] {
        assert!(text.contains(&from), "{from}\n{text}");
        let bad = text.replace(&from, &to);
        let err = parse_module(&bad)
            .map_err(|e| e.to_string())
            .and_then(|m| verify_module(&m).map_err(|e| e.to_string()));
        let err = err.expect_err(&bad);
        assert!(err.contains("linear_parts"), "{err}");
    }
}

/// Separate Q/K/V tensors where Q's tensor is also read by another matmul: stacking would keep
/// a second copy of it resident, so the siblings stay separate.
#[test]
fn merge_does_not_copy_a_tensor_read_elsewhere() {
    let text = qkv_text(8, 2, 2, 4, false, true, false).replace(
        "  return %19",
        "  %20 = linear %2, %5 : [S, 8]\n  %21 = linear %20, %18 : [S, 16]\n  %22 = add %19, %21 : [S, 16]\n  return %22",
    );
    assert!(text.contains("%22 = add"), "{text}");
    let mut m = parse_module(&text).unwrap();
    let report = egraph::optimize(&mut m);
    assert_eq!(report.fired(egraph::merge::RULE), 0, "{}", print_module(&m));
    // Without the extra read the same program merges.
    let mut m = parse_module(&qkv_text(8, 2, 2, 4, false, true, false)).unwrap();
    assert_eq!(egraph::optimize(&mut m).fired(egraph::merge::RULE), 1);
}
