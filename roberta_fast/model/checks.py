"""The encoder forward's input checks, and its one host sync.

`check_inputs` checks what the host knows (which inputs were given, their shapes and dtypes, the
sequence length against the position table) and fills in the default position ids. What only the device
knows (ids < vocab_size, positions < max_position_embeddings, types < type_vocab_size: ValueError
otherwise) is queued on a `HostChecks` as device scalars. `Inputs.layout` then reads those back in ONE
sync together with the mask statistics (number of real tokens, longest sequence) and returns where the
real tokens are (a roberta_fast.padding.Layout). Under CUDA graph capture and under torch.compile
(`torch.compiler.is_compiling()`) it reads nothing: the range checks are skipped (out-of-range ids then
fail inside the embedding lookup, or not at all on a GPU) and the batch takes the padded layout with the
mask, whose shapes do not depend on the data, so a compiled forward is one graph for fixed shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..padding import Layout, mask_stats, real_tokens
from .config import EncoderConfig

_UNSUPPORTED_KWARGS = ("head_mask", "encoder_hidden_states", "encoder_attention_mask", "past_key_values", "cache")
# ignored as transformers' BERT-family models ignore them (num_items_in_batch: the Trainer passes it to any
# forward with **kwargs; their MLM / classification losses are means all the same)
_IGNORED_KWARGS = ("use_cache", "cache_position", "num_items_in_batch")


def check_extra_kwargs(kwargs: dict):
    """Keyword arguments of transformers' forward beyond ours: None or ignorable ones pass, others raise."""
    for name, value in kwargs.items():
        if value is None or name in _IGNORED_KWARGS:
            continue
        if name in _UNSUPPORTED_KWARGS:
            raise NotImplementedError(f"roberta_fast encoder: {name} is not supported (encoder-only, no head mask)")
        raise TypeError(f"roberta_fast encoder: unexpected argument {name}={type(value).__name__}")


def reads_blocked(device: torch.device) -> bool:
    """True where the forward must not read device values back: under torch.compile (a read is a graph
    break) and under CUDA graph capture (a read is an error)."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def output_flags(config, output_attentions=None, output_hidden_states=None, return_dict=None):
    """The forward's (output_attentions, output_hidden_states, return_dict): each None takes the config's value,
    as in transformers (config: ours or a transformers config)."""
    pick = lambda given, name, default: bool(getattr(config, name, default) if given is None else given)
    return (pick(output_attentions, "output_attentions", False),
            pick(output_hidden_states, "output_hidden_states", False), pick(return_dict, "return_dict", True))


class HostChecks:
    """Device scalars read back in ONE host sync: range checks of integer inputs and any other values the
    forward needs on the host. With active=False (no host reads allowed) the range checks are not queued."""

    def __init__(self, active: bool = True):
        self.scalars, self.checks, self.active = [], [], active

    def ids(self, name, t, limit, what):
        """t must lie in [0, limit); `what` says why in the error."""
        if self.active and t.numel():
            self.checks.append((name, self.add(t.min(), t.max()), limit, what))

    def add(self, *scalars) -> int:
        """Queue 0-dim integer tensors; returns the index of the first in run()'s list."""
        at = len(self.scalars)
        self.scalars += scalars
        return at

    def run(self) -> list:
        """The sync: every queued scalar as a Python int, after raising for any range check that fails."""
        vals = torch.stack([v.to(torch.int64) for v in self.scalars]).tolist() if self.scalars else []
        for name, i, limit, what in self.checks:
            lo, hi = vals[i], vals[i + 1]
            if lo < 0 or hi >= limit:
                raise ValueError(f"{name} holds {hi if hi >= limit else lo}, outside [0, {limit}): {what}")
        return vals


@dataclass
class Inputs:
    """The checked inputs of one forward, (B, S) each (inputs_embeds (B, S, hidden)); None where absent."""

    batch: int
    seqlen: int
    device: torch.device
    input_ids: torch.Tensor | None
    position_ids: torch.Tensor
    token_type_ids: torch.Tensor | None  # None also when the type table has one row (all type 0)
    inputs_embeds: torch.Tensor | None
    real: torch.Tensor | None  # (B, S) bool, True = real token; None: no mask (or an empty batch)
    host: HostChecks

    def layout(self, padding_free: bool) -> Layout:
        """The one host sync (range checks and mask statistics together), then where the real tokens are:
        dense when every token is real, else packed (padding_free) or padded with the mask."""
        B, S, real = self.batch, self.seqlen, self.real
        if not self.host.active or reads_blocked(self.device):
            return Layout(B, S, mask=real)  # no sync (compile, capture): the padded path, fixed shapes
        if real is None:
            self.host.run()  # the one host sync: range checks only
            return Layout(B, S)
        seqlens, total, longest = mask_stats(real)  # (B,), 0-dim, 0-dim
        at = self.host.add(total, longest)
        vals = self.host.run()  # the one host sync: range checks, real tokens, longest sequence
        total, longest = vals[at], vals[at + 1]
        if total == B * S:
            return Layout(B, S)  # no padding: dense, no mask
        if not padding_free:
            return Layout(B, S, mask=real)
        return Layout.packed(real, seqlens, total, longest)


def _batch_shape(cfg: EncoderConfig, input_ids, inputs_embeds, host: HostChecks):
    """(B, S, device) from input_ids (B, S) or inputs_embeds (B, S, hidden); queues the vocab check."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids or inputs_embeds")
    if input_ids is None:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"inputs_embeds must have shape (batch, seqlen, {cfg.hidden_size}), got "
                             f"{tuple(inputs_embeds.shape)}")
        return inputs_embeds.shape[0], inputs_embeds.shape[1], inputs_embeds.device
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(f"input_ids must be a 2-D (batch, seqlen) tensor, got {got}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integers, got {input_ids.dtype}")
    host.ids("input_ids", input_ids, cfg.vocab_size, f"token ids must be < vocab_size ({cfg.vocab_size})")
    return input_ids.shape[0], input_ids.shape[1], input_ids.device


def default_position_ids(cfg: EncoderConfig, roberta: bool, input_ids, B: int, S: int, device) -> torch.Tensor:
    """(B, S) int64 as transformers computes them: BERT 0..S-1; RoBERTa padding_idx + cumsum of the non-pad
    ids (pads keep padding_idx), or padding_idx + 1.. with inputs_embeds. Raises when S does not fit."""
    pad = cfg.pad_token_id
    limit = cfg.max_position_embeddings - (pad + 1 if roberta else 0)
    if S > limit:
        raise ValueError(f"sequence length {S} is longer than this model takes ({limit}: "
                         f"max_position_embeddings = {cfg.max_position_embeddings})")
    if not roberta:
        return torch.arange(S, device=device).expand(B, S)
    if input_ids is None:
        return torch.arange(pad + 1, S + pad + 1, device=device).expand(B, S)
    not_pad = input_ids.ne(pad).int()
    return (torch.cumsum(not_pad, dim=1).type_as(not_pad) * not_pad).long() + pad


def _given_position_ids(cfg: EncoderConfig, position_ids, B: int, S: int, host: HostChecks) -> torch.Tensor:
    """(B, S), (1, S) or (S,) -> (B, S); queues the range check."""
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    try:
        position_ids = position_ids.expand(B, S)
    except RuntimeError:
        raise ValueError(f"position_ids must have shape ({B}, {S}) or (1, {S}), got "
                         f"{tuple(position_ids.shape)}") from None
    max_pos = cfg.max_position_embeddings
    host.ids("position_ids", position_ids, max_pos,
             f"position ids must be < max_position_embeddings ({max_pos}): sequence too long?")
    return position_ids


def check_inputs(cfg: EncoderConfig, *, roberta: bool, input_ids=None, attention_mask=None, token_type_ids=None,
                 position_ids=None, inputs_embeds=None) -> Inputs:
    """Check the forward's inputs (ValueError / TypeError naming the argument) and fill in position ids;
    the range checks wait in the returned Inputs' host checks for Inputs.layout()."""
    given = input_ids if input_ids is not None else inputs_embeds
    host = HostChecks(active=not (isinstance(given, torch.Tensor) and reads_blocked(given.device)))
    B, S, device = _batch_shape(cfg, input_ids, inputs_embeds, host)
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is not None and tuple(t.shape) != (B, S):
            raise ValueError(f"{name} must have the shape of input_ids ({B}, {S}), got {tuple(t.shape)}")
    if position_ids is None:
        position_ids = default_position_ids(cfg, roberta, input_ids, B, S, device)
    else:
        position_ids = _given_position_ids(cfg, position_ids, B, S, host)
    if token_type_ids is not None:
        host.ids("token_type_ids", token_type_ids, cfg.type_vocab_size,
                 f"token type ids must be < type_vocab_size ({cfg.type_vocab_size})")
        if cfg.type_vocab_size == 1:
            token_type_ids = None  # all zeros: the type embedding is a constant row (x_bias)
    real = real_tokens(attention_mask) if attention_mask is not None and B * S > 0 else None
    return Inputs(B, S, device, input_ids, position_ids, token_type_ids, inputs_embeds, real, host)
