"""bias_gelu: GELU(x + bias), exact erf (RoBERTa's) or the tanh approximation, with gradients for x
and bias. Kernel backends reach kernels/gelu.py or cuda_ops/gelu.py through a torch.library custom
op, so torch.compile and CUDA graphs see one opaque op with a fake implementation."""

import torch

from .. import reference
from . import _dispatch

_OP = "bias_gelu"
_APPROX = ("none", "tanh")


@torch.library.custom_op(
    "roberta_fast::bias_gelu_fwd", mutates_args=(),
    schema="(Tensor x, Tensor? bias, str approximate, str backend) -> Tensor",
)
def _fwd(x, bias, approximate, backend):
    return _dispatch.kernel_module(backend, "gelu").bias_gelu_fwd(x, bias, approximate)


@_fwd.register_fake
def _fwd_fake(x, bias, approximate, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op(
    "roberta_fast::bias_gelu_bwd", mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor? bias, str approximate, str backend) -> Tensor[]",
)
def _bwd(dy, x, bias, approximate, backend):
    dx, dbias = _dispatch.kernel_module(backend, "gelu").bias_gelu_bwd(dy, x, bias, approximate)
    return [dx] if bias is None else [dx, dbias]


@_bwd.register_fake
def _bwd_fake(dy, x, bias, approximate, backend):
    dx = x.new_empty(x.shape)
    return [dx] if bias is None else [dx, bias.new_empty(bias.shape)]


def _unit_last_stride(t):
    """t with stride(-1) == 1, as the kernels' row layout wants: a view where the last dim has size 1."""
    if t.stride(-1) == 1:
        return t
    if t.shape[-1] == 1:
        return t.as_strided(t.shape, (*t.stride()[:-1], 1))
    return t.contiguous()


def _setup_context(ctx, inputs, output):
    x, bias, approximate, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate, ctx.backend = approximate, backend


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dy = _unit_last_stride(dy)
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
    _dispatch.check_tensor(_OP, "x", x, ndim_min=1)
    if bias is not None:
        _dispatch.check_tensor(_OP, "bias", bias)
    if not isinstance(approximate, str) or approximate not in _APPROX:
        raise ValueError(f"{_OP}: approximate must be one of {_APPROX}, got {approximate!r}")
    _dispatch.check_same_device(_OP, x=x, bias=bias)
    _dispatch.check_param_dtype(_OP, "bias", bias, x)
    N = x.shape[-1]
    if bias is not None:
        _dispatch.check_shape(_OP, "bias", bias, (N,))

    def supports(b):
        return _dispatch.check_backend_dtype(_OP, b, "x", x)

    b = _dispatch.resolve_backend(_OP, backend, x.device, supports=supports,
                                  tune_key=(x.numel() // max(N, 1), N, str(x.dtype).replace("torch.", "")))
    if b == "torch" or x.numel() == 0:
        return reference.bias_gelu(x, bias, approximate)
    x2 = _unit_last_stride(x.reshape(-1, N))  # (M, N), a view when the leading dims allow it
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    return _fwd(x2, bias, approximate, b).view(x.shape)
