"""CUDA C++ backend of attention (csrc/attention.cu, csrc/attention_bwd.cu): non-causal
softmax(scale * q k^T) v on tensor cores (mma.sync m16n8k16, sm_80+), online softmax in fp32, never
materializing S x S.

Forward and backward (FlashAttention-2 style: dK, dV per key block in registers, dQ through fp32
atomics), fp16 / bf16, head_dim 32 / 64 / 128 (see `unsupported`). The AttentionBackend contract
(roberta_fast.backends, docs/kernel_contracts.md).
"""

from __future__ import annotations

import torch

from .._utils import dtype_name, stats_scratch
from ._common import device_guard, dtype_code, lib, ptr, stream

DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (32, 64, 128)


def unsupported(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale):
    """Why this backend cannot run attention (forward and backward) on these inputs, or None: dtypes and
    head_dim only, never values. The limits of this backend live here and nowhere else."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in DTYPES:
            return (f"backend 'cuda' attention supports dtypes (float16, bfloat16), "
                    f"{name} has {dtype_name(t.dtype)}")
        if t.shape[-1] not in HEAD_DIMS:
            return f"backend 'cuda' attention supports head_dim {HEAD_DIMS}, {name} has {t.shape[-1]}"
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


def _strides(t, varlen):
    """(batch, row, head) strides in elements: (B, S, H, D) padded, (T, H, D) varlen (batch 0)."""
    return (0, _st(t, 0), _st(t, 1)) if varlen else (_st(t, 0), _st(t, 1), _st(t, 2))


def _layout(q, key_padding_mask, cu_seqlens, max_seqlen):
    """Sizes and the per-row statistics' layout shared by the forward and the backward."""
    if cu_seqlens is None:
        B, S, H, D = q.shape
        mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous()
        return dict(varlen=False, batch=B, seqlen=S, heads=H, head_dim=D, stat_shape=(B, H, S),
                    stat_strides=(H * S, S), mask=mask, cu=None)
    T, H, D = q.shape
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    return dict(varlen=True, batch=cu.numel() - 1, seqlen=int(max_seqlen), heads=H, head_dim=D,
                stat_shape=(H, T), stat_strides=(0, T), mask=None, cu=cu)


def forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale):
    """padded (cu_seqlens None): q, k, v (B, S, H, D); key_padding_mask bool (B, S) (True = real key)
    or None; returns o (B, S, H, D) contiguous and lse (B, H, S) float32.
    varlen: q, k, v (T, H, D); cu_seqlens int32 (batch + 1,); max_seqlen int >= every length;
    returns o (T, H, D) (rows past cu_seqlens[-1] zero) and lse (H, T) float32.
    A query row with no real key gives zeros and lse = -inf."""
    return _forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, False)


def forward_inference(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale):
    """o of `forward` when nothing will read lse: lse goes to a shared scratch buffer
    (roberta_fast._utils.stats_scratch) with the same strides, each row's slot written once."""
    return _forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, True)[0]


def _forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, scratch_lse):
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    L = _layout(q, key_padding_mask, cu_seqlens, max_seqlen)
    D = L["head_dim"]
    scale = D ** -0.5 if scale is None else float(scale)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    st = L["stat_shape"]
    if scratch_lse:  # the same strides into a scratch buffer of at least as many elements
        lse = stats_scratch(q.device, st[0] * st[1] * (st[2] if len(st) == 3 else 1))
    else:
        lse = torch.empty(st, dtype=torch.float32, device=q.device)
    vl, mask = L["varlen"], L["mask"]
    mod = lib(q)
    with device_guard(q):
        mod.attention_fwd(
            q=ptr(q), q_strides=_strides(q, vl), k=ptr(k), k_strides=_strides(k, vl), v=ptr(v),
            v_strides=_strides(v, vl), o=ptr(o), o_strides=_strides(o, vl), lse=ptr(lse),
            lse_batch_stride=L["stat_strides"][0], lse_head_stride=L["stat_strides"][1],
            key_padding_mask=ptr(mask), mask_batch_stride=0 if mask is None else mask.stride(0),
            cu_seqlens=ptr(L["cu"]), total_rows=q.shape[0] if vl else 0, batch=L["batch"],
            heads=L["heads"], seqlen=L["seqlen"], head_dim=D, scale=scale, dtype=dtype_code(mod, q.dtype),
            stream=stream(q))
    return o, lse


def backward(do, q, k, v, o, lse, key_padding_mask, cu_seqlens, max_seqlen, scale):
    """Gradients of attention_fwd. do, o: like q; lse: the forward's (B, H, S) or (H, T) float32.
    Returns dq, dk, dv contiguous in q's layout and dtype (varlen rows past cu_seqlens[-1]: zeros).
    delta = rowsum(do * o) and the fp32 -> q.dtype cast of dq are plain torch ops around one kernel."""
    q, k, v, do = _aligned(q), _aligned(k), _aligned(v), _aligned(do.to(q.dtype))
    L = _layout(q, key_padding_mask, cu_seqlens, max_seqlen)
    D = L["head_dim"]
    scale = D ** -0.5 if scale is None else float(scale)
    vl, mask = L["varlen"], L["mask"]
    rowdot = (do.float() * o.float()).sum(-1)  # (B, S, H) or (T, H)
    delta = (rowdot.t() if vl else rowdot.transpose(1, 2)).contiguous()
    lse = lse.to(torch.float32).contiguous()
    dq_accum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    new = torch.zeros if vl else torch.empty  # varlen: rows outside every sequence stay zero
    dk = new(q.shape, dtype=q.dtype, device=q.device)
    dv = new(q.shape, dtype=q.dtype, device=q.device)
    mod = lib(q)
    with device_guard(q):
        mod.attention_bwd(
            q=ptr(q), q_strides=_strides(q, vl), k=ptr(k), k_strides=_strides(k, vl), v=ptr(v),
            v_strides=_strides(v, vl), dout=ptr(do), do_strides=_strides(do, vl), lse=ptr(lse), delta=ptr(delta),
            lse_batch_stride=L["stat_strides"][0], lse_head_stride=L["stat_strides"][1], dq_accum=ptr(dq_accum),
            dk=ptr(dk), dv=ptr(dv), g_strides=_strides(dk, vl), key_padding_mask=ptr(mask),
            mask_batch_stride=0 if mask is None else mask.stride(0), cu_seqlens=ptr(L["cu"]),
            batch=L["batch"], heads=L["heads"], seqlen=L["seqlen"], head_dim=D, scale=scale,
            dtype=dtype_code(mod, q.dtype), stream=stream(q))
    return dq_accum.to(q.dtype), dk, dv
