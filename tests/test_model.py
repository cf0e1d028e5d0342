"""The encoder (roberta_fast.model) against transformers' own models.

transformers models are built from random-init configs (weights perturbed so LayerNorm scales and
biases are not trivial), saved with save_pretrained to tmp_path and loaded with our from_pretrained.
References: transformers in float64 (the oracle) and in the dtype under test (torch's own error), the
rule of roberta_fast.testing, on real tokens of padded batches with lengths 1..S.
"""

import copy
import json
import os
import warnings

import pytest
import torch

from roberta_fast.testing import assert_rule

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import roberta_fast  # noqa: E402
from roberta_fast import (  # noqa: E402
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    EncoderConfig,
    RobertaForMaskedLM,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
    XLMRobertaModel,
    padding,  # noqa: E402
    pool,
)
from roberta_fast.ops import BackendUnavailableError  # noqa: E402
from roberta_fast.padding import pad_input, unpad_input  # noqa: E402

VOCAB = 101

# (family, layers, heads, hidden, intermediate, extra config)
CONFIGS = [
    ("roberta", 2, 4, 32, 64, {}),
    ("roberta", 1, 3, 48, 80, {"type_vocab_size": 1, "hidden_act": "gelu_new"}),
    ("bert", 3, 2, 24, 40, {}),
    ("bert", 2, 4, 64, 96, {"layer_norm_eps": 1e-5}),
]
CONFIG_IDS = [f"{c[0]}-L{c[1]}-H{c[2]}-d{c[3]}" for c in CONFIGS]


# ----------------------------------------------------------------------------------------- helpers


def hf_config(family="roberta", layers=2, heads=4, hidden=32, inter=64, **kw):
    roberta = family != "bert"
    cls = {"roberta": transformers.RobertaConfig, "bert": transformers.BertConfig,
           "xlm-roberta": transformers.XLMRobertaConfig}[family]
    d = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
             intermediate_size=inter, max_position_embeddings=24 + (2 if roberta else 0), type_vocab_size=2,
             pad_token_id=1 if roberta else 0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             attn_implementation="eager")
    d.update(kw)
    return cls(**d)


def randomize_(model, seed=1, scale=0.05):
    """Perturb every parameter (LayerNorm weights away from 1, biases away from 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def make_hf(cls, config, seed=1):
    torch.manual_seed(seed)
    return randomize_(cls(config), seed).eval()


def save(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))
    return str(path)


def make_batch(B, S, pad, *, seed=0, lengths=None, vocab=VOCAB):
    """input_ids (B, S) with pad at padded positions, attention_mask (B, S) int64 (right padding)."""
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = (torch.randperm(S, generator=g)[:B] % S) + 1  # distinct lengths in 1..S when B <= S
    lengths = torch.as_tensor(lengths)
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
    ids = torch.randint(3, vocab, (B, S), generator=g).masked_fill(mask == 0, pad)
    return ids, mask


def real(t, mask):
    """The real-token rows of a (B, S, ...) tensor: (T, ...); a (B, n) tensor unchanged."""
    return t[mask.bool()] if t.shape[:2] == mask.shape else t


def check(ours, hf32, hf64, mask=None, name="output", floor=None):
    if mask is not None:
        ours, hf32, hf64 = real(ours, mask), real(hf32, mask), real(hf64, mask)
    assert_rule(ours, hf64.to(ours.dtype) if hf64.dtype != torch.float64 else hf64, hf32, name=name, floor=floor)


@torch.no_grad()
def run(model, ids, mask, **kw):
    return model(ids, attention_mask=mask, **kw)


# ----------------------------------------------------------------------------------------- encoder parity


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
@pytest.mark.parametrize("family,layers,heads,hidden,inter,extra", CONFIGS, ids=CONFIG_IDS)
def test_encoder_parity(tmp_path, family, layers, heads, hidden, inter, extra, padding_free):
    cfg = hf_config(family, layers, heads, hidden, inter, **extra)
    hf_cls = transformers.RobertaModel if family == "roberta" else transformers.BertModel
    hf = make_hf(hf_cls, cfg)
    ours_cls = RobertaModel if family == "roberta" else BertModel
    ours = ours_cls.from_pretrained(save(hf, tmp_path), padding_free=padding_free)
    hf64 = copy.deepcopy(hf).double()

    S = 11
    ids, mask = make_batch(S, S, cfg.pad_token_id)  # lengths 1..11
    kw = dict(output_hidden_states=True, output_attentions=True)
    if cfg.type_vocab_size > 1:
        kw["token_type_ids"] = (torch.arange(S)[None, :] >= 4).long().expand(S, S) * mask
    o, a, a64 = run(ours, ids, mask, **kw), run(hf, ids, mask, **kw), run(hf64, ids, mask, **kw)

    check(o.last_hidden_state, a.last_hidden_state, a64.last_hidden_state, mask, "last_hidden_state")
    pad = ~mask.bool()
    assert torch.all(o.last_hidden_state[pad] == 0), "padded positions of last_hidden_state must be zeros"
    check(o.pooler_output, a.pooler_output, a64.pooler_output, name="pooler_output")
    assert len(o.hidden_states) == layers + 1 and len(o.attentions) == layers
    for i, (x, y, z) in enumerate(zip(o.hidden_states, a.hidden_states, a64.hidden_states)):
        check(x, y, z, mask, f"hidden_states[{i}]")
        assert torch.all(x[pad] == 0)
    for i, (x, y, z) in enumerate(zip(o.attentions, a.attentions, a64.attentions)):
        assert x.shape == (S, heads, S, S)
        q_real = mask.bool()[:, None, :, None].expand_as(x)  # real query rows
        assert_rule(x[q_real], z[q_real], y[q_real], name=f"attentions[{i}]")
        assert torch.all(x[~q_real] == 0), "padded query rows of the probabilities must be zeros"
    torch.testing.assert_close(o.hidden_states[-1], o.last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_padded_path_equals_padding_free(family):
    cfg = hf_config(family, 2, 4, 32, 64)
    model = (RobertaModel if family == "roberta" else BertModel)(cfg).eval()
    randomize_(model)
    ids, mask = make_batch(6, 13, cfg.pad_token_id, seed=3)
    mask[2, 5] = 0  # a hole in the middle of a row: still one sequence of the real tokens
    outs = {}
    for pf in (True, False):
        model.padding_free = pf
        outs[pf] = run(model, ids, mask, output_hidden_states=True)
    torch.testing.assert_close(outs[True].last_hidden_state, outs[False].last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[True].pooler_output, outs[False].pooler_output, rtol=1e-5, atol=1e-5)
    for x, y in zip(outs[True].hidden_states, outs[False].hidden_states):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_no_mask_and_all_ones_mask_agree():
    cfg = hf_config("roberta")
    hf = make_hf(transformers.RobertaModel, cfg)
    ours = RobertaModel(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids = torch.randint(3, VOCAB, (3, 9))
    a = run(hf, ids, None).last_hidden_state
    for m in (None, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)):
        torch.testing.assert_close(run(ours, ids, m).last_hidden_state, a, rtol=1e-5, atol=1e-5)


def test_inputs_embeds_position_ids_token_types(tmp_path):
    cfg = hf_config("bert", 2, 2, 32, 48)
    hf = make_hf(transformers.BertModel, cfg)
    ours = BertModel.from_pretrained(save(hf, tmp_path))
    ids, mask = make_batch(4, 7, 0, seed=5)
    emb = torch.randn(4, 7, 32)
    pos = torch.randint(0, cfg.max_position_embeddings, (4, 7))
    types = torch.randint(0, 2, (4, 7))
    for kw in (dict(inputs_embeds=emb), dict(input_ids=ids, position_ids=pos),
               dict(input_ids=ids, position_ids=pos[:1]), dict(input_ids=ids, token_type_ids=types)):
        with torch.no_grad():
            a = hf(attention_mask=mask, **kw).last_hidden_state
            o = ours(attention_mask=mask, **kw).last_hidden_state
        torch.testing.assert_close(real(o, mask), real(a, mask), rtol=1e-5, atol=1e-5)

    rcfg = hf_config("roberta")  # RoBERTa with inputs_embeds: sequential positions from padding_idx + 1
    rhf = make_hf(transformers.RobertaModel, rcfg)
    rours = RobertaModel(rcfg).eval()
    rours.load_state_dict(rhf.state_dict())
    emb = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(rours(inputs_embeds=emb).last_hidden_state,
                                   rhf(inputs_embeds=emb).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_roberta_positions_follow_padding():
    """A left-padded row and its right-padded twin get the same states on real tokens (RoBERTa counts
    positions over non-pad ids), as in transformers."""
    cfg = hf_config("roberta")
    model = randomize_(RobertaModel(cfg).eval())
    ids = torch.tensor([[5, 6, 7, 1, 1], [1, 1, 5, 6, 7]])
    mask = (ids != 1).long()
    h = run(model, ids, mask).last_hidden_state
    torch.testing.assert_close(h[0, :3], h[1, 2:], rtol=1e-5, atol=1e-5)


def test_return_dict_false_and_output_object():
    cfg = hf_config("bert")
    model = BertModel(cfg).eval()
    ids, mask = make_batch(3, 6, 0)
    out = run(model, ids, mask, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2
    out = run(model, ids, mask, return_dict=False, output_hidden_states=True, output_attentions=True)
    # transformers 5: (last, pooler, hidden_states, attentions, cross_attentions=())
    assert len(out) == 5 and len(out[2]) == 3 and len(out[3]) == 2 and out[4] == ()
    d = run(model, ids, mask)
    assert d.keys() == ["last_hidden_state", "pooler_output"] and d.hidden_states is None
    assert d[0] is d["last_hidden_state"] is d.last_hidden_state and d.to_tuple()[1] is d.pooler_output
    nopool = BertModel(cfg, add_pooling_layer=False).eval()
    assert run(nopool, ids, mask).pooler_output is None
    tup = run(nopool, ids, mask, return_dict=False)  # None fields are skipped, as in transformers
    assert len(tup) == 1 and tup[0].shape == (3, 6, cfg.hidden_size)


def test_poisoned_empty_padding_free(poison_empty):
    cfg = hf_config("roberta")
    model = randomize_(RobertaModel(cfg).eval())
    ids, mask = make_batch(5, 8, 1)
    out = run(model, ids, mask, output_hidden_states=True)
    for t in (out.last_hidden_state, *out.hidden_states):
        assert not torch.isnan(t).any(), "an output element was never written"
        assert torch.all(t[~mask.bool()] == 0)


# ----------------------------------------------------------------------------------------- heads

HEADS = [
    (RobertaForMaskedLM, "RobertaForMaskedLM", "roberta", "logits", True),
    (RobertaForSequenceClassification, "RobertaForSequenceClassification", "roberta", "logits", False),
    (RobertaForTokenClassification, "RobertaForTokenClassification", "roberta", "logits", True),
    (RobertaForQuestionAnswering, "RobertaForQuestionAnswering", "roberta", "start_logits", True),
    (BertForMaskedLM, "BertForMaskedLM", "bert", "logits", True),
    (BertForSequenceClassification, "BertForSequenceClassification", "bert", "logits", False),
    (BertForTokenClassification, "BertForTokenClassification", "bert", "logits", True),
    (BertForQuestionAnswering, "BertForQuestionAnswering", "bert", "start_logits", True),
]


def _labels(name, B, S, cfg):
    if "MaskedLM" in name:
        lab = torch.randint(0, VOCAB, (B, S))
        lab[:, ::2] = -100
        return dict(labels=lab)
    if "Sequence" in name:
        return dict(labels=torch.randint(0, cfg.num_labels, (B,)))
    if "Token" in name:
        return dict(labels=torch.randint(0, cfg.num_labels, (B, S)))
    return dict(start_positions=torch.randint(0, S, (B,)), end_positions=torch.randint(0, S, (B,)))


@pytest.mark.parametrize("ours_cls,hf_name,family,field,per_token", HEADS, ids=[h[1] for h in HEADS])
def test_head_parity(tmp_path, ours_cls, hf_name, family, field, per_token):
    cfg = hf_config(family, 2, 2, 32, 48, num_labels=2 if "QuestionAnswering" in hf_name else 3)
    hf = make_hf(getattr(transformers, hf_name), cfg)
    path = save(hf, tmp_path)
    ours = ours_cls.from_pretrained(path)
    assert set(ours.state_dict()) == set(hf.state_dict())
    ids, mask = make_batch(5, 8, cfg.pad_token_id, seed=2)
    mask[:, 0] = 1  # the first token is real in every row (sequence heads read it)
    labels = _labels(hf_name, 5, 8, cfg)
    # the MLM loss covers every labelled position, padded ones included: label only real tokens
    if "labels" in labels and labels["labels"].dim() == 2:
        labels["labels"] = labels["labels"].masked_fill(mask == 0, -100)
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, **labels)
        o = ours(ids, attention_mask=mask, **labels)
    x, y = getattr(o, field), getattr(a, field)
    if per_token:
        x, y = real(x, mask), real(y, mask)
    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    if field == "start_logits":
        torch.testing.assert_close(real(o.end_logits, mask), real(a.end_logits, mask), rtol=1e-4, atol=1e-5)
    if "QuestionAnswering" not in hf_name and "Token" not in hf_name:
        torch.testing.assert_close(o.loss, a.loss, rtol=1e-4, atol=1e-5)
    elif "QuestionAnswering" in hf_name:
        assert o.loss is not None
    if "MaskedLM" in hf_name:
        head = ours.lm_head if family == "roberta" else ours.cls.predictions
        assert head.decoder.weight is ours.base_model.embeddings.word_embeddings.weight
        assert head.decoder.bias is head.bias
    tup = ours(ids, attention_mask=mask, return_dict=False, **labels)
    assert isinstance(tup, tuple) and tup[0] is not None


@pytest.mark.parametrize("ours_cls,hf_name", [(RobertaForMaskedLM, "RobertaForMaskedLM"),
                                              (BertForSequenceClassification, "BertForSequenceClassification")])
def test_state_dict_round_trip(ours_cls, hf_name):
    family = "roberta" if "Roberta" in hf_name else "bert"
    cfg = hf_config(family, 2, 2, 32, 48)
    hf = make_hf(getattr(transformers, hf_name), cfg)
    ours = ours_cls(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # transformers -> ours
    ids, mask = make_batch(4, 6, cfg.pad_token_id)
    mask[:, 0] = 1
    ref = run(hf, ids, mask).logits
    torch.testing.assert_close(real(run(ours, ids, mask).logits, mask), real(ref, mask), rtol=1e-4, atol=1e-5)
    randomize_(ours, seed=7)
    hf2 = getattr(transformers, hf_name)(cfg).eval()
    hf2.load_state_dict(ours.state_dict(), strict=True)  # ours -> transformers
    torch.testing.assert_close(real(run(hf2, ids, mask).logits, mask), real(run(ours, ids, mask).logits, mask),
                               rtol=1e-4, atol=1e-5)
    assert set(ours.state_dict()) == set(hf.state_dict())


def test_save_pretrained_loads_in_transformers(tmp_path):
    cfg = hf_config("roberta", 2, 2, 32, 48)
    ours = randomize_(RobertaForMaskedLM(cfg).eval())
    ours.save_pretrained(tmp_path)
    hf = transformers.RobertaForMaskedLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ids, mask = make_batch(3, 7, 1)
    torch.testing.assert_close(real(run(hf, ids, mask).logits, mask), real(run(ours, ids, mask).logits, mask),
                               rtol=1e-4, atol=1e-5)
    back = RobertaForMaskedLM.from_pretrained(tmp_path)
    for (n, p), (n2, q) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert n == n2 and torch.equal(p, q)


# ----------------------------------------------------------------------------------------- loading


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        RobertaModel.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        RobertaModel.from_pretrained(empty)
    (empty / "config.json").write_text(json.dumps(hf_config("roberta").to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        RobertaModel.from_pretrained(empty)

    hf = make_hf(transformers.RobertaModel, hf_config("roberta", layers=2))
    path = save(hf, tmp_path / "ok")
    cfg_file = os.path.join(path, "config.json")
    good = json.load(open(cfg_file))

    def with_config(**kw):
        json.dump({**good, **kw}, open(cfg_file, "w"))

    with_config(intermediate_size=50)
    with pytest.raises(ValueError, match=r"shape mismatch: .*encoder\.layer\.0\.intermediate\.dense\.weight"):
        RobertaModel.from_pretrained(path)
    with_config(num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"not in the model: encoder\.layer\.1\."):
        RobertaModel.from_pretrained(path)
    with_config(num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"missing in checkpoint: encoder\.layer\.2\."):
        RobertaModel.from_pretrained(path)
    with_config(is_decoder=True)
    with pytest.raises(ValueError, match="decoder"):
        RobertaModel.from_pretrained(path)


def test_from_pretrained_formats_prefixes_and_dtype(tmp_path):
    cfg = hf_config("bert", 2, 2, 32, 48)
    hf = make_hf(transformers.BertModel, cfg)
    ids, mask = make_batch(3, 6, 0)
    ref = run(hf, ids, mask).last_hidden_state

    # pytorch_model.bin with old TF-style LayerNorm names and the position_ids buffer
    d = tmp_path / "bin"
    d.mkdir()
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in hf.state_dict().items()}
    sd["embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings)[None]
    torch.save(sd, d / "pytorch_model.bin")
    (d / "config.json").write_text(hf.config.to_json_string())
    ours = BertModel.from_pretrained(d)
    torch.testing.assert_close(real(run(ours, ids, mask).last_hidden_state, mask), real(ref, mask),
                               rtol=1e-5, atol=1e-5)

    # a head checkpoint ("bert." prefix, NSP/MLM weights) into the encoder: head weights ignored
    pre = make_hf(transformers.BertForPreTraining, cfg)
    with pytest.warns(UserWarning, match="not used"):
        enc = BertModel.from_pretrained(save(pre, tmp_path / "pre"))
    with torch.no_grad():
        ref2 = pre.bert(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(real(run(enc, ids, mask).last_hidden_state, mask), real(ref2, mask),
                               rtol=1e-5, atol=1e-5)

    # an encoder checkpoint into a head: head weights newly initialized
    with pytest.warns(UserWarning, match="newly initialized"):
        head = BertForTokenClassification.from_pretrained(save(hf, tmp_path / "enc"), num_labels=5)
    assert head.classifier.weight.shape == (5, 32) and torch.isfinite(head.classifier.weight).all()
    torch.testing.assert_close(head.bert.embeddings.word_embeddings.weight, hf.embeddings.word_embeddings.weight)

    # a classification head without pooler into an encoder with one: the pooler is initialized
    seq = make_hf(transformers.RobertaForTokenClassification, hf_config("roberta"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RobertaModel.from_pretrained(save(seq, tmp_path / "tok"))
    msgs = " | ".join(str(w.message) for w in caught)
    assert "newly initialized" in msgs and "pooler.dense.weight" in msgs and "not used" in msgs, msgs

    # dtype and XLM-R / BERT-vs-RoBERTa family warnings
    bf = BertModel.from_pretrained(d, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters()) and not bf.training
    xlmr = make_hf(transformers.XLMRobertaModel, hf_config("xlm-roberta"))
    x = XLMRobertaModel.from_pretrained(save(xlmr, tmp_path / "xlmr"))
    rids, rmask = make_batch(3, 6, 1)
    torch.testing.assert_close(real(run(x, rids, rmask).last_hidden_state, rmask),
                               real(run(xlmr, rids, rmask).last_hidden_state, rmask), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="position ids"):
        RobertaModel.from_pretrained(d)


def test_config_constructors():
    hf_cfg = hf_config("roberta", 2, 2, 32, 48)
    a = RobertaModel(hf_cfg)
    b = RobertaModel(EncoderConfig.from_hf(hf_cfg))
    assert a.training and list(a.state_dict()) == list(b.state_dict())
    assert a.embeddings.word_embeddings.weight[hf_cfg.pad_token_id].abs().sum() == 0
    assert a.encoder.layer[0].output.LayerNorm.weight.eq(1).all()
    c = EncoderConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=32)
    assert c.head_dim == 16 and c.to_hf().hidden_size == 64
    with pytest.raises(ValueError, match="multiple"):
        EncoderConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        EncoderConfig(hidden_act="swish")
    with pytest.raises(TypeError, match="config"):
        BertModel(42)
    mlm = BertForMaskedLM(EncoderConfig(vocab_size=50, hidden_size=16, num_attention_heads=2,
                                        num_hidden_layers=1, intermediate_size=16))
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight


# ----------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    cfg = hf_config("roberta")  # max_position_embeddings 26, pad 1: at most 24 tokens
    model = RobertaModel(cfg).eval()
    ids, mask = make_batch(2, 6, 1)
    with pytest.raises(ValueError, match=r"input_ids holds 101, outside \[0, 101\).*vocab_size"):
        model(ids.masked_fill(ids == ids[0, 0], VOCAB))
    with pytest.raises(ValueError, match="input_ids holds -1"):
        model(ids.masked_fill(ids == ids[0, 0], -1))
    with pytest.raises(ValueError, match=r"sequence length 25 .*max_position_embeddings = 26"):
        model(torch.randint(3, VOCAB, (1, 25)))
    model(torch.randint(3, VOCAB, (1, 24)))  # the longest that fits
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(2, 6\), got \(2, 5\)"):
        model(ids, attention_mask=mask[:, :5])
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=mask[:, None, None, :])
    with pytest.raises(ValueError, match="token_type_ids holds 2"):
        model(ids, token_type_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="position_ids holds 26"):
        model(ids, position_ids=torch.full_like(ids, 26))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(TypeError, match="integers"):
        model(ids.float())
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(2, 6, 31))
    with pytest.raises(NotImplementedError, match="head_mask"):
        model(ids, head_mask=torch.ones(2, 4))
    bert = BertModel(hf_config("bert"))  # max 24 positions
    with pytest.raises(ValueError, match="sequence length 25"):
        bert(torch.randint(3, VOCAB, (1, 25)))


# ----------------------------------------------------------------------------------------- training


def test_train_mode_dropout():
    cfg = hf_config("roberta", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0)
    model = randomize_(RobertaModel(cfg))
    ids, mask = make_batch(3, 7, 1)
    model.train()
    a, b = run(model, ids, mask).last_hidden_state, run(model, ids, mask).last_hidden_state
    assert not torch.allclose(real(a, mask), real(b, mask)), "hidden dropout is not applied in train mode"
    model.eval()
    a, b = run(model, ids, mask).last_hidden_state, run(model, ids, mask).last_hidden_state
    assert torch.equal(a, b)

    cfg = hf_config("roberta", attention_probs_dropout_prob=0.3)  # attention-probs dropout only
    model = randomize_(RobertaModel(cfg)).train()
    a, b = run(model, ids, mask).last_hidden_state, run(model, ids, mask).last_hidden_state
    assert not torch.allclose(real(a, mask), real(b, mask)), "attention dropout is not applied in train mode"
    assert torch.all(a[~mask.bool()] == 0)


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
def test_gradients_match_transformers(padding_free):
    cfg = hf_config("bert", 2, 2, 32, 48)
    hf = make_hf(transformers.BertModel, cfg).train()  # dropout 0: deterministic train mode
    ours = BertModel(cfg, padding_free=padding_free).train()
    ours.load_state_dict(hf.state_dict())
    ids, mask = make_batch(4, 7, 0)
    w = torch.randn(4, 7, 32) * mask[..., None]
    for m in (hf, ours):
        out = m(ids, attention_mask=mask)
        ((out.last_hidden_state * w).sum() + out.pooler_output.square().sum()).backward()
    g_hf = {n: p.grad for n, p in hf.named_parameters()}
    for n, p in ours.named_parameters():
        assert p.grad is not None, f"no gradient reached {n}"
        torch.testing.assert_close(p.grad, g_hf[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    assert ours.encoder.layer[0].attention.self._qkv_cache is None, "training must not use the cached QKV"


def test_qkv_inference_reads_views_of_the_joined_parameters():
    """join_qkv put query / key / value back to back: inference reads one view of them (no copy), so an update
    that bumps no version counter (torch's fused AdamW, p.data.mul_) is seen at once."""
    cfg = hf_config("roberta")
    hf = make_hf(transformers.RobertaModel, cfg)
    ours = RobertaModel(cfg).eval()
    ours.load_state_dict(hf.state_dict())
    ids, mask = make_batch(3, 6, 1)
    sa = ours.encoder.layer[0].attention.self
    run(ours, ids, mask)
    w, b = sa.qkv_weight_bias()
    assert w.data_ptr() == sa.query.weight.data_ptr() and b.data_ptr() == sa.query.bias.data_ptr()
    assert sa._qkv_cache is None, "joined parameters need no concatenated copy"
    for m in (hf, ours):
        m.encoder.layer[0].attention.self.key.weight.data.mul_(1.5)  # no version bump, like a fused optimizer
        m.encoder.layer[1].attention.self.value.bias.data.add_(0.3)
    torch.testing.assert_close(real(run(ours, ids, mask).last_hidden_state, mask),
                               real(run(hf, ids, mask).last_hidden_state, mask), rtol=1e-5, atol=1e-5)
    ours.load_state_dict(randomize_(copy.deepcopy(hf), seed=9).state_dict())
    hf.load_state_dict(ours.state_dict())
    torch.testing.assert_close(real(run(ours, ids, mask).last_hidden_state, mask),
                               real(run(hf, ids, mask).last_hidden_state, mask), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(ours(ids, attention_mask=mask).last_hidden_state,
                                   run(ours, ids, mask).last_hidden_state)


def test_qkv_cache_rebuilds_when_weights_change():
    """Parameters that are not joined (here: key given its own storage) are concatenated once and cached, keyed
    on their data_ptr and version counters."""
    cfg = hf_config("roberta")
    hf = make_hf(transformers.RobertaModel, cfg)
    ours = RobertaModel(cfg).eval()
    ours.load_state_dict(hf.state_dict())
    sa = ours.encoder.layer[0].attention.self
    sa.key.weight.data = sa.key.weight.data.clone()  # no longer adjacent to query / value
    ids, mask = make_batch(3, 6, 1)
    run(ours, ids, mask)
    cached = sa._qkv_cache[1]
    run(ours, ids, mask)
    assert sa._qkv_cache[1] is cached, "the fused QKV weight must be built once"
    with torch.no_grad():
        for m in (hf, ours):
            m.encoder.layer[0].attention.self.key.weight.mul_(1.5)  # in place: same data_ptr, new _version
    torch.testing.assert_close(real(run(ours, ids, mask).last_hidden_state, mask),
                               real(run(hf, ids, mask).last_hidden_state, mask), rtol=1e-5, atol=1e-5)
    assert sa._qkv_cache[1] is not cached


# ----------------------------------------------------------------------------------------- pooling, padding


def test_pool():
    h = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    mean = pool(h, mask)
    for i in range(3):
        n = int(mask[i].sum())
        torch.testing.assert_close(mean[i], h[i, :n].mean(0))
    torch.testing.assert_close(pool(h, mask, mode="cls"), h[:, 0])
    torch.testing.assert_close(pool(h), h.mean(1))
    assert pool(h.bfloat16(), mask).dtype == torch.bfloat16
    for i in range(3):  # max over real tokens only
        torch.testing.assert_close(pool(h, mask, mode="max")[i], h[i, :int(mask[i].sum())].amax(0))
    torch.testing.assert_close(pool(h, mode="max"), h.amax(1))
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])  # cls: the first real token
    torch.testing.assert_close(pool(h, left, mode="cls"), h[[0, 1, 2], [2, 0, 4]])
    for mode in ("mean", "cls", "max"):
        e = pool(h, mask, mode=mode, normalize=True)
        torch.testing.assert_close(e, torch.nn.functional.normalize(pool(h, mask, mode=mode), dim=-1))
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="mode"):
        pool(h, mask, mode="min")
    with pytest.raises(ValueError, match="attention_mask shape"):
        pool(h, mask[:, :4])


def test_unpad_pad_round_trip():
    x = torch.randn(4, 6, 3, 2)
    mask = torch.rand(4, 6) > 0.4
    mask[1] = False  # an empty sequence
    packed, idx, cu, max_len = unpad_input(x, mask)
    assert packed.shape == (int(mask.sum()), 3, 2) and cu.dtype == torch.int32 and cu[0] == 0
    assert cu.tolist()[1:] == torch.cumsum(mask.sum(1), 0).tolist() and max_len == int(mask.sum(1).max())
    back = pad_input(packed, idx, 4, 6)
    torch.testing.assert_close(back, x * mask[..., None, None])
    with pytest.raises(ValueError, match="attention_mask"):
        unpad_input(x, mask[:, :5])


@pytest.mark.parametrize("shape", [(4, 6), (1, 1), (3, 1), (0, 5), (2, 0)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_layout_round_trip(shape):
    """padding.Layout in its three forms: packed (from mask_stats and the host-read counts, no sync of its
    own), padded with the mask, dense; rows -> (B, S, ...) puts zeros at padding."""
    B, S = shape
    x = torch.randn(B, S, 3)
    real_m = torch.rand(B, S) > 0.4
    if B > 1:
        real_m[1] = False  # an empty sequence
    if B and S:
        real_m[0, 0] = True
    expect = x * real_m[..., None]
    if B * S:
        seqlens, total, longest = padding.mask_stats(real_m)
        packed = padding.Layout.packed(real_m, seqlens, int(total), int(longest))
        assert packed.is_packed and packed.max_seqlen == int(real_m.sum(1).max())
        assert packed.indices.tolist() == torch.nonzero(real_m.flatten()).flatten().tolist()
        assert packed.cu_seqlens.dtype == torch.int32
        assert packed.cu_seqlens.tolist() == [0] + torch.cumsum(real_m.sum(1), 0).tolist()
        rows = packed.to_rows(x)
        torch.testing.assert_close(rows, x[real_m], rtol=0, atol=0)
        torch.testing.assert_close(packed.to_padded(rows), expect, rtol=0, atol=0)
    indices, cu, max_len = padding.seqlens_info(real_m.long())
    assert indices.numel() == int(real_m.sum()) and cu.shape == (B + 1,) and max_len == (int(real_m.sum(1).max())
                                                                                          if B * S else 0)
    padded = padding.Layout(B, S, mask=padding.real_tokens(real_m.long()))
    assert padded.to_rows(x).shape == (B * S, 3) and padded.to_rows(None) is None
    torch.testing.assert_close(padded.to_padded(padded.to_rows(x)), expect, rtol=0, atol=0)
    dense = padding.Layout(B, S)
    torch.testing.assert_close(dense.to_padded(dense.to_rows(x)), x, rtol=0, atol=0)


def test_model_packs_through_padding_module(monkeypatch):
    """The packing of padded batches lives in roberta_fast.padding only: the model packs through it (once per
    forward, only on the padding-free path of a batch with padding) and holds no packing code of its own."""
    import inspect

    import roberta_fast.model as model_pkg

    calls = []
    real_pack = padding.pack_indices
    monkeypatch.setattr(padding, "pack_indices", lambda *a: calls.append(1) or real_pack(*a))
    cfg = hf_config("roberta")
    model = randomize_(RobertaModel(cfg).eval())
    ids, mask = make_batch(4, 7, cfg.pad_token_id)
    for padding_free, m, n in ((True, mask, 1), (False, mask, 0), (True, torch.ones_like(mask), 0), (True, None, 0)):
        calls.clear()
        model.padding_free = padding_free
        run(model, ids, m)
        assert len(calls) == n, (padding_free, m is None, calls)
    for mod in (model_pkg.encoder, model_pkg.checks, model_pkg.heads):
        src = inspect.getsource(mod)
        for word in ("argsort", ".nonzero(", "index_select", "index_copy", "cumsum(seqlens", "seqlens.sum"):
            assert word not in src, f"{mod.__name__} packs batches itself ({word!r}): use roberta_fast.padding"


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
def test_one_host_read_per_forward(monkeypatch, padding_free):
    """The model reads the device back once per forward (range checks and mask statistics together); reads
    made inside an op (the CPU reference of attention_varlen reads cu_seqlens) are the backend's own."""
    import roberta_fast.ops.trusted as ops_mod  # what the model calls

    reads, depth = [], [0]
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        orig = getattr(torch.Tensor, name)

        def read(self, *a, _orig=orig, _name=name, **k):
            if depth[0] == 0:
                reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)
    for name in ("layer_norm", "bias_gelu", "masked_softmax", "attention", "attention_varlen"):
        op = getattr(ops_mod, name)

        def inside(*a, _op=op, **k):
            depth[0] += 1
            try:
                return _op(*a, **k)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(ops_mod, name, inside)
    cfg = hf_config("bert")
    model = randomize_(BertModel(cfg, padding_free=padding_free).eval())
    ids, mask = make_batch(4, 7, cfg.pad_token_id)
    kw = dict(token_type_ids=(torch.arange(7) > 3).long().expand(4, 7), position_ids=torch.arange(7)[None])
    for extra in ({}, kw, dict(kw, output_attentions=True, output_hidden_states=True)):
        reads.clear()
        run(model, ids, mask, **extra)
        assert reads == ["tolist"], (extra.keys(), reads)

    # under CUDA graph capture (faked here on CPU tensors): no read at all, the padded layout with the mask
    from roberta_fast.model import checks

    inputs = checks.check_inputs(model.config, roberta=False, input_ids=ids, attention_mask=mask)
    inputs.device = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    reads.clear()
    layout = inputs.layout(padding_free)
    assert reads == [] and not layout.is_packed and torch.equal(layout.mask, mask.bool())


# ----------------------------------------------------------------------------------------- transformers' edges


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
def test_all_padding_mask_and_empty_batches(padding_free):
    """An all-zero attention_mask returns outputs as transformers does (ours: zeros at every position, the
    pooler of a zero state); a batch of size 0 or of length 0 returns empty outputs of the right shapes."""
    cfg = hf_config("roberta", 2, 4, 32, 64)
    model = randomize_(RobertaModel(cfg, padding_free=padding_free).eval())
    ids, mask = make_batch(3, 7, 1)
    kw = dict(output_hidden_states=True, output_attentions=True)
    out = run(model, ids, torch.zeros_like(mask), **kw)
    assert out.last_hidden_state.shape == (3, 7, 32) and torch.all(out.last_hidden_state == 0)
    pooler_of_zeros = torch.tanh(model.pooler.dense.bias).expand(3, 32)
    torch.testing.assert_close(out.pooler_output, pooler_of_zeros)
    assert all(torch.all(h == 0) for h in out.hidden_states) and len(out.hidden_states) == 3
    assert all(a.shape == (3, 4, 7, 7) and torch.all(a == 0) for a in out.attentions)
    for B, S in ((0, 7), (0, 0), (2, 0)):
        ids0 = torch.full((B, S), 5)
        for m in (None, torch.ones_like(ids0), torch.zeros_like(ids0)):
            out = run(model, ids0, m, **kw)
            assert out.last_hidden_state.shape == (B, S, 32) and out.pooler_output.shape == (B, 32)
            assert [h.shape for h in out.hidden_states] == [(B, S, 32)] * 3
            assert [a.shape for a in out.attentions] == [(B, 4, S, S)] * 2
    head = randomize_(RobertaForTokenClassification(hf_config("roberta", num_labels=5)).eval())
    assert run(head, ids[:0], mask[:0]).logits.shape == (0, 7, 5)
    assert run(head, ids, torch.zeros_like(mask)).logits.shape == (3, 7, 5)


def test_from_pretrained_keyword_arguments(tmp_path):
    """transformers' spellings (torch_dtype, dtype names, dtype="auto", device_map) work; unknown names raise
    naming the closest valid one; config fields still override."""
    hf = make_hf(transformers.RobertaForSequenceClassification, hf_config("roberta", num_labels=3))
    path = save(hf, tmp_path / "fp32")
    cls = RobertaForSequenceClassification
    dtype_of = lambda m: {p.dtype for p in m.parameters()}
    assert dtype_of(cls.from_pretrained(path, torch_dtype=torch.float16)) == {torch.float16}
    assert dtype_of(cls.from_pretrained(path, dtype="float16")) == {torch.float16}
    assert dtype_of(cls.from_pretrained(path, torch_dtype="torch.bfloat16")) == {torch.bfloat16}
    assert dtype_of(cls.from_pretrained(path, dtype="auto")) == {torch.float32}
    m = cls.from_pretrained(path, device_map="cpu", attn_implementation="sdpa", local_files_only=True,
                            low_cpu_mem_usage=True)
    assert m.device == torch.device("cpu") and m.num_labels == 3
    with pytest.warns(UserWarning, match="newly initialized"):  # config fields override (a new classifier)
        enc = save(make_hf(transformers.RobertaModel, hf_config("roberta")), tmp_path / "enc")
        assert cls.from_pretrained(enc, num_labels=5).classifier.out_proj.out_features == 5
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_lables' .*did you mean 'num_labels'"):
        cls.from_pretrained(path, num_lables=5)
    with pytest.raises(TypeError, match="'torch_dtyp'.*did you mean 'torch_dtype'"):
        cls.from_pretrained(path, torch_dtyp=torch.float16)
    with pytest.raises(TypeError, match="unexpected keyword argument 'revision'"):
        cls.from_pretrained(path, revision="main")
    with pytest.raises(TypeError, match="disagree"):
        cls.from_pretrained(path, dtype=torch.float16, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be 'auto', float32, float16 or bfloat16.*'fp16'"):
        cls.from_pretrained(path, dtype="fp16")
    with pytest.raises(ValueError, match="one device"):
        cls.from_pretrained(path, device_map="auto")
    # dtype="auto" (the default, as in transformers 5): config.json's dtype, else the checkpoint's
    bf = save(copy.deepcopy(hf).to(torch.bfloat16), tmp_path / "bf16")
    assert json.load(open(os.path.join(bf, "config.json")))["dtype"] == "bfloat16"
    assert dtype_of(cls.from_pretrained(bf)) == {torch.bfloat16}
    cfg = json.load(open(os.path.join(bf, "config.json")))
    cfg.pop("dtype")
    json.dump(cfg, open(os.path.join(bf, "config.json"), "w"))
    assert dtype_of(cls.from_pretrained(bf)) == {torch.bfloat16}
    assert dtype_of(cls.from_pretrained(bf, dtype=torch.float32)) == {torch.float32}
    ours = randomize_(RobertaModel(hf_config("roberta")).to(torch.float16))
    ours.save_pretrained(tmp_path / "ours16")
    assert dtype_of(RobertaModel.from_pretrained(tmp_path / "ours16")) == {torch.float16}


def test_from_pretrained_checks_model_type(tmp_path):
    """config.json's model_type must be a BERT-family type: another architecture raises saying so (not a list
    of missing parameters), and BERT weights under a foreign model_type do not load silently."""
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    deberta = transformers.DebertaV2Model(transformers.DebertaV2Config(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    for name, model in (("gpt2", gpt2), ("deberta-v2", deberta)):
        path = save(model, tmp_path / name)
        for cls in (RobertaModel, BertForMaskedLM):
            with pytest.raises(ValueError, match=rf"model type '{name}' is not supported \(supported: bert, "
                                                 rf"camembert, roberta, xlm-roberta\)"):
                cls.from_pretrained(path)
    bert = save(make_hf(transformers.BertModel, hf_config("bert")), tmp_path / "bert")
    cfg_file = os.path.join(bert, "config.json")
    json.dump({**json.load(open(cfg_file)), "model_type": "gpt2"}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        BertModel.from_pretrained(bert)
    with pytest.raises(ValueError, match="model type 'deberta' is not supported"):
        EncoderConfig(model_type="deberta")
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        RobertaModel({"model_type": "gpt2", "hidden_size": 32, "num_attention_heads": 2})


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
def test_compile_fullgraph_equals_eager(padding_free):
    """torch.compile(model, fullgraph=True) traces the whole forward for fixed shapes (no host reads: the padded
    path with the mask) in eval and in training; outputs and gradients equal eager's."""
    cfg = hf_config("roberta", 2, 2, 32, 48)
    model = randomize_(RobertaModel(cfg, padding_free=padding_free).eval())
    ids, mask = make_batch(3, 7, cfg.pad_token_id)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager, got = model(ids, attention_mask=mask), compiled(ids, attention_mask=mask)
    torch.testing.assert_close(got.last_hidden_state, eager.last_hidden_state, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.pooler_output, eager.pooler_output, rtol=1e-6, atol=1e-6)
    model.train()
    grads = []
    for m in (model, compiled):
        model.zero_grad()
        out = m(ids, attention_mask=mask)
        (out.last_hidden_state.square().sum() + out.pooler_output.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    """The same with the default backend (inductor, C++ on CPU): about 20 s, hence `slow`."""
    cfg = hf_config("bert", 2, 2, 32, 48)
    model = randomize_(BertModel(cfg).eval())
    ids, mask = make_batch(3, 7, cfg.pad_token_id)
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True)(ids, attention_mask=mask)
        eager = model(ids, attention_mask=mask)
    torch.testing.assert_close(got.last_hidden_state, eager.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_and_model_api():
    """Our classes have transformers' gradient checkpointing (same gradients, layers recomputed in the backward),
    num_parameters, device, dtype and resize_token_embeddings (the rest: tests/test_conformance.py)."""
    cfg = hf_config("roberta", 2, 2, 32, 48, hidden_dropout_prob=0.1)
    model = randomize_(RobertaForMaskedLM(cfg)).train()
    ids, mask = make_batch(3, 7, cfg.pad_token_id)
    calls = []
    model.roberta.encoder.layer[1].register_forward_pre_hook(lambda *a: calls.append(1))

    def step():
        torch.manual_seed(0)
        model.zero_grad()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = step()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and calls == [1]
    calls.clear()
    checkpointed = step()
    assert calls == [1, 1], "a checkpointed layer runs again in the backward"
    for n, g in plain.items():  # dropout replays the same mask in the recomputation
        torch.testing.assert_close(checkpointed[n], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    n_emb = VOCAB * 32 + cfg.max_position_embeddings * 32 + 2 * 32
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - n_emb
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    emb = model.resize_token_embeddings(VOCAB + 3)
    assert emb is model.get_input_embeddings() and emb.weight.shape == (VOCAB + 3, 32)
    assert model.lm_head.decoder.weight is emb.weight and model.lm_head.bias.shape == (VOCAB + 3,)
    assert model.config.vocab_size == VOCAB + 3
    assert run(model.eval(), ids.masked_fill(ids == ids[0, 0], VOCAB + 2), mask).logits.shape == (3, 7, VOCAB + 3)


# ----------------------------------------------------------------------------------------- Triton backend


def test_triton_backend_matches(tmp_path):
    """Every op through the Triton kernels (TRITON_INTERPRET=1 on CPU); skips while an op is missing."""
    cfg = hf_config("roberta", 2, 2, 32, 48)  # head_dim 16
    hf = make_hf(transformers.RobertaModel, cfg)
    hf64 = copy.deepcopy(hf).double()
    ids, mask = make_batch(3, 7, 1, lengths=[7, 3, 1])
    ref, ref64 = run(hf, ids, mask, output_attentions=True), run(hf64, ids, mask, output_attentions=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for padding_free in (True, False):
        model = RobertaModel.from_pretrained(save(hf, tmp_path / str(padding_free)), backend="triton",
                                             padding_free=padding_free, device=device)
        for kw in ({}, {"output_attentions": True}):
            try:
                out = run(model, ids.to(device), mask.to(device), **kw)
            except (NotImplementedError, BackendUnavailableError) as e:
                pytest.skip(f"a Triton op is not available yet: {e}")
            check(out.last_hidden_state.cpu(), ref.last_hidden_state, ref64.last_hidden_state, mask,
                  f"last_hidden_state (padding_free={padding_free}, {kw})")
            if kw:
                q_real = mask.bool()[:, None, :, None].expand_as(ref.attentions[0])
                assert_rule(out.attentions[0].cpu()[q_real], ref64.attentions[0][q_real],
                            ref.attentions[0][q_real], name="attentions[0]")


def test_triton_backend_available_ops(tmp_path, monkeypatch):
    """The same with the ops whose Triton kernels exist: a missing one (NotImplementedError) runs on torch."""
    import roberta_fast.ops.trusted as ops_mod  # what the model calls

    fell_back = set()
    for name in ("layer_norm", "bias_gelu", "masked_softmax", "attention", "attention_varlen"):
        real_op = getattr(ops_mod, name)

        def op(*args, _op=real_op, _name=name, backend=None, **kw):
            try:
                return _op(*args, backend=backend, **kw)
            except NotImplementedError:
                fell_back.add(_name)
                return _op(*args, backend="torch", **kw)

        monkeypatch.setattr(ops_mod, name, op)
    cfg = hf_config("bert", 2, 2, 32, 48)
    hf = make_hf(transformers.BertModel, cfg)
    hf64 = copy.deepcopy(hf).double()
    ids, mask = make_batch(3, 7, 0, lengths=[7, 3, 1])
    kw = dict(output_attentions=True, token_type_ids=(torch.arange(7) > 2).long().expand(3, 7))
    ref, ref64 = run(hf, ids, mask, **kw), run(hf64, ids, mask, **kw)
    model = BertModel.from_pretrained(save(hf, tmp_path), backend="triton")
    for attn in (False, True):
        out = run(model, ids, mask, **{**kw, "output_attentions": attn})
        check(out.last_hidden_state, ref.last_hidden_state, ref64.last_hidden_state, mask,
              f"last_hidden_state (output_attentions={attn}; on torch: {sorted(fell_back)})")
        check(out.pooler_output, ref.pooler_output, ref64.pooler_output, name="pooler_output")
    if len(fell_back) == 5:
        pytest.skip("no Triton op is available yet")


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_gpu_low_precision_parity(tmp_path, family, padding_free, dtype):
    """fp16/bf16 on a GPU (automatic backend: cuda or triton) within 2x transformers' own error in the
    same dtype, both measured against transformers in float64."""
    cfg = hf_config(family, 4, 4, 256, 1024, max_position_embeddings=130)
    hf_cls = transformers.RobertaModel if family == "roberta" else transformers.BertModel
    hf = make_hf(hf_cls, cfg, seed=3)
    path = save(hf, tmp_path)
    ours = (RobertaModel if family == "roberta" else BertModel).from_pretrained(
        path, dtype=dtype, device="cuda", padding_free=padding_free)
    hf_same = copy.deepcopy(hf).to("cuda", dtype)
    hf64 = hf.to("cuda", torch.float64)
    ids, mask = make_batch(8, 96, cfg.pad_token_id, seed=4, lengths=[96, 1, 17, 64, 33, 95, 8, 50])
    ids, mask = ids.cuda(), mask.cuda()
    o, a, a64 = run(ours, ids, mask), run(hf_same, ids, mask), run(hf64, ids, mask)
    check(o.last_hidden_state, a.last_hidden_state, a64.last_hidden_state, mask, "last_hidden_state")
    check(o.pooler_output, a.pooler_output, a64.pooler_output, name="pooler_output")
    assert torch.all(o.last_hidden_state[~mask.bool()] == 0)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_takes_the_padded_path(tmp_path):
    """Under CUDA graph capture the forward makes no host sync (padded path with the mask); the replay
    gives what an eager call gives."""
    cfg = hf_config("roberta", 2, 4, 256, 1024, max_position_embeddings=70)
    hf = make_hf(transformers.RobertaModel, cfg, seed=5)
    model = RobertaModel.from_pretrained(save(hf, tmp_path), dtype=torch.float16, device="cuda")
    ids, mask = make_batch(4, 64, cfg.pad_token_id, seed=6, lengths=[64, 3, 40, 17])
    ids, mask = ids.cuda(), mask.cuda()
    with torch.inference_mode():
        eager = model(ids, attention_mask=mask).last_hidden_state
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(ids, attention_mask=mask)  # warm-up on the side stream (QKV cache, Triton JIT)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(ids, attention_mask=mask).last_hidden_state
        graph.replay()
        torch.cuda.synchronize()
    m = mask.bool()
    torch.testing.assert_close(captured[m], eager[m], atol=2e-3, rtol=2e-3)


# ----------------------------------------------------------------------------------------- demo


def test_demo_main_runs(capsys):
    from roberta_fast import demo

    assert demo.main(["--layers", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "real tokens" in out and "backend" in out and "padding-free" in out
    assert roberta_fast.demo is demo
