"""linear_cross_entropy: cross_entropy(hidden @ weight^T + bias, labels) fused, so that the (tokens x vocab) logits
never exist, in the forward or the backward. The masked-LM head's decoder (weights tied to the word embeddings)
and its loss in one op: RoBERTa's vocabulary is 50,265, so the logits of 32 x 512 tokens would be 1.6 GB in
fp16 (and more in the fp32 copies F.cross_entropy makes).

Backends: "triton" (kernels/linear_cross_entropy.py: tl.dot tiles with an online log-sum-exp, the backward by
vocabulary chunks), "torch" (this file, `TorchBackend`: the same chunked algorithm in plain torch, the CPU
path), "cuda" (no CUDA C++ kernel: it says so through `unsupported`, so the automatic choice skips it). Both
go through a torch.library custom op with a fake implementation and autograd; the reduction is ordinary torch
on top of the per-row losses.
"""

from __future__ import annotations

import math

import torch

from .. import backends
from .._utils import unit_last_stride
from ._checks import check_param_dtype, check_same_device, check_tensor, train_mode

_OP = "linear_cross_entropy"
_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- the torch backend


class TorchBackend:
    """The chunked algorithm in plain torch (the CPU path, and any device without the kernels): logits of
    CHUNK columns at a time in float32, an online log-sum-exp over the chunks; the backward recomputes each
    chunk. The largest tensor either pass makes is (M, C) with C = chunk_columns(M, V) < V once M * V exceeds
    CHUNK_ELEMS. Same contract as the kernel backends (roberta_fast.backends.LinearCrossEntropyBackend)."""

    CHUNK_ELEMS = 1 << 22  # elements of one (M, C) float32 chunk: 16 MB
    CHUNK_MIN = 256

    @classmethod
    def chunk_columns(cls, M: int, V: int) -> int:
        return max(1, min(V, max(cls.CHUNK_MIN, cls.CHUNK_ELEMS // max(M, 1))))

    @staticmethod
    def unsupported(hidden, weight, bias, labels, ignore_index, label_smoothing):
        return None

    @classmethod
    def _chunks(cls, hidden, weight, bias):
        """(v0, c, z (M, c) float32 logits of columns v0 .. v0 + c) per chunk; h in float32 once."""
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        h = hidden.to(acc)
        M, V = hidden.shape[0], weight.shape[0]
        C = cls.chunk_columns(M, V)
        for v0 in range(0, V, C):
            c = min(C, V - v0)
            z = h @ weight[v0:v0 + c].to(acc).T  # (M, c)
            if bias is not None:
                z += bias[v0:v0 + c].to(acc)
            yield v0, c, z, h

    @classmethod
    def forward(cls, hidden, weight, bias, labels, ignore_index, label_smoothing):
        """hidden (M, H); weight (V, H); bias (V,) or None; labels (M,) int64 -> (loss (M,) fp32, lse (M,) fp32)."""
        M, V = hidden.shape[0], weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0)
        m = torch.full((M,), -math.inf, dtype=acc, device=hidden.device)
        s = torch.zeros((M,), dtype=acc, device=hidden.device)
        zy = torch.zeros_like(s)
        zs = torch.zeros_like(s)
        for v0, c, z, _ in cls._chunks(hidden, weight, bias):
            m_new = torch.maximum(m, z.amax(1))
            s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(1)
            m = m_new
            inside = (safe >= v0) & (safe < v0 + c)
            at = z.gather(1, (safe - v0).clamp(0, c - 1)[:, None])[:, 0]
            zy = zy + torch.where(inside, at, 0.0)
            if label_smoothing:
                zs = zs + z.sum(1)
        lse = m + torch.log(s)
        loss = lse - (1.0 - label_smoothing) * zy
        if label_smoothing:
            loss = loss - (label_smoothing / V) * zs
        out = torch.float32 if acc == torch.float32 else acc
        return torch.where(valid, loss, 0.0).to(out), lse.to(out)

    @classmethod
    def backward(cls, dloss, hidden, weight, bias, labels, lse, ignore_index, label_smoothing):
        """-> (dhidden (M, H) hidden.dtype, dweight (V, H) weight.dtype, dbias (V,) bias.dtype or None)."""
        M, H = hidden.shape
        V = weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0)
        g = torch.where(valid, dloss.to(acc), 0.0)[:, None]  # (M, 1)
        lse = torch.where(valid, lse.to(acc), 0.0)[:, None]  # ignored rows: any finite value (g is 0 there)
        keep, spread = 1.0 - label_smoothing, label_smoothing / V
        dh = torch.zeros((M, H), dtype=acc, device=hidden.device)
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        db = None if bias is None else torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)
        for v0, c, z, h in cls._chunks(hidden, weight, bias):
            dz = torch.exp(z - lse)  # softmax of the chunk, (M, c)
            if spread:
                dz -= spread
            inside = ((safe >= v0) & (safe < v0 + c) & valid).to(acc)
            dz.scatter_add_(1, (safe - v0).clamp(0, c - 1)[:, None], (-keep * inside)[:, None])
            dz *= g
            dh += dz @ weight[v0:v0 + c].to(acc)
            dw[v0:v0 + c] = dz.T @ h
            if db is not None:
                db[v0:v0 + c] = dz.sum(0)
        return dh.to(hidden.dtype), dw, db


def _impl(backend: str):
    return TorchBackend if backend == "torch" else backends.implementation(backend, _OP)


# ----------------------------------------------------------------------------- the custom ops


@torch.library.custom_op(
    "roberta_fast::linear_cross_entropy_fwd", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, float label_smoothing, "
           "str backend) -> (Tensor, Tensor)",
)
def _fwd(hidden, weight, bias, labels, ignore_index, label_smoothing, backend):
    return _impl(backend).forward(hidden, weight, bias, labels, ignore_index, label_smoothing)


@_fwd.register_fake
def _fwd_fake(hidden, weight, bias, labels, ignore_index, label_smoothing, backend):
    M = hidden.shape[0]
    return hidden.new_empty((M,), dtype=torch.float32), hidden.new_empty((M,), dtype=torch.float32)


@torch.library.custom_op(
    "roberta_fast::linear_cross_entropy_bwd", mutates_args=(),
    schema="(Tensor dloss, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse, int ignore_index, "
           "float label_smoothing, str backend) -> Tensor[]",
)
def _bwd(dloss, hidden, weight, bias, labels, lse, ignore_index, label_smoothing, backend):
    dh, dw, db = _impl(backend).backward(dloss, hidden, weight, bias, labels, lse, ignore_index, label_smoothing)
    return [dh, dw] if bias is None else [dh, dw, db]


@_bwd.register_fake
def _bwd_fake(dloss, hidden, weight, bias, labels, lse, ignore_index, label_smoothing, backend):
    out = [hidden.new_empty(hidden.shape), weight.new_empty(weight.shape)]
    return out if bias is None else [*out, bias.new_empty(bias.shape)]


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, label_smoothing, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.ignore_index, ctx.label_smoothing, ctx.backend = ignore_index, label_smoothing, backend


def _backward(ctx, dloss, dlse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    grads = _bwd(dloss.float().contiguous(), hidden, weight, bias, labels, lse, ctx.ignore_index,
                 ctx.label_smoothing, ctx.backend)
    return grads[0], grads[1], (grads[2] if bias is not None else None), None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- the public op


def linear_cross_entropy(hidden, weight, bias, labels, *, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                         backend=None):
    """F.cross_entropy(hidden @ weight.T + bias, labels, ...) without the logits: the vocabulary is walked in
    chunks with an online log-sum-exp (fp32 accumulation), and the backward recomputes the chunks, so no
    (tokens, V) tensor is made in either pass. Gradients for hidden, weight (e.g. the tied word embeddings) and
    bias.

    hidden           (..., H) float16 / bfloat16 / float32, any number of leading dims
    weight           (V, H) of hidden's dtype or float32 (the products run in hidden's dtype)
    bias             (V,) of hidden's dtype or float32, or None
    labels           (...) int64 or int32, hidden's leading shape; values in [0, V) or ignore_index (checked on
                     CPU tensors only: reading CUDA values would synchronize)
    ignore_index     int: rows with this label give no loss and no gradient (the masked LM's -100)
    label_smoothing  float in [0, 1]: torch's definition, (1 - eps) on the label and eps / V on every class
    reduction        "mean" (over the rows not ignored; NaN when every row is, as torch), "sum" or "none"
    backend          None (automatic), "torch", "triton" or "cuda" (has no kernel for this op: raises)
    returns          a scalar ("mean", "sum") or labels' shape ("none", 0 at ignored rows), hidden's dtype
    """
    _check_args(hidden, weight, bias, labels, ignore_index, label_smoothing, reduction)
    H = hidden.shape[-1]
    lead = labels.shape
    h2 = unit_last_stride(hidden.reshape(-1, H))  # (M, H) rows
    y = labels.reshape(-1).to(torch.int64).contiguous()  # (M,)
    weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    M = h2.shape[0]
    if M == 0:
        loss_rows = hidden.new_zeros((0,), dtype=torch.float32) + 0.0 * hidden.sum() + 0.0 * weight.sum()
    else:
        def unsupported(b):
            return _impl(b).unsupported(h2, weight, bias, y, ignore_index, label_smoothing)

        sig = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        b, _ = backends.choose(_OP, backend, hidden.device, sig, train_mode(hidden, weight, bias),
                               unsupported=unsupported)
        loss_rows, _ = _fwd(h2, weight, bias, y, int(ignore_index), float(label_smoothing), b)
    if reduction == "none":
        return loss_rows.view(lead).to(hidden.dtype)
    total = loss_rows.sum()
    if reduction == "sum":
        return total.to(hidden.dtype)
    return (total / (y != ignore_index).sum()).to(hidden.dtype)


def _check_args(hidden, weight, bias, labels, ignore_index, label_smoothing, reduction):
    check_tensor(_OP, "hidden", hidden, ndim_min=1)
    check_tensor(_OP, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must be 2-D (vocab, hidden), got shape {tuple(weight.shape)}")
    H, V = hidden.shape[-1], weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"{_OP}: weight must have shape (vocab, {H}) for hidden of shape {tuple(hidden.shape)}, "
                         f"got {tuple(weight.shape)}")
    if V == 0:
        raise ValueError(f"{_OP}: weight must have at least one row (class), got shape {tuple(weight.shape)}")
    check_param_dtype(_OP, "weight", weight, hidden)
    if bias is not None:
        check_tensor(_OP, "bias", bias)
        check_param_dtype(_OP, "bias", bias, hidden)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{_OP}: bias must have shape ({V},) (weight's rows), got {tuple(bias.shape)}")
    check_tensor(_OP, "labels", labels, dtypes=(torch.int64, torch.int32))
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{_OP}: labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    check_same_device(_OP, hidden=hidden, weight=weight, bias=bias, labels=labels)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{_OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"{_OP}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_OP}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if labels.device.type == "cpu" and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0, 0])
            raise ValueError(f"{_OP}: labels must be in [0, {V}) or ignore_index ({ignore_index}); "
                             f"got {int(labels.reshape(-1)[i])} at flat index {i}")

