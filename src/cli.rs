//! Command-line interface. Progress and timings go to stderr; results (IR text, generated
//! tokens) to stdout, so `loopc ir ... > file` and pipes stay clean.
use clap::{Args, Parser, Subcommand};
use loopc_compiler::driver::{self, CompileError, Options};
use loopc_runtime::{Artifact, LoadOptions, Model, SamplerConfig, WeightDtype, Weights};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::bench;
use crate::eval;
use crate::tokenize;
use crate::trace_cmd;

#[derive(Parser)]
#[command(
    name = "loopc",
    version,
    about = "Compile looped (recurrent-depth) transformers and run them",
    long_about = "loopc compiles a looped transformer described in a `.loop` file into a native \
artifact and runs it on safetensors weights.\n\n\
Typical use:\n  \
loopc build examples/huginn.loop --config config.json -o huginn.loopc\n  \
loopc run huginn.loopc --weights model.safetensors --tokens \"1 2 3\" --steps 8 --max-new-tokens 16\n\n\
`loopc ir` prints any stage of the compiler; `loopc check` only reports diagnostics."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Override a param of the `.loop` file (repeatable), e.g. `--set dim=64`.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// An HF-style config.json; its keys override the params that name them with `from`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// 0 disables the optimizing passes (for debugging and parity checks).
    #[arg(long, default_value_t = 1)]
    opt_level: u8,
    /// Print the graph IR after the named pass (or `all`) to stderr.
    #[arg(long, value_name = "PASS")]
    dump_after: Vec<String>,
    /// Run only the first N passes (bisect a miscompile).
    #[arg(long, value_name = "N")]
    pass_limit: Option<usize>,
    /// Verify the IR after every pass (always on in debug builds).
    #[arg(long)]
    verify: bool,
    /// Kernel code generator: cranelift, or mlir (MLIR → LLVM; needs the `mlir` feature).
    #[arg(long, default_value = "cranelift")]
    backend: driver::Backend,
    /// cpu (host code), or cuda (PTX for sm_90 GPUs through the MLIR backend; needs the `mlir`
    /// feature).
    #[arg(long, default_value = "cpu")]
    target: driver::Target,
}

impl ModelArgs {
    fn options(&self) -> Options {
        Options {
            set: self.set.clone(),
            config: self.config.clone(),
            opt_level: self.opt_level,
            dump_after: self.dump_after.clone(),
            verify: self.verify,
            pass_limit: self.pass_limit,
            color: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            backend: self.backend,
            target: self.target,
        }
    }
}

/// The load-time weight dtype, shared by the commands that run a model.
#[derive(Args)]
struct DtypeArg {
    /// Matmul weight storage: f32, or bf16 (converted once at load, f32 accumulation; norms,
    /// biases, attention, the KV cache and activations stay f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Where the model runs: cpu, cuda (or cuda:N; a `--target cuda` artifact and a loopc built
    /// with `--features cuda`), or cuda-emu (the CUDA executor over host memory with a CPU
    /// artifact: a slow check of the executor without a GPU).
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl DtypeArg {
    fn options(&self) -> Result<LoadOptions, String> {
        let dtype: WeightDtype = self
            .dtype
            .parse()
            .map_err(|e| format!("error: --dtype: {e}"))?;
        let device: loopc_runtime::Device = self
            .device
            .parse()
            .map_err(|e| format!("error: --device: {e}"))?;
        Ok(LoadOptions {
            threads: None,
            dtype,
            device,
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Compile a `.loop` file into an artifact.
    Build {
        /// The model description.
        model: PathBuf,
        #[command(flatten)]
        args: ModelArgs,
        /// Output path (default: the model's file name with `.loopc`).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Run a model: prefill the prompt, then generate tokens.
    Run(RunArgs),
    /// Accuracy on a task file (JSON lines of tokens/answer/hops) by hop count × steps.
    Eval {
        /// An artifact or a `.loop` file.
        model: PathBuf,
        #[arg(long)]
        weights: PathBuf,
        /// JSON lines: {"tokens": [...], "answer": id, "hops": k}.
        #[arg(long)]
        task: PathBuf,
        /// Recurrence depths to evaluate, e.g. "1,2,4,8".
        #[arg(long, default_value = "1,2,4,8")]
        steps: String,
        /// table, csv or json.
        #[arg(long, default_value = "table")]
        format: String,
        /// Also score per-token exit policies, each with a sweep of thresholds: `all`, `none`,
        /// or a comma list of latent-diff, cosine, kl, minp-kl, entropy-diff, argmax-stability.
        #[arg(long, default_value = "none")]
        policies: String,
        /// The policies' iteration cap (default: the largest of --steps).
        #[arg(long)]
        policy_cap: Option<usize>,
        #[command(flatten)]
        dtype: DtypeArg,
        #[command(flatten)]
        args: ModelArgs,
    },
    /// Per token and iteration: state norm, relative update, cosine to the previous state, and
    /// whether the trajectory settled on a fixed point or a cycle (JSON or CSV).
    Trace {
        /// An artifact or a `.loop` file.
        model: PathBuf,
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        tokens: String,
        #[arg(long)]
        steps: Option<usize>,
        /// Relative distance under which a state counts as repeated.
        #[arg(long, default_value_t = 1e-3)]
        tol: f32,
        #[arg(long, default_value = "json")]
        format: String,
        /// Also draw the PCA trajectories (PC1/PC2) as an SVG.
        #[arg(long, value_name = "FILE.svg")]
        svg: Option<PathBuf>,
        /// Also draw the PCA trajectories and the convergence curves as a PNG.
        #[arg(long, value_name = "FILE.png")]
        png: Option<PathBuf>,
        #[command(flatten)]
        dtype: DtypeArg,
        #[command(flatten)]
        args: ModelArgs,
    },
    /// Time prefill and decode (medians over repetitions), printed as one JSON line; or, with
    /// `--ceilings`, this machine's GEMM / GEMV / memory-bandwidth ceilings.
    Bench {
        /// An artifact or a `.loop` file (not needed with `--ceilings`; given with it, the
        /// artifact's own GEMM is measured beside the runtime's).
        #[arg(required_unless_present = "ceilings")]
        model: Option<PathBuf>,
        #[arg(long, required_unless_present = "ceilings")]
        weights: Option<PathBuf>,
        /// Sequences prefilled and decoded together (a batch session); tok/s are aggregate.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Measure the machine's ceilings instead (f32 GEMM GFLOP/s through the runtime's
        /// matmul, GEMV GB/s, read and copy GB/s at 2 MiB, 64 MiB, 512 MiB), on
        /// `LOOPC_THREADS` threads.
        #[arg(long)]
        ceilings: bool,
        /// Time every kind of operation over the timed repetitions and print the table to
        /// stderr.
        #[arg(long)]
        profile: bool,
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        #[arg(long, default_value_t = 32)]
        new_tokens: usize,
        #[arg(long)]
        steps: Option<usize>,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Override the exit policy's threshold (router threshold, gate q, criterion).
        #[arg(long)]
        exit_threshold: Option<f64>,
        #[command(flatten)]
        dtype: DtypeArg,
        #[command(flatten)]
        args: ModelArgs,
    },
    /// Print one stage of the compiler: ast, graph, egraph, lowered, program, clif, mlir, llvm, gpu,
    /// ptx.
    Ir {
        model: PathBuf,
        #[arg(long, default_value = "graph")]
        stage: String,
        #[command(flatten)]
        args: ModelArgs,
    },
    /// Print every param of a `.loop` file with its value and where it came from (the default,
    /// `--set`, or which config.json key), and the config keys no param reads.
    Params {
        model: PathBuf,
        #[command(flatten)]
        args: ModelArgs,
    },
    /// Show what the e-graph optimizer does: rules fired per region, node counts, cost before
    /// and after, time per stage.
    Explain {
        model: PathBuf,
        #[command(flatten)]
        args: ModelArgs,
    },
    /// Check a `.loop` file (and optionally a checkpoint against it); prints diagnostics only.
    Check {
        model: PathBuf,
        #[command(flatten)]
        args: ModelArgs,
        /// Also check that this checkpoint has every declared tensor with its shape.
        #[arg(long)]
        weights: Option<PathBuf>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// An artifact from `loopc build`, or a `.loop` file (compiled in memory first).
    model: PathBuf,
    /// Weights: a .safetensors file or a directory of shards.
    #[arg(long)]
    weights: PathBuf,
    /// The prompt as token ids, e.g. "1 2 3".
    #[arg(long, conflicts_with = "prompt")]
    tokens: Option<String>,
    /// The prompt as text (needs --tokenizer); prints the generated text.
    #[arg(long)]
    prompt: Option<String>,
    /// A Hugging Face tokenizer.json, used with --prompt.
    #[arg(long, value_name = "tokenizer.json")]
    tokenizer: Option<PathBuf>,
    /// With --prompt, also print the generated token ids (a line before the text).
    #[arg(long)]
    print_ids: bool,
    /// Recurrence steps r (default: the model's).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop at these token ids, e.g. "65505 65508".
    #[arg(long)]
    stop: Option<String>,
    /// Write the logits of every prefill position and decode step to this safetensors file.
    #[arg(long, value_name = "FILE.safetensors")]
    dump_logits: Option<PathBuf>,
    /// Print run statistics (iterations, KV bytes, timings) to stderr.
    #[arg(long)]
    stats: bool,
    /// Time every kind of operation (matmul, attention, norms, ...) and print the table.
    #[arg(long)]
    profile: bool,
    /// Stability guard on the recurrent state: off, warn, error or clamp, optionally with the
    /// allowed norm growth since the first iteration, e.g. `clamp:1000` (default warn:10000).
    #[arg(long, default_value = "warn")]
    guard: loopc_runtime::guard::Guard,
    /// Override the exit policy's threshold (the gate's q for `exit gate(...)`).
    #[arg(long, value_name = "X")]
    exit_threshold: Option<f64>,
    /// Force per-token depths: "d0 d1 ..." for positions 0, 1, ... (the last repeats).
    #[arg(long, value_name = "DEPTHS")]
    depths: Option<String>,
    /// With --depths: repeat the list cyclically (position p gets d[p mod n]).
    #[arg(long)]
    cycle_depths: bool,
    #[command(flatten)]
    dtype: DtypeArg,
    /// Compile options when MODEL is a `.loop` file.
    #[command(flatten)]
    args: ModelArgs,
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => 0,
        Err(msg) => {
            eprintln!("{}", msg.trim_end());
            1
        }
    }
}

fn compile_err(e: CompileError) -> String {
    e.to_string()
}

fn dispatch(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Build {
            model,
            args,
            output,
        } => {
            let t = Instant::now();
            let built = driver::build(&model, &args.options()).map_err(compile_err)?;
            eprint!("{}", built.warnings);
            for p in &built.passes {
                if let Some(d) = &p.dump {
                    eprintln!("// ---- after pass `{}` ----\n{d}", p.name);
                }
            }
            let out = output.unwrap_or_else(|| model.with_extension("loopc"));
            let bytes = built.artifact_bytes();
            std::fs::write(&out, &bytes)
                .map_err(|e| format!("error: cannot write `{}`: {e}", out.display()))?;
            let stages: Vec<String> = built
                .timings
                .iter()
                .map(|(k, s)| format!("{k} {:.1} ms", s * 1e3))
                .collect();
            eprintln!(
                "built {} → {} ({} kernels, {} weights, {:.1} KiB) in {:.3} s [{}]",
                model.display(),
                out.display(),
                built.manifest.kernels.len(),
                built.manifest.weights.len(),
                bytes.len() as f64 / 1024.0,
                t.elapsed().as_secs_f64(),
                stages.join(", ")
            );
            Ok(())
        }
        Cmd::Ir { model, stage, args } => {
            let text = driver::stage_text(&model, &stage, &args.options()).map_err(compile_err)?;
            print!("{text}");
            Ok(())
        }
        Cmd::Explain { model, args } => {
            let text = driver::explain(&model, &args.options()).map_err(compile_err)?;
            print!("{text}");
            Ok(())
        }
        Cmd::Check {
            model,
            args,
            weights,
        } => {
            let opts = args.options();
            let f = driver::front(&model, &opts).map_err(compile_err)?;
            let (mut m, warns) = driver::graph(&f, &opts).map_err(compile_err)?;
            driver::optimize(&mut m, &opts).map_err(compile_err)?;
            if !warns.is_empty() {
                eprint!(
                    "{}",
                    loopc_compiler::frontend::render(&f.sources, &warns, opts.color)
                );
            }
            if let Some(w) = weights {
                let ws = Weights::open(&w).map_err(|e| format!("error: {e}"))?;
                let problems = loopc_runtime::check_weights(
                    &ws,
                    &driver::program(&m).map_err(compile_err)?.weights,
                );
                if !problems.is_empty() {
                    return Err(format!(
                        "error: {} problem(s) with `{}`:\n{}",
                        problems.len(),
                        w.display(),
                        problems.join("\n")
                    ));
                }
            }
            eprintln!(
                "{}: ok ({} nodes, {} weights)",
                model.display(),
                m.node_count(),
                m.weights.len()
            );
            Ok(())
        }
        Cmd::Run(r) => run(r),
        Cmd::Params { model, args } => {
            use loopc_compiler::frontend::params::ValueSource;
            let f = driver::front(&model, &args.options()).map_err(compile_err)?;
            for p in &f.params.params {
                let src = match &p.source {
                    ValueSource::Default => "default".to_string(),
                    ValueSource::Set => "--set".to_string(),
                    ValueSource::Config(k) => format!("config \"{k}\""),
                };
                println!("{:<16} {:>14}  {src}", p.name, p.value.to_string());
            }
            if !f.params.unused_config_keys.is_empty() {
                println!(
                    "unused config keys: {}",
                    f.params.unused_config_keys.join(", ")
                );
            }
            Ok(())
        }
        Cmd::Eval {
            model,
            weights,
            task,
            steps,
            format,
            policies,
            policy_cap,
            dtype,
            args,
        } => {
            let load = dtype.options()?;
            let policies = eval::parse_policies(&policies)?;
            if policy_cap == Some(0) {
                return Err("error: --policy-cap must be positive".into());
            }
            let steps: Vec<usize> = steps
                .split(',')
                .map(|t| {
                    t.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|&r| r > 0)
                        .ok_or(format!("error: --steps: `{t}` is not a positive integer"))
                })
                .collect::<Result<_, _>>()?;
            let items = eval::load_task(&task)?;
            let artifact = load_artifact(&model, &args)?;
            let rebuild = (!policies.is_empty()).then(|| artifact.clone());
            let weights_path = weights;
            let weights = Weights::open(&weights_path).map_err(|e| format!("error: {e}"))?;
            let model =
                Model::with_options(artifact, weights, &load).map_err(|e| format!("error: {e}"))?;
            let t = Instant::now();
            let cap = policy_cap.unwrap_or_else(|| steps.iter().copied().max().unwrap_or(1));
            let table = eval::evaluate(
                &model,
                rebuild.as_ref().map(|a| (a, weights_path.as_path())),
                &items,
                &steps,
                &policies,
                cap,
                &load,
            )?;
            print!("{}", table.render(&format)?);
            eprintln!(
                "evaluated {} questions × {} settings in {:.2} s",
                items.len(),
                table.settings.len(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Trace {
            model,
            weights,
            tokens,
            steps,
            tol,
            format,
            svg,
            png,
            dtype,
            args,
        } => {
            let load = dtype.options()?;
            let tokens = parse_ids(&tokens, "--tokens")?;
            let artifact = load_artifact(&model, &args)?;
            let weights = Weights::open(&weights).map_err(|e| format!("error: {e}"))?;
            let model =
                Model::with_options(artifact, weights, &load).map_err(|e| format!("error: {e}"))?;
            print!(
                "{}",
                trace_cmd::run(
                    &model,
                    &tokens,
                    &trace_cmd::Options {
                        steps,
                        tol,
                        format: &format,
                        svg: svg.as_deref(),
                        png: png.as_deref(),
                    }
                )?
            );
            Ok(())
        }
        Cmd::Bench {
            model,
            weights,
            prompt_len,
            new_tokens,
            steps,
            reps,
            exit_threshold,
            batch,
            ceilings,
            profile,
            dtype,
            args,
        } => {
            let load = dtype.options()?;
            if ceilings {
                let threads = match std::env::var("LOOPC_THREADS") {
                    Ok(v) => v
                        .trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| {
                            format!("error: LOOPC_THREADS must be a positive integer, got `{v}`")
                        })?,
                    Err(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
                };
                // An artifact given beside --ceilings: its own GEMM is measured too.
                let mut keep = None;
                let host = match &model {
                    Some(path) => {
                        let art = load_artifact(path, &args)?;
                        let k = loopc_runtime::kernels::Kernels::load_with_gemm(
                            &art.object,
                            &art.manifest.kernels,
                            art.manifest.host_gemm.as_ref(),
                        )
                        .map_err(|e| format!("error: {}: {e}", path.display()))?;
                        let g = k.gemm();
                        // The GEMM's code stays mapped while `keep` lives.
                        keep = Some(k);
                        if g.is_none() {
                            return Err(format!(
                                "error: {}: the artifact has no GEMM of its own (only `--backend \
                                 mlir` builds do); drop it to measure the runtime's ceilings",
                                path.display()
                            ));
                        }
                        g
                    }
                    None => None,
                };
                println!("{}", bench::ceilings(threads, host));
                drop(keep);
                return Ok(());
            }
            if batch == 0 {
                return Err("error: --batch must be at least 1".into());
            }
            let (Some(model), Some(weights)) = (model, weights) else {
                return Err("error: a model and --weights are needed".into());
            };
            let artifact = load_artifact(&model, &args)?;
            let weights = Weights::open(&weights).map_err(|e| format!("error: {e}"))?;
            let model =
                Model::with_options(artifact, weights, &load).map_err(|e| format!("error: {e}"))?;
            let line = bench::run(
                &model,
                &bench::BenchArgs {
                    prompt_len,
                    new_tokens,
                    steps,
                    reps,
                    seed: 0,
                    exit_threshold,
                    batch,
                    profile,
                },
            )?;
            println!("{line}");
            Ok(())
        }
    }
}

fn load_artifact(path: &Path, args: &ModelArgs) -> Result<Artifact, String> {
    if path.extension().is_some_and(|e| e == "loop") {
        let t = Instant::now();
        let built = driver::build(path, &args.options()).map_err(compile_err)?;
        eprint!("{}", built.warnings);
        eprintln!(
            "compiled {} in {:.3} s",
            path.display(),
            t.elapsed().as_secs_f64()
        );
        Artifact::from_bytes(built.artifact_bytes()).map_err(|e| format!("error: {e}"))
    } else {
        Artifact::load(path).map_err(|e| format!("error: {e}"))
    }
}

fn parse_ids(s: &str, what: &str) -> Result<Vec<u32>, String> {
    s.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .map_err(|_| format!("error: {what}: `{t}` is not a token id"))
        })
        .collect()
}

fn run(r: RunArgs) -> Result<(), String> {
    let load = r.dtype.options()?;
    // The prompt first, so a bad tokenizer fails before the model is compiled and loaded.
    let (prompt, tokenizer) = match (&r.tokens, &r.prompt, &r.tokenizer) {
        (Some(t), _, _) => (parse_ids(t, "--tokens")?, None),
        (None, Some(text), Some(path)) => {
            let tok = tokenize::load(path)?;
            (tokenize::encode(&tok, text)?, Some((tok, path)))
        }
        (None, Some(_), None) => {
            return Err("error: --prompt needs --tokenizer tokenizer.json (or pass token ids with --tokens \"1 2 3\")".into())
        }
        (None, None, _) => return Err("error: give the prompt with --tokens \"1 2 3\" or --prompt TEXT --tokenizer tokenizer.json".into()),
    };
    let artifact = load_artifact(&r.model, &r.args)?;
    let t = Instant::now();
    let weights = Weights::open(&r.weights).map_err(|e| format!("error: {e}"))?;
    let model = Model::with_options(artifact, weights, &load).map_err(|e| format!("error: {e}"))?;
    eprintln!(
        "loaded weights from {} in {:.3} s{}",
        r.weights.display(),
        t.elapsed().as_secs_f64(),
        if model.packs_f32() {
            " (f32 matmul weights packed into panels)"
        } else {
            ""
        }
    );
    if let (Some((_, path)), Some(&id)) = (&tokenizer, prompt.iter().max()) {
        if id as usize >= model.token_limit() {
            return Err(format!(
                "error: the tokenizer `{}` gave token id {id} for the prompt, but the model takes ids below {} (is it this model's tokenizer?)",
                path.display(),
                model.token_limit()
            ));
        }
    }
    let stops = match &r.stop {
        Some(s) => parse_ids(s, "--stop")?,
        None => vec![],
    };
    let mut sampler = if r.temperature > 0.0 {
        SamplerConfig::temperature(r.temperature)
    } else {
        SamplerConfig::greedy()
    };
    if let Some(k) = r.top_k {
        sampler = sampler.with_top_k(k);
    }
    if let Some(p) = r.top_p {
        sampler = sampler.with_top_p(p);
    }
    sampler = sampler.with_seed(r.seed);
    let mut session = model.session();
    session.set_steps(r.steps);
    session.set_profiling(r.profile);
    session.set_guard(r.guard);
    if let Some(x) = r.exit_threshold {
        session
            .set_exit_threshold(Some(x))
            .map_err(|e| format!("error: --exit-threshold: {e}"))?;
        let fixed = matches!(
            model.manifest().program.recur.as_ref().map(|r| &r.exit),
            Some(loopc_runtime::artifact::ExitPolicy::Fixed) | None
        );
        if fixed {
            eprintln!(
                "warning: --exit-threshold has no effect: the model's exit policy is `fixed`"
            );
        }
    }
    if let Some(d) = &r.depths {
        let v = d
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|t| !t.is_empty())
            .map(|t| {
                t.parse::<usize>()
                    .map_err(|_| format!("error: --depths: `{t}` is not a depth"))
            })
            .collect::<Result<Vec<usize>, String>>()?;
        if v.is_empty() || v.contains(&0) {
            return Err("error: --depths needs one or more depths ≥ 1".into());
        }
        session.set_depth_schedule(Some(if r.cycle_depths {
            loopc_runtime::DepthSchedule::Cycle(v)
        } else {
            loopc_runtime::DepthSchedule::Positions(v)
        }));
    }
    // Every prompt position's logits only when they are written out.
    let keep = match r.dump_logits {
        Some(_) => loopc_runtime::PromptLogits::All,
        None => loopc_runtime::PromptLogits::Last,
    };
    let out = loopc_runtime::generate_with(
        &mut session,
        &prompt,
        r.max_new_tokens,
        &sampler,
        &stops,
        keep,
    )
    .map_err(|e| format!("error: {e}"))?;
    let events = session.take_guard_events();
    for e in events.iter().take(5) {
        eprintln!("warning: {e}");
    }
    if events.len() > 5 {
        eprintln!(
            "warning: ... and {} more guard events (use --guard error to stop at the first)",
            events.len() - 5
        );
    }
    let toks: Vec<String> = out.tokens.iter().map(|t| t.to_string()).collect();
    match &tokenizer {
        None => println!("{}", toks.join(" ")),
        Some((tok, _)) => {
            if r.print_ids {
                println!("{}", toks.join(" "));
            }
            println!("{}", tokenize::decode(tok, &out.tokens)?);
        }
    }
    let st = session.stats();
    // The first new token is drawn from the prefill's logits; each later one costs a decode
    // step (one row of `step_logits`), and the decode rate counts those steps.
    let steps = out.step_logits.rows();
    let decode = if steps == 0 {
        "no decode step".to_string()
    } else {
        format!(
            "decode {steps} steps in {:.3} s ({:.1} tok/s)",
            out.decode_seconds,
            steps as f64 / out.decode_seconds.max(1e-9)
        )
    };
    eprintln!(
        "prefill {} tokens in {:.3} s ({:.1} tok/s); {} new token{}; {decode}",
        prompt.len(),
        out.prefill_seconds,
        prompt.len() as f64 / out.prefill_seconds.max(1e-9),
        out.tokens.len(),
        if out.tokens.len() == 1 { "" } else { "s" },
    );
    if r.stats || r.profile {
        eprintln!("{st}");
    }
    if let Some(path) = &r.dump_logits {
        out.write_safetensors(path, &prompt)
            .map_err(|e| format!("error: cannot write `{}`: {e}", path.display()))?;
        eprintln!("wrote logits to {}", path.display());
    }
    Ok(())
}
