"""The bf16-weight parity fixture for `loopc --dtype bf16` (tests/fixtures/huginn_tiny/bf16_r4.safetensors).

    python tools/reference/gen_bf16_fixture.py [--out tests/fixtures]

What loopc computes with `--dtype bf16`, and therefore what this reference does: every matmul
(`F.linear`) rounds both operands to bf16 (round-to-nearest-even, `.to(torch.bfloat16)`) and
sums the exact products in f32, the result staying unrounded f32; the token embedding is
gathered from the bf16-rounded table; everything else (norms, RoPE, attention, residuals, the
KV cache) is the float32 reference of `loopref.py`. Activations are f32 on both sides on
purpose: with f64 activations, the few values that fall on the other side of a bf16 rounding
boundary than in f32 move the logits by ~0.02 (measured), which would swamp the comparison.
The weights are the existing huginn_tiny checkpoint. The prompt has 12 tokens so that prefill runs loopc's
many-row (AMX / row-group) kernel and decode its one-row kernel.

Self-check (asserted): the cached decode equals the full recomputation (< 1e-4).
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loopref as R  # noqa: E402

torch.set_num_threads(2)

PROMPT_LEN = 12
DECODE_LEN = 4
STEPS = 4
SEED = 4321


def rounded(t):
    return t.to(torch.bfloat16).to(t.dtype)


def bf16_linear(x, w, b=None):
    y = F.linear(rounded(x), rounded(w))
    return y if b is None else y + b


def bf16_embedding(ids, table, *a, **k):
    return F.embedding(ids, rounded(table), *a, **k)


# loopref calls `F.linear` / `F.embedding` through its module global `F`.
R.F = types.SimpleNamespace(
    **{n: getattr(F, n) for n in dir(F) if not n.startswith("_")},
)
R.F.linear = bf16_linear
R.F.embedding = bf16_embedding


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "fixtures"))
    a = ap.parse_args()
    d = os.path.join(os.path.normpath(a.out), "huginn_tiny")
    import json
    cfg = json.load(open(os.path.join(d, "config.json")))
    w = R.cast_weights(load_file(os.path.join(d, "model.safetensors")), torch.float32)
    g = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, cfg["vocab_size"], (PROMPT_LEN,), generator=g, dtype=torch.int64)
    dec = torch.randint(0, cfg["vocab_size"], (DECODE_LEN,), generator=g, dtype=torch.int64)
    rope = R.huginn_rope_table(cfg, torch.float32)
    cache = R.KVCache(PROMPT_LEN + DECODE_LEN)
    pre = R.huginn_forward(w, cfg, prompt[None], STEPS, cache=cache, start=0, rope=rope)[0]
    outs = []
    for n in range(DECODE_LEN):
        o = R.huginn_forward(w, cfg, dec[None, n:n + 1], STEPS, cache=cache,
                             start=PROMPT_LEN + n, rope=rope)[0, 0]
        outs.append(o)
    decl = torch.stack(outs)
    full = R.huginn_forward(w, cfg, torch.cat([prompt, dec])[None], STEPS, rope=rope)[0]
    err = max((pre - full[:PROMPT_LEN]).abs().max().item(),
              (decl - full[PROMPT_LEN:]).abs().max().item())
    print(f"huginn bf16 r={STEPS}: cache-vs-full max|d|={err:.3e}  logit std={pre.std().item():.3f}")
    assert err < 1e-4, err
    save_file({
        "prompt": prompt.contiguous(),
        "prefill_logits": pre.float().contiguous(),
        "decode_tokens": dec.contiguous(),
        "decode_logits": decl.float().contiguous(),
    }, os.path.join(d, f"bf16_r{STEPS}.safetensors"))


if __name__ == "__main__":
    main()
