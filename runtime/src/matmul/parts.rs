//! One product `x · wᵀ` whose output columns are scattered into several destination buffers
//! (`artifact::Instr::MatMulParts`): Q, K and V of an attention block as one matmul over the
//! stacked weight, each written straight into its own contiguous buffer. Every path of
//! [`super::matmul_epi`] is kept (GEMV split over the pool for decode, the few-row GEMV, the
//! column-split and the gemm-threaded GEMM); a block of output columns that straddles a part
//! boundary is cut there, and each piece gets its own part's epilogue right after it is
//! computed.

use super::{
    gemm_block, gemv_rows_multi, Epi, HostGemm, PAR_MIN_MACS, SERIAL_BLOCK_BYTES, SMALL_M,
};

/// Most parts of one call: the runtime keeps them on the stack (no allocation per step).
pub const MAX_PARTS: usize = crate::artifact::MAX_MATMUL_PARTS;

/// One destination: the next `n` columns of the product, stored with row stride `n`.
#[derive(Default)]
pub struct Part<'a> {
    /// `[m, n]`.
    pub out: &'a mut [f32],
    pub n: usize,
    /// Rows `0..m` of this part (residual `[m, n]`, bias `[n]`).
    pub epi: Epi<'a>,
}

/// A part as the parallel tasks see it: its first global column and its output pointer.
#[derive(Clone, Copy, Default)]
struct Dst<'a> {
    ptr: usize,
    n: usize,
    off: usize,
    epi: Epi<'a>,
}

struct Layout<'a> {
    d: [Dst<'a>; MAX_PARTS],
    len: usize,
}

impl Layout<'_> {
    /// Calls `f(part, a, b)` for each piece `[a, b)` of global columns `[j0, j1)` that lies in
    /// one part, in column order.
    #[inline]
    fn pieces(&self, j0: usize, j1: usize, mut f: impl FnMut(&Dst, usize, usize)) {
        for d in &self.d[..self.len] {
            let (a, b) = (j0.max(d.off), j1.min(d.off + d.n));
            if a < b {
                f(d, a, b);
            }
        }
    }

    /// Global column `j` moved up to the next start of a whole block of its part's epilogue
    /// (a rotary head), or to the part's end: chunks cut at snapped columns give every part
    /// pieces that start and end on its blocks. Monotone in `j`.
    #[inline]
    fn snap(&self, j: usize) -> usize {
        for d in &self.d[..self.len] {
            if j < d.off + d.n {
                let local = (j.max(d.off) - d.off).next_multiple_of(d.epi.align());
                return d.off + local.min(d.n);
            }
        }
        j
    }

    /// Calls `f(part, a, b)` for every piece of chunk `[j0, j1)` of the (unsnapped) uniform
    /// split, after snapping both ends.
    #[inline]
    fn snapped_pieces(&self, j0: usize, j1: usize, f: impl FnMut(&Dst, usize, usize)) {
        let (a, b) = (self.snap(j0), self.snap(j1));
        if a < b {
            self.pieces(a, b, f);
        }
    }
}

/// `x · wᵀ` with `x: [m, k]`, `w: [Σ nᵢ, k]`, columns `offᵢ .. offᵢ + nᵢ` into `parts[i]`
/// (then its epilogue). `threads` is the size of the current rayon pool.
pub fn matmul_parts(x: &[f32], w: &[f32], parts: &mut [Part], m: usize, k: usize, threads: usize) {
    matmul_parts_on(None, x, w, parts, m, k, threads)
}

/// [`matmul_parts`] with the artifact's GEMM (when it has one) for the many-row products.
pub fn matmul_parts_on(
    host: Option<HostGemm>,
    x: &[f32],
    w: &[f32],
    parts: &mut [Part],
    m: usize,
    k: usize,
    threads: usize,
) {
    assert!(
        !parts.is_empty() && parts.len() <= MAX_PARTS,
        "matmul_parts: 1 to {MAX_PARTS} parts"
    );
    let mut lay = Layout {
        d: [Dst::default(); MAX_PARTS],
        len: parts.len(),
    };
    let mut n = 0;
    for (i, p) in parts.iter_mut().enumerate() {
        assert!(p.out.len() >= m * p.n, "matmul_parts output sizes");
        p.epi.check(m, p.n);
        lay.d[i] = Dst {
            ptr: p.out.as_mut_ptr() as usize,
            n: p.n,
            off: n,
            epi: p.epi,
        };
        n += p.n;
    }
    assert!(
        x.len() >= m * k && w.len() >= n * k,
        "matmul_parts operand sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    let out = |d: &Dst, r: usize, c: usize, len: usize| {
        // SAFETY: callers pass a row < m and columns c..c+len < d.n of their own piece; the
        // part's buffer holds m·n elements (checked above) and pieces are disjoint.
        unsafe { std::slice::from_raw_parts_mut((d.ptr as *mut f32).add(r * d.n + c), len) }
    };
    if k == 0 {
        lay.pieces(0, n, |d, a, b| {
            for r in 0..m {
                out(d, r, a - d.off, b - a).fill(0.0);
            }
            // SAFETY: as above; one caller.
            unsafe { d.epi.apply(d.ptr as *mut f32, d.n, 0, m, a - d.off, b - a) };
        });
        return;
    }
    // Rows `0..rows` of x times weight rows [a, b) into the piece, then its epilogue.
    let gemv_piece = |d: &Dst, a: usize, b: usize, rows: usize| {
        // SAFETY: the part's buffer holds rows·n elements (checked above); pieces are disjoint.
        unsafe {
            gemv_rows_multi(
                x,
                rows,
                k,
                &w[a * k..b * k],
                (d.ptr as *mut f32).add(a - d.off),
                d.n,
            )
        };
        // SAFETY: this caller's columns of the part, every row.
        unsafe {
            d.epi
                .apply(d.ptr as *mut f32, d.n, 0, rows, a - d.off, b - a)
        };
    };
    let macs = m.saturating_mul(n).saturating_mul(k);
    if m <= SMALL_M {
        if threads <= 1 || n < 8 || macs < PAR_MIN_MACS {
            // L2-sized blocks of weight rows, each applied to every x row while hot (as in
            // `gemv_multi_epi`); for m = 1 this is the plain serial GEMV.
            let rows = (SERIAL_BLOCK_BYTES / (4 * k)).max(4).min(n);
            let mut j0 = 0;
            while j0 < n {
                let j1 = (j0 + rows).min(n);
                lay.snapped_pieces(j0, j1, |d, a, b| gemv_piece(d, a, b, m));
                j0 = j1;
            }
            return;
        }
        // One split over all rows of the stacked weight, in as many chunks as the separate
        // products would have made together: on a loaded machine a descheduled thread leaves
        // less behind (measured: a third as many chunks was up to 1.3x slower at d = 1024).
        let rows = n.div_ceil(threads * 4 * lay.len).next_multiple_of(4).max(4);
        let lay = &lay;
        crate::par::for_each(n.div_ceil(rows), |c| {
            let j0 = c * rows;
            lay.snapped_pieces(j0, (j0 + rows).min(n), |d, a, b| gemv_piece(d, a, b, m));
        });
        return;
    }
    // The column block [a, b) of the product, as one single-threaded gemm into the part.
    let gemm_piece = |d: &Dst, a: usize, b: usize, par: gemm::Parallelism| {
        let c = a - d.off;
        // SAFETY: sizes checked above; dst is the part's columns c..c+(b-a) with row stride
        // d.n, lhs [m, k] row-major, rhs element (kk, j) of weight row a + j at w[(a+j)·k + kk].
        unsafe {
            gemm_block(
                m,
                b - a,
                k,
                (d.ptr as *mut f32).add(c),
                d.n as isize,
                x.as_ptr(),
                k as isize,
                w.as_ptr().add(a * k),
                1,
                k as isize,
                par,
                host,
            );
        }
    };
    if threads > 1 && macs >= 64 * PAR_MIN_MACS && m <= 512 && n >= 64 * threads {
        // As `matmul_epi`: one column block per thread, over the stacked weight's rows.
        let cols = n.div_ceil(threads).next_multiple_of(16);
        let lay = &lay;
        crate::par::for_each(threads, |p| {
            let j0 = p * cols;
            if j0 >= n {
                return;
            }
            lay.snapped_pieces(j0, (j0 + cols).min(n), |d, a, b| {
                gemm_piece(d, a, b, gemm::Parallelism::None);
                // SAFETY: this task's columns of the part, every row.
                unsafe { d.epi.apply(d.ptr as *mut f32, d.n, 0, m, a - d.off, b - a) };
            });
        });
        return;
    }
    // Large products keep gemm's own threading: one call per part, each packing x again (the
    // product is compute-bound here; the point of the merge is the few-row paths).
    let par = if threads > 1 && macs >= 64 * PAR_MIN_MACS {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    lay.pieces(0, n, |d, a, b| {
        gemm_piece(d, a, b, par);
        if d.epi.is_none() {
            return;
        }
        let rows = if matches!(par, gemm::Parallelism::None) {
            m
        } else {
            m.div_ceil(threads * 4).max(1)
        };
        crate::par::for_each(m.div_ceil(rows), |c| {
            let r0 = c * rows;
            // SAFETY: disjoint row blocks of the part.
            unsafe {
                d.epi
                    .apply(d.ptr as *mut f32, d.n, r0, (r0 + rows).min(m), 0, d.n)
            };
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{lcg, naive};

    /// Runs `matmul_parts` on random data and compares every part with the naive product of
    /// the stacked weight, cut at the part boundaries, and the epilogue formula per part.
    /// `epi`: 0 none, 1 row scale, 2 row scale + residual + bias.
    fn check(m: usize, k: usize, widths: &[usize], threads: usize, epi: u32, seed: u64) {
        let mut s = seed;
        let n: usize = widths.iter().sum();
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let sc: Vec<f32> = (0..m).map(|_| 1.0 + lcg(&mut s)).collect();
        let res: Vec<Vec<f32>> = widths
            .iter()
            .map(|&p| (0..m * p).map(|_| lcg(&mut s)).collect())
            .collect();
        let bias: Vec<Vec<f32>> = widths
            .iter()
            .map(|&p| (0..p).map(|_| lcg(&mut s)).collect())
            .collect();
        let mut outs: Vec<Vec<f32>> = widths.iter().map(|&p| vec![f32::NAN; m * p]).collect();
        let mut parts: Vec<Part> = outs
            .iter_mut()
            .enumerate()
            .map(|(i, o)| Part {
                out: &mut o[..],
                n: widths[i],
                epi: Epi {
                    row_scale: (epi >= 1).then_some(&sc[..]),
                    residual: (epi >= 2).then_some(&res[i][..]),
                    bias: (epi >= 2).then_some(&bias[i][..]),
                    ..Epi::default()
                },
            })
            .collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| matmul_parts(&x, &w, &mut parts, m, k, threads));
        drop(parts);
        let full = naive(&x, &w, m, k, n);
        let tol = 1e-5 * (k as f32).sqrt().max(1.0);
        let mut off = 0;
        for (i, &p) in widths.iter().enumerate() {
            for r in 0..m {
                for j in 0..p {
                    let mut want = full[r * n + off + j];
                    if epi >= 1 {
                        want *= sc[r];
                    }
                    if epi >= 2 {
                        want += bias[i][j] + res[i][r * p + j];
                    }
                    let got = outs[i][r * p + j];
                    assert!(
                        (got - want).abs() <= tol * (1.0 + want.abs()),
                        "m={m} k={k} parts={widths:?} threads={threads} epi={epi}: \
                         part {i} [{r}, {j}] = {got}, want {want}"
                    );
                }
            }
            off += p;
        }
    }

    fn every_epilogue(m: usize, k: usize, widths: &[usize], threads: usize) {
        for epi in 0..3 {
            check(m, k, widths, threads, epi, 7 + m as u64 * 31 + epi as u64);
        }
    }

    /// Decode: one row, the GEMV split over 4 threads in chunks of 8 weight rows (196 rows in 3
    /// parts), so the chunk 96..104 straddles the boundary at 100; GQA-like narrower K and V.
    #[test]
    fn one_row_threaded_straddles_part_boundaries() {
        every_epilogue(1, 512, &[100, 36, 60], 4);
    }

    /// One row on one thread (the serial GEMV over every part), and a single part.
    #[test]
    fn one_row_serial_and_single_part() {
        every_epilogue(1, 96, &[40, 24, 24], 1);
        every_epilogue(1, 512, &[196], 4);
    }

    /// A few rows (m ≤ 8): the threaded multi-row GEMV, and the serial one whose L2 blocks of
    /// 64 weight rows (k = 4096) straddle the boundary at 100.
    #[test]
    fn few_rows_threaded_and_serial_blocks() {
        every_epilogue(5, 512, &[100, 36, 60], 4);
        every_epilogue(8, 4096, &[100, 60, 36], 1);
    }

    /// m = 64, n = 300 on 4 threads: the column split (blocks of 80 columns), whose blocks cut
    /// the boundaries at 128 and 228.
    #[test]
    fn column_split_straddles_part_boundaries() {
        every_epilogue(64, 256, &[128, 100, 72], 4);
    }

    /// m > 512: gemm's own threading, one call per part; and the same size on one thread.
    #[test]
    fn large_m_gemm_threaded_and_serial() {
        every_epilogue(600, 64, &[100, 36, 60], 4);
        every_epilogue(520, 32, &[20, 12, 12], 1);
    }

    /// Parts with a rotary epilogue (row scale and bias before it), on scattered positions,
    /// against the naive product rotated in f64. `ropes[i]`: part i's head size (0: none).
    fn check_rope(m: usize, k: usize, widths: &[usize], ropes: &[usize], threads: usize) {
        use crate::artifact::{RopeStyle, RopeTable};
        use crate::matmul::{RopeEpi, RowPos};
        use crate::test_util::{rope_rows, test_positions};
        let mut s = 5 + m as u64;
        let n: usize = widths.iter().sum();
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut s)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
        let sc: Vec<f32> = (0..m).map(|_| 1.0 + lcg(&mut s)).collect();
        let bias: Vec<Vec<f32>> = widths
            .iter()
            .map(|&p| (0..p).map(|_| lcg(&mut s)).collect())
            .collect();
        let tables: Vec<crate::rope::Rope> = ropes
            .iter()
            .map(|&hd| {
                let mut t = crate::rope::Rope::new(&RopeTable {
                    head_dim: hd.max(2),
                    base: 500.0,
                });
                t.ensure(m + 128).unwrap();
                t
            })
            .collect();
        let full = naive(&x, &w, m, k, n);
        for (style, pos0) in [(RopeStyle::Half, None), (RopeStyle::Interleaved, Some(3))] {
            let pos = test_positions(m, pos0);
            let mut outs: Vec<Vec<f32>> = widths.iter().map(|&p| vec![f32::NAN; m * p]).collect();
            let mut parts: Vec<Part> = outs
                .iter_mut()
                .enumerate()
                .map(|(i, o)| Part {
                    out: &mut o[..],
                    n: widths[i],
                    epi: Epi {
                        row_scale: Some(&sc[..]),
                        bias: Some(&bias[i][..]),
                        rope: (ropes[i] > 0).then(|| RopeEpi {
                            cos: tables[i].cos(),
                            sin: tables[i].sin(),
                            head_dim: ropes[i],
                            style,
                            pos: match pos0 {
                                Some(p0) => RowPos::From(p0),
                                None => RowPos::Rows(&pos),
                            },
                        }),
                        ..Epi::default()
                    },
                })
                .collect();
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| matmul_parts(&x, &w, &mut parts, m, k, threads));
            drop(parts);
            let tol = 1e-5 * (k as f32).sqrt().max(4.0);
            let mut off = 0;
            for (i, &p) in widths.iter().enumerate() {
                let mut want: Vec<f64> = (0..m * p)
                    .map(|e| {
                        let (r, j) = (e / p, e % p);
                        full[r * n + off + j] as f64 * sc[r] as f64 + bias[i][j] as f64
                    })
                    .collect();
                if ropes[i] > 0 {
                    let t = &tables[i];
                    rope_rows(&mut want, p, ropes[i], style, &pos, t.cos(), t.sin());
                }
                for (e, (&got, &want)) in outs[i].iter().zip(&want).enumerate() {
                    let want = want as f32;
                    assert!(
                        (got - want).abs() <= tol * (1.0 + want.abs()),
                        "m={m} k={k} parts={widths:?} ropes={ropes:?} threads={threads} \
                         {style:?}: part {i} [{}, {}] = {got}, want {want}",
                        e / p,
                        e % p
                    );
                }
                off += p;
            }
        }
    }

    /// Every path with rotary parts: an unrotated part first, so the rotated ones start at
    /// columns that are not multiples of their head size (the split must snap to their heads),
    /// and head sizes that do not divide the blocks of 4/16 columns.
    #[test]
    fn rope_parts_on_every_path() {
        let (w, r) = (&[20usize, 48, 24][..], &[0usize, 8, 6][..]);
        check_rope(1, 512, w, r, 4); // threaded GEMV, chunks of 8 rows
        check_rope(1, 96, w, r, 1); // serial GEMV
        check_rope(5, 512, w, r, 4); // threaded few-row GEMV
        check_rope(8, 4096, &[36, 96, 60], &[0, 6, 12], 1); // serial L2 blocks of 64 rows
        check_rope(64, 256, &[100, 128, 72], &[0, 64, 6], 4); // column split
        check_rope(600, 64, &[100, 36, 60], &[0, 6, 6], 4); // gemm's own threading
        check_rope(3, 0, &[4, 8, 4], &[0, 4, 2], 4); // k = 0
        check_rope(1, 512, &[96], &[32], 4); // one rotated part
    }

    /// Degenerate shapes: no inner dimension (the product is zero, the epilogue still applies),
    /// a few rows below the parallel threshold.
    #[test]
    fn degenerate_shapes() {
        every_epilogue(3, 0, &[4, 2, 2], 4);
        every_epilogue(2, 7, &[3, 1, 5], 4);
        every_epilogue(12, 9, &[5, 3], 4);
    }
}

/// `cargo test -p loopc-runtime --lib qkv_product_vs_three_matmuls -- --ignored --nocapture`
/// (with optimizations): the d = 1024 QKV of a decode step (m = 1) and of a 4-row batch as one
/// scattered product vs three `matmul_epi` calls, alternating, median of the rounds.
#[cfg(test)]
mod bench {
    use super::*;

    /// `cargo test -p loopc-runtime --lib qkv_rope_epilogue_vs_separate_pass -- --ignored
    /// --nocapture` (with optimizations): the d = 1024 QKV product (Huginn: 16 heads of 64,
    /// interleaved, q/k bias) with the bias and rotation in its store, against the product
    /// followed by a separate in-place pass over q and k (a Rust loop standing in for the
    /// `RopeBias` kernel, same maths), at m = 1 (decode) and m = 128 (prefill), alternating,
    /// minimum over rounds.
    #[test]
    #[ignore]
    fn qkv_rope_epilogue_vs_separate_pass() {
        use crate::artifact::{RopeStyle, RopeTable};
        use crate::matmul::{RopeEpi, RowPos};
        let (k, n, hd) = (1024usize, 1024usize, 64usize);
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut table = crate::rope::Rope::new(&RopeTable {
            head_dim: hd,
            base: 50000.0,
        });
        table.ensure(4096).unwrap();
        let w: Vec<f32> = (0..3 * n * k).map(|i| (i % 13) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.1).collect();
        for m in [1usize, 128] {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let s: Vec<f32> = vec![0.5; m];
            let rope = RopeEpi {
                cos: table.cos(),
                sin: table.sin(),
                head_dim: hd,
                style: RopeStyle::Interleaved,
                pos: RowPos::From(1000),
            };
            let scaled = Epi {
                row_scale: Some(&s),
                ..Epi::default()
            };
            let fused_epi = Epi {
                bias: Some(&b),
                rope: Some(rope),
                ..scaled
            };
            let mut o = vec![vec![0f32; m * n]; 3];
            let mut fused = || {
                let epis = [fused_epi, fused_epi, scaled];
                let mut parts: Vec<Part> = o
                    .iter_mut()
                    .zip(epis)
                    .map(|(o, epi)| Part { out: o, n, epi })
                    .collect();
                matmul_parts(&x, &w, &mut parts, m, k, threads);
            };
            let mut o2 = vec![vec![0f32; m * n]; 3];
            let mut separate = || {
                let mut parts: Vec<Part> = o2
                    .iter_mut()
                    .map(|o| Part {
                        out: o,
                        n,
                        epi: scaled,
                    })
                    .collect();
                matmul_parts(&x, &w, &mut parts, m, k, threads);
                drop(parts);
                let pass = Epi {
                    bias: Some(&b),
                    rope: Some(rope),
                    ..Epi::default()
                };
                for q in o2.iter_mut().take(2) {
                    let rows = m.div_ceil(threads).max(1);
                    let qp = q.as_mut_ptr() as usize;
                    crate::par::for_each(m.div_ceil(rows), |c| {
                        let r0 = c * rows;
                        // SAFETY: disjoint row blocks of an [m, n] buffer.
                        unsafe { pass.apply(qp as *mut f32, n, r0, (r0 + rows).min(m), 0, n) };
                    });
                }
            };
            let reps = if m == 1 { 200 } else { 10 };
            let time = |f: &mut dyn FnMut()| {
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    f();
                }
                t.elapsed().as_secs_f64() / reps as f64
            };
            let (mut a, mut bt) = (f64::INFINITY, f64::INFINITY);
            pool.install(|| {
                for round in 0..10 {
                    if round % 2 == 0 {
                        a = a.min(time(&mut separate));
                        bt = bt.min(time(&mut fused));
                    } else {
                        bt = bt.min(time(&mut fused));
                        a = a.min(time(&mut separate));
                    }
                }
            });
            assert_eq!(
                o, o2,
                "the fused and separate forms compute the same values"
            );
            println!(
                "m={m} threads={threads}: product + RopeBias pass {:.3} ms, rope epilogue {:.3} ms, ratio {:.3}",
                a * 1e3,
                bt * 1e3,
                bt / a
            );
        }
    }

    #[test]
    #[ignore]
    fn qkv_product_vs_three_matmuls() {
        let (k, n) = (1024usize, 1024usize);
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let w: Vec<f32> = (0..3 * n * k).map(|i| (i % 13) as f32 * 0.01).collect();
        for m in [1usize, 4, 32] {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let s: Vec<f32> = vec![0.5; m];
            let epi = Epi {
                row_scale: Some(&s),
                ..Epi::default()
            };
            let mut o = vec![vec![0f32; m * n]; 3];
            let mut three = || {
                for (p, o) in o.iter_mut().enumerate() {
                    super::super::matmul_epi(&x, &w[p * n * k..], o, m, k, n, threads, &epi);
                }
            };
            let mut o2 = vec![vec![0f32; m * n]; 3];
            let mut one = || {
                let mut parts: Vec<Part> = o2.iter_mut().map(|o| Part { out: o, n, epi }).collect();
                matmul_parts(&x, &w, &mut parts, m, k, threads);
            };
            let time = |f: &mut dyn FnMut()| {
                let t = std::time::Instant::now();
                for _ in 0..20 {
                    f();
                }
                t.elapsed().as_secs_f64() / 20.0
            };
            let (mut a, mut b) = (vec![], vec![]);
            pool.install(|| {
                // Alternating which goes first, so neither always finds the other's cache.
                for round in 0..16 {
                    if round % 2 == 0 {
                        a.push(time(&mut three));
                        b.push(time(&mut one));
                    } else {
                        b.push(time(&mut one));
                        a.push(time(&mut three));
                    }
                }
            });
            a.sort_by(f64::total_cmp);
            b.sort_by(f64::total_cmp);
            let (a, b) = (a[a.len() / 2], b[b.len() / 2]);
            println!(
                "m={m} threads={threads}: three matmuls {:.3} ms, one product {:.3} ms, ratio {:.3}",
                a * 1e3,
                b * 1e3,
                b / a
            );
        }
    }
}
