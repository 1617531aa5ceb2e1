#!/usr/bin/env bash
# The CUDA check on a GPU machine (issue 6), from binaries and artifacts built beforehand here:
# the GPU machine has no Rust toolchain and no registry.
#
#   scripts/gpu-check.sh --prepare   # here: release loopc (--features cuda, no LLVM needed to
#                                    # run), CPU and CUDA artifacts, into target/gpu-check (the one
#                                    # carry path, ~10 MiB)
#   scripts/gpu-check.sh             # on the GPU machine: parity suite + decode benchmark
#   scripts/gpu-check.sh --dry-run   # here, no GPU: the parity logic with `--device cuda-emu` (the
#                                    # CUDA executor over host memory), torch on the CPU, a tiny
#                                    # benchmark config; after --prepare it runs the carried binary
#                                    # and CPU artifacts, and loads every prepared CUDA artifact with
#                                    # `--device cuda` up to the driver (which this machine lacks)
#
# Parity: for each case, `loopc run --dump-logits` with the CPU artifact on the CPU and with the
# CUDA artifact on the GPU, same prompt, greedy decode; the table gives max |Δ| of the prefill and
# decode logits and whether the tokens and per-token depths agree (the huginn_tiny and ouro_tiny
# fixtures; fixed depth, forced per-token depths under per-step and ring(2) caches, a latent-diff
# exit and Ouro's gate exit).
# Benchmark: a Huginn-style d=2048 config (bench/huginn_d2048.json; weights written there by
# tools/reference/bench_ref.py, 1.9 GB) at r ∈ {4, 8, 32}: `loopc bench --device cuda` next to
# PyTorch eager (`bench_ref.py --device cuda`) on the same GPU, prompt 128, 32 decode tokens.
#
# Environment: LOOPC_BUILDER (--prepare) a loopc that can `build --target cuda`, i.e. built with
# the `mlir` feature (default: target/mlir/debug/loopc, from
#   MLIR_SYS_220_PREFIX=/usr/lib/llvm-22 TABLEGEN_220_PREFIX=/usr/lib/llvm-22 \
#   CARGO_TARGET_DIR=target/mlir cargo build -j2 --features mlir,cuda --bin loopc);
# PYTHON (default python3, or the torch venv here for --dry-run); OUT (where the reports go;
# default target/gpu-check/out or …-dry/out; the device tool sets it); LOOPC_BIN (--dry-run
# without --prepare) a loopc to use instead of building target/debug/loopc; BUDGET (seconds,
# default 450) caps the whole run: each command's timeout is cut to what is left.
#
# On the device tool (from the checkout the session runs the tool from, after --prepare there):
#   run(command="scripts/gpu-check.sh", carry=["target/gpu-check"], timeout_s=540)
# The reports come back in $OUT (at most 8 files): parity.md, bench.md, bench.jsonl and
# logs.tar.gz (every run's log and logits dump); the tables are also at the end of the output.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --dry-run) MODE=dry ;;
  "") ;;
  *) echo "usage: $0 [--prepare | --dry-run]" >&2; exit 2 ;;
esac

DIR=target/gpu-check
[ "$MODE" = dry ] && DIR=target/gpu-check-dry
BIN=$DIR/loopc
# Where the binary and the artifacts are read from (the dry run reads the prepared ones if any).
ART=$DIR
PROMPT="3 17 5 9 1 22 8"
NEW_TOKENS=8
T0=$(date +%s)
say() { echo "[gpu-check $(( $(date +%s) - T0 ))s] $*" >&2; }
# The whole check must end within the device tool's limit: every command gets at most `$1`
# seconds and never more than what is left of BUDGET (default 450 s).
BUDGET=${BUDGET:-450}
limit() {
  local left=$(( T0 + BUDGET - $(date +%s) ))
  [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"
}

# Artifacts: name | example | fixture config | exit | cache | --set values (comma-separated)
ARTIFACTS=(
  "huginn_fixed|huginn|huginn_tiny/config.json|fixed|per_step|"
  "huginn_latent|huginn|huginn_tiny/config.json|latent_diff(threshold = 0.9, max = 7)|per_step|init_scale=0"
  "huginn_ring|huginn|huginn_tiny/config.json|fixed|ring(2)|init_scale=0"
  "ouro_fixed|ouro|ouro_tiny/config.json|fixed|per_step|"
  "ouro_gate|ouro|ouro_tiny/config.json|gate(q = 0.5)|per_step|"
  "ut_act|ut|ut_tiny/config.json|fixed|per_step|max_steps=6"
  "ltg_learned|ltg|ltg_tiny/config.json|fixed|per_step|inject=1,positions=1"
  "ltg_sinusoidal|ltg|ltg_tiny/config.json|fixed|per_step|positions=2"
)
# Parity cases: name | artifact | weights | extra `loopc run` flags
CASES=(
  "huginn_r4|huginn_fixed|huginn_tiny|--steps 4"
  "huginn_sched|huginn_fixed|huginn_tiny|--steps 4 --depths 2,4,1,3 --cycle-depths"
  "huginn_latent|huginn_latent|huginn_tiny|"
  "huginn_ring_sched|huginn_ring|huginn_tiny|--steps 4 --depths 3,1,4,2 --cycle-depths"
  "ouro_t4|ouro_fixed|ouro_tiny|"
  "ouro_gate|ouro_gate|ouro_tiny|"
  "ut_act|ut_act|ut_tiny|"
  "ltg_learned_r3|ltg_learned|ltg_tiny|--steps 3"
  "ltg_sinusoidal_r2|ltg_sinusoidal|ltg_tiny|--steps 2"
)
RS=(4 8 32)
PARITY_FAILED=0

# Build one artifact with `$1` (a loopc) for `$2` (cpu or cuda) into $DIR/NAME.$2.loopc.
build_artifact() {
  local loopc=$1 target=$2 spec=$3
  IFS='|' read -r name example cfg exit cache set <<<"$spec"
  mkdir -p "$DIR/src"
  local src="$DIR/src/$name.loop"
  sed -e "s/exit fixed/exit $exit/" -e "s/cache per_step/cache $cache/" \
    "examples/$example.loop" >"$src"
  local args=(build "$src" --config "tests/fixtures/$cfg" -o "$DIR/$name.$target.loopc")
  local kv
  for kv in ${set//,/ }; do args+=(--set "$kv"); done
  [ "$target" = cuda ] && args+=(--target cuda)
  "$loopc" "${args[@]}" >/dev/null
}

prepare() {
  say "release build of loopc with --features cuda"
  cargo build --release -j2 --features cuda --bin loopc
  mkdir -p "$DIR"
  # Debug info stripped: the carried tree is limited to 64 MiB.
  objcopy --strip-debug target/release/loopc "$BIN"
  local builder=${LOOPC_BUILDER:-target/mlir/debug/loopc}
  if [ ! -x "$builder" ]; then
    echo "error: no loopc that can \`build --target cuda\` at $builder: build one with --features mlir,cuda (see the header of $0) or set LOOPC_BUILDER" >&2
    exit 1
  fi
  say "CUDA artifacts built with $builder"
  for a in "${ARTIFACTS[@]}"; do
    build_artifact "$BIN" cpu "$a"
    if ! build_artifact "$builder" cuda "$a"; then
      echo "error: \`$builder build --target cuda\` failed: set LOOPC_BUILDER to a loopc built with --features mlir,cuda" >&2
      exit 1
    fi
  done
  "$builder" build examples/huginn.loop --config bench/huginn_d2048.json --set init_scale=0 \
    --target cuda -o "$DIR/huginn_d2048.cuda.loopc" >/dev/null
  rm -rf "$DIR/src" "$DIR/out"
  du -ah "$DIR" | sort -h >&2
  say "carry [\"$DIR\"] ($(du -sm "$DIR" | cut -f1) MiB; the limit is 64 MiB with the tree)"
}

# The CUDA libraries as cudarc looks them up (libcuda.so.1 from the driver; libcublas.so, which
# CUDA 13 installs only as libcublas.so.13 in the toolkit or torch's nvidia-cublas wheel).
cuda_libs() {
  local dirs=() d f
  # pip's nvidia-* wheels (torch's CUDA): nvidia/<pkg>/lib or, for CUDA 13, nvidia/cu13/lib.
  d=$($PY -c 'import glob, os, nvidia
for p in nvidia.__path__:
    for f in sorted(glob.glob(os.path.join(p, "*", "lib", "libcublas.so*"))):
        print(os.path.dirname(f)); raise SystemExit' 2>/dev/null || true)
  [ -n "$d" ] && dirs+=("$d")
  dirs+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu)
  for d in "${dirs[@]}"; do
    f=$(ls "$d"/libcublas.so* 2>/dev/null | head -1 || true)
    [ -n "$f" ] && break
  done
  if [ -z "$f" ]; then
    f=$(find /usr/local /opt -name 'libcublas.so*' 2>/dev/null | head -1 || true)
    d=$(dirname "${f:-.}")
  fi
  if [ -n "$f" ]; then
    mkdir -p /tmp/gpu-check-lib
    ln -sf "$(readlink -f "$f")" /tmp/gpu-check-lib/libcublas.so
    export LD_LIBRARY_PATH="/tmp/gpu-check-lib:$d:${LD_LIBRARY_PATH:-}"
    say "cuBLAS: $f"
  else
    say "warning: no libcublas found; loopc will report it"
  fi
}

parity() {
  local gpu_dev=$1 gpu_art=$2 names=()
  for c in "${CASES[@]}"; do
    IFS='|' read -r name art w flags <<<"$c"
    names+=("$name")
    # shellcheck disable=SC2086
    for side in cpu gpu; do
      local dev=cpu a="$ART/$art.cpu.loopc"
      [ "$side" = gpu ] && dev=$gpu_dev && a="$ART/$art.$gpu_art.loopc"
      if ! timeout "$(limit 60)" "$BIN" run "$a" --weights "tests/fixtures/$w/model.safetensors" \
        --tokens "$PROMPT" --max-new-tokens $NEW_TOKENS --guard off $flags --device "$dev" \
        --dump-logits "$WORK/$name.$side.safetensors" >"$WORK/$name.$side.log" 2>&1; then
        say "$name on $dev failed:"; tail -5 "$WORK/$name.$side.log" >&2
      fi
    done
  done
  $PY scripts/gpu_check_report.py parity "$WORK" "${names[@]}" | tee "$OUT/parity.md" \
    || PARITY_FAILED=1
}

bench() {
  local dev=$1 art=$2 cfg=$3 weights=$4 torch_dev=$5 plen=$6 ntok=$7 reps=$8
  if [ ! -f "$weights" ]; then
    say "writing benchmark weights ($cfg)"
    timeout "$(limit 120)" $PY tools/reference/bench_ref.py --make-weights "$weights" \
      --config "$cfg" --threads "$(nproc)" >/dev/null || say "writing the weights failed"
  fi
  : >"$OUT/bench.jsonl"
  for r in "${RS[@]}"; do
    say "benchmark r=$r"
    timeout "$(limit 120)" "$BIN" bench "$art" --weights "$weights" --steps "$r" --prompt-len "$plen" \
      --new-tokens "$ntok" --reps "$reps" --device "$dev" >>"$OUT/bench.jsonl" 2>"$WORK/bench.loopc.r$r.log" \
      || { say "loopc bench r=$r failed:"; tail -3 "$WORK/bench.loopc.r$r.log" >&2; }
    timeout "$(limit 120)" $PY tools/reference/bench_ref.py --weights "$weights" --r "$r" --prompt-len "$plen" \
      --new-tokens "$ntok" --reps "$reps" --device "$torch_dev" --threads "$(nproc)" \
      >>"$OUT/bench.jsonl" 2>"$WORK/bench.torch.r$r.log" || { say "torch r=$r failed:"; tail -3 "$WORK/bench.torch.r$r.log" >&2; }
  done
  $PY scripts/gpu_check_report.py bench "$OUT/bench.jsonl" | tee "$OUT/bench.md"
}

if [ "$MODE" = prepare ]; then
  prepare
  exit 0
fi

# Every prepared CUDA artifact, loaded by the carried binary with `--device cuda` on this machine
# (no driver): the artifact, its launch table and the program checks must pass, so that the only
# error is the missing driver. Weights are bound after the device opens, so the tiny Huginn
# fixture serves for the d=2048 artifact too.
cuda_loads() {
  local a name cfg e w
  for a in "${ARTIFACTS[@]}" "huginn_d2048|huginn|huginn_tiny/config.json"; do
    IFS='|' read -r name _ cfg _ <<<"$a"
    w="tests/fixtures/${cfg%/config.json}/model.safetensors"
    e=$("$BIN" run "$ART/$name.cuda.loopc" --weights "$w" --tokens "$PROMPT" --max-new-tokens 1 \
      --device cuda 2>&1 >/dev/null || true)
    if grep -qE "no CUDA driver|cannot initialise the CUDA driver|no CUDA device" <<<"$e"; then
      say "$name.cuda.loopc loads up to the driver"
    else
      say "$name.cuda.loopc: unexpected result without a driver: $e"
      PARITY_FAILED=1
    fi
  done
}

if [ "$MODE" = dry ]; then
  PY=${PYTHON:-$( [ -x /work/torchvenv/bin/python ] && echo /work/torchvenv/bin/python || echo python3)}
  OUT=${OUT:-$DIR/out}
  WORK=$OUT/runs
  mkdir -p "$DIR" "$OUT" "$WORK"
  if [ -x target/gpu-check/loopc ]; then
    ART=target/gpu-check
    BIN=$ART/loopc
    say "using the prepared binary and artifacts in $ART"
    cuda_loads
  else
    if [ -z "${LOOPC_BIN:-}" ]; then
      cargo build -j2 --bin loopc
      LOOPC_BIN=target/debug/loopc
    fi
    cp "$LOOPC_BIN" "$BIN"
    for a in "${ARTIFACTS[@]}"; do build_artifact "$BIN" cpu "$a"; done
  fi
  parity cuda-emu cpu
  # A tiny config: the emulator's products are plain loops.
  cat >"$DIR/tiny.json" <<'EOF'
{"model_type": "huginn_raven", "n_embd": 64, "n_heads": 4, "intermediate_size": 128,
 "vocab_size": 256, "n_layers_in_prelude": 1, "n_layers_in_recurrent_block": 2,
 "n_layers_in_coda": 1, "block_size": 256, "rope_base": 50000, "norm_eps": 1e-06,
 "mean_recurrence": 4}
EOF
  "$BIN" build examples/huginn.loop --config "$DIR/tiny.json" --set init_scale=0 \
    -o "$DIR/tiny.cpu.loopc" >/dev/null
  bench cuda-emu "$DIR/tiny.cpu.loopc" "$DIR/tiny.json" "$DIR/tiny.safetensors" cpu 8 4 1
  say "dry run done in $(( $(date +%s) - T0 )) s; reports in $OUT"
  exit $PARITY_FAILED
fi

PY=${PYTHON:-python3}
OUT=${OUT:-$DIR/out}
# The device tool brings back at most 8 files from $OUT: the runs go to a scratch folder and
# come back as one archive.
WORK=$(mktemp -d /tmp/gpu-check-runs.XXXXXX)
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "error: $BIN is missing: run scripts/gpu-check.sh --prepare first and carry $DIR" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
cuda_libs
parity cuda cuda
bench cuda "$DIR/huginn_d2048.cuda.loopc" bench/huginn_d2048.json /tmp/huginn_d2048.safetensors cuda 128 32 3
tar -czf "$OUT/logs.tar.gz" -C "$WORK" .
say "done in $(( $(date +%s) - T0 )) s; reports in $OUT"
exit $PARITY_FAILED
