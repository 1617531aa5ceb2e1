"""Independent PyTorch reference for the Loop-Think-Generalize family (looped GPT-2 blocks).

Written from the semantics of `RecurrentGPT2Block` (OSU-NLP-Group/Loop-Think-Generalize) and HF
GPT2Block as summarised in shared/reference/families.md section 4.2; no upstream code is copied.

* n_layer GPT-2 blocks (pre-LayerNorm, Conv1D projections stored [in, out] with biases,
  tanh-approximated GELU) looped `iters` times;
* optional additive injection `h += e` at the start of every iteration after the first;
* positional embedding: "learned" (position_embedding.weight), "sinusoidal" or "none";
* ln_f and a head tied to token_embedding.weight.

KV cache slots: iteration i, layer l -> i * n_layer + l.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from loopref import KVCache, Weights, attend

Tensor = torch.Tensor


def gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def conv1d(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return x @ w + b


def sinusoidal_table(n_pos: int, dim: int, dtype) -> Tensor:
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n_pos, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe.to(dtype)


def gpt2_block(w: Weights, p: str, x: Tensor, cfg: dict, cache: Optional[KVCache], slot: int,
               start: int) -> Tensor:
    E, H = cfg["n_embd"], cfg["n_head"]
    hd = E // H
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    B, S, _ = x.shape
    h = F.layer_norm(x, (E,), w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
    qkv = conv1d(h, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"])
    q, k, v = qkv.split(E, dim=-1)
    q, k, v = (t.view(B, S, H, hd).transpose(1, 2) for t in (q, k, v))
    if cache is not None:
        k, v = cache.update(slot, k, v, start)
    y = attend(q, k, v, start, 1.0 / math.sqrt(hd)).transpose(1, 2).reshape(B, S, E)
    x = x + conv1d(y, w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"])
    h = F.layer_norm(x, (E,), w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
    m = gelu_tanh(conv1d(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"]))
    return x + conv1d(m, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])


def ltg_forward(w: Weights, cfg: dict, ids: Tensor, iters: int, inject: bool, positions: str,
                cache: Optional[KVCache] = None, start: int = 0) -> Tensor:
    """Logits [B, S, V] for tokens at absolute positions start..start+S-1."""
    E, L = cfg["n_embd"], cfg["n_layer"]
    wte = w["token_embedding.weight"]
    S = ids.shape[1]
    e = F.embedding(ids, wte)
    if positions == "learned":
        e = e + w["position_embedding.weight"][start:start + S]
    elif positions == "sinusoidal":
        e = e + sinusoidal_table(start + S, E, wte.dtype)[start:start + S]
    elif positions != "none":
        raise ValueError(positions)
    h = e
    for i in range(iters):
        if inject and i > 0:
            h = h + e
        for l in range(L):
            h = gpt2_block(w, f"blocks.{l}.", h, cfg, cache, i * L + l, start)
    h = F.layer_norm(h, (E,), w["ln_f.weight"], w["ln_f.bias"], cfg.get("layer_norm_epsilon", 1e-5))
    return F.linear(h, wte)


def ltg_random_weights(cfg: dict, seed: int) -> Weights:
    g = torch.Generator().manual_seed(seed)
    E, L, V = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"]
    I = cfg.get("n_inner") or 4 * E

    def conv(i, o):
        return torch.randn(i, o, generator=g) / math.sqrt(i)

    def vec(n, scale=0.1):
        return scale * torch.randn(n, generator=g)

    w: Weights = {
        "token_embedding.weight": torch.randn(V, E, generator=g) / math.sqrt(E) * 4,
        "position_embedding.weight": 0.3 * torch.randn(cfg["n_positions"], E, generator=g),
        "ln_f.weight": 1.0 + vec(E),
        "ln_f.bias": vec(E),
    }
    for l in range(L):
        p = f"blocks.{l}."
        w[p + "ln_1.weight"] = 1.0 + vec(E)
        w[p + "ln_1.bias"] = vec(E)
        w[p + "attn.c_attn.weight"] = conv(E, 3 * E)
        w[p + "attn.c_attn.bias"] = vec(3 * E)
        w[p + "attn.c_proj.weight"] = conv(E, E)
        w[p + "attn.c_proj.bias"] = vec(E)
        w[p + "ln_2.weight"] = 1.0 + vec(E)
        w[p + "ln_2.bias"] = vec(E)
        w[p + "mlp.c_fc.weight"] = conv(E, I)
        w[p + "mlp.c_fc.bias"] = vec(I)
        w[p + "mlp.c_proj.weight"] = conv(I, E)
        w[p + "mlp.c_proj.bias"] = vec(E)
    # The tied head is stored too, as torch.save of the module does.
    w["lm_head.weight"] = w["token_embedding.weight"].clone()
    return w
