"""Argument checks shared by the ops: each error names the op, the argument, what was expected and
what was given."""

from __future__ import annotations

import torch

from .. import backends
from .._utils import FLOAT_DTYPES, dtype_name


def check_tensor(op: str, name: str, t, *, dtypes=FLOAT_DTYPES, ndim_min: int = 0):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in ({', '.join(map(dtype_name, dtypes))}), "
                        f"got {dtype_name(t.dtype)}")
    if t.dim() < ndim_min:
        raise ValueError(f"{op}: {name} must have at least {ndim_min} dimension(s), got shape {tuple(t.shape)}")
    return t


def check_same_device(op: str, **tensors):
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return None
    name0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{op}: all tensors must be on one device; {name0} is on {t0.device}, "
                             f"{n} is on {t.device}")
    return t0.device


def check_param_dtype(op: str, name: str, p, x):
    """Weights and biases may have x's dtype or float32 (mixed-precision training)."""
    if p is None:
        return
    if p.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{op}: {name} must have x's dtype ({dtype_name(x.dtype)}) or float32, "
                        f"got {dtype_name(p.dtype)}")


def check_shape(op: str, name: str, t, expected: tuple):
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def train_mode(*tensors) -> str:
    """"train" when autograd will record this call (grad mode on and an input requires grad), else
    "fwd": which tuned measurements apply."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "train"
    return "fwd"


_dispatch_depth = torch._C._len_torch_dispatch_stack


def direct_call_ok(x) -> bool:
    """An inference call may skip the custom op and call the backend's forward directly (the lean path) when
    nothing would see the op: no TorchDispatchMode is active (FakeTensorMode, op counters, ...) and x is a
    plain tensor, not a subclass. Under torch.compile the ops always use the custom op."""
    return type(x) is torch.Tensor and _dispatch_depth() == 0


def check_dropout(op: str, dropout_p, rng, x):
    """dropout_p a float in [0, 1); rng None or an int64 (2,) tensor (seed, offset) on x's device."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{op}: dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not (0.0 <= dropout_p < 1.0):  # NaN fails too
        raise ValueError(f"{op}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if rng is None:
        return
    if not isinstance(rng, torch.Tensor):
        raise TypeError(f"{op}: rng must be None or an int64 torch.Tensor of shape (2,) (seed, offset), "
                        f"got {type(rng).__name__}")
    if rng.dtype != torch.int64:
        raise TypeError(f"{op}: rng must have dtype int64 (seed, offset), got {dtype_name(rng.dtype)}")
    if tuple(rng.shape) != (2,):
        raise ValueError(f"{op}: rng must have shape (2,) (seed, offset), got {tuple(rng.shape)}")
    if rng.device != x.device:
        raise ValueError(f"{op}: rng must be on x's device ({x.device}), got {rng.device}")


def values_readable(t) -> bool:
    """Whether an op may read t's values on the host to check them: CPU tensors (free there), not GPU tensors (a
    read would synchronize). The host benchmark treats CPU tensors as GPU ones (backends.GPU_DEVICE_TYPES gets
    "cpu" in its process), so it measures the GPU path's host time, which reads nothing."""
    return t.device.type not in backends.GPU_DEVICE_TYPES


def bindable(x) -> bool:
    """A caller may bind an op's inference path once for many calls of one signature (the model's layers, once
    per forward; ops.trusted.bind_*): no autograd recording, not under torch.compile, no autocast, nothing that
    would see the op (direct_call_ok)."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and direct_call_ok(x)
            and not torch.is_autocast_enabled(x.device.type))


# ----------------------------------------------------------------------------- the public ops' inference cache

try:  # torch's C++ tensor-metadata check (what torch.compile's guards use): type, dtype, device, sizes, strides,
    # dispatch keys and requires_grad of many tensors in one call, ~0.2 us per tensor
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - every torch this package supports has it
    _TensorGuards = None

# the inference cache's gate, inlined in the ops: `not compiling() and not grad_on() and not modes()` (not under
# torch.compile, autograd records nothing, no TorchDispatchMode active)
compiling = torch.compiler.is_compiling
grad_on = torch.is_grad_enabled
modes = _dispatch_depth
# stand-ins for None tensor arguments in an InferenceCache's tensors, one per position (TensorGuards never
# matches a call that passes one tensor object twice)
NONE = tuple(torch.empty(0) for _ in range(4))
_CACHES: list = []


def fast_inference() -> bool:
    """A public op call may look in its InferenceCache: not under torch.compile, autograd records nothing (grad
    mode off) and no TorchDispatchMode is active."""
    return not compiling() and not grad_on() and not modes()


class InferenceCache:
    """A public op's inference calls, cached per call signature (docs/host_path.md): the argument checks and the
    backend choice are made once per signature by the op's full path, which then stores `fn`, the backend's own
    inference function for that signature (the function the op's bind_inference returns, bit-identical to the
    custom op's forward). A later call of the same signature calls fn directly.

    A signature is (`extra`: the call's non-tensor arguments, with their types, and which tensors are None; the
    tensors' metadata: type, dtype, device, sizes, strides, dispatch keys, requires_grad, checked in C++ by
    torch's TensorGuards). A handful of signatures per op are kept (most recently added last); emptied whenever
    the backend choices are (backends.reset(), a tuned table's change)."""

    __slots__ = ("entries",)
    MAX = 8

    def __init__(self):
        self.entries: list = []
        _CACHES.append(self)

    def get(self, extra, *tensors):
        for guards, e, fn in self.entries:
            if e == extra and guards.check(*tensors):
                return fn
        return None

    def add(self, extra, tensors, fn):
        if fn is None or _TensorGuards is None or len({id(t) for t in tensors}) != len(tensors):
            return  # (a call passing one tensor twice, e.g. attention(q, q, q), would never match: not kept)
        try:
            guards = _TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        except Exception:  # noqa: BLE001 - a torch whose private TensorGuards differs: no caching, the full path
            return
        if len(self.entries) >= self.MAX:
            del self.entries[0]
        self.entries.append((guards, extra, fn))

    def clear(self):
        self.entries.clear()


def clear_inference_caches():
    """Empty every op's InferenceCache (the choices they hold are backends.choose's)."""
    for c in _CACHES:
        c.clear()


def _register_clear():
    from .. import tuned

    tuned.on_change(clear_inference_caches)


_register_clear()
