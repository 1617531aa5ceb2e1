"""Independent PyTorch reference for the Parcae family (sandyresearch/parcae, `Parcae.forward`).

Written from the semantics of the authors' model (families.md section 4.1 and a reading of
parcae_lm/models/parcae/parcae.py and parcae_lm/modules/{injection,mixer,basic,blocks,mlp}.py);
no upstream code is copied. Eval mode, `num_steps_pair = (r, 0)`, batch 1, no padding.

* e = wte(x)·emb_scale -> prelude blocks -> ln_prelude (if prelude_norm)
* h0 = 0 (state_init "zero"; "like-init" is random and has no parity)
* r times: h = core_blocks(h·exp(-softplus(dt_bias)·exp(A_log)) + softplus(dt_bias)·(e·Bᵀ))
* x = C(h) -> coda blocks -> ln_f -> lm_head(x)·logit_scale -> optional tanh softcap
* blocks: pre-norm RMSNorm, attention with interleaved RoPE, GQA, optional parameter-free q/k
  RMSNorm after RoPE (eps = f32 machine epsilon, torch's default), value embeddings
  v += 2σ(ve_gate·h[..., :32])·VE[token] where both the gate and the table exist;
  MLP proj(0.5·relu(fc(x))²)
* the core uses its own width (recurrent_embedding_dimension), heads and no GQA.

KV cache slots: prelude layer i -> i; core layer j at iteration t -> P + t·C + j;
coda layer i -> P + r·C + i.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from loopref import KVCache, Weights, attend

Tensor = torch.Tensor
VE_GATE_CHANNELS = 32


def rms(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def has_ve(layer_idx: int, n_layer: int) -> bool:
    return layer_idx % 2 == (n_layer - 1) % 2


def rope(x: Tensor, start: int, base: float) -> Tensor:
    """x [B, S, H, hd]; pairs (x[2i], x[2i+1]) rotated by pos·base^(-2i/hd)."""
    hd = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    pos = torch.arange(start, start + x.shape[1], dtype=torch.float64)
    ang = torch.outer(pos, inv)
    cos, sin = ang.cos().to(x.dtype)[None, :, None], ang.sin().to(x.dtype)[None, :, None]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


class Dims:
    def __init__(self, cfg: dict, core: bool):
        self.width = cfg["recurrent_embedding_dimension"] if core else cfg["n_embd"]
        self.heads = (cfg.get("recurrent_num_attention_heads") or cfg["num_attention_heads"]) if core \
            else cfg["num_attention_heads"]
        self.kv_heads = self.heads if core else (cfg.get("num_key_value_heads") or self.heads)
        self.hd = self.width // self.heads
        self.ffn = cfg["recurrent_intermediation_embedding_dimension"] if core else cfg["intermediate_size"]


def block(w: Weights, p: str, x: Tensor, d: Dims, cfg: dict, flags: dict, ve: Optional[Tensor],
          cache: Optional[KVCache], slot: int, start: int) -> Tensor:
    B, S, _ = x.shape
    eps = cfg["norm_eps"]
    h = rms(x, w[p + "norm_1.weight"], eps)
    q = F.linear(h, w[p + "attn.c_q.weight"]).view(B, S, d.heads, d.hd)
    k = F.linear(h, w[p + "attn.c_k.weight"]).view(B, S, d.kv_heads, d.hd)
    v = F.linear(h, w[p + "attn.c_v.weight"]).view(B, S, d.kv_heads, d.hd)
    gate_w = w.get(p + "attn.ve_gate.weight")
    if ve is not None and gate_w is not None:
        gate = 2 * torch.sigmoid(F.linear(h[..., :VE_GATE_CHANNELS], gate_w))
        v = v + gate.unsqueeze(-1) * ve.view(B, S, d.kv_heads, d.hd)
    base = float(cfg["rope_settings"]["rope_base"])
    q, k = rope(q, start, base), rope(k, start, base)
    if flags["qk_norm"]:
        q = rms(q, None, torch.finfo(torch.float32).eps)
        k = rms(k, None, torch.finfo(torch.float32).eps)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if cache is not None:
        k, v = cache.update(slot, k, v, start)
    y = attend(q, k, v, start, 1.0 / math.sqrt(d.hd)).transpose(1, 2).reshape(B, S, d.width)
    x = x + F.linear(y, w[p + "attn.c_proj.weight"])
    m = torch.relu(F.linear(rms(x, w[p + "norm_2.weight"], eps), w[p + "mlp.fc.weight"]))
    return x + F.linear(m.pow(2) * 0.5, w[p + "mlp.proj.weight"])


def layer_ids(cfg: dict):
    """(attention layer_id, value-embedding index) of every prelude, core and coda block."""
    P, C, D = (cfg["n_layers_in_prelude"], cfg["n_layers_in_recurrent_block"], cfg["n_layers_in_coda"])
    o = P + C * cfg["mean_recurrence"]
    return ([(i, i) for i in range(P)], [(P + j, P + j) for j in range(C)],
            [(o + i, P + C + i) for i in range(D)])


def value_embed(w: Weights, cfg: dict, ids: Tensor, lid: int, vid: int) -> Optional[Tensor]:
    n_layer = cfg["n_layers_in_recurrent_block"] * cfg["mean_backprop_depth"]
    n_eff = cfg["n_layers_in_prelude"] + cfg["n_layers_in_recurrent_block"] + cfg["n_layers_in_coda"]
    if not (has_ve(lid, n_layer) and has_ve(vid, n_eff)):
        return None
    return F.embedding(ids, w[f"value_embeds.{vid}.weight"])


def parcae_forward(w: Weights, cfg: dict, ids: Tensor, r: int, flags: dict,
                   cache: Optional[KVCache] = None, start: int = 0) -> Tensor:
    """Logits [B, S, V] for tokens at positions start..start+S-1; `flags` holds qk_norm,
    prelude_norm, tie_embeddings, logit_softcap (None for none)."""
    P, C = cfg["n_layers_in_prelude"], cfg["n_layers_in_recurrent_block"]
    outer, core = Dims(cfg, False), Dims(cfg, True)
    pre_ids, core_ids, coda_ids = layer_ids(cfg)
    x = F.embedding(ids, w["transformer.wte.weight"])  # emb_scale = 1 under scaled-zero
    for i, (lid, vid) in enumerate(pre_ids):
        x = block(w, f"transformer.prelude.{i}.", x, outer, cfg, flags,
                  value_embed(w, cfg, ids, lid, vid), cache, i, start)
    if flags["prelude_norm"]:
        x = rms(x, w["transformer.ln_prelude.weight"], cfg["norm_eps"])
    e = x
    dt = F.softplus(w["transformer.adapter.dt_bias"])
    decay = torch.exp(-dt * torch.exp(w["transformer.adapter.A_log"]))
    h = e.new_zeros(*e.shape[:-1], core.width)
    core_ve = [value_embed(w, cfg, ids, lid, vid) for lid, vid in core_ids]
    for t in range(r):
        h = h * decay + dt * (e @ w["transformer.adapter.B"].T)
        for j in range(C):
            h = block(w, f"transformer.core_block.{j}.", h, core, cfg, flags, core_ve[j], cache,
                      P + t * C + j, start)
    x = F.linear(h, w["transformer.C.weight"])
    for i, (lid, vid) in enumerate(coda_ids):
        x = block(w, f"transformer.coda.{i}.", x, outer, cfg, flags,
                  value_embed(w, cfg, ids, lid, vid), cache, P + r * C + i, start)
    x = rms(x, w["transformer.ln_f.weight"], cfg["norm_eps"])
    head = w["transformer.wte.weight"] if flags["tie_embeddings"] else w["lm_head.weight"]
    logits = F.linear(x, head)  # logit_scale = 1 under scaled-zero
    cap = flags["logit_softcap"]
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return logits


def parcae_random_weights(cfg: dict, seed: int) -> Weights:
    """Every tensor random (the authors' scaled-zero init would zero the output projections and
    make the blocks identities)."""
    g = torch.Generator().manual_seed(seed)
    V = cfg["padded_vocab_size"]
    E = cfg["n_embd"]

    def lin(o, i, gain=1.0):
        return gain * torch.randn(o, i, generator=g) / math.sqrt(i)

    def gain(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    outer, core = Dims(cfg, False), Dims(cfg, True)
    ds = core.width
    target = math.sqrt(1.0 / 5.0)
    dt0 = -math.log(target)
    w: Weights = {
        "transformer.wte.weight": 0.5 * torch.randn(V, E, generator=g),
        "transformer.ln_f.weight": gain(E),
        "transformer.ln_prelude.weight": gain(E),
        "transformer.adapter.A_log": 0.3 * torch.randn(ds, generator=g),
        # Around the authors' init (decay √(1/5)), spread so each channel decays differently.
        "transformer.adapter.dt_bias": dt0 + math.log(-math.expm1(-dt0)) + 0.5 * torch.randn(ds, generator=g),
        "transformer.adapter.B": lin(ds, E),
        "transformer.C.weight": lin(E, ds),
        "lm_head.weight": lin(V, E, 2.0),
    }
    pre_ids, core_ids, coda_ids = layer_ids(cfg)
    n_layer = cfg["n_layers_in_recurrent_block"] * cfg["mean_backprop_depth"]
    n_eff = len(pre_ids) + len(core_ids) + len(coda_ids)
    for kind, d, ids in (("prelude", outer, pre_ids), ("core_block", core, core_ids), ("coda", outer, coda_ids)):
        for i, (lid, vid) in enumerate(ids):
            p = f"transformer.{kind}.{i}."
            w[p + "norm_1.weight"] = gain(d.width)
            w[p + "norm_2.weight"] = gain(d.width)
            w[p + "attn.c_q.weight"] = lin(d.width, d.width)
            w[p + "attn.c_k.weight"] = lin(d.kv_heads * d.hd, d.width)
            w[p + "attn.c_v.weight"] = lin(d.kv_heads * d.hd, d.width)
            w[p + "attn.c_proj.weight"] = lin(d.width, d.width, 0.5)
            w[p + "mlp.fc.weight"] = lin(d.ffn, d.width)
            w[p + "mlp.proj.weight"] = lin(d.width, d.ffn, 0.5)
            if has_ve(lid, n_layer):
                w[p + "attn.ve_gate.weight"] = lin(d.kv_heads, VE_GATE_CHANNELS)
    for vid in range(n_eff):
        if has_ve(vid, n_eff):
            w[f"value_embeds.{vid}.weight"] = 0.5 * torch.randn(V, outer.kv_heads * outer.hd, generator=g)
    return w
