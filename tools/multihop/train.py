"""Train a small looped GPT-2 (examples/multihop.loop: GPT-2 blocks looped with the state
re-normalised before the embeddings are injected again) on k-hop composition questions from
gen_data.py, with the recurrence depth sampled per batch.

What makes the loop extrapolate to more hops than it was trained on (each option can be turned
off to compare):
  --prefix-loss   every prefix `<q> e r1 .. ri` is an i-hop question, so the loss is taken at
                  every relation position (answer after i hops) as well as at `<a>`; this asks
                  each position for its partial answer, the same step at every hop count;
  --pos-shift     positions start at a random offset per batch, so every learned position
                  embedding is trained in every role and longer (deeper) questions meet no
                  untrained position;
  depth sampling  Poisson(--depth-mean) clipped to [--depth-min, --depth-max] per batch, with the
                  loss masked to positions whose hop count fits the sampled depth
                  (--depth-mask), so the loop learns about one hop per iteration and keeps
                  answers stable over the spare iterations;
  lr schedule     linear warm-up then cosine decay to 10 %.

Writes model.safetensors (tensor names as examples/multihop.loop binds them) and config.json
(GPT-2 field names plus num_iterations), so `loopc` loads the result directly:

    python3 tools/multihop/gen_data.py
    python3 tools/multihop/train.py --max-steps 3000 --stop-after 2554 --batch 256 --lr 2e-3 --warmup 300
    loopc eval examples/multihop.loop --config examples/multihop/config.json \
        --weights examples/multihop/model.safetensors --task tools/multihop/data/ood.jsonl --steps 1,2,4,8,12
Seeded and deterministic for a given thread count (stopping by --max-steps, not --minutes).
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
        self.inject_ln = nn.LayerNorm(d)
        self.ln_f = nn.LayerNorm(d)

    def forward(self, ids, iters, offset=0):
        S = ids.shape[1]
        e = self.token_embedding(ids) + self.position_embedding.weight[offset:offset + S]
        h = e
        for _ in range(iters):
            h = self.inject_ln(h) + e
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


def prefix_targets(items, table, n_ent):
    """Targets per position for one-length batches: the entity after i hops at the i-th relation
    (and the final answer at `<a>`); -100 (ignored) at `<q>` and the entity."""
    S = len(items[0]["tokens"])
    tgt = torch.full((len(items), S), -100, dtype=torch.long)
    hops = torch.full((S,), 10**6, dtype=torch.long)
    for i, it in enumerate(items):
        toks = it["tokens"]
        e = toks[1] - 3
        for p in range(2, S - 1):
            e = table[toks[p] - 3 - n_ent][e]
            tgt[i, p] = 3 + e
            hops[p] = p - 1
        tgt[i, S - 1] = it["answer"]
        hops[S - 1] = S - 3
    return tgt, hops


def relation_table(train, n_ent, n_rel):
    """The one-hop facts, read back from the 1-hop training questions (all of them are there)."""
    table = [[None] * n_ent for _ in range(n_rel)]
    for it in train:
        if it["hops"] == 1:
            table[it["tokens"][2] - 3 - n_ent][it["tokens"][1] - 3] = it["answer"] - 3
    assert all(x is not None for row in table for x in row), "train split lacks some 1-hop facts"
    return table


@torch.no_grad()
def accuracy(model, items, iters, bs=512, hops=None, limit=500):
    if hops is not None:
        items = [it for it in items if it["hops"] == hops][:limit]
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
    ap.add_argument("--max-steps", type=int, default=200000, help="length of the lr schedule")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop after this many steps, keeping the schedule of --max-steps (replays a run "
                         "that --minutes cut short, exactly)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--depth-mean", type=float, default=3.0)
    ap.add_argument("--depth-min", type=int, default=1)
    ap.add_argument("--depth-max", type=int, default=5)
    ap.add_argument("--prefix-loss", type=int, default=1)
    ap.add_argument("--pos-shift", type=int, default=1)
    ap.add_argument("--depth-mask", type=int, default=1)
    ap.add_argument("--curriculum", type=int, default=1000,
                    help="steps during which the longest questions are left out (hops <= 2)")
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    rng = random.Random(a.seed)
    with open(os.path.join(a.data, "vocab.json")) as f:
        meta = json.load(f)
    vocab = meta["tokens"]
    n_ent, n_rel = meta["args"]["entities"], meta["args"]["relations"]
    train, test_id, test_ood = (load(os.path.join(a.data, f"{s}.jsonl")) for s in ("train", "id", "ood"))
    n_pos = 16
    model = LoopedGPT2(len(vocab), a.dim, a.heads, a.layers, n_pos)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1)
    by_len = {}
    for it in train:
        by_len.setdefault(len(it["tokens"]), []).append(it)
    lens = sorted(by_len)
    table = relation_table(train, n_ent, n_rel)
    t0 = time.time()
    step = 0
    log = []
    stop = min(a.max_steps, a.stop_after or a.max_steps)
    while step < stop and time.time() - t0 < a.minutes * 60:
        # One sequence length per batch (no padding inside a batch), weighted by count.
        avail = [l for l in lens if step >= a.curriculum or l <= lens[0] + 1] or lens
        L = rng.choices(avail, weights=[len(by_len[l]) for l in avail])[0]
        items = rng.sample(by_len[L], min(a.batch, len(by_len[L])))
        ids, ans = batchify(items)
        # Depth sampled per batch: Poisson(mean) clipped, as in Loop, Think & Generalize.
        lam, k, p = a.depth_mean, 0, 1.0
        thr = math.exp(-lam)
        while True:
            p *= rng.random()
            if p <= thr:
                break
            k += 1
        iters = min(max(k, a.depth_min), a.depth_max)
        offset = rng.randrange(n_pos - L + 1) if a.pos_shift else 0
        warm = min(1.0, (step + 1) / a.warmup)
        cos = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, a.max_steps))))
        for g in opt.param_groups:
            g["lr"] = a.lr * warm * cos
        logits = model(ids, iters, offset)
        if a.prefix_loss:
            tgt, hops = prefix_targets(items, table, n_ent)
            if a.depth_mask:
                tgt[:, hops > iters] = -100
            if (tgt != -100).any():
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
            else:
                loss = None
        else:
            loss = F.cross_entropy(logits[:, -1], ans)
        if loss is not None:
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        step += 1
        if step % a.eval_every == 0 or step == stop:
            line = {"step": step, "minutes": round((time.time() - t0) / 60, 2),
                    "loss": round(loss.item(), 4) if loss is not None else None}
            for r in (2, 4, 8, 12):
                line[f"id3_r{r}"] = round(accuracy(model, test_id, r, hops=3), 3)
                for h in (4, 6):
                    line[f"ood{h}_r{r}"] = round(accuracy(model, test_ood, r, hops=h), 3)
            log.append(line)
            print(json.dumps(line), flush=True)
    os.makedirs(a.out, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(a.out, "model.safetensors"))
    cfg = {"model_type": "gpt2", "n_embd": a.dim, "n_head": a.heads, "n_layer": a.layers, "vocab_size": len(vocab),
           "n_positions": n_pos, "n_inner": None, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
           "num_iterations": a.depth_max}
    with open(os.path.join(a.out, "train_args.json"), "w") as f:
        json.dump(vars(a) | {"steps_done": step, "minutes_taken": round((time.time() - t0) / 60, 2)}, f, indent=1)
        f.write("\n")
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    with open(os.path.join(a.out, "train_log.jsonl"), "w") as f:
        for l in log:
            f.write(json.dumps(l) + "\n")
    print(f"saved {a.out} after {step} steps")


if __name__ == "__main__":
    main()
