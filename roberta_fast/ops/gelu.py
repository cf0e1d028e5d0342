"""Stub until the Triton op lands: torch path only (signature is final)."""

from .. import reference


def bias_gelu(x, bias, approximate="none", *, backend=None):
    if backend not in (None, "torch"):
        raise NotImplementedError("bias_gelu: only the torch backend exists yet")
    return reference.bias_gelu(x, bias, approximate)
