// Launchers of the fused bias + GELU kernels (bias_gelu.cuh).
#include "bias_gelu.cuh"

namespace rf {
namespace {

template <typename T>
bool gelu_can_vec(const BiasGeluParams& p, int vec, bool bwd) {
  return p.N % vec == 0 && vec_ok(p.x, p.x_stride, vec, sizeof(T)) && vec_ok(p.out, p.N, vec, sizeof(T)) &&
         (!bwd || vec_ok(p.dy, p.dy_stride, vec, sizeof(T))) &&
         vec_ok(p.bias, 0, vec, p.bias_f32 ? sizeof(float) : sizeof(T));
}

// About 4 rows per thread, at most 65535 row blocks (grid.y's limit).
unsigned int row_blocks(int64_t M) {
  const int64_t want = (M + 4 * kGeluThreadsY - 1) / (4 * kGeluThreadsY);
  return static_cast<unsigned int>(want < 1 ? 1 : (want > 65535 ? 65535 : want));
}

template <typename T, int VEC, bool BWD>
void gelu_launch(const BiasGeluParams& p, cudaStream_t stream) {
  const unsigned int gy = (BWD && p.col_ws != nullptr) ? static_cast<unsigned int>(p.parts) : row_blocks(p.M);
  const dim3 grid(ceil_div(p.N, 32 * VEC), gy);
  RF_LAUNCH(grid, dim3(32, kGeluThreadsY), 0, stream, bias_gelu_kernel<T, VEC, BWD>)(p);
  check_launch(BWD ? "bias_gelu_bwd_kernel" : "bias_gelu_fwd_kernel");
}

template <bool BWD>
void gelu_run(const BiasGeluParams& p, void* stream_ptr) {
  if (p.M <= 0 || p.N <= 0) return;
  if (BWD && p.dbias != nullptr && (p.col_ws == nullptr || p.parts < 1 || p.parts > 65535))
    throw std::invalid_argument("bias_gelu_bwd: dbias needs col_ws (parts, N) with 1 <= parts <= 65535");
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  RF_DISPATCH_FLOAT(p.dtype, BWD ? "bias_gelu_bwd" : "bias_gelu_fwd", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    if (gelu_can_vec<scalar_t>(p, V, BWD)) {
      gelu_launch<scalar_t, V, BWD>(p, stream);
    } else {
      gelu_launch<scalar_t, 1, BWD>(p, stream);
    }
    if (BWD && p.dbias != nullptr) {
      RF_LAUNCH(ceil_div(p.N, 256), 256, 0, stream, bias_gelu_finalize_kernel<scalar_t>)(p);
      check_launch("bias_gelu_finalize_kernel");
    }
  });
}

}  // namespace

void bias_gelu_fwd(const BiasGeluParams& p, void* stream) { gelu_run<false>(p, stream); }
void bias_gelu_bwd(const BiasGeluParams& p, void* stream) { gelu_run<true>(p, stream); }

}  // namespace rf
