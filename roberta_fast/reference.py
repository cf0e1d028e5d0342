"""Plain-PyTorch reference of every op: the "torch" backend (CPU path) and the test oracle.

Each function computes in float32 (float64 when given float64, as the tests' oracle does), with autocast
off, and returns the input's dtype. They are differentiable through ordinary autograd. Shapes and semantics
are those of roberta_fast.ops; the op layer checks arguments before calling these.

Attention has two implementations with one contract. `attention_math` / `attention_varlen_math` are the
explicit math (q k^T, masked softmax, p v): the oracle, used for float64 (what the tests pass) and for
tensors not on the CPU. On CPU tensors in float32 / float16 / bfloat16, `attention` / `attention_varlen` run
torch's scaled_dot_product_attention (its fused CPU kernel, several times faster than the explicit math and
never materializing the S x S scores) on float32 inputs, with the same semantics made explicit around it
(docs/cpu_path.md).
"""

from __future__ import annotations

import functools
import itertools

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


def dropout_keep(rng, shape, p, device):
    """(shape) bool, True where an element is kept (probability 1 - p): the torch backend's dropout mask, a
    deterministic function of rng = (seed, offset) (int64 (2,), read on the device, never on the host) and of
    the element's flat position. A splitmix64-style hash in int64 torch ops (wrapping multiplies; logical
    shifts as arithmetic shifts masked), its top 53 bits as a uniform in [0, 1)."""
    n = 1
    for s in shape:
        n *= s
    z = torch.arange(n, dtype=torch.int64, device=device) * -7046029254386353131 + rng[1] * -4658895280553007687
    z = z ^ rng[0]

    def srl(t, k):  # logical right shift of int64
        return (t >> k) & ((1 << (64 - k)) - 1)

    for _ in range(2):
        z = (z ^ srl(z, 30)) * -4658895280553007687
        z = (z ^ srl(z, 27)) * -7723592293110705685
        z = z ^ srl(z, 31)
    u = srl(z, 11).to(torch.float64) * (2.0 ** -53)
    return (u >= p).view(shape)


@_exact
def layer_norm(x, weight, bias, eps=1e-5, residual=None, x_bias=None, dropout_p=0.0, rng=None):
    """LayerNorm(dropout(x + x_bias) + residual) over the last dim. x: (..., N); weight, bias, x_bias: (N,);
    dropout_p in [0, 1) with rng int64 (2,) (seed, offset) when > 0: the mask is `dropout_keep`'s, kept
    elements scaled by 1 / (1 - dropout_p)."""
    acc = _acc(x.dtype)
    h = x.to(acc)
    if x_bias is not None:
        h = h + x_bias.to(acc)
    if dropout_p > 0:
        keep = dropout_keep(rng, h.shape, dropout_p, h.device)
        h = h * (keep.to(acc) * (1.0 / (1.0 - dropout_p)))
    if residual is not None:  # in place on our own temporary (one allocation fewer), never on x
        h = h.add_(residual) if h is not x else h + residual.to(acc)
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
    if h is not x and not (torch.is_grad_enabled() and h.requires_grad):
        # inference: GELU in place on our own temporary (x + bias), one (..., N) allocation fewer
        return torch.ops.aten.gelu_(h, approximate=approximate).to(x.dtype)
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
def attention(q, k, v, key_padding_mask=None, scale=None, dropout_p=0.0, rng=None):
    """Non-causal softmax(q k^T * scale) v per head.

    q, k, v: (batch, seqlen, heads, head_dim); key_padding_mask: bool (batch, seqlen), True = real
    key; the K and V rows of padded keys are ignored whatever they hold (NaN, inf). Query rows of a sequence
    with no real key give zeros (and zero gradients). Returns (batch, seqlen, heads, head_dim) in q's dtype.
    dropout_p > 0: O = dropout(P) V with the mask of `attention_dropout_keep` under rng (int64 (2,) (seed,
    offset), required then), kept probabilities scaled by 1 / (1 - dropout_p).
    CPU tensors in float32 / float16 / bfloat16 without dropout: scaled_dot_product_attention in float32;
    otherwise (float64, other devices, dropout) the explicit math, attention_math.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if dropout_p == 0 and _use_sdpa(q):
        return _attention_sdpa(q, k, v, key_padding_mask, scale)
    return attention_math(q, k, v, key_padding_mask, scale, dropout_p, rng)


@_exact
def attention_varlen(q, k, v, cu_seqlens, max_seqlen=None, scale=None, dropout_p=0.0, rng=None):
    """Padding-free attention: q, k, v (total_tokens, heads, head_dim), cu_seqlens int32 (batch + 1,)
    cumulative lengths from 0 (read on the host); each sequence attends to itself only. Rows past
    cu_seqlens[-1] are zeros. dropout_p, rng as in `attention` (sequence i's mask is that of batch row i of a
    padded batch). CPU tensors in float32 / float16 / bfloat16 without dropout: scaled_dot_product_attention in
    float32, one call per run of consecutive sequences of equal length; otherwise attention_varlen_math."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if dropout_p == 0 and _use_sdpa(q):
        return _attention_varlen_sdpa(q, k, v, cu_seqlens, scale)
    return attention_varlen_math(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng)


# ------------------------------------------------------------------------- attention: the explicit math


@_exact
def attention_math(q, k, v, key_padding_mask=None, scale=None, dropout_p=0.0, rng=None, first_seq=0):
    """attention written out (q k^T, masked_softmax, dropout, p v) in float32, float64 for float64 inputs: the
    oracle. first_seq: the sequence index of batch row 0 in the dropout mask (attention_varlen_math's)."""
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
    if dropout_p > 0:
        B, H, Sq, Sk = p.shape
        keep = attention_dropout_keep(rng, dropout_p, first_seq, B, H, Sq, Sk)
        p = torch.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    o = torch.matmul(p, vf)  # (B, H, Sq, D)
    return o.transpose(1, 2).to(q.dtype)


@_exact
def attention_varlen_math(q, k, v, cu_seqlens, max_seqlen=None, scale=None, dropout_p=0.0, rng=None):
    """attention_varlen as one attention_math call per sequence: the oracle."""
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for i in range(len(bounds) - 1):
        s, e = bounds[i], bounds[i + 1]
        if e > s:
            out[s:e] = attention_math(q[None, s:e], k[None, s:e], v[None, s:e], scale=scale, dropout_p=dropout_p,
                                      rng=rng, first_seq=i)[0]
    return out


# ------------------------------------------------------------------- attention: the torch dropout mask

_I64 = 2**64


def _signed(c: int) -> int:
    return c - _I64 if c >= 2**63 else c


_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)  # splitmix64's finalizer


def _shr(x, s: int):
    """Logical right shift of int64 tensors (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x):
    """splitmix64's finalizer in int64 torch ops (multiplication wraps): a bijection of 64-bit words."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def attention_dropout_keep(rng, dropout_p, first_seq, batch, heads, rows, cols):
    """The torch backend's attention dropout mask: bool (batch, heads, rows, cols), True = kept, with
    probability 1 - dropout_p each. A hash of (seed, offset) = rng (int64 (2,), read on its device, never on
    the host), head index (first_seq + b) * heads + h, query row and key (indices inside the sequence): the
    same element gets the same decision in the forward and the backward, and in a padded batch and the varlen
    batch of the same sequences."""
    if rng is None:
        raise ValueError("attention: dropout_p > 0 needs rng (int64 (2,) seed, offset)")
    dev = rng.device
    ar = functools.partial(torch.arange, dtype=torch.int64, device=dev)
    h = _mix(rng[0] ^ _mix(rng[1]))
    bh = ((first_seq + ar(batch))[:, None] * heads + ar(heads)[None, :])[:, :, None, None]
    h = _mix(h ^ bh)  # (B, H, 1, 1)
    h = _mix(h ^ ar(rows)[:, None])  # (B, H, rows, 1)
    h = _mix(h ^ ar(cols))  # (B, H, rows, cols)
    # the top 53 bits as an integer in [0, 2**53) against the threshold dropout_p * 2**53
    return _shr(h, 11) >= int(round(dropout_p * 2**53))


# ---------------------------------------------------------------- attention on CPU: fused SDPA kernel


def _use_sdpa(q) -> bool:
    """The CPU path: float32 / float16 / bfloat16 CPU tensors (float64 is the oracle's, kept explicit)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _sdpa(q, k, v, mask, scale):
    """scaled_dot_product_attention on (n, seqlen, heads, head_dim) float32 views -> (n, seqlen, heads,
    head_dim) (a view of its (n, heads, seqlen, head_dim) output, contiguous in this order on the CPU)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       scale=scale)
    return o.transpose(1, 2)


def _attention_sdpa(q, k, v, key_padding_mask, scale):
    """attention's semantics on scaled_dot_product_attention, which has none of them for padded keys: a
    fully masked row would be NaN (or whatever its kernel gives) and a NaN in a padded K or V row reaches
    real rows (0 * NaN). So K and V are zeroed at padded keys, and a sequence with no real key gets its
    q zeroed and every key let in: its rows are then softmax(0) @ 0 = 0 exactly, gradients 0 too. Host
    reads of the mask (free on CPU tensors) skip that work when there is no padding or no such sequence;
    under torch.compile nothing is read and the work is done unconditionally (one graph)."""
    qf, kf, vf = (t.float() for t in (q, k, v))  # (B, S, H, D); no copy for float32
    mask = key_padding_mask
    if mask is not None:
        reads = not torch.compiler.is_compiling()
        if reads and bool(mask.all()):
            mask = None
        else:
            keep = mask[:, :, None, None]  # (B, Sk, 1, 1)
            kf, vf = kf.masked_fill(~keep, 0.0), vf.masked_fill(~keep, 0.0)
            dead = ~mask.any(1)  # (B,) sequences with no real key
            if not reads or bool(dead.any()):
                qf = qf.masked_fill(dead[:, None, None, None], 0.0)
                mask = mask | dead[:, None]
            mask = mask[:, None, None, :]  # (B, 1, 1, Sk)
    return _sdpa(qf, kf, vf, mask, scale).to(q.dtype)


def _attention_varlen_sdpa(q, k, v, cu_seqlens, scale):
    """One SDPA call per run of consecutive sequences of equal length (a view of the packed rows, no copy;
    a packed batch of one length is one call), outputs concatenated in order, zeros after cu_seqlens[-1].
    Padding sequences into buckets (gather, mask, scatter) measured slower on CPU for lengths uniform in
    [0.2 S, S]: the padding's extra work outweighs the ~20 us saved per call (docs/cpu_path.md)."""
    bounds = cu_seqlens.tolist()
    total = bounds[-1]
    lens = [e - s for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    if not lens:
        return torch.zeros_like(q)
    runs = [(n, sum(1 for _ in g)) for n, g in itertools.groupby(lens)]  # (length, count)
    parts = [t[:total].float().split([n * c for n, c in runs]) for t in (q, k, v)]
    outs = [_sdpa(*(p.unflatten(0, (c, n)) for p in qkv), None, scale).flatten(0, 1)  # (c * n, H, D)
            for (n, c), qkv in zip(runs, zip(*parts))]
    if q.shape[0] > total:
        outs.append(q.new_zeros((q.shape[0] - total, *q.shape[1:]), dtype=torch.float32))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.to(q.dtype)
