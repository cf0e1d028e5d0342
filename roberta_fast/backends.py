"""The backend registry: which backend can run a call, why one cannot, and the automatic choice.

Backends, and the module that implements an op on each (`implementation(backend, op)`):
  "torch"   roberta_fast.reference: plain PyTorch on any device; the CPU path and the test oracle
  "triton"  roberta_fast.kernels.<op>: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  "cuda"    roberta_fast.cuda_ops.<op> over the compiled roberta_fast._C: CUDA tensors; CPU tensors
            run through roberta_fast._C_emu, the host build of the same sources, when it is built and
            ROBERTA_FAST_CUDA_EMULATE=1 (that is how CI executes the CUDA kernels; docs/cuda_emulation.md)

A kernel backend's module follows its op's contract, written down once below as a typing.Protocol
(LayerNormBackend, BiasGeluBackend, MaskedSoftmaxBackend, AttentionBackend): `forward`, `backward`
and `unsupported`, which returns why the backend cannot take a call (its own limits: dtypes, widths,
head dims) or None. Those limits live in the backend module and nowhere else.

`resolve(op, backend, device, ...)` picks the backend of one call. backend=None: ROBERTA_FAST_BACKEND_<OP>
(e.g. ROBERTA_FAST_BACKEND_LINEAR=triton) or else ROBERTA_FAST_BACKEND if set (then it counts as named),
else the order measured by `roberta-fast tune` for this op, shape bucket and mode (roberta_fast.tuned),
else the default order for the op and the GPU's compute capability
(DEFAULT_ORDERS: "triton" before "cuda" for attention on sm_90, "cuda" then "triton" elsewhere) on CUDA
tensors, else "torch"; the first that can run the call wins and the automatic choice never raises. A backend named
by the caller that is missing raises BackendUnavailableError saying how to get it; one that exists but
cannot take the call (dtype, head_dim, ...) raises ValueError with its reason.

The ops do not call `resolve` per call: `choose(op, backend, device, signature, ...)` caches its answer
(the backend name and module) per call signature, the op's key of everything the choice depends on
(device, dtypes, the fixed sizes the backends' `unsupported` look at, the shape bucket of the tuned table,
the mode and the backend argument). So the environment (ROBERTA_FAST_BACKEND, ROBERTA_FAST_TUNING,
ROBERTA_FAST_CUDA_EMULATE), the tuned tables and the default order (the device's capability, itself read
once per device) are read once per signature. A change of the tuned
tables (a new tuning saved, `roberta_fast.tuned.reset()`) empties the cache by itself; after changing
one of those environment variables at run time, call `roberta_fast.backends.reset()`. docs/host_path.md.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import torch

from . import cuda_ops, tuned
from ._utils import dtype_name

BACKENDS = ("torch", "triton", "cuda")
# Backends some ops have besides BACKENDS: linear's "cublaslt" (torch._addmm_activation, cuBLASLt's bias+GELU
# epilogue; roberta_fast/ops/linear.py registers its module with `register_implementation`).
OP_BACKENDS = {"linear": ("cublaslt",)}
# Device types whose tensors the registry treats as GPU tensors (the automatic choice tries the default order
# below). "cuda" only; the host-overhead benchmark adds "cpu" in its own process, where a stub CUDA driver
# stands in for the GPU (benchmarks/bench_host.py, docs/host_path.md).
GPU_DEVICE_TYPES = {"cuda"}

# The automatic order on GPU tensors where no tuning covers the call (docs/tuning.md, "The default order"):
# (ops, lowest compute capability, first capability past the range, order); the first row that matches the
# op and the device's capability wins, else GENERAL_ORDER. On Hopper (sm_90) the Triton attention compiles
# to wgmma (HGMMA, checked ahead of time by tests/test_compile_targets.py) while the CUDA C++ attention is
# mma.sync (HMMA) on every GPU, so Triton goes first there. Every other op is memory-bound (no tensor-core
# instruction to choose) and every other GPU keeps the general order: sm_80 / sm_86 / sm_89 have no wgmma
# and both backends run mma.sync; sm_100 is neither compiled nor measured here; sm_120 has no wgmma. A tuned
# order for the call's bucket wins over this table.
DEFAULT_ORDERS = (
    (("attention", "attention_varlen"), (9, 0), (10, 0), ("triton", "cuda")),
    # linear: cuBLAS + separate elementwise ("torch") on every GPU until a tuning measured Triton's and
    # cuBLASLt's epilogues there (docs/tuning.md, "linear: three backends")
    (("linear",), (0, 0), (100, 0), ("torch",)),
)
GENERAL_ORDER = ("cuda", "triton")


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says how to get it."""


# ----------------------------------------------------------------------------- what is installed


def interpret_mode() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def emulate_mode() -> bool:
    """ROBERTA_FAST_CUDA_EMULATE=1: the CUDA backend runs CPU tensors through roberta_fast._C_emu."""
    return os.environ.get("ROBERTA_FAST_CUDA_EMULATE", "0") == "1"


_UNSET = object()
_cache = {"triton_error": _UNSET}


def triton_import_error() -> str | None:
    """Why triton cannot be imported, or None (checked once; plain dict cache so torch.compile traces it)."""
    if _cache["triton_error"] is _UNSET:
        try:
            import triton  # noqa: F401

            _cache["triton_error"] = None
        except Exception as e:  # noqa: BLE001  (a third-party import: any failure means "unavailable")
            _cache["triton_error"] = f"{type(e).__name__}: {e}"
    return _cache["triton_error"]


def cuda_module():
    """The compiled roberta_fast._C, or None when it was not built (imported lazily, once)."""
    return cuda_ops.native_module()


def cuda_built() -> bool:
    return cuda_ops.native_module() is not None


def emulation_built() -> bool:
    return cuda_ops.emulated_module() is not None


_HOW_TO_BUILD = ("install on a machine with nvcc (CUDA_HOME or PATH) with "
                 "`ROBERTA_FAST_CUDA=1 pip install --no-build-isolation -e .`")


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run any call on `device`, or None when it can."""
    if backend == "torch":
        return None
    if backend == "cublaslt":  # torch._addmm_activation: any device (ops/linear.py gives CPU the same semantics)
        return None
    if backend == "triton":
        err = triton_import_error()
        if err is not None:
            return f"backend 'triton' needs the triton package ({err}); install it with `pip install triton`"
        if device.type in GPU_DEVICE_TYPES or (device.type == "cpu" and interpret_mode()):
            return None
        return (f"backend 'triton' runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1); "
                f"got tensors on {device}")
    if backend == "cuda":
        if device.type == "cpu" and emulate_mode():
            return None if emulation_built() else ("backend 'cuda' on CPU tensors runs through the emulated build "
                                                   "roberta_fast._C_emu, which was not built: reinstall with a "
                                                   "host C++ compiler (`pip install --no-build-isolation -e .`; "
                                                   "see docs/cuda_emulation.md)")
        if not cuda_built():
            return f"backend 'cuda' needs the compiled module roberta_fast._C, which was not built: {_HOW_TO_BUILD}"
        if device.type == "cuda":
            return None
        return (f"backend 'cuda' runs on CUDA tensors (or on CPU tensors through the emulation, "
                f"ROBERTA_FAST_CUDA_EMULATE=1); got tensors on {device}")
    return f"unknown backend {backend!r}"


def can_run(backend: str, device: torch.device) -> bool:
    return why_unavailable(backend, device) is None


def available(device: torch.device) -> dict:
    """{backend: None (can run here) or the reason it cannot} for every backend."""
    return {b: why_unavailable(b, device) for b in BACKENDS}


def _missing(backend: str, device: torch.device) -> bool:
    """The backend is not installed at all (as opposed to: installed, but not for this device)."""
    if backend == "triton":
        return triton_import_error() is not None
    if backend == "cuda":
        return not (cuda_built() or (device.type == "cpu" and emulate_mode() and emulation_built()))
    return False


_IMPLS: dict = {}  # (backend, op) -> module, filled on first use


def register_implementation(backend: str, op: str, module):
    """An op file hands the registry a backend module it defines itself (linear's "cublaslt" and its "cuda"
    stub, roberta_fast/ops/linear.py), so that the registry never imports upwards."""
    _IMPLS[(backend, op)] = module


def implementation(backend: str, op: str):
    """The module that implements `op` on a kernel backend: roberta_fast.kernels.<op> ("triton") or
    roberta_fast.cuda_ops.<op> ("cuda"). Imported on first use (the package needs neither), with import
    statements rather than importlib, so that torch.compile traces a call through it; then a dict lookup."""
    mod = _IMPLS.get((backend, op))
    if mod is None:
        mod = _IMPLS[(backend, op)] = _import_implementation(backend, op)
    return mod


def _import_implementation(backend: str, op: str):
    if backend == "triton":
        from .kernels import attention, bias_gelu, layer_norm, linear, linear_cross_entropy, masked_softmax

        _connect_kernels()
    elif backend == "cuda":
        from .cuda_ops import attention, bias_gelu, layer_norm, masked_softmax

        linear_cross_entropy = NoCudaLinearCrossEntropy  # no CUDA C++ kernel: it says why
        linear = None  # registered by roberta_fast/ops/linear.py (NoCudaLinear)
    else:
        raise ValueError(f"no kernel module for backend {backend!r}")
    mods = {"layer_norm": layer_norm, "bias_gelu": bias_gelu, "masked_softmax": masked_softmax,
            "attention": attention, "attention_varlen": attention, "linear_cross_entropy": linear_cross_entropy,
            "linear": linear}
    if op not in mods or mods[op] is None:
        raise ValueError(f"unknown op {op!r}: expected one of {tuple(mods)}")
    return mods[op]


@tuned.assume_constant  # no arguments, no result: torch.compile runs it for real when it traces a first use
def _connect_kernels():
    """The Triton kernel files get the tuned configs (roberta_fast.tuned) now and whenever they change: they
    may not import the tuned cache themselves (imports flow downwards), so the registry connects them when it
    first hands one out."""
    from .kernels import attention, bias_gelu, layer_norm, linear, masked_softmax

    for mod in (attention, bias_gelu, layer_norm, masked_softmax, linear):
        tuned.on_configs(mod.install_tuned)


# ----------------------------------------------------------------------------- the default order

_CAPABILITY: dict = {}  # CUDA device index -> (major, minor), or None when it cannot be read


def capability(device: torch.device) -> tuple | None:
    """The compute capability of a CUDA device, read once per device (None for other device types or when it
    cannot be read): a dict lookup after the first call, no CUDA call per op call."""
    if device.type != "cuda":
        return None
    index = device.index
    if index in _CAPABILITY:
        return _CAPABILITY[index]
    return _read_capability(index)


@tuned.assume_constant  # torch.compile runs it for real once and keeps the answer
def _read_capability(index) -> tuple | None:
    try:
        cap = tuple(torch.cuda.get_device_capability(torch.cuda.current_device() if index is None else index))
    except Exception:  # noqa: BLE001  (no driver, no such device: the general order)
        cap = None
    _CAPABILITY[index] = cap
    return cap


def default_order(op: str, device: torch.device) -> tuple:
    """The automatic order of the kernel backends for `op` on a GPU device where nothing tuned covers the
    call: the first row of DEFAULT_ORDERS that matches the op and the device's capability, else
    GENERAL_ORDER (also for device types other than "cuda", e.g. the host benchmark's stub)."""
    cap = capability(device)
    for ops, lo, hi, order in DEFAULT_ORDERS:
        # a device whose capability is unknown (the host benchmark's stub) matches the rows for every GPU only
        if op in ops and (lo <= cap < hi if cap is not None else lo == (0, 0)):
            return order
    return GENERAL_ORDER


# ----------------------------------------------------------------------------- the choice


def resolve(op: str, backend: str | None, device: torch.device, *, unsupported=None, tune_key=None,
            mode: str = "fwd") -> str:
    """Pick the backend of one call of `op` on `device`.

    unsupported  optional callable backend -> None or why that backend cannot take this call (the
                 backend module's own `unsupported`, bound to the call's arguments); the automatic
                 choice skips such backends, a named one raises ValueError with the reason
    tune_key     the op's shape key for the tuned-choice cache (None: no lookup)
    mode         "fwd" or "train" (inputs need gradients): which measurements apply
    """
    named, source = backend is not None, "backend"
    if backend is None:
        var = f"ROBERTA_FAST_BACKEND_{op.upper()}"  # one op's (e.g. ROBERTA_FAST_BACKEND_LINEAR) before all ops'
        env = os.environ.get(var, "").strip().lower()
        if not env or env == "auto":
            var = "ROBERTA_FAST_BACKEND"
            env = os.environ.get(var, "").strip().lower()
        if env and env != "auto":
            backend, named, source = env, True, var
    if named:
        allowed = BACKENDS + OP_BACKENDS.get(op, ())
        if not isinstance(backend, str) or backend not in allowed:
            raise ValueError(f"{op}: {source} must be one of {allowed} or None, got {backend!r}")
        why = why_unavailable(backend, device)
        if why is not None and _missing(backend, device):
            raise BackendUnavailableError(f"{op}: {why}")
        if why is None and unsupported is not None and backend != "torch":
            why = unsupported(backend)
        if why is not None:
            raise ValueError(f"{op}: {why}")
        if backend == "triton" and tune_key is not None:
            tuned.load(device)  # the kernels use the tuned block configs of this GPU, named or not
        return backend

    candidates = ()
    if tune_key is not None:
        candidates = tuned.lookup(op, tune_key, device, mode) or ()
    if device.type in GPU_DEVICE_TYPES:
        candidates += default_order(op, device)
    for b in candidates:
        if b == "torch":
            return b
        if can_run(b, device) and (unsupported is None or unsupported(b) is None):
            return b
    return "torch"


# ----------------------------------------------------------------------------- the resolve cache

# (op, backend argument, device, signature, mode) -> (backend name, its module or None for "torch")
_RESOLVED: dict = {}
_RESOLVED_MAX = 8192  # distinct signatures kept (a server with ever new shapes starts over past this)


def choose(op: str, backend: str | None, device: torch.device, signature, mode: str, *, unsupported=None,
           tune_key=None):
    """`resolve` once per call signature: (backend name, implementation module or None for "torch").

    signature  a hashable the op builds from everything the choice depends on besides `backend`, `device`
               and `mode`: dtypes, the fixed sizes the backends' `unsupported` look at, and the shape bucket
               of `tune_key` (roberta_fast.tuned.bucket); calls with equal signatures get the same answer
    tune_key   as in `resolve`, except that torch.dtype entries may be given as dtypes (named on a miss only)
    The rest as in `resolve`, which runs (and may raise) on the first call of a signature only. The cache
    is emptied by `reset()` and whenever the tuned tables change."""
    key = (op, backend, device, signature, mode)
    hit = _RESOLVED.get(key)
    if hit is None:
        if tune_key is not None:  # torch.dtype entries by name, as the tuned tables keep them
            tune_key = tuple(dtype_name(k) if isinstance(k, torch.dtype) else k for k in tune_key)
        b = resolve(op, backend, device, unsupported=unsupported, tune_key=tune_key, mode=mode)
        hit = (b, None if b == "torch" else implementation(b, op))
        if len(_RESOLVED) >= _RESOLVED_MAX:
            _RESOLVED.clear()
        _RESOLVED[key] = hit
    return hit


def reset():
    """Forget every cached choice and the tuned tables: the next call of each signature reads the
    environment (ROBERTA_FAST_BACKEND, ROBERTA_FAST_TUNING, ROBERTA_FAST_CUDA_EMULATE) and the tuning
    cache again. Call it after changing one of those variables at run time."""
    _RESOLVED.clear()
    _CAPABILITY.clear()
    tuned.reset()


tuned.on_change(_RESOLVED.clear)  # a new tuning (saved, reset, cleared, first read) is seen at once


# ----------------------------------------------------------------------------- the contracts
# Every kernel backend module of an op (kernels/<op>.py, cuda_ops/<op>.py) has these functions with
# these parameters. Inputs arrive checked and laid out by roberta_fast.ops: rows / head_dim with a
# unit last stride, parameters contiguous, one device. Shapes and dtypes: docs/kernel_contracts.md.


@runtime_checkable
class LayerNormBackend(Protocol):
    def unsupported(self, x, weight, bias, eps, residual, x_bias) -> str | None:
        """Why this backend cannot take the call, or None."""

    def forward(self, x, weight, bias, eps, residual, x_bias, dropout_p, rng):
        """x (M, N) -> (y (M, N) x.dtype, mean (M,) fp32, rstd (M,) fp32) of LN(dropout(x + x_bias) + residual);
        rng (2,) int64 (seed, offset) on x's device, None exactly when dropout_p == 0."""

    def forward_inference(self, x, weight, bias, eps, residual, x_bias, dropout_p, rng):
        """x (M, N) -> y (M, N) x.dtype, the statistics not kept (inference: the op layer's direct call)."""

    def backward(self, dy, x, weight, bias, mean, rstd, residual, x_bias, dropout_p, rng):
        """-> (dx (M, N), dweight, dbias, dx_bias, dresidual) (None where the parameter is None; dresidual =
        dL/dh (M, N) only with dropout and a residual, else None: the residual's gradient is then dx)."""


@runtime_checkable
class BiasGeluBackend(Protocol):
    def unsupported(self, x, bias, approximate) -> str | None:
        """Why this backend cannot take the call, or None."""

    def forward(self, x, bias, approximate):
        """x (M, N) -> y (M, N) x.dtype."""

    def backward(self, dy, x, bias, approximate):
        """-> (dx (M, N) x.dtype, dbias (N,) bias.dtype or None)."""


@runtime_checkable
class MaskedSoftmaxBackend(Protocol):
    def unsupported(self, scores, mask, scale) -> str | None:
        """Why this backend cannot take the call, or None."""

    def forward(self, scores, mask, scale):
        """scores (B, H, Q, K), mask None or a (B, H, Q, K) view -> probs (B, H, Q, K) contiguous."""

    def backward(self, dprobs, probs, scale):
        """-> dscores (B, H, Q, K) contiguous."""


@runtime_checkable
class AttentionBackend(Protocol):
    def unsupported(self, q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale) -> str | None:
        """Why this backend cannot take the call (forward or backward), or None."""

    def forward(self, q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p, rng):
        """padded (B, S, H, D) or varlen (T, H, D) -> (o like q, lse (B, H, S) or (H, T) fp32). dropout_p in
        [0, 1) on the probabilities; rng None exactly when dropout_p == 0, else int64 (2,) (seed, offset)."""

    def forward_inference(self, q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p, rng):
        """-> o like q, lse not kept (inference: the op layer's direct call)."""

    def backward(self, do, q, k, v, o, lse, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p, rng):
        """-> (dq, dk, dv) like q; the forward's dropout mask regenerated from the same rng."""


@runtime_checkable
class LinearCrossEntropyBackend(Protocol):
    def unsupported(self, hidden, weight, bias, labels, ignore_index, label_smoothing) -> str | None:
        """Why this backend cannot take the call, or None."""

    def forward(self, hidden, weight, bias, labels, ignore_index, label_smoothing):
        """hidden (M, H), weight (V, H), bias (V,) or None, labels (M,) int64 -> (loss (M,) fp32, 0 at ignored
        rows; lse (M,) fp32), never making an (M, V) tensor."""

    def backward(self, dloss, hidden, weight, bias, labels, lse, ignore_index, label_smoothing):
        """dloss (M,) fp32 -> (dhidden (M, H) hidden.dtype, dweight (V, H) weight.dtype, dbias (V,) or None),
        the logits recomputed chunk by chunk."""


class NoCudaLinearCrossEntropy:
    """The "cuda" backend of linear_cross_entropy: there is no CUDA C++ kernel for it (optional; Triton's
    covers GPUs), so `unsupported` says so and the automatic choice moves on to "triton"."""

    @staticmethod
    def unsupported(hidden, weight, bias, labels, ignore_index, label_smoothing):
        return ("backend 'cuda' has no linear_cross_entropy kernel (CUDA C++ is optional for this op); "
                "use backend='triton' or 'torch'")

    @staticmethod
    def forward(hidden, weight, bias, labels, ignore_index, label_smoothing):
        raise NotImplementedError(NoCudaLinearCrossEntropy.unsupported(None, None, None, None, None, None))

    @staticmethod
    def backward(dloss, hidden, weight, bias, labels, lse, ignore_index, label_smoothing):
        raise NotImplementedError(NoCudaLinearCrossEntropy.unsupported(None, None, None, None, None, None))


@runtime_checkable
class LinearBackend(Protocol):
    def unsupported(self, x, weight, bias, activation, residual) -> str | None:
        """Why this backend cannot take the call, or None."""

    def forward(self, x, weight, bias, activation, residual, save_pre):
        """x (M, K), weight (N, K), bias (N,) or None (x's dtype, contiguous), residual (M, N) or None, activation
        "none" | "gelu" | "gelu_tanh" -> (y (M, N) x.dtype, pre = x W^T + b (M, N) when save_pre and an activation
        is set, else an empty tensor)."""

    def forward_inference(self, x, weight, bias, activation, residual):
        """-> y (M, N) x.dtype (inference: the op layer's direct call, no pre-activation)."""

    def backward(self, dy, x, weight, bias, pre, activation, needs=(True, True, True)):
        """dy (M, N) contiguous -> (dx (M, K), dweight (N, K), dbias (N,) or None); gelu' from the saved pre.
        needs: which of (dx, dweight, dbias) autograd asks for; the others are None and not computed."""


CONTRACTS = {"layer_norm": LayerNormBackend, "bias_gelu": BiasGeluBackend,
             "masked_softmax": MaskedSoftmaxBackend, "attention": AttentionBackend,
             "linear_cross_entropy": LinearCrossEntropyBackend, "linear": LinearBackend}
