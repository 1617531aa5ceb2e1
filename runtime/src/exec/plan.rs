//! The workspace's memory plan: per-token buffers whose live ranges never overlap share
//! storage. The lowering gives every value its own buffer, so without this a call held the
//! activations of every layer at once (632 KB per token for the d=1024 Huginn model: 2.6 GB of
//! buffers at a 4096-token prompt, more than the weights).
//!
//! Time is the order in which one call runs the program: the prelude, then the loop region
//! (router, body, and the coda instructions that the per-step readout runs after every
//! iteration), then the coda. A buffer lives from its first to its last reference, except that
//! one referenced in the loop region lives through the whole region when it is also referenced
//! outside it, or when the region reads it before writing it (it carries a value into the next
//! iteration, or in from before the loop). Buffers the runtime reads or writes outside the
//! instructions (the state pair, the logits, the exit gate, the router output, an initial
//! state's source), fixed-size buffers, and buffers some instruction reads before any writes
//! them (their value is the initial zeros) keep storage of their own.

use crate::artifact::{BufId, Instr, Manifest, Rows, StateInit};

/// Offsets are multiples of this many floats per row, so that every buffer starts 64-byte
/// aligned in an aligned arena (the GEMM kernels assume it for their streams).
const ALIGN_COLS: usize = 16;

/// Where each buffer lives: `Some(o)` at float `o · S` of the shared arena (`S` rows per
/// buffer; `o` counts floats per row), `None` in storage of its own.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    pub(crate) offset: Vec<Option<usize>>,
    /// Floats per row of the arena.
    pub(crate) arena_cols: usize,
}

/// The plan for `man`; with `share` false, every buffer has storage of its own.
pub(crate) fn plan(man: &Manifest, share: bool) -> Plan {
    let n = man.buffers.len();
    let mut plan = Plan {
        offset: vec![None; n],
        arena_cols: 0,
    };
    if !share {
        return plan;
    }
    let prog = &man.program;
    // (time, instruction, in the loop region) in execution order.
    let mut order: Vec<(&Instr, bool)> = prog.prelude.iter().map(|i| (i, false)).collect();
    let mut pinned = vec![false; n];
    pinned[prog.logits as usize] = true;
    if let Some(rec) = &prog.recur {
        order.extend(rec.router.iter().map(|i| (i, true)));
        order.extend(rec.body.iter().map(|i| (i, true)));
        order.extend(
            rec.readout
                .iter()
                .filter_map(|&c| prog.coda.get(c as usize))
                .map(|i| (i, true)),
        );
        for b in [Some(rec.state), Some(rec.next), rec.gate, rec.router_out]
            .into_iter()
            .flatten()
        {
            pinned[b as usize] = true;
        }
        if let StateInit::From(b) = rec.init {
            pinned[b as usize] = true;
        }
        // `loopc trace` reads each layer's output after the iteration has finished.
        for b in crate::trace::Plan::of(man, rec).layers {
            pinned[b as usize] = true;
        }
    }
    let loop_start = prog.prelude.len();
    let loop_end = order.len();
    order.extend(prog.coda.iter().map(|i| (i, false)));
    // Per buffer: first and last reference, whether the loop region references it, whether
    // the region (in its order) reads it before writing it, whether anything outside the
    // region references it, and whether it was ever written before a read.
    #[derive(Clone, Default)]
    struct Use {
        first: Option<usize>,
        last: usize,
        in_loop: bool,
        loop_written: bool,
        loop_reads_first: bool,
        outside: bool,
        written: bool,
    }
    let mut uses = vec![Use::default(); n];
    for (t, &(ins, in_loop)) in order.iter().enumerate() {
        let (reads, writes) = man.reads_writes(ins);
        for &b in &reads {
            let u = &mut uses[b as usize];
            if !u.written {
                // Read before any write: its value is the initial zeros (or the runtime's).
                pinned[b as usize] = true;
            }
            if in_loop && !u.loop_written {
                u.loop_reads_first = true;
            }
        }
        for &b in reads.iter().chain(&writes) {
            let u = &mut uses[b as usize];
            u.first.get_or_insert(t);
            u.last = t;
            if in_loop {
                u.in_loop = true;
            } else {
                u.outside = true;
            }
        }
        for &b in &writes {
            let u = &mut uses[b as usize];
            u.written = true;
            if in_loop {
                u.loop_written = true;
            }
        }
    }
    // Live intervals [from, to] of the shareable per-token buffers.
    let mut items: Vec<(BufId, usize, usize, usize)> = Vec::new();
    for (b, u) in uses.iter().enumerate() {
        let decl = &man.buffers[b];
        let Some(first) = u.first else { continue };
        if pinned[b] || decl.rows != Rows::Tokens || decl.cols == 0 {
            continue;
        }
        let (mut from, mut to) = (first, u.last);
        if u.in_loop && (u.outside || u.loop_reads_first) {
            from = from.min(loop_start);
            to = to.max(loop_end.saturating_sub(1));
        }
        items.push((b as BufId, from, to, decl.cols.next_multiple_of(ALIGN_COLS)));
    }
    // Largest first, each at the lowest offset clear of the placed buffers it overlaps in time.
    items.sort_by_key(|&(b, from, _, cols)| (std::cmp::Reverse(cols), from, b));
    let mut placed: Vec<(usize, usize, usize, usize)> = Vec::new(); // (from, to, offset, cols)
    for &(b, from, to, cols) in &items {
        let mut clash: Vec<(usize, usize)> = placed
            .iter()
            .filter(|p| p.0 <= to && from <= p.1)
            .map(|p| (p.2, p.2 + p.3))
            .collect();
        clash.sort_unstable();
        let mut off = 0;
        for (lo, hi) in clash {
            if off + cols <= lo {
                break;
            }
            off = off.max(hi);
        }
        placed.push((from, to, off, cols));
        plan.offset[b as usize] = Some(off);
        plan.arena_cols = plan.arena_cols.max(off + cols);
    }
    debug_assert_eq!(
        overlapping_operands(man, &plan, order.iter().map(|o| o.0)),
        None
    );
    plan
}

/// The first instruction (in `order`) two of whose buffers share arena floats, with the two
/// buffers: the plan's verifier, run on every plan in debug builds and tests.
fn overlapping_operands<'a>(
    man: &Manifest,
    plan: &Plan,
    order: impl Iterator<Item = &'a Instr>,
) -> Option<(usize, BufId, BufId)> {
    let range = |b: BufId| {
        let o = plan.offset[b as usize]?;
        Some(o..o + man.buffers[b as usize].cols)
    };
    for (t, ins) in order.enumerate() {
        let bufs = ins.buffers();
        for (i, &a) in bufs.iter().enumerate() {
            for &b in &bufs[i + 1..] {
                if let (Some(ra), Some(rb)) = (range(a), range(b)) {
                    if a != b && ra.start < rb.end && rb.start < ra.end {
                        return Some((t, a, b));
                    }
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::*;
    use std::collections::BTreeMap;

    const H: usize = 16;

    /// Buffers: 0 embeddings, 1–2 prelude temporaries, 3 the injected input (read by the
    /// body), 4 state, 5–7 body temporaries, 8 next, 9 a value the body carries to the next
    /// iteration (set in the prelude, read then rewritten by the body), 10 a coda temporary, 11
    /// logits, 12 never written (read by the coda: its zeros count), 13 wider than the rest, 14
    /// the widest, a body temporary written after the body's last use of 3 and 9 (placed first,
    /// so that 3 and 9 land on its floats unless they live through the whole iteration).
    fn manifest() -> Manifest {
        let copy = |src, dst| Instr::Copy { src, dst };
        let buf = |i: usize| BufferDecl {
            name: format!("b{i}"),
            rows: Rows::Tokens,
            cols: match i {
                13 => 3 * H,
                14 => 4 * H,
                _ => H,
            },
        };
        Manifest {
            format_version: FORMAT_VERSION,
            model: "plan".into(),
            target: "cpu-x86_64".into(),
            backend: "none".into(),
            params: BTreeMap::new(),
            vocab: H,
            hidden: H,
            weights: vec![WeightDecl {
                name: "emb".into(),
                shape: vec![4, H],
                origin: "plan.loop:1:1".into(),
            }],
            buffers: (0..15).map(buf).collect(),
            kernels: vec![],
            rope_tables: vec![],
            kv_sites: vec![],
            program: Program {
                prelude: vec![
                    Instr::Embed {
                        table: WRef {
                            weight: 0,
                            offset: 0,
                            rows: 4,
                            cols: H,
                        },
                        out: 0,
                    },
                    copy(0, 1),
                    copy(1, 2),
                    copy(2, 3),
                    copy(2, 9),
                    copy(3, 13),
                ],
                recur: Some(Recur {
                    state: 4,
                    next: 8,
                    init: StateInit::Zeros,
                    body: vec![
                        copy(4, 5),
                        copy(9, 6),
                        copy(3, 7),
                        copy(5, 9),
                        copy(7, 14),
                        copy(14, 8),
                    ],
                    default_steps: 2,
                    exit: ExitPolicy::Fixed,
                    cache: CachePolicy::PerStep,
                    gate: None,
                    readout: vec![],
                    router: vec![],
                    router_out: None,
                }),
                coda: vec![copy(8, 10), copy(12, 11), copy(10, 11)],
                logits: 11,
            },
            derived: vec![],
            cuda: None,
            host_gemm: None,
        }
    }

    #[test]
    fn shares_only_buffers_whose_live_ranges_do_not_meet() {
        let man = manifest();
        let p = plan(&man, true);
        let at = |b: usize| p.offset[b];
        let span = |b: usize| {
            let o = at(b).unwrap();
            o..o + man.buffers[b].cols.next_multiple_of(ALIGN_COLS)
        };
        let apart = |a: usize, b: usize| {
            let (x, y) = (span(a), span(b));
            x.end <= y.start || y.end <= x.start
        };
        // Read or written by the runtime outside the instructions, or read before any write.
        for b in [4, 8, 11, 12] {
            assert_eq!(at(b), None, "buffer {b} keeps its own storage");
        }
        // The embeddings die at the first copy, so the second prelude temporary reuses them.
        assert_eq!(at(0), at(2));
        assert!(apart(0, 1) && apart(1, 2));
        // The injected input and the carried value live through every iteration: no body
        // temporary may take their floats, nor each other's within one iteration.
        for t in [5, 6, 7, 14] {
            assert!(apart(t, 3) && apart(t, 9), "temporary {t}");
        }
        // 5 is read after 6 and 7 are written.
        assert!(apart(5, 7) && apart(5, 6));
        assert!(apart(3, 9) && apart(3, 13) && apart(2, 9));
        // 13 is written after 2's last read: the widest buffer takes the floats of several.
        assert!(!apart(2, 13));
        // The coda temporary comes after the loop and reuses the lowest floats.
        assert_eq!(at(10), Some(0));
        // Fewer floats than one region per buffer.
        let own: usize = (0..15)
            .filter(|&b| at(b).is_some())
            .map(|b| man.buffers[b].cols)
            .sum();
        assert!(p.arena_cols < own, "{} of {own}", p.arena_cols);
        assert_eq!(overlapping_operands(&man, &p, instructions(&man)), None);
        // Without sharing, every buffer has its own storage.
        assert!(plan(&man, false).offset.iter().all(Option::is_none));
    }

    /// The verifier catches two operands of one instruction on the same floats.
    #[test]
    fn the_verifier_finds_operands_on_shared_floats() {
        let man = manifest();
        let mut p = plan(&man, true);
        p.offset[1] = p.offset[0];
        let found = overlapping_operands(&man, &p, instructions(&man));
        assert_eq!(found, Some((1, 0, 1)));
    }

    fn instructions(man: &Manifest) -> impl Iterator<Item = &Instr> {
        let rec = man.program.recur.as_ref().unwrap();
        man.program
            .prelude
            .iter()
            .chain(&rec.body)
            .chain(&man.program.coda)
    }
}
