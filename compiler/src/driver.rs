//! The compiler driver: file → AST → params → graph IR → passes → program → native kernels →
//! artifact, stopping at whichever stage the caller asks for. Every user-facing failure comes
//! back as a [`CompileError`] whose text is ready to print (diagnostics already rendered).
use crate::backend::cranelift;
use crate::frontend::{self, diag, Diagnostic, Overrides, ParamEnv, SourceMap};
use crate::passes::{run_pipeline, PassOptions, PassRecord};
use crate::{elab, lower};
use loopc_dialects::print::print_module;
use loopc_dialects::Module;
use loopc_runtime::artifact::{self, Manifest};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--set name=value` arguments.
    pub set: Vec<String>,
    /// An HF-style config.json.
    pub config: Option<PathBuf>,
    pub opt_level: u8,
    pub dump_after: Vec<String>,
    /// Verify after every pass (always on in debug builds).
    pub verify: bool,
    pub pass_limit: Option<usize>,
    /// Render diagnostics with ANSI colors.
    pub color: bool,
    /// Which code generator compiles the kernels.
    pub backend: Backend,
    /// The machine the artifact runs on.
    pub target: Target,
}

/// `--target`: host code (a shared object) or PTX for NVIDIA GPUs (through the MLIR backend).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Target {
    #[default]
    Cpu,
    /// `cuda-sm_90`: every kernel as PTX (needs the `mlir` cargo feature).
    Cuda,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Target::Cpu),
            "cuda" => Ok(Target::Cuda),
            _ => Err(format!("unknown target `{s}`; targets are: cpu, cuda")),
        }
    }
}

/// `--backend`: the kernels' code generator. Both produce a shared object with the same
/// symbols and ABI, so the artifact and the runtime do not depend on the choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Backend {
    #[default]
    Cranelift,
    /// MLIR → LLVM (needs the `mlir` cargo feature).
    Mlir,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cranelift" => Ok(Backend::Cranelift),
            "mlir" => Ok(Backend::Mlir),
            _ => Err(format!(
                "unknown backend `{s}`; backends are: cranelift, mlir"
            )),
        }
    }
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cranelift => "cranelift",
            Backend::Mlir => "mlir",
        }
    }
}

/// Compile the kernels with the chosen backend into a shared object.
/// The MLIR backend's object also carries GEMMs, which the manifest then names.
fn codegen(manifest: &mut Manifest, backend: Backend) -> Result<Vec<u8>, CompileError> {
    fn fail(e: impl std::fmt::Display) -> CompileError {
        CompileError::Other(format!("error: code generation failed: {e}"))
    }
    match backend {
        Backend::Cranelift => Ok(cranelift::compile_kernels(&manifest.kernels)
            .map_err(fail)?
            .shared_object),
        #[cfg(feature = "mlir")]
        Backend::Mlir => {
            use crate::backend::mlir;
            let out = mlir::native::compile_kernels(&manifest.kernels).map_err(fail)?;
            manifest.host_gemm = Some(mlir::host_gemm(out.amx));
            Ok(out.shared_object)
        }
        #[cfg(not(feature = "mlir"))]
        Backend::Mlir => {
            let _ = &manifest;
            Err(no_mlir())
        }
    }
}

/// The PTX of every kernel and support kernel, and the launch table, into the manifest.
fn codegen_cuda(manifest: &mut Manifest) -> Result<Vec<u8>, CompileError> {
    #[cfg(feature = "mlir")]
    {
        let out = crate::backend::mlir::native::compile_ptx(&manifest.kernels).map_err(|e| {
            CompileError::Other(format!("error: code generation for CUDA failed: {e}"))
        })?;
        manifest.target = crate::backend::mlir::gpu::TARGET.into();
        manifest.backend = Backend::Mlir.name().into();
        manifest.cuda = Some(out.image);
        Ok(out.ptx.into_bytes())
    }
    #[cfg(not(feature = "mlir"))]
    {
        let _ = manifest;
        Err(CompileError::Other(
            "error: `--target cuda` needs the MLIR backend, and this loopc was built without it; \
             rebuild with `--features mlir` (LLVM/MLIR 22: see scripts/install-llvm.sh)"
                .into(),
        ))
    }
}

#[cfg(not(feature = "mlir"))]
fn no_mlir() -> CompileError {
    CompileError::Other(
        "error: this loopc was built without the MLIR backend; rebuild with `--features mlir` \
         (LLVM/MLIR 22: see scripts/install-llvm.sh)"
            .into(),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// Rendered diagnostics (source snippets included).
    #[error("{0}")]
    Diagnostics(String),
    #[error("{0}")]
    Other(String),
}

/// A parsed and elaborated program plus what is needed to report on it.
pub struct Front {
    pub sources: SourceMap,
    pub ast: frontend::ast::File,
    pub params: ParamEnv,
    pub warnings: Vec<Diagnostic>,
    pub config_path: Option<String>,
}

pub struct Built {
    pub manifest: Manifest,
    pub shared_object: Vec<u8>,
    pub passes: Vec<PassRecord>,
    pub module: Module,
    pub warnings: String,
    /// (stage, seconds)
    pub timings: Vec<(&'static str, f64)>,
}

impl Built {
    pub fn artifact_bytes(&self) -> Vec<u8> {
        artifact::encode(&self.manifest, &self.shared_object)
    }
}

fn render(sm: &SourceMap, d: &[Diagnostic], color: bool) -> String {
    diag::render(sm, d, color)
}

/// Parse the file and evaluate its params with the overrides; stops on any error.
pub fn front(path: &Path, opts: &Options) -> Result<Front, CompileError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CompileError::Other(format!("error: cannot read `{}`: {e}", path.display()))
    })?;
    front_from_source(&path.display().to_string(), &text, opts)
}

pub fn front_from_source(name: &str, text: &str, opts: &Options) -> Result<Front, CompileError> {
    let mut sm = SourceMap::new();
    let file = sm.add(name, text);
    let (ast, mut diags) = frontend::parse(&sm, file);
    let (set, set_diags) = Overrides::parse_set_args(&mut sm, &opts.set);
    diags.extend(set_diags);
    let mut overrides = Overrides { set, config: None };
    let mut config_path = None;
    if let Some(cp) = &opts.config {
        let shown = cp.display().to_string();
        let text = std::fs::read_to_string(cp).map_err(|e| {
            CompileError::Other(format!("error: cannot read config `{shown}`: {e}"))
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            CompileError::Other(format!("error: config `{shown}` is not valid JSON: {e}"))
        })?;
        let serde_json::Value::Object(map) = v else {
            return Err(CompileError::Other(format!(
                "error: config `{shown}` must be a JSON object"
            )));
        };
        overrides.config = Some((shown.clone(), map));
        config_path = Some(shown);
    }
    if diag::has_errors(&diags) {
        return Err(CompileError::Diagnostics(render(&sm, &diags, opts.color)));
    }
    // Config keys no param reads are errors unless the file ignores them (E0206).
    let (params, pdiags) = frontend::eval_params(&ast, &overrides);
    diags.extend(pdiags);
    if diag::has_errors(&diags) {
        return Err(CompileError::Diagnostics(render(&sm, &diags, opts.color)));
    }
    Ok(Front {
        sources: sm,
        ast,
        params,
        warnings: diags,
        config_path,
    })
}

/// Elaborate to the graph IR (stage `graph`), before any pass.
pub fn graph(f: &Front, opts: &Options) -> Result<(Module, Vec<Diagnostic>), CompileError> {
    let (m, diags) = elab::elaborate(&f.sources, &f.ast, &f.params);
    let mut all = f.warnings.clone();
    all.extend(diags);
    match m {
        Some(m) => Ok((m, all)),
        None => Err(CompileError::Diagnostics(render(
            &f.sources, &all, opts.color,
        ))),
    }
}

/// Run the pass pipeline (stage `lowered` is its output).
pub fn optimize(m: &mut Module, opts: &Options) -> Result<Vec<PassRecord>, CompileError> {
    let popts = PassOptions {
        dump_after: opts.dump_after.clone(),
        verify: opts.verify || cfg!(debug_assertions),
        limit: opts.pass_limit,
        opt_level: opts.opt_level,
    };
    run_pipeline(m, &popts)
        .map_err(|e| CompileError::Other(format!("internal compiler error: {e}")))
}

pub fn program(m: &Module) -> Result<Manifest, CompileError> {
    lower::lower(m, "cpu-x86_64", "cranelift")
        .map_err(|e| CompileError::Other(format!("error: {e}")))
}

/// The whole pipeline from a file to artifact bytes.
pub fn build(path: &Path, opts: &Options) -> Result<Built, CompileError> {
    let mut timings = vec![];
    let t = Instant::now();
    let f = front(path, opts)?;
    timings.push(("parse+params", t.elapsed().as_secs_f64()));
    build_front(&f, opts, timings)
}

pub fn build_front(
    f: &Front,
    opts: &Options,
    mut timings: Vec<(&'static str, f64)>,
) -> Result<Built, CompileError> {
    let t = Instant::now();
    let (mut module, warns) = graph(f, opts)?;
    timings.push(("elaborate", t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let passes = optimize(&mut module, opts)?;
    timings.push(("passes", t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let mut manifest = program(&module)?;
    manifest.backend = opts.backend.name().into();

    timings.push(("lower", t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let shared_object = match opts.target {
        Target::Cpu => codegen(&mut manifest, opts.backend)?,
        Target::Cuda => codegen_cuda(&mut manifest)?,
    };
    timings.push(("codegen+link", t.elapsed().as_secs_f64()));
    Ok(Built {
        manifest,
        shared_object,
        passes,
        module,
        warnings: if warns.is_empty() {
            String::new()
        } else {
            render(&f.sources, &warns, opts.color)
        },
        timings,
    })
}

/// Text of one IR stage: `ast`, `graph`, `egraph`, `lowered`, `program`, `clif`, `mlir` (the
/// module before any upstream pass, verified when the `mlir` feature is on) or `llvm` (the
/// kernels in the `llvm` dialect after the lowering pipeline; needs the feature), `gpu` (every
/// kernel and support kernel as a `gpu.module`, verified with the feature) or `ptx` (its PTX;
/// needs the feature).
pub fn stage_text(path: &Path, stage: &str, opts: &Options) -> Result<String, CompileError> {
    let f = front(path, opts)?;
    stage_text_front(&f, stage, opts)
}

pub const STAGES: &[&str] = &[
    "ast", "graph", "egraph", "lowered", "program", "clif", "mlir", "llvm", "gpu", "ptx",
];

/// `loopc explain`: which e-graph rules fired where, and the cost before and after. Runs the
/// passes in front of `egraph`, then the optimizer with its report.
pub fn explain(path: &Path, opts: &Options) -> Result<String, CompileError> {
    let f = front(path, opts)?;
    explain_front(&f, opts)
}

pub fn explain_front(f: &Front, opts: &Options) -> Result<String, CompileError> {
    let (mut m, _) = graph(f, opts)?;
    let before = optimize_until(&mut m, opts, "egraph")?;
    let nodes = m.node_count();
    let report = crate::egraph::optimize(&mut m);
    loopc_dialects::verify::verify_module(&m).map_err(|e| {
        CompileError::Other(format!("internal compiler error: after `egraph`: {e}"))
    })?;
    let mut s = format!(
        "passes before egraph: {}\nnodes: {nodes} -> {}\n",
        before.join(", "),
        m.node_count()
    );
    s.push_str(&report.text());
    Ok(s)
}

/// Run the pipeline up to (not including) the pass `stop`; returns the names run.
fn optimize_until(
    m: &mut Module,
    opts: &Options,
    stop: &str,
) -> Result<Vec<&'static str>, CompileError> {
    let names: Vec<&'static str> = crate::passes::pipeline(opts.opt_level.max(1))
        .iter()
        .map(|p| p.name())
        .collect();
    let k = names.iter().position(|n| *n == stop).unwrap_or(names.len());
    let o = Options {
        pass_limit: Some(k),
        opt_level: opts.opt_level.max(1),
        ..opts.clone()
    };
    optimize(m, &o)?;
    Ok(names[..k].to_vec())
}

pub fn stage_text_front(f: &Front, stage: &str, opts: &Options) -> Result<String, CompileError> {
    if stage == "ast" {
        return Ok(frontend::print(&f.ast));
    }
    let (mut m, _) = graph(f, opts)?;
    if stage == "graph" {
        return Ok(print_module(&m));
    }
    if stage == "egraph" {
        // Up to and including the e-graph pass (even at --opt-level 0, to show what it does).
        optimize_until(&mut m, opts, "egraph")?;
        crate::egraph::optimize(&mut m);
        loopc_dialects::verify::verify_module(&m).map_err(|e| {
            CompileError::Other(format!("internal compiler error: after `egraph`: {e}"))
        })?;
        return Ok(print_module(&m));
    }
    optimize(&mut m, opts)?;
    if stage == "lowered" {
        return Ok(print_module(&m));
    }
    let manifest = program(&m)?;
    match stage {
        "program" => Ok(lower::print_manifest(&manifest)),
        "clif" => {
            let mut s = String::new();
            for k in &manifest.kernels {
                let text = cranelift::kernel_clif(k)
                    .map_err(|e| CompileError::Other(format!("error: {e}")))?;
                s.push_str(&format!("; {}\n{text}\n", k.symbol));
            }
            Ok(s)
        }
        "mlir" => {
            let text = crate::backend::mlir::program_module(&manifest, true)
                .map_err(|e| CompileError::Other(format!("error: {e}")))?;
            #[cfg(feature = "mlir")]
            crate::backend::mlir::native::verify(&text)
                .map_err(|e| CompileError::Other(format!("internal compiler error: {e}")))?;
            Ok(text)
        }
        "llvm" => {
            #[cfg(feature = "mlir")]
            {
                let amx = crate::backend::mlir::native::host_has_amx();
                let text = crate::backend::mlir::kernels_module(&manifest.kernels, amx)
                    .map_err(|e| CompileError::Other(format!("error: {e}")))?;
                crate::backend::mlir::native::lower_text(&text)
                    .map_err(|e| CompileError::Other(format!("internal compiler error: {e}")))
            }
            #[cfg(not(feature = "mlir"))]
            Err(no_mlir())
        }
        "gpu" => {
            let g = crate::backend::mlir::gpu::gpu_module(&manifest.kernels)
                .map_err(|e| CompileError::Other(format!("error: {e}")))?;
            #[cfg(feature = "mlir")]
            crate::backend::mlir::native::verify(&g.text)
                .map_err(|e| CompileError::Other(format!("internal compiler error: {e}")))?;
            Ok(g.text)
        }
        "ptx" => {
            #[cfg(feature = "mlir")]
            {
                crate::backend::mlir::native::compile_ptx(&manifest.kernels)
                    .map(|o| o.ptx)
                    .map_err(|e| CompileError::Other(format!("error: {e}")))
            }
            #[cfg(not(feature = "mlir"))]
            Err(no_mlir())
        }
        other => Err(CompileError::Other(format!(
            "error: unknown stage `{other}`; stages are: {}",
            STAGES.join(", ")
        ))),
    }
}
