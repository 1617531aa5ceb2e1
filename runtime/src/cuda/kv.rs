//! The KV cache in device memory, with the CPU cache's rules (`crate::kv`): slots per policy,
//! capacity growth (`crate::kv::grown_capacity`), the "latest" gap fill from lower slots, and
//! for a call with exited rows the previous iteration's entries where the CPU's compacted write
//! leaves them. Lengths live on the host (they follow from the calls and the iterations that
//! ran), so no read-back is needed.

use super::gpu::{DevMem, Gpu};
use crate::artifact::KvSite;
use crate::error::{Result, RuntimeError};

#[derive(Default)]
struct Slot {
    k: Option<DevMem>,
    v: Option<DevMem>,
    cap: usize,
    len: usize,
}

struct Site {
    name: String,
    width: usize,
    in_loop: bool,
    slots: Vec<Slot>,
}

pub(crate) struct DevKv {
    sites: Vec<Site>,
    ring: Option<usize>,
}

/// Masks of a call with exited rows: `active[r]` and `exited[r]` (i32, one per call row).
#[derive(Clone, Copy)]
pub(crate) struct Masks {
    pub active: u64,
    pub exited: u64,
}

impl DevKv {
    pub(crate) fn new(sites: &[KvSite], ring: Option<usize>) -> Self {
        DevKv {
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

    pub(crate) fn reset(&mut self) {
        for s in &mut self.sites {
            for sl in &mut s.slots {
                sl.len = 0;
            }
        }
    }

    pub(crate) fn slot_of(&self, site: usize, iter: Option<usize>) -> usize {
        if self.sites[site].in_loop {
            let t = iter.unwrap_or(0);
            self.ring.map_or(t, |c| t % c)
        } else {
            0
        }
    }

    /// Key and value base addresses of a slot (it must exist: see [`DevKv::ensure`]).
    pub(crate) fn addrs(&self, site: usize, slot: usize) -> (u64, u64) {
        let sl = &self.sites[site].slots[slot];
        (
            sl.k.as_ref().map_or(0, |m| m.addr),
            sl.v.as_ref().map_or(0, |m| m.addr),
        )
    }

    pub(crate) fn ensure(
        &mut self,
        gpu: &dyn Gpu,
        site: usize,
        slot: usize,
        rows: usize,
    ) -> Result<()> {
        self.ensure_with(gpu, site, slot, rows, crate::kv::grown_capacity)
    }

    /// [`DevKv::ensure`] for a caller that knows the sequence's length: exactly `rows` rows
    /// (in the host cache's units), no headroom.
    pub(crate) fn reserve_exact(
        &mut self,
        gpu: &dyn Gpu,
        site: usize,
        slot: usize,
        rows: usize,
    ) -> Result<()> {
        self.ensure_with(gpu, site, slot, rows, crate::kv::exact_capacity)
    }

    fn ensure_with(
        &mut self,
        gpu: &dyn Gpu,
        site: usize,
        slot: usize,
        rows: usize,
        capacity: fn(usize, usize) -> usize,
    ) -> Result<()> {
        let s = &mut self.sites[site];
        while s.slots.len() <= slot {
            s.slots.push(Slot::default());
        }
        let w = s.width;
        let sl = &mut s.slots[slot];
        if sl.cap >= rows && sl.k.is_some() {
            return Ok(());
        }
        let cap = capacity(sl.cap, rows);
        let bytes =
            cap.checked_mul(w)
                .and_then(|e| e.checked_mul(4))
                .ok_or(RuntimeError::Alloc {
                    bytes: cap as u128 * w as u128 * 4,
                    what: format!("KV cache of site `{}`", s.name),
                })?;
        let (k, v) = (
            gpu.alloc(bytes, &format!("K `{}` slot {slot}", s.name))?,
            gpu.alloc(bytes, &format!("V `{}` slot {slot}", s.name))?,
        );
        if let (Some(ok), Some(ov)) = (&sl.k, &sl.v) {
            gpu.copy(k.addr, ok.addr, sl.len * w * 4)?;
            gpu.copy(v.addr, ov.addr, sl.len * w * 4)?;
        }
        sl.k = Some(k);
        sl.v = Some(v);
        sl.cap = cap;
        Ok(())
    }

    /// Rows `len..pos0` of `slot` from the highest lower slot holding each, else zeros.
    fn fill_gap(&mut self, gpu: &dyn Gpu, site: usize, slot: usize, pos0: usize) -> Result<()> {
        let s = &self.sites[site];
        let w4 = s.width * 4;
        let dst = &s.slots[slot];
        let (dk, dv) = (
            dst.k.as_ref().map_or(0, |m| m.addr),
            dst.v.as_ref().map_or(0, |m| m.addr),
        );
        let mut cur = dst.len;
        while cur < pos0 {
            match s.slots[..slot].iter().rposition(|l| l.len > cur) {
                Some(src) => {
                    let l = &s.slots[src];
                    let end = l.len.min(pos0);
                    let (sk, sv) = (
                        l.k.as_ref().map_or(0, |m| m.addr),
                        l.v.as_ref().map_or(0, |m| m.addr),
                    );
                    let (off, n) = ((cur * w4) as u64, (end - cur) * w4);
                    gpu.copy(dk + off, sk + off, n)?;
                    gpu.copy(dv + off, sv + off, n)?;
                    cur = end;
                }
                None => {
                    let (off, n) = ((cur * w4) as u64, (pos0 - cur) * w4);
                    gpu.zero(dk + off, n)?;
                    gpu.zero(dv + off, n)?;
                    cur = pos0;
                }
            }
        }
        Ok(())
    }

    /// Write the call's `rows` key/value rows (`[rows, width]` at `k`, `v`) at positions
    /// `pos0..`. With `masks`, only active rows are written and exited rows take the entry of
    /// `prev` (the previous iteration's slot), as the CPU's compacted write does; `select`
    /// launches the `select_rows` support kernel `(dst, src, mask, rows, n)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write(
        &mut self,
        gpu: &dyn Gpu,
        site: usize,
        slot: usize,
        prev: Option<usize>,
        pos0: usize,
        rows: usize,
        k: u64,
        v: u64,
        masks: Option<Masks>,
        select: &dyn Fn(u64, u64, u64, usize, usize) -> Result<()>,
    ) -> Result<()> {
        self.ensure(gpu, site, slot, pos0 + rows)?;
        if self.sites[site].slots[slot].len < pos0 {
            self.fill_gap(gpu, site, slot, pos0)?;
        }
        let w = self.sites[site].width;
        let at = (pos0 * w * 4) as u64;
        let (dk, dv) = self.addrs(site, slot);
        match masks {
            None => {
                gpu.copy(dk + at, k, rows * w * 4)?;
                gpu.copy(dv + at, v, rows * w * 4)?;
                self.sites[site].slots[slot].len = pos0 + rows;
            }
            Some(mk) => {
                if let Some(p) = prev.filter(|&p| p != slot && p < self.sites[site].slots.len()) {
                    let hi = self.sites[site].slots[p].len.min(pos0 + rows);
                    if hi > pos0 {
                        let (pk, pv) = self.addrs(site, p);
                        select(dk + at, pk + at, mk.exited, hi - pos0, w)?;
                        select(dv + at, pv + at, mk.exited, hi - pos0, w)?;
                    }
                }
                select(dk + at, k, mk.active, rows, w)?;
                select(dv + at, v, mk.active, rows, w)?;
                let sl = &mut self.sites[site].slots[slot];
                sl.len = sl.len.max(pos0 + rows);
            }
        }
        Ok(())
    }

    /// Append `rows` key/value rows (`[rows, width]` at `k`, `v`) after the slot's filled rows:
    /// a recursion-wise slot holds only the tokens that ran its iteration, in position order.
    pub(crate) fn append(
        &mut self,
        gpu: &dyn Gpu,
        site: usize,
        slot: usize,
        rows: usize,
        k: u64,
        v: u64,
    ) -> Result<()> {
        let len = self.len(site, slot);
        self.ensure(gpu, site, slot, len + rows)?;
        let w = self.sites[site].width;
        let at = (len * w * 4) as u64;
        let (dk, dv) = self.addrs(site, slot);
        gpu.copy(dk + at, k, rows * w * 4)?;
        gpu.copy(dv + at, v, rows * w * 4)?;
        self.sites[site].slots[slot].len = len + rows;
        Ok(())
    }

    /// The filled rows of a slot (0 for a slot not yet made).
    pub(crate) fn len(&self, site: usize, slot: usize) -> usize {
        self.sites[site].slots.get(slot).map_or(0, |s| s.len)
    }

    pub(crate) fn in_loop(&self, site: usize) -> bool {
        self.sites[site].in_loop
    }

    pub(crate) fn bytes_allocated(&self) -> usize {
        self.sites
            .iter()
            .map(|s| s.slots.iter().map(|sl| 8 * sl.cap * s.width).sum::<usize>())
            .sum()
    }

    pub(crate) fn bytes_used(&self) -> usize {
        self.sites
            .iter()
            .map(|s| s.slots.iter().map(|sl| 8 * sl.len * s.width).sum::<usize>())
            .sum()
    }

    pub(crate) fn lens(&self) -> Vec<(String, Vec<usize>)> {
        self.sites
            .iter()
            .map(|s| (s.name.clone(), s.slots.iter().map(|sl| sl.len).collect()))
            .collect()
    }
}
