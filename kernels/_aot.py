"""Ahead-of-time compile specs: what a kernel file can launch, in a form triton.compile takes."""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AOTSpec:
    """One launchable specialization of a @triton.jit kernel.

    signature maps every argument name to its Triton type ("*fp16", "i32", "i64", "fp32",
    "constexpr"); constexprs gives the value of each constexpr argument.
    """

    name: str  # a label for the table, e.g. "layer_norm_fwd[fp16,N=768]"
    fn: Any  # the triton.jit function
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    uses_mma: bool = False  # a matrix kernel: HGMMA expected on sm_90, HMMA on sm_80


TRITON_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def ptr(dtype) -> str:
    """Triton pointer type for a torch dtype (or its name)."""
    name = str(dtype).replace("torch.", "")
    if name == "bool":
        return "*i1"
    if name in ("int8", "uint8"):
        return "*i8" if name == "int8" else "*u8"
    if name in ("int32", "int64"):
        return "*i32" if name == "int32" else "*i64"
    return "*" + TRITON_DTYPE[name]
