#!/usr/bin/env bash
# Re-run every committed CPU benchmark folder of benchmarks/results/ (the noisynn command of the
# installed package, on an otherwise idle machine): usage  benchmarks/cpu/run.sh [OUT]
#
# Each run writes OUT/<folder>/ (noisynn_bench.json, table.txt, plots).  OUT defaults to a folder
# outside the work tree, so that no run sees (or records) a modified tree; copy the folders into
# benchmarks/results/ afterwards.  About 15 minutes on a 2-core CPU.
set -euo pipefail
out="${1:-${OUT:-/tmp/noisynn-cpu-bench}}"
mkdir -p "$out"
reuse="glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"

run() {  # run FOLDER ENV... -- ARGS...
  local name="$1"; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  echo "== $name: ${envs[*]:-} noisynn bench $*" >&2
  local start=$SECONDS
  mkdir -p "$out/$name"
  env "${envs[@]}" noisynn bench "$@" --out "$out/$name" | sed -e '/^results: /d' -e '/^plots: /d' > "$out/$name/table.txt"
  echo "   $name done in $((SECONDS - start)) s" >&2
}

run cpu-2core-default --
run cpu-2core-ops-compile -- --models --no-attention --op-sizes 8 16 32 64 --compile
run cpu-2core-ops-reuse-malloc GLIBC_TUNABLES="$reuse" -- --models --no-attention --op-sizes 8 16 32 64 --compile
run cpu-2core-ops-hugepages NOISYNN_CPU_HUGEPAGES=1 -- --models --no-attention --op-sizes
echo "results in $out" >&2
