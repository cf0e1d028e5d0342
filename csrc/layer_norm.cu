// Launchers of the fused residual + bias + (dropout +) LayerNorm kernels (layer_norm.cuh): pick the
// vector width from the pointers' alignment, the warps per row from N, whether a row fits in shared
// memory, and the dropout instances only when dropout_p > 0.
#include "layer_norm.cuh"

namespace rf {
namespace {

constexpr size_t kSmemBudget = 47 * 1024;  // below the 48 KB default, leaving room for `red`

template <typename T>
bool ln_fwd_can_vec(const LayerNormFwdParams& p, int vec) {
  auto pe = [](bool f32) { return f32 ? sizeof(float) : sizeof(T); };
  return p.N % vec == 0 && vec_ok(p.x, p.x_stride, vec, sizeof(T)) &&
         vec_ok(p.residual, p.res_stride, vec, sizeof(T)) && vec_ok(p.y, p.N, vec, sizeof(T)) &&
         vec_ok(p.x_bias, 0, vec, pe(p.x_bias_f32)) && vec_ok(p.weight, 0, vec, pe(p.weight_f32)) &&
         vec_ok(p.bias, 0, vec, pe(p.bias_f32));
}

template <typename T>
bool ln_bwd_can_vec(const LayerNormBwdParams& p, int vec) {
  auto pe = [](bool f32) { return f32 ? sizeof(float) : sizeof(T); };
  return p.N % vec == 0 && vec_ok(p.x, p.x_stride, vec, sizeof(T)) &&
         vec_ok(p.residual, p.res_stride, vec, sizeof(T)) && vec_ok(p.dy, p.dy_stride, vec, sizeof(T)) &&
         vec_ok(p.dx, p.N, vec, sizeof(T)) && vec_ok(p.dresidual, p.N, vec, sizeof(T)) &&
         vec_ok(p.x_bias, 0, vec, pe(p.x_bias_f32)) &&
         vec_ok(p.weight, 0, vec, pe(p.weight_f32));
}

// Warps per row from the number of VEC chunks: about 2-8 chunks per thread.
template <typename F>
void with_warps(int64_t chunks, F&& f) {
  if (chunks <= 256) {
    f(std::integral_constant<int, 1>{});
  } else if (chunks <= 1024) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

// DROPOUT as a compile-time flag: dropout_p == 0 runs exactly the kernels without dropout.
template <typename F>
void with_dropout(float dropout_p, F&& f) {
  if (dropout_p > 0.f) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename T, int VEC>
void ln_fwd(const LayerNormFwdParams& p, cudaStream_t stream) {
  with_warps(p.N / VEC, [&](auto w) {
    constexpr int WARPS = decltype(w)::value;
    using L = RowLayout<WARPS>;
    const dim3 grid(ceil_div(p.M, L::kRows));
    const size_t smem = L::kRows * p.N * sizeof(float);
    with_dropout(p.dropout_p, [&](auto dr) {
      constexpr bool DR = decltype(dr)::value;
      // the scalar (unaligned) dropout path recomputes h instead of caching it: its cached instances made
      // ptxas spill a few bytes on sm_80 (the build fails on any spill), and it is the rare fallback
      constexpr bool kCacheOk = !(DR && VEC == 1);
      if (kCacheOk && smem <= kSmemBudget) {
        RF_LAUNCH(grid, L::kThreads, smem, stream, layer_norm_fwd_kernel<T, VEC, WARPS, kCacheOk, DR>)(p);
      } else {
        RF_LAUNCH(grid, L::kThreads, 0, stream, layer_norm_fwd_kernel<T, VEC, WARPS, false, DR>)(p);
      }
    });
    check_launch("layer_norm_fwd_kernel");
  });
}

template <typename T, int VEC>
void ln_bwd_rows(const LayerNormBwdParams& p, cudaStream_t stream) {
  with_warps(p.N / VEC, [&](auto w) {
    constexpr int WARPS = decltype(w)::value;
    using L = RowLayout<WARPS>;
    const dim3 grid(ceil_div(p.M, L::kRows));
    const size_t smem = L::kRows * 2 * p.N * sizeof(float);
    with_dropout(p.dropout_p, [&](auto dr) {
      constexpr bool DR = decltype(dr)::value;
      if (smem <= kSmemBudget) {
        RF_LAUNCH(grid, L::kThreads, smem, stream, layer_norm_bwd_kernel<T, VEC, WARPS, true, DR>)(p);
      } else {
        RF_LAUNCH(grid, L::kThreads, 0, stream, layer_norm_bwd_kernel<T, VEC, WARPS, false, DR>)(p);
      }
    });
    check_launch("layer_norm_bwd_kernel");
  });
}

}  // namespace

void layer_norm_fwd(const LayerNormFwdParams& params, void* stream_ptr) {
  LayerNormFwdParams p = params;
  dropout_setup("layer_norm_fwd", p.dropout_p, p.rng, p.drop_threshold, p.drop_scale);
  if (p.M <= 0 || p.N <= 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  RF_DISPATCH_FLOAT(p.dtype, "layer_norm_fwd", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    if (ln_fwd_can_vec<scalar_t>(p, V)) {
      ln_fwd<scalar_t, V>(p, stream);
    } else {
      ln_fwd<scalar_t, 1>(p, stream);
    }
  });
}

void layer_norm_bwd(const LayerNormBwdParams& params, void* stream_ptr) {
  LayerNormBwdParams p = params;
  dropout_setup("layer_norm_bwd", p.dropout_p, p.rng, p.drop_threshold, p.drop_scale);
  if (p.dresidual != nullptr && p.dropout_p == 0.f)
    throw std::invalid_argument("layer_norm_bwd: dresidual is written only with dropout_p > 0 (else it is dx)");
  if (p.M <= 0 || p.N <= 0) return;
  if ((p.dweight != nullptr || p.dbias != nullptr || p.dx_bias != nullptr) && (p.col_ws == nullptr || p.parts < 1))
    throw std::invalid_argument("layer_norm_bwd: parameter gradients need col_ws (3, parts, N) and parts >= 1");
  if (p.dx_bias != nullptr && p.row_ws == nullptr)
    throw std::invalid_argument("layer_norm_bwd: dx_bias needs row_ws (M, 2)");
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  RF_DISPATCH_FLOAT(p.dtype, "layer_norm_bwd", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    if (ln_bwd_can_vec<scalar_t>(p, V)) {
      ln_bwd_rows<scalar_t, V>(p, stream);
    } else {
      ln_bwd_rows<scalar_t, 1>(p, stream);
    }
    if (p.dweight == nullptr && p.dbias == nullptr && p.dx_bias == nullptr) return;
    const dim3 grid(ceil_div(p.N, 32), static_cast<unsigned int>(p.parts));
    with_dropout(p.dropout_p, [&](auto dr) {
      constexpr bool DR = decltype(dr)::value;
      RF_LAUNCH(grid, dim3(32, kColThreadsY), 0, stream, layer_norm_bwd_cols_kernel<scalar_t, DR>)(p);
    });
    check_launch("layer_norm_bwd_cols_kernel");
    RF_LAUNCH(ceil_div(p.N, 256), 256, 0, stream, layer_norm_bwd_finalize_kernel<scalar_t>)(p);
    check_launch("layer_norm_bwd_finalize_kernel");
  });
}

}  // namespace rf
