"""What the models return: ModelOutput (attribute, key and index access, like transformers') and one class
per model kind; `pool` turns token states into sentence embeddings."""

from __future__ import annotations

import torch


class ModelOutput:
    """Like transformers' ModelOutput: attribute, key and index access; None fields are skipped by
    to_tuple(), integer indexing and iteration over keys."""

    _fields: tuple = ()

    def __init__(self, **kwargs):
        for name in self._fields:
            setattr(self, name, kwargs.pop(name, None))
        if kwargs:
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(kwargs)}")

    def keys(self):
        return [k for k in self._fields if getattr(self, k) is not None]

    def values(self):
        return [getattr(self, k) for k in self.keys()]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key):
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.keys())

    def __repr__(self):
        parts = []
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                parts.append(f"{k}=Tensor{tuple(v.shape)}")
            elif isinstance(v, tuple):
                parts.append(f"{k}=tuple[{len(v)}]")
            else:
                parts.append(f"{k}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class EncoderOutput(ModelOutput):
    """last_hidden_state (B, S, hidden); pooler_output (B, hidden) or None; hidden_states: tuple of
    num_layers + 1 tensors (B, S, hidden) (embeddings first) or None; attentions: tuple of num_layers
    tensors (B, heads, S, S) or None; cross_attentions: () when attentions are returned, else None, and
    cache: always None (an encoder keeps none): transformers 5's BaseModelOutputWithPoolingAndCrossAttentions,
    so the return_dict=False tuple has the same elements in the same order."""

    _fields = ("last_hidden_state", "pooler_output", "hidden_states", "cache", "attentions", "cross_attentions")


class MaskedLMOutput(ModelOutput):
    _fields = ("loss", "logits", "hidden_states", "attentions")


class SequenceClassifierOutput(ModelOutput):
    _fields = ("loss", "logits", "hidden_states", "attentions")


class TokenClassifierOutput(ModelOutput):
    _fields = ("loss", "logits", "hidden_states", "attentions")


class QuestionAnsweringModelOutput(ModelOutput):
    _fields = ("loss", "start_logits", "end_logits", "hidden_states", "attentions")


POOL_MODES = ("mean", "cls", "max")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, mode: str = "mean", *,
         normalize: bool = False) -> torch.Tensor:
    """Sentence embeddings from token states, as sentence-transformers' Pooling (and Normalize) compute them.

    hidden (B, S, hidden); attention_mask (B, S) (nonzero = real token) or None (every token real).
    mode "mean": average over real tokens (in float32; a row without a real token gives zeros);
    "cls": the first real token's state (position 0 when right-padded or without a mask);
    "max": elementwise max over real tokens (a row without a real token gives -inf, as sentence-transformers).
    normalize: divide each embedding by its L2 norm (sentence-transformers' Normalize module).
    Returns (B, hidden) in hidden's dtype.
    """
    if hidden.dim() != 3:
        raise ValueError(f"pool: hidden must be (batch, seqlen, hidden), got shape {tuple(hidden.shape)}")
    if mode not in POOL_MODES:
        raise ValueError(f"pool: mode must be one of {', '.join(map(repr, POOL_MODES))}, got {mode!r}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"pool: attention_mask shape {tuple(attention_mask.shape)} does not match hidden's "
                         f"{tuple(hidden.shape[:2])}")
    real = None if attention_mask is None else (attention_mask != 0)  # (B, S) bool
    out = _POOLS[mode](hidden, real)  # (B, hidden)
    if normalize:
        out = torch.nn.functional.normalize(out.float(), p=2, dim=-1).to(hidden.dtype)
    return out


def _mean(hidden, real):
    if real is None:
        return hidden.float().mean(dim=1).to(hidden.dtype)
    m = real.to(torch.float32).unsqueeze(-1)  # (B, S, 1)
    summed = (hidden.float() * m).sum(dim=1)  # (B, hidden)
    return (summed / m.sum(dim=1).clamp(min=1e-9)).to(hidden.dtype)


def _cls(hidden, real):
    if real is None:
        return hidden[:, 0]
    first = real.to(torch.int32).argmax(dim=1)  # (B,): the first real position (0 for a row without one)
    return hidden.gather(1, first[:, None, None].expand(-1, 1, hidden.shape[2])).squeeze(1)


def _max(hidden, real):
    if real is not None:
        hidden = hidden.masked_fill(~real.unsqueeze(-1), float("-inf"))
    return hidden.amax(dim=1)


_POOLS = {"mean": _mean, "cls": _cls, "max": _max}
