// The CUDA implementation of noisynn::mix_add_layernorm_fwd_cpp / _bwd_cpp (schemas in csrc/ops.cpp):
// the op functions (checks, dtype and layout normalization, output allocation) and their
// registration for the CUDA dispatch key; the kernels are in mix_add_layernorm.cu.  The CPU
// implementation is csrc/cpu/mix_add_layernorm.cpp; fakes and autograd live in Python, in
// noisynn_kernels/ops/mix_add_layernorm/cpp.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "mix_add_layernorm.h"
#include "../op_checks.h"

namespace noisynn {
namespace {

using at::Tensor;
using op_checks::check_same_device;
using op_checks::param_f32;

std::tuple<Tensor, Tensor, Tensor, Tensor> mix_add_layernorm_fwd_cuda(
    const Tensor& x_in, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, double eps, int64_t kind, int64_t axis, double alpha, int64_t shift,
    const std::optional<Tensor>& mix_matrix, int64_t prefix_tokens, int64_t grid_w, bool mix_after_norm,
    bool straight_through) {
  (void)straight_through;  // only changes the backward (handled by the autograd formula)
  constexpr const char* op = "noisynn::mix_add_layernorm_fwd_cpp (CUDA)";
  op_checks::check_common(op, x_in, c10::DeviceType::CUDA, kind, axis, shift, prefix_tokens, grid_w);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2);
  const Tensor x = x_in.contiguous();
  Tensor res;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == x_in.sizes(), op, ": residual has shape ", residual->sizes(), ", expected ",
                x_in.sizes());
    check_same_device(op, *residual, "residual", x_in);
    res = residual->to(x.scalar_type()).contiguous();
  }
  const Tensor w = param_f32(weight, D, op, "weight", x.device());
  const Tensor b = param_f32(bias, D, op, "bias", x.device());
  Tensor normed = at::empty({B, N, D}, x.options());
  Tensor rout = at::empty({B, N, D}, x.options());
  Tensor mean = at::empty({B * N}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({B * N}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {normed, rout, mean, rstd};
  const int64_t K = op_checks::group_size(B, N, prefix_tokens, axis, grid_w);
  const cuda::MixSpec spec{B, N, D, prefix_tokens, grid_w, kind, axis, static_cast<float>(alpha),
                           op_checks::dense_matrix(op, mix_matrix, kind, K, x.device()), kind == KIND_SHIFT && shift < 0};
  cuda::launch_fwd(x, res, w, b, static_cast<float>(eps), spec, mix_after_norm, normed, rout, mean, rstd);
  return {normed, rout, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> mix_add_layernorm_bwd_cuda(
    const Tensor& d_normed, const std::optional<Tensor>& d_residual_out, const Tensor& residual_out,
    const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& rstd, int64_t kind, int64_t axis,
    double alpha, int64_t shift, const std::optional<Tensor>& mix_matrix, int64_t prefix_tokens, int64_t grid_w,
    bool mix_after_norm) {
  constexpr const char* op = "noisynn::mix_add_layernorm_bwd_cpp (CUDA)";
  op_checks::check_common(op, residual_out, c10::DeviceType::CUDA, kind, axis, shift, prefix_tokens, grid_w);
  const c10::cuda::CUDAGuard guard(residual_out.device());
  const int64_t B = residual_out.size(0), N = residual_out.size(1), D = residual_out.size(2);
  const auto dtype = residual_out.scalar_type();
  TORCH_CHECK(d_normed.sizes() == residual_out.sizes(), op, ": d_normed has shape ", d_normed.sizes(), ", expected ",
              residual_out.sizes());
  TORCH_CHECK(mean.numel() == B * N && rstd.numel() == B * N, op, ": mean / rstd must have B * N = ", B * N,
              " elements");
  check_same_device(op, d_normed, "d_normed", residual_out);
  check_same_device(op, mean, "mean", residual_out);
  check_same_device(op, rstd, "rstd", residual_out);
  const Tensor r = residual_out.contiguous();
  const Tensor dy = d_normed.to(dtype).contiguous();
  Tensor dres;
  if (d_residual_out.has_value() && d_residual_out->defined()) {
    TORCH_CHECK(d_residual_out->sizes() == residual_out.sizes(), op, ": d_residual_out has shape ",
                d_residual_out->sizes(), ", expected ", residual_out.sizes());
    check_same_device(op, *d_residual_out, "d_residual_out", residual_out);
    dres = d_residual_out->to(dtype).contiguous();
  }
  const Tensor w = param_f32(weight, D, op, "weight", r.device());
  const Tensor mu = mean.to(at::kFloat).contiguous();
  const Tensor rs = rstd.to(at::kFloat).contiguous();
  Tensor dx = at::empty({B, N, D}, residual_out.options());
  const auto f32 = residual_out.options().dtype(at::kFloat);
  if (residual_out.numel() == 0) return {dx, at::zeros({D}, f32), at::zeros({D}, f32)};
  Tensor dw = at::empty({D}, f32);  // every element written by the kernels
  Tensor db = at::empty({D}, f32);
  const int64_t K = op_checks::group_size(B, N, prefix_tokens, axis, grid_w);
  const cuda::MixSpec spec{B, N, D, prefix_tokens, grid_w, kind, axis, static_cast<float>(alpha),
                           op_checks::dense_matrix(op, mix_matrix, kind, K, r.device()), kind == KIND_SHIFT && shift < 0};
  cuda::launch_bwd(dy, dres, r, w, mu, rs, spec, mix_after_norm, dx, dw, db);
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(noisynn, CUDA, m) {
  m.impl("mix_add_layernorm_fwd_cpp", &mix_add_layernorm_fwd_cuda);
  m.impl("mix_add_layernorm_bwd_cpp", &mix_add_layernorm_bwd_cuda);
}

}  // namespace noisynn
