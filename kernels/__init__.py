"""Triton kernels of roberta_fast, one op per file (installed as roberta_fast.kernels).

Each file holds the @triton.jit kernels, the host functions the op layer calls (inputs already
checked and laid out by roberta_fast.ops), and `aot_specs()`: every specialization and config the
host functions can launch, for the ahead-of-time compile check (tests/test_compile_targets.py).
"""

from ._compat import patch_interpreter_bf16_rounding, patch_interpreter_index

# both act only under TRITON_INTERPRET=1 (see _compat.py and docs/compat.md)
patch_interpreter_index()  # Triton <= 3.6 interpreter with NumPy >= 2.4
patch_interpreter_bf16_rounding()  # float32 -> bfloat16 rounds to nearest even, as on a GPU
