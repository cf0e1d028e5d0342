// Fused bias + GELU (erf or tanh), forward and backward (kernel templates).
//
// Forward reads x once and writes y once: 2 * M*N*sizeof(T) bytes. Backward reads dy and x and
// writes dx (3 * M*N*sizeof(T)); with a bias it also sums the fp32 dx over rows into (parts, N)
// partials, summed and cast by a small finalize kernel.
//
// Block (32, kGeluThreadsY): threadIdx.x owns VEC consecutive columns (a warp covers 32 * VEC
// columns, 512 bytes with 16-byte vectors), threadIdx.y and blockIdx.y step over the rows.
#pragma once

#include "common.cuh"

namespace rf {

constexpr int kGeluThreadsY = 8;

__device__ __forceinline__ float gelu_f(float h, int approximate) {
  if (approximate) {
    const float u = 0.7978845608028654f * (h + 0.044715f * h * h * h);
    return 0.5f * h * (1.f + tanhf(u));
  }
  return 0.5f * h * (1.f + erff(h * 0.7071067811865476f));
}

// d GELU(h) / dh
__device__ __forceinline__ float gelu_grad_f(float h, int approximate) {
  if (approximate) {
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;
    const float t = tanhf(k0 * (h + k1 * h * h * h));
    return 0.5f * (1.f + t) + 0.5f * h * (1.f - t * t) * k0 * (1.f + 3.f * k1 * h * h);
  }
  return 0.5f * (1.f + erff(h * 0.7071067811865476f)) + h * 0.3989422804014327f * expf(-0.5f * h * h);
}

// The block's 32 * VEC columns, summed over threadIdx.y, one column per thread, to col_ws[blockIdx.y].
template <int VEC>
__device__ __forceinline__ void bias_gelu_block_col_sum(const BiasGeluParams& p,
                                                       const float (&red)[kGeluThreadsY][32 * VEC + 1]) {
  for (int c = threadIdx.y * 32 + threadIdx.x; c < 32 * VEC; c += 32 * kGeluThreadsY) {
    const int64_t gcol = static_cast<int64_t>(blockIdx.x) * 32 * VEC + c;
    if (gcol >= p.N) continue;
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kGeluThreadsY; ++k) s += red[k][c];
    p.col_ws[static_cast<int64_t>(blockIdx.y) * p.N + gcol] = s;
  }
}

template <typename T, int VEC, bool BWD>
__global__ void __launch_bounds__(32 * kGeluThreadsY) bias_gelu_kernel(const BiasGeluParams p) {
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x) * VEC;
  const bool in = col < p.N;  // N % VEC == 0, so a chunk is wholly in or out
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* out = static_cast<T*>(p.out);
  float b[VEC], acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
  if (in) {
    load_param<T, VEC>(p.bias, p.bias_f32, col, 0.f, b);
    const int64_t step = static_cast<int64_t>(gridDim.y) * kGeluThreadsY;
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * kGeluThreadsY + threadIdx.y; row < p.M; row += step) {
      float h[VEC], r[VEC];
      load_f32<T, VEC>(x + row * p.x_stride + col, h);
      if (BWD) {
        float d[VEC];
        load_f32<T, VEC>(dy + row * p.dy_stride + col, d);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          r[i] = d[i] * gelu_grad_f(h[i] + b[i], p.approximate);
          acc[i] += r[i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) r[i] = gelu_f(h[i] + b[i], p.approximate);
      }
      store_f32<T, VEC>(out + row * p.N + col, r);
    }
  }
  if constexpr (BWD) {
    if (p.col_ws == nullptr) return;  // uniform across the block
    __shared__ float red[kGeluThreadsY][32 * VEC + 1];
#pragma unroll
    for (int i = 0; i < VEC; ++i) red[threadIdx.y][threadIdx.x * VEC + i] = acc[i];
    __syncthreads();
    bias_gelu_block_col_sum<VEC>(p, red);
  }
}

template <typename T>
__global__ void __launch_bounds__(256) bias_gelu_finalize_kernel(const BiasGeluParams p) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col < p.N) finalize_col_sum<T>(p.col_ws, p.parts, p.N, col, p.dbias, p.bias_f32);
}

}  // namespace rf
