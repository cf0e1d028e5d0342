"""attention and attention_varlen: non-causal softmax(scale * q k^T) v per head, for encoders.

Kernel backends run behind torch.library custom ops (roberta_fast::attention_fwd / _bwd and
roberta_fast::attention_varlen_fwd / _bwd) with fake implementations and autograd, so torch.compile
and CUDA graphs see opaque ops. q, k, v reach the kernels as they are (any strides with a unit last
stride), so views into one fused QKV projection cost no copy. The backward runs on the forward's
backend. Which head dims and dtypes a kernel backend takes is its module's `unsupported`.

Dropout (dropout_p > 0) is applied to the normalized probabilities inside the kernels (FlashAttention's
semantics: lse of the undropped scores, O = dropout(P) V, kept elements scaled by 1 / (1 - dropout_p)). The
mask is a deterministic function of the rng tensor (seed, offset), read on the device, and of the element's
position; the backward regenerates it from the saved rng (no mask is stored). Each backend has its own
position indexing: masks agree between a backend's forward and backward, not across backends.
"""

import operator

import torch

from .. import backends, reference
from .._utils import dtype_name, unit_last_stride
from ..tuned import round_log2
from ._checks import (
    NONE,
    InferenceCache,
    bindable,
    check_same_device,
    check_shape,
    check_tensor,
    compiling,
    direct_call_ok,
    grad_on,
    modes,
    train_mode,
    values_readable,
)

_OP = "attention"
_OPV = "attention_varlen"


def _kernel(backend):
    return backends.implementation(backend, _OP)


# ------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op(
    "roberta_fast::attention_fwd", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale, str backend, "
           "float dropout_p=0., Tensor? rng=None) -> (Tensor, Tensor)",
)
def _fwd(q, k, v, key_padding_mask, scale, backend, dropout_p=0.0, rng=None):
    return _kernel(backend).forward(q, k, v, key_padding_mask, None, None, scale, dropout_p, rng)


@_fwd.register_fake
def _fwd_fake(q, k, v, key_padding_mask, scale, backend, dropout_p=0.0, rng=None):
    B, S, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, S), dtype=torch.float32)


@torch.library.custom_op(
    "roberta_fast::attention_bwd", mutates_args=(),
    schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? key_padding_mask, "
           "float scale, str backend, float dropout_p=0., Tensor? rng=None) -> (Tensor, Tensor, Tensor)",
)
def _bwd(do, q, k, v, o, lse, key_padding_mask, scale, backend, dropout_p=0.0, rng=None):
    if backend == "torch":
        return _reference_grads(do, q, k, v, lambda a, b, c: reference.attention(
            a, b, c, key_padding_mask, scale, dropout_p, rng))
    return _kernel(backend).backward(do, q, k, v, o, lse, key_padding_mask, None, None, scale, dropout_p, rng)


@_bwd.register_fake
def _bwd_fake(do, q, k, v, o, lse, key_padding_mask, scale, backend, dropout_p=0.0, rng=None):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


@torch.library.custom_op(
    "roberta_fast::attention_varlen_fwd", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, float scale, str backend, "
           "float dropout_p=0., Tensor? rng=None) -> (Tensor, Tensor)",
)
def _vfwd(q, k, v, cu_seqlens, max_seqlen, scale, backend, dropout_p=0.0, rng=None):
    return _kernel(backend).forward(q, k, v, None, cu_seqlens, max_seqlen, scale, dropout_p, rng)


@_vfwd.register_fake
def _vfwd_fake(q, k, v, cu_seqlens, max_seqlen, scale, backend, dropout_p=0.0, rng=None):
    T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op(
    "roberta_fast::attention_varlen_bwd", mutates_args=(),
    schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor cu_seqlens, "
           "SymInt max_seqlen, float scale, str backend, float dropout_p=0., Tensor? rng=None) "
           "-> (Tensor, Tensor, Tensor)",
)
def _vbwd(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale, backend, dropout_p=0.0, rng=None):
    if backend == "torch":
        return _reference_grads(do, q, k, v, lambda a, b, c: reference.attention_varlen(
            a, b, c, cu_seqlens, max_seqlen, scale, dropout_p, rng))
    return _kernel(backend).backward(do, q, k, v, o, lse, None, cu_seqlens, max_seqlen, scale, dropout_p, rng)


@_vbwd.register_fake
def _vbwd_fake(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale, backend, dropout_p=0.0, rng=None):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _reference_grads(do, q, k, v, fn):
    """(dq, dk, dv) by recomputing the torch reference under autograd (the "torch" backend's backward
    when the custom op is called with it, e.g. by opcheck)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, do)
    return tuple(g.contiguous() for g in grads)


def _dropout_inputs(rest):
    """(dropout_p, rng) from the custom op's inputs after `backend` (absent when the caller left the defaults)."""
    return (rest[0], rest[1]) if len(rest) == 2 else (rest[0] if rest else 0.0, None)


def _setup(ctx, inputs, output):
    q, k, v, mask, scale, backend, *rest = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zeros tensor is filled for it
    ctx.dropout_p, rng = _dropout_inputs(rest)
    ctx.save_for_backward(q, k, v, o, lse, mask, rng)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, do, _dlse):
    if do is None:  # o took no part in the loss
        return None, None, None, None, None, None, None, None
    q, k, v, o, lse, mask, rng = ctx.saved_tensors
    dq, dk, dv = _bwd(unit_last_stride(do), q, k, v, o, lse, mask, ctx.scale, ctx.backend, ctx.dropout_p, rng)
    return dq, dk, dv, None, None, None, None, None


def _vsetup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, backend, *rest = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zeros tensor is filled for it
    ctx.dropout_p, rng = _dropout_inputs(rest)
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, rng)
    ctx.max_seqlen, ctx.scale, ctx.backend = max_seqlen, scale, backend


def _vbackward(ctx, do, _dlse):
    if do is None:  # o took no part in the loss
        return None, None, None, None, None, None, None, None, None
    q, k, v, o, lse, cu_seqlens, rng = ctx.saved_tensors
    dq, dk, dv = _vbwd(unit_last_stride(do), q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.backend,
                       ctx.dropout_p, rng)
    return dq, dk, dv, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup)
_vfwd.register_autograd(_vbackward, setup_context=_vsetup)


# ------------------------------------------------------------------------------------------ checks


def _check_qkv(op, q, k, v, ndim, layout):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t)
    if q.dim() != ndim:
        raise ValueError(f"{op}: q must be {ndim}-D {layout}, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype ({dtype_name(q.dtype)}), "
                            f"got {dtype_name(t.dtype)}")
        check_shape(op, name, t, q.shape)


def _check_scale(op, scale, head_dim):
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a Python float or None, got {type(scale).__name__}")
    return float(scale)


def _check_dropout(op, dropout_p, rng, q):
    """dropout_p a Python float in [0, 1); rng None or an int64 (2,) tensor (seed, offset) on q's device."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{op}: dropout_p must be a Python float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:  # NaN fails here too
        raise ValueError(f"{op}: dropout_p must be in [0, 1) (the probability of dropping an attention "
                         f"probability), got {dropout_p}")
    if rng is not None:
        check_tensor(op, "rng", rng, dtypes=(torch.int64,))
        if tuple(rng.shape) != (2,):
            raise ValueError(f"{op}: rng must have shape (2,) (seed, offset), got {tuple(rng.shape)}")
        check_same_device(op, q=q, rng=rng)


def _rng_of_call(dropout_p, rng, device):
    """The rng the backend gets: None exactly when dropout_p == 0; else the caller's, or one (seed, offset) drawn
    from torch's default generator for `device` (so torch.manual_seed makes runs reproducible)."""
    if dropout_p == 0.0:
        return None
    if rng is None:
        return torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.int64, device=device)
    return rng if rng.is_contiguous() else rng.contiguous()


def _unsupported(q, k, v, mask, cu_seqlens, max_seqlen, scale):
    def unsupported(b):
        return _kernel(b).unsupported(q, k, v, mask, cu_seqlens, max_seqlen, scale)

    return unsupported


def _empty_result(q, k, v):
    """An empty output of q's shape that still hangs off q, k, v in the autograd graph."""
    return (q + k + v).zero_() if q.requires_grad or k.requires_grad or v.requires_grad else \
        torch.empty(q.shape, dtype=q.dtype, device=q.device)


# ------------------------------------------------------------------------------------------ public


def attention(q, k, v, *, key_padding_mask=None, scale=None, dropout_p=0.0, rng=None, backend=None):
    """Non-causal attention softmax(scale * q k^T) v per head, padded batches.

    q, k, v           (batch, seqlen, heads, head_dim) float16 / bfloat16 / float32, one dtype; any
                      strides with a unit last stride go to the kernels without a copy (views into
                      a fused QKV projection (batch, seqlen, 3, heads, head_dim) included)
    key_padding_mask  None, or bool (batch, seqlen), True = real token. Keys where it is False are
                      ignored; query rows where it is False are computed as transformers does (they
                      attend to the real keys). A sequence with no real key gives zeros (and zero
                      gradients), never NaN.
    scale             Python float, default head_dim ** -0.5
    dropout_p         Python float in [0, 1): dropout on the attention probabilities (lse of the undropped
                      scores, O = dropout(P) V, kept ones scaled by 1 / (1 - dropout_p)), applied whenever > 0
                      (pass 0 in eval, like F.scaled_dot_product_attention); 0 runs the no-dropout kernels
    rng               None, or int64 (2,) (seed, offset) on q's device: the key of the counter-based mask
                      (deterministic for a given rng and backend; the backward regenerates it). None with
                      dropout_p > 0: drawn from torch's default generator of the device
    backend           None (automatic), "torch", "triton" or "cuda"; the triton kernels take
                      head_dim 16 / 32 / 64 / 128 and float16 / bfloat16 (float32 under the
                      interpreter); the automatic choice falls back to torch otherwise
    returns           (batch, seqlen, heads, head_dim) q.dtype, contiguous on the kernel backends;
                      math in float32, the S x S scores are never materialized by the kernels
    """
    if rng is None and not compiling() and not grad_on() and not modes():  # inference: the call's cached function
        extra = (scale, type(scale), dropout_p, type(dropout_p), backend, key_padding_mask is None)
        m = NONE[0] if key_padding_mask is None else key_padding_mask
        fn = _FAST.get(extra, q, k, v, m)
        if fn is not None:
            return fn(q, k, v, key_padding_mask)
        o = _attention(q, k, v, key_padding_mask, scale, dropout_p, rng, backend)
        if type(dropout_p) is float and dropout_p == 0.0:
            _FAST.add(extra, (q, k, v, m), _bind_padded(q, k, v, key_padding_mask, scale, backend))
        return o
    return _attention(q, k, v, key_padding_mask, scale, dropout_p, rng, backend)


_FAST = InferenceCache()  # attention's; and attention_varlen's, and the trusted entry points'
_FAST_TRUSTED = InferenceCache()
_FASTV = InferenceCache()
_FASTV_TRUSTED = InferenceCache()


def _bind_padded(q, k, v, key_padding_mask, scale, backend):
    """fn(q, k, v, key_padding_mask) -> o for inference calls of this signature, or None (the full path)."""
    fn = bind_inference(q, k, v, key_padding_mask, backend)
    if fn is None:
        return None
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)

    def attention_cached(q, k, v, key_padding_mask):
        return fn(q, k, v, key_padding_mask, scale)

    return attention_cached


def _bind_varlen(q, k, v, cu_seqlens, max_seqlen, scale, backend, check_values):
    """fn(q, k, v, cu_seqlens) -> o for inference calls of this signature (max_seqlen included), or None.
    check_values: the CPU-only value checks of cu_seqlens run at every call (the public op's)."""
    fn = bind_varlen_inference(q, k, v, cu_seqlens, max_seqlen, backend)
    if fn is None:
        return None
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    ms = int(max_seqlen)
    if check_values and values_readable(cu_seqlens):  # the public op's CPU value checks, at every call
        total = q.shape[0]

        def attention_varlen_cached(q, k, v, cu_seqlens):
            _check_cu_values(cu_seqlens.tolist(), ms, total)
            return fn(q, k, v, cu_seqlens, ms, scale)
    else:
        def attention_varlen_cached(q, k, v, cu_seqlens):
            return fn(q, k, v, cu_seqlens, ms, scale)

    return attention_varlen_cached


def _attention(q, k, v, key_padding_mask, scale, dropout_p, rng, backend):
    """The public op's full path: checks cached per signature, the cached choice, the custom op with autograd."""
    if not torch.compiler.is_compiling():
        try:  # the checks are cached per signature of the call
            sig = (q.shape, q.dtype, q.device, k.shape, k.dtype, k.device, v.shape, v.dtype, v.device,
                   None if key_padding_mask is None else (key_padding_mask.shape, key_padding_mask.dtype,
                                                          key_padding_mask.device), scale,
                   type(dropout_p), dropout_p, None if rng is None else (rng.shape, rng.dtype, rng.device))
            ok = sig in _CHECKED
        except (AttributeError, TypeError):  # not tensors, or unhashable: the checks below say what is wrong
            ok = False
        if not ok:
            _check_padded(q, k, v, key_padding_mask, scale, dropout_p, rng)
            if len(_CHECKED) >= 4096:
                _CHECKED.clear()
            _CHECKED.add(sig)
        return _run(q, k, v, key_padding_mask, scale, dropout_p, rng, backend)
    _check_padded(q, k, v, key_padding_mask, scale, dropout_p, rng)
    return _run_traced(q, k, v, key_padding_mask, scale, dropout_p, rng, backend)


_CHECKED: set = set()  # call signatures (of attention and attention_varlen) that passed the checks


def attention_trusted(q, k, v, key_padding_mask=None, scale=None, dropout_p=0.0, rng=None, backend=None):
    """attention without the argument checks, for callers that guarantee them (the model, once per forward):
    the same arguments and result as `attention`, which must accept them. Bad arguments here give undefined
    errors instead of the named ones."""
    if rng is None and not compiling() and not grad_on() and not modes():  # the inference cache, no checks
        extra = (scale, dropout_p, backend, key_padding_mask is None)
        m = NONE[0] if key_padding_mask is None else key_padding_mask
        fn = _FAST_TRUSTED.get(extra, q, k, v, m)
        if fn is not None:
            return fn(q, k, v, key_padding_mask)
        o = _run(q, k, v, key_padding_mask, scale, dropout_p, rng, backend, True)
        if not dropout_p:
            _FAST_TRUSTED.add(extra, (q, k, v, m), _bind_padded(q, k, v, key_padding_mask, scale, backend))
        return o
    if torch.compiler.is_compiling():
        return _run_traced(q, k, v, key_padding_mask, scale, dropout_p, rng, backend)
    return _run(q, k, v, key_padding_mask, scale, dropout_p, rng, backend, True)


def _check_padded(q, k, v, key_padding_mask, scale, dropout_p=0.0, rng=None):
    _check_qkv(_OP, q, k, v, 4, "(batch, seqlen, heads, head_dim)")
    B, S, H, D = q.shape
    if key_padding_mask is not None:
        check_tensor(_OP, "key_padding_mask", key_padding_mask, dtypes=(torch.bool,))
        check_shape(_OP, "key_padding_mask", key_padding_mask, (B, S))
    check_same_device(_OP, q=q, k=k, v=v, key_padding_mask=key_padding_mask)
    _check_scale(_OP, scale, D)
    _check_dropout(_OP, dropout_p, rng, q)


def _seq_class(n: int) -> int:
    """log2 of ceil_pow2(n): the sequence-length class of the tuned buckets (roberta_fast.tuned.bucket)."""
    return (n - 1).bit_length() if n > 1 else 0


def _train(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _run(q, k, v, key_padding_mask, scale, dropout_p, rng, backend, trusted=False):
    """The lean path (checked arguments, eager): cached backend choice; in inference the backend's forward
    is called directly (from the trusted entry points its forward_inference, which keeps no lse), with
    autograd the custom op is."""
    B, S, H, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    train = _train(q, k, v)

    def unsupported(b):
        return _kernel(b).unsupported(q, k, v, key_padding_mask, None, None, scale)

    # what the choice depends on: dtypes and head_dim (the backends' unsupported), the bucket of the tuned
    # table (S class, heads, head_dim, dtype, mask, tokens)
    sig = (q.dtype, k.dtype, v.dtype, H, D, _seq_class(S), round_log2(B * S), key_padding_mask is not None)
    b, mod = backends.choose(_OP, backend, q.device, sig, "train" if train else "fwd", unsupported=unsupported,
                             tune_key=(B, S, H, D, q.dtype, key_padding_mask is not None))
    if q.numel() == 0:
        return _empty_result(q, k, v)
    dropout_p = float(dropout_p)
    rng = _rng_of_call(dropout_p, rng, q.device)
    if mod is None:
        return reference.attention(q, k, v, key_padding_mask, scale, dropout_p, rng)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    if not train and direct_call_ok(q):  # inference: the backend directly, no custom-op dispatch
        if trusted:
            return mod.forward_inference(q, k, v, key_padding_mask, None, None, scale, dropout_p, rng)
        return mod.forward(q, k, v, key_padding_mask, None, None, scale, dropout_p, rng)[0]
    return _fwd(q, k, v, key_padding_mask, scale, b, dropout_p, rng)[0]


def _run_traced(q, k, v, key_padding_mask, scale, dropout_p, rng, backend):
    """Under torch.compile: the uncached registry and always the custom op (one opaque node in the graph)."""
    B, S, H, D = q.shape
    scale = _check_scale(_OP, scale, D)
    b = backends.resolve(_OP, backend, q.device,
                         unsupported=_unsupported(q, k, v, key_padding_mask, None, None, scale),
                         tune_key=(B, S, H, D, dtype_name(q.dtype), key_padding_mask is not None),
                         mode=train_mode(q, k, v))
    if q.numel() == 0:
        return _empty_result(q, k, v)
    dropout_p = float(dropout_p)
    rng = _rng_of_call(dropout_p, rng, q.device)
    if b == "torch":
        return reference.attention(q, k, v, key_padding_mask, scale, dropout_p, rng)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    o, _ = _fwd(q, k, v, key_padding_mask, scale, b, dropout_p, rng)
    return o


def _check_cu_seqlens(cu_seqlens, max_seqlen, total):
    """Value checks on CPU tensors (free there); on GPUs they would synchronize, so they are skipped."""
    if not values_readable(cu_seqlens) or torch.compiler.is_compiling():
        return
    _check_cu_values(cu_seqlens.tolist(), max_seqlen, total)


def _check_cu_values(cu, max_seqlen, total):
    """_check_cu_seqlens on the values as a list (the inference cache calls it directly on CPU tensors)."""
    if cu[0] != 0:
        raise ValueError(f"{_OPV}: cu_seqlens must start at 0, got {cu[0]}")
    lens = list(map(operator.sub, cu[1:], cu[:-1]))
    if lens and min(lens) < 0:
        i = next(i for i, n in enumerate(lens) if n < 0)
        raise ValueError(f"{_OPV}: cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {cu[i]} > "
                         f"cu_seqlens[{i + 1}] = {cu[i + 1]}")
    if cu[-1] > total:
        raise ValueError(f"{_OPV}: cu_seqlens[-1] = {cu[-1]} exceeds the {total} tokens of q")
    if lens and max(lens) > max_seqlen:
        raise ValueError(f"{_OPV}: max_seqlen = {max_seqlen} is smaller than the longest sequence "
                         f"({max(lens)} tokens)")


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale=None, dropout_p=0.0, rng=None, backend=None):
    """Padding-free attention: each packed sequence attends to itself only (non-causal).

    q, k, v      (total_tokens, heads, head_dim) float16 / bfloat16 / float32, one dtype; any strides
                 with a unit last stride (views into a fused QKV (total_tokens, 3, heads, head_dim)
                 cost no copy)
    cu_seqlens   int32 (batch + 1,), cumulative lengths: 0, len_0, len_0 + len_1, ... (non-decreasing;
                 empty sequences allowed); on CPU tensors the values are checked, on GPUs they are
                 trusted (checking would synchronize)
    max_seqlen   Python int >= every sequence length (the kernels' grid covers this many rows)
    scale        Python float, default head_dim ** -0.5
    dropout_p    Python float in [0, 1), dropout on the probabilities (as in `attention`)
    rng          None or int64 (2,) (seed, offset) on q's device (as in `attention`)
    backend      None (automatic), "torch", "triton" or "cuda" (as in `attention`)
    returns      (total_tokens, heads, head_dim) q.dtype; rows past cu_seqlens[-1] are zeros
    """
    if rng is None and not compiling() and not grad_on() and not modes():  # inference: the call's cached function
        extra = (max_seqlen, type(max_seqlen), scale, type(scale), dropout_p, type(dropout_p), backend)
        fn = _FASTV.get(extra, q, k, v, cu_seqlens)
        if fn is not None:
            return fn(q, k, v, cu_seqlens)
        o = _attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng, backend)
        if type(dropout_p) is float and dropout_p == 0.0:
            _FASTV.add(extra, (q, k, v, cu_seqlens),
                       _bind_varlen(q, k, v, cu_seqlens, max_seqlen, scale, backend, True))
        return o
    return _attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng, backend)


def _attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng, backend):
    """The public op's full path: checks cached per signature, the cached choice, the custom op with autograd."""
    if not torch.compiler.is_compiling():
        try:  # the checks are cached per signature of the call (the CPU-only value checks of cu_seqlens are not)
            sig = (_OPV, q.shape, q.dtype, q.device, k.shape, k.dtype, k.device, v.shape, v.dtype, v.device,
                   cu_seqlens.shape, cu_seqlens.dtype, cu_seqlens.device, type(max_seqlen), max_seqlen, scale,
                   type(dropout_p), dropout_p, None if rng is None else (rng.shape, rng.dtype, rng.device))
            ok = sig in _CHECKED
        except (AttributeError, TypeError):  # not tensors, or unhashable: the checks below say what is wrong
            ok = False
        if not ok:
            _check_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng)
            if len(_CHECKED) >= 4096:
                _CHECKED.clear()
            _CHECKED.add(sig)
        _check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0])
        return _vrun(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng, backend)
    _check_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng)
    _check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0])
    return _vrun_traced(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng, backend)


def attention_varlen_trusted(q, k, v, cu_seqlens, max_seqlen, scale=None, dropout_p=0.0, rng=None, backend=None):
    """attention_varlen without the argument checks (the value checks of cu_seqlens on CPU tensors included),
    for callers that guarantee them (the model, once per forward): the same arguments and result as
    `attention_varlen`, which must accept them. Bad arguments here give undefined errors instead of the
    named ones."""
    if rng is None and not compiling() and not grad_on() and not modes():  # the inference cache, no checks
        extra = (max_seqlen, scale, dropout_p, backend)
        fn = _FASTV_TRUSTED.get(extra, q, k, v, cu_seqlens)
        if fn is not None:
            return fn(q, k, v, cu_seqlens)
        o = _vrun(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng, backend, True)
        if not dropout_p:
            _FASTV_TRUSTED.add(extra, (q, k, v, cu_seqlens),
                               _bind_varlen(q, k, v, cu_seqlens, max_seqlen, scale, backend, False))
        return o
    if torch.compiler.is_compiling():
        return _vrun_traced(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng, backend)
    return _vrun(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng, backend, True)


def _check_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p=0.0, rng=None):
    _check_qkv(_OPV, q, k, v, 3, "(total_tokens, heads, head_dim)")
    check_tensor(_OPV, "cu_seqlens", cu_seqlens, dtypes=(torch.int32,))
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{_OPV}: cu_seqlens must be 1-D (batch + 1,) with at least one element, "
                         f"got shape {tuple(cu_seqlens.shape)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)):
        raise TypeError(f"{_OPV}: max_seqlen must be a Python int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"{_OPV}: max_seqlen must be >= 0, got {max_seqlen}")
    check_same_device(_OPV, q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    _check_scale(_OPV, scale, q.shape[-1])
    _check_dropout(_OPV, dropout_p, rng, q)


def _vrun(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng, backend, trusted=False):
    """The lean path of attention_varlen (see _run)."""
    T, H, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    train = _train(q, k, v)

    def unsupported(b):
        return _kernel(b).unsupported(q, k, v, None, cu_seqlens, max_seqlen, scale)

    sig = (q.dtype, k.dtype, v.dtype, H, D, _seq_class(max_seqlen), round_log2(T))
    b, mod = backends.choose(_OPV, backend, q.device, sig, "train" if train else "fwd", unsupported=unsupported,
                             tune_key=(T, max_seqlen, H, D, q.dtype))
    if q.numel() == 0:
        return _empty_result(q, k, v)
    dropout_p = float(dropout_p)
    rng = _rng_of_call(dropout_p, rng, q.device)
    if mod is None:
        return reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    cu_seqlens = cu_seqlens if cu_seqlens.is_contiguous() else cu_seqlens.contiguous()
    if not train and direct_call_ok(q):  # inference: the backend directly, no custom-op dispatch
        if trusted:
            return mod.forward_inference(q, k, v, None, cu_seqlens, int(max_seqlen), scale, dropout_p, rng)
        return mod.forward(q, k, v, None, cu_seqlens, int(max_seqlen), scale, dropout_p, rng)[0]
    return _vfwd(q, k, v, cu_seqlens, int(max_seqlen), scale, b, dropout_p, rng)[0]


def _vrun_traced(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng, backend):
    """Under torch.compile: the uncached registry and always the custom op (one opaque node in the graph)."""
    T, H, D = q.shape
    scale = _check_scale(_OPV, scale, D)
    b = backends.resolve(_OPV, backend, q.device,
                         unsupported=_unsupported(q, k, v, None, cu_seqlens, max_seqlen, scale),
                         tune_key=(T, max_seqlen, H, D, dtype_name(q.dtype)), mode=train_mode(q, k, v))
    if q.numel() == 0:
        return _empty_result(q, k, v)
    dropout_p = float(dropout_p)
    rng = _rng_of_call(dropout_p, rng, q.device)
    if b == "torch":
        return reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, rng)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    cu_seqlens = cu_seqlens if cu_seqlens.is_contiguous() else cu_seqlens.contiguous()
    o, _ = _vfwd(q, k, v, cu_seqlens, int(max_seqlen), scale, b, dropout_p, rng)
    return o


def bind_varlen_inference(q, k, v, cu_seqlens, max_seqlen, backend=None):
    """For many inference calls of ONE signature (see layer_norm.bind_inference): q, k, v (T, H, D) with unit last
    stride (views of one QKV), cu_seqlens int32 contiguous, one max_seqlen, no dropout. Returns
    fn(q, k, v, cu_seqlens, max_seqlen, scale) -> o, the kernel backend's forward_inference called directly, or
    None where such calls must take attention_varlen_trusted."""
    if not bindable(q) or q.numel() == 0 or not cu_seqlens.is_contiguous():
        return None
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    T, H, D = q.shape
    scale = D ** -0.5

    def unsupported(b):
        return _kernel(b).unsupported(q, k, v, None, cu_seqlens, max_seqlen, scale)

    sig = (q.dtype, k.dtype, v.dtype, H, D, _seq_class(max_seqlen), round_log2(T))
    _, mod = backends.choose(_OPV, backend, q.device, sig, "fwd", unsupported=unsupported,
                             tune_key=(T, max_seqlen, H, D, q.dtype))
    if mod is None:
        return None
    if hasattr(mod, "bind_inference"):  # the backend fixes everything but the addresses once (kernels/attention.py)
        bound = mod.bind_inference(q, k, v, None, cu_seqlens, max_seqlen, scale)

        def attention_varlen_bound(q, k, v, cu_seqlens, max_seqlen, scale):
            return bound(q, k, v, None, cu_seqlens, max_seqlen, scale)

        return attention_varlen_bound
    fwd = mod.forward_inference

    def attention_varlen_bound(q, k, v, cu_seqlens, max_seqlen, scale):
        return fwd(q, k, v, None, cu_seqlens, max_seqlen, scale, 0.0, None)

    return attention_varlen_bound


def bind_inference(q, k, v, key_padding_mask=None, backend=None):
    """attention's binding (see bind_varlen_inference): q, k, v (B, S, H, D) with unit last stride, key_padding_mask
    bool (B, S) contiguous or None. Returns fn(q, k, v, key_padding_mask, scale) -> o, or None."""
    if not bindable(q) or q.numel() == 0:
        return None
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    if key_padding_mask is not None and not key_padding_mask.is_contiguous():
        return None
    B, S, H, D = q.shape
    scale = D ** -0.5

    def unsupported(b):
        return _kernel(b).unsupported(q, k, v, key_padding_mask, None, None, scale)

    sig = (q.dtype, k.dtype, v.dtype, H, D, _seq_class(S), round_log2(B * S), key_padding_mask is not None)
    _, mod = backends.choose(_OP, backend, q.device, sig, "fwd", unsupported=unsupported,
                             tune_key=(B, S, H, D, q.dtype, key_padding_mask is not None))
    if mod is None:
        return None
    fwd = mod.bind_inference(q, k, v, key_padding_mask, None, None, scale) if hasattr(mod, "bind_inference") else (
        lambda q, k, v, m, cu, ms, sc: mod.forward_inference(q, k, v, m, cu, ms, sc, 0.0, None))

    def attention_bound(q, k, v, key_padding_mask, scale):
        return fwd(q, k, v, key_padding_mask, None, None, scale)

    return attention_bound
