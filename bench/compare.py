#!/usr/bin/env python3
"""loopc vs the PyTorch reference, side by side in one run.

Alternates `loopc bench` and `tools/reference/bench_ref.py` on the same safetensors weights for
several rounds and prints the medians of each and the loopc/PyTorch ratios. The machine is
shared and noisy, so only ratios within one run are meaningful.

    python3 bench/compare.py --weights /work/bench_d1024.safetensors --config bench/huginn_d1024.json --r 8
"""
import argparse, json, os, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json(cmd, env=None):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--config", default="bench/huginn_d1024.json")
    ap.add_argument("--model", default="examples/huginn.loop")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--python", default=os.environ.get("PYTHON", sys.executable))
    ap.add_argument("--loopc", default=os.path.join(ROOT, "target/release/loopc"))
    a = ap.parse_args()

    art = "/tmp/loopc-bench.loopc"
    t = time.perf_counter()
    subprocess.run([a.loopc, "build", a.model, "--config", a.config, "--set", "init_scale=0", "-o", art],
                   cwd=ROOT, check=True, capture_output=True)
    build_s = time.perf_counter() - t
    common = ["--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens), "--reps", str(a.reps)]
    env = dict(os.environ, LOOPC_THREADS=str(a.threads))
    rows = {"loopc": [], "pytorch-eager": []}
    for _ in range(a.rounds):
        rows["loopc"].append(run_json([a.loopc, "bench", art, "--weights", a.weights, "--steps", str(a.r)] + common, env))
        rows["pytorch-eager"].append(run_json([a.python, "tools/reference/bench_ref.py", "--weights", a.weights,
                                               "--r", str(a.r), "--threads", str(a.threads)] + common))
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("prefill_tok_s", "decode_tok_s")} for k, v in rows.items()}
    print(f"loopc build (wall, incl. process start): {build_s:.3f} s")
    print(f"{'impl':<16}{'prefill tok/s':>16}{'decode tok/s':>16}")
    for k, m in med.items():
        print(f"{k:<16}{m['prefill_tok_s']:>16.2f}{m['decode_tok_s']:>16.2f}")
    for m in ("prefill_tok_s", "decode_tok_s"):
        print(f"ratio loopc/pytorch {m}: {med['loopc'][m] / med['pytorch-eager'][m]:.2f}")
    print(json.dumps({"build_s": build_s, "medians": med, "runs": rows}))


if __name__ == "__main__":
    main()
