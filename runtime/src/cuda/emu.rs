//! The host emulator of a [`Gpu`]: device memory is host memory, generated kernels are the CPU
//! artifact's functions called block by block as a grid would run them, support kernels are
//! Rust versions of the contract's formulas, and products are plain loops. Every pointer a
//! launch or a copy touches is checked against the allocations, so an executor bug (a wrong
//! offset, stride or capacity) is an error here rather than a silent corruption on a GPU.

use super::gpu::{grid, DevMem, Entry, Gemm, Gpu, Param, What};
use crate::artifact::{cuda::support, EwOp, RopeStyle};
use crate::error::{Result, RuntimeError};
use crate::kernels::{KernelFn, Kernels};
use crate::matmul::{RopeEpi, RowPos};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Live allocations: base address → (bytes, what it holds).
type Registry = Arc<Mutex<BTreeMap<u64, (usize, String)>>>;

pub(crate) struct Emu {
    entries: Vec<Entry>,
    fns: Vec<KernelFn>,
    live: Registry,
    /// Every operation in symbolic form (`what+element`), while logging is on.
    log: Mutex<Option<Vec<String>>>,
}

struct HostAlloc {
    _data: Vec<u64>,
    addr: u64,
    live: Registry,
}

impl Drop for HostAlloc {
    fn drop(&mut self) {
        if let Ok(mut l) = self.live.lock() {
            l.remove(&self.addr);
        }
    }
}

fn oob(what: &str) -> RuntimeError {
    RuntimeError::Cuda(format!(
        "emulator: {what} is outside every device allocation"
    ))
}

impl Emu {
    pub(crate) fn new(entries: &[Entry], kernels: &Kernels) -> Self {
        Emu {
            entries: entries.to_vec(),
            fns: (0..kernels.len()).map(|k| kernels.get(k)).collect(),
            live: Arc::default(),
            log: Mutex::new(None),
        }
    }

    /// `what+i` for the `f32` element `i` of the allocation holding `addr` (`0` for null).
    fn name(&self, addr: u64) -> String {
        if addr == 0 {
            return "null".into();
        }
        let Ok(live) = self.live.lock() else {
            return format!("{addr:#x}");
        };
        match live.range(..=addr).next_back() {
            Some((&base, (len, what))) if addr <= base + *len as u64 => {
                format!("{what}+{}", (addr - base) / 4)
            }
            _ => format!("{addr:#x}?"),
        }
    }

    fn record(&self, line: impl FnOnce() -> String) {
        if let Ok(mut l) = self.log.lock() {
            if let Some(v) = l.as_mut() {
                v.push(line());
            }
        }
    }

    /// `bytes` bytes from `addr`, checked to lie inside one allocation.
    fn span(&self, addr: u64, bytes: usize, what: &str) -> Result<*mut u8> {
        let live = self.live.lock().map_err(|_| oob(what))?;
        match live.range(..=addr).next_back() {
            Some((&base, &(len, _))) if addr + bytes as u64 <= base + len as u64 => {
                Ok(addr as *mut u8)
            }
            _ => Err(RuntimeError::Cuda(format!(
                "emulator: {what} ({bytes} bytes at {addr:#x}) is outside every device allocation"
            ))),
        }
    }

    fn f32s(&self, addr: u64, n: usize, what: &str) -> Result<*mut f32> {
        Ok(self.span(addr, 4 * n, what)? as *mut f32)
    }

    fn support(&self, name: &str, p: &[Param]) -> Result<()> {
        let ptr = |i: usize| match p.get(i) {
            Some(Param::Ptr(a)) => Ok(*a),
            _ => Err(RuntimeError::Cuda(format!(
                "emulator: {name}: parameter {i} is not a pointer"
            ))),
        };
        let int = |i: usize| match p.get(i) {
            Some(Param::I64(v)) if *v >= 0 => Ok(*v as usize),
            Some(Param::I64(v)) => Err(RuntimeError::Cuda(format!(
                "emulator: {name}: parameter {i} is negative ({v})"
            ))),
            _ => Err(RuntimeError::Cuda(format!(
                "emulator: {name}: parameter {i} is not an i64"
            ))),
        };
        let f64_ = |i: usize| match p.get(i) {
            Some(Param::F64(v)) => Ok(*v),
            _ => Err(RuntimeError::Cuda(format!(
                "emulator: {name}: parameter {i} is not an f64"
            ))),
        };
        // SAFETY (every block below): each raw access is inside a span checked by `f32s`.
        match name {
            support::EMBED => {
                let (rows, cols) = (int(3)?, int(4)?);
                let toks = self.f32s(ptr(2)?, rows, "embed tokens")? as *const i32;
                let out = self.f32s(ptr(0)?, rows * cols, "embed out")?;
                for r in 0..rows {
                    let t = unsafe { *toks.add(r) } as usize;
                    let src =
                        self.f32s(ptr(1)? + (4 * t * cols) as u64, cols, "embed table row")?;
                    unsafe { std::ptr::copy(src, out.add(r * cols), cols) };
                }
            }
            support::COPY_COLS => {
                let (rows, cols, ds, doff, ss, soff) =
                    (int(2)?, int(3)?, int(4)?, int(5)?, int(6)?, int(7)?);
                if rows == 0 || cols == 0 {
                    return Ok(());
                }
                let ext = |stride: usize, off: usize| (rows - 1) * stride + off + cols;
                let dst = self.f32s(ptr(0)?, ext(ds, doff), "copy_cols dst")?;
                let src = self.f32s(ptr(1)?, ext(ss, soff), "copy_cols src")?;
                for r in 0..rows {
                    unsafe { std::ptr::copy(src.add(r * ss + soff), dst.add(r * ds + doff), cols) };
                }
            }
            support::SINUSOIDAL => {
                let (rows, cols, pos0, base) = (int(1)?, int(2)?, int(3)?, f64_(4)?);
                let o = self.f32s(ptr(0)?, rows * cols, "sinusoidal out")?;
                for r in 0..rows {
                    let pos = (pos0 + r) as f64;
                    for c in (0..cols).step_by(2) {
                        let a = pos * (-(c as f64) * base.ln() / cols as f64).exp();
                        unsafe { *o.add(r * cols + c) = a.sin() as f32 };
                        if c + 1 < cols {
                            unsafe { *o.add(r * cols + c + 1) = a.cos() as f32 };
                        }
                    }
                }
            }
            support::TIMING_SIGNAL => {
                let (rows, cols, t0, t_step) = (int(1)?, int(2)?, int(3)?, int(4)?);
                let (lo, hi) = (f64_(5)?, f64_(6)?);
                let o = self.f32s(ptr(0)?, rows * cols, "timing_signal out")?;
                let h = cols / 2;
                let inc = (hi / lo).ln() / (h.max(2) - 1) as f64;
                for r in 0..rows {
                    let t = (t0 + r * t_step) as f64;
                    for i in 0..h {
                        let a = t * lo * (-(i as f64) * inc).exp();
                        unsafe {
                            *o.add(r * cols + i) = a.sin() as f32;
                            *o.add(r * cols + h + i) = a.cos() as f32;
                        }
                    }
                    if cols % 2 == 1 {
                        unsafe { *o.add(r * cols + cols - 1) = 0.0 };
                    }
                }
            }
            support::EPILOGUE => {
                let (rows, n, ps, po) = (int(5)?, int(6)?, int(7)?, int(8)?);
                if rows == 0 || n == 0 {
                    return Ok(());
                }
                let out = self.f32s(ptr(0)?, rows * n, "epilogue out")?;
                let pp = self.f32s(ptr(1)?, (rows - 1) * ps + po + n, "epilogue product")?;
                let opt = |i: usize, len: usize, w: &str| -> Result<Option<*mut f32>> {
                    match ptr(i)? {
                        0 => Ok(None),
                        a => self.f32s(a, len, w).map(Some),
                    }
                };
                let rs = opt(2, rows, "epilogue row_scale")?;
                let res = opt(3, rows * n, "epilogue residual")?;
                let bias = opt(4, n, "epilogue bias")?;
                for r in 0..rows {
                    for j in 0..n {
                        unsafe {
                            let mut v = *pp.add(r * ps + po + j);
                            if let Some(s) = rs {
                                v *= *s.add(r);
                            }
                            if let Some(b) = bias {
                                v += *b.add(j);
                            }
                            if let Some(a) = res {
                                v += *a.add(r * n + j);
                            }
                            *out.add(r * n + j) = v;
                        }
                    }
                }
            }
            support::GLU => {
                let (rows, n, block, act) = (int(2)?, int(3)?, int(4)?, int(5)?);
                let op = match act {
                    0 => EwOp::Silu(0),
                    1 => EwOp::GeluTanh(0),
                    2 => EwOp::Relu(0),
                    3 => EwOp::Sigmoid(0),
                    4 => EwOp::Tanh(0),
                    _ => return Err(RuntimeError::Cuda(format!("emulator: glu act code {act}"))),
                };
                let out = self.f32s(ptr(0)?, rows * n, "glu out")?;
                let pp = self.f32s(ptr(1)?, rows * 2 * n, "glu product")?;
                let ops = [EwOp::Input(0), op];
                for r in 0..rows {
                    let mut b0 = 0;
                    while b0 < n {
                        let b = block.max(1).min(n - b0);
                        for c in 0..b {
                            unsafe {
                                let g = *pp.add(r * 2 * n + 2 * b0 + c);
                                let u = *pp.add(r * 2 * n + 2 * b0 + b + c);
                                let a = crate::ew::eval(&ops, &[g as f64]) as f32;
                                *out.add(r * n + b0 + c) = a * u;
                            }
                        }
                        b0 += b;
                    }
                }
            }
            support::ROW_NORM => {
                let (rows, n, normalize) = (int(3)?, int(4)?, int(5)? != 0);
                let eps = match p.get(6) {
                    Some(Param::F32(e)) => *e,
                    _ => return Err(RuntimeError::Cuda("emulator: row_norm eps".into())),
                };
                let out = self.f32s(ptr(0)?, rows * n, "row_norm out")?;
                let gain = match ptr(1)? {
                    0 => None,
                    a => Some(self.f32s(a, n, "row_norm gain")?),
                };
                let inv = match ptr(2)? {
                    0 => None,
                    a => Some(self.f32s(a, rows, "row_norm inv_rms")?),
                };
                let rms = |o: *mut f32| {
                    let ss: f32 = (0..n).map(|j| unsafe { *o.add(j) * *o.add(j) }).sum();
                    1.0 / (ss / n as f32 + eps).sqrt()
                };
                for r in 0..rows {
                    let o = unsafe { out.add(r * n) };
                    if normalize {
                        let s = rms(o);
                        for j in 0..n {
                            unsafe {
                                *o.add(j) *= s;
                                if let Some(g) = gain {
                                    *o.add(j) *= *g.add(j);
                                }
                            }
                        }
                    }
                    if let Some(q) = inv {
                        unsafe { *q.add(r) = rms(o) };
                    }
                }
            }
            support::EXIT_LATENT => {
                let (rows, n, kind) = (int(3)?, int(4)?, int(5)?);
                let c = match kind {
                    0 => crate::artifact::Criterion::LatentDiff,
                    1 => crate::artifact::Criterion::Cosine,
                    _ => {
                        return Err(RuntimeError::Cuda(format!(
                            "emulator: exit_latent kind {kind}"
                        )))
                    }
                };
                let v = self.f32s(ptr(0)?, rows, "exit_latent value")?;
                let a = self.f32s(ptr(1)?, rows * n, "exit_latent a")?;
                let b = self.f32s(ptr(2)?, rows * n, "exit_latent b")?;
                for r in 0..rows {
                    let (ra, rb) = unsafe {
                        (
                            std::slice::from_raw_parts(a.add(r * n), n),
                            std::slice::from_raw_parts(b.add(r * n), n),
                        )
                    };
                    unsafe { *v.add(r) = crate::exit::latent_value(c, ra, rb) as f32 };
                }
            }
            support::EXIT_LOGITS => {
                use crate::artifact::Criterion::*;
                let (rows, vocab, kind, first) = (int(7)?, int(8)?, int(9)?, int(10)? != 0);
                let uniform = match p.get(11) {
                    Some(Param::F32(u)) => *u,
                    _ => return Err(RuntimeError::Cuda("emulator: exit_logits uniform".into())),
                };
                let c = match kind {
                    2 => Kl,
                    3 => MinpKl,
                    4 => EntropyDiff,
                    5 => ArgmaxStability,
                    _ => {
                        return Err(RuntimeError::Cuda(format!(
                            "emulator: exit_logits kind {kind}"
                        )))
                    }
                };
                let value = self.span(ptr(0)?, 8 * rows, "exit_logits value")? as *mut f64;
                let logits = self.f32s(ptr(1)?, rows * vocab, "exit_logits logits")?;
                let kl = matches!(c, Kl | MinpKl);
                let prev_logp = match kl {
                    true => self.f32s(ptr(2)?, rows * vocab, "exit_logits prev_logp")?,
                    false => std::ptr::null_mut(),
                };
                let prev_h = self.span(ptr(3)?, 8 * rows, "exit_logits prev_h")? as *mut f64;
                let prev_am = self.f32s(ptr(4)?, rows, "exit_logits prev_am")? as *mut u32;
                let count = self.f32s(ptr(5)?, rows, "exit_logits count")? as *mut u32;
                let active = self.f32s(ptr(6)?, rows, "exit_logits active")? as *const i32;
                let mut logp = vec![0f32; vocab];
                for r in 0..rows {
                    // SAFETY: every pointer below is inside a span checked above.
                    unsafe {
                        if *active.add(r) == 0 {
                            continue;
                        }
                        let prev: &mut [f32] = match kl {
                            true => std::slice::from_raw_parts_mut(prev_logp.add(r * vocab), vocab),
                            false => &mut [],
                        };
                        if first {
                            prev.fill(uniform);
                            *prev_h.add(r) = 100.0;
                            *prev_am.add(r) = u32::MAX;
                            *count.add(r) = 0;
                        }
                        let h = crate::exit::RowHistory {
                            prev_logp: prev,
                            prev_h: &mut *prev_h.add(r),
                            prev_am: &mut *prev_am.add(r),
                            count: &mut *count.add(r),
                        };
                        let l = std::slice::from_raw_parts(logits.add(r * vocab), vocab);
                        *value.add(r) = crate::exit::logits_step(c, l, &mut logp, h);
                    }
                }
            }
            support::ROUTE_EXPERT => {
                let (rows, k) = (int(4)?, int(5)?);
                let f32_ = |i: usize| match p.get(i) {
                    Some(Param::F32(v)) => Ok(*v),
                    _ => Err(RuntimeError::Cuda(format!(
                        "emulator: {name}: parameter {i} is not an f32"
                    ))),
                };
                let (threshold, alpha) = (f32_(6)?, f32_(7)?);
                let keep = self.f32s(ptr(0)?, rows, "route_expert keep")? as *mut i32;
                let gate = self.f32s(ptr(1)?, rows, "route_expert gate")?;
                let z = self.f32s(ptr(2)?, rows, "route_expert z")?;
                let active = self.f32s(ptr(3)?, rows, "route_expert active")? as *const i32;
                // SAFETY: inside the spans checked above.
                let (z, on) = unsafe {
                    (
                        std::slice::from_raw_parts(z, rows),
                        std::slice::from_raw_parts(active, rows),
                    )
                };
                let sig: Vec<f32> = z.iter().map(|&x| crate::exit::sigmoid_rn(x)).collect();
                let mut idx: Vec<usize> = (0..rows).filter(|&r| on[r] != 0).collect();
                let mut kept = vec![false; rows];
                if rows > 1 {
                    idx.sort_by(|&a, &b| sig[b].total_cmp(&sig[a]).then(a.cmp(&b)));
                    for &r in idx.iter().take(k) {
                        kept[r] = true;
                    }
                } else {
                    for &r in &idx {
                        kept[r] = sig[r] >= threshold;
                    }
                }
                for r in 0..rows {
                    // SAFETY: inside the spans checked above.
                    unsafe {
                        *keep.add(r) = kept[r] as i32;
                        *gate.add(r) = if kept[r] { sig[r] * alpha } else { 0.0 };
                    }
                }
            }
            support::ROUTE_TOKEN => {
                let (rows, n, cap) = (int(3)?, int(4)?, int(5)?);
                let alpha = match p.get(6) {
                    Some(Param::F32(v)) => *v,
                    _ => return Err(RuntimeError::Cuda("emulator: route_token alpha".into())),
                };
                let depth = self.f32s(ptr(0)?, rows, "route_token depth")? as *mut i32;
                let weight = self.f32s(ptr(1)?, rows, "route_token weight")?;
                let z = self.f32s(ptr(2)?, rows * n, "route_token z")?;
                for r in 0..rows {
                    // SAFETY: inside the spans checked above.
                    let row = unsafe { std::slice::from_raw_parts(z.add(r * n), n) };
                    let (d, w) = crate::exit::token_route(row, cap, alpha);
                    unsafe {
                        *depth.add(r) = d as i32;
                        *weight.add(r) = w;
                    }
                }
            }
            support::SELECT_ROWS => {
                let (rows, n) = (int(3)?, int(4)?);
                let dst = self.f32s(ptr(0)?, rows * n, "select_rows dst")?;
                let src = self.f32s(ptr(1)?, rows * n, "select_rows src")?;
                let mask = self.f32s(ptr(2)?, rows, "select_rows mask")? as *const i32;
                for r in 0..rows {
                    if unsafe { *mask.add(r) } != 0 {
                        unsafe { std::ptr::copy(src.add(r * n), dst.add(r * n), n) };
                    }
                }
            }
            support::ROPE_ROWS => {
                let (rows, n, hd, style, pos0) = (int(3)?, int(4)?, int(5)?, int(6)?, int(7)?);
                if hd == 0 || !hd.is_multiple_of(2) || !n.is_multiple_of(hd) {
                    return Err(RuntimeError::Cuda(format!(
                        "emulator: rope_rows: {n} columns are not whole heads of even size {hd}"
                    )));
                }
                let style = match style {
                    0 => RopeStyle::Interleaved,
                    1 => RopeStyle::Half,
                    s => {
                        return Err(RuntimeError::Cuda(format!(
                            "emulator: rope_rows: unknown style code {s}"
                        )))
                    }
                };
                if rows == 0 || n == 0 {
                    return Ok(());
                }
                let half = hd / 2;
                let len = (pos0 + rows) * half;
                let out = self.f32s(ptr(0)?, rows * n, "rope_rows out")?;
                let cos = self.f32s(ptr(1)?, len, "rope_rows cos")?;
                let sin = self.f32s(ptr(2)?, len, "rope_rows sin")?;
                // The CPU epilogue's own rotation, so the emulator checks the launch, not the maths.
                let rp = unsafe {
                    RopeEpi {
                        cos: std::slice::from_raw_parts(cos, len),
                        sin: std::slice::from_raw_parts(sin, len),
                        head_dim: hd,
                        style,
                        pos: RowPos::From(pos0),
                    }
                };
                for r in 0..rows {
                    let row = unsafe { std::slice::from_raw_parts_mut(out.add(r * n), n) };
                    rp.rotate(row, pos0 + r);
                }
            }
            _ => {
                return Err(RuntimeError::Cuda(format!(
                    "emulator: unknown support kernel `{name}`"
                )))
            }
        }
        Ok(())
    }
}

impl Gpu for Emu {
    fn take_log(&self, on: bool) -> Vec<String> {
        match self.log.lock() {
            Ok(mut l) => std::mem::replace(&mut *l, on.then(Vec::new)).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    fn alloc(&self, bytes: usize, what: &str) -> Result<DevMem> {
        let words = bytes.div_ceil(8).max(1);
        let mut data: Vec<u64> = Vec::new();
        data.try_reserve_exact(words)
            .map_err(|_| RuntimeError::Alloc {
                bytes: bytes as u128,
                what: what.to_string(),
            })?;
        data.resize(words, 0);
        let addr = data.as_ptr() as u64;
        self.live
            .lock()
            .map_err(|_| oob(what))?
            .insert(addr, (bytes, what.to_string()));
        Ok(DevMem {
            addr,
            _own: Box::new(HostAlloc {
                _data: data,
                addr,
                live: self.live.clone(),
            }),
        })
    }

    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.record(|| format!("upload {} B -> {}", src.len(), self.name(dst)));
        let d = self.span(dst, src.len(), "upload destination")?;
        // SAFETY: checked span; host memory never overlaps the source slice's allocation.
        unsafe { std::ptr::copy(src.as_ptr(), d, src.len()) };
        Ok(())
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.record(|| format!("download {} B <- {}", dst.len(), self.name(src)));
        let s = self.span(src, dst.len(), "download source")?;
        // SAFETY: checked span.
        unsafe { std::ptr::copy(s, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.record(|| format!("copy {bytes} B {} <- {}", self.name(dst), self.name(src)));
        let d = self.span(dst, bytes, "copy destination")?;
        let s = self.span(src, bytes, "copy source")?;
        // SAFETY: checked spans.
        unsafe { std::ptr::copy(s, d, bytes) };
        Ok(())
    }

    fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.record(|| format!("zero {bytes} B {}", self.name(dst)));
        let d = self.span(dst, bytes, "zeroed range")?;
        // SAFETY: checked span.
        unsafe { std::ptr::write_bytes(d, 0, bytes) };
        Ok(())
    }

    fn launch(&self, f: usize, items: usize, params: &[Param]) -> Result<()> {
        let e = self
            .entries
            .get(f)
            .ok_or_else(|| RuntimeError::Cuda(format!("emulator: no entry #{f}")))?;
        self.record(|| {
            let ps: Vec<String> = params
                .iter()
                .map(|p| match *p {
                    Param::Ptr(a) => self.name(a),
                    Param::I64(v) => v.to_string(),
                    Param::F32(v) => format!("{v:e}f"),
                    Param::F64(v) => format!("{v:e}"),
                })
                .collect();
            format!(
                "launch {} grid {}x{} ({})",
                e.launch.entry,
                grid(&e.launch, items),
                e.launch.block,
                ps.join(", ")
            )
        });
        match e.what {
            What::Support(name) => self.support(name, params),
            What::Kernel(k) => {
                let mut ptrs = Vec::new();
                let mut ints = Vec::new();
                for p in params {
                    match *p {
                        Param::Ptr(a) => {
                            self.span(
                                a,
                                0,
                                &format!("pointer {} of `{}`", ptrs.len(), e.launch.entry),
                            )?;
                            ptrs.push(a as *mut f32);
                        }
                        Param::I64(v) => ints.push(v),
                        _ => {
                            return Err(RuntimeError::Cuda(format!(
                                "emulator: `{}` takes pointers and i64s only",
                                e.launch.entry
                            )))
                        }
                    }
                }
                let [begin, end, pos0, kv_len] = ints[..] else {
                    return Err(RuntimeError::Cuda(format!(
                        "emulator: `{}` got {} integers, not 4",
                        e.launch.entry,
                        ints.len()
                    )));
                };
                if end - begin != items as i64 {
                    return Err(RuntimeError::Cuda(format!(
                        "emulator: `{}` launched over {items} items for begin..end = {begin}..{end}",
                        e.launch.entry
                    )));
                }
                let per = e.launch.items_per_block as i64;
                // One call per block, as the grid runs them.
                for b in 0..grid(&e.launch, items) as i64 {
                    let b0 = begin + b * per;
                    let ints = [b0, (b0 + per).min(end), pos0, kv_len];
                    // SAFETY: the executor passes the pointers the kernel's spec asks for,
                    // sized by the workspace and KV checks; each is inside an allocation.
                    unsafe { (self.fns[k])(ptrs.as_ptr(), ints.as_ptr()) };
                }
                Ok(())
            }
        }
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        self.record(|| {
            format!(
                "gemm{} m={} n={} k={} c={} (ld {}) = x={} (ld {}) · w={} (ld {})",
                if g.kn { " kn" } else { "" },
                g.m,
                g.n,
                g.k,
                self.name(g.c),
                g.ldc,
                self.name(g.x),
                g.ldx,
                self.name(g.w),
                g.ldw
            )
        });
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let x = self.f32s(g.x, (g.m - 1) * g.ldx + g.k, "gemm x")?;
        let w_ext = if g.kn {
            g.k.saturating_sub(1) * g.ldw + g.n
        } else {
            (g.n - 1) * g.ldw + g.k
        };
        let w = self.f32s(g.w, w_ext, "gemm w")?;
        let c = self.f32s(g.c, (g.m - 1) * g.ldc + g.n, "gemm c")?;
        let mut row = vec![0f32; g.n];
        for i in 0..g.m {
            for (j, o) in row.iter_mut().enumerate() {
                let mut acc = 0f32;
                for kk in 0..g.k {
                    // SAFETY: inside the spans checked above.
                    let wv = unsafe {
                        if g.kn {
                            *w.add(kk * g.ldw + j)
                        } else {
                            *w.add(j * g.ldw + kk)
                        }
                    };
                    acc += unsafe { *x.add(i * g.ldx + kk) } * wv;
                }
                *o = acc;
            }
            // SAFETY: inside the span checked above; written after the row is read, as `c`
            // may alias nothing the product reads (x, w are other buffers).
            unsafe { std::ptr::copy(row.as_ptr(), c.add(i * g.ldc), g.n) };
        }
        Ok(())
    }
}
