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
    tensors (B, heads, S, S) or None."""

    _fields = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")


class MaskedLMOutput(ModelOutput):
    _fields = ("loss", "logits", "hidden_states", "attentions")


class SequenceClassifierOutput(ModelOutput):
    _fields = ("loss", "logits", "hidden_states", "attentions")


class TokenClassifierOutput(ModelOutput):
    _fields = ("loss", "logits", "hidden_states", "attentions")


class QuestionAnsweringModelOutput(ModelOutput):
    _fields = ("loss", "start_logits", "end_logits", "hidden_states", "attentions")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, mode: str = "mean") -> torch.Tensor:
    """Sentence embeddings from token states: hidden (B, S, hidden), attention_mask (B, S) (nonzero = real).

    mode "mean": average over real tokens (sentence-transformers' mean pooling; computed in float32);
    "cls": the first token's state. Returns (B, hidden) in hidden's dtype.
    """
    if hidden.dim() != 3:
        raise ValueError(f"pool: hidden must be (batch, seqlen, hidden), got shape {tuple(hidden.shape)}")
    if mode == "cls":
        return hidden[:, 0]
    if mode != "mean":
        raise ValueError(f"pool: mode must be 'mean' or 'cls', got {mode!r}")
    if attention_mask is None:
        return hidden.float().mean(dim=1).to(hidden.dtype)
    if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"pool: attention_mask shape {tuple(attention_mask.shape)} does not match hidden's "
                         f"{tuple(hidden.shape[:2])}")
    m = (attention_mask != 0).to(torch.float32).unsqueeze(-1)  # (B, S, 1)
    summed = (hidden.float() * m).sum(dim=1)  # (B, hidden)
    return (summed / m.sum(dim=1).clamp(min=1e-9)).to(hidden.dtype)
