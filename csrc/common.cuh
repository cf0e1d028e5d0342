// Shared device helpers of roberta_fast._C: dtype codes and the one dtype dispatch, fp32
// conversions, 16-byte vector loads/stores, warp/block reductions and the launch check.
#pragma once

#ifdef RF_EMULATE
// the emulated build (roberta_fast._C_emu): host stand-ins for the CUDA headers and built-ins
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Every launch goes through RF_LAUNCH(grid, block, smem, stream, kernel)(args), which is
// kernel<<<grid, block, smem, stream>>>(args) here and a call into the emulation runtime in the
// emulated build; dynamic shared memory is declared with RF_EXTERN_SHARED(T, name), which is
// extern __shared__ T name[] here (16-byte aligned).
#define RF_LAUNCH(GRID, BLOCK, SMEM, STREAM, ...) __VA_ARGS__<<<GRID, BLOCK, SMEM, STREAM>>>
#define RF_EXTERN_SHARED(T, NAME) extern __shared__ __align__(16) T NAME[]
#endif

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "ops.h"

#ifdef RF_EMULATE
#define RF_MODULE_NAME "_C_emu"
#else
#define RF_MODULE_NAME "_C"
#endif

namespace rf {

// ----------------------------------------------------------------------------- dtype dispatch
// One switch over the float dtypes (apex's type_shim.h idea): binds `scalar_t` and runs the body.
#define RF_DISPATCH_FLOAT(DT, NAME, ...)                                                     \
  [&] {                                                                                     \
    switch (DT) {                                                                           \
      case ::rf::kF16: { using scalar_t = __half; return __VA_ARGS__(); }                   \
      case ::rf::kBF16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }           \
      case ::rf::kF32: { using scalar_t = float; return __VA_ARGS__(); }                    \
      default: throw std::invalid_argument(std::string(NAME) + ": unsupported dtype code " + \
                                           std::to_string(DT));                             \
    }                                                                                       \
  }()

// The same over the 16-bit types only (tensor-core kernels).
#define RF_DISPATCH_HALF(DT, NAME, ...)                                                      \
  [&] {                                                                                     \
    switch (DT) {                                                                           \
      case ::rf::kF16: { using scalar_t = __half; return __VA_ARGS__(); }                   \
      case ::rf::kBF16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }           \
      default: throw std::invalid_argument(std::string(NAME) + ": unsupported dtype code " + \
                                           std::to_string(DT) + " (fp16 or bf16 only)");     \
    }                                                                                       \
  }()

// Turns the last launch's error (or an earlier asynchronous one) into an exception naming the
// kernel; pybind11 raises it in Python as RuntimeError.
inline void check_launch(const char* kernel) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("roberta_fast.") + RF_MODULE_NAME + ": kernel " + kernel + " failed to launch: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
// A VEC-wide access to elements of `elem` bytes needs VEC * elem-byte alignment of the pointer and
// a row stride that is a multiple of VEC (null pointers pass: absent operands).
inline bool vec_ok(const void* ptr, int64_t stride, int vec, size_t elem) {
  if (ptr == nullptr) return true;
  return reinterpret_cast<uintptr_t>(ptr) % (vec * elem) == 0 && stride % vec == 0;
}

inline unsigned int ceil_div(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

// ----------------------------------------------------------------------------- conversions
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(uint8_t v) { return static_cast<float>(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ----------------------------------------------------------------------------- vector access
// VEC consecutive elements as one aligned access (16 bytes when VEC * sizeof(T) == 16). The host
// only picks VEC > 1 after checking the pointer and every row stride for that alignment.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pk.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// A parameter vector (weight, bias) is either x's dtype T or float32, known at run time (the branch
// is uniform across the grid). Returns `dflt` everywhere when p is null.
template <typename T, int VEC>
__device__ __forceinline__ void load_param(const void* p, bool is_f32, int64_t col, float dflt,
                                           float (&out)[VEC]) {
  if (p == nullptr) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = dflt;
  } else if (is_f32) {
    load_f32<float, VEC>(static_cast<const float*>(p) + col, out);
  } else {
    load_f32<T, VEC>(static_cast<const T*>(p) + col, out);
  }
}

// ----------------------------------------------------------------------------- reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// max that propagates NaN (fmaxf would drop it): a NaN anywhere in a row makes the row's max NaN.
__device__ __forceinline__ float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum / max over the WARPS warps that share one row (warps [row_warp0, row_warp0 + WARPS) of the
// block). `red` is shared scratch of at least blockDim.x / 32 floats. Every thread of those warps
// gets the result. Contains __syncthreads(): call it from every thread of the block.
template <int WARPS, bool IS_MAX>
__device__ __forceinline__ float row_reduce(float v, float* red) {
  v = IS_MAX ? warp_max(v) : warp_sum(v);
  if (WARPS == 1) return v;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int first = warp - warp % WARPS;
  __syncthreads();  // red may still be read by a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[first];
#pragma unroll
  for (int w = 1; w < WARPS; ++w) r = IS_MAX ? max_nan(r, red[first + w]) : r + red[first + w];
  return r;
}

// ----------------------------------------------------------------------------- column sums
// Sums the `parts` partials of one (parts, N) slab per column and casts to the output's dtype.
template <typename T>
__device__ __forceinline__ void finalize_col_sum(const float* ws, int parts, int64_t N, int64_t col, void* out,
                                                 bool out_f32) {
  float s = 0.f;
  for (int k = 0; k < parts; ++k) s += ws[static_cast<int64_t>(k) * N + col];
  if (out_f32) {
    static_cast<float*>(out)[col] = s;
  } else {
    static_cast<T*>(out)[col] = from_float<T>(s);
  }
}

}  // namespace rf
