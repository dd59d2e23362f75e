// The C++ signatures of the ops declared in ops.cpp, for code that calls them through the dispatcher
// (the autograd formula, the C++ test, the profile harness): one definition, next to the schemas it
// must match (a mismatch fails at the first call, in typed<Sig>()'s schema check).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace noisynn {

// (normed, residual_out, mean, rstd) <- (x, residual, weight, bias, eps, kind, axis, alpha, shift,
// mix_matrix, prefix_tokens, grid_w, mix_after_norm, straight_through)
using MixAddLayerNormFwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, double, int64_t, int64_t, double, int64_t, const std::optional<at::Tensor>&,
    int64_t, int64_t, bool, bool);

// (dx, dweight, dbias) <- (d_normed, d_residual_out, residual_out, weight, mean, rstd, kind, axis, alpha,
// shift, mix_matrix, prefix_tokens, grid_w, mix_after_norm)
using MixAddLayerNormBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, int64_t, const std::optional<at::Tensor>&, int64_t,
    int64_t, bool);

// The typed handles of noisynn::mix_add_layernorm_fwd_cpp / _bwd_cpp, looked up once (the library must
// be loaded: ops.cpp's registration has run).
inline const c10::TypedOperatorHandle<MixAddLayerNormFwdSig>& mix_add_layernorm_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("noisynn::mix_add_layernorm_fwd_cpp", "")
                             .typed<MixAddLayerNormFwdSig>();
  return op;
}

inline const c10::TypedOperatorHandle<MixAddLayerNormBwdSig>& mix_add_layernorm_bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("noisynn::mix_add_layernorm_bwd_cpp", "")
                             .typed<MixAddLayerNormBwdSig>();
  return op;
}

}  // namespace noisynn
