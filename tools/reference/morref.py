"""Mixture-of-Recursions reference (families.md §3), written for loopc's parity fixtures.

A plain-PyTorch re-implementation of the authors' `MoRLlamaForCausalLM` forward (commit 82c97f2
semantics): Llama layers (GQA, HF rotate_half RoPE, SwiGLU, RMSNorm), layers tied by a sharing
strategy over the unrolled depth, and the three routings:

* vanilla recursive model: every token runs every recursion;
* expert choice (`expert_choice_router.py`): before recursion r a per-recursion linear router
  scores the tokens still selected, g = sigmoid(z) * alpha, the top max(1, int(cap_r * S)) are
  kept (sorted back into position order), the block runs on them only (attention among the
  selected tokens, RoPE at their own positions) and x[sel] += g * block(x[sel]);
* token choice (`token_choice_router.py`): P = softmax(router(x)) * alpha once, d = argmax,
  tokens with d >= r run recursion r, a token ends as x + P[d] * state_d.

KV: recursion-wise caching (each unrolled layer caches only the tokens that ran it), which is
what the authors' per-layer `DynamicCache` does. Decode: the reference's top-k keeps every single
decoded token (top_k = max(1, int(cap * 1)) = 1); `decode_threshold` instead applies loopc's
documented adaptive rule (a token runs recursion r when sigmoid(z) >= threshold), so fixtures can
check both.
"""
from typing import Dict, List, Optional

import torch
from torch import Tensor

Weights = Dict[str, Tensor]


def dims(cfg):
    H = cfg["hidden_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", H // nh)
    return H, nh, nkv, hd


def layout(cfg):
    """(middle, base, canonical prefix of (r, j)) for the config's sharing and routing."""
    L, N = cfg["num_hidden_layers"], cfg["num_recursion"]
    sharing, routing = cfg["sharing"], cfg["mor_router"]
    middle = sharing // 2
    base = (L - 2 * middle) // N

    def prefix(r, j):
        u = j + r * base
        u0 = (u // N) * N if sharing % 2 == 1 else j
        r0, j0 = u0 // base, u0 % base
        if routing == 0:
            return f"model.layers.{middle + u0}"
        if routing == 1:
            return f"model.layers.{middle + r0}.block.{j0}"
        return f"model.layers.{middle}.block_list.{r0}.{j0}"

    if routing == 1:
        last = N + 1
    elif routing == 2:
        last = 2
    else:
        last = L - 1
    return middle, base, prefix, last


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_cos_sin(cfg, pos: Tensor, dtype):
    _, _, _, hd = dims(cfg)
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    f = pos.double()[:, None] * inv[None]
    emb = torch.cat([f, f], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class LayerCache:
    """One unrolled layer's cache: K/V and positions of the tokens that ran it."""

    def __init__(self):
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None
        self.pos: Optional[Tensor] = None

    def add(self, k, v, pos, write=True):
        # Recursive KV sharing: a later recursion reads the first one's entries and writes none.
        if not write:
            return self.k, self.v, self.pos
        if self.k is None:
            self.k, self.v, self.pos = k, v, pos
        else:
            self.k = torch.cat([self.k, k])
            self.v = torch.cat([self.v, v])
            self.pos = torch.cat([self.pos, pos])
        return self.k, self.v, self.pos


def llama_layer(w: Weights, p: str, x: Tensor, pos: Tensor, cfg, cache: LayerCache, write=True):
    """x: [T, H] tokens at absolute positions `pos` (increasing); causal over cached positions."""
    H, nh, nkv, hd = dims(cfg)
    eps = cfg["rms_norm_eps"]
    h = rms_norm(x, w[f"{p}.input_layernorm.weight"], eps)
    T = x.shape[0]
    q = (h @ w[f"{p}.self_attn.q_proj.weight"].T).view(T, nh, hd)
    k = (h @ w[f"{p}.self_attn.k_proj.weight"].T).view(T, nkv, hd)
    v = (h @ w[f"{p}.self_attn.v_proj.weight"].T).view(T, nkv, hd)
    cos, sin = rope_cos_sin(cfg, pos, x.dtype)
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    K, V, P = cache.add(k, v, pos, write)
    rep = nh // nkv
    K = K.repeat_interleave(rep, dim=1)
    V = V.repeat_interleave(rep, dim=1)
    s = torch.einsum("thd,khd->htk", q, K) / (hd ** 0.5)
    mask = P[None, :] > pos[:, None]
    s = s.masked_fill(mask[None], float("-inf"))
    a = torch.einsum("htk,khd->thd", s.softmax(-1), V).reshape(T, nh * hd)
    x = x + a @ w[f"{p}.self_attn.o_proj.weight"].T
    m = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], eps)
    g = torch.nn.functional.silu(m @ w[f"{p}.mlp.gate_proj.weight"].T)
    u = m @ w[f"{p}.mlp.up_proj.weight"].T
    return x + (g * u) @ w[f"{p}.mlp.down_proj.weight"].T


def new_caches(cfg) -> List[LayerCache]:
    return [LayerCache() for _ in range(cfg["num_hidden_layers"] + 2)]


def forward(w: Weights, cfg, ids: Tensor, pos0: int, caches: List[LayerCache],
            decode_threshold: Optional[float] = None):
    """Logits [S, V] and each token's recursion count for one call of S tokens at pos0.."""
    N = cfg["num_recursion"]
    routing, alpha = cfg["mor_router"], cfg["mor_alpha"]
    middle, base, prefix, last = layout(cfg)
    S = ids.shape[0]
    pos = torch.arange(pos0, pos0 + S)
    x = w["model.embed_tokens.weight"][ids]
    if middle:
        x = llama_layer(w, "model.layers.0", x, pos, cfg, caches[0])
    depth = torch.zeros(S, dtype=torch.int64)

    share = cfg.get("kv_sharing", 0) == 1

    def block(r, y, sel):
        if share:
            # The authors run the full sequence through the block and gather the selected rows
            # afterwards; every recursion attends to the first recursion's cache entries.
            full = x if routing != 2 else y_full[0]
            for j in range(base):
                full = llama_layer(w, prefix(r, j), full, pos, cfg, caches[middle + j], write=(r == 0))
            return full[sel]
        for j in range(base):
            y = llama_layer(w, prefix(r, j), y, pos[sel], cfg, caches[middle + j + r * base])
        return y

    y_full = [None]

    if routing == 0:
        for r in range(N):
            x = block(r, x, torch.arange(S))
        depth[:] = N
    elif routing == 1:
        sel = torch.arange(S)
        for r in range(N):
            xs = x[sel]
            z = xs @ w[f"model.layers.{middle + r}.mor_router.router.weight"].T
            g = torch.sigmoid(z) * alpha
            if S > 1 or decode_threshold is None:
                top_k = max(1, int(((N - r) / N) * S))
                gw, idx = torch.topk(g[:, 0], top_k, dim=0, sorted=False)
                # Sorted back into position order (causal order of the selected tokens).
                idx, order = torch.sort(idx)
                gw = gw[order]
            else:
                keep = torch.sigmoid(z)[:, 0] >= decode_threshold
                idx = torch.nonzero(keep)[:, 0]
                gw = g[idx, 0]
            sel = sel[idx]
            if sel.numel() == 0:
                break
            y = block(r, x[sel], sel)
            x = x.clone()
            x[sel] = x[sel] + gw[:, None] * y
            depth[sel] += 1
    else:
        z = x @ w[f"model.layers.{middle}.mor_router.router.weight"].T
        P = torch.softmax(z, dim=-1) * alpha
        d = P.argmax(dim=-1)
        wd = P.gather(1, d[:, None])[:, 0]
        state, final = x.clone(), x.clone()
        for r in range(N):
            act = torch.nonzero(d >= r)[:, 0]
            if act.numel() == 0:
                continue
            y_full[0] = state
            y = block(r, state[act], act)
            fin = d[act] == r
            final[act[fin]] = x[act[fin]] + wd[act[fin], None] * y[fin]
            state[act[~fin]] = y[~fin]
        x = final
        depth = d + 1
    x = llama_layer(w, f"model.layers.{last}", x, pos, cfg, caches[cfg["num_hidden_layers"] + 1]) \
        if middle else x
    x = rms_norm(x, w["model.norm.weight"], cfg["rms_norm_eps"])
    return x @ w["lm_head.weight"].T, depth


def random_weights(cfg, seed: int) -> Weights:
    """Every tensor the config's routing and sharing read, under its first (canonical) name."""
    H, nh, nkv, hd = dims(cfg)
    I, V, N = cfg["intermediate_size"], cfg["vocab_size"], cfg["num_recursion"]
    middle, base, prefix, last = layout(cfg)
    g = torch.Generator().manual_seed(seed)

    def lin(o, i):
        return torch.randn(o, i, generator=g, dtype=torch.float64) / (i ** 0.5)

    def gain():
        return 1.0 + 0.1 * torch.randn(H, generator=g, dtype=torch.float64)

    w: Weights = {"model.embed_tokens.weight": torch.randn(V, H, generator=g, dtype=torch.float64),
                  "model.norm.weight": gain(), "lm_head.weight": lin(V, H)}
    names = sorted({prefix(r, j) for r in range(N) for j in range(base)})
    if middle:
        names = ["model.layers.0"] + names + [f"model.layers.{last}"]
    for p in names:
        w[f"{p}.input_layernorm.weight"] = gain()
        w[f"{p}.post_attention_layernorm.weight"] = gain()
        w[f"{p}.self_attn.q_proj.weight"] = lin(nh * hd, H)
        w[f"{p}.self_attn.k_proj.weight"] = lin(nkv * hd, H)
        w[f"{p}.self_attn.v_proj.weight"] = lin(nkv * hd, H)
        w[f"{p}.self_attn.o_proj.weight"] = lin(H, nh * hd)
        w[f"{p}.mlp.gate_proj.weight"] = lin(I, H)
        w[f"{p}.mlp.up_proj.weight"] = lin(I, H)
        w[f"{p}.mlp.down_proj.weight"] = lin(H, I)
    if cfg["mor_router"] == 1:
        for r in range(N):
            w[f"model.layers.{middle + r}.mor_router.router.weight"] = 2.0 * lin(1, H)
    if cfg["mor_router"] == 2:
        w[f"model.layers.{middle}.mor_router.router.weight"] = 2.0 * lin(N, H)
    return {k: v.float().contiguous() for k, v in w.items()}
