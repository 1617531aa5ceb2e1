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
//!
//! With [`WeightDtype::F32`] on a CPU with AVX-512 (and no artifact GEMM), the same windows
//! are packed in f32 ([`PackedF32`], panels of 32 depth-major rows) for the packed kernels of
//! `matmul::packed`; `LOOPC_PACK_F32=0` keeps them row-major. The values are the checkpoint's.

use crate::artifact::{Derive, Instr, Manifest, WRef};
use crate::bf16::{to_bf16, Packed};
use crate::error::{Result, RuntimeError};
use crate::matmul::PackedF32;
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
    /// Where the model runs (a `cuda` artifact needs [`crate::Device::Cuda`]).
    pub device: crate::Device,
}

/// One packed window: `(weight id, offset, rows, cols, kn)`, the `WRef` of a `MatMul`
/// (`kn = false`, `[n, k]`) or `MatMulKN` (`kn = true`, `[k, n]`) with any per-iteration weight
/// resolved to the source it reads.
pub(crate) type PackKey = (u32, usize, usize, usize, bool);

pub(crate) fn key(id: u32, offset: usize, w: &WRef, kn: bool) -> PackKey {
    (id, offset, w.rows, w.cols, kn)
}

/// A weight window packed at load: bf16 ([`WeightDtype::Bf16`]) or f32 panels.
#[derive(Debug)]
pub(crate) enum PackedW {
    Bf16(Packed),
    F32(PackedF32),
}

impl PackedW {
    pub fn bytes(&self) -> usize {
        match self {
            PackedW::Bf16(p) => p.bytes(),
            PackedW::F32(p) => p.bytes(),
        }
    }
    pub fn data_len(&self) -> usize {
        match self {
            PackedW::Bf16(p) => p.data_len(),
            PackedW::F32(p) => p.data_len(),
        }
    }
    /// # Safety
    /// As [`Packed::move_to`].
    pub unsafe fn move_to(&mut self, dst: *mut f32) {
        match self {
            PackedW::Bf16(p) => p.move_to(dst),
            PackedW::F32(p) => p.move_to(dst),
        }
    }
    /// Row `j` of the `[n, k]` view into `out[..k]` (an embedding gathered from the table).
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        match self {
            PackedW::Bf16(p) => p.row_into(j, out),
            PackedW::F32(p) => p.row_into(j, out),
        }
    }
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

/// The row window of `w` each part of a `MatMulParts` reads: parts are consecutive row ranges
/// as wide as their output buffers (`widths`, in part order). No allocation: the bf16 decode
/// path walks it per call.
pub(crate) fn part_windows(
    w: WRef,
    widths: impl Iterator<Item = usize>,
) -> impl Iterator<Item = WRef> {
    widths.scan(0, move |row, n| {
        let pw = WRef {
            offset: w.offset + *row * w.cols,
            rows: n,
            ..w
        };
        *row += n;
        Some(pw)
    })
}

/// The windows to pack, to f32 panels ([`PackedF32`]) with `panels`, else to bf16.
pub(crate) fn plan(m: &Manifest, panels: bool) -> Plan {
    let total = m.weights.len() + m.derived.len();
    let mut windows: Vec<PackKey> = Vec::new();
    let mut embeds: Vec<WRef> = Vec::new();
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
                    if let Some(g) = epi.norm.and_then(|n| n.gain) {
                        need(&g, &mut f32_needed);
                    }
                }
                Instr::MatMulParts { w, parts, .. } => {
                    // Each part is packed as a matmul of its own over its rows of `w`.
                    let widths = parts.iter().map(|p| m.buffers[p.out as usize].cols);
                    for pw in part_windows(*w, widths) {
                        for (id, off) in resolve(m, &pw) {
                            windows.push(key(id, off, &pw, false));
                        }
                    }
                    for b in parts.iter().filter_map(|p| p.epi.bias) {
                        need(&b, &mut f32_needed);
                    }
                }
                Instr::MatMulKN { w, .. } => {
                    for (id, off) in resolve(m, w) {
                        windows.push(key(id, off, w, true));
                    }
                }
                Instr::Embed { table, .. } if panels => embeds.push(*table),
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
    // Panels: a table gathers from them where it is also a matmul's weight (tied), else
    // from its own f32 rows, of which a run only touches its tokens' pages.
    for t in embeds {
        for (id, off) in resolve(m, &t) {
            if windows.binary_search(&key(id, off, &t, false)).is_err() {
                if let Some(f) = f32_needed.get_mut(id as usize) {
                    *f = true;
                }
            }
        }
    }
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

/// Packs the windows of [`Plan`] while the model loads, each weight as early as possible and
/// its f32 data (an owned copy, or the checkpoint's pages) dropped right after when nothing
/// reads it any more: the peak memory of a load stays near the f32 checkpoint's own size
/// instead of adding every derived weight in f32 and then in bf16.
pub(crate) struct Packer<'a> {
    m: &'a Manifest,
    plan: &'a Plan,
    checkpoint: &'a Weights,
    pool: &'a rayon::ThreadPool,
    /// By weight id: the last non-`PerIter` derived recipe that reads it.
    last_use: Vec<Option<usize>>,
    has_windows: Vec<bool>,
    /// Pack to f32 panels, not bf16.
    panels: bool,
    pub packed: HashMap<PackKey, PackedW>,
}

impl<'a> Packer<'a> {
    pub fn new(
        m: &'a Manifest,
        plan: &'a Plan,
        checkpoint: &'a Weights,
        pool: &'a rayon::ThreadPool,
        panels: bool,
    ) -> Self {
        let total = m.weights.len() + m.derived.len();
        let mut last_use = vec![None; total];
        for (k, d) in m.derived.iter().enumerate() {
            if !matches!(d.recipe, Derive::PerIter { .. }) {
                for s in d.recipe.sources() {
                    if let Some(l) = last_use.get_mut(s.weight as usize) {
                        *l = Some(k);
                    }
                }
            }
        }
        let mut has_windows = vec![false; total];
        for w in &plan.windows {
            has_windows[w.0 as usize] = true;
        }
        Packer {
            m,
            plan,
            checkpoint,
            pool,
            last_use,
            has_windows,
            panels,
            packed: HashMap::with_capacity(plan.windows.len()),
        }
    }

    /// The checkpoint tensors no derived weight reads (before deriving).
    pub fn checkpoint_weights(&mut self, bound: &mut [Bound]) -> Result<()> {
        for id in 0..self.m.weights.len() {
            if self.last_use[id].is_none() {
                self.finish(id, bound)?;
            }
        }
        Ok(())
    }

    /// After derived weight `k` was computed: it, unless a later recipe reads it, and every
    /// weight whose last reader it was.
    pub fn derived(&mut self, k: usize, bound: &mut [Bound]) -> Result<()> {
        let id = self.m.weights.len() + k;
        if self.last_use[id].is_none() {
            self.finish(id, bound)?;
        }
        let d = &self.m.derived[k];
        if !matches!(d.recipe, Derive::PerIter { .. }) {
            for s in d.recipe.sources() {
                let s = s.weight as usize;
                if self.last_use[s] == Some(k) {
                    self.finish(s, bound)?;
                }
            }
        }
        Ok(())
    }

    /// Pack every window of weight `id`, then drop its f32 data unless the program reads it.
    fn finish(&mut self, id: usize, bound: &mut [Bound]) -> Result<()> {
        let m = self.m;
        let name = match m.weights.get(id) {
            Some(d) => d.name.as_str(),
            None => m.derived[id - m.weights.len()].name.as_str(),
        };
        if self.has_windows[id] {
            let lo = self.plan.windows.partition_point(|w| (w.0 as usize) < id);
            for &key in self.plan.windows[lo..]
                .iter()
                .take_while(|w| w.0 as usize == id)
            {
                let p = self.pack_window(key, name, &bound[id])?;
                self.packed.insert(key, p);
            }
        }
        if self.plan.f32_needed[id] {
            return Ok(());
        }
        // Packed, or only a derived weight's source: the program never reads it in f32.
        if bound[id].is_mapped() {
            bound[id].release_pages();
        }
        bound[id] = Bound::Owned(crate::mem::AVec::new());
        if id < m.weights.len() {
            self.checkpoint.release(name);
        }
        Ok(())
    }

    fn pack_window(&self, key: PackKey, name: &str, b: &Bound) -> Result<PackedW> {
        let (id, off, rows, cols, kn) = key;
        let (n, kk) = if kn { (cols, rows) } else { (rows, cols) };
        // Element (j, i) of the [n, k] view at this index of the weight's row-major data.
        let at = |j: usize, i: usize| off + if kn { i * n + j } else { j * kk + i };
        if self.panels {
            let what = format!("packed copy of weight `{name}`");
            if b.len() > 0 || id as usize >= self.m.weights.len() {
                let src = b.as_slice();
                return PackedF32::build(n, kk, &what, self.pool, |j, i| src[at(j, i)])
                    .map(PackedW::F32);
            }
            let get = self.checkpoint.f32_reader(name).ok_or_else(|| {
                RuntimeError::Config(format!("weight `{name}` cannot be read as f32"))
            })?;
            return PackedF32::build(n, kk, &what, self.pool, |j, i| get(at(j, i)))
                .map(PackedW::F32);
        }
        let what = format!("bf16 copy of weight `{name}`");
        if b.len() > 0 || id as usize >= self.m.weights.len() {
            let src = b.as_slice();
            Packed::build(n, kk, &what, self.pool, |j, i| to_bf16(src[at(j, i)])).map(PackedW::Bf16)
        } else {
            let get = self.checkpoint.bf16_reader(name).ok_or_else(|| {
                RuntimeError::Config(format!("weight `{name}` cannot be read as bf16"))
            })?;
            Packed::build(n, kk, &what, self.pool, |j, i| get(at(j, i))).map(PackedW::Bf16)
        }
    }
}
