"""Host overhead: the host time of the GPU path, per op and per model forward, beside plain PyTorch ops and
transformers eager / SDPA in the same run, with Python-call and launch counts per forward
(`roberta-fast bench --only host`; docs/host_path.md).

Without a GPU (the CPU run) the real host-side code of the GPU path runs in a child process, stopping at the
CUDA driver:
  - a stub libcuda.so.1 (STUB_LIBCUDA below, built with the host C compiler on first use) answers every
    driver call Triton makes with success; cuLaunchKernelEx returns at once and counts the launch;
  - Triton's real NVIDIA driver runs on top of it (triton.backends.nvidia.driver.CudaDriver, its C launcher
    module built and linked against the stub), made to report device 0, stream 0 and compute capability 9.0;
    kernels are compiled for real to sm_90 cubins by Triton's own ptxas on their first launch, then launched
    through the real launcher (argument packing included) down to the stub's cuLaunchKernelEx;
  - the registry treats CPU tensors as GPU tensors (roberta_fast.backends.GPU_DEVICE_TYPES gets "cpu"), so
    the automatic choice, the caches, the op layer and the host functions run as for CUDA tensors;
  - the CUDA C++ backend's module is the emulated build's pybind11 binding (roberta_fast._C_emu) called with
    M = 0 rows, so the argument conversion runs and the launcher returns before any kernel.
Not measured there: the CUDA caching allocator (the CPU allocator serves torch.empty), torch's current-stream
and current-device queries (stubbed to 0), the driver's own launch cost (~2-5 us per launch on a real GPU,
for aten's kernels and ours alike) and GEMM / cuBLAS host paths on CUDA tensors.
The op rows use float16 CPU tensors (no kernel runs); the model rows run roberta-base's structure (12 layers,
the same modules and op sequence) at widths whose CPU arithmetic is negligible (hidden 16, 1 head of 16, FFN
64, batch 1 x 128 tokens) in float32, so their wall time is host time. Baselines run in the same process on
float32 CPU tensors of tiny sizes: there the CPU kernel is negligible and an aten op's time is its dispatch,
allocation and call (the CPU's float16 kernels take slow paths). One intra-op thread (torch.set_num_threads(1)).

On a GPU the same rows time the real thing (CUDA tensors, real launches, roberta-base at full width): CPU
timestamps around N calls with the GPU kept ahead (small inputs), host time per call.

Timing: rounds interleave every candidate of a table (so a busy shared CPU hits them alike); each round
times a loop of calls; a row reports the best and the median round, in microseconds per call. Targets
(judged on the best rounds): every fused op <= 3x one plain aten op (F.layer_norm); a roberta-base forward
<= 0.5x transformers eager's.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

OP_TARGET = 3.0  # a fused op's host time <= OP_TARGET x one plain aten op's
FORWARD_TARGET = 0.5  # a roberta-base forward's host time <= FORWARD_TARGET x transformers eager's
TINY_WIDTHS = {"hidden_size": 16, "num_attention_heads": 1, "intermediate_size": 64}

STUB_LIBCUDA = r"""
/* A stand-in for libcuda.so.1: every driver call Triton's launcher makes succeeds, no GPU is touched.
   roberta_fast benchmarks/bench_host.py builds it; cuLaunchKernelEx only counts. */
#include <cuda.h>
static int ctx_token, mod_token, fn_token;
unsigned long long roberta_fast_stub_launches = 0;
CUresult CUDAAPI cuInit(unsigned int f) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuDriverGetVersion(int *v) { *v = 12080; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDeviceGet(CUdevice *d, int o) { *d = o; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDeviceGetCount(int *c) { *c = 1; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetCurrent(CUcontext *c) { *c = (CUcontext)&ctx_token; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxSetCurrent(CUcontext c) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetDevice(CUdevice *d) { *d = 0; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetLimit(size_t *v, CUlimit l) { *v = 0; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxSetLimit(CUlimit l, size_t v) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) { *c = (CUcontext)&ctx_token; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDeviceGetAttribute(int *v, CUdevice_attribute a, CUdevice d) {
  switch (a) {
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = 232448; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *v = 49152; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = 132; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = 0; break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
    case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *v = 1980000; break;
    case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *v = 2619000; break;
    case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *v = 6144; break;
    default: *v = 1; break;
  }
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuModuleLoadData(CUmodule *m, const void *img) { *m = (CUmodule)&mod_token; return CUDA_SUCCESS; }
CUresult CUDAAPI cuModuleUnload(CUmodule m) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuModuleGetFunction(CUfunction *f, CUmodule m, const char *n) {
  *f = (CUfunction)&fn_token; return CUDA_SUCCESS; }
CUresult CUDAAPI cuFuncGetAttribute(int *v, CUfunction_attribute a, CUfunction f) {
  *v = a == CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK ? 1024 : (a == CU_FUNC_ATTRIBUTE_NUM_REGS ? 32 : 0);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuFuncSetCacheConfig(CUfunction f, CUfunc_cache c) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuPointerGetAttribute(void *d, CUpointer_attribute a, CUdeviceptr p) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuPointerGetAttributes(unsigned int n, CUpointer_attribute *a, void **d, CUdeviceptr p) {
  return CUDA_SUCCESS; }
CUresult CUDAAPI cuStreamIsCapturing(CUstream s, CUstreamCaptureStatus *st) {
  *st = CU_STREAM_CAPTURE_STATUS_NONE; return CUDA_SUCCESS; }
CUresult CUDAAPI cuGetErrorString(CUresult e, const char **s) { *s = "stub"; return CUDA_SUCCESS; }
CUresult CUDAAPI cuGetErrorName(CUresult e, const char **s) { *s = "stub"; return CUDA_SUCCESS; }
CUresult CUDAAPI cuOccupancyMaxActiveClusters(int *n, CUfunction f, const CUlaunchConfig *c) {
  *n = 1; return CUDA_SUCCESS; }
CUresult CUDAAPI cuLaunchKernelEx(const CUlaunchConfig *c, CUfunction f, void **p, void **e) {
  roberta_fast_stub_launches++; return CUDA_SUCCESS; }
CUresult CUDAAPI cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                                unsigned int by, unsigned int bz, unsigned int sm, CUstream s, void **p, void **e) {
  roberta_fast_stub_launches++; return CUDA_SUCCESS; }
"""


# ----------------------------------------------------------------------------- the stub (CPU, child process)


def stub_dir() -> Path:
    """Where the stub libcuda.so.1 is built: the roberta_fast cache directory, one folder per source hash."""
    base = os.environ.get("ROBERTA_FAST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "roberta_fast")
    digest = hashlib.sha1(STUB_LIBCUDA.encode()).hexdigest()[:12]
    return Path(base) / f"stub_libcuda_{digest}"


def build_stub_libcuda() -> Path:
    """Compile STUB_LIBCUDA against the cuda.h that ships inside Triton (once; cached)."""
    import triton

    out = stub_dir()
    lib = out / "libcuda.so.1"
    if lib.exists():
        return lib
    inc = Path(triton.__file__).parent / "backends" / "nvidia" / "include"
    out.mkdir(parents=True, exist_ok=True)
    src = out / "stub_libcuda.c"
    src.write_text(STUB_LIBCUDA)
    cc = os.environ.get("CC", "cc")
    tmp = out / f"libcuda.so.1.{os.getpid()}.tmp"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", f"-I{inc}", str(src), "-o", str(tmp)],
                   check=True, capture_output=True, text=True)
    os.replace(tmp, lib)
    return lib


class _Stub:
    """The installed stub: its launch counter."""

    def __init__(self, lib):
        self._count = ctypes.c_ulonglong.in_dll(lib, "roberta_fast_stub_launches")

    def launches(self) -> int:
        return int(self._count.value)


def install_stub() -> _Stub:
    """Make this process's GPU path end at the stub driver (see the module docstring). Must run before triton's
    kernels are decorated with TRITON_INTERPRET=1 in effect, i.e. in a process started without it."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the host benchmark's stub needs a process without TRITON_INTERPRET=1")
    path = build_stub_libcuda()
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)  # dlopen("libcuda.so.1") now finds it by soname
    os.environ["TRITON_LIBCUDA_PATH"] = str(path.parent)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.nvidia.driver import CudaDriver

    class StubDriver(CudaDriver):
        """Triton's NVIDIA driver over the stub libcuda, without torch.cuda (device 0, stream 0, sm_90)."""

        def __init__(self):
            super().__init__()
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda device=None: 0
            self.get_device_capability = lambda device=None: (9, 0)

        def get_active_torch_device(self):
            return torch.device("cpu")

    triton.runtime.driver.set_active(StubDriver())
    # one intra-op thread: on a GPU aten's host side is single-threaded, and on a shared CPU a second OpenMP
    # thread waiting for a busy core turns microsecond ops into milliseconds
    torch.set_num_threads(1)

    from roberta_fast import backends, cuda_ops

    backends.GPU_DEVICE_TYPES.add("cpu")
    # the model rows run in float32 (the CPU's float16 GEMMs are ~100x slower): let both attention backends
    # take it here, as they take float16 on a GPU (the same host code for every dtype)
    from roberta_fast.kernels import attention as triton_attention

    from roberta_fast.cuda_ops import attention as cuda_attention

    triton_attention.KERNEL_DTYPES = (*triton_attention.KERNEL_DTYPES, torch.float32)
    cuda_attention.DTYPES = (*cuda_attention.DTYPES, torch.float32)
    emu = cuda_ops.emulated_module()
    if emu is not None:
        cuda_ops._modules["roberta_fast._C_emu"] = _ZeroRowsModule(emu)
    backends.reset()
    return _Stub(lib)


class _ZeroRowsModule:
    """The emulated build's module with every kernel entry called for zero rows: pybind11 converts every
    argument and fills the params struct, then the launcher returns before a kernel (M <= 0)."""

    def __init__(self, mod):
        self.DTYPES = mod.DTYPES
        self.KERNELS = mod.KERNELS
        self.__name__ = mod.__name__
        for name in mod.KERNELS:
            setattr(self, name, self._wrap(getattr(mod, name), name))

    @staticmethod
    def _wrap(fn, name):
        from roberta_fast.cuda_ops._common import ARGS

        # the positions of the row / batch counts (every binding has one) in the positional call (_common.ARGS)
        at = [i for i, a in enumerate(ARGS[name]) if a in ("M", "B", "batch", "total_rows")]
        if len(at) == 1:  # one count: a tuple slice, as cheap as the rest of a launch's argument passing
            i = at[0]

            def call(*args):
                return fn(*args[:i], 0, *args[i + 1:])
        else:
            def call(*args):
                args = list(args)
                for i in at:
                    args[i] = 0
                return fn(*args)

        return call


# ----------------------------------------------------------------------------- timing


def time_interleaved(fns: dict, *, rounds: int = 15, target_s: float = 0.02, sync=None) -> dict:
    """{name: (best, median) microseconds per call}: rounds interleave the candidates; each round times a loop
    of n calls (n chosen so a loop takes about target_s)."""
    loops = {}
    for name, fn in fns.items():
        fn()
        fn()
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        dt = max(time.perf_counter() - t0, 1e-6)
        loops[name] = max(1, min(20000, int(target_s / dt)))
    samples: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = loops[name]
            if sync:
                sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if sync:
                sync()
            samples[name].append((time.perf_counter() - t0) / n * 1e6)
    out = {}
    for name, s in samples.items():
        s = sorted(s)
        out[name] = (s[0], s[len(s) // 2])
    return out


def count_python_calls(fn) -> int:
    """Python function calls (profile 'call' events, frames of Python code) during one fn()."""
    n = [0]

    def prof(frame, event, arg):
        if event == "call":
            n[0] += 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n[0]


def count_launches(fn, stub: _Stub | None) -> int:
    """Kernel launches of one fn(): aten ops that are not views (each launches at least one kernel on a GPU;
    our custom ops excluded) plus, with the stub, the launches that reached the stub driver."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .layers import VIEW_OPS, _op_name

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = _op_name(func)
            if name not in VIEW_OPS and not name.startswith("roberta_fast::"):
                _Count.n += 1
            return func(*args, **(kwargs or {}))

    before = stub.launches() if stub else 0
    with _Count():
        fn()
    return _Count.n + ((stub.launches() - before) if stub else 0)


# ----------------------------------------------------------------------------- the cases


def op_cases(device, dtype) -> dict:
    """The fused ops at roberta-base's sizes (batch 1 x 128 tokens), as the model calls them."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    T, H, D, I = 128, 12, 64, 3072
    Hd = H * D
    x, res = r(T, Hd), r(T, Hd)
    w, b, xb = r(Hd), r(Hd), r(Hd)
    f1, fb = r(T, I), r(I)
    scores = r(1, H, T, T)
    mask = torch.ones(1, 1, 1, T, dtype=torch.bool, device=device)
    qkv = r(T, 3, H, D)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, T], dtype=torch.int32, device=device)
    pq, pk, pv = (t.view(1, T, H, D) for t in (q, k, v))
    kpm = torch.ones(1, T, dtype=torch.bool, device=device)
    return {
        "layer_norm": ("layer_norm", "x (128, 768), residual, x_bias, weight, bias",
                       dict(args=(x, w, b, 1e-5), kwargs=dict(residual=res, x_bias=xb))),
        "bias_gelu": ("bias_gelu", "x (128, 3072), bias", dict(args=(f1, fb), kwargs={})),
        "masked_softmax": ("masked_softmax", "scores (1, 12, 128, 128), bool mask (1, 1, 1, 128)",
                           dict(args=(scores, mask, 0.125), kwargs={})),
        "attention_varlen": ("attention_varlen", "q, k, v (128, 12, 64) views of one QKV, 1 sequence",
                             dict(args=(q, k, v, cu, T), kwargs={})),
        "attention": ("attention", "q, k, v (1, 128, 12, 64), key_padding_mask",
                      dict(args=(pq, pk, pv), kwargs=dict(key_padding_mask=kpm))),
    }


def baseline_cases(device, dtype) -> dict:
    """Plain PyTorch: one aten op on a tiny tensor (its host time; the op target's unit) and eager versions of
    each fused op on tiny tensors (what the fused op replaces, in plain PyTorch)."""
    import torch.nn.functional as F

    if device.type == "cpu":
        dtype = torch.float32  # the CPU's float16 kernels take slow paths that say nothing about host time
    x = torch.randn(2, 8, device=device).to(dtype)
    w, b = torch.ones(8, device=device, dtype=dtype), torch.zeros(8, device=device, dtype=dtype)
    s = torch.randn(1, 2, 2, 8, device=device).to(dtype)
    m = torch.ones(1, 1, 1, 8, dtype=torch.bool, device=device)
    q = torch.randn(1, 2, 8, 16, device=device).to(dtype)
    return {
        "F.layer_norm": lambda: F.layer_norm(x, (8,), w, b, 1e-5),
        "torch.add": lambda: torch.add(x, x),
        "eager layer_norm (add, add, F.layer_norm)": lambda: F.layer_norm(x + b + x, (8,), w, b, 1e-5),
        "eager bias_gelu (add, F.gelu)": lambda: F.gelu(x + b),
        "eager masked_softmax (mul, masked_fill, softmax)": lambda: torch.softmax(
            (s * 0.125).masked_fill(~m, float("-inf")), -1),
        "F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(q, q, q),
    }


def _call(op_fn, case):
    return lambda: op_fn(*case["args"], **case["kwargs"])


def _bound_call(op: str, case):
    """The call as the model's inference path makes it: the op bound once (ops.trusted.bind_*, under
    inference_mode), then its backend's inference function called directly. None for an op the model does not
    bind (masked_softmax: only output_attentions uses it) or where binding says no."""
    from roberta_fast.ops import trusted

    a, kw = case["args"], case["kwargs"]
    with torch.inference_mode():
        if op == "layer_norm":
            x, w, b, eps = a
            fn = trusted.bind_layer_norm(x, w, b, kw.get("residual"), kw.get("x_bias"))
            return fn and (lambda: fn(x, w, b, eps, kw.get("residual"), kw.get("x_bias")))
        if op == "bias_gelu":
            fn = trusted.bind_bias_gelu(a[0], a[1], "none")
            return fn and (lambda: fn(a[0], a[1], "none"))
        if op == "attention_varlen":
            q, k, v, cu, ms = a
            fn = trusted.bind_attention_varlen(q, k, v, cu, ms)
            return fn and (lambda: fn(q, k, v, cu, ms, q.shape[-1] ** -0.5))
        if op == "attention":
            q, k, v = a
            fn = trusted.bind_attention(q, k, v, kw.get("key_padding_mask"))
            return fn and (lambda: fn(q, k, v, kw.get("key_padding_mask"), q.shape[-1] ** -0.5))
    return None


def _env_rec(stub: bool) -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "stub_driver": stub}


# ----------------------------------------------------------------------------- the suites


def measure_ops(device, dtype, stub, *, rounds: int, backends_to_run=("triton", "cuda")) -> list[dict]:
    from roberta_fast import backends, ops
    from roberta_fast.ops import trusted

    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    cases = op_cases(device, dtype)
    base = baseline_cases(device, dtype)
    for be in backends_to_run:
        if device.type == "cpu":
            # the automatic choice as on a GPU: "cuda" when its module is there, else "triton"
            os.environ["ROBERTA_FAST_CUDA_EMULATE"] = "1" if be == "cuda" else "0"
            backends.reset()
        chosen = {}
        ready = {}
        for name, (op, label, case) in cases.items():
            pub, tr = getattr(ops, op), getattr(trusted, op)
            try:
                with torch.inference_mode():
                    pub(*case["args"], **case["kwargs"])  # first call: compile / resolve / check
                chosen[name] = next((v[0] for k, v in backends._RESOLVED.items() if k[0] == op), "?")
            except Exception as e:  # noqa: BLE001
                rows.append(_row("op", name, f"roberta_fast ({be})", label, error=f"{type(e).__name__}: {e}"))
                continue
            if chosen[name] != be:
                rows.append(_row("op", name, f"roberta_fast ({be})", label,
                                 error=f"skipped: the automatic choice here is {chosen[name]!r}"))
                continue
            ready[name] = (pub, tr, case, _bound_call(op, case))
        # one table per grad mode, the whole table timed inside it (no context manager per call); each table
        # has its own unit, F.layer_norm, timed in the same rounds
        for how, mode in (("inference_mode", torch.inference_mode), ("no_grad", torch.no_grad)):
            fns = dict(base) if (be == backends_to_run[0] and how == "inference_mode") else {
                "F.layer_norm": base["F.layer_norm"]}
            for name, (pub, tr, case, bound) in ready.items():
                fns[f"{name}|{how}"] = _call(pub, case)
                if how == "inference_mode" and tr is not None:
                    fns[f"{name}|trusted, {how}"] = _call(tr, case)
                if how == "inference_mode" and bound is not None:
                    fns[f"{name}|bound (the model's inference path), {how}"] = bound
            with mode():
                res = time_interleaved(fns, rounds=rounds, sync=sync)
            unit = res["F.layer_norm"][0]
            for k, (best, med) in res.items():
                if "|" not in k:
                    where = "tiny CPU tensors" if device.type == "cpu" else "tiny CUDA tensors"
                    rows.append(_row("baseline", k, f"torch (the {be} table, {how})", where, us=best, us_median=med,
                                     ratio=best / unit))
                    continue
                name, hw = k.split("|")
                ratio = best / unit
                rows.append(_row("op", name, f"roberta_fast ({be}), {hw}", cases[name][1], us=best,
                                 us_median=med, ratio=ratio, target=OP_TARGET, ok=ratio <= OP_TARGET))
    return rows


def _row(kind, name, provider, label, *, us=None, us_median=None, ratio=None, target=None, ok=None,
         python_calls=None, launches=None, error=None) -> dict:
    return {"suite": "host", "kind": kind, "name": name, "provider": provider, "label": label, "us": us,
            "us_median": us_median, "ratio": ratio, "target": target, "ok": ok, "python_calls": python_calls,
            "launches": launches, "error": error}


def _model_config(device):
    from transformers import RobertaConfig

    from .bench_encoder import BASE, MODELS

    widths = MODELS["roberta-base"] if device.type == "cuda" else {**MODELS["roberta-base"], **TINY_WIDTHS}
    cfg = dict(BASE, **widths)
    if device.type != "cuda":
        cfg.update(vocab_size=1000, max_position_embeddings=160)
    return RobertaConfig(**cfg)


def measure_forward(device, dtype, stub, *, rounds: int, backends_to_run=("triton", "cuda")) -> list[dict]:
    """roberta-base forward, batch 1 x 128 tokens, inference: transformers eager and SDPA, roberta_fast per kernel
    backend (its encoder's inference path: docs/host_path.md)."""
    import copy

    from transformers import AutoModel

    from roberta_fast import backends
    from roberta_fast.optimize import optimize

    cfg = _model_config(device)
    torch.manual_seed(0)
    ref = AutoModel.from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(3, cfg.vocab_size, (1, 128), device=device)
    mask = torch.ones(1, 128, dtype=torch.long, device=device)
    label = (f"roberta-base, batch 1 x 128 tokens, {str(dtype).removeprefix('torch.')}" +
             ("" if device.type == "cuda" else f", widths {TINY_WIDTHS} (CPU arithmetic negligible)"))
    models = {}
    for impl in ("eager", "sdpa"):
        m = copy.deepcopy(ref)
        m.config._attn_implementation = impl
        models[f"transformers {impl}"] = (m.to(device=device, dtype=dtype), None)
    for be in backends_to_run:
        models[f"roberta_fast ({be})"] = (optimize(copy.deepcopy(ref)).to(device=device, dtype=dtype), be)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    rows = []

    def fwd(model):
        def run():
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=mask)
        return run

    fns, counts = {}, {}
    for be in (None, *backends_to_run):
        if device.type == "cpu" and be is not None:
            os.environ["ROBERTA_FAST_CUDA_EMULATE"] = "1" if be == "cuda" else "0"
            backends.reset()
        for name, spec in models.items():
            if spec[1] != be:
                continue
            fn = fwd(spec[0])
            try:
                fn()
                fn()
                counts[name] = (count_python_calls(fn), count_launches(fn, stub))
            except Exception as e:  # noqa: BLE001
                rows.append(_row("forward", name, name, label, error=f"{type(e).__name__}: {e}"[:300]))
                continue
            fns[name] = fn
    # the backends alternate through the environment: time each roberta_fast backend in its own table,
    # with transformers in every table (same rounds)
    res = {}
    hf = {k: v for k, v in fns.items() if k.startswith("transformers")}
    for be in backends_to_run:
        if device.type == "cpu":
            os.environ["ROBERTA_FAST_CUDA_EMULATE"] = "1" if be == "cuda" else "0"
            backends.reset()
        table = dict(hf, **{k: v for k, v in fns.items() if k.startswith(f"roberta_fast ({be})")})
        for k, v in time_interleaved(table, rounds=rounds, target_s=0.05, sync=sync).items():
            if k not in res or v[0] < res[k][0]:
                res[k] = v
    eager = res.get("transformers eager", (None,))[0]
    for name, (best, med) in res.items():
        ratio = best / eager if eager else None
        is_ours = name.startswith("roberta_fast")
        rows.append(_row("forward", name, name, label, us=best, us_median=med, ratio=ratio,
                         target=FORWARD_TARGET if is_ours else None,
                         ok=(ratio <= FORWARD_TARGET) if is_ours and ratio is not None else None,
                         python_calls=counts[name][0], launches=counts[name][1]))
    return rows


def measure(device, *, quick: bool = False, stub: _Stub | None = None) -> dict:
    rounds = 7 if quick else 15
    rows = measure_ops(device, torch.float16, stub, rounds=rounds)
    # float32 on the CPU: its float16 GEMMs would dominate the model's wall time (see install_stub)
    fdt = torch.float16 if device.type == "cuda" else torch.float32
    rows += measure_forward(device, fdt, stub, rounds=max(5, rounds // 2))
    return {"rows": rows, "env": _env_rec(stub is not None)}


# ----------------------------------------------------------------------------- the harness's entry


def run_host(device: torch.device, *, quick: bool = False, notes: list | None = None, timeout: float = 1800) -> list:
    """The host rows of a bench run. On a GPU: in this process, real launches. Without one: a child process
    (`python -m roberta_fast.benchmarks.bench_host`) without TRITON_INTERPRET, over the stub driver."""
    if device.type == "cuda":
        return measure(device, quick=quick)["rows"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ROBERTA_FAST_TUNING"] = "0"
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "host.json"
        cmd = [sys.executable, "-m", "roberta_fast.benchmarks.bench_host", "--json", str(out)] + (
            ["--quick"] if quick else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            msg = f"host benchmark failed (exit {proc.returncode}): {' | '.join(tail)}"[:400]
            if notes is not None:
                notes.append(msg)
            return [_row("forward", "host benchmark", "-", "-", error=msg)]
        doc = json.loads(out.read_text())
    if notes is not None:
        notes.append("host rows: CPU run over a stub CUDA driver (Triton's real launcher down to cuLaunchKernelEx, "
                     "the registry choosing as for CUDA tensors; no CUDA allocator, stream queries or driver "
                     "launch cost; model rows at roberta-base's structure with tiny widths), see "
                     "docs/host_path.md")
    return doc["rows"]


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m roberta_fast.benchmarks.bench_host",
                                description="host overhead of the GPU path (CPU: over a stub CUDA driver)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the rows here")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stub = install_stub() if dev.type == "cpu" else None
    doc = measure(dev, quick=a.quick, stub=stub)
    text = json.dumps(doc, indent=1)
    if a.json:
        Path(a.json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
