// Argument checks and preparation shared by the C++ CPU and CUDA op functions
// (csrc/cpu/mix_add_layernorm.cpp, csrc/cuda/mix_add_layernorm_op.cpp): one schema, one set of checks.
// Host code only (ATen tensors); the kernels never see these.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <optional>

#include "op_codes.h"

namespace noisynn {
namespace op_checks {

// (B, N, D) tokens of a supported dtype on a `device_type` device; valid codes, shift direction and geometry.
inline void check_common(const char* op, const at::Tensor& t, c10::DeviceType device_type, int64_t kind,
                         int64_t axis, int64_t shift, int64_t prefix_tokens, int64_t grid_w) {
  TORCH_CHECK(t.dim() == 3, op, ": expected (B, N, D) tokens, got shape ", t.sizes());
  TORCH_CHECK(t.device().type() == device_type, op, ": expected ", c10::DeviceTypeName(device_type, true),
              " tensors, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              op, ": expected float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(kind >= KIND_IDENTITY && kind <= KIND_DENSE, op, ": kind code must be 0..3, got ", kind);
  TORCH_CHECK(axis >= AXIS_TOKENS && axis <= AXIS_BATCH, op, ": axis code must be 0..2, got ", axis);
  TORCH_CHECK(shift == 1 || shift == -1, op, ": shift must be +1 (row i reads row i-1) or -1 (row i+1), got ", shift);
  const int64_t N = t.size(1);
  TORCH_CHECK(prefix_tokens >= 0 && prefix_tokens < N, op, ": prefix_tokens must be in [0, N = ", N, "), got ",
              prefix_tokens);
  TORCH_CHECK(grid_w >= 1, op, ": grid_w must be >= 1, got ", grid_w);
  if (axis == AXIS_ROWS && kind != KIND_IDENTITY) {
    TORCH_CHECK((N - prefix_tokens) % grid_w == 0, op, ": grid_w = ", grid_w, " does not divide the ",
                N - prefix_tokens, " patch tokens");
  }
}

inline void check_same_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ", like.device());
}

// Rows mixed together (what a dense matrix must match).
inline int64_t group_size(int64_t B, int64_t N, int64_t prefix_tokens, int64_t axis, int64_t grid_w) {
  const int64_t n = N - prefix_tokens;
  return axis == AXIS_TOKENS ? n : axis == AXIS_ROWS ? n / grid_w : B;
}

// The K x K fp32 mixing matrix on `device` (dense only; else undefined).
inline at::Tensor dense_matrix(const char* op, const std::optional<at::Tensor>& mix_matrix, int64_t kind, int64_t K,
                               const at::Device& device) {
  if (kind != KIND_DENSE) return at::Tensor();
  TORCH_CHECK(mix_matrix.has_value() && mix_matrix->defined(), op, ": kind dense needs mix_matrix");
  TORCH_CHECK(mix_matrix->dim() == 2 && mix_matrix->size(0) == K && mix_matrix->size(1) == K, op,
              ": mix_matrix must be (", K, ", ", K, "), got ", mix_matrix->sizes());
  return mix_matrix->to(device, at::kFloat).contiguous();
}

// LayerNorm affine parameter as a contiguous fp32 (D,) tensor on `device` (undefined when absent).
inline at::Tensor param_f32(const std::optional<at::Tensor>& t, int64_t D, const char* op, const char* name,
                            const at::Device& device) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == D, op, ": ", name, " must have shape (", D, "), got ", t->sizes());
  return t->to(device, at::kFloat).contiguous();
}

}  // namespace op_checks
}  // namespace noisynn
