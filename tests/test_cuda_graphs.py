"""CUDA graphs of the padding-free forward (roberta_fast/model/graphs.py, `cuda_graphs=`).

On CPU: the pure bucketing logic (bucket choice, static-buffer filling, the extra rows, the repad, LRU), and
the whole bucketed forward run WITHOUT capture (GraphCache(capture=False): same static buffers, bucket shapes,
extra rows, eviction and invalidation as a real graph), against the model without graphs; the options, the
public switches, pickling, and cuda_graphs=True on CPU tensors (a one-time warning, nothing else changes).
On a GPU (marker `gpu`): real capture and replay against the eager forward.
"""

import copy
import io
import pickle
import warnings

import pytest
import torch

import roberta_fast
from roberta_fast import CudaGraphs, EncoderConfig, RobertaModel, graphs
from roberta_fast.model.graphs import (
    LRU,
    Bucket,
    GraphCache,
    as_options,
    choose_bucket,
    fill_cu_seqlens,
    fill_rows,
    round_up,
    unpack_output,
)

VOCAB = 97


# ----------------------------------------------------------------------------------------- helpers


def make_model(family="roberta", typed=True, layers=2, hidden=32, heads=4, seed=0, max_positions=72, **kw):
    """A small randomly initialized encoder (LayerNorm weights and biases away from 1 and 0), eval mode."""
    roberta = family == "roberta"
    cfg = EncoderConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=48, max_position_embeddings=max_positions, type_vocab_size=2 if typed else 1,
                        pad_token_id=1 if roberta else 0, model_type=family, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    cls = RobertaModel if roberta else roberta_fast.BertModel
    model = cls(cfg, **kw).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def with_bucketed(model, options=None):
    """A copy of `model` whose forward runs the bucketed graph path without capture (any device)."""
    other = copy.deepcopy(model)
    other._cuda_graph_cache = GraphCache(options or CudaGraphs(), capture=False)
    return other


def batch(B, S, lengths=None, *, pad=1, seed=0, left=False, device="cpu"):
    """input_ids (B, S) and an int64 mask (B, S); lengths None: no padding; left: real tokens at the end."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor([S] * B if lengths is None else lengths)
    pos = torch.arange(S)[None, :]
    mask = (pos >= S - lengths[:, None]) if left else (pos < lengths[:, None])
    ids = torch.randint(3, VOCAB, (B, S), generator=g).masked_fill(~mask, pad)
    return ids.to(device), mask.long().to(device)


def assert_same(a, b, mask=None, atol=1e-5):
    """a == b to round-off; exactly zero in a where mask is 0."""
    torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    if mask is not None:
        assert torch.all(a[~mask.bool()] == 0)


def cache_of(model) -> GraphCache:
    (c,) = graphs.caches(model)
    return c


# ----------------------------------------------------------------------------------------- pure bucketing


def test_round_up_takes_the_smallest_edge_at_or_above():
    edges = (1, 2, 4, 8)
    assert [round_up(n, edges) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, None]


def test_choose_bucket_on_many_batches():
    """For B in 1..300, T in 1..9000, L in 1..T: every bound holds, each edge is the smallest that fits, the
    seqlen bucket never exceeds the token bucket, and no bucket exactly when B or T is past the last edge."""
    o = CudaGraphs()
    g = torch.Generator().manual_seed(0)
    cases = [(1, 128, 128), (32, 4096, 128), (64, 8192, 128), (256, 8192, 512), (257, 300, 5), (1, 8193, 8193)]
    for _ in range(3000):
        B = int(torch.randint(1, 300, (1,), generator=g))
        T = int(torch.randint(1, 9000, (1,), generator=g))
        L = int(torch.randint(1, T + 1, (1,), generator=g))
        cases.append((B, T, L))
    for B, T, L in cases:
        bucket = choose_bucket(o, B, T, L)
        if B > o.batch_edges[-1] or T > o.token_edges[-1]:
            assert bucket is None, (B, T, L)
            continue
        assert bucket.batch >= B and bucket.tokens >= T and L <= bucket.seqlen <= bucket.tokens, (B, T, L, bucket)
        assert bucket.batch in o.batch_edges and bucket.tokens in o.token_edges
        assert bucket.seqlen in o.seqlen_edges or bucket.seqlen == bucket.tokens
        for edges, got, n in ((o.batch_edges, bucket.batch, B), (o.token_edges, bucket.tokens, T)):
            i = edges.index(got)
            assert i == 0 or edges[i - 1] < n, (B, T, L, bucket)  # the smallest that fits
        if bucket.seqlen < bucket.tokens:
            i = o.seqlen_edges.index(bucket.seqlen)
            assert i == 0 or o.seqlen_edges[i - 1] < L


@pytest.mark.parametrize("B,T,L,want", [
    (1, 128, 128, Bucket(1, 128, 128)),  # roberta-base batch 1 x 128: no padding at all
    (32, 4096, 128, Bucket(32, 4096, 128)),
    (3, 100, 70, Bucket(4, 128, 128)),
    (5, 20, 7, Bucket(8, 32, 16)),
    (2, 1000, 600, Bucket(2, 1024, 1024)),  # past the last seqlen edge: the token bucket
    (1, 10, 10, Bucket(1, 16, 16)),
    (300, 400, 2, None), (4, 9000, 512, None),
])
def test_choose_bucket_cases(B, T, L, want):
    assert choose_bucket(CudaGraphs(), B, T, L) == want


def test_seqlen_bucket_capped_by_the_token_bucket():
    o = CudaGraphs(token_edges=(16, 48), seqlen_edges=(32, 64))
    assert choose_bucket(o, 1, 40, 40) == Bucket(1, 48, 48)
    assert choose_bucket(o, 2, 40, 20) == Bucket(2, 48, 32)


def test_options_are_checked_and_normalized():
    o = CudaGraphs(max_graphs=3, batch_edges=[1, 8], token_edges=range(16, 65, 16))
    assert o.batch_edges == (1, 8) and o.token_edges == (16, 32, 48, 64)
    for bad, field in ((dict(max_graphs=0), "max_graphs"), (dict(warmup=True), "warmup"),
                       (dict(batch_edges=(4, 2)), "batch_edges"), (dict(token_edges=()), "token_edges"),
                       (dict(seqlen_edges=(0, 8)), "seqlen_edges"), (dict(seqlen_edges=(1.5,)), "seqlen_edges")):
        with pytest.raises(ValueError, match=field):
            CudaGraphs(**bad)
    assert as_options(True) == CudaGraphs() and as_options(False) is None and as_options(None) is None
    assert as_options(o) is o and as_options({"max_graphs": 2}) == CudaGraphs(max_graphs=2)
    with pytest.raises(TypeError, match="cuda_graphs"):
        as_options("yes")
    with pytest.raises(TypeError):
        as_options({"max_graph": 2})


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_fill_rows_packed_dense_and_expanded(dtype):
    x = torch.arange(12, dtype=dtype).view(3, 4) * 10
    buf = torch.full((16,), -1, dtype=torch.int64)
    indices = torch.tensor([0, 1, 4, 8, 9, 10])
    fill_rows(buf, x, indices, 6)
    assert buf[:6].tolist() == [0, 10, 40, 80, 90, 100] and torch.all(buf[6:] == -1)  # extra rows untouched
    fill_rows(buf, x, None, 12)
    assert buf[:12].tolist() == list(range(0, 120, 10)) and torch.all(buf[12:] == -1)
    pos = torch.arange(4).expand(3, 4)  # default BERT positions: an expanded view
    fill_rows(buf, pos, indices, 6)
    assert buf[:6].tolist() == [0, 1, 0, 0, 1, 2]


def test_fill_cu_seqlens_pads_with_empty_sequences():
    buf = torch.full((9,), -5, dtype=torch.int32)
    fill_cu_seqlens(buf, torch.tensor([0, 3, 3, 10], dtype=torch.int32), 3, 6, 10)
    assert buf.tolist() == [0, 3, 3, 10, 10, 10, 10, 10, 10]  # slots past B: empty, all rows past T outside
    fill_cu_seqlens(buf, None, 4, 6, 24)  # no padding: B sequences of S tokens
    assert buf.tolist() == [0, 6, 12, 18, 24, 24, 24, 24, 24]
    full = torch.zeros(3, dtype=torch.int32)
    fill_cu_seqlens(full, None, 2, 5, 10)  # B == the batch bucket: nothing past it
    assert full.tolist() == [0, 5, 10]


def test_unpack_output_is_fresh_with_zeros_at_padding():
    static = torch.randn(16, 5)
    ids, mask = batch(3, 4, [4, 1, 2])
    real = mask.bool()
    indices = real.flatten().nonzero().flatten()
    out = unpack_output(static[:7], indices, 3, 4)
    assert out.shape == (3, 4, 5) and torch.equal(out[real], static[:7]) and torch.all(out[~real] == 0)
    dense = unpack_output(static[:12], None, 3, 4)
    assert torch.equal(dense.view(12, 5), static[:12])
    static.fill_(7.0)  # the next replay overwrites the static output: results keep their values
    assert not torch.any(out == 7.0) and not torch.any(dense == 7.0)


def test_lru_evicts_the_least_recently_used():
    lru = LRU(2)
    assert lru.put("a", 1) == [] and lru.put("b", 2) == []
    assert lru.get("a") == 1  # "b" is now the least recently used
    assert lru.put("c", 3) == [2]
    assert lru.keys() == ["a", "c"] and lru.get("b") is None and len(lru) == 2
    assert lru.put("a", 4) == [] and lru.keys() == ["c", "a"]
    assert lru.put("d", 5) == [3]
    assert lru.pop_all() == [4, 5] and len(lru) == 0


def test_param_key_sees_new_storage_and_in_place_updates():
    w, b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.zeros(4))
    key = graphs.param_key([w, b], [w])
    assert graphs.param_key([w, b], [w]) == key
    with torch.no_grad():
        b.add_(1)  # not versioned: only its pointer counts (the graphs read it directly)
    assert graphs.param_key([w, b], [w]) == key
    with torch.no_grad():
        w.mul_(2)  # versioned (a query / key / value parameter): its fused copy must be refreshed
    moved = graphs.param_key([w, b], [w])
    assert moved[0] == key[0] and moved[1] != key[1]
    b.data = b.data.clone()  # new storage: the graphs would read freed memory, so they are dropped
    assert graphs.param_key([w, b], [w])[0] != key[0]


# ----------------------------------------------------------------------------------------- the bucketed forward


BATCHES = [  # (B, S, lengths, left padding)
    (3, 20, [20, 7, 15], False),
    (4, 18, [18, 10, 12, 5], False),  # the first one's bucket: (4, 64, 32)
    (4, 16, None, False),  # no padding: the dense layout
    (2, 30, [5, 30], True),  # left padding
    (1, 9, [9], False),
    (5, 12, [12, 0, 6, 2, 11], False),  # an empty sequence
]


@pytest.mark.parametrize("typed", [True, False], ids=["types", "no_types"])
@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_bucketed_forward_equals_the_eager_forward(family, typed):
    model = make_model(family, typed)
    bucketed = with_bucketed(model)
    pad = model.config.pad_token_id
    with torch.no_grad():
        for i, (B, S, lengths, left) in enumerate(BATCHES):
            ids, mask = batch(B, S, lengths, pad=pad, seed=i, left=left)
            kw = {"token_type_ids": (torch.arange(S) >= S // 2).long().expand(B, S)} if typed else {}
            want, got = model(ids, attention_mask=mask, **kw), bucketed(ids, attention_mask=mask, **kw)
            assert_same(got.last_hidden_state, want.last_hidden_state, mask)
            assert_same(got.pooler_output, want.pooler_output)
    st = graphs.stats(bucketed)
    assert st.replays == len(BATCHES) and not st.fallbacks and st.graphs == len(BATCHES) - 1  # two share a bucket
    keys = cache_of(bucketed).buckets()
    assert (Bucket(4, 64, 32), typed) in keys and (Bucket(8, 32, 16), typed) in keys


def test_heads_replay_through_their_encoder():
    cfg = make_model().config
    torch.manual_seed(3)
    head = roberta_fast.RobertaForSequenceClassification(cfg).eval()
    bucketed = copy.deepcopy(head)
    bucketed.base_model._cuda_graph_cache = GraphCache(CudaGraphs(), capture=False)
    ids, mask = batch(3, 20, [20, 7, 15])
    with torch.no_grad():
        want, got = head(ids, attention_mask=mask).logits, bucketed(ids, attention_mask=mask).logits
    assert_same(got, want)
    assert graphs.stats(bucketed).replays == 1


def test_the_varlen_op_runs_on_bucket_shapes(monkeypatch):
    """attention_varlen gets the bucket's rows, cu_seqlens of batch bucket + 1 entries and its max_seqlen; the
    padded attention never runs; one host sync per forward."""
    from roberta_fast.model import checks
    from roberta_fast.ops import trusted as ops  # what the model calls

    calls, syncs = [], []
    varlen, padded, host_run = ops.attention_varlen, ops.attention, checks.HostChecks.run

    def spy_varlen(q, k, v, cu_seqlens, max_seqlen, **kw):
        calls.append((q.shape[0], cu_seqlens.tolist(), max_seqlen))
        return varlen(q, k, v, cu_seqlens, max_seqlen, **kw)

    monkeypatch.setattr(ops, "attention_varlen", spy_varlen)
    monkeypatch.setattr(ops, "attention", lambda *a, **k: pytest.fail("padded attention ran"))
    monkeypatch.setattr(checks.HostChecks, "run", lambda self: syncs.append(1) or host_run(self))
    model = with_bucketed(make_model(layers=1))
    ids, mask = batch(3, 20, [20, 7, 15])
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert calls == [(64, [0, 20, 27, 42, 42], 32)] and syncs == [1]
    assert padded is not None


def test_extra_rows_change_nothing_and_stay_finite():
    """Rows past T hold whatever an earlier batch left (here the largest valid ids and positions): the real rows
    do not change, and the whole static output is finite."""
    model = make_model()
    bucketed = with_bucketed(model)
    ids, mask = batch(3, 20, [20, 7, 15])
    types = (torch.arange(20) > 4).long().expand(3, 20)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        bucketed(ids, attention_mask=mask, token_type_ids=types)
        cache = cache_of(bucketed)
        (entry,) = cache._entries._items.values()
        assert entry.cu_seqlens.tolist() == [0, 20, 27, 42, 42]
        for buf, top in ((entry.ids, VOCAB - 1), (entry.positions, 71), (entry.types, 1)):
            buf[42:] = top
        got = bucketed(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        static = cache._bound.forward_fn(entry)()  # (Tb, hidden), every row
    assert_same(got, want, mask)
    assert static.shape == (64, 32) and torch.isfinite(static).all()
    assert torch.equal(entry.ids[42:], torch.full((22,), VOCAB - 1))  # the fill leaves them as they were


def test_eviction_keeps_at_most_max_graphs():
    model = make_model(layers=1)
    bucketed = with_bucketed(model, CudaGraphs(max_graphs=2))
    shapes = [(1, 9, None), (3, 20, [20, 7, 15]), (1, 9, None), (8, 40, None), (3, 20, [20, 7, 15])]
    with torch.no_grad():
        for i, (B, S, lengths) in enumerate(shapes):
            ids, mask = batch(B, S, lengths, seed=i)
            assert_same(bucketed(ids, attention_mask=mask).last_hidden_state,
                        model(ids, attention_mask=mask).last_hidden_state, mask)
    st = graphs.stats(bucketed)
    # buckets A, B, A (hit), C (evicts B), B (evicts A)
    assert (st.graphs, st.evictions, st.replays) == (2, 2, 5)
    assert [k[0] for k in cache_of(bucketed).buckets()] == [Bucket(8, 384, 64), Bucket(4, 64, 32)]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_in_place_weight_updates_are_seen_without_recapture(mode):
    model = make_model()
    bucketed = with_bucketed(model)
    ids, mask = batch(3, 20, [20, 7, 15])
    with (torch.no_grad() if mode == "no_grad" else torch.inference_mode()):
        bucketed(ids, attention_mask=mask)
        (entry,) = cache_of(bucketed)._entries._items.values()
        for m in (model, bucketed):  # the fused QKV (a copy the graphs own) and the others (read directly)
            m.encoder.layer[0].attention.self.query.weight.mul_(1.5)
            m.encoder.layer[1].attention.self.value.bias.add_(0.3)
            m.embeddings.LayerNorm.weight.add_(0.2)
        got = bucketed(ids, attention_mask=mask).last_hidden_state
        want = model(ids, attention_mask=mask).last_hidden_state
        bucketed.load_state_dict(make_model(seed=5).state_dict())  # copies into the same tensors
        model.load_state_dict(make_model(seed=5).state_dict())
        got2 = bucketed(ids, attention_mask=mask).last_hidden_state
        want2 = model(ids, attention_mask=mask).last_hidden_state
    assert_same(got, want, mask)
    assert_same(got2, want2, mask)
    assert not torch.allclose(want, want2)
    st = graphs.stats(bucketed)
    assert st.invalidations == 0 and list(cache_of(bucketed)._entries._items.values()) == [entry]


def _replace_word_embeddings(m):
    new = torch.nn.Embedding(VOCAB, 32, padding_idx=1)
    with torch.no_grad():
        new.weight.copy_(m.get_input_embeddings().weight * 2)
    m.set_input_embeddings(new)


def _assign_state(m):
    m.load_state_dict({k: v * 1.1 for k, v in m.state_dict().items()}, assign=True)


def _new_storage(m):
    p = m.encoder.layer[1].output.dense.weight
    p.data = p.data * 0.5


def _backend(m):
    m.backend = "torch"


@pytest.mark.parametrize("change", [
    lambda m: m.bfloat16(), _replace_word_embeddings, _assign_state, _new_storage, _backend,
], ids=["bfloat16", "set_input_embeddings", "load_state_dict_assign", "param_data", "backend"])
def test_changes_that_drop_every_graph(change):
    """New parameter storage, dtype, objects or backend: every graph is dropped and captured again."""
    model = make_model()
    bucketed = with_bucketed(model)
    ids, mask = batch(3, 20, [20, 7, 15])
    with torch.no_grad():
        bucketed(ids, attention_mask=mask)
        change(model)
        change(bucketed)
        got = bucketed(ids, attention_mask=mask).last_hidden_state
        want = model(ids, attention_mask=mask).last_hidden_state
    assert got.dtype == want.dtype
    assert_same(got.float(), want.float(), mask, atol=2e-2 if got.dtype == torch.bfloat16 else 1e-5)
    st = graphs.stats(bucketed)
    assert st.invalidations == 1 and st.graphs == 1 and st.replays == 2


def test_registration_anywhere_only_makes_the_caches_look_again():
    """Building another module bumps the generation; the parameters the graphs read are the same: kept."""
    model = with_bucketed(make_model())
    ids, mask = batch(2, 9)
    with torch.no_grad():
        model(ids, attention_mask=mask)
        before = graphs._GENERATION[0]
        torch.nn.Linear(3, 3)
        assert graphs._GENERATION[0] > before
        model(ids, attention_mask=mask)
    st = graphs.stats(model)
    assert st.invalidations == 0 and st.replays == 2 and st.graphs == 1


@pytest.mark.parametrize("case", ["grad", "train", "hidden_states", "attentions", "inputs_embeds", "padded",
                                  "all_padding", "too_large", "autocast"])
def test_fallbacks_run_eagerly_and_say_why(case):
    model = make_model(layers=1)
    options = CudaGraphs(token_edges=(16, 32)) if case == "too_large" else None
    bucketed = with_bucketed(model, options)
    ids, mask = batch(3, 20, [20, 7, 15])
    kw = {"attention_mask": mask}
    if case == "all_padding":
        mask = torch.zeros_like(mask)
        kw["attention_mask"] = mask
    if case in ("hidden_states", "attentions"):
        kw[f"output_{case}"] = True
    if case == "inputs_embeds":
        kw["inputs_embeds"], ids = model.embeddings.word_embeddings(ids).detach(), None
    for m in (model, bucketed):
        m.train(case == "train")
        m.padding_free = case != "padded"
    ctx = torch.enable_grad() if case == "grad" else torch.no_grad()
    auto = torch.autocast("cpu", torch.bfloat16, enabled=case == "autocast")
    with ctx, auto:
        want, got = model(ids, **kw), bucketed(ids, **kw)
    assert_same(got.last_hidden_state, want.last_hidden_state, mask)
    st = graphs.stats(bucketed)
    assert st.replays == 0 and sum(st.fallbacks.values()) == 1, st
    (why,) = st.fallbacks
    expect = {"grad": "grad", "train": "train", "hidden_states": "output_hidden_states", "attentions": "attentions",
              "inputs_embeds": "inputs_embeds", "padded": "padding_free=False", "all_padding": "empty",
              "too_large": "largest bucket", "autocast": "autocast"}[case]
    assert expect in why
    if case == "grad":
        assert got.last_hidden_state.requires_grad


def test_nothing_to_pad_with_padding_free_false_still_replays():
    """padding_free=False only matters for padded batches: a batch without padding is dense either way."""
    model = with_bucketed(make_model(layers=1))
    model.padding_free = False
    with torch.no_grad():
        model(*batch(2, 9))
    assert graphs.stats(model).replays == 1


# ----------------------------------------------------------------------------------------- the public switches


def test_cuda_graphs_on_cpu_tensors_warns_once_and_changes_nothing():
    model = make_model()
    on = copy.deepcopy(model)
    on.cuda_graphs = True
    ids, mask = batch(3, 20, [20, 7, 15])
    with torch.no_grad(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        outs = [on(ids, attention_mask=mask).last_hidden_state for _ in range(3)]
        want = model(ids, attention_mask=mask).last_hidden_state
    msgs = [str(x.message) for x in w if "cuda_graphs" in str(x.message)]
    assert len(msgs) == 1 and "CUDA tensors" in msgs[0] and "cpu" in msgs[0]
    for out in outs:
        assert torch.equal(out, want)
    assert graphs.stats(on).fallbacks == {"inputs not on a CUDA device": 3}


def test_switches_on_our_models(tmp_path):
    model = make_model()
    assert model.cuda_graphs is None and graphs.caches(model) == []
    model.cuda_graphs = True
    assert model.cuda_graphs == CudaGraphs()
    cache = cache_of(model)
    model.cuda_graphs = CudaGraphs()  # same options: the same cache (graphs kept)
    assert cache_of(model) is cache
    model.cuda_graphs = {"max_graphs": 2}
    assert model.cuda_graphs.max_graphs == 2 and cache_of(model) is not cache
    with pytest.raises(TypeError, match="cuda_graphs"):
        model.cuda_graphs = "on"
    model.cuda_graphs = False
    assert model.cuda_graphs is None and graphs.caches(model) == []

    model.save_pretrained(tmp_path)
    loaded = RobertaModel.from_pretrained(tmp_path, cuda_graphs=CudaGraphs(max_graphs=3))
    assert loaded.cuda_graphs == CudaGraphs(max_graphs=3)
    head = roberta_fast.RobertaForSequenceClassification(model.config, cuda_graphs=True)
    assert head.cuda_graphs == CudaGraphs() and len(graphs.caches(head)) == 1
    head.cuda_graphs = False
    assert graphs.caches(head) == []
    with pytest.raises(TypeError, match="cuda_graphs"):
        RobertaModel(model.config, cuda_graphs=1)


def test_clear_stats_and_copies():
    a, b = with_bucketed(make_model(layers=1)), with_bucketed(make_model("bert", layers=1))
    both = torch.nn.ModuleList([a, b])
    with torch.no_grad():
        for m in (a, b):
            m(*batch(2, 9, pad=m.config.pad_token_id))
        a(*batch(3, 20, [20, 7, 15]))
    st = graphs.stats(both)
    assert (st.replays, st.graphs) == (3, 3)
    copied = copy.deepcopy(a)  # options and the capture switch kept, no graphs
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (copied, loaded, pickle.loads(pickle.dumps(a))):
        c = cache_of(m)
        assert c.options == cache_of(a).options and c.capture is False and c.buckets() == [] and c.stats.replays == 0
    graphs.clear(both)
    assert graphs.stats(both).graphs == 0 and cache_of(a).buckets() == []
    with torch.no_grad():
        a(*batch(2, 9))
    assert graphs.stats(a).graphs == 1


def test_optimize_switch_and_bucketed_parity():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=72, pad_token_id=1,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = transformers.RobertaModel(cfg).eval()
    ids, mask = batch(3, 20, [20, 7, 15])
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).last_hidden_state
    fast = roberta_fast.optimize(copy.deepcopy(hf), cuda_graphs=True)
    assert graphs.caches(fast)[0].options == CudaGraphs()
    with pytest.raises(TypeError, match="cuda_graphs"):
        roberta_fast.optimize(fast, cuda_graphs="on")
    assert len(graphs.caches(fast)) == 1  # a bad value changes nothing
    with torch.no_grad(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        eager_cpu = fast(ids, attention_mask=mask).last_hidden_state  # CPU tensors: warned, run eagerly
    assert any("CUDA tensors" in str(x.message) for x in w)
    fast._cuda_graph_cache = GraphCache(CudaGraphs(), capture=False)
    with torch.no_grad():
        got = fast(ids, attention_mask=mask).last_hidden_state
    m = mask.bool()
    torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-5)
    assert torch.equal(got, eager_cpu) or torch.allclose(got, eager_cpu, atol=1e-6)
    assert graphs.stats(fast).replays == 1
    clone = pickle.loads(pickle.dumps(fast))
    assert cache_of(clone).buckets() == []
    roberta_fast.optimize(fast)  # again, without cuda_graphs: off
    assert graphs.caches(fast) == []


# ----------------------------------------------------------------------------------------- GPU

GPU_TOL = {"atol": 1e-2, "rtol": 1e-2}  # float16: a few ulps apart where cuBLAS tiles 128 rows and 124 differently

gpu_batches = [  # (B, S, lengths, left): two share a bucket, one dense, one left-padded, one with an empty row
    (4, 64, [64, 3, 40, 17], False),
    (4, 64, [60, 30, 20, 10], False),  # the first one's bucket (4, 128, 64)
    (2, 64, None, False),
    (3, 50, [50, 9, 22], True),
    (5, 40, [40, 0, 6, 2, 33], False),
    (1, 128, None, False),
]


def gpu_pair(dtype=torch.float16, family="roberta", **options):
    """(model with real CUDA graphs, the same model without) on the GPU."""
    eager = make_model(family, layers=2, hidden=128, heads=2, max_positions=130).to("cuda", dtype)
    graphed = copy.deepcopy(eager)
    graphed.cuda_graphs = CudaGraphs(**options)
    return graphed, eager


def gpu_run(model, B, S, lengths, left, seed, pad=1):
    ids, mask = batch(B, S, lengths, pad=pad, seed=seed, left=left, device="cuda")
    return model(ids, attention_mask=mask), mask


def count_calls(monkeypatch):
    from roberta_fast.ops import trusted as ops  # what the model calls

    calls = {"attention_varlen": 0, "attention": 0}
    for name in calls:
        real = getattr(ops, name)

        def spy(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(ops, name, spy)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_gpu_graphs_match_the_eager_forward(monkeypatch, mode):
    """Same outputs as without graphs over batches in the same and in different buckets (padded, ragged, left
    padding, an empty sequence, dense); the varlen attention runs (at capture: replays call no Python), the
    padded one never; each result is a fresh tensor the next replay does not touch."""
    graphed, eager = gpu_pair()
    calls = count_calls(monkeypatch)
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    kept = []
    with ctx():
        for i, (B, S, lengths, left) in enumerate(gpu_batches):
            before = dict(calls)
            got, mask = gpu_run(graphed, B, S, lengths, left, seed=i)
            varlen, padded = (calls[k] - before[k] for k in ("attention_varlen", "attention"))
            assert varlen == (0 if i == 1 else 3 * 2) and padded == 0, (i, varlen, padded)  # warm-up, check, capture
            want, _ = gpu_run(eager, B, S, lengths, left, seed=i)
            torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **GPU_TOL)
            torch.testing.assert_close(got.pooler_output, want.pooler_output, **GPU_TOL)
            assert torch.all(got.last_hidden_state[~mask.bool()] == 0)
            kept.append((got.last_hidden_state, got.last_hidden_state.clone()))
    st = graphs.stats(graphed)
    assert st.replays == len(gpu_batches) and st.captures == len(gpu_batches) - 1 and not st.fallbacks, st
    for out, snapshot in kept:
        assert torch.equal(out, snapshot)


@pytest.mark.gpu
def test_gpu_eviction_and_shared_pool():
    graphed, eager = gpu_pair(max_graphs=2)
    with torch.inference_mode():
        for i in range(6):
            B, S, lengths, left = gpu_batches[[0, 2, 3][i % 3]]
            got, mask = gpu_run(graphed, B, S, lengths, left, seed=i)
            want, _ = gpu_run(eager, B, S, lengths, left, seed=i)
            torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **GPU_TOL)
        entries = list(cache_of(graphed)._entries._items.values())
    st = graphs.stats(graphed)
    assert (st.captures, st.evictions, st.graphs) == (6, 4, 2), st
    assert len({e.graph.pool() for e in entries}) == 1  # one memory pool shared by the graphs


@pytest.mark.gpu
def test_gpu_in_place_update_seen_by_the_replay():
    graphed, eager = gpu_pair()
    B, S, lengths, left = gpu_batches[0]
    with torch.inference_mode():
        gpu_run(graphed, B, S, lengths, left, seed=0)
        for m in (graphed, eager):
            m.encoder.layer[0].attention.self.key.weight.mul_(1.25)
            m.encoder.layer[1].intermediate.dense.bias.add_(0.5)
            m.embeddings.word_embeddings.weight.mul_(0.9)
        got, _ = gpu_run(graphed, B, S, lengths, left, seed=0)
        want, _ = gpu_run(eager, B, S, lengths, left, seed=0)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **GPU_TOL)
    st = graphs.stats(graphed)
    assert st.captures == 1 and st.replays == 2 and st.invalidations == 0


@pytest.mark.gpu
def test_gpu_half_conversion_recaptures():
    graphed, eager = gpu_pair(torch.bfloat16)
    B, S, lengths, left = gpu_batches[3]
    with torch.inference_mode():
        gpu_run(graphed, B, S, lengths, left, seed=0)
    graphed.half()
    eager.half()
    with torch.inference_mode():
        got, _ = gpu_run(graphed, B, S, lengths, left, seed=0)
        want, _ = gpu_run(eager, B, S, lengths, left, seed=0)
    assert got.last_hidden_state.dtype == torch.float16
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **GPU_TOL)
    st = graphs.stats(graphed)
    assert (st.captures, st.invalidations, st.graphs) == (2, 1, 1), st


@pytest.mark.gpu
def test_gpu_a_forward_that_syncs_switches_graphs_off(monkeypatch):
    """A host read inside the forward (here planted in attention_varlen) is found before any capture: a warning,
    graphs off for this model state, eager outputs."""
    from roberta_fast.ops import trusted as ops  # what the model calls

    real = ops.attention_varlen
    def syncing(q, k, v, cu_seqlens, max_seqlen, **kw):
        cu_seqlens.tolist()
        return real(q, k, v, cu_seqlens, max_seqlen, **kw)

    monkeypatch.setattr(ops, "attention_varlen", syncing)
    graphed, eager = gpu_pair()
    B, S, lengths, left = gpu_batches[0]
    with torch.inference_mode(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        outs = [gpu_run(graphed, B, S, lengths, left, seed=0)[0] for _ in range(2)]
        want, _ = gpu_run(eager, B, S, lengths, left, seed=0)
    assert sum("switched off" in str(x.message) for x in w) == 1
    for got in outs:
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **GPU_TOL)
    st = graphs.stats(graphed)
    assert st.captures == 0 and sum(st.fallbacks.values()) == 2
    assert all(k.startswith("graphs off: the forward synchronizes") for k in st.fallbacks)


@pytest.mark.gpu
def test_gpu_inside_a_callers_capture_takes_the_padded_path():
    graphed, eager = gpu_pair()
    ids, mask = batch(4, 64, [64, 3, 40, 17], device="cuda")
    with torch.inference_mode():
        want = eager(ids, attention_mask=mask).last_hidden_state
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            graphed(ids, attention_mask=mask)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = graphed(ids, attention_mask=mask).last_hidden_state
        g.replay()
        torch.cuda.synchronize()
    m = mask.bool()
    torch.testing.assert_close(out[m], want[m], **GPU_TOL)
    assert any("capture" in k for k in graphs.stats(graphed).fallbacks)


@pytest.mark.gpu
def test_gpu_optimize_with_cuda_graphs():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=256, max_position_embeddings=130, pad_token_id=1,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = transformers.RobertaModel(cfg).eval().to("cuda", torch.float16)
    eager = roberta_fast.optimize(copy.deepcopy(hf))
    graphed = roberta_fast.optimize(copy.deepcopy(hf), cuda_graphs=True)
    with torch.inference_mode():
        for i, (B, S, lengths, left) in enumerate(gpu_batches):
            got, mask = gpu_run(graphed, B, S, lengths, left, seed=i)
            want, _ = gpu_run(eager, B, S, lengths, left, seed=i)
            torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **GPU_TOL)
    assert graphs.stats(graphed).replays == len(gpu_batches)
