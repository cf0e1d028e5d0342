"""Helpers shared by the cuda_ops modules: the compiled module, dtype codes, raw pointers, the
current stream and the device guard. Nothing here touches tensor values (no device sync)."""

from __future__ import annotations

import contextlib

import torch

from ..ops import _dispatch


def lib():
    """roberta_fast._C, or a RuntimeError that says how to build it."""
    mod = _dispatch.cuda_module()
    if mod is None:
        raise RuntimeError(_dispatch._why_unavailable("cuda", torch.device("cuda")))
    return mod


def dtype_code(dtype: torch.dtype) -> int:
    name = str(dtype).replace("torch.", "")
    codes = lib().DTYPES
    if name not in codes:
        raise TypeError(f"roberta_fast._C has no dtype code for {name}")
    return codes[name]


def ptr(t) -> int:
    """Device address of t's first element, 0 for None."""
    return 0 if t is None else t.data_ptr()


def is_f32(t) -> bool:
    return t is not None and t.dtype == torch.float32


def stream(t) -> int:
    """The cudaStream_t of the current stream on t's device, as an int."""
    return torch.cuda.current_stream(t.device).cuda_stream


def device_guard(t):
    """Make t's device current while launching (the compiled module follows the current device)."""
    if t.device.index is None or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def rows(t):
    """t as (M, N) rows with last stride 1 (a copy only when the last stride is not 1)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def param(t):
    """A parameter vector (N,) as a contiguous tensor, or None."""
    return None if t is None else t.contiguous()


def col_parts(M: int) -> int:
    """Row partitions for the fp32 partial column sums of a backward (rows of its workspace)."""
    return max(1, min(128, (M + 63) // 64))
