//! Aligned, zero-initialised `f32` storage that reports allocation failure as an error.
//!
//! Small blocks come from the global allocator with 64-byte alignment. Blocks of at least
//! [`HUGE_THRESHOLD`] bytes are anonymous `mmap`s of whole huge pages advised with
//! `MADV_HUGEPAGE` (transparent huge pages make streaming GEMV over weights noticeably faster);
//! the kernel hands out zeroed pages lazily, so a large allocation costs nothing until it is
//! touched, and then its last partial huge page costs up to 2 MiB of resident memory.
//! [`with_buffer`] lends a thread its reusable scratch vector.

use crate::error::{Result, RuntimeError};
use std::alloc::Layout;
use std::ptr::NonNull;

/// Allocations at least this large (in bytes) are `mmap`ed and advised for huge pages.
pub(crate) const HUGE_THRESHOLD: usize = 4 << 20;
/// A transparent huge page on x86-64 and most arm64 kernels.
const HUGE_PAGE: usize = 2 << 20;
const ALIGN: usize = 64;

enum Kind {
    Empty,
    Heap(Layout),
    Mmap(usize),
    /// Part of another allocation, which outlives this value (nothing to free).
    Window,
}

/// A fixed-length, 64-byte aligned `[f32]` that starts zeroed.
pub(crate) struct AVec {
    ptr: NonNull<f32>,
    len: usize,
    kind: Kind,
}

// SAFETY: AVec uniquely owns its allocation, like Vec<f32>.
unsafe impl Send for AVec {}
unsafe impl Sync for AVec {}

impl AVec {
    pub(crate) fn new() -> Self {
        AVec {
            ptr: NonNull::dangling(),
            len: 0,
            kind: Kind::Empty,
        }
    }

    /// `len` zeroed floats; `what` names the allocation in the error.
    pub(crate) fn zeroed(len: usize, what: &str) -> Result<Self> {
        Self::zeroed_from(len, what, HUGE_THRESHOLD)
    }

    /// As [`AVec::zeroed`], on huge pages from one huge page up: for storage read in scattered
    /// rows (the KV cache), where a 4 KiB page per row or two costs a page walk per read.
    pub(crate) fn zeroed_huge(len: usize, what: &str) -> Result<Self> {
        Self::zeroed_from(len, what, HUGE_PAGE)
    }

    fn zeroed_from(len: usize, what: &str, huge_from: usize) -> Result<Self> {
        if len == 0 {
            return Ok(Self::new());
        }
        let err = || RuntimeError::Alloc {
            bytes: len as u128 * 4,
            what: what.to_string(),
        };
        let bytes = len.checked_mul(4).ok_or_else(err)?;
        if bytes > isize::MAX as usize / 2 {
            return Err(err());
        }
        #[cfg(unix)]
        if bytes >= huge_from {
            // Whole huge pages: Linux (6.18 here) aligns a mapping of whole huge pages to one,
            // so none of it falls back to small pages. Unrounded, a mapping started anywhere and
            // up to 2 MiB at each end stayed on 4 KiB pages (d=1024: 602 of 688 MB resident on
            // huge pages; rounded, 623 of 697; decode −1 to +10 % over five alternations, mean
            // +3 %).
            let bytes = bytes.div_ceil(HUGE_PAGE) * HUGE_PAGE;
            // SAFETY: plain anonymous private mapping; checked for MAP_FAILED.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED || p.is_null() {
                return Err(err());
            }
            #[cfg(target_os = "linux")]
            // SAFETY: advising our own fresh mapping; failure is harmless.
            unsafe {
                libc::madvise(p, bytes, libc::MADV_HUGEPAGE);
            }
            return Ok(AVec {
                ptr: NonNull::new(p as *mut f32).ok_or_else(err)?,
                len,
                kind: Kind::Mmap(bytes),
            });
        }
        let layout = Layout::from_size_align(bytes, ALIGN).map_err(|_| err())?;
        // SAFETY: layout has non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p as *mut f32).ok_or_else(err)?;
        Ok(AVec {
            ptr,
            len,
            kind: Kind::Heap(layout),
        })
    }

    /// A view of `len` floats at `ptr`, inside an allocation that outlives the result and
    /// that no other value reads or writes in that range while this one is in use (an arena's
    /// window; the workspace's windows take turns on the same floats).
    ///
    /// # Safety
    /// As stated: `ptr` valid for `len` floats and 64-byte aligned; no reference obtained
    /// through another value overlapping the range is alive while one from this value is.
    pub(crate) unsafe fn window(ptr: *mut f32, len: usize) -> Self {
        match NonNull::new(ptr) {
            Some(ptr) if len > 0 => AVec {
                ptr,
                len,
                kind: Kind::Window,
            },
            _ => Self::new(),
        }
    }

    /// Copies the data to `dst` and becomes a window of it there (see [`AVec::window`]),
    /// freeing its own allocation.
    ///
    /// # Safety
    /// As for [`AVec::window`] with `dst` and `self.len()`.
    pub(crate) unsafe fn move_to(&mut self, dst: *mut f32) {
        let len = self.len;
        std::ptr::copy_nonoverlapping(self.as_ptr(), dst, len);
        *self = Self::window(dst, len);
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    #[inline]
    pub(crate) fn as_ptr(&self) -> *const f32 {
        self.ptr.as_ptr()
    }
    #[inline]
    pub(crate) fn as_mut_ptr(&mut self) -> *mut f32 {
        self.ptr.as_ptr()
    }
    #[inline]
    pub(crate) fn as_slice(&self) -> &[f32] {
        // SAFETY: ptr is valid for len initialised floats (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    #[inline]
    pub(crate) fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AVec {
    fn drop(&mut self) {
        match self.kind {
            Kind::Empty | Kind::Window => {}
            // SAFETY: allocated with this layout by alloc_zeroed.
            Kind::Heap(layout) => unsafe {
                std::alloc::dealloc(self.ptr.as_ptr() as *mut u8, layout)
            },
            #[cfg(unix)]
            // SAFETY: mapped by us with this length.
            Kind::Mmap(bytes) => unsafe {
                libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, bytes);
            },
            #[cfg(not(unix))]
            Kind::Mmap(_) => {}
        }
    }
}

impl Default for AVec {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `f` on the thread's buffer in `cell`, or on a fresh one when it is taken (a pool
/// thread waiting inside one call can pick up another session's call on the same pool, which
/// then finds the buffer borrowed).
pub(crate) fn with_buffer<T, R>(
    cell: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>,
    f: impl FnOnce(&mut Vec<T>) -> R,
) -> R {
    cell.with(|c| match c.try_borrow_mut() {
        Ok(mut v) => f(&mut v),
        Err(_) => f(&mut Vec::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_and_aligned() {
        for n in [0usize, 1, 17, 1000, (HUGE_THRESHOLD / 4) + 3] {
            let mut v = AVec::zeroed(n, "test").unwrap();
            assert_eq!(v.len(), n);
            assert!(v.as_slice().iter().all(|&x| x == 0.0));
            if n > 0 {
                assert_eq!(v.as_ptr() as usize % ALIGN, 0);
                v.as_mut_slice()[n - 1] = 1.0;
                assert_eq!(v.as_slice()[n - 1], 1.0);
            }
        }
    }

    /// Mappings are whole huge pages (so the kernel can align them to one), from 4 MiB for
    /// `zeroed` and from 2 MiB for `zeroed_huge`.
    #[test]
    #[cfg(unix)]
    fn mappings_are_whole_huge_pages() {
        for (v, mapped) in [
            (AVec::zeroed(HUGE_THRESHOLD / 4 + 3, "t").unwrap(), true),
            (AVec::zeroed(HUGE_THRESHOLD / 4 - 1, "t").unwrap(), false),
            (AVec::zeroed_huge(HUGE_PAGE / 4 + 5, "t").unwrap(), true),
            (AVec::zeroed_huge(HUGE_PAGE / 4 - 1, "t").unwrap(), false),
        ] {
            match v.kind {
                Kind::Mmap(bytes) => {
                    assert!(mapped, "{} floats mapped", v.len());
                    assert_eq!(bytes % HUGE_PAGE, 0);
                    assert!(bytes >= 4 * v.len() && bytes - 4 * v.len() < HUGE_PAGE);
                }
                _ => assert!(!mapped, "{} floats not mapped", v.len()),
            }
        }
    }

    #[test]
    fn huge_request_is_an_error() {
        assert!(AVec::zeroed(usize::MAX / 2, "x").is_err());
    }
}
