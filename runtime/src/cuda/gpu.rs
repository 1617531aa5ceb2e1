//! What the executor needs from a GPU: memory, copies, launches of the image's entries and
//! matrix products. Addresses are `u64` device addresses (the kernel ABI's pointers).
//!
//! Public (hidden, through [`crate::device`]) so that a test can run the executor over a device
//! of its own: tests/cuda_sim_exec.rs runs the compiler's device kernels in a SIMT interpreter.

use crate::artifact::{cuda::support, CudaImage, CudaKernel};
use crate::error::{Result, RuntimeError};

/// A kernel parameter, in the kernel ABI's order (see [`crate::artifact::cuda`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Param {
    Ptr(u64),
    I64(i64),
    F32(f32),
    F64(f64),
}

/// Row-major `c[i, j] = Σ_k x[i, k] · w(j, k)` for `i < m`, `j < n`, where `w(j, k)` is
/// `w[j, k]` (`Linear` layout) or, with `kn`, `w[k, j]` (`Conv1D` layout). Strides in elements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    pub kn: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub x: u64,
    pub ldx: usize,
    pub w: u64,
    pub ldw: usize,
    pub c: u64,
    pub ldc: usize,
}

pub trait Gpu: Send + Sync {
    /// Zeroed device memory.
    fn alloc(&self, bytes: usize, what: &str) -> Result<DevMem>;
    fn upload(&self, dst: u64, src: &[u8]) -> Result<()>;
    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    fn zero(&self, dst: u64, bytes: usize) -> Result<()>;
    /// Launch entry `f` over `items` work items: `f` indexes the image's entries, every kernel
    /// in manifest order then the support kernels in the order of [`support::ALL`] (the list
    /// `Model::with_gpu` hands a custom device).
    fn launch(&self, f: usize, items: usize, params: &[Param]) -> Result<()>;
    fn gemm(&self, g: &Gemm) -> Result<()>;
    /// The operations recorded since the last call, and whether to record from now on (only the
    /// emulator records).
    fn take_log(&self, _on: bool) -> Vec<String> {
        Vec::new()
    }
}

/// A device allocation; freed when dropped.
pub struct DevMem {
    pub(crate) addr: u64,
    pub(crate) _own: Box<dyn Send + Sync>,
}

impl DevMem {
    /// An allocation at `addr` that `owner` frees when dropped.
    pub fn new(addr: u64, owner: Box<dyn Send + Sync>) -> Self {
        DevMem { addr, _own: owner }
    }

    /// The address of element `i` of an `f32`/`i32` array.
    #[inline]
    pub(crate) fn at(&self, i: usize) -> u64 {
        self.addr + 4 * i as u64
    }
}

/// An image entry: a generated kernel (by kernel id) or a support kernel.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) launch: CudaKernel,
    pub(crate) what: What,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum What {
    Kernel(usize),
    Support(&'static str),
}

/// The entries of an image: every kernel in manifest order, then the support kernels it has in
/// the order of [`support::ALL`].
pub(crate) fn entries(image: &CudaImage) -> Result<Vec<Entry>> {
    let mut out: Vec<Entry> = image
        .kernels
        .iter()
        .enumerate()
        .map(|(i, k)| Entry {
            launch: k.clone(),
            what: What::Kernel(i),
        })
        .collect();
    for name in support::ALL {
        if let Some(k) = image.support(name) {
            out.push(Entry {
                launch: k.clone(),
                what: What::Support(name),
            });
        }
    }
    for e in &out {
        if e.launch.block == 0 || e.launch.items_per_block == 0 {
            return Err(RuntimeError::Artifact(format!(
                "CUDA entry `{}` has a zero block size or zero items per block",
                e.launch.entry
            )));
        }
    }
    Ok(out)
}

/// The grid of a launch over `items` work items.
pub(crate) fn grid(launch: &CudaKernel, items: usize) -> u32 {
    items.div_ceil(launch.items_per_block as usize) as u32
}

/// The bytes of a slice of plain numbers.
pub(crate) fn bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: f32/i32/u64 have no padding and any byte view of them is valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

pub(crate) fn bytes_mut64(v: &mut [f64]) -> &mut [u8] {
    // SAFETY: every byte pattern is a valid f64.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

pub(crate) fn bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: every byte pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}
