"""Built-in texts: the main job's sentences and a mixed-length synthetic corpus (the benchmark's and the main job's
GPU throughput line's), made from a tokenizer's own whole-word vocabulary so the token lengths are known."""

from __future__ import annotations

import numpy as np

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome and everybody in the theater laughed out loud at the ending.",
    "The cat sits outside on the warm stone wall in the late afternoon sun.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
]


def mixed_lengths(n: int, seed: int = 0, lo: int = 5, hi: int = 512, median: float = 48.0,
                  sigma: float = 1.0) -> np.ndarray:
    """n token lengths from a log-normal distribution (median `median`, shape `sigma`), clipped to [lo, hi]:
    most texts short, a long tail up to `hi` (as sentences, passages and documents mix in real corpora)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(np.int64)


def mixed_corpus(tokenizer, n: int, seed: int = 0, lo: int = 5, hi: int = 512) -> list[str]:
    """n texts whose lengths in tokens (special tokens included, before truncation) follow mixed_lengths: random
    whole words of the tokenizer's vocabulary (one token each for the BERT and RoBERTa vocabularies' common
    words)."""
    vocab = sorted(w for w, i in tokenizer.get_vocab().items() if w.isascii() and w.isalpha() and len(w) > 2)
    rng = np.random.default_rng(seed + 1)
    words = np.array(vocab)
    return [" ".join(words[rng.integers(0, len(words), max(1, int(k) - 2))]) for k in mixed_lengths(n, seed, lo, hi)]
