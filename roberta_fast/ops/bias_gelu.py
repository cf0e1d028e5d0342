"""bias_gelu: GELU(x + bias), exact erf (RoBERTa's) or the tanh approximation, with gradients for x
and bias. Kernel backends reach kernels/bias_gelu.py or cuda_ops/bias_gelu.py through a torch.library
custom op, so torch.compile and CUDA graphs see one opaque op with a fake implementation."""

import torch

from .. import backends, reference
from .._utils import dtype_name, unit_last_stride
from ..tuned import round_log2
from ._checks import (
    NONE,
    InferenceCache,
    bindable,
    check_param_dtype,
    check_same_device,
    check_shape,
    check_tensor,
    compiling,
    direct_call_ok,
    grad_on,
    modes,
    train_mode,
)

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
    if not compiling() and not grad_on() and not modes():  # inference: the call's cached function
        extra = (approximate, backend, bias is None)
        fn = _FAST.get(extra, x, NONE[0] if bias is None else bias)
        if fn is not None:
            return fn(x, bias, approximate)
        y = _bias_gelu(x, bias, approximate, backend)
        _FAST.add(extra, (x, NONE[0] if bias is None else bias), _bind_public(x, bias, approximate, backend))
        return y
    return _bias_gelu(x, bias, approximate, backend)


_FAST = InferenceCache()
_FAST_TRUSTED = InferenceCache()


def _bind_public(x, bias, approximate, backend):
    """The public op's cached inference function for calls of x's signature (any leading dims, rows viewed as
    (M, N) when x is contiguous), or None (such calls take the full path)."""
    if x.dim() == 2:
        return bind_inference(x, bias, approximate, backend)
    if x.dim() < 2 or not x.is_contiguous():
        return None
    shape, N = x.shape, x.shape[-1]
    fn = bind_inference(x.view(-1, N), bias, approximate, backend)
    if fn is None:
        return None

    def bias_gelu_rows(x, bias, approximate):
        return fn(x.view(-1, N), bias, approximate).view(shape)

    return bias_gelu_rows


def _bias_gelu(x, bias, approximate, backend):
    """The public op's full path: checks cached per signature, the cached choice, the custom op with autograd."""
    if not torch.compiler.is_compiling():
        try:  # the checks are cached per signature of the call
            sig = (x.shape, x.dtype, x.device, None if bias is None else (bias.shape, bias.dtype, bias.device),
                   approximate)
            ok = sig in _CHECKED
        except (AttributeError, TypeError):  # not tensors, or unhashable: the checks below say what is wrong
            ok = False
        if not ok:
            _check_args(x, bias, approximate)
            if len(_CHECKED) >= 4096:
                _CHECKED.clear()
            _CHECKED.add(sig)
        return _run(x, bias, approximate, backend)
    _check_args(x, bias, approximate)
    return _run_traced(x, bias, approximate, backend)


_CHECKED: set = set()  # call signatures that passed _check_args


def bias_gelu_trusted(x, bias, approximate="none", backend=None):
    """bias_gelu without the argument checks, for callers that guarantee them (the model, once per forward):
    the same arguments and result as `bias_gelu`, which must accept them. Bad arguments here give undefined
    errors instead of the named ones."""
    if not compiling() and not grad_on() and not modes():  # the inference cache, no checks
        extra = (approximate, backend, bias is None)
        fn = _FAST_TRUSTED.get(extra, x, NONE[0] if bias is None else bias)
        if fn is not None:
            return fn(x, bias, approximate)
        y = _run(x, bias, approximate, backend)
        _FAST_TRUSTED.add(extra, (x, NONE[0] if bias is None else bias), _bind_public(x, bias, approximate, backend))
        return y
    if torch.compiler.is_compiling():
        return _run_traced(x, bias, approximate, backend)
    return _run(x, bias, approximate, backend)


def _check_args(x, bias, approximate):
    check_tensor(_OP, "x", x, ndim_min=1)
    if bias is not None:
        check_tensor(_OP, "bias", bias)
    if not isinstance(approximate, str) or approximate not in _APPROX:
        raise ValueError(f"{_OP}: approximate must be one of {_APPROX}, got {approximate!r}")
    check_same_device(_OP, x=x, bias=bias)
    check_param_dtype(_OP, "bias", bias, x)
    if bias is not None:
        check_shape(_OP, "bias", bias, (x.shape[-1],))


def _run(x, bias, approximate, backend):
    """The lean path (checked arguments, eager): cached backend choice; in inference the backend's forward
    is called directly, with autograd the custom op is."""
    shape = x.shape
    N = shape[-1]
    M = shape[0] if len(shape) == 2 else (x.numel() // N if N else 0)
    train = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))

    def unsupported(b):
        return backends.implementation(b, _OP).unsupported(x, bias, approximate)

    # what the choice depends on: x's dtype (the backends' unsupported), the bucket of (M, N, dtype) (the
    # tuned table); bias's dtype and approximate too, for backends that may look at them
    sig = (x.dtype, N, round_log2(M), None if bias is None else bias.dtype, approximate)
    b, mod = backends.choose(_OP, backend, x.device, sig, "train" if train else "fwd", unsupported=unsupported,
                             tune_key=(M, N, x.dtype))
    if mod is None or M == 0:
        return reference.bias_gelu(x, bias, approximate)
    x2 = x if len(shape) == 2 and x.is_contiguous() else unit_last_stride(x.reshape(-1, N))  # (M, N) rows
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if not train and direct_call_ok(x):  # inference: the backend directly, no custom-op dispatch
        y = mod.forward(x2, bias, approximate)
    else:
        y = _fwd(x2, bias, approximate, b)
    return y if x2 is x else y.view(shape)


def _run_traced(x, bias, approximate, backend):
    """Under torch.compile: the uncached registry and always the custom op (one opaque node in the graph)."""
    N = x.shape[-1]

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


def bind_inference(x, bias, approximate="none", backend=None):
    """For many inference calls of ONE signature (see layer_norm.bind_inference): x (M, N) contiguous rows, bias
    contiguous or None. Returns fn(x, bias, approximate) -> y, the kernel backend's forward called directly, or
    None where such calls must take bias_gelu_trusted."""
    if not bindable(x) or x.dim() != 2 or not x.is_contiguous() or x.shape[0] == 0:
        return None
    if bias is not None and not bias.is_contiguous():
        return None
    M, N = x.shape

    def unsupported(b):
        return backends.implementation(b, _OP).unsupported(x, bias, approximate)

    sig = (x.dtype, N, round_log2(M), None if bias is None else bias.dtype, approximate)
    _, mod = backends.choose(_OP, backend, x.device, sig, "fwd", unsupported=unsupported, tune_key=(M, N, x.dtype))
    return None if mod is None else mod.forward
