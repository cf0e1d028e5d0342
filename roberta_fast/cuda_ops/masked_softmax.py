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
        mod.masked_softmax_fwd(
            scores=ptr(scores), s_strides=tuple(scores.stride(i) for i in range(3)), mask=ptr(mask),
            m_strides=m_strides, mask_dtype=dtype_code(mod, mask.dtype) if mask is not None else 0, probs=ptr(probs),
            B=B, H=H, Q=Q, K=K, scale=float(scale), dtype=dtype_code(mod, scores.dtype), stream=stream(scores))
    return probs


def backward(dprobs, probs, scale):
    """dprobs, probs (B, H, Q, K), stride(3) == 1. Returns dscores (B, H, Q, K) contiguous:
    scale * probs * (dprobs - sum(dprobs * probs, -1))."""
    dprobs = dprobs.to(probs.dtype)
    B, H, Q, K = probs.shape
    dscores = torch.empty((B, H, Q, K), dtype=probs.dtype, device=probs.device)
    mod = lib(probs)
    with device_guard(probs):
        mod.masked_softmax_bwd(
            dprobs=ptr(dprobs), dp_strides=tuple(dprobs.stride(i) for i in range(3)), probs=ptr(probs),
            p_strides=tuple(probs.stride(i) for i in range(3)), dscores=ptr(dscores), B=B, H=H, Q=Q, K=K,
            scale=float(scale), dtype=dtype_code(mod, probs.dtype), stream=stream(probs))
    return dscores
