"""Helpers shared by the cuda_ops modules: the compiled module for a tensor's device, dtype codes, raw
pointers, the current stream and the device guard. Nothing here touches tensor values (no device sync).

CUDA tensors go to roberta_fast._C; CPU tensors to roberta_fast._C_emu, the host build of the same
sources (the op layer only sends CPU tensors here under ROBERTA_FAST_CUDA_EMULATE=1).
"""

from __future__ import annotations

import contextlib

import torch

from .._utils import dtype_name
from . import emulated_module, native_module

# The compiled modules' kernel entries take their arguments positionally, in this order (csrc/bindings.cpp's
# py::arg lists): pybind11 matches ~20-26 keyword arguments per call by name, which costs several microseconds of
# host time a launch. Every call site here passes them in this order; tests/test_host_path.py checks the table
# against the built module's signatures, and benchmarks/bench_host.py finds the row counts by it.
ARGS = {
    "layer_norm_fwd": ("x", "x_stride", "residual", "res_stride", "x_bias", "x_bias_f32", "weight", "weight_f32",
                       "bias", "bias_f32", "y", "mean", "rstd", "M", "N", "eps", "dtype", "dropout_p", "rng",
                       "stream"),
    "layer_norm_bwd": ("dy", "dy_stride", "x", "x_stride", "residual", "res_stride", "x_bias", "x_bias_f32", "weight",
                       "weight_f32", "mean", "rstd", "dx", "row_ws", "col_ws", "dweight", "dweight_f32", "dbias",
                       "dbias_f32", "dx_bias", "dx_bias_f32", "dresidual", "M", "N", "parts", "dtype", "dropout_p",
                       "rng", "stream"),
    "bias_gelu_fwd": ("x", "x_stride", "bias", "bias_f32", "y", "M", "N", "approximate", "dtype", "stream"),
    "bias_gelu_bwd": ("dy", "dy_stride", "x", "x_stride", "bias", "bias_f32", "dx", "col_ws", "dbias", "M", "N",
                      "parts", "approximate", "dtype", "stream"),
    "masked_softmax_fwd": ("scores", "s_strides", "mask", "m_strides", "mask_dtype", "probs", "B", "H", "Q", "K",
                           "scale", "dtype", "stream"),
    "masked_softmax_bwd": ("dprobs", "dp_strides", "probs", "p_strides", "dscores", "B", "H", "Q", "K", "scale",
                           "dtype", "stream"),
    "attention_fwd": ("q", "q_strides", "k", "k_strides", "v", "v_strides", "o", "o_strides", "lse",
                      "lse_batch_stride", "lse_head_stride", "key_padding_mask", "mask_batch_stride", "cu_seqlens",
                      "total_rows", "batch", "heads", "seqlen", "head_dim", "scale", "dtype", "dropout_p", "rng",
                      "stream"),
    "attention_bwd": ("q", "q_strides", "k", "k_strides", "v", "v_strides", "dout", "do_strides", "lse", "delta",
                      "lse_batch_stride", "lse_head_stride", "dq_accum", "dk", "dv", "g_strides", "key_padding_mask",
                      "mask_batch_stride", "cu_seqlens", "batch", "heads", "seqlen", "head_dim", "scale", "dtype",
                      "dropout_p", "rng", "stream"),
}


def binding_args(mod, kernel: str) -> tuple:
    """The argument names of a compiled module's kernel entry, in order, read from its pybind11 signature."""
    import re

    doc = getattr(mod, kernel).__doc__.split("\n")[0]
    return tuple(re.findall(r"(?:^|, )([A-Za-z_][A-Za-z0-9_]*): ", doc[doc.index("(") + 1:doc.rindex(")")]))


def lib(t):
    """The compiled module that runs kernels on t's device; RuntimeError when it was not built."""
    if t.device.type == "cuda":
        mod = native_module()
        if mod is None:
            raise RuntimeError("roberta_fast._C was not built: install on a machine with nvcc "
                               "(`ROBERTA_FAST_CUDA=1 pip install --no-build-isolation -e .`)")
        return mod
    mod = emulated_module()
    if mod is None:
        raise RuntimeError(f"the CUDA backend got tensors on {t.device}: CPU tensors need the emulated build "
                           "roberta_fast._C_emu (see docs/cuda_emulation.md)")
    return mod


_CODES: dict = {}  # (module, dtype) -> code


def dtype_code(mod, dtype: torch.dtype) -> int:
    code = _CODES.get((mod, dtype))
    if code is None:
        codes = mod.DTYPES
        name = dtype_name(dtype)
        if name not in codes:
            raise TypeError(f"{mod.__name__} has no dtype code for {name}")
        code = _CODES[(mod, dtype)] = codes[name]
    return code


def ptr(t) -> int:
    """Address of t's first element, 0 for None."""
    return 0 if t is None else t.data_ptr()


def is_f32(t) -> bool:
    return t is not None and t.dtype == torch.float32


def stream(t) -> int:
    """The cudaStream_t of the current stream on t's device as an int (0 for CPU tensors). The raw getter
    Triton's launcher uses too: ~0.2 us, where torch.cuda.current_stream(device).cuda_stream costs ~3 us."""
    dev = t.device
    if dev.type != "cuda":
        return 0
    return torch._C._cuda_getCurrentRawStream(torch.cuda.current_device() if dev.index is None else dev.index)


_NO_GUARD = contextlib.nullcontext()


def device_guard(t):
    """Make t's device current while launching (the compiled module follows the current device)."""
    dev = t.device
    if dev.type != "cuda" or dev.index is None or dev.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(dev)


def param(t):
    """A parameter vector (N,) as a contiguous tensor, or None."""
    return None if t is None else t.contiguous()


def col_parts(M: int) -> int:
    """Row partitions for the fp32 partial column sums of a backward (rows of its workspace)."""
    return max(1, min(128, (M + 63) // 64))


def unsupported_dtype(op: str, name: str, t, dtypes) -> str | None:
    """The reason this backend cannot take t's dtype, or None."""
    if t is not None and t.dtype not in dtypes:
        return (f"backend 'cuda' {op} supports {name} dtypes ({', '.join(map(dtype_name, dtypes))}), "
                f"got {dtype_name(t.dtype)}")
    return None


def dropout_rng(rng, dropout_p, like):
    """The (seed, offset) int64 pair the dropout kernels read on the device, contiguous (keep it alive over the
    launch), or None when dropout_p is 0 (the kernels without dropout run then). Checks shape, dtype and
    device only, never the values (no host read: CUDA graphs and torch.compile stay possible)."""
    if not dropout_p:
        return None
    if rng is None:
        raise ValueError("rng: dropout_p > 0 needs an int64 (seed, offset) tensor, got None")
    if rng.dtype != torch.int64 or rng.numel() != 2 or rng.device != like.device:
        raise ValueError(f"rng must be an int64 tensor of 2 elements (seed, offset) on {like.device}, got "
                         f"{dtype_name(rng.dtype)} of shape {tuple(rng.shape)} on {rng.device}")
    return rng.contiguous()
