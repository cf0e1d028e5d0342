"""Launching a Triton kernel through its cached compiled handle (the lean host path, docs/host_path.md).

`fn[grid](*args, **meta)` costs ~15-25 us of host time per launch in Triton 3.6 - 3.9: it binds and
specializes every argument (alignment of each pointer, divisibility of each int), builds a cache key
string, checks the kernel's global variables, then calls the launcher. A `Launcher` does that once per
*launch key* and afterwards calls the compiled kernel's launcher directly (`CompiledKernel.run`, the
same call `JITFunction.run` ends with), which costs ~3-5 us.

The launch key is built by the host function, inline and cheaply, and must determine Triton's
specialization of the call: the device, every pointer's dtype and 16-byte alignment, every int argument's
value class (== 1, divisible by 16, beyond int32), the constexprs and the launch options. Host functions
build it with `ptr_key` / `int_key` (or the same expressions written inline); the key rules are checked
against Triton's own binder by tests/test_host_path.py (the stub-driver run) and at every launch when
`check_keys(True)` is on.

Under TRITON_INTERPRET=1 there is no compiled kernel: every launch goes through `fn[grid]` (the tests
therefore run the same host functions, minus the cache); so does every launch on Triton 3.2 / 3.3 (no
`triton.knobs` there to read the launch hooks from). Launch hooks (`triton.knobs.runtime.
launch_enter_hook`, e.g. proton) are passed on; launch metadata is only built when a hook is set.
"""

from __future__ import annotations

import os

import triton

# Triton decides interpreter vs compiler when a kernel is decorated, i.e. when this package is imported;
# the environment is read once here for the same reason.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_STATE = {"check": False}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side grids (triton.cdiv is a @jit-callable that costs ~3 us per host call)."""
    return -(-a // b)


def ptr_key(t) -> int:
    """A pointer argument's part of a launch key (its dtype is keyed separately by the caller): the address
    modulo 16 (Triton specializes on 16-byte alignment)."""
    return t.data_ptr() & 15


def int_key(v: int) -> str:
    """An int argument's part of a launch key: Triton specializes ints equal to 1 (a constexpr), divisible by 16,
    and outside int32 (an i64 parameter). Strings, since 1 == True would merge two classes in a tuple key."""
    if v == 1:
        return "1"
    if _I32_MIN <= v <= _I32_MAX:
        return "D" if v & 15 == 0 else ""
    return "i64"


def ints_key(ints) -> tuple:
    """int_key of every int in `ints` (one call for many)."""
    return tuple(["1" if v == 1 else (("" if v & 15 else "D") if _I32_MIN <= v <= _I32_MAX else "i64")
                  for v in ints])


def check_keys(on: bool = True):
    """Debug switch: verify at every cached launch that Triton's own binder would pick the same compiled
    kernel (slow; used by tests/test_host_path.py)."""
    _STATE["check"] = bool(on)


class Launcher:
    """One @triton.jit kernel's launches, cached per launch key (see the module docstring)."""

    __slots__ = ("fn", "cache", "_names")

    def __init__(self, fn):
        self.fn = fn
        self.cache: dict = {}  # device -> {launch key: (launcher, function handle, metadata, constexprs, kernel)}
        self._names = None

    def __call__(self, key, grid, args: tuple, meta: dict):
        """Launch fn[grid](*args, **meta). key: a hashable that fixes Triton's specialization of args and
        meta (the device is added here); grid: a tuple of one to three ints."""
        if INTERPRET or _KNOBS is None:
            self.fn[grid](*args, **meta)
            return
        drv = _DRIVER.active
        device = drv.get_current_device()
        h = self.cache.get(device)
        if h is not None:
            h = h.get(key)
        if h is None or _STATE["check"]:
            self._first(device, key, grid, args, meta, h)
            return
        run, function, packed, tail, ck, direct = h
        stream = drv.get_current_stream(device)
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        enter, leave = _KNOBS.launch_enter_hook, _KNOBS.launch_exit_hook
        if (not enter.calls and not leave.calls) if _CHAINS else (enter is None and leave is None):
            if direct is not None:  # the launcher's C entry itself (what CudaLauncher.__call__ ends with)
                launch, coop, pdl, annotations, signature = direct
                launch(grid[0], g1, g2, stream, function, coop, pdl, packed, None, None, None, None, None,
                       annotations, signature, (*args, *tail))
            else:
                run(grid[0], g1, g2, stream, function, packed, None, None, None, *args, *tail)
        else:  # a profiler's hooks (e.g. proton): the launch metadata as JITFunction.run builds it
            md = ck.launch_metadata(grid, stream, *args, *tail)
            run(grid[0], g1, g2, stream, function, packed, md, enter, leave, *args, *tail)

    def _first(self, device, key, grid, args, meta, cached):
        """The first launch of a key (or a checked one): through Triton's own path, which compiles if needed
        and returns the compiled kernel; its launcher and handles are cached for the next calls."""
        ck = self.fn[grid](*args, **meta)
        if hasattr(ck, "result"):  # Triton 3.6 may hand back a future of an asynchronous compile
            ck = ck.result()
        if cached is not None and cached[4] is not ck:
            raise AssertionError(f"{self.fn.__name__}: launch key {key!r} maps to two compiled kernels; the host "
                                 "function's key misses part of Triton's specialization")
        if self._names is None:
            self._names = [p.name for p in self.fn.params]
        tail = tuple(meta[n] for n in self._names[len(args):])  # the constexprs, in parameter order
        self.cache.setdefault(device, {})[key] = (ck.run, ck.function, ck.packed_metadata, tail, ck,
                                                  _direct_entry(ck.run))


def _direct_entry(run):
    """(launch, cooperative, pdl, annotations, signature) to call the NVIDIA launcher's C entry directly, as
    Triton 3.9's CudaLauncher.__call__ does once it has found nothing to allocate (no global or profile
    scratch, no sanitizer); None for any other launcher (Triton 3.6's per-kernel modules, other backends), which
    is then called through its __call__."""
    names = ("launch", "launch_cooperative_grid", "launch_pdl", "arg_annotations", "kernel_signature",
             "global_scratch_size", "profile_scratch_size")
    if not all(hasattr(run, n) for n in names) or getattr(run, "gsan_enabled", False):
        return None
    if run.global_scratch_size or run.profile_scratch_size:
        return None
    return (run.launch, run.launch_cooperative_grid, run.launch_pdl, run.arg_annotations, run.kernel_signature)


_DRIVER = triton.runtime.driver  # .active: the driver in use (may be replaced with set_active)
# launch_enter_hook / launch_exit_hook live in triton's knobs from 3.4 on; before that (3.2, 3.3) the cache is
# off and every launch goes through fn[grid]
_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None)
# Triton 3.5+ keeps each hook as a HookChain (empty when no profiler is attached), older ones as None
_CHAINS = _KNOBS is not None and hasattr(_KNOBS.launch_enter_hook, "calls")


def clear():
    """Forget every cached handle of every Launcher (the next launch of each key goes through Triton again)."""
    for launcher in _LAUNCHERS:
        launcher.cache.clear()


_LAUNCHERS: list = []


def launcher(fn) -> Launcher:
    """A Launcher for `fn`, registered so that `clear()` reaches it."""
    lc = Launcher(fn)
    _LAUNCHERS.append(lc)
    return lc
