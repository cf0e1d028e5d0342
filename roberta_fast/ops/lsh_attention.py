"""lsh_attention and lsh_attention_varlen: Reformer-style LSH self-attention (non-causal), an opt-in
sub-quadratic approximation of `attention` for long inputs. The algorithm and its choices (look-one-back
chunks, no wrap-around, rounds combined by their log-sum-exp, duplicates counted per round, shared QK) are
written down in roberta_fast/lsh.py and docs/lsh_attention.md.

Backends: "torch" (roberta_fast.lsh, plain PyTorch, differentiable) and "triton" (the hashing and the sort
in torch, lsh.slots; the chunked attention of every round, read through the layout's indices, the rounds'
combination and their backward in kernels/lsh_attention.py). There is no CUDA C++ kernel: backend="cuda"
raises, and the automatic choice takes triton on GPUs, torch on CPU tensors.
"""

from __future__ import annotations

import functools

import torch

from .. import backends, lsh
from .._utils import dtype_name, unit_last_stride
from ._checks import check_same_device, check_shape, check_tensor

_OP = "lsh_attention"
_OPV = "lsh_attention_varlen"


def _kernel():
    from ..kernels import lsh_attention as mod  # imported on first use: the package needs no triton

    return mod


def _check_int(op: str, name: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be a Python int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")


def _check_common(op, q, k, v, ndim, layout, bucket_size, num_hashes, seed, scale):
    check_tensor(op, "q", q)
    if q.dim() != ndim:
        raise ValueError(f"{op}: q must be {ndim}-D {layout}, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t is None and name == "k":
            continue
        check_tensor(op, name, t)
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype ({dtype_name(q.dtype)}), got {dtype_name(t.dtype)}")
        check_shape(op, name, t, q.shape)
    _check_int(op, "bucket_size", bucket_size, 1)
    _check_int(op, "num_hashes", num_hashes, 1)
    _check_int(op, "seed", seed, -(2**63))
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{op}: scale must be a Python float or None, got {type(scale).__name__}")


_CHOSEN: dict = {}


def _choose(op, backend, q, chunk):
    """The backend of a call: "torch" or "triton" (cached per device, dtype, head_dim, chunk of the layout)."""
    key = (backend, q.device, q.dtype, q.shape[-1], chunk)
    b = _CHOSEN.get(key)
    if b is None:
        def unsupported(name):
            if name == "cuda":
                return "lsh_attention has no CUDA C++ kernel; use backend='triton' or 'torch'"
            return _kernel().unsupported(q, chunk) if name == "triton" else None

        b = backends.resolve(op, backend, q.device, unsupported=unsupported)
        _CHOSEN[key] = b
    return b


def _triton_padded(q, k, v, key_padding_mask, bucket_size, num_hashes, seed, scale):
    """The triton backend on padded inputs: the layout as indices (lsh.slots: hashing, one sort), then the
    kernels (chunked attention of every round, the rounds' combination; their backward) on q, k, v as they
    are. Padded query rows give zeros."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mod = _kernel()
    q, v = unit_last_stride(q), unit_last_stride(v)
    k = None if k is None else unit_last_stride(k)
    sl = lsh.slots(q, k, key_padding_mask, bucket_size, num_hashes, seed, keys_fn=mod.sort_keys)
    # shared QK: the kernels normalise the queries into keys where they load them (and differentiate that)
    return mod.lsh_attention(q, q if k is None else k, v, sl.perm, sl.nreal, sl.chunk, float(scale), sl.shared)


def lsh_attention(q, k, v, *, key_padding_mask=None, bucket_size=64, num_hashes=2, seed=0, scale=None,
                  backend=None):
    """LSH self-attention (Reformer-style, non-causal) on padded batches; an approximation of `attention`.

    q, v              (batch, seqlen, heads, head_dim) float16 / bfloat16 / float32, one dtype
    k                 like q, or None: shared QK as in Reformer (keys are the L2-normalised queries, hashed
                      with them; a token attends to itself only when it has no other key)
    key_padding_mask  None, or bool (batch, seqlen), True = real token: padded keys are never attended,
                      padded query rows give zeros
    bucket_size       Python int >= 1: C, about the number of keys a query meets per chunk (each query sees
                      about 2C keys per round, its chunk and the previous one); the number of hash buckets is
                      ceil(seqlen / C) rounded up to even. bucket_size >= seqlen is exact full attention
    num_hashes        Python int >= 1: hash rounds, combined by their log-sum-exp
    seed              Python int: the random rotations (drawn on the CPU, the same on every device)
    scale             Python float, default head_dim ** -0.5
    backend           None (automatic: triton on CUDA tensors, torch on CPU tensors), "torch" or "triton"
                      (float16 / bfloat16, float32 under the interpreter; head_dim <= 128, bucket_size <= 128
                      with k=None, <= 64 with separate keys)
    returns           (batch, seqlen, heads, head_dim) q.dtype; memory linear in seqlen (C x 2C scores per chunk)
    """
    _check_common(_OP, q, k, v, 4, "(batch, seqlen, heads, head_dim)", bucket_size, num_hashes, seed, scale)
    if key_padding_mask is not None:
        check_tensor(_OP, "key_padding_mask", key_padding_mask, dtypes=(torch.bool,))
        check_shape(_OP, "key_padding_mask", key_padding_mask, q.shape[:2])
    check_same_device(_OP, q=q, k=k, v=v, key_padding_mask=key_padding_mask)
    b = _choose(_OP, backend, q, bucket_size if k is None else 2 * bucket_size)
    if q.numel() == 0:
        return q.new_zeros(q.shape) + 0 * (q.sum() + v.sum() + (0 if k is None else k.sum()))
    if b == "triton":
        return _triton_padded(q, k, v, key_padding_mask, bucket_size, num_hashes, seed, scale)
    return lsh.lsh_attention(q, k, v, key_padding_mask, bucket_size, num_hashes, seed, scale)


def lsh_attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, bucket_size=64, num_hashes=2, seed=0, scale=None,
                         backend=None):
    """Padding-free LSH self-attention: each packed sequence is hashed, sorted and chunked on its own (never
    mixed with another); the same result as `lsh_attention` on the padded batch with its key padding mask.

    q, v         (total_tokens, heads, head_dim); k like q or None (shared QK, as in `lsh_attention`)
    cu_seqlens   int32 (batch + 1,), cumulative lengths from 0 (checked on CPU tensors)
    max_seqlen   Python int >= every sequence length; the number of buckets comes from it
    the rest     as in `lsh_attention`
    returns      (total_tokens, heads, head_dim) q.dtype; rows past cu_seqlens[-1] are zeros
    """
    _check_common(_OPV, q, k, v, 3, "(total_tokens, heads, head_dim)", bucket_size, num_hashes, seed, scale)
    check_tensor(_OPV, "cu_seqlens", cu_seqlens, dtypes=(torch.int32,))
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{_OPV}: cu_seqlens must be 1-D (batch + 1,) with at least one element, "
                         f"got shape {tuple(cu_seqlens.shape)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{_OPV}: max_seqlen must be a Python int, got {type(max_seqlen).__name__}")
    check_same_device(_OPV, q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    if cu_seqlens.device.type == "cpu":
        cu = cu_seqlens.tolist()
        lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
        if cu[0] != 0 or any(n < 0 for n in lens) or cu[-1] > q.shape[0]:
            raise ValueError(f"{_OPV}: cu_seqlens must start at 0, be non-decreasing and end at most at the "
                             f"{q.shape[0]} tokens of q, got {cu}")
        if lens and max(lens) > max_seqlen:
            raise ValueError(f"{_OPV}: max_seqlen = {max_seqlen} is smaller than the longest sequence "
                             f"({max(lens)} tokens)")
    b = _choose(_OPV, backend, q, bucket_size if k is None else 2 * bucket_size)
    if b == "triton":
        return lsh.varlen_via_padded(q, k, v, cu_seqlens, max_seqlen, functools.partial(
            _triton_padded, bucket_size=bucket_size, num_hashes=num_hashes, seed=seed, scale=scale))
    return lsh.lsh_attention_varlen(q, k, v, cu_seqlens, max_seqlen, bucket_size, num_hashes, seed, scale)
