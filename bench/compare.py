#!/usr/bin/env python3
"""loopc vs the PyTorch reference, side by side in one run (issue 9's benchmark matrix).

For each model and recurrence depth r, each workload runs once per implementation per round,
alternating loopc f32 / loopc bf16 (`--dtype bf16`) / PyTorch eager f32 / PyTorch eager bf16
(/ torch.compile with --compile); each
process reports medians over --reps repetitions after a warm-up, and this script takes the median
over --rounds. The machine is shared and noisy: only ratios within one run are meaningful.

Workloads (the same random-token prompts on both sides, greedy decode with the KV cache):
  p128+d64   prompt 128 (logits of the last position), then 64 decode tokens, batch 1
  p512       prompt 512, no decode, batch 1
  b8         8 sequences: prompts of --batch-prompt-len tokens, then 64 decode steps of 8 tokens
             (aggregate tok/s = 8·64 / time)
Models: Huginn-style d=1024 (bench/huginn_d1024.json) at r in {1, 4, 8, 16}; Huginn-style d=256
(bench/huginn_d256.json) at r=8; Ouro-style d=1024, 8 layers (bench/ouro_d1024.json) at T=4.
Missing weights are written with `tools/reference/bench_ref.py --make-weights` (into --weights-dir).

It also measures the ceilings in the same run (`loopc bench --ceilings`, `bench_ref.py
--ceilings`) and prints each result's roofline fraction: decode = weight bytes read per token
(the recurrent block counted r times, the head once; KV reads not counted) / DRAM read bandwidth
(best 512 MiB read of the run); prefill = FLOPs (2·weights·tokens + causal attention + one head
row per sequence) / the best f32 (or bf16) GEMM GFLOP/s measured in the run.

    python3 bench/compare.py --quick                 # d=1024 at r=8, d=256, Ouro; ~10-15 min
    python3 bench/compare.py                         # the full matrix (about an hour)
    python3 bench/compare.py --compile               # adds torch.compile f32 (45-200 s warm-up each)
    python3 bench/compare.py --quick --models huginn-d1024 --workloads p128+d64,p512 --reps 3

Prints Markdown tables (ready for BENCHMARKS.md) and writes every raw JSON line to --out.
"""
import argparse, json, os, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PY = "/work/torchvenv/bin/python"

MODELS = {
    "huginn-d1024": dict(src="examples/huginn.loop", config="bench/huginn_d1024.json",
                         weights="bench_d1024.safetensors", set=["init_scale=0"], rs=[1, 4, 8, 16],
                         quick_rs=[8]),
    "huginn-d256": dict(src="examples/huginn.loop", config="bench/huginn_d256.json",
                        weights="bench_d256.safetensors", set=["init_scale=0"], rs=[8], quick_rs=[8]),
    "ouro-d1024": dict(src="examples/ouro.loop", config="bench/ouro_d1024.json",
                       weights="bench_ouro_d1024.safetensors", set=[], rs=[4], quick_rs=[4]),
}


def run_json(cmd, env=None, timeout=None):
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  timed out: {' '.join(cmd)}", file=sys.stderr)
        return None
    if out.returncode != 0:
        print(f"  failed: {' '.join(cmd)}\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["wall_s"] = round(time.perf_counter() - t, 2)
    return r


# ---------------------------------------------------------------------------------------------
# Model arithmetic: weight bytes per token and FLOPs per prefill
# ---------------------------------------------------------------------------------------------

def model_shape(cfg: dict, r: int) -> dict:
    """Parameters read per token (layers counted per evaluation), head params, attention width,
    layer evaluations per token."""
    if cfg.get("model_type") == "ouro":
        E, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        nkv = cfg.get("num_key_value_heads", nh)
        hd = cfg.get("head_dim", E // nh)
        I, L = cfg["intermediate_size"], cfg["num_hidden_layers"]
        layer = E * nh * hd * 2 + E * nkv * hd * 2 + 3 * E * I
        evals = r * L
        body = evals * layer + r * E  # + the exit gate each loop
        return dict(body=body, head=cfg["vocab_size"] * E, attn_dim=nh * hd, evals=evals)
    E, I = cfg["n_embd"], cfg["intermediate_size"]
    layer = 4 * E * E + 3 * E * I
    npc = cfg["n_layers_in_prelude"] + cfg["n_layers_in_coda"]
    ncore = cfg["n_layers_in_recurrent_block"]
    body = npc * layer + r * (ncore * layer + 2 * E * E)  # adapter [E, 2E] each iteration
    return dict(body=body, head=cfg["vocab_size"] * E, attn_dim=E, evals=npc + r * ncore)


def decode_bytes_per_step(shape: dict, elt: int) -> float:
    return (shape["body"] + shape["head"]) * elt


def prefill_flops(shape: dict, prompt: int, batch: int = 1) -> float:
    per_seq = 2 * prompt * shape["body"] + 2 * shape["head"] + shape["evals"] * 2 * prompt * prompt * shape["attn_dim"]
    return batch * per_seq


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="d=1024 at r=8 only, 1 round, 2 reps")
    ap.add_argument("--compile", action="store_true",
                    help="also torch.compile (f32; p128+d64 and b8 workloads at the model's middle r)")
    ap.add_argument("--no-bf16", action="store_true", help="skip PyTorch eager bf16")
    ap.add_argument("--no-loopc-bf16", action="store_true", help="skip loopc --dtype bf16")
    ap.add_argument("--workloads", help="comma-separated subset of p128+d64,p512,b<batch> (default: all)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--rs", help="override the d=1024 Huginn depths, e.g. 4,8")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batch-prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights-dir", default="/work")
    ap.add_argument("--python", default=os.environ.get("PYTHON", TORCH_PY if os.path.exists(TORCH_PY) else sys.executable))
    ap.add_argument("--loopc", default=os.path.join(ROOT, "target/release/loopc"))
    ap.add_argument("--backend", default="cranelift", choices=["cranelift", "mlir"],
                    help="the code generator of the artifacts (mlir: its own GEMMs too)")
    ap.add_argument("--builder", help="the loopc that builds the artifacts (default --loopc; "
                    "--backend mlir needs one built with --features mlir)")
    ap.add_argument("--out", default="/tmp/loopc-compare.json")
    a = ap.parse_args()
    rounds = a.rounds or (1 if a.quick else 2)
    reps = a.reps or (2 if a.quick else 3)
    env = dict(os.environ, LOOPC_THREADS=str(a.threads))
    ref = [a.python, "tools/reference/bench_ref.py", "--threads", str(a.threads)]
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    raw = []

    def log(rec):
        if rec is not None:
            raw.append(rec)
            print("  " + json.dumps({k: v for k, v in rec.items() if k not in ("config",)}), file=sys.stderr)
        return rec

    # Ceilings, both sides, at the start (and again at the end of a multi-round run).
    ceil = {"loopc": [], "pytorch": []}

    def measure_ceilings():
        print("ceilings ...", file=sys.stderr)
        c = log(run_json([a.loopc, "bench", "--ceilings"], env))
        if c: ceil["loopc"].append(c)
        c = log(run_json(ref + ["--ceilings"]))
        if c: ceil["pytorch"].append(c)

    measure_ceilings()

    # Models, weights, artifacts.
    models = [m for m in a.models.split(",") if m]
    plans = []  # (model, r, workload, impl)
    builds = {}
    for name in models:
        m = MODELS[name]
        w = os.path.join(a.weights_dir, m["weights"])
        if not os.path.exists(w):
            print(f"writing {w} ...", file=sys.stderr)
            subprocess.run([a.python, "tools/reference/bench_ref.py", "--make-weights", w, "--config", m["config"]],
                           cwd=ROOT, check=True, capture_output=True)
        art = f"/tmp/loopc-compare-{name}.loopc"
        cmd = [a.builder or a.loopc, "build", m["src"], "--config", m["config"], "--backend", a.backend,
               "-o", art]
        for s in m["set"]:
            cmd += ["--set", s]
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        builds[name] = time.perf_counter() - t
        with open(os.path.join(ROOT, m["config"])) as f:
            cfg = json.load(f)
        rs = m["quick_rs"] if a.quick else m["rs"]
        if a.rs and name == "huginn-d1024":
            rs = [int(x) for x in a.rs.split(",")]
        m.update(art=art, path=w, cfg=cfg, run_rs=rs)

    workloads = {
        "p128+d64": dict(prompt=128, new=a.new_tokens, batch=1),
        "p512": dict(prompt=512, new=0, batch=1),
        f"b{a.batch}": dict(prompt=a.batch_prompt_len, new=a.new_tokens, batch=a.batch),
    }
    if a.workloads:
        keep = [w for w in a.workloads.split(",") if w]
        unknown = [w for w in keep if w not in workloads]
        if unknown:
            sys.exit(f"--workloads: unknown {unknown}; choose from {list(workloads)}")
        workloads = {k: v for k, v in workloads.items() if k in keep}
    impls = (["loopc"] + ([] if a.no_loopc_bf16 else ["loopc-bf16"]) + ["eager-f32"]
             + ([] if a.no_bf16 else ["eager-bf16"]))

    def cmd_for(name, r, wl, impl):
        m, w = MODELS[name], workloads[wl]
        common = ["--prompt-len", str(w["prompt"]), "--new-tokens", str(w["new"]), "--reps", str(reps),
                  "--batch", str(w["batch"])]
        if impl.startswith("loopc"):
            dt = ["--dtype", "bf16"] if impl == "loopc-bf16" else []
            return [a.loopc, "bench", m["art"], "--weights", m["path"], "--steps", str(r)] + dt + common, env
        dtype = "bf16" if impl.endswith("bf16") else "f32"
        c = ref + ["--weights", m["path"], "--r", str(r), "--dtype", dtype] + common
        if impl.startswith("compile"):
            c.append("--compile")
        return c, None

    results = {}  # (name, r, wl, impl) -> [records]
    for rnd in range(rounds):
        for name in models:
            m = MODELS[name]
            rs = m["run_rs"]
            for r in rs:
                for wl in workloads:
                    these = list(impls)
                    if a.compile and r == rs[len(rs) // 2] and wl != "p512":
                        these.append("compile-f32")
                    if rnd % 2 == 1:
                        these.reverse()  # alternate who goes first
                    for impl in these:
                        print(f"round {rnd + 1}/{rounds} {name} r={r} {wl} {impl} ...", file=sys.stderr)
                        cmd, e = cmd_for(name, r, wl, impl)
                        rec = log(run_json(cmd, e, timeout=1800))
                        if rec is not None:
                            rec.update(model=name, workload=wl, impl_key=impl, round=rnd)
                            results.setdefault((name, r, wl, impl), []).append(rec)
    if rounds > 1:
        measure_ceilings()

    # -------------------------------------------------------------------------------------
    def best(side, group, key):
        xs = [c[group][key] for c in ceil[side] if group in c and key in c[group]]
        return max(xs) if xs else None

    gemm_shapes = ["128x1024x1024", "512x1024x1024", "1024x1024x1024"]
    f32_peak = max([x for s in ("loopc", "pytorch") for k in gemm_shapes
                    for x in [best(s, "gemm_f32_gflops", k)] if x] or [float("nan")])
    bf16_peak = max([x for s in ("loopc", "pytorch") for k in gemm_shapes
                     for x in [best(s, "gemm_bf16_gflops", k)] if x] or [float("nan")])
    dram = max([x for s in ("loopc", "pytorch") for x in [best(s, "read_gbs", "512MiB")] if x] or [float("nan")])

    def med(name, r, wl, impl, key):
        recs = results.get((name, r, wl, impl))
        if not recs:
            return None
        return statistics.median(x[key] for x in recs)

    def fmt(x, nd=1):
        return "—" if x is None else f"{x:.{nd}f}"

    def ratio(x, y):
        return None if x is None or y is None or y == 0 else x / y

    out = []
    p = out.append
    p(f"Run: {time.strftime('%Y-%m-%d %H:%M')}, {a.threads} threads, rounds {rounds} × reps {reps} "
      f"(medians), {time.perf_counter() - t_start:.0f} s wall; load average (1 min) {load0[0]:.1f} at the start, "
      f"{os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} CPUs; `{' '.join(sys.argv[1:]) or '(defaults)'}`")
    p("")
    p("### Ceilings (same run; best of the passes)")
    p("")
    p("| ceiling | loopc f32 | loopc bf16 | PyTorch f32 | PyTorch bf16 |")
    p("|---|---|---|---|---|")
    for k in gemm_shapes:
        p(f"| GEMM {k.replace('x', '×')} GFLOP/s | {fmt(best('loopc', 'gemm_f32_gflops', k))} | "
          f"{fmt(best('loopc', 'gemm_bf16_gflops', k))} | "
          f"{fmt(best('pytorch', 'gemm_f32_gflops', k))} | {fmt(best('pytorch', 'gemm_bf16_gflops', k))} |")
    p(f"| GEMV 1×4096·4096ᵀ GB/s (weight bytes; loopc bf16: 1×4096·8192ᵀ) | "
      f"{fmt(best('loopc', 'gemv_f32_gbs', '1x4096x4096'))} | {fmt(best('loopc', 'gemv_bf16_gbs', '1x4096x8192'))} | "
      f"{fmt(best('pytorch', 'gemv_f32_gbs', '1x4096x4096'))} | {fmt(best('pytorch', 'gemv_bf16_gbs', '1x4096x4096'))} |")
    for k in ("2MiB", "64MiB", "512MiB"):
        p(f"| read GB/s, {k} | {fmt(best('loopc', 'read_gbs', k))} | | {fmt(best('pytorch', 'read_gbs', k))} | |")
    for k in ("2MiB", "64MiB", "512MiB"):
        p(f"| copy GB/s, {k} (read + write) | {fmt(best('loopc', 'copy_gbs', k))} | | {fmt(best('pytorch', 'copy_gbs', k))} | |")
    p("")
    p(f"Rooflines below use DRAM read {dram:.1f} GB/s (best 512 MiB read), f32 GEMM peak {f32_peak:.0f} "
      f"GFLOP/s, bf16 GEMM peak {bf16_peak:.0f} GFLOP/s (best measured shapes of the run).")
    p("")
    p("### Throughput (medians; loopc bf16 = `--dtype bf16`: bf16 matmul weights, f32 accumulation)")
    p("")
    has_compile = any(k[3] == "compile-f32" for k in results)
    hdr = "| model | r | metric | loopc f32 | loopc bf16 | eager f32 | eager bf16 |"
    sep = "|---|---|---|---|---|---|---|"
    if has_compile:
        hdr += " compile f32 |"
        sep += "---|"
    hdr += " loopc / eager f32 | loopc / eager bf16 | loopc bf16 / eager bf16 |"
    sep += "---|---|---|"
    if has_compile:
        hdr += " loopc / compile |"
        sep += "---|"
    hdr += " roofline % loopc · loopc bf16 · eager f32 · eager bf16 |"
    sep += "---|"
    p(hdr)
    p(sep)
    B = a.batch
    metrics = [("prefill-128 tok/s", "p128+d64", "prefill_tok_s"),
               ("prefill-512 tok/s", "p512", "prefill_tok_s"),
               ("decode b1 tok/s", "p128+d64", "decode_tok_s"),
               (f"decode b{B} tok/s (aggregate)", f"b{B}", "decode_tok_s"),
               ("peak RSS MB (p128+d64)", "p128+d64", "peak_rss_mb")]
    metrics = [x for x in metrics if x[1] in workloads]
    summary = {}
    for name in models:
        m = MODELS[name]
        for r in m["run_rs"]:
            shape = model_shape(m["cfg"], r)
            for label, wl, key in metrics:
                v = {i: med(name, r, wl, i, key) for i in impls + ["compile-f32"]}
                summary[(name, r, label)] = v
                roof = []
                for i, elt, peak in (("loopc", 4, f32_peak), ("loopc-bf16", 2, bf16_peak),
                                     ("eager-f32", 4, f32_peak), ("eager-bf16", 2, bf16_peak)):
                    x = v.get(i)
                    if x is None or key == "peak_rss_mb":
                        roof.append("—")
                        continue
                    w = workloads[wl]
                    if key == "decode_tok_s":
                        # tok/s × bytes per step / (batch × bandwidth)
                        frac = x * decode_bytes_per_step(shape, elt) / (w["batch"] * dram * 1e9)
                    else:
                        frac = (x / (w["batch"] * w["prompt"])) * prefill_flops(shape, w["prompt"], w["batch"]) / (peak * 1e9)
                    roof.append(f"{100 * frac:.0f}")
                nd = 0 if key == "peak_rss_mb" else (2 if "decode" in label else 1)
                row = (f"| {name} | {r} | {label} | {fmt(v['loopc'], nd)} | {fmt(v.get('loopc-bf16'), nd)} | "
                       f"{fmt(v['eager-f32'], nd)} | {fmt(v.get('eager-bf16'), nd)} |")
                if has_compile:
                    row += f" {fmt(v.get('compile-f32'), nd)} |"
                row += (f" {fmt(ratio(v['loopc'], v['eager-f32']), 2)} | {fmt(ratio(v['loopc'], v.get('eager-bf16')), 2)} |"
                        f" {fmt(ratio(v.get('loopc-bf16'), v.get('eager-bf16')), 2)} |")
                if has_compile:
                    row += f" {fmt(ratio(v['loopc'], v.get('compile-f32')), 2)} |"
                row += f" {' · '.join(roof)} |"
                p(row)
    p("")
    comp = [(k, x.get("warmup_s")) for k, recs in results.items() if k[3] == "compile-f32" for x in recs]
    if comp:
        p("torch.compile warm-up (first call incl. compilation), s: " +
          ", ".join(f"{k[0]} r={k[1]} {k[2]}: {w:.0f}" for k, w in comp))
        p("")
    p("loopc build wall (incl. process start): " + ", ".join(f"{k} {v:.2f} s" for k, v in builds.items()))
    p("")

    # Issue-9 targets at r=8 (d=1024 Huginn) and the d=256 decode target.
    p("### Issue 9 targets (r=8, batch 1 unless stated)")
    p("")
    p("| target | measured | verdict |")
    p("|---|---|---|")

    def target(desc, got, want, fmt_got=lambda g: f"{g:.2f}×"):
        if got is None:
            p(f"| {desc} | not measured | — |")
        else:
            verdict = "met" if got >= want else f"missed by {100 * (1 - got / want):.0f} %"
            p(f"| {desc} | {fmt_got(got)} | {verdict} |")

    H = "huginn-d1024"
    if 8 in MODELS[H].get("run_rs", []) and H in models:
        shape = model_shape(MODELS[H]["cfg"], 8)
        s = lambda lbl: summary.get((H, 8, lbl), {})
        dec = s("decode b1 tok/s")
        if dec.get("loopc"):
            target("decode b1 ≥ 95 % of the DRAM roofline (f32)",
                   dec["loopc"] * decode_bytes_per_step(shape, 4) / (dram * 1e9), 0.95, lambda g: f"{100 * g:.0f} %")
        if dec.get("loopc-bf16"):
            target("decode b1 ≥ 95 % of the DRAM roofline (bf16)",
                   dec["loopc-bf16"] * decode_bytes_per_step(shape, 2) / (dram * 1e9), 0.95, lambda g: f"{100 * g:.0f} %")
        target("decode b1 ≥ 1.0× torch.compile (f32)", ratio(dec.get("loopc"), dec.get("compile-f32")), 1.0)
        target("decode b1 ≥ 1.2× eager f32", ratio(dec.get("loopc"), dec.get("eager-f32")), 1.2)
        target("decode b1 ≥ 1.4× eager bf16 (loopc f32 vs eager bf16)", ratio(dec.get("loopc"), dec.get("eager-bf16")), 1.4)
        target("decode b1 ≥ 1.4× eager bf16 (loopc bf16 vs eager bf16)", ratio(dec.get("loopc-bf16"), dec.get("eager-bf16")), 1.4)
        d8 = s(f"decode b{B} tok/s (aggregate)")
        target(f"decode b{B} ≥ 2× eager f32", ratio(d8.get("loopc"), d8.get("eager-f32")), 2.0)
        target(f"decode b{B} ≥ 1.5× torch.compile f32", ratio(d8.get("loopc"), d8.get("compile-f32")), 1.5)
        p5 = s("prefill-512 tok/s")
        target("prefill-512 ≥ 1.0× eager f32", ratio(p5.get("loopc"), p5.get("eager-f32")), 1.0)
        target("prefill-512 ≥ 1.0× eager bf16 (loopc f32 vs eager bf16)", ratio(p5.get("loopc"), p5.get("eager-bf16")), 1.0)
        target("prefill-512 ≥ 1.0× eager bf16 (loopc bf16 vs eager bf16)", ratio(p5.get("loopc-bf16"), p5.get("eager-bf16")), 1.0)
        p1 = s("prefill-128 tok/s")
        target("prefill-128 ≥ 1.2× eager f32", ratio(p1.get("loopc"), p1.get("eager-f32")), 1.2)
        rss = s("peak RSS MB (p128+d64)")
        if rss.get("loopc") and rss.get("eager-f32"):
            target("peak RSS below eager f32's (eager / loopc)", rss["eager-f32"] / rss["loopc"], 1.0 + 1e-9)
    notes = []
    if "huginn-d256" in models:
        r = MODELS["huginn-d256"]["run_rs"][0]
        d = summary.get(("huginn-d256", r, "decode b1 tok/s"), {})
        target(f"d=256 decode ≥ 5× eager f32 (r={r})", ratio(d.get("loopc"), d.get("eager-f32")), 5.0)
        # The issue names no dtype here; the like-for-like bf16 pair, as the b1 decode lines have.
        if d.get("loopc-bf16") and d.get("eager-bf16"):
            target(f"d=256 decode ≥ 5× eager bf16 (loopc bf16 vs eager bf16, r={r})",
                   ratio(d.get("loopc-bf16"), d.get("eager-bf16")), 5.0)
        # This model's weights and cache (~60 MB f32) stay in the last-level cache, so its decode is
        # bound by the 64 MiB read ceiling, not DRAM: say how far 5× eager is from that bound.
        kvb = med("huginn-d256", r, "p128+d64", "loopc", "kv_bytes_per_position")
        c64 = max([x for s in ("loopc", "pytorch") for x in [best(s, "read_gbs", "64MiB")] if x] or [0])
        if d.get("loopc") and kvb and c64:
            w = workloads["p128+d64"]
            ctx = w["prompt"] + (w["new"] - 1) / 2
            wb = decode_bytes_per_step(model_shape(MODELS["huginn-d256"]["cfg"], r), 4)
            per_tok = wb + kvb * ctx
            cap = c64 * 1e9 / per_tok
            line = (f"d=256 f32 decode reads {per_tok / 1e6:.0f} MB per token (weights {wb / 1e6:.0f}, KV "
                    f"{kvb * ctx / 1e6:.0f} at {ctx:.0f} positions on average); at this run's 64 MiB read "
                    f"ceiling ({c64:.1f} GB/s) that allows at most {cap:.0f} tok/s")
            if d.get("eager-f32"):
                line += f", {cap / d['eager-f32']:.2f}× eager f32"
            notes.append(line + f". loopc f32 decodes at {100 * d['loopc'] / cap:.0f} % of that bound.")
    if H in builds:
        target("`loopc build` of the d=1024 model ≤ 1 s (1 s / wall)", 1.0 / builds[H], 1.0,
               lambda g: f"{1 / g:.2f} s")
    for n in notes:
        p("")
        p(n)

    text = "\n".join(out)
    print(text)
    with open(a.out, "w") as f:
        json.dump({"ceilings": ceil, "builds": builds, "runs": raw, "markdown": text}, f)
    print(f"\nraw results: {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
