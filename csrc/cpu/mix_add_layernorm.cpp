// Fused residual add + (I + Q) mix + LayerNorm on CPU:
//   noisynn::mix_add_layernorm_fwd_cpu, noisynn::mix_add_layernorm_bwd_cpu.
//
// Same schema, semantics and codes as the Triton ops noisynn::mix_add_layernorm_fwd/bwd
// (noisynn_kernels/ops/mix_add_layernorm.py); the oracle is reference.mix_add_layernorm.
//
// Layout: contiguous (B * N, D) rows, row = b * N + n.  The P prefix tokens of every sample are added
// and normalized, never mixed.  The patch rows form `groups` groups of K rows, `stride` rows apart:
//
//   axis     group g              position i    row(g, i)
//   tokens   b                    p             b * N + P + i
//   rows     b * gw + p % gw      p // gw       b * N + P + p % gw + i * gw
//   batch    p                    b             i * N + P + p
//
// One task is one whole group: its source rows are computed (and, for optimal / dense, kept in an
// fp32 buffer) once, so every input is read once from memory and the group stays in cache.
//   shift    streams the group keeping one partner row (O(K D));
//   optimal  one column sum per group, then the rows (O(K D));
//   dense    loops over the K x K matrix (O(K^2 D)).
// Backward applies M^T (shift partner i + 1, optimal is symmetric, dense the transposed matrix).
// All arithmetic is fp32; outputs are stored in their tensor's dtype.  dweight / dbias are fp32
// per-thread partials reduced at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace noisynn {
namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

constexpr int64_t KIND_IDENTITY = 0, KIND_SHIFT = 1, KIND_OPTIMAL = 2, KIND_DENSE = 3;
constexpr int64_t AXIS_TOKENS = 0, AXIS_ROWS = 1, AXIS_BATCH = 2;
// optimal keeps the group's source rows in an fp32 buffer up to this size (else recomputes them).
constexpr int64_t kMaxGroupBufferFloats = int64_t(1) << 21;  // 8 MiB

// ------------------------------------------------------------------------------------------------
// row primitives (fp32 rows of D)

inline float row_sum(const float* v, int64_t D) {
  constexpr int64_t W = Vec::size();
  Vec a0(0.f), a1(0.f);
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    a0 += Vec::loadu(v + d);
    a1 += Vec::loadu(v + d + W);
  }
  for (; d + W <= D; d += W) a0 += Vec::loadu(v + d);
  if (d < D) a1 += Vec::loadu(v + d, D - d);  // zero-padded tail
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, a0 + a1);
}

inline float row_sq_dev(const float* v, float mean, int64_t D) {
  constexpr int64_t W = Vec::size();
  const Vec m(mean);
  Vec a0(0.f), a1(0.f);
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    Vec x0 = Vec::loadu(v + d) - m, x1 = Vec::loadu(v + d + W) - m;
    a0 = at::vec::fmadd(x0, x0, a0);
    a1 = at::vec::fmadd(x1, x1, a1);
  }
  for (; d + W <= D; d += W) {
    Vec x0 = Vec::loadu(v + d) - m;
    a0 = at::vec::fmadd(x0, x0, a0);
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, a0 + a1);
  for (; d < D; ++d) s += (v[d] - mean) * (v[d] - mean);
  return s;
}

inline float row_dot(const float* a, const float* b, int64_t D) {
  constexpr int64_t W = Vec::size();
  Vec a0(0.f), a1(0.f);
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    a0 = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), a0);
    a1 = at::vec::fmadd(Vec::loadu(a + d + W), Vec::loadu(b + d + W), a1);
  }
  for (; d + W <= D; d += W) a0 = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), a0);
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, a0 + a1);
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

template <typename T>
inline void load_row(const T* __restrict__ src, float* __restrict__ dst, int64_t D) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, D * sizeof(float));
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
  }
}

template <typename T>
inline void load_sum_row(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ dst, int64_t D) {
  if (b == nullptr) return load_row(a, dst, D);
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(a[d]) + static_cast<float>(b[d]);
}

template <typename T>
inline void store_row(const float* __restrict__ src, T* __restrict__ dst, int64_t D) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, D * sizeof(float));
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]);
  }
}

// mean and 1/std of a row (two-pass variance, as the reference)
inline std::pair<float, float> row_stats(const float* v, int64_t D, float eps) {
  const float mean = row_sum(v, D) / static_cast<float>(D);
  const float var = row_sq_dev(v, mean, D) / static_cast<float>(D);
  return {mean, 1.0f / std::sqrt(var + eps)};
}

// v <- (v - mean) * rstd * w + b in place (w, b optional)
inline void normalize_row(float* __restrict__ v, float mean, float rstd, const float* __restrict__ w,
                          const float* __restrict__ b, int64_t D) {
  const float shift = -mean * rstd;
  if (w && b) {
    for (int64_t d = 0; d < D; ++d) v[d] = (v[d] * rstd + shift) * w[d] + b[d];
  } else if (w) {
    for (int64_t d = 0; d < D; ++d) v[d] = (v[d] * rstd + shift) * w[d];
  } else if (b) {
    for (int64_t d = 0; d < D; ++d) v[d] = v[d] * rstd + shift + b[d];
  } else {
    for (int64_t d = 0; d < D; ++d) v[d] = v[d] * rstd + shift;
  }
}

// ------------------------------------------------------------------------------------------------
// geometry and the mixing engine

struct Geometry {
  int64_t B, N, D, P, K, step, groups;
  int64_t axis;

  Geometry(int64_t B_, int64_t N_, int64_t D_, int64_t P_, int64_t axis_, int64_t grid_w)
      : B(B_), N(N_), D(D_), P(P_), axis(axis_) {
    const int64_t n = N - P;
    if (axis == AXIS_TOKENS) {
      K = n, step = 1, groups = B;
    } else if (axis == AXIS_ROWS) {
      K = n / grid_w, step = grid_w, groups = B * grid_w;
    } else {
      K = B, step = 1, groups = n;
    }
  }

  int64_t row(int64_t g, int64_t i) const {
    if (axis == AXIS_BATCH) return i * N + P + g;
    return (g / step) * N + P + g % step + i * step;
  }
};

// Mixes group g.  src(row, out, first, scratch) writes the fp32 source row (`first` is true exactly
// once per row: side outputs happen then); sink(row, v, scratch) consumes the mixed row and may
// overwrite v.  `work` holds 5 * D floats, plus K * D when `keep` (the group's source rows).
template <typename Src, typename Sink>
inline void mix_group(const Geometry& G, int64_t g, int64_t kind, float alpha, const float* mix, bool transpose,
                      bool keep, float* work, Src& src, Sink& sink) {
  const int64_t D = G.D, K = G.K;
  float* a = work;
  float* b = work + D;
  float* colsum = work + 2 * D;
  float* scratch = work + 3 * D;
  float* S = work + 4 * D;
  if (kind == KIND_SHIFT) {
    // forward y_i = (1 - a) s_i + a s_{i-1}; transposed y_i = (1 - a) s_i + a s_{i+1} (walk backwards)
    const float c = 1.0f - alpha;
    float* prev = a;
    float* cur = b;
    src(G.row(g, transpose ? 0 : K - 1), prev, false, scratch);
    for (int64_t t = 0; t < K; ++t) {
      const int64_t row = G.row(g, transpose ? K - 1 - t : t);
      src(row, cur, true, scratch);
      for (int64_t d = 0; d < D; ++d) prev[d] = c * cur[d] + alpha * prev[d];
      sink(row, prev, scratch);
      std::swap(prev, cur);  // the source row just read is the next row's partner
    }
  } else if (kind == KIND_OPTIMAL) {
    // M s_i = (s_i + sum_j s_j) / (K + 1); M is symmetric, so the transposed mix is the same
    // two-level sum (blocks of kSumBlock rows) keeps the fp32 rounding error low for long groups
    constexpr int64_t kSumBlock = 16;
    float* comp = S + (keep ? K * D : 0);
    std::fill(colsum, colsum + D, 0.0f);
    std::fill(comp, comp + D, 0.0f);
    for (int64_t i0 = 0; i0 < K; i0 += kSumBlock) {
      std::fill(b, b + D, 0.0f);
      for (int64_t i = i0; i < std::min(K, i0 + kSumBlock); ++i) {
        float* si = keep ? S + i * D : a;
        src(G.row(g, i), si, true, scratch);
        for (int64_t d = 0; d < D; ++d) b[d] += si[d];
      }
      for (int64_t d = 0; d < D; ++d) {  // Kahan-compensated across blocks (comp: the lost low bits)
        const float y = b[d] - comp[d];
        const float t = colsum[d] + y;
        comp[d] = (t - colsum[d]) - y;
        colsum[d] = t;
      }
    }
    const float inv = 1.0f / static_cast<float>(K + 1);
    for (int64_t i = 0; i < K; ++i) {
      const int64_t row = G.row(g, i);
      const float* si = S + i * D;
      if (!keep) {
        src(row, a, false, scratch);
        si = a;
      }
      for (int64_t d = 0; d < D; ++d) b[d] = (si[d] + colsum[d]) * inv;
      sink(row, b, scratch);
    }
  } else {  // dense: y_i = sum_j M[i, j] s_j (M^T when transposed)
    for (int64_t j = 0; j < K; ++j) src(G.row(g, j), S + j * D, true, scratch);
    for (int64_t i = 0; i < K; ++i) {
      std::fill(b, b + D, 0.0f);
      for (int64_t j = 0; j < K; ++j) {
        const float m = transpose ? mix[j * K + i] : mix[i * K + j];
        if (m == 0.0f) continue;
        const float* sj = S + j * D;
        for (int64_t d = 0; d < D; ++d) b[d] += m * sj[d];
      }
      sink(G.row(g, i), b, scratch);
    }
  }
}

// Runs src -> (mix) -> sink over every row: unmixed rows (identity, prefix tokens) one by one, mixed
// rows one group per task.
template <typename Src, typename Sink>
void run_rows(const Geometry& G, int64_t kind, float alpha, const float* mix, bool transpose, Src& src, Sink& sink) {
  const int64_t D = G.D;
  const int64_t row_grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (4 * D));
  auto unmixed = [&](int64_t n_rows, auto row_of) {
    at::parallel_for(0, n_rows, row_grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(2 * D);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t row = row_of(t);
        src(row, buf.data(), true, buf.data() + D);
        sink(row, buf.data(), buf.data() + D);
      }
    });
  };
  if (kind == KIND_IDENTITY) {
    unmixed(G.B * G.N, [](int64_t t) { return t; });
    return;
  }
  if (G.P > 0) {
    const int64_t P = G.P, N = G.N;
    unmixed(G.B * P, [P, N](int64_t t) { return (t / P) * N + t % P; });
  }
  const bool keep = kind == KIND_DENSE || (kind == KIND_OPTIMAL && G.K * D <= kMaxGroupBufferFloats);
  at::parallel_for(0, G.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> work(5 * D + (keep ? G.K * D : 0));
    for (int64_t g = begin; g < end; ++g) mix_group(G, g, kind, alpha, mix, transpose, keep, work.data(), src, sink);
  });
}

// ------------------------------------------------------------------------------------------------
// forward

template <typename T>
void fwd_impl(const Geometry& G, const Tensor& x, const Tensor& res, const Tensor& w, const Tensor& b, float eps,
              int64_t kind, float alpha, const float* mix, bool mix_after_norm, Tensor& normed, Tensor& rout,
              Tensor& mean, Tensor& rstd) {
  const int64_t D = G.D;
  const T* xp = x.const_data_ptr<T>();
  const T* rp = res.defined() ? res.const_data_ptr<T>() : nullptr;
  const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  T* yp = normed.mutable_data_ptr<T>();
  T* op = rout.mutable_data_ptr<T>();
  float* mp = mean.mutable_data_ptr<float>();
  float* sp = rstd.mutable_data_ptr<float>();
  auto add = [=](int64_t row, float* out) { load_sum_row(xp + row * D, rp ? rp + row * D : nullptr, out, D); };
  if (!mix_after_norm) {
    // residual_out = M s, normed = LN(residual_out)
    auto src = [=](int64_t row, float* out, bool, float*) { add(row, out); };
    auto sink = [=](int64_t row, float* v, float*) {
      store_row(v, op + row * D, D);
      auto [mu, rs] = row_stats(v, D, eps);
      mp[row] = mu;
      sp[row] = rs;
      normalize_row(v, mu, rs, wp, bp, D);
      store_row(v, yp + row * D, D);
    };
    run_rows(G, kind, alpha, mix, false, src, sink);
  } else {
    // residual_out = s, normed = M LN(s)
    auto src = [=](int64_t row, float* out, bool first, float*) {
      add(row, out);
      auto [mu, rs] = row_stats(out, D, eps);
      if (first) {
        store_row(out, op + row * D, D);
        mp[row] = mu;
        sp[row] = rs;
      }
      normalize_row(out, mu, rs, wp, bp, D);
    };
    auto sink = [=](int64_t row, float* v, float*) { store_row(v, yp + row * D, D); };
    run_rows(G, kind, alpha, mix, false, src, sink);
  }
}

void check_common(const char* op, const Tensor& t, int64_t kind, int64_t axis, int64_t prefix_tokens, int64_t grid_w) {
  TORCH_CHECK(t.dim() == 3, op, ": expected (B, N, D) tokens, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              op, ": expected float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(kind >= KIND_IDENTITY && kind <= KIND_DENSE, op, ": kind code must be 0..3, got ", kind);
  TORCH_CHECK(axis >= AXIS_TOKENS && axis <= AXIS_BATCH, op, ": axis code must be 0..2, got ", axis);
  const int64_t N = t.size(1);
  TORCH_CHECK(prefix_tokens >= 0 && prefix_tokens < N, op, ": prefix_tokens must be in [0, N = ", N, "), got ",
              prefix_tokens);
  TORCH_CHECK(grid_w >= 1, op, ": grid_w must be >= 1, got ", grid_w);
  if (axis == AXIS_ROWS && kind != KIND_IDENTITY) {
    TORCH_CHECK((N - prefix_tokens) % grid_w == 0, op, ": grid_w = ", grid_w, " does not divide the ",
                N - prefix_tokens, " patch tokens");
  }
}

Tensor dense_matrix(const char* op, const std::optional<Tensor>& mix_matrix, int64_t kind, int64_t K) {
  if (kind != KIND_DENSE) return Tensor();
  TORCH_CHECK(mix_matrix.has_value() && mix_matrix->defined(), op, ": kind dense needs mix_matrix");
  TORCH_CHECK(mix_matrix->dim() == 2 && mix_matrix->size(0) == K && mix_matrix->size(1) == K, op,
              ": mix_matrix must be (", K, ", ", K, "), got ", mix_matrix->sizes());
  return mix_matrix->to(at::kCPU, at::kFloat).contiguous();
}

Tensor param_f32(const std::optional<Tensor>& t, int64_t D, const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == D, op, ": ", name, " must have shape (", D, "), got ", t->sizes());
  return t->to(at::kCPU, at::kFloat).contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> mix_add_layernorm_fwd_cpu(
    const Tensor& x_in, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, double eps, int64_t kind, int64_t axis, double alpha,
    const std::optional<Tensor>& mix_matrix, int64_t prefix_tokens, int64_t grid_w, bool mix_after_norm,
    bool straight_through) {
  (void)straight_through;  // only changes the backward (handled by the autograd formula)
  constexpr const char* op = "noisynn::mix_add_layernorm_fwd_cpu";
  check_common(op, x_in, kind, axis, prefix_tokens, grid_w);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2);
  const Tensor x = x_in.contiguous();
  Tensor res;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == x_in.sizes(), op, ": residual has shape ", residual->sizes(), ", expected ",
                x_in.sizes());
    res = residual->to(x.scalar_type()).contiguous();
  }
  const Tensor w = param_f32(weight, D, op, "weight");
  const Tensor b = param_f32(bias, D, op, "bias");
  Tensor normed = at::empty({B, N, D}, x.options());
  Tensor rout = at::empty({B, N, D}, x.options());
  Tensor mean = at::empty({B * N}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({B * N}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {normed, rout, mean, rstd};
  const Geometry G(B, N, D, prefix_tokens, axis, grid_w);
  const Tensor M = dense_matrix(op, mix_matrix, kind, G.K);
  const float* mp = M.defined() ? M.const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mix_add_layernorm_fwd_cpu", [&] {
    fwd_impl<scalar_t>(G, x, res, w, b, static_cast<float>(eps), kind, static_cast<float>(alpha), mp,
                       mix_after_norm, normed, rout, mean, rstd);
  });
  return {normed, rout, mean, rstd};
}

// ------------------------------------------------------------------------------------------------
// backward

template <typename T>
void bwd_impl(const Geometry& G, const Tensor& dy, const Tensor& dres, const Tensor& r, const Tensor& w,
              const Tensor& mean, const Tensor& rstd, int64_t kind, float alpha, const float* mix,
              bool mix_after_norm, Tensor& dx, Tensor& dw_part, Tensor& db_part) {
  const int64_t D = G.D;
  const T* dyp = dy.const_data_ptr<T>();
  const T* drp = dres.defined() ? dres.const_data_ptr<T>() : nullptr;
  const T* rp = r.const_data_ptr<T>();
  const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
  const float* mup = mean.const_data_ptr<float>();
  const float* rsp = rstd.const_data_ptr<float>();
  T* dxp = dx.mutable_data_ptr<T>();
  float* dwp = dw_part.mutable_data_ptr<float>();
  float* dbp = db_part.mutable_data_ptr<float>();
  const int64_t n_parts = dw_part.size(0) / 2;
  constexpr int64_t kCountPad = 16;  // one cache line per thread's row counter
  std::vector<int64_t> count_buf(n_parts * kCountPad, 0);
  int64_t* counts = count_buf.data();
  const float invD = 1.0f / static_cast<float>(D);

  // g (the gradient wrt the LN output, before the affine) -> gradient wrt the LN input + d_residual_out,
  // in place; accumulates dweight / dbias when asked.  scratch: D floats for x_hat.
  auto ln_back = [=](int64_t row, float* __restrict__ g, bool accumulate, float* __restrict__ xhat) {
    const float mu = mup[row], rs = rsp[row];
    const T* rr = rp + row * D;
    for (int64_t d = 0; d < D; ++d) xhat[d] = (static_cast<float>(rr[d]) - mu) * rs;
    if (accumulate) {
      // per-thread partials, two-level: rows add into a block slot that is flushed into the main slot
      // every kSumBlock rows (bounds the fp32 rounding error of long sums); the caller sums all slots.
      constexpr int64_t kSumBlock = 16;
      const int64_t tid = std::min<int64_t>(at::get_thread_num(), n_parts - 1);
      float* __restrict__ dw_main = dwp + 2 * tid * D;
      float* __restrict__ db_main = dbp + 2 * tid * D;
      float* __restrict__ dw_block = dw_main + D;
      float* __restrict__ db_block = db_main + D;
      for (int64_t d = 0; d < D; ++d) {
        dw_block[d] += g[d] * xhat[d];
        db_block[d] += g[d];
      }
      if (++counts[tid * kCountPad] % kSumBlock == 0) {
        for (int64_t d = 0; d < D; ++d) {
          dw_main[d] += dw_block[d];
          db_main[d] += db_block[d];
          dw_block[d] = 0.0f;
          db_block[d] = 0.0f;
        }
      }
    }
    if (wp) {
      for (int64_t d = 0; d < D; ++d) g[d] *= wp[d];
    }
    const float c1 = row_dot(xhat, g, D) * invD;
    const float c2 = row_sum(g, D) * invD;
    if (drp) {
      const T* dr = drp + row * D;
      for (int64_t d = 0; d < D; ++d) g[d] = (g[d] - (xhat[d] * c1 + c2)) * rs + static_cast<float>(dr[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) g[d] = (g[d] - (xhat[d] * c1 + c2)) * rs;
    }
  };
  if (!mix_after_norm) {
    // g = LN-backward(dy) + d_residual_out (gradient wrt r = M s); dx = M^T g
    auto src = [=](int64_t row, float* out, bool first, float* scratch) {
      load_row(dyp + row * D, out, D);
      ln_back(row, out, first, scratch);
    };
    auto sink = [=](int64_t row, float* v, float*) { store_row(v, dxp + row * D, D); };
    run_rows(G, kind, alpha, mix, true, src, sink);
  } else {
    // dz = M^T dy; dx = LN-backward(dz) + d_residual_out
    auto src = [=](int64_t row, float* out, bool, float*) { load_row(dyp + row * D, out, D); };
    auto sink = [=](int64_t row, float* v, float* scratch) {
      ln_back(row, v, true, scratch);
      store_row(v, dxp + row * D, D);
    };
    run_rows(G, kind, alpha, mix, true, src, sink);
  }
}

std::tuple<Tensor, Tensor, Tensor> mix_add_layernorm_bwd_cpu(
    const Tensor& d_normed, const std::optional<Tensor>& d_residual_out, const Tensor& residual_out,
    const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& rstd, int64_t kind, int64_t axis,
    double alpha, const std::optional<Tensor>& mix_matrix, int64_t prefix_tokens, int64_t grid_w,
    bool mix_after_norm) {
  constexpr const char* op = "noisynn::mix_add_layernorm_bwd_cpu";
  check_common(op, residual_out, kind, axis, prefix_tokens, grid_w);
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
  const Tensor w = param_f32(weight, D, op, "weight");
  const Tensor mu = mean.to(at::kFloat).contiguous();
  const Tensor rs = rstd.to(at::kFloat).contiguous();
  Tensor dx = at::empty({B, N, D}, residual_out.options());
  const int64_t n_parts = std::max<int64_t>(1, at::get_num_threads());
  // per thread: a main and a block slot of fp32 partials (see ln_back)
  Tensor dw_part = at::zeros({2 * n_parts, D}, residual_out.options().dtype(at::kFloat));
  Tensor db_part = at::zeros({2 * n_parts, D}, residual_out.options().dtype(at::kFloat));
  if (residual_out.numel() > 0) {
    const Geometry G(B, N, D, prefix_tokens, axis, grid_w);
    const Tensor M = dense_matrix(op, mix_matrix, kind, G.K);
    const float* mp = M.defined() ? M.const_data_ptr<float>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mix_add_layernorm_bwd_cpu", [&] {
      bwd_impl<scalar_t>(G, dy, dres, r, w, mu, rs, kind, static_cast<float>(alpha), mp, mix_after_norm, dx,
                         dw_part, db_part);
    });
  }
  return {dx, dw_part.sum(0), db_part.sum(0)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(noisynn, m) {
  // Fake (meta) implementations and autograd live in Python, in this module.
  m.set_python_module("noisynn_kernels.ops.cpu_mix_add_layernorm");
  m.def(
      "mix_add_layernorm_fwd_cpu(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, int kind, "
      "int axis, float alpha, Tensor? mix_matrix, int prefix_tokens, int grid_w, bool mix_after_norm, "
      "bool straight_through) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "mix_add_layernorm_bwd_cpu(Tensor d_normed, Tensor? d_residual_out, Tensor residual_out, Tensor? weight, "
      "Tensor mean, Tensor rstd, int kind, int axis, float alpha, Tensor? mix_matrix, int prefix_tokens, "
      "int grid_w, bool mix_after_norm) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(noisynn, CPU, m) {
  m.impl("mix_add_layernorm_fwd_cpu", &mix_add_layernorm_fwd_cpu);
  m.impl("mix_add_layernorm_bwd_cpu", &mix_add_layernorm_bwd_cpu);
}

}  // namespace noisynn
