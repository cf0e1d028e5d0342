"""LSH attention's chunked attention on the sorted layout (roberta_fast/lsh.py builds the layout in torch).

    for each row n (one hash round of one sequence and head) and chunk c of C sorted slots:
        o[n, chunk c], lse[n, chunk c] = softmax(scale * q_c [k_{c-1}, k_c]^T, invalid keys masked) [v_{c-1}, v_c]

One program per (chunk, row): the chunk's C queries stay in registers, the keys and values of chunk c - 1
(absent for c = 0) and chunk c stream through with an online softmax in fp32 (exp2, log2(e) folded into the
scale), and the program stores o (q's dtype) and the natural-log lse (fp32). Invalid key slots (padding, the
tail past S) are never read (predicated loads) and score -inf; SHARED (shared QK) replaces a slot's score with
itself by SELF_SCORE. A row with no valid key gives o = 0, lse = -inf.

Work: 4 * L * 2C * D FLOPs per row (linear in the length L), q, k, v read about twice, o written once. The
backward recomputes through the torch version on the same layout (roberta_fast.lsh.chunk_attention) under
autograd: correct, not fast (docs/lsh_attention.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import AOTSpec, ptr
from ._launch import cdiv

LOG2E = 1.4426950408889634
SELF_SCORE = -1e5  # roberta_fast.lsh.SELF_SCORE (kernels do not import the package above them)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # on GPUs; float32 too under the interpreter
MAX_HEAD_DIM = 128
MAX_CHUNK = 128  # C x C blocks of fp32 scores live in registers


@triton.jit
def _lsh_chunk_fwd(
    Q,  # (N, L, D) sorted queries
    K,  # (N, L, D) sorted keys
    V,  # (N, L, D) sorted values
    KOK,  # (N, L) int8: 1 = a valid key in that slot
    O,  # (N, L, D) output, q's dtype
    LSE,  # (N, L) float32 natural-log log-sum-exp
    L, C, D,
    qk_scale,  # scale * log2(e)
    SHARED: tl.constexpr, UPCAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    c = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    base = n * L * D
    offs = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    rows = c * C + offs  # slot indices of this chunk's queries
    rmask = offs < C
    q = tl.load(Q + base + rows[:, None] * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_C,), tl.float32)
    acc = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    for kc in range(tl.maximum(c - 1, 0), c + 1):
        cols = kc * C + offs
        ok = tl.load(KOK + n * L + cols, mask=rmask, other=0) != 0
        kmask = ok[:, None] & dmask[None, :]
        k = tl.load(K + base + cols[:, None] * D + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + base + cols[:, None] * D + offs_d[None, :], mask=kmask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_C, BLOCK_C) in log2 units
        if SHARED:
            s = tl.where(rows[:, None] == cols[None, :], SELF_SCORE * 1.4426950408889634, s)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    dead = l_i == 0.0
    o = acc / tl.where(dead, 1.0, l_i)[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.log2(tl.where(dead, 1.0, l_i))) / 1.4426950408889634)
    tl.store(O + base + rows[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    tl.store(LSE + n * L + rows, lse, mask=rmask)


def _pow2(n: int) -> int:
    return max(16, 1 << (max(1, n) - 1).bit_length())


def interpret_mode() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported(q, chunk: int) -> str | None:
    """Why this kernel cannot take a call (None when it can): dtype, head_dim, chunk length of the sorted layout
    (bucket_size with shared QK, 2 * bucket_size with separate keys)."""
    dtypes = KERNEL_DTYPES + ((torch.float32,) if interpret_mode() else ())
    if q.dtype not in dtypes:
        return (f"the triton lsh_attention kernel takes {', '.join(str(d).removeprefix('torch.') for d in dtypes)}, "
                f"got {str(q.dtype).removeprefix('torch.')}")
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"the triton lsh_attention kernel takes head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}"
    if chunk > MAX_CHUNK:
        return (f"the triton lsh_attention kernel takes chunks of <= {MAX_CHUNK} slots (bucket_size <= {MAX_CHUNK} "
                f"with shared QK, <= {MAX_CHUNK // 2} with separate keys), got {chunk}")
    return None


def chunk_forward(qs, ks, vs, kvalid, chunk: int, scale: float, shared: bool):
    """(o (N, L, D) qs.dtype, lse (N, L) float32) of the chunked attention; qs, ks, vs contiguous (N, L, D),
    kvalid bool (N, L), L a multiple of chunk."""
    N, L, D = qs.shape
    qs, ks, vs = (t.contiguous() for t in (qs, ks, vs))
    kok = kvalid.to(torch.int8).contiguous()
    o = torch.empty_like(qs)
    lse = torch.empty((N, L), dtype=torch.float32, device=qs.device)
    if N == 0 or L == 0:
        return o, lse
    upcast = interpret_mode() and qs.dtype == torch.bfloat16
    grid = (cdiv(L, chunk), N)
    _lsh_chunk_fwd[grid](qs, ks, vs, kok, o, lse, L, chunk, D, float(scale) * LOG2E,
                         SHARED=bool(shared), UPCAST=upcast, BLOCK_C=_pow2(chunk), BLOCK_D=_pow2(D),
                         num_warps=4 if _pow2(chunk) <= 64 else 8)
    return o, lse


class ChunkAttention(torch.autograd.Function):
    """The Triton forward; the backward recomputes through the torch chunked attention (`reference`, passed
    in by the op layer: roberta_fast.lsh.chunk_attention) and differentiates it, lse included."""

    @staticmethod
    def forward(ctx, qs, ks, vs, kvalid, chunk, scale, shared, reference):
        o, lse = chunk_forward(qs, ks, vs, kvalid, chunk, scale, shared)
        ctx.save_for_backward(qs, ks, vs, kvalid)
        ctx.args = (chunk, scale, shared, reference)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        qs, ks, vs, kvalid = ctx.saved_tensors
        chunk, scale, shared, reference = ctx.args
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (qs, ks, vs)]
            o, lse = reference(*leaves, kvalid, chunk, scale, shared)
            outs, grads = [o], [do if do is not None else torch.zeros_like(o)]
            if dlse is not None:
                outs.append(lse)
                grads.append(torch.where(torch.isinf(lse), 0.0, dlse.to(lse.dtype)))
            dq, dk, dv = torch.autograd.grad(outs, leaves, grads, allow_unused=True)
        return dq, dk, dv, None, None, None, None, None


def forward(qs, ks, vs, kvalid, chunk, scale, shared, reference):
    """The chunked attention with autograd when any input needs gradients."""
    if torch.is_grad_enabled() and (qs.requires_grad or ks.requires_grad or vs.requires_grad):
        return ChunkAttention.apply(qs, ks, vs, kvalid, chunk, scale, shared, reference)
    return chunk_forward(qs, ks, vs, kvalid, chunk, scale, shared)


def aot_specs() -> list[AOTSpec]:
    """One specialization (fp16, bucket 64 with separate keys: chunks of 128 slots, head_dim 64) for the
    ahead-of-time compile check."""
    sig = {"Q": ptr(torch.float16), "K": ptr(torch.float16), "V": ptr(torch.float16), "KOK": ptr(torch.int8),
           "O": ptr(torch.float16), "LSE": ptr(torch.float32), "L": "i32", "C": "i32", "D": "i32",
           "qk_scale": "fp32", "SHARED": "constexpr", "UPCAST": "constexpr", "BLOCK_C": "constexpr",
           "BLOCK_D": "constexpr"}
    return [AOTSpec("lsh_attention_fwd[fp16,C=128,D=64]", _lsh_chunk_fwd, sig,
                    {"SHARED": False, "UPCAST": False, "BLOCK_C": 128, "BLOCK_D": 64}, num_warps=8, uses_mma=True)]
