"""Fused linear + cross-entropy: loss_i = CE(h_i W^T + b, y_i) over a vocabulary of V, forward and backward,
without the (M, V) logits.

    z_ij   = h_i . W_j + b_j                          (recomputed tile by tile, never stored whole)
    lse_i  = log sum_j exp(z_ij)                      online: running max and sum of exp per vocab tile
    loss_i = lse_i - (1 - eps) z_{i,y_i} - eps / V sum_j z_ij      (eps = label smoothing; 0 at ignored rows)
    dz_ij  = g_i (softmax_ij - (1 - eps) [j == y_i] - eps / V)     (g_i = dloss_i; 0 at ignored rows)
    dh = dz W,  dW = dz^T h,  db = sum_i dz_ij

FLOPs: the forward is one (M x H) @ (H x V) product (2 M H V); the backward recomputes it and adds the two
products of dh and dW (6 M H V in all). Bytes: the forward reads h and W once per row tile; no (M, V) tensor
exists in either pass.

Forward (`_lce_fwd_kernel`): a 2-D grid of (row tile, vocabulary split). A program walks its split of the
vocabulary in BLOCK_V columns; each (BLOCK_M, BLOCK_V) logits tile is a K loop of tl.dot (HMMA on sm_80,
HGMMA on sm_90 for fp16 / bf16), accumulated in fp32, then folded into the row's running max, sum of exp,
logit at the label and sum of logits. The splits give the GPU enough programs when only the masked 15% of
tokens are rows; the host combines the (n_split, M) fp32 partials (a few small torch ops, deterministic).

Backward: the vocabulary in chunks of C columns (host loop). Per chunk, `_lce_dlogits_kernel` recomputes the
logits tile by tl.dot and writes dz for (M, C) in h's dtype (the one buffer the backward holds; C is chosen so
that M * C stays near 2^24 elements), then `_mm_kernel` (tl.dot) adds dz @ W_c into an fp32 dh and writes
dW_c = dz^T h; db_c is an fp32 column sum. Every sum has a fixed order: deterministic gradients.
"""

import torch
import triton
import triton.language as tl

from ._aot import AOTSpec, ptr
from ._launch import INTERPRET, cdiv


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32 (b cast to a's dtype). UPCAST (interpreter + bfloat16 only): Triton's interpreter
    multiplies bfloat16 bit patterns in tl.dot, so the tiles go through float32 there; never on a GPU."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PREC)


@triton.jit
def _logits_tile(
    Hp, Wp, rows64, row_ok, cols64, col_ok, K, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """(BLOCK_M, BLOCK_V) fp32 tile of h W^T (no bias)."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        h = tl.load(Hp + rows64[:, None] * stride_hm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(Wp + cols64[None, :] * K + ks[:, None], mask=col_ok[None, :] & k_ok[:, None],
                    other=0.0)  # (BLOCK_K, BLOCK_V), W^T's tile
        acc = _dot(h, w, acc, DOT_PREC, UPCAST)
    return acc


@triton.jit
def _lce_fwd_kernel(
    Hp,  # (M, K) hidden rows, row stride stride_hm, unit column stride
    Wp,  # (V, K) decoder weight, contiguous (h's dtype or fp32; cast to h's dtype for the dot)
    Bp,  # (V,) bias (any pointer when HAS_BIAS is False)
    Yp,  # (M,) int64 labels
    PM,  # (n_split, M) fp32: running max of the split
    PS,  # (n_split, M) fp32: sum of exp(z - max) of the split
    PZY,  # (n_split, M) fp32: z at the label (0 when the label is outside the split)
    PZS,  # (n_split, M) fp32: sum of z over the split
    M,
    V,
    K,
    stride_hm,
    v_per_split,  # columns per split, a multiple of BLOCK_V
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter + bfloat16 only (see _dot)
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    y = tl.load(Yp + rows64, mask=row_ok, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    zy = tl.zeros([BLOCK_M], dtype=tl.float32)
    zs = tl.zeros([BLOCK_M], dtype=tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        cols64 = cols.to(tl.int64)
        z = _logits_tile(Hp, Wp, rows64, row_ok, cols64, col_ok, K, stride_hm, BLOCK_M, BLOCK_V, BLOCK_K,
                         DOT_PREC, UPCAST)
        if HAS_BIAS:
            z += tl.load(Bp + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        zm = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(zm, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(zm - m_new[:, None]), axis=1)
        m_i = m_new
        zy += tl.sum(tl.where(cols64[None, :] == y[:, None], z, 0.0), axis=1)
        zs += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
    out = pid_s.to(tl.int64) * M + rows64
    tl.store(PM + out, m_i, mask=row_ok)
    tl.store(PS + out, s_i, mask=row_ok)
    tl.store(PZY + out, zy, mask=row_ok)
    tl.store(PZS + out, zs, mask=row_ok)


@triton.jit
def _lce_dlogits_kernel(
    Hp,  # (M, K) hidden rows, row stride stride_hm
    Wp,  # (V, K) decoder weight, contiguous
    Bp,  # (V,) bias (any pointer when HAS_BIAS is False)
    Yp,  # (M,) int64 labels
    LSE,  # (M,) fp32 log-sum-exp of the forward
    G,  # (M,) fp32 gradient of each row's loss
    DZ,  # (M, C) dz of this chunk, contiguous, h's dtype
    M,
    V,
    K,
    stride_hm,
    v0,  # first column of the chunk
    C,  # columns in the chunk
    ignore_index,
    keep,  # 1 - label_smoothing
    spread,  # label_smoothing / V
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter + bfloat16 only (see _dot)
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = local < C
    cols64 = (v0 + local).to(tl.int64)
    z = _logits_tile(Hp, Wp, rows64, row_ok, cols64, col_ok, K, stride_hm, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PREC,
                     UPCAST)
    if HAS_BIAS:
        z += tl.load(Bp + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = tl.load(Yp + rows64, mask=row_ok, other=ignore_index)
    lse = tl.load(LSE + rows64, mask=row_ok, other=0.0)
    g = tl.load(G + rows64, mask=row_ok, other=0.0)
    valid = row_ok & (y != ignore_index)
    p = tl.exp(z - lse[:, None])
    dz = g[:, None] * (p - keep * (cols64[None, :] == y[:, None]).to(tl.float32) - spread)
    dz = tl.where(valid[:, None], dz, 0.0)  # ignored rows: exact zeros (their lse may be anything)
    tl.store(DZ + rows64[:, None] * C + local[None, :], dz.to(DZ.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _mm_kernel(
    A,  # (M, K) strides (stride_am, stride_ak)
    B,  # (K, N) strides (stride_bk, unit), cast to A's dtype for the dot
    Cp,  # (M, N) output, row stride stride_cm, unit column stride; fp32 when ACC
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_cm,
    ACC: tl.constexpr,  # C += A @ B (C read back in fp32) instead of C = A @ B
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter + bfloat16 only (see _dot)
):
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // grid_n
    pid_n = pid % grid_n
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = ks < K
        a = tl.load(A + rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(B + ks[:, None] * stride_bk + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_PREC, UPCAST)
    ok = row_ok[:, None] & col_ok[None, :]
    out = Cp + rows[:, None] * stride_cm + cols[None, :]
    if ACC:
        acc += tl.load(out, mask=ok, other=0.0)
    tl.store(out, acc.to(Cp.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- tuning (one place)

# (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) of the logits tiles (forward and dz): a 64 x 128 fp32
# accumulator over 4 warps (one warpgroup: wgmma's M of 64 on sm_90), K in steps of 64 (128 bytes of fp16).
# fp32 inputs take the ieee dot (no TF32, as torch's default matmul) and smaller K steps.
_TILE = {torch.float16: (64, 128, 64, 4, 3), torch.bfloat16: (64, 128, 64, 4, 3), torch.float32: (64, 64, 32, 4, 2)}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the backward's products dh += dz W_c and dW_c = dz^T h
_MM = {torch.float16: (64, 128, 64, 4, 3), torch.bfloat16: (64, 128, 64, 4, 3), torch.float32: (64, 64, 32, 4, 2)}
_TILE_INTERPRET = (16, 64, 32, 4, 1)  # the interpreter: small tiles, several per test input
_TARGET_PROGRAMS = 512  # forward: vocabulary splits until (row tiles x splits) reaches about this
_CHUNK_ELEMS = 1 << 24  # backward: columns per chunk so that M x C stays near this many elements
_CHUNK_MIN, _CHUNK_MAX = 1024, 16384
_INTERPRET_CHUNK = 192  # under the interpreter: several chunks (one ragged) per test vocabulary


def _upcast(dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored by fp16 / bf16 dots


def _tile(dtype):
    return _TILE_INTERPRET if INTERPRET else _TILE[dtype]


def _mm_tile(dtype):
    return _TILE_INTERPRET if INTERPRET else _MM[dtype]


def _splits(M: int, V: int, block_m: int, block_v: int):
    """(n_split, v_per_split) of the forward."""
    tiles_v = cdiv(V, block_v)
    want = 2 if INTERPRET else max(1, _TARGET_PROGRAMS // max(1, cdiv(M, block_m)))
    n = max(1, min(tiles_v, want))
    per = cdiv(tiles_v, n) * block_v
    return cdiv(V, per), per


def chunk_columns(M: int, V: int) -> int:
    """Columns of the backward's dz chunk (M, C)."""
    if INTERPRET:
        return min(V, _INTERPRET_CHUNK)
    c = max(_CHUNK_MIN, min(_CHUNK_MAX, _CHUNK_ELEMS // max(M, 1)))
    return min(V, c // 128 * 128)


# ----------------------------------------------------------------------------- host functions

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported(hidden, weight, bias, labels, ignore_index, label_smoothing):
    """Why these kernels cannot take the call, or None (any M, H, V; hidden's dtype only)."""
    if hidden.dtype not in KERNEL_DTYPES:
        return (f"backend 'triton' linear_cross_entropy supports hidden dtypes (float16, bfloat16, float32), "
                f"got {hidden.dtype}")
    return None


def forward(hidden, weight, bias, labels, ignore_index, label_smoothing):
    """hidden (M, H) rows; weight (V, H), bias (V,) or None contiguous; labels (M,) int64 contiguous
    -> (loss (M,) fp32, 0 at ignored rows; lse (M,) fp32)."""
    M, K = hidden.shape
    V = weight.shape[0]
    block_m, block_v, block_k, warps, stages = _tile(hidden.dtype)
    n_split, per = _splits(M, V, block_m, block_v)
    part = torch.empty((4, n_split, M), dtype=torch.float32, device=hidden.device)
    _lce_fwd_kernel[(cdiv(M, block_m), n_split)](
        hidden, weight, bias if bias is not None else weight, labels, part[0], part[1], part[2], part[3],
        M, V, K, hidden.stride(0), per, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k,
        HAS_BIAS=bias is not None, DOT_PREC=_prec(hidden.dtype), UPCAST=_upcast(hidden.dtype), num_warps=warps,
        num_stages=stages,
    )
    pm, ps, pzy, pzs = part
    m = pm.amax(0)
    lse = m + torch.log((ps * torch.exp(pm - m)).sum(0))
    loss = lse - (1.0 - label_smoothing) * pzy.sum(0)
    if label_smoothing:
        loss = loss - (label_smoothing / V) * pzs.sum(0)
    loss = torch.where(labels != ignore_index, loss, 0.0)
    return loss, lse


def backward(dloss, hidden, weight, bias, labels, lse, ignore_index, label_smoothing):
    """dloss (M,) fp32 -> (dhidden (M, H) hidden.dtype, dweight (V, H) weight.dtype, dbias (V,) bias.dtype or
    None); the logits recomputed chunk by chunk."""
    M, K = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    block_m, block_v, block_k, warps, stages = _tile(hidden.dtype)
    mm_m, mm_n, mm_k, mm_warps, mm_stages = _mm_tile(hidden.dtype)
    prec, up = _prec(hidden.dtype), _upcast(hidden.dtype)
    C = chunk_columns(M, V)
    dz = torch.empty((M, C), dtype=hidden.dtype, device=dev)
    dh = torch.empty((M, K), dtype=torch.float32, device=dev)
    dw = torch.empty((V, K), dtype=weight.dtype, device=dev)
    db = torch.empty((V,), dtype=torch.float32, device=dev) if bias is not None else None
    keep, spread = 1.0 - label_smoothing, label_smoothing / V
    for i, v0 in enumerate(range(0, V, C)):
        c = min(C, V - v0)
        dzc = dz[:, :c] if c == C else dz.view(-1)[: M * c].view(M, c)  # contiguous (M, c)
        _lce_dlogits_kernel[(cdiv(M, block_m), cdiv(c, block_v))](
            hidden, weight, bias if bias is not None else weight, labels, lse, dloss, dzc, M, V, K,
            hidden.stride(0), v0, c, ignore_index, keep, spread, BLOCK_M=block_m, BLOCK_V=block_v,
            BLOCK_K=block_k, HAS_BIAS=bias is not None, DOT_PREC=prec, UPCAST=up, num_warps=warps,
            num_stages=stages,
        )
        wc = weight[v0:v0 + c]  # (c, K) contiguous rows
        # dh (+)= dz_c @ W_c
        _mm_kernel[(cdiv(M, mm_m) * cdiv(K, mm_n),)](
            dzc, wc, dh, M, K, c, c, 1, K, K, ACC=i > 0, BLOCK_M=mm_m, BLOCK_N=mm_n, BLOCK_K=mm_k,
            DOT_PREC=prec, UPCAST=up, num_warps=mm_warps, num_stages=mm_stages,
        )
        # dW_c = dz_c^T @ h
        _mm_kernel[(cdiv(c, mm_m) * cdiv(K, mm_n),)](
            dzc, hidden, dw[v0:v0 + c], c, K, M, 1, c, hidden.stride(0), K, ACC=False, BLOCK_M=mm_m,
            BLOCK_N=mm_n, BLOCK_K=mm_k, DOT_PREC=prec, UPCAST=up, num_warps=mm_warps, num_stages=mm_stages,
        )
        if db is not None:
            torch.sum(dzc, 0, dtype=torch.float32, out=db[v0:v0 + c])
    dbias = None if bias is None else db.to(bias.dtype)
    return dh.to(hidden.dtype), dw, dbias


# ----------------------------------------------------------------------------- ahead-of-time specs


def _combos():
    """(hidden dtype, weight dtype, bias dtype or None) the op layer can pass: parameters in hidden's dtype or
    float32."""
    out = []
    for xd in KERNEL_DTYPES:
        for wd in dict.fromkeys((xd, torch.float32)):
            for bd in (None, *dict.fromkeys((xd, torch.float32))):
                out.append((xd, wd, bd))
    return out


def aot_specs():
    """Every specialization the host functions launch on a GPU: forward and dz per (hidden, weight, bias)
    dtypes, the two products per (hidden, weight) dtypes and accumulation."""
    specs = []
    n = (torch.float16, torch.bfloat16, torch.float32)
    for xd, wd, bd in _combos():
        block_m, block_v, block_k, warps, stages = _TILE[xd]
        tag = f"{str(xd)[6:]},w={str(wd)[6:]},bias={str(bd)[6:] if bd is not None else 'none'}"
        consts = {"BLOCK_M": block_m, "BLOCK_V": block_v, "BLOCK_K": block_k, "HAS_BIAS": bd is not None,
                  "DOT_PREC": _prec(xd), "UPCAST": False}
        bp = ptr(bd) if bd is not None else ptr(wd)
        common = {"Hp": ptr(xd), "Wp": ptr(wd), "Bp": bp, "Yp": "*i64"}
        cx = {k: "constexpr" for k in consts}
        specs.append(AOTSpec(
            name=f"lce_fwd[{tag}]", fn=_lce_fwd_kernel,
            signature={**common, "PM": "*fp32", "PS": "*fp32", "PZY": "*fp32", "PZS": "*fp32", "M": "i32",
                       "V": "i32", "K": "i32", "stride_hm": "i64", "v_per_split": "i32", **cx},
            constexprs=consts, num_warps=warps, num_stages=stages, uses_mma=xd in n[:2]))
        specs.append(AOTSpec(
            name=f"lce_dlogits[{tag}]", fn=_lce_dlogits_kernel,
            signature={**common, "LSE": "*fp32", "G": "*fp32", "DZ": ptr(xd), "M": "i32", "V": "i32", "K": "i32",
                       "stride_hm": "i64", "v0": "i32", "C": "i32", "ignore_index": "i32", "keep": "fp32",
                       "spread": "fp32", **cx},
            constexprs=consts, num_warps=warps, num_stages=stages, uses_mma=xd in n[:2]))
    for xd in KERNEL_DTYPES:
        for wd in dict.fromkeys((xd, torch.float32)):
            mm_m, mm_n, mm_k, warps, stages = _MM[xd]
            for what, bd, cd, acc in (("dh", wd, torch.float32, False), ("dh", wd, torch.float32, True),
                                      ("dw", xd, wd, False)):
                consts = {"ACC": acc, "BLOCK_M": mm_m, "BLOCK_N": mm_n, "BLOCK_K": mm_k, "DOT_PREC": _prec(xd),
                          "UPCAST": False}
                specs.append(AOTSpec(
                    name=f"lce_mm_{what}[{str(xd)[6:]},B={str(bd)[6:]},out={str(cd)[6:]},acc={int(acc)}]",
                    fn=_mm_kernel,
                    signature={"A": ptr(xd), "B": ptr(bd), "Cp": ptr(cd), "M": "i32", "N": "i32", "K": "i32",
                               "stride_am": "i64", "stride_ak": "i64", "stride_bk": "i64", "stride_cm": "i64",
                               **{k: "constexpr" for k in consts}},
                    constexprs=consts, num_warps=warps, num_stages=stages, uses_mma=xd in n[:2]))
    return specs
