"""Compatibility fixes for the Triton versions we support (3.2 and later); see docs/compat.md.

1. The interpreter rounds like the GPU. Triton's interpreter (3.2 - 3.9 at least) converts float32 to
bfloat16 by truncating the mantissa, and back with a path that mishandles subnormals; a GPU's
cvt.rn.bf16.f32 rounds to nearest even. `patch_interpreter_bf16_rounding` swaps those two casts for
exact ones (bit operations in NumPy), only when the installed interpreter is seen to truncate, so the
CPU tests judge bf16 kernels exactly as strictly as GPU runs do.

2. The interpreter of Triton 3.2 - 3.6 turns a scalar tensor into a Python int with int(array) on the
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


# ----------------------------------------------------------------------------- bf16 rounding


def f32_to_bf16_bits(a):
    """float32 array -> bfloat16 bit patterns (uint16), rounded to nearest even like cvt.rn.bf16.f32:
    ties to even, overflow to inf, subnormals kept, NaN stays a (quiet) NaN."""
    import numpy as np

    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    out = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def bf16_bits_to_f32(b):
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    import numpy as np

    return (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _interpreter_truncates(interp, tl) -> bool:
    """Whether this interpreter's float32 -> bfloat16 cast truncates (1 + 3 * 2**-9 must round up)."""
    import numpy as np

    src = interp.TensorHandle(np.array([1.0 + 3 * 2.0**-9], dtype=np.float32), tl.float32)
    got = interp.InterpreterBuilder.cast_impl(None, src, tl.bfloat16).data
    return int(np.asarray(got).view(np.uint16)[0]) != int(f32_to_bf16_bits(src.data)[0])


def patch_interpreter_bf16_rounding() -> bool:
    """Under TRITON_INTERPRET=1, make the interpreter's float32 <-> bfloat16 casts those of a GPU (round
    to nearest even; exact widening). Applied only when the interpreter truncates. Returns True when it
    patched."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        import triton.language as tl
        import triton.runtime.interpreter as interp
    except ImportError:
        return False
    builder = getattr(interp, "InterpreterBuilder", None)
    if builder is None or getattr(builder.cast_impl, "_roberta_fast_patched", False):
        return False
    try:
        if not _interpreter_truncates(interp, tl):
            return False
    except Exception:  # noqa: BLE001  (an interpreter whose internals differ: leave it alone)
        return False
    orig_cast, orig_fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def exact(src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if s == tl.float32 and d == tl.bfloat16:
            return interp.TensorHandle(f32_to_bf16_bits(src.data), d)
        if s == tl.bfloat16 and d == tl.float32:
            return interp.TensorHandle(bf16_bits_to_f32(src.data), d)
        return None

    def cast_impl(self, src, dst_type):
        got = exact(src, dst_type)
        return got if got is not None else orig_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        got = exact(src, dst_type)
        return got if got is not None else orig_fp_to_fp(self, src, dst_type, rounding_mode)

    cast_impl._roberta_fast_patched = True
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    # the lambdas that alias cast_impl were bound to the original function at class creation
    for name in ("create_fp_ext", "create_fp_trunc", "create_si_to_fp", "create_ui_to_fp", "create_fp_to_si",
                 "create_fp_to_ui"):
        if hasattr(builder, name):
            setattr(builder, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))
    return True
