// The autograd formula of noisynn::mix_add_layernorm_fwd_cpp, in C++ (the Autograd dispatch key: every
// device's implementation goes through it).  A Python formula (torch.library.register_autograd) costs
// about 90 us per forward call on CPU, as much as the whole kernel at ViT-S sizes; this one costs a few.
//
// Autograd: x, residual, weight and bias are differentiable; the dense mix_matrix is a constant; mean and
// rstd are not differentiable (returned detached); no double backward (the gradients of a
// create_graph=True backward raise when differentiated).  Works under compiled autograd.  straight_through
// runs the mixed forward and an identity backward.  Gradients are not materialized: when residual_out gets
// no gradient (the usual case), the backward op receives no d_residual_out instead of zeros.  x and
// residual receive the same gradient tensor, as autograd's own x + residual does.  dweight / dbias come
// back in weight's / bias's dtype.  Under torch.compile the formula is traced like any C++ autograd kernel: the forward and
// backward ops appear in the joint graph through their fakes (ops/mix_add_layernorm/cpp.py).
#include "op_codes.h"
#include "op_signatures.h"

#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace noisynn {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

// undefined for an absent optional tensor (what SavedVariable keeps as "none")
Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

OptTensor defined_or_none(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// A new autograd node: torch's nodes are owned by c10::intrusive_ptr in recent releases and by
// std::shared_ptr in older ones (set_history takes whichever the installed torch uses).
template <typename N, typename... Args>
auto make_node(Args&&... args) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return c10::make_intrusive<N>(std::forward<Args>(args)...);
  } else {
    return std::make_shared<N>(std::forward<Args>(args)...);
  }
}

class MixAddLayerNormFunction : public torch::autograd::Function<MixAddLayerNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& residual,
                               const OptTensor& weight, const OptTensor& bias, double eps, int64_t kind,
                               int64_t axis, double alpha, int64_t shift, const OptTensor& mix_matrix,
                               int64_t prefix_tokens, int64_t grid_w, bool mix_after_norm, bool straight_through) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [normed, residual_out, mean, rstd] =
        mix_add_layernorm_fwd_op().call(x, residual, weight, bias, eps, kind, axis, alpha, shift, mix_matrix,
                                        prefix_tokens, grid_w, mix_after_norm, straight_through);
    // mean / rstd are not differentiable: the wrapper below returns them detached.  (Not
    // mark_non_differentiable: compiled autograd refuses C++ functions that use it.)
    ctx->set_materialize_grads(false);  // an unused residual_out costs no zero-filled gradient
    ctx->save_for_backward({residual_out, or_undefined(weight), mean, rstd, or_undefined(mix_matrix)});
    ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
    ctx->saved_data["bias_dtype"] =
        bias.has_value() && bias->defined() ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
    ctx->saved_data["kind"] = straight_through ? KIND_IDENTITY : kind;  // forward M x, gradient the identity
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["shift"] = shift;
    ctx->saved_data["prefix_tokens"] = prefix_tokens;
    ctx->saved_data["grid_w"] = grid_w;
    ctx->saved_data["mix_after_norm"] = mix_after_norm;
    return {normed, residual_out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    constexpr size_t kInputs = 14;
    variable_list out(kInputs);
    Tensor d_normed = grads[0];
    const Tensor& d_residual_out = grads[1];
    if (!d_normed.defined() && !d_residual_out.defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& residual_out = saved[0];
    const Tensor& weight = saved[1];
    if (!d_normed.defined()) d_normed = at::zeros_like(residual_out);
    const auto& s = ctx->saved_data;
    // A backward that records a graph (create_graph=True) would make these gradients differentiable;
    // the op has no double backward, so they get an Error node instead: differentiating them raises.
    // (Through the dispatcher's autograd fallback they would get a node that warns and gives wrong
    // second derivatives.)
    const bool recorded = at::GradMode::is_enabled() &&
                          (d_normed.requires_grad() || (d_residual_out.defined() && d_residual_out.requires_grad()) ||
                           residual_out.requires_grad() || (weight.defined() && weight.requires_grad()));
    Tensor dx, dw, db;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dx, dw, db) = mix_add_layernorm_bwd_op().call(
          d_normed, defined_or_none(d_residual_out), residual_out, defined_or_none(weight), saved[2], saved[3],
          s.at("kind").toInt(), s.at("axis").toInt(), s.at("alpha").toDouble(), s.at("shift").toInt(),
          defined_or_none(saved[4]), s.at("prefix_tokens").toInt(), s.at("grid_w").toInt(),
          s.at("mix_after_norm").toBool());
    }
    out[0] = dx;
    if (s.at("has_residual").toBool()) out[1] = dx;
    if (weight.defined()) out[2] = dw.to(weight.scalar_type());
    const int64_t bias_dtype = s.at("bias_dtype").toInt();
    if (bias_dtype >= 0) out[3] = db.to(static_cast<at::ScalarType>(bias_dtype));
    if (recorded) {
      auto error = make_node<torch::autograd::Error>(
          "noisynn mix_add_layernorm has no double backward: the gradients it computed (here, with "
          "create_graph=True) are not differentiable; for higher-order gradients use backend='reference'",
          torch::autograd::collect_next_edges(d_normed, d_residual_out, residual_out, weight));
      // out[1] is out[0]'s tensor (one history for both)
      for (size_t i : {0, 2, 3}) {
        if (out[i].defined()) torch::autograd::set_history(out[i], error);
      }
    }
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> mix_add_layernorm_fwd_autograd(
    const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias, double eps,
    int64_t kind, int64_t axis, double alpha, int64_t shift, const OptTensor& mix_matrix, int64_t prefix_tokens,
    int64_t grid_w, bool mix_after_norm, bool straight_through) {
  const variable_list r = MixAddLayerNormFunction::apply(x, residual, weight, bias, eps, kind, axis, alpha, shift,
                                                         mix_matrix, prefix_tokens, grid_w, mix_after_norm,
                                                         straight_through);
  auto plain = [](const Tensor& t) { return t.requires_grad() ? t.detach() : t; };
  return {r[0], r[1], plain(r[2]), plain(r[3])};
}

}  // namespace

TORCH_LIBRARY_IMPL(noisynn, Autograd, m) {
  m.impl("mix_add_layernorm_fwd_cpp", &mix_add_layernorm_fwd_autograd);
}

}  // namespace noisynn
