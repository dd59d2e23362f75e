// Fused residual add + (I + Q) mix + LayerNorm on CUDA: the kernels behind
// noisynn::mix_add_layernorm_fwd_cuda / _bwd_cuda (registered in mix_add_layernorm_op.cpp).
//
// Same semantics as the CPU kernel (csrc/cpu/mix_add_layernorm.cpp) and the oracle
// reference.mix_add_layernorm.  Layout: contiguous (B * N, D) rows, row = b * N + n; the P prefix tokens of
// every sample are added and normalized, never mixed; the patch rows form `groups` groups of K rows:
//
//   axis     group g              position i    row(g, i)                           rows apart
//   tokens   b                    p             b * N + P + i                       1
//   rows     b * gw + p % gw      p // gw       b * N + P + p % gw + i * gw         gw
//   batch    p                    b             i * N + P + p                       N
//
// The CPU kernel streams whole groups; on the GPU one block builds rows independently, so every mixed
// source row must be cheap to recompute from its inputs and a few per-row scalars.  Each direction is
// therefore split into stages where the row reductions (LayerNorm statistics, the two LN-backward
// dot products) happen before the mix reads the source, or after the mix has built the row:
//
//   forward, mix before the norm: r = M s, y = LN(r)
//     [optimal: group_sum(s)] -> FWD_LN: r = M s, stats of r, y
//   forward, mix after the norm: r = s, y = M LN(s)
//     FWD_LN (unmixed): r = s, stats of s, y of prefix rows -> [optimal: group_sum(LN(s))] ->
//     FWD_MIX over patch rows: y = M LN(s) with the stored stats
//   backward, mix before the norm: g = LN-backward(dy) + d_residual_out, dx = M^T g
//     BWD_LN (unmixed): c1, c2 of every row, dweight / dbias, dx of prefix rows ->
//     [optimal: group_sum(g)] -> BWD_MIX over patch rows: dx = M^T g with the stored c1, c2
//   backward, mix after the norm: dz = M^T dy, dx = LN-backward(dz) + d_residual_out
//     [optimal: group_sum(dy)] -> BWD_LN: dz = M^T dy, dweight / dbias, dx
//   identity: one FWD_LN / BWD_LN stage, unmixed.
//
// Mixing (as the CPU kernel): shift y_i = (1 - a) s_i + a s_{i-1} (transposed: s_{i+1}; a shift of
// direction -1 is the transposed one, so `reverse` flips the partner), indices mod K;
// optimal y_i = (s_i + sum_j s_j) / (K + 1) with the column sum from group_sum_kernel (M is symmetric);
// dense y_i = sum_j M[i, j] s_j (M^T when transposed), zero entries skipped.
//
// Threads: a block is `ty` row lanes of `tx` threads (tx a multiple of 32, so a warp never spans two
// lanes); lane y builds one row at a time.  Thread x of a lane owns the vectors d = (k * tx + x) * VEC,
// k < items, of every row, and keeps them in its own shared-memory slots (slot (k * VEC + e) * tx + x,
// conflict-free): only reductions cross threads (warp shuffles, then the lane's warps in a fixed order).
// All arithmetic is fp32, outputs are stored in their tensor's dtype.  dweight / dbias: each BWD_LN block
// owns a fixed, contiguous range of rows and one fp32 partial row; partials are summed in a fixed order
// (deterministic for a given GPU and shape).
#include "mix_add_layernorm.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream (the toolkit's cuBLAS / cuSPARSE headers not needed)
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace noisynn {
namespace cuda {
namespace {

// Stages (what a row kernel builds and what it does with the row).
constexpr int FWD_LN = 0;   // source x + residual (mixed);       sink: residual_out, stats, normed
constexpr int FWD_MIX = 1;  // source LN(x + residual) (mixed);   sink: normed
constexpr int BWD_LN = 2;   // source dy (mixed);                 sink: LN backward, dweight / dbias, dx
constexpr int BWD_MIX = 3;  // source LN-backward(dy) + dres;     sink: dx

constexpr int kMaxThreads = 512;        // tx * ty <= 512 (plan_rows)
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kSumCols = 32;            // group_sum / sum_partials blocks: 32 columns x 8 row slices
constexpr int kSumSplit = 8;
constexpr int kSumBlock = 16;           // rows per inner block of the two-level column sums (as the CPU)

template <typename T>
struct RowParams {
  // geometry: N tokens per sample, P prefix tokens, n = N - P patch tokens, K rows per group, `step`
  // (the token step of rows / tokens), `stride` (rows between positions of a group), D features
  int64_t N, P, n, K, step, stride;
  int axis;
  int D;
  // mixing
  int kind;
  bool transpose;
  bool reverse;  // shift of direction -1: partner i + 1 forward, i - 1 transposed
  float alpha, inv_k1;  // inv_k1 = 1 / (K + 1)
  const float* mix;     // (K, K) fp32 (dense)
  const float* colsum;  // (groups, D) fp32 (optimal)
  // work split: task t is row t, or the t-th patch row when patch_only
  int64_t n_tasks, rows_per_block;
  bool patch_only;
  int items;  // vectors per thread and row
  // tensors
  const T* a;         // x (forward) or dy (backward)
  const T* b;         // residual or d_residual_out; nullable
  const T* r;         // residual_out saved for backward (the LN input)
  const float* w;     // (D,) fp32, nullable
  const float* bias;  // (D,) fp32, nullable
  float* mean;        // (rows,) fp32: forward FWD_LN writes, the others read
  float* rstd;
  float* c1;          // (rows,) fp32 LN-backward constants: BWD_LN writes (store_c), BWD_MIX reads
  float* c2;
  T* out_r;           // FWD_LN: residual_out
  T* out;             // normed (forward) or dx (backward)
  float* dw_part;     // BWD_LN: (blocks, D) fp32 partials
  float* db_part;
  float eps;
  bool store_c;       // BWD_LN: store c1, c2
  bool final_patch;   // FWD_LN / BWD_LN: write normed / dx for patch rows too (prefix rows always)
};

// ------------------------------------------------------------------------------------------------
// loads and stores of VEC consecutive elements, converted to / from fp32

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = static_cast<float>(pk.v[e]);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int e = 0; e < VEC; ++e) pk.v[e] = static_cast<T>(in[e]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

__device__ __forceinline__ void kahan_add(float& sum, float& comp, float v) {
  const float y = v - comp;
  const float t = sum + y;
  comp = (t - sum) - y;
  sum = t;
}

// Sums NV values over the threads of each row lane; every thread of the lane gets the same result
// (butterfly within warps, then the lane's warps in a fixed order).  Called by all threads of the block.
template <int NV>
__device__ __forceinline__ void lane_sum(float (&v)[NV], float* red) {
#pragma unroll
  for (int k = 0; k < NV; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
  }
  const int lin = threadIdx.y * blockDim.x + threadIdx.x;
  const int warp = lin >> 5;
  const int warps_per_lane = blockDim.x >> 5;
  __syncthreads();  // an earlier call's readers are done with red
  if ((lin & 31) == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) red[warp * NV + k] = v[k];
  }
  __syncthreads();
  const int w0 = threadIdx.y * warps_per_lane;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    float s = 0.0f;
    for (int w = 0; w < warps_per_lane; ++w) s += red[(w0 + w) * NV + k];
    v[k] = s;
  }
}

// ------------------------------------------------------------------------------------------------
// sources: one vector of the row being mixed, in fp32 (elementwise given the stored row scalars)

// v <- (v - mean) * rstd * w + b, computed as v * rstd + shift (shift = -mean * rstd); the CPU kernels
// compute (v - mean) * rstd, exact for constant rows, which this order is not (within 2^-24 / sqrt(eps))
template <int VEC>
__device__ __forceinline__ void normalize_vec(float (&v)[VEC], float rs, float shift, const float* w,
                                              const float* b, int d) {
  float wv[VEC], bv[VEC];
  if (w && b) {
    load_vec<VEC>(w + d, wv);
    load_vec<VEC>(b + d, bv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = (v[e] * rs + shift) * wv[e] + bv[e];
  } else if (w) {
    load_vec<VEC>(w + d, wv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = (v[e] * rs + shift) * wv[e];
  } else if (b) {
    load_vec<VEC>(b + d, bv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = v[e] * rs + shift + bv[e];
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = v[e] * rs + shift;
  }
}

template <int STAGE, int VEC, typename T>
__device__ __forceinline__ void source(const RowParams<T>& p, int64_t row, int d, float (&v)[VEC]) {
  const int64_t off = row * p.D + d;
  load_vec<VEC>(p.a + off, v);
  if constexpr (STAGE == FWD_LN || STAGE == FWD_MIX) {
    if (p.b) {
      float u[VEC];
      load_vec<VEC>(p.b + off, u);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] += u[e];
    }
    if constexpr (STAGE == FWD_MIX) {
      const float rs = p.rstd[row];
      normalize_vec<VEC>(v, rs, -p.mean[row] * rs, p.w, p.bias, d);
    }
  } else if constexpr (STAGE == BWD_MIX) {
    // LN-backward at the saved statistics: (dy * w - (xhat * c1 + c2)) * rstd + d_residual_out
    const float mu = p.mean[row], rs = p.rstd[row], c1 = p.c1[row], c2 = p.c2[row];
    float r[VEC];
    load_vec<VEC>(p.r + off, r);
    if (p.w) {
      float wv[VEC];
      load_vec<VEC>(p.w + d, wv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] *= wv[e];
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = (v[e] - ((r[e] - mu) * rs * c1 + c2)) * rs;
    if (p.b) {
      float u[VEC];
      load_vec<VEC>(p.b + off, u);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] += u[e];
    }
  }
  // BWD_LN: the source is dy itself
}

// Where a row sits in its mixing group (all threads of a lane compute the same).
struct RowPlace {
  bool patch;    // a patch row (mixed); prefix rows are never mixed
  int64_t i;     // position in the group
  int64_t g;     // group
  int64_t base;  // row of position 0
};

template <typename T>
__device__ __forceinline__ RowPlace locate(const RowParams<T>& p, int64_t row) {
  RowPlace at{false, 0, 0, row};
  const int64_t b = row / p.N;
  const int64_t pos = row - b * p.N - p.P;
  if (pos < 0) return at;
  at.patch = true;
  if (p.axis == AXIS_BATCH) {
    at.g = pos;
    at.i = b;
  } else {  // tokens (step 1) and rows (step gw)
    at.g = b * p.step + pos % p.step;
    at.i = pos / p.step;
  }
  at.base = row - at.i * p.stride;
  return at;
}

// One vector of the mixed row: sum_j M[i, j] source(row_j) (M^T when transposed; prefix rows unmixed).
template <int STAGE, int VEC, typename T>
__device__ __forceinline__ void mixed_vec(const RowParams<T>& p, const RowPlace& at, int64_t row, int d,
                                          float (&v)[VEC]) {
  if (!at.patch || p.kind == KIND_IDENTITY) {
    source<STAGE, VEC>(p, row, d, v);
  } else if (p.kind == KIND_SHIFT) {
    const int64_t j = (p.transpose != p.reverse) ? (at.i + 1 == p.K ? 0 : at.i + 1) : (at.i == 0 ? p.K - 1 : at.i - 1);
    float u[VEC];
    source<STAGE, VEC>(p, row, d, v);
    source<STAGE, VEC>(p, at.base + j * p.stride, d, u);
    const float c = 1.0f - p.alpha;
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = c * v[e] + p.alpha * u[e];
  } else if (p.kind == KIND_OPTIMAL) {
    float cs[VEC];
    source<STAGE, VEC>(p, row, d, v);
    load_vec<VEC>(p.colsum + at.g * p.D + d, cs);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = (v[e] + cs[e]) * p.inv_k1;
  } else {  // dense
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = 0.0f;
    for (int64_t j = 0; j < p.K; ++j) {
      const float m = p.transpose ? p.mix[j * p.K + at.i] : p.mix[at.i * p.K + j];
      if (m == 0.0f) continue;
      float u[VEC];
      source<STAGE, VEC>(p, at.base + j * p.stride, d, u);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] += m * u[e];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// kernels

// One stage over the tasks [blockIdx.x * rows_per_block, + rows_per_block); lane y takes every ty-th task.
// Dynamic shared memory: FWD_LN one, BWD_LN three regions (row, dweight, dbias) of ty * slots floats.
template <int STAGE, int VEC, typename T>
__global__ void __launch_bounds__(kMaxThreads) mix_ln_rows_kernel(const RowParams<T> p) {
  extern __shared__ float4 dyn_smem[];
  __shared__ float red[kMaxWarps * 2];
  const int x = threadIdx.x, y = threadIdx.y;
  const int tx = blockDim.x, ty = blockDim.y;
  const int D = p.D;
  const int nvec = D / VEC;
  const int slots = p.items * VEC * tx;  // floats per lane and region
  float* smem = reinterpret_cast<float*>(dyn_smem);
  float* buf = smem + y * slots;
  float* dw_acc = smem + (ty + y) * slots;
  float* db_acc = smem + (2 * ty + y) * slots;
  if constexpr (STAGE == BWD_LN) {
    for (int s = x; s < slots; s += tx) {  // this thread's slots only (s % tx == x)
      dw_acc[s] = 0.0f;
      db_acc[s] = 0.0f;
    }
  }
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t t1 = t0 + p.rows_per_block < p.n_tasks ? t0 + p.rows_per_block : p.n_tasks;
  // The loop bounds are the block's, so every thread reaches the same barriers in lane_sum.
  for (int64_t tb = t0; tb < t1; tb += ty) {
    const int64_t t = tb + y;
    const bool active = t < t1;
    int64_t row = 0;
    if (active) row = p.patch_only ? (t / p.n) * p.N + p.P + t % p.n : t;
    const RowPlace at = locate(p, row);
    const int64_t row_off = row * D;

    // build the (mixed) row; FWD_MIX / BWD_MIX store it and are done
    float total[1] = {0.0f};  // FWD_LN: the row sum
    if (active) {
      for (int k = 0; k < p.items; ++k) {
        const int vi = k * tx + x;
        if (vi >= nvec) break;
        const int d = vi * VEC;
        float v[VEC];
        mixed_vec<STAGE, VEC>(p, at, row, d, v);
        if constexpr (STAGE == FWD_MIX || STAGE == BWD_MIX) {
          store_vec<VEC>(p.out + row_off + d, v);
        } else {
          if constexpr (STAGE == FWD_LN) store_vec<VEC>(p.out_r + row_off + d, v);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            buf[(k * VEC + e) * tx + x] = v[e];
            total[0] += v[e];
          }
        }
      }
    }
    const bool write_final = active && (p.final_patch || !at.patch);

    if constexpr (STAGE == FWD_LN) {
      // two-pass statistics of the fp32 row (the reference's formula)
      lane_sum<1>(total, red);
      const float mu = total[0] / static_cast<float>(D);
      float sq[1] = {0.0f};
      if (active) {
        for (int k = 0; k < p.items; ++k) {
          if (k * tx + x >= nvec) break;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float dv = buf[(k * VEC + e) * tx + x] - mu;
            sq[0] += dv * dv;
          }
        }
      }
      lane_sum<1>(sq, red);
      const float rs = 1.0f / sqrtf(sq[0] / static_cast<float>(D) + p.eps);
      if (active && x == 0) {
        p.mean[row] = mu;
        p.rstd[row] = rs;
      }
      if (write_final) {
        const float shift = -mu * rs;
        for (int k = 0; k < p.items; ++k) {
          const int vi = k * tx + x;
          if (vi >= nvec) break;
          const int d = vi * VEC;
          float v[VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) v[e] = buf[(k * VEC + e) * tx + x];
          normalize_vec<VEC>(v, rs, shift, p.w, p.bias, d);
          store_vec<VEC>(p.out + row_off + d, v);
        }
      }
    } else if constexpr (STAGE == BWD_LN) {
      // buf holds dz (the gradient wrt the LN output before the affine); accumulate dweight / dbias,
      // then buf <- g = dz * w and the row constants c1 = mean(xhat * g), c2 = mean(g)
      const float mu = active ? p.mean[row] : 0.0f;
      const float rs = active ? p.rstd[row] : 0.0f;
      float s[2] = {0.0f, 0.0f};
      if (active) {
        for (int k = 0; k < p.items; ++k) {
          const int vi = k * tx + x;
          if (vi >= nvec) break;
          const int d = vi * VEC;
          float r[VEC], wv[VEC];
          load_vec<VEC>(p.r + row_off + d, r);
          if (p.w) load_vec<VEC>(p.w + d, wv);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const int slot = (k * VEC + e) * tx + x;
            const float xhat = (r[e] - mu) * rs;
            const float dz = buf[slot];
            dw_acc[slot] += dz * xhat;
            db_acc[slot] += dz;
            const float g = p.w ? dz * wv[e] : dz;
            buf[slot] = g;
            s[0] += xhat * g;
            s[1] += g;
          }
        }
      }
      lane_sum<2>(s, red);
      const float inv_d = 1.0f / static_cast<float>(D);
      const float c1 = s[0] * inv_d, c2 = s[1] * inv_d;
      if (active && x == 0 && p.store_c) {
        p.c1[row] = c1;
        p.c2[row] = c2;
      }
      if (write_final) {
        for (int k = 0; k < p.items; ++k) {
          const int vi = k * tx + x;
          if (vi >= nvec) break;
          const int d = vi * VEC;
          float r[VEC], v[VEC];
          load_vec<VEC>(p.r + row_off + d, r);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float xhat = (r[e] - mu) * rs;
            v[e] = (buf[(k * VEC + e) * tx + x] - (xhat * c1 + c2)) * rs;
          }
          if (p.b) {
            float u[VEC];
            load_vec<VEC>(p.b + row_off + d, u);
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[e] += u[e];
          }
          store_vec<VEC>(p.out + row_off + d, v);
        }
      }
    }
  }

  if constexpr (STAGE == BWD_LN) {
    // this block's partial: the lanes' accumulators summed in lane order (vectors spread over lanes)
    __syncthreads();
    const float* dw_all = smem + ty * slots;
    const float* db_all = smem + 2 * ty * slots;
    float* dw_out = p.dw_part + static_cast<int64_t>(blockIdx.x) * D;
    float* db_out = p.db_part + static_cast<int64_t>(blockIdx.x) * D;
    for (int k = y; k < p.items; k += ty) {
      const int vi = k * tx + x;
      if (vi >= nvec) break;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int slot = (k * VEC + e) * tx + x;
        float sw = 0.0f, sb = 0.0f;
        for (int l = 0; l < ty; ++l) {
          sw += dw_all[l * slots + slot];
          sb += db_all[l * slots + slot];
        }
        dw_out[vi * VEC + e] = sw;
        db_out[vi * VEC + e] = sb;
      }
    }
  }
}

// out[g, d] = sum over the K rows of group g of the stage's source (fp32), the `optimal` column sum.
// Block: kSumCols columns x kSumSplit slices of the group's rows; grid: (groups, ceil(D / kSumCols)).
// Each slice sums blocks of kSumBlock rows and adds the block sums Kahan-compensated (as the CPU
// kernel); the slices are then added in order.
template <int STAGE, typename T>
__global__ void __launch_bounds__(kSumCols* kSumSplit) group_sum_kernel(const RowParams<T> p, float* out) {
  __shared__ float part[kSumSplit][kSumCols];
  const int x = threadIdx.x, y = threadIdx.y;
  const int64_t g = blockIdx.x;
  const int d = blockIdx.y * kSumCols + x;
  const int64_t first = p.axis == AXIS_BATCH ? p.P + g : (g / p.step) * p.N + p.P + g % p.step;
  const int64_t chunk = (p.K + kSumSplit - 1) / kSumSplit;
  const int64_t i0 = y * chunk < p.K ? y * chunk : p.K;
  const int64_t i1 = i0 + chunk < p.K ? i0 + chunk : p.K;
  float sum = 0.0f, comp = 0.0f;
  if (d < p.D) {
    for (int64_t b0 = i0; b0 < i1; b0 += kSumBlock) {
      const int64_t b1 = b0 + kSumBlock < i1 ? b0 + kSumBlock : i1;
      float blk = 0.0f;
      for (int64_t i = b0; i < b1; ++i) {
        float v[1];
        source<STAGE, 1>(p, first + i * p.stride, d, v);
        blk += v[0];
      }
      kahan_add(sum, comp, blk);
    }
  }
  part[y][x] = sum;
  __syncthreads();
  if (y == 0 && d < p.D) {
    float total = 0.0f, c = 0.0f;
#pragma unroll
    for (int l = 0; l < kSumSplit; ++l) kahan_add(total, c, part[l][x]);
    out[g * p.D + d] = total;
  }
}

// dweight[d] / dbias[d] = sum over the partial rows, in a fixed order.  Block: kSumCols x kSumSplit.
__global__ void __launch_bounds__(kSumCols* kSumSplit)
    sum_partials_kernel(const float* dw_part, const float* db_part, int64_t n_parts, int D, float* dw, float* db) {
  __shared__ float pw[kSumSplit][kSumCols];
  __shared__ float pb[kSumSplit][kSumCols];
  const int x = threadIdx.x, y = threadIdx.y;
  const int d = blockIdx.x * kSumCols + x;
  float sw = 0.0f, sb = 0.0f;
  if (d < D) {
    for (int64_t q = y; q < n_parts; q += kSumSplit) {
      sw += dw_part[q * D + d];
      sb += db_part[q * D + d];
    }
  }
  pw[y][x] = sw;
  pb[y][x] = sb;
  __syncthreads();
  if (y == 0 && d < D) {
    float tw = 0.0f, tb = 0.0f;
#pragma unroll
    for (int l = 0; l < kSumSplit; ++l) {
      tw += pw[l][x];
      tb += pb[l][x];
    }
    dw[d] = tw;
    db[d] = tb;
  }
}

// ------------------------------------------------------------------------------------------------
// host side

struct Geometry {
  int64_t K, step, stride, groups;
};

Geometry geometry(const MixSpec& s) {
  const int64_t n = s.N - s.P;
  if (s.axis == AXIS_TOKENS) return {n, 1, 1, s.B};
  if (s.axis == AXIS_ROWS) return {n / s.grid_w, s.grid_w, s.grid_w, s.B * s.grid_w};
  return {s.B, 1, s.N, n};
}

// Block shape for rows of D: tx threads per row (a multiple of 32, at most 512), ty rows per block
// (about 256 threads in all), items vectors per thread.
struct RowPlan {
  int tx, ty, items;
};

RowPlan plan_rows(int64_t D, int vec) {
  const int64_t nvec = D / vec;
  const int64_t tx = std::min<int64_t>(512, std::max<int64_t>(32, (nvec + 31) / 32 * 32));
  const int items = static_cast<int>((nvec + tx - 1) / tx);
  const int ty = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(8, 256 / tx)));
  return {static_cast<int>(tx), ty, items};
}

// An attribute of the current device (cheap: no cudaGetDeviceProperties).
int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

bool aligned(const void* ptr, int64_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
RowParams<T> base_params(const MixSpec& s, const Geometry& G, float eps) {
  RowParams<T> p{};
  p.N = s.N;
  p.P = s.P;
  p.n = s.N - s.P;
  p.K = G.K;
  p.step = G.step;
  p.stride = G.stride;
  p.axis = static_cast<int>(s.axis);
  p.D = static_cast<int>(s.D);
  p.kind = static_cast<int>(s.kind);
  p.reverse = s.reverse;
  p.alpha = s.alpha;
  p.inv_k1 = 1.0f / static_cast<float>(G.K + 1);
  p.mix = s.mix.defined() ? s.mix.const_data_ptr<float>() : nullptr;
  p.eps = eps;
  return p;
}

// Runs one row stage over all rows (or the patch rows); BWD_LN also writes its partials and returns
// how many (one per block).
template <int STAGE, int VEC, typename T>
int64_t run_rows(RowParams<T> p, bool patch_only, const MixSpec& s, at::Tensor* dw_part, at::Tensor* db_part) {
  const RowPlan plan = plan_rows(s.D, VEC);
  p.items = plan.items;
  p.patch_only = patch_only;
  p.n_tasks = patch_only ? s.B * (s.N - s.P) : s.B * s.N;
  if (p.n_tasks == 0) return 0;
  const int regions = STAGE == FWD_LN ? 1 : STAGE == BWD_LN ? 3 : 0;
  const int64_t smem = static_cast<int64_t>(regions) * plan.ty * plan.items * VEC * plan.tx * sizeof(float);
  auto kernel = mix_ln_rows_kernel<STAGE, VEC, T>;
  // the opt-in maximum, less room for the kernel's static red[]
  const int64_t smem_limit = static_cast<int64_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)) - 1024;
  TORCH_CHECK(smem <= smem_limit, "mix_add_layernorm (CUDA): rows of D = ", s.D, " need ", smem,
              " bytes of shared memory per block, more than this GPU allows (", smem_limit,
              "); use the triton or reference backend for such D");
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const dim3 block(plan.tx, plan.ty);
  int64_t rows_per_block = plan.ty;
  int64_t blocks = (p.n_tasks + rows_per_block - 1) / rows_per_block;
  if constexpr (STAGE == BWD_LN) {
    // as many blocks as fit on the GPU at once, each with a contiguous range of rows and one partial
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, plan.tx * plan.ty,
                                                                 static_cast<size_t>(smem)));
    const int64_t resident =
        static_cast<int64_t>(std::max(per_sm, 1)) * device_attribute(cudaDevAttrMultiProcessorCount);
    blocks = std::min(blocks, resident);
    rows_per_block = (p.n_tasks + blocks - 1) / blocks;
    blocks = (p.n_tasks + rows_per_block - 1) / rows_per_block;
    const auto opts = dw_part->options();
    *dw_part = at::empty({blocks, s.D}, opts);
    *db_part = at::empty({blocks, s.D}, opts);
    p.dw_part = dw_part->mutable_data_ptr<float>();
    p.db_part = db_part->mutable_data_ptr<float>();
  }
  TORCH_CHECK(blocks <= INT_MAX, "mix_add_layernorm (CUDA): ", p.n_tasks, " rows are too many for one launch");
  p.rows_per_block = rows_per_block;
  kernel<<<static_cast<unsigned>(blocks), block, static_cast<size_t>(smem), at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return blocks;
}

template <int STAGE, typename T>
at::Tensor run_group_sum(const RowParams<T>& p, const MixSpec& s, const Geometry& G, const at::TensorOptions& f32) {
  at::Tensor colsum = at::empty({G.groups, s.D}, f32);
  const int64_t col_blocks = (s.D + kSumCols - 1) / kSumCols;
  TORCH_CHECK(G.groups <= INT_MAX && col_blocks <= 65535, "mix_add_layernorm (CUDA): ", G.groups,
              " groups of D = ", s.D, " are too many for one launch");
  const dim3 grid(static_cast<unsigned>(G.groups), static_cast<unsigned>(col_blocks));
  const dim3 block(kSumCols, kSumSplit);
  group_sum_kernel<STAGE, T><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(p, colsum.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return colsum;
}

template <typename T, int VEC>
void fwd_stages(const at::Tensor& x, const at::Tensor& res, const at::Tensor& w, const at::Tensor& b, float eps,
                const MixSpec& s, bool mix_after_norm, const at::Tensor& normed, const at::Tensor& rout,
                const at::Tensor& mean, const at::Tensor& rstd) {
  const Geometry G = geometry(s);
  RowParams<T> p = base_params<T>(s, G, eps);
  p.a = x.const_data_ptr<T>();
  p.b = ptr_or_null<T>(res);
  p.w = ptr_or_null<float>(w);
  p.bias = ptr_or_null<float>(b);
  p.mean = mean.mutable_data_ptr<float>();
  p.rstd = rstd.mutable_data_ptr<float>();
  p.out_r = rout.mutable_data_ptr<T>();
  p.out = normed.mutable_data_ptr<T>();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor colsum;  // kept alive until the launches that read it are queued
  if (s.kind == KIND_IDENTITY) {
    p.final_patch = true;
    run_rows<FWD_LN, VEC>(p, false, s, nullptr, nullptr);
  } else if (!mix_after_norm) {
    // residual_out = M s, normed = LN(residual_out)
    if (s.kind == KIND_OPTIMAL) {
      colsum = run_group_sum<FWD_LN>(p, s, G, f32);
      p.colsum = colsum.const_data_ptr<float>();
    }
    p.final_patch = true;
    run_rows<FWD_LN, VEC>(p, false, s, nullptr, nullptr);
  } else {
    // residual_out = s and its statistics (normed of the prefix rows), then normed = M LN(s)
    RowParams<T> stats = p;
    stats.kind = static_cast<int>(KIND_IDENTITY);
    stats.final_patch = false;
    run_rows<FWD_LN, VEC>(stats, false, s, nullptr, nullptr);
    if (s.kind == KIND_OPTIMAL) {
      colsum = run_group_sum<FWD_MIX>(p, s, G, f32);
      p.colsum = colsum.const_data_ptr<float>();
    }
    run_rows<FWD_MIX, VEC>(p, true, s, nullptr, nullptr);
  }
}

template <typename T, int VEC>
void bwd_stages(const at::Tensor& dy, const at::Tensor& dres, const at::Tensor& r, const at::Tensor& w,
                const at::Tensor& mean, const at::Tensor& rstd, const MixSpec& s, bool mix_after_norm,
                const at::Tensor& dx, const at::Tensor& dweight, const at::Tensor& dbias) {
  const Geometry G = geometry(s);
  RowParams<T> p = base_params<T>(s, G, 0.0f);
  p.transpose = true;  // backward applies M^T
  p.a = dy.const_data_ptr<T>();
  p.b = ptr_or_null<T>(dres);
  p.r = r.const_data_ptr<T>();
  p.w = ptr_or_null<float>(w);
  // BWD stages only read the statistics
  p.mean = const_cast<float*>(mean.const_data_ptr<float>());
  p.rstd = const_cast<float*>(rstd.const_data_ptr<float>());
  p.out = dx.mutable_data_ptr<T>();
  const auto f32 = dy.options().dtype(at::kFloat);
  at::Tensor dw_part = at::empty({0}, f32), db_part = at::empty({0}, f32);
  at::Tensor colsum, c1, c2;  // kept alive until the launches that read them are queued
  int64_t n_parts = 0;
  if (s.kind == KIND_IDENTITY) {
    p.final_patch = true;
    n_parts = run_rows<BWD_LN, VEC>(p, false, s, &dw_part, &db_part);
  } else if (mix_after_norm) {
    // dz = M^T dy, dx = LN-backward(dz) + d_residual_out
    if (s.kind == KIND_OPTIMAL) {
      colsum = run_group_sum<BWD_LN>(p, s, G, f32);
      p.colsum = colsum.const_data_ptr<float>();
    }
    p.final_patch = true;
    n_parts = run_rows<BWD_LN, VEC>(p, false, s, &dw_part, &db_part);
  } else {
    // g = LN-backward(dy) + d_residual_out (row constants first), dx = M^T g
    c1 = at::empty({s.B * s.N}, f32);
    c2 = at::empty({s.B * s.N}, f32);
    p.c1 = c1.mutable_data_ptr<float>();
    p.c2 = c2.mutable_data_ptr<float>();
    RowParams<T> consts = p;
    consts.kind = static_cast<int>(KIND_IDENTITY);
    consts.store_c = true;
    consts.final_patch = false;
    n_parts = run_rows<BWD_LN, VEC>(consts, false, s, &dw_part, &db_part);
    if (s.kind == KIND_OPTIMAL) {
      colsum = run_group_sum<BWD_MIX>(p, s, G, f32);
      p.colsum = colsum.const_data_ptr<float>();
    }
    run_rows<BWD_MIX, VEC>(p, true, s, nullptr, nullptr);
  }
  const dim3 grid(static_cast<unsigned>((s.D + kSumCols - 1) / kSumCols));
  const dim3 block(kSumCols, kSumSplit);
  sum_partials_kernel<<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
      dw_part.const_data_ptr<float>(), db_part.const_data_ptr<float>(), n_parts, static_cast<int>(s.D),
      dweight.mutable_data_ptr<float>(), dbias.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte vectors when D and every row pointer allow them (fp32 parameters: VEC floats), else scalars.
template <typename T>
bool can_vectorize(int64_t D, std::initializer_list<const void*> rows, std::initializer_list<const void*> params) {
  constexpr int vec = 16 / sizeof(T);
  if (D % vec != 0) return false;
  for (const void* q : rows)
    if (!aligned(q, 16)) return false;
  for (const void* q : params)
    if (!aligned(q, vec * sizeof(float))) return false;
  return true;
}

const void* raw(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}

template <typename T>
void fwd_typed(const at::Tensor& x, const at::Tensor& res, const at::Tensor& w, const at::Tensor& b, float eps,
               const MixSpec& s, bool man, const at::Tensor& normed, const at::Tensor& rout, const at::Tensor& mean,
               const at::Tensor& rstd) {
  if (can_vectorize<T>(s.D, {raw(x), raw(res), raw(normed), raw(rout)}, {raw(w), raw(b)})) {
    fwd_stages<T, 16 / sizeof(T)>(x, res, w, b, eps, s, man, normed, rout, mean, rstd);
  } else {
    fwd_stages<T, 1>(x, res, w, b, eps, s, man, normed, rout, mean, rstd);
  }
}

template <typename T>
void bwd_typed(const at::Tensor& dy, const at::Tensor& dres, const at::Tensor& r, const at::Tensor& w,
               const at::Tensor& mean, const at::Tensor& rstd, const MixSpec& s, bool man, const at::Tensor& dx,
               const at::Tensor& dweight, const at::Tensor& dbias) {
  if (can_vectorize<T>(s.D, {raw(dy), raw(dres), raw(r), raw(dx)}, {raw(w)})) {
    bwd_stages<T, 16 / sizeof(T)>(dy, dres, r, w, mean, rstd, s, man, dx, dweight, dbias);
  } else {
    bwd_stages<T, 1>(dy, dres, r, w, mean, rstd, s, man, dx, dweight, dbias);
  }
}

#define NOISYNN_STR_(...) #__VA_ARGS__
#define NOISYNN_STR(...) NOISYNN_STR_(__VA_ARGS__)

}  // namespace

void launch_fwd(const at::Tensor& x, const at::Tensor& res, const at::Tensor& w, const at::Tensor& b, float eps,
                const MixSpec& spec, bool mix_after_norm, const at::Tensor& normed, const at::Tensor& residual_out,
                const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK(spec.D <= INT_MAX / 2, "mix_add_layernorm (CUDA): D = ", spec.D, " is too large");
  switch (x.scalar_type()) {
    case at::kFloat:
      return fwd_typed<float>(x, res, w, b, eps, spec, mix_after_norm, normed, residual_out, mean, rstd);
    case at::kHalf:
      return fwd_typed<c10::Half>(x, res, w, b, eps, spec, mix_after_norm, normed, residual_out, mean, rstd);
    case at::kBFloat16:
      return fwd_typed<c10::BFloat16>(x, res, w, b, eps, spec, mix_after_norm, normed, residual_out, mean, rstd);
    default:
      TORCH_CHECK(false, "mix_add_layernorm (CUDA): expected float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

void launch_bwd(const at::Tensor& dy, const at::Tensor& dres, const at::Tensor& r, const at::Tensor& w,
                const at::Tensor& mean, const at::Tensor& rstd, const MixSpec& spec, bool mix_after_norm,
                const at::Tensor& dx, const at::Tensor& dweight, const at::Tensor& dbias) {
  TORCH_CHECK(spec.D <= INT_MAX / 2, "mix_add_layernorm (CUDA): D = ", spec.D, " is too large");
  switch (r.scalar_type()) {
    case at::kFloat:
      return bwd_typed<float>(dy, dres, r, w, mean, rstd, spec, mix_after_norm, dx, dweight, dbias);
    case at::kHalf:
      return bwd_typed<c10::Half>(dy, dres, r, w, mean, rstd, spec, mix_after_norm, dx, dweight, dbias);
    case at::kBFloat16:
      return bwd_typed<c10::BFloat16>(dy, dres, r, w, mean, rstd, spec, mix_after_norm, dx, dweight, dbias);
    default:
      TORCH_CHECK(false, "mix_add_layernorm (CUDA): expected float32, bfloat16 or float16, got ", r.scalar_type());
  }
}

std::string compiled_arch_list() {
  // nvcc defines __CUDA_ARCH_LIST__ as the compiled virtual architectures, e.g. 800,900
  const std::string codes = NOISYNN_STR(__CUDA_ARCH_LIST__);
  std::string out, cur;
  auto flush = [&] {
    if (cur.empty()) return;
    const int code = std::stoi(cur);
    if (!out.empty()) out += ";";
    out += std::to_string(code / 100) + "." + std::to_string((code / 10) % 10);
    cur.clear();
  };
  for (char c : codes) {
    if (c >= '0' && c <= '9') {
      cur += c;
    } else {
      flush();
    }
  }
  flush();
  return out;
}

KernelImage kernel_image() {
  // Loading a kernel's attributes loads the module for the current device: it fails with "no kernel
  // image is available" when neither a cubin for this architecture nor PTX to JIT from was compiled.
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, sum_partials_kernel);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later CUDA calls are unaffected
    return {false, 0, 0, cudaGetErrorString(err)};
  }
  return {true, attr.binaryVersion, attr.ptxVersion, ""};
}

std::string compiled_cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

}  // namespace cuda
}  // namespace noisynn
