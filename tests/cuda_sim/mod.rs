//! A SIMT interpreter of the device subset the CUDA emitter writes (`arith`, `llvm` pointer
//! ops, `scf`, `gpu` ids/shuffles/barriers, workgroup `memref`s), so the kernels' maths can be
//! checked on a CPU against the host backends.
//!
//! A block runs in lockstep: every op is applied to all active threads before the next, with
//! per-thread masks through `scf.if`/`scf.for`/`scf.index_switch`, so `gpu.shuffle` is a read of
//! the other lane's value. Lockstep is the most forgiving schedule, so memory accesses are
//! tracked instead ([`Races`]): two threads touching a word between the same two barriers (or
//! two blocks in one launch), one of them writing, fail the run. Float ops round as
//! PTX's `.rn` instructions (the emitted PTX has no contraction), so results should match a GPU
//! bit for bit. Out-of-bounds and null accesses panic with the address.

use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum V {
    I(i64),
    F(f32),
    D(f64),
}

impl V {
    fn i(self) -> i64 {
        match self {
            V::I(x) => x,
            v => panic!("integer expected, got {v:?}"),
        }
    }
    fn f(self) -> f32 {
        match self {
            V::F(x) => x,
            v => panic!("f32 expected, got {v:?}"),
        }
    }
    fn d(self) -> f64 {
        match self {
            V::D(x) => x,
            v => panic!("f64 expected, got {v:?}"),
        }
    }
}

/// Device memory: buffers of 4-byte words; an address is `(buffer + 1) << 40 | byte offset`.
pub struct Mem {
    pub bufs: Vec<Vec<u32>>,
}

impl Mem {
    pub fn new() -> Mem {
        Mem { bufs: vec![] }
    }

    /// Add a buffer of `f32`s; returns its address.
    pub fn f32s(&mut self, data: &[f32]) -> i64 {
        self.bufs.push(data.iter().map(|x| x.to_bits()).collect());
        (self.bufs.len() as i64) << 40
    }

    pub fn i32s(&mut self, data: &[i32]) -> i64 {
        self.bufs.push(data.iter().map(|&x| x as u32).collect());
        (self.bufs.len() as i64) << 40
    }

    /// A zeroed buffer of `words` 4-byte words; returns its address.
    #[allow(dead_code)]
    pub fn alloc(&mut self, words: usize) -> i64 {
        self.bufs.push(vec![0; words]);
        (self.bufs.len() as i64) << 40
    }

    /// Frees the buffer at `addr` (later accesses to it fail; its address is not reused).
    #[allow(dead_code)]
    pub fn free(&mut self, addr: i64) {
        self.bufs[(addr >> 40) as usize - 1] = Vec::new();
    }

    /// The `n` words from `addr` on, which must lie in one buffer.
    #[allow(dead_code)]
    pub fn words(&mut self, addr: i64, n: usize) -> &mut [u32] {
        let b = (addr >> 40) as usize;
        let off = (addr & ((1 << 40) - 1)) as usize;
        assert!(
            b >= 1 && b <= self.bufs.len() && off.is_multiple_of(4),
            "access to address {addr:#x}: no buffer"
        );
        let buf = &mut self.bufs[b - 1];
        assert!(
            off / 4 + n <= buf.len(),
            "{n} words at buffer {} element {} (of {})",
            b - 1,
            off / 4,
            buf.len()
        );
        &mut buf[off / 4..off / 4 + n]
    }

    /// Add a buffer of `f64`s (two words each, little-endian); returns its address.
    pub fn f64s(&mut self, data: &[f64]) -> i64 {
        self.bufs.push(
            data.iter()
                .flat_map(|x| [x.to_bits() as u32, (x.to_bits() >> 32) as u32])
                .collect(),
        );
        (self.bufs.len() as i64) << 40
    }

    pub fn read64(&self, addr: i64) -> Vec<f64> {
        self.bufs[(addr >> 40) as usize - 1]
            .chunks(2)
            .map(|w| f64::from_bits(w[0] as u64 | (w[1] as u64) << 32))
            .collect()
    }

    pub fn read_i32(&self, addr: i64) -> Vec<i32> {
        self.bufs[(addr >> 40) as usize - 1]
            .iter()
            .map(|&b| b as i32)
            .collect()
    }

    pub fn read(&self, addr: i64) -> Vec<f32> {
        self.bufs[(addr >> 40) as usize - 1]
            .iter()
            .map(|&b| f32::from_bits(b))
            .collect()
    }

    fn slot(&mut self, addr: i64) -> &mut u32 {
        let b = (addr >> 40) as usize;
        let off = (addr & ((1 << 40) - 1)) as usize;
        assert!(
            b >= 1 && b <= self.bufs.len(),
            "access to address {addr:#x}: no buffer"
        );
        let buf = &mut self.bufs[b - 1];
        assert!(
            off.is_multiple_of(4) && off / 4 < buf.len(),
            "access to buffer {} element {} (of {})",
            b - 1,
            off as f64 / 4.0,
            buf.len()
        );
        &mut buf[off / 4]
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing

#[derive(Debug)]
enum Stmt {
    Op {
        results: Vec<String>,
        line: String,
    },
    If {
        results: Vec<String>,
        cond: String,
        then: Vec<Stmt>,
        other: Vec<Stmt>,
    },
    For {
        results: Vec<String>,
        iv: String,
        lo: String,
        hi: String,
        step: String,
        args: Vec<(String, String)>,
        body: Vec<Stmt>,
    },
    Switch {
        result: String,
        x: String,
        cases: Vec<(Option<i64>, Vec<Stmt>)>,
    },
    Yield(Vec<String>),
}

/// A parsed `gpu.func`.
pub struct Func {
    pub name: String,
    params: Vec<String>,
    body: Vec<Stmt>,
}

/// The `%…` value names in `s`, in order (`%x#0` included).
fn values(s: &str) -> Vec<String> {
    let mut out = vec![];
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let j = i
                + 1
                + s[i + 1..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '#'))
                    .unwrap_or(s.len() - i - 1);
            out.push(s[i..j].to_string());
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// `%a` → `["%a"]`, `%a:3` → `["%a#0", "%a#1", "%a#2"]`.
fn result_names(lhs: &str) -> Vec<String> {
    match lhs.split_once(':') {
        Some((n, k)) => (0..k.parse::<usize>().unwrap())
            .map(|i| format!("{n}#{i}"))
            .collect(),
        None => vec![lhs.to_string()],
    }
}

fn split_result(line: &str) -> (Vec<String>, &str) {
    if line.starts_with('%') {
        if let Some((l, r)) = line.split_once(" = ") {
            return (result_names(l.trim()), r);
        }
    }
    (vec![], line)
}

/// Parse the statements up to the closing line (`}` or `} else {` or a `case`); returns them
/// and the closing line.
fn block(lines: &mut std::iter::Peekable<std::slice::Iter<&str>>) -> (Vec<Stmt>, String) {
    let mut out = vec![];
    while let Some(&&raw) = lines.peek() {
        let line = raw.trim();
        lines.next();
        if line.starts_with('}') || line.starts_with("case ") || line.starts_with("default ") {
            return (out, line.to_string());
        }
        let (results, rhs) = split_result(line);
        if let Some(rest) = rhs.strip_prefix("scf.if ") {
            let cond = values(rest)[0].clone();
            let (then, end) = block(lines);
            let other = if end.starts_with("} else") {
                block(lines).0
            } else {
                vec![]
            };
            out.push(Stmt::If {
                results,
                cond,
                then,
                other,
            });
        } else if let Some(rest) = rhs.strip_prefix("scf.for ") {
            let (head, args) = match rest.split_once("iter_args(") {
                Some((h, a)) => {
                    let a = a.split_once(')').unwrap().0;
                    let pairs = a
                        .split(", ")
                        .map(|p| {
                            let (x, y) = p.split_once(" = ").unwrap();
                            (x.trim().to_string(), y.trim().to_string())
                        })
                        .collect();
                    (h, pairs)
                }
                None => (rest, vec![]),
            };
            let v = values(head);
            let (body, _) = block(lines);
            out.push(Stmt::For {
                results,
                iv: v[0].clone(),
                lo: v[1].clone(),
                hi: v[2].clone(),
                step: v[3].clone(),
                args,
                body,
            });
        } else if let Some(rest) = rhs.strip_prefix("scf.index_switch ") {
            let x = values(rest)[0].clone();
            let mut cases = vec![];
            // The first `case` line follows directly.
            let mut head = lines.next().unwrap().trim().to_string();
            loop {
                let key = head
                    .strip_prefix("case ")
                    .map(|c| c.trim_end_matches(" {").trim().parse::<i64>().unwrap());
                let (body, end) = block(lines);
                cases.push((key, body));
                if key.is_none() {
                    break;
                }
                // A case region closes with `}`; the next line opens another.
                let _ = end;
                head = lines.next().unwrap().trim().to_string();
            }
            out.push(Stmt::Switch {
                result: results[0].clone(),
                x,
                cases,
            });
        } else if let Some(rest) = rhs.strip_prefix("scf.yield") {
            let vals = rest.split(" : ").next().unwrap_or("");
            out.push(Stmt::Yield(values(vals)));
        } else {
            out.push(Stmt::Op {
                results,
                line: rhs.to_string(),
            });
        }
    }
    (out, String::new())
}

/// Every `gpu.func` of a module text.
pub fn parse(text: &str) -> Vec<Func> {
    let lines: Vec<&str> = text.lines().collect();
    let mut funcs = vec![];
    let mut it = lines.iter().peekable();
    while let Some(l) = it.next() {
        let l = l.trim();
        if let Some(rest) = l.strip_prefix("gpu.func @") {
            let name = rest.split('(').next().unwrap().to_string();
            let params_text = rest.split_once('(').unwrap().1.split(')').next().unwrap();
            let params = values(params_text);
            let (body, _) = block(&mut it);
            funcs.push(Func { name, params, body });
        }
    }
    funcs
}

// ---------------------------------------------------------------------------------------------
// Execution

struct Block<'m> {
    lanes: usize,
    vals: HashMap<String, Vec<V>>,
    shared: HashMap<String, Vec<V>>,
    mem: &'m mut Mem,
    races: &'m mut Races,
    /// This block's index and how many `gpu.barrier`s it has passed.
    bid: usize,
    epoch: usize,
}

/// Who touched a memory word last in a launch: `(block, thread, barrier epoch)` of the last
/// write and of the last read by another thread.
#[derive(Default, Clone, Copy)]
struct Access {
    write: Option<(usize, usize, usize)>,
    read: Option<(usize, usize, usize)>,
    /// More than one thread read it in `read`'s block and epoch (so one of them is not the
    /// next writer).
    many: bool,
}

/// Data races of one launch, as a GPU would have them: two accesses to a word, at least one a
/// write, by different threads with no barrier between them (threads of one block), or by
/// different blocks at all. Lockstep execution hides such races; this makes them fail.
#[derive(Default)]
pub struct Races {
    words: HashMap<(String, i64), Access>,
}

impl Races {
    fn conflict(a: Option<(usize, usize, usize)>, b: usize, t: usize, epoch: usize) -> bool {
        a.is_some_and(|(b2, t2, e2)| (b2, t2) != (b, t) && (b2 != b || e2 == epoch))
    }

    fn touch(&mut self, word: (String, i64), write: bool, b: usize, t: usize, epoch: usize) {
        let a = self.words.entry(word.clone()).or_default();
        let many_now = a.many && a.read.is_some_and(|(b2, _, e2)| (b2, e2) == (b, epoch));
        let race = Self::conflict(a.write, b, t, epoch)
            || (write && (Self::conflict(a.read, b, t, epoch) || many_now));
        assert!(
            !race,
            "data race on {word:?}: {} by block {b} thread {t} (epoch {epoch}) after write {:?} / read {:?}",
            if write { "write" } else { "read" },
            a.write,
            a.read
        );
        if write {
            a.write = Some((b, t, epoch));
        } else {
            a.many = a
                .read
                .is_some_and(|(b2, t2, e2)| (b2, e2) == (b, epoch) && (t2 != t || a.many));
            a.read = Some((b, t, epoch));
        }
    }
}

fn ty_after_colon(line: &str) -> &str {
    line.rsplit(" : ").next().unwrap().trim()
}

fn parse_const(lit: &str, ty: &str) -> V {
    match ty {
        "f32" => V::F(if let Some(h) = lit.strip_prefix("0x") {
            f32::from_bits(u32::from_str_radix(h, 16).unwrap())
        } else {
            lit.parse::<f64>().unwrap() as f32
        }),
        "f64" => V::D(if let Some(h) = lit.strip_prefix("0x") {
            f64::from_bits(u64::from_str_radix(h, 16).unwrap())
        } else {
            lit.parse::<f64>().unwrap()
        }),
        _ => V::I(lit.parse::<i64>().unwrap()),
    }
}

fn wrap(ty: &str, x: i64) -> i64 {
    match ty {
        "i32" => x as i32 as i64,
        "i1" => x & 1,
        _ => x,
    }
}

fn maxnan<T: PartialOrd + Copy>(a: T, b: T, nan: impl Fn(T) -> bool, max: bool) -> T {
    if nan(a) {
        a
    } else if nan(b) {
        b
    } else if (a > b) == max {
        a
    } else {
        b
    }
}

impl Block<'_> {
    fn get(&self, name: &str) -> &Vec<V> {
        self.vals
            .get(name)
            .unwrap_or_else(|| panic!("undefined value {name}"))
    }

    /// Set `name` on the active lanes (others keep their value, or 0).
    fn set(&mut self, name: &str, v: Vec<V>, active: &[bool]) {
        let lanes = self.lanes;
        let e = self
            .vals
            .entry(name.to_string())
            .or_insert_with(|| vec![V::I(0); lanes]);
        for t in 0..lanes {
            if active[t] {
                e[t] = v[t];
            }
        }
    }

    fn run(&mut self, body: &[Stmt], active: &[bool]) -> Vec<Vec<V>> {
        for s in body {
            match s {
                Stmt::Op { results, line } => self.op(results, line, active),
                Stmt::Yield(vals) => return vals.iter().map(|v| self.get(v).clone()).collect(),
                Stmt::If {
                    results,
                    cond,
                    then,
                    other,
                } => {
                    let c = self.get(cond).clone();
                    let a: Vec<bool> = (0..self.lanes)
                        .map(|t| active[t] && c[t].i() != 0)
                        .collect();
                    let b: Vec<bool> = (0..self.lanes)
                        .map(|t| active[t] && c[t].i() == 0)
                        .collect();
                    let ya = self.run(then, &a);
                    let yb = self.run(other, &b);
                    for (k, r) in results.iter().enumerate() {
                        self.set(r, ya[k].clone(), &a);
                        self.set(r, yb[k].clone(), &b);
                    }
                }
                Stmt::For {
                    results,
                    iv,
                    lo,
                    hi,
                    step,
                    args,
                    body,
                } => {
                    let (lo, hi, step) = (
                        self.get(lo).clone(),
                        self.get(hi).clone(),
                        self.get(step).clone(),
                    );
                    self.set(iv, lo, active);
                    for (a, init) in args {
                        let v = self.get(init).clone();
                        self.set(a, v, active);
                    }
                    loop {
                        let i = self.get(iv).clone();
                        let now: Vec<bool> = (0..self.lanes)
                            .map(|t| active[t] && i[t].i() < hi[t].i())
                            .collect();
                        if !now.iter().any(|&x| x) {
                            break;
                        }
                        let y = self.run(body, &now);
                        for ((a, _), v) in args.iter().zip(y) {
                            self.set(a, v, &now);
                        }
                        let next = (0..self.lanes)
                            .map(|t| V::I(i[t].i() + step[t].i()))
                            .collect();
                        self.set(iv, next, &now);
                    }
                    for (r, (a, _)) in results.iter().zip(args) {
                        let v = self.get(a).clone();
                        self.set(r, v, active);
                    }
                }
                Stmt::Switch { result, x, cases } => {
                    let xv = self.get(x).clone();
                    let mut rest: Vec<bool> = active.to_vec();
                    for (key, body) in cases {
                        let m: Vec<bool> = (0..self.lanes)
                            .map(|t| rest[t] && key.is_none_or(|k| xv[t].i() == k))
                            .collect();
                        for t in 0..self.lanes {
                            rest[t] &= !m[t];
                        }
                        let y = self.run(body, &m);
                        self.set(result, y[0].clone(), &m);
                    }
                }
            }
        }
        vec![]
    }

    fn op(&mut self, results: &[String], line: &str, active: &[bool]) {
        let name = &line[..line.find([' ', '(']).unwrap_or(line.len())];
        let args_text = line[name.len()..].to_string();
        let ops = values(&args_text.split(" : ").next().unwrap().replace("(%", " %"));
        let lanes = self.lanes;
        let arg = |s: &Self, k: usize| -> Vec<V> { s.get(&ops[k]).clone() };
        let per = |f: &dyn Fn(usize) -> V| -> Vec<V> {
            (0..lanes)
                .map(|t| if active[t] { f(t) } else { V::I(0) })
                .collect()
        };
        let out: Vec<V> = match name {
            "gpu.thread_id" => (0..lanes).map(|t| V::I(t as i64)).collect(),
            "gpu.block_id" => vec![self.vals["%__bid"][0]; lanes],
            "gpu.barrier" => {
                self.epoch += 1;
                return;
            }
            "gpu.return" => return,
            "arith.constant" => {
                let lit = line["arith.constant".len()..]
                    .split(" : ")
                    .next()
                    .unwrap()
                    .trim();
                vec![parse_const(lit, ty_after_colon(line)); lanes]
            }
            "arith.index_cast" | "llvm.inttoptr" | "arith.extsi" | "arith.extui" => arg(self, 0),
            "arith.trunci" => {
                let a = arg(self, 0);
                let to = line.rsplit(" to ").next().unwrap().trim();
                per(&|t| match to {
                    "i32" => V::I(a[t].i() as i32 as i64),
                    "i1" => V::I(a[t].i() & 1),
                    _ => a[t],
                })
            }
            "arith.sitofp" => {
                let a = arg(self, 0);
                let to = line.rsplit(" to ").next().unwrap().trim();
                per(&|t| match to {
                    "f32" => V::F(a[t].i() as f32),
                    _ => V::D(a[t].i() as f64),
                })
            }
            "arith.extf" => {
                let a = arg(self, 0);
                per(&|t| V::D(a[t].f() as f64))
            }
            "arith.truncf" => {
                let a = arg(self, 0);
                per(&|t| V::F(a[t].d() as f32))
            }
            "arith.bitcast" => {
                let a = arg(self, 0);
                let to = line.rsplit(" to ").next().unwrap().trim();
                per(&|t| match (a[t], to) {
                    (V::F(x), "i32") => V::I(x.to_bits() as i32 as i64),
                    (V::I(x), "f32") => V::F(f32::from_bits(x as u32)),
                    (V::D(x), "i64") => V::I(x.to_bits() as i64),
                    (V::I(x), "f64") => V::D(f64::from_bits(x as u64)),
                    (v, to) => panic!("bitcast {v:?} to {to}"),
                })
            }
            "arith.addi" | "arith.subi" | "arith.muli" | "arith.divui" | "arith.remui"
            | "arith.maxsi" | "arith.minsi" | "arith.andi" | "arith.ori" | "arith.shli"
            | "arith.shrsi" => {
                let (a, b) = (arg(self, 0), arg(self, 1));
                let ty = ty_after_colon(line).to_string();
                per(&|t| {
                    let (x, y) = (a[t].i(), b[t].i());
                    let r = match name {
                        "arith.addi" => x.wrapping_add(y),
                        "arith.subi" => x.wrapping_sub(y),
                        "arith.muli" => x.wrapping_mul(y),
                        "arith.divui" => (x as u64 / y as u64) as i64,
                        "arith.remui" => (x as u64 % y as u64) as i64,
                        "arith.maxsi" => x.max(y),
                        "arith.minsi" => x.min(y),
                        "arith.andi" => x & y,
                        "arith.ori" => x | y,
                        "arith.shli" if ty == "i32" => (x as i32).wrapping_shl(y as u32) as i64,
                        "arith.shli" => x.wrapping_shl(y as u32),
                        _ => x >> y,
                    };
                    V::I(wrap(&ty, r))
                })
            }
            "arith.cmpi" => {
                let pred = args_text.trim().split(',').next().unwrap();
                let (a, b) = (arg(self, 0), arg(self, 1));
                per(&|t| {
                    let (x, y) = (a[t].i(), b[t].i());
                    V::I(match pred {
                        "eq" => x == y,
                        "ne" => x != y,
                        "slt" => x < y,
                        "sle" => x <= y,
                        "sgt" => x > y,
                        "sge" => x >= y,
                        p => panic!("cmpi {p}"),
                    } as i64)
                })
            }
            "arith.cmpf" => {
                let pred = args_text.trim().split(',').next().unwrap();
                let (a, b) = (arg(self, 0), arg(self, 1));
                per(&|t| {
                    let (x, y) = match (a[t], b[t]) {
                        (V::F(x), V::F(y)) => (x as f64, y as f64),
                        (x, y) => (x.d(), y.d()),
                    };
                    V::I(match pred {
                        "olt" => x < y,
                        "oeq" => x == y,
                        "ogt" => x > y,
                        "oge" => x >= y,
                        "ole" => x <= y,
                        p => panic!("cmpf {p}"),
                    } as i64)
                })
            }
            "arith.select" => {
                let (c, a, b) = (arg(self, 0), arg(self, 1), arg(self, 2));
                per(&|t| if c[t].i() != 0 { a[t] } else { b[t] })
            }
            "arith.negf" => {
                let a = arg(self, 0);
                per(&|t| match a[t] {
                    V::F(x) => V::F(-x),
                    v => V::D(-v.d()),
                })
            }
            "arith.addf" | "arith.subf" | "arith.mulf" | "arith.divf" | "arith.maximumf"
            | "arith.minimumf" => {
                let (a, b) = (arg(self, 0), arg(self, 1));
                per(&|t| match (a[t], b[t]) {
                    (V::F(x), V::F(y)) => V::F(match name {
                        "arith.addf" => x + y,
                        "arith.subf" => x - y,
                        "arith.mulf" => x * y,
                        "arith.divf" => x / y,
                        "arith.maximumf" => maxnan(x, y, f32::is_nan, true),
                        _ => maxnan(x, y, f32::is_nan, false),
                    }),
                    (x, y) => {
                        let (x, y) = (x.d(), y.d());
                        V::D(match name {
                            "arith.addf" => x + y,
                            "arith.subf" => x - y,
                            "arith.mulf" => x * y,
                            "arith.divf" => x / y,
                            "arith.maximumf" => maxnan(x, y, f64::is_nan, true),
                            _ => maxnan(x, y, f64::is_nan, false),
                        })
                    }
                })
            }
            "llvm.intr.fma" => {
                let (a, b, c) = (arg(self, 0), arg(self, 1), arg(self, 2));
                per(&|t| match (a[t], b[t], c[t]) {
                    (V::F(x), V::F(y), V::F(z)) => V::F(x.mul_add(y, z)),
                    (x, y, z) => V::D(x.d().mul_add(y.d(), z.d())),
                })
            }
            "llvm.inline_asm" => {
                let a = arg(self, 0);
                if line.contains("sqrt.rn.f32") {
                    per(&|t| V::F(a[t].f().sqrt()))
                } else if line.contains("sqrt.rn.f64") {
                    per(&|t| V::D(a[t].d().sqrt()))
                } else {
                    panic!("inline asm {line}")
                }
            }
            "llvm.getelementptr" => {
                let (p, i) = (arg(self, 0), arg(self, 1));
                let size = if line.ends_with("f64") || line.ends_with("i64") {
                    8
                } else {
                    4
                };
                per(&|t| V::I(p[t].i() + size * i[t].i()))
            }
            "llvm.load" => {
                let p = arg(self, 0);
                let float = line.ends_with("f32");
                let wide = line.ends_with("f64");
                let mut out = vec![V::I(0); lanes];
                for t in 0..lanes {
                    if active[t] {
                        let words = if wide { 2 } else { 1 };
                        for w in 0..words {
                            self.races.touch(
                                ("global".into(), p[t].i() + 4 * w),
                                false,
                                self.bid,
                                t,
                                self.epoch,
                            );
                        }
                        let w = *self.mem.slot(p[t].i());
                        out[t] = if float {
                            V::F(f32::from_bits(w))
                        } else if wide {
                            let hi = *self.mem.slot(p[t].i() + 4);
                            V::D(f64::from_bits(w as u64 | (hi as u64) << 32))
                        } else {
                            V::I(w as i32 as i64)
                        };
                    }
                }
                out
            }
            "llvm.store" => {
                let (v, p) = (arg(self, 0), arg(self, 1));
                for t in 0..lanes {
                    if active[t] {
                        let bits: Vec<u32> = match v[t] {
                            V::F(x) => vec![x.to_bits()],
                            V::I(x) => vec![x as u32],
                            V::D(x) => vec![x.to_bits() as u32, (x.to_bits() >> 32) as u32],
                        };
                        for (w, b) in bits.into_iter().enumerate() {
                            let at = p[t].i() + 4 * w as i64;
                            self.races
                                .touch(("global".into(), at), true, self.bid, t, self.epoch);
                            *self.mem.slot(at) = b;
                        }
                    }
                }
                return;
            }
            "gpu.shuffle" => {
                assert!(line.contains("xor"), "{line}");
                let (v, off) = (arg(self, 0), arg(self, 1));
                let out0 = per(&|t| {
                    let src = (t & !31) | ((t & 31) ^ off[t].i() as usize);
                    assert!(active[src], "shuffle from inactive lane {src}");
                    v[src]
                });
                self.set(&results[0], out0, active);
                self.set(&results[1], vec![V::I(1); lanes], active);
                return;
            }
            "memref.store" => {
                let (v, m, i) = (arg(self, 0), ops[1].clone(), arg(self, 2));
                let is64 = line.contains("f64");
                // The length from the type: `memref<Nxf32, …>`.
                let ty = line.split("memref<").nth(1).unwrap();
                let len: usize = ty.split('x').next().unwrap().parse().unwrap();
                for t in 0..lanes {
                    if active[t] {
                        let word = (format!("{m} of block {}", self.bid), i[t].i());
                        self.races.touch(word, true, self.bid, t, self.epoch);
                    }
                }
                let sh = self.shared.entry(m).or_insert_with(|| {
                    vec![if is64 { V::D(f64::NAN) } else { V::F(f32::NAN) }; len]
                });
                for t in 0..lanes {
                    if active[t] {
                        sh[i[t].i() as usize] = v[t];
                    }
                }
                return;
            }
            "memref.load" => {
                let (m, i) = (ops[0].clone(), arg(self, 1));
                for t in 0..lanes {
                    if active[t] {
                        let word = (format!("{m} of block {}", self.bid), i[t].i());
                        self.races.touch(word, false, self.bid, t, self.epoch);
                    }
                }
                let sh = &self.shared[&m];
                per(&|t| sh[i[t].i() as usize])
            }
            other => panic!("the simulator does not know `{other}`: {line}"),
        };
        self.set(&results[0], out, active);
    }
}

impl Func {
    /// Launch `grid` blocks of `block` threads with `args` (addresses and scalars in parameter
    /// order).
    pub fn launch(&self, mem: &mut Mem, grid: usize, block: usize, args: &[V]) {
        assert_eq!(
            args.len(),
            self.params.len(),
            "{}: argument count",
            self.name
        );
        let mut races = Races::default();
        for b in 0..grid {
            let mut blk = Block {
                lanes: block,
                vals: HashMap::new(),
                shared: HashMap::new(),
                mem,
                races: &mut races,
                bid: b,
                epoch: 0,
            };
            for (p, a) in self.params.iter().zip(args) {
                blk.vals.insert(p.clone(), vec![*a; block]);
            }
            blk.vals
                .insert("%__bid".into(), vec![V::I(b as i64); block]);
            blk.run(&self.body, &vec![true; block]);
        }
    }
}
