"""The BERT-family encoder: its modules, each with its forward, and the whole-encoder forward.

    from roberta_fast import RobertaModel
    model = RobertaModel.from_pretrained("path/to/saved", dtype=torch.float16, device="cuda")
    out = model(input_ids, attention_mask=attention_mask)      # out.last_hidden_state (B, S, hidden)

Parameter names are transformers' (embeddings.word_embeddings.weight,
encoder.layer.0.attention.self.query.weight, ..., pooler.dense.weight), so state dicts load both ways.
The nn.Linear / nn.Embedding / nn.LayerNorm children only hold those parameters: each module's forward
calls F.linear and the fused ops of roberta_fast.ops on them, the bias of a GEMM fused into the op after
it. One Layer, on `rows` tokens (the T real tokens when packed, B*S on the padded path):

    x (rows, hidden)
      SelfAttention  QKV GEMM (one, fused weight) (rows, 3 * hidden)
                     -> attention (varlen when packed, key padding mask when padded) (rows, hidden)
      SelfOutput     out GEMM (no bias) -> layer_norm(x_bias=out bias, residual=x)       h (rows, hidden)
      Intermediate   FFN1 GEMM (no bias) -> bias_gelu                                    (rows, intermediate)
      Output         FFN2 GEMM (no bias) -> layer_norm(x_bias=FFN2 bias, residual=h)     (rows, hidden)

The fused QKV weight: in inference a concatenated copy, cached (rebuilt when a source changes); in training
(autograd recording) the query / key / value parameters lie back to back in one storage (SelfAttention.join_qkv,
at construction, .to(), to_empty(), load_state_dict, deepcopy and optimize(); each keeps its identity, name and
values, its .data a slice), and every step reads them as one view of it (_joined): no concatenation per step,
gradients land in each parameter as slices of one gradient. Parameters managed by something else (FSDP2) are
concatenated.

Training dropout (train mode, transformers' hidden_dropout_prob and attention_probs_dropout_prob): ONE
(layers * 3, 2) int64 draw of dropout keys per forward (_dropout_keys), rows handed to the ops: per layer the
attention probabilities (dropout inside ops.attention / ops.attention_varlen), the attention output and the
FFN output (layer_norm's fused bias + dropout + residual + LayerNorm). The masks are functions of the keys, so
gradient checkpointing's recompute draws the same ones. The embeddings' dropout comes after their LayerNorm
(transformers' order), which the fused op (dropout before the norm) cannot express: F.dropout, once per model.

Padding (roberta_fast.padding): a padded batch is packed once after the embedding lookup (only the ids of
real tokens are looked up), every GEMM and kernel runs on real tokens only, and the outputs are scattered back
once at the end. The padded positions of last_hidden_state and of every hidden_states entry are ZEROS
(transformers leaves whatever its layers computed there); `padding_free=False` runs the padded layout with
ops.attention(key_padding_mask=...) and zeroes the padded positions the same way: both paths return identical
tensors. The pooler reads position 0 as transformers does (a left-padded row gives tanh(pooler bias) there).

Unfused attention: output_attentions=True computes q k^T, ops.masked_softmax and probs @ v (in train mode with
F.dropout on the probabilities), and returns the probabilities (B, heads, S, S) (after dropout, as transformers
does; padded query rows are zeros). Eval has no dropout anywhere.

Each forward synchronizes with the device once (model/checks.py): the input range checks and the mask
statistics (real token count, longest sequence) are read back together, after which cuda_graphs=True replays
a graph of the packed batch's bucket (model/graphs.py); no sync under the caller's CUDA graph capture or
torch.compile, where the batch takes the padded path with the mask (fixed shapes, one graph).
Autocast and gradient checkpointing: see the package docstring (roberta_fast/model/__init__.py).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends import GPU_DEVICE_TYPES, BackendUnavailableError
from ..ops import trusted as ops  # the model checks its inputs once per forward (docs/host_path.md)
from ..ops.linear import bind_inference as bind_linear
from ..ops.linear import choice as linear_choice
from ..ops.linear import linear
from ..padding import Layout
from . import graphs
from .checks import check_extra_kwargs, check_inputs, output_flags
from .config import ACTIVATIONS, EncoderConfig, as_config
from .outputs import EncoderOutput
from .pretrained import PreTrainedEncoder

# the attention ops take dropout_p / rng (the fused dropout); without it, dropout runs the unfused path
_FUSED_ATTENTION_DROPOUT = "dropout_p" in inspect.signature(ops.attention).parameters
_EPILOGUE_BACKENDS = ("triton", "cublaslt")  # ops.linear's backends that fuse the epilogue into the GEMM
_GELU = {"none": "gelu", "tanh": "gelu_tanh"}  # bias_gelu's approximate -> ops.linear's activation


def _epilogue_backend(x, weight, bias, activation, residual, backend):
    """The backend of ops.linear for this GEMM when the layer should take it (docs/tuning.md), else None: the layer
    then runs the GEMM without bias + its fused elementwise kernels (bias_gelu; bias + residual inside layer_norm),
    the automatic choice on GPUs until one has been tuned.
    - "triton", "cublaslt": the GEMM fuses the epilogue (one kernel instead of two).
    - "torch" (F.linear with the bias inside the addmm, then GELU / the residual add in place) where the elementwise
      ops run on plain PyTorch too: the model's backend="torch", or the automatic choice on CPU tensors. There the
      bias-in-the-GEMM form saves the separate bias passes of the reference ops (docs/cpu_path.md).
    backend: the model's (None, or one name for every op): "cuda" keeps the CUDA C++ elementwise kernels (there is
    no CUDA C++ GEMM). Never under autocast (the GEMMs' dtype is autocast's there) nor with float32 parameters on
    half activations."""
    if backend == "cuda" or weight.dtype != x.dtype or (residual is not None and residual.dtype != x.dtype):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    try:
        b = linear_choice(x, weight, bias, activation=activation, residual=residual, backend=backend)
    except (ValueError, BackendUnavailableError):  # e.g. ROBERTA_FAST_BACKEND=cuda: no CUDA C++ GEMM
        return None
    if b in _EPILOGUE_BACKENDS:
        return b
    if b == "torch" and (backend == "torch" or (backend is None and _elementwise_on_torch(x.device))):
        return b
    return None


def _elementwise_on_torch(device) -> bool:
    """Whether the automatic choice runs the elementwise ops on plain PyTorch for this device: not a GPU device
    and no ROBERTA_FAST_BACKEND naming a kernel backend (e.g. triton under the interpreter in tests)."""
    if device.type in GPU_DEVICE_TYPES:
        return False
    env = os.environ.get("ROBERTA_FAST_BACKEND", "").strip().lower()
    return env in ("", "auto", "torch")


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
        """ids, positions, types: int (rows,) (types may be None = all type 0); inputs_embeds (rows, hidden)
        or None in place of ids. Returns (rows, hidden)."""
        word, pos, tt, ln = self.word_embeddings, self.position_embeddings, self.token_type_embeddings, self.LayerNorm
        if inputs_embeds is None:
            x = word(ids)  # (rows, hidden); called as a module: its forward hooks run (transformers' contract)
        else:
            x = inputs_embeds.to(word.weight.dtype)
        residual = F.embedding(positions, pos.weight, pos.padding_idx)  # (rows, hidden)
        x_bias = None
        if types is None:
            x_bias = tt.weight[0]  # (hidden,): every token has type 0
        else:
            residual = residual + F.embedding(types, tt.weight)
        h = ops.layer_norm(x, ln.weight, ln.bias, ln.eps, residual=residual, x_bias=x_bias, backend=backend)
        if self.training and self.dropout_p > 0:
            h = F.dropout(h, self.dropout_p, training=True)
        return h


class SelfAttention(nn.Module):
    """query, key, value projections run as one GEMM with a cached fused weight, then attention."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        H = cfg.hidden_size
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.dropout_p = cfg.attention_probs_dropout_prob
        # opt-in LSH attention (config attention="lsh"): (bucket_size, num_hashes), else None (exact attention)
        self.lsh = (cfg.lsh_bucket_size, cfg.lsh_num_hashes) if cfg.attention == "lsh" else None
        self._qkv_cache = None
        self._qkv_static = None  # set by model/graphs.py while a graph forward runs: the fused copies it owns
        self.join_qkv()
        self.register_load_state_dict_post_hook(_rejoin_after_load)  # load_state_dict(assign=True): new tensors

    def forward(self, x, layout: Layout, *, need_probs=False, backend=None, rng=None):
        """x (rows, hidden) -> context (rows, hidden), probabilities (B, heads, S, S) or None. rng: the (2,) int64
        key of the probabilities' dropout (train mode with dropout; else None)."""
        w, b = self.qkv_weight_bias()  # (3 * hidden, hidden), (3 * hidden,)
        qkv = F.linear(x, w, b)  # (rows, 3 * hidden)
        q, k, v = qkv.view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)  # (rows, heads, head_dim)
        if getattr(self, "lsh", None) is not None:  # no probabilities to return, no dropout on them
            if need_probs:
                raise ValueError("output_attentions is not available with attention='lsh' (LSH attention never "
                                 "forms the S x S probabilities); use attention='full' to inspect them")
            return self._lsh(q, k, v, layout, backend).reshape(x.shape[0], w.shape[1]), None  # (rows, hidden)
        dropout_p = self.dropout_p if self.training else 0.0
        if need_probs or (dropout_p > 0 and not _FUSED_ATTENTION_DROPOUT):
            ctx, probs = self._unfused(q, k, v, layout, dropout_p, backend)
        else:
            ctx, probs = self._fused(q, k, v, layout, backend, dropout_p, rng), None
        return ctx.reshape(x.shape[0], w.shape[1]), (probs if need_probs else None)  # (rows, hidden)

    def _fused(self, q, k, v, layout: Layout, backend, dropout_p=0.0, rng=None):
        """ops.attention_varlen on packed rows, else ops.attention with the key padding mask; autocast off.
        Dropout on the probabilities inside the kernels when dropout_p > 0."""
        drop = {"dropout_p": dropout_p, "rng": rng} if dropout_p > 0 else {}
        with _no_autocast(q):
            if layout.is_packed:
                return ops.attention_varlen(q, k, v, layout.cu_seqlens, layout.max_seqlen, backend=backend,
                                            **drop)  # (T, heads, head_dim)
            q, k, v = (t.view(layout.batch, layout.seqlen, *t.shape[1:]) for t in (q, k, v))  # (B, S, heads, d)
            return ops.attention(q, k, v, key_padding_mask=layout.mask, backend=backend, **drop)  # (B, S, heads, d)

    def _lsh(self, q, k, v, layout: Layout, backend):
        """ops.lsh_attention_varlen on packed rows, else ops.lsh_attention with the key padding mask (separate
        query and key projections, seed 0 in every layer: deterministic); autocast off."""
        from ..ops.lsh_attention import lsh_attention, lsh_attention_varlen  # the checked ops (opt-in path)

        bucket_size, num_hashes = self.lsh
        kw = {"bucket_size": bucket_size, "num_hashes": num_hashes, "backend": backend}
        with _no_autocast(q):
            if layout.is_packed:
                return lsh_attention_varlen(q, k, v, layout.cu_seqlens, int(layout.max_seqlen), **kw)
            q, k, v = (t.view(layout.batch, layout.seqlen, *t.shape[1:]) for t in (q, k, v))  # (B, S, heads, d)
            return lsh_attention(q, k, v, key_padding_mask=layout.mask, **kw)  # (B, S, heads, d)

    def _unfused(self, q, k, v, layout: Layout, dropout_p, backend):
        """The (B, heads, S, S) probabilities materialized through ops.masked_softmax."""
        q, k, v = (layout.to_padded(t).transpose(1, 2) for t in (q, k, v))  # (B, heads, S, head_dim)
        scores = torch.matmul(q, k.transpose(-1, -2))  # (B, heads, S, S)
        mask = None
        if layout.mask is not None:  # keep real keys of real queries; padded query rows come out as zeros
            mask = layout.mask[:, None, None, :] & layout.mask[:, None, :, None]  # (B, 1, S, S)
        probs = ops.masked_softmax(scores, mask, self.head_dim ** -0.5, backend=backend)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p, training=True)
        ctx = torch.matmul(probs, v).transpose(1, 2)  # (B, S, heads, head_dim)
        return layout.to_rows(ctx), probs  # (rows, heads, head_dim)

    def qkv_weight_bias(self):
        """(3*hidden, hidden) weight and (3*hidden,) bias of the fused QKV GEMM.

        Under torch.compile they are built with torch.cat. When autograd records (grad mode on and a projection
        parameter requires grad) they are one view of the parameters when join_qkv put them in one storage
        (_joined: no copy per step; gradients reach query/key/value), else torch.cat. Otherwise they are built
        once and cached, keyed on the six source tensors' data_ptr and _version (an in-place update,
        load_state_dict, .to() or a new tensor rebuilds them); the cache keeps the sources alive, so a freed
        address cannot be reused by a different tensor under the same key.
        """
        if self._qkv_static is not None:
            return self._qkv_static
        srcs = self.qkv_sources()
        if torch.compiler.is_compiling():
            return torch.cat(srcs[:3]), torch.cat(srcs[3:])
        if torch.is_grad_enabled() and any(t.requires_grad for t in srcs):  # training: no copy per step
            return _joined(srcs[:3]), _joined(srcs[3:])
        ptrs = (srcs[0].data_ptr(), srcs[1].data_ptr(), srcs[2].data_ptr(), srcs[3].data_ptr(), srcs[4].data_ptr(),
                srcs[5].data_ptr())
        view = self.__dict__.get("_qkv_view")
        if view is not None and view[0] == ptrs:
            return view[1], view[2]
        if _adjacent(srcs[:3]) and _adjacent(srcs[3:]):  # joined (join_qkv): views of the parameters, never stale
            with torch.inference_mode(False), torch.no_grad():
                w, b = _view_joined(srcs[:3]), _view_joined(srcs[3:])
            self.__dict__["_qkv_view"] = (ptrs, w, b)
            return w, b
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in srcs)
        key += (torch.is_inference_mode_enabled(),)
        cache = self._qkv_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, torch.cat(srcs[:3]), torch.cat(srcs[3:]), tuple(t.detach() for t in srcs))
            self._qkv_cache = cache
        return cache[1], cache[2]

    def qkv_sources(self):
        """query, key, value weights, then their biases."""
        return self.query.weight, self.key.weight, self.value.weight, self.query.bias, self.key.bias, self.value.bias

    def _apply(self, fn, *args, **kwargs):
        self._qkv_cache = None  # .to() / .half() / .cuda(): drop the stale copy now, not at the next forward
        self.__dict__.pop("_qkv_view", None)
        graphs.structure_changed()  # parameters may be new objects: graph caches look again
        out = super()._apply(fn, *args, **kwargs)
        self.join_qkv()  # .to() / to_empty() gave each parameter its own storage: join them again
        return out

    def __setstate__(self, state):
        super().__setstate__(state)
        self.join_qkv()  # copy.deepcopy / unpickling copied each parameter on its own: join them again

    def join_qkv(self):
        """Move the query / key / value weights (and biases) into one storage, back to back, so that training
        reads them as one view (_joined) instead of concatenating per step. Each parameter keeps its identity,
        name and values (its .data becomes a slice). Done here (construction, .to(), to_empty(), load_state_dict,
        roberta_fast.optimize), never in a forward: parameters that are not plain standalone tensors (meta, a
        slice of someone else's buffer, DTensors or FSDP2's unsharded parameters swapped in around a forward)
        are left alone and the forward concatenates them."""
        srcs = self.qkv_sources()
        for ts in (srcs[:3], srcs[3:]):
            if _adjacent(ts) or not _joinable(ts):
                continue
            with torch.no_grad():
                buf = torch.cat([t.detach() for t in ts])
                for t, part in zip(ts, buf.split([t.shape[0] for t in ts])):
                    t.data = part


class _DenseAddNorm(nn.Module):
    """LayerNorm(dropout(x @ W^T + b) + residual): the GEMM without bias, the bias fused into the norm."""

    def __init__(self, cfg: EncoderConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout_p = cfg.hidden_dropout_prob

    def forward(self, x, residual, *, backend=None, rng=None):
        """x (rows, in_features), residual (rows, hidden) -> (rows, hidden) in the residual's dtype. Under
        autocast the GEMM output has the autocast dtype and the residual stream stays float32 (as in
        transformers): layer_norm takes both (out_dtype=float32). In train mode the dropout between the bias
        and the residual is the op's (rng: its (2,) int64 key, one row of the forward's draw; None draws one)."""
        dense, ln, out = self.dense, self.LayerNorm, residual.dtype
        if not (self.training and self.dropout_p > 0):  # GEMM + bias + residual in one kernel, then the norm
            eb = _epilogue_backend(x, dense.weight, dense.bias, None, residual, backend)
            if eb is not None:
                y = linear(x, dense.weight, dense.bias, residual=residual, backend=eb)  # (rows, hidden)
                return ops.layer_norm(y, ln.weight, ln.bias, ln.eps, out_dtype=out, backend=backend)
        y = F.linear(x, dense.weight)  # (rows, hidden)
        if self.training and self.dropout_p > 0:  # LN(dropout(y + bias) + residual), one fused op
            return ops.layer_norm(y, ln.weight, ln.bias, ln.eps, residual=residual, x_bias=dense.bias, out_dtype=out,
                                  backend=backend, dropout_p=self.dropout_p, rng=rng)
        return ops.layer_norm(y, ln.weight, ln.bias, ln.eps, residual=residual, x_bias=dense.bias, out_dtype=out,
                              backend=backend)


class SelfOutput(_DenseAddNorm):
    """Attention output GEMM + fused bias, residual and LayerNorm."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg, cfg.hidden_size)


class Output(_DenseAddNorm):
    """FFN2 GEMM + fused bias, residual and LayerNorm."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg, cfg.intermediate_size)


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = SelfOutput(cfg)

    def forward(self, x, layout: Layout, *, need_probs=False, backend=None, rng=None):
        """x (rows, hidden) -> (rows, hidden), probabilities (B, heads, S, S) or None. rng: None, or the layer's
        (3, 2) int64 dropout keys (rows 0 and 1 used here)."""
        ctx, probs = self.self(x, layout, need_probs=need_probs, backend=backend,
                               rng=None if rng is None else rng[0])  # (rows, hidden)
        return self.output(ctx, x, backend=backend, rng=None if rng is None else rng[1]), probs


class Intermediate(nn.Module):
    """FFN1 GEMM + fused bias and GELU: one ops.linear with the epilogue where its backend fuses it (_epilogue_backend),
    else the GEMM then bias_gelu (ReLU: plain torch)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.approximate = ACTIVATIONS[cfg.hidden_act]

    def forward(self, h, *, backend=None):
        """h (rows, hidden) -> (rows, intermediate)."""
        if self.approximate is None:
            return F.relu(F.linear(h, self.dense.weight, self.dense.bias))
        w, b = self.dense.weight, self.dense.bias
        eb = _epilogue_backend(h, w, b, _GELU[self.approximate], None, backend)
        if eb is not None:
            return linear(h, w, b, activation=_GELU[self.approximate], backend=eb)
        return ops.bias_gelu(F.linear(h, w), b, self.approximate, backend=backend)


class Layer(nn.Module):
    # transformers' switches, set by gradient_checkpointing_enable(); read by Encoder.forward
    gradient_checkpointing = False
    _gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)

    def forward(self, x, layout: Layout, need_probs=False, backend=None, rng=None):
        """x (rows, hidden) -> (rows, hidden), probabilities (B, heads, S, S) or None. rng: None, or (3, 2) int64
        dropout keys (attention probabilities, attention output, FFN output): a recomputation under gradient
        checkpointing gets the same rows, so it draws the same masks."""
        h, probs = self.attention(x, layout, need_probs=need_probs, backend=backend, rng=rng)  # (rows, hidden)
        inter = self.intermediate(h, backend=backend)  # (rows, intermediate)
        return self.output(inter, h, backend=backend, rng=None if rng is None else rng[2]), probs  # (rows, hidden)


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, h, layout: Layout, *, output_hidden_states=False, output_attentions=False, backend=None):
        """h (rows, hidden) -> (rows, hidden); the layers' inputs and last output [(rows, hidden)] or None;
        their probabilities [(B, heads, S, S)] or None."""
        hidden = [h] if output_hidden_states else None
        probs = [] if output_attentions else None
        plan = None if output_attentions else self._inference_plan()
        if plan is not None:  # inference: the layers' math without their module calls (_inference_layers)
            return _inference_layers(plan, h, layout, backend, hidden), hidden, probs
        rng = _dropout_keys(self.layer, h.device)  # (layers * 3, 2) int64 or None: one draw per forward
        for i, layer in enumerate(self.layer):
            r = None if rng is None else rng[3 * i: 3 * i + 3]  # (3, 2)
            if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():  # recompute in backward
                h, p = layer._gradient_checkpointing_func(layer.__call__, h, layout, output_attentions, backend, r)
            else:
                h, p = layer(h, layout, output_attentions, backend, r)  # (rows, hidden)
            if hidden is not None:
                hidden.append(h)
            if probs is not None:
                probs.append(p)
        return h, hidden, probs


    def _inference_plan(self):
        """Per layer, the modules the inference path reads (_inference_layers), when this forward may skip the
        module calls: no autograd recording, not under torch.compile, every layer made of exactly our modules, in
        eval mode, without forward hooks (global or on any of them). Else None (the module path). The module
        lists are cached and looked up again when a parameter or submodule is registered anywhere (the
        registration hooks of model/graphs.py); parameters are read from the modules at every call."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1]:
            return None
        cached = self.__dict__.get("_plan_cache")
        if cached is None or cached[0] != graphs.generation():
            graphs.install_hooks()
            cached = (graphs.generation(), _plan(self.layer))
            self.__dict__["_plan_cache"] = cached
        plan = cached[1]
        if plan is None:
            return None
        for m in plan[1]:  # every module of every layer
            if m.training or m._forward_hooks or m._forward_pre_hooks:
                return None
        return plan[0]


def _plan(layers):
    """([per layer: (self-attention, attention-output dense, its LayerNorm, intermediate dense, approximate,
    output dense, its LayerNorm)], every module of the layers), or None when a layer holds another module type."""
    plan, mods = [], []
    for layer in layers:
        if type(layer) is not Layer:
            return None
        att, inter, out = (layer._modules.get(n) for n in ("attention", "intermediate", "output"))
        sa, so = (att._modules.get(n) for n in ("self", "output")) if type(att) is Attention else (None, None)
        if (type(sa) is not SelfAttention or type(so) is not SelfOutput or type(inter) is not Intermediate
                or type(out) is not Output or getattr(sa, "lsh", None) is not None):  # lsh: the module path
            return None
        subs = (so.dense, so.LayerNorm, inter.dense, out.dense, out.LayerNorm)
        if any(type(m) not in (nn.Linear, nn.LayerNorm) for m in subs):
            return None
        plan.append((sa, so.dense, so.LayerNorm, inter.dense, inter.approximate, out.dense, out.LayerNorm))
        mods += [layer, att, sa, so, inter, out, *subs]
    return plan, tuple(mods)


_GLOBAL_HOOKS = (torch.nn.modules.module._global_forward_hooks, torch.nn.modules.module._global_forward_pre_hooks)


def _inference_layers(plan, h, layout: Layout, backend, hidden):
    """The encoder's layers in inference, the same math and ops as Layer.forward in eval mode (identical results)
    without the nn.Module calls: each module's parameters read from its _parameters, and every fused op bound
    once for the forward (ops.trusted.bind_*: the backend chosen once, its kernel called directly; None where
    the op must take its entry point, e.g. the torch backend). hidden: a list that gets every layer's output,
    or None. Returns the last output (rows, hidden)."""
    rows = h.shape[0]
    attn_fn = ln_fn = ln_plain = gelu_fn = bound = None
    eb_o = eb_f1 = eb_f2 = None  # ops.linear's backend where the GEMM fuses its epilogue (_epilogue_backend)
    lin_o = lin_f1 = lin_f2 = None  # and its bound inference function (None: the public op)
    packed = layout.is_packed
    for sa, o_dense, ln1, f1, approximate, f2, ln2 in plan:
        w, b = sa.qkv_weight_bias()  # (3 * hidden, hidden), (3 * hidden,)
        heads, head_dim = sa.num_heads, sa.head_dim
        q, k, v = F.linear(h, w, b).view(rows, 3, heads, head_dim).unbind(1)  # (rows, heads, head_dim)
        if packed:
            if bound is None:
                attn_fn = ops.bind_attention_varlen(q, k, v, layout.cu_seqlens, layout.max_seqlen, backend)
            ctx = (attn_fn(q, k, v, layout.cu_seqlens, layout.max_seqlen, head_dim ** -0.5) if attn_fn is not None
                   else sa._fused(q, k, v, layout, backend))  # (rows, heads, head_dim)
        else:
            qp, kp, vp = (t.view(layout.batch, layout.seqlen, heads, head_dim) for t in (q, k, v))
            if bound is None:
                attn_fn = ops.bind_attention(qp, kp, vp, layout.mask, backend)
            ctx = (attn_fn(qp, kp, vp, layout.mask, head_dim ** -0.5) if attn_fn is not None
                   else sa._fused(q, k, v, layout, backend))  # (B, S, heads, head_dim)
        p, lp = o_dense._parameters, ln1._parameters
        ctx = ctx.reshape(rows, heads * head_dim)
        if bound is None:
            eb_o = _epilogue_backend(ctx, p["weight"], p["bias"], None, h, backend)
            lin_o = eb_o and bind_linear(ctx, p["weight"], p["bias"], None, h, eb_o)
        if eb_o is not None:  # GEMM + bias + residual in one kernel, then the norm alone
            y = (lin_o(ctx, p["weight"], p["bias"], h) if lin_o is not None
                 else linear(ctx, p["weight"], p["bias"], residual=h, backend=eb_o))  # (rows, hidden)
            if bound is None:
                ln_plain = ops.bind_layer_norm(y, lp["weight"], lp["bias"], None, None, backend)
            a = _norm(ln1, y, None, None, ln_plain, backend)
        else:
            y = F.linear(ctx, p["weight"])  # (rows, hidden)
            if bound is None:
                ln_fn = ops.bind_layer_norm(y, lp["weight"], lp["bias"], h, p["bias"], backend)
            a = _norm(ln1, y, h, p["bias"], ln_fn, backend)
        p = f1._parameters
        if approximate is None:  # ReLU
            inter = F.relu(F.linear(a, p["weight"], p["bias"]))
        else:
            if bound is None:
                eb_f1 = _epilogue_backend(a, p["weight"], p["bias"], _GELU[approximate], None, backend)
                lin_f1 = eb_f1 and bind_linear(a, p["weight"], p["bias"], _GELU[approximate], None, eb_f1)
            if eb_f1 is not None:  # GEMM + bias + GELU in one kernel: the intermediate written once
                inter = (lin_f1(a, p["weight"], p["bias"], None) if lin_f1 is not None
                         else linear(a, p["weight"], p["bias"], activation=_GELU[approximate], backend=eb_f1))
            else:
                y = F.linear(a, p["weight"])  # (rows, intermediate)
                if bound is None:
                    gelu_fn = ops.bind_bias_gelu(y, p["bias"], approximate, backend)
                inter = (gelu_fn(y, p["bias"], approximate) if gelu_fn is not None
                         else ops.bias_gelu(y, p["bias"], approximate, backend=backend))
        p, lp = f2._parameters, ln2._parameters
        if bound is None:
            eb_f2 = _epilogue_backend(inter, p["weight"], p["bias"], None, a, backend)
            lin_f2 = eb_f2 and bind_linear(inter, p["weight"], p["bias"], None, a, eb_f2)
        if eb_f2 is not None:
            y = (lin_f2(inter, p["weight"], p["bias"], a) if lin_f2 is not None
                 else linear(inter, p["weight"], p["bias"], residual=a, backend=eb_f2))  # (rows, hidden)
            if ln_plain is None and bound is None:
                ln_plain = ops.bind_layer_norm(y, lp["weight"], lp["bias"], None, None, backend)
            h = _norm(ln2, y, None, None, ln_plain, backend)
        else:
            y = F.linear(inter, p["weight"])  # (rows, hidden)
            if ln_fn is None and bound is None:
                ln_fn = ops.bind_layer_norm(y, lp["weight"], lp["bias"], a, p["bias"], backend)
            h = _norm(ln2, y, a, p["bias"], ln_fn, backend)
        bound = True
        if hidden is not None:
            hidden.append(h)
    return h


def _norm(ln, y, residual, x_bias, bound_fn, backend):
    """LayerNorm(y [+ x_bias] [+ residual]) with ln's parameters, in the residual's dtype (float32 under autocast)
    or y's: through the bound function when there is one."""
    lp = ln._parameters
    if bound_fn is not None:
        return bound_fn(y, lp["weight"], lp["bias"], ln.eps, residual, x_bias)
    out = y.dtype if residual is None else residual.dtype
    return ops.layer_norm(y, lp["weight"], lp["bias"], ln.eps, residual=residual, x_bias=x_bias, out_dtype=out,
                          backend=backend)


class Pooler(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden):
        """hidden (B, S, hidden) -> tanh(dense(first token)) (B, hidden); S = 0 reads a zero state."""
        first = hidden[:, 0] if hidden.shape[1] else hidden.new_zeros(hidden.shape[0], hidden.shape[2])
        return torch.tanh(F.linear(first, self.dense.weight, self.dense.bias))


def _dropout_keys(layers, device):
    """(len(layers) * 3, 2) int64 (seed, offset) keys of the fused dropouts (per layer: attention probabilities,
    attention output, FFN output), drawn from torch's default generator of `device` in ONE launch, when a layer
    is in train mode with dropout; else None."""
    if not any(m.training and (m.output.dropout_p > 0 or m.attention.self.dropout_p > 0) for m in layers):
        return None
    return torch.randint(-2**63, 2**63 - 1, (len(layers) * 3, 2), dtype=torch.int64, device=device)


def _rejoin_after_load(module, _incompatible_keys):
    module.join_qkv()


def _joinable(ts) -> bool:
    """Plain tensors of one dtype and device (not meta), each the whole of its own storage: safe to move."""
    t0 = ts[0]
    for t in ts:
        if type(t.detach()) is not torch.Tensor or t.is_meta or t.dtype != t0.dtype or t.device != t0.device or \
                t.shape[1:] != t0.shape[1:] or t.storage_offset() != 0 or not t.is_contiguous() or \
                t.untyped_storage().nbytes() != t.numel() * t.element_size():
            return False
    return True


def _adjacent(ts) -> bool:
    """ts are consecutive contiguous blocks of one storage, in order (what _joined made)."""
    t0 = ts[0]
    if any(type(t.detach()) is not torch.Tensor or t.is_meta for t in ts) or not t0.is_contiguous():
        return False  # DTensors (FSDP2's sharded parameters), meta tensors: no storage of their own to look at
    end = t0.storage_offset() + t0.numel()
    ptr = t0.untyped_storage().data_ptr()
    for t in ts[1:]:
        if (t.untyped_storage().data_ptr() != ptr or t.storage_offset() != end or not t.is_contiguous()
                or t.dtype != t0.dtype or t.shape[1:] != t0.shape[1:]):
            return False
        end += t.numel()
    return True


def _view_joined(ts):
    """The concatenation of tensors that lie back to back in one storage (_adjacent), as one view of it."""
    t0 = ts[0]
    shape = (sum(t.shape[0] for t in ts), *t0.shape[1:])
    return t0.detach().as_strided(shape, t0.stride(), t0.storage_offset())


class _Join(torch.autograd.Function):
    """The concatenation of parameters that already lie back to back in one storage, as a view (no copy);
    the backward hands each its slice of the gradient (views too)."""

    @staticmethod
    def forward(ctx, *ts):
        ctx.sizes = [t.shape[0] for t in ts]
        return _view_joined(ts)

    @staticmethod
    def backward(ctx, g):
        return g.split(ctx.sizes)


def _joined(ts):
    """torch.cat(ts) for the training forward without a copy per step: a view of the parameters when they lie
    back to back in one storage (SelfAttention.join_qkv put them there), else torch.cat. Never moves them."""
    return _Join.apply(*ts) if _adjacent(ts) else torch.cat(ts)


def _no_autocast(x):
    """Autocast off for a fused op whose inputs already have the autocast dtype (else nothing to do)."""
    device = x.device.type
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


def encoder_forward(embeddings, encoder, pooler, cfg: EncoderConfig, *, roberta: bool, backend=None,
                    padding_free=True, input_ids=None, attention_mask=None, token_type_ids=None,
                    position_ids=None, inputs_embeds=None, output_hidden_states=False, output_attentions=False,
                    graph_cache=None):
    """The whole encoder on modules with transformers' names (ours, or a transformers model's after
    roberta_fast.optimize: our embeddings and encoder, its own pooler). Inputs as in _EncoderModel.forward.
    Returns (last_hidden_state, pooler_output, hidden_states, attentions); under autocast all but the pooler
    output in float32, as transformers' LayerNorm and softmax give them. graph_cache: model/graphs.py's."""
    inputs = check_inputs(cfg, roberta=roberta, input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
    layout = inputs.layout(padding_free)  # the one host sync: pack the real tokens, or keep the padded layout
    last = None if graph_cache is None else graph_cache.run(embeddings, encoder, inputs, layout, backend,
                                                            output_hidden_states or output_attentions)
    if last is not None:  # the bucket's CUDA graph replayed: (B, S, hidden), a new tensor
        return last, (pooler(last) if pooler is not None else None), None, None
    rows = (layout.to_rows(t) for t in (inputs.input_ids, inputs.position_ids, inputs.token_type_ids,
                                        inputs.inputs_embeds))
    h = embeddings(*rows, backend=backend)  # (rows, hidden)
    h, hidden, probs = encoder(h, layout, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions, backend=backend)
    out_dtype = torch.float32 if torch.is_autocast_enabled(h.device.type) else h.dtype
    last = layout.to_padded(h).to(out_dtype)  # (B, S, hidden), zeros at padding: repadded once
    if hidden is not None:
        hidden = tuple(layout.to_padded(t).to(out_dtype) for t in hidden[:-1]) + (last,)
    pooled = pooler(last) if pooler is not None else None  # (B, hidden)
    return last, pooled, hidden, (tuple(p.to(out_dtype) for p in probs) if probs is not None else None)


class _EncoderModel(PreTrainedEncoder):
    """The encoder: embeddings -> layers -> (pooler). forward() as transformers' RobertaModel/BertModel."""

    def __init__(self, config, add_pooling_layer=True, *, backend=None, padding_free=True, cuda_graphs=False,
                 _init=True):
        super().__init__()
        self.config = as_config(config)
        self._backend = backend
        self._padding_free = bool(padding_free)
        self._cuda_graph_cache = graphs.make_cache(cuda_graphs)
        self.embeddings = Embeddings(self.config, self._roberta)
        self.encoder = Encoder(self.config)
        self.pooler = Pooler(self.config) if add_pooling_layer else None
        if _init:  # a head initializes everything once, itself
            self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_hidden_states=None, output_attentions=None, return_dict=None,
                **kwargs):
        """input_ids int (B, S) or inputs_embeds (B, S, hidden); attention_mask (B, S) (nonzero = real token);
        token_type_ids, position_ids int (B, S); flags default to the config's. Returns EncoderOutput (zeros at
        padded positions; cross_attentions () with attentions, as transformers 5), or with return_dict=False
        its to_tuple() (None fields skipped), as transformers does."""
        check_extra_kwargs(kwargs)
        attentions, hidden_states, return_dict = output_flags(self.config, output_attentions, output_hidden_states,
                                                              return_dict)
        last, pooled, hs, attn = encoder_forward(
            self.embeddings, self.encoder, self.pooler, self.config, roberta=self._roberta, backend=self._backend,
            padding_free=self._padding_free, input_ids=input_ids, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds,
            output_hidden_states=hidden_states, output_attentions=attentions, graph_cache=self._cuda_graph_cache)
        out = EncoderOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hs, attentions=attn,
                            cross_attentions=() if attentions else None)
        return out if return_dict else out.to_tuple()


class RobertaModel(_EncoderModel):
    """RoBERTa / XLM-R / CamemBERT encoder: position ids = padding_idx + cumsum of the non-pad mask."""

    _roberta = True


class XLMRobertaModel(RobertaModel):
    """XLM-RoBERTa: the RoBERTa architecture (its checkpoints also load through RobertaModel)."""


class BertModel(_EncoderModel):
    """BERT / MiniLM encoder: position ids 0..S-1."""

    _roberta = False

