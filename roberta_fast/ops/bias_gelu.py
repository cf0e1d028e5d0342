"""bias_gelu: GELU(x + bias), exact erf (RoBERTa's) or the tanh approximation, with gradients for x
and bias. Kernel backends reach kernels/bias_gelu.py or cuda_ops/bias_gelu.py through a torch.library
custom op, so torch.compile and CUDA graphs see one opaque op with a fake implementation."""

import torch

from .. import backends, reference
from .._utils import dtype_name, unit_last_stride
from ._checks import check_param_dtype, check_same_device, check_shape, check_tensor, train_mode

_OP = "bias_gelu"
_APPROX = ("none", "tanh")


@torch.library.custom_op(
    "roberta_fast::bias_gelu_fwd", mutates_args=(),
    schema="(Tensor x, Tensor? bias, str approximate, str backend) -> Tensor",
)
def _fwd(x, bias, approximate, backend):
    return backends.implementation(backend, _OP).forward(x, bias, approximate)


@_fwd.register_fake
def _fwd_fake(x, bias, approximate, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op(
    "roberta_fast::bias_gelu_bwd", mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor? bias, str approximate, str backend) -> Tensor[]",
)
def _bwd(dy, x, bias, approximate, backend):
    dx, dbias = backends.implementation(backend, _OP).backward(dy, x, bias, approximate)
    return [dx] if bias is None else [dx, dbias]


@_bwd.register_fake
def _bwd_fake(dy, x, bias, approximate, backend):
    dx = x.new_empty(x.shape)
    return [dx] if bias is None else [dx, bias.new_empty(bias.shape)]


def _setup_context(ctx, inputs, output):
    x, bias, approximate, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate, ctx.backend = approximate, backend


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dy = unit_last_stride(dy)
    grads = _bwd(dy, x, bias, ctx.approximate, ctx.backend)
    return grads[0], (grads[1] if bias is not None else None), None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def bias_gelu(x, bias, approximate="none", *, backend=None):
    """GELU(x + bias) over the last dim of x, with gradients for x and bias.

    x            (..., N) float16 / bfloat16 / float32, any number of leading dims, any strides
    bias         (N,) of x's dtype or float32, or None (plain GELU)
    approximate  "none" (exact erf, RoBERTa's and BERT's) or "tanh"
    backend      None (automatic), "torch", "triton" or "cuda"
    returns      (..., N) x's dtype (contiguous on the kernel backends); the math runs in float32.
                 x's gradient has x's dtype, bias's gradient has bias's dtype.
    """
    check_tensor(_OP, "x", x, ndim_min=1)
    if bias is not None:
        check_tensor(_OP, "bias", bias)
    if not isinstance(approximate, str) or approximate not in _APPROX:
        raise ValueError(f"{_OP}: approximate must be one of {_APPROX}, got {approximate!r}")
    check_same_device(_OP, x=x, bias=bias)
    check_param_dtype(_OP, "bias", bias, x)
    N = x.shape[-1]
    if bias is not None:
        check_shape(_OP, "bias", bias, (N,))

    def unsupported(b):
        return backends.implementation(b, _OP).unsupported(x, bias, approximate)

    b = backends.resolve(_OP, backend, x.device, unsupported=unsupported,
                         tune_key=(x.numel() // max(N, 1), N, dtype_name(x.dtype)), mode=train_mode(x, bias))
    if b == "torch" or x.numel() == 0:
        return reference.bias_gelu(x, bias, approximate)
    x2 = unit_last_stride(x.reshape(-1, N))  # (M, N), a view when the leading dims allow it
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    return _fwd(x2, bias, approximate, b).view(x.shape)
