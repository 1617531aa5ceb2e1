//! Text form of the lowered program (`loopc ir --stage program`): what the runtime will execute.
use loopc_runtime::artifact::{Arg, Instr, KernelSpec, Manifest, Rows, StateInit, WRef};
use std::fmt::Write;

pub fn print_manifest(m: &Manifest) -> String {
    let mut s = String::new();
    writeln!(
        s,
        "program {:?} target={} backend={}",
        m.model, m.target, m.backend
    )
    .unwrap();
    writeln!(s, "vocab {} hidden {}", m.vocab, m.hidden).unwrap();
    for (i, d) in m.derived.iter().enumerate() {
        writeln!(
            s,
            "derived #{} {:?} {:?} = {:?}",
            m.weights.len() + i,
            d.name,
            d.shape,
            d.recipe
        )
        .unwrap();
    }
    for (i, b) in m.buffers.iter().enumerate() {
        let rows = match b.rows {
            Rows::Tokens => "S".to_string(),
            Rows::Fixed(n) => n.to_string(),
        };
        writeln!(s, "buffer b{i} [{rows}, {}] {}", b.cols, b.name).unwrap();
    }
    for (i, k) in m.kernels.iter().enumerate() {
        writeln!(s, "kernel k{i} @{} {}", k.symbol, spec(&k.spec)).unwrap();
    }
    for (i, t) in m.rope_tables.iter().enumerate() {
        writeln!(
            s,
            "rope_table t{i} head_dim={} base={:?}",
            t.head_dim, t.base
        )
        .unwrap();
    }
    for (i, k) in m.kv_sites.iter().enumerate() {
        writeln!(
            s,
            "kv_site s{i} kv_heads={} head_dim={} {}",
            k.kv_heads,
            k.head_dim,
            if k.in_loop { "per-iteration" } else { "single" }
        )
        .unwrap();
    }
    writeln!(s, "prelude {{").unwrap();
    instrs(&mut s, m, &m.program.prelude, "  ");
    writeln!(s, "}}").unwrap();
    if let Some(r) = &m.program.recur {
        let init = match &r.init {
            StateInit::Zeros => "zeros".to_string(),
            StateInit::From(b) => format!("b{b}"),
            StateInit::TruncNormal { std, scale, seed } => {
                format!("trunc_normal(std={std:?},scale={scale:?},seed={seed})")
            }
        };
        let gate = r.gate.map(|g| format!(" gate=b{g}")).unwrap_or_default();
        writeln!(
            s,
            "recur state=b{} next=b{} init={init} steps={} exit={:?} cache={:?}{gate} {{",
            r.state, r.next, r.default_steps, r.exit, r.cache
        )
        .unwrap();
        instrs(&mut s, m, &r.body, "  ");
        writeln!(s, "}}").unwrap();
    }
    writeln!(s, "coda {{").unwrap();
    instrs(&mut s, m, &m.program.coda, "  ");
    writeln!(s, "}}").unwrap();
    writeln!(s, "logits b{}", m.program.logits).unwrap();
    s
}

fn w(m: &Manifest, r: &WRef) -> String {
    let nw = m.weights.len();
    let (name, shape) = match m.weights.get(r.weight as usize) {
        Some(d) => (&d.name, &d.shape),
        None => match m.derived.get(r.weight as usize - nw) {
            Some(d) => (&d.name, &d.shape),
            None => return format!("#{}?", r.weight),
        },
    };
    if r.offset == 0 && r.rows * r.cols == shape.iter().product::<usize>() {
        format!("{name:?}[{}x{}]", r.rows, r.cols)
    } else {
        format!("{name:?}+{}[{}x{}]", r.offset, r.rows, r.cols)
    }
}

/// A rotary epilogue: `rope[i] <style> hd=<head_dim> t<table>`.
fn rope(at: &str, rp: &loopc_runtime::artifact::RopeEpilogue) -> String {
    format!("rope{at} {:?} hd={} t{}", rp.style, rp.head_dim, rp.table)
}

fn instrs(s: &mut String, m: &Manifest, v: &[Instr], ind: &str) {
    for i in v {
        let line = match i {
            Instr::Embed { table, out } => format!("b{out} = embed tokens, {}", w(m, table)),
            Instr::MatMul { x, w: wr, out, epi } => {
                let mut l = format!("b{out} = matmul b{x}, {}ᵀ", w(m, wr));
                if let Some(s) = epi.row_scale {
                    l += &format!(" rowscale b{s}");
                }
                if let Some(b) = &epi.bias {
                    l += &format!(" bias {}", w(m, b));
                }
                if let Some(r) = epi.residual {
                    l += &format!(" + b{r}");
                }
                if let Some(g) = &epi.glu {
                    l += &format!(" glu {:?} block={} -> b{}", g.act, g.block, g.out);
                }
                if let Some(rp) = &epi.rope {
                    l += &format!(" {}", rope("", rp));
                }
                if let Some(nm) = &epi.norm {
                    l += &format!(" norm eps={:?}", nm.eps);
                    if nm.normalize {
                        l += " normalize";
                    }
                    if let Some(g) = &nm.gain {
                        l += &format!(" gain {}", w(m, g));
                    }
                    if let Some(q) = nm.inv_rms {
                        l += &format!(" inv_rms -> b{q}");
                    }
                }
                l
            }
            Instr::MatMulParts { x, w: wr, parts } => {
                let outs: Vec<String> = parts.iter().map(|p| format!("b{}", p.out)).collect();
                let mut l = format!("{} = matmul b{x}, {}ᵀ", outs.join(", "), w(m, wr));
                // A row scale shared by every part (the merged Q/K/V's) prints once.
                let shared = parts
                    .iter()
                    .all(|p| p.epi.row_scale == parts[0].epi.row_scale);
                if let (true, Some(s)) = (shared, parts[0].epi.row_scale) {
                    l += &format!(" rowscale b{s}");
                }
                for (i, p) in parts.iter().enumerate() {
                    if let (false, Some(s)) = (shared, p.epi.row_scale) {
                        l += &format!(" rowscale[{i}] b{s}");
                    }
                    if let Some(b) = &p.epi.bias {
                        l += &format!(" bias[{i}] {}", w(m, b));
                    }
                    if let Some(r) = p.epi.residual {
                        l += &format!(" +[{i}] b{r}");
                    }
                    if let Some(rp) = &p.epi.rope {
                        l += &format!(" {}", rope(&format!("[{i}]"), rp));
                    }
                }
                l
            }
            Instr::Concat { inputs, out } => {
                let a: Vec<String> = inputs.iter().map(|b| format!("b{b}")).collect();
                format!("b{out} = concat {}", a.join(", "))
            }
            Instr::Copy { src, dst } => format!("b{dst} = copy b{src}"),
            Instr::KvWrite { site, k, v } => format!("kv_write s{site}, b{k}, b{v}"),
            Instr::MatMulKN { x, w: wr, out } => format!("b{out} = matmul b{x}, {}", w(m, wr)),
            Instr::SliceCols { src, start, out } => format!("b{out} = slice b{src}, start={start}"),
            Instr::PosEmbed { table, out } => format!("b{out} = pos_embed {}", w(m, table)),
            Instr::Sinusoidal { base, out } => format!("b{out} = sinusoidal base={base:?}"),
            Instr::TimingSignal {
                min_timescale,
                max_timescale,
                step,
                out,
            } => format!(
                "b{out} = timing_signal min={min_timescale:?} max={max_timescale:?} of={}",
                if *step { "step" } else { "position" }
            ),
            Instr::Kernel { kernel, args } => {
                let a: Vec<String> = args
                    .iter()
                    .map(|a| match a {
                        Arg::Buf(b) => format!("b{b}"),
                        Arg::Weight(r) => w(m, r),
                        Arg::RopeCos(t) => format!("cos(t{t})"),
                        Arg::RopeSin(t) => format!("sin(t{t})"),
                        Arg::KCache(c) => format!("k(s{c})"),
                        Arg::VCache(c) => format!("v(s{c})"),
                    })
                    .collect();
                format!("call k{kernel}({})", a.join(", "))
            }
        };
        writeln!(s, "{ind}{line}").unwrap();
    }
}

fn spec(k: &KernelSpec) -> String {
    match k {
        KernelSpec::Elementwise {
            cols,
            inputs,
            ops,
            outputs,
        } => {
            format!("elementwise cols={cols} inputs={inputs:?} ops={ops:?} outputs={outputs:?}")
        }
        KernelSpec::RmsNorm {
            cols,
            eps,
            residual,
            gain,
        } => {
            format!("rmsnorm cols={cols} eps={eps:?} residual={residual} gain={gain}")
        }
        KernelSpec::Rope {
            heads,
            head_dim,
            style,
        } => format!("rope heads={heads} head_dim={head_dim} style={style:?}"),
        KernelSpec::Glu { cols, ops } => format!("glu cols={cols} ops={ops:?}"),
        KernelSpec::InvRms { cols, eps } => format!("inv_rms cols={cols} eps={eps:?}"),
        KernelSpec::RopeBias {
            heads,
            head_dim,
            style,
        } => format!("rope_bias heads={heads} head_dim={head_dim} style={style:?}"),
        KernelSpec::Attention {
            heads,
            kv_heads,
            head_dim,
            scale,
        } => {
            format!(
                "attention heads={heads} kv_heads={kv_heads} head_dim={head_dim} scale={scale:?}"
            )
        }
        KernelSpec::LayerNorm { cols, eps } => format!("layernorm cols={cols} eps={eps:?}"),
        KernelSpec::HeadRmsNorm {
            heads,
            head_dim,
            eps,
        } => format!("head_rmsnorm heads={heads} head_dim={head_dim} eps={eps:?}"),
    }
}
