"""Time the PyTorch Huginn reference (prefill + KV-cached greedy decode) on a Huginn-style config.

    # write random weights (checkpoint names, config stored in safetensors metadata) and exit
    python tools/reference/bench_ref.py --make-weights /work/bench_d1024.safetensors
    # benchmark them
    python tools/reference/bench_ref.py --weights /work/bench_d1024.safetensors --reps 3

Prints one JSON line with medians over --reps repetitions (after one untimed warm-up rep).
Prefill: --prompt-len tokens in one forward, logits for the last position only.
Decode:  --new-tokens greedy steps, one token per forward, attending to the KV cache
         (full strategy: one slot per prelude layer, per (iteration, core layer), per coda layer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loopref as R  # noqa: E402

DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}


def config_from_args(a) -> dict:
    return {
        "model_type": "huginn_raven",
        "n_embd": a.d,
        "n_heads": a.heads,
        "intermediate_size": a.ffn,
        "vocab_size": a.vocab,
        "n_layers_in_prelude": a.prelude,
        "n_layers_in_recurrent_block": a.core,
        "n_layers_in_coda": a.coda,
        "block_size": a.block_size,
        "rope_base": 50000,
        "norm_eps": 1e-6,
        "mean_recurrence": a.r,
        "tie_embeddings": True,
        "qk_bias": True,
        "bias": False,
        "state_init": "like-init",
        "injection_type": "linear",
    }


def config_from_weights(path: str, a) -> dict:
    """Config from safetensors metadata if present, else inferred from tensor shapes."""
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if "config" in meta:
            return json.loads(meta["config"])
        keys = list(f.keys())
        cfg = config_from_args(a)
        V, E = f.get_slice("transformer.wte.weight").get_shape()
        cfg.update(n_embd=E, vocab_size=V)
        cfg["intermediate_size"] = f.get_slice("transformer.prelude.0.mlp.fc.weight").get_shape()[0] // 2
        for grp, field in (("prelude", "n_layers_in_prelude"),
                           ("core_block", "n_layers_in_recurrent_block"),
                           ("coda", "n_layers_in_coda")):
            cfg[field] = len({k.split(".")[2] for k in keys if k.startswith(f"transformer.{grp}.")})
        qkb = "transformer.prelude.0.attn.qk_bias"
        if qkb in keys:
            cfg["n_heads"] = f.get_slice(qkb).get_shape()[2]
        else:
            cfg["qk_bias"] = False
        if "freqs_cis" in keys:
            cfg["block_size"] = f.get_slice("freqs_cis").get_shape()[1]
        return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--prelude", type=int, default=2)
    ap.add_argument("--core", type=int, default=4)
    ap.add_argument("--coda", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--r", type=int, default=8, help="recurrence steps")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="wrap the forward in torch.compile(dynamic=True)")
    ap.add_argument("--weights", help="safetensors file with Huginn checkpoint names")
    ap.add_argument("--make-weights", metavar="FILE", help="write random weights for the config and exit")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)

    if a.make_weights:
        cfg = config_from_args(a)
        w = R.huginn_random_weights(cfg, a.seed)
        nbytes = sum(t.numel() * t.element_size() for t in w.values())
        save_file(w, a.make_weights, metadata={"config": json.dumps(cfg)})
        print(json.dumps({"wrote": a.make_weights, "bytes": nbytes,
                          "params": sum(t.numel() for k, t in w.items() if k != "freqs_cis"),
                          "config": cfg}))
        return

    if a.weights:
        cfg = config_from_weights(a.weights, a)
        w = load_file(a.weights)
    else:
        cfg = config_from_args(a)
        w = R.huginn_random_weights(cfg, a.seed)
    cfg["mean_recurrence"] = a.r
    dtype = DTYPES[a.dtype]
    w = R.cast_weights(w, dtype)
    w.pop("freqs_cis", None)
    total = a.prompt_len + a.new_tokens
    if total > cfg["block_size"]:
        cfg["block_size"] = total
    rope = R.huginn_rope_table(cfg, dtype)

    fwd = R.huginn_forward
    if a.compile:
        fwd = torch.compile(R.huginn_forward, dynamic=True)

    g = torch.Generator().manual_seed(a.seed + 1)
    prompt = torch.randint(0, cfg["vocab_size"], (1, a.prompt_len), generator=g)

    def one_rep():
        cache = R.KVCache(total)
        t0 = time.perf_counter()
        logits = fwd(w, cfg, prompt, a.r, cache=cache, start=0, rope=rope, last_only=True)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for n in range(a.new_tokens):
            logits = fwd(w, cfg, tok, a.r, cache=cache, start=a.prompt_len + n, rope=rope,
                         last_only=True)
            tok = logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    with torch.inference_mode():
        one_rep()  # warm-up (and compilation with --compile)
        times = [one_rep() for _ in range(a.reps)]
    pre = statistics.median(t[0] for t in times)
    dec = statistics.median(t[1] for t in times)
    print(json.dumps({
        "impl": "pytorch-" + ("compile" if a.compile else "eager"),
        "torch": torch.__version__,
        "config": {k: cfg[k] for k in ("n_embd", "n_heads", "intermediate_size", "vocab_size",
                                       "n_layers_in_prelude", "n_layers_in_recurrent_block",
                                       "n_layers_in_coda")},
        "r": a.r, "dtype": a.dtype, "threads": a.threads,
        "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "reps": a.reps,
        "prefill_s": round(pre, 4), "decode_s": round(dec, 4),
        "prefill_tok_s": round(a.prompt_len / pre, 2),
        "decode_tok_s": round(a.new_tokens / dec, 2),
        "kv_slots": R.huginn_num_slots(cfg, a.r),
    }))


if __name__ == "__main__":
    main()
