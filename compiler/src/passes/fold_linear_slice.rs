//! `slice(linear(x, W), a, n)` → `linear(x, W[a..a+n])`: a column window of a matmul output is a
//! row window of its weight, which is contiguous. This turns `split` of a fused projection
//! (Huginn's Wqkv, gate|up) into separate matmuls that write their own buffers, with no copy.
use super::{for_each_region, Pass};
use loopc_dialects::{Op, Region, Ty, WeightView};

pub struct FoldLinearSlice;

impl Pass for FoldLinearSlice {
    fn name(&self) -> &'static str {
        "fold-linear-slice"
    }
    fn run(&self, m: &mut loopc_dialects::Module) {
        for_each_region(&mut m.forward, &mut |r: &mut Region| {
            for n in r.topo_order() {
                let Op::Slice { start, len } = r.node(n).op else {
                    continue;
                };
                let src = r.operands(n)[0];
                if r.node(src).op != Op::Linear {
                    continue;
                }
                let ops = r.operands(src);
                let (x, w) = (ops[0], ops[1]);
                let Op::Weight(view) = &r.node(w).op else {
                    continue;
                };
                let k = view.shape[1];
                let sub = WeightView {
                    weight: view.weight,
                    offset: view.offset + start * k,
                    shape: vec![len, k],
                };
                let wn = r.add(Op::Weight(sub.clone()), Ty::Weight(sub.shape.clone()), &[]);
                let lin = r.add(Op::Linear, Ty::Act(len), &[x, wn]);
                r.replace_uses(n, lin);
            }
        });
    }
}
