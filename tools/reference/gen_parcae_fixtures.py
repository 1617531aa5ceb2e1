"""Parity fixtures for the Parcae family (examples/parcae.loop).

Writes tests/fixtures/parcae_tiny/{config.json, model.safetensors, <case>.safetensors}; computes in
float64, stores float32; checks cached decode against full recomputation and f32 against f64.
Deterministic: rerunning gives identical files.

The tiny config keeps the structure of the released ones and exercises what they leave
implicit: GQA in prelude/coda (the core never has it), a state narrower than the model
(recurrent_embedding_dimension 32 < n_embd 64, so B and C are not square), value embeddings in
a prelude, a core and a coda block.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

import loopref as R
import parcaeref as P

CFG = {
    "name": "parcae-tiny", "block_size": 64, "n_embd": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "padding_multiple": 64,
    "padded_vocab_size": 256,
    "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50000},
    "block_class_name": "TransformerPreNormBlock", "norm_class_name": "RMSNorm", "norm_eps": 1e-5,
    "mlp_class_name": "BaseMLP", "nonlin_name": "ReLU2", "bias": False, "qk_bias": False,
    "init_strategy": "scaled-zero", "clip_qkv": None, "qk_norm": True, "logit_softcap": None,
    "tie_embeddings": False, "injection_type": "diagonal", "n_layers_in_recurrent_block": 2,
    "n_layers_in_prelude": 2, "n_layers_in_coda": 2, "state_init": "zero",
    "recurrent_embedding_dimension": 32, "recurrent_intermediation_embedding_dimension": 64,
    "recurrent_num_attention_heads": 2, "prelude_norm": True, "mean_recurrence": 8,
    "mean_backprop_depth": 4, "architecture_class_name": "Parcae",
}
# (name, r, qk_norm, prelude_norm, tie_embeddings, logit_softcap)
CASES = [
    ("r1", 1, True, True, False, None),
    ("r4_softcap", 4, True, False, False, 3.0),
    ("r8_plain_tied", 8, False, True, True, None),
]
SEED = 2604
PROMPT_LEN, DECODE_LEN = 7, 4


def run(w, prompt, dec, r, flags, dtype):
    wd = R.cast_weights(w, dtype)
    cache = R.KVCache(PROMPT_LEN + DECODE_LEN)
    pre = P.parcae_forward(wd, CFG, prompt[None], r, flags, cache, 0)[0]
    outs = [P.parcae_forward(wd, CFG, dec[None, n:n + 1], r, flags, cache, PROMPT_LEN + n)[0, 0]
            for n in range(DECODE_LEN)]
    full = P.parcae_forward(wd, CFG, torch.cat([prompt, dec])[None], r, flags)[0]
    return pre, torch.stack(outs), full


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "fixtures"))
    d = os.path.join(os.path.normpath(ap.parse_args().out), "parcae_tiny")
    os.makedirs(d, exist_ok=True)
    w = P.parcae_random_weights(CFG, SEED)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(CFG, f, indent=2)
        f.write("\n")
    save_file(w, os.path.join(d, "model.safetensors"))
    for i, (name, r, qk_norm, prelude_norm, tie, cap) in enumerate(CASES):
        flags = {"qk_norm": qk_norm, "prelude_norm": prelude_norm, "tie_embeddings": tie,
                 "logit_softcap": cap}
        g = torch.Generator().manual_seed(SEED + 100 + i)
        prompt = torch.randint(0, CFG["vocab_size"], (PROMPT_LEN,), generator=g, dtype=torch.int64)
        dec = torch.randint(0, CFG["vocab_size"], (DECODE_LEN,), generator=g, dtype=torch.int64)
        pre, decl, full = run(w, prompt, dec, r, flags, torch.float64)
        cache_err = max((pre - full[:PROMPT_LEN]).abs().max().item(), (decl - full[PROMPT_LEN:]).abs().max().item())
        pre32, dec32, _ = run(w, prompt, dec, r, flags, torch.float32)
        f32_err = max((pre - pre32.double()).abs().max().item(), (decl - dec32.double()).abs().max().item())
        print(f"parcae {name}: cache-vs-full (f64) {cache_err:.3e}  f32-vs-f64 {f32_err:.3e}  "
              f"logit std {pre.std().item():.3f} max {pre.abs().max().item():.2f}")
        assert cache_err < 1e-9 and f32_err < 1e-4
        save_file({"prompt": prompt, "prefill_logits": pre.float().contiguous(), "decode_tokens": dec,
                   "decode_logits": decl.float().contiguous(), "steps": torch.tensor([r]),
                   "qk_norm": torch.tensor([int(qk_norm)]), "prelude_norm": torch.tensor([int(prelude_norm)]),
                   "tie_embeddings": torch.tensor([int(tie)]),
                   "logit_softcap": torch.tensor([0.0 if cap is None else cap], dtype=torch.float32)},
                  os.path.join(d, f"{name}.safetensors"))


if __name__ == "__main__":
    main()
