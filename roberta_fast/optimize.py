"""roberta_fast.optimize(hf_model): the fast encoder inside a transformers model you already have.

    model = transformers.AutoModel.from_pretrained(...)        # RobertaModel, BertModel, XLMRobertaModel, a head
    model = roberta_fast.optimize(model)                       # same object, same parameters, same outputs
    st = roberta_fast.optimize(SentenceTransformer(path))      # any module holding such models (outermost ones)

The transformers encoder module (the model itself, or `model.roberta` / `model.bert` in a head) keeps its
class, config and pooler; its `embeddings` and `encoder` children are replaced by roberta_fast's modules
built around the SAME Parameter objects (no copy: checked with `is`), and its forward is replaced by
roberta_fast's (fused ops, padding-free). State-dict names do not change, so checkpoints still load and
save both ways; the head on top is untouched and calls the new forward. Padded positions of
last_hidden_state come out as zeros (see roberta_fast.model).

The new forward is a functools.partial of a module-level function on the encoder instance (not a bound
method), so the model pickles: torch.save / torch.load and copy.deepcopy keep it optimized. transformers'
gradient_checkpointing_enable() reaches our layers (they carry its `gradient_checkpointing` flag), and
resize_token_embeddings() keeps working (the vocabulary check follows the embedding table).

cuda_graphs=True (or roberta_fast.CudaGraphs(...)) replays CUDA graphs of the padding-free forward in inference
(roberta_fast/model/graphs.py); the graphs of each optimized encoder live on it (`_cuda_graph_cache`, never
pickled: a copy or a loaded model captures again). roberta_fast.graphs.clear(model) / .stats(model) reach them.
"""

from __future__ import annotations

import functools

import torch

from .model import BertModel, EncoderConfig, RobertaModel, _check_extra_kwargs, encoder_forward
from .model import graphs as _graphs
from .model.checks import output_flags

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


def _find_encoders(model) -> list:
    """(encoder module, roberta positions) of the outermost supported transformers models in `model` (itself,
    or inside a wrapper such as a SentenceTransformer); TypeError when there is none."""
    classes = _supported_classes()
    found, inside = [], set()
    for name, mod in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue  # the encoder of a head already found
        match = next(((is_encoder, roberta) for cls, is_encoder, roberta in classes if isinstance(mod, cls)), None)
        if match is not None:
            inside.add(name + "." if name else "")
            found.append((mod if match[0] else getattr(mod, mod.base_model_prefix), match[1]))
    if not found:
        raise TypeError(f"roberta_fast.optimize: unsupported model {type(model).__module__}.{type(model).__name__} "
                        f"(and no supported model inside it); supported (transformers): {', '.join(supported_names())}")
    return found


def _output_class():
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    return BaseModelOutputWithPoolingAndCrossAttentions


@functools.cache
def _empty_cross_attentions() -> bool:
    """transformers 5 returns cross_attentions=() with output_attentions on an encoder; 4.x returns None."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def _fast_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                  **kwargs):
    """Replaces the transformers encoder's forward (same arguments, same outputs; padded positions of
    last_hidden_state are zeros)."""
    _check_extra_kwargs(kwargs)
    s = self._roberta_fast
    cfg = self.config
    s["config"].vocab_size = self.embeddings.word_embeddings.num_embeddings  # resize_token_embeddings() may change it
    output_attentions, output_hidden_states, return_dict = output_flags(cfg, output_attentions, output_hidden_states,
                                                                       return_dict)
    last, pooled, hs, attn = encoder_forward(
        self.embeddings, self.encoder, self.pooler, s["config"], roberta=s["roberta"], backend=s["backend"],
        padding_free=s["padding_free"], input_ids=input_ids, attention_mask=attention_mask,
        token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
        output_hidden_states=bool(output_hidden_states), output_attentions=bool(output_attentions),
        graph_cache=getattr(self, "_cuda_graph_cache", None))
    cross = () if output_attentions and _empty_cross_attentions() else None
    out = _output_class()(last_hidden_state=last, pooler_output=pooled, hidden_states=hs, attentions=attn,
                          cross_attentions=cross)
    return out if return_dict else out.to_tuple()


def optimize(model, *, backend=None, padding_free=True, cuda_graphs=False):
    """Swap the encoder of a transformers RobertaModel / BertModel / XLMRobertaModel / CamembertModel or of
    one of their MaskedLM, SequenceClassification, TokenClassification, QuestionAnswering heads for
    roberta_fast's, in place, sharing the same Parameter objects. Returns `model`.

    `model` may also be any torch module holding such models, e.g. a sentence-transformers
    SentenceTransformer or CrossEncoder: each outermost one inside it is optimized.
    backend: op backend ("torch" | "triton" | "cuda" | None = automatic); padding_free: run packed real
    tokens (True) or the padded layout (False); cuda_graphs: False, True or roberta_fast.CudaGraphs(...):
    replay CUDA graphs of the padding-free forward in inference (roberta_fast/model/graphs.py; on CPU tensors
    nothing changes but a one-time warning). Calling optimize again only updates these three settings (graphs
    captured so far are kept when cuda_graphs gives the same options, else dropped).
    Anything else raises TypeError listing the supported classes.
    """
    _graphs.as_options(cuda_graphs)  # a bad value raises before anything changes
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"roberta_fast.optimize: expected a transformers model, got {type(model).__name__}; "
                        f"supported: {', '.join(supported_names())}")
    for enc, roberta in _find_encoders(model):
        settings = getattr(enc, "_roberta_fast", None)
        if settings is not None:
            settings.update(backend=backend, padding_free=bool(padding_free))
        else:
            _swap(enc, roberta, backend, padding_free)
        enc._cuda_graph_cache = _graphs.make_cache(cuda_graphs, old=getattr(enc, "_cuda_graph_cache", None))
    return model


def _swap(enc, roberta: bool, backend, padding_free: bool):
    """Our embeddings and encoder around enc's own Parameters, and our forward, on one transformers encoder."""
    cfg = EncoderConfig.from_hf(enc.config)
    before = dict(enc.named_parameters(remove_duplicate=False))
    checkpointing = [m for m in enc.encoder.modules() if getattr(m, "gradient_checkpointing", False)]
    fast_cls = RobertaModel if roberta else BertModel
    with torch.device("meta"):  # structure only: every parameter is replaced by the model's own below
        fast = fast_cls(cfg, add_pooling_layer=False, _init=False)
    for part in ("embeddings", "encoder"):
        ours, theirs = getattr(fast, part), getattr(enc, part)
        _take_parameters(ours, part, before, type(enc).__name__)
        _take_settings(ours, theirs)
        setattr(enc, part, ours)
    if checkpointing:  # gradient_checkpointing_enable() was called before optimize: keep it on
        fast._set_gradient_checkpointing(True, getattr(checkpointing[0], "_gradient_checkpointing_func", None))

    after = dict(enc.named_parameters(remove_duplicate=False))
    if after.keys() != before.keys() or any(after[k] is not before[k] for k in before):
        changed = sorted(k for k in before if after.get(k) is not before[k]) + sorted(after.keys() - before.keys())
        raise RuntimeError(f"roberta_fast.optimize: parameters not shared after the swap: {changed[:8]}")
    for m in enc.encoder.modules():  # the QKV parameters back to back in one storage (same objects): training
        if hasattr(m, "join_qkv"):  # reads them as one view, no concatenation per step (model/encoder.py)
            m.join_qkv()
    enc._roberta_fast = {"config": cfg, "roberta": roberta, "backend": backend, "padding_free": bool(padding_free)}
    enc.forward = functools.partial(_fast_forward, enc)  # picklable, unlike a bound method


def _take_parameters(ours, part: str, theirs: dict, owner: str):
    """Put the transformers model's Parameter objects (theirs, by full name) into our module `part`."""
    for name, p in list(ours.named_parameters()):
        full = f"{part}.{name}"
        src = theirs.get(full)
        if src is None or tuple(src.shape) != tuple(p.shape):
            got = "missing" if src is None else f"shape {tuple(src.shape)}"
            raise TypeError(f"roberta_fast.optimize: {owner} has an unexpected layout: {full} is {got}, "
                            f"expected shape {tuple(p.shape)}")
        module, _, leaf = name.rpartition(".")
        setattr(ours.get_submodule(module) if module else ours, leaf, src)


def _take_settings(ours, theirs):
    """padding_idx / eps from the transformers model's own modules, and its train / eval mode."""
    theirs_mods = dict(theirs.named_modules())
    for name, mine in ours.named_modules():
        mod = theirs_mods.get(name)
        for attr in ("padding_idx", "eps"):
            if mod is not None and hasattr(mod, attr) and hasattr(mine, attr):
                setattr(mine, attr, getattr(mod, attr))
    ours.train(theirs.training)
