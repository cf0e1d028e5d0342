// Host versions of csrc/primitives.cuh for the emulated build: the same functions and signatures,
// carried out by the emulation runtime with PTX semantics (runtime.cpp):
//   cp_async_16        records the copy; it lands (src-size bytes copied, the rest of the 16 zeroed)
//                      only when the issuing thread waits (or exits), never earlier
//   cp_async_wait_all  lands every copy this thread issued
//   ldmatrix_x4[_trans] a warp collective over all 32 lanes' row addresses (16-byte aligned, inside
//                      the block's shared memory)
//   mma_16816          a warp collective over all 32 lanes' fragments (PTX m16n8k16 layouts)
#pragma once

#include <cstdint>

#include "cuda_emu.h"

namespace rf {

inline void cp_async_16(void* dst, const void* src, bool ok) { ::rf_emu::cp_async(dst, src, 16, ok ? 16 : 0); }
inline void cp_async_commit() { ::rf_emu::cp_async_commit(); }
inline void cp_async_wait_all() { ::rf_emu::cp_async_wait_all(); }

inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ::rf_emu::ldmatrix(r, p, 4, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ::rf_emu::ldmatrix(r, p, 4, true); }

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
inline void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ::rf_emu::mma_m16n8k16(::rf_emu::kMmaF16, d, a, b0, b1);
}

template <>
inline void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ::rf_emu::mma_m16n8k16(::rf_emu::kMmaBF16, d, a, b0, b1);
}

}  // namespace rf
