//! Rust builders for the `loop` dialect's ops (`dialects/mlir/loop.irdl.mlir`) over melior, and
//! the program's structure built with them as an in-memory module.
//!
//! The text emitter (`structure.rs`) stays the canonical `--stage mlir` form because it needs no
//! LLVM; this module is what a Rust program linking MLIR uses to make `loop` ops directly. The
//! two are kept honest against each other: for every example family the module built here
//! prints exactly like the parsed text (`tests/mlir_backend.rs`).
//!
//! IRDL ops have no properties: every attribute is a discardable one, and a variadic operand
//! group shares one type constraint, so variadic operands are `memref<*xf32>` casts (made with
//! [`LoopOps::unranked`]).

use super::native::Mlir;
use super::structure::{epilogue_operands, recur_operands, spec_name, weight_name, Operands};
use super::MlirError;
use loopc_runtime::artifact::{Arg, BufId, Instr, Manifest, Recur, Rows, WRef};
use melior::dialect::func;
use melior::ir::attribute::{
    Attribute, FlatSymbolRefAttribute, FloatAttribute, IntegerAttribute, StringAttribute,
    TypeAttribute,
};
use melior::ir::operation::{OperationBuilder, OperationLike, OperationMutLike};
use melior::ir::r#type::FunctionType;
use melior::ir::{
    Block, BlockLike, Identifier, Location, Module, Operation, Region, RegionLike, Type, Value,
    ValueLike,
};
use melior::Context;
use std::collections::HashMap;

fn err(e: impl std::fmt::Display) -> MlirError {
    MlirError::Mlir(e.to_string())
}

/// A `loop` attribute value.
pub enum Attr<'a> {
    I64(i64),
    F64(f64),
    Str(&'a str),
    Sym(&'a str),
}

/// Builders for the `loop` ops at one location.
#[derive(Clone, Copy)]
pub struct LoopOps<'c> {
    pub context: &'c Context,
    pub location: Location<'c>,
}

impl<'c> LoopOps<'c> {
    pub fn new(context: &'c Context) -> Self {
        LoopOps {
            context,
            location: Location::unknown(context),
        }
    }

    /// `memref<…xf32>` (or any type) from its MLIR spelling.
    pub fn ty(&self, spelling: &str) -> Result<Type<'c>, MlirError> {
        Type::parse(self.context, spelling).ok_or_else(|| err(format!("bad type `{spelling}`")))
    }

    fn attr(&self, a: &Attr) -> Attribute<'c> {
        let c = self.context;
        match *a {
            Attr::I64(v) => IntegerAttribute::new(Type::parse(c, "i64").unwrap(), v).into(),
            Attr::F64(v) => FloatAttribute::new(c, Type::float64(c), v).into(),
            Attr::Str(s) => StringAttribute::new(c, s).into(),
            Attr::Sym(s) => FlatSymbolRefAttribute::new(c, s).into(),
        }
    }

    /// The generic `loop.<name>` op; the typed builders below fix each op's shape.
    pub fn op(
        &self,
        name: &str,
        operands: &[Value<'c, '_>],
        attrs: &[(&str, Attr)],
        results: &[Type<'c>],
    ) -> Result<Operation<'c>, MlirError> {
        let attrs: Vec<(Identifier<'c>, Attribute<'c>)> = attrs
            .iter()
            .map(|(k, v)| (Identifier::new(self.context, k), self.attr(v)))
            .collect();
        OperationBuilder::new(&format!("loop.{name}"), self.location)
            .add_operands(operands)
            .add_attributes(&attrs)
            .add_results(results)
            .build()
            .map_err(err)
    }

    pub fn weight(
        &self,
        id: u32,
        name: &str,
        offset: usize,
        window: Type<'c>,
    ) -> Result<Operation<'c>, MlirError> {
        let a = [
            ("id", Attr::I64(id as i64)),
            ("name", Attr::Str(name)),
            ("offset", Attr::I64(offset as i64)),
        ];
        self.op("weight", &[], &a, &[window])
    }

    pub fn buffer(&self, id: u32, name: &str, ty: Type<'c>) -> Result<Operation<'c>, MlirError> {
        let a = [("id", Attr::I64(id as i64)), ("name", Attr::Str(name))];
        self.op("buffer", &[], &a, &[ty])
    }

    /// `part` is `"cos"` or `"sin"`.
    pub fn rope_table(
        &self,
        table: u32,
        part: &str,
        ty: Type<'c>,
    ) -> Result<Operation<'c>, MlirError> {
        let a = [
            ("part", Attr::Str(part)),
            ("table", Attr::I64(table as i64)),
        ];
        self.op("rope_table", &[], &a, &[ty])
    }

    /// Results: the slot's key rows, then its value rows.
    pub fn kv_slot(&self, site: u32, name: &str, ty: Type<'c>) -> Result<Operation<'c>, MlirError> {
        let a = [("name", Attr::Str(name)), ("site", Attr::I64(site as i64))];
        self.op("kv_slot", &[], &a, &[ty, ty])
    }

    pub fn kv_write(
        &self,
        site: u32,
        k: Value<'c, '_>,
        v: Value<'c, '_>,
    ) -> Result<Operation<'c>, MlirError> {
        self.op(
            "kv_write",
            &[k, v],
            &[("site", Attr::I64(site as i64))],
            &[],
        )
    }

    pub fn embed(
        &self,
        tokens: Value<'c, '_>,
        table: Value<'c, '_>,
        out: Value<'c, '_>,
    ) -> Result<Operation<'c>, MlirError> {
        self.op("embed", &[tokens, table, out], &[], &[])
    }

    pub fn pos_embed(
        &self,
        table: Value<'c, '_>,
        out: Value<'c, '_>,
    ) -> Result<Operation<'c>, MlirError> {
        self.op("pos_embed", &[table, out], &[], &[])
    }

    pub fn sinusoidal(&self, base: f64, out: Value<'c, '_>) -> Result<Operation<'c>, MlirError> {
        self.op("sinusoidal", &[out], &[("base", Attr::F64(base))], &[])
    }

    /// `layout` is `"nk"` (`x · wᵀ`) or `"kn"` (`x · w`).
    pub fn matmul(
        &self,
        layout: &str,
        x: Value<'c, '_>,
        w: Value<'c, '_>,
        out: Value<'c, '_>,
    ) -> Result<Operation<'c>, MlirError> {
        self.op(
            "matmul",
            &[x, w, out],
            &[("layout", Attr::Str(layout))],
            &[],
        )
    }

    /// `terms` names the unranked `epi` operands in order (`row_scale,residual,bias`).
    pub fn matmul_ep(
        &self,
        layout: &str,
        terms: &str,
        operands: &[Value<'c, '_>],
    ) -> Result<Operation<'c>, MlirError> {
        let a = [("layout", Attr::Str(layout)), ("terms", Attr::Str(terms))];
        self.op("matmul_ep", operands, &a, &[])
    }

    /// `operands`: x, w, the unranked destinations, then every part's unranked epilogue
    /// operands; `terms` names those per part (`;` between parts).
    pub fn matmul_parts(
        &self,
        layout: &str,
        parts: usize,
        terms: &str,
        operands: &[Value<'c, '_>],
    ) -> Result<Operation<'c>, MlirError> {
        let a = [
            ("layout", Attr::Str(layout)),
            ("parts", Attr::I64(parts as i64)),
            ("terms", Attr::Str(terms)),
        ];
        self.op("matmul_parts", operands, &a, &[])
    }

    /// `operands`: the unranked inputs, then the output.
    pub fn concat(&self, operands: &[Value<'c, '_>]) -> Result<Operation<'c>, MlirError> {
        self.op("concat", operands, &[], &[])
    }

    pub fn copy(&self, src: Value<'c, '_>, dst: Value<'c, '_>) -> Result<Operation<'c>, MlirError> {
        self.op("copy", &[src, dst], &[], &[])
    }

    pub fn slice_cols(
        &self,
        start: usize,
        src: Value<'c, '_>,
        out: Value<'c, '_>,
    ) -> Result<Operation<'c>, MlirError> {
        self.op(
            "slice_cols",
            &[src, out],
            &[("start", Attr::I64(start as i64))],
            &[],
        )
    }

    /// A call of the kernel function `callee` on unranked arguments.
    pub fn kernel(
        &self,
        callee: &str,
        spec: &str,
        args: &[Value<'c, '_>],
    ) -> Result<Operation<'c>, MlirError> {
        let a = [("callee", Attr::Sym(callee)), ("spec", Attr::Str(spec))];
        self.op("kernel", args, &a, &[])
    }

    /// `operands`: state, next, then the unranked injected values.
    #[allow(clippy::too_many_arguments)]
    pub fn recur(
        &self,
        body: &str,
        steps: usize,
        init: &str,
        cache: &str,
        operands: &[Value<'c, '_>],
    ) -> Result<Operation<'c>, MlirError> {
        let a = [
            ("body", Attr::Sym(body)),
            ("cache", Attr::Str(cache)),
            ("init", Attr::Str(init)),
            ("steps", Attr::I64(steps as i64)),
        ];
        self.op("recur", operands, &a, &[])
    }

    /// `operands`: the next state, then the unranked gate logits if any.
    pub fn exit(
        &self,
        policy: &str,
        operands: &[Value<'c, '_>],
    ) -> Result<Operation<'c>, MlirError> {
        self.op("exit", operands, &[("policy", Attr::Str(policy))], &[])
    }

    /// `memref.cast` of `v` to `memref<*xf32>`, the kind of every variadic `loop` operand.
    pub fn unranked(&self, v: Value<'c, '_>) -> Result<Operation<'c>, MlirError> {
        OperationBuilder::new("memref.cast", self.location)
            .add_operands(&[v])
            .add_results(&[self.ty("memref<*xf32>")?])
            .build()
            .map_err(err)
    }
}

/// The program's structure (kernels declared, not defined) built op by op with [`LoopOps`]; the
/// same module as parsing `structure::program_module(m, false)`.
pub fn structure_module<'c>(mlir: &'c Mlir, m: &Manifest) -> Result<Module<'c>, MlirError> {
    let ops = LoopOps::new(&mlir.context);
    let c = &mlir.context;
    let mut module = Module::new(ops.location);
    let mut module_attrs = vec![
        ("loop.model", Attr::Str(&m.model)),
        ("loop.vocab", Attr::I64(m.vocab as i64)),
        ("loop.hidden", Attr::I64(m.hidden as i64)),
    ];
    for (k, v) in module_attrs.drain(..) {
        module.as_operation_mut().set_attribute(k, ops.attr(&v));
    }
    let body = module.body();

    // @program(%tokens) -> logits.
    let tokens_ty = ops.ty("memref<?xi32>")?;
    let logits_ty = ops.ty(&buf_ty(m, m.program.logits))?;
    let block = Block::new(&[(tokens_ty, ops.location)]);
    {
        let mut sc = Scope::new(m, ops, &block);
        let tokens: Value = block.argument(0).map_err(err)?.into();
        for i in &m.program.prelude {
            sc.instr(i, tokens)?;
        }
        if let Some(r) = &m.program.recur {
            let (state, next, injected) = recur_operands(m);
            let mut operands = vec![sc.buf(state)?, sc.buf(next)?];
            for &b in &injected {
                let v = sc.buf(b)?;
                operands.push(sc.unranked(v)?);
            }
            let init = format!("{:?}", r.init);
            let cache = format!("{:?}", r.cache);
            sc.append(ops.recur("recur_body", r.default_steps, &init, &cache, &operands)?)?;
        }
        for i in &m.program.coda {
            sc.instr(i, tokens)?;
        }
        let logits = sc.buf(m.program.logits)?;
        block.append_operation(func::r#return(&[logits], ops.location));
    }
    let region = Region::new();
    region.append_block(block);
    body.append_operation(func::func(
        c,
        StringAttribute::new(c, "program"),
        TypeAttribute::new(FunctionType::new(c, &[tokens_ty], &[logits_ty]).into()),
        region,
        &[],
        ops.location,
    ));

    if let Some(r) = &m.program.recur {
        body.append_operation(body_func(m, r, ops)?);
    }
    let ptr = ops.ty("!llvm.ptr")?;
    for k in &m.kernels {
        body.append_operation(func::func(
            c,
            StringAttribute::new(c, &k.symbol),
            TypeAttribute::new(FunctionType::new(c, &[ptr, ptr], &[]).into()),
            Region::new(),
            &[(
                Identifier::new(c, "sym_visibility"),
                StringAttribute::new(c, "private").into(),
            )],
            ops.location,
        ));
    }
    if !module.as_operation().verify() {
        return Err(err("the built structure fails MLIR's verifier"));
    }
    Ok(module)
}

fn body_func<'c>(m: &Manifest, r: &Recur, ops: LoopOps<'c>) -> Result<Operation<'c>, MlirError> {
    let c = ops.context;
    let (state, next, injected) = recur_operands(m);
    let params: Vec<BufId> = [state, next].into_iter().chain(injected).collect();
    let types = params
        .iter()
        .map(|&b| ops.ty(&buf_ty(m, b)))
        .collect::<Result<Vec<_>, _>>()?;
    let block = Block::new(&types.iter().map(|&t| (t, ops.location)).collect::<Vec<_>>());
    {
        let mut sc = Scope::new(m, ops, &block);
        for (k, &b) in params.iter().enumerate() {
            sc.bufs.insert(b, block.argument(k).map_err(err)?.into());
        }
        // A body never embeds tokens; the text form names a `%tokens` it does not define.
        let none = sc.buf(r.next)?;
        for i in &r.body {
            sc.instr(i, none)?;
        }
        let mut operands = vec![sc.buf(r.next)?];
        if let Some(g) = r.gate {
            let v = sc.buf(g)?;
            operands.push(sc.unranked(v)?);
        }
        sc.append(ops.exit(&format!("{:?}", r.exit), &operands)?)?;
        block.append_operation(func::r#return(&[], ops.location));
    }
    let region = Region::new();
    region.append_block(block);
    Ok(func::func(
        c,
        StringAttribute::new(c, "recur_body"),
        TypeAttribute::new(FunctionType::new(c, &types, &[]).into()),
        region,
        &[(
            Identifier::new(c, "sym_visibility"),
            StringAttribute::new(c, "private").into(),
        )],
        ops.location,
    ))
}

fn buf_ty(m: &Manifest, b: BufId) -> String {
    let d = &m.buffers[b as usize];
    match d.rows {
        Rows::Tokens => format!("memref<?x{}xf32>", d.cols),
        Rows::Fixed(n) => format!("memref<{n}x{}xf32>", d.cols),
    }
}

fn w_ty(w: &WRef) -> String {
    format!("memref<{}x{}xf32>", w.rows, w.cols)
}

impl<'c, 'a> Operands for Scope<'c, 'a> {
    type V = Value<'c, 'a>;
    type E = MlirError;
    fn buf_value(&mut self, b: BufId) -> Result<Self::V, MlirError> {
        self.buf(b)
    }
    fn weight_value(&mut self, w: &WRef) -> Result<Self::V, MlirError> {
        self.weight(w)
    }
    fn table_value(&mut self, t: u32, cos: bool) -> Result<Self::V, MlirError> {
        self.table(t, cos)
    }
    fn unranked_value(&mut self, v: Self::V) -> Result<Self::V, MlirError> {
        self.unranked(v)
    }
}

/// Values defined on first use, in the order the text emitter defines them, so both forms
/// print the same.
struct Scope<'c, 'a> {
    m: &'a Manifest,
    ops: LoopOps<'c>,
    block: &'a Block<'c>,
    bufs: HashMap<BufId, Value<'c, 'a>>,
    weights: HashMap<(u32, usize, usize, usize), Value<'c, 'a>>,
    tables: HashMap<(u32, bool), Value<'c, 'a>>,
    kv: HashMap<u32, (Value<'c, 'a>, Value<'c, 'a>)>,
    /// Keyed by the value's MLIR handle (melior's `Value` is not `Hash`).
    casts: HashMap<usize, Value<'c, 'a>>,
}

impl<'c, 'a> Scope<'c, 'a> {
    fn new(m: &'a Manifest, ops: LoopOps<'c>, block: &'a Block<'c>) -> Self {
        Scope {
            m,
            ops,
            block,
            bufs: HashMap::new(),
            weights: HashMap::new(),
            tables: HashMap::new(),
            kv: HashMap::new(),
            casts: HashMap::new(),
        }
    }

    fn append(&self, op: Operation<'c>) -> Result<melior::ir::OperationRef<'c, 'a>, MlirError> {
        Ok(self.block.append_operation(op))
    }

    fn result(&self, op: Operation<'c>) -> Result<Value<'c, 'a>, MlirError> {
        Ok(self.append(op)?.result(0).map_err(err)?.into())
    }

    fn buf(&mut self, b: BufId) -> Result<Value<'c, 'a>, MlirError> {
        if let Some(v) = self.bufs.get(&b) {
            return Ok(*v);
        }
        let ty = self.ops.ty(&buf_ty(self.m, b))?;
        let name = &self.m.buffers[b as usize].name;
        let v = self.result(self.ops.buffer(b, name, ty)?)?;
        self.bufs.insert(b, v);
        Ok(v)
    }

    fn weight(&mut self, w: &WRef) -> Result<Value<'c, 'a>, MlirError> {
        let key = (w.weight, w.offset, w.rows, w.cols);
        if let Some(v) = self.weights.get(&key) {
            return Ok(*v);
        }
        let name = weight_name(self.m, w);
        let ty = self.ops.ty(&w_ty(w))?;
        let v = self.result(self.ops.weight(w.weight, &name, w.offset, ty)?)?;
        self.weights.insert(key, v);
        Ok(v)
    }

    fn table(&mut self, t: u32, cos: bool) -> Result<Value<'c, 'a>, MlirError> {
        if let Some(v) = self.tables.get(&(t, cos)) {
            return Ok(*v);
        }
        let half = self.m.rope_tables[t as usize].head_dim / 2;
        let ty = self.ops.ty(&format!("memref<?x{half}xf32>"))?;
        let part = if cos { "cos" } else { "sin" };
        let v = self.result(self.ops.rope_table(t, part, ty)?)?;
        self.tables.insert((t, cos), v);
        Ok(v)
    }

    fn kv(&mut self, site: u32, k: bool) -> Result<Value<'c, 'a>, MlirError> {
        if !self.kv.contains_key(&site) {
            let s = &self.m.kv_sites[site as usize];
            let ty = self
                .ops
                .ty(&format!("memref<?x{}xf32>", s.kv_heads * s.head_dim))?;
            let op = self.append(self.ops.kv_slot(site, &s.name, ty)?)?;
            let kv = (
                op.result(0).map_err(err)?.into(),
                op.result(1).map_err(err)?.into(),
            );
            self.kv.insert(site, kv);
        }
        let (kv_k, kv_v) = self.kv[&site];
        Ok(if k { kv_k } else { kv_v })
    }

    fn unranked(&mut self, v: Value<'c, 'a>) -> Result<Value<'c, 'a>, MlirError> {
        let key = v.to_raw().ptr as usize;
        if let Some(u) = self.casts.get(&key) {
            return Ok(*u);
        }
        let u = self.result(self.ops.unranked(v)?)?;
        self.casts.insert(key, u);
        Ok(u)
    }

    fn arg(&mut self, a: &Arg) -> Result<Value<'c, 'a>, MlirError> {
        match *a {
            Arg::Buf(b) => self.buf(b),
            Arg::Weight(w) => self.weight(&w),
            Arg::RopeCos(t) => self.table(t, true),
            Arg::RopeSin(t) => self.table(t, false),
            Arg::KCache(s) => self.kv(s, true),
            Arg::VCache(s) => self.kv(s, false),
        }
    }

    fn instr(&mut self, i: &Instr, tokens: Value<'c, 'a>) -> Result<(), MlirError> {
        let ops = self.ops;
        let op = match i {
            Instr::Embed { table, out } => {
                let t = self.weight(table)?;
                let o = self.buf(*out)?;
                ops.embed(tokens, t, o)?
            }
            Instr::PosEmbed { table, out } => {
                let t = self.weight(table)?;
                let o = self.buf(*out)?;
                ops.pos_embed(t, o)?
            }
            Instr::Sinusoidal { base, out } => {
                let o = self.buf(*out)?;
                ops.sinusoidal(*base, o)?
            }
            Instr::MatMul { x, w, out, epi } => {
                let x = self.buf(*x)?;
                let wv = self.weight(w)?;
                let o = self.buf(*out)?;
                if epi.is_none() {
                    ops.matmul("nk", x, wv, o)?
                } else {
                    let mut operands = vec![x, wv, o];
                    let terms = epilogue_operands(self, epi, &mut operands)?;
                    ops.matmul_ep("nk", &terms.join(","), &operands)?
                }
            }
            Instr::MatMulParts { x, w, parts } => {
                let x = self.buf(*x)?;
                let wv = self.weight(w)?;
                let mut operands = vec![x, wv];
                for p in parts {
                    let v = self.buf(p.out)?;
                    operands.push(self.unranked(v)?);
                }
                let mut terms = vec![];
                for p in parts {
                    terms.push(epilogue_operands(self, &p.epi, &mut operands)?.join(","));
                }
                ops.matmul_parts("nk", parts.len(), &terms.join(";"), &operands)?
            }
            Instr::MatMulKN { x, w, out } => {
                let x = self.buf(*x)?;
                let w = self.weight(w)?;
                let o = self.buf(*out)?;
                ops.matmul("kn", x, w, o)?
            }
            Instr::Concat { inputs, out } => {
                let mut operands = vec![];
                for &b in inputs {
                    let v = self.buf(b)?;
                    operands.push(self.unranked(v)?);
                }
                operands.push(self.buf(*out)?);
                ops.concat(&operands)?
            }
            Instr::Copy { src, dst } => {
                let s = self.buf(*src)?;
                let d = self.buf(*dst)?;
                ops.copy(s, d)?
            }
            Instr::SliceCols { src, start, out } => {
                let s = self.buf(*src)?;
                let o = self.buf(*out)?;
                ops.slice_cols(*start, s, o)?
            }
            Instr::KvWrite { site, k, v } => {
                let kv = self.buf(*k)?;
                let vv = self.buf(*v)?;
                ops.kv_write(*site, kv, vv)?
            }
            Instr::Kernel { kernel, args } => {
                let mut operands = vec![];
                for a in args {
                    let v = self.arg(a)?;
                    operands.push(self.unranked(v)?);
                }
                let decl = &self.m.kernels[*kernel as usize];
                ops.kernel(&decl.symbol, &spec_name(decl), &operands)?
            }
            // The text form writes a comment for instructions the dialect has no op for.
            _ => return Ok(()),
        };
        self.append(op)?;
        Ok(())
    }
}
