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
    // hops 1: questions 0 and 2 (one right, one wrong); hops 2: question 1 (right).
    assert!(stdout.contains("1,2,1,2,0.500000"), "{stdout}");
    assert!(stdout.contains("2,2,1,1,1.000000"), "{stdout}");
}
