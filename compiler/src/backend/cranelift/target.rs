//! The host ISA and the CPU features the generated code may rely on.

use super::BackendError;
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};

/// Choices the IR generator makes from the CPU's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Emit `fma`. Without the FMA extension Cranelift would lower it to a libm call.
    pub fma: bool,
}

impl Features {
    /// What `kernel_clif` generates for: any x86-64-v3 machine, so snapshots don't depend on the
    /// machine they are taken on.
    pub const CANONICAL: Features = Features { fma: true };
}

/// Build the ISA for the host with the vector extensions it has.
pub fn host_isa() -> Result<(OwnedTargetIsa, Features), BackendError> {
    let triple = target_lexicon::Triple::host();
    let mut isa_builder = cranelift_codegen::isa::lookup(triple.clone()).map_err(|e| {
        BackendError::UnsupportedHost(format!("no Cranelift backend for {triple}: {e}"))
    })?;
    let enabled = host_extensions()?;
    for name in &enabled {
        isa_builder.enable(name).map_err(|e| {
            BackendError::UnsupportedHost(format!("Cranelift rejected x86 setting {name}: {e}"))
        })?;
    }
    let fma = enabled.contains(&"has_fma") && enabled.contains(&"has_avx");

    let mut flags = settings::builder();
    for (name, value) in [("opt_level", "speed"), ("is_pic", "true")] {
        flags.set(name, value).map_err(|e| {
            BackendError::UnsupportedHost(format!("Cranelift rejected {name}={value}: {e}"))
        })?;
    }
    let isa = isa_builder
        .finish(settings::Flags::new(flags))
        .map_err(|e| BackendError::UnsupportedHost(format!("cannot build the ISA: {e}")))?;
    Ok((isa, Features { fma }))
}

/// Cranelift settings for the extensions the host CPU has.
///
/// SSSE3 and SSE4.1 are required: without them Cranelift lowers shuffles and blends to libcalls.
/// AVX-512 is left off: Cranelift only uses it for a few 128-bit forms, none of which matter here.
#[cfg(target_arch = "x86_64")]
fn host_extensions() -> Result<Vec<&'static str>, BackendError> {
    use std::arch::is_x86_feature_detected as has;
    if !(has!("ssse3") && has!("sse4.1")) {
        return Err(BackendError::UnsupportedHost(
            "the CPU lacks SSSE3/SSE4.1, which the generated kernels require".into(),
        ));
    }
    let mut enabled = vec!["has_sse3", "has_ssse3", "has_sse41"];
    let optional = [
        (has!("sse4.2"), "has_sse42"),
        (has!("popcnt"), "has_popcnt"),
        (has!("avx"), "has_avx"),
        (has!("avx2"), "has_avx2"),
        (has!("fma"), "has_fma"),
        (has!("bmi1"), "has_bmi1"),
        (has!("bmi2"), "has_bmi2"),
        (has!("lzcnt"), "has_lzcnt"),
    ];
    enabled.extend(optional.iter().filter(|(on, _)| *on).map(|(_, name)| *name));
    Ok(enabled)
}

#[cfg(not(target_arch = "x86_64"))]
fn host_extensions() -> Result<Vec<&'static str>, BackendError> {
    Err(BackendError::UnsupportedHost(
        "the Cranelift backend is built for x86-64 hosts only".into(),
    ))
}
