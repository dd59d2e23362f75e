// Host interface of the CUDA fused residual add + (I + Q) mix + LayerNorm (mix_add_layernorm.cu).
//
// The op functions (argument checks, output allocation, registration) are in mix_add_layernorm_op.cpp,
// compiled by the host compiler; the .cu file holds the kernels and the launchers below, which take
// tensors that are already checked, contiguous, on one CUDA device and of the right dtypes.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../op_codes.h"
#include "build_info.h"

namespace noisynn {
namespace cuda {

// What is mixed and how: (B, N, D) tokens, P prefix tokens, the kind / axis codes, alpha (shift),
// grid_w (axis rows), the K x K fp32 mixing matrix on the tensors' device (dense; else undefined) and
// `reverse`: a shift of direction -1 (row i reads row i+1; M is the +1 shift's transpose).
struct MixSpec {
  int64_t B, N, D, P, grid_w;
  int64_t kind, axis;
  float alpha;
  at::Tensor mix;
  bool reverse;
};

// Forward.  x, res: (B, N, D) of one dtype (res may be undefined); w, b: (D,) fp32 or undefined.
// Writes normed, residual_out (x's dtype) and mean, rstd ((B * N,) fp32); needs numel > 0.
void launch_fwd(const at::Tensor& x, const at::Tensor& res, const at::Tensor& w, const at::Tensor& b, float eps,
                const MixSpec& spec, bool mix_after_norm, const at::Tensor& normed, const at::Tensor& residual_out,
                const at::Tensor& mean, const at::Tensor& rstd);

// Backward.  dy, dres (may be undefined), r (the saved residual_out): (B, N, D) of one dtype; w: (D,)
// fp32 or undefined; mean, rstd: (B * N,) fp32.  Writes dx (r's dtype) and dweight, dbias ((D,) fp32).
void launch_bwd(const at::Tensor& dy, const at::Tensor& dres, const at::Tensor& r, const at::Tensor& w,
                const at::Tensor& mean, const at::Tensor& rstd, const MixSpec& spec, bool mix_after_norm,
                const at::Tensor& dx, const at::Tensor& dweight, const at::Tensor& dbias);

}  // namespace cuda
}  // namespace noisynn
