//! `loopc bench`: repeatable prefill / decode timings of one artifact, printed as one JSON line
//! so scripts (bench/compare.py) can put them next to the PyTorch reference in the same run.
use loopc_runtime::{Model, Rng};
use std::time::Instant;

pub struct BenchArgs {
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub steps: Option<usize>,
    pub reps: usize,
    pub seed: u64,
    pub exit_threshold: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`).
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

pub fn run(model: &Model, a: &BenchArgs) -> Result<String, String> {
    let vocab = model.manifest().vocab as u64;
    let mut rng = Rng::new(a.seed);
    let prompt: Vec<u32> = (0..a.prompt_len)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let mut session = model.session();
    session.set_steps(a.steps);
    session.set_exit_threshold(a.exit_threshold);
    let (mut pre, mut dec) = (vec![], vec![]);
    // Block evaluations per token (prefill, decode) and KV bytes per position of the last rep.
    let (mut evals_pre, mut evals_dec, mut kv_per_pos) = (0.0, 0.0, 0.0);
    // One warm-up repetition plans the buffers for both shapes.
    for rep in 0..=a.reps {
        session.reset();
        let t = Instant::now();
        let logits = session
            .prefill_last(&prompt)
            .map_err(|e| format!("error: {e}"))?;
        let tp = t.elapsed().as_secs_f64();
        let mut next = loopc_runtime::argmax(logits.last_row());
        evals_pre = session.last_depths().iter().sum::<usize>() as f64 / a.prompt_len as f64;
        let mut dec_evals = 0;
        let t = Instant::now();
        for _ in 0..a.new_tokens {
            next = loopc_runtime::argmax(session.step(next).map_err(|e| format!("error: {e}"))?);
            dec_evals += session.last_depths().iter().sum::<usize>();
        }
        let td = t.elapsed().as_secs_f64();
        evals_dec = dec_evals as f64 / a.new_tokens.max(1) as f64;
        let st = session.stats();
        kv_per_pos = st.kv_bytes_used as f64 / st.kv_positions.max(1) as f64;
        if rep > 0 {
            pre.push(tp);
            dec.push(td);
        }
    }
    let (p, d) = (median(pre), median(dec));
    Ok(format!(
        "{{\"impl\":\"loopc\",\"r\":{},\"threads\":{},\"prompt_len\":{},\"new_tokens\":{},\"reps\":{},\"prefill_s\":{p:.4},\"decode_s\":{d:.4},\"prefill_tok_s\":{:.2},\"decode_tok_s\":{:.2},\"block_evals_per_token_prefill\":{evals_pre:.3},\"block_evals_per_token_decode\":{evals_dec:.3},\"kv_bytes_per_position\":{kv_per_pos:.0},\"peak_rss_mb\":{:.0}}}",
        a.steps.or(model.manifest().program.recur.as_ref().map(|r| r.default_steps)).unwrap_or(0),
        model.threads(),
        a.prompt_len,
        a.new_tokens,
        a.reps,
        a.prompt_len as f64 / p,
        a.new_tokens as f64 / d,
        peak_rss().unwrap_or(0) as f64 / 1048576.0,
    ))
}
