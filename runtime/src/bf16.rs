//! bf16 weight storage for `--dtype bf16`: rounding, and the packed layout every bf16 matmul
//! kernel reads.
//!
//! A matmul weight `W: [n, k]` (output features × inputs) is stored as 16-feature blocks of
//! bf16 pairs (the VNNI layout): the 32-bit word for features `16·b .. 16·b + 16` and inputs
//! `2p, 2p + 1` is at `b·(kp/2)·16 + p·16 + (j mod 16)`, low half `W[j, 2p]`, high half
//! `W[j, 2p + 1]`. Sixteen consecutive words (64 bytes) are then one `vdpbf16ps` operand for 16
//! outputs (the GEMV needs no horizontal sums) and sixteen such rows (1 KiB, contiguous) are an
//! AMX `tdpbf16ps` B tile. `k` is padded with zeros to a multiple of 32 (one tile depth) and `n`
//! to a multiple of 32 (the AMX kernel's 2-block step), so no kernel reads past a block.

use crate::error::Result;
use crate::mem::AVec;

/// Round to the nearest bf16, ties to even (PyTorch's `.to(torch.bfloat16)`); NaNs stay NaNs.
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[inline]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to bf16 and back (what a bf16 matmul sees of an f32 value).
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

/// Input padding granularity (one AMX tile depth, 32 bf16).
pub(crate) const K_ALIGN: usize = 32;
/// Output padding granularity (two 16-feature blocks).
pub(crate) const N_ALIGN: usize = 32;

/// A bf16 weight `[n, k]` in the packed layout of the module docs.
pub struct Packed {
    n: usize,
    k: usize,
    kp: usize,
    /// `np · kp / 2` words; an `AVec` for its 64-byte alignment and huge-page backing.
    data: AVec,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed(bf16 [{}, {}])", self.n, self.k)
    }
}

impl Packed {
    /// Pack `W[j, i] = get(j, i)` (already rounded bf16 bits) for `j < n`, `i < k`. Blocks are
    /// filled in parallel on `pool`.
    pub(crate) fn build(
        n: usize,
        k: usize,
        what: &str,
        pool: &rayon::ThreadPool,
        get: impl Fn(usize, usize) -> u16 + Sync,
    ) -> Result<Self> {
        use rayon::prelude::*;
        let kp = k.next_multiple_of(K_ALIGN).max(K_ALIGN);
        let np = n.next_multiple_of(N_ALIGN).max(N_ALIGN);
        let mut data = AVec::zeroed(np * kp / 2, what)?;
        let block = 8 * kp;
        // SAFETY: f32 and u32 have the same size and alignment; the words are written as bits.
        let words: &mut [u32] =
            unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr() as *mut u32, data.len()) };
        pool.install(|| {
            words
                .par_chunks_mut(block)
                .enumerate()
                .for_each(|(b, blk)| {
                    for l in 0..16 {
                        let j = b * 16 + l;
                        if j >= n {
                            break;
                        }
                        for p in 0..k.div_ceil(2) {
                            let lo = get(j, 2 * p) as u32;
                            let hi = if 2 * p + 1 < k {
                                get(j, 2 * p + 1) as u32
                            } else {
                                0
                            };
                            blk[p * 16 + l] = lo | (hi << 16);
                        }
                    }
                });
        });
        Ok(Packed { n, k, kp, data })
    }

    /// Words of packed data (as f32-sized units).
    pub(crate) fn data_len(&self) -> usize {
        self.data.len()
    }

    /// Moves the packed data to `dst` (`data_len()` floats) and keeps a window of it there.
    ///
    /// # Safety
    /// `dst` is 64-byte aligned, valid for `data_len()` floats, outlives `self`, and no other
    /// value uses that range.
    pub(crate) unsafe fn move_to(&mut self, dst: *mut f32) {
        self.data.move_to(dst);
    }

    /// Pack a row-major f32 `[n, k]` matrix, rounding each element.
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        assert!(w.len() >= n * k, "packed weight size");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("one-thread pool");
        Self::build(n, k, "bf16 weight", &pool, |j, i| to_bf16(w[j * k + i]))
            .expect("bf16 weight allocation")
    }

    pub fn n(&self) -> usize {
        self.n
    }
    pub fn k(&self) -> usize {
        self.k
    }
    /// `k` padded to a multiple of [`K_ALIGN`].
    pub(crate) fn kp(&self) -> usize {
        self.kp
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * self.data.len()
    }
    pub(crate) fn words(&self) -> &[u32] {
        // SAFETY: see `build`.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const u32, self.data.len()) }
    }

    /// The bf16 bits of `W[j, i]`.
    #[inline]
    pub fn get(&self, j: usize, i: usize) -> u16 {
        let w = self.words()[(j / 16) * 8 * self.kp + (i / 2) * 16 + j % 16];
        (w >> (16 * (i % 2))) as u16
    }

    /// Row `j` (one output feature's weights, or one embedding) widened to f32.
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        let words = self.words();
        let base = (j / 16) * 8 * self.kp + j % 16;
        for (p, o) in out[..self.k].chunks_mut(2).enumerate() {
            let w = words[base + p * 16];
            o[0] = from_bf16(w as u16);
            if let Some(h) = o.get_mut(1) {
                *h = from_bf16((w >> 16) as u16);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_nearest_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even mantissa (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0 + 1e-6), 1.0 + 1.0 / 128.0);
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        // The largest finite f32 rounds up to infinity, as in PyTorch.
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
    }

    #[test]
    fn packing_round_trips_every_element() {
        for &(n, k) in &[(1usize, 1usize), (5, 3), (17, 33), (40, 64), (33, 70)] {
            let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let p = Packed::from_f32(&w, n, k);
            let mut row = vec![0f32; k];
            for j in 0..n {
                p.row_into(j, &mut row);
                for i in 0..k {
                    assert_eq!(row[i], round_bf16(w[j * k + i]), "({n},{k}) [{j},{i}]");
                    assert_eq!(from_bf16(p.get(j, i)), row[i]);
                }
            }
        }
    }
}
