// The CPU kernels of the fused residual add + (I + Q) mix + LayerNorm, compiled once per instruction
// set: kernels_<isa>.cpp include this file inside namespace noisynn::cpu::isa_<isa>, after the headers
// it needs (ATen/Parallel.h, <algorithm>, <cmath>, <cstring>, <memory>, <utility>, <vector>,
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
// One task mixes whole groups: their source rows are computed (and, for optimal / dense, kept in an
// fp32 buffer) once, so every input is read once from memory and the groups stay in cache.  For axis
// rows a task takes several columns of one sample's grid together and walks their rows in memory
// order (mix_bundle).
//   shift    streams the group keeping one partner row (and, transposed, s_0 for the last row; O(K D));
//   optimal  one column sum per group, then the rows (O(K D));
//   dense    one matrix product of the kept rows through the op's BLAS (MixGeometry::gemm), or, without
//            it, a loop over the K x K matrix (O(K^2 D) either way).
// Backward applies M^T (shift partner i + 1, optimal is symmetric, dense the transposed matrix).
// All arithmetic is fp32; outputs are stored in their tensor's dtype.  dweight / dbias are fp32
// per-thread partials reduced by the caller.
// No include guard on purpose: included once per instruction-set namespace.

// optimal keeps a task's source rows in an fp32 buffer up to this size (else recomputes them); the
// axis-rows bundle is also halved until its kept rows (optimal, dense) fit.
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

inline void store8(float* p, const F8& v) { std::memcpy(p, &v, sizeof(v)); }

// Elementwise over a row of D values, 16 a step (two 8-lane vectors: about half the loop overhead of
// the compiler's own 8-lane loops): vec(d) does values d .. d + 7, one(d) value d of the tail.
template <typename Vec, typename One>
inline void row_map(int64_t D, Vec&& vec, One&& one) {
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    vec(d);
    vec(d + W);
  }
  for (; d + W <= D; d += W) vec(d);
  for (; d < D; ++d) one(d);
}

inline float hsum8(const F8& v) {  // pairwise: (0..3 + 4..7), then (0,1 + 2,3), then 0 + 1
  const float a0 = v[0] + v[4], a1 = v[1] + v[5], a2 = v[2] + v[6], a3 = v[3] + v[7];
  return (a0 + a2) + (a1 + a3);
}

// The one reduction order of the kernels: vec(d, acc) adds the terms d .. d + 7 into the 8-lane acc
// (two accumulators: even and odd chunks of 8), one(d) returns term d of the tail; the result is
// hsum8(acc0 + acc1) plus the tail in order.  Both instruction-set builds add the same way.
template <typename Vec, typename One>
inline float row_reduce(int64_t D, Vec&& vec, One&& one) {
  F8 a0 = {}, a1 = {};
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    vec(d, a0);
    vec(d + W, a1);
  }
  for (; d + W <= D; d += W) vec(d, a0);
  float s = hsum8(a0 + a1);
  for (; d < D; ++d) s += one(d);
  return s;
}

// Two sums in row_reduce's order at once: vec(d, s, q) adds the terms d .. d + 7 into the 8-lane s and
// q, one(d, s, q) adds term d of the tail to the scalars s and q.
template <typename Vec, typename One>
inline void row_reduce2(int64_t D, Vec&& vec, One&& one, float& s, float& q) {
  F8 s0 = {}, s1 = {}, q0 = {}, q1 = {};
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    vec(d, s0, q0);
    vec(d + W, s1, q1);
  }
  for (; d + W <= D; d += W) vec(d, s0, q0);
  s = hsum8(s0 + s1);
  q = hsum8(q0 + q1);
  for (; d < D; ++d) one(d, s, q);
}

// sum of (v - mean)^2 over a row
inline float row_sq_dev(const float* v, float mean, int64_t D) {
  return row_reduce(
      D,
      [&](int64_t d, F8& acc) {
        const F8 x = load8(v + d) - mean;
        acc += x * x;
      },
      [&](int64_t d) { return (v[d] - mean) * (v[d] - mean); });
}

// Copies a row of D values, converting From -> To (fp32 <-> the tensor's dtype; a memcpy when equal).
template <typename From, typename To>
inline void convert_row(const From* __restrict__ src, To* __restrict__ dst, int64_t D) {
  if constexpr (std::is_same_v<From, To>) {
    std::memcpy(dst, src, D * sizeof(To));
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<To>(src[d]);
  }
}

// dst <- a + b (b nullptr: a) in fp32 (row_map for fp32 rows).
template <typename T>
inline void load_sum_row(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ dst, int64_t D) {
  if (b == nullptr) return convert_row(a, dst, D);
  if constexpr (std::is_same_v<T, float>) {
    row_map(D, [&](int64_t d) { store8(dst + d, load8(a + d) + load8(b + d)); },
            [&](int64_t d) { dst[d] = a[d] + b[d]; });
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(a[d]) + static_cast<float>(b[d]);
  }
}

// 8 consecutive values of a row as fp32 / stored from fp32 in the row's dtype.  The vector is passed by
// reference (as to hsum8): a 32-byte vector passed by value, or returned from a function that is not
// inlined (these are not, for bf16 / fp16), draws GCC's calling-convention note in the baseline build.
template <typename T>
inline void load8_f(const T* p, F8& v) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int k = 0; k < W; ++k) v[k] = static_cast<float>(p[k]);
  }
}

template <typename T>
inline void store8_t(T* p, const F8& v) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int k = 0; k < W; ++k) p[k] = static_cast<T>(v[k]);
  }
}

// 1/std of a row around its mean (two-pass variance, as the reference)
inline float row_rstd(const float* v, float mean, int64_t D, float eps) {
  return 1.0f / std::sqrt(row_sq_dev(v, mean, D) / static_cast<float>(D) + eps);
}

// One pass gives the LayerNorm statistics of a row v: with a centre c (row_centre), s1 = sum(v - c) and
// s2 = sum((v - c)^2), mean = c + s1 / D and var = s2 / D - (s1 / D)^2.  The subtraction's rounding
// error grows with (mean - c)^2 / var, so c is the mean of the row's first 8 values (for Gaussian rows
// about 0.35 standard deviations from the mean, where the result is as accurate as torch's own fp32
// LayerNorm); where c lies more than kOnePassDeviations standard deviations from the mean (an outlier
// among the first 8 values; about 0.5% of Gaussian rows) the variance is taken in a second pass over v
// (row_rstd) instead.  A constant row has c exactly
// its value and s1 = s2 = 0: mean exactly c, var exactly 0 (it normalizes to exactly 0, as torch's
// LayerNorm does).  NaN / inf take the second pass and propagate.
constexpr float kOnePassDeviations = 1.0f;

// The centre of a row whose first 8 values are v8 (D >= 8): their mean (hsum8 of equal values and the
// scaling by 1/8 are exact, so a constant row's centre is its value).
inline float row_centre(const F8& v8) { return hsum8(v8) * 0.125f; }

inline std::pair<float, float> finish_stats(const float* v, float c, float s1, float s2, int64_t D, float eps) {
  const float dm = s1 / static_cast<float>(D);
  const float mean = c + dm;
  const float var = s2 / static_cast<float>(D) - dm * dm;
  if (!(dm * dm <= (kOnePassDeviations * kOnePassDeviations) * var)) return {mean, row_rstd(v, mean, D, eps)};
  return {mean, 1.0f / std::sqrt(var + eps)};
}

// Stores the fp32 row v into dst (dst's dtype) and returns its (mean, rstd) (finish_stats): one pass
// over v instead of three.
template <typename T>
inline std::pair<float, float> store_row_stats(const float* v, T* __restrict__ dst, int64_t D, float eps) {
  const float c = D >= W ? row_centre(load8(v)) : v[0];
  float s1, s2;
  row_reduce2(
      D,
      [&](int64_t d, F8& s, F8& q) {
        const F8 x = load8(v + d);
        store8_t(dst + d, x);
        const F8 y = x - c;
        s += y;
        q += y * y;
      },
      [&](int64_t d, float& s, float& q) {
        dst[d] = static_cast<T>(v[d]);
        const float y = v[d] - c;
        s += y;
        q += y * y;
      },
      s1, s2);
  return finish_stats(v, c, s1, s2, D, eps);
}

// mean and 1/std of a row (finish_stats)
inline std::pair<float, float> row_stats(const float* v, int64_t D, float eps) {
  const float c = D >= W ? row_centre(load8(v)) : v[0];
  float s1, s2;
  row_reduce2(
      D,
      [&](int64_t d, F8& s, F8& q) {
        const F8 y = load8(v + d) - c;
        s += y;
        q += y * y;
      },
      [&](int64_t d, float& s, float& q) {
        const float y = v[d] - c;
        s += y;
        q += y * y;
      },
      s1, s2);
  return finish_stats(v, c, s1, s2, D, eps);
}

// LayerNorm backward of one row in two passes over it (the row stays in L1 between them):
//   pass 1  xhat = (r - mean) * rstd, gw = g * w, sum(xhat * gw), sum(gw), and, when kAcc,
//           dw += g * xhat, db += g (the caller's partial sums);
//   pass 2  out = (gw - (xhat * c1 + c2)) * rstd (+ dr),  c1 = sum(xhat * gw) / D, c2 = sum(gw) / D.
// g: the gradient wrt the normalized row before the affine (G: the row's dtype in memory, or an fp32
// buffer, which may be `out` itself); r: the LN input; dr: gradient added to the result or nullptr;
// xhat: D floats of scratch.  Both sums are taken in one loop, in row_reduce's order.
template <bool kAcc, bool kW, typename G, typename T>
inline void ln_back_row(const G* g, const T* __restrict__ r, const T* __restrict__ dr, const float* __restrict__ w,
                        float mean, float rstd, float invD, float* __restrict__ dw, float* __restrict__ db,
                        float* __restrict__ xhat, float* out, int64_t D) {
  F8 dot0 = {}, dot1 = {}, sum0 = {}, sum1 = {};
  auto step = [&](int64_t d, F8& dot, F8& sum) {
    F8 rv, gd;
    load8_f(r + d, rv);
    load8_f(g + d, gd);
    const F8 xh = (rv - mean) * rstd;
    store8_t(xhat + d, xh);
    if constexpr (kAcc) {
      store8_t(dw + d, load8(dw + d) + gd * xh);
      store8_t(db + d, load8(db + d) + gd);
    }
    F8 gw = gd;
    if constexpr (kW) gw = gd * load8(w + d);
    store8_t(out + d, gw);
    dot += xh * gw;
    sum += gw;
  };
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    step(d, dot0, sum0);
    step(d + W, dot1, sum1);
  }
  for (; d + W <= D; d += W) step(d, dot0, sum0);
  float dot = hsum8(dot0 + dot1), sum = hsum8(sum0 + sum1);
  for (; d < D; ++d) {
    const float xh = (static_cast<float>(r[d]) - mean) * rstd;
    const float gd = static_cast<float>(g[d]);
    xhat[d] = xh;
    if constexpr (kAcc) {
      dw[d] += gd * xh;
      db[d] += gd;
    }
    const float gw = kW ? gd * w[d] : gd;
    out[d] = gw;
    dot += xh * gw;
    sum += gw;
  }
  const float c1 = dot * invD, c2 = sum * invD;
  if (dr) {
    for (int64_t e = 0; e < D; ++e) out[e] = (out[e] - (xhat[e] * c1 + c2)) * rstd + static_cast<float>(dr[e]);
  } else {
    for (int64_t e = 0; e < D; ++e) out[e] = (out[e] - (xhat[e] * c1 + c2)) * rstd;
  }
}

// dst <- (v - mean) * rstd * w + b (w, b optional), stored in dst's dtype; dst may be v itself (each
// 8 values are read before they are written).  (v - mean) first: a constant row normalizes to exactly
// 0 (then b), as the reference does.  (row_map: 16 values a step.)
template <bool kW, bool kB, typename T>
inline void normalize_store_impl(const float* v, float mean, float rstd, const float* __restrict__ w,
                                 const float* __restrict__ b, T* dst, int64_t D) {
  auto vec = [&](int64_t d) {
    F8 y = (load8(v + d) - mean) * rstd;
    if constexpr (kW) y = y * load8(w + d);
    if constexpr (kB) y = y + load8(b + d);
    store8_t(dst + d, y);
  };
  row_map(D, vec, [&](int64_t d) {
    float y = (v[d] - mean) * rstd;
    if constexpr (kW) y = y * w[d];
    if constexpr (kB) y = y + b[d];
    dst[d] = static_cast<T>(y);
  });
}

template <typename T>
inline void normalize_store(const float* v, float mean, float rstd, const float* __restrict__ w,
                            const float* __restrict__ b, T* dst, int64_t D) {
  if (w && b) return normalize_store_impl<true, true>(v, mean, rstd, w, b, dst, D);
  if (w) return normalize_store_impl<true, false>(v, mean, rstd, w, b, dst, D);
  if (b) return normalize_store_impl<false, true>(v, mean, rstd, w, b, dst, D);
  normalize_store_impl<false, false>(v, mean, rstd, w, b, dst, D);
}

// s = a + b (kRes; else a) of one row: written to v (fp32) and, with kOut, to out (its dtype); returns
// its (mean, rstd) (finish_stats) from the same pass.
template <bool kRes, bool kOut, typename T>
inline std::pair<float, float> add_store_row_stats(const T* __restrict__ a, const T* __restrict__ b,
                                                   float* __restrict__ v, T* __restrict__ out, int64_t D, float eps) {
  float c;
  if (D >= W) {
    F8 x;
    load8_f(a, x);
    if constexpr (kRes) {
      F8 y;
      load8_f(b, y);
      x += y;
    }
    c = row_centre(x);
  } else {
    c = static_cast<float>(a[0]) + (kRes ? static_cast<float>(b[0]) : 0.0f);
  }
  float s1, s2;
  row_reduce2(
      D,
      [&](int64_t d, F8& s, F8& q) {
        F8 x;
        load8_f(a + d, x);
        if constexpr (kRes) {
          F8 y;
          load8_f(b + d, y);
          x += y;
        }
        std::memcpy(v + d, &x, sizeof(x));
        if constexpr (kOut) store8_t(out + d, x);
        const F8 y = x - c;
        s += y;
        q += y * y;
      },
      [&](int64_t d, float& s, float& q) {
        const float x = static_cast<float>(a[d]) + (kRes ? static_cast<float>(b[d]) : 0.0f);
        v[d] = x;
        if constexpr (kOut) out[d] = static_cast<T>(x);
        const float y = x - c;
        s += y;
        q += y * y;
      },
      s1, s2);
  return finish_stats(v, c, s1, s2, D, eps);
}

// ------------------------------------------------------------------------------------------------
// geometry and the mixing engine

struct Geometry {
  int64_t B, N, D, P, K, step, groups;
  int64_t axis;
  GemmFn gemm;  // dense: the matrix product of a task's kept rows (nullptr: the O(K^2 D) loop)

  explicit Geometry(const MixGeometry& m) : B(m.B), N(m.N), D(m.D), P(m.P), axis(m.axis), gemm(m.gemm) {
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

// A task's fp32 work buffer, uninitialised.  Up to kCachedWorkFloats it is the calling thread's own
// buffer, kept between calls: a fresh zero-filled vector per call cost a memset and, for buffers past
// the C library's mmap threshold, page faults on every call (optimal / tokens at ViT-B size needs
// 600 KB).  Larger buffers are allocated per call (their work amortizes it) and freed, so a thread
// keeps at most 2 MiB.
constexpr int64_t kCachedWorkFloats = int64_t(1) << 19;

class WorkBuffer {
 public:
  explicit WorkBuffer(int64_t n) {
    if (n <= kCachedWorkFloats) {
      thread_local std::unique_ptr<float[]> cached;
      thread_local int64_t cached_n = 0;
      if (cached_n < n) {
        cached.reset(new float[kCachedWorkFloats]);
        cached_n = kCachedWorkFloats;
      }
      ptr_ = cached.get();
    } else {
      own_.reset(new float[n]);
      ptr_ = own_.get();
    }
  }
  float* data() const { return ptr_; }

 private:
  std::unique_ptr<float[]> own_;
  float* ptr_ = nullptr;
};

// Rows of D values per task of the unmixed rows.
inline int64_t unmixed_grain(int64_t D) { return std::max<int64_t>(1, kGrainSize / (4 * D)); }

// Work buffer of one mix_bundle task over nb groups, in floats (a dense product through `gemm` also
// keeps its K * nb output rows).
inline int64_t bundle_work_floats(int64_t D, int64_t K, int64_t nb, bool keep, bool gemm) {
  return D + 4 * nb * D + (keep ? K * nb * D : 0) + (gemm ? K * nb * D : 0);
}

// optimal: the column sum of a group adds blocks of this many rows, then adds the blocks up with Kahan
// compensation (kahan_add), which keeps the fp32 rounding error low for long groups.
constexpr int64_t kColumnSumBlock = 16;

// sum[e] += blk[e] for n values, Kahan-compensated (comp: the lost low bits).
inline void kahan_add(const float* __restrict__ blk, float* __restrict__ sum, float* __restrict__ comp, int64_t n) {
  for (int64_t e = 0; e < n; ++e) {
    const float y = blk[e] - comp[e];
    const float t = sum[e] + y;
    comp[e] = (t - sum[e]) - y;
    sum[e] = t;
  }
}

// Mixes the nb groups g0 .. g0 + nb - 1 (nb > 1 only for axis rows: consecutive columns of one
// sample's grid, whose rows interleave in memory).  Rows are visited in ascending memory order,
// position i outer and group inner, so the hardware prefetchers see streams, not rows `step` apart.
// src(row, out, first, scratch) writes the fp32 source row (`first` is true exactly once per row: side
// outputs happen then); sink(row, v, scratch) consumes the mixed row and may overwrite v; target(row)
// names where the mixed row of shift / optimal goes (its final fp32 place, so that the sink need not
// copy it: v is then that pointer), or nullptr for a work buffer.  `work`
// holds bundle_work_floats(D, K, nb, keep, gemm) floats: scratch, then four nb * D buffers, then, when
// `keep`, the K * nb source rows, then, for a dense product through G.gemm, its K * nb output rows.
template <typename Src, typename Sink, typename Target>
inline void mix_bundle(const Geometry& G, int64_t g0, int64_t nb, int64_t kind, float alpha, const float* mix,
                       bool transpose, bool keep, float* work, Src& src, Sink& sink, Target& target) {
  const int64_t D = G.D, K = G.K;
  float* scratch = work;
  // per group c, D floats each at offset c * D:
  float* A = work + D;     // shift: partner / current row, alternating with Bf; optimal: the block sum
                           // (its first D: the output row); dense: the output row (first D)
  float* Bf = A + nb * D;  // shift: see A; optimal without keep: the recomputed source row (first D)
  float* C = Bf + nb * D;  // transposed shift: s_0; optimal: the column sum
  float* E = C + nb * D;   // optimal: the Kahan compensation; transposed shift: the output row (first D)
  float* S = E + nb * D;   // keep: source row (i, c) at S + (i * nb + c) * D
  float* Y = S + K * nb * D;  // dense through G.gemm: output row (i, c) at Y + (i * nb + c) * D
  auto row = [&](int64_t c, int64_t i) { return G.row(g0 + c, i); };
  auto dest = [&](int64_t r, float* buffer) {
    float* t = target(r);
    return t != nullptr ? t : buffer;
  };
  if (kind == KIND_SHIFT && !transpose) {
    // y_i = (1 - a) s_i + a s_{i-1}, s_{-1} = s_{K-1}: stream the groups keeping one partner row each
    const float cc = 1.0f - alpha;
    for (int64_t c = 0; c < nb; ++c) src(row(c, K - 1), A + c * D, false, scratch);
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t c = 0; c < nb; ++c) {
        float* prev = (i & 1) ? Bf + c * D : A + c * D;  // buffers alternate: the source row just read
        float* cur = (i & 1) ? A + c * D : Bf + c * D;   // is the next row's partner
        src(row(c, i), cur, true, scratch);
        float* y = dest(row(c, i), prev);  // prev itself is free once y_i is computed
        row_map(D, [&](int64_t d) { store8(y + d, cc * load8(cur + d) + alpha * load8(prev + d)); },
                [&](int64_t d) { y[d] = cc * cur[d] + alpha * prev[d]; });
        sink(row(c, i), y, scratch);
      }
    }
  } else if (kind == KIND_SHIFT) {
    // transposed: y_i = (1 - a) s_i + a s_{i+1}, s_K = s_0.  Also walks forwards, emitting y_{i-1} once
    // s_i is read and keeping s_0 for the last row.
    const float cc = 1.0f - alpha;
    for (int64_t c = 0; c < nb; ++c) src(row(c, 0), C + c * D, true, scratch);
    for (int64_t i = 1; i < K; ++i) {
      for (int64_t c = 0; c < nb; ++c) {
        const float* prev = i == 1 ? C + c * D : ((i & 1) ? A + c * D : Bf + c * D);
        float* cur = (i & 1) ? Bf + c * D : A + c * D;
        src(row(c, i), cur, true, scratch);
        float* out = dest(row(c, i - 1), E);
        row_map(D, [&](int64_t d) { store8(out + d, cc * load8(prev + d) + alpha * load8(cur + d)); },
                [&](int64_t d) { out[d] = cc * prev[d] + alpha * cur[d]; });
        sink(row(c, i - 1), out, scratch);
      }
    }
    for (int64_t c = 0; c < nb; ++c) {
      const float* prev = K == 1 ? C + c * D : ((K & 1) ? A + c * D : Bf + c * D);  // s_{K-1}
      float* out = dest(row(c, K - 1), E);
      for (int64_t d = 0; d < D; ++d) out[d] = cc * prev[d] + alpha * C[c * D + d];
      sink(row(c, K - 1), out, scratch);
    }
  } else if (kind == KIND_OPTIMAL) {
    // M s_i = (s_i + sum_j s_j) / (K + 1); M is symmetric, so the transposed mix is the same.  The
    // column sum is two-level (kColumnSumBlock, kahan_add).
    std::fill(C, C + nb * D, 0.0f);
    std::fill(E, E + nb * D, 0.0f);
    for (int64_t i0 = 0; i0 < K; i0 += kColumnSumBlock) {
      std::fill(A, A + nb * D, 0.0f);
      for (int64_t i = i0; i < std::min(K, i0 + kColumnSumBlock); ++i) {
        for (int64_t c = 0; c < nb; ++c) {
          float* si = keep ? S + (i * nb + c) * D : Bf;
          src(row(c, i), si, true, scratch);
          float* blk = A + c * D;
          row_map(D, [&](int64_t d) { store8(blk + d, load8(blk + d) + load8(si + d)); },
                  [&](int64_t d) { blk[d] += si[d]; });
        }
      }
      kahan_add(A, C, E, nb * D);
    }
    const float inv = 1.0f / static_cast<float>(K + 1);
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t c = 0; c < nb; ++c) {
        const float* si = S + (i * nb + c) * D;
        if (!keep) {
          src(row(c, i), Bf, false, scratch);
          si = Bf;
        }
        const float* colsum = C + c * D;
        float* y = dest(row(c, i), A);
        row_map(D, [&](int64_t d) { store8(y + d, (load8(si + d) + load8(colsum + d)) * inv); },
                [&](int64_t d) { y[d] = (si[d] + colsum[d]) * inv; });
        sink(row(c, i), y, scratch);
      }
    }
  } else if (G.gemm != nullptr) {  // dense as matrix products: group c's Y_c (K x D) = M S_c (M^T transposed)
    for (int64_t j = 0; j < K; ++j) {
      for (int64_t c = 0; c < nb; ++c) src(row(c, j), S + (j * nb + c) * D, true, scratch);
    }
    // one (K, D) product per group whatever the bundle (which depends on the thread count), so a row's
    // result does not depend on the thread count either
    for (int64_t c = 0; c < nb; ++c) G.gemm(transpose, K, D, mix, S + c * D, nb * D, Y + c * D, nb * D);
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t c = 0; c < nb; ++c) sink(row(c, i), Y + (i * nb + c) * D, scratch);
    }
  } else {  // dense: y_i = sum_j M[i, j] s_j (M^T when transposed); keep is always on
    for (int64_t j = 0; j < K; ++j) {
      for (int64_t c = 0; c < nb; ++c) src(row(c, j), S + (j * nb + c) * D, true, scratch);
    }
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t c = 0; c < nb; ++c) {
        std::fill(A, A + D, 0.0f);
        for (int64_t j = 0; j < K; ++j) {
          const float m = transpose ? mix[j * K + i] : mix[i * K + j];
          if (m == 0.0f) continue;
          const float* sj = S + (j * nb + c) * D;
          row_map(D, [&](int64_t d) { store8(A + d, load8(A + d) + m * load8(sj + d)); },
                  [&](int64_t d) { A[d] += m * sj[d]; });
        }
        sink(row(c, i), A, scratch);
      }
    }
  }
}

// The rows that are never mixed (every row for identity, else the prefix tokens): src -> sink in blocks
// of rows.
template <typename Src, typename Sink>
void run_unmixed(const Geometry& G, int64_t kind, Src& src, Sink& sink) {
  const int64_t D = G.D;
  auto unmixed = [&](int64_t n_rows, auto row_of) {
    at::parallel_for(0, n_rows, unmixed_grain(D), [&](int64_t begin, int64_t end) {
      const WorkBuffer buf(2 * D);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t row = row_of(t);
        src(row, buf.data(), true, buf.data() + D);
        sink(row, buf.data(), buf.data() + D);
      }
    });
  };
  if (kind == KIND_IDENTITY) {
    unmixed(G.B * G.N, [](int64_t t) { return t; });
  } else if (G.P > 0) {
    const int64_t P = G.P, N = G.N;
    unmixed(G.B * P, [P, N](int64_t t) { return (t / P) * N + t % P; });
  }
}

// The mixed rows, one bundle of groups per task: bundle(g0, nb, keep, work) mixes groups g0 .. g0 + nb - 1
// with `work` holding bundle_work_floats(D, K, nb, keep, dense through G.gemm) floats (mix_bundle, or a
// fused forward of the same layout).  Axis rows bundles consecutive grid columns of a sample (all of
// them when that leaves kTasksPerThread tasks per thread and the kept rows fit the buffer limit; fewer
// otherwise); the other axes mix one group per task.
template <typename Bundle>
void run_mixed(const Geometry& G, int64_t kind, Bundle&& bundle) {
  const int64_t D = G.D, K = G.K;
  const bool kept_kind = kind == KIND_DENSE || kind == KIND_OPTIMAL;
  const bool dense_gemm = kind == KIND_DENSE && G.gemm != nullptr;
  // kept rows per group and column: the source rows, and for a dense product its output rows too
  const int64_t kept_rows = dense_gemm ? 2 * K : K;
  // nb: groups per task.  Only axis rows has interleaved groups (step > 1); halve the bundle while it
  // gives fewer than kTasksPerThread tasks per thread (a few tasks per thread keep the static split of
  // parallel_for balanced) or its kept rows exceed the buffer limit.
  constexpr int64_t kTasksPerThread = 4;
  int64_t nb = G.step;
  const int64_t min_tasks = kTasksPerThread * at::get_num_threads();
  while (nb > 1 && ((G.groups / G.step) * ((G.step + nb - 1) / nb) < min_tasks ||
                    (kept_kind && kept_rows * nb * D > kMaxGroupBufferFloats))) {
    nb = (nb + 1) / 2;
  }
  const bool keep = kind == KIND_DENSE || (kind == KIND_OPTIMAL && K * nb * D <= kMaxGroupBufferFloats);
  const int64_t per_sample = (G.step + nb - 1) / nb;  // bundles per `step` consecutive groups
  const int64_t n_tasks = (G.groups / G.step) * per_sample;
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    const WorkBuffer work(bundle_work_floats(D, K, nb, keep, dense_gemm));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = (t % per_sample) * nb;
      const int64_t g0 = (t / per_sample) * G.step + c0;
      bundle(g0, std::min(nb, G.step - c0), keep, work.data());
    }
  });
}

// No target row: mixed rows go to a work buffer, then to the sink.
inline float* no_target(int64_t) { return nullptr; }

// Runs src -> (mix) -> sink over every row: run_unmixed, then mix_bundle over run_mixed's bundles
// (target: see mix_bundle).
template <typename Src, typename Sink, typename Target = decltype(no_target)>
void run_rows(const Geometry& G, int64_t kind, float alpha, const float* mix, bool transpose, Src& src, Sink& sink,
              Target& target = no_target) {
  run_unmixed(G, kind, src, sink);
  if (kind == KIND_IDENTITY) return;
  run_mixed(G, kind, [&](int64_t g0, int64_t nb, bool keep, float* work) {
    mix_bundle(G, g0, nb, kind, alpha, mix, transpose, keep, work, src, sink, target);
  });
}

// ------------------------------------------------------------------------------------------------
// forward

// y = f(d) (8 values: vec(d, y); one value: one(d)) written to v (fp32) and, with kOut, to out (its
// dtype); returns y's (mean, rstd) (finish_stats) from the same pass.  vec(0, y) / one(0) runs once more
// first, for the centre (row_centre): it must give the same values again and may only repeat side effects.
template <bool kOut, typename T, typename Vec, typename One>
inline std::pair<float, float> map_store_row_stats(int64_t D, float* v, T* out, float eps, Vec&& vec, One&& one) {
  float c;
  if (D >= W) {
    F8 y;
    vec(int64_t(0), y);
    c = row_centre(y);
  } else {
    c = one(int64_t(0));
  }
  float s1, s2;
  row_reduce2(
      D,
      [&](int64_t d, F8& s, F8& q) {
        F8 y;
        vec(d, y);
        store8(v + d, y);
        if constexpr (kOut) store8_t(out + d, y);
        const F8 e = y - c;
        s += e;
        q += e * e;
      },
      [&](int64_t d, float& s, float& q) {
        const float y = one(d);
        v[d] = y;
        if constexpr (kOut) out[d] = static_cast<T>(y);
        const float e = y - c;
        s += e;
        q += e * e;
      },
      s1, s2);
  return finish_stats(v, c, s1, s2, D, eps);
}

// The forward's pointers (FwdArgs, typed).
template <typename T>
struct FwdRows {
  const T* x;
  const T* res;  // nullptr: no residual
  const float* w;
  const float* b;
  float eps;
  T* normed;
  T* rout;
  float* mean;
  float* rstd;
};

// The default-order forward (residual_out = M s, normed = LN(residual_out)) of kind shift (not reversed)
// and of optimal with kept rows: mix_bundle's arithmetic, in the same order (so the same results),
// with fewer passes over each row.  The add s = x + residual is one pass with the shift partner's update
// or optimal's block sum; the mix, the store of residual_out and the mean are one pass, into
// residual_out's own row for fp32 (no buffer; else the fp32 scratch row); then rstd and the normalized
// store, as for identity.  `work`: mix_bundle's layout.
template <bool kRes, typename T>
void fwd_mix_bundle(const Geometry& G, int64_t g0, int64_t nb, int64_t kind, float alpha, const FwdRows<T>& R,
                    float* work) {
  const int64_t D = G.D, K = G.K;
  float* scratch = work;
  float* A = work + D;  // shift: partner / current row, alternating with Bf; optimal: the block sums
  float* Bf = A + nb * D;
  float* C = Bf + nb * D;  // optimal: the column sums
  float* E = C + nb * D;   // optimal: their Kahan compensation
  float* S = E + nb * D;   // optimal: source row (i, c) at S + (i * nb + c) * D
  auto row = [&](int64_t c, int64_t i) { return G.row(g0 + c, i); };
  // s = x + residual at `row`, 8 values / one value
  auto add8 = [&](int64_t r, int64_t d, F8& s) {
    load8_f(R.x + r * D + d, s);
    if constexpr (kRes) {
      F8 t;
      load8_f(R.res + r * D + d, t);
      s += t;
    }
  };
  auto add1 = [&](int64_t r, int64_t d) {
    float s = static_cast<float>(R.x[r * D + d]);
    if constexpr (kRes) s += static_cast<float>(R.res[r * D + d]);
    return s;
  };
  // residual_out = y (vec / one), then the LayerNorm of y
  auto emit = [&](int64_t r, auto&& vec, auto&& one) {
    T* o = R.rout + r * D;
    float* v;
    std::pair<float, float> st;
    if constexpr (std::is_same_v<T, float>) {
      v = o;
      st = map_store_row_stats<false>(D, v, o, R.eps, vec, one);
    } else {
      v = scratch;
      st = map_store_row_stats<true>(D, v, o, R.eps, vec, one);
    }
    const auto [mu, rs] = st;
    R.mean[r] = mu;
    R.rstd[r] = rs;
    normalize_store(v, mu, rs, R.w, R.b, R.normed + r * D, D);
  };
  if (kind == KIND_SHIFT) {
    // y_i = (1 - a) s_i + a s_{i-1}, s_{-1} = s_{K-1}
    const float cc = 1.0f - alpha;
    for (int64_t c = 0; c < nb; ++c) {
      const int64_t r = row(c, K - 1);
      float* p = A + c * D;
      row_map(D, [&](int64_t d) { F8 s; add8(r, d, s); store8(p + d, s); }, [&](int64_t d) { p[d] = add1(r, d); });
    }
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t c = 0; c < nb; ++c) {
        const float* prev = (i & 1) ? Bf + c * D : A + c * D;  // buffers alternate: s_i is the next
        float* cur = (i & 1) ? A + c * D : Bf + c * D;         // row's partner
        const int64_t r = row(c, i);
        emit(r,
             [&](int64_t d, F8& y) {
               F8 s;
               add8(r, d, s);
               store8(cur + d, s);
               y = cc * s + alpha * load8(prev + d);
             },
             [&](int64_t d) {
               const float s = add1(r, d);
               cur[d] = s;
               return cc * s + alpha * prev[d];
             });
      }
    }
    return;
  }
  // optimal: M s_i = (s_i + sum_j s_j) / (K + 1), column sums as in mix_bundle
  std::fill(C, C + nb * D, 0.0f);
  std::fill(E, E + nb * D, 0.0f);
  for (int64_t i0 = 0; i0 < K; i0 += kColumnSumBlock) {
    std::fill(A, A + nb * D, 0.0f);
    for (int64_t i = i0; i < std::min(K, i0 + kColumnSumBlock); ++i) {
      for (int64_t c = 0; c < nb; ++c) {
        const int64_t r = row(c, i);
        float* si = S + (i * nb + c) * D;
        float* blk = A + c * D;
        row_map(D,
                [&](int64_t d) {
                  F8 s;
                  add8(r, d, s);
                  store8(si + d, s);
                  store8(blk + d, load8(blk + d) + s);
                },
                [&](int64_t d) {
                  si[d] = add1(r, d);
                  blk[d] += si[d];
                });
      }
    }
    kahan_add(A, C, E, nb * D);
  }
  const float inv = 1.0f / static_cast<float>(K + 1);
  for (int64_t i = 0; i < K; ++i) {
    for (int64_t c = 0; c < nb; ++c) {
      const float* si = S + (i * nb + c) * D;
      const float* colsum = C + c * D;
      emit(row(c, i), [&](int64_t d, F8& y) { y = (load8(si + d) + load8(colsum + d)) * inv; },
           [&](int64_t d) { return (si[d] + colsum[d]) * inv; });
    }
  }
}

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
  if (kind == KIND_IDENTITY && !mix_after_norm) {
    // residual_out = s, normed = LN(s), row by row: s is added, stored and summed in one pass, into the
    // residual_out row itself for fp32 (no work buffer), else into an fp32 row and residual_out.
    auto rows = [&](auto has_res) {
      constexpr bool kRes = decltype(has_res)::value;
      at::parallel_for(0, G.B * G.N, unmixed_grain(D), [&](int64_t begin, int64_t end) {
        const WorkBuffer buf(std::is_same_v<T, float> ? 0 : D);
        for (int64_t row = begin; row < end; ++row) {
          const T* xr = xp + row * D;
          const T* rr = kRes ? rp + row * D : nullptr;
          T* o = op + row * D;
          std::pair<float, float> st;
          float* v;
          if constexpr (std::is_same_v<T, float>) {
            v = o;
            st = add_store_row_stats<kRes, false>(xr, rr, v, o, D, eps);
          } else {
            v = buf.data();
            st = add_store_row_stats<kRes, true>(xr, rr, v, o, D, eps);
          }
          const auto [mu, rs] = st;
          mp[row] = mu;
          sp[row] = rs;
          normalize_store(v, mu, rs, wp, bp, yp + row * D, D);
        }
      });
    };
    if (rp) {
      rows(std::true_type{});
    } else {
      rows(std::false_type{});
    }
    return;
  }
  if (!mix_after_norm) {
    // residual_out = M s, normed = LN(residual_out)
    auto src = [=](int64_t row, float* out, bool, float*) { add(row, out); };
    auto sink = [=](int64_t row, float* v, float*) {
      const auto [mu, rs] = store_row_stats(v, op + row * D, D, eps);  // residual_out and the stats in one pass
      mp[row] = mu;
      sp[row] = rs;
      normalize_store(v, mu, rs, wp, bp, yp + row * D, D);  // straight into the output: no extra copy
    };
    if (!((kind == KIND_SHIFT && !A.g.reverse) || kind == KIND_OPTIMAL)) {
      run_rows(G, kind, alpha, mix, A.g.reverse, src, sink);
      return;
    }
    // shift / optimal: the fused forward of the mixed rows (fwd_mix_bundle)
    const FwdRows<T> R{xp, rp, wp, bp, eps, yp, op, mp, sp};
    run_unmixed(G, kind, src, sink);
    run_mixed(G, kind, [&](int64_t g0, int64_t nb, bool keep, float* work) {
      if (kind == KIND_OPTIMAL && !keep) {  // groups too large to keep: mix_bundle recomputes the rows
        mix_bundle(G, g0, nb, kind, alpha, mix, false, keep, work, src, sink, no_target);
      } else if (rp) {
        fwd_mix_bundle<true>(G, g0, nb, kind, alpha, R, work);
      } else {
        fwd_mix_bundle<false>(G, g0, nb, kind, alpha, R, work);
      }
    });
  } else {
    // residual_out = s, normed = M LN(s)
    auto src = [=](int64_t row, float* out, bool first, float*) {
      add(row, out);
      auto [mu, rs] = row_stats(out, D, eps);
      if (first) {
        convert_row(out, op + row * D, D);
        mp[row] = mu;
        sp[row] = rs;
      }
      normalize_store(out, mu, rs, wp, bp, out, D);
    };
    auto sink = [=](int64_t row, float* v, float*) { convert_row(v, yp + row * D, D); };
    run_rows(G, kind, alpha, mix, A.g.reverse, src, sink);
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

  // gin (the gradient wrt the LN output, before the affine; T in memory or an fp32 buffer) -> out: the
  // gradient wrt the LN input + d_residual_out; accumulates dweight / dbias when asked.  xhat: D floats.
  auto ln_back = [=](int64_t row, const auto* gin, float* out, bool accumulate, float* xhat) {
    const float mu = mup[row], rs = rsp[row];
    const T* rr = rp + row * D;
    const T* dr = drp ? drp + row * D : nullptr;
    if (!accumulate) {
      if (wp) return ln_back_row<false, true>(gin, rr, dr, wp, mu, rs, invD, nullptr, nullptr, xhat, out, D);
      return ln_back_row<false, false>(gin, rr, dr, wp, mu, rs, invD, nullptr, nullptr, xhat, out, D);
    }
    // per-thread partials, two-level: rows add into a block slot that is flushed into the main slot
    // every kSumBlock rows (bounds the fp32 rounding error of long sums); the caller sums all slots.
    constexpr int64_t kSumBlock = 16;
    const int64_t tid = std::min<int64_t>(at::get_thread_num(), n_parts - 1);
    float* __restrict__ dw_main = dwp + 2 * tid * D;
    float* __restrict__ db_main = dbp + 2 * tid * D;
    float* __restrict__ dw_block = dw_main + D;
    float* __restrict__ db_block = db_main + D;
    if (wp) {
      ln_back_row<true, true>(gin, rr, dr, wp, mu, rs, invD, dw_block, db_block, xhat, out, D);
    } else {
      ln_back_row<true, false>(gin, rr, dr, wp, mu, rs, invD, dw_block, db_block, xhat, out, D);
    }
    if (++counts[tid * kCountPad] % kSumBlock == 0) {
      for (int64_t d = 0; d < D; ++d) {
        dw_main[d] += dw_block[d];
        db_main[d] += db_block[d];
        dw_block[d] = 0.0f;
        db_block[d] = 0.0f;
      }
    }
  };
  if (kind == KIND_IDENTITY && !mix_after_norm) {
    // dx = LN-backward(dy) + d_residual_out row by row, straight into dx for fp32
    at::parallel_for(0, G.B * G.N, unmixed_grain(D), [&](int64_t begin, int64_t end) {
      const WorkBuffer buf(std::is_same_v<T, float> ? D : 2 * D);
      float* xhat = buf.data();
      for (int64_t row = begin; row < end; ++row) {
        T* dx = dxp + row * D;
        if constexpr (std::is_same_v<T, float>) {
          ln_back(row, dyp + row * D, dx, true, xhat);
        } else {
          ln_back(row, dyp + row * D, xhat + D, true, xhat);
          convert_row(xhat + D, dx, D);
        }
      }
    });
    return;
  }
  if (!mix_after_norm) {
    // g = LN-backward(dy) + d_residual_out (gradient wrt r = M s); dx = M^T g
    auto src = [=](int64_t row, float* out, bool first, float* scratch) { ln_back(row, dyp + row * D, out, first, scratch); };
    // fp32: shift / optimal write the mixed row straight into dx (target), so the sink copies nothing
    auto target = [=](int64_t row) -> float* {
      if constexpr (std::is_same_v<T, float>) {
        return dxp + row * D;
      } else {
        (void)row;
        return nullptr;
      }
    };
    auto sink = [=](int64_t row, float* v, float*) {
      if constexpr (std::is_same_v<T, float>) {
        if (v == dxp + row * D) return;
      }
      convert_row(v, dxp + row * D, D);
    };
    run_rows(G, kind, alpha, mix, !A.g.reverse, src, sink, target);
  } else {
    // dz = M^T dy; dx = LN-backward(dz) + d_residual_out
    auto src = [=](int64_t row, float* out, bool, float*) { convert_row(dyp + row * D, out, D); };
    auto sink = [=](int64_t row, float* v, float* scratch) {
      ln_back(row, v, v, true, scratch);
      convert_row(v, dxp + row * D, D);
    };
    run_rows(G, kind, alpha, mix, !A.g.reverse, src, sink);
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
