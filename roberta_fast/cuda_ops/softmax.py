"""CUDA C++ backend of masked_softmax (csrc/softmax.cu): softmax(scale * scores, masked) over the
last dim of (B, H, Q, K). Host functions with the signatures of docs/kernel_contracts.md."""

from __future__ import annotations

import torch

from ._common import device_guard, dtype_code, lib, ptr, stream


def _last_dim_unit(t):
    """t with stride 1 in the last dim (copied only when it is not)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def masked_softmax_fwd(scores, mask, scale):
    """scores (B, H, Q, K), stride(3) == 1; mask None or a view expanded to scores' shape (stride 0
    where broadcast, last stride 0 or 1): bool (True = keep) or additive float of any float dtype.
    Returns probs (B, H, Q, K) contiguous, scores.dtype; fully masked rows are zeros."""
    scores = _last_dim_unit(scores)
    B, H, Q, K = scores.shape
    probs = torch.empty((B, H, Q, K), dtype=scores.dtype, device=scores.device)
    m_strides = (0, 0, 0, 0)
    if mask is not None:
        if K > 1 and mask.stride(3) not in (0, 1):
            mask = mask.contiguous()
        m_strides = tuple(mask.stride(i) if mask.shape[i] > 1 else 0 for i in range(4))
    with device_guard(scores):
        lib().masked_softmax_fwd(
            scores=ptr(scores), s_strides=tuple(scores.stride(i) for i in range(3)), mask=ptr(mask),
            m_strides=m_strides, mask_dtype=dtype_code(mask.dtype) if mask is not None else 0, probs=ptr(probs),
            B=B, H=H, Q=Q, K=K, scale=float(scale), dtype=dtype_code(scores.dtype), stream=stream(scores))
    return probs


def masked_softmax_bwd(dprobs, probs, scale):
    """dprobs, probs (B, H, Q, K), stride(3) == 1. Returns dscores (B, H, Q, K) contiguous:
    scale * probs * (dprobs - sum(dprobs * probs, -1))."""
    dprobs, probs = _last_dim_unit(dprobs.to(probs.dtype)), _last_dim_unit(probs)
    B, H, Q, K = probs.shape
    dscores = torch.empty((B, H, Q, K), dtype=probs.dtype, device=probs.device)
    with device_guard(probs):
        lib().masked_softmax_bwd(
            dprobs=ptr(dprobs), dp_strides=tuple(dprobs.stride(i) for i in range(3)), probs=ptr(probs),
            p_strides=tuple(probs.stride(i) for i in range(3)), dscores=ptr(dscores), B=B, H=H, Q=Q, K=K,
            scale=float(scale), dtype=dtype_code(probs.dtype), stream=stream(probs))
    return dscores
