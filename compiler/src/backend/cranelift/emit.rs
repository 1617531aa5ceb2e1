//! A thin layer over `FunctionBuilder`: `f32x4` arithmetic, partial-chunk memory access and
//! counted loops with loop-carried values.

use super::target::Features;
use cranelift_codegen::ir::{
    condcodes::{FloatCC, IntCC},
    types, BlockArg, ConstantData, Endianness, InstBuilder, MemFlagsData, Type, Value,
};
use cranelift_codegen::isa::{CallConv, TargetFrontendConfig};
use cranelift_frontend::FunctionBuilder;
use target_lexicon::PointerWidth;

pub const F32X4: Type = types::F32X4;
pub const LANES: usize = 4;
/// Rows of up to this many chunks are unrolled completely when each chunk ends in stores.
pub const UNROLL_ALL: usize = 16;

/// Data buffers are plain memory with no alignment guarantee; `notrap` only says the runtime
/// hands in valid pointers.
fn data_flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// How a load may be scheduled.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// In program order with the stores: the buffer may be written by this kernel (in place).
    Ordered,
    /// A buffer this kernel never writes: the load is a pure value, computed where first needed
    /// (and shared or hoisted out of loops like any other).
    ReadOnly,
}

impl Access {
    fn flags(self) -> MemFlagsData {
        match self {
            Access::Ordered => data_flags(),
            Access::ReadOnly => data_flags().with_readonly().with_can_move(),
        }
    }
}

pub struct Fx<'a> {
    pub b: FunctionBuilder<'a>,
    pub features: Features,
}

impl<'a> Fx<'a> {
    pub fn new(b: FunctionBuilder<'a>, features: Features) -> Self {
        Fx { b, features }
    }

    /// Return from the current block and finish the function.
    pub fn finish(mut self) {
        self.b.ins().return_(&[]);
        self.b.seal_all_blocks();
        self.b.finalize(TargetFrontendConfig {
            default_call_conv: CallConv::SystemV,
            pointer_width: PointerWidth::U64,
            page_size_align_log2: 12,
        });
    }

    // ---- integers ----

    pub fn iconst(&mut self, v: i64) -> Value {
        self.b.ins().iconst(types::I64, v)
    }

    pub fn iadd(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().iadd(a, b)
    }

    pub fn imul_imm(&mut self, a: Value, k: i64) -> Value {
        self.b.ins().imul_imm_s(a, k)
    }

    /// `base + dyn_off`, for the chunk offsets of [`Fx::for_chunks`].
    pub fn at(&mut self, base: Value, dyn_off: Option<Value>) -> Value {
        match dyn_off {
            Some(off) => self.iadd(base, off),
            None => base,
        }
    }

    /// `base + index * scale`, the address of element `index` of an array of `scale`-byte rows.
    pub fn offset(&mut self, base: Value, index: Value, scale: i64) -> Value {
        let off = self.imul_imm(index, scale);
        self.iadd(base, off)
    }

    // ---- f32x4 arithmetic ----

    pub fn splat(&mut self, x: f32) -> Value {
        let s = self.b.ins().f32const(x);
        self.b.ins().splat(F32X4, s)
    }

    pub fn add(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fadd(a, b)
    }

    pub fn sub(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fsub(a, b)
    }

    pub fn mul(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fmul(a, b)
    }

    pub fn div(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fdiv(a, b)
    }

    pub fn neg(&mut self, a: Value) -> Value {
        self.b.ins().fneg(a)
    }

    /// `a * b + c`, fused when the CPU can.
    pub fn mul_add(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.features.fma {
            self.b.ins().fma(a, b, c)
        } else {
            let p = self.b.ins().fmul(a, b);
            self.b.ins().fadd(p, c)
        }
    }

    /// `a < b ? a : b`, which x86 does in one `minps` (unlike IEEE `fmin`). A NaN in `a` yields
    /// `b`, which is what clamping wants.
    pub fn pmin(&mut self, a: Value, b: Value) -> Value {
        let lt = self.b.ins().fcmp(FloatCC::LessThan, a, b);
        let mask = self.b.ins().bitcast(F32X4, MemFlagsData::new(), lt);
        self.b.ins().bitselect(mask, a, b)
    }

    /// `b < a ? a : b`, one `maxps`.
    pub fn pmax(&mut self, a: Value, b: Value) -> Value {
        let lt = self.b.ins().fcmp(FloatCC::LessThan, b, a);
        let mask = self.b.ins().bitcast(F32X4, MemFlagsData::new(), lt);
        self.b.ins().bitselect(mask, a, b)
    }

    /// Lanes of `a` where `cond(a, b)` holds, else of `if_false`.
    pub fn select_cmp(
        &mut self,
        cc: FloatCC,
        a: Value,
        b: Value,
        if_true: Value,
        if_false: Value,
    ) -> Value {
        let c = self.b.ins().fcmp(cc, a, b);
        let mask = self.b.ins().bitcast(F32X4, MemFlagsData::new(), c);
        self.b.ins().bitselect(mask, if_true, if_false)
    }

    /// Lanes picked from the 8 lanes of `a ++ b` (`shuffle` only exists on `i8x16`).
    pub fn shuffle(&mut self, a: Value, b: Value, lanes: [u8; 4]) -> Value {
        let le = MemFlagsData::new().with_endianness(Endianness::Little);
        let a8 = self.b.ins().bitcast(types::I8X16, le, a);
        let b8 = self.b.ins().bitcast(types::I8X16, le, b);
        let bytes: Vec<u8> = lanes
            .iter()
            .flat_map(|&l| (0..4).map(move |k| 4 * l + k))
            .collect();
        let mask = self.b.func.dfg.immediates.push(ConstantData::from(bytes));
        let r = self.b.ins().shuffle(a8, b8, mask);
        self.b.ins().bitcast(F32X4, le, r)
    }

    /// All lanes set to lane `k` of `v`.
    pub fn broadcast_lane(&mut self, v: Value, k: u8) -> Value {
        self.shuffle(v, v, [k; 4])
    }

    /// All lanes set to the sum of the lanes of `v`.
    pub fn hsum(&mut self, v: Value) -> Value {
        let s = self.shuffle(v, v, [2, 3, 0, 1]);
        let v = self.add(v, s);
        let s = self.shuffle(v, v, [1, 0, 3, 2]);
        self.add(v, s)
    }

    /// All lanes set to the largest lane of `v`.
    pub fn hmax(&mut self, v: Value) -> Value {
        let s = self.shuffle(v, v, [2, 3, 0, 1]);
        let v = self.pmax(v, s);
        let s = self.shuffle(v, v, [1, 0, 3, 2]);
        self.pmax(v, s)
    }

    /// The lane sums of four vectors, as one vector `[Σd0, Σd1, Σd2, Σd3]`.
    pub fn transpose_sum(&mut self, d: [Value; 4]) -> Value {
        let t0 = self.shuffle(d[0], d[1], [0, 4, 1, 5]);
        let t1 = self.shuffle(d[0], d[1], [2, 6, 3, 7]);
        let t2 = self.shuffle(d[2], d[3], [0, 4, 1, 5]);
        let t3 = self.shuffle(d[2], d[3], [2, 6, 3, 7]);
        let u0 = self.add(t0, t1);
        let u1 = self.add(t2, t3);
        let lo = self.shuffle(u0, u1, [0, 1, 4, 5]);
        let hi = self.shuffle(u0, u1, [2, 3, 6, 7]);
        self.add(lo, hi)
    }

    // ---- memory ----

    /// Load `width` (1..=4) consecutive f32 at `base + off`; missing lanes are zero.
    pub fn load(&mut self, base: Value, off: i32, width: usize) -> Value {
        self.load_with(Access::Ordered, base, off, width)
    }

    pub fn load_with(&mut self, access: Access, base: Value, off: i32, width: usize) -> Value {
        debug_assert!((1..=LANES).contains(&width));
        if width == LANES {
            return self.b.ins().load(F32X4, access.flags(), base, off);
        }
        let mut v = self.splat(0.0);
        for k in 0..width {
            let s = self
                .b
                .ins()
                .load(types::F32, access.flags(), base, off + 4 * k as i32);
            v = self.b.ins().insertlane(v, s, k as u8);
        }
        v
    }

    /// Store the first `width` lanes of `v` at `base + off`.
    pub fn store(&mut self, v: Value, base: Value, off: i32, width: usize) {
        debug_assert!((1..=LANES).contains(&width));
        if width == LANES {
            self.b.ins().store(data_flags(), v, base, off);
            return;
        }
        for k in 0..width {
            let s = self.b.ins().extractlane(v, k as u8);
            self.b
                .ins()
                .store(data_flags(), s, base, off + 4 * k as i32);
        }
    }

    /// One f32 at `base + off`, splat to all lanes.
    pub fn load_splat(&mut self, base: Value, off: i32) -> Value {
        let s = self.b.ins().load(types::F32, data_flags(), base, off);
        self.b.ins().splat(F32X4, s)
    }

    // ---- control flow ----

    /// `for (iv = start; iv < end; iv += step)` (signed), threading `carried` through the
    /// iterations: `body` receives the values of the current iteration and replaces them with
    /// those of the next. Returns the values after the last iteration.
    ///
    /// The loop is rotated (one guard, then the test at the bottom: one branch per iteration) and
    /// gets a preheader of its own, where Cranelift hoists loop-invariant code.
    pub fn counted_loop(
        &mut self,
        start: Value,
        end: Value,
        step: i64,
        carried: Vec<Value>,
        body: impl FnOnce(&mut Self, Value, &mut Vec<Value>),
    ) -> Vec<Value> {
        let types: Vec<Type> = carried
            .iter()
            .map(|&v| self.b.func.dfg.value_type(v))
            .collect();
        let preheader = self.b.create_block();
        let header = self.b.create_block();
        let exit = self.b.create_block();
        let iv = self.b.append_block_param(header, types::I64);
        let mut state = Vec::with_capacity(types.len());
        let mut out = Vec::with_capacity(types.len());
        for &ty in &types {
            state.push(self.b.append_block_param(header, ty));
            out.push(self.b.append_block_param(exit, ty));
        }
        let args = |first: Option<Value>, rest: &[Value]| -> Vec<BlockArg> {
            first
                .into_iter()
                .chain(rest.iter().copied())
                .map(BlockArg::Value)
                .collect()
        };

        let any = self.b.ins().icmp(IntCC::SignedLessThan, start, end);
        self.b
            .ins()
            .brif(any, preheader, &[], exit, &args(None, &carried));

        self.b.switch_to_block(preheader);
        self.b.seal_block(preheader);
        self.b.ins().jump(header, &args(Some(start), &carried));

        self.b.switch_to_block(header);
        body(self, iv, &mut state);
        let next = self.b.ins().iadd_imm_s(iv, step);
        let more = self.b.ins().icmp(IntCC::SignedLessThan, next, end);
        self.b.ins().brif(
            more,
            header,
            &args(Some(next), &state),
            exit,
            &args(None, &state),
        );
        self.b.seal_block(header);

        self.b.switch_to_block(exit);
        self.b.seal_block(exit);
        out
    }

    /// Walk `n` contiguous f32 in chunks of 4 lanes, the last one possibly partial. Calls
    /// `f(fx, dyn_off, off, width, state)` per chunk, where the chunk starts `dyn_off + off` bytes
    /// into the row (`dyn_off` is the loop variable, or `None` where the walk is unrolled), and
    /// `(off / 16) % unroll` is the chunk's index modulo `unroll` (to pick an accumulator).
    /// `state` is threaded through the walk like [`Fx::counted_loop`]'s values.
    ///
    /// Rows of up to `unroll_all` full chunks are unrolled completely; longer ones loop over
    /// groups of `unroll` chunks. Values carried by a loop are computed within each iteration,
    /// whereas in unrolled code Cranelift computes pure values at their first side-effecting use:
    /// a reduction whose result is only used after the walk should loop, or all its loads would be
    /// live at once.
    pub fn for_chunks(
        &mut self,
        n: usize,
        unroll: usize,
        unroll_all: usize,
        state: &mut Vec<Value>,
        mut f: impl FnMut(&mut Self, Option<Value>, i32, usize, &mut Vec<Value>),
    ) {
        let full = n / LANES;
        let tail = n % LANES;
        let chunk_bytes = (LANES * 4) as i32;
        let mut done = 0;
        if full > unroll_all.max(unroll) {
            let groups = full / unroll;
            let start = self.iconst(0);
            let end = self.iconst((groups * unroll) as i64 * chunk_bytes as i64);
            *state = self.counted_loop(
                start,
                end,
                (unroll as i64) * chunk_bytes as i64,
                std::mem::take(state),
                |fx, iv, st| {
                    for u in 0..unroll {
                        f(fx, Some(iv), u as i32 * chunk_bytes, LANES, st);
                    }
                },
            );
            done = groups * unroll;
        }
        for k in done..full {
            f(self, None, k as i32 * chunk_bytes, LANES, state);
        }
        if tail > 0 {
            f(self, None, full as i32 * chunk_bytes, tail, state);
        }
    }
}
