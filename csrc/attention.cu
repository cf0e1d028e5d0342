// Launcher of the tensor-core attention forward (attention.cuh): padded and varlen layouts,
// fp16 / bf16, head_dim 32 / 64 / 128, with or without dropout on the probabilities.
#include <string>

#include "attention.cuh"

namespace rf {
namespace {

template <int D, typename F>
void with_head_dim_impl(F&& f) {
  f(std::integral_constant<int, D>{});
}

template <typename F>
void with_head_dim(int d, F&& f) {
  switch (d) {
    case 32: return with_head_dim_impl<32>(f);
    case 64: return with_head_dim_impl<64>(f);
    case 128: return with_head_dim_impl<128>(f);
    default: throw std::invalid_argument("attention_fwd: head_dim must be 32, 64 or 128, got " + std::to_string(d));
  }
}

// cp.async and the output stores move 16 bytes (8 elements) at a time.
void check_aligned(const char* name, const void* ptr, int64_t s0, int64_t s1, int64_t s2) {
  if (!aligned16(ptr) || s0 % 8 != 0 || s1 % 8 != 0 || s2 % 8 != 0)
    throw std::invalid_argument(std::string("attention_fwd: ") + name +
                                " must be 16-byte aligned with strides (except the last) multiples of 8");
}

}  // namespace

void attention_fwd(const AttnFwdParams& params, void* stream_ptr) {
  AttnFwdParams p = params;
  dropout_setup("attention_fwd", p.dropout_p, p.rng, p.drop_threshold, p.drop_scale);
  if (p.batch < 0 || p.batch > 65535 || p.heads < 0 || p.heads > 65535)
    throw std::invalid_argument("attention_fwd: batch and heads must be in [0, 65535]");
  check_aligned("q", p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  check_aligned("k", p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  check_aligned("v", p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  check_aligned("o", p.o, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  RF_DISPATCH_HALF(p.dtype, "attention_fwd", [&] {
    with_head_dim(p.head_dim, [&](auto d) {
      constexpr int D = decltype(d)::value;
      using Tr = AttnTraits<D>;
      if (p.seqlen > 0 && p.batch > 0 && p.heads > 0) {
        const dim3 grid(ceil_div(p.seqlen, Tr::kBlockM), p.heads, p.batch);
        if (p.dropout_p > 0.f) {
          RF_LAUNCH(grid, Tr::kThreads, 0, stream, attention_fwd_kernel<scalar_t, D, true>)(p);
        } else {  // exactly the kernel without dropout
          RF_LAUNCH(grid, Tr::kThreads, 0, stream, attention_fwd_kernel<scalar_t, D, false>)(p);
        }
        check_launch("attention_fwd_kernel");
      }
      if (p.cu_seqlens != nullptr && p.total_rows > 0) {
        RF_LAUNCH(128, 256, 0, stream, attention_varlen_tail_kernel<scalar_t>)(p);
        check_launch("attention_varlen_tail_kernel");
      }
    });
  });
}

}  // namespace rf
