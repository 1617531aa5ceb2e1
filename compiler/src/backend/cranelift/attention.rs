//! Causal attention of one (query row, head) per item over a KV cache, with online softmax.
//!
//! Keys are taken four at a time: four dot products share each load of `q`, their sums come out
//! as one vector (a 4×4 transpose), and the softmax update (`exp`, rescaling of the accumulator)
//! is paid once per four keys. The last `n % 4` keys go one by one, so nothing past the causal
//! limit is read.
//!
//! `q`, `k_cache` and `v_cache` are read-only here (`out` must not alias them), so their loads
//! are pure values that Cranelift schedules next to their uses.

use super::abi::Params;
use super::emit::{Access, Fx, LANES};
use super::math;
use cranelift_codegen::ir::{types, InstBuilder, StackSlotData, StackSlotKind, Value};

/// Head sizes are unrolled into straight-line code; this bounds its size.
pub const MAX_HEAD_DIM: usize = 512;
/// Up to this many `f32x4` chunks the accumulator lives in registers and the dot products are
/// unrolled (accumulator, query chunks, four dot products and temporaries fit x86's 16 vector
/// registers); beyond, the accumulator lives in a stack slot and the dot products loop.
const REGISTER_CHUNKS: usize = 4;
/// Keys per block of the main loop.
const KEYS: usize = 4;

/// Where the `head_dim` output accumulator lives.
enum Acc {
    /// One value per chunk, carried through the loops.
    Registers,
    /// Address of a stack slot of `chunks · 16` bytes.
    Slot(Value),
}

struct Head {
    /// Query of this item's row and head; the output is at the same place in `out`.
    q: Value,
    /// Row 0 of this head's kv head in each cache.
    k: Value,
    v: Value,
    head_dim: usize,
    /// Byte offset and width of each chunk of a head.
    chunks: Vec<(i32, usize)>,
    kv_row_bytes: i64,
    scale: f32,
    acc: Acc,
}

/// Loop-carried state: `[m, l, acc chunks (Registers only)…]`; `m` and `l` are splat.
const M: usize = 0;
const L: usize = 1;
const ACC: usize = 2;

impl Head {
    fn acc(&self, fx: &mut Fx, st: &[Value], c: usize) -> Value {
        match self.acc {
            Acc::Registers => st[ACC + c],
            Acc::Slot(base) => fx.load(base, 16 * c as i32, LANES),
        }
    }

    fn set_acc(&self, fx: &mut Fx, st: &mut [Value], c: usize, v: Value) {
        match self.acc {
            Acc::Registers => st[ACC + c] = v,
            Acc::Slot(base) => fx.store(v, base, 16 * c as i32, LANES),
        }
    }

    /// Fold `nkeys` (1 or [`KEYS`]) consecutive keys starting at cache row `j` into the state.
    fn keys(&self, fx: &mut Fx, j: Value, nkeys: usize, st: &mut [Value]) {
        let kp = fx.offset(self.k, j, self.kv_row_bytes);
        let vp = fx.offset(self.v, j, self.kv_row_bytes);
        let row = |key: usize| (key as i64 * self.kv_row_bytes) as i32;

        // Scores: with one key, two accumulators alternate to shorten the dependency chain.
        // Long heads loop over chunks so that each iteration's loads are consumed in it.
        let zero = fx.splat(0.0);
        let mut d = vec![zero; nkeys.max(2)];
        let q = self.q;
        fx.for_chunks(
            self.head_dim,
            2,
            REGISTER_CHUNKS,
            &mut d,
            |fx, dyn_off, off, w, d| {
                let qp = fx.at(q, dyn_off);
                let qc = fx.load(qp, off, w);
                let kpc = fx.at(kp, dyn_off);
                for key in 0..nkeys {
                    let kc = fx.load_with(Access::ReadOnly, kpc, off + row(key), w);
                    let slot = if nkeys == 1 {
                        (off as usize / 16) % 2
                    } else {
                        key
                    };
                    d[slot] = fx.mul_add(qc, kc, d[slot]);
                }
            },
        );
        let s = if nkeys == KEYS {
            fx.transpose_sum([d[0], d[1], d[2], d[3]])
        } else {
            let d01 = fx.add(d[0], d[1]);
            fx.hsum(d01)
        };
        let scale = fx.splat(self.scale);
        let s = fx.mul(s, scale);

        // Online softmax: rescale what was accumulated under the old maximum.
        let block_max = if nkeys == KEYS { fx.hmax(s) } else { s };
        let m = st[M];
        let m_new = fx.pmax(m, block_max);
        let dm = fx.sub(m, m_new);
        let alpha = math::exp(fx, dm);
        let ds = fx.sub(s, m_new);
        let p = math::exp(fx, ds);
        let p_sum = if nkeys == KEYS { fx.hsum(p) } else { p };
        st[L] = fx.mul_add(st[L], alpha, p_sum);
        st[M] = m_new;

        let weights: Vec<Value> = if nkeys == KEYS {
            (0..KEYS as u8)
                .map(|key| fx.broadcast_lane(p, key))
                .collect()
        } else {
            vec![p]
        };
        for (ci, &(off, w)) in self.chunks.iter().enumerate() {
            let old = self.acc(fx, st, ci);
            let mut a = fx.mul(old, alpha);
            for (key, &wk) in weights.iter().enumerate() {
                let vc = fx.load_with(Access::ReadOnly, vp, off + row(key), w);
                a = fx.mul_add(wk, vc, a);
            }
            self.set_acc(fx, st, ci, a);
        }
    }
}

pub fn build(
    fx: &mut Fx,
    params: &Params,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
) {
    let q = params.ptr(fx, 0);
    let k = params.ptr(fx, 1);
    let v = params.ptr(fx, 2);
    let out = params.ptr(fx, 3);
    let group = (heads / kv_heads) as i64;
    let head_bytes = 4 * head_dim as i64;
    let q_row_bytes = heads as i64 * head_bytes;
    let chunks: Vec<(i32, usize)> = (0..head_dim.div_ceil(LANES))
        .map(|c| (16 * c as i32, (head_dim - LANES * c).min(LANES)))
        .collect();
    let slot = (chunks.len() > REGISTER_CHUNKS).then(|| {
        fx.b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            16 * chunks.len() as u32,
            4,
        ))
    });

    fx.counted_loop(params.begin, params.end, 1, vec![], |fx, item, _| {
        let r = fx.b.ins().udiv_imm_u(item, heads as i64);
        let r_heads = fx.imul_imm(r, heads as i64);
        let h = fx.b.ins().isub(item, r_heads);
        let g = fx.b.ins().udiv_imm_u(h, group);
        let row_off = fx.imul_imm(r, q_row_bytes);
        let head_off = fx.imul_imm(h, head_bytes);
        let q_off = fx.iadd(row_off, head_off);
        let zero = fx.splat(0.0);
        let acc = match slot {
            Some(slot) => {
                let base = fx.b.ins().stack_addr(types::I64, slot, 0);
                for c in 0..chunks.len() {
                    fx.store(zero, base, 16 * c as i32, LANES);
                }
                Acc::Slot(base)
            }
            None => Acc::Registers,
        };
        let head = Head {
            q: fx.iadd(q, q_off),
            k: fx.offset(k, g, head_bytes),
            v: fx.offset(v, g, head_bytes),
            head_dim,
            chunks: chunks.clone(),
            kv_row_bytes: kv_heads as i64 * head_bytes,
            scale,
            acc,
        };

        // Row r sees cache rows 0..=pos0 + r.
        let pos = fx.iadd(params.pos0, r);
        let n = fx.b.ins().iadd_imm_s(pos, 1);
        let n_blocks = fx.b.ins().band_imm_s(n, -(KEYS as i64));

        // A finite "minus infinity", so `m - m_new` never computes inf - inf.
        let mut state = vec![fx.splat(f32::MIN), zero];
        if matches!(head.acc, Acc::Registers) {
            state.extend(std::iter::repeat_n(zero, chunks.len()));
        }
        let start = fx.iconst(0);
        let state = fx.counted_loop(start, n_blocks, KEYS as i64, state, |fx, j, st| {
            head.keys(fx, j, KEYS, st)
        });
        let state = fx.counted_loop(n_blocks, n, 1, state, |fx, j, st| head.keys(fx, j, 1, st));

        let o = fx.iadd(out, q_off);
        let l = state[L];
        for (ci, &(off, w)) in chunks.iter().enumerate() {
            let a = head.acc(fx, &state, ci);
            let y = fx.div(a, l);
            fx.store(y, o, off, w);
        }
    });
}
