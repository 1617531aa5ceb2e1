//! The load-time weight dtype (`--dtype`): which weights become packed bf16 ([`Packed`]) and
//! which stay f32.
//!
//! With [`WeightDtype::Bf16`] every matmul weight window (`MatMul` and `MatMulKN`, the LM head
//! included, per-iteration variants resolved) is packed once at load, derived weights after
//! they are computed in f32. Token embedding tables are packed too and gathered from bf16
//! (as in a model converted with `.to(torch.bfloat16)`; a tied head shares the copy). A weight
//! read any other way (norm gains, biases, kernel arguments, learned position embeddings)
//! keeps its f32 copy; a weight read only as bf16 loses it, and
//! a checkpoint tensor that feeds no derived weight is packed straight from the file's bytes
//! (bf16 checkpoints bit for bit), never widened to f32. Activations, the KV cache, norms,
//! RoPE and attention stay f32; the artifact is the same for both dtypes.

use crate::artifact::{Derive, Instr, Manifest, WRef};
use crate::bf16::{to_bf16, Packed};
use crate::error::{Result, RuntimeError};
use crate::weights::{Bound, Weights};
use std::collections::HashMap;

/// How matmul weights are stored at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// As loaded, f32 (checkpoints in other dtypes are widened).
    #[default]
    F32,
    /// bf16 matmul weights, f32 accumulation (see the module docs).
    Bf16,
}

impl std::str::FromStr for WeightDtype {
    type Err = RuntimeError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(WeightDtype::F32),
            "bf16" | "bfloat16" => Ok(WeightDtype::Bf16),
            _ => Err(RuntimeError::Config(format!(
                "unknown weight dtype `{s}` (expected f32 or bf16)"
            ))),
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
        })
    }
}

/// Options of [`crate::Model::with_options`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Worker threads (`None`: `LOOPC_THREADS`, else the available cores).
    pub threads: Option<usize>,
    pub dtype: WeightDtype,
}

/// One packed window: `(weight id, offset, rows, cols, kn)`, the `WRef` of a `MatMul`
/// (`kn = false`, `[n, k]`) or `MatMulKN` (`kn = true`, `[k, n]`) with any per-iteration weight
/// resolved to the source it reads.
pub(crate) type PackKey = (u32, usize, usize, usize, bool);

pub(crate) fn key(id: u32, offset: usize, w: &WRef, kn: bool) -> PackKey {
    (id, offset, w.rows, w.cols, kn)
}

pub(crate) struct Plan {
    pub windows: Vec<PackKey>,
    /// By weight id (checkpoint then derived): read as f32 at run time.
    pub f32_needed: Vec<bool>,
    /// By checkpoint weight id: packed straight from the checkpoint, never bound as f32.
    pub lazy: Vec<bool>,
}

/// `(id, offset)` of every weight a reference may read (each variant of a per-iteration one).
fn resolve(m: &Manifest, w: &WRef) -> Vec<(u32, usize)> {
    let nw = m.weights.len();
    match (w.weight as usize)
        .checked_sub(nw)
        .and_then(|i| m.derived.get(i))
    {
        Some(d) if matches!(d.recipe, Derive::PerIter { .. }) => d
            .recipe
            .sources()
            .iter()
            .map(|s| (s.weight, s.offset + w.offset))
            .collect(),
        _ => vec![(w.weight, w.offset)],
    }
}

pub(crate) fn plan(m: &Manifest) -> Plan {
    let total = m.weights.len() + m.derived.len();
    let mut windows: Vec<PackKey> = Vec::new();
    let mut f32_needed = vec![false; total];
    let mut lists: Vec<&[Instr]> = vec![&m.program.prelude, &m.program.coda];
    if let Some(r) = &m.program.recur {
        lists.push(&r.body);
        lists.push(&r.router);
    }
    let need = |w: &WRef, f32_needed: &mut Vec<bool>| {
        for (id, _) in resolve(m, w) {
            if let Some(f) = f32_needed.get_mut(id as usize) {
                *f = true;
            }
        }
    };
    for list in lists {
        for ins in list {
            match ins {
                Instr::MatMul { w, epi, .. } => {
                    for (id, off) in resolve(m, w) {
                        windows.push(key(id, off, w, false));
                    }
                    if let Some(b) = &epi.bias {
                        need(b, &mut f32_needed);
                    }
                }
                Instr::MatMulKN { w, .. } => {
                    for (id, off) in resolve(m, w) {
                        windows.push(key(id, off, w, true));
                    }
                }
                Instr::Embed { table, .. } => {
                    for (id, off) in resolve(m, table) {
                        windows.push(key(id, off, table, false));
                    }
                }
                other => {
                    for w in other.weights() {
                        need(&w, &mut f32_needed);
                    }
                }
            }
        }
    }
    windows.sort_unstable();
    windows.dedup();
    let mut derive_src = vec![false; total];
    for d in &m.derived {
        if !matches!(d.recipe, Derive::PerIter { .. }) {
            for s in d.recipe.sources() {
                if let Some(f) = derive_src.get_mut(s.weight as usize) {
                    *f = true;
                }
            }
        }
    }
    let lazy = (0..m.weights.len())
        .map(|id| !f32_needed[id] && !derive_src[id] && windows.iter().any(|w| w.0 as usize == id))
        .collect();
    Plan {
        windows,
        f32_needed,
        lazy,
    }
}

/// Pack every window of `plan`, then drop the f32 data nothing reads any more.
pub(crate) fn pack(
    m: &Manifest,
    plan: &Plan,
    bound: &mut [Bound],
    checkpoint: &Weights,
    pool: &rayon::ThreadPool,
) -> Result<HashMap<PackKey, Packed>> {
    let mut out = HashMap::with_capacity(plan.windows.len());
    for &k in &plan.windows {
        let (id, off, rows, cols, kn) = k;
        let (n, kk) = if kn { (cols, rows) } else { (rows, cols) };
        // Element (j, i) of the [n, k] view at this index of the weight's row-major data.
        let at = |j: usize, i: usize| off + if kn { i * n + j } else { j * kk + i };
        let name = match m.weights.get(id as usize) {
            Some(d) => d.name.clone(),
            None => m.derived[id as usize - m.weights.len()].name.clone(),
        };
        let what = format!("bf16 copy of weight `{name}`");
        let b = &bound[id as usize];
        let p = if b.len() > 0 || (id as usize) >= m.weights.len() {
            let src = b.as_slice();
            Packed::build(n, kk, &what, pool, |j, i| to_bf16(src[at(j, i)]))?
        } else {
            let get = checkpoint.bf16_reader(&name).ok_or_else(|| {
                RuntimeError::Config(format!("weight `{name}` cannot be read as bf16"))
            })?;
            Packed::build(n, kk, &what, pool, |j, i| get(at(j, i)))?
        };
        out.insert(k, p);
    }
    // Everything the program reads in f32 is in `f32_needed`; the rest (packed weights, and
    // checkpoint tensors that only fed derived weights) is never read again.
    for (id, b) in bound.iter_mut().enumerate() {
        if plan.f32_needed[id] {
            continue;
        }
        if b.is_mapped() {
            b.release_pages();
        }
        *b = Bound::Owned(crate::mem::AVec::new());
        if let Some(d) = m.weights.get(id) {
            checkpoint.release(&d.name);
        }
    }
    Ok(out)
}
