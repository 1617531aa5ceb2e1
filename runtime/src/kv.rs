//! The KV cache: per attention site, one slot (sites outside the recurrence) or one slot per
//! recurrence iteration (`in_loop` sites, the `per-step` policy). Each slot stores keys and
//! values as `[capacity, kv_heads·head_dim]` rows and a filled length `len`; capacity grows with
//! headroom (`grown_capacity`).
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

/// The row capacity after a call that needs `rows` rows finds `cap`: unchanged when it suffices,
/// else the larger of `rows` plus a quarter and `cap` plus a half, in multiples of [`MIN_CAP`].
/// Doubling to the next power of two instead left a prompt of 512 positions at a capacity of
/// exactly 512, so the first decode step allocated a new cache and moved every slot into it
/// (d=1024, `loopc run` in a fresh process: 0.75–1.12 s for that step against 0.10 s with the
/// headroom; 144 MiB of slots moved) and then held twice the rows in use. The headroom lets decode
/// follow a prompt for a quarter of its length first; growing by half of what is there keeps the
/// copies of a long decode amortized (decoding 100 000 rows one at a time moves 2.6 rows per row,
/// in 22 reallocations).
pub(crate) fn grown_capacity(cap: usize, rows: usize) -> usize {
    if rows <= cap {
        return cap.max(MIN_CAP);
    }
    let want = rows
        .saturating_add(rows / 4)
        .max(cap.saturating_add(cap / 2))
        .max(MIN_CAP);
    want.checked_next_multiple_of(MIN_CAP).unwrap_or(want)
}

/// The row capacity for a known length: `rows` (at least `cap`) in whole [`MIN_CAP`]s.
pub(crate) fn exact_capacity(cap: usize, rows: usize) -> usize {
    let want = rows.max(cap).max(MIN_CAP);
    want.checked_next_multiple_of(MIN_CAP).unwrap_or(want)
}

/// A slot's keys and values.
type Kv<'a> = (&'a [f32], &'a [f32]);
type KvMut<'a> = (&'a mut [f32], &'a mut [f32]);

/// A slot's filled rows; its storage is a window of the cache's one allocation.
#[derive(Default, Clone, Copy)]
pub(crate) struct Slot {
    len: usize,
}

pub(crate) struct Site {
    pub(crate) name: String,
    pub(crate) width: usize,
    pub(crate) in_loop: bool,
    /// The slots in use.
    slots: Vec<Slot>,
    /// Where slot 0's keys start in the storage (floats).
    base: usize,
    /// Slots the storage has room for.
    room: usize,
}

/// All slots of all sites live in one allocation, on huge pages once it reaches one: decode
/// attention reads every slot's rows once per token, and with a buffer of its own per slot on
/// 4 KiB pages (d = 256: 72 buffers of 256 KiB) those reads missed the TLB. Measured against
/// that (`--profile`, f32, alternating): d = 1024 (128 + 32 tokens) attention 193–215 →
/// 162–165 ms, KV writes 25–28 → 16–18 ms; d = 256 (128 + 64) decode 231–281 → 258–290 tok/s,
/// attention within noise. Slot `t` of a site holds its keys at `base + 2·t·cap·width` and its
/// values `cap·width` after them.
pub(crate) struct KvCache {
    sites: Vec<Site>,
    /// Slots per in-loop site (`None`: one per iteration).
    ring: Option<usize>,
    store: AVec,
    /// Rows of every slot's storage.
    cap: usize,
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
                    base: 0,
                    room: 0,
                })
                .collect(),
            store: AVec::new(),
            cap: 0,
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

    /// Room for `iterations` recurrence iterations and `rows` positions in every site, so that
    /// a call grows the storage at most once, before it starts.
    pub(crate) fn reserve(&mut self, iterations: usize, rows: usize) -> Result<()> {
        self.reserve_with(iterations, rows, grown_capacity)
    }

    /// [`KvCache::reserve`] for a caller that knows the sequence's length: room for exactly
    /// `rows` rows (in multiples of [`MIN_CAP`]), no headroom.
    pub(crate) fn reserve_exact(&mut self, iterations: usize, rows: usize) -> Result<()> {
        self.reserve_with(iterations, rows, exact_capacity)
    }

    fn reserve_with(
        &mut self,
        iterations: usize,
        rows: usize,
        capacity: fn(usize, usize) -> usize,
    ) -> Result<()> {
        let per_loop = self.ring.map_or(iterations, |c| c.min(iterations)).max(1);
        if rows <= self.cap
            && self
                .sites
                .iter()
                .all(|s| s.room >= Self::room_for(s, per_loop))
        {
            return Ok(());
        }
        self.grow(per_loop, capacity(self.cap, rows))
    }

    fn room_for(s: &Site, per_loop: usize) -> usize {
        if s.in_loop {
            per_loop
        } else {
            1
        }
    }

    /// Make sure `slot` exists and holds at least `rows` rows of capacity.
    pub(crate) fn ensure(&mut self, site: usize, slot: usize, rows: usize) -> Result<()> {
        let room = self.sites[site].room;
        if slot >= room || rows > self.cap {
            // Beyond the reservation (a caller that did not reserve): double what is short, and
            // only that (0 keeps every site's room).
            let per_loop = if slot >= room {
                let want = (slot + 1).max(2 * room);
                self.ring.map_or(want, |c| c.min(want))
            } else {
                0
            };
            self.grow(per_loop, grown_capacity(self.cap, rows))?;
        }
        let s = &mut self.sites[site];
        if s.slots.len() <= slot {
            s.slots.resize(slot + 1, Slot::default());
        }
        Ok(())
    }

    /// Reallocate with room for at least `per_loop` slots per in-loop site and `cap` rows
    /// per slot, moving every slot's filled rows.
    fn grow(&mut self, per_loop: usize, cap: usize) -> Result<()> {
        // Sizes in u128, so that one past the address space is reported as what was asked.
        let mut rooms = Vec::with_capacity(self.sites.len());
        let mut floats = 0u128;
        for s in &self.sites {
            let room = s.room.max(Self::room_for(s, per_loop));
            rooms.push((floats, room));
            let site = [room, 2, cap, s.width]
                .iter()
                .fold(1u128, |a, &x| a.saturating_mul(x as u128));
            floats = floats.saturating_add(site);
        }
        let total = usize::try_from(floats).map_err(|_| crate::error::RuntimeError::Alloc {
            bytes: floats.saturating_mul(4),
            what: "KV cache".into(),
        })?;
        let mut store = AVec::zeroed_huge(total, "KV cache")?;
        for (s, &(base, room)) in self.sites.iter_mut().zip(&rooms) {
            // At most `total`, so it fits.
            let base = base as usize;
            let w = s.width;
            for (t, sl) in s.slots.iter().enumerate() {
                let n = sl.len * w;
                let (from, to) = (s.base + 2 * t * self.cap * w, base + 2 * t * cap * w);
                let (old, new) = (self.store.as_slice(), store.as_mut_slice());
                copy(&mut new[to..to + n], &old[from..from + n]);
                let (from, to) = (from + self.cap * w, to + cap * w);
                copy(&mut new[to..to + n], &old[from..from + n]);
            }
            s.base = base;
            s.room = room;
        }
        self.store = store;
        self.cap = cap;
        Ok(())
    }

    /// Float ranges of a slot's keys and values in the storage.
    #[inline]
    fn ranges(&self, site: usize, slot: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let s = &self.sites[site];
        let k = s.base + 2 * slot * self.cap * s.width;
        let v = k + self.cap * s.width;
        (k..v, v..v + self.cap * s.width)
    }

    /// Keys and values of two different slots, the first mutable.
    fn pair(&mut self, (site, dst): (usize, usize), src: usize) -> (KvMut<'_>, Kv<'_>) {
        debug_assert_ne!(dst, src);
        let (dk, dv) = self.ranges(site, dst);
        let (sk, sv) = self.ranges(site, src);
        let p = self.store.as_mut_ptr();
        // SAFETY: distinct slots are disjoint ranges of the storage, which `&mut self` holds.
        unsafe {
            let part =
                |r: std::ops::Range<usize>| std::slice::from_raw_parts_mut(p.add(r.start), r.len());
            ((part(dk), part(dv)), (&*part(sk), &*part(sv)))
        }
    }

    /// Keys and values of one slot.
    fn slot_mut(&mut self, site: usize, slot: usize) -> KvMut<'_> {
        let (k, v) = self.ranges(site, slot);
        let (a, b) = self.store.as_mut_slice()[k.start..v.end].split_at_mut(k.len());
        (a, b)
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
        let w = self.sites[site].width;
        let r = pos0 * w..(pos0 + rows) * w;
        let (dk, dv) = self.slot_mut(site, slot);
        copy(&mut dk[r.clone()], &k[..rows * w]);
        copy(&mut dv[r], &v[..rows * w]);
        self.sites[site].slots[slot].len = pos0 + rows;
        Ok(())
    }

    /// Fill rows `len..pos0` of `slot` from the highest lower slot holding each (see the module
    /// docs); the slot must have the capacity.
    fn fill_gap(&mut self, site: usize, slot: usize, pos0: usize) {
        let w = self.sites[site].width;
        let mut cur = self.sites[site].slots[slot].len;
        while cur < pos0 {
            // The highest lower slot that holds position `cur`.
            let lower = &self.sites[site].slots[..slot];
            match lower.iter().rposition(|l| l.len > cur) {
                Some(src) => {
                    let end = lower[src].len.min(pos0);
                    let r = cur * w..end * w;
                    let ((dk, dv), (sk, sv)) = self.pair((site, slot), src);
                    dk[r.clone()].copy_from_slice(&sk[r.clone()]);
                    dv[r.clone()].copy_from_slice(&sv[r]);
                    cur = end;
                }
                None => {
                    let (dk, dv) = self.slot_mut(site, slot);
                    dk[cur * w..pos0 * w].fill(0.0);
                    dv[cur * w..pos0 * w].fill(0.0);
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
        let w = self.sites[site].width;
        if rows.len() < s {
            let slots = &self.sites[site].slots;
            if let Some(p) = prev.filter(|&p| p != slot && p < slots.len()) {
                let hi = slots[p].len.min(pos0 + s);
                if hi > pos0 {
                    let r = pos0 * w..hi * w;
                    let ((dk, dv), (sk, sv)) = self.pair((site, slot), p);
                    dk[r.clone()].copy_from_slice(&sk[r.clone()]);
                    dv[r.clone()].copy_from_slice(&sv[r]);
                }
            }
        }
        let (dk, dv) = self.slot_mut(site, slot);
        for (i, &r) in rows.iter().enumerate() {
            let at = (pos0 + r) * w;
            dk[at..at + w].copy_from_slice(&k[i * w..(i + 1) * w]);
            dv[at..at + w].copy_from_slice(&v[i * w..(i + 1) * w]);
        }
        let dst = &mut self.sites[site].slots[slot];
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
        let w = self.sites[site].width;
        let (dk, dv) = self.slot_mut(site, slot);
        dk[len * w..(len + n) * w].copy_from_slice(&k[..n * w]);
        dv[len * w..(len + n) * w].copy_from_slice(&v[..n * w]);
        self.sites[site].slots[slot].len = len + n;
        Ok(())
    }

    /// Filled rows of a slot (0 if it does not exist).
    pub(crate) fn len(&self, site: usize, slot: usize) -> usize {
        self.sites[site].slots.get(slot).map_or(0, |s| s.len)
    }

    /// Base pointers of a slot's key and value storage (the slot must exist: see `ensure`).
    /// They are valid until the next call that may grow the cache (`reserve`, `ensure` and the
    /// writes).
    pub(crate) fn ptrs(&mut self, site: usize, slot: usize) -> (*mut f32, *mut f32) {
        let (dk, dv) = self.slot_mut(site, slot);
        (dk.as_mut_ptr(), dv.as_mut_ptr())
    }

    /// Capacity (rows) of a slot.
    #[cfg(test)]
    pub(crate) fn capacity(&self, site: usize, slot: usize) -> usize {
        if self.sites[site].slots.get(slot).is_some() {
            self.cap
        } else {
            0
        }
    }

    /// Bytes of storage for the slots in use (room reserved for iterations no call has run yet
    /// is address space only: its pages are never touched).
    pub(crate) fn bytes_allocated(&self) -> usize {
        self.sites
            .iter()
            .map(|s| 2 * 4 * s.slots.len() * self.cap * s.width)
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
    pub(crate) fn slot_rows(&self, site: usize, slot: usize) -> Option<Kv<'_>> {
        let s = self.sites.get(site)?;
        let n = s.slots.get(slot)?.len * s.width;
        let (k, v) = self.ranges(site, slot);
        let st = self.store.as_slice();
        Some((&st[k.start..k.start + n], &st[v.start..v.start + n]))
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
        // 16, then 32 at row 17 (21 rounded up), then 48 at row 33 (32 plus a half).
        assert_eq!(kv.capacity(0, 0), 48);
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

    /// Sites of different widths, in and out of the loop, growing in capacity and in slots by
    /// turns: every filled row survives each move of the shared storage, and slots never overlap.
    #[test]
    fn shared_storage_moves_keep_every_slot() {
        let sites = [
            site(false),
            KvSite {
                name: "core.attn".into(),
                kv_heads: 2,
                head_dim: 3,
                in_loop: true,
            },
            site(true),
        ];
        let mut kv = KvCache::new(&sites, None);
        let tag = |site: usize, t: usize, p: usize, w: usize| -> Vec<f32> {
            (0..w)
                .map(|c| (site * 1_000_000 + t * 10_000 + p * 10 + c) as f32)
                .collect()
        };
        let widths = [2, 6, 2];
        // Position by position, one more iteration every 7 positions (slots 0..=5).
        for p in 0..40 {
            let iters = 1 + p / 7;
            for (st, &w) in widths.iter().enumerate() {
                let slots = if st == 0 { 1 } else { iters };
                for t in 0..slots {
                    let r = tag(st, t, p, w);
                    let neg: Vec<f32> = r.iter().map(|x| -x).collect();
                    kv.write(st, t, p, 1, &r, &neg).unwrap();
                }
            }
        }
        assert_eq!(kv.capacity(1, 5), 48);
        for (st, &w) in widths.iter().enumerate() {
            let slots = if st == 0 { 1 } else { 6 };
            for t in 0..slots {
                let (k, v) = kv.slot_rows(st, t).unwrap();
                assert_eq!(k.len(), 40 * w);
                for p in 0..40 {
                    // Positions before slot t existed were copied from the highest lower slot.
                    let src = if st == 0 { 0 } else { t.min(p / 7) };
                    let want = tag(st, src, p, w);
                    assert_eq!(
                        &k[p * w..(p + 1) * w],
                        &want[..],
                        "site {st} slot {t} pos {p}"
                    );
                    assert!(v[p * w..(p + 1) * w]
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| *a == -b));
                }
            }
        }
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for (st, &w) in widths.iter().enumerate() {
            for t in 0..if st == 0 { 1 } else { 6 } {
                let (k, v) = kv.ptrs(st, t);
                for p in [k, v] {
                    spans.push((p as usize, p as usize + 4 * kv.cap * w));
                }
            }
        }
        spans.sort();
        assert!(spans.windows(2).all(|a| a[0].1 <= a[1].0), "slots overlap");
    }

    /// A prompt, then decode one row at a time: the prompt leaves room for a quarter of its
    /// length, and a long decode moves each row a bounded number of times.
    #[test]
    fn growth_leaves_headroom_and_amortizes_copies() {
        for prompt in [1usize, 16, 100, 128, 512, 4096] {
            let cap = grown_capacity(0, prompt);
            assert!(
                cap >= prompt + prompt / 4 && cap.is_multiple_of(MIN_CAP),
                "{prompt}: {cap}"
            );
            assert!(cap < prompt + prompt / 4 + MIN_CAP, "{prompt}: {cap}");
            // Decode for a quarter of the prompt without moving anything.
            assert_eq!(grown_capacity(cap, prompt + prompt / 4), cap);
        }
        let (mut cap, mut moved, mut grows) = (0usize, 0usize, 0usize);
        let last = 100_000;
        for rows in 1..=last {
            let next = grown_capacity(cap, rows);
            if next != cap {
                assert!(
                    next >= rows && next >= cap + cap / 2,
                    "{cap} → {next} at {rows}"
                );
                moved += rows - 1;
                grows += 1;
            }
            cap = next;
        }
        assert!(moved <= 3 * last, "{moved} rows moved for {last}");
        assert!(grows <= 30, "{grows} reallocations");
        assert!(
            cap <= last + last / 2 + MIN_CAP,
            "{cap} rows held for {last}"
        );
        assert_eq!(grown_capacity(usize::MAX - 3, usize::MAX), usize::MAX);
    }

    /// After `reserve` a call's slots never move, so kernel pointers taken early stay valid.
    #[test]
    fn reserve_fixes_the_storage_for_a_call() {
        let mut kv = KvCache::new(&[site(false), site(true)], None);
        kv.reserve(8, 100).unwrap();
        kv.ensure(1, 0, 100).unwrap();
        let first = kv.ptrs(1, 0);
        for t in 0..8 {
            kv.write(1, t, 0, 100, &rows(t, 0, 100), &rows(t, 0, 100))
                .unwrap();
            kv.write(0, 0, 0, 100, &rows(0, 0, 100), &rows(0, 0, 100))
                .unwrap();
        }
        assert_eq!(kv.ptrs(1, 0), first);
        // Growing for rows alone leaves the slot room as it was.
        kv.ensure(1, 0, 300).unwrap();
        assert_eq!((kv.sites[1].room, kv.cap), (8, 384));
        assert!(kv.slot_rows(1, 7).unwrap().0.chunks(2).all(|c| c[0] == 7.0));
        // A ring keeps its slot count.
        let mut ring = KvCache::new(&[site(true)], Some(2));
        ring.reserve(8, 4).unwrap();
        assert_eq!(ring.sites[0].room, 2);
    }

    /// A reservation past the address space is an error that gives the size asked for, and
    /// leaves the cache as it was.
    #[test]
    fn reservation_past_the_address_space_is_an_error() {
        let mut kv = KvCache::new(&[site(false), site(true)], None);
        kv.reserve_exact(2, 16).unwrap();
        let e = kv.reserve_exact(usize::MAX, 16).unwrap_err().to_string();
        assert!(
            e.contains("GiB (more than the address space) for KV cache"),
            "{e}"
        );
        let e = kv.reserve_exact(3, usize::MAX / 2).unwrap_err().to_string();
        assert!(e.contains("more than the address space"), "{e}");
        assert_eq!((kv.cap, kv.sites[1].room), (16, 2));
    }

    /// A reservation for a known length holds that many rows (whole `MIN_CAP`s), no headroom;
    /// rows written within it keep the storage, rows past it grow it with headroom, moving
    /// what was written.
    #[test]
    fn exact_reservation_holds_what_was_asked() {
        let mut kv = KvCache::new(&[site(false), site(true)], None);
        kv.reserve_exact(3, 100).unwrap();
        assert_eq!((kv.cap, kv.sites[1].room), (112, 3));
        let first = kv.ptrs(1, 0);
        for pos in 0..112 {
            for t in 0..3 {
                kv.write(1, t, pos, 1, &rows(t, pos, 1), &rows(t, pos, 1))
                    .unwrap();
            }
        }
        assert_eq!(kv.ptrs(1, 0), first);
        // Asking for less, or for what is there, changes nothing.
        kv.reserve_exact(2, 50).unwrap();
        kv.reserve_exact(3, 112).unwrap();
        assert_eq!((kv.cap, kv.ptrs(1, 0)), (112, first));
        kv.write(1, 0, 112, 1, &rows(0, 112, 1), &rows(0, 112, 1))
            .unwrap();
        assert_eq!(kv.cap, grown_capacity(112, 113));
        assert_ne!(kv.ptrs(1, 0), first);
        assert_eq!(
            kv.slot_rows(1, 2).unwrap().0[..2 * 112],
            rows(2, 0, 112)[..]
        );
        assert_eq!(
            kv.slot_rows(1, 0).unwrap().0[..2 * 113],
            rows(0, 0, 113)[..]
        );
    }
}
