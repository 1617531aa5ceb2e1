"""Train a small looped GPT-2 (the Loop-Think-Generalize architecture of examples/ltg.loop) on
k-hop composition questions from gen_data.py, with the recurrence depth sampled per batch.

Writes model.safetensors (tensor names as examples/ltg.loop binds them) and config.json (GPT-2
field names plus num_iterations), so `loopc` loads the result directly:

    python3 tools/multihop/gen_data.py
    python3 tools/multihop/train.py --minutes 35
    loopc eval examples/ltg.loop --config examples/multihop/config.json --set inject=1 --set positions=1 \
        --weights examples/multihop/model.safetensors --task tools/multihop/data/ood.jsonl --steps 1,2,4,8,12
Seeded and deterministic for a given thread count.
"""
import argparse
import json
import math
import os
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))


class Conv1D(nn.Module):
    """HF GPT-2's Conv1D: weight stored [in, out]."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class Attn(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.c_attn = Conv1D(d, 3 * d)
        self.c_proj = Conv1D(d, d)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.c_attn(x).split(D, -1)
        q, k, v = (t.view(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, S, D))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = Conv1D(d, 4 * d)
        self.c_proj = Conv1D(4 * d, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = Attn(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LoopedGPT2(nn.Module):
    def __init__(self, vocab, d, heads, layers, n_pos):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, d)
        self.position_embedding = nn.Embedding(n_pos, d)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, ids, iters):
        S = ids.shape[1]
        e = self.token_embedding(ids) + self.position_embedding.weight[:S]
        h = e
        for i in range(iters):
            if i > 0:
                h = h + e  # additive input injection after the first iteration
            for b in self.blocks:
                h = b(h)
        return F.linear(self.ln_f(h), self.token_embedding.weight)


def load(path):
    with open(path) as f:
        return [json.loads(l) for l in f]


def batchify(items):
    S = max(len(it["tokens"]) for it in items)
    # Left-pad with <pad> so the answer position is the last one for every row; the model is
    # causal and never sees padding after real tokens.
    ids = torch.zeros(len(items), S, dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, S - len(it["tokens"]):] = torch.tensor(it["tokens"])
    return ids, torch.tensor([it["answer"] for it in items])


@torch.no_grad()
def accuracy(model, items, iters, bs=512):
    model.eval()
    correct = 0
    by_len = {}
    for it in items:
        by_len.setdefault(len(it["tokens"]), []).append(it)
    for group in by_len.values():
        for i in range(0, len(group), bs):
            ids, ans = batchify(group[i:i + bs])
            correct += (model(ids, iters)[:, -1].argmax(-1) == ans).sum().item()
    model.train()
    return correct / max(1, len(items))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(HERE, "data"))
    ap.add_argument("--out", default=os.path.join(ROOT, "examples", "multihop"))
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=35.0)
    ap.add_argument("--max-steps", type=int, default=200000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--depth-mean", type=float, default=4.0)
    ap.add_argument("--depth-min", type=int, default=2)
    ap.add_argument("--depth-max", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    rng = random.Random(a.seed)
    with open(os.path.join(a.data, "vocab.json")) as f:
        vocab = json.load(f)["tokens"]
    train, test_id, test_ood = (load(os.path.join(a.data, f"{s}.jsonl")) for s in ("train", "id", "ood"))
    n_pos = 16
    model = LoopedGPT2(len(vocab), a.dim, a.heads, a.layers, n_pos)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1)
    by_len = {}
    for it in train:
        by_len.setdefault(len(it["tokens"]), []).append(it)
    lens = sorted(by_len)
    t0 = time.time()
    step = 0
    log = []
    while step < a.max_steps and time.time() - t0 < a.minutes * 60:
        # One sequence length per batch (no padding inside a batch), weighted by count.
        L = rng.choices(lens, weights=[len(by_len[l]) for l in lens])[0]
        ids, ans = batchify(rng.sample(by_len[L], min(a.batch, len(by_len[L]))))
        # Depth sampled per batch: Poisson(mean) clipped, as in Loop, Think & Generalize.
        lam, k, p = a.depth_mean, 0, 1.0
        thr = math.exp(-lam)
        while True:
            p *= rng.random()
            if p <= thr:
                break
            k += 1
        iters = min(max(k, a.depth_min), a.depth_max)
        lr = a.lr * min(1.0, (step + 1) / 500)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = F.cross_entropy(model(ids, iters)[:, -1], ans)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 500 == 0:
            accs = {r: (accuracy(model, test_id[:500], r), accuracy(model, test_ood[:500], r)) for r in (4, 8)}
            line = {"step": step, "minutes": round((time.time() - t0) / 60, 2), "loss": round(loss.item(), 4),
                    "acc_id_r4": accs[4][0], "acc_ood_r4": accs[4][1], "acc_id_r8": accs[8][0], "acc_ood_r8": accs[8][1]}
            log.append(line)
            print(json.dumps(line), flush=True)
    os.makedirs(a.out, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(a.out, "model.safetensors"))
    cfg = {"model_type": "gpt2", "n_embd": a.dim, "n_head": a.heads, "n_layer": a.layers, "vocab_size": len(vocab),
           "n_positions": n_pos, "n_inner": None, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
           "num_iterations": a.depth_max}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    with open(os.path.join(a.out, "train_log.jsonl"), "w") as f:
        for l in log:
            f.write(json.dumps(l) + "\n")
    print(f"saved {a.out} after {step} steps")


if __name__ == "__main__":
    main()
