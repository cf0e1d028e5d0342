"""CUDA C++ backend of layer_norm (csrc/layer_norm.cu): y = LayerNorm(x + x_bias + residual).

The LayerNormBackend contract (roberta_fast.backends, docs/kernel_contracts.md): the host functions
allocate the outputs and the fp32 scratch of the backward's column sums, and launch on the current
stream without syncing. Rows arrive with a unit last stride (the op layer sees to it).
"""

from __future__ import annotations

import torch

from .._utils import FLOAT_DTYPES, stats_scratch
from ._common import col_parts, device_guard, dtype_code, is_f32, lib, param, ptr, stream, unsupported_dtype


def unsupported(x, weight, bias, eps, residual, x_bias):
    """Why this backend cannot take the call (a reason string), or None. Any N is supported."""
    return unsupported_dtype("layer_norm", "x", x, FLOAT_DTYPES)


def forward(x, weight, bias, eps, residual, x_bias):
    """x (M, N) rows; weight, bias, x_bias (N,) of x's dtype or float32, or None; residual (M, N)
    rows of x's dtype or None. Returns y (M, N) x.dtype, mean and rstd (M,) float32."""
    M = x.shape[0]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    mean = torch.empty((M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    _launch_fwd(x, weight, bias, eps, residual, x_bias, y, mean, rstd)
    return y, mean, rstd


def forward_inference(x, weight, bias, eps, residual, x_bias):
    """y of `forward` when nothing will read the statistics: mean and rstd both go to the same slots of one
    shared scratch buffer (roberta_fast._utils.stats_scratch), written only by the row's own thread block."""
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = stats_scratch(x.device, x.shape[0])
    _launch_fwd(x, weight, bias, eps, residual, x_bias, y, s, s)
    return y


def _launch_fwd(x, weight, bias, eps, residual, x_bias, y, mean, rstd):
    weight, bias, x_bias = param(weight), param(bias), param(x_bias)
    M, N = x.shape
    mod = lib(x)
    with device_guard(x):
        mod.layer_norm_fwd(
            x=ptr(x), x_stride=x.stride(0), residual=ptr(residual),
            res_stride=0 if residual is None else residual.stride(0),
            x_bias=ptr(x_bias), x_bias_f32=is_f32(x_bias), weight=ptr(weight), weight_f32=is_f32(weight),
            bias=ptr(bias), bias_f32=is_f32(bias), y=ptr(y), mean=ptr(mean), rstd=ptr(rstd),
            M=M, N=N, eps=float(eps), dtype=dtype_code(mod, x.dtype), stream=stream(x))


def backward(dy, x, weight, bias, mean, rstd, residual, x_bias):
    """dy, x (M, N) rows (and residual, x_bias as in the forward); mean, rstd (M,) float32 from the
    forward. Returns dx (M, N) x.dtype (also the residual's gradient) and dweight, dbias, dx_bias
    (N,) in each parameter's dtype, None where the parameter is None."""
    weight, x_bias = param(weight), param(x_bias)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    M, N = x.shape
    dev = x.device
    dx = torch.empty((M, N), dtype=x.dtype, device=dev)
    dweight = None if weight is None else torch.empty((N,), dtype=weight.dtype, device=dev)
    dbias = None if bias is None else torch.empty((N,), dtype=bias.dtype, device=dev)
    dx_bias = None if x_bias is None else torch.empty((N,), dtype=x_bias.dtype, device=dev)
    need_cols = weight is not None or bias is not None or x_bias is not None
    parts = col_parts(M) if need_cols else 1
    col_ws = torch.empty((3, parts, N), dtype=torch.float32, device=dev) if need_cols else None
    row_ws = torch.empty((M, 2), dtype=torch.float32, device=dev) if x_bias is not None else None
    mod = lib(x)
    with device_guard(x):
        mod.layer_norm_bwd(
            dy=ptr(dy), dy_stride=dy.stride(0), x=ptr(x), x_stride=x.stride(0), residual=ptr(residual),
            res_stride=0 if residual is None else residual.stride(0),
            x_bias=ptr(x_bias), x_bias_f32=is_f32(x_bias), weight=ptr(weight), weight_f32=is_f32(weight),
            mean=ptr(mean), rstd=ptr(rstd), dx=ptr(dx), row_ws=ptr(row_ws), col_ws=ptr(col_ws),
            dweight=ptr(dweight), dweight_f32=is_f32(dweight), dbias=ptr(dbias), dbias_f32=is_f32(dbias),
            dx_bias=ptr(dx_bias), dx_bias_f32=is_f32(dx_bias), M=M, N=N, parts=parts,
            dtype=dtype_code(mod, x.dtype), stream=stream(x))
    return dx, dweight, dbias, dx_bias
