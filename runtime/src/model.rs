//! [`Artifact`] (the file `loopc build` writes) and [`Model`] (an artifact bound to weights,
//! validated, with its kernels loaded and a thread pool).

use crate::artifact::{
    self, Arg, BufId, EwIn, ExitPolicy, Instr, KernelSpec, Manifest, Rows, StateInit, WRef,
};
use crate::dtype::{LoadOptions, WeightDtype};
use crate::error::{Result, RuntimeError};
use crate::kernels::Kernels;
use crate::session::Session;
use crate::weights::{Bound, Weights};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// A decoded artifact: the manifest and the kernels' shared object.
#[derive(Debug, Clone, PartialEq)]
pub struct Artifact {
    pub manifest: Manifest,
    pub object: Vec<u8>,
}

impl Artifact {
    pub fn new(manifest: Manifest, object: Vec<u8>) -> Self {
        Artifact { manifest, object }
    }

    /// Read and decode an artifact file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| RuntimeError::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            RuntimeError::Artifact(m) => RuntimeError::Artifact(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// Decode artifact bytes (see [`crate::artifact`] for the layout).
    pub fn from_bytes(bytes: impl AsRef<[u8]>) -> Result<Self> {
        let bytes = bytes.as_ref();
        // Bound the two length fields before handing the bytes to `artifact::decode`, so that
        // absurd lengths are reported as truncation rather than overflowing.
        let len_at = |at: usize| -> Option<u64> {
            bytes
                .get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        };
        if bytes.len() >= 16 && bytes[..8] == artifact::MAGIC[..] {
            let n = len_at(8).unwrap_or(0);
            if n > bytes.len() as u64 {
                return Err(RuntimeError::Artifact(format!(
                    "artifact truncated: manifest length {n} exceeds the file size {}",
                    bytes.len()
                )));
            }
            if let Some(m) = len_at(16 + n as usize) {
                if m > bytes.len() as u64 {
                    return Err(RuntimeError::Artifact(format!(
                        "artifact truncated: object length {m} exceeds the file size {}",
                        bytes.len()
                    )));
                }
            }
        }
        let (manifest, obj) = artifact::decode(bytes).map_err(RuntimeError::Artifact)?;
        Ok(Artifact {
            manifest,
            object: obj.to_vec(),
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        artifact::encode(&self.manifest, &self.object)
    }
}

/// A model ready to run: manifest validated, weights bound, kernels loaded.
/// Cheap to clone (shared); create any number of [`Session`]s from it.
#[derive(Clone)]
pub struct Model {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) manifest: Manifest,
    pub(crate) weights: Vec<Bound>,
    pub(crate) kernels: Kernels,
    pub(crate) pool: rayon::ThreadPool,
    /// Serves the parallel loops of calls of a few rows (decode steps); see [`crate::par`].
    /// `None` with one thread or `LOOPC_SPIN=0`.
    pub(crate) team: Option<crate::par::Team>,
    pub(crate) threads: usize,
    /// Token ids must be below this (rows of the smallest embedding table, else `vocab`).
    pub(crate) token_limit: usize,
    /// Per-kernel argument requirements, checked per call size.
    pub(crate) needs: Vec<Vec<Need>>,
    /// By weight id: the windows iteration `t` reads for a per-iteration weight (empty for
    /// every other weight).
    pub(crate) iter_variants: Vec<Vec<WRef>>,
    /// Iterations the per-iteration weights cover (`None` without any).
    pub(crate) iter_limit: Option<usize>,
    /// The matmul weight windows packed at load: bf16 copies (`--dtype bf16`), or f32 panels
    /// (`dtype::PackedW`); empty when f32 weights stay row-major.
    pub(crate) packed: HashMap<crate::dtype::PackKey, crate::dtype::PackedW>,
    pub(crate) dtype: WeightDtype,
    /// Where each activation buffer lives in a workspace (`exec::buffer_plan`).
    pub(crate) buffer_plan: crate::exec::BufferPlan,
    pub(crate) device: crate::Device,
    /// The device side (weights on the GPU) when `device` is not the CPU.
    pub(crate) dev: Option<crate::cuda::exec::DevModel>,
    // Holds the small weights behind the windows in `weights` and `packed`.
    pub(crate) _arena: crate::mem::AVec,
    // Keeps the memory maps behind `weights` alive; dropped after `weights`.
    pub(crate) _checkpoint: Weights,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("model", &self.inner.manifest.model)
            .field("threads", &self.inner.threads)
            .field("weights", &self.inner.weights.len())
            .field("kernels", &self.inner.kernels.len())
            .finish()
    }
}

impl Model {
    /// Validate the manifest, bind the weights and load the kernels. The thread count comes
    /// from `LOOPC_THREADS` (default: the available cores).
    pub fn new(artifact: Artifact, weights: Weights) -> Result<Self> {
        Self::with_options(artifact, weights, &LoadOptions::default())
    }

    /// [`Model::new`] with explicit [`LoadOptions`] (threads, weight dtype).
    pub fn with_options(artifact: Artifact, weights: Weights, opts: &LoadOptions) -> Result<Self> {
        let threads = match opts.threads {
            Some(t) => t,
            None => Self::env_threads()?,
        };
        Self::build(artifact, weights, threads, opts.dtype, opts.device, None)
    }

    /// A `--target cuda` artifact on a device of the caller's own: `make` gets the image's
    /// entries in launch-index order and returns the device the executor then drives (as
    /// [`Device::Cuda`](crate::Device::Cuda)). For tests of the executor with the compiler's
    /// device code on a simulator; not a stable API.
    #[doc(hidden)]
    pub fn with_gpu(
        artifact: Artifact,
        weights: Weights,
        threads: usize,
        make: impl FnOnce(&[crate::artifact::CudaKernel]) -> Result<Arc<dyn crate::device::Gpu>>,
    ) -> Result<Self> {
        Self::build(
            artifact,
            weights,
            threads,
            WeightDtype::F32,
            crate::Device::Cuda(0),
            Some(Box::new(make)),
        )
    }

    fn env_threads() -> Result<usize> {
        Ok(match std::env::var("LOOPC_THREADS") {
            Ok(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    RuntimeError::Config(format!(
                        "LOOPC_THREADS must be a positive integer, got `{v}`"
                    ))
                })?,
            Err(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }

    /// [`Artifact::load`] + [`Weights::open`] + [`Model::new`].
    pub fn load(artifact: impl AsRef<Path>, weights: impl AsRef<Path>) -> Result<Self> {
        Self::new(Artifact::load(artifact)?, Weights::open(weights)?)
    }

    /// As [`Model::new`] with an explicit thread count.
    pub fn with_threads(artifact: Artifact, weights: Weights, threads: usize) -> Result<Self> {
        Self::build(
            artifact,
            weights,
            threads,
            WeightDtype::F32,
            crate::Device::Cpu,
            None,
        )
    }

    fn build(
        artifact: Artifact,
        weights: Weights,
        threads: usize,
        dtype: WeightDtype,
        device: crate::Device,
        custom: Option<crate::cuda::CustomGpu<'_>>,
    ) -> Result<Self> {
        if threads == 0 {
            return Err(RuntimeError::Config(
                "the thread count must be at least 1".into(),
            ));
        }
        let Artifact { manifest, object } = artifact;
        crate::cuda::check_target(&manifest, device)?;
        let needs = validate(&manifest)?;
        // The device comes first: no driver or no device fails before the weights are read.
        let (image, gpu, kernels) = match device {
            crate::Device::Cpu => (
                None,
                None,
                Kernels::load_with_gemm(&object, &manifest.kernels, manifest.host_gemm.as_ref())?,
            ),
            crate::Device::Cuda(_) | crate::Device::CudaEmulated => {
                if dtype != WeightDtype::F32 {
                    return Err(RuntimeError::Unsupported(format!(
                        "{dtype} weights (the device runs f32)"
                    )));
                }
                let image = match &manifest.cuda {
                    Some(i) => i.clone(),
                    None => crate::cuda::emulated_image(&manifest),
                };
                crate::cuda::check_program(&manifest, &image)?;
                let kernels = match device {
                    crate::Device::CudaEmulated => Kernels::load(&object, &manifest.kernels)?,
                    _ => Kernels::load(&[], &[])?,
                };
                let gpu = crate::cuda::open(device, custom, &image, &object, Some(&kernels))?;
                (Some(image), Some(gpu), kernels)
            }
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("loopc-{i}"))
            .build()
            .map_err(|e| RuntimeError::Config(format!("cannot start {threads} threads: {e}")))?;
        // A real device runs the kernels; the host's parallel loops (loading, packing) are
        // rayon's, and a spinning team would only hold a core.
        let host_runs = !matches!(device, crate::Device::Cuda(_));
        let buffer_plan = crate::exec::buffer_plan(&manifest)?;
        let team = match crate::par::spin_from_env()? {
            true if threads > 1 && host_runs => {
                Some(crate::par::Team::new(threads - 1).map_err(|e| {
                    RuntimeError::Config(format!("cannot start {threads} threads: {e}"))
                })?)
            }
            _ => None,
        };
        // f32 panels where the packed kernels run: on the CPU, with AVX-512, and without an
        // artifact GEMM (which reads the row-major layout).
        let pack_f32 = dtype == WeightDtype::F32
            && matches!(device, crate::Device::Cpu)
            && kernels.gemm.is_none()
            && crate::matmul::packed::enabled()?;
        let plan = (dtype == WeightDtype::Bf16 || pack_f32)
            .then(|| crate::dtype::plan(&manifest, pack_f32));
        let lazy = plan.as_ref().map_or(&[][..], |p| &p.lazy[..]);
        let mut bound = weights.bind(&manifest.weights, &pool, lazy)?;
        let mut packed = match &plan {
            Some(p) => {
                let mut packer = crate::dtype::Packer::new(&manifest, p, &weights, &pool, pack_f32);
                packer.checkpoint_weights(&mut bound)?;
                derive_weights(&manifest, &mut bound, &pool, &mut |k, b| {
                    packer.derived(k, b)
                })?;
                packer.packed
            }
            None => {
                derive_weights(&manifest, &mut bound, &pool, &mut |_, _| Ok(()))?;
                HashMap::new()
            }
        };
        let arena = compact_small(&mut bound, &mut packed)?;
        // Loading freed every small tensor's first home (f32 copies, packed blocks moved into
        // the arena); give those heap pages back (d=256 with f32 panels: 133 → 117 MB resident
        // after load).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: no allocator invariant is involved; it only returns free memory.
        unsafe {
            libc::malloc_trim(0);
        }
        let token_limit = embed_limit(&manifest);
        let mut iter_variants = vec![Vec::new(); manifest.weights.len()];
        let mut iter_limit: Option<usize> = None;
        for d in &manifest.derived {
            let v = match &d.recipe {
                artifact::Derive::PerIter { srcs } => {
                    iter_limit = Some(iter_limit.map_or(srcs.len(), |l| l.min(srcs.len())));
                    srcs.clone()
                }
                _ => Vec::new(),
            };
            iter_variants.push(v);
        }
        let device_model = match (gpu, &image) {
            (Some(g), Some(img)) => {
                Some(crate::cuda::exec::DevModel::new(g, img, &manifest, &bound)?)
            }
            _ => None,
        };
        Ok(Model {
            inner: Arc::new(Inner {
                manifest,
                weights: bound,
                kernels,
                pool,
                team,
                threads,
                token_limit,
                needs,
                iter_variants,
                iter_limit,
                packed,
                dtype,
                buffer_plan,
                device,
                dev: device_model,
                _arena: arena,
                _checkpoint: weights,
            }),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    pub fn threads(&self) -> usize {
        self.inner.threads
    }

    /// Where the model runs.
    pub fn device(&self) -> crate::Device {
        self.inner.device
    }

    /// Token ids accepted by this model are `0..token_limit()`.
    pub fn token_limit(&self) -> usize {
        self.inner.token_limit
    }

    /// How matmul weights are stored ([`LoadOptions::dtype`]).
    pub fn dtype(&self) -> WeightDtype {
        self.inner.dtype
    }

    /// Whether the f32 matmul weights were packed into panels at load (`dtype::PackedW`).
    pub fn packs_f32(&self) -> bool {
        self.inner
            .packed
            .values()
            .any(|p| matches!(p, crate::dtype::PackedW::F32(_)))
    }

    /// `(bytes used in place from the checkpoint mapping, bytes converted/copied to f32 or
    /// packed, to bf16 or to f32 panels)`.
    pub fn weight_bytes(&self) -> (usize, usize) {
        let mut m = 0;
        let mut o: usize = self.inner.packed.values().map(|p| p.bytes()).sum();
        for w in &self.inner.weights {
            if w.is_mapped() {
                m += 4 * w.len();
            } else {
                o += 4 * w.len();
            }
        }
        (m, o)
    }

    /// The f32 data bound to weight `id` (`None` if out of range; empty for a weight held
    /// only in bf16, see [`WeightDtype::Bf16`]).
    pub fn weight(&self, id: usize) -> Option<&[f32]> {
        self.inner.weights.get(id).map(|w| w.as_slice())
    }

    /// A new session (empty KV cache, position 0).
    pub fn session(&self) -> Session {
        Session::new(self.clone())
    }

    /// A session over `n` independent sequences processed together.
    pub fn batch_session(&self, n: usize) -> crate::BatchSession {
        crate::batch::BatchSession::new(self.clone(), n)
    }
}

/// Append the derived weights (validated by [`validate`]) to the bound checkpoint tensors.
/// `after(k, bound)` runs once derived weight `k` is in `bound` (the bf16 packing hook).
fn derive_weights(
    m: &Manifest,
    bound: &mut Vec<Bound>,
    pool: &rayon::ThreadPool,
    after: &mut dyn FnMut(usize, &mut [Bound]) -> Result<()>,
) -> Result<()> {
    use rayon::prelude::*;
    const ROWS: usize = 64;
    // Intermediate results (the scaled Q weight a gain is then folded into) and checkpoint
    // tensors converted to f32 that only fed derived weights are not read by the program: free
    // them (mapped tensors cost no memory once unused).
    let nw = m.weights.len();
    let mut used = vec![false; nw + m.derived.len()];
    let mut mark = |list: &[Instr]| {
        for i in list {
            for w in i.weights() {
                if let Some(u) = used.get_mut(w.weight as usize) {
                    *u = true;
                }
            }
        }
    };
    mark(&m.program.prelude);
    if let Some(r) = &m.program.recur {
        mark(&r.body);
        mark(&r.router);
    }
    mark(&m.program.coda);
    // What a used per-iteration weight selects is used too (derived after their sources, so
    // one pass from the back reaches every level).
    for (i, d) in m.derived.iter().enumerate().rev() {
        if let (true, artifact::Derive::PerIter { srcs }) = (used[nw + i], &d.recipe) {
            for s in srcs {
                used[s.weight as usize] = true;
            }
        }
    }
    // The last derived weight computed from each derived weight: an intermediate the program
    // does not read is freed right after it, so chains (gain fold, then the gate/up interleave)
    // never hold every level at once.
    // Checkpoint tensors too: copied f32 tensors (the default binding) that only feed derived
    // weights are freed as soon as their last reader is done, not after every derived weight
    // exists (at d=1024 that held ~270 MB of sources next to their derived copies).
    let mut last_reader = vec![None; nw + m.derived.len()];
    for (j, d) in m.derived.iter().enumerate() {
        for s in d.recipe.sources() {
            if let Some(l) = last_reader.get_mut(s.weight as usize) {
                *l = Some(j);
            }
        }
    }
    for (j, d) in m.derived.iter().enumerate() {
        if matches!(d.recipe, artifact::Derive::PerIter { .. }) {
            // Selected per iteration by the interpreter: no data of its own.
            bound.push(Bound::Owned(crate::mem::AVec::new()));
            after(j, bound)?;
            continue;
        }
        let (rows, cols) = d.recipe.out_shape().map_err(RuntimeError::manifest)?;
        let mut v = crate::mem::AVec::zeroed(rows * cols, &d.name)?;
        {
            let all: &Vec<Bound> = bound;
            let get =
                |w: &WRef| &all[w.weight as usize].as_slice()[w.offset..w.offset + w.rows * w.cols];
            let out = v.as_mut_slice();
            pool.install(|| {
                out.par_chunks_mut((ROWS * cols).max(1))
                    .enumerate()
                    .for_each(|(i, chunk)| d.recipe.compute_rows(&get, i * ROWS, chunk));
            });
        }
        bound.push(Bound::Owned(v));
        after(j, bound)?;
        for s in d.recipe.sources() {
            let w = s.weight as usize;
            if !used[w] && last_reader[w] == Some(j) {
                give_back(&mut bound[w]);
            }
        }
    }
    if m.derived.is_empty() {
        return Ok(());
    }
    for (i, b) in bound.iter_mut().enumerate() {
        if !used[i] {
            give_back(b);
        }
    }
    Ok(())
}

/// Frees a weight the program never reads: an owned copy is dropped; a mapped tensor's pages
/// are given back (deriving read them; they would otherwise stay resident next to their
/// derived copies).
fn give_back(b: &mut Bound) {
    if b.is_mapped() {
        b.release_pages();
    } else {
        *b = Bound::Owned(crate::mem::AVec::new());
    }
}

/// Moves every owned weight (f32, or bf16-packed) smaller than a huge-page allocation into one
/// arena on transparent huge pages, in order; returns the arena (empty when there is nothing
/// to gain). Each small tensor was its own heap block on 4 KiB pages: at d=256, where every
/// layer weight is under 1 MiB, f32 decode streamed them 6–25 % slower (200–220 against
/// 232–252 tok/s, alternating binaries).
fn compact_small(
    bound: &mut [Bound],
    packed: &mut HashMap<crate::dtype::PackKey, crate::dtype::PackedW>,
) -> Result<crate::mem::AVec> {
    const LINE: usize = 16;
    let fits = |len: usize| len > 0 && len * 4 < crate::mem::HUGE_THRESHOLD;
    let small = |b: &Bound| matches!(b, Bound::Owned(v) if fits(v.len()));
    let mut keys: Vec<_> = packed
        .iter()
        .filter(|(_, p)| fits(p.data_len()))
        .map(|(k, _)| *k)
        .collect();
    keys.sort_unstable();
    let total: usize = bound
        .iter()
        .filter(|b| small(b))
        .map(|b| b.len())
        .chain(keys.iter().map(|k| packed[k].data_len()))
        .map(|len| len.next_multiple_of(LINE))
        .sum();
    if total * 4 < crate::mem::HUGE_THRESHOLD {
        return Ok(crate::mem::AVec::new());
    }
    let mut arena = crate::mem::AVec::zeroed(total, "the arena of small weights")?;
    let base = arena.as_mut_ptr();
    let mut off = 0;
    for b in bound.iter_mut().filter(|b| small(b)) {
        let len = b.len();
        if let Bound::Owned(v) = b {
            // SAFETY: `off + len ≤ total` (summed above over the same tensors), windows
            // 64-byte aligned and disjoint; the arena lives in the model next to `bound`.
            unsafe { v.move_to(base.add(off)) };
        }
        off += len.next_multiple_of(LINE);
    }
    for k in &keys {
        let p = packed.get_mut(k).expect("key listed above");
        let len = p.data_len();
        // SAFETY: as above; the arena lives in the model next to `packed`.
        unsafe { p.move_to(base.add(off)) };
        off += len.next_multiple_of(LINE);
    }
    Ok(arena)
}

fn embed_limit(m: &Manifest) -> usize {
    let mut lim: Option<usize> = None;
    let mut visit = |list: &[Instr]| {
        for i in list {
            if let Instr::Embed { table, .. } = i {
                lim = Some(lim.map_or(table.rows, |l: usize| l.min(table.rows)));
            }
        }
    };
    visit(&m.program.prelude);
    if let Some(r) = &m.program.recur {
        visit(&r.body);
    }
    visit(&m.program.coda);
    lim.unwrap_or(m.vocab)
}

/// What a kernel pointer must point at, checked statically and per call size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Need {
    /// One row of `c` floats per work row (`S` rows).
    PerRow(usize),
    /// At least `c` floats (a broadcast vector, a gain).
    Vector(usize),
    /// A rotary table for `head_dim`.
    Table(usize),
    /// A KV cache slot of `width` floats per row.
    Cache(usize),
}

fn kernel_needs(spec: &KernelSpec) -> Vec<Need> {
    match spec {
        KernelSpec::Elementwise {
            cols,
            inputs,
            outputs,
            ..
        } => inputs
            .iter()
            .map(|i| match i {
                EwIn::Rows => Need::PerRow(*cols),
                EwIn::Broadcast => Need::Vector(*cols),
                EwIn::PerRow => Need::PerRow(1),
            })
            .chain(outputs.iter().map(|_| Need::PerRow(*cols)))
            .collect(),
        KernelSpec::RmsNorm {
            cols,
            residual,
            gain,
            ..
        } => {
            let mut v = vec![Need::PerRow(*cols)];
            if *residual {
                v.push(Need::PerRow(*cols));
            }
            if *gain {
                v.push(Need::Vector(*cols));
            }
            if *residual {
                v.push(Need::PerRow(*cols));
            }
            v.push(Need::PerRow(*cols));
            v
        }
        KernelSpec::Rope {
            heads, head_dim, ..
        } => {
            vec![
                Need::PerRow(heads * head_dim),
                Need::Table(*head_dim),
                Need::Table(*head_dim),
            ]
        }
        KernelSpec::Glu { cols, .. } => vec![Need::PerRow(2 * cols), Need::PerRow(*cols)],
        KernelSpec::InvRms { cols, .. } => vec![Need::PerRow(*cols), Need::PerRow(1)],
        KernelSpec::HeadRmsNorm {
            heads, head_dim, ..
        } => vec![Need::PerRow(heads * head_dim); 2],
        KernelSpec::RopeBias {
            heads, head_dim, ..
        } => vec![
            Need::PerRow(heads * head_dim),
            Need::Vector(heads * head_dim),
            Need::Table(*head_dim),
            Need::Table(*head_dim),
        ],
        KernelSpec::Attention {
            heads,
            kv_heads,
            head_dim,
            ..
        } => vec![
            Need::PerRow(heads * head_dim),
            Need::Cache(kv_heads * head_dim),
            Need::Cache(kv_heads * head_dim),
            Need::PerRow(heads * head_dim),
        ],
        KernelSpec::LayerNorm { cols, .. } => {
            vec![
                Need::PerRow(*cols),
                Need::Vector(*cols),
                Need::Vector(*cols),
                Need::PerRow(*cols),
            ]
        }
    }
}

fn elems(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b))
}

fn instr_name(i: &Instr) -> &'static str {
    match i {
        Instr::Embed { .. } => "Embed",
        Instr::MatMul { .. } => "MatMul",
        Instr::Concat { .. } => "Concat",
        Instr::Copy { .. } => "Copy",
        Instr::KvWrite { .. } => "KvWrite",
        Instr::Kernel { .. } => "Kernel",
        Instr::MatMulKN { .. } => "MatMulKN",
        Instr::SliceCols { .. } => "SliceCols",
        Instr::PosEmbed { .. } => "PosEmbed",
        Instr::Sinusoidal { .. } => "Sinusoidal",
        Instr::TimingSignal { .. } => "TimingSignal",
        Instr::MatMulParts { .. } => "MatMulParts",
    }
}

/// Check every id, shape and size relation the executor relies on, so that a malformed manifest
/// is an error rather than out-of-bounds memory access. Returns the per-kernel [`Need`]s.
pub(crate) fn validate(m: &Manifest) -> Result<Vec<Vec<Need>>> {
    let nb = m.buffers.len();
    let weight_elems: Vec<usize> = m
        .weights
        .iter()
        .map(|w| {
            elems(&w.shape).ok_or_else(|| {
                RuntimeError::manifest(format!(
                    "weight `{}` has an overflowing shape {:?}",
                    w.name, w.shape
                ))
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    let mut weight_elems = weight_elems;
    for (i, d) in m.derived.iter().enumerate() {
        let bad = |msg: String| {
            RuntimeError::manifest(format!("derived weight #{i} `{}`: {msg}", d.name))
        };
        for src in d.recipe.sources() {
            // Sources come before: checkpoint tensors or earlier derived weights.
            let n = weight_elems.get(src.weight as usize).ok_or_else(|| {
                bad(format!(
                    "source weight #{} is not defined before it",
                    src.weight
                ))
            })?;
            let end = src
                .rows
                .checked_mul(src.cols)
                .and_then(|x| x.checked_add(src.offset));
            if end.is_none_or(|e| e > *n) {
                return Err(bad(format!(
                    "source window [{} x {}] at {} overruns weight #{}",
                    src.rows, src.cols, src.offset, src.weight
                )));
            }
        }
        for src in d.recipe.sources() {
            let inner = m
                .derived
                .get((src.weight as usize).wrapping_sub(m.weights.len()));
            if inner.is_some_and(|x| matches!(x.recipe, artifact::Derive::PerIter { .. })) {
                return Err(bad(
                    "reads a per-iteration weight (the compiler distributes such recipes)".into(),
                ));
            }
        }
        let (r, c) = d.recipe.out_shape().map_err(bad)?;
        if elems(&d.shape) != Some(r * c) {
            return Err(bad(format!(
                "declared shape {:?} but the recipe gives [{r}, {c}]",
                d.shape
            )));
        }
        weight_elems.push(r * c);
    }
    for b in &m.buffers {
        if let Rows::Fixed(n) = b.rows {
            if n.checked_mul(b.cols).is_none() {
                return Err(RuntimeError::manifest(format!(
                    "buffer `{}` is too large",
                    b.name
                )));
            }
        }
    }
    for (i, t) in m.rope_tables.iter().enumerate() {
        if t.head_dim == 0 || t.head_dim % 2 != 0 || !(t.base.is_finite() && t.base > 0.0) {
            return Err(RuntimeError::manifest(format!(
                "rope table #{i} needs an even positive head_dim and a positive base (got head_dim {}, base {})",
                t.head_dim, t.base
            )));
        }
    }
    for s in &m.kv_sites {
        if s.kv_heads.checked_mul(s.head_dim).is_none() {
            return Err(RuntimeError::manifest(format!(
                "KV site `{}` is too large",
                s.name
            )));
        }
    }
    let mut needs = Vec::with_capacity(m.kernels.len());
    for (k, d) in m.kernels.iter().enumerate() {
        let bad =
            |msg: String| RuntimeError::manifest(format!("kernel #{k} (`{}`): {msg}", d.symbol));
        match &d.spec {
            KernelSpec::Elementwise {
                inputs,
                ops,
                outputs,
                ..
            } => {
                crate::ew::validate(ops, inputs.len()).map_err(bad)?;
                if let Some(o) = outputs.iter().find(|&&o| o as usize >= ops.len()) {
                    return Err(bad(format!("output refers to op {o} of {}", ops.len())));
                }
            }
            KernelSpec::Rope {
                head_dim, heads, ..
            }
            | KernelSpec::RopeBias {
                head_dim, heads, ..
            } => {
                if *head_dim % 2 != 0 || *head_dim == 0 || *heads == 0 {
                    return Err(bad(
                        "rope needs heads > 0 and an even, positive head_dim".into()
                    ));
                }
            }
            KernelSpec::Attention {
                heads,
                kv_heads,
                head_dim,
                ..
            } => {
                if *kv_heads == 0 || *heads == 0 || *head_dim == 0 || heads % kv_heads != 0 {
                    return Err(bad(format!("attention needs heads ({heads}) to be a positive multiple of kv_heads ({kv_heads})")));
                }
            }
            KernelSpec::RmsNorm { .. } | KernelSpec::LayerNorm { .. } => {}
            KernelSpec::InvRms { cols, .. } => {
                if *cols == 0 {
                    return Err(bad("inv_rms needs cols > 0".into()));
                }
            }
            KernelSpec::Glu { ops, .. } => {
                crate::ew::validate(ops, 2).map_err(|e| bad(format!("gated unit: {e}")))?;
            }
            KernelSpec::HeadRmsNorm {
                heads, head_dim, ..
            } => {
                if *heads == 0 || *head_dim == 0 {
                    return Err(bad("head rmsnorm needs heads > 0 and head_dim > 0".into()));
                }
            }
        }
        needs.push(kernel_needs(&d.spec));
    }
    if m.program.logits as usize >= nb {
        return Err(RuntimeError::manifest(format!(
            "the logits buffer #{} does not exist",
            m.program.logits
        )));
    }
    let lb = &m.buffers[m.program.logits as usize];
    if lb.rows != Rows::Tokens || lb.cols != m.vocab {
        return Err(RuntimeError::manifest(format!(
            "the logits buffer `{}` must be [tokens, vocab = {}], it is [{:?}, {}]",
            lb.name, m.vocab, lb.rows, lb.cols
        )));
    }

    let v = Validator {
        m,
        weight_elems: &weight_elems,
        needs: &needs,
    };
    v.list("prelude", &m.program.prelude, false)?;
    v.no_per_iter("prelude", &m.program.prelude)?;
    v.no_per_iter("coda", &m.program.coda)?;
    if let Some(r) = &m.program.recur {
        v.list("recur body", &r.body, true)?;
        v.list("recur router", &r.router, true)?;
        match (&r.exit, r.router_out) {
            (
                ExitPolicy::ExpertChoice {
                    alpha,
                    capacity,
                    threshold,
                    max_steps,
                },
                Some(b),
            ) => {
                let rb = v.buf("recur", b)?;
                if rb.rows != Rows::Tokens
                    || rb.cols != 1
                    || !alpha.is_finite()
                    || !(0.0..=1.0).contains(threshold)
                    || *max_steps == 0
                    || capacity.iter().any(|c| !(*c > 0.0 && *c <= 1.0))
                {
                    return Err(RuntimeError::manifest(
                        "recur: expert choice needs a [tokens, 1] router, a finite alpha, a threshold in [0, 1], capacities in (0, 1] and max ≥ 1",
                    ));
                }
            }
            (ExitPolicy::TokenChoice { alpha, max_steps }, Some(b)) => {
                let rb = v.buf("recur", b)?;
                if rb.rows != Rows::Tokens || rb.cols != *max_steps || !alpha.is_finite() {
                    return Err(RuntimeError::manifest(format!(
                        "recur: token choice needs a [tokens, {max_steps}] router (one logit per depth) and a finite alpha"
                    )));
                }
            }
            (ExitPolicy::ExpertChoice { .. } | ExitPolicy::TokenChoice { .. }, None) => {
                return Err(RuntimeError::manifest(
                    "recur: a routing exit needs a router",
                ));
            }
            (_, Some(_)) => {
                return Err(RuntimeError::manifest(
                    "recur: a router needs an expert- or token-choice exit",
                ));
            }
            _ => {}
        }
        let ctx = "recur";
        let st = v.buf(ctx, r.state)?;
        let nx = v.buf(ctx, r.next)?;
        if r.state == r.next {
            return Err(RuntimeError::manifest(
                "recur: `state` and `next` must be different buffers",
            ));
        }
        if st.rows != Rows::Tokens || nx.rows != Rows::Tokens || st.cols != nx.cols {
            return Err(RuntimeError::manifest(format!(
                "recur: state `{}` and next `{}` must both be [tokens, n] with the same n",
                st.name, nx.name
            )));
        }
        match &r.init {
            StateInit::From(b) => {
                let src = v.buf(ctx, *b)?;
                if src.rows != st.rows || src.cols != st.cols {
                    return Err(RuntimeError::manifest(format!(
                        "recur: init buffer `{}` must have the state's shape [tokens, {}]",
                        src.name, st.cols
                    )));
                }
            }
            StateInit::TruncNormal { std, scale, .. } => {
                if !(std.is_finite() && *std >= 0.0 && scale.is_finite()) {
                    return Err(RuntimeError::manifest(format!(
                        "recur: bad truncated-normal init (std {std}, scale {scale})"
                    )));
                }
            }
            StateInit::Zeros => {}
        }
        if let ExitPolicy::Converge { threshold, .. } = &r.exit {
            if threshold.is_nan() {
                return Err(RuntimeError::manifest(
                    "recur: the convergence threshold is NaN",
                ));
            }
        }
        let bad = match &r.exit {
            ExitPolicy::Criterion { threshold, min_steps, every, max_steps, .. } => {
                (threshold.is_nan() || *every == 0 || *max_steps == 0 || min_steps > max_steps).then(|| {
                    format!("recur: bad exit criterion (threshold {threshold}, min {min_steps}, every {every}, max {max_steps})")
                })
            }
            ExitPolicy::Gate { q, max_steps, .. } => (q.is_nan() || *max_steps == 0 || r.gate.is_none())
                .then(|| "recur: a gate exit needs a gate buffer, q and max ≥ 1".to_string()),
            ExitPolicy::Act { eps, max_steps } => (!(*eps > 0.0 && *eps < 1.0) || *max_steps == 0 || r.gate.is_none())
                .then(|| "recur: an ACT exit needs a gate buffer, 0 < eps < 1 and max ≥ 1".to_string()),
            _ => None,
        };
        if let Some(msg) = bad {
            return Err(RuntimeError::manifest(msg));
        }
        if r.readout
            .iter()
            .any(|&i| i as usize >= m.program.coda.len())
        {
            return Err(RuntimeError::manifest(
                "recur: readout index past the end of the coda",
            ));
        }
        if let Some(g) = r.gate {
            let gb = v.buf(ctx, g)?;
            if gb.rows != Rows::Tokens || gb.cols != 1 {
                return Err(RuntimeError::manifest(format!(
                    "recur: gate buffer `{}` must be [tokens, 1]",
                    gb.name
                )));
            }
        }
    }
    v.list("coda", &m.program.coda, false)?;
    Ok(needs)
}

struct Validator<'a> {
    m: &'a Manifest,
    weight_elems: &'a [usize],
    needs: &'a [Vec<Need>],
}

impl<'a> Validator<'a> {
    /// Per-iteration weights exist only inside the recurrence.
    fn no_per_iter(&self, ctx: &str, list: &[Instr]) -> Result<()> {
        let nw = self.m.weights.len();
        for i in list {
            for w in i.weights() {
                if let Some(d) = self.m.derived.get((w.weight as usize).wrapping_sub(nw)) {
                    if matches!(d.recipe, artifact::Derive::PerIter { .. }) {
                        return Err(RuntimeError::manifest(format!(
                            "{ctx}: per-iteration weight `{}` read outside the recurrence",
                            d.name
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn buf(&self, ctx: &str, b: BufId) -> Result<&'a artifact::BufferDecl> {
        self.m.buffers.get(b as usize).ok_or_else(|| {
            RuntimeError::manifest(format!(
                "{ctx}: buffer #{b} does not exist ({} buffers)",
                self.m.buffers.len()
            ))
        })
    }

    fn wref(&self, ctx: &str, w: &WRef) -> Result<()> {
        let nw = self.m.weights.len();
        let (name, shape) = match self.m.weights.get(w.weight as usize) {
            Some(decl) => (&decl.name, &decl.shape),
            None => match self.m.derived.get((w.weight as usize).wrapping_sub(nw)) {
                Some(d) => (&d.name, &d.shape),
                None => {
                    return Err(RuntimeError::manifest(format!(
                        "{ctx}: weight #{} does not exist",
                        w.weight
                    )))
                }
            },
        };
        let end = w
            .rows
            .checked_mul(w.cols)
            .and_then(|n| n.checked_add(w.offset));
        match end {
            Some(e) if e <= self.weight_elems[w.weight as usize] => Ok(()),
            _ => Err(RuntimeError::manifest(format!(
                "{ctx}: window [{} x {}] at offset {} exceeds weight `{}` of shape {:?}",
                w.rows, w.cols, w.offset, name, shape
            ))),
        }
    }

    fn list(&self, part: &str, list: &[Instr], in_body: bool) -> Result<()> {
        for (i, ins) in list.iter().enumerate() {
            let ctx = format!("{part} instruction #{i} ({})", instr_name(ins));
            let err = |msg: String| RuntimeError::manifest(format!("{ctx}: {msg}"));
            match ins {
                Instr::Embed { table, out } => {
                    self.wref(&ctx, table)?;
                    let o = self.buf(&ctx, *out)?;
                    if o.rows != Rows::Tokens || o.cols != table.cols {
                        return Err(err(format!(
                            "output `{}` must be [tokens, {}]",
                            o.name, table.cols
                        )));
                    }
                }
                Instr::MatMul { x, w, out, .. } | Instr::MatMulKN { x, w, out } => {
                    self.wref(&ctx, w)?;
                    let xb = self.buf(&ctx, *x)?;
                    let ob = self.buf(&ctx, *out)?;
                    if x == out {
                        return Err(err("input and output must be different buffers".into()));
                    }
                    // `MatMul` multiplies by Wᵀ (`Linear` layout), `MatMulKN` by W (`Conv1D`).
                    let (k, n, t) = if matches!(ins, Instr::MatMul { .. }) {
                        (w.cols, w.rows, "ᵀ")
                    } else {
                        (w.rows, w.cols, "")
                    };
                    if xb.cols != k || ob.cols != n || xb.rows != ob.rows {
                        return Err(err(format!(
                            "`{}` [{:?}, {}] · W[{}, {}]{t} does not fit `{}` [{:?}, {}]",
                            xb.name, xb.rows, xb.cols, w.rows, w.cols, ob.name, ob.rows, ob.cols
                        )));
                    }
                    if let Instr::MatMul { epi, .. } = ins {
                        if let Some(s) = epi.row_scale {
                            let sb = self.buf(&ctx, s)?;
                            if sb.cols != 1 || sb.rows != xb.rows || s == *out {
                                return Err(err(format!(
                                    "epilogue row scale `{}` must be [{:?}, 1] and not the output",
                                    sb.name, xb.rows
                                )));
                            }
                        }
                        if let Some(r) = epi.residual {
                            let rb = self.buf(&ctx, r)?;
                            if rb.cols != ob.cols || rb.rows != ob.rows || r == *out {
                                return Err(err(format!(
                                    "epilogue residual `{}` must be shaped like `{}` and not be the output",
                                    rb.name, ob.name
                                )));
                            }
                        }
                        if let Some(b) = &epi.bias {
                            self.wref(&ctx, b)?;
                            if b.rows * b.cols != n {
                                return Err(err(format!(
                                    "epilogue bias [{}, {}] must have {n} elements",
                                    b.rows, b.cols
                                )));
                            }
                        }
                        self.rope_epilogue(&ctx, epi, ob)?;
                        if let Some(nm) = &epi.norm {
                            if epi.glu.is_some() || nm.eps.is_nan() || nm.eps < 0.0 {
                                return Err(err(
                                    "a norm epilogue needs eps ≥ 0 and no gated unit".into()
                                ));
                            }
                            if let Some(g) = &nm.gain {
                                self.wref(&ctx, g)?;
                                if g.rows * g.cols != n || !nm.normalize {
                                    return Err(err(format!(
                                        "norm epilogue gain [{}, {}] must have {n} elements and normalize",
                                        g.rows, g.cols
                                    )));
                                }
                            }
                            if let Some(q) = nm.inv_rms {
                                let qb = self.buf(&ctx, q)?;
                                let distinct = q != *out
                                    && q != *x
                                    && Some(q) != epi.row_scale
                                    && Some(q) != epi.residual;
                                if qb.cols != 1 || qb.rows != ob.rows || !distinct {
                                    return Err(err(format!(
                                        "norm epilogue inv_rms `{}` must be [{:?}, 1] and differ from the matmul's other buffers",
                                        qb.name, ob.rows
                                    )));
                                }
                            }
                        }
                        if let Some(g) = &epi.glu {
                            let gb = self.buf(&ctx, g.out)?;
                            let distinct = g.out != *out
                                && g.out != *x
                                && Some(g.out) != epi.row_scale
                                && Some(g.out) != epi.residual;
                            if n % 2 != 0 || gb.cols * 2 != n || gb.rows != ob.rows || !distinct {
                                return Err(err(format!(
                                    "gated epilogue output `{}` must be [{:?}, {}] and differ from the matmul's other buffers",
                                    gb.name, ob.rows, n / 2
                                )));
                            }
                            let unary = crate::ew::operands(&g.act) == [0]
                                && !matches!(g.act, artifact::EwOp::Input(_));
                            if g.block == 0 || !unary {
                                return Err(err(format!(
                                    "gated epilogue needs a block ≥ 1 and a unary activation of its gate, got block {} and {:?}",
                                    g.block, g.act
                                )));
                            }
                        }
                    }
                }
                Instr::Concat { inputs, out } => {
                    let ob = self.buf(&ctx, *out)?;
                    let mut total = 0usize;
                    for b in inputs {
                        let ib = self.buf(&ctx, *b)?;
                        if b == out {
                            return Err(err("the output cannot also be an input".into()));
                        }
                        if ib.rows != ob.rows {
                            return Err(err(format!(
                                "input `{}` has different rows than `{}`",
                                ib.name, ob.name
                            )));
                        }
                        total += ib.cols;
                    }
                    if total != ob.cols {
                        return Err(err(format!(
                            "inputs have {total} columns in all, output `{}` has {}",
                            ob.name, ob.cols
                        )));
                    }
                }
                Instr::Copy { src, dst } => {
                    let s = self.buf(&ctx, *src)?;
                    let d = self.buf(&ctx, *dst)?;
                    if s.rows != d.rows || s.cols != d.cols {
                        return Err(err(format!(
                            "`{}` and `{}` have different shapes",
                            s.name, d.name
                        )));
                    }
                }
                Instr::KvWrite { site, k, v } => {
                    let st = self
                        .m
                        .kv_sites
                        .get(*site as usize)
                        .ok_or_else(|| err(format!("KV site #{site} does not exist")))?;
                    if st.in_loop && !in_body {
                        return Err(err(format!(
                            "KV site `{}` is in the loop but written outside the recurrence",
                            st.name
                        )));
                    }
                    let width = st.kv_heads * st.head_dim;
                    for b in [k, v] {
                        let bb = self.buf(&ctx, *b)?;
                        if bb.rows != Rows::Tokens || bb.cols != width {
                            return Err(err(format!(
                                "`{}` must be [tokens, kv_heads·head_dim = {width}] for site `{}`",
                                bb.name, st.name
                            )));
                        }
                    }
                }
                Instr::SliceCols { src, start, out } => {
                    let sb = self.buf(&ctx, *src)?;
                    let ob = self.buf(&ctx, *out)?;
                    if src == out
                        || sb.rows != ob.rows
                        || start.checked_add(ob.cols).is_none_or(|e| e > sb.cols)
                    {
                        return Err(err(format!(
                            "columns {start}..+{} of `{}` do not fit",
                            ob.cols, sb.name
                        )));
                    }
                }
                Instr::PosEmbed { table, out } => {
                    self.wref(&ctx, table)?;
                    let o = self.buf(&ctx, *out)?;
                    if o.rows != Rows::Tokens || o.cols != table.cols {
                        return Err(err(format!(
                            "output `{}` must be [tokens, {}]",
                            o.name, table.cols
                        )));
                    }
                }
                Instr::Sinusoidal { base, out } => {
                    let o = self.buf(&ctx, *out)?;
                    if o.rows != Rows::Tokens || !(base.is_finite() && *base > 1.0) {
                        return Err(err(format!(
                            "output `{}` must be [tokens, n] and the base > 1",
                            o.name
                        )));
                    }
                }
                Instr::TimingSignal {
                    min_timescale: lo,
                    max_timescale: hi,
                    step,
                    out,
                } => {
                    let o = self.buf(&ctx, *out)?;
                    if o.rows != Rows::Tokens
                        || !(*lo > 0.0 && lo.is_finite() && *hi >= *lo && hi.is_finite())
                    {
                        return Err(err(format!(
                            "output `{}` must be [tokens, n] and the timescales 0 < min <= max",
                            o.name
                        )));
                    }
                    if *step && !in_body {
                        return Err(err(
                            "the step timing signal is only defined inside the recurrence".into(),
                        ));
                    }
                }
                Instr::MatMulParts { x, w, parts } => self.matmul_parts(&ctx, *x, w, parts)?,
                Instr::Kernel { kernel, args } => {
                    let kd = self
                        .m
                        .kernels
                        .get(*kernel as usize)
                        .ok_or_else(|| err(format!("kernel #{kernel} does not exist")))?;
                    let needs = &self.needs[*kernel as usize];
                    if args.len() != kd.spec.num_ptrs() || args.len() != needs.len() {
                        return Err(err(format!(
                            "kernel `{}` takes {} pointers, the call passes {}",
                            kd.symbol,
                            kd.spec.num_ptrs(),
                            args.len()
                        )));
                    }
                    for (j, (a, need)) in args.iter().zip(needs).enumerate() {
                        self.arg(&ctx, j, a, *need, in_body)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// `MatMulParts`: the parts' widths add up to the weight's rows, every destination has the
    /// rows of `x` and is written by no other part, and no operand (x, a row scale, a residual)
    /// is one of the destinations, since the parts are written while those are read.
    /// A rotary epilogue: an existing table of the same head size, whole heads in the
    /// output, one position per token row, no gated unit or norm.
    fn rope_epilogue(
        &self,
        ctx: &str,
        epi: &artifact::Epilogue,
        ob: &artifact::BufferDecl,
    ) -> Result<()> {
        let Some(rp) = &epi.rope else {
            return Ok(());
        };
        let err = |msg: String| RuntimeError::manifest(format!("{ctx}: {msg}"));
        let tab = self
            .m
            .rope_tables
            .get(rp.table as usize)
            .ok_or_else(|| err(format!("rope epilogue table #{} does not exist", rp.table)))?;
        if tab.head_dim != rp.head_dim
            || rp.head_dim == 0
            || !ob.cols.is_multiple_of(rp.head_dim)
            || ob.rows != Rows::Tokens
        {
            return Err(err(format!(
                "rope epilogue: table #{} (head_dim {}) must match head_dim {}, which must divide the [tokens, n] output `{}` ({} columns)",
                rp.table, tab.head_dim, rp.head_dim, ob.name, ob.cols
            )));
        }
        if epi.glu.is_some() || epi.norm.is_some() {
            return Err(err(
                "a rope epilogue is not combined with a gated unit or a norm".into(),
            ));
        }
        Ok(())
    }

    fn matmul_parts(
        &self,
        ctx: &str,
        x: BufId,
        w: &WRef,
        parts: &[artifact::MatPart],
    ) -> Result<()> {
        let err = |msg: String| RuntimeError::manifest(format!("{ctx}: {msg}"));
        self.wref(ctx, w)?;
        let xb = self.buf(ctx, x)?;
        if parts.is_empty() || parts.len() > artifact::MAX_MATMUL_PARTS {
            return Err(err(format!(
                "{} output parts (1 to {} allowed)",
                parts.len(),
                artifact::MAX_MATMUL_PARTS
            )));
        }
        if xb.cols != w.cols {
            return Err(err(format!(
                "`{}` [{:?}, {}] · W[{}, {}]ᵀ: the inner sizes differ",
                xb.name, xb.rows, xb.cols, w.rows, w.cols
            )));
        }
        let outs: Vec<BufId> = parts.iter().map(|p| p.out).collect();
        let mut total = 0usize;
        for (i, p) in parts.iter().enumerate() {
            let ob = self.buf(ctx, p.out)?;
            if ob.rows != xb.rows || p.out == x || outs[..i].contains(&p.out) {
                return Err(err(format!(
                    "part {i} `{}` must have the rows of `{}` and be a buffer of its own",
                    ob.name, xb.name
                )));
            }
            total += ob.cols;
            if let Some(s) = p.epi.row_scale {
                let sb = self.buf(ctx, s)?;
                if sb.cols != 1 || sb.rows != xb.rows || outs.contains(&s) {
                    return Err(err(format!(
                        "part {i}: epilogue row scale `{}` must be [{:?}, 1] and not an output",
                        sb.name, xb.rows
                    )));
                }
            }
            if let Some(r) = p.epi.residual {
                let rb = self.buf(ctx, r)?;
                if rb.cols != ob.cols || rb.rows != ob.rows || outs.contains(&r) {
                    return Err(err(format!(
                        "part {i}: epilogue residual `{}` must be shaped like `{}` and not be an output",
                        rb.name, ob.name
                    )));
                }
            }
            if let Some(b) = &p.epi.bias {
                self.wref(ctx, b)?;
                if b.rows * b.cols != ob.cols {
                    return Err(err(format!(
                        "part {i}: epilogue bias [{}, {}] must have {} elements",
                        b.rows, b.cols, ob.cols
                    )));
                }
            }
            if p.epi.glu.is_some() || p.epi.norm.is_some() {
                return Err(err(format!(
                    "part {i}: a part's epilogue has no gated unit or norm"
                )));
            }
            self.rope_epilogue(&format!("{ctx}: part {i}"), &p.epi, ob)?;
        }
        if total != w.rows {
            return Err(err(format!(
                "the parts have {total} columns in all, the weight W[{}, {}] has {} rows",
                w.rows, w.cols, w.rows
            )));
        }
        Ok(())
    }

    fn arg(&self, ctx: &str, j: usize, a: &Arg, need: Need, in_body: bool) -> Result<()> {
        let err = |msg: String| RuntimeError::manifest(format!("{ctx}: argument {j}: {msg}"));
        match (a, need) {
            (Arg::Buf(b), Need::PerRow(c)) => {
                let bb = self.buf(ctx, *b)?;
                if bb.cols != c {
                    return Err(err(format!(
                        "buffer `{}` has {} columns, the kernel expects {c}",
                        bb.name, bb.cols
                    )));
                }
            }
            (Arg::Buf(b), Need::Vector(c)) => {
                let bb = self.buf(ctx, *b)?;
                if let Rows::Fixed(n) = bb.rows {
                    if n * bb.cols < c {
                        return Err(err(format!(
                            "buffer `{}` holds {} values, the kernel reads {c}",
                            bb.name,
                            n * bb.cols
                        )));
                    }
                }
            }
            (Arg::Weight(w), Need::Vector(c)) => {
                self.wref(ctx, w)?;
                if w.rows * w.cols < c {
                    return Err(err(format!(
                        "weight window holds {} values, the kernel reads {c}",
                        w.rows * w.cols
                    )));
                }
            }
            (Arg::Weight(w), Need::PerRow(c)) => {
                self.wref(ctx, w)?;
                if w.cols != c {
                    return Err(err(format!(
                        "weight window has {} columns, the kernel expects {c}",
                        w.cols
                    )));
                }
            }
            (Arg::RopeCos(t) | Arg::RopeSin(t), Need::Table(hd)) => {
                let tab = self
                    .m
                    .rope_tables
                    .get(*t as usize)
                    .ok_or_else(|| err(format!("rope table #{t} does not exist")))?;
                if tab.head_dim != hd {
                    return Err(err(format!(
                        "rope table #{t} is for head_dim {}, the kernel uses {hd}",
                        tab.head_dim
                    )));
                }
            }
            (Arg::KCache(s) | Arg::VCache(s), Need::Cache(width)) => {
                let st = self
                    .m
                    .kv_sites
                    .get(*s as usize)
                    .ok_or_else(|| err(format!("KV site #{s} does not exist")))?;
                if st.kv_heads * st.head_dim != width {
                    return Err(err(format!(
                        "KV site `{}` stores {} values per row, the kernel expects {width}",
                        st.name,
                        st.kv_heads * st.head_dim
                    )));
                }
                if st.in_loop && !in_body {
                    return Err(err(format!(
                        "KV site `{}` is in the loop but read outside the recurrence",
                        st.name
                    )));
                }
            }
            (a, n) => {
                return Err(err(format!(
                    "{a:?} cannot be passed where the kernel expects {n:?}"
                )))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod arena_tests {
    use super::*;
    use crate::mem::AVec;

    fn owned(len: usize, seed: f32) -> Bound {
        let mut v = AVec::zeroed(len, "test").unwrap();
        for (i, x) in v.as_mut_slice().iter_mut().enumerate() {
            *x = seed + i as f32;
        }
        Bound::Owned(v)
    }

    /// Small owned tensors and small packed weights move into one arena, keep their values,
    /// get disjoint 64-byte aligned windows; large, empty and mapped ones stay where they are.
    #[test]
    fn small_weights_move_into_one_arena_unchanged() {
        let big = crate::mem::HUGE_THRESHOLD / 4;
        let mut bound = vec![
            owned(1 << 18, 1.0), // 1 MiB
            owned(17, 2.0),      // not a multiple of a line
            owned(big, 3.0),     // too large: stays
            Bound::Owned(AVec::new()),
            owned(3 << 18, 4.0), // 3 MiB
        ];
        let mapped_src = [5f32; 8];
        bound.push(Bound::Mapped {
            ptr: mapped_src.as_ptr(),
            len: mapped_src.len(),
        });
        let want: Vec<Vec<f32>> = bound.iter().map(|b| b.as_slice().to_vec()).collect();
        let w: Vec<f32> = (0..64 * 96).map(|i| (i % 13) as f32 - 6.0).collect();
        let mut packed = HashMap::new();
        packed.insert(
            (7u32, 0usize, 64usize, 96usize, false),
            crate::dtype::PackedW::Bf16(crate::bf16::Packed::from_f32(&w, 64, 96)),
        );
        let words = |p: &crate::dtype::PackedW| match p {
            crate::dtype::PackedW::Bf16(b) => b.words().to_vec(),
            crate::dtype::PackedW::F32(_) => unreachable!("a bf16 weight"),
        };
        let want_packed = words(packed.values().next().unwrap());
        let arena = compact_small(&mut bound, &mut packed).unwrap();
        assert!(arena.len() >= (1 << 18) + 17 + (3 << 18));
        let lo = arena.as_ptr() as usize;
        let hi = lo + arena.len() * 4;
        let mut windows = vec![];
        for (i, b) in bound.iter().enumerate() {
            assert_eq!(b.as_slice(), &want[i][..], "tensor {i}");
            let p = b.as_slice().as_ptr() as usize;
            let inside = (lo..hi).contains(&p);
            assert_eq!(inside, [0, 1, 4].contains(&i), "tensor {i}");
            assert_eq!(b.is_mapped(), i == 5, "tensor {i}");
            if inside {
                assert_eq!(p % 64, 0);
                windows.push((p, p + 4 * b.len()));
            }
        }
        let p = packed.values().next().unwrap();
        let crate::dtype::PackedW::Bf16(p) = p else {
            unreachable!("a bf16 weight")
        };
        assert_eq!(p.words(), &want_packed[..]);
        let pp = p.words().as_ptr() as usize;
        assert!((lo..hi).contains(&pp) && pp.is_multiple_of(64));
        windows.push((pp, pp + 4 * p.data_len()));
        windows.sort_unstable();
        assert!(windows.windows(2).all(|w| w[0].1 <= w[1].0), "{windows:?}");
    }

    /// Below a huge page's worth of small tensors there is no arena.
    #[test]
    fn few_small_weights_stay_apart() {
        let mut bound = vec![owned(100, 1.0), owned(1 << 10, 2.0)];
        let arena = compact_small(&mut bound, &mut HashMap::new()).unwrap();
        assert_eq!(arena.len(), 0);
        assert!(bound.iter().all(|b| matches!(b, Bound::Owned(_))));
    }
}
