//! The KV cache: per attention site, one slot (sites outside the recurrence) or one slot per
//! recurrence iteration (`in_loop` sites, the `per-step` policy). Each slot stores keys and
//! values as `[capacity, kv_heads·head_dim]` rows and a filled length `len`; capacity grows by
//! doubling.
//!
//! **Slot filling ("latest" rule).** When a call writes positions `pos0..` into slot `t` whose
//! `len < pos0` (earlier calls ran fewer iterations, so this iteration never saw those
//! positions), the missing rows are first copied, row by row, from the highest slot `t' < t`
//! that holds them. This realises Huginn's `latest-m4` read rule at write time: a position
//! that exited at iteration `e` is seen by later iterations through its last computed KV.
//! Rows no lower slot holds (only possible after a call that ran 0 iterations) are zeros.
//!
//! **Per-token exits inside a call.** [`KvCache::write_rows`] writes only the active rows of a
//! compacted call; the call's other positions take the entry of the previous iteration's slot,
//! which by induction holds the latest entry of that position (computed or copied). With ring
//! policies a slot is `iteration mod c`, so "latest" is the last iteration that wrote that slot
//! (Huginn's compress-s with latest reads).

use crate::artifact::KvSite;
use crate::error::Result;
use crate::mem::AVec;

const MIN_CAP: usize = 16;

#[derive(Default)]
pub(crate) struct Slot {
    k: AVec,
    v: AVec,
    cap: usize,
    len: usize,
}

pub(crate) struct Site {
    pub(crate) name: String,
    pub(crate) width: usize,
    pub(crate) in_loop: bool,
    slots: Vec<Slot>,
}

pub(crate) struct KvCache {
    sites: Vec<Site>,
    /// Slots per in-loop site (`None`: one per iteration).
    ring: Option<usize>,
}

impl KvCache {
    pub(crate) fn new(sites: &[KvSite], ring: Option<usize>) -> Self {
        KvCache {
            ring: ring.map(|c| c.max(1)),
            sites: sites
                .iter()
                .map(|s| Site {
                    name: s.name.clone(),
                    width: s.kv_heads * s.head_dim,
                    in_loop: s.in_loop,
                    slots: Vec::new(),
                })
                .collect(),
        }
    }

    /// Forget all positions (allocations are kept for reuse).
    pub(crate) fn reset(&mut self) {
        for s in &mut self.sites {
            for sl in &mut s.slots {
                sl.len = 0;
            }
        }
    }

    /// The slot a site uses at recurrence iteration `iter` (`None` outside the recurrence).
    #[inline]
    pub(crate) fn slot_of(&self, site: usize, iter: Option<usize>) -> usize {
        if self.sites[site].in_loop {
            let t = iter.unwrap_or(0);
            self.ring.map_or(t, |c| t % c)
        } else {
            0
        }
    }

    /// Make sure `slot` exists and holds at least `rows` rows of capacity.
    pub(crate) fn ensure(&mut self, site: usize, slot: usize, rows: usize) -> Result<()> {
        let s = &mut self.sites[site];
        while s.slots.len() <= slot {
            s.slots.push(Slot::default());
        }
        let width = s.width;
        let sl = &mut s.slots[slot];
        if sl.cap >= rows {
            return Ok(());
        }
        let mut cap = sl.cap.max(MIN_CAP);
        while cap < rows {
            cap = cap.saturating_mul(2);
        }
        let what = format!("KV cache of site `{}`", s.name);
        let elems = cap
            .checked_mul(width)
            .ok_or(crate::error::RuntimeError::Alloc {
                bytes: cap as u128 * width as u128 * 4,
                what: what.clone(),
            })?;
        let mut k = AVec::zeroed(elems, &what)?;
        let mut v = AVec::zeroed(elems, &what)?;
        let n = sl.len * width;
        k.as_mut_slice()[..n].copy_from_slice(&sl.k.as_slice()[..n]);
        v.as_mut_slice()[..n].copy_from_slice(&sl.v.as_slice()[..n]);
        sl.k = k;
        sl.v = v;
        sl.cap = cap;
        Ok(())
    }

    /// Write `rows` rows of keys/values (`[rows, width]`) at positions `pos0..pos0 + rows` of
    /// `slot`, filling any gap below `pos0` first (see the module docs).
    pub(crate) fn write(
        &mut self,
        site: usize,
        slot: usize,
        pos0: usize,
        rows: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        self.ensure(site, slot, pos0 + rows)?;
        self.fill_gap(site, slot, pos0);
        let s = &mut self.sites[site];
        let w = s.width;
        let dst = &mut s.slots[slot];
        let r = pos0 * w..(pos0 + rows) * w;
        copy(&mut dst.k.as_mut_slice()[r.clone()], &k[..rows * w]);
        copy(&mut dst.v.as_mut_slice()[r], &v[..rows * w]);
        dst.len = pos0 + rows;
        Ok(())
    }

    /// Fill rows `len..pos0` of `slot` from the highest lower slot holding each (see the module
    /// docs); the slot must have the capacity.
    fn fill_gap(&mut self, site: usize, slot: usize, pos0: usize) {
        let s = &mut self.sites[site];
        let w = s.width;
        let (lower, rest) = s.slots.split_at_mut(slot);
        let dst = &mut rest[0];
        let mut cur = dst.len;
        while cur < pos0 {
            // The highest lower slot that holds position `cur`.
            match lower.iter().rposition(|l| l.len > cur) {
                Some(src) => {
                    let end = lower[src].len.min(pos0);
                    let r = cur * w..end * w;
                    dst.k.as_mut_slice()[r.clone()]
                        .copy_from_slice(&lower[src].k.as_slice()[r.clone()]);
                    dst.v.as_mut_slice()[r.clone()].copy_from_slice(&lower[src].v.as_slice()[r]);
                    cur = end;
                }
                None => {
                    dst.k.as_mut_slice()[cur * w..pos0 * w].fill(0.0);
                    dst.v.as_mut_slice()[cur * w..pos0 * w].fill(0.0);
                    cur = pos0;
                }
            }
        }
    }

    /// Write the rows of a compacted call: row `i` of `k`/`v` goes to position
    /// `pos0 + rows[i]`; the call's other positions are copied from `prev` (the slot of the
    /// previous iteration), which holds their latest entry.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_rows(
        &mut self,
        site: usize,
        slot: usize,
        prev: Option<usize>,
        pos0: usize,
        s: usize,
        rows: &[usize],
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        self.ensure(site, slot, pos0 + s)?;
        let old_len = self.sites[site].slots[slot].len;
        if old_len < pos0 {
            // Fill the gap below the call exactly as a full write does.
            self.fill_gap(site, slot, pos0);
        }
        let st = &mut self.sites[site];
        let w = st.width;
        if rows.len() < s {
            if let Some(p) = prev.filter(|&p| p != slot && p < st.slots.len()) {
                let (src, dst) = if p < slot {
                    let (a, b) = st.slots.split_at_mut(slot);
                    (&a[p], &mut b[0])
                } else {
                    let (a, b) = st.slots.split_at_mut(p);
                    (&b[0], &mut a[slot])
                };
                let hi = src.len.min(pos0 + s);
                if hi > pos0 {
                    let r = pos0 * w..hi * w;
                    dst.k.as_mut_slice()[r.clone()].copy_from_slice(&src.k.as_slice()[r.clone()]);
                    dst.v.as_mut_slice()[r.clone()].copy_from_slice(&src.v.as_slice()[r]);
                }
            }
        }
        let dst = &mut st.slots[slot];
        for (i, &r) in rows.iter().enumerate() {
            let at = (pos0 + r) * w;
            dst.k.as_mut_slice()[at..at + w].copy_from_slice(&k[i * w..(i + 1) * w]);
            dst.v.as_mut_slice()[at..at + w].copy_from_slice(&v[i * w..(i + 1) * w]);
        }
        dst.len = dst.len.max(pos0 + s);
        Ok(())
    }

    /// Append `n` rows after the slot's filled rows (recursion-wise slots hold only the tokens
    /// that reached their iteration, in position order).
    pub(crate) fn append(
        &mut self,
        site: usize,
        slot: usize,
        n: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let len = self.len(site, slot);
        self.ensure(site, slot, len + n)?;
        let st = &mut self.sites[site];
        let w = st.width;
        let dst = &mut st.slots[slot];
        dst.k.as_mut_slice()[len * w..(len + n) * w].copy_from_slice(&k[..n * w]);
        dst.v.as_mut_slice()[len * w..(len + n) * w].copy_from_slice(&v[..n * w]);
        dst.len = len + n;
        Ok(())
    }

    /// Filled rows of a slot (0 if it does not exist).
    pub(crate) fn len(&self, site: usize, slot: usize) -> usize {
        self.sites[site].slots.get(slot).map_or(0, |s| s.len)
    }

    /// Base pointers of a slot's key and value storage (the slot must exist: see `ensure`).
    pub(crate) fn ptrs(&mut self, site: usize, slot: usize) -> (*mut f32, *mut f32) {
        let sl = &mut self.sites[site].slots[slot];
        (sl.k.as_mut_ptr(), sl.v.as_mut_ptr())
    }

    /// Capacity (rows) of a slot.
    #[cfg(test)]
    pub(crate) fn capacity(&self, site: usize, slot: usize) -> usize {
        self.sites[site].slots.get(slot).map_or(0, |s| s.cap)
    }

    /// Bytes allocated for keys and values.
    pub(crate) fn bytes_allocated(&self) -> usize {
        self.sites
            .iter()
            .map(|s| {
                s.slots
                    .iter()
                    .map(|sl| 2 * 4 * sl.cap * s.width)
                    .sum::<usize>()
            })
            .sum()
    }

    /// Bytes holding filled positions.
    pub(crate) fn bytes_used(&self) -> usize {
        self.sites
            .iter()
            .map(|s| {
                s.slots
                    .iter()
                    .map(|sl| 2 * 4 * sl.len * s.width)
                    .sum::<usize>()
            })
            .sum()
    }

    /// `(site name, per-slot filled lengths)`, for inspection.
    pub(crate) fn lens(&self) -> Vec<(String, Vec<usize>)> {
        self.sites
            .iter()
            .map(|s| (s.name.clone(), s.slots.iter().map(|sl| sl.len).collect()))
            .collect()
    }

    /// Keys and values of the filled rows of a slot (`None` if it does not exist).
    pub(crate) fn slot_rows(&self, site: usize, slot: usize) -> Option<(&[f32], &[f32])> {
        let s = self.sites.get(site)?;
        let sl = s.slots.get(slot)?;
        let n = sl.len * s.width;
        Some((&sl.k.as_slice()[..n], &sl.v.as_slice()[..n]))
    }
}

/// A prefill's rows (megabytes per site) are copied by every thread of the pool: one core
/// alone does not reach the memory's write bandwidth.
fn copy(dst: &mut [f32], src: &[f32]) {
    const CHUNK: usize = 1 << 16;
    assert_eq!(dst.len(), src.len(), "KV copy sizes");
    if src.len() < 2 * CHUNK {
        dst.copy_from_slice(src);
        return;
    }
    let d = dst.as_mut_ptr() as usize;
    crate::par::for_each(src.len().div_ceil(CHUNK), |c| {
        let (a, b) = (c * CHUNK, ((c + 1) * CHUNK).min(src.len()));
        // SAFETY: chunks are disjoint ranges of `dst`, which is as long as `src`.
        unsafe { std::slice::from_raw_parts_mut((d as *mut f32).add(a), b - a) }
            .copy_from_slice(&src[a..b]);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(in_loop: bool) -> KvSite {
        KvSite {
            name: "core.attn".into(),
            kv_heads: 1,
            head_dim: 2,
            in_loop,
        }
    }

    /// Rows tagged `(iteration, position)`.
    fn rows(t: usize, pos0: usize, n: usize) -> Vec<f32> {
        (pos0..pos0 + n)
            .flat_map(|p| [t as f32, p as f32])
            .collect()
    }

    #[test]
    fn slot_fill_rule() {
        let mut kv = KvCache::new(&[site(true)], None);
        // Call 1: prefill of 3 positions, 3 iterations.
        for t in 0..3 {
            let r = rows(t, 0, 3);
            kv.write(0, t, 0, 3, &r, &r).unwrap();
        }
        // Call 2: position 3, only 1 iteration.
        kv.write(0, 0, 3, 1, &rows(0, 3, 1), &rows(0, 3, 1))
            .unwrap();
        // Call 3: position 4, 2 iterations.
        for t in 0..2 {
            kv.write(0, t, 4, 1, &rows(t, 4, 1), &rows(t, 4, 1))
                .unwrap();
        }
        // Call 4: position 5, 4 iterations (slot 3 is new).
        for t in 0..4 {
            kv.write(0, t, 5, 1, &rows(t, 5, 1), &rows(t, 5, 1))
                .unwrap();
        }
        let tags = |slot: usize| -> Vec<(usize, usize)> {
            let (k, v) = kv.slot_rows(0, slot).unwrap();
            assert_eq!(k, v);
            k.chunks(2)
                .map(|c| (c[0] as usize, c[1] as usize))
                .collect()
        };
        assert_eq!(
            tags(0),
            vec![(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5)]
        );
        // Slot 1 lacked position 3 at call 3: copied from slot 0.
        assert_eq!(
            tags(1),
            vec![(1, 0), (1, 1), (1, 2), (0, 3), (1, 4), (1, 5)]
        );
        // Slot 2 lacked 3 and 4 at call 4: 3 from slot 1 (itself a copy of slot 0), 4 from slot 1.
        assert_eq!(
            tags(2),
            vec![(2, 0), (2, 1), (2, 2), (0, 3), (1, 4), (2, 5)]
        );
        // Slot 3 is new: positions 0..2 from slot 2 (the highest holding them), 3, 4 as above.
        assert_eq!(
            tags(3),
            vec![(2, 0), (2, 1), (2, 2), (0, 3), (1, 4), (3, 5)]
        );
        assert_eq!(kv.lens()[0].1, vec![6, 6, 6, 6]);
        assert_eq!(kv.bytes_used(), 4 * 6 * 2 * 2 * 4);
    }

    #[test]
    fn growth_keeps_rows_and_gaps_without_source_are_zero() {
        let mut kv = KvCache::new(&[site(false)], None);
        for p in 0..40 {
            kv.write(0, 0, p, 1, &rows(0, p, 1), &rows(0, p, 1))
                .unwrap();
        }
        assert_eq!(kv.capacity(0, 0), 64);
        let (k, _) = kv.slot_rows(0, 0).unwrap();
        assert!(k.chunks(2).enumerate().all(|(p, c)| c[1] as usize == p));
        // Gap with nothing to copy from: zeros.
        kv.write(0, 0, 45, 1, &rows(9, 45, 1), &rows(9, 45, 1))
            .unwrap();
        let (k, _) = kv.slot_rows(0, 0).unwrap();
        assert_eq!(&k[80..90], &[0.0; 10]);
        assert_eq!(&k[90..92], &[9.0, 45.0]);
        kv.reset();
        assert_eq!(kv.bytes_used(), 0);
        assert!(kv.bytes_allocated() > 0);
    }
}
