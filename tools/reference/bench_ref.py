"""Time the PyTorch reference (prefill + KV-cached greedy decode) on a Huginn- or Ouro-style config,
or measure this machine's ceilings as PyTorch sees them.

    # write random weights (checkpoint names, config stored in safetensors metadata) and exit
    python tools/reference/bench_ref.py --make-weights /work/bench_d1024.safetensors
    python tools/reference/bench_ref.py --make-weights /work/bench_d256.safetensors --config bench/huginn_d256.json
    python tools/reference/bench_ref.py --make-weights /work/bench_ouro.safetensors --config bench/ouro_d1024.json
    # benchmark them (the family and config come from the file's metadata)
    python tools/reference/bench_ref.py --weights /work/bench_d1024.safetensors --reps 3 [--batch 8] [--dtype bf16]
    # GEMM (f32, bf16), GEMV and memory bandwidth ceilings
    python tools/reference/bench_ref.py --ceilings

Prints one JSON line with medians over --reps repetitions (after an untimed warm-up: a prefill and
two decode steps; with --compile a whole repetition, including the compilation: `warmup_s`).
Prefill: --batch sequences of --prompt-len random tokens in one forward, logits for the last
         position only; prefill_tok_s = batch·prompt_len / time.
Decode:  --new-tokens greedy steps, one token per sequence per forward, attending to the KV cache
         (Huginn: one slot per prelude layer, per (iteration, core layer), per coda layer; Ouro:
         one per (loop, layer)); decode_tok_s = batch·new_tokens / time.
`--r` is Huginn's recurrence steps or Ouro's loop count T.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
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
    """Config from safetensors metadata if present, else inferred from tensor shapes (Huginn)."""
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


def is_ouro(cfg: dict) -> bool:
    return cfg.get("model_type") == "ouro"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def best_time(f, min_reps=3, min_s=0.5) -> float:
    f()
    best, n, t0 = float("inf"), 0, time.perf_counter()
    while n < min_reps or time.perf_counter() - t0 < min_s:
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
        n += 1
    return best


def ceilings(threads: int) -> dict:
    """GEMM GFLOP/s (F.linear, f32 and bf16), GEMV GB/s of weight bytes, read (sum) and copy GB/s."""
    out = {"impl": "pytorch", "torch": torch.__version__, "threads": threads}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            res = {}
            for m, k, n in ((128, 1024, 1024), (512, 1024, 1024), (1024, 1024, 1024)):
                x = torch.randn(m, k, generator=g).to(dt)
                w = torch.randn(n, k, generator=g).to(dt)
                s = best_time(lambda: F.linear(x, w))
                res[f"{m}x{k}x{n}"] = round(2 * m * k * n / s / 1e9, 1)
            out[f"gemm_{name}_gflops"] = res
            x = torch.randn(1, 4096, generator=g).to(dt)
            w = torch.randn(4096, 4096, generator=g).to(dt)
            s = best_time(lambda: F.linear(x, w), 5)
            out[f"gemv_{name}_gbs"] = {"1x4096x4096": round(w.numel() * w.element_size() / s / 1e9, 1)}
        read, copy = {}, {}
        for mib in (2, 64, 512):
            nbytes = mib << 20
            v = torch.randn(nbytes // 4, generator=g)
            s = best_time(lambda: v.sum(), 5, 0.3)
            read[f"{mib}MiB"] = round(nbytes / s / 1e9, 1)
            del v
            src = torch.randn(nbytes // 8, generator=g)
            dst = torch.empty_like(src)
            s = best_time(lambda: dst.copy_(src), 5, 0.3)
            copy[f"{mib}MiB"] = round(nbytes / s / 1e9, 1)  # read + write, as STREAM counts
            del src, dst
        out["read_gbs"], out["copy_gbs"] = read, copy
    out["peak_rss_mb"] = round(peak_rss_mb())
    return out


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
    ap.add_argument("--config", help="with --make-weights: a config.json (Huginn fields over the "
                    "--d/--heads/... defaults, or an Ouro config with model_type \"ouro\")")
    ap.add_argument("--r", type=int, default=8, help="recurrence steps (Huginn) / loops T (Ouro)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device for the benchmark (cpu, cuda)")
    ap.add_argument("--batch", type=int, default=1, help="sequences prefilled and decoded together")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="wrap the forward in torch.compile(dynamic=True)")
    ap.add_argument("--ceilings", action="store_true", help="measure GEMM/GEMV/bandwidth ceilings and exit")
    ap.add_argument("--weights", help="safetensors file with Huginn or Ouro checkpoint names")
    ap.add_argument("--make-weights", metavar="FILE", help="write random weights for the config and exit")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)

    if a.ceilings:
        print(json.dumps(ceilings(a.threads)))
        return

    if a.make_weights:
        cfg = config_from_args(a)
        if a.config:
            with open(a.config) as f:
                user = json.load(f)
            cfg = user if is_ouro(user) else {**cfg, **user}
        w = (R.ouro_random_weights if is_ouro(cfg) else R.huginn_random_weights)(cfg, a.seed)
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
    ouro = is_ouro(cfg)
    dtype = DTYPES[a.dtype]
    w = R.cast_weights(w, dtype)
    w.pop("freqs_cis", None)
    dev = torch.device(a.device)
    w = {k: v.to(dev) for k, v in w.items()}
    total = a.prompt_len + a.new_tokens
    if ouro:
        cfg["total_ut_steps"] = a.r
        rope = R.ouro_rope_table(cfg, total, dtype)
        rope = tuple(t.to(dev) for t in rope) if isinstance(rope, tuple) else rope.to(dev)

        def forward(ids, cache, start):
            return R.ouro_forward(w, cfg, ids, a.r, cache=cache, start=start, rope=rope,
                                  last_only=True)["logits"]
    else:
        cfg["mean_recurrence"] = a.r
        if total > cfg["block_size"]:
            cfg["block_size"] = total
        rope = R.huginn_rope_table(cfg, dtype).to(dev)

        def forward(ids, cache, start):
            return R.huginn_forward(w, cfg, ids, a.r, cache=cache, start=start, rope=rope,
                                    last_only=True)

    fwd = torch.compile(forward, dynamic=True) if a.compile else forward

    g = torch.Generator().manual_seed(a.seed + 1)
    prompt = torch.randint(0, cfg["vocab_size"], (a.batch, a.prompt_len), generator=g).to(dev)
    # Device work is asynchronous: wait for it before reading a clock.
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def one_rep(new_tokens=a.new_tokens):
        cache = R.KVCache(total)
        sync()
        t0 = time.perf_counter()
        logits = fwd(prompt, cache, 0)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t1 = time.perf_counter()
        for n in range(new_tokens):
            logits = fwd(tok, cache, a.prompt_len + n)
            tok = logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, cache.num_slots()

    with torch.inference_mode():
        t = time.perf_counter()
        # warm-up: a prefill and two steps (eager), a whole repetition with --compile (which
        # compiles, and may recompile for the first few positions)
        one_rep(a.new_tokens if a.compile else min(a.new_tokens, 2))
        warmup = time.perf_counter() - t
        times = [one_rep() for _ in range(a.reps)]
    pre = statistics.median(t[0] for t in times)
    dec = statistics.median(t[1] for t in times)
    keys = (("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "vocab_size", "num_hidden_layers") if ouro else
            ("n_embd", "n_heads", "intermediate_size", "vocab_size", "n_layers_in_prelude",
             "n_layers_in_recurrent_block", "n_layers_in_coda"))
    print(json.dumps({
        "impl": "pytorch-" + ("compile" if a.compile else "eager"),
        "torch": torch.__version__,
        "family": "ouro" if ouro else "huginn",
        "config": {k: cfg.get(k) for k in keys},
        "r": a.r, "dtype": a.dtype, "threads": a.threads, "batch": a.batch, "device": a.device,
        "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "reps": a.reps,
        "warmup_s": round(warmup, 2),
        "prefill_s": round(pre, 4), "decode_s": round(dec, 4),
        "prefill_tok_s": round(a.batch * a.prompt_len / pre, 2),
        "decode_tok_s": round(a.batch * a.new_tokens / dec, 2) if a.new_tokens else 0.0,
        "kv_slots": times[-1][2],
        "peak_rss_mb": round(peak_rss_mb()),
    }))


if __name__ == "__main__":
    main()
