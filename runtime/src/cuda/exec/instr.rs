//! One instruction on the device: products (cuBLAS, then the epilogue support kernels), copies,
//! KV writes, generated kernels with their launch parameters.

use super::{i, p, Run};
use crate::artifact::{cuda::support, Arg, CachePolicy, Epilogue, Instr};
use crate::cuda::gpu::{Gemm, Param};
use crate::error::{Result, RuntimeError};

impl Run<'_> {
    /// Key (or value) columns of a KV site.
    fn kv_width(&self, site: usize) -> usize {
        let s = &self.m.manifest.kv_sites[site];
        s.kv_heads * s.head_dim
    }

    /// The epilogue's first phase over `rows` rows of `n` columns read from `p` (row stride
    /// `p_stride`, column offset `p_off`) into `out`, then its rotary, gated and norm phases.
    #[allow(clippy::too_many_arguments)]
    fn epilogue(
        &self,
        e: &Epilogue,
        iter: Option<usize>,
        out: u32,
        prod: u64,
        rows: usize,
        n: usize,
        p_stride: usize,
        p_off: usize,
    ) -> Result<()> {
        let first = e.row_scale.is_some() || e.residual.is_some() || e.bias.is_some();
        if first || prod != self.buf(out) || p_off != 0 || p_stride != n {
            let bias = match &e.bias {
                Some(b) => self.weight(b, iter)?,
                None => 0,
            };
            self.sup(
                support::EPILOGUE,
                rows,
                &[
                    p(self.buf(out)),
                    p(prod),
                    p(e.row_scale.map_or(0, |b| self.buf(b))),
                    p(e.residual.map_or(0, |b| self.buf(b))),
                    p(bias),
                    i(rows),
                    i(n),
                    i(p_stride),
                    i(p_off),
                ],
            )?;
        }
        if let Some(rp) = e.rope {
            // Every row of the call is present (exited rows are frozen, not compacted), so row
            // `r` is at `pos0 + r` as for the `Rope` kernel.
            let t = self.ropes.get(rp.table as usize).ok_or_else(|| {
                RuntimeError::Manifest(format!("rope table #{} does not exist", rp.table))
            })?;
            let addr = |m: &Option<crate::cuda::gpu::DevMem>| {
                m.as_ref().map(|m| m.addr).ok_or_else(|| {
                    RuntimeError::Manifest(format!("rope table #{} is not on the device", rp.table))
                })
            };
            self.sup(
                support::ROPE_ROWS,
                rows,
                &[
                    p(self.buf(out)),
                    p(addr(&t.cos)?),
                    p(addr(&t.sin)?),
                    i(rows),
                    i(n),
                    i(rp.head_dim),
                    Param::I64(support::rope_style_code(rp.style)),
                    i(self.pos0),
                ],
            )?;
        }
        if let Some(g) = e.glu {
            let act = support::act_code(&g.act).ok_or_else(|| {
                RuntimeError::Unsupported(format!("the gated activation {:?}", g.act))
            })?;
            self.sup(
                support::GLU,
                rows,
                &[
                    p(self.buf(g.out)),
                    p(self.buf(out)),
                    i(rows),
                    i(n / 2),
                    i(g.block),
                    i(act as usize),
                ],
            )?;
        }
        if let Some(nm) = e.norm {
            let gain = match &nm.gain {
                Some(g) => self.weight(g, iter)?,
                None => 0,
            };
            self.sup(
                support::ROW_NORM,
                rows,
                &[
                    p(self.buf(out)),
                    p(gain),
                    p(nm.inv_rms.map_or(0, |b| self.buf(b))),
                    i(rows),
                    i(n),
                    i(nm.normalize as usize),
                    Param::F32(nm.eps),
                ],
            )?;
        }
        Ok(())
    }

    pub(super) fn instr(&mut self, ins: &Instr, iter: Option<usize>) -> Result<()> {
        let s = self.s;
        match ins {
            Instr::Embed { table, out } => self.sup(
                support::EMBED,
                s,
                &[
                    p(self.buf(*out)),
                    p(self.weight(table, iter)?),
                    p(self.ws.tokens.addr),
                    i(s),
                    i(table.cols),
                ],
            ),
            Instr::MatMul { x, w, out, epi } => {
                let rows = self.rows_of(*x);
                self.gpu.gemm(&Gemm {
                    kn: false,
                    m: rows,
                    n: w.rows,
                    k: w.cols,
                    x: self.buf(*x),
                    ldx: w.cols,
                    w: self.weight(w, iter)?,
                    ldw: w.cols,
                    c: self.buf(*out),
                    ldc: w.rows,
                })?;
                self.epilogue(epi, iter, *out, self.buf(*out), rows, w.rows, w.rows, 0)
            }
            Instr::MatMulKN { x, w, out } => {
                let rows = self.rows_of(*x);
                self.gpu.gemm(&Gemm {
                    kn: true,
                    m: rows,
                    n: w.cols,
                    k: w.rows,
                    x: self.buf(*x),
                    ldx: w.rows,
                    w: self.weight(w, iter)?,
                    ldw: w.cols,
                    c: self.buf(*out),
                    ldc: w.cols,
                })
            }
            Instr::MatMulParts { x, w, parts } => {
                let rows = self.rows_of(*x);
                let scratch = self
                    .ws
                    .scratch
                    .as_ref()
                    .ok_or_else(|| RuntimeError::Manifest("no product scratch".into()))?
                    .addr;
                self.gpu.gemm(&Gemm {
                    kn: false,
                    m: rows,
                    n: w.rows,
                    k: w.cols,
                    x: self.buf(*x),
                    ldx: w.cols,
                    w: self.weight(w, iter)?,
                    ldw: w.cols,
                    c: scratch,
                    ldc: w.rows,
                })?;
                let mut off = 0;
                for part in parts {
                    let n = self.cols(part.out);
                    self.epilogue(&part.epi, iter, part.out, scratch, rows, n, w.rows, off)?;
                    off += n;
                }
                Ok(())
            }
            Instr::Concat { inputs, out } => {
                let oc = self.cols(*out);
                let rows = self.rows_of(*out);
                let mut off = 0;
                for b in inputs {
                    let c = self.cols(*b);
                    self.copy_cols(self.buf(*out), self.buf(*b), rows, c, [oc, off, c, 0])?;
                    off += c;
                }
                Ok(())
            }
            Instr::Copy { src, dst } => self.copy_buf(*src, *dst),
            Instr::SliceCols { src, start, out } => {
                let (sc, oc) = (self.cols(*src), self.cols(*out));
                let rows = self.rows_of(*out);
                self.copy_cols(
                    self.buf(*out),
                    self.buf(*src),
                    rows,
                    oc,
                    [oc, 0, sc, *start],
                )
            }
            Instr::PosEmbed { table, out } => {
                if self.pos0 + s > table.rows {
                    return Err(RuntimeError::Config(format!(
                        "position {} is past the {} learned position embeddings of this model",
                        (self.pos0 + s - 1).max(table.rows),
                        table.rows
                    )));
                }
                let c = table.cols;
                let src = self.weight(table, iter)? + (4 * self.pos0 * c) as u64;
                self.copy_cols(self.buf(*out), src, s, c, [c, 0, c, 0])
            }
            Instr::Sinusoidal { base, out } => self.sup(
                support::SINUSOIDAL,
                s,
                &[
                    p(self.buf(*out)),
                    i(s),
                    i(self.cols(*out)),
                    i(self.pos0),
                    Param::F64(*base),
                ],
            ),
            Instr::TimingSignal {
                min_timescale,
                max_timescale,
                step,
                out,
            } => {
                let (t0, dt) = match step {
                    true => (iter.unwrap_or(0), 0),
                    false => (self.pos0, 1),
                };
                self.sup(
                    support::TIMING_SIGNAL,
                    s,
                    &[
                        p(self.buf(*out)),
                        i(s),
                        i(self.cols(*out)),
                        i(t0),
                        i(dt),
                        Param::F64(*min_timescale),
                        Param::F64(*max_timescale),
                    ],
                )
            }
            Instr::KvWrite { site, k, v } => {
                let site = *site as usize;
                let in_loop = self.kv.in_loop(site);
                let cache = self.m.manifest.program.recur.as_ref().map(|r| &r.cache);
                if in_loop && iter.is_some_and(|t| t > 0) && cache == Some(&CachePolicy::ShareFirst)
                {
                    return Ok(());
                }
                let slot = self.kv.slot_of(site, iter);
                if in_loop && cache == Some(&CachePolicy::RecursionWise) {
                    // Only the rows that run this iteration, compacted in position order.
                    let w = self.kv_width(site);
                    let (kb, vb) = (self.buf(*k), self.buf(*v));
                    for (r0, r1, _) in self.active_runs() {
                        let at = (4 * r0 * w) as u64;
                        self.kv
                            .append(self.gpu, site, slot, r1 - r0, kb + at, vb + at)?;
                    }
                    return Ok(());
                }
                let prev = match iter {
                    Some(t) if in_loop && t > 0 => Some(self.kv.slot_of(site, Some(t - 1))),
                    _ => None,
                };
                let masks = if in_loop { self.masks } else { None };
                let (gpu, kb, vb) = (self.gpu, self.buf(*k), self.buf(*v));
                let f = self.d.sup.get(support::SELECT_ROWS).copied();
                let sel = |d: u64, sr: u64, mk: u64, rows: usize, n: usize| match f {
                    Some(f) => gpu.launch(f, rows, &[p(d), p(sr), p(mk), i(rows), i(n)]),
                    None => Err(RuntimeError::Artifact(
                        "the CUDA image lacks the support kernel `select_rows`".into(),
                    )),
                };
                self.kv
                    .write(gpu, site, slot, prev, self.pos0, s, kb, vb, masks, &sel)
            }
            Instr::Kernel { kernel, args } => {
                let k = *kernel as usize;
                let items = self.m.manifest.kernel_items(*kernel, s);
                let kv_len = self.pos0 + s;
                let mut params = Vec::with_capacity(args.len() + 4);
                for a in args {
                    let addr = match a {
                        Arg::Buf(b) => self.buf(*b),
                        Arg::Weight(w) => self.weight(w, iter)?,
                        Arg::RopeCos(r) => {
                            self.ropes[*r as usize].cos.as_ref().map_or(0, |m| m.addr)
                        }
                        Arg::RopeSin(r) => {
                            self.ropes[*r as usize].sin.as_ref().map_or(0, |m| m.addr)
                        }
                        Arg::KCache(st) | Arg::VCache(st) => {
                            let st = *st as usize;
                            let slot = self.kv.slot_of(st, iter);
                            self.kv.ensure(self.gpu, st, slot, kv_len)?;
                            let (ka, va) = self.kv.addrs(st, slot);
                            if matches!(a, Arg::KCache(_)) {
                                ka
                            } else {
                                va
                            }
                        }
                    };
                    params.push(p(addr));
                }
                let rw_site = args.iter().find_map(|a| match a {
                    Arg::KCache(st) if self.kv.in_loop(*st as usize) => Some(*st as usize),
                    _ => None,
                });
                let recursion_wise = self.m.manifest.program.recur.as_ref().map(|r| &r.cache)
                    == Some(&CachePolicy::RecursionWise);
                if let (Some(st), true) = (rw_site, recursion_wise) {
                    // A recursion-wise slot holds exactly the rows that reached this iteration,
                    // in position order: the j-th running row attends to its first
                    // `base + j + 1` entries. One launch per run of consecutive running rows.
                    let runs = self.active_runs();
                    let running: usize = runs.iter().map(|&(a, b, _)| b - a).sum();
                    let base = self.kv.len(st, self.kv.slot_of(st, iter)) as i64 - running as i64;
                    let per = items / s.max(1);
                    let at = params.len();
                    for (r0, r1, before) in runs {
                        params.truncate(at);
                        let p0 = base + before as i64 - r0 as i64;
                        params.extend([i(r0 * per), i(r1 * per), Param::I64(p0), i(kv_len)]);
                        self.gpu
                            .launch(self.d.kernels[k], (r1 - r0) * per, &params)?;
                    }
                    return Ok(());
                }
                params.extend([i(0), i(items), i(self.pos0), i(kv_len)]);
                self.gpu.launch(self.d.kernels[k], items, &params)
            }
        }
    }
}
