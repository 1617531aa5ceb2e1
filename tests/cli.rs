//! The `loopc` binary end to end: build an artifact, run it, dump logits, print IR, check.
mod common;
use common::*;
use std::process::Command;

fn loopc(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loopc"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// The bundled tiny Huginn model: source, config and weights (the README's example).
const HUGINN_TINY: &[&str] = &[
    "examples/huginn.loop",
    "--config",
    "tests/fixtures/huginn_tiny/config.json",
    "--set",
    "init_scale=0",
    "--weights",
    "tests/fixtures/huginn_tiny/model.safetensors",
];

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("loopc-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn build_then_run_matches_the_reference_and_dumps_logits() {
    let art = tmp("huginn.loopc");
    let dump = tmp("logits.safetensors");
    let (ok, _, err) = loopc(&[
        "build",
        "examples/huginn.loop",
        "--config",
        "tests/fixtures/huginn_tiny/config.json",
        "--set",
        "init_scale=0",
        "-o",
        art.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("built examples/huginn.loop"), "{err}");
    let f = fixture("huginn_tiny/r4.safetensors");
    let prompt: Vec<String> = read(&f, "prompt")
        .i64
        .iter()
        .map(|x| x.to_string())
        .collect();
    let (ok, out, err) = loopc(&[
        "run",
        art.to_str().unwrap(),
        "--weights",
        "tests/fixtures/huginn_tiny/model.safetensors",
        "--tokens",
        &prompt.join(" "),
        "--steps",
        "4",
        "--max-new-tokens",
        "3",
        "--dump-logits",
        dump.to_str().unwrap(),
        "--stats",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out.split_whitespace().count(),
        3,
        "three generated tokens: {out}"
    );
    let pre = read(&dump, "prefill_logits");
    assert_eq!(pre.shape, vec![prompt.len(), 256]);
    assert!(max_abs_diff(&pre.f32, &read(&f, "prefill_logits").f32) <= 1e-4);
    let dec = read(&dump, "decode_logits");
    assert_eq!(
        dec.shape,
        vec![2, 256],
        "logits of each decode step (the last token is not fed back)"
    );
    // Greedy: each generated token is the argmax of the logits before it.
    let toks: Vec<usize> = out.split_whitespace().map(|t| t.parse().unwrap()).collect();
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    assert_eq!(toks[0], argmax(&pre.f32[(prompt.len() - 1) * 256..]));
    assert_eq!(toks[1], argmax(&dec.f32[..256]));
    assert_eq!(toks[2], argmax(&dec.f32[256..]));
}

#[test]
fn run_compiles_a_loop_file_in_memory() {
    let (ok, out, err) = loopc(&[
        "run",
        "examples/ouro.loop",
        "--config",
        "tests/fixtures/ouro_tiny/config.json",
        "--weights",
        "tests/fixtures/ouro_tiny/model.safetensors",
        "--tokens",
        "1 2 3",
        "--max-new-tokens",
        "4",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.split_whitespace().count(), 4);
}

#[test]
fn ir_prints_every_stage() {
    for stage in ["ast", "graph", "lowered", "program", "clif", "gpu"] {
        let (ok, out, err) = loopc(&[
            "ir",
            "examples/ouro.loop",
            "--config",
            "tests/fixtures/ouro_tiny/config.json",
            "--stage",
            stage,
        ]);
        assert!(ok, "{stage}: {err}");
        assert!(!out.is_empty(), "{stage} printed nothing");
    }
    let (ok, _, err) = loopc(&["ir", "examples/ouro.loop", "--stage", "nope"]);
    assert!(!ok);
    assert!(err.contains("unknown stage `nope`"), "{err}");
}

/// `--target cuda` builds PTX with the MLIR backend, and is a clear error without it.
#[test]
fn build_target_cuda() {
    let art = tmp("huginn-cuda.loopc");
    let (ok, _, err) = loopc(&[
        "build",
        "examples/huginn.loop",
        "--config",
        "tests/fixtures/huginn_tiny/config.json",
        "--target",
        "cuda",
        "-o",
        art.to_str().unwrap(),
    ]);
    if cfg!(feature = "mlir") {
        assert!(ok, "{err}");
        let bytes = std::fs::read(&art).unwrap();
        let (m, ptx) = loopc_runtime::artifact::decode(&bytes).unwrap();
        assert_eq!(m.target, "cuda-sm_90");
        assert!(m.cuda.is_some());
        assert!(std::str::from_utf8(ptx)
            .unwrap()
            .contains(".visible .entry"));
        // The CPU runtime refuses it by its target, before reading the PTX as a shared object.
        let task = tmp("cuda-task.jsonl");
        std::fs::write(
            &task,
            "{\"tokens\": [1, 2, 3], \"answer\": 4, \"hops\": 1}\n",
        )
        .unwrap();
        let (a, w) = (
            art.to_str().unwrap(),
            "tests/fixtures/huginn_tiny/model.safetensors",
        );
        for args in [
            &["run", a, "--weights", w, "--tokens", "1 2 3"][..],
            &[
                "bench",
                a,
                "--weights",
                w,
                "--prompt-len",
                "4",
                "--new-tokens",
                "2",
            ],
            &["eval", a, "--weights", w, "--task", task.to_str().unwrap()],
            &["trace", a, "--weights", w, "--tokens", "1 2 3"],
        ] {
            let (ok, _, err) = loopc(args);
            assert!(!ok, "{}", args[0]);
            assert!(
                err.contains("built for `cuda-sm_90`") && err.contains("--device cuda"),
                "{}: {err}",
                args[0]
            );
            assert!(!err.contains("panicked") && !err.contains("ELF"), "{err}");
        }
    } else {
        assert!(!ok);
        assert!(
            err.contains("--target cuda") && err.contains("--features mlir"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let (ok, _, err) = loopc(&["build", "examples/huginn.loop", "--target", "tpu"]);
    assert!(!ok);
    assert!(err.contains("unknown target `tpu`"), "{err}");
}

#[test]
fn check_reports_missing_and_misshaped_weights() {
    // The Ouro checkpoint has none of Huginn's tensors.
    let (ok, _, err) = loopc(&[
        "check",
        "examples/huginn.loop",
        "--config",
        "tests/fixtures/huginn_tiny/config.json",
        "--weights",
        "tests/fixtures/ouro_tiny/model.safetensors",
    ]);
    assert!(!ok);
    assert!(err.contains("transformer.wte.weight"), "{err}");
    // Right names, wrong size: declare dim=32 against a dim=64 checkpoint.
    let (ok, _, err) = loopc(&[
        "run",
        "examples/huginn.loop",
        "--config",
        "tests/fixtures/huginn_tiny/config.json",
        "--set",
        "dim=32",
        "--weights",
        "tests/fixtures/huginn_tiny/model.safetensors",
        "--tokens",
        "1",
    ]);
    assert!(!ok);
    assert!(
        err.contains("[256, 32]") && err.contains("[256, 64]"),
        "names both shapes: {err}"
    );
    assert!(
        err.contains("examples/huginn.loop:"),
        "points at the declaration: {err}"
    );
}

#[test]
fn user_errors_are_messages_not_panics() {
    let cases: &[&[&str]] = &[
        &["build", "does/not/exist.loop"],
        &["build", "examples/huginn.loop", "--set", "dim=63"],
        &["build", "examples/huginn.loop", "--config", "Cargo.toml"],
        &[
            "run",
            "examples/ouro.loop",
            "--config",
            "tests/fixtures/ouro_tiny/config.json",
            "--weights",
            "tests/fixtures/ouro_tiny/model.safetensors",
            "--tokens",
            "999",
        ],
        &[
            "run",
            "examples/ouro.loop",
            "--config",
            "tests/fixtures/ouro_tiny/config.json",
            "--weights",
            "tests/fixtures/ouro_tiny/model.safetensors",
            "--tokens",
            "1",
            "--steps",
            "0",
        ],
        &["run", "Cargo.toml", "--weights", "x", "--tokens", "1"],
    ];
    for c in cases {
        let (ok, _, err) = loopc(c);
        assert!(!ok, "{c:?} should fail");
        assert!(err.contains("error"), "{c:?}: {err}");
        assert!(!err.contains("panicked"), "{c:?} panicked: {err}");
    }
}

#[test]
fn params_lists_values_and_their_sources() {
    let (ok, out, err) = loopc(&[
        "params",
        "examples/huginn.loop",
        "--config",
        "tests/fixtures/huginn_tiny/config.json",
        "--set",
        "steps=3",
    ]);
    assert!(ok, "{err}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name}: {out}"))
            .to_string()
    };
    assert!(
        line("dim").contains("64") && line("dim").contains("config \"n_embd\""),
        "{out}"
    );
    assert!(
        line("head_dim").contains("16") && line("head_dim").ends_with("default"),
        "derived from dim/heads: {out}"
    );
    assert!(
        line("steps").contains('3') && line("steps").ends_with("--set"),
        "{out}"
    );
    assert!(
        out.contains("unused config keys:") && out.contains("tie_embeddings"),
        "{out}"
    );
}

#[test]
fn run_with_forced_depths_prints_depth_stats() {
    let (ok, out, err) = loopc(
        &[
            &["run"],
            HUGINN_TINY,
            &[
                "--tokens",
                "1 2 3 4",
                "--depths",
                "3 1 2 4 2",
                "--max-new-tokens",
                "3",
                "--stats",
            ],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert_eq!(out.split_whitespace().count(), 3);
    // Positions 0..=5 run 3 1 2 4 2 2 iterations (the last depth repeats).
    assert!(
        err.contains("depth histogram (depth:tokens): 1:1 2:3 3:1 4:1"),
        "{err}"
    );
    assert!(err.contains("block evaluations: 2.33 per token"), "{err}");
    assert!(err.contains("bytes per token"), "{err}");
    // The first new token comes from the prefill; the other two cost a decode step each.
    assert!(err.contains("; 3 new tokens; decode 2 steps in "), "{err}");
    let (ok, _, err) = loopc(
        &[
            &["run"],
            HUGINN_TINY,
            &["--tokens", "1 2 3 4", "--max-new-tokens", "1"],
        ]
        .concat(),
    );
    assert!(ok && err.contains("; 1 new token; no decode step"), "{err}");
    let (ok, _, err) = loopc(&[
        "run",
        "examples/huginn.loop",
        "--config",
        "tests/fixtures/huginn_tiny/config.json",
        "--weights",
        "tests/fixtures/huginn_tiny/model.safetensors",
        "--tokens",
        "1 2",
        "--depths",
        "0",
    ]);
    assert!(!ok && err.contains("--depths"), "{err}");
    let (ok, _, err) = loopc(&[
        "run",
        "examples/huginn.loop",
        "--config",
        "tests/fixtures/huginn_tiny/config.json",
        "--weights",
        "tests/fixtures/huginn_tiny/model.safetensors",
        "--tokens",
        "1 2",
        "--exit-threshold",
        "nan",
    ]);
    assert!(!ok && err.contains("--exit-threshold"), "{err}");
    let (ok, _, err) = loopc(&[
        "bench",
        "examples/huginn.loop",
        "--config",
        "tests/fixtures/huginn_tiny/config.json",
        "--weights",
        "tests/fixtures/huginn_tiny/model.safetensors",
        "--exit-threshold",
        "inf",
    ]);
    assert!(
        !ok && err.contains("--exit-threshold") && err.contains("finite"),
        "{err}"
    );
}

#[test]
fn explain_lists_rules_per_region_and_the_egraph_stage_prints() {
    let (ok, out, err) = loopc(&[
        "explain",
        "examples/huginn.loop",
        "--config",
        "tests/fixtures/huginn_tiny/config.json",
        "--set",
        "init_scale=0",
    ]);
    assert!(ok, "{err}");
    for want in [
        "region forward/%",
        "region forward\n",
        "fired rmsnorm-residual",
        "fired concat-linear-split",
        "fired swiglu-fuse",
        "fired glu-epilogue",
        "fired norm-epilogue",
        "fired sibling-matmul-merge x2 (after extraction)",
        "fired rope-epilogue x4 (after extraction)",
        "hoisted 1 value",
        "cost ",
    ] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
    // One rule turned off by name: the rest of the report is unchanged, that rule unfired.
    let off = Command::new(env!("CARGO_BIN_EXE_loopc"))
        .current_dir(root())
        .args([
            "explain",
            "examples/huginn.loop",
            "--config",
            "tests/fixtures/huginn_tiny/config.json",
            "--set",
            "init_scale=0",
        ])
        .env("LOOPC_DISABLE_RULES", "rope-epilogue")
        .output()
        .unwrap();
    let off = String::from_utf8_lossy(&off.stdout);
    assert!(
        !off.contains("rope-epilogue x") && off.contains("fired sibling-matmul-merge x2"),
        "{off}"
    );
    // The GPT-2 family: Conv1D weights transposed at load, biases in the GEMM epilogue.
    let (ok, out, err) = loopc(&[
        "explain",
        "examples/ltg.loop",
        "--config",
        "tests/fixtures/ltg_tiny/config.json",
    ]);
    assert!(ok, "{err}");
    for want in [
        "fired transpose-fold",
        "fired bias-epilogue",
        "fired residual-epilogue",
    ] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
    let (ok, out, err) = loopc(&[
        "ir",
        "examples/ouro.loop",
        "--config",
        "tests/fixtures/ouro_tiny/config.json",
        "--stage",
        "egraph",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("rmsnorm_res") && out.contains("glu"), "{out}");
    let (ok, _, err) = loopc(&["explain", "examples/missing.loop"]);
    assert!(!ok && err.contains("cannot read"), "{err}");
}

fn json_field(line: &str, key: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number `{key}` in {line}"))
}

/// `loopc bench --batch 2`: two sequences through a batch session, aggregate throughputs and the
/// same KV bytes per position as one sequence, `--profile`'s timers; `--new-tokens 0` times
/// prefill alone.
#[test]
fn bench_batch_reports_aggregate_throughput() {
    let base = [
        "bench",
        "examples/huginn.loop",
        "--config",
        "tests/fixtures/huginn_tiny/config.json",
        "--set",
        "init_scale=0",
        "--weights",
        "tests/fixtures/huginn_tiny/model.safetensors",
        "--prompt-len",
        "6",
        "--reps",
        "1",
        "--steps",
        "3",
    ];
    let run = |extra: &[&str]| {
        let (ok, out, err) = loopc(&[&base[..], extra].concat());
        assert!(ok, "{err}");
        out
    };
    let b2 = run(&["--batch", "2", "--new-tokens", "3"]);
    assert_eq!(json_field(&b2, "batch"), 2.0, "{b2}");
    assert_eq!(json_field(&b2, "r"), 3.0, "{b2}");
    assert!(json_field(&b2, "prefill_tok_s") > 0.0 && json_field(&b2, "decode_tok_s") > 0.0);
    let b1 = run(&["--new-tokens", "3"]);
    assert_eq!(json_field(&b1, "batch"), 1.0, "{b1}");
    assert_eq!(
        json_field(&b1, "kv_bytes_per_position"),
        json_field(&b2, "kv_bytes_per_position")
    );
    let (ok, _, err) = loopc(
        &[
            &base[..],
            &["--batch", "2", "--new-tokens", "3", "--profile"],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    let calls = |op: &str| {
        err.lines()
            .find_map(|l| l.trim_start().strip_prefix(op))
            .and_then(|l| l.split_whitespace().rev().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no `{op}` timer in\n{err}"))
    };
    // The timed repetition alone: a prefill and three steps, each through the tiny model's
    // 1 + 3·2 + 1 attention layers (the warm-up repetition is not counted).
    assert!(calls("matmul ") > 0, "{err}");
    assert_eq!(calls("attention "), 4 * (1 + 3 * 2 + 1), "{err}");
    let p = run(&["--new-tokens", "0"]);
    assert_eq!(json_field(&p, "decode_tok_s"), 0.0, "{p}");
    let (ok, _, err) = loopc(&[&base[..], &["--batch", "0"]].concat());
    assert!(!ok && err.contains("--batch"), "{err}");
    let (ok, _, err) = loopc(&["bench", "--weights", "x.safetensors"]);
    assert!(!ok && err.contains("MODEL"), "{err}");
}

/// `loopc bench --ceilings` needs no model and prints every ceiling as a positive number.
#[test]
fn bench_ceilings_prints_the_machine_ceilings() {
    let (ok, out, err) = loopc(&["bench", "--ceilings"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for (group, keys) in [
        (
            "gemm_f32_gflops",
            &["128x1024x1024", "512x1024x1024", "1024x1024x1024"][..],
        ),
        ("gemv_f32_gbs", &["1x4096x4096"][..]),
        (
            "gemm_bf16_gflops",
            &["128x1024x1024", "512x1024x1024", "1024x1024x1024"][..],
        ),
        ("gemv_bf16_gbs", &["1x4096x8192"][..]),
        ("read_gbs", &["2MiB", "64MiB", "512MiB"][..]),
        ("copy_gbs", &["2MiB", "64MiB", "512MiB"][..]),
    ] {
        for k in keys {
            assert!(v[group][k].as_f64().unwrap() > 0.0, "{group}.{k} in {out}");
        }
    }
}

#[test]
fn dtype_bf16_runs_and_a_wrong_dtype_is_a_clear_error() {
    let base = [
        "bench",
        "examples/huginn.loop",
        "--config",
        "tests/fixtures/huginn_tiny/config.json",
        "--set",
        "init_scale=0",
        "--weights",
        "tests/fixtures/huginn_tiny/model.safetensors",
        "--prompt-len",
        "12",
        "--new-tokens",
        "2",
        "--reps",
        "1",
    ];
    let (ok, out, err) = loopc(&[&base[..], &["--dtype", "bf16"]].concat());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["dtype"], "bf16", "{out}");
    assert!(json_field(&out, "decode_tok_s") > 0.0);
    let (ok, _, err) = loopc(&[&base[..], &["--dtype", "fp8"]].concat());
    assert!(!ok);
    assert!(
        err.contains("--dtype") && err.contains("fp8") && err.contains("bf16"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// A reader that stops early (`loopc ir … | head`) ends the command quietly, not with a panic
/// in `println!`.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_loopc"))
        .args([
            "ir",
            "examples/huginn.loop",
            "--config",
            "tests/fixtures/huginn_tiny/config.json",
            "--stage",
            "gpu",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // The pipe's read end is closed here; the module is far longer than the pipe buffer.
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked"), "stderr: {err}");
    assert!(
        !status.success(),
        "the module should not fit in the pipe: {status:?}"
    );
}

/// `LOOPC_SPIN` as a user sets it: `1` (the default) and `0` both run and give the same logits,
/// and a bad value is a clear error, not a panic. (The fixture is small enough that few of its
/// loops go parallel at all; `par::tests` holds the team's chunk semantics.)
#[test]
fn spin_setting_keeps_results_and_rejects_bad_values() {
    let run = |spin: &str, dump: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_loopc"))
            .current_dir(root())
            .arg("run")
            .args(HUGINN_TINY)
            .args([
                "--tokens",
                "1 2 3 4",
                "--steps",
                "4",
                "--max-new-tokens",
                "8",
                "--dump-logits",
            ])
            .arg(dump)
            .env("LOOPC_THREADS", "2")
            .env("LOOPC_SPIN", spin)
            .output()
            .unwrap()
    };
    let (a, b) = (tmp("spin_on.safetensors"), tmp("spin_off.safetensors"));
    let on = run("1", &a);
    let off = run("0", &b);
    assert!(
        on.status.success(),
        "{}",
        String::from_utf8_lossy(&on.stderr)
    );
    assert!(
        off.status.success(),
        "{}",
        String::from_utf8_lossy(&off.stderr)
    );
    assert_eq!(on.stdout, off.stdout);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let bad = run("yes", &tmp("spin_bad.safetensors"));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("LOOPC_SPIN must be 0 or 1"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `LOOPC_SHARE_BUFFERS` as a user sets it: with the memory plan (`1`, the default) and without
/// it (`0`, every buffer its own storage) a prompt and its decode steps give the same logits
/// bit for bit, at a fixed depth and with per-token exits (Ouro's gate, which compacts the
/// active rows of every per-token buffer on the CPU and masks them on the device), on the CPU
/// and through the CUDA executor (`cuda-emu`); a bad value is a clear error, not a panic.
/// `loopc run MODEL EXTRA --tokens TOKENS --steps 4 --max-new-tokens 6 --stats --dump-logits
/// DUMP` with one environment switch set.
fn run_dumping(
    model: &[&str],
    extra: &[&str],
    tokens: &str,
    (var, value): (&str, &str),
    dump: &std::path::Path,
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loopc"))
        .current_dir(root())
        .arg("run")
        .args(model)
        .args(extra)
        .args(["--tokens", tokens, "--steps", "4", "--max-new-tokens", "6"])
        .args(["--stats", "--dump-logits"])
        .arg(dump)
        .env(var, value)
        .output()
        .unwrap()
}

/// `loopc run` arguments for the tiny Ouro with its learned exit gate on: tokens leave the
/// loop at different depths.
fn ouro_gated() -> Vec<String> {
    let src = std::fs::read_to_string(root().join("examples/ouro.loop")).unwrap();
    assert!(src.contains("    exit fixed\n"));
    let gated = tmp("ouro_gate.loop");
    std::fs::write(
        &gated,
        src.replace("    exit fixed\n", "    exit gate(q = 0.5)\n"),
    )
    .unwrap();
    [
        gated.to_str().unwrap(),
        "--config",
        "tests/fixtures/ouro_tiny/config.json",
        "--weights",
        "tests/fixtures/ouro_tiny/model.safetensors",
        "--exit-threshold",
        "0.5",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn shared_buffers_change_no_logit() {
    let ouro_args = ouro_gated();
    let ouro: &[&str] = &ouro_args.iter().map(String::as_str).collect::<Vec<_>>();
    let run_on = |device: &str, model: &[&str], share: &str, dump: &std::path::Path| {
        run_dumping(
            model,
            &["--device", device],
            "5 17 3 99 42 7 1 64 12 30 8 2",
            ("LOOPC_SHARE_BUFFERS", share),
            dump,
        )
    };
    for (device, (name, model)) in ["cpu", "cuda-emu"]
        .into_iter()
        .flat_map(|d| [("huginn", HUGINN_TINY), ("ouro", ouro)].map(|m| (d, m)))
    {
        let name = &format!("{name}_{device}");
        let (a, b) = (
            tmp(&format!("share_on_{name}.safetensors")),
            tmp(&format!("share_off_{name}.safetensors")),
        );
        let on = run_on(device, model, "1", &a);
        let off = run_on(device, model, "0", &b);
        for o in [&on, &off] {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        assert_eq!(on.stdout, off.stdout, "{name}");
        let stats = String::from_utf8_lossy(&on.stderr);
        let hist = stats
            .lines()
            .find_map(|l| l.strip_prefix("depth histogram (depth:tokens): "))
            .unwrap_or_else(|| panic!("{name}: no depth histogram in\n{stats}"));
        let depths = hist.split_whitespace().count();
        assert_eq!(
            depths > 1,
            name.starts_with("ouro"),
            "{name}: depths {hist}"
        );
        let act = |o: &std::process::Output| {
            let e = String::from_utf8_lossy(&o.stderr).into_owned();
            e.lines()
                .find_map(|l| l.strip_prefix("activations: "))
                .and_then(|l| l.strip_suffix(" KiB allocated"))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{name}: no activations line in\n{e}"))
        };
        let (shared, own) = (act(&on), act(&off));
        assert!(
            shared > 0.0 && shared < own,
            "{name}: {shared} KiB shared, {own} KiB own"
        );
        let (da, db) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(da.len() > 1000, "{name}: a dump with logits");
        assert_eq!(da, db, "{name}");
    }
    let bad = run_on("cpu", HUGINN_TINY, "yes", &tmp("share_bad.safetensors"));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("LOOPC_SHARE_BUFFERS must be 0 or 1"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// The f32 weights packed into panels at load (the default on AVX-512) against the row-major
/// kernels (`LOOPC_PACK_F32=0`): the same tokens and depths, logits within summation-order
/// differences, for Huginn and for Ouro with its gate exit. A bad switch value is an error.
#[test]
fn packed_f32_weights_match_row_major() {
    let ouro_args = ouro_gated();
    let ouro: &[&str] = &ouro_args.iter().map(String::as_str).collect::<Vec<_>>();
    let run = |model: &[&str], pack: &str, dump: &std::path::Path| {
        run_dumping(
            model,
            &[],
            "5 17 3 99 42 7 1 64 12 30 8 2 77 13 250 6",
            ("LOOPC_PACK_F32", pack),
            dump,
        )
    };
    for (name, model) in [("huginn", HUGINN_TINY), ("ouro", ouro)] {
        let (a, b) = (
            tmp(&format!("pack_on_{name}.safetensors")),
            tmp(&format!("pack_off_{name}.safetensors")),
        );
        let on = run(model, "1", &a);
        let off = run(model, "0", &b);
        for o in [&on, &off] {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        assert_eq!(on.stdout, off.stdout, "{name}: tokens");
        let packed = |o: &std::process::Output| {
            String::from_utf8_lossy(&o.stderr).contains("f32 matmul weights packed into panels")
        };
        assert!(!packed(&off), "{name}: LOOPC_PACK_F32=0 packs nothing");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            packed(&on),
            std::arch::is_x86_feature_detected!("avx512f"),
            "{name}: the default packs where the kernels run"
        );
        let hist = |o: &std::process::Output| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .find(|l| l.starts_with("depth histogram"))
                .map(String::from)
        };
        assert!(hist(&on).is_some(), "{name}");
        assert_eq!(hist(&on), hist(&off), "{name}: depths");
        for t in ["prefill_logits", "decode_logits"] {
            let (x, y) = (read(&a, t), read(&b, t));
            assert_eq!(x.shape, y.shape, "{name} {t}");
            let scale = y.f32.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = max_abs_diff(&x.f32, &y.f32);
            assert!(
                d <= 1e-5 * scale.max(1.0),
                "{name} {t}: {d} (scale {scale})"
            );
        }
    }
    let bad = run(HUGINN_TINY, "yes", &tmp("pack_bad.safetensors"));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("LOOPC_PACK_F32 must be 0 or 1"),
        "{err}"
    );
}
