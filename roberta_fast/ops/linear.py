"""linear: Y = act(X W^T + b) [+ residual], the GEMM with its elementwise work (bias, GELU, residual add) fused
into one op, forward and backward.

Backends (`backend=`):
  "torch"     this file, `TorchBackend`: F.linear (cuBLAS / MKL addmm with the bias) then the GELU and the residual
              add in place where autograd allows; plain differentiable torch (the CPU path and the oracle)
  "triton"    kernels/linear.py: a tiled Triton GEMM, fp32 accumulate, the bias + GELU (erf or tanh) + residual
              epilogue in registers and one store (two in training: y and the pre-activation)
  "cublaslt"  this file, `CublasLtBackend`: torch._addmm_activation(bias, x, w^T, use_gelu=True), on CUDA
              cuBLASLt's GEMM with its bias+GELU epilogue, which is the TANH approximation; the residual is added
              afterwards. Offered for activation "gelu_tanh" and None; for "gelu" (exact erf) only behind the
              opt-in ROBERTA_FAST_LINEAR_CUBLASLT_ERF=1 (its output then differs from exact erf by the tanh-vs-erf
              difference: max |gelu_erf - gelu_tanh| = 4.7e-4 in float64 (at x = +-2.70); in float16 the two
              rounded results differ by at most 1 ulp of the output, 1.95e-3 for outputs in [2, 4), measured on
              CPU over a 2^20-sample N(0, 1.5^2) pre-activation and a dense grid of [-8, 8]). On CPU tensors
              torch._addmm_activation applies the exact-erf GELU (aten's CPU kernel calls gelu_ without an
              approximation), so there this backend computes addmm + tanh GELU explicitly: the same semantics
              on every device.
  "cuda"      no CUDA C++ kernel for this op: `unsupported` says so (a named call raises, the automatic choice
              skips it).
The automatic choice (backend=None) stays "torch" (cuBLAS + separate elementwise) on every device until a GPU
has been tuned (`roberta-fast tune`); docs/tuning.md says how the tuner picks among the three.

The backward (every backend): dZ = dY * gelu'(pre), dX = dZ W, dW = dZ^T X, db = sum_rows dZ, dresidual = dY.
gelu'(pre) is computed from the SAVED pre-activation pre = X W^T + b (x's dtype, (M, N)), not by recomputing
X W^T: recomputing costs a third GEMM (2 M N K FLOPs, +50% on the backward's two), while saving costs one
(M, N) store in the forward and one read in the backward, a few percent of the GEMM's time at BERT shapes
(K = 768 / 1024). The pre-activation is only kept when autograd records the call and an activation is set.
Only the gradients autograd asks for are computed (ctx.needs_input_grad, passed to the backend's backward as
`needs`): frozen weights skip the dW GEMM (and a frozen bias db), an input that needs no grad the dX GEMM; the
custom backward op returns just those (none is called when only the residual needs a gradient).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import backends
from .._utils import dtype_name, unit_last_stride
from ..tuned import round_log2
from ._checks import (
    bindable,
    check_param_dtype,
    check_same_device,
    check_shape,
    check_tensor,
    direct_call_ok,
    train_mode,
)

_OP = "linear"
ACTIVATIONS = (None, "gelu", "gelu_tanh")
_APPROX = {"gelu": "none", "gelu_tanh": "tanh"}  # activation -> F.gelu's approximate
CUBLASLT_ERF_ENV = "ROBERTA_FAST_LINEAR_CUBLASLT_ERF"


def _act_name(activation) -> str:
    """The activation as the custom op's string argument ("none" for None)."""
    return "none" if activation is None else activation


def gelu_grad(pre: torch.Tensor, approximate: str) -> torch.Tensor:
    """d gelu(z) / dz at z = pre, in pre's dtype (float32 math for lower precisions)."""
    z = pre.float() if pre.dtype in (torch.float16, torch.bfloat16) else pre
    if approximate == "tanh":
        c = 0.7978845608028654  # sqrt(2 / pi)
        inner = c * (z + 0.044715 * z * z * z)
        t = torch.tanh(inner)
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * z * z)
    else:
        g = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
    return g


def backward_torch(dy, x, weight, bias_present: bool, pre, activation: str, needs=(True, True, True)):
    """The backward in torch matmuls: (dx (M, K), dw (N, K), db (N,) or None), x's dtype; fp32 products for the
    elementwise part. dy, x: 2-D rows; pre: (M, N) or empty when activation is "none". needs: which of (dx, dw,
    db) to compute (the others are None, their matmuls skipped)."""
    need_dx, need_dw, need_db = needs
    if not (need_dx or need_dw or (need_db and bias_present)):
        return None, None, None
    if activation != "none":
        dz = (dy.float() * gelu_grad(pre, _APPROX[activation])).to(dy.dtype) if dy.dtype != torch.float64 \
            else dy * gelu_grad(pre, _APPROX[activation])
    else:
        dz = dy
    dx = dz @ weight if need_dx else None
    dw = dz.t() @ x if need_dw else None
    db = dz.sum(0, dtype=torch.float32 if dz.dtype != torch.float64 else torch.float64).to(dz.dtype) \
        if bias_present and need_db else None
    return dx, dw, db


# ----------------------------------------------------------------------------- the torch backend


class TorchBackend:
    """Plain torch, differentiable through ordinary autograd (the op layer calls `apply` directly, no custom op):
    F.linear (one addmm with the bias), then the GELU and the residual add in place on F.linear's own output
    where autograd allows it (always in inference; in training the GELU keeps its input and the residual add
    is in place on the GELU's output, which its backward does not need). So it costs what plain F.linear +
    F.gelu (+ add) cost, with fewer allocations."""

    @staticmethod
    def unsupported(x, weight, bias, activation, residual):
        return None

    @staticmethod
    def apply(x, weight, bias, activation, residual):
        """x (..., K); weight (N, K), bias (N,) or None, both x's dtype; residual (..., N) or None -> (..., N)."""
        y = F.linear(x, weight, bias)
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                            or (bias is not None and bias.requires_grad))
        if activation is not None:
            if grad:
                y = F.gelu(y, approximate=_APPROX[activation])
            else:
                y = torch.ops.aten.gelu_(y, approximate=_APPROX[activation])
        if residual is not None:  # in place on our own output: neither F.linear's nor F.gelu's backward reads it
            y = y.add_(residual)
        return y


# ----------------------------------------------------------------------------- the cuBLASLt backend


class CublasLtBackend:
    """torch._addmm_activation: on CUDA one cuBLASLt GEMM with the bias + tanh-GELU epilogue; on CPU addmm then
    an explicit tanh GELU (aten's CPU _addmm_activation applies exact erf). Contract: LinearBackend in
    roberta_fast.backends (forward / forward_inference / backward on 2-D rows)."""

    @staticmethod
    def unsupported(x, weight, bias, activation, residual):
        if activation == "gelu" and os.environ.get(CUBLASLT_ERF_ENV, "0") != "1":
            return ("backend 'cublaslt' computes the tanh-approximated GELU (cuBLASLt's epilogue); for "
                    "activation='gelu' (exact erf) set ROBERTA_FAST_LINEAR_CUBLASLT_ERF=1 to accept the tanh result "
                    "(max difference 4.7e-4, about 1 fp16 ulp), or use activation='gelu_tanh'")
        if x.dtype == torch.float64:
            return "backend 'cublaslt' takes float16 / bfloat16 / float32"
        return None

    @staticmethod
    def _pre(x, weight, bias):
        return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())

    @classmethod
    def forward_inference(cls, x, weight, bias, activation, residual):
        if activation == "none":
            y = cls._pre(x, weight, bias)
        elif x.device.type == "cuda":
            b = bias if bias is not None else x.new_zeros(weight.shape[0])
            y = torch._addmm_activation(b, x, weight.t(), use_gelu=True)  # tanh GELU in cuBLASLt's epilogue
        else:
            y = torch.ops.aten.gelu_(cls._pre(x, weight, bias), approximate="tanh")
        return y if residual is None else y.add_(residual)

    @classmethod
    def forward(cls, x, weight, bias, activation, residual, save_pre):
        """-> (y (M, N), pre (M, N) or an empty tensor). PyTorch exposes no cuBLASLt GELU_AUX epilogue (the
        pre-activation as a second output), so a training forward with an activation is addmm (bias epilogue)
        + a separate tanh GELU."""
        if not (save_pre and activation != "none"):
            return cls.forward_inference(x, weight, bias, activation, residual), x.new_empty(0)
        pre = cls._pre(x, weight, bias)
        y = F.gelu(pre, approximate="tanh")
        return (y if residual is None else y.add_(residual)), pre

    @staticmethod
    def backward(dy, x, weight, bias, pre, activation, needs=(True, True, True)):
        act = "gelu_tanh" if activation != "none" else "none"  # the derivative of what the forward computed
        return backward_torch(dy, x, weight, bias is not None, pre, act, needs)


class NoCudaLinear:
    """The "cuda" backend of linear: no CUDA C++ kernel (cuBLAS, Triton and cuBLASLt cover GPUs)."""

    REASON = "backend 'cuda' has no linear kernel (CUDA C++ is not offered for this op); use 'torch', 'triton' or " \
             "'cublaslt'"

    @staticmethod
    def unsupported(x, weight, bias, activation, residual):
        return NoCudaLinear.REASON

    @staticmethod
    def forward(x, weight, bias, activation, residual, save_pre):
        raise NotImplementedError(NoCudaLinear.REASON)

    @staticmethod
    def forward_inference(x, weight, bias, activation, residual):
        raise NotImplementedError(NoCudaLinear.REASON)

    @staticmethod
    def backward(dy, x, weight, bias, pre, activation, needs=(True, True, True)):
        raise NotImplementedError(NoCudaLinear.REASON)


backends.register_implementation("cublaslt", _OP, CublasLtBackend)
backends.register_implementation("cuda", _OP, NoCudaLinear)


# ----------------------------------------------------------------------------- the custom ops


@torch.library.custom_op(
    "roberta_fast::linear_fwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, str activation, bool save_pre, str backend) "
           "-> (Tensor, Tensor)",
)
def _fwd(x, weight, bias, residual, activation, save_pre, backend):
    y, pre = backends.implementation(backend, _OP).forward(x, weight, bias, activation, residual, save_pre)
    return y, pre


@_fwd.register_fake
def _fwd_fake(x, weight, bias, residual, activation, save_pre, backend):
    shape = (x.shape[0], weight.shape[0])
    pre = x.new_empty(shape) if save_pre and activation != "none" else x.new_empty(0)
    return x.new_empty(shape), pre


@torch.library.custom_op(
    "roberta_fast::linear_bwd", mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor weight, Tensor? bias, Tensor pre, str activation, str backend, "
           "bool need_dx, bool need_dw, bool need_db) -> Tensor[]",
)
def _bwd(dy, x, weight, bias, pre, activation, backend, need_dx, need_dw, need_db):
    """The gradients asked for, in the order (dx, dw, db), only those: need_db counts only with a bias."""
    grads = backends.implementation(backend, _OP).backward(dy, x, weight, bias, pre, activation,
                                                           needs=(need_dx, need_dw, need_db))
    return [g for g, need in zip(grads, (need_dx, need_dw, need_db and bias is not None)) if need]


@_bwd.register_fake
def _bwd_fake(dy, x, weight, bias, pre, activation, backend, need_dx, need_dw, need_db):
    out = [x.new_empty(x.shape)] if need_dx else []
    out += [weight.new_empty(weight.shape)] if need_dw else []
    return out + ([bias.new_empty(bias.shape)] if need_db and bias is not None else [])


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, activation, save_pre, backend = inputs
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.activation, ctx.backend, ctx.has_residual = activation, backend, residual is not None
    ctx.set_materialize_grads(False)  # pre gets no gradient: no zeros tensor filled for it


def _backward(ctx, dy, dpre):
    x, weight, bias, pre = ctx.saved_tensors
    if dy is None:  # y unused
        return None, None, None, None, None, None, None
    dy = dy.contiguous()
    need_dx, need_dw, need_db, need_dr = ctx.needs_input_grad[:4]
    need_db = need_db and bias is not None
    grads = iter(_bwd(dy, x, weight, bias, pre, ctx.activation, ctx.backend, need_dx, need_dw, need_db)
                 if need_dx or need_dw or need_db else ())  # only the gradients autograd asks for
    dx = next(grads) if need_dx else None
    dw = next(grads) if need_dw else None
    db = next(grads) if need_db else None
    return dx, dw, db, dy if ctx.has_residual and need_dr else None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- the public op


def linear(x, weight, bias=None, *, activation=None, residual=None, backend=None):
    """Y = act(x @ weight^T + bias) [+ residual], fp32 accumulation, with gradients for x, weight, bias and
    residual.

    x           (..., K) float16 / bfloat16 / float32, any number of leading dims
    weight      (N, K) of x's dtype or float32 (the products run in x's dtype; weight's gradient has its dtype)
    bias        (N,) of x's dtype or float32, or None
    activation  None, "gelu" (exact erf, RoBERTa's and BERT's) or "gelu_tanh" (the tanh approximation)
    residual    (..., N) x's dtype, the output's shape, added after the activation; or None
    backend     None (automatic: "torch" until a GPU has been tuned), "torch", "triton", "cublaslt" (tanh GELU:
                "gelu" only with ROBERTA_FAST_LINEAR_CUBLASLT_ERF=1) or "cuda" (no kernel for this op: raises)
    returns     (..., N) x's dtype

    The backward recomputes gelu' from the pre-activation saved by the forward, not from a second X W^T (see
    the module docstring for why).
    """
    if not torch.compiler.is_compiling():
        try:  # the checks are cached per signature of the call
            sig = (x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device,
                   None if bias is None else (bias.shape, bias.dtype, bias.device),
                   None if residual is None else (residual.shape, residual.dtype, residual.device), activation)
            ok = sig in _CHECKED
        except (AttributeError, TypeError):  # not tensors, or unhashable: the checks below say what is wrong
            ok = False
        if not ok:
            _check_args(x, weight, bias, activation, residual)
            if len(_CHECKED) >= 4096:
                _CHECKED.clear()
            _CHECKED.add(sig)
        return _run(x, weight, bias, activation, residual, backend)
    _check_args(x, weight, bias, activation, residual)
    return _run(x, weight, bias, activation, residual, backend)


_CHECKED: set = set()  # call signatures that passed _check_args


def _check_args(x, weight, bias, activation, residual):
    check_tensor(_OP, "x", x, ndim_min=1)
    check_tensor(_OP, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    K = x.shape[-1]
    if weight.shape[1] != K:
        raise ValueError(f"{_OP}: weight must have shape (out_features, {K}) for x of shape {tuple(x.shape)} "
                         f"(in_features = x's last dim), got {tuple(weight.shape)}")
    N = weight.shape[0]
    check_param_dtype(_OP, "weight", weight, x)
    if bias is not None:
        check_tensor(_OP, "bias", bias)
        check_param_dtype(_OP, "bias", bias, x)
        check_shape(_OP, "bias", bias, (N,))
    if not (activation is None or (isinstance(activation, str) and activation in ACTIVATIONS)):
        raise ValueError(f"{_OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if residual is not None:
        check_tensor(_OP, "residual", residual)
        if residual.dtype != x.dtype:
            raise TypeError(f"{_OP}: residual must have x's dtype ({dtype_name(x.dtype)}), "
                            f"got {dtype_name(residual.dtype)}")
        check_shape(_OP, "residual", residual, (*x.shape[:-1], N))
    check_same_device(_OP, x=x, weight=weight, bias=bias, residual=residual)


def _run(x, weight, bias, activation, residual, backend):
    K = x.shape[-1]
    N = weight.shape[0]
    M = x.shape[0] if x.dim() == 2 else (x.numel() // K if K else _prod(x.shape[:-1]))
    if weight.dtype != x.dtype:  # mixed precision: the products in x's dtype (differentiable casts)
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    mode = train_mode(x, weight, bias, residual)
    b, mod = _choose(x, weight, bias, activation, residual, backend, M, N, K, mode)
    if mod is None or M == 0 or K == 0 or N == 0:
        return TorchBackend.apply(x, weight, bias, activation, residual)
    x2 = x if x.dim() == 2 and x.is_contiguous() else unit_last_stride(x.reshape(-1, K)).contiguous()  # (M, K)
    weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    r2 = None if residual is None else residual.reshape(-1, N).contiguous()  # (M, N)
    act = _act_name(activation)
    if mode == "fwd" and not torch.compiler.is_compiling() and direct_call_ok(x):
        y = mod.forward_inference(x2, weight, bias, act, r2)  # inference: no custom-op dispatch
    else:
        y, _ = _fwd(x2, weight, bias, r2, act, mode == "train", b)
    return y.view(*x.shape[:-1], N)


def _choose(x, weight, bias, activation, residual, backend, M, N, K, mode):
    """(backend name, its module or None for "torch") of one call; x, weight, bias already in x's dtype."""

    def unsupported(b):
        return backends.implementation(b, _OP).unsupported(x, weight, bias, activation, residual)

    if torch.compiler.is_compiling():
        b = backends.resolve(_OP, backend, x.device, unsupported=unsupported,
                             tune_key=(M, N, K, dtype_name(x.dtype)), mode=mode)
        return b, None if b == "torch" else backends.implementation(b, _OP)
    sig = (x.dtype, N, K, round_log2(M), bias is None, residual is None, activation)
    return backends.choose(_OP, backend, x.device, sig, mode, unsupported=unsupported, tune_key=(M, N, K, x.dtype))


def choice(x, weight, bias=None, *, activation=None, residual=None, backend=None) -> str:
    """The backend a call of `linear` with these arguments runs on ("torch", "triton" or "cublaslt"), the same
    cached choice the call makes (the model asks it to decide between ops.linear's fused epilogue and cuBLAS +
    its fused elementwise kernels). Arguments as `linear`'s, unchecked; a named backend that cannot take the
    call raises as the call would."""
    K = x.shape[-1]
    N = weight.shape[0]
    M = x.numel() // K if K else _prod(x.shape[:-1])
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return _choose(x, weight, bias, activation, residual, backend, M, N, K, train_mode(x, weight, bias, residual))[0]


def bind_inference(x, weight, bias=None, activation=None, residual=None, backend=None):
    """For many inference calls of ONE signature (the encoder's layers, bound once per forward; see
    layer_norm.bind_inference): x (M, K) contiguous rows, weight (N, K) and bias of x's dtype, contiguous; residual
    (M, N) contiguous of x's dtype or None. Returns fn(x, weight, bias, residual) -> y, the kernel backend's
    forward called directly, or None where such calls must take `linear` (autograd, torch.compile, autocast, a
    dispatch mode, the torch backend, empty or other input). The caller guarantees that every later call has the
    signature of this one (shapes, dtypes, devices, contiguity, which are None)."""
    if not bindable(x) or x.dim() != 2 or not x.is_contiguous() or 0 in x.shape or weight.shape[0] == 0:
        return None
    if weight.dtype != x.dtype or not weight.is_contiguous():
        return None
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        return None
    if residual is not None and (residual.dtype != x.dtype or not residual.is_contiguous()
                                 or residual.shape != (x.shape[0], weight.shape[0])):
        return None
    M, K = x.shape
    b, mod = _choose(x, weight, bias, activation, residual, backend, M, weight.shape[0], K, "fwd")
    if mod is None:
        return None
    fwd, act = mod.forward_inference, _act_name(activation)

    def run(x, weight, bias, residual):
        return fwd(x, weight, bias, act, residual)

    return run


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
