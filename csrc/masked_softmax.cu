// Launchers of the masked softmax kernels (masked_softmax.cuh).
#include "masked_softmax.cuh"

namespace rf {
namespace {

constexpr size_t kSmemBudget = 47 * 1024;

// One warp per row up to 128 chunks (K <= 1024 in fp16), else 8 warps per row. `floats_per_elem`
// is how many fp32 values per element the kernel caches (1 forward, 2 backward).
template <typename F>
void with_row_config(int64_t K, int64_t chunks, int floats_per_elem, F&& f) {
  if (chunks <= 128) {
    f(std::integral_constant<int, 1>{}, std::true_type{});  // 4 rows * 1024 * 2 floats = 32 KB at most
  } else if (static_cast<size_t>(K) * floats_per_elem * sizeof(float) <= kSmemBudget) {
    f(std::integral_constant<int, 8>{}, std::true_type{});
  } else {
    f(std::integral_constant<int, 8>{}, std::false_type{});
  }
}

template <typename T, int VEC>
void sm_fwd(const SoftmaxFwdParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.H * p.Q;
  with_row_config(p.K, p.K / VEC, 1, [&](auto w, auto c) {
    constexpr int WARPS = decltype(w)::value;
    constexpr bool CACHE = decltype(c)::value;
    using L = RowLayout<WARPS>;
    const size_t smem = CACHE ? L::kRows * p.K * sizeof(float) : 0;
    RF_LAUNCH(ceil_div(rows, L::kRows), L::kThreads, smem, stream,
              masked_softmax_fwd_kernel<T, VEC, WARPS, CACHE>)(p);
    check_launch("masked_softmax_fwd_kernel");
  });
}

template <typename T, int VEC>
void sm_bwd(const SoftmaxBwdParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.H * p.Q;
  with_row_config(p.K, p.K / VEC, 2, [&](auto w, auto c) {
    constexpr int WARPS = decltype(w)::value;
    constexpr bool CACHE = decltype(c)::value;
    using L = RowLayout<WARPS>;
    const size_t smem = CACHE ? L::kRows * 2 * p.K * sizeof(float) : 0;
    RF_LAUNCH(ceil_div(rows, L::kRows), L::kThreads, smem, stream,
              masked_softmax_bwd_kernel<T, VEC, WARPS, CACHE>)(p);
    check_launch("masked_softmax_bwd_kernel");
  });
}

}  // namespace

void masked_softmax_fwd(const SoftmaxFwdParams& p, void* stream_ptr) {
  if (p.B * p.H * p.Q <= 0 || p.K <= 0) return;
  if (p.mask != nullptr && p.mask_dtype != kBool && p.mask_dtype != kF16 && p.mask_dtype != kBF16 &&
      p.mask_dtype != kF32 && p.mask_dtype != kF64)
    throw std::invalid_argument("masked_softmax_fwd: unsupported mask dtype code " + std::to_string(p.mask_dtype));
  if (p.mask != nullptr && p.m_strides[3] != 0 && p.m_strides[3] != 1)
    throw std::invalid_argument("masked_softmax_fwd: the mask's last stride must be 0 or 1");
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  RF_DISPATCH_FLOAT(p.dtype, "masked_softmax_fwd", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    const bool vec = p.K % V == 0 && aligned16(p.scores) && aligned16(p.probs) && p.s_strides[0] % V == 0 &&
                     p.s_strides[1] % V == 0 && p.s_strides[2] % V == 0;
    if (vec) {
      sm_fwd<scalar_t, V>(p, stream);
    } else {
      sm_fwd<scalar_t, 1>(p, stream);
    }
  });
}

void masked_softmax_bwd(const SoftmaxBwdParams& p, void* stream_ptr) {
  if (p.B * p.H * p.Q <= 0 || p.K <= 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  RF_DISPATCH_FLOAT(p.dtype, "masked_softmax_bwd", [&] {
    constexpr int V = 16 / sizeof(scalar_t);
    bool vec = p.K % V == 0 && aligned16(p.dprobs) && aligned16(p.probs) && aligned16(p.dscores);
    for (int i = 0; i < 3; ++i) vec = vec && p.dp_strides[i] % V == 0 && p.p_strides[i] % V == 0;
    if (vec) {
      sm_bwd<scalar_t, V>(p, stream);
    } else {
      sm_bwd<scalar_t, 1>(p, stream);
    }
  });
}

}  // namespace rf
