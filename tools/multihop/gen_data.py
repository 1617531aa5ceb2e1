"""Seeded synthetic knowledge base and k-hop composition questions.

Entities e_0..e_{N-1}; each relation r_j is a random function on entities. A k-hop question is
`<q> e r_1 ... r_k <a>` and its answer is r_k(...r_1(e)). Splits:
  train  - every 1-hop fact, and a fraction of the 2..train_hops compositions;
  id     - held-out compositions with 2..train_hops hops (unseen combinations, seen hop counts);
  ood    - train_hops+1 .. max_hops hops (deeper than anything in training).
Token ids: 0 <pad>, 1 <q>, 2 <a>, then entities, then relations. Output: vocab.json and
{train,id,ood}.jsonl with {"tokens", "answer", "hops"}.
"""
import argparse
import json
import os
import random


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entities", type=int, default=64)
    ap.add_argument("--relations", type=int, default=4)
    ap.add_argument("--train-hops", type=int, default=3)
    ap.add_argument("--max-hops", type=int, default=6)
    ap.add_argument("--train-fraction", type=float, default=0.5)
    ap.add_argument("--per-hop", type=int, default=2000, help="questions sampled per hop count and split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    a = ap.parse_args()
    rng = random.Random(a.seed)
    n, m = a.entities, a.relations
    ent = lambda i: 3 + i
    rel = lambda j: 3 + n + j
    table = [[rng.randrange(n) for _ in range(n)] for _ in range(m)]

    def answer(e, path):
        for r in path:
            e = table[r][e]
        return e

    def q(e, path):
        return {"tokens": [1, ent(e)] + [rel(r) for r in path] + [2], "answer": ent(answer(e, path)), "hops": len(path)}

    splits = {"train": [], "id": [], "ood": []}
    for e in range(n):
        for r in range(m):
            splits["train"].append(q(e, [r]))
    for k in range(2, a.max_hops + 1):
        seen = set()
        want = a.per_hop * (2 if k <= a.train_hops else 1)
        tries = 0
        while len(seen) < want and tries < want * 20:
            tries += 1
            e = rng.randrange(n)
            path = tuple(rng.randrange(m) for _ in range(k))
            if (e, path) in seen:
                continue
            seen.add((e, path))
            item = q(e, list(path))
            if k > a.train_hops:
                splits["ood"].append(item)
            # `seen` holds each combination once, so none lands in two splits.
            elif rng.random() < a.train_fraction:
                splits["train"].append(item)
            else:
                splits["id"].append(item)
    os.makedirs(a.out, exist_ok=True)
    vocab = ["<pad>", "<q>", "<a>"] + [f"e{i}" for i in range(n)] + [f"r{j}" for j in range(m)]
    with open(os.path.join(a.out, "vocab.json"), "w") as f:
        json.dump({"tokens": vocab, "args": vars(a)}, f, indent=1)
    for name, items in splits.items():
        with open(os.path.join(a.out, f"{name}.jsonl"), "w") as f:
            for it in items:
                f.write(json.dumps(it) + "\n")
        print(f"{name}: {len(items)} questions")


if __name__ == "__main__":
    main()
