//! `loopc bench`: repeatable prefill / decode timings of one artifact, printed as one JSON line
//! so scripts (bench/compare.py) can put them next to the PyTorch reference in the same run.
use loopc_runtime::{Model, Rng};
use std::time::Instant;

/// A GEMM shape `(m, k, n)`.
type Shape3 = (usize, usize, usize);

pub struct BenchArgs {
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub steps: Option<usize>,
    pub reps: usize,
    pub seed: u64,
    pub exit_threshold: Option<f64>,
    /// Sequences decoded together through [`Model::batch_session`] (1: a plain session).
    pub batch: usize,
    /// Per-operation timers over the timed repetitions, printed to stderr.
    pub profile: bool,
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

/// Decode steps of repetition `rep`: the untimed warm-up (rep 0) plans the buffers of both
/// shapes with a prefill and two steps; the timed ones run all `new_tokens`.
fn warm_steps(rep: usize, new_tokens: usize) -> usize {
    if rep == 0 {
        new_tokens.min(2)
    } else {
        new_tokens
    }
}

pub fn run(model: &Model, a: &BenchArgs) -> Result<String, String> {
    if a.batch > 1 {
        return run_batch(model, a);
    }
    let vocab = model.manifest().vocab as u64;
    let mut rng = Rng::new(a.seed);
    let prompt: Vec<u32> = (0..a.prompt_len)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let mut session = model.session();
    session.set_steps(a.steps);
    session
        .set_exit_threshold(a.exit_threshold)
        .map_err(|e| format!("error: --exit-threshold: {e}"))?;
    session.set_profiling(a.profile);
    // As `generate` and the PyTorch reference do: the cache for the whole sequence, up front.
    session
        .reserve(a.prompt_len + a.new_tokens)
        .map_err(|e| format!("error: {e}"))?;
    let (mut pre, mut dec) = (vec![], vec![]);
    // Block evaluations per token (prefill, decode) and KV bytes per position of the last rep.
    let (mut evals_pre, mut evals_dec, mut kv_per_pos) = (0.0, 0.0, 0.0);
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
        for _ in 0..warm_steps(rep, a.new_tokens) {
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
        } else {
            // The warm-up's first-touch costs stay out of the profile.
            session.reset_stats();
        }
    }
    if a.profile {
        eprintln!("{}", session.stats());
    }
    let (p, d) = (median(pre), median(dec));
    Ok(format!(
        "{{\"impl\":\"loopc\",\"dtype\":\"{}\",\"batch\":1,\"r\":{},\"threads\":{},\"prompt_len\":{},\"new_tokens\":{},\"reps\":{},\"prefill_s\":{p:.4},\"decode_s\":{d:.4},\"prefill_tok_s\":{:.2},\"decode_tok_s\":{:.2},\"block_evals_per_token_prefill\":{evals_pre:.3},\"block_evals_per_token_decode\":{evals_dec:.3},\"kv_bytes_per_position\":{kv_per_pos:.0},\"peak_rss_mb\":{:.0}}}",
        model.dtype(),
        a.steps.or(model.manifest().program.recur.as_ref().map(|r| r.default_steps)).unwrap_or(0),
        model.threads(),
        a.prompt_len,
        a.new_tokens,
        a.reps,
        a.prompt_len as f64 / p,
        if a.new_tokens == 0 { 0.0 } else { a.new_tokens as f64 / d },
        peak_rss().unwrap_or(0) as f64 / 1048576.0,
    ))
}

/// `--batch N`: N sequences with different random prompts of `prompt_len` tokens, prefilled in
/// one call (logits of each last row only), then `new_tokens` greedy steps of N tokens each.
/// Throughputs are aggregate: N·prompt_len / prefill time and N·new_tokens / decode time.
fn run_batch(model: &Model, a: &BenchArgs) -> Result<String, String> {
    let n = a.batch;
    let vocab = model.manifest().vocab as u64;
    let mut rng = Rng::new(a.seed);
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|_| {
            (0..a.prompt_len)
                .map(|_| (rng.next_u64() % vocab) as u32)
                .collect()
        })
        .collect();
    let chunks: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
    let (mut pre, mut dec) = (vec![], vec![]);
    let mut kv_per_pos = 0.0;
    let err = |e: loopc_runtime::RuntimeError| format!("error: {e}");
    // One batch for every repetition, as a server reuses its batch: the warm-up rep plans the
    // buffers of both shapes and touches the cache's pages, the timed ones start its sequences
    // over (as the single-sequence bench resets its session).
    let mut bs = model.batch_session(n);
    bs.set_steps(a.steps);
    bs.set_exit_threshold(a.exit_threshold)
        .map_err(|e| format!("error: --exit-threshold: {e}"))?;
    bs.reserve(a.prompt_len + a.new_tokens).map_err(err)?;
    for rep in 0..=a.reps {
        for b in 0..n {
            bs.reset(b).map_err(err)?;
        }
        bs.set_profiling(a.profile && rep > 0);
        let t = Instant::now();
        let logits = bs.prefill_last(&chunks).map_err(err)?;
        let tp = t.elapsed().as_secs_f64();
        let mut next: Vec<Option<u32>> = logits
            .iter()
            .map(|l| Some(loopc_runtime::argmax(l.last_row())))
            .collect();
        let t = Instant::now();
        for _ in 0..warm_steps(rep, a.new_tokens) {
            let out = bs.step(&next).map_err(err)?;
            for (nx, l) in next.iter_mut().zip(&out) {
                *nx = Some(loopc_runtime::argmax(l.last_row()));
            }
        }
        let td = t.elapsed().as_secs_f64();
        let used: usize = bs.kv_bytes_used().iter().sum();
        let positions: usize = bs.positions().iter().sum();
        kv_per_pos = used as f64 / positions.max(1) as f64;
        if rep > 0 {
            pre.push(tp);
            dec.push(td);
        }
    }
    if a.profile {
        // The timed repetitions' timers (turned on after the warm-up).
        eprintln!("{}", loopc_runtime::profile_text(&bs.profile()));
    }
    let (p, d) = (median(pre), median(dec));
    Ok(format!(
        "{{\"impl\":\"loopc\",\"dtype\":\"{}\",\"batch\":{n},\"r\":{},\"threads\":{},\"prompt_len\":{},\"new_tokens\":{},\"reps\":{},\"prefill_s\":{p:.4},\"decode_s\":{d:.4},\"prefill_tok_s\":{:.2},\"decode_tok_s\":{:.2},\"kv_bytes_per_position\":{kv_per_pos:.0},\"peak_rss_mb\":{:.0}}}",
        model.dtype(),
        a.steps.or(model.manifest().program.recur.as_ref().map(|r| r.default_steps)).unwrap_or(0),
        model.threads(),
        a.prompt_len,
        a.new_tokens,
        a.reps,
        (n * a.prompt_len) as f64 / p,
        if a.new_tokens == 0 { 0.0 } else { (n * a.new_tokens) as f64 / d },
        peak_rss().unwrap_or(0) as f64 / 1048576.0,
    ))
}

/// `--ceilings`: this machine's ceilings measured in this process on `threads` threads (see
/// `loopc_runtime::ceilings`), as one JSON line.
/// With `host` (an artifact's own GEMM, the MLIR backend's), its GFLOP/s on the same shapes,
/// timed alternately with the runtime's, is added as `gemm_f32_artifact_gflops`.
pub fn ceilings(threads: usize, host: Option<loopc_runtime::matmul::HostGemm>) -> String {
    use loopc_runtime::ceilings as c;
    const MIB: usize = 1 << 20;
    let shapes = [
        (128, 1024, 1024),
        (512, 1024, 1024),
        (1024, 1024, 1024),
        (512, 1024, 5632),
        (512, 2816, 1024),
    ];
    let pairs: Vec<(Shape3, (f64, Option<f64>))> = shapes
        .iter()
        .map(|&(m, k, n)| ((m, k, n), c::gemm_pair_gflops(host, m, k, n, threads)))
        .collect();
    let gemm: Vec<String> = pairs
        .iter()
        .map(|((m, k, n), (g, _))| format!("\"{m}x{k}x{n}\":{g:.1}"))
        .collect();
    let artifact_gemm = if host.is_some() {
        let v: Vec<String> = pairs
            .iter()
            .map(|((m, k, n), (_, a))| format!("\"{m}x{k}x{n}\":{:.1}", a.unwrap_or(0.0)))
            .collect();
        format!(",\"gemm_f32_artifact_gflops\":{{{}}}", v.join(","))
    } else {
        String::new()
    };
    let pairs16: Vec<(Shape3, (f64, Option<f64>))> = shapes
        .iter()
        .map(|&(m, k, n)| ((m, k, n), c::gemm_bf16_pair_gflops(host, m, k, n, threads)))
        .collect();
    let gemm16: Vec<String> = pairs16
        .iter()
        .map(|((m, k, n), (g, _))| format!("\"{m}x{k}x{n}\":{g:.1}"))
        .collect();
    let artifact_gemm16 = if pairs16.iter().any(|(_, (_, a))| a.is_some()) {
        let v: Vec<String> = pairs16
            .iter()
            .map(|((m, k, n), (_, a))| format!("\"{m}x{k}x{n}\":{:.1}", a.unwrap_or(0.0)))
            .collect();
        format!(",\"gemm_bf16_artifact_gflops\":{{{}}}", v.join(","))
    } else {
        String::new()
    };
    let sizes = [(2, "2MiB"), (64, "64MiB"), (512, "512MiB")];
    let read: Vec<String> = sizes
        .iter()
        .map(|&(s, k)| format!("\"{k}\":{:.1}", c::read_gbs(s * MIB, threads)))
        .collect();
    let copy: Vec<String> = sizes
        .iter()
        .map(|&(s, k)| format!("\"{k}\":{:.1}", c::copy_gbs(s * MIB, threads)))
        .collect();
    format!(
        "{{\"impl\":\"loopc\",\"threads\":{threads},\"gemm_f32_gflops\":{{{}}}{artifact_gemm},\"gemv_f32_gbs\":{{\"1x4096x4096\":{:.1}}},\"gemm_bf16_gflops\":{{{}}}{artifact_gemm16},\"gemv_bf16_gbs\":{{\"1x4096x8192\":{:.1}}},\"read_gbs\":{{{}}},\"copy_gbs\":{{{}}},\"peak_rss_mb\":{:.0}}}",
        gemm.join(","),
        c::gemv_gbs(4096, 4096, threads),
        gemm16.join(","),
        c::gemv_bf16_gbs(8192, 4096, threads),
        read.join(","),
        copy.join(","),
        peak_rss().unwrap_or(0) as f64 / 1048576.0,
    )
}
