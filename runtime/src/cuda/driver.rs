//! The GPU through cudarc's driver API (loaded at run time: `dynamic-loading`) and cuBLAS.
//!
//! Everything runs on the context's legacy default stream, so launches, products and copies
//! are ordered without events; the executor's reads back are the only host waits.

use super::gpu::{grid, DevMem, Entry, Gemm, Gpu, Param};
use crate::artifact::CudaImage;
use crate::error::{Result, RuntimeError};
use cudarc::cublas::{result as cublas, sys as cublas_sys};
use cudarc::driver::{result as drv, sys, CudaContext};
use std::ffi::{c_void, CString};
use std::sync::Arc;

fn err(what: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Cuda(format!("{what}: {e}"))
}

pub(crate) struct CudaGpu {
    ctx: Arc<CudaContext>,
    module: sys::CUmodule,
    fns: Vec<(sys::CUfunction, Entry)>,
    blas: cublas_sys::cublasHandle_t,
}

// SAFETY: the raw handles belong to `ctx`, which is bound to the calling thread before each
// use; a session uses its model from one thread at a time.
unsafe impl Send for CudaGpu {}
unsafe impl Sync for CudaGpu {}

struct Alloc {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
}

impl Drop for Alloc {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `malloc_sync` in this context and freed once.
            let _ = unsafe { drv::free_sync(self.ptr) };
        }
    }
}

impl CudaGpu {
    /// Open device `ordinal`, check its capability against the image and load the PTX.
    pub(crate) fn open(
        ordinal: usize,
        image: &CudaImage,
        ptx: &[u8],
        entries: &[Entry],
    ) -> Result<Self> {
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { sys::is_culib_present() } {
            return Err(RuntimeError::Cuda(
                "no CUDA driver: libcuda.so could not be loaded (is the NVIDIA driver installed, and its directory on LD_LIBRARY_PATH?)".into(),
            ));
        }
        drv::init().map_err(|e| err("cannot initialise the CUDA driver (no GPU?)", e))?;
        let count =
            drv::device::get_count().map_err(|e| err("cannot count the CUDA devices", e))?;
        if count <= 0 {
            return Err(RuntimeError::Cuda("no CUDA device is present".into()));
        }
        if ordinal >= count as usize {
            return Err(RuntimeError::Cuda(format!(
                "there is no device cuda:{ordinal} ({count} CUDA device{} present)",
                if count == 1 { " is" } else { "s are" }
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| err("cannot create a CUDA context", e))?;
        let name = ctx.name().unwrap_or_else(|_| format!("cuda:{ordinal}"));
        let cc = ctx
            .compute_capability()
            .map_err(|e| err("cannot read the compute capability", e))?;
        super::check_capability(&image.arch, cc, &name)?;
        // SAFETY: only tries to dlopen cuBLAS.
        if !unsafe { cublas_sys::is_culib_present() } {
            return Err(RuntimeError::Cuda(
                "cuBLAS could not be loaded (libcublas.so; put its directory on LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        // A NUL-terminated image is fine too.
        let ptx = ptx.strip_suffix(&[0]).unwrap_or(ptx);
        let text = std::str::from_utf8(ptx).map_err(|_| {
            RuntimeError::Artifact("the CUDA object section is not UTF-8 PTX".into())
        })?;
        let src = CString::new(text)
            .map_err(|_| RuntimeError::Artifact("the PTX holds a NUL byte".into()))?;
        // SAFETY: a NUL-terminated PTX image; the context is current (bound by `new`).
        let module = unsafe { drv::module::load_data(src.as_ptr() as *const c_void) }
            .map_err(|e| err("the driver rejected the artifact's PTX", e))?;
        let mut fns = Vec::with_capacity(entries.len());
        for e in entries {
            let name = CString::new(e.launch.entry.as_str())
                .map_err(|_| RuntimeError::Artifact("a CUDA entry name holds a NUL byte".into()))?;
            // SAFETY: `module` was just loaded.
            let f = unsafe { drv::module::get_function(module, name) }
                .map_err(|x| err(&format!("the PTX has no entry `{}`", e.launch.entry), x))?;
            fns.push((f, e.clone()));
        }
        let blas = cublas::create_handle().map_err(|e| err("cannot create a cuBLAS handle", e))?;
        Ok(CudaGpu {
            ctx,
            module,
            fns,
            blas,
        })
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| err("cannot bind the CUDA context", e))
    }
}

impl Drop for CudaGpu {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: created in `open`, destroyed once.
            unsafe {
                let _ = cublas::destroy_handle(self.blas);
                let _ = drv::module::unload(self.module);
            }
        }
    }
}

impl Gpu for CudaGpu {
    fn alloc(&self, bytes: usize, what: &str) -> Result<DevMem> {
        self.bind()?;
        let n = bytes.max(4);
        // SAFETY: the context is current.
        let ptr = unsafe { drv::malloc_sync(n) }.map_err(|e| {
            err(
                &format!("cannot allocate {n} bytes of device memory for {what}"),
                e,
            )
        })?;
        let own = Alloc {
            ctx: self.ctx.clone(),
            ptr,
        };
        // SAFETY: a fresh allocation of `n` bytes.
        unsafe { drv::memset_d8_sync(ptr, 0, n) }.map_err(|e| err("memset", e))?;
        Ok(DevMem {
            addr: ptr,
            _own: Box::new(own),
        })
    }

    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the executor sizes every destination (the emulator checks the same calls).
        unsafe { drv::memcpy_htod_sync(dst, src) }.map_err(|e| err("host-to-device copy", e))
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: as for `upload`.
        unsafe { drv::memcpy_dtoh_sync(dst, src) }.map_err(|e| err("device-to-host copy", e))
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: as for `upload`.
        unsafe { drv::memcpy_dtod_sync(dst, src, bytes) }.map_err(|e| err("device copy", e))
    }

    fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: as for `upload`.
        unsafe { drv::memset_d8_sync(dst, 0, bytes) }.map_err(|e| err("memset", e))
    }

    fn launch(&self, f: usize, items: usize, params: &[Param]) -> Result<()> {
        if items == 0 {
            return Ok(());
        }
        let (func, e) = self
            .fns
            .get(f)
            .ok_or_else(|| RuntimeError::Cuda(format!("no CUDA entry #{f}")))?;
        self.bind()?;
        // The driver reads each parameter through a pointer to its value.
        let mut vals: Vec<[u8; 8]> = params
            .iter()
            .map(|p| match *p {
                Param::Ptr(a) => a.to_ne_bytes(),
                Param::I64(v) => v.to_ne_bytes(),
                Param::F64(v) => v.to_ne_bytes(),
                Param::F32(v) => {
                    let mut b = [0u8; 8];
                    b[..4].copy_from_slice(&v.to_ne_bytes());
                    b
                }
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = vals
            .iter_mut()
            .map(|v| v.as_mut_ptr() as *mut c_void)
            .collect();
        let l = &e.launch;
        // SAFETY: the parameter list follows the entry's ABI (see `artifact::cuda`); `vals`
        // outlives the call, which copies the values.
        unsafe {
            drv::launch_kernel(
                *func,
                (grid(l, items), 1, 1),
                (l.block, 1, 1),
                l.shared_bytes,
                std::ptr::null_mut(),
                &mut ptrs,
            )
        }
        .map_err(|x| err(&format!("launch of `{}`", l.entry), x))
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        self.bind()?;
        use cublas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let (alpha, beta) = (1f32, 0f32);
        let int = |v: usize| -> Result<i32> {
            i32::try_from(v)
                .map_err(|_| RuntimeError::Unsupported(format!("a matrix dimension of {v}")))
        };
        // Row-major C = X·Wᵀ is column-major Cᵀ = W·Xᵀ: cuBLAS sees W (transposed for the
        // Linear layout) times X, both in their row-major storage.
        let transa = if g.kn { CUBLAS_OP_N } else { CUBLAS_OP_T };
        // SAFETY: the executor sizes every operand; the handle belongs to this context.
        unsafe {
            cublas::sgemm(
                self.blas,
                transa,
                CUBLAS_OP_N,
                int(g.n)?,
                int(g.m)?,
                int(g.k)?,
                &alpha,
                g.w as *const f32,
                int(g.ldw)?,
                g.x as *const f32,
                int(g.ldx)?,
                &beta,
                g.c as *mut f32,
                int(g.ldc)?,
            )
        }
        .map_err(|e| err("cuBLAS sgemm", e))
    }
}
