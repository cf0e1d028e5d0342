"""Unpad a padded batch once, repad it once: the padding-free layout of the encoder.

A padded batch (B, S, ...) with an attention mask (B, S) holds T <= B*S real tokens. The encoder packs
the real tokens into (T, ...) right after the embeddings, runs every GEMM and kernel on those T rows
(attention with `ops.attention_varlen`, which takes `cu_seqlens` and `max_seqlen`), and scatters the
result back to (B, S, ...) at the end, with zeros at the padded positions.

    indices     int64 (T,)      row of each real token in the flattened (B*S) batch, in order
    cu_seqlens  int32 (B + 1,)  cumulative real lengths from 0: sequence b is rows cu[b]:cu[b+1] of (T, ...)
    max_seqlen  int             the longest real length (a host int: reading it synchronizes once)

Real tokens need not be a prefix of each row: any mask pattern packs in row-major order. Both
directions are differentiable (index_select / index_copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _real(attention_mask: torch.Tensor) -> torch.Tensor:
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D (batch, seqlen), got shape {tuple(attention_mask.shape)}")
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0


def seqlens_info(attention_mask: torch.Tensor):
    """From a (B, S) mask (bool, or numbers where nonzero = real token) to (indices, cu_seqlens, max_seqlen).

    indices int64 (T,), cu_seqlens int32 (B + 1,), max_seqlen int. Synchronizes with the device once
    (for max_seqlen and the number of real tokens).
    """
    real = _real(attention_mask)
    seqlens = real.sum(dim=1, dtype=torch.int32)  # (B,)
    indices = torch.nonzero(real.flatten(), as_tuple=False).flatten()  # (T,)
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))  # (B + 1,)
    return indices, cu_seqlens, max_seqlen


def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B, S, ...) -> (T, ...): the rows of the flattened (B*S) batch named by indices."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).index_select(0, indices)


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Pack the real tokens of a padded batch.

    hidden (B, S, ...) any dtype; attention_mask (B, S) bool or numbers (nonzero = real token).
    Returns (packed (T, ...), indices int64 (T,), cu_seqlens int32 (B + 1,), max_seqlen int).
    """
    if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"unpad_input: attention_mask shape {tuple(attention_mask.shape)} does not match "
                         f"hidden's leading dims {tuple(hidden.shape[:2])}")
    indices, cu_seqlens, max_seqlen = seqlens_info(attention_mask)
    return index_first_axis(hidden, indices), indices, cu_seqlens, max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Scatter packed rows back to a padded batch: (T, ...) -> (B, S, ...), zeros at padded positions."""
    if packed.shape[0] != indices.shape[0]:
        raise ValueError(f"pad_input: {packed.shape[0]} packed rows but {indices.shape[0]} indices")
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))  # (B*S, ...)
    out = out.index_copy(0, indices, packed)
    return out.view(batch, seqlen, *packed.shape[1:])
