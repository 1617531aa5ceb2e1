//! Linking the object into a shared object with the system C compiler driver.

use super::BackendError;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// A scratch directory, removed on drop (also when linking fails).
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<Self, BackendError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!(
            "loopc-link-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir(&dir).map_err(|source| BackendError::Io {
            context: format!("cannot create the scratch directory {}", dir.display()),
            source,
        })?;
        Ok(ScratchDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `cc -shared` the object and return the shared object's bytes.
pub fn shared_object(object: &[u8]) -> Result<Vec<u8>, BackendError> {
    let dir = ScratchDir::new()?;
    let obj = dir.path().join("kernels.o");
    let so = dir.path().join("kernels.so");
    std::fs::write(&obj, object).map_err(|source| BackendError::Io {
        context: format!("cannot write {}", obj.display()),
        source,
    })?;

    // `-z defs`: an undefined symbol (an unexpected libcall) fails here, not at dlopen or call.
    // `-z noexecstack`: Cranelift objects carry no `.note.GNU-stack`, and without it the linker
    // would mark the library as needing an executable stack, which recent glibc refuses to load.
    let output = Command::new("cc")
        .arg("-shared")
        .arg("-o")
        .arg(&so)
        .arg(&obj)
        .args(["-Wl,-z,defs", "-Wl,-z,noexecstack"])
        .output()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => BackendError::LinkerMissing,
            _ => BackendError::Io {
                context: "cannot run `cc`".into(),
                source,
            },
        })?;
    if !output.status.success() {
        return Err(BackendError::LinkFailed {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    std::fs::read(&so).map_err(|source| BackendError::Io {
        context: format!("cannot read the linked {}", so.display()),
        source,
    })
}
