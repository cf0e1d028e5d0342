"""Checkpoints: reading and writing transformers' save_pretrained layout, matching its names to the model,
and from_pretrained's keyword arguments (transformers' spellings, dtype names, unknown names refused).
PreTrainedEncoder (model/pretrained.py) calls these.

Names are transformers' on both sides. Reading normalizes old spellings (LayerNorm .gamma/.beta) and drops
transformers' buffers (embeddings.position_ids, embeddings.token_type_ids); an encoder reads a head's
checkpoint ("roberta." / "bert." prefix, head weights ignored with a warning) and a head reads an encoder's
(head weights initialized with a warning). Any other difference in names or shapes raises ValueError
naming the parameters.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
from dataclasses import fields

import torch

from .config import EncoderConfig, check_model_type

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
    d["dtype"] = str(model.dtype).removeprefix("torch.")  # what dtype="auto" loads (transformers 5 writes it too)
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


# ---------------------------------------------------------------------------------- from_pretrained's arguments

LOADER_ARGS = ("dtype", "device", "backend", "padding_free")
# transformers' spellings of ours
LOADER_ALIASES = {"torch_dtype": "dtype", "device_map": "device"}
# transformers' options that change nothing here: the files are local, the attention is ours, no remote code
LOADER_IGNORED = ("attn_implementation", "local_files_only", "low_cpu_mem_usage", "trust_remote_code")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def read_config(path: str, who: str, roberta: bool) -> dict:
    """config.json as a dict, its model_type checked (a missing one is the class's family)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{who}: no config.json in {path!r}")
    with open(cfg_file, encoding="utf-8") as f:
        d = json.load(f)
    d.setdefault("model_type", "roberta" if roberta else "bert")
    check_model_type(d["model_type"], f"{who}({path!r})")
    return d


def split_kwargs(who: str, kwargs: dict, named: dict) -> dict:
    """from_pretrained's extra keyword arguments: transformers' aliases fill `named` (dtype, device) in place,
    ignorable ones are dropped, config fields are returned as overrides; anything else raises TypeError
    naming the closest valid argument."""
    config_fields = [f.name for f in fields(EncoderConfig)]
    overrides = {}
    for name, value in kwargs.items():
        if name in LOADER_ALIASES:
            target = LOADER_ALIASES[name]
            if named[target] is not None and value is not None and named[target] != value:
                raise TypeError(f"{who}: {target}={named[target]!r} and {name}={value!r} disagree; give one")
            named[target] = value if named[target] is None else named[target]
        elif name in config_fields:
            overrides[name] = value
        elif name not in LOADER_IGNORED:
            valid = [*LOADER_ARGS, *LOADER_ALIASES, *LOADER_IGNORED, *config_fields]
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(LOADER_ARGS)} or a config field"
            raise TypeError(f"{who}: unexpected keyword argument {name!r} ({hint})")
    return overrides


def as_device(device, who: str):
    """None, a torch.device, a device string or index (device_map's single-device spellings)."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, (str, int)) and device not in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device(device)
    raise ValueError(f"{who}: device / device_map must name one device (e.g. 'cuda', 'cuda:1', 'cpu'), got "
                     f"{device!r}; roberta_fast does not split a model across devices")


def as_dtype(dtype, who: str):
    """A torch dtype from a torch.dtype or its name ('float16', 'torch.bfloat16'); None and 'auto' stay."""
    if dtype is None or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype not in DTYPES:
        raise ValueError(f"{who}: dtype must be 'auto', float32, float16 or bfloat16 (a torch.dtype or its name), "
                         f"got {dtype!r}")
    return dtype


def auto_dtype(config: dict, sd: dict, who: str):
    """transformers 5's dtype='auto': config.json's dtype (or torch_dtype) entry, else the checkpoint's first
    floating-point tensor's dtype, else float32."""
    name = config.get("dtype") or config.get("torch_dtype")
    if name is not None:
        return as_dtype(name, f"{who} (config.json dtype)")
    floating = [t.dtype for t in sd.values() if t.is_floating_point()]
    return as_dtype(floating[0] if floating else torch.float32, f"{who} (checkpoint dtype)")
