//! Active-row bookkeeping for physical early exit: which buffers must be compacted with the
//! state, and the runs of consecutive positions that position-dependent kernels are called on.

use crate::artifact::{BufId, Instr, Manifest, Recur, Rows};
use std::collections::BTreeSet;

/// Per-token buffers the body (and the readout) read but never write: the loop invariants
/// (Huginn's injected embeddings). They are compacted with the state and restored afterwards.
pub(crate) fn live_ins(m: &Manifest, rec: &Recur) -> Vec<BufId> {
    let readout = rec.readout.iter().map(|&i| &m.program.coda[i as usize]);
    let all: Vec<&Instr> = rec.body.iter().chain(&rec.router).chain(readout).collect();
    let mut read = BTreeSet::new();
    let mut written = BTreeSet::new();
    for ins in &all {
        let (r, w) = m.reads_writes(ins);
        read.extend(r);
        written.extend(w);
    }
    read.into_iter()
        .filter(|b| !written.contains(b) && *b != rec.state && *b != rec.next)
        .filter(|b| m.buffers[*b as usize].rows == Rows::Tokens)
        .collect()
}

/// Maximal runs `[i0, i1)` of compact rows whose positions are consecutive.
pub(crate) fn runs(active: &[usize]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= active.len() {
            return None;
        }
        let i0 = i;
        i += 1;
        while i < active.len() && active[i] == active[i - 1] + 1 {
            i += 1;
        }
        Some((i0, i))
    })
}

/// Move row `keep[j]` to row `j` (in place: `keep` is increasing, so rows only move down).
pub(crate) fn gather(buf: &mut [f32], cols: usize, keep: &[usize]) {
    for (j, &i) in keep.iter().enumerate() {
        if i != j {
            buf.copy_within(i * cols..(i + 1) * cols, j * cols);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_gather() {
        let r: Vec<_> = runs(&[0, 1, 3, 4, 5, 9]).collect();
        assert_eq!(r, vec![(0, 2), (2, 5), (5, 6)]);
        let mut b = vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        gather(&mut b, 2, &[1, 2]);
        assert_eq!(&b[..4], &[2.0, 3.0, 4.0, 5.0]);
    }
}
