#!/usr/bin/env python3
"""Tables for scripts/gpu-check.sh.

    gpu_check_report.py parity OUT_DIR CASE...   # CASE.cpu.safetensors vs CASE.gpu.safetensors
    gpu_check_report.py bench FILE.jsonl         # loopc vs PyTorch decode tok/s per r

`parity` exits non-zero when a case's logits differ by more than --tol or its tokens differ.
"""
import json
import sys

import numpy as np
from safetensors.numpy import load_file


def parity(out_dir, cases, tol):
    print("| case | prefill max abs diff | decode max abs diff | tokens equal | iterations equal |")
    print("|---|---|---|---|---|")
    bad = 0
    for c in cases:
        try:
            a = load_file(f"{out_dir}/{c}.cpu.safetensors")
            b = load_file(f"{out_dir}/{c}.gpu.safetensors")
        except Exception as e:  # a run that failed leaves no dump
            print(f"| {c} | missing ({e.__class__.__name__}) | | | |")
            bad += 1
            continue

        def diff(k):
            if k not in a or k not in b or a[k].shape != b[k].shape:
                return float("inf")
            return float(np.max(np.abs(a[k] - b[k]))) if a[k].size else 0.0

        dp, dd = diff("prefill_logits"), diff("decode_logits")
        toks = bool(np.array_equal(a["tokens"], b["tokens"]))
        its = bool(np.array_equal(a.get("iterations"), b.get("iterations")))
        ok = dp <= tol and dd <= tol and toks and its
        bad += not ok
        print(f"| {c} | {dp:.2e} | {dd:.2e} | {toks} | {its} |")
    print(f"\nparity: {len(cases) - bad}/{len(cases)} cases within {tol:g}")
    return bad


def bench(path):
    rows = {}
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        impl = "loopc" if r.get("impl") == "loopc" else "torch"
        rows.setdefault(r["r"], {})[impl] = r
    print("| r | loopc decode tok/s | PyTorch eager decode tok/s | loopc / eager | loopc prefill tok/s | eager prefill tok/s |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows):
        l, t = rows[r].get("loopc", {}), rows[r].get("torch", {})
        ld, td = l.get("decode_tok_s"), t.get("decode_tok_s")
        ratio = f"{ld / td:.2f}x" if ld and td else "-"
        print(f"| {r} | {ld if ld is not None else '-'} | {td if td is not None else '-'} | {ratio} | "
              f"{l.get('prefill_tok_s', '-')} | {t.get('prefill_tok_s', '-')} |")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "parity":
        tol = 1e-3
        args = sys.argv[2:]
        if args[0].startswith("--tol="):
            tol = float(args[0].split("=", 1)[1])
            args = args[1:]
        sys.exit(1 if parity(args[0], args[1:], tol) else 0)
    elif len(sys.argv) == 3 and sys.argv[1] == "bench":
        bench(sys.argv[2])
    else:
        sys.exit(__doc__)
