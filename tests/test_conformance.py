"""Conformance: one small suite of transformers behaviours, run against transformers and against roberta_fast
(our class loaded from the same checkpoint, "ours", and the transformers model after roberta_fast.optimize,
"optimized"), asserting that they agree.

Each behaviour is an `observe_*` function of a model and a batch that returns what a user can see: output
field names, tuple lengths, shapes and dtypes, values on real tokens, losses, flags. The test runs it on
transformers and on ours and compares with `agree` (structure exactly, tensors to float32 round-off).
Values at padded positions are left out on purpose (ours are zeros there: README, "Differences from
transformers"). A new transformers behaviour we promise gets an observe_* function and a line in BEHAVIOURS.
"""

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from test_model import VOCAB, hf_config, make_batch, make_hf, save  # noqa: E402

import roberta_fast  # noqa: E402

KINDS = ["Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering"]
FAMILIES = {"roberta": "Roberta", "bert": "Bert"}
IMPLS = ["ours", "optimized"]
B, S = 4, 9


# ----------------------------------------------------------------------------------------- building


def build(impl, family, kind, tmp_path):
    """(transformers model, the model under test), both in eval mode with the same weights."""
    name = FAMILIES[family] + kind
    cfg = hf_config(family, 2, 2, 32, 48, num_labels=2 if kind == "ForQuestionAnswering" else 3)
    hf = make_hf(getattr(transformers, name), cfg)
    if impl == "transformers":
        return hf, copy.deepcopy(hf)
    if impl == "ours":
        return hf, getattr(roberta_fast, name).from_pretrained(save(hf, tmp_path / "ckpt"))
    return hf, roberta_fast.optimize(copy.deepcopy(hf))


def batch(model, *, full=False):
    """input_ids, attention_mask (B, S): right padding, lengths S..2 (the first token real in every row)."""
    pad = model.config.pad_token_id
    return make_batch(B, S, pad, lengths=[S] * B if full else [S, 5, 2, 7])


def labels_for(kind, ids, mask, cfg):
    """Labels a user passes; -100 at padded positions (transformers' loss counts a labelled padded position)."""
    g = torch.Generator().manual_seed(3)
    if kind == "ForMaskedLM":
        return {"labels": torch.randint(0, VOCAB, ids.shape, generator=g).masked_fill(mask == 0, -100)}
    if kind == "ForSequenceClassification":
        return {"labels": torch.randint(0, cfg.num_labels, (ids.shape[0],), generator=g)}
    if kind == "ForTokenClassification":
        return {"labels": torch.randint(0, cfg.num_labels, ids.shape, generator=g).masked_fill(mask == 0, -100)}
    if kind == "ForQuestionAnswering":
        return {"start_positions": torch.tensor([1, 3, 0, 4]), "end_positions": torch.tensor([2, 4, 1, 6])}
    return {}


# ----------------------------------------------------------------------------------------- comparing


def describe(x, mask):
    """What a user sees of one output value: structure, shapes, dtypes; tensors cut to real tokens."""
    if isinstance(x, torch.Tensor):
        if x.dim() >= 2 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x.detach()[mask.bool()]  # (B, S, ...): real tokens
        if x.dim() == 4 and x.shape[0] == mask.shape[0] and x.shape[-1] == mask.shape[1]:
            return x.detach().transpose(1, 2)[mask.bool()]  # attentions (B, heads, S, S): real query rows
        return x.detach()
    if isinstance(x, (tuple, list)):
        return ("tuple", [describe(v, mask) for v in x])
    if isinstance(x, dict) or hasattr(x, "keys"):
        return ("dict", list(x.keys()), [describe(x[k], mask) for k in x.keys()])
    return x


def agree(ours, ref, where="output", rtol=1e-4, atol=1e-5):
    """Assert two observations match: same structure, same shapes and dtypes, tensors close."""
    assert type(ours) is type(ref) or (isinstance(ours, (int, float)) and isinstance(ref, (int, float))), \
        f"{where}: {type(ours).__name__} vs transformers' {type(ref).__name__}"
    if isinstance(ref, torch.Tensor):
        assert ours.shape == ref.shape and ours.dtype == ref.dtype, \
            f"{where}: {tuple(ours.shape)} {ours.dtype} vs transformers' {tuple(ref.shape)} {ref.dtype}"
        torch.testing.assert_close(ours.float(), ref.float(), rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")
    elif isinstance(ref, (tuple, list)):
        assert len(ours) == len(ref), f"{where}: length {len(ours)} vs transformers' {len(ref)}: {ours!r:.200}"
        for i, (a, b) in enumerate(zip(ours, ref)):
            agree(a, b, f"{where}[{i}]", rtol, atol)
    elif isinstance(ref, dict):
        assert ours.keys() == ref.keys(), f"{where}: keys {sorted(ours)} vs transformers' {sorted(ref)}"
        for k in ref:
            agree(ours[k], ref[k], f"{where}.{k}", rtol, atol)
    else:
        assert ours == ref, f"{where}: {ours!r} vs transformers' {ref!r}"


# ----------------------------------------------------------------------------------------- behaviours


@torch.no_grad()
def observe_outputs(model, kind, tmp_path):
    """Output objects and return_dict=False tuples for every combination of the output flags."""
    ids, mask = batch(model)
    obs = {}
    for attn in (False, True):
        for hs in (False, True):
            kw = dict(attention_mask=mask, output_attentions=attn, output_hidden_states=hs)
            obs[f"dict attn={attn} hs={hs}"] = describe(model(ids, **kw), mask)
            obs[f"tuple attn={attn} hs={hs}"] = describe(model(ids, return_dict=False, **kw), mask)
    return obs


@torch.no_grad()
def observe_config_flags(model, kind, tmp_path):
    """config.output_hidden_states / output_attentions / return_dict as the forward's defaults."""
    ids, mask = batch(model)
    cfg = model.config
    cfg.output_hidden_states, cfg.output_attentions = True, True
    with_flags = describe(model(ids, attention_mask=mask), mask)
    cfg.return_dict = False
    as_tuple = describe(model(ids, attention_mask=mask), mask)
    cfg.output_hidden_states, cfg.output_attentions, cfg.return_dict = False, False, True
    return {"flags": with_flags, "return_dict False": as_tuple, "reset": describe(model(ids, attention_mask=mask),
                                                                                   mask)}


@torch.no_grad()
def observe_losses(model, kind, tmp_path):
    """Heads with labels: the loss first in the output and the tuple, its value and dtype, with the Trainer's
    num_items_in_batch too. QA on a batch without padding (transformers' QA softmax spans padded positions)."""
    if kind == "Model":
        return {}
    ids, mask = batch(model, full=kind == "ForQuestionAnswering")
    labels = labels_for(kind, ids, mask, model.config)
    return {"dict": describe(model(ids, attention_mask=mask, **labels), mask),
            "tuple": describe(model(ids, attention_mask=mask, return_dict=False, **labels), mask),
            # transformers' Trainer passes num_items_in_batch to a forward with **kwargs
            "num_items_in_batch": describe(model(ids, attention_mask=mask, num_items_in_batch=torch.tensor(7),
                                                 **labels), mask)}


def observe_save_load(model, kind, tmp_path):
    """save_pretrained -> the other library's from_pretrained (transformers' for ours, ours for the optimized
    transformers model) -> same outputs."""
    name = FAMILIES["roberta" if model.config.model_type == "roberta" else "bert"] + kind
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(tmp_path / "saved"))
    back_ours = getattr(roberta_fast, name).from_pretrained(tmp_path / "saved")
    back_hf = getattr(transformers, name).from_pretrained(str(tmp_path / "saved"), attn_implementation="eager")
    ids, mask = batch(model)
    with torch.no_grad():
        return {"ours": describe(back_ours(ids, attention_mask=mask), mask),
                "transformers": describe(back_hf.eval()(ids, attention_mask=mask), mask),
                "training": (back_ours.training, back_hf.training)}


def observe_pickling(model, kind, tmp_path):
    """torch.save / torch.load of the whole model, pickle and copy.deepcopy: each copy runs and agrees."""
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = [torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    ids, mask = batch(model)
    with torch.no_grad():
        return [describe(m(ids, attention_mask=mask), mask) for m in (model, *copies)]


def observe_gradient_checkpointing(model, kind, tmp_path):
    """gradient_checkpointing_enable(): the flag, layer 0 runs twice per training step (recomputed in the
    backward), same gradients; disable: once again."""
    ids, mask = batch(model)
    labels = labels_for(kind, ids, mask, model.config)
    calls = []
    model.base_model.encoder.layer[0].attention.register_forward_pre_hook(lambda *a: calls.append(1))
    model.train()

    def step():
        calls.clear()
        model.zero_grad()
        out = model(ids, attention_mask=mask, **labels)
        loss = out.loss if "loss" in out.keys() else (out[0][mask.bool()].square().sum() + out[1].square().sum())
        loss.backward()
        return len(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5: gradient_checkpointing_* are aliases
        plain = step()
        model.gradient_checkpointing_enable()
        on = model.is_gradient_checkpointing
        checkpointed = step()
        model.gradient_checkpointing_disable()
        off = model.is_gradient_checkpointing
        again = step()
    return {"flags": (on, off), "layer 0 calls": (plain[0], checkpointed[0], again[0]),
            "gradients equal": sorted(n for n, g in plain[1].items() if torch.allclose(g, checkpointed[1][n]))}


def observe_resize_token_embeddings(model, kind, tmp_path):
    """resize_token_embeddings(V + 5, pad_to_multiple_of=8): sizes, config, tying; old ids give the old outputs,
    a new id runs."""
    ids, mask = batch(model)
    with torch.no_grad():
        before = model(ids, attention_mask=mask)[0]
    weight = model.get_input_embeddings().weight
    emb = model.resize_token_embeddings(VOCAB + 5, pad_to_multiple_of=8)
    out_emb = model.get_output_embeddings()
    obs = {"returned": (type(emb).__name__, emb.num_embeddings, tuple(emb.weight.shape)),
           "same Parameter": emb.weight is weight, "config.vocab_size": model.config.vocab_size,
           "output embeddings": None if out_emb is None else (tuple(out_emb.weight.shape), out_emb.weight is emb.weight,
                                                             tuple(out_emb.bias.shape))}
    with torch.no_grad():
        after = model(ids, attention_mask=mask)[0]
        obs["old ids"] = describe(after[..., :VOCAB] if kind == "ForMaskedLM" else after, mask)
        obs["unchanged"] = torch.allclose(describe(after[..., :VOCAB] if kind == "ForMaskedLM" else after, mask),
                                          describe(before, mask), atol=1e-6)
        obs["new id"] = tuple(model(ids.masked_fill(mask.bool() & (ids == ids[0, 1]), VOCAB + 2),
                                    attention_mask=mask)[0].shape)
    return obs


def observe_autocast(model, kind, tmp_path):
    """Under bf16 autocast, eval and train: which outputs are float32 and which bfloat16 (values: test_autocast)."""
    ids, mask = batch(model)
    labels = labels_for(kind, ids, mask, model.config)
    obs = {}
    for train in (False, True):
        model.train(train)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(train):
            out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True, **labels)
        obs[f"train={train}"] = [(k, _dtypes(v)) for k, v in out.items()]
    return obs


def _dtypes(v):
    return v.dtype if isinstance(v, torch.Tensor) else tuple(_dtypes(x) for x in v)


def observe_parameters_device_dtype(model, kind, tmp_path):
    """num_parameters (all, trainable, without embeddings), device, dtype, and the mode from_pretrained leaves."""
    model.get_input_embeddings().weight.requires_grad_(False)
    obs = {"num_parameters": model.num_parameters(), "trainable": model.num_parameters(only_trainable=True),
           "no embeddings": model.num_parameters(exclude_embeddings=True), "device": model.device,
           "dtype": model.dtype}
    model.get_input_embeddings().weight.requires_grad_(True)
    model.to(torch.bfloat16)
    obs["dtype after .to(bf16)"] = model.dtype
    return obs


@torch.no_grad()
def observe_all_padding(model, kind, tmp_path):
    """A batch whose attention_mask is all zeros returns outputs of the usual fields and shapes (the values
    are computed on padding: not compared)."""
    ids, mask = batch(model)
    out = model(ids, attention_mask=torch.zeros_like(mask))
    return [(k, _shapes(v)) for k, v in out.items()]


def _shapes(v):
    return tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(_shapes(x) for x in v)


# behaviour -> the kinds it runs on (structure-dependent ones on every head, the rest on the encoder and MLM)
EVERY, SOME = KINDS, ["Model", "ForMaskedLM"]
BEHAVIOURS = [(observe_outputs, EVERY), (observe_losses, EVERY[1:]), (observe_autocast, EVERY),
              (observe_save_load, EVERY), (observe_config_flags, SOME), (observe_pickling, SOME),
              (observe_gradient_checkpointing, SOME + ["ForSequenceClassification"]),
              (observe_resize_token_embeddings, SOME), (observe_parameters_device_dtype, SOME),
              (observe_all_padding, EVERY)]
CASES = [pytest.param(fn, impl, family, kind, id=f"{fn.__name__.removeprefix('observe_')}-{impl}-{family}-{kind}")
         for fn, kinds in BEHAVIOURS for impl in IMPLS for family in FAMILIES for kind in kinds]


@pytest.mark.parametrize("behaviour,impl,family,kind", CASES)
def test_conformance(tmp_path, behaviour, impl, family, kind):
    hf, ours = build(impl, family, kind, tmp_path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "ours").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own deprecation notices
        expected = behaviour(hf, kind, tmp_path / "hf")
    got = behaviour(ours, kind, tmp_path / "ours")
    agree(got, expected, behaviour.__name__.removeprefix("observe_"))


def test_the_suite_compares_something():
    """The comparison itself: a field more, a tuple shorter, a dtype or a value off each fail."""
    t = torch.ones(2, 3)
    agree(("dict", ["a"], [t]), ("dict", ["a"], [t.clone()]))
    for bad in (("dict", ["a", "b"], [t, t]), ("dict", ["a"], [t.double()]), ("dict", ["a"], [t + 1e-3]),
                ("tuple", [t])):
        with pytest.raises(AssertionError):
            agree(bad, ("dict", ["a"], [t]))
    assert isinstance(nn.Embedding(2, 2), nn.Module)
