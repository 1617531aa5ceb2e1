"""PyTorch reference of the Universal Transformer decoder with ACT (examples/ut.loop).

tensor2tensor's `universal_transformer` with `recurrence_type="act"`, `universal_transformer_basic`
decoder units (pre-LayerNorm residual self-attention and ReLU FFN, final LayerNorm), t2t's
`get_timing_signal_1d` for the position and step ("sinusoid") signals, written for a causal
decoder-only LM with a KV cache.  Choices shared with loopc (see examples/ut.loop):

- ACT state: s <- block(x)·w + s·(1 − w) (the running halting-weighted average), with
  x = s + position_signal + step_signal(t); p = sigmoid(halting(x)); thr = 1 − eps; a token
  halts at the first step whose cumulative p would pass thr, with weight 1 − (cumulative p).
  t2t instead carries block(x) and accumulates the mix separately.
- Halted tokens stop: they write no more K/V.  At step t a token attends to every earlier token's
  K/V from that token's latest step <= t ("latest" rule), in prefill and decode alike.
- The halting decision is made in the working dtype; the fixture generator checks that float32
  and float64 agree on every depth.
"""
import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

Weights = Dict[str, Tensor]


def timing_signal(t: Tensor, channels: int, min_timescale: float = 1.0,
                  max_timescale: float = 1.0e4) -> Tensor:
    """t2t `get_timing_signal_1d` at the (float) times `t` [n]: [n, channels] in float64."""
    num_timescales = channels // 2
    log_inc = math.log(max_timescale / min_timescale) / max(num_timescales - 1, 1)
    inv = min_timescale * torch.exp(torch.arange(num_timescales, dtype=torch.float64) * -log_inc)
    scaled = t.to(torch.float64)[:, None] * inv[None, :]
    sig = torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)
    return F.pad(sig, (0, channels % 2))


def layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    """t2t `layer_norm_compute`: biased variance, eps inside the rsqrt."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * w + b


class LatestCache:
    """Per-step K/V slots; a position missing at step t is read from its latest step <= t."""

    def __init__(self, max_len: int, width: int, dtype):
        self.max_len, self.width, self.dtype = max_len, width, dtype
        self.k: Dict[int, Tensor] = {}
        self.v: Dict[int, Tensor] = {}
        self.has: Dict[int, Tensor] = {}

    def update(self, t: int, k: Tensor, v: Tensor, start: int, active: Tensor):
        """Write the active rows of k, v ([S, width]) at positions start.. of step t; return the
        K/V [start + S, width] that step t attends to."""
        if t not in self.k:
            self.k[t] = torch.zeros(self.max_len, self.width, dtype=self.dtype)
            self.v[t] = torch.zeros(self.max_len, self.width, dtype=self.dtype)
            self.has[t] = torch.zeros(self.max_len, dtype=torch.bool)
        idx = start + torch.nonzero(active).flatten()
        self.k[t][idx] = k[active]
        self.v[t][idx] = v[active]
        self.has[t][idx] = True
        n = start + k.shape[0]
        K = torch.zeros(n, self.width, dtype=self.dtype)
        V = torch.zeros(n, self.width, dtype=self.dtype)
        for tt in sorted(self.k):
            if tt > t:
                break
            m = self.has[tt][:n]
            K[m] = self.k[tt][:n][m]
            V[m] = self.v[tt][:n][m]
        return K, V


def attention(q: Tensor, K: Tensor, V: Tensor, heads: int, start: int) -> Tensor:
    """Causal multi-head attention of q [S, d] (positions start..) over K, V [start + S, d]."""
    S, d = q.shape
    hd = d // heads
    n = K.shape[0]
    qh = q.view(S, heads, hd).transpose(0, 1)
    kh = K.view(n, heads, hd).transpose(0, 1)
    vh = V.view(n, heads, hd).transpose(0, 1)
    scores = qh @ kh.transpose(1, 2) * hd ** -0.5
    pos = start + torch.arange(S)[:, None]
    mask = torch.arange(n)[None, :] > pos
    scores = scores.masked_fill(mask[None], float("-inf"))
    return (torch.softmax(scores, -1) @ vh).transpose(0, 1).reshape(S, d)


def ut_block(w: Weights, x: Tensor, cfg: dict, cache: LatestCache, t: int, start: int,
             active: Tensor) -> Tensor:
    p = "transformer.block."
    eps = cfg["norm_epsilon"]
    h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
    q = F.linear(h, w[p + "attn.q_proj.weight"])
    k = F.linear(h, w[p + "attn.k_proj.weight"])
    v = F.linear(h, w[p + "attn.v_proj.weight"])
    K, V = cache.update(t, k, v, start, active)
    x = x + F.linear(attention(q, K, V, cfg["num_heads"], start), w[p + "attn.out_proj.weight"])
    m = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
    m = F.relu(F.linear(m, w[p + "mlp.fc_1.weight"], w[p + "mlp.fc_1.bias"]))
    return x + F.linear(m, w[p + "mlp.fc_2.weight"], w[p + "mlp.fc_2.bias"])


def ut_forward(w: Weights, cfg: dict, ids: Tensor, cache: LatestCache, start: int = 0,
               max_steps: int = None):
    """Logits [S, V], halting depths [S] of tokens `ids` [S] at positions start.. (batch 1),
    and the smallest distance of a cumulative halting probability to the threshold."""
    D = cfg["hidden_size"]
    max_steps = max_steps or cfg["act_max_steps"]
    thr = 1.0 - cfg["act_epsilon"]
    wte = w["transformer.wte.weight"]
    dt = wte.dtype
    S = ids.shape[0]
    s = F.embedding(ids, wte) * math.sqrt(D)
    pos_sig = timing_signal(torch.arange(start, start + S), D).to(dt)
    hp = torch.zeros(S, dtype=dt)
    n = torch.zeros(S, dtype=torch.int64)
    halted = torch.zeros(S, dtype=torch.bool)
    margin = math.inf
    for t in range(max_steps):
        active = ~halted
        if not bool(active.any()):
            break
        x = s + pos_sig + timing_signal(torch.tensor([t]), D).to(dt)
        p = torch.sigmoid(F.linear(x, w["transformer.halting.weight"]) + w["transformer.halting.bias"])[:, 0]
        y = ut_block(w, x, cfg, cache, t, start, active)
        if t + 1 < max_steps:
            margin = min(margin, float((hp + p - thr)[active].abs().min()))
        newh = active & (hp + p > thr)
        still = active & ~newh
        wt = torch.where(still, p, torch.where(newh, 1.0 - hp, torch.zeros_like(p)))
        hp = torch.where(still, hp + p, torch.where(newh, torch.ones_like(hp), hp))
        n = n + active.long()
        s = torch.where(active[:, None], y * wt[:, None] + s * (1 - wt[:, None]), s)
        halted = halted | newh | (n >= max_steps)
    h = layer_norm(s, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], cfg["norm_epsilon"])
    return F.linear(h, wte), n, margin


def ut_random_weights(cfg: dict, seed: int, halt_bias: float, halt_scale: float) -> Weights:
    """Random float32 weights; the halting unit's bias and weight scale set how deep tokens go."""
    g = torch.Generator().manual_seed(seed)
    D, Fd, V = cfg["hidden_size"], cfg["filter_size"], cfg["vocab_size"]

    def lin(o, i, scale=1.0):
        return torch.randn(o, i, generator=g) * scale / math.sqrt(i)

    p = "transformer.block."
    w = {
        "transformer.wte.weight": torch.randn(V, D, generator=g) * D ** -0.5,
        p + "ln_1.weight": 1 + 0.1 * torch.randn(D, generator=g),
        p + "ln_1.bias": 0.1 * torch.randn(D, generator=g),
        p + "attn.q_proj.weight": lin(D, D),
        p + "attn.k_proj.weight": lin(D, D),
        p + "attn.v_proj.weight": lin(D, D),
        p + "attn.out_proj.weight": lin(D, D, 0.5),
        p + "ln_2.weight": 1 + 0.1 * torch.randn(D, generator=g),
        p + "ln_2.bias": 0.1 * torch.randn(D, generator=g),
        p + "mlp.fc_1.weight": lin(Fd, D),
        p + "mlp.fc_1.bias": 0.1 * torch.randn(Fd, generator=g),
        p + "mlp.fc_2.weight": lin(D, Fd, 0.5),
        p + "mlp.fc_2.bias": 0.1 * torch.randn(D, generator=g),
        "transformer.halting.weight": lin(1, D, halt_scale),
        "transformer.halting.bias": torch.tensor([halt_bias]),
        "transformer.ln_f.weight": 1 + 0.1 * torch.randn(D, generator=g),
        "transformer.ln_f.bias": 0.1 * torch.randn(D, generator=g),
    }
    return {k: v.float().contiguous() for k, v in w.items()}
