// Host stand-ins for cuda_fp16.h / cuda_bf16.h in the emulated build (RF_EMULATE): the 16-bit
// storage types and the conversions the kernels use, written from IEEE 754 and the CUDA Math API:
//   fp32 -> fp16 / bf16 ("_rn", and the plain forms, which CUDA also rounds to nearest): round to
//   nearest, ties to even, with fp16 subnormals and overflow to +-inf; any NaN -> the canonical NaN
//   0x7fff (PTX cvt.rn.{f16,bf16}.f32 returns the canonical NaN; the sign is not kept).
//   fp16 / bf16 -> fp32: exact.
// Pure integer arithmetic, so the result does not depend on the host's rounding mode or flags.
// tests/test_cuda_emulation.py checks every fp16 / bf16 value, every midpoint between two of them
// (the ties) and its two neighbours, and random floats against torch's conversions.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace rf_emu {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// fp32 bits -> fp16 bits, round to nearest even.
inline uint16_t f32_to_f16_bits(uint32_t x) {
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return 0x7fffu;               // NaN: canonical
  if (x >= 0x477ff000u) return 0x7c00u | sign;       // >= 65520 (the tie above 65504): inf
  if (x >= 0x38800000u) {                            // normal fp16 (>= 2^-14): rebias, round 13 bits
    const uint32_t r = x - (112u << 23);
    return static_cast<uint16_t>(sign | ((r + 0x0fffu + ((r >> 13) & 1u)) >> 13));
  }
  // fp16 subnormal or zero: m = round(f * 2^24), 0 <= m <= 1024 (1024 is the smallest normal)
  const uint32_t e = x >> 23;
  if (e < 102) return sign;  // f < 2^-25 (at most half of the smallest subnormal, never a tie up)
  const uint32_t mant = (x & 0x7fffffu) | 0x800000u;  // f = mant * 2^(e - 150)
  const uint32_t s = 126 - e;                         // f * 2^24 = mant >> s, 14 <= s <= 24
  uint32_t m = mant >> s;
  const uint32_t rem = mant & ((1u << s) - 1u), halfway = 1u << (s - 1);
  if (rem > halfway || (rem == halfway && (m & 1u))) ++m;
  return static_cast<uint16_t>(sign | m);
}

inline uint32_t f16_bits_to_f32_bits(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return sign | 0x7f800000u | (m << 13);  // inf, NaN (payload kept)
  if (e != 0) return sign | ((e + 112) << 23) | (m << 13);
  if (m == 0) return sign;
  // subnormal: m * 2^-24, normalized (exact)
  uint32_t ee = 113;  // exponent of 2^-14, the bias-adjusted exponent if m had its top bit at 2^10
  uint32_t mm = m;
  while ((mm & 0x400u) == 0) {
    mm <<= 1;
    --ee;
  }
  return sign | (ee << 23) | ((mm & 0x3ffu) << 13);
}

// fp32 bits -> bf16 bits, round to nearest even (the carry into the exponent gives inf on overflow).
inline uint16_t f32_to_bf16_bits(uint32_t x) {
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN: canonical
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline uint32_t bf16_bits_to_f32_bits(uint16_t b) { return static_cast<uint32_t>(b) << 16; }

}  // namespace rf_emu

inline float __half2float(__half h) { return rf_emu::bits_f32(rf_emu::f16_bits_to_f32_bits(h.__x)); }
inline __half __float2half_rn(float f) { return __half{rf_emu::f32_to_f16_bits(rf_emu::f32_bits(f))}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __half2 __float2half2_rn(float f) { return __floats2half2_rn(f, f); }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }

inline float __bfloat162float(__nv_bfloat16 b) { return rf_emu::bits_f32(rf_emu::bf16_bits_to_f32_bits(b.__x)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{rf_emu::f32_to_bf16_bits(rf_emu::f32_bits(f))};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float f) { return __floats2bfloat162_rn(f, f); }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
