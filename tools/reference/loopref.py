"""Independent PyTorch reference for two looped-transformer families.

* Huginn  (RavenForCausalLM semantics, seal-rg/recurrent-pretraining)
* Ouro    (OuroForCausalLM semantics, ByteDance/Ouro-*)

Written from the semantic description in shared/reference/families.md (sections 1 and 2);
no upstream code is copied.  Everything operates on a flat dict of tensors keyed by the
authors' checkpoint names, and on a config dict using the HF config field names.

All computations run in the dtype passed in (float64 or float32); weights are cast once
by `cast_weights`.  Batch dimension is supported but parity fixtures use batch 1.

KV cache: `KVCache` holds one (K, V) buffer per slot, preallocated to `max_len`.
  Huginn slots: prelude layer i -> i; core layer j at iteration it -> P + it*C + j;
                coda layer i -> P + r*C + i       (the upstream "full" strategy, renumbered)
  Ouro slots:   loop t, layer l -> t*L + l
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Weights = Dict[str, Tensor]


# ----------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------

def cast_weights(w: Weights, dtype: torch.dtype) -> Weights:
    """Cast every floating tensor to `dtype` (integer buffers are left alone)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in w.items()}


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # x * rsqrt(mean(x^2) + eps) * w  (computed in x's dtype; f32/f64 only here)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class KVCache:
    """Per-slot preallocated K/V buffers of shape [B, Hkv, max_len, hd]."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: Dict[int, Tensor] = {}
        self.v: Dict[int, Tensor] = {}
        self.len: Dict[int, int] = {}

    def update(self, slot: int, k: Tensor, v: Tensor, start: int):
        """Write k,v ([B,Hkv,S,hd]) at positions start..start+S-1 and return all K/V so far."""
        s = k.shape[2]
        if slot not in self.k:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[slot] = k.new_zeros(shape)
            self.v[slot] = v.new_zeros(shape)
            self.len[slot] = 0
        if start != self.len[slot]:
            raise ValueError(f"slot {slot}: write at {start} but cache holds {self.len[slot]}")
        if start + s > self.max_len:
            raise ValueError("KV cache overflow")
        self.k[slot][:, :, start:start + s] = k
        self.v[slot][:, :, start:start + s] = v
        self.len[slot] = start + s
        return self.k[slot][:, :, :start + s], self.v[slot][:, :, :start + s]

    def num_slots(self) -> int:
        return len(self.k)


def attend(q: Tensor, k: Tensor, v: Tensor, start: int, scale: float,
           kmask: Optional[Tensor] = None) -> Tensor:
    """q [B,H,S,hd] at absolute positions start..start+S-1; k,v [B,Hkv,start+S,hd].

    Causal, bottom-right aligned (query at position p sees keys 0..p).  GQA by repeat.
    `kmask` [start+S] (bool) drops keys whose position holds no entry (recursion-wise caches).
    """
    h, hkv = q.shape[1], k.shape[1]
    if hkv != h:
        rep = h // hkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    s, kv_len = q.shape[2], k.shape[2]
    if kmask is not None:
        qpos = torch.arange(start, start + s, device=q.device)[:, None]
        kpos = torch.arange(kv_len, device=q.device)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(kpos <= qpos) & kmask[None, :],
                                              scale=scale)
    if s == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if s == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    qpos = torch.arange(start, start + s, device=q.device)[:, None]
    kpos = torch.arange(kv_len, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=kpos <= qpos, scale=scale)


# ----------------------------------------------------------------------------------------
# Huginn
# ----------------------------------------------------------------------------------------

def huginn_dims(cfg: dict):
    E = cfg["n_embd"]
    H = cfg["n_heads"]
    return E, H, E // H


def huginn_rope_table(cfg: dict, dtype=torch.float32) -> Tensor:
    """(cos, sin) table [block_size, hd/2, 2] for interleaved RoPE, inv_freq_i = base^(-2i/hd)."""
    _, _, hd = huginn_dims(cfg)
    base = float(cfg.get("rope_base", 50000))
    i = torch.arange(0, hd, 2, dtype=torch.float64)
    inv_freq = 1.0 / (base ** (i / hd))
    t = torch.arange(cfg["block_size"], dtype=torch.float64)
    ang = torch.outer(t, inv_freq)
    return torch.stack([ang.cos(), ang.sin()], dim=-1).to(dtype)


def huginn_freqs_cis_buffer(cfg: dict) -> Tensor:
    """The persistent `freqs_cis` buffer as stored in the checkpoint: [1, block_size, 1, hd/2, 2] f32."""
    return huginn_rope_table(cfg, torch.float32)[None, :, None].contiguous()


def rope_interleaved(x: Tensor, cs: Tensor) -> Tensor:
    """x [B,S,H,hd]; cs [S, hd/2, 2]. Pairs (x[2i], x[2i+1]) -> (a cos - b sin, b cos + a sin)."""
    xs = x.unflatten(-1, (-1, 2))
    a, b = xs[..., 0], xs[..., 1]
    cos = cs[None, :, None, :, 0]
    sin = cs[None, :, None, :, 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


def huginn_attn(w: Weights, p: str, x: Tensor, cs: Tensor, H: int, hd: int,
                cache: Optional[KVCache], slot: int, start: int) -> Tensor:
    B, S, E = x.shape
    qkv = F.linear(x, w[p + "attn.Wqkv.weight"])
    q, k, v = qkv.split(E, dim=-1)
    q = q.view(B, S, H, hd)
    k = k.view(B, S, H, hd)
    v = v.view(B, S, H, hd)
    qkb = p + "attn.qk_bias"
    if qkb in w:  # [2,1,H,hd]: added before RoPE
        q = q + w[qkb][0]
        k = k + w[qkb][1]
    q = rope_interleaved(q, cs).transpose(1, 2)
    k = rope_interleaved(k, cs).transpose(1, 2)
    v = v.transpose(1, 2)
    kmask = None
    if cache is not None:
        k, v, *rest = cache.update(slot, k, v, start)
        kmask = rest[0] if rest else None
    y = attend(q, k, v, start, 1.0 / math.sqrt(hd), kmask)
    y = y.transpose(1, 2).reshape(B, S, E)
    return F.linear(y, w[p + "attn.proj.weight"])


def huginn_mlp(w: Weights, p: str, x: Tensor) -> Tensor:
    gate, up = F.linear(x, w[p + "mlp.fc.weight"]).chunk(2, dim=-1)  # gate rows first
    return F.linear(F.silu(gate) * up, w[p + "mlp.proj.weight"])


def huginn_block(w: Weights, p: str, x: Tensor, cs: Tensor, cfg: dict,
                 cache: Optional[KVCache], slot: int, start: int) -> Tensor:
    _, H, hd = huginn_dims(cfg)
    eps = cfg.get("norm_eps", 1e-6)
    x = rms_norm(x + huginn_attn(w, p, rms_norm(x, w[p + "norm_1.weight"], eps), cs, H, hd,
                                 cache, slot, start), w[p + "norm_2.weight"], eps)
    x = rms_norm(x + huginn_mlp(w, p, rms_norm(x, w[p + "norm_3.weight"], eps)),
                 w[p + "norm_4.weight"], eps)
    return x


def huginn_forward(w: Weights, cfg: dict, ids: Tensor, num_steps: int,
                   cache: Optional[KVCache] = None, start: int = 0,
                   rope: Optional[Tensor] = None, last_only: bool = False,
                   return_latent: bool = False):
    """Logits [B,S,V] (or [B,1,V] if last_only) for ids [B,S] at positions start..start+S-1.

    Zero initial state (init_scale = 0).  `rope` is a table from huginn_rope_table in the
    compute dtype (computed on the fly if None).
    """
    E, _, _ = huginn_dims(cfg)
    npre = cfg["n_layers_in_prelude"]
    ncore = cfg["n_layers_in_recurrent_block"]
    ncoda = cfg["n_layers_in_coda"]
    eps = cfg.get("norm_eps", 1e-6)
    wte = w["transformer.wte.weight"]
    dtype = wte.dtype
    if rope is None:
        rope = huginn_rope_table(cfg, dtype)
    S = ids.shape[1]
    cs = rope[start:start + S]

    e = F.embedding(ids, wte) * math.sqrt(E)
    slot = 0
    for i in range(npre):
        e = huginn_block(w, f"transformer.prelude.{i}.", e, cs, cfg, cache, slot, start)
        slot += 1
    s = torch.zeros_like(e)
    adapter = w["transformer.adapter.weight"]  # [E, 2E]: cols [0,E) state, [E,2E) embeds
    for _ in range(num_steps):
        s = F.linear(torch.cat([s, e], dim=-1), adapter)
        for j in range(ncore):
            s = huginn_block(w, f"transformer.core_block.{j}.", s, cs, cfg, cache, slot, start)
            slot += 1
    latent = s
    lnf = w["transformer.ln_f.weight"]
    h = rms_norm(s, lnf, eps)
    for i in range(ncoda):
        h = huginn_block(w, f"transformer.coda.{i}.", h, cs, cfg, cache, slot, start)
        slot += 1
    if last_only:
        h = h[:, -1:]
    h = rms_norm(h, lnf, eps)
    head = w.get("lm_head.weight", wte)
    logits = F.linear(h, head)
    if return_latent:
        return logits, latent
    return logits


def huginn_num_slots(cfg: dict, num_steps: int) -> int:
    return (cfg["n_layers_in_prelude"] + num_steps * cfg["n_layers_in_recurrent_block"]
            + cfg["n_layers_in_coda"])


def huginn_random_weights(cfg: dict, seed: int) -> Weights:
    """Random float32 weights under the Huginn checkpoint names (incl. lm_head copy and freqs_cis)."""
    g = torch.Generator().manual_seed(seed)
    E, H, hd = huginn_dims(cfg)
    I = cfg["intermediate_size"]
    V = cfg["vocab_size"]

    def lin(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    def gain():
        return 1.0 + 0.1 * torch.randn(E, generator=g)

    w: Weights = {}
    # embedding is multiplied by sqrt(E) in the forward pass -> unit-scale inputs
    w["transformer.wte.weight"] = torch.randn(V, E, generator=g) / math.sqrt(E)
    groups = [("prelude", cfg["n_layers_in_prelude"]),
              ("core_block", cfg["n_layers_in_recurrent_block"]),
              ("coda", cfg["n_layers_in_coda"])]
    for name, n in groups:
        for i in range(n):
            p = f"transformer.{name}.{i}."
            for k in range(1, 5):
                w[p + f"norm_{k}.weight"] = gain()
            w[p + "attn.Wqkv.weight"] = lin(3 * E, E)
            if cfg.get("qk_bias", True):
                w[p + "attn.qk_bias"] = 0.1 * torch.randn(2, 1, H, hd, generator=g)
            w[p + "attn.proj.weight"] = lin(E, E)
            w[p + "mlp.fc.weight"] = lin(2 * I, E)
            w[p + "mlp.proj.weight"] = lin(E, I)
    w["transformer.adapter.weight"] = lin(E, 2 * E)
    w["transformer.ln_f.weight"] = gain()
    w["lm_head.weight"] = w["transformer.wte.weight"].clone()  # HF checkpoint stores two copies
    w["freqs_cis"] = huginn_freqs_cis_buffer(cfg)
    return {k: v.contiguous() for k, v in w.items()}


# ----------------------------------------------------------------------------------------
# Ouro
# ----------------------------------------------------------------------------------------

def ouro_dims(cfg: dict):
    Hs = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim", Hs // nh)
    return Hs, nh, nkv, hd


def ouro_rope_table(cfg: dict, max_len: int, dtype) -> tuple:
    """HF rotate_half RoPE: cos/sin [max_len, hd] with emb = cat(freqs, freqs)."""
    _, _, _, hd = ouro_dims(cfg)
    theta = float(cfg.get("rope_theta", 1e6))
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def ouro_attn(w: Weights, p: str, x: Tensor, cos: Tensor, sin: Tensor, cfg: dict,
              cache: Optional[KVCache], slot: int, start: int) -> Tensor:
    B, S, _ = x.shape
    _, nh, nkv, hd = ouro_dims(cfg)
    q = F.linear(x, w[p + "self_attn.q_proj.weight"]).view(B, S, nh, hd).transpose(1, 2)
    k = F.linear(x, w[p + "self_attn.k_proj.weight"]).view(B, S, nkv, hd).transpose(1, 2)
    v = F.linear(x, w[p + "self_attn.v_proj.weight"]).view(B, S, nkv, hd).transpose(1, 2)
    c, s = cos[None, None], sin[None, None]
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    if cache is not None:
        k, v = cache.update(slot, k, v, start)
    y = attend(q, k, v, start, hd ** -0.5)
    y = y.transpose(1, 2).reshape(B, S, nh * hd)
    return F.linear(y, w[p + "self_attn.o_proj.weight"])


def ouro_mlp(w: Weights, p: str, x: Tensor) -> Tensor:
    g = F.linear(x, w[p + "mlp.gate_proj.weight"])
    u = F.linear(x, w[p + "mlp.up_proj.weight"])
    return F.linear(F.silu(g) * u, w[p + "mlp.down_proj.weight"])


def ouro_layer(w: Weights, l: int, h: Tensor, cos, sin, cfg: dict,
               cache: Optional[KVCache], slot: int, start: int) -> Tensor:
    p = f"model.layers.{l}."
    eps = cfg.get("rms_norm_eps", 1e-6)
    r = h
    h = rms_norm(h, w[p + "input_layernorm.weight"], eps)
    h = ouro_attn(w, p, h, cos, sin, cfg, cache, slot, start)
    h = rms_norm(h, w[p + "input_layernorm_2.weight"], eps)
    h = r + h
    r = h
    h = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
    h = ouro_mlp(w, p, h)
    h = rms_norm(h, w[p + "post_attention_layernorm_2.weight"], eps)
    return r + h


def exit_probs(gate_logits: Tensor) -> Tensor:
    """gate_logits [..., T] -> p [..., T]: p_t = l_t prod_{j<t}(1-l_j); p_{T-1} = remaining mass."""
    lam = torch.sigmoid(gate_logits)
    T = lam.shape[-1]
    surv = torch.ones_like(lam[..., 0])
    ps = []
    for t in range(T):
        if t < T - 1:
            ps.append(lam[..., t] * surv)
            surv = surv * (1 - lam[..., t])
        else:
            ps.append(surv)
    return torch.stack(ps, dim=-1)


def ouro_forward(w: Weights, cfg: dict, ids: Tensor, num_loops: Optional[int] = None,
                 cache: Optional[KVCache] = None, start: int = 0, rope=None,
                 last_only: bool = False):
    """Returns dict(logits [B,S,V], gate_logits [B,S,T], exit_probs [B,S,T], hidden [T,B,S,H]).

    logits = lm_head(h after the last loop) (the HF default path with threshold 1.0 differs only
    when the CDF reaches 1.0 before the last loop, which does not happen in exact arithmetic).
    """
    T = num_loops if num_loops is not None else cfg.get("total_ut_steps", 4)
    L = cfg["num_hidden_layers"]
    eps = cfg.get("rms_norm_eps", 1e-6)
    emb = w["model.embed_tokens.weight"]
    S = ids.shape[1]
    if rope is None:
        rope = ouro_rope_table(cfg, start + S, emb.dtype)
    cos, sin = rope[0][start:start + S], rope[1][start:start + S]

    h = F.embedding(ids, emb)  # no scale
    hs, gates = [], []
    gw, gb = w["model.early_exit_gate.weight"], w["model.early_exit_gate.bias"]
    for t in range(T):
        for l in range(L):
            h = ouro_layer(w, l, h, cos, sin, cfg, cache, t * L + l, start)
        h = rms_norm(h, w["model.norm.weight"], eps)  # every loop; fed back
        hs.append(h)
        gates.append((F.linear(h, gw) + gb)[..., 0])
    gate_logits = torch.stack(gates, dim=-1)
    hl = h[:, -1:] if last_only else h
    logits = F.linear(hl, w["lm_head.weight"])
    return {"logits": logits, "gate_logits": gate_logits,
            "exit_probs": exit_probs(gate_logits), "hidden": torch.stack(hs)}


def ouro_random_weights(cfg: dict, seed: int) -> Weights:
    g = torch.Generator().manual_seed(seed)
    Hs, nh, nkv, hd = ouro_dims(cfg)
    I = cfg["intermediate_size"]
    V = cfg["vocab_size"]

    def lin(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    def gain():
        return 1.0 + 0.1 * torch.randn(Hs, generator=g)

    w: Weights = {"model.embed_tokens.weight": 0.5 * torch.randn(V, Hs, generator=g)}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        w[p + "self_attn.q_proj.weight"] = lin(nh * hd, Hs)
        w[p + "self_attn.k_proj.weight"] = lin(nkv * hd, Hs)
        w[p + "self_attn.v_proj.weight"] = lin(nkv * hd, Hs)
        w[p + "self_attn.o_proj.weight"] = lin(Hs, nh * hd)
        w[p + "mlp.gate_proj.weight"] = lin(I, Hs)
        w[p + "mlp.up_proj.weight"] = lin(I, Hs)
        w[p + "mlp.down_proj.weight"] = lin(Hs, I)
        for n in ("input_layernorm", "input_layernorm_2",
                  "post_attention_layernorm", "post_attention_layernorm_2"):
            w[p + n + ".weight"] = gain()
    w["model.norm.weight"] = gain()
    w["model.early_exit_gate.weight"] = lin(1, Hs)
    w["model.early_exit_gate.bias"] = torch.randn(1, generator=g)
    w["lm_head.weight"] = lin(V, Hs)
    return {k: v.contiguous() for k, v in w.items()}


# ----------------------------------------------------------------------------------------
# Per-token depth schedules and KV-cache policies (Huginn)
# ----------------------------------------------------------------------------------------

class ScheduleCache:
    """KV cache for per-token depths: plain slots for prelude/coda layers (a `KVCache`), and
    for each core layer j and recurrence iteration t a *physical* slot chosen by `policy`:

      per_step     one slot per (t, j).  A position that did not run iteration t (it stopped
                   earlier) is read from its latest entry at an iteration <= t (Huginn's
                   `latest-m4`, for any number of core layers).
      last_step    one slot per j, overwritten by every iteration; reads see what it holds.
      share_first  one slot per j, written only at t = 0 (MoR recursive sharing).
      recursion_wise  one slot per (t, j); iteration t attends only to the positions that ran
                   iteration t (MoR recursion-wise caching, Huginn's `skip` read).
      ring{c}      c slots per j, iteration t uses slot t mod c (loopc `ring(c)`, Huginn
                   `compress-s{c·n_core}`): later iterations overwrite earlier ones.  A position
                   of the current call that stopped before t is carried into slot t mod c from
                   slot (t−1) mod c (its latest entry); a position of an earlier call that never
                   reached slot t mod c is read from the highest lower slot holding it (Huginn's
                   `latest` read on the compressed index).  Reads see what the slot holds.

    Every physical slot records, per position, the iteration that wrote it (-1: none).
    """

    POLICIES = ("per_step", "last_step", "share_first", "recursion_wise")

    def __init__(self, max_len: int, policy: str = "per_step"):
        self.ring = None
        if policy.startswith("ring") and policy[4:].isdigit() and int(policy[4:]) >= 1:
            self.ring = int(policy[4:])
        elif policy not in self.POLICIES:
            raise ValueError(f"unknown cache policy {policy}")
        self.max_len = max_len
        self.policy = policy
        self.plain = KVCache(max_len)
        self.k: Dict[tuple, Tensor] = {}
        self.v: Dict[tuple, Tensor] = {}
        self.it: Dict[tuple, Tensor] = {}

    def update(self, slot: int, k: Tensor, v: Tensor, start: int):
        return self.plain.update(slot, k, v, start)

    def _phys(self, t: int) -> int:
        return t if self.policy in ("per_step", "recursion_wise") else 0

    def update_loop(self, j: int, t: int, k: Tensor, v: Tensor, start: int, active: Tensor):
        """Write the active positions' k,v ([B,Hkv,S,hd]) of core layer j at iteration t and
        return the K/V that iteration t attends to, positions 0..start+S-1."""
        S = k.shape[2]
        if self.ring is not None:
            return self._update_ring(j, t, k, v, start, active)
        if not (self.policy == "share_first" and t > 0):
            key = (j, self._phys(t))
            if key not in self.k:
                shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
                self.k[key] = k.new_zeros(shape)
                self.v[key] = v.new_zeros(shape)
                self.it[key] = torch.full((self.max_len,), -1, dtype=torch.int64)
            idx = start + torch.nonzero(active).flatten()
            self.k[key][:, :, idx] = k[:, :, active]
            self.v[key][:, :, idx] = v[:, :, active]
            self.it[key][idx] = t
        n = start + S
        if self.policy == "recursion_wise":
            key = (j, t)
            return self.k[key][:, :, :n], self.v[key][:, :, :n], self.it[key][:n] >= 0
        if self.policy != "per_step":
            return self.k[(j, 0)][:, :, :n], self.v[(j, 0)][:, :, :n]
        # Latest entry at an iteration <= t: later slots overwrite earlier ones.
        K = self.k[(j, 0)][:, :, :n].clone()
        V = self.v[(j, 0)][:, :, :n].clone()
        for tt in range(1, t + 1):
            if (j, tt) not in self.k:
                continue
            m = self.it[(j, tt)][:n] >= 0
            K[:, :, m] = self.k[(j, tt)][:, :, :n][:, :, m]
            V[:, :, m] = self.v[(j, tt)][:, :, :n][:, :, m]
        return K, V

    def _update_ring(self, j: int, t: int, k: Tensor, v: Tensor, start: int, active: Tensor):
        c = self.ring
        key = (j, t % c)
        S = k.shape[2]
        n = start + S
        if key not in self.k:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[key] = k.new_zeros(shape)
            self.v[key] = v.new_zeros(shape)
            self.it[key] = torch.full((self.max_len,), -1, dtype=torch.int64)
        K, V, it = self.k[key], self.v[key], self.it[key]
        # Earlier calls' positions this slot never held: the highest lower slot holding them.
        for q in range(t % c - 1, -1, -1):
            src = (j, q)
            if src not in self.k:
                continue
            m = torch.zeros(self.max_len, dtype=torch.bool)
            m[:start] = (it[:start] < 0) & (self.it[src][:start] >= 0)
            K[:, :, m] = self.k[src][:, :, m]
            V[:, :, m] = self.v[src][:, :, m]
            it[m] = self.it[src][m]
        # This call's stopped positions carry their latest entry from the previous slot.
        prev = (j, (t - 1) % c)
        if t > 0 and prev != key:
            idx = start + torch.nonzero(~active).flatten()
            K[:, :, idx] = self.k[prev][:, :, idx]
            V[:, :, idx] = self.v[prev][:, :, idx]
            it[idx] = self.it[prev][idx]
        idx = start + torch.nonzero(active).flatten()
        K[:, :, idx] = k[:, :, active]
        V[:, :, idx] = v[:, :, active]
        it[idx] = t
        return K[:, :, :n], V[:, :, :n]

    def bytes(self, itemsize: int = 4) -> int:
        """Bytes of the filled positions of every slot (plain and loop), at `itemsize` per value."""
        tot = 0
        for d, lens in ((self.plain.k, self.plain.len), (self.k, None)):
            for key, t in d.items():
                n = lens[key] if lens is not None else int((self.it[key] >= 0).sum())
                tot += 2 * t.shape[0] * t.shape[1] * n * t.shape[3] * itemsize
        return tot


class _LoopSlots:
    """Routes a core block's `cache.update(slot, ...)` to iteration t of a ScheduleCache."""

    def __init__(self, cache: ScheduleCache, j: int, t: int, active: Tensor):
        self.cache, self.j, self.t, self.active = cache, j, t, active

    def update(self, slot, k, v, start):
        return self.cache.update_loop(self.j, self.t, k, v, start, self.active)


def huginn_forward_schedule(w: Weights, cfg: dict, ids: Tensor, depths: Tensor,
                            cache: ScheduleCache, start: int = 0,
                            rope: Optional[Tensor] = None) -> Tensor:
    """Logits [1,S,V] with a per-token depth schedule (`depths` [S], each >= 1): token i runs
    exactly depths[i] recurrence iterations.  Batch 1, zero initial state.

    Every iteration runs the core block on all S positions, but only active positions
    (depth > t) write the cache and update their state; an inactive position keeps its state
    and is seen by others through the cache policy's read rule.  The coda runs once, on the
    final states.
    """
    E, _, _ = huginn_dims(cfg)
    npre = cfg["n_layers_in_prelude"]
    ncore = cfg["n_layers_in_recurrent_block"]
    ncoda = cfg["n_layers_in_coda"]
    eps = cfg.get("norm_eps", 1e-6)
    wte = w["transformer.wte.weight"]
    if rope is None:
        rope = huginn_rope_table(cfg, wte.dtype)
    S = ids.shape[1]
    cs = rope[start:start + S]
    e = F.embedding(ids, wte) * math.sqrt(E)
    for i in range(npre):
        e = huginn_block(w, f"transformer.prelude.{i}.", e, cs, cfg, cache, i, start)
    s = torch.zeros_like(e)
    adapter = w["transformer.adapter.weight"]
    for t in range(int(depths.max())):
        active = depths > t
        x = F.linear(torch.cat([s, e], dim=-1), adapter)
        for j in range(ncore):
            x = huginn_block(w, f"transformer.core_block.{j}.", x, cs, cfg,
                             _LoopSlots(cache, j, t, active), -1, start)
        s = torch.where(active[None, :, None], x, s)
    lnf = w["transformer.ln_f.weight"]
    h = rms_norm(s, lnf, eps)
    for i in range(ncoda):
        h = huginn_block(w, f"transformer.coda.{i}.", h, cs, cfg, cache, npre + i, start)
    h = rms_norm(h, lnf, eps)
    return F.linear(h, w.get("lm_head.weight", wte))


def ouro_forward_act(w: Weights, cfg: dict, ids: Tensor, eps: float, max_steps: int,
                     cache: ScheduleCache, start: int = 0, rope=None):
    """ACT / Universal-Transformer halting on Ouro's exit gate (families.md §4.4), batch 1.

    p = sigmoid(gate(normed loop output)); a token whose cumulative p would pass 1 - eps halts
    with weight 1 - (cumulative p), otherwise continues with weight p; its state is the running
    average  state <- loop(state)·w + state·(1 - w).  Halted tokens stop: they write no more KV
    and are read through `cache`'s rule.  Returns (logits [1,S,V], depths [S]).
    """
    L = cfg["num_hidden_layers"]
    eps_n = cfg.get("rms_norm_eps", 1e-6)
    emb = w["model.embed_tokens.weight"]
    S = ids.shape[1]
    if rope is None:
        rope = ouro_rope_table(cfg, start + S, emb.dtype)
    cos, sin = rope[0][start:start + S], rope[1][start:start + S]
    gw, gb = w["model.early_exit_gate.weight"], w["model.early_exit_gate.bias"]
    state = F.embedding(ids, emb)
    hp = torch.zeros(S, dtype=emb.dtype)
    n = torch.zeros(S, dtype=torch.int64)
    halted = torch.zeros(S, dtype=torch.bool)
    thr = 1.0 - eps
    for t in range(max_steps):
        active = ~halted
        if not bool(active.any()):
            break
        x = state
        for l in range(L):
            x = ouro_layer(w, l, x, cos, sin, cfg, _LoopSlots(cache, l, t, active), -1, start)
        x = rms_norm(x, w["model.norm.weight"], eps_n)
        p = torch.sigmoid(F.linear(x, gw) + gb)[0, :, 0]
        newh = active & (hp + p > thr)
        still = active & ~newh
        wt = torch.where(still, p, torch.where(newh, 1.0 - hp, torch.zeros_like(p)))
        hp = torch.where(still, hp + p, torch.where(newh, torch.ones_like(hp), hp))
        n = n + active.long()
        state = x * wt[None, :, None] + state * (1 - wt[None, :, None])
        halted = halted | newh | (n >= max_steps)
    return F.linear(state, w["lm_head.weight"]), n


def ouro_forward_schedule(w: Weights, cfg: dict, ids: Tensor, depths: Tensor,
                          cache: ScheduleCache, start: int = 0, rope=None) -> Tensor:
    """Ouro logits [1,S,V] with a per-token depth schedule (token i runs depths[i] loops);
    inactive tokens keep their state and are read through `cache`'s rule.  Batch 1."""
    L = cfg["num_hidden_layers"]
    eps_n = cfg.get("rms_norm_eps", 1e-6)
    emb = w["model.embed_tokens.weight"]
    S = ids.shape[1]
    if rope is None:
        rope = ouro_rope_table(cfg, start + S, emb.dtype)
    cos, sin = rope[0][start:start + S], rope[1][start:start + S]
    h = F.embedding(ids, emb)
    for t in range(int(depths.max())):
        active = depths > t
        x = h
        for l in range(L):
            x = ouro_layer(w, l, x, cos, sin, cfg, _LoopSlots(cache, l, t, active), -1, start)
        x = rms_norm(x, w["model.norm.weight"], eps_n)
        h = torch.where(active[None, :, None], x, h)
    return F.linear(h, w["lm_head.weight"])
