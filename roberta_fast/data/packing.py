"""Packing tokenized documents into padding-free batches of a token budget.

A batch is a `PackedBatch`: the token ids of every sequence back to back (T,) and cu_seqlens (n + 1,) int32,
the layout of ops.attention_varlen, so no compute is spent on padding. Two modes (`mode=`):

  "documents"       each document is its own sequence (cut into pieces of at most max_seqlen tokens, each
                    piece <s> ... </s>); tokens never attend across documents. What a padding-free encoder
                    makes cheap, and closest to RoBERTa's DOC-SENTENCES (which packed sentences of one
                    document only, and varied the batch size to keep tokens per batch constant).
  "full_sentences"  RoBERTa's FULL-SENTENCES (Liu et al. 2019, section 4.2, the input format of the released
                    models): one continuous stream of the documents' tokens, an extra separator token (</s>)
                    between documents, cut into sequences of exactly max_seqlen tokens (<s> ... </s> included);
                    a sequence may span document boundaries and attends across them. Every sequence but the
                    stream's last is full length, so batches hold budget // max_seqlen sequences.

Both read documents lazily (any iterable of token-id lists, e.g. a tokenizing generator over files), so the
corpus need not fit in memory: one batch's tokens are held at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch

MODES = ("documents", "full_sentences")


@dataclasses.dataclass
class PackedBatch:
    """input_ids (T,) int64 of every sequence back to back; cu_seqlens (n + 1,) int32 from 0; max_seqlen."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def to_padded(self, pad_token_id: int, width: int | None = None):
        """(input_ids (n, width) with pad_token_id after each sequence, attention_mask (n, width) int64): the
        padded form transformers-style models take (our model unpads it again once, after the embeddings)."""
        lengths = self.lengths().long()
        width = int(self.max_seqlen if width is None else width)
        n = lengths.numel()
        mask = torch.arange(width)[None, :] < lengths[:, None]  # (n, width)
        ids = torch.full((n, width), pad_token_id, dtype=torch.int64)
        ids[mask] = self.input_ids
        return ids, mask.long()

    def scatter(self, padded: torch.Tensor) -> torch.Tensor:
        """The real tokens of a (n, width, ...) tensor laid out like to_padded's, back to (T, ...)."""
        lengths = self.lengths().long()
        mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
        return padded[mask]


def _pieces(doc, max_seqlen: int, bos: int, eos: int):
    """A document's pieces of at most max_seqlen tokens, each <s> ... </s>."""
    body = max_seqlen - 2
    for i in range(0, max(len(doc), 1), body):
        piece = doc[i:i + body]
        if piece:
            yield [bos, *piece, eos]


def _stream(docs, max_seqlen: int, bos: int, eos: int, sep: int):
    """FULL-SENTENCES: sequences of exactly max_seqlen (the last may be shorter), <s> ... </s>, the documents'
    tokens back to back with `sep` between documents."""
    body = max_seqlen - 2
    buf: list[int] = []
    first = True
    for doc in docs:
        if not doc:
            continue
        if not first:
            buf.append(sep)
        first = False
        buf.extend(doc)
        while len(buf) >= body:
            yield [bos, *buf[:body], eos]
            del buf[:body]
    if buf:
        yield [bos, *buf, eos]


def pack(docs: Iterable, *, max_tokens: int, max_seqlen: int = 512, mode: str = "full_sentences", bos: int = 0,
         eos: int = 2, sep: int | None = None, drop_last: bool = False) -> Iterator[PackedBatch]:
    """Batches of at most max_tokens tokens (a token budget, not a sequence count) from `docs`, an iterable of
    token-id lists without special tokens (read lazily).

    max_seqlen  longest sequence, <s> and </s> included (RoBERTa: 512)
    mode        "full_sentences" (RoBERTa's; sequences cross documents, `sep` between them) or "documents"
                (one document per sequence, never attending across documents); see the module docstring
    bos, eos    <s> and </s> (RoBERTa's ids 0 and 2); sep defaults to eos, as RoBERTa's separator is </s>
    drop_last   drop a last batch that is not full (FULL-SENTENCES: and a last sequence shorter than max_seqlen)
    """
    if mode not in MODES:
        raise ValueError(f"pack: mode must be one of {MODES}, got {mode!r}")
    if max_seqlen < 3:
        raise ValueError(f"pack: max_seqlen must be >= 3 (<s>, a token, </s>), got {max_seqlen!r}")
    if max_tokens < max_seqlen:
        raise ValueError(f"pack: max_tokens ({max_tokens}) must be >= max_seqlen ({max_seqlen}), so that the "
                         f"longest sequence fits in a batch")
    sep = eos if sep is None else sep
    if mode == "full_sentences":
        seqs = _stream(docs, max_seqlen, bos, eos, sep)
    else:
        seqs = (p for d in docs for p in _pieces(d, max_seqlen, bos, eos))
    batch: list[list[int]] = []
    used = 0
    for s in seqs:
        if drop_last and mode == "full_sentences" and len(s) < max_seqlen:
            continue
        if used + len(s) > max_tokens:
            yield _make(batch)
            batch, used = [], 0
        batch.append(s)
        used += len(s)
    if batch and not (drop_last and used + max_seqlen <= max_tokens):
        yield _make(batch)


def _make(seqs) -> PackedBatch:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
    return PackedBatch(ids, cu, int(lengths.max()))
