// Kernel interface of the CPU fused residual add + (I + Q) mix + LayerNorm.
//
// The op functions (argument checks, output allocation, registration) are in mix_add_layernorm.cpp.
// The kernels are compiled once per instruction set from one source, mix_add_layernorm_kernels.h:
//   isa_default  kernels_default.cpp  the compiler's baseline for the target (SSE2 on x86-64)
//   isa_avx2     kernels_avx2.cpp     AVX2 + FMA (x86-64 with GCC; else not compiled)
// and the op picks one at run time (cpu_isa()): AVX2 when ATen itself runs its AVX2 (or AVX512)
// kernels on this machine, so ATEN_CPU_CAPABILITY=default selects the baseline here too.
// The kernels take raw pointers to contiguous memory: no ATen tensor code is compiled for AVX2.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../op_codes.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NOISYNN_CPU_AVX2 1
#else
#define NOISYNN_CPU_AVX2 0
#endif

namespace noisynn {
namespace cpu {

// C (m x n) = op(A) @ B for fp32 row-major blocks: A is m x m (square, row stride m; op(A) = A^T when
// trans_a), B and C are m x n with row strides ldb, ldc.  Called from the kernels' parallel tasks.  The dense kind's matrix product: the op passes
// ATen's own (the BLAS PyTorch was built with), so the kernels stay free of ATen tensor code.
using GemmFn = void (*)(bool trans_a, int64_t m, int64_t n, const float* a, const float* b, int64_t ldb, float* c,
                        int64_t ldc);

// What is mixed and how: (B, N, D) tokens, P prefix tokens, grid_w (axis rows), kind / axis codes,
// alpha (shift), the K x K fp32 mixing matrix (dense; else nullptr), `reverse`: a shift of
// direction -1 (row i reads row i+1), whose M is the transpose of the +1 shift's, so the kernels run
// the transposed mix forward and the plain one backward (set for the shift kind only), and `gemm`: the
// dense kind's matrix product (nullptr: the kernels' own O(K^2 D) loop).
struct MixGeometry {
  int64_t B, N, D, P, grid_w, kind, axis;
  float alpha;
  const float* mix;
  bool reverse;
  GemmFn gemm;
};

// Forward.  x, res (nullptr: none): (B * N, D) of `dtype`; w, b: (D,) fp32 or nullptr.  Writes
// normed, rout ((B * N, D) of `dtype`) and mean, rstd ((B * N,) fp32).
struct FwdArgs {
  MixGeometry g;
  c10::ScalarType dtype;
  float eps;
  bool mix_after_norm;
  const void* x;
  const void* res;
  const float* w;
  const float* b;
  void* normed;
  void* rout;
  float* mean;
  float* rstd;
};

// Backward.  dy, dres (nullptr: none), r (the saved residual_out): (B * N, D) of `dtype`; w: (D,) fp32 or
// nullptr; mean, rstd: (B * N,) fp32.  Writes dx ((B * N, D) of `dtype`) and adds into dw_part, db_part:
// (2 * n_parts, D) fp32, zero-initialised (two slots per thread; the caller sums them over rows).
struct BwdArgs {
  MixGeometry g;
  c10::ScalarType dtype;
  bool mix_after_norm;
  const void* dy;
  const void* dres;
  const void* r;
  const float* w;
  const float* mean;
  const float* rstd;
  void* dx;
  float* dw_part;
  float* db_part;
  int64_t n_parts;
};

namespace isa_default {
void fwd(const FwdArgs& a);
void bwd(const BwdArgs& a);
}  // namespace isa_default

#if NOISYNN_CPU_AVX2
namespace isa_avx2 {
void fwd(const FwdArgs& a);
void bwd(const BwdArgs& a);
}  // namespace isa_avx2
#endif

// The instruction set the op runs: "avx2" or "default".
const char* cpu_isa();

// Whether the op asks for transparent huge pages on its large outputs (Linux, opt-in with
// NOISYNN_CPU_HUGEPAGES=1; see advise_hugepages in mix_add_layernorm.cpp).
bool hugepage_outputs();

}  // namespace cpu
}  // namespace noisynn
