//! Loading the artifact's generated kernels from the embedded shared object.

use crate::artifact::{HostGemm, KernelDecl};
use crate::error::{Result, RuntimeError};
use std::io::Write;

/// The C ABI of every generated kernel: `ptrs` per [`crate::artifact::KernelSpec`],
/// `ints = [begin, end, pos0, kv_len]`.
pub type KernelFn = unsafe extern "C" fn(*const *mut f32, *const i64);

/// The loaded shared object and its resolved kernel entry points (indexed by `KernelId`).
pub struct Kernels {
    fns: Vec<KernelFn>,
    /// The object's own GEMMs, when the manifest names them (`artifact::HostGemm`).
    pub(crate) gemm: Option<crate::matmul::HostGemm>,
    // Keeps the code mapped as long as `fns` are callable. Declared after `fns`.
    _lib: Option<libloading::Library>,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels")
            .field("count", &self.fns.len())
            .finish()
    }
}

impl Kernels {
    /// Load `object` and resolve every declared symbol. An empty declaration list needs no
    /// object (it may be empty); an empty object with declared kernels is an error.
    pub fn load(object: &[u8], decls: &[KernelDecl]) -> Result<Self> {
        Self::load_with_gemm(object, decls, None)
    }

    /// [`Kernels::load`], also resolving the GEMMs the manifest says the object exports.
    pub fn load_with_gemm(
        object: &[u8],
        decls: &[KernelDecl],
        gemm: Option<&HostGemm>,
    ) -> Result<Self> {
        if decls.is_empty() && gemm.is_none() {
            return Ok(Kernels {
                fns: Vec::new(),
                gemm: None,
                _lib: None,
            });
        }
        if object.is_empty() {
            return Err(RuntimeError::KernelLoad(format!(
                "the manifest declares {} kernels but the artifact holds no shared object",
                decls.len()
            )));
        }
        let path = write_temp(object)?;
        // SAFETY: loading a library runs its initialisers; the artifact is trusted code produced
        // by `loopc build` (as with any plugin).
        let lib = unsafe { libloading::Library::new(&path) };
        let _ = std::fs::remove_file(&path);
        let lib = lib.map_err(|e| RuntimeError::KernelLoad(format!("dlopen failed: {e}")))?;
        let gemm = match gemm {
            Some(g) => {
                fn get<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T> {
                    let mut sym = name.as_bytes().to_vec();
                    sym.push(0);
                    // SAFETY: the manifest declares the symbol to have the GEMM ABI
                    // (`artifact::HostGemm`), which `T` spells.
                    let f: std::result::Result<libloading::Symbol<'_, T>, _> =
                        unsafe { lib.get(&sym) };
                    f.map(|f| *f).map_err(|e| {
                        RuntimeError::KernelLoad(format!(
                            "the manifest names the GEMM `{name}`, which the object lacks: {e}"
                        ))
                    })
                }
                if g.panel == 0 {
                    return Err(RuntimeError::KernelLoad(
                        "the manifest's GEMM has a panel width of 0".into(),
                    ));
                }
                Some(crate::matmul::HostGemm {
                    nk: get(&lib, &g.nk)?,
                    kn: get(&lib, &g.kn)?,
                    panel: g.panel,
                    bf16_amx: match &g.bf16_amx {
                        Some(name) => Some(get(&lib, name)?),
                        None => None,
                    },
                })
            }
            None => None,
        };
        let mut fns = Vec::with_capacity(decls.len());
        for (i, d) in decls.iter().enumerate() {
            let mut name = d.symbol.as_bytes().to_vec();
            name.push(0);
            // SAFETY: the symbol is declared by the manifest to have the kernel ABI.
            let f: std::result::Result<libloading::Symbol<'_, KernelFn>, _> =
                unsafe { lib.get(&name) };
            match f {
                Ok(f) => fns.push(*f),
                Err(e) => {
                    return Err(RuntimeError::MissingSymbol {
                        symbol: d.symbol.clone(),
                        kernel: i,
                        msg: e.to_string(),
                    })
                }
            }
        }
        Ok(Kernels {
            fns,
            gemm,
            _lib: Some(lib),
        })
    }

    /// The object's GEMMs, when it has them.
    pub fn gemm(&self) -> Option<crate::matmul::HostGemm> {
        self.gemm
    }

    #[inline]
    pub fn get(&self, k: usize) -> KernelFn {
        self.fns[k]
    }

    pub fn len(&self) -> usize {
        self.fns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fns.is_empty()
    }
}

fn write_temp(object: &[u8]) -> Result<std::path::PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir();
    for _ in 0..16 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = dir.join(format!(
            "loopc-kernels-{}-{}-{}.so",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos
        ));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path);
        match f {
            Ok(mut f) => {
                let r = f.write_all(object).and_then(|_| f.flush());
                drop(f);
                if let Err(e) = r {
                    let _ = std::fs::remove_file(&path);
                    return Err(RuntimeError::io(&path, e));
                }
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(RuntimeError::io(&path, e)),
        }
    }
    Err(RuntimeError::KernelLoad(
        "cannot create a unique temporary file for the kernels".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::KernelSpec;

    #[test]
    fn empty_is_fine_without_kernels() {
        let k = Kernels::load(&[], &[]).unwrap();
        assert!(k.is_empty());
    }

    #[test]
    fn errors_are_clear() {
        let decl = KernelDecl {
            symbol: "k0".into(),
            spec: KernelSpec::Rope {
                heads: 1,
                head_dim: 2,
                style: crate::artifact::RopeStyle::Half,
            },
        };
        let e = Kernels::load(&[], std::slice::from_ref(&decl)).unwrap_err();
        assert!(e.to_string().contains("no shared object"), "{e}");
        let e = Kernels::load(b"not an elf", &[decl]).unwrap_err();
        assert!(matches!(e, RuntimeError::KernelLoad(_)), "{e}");
    }

    /// Resolving symbols from a real shared object: use the C library already on the system
    /// when one can be found (skipped otherwise).
    #[test]
    fn missing_symbol_is_named() {
        let candidates = [
            "/lib/x86_64-linux-gnu/libm.so.6",
            "/usr/lib/x86_64-linux-gnu/libm.so.6",
            "/lib64/libm.so.6",
        ];
        let Some(bytes) = candidates.iter().find_map(|p| std::fs::read(p).ok()) else {
            return;
        };
        let spec = KernelSpec::Rope {
            heads: 1,
            head_dim: 2,
            style: crate::artifact::RopeStyle::Half,
        };
        let ok = KernelDecl {
            symbol: "cosf".into(),
            spec: spec.clone(),
        };
        let k = Kernels::load(&bytes, std::slice::from_ref(&ok)).unwrap();
        assert_eq!(k.len(), 1);
        let bad = KernelDecl {
            symbol: "loopc_no_such_kernel".into(),
            spec,
        };
        let e = Kernels::load(&bytes, &[ok, bad]).unwrap_err();
        assert!(e.to_string().contains("loopc_no_such_kernel"), "{e}");
    }
}
