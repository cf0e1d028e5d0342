"""PreTrainedEncoder: the base of the encoders and the heads, with the part of transformers' PreTrainedModel
that users reach for: from_pretrained / save_pretrained (model/checkpoint.py does the file work), weight init
and tying, device / dtype / num_parameters, input and output embeddings and resize_token_embeddings,
gradient checkpointing, and our `backend` / `padding_free` / `cuda_graphs` switches (held by the encoder).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn as nn

from . import checkpoint, graphs
from .config import ROBERTA_TYPES, EncoderConfig


class PreTrainedEncoder(nn.Module):
    """Shared by the encoders and the heads (transformers' names and semantics)."""

    base_model_prefix = ""  # heads: "roberta" or "bert", the attribute holding the encoder
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
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

    @property
    def cuda_graphs(self):
        """The CudaGraphs options in effect (model/graphs.py), or None (off). Set True, False or CudaGraphs(...);
        new options drop the graphs captured so far (roberta_fast.graphs.clear(model) drops them and keeps the
        options)."""
        cache = self.base_model._cuda_graph_cache
        return None if cache is None else cache.options

    @cuda_graphs.setter
    def cuda_graphs(self, value):
        base = self.base_model
        base._cuda_graph_cache = graphs.make_cache(value, old=base._cuda_graph_cache)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The first floating-point parameter's dtype."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (tied ones once), optionally only those requiring grad, optionally without the
        nn.Embedding weights (transformers' semantics)."""
        skip = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, nn.Embedding)} \
            if exclude_embeddings else set()
        return sum(p.numel() for n, p in self.named_parameters()
                   if n not in skip and (p.requires_grad or not only_trainable))

    # ---- embeddings
    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding):
        self.base_model.embeddings.word_embeddings = value

    def get_output_embeddings(self):
        """The MLM decoder (heads with one), else None."""
        return None

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """Resize the word embeddings (and a MLM head's decoder and bias) to new_num_tokens rows, rounded up to
        pad_to_multiple_of; config.vocab_size follows. Rows kept keep their values and the Parameter objects
        stay the same (an optimizer holding them keeps working). Added rows: the mean of the old ones with
        mean_resizing (transformers samples around it with a 1e-9-scaled covariance), else normal(0,
        initializer_range) and a zero bias. Returns the input embedding module, as transformers does."""
        emb = self.get_input_embeddings()
        n = new_num_tokens if new_num_tokens is not None else emb.num_embeddings
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
            n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        elif new_num_tokens is None:
            return emb
        _resize_rows_(emb.weight, n, mean_resizing, self.config.initializer_range)
        emb.num_embeddings = n
        if emb.padding_idx is not None and emb.padding_idx >= n:
            emb.padding_idx = None
        self._resize_output(n, mean_resizing)
        self.config.vocab_size = n
        self.tie_weights()
        return emb

    def _resize_output(self, n: int, mean_resizing: bool):
        """Heads with vocabulary-sized outputs resize them here."""

    # ---- gradient checkpointing (the flag lives on each encoder Layer, as in transformers)
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Recompute each layer in the backward instead of keeping its activations (training with grad only);
        gradient_checkpointing_kwargs go to torch.utils.checkpoint.checkpoint (default use_reentrant=False)."""
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        self._set_gradient_checkpointing(True, functools.partial(torch.utils.checkpoint.checkpoint, **kwargs))

    def gradient_checkpointing_disable(self):
        self._set_gradient_checkpointing(False, None)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
        """transformers 5's name of gradient_checkpointing_enable."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs)

    def activation_checkpointing_disable(self):
        self.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    is_activation_checkpointing = is_gradient_checkpointing

    def _set_gradient_checkpointing(self, enable: bool, func):
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = enable
                if func is not None:
                    m._gradient_checkpointing_func = func

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
    def from_pretrained(cls, path, *, dtype=None, device=None, backend=None, padding_free=True, cuda_graphs=False,
                        **kwargs):
        """Load a local directory written by transformers' save_pretrained (config.json + model.safetensors
        or pytorch_model.bin, sharded or not). No download: a missing directory or file raises naming it.

        dtype: a torch dtype or its name ("float16", "torch.bfloat16"), or None / "auto" (transformers 5's
        default): config.json's dtype entry, else the checkpoint's. device: where the weights go (None:
        cpu). backend: the op backend ("torch" | "triton" | "cuda" | None = automatic). cuda_graphs: True or
        roberta_fast.CudaGraphs(...) replays CUDA graphs of the padding-free forward in inference
        (model/graphs.py; on CPU tensors nothing changes but a one-time warning). transformers' spellings work:
        torch_dtype= (dtype), device_map= (one device); attn_implementation, local_files_only, low_cpu_mem_usage
        and trust_remote_code change nothing here and are accepted.
        Other keyword arguments must be config fields to change (e.g. num_labels=3 for a new classifier);
        anything else raises TypeError naming the closest valid one. config.json's model_type must be a
        BERT-family type (ValueError otherwise). Checkpoint names and shapes must match the model: a
        mismatch raises ValueError naming the parameters. A head loaded from an encoder-only checkpoint
        gets freshly initialized head weights (with a warning), and weights of other heads in the
        checkpoint are ignored (with a warning), as transformers does. Returns the model in eval mode.
        """
        who = f"{cls.__name__}.from_pretrained"
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{who}: {path!r} is not a directory (this loader reads a local directory "
                                    f"written by transformers' save_pretrained; it never downloads)")
        named = {"dtype": dtype, "device": device}
        overrides = checkpoint.split_kwargs(who, kwargs, named)
        dtype, device = checkpoint.as_dtype(named["dtype"], who), checkpoint.as_device(named["device"], who)
        d = checkpoint.read_config(path, who, cls._roberta)
        config = EncoderConfig.from_dict(d, **overrides)
        if (config.model_type in ROBERTA_TYPES) != cls._roberta:
            warnings.warn(f"{who}: {path!r} holds a {config.model_type!r} model; {cls.__name__} computes "
                          f"{'RoBERTa' if cls._roberta else 'BERT'}-style position ids", stacklevel=2)
        sd = checkpoint._normalize_keys(checkpoint._read_state_dict(path, who))
        if dtype in (None, "auto"):
            dtype = checkpoint.auto_dtype(d, sd, who)
        with torch.device("meta"):
            model = cls(config, backend=backend, padding_free=padding_free, cuda_graphs=cuda_graphs)
        checkpoint.load_state(model, sd, who=f"{who}({path!r})", dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, path):
        """Write config.json + model.safetensors in transformers' layout (tied weights stored once)."""
        checkpoint.save_state(self, os.fspath(path))


def _resize_rows_(param: nn.Parameter, n: int, mean_init: bool, std: float):
    """Replace param's data by n rows: the old ones first, then new rows (the old rows' mean, or normal(0, std)
    for a matrix and zeros for a vector). The Parameter object stays the same."""
    old = param.data
    new = old.new_empty((n, *old.shape[1:]))  # (n, ...)
    kept = min(n, old.shape[0])
    new[:kept] = old[:kept]
    if n > kept:
        if mean_init:
            new[kept:] = old.float().mean(dim=0).to(old.dtype)
        elif old.dim() > 1:
            new[kept:].normal_(0.0, std)
        else:
            new[kept:].zero_()
    param.data = new


def count_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights once)."""
    return sum(p.numel() for p in model.parameters())
