// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011;
// the Random123 library's philox4x32 with 10 rounds) and the dropout masks built on it.
//
// A counter-based generator: the output is a pure function of a 128-bit counter and a 64-bit key, so
// any thread can draw the bits of any element in any order, and the backward regenerates the forward's
// mask instead of storing it. Plain integer arithmetic (a 32 x 32 -> 64-bit multiply gives the high
// and low halves at once: one IMAD.WIDE.U32 on sm_80 / sm_90), so the emulated host build
// (roberta_fast._C_emu) runs the same code. tests/test_cuda_emulation.py checks it against the
// Random123 known-answer vectors (kat_vectors, "philox4x32 10").
//
// Dropout keying (docs/kernel_contracts.md): rng is an int64 tensor (seed, offset) read on the device.
// key = (seed low 32 bits, seed high 32 bits); counter = (pos low, pos high, offset low, offset high),
// where pos numbers groups of 4 elements (one Philox call = 4 words, word i decides element i of the
// group). An element is kept iff its word >= threshold = round(p * 2^32): probability 1 - p to 2^-33.
// The grouping is each kernel's own (layer_norm: 4 consecutive elements of the flattened (M, N) input;
// attention: the 2 x 2 element group {q, q + 8} x {k, k + 8}, see attention.cuh).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace rf {

struct Philox4 {
  uint32_t x, y, z, w;
};

__host__ __device__ __forceinline__ void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(prod >> 32);
  lo = static_cast<uint32_t>(prod);
}

// Random123's philox4x32_R(10, ctr, key): round, then bump the key (Weyl sequence), 10 rounds.
__host__ __device__ __forceinline__ Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key increments (golden ratio, sqrt(3) - 1)
#ifdef __CUDA_ARCH__  // (the host compiler of a __host__ __device__ function warns on the pragma)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, c.x, hi0, lo0);
    philox_mulhilo(kM1, c.z, hi1, lo1);
    c = Philox4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

// The key, the offset and the keep threshold of one dropout launch.
struct DropoutRng {
  uint32_t k0, k1;    // seed
  uint32_t o0, o1;    // offset
  uint32_t threshold; // keep iff word >= threshold
};

// Reads (seed, offset) from the rng tensor on the device (never on the host: CUDA graph safe).
__device__ __forceinline__ DropoutRng load_dropout_rng(const int64_t* rng, uint32_t threshold) {
  const uint64_t seed = static_cast<uint64_t>(rng[0]), offset = static_cast<uint64_t>(rng[1]);
  return DropoutRng{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(offset),
                    static_cast<uint32_t>(offset >> 32), threshold};
}

// The 4 words of element group `pos`.
__device__ __forceinline__ Philox4 dropout_bits(const DropoutRng& r, uint64_t pos) {
  return philox4x32_10(Philox4{static_cast<uint32_t>(pos), static_cast<uint32_t>(pos >> 32), r.o0, r.o1}, r.k0, r.k1);
}

// Keep decisions of the VEC consecutive elements from flat index lin0 (groups of 4 flat indices). For
// VEC a multiple of 4 the caller guarantees lin0 % 4 == 0 (one Philox call per 4 elements); otherwise
// one call per element, taking its word: the same decisions either way.
template <int VEC>
__device__ __forceinline__ void dropout_keep_flat(const DropoutRng& r, uint64_t lin0, bool (&keep)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC / 4; ++j) {
      const Philox4 b = dropout_bits(r, lin0 / 4 + j);
      keep[4 * j] = b.x >= r.threshold;
      keep[4 * j + 1] = b.y >= r.threshold;
      keep[4 * j + 2] = b.z >= r.threshold;
      keep[4 * j + 3] = b.w >= r.threshold;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const uint64_t lin = lin0 + i;
      const Philox4 b = dropout_bits(r, lin >> 2);
      const uint32_t sel = static_cast<uint32_t>(lin) & 3u;  // (a selection ptxas keeps in registers)
      const uint32_t lo = (sel & 1u) ? b.y : b.x, hi = (sel & 1u) ? b.w : b.z;
      keep[i] = ((sel & 2u) ? hi : lo) >= r.threshold;
    }
  }
}

// Host side: the keep threshold round(p * 2^32) and the kept values' scale 1 / (1 - p), after checking
// p (in [0, 1), `what` names the launcher in the error) and that an rng tensor came with p > 0.
inline void dropout_setup(const char* what, float p, const int64_t* rng, uint32_t& threshold, float& scale) {
  if (!(p >= 0.f && p < 1.f))
    throw std::invalid_argument(std::string(what) + ": dropout_p must be in [0, 1), got " + std::to_string(p));
  if (p > 0.f && rng == nullptr)
    throw std::invalid_argument(std::string(what) + ": dropout_p > 0 needs rng (an int64 (seed, offset) tensor)");
  const double t = static_cast<double>(p) * 4294967296.0 + 0.5;
  threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
  scale = p > 0.f ? static_cast<float>(1.0 / (1.0 - static_cast<double>(p))) : 1.f;
}

}  // namespace rf
