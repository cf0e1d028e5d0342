// Attention backward on tensor cores (mma.sync m16n8k16, sm_80+), FlashAttention-2 style.
//
// One CTA per (64-key block, head, sequence), four warps of 16 keys each. K and V of the block stay
// in shared memory; the CTA walks every query block of kBlockM rows: it loads Q and dO, recomputes
// the transposed probabilities P^T = exp(scale * K Q^T - lse) from the forward's lse, and with
// delta = rowsum(dO * O) (computed by the host) forms
//   dV += P^T dO,   dP^T = V dO^T,   dS^T = scale * P^T * (dP^T - delta),   dK += dS^T Q,
//   dQ += dS K  (dS^T goes through shared memory; fp32 atomics into dq_accum).
// dK and dV never leave registers until the end. Reads K, V once and Q, dO once per key block:
// 8 * B*S*H*D FLOPs per S more than the forward (2.5x), never S x S in memory.
//
// Fragment conventions are those of attention.cuh. The transposed products reuse the forward's
// addressing: K (and V) rows as the A operand like Q there; Q (and dO) rows as the B operand of
// K Q^T like K there; Q, dO and K as the "k-major" B operand via ldmatrix.trans like V there. The
// A operand of dS K is read from dS^T in shared memory with ldmatrix.trans.
//
// Dropout (DROPOUT instances): the mask m of the forward is regenerated (attention.cuh's groups, in
// the transposed tiles) and, with P the undropped probabilities and r = 1 / (1 - p),
//   dV += (P * m)^T dO (r applied once at the end),  dS = P * (m * r * dP_dropped - delta),
// where dP_dropped = dO V^T and delta = rowsum(dO * O) of the dropped output, as without dropout.
#pragma once

#include "attention.cuh"

namespace rf {

template <int D>
struct AttnBwdTraits {
  static constexpr int kThreads = AttnTraits<D>::kThreads;   // 4 warps
  static constexpr int kBlockN = 64;                          // keys per CTA, 16 per warp
  static constexpr int kBlockM = D == 128 ? 32 : 64;          // queries per step
  static constexpr int kLd = AttnTraits<D>::kLd;              // padded row of K, V, Q, dO tiles
  static constexpr int kLdS = kBlockM + 8;                    // padded row of the dS^T tile
  static constexpr int kQSlices = kBlockM / 16;               // dQ: 16-query slices ...
  static constexpr int kDPerWarp = D * kQSlices / 4;          // ... times head_dim columns per warp
  static constexpr size_t kSmemBytes =
      (2 * kBlockN * kLd + 2 * kBlockM * kLd + kBlockN * kLdS) * 2 + 2 * kBlockM * sizeof(float);
};

template <typename T, int D, bool DROPOUT>
__global__ void __launch_bounds__(AttnBwdTraits<D>::kThreads, 2)
attention_bwd_kernel(const AttnBwdParams p) {
  using Tr = AttnBwdTraits<D>;
  constexpr int BN = Tr::kBlockN, BM = Tr::kBlockM, LD = Tr::kLd, LDS = Tr::kLdS;
  RF_EXTERN_SHARED(unsigned char, smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);  // [BN][LD]
  T* sV = sK + BN * LD;                     // [BN][LD]
  T* sQ = sV + BN * LD;                     // [BM][LD]
  T* sdO = sQ + BM * LD;                    // [BM][LD]
  T* sdS = sdO + BM * LD;                   // [BN][LDS]: dS^T, keys x queries
  float* sLse = reinterpret_cast<float*>(sdS + BN * LDS);  // [BM] lse * log2(e)
  float* sDelta = sLse + BM;                                // [BM]

  const int b = blockIdx.z, h = blockIdx.y;
  const int n0 = blockIdx.x * BN;
  int64_t row0 = 0;
  int len = p.seqlen;
  if (p.cu_seqlens != nullptr) {
    row0 = p.cu_seqlens[b];
    len = p.cu_seqlens[b + 1] - p.cu_seqlens[b];
  }
  if (n0 >= len) return;

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + row0 * p.q_row_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + row0 * p.k_row_stride + h * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + row0 * p.v_row_stride + h * p.v_head_stride;
  const T* dout =
      static_cast<const T*>(p.dout) + b * p.do_batch_stride + row0 * p.do_row_stride + h * p.do_head_stride;
  const int64_t lse_off = b * p.lse_batch_stride + h * p.lse_head_stride + row0;
  const float* lse = p.lse + lse_off;
  const float* delta = p.delta + lse_off;
  const int64_t g_off = b * p.g_batch_stride + row0 * p.g_row_stride + h * p.g_head_stride;
  float* dq = p.dq_accum + g_off;
  const uint8_t* kpm = p.key_padding_mask == nullptr ? nullptr : p.key_padding_mask + b * p.mask_batch_stride;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const float scale_log2 = p.scale * 1.4426950408889634f;
  [[maybe_unused]] DropoutRng drop{};
  [[maybe_unused]] uint64_t seq_base = 0;
  if constexpr (DROPOUT) {
    drop = load_dropout_rng(p.rng, p.drop_threshold);
    seq_base = (static_cast<uint64_t>(b) * p.heads + h) * static_cast<uint64_t>(p.seqlen);
  }

  // padded keys' K and V rows are zeros (never read): their S^T and dP^T rows are 0, so dS K adds nothing
  load_tile<T, BN, D>(sK, k + static_cast<int64_t>(n0) * p.k_row_stride, p.k_row_stride, len - n0, k,
                      kpm == nullptr ? nullptr : kpm + n0);
  load_tile<T, BN, D>(sV, v + static_cast<int64_t>(n0) * p.v_row_stride, p.v_row_stride, len - n0, v,
                      kpm == nullptr ? nullptr : kpm + n0);
  cp_async_commit();

  // this thread's two key rows: warp * 16 + g and + 8 of the block
  bool key_ok[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = n0 + warp * 16 + g + 8 * half;
    key_ok[half] = key < len && (kpm == nullptr || kpm[key] != 0);
  }

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  }

  for (int i0 = 0; i0 < len; i0 += BM) {
    load_tile<T, BM, D>(sQ, q + static_cast<int64_t>(i0) * p.q_row_stride, p.q_row_stride, len - i0, q);
    load_tile<T, BM, D>(sdO, dout + static_cast<int64_t>(i0) * p.do_row_stride, p.do_row_stride, len - i0, dout);
    cp_async_commit();
    for (int i = threadIdx.x; i < BM; i += Tr::kThreads) {
      const bool ok = i0 + i < len;
      sLse[i] = ok ? lse[i0 + i] * 1.4426950408889634f : 0.f;
      sDelta[i] = ok ? delta[i0 + i] : 0.f;
    }
    cp_async_wait_all();
    __syncthreads();

    // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x BM queries
    float s[BM / 8][4], dp[BM / 8][4];
#pragma unroll
    for (int i = 0; i < BM / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4], va[4];
      const int ra = warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2);
      ldmatrix_x4(ka, sK + ra * LD + kk * 16 + 8 * (lane / 16));
      ldmatrix_x4(va, sV + ra * LD + kk * 16 + 8 * (lane / 16));
#pragma unroll
      for (int nn = 0; nn < BM / 16; ++nn) {
        uint32_t qb[4], ob[4];
        const int rb = nn * 16 + (lane % 8) + 8 * (lane / 16);
        ldmatrix_x4(qb, sQ + rb * LD + kk * 16 + 8 * ((lane / 8) % 2));
        ldmatrix_x4(ob, sdO + rb * LD + kk * 16 + 8 * ((lane / 8) % 2));
        mma_16816<T>(s[2 * nn], ka, qb[0], qb[1]);
        mma_16816<T>(s[2 * nn + 1], ka, qb[2], qb[3]);
        mma_16816<T>(dp[2 * nn], va, ob[0], ob[1]);
        mma_16816<T>(dp[2 * nn + 1], va, ob[2], ob[3]);
      }
    }

    // P^T (into s) and dS^T (into dp); masked keys and queries past the end give 0
    [[maybe_unused]] bool keep[BM / 8][4];
    if constexpr (DROPOUT) attn_dropout_keep<BM, true>(drop, seq_base, p.seqlen, n0 + warp * 16, i0, keep);
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = nt * 8 + 2 * c + (e % 2);
        const float lse2 = sLse[qi];
        const bool ok = key_ok[e / 2] && i0 + qi < len && lse2 != -INFINITY;
        const float pv = ok ? exp2f(s[nt][e] * scale_log2 - lse2) : 0.f;
        if constexpr (DROPOUT) {
          s[nt][e] = keep[nt][e] ? pv : 0.f;
          dp[nt][e] = pv * ((keep[nt][e] ? dp[nt][e] * p.drop_scale : 0.f) - sDelta[qi]) * p.scale;
        } else {
          s[nt][e] = pv;
          dp[nt][e] = pv * (dp[nt][e] - sDelta[qi]) * p.scale;
        }
      }
    }

    // dV += P^T dO and dK += dS^T Q (the k dimension is the queries)
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t pa[4], sa[4];
      pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      sa[0] = pack2<T>(dp[2 * kk][0], dp[2 * kk][1]);
      sa[1] = pack2<T>(dp[2 * kk][2], dp[2 * kk][3]);
      sa[2] = pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      sa[3] = pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
      // dS^T to shared memory for dQ: rows = keys, columns = queries
      T* ds_row = sdS + (warp * 16 + g) * LDS + kk * 16 + 2 * c;
      *reinterpret_cast<uint32_t*>(ds_row) = sa[0];
      *reinterpret_cast<uint32_t*>(ds_row + 8 * LDS) = sa[1];
      *reinterpret_cast<uint32_t*>(ds_row + 8) = sa[2];
      *reinterpret_cast<uint32_t*>(ds_row + 8 * LDS + 8) = sa[3];
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t ob[4], qb[4];
        const int r = kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2);
        ldmatrix_x4_trans(ob, sdO + r * LD + dn * 16 + 8 * (lane / 16));
        ldmatrix_x4_trans(qb, sQ + r * LD + dn * 16 + 8 * (lane / 16));
        mma_16816<T>(dv[2 * dn], pa, ob[0], ob[1]);
        mma_16816<T>(dv[2 * dn + 1], pa, ob[2], ob[3]);
        mma_16816<T>(dk[2 * dn], sa, qb[0], qb[1]);
        mma_16816<T>(dk[2 * dn + 1], sa, qb[2], qb[3]);
      }
    }
    __syncthreads();  // dS^T complete

    // dQ (BM x D) += dS K: warp -> 16 queries (slice qs) x kDPerWarp columns (from d0)
    {
      const int qs = warp % Tr::kQSlices, d0 = (warp / Tr::kQSlices) * Tr::kDPerWarp;
      uint32_t da[BN / 16][4];
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const int r = kk * 16 + (lane % 8) + 8 * (lane / 16);
        ldmatrix_x4_trans(da[kk], sdS + r * LDS + qs * 16 + 8 * ((lane / 8) % 2));
      }
#pragma unroll
      for (int dn = 0; dn < Tr::kDPerWarp / 16; ++dn) {
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t kb[4];
          const int r = kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2);
          ldmatrix_x4_trans(kb, sK + r * LD + d0 + dn * 16 + 8 * (lane / 16));
          mma_16816<T>(acc[0], da[kk], kb[0], kb[1]);
          mma_16816<T>(acc[1], da[kk], kb[2], kb[3]);
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int qi = i0 + qs * 16 + g + 8 * half;
          if (qi >= len) continue;
          float* dq_row = dq + static_cast<int64_t>(qi) * p.g_row_stride + d0 + dn * 16 + 2 * c;
#pragma unroll
          for (int t = 0; t < 2; ++t) {
            atomicAdd(dq_row + 8 * t, acc[t][2 * half]);
            atomicAdd(dq_row + 8 * t + 1, acc[t][2 * half + 1]);
          }
        }
      }
    }
    __syncthreads();  // before the next query block overwrites sQ, sdO, sdS, sLse, sDelta
  }

  if constexpr (DROPOUT) {  // dV = r (P * m)^T dO
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dv[i][e] *= p.drop_scale;
    }
  }

  // dK, dV of this warp's keys (keys past the end are not written)
  T* dkp = static_cast<T*>(p.dk) + g_off;
  T* dvp = static_cast<T*>(p.dv) + g_off;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = n0 + warp * 16 + g + 8 * half;
    if (key >= len) continue;
    const int64_t off = static_cast<int64_t>(key) * p.g_row_stride + 2 * c;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(dkp + off + dt * 8) = pack2<T>(dk[dt][2 * half], dk[dt][2 * half + 1]);
      *reinterpret_cast<uint32_t*>(dvp + off + dt * 8) = pack2<T>(dv[dt][2 * half], dv[dt][2 * half + 1]);
    }
  }
}

}  // namespace rf
