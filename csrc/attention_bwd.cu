// Launcher of the tensor-core attention backward (attention_bwd.cuh): padded and varlen layouts,
// fp16 / bf16, head_dim 32 / 64 / 128, with or without dropout (the forward's mask regenerated).
#include <string>

#include "attention_bwd.cuh"

namespace rf {
namespace {

void check_aligned(const char* name, const void* ptr, int64_t s0, int64_t s1, int64_t s2) {
  if (!aligned16(ptr) || s0 % 8 != 0 || s1 % 8 != 0 || s2 % 8 != 0)
    throw std::invalid_argument(std::string("attention_bwd: ") + name +
                                " must be 16-byte aligned with strides (except the last) multiples of 8");
}

template <typename T, int D, bool DROPOUT>
void launch(const AttnBwdParams& p, cudaStream_t stream) {
  using Tr = AttnBwdTraits<D>;
  const size_t smem = Tr::kSmemBytes;
  if (smem > 48 * 1024) {
    // above 48 KB a block must opt in (the attribute is per device: set it on every launch)
    cudaError_t err = cudaFuncSetAttribute(attention_bwd_kernel<T, D, DROPOUT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("roberta_fast._C: kernel attention_bwd_kernel: cudaFuncSetAttribute: ") +
                               cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
  const dim3 grid(ceil_div(p.seqlen, Tr::kBlockN), p.heads, p.batch);
  RF_LAUNCH(grid, Tr::kThreads, smem, stream, attention_bwd_kernel<T, D, DROPOUT>)(p);
  check_launch("attention_bwd_kernel");
}

}  // namespace

template <typename T, int D>
void launch_any(const AttnBwdParams& p, cudaStream_t stream) {
  if (p.dropout_p > 0.f) {
    launch<T, D, true>(p, stream);
  } else {  // exactly the kernel without dropout
    launch<T, D, false>(p, stream);
  }
}

void attention_bwd(const AttnBwdParams& params, void* stream_ptr) {
  AttnBwdParams p = params;
  dropout_setup("attention_bwd", p.dropout_p, p.rng, p.drop_threshold, p.drop_scale);
  if (p.batch < 0 || p.batch > 65535 || p.heads < 0 || p.heads > 65535)
    throw std::invalid_argument("attention_bwd: batch and heads must be in [0, 65535]");
  check_aligned("q", p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  check_aligned("k", p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  check_aligned("v", p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  check_aligned("dout", p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  check_aligned("dk", p.dk, p.g_batch_stride, p.g_row_stride, p.g_head_stride);
  check_aligned("dv", p.dv, p.g_batch_stride, p.g_row_stride, p.g_head_stride);
  if (p.seqlen <= 0 || p.batch == 0 || p.heads == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  RF_DISPATCH_HALF(p.dtype, "attention_bwd", [&] {
    switch (p.head_dim) {
      case 32: return launch_any<scalar_t, 32>(p, stream);
      case 64: return launch_any<scalar_t, 64>(p, stream);
      case 128: return launch_any<scalar_t, 128>(p, stream);
      default:
        throw std::invalid_argument("attention_bwd: head_dim must be 32, 64 or 128, got " +
                                    std::to_string(p.head_dim));
    }
  });
}

}  // namespace rf
