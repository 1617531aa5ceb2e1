"""Parity fixtures for the Universal Transformer with ACT (examples/ut.loop, utref.py).

Writes tests/fixtures/ut_tiny/{config.json, model.safetensors, act_m<max>.safetensors}: prefill
logits and halting depths of a prompt, then cached decode (one token per call) logits and depths,
for a couple of `act_max_steps`.  Computes in float64 and stores float32; checks that cached
decode equals full recomputation, that float32 halts at the same steps as float64, that no
cumulative halting probability sits within 1e-4 of the threshold, and that the tokens halt at
different depths.  Deterministic: rerunning gives identical files.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

import loopref as R
import utref as U

CFG = {"hidden_size": 32, "num_heads": 4, "filter_size": 64, "vocab_size": 64,
       "norm_epsilon": 1e-6, "act_max_steps": 6, "act_epsilon": 0.01}
SEED = 2018
# t2t initialises the halting bias to `act_halting_bias_init` = 1.0.
HALT_BIAS, HALT_SCALE = 1.0, 1.0
PROMPT_LEN, DECODE_LEN = 9, 5
MAX_STEPS = (6, 3)


def run(w, prompt, dec, max_steps, dtype):
    wd = R.cast_weights(w, dtype)
    total = PROMPT_LEN + DECODE_LEN
    D = CFG["hidden_size"]
    cache = U.LatestCache(total, D, dtype)
    pre, pd, m0 = U.ut_forward(wd, CFG, prompt, cache, 0, max_steps)
    dl, dd, margins = [], [], [m0]
    for n in range(DECODE_LEN):
        o, d, m = U.ut_forward(wd, CFG, dec[n:n + 1], cache, PROMPT_LEN + n, max_steps)
        dl.append(o[0])
        dd.append(d[0])
        margins.append(m)
    full, fd, _ = U.ut_forward(wd, CFG, torch.cat([prompt, dec]), U.LatestCache(total, D, dtype), 0,
                               max_steps)
    return pre, pd, torch.stack(dl), torch.stack(dd), full, fd, min(margins)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "fixtures"))
    d = os.path.join(os.path.normpath(ap.parse_args().out), "ut_tiny")
    os.makedirs(d, exist_ok=True)
    w = U.ut_random_weights(CFG, SEED, HALT_BIAS, HALT_SCALE)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(CFG, f, indent=2)
        f.write("\n")
    save_file(w, os.path.join(d, "model.safetensors"))
    g = torch.Generator().manual_seed(SEED + 1)
    prompt = torch.randint(0, CFG["vocab_size"], (PROMPT_LEN,), generator=g, dtype=torch.int64)
    dec = torch.randint(0, CFG["vocab_size"], (DECODE_LEN,), generator=g, dtype=torch.int64)
    for ms in MAX_STEPS:
        pl, pd, dl, dd, fl, fd, margin = run(w, prompt, dec, ms, torch.float64)
        assert torch.equal(torch.cat([pd, dd]), fd), (pd, dd, fd)
        cache_err = max((pl - fl[:PROMPT_LEN]).abs().max().item(), (dl - fl[PROMPT_LEN:]).abs().max().item())
        pl32, pd32, dl32, dd32, _, _, _ = run(w, prompt, dec, ms, torch.float32)
        assert torch.equal(pd, pd32) and torch.equal(dd, dd32), "f32 halts at other steps"
        f32_err = max((pl - pl32.double()).abs().max().item(), (dl - dl32.double()).abs().max().item())
        depths = torch.cat([pd, dd])
        print(f"ut act max={ms}: depths {pd.tolist()} {dd.tolist()}  halting margin {margin:.2e}  "
              f"cache-vs-full (f64) {cache_err:.3e}  f32-vs-f64 {f32_err:.3e}  logit std {pl.std().item():.3f}")
        assert cache_err < 1e-9 and f32_err < 1e-4 and margin > 1e-4
        assert len(set(depths.tolist())) >= 2, "every token halts at the same depth"
        save_file({
            "prompt": prompt.contiguous(), "prompt_depths": pd.contiguous(),
            "prefill_logits": pl.float().contiguous(),
            "decode_tokens": dec.contiguous(), "decode_depths": dd.contiguous(),
            "decode_logits": dl.float().contiguous(), "max_steps": torch.tensor([ms]),
        }, os.path.join(d, f"act_m{ms}.safetensors"))


if __name__ == "__main__":
    main()
