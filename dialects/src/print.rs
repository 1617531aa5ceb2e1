//! The canonical text form of a module. Values are numbered per region in topological order, so
//! the text depends only on the program, never on construction order or petgraph internals.
//!
//! ```text
//! module "name"
//! param dim = 64
//! weight @0 "transformer.wte.weight" [256, 64]
//! forward {
//!   %0 = tokens : tokens
//!   %1 = weight @0 : w[256, 64]
//!   %2 = embed %0, %1 : [S, 64]
//!   %3 = loop.recur %2 steps=4 init=operand exit=fixed cache=per_step gate=false : [S, 64] {
//!     %0 = param 0 : [S, 64]
//!     ...
//!     yield %9
//!   }
//!   return %3
//! }
//! ```
use crate::graph::{Module, NodeId, Region};
use crate::ops::{fnum, fnum32, FusedOp, Op, PartRope};
use std::collections::HashMap;
use std::fmt::Write;

pub fn print_module(m: &Module) -> String {
    let mut s = String::new();
    writeln!(s, "module {:?}", m.name).unwrap();
    for (k, v) in &m.params {
        writeln!(s, "param {k} = {}", fnum(*v)).unwrap();
    }
    for (i, w) in m.weights.iter().enumerate() {
        let dims: Vec<String> = w.shape.iter().map(|d| d.to_string()).collect();
        writeln!(s, "weight @{i} {:?} [{}]", w.name, dims.join(", ")).unwrap();
    }
    writeln!(s, "forward {{").unwrap();
    print_region(&mut s, &m.forward, 1, "return");
    writeln!(s, "}}").unwrap();
    s
}

fn print_region(s: &mut String, r: &Region, depth: usize, terminator: &str) {
    let ind = "  ".repeat(depth);
    let order = r.topo_order();
    let names: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let name = |n: &NodeId| format!("%{}", names[n]);
    for (i, &n) in order.iter().enumerate() {
        let node = r.node(n);
        let ops: Vec<String> = r.operands(n).iter().map(name).collect();
        write!(s, "{ind}%{i} = {}", node.op.mnemonic()).unwrap();
        if let Op::Param(p) = node.op {
            write!(s, " {p}").unwrap();
        }
        if let Op::Weight(v) = &node.op {
            write!(s, " @{}", v.weight).unwrap();
            if v.offset != 0 {
                write!(s, "+{}", v.offset).unwrap();
            }
        }
        if !ops.is_empty() {
            write!(s, " {}", ops.join(", ")).unwrap();
        }
        for (k, v) in attrs(&node.op) {
            write!(s, " {k}={v}").unwrap();
        }
        if let Op::Fused { body } | Op::WMap { body } = &node.op {
            let parts: Vec<String> = body
                .iter()
                .enumerate()
                .map(|(j, f)| fused_line(j, f))
                .collect();
            write!(s, " {{{}}}", parts.join("; ")).unwrap();
        }
        write!(s, " : {}", node.ty).unwrap();
        if let Op::Recur { body, .. } = &node.op {
            writeln!(s, " {{").unwrap();
            print_region(s, body, depth + 1, "yield");
            writeln!(s, "{ind}}}").unwrap();
        } else {
            writeln!(s).unwrap();
        }
    }
    let res: Vec<String> = r.results.iter().map(name).collect();
    writeln!(s, "{ind}{terminator} {}", res.join(", ")).unwrap();
}

fn fused_line(j: usize, f: &FusedOp) -> String {
    match f {
        FusedOp::Arg(a) => format!("v{j} = arg {a}"),
        FusedOp::Const(c) => format!("v{j} = const {}", fnum32(*c)),
        FusedOp::Unary(u, a) => format!("v{j} = {} v{a}", u.name()),
        FusedOp::Binary(b, x, y) => format!("v{j} = {} v{x} v{y}", b.name()),
    }
}

/// The attributes of an op, in the fixed order the parser expects.
pub fn attrs(op: &Op) -> Vec<(&'static str, String)> {
    match op {
        Op::Recur {
            steps,
            init,
            exit,
            cache,
            gate,
            router,
            ..
        } => {
            let mut a = vec![
                ("steps", steps.to_string()),
                ("init", init.to_string()),
                ("exit", exit.to_string()),
                ("cache", cache.to_string()),
                ("gate", gate.to_string()),
            ];
            // Printed only when set, so the text of models without routing is unchanged.
            if *router {
                a.push(("router", "true".into()));
            }
            a
        }
        Op::RmsNorm { eps } | Op::LayerNorm { eps } => vec![("eps", fnum32(*eps))],
        Op::Sinusoidal { cols, base } => vec![("cols", cols.to_string()), ("base", fnum(*base))],
        Op::TimingSignal {
            cols,
            min_timescale,
            max_timescale,
            step,
        } => vec![
            ("cols", cols.to_string()),
            ("min", fnum(*min_timescale)),
            ("max", fnum(*max_timescale)),
            ("of", if *step { "step" } else { "position" }.into()),
        ],
        Op::Rope { heads, style, base } => {
            vec![
                ("heads", heads.to_string()),
                ("style", style.name().into()),
                ("base", fnum(*base)),
            ]
        }
        Op::Attention {
            heads,
            kv_heads,
            scale,
            site,
        } => vec![
            ("heads", heads.to_string()),
            ("kv_heads", kv_heads.to_string()),
            ("scale", fnum32(*scale)),
            ("site", site.to_string()),
        ],
        Op::Scale(c) | Op::WScale(c) => vec![("by", fnum32(*c))],
        Op::RmsNormRes { eps } => vec![("eps", fnum32(*eps))],
        Op::Proj(i) => vec![("index", i.to_string())],
        Op::HeadRmsNorm { heads, eps } => {
            vec![("heads", heads.to_string()), ("eps", fnum32(*eps))]
        }
        Op::WRepeatRows(times) => vec![("times", times.to_string())],
        Op::Glu(u) => vec![("act", u.name().into())],
        Op::InvRms { eps } => vec![("eps", fnum32(*eps))],
        Op::LinearEp {
            row_scale,
            residual,
            bias,
        } => {
            let mut a = vec![
                ("row_scale", u8::from(*row_scale).to_string()),
                ("residual", u8::from(*residual).to_string()),
            ];
            // Absent means no bias: the text of bias-free epilogues stays as it was.
            if *bias {
                a.push(("bias", "1".into()));
            }
            a
        }
        Op::WInterleaveRows(block) => vec![("block", block.to_string())],
        Op::LinearNorm {
            row_scale,
            residual,
            normalize,
            gain,
            eps,
        } => vec![
            ("row_scale", u8::from(*row_scale).to_string()),
            ("residual", u8::from(*residual).to_string()),
            ("normalize", u8::from(*normalize).to_string()),
            ("gain", u8::from(*gain).to_string()),
            ("eps", fnum32(*eps)),
        ],
        Op::LinearGlu {
            act,
            block,
            row_scale,
        } => vec![
            ("act", act.name().into()),
            ("block", block.to_string()),
            ("row_scale", u8::from(*row_scale).to_string()),
        ],
        Op::WSliceCols { start, len } => {
            vec![("start", start.to_string()), ("len", len.to_string())]
        }
        // `;` between the widths: attribute lists split on `,` and spaces.
        Op::LinearParts {
            parts,
            row_scale,
            ropes,
        } => {
            let mut a = vec![
                (
                    "parts",
                    parts
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(";"),
                ),
                ("row_scale", u8::from(*row_scale).to_string()),
            ];
            // Absent means no rotated part: the text of plain products stays as it was.
            if !ropes.is_empty() {
                let t: Vec<String> = ropes.iter().map(PartRope::text).collect();
                a.push(("rope", t.join(";")));
            }
            a
        }
        Op::Slice { start, len } => vec![("start", start.to_string()), ("len", len.to_string())],
        _ => vec![],
    }
}
