#!/usr/bin/env python3
"""The two code generators side by side with the PyTorch reference, in one run (issue 5).

One model (default: Huginn-style d=1024, bench/huginn_d1024.json, r=8) is built twice, with
`--backend cranelift` and `--backend mlir` (the latter needs a loopc built with `--features
mlir`, given as --mlir-loopc), and each artifact is run by the same release `loopc bench`.
Each round runs every implementation once per workload, alternating the order, next to
PyTorch eager (tools/reference/bench_ref.py) on the same safetensors weights:

  cranelift f32 · mlir f32 · eager f32 · cranelift bf16 · mlir bf16 · eager bf16

(loopc bf16 = `--dtype bf16`: bf16 matmul weights and activations, f32 accumulation and norms).
Workloads: p128+d64 (prompt 128, then 64 greedy decode tokens) and p512 (prompt 512).

It also prints each backend's build time (the best of 3 builds) and the GEMM ceilings of this
run: the runtime's own f32 (`gemm` crate) and bf16 (AMX) GEMMs next to the MLIR artifact's
(`loopc bench --ceilings ARTIFACT`, timed alternately in one process), and PyTorch's.

    python3 bench/backends.py --mlir-loopc target/mlir/debug/loopc
    python3 bench/backends.py --mlir-loopc target/mlir/debug/loopc --rounds 3 --reps 3
"""
import argparse, json, os, re, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PY = "/work/torchvenv/bin/python"


def run(cmd, env=None):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return out


def last_json(out):
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mlir-loopc", required=True, help="a loopc built with --features mlir (for the MLIR build)")
    ap.add_argument("--loopc", default=os.path.join(ROOT, "target/release/loopc"), help="runs every artifact")
    ap.add_argument("--src", default="examples/huginn.loop")
    ap.add_argument("--config", default="bench/huginn_d1024.json")
    ap.add_argument("--set", action="append", default=["init_scale=0"])
    ap.add_argument("--weights", default="/work/bench_d1024.safetensors")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--python", default=os.environ.get("PYTHON", TORCH_PY if os.path.exists(TORCH_PY) else sys.executable))
    ap.add_argument("--out", default="/tmp/loopc-backends.json")
    a = ap.parse_args()
    env = dict(os.environ, LOOPC_THREADS=str(a.threads))
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    log = open(a.out, "w")

    if not os.path.exists(a.weights):
        print(f"writing {a.weights} ...", file=sys.stderr)
        run([a.python, "tools/reference/bench_ref.py", "--make-weights", a.weights, "--config", a.config])

    # Builds: the best of three, as `loopc build` reports its own wall time.
    arts, build_s = {}, {}
    for backend, exe in (("cranelift", a.loopc), ("mlir", a.mlir_loopc)):
        art = f"/tmp/loopc-backends-{backend}.loopc"
        times = []
        for _ in range(3):
            cmd = [exe, "build", a.src, "--config", a.config, "--backend", backend, "-o", art]
            for s in a.set:
                cmd += ["--set", s]
            out = run(cmd)
            m = re.search(r" in ([0-9.]+) s", out.stderr + out.stdout)
            times.append(float(m.group(1)) if m else float("nan"))
        arts[backend], build_s[backend] = art, min(times)

    # Ceilings: the runtime's GEMMs and the MLIR artifact's, alternating in one process.
    ceil = last_json(run([a.loopc, "bench", "--ceilings", arts["mlir"]], env))
    ref = [a.python, "tools/reference/bench_ref.py", "--threads", str(a.threads), "--config", a.config]
    ref_ceil = last_json(run([a.python, "tools/reference/bench_ref.py", "--threads", str(a.threads), "--ceilings"]))
    log.write(json.dumps(dict(ceilings=ceil, pytorch_ceilings=ref_ceil, build_s=build_s)) + "\n")

    impls = ["cranelift f32", "mlir f32", "eager f32"]
    if not a.no_bf16:
        impls += ["cranelift bf16", "mlir bf16", "eager bf16"]
    workloads = {"p128+d64": (128, 64), "p512": (512, 0)}
    res = {}
    for rnd in range(a.rounds):
        for wl, (plen, new) in workloads.items():
            order = impls if rnd % 2 == 0 else impls[::-1]
            for impl in order:
                who, dtype = impl.split()
                common = ["--prompt-len", str(plen), "--new-tokens", str(new), "--reps", str(a.reps)]
                if who == "eager":
                    cmd = ref + ["--weights", a.weights, "--r", str(a.r), "--dtype", dtype] + common
                    e = None
                else:
                    cmd = [a.loopc, "bench", arts[who], "--weights", a.weights, "--steps", str(a.r),
                           "--dtype", dtype] + common
                    e = env
                print(f"round {rnd + 1}/{a.rounds} {wl} {impl} ...", file=sys.stderr)
                rec = last_json(run(cmd, e))
                rec.update(impl_key=impl, workload=wl, round=rnd)
                log.write(json.dumps(rec) + "\n")
                res.setdefault((wl, impl), []).append(rec)

    def med(wl, impl, key):
        r = res.get((wl, impl))
        return statistics.median(x[key] for x in r) if r else None

    def fmt(x, nd=1):
        return "—" if x is None else f"{x:.{nd}f}"

    p = print
    p(f"Run: {time.strftime('%Y-%m-%d %H:%M')}, {a.config} r={a.r}, {a.threads} threads, rounds {a.rounds} × "
      f"reps {a.reps} (medians), {time.perf_counter() - t0:.0f} s wall; load average (1 min) {load0:.1f} at the "
      f"start, {os.getloadavg()[0]:.1f} at the end")
    p("")
    p(f"Build time (best of 3, `loopc build` wall): Cranelift {build_s['cranelift']:.3f} s, "
      f"MLIR {build_s['mlir']:.3f} s")
    p("")
    p("| GEMM GFLOP/s (same run) | runtime f32 (`gemm` crate) | MLIR f32 | MLIR / gemm | runtime bf16 (AMX) | MLIR bf16 (AMX) | MLIR / runtime | PyTorch f32 | PyTorch bf16 |")
    p("|---|---|---|---|---|---|---|---|---|")
    for k, g in ceil["gemm_f32_gflops"].items():
        m32 = ceil.get("gemm_f32_artifact_gflops", {}).get(k)
        b = ceil.get("gemm_bf16_gflops", {}).get(k)
        mb = ceil.get("gemm_bf16_artifact_gflops", {}).get(k)
        pt = ref_ceil.get("gemm_f32_gflops", {}).get(k)
        pb = ref_ceil.get("gemm_bf16_gflops", {}).get(k)
        p(f"| {k.replace('x', '×')} | {fmt(g)} | {fmt(m32)} | {fmt(m32 / g if m32 else None, 2)} | {fmt(b)} | "
          f"{fmt(mb)} | {fmt(mb / b if mb and b else None, 2)} | {fmt(pt)} | {fmt(pb)} |")
    p("")
    p("| metric | " + " | ".join(impls) + " | mlir / cranelift f32 | mlir / eager f32 |"
      + (" mlir / cranelift bf16 | mlir bf16 / eager bf16 |" if not a.no_bf16 else ""))
    p("|---" * (len(impls) + 3 + (2 if not a.no_bf16 else 0)) + "|")
    for label, wl, key, nd in (("prefill-128 tok/s", "p128+d64", "prefill_tok_s", 1),
                               ("prefill-512 tok/s", "p512", "prefill_tok_s", 1),
                               ("decode tok/s", "p128+d64", "decode_tok_s", 2),
                               ("peak RSS MB", "p128+d64", "peak_rss_mb", 0)):
        v = {i: med(wl, i, key) for i in impls}

        def ratio(x, y):
            return None if v.get(x) is None or not v.get(y) else v[x] / v[y]
        row = f"| {label} | " + " | ".join(fmt(v[i], nd) for i in impls)
        row += f" | {fmt(ratio('mlir f32', 'cranelift f32'), 2)} | {fmt(ratio('mlir f32', 'eager f32'), 2)} |"
        if not a.no_bf16:
            row += f" {fmt(ratio('mlir bf16', 'cranelift bf16'), 2)} | {fmt(ratio('mlir bf16', 'eager bf16'), 2)} |"
        p(row)


if __name__ == "__main__":
    main()
