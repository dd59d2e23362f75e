// Profile harness of the CPU mix_add_layernorm op (no Python): one configuration, called through the
// dispatcher exactly as the registered op runs, next to plain ATen add + layer_norm on the same inputs.
//
//   profile_op WHAT KIND AXIS B N D ITERS
//     WHAT  fwd | bwd (the noisynn op) | ln (at::add then at::layer_norm) | lnbwd (layer_norm backward)
//     KIND  identity | shift | optimal | dense      AXIS  tokens | rows | batch
//
// One prefix token, a square patch grid (N - 1 = gh * gw).  Two warm-up calls, then ITERS timed calls;
// under callgrind only the timed calls are counted (run with --instr-atstart=no; the harness turns
// instrumentation on around them), so `callgrind_annotate` shows the instructions of ITERS calls.  Without
// valgrind it prints the median wall time per call.  Build and use: benchmarks/cpu/profile/run.sh.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <valgrind/callgrind.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "op_signatures.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

int64_t code(const char* name, const std::vector<std::string>& names) {
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == name) return static_cast<int64_t>(i);
  }
  std::fprintf(stderr, "unknown name %s\n", name);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr, "usage: %s fwd|bwd|ln|lnbwd KIND AXIS B N D ITERS\n", argv[0]);
    return 2;
  }
  const std::string what = argv[1];
  const int64_t kind = code(argv[2], {"identity", "shift", "optimal", "dense"});
  const int64_t axis = code(argv[3], {"tokens", "rows", "batch"});
  const int64_t B = std::atoll(argv[4]), N = std::atoll(argv[5]), D = std::atoll(argv[6]);
  const int iters = std::atoi(argv[7]);
  const int64_t P = 1;
  const int64_t gh = static_cast<int64_t>(std::sqrt(static_cast<double>(N - P)));
  const int64_t gw = (N - P) / gh;
  const int64_t K = axis == 0 ? N - P : axis == 1 ? gh : B;
  at::manual_seed(0);
  const Tensor x = at::randn({B, N, D}), res = at::randn({B, N, D}), dy = at::randn({B, N, D});
  const Tensor w = at::randn({D}), b = at::randn({D});
  OptTensor M;
  if (kind == 3) M = at::eye(K) + at::rand({K, K}) / static_cast<double>(K);
  const auto& fwd = noisynn::mix_add_layernorm_fwd_op();
  const auto& bwd = noisynn::mix_add_layernorm_bwd_op();
  auto run_fwd = [&] { return fwd.call(x, res, w, b, 1e-6, kind, axis, 0.3, 1, M, P, gw, false, false); };
  const auto saved = run_fwd();
  const Tensor s = x + res;
  const auto ln_saved = at::native_layer_norm(s, {D}, w, b, 1e-6);
  auto once = [&] {
    if (what == "fwd") {
      (void)run_fwd();
    } else if (what == "bwd") {
      (void)bwd.call(dy, std::nullopt, std::get<1>(saved), w, std::get<2>(saved), std::get<3>(saved), kind, axis,
                     0.3, 1, M, P, gw, false);
    } else if (what == "ln") {
      (void)at::layer_norm(x + res, {D}, w, b, 1e-6);
    } else if (what == "lnbwd") {
      (void)at::native_layer_norm_backward(dy, s, {D}, std::get<1>(ln_saved), std::get<2>(ln_saved), w, b,
                                           {true, true, true});
    } else {
      std::fprintf(stderr, "unknown WHAT %s\n", what.c_str());
      std::exit(2);
    }
  };
  once();
  once();
  std::vector<double> times;
  CALLGRIND_START_INSTRUMENTATION;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    once();
    times.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  CALLGRIND_STOP_INSTRUMENTATION;
  std::sort(times.begin(), times.end());
  std::printf("%s %s/%s (%lld, %lld, %lld) threads %d: median %.1f us, min %.1f us over %d calls\n", what.c_str(),
              argv[2], argv[3], static_cast<long long>(B), static_cast<long long>(N), static_cast<long long>(D),
              at::get_num_threads(), times[times.size() / 2], times[0], iters);
  return 0;
}
