"""Checkpoints: reading and writing transformers' save_pretrained layout, matching its names to the model,
and PreTrainedEncoder, the base of the encoders and the heads (from_pretrained, save_pretrained, weight
init and tying, the `backend` / `padding_free` switches).

Names are transformers' on both sides. Reading normalizes old spellings (LayerNorm .gamma/.beta) and drops
transformers' buffers (embeddings.position_ids, embeddings.token_type_ids); an encoder reads a head's
checkpoint ("roberta." / "bert." prefix, head weights ignored with a warning) and a head reads an encoder's
(head weights initialized with a warning). Any other difference in names or shapes raises ValueError
naming the parameters.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
import torch.nn as nn

from .config import ROBERTA_TYPES, EncoderConfig

_BASE_PARTS = ("embeddings.", "encoder.", "pooler.")
_OUTSIDE = "<outside>."  # marks checkpoint keys of a head when an encoder loads a head checkpoint


def _read_state_dict(path: str, who: str) -> dict:
    """config.json's weights beside it: model.safetensors, pytorch_model.bin, or their sharded indexes."""
    st = os.path.join(path, "model.safetensors")
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st) or os.path.isfile(st + ".index.json"):
        from safetensors.torch import load_file

        files = [st] if os.path.isfile(st) else _shards(st + ".index.json")
        return {k: v for f in files for k, v in load_file(f, device="cpu").items()}
    if os.path.isfile(pt) or os.path.isfile(pt + ".index.json"):
        files = [pt] if os.path.isfile(pt) else _shards(pt + ".index.json")
        return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    raise FileNotFoundError(f"{who}: no weights in {path!r}: looked for model.safetensors, "
                            f"model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json")


def _shards(index_file: str) -> list:
    with open(index_file, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    folder = os.path.dirname(index_file)
    return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]


def _normalize_keys(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith(("embeddings.position_ids", "embeddings.token_type_ids")):
            continue  # transformers' buffers, not parameters
        if k.endswith(".gamma"):
            k = k[: -len("gamma")] + "weight"
        elif k.endswith(".beta"):
            k = k[: -len("beta")] + "bias"
        out[k] = v
    return out


def _short(names, n=8):
    names = list(names)
    s = ", ".join(names[:n])
    return s + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _align_prefix(sd: dict, prefix: str):
    """Checkpoint keys renamed as the model names them, and a test of whether a name is the encoder's
    (else a head's). prefix: the model's base_model_prefix ("" for an encoder)."""
    if prefix:  # a head: an encoder-only checkpoint has no prefix
        if not any(k.startswith(prefix + ".") for k in sd):
            sd = {(prefix + "." + k if k.startswith(_BASE_PARTS) else k): v for k, v in sd.items()}
        return sd, lambda name: name.startswith(prefix + ".")
    for p in ("roberta.", "bert."):  # the encoder: a head checkpoint has a prefix
        if any(k.startswith(p) for k in sd):
            sd = {(k[len(p):] if k.startswith(p) else _OUTSIDE + k): v for k, v in sd.items()}
            break
    return sd, lambda name: not name.startswith(_OUTSIDE)


def _sources(params: dict, sd: dict):
    """(first name of each parameter -> the checkpoint key that fills it, names the checkpoint lacks);
    tied weights share one Parameter and are filled once."""
    groups = {}  # id(Parameter) -> its names
    for name, p in params.items():
        groups.setdefault(id(p), []).append(name)
    source, missing = {}, []
    for names in groups.values():
        found = [n for n in names if n in sd]
        if found:
            source[names[0]] = found[0]
        else:
            missing.append(names[0])
    return source, missing


def _check_match(model, params: dict, sd: dict, missing: list, in_base, who: str):
    """Raise for names or shapes that do not match; warn for head weights initialized or ignored."""
    has_pooler = getattr(model.base_model, "pooler", None) is not None
    is_pooler = lambda name: ".pooler." in "." + name
    unexpected = [k for k in sd if k not in params]
    ignorable = [k for k in unexpected if not in_base(k) or (is_pooler(k) and not has_pooler)]
    bad_unexpected = [k for k in unexpected if k not in ignorable]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(params[k].shape)}"
                  for k in sd if k in params and tuple(sd[k].shape) != tuple(params[k].shape)]
    # a missing pooler is initialized, like a missing head (transformers does the same)
    missing_base = [k for k in missing if in_base(k) and not is_pooler(k)]
    problems = [(what, names) for what, names in (("shape mismatch", mismatched), ("missing in checkpoint",
                missing_base), ("not in the model", bad_unexpected)) if names]
    if problems:
        raise ValueError("; ".join([f"{who}: checkpoint does not match {type(model).__name__}"]
                                   + [f"{what}: {_short(names)}" for what, names in problems]))
    missing_head = [k for k in missing if k not in missing_base]
    if missing_head:
        warnings.warn(f"{who}: newly initialized (not in checkpoint): {_short(missing_head)}", stacklevel=4)
    ignored = [k.replace(_OUTSIDE, "") for k in ignorable if not is_pooler(k)]
    if ignored:
        warnings.warn(f"{who}: checkpoint weights not used by {type(model).__name__}: {_short(ignored)}",
                      stacklevel=4)


def load_state(model, sd: dict, *, who: str, dtype=None, device=None):
    """Fill `model` (built on the meta device) from a normalized checkpoint state dict, initializing the
    parameters the checkpoint lacks; then place it on `device` in `dtype`."""
    sd, in_base = _align_prefix(sd, model.base_model_prefix)
    params = dict(model.named_parameters(remove_duplicate=False))
    source, missing = _sources(params, sd)
    _check_match(model, params, sd, missing, in_base, who)
    # materialize (meta -> device), then fill from the checkpoint or initialize
    model.to_empty(device=torch.device(device) if device is not None else torch.device("cpu"))
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    owners = dict(model.named_modules())
    with torch.no_grad():
        for name in missing:
            model._init_weights(owners[name.rpartition(".")[0]] if "." in name else model)
        for name, key in source.items():
            params[name].copy_(sd[key])
    model.tie_weights()


def save_state(model, path: str):
    """config.json + model.safetensors in transformers' layout (tied weights stored once)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    d = model.config.to_dict()
    d["architectures"] = [type(model).__name__]
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    tensors, seen = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        # tied weights once, except the MLM decoder bias: transformers 4.x reads `decoder.bias`
        # (and drops `lm_head.bias`) when it loads, so it is written under both names
        if id(p) in seen and not name.endswith("decoder.bias"):
            continue
        seen.add(id(p))
        tensors[name] = p.detach().cpu().clone()
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


class PreTrainedEncoder(nn.Module):
    """Shared by the encoders and the heads: construction from a config, from_pretrained, save_pretrained,
    weight init and tying, and the `backend` / `padding_free` switches (held by the encoder)."""

    base_model_prefix = ""  # heads: "roberta" or "bert", the attribute holding the encoder
    _roberta = False

    @property
    def base_model(self):
        return getattr(self, self.base_model_prefix) if self.base_model_prefix else self

    @property
    def backend(self):
        return self.base_model._backend

    @backend.setter
    def backend(self, value):
        self.base_model._backend = value

    @property
    def padding_free(self):
        return self.base_model._padding_free

    @padding_free.setter
    def padding_free(self, value):
        self.base_model._padding_free = bool(value)

    # ---- weights
    def _init_weights(self, module):
        std = self.config.initializer_range
        with torch.no_grad():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def post_init(self):
        self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self):
        """MLM heads: decoder.weight is the word embedding matrix and decoder.bias the head's bias."""

    # ---- checkpoints
    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, backend=None, padding_free=True, **config_overrides):
        """Load a local directory written by transformers' save_pretrained (config.json + model.safetensors
        or pytorch_model.bin, sharded or not). No download: a missing directory or file raises naming it.

        dtype: parameter dtype (None: float32); device: where the weights go (None: cpu); backend: the op
        backend ("torch" | "triton" | "cuda" | None = automatic); config_overrides: config fields to
        change (e.g. num_labels=3 for a new classifier). Checkpoint names and shapes must match the model:
        a mismatch raises ValueError naming the parameters. A head loaded from an encoder-only checkpoint
        gets freshly initialized head weights (with a warning), and weights of other heads in the
        checkpoint are ignored (with a warning), as transformers does. Returns the model in eval mode.
        """
        who = f"{cls.__name__}.from_pretrained"
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{who}: {path!r} is not a directory (this loader reads a local directory "
                                    f"written by transformers' save_pretrained; it never downloads)")
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{who}: no config.json in {path!r}")
        config = EncoderConfig.from_json_file(cfg_file, **config_overrides)
        if (config.model_type in ROBERTA_TYPES) != cls._roberta:
            warnings.warn(f"{who}: {path!r} holds a {config.model_type!r} model; {cls.__name__} computes "
                          f"{'RoBERTa' if cls._roberta else 'BERT'}-style position ids", stacklevel=2)
        sd = _normalize_keys(_read_state_dict(path, who))
        with torch.device("meta"):
            model = cls(config, backend=backend, padding_free=padding_free)
        load_state(model, sd, who=f"{who}({path!r})", dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, path):
        """Write config.json + model.safetensors in transformers' layout (tied weights stored once)."""
        save_state(self, os.fspath(path))
