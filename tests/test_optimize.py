"""roberta_fast.optimize on transformers models: same object, same Parameter objects, same outputs."""

import copy

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from test_model import hf_config, make_batch, make_hf, real  # noqa: E402

import roberta_fast  # noqa: E402
from roberta_fast.model import Embeddings, Encoder  # noqa: E402

CASES = [
    ("RobertaModel", "roberta", "last_hidden_state"),
    ("BertModel", "bert", "last_hidden_state"),
    ("XLMRobertaModel", "xlm-roberta", "last_hidden_state"),
    ("RobertaForMaskedLM", "roberta", "logits"),
    ("RobertaForSequenceClassification", "roberta", "logits"),
    ("RobertaForTokenClassification", "roberta", "logits"),
    ("RobertaForQuestionAnswering", "roberta", "start_logits"),
    ("BertForMaskedLM", "bert", "logits"),
    ("BertForSequenceClassification", "bert", "logits"),
    ("BertForTokenClassification", "bert", "logits"),
    ("BertForQuestionAnswering", "bert", "end_logits"),
    ("XLMRobertaForSequenceClassification", "xlm-roberta", "logits"),
]


def _encoder(model):
    return model if model.base_model_prefix not in dict(model.named_children()) else model.base_model


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
@pytest.mark.parametrize("name,family,field", CASES, ids=[c[0] for c in CASES])
def test_optimize_parity_and_shared_parameters(name, family, field, padding_free):
    cfg = hf_config(family, 2, 2, 32, 48, num_labels=2)
    model = make_hf(getattr(transformers, name), cfg)
    ids, mask = make_batch(5, 9, cfg.pad_token_id, seed=1)
    mask[:, 0] = 1
    kw = dict(attention_mask=mask, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        before = model(ids, **kw)
    params = dict(model.named_parameters(remove_duplicate=False))
    keys = list(model.state_dict())

    out = roberta_fast.optimize(model, padding_free=padding_free)
    assert out is model
    enc = _encoder(model)
    assert isinstance(enc.embeddings, Embeddings) and isinstance(enc.encoder, Encoder)
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == params.keys()
    for n, p in params.items():
        assert after[n] is p, f"{n} is not the same Parameter object after optimize"
    assert set(model.state_dict()) == set(keys)
    assert not enc.embeddings.training and not enc.encoder.layer[0].training  # kept eval mode

    with torch.no_grad():
        now = model(ids, **kw)
    x, y = getattr(now, field), getattr(before, field)
    torch.testing.assert_close(real(x, mask), real(y, mask), rtol=1e-4, atol=1e-5)
    assert len(now.hidden_states) == 3 and len(now.attentions) == 2
    for a, b in zip(now.hidden_states, before.hidden_states):
        torch.testing.assert_close(real(a, mask), real(b, mask), rtol=1e-4, atol=1e-5)
    q_real = mask.bool()[:, None, :, None].expand_as(before.attentions[0])
    for a, b in zip(now.attentions, before.attentions):
        torch.testing.assert_close(a[q_real], b[q_real], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        tup = model(ids, attention_mask=mask, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(real(tup[0], mask), real(getattr(before, field) if field != "end_logits"
                                                        else before.start_logits, mask), rtol=1e-4, atol=1e-5)


def test_optimize_training_gradients_reach_original_parameters():
    cfg = hf_config("roberta", 2, 2, 32, 48, num_labels=3)
    model = make_hf(transformers.RobertaForSequenceClassification, cfg).train()  # dropout 0
    ref = copy.deepcopy(model)
    roberta_fast.optimize(model)
    ids, mask = make_batch(4, 8, 1)
    mask[:, 0] = 1
    labels = torch.tensor([0, 2, 1, 2])
    for m in (ref, model):
        m(ids, attention_mask=mask, labels=labels).loss.backward()
    g_ref = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reached {n}"
        torch.testing.assert_close(p.grad, g_ref[n].grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_optimize_dropout_in_train_mode():
    cfg = hf_config("bert", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    model = roberta_fast.optimize(make_hf(transformers.BertModel, cfg))
    ids, mask = make_batch(3, 7, 0)
    model.train()
    with torch.no_grad():
        a, b = (model(ids, attention_mask=mask).last_hidden_state for _ in range(2))
    assert not torch.allclose(real(a, mask), real(b, mask))
    model.eval()
    with torch.no_grad():
        a, b = (model(ids, attention_mask=mask).last_hidden_state for _ in range(2))
    assert torch.equal(a, b)


def test_optimize_again_updates_settings_and_survives_dtype_change():
    cfg = hf_config("roberta")
    model = make_hf(transformers.RobertaModel, cfg)
    ids, mask = make_batch(3, 7, 1)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
    roberta_fast.optimize(model)
    enc = model.encoder
    roberta_fast.optimize(model, padding_free=False, backend="torch")
    assert model.encoder is enc and model._roberta_fast["padding_free"] is False
    params = dict(model.named_parameters())
    model.to(torch.bfloat16)
    assert all(p is params[n] and p.dtype == torch.bfloat16 for n, p in model.named_parameters())
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(real(out.float(), mask), real(ref, mask), rtol=0.1, atol=0.1)


def test_optimize_rejects_unsupported_models():
    for bad in (nn.Linear(3, 3), "bert",
                transformers.DistilBertModel(transformers.DistilBertConfig(
                    vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32))):
        with pytest.raises(TypeError, match="supported.*BertModel.*RobertaModel.*XLMRobertaModel"):
            roberta_fast.optimize(bad)


def test_optimize_name_is_the_function_after_submodule_import():
    import importlib
    import sys

    importlib.import_module("roberta_fast.optimize")  # must not shadow the package's function
    mod = sys.modules["roberta_fast.optimize"]
    assert roberta_fast.optimize is mod.optimize
    cfg = hf_config("bert")
    model = make_hf(transformers.BertModel, cfg)
    assert roberta_fast.optimize(model) is model


def test_optimized_model_saves_and_reloads_with_transformers(tmp_path):
    cfg = hf_config("roberta", num_labels=3)
    model = roberta_fast.optimize(make_hf(transformers.RobertaForSequenceClassification, cfg))
    model.save_pretrained(str(tmp_path))
    back = transformers.RobertaForSequenceClassification.from_pretrained(
        str(tmp_path), attn_implementation="eager").eval()
    sd = back.state_dict()
    assert set(sd) == set(model.state_dict())
    for n, p in model.state_dict().items():
        assert torch.equal(p, sd[n]), n
    ids, mask = make_batch(3, 6, 1)
    mask[:, 0] = 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, back(ids, attention_mask=mask).logits,
                                   rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------- transformers' edges


def test_optimized_model_pickles(tmp_path):
    """torch.save / torch.load of the whole optimize()d model, pickle and copy.deepcopy: each copy is still
    optimized (its forward is bound to the copy, not the original) and gives the same outputs."""
    import io
    import pickle

    cfg = hf_config("roberta", num_labels=3)
    model = roberta_fast.optimize(make_hf(transformers.RobertaForSequenceClassification, cfg))
    ids, mask = make_batch(3, 6, 1)
    mask[:, 0] = 1
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    torch.save(model, tmp_path / "model.pt")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (torch.load(tmp_path / "model.pt", weights_only=False), torch.load(buf, weights_only=False),
                  pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert isinstance(other.roberta.encoder, Encoder) and other.roberta.forward.args[0] is other.roberta
        with torch.no_grad():
            torch.testing.assert_close(other(ids, attention_mask=mask).logits, ref, rtol=0, atol=0)


def test_optimize_gradient_checkpointing_reaches_our_layers():
    """transformers' gradient_checkpointing_enable() after optimize() checkpoints our layers (they run again in
    the backward, same gradients); enabled before optimize(), it stays on."""
    import warnings

    cfg = hf_config("bert", 2, 2, 32, 48)
    ids, mask = make_batch(3, 7, 0)
    for before in (False, True):
        model = make_hf(transformers.BertModel, cfg).train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing
            if before:
                model.gradient_checkpointing_enable()
            roberta_fast.optimize(model)
            plain = None if before else _grads(model, ids, mask)
            if not before:
                model.gradient_checkpointing_enable()
        calls = []
        hook = model.encoder.layer[0].register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        checkpointed = _grads(model, ids, mask)
        hook.remove()
        assert len(calls) == 2, "the layer must be recomputed in the backward"
        for n, g in (plain or {}).items():
            torch.testing.assert_close(checkpointed[n], g, rtol=1e-5, atol=1e-6)


def _grads(model, ids, mask):
    model.zero_grad()
    out = model(ids, attention_mask=mask)
    (out.last_hidden_state.square().sum() + out.pooler_output.sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_optimize_finds_models_inside_wrappers():
    """A module holding supported transformers models (a SentenceTransformer, a CrossEncoder, your own
    wrapper): each outermost one is optimized in place (a head's encoder once); none inside: TypeError."""

    class Transformer(nn.Module):  # the shape of sentence-transformers' Transformer module
        def __init__(self, model):
            super().__init__()
            self.model = model

        @property
        def auto_model(self):
            return self.model

    cfg = hf_config("bert", 2, 2, 32, 48)
    enc = make_hf(transformers.BertModel, cfg)
    head = make_hf(transformers.RobertaForMaskedLM, hf_config("roberta", 2, 2, 32, 48))
    wrapper = nn.Sequential(Transformer(enc), nn.Sequential(nn.Identity(), head))
    ids, mask = make_batch(3, 7, 0)
    with torch.no_grad():
        ref = enc(ids, attention_mask=mask).last_hidden_state
    assert roberta_fast.optimize(wrapper) is wrapper
    assert isinstance(wrapper[0].auto_model.encoder, Encoder) and isinstance(head.roberta.encoder, Encoder)
    with torch.no_grad():
        torch.testing.assert_close(real(enc(ids, attention_mask=mask).last_hidden_state, mask), real(ref, mask),
                                   rtol=1e-4, atol=1e-5)
    roberta_fast.optimize(wrapper, padding_free=False)  # again: settings only
    assert enc._roberta_fast["padding_free"] is False and head.roberta._roberta_fast["padding_free"] is False
    with pytest.raises(TypeError, match="no supported model inside it"):
        roberta_fast.optimize(nn.Sequential(nn.Linear(2, 2)))


def test_optimize_compiles_fullgraph():
    """torch.compile(fullgraph=True) of an optimize()d transformers model equals eager."""
    cfg = hf_config("roberta", 2, 2, 32, 48, num_labels=3)
    model = roberta_fast.optimize(make_hf(transformers.RobertaForSequenceClassification, cfg))
    ids, mask = make_batch(3, 7, 1)
    mask[:, 0] = 1
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, model(ids, attention_mask=mask).logits, rtol=1e-6, atol=1e-6)


def test_optimize_output_layout_and_resize():
    """transformers 5's tuple layout (cross_attentions=() with attentions) and resize_token_embeddings: ids of
    the new rows pass our range check."""
    cfg = hf_config("roberta")
    hf = make_hf(transformers.RobertaModel, cfg)
    model = roberta_fast.optimize(copy.deepcopy(hf))
    ids, mask = make_batch(3, 7, 1)
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, output_attentions=True, return_dict=False)
        b = model(ids, attention_mask=mask, output_attentions=True, return_dict=False)
    assert len(a) == len(b) and [type(x) for x in a] == [type(x) for x in b]
    model.resize_token_embeddings(cfg.vocab_size + 4)
    new_ids = ids.masked_fill(mask.bool() & (ids == ids[0, 0]), cfg.vocab_size + 3)
    with torch.no_grad():
        assert model(new_ids, attention_mask=mask).last_hidden_state.shape == (3, 7, 32)
    with pytest.raises(ValueError, match="input_ids holds 105"):
        model(new_ids.masked_fill(new_ids == cfg.vocab_size + 3, cfg.vocab_size + 4))
