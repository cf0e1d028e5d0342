"""CUDA C++ backend of masked_softmax (csrc/masked_softmax.cu): softmax(scale * scores, masked) over the
last dim of (B, H, Q, K). The MaskedSoftmaxBackend contract (roberta_fast.backends,
docs/kernel_contracts.md)."""

from __future__ import annotations

import torch

from .._utils import FLOAT_DTYPES
from ._common import device_guard, dtype_code, lib, ptr, stream, unsupported_dtype


def unsupported(scores, mask, scale):
    """Why this backend cannot take the call, or None. Any K is supported."""
    return unsupported_dtype("masked_softmax", "scores", scores, FLOAT_DTYPES)


def forward(scores, mask, scale):
    """scores (B, H, Q, K), stride(3) == 1; mask None or a view expanded to scores' shape (stride 0
    where broadcast, last stride 0 or 1): bool (True = keep) or additive float of any float dtype.
    Returns probs (B, H, Q, K) contiguous, scores.dtype; fully masked rows are zeros."""
    B, H, Q, K = scores.shape
    probs = torch.empty_like(scores, memory_format=torch.contiguous_format)  # (B, H, Q, K) contiguous
    m_strides = (0, 0, 0, 0)
    if mask is not None:
        if K > 1 and mask.stride(3) not in (0, 1):
            mask = mask.contiguous()
        m_strides = tuple(mask.stride(i) if mask.shape[i] > 1 else 0 for i in range(4))
    mod = lib(scores)
    with device_guard(scores):
        mod.masked_softmax_fwd(  # positionally, in _common.ARGS["masked_softmax_fwd"]'s order
            ptr(scores), scores.stride()[:3], ptr(mask), m_strides,
            dtype_code(mod, mask.dtype) if mask is not None else 0, ptr(probs), B, H, Q, K, float(scale),
            dtype_code(mod, scores.dtype), stream(scores))
    return probs


def bind_inference(scores, mask, scale):
    """`forward` for many calls of ONE signature (the public op's inference cache): scores (B, H, Q, K) with
    stride(3) == 1, mask None or a view expanded to scores' shape with a last stride of 0 or 1. Returns
    fn(scores, mask) -> probs, the same kernel call as forward's; later masks may be given unexpanded (the tensor
    whose expanded view was bound, or one of the same metadata)."""
    B, H, Q, K = scores.shape
    if mask is not None and K > 1 and mask.stride(3) not in (0, 1):
        return None
    m_strides = (0, 0, 0, 0) if mask is None else tuple(mask.stride(i) if mask.shape[i] > 1 else 0 for i in range(4))
    mod = lib(scores)
    fwd, code = mod.masked_softmax_fwd, dtype_code(mod, scores.dtype)
    mcode = 0 if mask is None else dtype_code(mod, mask.dtype)
    s_strides, shape, dtype, dev, empty = scores.stride()[:3], scores.shape, scores.dtype, scores.device, torch.empty
    scale = float(scale)

    def masked_softmax_bound(scores, mask):
        probs = empty(shape, dtype=dtype, device=dev)
        with device_guard(scores):
            fwd(scores.data_ptr(), s_strides, 0 if mask is None else mask.data_ptr(), m_strides, mcode,  # ARGS'
                probs.data_ptr(), B, H, Q, K, scale, code, stream(scores))
        return probs

    return masked_softmax_bound


def backward(dprobs, probs, scale):
    """dprobs, probs (B, H, Q, K), stride(3) == 1. Returns dscores (B, H, Q, K) contiguous:
    scale * probs * (dprobs - sum(dprobs * probs, -1))."""
    dprobs = dprobs.to(probs.dtype)
    B, H, Q, K = probs.shape
    dscores = torch.empty((B, H, Q, K), dtype=probs.dtype, device=probs.device)
    mod = lib(probs)
    with device_guard(probs):
        mod.masked_softmax_bwd(  # positionally, in _common.ARGS["masked_softmax_bwd"]'s order
            ptr(dprobs), dprobs.stride()[:3], ptr(probs), probs.stride()[:3], ptr(dscores), B, H, Q, K, float(scale),
            dtype_code(mod, probs.dtype), stream(probs))
    return dscores
