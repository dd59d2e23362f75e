#!/usr/bin/env bash
# One-shot GPU validation and benchmark run of noisynn_kernels on any CUDA machine:
#
#   bash benchmarks/gpu/run.sh [--dry-run] [--quick] [--out DIR]
#
# Installs the package into the Python that holds torch without touching torch (no deps, no build
# isolation, CUDA kernels required, compiled for this GPU's architecture), runs every GPU test into a
# log, then `noisynn bench` on CUDA: the ops and noisy attention at ViT-B and ViT-L shapes in fp32 and
# bf16 with the torch.compile competitors, and model rows (NoisyViT-B/16 training step under bf16
# autocast at batch 64: plain timm, eager noisy, swapped, compiled).  Everything lands in one folder
# (DIR, else $OUT, else ./gpu-results): JSON, tables, plots, logs and summary.md (device, versions,
# commit, each phase's status and time), packed as noisynn-gpu-results.tar.gz beside them.
#
# Each phase has its own time budget (they add up to 9 minutes; most phases take well under theirs);
# a phase that overruns is cut and reported, and the next one runs.  The whole run is sized for 8
# minutes on an H100 / H200.  NOISYNN_COMMIT names the commit where the tree has no .git.  --quick: the GPU-marked tests and
# one short bench (about 3 minutes).  --dry-run: print every command, run nothing, exit 0 (any machine).
set -uo pipefail

dry=0 quick=0 out="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --quick) quick=1 ;;
    --out) shift; out="${1:?--out needs a directory}" ;;
    --out=*) out="${1#--out=}" ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (expected --dry-run, --quick, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/../.."
out="${out:-$PWD/gpu-results}"
res="$out/results"
PY="${PYTHON:-python3}"
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"

# The GPU's own architecture (TORCH_CUDA_ARCH_LIST syntax, e.g. 9.0) unless the caller set one.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "9.0")
else
  arch="$TORCH_CUDA_ARCH_LIST"
fi

summary_rows=()
run_start=$SECONDS

phase() {  # phase NAME BUDGET_S CMD...: run CMD with output in $res/NAME.log, cut after BUDGET_S
  local name="$1" budget="$2"; shift 2
  if [ "$dry" = 1 ]; then
    printf '[%s, budget %ss]\n ' "$name" "$budget"; printf ' %q' "$@"; printf '\n'
    return 0
  fi
  local start=$SECONDS status rc
  echo "== $name (budget ${budget}s): $*" >&2
  timeout --signal=INT --kill-after=15 "$budget" "$@" > "$res/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124|137) status="CUT at ${budget}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  local took=$((SECONDS - start))
  echo "   $name: $status in ${took}s (log: $res/$name.log)" >&2
  summary_rows+=("| $name | $status | ${took} s | ${budget} s | \`$*\` |")
  return 0
}

bench() {  # bench NAME BUDGET_S ARGS...: noisynn bench on CUDA into $res/NAME/
  local name="$1" budget="$2"; shift 2
  phase "$name" "$budget" env MPLBACKEND=Agg "$PY" -m noisynn_kernels.cli bench --device cuda --out "$res/$name" "$@"
}

if [ "$dry" = 0 ]; then
  mkdir -p "$res"
  { nvidia-smi 2>&1 || echo "nvidia-smi: not available"; } > "$res/nvidia-smi.txt"
fi

phase install 150 env NOISYNN_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
  "$PY" -m pip install --no-deps --no-build-isolation -e .
phase info 30 "$PY" -m noisynn_kernels.cli info
if [ "$quick" = 1 ]; then
  phase gpu-tests 120 "$PY" -m pytest -q -ra -m gpu tests
  bench bench-quick 90 --models --no-attention --op-sizes --iters 5
else
  # Every GPU-marked test, and the op test modules in full: with a GPU they run the compiled Triton
  # and CUDA kernels (the cuda and triton backends) against the reference.
  phase gpu-tests 120 "$PY" -m pytest -q -ra -m "gpu or not slow" tests/test_mix_add_layernorm.py \
    tests/test_noisy_attention.py tests/test_random_noise.py tests/test_swap_fused_ops.py tests/test_bench.py
  phase gpu-tests-rest 40 "$PY" -m pytest -q -ra -m gpu tests --deselect tests/test_mix_add_layernorm.py \
    --deselect tests/test_noisy_attention.py --deselect tests/test_random_noise.py \
    --deselect tests/test_swap_fused_ops.py --deselect tests/test_bench.py
  bench bench-vitb-fp32 50 --models --compile --dtype float32 --op-shape 64 197 768 --op-sizes 8 32 128 \
    --attn-shape 64 12 197 64
  bench bench-vitl-bf16 40 --models --compile --dtype bfloat16 --op-shape 32 197 1024 --op-sizes \
    --attn-shape 32 16 197 64
  bench bench-models-vitb-amp 110 --no-ops --no-attention --compile --models noisy_vit_base_patch16_224 \
    --batch-size 64 --amp bfloat16
fi

if [ "$dry" = 1 ]; then
  echo "[pack]"
  echo "  tar -czf $out/noisynn-gpu-results.tar.gz -C $out results"
  exit 0
fi

# The commit: NOISYNN_COMMIT for a copy of the tree without .git (the bench rows read it too).
if [ -n "${NOISYNN_COMMIT:-}" ]; then
  commit="$NOISYNN_COMMIT"
else
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  [ "$commit" != unknown ] && { git diff --quiet HEAD 2>/dev/null || commit="$commit-dirty"; }
fi
versions=$("$PY" - <<'EOF' 2>/dev/null
import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "none"
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"- device: {dev}\n- python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {tv}")
EOF
)
{
  echo "# noisynn_kernels GPU run"
  echo
  echo "${versions:-- device / versions: unknown (python failed)}"
  echo "- commit: $commit; architecture built: $arch; mode: $([ "$quick" = 1 ] && echo quick || echo full)"
  echo "- wall time: $((SECONDS - run_start)) s"
  echo
  echo "| phase | status | time | budget | command |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${summary_rows[@]}"
  echo
  echo "Test results (last lines of each test log):"
  for log in "$res"/gpu-tests*.log; do
    [ -f "$log" ] && { echo; echo "\`$(basename "$log")\`:"; echo '```'; tail -n 5 "$log"; echo '```'; }
  done
  echo
  echo "Benchmark tables: results/bench-*/table (in each phase's log) and noisynn_bench.json."
} > "$res/summary.md"
cp "$res/summary.md" "$out/summary.md"
tar -czf "$out/noisynn-gpu-results.tar.gz" -C "$out" results
echo "summary: $out/summary.md; everything: $out/noisynn-gpu-results.tar.gz" >&2
