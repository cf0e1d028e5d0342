// Host interface of roberta_fast._C: one params struct of raw device pointers, sizes and strides
// per kernel (flash-attention's flash.h idea) and the launcher that takes it. Plain C++ (no CUDA
// headers), so bindings.cpp compiles with the host compiler alone.
//
// Conventions: sizes and strides are in elements (int64); "rows" means a 2-D view whose last
// stride is 1; outputs are contiguous; `stream` is a cudaStream_t passed as void*. Every launcher
// checks its launches and throws std::runtime_error naming the kernel and the CUDA error.
#pragma once

#include <cstdint>

namespace rf {

// dtype codes shared with Python (roberta_fast/cuda_ops/_common.py reads them from _C.DTYPES)
enum DType : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3, kBool = 4 };

// ----------------------------------------------------------------------------- layer_norm
// y = LayerNorm(dropout(x + x_bias) + residual) * weight + bias over rows of N (dropout only with
// dropout_p > 0; without it the sum is x + residual + x_bias, today's order).
//
// Dropout (every kernel that takes it): `rng` points to an int64 (seed, offset) pair on the device
// (read by the kernels, never by the host), null when dropout_p == 0; dropout_p in [0, 1); kept
// values are scaled by 1 / (1 - dropout_p). The mask is a function of (seed, offset, position) only
// (csrc/philox.cuh); dropout_p == 0 launches the kernels without dropout. drop_threshold and
// drop_scale are filled in by the launchers.
struct LayerNormFwdParams {
  const void* x;         // (M, N) rows, dtype
  int64_t x_stride;
  const void* residual;  // (M, N) rows of dtype, or null
  int64_t res_stride;
  const void* x_bias;    // (N,) dtype or fp32, or null
  const void* weight;    // (N,) dtype or fp32, or null
  const void* bias;      // (N,) dtype or fp32, or null
  bool x_bias_f32, weight_f32, bias_f32;
  uint32_t drop_threshold;  // here, in the padding: a larger struct made ptxas spill 8 bytes in the
                            // no-dropout fwd kernel <16-bit, VEC 1, 1 warp, cached> on sm_80
  void* y;               // (M, N) contiguous, dtype
  float* mean;           // (M,)
  float* rstd;           // (M,)
  int64_t M, N;
  float eps;
  int dtype;
  const int64_t* rng;    // (2,) int64 (seed, offset), or null
  float dropout_p;
  float drop_scale;
};
void layer_norm_fwd(const LayerNormFwdParams& p, void* stream);

struct LayerNormBwdParams {
  const void* dy;        // (M, N) rows, dtype
  int64_t dy_stride;
  const void* x;         // (M, N) rows, dtype
  int64_t x_stride;
  const void* residual;  // (M, N) rows or null
  int64_t res_stride;
  const void* x_bias;    // (N,) or null
  const void* weight;    // (N,) or null
  bool x_bias_f32, weight_f32;
  const float* mean;     // (M,)
  const float* rstd;     // (M,)
  void* dx;              // (M, N) contiguous, dtype
  float* row_ws;         // (M, 2) fp32 scratch: mean(g), mean(g * xhat) per row (g = dy * weight)
  float* col_ws;         // (3, parts, N) fp32 scratch: partial column sums, or null when no grads
  void* dweight;         // (N,) weight's dtype, or null
  void* dbias;           // (N,) bias's dtype, or null
  void* dx_bias;         // (N,) x_bias's dtype, or null
  bool dweight_f32, dbias_f32, dx_bias_f32;
  int64_t M, N;
  int parts;             // row partitions of the column sums (rows of col_ws)
  int dtype;
  void* dresidual;       // (M, N) contiguous, dtype: dL/dh (h = dropout(x + x_bias) + residual), or null;
                         // then dx is dh * mask / (1 - p)
  const int64_t* rng;    // (2,) int64 (seed, offset), or null
  float dropout_p;
  uint32_t drop_threshold;
  float drop_scale;
};
void layer_norm_bwd(const LayerNormBwdParams& p, void* stream);

// ----------------------------------------------------------------------------- gelu
// y = GELU(x + bias), erf (approximate = 0) or tanh (approximate = 1).
struct BiasGeluParams {
  const void* x;         // (M, N) rows, dtype
  int64_t x_stride;
  const void* dy;        // (M, N) rows (backward only)
  int64_t dy_stride;
  const void* bias;      // (N,) dtype or fp32, or null
  bool bias_f32;
  void* out;             // (M, N) contiguous: y (forward) or dx (backward)
  float* col_ws;         // (parts, N) fp32 partial sums of dx (backward with bias), else null
  void* dbias;           // (N,) bias's dtype (backward with bias), else null
  int64_t M, N;
  int parts;
  int approximate;
  int dtype;
};
void bias_gelu_fwd(const BiasGeluParams& p, void* stream);
void bias_gelu_bwd(const BiasGeluParams& p, void* stream);

// ----------------------------------------------------------------------------- softmax
// probs = softmax(scale * scores (+ additive mask | where bool mask)) over the last dim of (B, H, Q, K).
struct SoftmaxFwdParams {
  const void* scores;    // (B, H, Q, K), stride 1 in K
  int64_t s_strides[3];  // B, H, Q strides
  const void* mask;      // (B, H, Q, K) view (stride 0 where broadcast), or null
  int64_t m_strides[4];  // B, H, Q, K strides (K stride 0 or 1)
  int mask_dtype;        // kBool or a float code
  void* probs;           // (B, H, Q, K) contiguous
  int64_t B, H, Q, K;
  float scale;
  int dtype;
};
void masked_softmax_fwd(const SoftmaxFwdParams& p, void* stream);

struct SoftmaxBwdParams {
  const void* dprobs;    // (B, H, Q, K), stride 1 in K
  int64_t dp_strides[3];
  const void* probs;     // (B, H, Q, K), stride 1 in K
  int64_t p_strides[3];
  void* dscores;         // (B, H, Q, K) contiguous
  int64_t B, H, Q, K;
  float scale;
  int dtype;
};
void masked_softmax_bwd(const SoftmaxBwdParams& p, void* stream);

// ----------------------------------------------------------------------------- attention
// o = softmax(scale * q k^T) v per (sequence, head), non-causal, online softmax in fp32.
// Sequence b's rows start at row_start = b * seqlen (padded, cu_seqlens null, batch strides used)
// or cu_seqlens[b] (varlen, batch strides 0); row r of it lives at ptr + b*batch_stride +
// (row_start + r)*row_stride + h*head_stride.
struct AttnFwdParams {
  const void* q; const void* k; const void* v;  // (B, S, H, D) or (T, H, D), stride 1 in D
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  void* o;                                      // contiguous, q's layout
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  float* lse;                                   // (B, H, S) or (H, T), natural log
  int64_t lse_batch_stride, lse_head_stride;
  const uint8_t* key_padding_mask;              // (B, S) bool, True = real key, or null
  int64_t mask_batch_stride;
  const int* cu_seqlens;                        // (B + 1,) int32, or null (padded)
  int64_t total_rows;                           // varlen: T (rows past cu_seqlens[B] are zeroed)
  int batch, heads, seqlen, head_dim;           // seqlen: S (padded) or max_seqlen (varlen)
  float scale;
  int dtype;                                    // kF16 or kBF16
  const int64_t* rng;                           // (2,) int64 (seed, offset), or null
  float dropout_p;                              // on the probabilities: O = dropout(P) V, lse undropped
  uint32_t drop_threshold;
  float drop_scale;
};
void attention_fwd(const AttnFwdParams& p, void* stream);

// Gradients of attention_fwd: one CTA per (64-key block, head, sequence) accumulates dK and dV in
// registers over every query block and adds its part of dQ into an fp32 buffer with atomics.
// Same row addressing as AttnFwdParams (batch strides 0 and rows from cu_seqlens for varlen).
struct AttnBwdParams {
  const void* q; const void* k; const void* v; const void* dout;  // like the forward's q, k, v
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  const float* lse;                             // forward's lse, (B, H, S) or (H, T)
  const float* delta;                           // rowsum(dout * o), same layout as lse
  int64_t lse_batch_stride, lse_head_stride;
  float* dq_accum;                              // fp32, q's contiguous layout, zero-initialized
  void* dk; void* dv;                           // q's dtype, contiguous, k's and v's shapes
  int64_t g_batch_stride, g_row_stride, g_head_stride;  // strides of dq_accum, dk and dv
  const uint8_t* key_padding_mask;              // (B, S) bool, or null
  int64_t mask_batch_stride;
  const int* cu_seqlens;                        // (B + 1,) int32, or null (padded)
  int batch, heads, seqlen, head_dim;
  float scale;
  int dtype;                                    // kF16 or kBF16
  const int64_t* rng;                           // the forward's rng and dropout_p (the same mask)
  float dropout_p;
  uint32_t drop_threshold;
  float drop_scale;
};
void attention_bwd(const AttnBwdParams& p, void* stream);

}  // namespace rf
