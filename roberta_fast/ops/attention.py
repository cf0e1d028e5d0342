"""Stub until the Triton op lands: torch path only (signature is final)."""

from .. import reference


def attention(q, k, v, *, key_padding_mask=None, scale=None, backend=None):
    if backend not in (None, "torch"):
        raise NotImplementedError("attention: only the torch backend exists yet")
    return reference.attention(q, k, v, key_padding_mask, scale)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale=None, backend=None):
    if backend not in (None, "torch"):
        raise NotImplementedError("attention_varlen: only the torch backend exists yet")
    return reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale)
