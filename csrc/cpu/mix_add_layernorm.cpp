// Fused residual add + (I + Q) mix + LayerNorm on CPU: the CPU implementation of
//   noisynn::mix_add_layernorm_fwd_cpp, noisynn::mix_add_layernorm_bwd_cpp (schemas in csrc/ops.cpp).
//
// Semantics and codes: noisynn_kernels/ops/mix_add_layernorm/__init__.py; the oracle is
// reference.mix_add_layernorm.  This file checks arguments, allocates outputs, picks the kernels'
// instruction set (cpu_isa()) and registers the CPU implementation; the kernels are in
// mix_add_layernorm_kernels.h (interface: mix_add_layernorm.h).
#include "mix_add_layernorm.h"
#include "../op_checks.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace noisynn {

namespace cpu {

const char* cpu_isa() {
#if NOISYNN_CPU_AVX2
  // ATen's own choice (honours ATEN_CPU_CAPABILITY), checked against the CPU itself.
  static const bool avx2 = [] {
    const std::string aten = at::get_cpu_capability();
    return (aten == "AVX2" || aten == "AVX512") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  }();
  return avx2 ? "avx2" : "default";
#else
  return "default";
#endif
}

bool hugepage_outputs() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool on = [] {
    const char* v = std::getenv("NOISYNN_CPU_HUGEPAGES");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
#else
  return false;
#endif
}

}  // namespace cpu

namespace {

// Opt-in (NOISYNN_CPU_HUGEPAGES=1): large outputs are freshly mapped memory, and first-touching them
// page by page (4 KiB faults, each zeroed by the kernel) costs far more than writing them (measured
// 16 ms vs 1 ms for 38.7 MB on a 2-core x86 VM).  Asking for transparent huge pages on the output
// (madvise(MADV_HUGEPAGE), what PyTorch's THP_MEM_ALLOC_ENABLE does for every allocation) makes those
// 2 MiB faults instead: ~2.5x faster forward there in steady state.  Not the default because, with the
// common THP setting defrag=madvise, a huge-page fault may compact memory synchronously: the same
// machine showed calls of 140-190 ms (against 45 ms without) until freed huge pages were recycled.
// Only the 2 MiB-aligned interior of outputs of >= 4 MiB is advised; the call is a hint (errors are
// ignored: THP disabled, an older kernel) and changes no data.
void advise_hugepages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = t.nbytes();
  if (bytes < 2 * kHuge || !cpu::hugepage_outputs()) return;
  const auto p = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t start = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + bytes) & ~(kHuge - 1);
  if (end > start) (void)madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

using at::Tensor;

// The kernels of the instruction set cpu_isa() picked, chosen once.
struct Kernels {
  void (*fwd)(const cpu::FwdArgs&);
  void (*bwd)(const cpu::BwdArgs&);
};

const Kernels& kernels() {
  static const Kernels k = [] {
#if NOISYNN_CPU_AVX2
    if (std::strcmp(cpu::cpu_isa(), "avx2") == 0) return Kernels{cpu::isa_avx2::fwd, cpu::isa_avx2::bwd};
#endif
    return Kernels{cpu::isa_default::fwd, cpu::isa_default::bwd};
  }();
  return k;
}

// The dense kind's matrix product (cpu::GemmFn) through ATen's CPU mm (MKL / OpenBLAS sgemm in PyPI
// builds; oneDNN at reduced precision only if the user set torch.backends.mkldnn.matmul.fp32_precision,
// as for every fp32 matmul of the process), on tensors viewing the kernels' fp32 buffers (a transposed A
// by its strides: no view op).  Called inside the kernels' parallel tasks, where ATen's parallel_for and
// the BLAS run single-threaded.
void gemm_f32(bool trans_a, int64_t m, int64_t n, const float* a, const float* b, int64_t ldb, float* c,
              int64_t ldc) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const Tensor A = trans_a ? at::from_blob(const_cast<float*>(a), {m, m}, {1, m}, f32)
                           : at::from_blob(const_cast<float*>(a), {m, m}, {m, 1}, f32);
  const Tensor Bm = at::from_blob(const_cast<float*>(b), {m, n}, {ldb, 1}, f32);
  Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, f32);
  at::cpu::mm_out(C, A, Bm);
}

// Groups at least this long take the dense product through the BLAS; shorter ones stay in the kernels'
// loop (a K x K product that small gains nothing from blocking, and each call costs a few tensor views).
constexpr int64_t kGemmMinK = 16;

cpu::MixGeometry geometry(int64_t B, int64_t N, int64_t D, int64_t P, int64_t grid_w, int64_t kind, int64_t axis,
                          double alpha, int64_t shift, const Tensor& M) {
  const bool blas = kind == KIND_DENSE && M.defined() && M.size(0) >= kGemmMinK;
  return cpu::MixGeometry{B, N, D, P, grid_w, kind, axis, static_cast<float>(alpha),
                          M.defined() ? M.const_data_ptr<float>() : nullptr, kind == KIND_SHIFT && shift < 0,
                          blas ? &gemm_f32 : nullptr};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> mix_add_layernorm_fwd_cpu(
    const Tensor& x_in, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, double eps, int64_t kind, int64_t axis, double alpha, int64_t shift,
    const std::optional<Tensor>& mix_matrix, int64_t prefix_tokens, int64_t grid_w, bool mix_after_norm,
    bool straight_through) {
  (void)straight_through;  // only changes the backward (handled by the autograd formula)
  constexpr const char* op = "noisynn::mix_add_layernorm_fwd_cpp (CPU)";
  op_checks::check_common(op, x_in, c10::DeviceType::CPU, kind, axis, shift, prefix_tokens, grid_w);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2);
  const Tensor x = x_in.contiguous();
  Tensor res;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == x_in.sizes(), op, ": residual has shape ", residual->sizes(), ", expected ",
                x_in.sizes());
    res = residual->to(x.scalar_type()).contiguous();
  }
  const Tensor w = op_checks::param_f32(weight, D, op, "weight", at::kCPU);
  const Tensor b = op_checks::param_f32(bias, D, op, "bias", at::kCPU);
  Tensor mean = at::empty({B * N}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({B * N}, x.options().dtype(at::kFloat));
  Tensor normed = at::empty({B, N, D}, x.options());
  Tensor rout = at::empty({B, N, D}, x.options());
  advise_hugepages(normed);
  advise_hugepages(rout);
  if (x.numel() == 0) return {normed, rout, mean, rstd};
  const int64_t K = op_checks::group_size(B, N, prefix_tokens, axis, grid_w);
  const Tensor M = op_checks::dense_matrix(op, mix_matrix, kind, K, at::kCPU);
  cpu::FwdArgs a{};
  a.g = geometry(B, N, D, prefix_tokens, grid_w, kind, axis, alpha, shift, M);
  a.dtype = x.scalar_type();
  a.eps = static_cast<float>(eps);
  a.mix_after_norm = mix_after_norm;
  a.x = x.const_data_ptr();
  a.res = res.defined() ? res.const_data_ptr() : nullptr;
  a.w = w.defined() ? w.const_data_ptr<float>() : nullptr;
  a.b = b.defined() ? b.const_data_ptr<float>() : nullptr;
  a.normed = normed.mutable_data_ptr();
  a.rout = rout.mutable_data_ptr();
  a.mean = mean.mutable_data_ptr<float>();
  a.rstd = rstd.mutable_data_ptr<float>();
  kernels().fwd(a);
  return {normed, rout, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> mix_add_layernorm_bwd_cpu(
    const Tensor& d_normed, const std::optional<Tensor>& d_residual_out, const Tensor& residual_out,
    const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& rstd, int64_t kind, int64_t axis,
    double alpha, int64_t shift, const std::optional<Tensor>& mix_matrix, int64_t prefix_tokens, int64_t grid_w,
    bool mix_after_norm) {
  constexpr const char* op = "noisynn::mix_add_layernorm_bwd_cpp (CPU)";
  op_checks::check_common(op, residual_out, c10::DeviceType::CPU, kind, axis, shift, prefix_tokens, grid_w);
  const int64_t B = residual_out.size(0), N = residual_out.size(1), D = residual_out.size(2);
  const auto dtype = residual_out.scalar_type();
  TORCH_CHECK(d_normed.sizes() == residual_out.sizes(), op, ": d_normed has shape ", d_normed.sizes(), ", expected ",
              residual_out.sizes());
  TORCH_CHECK(mean.numel() == B * N && rstd.numel() == B * N, op, ": mean / rstd must have B * N = ", B * N,
              " elements");
  const Tensor r = residual_out.contiguous();
  const Tensor dy = d_normed.to(dtype).contiguous();
  Tensor dres;
  if (d_residual_out.has_value() && d_residual_out->defined()) {
    TORCH_CHECK(d_residual_out->sizes() == residual_out.sizes(), op, ": d_residual_out has shape ",
                d_residual_out->sizes(), ", expected ", residual_out.sizes());
    dres = d_residual_out->to(dtype).contiguous();
  }
  const Tensor w = op_checks::param_f32(weight, D, op, "weight", at::kCPU);
  const Tensor mu = mean.to(at::kFloat).contiguous();
  const Tensor rs = rstd.to(at::kFloat).contiguous();
  Tensor dx = at::empty({B, N, D}, residual_out.options());
  advise_hugepages(dx);
  const int64_t n_parts = std::max<int64_t>(1, at::get_num_threads());
  // per thread: a main and a block slot of fp32 partials (see ln_back)
  Tensor dw_part = at::zeros({2 * n_parts, D}, residual_out.options().dtype(at::kFloat));
  Tensor db_part = at::zeros({2 * n_parts, D}, residual_out.options().dtype(at::kFloat));
  if (residual_out.numel() > 0) {
    const int64_t K = op_checks::group_size(B, N, prefix_tokens, axis, grid_w);
    const Tensor M = op_checks::dense_matrix(op, mix_matrix, kind, K, at::kCPU);
    cpu::BwdArgs a{};
    a.g = geometry(B, N, D, prefix_tokens, grid_w, kind, axis, alpha, shift, M);
    a.dtype = dtype;
    a.mix_after_norm = mix_after_norm;
    a.dy = dy.const_data_ptr();
    a.dres = dres.defined() ? dres.const_data_ptr() : nullptr;
    a.r = r.const_data_ptr();
    a.w = w.defined() ? w.const_data_ptr<float>() : nullptr;
    a.mean = mu.const_data_ptr<float>();
    a.rstd = rs.const_data_ptr<float>();
    a.dx = dx.mutable_data_ptr();
    a.dw_part = dw_part.mutable_data_ptr<float>();
    a.db_part = db_part.mutable_data_ptr<float>();
    a.n_parts = n_parts;
    kernels().bwd(a);
  }
  return {dx, dw_part.sum(0), db_part.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(noisynn, CPU, m) {
  m.impl("mix_add_layernorm_fwd_cpp", &mix_add_layernorm_fwd_cpu);
  m.impl("mix_add_layernorm_bwd_cpp", &mix_add_layernorm_bwd_cpu);
}

}  // namespace noisynn
