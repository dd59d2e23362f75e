// The schemas of the package's C++ ops, declared once: noisynn::mix_add_layernorm_fwd_cpp and
// noisynn::mix_add_layernorm_bwd_cpp.  Their CPU implementation is registered in
// cpu/mix_add_layernorm.cpp, their CUDA implementation (when built with CUDA) in
// cuda/mix_add_layernorm_op.cpp, each by dispatch key, so the device of the tensors picks the code.
// The autograd formula is autograd.cpp (the Autograd key: every device); the fake (meta)
// implementations are registered once, in Python, in the module named below.  Semantics: noisynn_kernels/ops/mix_add_layernorm/__init__.py.
#include <torch/library.h>

TORCH_LIBRARY(noisynn, m) {
  m.set_python_module("noisynn_kernels.ops.mix_add_layernorm.cpp");
  m.def(
      "mix_add_layernorm_fwd_cpp(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, int kind, "
      "int axis, float alpha, int shift, Tensor? mix_matrix, int prefix_tokens, int grid_w, bool mix_after_norm, "
      "bool straight_through) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "mix_add_layernorm_bwd_cpp(Tensor d_normed, Tensor? d_residual_out, Tensor residual_out, Tensor? weight, "
      "Tensor mean, Tensor rstd, int kind, int axis, float alpha, int shift, Tensor? mix_matrix, int prefix_tokens, "
      "int grid_w, bool mix_after_norm) -> (Tensor, Tensor, Tensor)");
}
