"""Stub until the Triton op lands: torch path only (signature is final)."""

from .. import reference


def masked_softmax(scores, mask=None, scale=1.0, *, backend=None):
    if backend not in (None, "torch"):
        raise NotImplementedError("masked_softmax: only the torch backend exists yet")
    return reference.masked_softmax(scores, mask, scale)
