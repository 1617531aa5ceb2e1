//! Shape inference and the verifier. [`infer`] is the single source of typing rules: the
//! elaborator calls it to type new nodes, and [`verify_module`] re-checks every stored type after
//! each pass, so a pass that breaks a shape is caught where it happens.
use crate::graph::{Module, Region};
use crate::ops::{FusedOp, Op, StateInit};
use crate::types::Ty;

/// An elementwise body reads existing operands and earlier instructions only.
fn check_body(op: &Op, body: &[FusedOp], n_args: usize) -> Result<(), String> {
    for (j, f) in body.iter().enumerate() {
        let ok = match f {
            FusedOp::Arg(a) => (*a as usize) < n_args,
            FusedOp::Const(_) => true,
            FusedOp::Unary(_, a) => (*a as usize) < j,
            FusedOp::Binary(_, a, b) => (*a as usize) < j && (*b as usize) < j,
        };
        if !ok {
            return Err(format!(
                "`{}` body instruction v{j} refers forward or to a missing operand",
                op.mnemonic()
            ));
        }
    }
    if body.is_empty() {
        return Err(format!("`{}` body is empty", op.mnemonic()));
    }
    Ok(())
}

/// The result type of `op` applied to operands of the given types, or why it is ill-typed.
pub fn infer(op: &Op, args: &[Ty], params: &[Ty]) -> Result<Ty, String> {
    let arity = |n: usize| -> Result<(), String> {
        if args.len() == n {
            Ok(())
        } else {
            Err(format!(
                "`{}` takes {n} operand(s), got {}",
                op.mnemonic(),
                args.len()
            ))
        }
    };
    let act = |i: usize| -> Result<usize, String> {
        match &args[i] {
            Ty::Act(c) => Ok(*c),
            t => Err(format!(
                "operand {} of `{}` must be an activation [S, n], got {t}",
                i + 1,
                op.mnemonic()
            )),
        }
    };
    let weight = |i: usize| -> Result<Vec<usize>, String> {
        match &args[i] {
            Ty::Weight(s) => Ok(s.clone()),
            t => Err(format!(
                "operand {} of `{}` must be a weight, got {t}",
                i + 1,
                op.mnemonic()
            )),
        }
    };
    match op {
        Op::Param(i) => params
            .get(*i as usize)
            .cloned()
            .ok_or_else(|| format!("region has {} parameter(s), no parameter {i}", params.len())),
        Op::Tokens => {
            arity(0)?;
            Ok(Ty::Tokens)
        }
        Op::Weight(v) => {
            arity(0)?;
            Ok(Ty::Weight(v.shape.clone()))
        }
        Op::Embed => {
            arity(2)?;
            if args[0] != Ty::Tokens {
                return Err(format!("`embed` reads token ids, got {}", args[0]));
            }
            let w = weight(1)?;
            if w.len() != 2 {
                return Err(format!(
                    "`embed` table must be 2-D [vocab, dim], got {}",
                    args[1]
                ));
            }
            Ok(Ty::Act(w[1]))
        }
        Op::Linear => {
            arity(2)?;
            let k = act(0)?;
            let w = weight(1)?;
            if w.len() != 2 || w[1] != k {
                return Err(format!(
                    "`linear` weight must be [n, {k}] for an input of width {k}, got {}",
                    args[1]
                ));
            }
            Ok(Ty::Act(w[0]))
        }
        Op::RmsNorm { eps } => {
            // The gain is optional: the optimizer folds it into the matmuls that read the norm.
            if args.len() != 1 {
                arity(2)?;
            }
            let d = act(0)?;
            if args.len() == 2 && weight(1)?.iter().product::<usize>() != d {
                return Err(format!(
                    "`rmsnorm` gain must have {d} elements, got {}",
                    args[1]
                ));
            }
            if eps.is_nan() || *eps < 0.0 {
                return Err(format!("`rmsnorm` eps must be ≥ 0, got {eps}"));
            }
            Ok(Ty::Act(d))
        }
        Op::LayerNorm { eps } => {
            arity(3)?;
            let d = act(0)?;
            for i in [1, 2] {
                let g = weight(i)?;
                if g.iter().product::<usize>() != d {
                    return Err(format!(
                        "`layernorm` gain and bias must have {d} elements, got {}",
                        args[i]
                    ));
                }
            }
            if eps.is_nan() || *eps < 0.0 {
                return Err(format!("`layernorm` eps must be ≥ 0, got {eps}"));
            }
            Ok(Ty::Act(d))
        }
        Op::MatMul => {
            arity(2)?;
            let k = act(0)?;
            let w = weight(1)?;
            if w.len() != 2 || w[0] != k {
                return Err(format!(
                    "`matmul` weight must be [{k}, n] for an input of width {k}, got {}",
                    args[1]
                ));
            }
            Ok(Ty::Act(w[1]))
        }
        Op::PosEmbed => {
            arity(1)?;
            let w = weight(0)?;
            if w.len() != 2 {
                return Err(format!(
                    "`pos_embed` table must be 2-D [positions, dim], got {}",
                    args[0]
                ));
            }
            Ok(Ty::Act(w[1]))
        }
        Op::TimingSignal {
            cols,
            min_timescale: lo,
            max_timescale: hi,
            ..
        } => {
            arity(0)?;
            if *cols == 0 || !(*lo > 0.0 && lo.is_finite() && *hi >= *lo && hi.is_finite()) {
                return Err(format!(
                    "`timing_signal` needs a width > 0 and timescales 0 < min ≤ max, got {cols}, {lo} and {hi}"
                ));
            }
            Ok(Ty::Act(*cols))
        }
        Op::Sinusoidal { cols, base } => {
            arity(0)?;
            if *cols == 0 || base.is_nan() || *base <= 1.0 {
                return Err(format!(
                    "`sinusoidal` needs a width > 0 and a base > 1, got {cols} and {base}"
                ));
            }
            Ok(Ty::Act(*cols))
        }
        Op::Rope { heads, .. } => {
            // An optional bias operand, added before the rotation (the optimizer's epilogue).
            if args.len() != 2 {
                arity(1)?;
            }
            let d = act(0)?;
            if args.len() == 2 && weight(1)?.iter().product::<usize>() != d {
                return Err(format!(
                    "`rope` bias must have {d} elements, got {}",
                    args[1]
                ));
            }
            if *heads == 0 || d % heads != 0 || (d / heads) % 2 != 0 {
                return Err(format!(
                    "`rope` needs a width divisible into {heads} heads of even size, got {d}"
                ));
            }
            Ok(Ty::Act(d))
        }
        Op::Attention {
            heads, kv_heads, ..
        } => {
            arity(3)?;
            let (q, k, v) = (act(0)?, act(1)?, act(2)?);
            if *heads == 0 || *kv_heads == 0 || heads % kv_heads != 0 {
                return Err(format!(
                    "`attention` heads ({heads}) must be a multiple of kv_heads ({kv_heads})"
                ));
            }
            if q % heads != 0 {
                return Err(format!(
                    "`attention` query width {q} is not divisible by {heads} heads"
                ));
            }
            let hd = q / heads;
            if k != kv_heads * hd || v != kv_heads * hd {
                return Err(format!(
                    "`attention` key/value width must be kv_heads·head_dim = {}·{hd} = {}, got {k} and {v}",
                    kv_heads,
                    kv_heads * hd
                ));
            }
            Ok(Ty::Act(q))
        }
        Op::Unary(_) | Op::Scale(_) => {
            arity(1)?;
            Ok(Ty::Act(act(0)?))
        }
        Op::Binary(_) => {
            arity(2)?;
            match (&args[0], &args[1]) {
                (Ty::Act(a), Ty::Act(b)) if a == b => Ok(Ty::Act(*a)),
                (Ty::Act(a), Ty::Weight(w)) | (Ty::Weight(w), Ty::Act(a))
                    if w.iter().product::<usize>() == *a =>
                {
                    Ok(Ty::Act(*a))
                }
                (a, b) => Err(format!(
                    "`{}` needs operands of the same width (or a weight with as many elements as the width), got {a} and {b}",
                    op.mnemonic()
                )),
            }
        }
        Op::Concat => {
            if args.is_empty() {
                return Err("`concat` needs at least one operand".into());
            }
            let mut total = 0;
            for i in 0..args.len() {
                total += act(i)?;
            }
            Ok(Ty::Act(total))
        }
        Op::Slice { start, len } => {
            arity(1)?;
            let d = act(0)?;
            if *len == 0 || start + len > d {
                return Err(format!(
                    "`slice` of columns {start}..{} is out of range for width {d}",
                    start + len
                ));
            }
            Ok(Ty::Act(*len))
        }
        Op::Fused { body } => {
            let mut width = None;
            for (i, a) in args.iter().enumerate() {
                let w = match a {
                    Ty::Act(c) => *c,
                    Ty::Weight(s) => s.iter().product(),
                    t => {
                        return Err(format!(
                            "`fused` operand {} must be an activation or weight, got {t}",
                            i + 1
                        ))
                    }
                };
                if matches!(a, Ty::Act(_)) {
                    if width.is_some_and(|x| x != w) {
                        return Err("`fused` operands have different widths".into());
                    }
                    width = Some(w);
                }
            }
            check_body(op, body, args.len())?;
            let w = width.ok_or("`fused` needs at least one activation operand")?;
            for a in args {
                if let Ty::Weight(s) = a {
                    if s.iter().product::<usize>() != w {
                        return Err(format!(
                            "`fused` weight operand {a} does not broadcast to width {w}"
                        ));
                    }
                }
            }
            Ok(Ty::Act(w))
        }
        Op::RmsNormRes { eps } => {
            if args.len() != 2 {
                arity(3)?;
            }
            let (a, b) = (act(0)?, act(1)?);
            let g = if args.len() == 3 {
                weight(2)?.iter().product::<usize>()
            } else {
                a
            };
            if a != b || g != a {
                return Err(format!("`rmsnorm_res` needs two activations of one width and a gain of that many elements, got {}, {} and {}", args[0], args[1], args.get(2).map_or("no gain".to_string(), |t| t.to_string())));
            }
            if eps.is_nan() || *eps < 0.0 {
                return Err(format!("`rmsnorm_res` eps must be ≥ 0, got {eps}"));
            }
            Ok(Ty::Tuple(vec![Ty::Act(a), Ty::Act(a)]))
        }
        Op::InvRms { eps } => {
            arity(1)?;
            act(0)?;
            if eps.is_nan() || *eps < 0.0 {
                return Err(format!("`inv_rms` eps must be ≥ 0, got {eps}"));
            }
            Ok(Ty::Act(1))
        }
        Op::LinearEp {
            row_scale,
            residual,
            bias,
        } => {
            arity(2 + usize::from(*row_scale) + usize::from(*residual) + usize::from(*bias))?;
            let k = act(0)?;
            let w = weight(1)?;
            if w.len() != 2 || w[1] != k {
                return Err(format!(
                    "`linear_ep` weight must be [n, {k}] for an input of width {k}, got {}",
                    args[1]
                ));
            }
            let mut i = 2;
            if *row_scale {
                if act(i)? != 1 {
                    return Err(format!(
                        "`linear_ep` row scale must be [S, 1], got {}",
                        args[i]
                    ));
                }
                i += 1;
            }
            if *residual {
                if act(i)? != w[0] {
                    return Err(format!(
                        "`linear_ep` residual must be [S, {}], got {}",
                        w[0], args[i]
                    ));
                }
                i += 1;
            }
            if *bias && weight(i)?.iter().product::<usize>() != w[0] {
                return Err(format!(
                    "`linear_ep` bias must have {} elements, got {}",
                    w[0], args[i]
                ));
            }
            Ok(Ty::Act(w[0]))
        }
        Op::LinearParts {
            parts,
            row_scale,
            ropes,
        } => {
            let biases = ropes.iter().flatten().filter(|r| r.bias).count();
            arity(2 + usize::from(*row_scale) + biases)?;
            if !ropes.is_empty()
                && (ropes.len() != parts.len() || ropes.iter().all(Option::is_none))
            {
                return Err(format!(
                    "`linear_parts` rope= names every one of the {} parts and rotates one or more",
                    parts.len()
                ));
            }
            let mut b = 2 + usize::from(*row_scale);
            for (i, r) in ropes.iter().enumerate() {
                let Some(r) = r else { continue };
                let d = parts.get(i).copied().unwrap_or(0);
                if r.heads == 0
                    || d % r.heads != 0
                    || (d / r.heads) % 2 != 0
                    || r.base.is_nan()
                    || r.base <= 0.0
                {
                    return Err(format!(
                        "`linear_parts` part {i} needs a width divisible into {} heads of even size and a base > 0, got {d}",
                        r.heads
                    ));
                }
                if r.bias {
                    if weight(b)?.iter().product::<usize>() != d {
                        return Err(format!(
                            "`linear_parts` part {i} rope bias must have {d} elements, got {}",
                            args[b]
                        ));
                    }
                    b += 1;
                }
            }
            let k = act(0)?;
            let w = weight(1)?;
            if parts.is_empty() || parts.contains(&0) {
                return Err(format!(
                    "`linear_parts` needs one or more parts of non-zero width, got {parts:?}"
                ));
            }
            let n: usize = parts.iter().sum();
            if w.len() != 2 || w[1] != k || w[0] != n {
                return Err(format!(
                    "`linear_parts` weight must be [{n}, {k}] for parts {parts:?} of an input of width {k}, got {}",
                    args[1]
                ));
            }
            if *row_scale && act(2)? != 1 {
                return Err(format!(
                    "`linear_parts` row scale must be [S, 1], got {}",
                    args[2]
                ));
            }
            Ok(Ty::Tuple(parts.iter().map(|&p| Ty::Act(p)).collect()))
        }
        Op::LinearGlu {
            act: _,
            block,
            row_scale,
        } => {
            arity(2 + usize::from(*row_scale))?;
            let k = act(0)?;
            let w = weight(1)?;
            if w.len() != 2 || w[1] != k || w[0] % 2 != 0 || w[0] == 0 {
                return Err(format!(
                    "`linear_glu` weight must be [2n, {k}] for an input of width {k}, got {}",
                    args[1]
                ));
            }
            if *block == 0 {
                return Err("`linear_glu` block must be ≥ 1".into());
            }
            if *row_scale && act(2)? != 1 {
                return Err(format!(
                    "`linear_glu` row scale must be [S, 1], got {}",
                    args[2]
                ));
            }
            Ok(Ty::Act(w[0] / 2))
        }
        Op::LinearNorm {
            row_scale,
            residual,
            normalize,
            gain,
            eps,
        } => {
            arity(2 + usize::from(*row_scale) + usize::from(*residual) + usize::from(*gain))?;
            let k = act(0)?;
            let w = weight(1)?;
            if w.len() != 2 || w[1] != k || w[0] == 0 {
                return Err(format!(
                    "`linear_norm` weight must be [n, {k}] for an input of width {k}, got {}",
                    args[1]
                ));
            }
            let n = w[0];
            let mut i = 2;
            if *row_scale {
                if act(i)? != 1 {
                    return Err(format!(
                        "`linear_norm` row scale must be [S, 1], got {}",
                        args[i]
                    ));
                }
                i += 1;
            }
            if *residual {
                if act(i)? != n {
                    return Err(format!(
                        "`linear_norm` residual must be [S, {n}], got {}",
                        args[i]
                    ));
                }
                i += 1;
            }
            if *gain && (!*normalize || weight(i)?.iter().product::<usize>() != n) {
                return Err(format!(
                    "`linear_norm` gain needs `normalize=1` and {n} elements, got {}",
                    args[i]
                ));
            }
            if eps.is_nan() || *eps < 0.0 {
                return Err(format!("`linear_norm` eps must be ≥ 0, got {eps}"));
            }
            Ok(Ty::Tuple(vec![Ty::Act(n), Ty::Act(1)]))
        }
        Op::WTranspose => {
            arity(1)?;
            match weight(0)?.as_slice() {
                [k, n] => Ok(Ty::Weight(vec![*n, *k])),
                _ => Err(format!("`w.transpose` needs a 2-D weight, got {}", args[0])),
            }
        }
        Op::WInterleaveRows(block) => {
            arity(1)?;
            match weight(0)?.as_slice() {
                [n2, k] if *block > 0 && n2 % 2 == 0 => Ok(Ty::Weight(vec![*n2, *k])),
                _ => Err(format!(
                    "`w.interleave_rows` needs a 2-D weight of an even row count and block ≥ 1, got {} and {block}",
                    args[0]
                )),
            }
        }
        Op::Glu(_) => {
            arity(1)?;
            let d = act(0)?;
            if d % 2 != 0 {
                return Err(format!(
                    "`glu` splits its operand in two halves, got an odd width {d}"
                ));
            }
            Ok(Ty::Act(d / 2))
        }
        Op::Proj(i) => {
            arity(1)?;
            match &args[0] {
                Ty::Tuple(ts) => ts
                    .get(*i as usize)
                    .cloned()
                    .ok_or_else(|| format!("`proj {i}` of a {}-tuple", ts.len())),
                t => Err(format!("`proj` reads a multi-result node, got {t}")),
            }
        }
        Op::WSliceCols { start, len } => {
            arity(1)?;
            let w = weight(0)?;
            if w.len() != 2 || *len == 0 || start + len > w[1] {
                return Err(format!(
                    "`w.slice_cols` {start}..{} does not fit {}",
                    start + len,
                    args[0]
                ));
            }
            Ok(Ty::Weight(vec![w[0], *len]))
        }
        Op::WScale(c) => {
            arity(1)?;
            if !c.is_finite() {
                return Err(format!("`w.scale` by a non-finite {c}"));
            }
            Ok(Ty::Weight(weight(0)?))
        }
        Op::WMulCols => {
            arity(2)?;
            let (w, g) = (weight(0)?, weight(1)?);
            if w.len() != 2 || g.iter().product::<usize>() != w[1] {
                return Err(format!(
                    "`w.mul_cols` needs a 2-D weight and one factor per column, got {} and {}",
                    args[0], args[1]
                ));
            }
            Ok(Ty::Weight(w))
        }
        Op::WMap { body } => {
            if args.is_empty() {
                return Err("`w.map` needs at least one operand".into());
            }
            let shape = weight(0)?;
            let n: usize = shape.iter().product();
            for i in 1..args.len() {
                if weight(i)?.iter().product::<usize>() != n {
                    return Err(format!(
                        "`w.map` operands must have {n} elements like {}, got {}",
                        args[0], args[i]
                    ));
                }
            }
            check_body(op, body, args.len())?;
            Ok(Ty::Weight(shape))
        }
        Op::WRepeatRows(times) => {
            arity(1)?;
            let w = weight(0)?;
            match w.as_slice() {
                [n, k] if *times > 0 && n.checked_mul(*times).is_some() => {
                    Ok(Ty::Weight(vec![n * times, *k]))
                }
                _ => Err(format!(
                    "`w.repeat_rows` needs a 2-D weight and times ≥ 1, got {} and {times}",
                    args[0]
                )),
            }
        }
        Op::HeadRmsNorm { heads, eps } => {
            arity(1)?;
            let d = act(0)?;
            if *heads == 0 || d % heads != 0 {
                return Err(format!(
                    "`head_rmsnorm` needs a width divisible into {heads} heads, got {d}"
                ));
            }
            if eps.is_nan() || *eps < 0.0 {
                return Err(format!("`head_rmsnorm` eps must be ≥ 0, got {eps}"));
            }
            Ok(Ty::Act(d))
        }
        Op::WConcatRows => {
            if args.is_empty() {
                return Err("`w.concat_rows` needs at least one operand".into());
            }
            let mut rows = 0;
            let mut cols = None;
            for i in 0..args.len() {
                let w = weight(i)?;
                if w.len() != 2 || cols.is_some_and(|c| c != w[1]) {
                    return Err(format!(
                        "`w.concat_rows` needs 2-D weights with equal columns, got {}",
                        args[i]
                    ));
                }
                cols = Some(w[1]);
                rows += w[0];
            }
            Ok(Ty::Weight(vec![rows, cols.unwrap_or(0)]))
        }
        Op::WPerIter => {
            let first = weight(0)?;
            for i in 1..args.len() {
                if weight(i)? != first {
                    return Err(format!(
                        "`w.per_iter` needs weights of one shape, got {} and {}",
                        args[0], args[i]
                    ));
                }
            }
            Ok(Ty::Weight(first))
        }
        Op::Recur {
            init,
            body,
            gate,
            router,
            steps,
            ..
        } => {
            if *steps == 0 {
                return Err("`loop.recur` needs at least one step".into());
            }
            let n_init = usize::from(*init == StateInit::Operand);
            if body.params.len() != args.len() + 1 - n_init {
                return Err(format!(
                    "`loop.recur` body has {} parameters but the node passes {} captures plus the state",
                    body.params.len(),
                    args.len() - n_init
                ));
            }
            let state = body.params[0].clone();
            if n_init == 1 && args[0] != state {
                return Err(format!(
                    "`loop.recur` init operand {} does not match the state {state}",
                    args[0]
                ));
            }
            for (i, a) in args[n_init..].iter().enumerate() {
                if *a != body.params[i + 1] {
                    return Err(format!(
                        "`loop.recur` capture {} has type {a}, body expects {}",
                        i,
                        body.params[i + 1]
                    ));
                }
            }
            let want = 1 + usize::from(*gate) + usize::from(*router);
            if body.results.len() != want {
                return Err(format!(
                    "`loop.recur` body must yield {want} value(s), yields {}",
                    body.results.len()
                ));
            }
            let next = &body.graph[body.results[0]].ty;
            if *next != state {
                return Err(format!(
                    "`loop.recur` yields a next state {next} unlike the state {state}"
                ));
            }
            if *gate && body.graph[body.results[1]].ty != Ty::Act(1) {
                return Err(format!(
                    "`loop.recur` exit gate must be [S, 1], got {}",
                    body.graph[body.results[1]].ty
                ));
            }
            if *router {
                let r = &body.graph[body.results[want - 1]].ty;
                if r.cols().is_none() {
                    return Err(format!("`loop.recur` router must be [S, n], got {r}"));
                }
            }
            Ok(state)
        }
    }
}

/// An error found by the verifier, with the region path and node for the pass manager's report.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("verifier: {path}: node %{node} `{op}`: {message}")]
pub struct VerifyError {
    pub path: String,
    pub node: usize,
    pub op: String,
    pub message: String,
}

pub fn verify_module(m: &Module) -> Result<(), VerifyError> {
    verify_region(m, &m.forward, "forward")?;
    if m.forward.results.len() != 1 {
        return Err(VerifyError {
            path: "forward".into(),
            node: 0,
            op: "return".into(),
            message: "forward must return exactly the logits".into(),
        });
    }
    Ok(())
}

fn verify_region(m: &Module, r: &Region, path: &str) -> Result<(), VerifyError> {
    let order = r.topo_order();
    let err = |i: usize, op: &Op, message: String| VerifyError {
        path: path.to_string(),
        node: i,
        op: op.mnemonic().to_string(),
        message,
    };
    if order.len() != r.graph.node_count() {
        return Err(err(0, &Op::Tokens, "the region has a cycle".into()));
    }
    for (i, &n) in order.iter().enumerate() {
        let node = r.node(n);
        let args: Vec<Ty> = r.operands(n).iter().map(|&o| r.ty(o).clone()).collect();
        if let Op::Weight(v) = &node.op {
            let Some(decl) = m.weights.get(v.weight as usize) else {
                return Err(err(
                    i,
                    &node.op,
                    format!("weight @{} is not declared", v.weight),
                ));
            };
            let total: usize = decl.shape.iter().product();
            if v.offset + v.numel() > total {
                return Err(err(
                    i,
                    &node.op,
                    format!(
                        "view of {} elements at {} overruns {:?}",
                        v.numel(),
                        v.offset,
                        decl.shape
                    ),
                ));
            }
        }
        let ty = infer(&node.op, &args, &r.params).map_err(|e| err(i, &node.op, e))?;
        if ty != node.ty {
            return Err(err(
                i,
                &node.op,
                format!("stored type {} but the operands give {ty}", node.ty),
            ));
        }
        if let Op::Recur { body, .. } = &node.op {
            verify_region(m, body, &format!("{path}/%{i}"))?;
        }
    }
    for res in &r.results {
        if res.index() >= r.graph.node_count() {
            return Err(err(
                0,
                &Op::Tokens,
                "a result refers to a missing node".into(),
            ));
        }
    }
    Ok(())
}
