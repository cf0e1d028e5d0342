// Fused residual + bias + LayerNorm, forward and backward (kernel templates).
//
// Forward reads x (+ residual) once and writes y once: 2-3 * M*N*sizeof(T) bytes, plus 8 bytes of
// statistics per row. Backward reads dy, x (+ residual) and writes dx in the row kernel, then
// re-reads them in the column kernel that sums dweight, dbias and dx_bias in fp32 partials.
//
// Row kernels: ROWS rows per block, WARPS warps per row (ROWS = 4 for one warp per row, else 1).
// Thread t of a row owns the VEC-wide chunks t, t + 32*WARPS, ... of that row; with CACHE the
// fp32 values of its chunks are kept in dynamic shared memory between the passes (only the owning
// thread reads them back, so no barrier is needed), without CACHE they are recomputed from global.
//
// DROPOUT instances (dropout_p > 0): h = dropout(x + x_bias) + residual, the keep mask from
// Philox4x32-10 (philox.cuh) over the flat index row * N + col in groups of 4, recomputed wherever h
// is (forward passes, both backward kernels) and never stored. The backward then writes dh to
// dresidual (when given) and dx = dh * mask / (1 - p); dx_bias sums that dx.
#pragma once

#include "common.cuh"
#include "philox.cuh"

namespace rf {

template <int WARPS>
struct RowLayout {
  static constexpr int kRows = WARPS == 1 ? 4 : 1;  // rows per block
  static constexpr int kRowThreads = 32 * WARPS;
  static constexpr int kThreads = kRows * kRowThreads;
};

// h = x + x_bias + residual for one VEC chunk starting at column `col` of row `row`.
template <typename T, int VEC>
__device__ __forceinline__ void ln_load_h(const T* x, int64_t x_stride, const T* res, int64_t res_stride,
                                          const void* x_bias, bool x_bias_f32, int64_t row, int64_t col,
                                          float (&h)[VEC]) {
  load_f32<T, VEC>(x + row * x_stride + col, h);
  float t[VEC];
  if (res != nullptr) {
    load_f32<T, VEC>(res + row * res_stride + col, t);
#pragma unroll
    for (int i = 0; i < VEC; ++i) h[i] += t[i];
  }
  if (x_bias != nullptr) {
    load_param<T, VEC>(x_bias, x_bias_f32, col, 0.f, t);
#pragma unroll
    for (int i = 0; i < VEC; ++i) h[i] += t[i];
  }
}

// h = dropout(x + x_bias) + residual for the same chunk; `keep` gets its mask (flat index row * N + col).
template <typename T, int VEC>
__device__ __forceinline__ void ln_load_h_dropout(const T* x, int64_t x_stride, const T* res, int64_t res_stride,
                                                  const void* x_bias, bool x_bias_f32, int64_t row, int64_t col,
                                                  float (&h)[VEC], const DropoutRng& drop, int64_t N,
                                                  float drop_scale, bool (&keep)[VEC]) {
  load_f32<T, VEC>(x + row * x_stride + col, h);
  float t[VEC];
  if (x_bias != nullptr) {
    load_param<T, VEC>(x_bias, x_bias_f32, col, 0.f, t);
#pragma unroll
    for (int i = 0; i < VEC; ++i) h[i] += t[i];
  }
  dropout_keep_flat<VEC>(drop, static_cast<uint64_t>(row * N + col), keep);
#pragma unroll
  for (int i = 0; i < VEC; ++i) h[i] = keep[i] ? h[i] * drop_scale : 0.f;
  if (res != nullptr) {
    load_f32<T, VEC>(res + row * res_stride + col, t);
#pragma unroll
    for (int i = 0; i < VEC; ++i) h[i] += t[i];
  }
}

// h of one chunk in a row kernel (x, res, row, N, p, drop, kp in scope): the DROPOUT instances call
// ln_load_h_dropout, the others exactly ln_load_h.
#define RF_LN_LOAD_H(H)                                                                                             \
  do {                                                                                                            \
    if constexpr (DROPOUT) {                                                                                      \
      ln_load_h_dropout<T, VEC>(x, p.x_stride, res, p.res_stride, p.x_bias, p.x_bias_f32, row, c * VEC, H, drop, \
                                N, p.drop_scale, kp);                                                             \
    } else {                                                                                                      \
      ln_load_h<T, VEC>(x, p.x_stride, res, p.res_stride, p.x_bias, p.x_bias_f32, row, c * VEC, H);              \
    }                                                                                                             \
  } while (0)

template <typename T, int VEC, int WARPS, bool CACHE, bool DROPOUT>
__global__ void __launch_bounds__(RowLayout<WARPS>::kThreads)
layer_norm_fwd_kernel(const LayerNormFwdParams p) {
  using L = RowLayout<WARPS>;
  RF_EXTERN_SHARED(float, cache);  // CACHE: (kRows, N) fp32 values of h
  __shared__ float red[L::kRows * WARPS];
  const int r = threadIdx.x / L::kRowThreads, t = threadIdx.x % L::kRowThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * L::kRows + r;
  if (row >= p.M) return;  // only possible with one warp per row: no block barrier below then
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  const int64_t N = p.N, chunks = N / VEC;
  float* my_cache = cache + static_cast<int64_t>(r) * N;
  [[maybe_unused]] DropoutRng drop;
  if constexpr (DROPOUT) drop = load_dropout_rng(p.rng, p.drop_threshold);
  [[maybe_unused]] bool kp[VEC];

  float sum = 0.f;
  for (int64_t c = t; c < chunks; c += L::kRowThreads) {
    float h[VEC];
    RF_LN_LOAD_H(h);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      sum += h[i];
      if (CACHE) my_cache[c * VEC + i] = h[i];
    }
  }
  const float mean = row_reduce<WARPS, false>(sum, red) / static_cast<float>(N);

  float sq = 0.f;
  for (int64_t c = t; c < chunks; c += L::kRowThreads) {
    float h[VEC];
    if (CACHE) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) h[i] = my_cache[c * VEC + i];
    } else {
      RF_LN_LOAD_H(h);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) sq += (h[i] - mean) * (h[i] - mean);
  }
  const float var = row_reduce<WARPS, false>(sq, red) / static_cast<float>(N);
  const float rstd = rsqrtf(var + p.eps);

  T* y = static_cast<T*>(p.y) + row * N;
  for (int64_t c = t; c < chunks; c += L::kRowThreads) {
    float h[VEC], w[VEC], b[VEC], out[VEC];
    if (CACHE) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) h[i] = my_cache[c * VEC + i];
    } else {
      RF_LN_LOAD_H(h);
    }
    load_param<T, VEC>(p.weight, p.weight_f32, c * VEC, 1.f, w);
    load_param<T, VEC>(p.bias, p.bias_f32, c * VEC, 0.f, b);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = (h[i] - mean) * rstd * w[i] + b[i];
    store_f32<T, VEC>(y + c * VEC, out);
  }
  if (t == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight, xhat = (h - mean) * rstd.
// The two row means go to row_ws for the column kernel (dx_bias needs the fp32 dx).
template <typename T, int VEC, int WARPS, bool CACHE, bool DROPOUT>
__global__ void __launch_bounds__(RowLayout<WARPS>::kThreads)
layer_norm_bwd_kernel(const LayerNormBwdParams p) {
  using L = RowLayout<WARPS>;
  RF_EXTERN_SHARED(float, cache);  // CACHE: (kRows, 2, N) fp32 xhat and g
  __shared__ float red[L::kRows * WARPS];
  const int r = threadIdx.x / L::kRowThreads, t = threadIdx.x % L::kRowThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * L::kRows + r;
  if (row >= p.M) return;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  const T* dy = static_cast<const T*>(p.dy);
  const int64_t N = p.N, chunks = N / VEC;
  const float mean = p.mean[row], rstd = p.rstd[row];
  float* cx = cache + static_cast<int64_t>(r) * 2 * N;
  float* cg = cx + N;
  [[maybe_unused]] DropoutRng drop;
  if constexpr (DROPOUT) drop = load_dropout_rng(p.rng, p.drop_threshold);
  [[maybe_unused]] bool kp[VEC];

  float sg = 0.f, sgx = 0.f;
  for (int64_t c = t; c < chunks; c += L::kRowThreads) {
    float h[VEC], g[VEC], w[VEC];
    RF_LN_LOAD_H(h);
    load_f32<T, VEC>(dy + row * p.dy_stride + c * VEC, g);
    load_param<T, VEC>(p.weight, p.weight_f32, c * VEC, 1.f, w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float xh = (h[i] - mean) * rstd;
      g[i] *= w[i];
      sg += g[i];
      sgx += g[i] * xh;
      if (CACHE) {
        cx[c * VEC + i] = xh;
        cg[c * VEC + i] = g[i];
      }
    }
  }
  const float c1 = row_reduce<WARPS, false>(sg, red) / static_cast<float>(N);
  const float c2 = row_reduce<WARPS, false>(sgx, red) / static_cast<float>(N);

  T* dx = static_cast<T*>(p.dx) + row * N;
  for (int64_t c = t; c < chunks; c += L::kRowThreads) {
    float xh[VEC], g[VEC], out[VEC];
    if (CACHE) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        xh[i] = cx[c * VEC + i];
        g[i] = cg[c * VEC + i];
      }
      if constexpr (DROPOUT) dropout_keep_flat<VEC>(drop, static_cast<uint64_t>(row * N + c * VEC), kp);
    } else {
      float w[VEC];
      RF_LN_LOAD_H(xh);
      load_f32<T, VEC>(dy + row * p.dy_stride + c * VEC, g);
      load_param<T, VEC>(p.weight, p.weight_f32, c * VEC, 1.f, w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        xh[i] = (xh[i] - mean) * rstd;
        g[i] *= w[i];
      }
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = rstd * (g[i] - c1 - xh[i] * c2);
    if constexpr (DROPOUT) {  // out is dh: the residual's gradient; dx = dh * mask / (1 - p)
      if (p.dresidual != nullptr) store_f32<T, VEC>(static_cast<T*>(p.dresidual) + row * N + c * VEC, out);
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = kp[i] ? out[i] * p.drop_scale : 0.f;
    }
    store_f32<T, VEC>(dx + c * VEC, out);
  }
  if (t == 0 && p.row_ws != nullptr) {
    p.row_ws[2 * row] = c1;
    p.row_ws[2 * row + 1] = c2;
  }
}

// Partial column sums over the rows blockIdx.y*8 + threadIdx.y + k*parts*8 of
//   dweight: dy * xhat,  dbias: dy,  dx_bias: dx (fp32, recomputed with row_ws)
// into col_ws (3, parts, N). Block (32, 8): one column per threadIdx.x, coalesced along rows.
constexpr int kColThreadsY = 8;

template <typename T, bool DROPOUT>
__global__ void __launch_bounds__(32 * kColThreadsY)
layer_norm_bwd_cols_kernel(const LayerNormBwdParams p) {
  __shared__ float red[3][kColThreadsY][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const bool in = col < p.N;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  const T* dy = static_cast<const T*>(p.dy);
  float w = 1.f, xb = 0.f;
  if (in && p.weight != nullptr)
    w = p.weight_f32 ? static_cast<const float*>(p.weight)[col] : to_float(static_cast<const T*>(p.weight)[col]);
  if (in && p.x_bias != nullptr)
    xb = p.x_bias_f32 ? static_cast<const float*>(p.x_bias)[col] : to_float(static_cast<const T*>(p.x_bias)[col]);
  float adw = 0.f, adb = 0.f, adxb = 0.f;
  [[maybe_unused]] DropoutRng drop{};
  if constexpr (DROPOUT) drop = load_dropout_rng(p.rng, p.drop_threshold);
  if (in) {
    const int64_t step = static_cast<int64_t>(p.parts) * kColThreadsY;
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * kColThreadsY + threadIdx.y; row < p.M; row += step) {
      const float d = to_float(dy[row * p.dy_stride + col]);
      float h = to_float(x[row * p.x_stride + col]) + xb;
      [[maybe_unused]] bool kp[1] = {true};
      if constexpr (DROPOUT) {
        dropout_keep_flat<1>(drop, static_cast<uint64_t>(row * p.N + col), kp);
        h = kp[0] ? h * p.drop_scale : 0.f;
      }
      if (res != nullptr) h += to_float(res[row * p.res_stride + col]);
      const float rstd = p.rstd[row];
      const float xh = (h - p.mean[row]) * rstd;
      adw += d * xh;
      adb += d;
      if constexpr (DROPOUT) {
        if (p.dx_bias != nullptr) {
          const float dh = rstd * (d * w - p.row_ws[2 * row] - xh * p.row_ws[2 * row + 1]);
          adxb += kp[0] ? dh * p.drop_scale : 0.f;
        }
      } else {
        if (p.dx_bias != nullptr) adxb += rstd * (d * w - p.row_ws[2 * row] - xh * p.row_ws[2 * row + 1]);
      }
    }
  }
  red[0][threadIdx.y][threadIdx.x] = adw;
  red[1][threadIdx.y][threadIdx.x] = adb;
  red[2][threadIdx.y][threadIdx.x] = adxb;
  __syncthreads();
  if (threadIdx.y < 3 && in) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kColThreadsY; ++k) s += red[threadIdx.y][k][threadIdx.x];
    p.col_ws[(static_cast<int64_t>(threadIdx.y) * p.parts + blockIdx.y) * p.N + col] = s;
  }
}

template <typename T>
__global__ void __launch_bounds__(256) layer_norm_bwd_finalize_kernel(const LayerNormBwdParams p) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= p.N) return;
  const int64_t slab = static_cast<int64_t>(p.parts) * p.N;
  if (p.dweight != nullptr) finalize_col_sum<T>(p.col_ws, p.parts, p.N, col, p.dweight, p.dweight_f32);
  if (p.dbias != nullptr) finalize_col_sum<T>(p.col_ws + slab, p.parts, p.N, col, p.dbias, p.dbias_f32);
  if (p.dx_bias != nullptr) finalize_col_sum<T>(p.col_ws + 2 * slab, p.parts, p.N, col, p.dx_bias, p.dx_bias_f32);
}

}  // namespace rf
