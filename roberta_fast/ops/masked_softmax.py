"""masked_softmax: softmax(scale * scores, masked) over the last dim, with the gradient for scores.

Kernel backends take 4-D (B, H, Q, K) scores and a mask view expanded to that shape (stride 0 on
broadcast dims); this layer merges or pads the leading dims to three row dims using views only, so
a broadcast mask is never materialized. Kernel backends run behind torch.library custom ops, so
torch.compile and CUDA graphs see opaque ops with fake implementations.
"""

import numbers

import torch

from .. import backends, reference
from .._utils import FLOAT_DTYPES, dtype_name, unit_last_stride
from ..tuned import round_log2
from ._checks import (
    NONE,
    InferenceCache,
    bindable,
    check_same_device,
    check_tensor,
    compiling,
    direct_call_ok,
    grad_on,
    modes,
    train_mode,
    values_readable,
)

_OP = "masked_softmax"
_MASK_DTYPES = (torch.bool,) + FLOAT_DTYPES


@torch.library.custom_op(
    "roberta_fast::masked_softmax_fwd", mutates_args=(),
    schema="(Tensor scores, Tensor? mask, float scale, str backend) -> Tensor",
)
def _fwd(scores, mask, scale, backend):
    return backends.implementation(backend, _OP).forward(scores, mask, scale)


@_fwd.register_fake
def _fwd_fake(scores, mask, scale, backend):
    return scores.new_empty(scores.shape)


@torch.library.custom_op(
    "roberta_fast::masked_softmax_bwd", mutates_args=(),
    schema="(Tensor dprobs, Tensor probs, float scale, str backend) -> Tensor",
)
def _bwd(dprobs, probs, scale, backend):
    return backends.implementation(backend, _OP).backward(dprobs, probs, scale)


@_bwd.register_fake
def _bwd_fake(dprobs, probs, scale, backend):
    return probs.new_empty(probs.shape)


def _setup_context(ctx, inputs, output):
    _, _, scale, backend = inputs
    ctx.save_for_backward(output)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, dprobs):
    (probs,) = ctx.saved_tensors
    dprobs = unit_last_stride(dprobs)
    # no gradient for the mask (an additive mask is treated as a constant)
    return _bwd(dprobs, probs, ctx.scale, ctx.backend), None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _row_dims(shape, *strides_list):
    """Merge the leading dims (all but the last) of tensors that share `shape` into as few row dims as
    views allow. Returns [(size, (stride of each tensor))]; size-1 dims are dropped."""
    out = []
    for d in range(len(shape) - 1):
        size = shape[d]
        if size == 1:
            continue
        st = tuple(s[d] for s in strides_list)
        if out:
            psize, pst = out[-1]
            if all(p == c * size for p, c in zip(pst, st)):
                out[-1] = (psize * size, st)
                continue
        out.append((size, st))
    return out


def _kernel_path(scores, mask, scale, backend):
    """Scores (..., K) and a mask already expanded to scores' shape (or None) -> probs (..., K)."""
    K = scores.shape[-1]
    scores = unit_last_stride(scores)
    strides = [scores.stride()] + ([mask.stride()] if mask is not None else [])
    dims = _row_dims(scores.shape, *strides)
    if len(dims) > 3 and not scores.is_contiguous():
        scores = scores.contiguous()
        strides[0] = scores.stride()
        dims = _row_dims(scores.shape, *strides)
    if len(dims) > 3:
        # the mask's broadcast pattern leaves more than three row dims: one call per leading index
        # (never reached with 4-D scores, since three leading dims always fit)
        return torch.stack([_kernel_path(scores[i], None if mask is None else mask[i], scale, backend)
                            for i in range(scores.shape[0])])
    dims = [(1, (0,) * len(strides))] * (3 - len(dims)) + dims
    size4 = tuple(d[0] for d in dims) + (K,)
    s4 = unit_last_stride(scores.reshape(size4))  # a view: the merged dims are contiguous in scores
    m4 = None
    if mask is not None:
        mstride = tuple(d[1][1] for d in dims) + (mask.stride(-1),)
        m4 = mask.as_strided(size4, mstride)
    return _fwd(s4, m4, scale, backend).view(scores.shape)


def _check_additive(mask):
    """A float mask is additive (0 keeps, -inf masks). A float mask of 0s and 1s is almost surely a keep-mask
    given as float, which as additive masks nothing: refuse it. Checked on CPU tensors only (free there;
    on a GPU it would synchronize) and never under torch.compile."""
    if mask is None or mask.dtype == torch.bool or not values_readable(mask) or torch.compiler.is_compiling():
        return
    if mask.numel() and bool(((mask == 0) | (mask == 1)).all()) and bool((mask == 1).any()):
        raise ValueError(f"{_OP}: mask is a float tensor of 0s and 1s, which as an additive mask masks nothing; "
                         "pass a bool mask (mask.bool(), True = keep) or an additive one (0 = keep, -inf or "
                         "finfo.min = masked)")


def masked_softmax(scores, mask=None, scale=1.0, *, backend=None):
    """softmax(scale * scores, masked) over the last dim, with the gradient for scores.

    scores   (..., K) float16 / bfloat16 / float32, at least 1-D, any number of leading dims and
             any strides
    mask     None; bool (True = keep); or an additive float mask of any float dtype (added after
             scaling, e.g. transformers' extended mask (B, 1, 1, K) holding 0 / finfo.min). A float mask
             of only 0s and 1s is refused with ValueError on CPU tensors (a keep-mask given as float would
             mask nothing); on GPU tensors it is not checked (that would synchronize).
             Broadcastable to scores: (B, 1, 1, K), (B, H, Q, K), (K,), (1, 1, Q, K), ... A broadcast
             mask is read through stride-0 views, never materialized. The mask gets no gradient.
    scale    Python float applied to the scores before the additive mask
    backend  None (automatic), "torch", "triton" or "cuda"
    returns  (..., K) scores' dtype (contiguous on the kernel backends); math in float32. An element
             is masked where the bool mask is False or the additive mask is -inf; a row with every
             element masked is all zeros (not NaN), and its gradient is zero. NaN in a kept score
             gives a NaN row.

    The triton kernel takes rows of up to 8192 elements (longer rows fall back to torch when the
    backend is automatic). An additive mask whose dtype is neither scores' nor float32 is converted
    to float32 at its own (unbroadcast) size.
    """
    if not compiling() and not grad_on() and not modes():  # inference: the call's cached function
        extra = (scale, type(scale), backend, mask is None)
        m = NONE[0] if mask is None else mask
        fn = _FAST.get(extra, scores, m)
        if fn is not None:
            return fn(scores, mask)
        y = _masked_softmax(scores, mask, scale, backend)
        _FAST.add(extra, (scores, m), _bind_public(scores, mask, scale, backend, True))
        return y
    return _masked_softmax(scores, mask, scale, backend)


_FAST = InferenceCache()
_FAST_TRUSTED = InferenceCache()


def _bind_public(scores, mask, scale, backend, check_values):
    """fn(scores, mask) -> probs for inference calls of this signature (4-D scores with a unit last stride, a
    kernel backend): the kernel backend's bind_inference, or its forward; None where calls take the full path.
    check_values: the CPU-only value check of a float mask runs at every call (the public op's)."""
    if not bindable(scores) or scores.dim() != 4 or scores.stride(3) != 1 or scores.numel() == 0:
        return None
    K = scores.shape[-1]
    rows = scores.numel() // K
    mask_kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")

    def unsupported(b):
        return backends.implementation(b, _OP).unsupported(scores, mask, scale)

    sig = (scores.dtype, K, round_log2(rows), mask_kind, None if mask is None else mask.dtype)
    _, mod = backends.choose(_OP, backend, scores.device, sig, "fwd", unsupported=unsupported,
                             tune_key=(rows, K, scores.dtype, mask_kind))
    if mod is None or (mask is not None and mask.requires_grad):
        return None
    scale = float(scale)
    fn = None
    if mask is None or (mask.dtype in (torch.bool, scores.dtype, torch.float32)
                        and (mask.stride(-1) in (0, 1) or mask.shape[-1] == 1)):
        bind = getattr(mod, "bind_inference", None)
        fn = bind and bind(scores, None if mask is None else mask.expand(scores.shape), scale)
    if fn is None:
        fwd = mod.forward

        def fn(scores, mask):
            return fwd(scores, None if mask is None else _mask_for_kernels(scores, mask), scale)

    if check_values and mask is not None and mask.dtype != torch.bool and values_readable(mask):
        bound = fn

        def fn(scores, mask):
            _check_additive(mask)
            return bound(scores, mask)

    return fn


def _masked_softmax(scores, mask, scale, backend):
    """The public op's full path: checks cached per signature, the cached choice, the custom op with autograd."""
    if not torch.compiler.is_compiling():
        try:  # the checks are cached per signature of the call (the CPU-only value check of a float mask is not)
            sig = (scores.shape, scores.dtype, scores.device,
                   None if mask is None else (mask.shape, mask.dtype, mask.device), type(scale))
            ok = sig in _CHECKED
        except (AttributeError, TypeError):  # not tensors, or unhashable: the checks below say what is wrong
            ok = False
        if not ok:
            _check_args(scores, mask, scale)
            if len(_CHECKED) >= 4096:
                _CHECKED.clear()
            _CHECKED.add(sig)
        _check_additive(mask)
        return _run(scores, mask, scale, backend)
    _check_args(scores, mask, scale)
    _check_additive(mask)
    return _run_traced(scores, mask, scale, backend)


_CHECKED: set = set()  # call signatures that passed _check_args


def masked_softmax_trusted(scores, mask=None, scale=1.0, backend=None):
    """masked_softmax without the argument checks (the value check of a float mask on CPU tensors included),
    for callers that guarantee them (the model, once per forward): the same arguments and result as
    `masked_softmax`, which must accept them. Bad arguments here give undefined errors instead of the named
    ones."""
    if not compiling() and not grad_on() and not modes():  # the inference cache, no checks
        extra = (scale, backend, mask is None)
        m = NONE[0] if mask is None else mask
        fn = _FAST_TRUSTED.get(extra, scores, m)
        if fn is not None:
            return fn(scores, mask)
        y = _run(scores, mask, scale, backend)
        _FAST_TRUSTED.add(extra, (scores, m), _bind_public(scores, mask, scale, backend, False))
        return y
    if torch.compiler.is_compiling():
        return _run_traced(scores, mask, scale, backend)
    return _run(scores, mask, scale, backend)


def _check_args(scores, mask, scale):
    check_tensor(_OP, "scores", scores, ndim_min=1)
    if mask is not None:
        check_tensor(_OP, "mask", mask, dtypes=_MASK_DTYPES)
        try:
            shape = torch.broadcast_shapes(mask.shape, scores.shape)
        except RuntimeError:
            shape = None
        if shape != scores.shape:
            raise ValueError(f"{_OP}: mask of shape {tuple(mask.shape)} does not broadcast to scores of "
                             f"shape {tuple(scores.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{_OP}: scale must be a Python float, got {type(scale).__name__}")
    check_same_device(_OP, scores=scores, mask=mask)


def _mask_for_kernels(scores, mask):
    """The mask as the kernel backends take it: bool, scores' dtype or float32, a unit (or zero) last stride,
    expanded to scores' shape (a view)."""
    if mask.dtype not in (torch.bool, scores.dtype, torch.float32):
        mask = mask.float()
    if mask.stride(-1) not in (0, 1) and mask.shape[-1] > 1:
        mask = mask.contiguous()
    return mask.expand(scores.shape)


def _run(scores, mask, scale, backend):
    """The lean path (checked arguments, eager): cached backend choice; in inference the backend's forward
    is called directly on 4-D scores, with autograd (or other layouts) through the custom op."""
    K = scores.shape[-1]
    rows = scores.numel() // K if K else 0
    train = torch.is_grad_enabled() and scores.requires_grad
    mask_kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")

    def unsupported(b):
        return backends.implementation(b, _OP).unsupported(scores, mask, scale)

    # what the choice depends on: scores' dtype and K (the backends' unsupported), the bucket of the tuned
    # table (rows, K, dtype, mask kind); the mask's dtype too, for backends that may look at it
    sig = (scores.dtype, K, round_log2(rows), mask_kind, None if mask is None else mask.dtype)
    b, mod = backends.choose(_OP, backend, scores.device, sig, "train" if train else "fwd",
                             unsupported=unsupported, tune_key=(rows, K, scores.dtype, mask_kind))
    if mask is not None and mask.requires_grad:
        mask = mask.detach()  # the mask gets no gradient, on every backend
    if rows == 0:
        return scores.clone(memory_format=torch.contiguous_format)
    if mod is None:
        return reference.masked_softmax(scores, mask, float(scale))
    if mask is not None:
        mask = _mask_for_kernels(scores, mask)
    if not train and scores.dim() == 4 and scores.stride(3) == 1 and direct_call_ok(scores):
        return mod.forward(scores, mask, float(scale))  # inference: the backend directly, no custom-op dispatch
    return _kernel_path(scores, mask, float(scale), b)


def _run_traced(scores, mask, scale, backend):
    """Under torch.compile: the uncached registry and always the custom op (one opaque node in the graph)."""
    K = scores.shape[-1]

    def unsupported(b):
        return backends.implementation(b, _OP).unsupported(scores, mask, scale)

    mask_kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
    b = backends.resolve(_OP, backend, scores.device, unsupported=unsupported,
                         tune_key=(scores.numel() // max(K, 1), K, dtype_name(scores.dtype), mask_kind),
                         mode=train_mode(scores))
    if mask is not None:
        mask = mask.detach()  # the mask gets no gradient, on every backend
    if scores.numel() == 0:
        return scores.clone(memory_format=torch.contiguous_format)
    if b == "torch":
        return reference.masked_softmax(scores, mask, float(scale))
    if mask is not None:
        mask = _mask_for_kernels(scores, mask)
    return _kernel_path(scores, mask, float(scale), b)
