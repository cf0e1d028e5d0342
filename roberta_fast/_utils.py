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


_SCRATCH: dict = {}  # device -> the current float32 scratch buffer
_SCRATCH_KEPT: list = []  # every scratch buffer ever handed out (never freed, see stats_scratch)


def stats_scratch(device, n: int) -> torch.Tensor:
    """A float32 buffer of at least n elements on `device` for per-row statistics nobody reads (an inference
    forward's mean / rstd / lse): one per device, shared by every call, grown by doubling. Buffers are never
    freed, so a CUDA graph that captured a launch writing into an older one stays valid."""
    buf = _SCRATCH.get(device)
    if buf is None or buf.shape[0] < n:
        size = max(n, 4096, 0 if buf is None else 2 * buf.shape[0])
        buf = _SCRATCH[device] = torch.empty((size,), dtype=torch.float32, device=device)
        _SCRATCH_KEPT.append(buf)
    return buf
