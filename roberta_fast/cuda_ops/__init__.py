"""Host side of the CUDA C++ backend: one module per op (same name as kernels/<op>.py and
csrc/<op>.cu), each following its op's contract (roberta_fast.backends: forward, backward,
unsupported) and calling into the compiled module with raw pointers, sizes, strides and the stream.

The compiled modules are imported lazily, once:
  roberta_fast._C      csrc/ built by nvcc: runs on CUDA tensors
  roberta_fast._C_emu  the same csrc/ sources built by the host compiler against the emulation
                       layer (csrc/emu/): runs the kernels on CPU tensors, for tests
                       (ROBERTA_FAST_CUDA_EMULATE=1, see docs/cuda_emulation.md)
This package imports nothing else of roberta_fast.
"""

from __future__ import annotations

import importlib

_UNSET = object()
_modules = {"roberta_fast._C": _UNSET, "roberta_fast._C_emu": _UNSET}


def _load(name: str):
    if _modules[name] is _UNSET:
        try:
            _modules[name] = importlib.import_module(name)
        except ImportError:
            _modules[name] = None
    return _modules[name]


def native_module():
    """roberta_fast._C, or None when it was not built."""
    return _load("roberta_fast._C")


def emulated_module():
    """roberta_fast._C_emu (the host build of csrc/), or None when it was not built."""
    return _load("roberta_fast._C_emu")
