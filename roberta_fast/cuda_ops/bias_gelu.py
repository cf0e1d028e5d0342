"""CUDA C++ backend of bias_gelu (csrc/bias_gelu.cu): y = GELU(x + bias), exact erf or tanh.

The BiasGeluBackend contract (roberta_fast.backends, docs/kernel_contracts.md).
"""

from __future__ import annotations

import torch

from .._utils import FLOAT_DTYPES
from ._common import col_parts, device_guard, dtype_code, is_f32, lib, param, ptr, stream, unsupported_dtype

_APPROXIMATE = {"none": 0, "tanh": 1}


def _approx_code(approximate) -> int:
    if approximate not in _APPROXIMATE:
        raise ValueError(f"bias_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _APPROXIMATE[approximate]


def unsupported(x, bias, approximate):
    """Why this backend cannot take the call, or None."""
    return unsupported_dtype("bias_gelu", "x", x, FLOAT_DTYPES)


def forward(x, bias, approximate):
    """x (M, N) rows; bias (N,) of x's dtype or float32, or None. Returns y (M, N) x.dtype."""
    code = _approx_code(approximate)
    bias = param(bias)
    M, N = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)  # (M, N) contiguous
    mod = lib(x)
    with device_guard(x):
        mod.bias_gelu_fwd(ptr(x), x.stride(0), ptr(bias), is_f32(bias), ptr(y), M, N, code,  # ARGS' order
                          dtype_code(mod, x.dtype), stream(x))
    return y


def backward(dy, x, bias, approximate):
    """dy, x (M, N) rows. Returns dx (M, N) x.dtype and dbias (N,) bias.dtype (the fp32 dx summed over
    rows) or None."""
    code = _approx_code(approximate)
    bias = param(bias)
    M, N = x.shape
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    dbias = col_ws = None
    parts = 1
    if bias is not None:
        parts = col_parts(M)
        dbias = torch.empty((N,), dtype=bias.dtype, device=x.device)
        col_ws = torch.empty((parts, N), dtype=torch.float32, device=x.device)
    mod = lib(x)
    with device_guard(x):
        mod.bias_gelu_bwd(ptr(dy), dy.stride(0), ptr(x), x.stride(0), ptr(bias), is_f32(bias), ptr(dx),  # ARGS'
                          ptr(col_ws), ptr(dbias), M, N, parts, code, dtype_code(mod, x.dtype), stream(x))
    return dx, dbias
