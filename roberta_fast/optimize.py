"""roberta_fast.optimize(hf_model): the fast encoder inside a transformers model you already have.

    model = transformers.AutoModel.from_pretrained(...)        # RobertaModel, BertModel, XLMRobertaModel, a head
    model = roberta_fast.optimize(model)                       # same object, same parameters, same outputs

The transformers encoder module (the model itself, or `model.roberta` / `model.bert` in a head) keeps its
class, config and pooler; its `embeddings` and `encoder` children are replaced by roberta_fast's modules
built around the SAME Parameter objects (no copy: checked with `is`), and its forward is replaced by
roberta_fast's (fused ops, padding-free). State-dict names do not change, so checkpoints still load and
save both ways; the head on top is untouched and calls the new forward. Padded positions of
last_hidden_state come out as zeros (see roberta_fast.model).
"""

from __future__ import annotations

import types

import torch

from .model import BertModel, EncoderConfig, RobertaModel, _check_extra_kwargs, encoder_forward

# transformers module -> (encoder class, its heads); all heads keep the encoder under base_model_prefix
_FAMILIES = {
    "bert": ("BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification",
             "BertForQuestionAnswering"),
    "roberta": ("RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification",
                "RobertaForTokenClassification", "RobertaForQuestionAnswering"),
    "xlm_roberta": ("XLMRobertaModel", "XLMRobertaForMaskedLM", "XLMRobertaForSequenceClassification",
                    "XLMRobertaForTokenClassification", "XLMRobertaForQuestionAnswering"),
    "camembert": ("CamembertModel", "CamembertForMaskedLM", "CamembertForSequenceClassification",
                  "CamembertForTokenClassification", "CamembertForQuestionAnswering"),
}


def supported_names() -> list:
    return [name for names in _FAMILIES.values() for name in names]


def _supported_classes():
    """(class, is_encoder, roberta_positions) for every supported transformers class importable here."""
    try:
        import transformers
    except ImportError:
        return []
    out = []
    for family, names in _FAMILIES.items():
        for i, name in enumerate(names):
            cls = getattr(transformers, name, None)
            if cls is not None:
                out.append((cls, i == 0, family != "bert"))
    return out


def _find_encoder(model):
    for cls, is_encoder, roberta in _supported_classes():
        if type(model) is cls or isinstance(model, cls):
            if is_encoder:
                return model, roberta
            return getattr(model, model.base_model_prefix), roberta
    raise TypeError(f"roberta_fast.optimize: unsupported model {type(model).__module__}.{type(model).__name__}; "
                    f"supported (transformers): {', '.join(supported_names())}")


def _output_class():
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    return BaseModelOutputWithPoolingAndCrossAttentions


def _fast_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                  **kwargs):
    """Replaces the transformers encoder's forward (same arguments, same outputs; padded positions of
    last_hidden_state are zeros)."""
    _check_extra_kwargs(kwargs)
    s = self._roberta_fast
    cfg = self.config
    if output_attentions is None:
        output_attentions = bool(getattr(cfg, "output_attentions", False))
    if output_hidden_states is None:
        output_hidden_states = bool(getattr(cfg, "output_hidden_states", False))
    if return_dict is None:
        return_dict = bool(getattr(cfg, "return_dict", True))
    last, pooled, hs, attn = encoder_forward(
        self.embeddings, self.encoder, self.pooler, s["config"], roberta=s["roberta"], backend=s["backend"],
        padding_free=s["padding_free"], input_ids=input_ids, attention_mask=attention_mask,
        token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
        output_hidden_states=bool(output_hidden_states), output_attentions=bool(output_attentions))
    if not return_dict:
        return (last, pooled) + tuple(t for t in (hs, attn) if t is not None)
    return _output_class()(last_hidden_state=last, pooler_output=pooled, hidden_states=hs, attentions=attn)


def optimize(model, *, backend=None, padding_free=True):
    """Swap the encoder of a transformers RobertaModel / BertModel / XLMRobertaModel / CamembertModel or of
    one of their MaskedLM, SequenceClassification, TokenClassification, QuestionAnswering heads for
    roberta_fast's, in place, sharing the same Parameter objects. Returns `model`.

    backend: op backend ("torch" | "triton" | "cuda" | None = automatic); padding_free: run packed real
    tokens (True) or the padded layout (False). Calling optimize again only updates these two settings.
    Anything else raises TypeError listing the supported classes.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"roberta_fast.optimize: expected a transformers model, got {type(model).__name__}; "
                        f"supported: {', '.join(supported_names())}")
    enc, roberta = _find_encoder(model)
    settings = getattr(enc, "_roberta_fast", None)
    if settings is not None:
        settings.update(backend=backend, padding_free=bool(padding_free))
        return model

    cfg = EncoderConfig.from_hf(enc.config)
    before = dict(enc.named_parameters(remove_duplicate=False))
    fast_cls = RobertaModel if roberta else BertModel
    with torch.device("meta"):  # structure only: every parameter is replaced by the model's own below
        fast = fast_cls(cfg, add_pooling_layer=False, _init=False)
    for part in ("embeddings", "encoder"):
        ours, theirs = getattr(fast, part), getattr(enc, part)
        for name, p in list(ours.named_parameters()):
            full = f"{part}.{name}"
            src = before.get(full)
            if src is None or tuple(src.shape) != tuple(p.shape):
                got = "missing" if src is None else f"shape {tuple(src.shape)}"
                raise TypeError(f"roberta_fast.optimize: {type(enc).__name__} has an unexpected layout: "
                                f"{full} is {got}, expected shape {tuple(p.shape)}")
            owner, _, leaf = name.rpartition(".")
            setattr(ours.get_submodule(owner) if owner else ours, leaf, src)
        # padding_idx / eps come from the model's own modules
        theirs_mods = dict(theirs.named_modules())
        for name, mine in ours.named_modules():
            mod = theirs_mods.get(name)
            for attr in ("padding_idx", "eps"):
                if mod is not None and hasattr(mod, attr) and hasattr(mine, attr):
                    setattr(mine, attr, getattr(mod, attr))
        ours.train(theirs.training)
        setattr(enc, part, ours)

    after = dict(enc.named_parameters(remove_duplicate=False))
    if after.keys() != before.keys() or any(after[k] is not before[k] for k in before):
        changed = sorted(k for k in before if after.get(k) is not before[k]) + sorted(after.keys() - before.keys())
        raise RuntimeError(f"roberta_fast.optimize: parameters not shared after the swap: {changed[:8]}")
    enc._roberta_fast = {"config": cfg, "roberta": roberta, "backend": backend, "padding_free": bool(padding_free)}
    enc.forward = types.MethodType(_fast_forward, enc)
    return model

