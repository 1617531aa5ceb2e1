//! Reader for the text form written by [`crate::print`]; `print(parse(print(m))) == print(m)`.
//! Weight origins are not part of the text form and come back empty.
use crate::graph::{Module, NodeId, Region, WeightDecl, WeightView};
use crate::ops::{
    Binary, CacheSpec, Criterion, ExitSpec, FusedOp, Op, RopeStyle, StateInit, Unary,
};
use crate::types::Ty;
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

struct Lines<'a> {
    lines: Vec<(usize, &'a str)>,
    pos: usize,
}

impl<'a> Lines<'a> {
    fn next(&mut self) -> Option<(usize, &'a str)> {
        let l = self.lines.get(self.pos).copied();
        self.pos += 1;
        l
    }
}

fn perr<T>(line: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        line,
        message: message.into(),
    })
}

pub fn parse_module(text: &str) -> Result<Module, ParseError> {
    let mut lines = Lines {
        lines: text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty())
            .collect(),
        pos: 0,
    };
    let mut m = Module {
        name: String::new(),
        weights: vec![],
        params: vec![],
        forward: Region::default(),
    };
    while let Some((ln, l)) = lines.next() {
        if let Some(rest) = l.strip_prefix("module ") {
            m.name = unquote(ln, rest)?;
        } else if let Some(rest) = l.strip_prefix("param ") {
            let (k, v) = rest.split_once(" = ").ok_or(ParseError {
                line: ln,
                message: "expected `param name = value`".into(),
            })?;
            m.params.push((k.to_string(), num(ln, v)?));
        } else if let Some(rest) = l.strip_prefix("weight @") {
            let (idx, rest) = rest.split_once(' ').ok_or(ParseError {
                line: ln,
                message: "expected `weight @i \"name\" [dims]`".into(),
            })?;
            if idx.parse::<usize>().ok() != Some(m.weights.len()) {
                return perr(
                    ln,
                    format!(
                        "weights must be numbered in order; expected @{}",
                        m.weights.len()
                    ),
                );
            }
            let q = rest.rfind('"').ok_or(ParseError {
                line: ln,
                message: "missing name".into(),
            })?;
            m.weights.push(WeightDecl {
                name: unquote(ln, &rest[..=q])?,
                shape: dim_list(ln, rest[q + 1..].trim())?,
                origin: String::new(),
            });
        } else if l == "forward {" {
            m.forward = parse_region(&mut lines, "return", &[])?;
        } else {
            return perr(ln, format!("unexpected line `{l}`"));
        }
    }
    Ok(m)
}

fn parse_region(lines: &mut Lines, terminator: &str, params: &[Ty]) -> Result<Region, ParseError> {
    let mut r = Region {
        params: params.to_vec(),
        ..Default::default()
    };
    let mut names: HashMap<String, NodeId> = HashMap::new();
    loop {
        let Some((ln, l)) = lines.next() else {
            return perr(
                0,
                format!("region is not closed by `{terminator}` and `}}`"),
            );
        };
        if let Some(rest) = l.strip_prefix(terminator).filter(|s| s.starts_with(' ')) {
            for v in rest.split(',') {
                let v = v.trim();
                r.results.push(*names.get(v).ok_or(ParseError {
                    line: ln,
                    message: format!("unknown value {v}"),
                })?);
            }
            match lines.next() {
                Some((_, "}")) => return Ok(r),
                Some((ln, l)) => {
                    return perr(ln, format!("expected `}}` after `{terminator}`, got `{l}`"))
                }
                None => return perr(ln, "expected `}`"),
            }
        }
        let (lhs, rest) = l.split_once(" = ").ok_or(ParseError {
            line: ln,
            message: format!("expected `%n = op ...`, got `{l}`"),
        })?;
        let opens = rest.ends_with(" {");
        let rest = rest.trim_end_matches(" {");
        let (head, ty) = rest.rsplit_once(" : ").ok_or(ParseError {
            line: ln,
            message: "missing ` : type`".into(),
        })?;
        let ty = parse_ty(ln, ty)?;
        let (head, fused) = match head.find(" {") {
            Some(i) => (&head[..i], Some(head[i + 2..].trim_end_matches('}'))),
            None => (head, None),
        };
        let mut toks = head.split_whitespace();
        let mnem = toks.next().unwrap_or("");
        let mut operands = vec![];
        let mut attrs: HashMap<&str, &str> = HashMap::new();
        let mut bare: Option<&str> = None;
        let mut wref: Option<&str> = None;
        for t in toks {
            let t = t.trim_end_matches(',');
            if t.starts_with('%') {
                operands.push(*names.get(t).ok_or(ParseError {
                    line: ln,
                    message: format!("unknown value {t}"),
                })?);
            } else if let Some(w) = t.strip_prefix('@') {
                wref = Some(w);
            } else if let Some((k, v)) = t.split_once('=') {
                attrs.insert(k, v);
            } else {
                bare = Some(t);
            }
        }
        let attr = |k: &str| -> Result<&str, ParseError> {
            attrs.get(k).copied().ok_or(ParseError {
                line: ln,
                message: format!("`{mnem}` needs `{k}=`"),
            })
        };
        let op = match mnem {
            "param" => Op::Param(num(ln, bare.unwrap_or(""))? as u32),
            "tokens" => Op::Tokens,
            "weight" => {
                let w = wref.ok_or(ParseError {
                    line: ln,
                    message: "`weight` needs `@i`".into(),
                })?;
                let (i, off) = w.split_once('+').unwrap_or((w, "0"));
                let Ty::Weight(shape) = ty.clone() else {
                    return perr(ln, "`weight` has a weight type");
                };
                Op::Weight(WeightView {
                    weight: num(ln, i)? as u32,
                    offset: num(ln, off)? as usize,
                    shape,
                })
            }
            "embed" => Op::Embed,
            "linear" => Op::Linear,
            "rmsnorm" => Op::RmsNorm {
                eps: num(ln, attr("eps")?)? as f32,
            },
            "layernorm" => Op::LayerNorm {
                eps: num(ln, attr("eps")?)? as f32,
            },
            "matmul" => Op::MatMul,
            "pos_embed" => Op::PosEmbed,
            "sinusoidal" => Op::Sinusoidal {
                cols: num(ln, attr("cols")?)? as usize,
                base: num(ln, attr("base")?)?,
            },
            "timing_signal" => Op::TimingSignal {
                cols: num(ln, attr("cols")?)? as usize,
                min_timescale: num(ln, attr("min")?)?,
                max_timescale: num(ln, attr("max")?)?,
                step: match attr("of")? {
                    "step" => true,
                    "position" => false,
                    o => {
                        return perr(
                            ln,
                            format!("`timing_signal of=` is `step` or `position`, got `{o}`"),
                        )
                    }
                },
            },
            "rope" => Op::Rope {
                heads: num(ln, attr("heads")?)? as usize,
                style: RopeStyle::from_name(attr("style")?).ok_or(ParseError {
                    line: ln,
                    message: "unknown rope style".into(),
                })?,
                base: num(ln, attr("base")?)?,
            },
            "attention" => Op::Attention {
                heads: num(ln, attr("heads")?)? as usize,
                kv_heads: num(ln, attr("kv_heads")?)? as usize,
                scale: num(ln, attr("scale")?)? as f32,
                site: num(ln, attr("site")?)? as u32,
            },
            "scale" => Op::Scale(num(ln, attr("by")?)? as f32),
            "concat" => Op::Concat,
            "rmsnorm_res" => Op::RmsNormRes {
                eps: num(ln, attr("eps")?)? as f32,
            },
            "proj" => Op::Proj(num(ln, attr("index")?)? as u32),
            "w.slice_cols" => Op::WSliceCols {
                start: num(ln, attr("start")?)? as usize,
                len: num(ln, attr("len")?)? as usize,
            },
            "w.scale" => Op::WScale(num(ln, attr("by")?)? as f32),
            "w.mul_cols" => Op::WMulCols,
            "w.concat_rows" => Op::WConcatRows,
            "w.per_iter" => Op::WPerIter,
            "w.map" => Op::WMap {
                body: parse_fused(ln, fused.unwrap_or(""))?,
            },
            "w.repeat_rows" => Op::WRepeatRows(num(ln, attr("times")?)? as usize),
            "head_rmsnorm" => Op::HeadRmsNorm {
                heads: num(ln, attr("heads")?)? as usize,
                eps: num(ln, attr("eps")?)? as f32,
            },
            "glu" => Op::Glu(Unary::from_name(attr("act")?).ok_or(ParseError {
                line: ln,
                message: "unknown `glu` activation".into(),
            })?),
            "inv_rms" => Op::InvRms {
                eps: num(ln, attr("eps")?)? as f32,
            },
            "linear_ep" => Op::LinearEp {
                row_scale: num(ln, attr("row_scale")?)? != 0.0,
                residual: num(ln, attr("residual")?)? != 0.0,
                bias: match attr("bias") {
                    Ok(b) => num(ln, b)? != 0.0,
                    Err(_) => false,
                },
            },
            "w.transpose" => Op::WTranspose,
            "linear_norm" => Op::LinearNorm {
                row_scale: num(ln, attr("row_scale")?)? != 0.0,
                residual: num(ln, attr("residual")?)? != 0.0,
                normalize: num(ln, attr("normalize")?)? != 0.0,
                gain: num(ln, attr("gain")?)? != 0.0,
                eps: num(ln, attr("eps")?)? as f32,
            },
            "w.interleave_rows" => Op::WInterleaveRows(num(ln, attr("block")?)? as usize),
            "linear_glu" => Op::LinearGlu {
                act: Unary::from_name(attr("act")?).ok_or(ParseError {
                    line: ln,
                    message: "unknown `linear_glu` activation".into(),
                })?,
                block: num(ln, attr("block")?)? as usize,
                row_scale: num(ln, attr("row_scale")?)? != 0.0,
            },
            "linear_parts" => Op::LinearParts {
                parts: attr("parts")?
                    .split(';')
                    .map(|p| num(ln, p).map(|v| v as usize))
                    .collect::<Result<_, _>>()?,
                row_scale: num(ln, attr("row_scale")?)? != 0.0,
                ropes: match attr("rope") {
                    Ok(t) => t
                        .split(';')
                        .map(|p| {
                            crate::ops::PartRope::parse(p).ok_or(ParseError {
                                line: ln,
                                message: format!(
                                    "`linear_parts rope=` parts are `-` or `heads:style:base:bias`, got `{p}`"
                                ),
                            })
                        })
                        .collect::<Result<_, _>>()?,
                    Err(_) => vec![],
                },
            },
            "slice" => Op::Slice {
                start: num(ln, attr("start")?)? as usize,
                len: num(ln, attr("len")?)? as usize,
            },
            "fused" => Op::Fused {
                body: parse_fused(ln, fused.unwrap_or(""))?,
            },
            "loop.recur" => {
                if !opens {
                    return perr(ln, "`loop.recur` must open a body with `{`");
                }
                let init = parse_init(ln, attr("init")?)?;
                let n_init = usize::from(init == StateInit::Operand);
                let mut bparams = vec![ty.clone()];
                bparams.extend(operands[n_init..].iter().map(|&o| r.ty(o).clone()));
                let body = parse_region(lines, "yield", &bparams)?;
                Op::Recur {
                    steps: num(ln, attr("steps")?)? as usize,
                    init,
                    exit: parse_exit(ln, attr("exit")?)?,
                    cache: parse_cache(ln, attr("cache")?)?,
                    gate: attr("gate")? == "true",
                    router: attr("router").is_ok_and(|v| v == "true"),
                    body: Box::new(body),
                }
            }
            other => {
                if let Some(u) = Unary::from_name(other) {
                    Op::Unary(u)
                } else if let Some(b) = Binary::from_name(other) {
                    Op::Binary(b)
                } else {
                    return perr(ln, format!("unknown op `{other}`"));
                }
            }
        };
        let id = r.add(op, ty, &operands);
        names.insert(lhs.to_string(), id);
    }
}

fn parse_fused(ln: usize, body: &str) -> Result<Vec<FusedOp>, ParseError> {
    let mut out = vec![];
    for part in body.split(';') {
        let (_, rhs) = part.split_once('=').ok_or(ParseError {
            line: ln,
            message: format!("bad fused instruction `{part}`"),
        })?;
        let t: Vec<&str> = rhs.split_whitespace().collect();
        let v =
            |s: &str| -> Result<u32, ParseError> { Ok(num(ln, s.trim_start_matches('v'))? as u32) };
        out.push(match t.as_slice() {
            ["arg", a] => FusedOp::Arg(num(ln, a)? as u32),
            ["const", c] => FusedOp::Const(num(ln, c)? as f32),
            [u, a] => FusedOp::Unary(
                Unary::from_name(u).ok_or(ParseError {
                    line: ln,
                    message: format!("unknown unary `{u}`"),
                })?,
                v(a)?,
            ),
            [b, x, y] => FusedOp::Binary(
                Binary::from_name(b).ok_or(ParseError {
                    line: ln,
                    message: format!("unknown binary `{b}`"),
                })?,
                v(x)?,
                v(y)?,
            ),
            _ => return perr(ln, format!("bad fused instruction `{part}`")),
        });
    }
    Ok(out)
}

fn call_args<'a>(
    ln: usize,
    s: &'a str,
    name: &str,
) -> Result<HashMap<&'a str, &'a str>, ParseError> {
    let inner = s
        .strip_prefix(name)
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.strip_suffix(')'))
        .ok_or(ParseError {
            line: ln,
            message: format!("expected `{name}(...)`"),
        })?;
    Ok(inner
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .collect())
}

fn parse_init(ln: usize, s: &str) -> Result<StateInit, ParseError> {
    match s {
        "zeros" => Ok(StateInit::Zeros),
        "operand" => Ok(StateInit::Operand),
        _ => {
            let a = call_args(ln, s, "trunc_normal")?;
            let get = |k: &str| {
                a.get(k).ok_or(ParseError {
                    line: ln,
                    message: format!("trunc_normal needs {k}"),
                })
            };
            Ok(StateInit::TruncNormal {
                std: num(ln, get("std")?)?,
                scale: num(ln, get("scale")?)?,
                seed: num(ln, get("seed")?)? as u64,
            })
        }
    }
}

fn parse_exit(ln: usize, s: &str) -> Result<ExitSpec, ParseError> {
    if s == "fixed" {
        return Ok(ExitSpec::Fixed);
    }
    let name = s.split('(').next().unwrap_or("");
    let a = call_args(ln, s, name)?;
    let get = |k: &str| {
        a.get(k).ok_or(ParseError {
            line: ln,
            message: format!("{name} needs {k}"),
        })
    };
    if let Some(kind) = Criterion::from_name(name) {
        return Ok(ExitSpec::Criterion {
            kind,
            threshold: num(ln, get("threshold")?)?,
            min_steps: num(ln, get("min")?)? as usize,
            every: num(ln, get("every")?)? as usize,
            max_steps: num(ln, get("max")?)? as usize,
        });
    }
    if name == "gate" {
        return Ok(ExitSpec::Gate {
            q: num(ln, get("q")?)?,
            min_steps: num(ln, get("min")?)? as usize,
            max_steps: num(ln, get("max")?)? as usize,
        });
    }
    if name == "act" {
        return Ok(ExitSpec::Act {
            eps: num(ln, get("eps")?)?,
            max_steps: num(ln, get("max")?)? as usize,
        });
    }
    if name == "expert_choice" {
        let caps = *get("capacity")?;
        let capacity = if caps == "default" {
            vec![]
        } else {
            caps.split(';')
                .map(|c| num(ln, c))
                .collect::<Result<Vec<_>, _>>()?
        };
        return Ok(ExitSpec::ExpertChoice {
            alpha: num(ln, get("alpha")?)?,
            capacity,
            threshold: num(ln, get("threshold")?)?,
            max_steps: num(ln, get("max")?)? as usize,
        });
    }
    if name == "token_choice" {
        return Ok(ExitSpec::TokenChoice {
            alpha: num(ln, get("alpha")?)?,
            max_steps: num(ln, get("max")?)? as usize,
        });
    }
    if name != "converge" {
        return perr(ln, format!("unknown exit policy `{s}`"));
    }
    Ok(ExitSpec::Converge {
        threshold: num(ln, get("threshold")?)?,
        min_steps: num(ln, get("min")?)? as usize,
        max_steps: num(ln, get("max")?)? as usize,
    })
}

fn parse_cache(ln: usize, s: &str) -> Result<CacheSpec, ParseError> {
    Ok(match s {
        "per_step" => CacheSpec::PerStep,
        "share_first" => CacheSpec::ShareFirst,
        "last_step" => CacheSpec::LastStep,
        "recursion_wise" => CacheSpec::RecursionWise,
        _ => match s.strip_prefix("ring(").and_then(|r| r.strip_suffix(')')) {
            Some(c) => CacheSpec::Ring(num(ln, c)? as usize),
            None => return perr(ln, format!("unknown cache policy `{s}`")),
        },
    })
}

fn parse_ty(ln: usize, s: &str) -> Result<Ty, ParseError> {
    if let Some(inner) = s.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        // Members end with `]`, and `], ` separates them (`, ` alone also occurs inside one).
        let mut out = vec![];
        for part in inner.split("], ") {
            let part = if part.ends_with(']') {
                part.to_string()
            } else {
                format!("{part}]")
            };
            out.push(parse_ty(ln, &part)?);
        }
        return Ok(Ty::Tuple(out));
    }
    if s == "tokens" {
        Ok(Ty::Tokens)
    } else if let Some(rest) = s.strip_prefix("[S, ").and_then(|r| r.strip_suffix(']')) {
        Ok(Ty::Act(num(ln, rest)? as usize))
    } else if let Some(rest) = s.strip_prefix('w') {
        Ok(Ty::Weight(dim_list(ln, rest)?))
    } else {
        perr(ln, format!("unknown type `{s}`"))
    }
}

fn dim_list(ln: usize, s: &str) -> Result<Vec<usize>, ParseError> {
    let inner = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or(ParseError {
            line: ln,
            message: format!("expected `[dims]`, got `{s}`"),
        })?;
    inner
        .split(',')
        .map(|d| Ok(num(ln, d.trim())? as usize))
        .collect()
}

fn num(ln: usize, s: &str) -> Result<f64, ParseError> {
    s.parse::<f64>().map_err(|_| ParseError {
        line: ln,
        message: format!("expected a number, got `{s}`"),
    })
}

fn unquote(ln: usize, s: &str) -> Result<String, ParseError> {
    s.trim()
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .map(|s| s.replace("\\\"", "\""))
        .ok_or(ParseError {
            line: ln,
            message: format!("expected a quoted string, got `{s}`"),
        })
}
