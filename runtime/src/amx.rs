//! Intel AMX (`tdpbf16ps`) for the bf16 prefill GEMM, through `asm!` (the AMX intrinsics are
//! not stable Rust).
//!
//! Linux hands out the 8 KiB tile-data state only on request: [`available`] asks once per
//! process with `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` (without it the first
//! tile instruction raises SIGILL) and reports `false` when the CPU, the kernel or
//! `LOOPC_NO_AMX=1` says no, so callers fall back to the AVX-512-BF16 kernel.

use std::sync::OnceLock;

/// Whether the AMX-BF16 kernel may run in this process.
pub fn available() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| {
        if std::env::var("LOOPC_NO_AMX").is_ok_and(|v| v == "1") {
            return false;
        }
        detect()
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    if !std::arch::is_x86_feature_detected!("avx512bf16") {
        return false;
    }
    // Leaf 7 exists on every CPU with AVX-512.
    let c = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (c.edx >> 22 & 1 == 1, c.edx >> 24 & 1 == 1);
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments; it fails cleanly on kernels without AMX.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// The kernel's tile shapes: tmm0..3 are 16×16 f32 accumulators, tmm4..5 16 rows × 32 bf16 of
/// activations, tmm6..7 16 pair rows × 16 features of packed weights (all 64 bytes wide).
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[cfg(target_arch = "x86_64")]
impl TileConfig {
    fn kernel() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for t in 0..8 {
            c[16 + 2 * t] = 64; // colsb, little-endian u16
            c[48 + t] = 16; // rows
        }
        TileConfig(c)
    }
}

/// `C[32 × 32] += A · Bᵀ` over `steps` depth-32 steps for one 2×2 tile block: `C` (row
/// stride `c_stride` bytes) starts from the sums at `c` when `load`, from zero otherwise, and
/// is stored back there. `A` is 32 rows of bf16 activations from `a` (row stride `a_stride`
/// bytes, rows 16.. from `a + 16·a_stride`), `B` two packed 16-feature blocks at `b0`, `b1`
/// (1 KiB per step each). The GEMM calls it once per depth chunk, so one chunk of `A` stays
/// in L1 across every weight block of a group.
///
/// # Safety
/// [`available`] returned true and [`Tiles::new`] configured this thread; every pointer covers
/// what the steps read or write; with `load`, `c` holds the block's partial sums.
#[cfg(target_arch = "x86_64")]
#[inline]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn block_2x2(
    a: *const u16,
    a_stride: usize,
    b0: *const u32,
    b1: *const u32,
    steps: usize,
    c: *mut f32,
    c_stride: usize,
    load: bool,
) {
    debug_assert!(steps > 0);
    let a1 = (a as *const u8).add(16 * a_stride);
    let c1 = c.add(16);
    let c2 = (c as *mut u8).add(16 * c_stride) as *mut f32;
    let c3 = c2.add(16);
    if load {
        std::arch::asm!(
            "tileloadd tmm0, [{c0} + {sc}*1]",
            "tileloadd tmm1, [{c1} + {sc}*1]",
            "tileloadd tmm2, [{c2} + {sc}*1]",
            "tileloadd tmm3, [{c3} + {sc}*1]",
            c0 = in(reg) c,
            c1 = in(reg) c1,
            c2 = in(reg) c2,
            c3 = in(reg) c3,
            sc = in(reg) c_stride,
            options(nostack, readonly),
        );
    } else {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }
    std::arch::asm!(
        "2:",
        "tileloadd tmm4, [{a0} + {sa}*1]",
        "tileloadd tmm6, [{b0} + {sb}*1]",
        "tileloadd tmm7, [{b1} + {sb}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{a1} + {sa}*1]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, 64",
        "add {a1}, 64",
        "add {b0}, 1024",
        "add {b1}, 1024",
        "dec {n}",
        "jnz 2b",
        "tilestored [{c0} + {sc}*1], tmm0",
        "tilestored [{c1} + {sc}*1], tmm1",
        "tilestored [{c2} + {sc}*1], tmm2",
        "tilestored [{c3} + {sc}*1], tmm3",
        a0 = inout(reg) a => _,
        a1 = inout(reg) a1 => _,
        b0 = inout(reg) b0 => _,
        b1 = inout(reg) b1 => _,
        n = inout(reg) steps => _,
        sa = in(reg) a_stride,
        sb = in(reg) 64usize,
        c0 = in(reg) c,
        c1 = in(reg) c1,
        c2 = in(reg) c2,
        c3 = in(reg) c3,
        sc = in(reg) c_stride,
        options(nostack),
    );
}

/// The tile configuration of one thread for the duration of one GEMM task; released on drop.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Tiles(());

#[cfg(target_arch = "x86_64")]
impl Tiles {
    /// # Safety
    /// [`available`] returned true.
    pub(crate) unsafe fn new() -> Self {
        let cfg = TileConfig::kernel();
        std::arch::asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        Tiles(())
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: only constructed after a successful configuration on this thread.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}
