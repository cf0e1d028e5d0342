// roberta_fast._C: pybind11 bindings of the CUDA launchers in ops.h.
//
// The same file builds roberta_fast._C_emu (RF_EMULATE: csrc/ compiled by the host compiler against
// the emulation layer in csrc/emu/): the same functions, arguments and DTYPES, taking CPU pointers,
// plus the submodule `emu` (schedules, counters, self-test kernels; csrc/emu/module.cpp).
//
// Device pointers are Python ints (tensor.data_ptr(); 0 = absent), sizes and strides are in
// elements, `stream` is torch.cuda.current_stream().cuda_stream. The GIL is released around
// every launch; a launch failure raises RuntimeError naming the kernel and the CUDA error, a bad
// argument ValueError. Built by the host compiler only: no CUDA or torch headers here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "ops.h"

namespace py = pybind11;

#ifdef RF_EMULATE
#define RF_MODULE _C_emu
namespace rf_emu {
void bind(py::module_& emu);  // csrc/emu/module.cpp
}
#else
#define RF_MODULE _C
#endif

namespace {

const void* cptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mptr(uintptr_t p) { return reinterpret_cast<void*>(p); }
float* fptr(uintptr_t p) { return reinterpret_cast<float*>(p); }
const int64_t* i64ptr(uintptr_t p) { return reinterpret_cast<const int64_t*>(p); }
void* sptr(uintptr_t s) { return reinterpret_cast<void*>(s); }

using GilFree = py::call_guard<py::gil_scoped_release>;

}  // namespace

PYBIND11_MODULE(RF_MODULE, m) {
#ifdef RF_EMULATE
  m.doc() = "roberta_fast CUDA C++ kernels (csrc/) run on the host through the emulation layer (csrc/emu/): "
            "CPU pointers, sizes and strides; the stream is ignored";
  py::module_ emu = m.def_submodule("emu", "the emulation runtime: schedules, counters, self-test kernels");
  rf_emu::bind(emu);
#else
  m.doc() = "roberta_fast CUDA C++ kernels (csrc/): raw device pointers, sizes, strides and a CUDA stream";
#endif

  py::dict dtypes;
  dtypes["float16"] = static_cast<int>(rf::kF16);
  dtypes["bfloat16"] = static_cast<int>(rf::kBF16);
  dtypes["float32"] = static_cast<int>(rf::kF32);
  dtypes["float64"] = static_cast<int>(rf::kF64);
  dtypes["bool"] = static_cast<int>(rf::kBool);
  m.attr("DTYPES") = dtypes;

  m.def(
      "layer_norm_fwd",
      [](uintptr_t x, int64_t x_stride, uintptr_t residual, int64_t res_stride, uintptr_t x_bias, bool x_bias_f32,
         uintptr_t weight, bool weight_f32, uintptr_t bias, bool bias_f32, uintptr_t y, uintptr_t mean,
         uintptr_t rstd, int64_t M, int64_t N, double eps, int dtype, double dropout_p, uintptr_t rng,
         uintptr_t stream) {
        rf::LayerNormFwdParams p{};
        p.x = cptr(x), p.x_stride = x_stride, p.residual = cptr(residual), p.res_stride = res_stride;
        p.x_bias = cptr(x_bias), p.weight = cptr(weight), p.bias = cptr(bias);
        p.x_bias_f32 = x_bias_f32, p.weight_f32 = weight_f32, p.bias_f32 = bias_f32;
        p.y = mptr(y), p.mean = fptr(mean), p.rstd = fptr(rstd);
        p.M = M, p.N = N, p.eps = static_cast<float>(eps), p.dtype = dtype;
        p.dropout_p = static_cast<float>(dropout_p), p.rng = i64ptr(rng);
        rf::layer_norm_fwd(p, sptr(stream));
      },
      "y, mean, rstd = LayerNorm(dropout(x + x_bias) + residual) over rows of N; rng: int64 (seed, offset) on the "
      "device, 0 when dropout_p == 0",
      py::arg("x"), py::arg("x_stride"), py::arg("residual"), py::arg("res_stride"), py::arg("x_bias"),
      py::arg("x_bias_f32"), py::arg("weight"), py::arg("weight_f32"), py::arg("bias"), py::arg("bias_f32"),
      py::arg("y"), py::arg("mean"), py::arg("rstd"), py::arg("M"), py::arg("N"), py::arg("eps"), py::arg("dtype"),
      py::arg("dropout_p"), py::arg("rng"), py::arg("stream"), GilFree());

  m.def(
      "layer_norm_bwd",
      [](uintptr_t dy, int64_t dy_stride, uintptr_t x, int64_t x_stride, uintptr_t residual, int64_t res_stride,
         uintptr_t x_bias, bool x_bias_f32, uintptr_t weight, bool weight_f32, uintptr_t mean, uintptr_t rstd,
         uintptr_t dx, uintptr_t row_ws, uintptr_t col_ws, uintptr_t dweight, bool dweight_f32, uintptr_t dbias,
         bool dbias_f32, uintptr_t dx_bias, bool dx_bias_f32, uintptr_t dresidual, int64_t M, int64_t N, int parts,
         int dtype, double dropout_p, uintptr_t rng, uintptr_t stream) {
        rf::LayerNormBwdParams p{};
        p.dy = cptr(dy), p.dy_stride = dy_stride, p.x = cptr(x), p.x_stride = x_stride;
        p.residual = cptr(residual), p.res_stride = res_stride;
        p.x_bias = cptr(x_bias), p.x_bias_f32 = x_bias_f32, p.weight = cptr(weight), p.weight_f32 = weight_f32;
        p.mean = static_cast<const float*>(cptr(mean)), p.rstd = static_cast<const float*>(cptr(rstd));
        p.dx = mptr(dx), p.row_ws = fptr(row_ws), p.col_ws = fptr(col_ws);
        p.dweight = mptr(dweight), p.dweight_f32 = dweight_f32, p.dbias = mptr(dbias), p.dbias_f32 = dbias_f32;
        p.dx_bias = mptr(dx_bias), p.dx_bias_f32 = dx_bias_f32;
        p.M = M, p.N = N, p.parts = parts, p.dtype = dtype;
        p.dresidual = mptr(dresidual), p.dropout_p = static_cast<float>(dropout_p), p.rng = i64ptr(rng);
        rf::layer_norm_bwd(p, sptr(stream));
      },
      "dx (and dweight, dbias, dx_bias through fp32 partial column sums) of the fused LayerNorm; with dropout, "
      "dresidual (or 0) gets dL/dh and dx = dh * mask / (1 - p)",
      py::arg("dy"), py::arg("dy_stride"), py::arg("x"), py::arg("x_stride"), py::arg("residual"),
      py::arg("res_stride"), py::arg("x_bias"), py::arg("x_bias_f32"), py::arg("weight"), py::arg("weight_f32"),
      py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("row_ws"), py::arg("col_ws"), py::arg("dweight"),
      py::arg("dweight_f32"), py::arg("dbias"), py::arg("dbias_f32"), py::arg("dx_bias"), py::arg("dx_bias_f32"),
      py::arg("dresidual"), py::arg("M"), py::arg("N"), py::arg("parts"), py::arg("dtype"), py::arg("dropout_p"),
      py::arg("rng"), py::arg("stream"), GilFree());

  auto gelu_params = [](uintptr_t x, int64_t x_stride, uintptr_t dy, int64_t dy_stride, uintptr_t bias,
                        bool bias_f32, uintptr_t out, uintptr_t col_ws, uintptr_t dbias, int64_t M, int64_t N,
                        int parts, int approximate, int dtype) {
    rf::BiasGeluParams p{};
    p.x = cptr(x), p.x_stride = x_stride, p.dy = cptr(dy), p.dy_stride = dy_stride;
    p.bias = cptr(bias), p.bias_f32 = bias_f32, p.out = mptr(out), p.col_ws = fptr(col_ws), p.dbias = mptr(dbias);
    p.M = M, p.N = N, p.parts = parts, p.approximate = approximate, p.dtype = dtype;
    return p;
  };
  m.def(
      "bias_gelu_fwd",
      [gelu_params](uintptr_t x, int64_t x_stride, uintptr_t bias, bool bias_f32, uintptr_t y, int64_t M, int64_t N,
                    int approximate, int dtype, uintptr_t stream) {
        rf::bias_gelu_fwd(gelu_params(x, x_stride, 0, 0, bias, bias_f32, y, 0, 0, M, N, 1, approximate, dtype),
                          sptr(stream));
      },
      "y = GELU(x + bias); approximate 0 = erf, 1 = tanh", py::arg("x"), py::arg("x_stride"), py::arg("bias"),
      py::arg("bias_f32"), py::arg("y"), py::arg("M"), py::arg("N"), py::arg("approximate"), py::arg("dtype"),
      py::arg("stream"), GilFree());
  m.def(
      "bias_gelu_bwd",
      [gelu_params](uintptr_t dy, int64_t dy_stride, uintptr_t x, int64_t x_stride, uintptr_t bias, bool bias_f32,
                    uintptr_t dx, uintptr_t col_ws, uintptr_t dbias, int64_t M, int64_t N, int parts,
                    int approximate, int dtype, uintptr_t stream) {
        rf::bias_gelu_bwd(
            gelu_params(x, x_stride, dy, dy_stride, bias, bias_f32, dx, col_ws, dbias, M, N, parts, approximate, dtype),
            sptr(stream));
      },
      "dx = dy * GELU'(x + bias); dbias (bias's dtype) = dx summed over rows via col_ws (parts, N) fp32",
      py::arg("dy"), py::arg("dy_stride"), py::arg("x"), py::arg("x_stride"), py::arg("bias"), py::arg("bias_f32"),
      py::arg("dx"), py::arg("col_ws"), py::arg("dbias"), py::arg("M"), py::arg("N"), py::arg("parts"),
      py::arg("approximate"), py::arg("dtype"), py::arg("stream"), GilFree());

  m.def(
      "masked_softmax_fwd",
      [](uintptr_t scores, std::array<int64_t, 3> s_strides, uintptr_t mask, std::array<int64_t, 4> m_strides,
         int mask_dtype, uintptr_t probs, int64_t B, int64_t H, int64_t Q, int64_t K, double scale, int dtype,
         uintptr_t stream) {
        rf::SoftmaxFwdParams p{};
        p.scores = cptr(scores), p.mask = cptr(mask), p.mask_dtype = mask_dtype, p.probs = mptr(probs);
        for (int i = 0; i < 3; ++i) p.s_strides[i] = s_strides[i];
        for (int i = 0; i < 4; ++i) p.m_strides[i] = m_strides[i];
        p.B = B, p.H = H, p.Q = Q, p.K = K, p.scale = static_cast<float>(scale), p.dtype = dtype;
        rf::masked_softmax_fwd(p, sptr(stream));
      },
      "probs = softmax(scale * scores + mask) over the last dim of (B, H, Q, K)", py::arg("scores"),
      py::arg("s_strides"), py::arg("mask"), py::arg("m_strides"), py::arg("mask_dtype"), py::arg("probs"),
      py::arg("B"), py::arg("H"), py::arg("Q"), py::arg("K"), py::arg("scale"), py::arg("dtype"), py::arg("stream"),
      GilFree());
  m.def(
      "masked_softmax_bwd",
      [](uintptr_t dprobs, std::array<int64_t, 3> dp_strides, uintptr_t probs, std::array<int64_t, 3> p_strides,
         uintptr_t dscores, int64_t B, int64_t H, int64_t Q, int64_t K, double scale, int dtype, uintptr_t stream) {
        rf::SoftmaxBwdParams p{};
        p.dprobs = cptr(dprobs), p.probs = cptr(probs), p.dscores = mptr(dscores);
        for (int i = 0; i < 3; ++i) {
          p.dp_strides[i] = dp_strides[i];
          p.p_strides[i] = p_strides[i];
        }
        p.B = B, p.H = H, p.Q = Q, p.K = K, p.scale = static_cast<float>(scale), p.dtype = dtype;
        rf::masked_softmax_bwd(p, sptr(stream));
      },
      "dscores = scale * probs * (dprobs - sum(dprobs * probs, -1))", py::arg("dprobs"), py::arg("dp_strides"),
      py::arg("probs"), py::arg("p_strides"), py::arg("dscores"), py::arg("B"), py::arg("H"), py::arg("Q"),
      py::arg("K"), py::arg("scale"), py::arg("dtype"), py::arg("stream"), GilFree());

  m.def(
      "attention_fwd",
      [](uintptr_t q, std::array<int64_t, 3> q_strides, uintptr_t k, std::array<int64_t, 3> k_strides, uintptr_t v,
         std::array<int64_t, 3> v_strides, uintptr_t o, std::array<int64_t, 3> o_strides, uintptr_t lse,
         int64_t lse_batch_stride, int64_t lse_head_stride, uintptr_t key_padding_mask, int64_t mask_batch_stride,
         uintptr_t cu_seqlens, int64_t total_rows, int batch, int heads, int seqlen, int head_dim, double scale,
         int dtype, double dropout_p, uintptr_t rng, uintptr_t stream) {
        rf::AttnFwdParams p{};
        p.q = cptr(q), p.k = cptr(k), p.v = cptr(v), p.o = mptr(o), p.lse = fptr(lse);
        p.q_batch_stride = q_strides[0], p.q_row_stride = q_strides[1], p.q_head_stride = q_strides[2];
        p.k_batch_stride = k_strides[0], p.k_row_stride = k_strides[1], p.k_head_stride = k_strides[2];
        p.v_batch_stride = v_strides[0], p.v_row_stride = v_strides[1], p.v_head_stride = v_strides[2];
        p.o_batch_stride = o_strides[0], p.o_row_stride = o_strides[1], p.o_head_stride = o_strides[2];
        p.lse_batch_stride = lse_batch_stride, p.lse_head_stride = lse_head_stride;
        p.key_padding_mask = static_cast<const uint8_t*>(cptr(key_padding_mask));
        p.mask_batch_stride = mask_batch_stride;
        p.cu_seqlens = static_cast<const int*>(cptr(cu_seqlens)), p.total_rows = total_rows;
        p.batch = batch, p.heads = heads, p.seqlen = seqlen, p.head_dim = head_dim;
        p.scale = static_cast<float>(scale), p.dtype = dtype;
        p.dropout_p = static_cast<float>(dropout_p), p.rng = i64ptr(rng);
        rf::attention_fwd(p, sptr(stream));
      },
      "o, lse = dropout(softmax(scale * q k^T)) v, lse undropped; strides are (batch, row, head) triples, batch 0 "
      "for varlen; rng: int64 (seed, offset) on the device, 0 when dropout_p == 0",
      py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"), py::arg("v"), py::arg("v_strides"),
      py::arg("o"), py::arg("o_strides"), py::arg("lse"), py::arg("lse_batch_stride"), py::arg("lse_head_stride"),
      py::arg("key_padding_mask"), py::arg("mask_batch_stride"), py::arg("cu_seqlens"), py::arg("total_rows"),
      py::arg("batch"), py::arg("heads"), py::arg("seqlen"), py::arg("head_dim"), py::arg("scale"), py::arg("dtype"),
      py::arg("dropout_p"), py::arg("rng"), py::arg("stream"), GilFree());

  m.def(
      "attention_bwd",
      [](uintptr_t q, std::array<int64_t, 3> q_strides, uintptr_t k, std::array<int64_t, 3> k_strides, uintptr_t v,
         std::array<int64_t, 3> v_strides, uintptr_t dout, std::array<int64_t, 3> do_strides, uintptr_t lse,
         uintptr_t delta, int64_t lse_batch_stride, int64_t lse_head_stride, uintptr_t dq_accum, uintptr_t dk,
         uintptr_t dv, std::array<int64_t, 3> g_strides, uintptr_t key_padding_mask, int64_t mask_batch_stride,
         uintptr_t cu_seqlens, int batch, int heads, int seqlen, int head_dim, double scale, int dtype,
         double dropout_p, uintptr_t rng, uintptr_t stream) {
        rf::AttnBwdParams p{};
        p.q = cptr(q), p.k = cptr(k), p.v = cptr(v), p.dout = cptr(dout);
        p.q_batch_stride = q_strides[0], p.q_row_stride = q_strides[1], p.q_head_stride = q_strides[2];
        p.k_batch_stride = k_strides[0], p.k_row_stride = k_strides[1], p.k_head_stride = k_strides[2];
        p.v_batch_stride = v_strides[0], p.v_row_stride = v_strides[1], p.v_head_stride = v_strides[2];
        p.do_batch_stride = do_strides[0], p.do_row_stride = do_strides[1], p.do_head_stride = do_strides[2];
        p.lse = static_cast<const float*>(cptr(lse)), p.delta = static_cast<const float*>(cptr(delta));
        p.lse_batch_stride = lse_batch_stride, p.lse_head_stride = lse_head_stride;
        p.dq_accum = fptr(dq_accum), p.dk = mptr(dk), p.dv = mptr(dv);
        p.g_batch_stride = g_strides[0], p.g_row_stride = g_strides[1], p.g_head_stride = g_strides[2];
        p.key_padding_mask = static_cast<const uint8_t*>(cptr(key_padding_mask));
        p.mask_batch_stride = mask_batch_stride, p.cu_seqlens = static_cast<const int*>(cptr(cu_seqlens));
        p.batch = batch, p.heads = heads, p.seqlen = seqlen, p.head_dim = head_dim;
        p.scale = static_cast<float>(scale), p.dtype = dtype;
        p.dropout_p = static_cast<float>(dropout_p), p.rng = i64ptr(rng);
        rf::attention_bwd(p, sptr(stream));
      },
      "dq (added into the zeroed fp32 dq_accum), dk, dv of attention_fwd; delta = rowsum(dout * o) in lse's layout; "
      "the forward's dropout_p and rng (its mask regenerated)",
      py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"), py::arg("v"), py::arg("v_strides"),
      py::arg("dout"), py::arg("do_strides"), py::arg("lse"), py::arg("delta"), py::arg("lse_batch_stride"),
      py::arg("lse_head_stride"), py::arg("dq_accum"), py::arg("dk"), py::arg("dv"), py::arg("g_strides"),
      py::arg("key_padding_mask"), py::arg("mask_batch_stride"), py::arg("cu_seqlens"), py::arg("batch"),
      py::arg("heads"), py::arg("seqlen"), py::arg("head_dim"), py::arg("scale"), py::arg("dtype"),
      py::arg("dropout_p"), py::arg("rng"), py::arg("stream"), GilFree());

  m.attr("KERNELS") = py::make_tuple("layer_norm_fwd", "layer_norm_bwd", "bias_gelu_fwd", "bias_gelu_bwd",
                                     "masked_softmax_fwd", "masked_softmax_bwd", "attention_fwd", "attention_bwd");
}
