"""CUDA C++ backend of attention (csrc/attention.cu): non-causal softmax(scale * q k^T) v on tensor
cores (mma.sync m16n8k16, sm_80+), online softmax in fp32, never materializing S x S.

Forward only, fp16 / bf16, head_dim 32 / 64 / 128 (see `supports`); attention_bwd raises
NotImplementedError (the op layer runs another backend's backward). Host functions with the
signatures of docs/kernel_contracts.md.
"""

from __future__ import annotations

import torch

from ._common import device_guard, dtype_code, lib, ptr, stream

DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (32, 64, 128)


def supports(q, k=None, v=None, key_padding_mask=None, cu_seqlens=None, max_seqlen=None, scale=None,
             *, backward=False):
    """None if this backend can run attention_fwd (or, with backward=True, attention_bwd) on these
    inputs, else a reason string. Looks at dtypes, head_dim and devices only, never at values."""
    if backward:
        return "backend 'cuda' has no attention backward yet"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is None:
            continue
        if t.device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors; {name} is on {t.device}"
        if t.dtype not in DTYPES:
            return (f"backend 'cuda' attention supports dtypes (float16, bfloat16), "
                    f"{name} has {str(t.dtype).replace('torch.', '')}")
        if t.shape[-1] not in HEAD_DIMS:
            return f"backend 'cuda' attention supports head_dim {HEAD_DIMS}, {name} has {t.shape[-1]}"
    for name, t in (("k", k), ("v", v)):
        if t is not None and t.dtype != q.dtype:
            return f"backend 'cuda' attention needs q, k, v of one dtype; q is {q.dtype}, {name} is {t.dtype}"
    return None


def _aligned(t):
    """t laid out for 16-byte copies: 16-byte aligned, stride 1 in head_dim, other strides multiples
    of 8 elements (true of contiguous tensors and of q/k/v views into a fused QKV); else a copy."""
    ok = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
          and all(t.stride(i) % 8 == 0 or t.shape[i] == 1 for i in range(t.dim() - 1)))
    return t if ok else torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _st(t, i):
    """t's stride in dim i, 0 where that dim has one element (its stride is then never used)."""
    return t.stride(i) if t.shape[i] > 1 else 0


def attention_fwd(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale):
    """padded (cu_seqlens None): q, k, v (B, S, H, D); key_padding_mask bool (B, S) (True = real key)
    or None; returns o (B, S, H, D) contiguous and lse (B, H, S) float32.
    varlen: q, k, v (T, H, D); cu_seqlens int32 (batch + 1,); max_seqlen int >= every length;
    returns o (T, H, D) (rows past cu_seqlens[-1] zero) and lse (H, T) float32.
    A query row with no real key gives zeros and lse = -inf."""
    why = supports(q, k, v)
    if why is not None:
        raise ValueError(f"attention: {why}")
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    dev = q.device
    if cu_seqlens is None:
        B, S, H, _ = q.shape
        o = torch.empty((B, S, H, D), dtype=q.dtype, device=dev)
        lse = torch.empty((B, H, S), dtype=torch.float32, device=dev)
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask.to(torch.bool).contiguous()
        strides = [(_st(t, 0), _st(t, 1), _st(t, 2)) for t in (q, k, v, o)]
        lse_strides = (H * S, S)
        batch, seqlen, total = B, S, 0
    else:
        T, H, _ = q.shape
        o = torch.empty((T, H, D), dtype=q.dtype, device=dev)
        lse = torch.empty((H, T), dtype=torch.float32, device=dev)
        mask = None
        cu_seqlens = cu_seqlens.to(device=dev, dtype=torch.int32).contiguous()
        strides = [(0, _st(t, 0), _st(t, 1)) for t in (q, k, v, o)]
        lse_strides = (0, T)
        batch, seqlen, total = cu_seqlens.numel() - 1, int(max_seqlen), T
    with device_guard(q):
        lib().attention_fwd(
            q=ptr(q), q_strides=strides[0], k=ptr(k), k_strides=strides[1], v=ptr(v), v_strides=strides[2],
            o=ptr(o), o_strides=strides[3], lse=ptr(lse), lse_batch_stride=lse_strides[0],
            lse_head_stride=lse_strides[1], key_padding_mask=ptr(mask),
            mask_batch_stride=0 if mask is None else mask.stride(0), cu_seqlens=ptr(cu_seqlens),
            total_rows=total, batch=batch, heads=H, seqlen=seqlen, head_dim=D, scale=scale,
            dtype=dtype_code(q.dtype), stream=stream(q))
    return o, lse


def attention_bwd(do, q, k, v, o, lse, key_padding_mask, cu_seqlens, max_seqlen, scale):
    """Not implemented in the CUDA C++ backend yet."""
    raise NotImplementedError(
        "attention_bwd: the CUDA C++ backend (roberta_fast._C) has only the attention forward; "
        "use the triton or torch backend for the backward")
