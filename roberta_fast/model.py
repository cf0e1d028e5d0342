"""The BERT-family encoder built from roberta_fast.ops and torch GEMMs: RoBERTa, BERT (XLM-R, CamemBERT
and MiniLM load through them) and their MLM / sequence / token / question-answering heads.

    from roberta_fast import RobertaModel
    model = RobertaModel.from_pretrained("path/to/saved", dtype=torch.float16, device="cuda")
    out = model(input_ids, attention_mask=attention_mask)      # out.last_hidden_state (B, S, hidden)

Parameter names are transformers' (embeddings.word_embeddings.weight,
encoder.layer.0.attention.self.query.weight, ..., pooler.dense.weight), so state dicts load both ways.
The nn.Linear / nn.Embedding / nn.LayerNorm modules below only hold parameters; the forward never calls
them, it calls F.linear and the fused ops. One layer, on T real tokens:

    x (T, hidden) -> QKV GEMM (one, fused weight cached) -> attention (varlen) -> out GEMM (no bias)
      -> layer_norm(x_bias=out bias, residual=x) -> FFN1 GEMM (no bias) -> bias_gelu
      -> FFN2 GEMM (no bias) -> layer_norm(x_bias=FFN2 bias, residual=h)

Padding: a padded batch is packed once after the embedding lookup (only the ids of real tokens are looked
up), every GEMM and kernel runs on real tokens only, and the outputs are scattered back once at the end.
The padded positions of last_hidden_state and of every hidden_states entry are ZEROS (transformers leaves
whatever its layers computed there); `padding_free=False` runs the padded layout with
ops.attention(key_padding_mask=...) and zeroes the padded positions the same way, so both paths return
identical tensors. Token-level head outputs at padded positions are the head applied to those zeros;
the pooler reads position 0 as transformers does (a left-padded row gives tanh(pooler bias) there).

Unfused attention: output_attentions=True, or attention-probs dropout > 0 in train mode, computes
q k^T, ops.masked_softmax and probs @ v, and returns the probabilities (B, heads, S, S) (after dropout,
as transformers does; padded query rows are zeros). Eval has no dropout anywhere.

Each forward synchronizes with the device once: the input range checks (ids < vocab_size, positions
< max_position_embeddings, types < type_vocab_size: ValueError otherwise) and the mask statistics
(real token count, longest sequence) are read back together.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .padding import index_first_axis, pad_input

# --------------------------------------------------------------------------------------------- config

ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
BERT_TYPES = ("bert",)
# hidden_act -> bias_gelu's approximate (None: plain ReLU)
ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "relu": None}


@dataclass
class EncoderConfig:
    """The fields of a transformers Bert/Roberta config that the encoder uses (same names, same meaning)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    model_type: str = "bert"
    tie_word_embeddings: bool = True
    num_labels: int = 2
    classifier_dropout: float | None = None
    problem_type: str | None = None
    id2label: dict | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> EncoderConfig:
        """From a config.json dict (unknown keys are ignored; decoder and relative-position configs raise)."""
        d = {**d, **overrides}
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("decoder configs (is_decoder / add_cross_attention) are not supported: this is an encoder")
        pet = d.get("position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise ValueError(f"position_embedding_type {pet!r} is not supported (only 'absolute')")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "num_labels" in overrides:
            kw.pop("id2label", None)
        return cls(**kw)

    @classmethod
    def from_json_file(cls, path, **overrides) -> EncoderConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), **overrides)

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> EncoderConfig:
        """From a transformers config object (BertConfig, RobertaConfig, XLMRobertaConfig, ...)."""
        d = {f.name: getattr(hf_config, f.name) for f in fields(cls) if hasattr(hf_config, f.name)}
        d["is_decoder"] = getattr(hf_config, "is_decoder", False)
        d["add_cross_attention"] = getattr(hf_config, "add_cross_attention", False)
        d["position_embedding_type"] = getattr(hf_config, "position_embedding_type", "absolute")
        if getattr(hf_config, "id2label", None) is not None and "num_labels" not in overrides:
            d["id2label"] = dict(hf_config.id2label)
        return cls.from_dict(d, **overrides)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["id2label"] is None:
            d.pop("id2label")
        else:
            d["id2label"] = {str(k): v for k, v in d["id2label"].items()}
            d["label2id"] = {v: int(k) for k, v in d["id2label"].items()}
        return d

    def to_hf(self, **kwargs):
        """The equivalent transformers config (needs transformers installed)."""
        from transformers import AutoConfig

        d = self.to_dict()
        model_type = d.pop("model_type")
        d.pop("label2id", None)
        if d.get("id2label") is None:
            d.pop("id2label", None)
        else:
            d.pop("num_labels")
        return AutoConfig.for_model(model_type, **d, **kwargs)


def _as_config(config) -> EncoderConfig:
    if isinstance(config, EncoderConfig):
        return config
    if isinstance(config, dict):
        return EncoderConfig.from_dict(config)
    if hasattr(config, "hidden_size") and hasattr(config, "num_hidden_layers"):
        return EncoderConfig.from_hf(config)
    raise TypeError(f"config must be an EncoderConfig, a dict or a transformers config, got {type(config).__name__}")


# --------------------------------------------------------------------------------------------- outputs


class ModelOutput:
    """Like transformers' ModelOutput: attribute, key and index access; None fields are skipped by
    to_tuple(), integer indexing and iteration over keys."""

    _fields: tuple = ()

    def __init__(self, **kwargs):
        for name in self._fields:
            setattr(self, name, kwargs.pop(name, None))
        if kwargs:
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(kwargs)}")

    def keys(self):
        return [k for k in self._fields if getattr(self, k) is not None]

    def values(self):
        return [getattr(self, k) for k in self.keys()]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key):
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.keys())

    def __repr__(self):
        parts = []
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                parts.append(f"{k}=Tensor{tuple(v.shape)}")
            elif isinstance(v, tuple):
                parts.append(f"{k}=tuple[{len(v)}]")
            else:
                parts.append(f"{k}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class EncoderOutput(ModelOutput):
    """last_hidden_state (B, S, hidden); pooler_output (B, hidden) or None; hidden_states: tuple of
    num_layers + 1 tensors (B, S, hidden) (embeddings first) or None; attentions: tuple of num_layers
    tensors (B, heads, S, S) or None."""

    _fields = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")


class MaskedLMOutput(ModelOutput):
    _fields = ("loss", "logits", "hidden_states", "attentions")


class SequenceClassifierOutput(ModelOutput):
    _fields = ("loss", "logits", "hidden_states", "attentions")


class TokenClassifierOutput(ModelOutput):
    _fields = ("loss", "logits", "hidden_states", "attentions")


class QuestionAnsweringModelOutput(ModelOutput):
    _fields = ("loss", "start_logits", "end_logits", "hidden_states", "attentions")


# --------------------------------------------------------------------------------------------- modules


class Embeddings(nn.Module):
    """word + position + token-type embeddings, summed and normalized in one fused layer_norm."""

    def __init__(self, cfg: EncoderConfig, roberta: bool):
        super().__init__()
        H = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, H, padding_idx=cfg.pad_token_id)
        # RoBERTa's position table has a padding row (padding_idx: no gradient there), BERT's has none
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, H,
                                                padding_idx=cfg.pad_token_id if roberta else None)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, H)
        self.LayerNorm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.dropout_p = cfg.hidden_dropout_prob

    def forward(self, ids, positions, types, inputs_embeds, *, backend=None):
        """ids, positions, types: int (T,) (types may be None = all type 0); inputs_embeds (T, hidden) or
        None in place of ids. Returns (T, hidden)."""
        word = self.word_embeddings
        if inputs_embeds is None:
            x = F.embedding(ids, word.weight, word.padding_idx)  # (T, hidden)
        else:
            x = inputs_embeds.to(word.weight.dtype)
        pos = self.position_embeddings
        residual = F.embedding(positions, pos.weight, pos.padding_idx)  # (T, hidden)
        tt = self.token_type_embeddings.weight
        if types is None:
            x_bias = tt[0]  # (hidden,): every token has type 0
        else:
            x_bias = None
            residual = residual + F.embedding(types, tt)
        ln = self.LayerNorm
        h = ops.layer_norm(x, ln.weight, ln.bias, ln.eps, residual=residual, x_bias=x_bias, backend=backend)
        if self.training and self.dropout_p > 0:
            h = F.dropout(h, self.dropout_p, training=True)
        return h


class SelfAttention(nn.Module):
    """query, key, value projections; the forward runs them as one GEMM with a cached fused weight."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        H = cfg.hidden_size
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.dropout_p = cfg.attention_probs_dropout_prob
        self._qkv_cache = None

    def qkv_weight_bias(self):
        """(3*hidden, hidden) weight and (3*hidden,) bias of the fused QKV GEMM.

        When autograd records (grad mode on and a projection parameter requires grad) the fused tensors
        are built with torch.cat inside autograd, so gradients reach query/key/value. Otherwise they are
        built once and cached, keyed on the six source tensors' data_ptr and _version (an in-place update,
        load_state_dict, .to() or a new tensor rebuilds them). The cache keeps the sources alive, so a
        freed address cannot be reused by a different tensor under the same key.
        """
        srcs = (self.query.weight, self.key.weight, self.value.weight, self.query.bias, self.key.bias,
                self.value.bias)
        if torch.is_grad_enabled() and any(t.requires_grad for t in srcs):
            return torch.cat(srcs[:3]), torch.cat(srcs[3:])
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in srcs)
        key += (torch.is_inference_mode_enabled(),)
        cache = self._qkv_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, torch.cat(srcs[:3]), torch.cat(srcs[3:]), tuple(t.detach() for t in srcs))
            self._qkv_cache = cache
        return cache[1], cache[2]

    def _apply(self, fn, *args, **kwargs):
        self._qkv_cache = None  # .to() / .half() / .cuda(): drop the stale copy now, not at the next forward
        return super()._apply(fn, *args, **kwargs)


class SelfOutput(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = SelfOutput(cfg)


class Intermediate(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


class Output(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


@dataclass
class _Batch:
    """Where the real tokens are. x is (T, hidden) packed real tokens when `indices` is set, else the
    padded (B*S, hidden) batch (mask None: every position is real)."""

    batch: int
    seqlen: int
    mask: torch.Tensor | None = None  # (B, S) bool, True = real token
    indices: torch.Tensor | None = None  # (T,) int64
    cu_seqlens: torch.Tensor | None = None  # (B + 1,) int32
    max_seqlen: int = 0

    def to_padded(self, x):
        """(rows, ...) -> (B, S, ...), zeros at padded positions."""
        if self.indices is not None:
            return pad_input(x, self.indices, self.batch, self.seqlen)
        x = x.view(self.batch, self.seqlen, *x.shape[1:])
        if self.mask is not None:
            x = x.masked_fill(~self.mask.view(*self.mask.shape, *([1] * (x.dim() - 2))), 0)
        return x

    def to_rows(self, x):
        """(B, S, ...) -> rows of this batch's layout."""
        if self.indices is not None:
            return index_first_axis(x, self.indices)
        return x.reshape(self.batch * self.seqlen, *x.shape[2:])


def _dense_add_norm(x, dense, norm, residual, dropout_p, backend):
    """LayerNorm(dropout(x @ W^T + b) + residual): the GEMM without bias, the bias fused into the norm."""
    y = F.linear(x, dense.weight)  # (rows, out)
    if residual.dtype != y.dtype:  # autocast: GEMM output in the autocast dtype
        residual = residual.to(y.dtype)
    if dropout_p > 0:
        y = F.dropout(y + dense.bias, dropout_p, training=True)
        return ops.layer_norm(y, norm.weight, norm.bias, norm.eps, residual=residual, backend=backend)
    return ops.layer_norm(y, norm.weight, norm.bias, norm.eps, residual=residual, x_bias=dense.bias,
                          backend=backend)


def _attend(q, k, v, b: _Batch, dropout_p, need_probs, backend):
    """q, k, v (rows, heads, head_dim) views into the QKV GEMM output -> (rows, heads, head_dim) and the
    probabilities (B, heads, S, S) when asked for."""
    B, S = b.batch, b.seqlen
    nh, d = q.shape[1], q.shape[2]
    if need_probs or dropout_p > 0:
        # unfused: materialize the (B, heads, S, S) probabilities through ops.masked_softmax
        q4, k4, v4 = (b.to_padded(t).transpose(1, 2) for t in (q, k, v))  # (B, heads, S, head_dim)
        scores = torch.matmul(q4, k4.transpose(-1, -2))  # (B, heads, S, S)
        mask = None
        if b.mask is not None:  # keep real keys of real queries; padded query rows come out as zeros
            mask = b.mask[:, None, None, :] & b.mask[:, None, :, None]  # (B, 1, S, S)
        probs = ops.masked_softmax(scores, mask, d ** -0.5, backend=backend)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p, training=True)
        ctx = torch.matmul(probs, v4).transpose(1, 2)  # (B, S, heads, head_dim)
        return b.to_rows(ctx), (probs if need_probs else None)
    if b.indices is not None:
        return ops.attention_varlen(q, k, v, b.cu_seqlens, b.max_seqlen, backend=backend), None
    q4, k4, v4 = (t.view(B, S, nh, d) for t in (q, k, v))  # (B, S, heads, head_dim)
    o = ops.attention(q4, k4, v4, key_padding_mask=b.mask, backend=backend)  # (B, S, heads, head_dim)
    return o.reshape(B * S, nh, d), None


class Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)
        self.hidden_dropout_p = cfg.hidden_dropout_prob
        self.approximate = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x, b: _Batch, *, need_probs=False, backend=None):
        """x (rows, hidden) -> (rows, hidden), probabilities (B, heads, S, S) or None."""
        sa = self.attention.self
        w, bias = sa.qkv_weight_bias()  # (3*hidden, hidden), (3*hidden,)
        qkv = F.linear(x, w, bias)  # (rows, 3*hidden)
        q, k, v = qkv.view(x.shape[0], 3, sa.num_heads, sa.head_dim).unbind(1)  # (rows, heads, head_dim)
        attn_p = sa.dropout_p if self.training else 0.0
        ctx, probs = _attend(q, k, v, b, attn_p, need_probs, backend)  # (rows, heads, head_dim)
        ctx = ctx.reshape(x.shape[0], -1)  # (rows, hidden)
        hid_p = self.hidden_dropout_p if self.training else 0.0
        h = _dense_add_norm(ctx, self.attention.output.dense, self.attention.output.LayerNorm, x, hid_p, backend)
        ffn1 = self.intermediate.dense
        if self.approximate is None:
            inter = F.relu(F.linear(h, ffn1.weight, ffn1.bias))
        else:
            inter = ops.bias_gelu(F.linear(h, ffn1.weight), ffn1.bias, self.approximate,
                                  backend=backend)  # (rows, intermediate)
        out = _dense_add_norm(inter, self.output.dense, self.output.LayerNorm, h, hid_p, backend)
        return out, probs


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class Pooler(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)


# --------------------------------------------------------------------------------------------- forward

_UNSUPPORTED_KWARGS = ("head_mask", "encoder_hidden_states", "encoder_attention_mask", "past_key_values", "cache")
_IGNORED_KWARGS = ("use_cache", "cache_position")


def _check_extra_kwargs(kwargs):
    for name, value in kwargs.items():
        if value is None or name in _IGNORED_KWARGS:
            continue
        if name in _UNSUPPORTED_KWARGS:
            raise NotImplementedError(f"roberta_fast encoder: {name} is not supported (encoder-only, no head mask)")
        raise TypeError(f"roberta_fast encoder: unexpected argument {name}={type(value).__name__}")


class _HostChecks:
    """Range checks of integer inputs and the mask statistics, read back in ONE host sync per forward."""

    def __init__(self):
        self.scalars, self.checks = [], []

    def ids(self, name, t, limit, what):
        """t must lie in [0, limit)."""
        if t.numel():
            self.checks.append((name, len(self.scalars), limit, what))
            self.scalars += [t.min(), t.max()]

    def mask(self, real):
        """real (B, S) bool -> (number of real tokens, longest real length) after run()."""
        seqlens = real.sum(dim=1, dtype=torch.int32)  # (B,)
        self.mask_at = len(self.scalars)
        self.scalars += [seqlens.sum(), seqlens.max()]
        return seqlens

    def run(self):
        vals = torch.stack([v.to(torch.int64) for v in self.scalars]).tolist() if self.scalars else []
        for name, i, limit, what in self.checks:
            lo, hi = vals[i], vals[i + 1]
            if lo < 0 or hi >= limit:
                raise ValueError(f"{name} holds {hi if hi >= limit else lo}, outside [0, {limit}): {what}")
        return vals


def encoder_forward(embeddings, encoder, pooler, cfg: EncoderConfig, *, roberta: bool, backend=None,
                    padding_free=True, input_ids=None, attention_mask=None, token_type_ids=None,
                    position_ids=None, inputs_embeds=None, output_hidden_states=False, output_attentions=False):
    """The whole encoder on any modules with transformers' names (ours, or a transformers model's after
    roberta_fast.optimize). Returns (last_hidden_state, pooler_output, hidden_states, attentions)."""
    # ---- inputs
    host = _HostChecks()
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D (batch, seqlen) tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integers, got {input_ids.dtype}")
        B, S = input_ids.shape
        device = input_ids.device
        host.ids("input_ids", input_ids, cfg.vocab_size, f"token ids must be < vocab_size ({cfg.vocab_size})")
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"inputs_embeds must have shape (batch, seqlen, {cfg.hidden_size}), got "
                             f"{tuple(inputs_embeds.shape)}")
        B, S = inputs_embeds.shape[:2]
        device = inputs_embeds.device
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is not None and tuple(t.shape) != (B, S):
            raise ValueError(f"{name} must have the shape of input_ids ({B}, {S}), got {tuple(t.shape)}")
    max_pos = cfg.max_position_embeddings
    if position_ids is None:
        if roberta:  # transformers: padding_idx + cumsum of the non-pad mask (pads keep padding_idx)
            pad = cfg.pad_token_id
            if input_ids is not None:
                not_pad = input_ids.ne(pad).int()
                position_ids = (torch.cumsum(not_pad, dim=1).type_as(not_pad) * not_pad).long() + pad
            else:
                position_ids = torch.arange(pad + 1, S + pad + 1, device=device).expand(B, S)
            limit = max_pos - pad - 1
        else:
            position_ids = torch.arange(S, device=device).expand(B, S)
            limit = max_pos
        if S > limit:
            raise ValueError(f"sequence length {S} is longer than this model takes ({limit}: "
                             f"max_position_embeddings = {max_pos})")
    else:
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        try:
            position_ids = position_ids.expand(B, S)
        except RuntimeError:
            raise ValueError(f"position_ids must have shape ({B}, {S}) or (1, {S}), got "
                             f"{tuple(position_ids.shape)}") from None
        host.ids("position_ids", position_ids, max_pos,
                 f"position ids must be < max_position_embeddings ({max_pos}): sequence too long?")
    if token_type_ids is not None:
        host.ids("token_type_ids", token_type_ids, cfg.type_vocab_size,
                 f"token type ids must be < type_vocab_size ({cfg.type_vocab_size})")
        if cfg.type_vocab_size == 1:
            token_type_ids = None  # all zeros: the type embedding is a constant row (x_bias)

    # ---- where the real tokens are: pack them once (padding_free) or keep the padded layout
    b = _Batch(B, S)
    mask = None
    if attention_mask is not None and B * S > 0:
        mask = (attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0).contiguous()
        seqlens = host.mask(mask)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # CUDA graph capture: no host sync is allowed, so no value checks and no packing (the number of real
        # tokens is data): the padded path with the key padding mask, whose shapes are fixed
        b.mask = mask
        vals = None
    else:
        vals = host.run()  # the one host sync: input checks, number of real tokens, longest sequence
    if vals is not None and mask is not None and vals[host.mask_at] < B * S:  # some padding (else dense, no mask)
        b.mask = mask
        if padding_free:
            T = vals[host.mask_at]
            # rows of the real tokens in order: a stable sort puts real (key 0) before padding (key 1)
            b.indices = torch.argsort((~mask).flatten().to(torch.int8), stable=True)[:T]  # (T,)
            b.cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))  # (B + 1,)
            b.max_seqlen = vals[host.mask_at + 1]

    # ---- embeddings on real tokens (T, hidden)
    h = embeddings(
        b.to_rows(input_ids) if input_ids is not None else None,
        b.to_rows(position_ids),
        b.to_rows(token_type_ids) if token_type_ids is not None else None,
        b.to_rows(inputs_embeds) if inputs_embeds is not None else None,
        backend=backend,
    )
    all_hidden = [h] if output_hidden_states else None
    all_probs = [] if output_attentions else None
    for layer in encoder.layer:
        h, probs = layer(h, b, need_probs=output_attentions, backend=backend)  # (T, hidden)
        if output_hidden_states:
            all_hidden.append(h)
        if output_attentions:
            all_probs.append(probs)

    # ---- repad once
    last = b.to_padded(h)  # (B, S, hidden), zeros at padding
    hidden_states = None
    if output_hidden_states:
        hidden_states = tuple(b.to_padded(t) for t in all_hidden[:-1]) + (last,)
    pooled = None
    if pooler is not None:
        pooled = torch.tanh(F.linear(last[:, 0], pooler.dense.weight, pooler.dense.bias))  # (B, hidden)
    return last, pooled, hidden_states, (tuple(all_probs) if output_attentions else None)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, mode: str = "mean") -> torch.Tensor:
    """Sentence embeddings from token states: hidden (B, S, hidden), attention_mask (B, S) (nonzero = real).

    mode "mean": average over real tokens (sentence-transformers' mean pooling; computed in float32);
    "cls": the first token's state. Returns (B, hidden) in hidden's dtype.
    """
    if hidden.dim() != 3:
        raise ValueError(f"pool: hidden must be (batch, seqlen, hidden), got shape {tuple(hidden.shape)}")
    if mode == "cls":
        return hidden[:, 0]
    if mode != "mean":
        raise ValueError(f"pool: mode must be 'mean' or 'cls', got {mode!r}")
    if attention_mask is None:
        return hidden.float().mean(dim=1).to(hidden.dtype)
    if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"pool: attention_mask shape {tuple(attention_mask.shape)} does not match hidden's "
                         f"{tuple(hidden.shape[:2])}")
    m = (attention_mask != 0).to(torch.float32).unsqueeze(-1)  # (B, S, 1)
    summed = (hidden.float() * m).sum(dim=1)  # (B, hidden)
    return (summed / m.sum(dim=1).clamp(min=1e-9)).to(hidden.dtype)


# --------------------------------------------------------------------------------------------- loading


def _read_state_dict(path: str, who: str) -> dict:
    """config.json's weights beside it: model.safetensors, pytorch_model.bin, or their sharded indexes."""
    st = os.path.join(path, "model.safetensors")
    st_index = st + ".index.json"
    pt = os.path.join(path, "pytorch_model.bin")
    pt_index = pt + ".index.json"
    if os.path.isfile(st) or os.path.isfile(st_index):
        from safetensors.torch import load_file

        files = [st] if os.path.isfile(st) else _shards(st_index)
        sd = {}
        for f in files:
            sd.update(load_file(f, device="cpu"))
        return sd
    if os.path.isfile(pt) or os.path.isfile(pt_index):
        files = [pt] if os.path.isfile(pt) else _shards(pt_index)
        sd = {}
        for f in files:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        return sd
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


_BASE_PARTS = ("embeddings.", "encoder.", "pooler.")


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
            elif isinstance(module, (RobertaLMHead, BertLMPredictionHead)):
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
        family = "roberta" if config.model_type in ROBERTA_TYPES else "bert"
        if (family == "roberta") != cls._roberta:
            warnings.warn(f"{who}: {path!r} holds a {config.model_type!r} model; {cls.__name__} computes "
                          f"{'RoBERTa' if cls._roberta else 'BERT'}-style position ids", stacklevel=2)
        sd = _normalize_keys(_read_state_dict(path, who))
        with torch.device("meta"):
            model = cls(config, backend=backend, padding_free=padding_free)
        model._load_state(sd, who=f"{who}({path!r})", dtype=dtype, device=device)
        return model.eval()

    def _load_state(self, sd, *, who, dtype=None, device=None):
        prefix = self.base_model_prefix
        if prefix:  # a head: an encoder-only checkpoint has no prefix
            if not any(k.startswith(prefix + ".") for k in sd):
                sd = {(prefix + "." + k if k.startswith(_BASE_PARTS) else k): v for k, v in sd.items()}
            in_base = lambda name: name.startswith(prefix + ".")
        else:  # the encoder: a head checkpoint has a prefix ("roberta." / "bert.")
            for p in ("roberta.", "bert."):
                if any(k.startswith(p) for k in sd):
                    sd = {(k[len(p):] if k.startswith(p) else "<outside>." + k): v for k, v in sd.items()}
                    break
            in_base = lambda name: not name.startswith("<outside>.")

        params = dict(self.named_parameters(remove_duplicate=False))
        groups = {}  # id(Parameter) -> its names (tied weights share one Parameter)
        for name, p in params.items():
            groups.setdefault(id(p), []).append(name)
        source = {}  # first name of each group -> checkpoint key that fills it
        missing = []
        for names in groups.values():
            found = [n for n in names if n in sd]
            if found:
                source[names[0]] = found[0]
            else:
                missing.append(names[0])
        has_pooler = getattr(self.base_model, "pooler", None) is not None
        is_pooler = lambda name: ".pooler." in "." + name
        unexpected = [k for k in sd if k not in params]
        ignorable = [k for k in unexpected if not in_base(k) or (is_pooler(k) and not has_pooler)]
        bad_unexpected = [k for k in unexpected if k not in ignorable]
        mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(params[k].shape)}"
                      for k in sd if k in params and tuple(sd[k].shape) != tuple(params[k].shape)]
        # a missing pooler is initialized, like a missing head (transformers does the same)
        missing_base = [k for k in missing if in_base(k) and not is_pooler(k)]
        if mismatched or missing_base or bad_unexpected:
            msg = [f"{who}: checkpoint does not match {type(self).__name__}"]
            if mismatched:
                msg.append(f"shape mismatch: {_short(mismatched)}")
            if missing_base:
                msg.append(f"missing in checkpoint: {_short(missing_base)}")
            if bad_unexpected:
                msg.append(f"not in the model: {_short(bad_unexpected)}")
            raise ValueError("; ".join(msg))
        missing_head = [k for k in missing if k not in missing_base]
        if missing_head:
            warnings.warn(f"{who}: newly initialized (not in checkpoint): {_short(missing_head)}", stacklevel=3)
        ignored = [k.replace("<outside>.", "") for k in ignorable if not is_pooler(k)]
        if ignored:
            warnings.warn(f"{who}: checkpoint weights not used by {type(self).__name__}: {_short(ignored)}",
                          stacklevel=3)

        # materialize (meta -> device), then fill from the checkpoint or initialize
        self.to_empty(device=torch.device(device) if device is not None else torch.device("cpu"))
        self.tie_weights()
        if dtype is not None:
            self.to(dtype)
        params = dict(self.named_parameters(remove_duplicate=False))
        owners = dict(self.named_modules())
        with torch.no_grad():
            for name in missing:
                self._init_weights(owners[name.rpartition(".")[0]] if "." in name else self)
            for name, key in source.items():
                params[name].copy_(sd[key])
        self.tie_weights()

    def save_pretrained(self, path):
        """Write config.json + model.safetensors in transformers' layout (tied weights stored once)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        d = self.config.to_dict()
        d["architectures"] = [type(self).__name__]
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, sort_keys=True)
        tensors, seen = {}, set()
        for name, p in self.named_parameters(remove_duplicate=False):
            # tied weights once, except the MLM decoder bias: transformers 4.x reads `decoder.bias`
            # (and drops `lm_head.bias`) when it loads, so it is written under both names
            if id(p) in seen and not name.endswith("decoder.bias"):
                continue
            seen.add(id(p))
            tensors[name] = p.detach().cpu().clone()
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


class _EncoderModel(PreTrainedEncoder):
    """The encoder: embeddings -> layers -> (pooler). forward() as transformers' RobertaModel/BertModel."""

    def __init__(self, config, add_pooling_layer=True, *, backend=None, padding_free=True, _init=True):
        super().__init__()
        self.config = _as_config(config)
        self._backend = backend
        self._padding_free = bool(padding_free)
        self.embeddings = Embeddings(self.config, self._roberta)
        self.encoder = Encoder(self.config)
        self.pooler = Pooler(self.config) if add_pooling_layer else None
        if _init:  # a head initializes everything once, itself
            self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_hidden_states=False, output_attentions=False, return_dict=True,
                **kwargs):
        """input_ids int (B, S) or inputs_embeds (B, S, hidden); attention_mask (B, S) (nonzero = real
        token); token_type_ids, position_ids int (B, S). Returns EncoderOutput (last_hidden_state
        (B, S, hidden) with zeros at padded positions, pooler_output (B, hidden) or None, hidden_states,
        attentions (B, heads, S, S)), or with return_dict=False the tuple (last_hidden_state,
        pooler_output[, hidden_states][, attentions]) as transformers returns it."""
        _check_extra_kwargs(kwargs)
        last, pooled, hs, attn = encoder_forward(
            self.embeddings, self.encoder, self.pooler, self.config, roberta=self._roberta,
            backend=self._backend, padding_free=self._padding_free, input_ids=input_ids,
            attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
            inputs_embeds=inputs_embeds, output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions))
        if return_dict is False:
            return (last, pooled) + tuple(t for t in (hs, attn) if t is not None)
        return EncoderOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hs, attentions=attn)


class RobertaModel(_EncoderModel):
    """RoBERTa / XLM-R / CamemBERT encoder: position ids = padding_idx + cumsum of the non-pad mask."""

    _roberta = True


class XLMRobertaModel(RobertaModel):
    """XLM-RoBERTa: the RoBERTa architecture (its checkpoints also load through RobertaModel)."""


class BertModel(_EncoderModel):
    """BERT / MiniLM encoder: position ids 0..S-1."""

    _roberta = False


# --------------------------------------------------------------------------------------------- heads


def _head_outputs(self, kwargs):
    """Run the encoder for a head; returns (sequence_output, pooled_output, hidden_states, attentions)."""
    return_dict = kwargs.pop("return_dict", True)
    out = self.base_model(**kwargs, return_dict=True)
    return out.last_hidden_state, out.pooler_output, out.hidden_states, out.attentions, return_dict


def _finish(cls, return_dict, loss, fields_, hs, attn):
    if return_dict is False:
        out = tuple(fields_) + tuple(t for t in (hs, attn) if t is not None)
        return ((loss,) + out) if loss is not None else out
    names = [f for f in cls._fields if f not in ("loss", "hidden_states", "attentions")]
    return cls(loss=loss, hidden_states=hs, attentions=attn, **dict(zip(names, fields_)))


def _classification_loss(config, logits, labels, num_labels):
    if labels is None:
        return None
    labels = labels.to(logits.device)
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
        config.problem_type = problem
    if problem == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


def _qa_loss(start_logits, end_logits, start_positions, end_positions):
    if start_positions is None or end_positions is None:
        return None
    if start_positions.dim() > 1:
        start_positions = start_positions.squeeze(-1)
    if end_positions.dim() > 1:
        end_positions = end_positions.squeeze(-1)
    ignored = start_logits.size(1)
    start_positions = start_positions.clamp(0, ignored)
    end_positions = end_positions.clamp(0, ignored)
    return (F.cross_entropy(start_logits, start_positions, ignore_index=ignored)
            + F.cross_entropy(end_logits, end_positions, ignore_index=ignored)) / 2


def _classifier_dropout(cfg):
    return cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob


class _Head(PreTrainedEncoder):
    _encoder_cls = None
    _add_pooling_layer = False

    def __init__(self, config, *, backend=None, padding_free=True):
        super().__init__()
        self.config = _as_config(config)
        setattr(self, self.base_model_prefix,
                self._encoder_cls(self.config, add_pooling_layer=self._add_pooling_layer, backend=backend,
                                  padding_free=padding_free, _init=False))
        self._build_head()
        self.post_init()

    def _dropout(self, x, p):
        return F.dropout(x, p, training=True) if self.training and p > 0 else x


class RobertaLMHead(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x, backend=None):
        x = ops.bias_gelu(F.linear(x, self.dense.weight), self.dense.bias, "none", backend=backend)
        x = ops.layer_norm(x, self.layer_norm.weight, self.layer_norm.bias, self.layer_norm.eps, backend=backend)
        return F.linear(x, self.decoder.weight, self.decoder.bias)  # (..., vocab)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.approximate = ACTIVATIONS[cfg.hidden_act]


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x, backend=None):
        t = self.transform
        if t.approximate is None:
            x = F.relu(F.linear(x, t.dense.weight, t.dense.bias))
        else:
            x = ops.bias_gelu(F.linear(x, t.dense.weight), t.dense.bias, t.approximate, backend=backend)
        x = ops.layer_norm(x, t.LayerNorm.weight, t.LayerNorm.bias, t.LayerNorm.eps, backend=backend)
        return F.linear(x, self.decoder.weight, self.decoder.bias)  # (..., vocab)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)


class RobertaClassificationHead(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.num_labels)


class _MaskedLM(_Head):
    def _lm_head(self):
        raise NotImplementedError

    def get_output_embeddings(self):
        return self._lm_head().decoder

    def tie_weights(self):
        head = self._lm_head()
        if self.config.tie_word_embeddings:
            head.decoder.weight = self.base_model.embeddings.word_embeddings.weight
        head.decoder.bias = head.bias

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        """logits (B, S, vocab); loss: cross entropy over labels (B, S) (-100 = ignored)."""
        seq, _, hs, attn, rd = _head_outputs(self, dict(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs))
        logits = self._lm_head()(seq, backend=self.backend)  # (B, S, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.config.vocab_size), labels.to(logits.device).view(-1))
        return _finish(MaskedLMOutput, rd, loss, (logits,), hs, attn)


class RobertaForMaskedLM(_MaskedLM):
    base_model_prefix = "roberta"
    _roberta = True
    _encoder_cls = RobertaModel

    def _build_head(self):
        self.lm_head = RobertaLMHead(self.config)

    def _lm_head(self):
        return self.lm_head


class BertForMaskedLM(_MaskedLM):
    base_model_prefix = "bert"
    _encoder_cls = BertModel

    def _build_head(self):
        self.cls = BertOnlyMLMHead(self.config)

    def _lm_head(self):
        return self.cls.predictions


class RobertaForSequenceClassification(_Head):
    base_model_prefix = "roberta"
    _roberta = True
    _encoder_cls = RobertaModel

    def _build_head(self):
        self.num_labels = self.config.num_labels
        self.classifier = RobertaClassificationHead(self.config)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        """logits (B, num_labels) from the first token: dropout, dense, tanh, dropout, out_proj."""
        seq, _, hs, attn, rd = _head_outputs(self, dict(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs))
        c, p = self.classifier, _classifier_dropout(self.config)
        x = self._dropout(seq[:, 0], p)  # (B, hidden)
        x = self._dropout(torch.tanh(F.linear(x, c.dense.weight, c.dense.bias)), p)
        logits = F.linear(x, c.out_proj.weight, c.out_proj.bias)  # (B, num_labels)
        loss = _classification_loss(self.config, logits, labels, self.num_labels)
        return _finish(SequenceClassifierOutput, rd, loss, (logits,), hs, attn)


class BertForSequenceClassification(_Head):
    base_model_prefix = "bert"
    _encoder_cls = BertModel
    _add_pooling_layer = True

    def _build_head(self):
        self.num_labels = self.config.num_labels
        self.classifier = nn.Linear(self.config.hidden_size, self.config.num_labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        """logits (B, num_labels) from the pooler output (tanh(dense(first token)))."""
        _, pooled, hs, attn, rd = _head_outputs(self, dict(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs))
        x = self._dropout(pooled, _classifier_dropout(self.config))
        logits = F.linear(x, self.classifier.weight, self.classifier.bias)  # (B, num_labels)
        loss = _classification_loss(self.config, logits, labels, self.num_labels)
        return _finish(SequenceClassifierOutput, rd, loss, (logits,), hs, attn)


class _TokenClassification(_Head):
    def _build_head(self):
        self.num_labels = self.config.num_labels
        self.classifier = nn.Linear(self.config.hidden_size, self.config.num_labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        """logits (B, S, num_labels); loss: cross entropy over labels (B, S) (-100 = ignored)."""
        seq, _, hs, attn, rd = _head_outputs(self, dict(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs))
        x = self._dropout(seq, _classifier_dropout(self.config))
        logits = F.linear(x, self.classifier.weight, self.classifier.bias)  # (B, S, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.to(logits.device).view(-1))
        return _finish(TokenClassifierOutput, rd, loss, (logits,), hs, attn)


class RobertaForTokenClassification(_TokenClassification):
    base_model_prefix = "roberta"
    _roberta = True
    _encoder_cls = RobertaModel


class BertForTokenClassification(_TokenClassification):
    base_model_prefix = "bert"
    _encoder_cls = BertModel


class _QuestionAnswering(_Head):
    def _build_head(self):
        self.num_labels = self.config.num_labels
        self.qa_outputs = nn.Linear(self.config.hidden_size, self.config.num_labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, **kwargs):
        """start_logits, end_logits (B, S); loss from start_positions / end_positions (B,)."""
        seq, _, hs, attn, rd = _head_outputs(self, dict(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs))
        logits = F.linear(seq, self.qa_outputs.weight, self.qa_outputs.bias)  # (B, S, 2)
        start, end = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))  # (B, S) each
        loss = _qa_loss(start, end, start_positions, end_positions)
        return _finish(QuestionAnsweringModelOutput, rd, loss, (start, end), hs, attn)


class RobertaForQuestionAnswering(_QuestionAnswering):
    base_model_prefix = "roberta"
    _roberta = True
    _encoder_cls = RobertaModel


class BertForQuestionAnswering(_QuestionAnswering):
    base_model_prefix = "bert"
    _encoder_cls = BertModel


def count_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "EncoderConfig", "RobertaModel", "XLMRobertaModel", "BertModel", "RobertaForMaskedLM",
    "RobertaForSequenceClassification", "RobertaForTokenClassification", "RobertaForQuestionAnswering",
    "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification",
    "BertForQuestionAnswering", "pool", "encoder_forward", "EncoderOutput",
]
