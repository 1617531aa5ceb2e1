//! The program's structure in the `loop` dialect (`dialects/mlir/loop.irdl.mlir`): a
//! `func.func @program` with the prelude and coda as `loop` ops over buffers and weights, and
//! the recurrence as `loop.recur` naming its body, a `func.func @recur_body` whose arguments
//! are the state, the next state and the injected loop invariants.
//!
//! The CPU backend does not execute this part (the runtime interprets the artifact's program
//! and calls the kernels); it is the program as MLIR sees it: verified against the dialect, and
//! the input of `lower_recur`, which rewrites the recurrence into upstream `scf.for`.

use super::kernels;
use super::text::sym;
use loopc_runtime::artifact::{Arg, BufId, Epilogue, Instr, KernelDecl, Manifest, Rows, WRef};
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;

/// The whole module: structure and kernel functions (`loopc ir --stage mlir`). With
/// `kernel_bodies = false` the kernels are only declared, which keeps the structure readable.
pub fn program_module(m: &Manifest, kernel_bodies: bool) -> Result<String, String> {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "module attributes {{loop.model = {:?}, loop.vocab = {} : i64, loop.hidden = {} : i64}} {{",
        m.model, m.vocab, m.hidden
    );
    s.push_str(&program_func(m));
    if let Some(r) = &m.program.recur {
        s.push_str(&body_func(m, r));
    }
    for k in &m.kernels {
        if kernel_bodies {
            s.push_str(&kernels::kernel_func(k)?);
        } else {
            let _ = writeln!(
                s,
                "  func.func private {}(!llvm.ptr, !llvm.ptr)",
                sym(&k.symbol)
            );
        }
    }
    if kernel_bodies {
        s.push_str(&super::gemm::gemm_funcs());
        s.push_str(&super::gemm::amx_func());
        s.push_str(&kernels::view_helper());
    }
    s.push_str("}\n");
    Ok(s)
}

/// SSA names of the values a function body defines on first use.
struct Scope<'a> {
    m: &'a Manifest,
    out: String,
    bufs: HashMap<BufId, String>,
    weights: HashMap<(u32, usize, usize, usize), String>,
    tables: HashMap<(u32, bool), String>,
    kv: HashMap<u32, String>,
    casts: HashMap<String, String>,
    next: usize,
}

impl<'a> Scope<'a> {
    fn new(m: &'a Manifest) -> Self {
        Scope {
            m,
            out: String::new(),
            bufs: HashMap::new(),
            weights: HashMap::new(),
            tables: HashMap::new(),
            kv: HashMap::new(),
            casts: HashMap::new(),
            next: 0,
        }
    }

    fn line(&mut self, l: impl AsRef<str>) {
        self.out.push_str("    ");
        self.out.push_str(l.as_ref());
        self.out.push('\n');
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.next += 1;
        format!("%{hint}{}", self.next - 1)
    }

    fn buf_ty(&self, b: BufId) -> String {
        let d = &self.m.buffers[b as usize];
        match d.rows {
            Rows::Tokens => format!("memref<?x{}xf32>", d.cols),
            Rows::Fixed(n) => format!("memref<{n}x{}xf32>", d.cols),
        }
    }

    fn buf(&mut self, b: BufId) -> String {
        if let Some(v) = self.bufs.get(&b) {
            return v.clone();
        }
        let v = self.fresh("b");
        let ty = self.buf_ty(b);
        let name = &self.m.buffers[b as usize].name;
        self.line(format!(
            "{v} = \"loop.buffer\"() {{id = {b} : i64, name = {name:?}}} : () -> {ty}"
        ));
        self.bufs.insert(b, v.clone());
        v
    }

    fn weight(&mut self, w: &WRef) -> String {
        let key = (w.weight, w.offset, w.rows, w.cols);
        if let Some(v) = self.weights.get(&key) {
            return v.clone();
        }
        let v = self.fresh("w");
        let name = weight_name(self.m, w);
        self.line(format!(
            "{v} = \"loop.weight\"() {{id = {} : i64, name = {name:?}, offset = {} : i64}} : () -> memref<{}x{}xf32>",
            w.weight, w.offset, w.rows, w.cols
        ));
        self.weights.insert(key, v.clone());
        v
    }

    fn table(&mut self, t: u32, cos: bool) -> String {
        if let Some(v) = self.tables.get(&(t, cos)) {
            return v.clone();
        }
        let v = self.fresh("t");
        let half = self.m.rope_tables[t as usize].head_dim / 2;
        let part = if cos { "cos" } else { "sin" };
        self.line(format!(
            "{v} = \"loop.rope_table\"() {{part = {part:?}, table = {t} : i64}} : () -> memref<?x{half}xf32>"
        ));
        self.tables.insert((t, cos), v.clone());
        v
    }

    fn kv_ty(&self, site: u32) -> String {
        let s = &self.m.kv_sites[site as usize];
        format!("memref<?x{}xf32>", s.kv_heads * s.head_dim)
    }

    /// The k or v rows of a site's current slot.
    fn kv(&mut self, site: u32, k: bool) -> String {
        let v = match self.kv.get(&site) {
            Some(v) => v.clone(),
            None => {
                let v = self.fresh("kv");
                let ty = self.kv_ty(site);
                let name = &self.m.kv_sites[site as usize].name;
                self.line(format!(
                    "{v}:2 = \"loop.kv_slot\"() {{name = {name:?}, site = {site} : i64}} : () -> ({ty}, {ty})"
                ));
                self.kv.insert(site, v.clone());
                v
            }
        };
        format!("{v}#{}", if k { 0 } else { 1 })
    }

    fn arg(&mut self, a: &Arg) -> (String, String) {
        match *a {
            Arg::Buf(b) => (self.buf(b), self.buf_ty(b)),
            Arg::Weight(w) => (
                self.weight(&w),
                format!("memref<{}x{}xf32>", w.rows, w.cols),
            ),
            Arg::RopeCos(t) | Arg::RopeSin(t) => {
                let half = self.m.rope_tables[t as usize].head_dim / 2;
                (
                    self.table(t, matches!(a, Arg::RopeCos(_))),
                    format!("memref<?x{half}xf32>"),
                )
            }
            Arg::KCache(s) | Arg::VCache(s) => {
                (self.kv(s, matches!(a, Arg::KCache(_))), self.kv_ty(s))
            }
        }
    }

    /// `"loop.<op>"(operands) {attrs}` with operand types spelled out.
    fn op(&mut self, name: &str, operands: &[(String, String)], attrs: &str) {
        let vals: Vec<&str> = operands.iter().map(|(v, _)| v.as_str()).collect();
        let tys: Vec<&str> = operands.iter().map(|(_, t)| t.as_str()).collect();
        let attrs = if attrs.is_empty() {
            String::new()
        } else {
            format!(" {{{attrs}}}")
        };
        self.line(format!(
            "\"loop.{name}\"({}){attrs} : ({}) -> ()",
            vals.join(", "),
            tys.join(", ")
        ));
    }

    /// The value as `memref<*xf32>`: the operand kind of variadic `loop` operands (an IRDL
    /// constraint binds one type, and a kernel's arguments have several).
    fn unranked(&mut self, (v, ty): (String, String)) -> (String, String) {
        const U: &str = "memref<*xf32>";
        if let Some(u) = self.casts.get(&v) {
            return (u.clone(), U.into());
        }
        let u = self.fresh("u");
        self.line(format!("{u} = memref.cast {v} : {ty} to {U}"));
        self.casts.insert(v, u.clone());
        (u, U.into())
    }

    fn b(&mut self, b: BufId) -> (String, String) {
        (self.buf(b), self.buf_ty(b))
    }

    #[allow(unreachable_patterns)]
    fn instr(&mut self, i: &Instr, tokens: &str) {
        match i {
            Instr::Embed { table, out } => {
                let t = (self.weight(table), wty(table));
                let o = self.b(*out);
                self.op(
                    "embed",
                    &[(tokens.into(), "memref<?xi32>".into()), t, o],
                    "",
                );
            }
            Instr::PosEmbed { table, out } => {
                let t = (self.weight(table), wty(table));
                let o = self.b(*out);
                self.op("pos_embed", &[t, o], "");
            }
            Instr::Sinusoidal { base, out } => {
                let o = self.b(*out);
                self.op("sinusoidal", &[o], &format!("base = {base:?} : f64"));
            }
            Instr::MatMul { x, w, out, epi } => {
                let x = self.b(*x);
                let wv = (self.weight(w), wty(w));
                let o = self.b(*out);
                if epi.is_none() {
                    self.op("matmul", &[x, wv, o], "layout = \"nk\"");
                } else {
                    let mut ops = vec![x, wv, o];
                    let Ok(terms) = epilogue_operands(self, epi, &mut ops);
                    let attrs = format!("layout = \"nk\", terms = {:?}", terms.join(","));
                    self.op("matmul_ep", &ops, &attrs);
                }
            }
            Instr::MatMulParts { x, w, parts } => {
                // The destinations in column order, then each part's epilogue operands; `terms`
                // names them per part (`;` between parts) and `parts` counts the destinations.
                let x = self.b(*x);
                let wv = (self.weight(w), wty(w));
                let mut ops = vec![x, wv];
                for p in parts {
                    let v = self.b(p.out);
                    ops.push(self.unranked(v));
                }
                let mut terms = vec![];
                for p in parts {
                    let Ok(t) = epilogue_operands(self, &p.epi, &mut ops);
                    terms.push(t.join(","));
                }
                let attrs = format!(
                    "layout = \"nk\", parts = {} : i64, terms = {:?}",
                    parts.len(),
                    terms.join(";")
                );
                self.op("matmul_parts", &ops, &attrs);
            }
            Instr::MatMulKN { x, w, out } => {
                let x = self.b(*x);
                let w = (self.weight(w), wty(w));
                let o = self.b(*out);
                self.op("matmul", &[x, w, o], "layout = \"kn\"");
            }
            Instr::Concat { inputs, out } => {
                let mut ops: Vec<(String, String)> = vec![];
                for &b in inputs {
                    let v = self.b(b);
                    ops.push(self.unranked(v));
                }
                ops.push(self.b(*out));
                self.op("concat", &ops, "");
            }
            Instr::Copy { src, dst } => {
                let ops = [self.b(*src), self.b(*dst)];
                self.op("copy", &ops, "");
            }
            Instr::SliceCols { src, start, out } => {
                let ops = [self.b(*src), self.b(*out)];
                self.op("slice_cols", &ops, &format!("start = {start} : i64"));
            }
            Instr::KvWrite { site, k, v } => {
                let ops = [self.b(*k), self.b(*v)];
                self.op("kv_write", &ops, &format!("site = {site} : i64"));
            }
            Instr::Kernel { kernel, args } => {
                let mut ops: Vec<(String, String)> = vec![];
                for a in args {
                    let v = self.arg(a);
                    ops.push(self.unranked(v));
                }
                let decl: &KernelDecl = &self.m.kernels[*kernel as usize];
                let attrs = format!(
                    "callee = {}, spec = {:?}",
                    sym(&decl.symbol),
                    spec_name(decl)
                );
                self.op("kernel", &ops, &attrs);
            }
            // Instructions added after this backend: kept visible rather than failing the stage.
            other => self.line(format!("// unsupported by the loop dialect: {other:?}")),
        }
    }
}

/// What the text emitter and the melior builders (`loop_ops.rs`) both provide, so that the
/// operands of an epilogue are made in one order by one function.
pub(super) trait Operands {
    type V;
    type E;
    fn buf_value(&mut self, b: BufId) -> Result<Self::V, Self::E>;
    fn weight_value(&mut self, w: &WRef) -> Result<Self::V, Self::E>;
    /// A rope table's `cos` (or `sin`) rows.
    fn table_value(&mut self, t: u32, cos: bool) -> Result<Self::V, Self::E>;
    fn unranked_value(&mut self, v: Self::V) -> Result<Self::V, Self::E>;
}

impl Operands for Scope<'_> {
    type V = (String, String);
    type E = std::convert::Infallible;
    fn buf_value(&mut self, b: BufId) -> Result<Self::V, Self::E> {
        Ok(self.b(b))
    }
    fn weight_value(&mut self, w: &WRef) -> Result<Self::V, Self::E> {
        Ok((self.weight(w), wty(w)))
    }
    fn table_value(&mut self, t: u32, cos: bool) -> Result<Self::V, Self::E> {
        Ok(self.arg(&if cos {
            Arg::RopeCos(t)
        } else {
            Arg::RopeSin(t)
        }))
    }
    fn unranked_value(&mut self, v: Self::V) -> Result<Self::V, Self::E> {
        Ok(self.unranked(v))
    }
}

/// Appends the epilogue's operands (unranked, in the dialect's order) and returns the term
/// names `loop.matmul_ep` / `loop.matmul_parts` list them by.
pub(super) fn epilogue_operands<S: Operands>(
    s: &mut S,
    epi: &Epilogue,
    ops: &mut Vec<S::V>,
) -> Result<Vec<String>, S::E> {
    let mut terms = vec![];
    if let Some(r) = epi.row_scale {
        let v = s.buf_value(r)?;
        ops.push(s.unranked_value(v)?);
        terms.push("row_scale".to_string());
    }
    if let Some(r) = epi.residual {
        let v = s.buf_value(r)?;
        ops.push(s.unranked_value(v)?);
        terms.push("residual".to_string());
    }
    if let Some(bias) = &epi.bias {
        let v = s.weight_value(bias)?;
        ops.push(s.unranked_value(v)?);
        terms.push("bias".to_string());
    }
    if let Some(g) = &epi.glu {
        let v = s.buf_value(g.out)?;
        ops.push(s.unranked_value(v)?);
        terms.push(format!("glu({:?},block={})", g.act, g.block));
    }
    if let Some(nm) = &epi.norm {
        if let Some(g) = &nm.gain {
            let v = s.weight_value(g)?;
            ops.push(s.unranked_value(v)?);
        }
        if let Some(q) = nm.inv_rms {
            let v = s.buf_value(q)?;
            ops.push(s.unranked_value(v)?);
        }
        terms.push(format!(
            "norm(eps={:?},normalize={},gain={},inv_rms={})",
            nm.eps,
            nm.normalize,
            nm.gain.is_some(),
            nm.inv_rms.is_some()
        ));
    }
    if let Some(rp) = &epi.rope {
        for cos in [true, false] {
            let v = s.table_value(rp.table, cos)?;
            ops.push(s.unranked_value(v)?);
        }
        terms.push(format!("rope({:?},head_dim={})", rp.style, rp.head_dim));
    }
    Ok(terms)
}

fn wty(w: &WRef) -> String {
    format!("memref<{}x{}xf32>", w.rows, w.cols)
}

/// A checkpoint tensor's name, or a derived weight's.
pub(super) fn weight_name(m: &Manifest, w: &WRef) -> String {
    match (w.weight as usize).checked_sub(m.weights.len()) {
        None => m.weights[w.weight as usize].name.clone(),
        Some(d) => m.derived.get(d).map(|d| d.name.clone()).unwrap_or_default(),
    }
}

/// The kind of a kernel, for reading the structure without the kernel bodies.
pub(super) fn spec_name(d: &KernelDecl) -> String {
    let s = format!("{:?}", d.spec);
    let end = s.find([' ', '{', '(']).unwrap_or(s.len());
    s[..end].to_lowercase()
}

fn program_func(m: &Manifest) -> String {
    let mut sc = Scope::new(m);
    let tokens = "%tokens";
    let p = &m.program;
    for i in &p.prelude {
        sc.instr(i, tokens);
    }
    if let Some(r) = &p.recur {
        let (state, next, injected) = recur_operands(m);
        let mut ops = vec![sc.b(state), sc.b(next)];
        for &b in &injected {
            let v = sc.b(b);
            ops.push(sc.unranked(v));
        }
        let init = format!("{:?}", r.init);
        let cache = format!("{:?}", r.cache);
        sc.op(
            "recur",
            &ops,
            &format!(
                "body = @recur_body, cache = {cache:?}, init = {init:?}, steps = {} : i64",
                r.default_steps
            ),
        );
    }
    for i in &p.coda {
        sc.instr(i, tokens);
    }
    let logits = sc.buf(p.logits);
    let lty = sc.buf_ty(p.logits);
    sc.line(format!("return {logits} : {lty}"));
    format!(
        "  func.func @program({tokens}: memref<?xi32>) -> {lty} {{\n{}  }}\n",
        sc.out
    )
}

/// `(state, next, injected)`: the body's arguments. Injected are the buffers the body reads
/// that the prelude or coda also use (loop invariants and values read after the loop).
pub(super) fn recur_operands(m: &Manifest) -> (BufId, BufId, Vec<BufId>) {
    let r = m.program.recur.as_ref().expect("a recurrence");
    let outside: BTreeSet<BufId> = m
        .program
        .prelude
        .iter()
        .chain(&m.program.coda)
        .flat_map(|i| i.buffers())
        .collect();
    let inside: BTreeSet<BufId> = r.body.iter().flat_map(|i| i.buffers()).collect();
    let mut injected: Vec<BufId> = inside
        .intersection(&outside)
        .copied()
        .filter(|&b| b != r.state && b != r.next)
        .collect();
    if let Some(g) = r.gate {
        injected.retain(|&b| b != g);
    }
    (r.state, r.next, injected)
}

fn body_func(m: &Manifest, r: &loopc_runtime::artifact::Recur) -> String {
    let (state, next, injected) = recur_operands(m);
    let mut sc = Scope::new(m);
    let mut params = vec![];
    for (k, b) in [state, next].into_iter().chain(injected).enumerate() {
        let v = match k {
            0 => "%state".to_string(),
            1 => "%next".to_string(),
            _ => format!("%inj{}", k - 2),
        };
        params.push(format!("{v}: {}", sc.buf_ty(b)));
        sc.bufs.insert(b, v);
    }
    for i in &r.body {
        sc.instr(i, "%tokens");
    }
    let mut ops = vec![sc.b(r.next)];
    if let Some(g) = r.gate {
        let v = sc.b(g);
        ops.push(sc.unranked(v));
    }
    let policy = format!("{:?}", r.exit);
    sc.op("exit", &ops, &format!("policy = {policy:?}"));
    sc.line("return");
    format!(
        "  func.func private @recur_body({}) {{\n{}  }}\n",
        params.join(", "),
        sc.out
    )
}
