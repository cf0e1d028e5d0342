"""Small tensor helpers written once for every layer (ops, the backends, the tuner, the harness).

A leaf module: it imports nothing of roberta_fast, so anything may import it.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    """"float16" for torch.float16: the name used in messages, cache keys and result files."""
    return str(dtype).removeprefix("torch.")


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t with stride(-1) == 1, as every kernel's row layout wants: t itself when it already is, a
    re-strided view when the last dim has one element (its stride is never used), else a copy."""
    if t.dim() == 0 or t.stride(-1) == 1:
        return t
    if t.shape[-1] == 1:
        return t.as_strided(t.shape, (*t.stride()[:-1], 1))
    return t.contiguous()
