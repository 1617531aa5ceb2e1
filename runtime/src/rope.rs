//! Rotary-embedding tables: for each [`RopeTable`], `cos`/`sin` of shape
//! `[positions, head_dim/2]` with `theta_i(pos) = pos / base^(2i/head_dim)`, computed in f64 and
//! rounded to f32. Tables grow (by doubling) to cover the positions a call needs.

use crate::artifact::RopeTable;
use crate::error::Result;
use crate::mem::AVec;

const MIN_POSITIONS: usize = 64;

pub(crate) struct Rope {
    spec: RopeTable,
    /// `base^(2i/head_dim)` per pair.
    inv: Vec<f64>,
    positions: usize,
    cos: AVec,
    sin: AVec,
}

impl Rope {
    pub(crate) fn new(spec: &RopeTable) -> Self {
        let half = spec.head_dim / 2;
        let inv = (0..half)
            .map(|i| spec.base.powf((2 * i) as f64 / spec.head_dim as f64))
            .collect();
        Rope {
            spec: spec.clone(),
            inv,
            positions: 0,
            cos: AVec::new(),
            sin: AVec::new(),
        }
    }

    pub(crate) fn half(&self) -> usize {
        self.spec.head_dim / 2
    }

    #[cfg(test)]
    pub(crate) fn positions(&self) -> usize {
        self.positions
    }

    /// Grow the tables to hold at least `n` positions.
    pub(crate) fn ensure(&mut self, n: usize) -> Result<()> {
        if n <= self.positions {
            return Ok(());
        }
        let mut p = self.positions.max(MIN_POSITIONS);
        while p < n {
            p = p.saturating_mul(2);
        }
        let half = self.half();
        let what = "rotary tables";
        let elems = p
            .checked_mul(half)
            .ok_or(crate::error::RuntimeError::Alloc {
                bytes: p as u128 * half as u128 * 4,
                what: what.into(),
            })?;
        let mut cos = AVec::zeroed(elems, what)?;
        let mut sin = AVec::zeroed(elems, what)?;
        let old = self.positions * half;
        cos.as_mut_slice()[..old].copy_from_slice(&self.cos.as_slice()[..old]);
        sin.as_mut_slice()[..old].copy_from_slice(&self.sin.as_slice()[..old]);
        for pos in self.positions..p {
            for (i, &f) in self.inv.iter().enumerate() {
                let theta = pos as f64 / f;
                let (s, c) = theta.sin_cos();
                cos.as_mut_slice()[pos * half + i] = c as f32;
                sin.as_mut_slice()[pos * half + i] = s as f32;
            }
        }
        self.cos = cos;
        self.sin = sin;
        self.positions = p;
        Ok(())
    }

    pub(crate) fn cos_ptr(&mut self) -> *mut f32 {
        self.cos.as_mut_ptr()
    }
    pub(crate) fn sin_ptr(&mut self) -> *mut f32 {
        self.sin.as_mut_ptr()
    }
    pub(crate) fn cos(&self) -> &[f32] {
        self.cos.as_slice()
    }
    pub(crate) fn sin(&self) -> &[f32] {
        self.sin.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_growth() {
        let mut r = Rope::new(&RopeTable {
            head_dim: 8,
            base: 10000.0,
        });
        r.ensure(3).unwrap();
        assert_eq!(r.positions(), 64);
        r.ensure(100).unwrap();
        assert_eq!(r.positions(), 128);
        let half = 4;
        for pos in [0usize, 1, 63, 64, 127] {
            for i in 0..half {
                let theta = pos as f64 / 10000f64.powf(2.0 * i as f64 / 8.0);
                assert_eq!(r.cos()[pos * half + i], theta.cos() as f32);
                assert_eq!(r.sin()[pos * half + i], theta.sin() as f32);
            }
        }
    }
}
