"""Compatibility fixes for the Triton versions we support (3.2 and later); see docs/compat.md.

The interpreter of Triton 3.2 - 3.6 turns a scalar tensor into a Python int with int(array) on the
1-element, 1-d array that holds every scalar (program ids, runtime arguments). NumPy 2.4 refuses
that, so under TRITON_INTERPRET=1 every kernel loop whose bound is a runtime value fails with
"TypeError: only 0-dimensional arrays can be converted to Python scalars". Triton 3.7 squeezes
the array first; `patch_interpreter_index` makes the older interpreters do the same. Compiled
kernels never go through this code.
"""

from __future__ import annotations

import os


def _scalar_index(self) -> int:
    return int(self.handle.data.reshape(()))


def _numpy_refuses_1d_int() -> bool:
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton."""
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def patch_interpreter_index() -> bool:
    """Under TRITON_INTERPRET=1, with Triton < 3.7 and a NumPy that refuses int(1-element 1-d array),
    make the interpreter's tensor.__index__ go through a 0-d view. Returns True when it patched."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" or not _numpy_refuses_1d_int():
        return False
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return False
    if triton_version() >= (3, 7):  # fixed upstream
        return False
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_roberta_fast_patched", False):
        return False

    def _patch_lang_tensor(tensor, *args, **kwargs):
        orig(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if scope is not None:  # Triton >= 3.3: the launch restores what its scope set
            scope.set_attr(tensor, "__index__", _scalar_index)
        else:  # Triton 3.2 sets the attributes for good
            tensor.__index__ = _scalar_index

    _patch_lang_tensor._roberta_fast_patched = True
    interp._patch_lang_tensor = _patch_lang_tensor
    return True
