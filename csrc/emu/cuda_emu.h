// Host stand-ins for cuda_runtime.h and the device built-ins, for the emulated build of csrc/
// (RF_EMULATE: the same sources compiled by the host compiler into roberta_fast._C_emu).
//
// A launch runs every block of the grid, one after the other, and every CUDA thread of a block as a
// fiber on its own stack (csrc/emu/runtime.cpp). A fiber runs until it reaches a point where a GPU
// thread may have to wait for others: a block barrier (__syncthreads), a warp collective (shuffles,
// __syncwarp, votes, ldmatrix, mma.sync) or its exit; the block's schedule (one of SCHEDULES, see
// set_schedule) then picks which fiber runs next. Warp collectives complete when every lane named
// in the member mask has arrived and see all their inputs at once; __syncthreads completes when
// every thread of the block that has not exited is waiting at a barrier.
//
// Shared memory is per block and filled with 0xff bytes (NaN in fp32, fp16 and bf16) before each
// block runs, so reading anything the block did not write shows up in its output. Static __shared__
// variables are the kernel's static locals (found through the module's symbol table, see
// runtime.cpp); dynamic shared memory (RF_EXTERN_SHARED) is a fresh arena of exactly the launch's size.
//
// This header is included by csrc/common.cuh instead of the CUDA headers; the kernels themselves are
// compiled unchanged.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "half.h"

// ----------------------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// A kernel's static __shared__ variable is a static local of the kernel function: one instance, which
// the runtime poisons before every block and hands to one block at a time.
#define __shared__ static

// ----------------------------------------------------------------------------- vector types
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};

// ----------------------------------------------------------------------------- runtime API subset
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchTimeout = 702,
  cudaErrorIllegalInstruction = 715,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace rf_emu {

// ----------------------------------------------------------------------------- the emulated device
// The smaller of the two targets (sm_80: A100): what fits there fits on sm_90 too.
constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultSharedPerBlock = 48 * 1024;  // without cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr size_t kMaxSharedPerBlockOptin = 166912;    // 163 KB, sm_80's cudaDevAttrMaxSharedMemoryPerBlockOptin

struct BlockState {
  uint3 idx;
  dim3 dim;
  dim3 grid;
};
// threadIdx of the fiber running now (set by the scheduler at every switch) and the running block.
// Only calls into the runtime switch fibers, and the compiler reloads globals after such a call.
extern uint3 g_thread_idx;
extern BlockState g_block;

// ----------------------------------------------------------------------------- barriers, collectives
void syncthreads();
void syncwarp(unsigned mask);
enum class ShflMode : int { kIdx = 0, kUp = 1, kDown = 2, kBfly = 3 };
// shfl.sync.{mode}.b32 with PTX's b and c operands (c = clamp | segmask << 8); returns the source
// lane's value (64-bit payloads use two calls, as CUDA does).
uint32_t shfl(ShflMode mode, unsigned mask, uint32_t value, int b, int c);
unsigned vote(int kind, unsigned mask, bool pred);  // 0 ballot, 1 any, 2 all

template <typename T>
inline T shfl_t(ShflMode mode, unsigned mask, T v, int b, int c) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 32- or 64-bit values");
  if constexpr (sizeof(T) == 4) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    u = shfl(mode, mask, u, b, c);
    std::memcpy(&v, &u, 4);
  } else {
    uint32_t u[2];
    std::memcpy(u, &v, 8);
    u[0] = shfl(mode, mask, u[0], b, c);
    u[1] = shfl(mode, mask, u[1], b, c);
    std::memcpy(&v, u, 8);
  }
  return v;
}

// ----------------------------------------------------------------------------- primitives (emu/primitives.h)
enum MmaType : int { kMmaF16 = 0, kMmaBF16 = 1 };
void cp_async(void* dst, const void* src, int cp_size, int src_size);
void cp_async_commit();
void cp_async_wait_all();
void ldmatrix(uint32_t* r, const void* p, int num, bool trans);
void mma_m16n8k16(MmaType type, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

// ----------------------------------------------------------------------------- shared memory
void* dynamic_smem();  // this block's dynamic shared memory (the launch's size, 128-byte aligned)

// ----------------------------------------------------------------------------- launches
using Thunk = void (*)(void*);
// Validates the configuration like the driver, then runs the grid; the outcome is the next
// cudaGetLastError(). `kernel` identifies the function (attributes, static shared variables).
void launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem, Thunk thunk, void* ctx);
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);

template <typename... P>
struct Launcher {
  const char* name;
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... args) const {
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    // every CUDA thread calls the kernel with its own copy of the parameters
    Thunk thunk = [](void* c) {
      auto* x = static_cast<Ctx*>(c);
      std::apply(x->kernel, x->params);
    };
    launch(name, reinterpret_cast<const void*>(kernel), grid, block, smem, thunk, &ctx);
  }
};

template <typename... P>
inline Launcher<P...> make_launcher(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                                    cudaStream_t) {
  return Launcher<P...>{name, kernel, grid, block, smem};
}

cudaError_t get_last_error(bool reset);
const char* error_name(cudaError_t e);
const char* error_string(cudaError_t e);

}  // namespace rf_emu

// ----------------------------------------------------------------------------- built-in variables
#define threadIdx (static_cast<const uint3&>(::rf_emu::g_thread_idx))
#define blockIdx (static_cast<const uint3&>(::rf_emu::g_block.idx))
#define blockDim (static_cast<const dim3&>(::rf_emu::g_block.dim))
#define gridDim (static_cast<const dim3&>(::rf_emu::g_block.grid))
constexpr int warpSize = 32;

// kernel<<<grid, block, smem, stream>>>(args) of the device build (common.cuh)
#define RF_LAUNCH(GRID, BLOCK, SMEM, STREAM, ...) \
  ::rf_emu::make_launcher(#__VA_ARGS__, &__VA_ARGS__, GRID, BLOCK, SMEM, STREAM)
// extern __shared__ T NAME[] of the device build: the launch's dynamic shared memory
#define RF_EXTERN_SHARED(T, NAME) T* const NAME = static_cast<T*>(::rf_emu::dynamic_smem())

// ----------------------------------------------------------------------------- device functions
inline void __syncthreads() { ::rf_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::rf_emu::syncwarp(mask); }

// CUDA's shuffle intrinsics in terms of PTX shfl.sync (c = ((32 - width) << 8) | clamp).
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::rf_emu::shfl_t(::rf_emu::ShflMode::kIdx, mask, v, src, ((32 - width) << 8) | 0x1f);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::rf_emu::shfl_t(::rf_emu::ShflMode::kUp, mask, v, static_cast<int>(delta), (32 - width) << 8);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::rf_emu::shfl_t(::rf_emu::ShflMode::kDown, mask, v, static_cast<int>(delta), ((32 - width) << 8) | 0x1f);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::rf_emu::shfl_t(::rf_emu::ShflMode::kBfly, mask, v, lane_mask, ((32 - width) << 8) | 0x1f);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::rf_emu::vote(0, mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return static_cast<int>(::rf_emu::vote(1, mask, pred != 0)); }
inline int __all_sync(unsigned mask, int pred) { return static_cast<int>(::rf_emu::vote(2, mask, pred != 0)); }

// Atomics: blocks and threads never run at the same time, so a read-modify-write is atomic as is.
template <typename T>
inline T atomicAdd(T* p, T v) {
  static_assert(std::is_arithmetic_v<T>, "atomicAdd on arithmetic types");
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) {
  const T old = *p;
  if (old == cmp) *p = v;
  return old;
}
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// math: the host's libm (ulps differ from CUDA's device library; docs/cuda_emulation.md)
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }

// ----------------------------------------------------------------------------- runtime API
inline cudaError_t cudaGetLastError() { return ::rf_emu::get_last_error(true); }
inline cudaError_t cudaPeekAtLastError() { return ::rf_emu::get_last_error(false); }
inline const char* cudaGetErrorName(cudaError_t e) { return ::rf_emu::error_name(e); }
inline const char* cudaGetErrorString(cudaError_t e) { return ::rf_emu::error_string(e); }
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize)
    return ::rf_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;  // carveout: a hint
}
