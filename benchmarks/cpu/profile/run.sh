#!/usr/bin/env bash
# Instruction counts of the CPU mix_add_layernorm kernels, next to ATen's add + layer_norm, with
# callgrind (repeatable on a busy machine, where wall-clock times are not).
#
#   benchmarks/cpu/profile/run.sh build              compile the harness (profile_op.cpp + the CPU op sources;
#                                                    NOISYNN_CSRC=DIR: from a copy of csrc/ instead)
#   benchmarks/cpu/profile/run.sh count ARGS...      instructions of ARGS (profile_op's arguments: WHAT KIND
#                                                    AXIS B N D ITERS), per call, and the top functions
#   benchmarks/cpu/profile/run.sh time ARGS...       wall time (no valgrind)
#
# Needs the venv's torch (python -c 'import torch') and valgrind.  Threads: OMP_NUM_THREADS (default 2);
# OMP_WAIT_POLICY=passive is set under valgrind so that idle threads do not spin (a spinning thread's
# instructions would be counted as work).  The harness is built into build/profile (ignored by git).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
bin="$root/build/profile/profile_op"
src="${NOISYNN_CSRC:-$root/csrc}"  # the C++ sources to build the op from (a copy, to try a change)
cmd="${1:-}"; shift || true

build() {  # objects in build/profile/obj; a source is recompiled when it or a csrc header is newer
  local torch_dir abi
  torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
  abi="$(python -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
  local obj="$root/build/profile/obj"
  mkdir -p "$obj"
  local flags=(-O3 -g -fopenmp -std=c++20 -DNDEBUG -D_GLIBCXX_USE_CXX11_ABI="$abi" -w
               -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include")
  local newest_header objs=() pids=()
  newest_header="$(ls -t "$src"/*.h "$src"/cpu/*.h | head -n 1)"
  for f in "$here/profile_op.cpp" "$src/ops.cpp" "$src/autograd.cpp" "$src/cpu/mix_add_layernorm.cpp" "$src/cpu/kernels_default.cpp" \
           "$src/cpu/kernels_avx2.cpp"; do
    local o="$obj/$(basename "$f" .cpp).o"
    objs+=("$o")
    if [ ! -e "$o" ] || [ "$f" -nt "$o" ] || [ "$newest_header" -nt "$o" ]; then
      g++ "${flags[@]}" -I"$src" -c "$f" -o "$o" & pids+=($!)
    fi
  done
  for p in "${pids[@]}"; do wait "$p"; done
  g++ -fopenmp "${objs[@]}" -L"$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" -Wl,--no-as-needed -ltorch_cpu -lc10 \
      -ltorch -o "$bin"
  echo "built $bin from $src" >&2
}

case "$cmd" in
  build) build ;;
  time) OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$bin" "$@" ;;
  count)
    out="$(mktemp -d)"
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" OMP_WAIT_POLICY=passive \
      valgrind --tool=callgrind --instr-atstart=no --separate-threads=no --callgrind-out-file="$out/cg.out" \
      "$bin" "$@" >"$out/stdout" 2>"$out/stderr" || { cat "$out/stderr" >&2; exit 1; }
    iters="${!#}"
    total="$(callgrind_annotate "$out/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')"
    echo "$* : $((total / iters)) instructions per call ($total over $iters calls)"
    callgrind_annotate --inclusive=no "$out/cg.out" 2>/dev/null | sed -n '/^Ir/,$p' | head -n "${TOP:-25}"
    echo "callgrind output: $out/cg.out" >&2
    ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
