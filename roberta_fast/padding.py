"""Unpad a padded batch once, repad it once: the padding-free layout of the encoder. The model packs and
unpacks padded batches here and nowhere else.

A padded batch (B, S, ...) with an attention mask (B, S) holds T <= B*S real tokens. The encoder packs
the real tokens into (T, ...) right after the embeddings, runs every GEMM and kernel on those T rows
(attention with `ops.attention_varlen`, which takes `cu_seqlens` and `max_seqlen`), and scatters the
result back to (B, S, ...) at the end, with zeros at the padded positions.

    indices     int64 (T,)      row of each real token in the flattened (B*S) batch, in order
    cu_seqlens  int32 (B + 1,)  cumulative real lengths from 0: sequence b is rows cu[b]:cu[b+1] of (T, ...)
    max_seqlen  int             the longest real length (a host int)

T and max_seqlen are data: reading them synchronizes with the device. `mask_stats` gives them as device
scalars so that a caller can read them back together with anything else it needs (the model reads them
with its input range checks, in one sync); `pack_indices` then needs no sync at all. `seqlens_info` and
`unpad_input` do the read themselves (one sync).

`Layout` says where the real tokens of a batch are and moves (B, S, ...) tensors to the rows the layers
run on and back: packed (T rows), padded with a mask (B*S rows, e.g. under a caller's CUDA graph capture, where
no sync is allowed) or dense (B*S rows, every position real). The model's own CUDA graphs (model/graphs.py) run
the packed layout on a token bucket's rows, with static cu_seqlens.

Real tokens need not be a prefix of each row: any mask pattern packs in row-major order. Both
directions are differentiable (index_select / index_copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def real_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) mask (bool, or numbers where nonzero = real token) -> contiguous bool (B, S), True = real."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D (batch, seqlen), got shape {tuple(attention_mask.shape)}")
    real = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    return real.contiguous()


def mask_stats(real: torch.Tensor):
    """real bool (B, S), B*S > 0 -> (seqlens int32 (B,), total real tokens, longest real length), the last
    two as 0-dim device tensors (not read back: no sync)."""
    seqlens = real.sum(dim=1, dtype=torch.int32)  # (B,)
    return seqlens, seqlens.sum(), seqlens.max()


def pack_indices(real: torch.Tensor, seqlens: torch.Tensor, total: int):
    """real bool (B, S), seqlens int32 (B,) (its row sums), total = number of real tokens (a host int).
    Returns (indices int64 (T,), cu_seqlens int32 (B + 1,)) without synchronizing."""
    # rows of the real tokens in order: a stable sort puts real (key 0) before padding (key 1)
    indices = torch.argsort((~real).flatten().to(torch.int8), stable=True)[:total]  # (T,)
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))  # (B + 1,)
    return indices, cu_seqlens


def seqlens_info(attention_mask: torch.Tensor):
    """From a (B, S) mask (bool, or numbers where nonzero = real token) to (indices, cu_seqlens, max_seqlen).

    indices int64 (T,), cu_seqlens int32 (B + 1,), max_seqlen int. Synchronizes with the device once
    (for max_seqlen and the number of real tokens).
    """
    real = real_tokens(attention_mask)
    if real.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=real.device)
        return empty, torch.zeros(real.shape[0] + 1, dtype=torch.int32, device=real.device), 0
    seqlens, total, longest = mask_stats(real)
    total, longest = torch.stack([total, longest]).tolist()  # the one sync
    indices, cu_seqlens = pack_indices(real, seqlens, total)
    return indices, cu_seqlens, longest


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


@dataclass
class Layout:
    """Where the real tokens of a (B, S) batch are, and the rows the layers run on:

    packed (`cu_seqlens` set): T rows, the real tokens in order (cu_seqlens, max_seqlen for attention_varlen;
        `indices` places them in the (B, S) batch; a CUDA graph's static layout has none: its rows never
        leave the graph through this layout);
    padded (`mask` set, no cu_seqlens): B*S rows, mask (B, S) bool (True = real) for attention's key padding;
    dense (neither): B*S rows, every position real.
    """

    batch: int
    seqlen: int
    mask: torch.Tensor | None = None  # (B, S) bool, True = real token
    indices: torch.Tensor | None = None  # (T,) int64
    cu_seqlens: torch.Tensor | None = None  # (B + 1,) int32
    max_seqlen: int = 0

    @classmethod
    def packed(cls, real: torch.Tensor, seqlens: torch.Tensor, total: int, max_seqlen: int) -> Layout:
        """From real bool (B, S), seqlens int32 (B,) and the host-read total / max_seqlen of mask_stats."""
        indices, cu_seqlens = pack_indices(real, seqlens, total)
        return cls(real.shape[0], real.shape[1], real, indices, cu_seqlens, max_seqlen)

    @property
    def is_packed(self) -> bool:
        return self.cu_seqlens is not None

    def to_rows(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """(B, S, ...) -> (rows, ...) of this layout (None stays None)."""
        if x is None:
            return None
        if self.is_packed:
            return index_first_axis(x, self.indices)
        return x.reshape(self.batch * self.seqlen, *x.shape[2:])

    def to_padded(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, ...) -> (B, S, ...), zeros at padded positions."""
        if self.is_packed:
            return pad_input(x, self.indices, self.batch, self.seqlen)
        x = x.view(self.batch, self.seqlen, *x.shape[1:])
        if self.mask is not None:
            x = x.masked_fill(~self.mask.view(*self.mask.shape, *([1] * (x.dim() - 2))), 0)
        return x


def labelled_rows(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """The rows of hidden (..., H) whose label (same leading shape) is not ignore_index, and those labels:
    ((n, H), (n,)), in order. Finding them reads the labels on the host once (their count sizes the result)."""
    flat = labels.to(hidden.device).reshape(-1)
    keep = (flat != ignore_index).nonzero()[:, 0]  # (n,)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep), flat.index_select(0, keep)
