"""Plain-PyTorch reference of every op: the "torch" backend (CPU path) and the test oracle.

Each function computes in float32 (float64 when given float64, as the tests' oracle does), with autocast
off, and returns the input's dtype. They are differentiable through ordinary autograd. Shapes and semantics
are those of roberta_fast.ops; the op layer checks arguments before calling these.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _exact(fn):
    """Run fn with autocast off on its first tensor's device: the reference computes in the precision it
    states (float32, float64 for float64 inputs) whatever autocast region it is called from."""

    @functools.wraps(fn)
    def run(t, *args, **kwargs):
        if t.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(t.device.type):
            with torch.autocast(t.device.type, enabled=False):
                return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)

    return run


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@_exact
def layer_norm(x, weight, bias, eps=1e-5, residual=None, x_bias=None):
    """LayerNorm(x + x_bias + residual) over the last dim. x: (..., N); weight, bias, x_bias: (N,)."""
    acc = _acc(x.dtype)
    h = x.to(acc)
    if x_bias is not None:
        h = h + x_bias.to(acc)
    if residual is not None:
        h = h + residual.to(acc)
    w = weight.to(acc) if weight is not None else None
    b = bias.to(acc) if bias is not None else None
    y = F.layer_norm(h, (x.shape[-1],), w, b, eps)
    return y.to(x.dtype)


@_exact
def bias_gelu(x, bias, approximate="none"):
    """GELU(x + bias). x: (..., N); bias: (N,) or None; approximate "none" (erf) or "tanh"."""
    acc = _acc(x.dtype)
    h = x.to(acc)
    if bias is not None:
        h = h + bias.to(acc)
    return F.gelu(h, approximate=approximate).to(x.dtype)


@_exact
def masked_softmax(scores, mask=None, scale=1.0):
    """softmax(scale * scores, masked) over the last dim.

    mask: None, bool (True = keep) or additive float (added after scaling, like transformers'
    extended attention mask), broadcastable to scores. An element is masked when the bool mask is
    False or the additive mask is -inf; a row with every element masked gives zeros, not NaN.
    """
    acc = _acc(scores.dtype)
    s = scores.to(acc) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask.to(acc)
    row_max = s.amax(dim=-1, keepdim=True)
    dead = row_max == float("-inf")  # fully masked row (NaN rows stay NaN)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1)
    p = p.masked_fill(dead, 0.0)
    return p.to(scores.dtype)


@_exact
def attention(q, k, v, key_padding_mask=None, scale=None):
    """Non-causal softmax(q k^T * scale) v per head.

    q, k, v: (batch, seqlen, heads, head_dim); key_padding_mask: bool (batch, seqlen), True = real
    key; the K and V rows of padded keys are ignored whatever they hold (NaN, inf). Query rows of a sequence
    with no real key give zeros. Returns (batch, seqlen, heads, head_dim).
    """
    acc = _acc(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = (t.to(acc).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, Sk)
        # what a padded key holds never reaches a real row (0 * NaN would): its K and V count as 0
        kf, vf = (t.masked_fill(~mask.transpose(-1, -2), 0.0) for t in (kf, vf))
    s = torch.matmul(qf, kf.transpose(-1, -2))  # (B, H, Sq, Sk)
    p = masked_softmax(s, mask, scale)
    o = torch.matmul(p, vf)  # (B, H, Sq, D)
    return o.transpose(1, 2).to(q.dtype)


@_exact
def attention_varlen(q, k, v, cu_seqlens, max_seqlen=None, scale=None):
    """Padding-free attention: q, k, v (total_tokens, heads, head_dim), cu_seqlens int32 (batch + 1,)
    cumulative lengths from 0; each sequence attends to itself only. Rows past cu_seqlens[-1] are
    left as zeros."""
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for i in range(len(bounds) - 1):
        s, e = bounds[i], bounds[i + 1]
        if e > s:
            out[s:e] = attention(q[None, s:e], k[None, s:e], v[None, s:e], scale=scale)[0]
    return out
