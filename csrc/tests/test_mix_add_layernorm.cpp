// C++ test of noisynn::mix_add_layernorm_fwd_cpp / _bwd_cpp, called through the dispatcher, against a naive
// fp64 ATen computation: s = x + residual, an explicit K x K mixing matrix applied along the axis
// (prefix tokens unmixed), layer_norm; gradients by autograd.  Covers every kind and axis, both shift
// directions, both orders, a prefix token and an odd D.  When the CUDA implementation is built and a GPU is present, it is checked
// against the same computation on the GPU.  Exit status: 0 when every case passes.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../op_signatures.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr const char* kKinds[] = {"identity", "shift", "optimal", "dense"};
constexpr const char* kAxes[] = {"tokens", "rows", "batch"};
constexpr int64_t B = 3, P = 1, GH = 3, GW = 4, N = P + GH * GW, D = 37;
constexpr double kEps = 1e-6, kAlpha = 0.3;

int64_t mixed_k(int64_t axis) { return axis == 0 ? N - P : axis == 1 ? GH : B; }

// M = I + Q for each kind (fp64): y_i = sum_j M[i, j] s_j
Tensor mixing_matrix(int64_t kind, int64_t K, int64_t shift) {
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  if (kind == 0) return torch::eye(K, f64);
  if (kind == 1) {  // y_i = (1 - a) s_i + a s_{i-shift mod K}
    Tensor M = torch::eye(K, f64) * (1 - kAlpha);
    for (int64_t i = 0; i < K; ++i) M[i][(i + K - shift) % K] += kAlpha;
    return M;
  }
  if (kind == 2) return (torch::eye(K, f64) + torch::ones({K, K}, f64)) / static_cast<double>(K + 1);
  torch::manual_seed(1234 + K);
  return torch::eye(K, f64) + (torch::rand({K, K}, f64) * 2 - 1) * (0.4 / static_cast<double>(K));
}

// M applied to the patch tokens of t (B, N, D) along the axis; prefix tokens unchanged
Tensor apply_mix(const Tensor& t, const Tensor& M, int64_t axis) {
  const Tensor prefix = t.narrow(1, 0, P);
  const Tensor patches = t.narrow(1, P, N - P);
  Tensor mixed;
  if (axis == 0) {
    mixed = torch::einsum("ij,bjd->bid", {M, patches});
  } else if (axis == 1) {
    mixed = torch::einsum("ij,bjwd->biwd", {M, patches.reshape({B, GH, GW, D})}).reshape({B, N - P, D});
  } else {
    mixed = torch::einsum("ij,jnd->ind", {M, patches});
  }
  return torch::cat({prefix, mixed}, 1);
}

double max_err(const Tensor& a, const Tensor& b) {
  return (a.to(torch::kCPU, torch::kFloat64) - b.to(torch::kCPU, torch::kFloat64)).abs().max().item<double>();
}

// Runs one case on `device` (named `suffix` in messages); returns the number of failed checks.
int run_case(const std::string& suffix, const torch::Device& device, int64_t kind, int64_t axis, int64_t shift,
             bool mix_after_norm) {
  const auto& fwd = noisynn::mix_add_layernorm_fwd_op();
  const auto& bwd = noisynn::mix_add_layernorm_bwd_op();
  torch::manual_seed(static_cast<uint64_t>(100 * kind + 10 * axis + mix_after_norm));
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const Tensor x = torch::randn({B, N, D}, f64) * 2 + 0.5, res = torch::randn({B, N, D}, f64);
  const Tensor w = 1 + 0.5 * torch::randn({D}, f64), b = 0.3 * torch::randn({D}, f64);
  const Tensor gy = torch::randn({B, N, D}, f64), gr = torch::randn({B, N, D}, f64);
  const int64_t K = mixed_k(axis);
  const Tensor M = mixing_matrix(kind, K, shift);

  // naive fp64 reference with autograd
  const Tensor x64 = x.clone().requires_grad_(), r64 = res.clone().requires_grad_();
  const Tensor w64 = w.clone().requires_grad_(), b64 = b.clone().requires_grad_();
  const Tensor s = x64 + r64;
  Tensor ref_normed, ref_rout;
  if (mix_after_norm) {
    ref_rout = s;
    ref_normed = apply_mix(torch::layer_norm(s, {D}, w64, b64, kEps), M, axis);
  } else {
    ref_rout = apply_mix(s, M, axis);
    ref_normed = torch::layer_norm(ref_rout, {D}, w64, b64, kEps);
  }
  ((ref_normed * gy).sum() + (ref_rout * gr).sum()).backward();

  // the op, fp32 on `device`
  auto f32 = torch::TensorOptions().dtype(torch::kFloat32).device(device);
  const OptTensor Mop = kind == 3 ? OptTensor(M.to(f32)) : std::nullopt;
  const int64_t grid_w = axis == 1 ? GW : 1;
  auto [normed, rout, mean, rstd] = fwd.call(x.to(f32), res.to(f32), w.to(f32), b.to(f32), kEps, kind, axis, kAlpha,
                                             shift, Mop, P, grid_w, mix_after_norm, false);
  auto [dx, dw, db] = bwd.call(gy.to(f32), gr.to(f32), rout, w.to(f32), mean, rstd, kind, axis, kAlpha, shift, Mop, P,
                               grid_w, mix_after_norm);

  int failed = 0;
  const double tol = 2e-4;
  const std::pair<const char*, double> checks[] = {
      {"normed", max_err(normed, ref_normed.detach())}, {"residual_out", max_err(rout, ref_rout.detach())},
      {"dx", max_err(dx, x64.grad())},                  {"dresidual", max_err(dx, r64.grad())},
      {"dweight", max_err(dw, w64.grad())},             {"dbias", max_err(db, b64.grad())}};
  for (const auto& [name, err] : checks) {
    if (!(err <= tol)) {
      std::printf("FAIL %s kind=%s shift=%+d axis=%s mix_after_norm=%d: %s max error %.3g > %.1g\n", suffix.c_str(),
                  kKinds[kind], static_cast<int>(shift), kAxes[axis], mix_after_norm, name, err, tol);
      ++failed;
    }
  }
  return failed;
}

// Whether the op has an implementation for `key` (the CUDA one is registered only in CUDA builds).
bool has_kernel(const char* name, c10::DispatchKey key) {
  const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
  return op.has_value() && op->hasKernelForDispatchKey(key);
}

}  // namespace

int main() {
  int failed = 0, cases = 0;
  std::vector<std::pair<std::string, torch::Device>> targets = {{"cpu", torch::Device(torch::kCPU)}};
  if (has_kernel("noisynn::mix_add_layernorm_fwd_cpp", c10::DispatchKey::CUDA)) {
    if (torch::cuda::is_available()) {
      targets.emplace_back("cuda", torch::Device(torch::kCUDA, 0));
    } else {
      std::printf("the CUDA implementation is registered but no GPU is present: CUDA cases skipped\n");
    }
  }
  for (const auto& [suffix, device] : targets) {
    for (int64_t kind = 0; kind < 4; ++kind) {
      for (int64_t axis = 0; axis < 3; ++axis) {
        for (int64_t shift : {1, -1}) {
          if (kind != 1 && shift != 1) continue;  // the direction is the shift kind's only
          for (bool man : {false, true}) {
            failed += run_case(suffix, device, kind, axis, shift, man);
            ++cases;
          }
        }
      }
    }
  }
  std::printf("%d cases, %d failed checks\n", cases, failed);
  return failed == 0 ? 0 : 1;
}
