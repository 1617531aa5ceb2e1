"""Parity fixtures for the Loop-Think-Generalize family (examples/ltg.loop).

Writes tests/fixtures/ltg_tiny/{config.json, model.safetensors, <case>.safetensors}; computes in
float64, stores float32; checks cached decode against full recomputation and f32 against f64.
Deterministic: rerunning gives identical files.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

import loopref as R
import ltgref as L

CFG = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 256, "n_positions": 64,
       "n_inner": None, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
# (name, positions, inject, iterations); the DSL's `positions` param: 0 none, 1 learned, 2 sinusoidal
CASES = [("learned_inject_r3", "learned", True, 3), ("sinusoidal_r2", "sinusoidal", False, 2),
         ("nope_inject_r4", "none", True, 4)]
SEED = 4321
PROMPT_LEN, DECODE_LEN = 7, 4


def run(w, prompt, dec, positions, inject, iters, dtype):
    wd = R.cast_weights(w, dtype)
    cache = R.KVCache(PROMPT_LEN + DECODE_LEN)
    pre = L.ltg_forward(wd, CFG, prompt[None], iters, inject, positions, cache, 0)[0]
    outs = [L.ltg_forward(wd, CFG, dec[None, n:n + 1], iters, inject, positions, cache, PROMPT_LEN + n)[0, 0]
            for n in range(DECODE_LEN)]
    full = L.ltg_forward(wd, CFG, torch.cat([prompt, dec])[None], iters, inject, positions)[0]
    return pre, torch.stack(outs), full


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "fixtures"))
    d = os.path.join(os.path.normpath(ap.parse_args().out), "ltg_tiny")
    os.makedirs(d, exist_ok=True)
    w = L.ltg_random_weights(CFG, SEED)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(CFG, f, indent=2)
        f.write("\n")
    save_file(w, os.path.join(d, "model.safetensors"))
    for i, (name, positions, inject, iters) in enumerate(CASES):
        g = torch.Generator().manual_seed(SEED + 100 + i)
        prompt = torch.randint(0, CFG["vocab_size"], (PROMPT_LEN,), generator=g, dtype=torch.int64)
        dec = torch.randint(0, CFG["vocab_size"], (DECODE_LEN,), generator=g, dtype=torch.int64)
        pre, decl, full = run(w, prompt, dec, positions, inject, iters, torch.float64)
        cache_err = max((pre - full[:PROMPT_LEN]).abs().max().item(), (decl - full[PROMPT_LEN:]).abs().max().item())
        pre32, dec32, _ = run(w, prompt, dec, positions, inject, iters, torch.float32)
        f32_err = max((pre - pre32.double()).abs().max().item(), (decl - dec32.double()).abs().max().item())
        print(f"ltg {name}: cache-vs-full (f64) {cache_err:.3e}  f32-vs-f64 {f32_err:.3e}  logit std {pre.std().item():.3f}")
        assert cache_err < 1e-9 and f32_err < 1e-4
        save_file({"prompt": prompt, "prefill_logits": pre.float().contiguous(), "decode_tokens": dec,
                   "decode_logits": decl.float().contiguous(),
                   "iterations": torch.tensor([iters]), "inject": torch.tensor([int(inject)]),
                   "positions": torch.tensor([{"none": 0, "learned": 1, "sinusoidal": 2}[positions]])},
                  os.path.join(d, f"{name}.safetensors"))


if __name__ == "__main__":
    main()
