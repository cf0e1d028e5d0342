"""roberta_fast.data: dynamic masking (rates within binomial bounds, labels -100 exactly where nothing is
predicted, never special tokens or padding, the same masks after a resume) and packing (padding-free batches of
a token budget, documents kept apart or RoBERTa's FULL-SENTENCES stream)."""

import itertools
import math

import pytest
import torch

from roberta_fast.data import MLMCollator, SpanLengths, pack, step_generator, word_starts_from_tokens

V, BOS, PAD, EOS, UNK, MASK = 1000, 0, 1, 2, 3, 999
SPECIAL = (BOS, PAD, EOS, UNK)


def _batch(B=128, S=256, seed=0):
    """(ids, attention_mask): <s> tokens </s> then padding, lengths varying."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, MASK, (B, S), generator=g)
    lengths = torch.randint(S // 4, S + 1, (B,), generator=g)
    pos = torch.arange(S)[None, :]
    ids[:, 0] = BOS
    ids = torch.where(pos == lengths[:, None] - 1, EOS, ids)
    mask = pos < lengths[:, None]
    ids = torch.where(mask, ids, PAD)
    return ids, mask.long()


def _collator(**kw):
    return MLMCollator(V, MASK, SPECIAL, pad_token_id=PAD, **kw)


def _within_binomial(k, n, p, sigmas=5.0):
    """k successes of n Bernoulli(p) draws within `sigmas` standard deviations of n p (plus one for rounding)."""
    sd = math.sqrt(n * p * (1 - p))
    assert abs(k - n * p) <= sigmas * sd + 1, f"{k} of {n}: expected {n * p:.1f} +- {sigmas * sd:.1f}"


def test_rates_80_10_10_and_labels_exactly_where_predicted():
    ids, am = _batch()
    inputs, labels = _collator(seed=3)(ids, step=0, attention_mask=am)
    chosen = labels != -100
    # labels: the original id where chosen, -100 everywhere else (by construction of `chosen`, and no other)
    assert torch.equal(labels[chosen], ids[chosen])
    # never a special token or padding
    special = torch.isin(ids, torch.tensor(SPECIAL)) | (am == 0)
    assert not chosen[special].any()
    assert torch.equal(inputs[special], ids[special])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # nothing else changes
    # per row: fairseq's count int(0.15 n + u) of the n maskable tokens, so floor or floor + 1
    n = (~special).sum(1)
    k = chosen.sum(1)
    assert torch.all((k == torch.floor(0.15 * n)) | (k == torch.floor(0.15 * n) + 1)), (k, n)
    # 80 / 10 / 10 of the chosen, each a binomial
    total = int(chosen.sum())
    masked = int((inputs[chosen] == MASK).sum())
    unchanged = int((inputs[chosen] == ids[chosen]).sum())
    randomized = total - masked - unchanged
    _within_binomial(masked, total, 0.8)
    _within_binomial(unchanged, total, 0.1 + 0.1 / (V - len(SPECIAL) - 1))  # a random token may be the same
    _within_binomial(randomized, total, 0.1 * (1 - 1 / (V - len(SPECIAL) - 1)))
    # random replacements are never special tokens nor <mask>
    rnd = chosen & (inputs != MASK) & (inputs != ids)
    assert not torch.isin(inputs[rnd], torch.tensor((*SPECIAL, MASK))).any()


def test_every_maskable_position_is_equally_likely():
    """Over many steps each position of a fixed row is chosen at the rate 0.15 (a binomial per position)."""
    ids = torch.arange(4, 4 + 40)[None].repeat(64, 1)
    col = _collator(seed=1)
    hits = torch.zeros(40)
    steps = 20
    for step in range(steps):
        hits += (col(ids, step=step)[1] != -100).sum(0)
    for h in hits.tolist():
        _within_binomial(int(h), 64 * steps, 0.15, sigmas=5.5)


def test_masks_are_a_function_of_seed_and_step():
    ids, am = _batch(8, 64)
    a = _collator(seed=7)
    first = [a(ids, step=s, attention_mask=am) for s in range(3)]
    resumed = _collator(seed=7)  # a new process resuming at step 2
    again = resumed(ids, step=2, attention_mask=am)
    assert torch.equal(again[0], first[2][0]) and torch.equal(again[1], first[2][1])
    assert not torch.equal(first[0][1], first[1][1])  # a fresh mask per step: dynamic masking
    assert not torch.equal(_collator(seed=8)(ids, step=2, attention_mask=am)[1], first[2][1])
    x = torch.rand(5, generator=step_generator(7, 2))
    assert torch.equal(x, torch.rand(5, generator=step_generator(7, 2)))


def test_flat_packed_input():
    ids, _ = _batch(1, 300)
    flat = ids[0][ids[0] != PAD]
    inputs, labels = _collator()(flat, step=5)
    assert inputs.shape == labels.shape == flat.shape
    n = int((~torch.isin(flat, torch.tensor(SPECIAL))).sum())
    assert int((labels != -100).sum()) in (math.floor(0.15 * n), math.floor(0.15 * n) + 1)


def test_whole_word_masking():
    """Words of 1-4 tokens; a word is chosen whole or not at all; 15% of the words per row."""
    g = torch.Generator().manual_seed(0)
    B, S = 64, 200
    word_len = torch.randint(1, 5, (B, S), generator=g)
    starts = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        s = 1
        for L in word_len[b].tolist():
            if s >= S - 1:
                break
            starts[b, s] = True
            s += L
    ids = torch.randint(4, MASK, (B, S), generator=g)
    ids[:, 0], ids[:, -1] = BOS, EOS
    _, labels = _collator(whole_word=True)(ids, step=0, word_starts=starts)
    chosen = labels != -100
    word = starts.long().cumsum(1)
    n_words_chosen = 0
    for b in range(B):
        for w in torch.unique(word[b, 1:-1]).tolist():
            sel = chosen[b, 1:-1][word[b, 1:-1] == w]
            assert sel.all() or not sel.any(), "a word was split"
            n_words_chosen += int(sel.all())
    n_words = int(starts.sum())
    assert abs(n_words_chosen - 0.15 * n_words) <= B  # fairseq's count per row, +-1 each
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    with pytest.raises(ValueError, match="whole_word=True needs word_starts"):
        _collator(whole_word=True)(ids, step=0)


def test_word_starts_from_tokens():
    got = word_starts_from_tokens(["\u0120The", "\u0120quick", "est", "\u0120fox"])
    assert got.tolist() == [True, True, False, True]
    assert word_starts_from_tokens(["the", "quick", "##est"], "wordpiece").tolist() == [True, True, False]


def test_span_masking_lengths_and_budget():
    ids = torch.randint(4, MASK, (32, 256))
    ids[:, 0], ids[:, -1] = BOS, EOS
    spans = SpanLengths(p=0.2, max_len=10)
    _, labels = _collator(span=spans)(ids, step=0)
    chosen = labels != -100
    n = 254
    k = chosen.sum(1)
    assert torch.all((k >= math.floor(0.15 * n)) & (k <= math.floor(0.15 * n) + 1))
    # runs of chosen tokens are longer than single tokens on average (merged spans make them longer still)
    runs = []
    for row in chosen.tolist():
        for key, grp in itertools.groupby(row):
            if key:
                runs.append(len(list(grp)))
    assert sum(runs) / len(runs) > 0.7 * spans.mean() and max(runs) > 1
    assert abs(spans.mean() - 3.83) < 0.05  # SpanBERT's mean span length


def test_permutation_noise_predicts_what_moved():
    ids = torch.randint(4, MASK, (16, 120))
    ids[:, 0], ids[:, -1] = BOS, EOS
    col = _collator(permute_window=3, permute_prob=0.5, mlm_probability=0.0)
    inputs, labels = col(ids, step=0)
    moved = inputs != ids
    assert moved.any()
    assert torch.equal(labels != -100, moved) and torch.equal(labels[moved], ids[moved])
    # tokens move only inside their window of 3
    for b in range(16):
        for w0 in range(0, 120 - 120 % 3, 3):
            assert sorted(inputs[b, w0:w0 + 3].tolist()) == sorted(ids[b, w0:w0 + 3].tolist())


def test_bad_options():
    with pytest.raises(ValueError, match="mlm_probability"):
        _collator(mlm_probability=1.5)
    with pytest.raises(ValueError, match="mask_prob and random_prob"):
        _collator(mask_prob=0.9, random_prob=0.2)
    with pytest.raises(ValueError, match="alternatives"):
        _collator(whole_word=True, span=SpanLengths())
    with pytest.raises(ValueError, match="permute_window"):
        _collator(permute_window=1)
    with pytest.raises(ValueError, match="distribution"):
        SpanLengths(distribution="zipf")


# ----------------------------------------------------------------------------- packing


def _docs(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 900, (int(torch.randint(1, 300, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _sequences(batches):
    for b in batches:
        assert b.cu_seqlens.dtype == torch.int32 and int(b.cu_seqlens[0]) == 0
        assert int(b.cu_seqlens[-1]) == b.num_tokens
        for i in range(b.num_sequences):
            yield b.input_ids[int(b.cu_seqlens[i]):int(b.cu_seqlens[i + 1])].tolist()


@pytest.mark.parametrize("mode", ["documents", "full_sentences"])
def test_batches_fit_the_budget(mode):
    batches = list(pack(_docs(), max_tokens=1000, max_seqlen=128, mode=mode))
    assert all(b.num_tokens <= 1000 for b in batches)
    assert all(int(b.lengths().max()) == b.max_seqlen <= 128 for b in batches)
    # a budget is used well: every batch but the last could not take another sequence of its next length
    assert all(b.num_tokens > 1000 - 128 for b in batches[:-1])


def test_documents_mode_never_mixes_documents():
    docs = _docs()
    seqs = list(_sequences(pack(iter(docs), max_tokens=1000, max_seqlen=128, mode="documents")))
    assert all(s[0] == BOS and s[-1] == EOS for s in seqs)
    rebuilt, i = [], 0
    for d in docs:  # a document's pieces are consecutive sequences that concatenate to it
        got = []
        while len(got) < len(d):
            got += seqs[i][1:-1]
            i += 1
        rebuilt.append(got)
    assert rebuilt == docs and i == len(seqs)


def test_full_sentences_stream_with_separators():
    docs = _docs()
    seqs = list(_sequences(pack(docs, max_tokens=1000, max_seqlen=128, mode="full_sentences", sep=EOS)))
    assert all(len(s) == 128 for s in seqs[:-1])
    stream = [t for s in seqs for t in s[1:-1]]
    want = [t for i, d in enumerate(docs) for t in ([EOS] if i else []) + d]
    assert stream == want


def test_packing_is_lazy_and_round_trips_to_padded():
    def endless():
        while True:
            yield list(range(4, 104))

    first = next(pack(endless(), max_tokens=512, max_seqlen=64))
    ids, mask = first.to_padded(PAD)
    assert ids.shape == (first.num_sequences, 64) and int(mask.sum()) == first.num_tokens
    assert torch.equal(first.scatter(ids), first.input_ids)


def test_packing_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        next(pack([[5]], max_tokens=100, max_seqlen=10, mode="sentences"))
    with pytest.raises(ValueError, match=r"max_tokens \(8\) must be >= max_seqlen \(10\)"):
        next(pack([[5]], max_tokens=8, max_seqlen=10))
