"""Backend choice and argument checks shared by every op.

Backends:
  "torch"   plain PyTorch (roberta_fast.reference): any device, the CPU path and the test oracle;
  "triton"  kernels/ (roberta_fast.kernels): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
  "cuda"    csrc/ (the compiled module roberta_fast._C): CUDA tensors, when the module was built.

backend=None picks, in order: ROBERTA_FAST_BACKEND if set (then it counts as asked by name), the
tuned choice cached for this op and shape (roberta_fast.tuning, when present), "cuda" if built and
it supports the call, "triton" on CUDA tensors, else "torch". The automatic choice never raises;
a backend asked for by name that cannot run the call raises BackendUnavailableError saying how to
get it.
"""

from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("torch", "triton", "cuda")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says how to get it."""


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_UNSET = object()
_cache = {"triton_error": _UNSET, "cuda_module": _UNSET}


def _triton_import_error() -> str | None:
    """Why triton cannot be imported, or None (checked once; plain dict cache so torch.compile can trace it)."""
    if _cache["triton_error"] is _UNSET:
        try:
            import triton  # noqa: F401

            _cache["triton_error"] = None
        except Exception as e:  # noqa: BLE001
            _cache["triton_error"] = f"{type(e).__name__}: {e}"
    return _cache["triton_error"]


def cuda_module():
    """The compiled roberta_fast._C, or None when it was not built (imported lazily, once)."""
    if _cache["cuda_module"] is _UNSET:
        try:
            _cache["cuda_module"] = importlib.import_module("roberta_fast._C")
        except ImportError:
            _cache["cuda_module"] = None
    return _cache["cuda_module"]


def cuda_built() -> bool:
    return cuda_module() is not None


def triton_can_run(device: torch.device) -> bool:
    if _triton_import_error() is not None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpret_mode())


def cuda_can_run(device: torch.device) -> bool:
    return device.type == "cuda" and cuda_built()


def _why_unavailable(backend: str, device: torch.device) -> str | None:
    if backend == "torch":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err is not None:
            return f"backend 'triton' needs the triton package ({err}); install it with `pip install triton`"
        if triton_can_run(device):
            return None
        return (f"backend 'triton' runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1); "
                f"got tensors on {device}")
    if backend == "cuda":
        if not cuda_built():
            return ("backend 'cuda' needs the compiled module roberta_fast._C, which was not built: "
                    "install on a machine with nvcc (CUDA_HOME or PATH) with "
                    "`ROBERTA_FAST_CUDA=1 pip install --no-build-isolation -e .`")
        if not cuda_can_run(device):
            return f"backend 'cuda' runs on CUDA tensors; got tensors on {device}"
        return None
    return f"unknown backend {backend!r}"


def resolve_backend(op: str, backend: str | None, device: torch.device, *,
                    supports=None, tune_key=None) -> str:
    """Pick the backend for one call of `op` on `device`.

    supports: optional callable backend -> None or a reason string why that backend cannot take this
    call (for example an unsupported dtype or head_dim); an automatic choice skips such backends,
    a named one raises with the reason.
    """
    named, source = backend is not None, "backend"
    if backend is None:
        env = os.environ.get("ROBERTA_FAST_BACKEND", "").strip().lower()
        if env and env != "auto":
            backend, named, source = env, True, "ROBERTA_FAST_BACKEND"
    if named:
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"{op}: {source} must be one of {BACKENDS} or None, got {backend!r}")
        missing = ((backend == "triton" and _triton_import_error() is not None)
                   or (backend == "cuda" and not cuda_built()))
        why = _why_unavailable(backend, device)
        if missing:
            raise BackendUnavailableError(f"{op}: {why}")
        if why is None and supports is not None:
            why = supports(backend)
        if why is not None:
            raise ValueError(f"{op}: {why}")
        return backend

    candidates = []
    if tune_key is not None:
        tuned = _tuned_choice(op, tune_key, device)
        if tuned:
            candidates.append(tuned)
    candidates += ["cuda", "triton"] if device.type == "cuda" else []
    for b in candidates:
        if _why_unavailable(b, device) is None and (supports is None or supports(b) is None):
            return b
    return "torch"


def _tuned_choice(op, key, device):
    if device.type != "cuda" or _tuning is None:
        return None
    return _tuning.lookup_backend(op, key, device)


# ----------------------------------------------------------------------------- argument checks


def check_tensor(op: str, name: str, t, *, dtypes=FLOAT_DTYPES, ndim_min: int = 0):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
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
        raise TypeError(f"{op}: {name} must have x's dtype ({str(x.dtype).replace('torch.', '')}) or float32, "
                        f"got {str(p.dtype).replace('torch.', '')}")


def check_shape(op: str, name: str, t, expected: tuple):
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_backend_dtype(op: str, backend: str, name: str, t, dtypes=KERNEL_DTYPES):
    """Reason string if `backend` cannot take t's dtype, else None (for resolve_backend's supports)."""
    if backend != "torch" and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return (f"backend {backend!r} supports {name} dtypes ({names}), "
                f"got {str(t.dtype).replace('torch.', '')}")
    return None


def kernel_module(backend: str, op_file: str):
    """The module holding `op_file`'s host functions for a kernel backend.

    triton: roberta_fast.kernels.<op_file>; cuda: roberta_fast.cuda_ops.<op_file> (thin wrappers
    over roberta_fast._C with the same host-function signatures as the Triton file).
    """
    if backend == "triton":
        return importlib.import_module(f"roberta_fast.kernels.{op_file}")
    if backend == "cuda":
        return importlib.import_module(f"roberta_fast.cuda_ops.{op_file}")
    raise ValueError(f"no kernel module for backend {backend!r}")


# The tuner's cached choices, imported once here (it imports nothing heavy) so that a call traced by
# torch.compile imports nothing; the package works without it.
try:
    from .. import tuning as _tuning
except ImportError:
    _tuning = None
