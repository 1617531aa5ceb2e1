//! Checkpoint loading: memory-mapped safetensors files, bound to the manifest's [`WeightDecl`]s.
//!
//! [`Weights::open`] accepts one `.safetensors` file, or a directory holding `model.safetensors`,
//! or a sharded checkpoint (`model.safetensors.index.json` plus its shards, or just a set of
//! `*.safetensors` files). Nothing is read eagerly: tensors are located through the headers and
//! bound by name when a [`crate::Model`] is built.
//!
//! Binding: every tensor is converted to an owned f32 copy, 64-byte aligned and, from 4 MiB, on
//! transparent huge pages, the file's pages given back as each slice is copied (so memory is
//! not held twice). `LOOPC_HUGEPAGE_WEIGHTS=0` uses F32 tensors in place from the mapping
//! instead, when 4-byte aligned (zero copy: faster loads, pages shared between processes, but
//! safetensors aligns data to 8 bytes only, and the kernels then run on split loads and 4 KiB
//! pages). Extra tensors are ignored.

use crate::artifact::WeightDecl;
use crate::error::{Result, RuntimeError};
use crate::mem::AVec;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

enum Backing {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

struct WeightFile {
    path: PathBuf,
    backing: Backing,
    /// This file's tensors (the global index may prefer another shard for a name).
    entries: HashMap<String, Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range within the file.
    start: usize,
    end: usize,
}

/// An opened checkpoint: one or more safetensors files, mapped read-only.
pub struct Weights {
    files: Vec<WeightFile>,
    index: HashMap<String, Entry>,
    /// What was opened, for messages.
    source: PathBuf,
}

/// Information about one tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("source", &self.source)
            .field("files", &self.files.len())
            .field("tensors", &self.index.len())
            .finish()
    }
}

/// Elements converted between two releases of the source pages (16 MiB of f32).
const RELEASE_SLICE: usize = 1 << 22;

/// Whether F32 tensors are used in place from the file mapping (`LOOPC_HUGEPAGE_WEIGHTS=0`)
/// rather than copied into the runtime's storage (the default). The copy is 64-byte aligned
/// (safetensors aligns data to 8 bytes only: the bench checkpoints' tensors all sit at 40 mod
/// 64, so every 64-byte load of a mapped weight spans two lines) and, from 4 MiB, on
/// transparent huge pages. Measured on d=1024, alternating on a busy machine: f32 prefill-128
/// 192–204 → 203–221 tok/s, decode 11.4–12.6 → 12.6–13.5 tok/s.
fn map_f32_in_place() -> bool {
    std::env::var("LOOPC_HUGEPAGE_WEIGHTS").is_ok_and(|v| v == "0")
}

impl Weights {
    /// Open a `.safetensors` file or a checkpoint directory (see the module docs).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| RuntimeError::io(path, e))?;
        let files: Vec<PathBuf> = if meta.is_dir() {
            Self::dir_files(path)?
        } else {
            vec![path.to_path_buf()]
        };
        let mut w = Weights {
            files: Vec::new(),
            index: HashMap::new(),
            source: path.to_path_buf(),
        };
        for f in &files {
            let file = std::fs::File::open(f).map_err(|e| RuntimeError::io(f, e))?;
            // SAFETY: read-only private mapping. The checkpoint must not be modified while the
            // model is alive (as with every mmap-based loader).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| RuntimeError::io(f, e))?;
            #[cfg(unix)]
            {
                let _ = mmap.advise(memmap2::Advice::WillNeed);
                #[cfg(target_os = "linux")]
                if mmap.len() >= crate::mem::HUGE_THRESHOLD {
                    let _ = mmap.advise(memmap2::Advice::HugePage);
                }
            }
            w.add_file(f.clone(), Backing::Mmap(mmap))?;
        }
        // With an index, the weight map decides which shard owns a name.
        if meta.is_dir() {
            let idx = path.join("model.safetensors.index.json");
            if idx.is_file() {
                w.apply_index(&idx)?;
            }
        }
        Ok(w)
    }

    /// Weights from safetensors bytes held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let mut w = Weights {
            files: Vec::new(),
            index: HashMap::new(),
            source: "<memory>".into(),
        };
        w.add_file("<memory>".into(), Backing::Owned(bytes))?;
        Ok(w)
    }

    /// Weights from named f32 tensors (for tests and programmatic use).
    pub fn from_f32<'a>(
        tensors: impl IntoIterator<Item = (&'a str, Vec<usize>, &'a [f32])>,
    ) -> Result<Self> {
        let mut list: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, shape, data) in tensors {
            let n: usize = shape.iter().product();
            if n != data.len() {
                return Err(RuntimeError::Config(format!(
                    "tensor `{name}`: shape {shape:?} needs {n} values, got {}",
                    data.len()
                )));
            }
            list.push((
                name.to_string(),
                shape,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = list
            .iter()
            .map(|(n, s, d)| {
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), d)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| RuntimeError::Config(format!("tensor `{n}`: {e}")))
            })
            .collect::<Result<_>>()?;
        let bytes = safetensors::serialize(views, None)
            .map_err(|e| RuntimeError::Config(format!("cannot serialize tensors: {e}")))?;
        Self::from_bytes(bytes)
    }

    fn dir_files(dir: &Path) -> Result<Vec<PathBuf>> {
        let single = dir.join("model.safetensors");
        let idx = dir.join("model.safetensors.index.json");
        if idx.is_file() {
            let text = std::fs::read_to_string(&idx).map_err(|e| RuntimeError::io(&idx, e))?;
            let map = parse_index(&idx, &text)?;
            let mut shards: Vec<String> = map.values().cloned().collect();
            shards.sort();
            shards.dedup();
            let mut out = Vec::new();
            for s in shards {
                let p = dir.join(&s);
                if Path::new(&s).components().count() != 1 || !p.is_file() {
                    return Err(RuntimeError::Checkpoint {
                        path: idx.clone(),
                        msg: format!(
                            "the index names shard `{s}`, which is not a file in {}",
                            dir.display()
                        ),
                    });
                }
                out.push(p);
            }
            if out.is_empty() {
                return Err(RuntimeError::Checkpoint {
                    path: idx,
                    msg: "the index lists no shards".into(),
                });
            }
            return Ok(out);
        }
        if single.is_file() {
            return Ok(vec![single]);
        }
        let rd = std::fs::read_dir(dir).map_err(|e| RuntimeError::io(dir, e))?;
        let mut out: Vec<PathBuf> = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| RuntimeError::io(dir, e))?;
            let p = ent.path();
            if p.is_file() && p.extension().is_some_and(|e| e == "safetensors") {
                out.push(p);
            }
        }
        out.sort();
        if out.is_empty() {
            return Err(RuntimeError::Checkpoint {
                path: dir.to_path_buf(),
                msg: "directory holds no model.safetensors, no model.safetensors.index.json and no *.safetensors file".into(),
            });
        }
        Ok(out)
    }

    fn add_file(&mut self, path: PathBuf, backing: Backing) -> Result<()> {
        let file_idx = self.files.len();
        let mut entries = HashMap::new();
        {
            let bytes = backing.bytes();
            let st = SafeTensors::deserialize(bytes).map_err(|e| RuntimeError::Checkpoint {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            let base = bytes.as_ptr() as usize;
            for (name, view) in st.iter() {
                let d = view.data();
                let start = d.as_ptr() as usize - base;
                let e = Entry {
                    file: file_idx,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + d.len(),
                };
                // First file wins unless an index says otherwise (apply_index).
                self.index
                    .entry(name.to_string())
                    .or_insert_with(|| e.clone());
                entries.insert(name.to_string(), e);
            }
        }
        self.files.push(WeightFile {
            path,
            backing,
            entries,
        });
        Ok(())
    }

    fn apply_index(&mut self, idx: &Path) -> Result<()> {
        let text = std::fs::read_to_string(idx).map_err(|e| RuntimeError::io(idx, e))?;
        let map = parse_index(idx, &text)?;
        for (name, shard) in map {
            let fi = self
                .files
                .iter()
                .position(|f| f.path.file_name().is_some_and(|n| n == shard.as_str()));
            let Some(fi) = fi else { continue };
            match self.files[fi].entries.get(&name) {
                Some(e) => {
                    self.index.insert(name, e.clone());
                }
                None => {
                    return Err(RuntimeError::Checkpoint {
                        path: idx.to_path_buf(),
                        msg: format!(
                            "the index maps `{name}` to shard `{shard}`, which does not contain it"
                        ),
                    })
                }
            }
        }
        Ok(())
    }

    /// Number of tensors in the checkpoint.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Names, dtypes and shapes of all tensors, sorted by name.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        let mut v: Vec<TensorInfo> = self
            .index
            .iter()
            .map(|(n, e)| TensorInfo {
                name: n.clone(),
                dtype: format!("{:?}", e.dtype),
                shape: e.shape.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Check one declaration against the checkpoint (name, dims, dtype, data size).
    fn check_one(&self, d: &WeightDecl) -> Result<&Entry> {
        let Some(e) = self.index.get(&d.name) else {
            return Err(RuntimeError::MissingWeight {
                name: d.name.clone(),
                expected: d.shape.clone(),
                origin: d.origin.clone(),
                similar: self.similar_names(&d.name, 3),
                also_missing: 0,
            });
        };
        let found_elems = checked_product(&e.shape);
        let expected_elems = checked_product(&d.shape);
        if e.shape != d.shape {
            return Err(RuntimeError::WeightShape {
                name: d.name.clone(),
                expected: d.shape.clone(),
                found: e.shape.clone(),
                expected_elems: expected_elems.unwrap_or(usize::MAX),
                found_elems: found_elems.unwrap_or(usize::MAX),
                origin: d.origin.clone(),
            });
        }
        let elem = match e.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F64 => 8,
            _ => {
                return Err(RuntimeError::WeightDtype {
                    name: d.name.clone(),
                    dtype: format!("{:?}", e.dtype),
                    origin: d.origin.clone(),
                })
            }
        };
        if found_elems.and_then(|n| n.checked_mul(elem)) != Some(e.end - e.start) {
            return Err(RuntimeError::Checkpoint {
                path: self.files[e.file].path.clone(),
                msg: format!(
                    "tensor `{}` has {} bytes of data for shape {:?}",
                    d.name,
                    e.end - e.start,
                    e.shape
                ),
            });
        }
        Ok(e)
    }

    /// Every problem that binding `decls` would hit (each missing tensor with similar names,
    /// each shape or dtype mismatch), in declaration order; empty when all bind.
    pub fn check(&self, decls: &[WeightDecl]) -> Vec<RuntimeError> {
        decls
            .iter()
            .filter_map(|d| self.check_one(d).err())
            .collect()
    }

    /// Bind every declaration by name, checking shapes and converting to f32; a declaration
    /// marked in `lazy` (read only as bf16, packed later from [`Weights::bf16_reader`]) is not
    /// converted: it stays in place when it is aligned f32 and is otherwise bound empty.
    pub(crate) fn bind(
        &self,
        decls: &[WeightDecl],
        pool: &rayon::ThreadPool,
        lazy: &[bool],
    ) -> Result<Vec<Bound>> {
        self.bind_with(decls, pool, lazy, map_f32_in_place())
    }

    /// [`Weights::bind`] with the F32 policy given: `map_f32` uses aligned F32 tensors in
    /// place, else they are copied like every other dtype.
    pub(crate) fn bind_with(
        &self,
        decls: &[WeightDecl],
        pool: &rayon::ThreadPool,
        lazy: &[bool],
        map_f32: bool,
    ) -> Result<Vec<Bound>> {
        let missing: Vec<&WeightDecl> = decls
            .iter()
            .filter(|d| !self.index.contains_key(&d.name))
            .collect();
        if let Some(first) = missing.first() {
            return Err(RuntimeError::MissingWeight {
                name: first.name.clone(),
                expected: first.shape.clone(),
                origin: first.origin.clone(),
                similar: self.similar_names(&first.name, 3),
                also_missing: missing.len() - 1,
            });
        }
        let mut out = Vec::with_capacity(decls.len());
        for (i, d) in decls.iter().enumerate() {
            let e = self.check_one(d)?;
            let n = checked_product(&e.shape).unwrap_or(usize::MAX);
            let bytes = &self.files[e.file].backing.bytes()[e.start..e.end];
            let what = || format!("weight `{}`", d.name);
            let bound = match e.dtype {
                Dtype::F32
                    if cfg!(target_endian = "little")
                        && map_f32
                        && (bytes.as_ptr() as usize)
                            .is_multiple_of(std::mem::align_of::<f32>()) =>
                {
                    Bound::Mapped {
                        ptr: bytes.as_ptr() as *const f32,
                        len: n,
                    }
                }
                _ if lazy.get(i).copied().unwrap_or(false) => Bound::Owned(AVec::new()),
                dt => {
                    let mut v = AVec::zeroed(n, &what())?;
                    // In slices, each slice's file pages given back once copied: they are not
                    // read again (kept, they raised d=1024's peak from 679 to 1359 MB), and a
                    // slice bounds what is resident twice to 16 MiB instead of the largest
                    // tensor (the 131 MB embedding at d=1024; not measured apart).
                    let elem = bytes.len() / n.max(1);
                    let mut i = 0;
                    while i < n {
                        let j = (i + RELEASE_SLICE).min(n);
                        convert(
                            dt,
                            &bytes[i * elem..j * elem],
                            &mut v.as_mut_slice()[i..j],
                            pool,
                        );
                        self.release_bytes(e.file, e.start + i * elem, e.start + j * elem);
                        i = j;
                    }
                    Bound::Owned(v)
                }
            };
            out.push(bound);
        }
        Ok(out)
    }

    /// Element `i` (row-major) of tensor `name` rounded to bf16, read from the checkpoint's
    /// own bytes: bf16 tensors are copied bit for bit, never widened to f32 first. `None` for a
    /// name that [`Weights::check`] would reject.
    pub(crate) fn bf16_reader(&self, name: &str) -> Option<impl Fn(usize) -> u16 + Sync + '_> {
        use crate::bf16::to_bf16;
        let e = self.index.get(name)?;
        let b = &self.files[e.file].backing.bytes()[e.start..e.end];
        let dt = e.dtype;
        matches!(dt, Dtype::F32 | Dtype::BF16 | Dtype::F16 | Dtype::F64).then_some(
            move |i: usize| match dt {
                Dtype::BF16 => u16::from_le_bytes([b[2 * i], b[2 * i + 1]]),
                _ => to_bf16(widen(dt, b, i)),
            },
        )
    }

    /// Element `i` (row-major) of tensor `name` as f32, read from the checkpoint's own bytes
    /// with the widening [`Weights::bind`] applies: the f32 panels are packed straight from
    /// the file, with no f32 copy of the tensor in between. `None` as for `bf16_reader`.
    pub(crate) fn f32_reader(&self, name: &str) -> Option<impl Fn(usize) -> f32 + Sync + '_> {
        let e = self.index.get(name)?;
        let b = &self.files[e.file].backing.bytes()[e.start..e.end];
        let dt = e.dtype;
        matches!(dt, Dtype::F32 | Dtype::BF16 | Dtype::F16 | Dtype::F64)
            .then_some(move |i: usize| widen(dt, b, i))
    }

    /// Give back the resident pages of tensor `name`'s bytes in a file mapping (after packing
    /// them, nothing reads them again).
    pub(crate) fn release(&self, name: &str) {
        let Some(e) = self.index.get(name) else {
            return;
        };
        self.release_bytes(e.file, e.start, e.end);
    }

    /// Give back the resident pages wholly inside bytes `start..end` of file `file`'s mapping.
    fn release_bytes(&self, file: usize, start: usize, end: usize) {
        if let Backing::Mmap(m) = &self.files[file].backing {
            let p = m.as_ptr() as usize;
            // SAFETY: the range lies inside a live read-only file mapping we own.
            unsafe { dont_need(p + start, p + end) };
        }
    }

    fn similar_names(&self, name: &str, k: usize) -> Vec<String> {
        let limit = (name.len() / 2).max(3);
        let mut scored: Vec<(usize, &String)> = self
            .index
            .keys()
            .filter(|n| {
                let short = n.len().min(name.len());
                levenshtein(name, n) <= limit
                    || (short >= 3 && (n.contains(name) || name.contains(n.as_str())))
            })
            .map(|n| {
                let d = levenshtein(name, n);
                // Names sharing the final component (".weight", ".bias", ...) rank first on ties.
                let tail_bonus = usize::from(name.rsplit('.').next() != n.rsplit('.').next());
                (d * 2 + tail_bonus, n)
            })
            .collect();
        scored.sort();
        scored.into_iter().take(k).map(|(_, n)| n.clone()).collect()
    }
}

/// [`Weights::check`] as messages, for reports such as `loopc check`.
pub fn check_weights(weights: &Weights, decls: &[WeightDecl]) -> Vec<String> {
    weights.check(decls).iter().map(|e| e.to_string()).collect()
}

fn checked_product(s: &[usize]) -> Option<usize> {
    s.iter().try_fold(1usize, |a, &b| a.checked_mul(b))
}

fn parse_index(path: &Path, text: &str) -> Result<HashMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let idx: Index = serde_json::from_str(text).map_err(|e| RuntimeError::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("cannot parse the index: {e}"),
    })?;
    Ok(idx.weight_map)
}

/// Drops the resident pages wholly inside addresses `start..end` of a read-only file mapping
/// (a later read faults the data back in from the file).
///
/// # Safety
/// The range lies inside a live read-only file mapping that nothing writes.
unsafe fn dont_need(start: usize, end: usize) {
    let page = 4096usize;
    let (start, end) = (start.next_multiple_of(page), end / page * page);
    if end > start {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
    }
}

/// A bound weight: f32 data, either in place in a mapping or owned.
pub(crate) enum Bound {
    Mapped {
        ptr: *const f32,
        len: usize,
    },
    /// Its own allocation, or a window of the model's weight arena (`model::compact_small`).
    Owned(AVec),
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bound({} floats, {})",
            self.len(),
            if self.is_mapped() { "mapped" } else { "owned" }
        )
    }
}

// SAFETY: Mapped points into a read-only mapping owned by the same Model as this value.
unsafe impl Send for Bound {}
unsafe impl Sync for Bound {}

impl Bound {
    pub(crate) fn len(&self) -> usize {
        match self {
            Bound::Mapped { len, .. } => *len,
            Bound::Owned(v) => v.len(),
        }
    }
    pub(crate) fn as_slice(&self) -> &[f32] {
        match self {
            // SAFETY: ptr/len describe f32 data in a live mapping (or dangling with len 0
            // impossible: mapped slices of length 0 still have a valid in-file pointer).
            Bound::Mapped { ptr, len } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
            Bound::Owned(v) => v.as_slice(),
        }
    }
    /// Drop the resident pages of a mapped tensor that nothing will read again (the mapping is
    /// file-backed and read-only, so a later read would simply fault the data back in).
    pub(crate) fn release_pages(&self) {
        if let Bound::Mapped { ptr, len } = self {
            // SAFETY: the range is this tensor's part of a live read-only mapping.
            unsafe { dont_need(*ptr as usize, *ptr as usize + len * 4) };
        }
    }

    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self, Bound::Mapped { .. })
    }
}

/// Element `i` of `src` (little-endian `dt`) as f32, for the element readers (`f32_reader`,
/// `bf16_reader`): `convert`'s widening, one element. `convert` keeps its own fixed-stride
/// loops: written through this function, loading d=1024 row-major measured 0.27–0.70 s against
/// 0.25–0.29 (alternating binaries).
#[inline]
fn widen(dt: Dtype, src: &[u8], i: usize) -> f32 {
    match dt {
        Dtype::BF16 => {
            f32::from_bits((u16::from_le_bytes([src[2 * i], src[2 * i + 1]]) as u32) << 16)
        }
        Dtype::F16 => f16_to_f32(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])),
        Dtype::F64 => f64::from_le_bytes(src[8 * i..8 * i + 8].try_into().unwrap()) as f32,
        _ => f32::from_le_bytes(src[4 * i..4 * i + 4].try_into().unwrap()),
    }
}

fn convert(dt: Dtype, src: &[u8], dst: &mut [f32], pool: &rayon::ThreadPool) {
    use rayon::prelude::*;
    let elem = match dt {
        Dtype::F32 => 4,
        Dtype::BF16 | Dtype::F16 => 2,
        Dtype::F64 => 8,
        _ => unreachable!("dtype checked by the caller"),
    };
    const CHUNK: usize = 1 << 16;
    let f = |(i, out): (usize, &mut [f32])| {
        let s = &src[i * CHUNK * elem..][..out.len() * elem];
        match dt {
            Dtype::F32 => {
                for (o, b) in out.iter_mut().zip(s.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::BF16 => {
                for (o, b) in out.iter_mut().zip(s.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                }
            }
            Dtype::F16 => {
                for (o, b) in out.iter_mut().zip(s.chunks_exact(2)) {
                    *o = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            Dtype::F64 => {
                for (o, b) in out.iter_mut().zip(s.chunks_exact(8)) {
                    *o = f64::from_le_bytes(b.try_into().unwrap()) as f32;
                }
            }
            _ => {}
        }
    };
    if dst.len() > CHUNK {
        pool.install(|| dst.par_chunks_mut(CHUNK).enumerate().for_each(f));
    } else {
        dst.chunks_mut(CHUNK).enumerate().for_each(f);
    }
}

/// IEEE half → single, exact (subnormals, infinities and NaNs included).
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // Subnormal: value = man · 2^-24.
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
    } else if exp == 0x1f {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 127 - 15) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let a = a.as_bytes();
    let b = b.as_bytes();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let c = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + c);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn pool() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
    }

    fn decl(name: &str, shape: &[usize]) -> WeightDecl {
        WeightDecl {
            name: name.into(),
            shape: shape.to_vec(),
            origin: "model.loop:3:5".into(),
        }
    }

    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "loopc-rt-test-{}-{}-{}",
            std::process::id(),
            tag,
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, dt, s, d)| (n.to_string(), TensorView::new(*dt, s.clone(), d).unwrap()))
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn f32b(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn binds_f32_bf16_f16() {
        let d = temp_dir("bind");
        let p = d.join("m.safetensors");
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let bf: Vec<u8> = [1.0f32, -2.5, 3.0]
            .iter()
            .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let h: Vec<u8> = [0x3c00u16, 0xc000, 0x0001, 0x7bff]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        write(
            &p,
            &[
                ("a.weight", Dtype::F32, vec![2, 3], f32b(&a)),
                ("b", Dtype::BF16, vec![3], bf),
                ("c", Dtype::F16, vec![4], h),
                ("unused", Dtype::I64, vec![1], vec![0; 8]),
            ],
        );
        let w = Weights::open(&p).unwrap();
        assert_eq!(w.len(), 4);
        let b = w
            .bind(
                &[decl("a.weight", &[2, 3]), decl("b", &[3]), decl("c", &[4])],
                &pool(),
                &[],
            )
            .unwrap();
        assert_eq!(b[0].as_slice(), &a[..]);
        // Copied by default into aligned storage; with the in-place policy, safetensors' 8-byte
        // padded header leaves F32 data aligned enough to be used from the mapping.
        let d3 = [decl("a.weight", &[2, 3])];
        let copied = w.bind_with(&d3, &pool(), &[], false).unwrap();
        assert!(!copied[0].is_mapped());
        assert_eq!(copied[0].as_slice().as_ptr() as usize % 64, 0);
        let mapped = w.bind_with(&d3, &pool(), &[], true).unwrap();
        assert!(mapped[0].is_mapped());
        assert_eq!(mapped[0].as_slice(), &a[..]);
        assert_eq!(b[1].as_slice(), &[1.0, -2.5, 3.0]);
        assert_eq!(b[2].as_slice(), &[1.0, -2.0, 2f32.powi(-24), 65504.0]);
        // Through a directory with model.safetensors.
        let p2 = d.join("model.safetensors");
        std::fs::rename(&p, &p2).unwrap();
        let w = Weights::open(&d).unwrap();
        assert_eq!(
            w.bind(&[decl("b", &[3])], &pool(), &[]).unwrap()[0].as_slice(),
            &[1.0, -2.5, 3.0]
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn missing_weight_error_names_origin_and_similar() {
        let d = temp_dir("missing");
        let p = d.join("m.safetensors");
        write(
            &p,
            &[
                (
                    "model.layers.0.self_attn.q_proj.weight",
                    Dtype::F32,
                    vec![2],
                    f32b(&[0.0, 1.0]),
                ),
                (
                    "model.layers.1.self_attn.q_proj.weight",
                    Dtype::F32,
                    vec![2],
                    f32b(&[0.0, 1.0]),
                ),
                (
                    "model.layers.0.mlp.up_proj.weight",
                    Dtype::F32,
                    vec![2],
                    f32b(&[0.0, 1.0]),
                ),
                ("lm_head.weight", Dtype::F32, vec![1], f32b(&[0.0])),
                ("zzzz", Dtype::F32, vec![1], f32b(&[0.0])),
            ],
        );
        let w = Weights::open(&p).unwrap();
        let err = w
            .bind(
                &[
                    decl("model.layers.0.self_attn.q_prj.weight", &[2, 1]),
                    decl("nothere", &[1]),
                ],
                &pool(),
                &[],
            )
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`model.layers.0.self_attn.q_prj.weight`"),
            "{msg}"
        );
        assert!(msg.contains("[2, 1]"), "{msg}");
        assert!(msg.contains("model.loop:3:5"), "{msg}");
        assert!(
            msg.contains("`model.layers.0.self_attn.q_proj.weight`"),
            "{msg}"
        );
        assert!(msg.contains("1 more"), "{msg}");
        assert!(!msg.contains("zzzz"), "{msg}");
        match err {
            RuntimeError::MissingWeight { similar, .. } => {
                assert!(similar.len() <= 3);
                assert_eq!(similar[0], "model.layers.0.self_attn.q_proj.weight");
            }
            e => panic!("{e}"),
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn wrong_shape_error_names_both() {
        let w = Weights::from_f32([("x", vec![2, 3], &[0f32; 6][..])]).unwrap();
        let msg = w
            .bind(&[decl("x", &[3, 2])], &pool(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("[2, 3]") && msg.contains("[3, 2]") && msg.contains("model.loop:3:5"),
            "{msg}"
        );
        let msg = w
            .bind(&[decl("x", &[6, 2])], &pool(), &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("6 elements") && msg.contains("12 elements"),
            "{msg}"
        );
    }

    #[test]
    fn unsupported_dtype_and_garbage() {
        let d = temp_dir("dtype");
        let p = d.join("m.safetensors");
        write(&p, &[("i", Dtype::I32, vec![2], vec![0; 8])]);
        let w = Weights::open(&p).unwrap();
        let msg = w
            .bind(&[decl("i", &[2])], &pool(), &[])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("I32"), "{msg}");
        std::fs::write(&p, b"garbage").unwrap();
        assert!(matches!(
            Weights::open(&p),
            Err(RuntimeError::Checkpoint { .. })
        ));
        assert!(matches!(
            Weights::open(d.join("nope")),
            Err(RuntimeError::Io { .. })
        ));
        let empty = temp_dir("empty");
        assert!(matches!(
            Weights::open(&empty),
            Err(RuntimeError::Checkpoint { .. })
        ));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&empty);
    }

    #[test]
    fn sharded_with_index() {
        let d = temp_dir("shard");
        write(
            &d.join("model-00001-of-00002.safetensors"),
            &[("a", Dtype::F32, vec![1], f32b(&[1.0]))],
        );
        write(
            &d.join("model-00002-of-00002.safetensors"),
            &[
                ("b", Dtype::F32, vec![2], f32b(&[2.0, 3.0])),
                ("a", Dtype::F32, vec![1], f32b(&[9.0])),
            ],
        );
        std::fs::write(
            d.join("model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let w = Weights::open(&d).unwrap();
        let b = w
            .bind(&[decl("a", &[1]), decl("b", &[2])], &pool(), &[])
            .unwrap();
        assert_eq!(b[0].as_slice(), &[9.0]);
        assert_eq!(b[1].as_slice(), &[2.0, 3.0]);
        // Without an index, all shards are opened.
        std::fs::remove_file(d.join("model.safetensors.index.json")).unwrap();
        let w = Weights::open(&d).unwrap();
        assert_eq!(w.len(), 2);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The repository's reference fixtures open, and bind in place (zero copy) or copied.
    #[test]
    fn fixture_checkpoints_bind_in_place() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        for dir in ["huginn_tiny", "ouro_tiny"] {
            let d = root.join(dir);
            if !d.join("model.safetensors").is_file() {
                continue;
            }
            let w = Weights::open(&d).unwrap();
            let decls: Vec<WeightDecl> = w
                .tensors()
                .into_iter()
                .filter(|t| t.dtype == "F32")
                .map(|t| WeightDecl {
                    name: t.name,
                    shape: t.shape,
                    origin: "fixture".into(),
                })
                .collect();
            assert!(decls.len() > 10);
            let b = w.bind_with(&decls, &pool(), &[], true).unwrap();
            assert!(b.iter().all(|x| x.is_mapped()), "{dir}");
            // The default copies hold the same values, and give the file's pages back.
            let c = w.bind_with(&decls, &pool(), &[], false).unwrap();
            for (x, y) in b.iter().zip(&c) {
                assert!(!y.is_mapped());
                assert_eq!(x.as_slice(), y.as_slice(), "{dir}");
            }
        }
    }

    #[test]
    fn f16_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(f16_to_f32(0x3555), 0.33325195);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
    }
}
