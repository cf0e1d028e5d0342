"""Fused non-causal attention for encoders: padded (batch, seqlen) and padding-free varlen batches.

    o = softmax(scale * q k^T, masked keys) v      per sequence and head, never materializing S x S

Forward (flash-style): one program per (query block, sequence, head) on a 1-D grid whose query
blocks vary fastest (the programs that share one head's keys run together); keys and values stream
through in blocks with an online softmax in fp32 (exp2, log2(e) folded into the scale), and the
program saves the log-sum-exp of each query row. Backward recomputes the probabilities from lse:
    1. _attn_bwd_dq   per query block: delta = rowsum(dO * O) (stored), dq = scale * dS k
    2. _attn_bwd_dkdv per key block:   dv = P^T dO, dk = scale * dS^T q          (reads delta)
    with dS = P * (dO v^T - delta). Two kernels and no atomics: the gradients are deterministic.

Work: forward 4 * sum(len_i^2) * heads * head_dim FLOPs, backward 2.5x that; q, k, v, o (and do,
dq, dk, dv) are read once per block row, so every size worth timing is compute-bound.

Padded and varlen share one kernel body and one compiled specialization; runtime arguments say
how a program finds its sequence:
    padded   (B, S, H, D) tensors: sequence b starts at b * stride_b and has S tokens; the key
             padding mask (B, S) is loaded per key block: K and V rows of padded keys are never read
             (they count as 0, so NaN or inf there cannot reach a real row) and their scores are -inf
             (without a mask the kernel reads one True through a zero stride);
    varlen   (T, H, D) tensors (stride_b = 0, is_varlen = 1): sequence b spans tokens
             cu_seqlens[b] .. cu_seqlens[b + 1]; the grid covers max_seqlen rows per sequence and
             programs past a sequence's end exit at once. One extra "sequence" b == n_seq owns the
             rows past cu_seqlens[-1] and writes zeros there.
Dropout (DROPOUT constexpr; off, the kernels are the no-dropout ones): FlashAttention's semantics, l and lse
from the undropped p, o = dropout(P) V with the kept p scaled by 1 / (1 - dropout_p) once at the end. The mask
is Philox-4x32-10 keyed by the seed of the device-held rng tensor (seed, offset), counter (key, query row,
(sequence * heads + head) ^ low word of offset, high word of offset) with token indices inside the sequence:
no mask is stored, both backward kernels regenerate it whatever their block sizes (dv = dropout(P)^T dO;
dP = dropout(dO V^T); delta = rowsum(dO * O) as without dropout).
A query row with no real key gives o = 0, lse = -inf and zero gradients. Every block checks its
rows against the sequence length (predicated loads; -inf bias on the scores past the end).

Offsets of a sequence start (batch * stride, cu_seqlens[b] * stride) are int64; offsets inside one
sequence (row * stride, < 2**31 elements) are int32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.random import philox, uint_to_uniform_float

from .._utils import stats_scratch
from ._aot import AOTSpec, ptr
from ._configs import ConfigTable, with_default
from ._launch import INTERPRET, cdiv, ints_key, launcher

HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634

# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _seq_bounds(CU, b, n_seq, seqlen, total_tokens, is_varlen):
    """(first token, length, is the varlen tail) of sequence b. Padded: CU is one 0 read at index 0."""
    seq_start = tl.load(CU + b * is_varlen)
    seq_end = tl.load(CU + tl.minimum(b + 1, n_seq) * is_varlen)
    is_tail = b == n_seq  # only varlen grids have this extra sequence
    seq_end = tl.where(is_tail, total_tokens, seq_end)
    seq_len = tl.where(is_varlen != 0, seq_end - seq_start, seqlen)
    return seq_start, seq_len, is_tail


@triton.jit
def _zero_rows(X, stride_xs, stride_xh, h, seq_start, n_rows, pid, n_prog,
               HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Zeros to rows seq_start .. seq_start + n_rows of head h (the varlen rows past the last
    sequence); programs pid = 0 .. n_prog - 1 stride over them."""
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    base = X + seq_start.to(tl.int64) * stride_xs + h.to(tl.int64) * stride_xh
    zero = tl.zeros([BLOCK, HEAD_DIM], dtype=X.dtype.element_ty)
    for start in range(pid * BLOCK, n_rows, n_prog * BLOCK):
        rows = start + offs
        tl.store(base + rows[:, None] * stride_xs + offs_d[None, :], zero, mask=(rows < n_rows)[:, None])


@triton.jit
def _key_keep(mask_base, stride_ms, cols, seq_len):
    """True for a real key; False for a padded key or a column past the sequence end."""
    return tl.load(mask_base + cols * stride_ms, mask=cols < seq_len, other=0) != 0


@triton.jit
def _load_keys(base, cols, stride, keep, offs_d):
    """(len(cols), HEAD_DIM) tile of K or V; rows that are not kept are never read and count as 0, so
    whatever a padded key position holds (NaN, inf) cannot reach a real row."""
    return tl.load(base + cols[:, None] * stride + offs_d[None, :], mask=keep[:, None], other=0.0)


@triton.jit
def _load_rows(base, rows, stride, seq_len, offs_d):
    """(len(rows), HEAD_DIM) tile; rows past seq_len read as 0 (never out of bounds)."""
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=(rows < seq_len)[:, None], other=0.0)


@triton.jit
def _mma(a, b, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST (interpreter + bfloat16 only): the Triton interpreter
    multiplies bfloat16 bit patterns in tl.dot (it does not support bfloat16 math), so go through
    float32 there; compiled kernels never take this path."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _rng_key(RNG, bh):
    """(seed, c2, c3) of head bh (= sequence * n_heads + head) from the (seed, offset) int64 pair at RNG: the
    seed keys Philox, c2 = bh ^ low word of offset and c3 = its high word are two of its four counters."""
    seed = tl.load(RNG)
    offset = tl.load(RNG + 1)
    c2 = bh.to(tl.uint32) ^ (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = (offset >> 32).to(tl.uint32)
    return seed, c2, c3


@triton.jit
def _dropout_kept(seed, c2, c3, qrow, kcol, dropout_p):
    """True where the probability of query row `qrow` and key `kcol` (token indices inside the sequence,
    broadcast to one 2-D tile in either orientation) is kept: Philox-4x32-10 of the counter (kcol, qrow, c2,
    c3) under `seed`, its first word as a uniform in [0, 1), kept when >= dropout_p. A function of (seed,
    offset, head, row, key) only, never of the block sizes, so every kernel regenerates the same mask."""
    c0 = (kcol + qrow * 0).to(tl.uint32)
    c1 = (qrow + kcol * 0).to(tl.uint32)
    z = tl.zeros(c0.shape, tl.uint32)
    r, _, _, _ = philox(seed, c0, c1, z + c2, z + c3)
    return uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, rows, k_base, v_base, mask_base, stride_ks, stride_vs, stride_ms,
               seq_len, qk_scale, seed, c2, c3, dropout_p,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DROPOUT: tl.constexpr):
    """Online softmax over the key blocks of one sequence; the last block may be partial. DROPOUT: l_i sums
    the undropped p, acc the kept ones (the 1 / (1 - p) is applied once, at the end)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(0, seq_len, BLOCK_N):
        cols = start_n + offs_n
        keep = _key_keep(mask_base, stride_ms, cols, seq_len)
        k = _load_keys(k_base, cols, stride_ks, keep, offs_d)
        v = _load_keys(v_base, cols, stride_vs, keep, offs_d)
        qk = tl.where(keep[None, :], _mma(q, tl.trans(k), UPCAST) * qk_scale, float("-inf"))  # log2 units
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # no real key yet: avoid -inf - -inf
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_kept(seed, c2, c3, rows[:, None], cols[None, :], dropout_p), p, 0.0)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q,  # (B, S, H, D) padded | (T, H, D) varlen; last stride 1
    K,  # same shape as Q
    V,  # same shape as Q
    O,  # same shape as Q, contiguous (written)
    LSE,  # (B, H, S) | (H, T) float32, natural log (written)
    MASK,  # (B, S) bool key padding mask, True = real key | one True (stride 0)
    CU,  # (n_seq + 1,) int32 cumulative sequence lengths | one 0 (padded)
    RNG,  # (2,) int64 (seed, offset) of the dropout mask (read with DROPOUT only)
    n_seq, n_heads, seqlen, total_tokens, n_blocks, is_varlen,
    qk_scale,  # scale * log2(e)
    dropout_p,  # probability of dropping one P element (DROPOUT only)
    drop_scale,  # 1 / (1 - dropout_p) (DROPOUT only)
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_mb, stride_ms,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % n_blocks
    pid_bh = pid // n_blocks
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    seq_start, seq_len, is_tail = _seq_bounds(CU, b, n_seq, seqlen, total_tokens, is_varlen)
    if is_tail:
        _zero_rows(O, stride_os, stride_oh, h, seq_start, seq_len, pid_m, n_blocks, HEAD_DIM, BLOCK_M)
        offs = tl.arange(0, BLOCK_M)
        lse_tail = LSE + h.to(tl.int64) * stride_lh + seq_start
        for start in range(pid_m * BLOCK_M, seq_len, n_blocks * BLOCK_M):
            tl.store(lse_tail + start + offs, tl.full([BLOCK_M], float("-inf"), tl.float32),
                     mask=start + offs < seq_len)
        return
    start_m = pid_m * BLOCK_M
    if start_m >= seq_len:
        return

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    tok0 = seq_start.to(tl.int64)
    q_base = Q + b64 * stride_qb + tok0 * stride_qs + h64 * stride_qh
    k_base = K + b64 * stride_kb + tok0 * stride_ks + h64 * stride_kh
    v_base = V + b64 * stride_vb + tok0 * stride_vs + h64 * stride_vh
    o_base = O + b64 * stride_ob + tok0 * stride_os + h64 * stride_oh
    lse_base = LSE + b64 * stride_lb + h64 * stride_lh + tok0
    mask_base = MASK + b64 * stride_mb

    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len
    q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    seed, c2, c3 = 0, 0, 0
    if DROPOUT:
        seed, c2, c3 = _rng_key(RNG, pid_bh)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, rows, k_base, v_base, mask_base, stride_ks, stride_vs,
                               stride_ms, seq_len, qk_scale, seed, c2, c3, dropout_p,
                               HEAD_DIM, BLOCK_N, UPCAST, DROPOUT)

    # a row with no real key has acc = 0 and l = 0: o = 0, lse = -inf
    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    lse = tl.where(dead, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    if DROPOUT:
        o = acc * (drop_scale / l_safe)[:, None]
    else:
        o = acc * (1.0 / l_safe)[:, None]
    tl.store(o_base + rows[:, None] * stride_os + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_base + rows, lse, mask=row_ok)


@triton.jit
def _bwd_dq_inner(dq, q, do, rows, lse2, delta, k_base, v_base, mask_base, stride_ks, stride_vs, stride_ms,
                  seq_len, qk_scale, seed, c2, c3, dropout_p, drop_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DROPOUT: tl.constexpr):
    """dq of one query block over the key blocks of its sequence. DROPOUT: dP = dropout(dO v^T), the
    forward's mask regenerated."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(0, seq_len, BLOCK_N):
        cols = start_n + offs_n
        keep = _key_keep(mask_base, stride_ms, cols, seq_len)
        k = _load_keys(k_base, cols, stride_ks, keep, offs_d)
        v = _load_keys(v_base, cols, stride_vs, keep, offs_d)
        qk = _mma(q, tl.trans(k), UPCAST)  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(tl.where(keep[None, :], qk * qk_scale - lse2[:, None], float("-inf")))
        dp = _mma(do, tl.trans(v), UPCAST)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            dp = tl.where(_dropout_kept(seed, c2, c3, rows[:, None], cols[None, :], dropout_p), dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = dq + _mma(ds.to(k.dtype), k, UPCAST)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q,  # (B, S, H, D) | (T, H, D); last stride 1
    K,  # same shape as Q
    V,  # same shape as Q
    O,  # same shape as Q, contiguous (the forward output)
    DO,  # same shape as Q; last stride 1
    DQ,  # same shape as Q, contiguous (written)
    LSE,  # (B, H, S) | (H, T) float32 from the forward
    DELTA,  # like LSE, float32 (written: rowsum(dO * O))
    MASK,  # (B, S) bool | one True (stride 0)
    CU,  # (n_seq + 1,) int32 | one 0 (padded)
    RNG,  # (2,) int64 (seed, offset) of the forward's dropout mask (read with DROPOUT only)
    n_seq, n_heads, seqlen, total_tokens, n_blocks, is_varlen,
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale
    dropout_p,  # as in the forward (DROPOUT only)
    drop_scale,  # 1 / (1 - dropout_p) (DROPOUT only)
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,  # O and DQ (contiguous, q's shape)
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh,  # LSE and DELTA
    stride_mb, stride_ms,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % n_blocks
    pid_bh = pid // n_blocks
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    seq_start, seq_len, is_tail = _seq_bounds(CU, b, n_seq, seqlen, total_tokens, is_varlen)
    if is_tail:
        _zero_rows(DQ, stride_os, stride_oh, h, seq_start, seq_len, pid_m, n_blocks, HEAD_DIM, BLOCK_M)
        return
    start_m = pid_m * BLOCK_M
    if start_m >= seq_len:
        return

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    tok0 = seq_start.to(tl.int64)
    q_base = Q + b64 * stride_qb + tok0 * stride_qs + h64 * stride_qh
    k_base = K + b64 * stride_kb + tok0 * stride_ks + h64 * stride_kh
    v_base = V + b64 * stride_vb + tok0 * stride_vs + h64 * stride_vh
    o_off = b64 * stride_ob + tok0 * stride_os + h64 * stride_oh
    do_base = DO + b64 * stride_dob + tok0 * stride_dos + h64 * stride_doh
    l_off = b64 * stride_lb + h64 * stride_lh + tok0
    mask_base = MASK + b64 * stride_mb

    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len
    q = _load_rows(q_base, rows, stride_qs, seq_len, offs_d)
    do = _load_rows(do_base, rows, stride_dos, seq_len, offs_d)
    o = _load_rows(O + o_off, rows, stride_os, seq_len, offs_d)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + l_off + rows, delta, mask=row_ok)
    lse = tl.load(LSE + l_off + rows, mask=row_ok, other=float("inf"))
    # log2 units; a row with no real key (lse = -inf) gets +inf so that its p is exp2(-inf) = 0
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    seed, c2, c3 = 0, 0, 0
    if DROPOUT:
        seed, c2, c3 = _rng_key(RNG, pid_bh)
    dq = _bwd_dq_inner(dq, q, do, rows, lse2, delta, k_base, v_base, mask_base, stride_ks, stride_vs, stride_ms,
                       seq_len, qk_scale, seed, c2, c3, dropout_p, drop_scale, HEAD_DIM, BLOCK_N, UPCAST, DROPOUT)
    dq = dq * sm_scale
    tl.store(DQ + o_off + rows[:, None] * stride_os + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                    seq_len, qk_scale, seed, c2, c3, dropout_p, drop_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, DROPOUT: tl.constexpr):
    """dk, dv of one key block over the query blocks of its sequence. DROPOUT: dv = dropout(P)^T dO and
    dP = dropout(v dO^T), the forward's mask regenerated in the transposed (key, query) orientation."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(0, seq_len, BLOCK_M):
        rows = start_m + offs_m
        # rows past the end: q = do = delta = 0 and lse = +inf, so their p and ds are 0
        q = _load_rows(q_base, rows, stride_qs, seq_len, offs_d)
        do = _load_rows(do_base, rows, stride_dos, seq_len, offs_d)
        lse = tl.load(lse_base + rows, mask=rows < seq_len, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows < seq_len, other=0.0)
        # log2 units; a row with no real key (lse = -inf) gets +inf so that its p is exp2(-inf) = 0
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        qk_t = _mma(k, tl.trans(q), UPCAST)  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(qk_t * qk_scale - lse2[None, :])
        if DROPOUT:
            kept = _dropout_kept(seed, c2, c3, rows[None, :], cols[:, None], dropout_p)
            dv += _mma(tl.where(kept, p_t * drop_scale, 0.0).to(do.dtype), do, UPCAST)
            dp_t = _mma(v, tl.trans(do), UPCAST)  # (BLOCK_N, BLOCK_M)
            dp_t = tl.where(kept, dp_t * drop_scale, 0.0)
        else:
            dv += _mma(p_t.to(do.dtype), do, UPCAST)
            dp_t = _mma(v, tl.trans(do), UPCAST)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _mma(ds_t.to(q.dtype), q, UPCAST)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q,  # (B, S, H, D) | (T, H, D); last stride 1
    K,  # same shape as Q
    V,  # same shape as Q
    DO,  # same shape as Q; last stride 1
    DK,  # same shape as Q, contiguous (written)
    DV,  # same shape as Q, contiguous (written)
    LSE,  # (B, H, S) | (H, T) float32 from the forward
    DELTA,  # like LSE, float32 from _attn_bwd_dq
    MASK,  # (B, S) bool | one True (stride 0)
    CU,  # (n_seq + 1,) int32 | one 0 (padded)
    RNG,  # (2,) int64 (seed, offset) of the forward's dropout mask (read with DROPOUT only)
    n_seq, n_heads, seqlen, total_tokens, n_blocks, is_varlen,
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale
    dropout_p,  # as in the forward (DROPOUT only)
    drop_scale,  # 1 / (1 - dropout_p) (DROPOUT only)
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,  # DK and DV (contiguous, q's shape)
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh,  # LSE and DELTA
    stride_mb, stride_ms,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = pid % n_blocks
    pid_bh = pid // n_blocks
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    seq_start, seq_len, is_tail = _seq_bounds(CU, b, n_seq, seqlen, total_tokens, is_varlen)
    if is_tail:
        _zero_rows(DK, stride_os, stride_oh, h, seq_start, seq_len, pid_n, n_blocks, HEAD_DIM, BLOCK_N)
        _zero_rows(DV, stride_os, stride_oh, h, seq_start, seq_len, pid_n, n_blocks, HEAD_DIM, BLOCK_N)
        return
    start_n = pid_n * BLOCK_N
    if start_n >= seq_len:
        return

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    tok0 = seq_start.to(tl.int64)
    q_base = Q + b64 * stride_qb + tok0 * stride_qs + h64 * stride_qh
    k_base = K + b64 * stride_kb + tok0 * stride_ks + h64 * stride_kh
    v_base = V + b64 * stride_vb + tok0 * stride_vs + h64 * stride_vh
    o_off = b64 * stride_ob + tok0 * stride_os + h64 * stride_oh
    do_base = DO + b64 * stride_dob + tok0 * stride_dos + h64 * stride_doh
    l_off = b64 * stride_lb + h64 * stride_lh + tok0

    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < seq_len
    # a padded key gets zero gradients; its rows of p are never mixed with other keys' rows, so the
    # mask is applied once to the result instead of to every p block; its K and V are never read
    key_ok = _key_keep(MASK + b64 * stride_mb, stride_ms, cols, seq_len)
    k = _load_keys(k_base, cols, stride_ks, key_ok, offs_d)
    v = _load_keys(v_base, cols, stride_vs, key_ok, offs_d)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lse_base = LSE + l_off
    delta_base = DELTA + l_off
    seed, c2, c3 = 0, 0, 0
    if DROPOUT:
        seed, c2, c3 = _rng_key(RNG, pid_bh)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                             seq_len, qk_scale, seed, c2, c3, dropout_p, drop_scale,
                             HEAD_DIM, BLOCK_M, UPCAST, DROPOUT)
    dk = tl.where(key_ok[:, None], dk * sm_scale, 0.0)
    dv = tl.where(key_ok[:, None], dv, 0.0)
    out = cols[:, None] * stride_os + offs_d[None, :]
    tl.store(DK + o_off + out, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + o_off + out, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# ------------------------------------------------------------------------------------------ tuning


class AttnConfig(NamedTuple):
    block_m: int  # query rows per block
    block_n: int  # key rows per block
    num_warps: int
    num_stages: int


# Under TRITON_INTERPRET=1: small blocks, so that the tests' short sequences span several of them.
INTERPRET_CONFIG = AttnConfig(16, 16, 4, 1)

SEQLEN_BUCKETS = (("short", 128), ("long", None))  # bucket of max_seqlen: <= 128, longer

# The defaults: (kernel, head_dim, bucket) -> config, for fp16 and bf16 alike (same tiles, same registers).
# Hopper-oriented (wgmma wants the held tile >= 64 rows and a multiple of 4 warps) and valid on
# sm_80. fwd holds BLOCK_M query rows and streams BLOCK_N keys; bwd_dq holds BLOCK_M query rows
# and streams BLOCK_N keys; bwd_dkdv holds BLOCK_N key rows and streams BLOCK_M query rows.
# Short sequences take smaller query tiles so the grid still fills the GPU.
CONFIGS = {
    ("fwd", 16, "short"): AttnConfig(64, 64, 4, 2),
    ("fwd", 16, "long"): AttnConfig(128, 128, 8, 3),
    ("fwd", 32, "short"): AttnConfig(64, 64, 4, 2),
    ("fwd", 32, "long"): AttnConfig(128, 128, 8, 3),
    ("fwd", 64, "short"): AttnConfig(64, 64, 4, 2),
    ("fwd", 64, "long"): AttnConfig(128, 128, 8, 3),
    ("fwd", 128, "short"): AttnConfig(64, 64, 4, 2),
    ("fwd", 128, "long"): AttnConfig(128, 64, 8, 3),
    ("bwd_dq", 16, "any"): AttnConfig(128, 64, 8, 3),
    ("bwd_dq", 32, "any"): AttnConfig(128, 64, 8, 3),
    ("bwd_dq", 64, "any"): AttnConfig(128, 64, 8, 3),
    ("bwd_dq", 128, "any"): AttnConfig(128, 32, 8, 2),
    ("bwd_dkdv", 16, "any"): AttnConfig(64, 128, 8, 3),
    ("bwd_dkdv", 32, "any"): AttnConfig(64, 128, 8, 3),
    ("bwd_dkdv", 64, "any"): AttnConfig(32, 128, 8, 3),
    ("bwd_dkdv", 128, "any"): AttnConfig(32, 128, 8, 2),
}

# What `roberta-fast tune` may try per (kernel, head_dim), besides the bucket's default (docs/tuning.md).
# fwd: both buckets' defaults (a short sequence may want the long tile and back) and, for the BERT family's
# head dims 32 and 64, 128 x 64 tiles on 8 warps (3 stages): half the keys per step of the long default, so
# half its registers (125 on sm_90, 184 on sm_80 at D=64). bwd_dq: 64 x 64 on 4 warps (twice the programs).
# bwd_dkdv: 64-key blocks on 4 warps (twice the programs at S = 128, where the default has one per head).
# head_dim 16 and 128 (outside the BERT family) keep today's configs only. Every candidate is in aot_specs().
CANDIDATES = {
    **{("fwd", d): (CONFIGS[("fwd", d, "short")], CONFIGS[("fwd", d, "long")]) for d in HEAD_DIMS},
    ("fwd", 32): (AttnConfig(64, 64, 4, 2), AttnConfig(128, 128, 8, 3), AttnConfig(128, 64, 8, 3)),
    ("fwd", 64): (AttnConfig(64, 64, 4, 2), AttnConfig(128, 128, 8, 3), AttnConfig(128, 64, 8, 3)),
    **{(k, d): (CONFIGS[(k, d, "any")],) for k in ("bwd_dq", "bwd_dkdv") for d in HEAD_DIMS},
    ("bwd_dq", 32): (AttnConfig(128, 64, 8, 3), AttnConfig(64, 64, 4, 3)),
    ("bwd_dq", 64): (AttnConfig(128, 64, 8, 3), AttnConfig(64, 64, 4, 3)),
    ("bwd_dkdv", 32): (AttnConfig(64, 128, 8, 3), AttnConfig(64, 64, 4, 3)),
    ("bwd_dkdv", 64): (AttnConfig(32, 128, 8, 3), AttnConfig(32, 64, 4, 3)),
}
FWD_CLASSES, BWD_CLASSES = ("fwd",), ("bwd_dq", "bwd_dkdv")


def config_space(op: str, fixed: tuple, train: bool = False) -> dict:
    """The candidates per kernel class for a tuned bucket of attention / attention_varlen (`fixed` =
    (ceil_pow2(seqlen), heads, head_dim, dtype, ...) as roberta_fast.tuned.bucket gives it), the bucket's
    default first; the backward classes only with `train`. {} for a head_dim the kernels do not take."""
    seq_pow2, head_dim = fixed[0], fixed[2]
    if head_dim not in HEAD_DIMS:
        return {}
    space = {"fwd": with_default(CONFIGS[("fwd", head_dim, seqlen_bucket(seq_pow2))], CANDIDATES[("fwd", head_dim)])}
    if train:
        for k in BWD_CLASSES:
            space[k] = with_default(CONFIGS[(k, head_dim, "any")], CANDIDATES[(k, head_dim)])
    return space


# the tuned configs (kernels/_configs.py): installed per device by roberta_fast.tuned, forced by the tuner
_TUNED = ConfigTable(("attention", "attention_varlen"), config_space)
install_tuned, forced_configs = _TUNED.install, _TUNED.forced

KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # on GPUs; float32 too under the interpreter


def interpret_mode() -> bool:
    """TRITON_INTERPRET=1 when this package was imported (Triton fixes it then too)."""
    return INTERPRET


def _upcast(dtype) -> bool:
    """bfloat16 dots go through float32 under the interpreter (see _mma)."""
    return dtype == torch.bfloat16 and interpret_mode()


def seqlen_bucket(max_seqlen: int) -> str:
    for name, top in SEQLEN_BUCKETS:
        if top is None or max_seqlen <= top:
            return name
    raise AssertionError("unreachable")


def attention_config(kernel: str, head_dim: int, dtype: torch.dtype, max_seqlen: int) -> AttnConfig:
    """The one place that picks block sizes, warps and stages; keyed on (kernel, head_dim, dtype,
    bucket of max_seqlen)."""
    if interpret_mode():
        return INTERPRET_CONFIG
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"attention: head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"attention: the Triton kernels take float16 or bfloat16 on GPUs, got {dtype}")
    key = (kernel, head_dim, "any") if kernel != "fwd" else (kernel, head_dim, seqlen_bucket(max_seqlen))
    return CONFIGS[key]


def _config(kernel: str, q, key_padding_mask, cu_seqlens, max_seqlen: int) -> AttnConfig:
    """The config a launch uses: the tuned one of the call's bucket (or the tuner's forced one) when there is
    one, else `attention_config`'s default."""
    if _TUNED.active:
        if cu_seqlens is not None:
            T, H, D = q.shape
            cfg = _TUNED.pick(kernel, q.device, "attention_varlen", (T, max_seqlen, H, D, q.dtype))
        else:
            B, _, H, D = q.shape
            cfg = _TUNED.pick(kernel, q.device, "attention",
                              (B, max_seqlen, H, D, q.dtype, key_padding_mask is not None))
        if cfg is not None:
            return cfg
    key = (kernel, q.shape[-1], q.dtype, max_seqlen if max_seqlen <= 1024 else 1025)
    cfg = _DEFAULT_CFG.get(key)
    if cfg is None:  # (max_seqlen classes past 1024 share one entry: every bucket's top is <= 1024 or None)
        cfg = _DEFAULT_CFG[key] = attention_config(kernel, q.shape[-1], q.dtype, max_seqlen)
    return cfg


_DEFAULT_CFG: dict = {}  # (kernel, head_dim, dtype, max_seqlen or 1025) -> attention_config's answer

# ------------------------------------------------------------------------------------- host side

_FWD = launcher(_attn_fwd)  # the forward's launches through cached compiled handles

_DUMMY: dict = {}


def _dummy(device: torch.device, dtype: torch.dtype, value) -> torch.Tensor:
    """A cached one-element tensor for a pointer argument read through a zero stride."""
    key = (device, dtype, value)
    t = _DUMMY.get(key)
    if t is None:
        t = _DUMMY[key] = torch.full((1,), value, dtype=dtype, device=device)
    return t


def _launch_args(q, key_padding_mask, cu_seqlens, max_seqlen):
    """What every attention launch shares: sizes, the strides getter, mask / cu_seqlens pointers and
    strides, and the lse shape and strides."""
    if cu_seqlens is not None:
        total, n_heads, head_dim = q.shape
        n_seq = cu_seqlens.numel() - 1
        sizes = (n_seq, n_heads, int(max_seqlen), total)
        strides = lambda t: (0, t.stride(0), t.stride(1))  # noqa: E731
        lse_shape, lse_strides = (n_heads, total), (0, total)
        cu, extra_seq = cu_seqlens, 1  # one extra sequence zeroes the rows past cu_seqlens[-1]
    else:
        batch, seqlen, n_heads, head_dim = q.shape
        sizes = (batch, n_heads, seqlen, batch * seqlen)
        strides = lambda t: (t.stride(0), t.stride(1), t.stride(2))  # noqa: E731
        lse_shape, lse_strides = (batch, n_heads, seqlen), (n_heads * seqlen, seqlen)
        cu, extra_seq = _dummy(q.device, torch.int32, 0), 0
    if key_padding_mask is not None:
        mask, mask_strides = key_padding_mask, (key_padding_mask.stride(0), key_padding_mask.stride(1))
    else:
        mask, mask_strides = _dummy(q.device, torch.bool, True), (0, 0)
    n_bh = (sizes[0] + extra_seq) * n_heads
    return dict(head_dim=head_dim, sizes=sizes, strides=strides, lse_shape=lse_shape,
                lse_strides=lse_strides, cu=cu, mask=mask, mask_strides=mask_strides, n_bh=n_bh,
                is_varlen=int(cu_seqlens is not None))


def unsupported(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale):
    """Why these kernels cannot take the call, or None: head_dim in HEAD_DIMS; float16 / bfloat16 on
    CUDA tensors (float32 too under the interpreter, which computes the dots in float32)."""
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        return f"backend 'triton' supports head_dim in {HEAD_DIMS}, got {d}"
    if q.dtype not in KERNEL_DTYPES and not (q.device.type == "cpu" and q.dtype == torch.float32):
        return (f"backend 'triton' supports q dtypes (float16, bfloat16) on CUDA tensors "
                f"(float32 only under TRITON_INTERPRET=1), got {str(q.dtype).removeprefix('torch.')}")
    return None


def forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p, rng):
    """Flash forward.

    padded (cu_seqlens None): q, k, v (B, S, H, D) with stride(3) == 1; key_padding_mask None or bool
        (B, S), True = real key. Returns o (B, S, H, D) contiguous q.dtype, lse (B, H, S) float32.
    varlen: q, k, v (T, H, D) with stride(2) == 1; cu_seqlens int32 (n_seq + 1,) from 0, non-decreasing;
        max_seqlen int >= every length. Returns o (T, H, D) (rows past cu_seqlens[-1] zero), lse (H, T).
    lse is the natural-log log-sum-exp of the scaled scores per query row (-inf: no real key).
    dropout_p: float in [0, 1); rng: None exactly when dropout_p == 0, else int64 (2,) (seed, offset) on q's
    device. With dropout, O = dropout(P) V (kept elements scaled by 1 / (1 - dropout_p)) and lse is that of the
    undropped scores; the mask is Philox of (seed, offset, sequence * heads + head, query row, key) (token
    indices inside the sequence), read on the device and regenerated by `backward`. dropout_p == 0 launches
    the kernel compiled without dropout.
    """
    return _forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p, rng, False)


def forward_inference(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p, rng):
    """o of `forward` when nothing will read lse (no autograd): lse goes to a shared scratch buffer
    (roberta_fast._utils.stats_scratch), each row's slot written by its own program only."""
    return _forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p, rng, True)[0]


def _dropout_args(dev, dropout_p, rng):
    """(DROPOUT, rng pointer, dropout_p, 1 / (1 - dropout_p)) for a launch; a dummy pointer without dropout."""
    if dropout_p > 0.0:
        return True, rng, float(dropout_p), 1.0 / (1.0 - float(dropout_p))
    return False, _dummy(dev, torch.int64, 0), 0.0, 1.0


def _forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p, rng, scratch_lse):
    dev = q.device
    if cu_seqlens is not None:
        T, H, D = q.shape
        n_seq, S = cu_seqlens.shape[0] - 1, int(max_seqlen)
        sizes = (n_seq, H, S, T)
        # (batch, row, head) strides; o is contiguous; one extra sequence zeroes the rows past cu_seqlens[-1]
        strides = (0, *q.stride()[:2], 0, *k.stride()[:2], 0, *v.stride()[:2], 0, H * D, D, 0, T)
        lse_shape, cu, n_bh = (H, T), cu_seqlens, (n_seq + 1) * H
    else:
        B, S, H, D = q.shape
        sizes = (B, H, S, B * S)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], S * H * D, H * D, D, H * S, S)
        lse_shape, cu, n_bh = (B, H, S), _dummy(dev, torch.int32, 0), B * H
    if key_padding_mask is not None:
        mask, mask_strides = key_padding_mask, key_padding_mask.stride()
    else:
        mask, mask_strides = _dummy(dev, torch.bool, True), (0, 0)
    scale = D ** -0.5 if scale is None else scale
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    if scratch_lse:  # the same strides into a scratch buffer of at least as many elements
        lse = stats_scratch(dev, lse_shape[0] * lse_shape[1] * (lse_shape[2] if len(lse_shape) == 3 else 1))
    else:
        lse = torch.empty(lse_shape, dtype=torch.float32, device=dev)
    cfg = _config("fwd", q, key_padding_mask, cu_seqlens, S)
    n_blocks = max(cdiv(S, cfg.block_m), 1)
    if n_bh * n_blocks == 0:
        return o, lse
    ints = (*sizes, n_blocks, int(cu_seqlens is not None), strides[-1])
    # the strides but the last (lse's per-head stride: T when packed) are the same for every call of one layout:
    # their part of the launch key is memoized
    fixed = (*strides[:-1], *mask_strides)
    fixed_key = _FIXED_KEYS.get(fixed)
    if fixed_key is None:
        if len(_FIXED_KEYS) > 4096:
            _FIXED_KEYS.clear()
        fixed_key = _FIXED_KEYS[fixed] = ints_key(fixed)
    dropout, rng, p, drop_scale = _dropout_args(dev, dropout_p, rng)
    # what fixes Triton's specialization (kernels/_launch.py); o and lse are fresh, aligned allocations
    key = (q.dtype, k.dtype, v.dtype, D, cfg, q.data_ptr() & 15, k.data_ptr() & 15, v.data_ptr() & 15,
           mask.data_ptr() & 15, cu.data_ptr() & 15, rng.data_ptr() & 15, dropout, ints_key(ints), fixed_key)
    _FWD(key, (n_bh * n_blocks,), (q, k, v, o, lse, mask, cu, rng, *ints[:6], float(scale) * LOG2E, p, drop_scale,
                                   *strides, *mask_strides), _fwd_meta(D, cfg, _upcast(q.dtype), dropout))
    return o, lse


_FIXED_KEYS: dict = {}  # a layout's strides -> their part of the launch key (ints_key)


def bind_inference(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale):
    """forward_inference for many calls of ONE signature (roberta_fast.ops' bind_*: the encoder's layers in one
    forward): every shape, stride, int argument, config and launch-key part but the data pointers' alignment is
    computed here once. Returns fn(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale) -> o, the same
    launch as forward_inference's (the same launch keys, so the same compiled kernel), for arguments that differ
    from these only in their data (addresses)."""
    if INTERPRET:  # no cached launches under the interpreter: the plain host function
        return lambda q, k, v, m, cu, ms, sc: forward_inference(q, k, v, m, cu, ms, sc, 0.0, None)
    dev = q.device
    if cu_seqlens is not None:
        T, H, D = q.shape
        n_seq, S = cu_seqlens.shape[0] - 1, int(max_seqlen)
        sizes = (n_seq, H, S, T)
        strides = (0, *q.stride()[:2], 0, *k.stride()[:2], 0, *v.stride()[:2], 0, H * D, D, 0, T)
        n_lse, n_bh = H * T, (n_seq + 1) * H
    else:
        B, S, H, D = q.shape
        sizes = (B, H, S, B * S)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], S * H * D, H * D, D, H * S, S)
        n_lse, n_bh = B * H * S, B * H
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    cfg = _config("fwd", q, key_padding_mask, cu_seqlens, S)
    n_blocks = max(cdiv(S, cfg.block_m), 1)
    shape, dtype = q.shape, q.dtype
    if n_bh * n_blocks == 0:
        return lambda q, k, v, m, cu, ms, sc: forward_inference(q, k, v, m, cu, ms, sc, 0.0, None)
    lse = stats_scratch(dev, n_lse)
    ints = (*sizes, n_blocks, int(cu_seqlens is not None), strides[-1])
    fixed = (*strides[:-1], *mask_strides)
    fixed_key = _FIXED_KEYS.get(fixed)
    if fixed_key is None:
        fixed_key = _FIXED_KEYS[fixed] = ints_key(fixed)
    _, rng, p, drop_scale = _dropout_args(dev, 0.0, None)
    head = (q.dtype, k.dtype, v.dtype, D, cfg)
    tail = (rng.data_ptr() & 15, False, ints_key(ints), fixed_key)
    grid = (n_bh * n_blocks,)
    lead, rest = ints[:6], (p, drop_scale, *strides, *mask_strides)
    meta = _fwd_meta(D, cfg, _upcast(q.dtype), False)
    no_mask, no_cu = _dummy(dev, torch.bool, True), _dummy(dev, torch.int32, 0)

    def attention_fwd_bound(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale):
        o = torch.empty(shape, dtype=dtype, device=dev)
        mask = no_mask if key_padding_mask is None else key_padding_mask
        cu = no_cu if cu_seqlens is None else cu_seqlens
        key = (*head, q.data_ptr() & 15, k.data_ptr() & 15, v.data_ptr() & 15, mask.data_ptr() & 15,
               cu.data_ptr() & 15, *tail)
        _FWD(key, grid, (q, k, v, o, lse, mask, cu, rng, *lead, float(scale) * LOG2E, *rest), meta)
        return o

    return attention_fwd_bound


@functools.lru_cache(maxsize=256)
def _fwd_meta(head_dim: int, cfg: AttnConfig, upcast: bool, dropout: bool) -> dict:
    """The forward's constexprs and launch options (one dict per config, read only on a key's first launch)."""
    return dict(HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST=upcast, DROPOUT=dropout,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def backward(do, q, k, v, o, lse, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p, rng):
    """Flash backward: (dq, dk, dv), contiguous, in q's shape and dtype. do has q's shape and a unit
    last stride; o (contiguous) and lse come from forward; the rest (dropout_p and rng: the forward's, whose
    mask is regenerated) as in forward."""
    a = _launch_args(q, key_padding_mask, cu_seqlens, max_seqlen)
    scale = a["head_dim"] ** -0.5 if scale is None else scale
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if a["n_bh"] == 0:
        return dq, dk, dv
    if o.stride() != dq.stride():
        o = o.contiguous()
    delta = torch.empty(a["lse_shape"], dtype=torch.float32, device=q.device)
    st, seqlen = a["strides"], a["sizes"][2]
    common = (*a["sizes"],)
    dropout, rng, p, drop_scale = _dropout_args(q.device, dropout_p, rng)
    tail = (*st(q), *st(k), *st(v), *st(dq), *st(do), *a["lse_strides"], *a["mask_strides"])

    cfg = _config("bwd_dq", q, key_padding_mask, cu_seqlens, seqlen)
    n_blocks = max(cdiv(seqlen, cfg.block_m), 1)
    _attn_bwd_dq[(a["n_bh"] * n_blocks,)](
        q, k, v, o, do, dq, lse, delta, a["mask"], a["cu"], rng,
        *common, n_blocks, a["is_varlen"], float(scale) * LOG2E, float(scale), p, drop_scale, *tail,
        HEAD_DIM=a["head_dim"], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST=_upcast(q.dtype),
        DROPOUT=dropout, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    cfg = _config("bwd_dkdv", q, key_padding_mask, cu_seqlens, seqlen)
    n_blocks = max(cdiv(seqlen, cfg.block_n), 1)
    _attn_bwd_dkdv[(a["n_bh"] * n_blocks,)](
        q, k, v, do, dk, dv, lse, delta, a["mask"], a["cu"], rng,
        *common, n_blocks, a["is_varlen"], float(scale) * LOG2E, float(scale), p, drop_scale, *tail,
        HEAD_DIM=a["head_dim"], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST=_upcast(q.dtype),
        DROPOUT=dropout, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------ ahead-of-time specs

_KERNELS = {"fwd": _attn_fwd, "bwd_dq": _attn_bwd_dq, "bwd_dkdv": _attn_bwd_dkdv}
_TENSORS = {
    "fwd": ("Q", "K", "V", "O"),
    "bwd_dq": ("Q", "K", "V", "O", "DO", "DQ"),
    "bwd_dkdv": ("Q", "K", "V", "DO", "DK", "DV"),
}


def _signature(kernel: str, dtype: torch.dtype) -> dict:
    """The generic Triton signature of one kernel (every int as i32, no alignment assumed)."""
    sig = {name: ptr(dtype) for name in _TENSORS[kernel]}
    sig.update({"LSE": "*fp32"} if kernel == "fwd" else {"LSE": "*fp32", "DELTA": "*fp32"})
    sig.update({"MASK": "*i1", "CU": "*i32", "RNG": "*i64"})
    for name in ("n_seq", "n_heads", "seqlen", "total_tokens", "n_blocks", "is_varlen"):
        sig[name] = "i32"
    sig["qk_scale"] = "fp32"
    if kernel != "fwd":
        sig["sm_scale"] = "fp32"
    sig.update({"dropout_p": "fp32", "drop_scale": "fp32"})
    groups = ("q", "k", "v", "o") if kernel == "fwd" else ("q", "k", "v", "o", "do")
    for g in groups:
        for s in ("b", "s", "h"):
            sig[f"stride_{g}{s}"] = "i32"
    for name in ("stride_lb", "stride_lh", "stride_mb", "stride_ms"):
        sig[name] = "i32"
    for name in ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "UPCAST", "DROPOUT"):
        sig[name] = "constexpr"
    return sig


def _aligned_args(kernel: str) -> tuple:
    """Arguments that are multiples of 16 for aligned q/k/v/o (contiguous or fused-QKV views)."""
    sig = _signature(kernel, torch.float16)
    return tuple(n for n, t in sig.items() if t.startswith("*") and n not in ("MASK", "CU", "RNG")) + tuple(
        n for n in sig if n.startswith("stride_") and n[-1] in "bsh" and n[7] in "qkvod")


def aot_specs() -> list[AOTSpec]:
    """Every (kernel, dtype, head_dim, config, dropout) the host functions launch on a GPU: the defaults and
    every tuning candidate, each with and without dropout. Padded, padded with a key padding mask and varlen
    are runtime arguments of the same specialization."""
    specs, seen = [], set()
    every = [(kernel, head_dim, cfg) for (kernel, head_dim, _bucket), cfg in CONFIGS.items()]
    every += [(kernel, head_dim, cfg) for (kernel, head_dim), cfgs in CANDIDATES.items() for cfg in cfgs]
    # dropout (training): the same configs; every one of them can be launched with dropout_p > 0
    for kernel, head_dim, cfg, dropout in [(*e, d) for d in (False, True) for e in every]:
        for dt in KERNEL_DTYPES:
            if (kernel, head_dim, cfg, dt, dropout) in seen:
                continue
            seen.add((kernel, head_dim, cfg, dt, dropout))
            specs.append(AOTSpec(
                name=(f"attention_{kernel}[{str(dt).replace('torch.', '')},D={head_dim},"
                      f"M{cfg.block_m}N{cfg.block_n}{',dropout' if dropout else ''}]"),
                fn=_KERNELS[kernel],
                signature=_signature(kernel, dt),
                constexprs={"HEAD_DIM": head_dim, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                            "UPCAST": False, "DROPOUT": dropout},
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, uses_mma=True,
                aligned=_aligned_args(kernel),
            ))
    return specs
