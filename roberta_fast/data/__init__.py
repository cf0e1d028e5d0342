"""Pretraining data: dynamic masking for masked-language-model training (masking.py) and packing of tokenized
documents into padding-free batches of a token budget (packing.py). docs/pretraining.md."""

from .masking import IGNORE_INDEX, MLMCollator, SpanLengths, step_generator, word_starts_from_tokens  # noqa: F401
from .packing import MODES, PackedBatch, pack  # noqa: F401

__all__ = ["MLMCollator", "SpanLengths", "step_generator", "word_starts_from_tokens", "IGNORE_INDEX",
           "PackedBatch", "pack", "MODES"]
