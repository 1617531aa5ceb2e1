"""Parity fixtures for the Mixture-of-Recursions family (examples/mor.loop).

Writes tests/fixtures/mor_tiny/{config.json, <case>.safetensors}: each case file holds its
weights (the routing and sharing decide the tensor names) and the expected logits and per-token
recursion counts of a prefill and of cached decode steps. Computed in float64, stored float32;
checks f32 against f64. Deterministic: rerunning gives identical files.

  /work/torchvenv/bin/python tools/reference/gen_mor_fixtures.py
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

import morref as M

CFG = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
       "head_dim": 8, "intermediate_size": 32, "vocab_size": 128, "num_hidden_layers": 8,
       "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "num_recursion": 3, "sharing": 2,
       "mor_router": 1, "mor_alpha": 0.1, "kv_sharing": 0}
# (name, routing, sharing, alpha, decode threshold: None = the reference's top-k decode,
#  kv_sharing: 0 recursion-wise caching, 1 recursive sharing)
CASES = [("vanilla_middle_cycle", 0, 2, 0.1, None, 0),
         ("expert_middle_cycle", 1, 2, 0.1, None, 0),
         ("expert_middle_cycle_thr", 1, 2, 0.1, 0.4, 0),
         ("expert_middle_sequence", 1, 3, 0.1, None, 0),
         ("token_middle_cycle", 2, 2, 1.0, None, 0),
         ("token_cycle", 2, 0, 1.0, None, 0),
         ("expert_middle_cycle_kvshare", 1, 2, 0.1, None, 1),
         ("token_middle_cycle_kvshare", 2, 2, 1.0, None, 1)]
SEED = 777
PROMPT_LEN, DECODE_LEN = 6, 4


def run(cfg, w, prompt, dec, thr, dtype):
    wd = {k: v.to(dtype) for k, v in w.items()}
    caches = M.new_caches(cfg)
    pre, pre_d = M.forward(wd, cfg, prompt, 0, caches, thr)
    outs, ds = [], []
    for n in range(DECODE_LEN):
        o, d = M.forward(wd, cfg, dec[n:n + 1], PROMPT_LEN + n, caches, thr)
        outs.append(o[0])
        ds.append(d[0])
    return pre, pre_d, torch.stack(outs), torch.stack(ds)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "fixtures"))
    d = os.path.join(os.path.normpath(ap.parse_args().out), "mor_tiny")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(CFG, f, indent=2)
        f.write("\n")
    for i, (name, routing, sharing, alpha, thr, kv) in enumerate(CASES):
        cfg = dict(CFG, mor_router=routing, sharing=sharing, mor_alpha=alpha, kv_sharing=kv)
        w = M.random_weights(cfg, SEED + i)
        g = torch.Generator().manual_seed(SEED + 100 + i)
        prompt = torch.randint(0, cfg["vocab_size"], (PROMPT_LEN,), generator=g, dtype=torch.int64)
        dec = torch.randint(0, cfg["vocab_size"], (DECODE_LEN,), generator=g, dtype=torch.int64)
        pre, pre_d, decl, dec_d = run(cfg, w, prompt, dec, thr, torch.float64)
        pre32, pre_d32, dec32, dec_d32 = run(cfg, w, prompt, dec, thr, torch.float32)
        f32_err = max((pre - pre32.double()).abs().max().item(), (decl - dec32.double()).abs().max().item())
        same = torch.equal(pre_d, pre_d32) and torch.equal(dec_d, dec_d32)
        print(f"mor {name}: f32-vs-f64 {f32_err:.3e}  prefill depths {pre_d.tolist()}  "
              f"decode depths {dec_d.tolist()}  logit std {pre.std().item():.3f}")
        assert f32_err < 1e-4 and same
        out = dict(w)
        out.update({"prompt": prompt, "prefill_logits": pre.float().contiguous(), "decode_tokens": dec,
                    "decode_logits": decl.float().contiguous(), "prefill_depths": pre_d,
                    "decode_depths": dec_d, "routing": torch.tensor([routing]),
                    "sharing": torch.tensor([sharing]), "kv_sharing": torch.tensor([kv]), "alpha": torch.tensor([alpha], dtype=torch.float32),
                    "threshold": torch.tensor([-1.0 if thr is None else thr], dtype=torch.float32)})
        save_file(out, os.path.join(d, f"{name}.safetensors"))


if __name__ == "__main__":
    main()
