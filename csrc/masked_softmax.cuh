// Masked softmax over the last dim of (B, H, Q, K) scores, forward and backward (kernel templates).
//
// Forward reads the scores (and the mask, often broadcast: stride 0) once and writes the
// probabilities once: 2 * B*H*Q*K*sizeof(T) bytes plus the mask. Backward reads dprobs and probs
// and writes dscores: 3 * B*H*Q*K*sizeof(T) bytes.
//
// One row per WARPS warps (WARPS == 1: 4 rows per block), thread t of a row owns the VEC chunks
// t, t + 32*WARPS, ...; with CACHE the fp32 values between passes stay in dynamic shared memory
// (read back by the same thread only), without CACHE they are recomputed from global memory.
// A row whose every element is masked (max = -inf) is written as zeros; a NaN anywhere in a kept
// element makes its row's max NaN, so the row comes out NaN.
#pragma once

#include "common.cuh"
#include "layer_norm.cuh"  // RowLayout

namespace rf {

// One mask element as an fp32 additive term: bool False -> -inf, True -> 0; float masks as is.
__device__ __forceinline__ float mask_term(const void* m, int dtype, int64_t i) {
  switch (dtype) {
    case kBool: return static_cast<const uint8_t*>(m)[i] ? 0.f : -INFINITY;
    case kF16: return to_float(static_cast<const __half*>(m)[i]);
    case kBF16: return to_float(static_cast<const __nv_bfloat16*>(m)[i]);
    case kF32: return static_cast<const float*>(m)[i];
    default: return to_float(static_cast<const double*>(m)[i]);
  }
}

// s = scale * scores (+ mask) for one VEC chunk; a bool-masked element is -inf whatever its score.
template <typename T, int VEC>
__device__ __forceinline__ void sm_load_s(const T* srow, const void* mrow, int64_t mk, int mdtype, float scale,
                                          int64_t col, float (&s)[VEC]) {
  load_f32<T, VEC>(srow + col, s);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    s[i] *= scale;
    if (mrow != nullptr) {
      const float m = mask_term(mrow, mdtype, (col + i) * mk);
      s[i] = (mdtype == kBool && m != 0.f) ? -INFINITY : s[i] + m;
    }
  }
}

template <typename T, int VEC, int WARPS, bool CACHE>
__global__ void __launch_bounds__(RowLayout<WARPS>::kThreads)
masked_softmax_fwd_kernel(const SoftmaxFwdParams p) {
  using L = RowLayout<WARPS>;
  RF_EXTERN_SHARED(float, cache);  // CACHE: (kRows, K) fp32 scaled, masked scores, then exp
  __shared__ float red[L::kRows * WARPS];
  const int r = threadIdx.x / L::kRowThreads, t = threadIdx.x % L::kRowThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * L::kRows + r;
  if (row >= p.B * p.H * p.Q) return;  // only with one warp per row: no block barrier then
  const int64_t q = row % p.Q, bh = row / p.Q, h = bh % p.H, b = bh / p.H;
  const T* srow = static_cast<const T*>(p.scores) + b * p.s_strides[0] + h * p.s_strides[1] + q * p.s_strides[2];
  const void* mrow = nullptr;
  if (p.mask != nullptr) {
    const int64_t off = b * p.m_strides[0] + h * p.m_strides[1] + q * p.m_strides[2];
    const size_t esz = p.mask_dtype == kBool ? 1 : (p.mask_dtype == kF32 ? 4 : (p.mask_dtype == kF64 ? 8 : 2));
    mrow = static_cast<const char*>(p.mask) + off * static_cast<int64_t>(esz);
  }
  const int64_t K = p.K, chunks = K / VEC, mk = p.m_strides[3];
  float* my = cache + static_cast<int64_t>(r) * K;

  float mx = -INFINITY;
  for (int64_t c = t; c < chunks; c += L::kRowThreads) {
    float s[VEC];
    sm_load_s<T, VEC>(srow, mrow, mk, p.mask_dtype, p.scale, c * VEC, s);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      mx = max_nan(mx, s[i]);
      if (CACHE) my[c * VEC + i] = s[i];
    }
  }
  mx = row_reduce<WARPS, true>(mx, red);
  const bool dead = mx == -INFINITY;  // every element masked
  const float m0 = dead ? 0.f : mx;

  float sum = 0.f;
  for (int64_t c = t; c < chunks; c += L::kRowThreads) {
    float s[VEC];
    if (CACHE) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) s[i] = my[c * VEC + i];
    } else {
      sm_load_s<T, VEC>(srow, mrow, mk, p.mask_dtype, p.scale, c * VEC, s);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float e = expf(s[i] - m0);
      sum += e;
      if (CACHE) my[c * VEC + i] = e;
    }
  }
  sum = row_reduce<WARPS, false>(sum, red);
  const float inv = dead ? 0.f : 1.f / sum;

  T* prow = static_cast<T*>(p.probs) + row * K;
  for (int64_t c = t; c < chunks; c += L::kRowThreads) {
    float e[VEC];
    if (CACHE) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) e[i] = my[c * VEC + i];
    } else {
      sm_load_s<T, VEC>(srow, mrow, mk, p.mask_dtype, p.scale, c * VEC, e);
#pragma unroll
      for (int i = 0; i < VEC; ++i) e[i] = expf(e[i] - m0);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = dead ? 0.f : e[i] * inv;
    store_f32<T, VEC>(prow + c * VEC, e);
  }
}

// dscores = scale * probs * (dprobs - sum(dprobs * probs))
template <typename T, int VEC, int WARPS, bool CACHE>
__global__ void __launch_bounds__(RowLayout<WARPS>::kThreads)
masked_softmax_bwd_kernel(const SoftmaxBwdParams p) {
  using L = RowLayout<WARPS>;
  RF_EXTERN_SHARED(float, cache);  // CACHE: (kRows, 2, K) fp32 probs and dprobs
  __shared__ float red[L::kRows * WARPS];
  const int r = threadIdx.x / L::kRowThreads, t = threadIdx.x % L::kRowThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * L::kRows + r;
  if (row >= p.B * p.H * p.Q) return;
  const int64_t q = row % p.Q, bh = row / p.Q, h = bh % p.H, b = bh / p.H;
  const T* dprow = static_cast<const T*>(p.dprobs) + b * p.dp_strides[0] + h * p.dp_strides[1] + q * p.dp_strides[2];
  const T* prow = static_cast<const T*>(p.probs) + b * p.p_strides[0] + h * p.p_strides[1] + q * p.p_strides[2];
  const int64_t K = p.K, chunks = K / VEC;
  float* cp = cache + static_cast<int64_t>(r) * 2 * K;
  float* cd = cp + K;

  float dot = 0.f;
  for (int64_t c = t; c < chunks; c += L::kRowThreads) {
    float pv[VEC], dv[VEC];
    load_f32<T, VEC>(prow + c * VEC, pv);
    load_f32<T, VEC>(dprow + c * VEC, dv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      dot += pv[i] * dv[i];
      if (CACHE) {
        cp[c * VEC + i] = pv[i];
        cd[c * VEC + i] = dv[i];
      }
    }
  }
  dot = row_reduce<WARPS, false>(dot, red);

  T* out = static_cast<T*>(p.dscores) + row * K;
  for (int64_t c = t; c < chunks; c += L::kRowThreads) {
    float pv[VEC], dv[VEC], g[VEC];
    if (CACHE) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        pv[i] = cp[c * VEC + i];
        dv[i] = cd[c * VEC + i];
      }
    } else {
      load_f32<T, VEC>(prow + c * VEC, pv);
      load_f32<T, VEC>(dprow + c * VEC, dv);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) g[i] = p.scale * pv[i] * (dv[i] - dot);
    store_f32<T, VEC>(out + c * VEC, g);
  }
}

}  // namespace rf
