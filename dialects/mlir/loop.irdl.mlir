// The `loop` dialect: the structure of a loopc program (buffers, weights, KV-cache slots, the
// recurrence with its state, injected invariants and exit decision) around calls to generated
// kernels. Loaded at run time through the MLIR C API (`mlirLoadIRDLDialects`), so it needs no
// C++ build; IRDL checks every op's operand, result and attribute kinds.
//
// Every op is region-free: IRDL ops cannot be terminators, so a recurrence names its body as a
// `func.func` symbol (`loop.recur {body = @...}`) instead of holding a region. Ops carry
// attributes as discardable attributes (extensible dialects have no properties), so the
// generic form writes them `{...}`, not `<{...}>`.
//
// An IRDL constraint value binds the first attribute or type it matches, so every operand and
// attribute has its own constraint, and variadic operands (which share one) are unranked
// `memref<*xf32>` casts of the buffers.
irdl.dialect @loop {
  // A checkpoint tensor (or a weight derived from checkpoint tensors at load), as the
  // `rows × cols` window the program reads.
  irdl.operation @weight {
    %name = irdl.base "#builtin.string"
    %id = irdl.base "#builtin.integer"
    %offset = irdl.base "#builtin.integer"
    irdl.attributes {"name" = %name, "id" = %id, "offset" = %offset}
    %window = irdl.base "!builtin.memref"
    irdl.results(window: %window)
  }
  // An activation buffer of the runtime's plan: `?` rows are one per token of the call.
  irdl.operation @buffer {
    %name = irdl.base "#builtin.string"
    %id = irdl.base "#builtin.integer"
    irdl.attributes {"name" = %name, "id" = %id}
    %buf = irdl.base "!builtin.memref"
    irdl.results(buf: %buf)
  }
  // The cos or sin table of a rotary embedding, `[positions, head_dim / 2]`.
  irdl.operation @rope_table {
    %table = irdl.base "#builtin.integer"
    %part = irdl.base "#builtin.string"
    irdl.attributes {"table" = %table, "part" = %part}
    %values = irdl.base "!builtin.memref"
    irdl.results(values: %values)
  }
  // The key and value rows of an attention site's current cache slot. Inside a recurrence body
  // the slot is the iteration's (chosen by the `cache` policy of `loop.recur`).
  irdl.operation @kv_slot {
    %site = irdl.base "#builtin.integer"
    %name = irdl.base "#builtin.string"
    irdl.attributes {"site" = %site, "name" = %name}
    %k = irdl.base "!builtin.memref"
    %v = irdl.base "!builtin.memref"
    irdl.results(k: %k, v: %v)
  }
  // Append the call's key and value rows to the current slot of `site`.
  irdl.operation @kv_write {
    %site = irdl.base "#builtin.integer"
    irdl.attributes {"site" = %site}
    %k = irdl.base "!builtin.memref"
    %v = irdl.base "!builtin.memref"
    irdl.operands(k: %k, v: %v)
  }
  irdl.operation @embed {
    %tokens = irdl.base "!builtin.memref"
    %table = irdl.base "!builtin.memref"
    %out = irdl.base "!builtin.memref"
    irdl.operands(tokens: %tokens, table: %table, out: %out)
  }
  irdl.operation @pos_embed {
    %table = irdl.base "!builtin.memref"
    %out = irdl.base "!builtin.memref"
    irdl.operands(table: %table, out: %out)
  }
  irdl.operation @sinusoidal {
    %base = irdl.base "#builtin.float"
    irdl.attributes {"base" = %base}
    %out = irdl.base "!builtin.memref"
    irdl.operands(out: %out)
  }
  // `out = x · wᵀ` (layout "nk", torch Linear) or `x · w` (layout "kn", GPT-2 Conv1D): the
  // runtime's GEMM/GEMV.
  irdl.operation @matmul {
    %layout = irdl.base "#builtin.string"
    irdl.attributes {"layout" = %layout}
    %x = irdl.base "!builtin.memref"
    %w = irdl.base "!builtin.memref"
    %out = irdl.base "!builtin.memref"
    irdl.operands(x: %x, w: %w, out: %out)
  }
  // `matmul` with the GEMM epilogue `out = residual + row_scale ⊙ (x·wᵀ) + bias`: `terms`
  // names the `epi` operands in order (`row_scale`, `residual`, `bias`, comma-separated).
  // `glu(<act>,block=B)` last: `out` is then the product scratch and the last operand receives
  // `act(gate) · up` over gate/up column blocks of B (the `artifact::GluEpilogue`).
  // `norm(eps=..,normalize=..,gain=..,inv_rms=..)` last: the row reduction once a row is stored
  // (`artifact::NormEpilogue`); its gain and `[rows, 1]` inv_rms buffer are the last operands.
  // `rope(<style>,head_dim=D)` last: each head of D columns of the result rotated at its row's
  // position (`artifact::RopeEpilogue`); the rope table's cos and sin rows are its operands.
  irdl.operation @matmul_ep {
    %layout = irdl.base "#builtin.string"
    %terms = irdl.base "#builtin.string"
    irdl.attributes {"layout" = %layout, "terms" = %terms}
    %x = irdl.base "!builtin.memref"
    %w = irdl.base "!builtin.memref"
    %out = irdl.base "!builtin.memref"
    %epi = irdl.is memref<*xf32>
    irdl.operands(x: %x, w: %w, out: %out, epi: variadic %epi)
  }
  // One product `x · wᵀ` whose columns go to `parts` destinations (the first `parts` operands
  // after `w`, in column order, widths = their columns), each with its own GEMM epilogue: the
  // remaining operands, named per part by `terms` (parts separated by `;`, terms by `,`).
  irdl.operation @matmul_parts {
    %layout = irdl.base "#builtin.string"
    %parts = irdl.base "#builtin.integer"
    %terms = irdl.base "#builtin.string"
    irdl.attributes {"layout" = %layout, "parts" = %parts, "terms" = %terms}
    %x = irdl.base "!builtin.memref"
    %w = irdl.base "!builtin.memref"
    %rest = irdl.is memref<*xf32>
    irdl.operands(x: %x, w: %w, rest: variadic %rest)
  }
  irdl.operation @concat {
    %inputs = irdl.is memref<*xf32>
    %out = irdl.base "!builtin.memref"
    irdl.operands(inputs: variadic %inputs, out: %out)
  }
  irdl.operation @copy {
    %src = irdl.base "!builtin.memref"
    %dst = irdl.base "!builtin.memref"
    irdl.operands(src: %src, dst: %dst)
  }
  irdl.operation @slice_cols {
    %start = irdl.base "#builtin.integer"
    irdl.attributes {"start" = %start}
    %src = irdl.base "!builtin.memref"
    %out = irdl.base "!builtin.memref"
    irdl.operands(src: %src, out: %out)
  }
  // A call of a generated kernel (a `func.func` of this module) on the call's rows.
  irdl.operation @kernel {
    %callee = irdl.base "#builtin.symbol_ref"
    %spec = irdl.base "#builtin.string"
    irdl.attributes {"callee" = %callee, "spec" = %spec}
    %args = irdl.is memref<*xf32>
    irdl.operands(args: variadic %args)
  }
  // The recurrence: `state` starts as `init`, then `body(state, next, injected...)` runs up to
  // `max_steps` times (default `steps`); after each run `next` becomes the state, unless the
  // body's `loop.exit` decides that a row (or the whole call) stops. `injected` are the loop
  // invariants the body reads (Huginn's embedding injection, Ouro's nothing).
  irdl.operation @recur {
    %body = irdl.base "#builtin.symbol_ref"
    %steps = irdl.base "#builtin.integer"
    %init = irdl.base "#builtin.string"
    %cache = irdl.base "#builtin.string"
    irdl.attributes {"body" = %body, "steps" = %steps, "init" = %init, "cache" = %cache}
    %state = irdl.base "!builtin.memref"
    %next = irdl.base "!builtin.memref"
    %injected = irdl.is memref<*xf32>
    irdl.operands(state: %state, next: %next, injected: variadic %injected)
  }
  // The exit decision at the end of a body iteration, from the new state and (for learned
  // gates) the gate logits.
  irdl.operation @exit {
    %policy = irdl.base "#builtin.string"
    irdl.attributes {"policy" = %policy}
    %next = irdl.base "!builtin.memref"
    %gate = irdl.is memref<*xf32>
    irdl.operands(next: %next, gate: variadic %gate)
  }
}
