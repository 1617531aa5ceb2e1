"""Generate the tiny Huginn / Ouro parity fixtures under tests/fixtures/ (deterministic).

    python tools/reference/gen_fixtures.py [--out tests/fixtures]

Reference numbers are computed in float64 and stored as float32.  Self-checks (asserted):
  * incremental decode with the KV cache == full recomputation (max abs diff < 1e-9, f64)
  * float32 reference run vs float64 run (max abs diff < 1e-4)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loopref as R  # noqa: E402

torch.set_num_threads(2)

HUGINN_CFG = {
    "model_type": "huginn_raven",
    "n_embd": 64,
    "n_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 256,
    "n_layers_in_prelude": 1,
    "n_layers_in_recurrent_block": 2,
    "n_layers_in_coda": 1,
    "block_size": 64,
    "rope_base": 50000,
    "norm_eps": 1e-6,
    "mean_recurrence": 4,
    "tie_embeddings": True,
    "qk_bias": True,
    "bias": False,
    "state_init": "like-init",
    "injection_type": "linear",
}

OURO_CFG = {
    "model_type": "ouro",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "total_ut_steps": 4,
    "early_exit_threshold": 1.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 64,
    "hidden_act": "silu",
}

PROMPT_LEN = 7
DECODE_LEN = 4
HUGINN_STEPS = (1, 4, 7)
HUGINN_SEED = 1234
OURO_SEED = 5678


def write_config(path, cfg):
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def tokens(seed, vocab):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (PROMPT_LEN,), generator=g, dtype=torch.int64)
    dec = torch.randint(0, vocab, (DECODE_LEN,), generator=g, dtype=torch.int64)
    return prompt, dec


def run_huginn(w, cfg, prompt, dec, r, dtype):
    """Prefill + cached decode (one token at a time) + full recompute, all in `dtype`."""
    wd = R.cast_weights(w, dtype)
    rope = R.huginn_rope_table(cfg, dtype)
    cache = R.KVCache(PROMPT_LEN + DECODE_LEN)
    pre = R.huginn_forward(wd, cfg, prompt[None], r, cache=cache, start=0, rope=rope)[0]
    outs = []
    for n in range(DECODE_LEN):
        o = R.huginn_forward(wd, cfg, dec[None, n:n + 1], r, cache=cache,
                             start=PROMPT_LEN + n, rope=rope)[0, 0]
        outs.append(o)
    decl = torch.stack(outs)
    assert cache.num_slots() == R.huginn_num_slots(cfg, r)
    full = R.huginn_forward(wd, cfg, torch.cat([prompt, dec])[None], r, rope=rope)[0]
    return pre, decl, full


def run_ouro(w, cfg, prompt, dec, dtype):
    wd = R.cast_weights(w, dtype)
    total = PROMPT_LEN + DECODE_LEN
    rope = R.ouro_rope_table(cfg, total, dtype)
    cache = R.KVCache(total)
    pre = R.ouro_forward(wd, cfg, prompt[None], cache=cache, start=0, rope=rope)
    dl, dp = [], []
    for n in range(DECODE_LEN):
        o = R.ouro_forward(wd, cfg, dec[None, n:n + 1], cache=cache, start=PROMPT_LEN + n, rope=rope)
        dl.append(o["logits"][0, 0])
        dp.append(o["exit_probs"][0, 0])
    assert cache.num_slots() == cfg["total_ut_steps"] * cfg["num_hidden_layers"]
    full = R.ouro_forward(wd, cfg, torch.cat([prompt, dec])[None], rope=rope)
    return (pre["logits"][0], pre["exit_probs"][0], torch.stack(dl), torch.stack(dp),
            full["logits"][0], full["exit_probs"][0])


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def gen_huginn(out):
    d = os.path.join(out, "huginn_tiny")
    os.makedirs(d, exist_ok=True)
    cfg = HUGINN_CFG
    w = R.huginn_random_weights(cfg, HUGINN_SEED)
    write_config(os.path.join(d, "config.json"), cfg)
    save_file(w, os.path.join(d, "model.safetensors"))
    for r in HUGINN_STEPS:
        prompt, dec = tokens(HUGINN_SEED + 100 + r, cfg["vocab_size"])
        pre, decl, full = run_huginn(w, cfg, prompt, dec, r, torch.float64)
        cache_err = max(maxdiff(pre, full[:PROMPT_LEN]), maxdiff(decl, full[PROMPT_LEN:]))
        pre32, dec32, _ = run_huginn(w, cfg, prompt, dec, r, torch.float32)
        f32_err = max(maxdiff(pre, pre32), maxdiff(decl, dec32))
        print(f"huginn r={r}: cache-vs-full (f64) max|d|={cache_err:.3e}  "
              f"f32-vs-f64 max|d|={f32_err:.3e}  logit std={pre.std().item():.3f}")
        assert cache_err < 1e-9, cache_err
        assert f32_err < 1e-4, f32_err
        save_file({
            "prompt": prompt.contiguous(),
            "prefill_logits": pre.float().contiguous(),
            "decode_tokens": dec.contiguous(),
            "decode_logits": decl.float().contiguous(),
        }, os.path.join(d, f"r{r}.safetensors"))


def gen_ouro(out):
    d = os.path.join(out, "ouro_tiny")
    os.makedirs(d, exist_ok=True)
    cfg = OURO_CFG
    w = R.ouro_random_weights(cfg, OURO_SEED)
    write_config(os.path.join(d, "config.json"), cfg)
    save_file(w, os.path.join(d, "model.safetensors"))
    T = cfg["total_ut_steps"]
    prompt, dec = tokens(OURO_SEED + 100 + T, cfg["vocab_size"])
    pl, pp, dl, dp, fl, fp = run_ouro(w, cfg, prompt, dec, torch.float64)
    cache_err = max(maxdiff(pl, fl[:PROMPT_LEN]), maxdiff(dl, fl[PROMPT_LEN:]),
                    maxdiff(pp, fp[:PROMPT_LEN]), maxdiff(dp, fp[PROMPT_LEN:]))
    pl32, pp32, dl32, dp32, _, _ = run_ouro(w, cfg, prompt, dec, torch.float32)
    f32_err = max(maxdiff(pl, pl32), maxdiff(dl, dl32))
    f32_perr = max(maxdiff(pp, pp32), maxdiff(dp, dp32))
    psum_err = (torch.cat([pp, dp]).sum(-1) - 1).abs().max().item()
    print(f"ouro t={T}: cache-vs-full (f64) max|d|={cache_err:.3e}  "
          f"f32-vs-f64 logits max|d|={f32_err:.3e}  exit_probs max|d|={f32_perr:.3e}  "
          f"|sum p - 1|={psum_err:.1e}  logit std={pl.std().item():.3f}")
    assert cache_err < 1e-9, cache_err
    assert f32_err < 1e-4 and f32_perr < 1e-4, (f32_err, f32_perr)
    assert psum_err < 1e-12
    save_file({
        "prompt": prompt.contiguous(),
        "prefill_logits": pl.float().contiguous(),
        "prefill_exit_probs": pp.float().contiguous(),
        "decode_tokens": dec.contiguous(),
        "decode_logits": dl.float().contiguous(),
        "decode_exit_probs": dp.float().contiguous(),
    }, os.path.join(d, f"t{T}.safetensors"))


SCHED_PROMPT_DEPTHS = (3, 1, 4, 2, 5, 1, 3)
SCHED_DECODE_DEPTHS = (2, 5, 1, 3)


def run_schedule(w, cfg, prompt, dec, pdep, ddep, policy, dtype):
    """Prefill + cached decode with a per-token depth schedule, and the full recompute."""
    wd = R.cast_weights(w, dtype)
    rope = R.huginn_rope_table(cfg, dtype)
    cache = R.ScheduleCache(PROMPT_LEN + DECODE_LEN, policy)
    pre = R.huginn_forward_schedule(wd, cfg, prompt[None], pdep, cache, 0, rope)[0]
    outs = []
    for n in range(DECODE_LEN):
        o = R.huginn_forward_schedule(wd, cfg, dec[None, n:n + 1], ddep[n:n + 1], cache,
                                      PROMPT_LEN + n, rope)
        outs.append(o[0, 0])
    full_cache = R.ScheduleCache(PROMPT_LEN + DECODE_LEN, policy)
    full = R.huginn_forward_schedule(wd, cfg, torch.cat([prompt, dec])[None],
                                     torch.cat([pdep, ddep]), full_cache, 0, rope)[0]
    return pre, torch.stack(outs), full, cache.bytes()


def gen_schedule(out):
    """Forced per-token depths under each cache policy: huginn_tiny/sched_{policy}.safetensors."""
    d = os.path.join(out, "huginn_tiny")
    cfg = HUGINN_CFG
    w = R.huginn_random_weights(cfg, HUGINN_SEED)
    prompt, dec = tokens(HUGINN_SEED + 999, cfg["vocab_size"])
    pdep = torch.tensor(SCHED_PROMPT_DEPTHS, dtype=torch.int64)
    ddep = torch.tensor(SCHED_DECODE_DEPTHS, dtype=torch.int64)
    # A constant schedule is the fixed-depth forward.
    wd = R.cast_weights(w, torch.float64)
    c = R.ScheduleCache(PROMPT_LEN, "per_step")
    a = R.huginn_forward_schedule(wd, cfg, prompt[None], torch.full((PROMPT_LEN,), 4), c)
    b = R.huginn_forward(wd, cfg, prompt[None], 4)
    assert maxdiff(a, b) < 1e-9, maxdiff(a, b)
    for policy in R.ScheduleCache.POLICIES:
        pre, decl, full, nbytes = run_schedule(w, cfg, prompt, dec, pdep, ddep, policy, torch.float64)
        cache_err = max(maxdiff(pre, full[:PROMPT_LEN]), maxdiff(decl, full[PROMPT_LEN:]))
        pre32, dec32, _, _ = run_schedule(w, cfg, prompt, dec, pdep, ddep, policy, torch.float32)
        f32_err = max(maxdiff(pre, pre32), maxdiff(decl, dec32))
        print(f"huginn schedule {policy}: cache-vs-full (f64) max|d|={cache_err:.3e}  "
              f"f32-vs-f64 max|d|={f32_err:.3e}  kv bytes (f32)={nbytes}")
        # last_step: a prefill reads other prompt tokens at the current iteration, decode reads
        # their final one, so only per_step and share_first equal recomputation.
        if policy != "last_step":
            assert cache_err < 1e-9, cache_err
        assert f32_err < 1e-4, f32_err
        save_file({
            "prompt": prompt.contiguous(),
            "prompt_depths": pdep.contiguous(),
            "prefill_logits": pre.float().contiguous(),
            "decode_tokens": dec.contiguous(),
            "decode_depths": ddep.contiguous(),
            "decode_logits": decl.float().contiguous(),
            "recompute_logits": full.float().contiguous(),
        }, os.path.join(d, f"sched_{policy}.safetensors"))


# loopc `ring(c)` under per-token exits; on huginn_tiny (2 core layers) ring(1) is Huginn's
# `compress-s2` and ring(2) its `compress-s4` (two recurrences of two layers).
RING_SIZES = (1, 2, 3)


def gen_ring_schedule(out):
    """Forced per-token depths with a ring cache: huginn_tiny/sched_ring{c}.safetensors."""
    d = os.path.join(out, "huginn_tiny")
    cfg = HUGINN_CFG
    w = R.huginn_random_weights(cfg, HUGINN_SEED)
    prompt, dec = tokens(HUGINN_SEED + 999, cfg["vocab_size"])
    pdep = torch.tensor(SCHED_PROMPT_DEPTHS, dtype=torch.int64)
    ddep = torch.tensor(SCHED_DECODE_DEPTHS, dtype=torch.int64)
    ref = {}
    for c in RING_SIZES:
        policy = f"ring{c}"
        pre, decl, full, _ = run_schedule(w, cfg, prompt, dec, pdep, ddep, policy, torch.float64)
        pre32, dec32, _, _ = run_schedule(w, cfg, prompt, dec, pdep, ddep, policy, torch.float32)
        f32_err = max(maxdiff(pre, pre32), maxdiff(decl, dec32))
        ref[c] = (pre, decl)
        print(f"huginn schedule {policy}: f32-vs-f64 max|d|={f32_err:.3e}")
        assert f32_err < 1e-4, f32_err
        save_file({
            "prompt": prompt.contiguous(),
            "prompt_depths": pdep.contiguous(),
            "prefill_logits": pre.float().contiguous(),
            "decode_tokens": dec.contiguous(),
            "decode_depths": ddep.contiguous(),
            "decode_logits": decl.float().contiguous(),
            "ring": torch.tensor([c]),
        }, os.path.join(d, f"sched_ring{c}.safetensors"))
    # ring(1) is last_step; a ring as long as the deepest schedule is per_step; a ring in
    # between differs from both, so the fixture tests something of its own.
    ls = run_schedule(w, cfg, prompt, dec, pdep, ddep, "last_step", torch.float64)
    ps = run_schedule(w, cfg, prompt, dec, pdep, ddep, "per_step", torch.float64)
    assert maxdiff(ref[1][0], ls[0]) < 1e-12 and maxdiff(ref[1][1], ls[1]) < 1e-12
    deep = run_schedule(w, cfg, prompt, dec, pdep, ddep, f"ring{max(SCHED_PROMPT_DEPTHS + SCHED_DECODE_DEPTHS)}",
                        torch.float64)
    assert maxdiff(deep[0], ps[0]) < 1e-12 and maxdiff(deep[1], ps[1]) < 1e-12
    for c in RING_SIZES[1:]:
        dl, dp = maxdiff(ref[c][1], ls[1]), maxdiff(ref[c][1], ps[1])
        print(f"ring{c} decode vs last_step {dl:.3e}, vs per_step {dp:.3e}")
        assert dl > 1e-3 and dp > 1e-3


ACT_EPS = 0.01
ACT_MAX = 6


def run_act(w, cfg, prompt, dec, dtype):
    wd = R.cast_weights(w, dtype)
    total = PROMPT_LEN + DECODE_LEN
    rope = R.ouro_rope_table(cfg, total, dtype)
    cache = R.ScheduleCache(total, "per_step")
    pre, pdep = R.ouro_forward_act(wd, cfg, prompt[None], ACT_EPS, ACT_MAX, cache, 0, rope)
    dl, dd = [], []
    for n in range(DECODE_LEN):
        o, d = R.ouro_forward_act(wd, cfg, dec[None, n:n + 1], ACT_EPS, ACT_MAX, cache, PROMPT_LEN + n, rope)
        dl.append(o[0, 0])
        dd.append(d[0])
    full, fdep = R.ouro_forward_act(wd, cfg, torch.cat([prompt, dec])[None], ACT_EPS, ACT_MAX,
                                    R.ScheduleCache(total, "per_step"), 0, rope)
    return pre[0], pdep, torch.stack(dl), torch.stack(dd), full[0], fdep


def gen_act(out):
    """ACT halting on Ouro's gate with physical exit: ouro_tiny/act.safetensors."""
    d = os.path.join(out, "ouro_tiny")
    cfg = OURO_CFG
    w = R.ouro_random_weights(cfg, OURO_SEED)
    prompt, dec = tokens(OURO_SEED + 777, cfg["vocab_size"])
    pl, pd, dl, dd, fl, fd = run_act(w, cfg, prompt, dec, torch.float64)
    cache_err = max(maxdiff(pl, fl[:PROMPT_LEN]), maxdiff(dl, fl[PROMPT_LEN:]))
    assert torch.equal(torch.cat([pd, dd]), fd), (pd, dd, fd)
    pl32, pd32, dl32, dd32, _, _ = run_act(w, cfg, prompt, dec, torch.float32)
    assert torch.equal(pd, pd32) and torch.equal(dd, dd32), "f32 halts at other steps"
    f32_err = max(maxdiff(pl, pl32), maxdiff(dl, dl32))
    print(f"ouro act eps={ACT_EPS} max={ACT_MAX}: depths {pd.tolist()} {dd.tolist()}  "
          f"cache-vs-full (f64) max|d|={cache_err:.3e}  f32-vs-f64 max|d|={f32_err:.3e}")
    assert cache_err < 1e-9 and f32_err < 1e-4
    save_file({
        "prompt": prompt.contiguous(), "prompt_depths": pd.contiguous(),
        "prefill_logits": pl.float().contiguous(),
        "decode_tokens": dec.contiguous(), "decode_depths": dd.contiguous(),
        "decode_logits": dl.float().contiguous(),
    }, os.path.join(d, "act.safetensors"))


OURO_SCHED_PROMPT = (2, 4, 1, 3, 4, 2, 1)
OURO_SCHED_DECODE = (3, 1, 4, 2)


def gen_ouro_schedule(out):
    """Forced per-token loops on Ouro, per_step cache: ouro_tiny/sched_per_step.safetensors."""
    d = os.path.join(out, "ouro_tiny")
    cfg = OURO_CFG
    w = R.ouro_random_weights(cfg, OURO_SEED)
    prompt, dec = tokens(OURO_SEED + 555, cfg["vocab_size"])
    pdep = torch.tensor(OURO_SCHED_PROMPT, dtype=torch.int64)
    ddep = torch.tensor(OURO_SCHED_DECODE, dtype=torch.int64)
    total = PROMPT_LEN + DECODE_LEN

    def run(dtype):
        wd = R.cast_weights(w, dtype)
        rope = R.ouro_rope_table(cfg, total, dtype)
        cache = R.ScheduleCache(total, "per_step")
        pre = R.ouro_forward_schedule(wd, cfg, prompt[None], pdep, cache, 0, rope)[0]
        dl = [R.ouro_forward_schedule(wd, cfg, dec[None, n:n + 1], ddep[n:n + 1], cache, PROMPT_LEN + n, rope)[0, 0]
              for n in range(DECODE_LEN)]
        full = R.ouro_forward_schedule(wd, cfg, torch.cat([prompt, dec])[None], torch.cat([pdep, ddep]),
                                       R.ScheduleCache(total, "per_step"), 0, rope)[0]
        return pre, torch.stack(dl), full

    pre, decl, full = run(torch.float64)
    const = R.ouro_forward_schedule(R.cast_weights(w, torch.float64), cfg, prompt[None],
                                    torch.full((PROMPT_LEN,), 4), R.ScheduleCache(PROMPT_LEN))
    fixed = R.ouro_forward(R.cast_weights(w, torch.float64), cfg, prompt[None])["logits"]
    assert maxdiff(const, fixed) < 1e-9
    cache_err = max(maxdiff(pre, full[:PROMPT_LEN]), maxdiff(decl, full[PROMPT_LEN:]))
    pre32, dec32, _ = run(torch.float32)
    f32_err = max(maxdiff(pre, pre32), maxdiff(decl, dec32))
    print(f"ouro schedule per_step: cache-vs-full (f64) max|d|={cache_err:.3e}  f32-vs-f64 max|d|={f32_err:.3e}")
    assert cache_err < 1e-9 and f32_err < 1e-4
    save_file({
        "prompt": prompt.contiguous(), "prompt_depths": pdep.contiguous(),
        "prefill_logits": pre.float().contiguous(),
        "decode_tokens": dec.contiguous(), "decode_depths": ddep.contiguous(),
        "decode_logits": decl.float().contiguous(),
    }, os.path.join(d, "sched_per_step.safetensors"))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "fixtures"))
    ap.add_argument("--only", choices=["all", "schedule", "ring"], default="all")
    a = ap.parse_args()
    out = os.path.normpath(a.out)
    if a.only == "ring":
        gen_ring_schedule(out)
        return
    if a.only == "all":
        gen_huginn(out)
        gen_ouro(out)
    gen_schedule(out)
    gen_ring_schedule(out)
    gen_act(out)
    gen_ouro_schedule(out)
    print(f"fixtures written to {out}")


if __name__ == "__main__":
    main()
