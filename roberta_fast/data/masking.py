"""Masked-language-model inputs: which tokens to predict, and what the model sees there.

What RoBERTa did (Liu et al. 2019, section 4.1, and fairseq's MaskTokensDataset that trained it): *dynamic*
masking, a fresh mask every time a sequence is seen; 15% of the tokens of a sequence are chosen (a count of
int(0.15 * n + u), u uniform in [0, 1), drawn without replacement among the maskable tokens), of which 80%
become <mask>, 10% a random token and 10% stay as they were; the loss is over the chosen tokens only. Special
tokens (<s>, </s>, <pad>, ...) are never chosen. That is `MLMCollator()` with its defaults.

The options below exist because the write-up this project started from mentions them; RoBERTa used none of
them:
  whole_word   choose whole words (every token of a chosen word is predicted). BERT's later "whole word
               masking" checkpoints did this; RoBERTa did not (fairseq has `--mask-whole-words`, off for it).
  span         choose contiguous spans whose lengths follow a distribution (SpanBERT: geometric with p=0.2,
               clipped at 10, mean 3.8 tokens) until 15% of the tokens are covered. Not RoBERTa's.
  permute      token-permutation noise: shuffle the tokens inside windows of a few positions and predict the
               originals where they moved (BART's and XLNet-style noising, not RoBERTa's).

Reproducibility: every batch's randomness comes from a torch.Generator seeded by (seed, step), so a run that
resumes at step k masks batch k exactly as the uninterrupted run did, whatever happened before.
Labels are -100 exactly where nothing is predicted.
"""

from __future__ import annotations

import dataclasses

import torch

IGNORE_INDEX = -100


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for batch `step` of a run seeded with `seed`: a splitmix-style mix of the two, so nearby
    (seed, step) pairs give unrelated streams."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    z ^= z >> 31
    z = (z * 0xD6E8FEB86659FD93) % (1 << 64)
    z ^= z >> 32
    return torch.Generator().manual_seed(z & ((1 << 63) - 1))


@dataclasses.dataclass(frozen=True)
class SpanLengths:
    """Span lengths for span masking: geometric(p) clipped to [1, max_len] (SpanBERT: p=0.2, max_len=10), or
    uniform on [1, max_len] with distribution="uniform"."""

    p: float = 0.2
    max_len: int = 10
    distribution: str = "geometric"

    def __post_init__(self):
        if self.distribution not in ("geometric", "uniform"):
            raise ValueError(f"SpanLengths: distribution must be 'geometric' or 'uniform', got {self.distribution!r}")
        if not (0.0 < self.p <= 1.0):
            raise ValueError(f"SpanLengths: p must be in (0, 1], got {self.p!r}")
        if self.max_len < 1:
            raise ValueError(f"SpanLengths: max_len must be >= 1, got {self.max_len!r}")

    def probs(self) -> torch.Tensor:
        """(max_len,) float64 probabilities of the lengths 1 .. max_len."""
        k = torch.arange(1, self.max_len + 1, dtype=torch.float64)
        if self.distribution == "uniform":
            w = torch.ones_like(k)
        else:
            w = self.p * (1 - self.p) ** (k - 1)
        return w / w.sum()

    def mean(self) -> float:
        return float((self.probs() * torch.arange(1, self.max_len + 1, dtype=torch.float64)).sum())


class MLMCollator:
    """Dynamic masking of token ids for masked-language-model training.

    vocab_size        size of the vocabulary (random replacements are drawn from its non-special ids)
    mask_token_id     the <mask> id
    special_ids       ids never chosen (<s>, </s>, <pad>, <unk>, <mask>, ...); padding is never chosen either
    pad_token_id      the padding id (also excluded through attention_mask when given)
    mlm_probability   share of maskable tokens to predict (0.15)
    mask_prob, random_prob   of the chosen tokens: share replaced by <mask> (0.8) and by a random token (0.1);
                      the rest (0.1) keep their token
    whole_word        choose words, not tokens: pass `word_starts` (True at a word's first token) to __call__
    span              a SpanLengths: choose spans of those lengths until mlm_probability of the tokens is covered
    permute_window    > 1: shuffle tokens within windows of this many positions (a share `permute_prob` of the
                      windows) and predict the originals that moved
    seed              the run's seed; each call's randomness is step_generator(seed, step)

    __call__(input_ids, step, attention_mask=None, word_starts=None) -> (inputs, labels), both like input_ids:
    input_ids (B, S) or (T,) int64; labels hold the original id where a prediction is made, else -100.
    """

    def __init__(self, vocab_size: int, mask_token_id: int, special_ids, *, pad_token_id: int | None = None,
                 mlm_probability: float = 0.15, mask_prob: float = 0.8, random_prob: float = 0.1,
                 whole_word: bool = False, span: SpanLengths | None = None, permute_window: int = 0,
                 permute_prob: float = 0.1, seed: int = 0):
        if not (0.0 <= mlm_probability <= 1.0):
            raise ValueError(f"MLMCollator: mlm_probability must be in [0, 1], got {mlm_probability!r}")
        if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
            raise ValueError(f"MLMCollator: mask_prob and random_prob must be >= 0 with a sum <= 1, got "
                             f"{mask_prob!r} and {random_prob!r}")
        if whole_word and span is not None:
            raise ValueError("MLMCollator: whole_word and span are alternatives; pick one")
        if permute_window == 1 or permute_window < 0:
            raise ValueError(f"MLMCollator: permute_window must be 0 (off) or >= 2, got {permute_window!r}")
        self.vocab_size, self.mask_token_id, self.pad_token_id = int(vocab_size), int(mask_token_id), pad_token_id
        special = {int(i) for i in special_ids} | {int(mask_token_id)}
        if pad_token_id is not None:
            special.add(int(pad_token_id))
        self.special = torch.tensor(sorted(special), dtype=torch.int64)
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[self.special[self.special < self.vocab_size]] = False
        self.replacements = keep.nonzero()[:, 0]  # the ids a random replacement may take
        self.mlm_probability, self.mask_prob, self.random_prob = mlm_probability, mask_prob, random_prob
        self.whole_word, self.span = whole_word, span
        self.permute_window, self.permute_prob = permute_window, permute_prob
        self.seed = seed

    # ------------------------------------------------------------------------------------------- choice

    def maskable(self, input_ids, attention_mask=None):
        """bool like input_ids: True where a token may be chosen (not special, not padding)."""
        ok = ~torch.isin(input_ids, self.special)
        if attention_mask is not None:
            ok &= attention_mask.bool()
        return ok

    def _count(self, n, gen):
        """fairseq's per-sequence count: int(p * n + u), u ~ U[0, 1)."""
        u = torch.rand(n.shape, generator=gen, dtype=torch.float64)
        return torch.floor(self.mlm_probability * n.double() + u).long()

    def _choose_tokens(self, ok, gen):
        """Exactly count(n) of each row's maskable tokens, uniformly without replacement."""
        scores = torch.rand(ok.shape, generator=gen)
        scores = torch.where(ok, scores, 2.0)  # never chosen
        rank = scores.argsort(dim=1).argsort(dim=1)
        return (rank < self._count(ok.sum(1), gen)[:, None]) & ok

    def _choose_words(self, ok, word_starts, gen):
        """Whole words: a word is a maximal run starting at a True of word_starts (a maskable token that is not
        a word start continues the previous word); count(n_words) words per row, every token of each."""
        B, S = ok.shape
        starts = word_starts.bool() & ok
        # a maskable token after a non-maskable one starts a word too (the first token after <s>)
        prev_ok = torch.cat([torch.zeros(B, 1, dtype=torch.bool), ok[:, :-1]], 1)
        starts |= ok & ~prev_ok
        word = starts.long().cumsum(1)  # word number of each token (1-based) within the row
        n_words = starts.sum(1)
        scores = torch.where(starts, torch.rand((B, S), generator=gen), 2.0)
        rank = scores.argsort(1).argsort(1)
        chosen_start = (rank < self._count(n_words, gen)[:, None]) & starts
        # chosen[b, s] = the word of token s was chosen
        table = torch.zeros(B, S + 1, dtype=torch.bool)
        table.scatter_(1, torch.where(chosen_start, word, 0), chosen_start)
        table[:, 0] = False
        return table.gather(1, word) & ok

    def _choose_spans(self, ok, gen):
        """Spans of SpanLengths until count(n) tokens are covered per row (the last span cut to the budget);
        spans start at a maskable token and stop at the first non-maskable one."""
        B, S = ok.shape
        chosen = torch.zeros_like(ok)
        budget = self._count(ok.sum(1), gen)
        probs = self.span.probs()
        for b in range(B):
            pos = ok[b].nonzero()[:, 0]
            left = int(budget[b])
            tries = 0
            while left > 0 and tries < 4 * S + 16:
                tries += 1
                length = int(torch.multinomial(probs, 1, generator=gen)) + 1
                start = int(pos[int(torch.randint(len(pos), (1,), generator=gen))])
                for s in range(start, min(S, start + min(length, left))):
                    if not ok[b, s]:
                        break
                    if not chosen[b, s]:
                        chosen[b, s] = True
                        left -= 1
        return chosen

    def choose(self, input_ids, gen, attention_mask=None, word_starts=None):
        """bool like input_ids (B, S): the tokens to predict."""
        ok = self.maskable(input_ids, attention_mask)
        if self.whole_word:
            if word_starts is None:
                raise ValueError("MLMCollator: whole_word=True needs word_starts (bool like input_ids, True at "
                                 "the first token of each word; see word_starts_from_tokens)")
            return self._choose_words(ok, word_starts, gen)
        if self.span is not None:
            return self._choose_spans(ok, gen)
        return self._choose_tokens(ok, gen)

    # ------------------------------------------------------------------------------------------- noise

    def _permute(self, ids, ok, gen):
        """Shuffle the maskable tokens inside a share permute_prob of the windows of permute_window positions
        (a window with a non-maskable token is left alone). -> (new ids, moved: bool where the token changed)."""
        B, S = ids.shape
        w = self.permute_window
        n_win = S // w
        out = ids.clone()
        if n_win == 0:
            return out, torch.zeros_like(ok)
        win = ids[:, : n_win * w].reshape(B, n_win, w)
        win_ok = ok[:, : n_win * w].reshape(B, n_win, w).all(2)
        pick = (torch.rand((B, n_win), generator=gen) < self.permute_prob) & win_ok
        perm = torch.rand((B, n_win, w), generator=gen).argsort(2)
        shuffled = torch.where(pick[..., None], win.gather(2, perm), win)
        out[:, : n_win * w] = shuffled.reshape(B, n_win * w)
        return out, out != ids

    # ------------------------------------------------------------------------------------------- call

    def __call__(self, input_ids, step: int, attention_mask=None, word_starts=None):
        ids = torch.as_tensor(input_ids, dtype=torch.int64)
        flat = ids.dim() == 1
        if flat:
            ids = ids[None]
            attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask)[None]
            word_starts = None if word_starts is None else torch.as_tensor(word_starts)[None]
        if ids.dim() != 2:
            raise ValueError(f"MLMCollator: input_ids must be (batch, seqlen) or (tokens,), got {tuple(ids.shape)}")
        gen = step_generator(self.seed, step)
        chosen = self.choose(ids, gen, attention_mask, word_starts)
        labels = torch.where(chosen, ids, IGNORE_INDEX)
        inputs = ids
        if self.permute_window:
            inputs, moved = self._permute(ids, self.maskable(ids, attention_mask), gen)
            labels = torch.where(moved & ~chosen, ids, labels)
        u = torch.rand(ids.shape, generator=gen)
        to_mask = chosen & (u < self.mask_prob)
        to_random = chosen & (u >= self.mask_prob) & (u < self.mask_prob + self.random_prob)
        rand_ids = self.replacements[torch.randint(len(self.replacements), ids.shape, generator=gen)]
        inputs = torch.where(to_mask, self.mask_token_id, inputs)
        inputs = torch.where(to_random, rand_ids, inputs)
        if flat:
            return inputs[0], labels[0]
        return inputs, labels


def word_starts_from_tokens(tokens, scheme: str = "byte_bpe") -> torch.Tensor:
    """bool (len(tokens),): True at the first token of a word, from the token strings. scheme "byte_bpe"
    (RoBERTa / GPT-2: a token that begins with "Ġ", the encoded space, starts a word) or "wordpiece" (BERT: a
    token that does not begin with "##" starts a word)."""
    if scheme == "byte_bpe":
        flags = [t.startswith("\u0120") for t in tokens]
    elif scheme == "wordpiece":
        flags = [not t.startswith("##") for t in tokens]
    else:
        raise ValueError(f"word_starts_from_tokens: scheme must be 'byte_bpe' or 'wordpiece', got {scheme!r}")
    return torch.tensor(flags, dtype=torch.bool)

