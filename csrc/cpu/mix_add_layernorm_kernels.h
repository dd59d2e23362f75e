// The CPU kernels of the fused residual add + (I + Q) mix + LayerNorm, compiled once per instruction
// set: kernels_<isa>.cpp include this file inside namespace noisynn::cpu::isa_<isa>, after the headers
// it needs (ATen/Parallel.h, <algorithm>, <cmath>, <cstring>, <utility>, <vector>,
// c10 Half / BFloat16) and mix_add_layernorm.h.  Interface: mix_add_layernorm.h.
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
// per-thread partials reduced by the caller.
// No include guard on purpose: included once per instruction-set namespace.

// optimal keeps the group's source rows in an fp32 buffer up to this size (else recomputes them).
constexpr int64_t kMaxGroupBufferFloats = int64_t(1) << 21;  // 8 MiB
// elements per task of the unmixed rows (ATen's grain size for elementwise work)
constexpr int64_t kGrainSize = 32768;

// ------------------------------------------------------------------------------------------------
// row primitives (fp32 rows of D)
//
// Reductions use two accumulators of 8 fp32 lanes (GCC / clang vector extensions: one AVX register
// in the AVX2 build, two SSE registers in the baseline one), so both builds add in the same order.

typedef float F8 __attribute__((vector_size(32)));
constexpr int64_t W = 8;

inline F8 load8(const float* p) {
  F8 v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

inline float hsum8(F8 v) {  // pairwise: (0..3 + 4..7), then (0,1 + 2,3), then 0 + 1
  const float a0 = v[0] + v[4], a1 = v[1] + v[5], a2 = v[2] + v[6], a3 = v[3] + v[7];
  return (a0 + a2) + (a1 + a3);
}

inline float row_sq_dev(const float* v, float mean, int64_t D) {
  F8 a0 = {}, a1 = {};
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    const F8 x0 = load8(v + d) - mean, x1 = load8(v + d + W) - mean;
    a0 += x0 * x0;
    a1 += x1 * x1;
  }
  for (; d + W <= D; d += W) {
    const F8 x0 = load8(v + d) - mean;
    a0 += x0 * x0;
  }
  float s = hsum8(a0 + a1);
  for (; d < D; ++d) s += (v[d] - mean) * (v[d] - mean);
  return s;
}

inline float row_dot(const float* a, const float* b, int64_t D) {
  F8 a0 = {}, a1 = {};
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    a0 += load8(a + d) * load8(b + d);
    a1 += load8(a + d + W) * load8(b + d + W);
  }
  for (; d + W <= D; d += W) a0 += load8(a + d) * load8(b + d);
  float s = hsum8(a0 + a1);
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

// sum of (v - c) over a row (c = 0: the plain sum, exactly)
inline float row_sum_minus(const float* v, float c, int64_t D) {
  F8 a0 = {}, a1 = {};
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    a0 += load8(v + d) - c;
    a1 += load8(v + d + W) - c;
  }
  for (; d + W <= D; d += W) a0 += load8(v + d) - c;
  float s = hsum8(a0 + a1);
  for (; d < D; ++d) s += v[d] - c;
  return s;
}

// mean and 1/std of a row (two-pass variance, as the reference).  The mean is taken relative to the
// row's first element: exact for a constant row (which then normalizes to exactly 0, as torch's
// LayerNorm does), and less rounding where the row's offset is large against its spread.
inline std::pair<float, float> row_stats(const float* v, int64_t D, float eps) {
  const float mean = v[0] + row_sum_minus(v, v[0], D) / static_cast<float>(D);
  const float var = row_sq_dev(v, mean, D) / static_cast<float>(D);
  return {mean, 1.0f / std::sqrt(var + eps)};
}

// dst <- (v - mean) * rstd * w + b (w, b optional), stored in dst's dtype; dst may be v itself.
// (v - mean) first: a constant row normalizes to exactly 0 (then b), as the reference does.
template <typename T>
inline void normalize_store(const float* v, float mean, float rstd, const float* __restrict__ w,
                            const float* __restrict__ b, T* dst, int64_t D) {
  if (w && b) {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>((v[d] - mean) * rstd * w[d] + b[d]);
  } else if (w) {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>((v[d] - mean) * rstd * w[d]);
  } else if (b) {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>((v[d] - mean) * rstd + b[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>((v[d] - mean) * rstd);
  }
}

// ------------------------------------------------------------------------------------------------
// geometry and the mixing engine

struct Geometry {
  int64_t B, N, D, P, K, step, groups;
  int64_t axis;

  explicit Geometry(const MixGeometry& m) : B(m.B), N(m.N), D(m.D), P(m.P), axis(m.axis) {
    const int64_t n = N - P;
    if (axis == AXIS_TOKENS) {
      K = n, step = 1, groups = B;
    } else if (axis == AXIS_ROWS) {
      K = n / m.grid_w, step = m.grid_w, groups = B * m.grid_w;
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
  const int64_t row_grain = std::max<int64_t>(1, kGrainSize / (4 * D));
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
void fwd_impl(const FwdArgs& A) {
  const Geometry G(A.g);
  const int64_t D = G.D, kind = A.g.kind;
  const float eps = A.eps, alpha = A.g.alpha;
  const float* mix = A.g.mix;
  const bool mix_after_norm = A.mix_after_norm;
  const T* xp = static_cast<const T*>(A.x);
  const T* rp = static_cast<const T*>(A.res);
  const float* wp = A.w;
  const float* bp = A.b;
  T* yp = static_cast<T*>(A.normed);
  T* op = static_cast<T*>(A.rout);
  float* mp = A.mean;
  float* sp = A.rstd;
  auto add = [=](int64_t row, float* out) { load_sum_row(xp + row * D, rp ? rp + row * D : nullptr, out, D); };
  if (!mix_after_norm) {
    // residual_out = M s, normed = LN(residual_out)
    auto src = [=](int64_t row, float* out, bool, float*) { add(row, out); };
    auto sink = [=](int64_t row, float* v, float*) {
      store_row(v, op + row * D, D);
      auto [mu, rs] = row_stats(v, D, eps);
      mp[row] = mu;
      sp[row] = rs;
      normalize_store(v, mu, rs, wp, bp, yp + row * D, D);  // straight into the output: no extra copy
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
      normalize_store(out, mu, rs, wp, bp, out, D);
    };
    auto sink = [=](int64_t row, float* v, float*) { store_row(v, yp + row * D, D); };
    run_rows(G, kind, alpha, mix, false, src, sink);
  }
}


// ------------------------------------------------------------------------------------------------
// backward

template <typename T>
void bwd_impl(const BwdArgs& A) {
  const Geometry G(A.g);
  const int64_t D = G.D, kind = A.g.kind;
  const float alpha = A.g.alpha;
  const float* mix = A.g.mix;
  const bool mix_after_norm = A.mix_after_norm;
  const T* dyp = static_cast<const T*>(A.dy);
  const T* drp = static_cast<const T*>(A.dres);
  const T* rp = static_cast<const T*>(A.r);
  const float* wp = A.w;
  const float* mup = A.mean;
  const float* rsp = A.rstd;
  T* dxp = static_cast<T*>(A.dx);
  float* dwp = A.dw_part;
  float* dbp = A.db_part;
  const int64_t n_parts = A.n_parts;
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
    const float c2 = row_sum_minus(g, 0.0f, D) * invD;
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


// ------------------------------------------------------------------------------------------------
// entry points (mix_add_layernorm.h)

void fwd(const FwdArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float: return fwd_impl<float>(a);
    case c10::ScalarType::BFloat16: return fwd_impl<c10::BFloat16>(a);
    case c10::ScalarType::Half: return fwd_impl<c10::Half>(a);
    default: TORCH_CHECK(false, "noisynn cpu kernels: unsupported dtype ", a.dtype);
  }
}

void bwd(const BwdArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float: return bwd_impl<float>(a);
    case c10::ScalarType::BFloat16: return bwd_impl<c10::BFloat16>(a);
    case c10::ScalarType::Half: return bwd_impl<c10::Half>(a);
    default: TORCH_CHECK(false, "noisynn cpu kernels: unsupported dtype ", a.dtype);
  }
}
