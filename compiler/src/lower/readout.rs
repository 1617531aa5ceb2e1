//! The readout: the coda instructions that depend on the recurrence state. Criteria that judge
//! the logits (KL, entropy, argmax) make the runtime run exactly these on the active rows after
//! every iteration, so the runtime never has to guess which coda work is state-independent.

use loopc_runtime::artifact::{BufId, Instr};
use std::collections::HashSet;

pub fn readout(coda: &[Instr], state: BufId, next: BufId) -> Vec<u32> {
    let mut tainted: HashSet<BufId> = HashSet::from([state, next]);
    let mut out = vec![];
    for (i, ins) in coda.iter().enumerate() {
        let bufs = ins.buffers();
        // Any instruction touching a state-derived buffer is part of the readout, and so is
        // everything it writes (kernels may write any of their buffer arguments).
        if bufs.iter().any(|b| tainted.contains(b)) {
            tainted.extend(bufs);
            out.push(i as u32);
        }
    }
    out
}
