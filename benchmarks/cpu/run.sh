#!/usr/bin/env bash
# The committed CPU benchmark run, in one command (the installed package's `noisynn bench`, on an
# otherwise idle machine):
#
#   benchmarks/cpu/run.sh [--only ops|models] [OUT]
#
# writes OUT/cpu-2core-<part>/ folders (noisynn_bench.json, table.txt, plots) and OUT/summary.md
# (python -m noisynn_kernels.bench.summary: the ratios of every op and model row).  OUT defaults to a
# folder outside the work tree, so that no run sees (or records) a modified tree; copy the folders into
# benchmarks/results/ afterwards.
#
#   ops     every kind (identity, optimal, shift, dense) and axis (tokens, rows), forward and
#           forward+backward, at (8, 197, 192), (16, 197, 384), (32, 197, 384), (32, 197, 768),
#           (64, 197, 768) and (64, 197, 1024), fp32, against eager, add + LayerNorm, compiled and
#           compiled_ref (torch.compile of the package's O(k d) formulation); 30 rounds each.
#   models  ViT-S/16 (batch 16) and ViT-B/16 (batch 8), inference and training step, fp32 and bf16:
#           plain timm, eager noisy, swapped, and torch.compile of the eager noisy model, of plain timm
#           and of the swapped model; 15 rounds each.
#
# About 40 minutes for ops and 70 for models on the 2-core CPU (torch.compile takes a good part of it).
set -euo pipefail
only=""
if [ "${1:-}" = "--only" ]; then only="$2"; shift 2; fi
out="${1:-${OUT:-/tmp/noisynn-cpu-bench}}"
mkdir -p "$out"

run() {  # run FOLDER ARGS...
  local name="$1"; shift
  echo "== $name: noisynn bench $*" >&2
  local start=$SECONDS
  mkdir -p "$out/$name"
  noisynn bench "$@" --out "$out/$name" | sed -e '/^results: /d' -e '/^plots: /d' > "$out/$name/table.txt"
  echo "   $name done in $((SECONDS - start)) s" >&2
}

if [ -z "$only" ] || [ "$only" = ops ]; then
  for shape in "8 197 192" "16 197 384" "32 197 384" "32 197 768" "64 197 768" "64 197 1024"; do
    set -- $shape
    run "cpu-2core-ops-$1x$2x$3" --models --no-attention --op-shape $shape --op-sizes --compile --iters 30
  done
fi
if [ -z "$only" ] || [ "$only" = models ]; then
  for dtype in float32 bfloat16; do
    run "cpu-2core-models-vit-s16-b16-$dtype" --no-ops --no-attention --models noisy_vit_small_patch16_224 \
        --batch-size 16 --dtype "$dtype" --compile --iters 30
    run "cpu-2core-models-vit-b16-b8-$dtype" --no-ops --no-attention --models noisy_vit_base_patch16_224 \
        --batch-size 8 --dtype "$dtype" --compile --iters 30
  done
fi
python -m noisynn_kernels.bench.summary "$out" > "$out/summary.md"
echo "results in $out (summary: $out/summary.md)" >&2
