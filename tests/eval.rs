//! `loopc eval` scores the argmax at the last prompt position against each question's answer.
mod common;
use common::*;
use std::process::Command;

#[test]
fn eval_counts_exact_argmax_matches_by_hops_and_steps() {
    let model = model(
        "ltg",
        "ltg_tiny/config.json",
        "ltg_tiny/model.safetensors",
        &["inject=1", "positions=1"],
        1,
    );
    let prompts: Vec<Vec<u32>> = vec![vec![1, 5, 9, 2], vec![1, 7, 2], vec![3, 3, 3, 3, 2]];
    let mut lines = String::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut s = model.session();
        s.set_steps(Some(2));
        let want = loopc_runtime::argmax(s.prefill(p).unwrap().last_row());
        // The first two answers are the model's own prediction at r=2; the third is wrong on purpose.
        let answer = if i < 2 { want } else { (want + 1) % 256 };
        lines += &format!(
            "{{\"tokens\": {p:?}, \"answer\": {answer}, \"hops\": {}}}\n",
            1 + i % 2
        );
    }
    let task = std::env::temp_dir().join(format!("loopc-eval-{}.jsonl", std::process::id()));
    std::fs::write(&task, lines).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_loopc"))
        .args([
            "eval",
            "examples/ltg.loop",
            "--config",
            "tests/fixtures/ltg_tiny/config.json",
            "--set",
            "inject=1",
            "--set",
            "positions=1",
            "--weights",
            "tests/fixtures/ltg_tiny/model.safetensors",
            "--steps",
            "2",
            "--format",
            "csv",
            "--task",
        ])
        .arg(&task)
        .current_dir(root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // hops 1: questions 0 and 2 (one right, one wrong); hops 2: question 1 (right); a fixed
    // depth spends exactly its iterations on every token.
    assert!(
        stdout.contains("fixed,,2,1,1,2,0.500000,2.0000,2.0000"),
        "{stdout}"
    );
    assert!(
        stdout.contains("fixed,,2,2,1,1,1.000000,2.0000,2.0000"),
        "{stdout}"
    );

    // Exit policies: argmax stability with threshold k needs k + 1 iterations with the same
    // argmax (or the cap) before a token may stop.
    let out = Command::new(env!("CARGO_BIN_EXE_loopc"))
        .args([
            "eval",
            "examples/ltg.loop",
            "--config",
            "tests/fixtures/ltg_tiny/config.json",
            "--set",
            "inject=1",
            "--set",
            "positions=1",
            "--weights",
            "tests/fixtures/ltg_tiny/model.safetensors",
            "--steps",
            "1,6",
            "--policies",
            "argmax-stability,kl",
            "--format",
            "json",
            "--task",
        ])
        .arg(&task)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    // 2 fixed depths + 4 thresholds × 2 policies, each over hops 1 and 2.
    assert_eq!(rows.len(), (2 + 8) * 2);
    for r in rows {
        let it = r["mean_iterations"].as_f64().unwrap();
        let blk = r["block_evals_per_token"].as_f64().unwrap();
        assert!(
            (1.0..=6.0).contains(&it) && (1.0..=6.0).contains(&blk),
            "{r}"
        );
        if r["policy"] == "argmax-stability" {
            let k = r["threshold"].as_f64().unwrap();
            assert!(it >= (k + 1.0).min(6.0), "{r}");
        }
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_loopc"))
        .args([
            "eval",
            "examples/ltg.loop",
            "--config",
            "tests/fixtures/ltg_tiny/config.json",
            "--weights",
            "tests/fixtures/ltg_tiny/model.safetensors",
            "--policies",
            "latent,kl",
            "--task",
        ])
        .arg(&task)
        .current_dir(root())
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown policy `latent`"));
}

/// The committed reasoning-lab model binds to its `.loop` file and traces end to end.
#[test]
fn committed_multihop_model_binds_and_traces() {
    let out = Command::new(env!("CARGO_BIN_EXE_loopc"))
        .args([
            "trace",
            "examples/multihop.loop",
            "--config",
            "examples/multihop/config.json",
            "--weights",
            "examples/multihop/model.safetensors",
            "--tokens",
            "1 50 67 69 2",
            "--steps",
            "3",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 5 * 3);
    assert_eq!(v["layers"], 2, "two GPT-2 blocks per iteration");
    assert_eq!(v["attention_heads"], serde_json::json!([4, 4]));
}
