//! Fuse trees of pointwise ops into one `fused` node, so a chain like `silu(g) * u` or
//! `x·√d` becomes one pass over memory. A pointwise node joins its user's tree when that user is
//! its only one and is pointwise too; anything else (a matmul, a norm, a value used twice)
//! becomes an argument of the tree.
use super::{for_each_region, Pass};
use loopc_dialects::ops::{Binary, FusedOp};
use loopc_dialects::{NodeId, Op, Region};
use std::collections::HashMap;

pub struct FuseElementwise;

fn pointwise(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_) | Op::Binary(_) | Op::Scale(_) | Op::Fused { .. }
    )
}

impl Pass for FuseElementwise {
    fn name(&self) -> &'static str {
        "fuse-elementwise"
    }
    fn run(&self, m: &mut loopc_dialects::Module) {
        for_each_region(&mut m.forward, &mut fuse_region);
    }
}

fn absorbable(r: &Region, n: NodeId) -> bool {
    let users = r.users(n);
    pointwise(&r.node(n).op)
        && users.len() == 1
        && pointwise(&r.node(users[0]).op)
        && !r.results.contains(&n)
}

fn fuse_region(r: &mut Region) {
    let order = r.topo_order();
    for n in order {
        if !pointwise(&r.node(n).op) || absorbable(r, n) {
            continue;
        }
        let mut body = vec![];
        let mut args: Vec<NodeId> = vec![];
        let mut memo: HashMap<NodeId, u32> = HashMap::new();
        emit(r, n, true, &mut body, &mut args, &mut memo);
        let ty = r.ty(n).clone();
        let f = r.add(Op::Fused { body }, ty, &args);
        r.replace_uses(n, f);
    }
}

fn emit(
    r: &Region,
    n: NodeId,
    root: bool,
    body: &mut Vec<FusedOp>,
    args: &mut Vec<NodeId>,
    memo: &mut HashMap<NodeId, u32>,
) -> u32 {
    if let Some(&v) = memo.get(&n) {
        return v;
    }
    let push = |body: &mut Vec<FusedOp>, op| {
        body.push(op);
        (body.len() - 1) as u32
    };
    let v = if root || absorbable(r, n) {
        let ops = r.operands(n);
        match &r.node(n).op {
            Op::Unary(u) => {
                let a = emit(r, ops[0], false, body, args, memo);
                push(body, FusedOp::Unary(*u, a))
            }
            Op::Binary(b) => {
                let a = emit(r, ops[0], false, body, args, memo);
                let c = emit(r, ops[1], false, body, args, memo);
                push(body, FusedOp::Binary(*b, a, c))
            }
            Op::Scale(c) => {
                let a = emit(r, ops[0], false, body, args, memo);
                let k = push(body, FusedOp::Const(*c));
                push(body, FusedOp::Binary(Binary::Mul, a, k))
            }
            Op::Fused { body: inner } => {
                // Inline an already fused tree, renumbering its instructions.
                let mut map = vec![];
                for f in inner {
                    let v = match *f {
                        FusedOp::Arg(i) => emit(r, ops[i as usize], false, body, args, memo),
                        FusedOp::Const(c) => push(body, FusedOp::Const(c)),
                        FusedOp::Unary(u, a) => push(body, FusedOp::Unary(u, map[a as usize])),
                        FusedOp::Binary(b, x, y) => {
                            push(body, FusedOp::Binary(b, map[x as usize], map[y as usize]))
                        }
                    };
                    map.push(v);
                }
                *map.last().expect("fused body is not empty")
            }
            _ => unreachable!("only pointwise nodes are emitted"),
        }
    } else {
        let i = match args.iter().position(|&a| a == n) {
            Some(i) => i,
            None => {
                args.push(n);
                args.len() - 1
            }
        };
        push(body, FusedOp::Arg(i as u32))
    };
    memo.insert(n, v);
    v
}
