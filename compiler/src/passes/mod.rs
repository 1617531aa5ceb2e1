//! The pass manager, after rustc's MIR pipeline: named passes run in order over the graph IR,
//! the verifier runs after each one (always in debug builds and tests, on request in release),
//! the IR can be dumped before/after any pass, and `limit` stops the pipeline after N passes to
//! bisect a miscompile.
mod fold_linear_slice;
mod fuse_elementwise;

use loopc_dialects::print::print_module;
use loopc_dialects::verify::{verify_module, VerifyError};
use loopc_dialects::Module;

pub trait Pass {
    fn name(&self) -> &'static str;
    fn run(&self, m: &mut Module);
}

pub struct PassOptions {
    /// Pass names whose output is dumped (`all` for every pass).
    pub dump_after: Vec<String>,
    pub verify: bool,
    /// Run only the first `limit` passes.
    pub limit: Option<usize>,
    /// 0 disables the optimizing passes.
    pub opt_level: u8,
}

impl Default for PassOptions {
    fn default() -> Self {
        PassOptions {
            dump_after: vec![],
            verify: cfg!(debug_assertions),
            limit: None,
            opt_level: 1,
        }
    }
}

pub struct PassRecord {
    pub name: &'static str,
    pub nodes_after: usize,
    pub micros: u128,
    pub dump: Option<String>,
}

/// The default pipeline. Each pass leaves a compacted, verified module.
pub fn pipeline(opt_level: u8) -> Vec<Box<dyn Pass>> {
    let mut v: Vec<Box<dyn Pass>> = vec![Box::new(fold_linear_slice::FoldLinearSlice)];
    if opt_level > 0 {
        v.push(Box::new(crate::egraph::EGraphPass));
        v.push(Box::new(fuse_elementwise::FuseElementwise));
    }
    v
}

pub fn run_pipeline(m: &mut Module, opts: &PassOptions) -> Result<Vec<PassRecord>, VerifyError> {
    let mut records = vec![];
    if opts.verify {
        verify_module(m)?;
    }
    for (i, pass) in pipeline(opts.opt_level).into_iter().enumerate() {
        if opts.limit.is_some_and(|l| i >= l) {
            break;
        }
        let t = std::time::Instant::now();
        pass.run(m);
        m.forward.compact();
        let micros = t.elapsed().as_micros();
        if opts.verify {
            verify_module(m).map_err(|mut e| {
                e.message = format!("after pass `{}`: {}", pass.name(), e.message);
                e
            })?;
        }
        let dump = opts
            .dump_after
            .iter()
            .any(|d| d == "all" || d == pass.name())
            .then(|| print_module(m));
        records.push(PassRecord {
            name: pass.name(),
            nodes_after: m.node_count(),
            micros,
            dump,
        });
    }
    Ok(records)
}

/// Apply `f` to a region and every nested recur body.
pub(crate) fn for_each_region(
    r: &mut loopc_dialects::Region,
    f: &mut dyn FnMut(&mut loopc_dialects::Region),
) {
    use loopc_dialects::Op;
    for n in r.graph.node_indices().collect::<Vec<_>>() {
        if let Op::Recur { body, .. } = &mut r.graph[n].op {
            for_each_region(body, f);
        }
    }
    f(r);
}
