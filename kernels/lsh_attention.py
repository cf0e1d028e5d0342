"""LSH attention's kernels: the hashing, the chunked attention of every hash round read through the sort's
indices (roberta_fast.lsh.slots: slot -> token, no sorted copies of q, k, v), the rounds' combination, and
the backward.

    for each row n = (r, b, h) (one hash round of one sequence and head) and chunk c of C sorted slots:
        o_r, lse_r [positions of chunk c's queries] = softmax(scale * q_c [k_{c-1}, k_c]^T, masked) [v_{c-1}, v_c]
    out = sum_r softmax_r(lse_r) o_r,   lse = logsumexp_r lse_r          (per position)

Kernels, all rounds in one launch each (a forward: _lsh_hash, torch.sort, _lsh_chunk_fwd, _lsh_combine):
  _lsh_hash         per block of items of one (b, h): the sort key bucket * items + tie-break of every round,
                    bucket = argmax(x [R, -R]) (fp32 sums; fp16 inputs on tensor cores), padding -> n_buckets.
  _lsh_chunk_fwd    one program per (BLOCK_M query slots of a chunk, row): the queries gathered by position into
                    registers, the keys and values of chunk c - 1 (absent for c = 0) and chunk c gathered the
                    same way, BLOCK_N slots a step, with an online softmax in fp32 (exp2, log2(e) folded into the
                    scale); o_r (q's dtype) and the natural-log lse_r (fp32) stored at the queries' positions.
  _lsh_combine      per position and head: the rounds combined by their lse (out, q's dtype) and the total lse.
  _lsh_chunk_bwd_dq, _lsh_chunk_bwd_dkdv
                    flash-attention's backward on the chunks: the probabilities recomputed from the TOTAL lse
                    (exp(s - lse) is round r's softmax times its combination weight), so with dO and
                    delta = rowsum(dO * out) of the combined output no per-round dO or dlse is needed. dq per
                    (query slots, row) over key chunks c - 1, c (and delta, stored by round 0 for dkdv); dk, dv
                    per (key slots, row) over query chunks c, c + 1. Per-round gradients are written at
                    positions and summed over rounds in torch (one op).
Slots that hold no real query or key (padding, the tail, the other kind of item of the joint sort) are never
read (predicated loads); a padding token's slot writes its zeros (o = 0, lse = -inf, zero gradients), so every
output position is written and nothing is zero-filled first; SHARED (shared QK) replaces a slot's score with
itself by SELF_SCORE (whose gradient is 0); its keys are the queries, normalised where loaded (the dk dv
kernel carries the gradient through the normalisation, so q gets dq + dk). A row with no valid key gives o = 0,
lse = -inf.

Work per round: 4 * L * 2C * D FLOPs forward (linear in the length L), q, k, v read about twice and o written
once, through the gathers (each slot's row of D contiguous elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import AOTSpec, ptr
from ._launch import cdiv

LOG2E = 1.4426950408889634
SELF_SCORE = -1e5  # roberta_fast.lsh.SELF_SCORE (kernels do not import the package above them)
SELF_SCORE_LOG2 = tl.constexpr(SELF_SCORE * LOG2E)  # in the kernels' log2 units (a jit global must be constexpr)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # on GPUs; float32 too under the interpreter
MAX_HEAD_DIM = 128
MAX_CHUNK = 128  # chunk slots (the tiles are at most TILE x TILE; longer chunks are a few of them)
TILE = 64
COMBINE_BLOCK = 32  # (position, head) rows per program of _lsh_combine


@triton.jit
def _rows_of(n, B, H):
    """(r * B + b, h) of row n = (r * B + b) * H + h."""
    return n // H, n % H


@triton.jit
def _slot_pos(PERM, NREAL, n, b, slot, ok, items, S, SHARED: tl.constexpr, MASKED: tl.constexpr):
    """(query position, key position) of a block of slots of row n, -1 where the slot holds no real one: past
    the real items (padding sorts last), past `items` (the last chunk's tail), or the other kind of item; then
    the same with padding items kept (where their outputs and gradients are written as zeros)."""
    ok = ok & (slot < items)
    item = tl.load(PERM + n * items + slot, mask=ok, other=-1)
    if SHARED:
        qall = item
        kall = item
    else:
        qall = tl.where(ok & (item < S), item, -1)
        kall = tl.where(ok & (item >= S), item - S, -1)
    if MASKED:
        real = slot < tl.load(NREAL + b) * (1 if SHARED else 2)
        return tl.where(real, qall, -1), tl.where(real, kall, -1), qall, kall
    return qall, kall, qall, kall


@triton.jit
def _gather(X, b, h, pos, stride_b, stride_s, stride_h, offs_d, dmask):
    """x[b, pos, h, :] for a block of positions (pos < 0: zeros, never read)."""
    ok = pos >= 0
    ptrs = X + b * stride_b + tl.where(ok, pos, 0)[:, None] * stride_s + h * stride_h + offs_d[None, :]
    return tl.load(ptrs, mask=ok[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _unit_rows(k):
    """(k / max(|k|, 1e-12) in k's dtype, the fp32 normalised rows, the fp32 norms): shared QK's keys, made
    from the queries where they are loaded (torch.nn.functional.normalize's definition)."""
    kf = k.to(tl.float32)
    nrm = tl.maximum(tl.sqrt(tl.sum(kf * kf, 1)), 1e-12)
    khat = kf / nrm[:, None]
    return khat.to(k.dtype), khat, nrm


@triton.jit
def _lsh_hash(
    Q,  # (B, S, H, D) queries, last stride 1
    K,  # (B, S, H, D) keys, last stride 1 (not read with SHARED)
    ROT,  # (R, H, D, NB) float32: [R_r, -R_r] per round and head
    MASK,  # (B, S) bool as int8, True = real token (MASKED only)
    KEY,  # (R, B, H, items) int64: bucket * items + tie-break (the sort key)
    R, B, S, H, D, NB, items,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    SHARED: tl.constexpr, MASKED: tl.constexpr, F16_DOT: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    """The sort key of a block of items of one (b, h), every round: bucket = argmax(x [R, -R]), the products
    exact (R holds fp16 values) and summed in float32 (first index on ties, as torch.argmax), padding -> NB;
    F16_DOT (fp16 inputs): on tensor cores, else fp32 FMA; key = bucket * items + (position, or 2 * position
    + 1 for a key of the joint sort). x is read once; the projections never leave registers."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    it = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = it < items
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    if SHARED:
        pos = it
        x = tl.load(Q + b * stride_qb + pos[:, None] * stride_qs + h * stride_qh + offs_d[None, :],
                    mask=imask[:, None] & dmask[None, :], other=0.0)
        tie = pos
    else:
        is_k = it >= S
        pos = tl.where(is_k, it - S, it)
        qm = imask & (it < S)
        km = imask & is_k
        xq = tl.load(Q + b * stride_qb + pos[:, None] * stride_qs + h * stride_qh + offs_d[None, :],
                     mask=qm[:, None] & dmask[None, :], other=0.0)
        xk = tl.load(K + b * stride_kb + pos[:, None] * stride_ks + h * stride_kh + offs_d[None, :],
                     mask=km[:, None] & dmask[None, :], other=0.0)
        x = tl.where(is_k[:, None], xk, xq)
        tie = 2 * pos + is_k.to(tl.int32)
    if not F16_DOT:
        x = x.to(tl.float32)
    valid = imask
    if MASKED:
        valid = valid & (tl.load(MASK + b * S + pos, mask=imask, other=0) != 0)
    offs_n = tl.arange(0, BLOCK_NB)
    for r in range(0, R):
        best = tl.full((BLOCK_I,), float("-inf"), tl.float32)
        arg = tl.zeros((BLOCK_I,), tl.int32)
        w_base = ROT + ((r * H + h) * D) * NB
        for n0 in range(0, NB, BLOCK_NB):
            cols = n0 + offs_n
            w = tl.load(w_base + offs_d[:, None] * NB + cols[None, :], mask=dmask[:, None] & (cols < NB)[None, :],
                        other=0.0)
            if F16_DOT:  # fp16 x and R (R's values are fp16's): exact products, fp32 sums, tensor cores
                proj = tl.dot(x, w.to(tl.float16))  # (BLOCK_I, BLOCK_NB) float32
            else:
                proj = tl.dot(x, w, input_precision="ieee")
            proj = tl.where((cols < NB)[None, :], proj, float("-inf"))
            m = tl.max(proj, 1)
            a = tl.argmax(proj, 1).to(tl.int32) + n0
            up = m > best  # strictly: an earlier block keeps a tie
            best = tl.where(up, m, best)
            arg = tl.where(up, a, arg)
        bucket = tl.where(valid, arg, NB).to(tl.int64)
        tl.store(KEY + ((r * B + b) * H + h) * items + it, bucket * items + tie, mask=imask)


@triton.jit
def _lsh_chunk_fwd(
    Q,  # (B, S, H, D) queries, last stride 1
    K,  # (B, S, H, D) keys, last stride 1 (SHARED: the queries, normalised where loaded)
    V,  # (B, S, H, D) values, last stride 1
    PERM,  # (N, items) int64: the item in each slot (lsh.slots); N = R * B * H
    NREAL,  # (B,) int32: real tokens per sequence (MASKED only)
    O,  # (R, B, S, H, D) contiguous: per-round output at positions, q's dtype
    LSE,  # (R, B, S, H) contiguous float32: per-round natural-log log-sum-exp at positions
    items, C, B, S, H, D,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    qk_scale,  # scale * log2(e)
    SHARED: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (BLOCK_M query slots of a chunk, row n); keys in steps of BLOCK_N slots."""
    subs = (C + BLOCK_M - 1) // BLOCK_M
    c = tl.program_id(0) // subs
    i0 = (tl.program_id(0) % subs) * BLOCK_M
    n = tl.program_id(1).to(tl.int64)
    rb, h = _rows_of(n, B, H)
    b = rb % B
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    rows = c * C + i0 + offs_m  # slot indices of this program's queries
    qpos, _, qall, _ = _slot_pos(PERM, NREAL, n, b, rows, i0 + offs_m < C, items, S, SHARED, MASKED)
    q = _gather(Q, b, h, qpos, stride_qb, stride_qs, stride_qh, offs_d, dmask)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for kc in range(tl.maximum(c - 1, 0), c + 1):
        for j0 in range(0, C, BLOCK_N):
            cols = kc * C + j0 + offs_n
            kpos = _slot_pos(PERM, NREAL, n, b, cols, j0 + offs_n < C, items, S, SHARED, MASKED)[1]
            ok = kpos >= 0
            k = _gather(K, b, h, kpos, stride_kb, stride_ks, stride_kh, offs_d, dmask)
            if SHARED:  # K is the queries: the keys are their normalised rows
                k = _unit_rows(k)[0]
            v = _gather(V, b, h, kpos, stride_vb, stride_vs, stride_vh, offs_d, dmask)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N) in log2 units
            if SHARED:
                s = tl.where(rows[:, None] == cols[None, :], SELF_SCORE_LOG2, s)
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
    qok = qpos >= 0  # padding queries: o = 0, lse = -inf (every position of O and LSE is written)
    o = tl.where(qok[:, None], o, 0.0)
    lse = tl.where(qok, lse, float("-inf"))
    out_row = (rb * S + tl.where(qall >= 0, qall, 0)) * H + h  # (r, b, pos, h)
    tl.store(O + out_row[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=(qall >= 0)[:, None] & dmask[None, :])
    tl.store(LSE + out_row, lse, mask=qall >= 0)


@triton.jit
def _lsh_combine(
    O,  # (R, M, D) per-round outputs, M = B * S * H rows (read where that round's lse > -inf)
    LSE,  # (R, M) float32 per-round lse (-inf: the round gave the row nothing)
    OUT,  # (M, D) combined output, q's dtype (zeros where every round is -inf)
    LSE_ALL,  # (M,) float32 logsumexp over the rounds
    R, M, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < M
    dmask = offs_d < D
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for r in range(0, R):
        lse = tl.load(LSE + r * M + rows, mask=rmask, other=float("-inf"))
        live = lse > float("-inf")
        o = tl.load(O + (r * M + rows)[:, None] * D + offs_d[None, :], mask=live[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        m_new = tl.maximum(m_i, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        w = tl.exp(lse - m_safe)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m_i = m_new
    dead = l_i == 0.0
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    tl.store(OUT + rows[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    tl.store(LSE_ALL + rows, tl.where(dead, float("-inf"), m_i + tl.log(tl.where(dead, 1.0, l_i))), mask=rmask)


@triton.jit
def _row_stats(LSE_ALL, DELTA, b, h, pos, S, H):
    """(lse in log2 units, +inf where the row has none: p = 0; delta) of a block of query positions."""
    ok = pos >= 0
    idx = (b * S + tl.where(ok, pos, 0)) * H + h
    lse = tl.load(LSE_ALL + idx, mask=ok, other=float("inf"))
    delta = tl.load(DELTA + idx, mask=ok, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), delta


@triton.jit
def _lsh_chunk_bwd_dq(
    Q,  # (B, S, H, D) queries, last stride 1
    K,  # (B, S, H, D) keys, last stride 1
    V,  # (B, S, H, D) values, last stride 1
    DO,  # (B, S, H, D) contiguous: gradient of the combined output
    OUT,  # (B, S, H, D) contiguous: the combined output
    LSE_ALL,  # (B, S, H) float32: the combined lse
    DELTA,  # (B, S, H) float32: rowsum(dO * out), written by round 0's programs (for _lsh_chunk_bwd_dkdv)
    PERM,  # (N, items) int64
    NREAL,  # (B,) int32 (MASKED only)
    DQ,  # (R, B, S, H, D) contiguous: per-round dq at positions, q's dtype
    items, C, B, S, H, D,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale
    SHARED: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (BLOCK_M query slots of a chunk, row n) over the key slots of chunks c - 1 and c."""
    subs = (C + BLOCK_M - 1) // BLOCK_M
    c = tl.program_id(0) // subs
    i0 = (tl.program_id(0) % subs) * BLOCK_M
    n = tl.program_id(1).to(tl.int64)
    rb, h = _rows_of(n, B, H)
    b = rb % B
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    rows = c * C + i0 + offs_m
    qpos, _, qall, _ = _slot_pos(PERM, NREAL, n, b, rows, i0 + offs_m < C, items, S, SHARED, MASKED)
    q = _gather(Q, b, h, qpos, stride_qb, stride_qs, stride_qh, offs_d, dmask)
    do = _gather(DO, b, h, qpos, S * H * D, H * D, D, offs_d, dmask)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    qok = qpos >= 0
    idx = (b * S + tl.where(qok, qpos, 0)) * H + h
    lse = tl.load(LSE_ALL + idx, mask=qok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # no key: p = 0
    o = _gather(OUT, b, h, qpos, S * H * D, H * D, D, offs_d, dmask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # every round's programs: no launch between
    if rb < B:  # round 0 holds each real query once
        tl.store(DELTA + idx, delta, mask=qok)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for kc in range(tl.maximum(c - 1, 0), c + 1):
        for j0 in range(0, C, BLOCK_N):
            cols = kc * C + j0 + offs_n
            kpos = _slot_pos(PERM, NREAL, n, b, cols, j0 + offs_n < C, items, S, SHARED, MASKED)[1]
            ok = kpos >= 0
            k = _gather(K, b, h, kpos, stride_kb, stride_ks, stride_kh, offs_d, dmask)
            if SHARED:  # K is the queries: the keys are their normalised rows
                k = _unit_rows(k)[0]
            v = _gather(V, b, h, kpos, stride_vb, stride_vs, stride_vh, offs_d, dmask)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            if SHARED:
                s = tl.where(rows[:, None] == cols[None, :], SELF_SCORE_LOG2, s)
            p = tl.exp2(tl.where(ok[None, :], s - lse2[:, None], float("-inf")))
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            if SHARED:
                ds = tl.where(rows[:, None] == cols[None, :], 0.0, ds)  # the self score is a constant
            dq += tl.dot(ds.to(k.dtype), k)
    dq = tl.where(qok[:, None], dq * sm_scale, 0.0)  # padding: zeros (every position of DQ is written)
    out_row = (rb * S + tl.where(qall >= 0, qall, 0)) * H + h
    tl.store(DQ + out_row[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(qall >= 0)[:, None] & dmask[None, :])


@triton.jit
def _lsh_chunk_bwd_dkdv(
    Q,  # (B, S, H, D) queries, last stride 1
    K,  # (B, S, H, D) keys, last stride 1
    V,  # (B, S, H, D) values, last stride 1
    DO,  # (B, S, H, D) contiguous
    LSE_ALL,  # (B, S, H) float32
    DELTA,  # (B, S, H) float32
    PERM,  # (N, items) int64
    NREAL,  # (B,) int32 (MASKED only)
    DK,  # (R, B, S, H, D) contiguous: per-round dk at positions, q's dtype
    DV,  # (R, B, S, H, D) contiguous: per-round dv at positions, q's dtype
    items, C, B, S, H, D,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale
    SHARED: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (BLOCK_N key slots of a chunk kc, row n) over the query slots of chunks kc and kc + 1
    (the queries that see these keys)."""
    subs = (C + BLOCK_N - 1) // BLOCK_N
    kc = tl.program_id(0) // subs
    j0 = (tl.program_id(0) % subs) * BLOCK_N
    n = tl.program_id(1).to(tl.int64)
    rb, h = _rows_of(n, B, H)
    b = rb % B
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    cols = kc * C + j0 + offs_n  # this program's key slots
    _, kpos, _, kall = _slot_pos(PERM, NREAL, n, b, cols, j0 + offs_n < C, items, S, SHARED, MASKED)
    k = _gather(K, b, h, kpos, stride_kb, stride_ks, stride_kh, offs_d, dmask)
    khat = k.to(tl.float32)
    nrm = tl.full((BLOCK_N,), 1.0, tl.float32)
    if SHARED:  # K is the queries: the keys are their normalised rows
        k, khat, nrm = _unit_rows(k)
    v = _gather(V, b, h, kpos, stride_vb, stride_vs, stride_vh, offs_d, dmask)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    n_chunks = (items + C - 1) // C
    for c in range(kc, tl.minimum(kc + 2, n_chunks)):
        for i0 in range(0, C, BLOCK_M):
            rows = c * C + i0 + offs_m
            qpos = _slot_pos(PERM, NREAL, n, b, rows, i0 + offs_m < C, items, S, SHARED, MASKED)[0]
            q = _gather(Q, b, h, qpos, stride_qb, stride_qs, stride_qh, offs_d, dmask)
            do = _gather(DO, b, h, qpos, S * H * D, H * D, D, offs_d, dmask)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse2, delta = _row_stats(LSE_ALL, DELTA, b, h, qpos, S, H)
            s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (keys, queries)
            if SHARED:
                s_t = tl.where(cols[:, None] == rows[None, :], SELF_SCORE_LOG2, s_t)
            p_t = tl.exp2(s_t - lse2[None, :])  # slots without a query: lse2 = +inf, p = 0
            dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            if SHARED:
                ds_t = tl.where(cols[:, None] == rows[None, :], 0.0, ds_t)
            dk += tl.dot(ds_t.to(q.dtype), q)
    kok = kpos >= 0  # padding keys: zeros (every position of DK and DV is written)
    dk = dk * sm_scale
    if SHARED:  # through the normalisation: d q = (d khat - khat (khat . d khat)) / max(|q|, eps)
        dk = (dk - khat * tl.sum(khat * dk, 1)[:, None]) / nrm[:, None]
    dk = tl.where(kok[:, None], dk, 0.0)
    dv = tl.where(kok[:, None], dv, 0.0)
    out_row = (rb * S + tl.where(kall >= 0, kall, 0)) * H + h
    out = out_row[:, None] * D + offs_d[None, :]
    omask = (kall >= 0)[:, None] & dmask[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=omask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=omask)


# ------------------------------------------------------------------------------------------ host side


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


def _meta(q, chunk: int, shared: bool, masked: bool) -> dict:
    """Tiles: BLOCK_M query slots per program (a chunk of C slots is cdiv(C, BLOCK_M) programs), keys in steps
    of BLOCK_N slots; 64 x 64 at most, on 8 warps: the gathers' per-element pointers cost registers, and
    128 x 128 tiles (or 64 x 64 on 4 warps) left a stack frame (spills) on sm_90 (cuobjdump -res-usage STACK)."""
    block = min(_pow2(chunk), TILE)
    return dict(SHARED=bool(shared), MASKED=bool(masked), UPCAST=interpret_mode() and q.dtype == torch.bfloat16,
                BLOCK_M=block, BLOCK_N=block, BLOCK_D=_pow2(q.shape[-1]), num_warps=8 if block == TILE else 4)


def _grid(items: int, chunk: int, meta: dict, rows: int):
    return (cdiv(items, chunk) * cdiv(chunk, meta["BLOCK_M"]), rows)


def _strides(*ts):
    return [s for t in ts for s in t.stride()[:3]]


HASH_BLOCK_I, HASH_BLOCK_NB = 64, 64  # items per program, buckets per step of the hashing kernel


def sort_keys(q, k, rot, key_padding_mask):
    """(R, B, H, items) int64 sort keys (roberta_fast.lsh.sort_items' keys) from one launch: q, k (B, S, H, D)
    with unit last stride (k None: shared QK), rot [R, -R] float32 (R, H, D, nb), key_padding_mask bool (B, S)
    or None."""
    B, S, H, D = q.shape
    R, NB = rot.shape[0], rot.shape[-1]
    shared = k is None
    items = S if shared else 2 * S
    key = torch.empty((R, B, H, items), dtype=torch.int64, device=q.device)
    if key.numel() == 0:
        return key
    kk = q if shared else k
    mask = q if key_padding_mask is None else key_padding_mask.contiguous().view(torch.int8)
    _lsh_hash[(cdiv(items, HASH_BLOCK_I), B * H)](
        q, kk, rot, mask, key, R, B, S, H, D, NB, items, *_strides(q, kk), SHARED=shared,
        MASKED=key_padding_mask is not None, F16_DOT=q.dtype == torch.float16, BLOCK_I=HASH_BLOCK_I,
        BLOCK_D=_pow2(D), BLOCK_NB=HASH_BLOCK_NB,
        num_warps=4)
    return key


def lsh_forward(q, k, v, perm, nreal, chunk: int, scale: float, shared: bool):
    """(out (B, S, H, D) q.dtype, lse (B, S, H) float32) of every round's chunked attention combined: two
    launches (padding positions are written by the chunk kernel as o = 0, lse = -inf).
    q, k, v (B, S, H, D) with unit last stride (k: the normalised queries under shared QK); perm int64
    (R * B * H, items) and nreal int32 (B,) or None from roberta_fast.lsh.slots."""
    B, S, H, D = q.shape
    N, items = perm.shape
    R = N // max(B * H, 1)
    o_r = torch.empty((R, B, S, H, D), dtype=q.dtype, device=q.device)
    lse_r = torch.empty((R, B, S, H), dtype=torch.float32, device=q.device)  # every position written
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, S, H), dtype=torch.float32, device=q.device)
    if N == 0 or S == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    meta = _meta(q, chunk, shared, nreal is not None)
    _lsh_chunk_fwd[_grid(items, chunk, meta, N)](q, k, v, perm, perm if nreal is None else nreal, o_r, lse_r, items,
                                            chunk, B, S, H, D, *_strides(q, k, v), float(scale) * LOG2E, **meta)
    M = B * S * H
    _lsh_combine[(cdiv(M, COMBINE_BLOCK),)](o_r, lse_r, out, lse, R, M, D, BLOCK_M=COMBINE_BLOCK,
                                            BLOCK_D=meta["BLOCK_D"], num_warps=4)
    return out, lse


def lsh_backward(do, q, k, v, out, lse, perm, nreal, chunk: int, scale: float, shared: bool):
    """(dq, dk, dv) (B, S, H, D) q.dtype of `lsh_forward`'s out, given do (B, S, H, D)."""
    B, S, H, D = q.shape
    N, items = perm.shape
    R = N // max(B * H, 1)
    do = do.contiguous()
    delta = torch.empty((B, S, H), dtype=torch.float32, device=q.device)
    # dq, dk, dv of every round in one buffer (every position written, padding as zeros), summed at once
    grads = torch.empty((3, R, B, S, H, D), dtype=q.dtype, device=q.device)
    if N and S:
        meta = _meta(q, chunk, shared, nreal is not None)
        args = (perm, perm if nreal is None else nreal)
        tail = (items, chunk, B, S, H, D, *_strides(q, k, v), float(scale) * LOG2E, float(scale))
        grid = _grid(items, chunk, meta, N)  # BLOCK_M == BLOCK_N: the same for both kernels
        _lsh_chunk_bwd_dq[grid](q, k, v, do, out, lse, delta, *args, grads[0], *tail, **meta)
        _lsh_chunk_bwd_dkdv[grid](q, k, v, do, lse, delta, *args, grads[1], grads[2], *tail, **meta)
    g = grads[:, 0] if R == 1 else grads.sum(1)
    return g[0], g[1], g[2]


class LSHAttention(torch.autograd.Function):
    """The Triton forward and backward of the chunked attention and the rounds' combination, on the
    original (B, S, H, D) tensors through the layout's indices."""

    @staticmethod
    def forward(ctx, q, k, v, perm, nreal, chunk, scale, shared):
        ctx.set_materialize_grads(False)
        out, lse = lsh_forward(q, k, v, perm, nreal, chunk, scale, shared)
        ctx.save_for_backward(q, k, v, out, lse, perm, nreal)
        ctx.args = (chunk, scale, shared)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, perm, nreal = ctx.saved_tensors
        if dout is None:
            return (None,) * 8
        dq, dk, dv = lsh_backward(dout, q, k, v, out, lse, perm, nreal, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def lsh_attention(q, k, v, perm, nreal, chunk: int, scale: float, shared: bool):
    """out (B, S, H, D) q.dtype (rows without a real query or key: zeros), with autograd when an input needs
    gradients. q, k, v (B, S, H, D) with unit last stride (k: the keys, the normalised queries under shared
    QK); perm, nreal, chunk, shared from roberta_fast.lsh.slots."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return LSHAttention.apply(q, k, v, perm, nreal, chunk, scale, shared)[0]
    return lsh_forward(q, k, v, perm, nreal, chunk, scale, shared)[0]


# ------------------------------------------------------------------------------ ahead-of-time specs


def aot_specs() -> list[AOTSpec]:
    """The GPU's specialization of each kernel (fp16, bucket 64 with separate keys and a mask: chunks of 128
    slots, head_dim 64) for the ahead-of-time compile check: hashing, forward, combine, backward dq and dkdv
    (shared QK, chunks of 64, runs the same code with smaller tiles)."""
    f16 = ptr(torch.float16)
    dims = {"items": "i32", "C": "i32", "B": "i32", "S": "i32", "H": "i32", "D": "i32",
            **{f"stride_{t}{s}": "i32" for t in "qkv" for s in "bsh"}, "qk_scale": "fp32"}
    meta = {"SHARED": "constexpr", "MASKED": "constexpr", "UPCAST": "constexpr", "BLOCK_M": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
    consts = {"SHARED": False, "MASKED": True, "UPCAST": False, "BLOCK_M": TILE, "BLOCK_N": TILE, "BLOCK_D": 64}
    idx = {"PERM": ptr(torch.int64), "NREAL": ptr(torch.int32)}
    fwd = {"Q": f16, "K": f16, "V": f16, **idx, "O": f16, "LSE": "*fp32", **dims, **meta}
    bwd_in = {"Q": f16, "K": f16, "V": f16, "DO": f16, "LSE_ALL": "*fp32", "DELTA": "*fp32", **idx}
    dq = {"Q": f16, "K": f16, "V": f16, "DO": f16, "OUT": f16, "LSE_ALL": "*fp32", "DELTA": "*fp32", **idx,
          "DQ": f16, **dims, "sm_scale": "fp32", **meta}
    dkdv = {**bwd_in, "DK": f16, "DV": f16, **dims, "sm_scale": "fp32", **meta}
    comb = {"O": f16, "LSE": "*fp32", "OUT": f16, "LSE_ALL": "*fp32", "R": "i32", "M": "i32", "D": "i32",
            "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"}
    hash_sig = {"Q": f16, "K": f16, "ROT": "*fp32", "MASK": ptr(torch.int8), "KEY": ptr(torch.int64),
                **{n: "i32" for n in ("R", "B", "S", "H", "D", "NB", "items")},
                **{f"stride_{t}{s}": "i32" for t in "qk" for s in "bsh"},
                **{n: "constexpr" for n in ("SHARED", "MASKED", "F16_DOT", "BLOCK_I", "BLOCK_D", "BLOCK_NB")}}
    shared = {**consts, "SHARED": True, "MASKED": False}  # shared QK (bucket 64: chunks of 64 slots)
    return [
        AOTSpec("lsh_attention_hash[fp16,D=64]", _lsh_hash, hash_sig,
                {"SHARED": False, "MASKED": True, "F16_DOT": True, "BLOCK_I": HASH_BLOCK_I, "BLOCK_D": 64,
                 "BLOCK_NB": HASH_BLOCK_NB}, num_warps=4, uses_mma=True),
        AOTSpec("lsh_attention_fwd[fp16,M64N64,D=64]", _lsh_chunk_fwd, fwd, consts, num_warps=8, uses_mma=True),
        AOTSpec("lsh_attention_combine[fp16,D=64]", _lsh_combine, comb, {"BLOCK_M": COMBINE_BLOCK, "BLOCK_D": 64},
                num_warps=4),
        AOTSpec("lsh_attention_bwd_dq[fp16,M64N64,D=64]", _lsh_chunk_bwd_dq, dq, consts, num_warps=8,
                uses_mma=True),
        AOTSpec("lsh_attention_bwd_dkdv[fp16,M64N64,D=64]", _lsh_chunk_bwd_dkdv, dkdv, consts, num_warps=8,
                uses_mma=True),
        AOTSpec("lsh_attention_fwd[fp16,M64N64,D=64,shared]", _lsh_chunk_fwd, fwd, shared, num_warps=8,
                uses_mma=True),
        AOTSpec("lsh_attention_bwd_dq[fp16,M64N64,D=64,shared]", _lsh_chunk_bwd_dq, dq, shared, num_warps=8,
                uses_mma=True),
        AOTSpec("lsh_attention_bwd_dkdv[fp16,M64N64,D=64,shared]", _lsh_chunk_bwd_dkdv, dkdv, shared, num_warps=8,
                uses_mma=True),
    ]
