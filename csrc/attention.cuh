// Attention forward on tensor cores (mma.sync m16n8k16, sm_80+), FlashAttention-2 style: one CTA
// per (64-query block, head, sequence), four warps of 16 query rows each; K and V stream through
// shared memory in tiles of kBlockN keys; softmax is online, in fp32, in the log2 domain; the
// S x S score matrix is never materialized. Reads q, k, v once per query block and writes o and
// lse once: 4 * B*S*H*D*sizeof(T) bytes at best, 4 * B*S*S*H*D FLOPs.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"): lane = 4 * g + c (g = lane / 4,
// c = lane % 4); the fp32 accumulator of a 16 x 8 tile holds rows g and g + 8, columns 2c and
// 2c + 1; the A operand (16 x 16) rows g, g + 8 and columns 2c, 2c + 1, 2c + 8, 2c + 9; the B
// operand (16 x 8, "col") column g and rows 2c, 2c + 1, 2c + 8, 2c + 9. ldmatrix.x4 fills them from
// shared memory (K rows for B of Q K^T; .trans of V rows for B of P V); the S accumulator, cast to
// 16 bits, is exactly the A operand of P V, so P never leaves registers.
//
// Shared tiles are row-major with rows padded by 8 elements (16 bytes): the 8 row addresses of
// one ldmatrix phase then fall in 8 distinct 16-byte bank groups for D = 32, 64 and 128.
//
// Dropout (DROPOUT instances, dropout_p > 0): on the normalized probabilities, FlashAttention's
// semantics: the softmax statistics (running max, row sum, lse) come from the undropped scores, the
// dropped P (kept entries unscaled) goes into P V, and 1 / (1 - p) joins the final 1 / l. The mask
// comes from Philox4x32-10 (philox.cuh) in 2 x 2 element groups {q, q + 8} x {k, k + 8} (q, k within
// the sequence, q % 16 < 8 and k % 16 < 8 for the group's first element): one call per group,
// counter pos = ((b * heads + h) * seqlen + q) * seqlen + k of that first element (seqlen: S padded,
// max_seqlen varlen), word 2 * (q half) + (k half) for each element. Such a group lies in one thread's
// fragments both here (rows g, g + 8; columns 2c + e, 2c + e + 8) and in the backward's transposed
// tiles (key rows g, g + 8; query columns 2c + e, 2c + e + 8), so the backward regenerates the mask
// with the same number of calls and never stores it.
#pragma once

#include "common.cuh"
#include "philox.cuh"      // Philox4x32-10 and the dropout keying
#include "primitives.cuh"  // cp.async, ldmatrix, mma.sync (PTX; host versions in the emulated build)

namespace rf {

template <int D>
struct AttnTraits {
  static_assert(D == 32 || D == 64 || D == 128, "head_dim must be 32, 64 or 128");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;          // query rows per CTA
  static constexpr int kBlockN = D == 128 ? 32 : 64;   // keys per tile (keeps 3 tiles under 48 KB)
  static constexpr int kLd = D + 8;                    // padded shared row, in elements
};

// Two fp32 values as one 32-bit register of two 16-bit values, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ROWS x D tile from global (rows `row_stride` apart) into shared [ROWS][kLd]; rows >= valid, and
// rows whose `keep` byte is 0 (padded keys: K and V rows there are never read, they count as 0, so
// NaN or inf stored at a padded position cannot reach a real row), are zero-filled without reading
// (`fallback` is any readable address, never dereferenced then).
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t row_stride, int valid, const T* fallback,
                                          const uint8_t* keep = nullptr) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kLd = AttnTraits<D>::kLd;
  for (int i = threadIdx.x; i < ROWS * kChunks; i += AttnTraits<D>::kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const bool ok = r < valid && (keep == nullptr || keep[r] != 0);
    cp_async_16(s + r * kLd + c * 8, ok ? g + r * row_stride + c * 8 : fallback, ok);
  }
}

// Keep decisions of this thread's 16-row x N-column accumulator tiles t[N / 8][4] (rows q0 + g and
// q0 + g + 8 of the sequence, columns k0 + 8 nt + 2c + e % 2; q0 and k0 multiples of 16), the group
// layout above; ROWS_ARE_KEYS: the backward's transposed tiles (rows are keys, columns queries).
// `seq_base` = (b * heads + h) * seqlen.
template <int N, bool ROWS_ARE_KEYS>
__device__ __forceinline__ void attn_dropout_keep(const DropoutRng& r, uint64_t seq_base, int64_t seqlen, int row0,
                                                  int col0, bool (&keep)[N / 8][4]) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int rr = row0 + g, cc = col0 + 16 * kk + 2 * c + e;  // the group's first element
      const uint64_t q = ROWS_ARE_KEYS ? cc : rr, k = ROWS_ARE_KEYS ? rr : cc;
      const Philox4 b = dropout_bits(r, (seq_base + q) * static_cast<uint64_t>(seqlen) + k);
      // word 2 * qh + kh; tile element [2kk + column half][2 * row half + e]
      const uint32_t w00 = b.x, w01 = b.y, w10 = b.z, w11 = b.w;  // w<qh><kh>
      keep[2 * kk][e] = w00 >= r.threshold;
      keep[2 * kk + 1][2 + e] = w11 >= r.threshold;
      keep[2 * kk + 1][e] = (ROWS_ARE_KEYS ? w10 : w01) >= r.threshold;  // column half 1, row half 0
      keep[2 * kk][2 + e] = (ROWS_ARE_KEYS ? w01 : w10) >= r.threshold;  // column half 0, row half 1
    }
  }
}

// ----------------------------------------------------------------------------- the kernel
template <typename T, int D, bool DROPOUT>
__global__ void __launch_bounds__(AttnTraits<D>::kThreads, 2)  // 2 CTAs / SM: up to 255 registers
attention_fwd_kernel(const AttnFwdParams p) {
  using Tr = AttnTraits<D>;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, LD = Tr::kLd;
  __shared__ __align__(16) T sQ[BM * LD];  // Q tile; reused for the O tile at the end
  __shared__ __align__(16) T sK[BN * LD];
  __shared__ __align__(16) T sV[BN * LD];

  const int b = blockIdx.z, h = blockIdx.y;
  const int m0 = blockIdx.x * BM;
  int64_t row0 = 0;  // first row of this sequence
  int len = p.seqlen;  // its length (queries == keys)
  if (p.cu_seqlens != nullptr) {
    row0 = p.cu_seqlens[b];
    len = p.cu_seqlens[b + 1] - p.cu_seqlens[b];
  }
  if (m0 >= len) return;

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + row0 * p.q_row_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + row0 * p.k_row_stride + h * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + row0 * p.v_row_stride + h * p.v_head_stride;
  const uint8_t* kpm = p.key_padding_mask == nullptr ? nullptr : p.key_padding_mask + b * p.mask_batch_stride;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const float scale_log2 = p.scale * 1.4426950408889634f;  // exp(x) = exp2(x * log2(e))
  [[maybe_unused]] DropoutRng drop{};
  [[maybe_unused]] uint64_t seq_base = 0;
  if constexpr (DROPOUT) {
    drop = load_dropout_rng(p.rng, p.drop_threshold);
    seq_base = (static_cast<uint64_t>(b) * p.heads + h) * static_cast<uint64_t>(p.seqlen);
  }

  load_tile<T, BM, D>(sQ, q + static_cast<int64_t>(m0) * p.q_row_stride, p.q_row_stride, len - m0, q);
  load_tile<T, BN, D>(sK, k, p.k_row_stride, len, k, kpm);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // this warp's 16 query rows as A fragments, one per 16 columns of D
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int r = warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2);
    ldmatrix_x4(qf[kk], sQ + r * LD + kk * 16 + 8 * (lane / 16));
  }

  float o[D / 8][4];  // output accumulator: D/8 tiles of 16 x 8
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max of rows g and g + 8 (log2 domain)
  float l_run[2] = {0.f, 0.f};              // this thread's part of the running sum of exp2

  const int n_tiles = (len + BN - 1) / BN;
  for (int j = 0; j < n_tiles; ++j) {
    const int n0 = j * BN;
    load_tile<T, BN, D>(sV, v + static_cast<int64_t>(n0) * p.v_row_stride, p.v_row_stride, len - n0, v,
                        kpm == nullptr ? nullptr : kpm + n0);
    cp_async_commit();

    // S = Q K^T for 16 rows x BN keys
    float s[BN / 8][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t kb[4];
        const int r = nn * 16 + (lane % 8) + 8 * (lane / 16);
        ldmatrix_x4(kb, sK + r * LD + kk * 16 + 8 * ((lane / 8) % 2));
        mma_16816<T>(s[2 * nn], qf[kk], kb[0], kb[1]);
        mma_16816<T>(s[2 * nn + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // scale into the log2 domain; keys past the end or padded out become -inf
    const bool edge = n0 + BN > len || kpm != nullptr;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + nt * 8 + 2 * c + (e % 2);
        const bool keep = !edge || (key < len && (kpm == nullptr || kpm[key] != 0));
        s[nt][e] = keep ? s[nt][e] * scale_log2 : -INFINITY;
      }
    }

    // online softmax: rows g (e = 0, 1) and g + 8 (e = 2, 3)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = m_run[half];
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_use = mx == -INFINITY ? 0.f : mx;  // no real key yet: exp2(-inf - 0) = 0
      const float alpha = exp2f(m_run[half] - m_use);
      m_run[half] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        s[nt][2 * half] = exp2f(s[nt][2 * half] - m_use);
        s[nt][2 * half + 1] = exp2f(s[nt][2 * half + 1] - m_use);
        sum += s[nt][2 * half] + s[nt][2 * half + 1];
      }
      l_run[half] = l_run[half] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * half] *= alpha;
        o[dt][2 * half + 1] *= alpha;
      }
    }

    if constexpr (DROPOUT) {  // after the row sums: l and lse stay those of the undropped P
      bool keep[BN / 8][4];
      attn_dropout_keep<BN, false>(drop, seq_base, p.seqlen, m0 + warp * 16, n0, keep);
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = keep[nt][e] ? s[nt][e] : 0.f;
      }
    }

    cp_async_wait_all();  // V tile j has landed
    __syncthreads();      // ... for every thread; and every warp is done reading sK
    if (j + 1 < n_tiles) {
      load_tile<T, BN, D>(sK, k + static_cast<int64_t>(n0 + BN) * p.k_row_stride, p.k_row_stride, len - n0 - BN, k,
                          kpm == nullptr ? nullptr : kpm + n0 + BN);
      cp_async_commit();
    }

    // O += P V: the S accumulator tiles 2kk, 2kk+1 are the A operand of keys [16kk, 16kk + 16)
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t vb[4];
        const int r = kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2);
        ldmatrix_x4_trans(vb, sV + r * LD + dn * 16 + 8 * (lane / 16));
        mma_16816<T>(o[2 * dn], a, vb[0], vb[1]);
        mma_16816<T>(o[2 * dn + 1], a, vb[2], vb[3]);
      }
    }
    cp_async_wait_all();  // K tile j + 1 has landed
    __syncthreads();      // ... for every thread; and every warp is done reading sV
  }

  // normalize; a row with no real key (l == 0) gives zeros and lse = -inf
  float inv[2], lse[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float l = l_run[half];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[half] = l == 0.f ? 0.f : 1.f / l;
    if constexpr (DROPOUT) inv[half] *= p.drop_scale;
    lse[half] = l == 0.f ? -INFINITY : (m_run[half] + log2f(l)) * 0.6931471805599453f;
  }

  // O tile -> this warp's own rows of sQ (no other warp touches them) -> 16-byte global stores
  T* sO = sQ;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp * 16 + g + 8 * half;
      *reinterpret_cast<uint32_t*>(sO + r * LD + dt * 8 + 2 * c) =
          pack2<T>(o[dt][2 * half] * inv[half], o[dt][2 * half + 1] * inv[half]);
    }
  }
  if (c == 0) {
    float* lse_out = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + row0 + m0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp * 16 + g + 8 * half;
      if (m0 + r < len) lse_out[r] = lse[half];
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.o) + b * p.o_batch_stride + (row0 + m0) * p.o_row_stride + h * p.o_head_stride;
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x; i < BM * kChunks; i += Tr::kThreads) {
    const int r = i / kChunks, cc = i % kChunks;
    if (m0 + r < len) {
      *reinterpret_cast<uint4*>(out + r * p.o_row_stride + cc * 8) = *reinterpret_cast<const uint4*>(sO + r * LD + cc * 8);
    }
  }
}

// varlen: rows [cu_seqlens[batch], total_rows) belong to no sequence: o = 0, lse = -inf.
template <typename T>
__global__ void __launch_bounds__(256) attention_varlen_tail_kernel(const AttnFwdParams p) {
  const int64_t start = p.cu_seqlens[p.batch];
  const int64_t width = static_cast<int64_t>(p.heads) * p.head_dim;  // o is contiguous (T, H, D)
  const int64_t n = (p.total_rows - start) * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  T* o = static_cast<T*>(p.o) + start * width;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    o[i] = from_float<T>(0.f);
  const int64_t nl = (p.total_rows - start) * p.heads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nl; i += stride) {
    const int64_t hh = i / (p.total_rows - start), r = i % (p.total_rows - start);
    p.lse[hh * p.lse_head_stride + start + r] = -INFINITY;
  }
}

}  // namespace rf
