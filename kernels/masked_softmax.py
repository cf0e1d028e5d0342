"""Masked softmax over the last dim of (B, H, Q, K) scores, forward and backward.

    probs   = softmax(scale * scores + additive_mask)           (or bool mask: False -> -inf)
    dscores = scale * probs * (dprobs - sum(dprobs * probs, -1))

Fewest bytes (e = element size of scores): the forward reads the scores and writes probs,
2*B*H*Q*K*e, plus the mask through its own strides (a (B, 1, 1, K) mask is B*K elements, read from
cache after the first row); the backward reads dprobs and probs and writes dscores, 3*B*H*Q*K*e.

One program owns ROWS whole rows (several for short rows, one for long ones); a row lives in
registers, so every element is read once and written once. The row index is split into
(b, h, q) and each of scores, mask and dprobs is addressed through its own three row strides
(int64), which is how a broadcast mask (stride 0) is read without being materialized.
A row whose every element is masked (max = -inf) gives zeros; NaN in a kept score gives a NaN row.
"""

import torch
import triton
import triton.language as tl

from ._aot import AOTSpec, ptr
from ._configs import ConfigTable
from ._launch import cdiv, ints_key, launcher

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@triton.jit
def _masked_softmax_fwd_kernel(
    S,  # (D0, D1, D2, K) scores, row strides (ss0, ss1, ss2), unit column stride
    MASK,  # (D0, D1, D2, K) mask view, strides (ms0, ms1, ms2, msk), 0 on broadcast dims: bool or float
    P,  # (D0 * D1 * D2, K) probs, contiguous, scores' dtype
    n_rows,
    D1,
    D2,
    K,
    ss0,
    ss1,
    ss2,
    ms0,
    ms1,
    ms2,
    msk,
    scale,
    BLOCK_K: tl.constexpr,
    ROWS: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool (True = keep), 2 additive
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    i2 = (rows % D2).to(tl.int64)
    t = rows // D2
    i1 = (t % D1).to(tl.int64)
    i0 = (t // D1).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    ok = (rows < n_rows)[:, None] & (cols < K)[None, :]
    s_off = (i0 * ss0 + i1 * ss1 + i2 * ss2)[:, None] + cols[None, :]
    x = tl.load(S + s_off, mask=ok, other=0.0).to(tl.float32) * scale
    if MASK_KIND != 0:
        m_off = (i0 * ms0 + i1 * ms1 + i2 * ms2)[:, None] + cols.to(tl.int64)[None, :] * msk
        if MASK_KIND == 1:
            keep = tl.load(MASK + m_off, mask=ok, other=0)
            x = tl.where(keep != 0, x, float("-inf"))
        else:
            x += tl.load(MASK + m_off, mask=ok, other=0.0).to(tl.float32)
    x = tl.where(ok, x, float("-inf"))
    row_max = tl.max(x, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # fully masked row: exp gives 0s
    e = tl.exp2((x - row_max[:, None]) * 1.4426950408889634)  # exp(x) = exp2(x * log2(e))
    den = tl.sum(e, axis=1)
    den = tl.where(den == 0.0, 1.0, den)  # 0 only in a fully masked row (all e are 0); NaN stays NaN
    p = e * (1.0 / den)[:, None]
    p_off = rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(P + p_off, p.to(P.dtype.element_ty), mask=ok)


@triton.jit
def _masked_softmax_bwd_kernel(
    DP,  # (D0, D1, D2, K) upstream gradient, row strides (ds0, ds1, ds2), unit column stride
    P,  # (D0, D1, D2, K) probs of the forward, row strides (ps0, ps1, ps2), unit column stride
    DS,  # (D0 * D1 * D2, K) gradient of the scores, contiguous
    n_rows,
    D1,
    D2,
    K,
    ds0,
    ds1,
    ds2,
    ps0,
    ps1,
    ps2,
    scale,
    BLOCK_K: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    i2 = (rows % D2).to(tl.int64)
    t = rows // D2
    i1 = (t % D1).to(tl.int64)
    i0 = (t // D1).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    ok = (rows < n_rows)[:, None] & (cols < K)[None, :]
    dp = tl.load(DP + (i0 * ds0 + i1 * ds1 + i2 * ds2)[:, None] + cols[None, :], mask=ok, other=0.0)
    p = tl.load(P + (i0 * ps0 + i1 * ps1 + i2 * ps2)[:, None] + cols[None, :], mask=ok, other=0.0)
    dp = dp.to(tl.float32)
    p = p.to(tl.float32)
    dot = tl.sum(dp * p, axis=1)
    ds = scale * p * (dp - dot[:, None])
    tl.store(DS + rows.to(tl.int64)[:, None] * K + cols[None, :], ds.to(DS.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- tuning (one place)

# (BLOCK_K, ROWS, num_warps) by row length: the first whose BLOCK_K >= K. Short rows share a program;
# about 8 values per thread keeps registers near 32 on sm_90 (16 per thread doubles to 64-128 and
# cuts the resident programs, hence the loads in flight). The interpreter uses the same table.
_CONFIGS = (
    (128, 8, 8),
    (512, 4, 8),
    (2048, 1, 8),
    (8192, 1, 16),
)
MAX_K = _CONFIGS[-1][0]


def _config(K: int):
    """(BLOCK_K, ROWS, num_warps) for rows of length K (1 <= K <= MAX_K); the same under the interpreter."""
    for cfg in _CONFIGS:
        if K <= cfg[0]:
            return cfg
    raise ValueError(f"masked_softmax: the triton kernel takes rows of at most {MAX_K} elements, got {K}")


# What `roberta-fast tune` may try per row-length class (docs/tuning.md), (BLOCK_K, ROWS, num_warps), the
# default first: up to K = 512 (the BERT family's sequence lengths) half the rows on half the warps (same
# values per thread, twice the programs); longer rows keep the default (each candidate costs 11 dtype / mask
# pairs in the compile check). Forward only: the backward kernel does not see the mask, so it cannot tell
# which mask kind's bucket a call belongs to, and keeps `_config`'s default. Every candidate is in aot_specs().
CANDIDATES = {
    128: ((128, 8, 8), (128, 4, 4)),
    512: ((512, 4, 8), (512, 2, 4)),
    2048: ((2048, 1, 8),),
    8192: ((8192, 1, 16),),
}
_KIND_NAMES = ("none", "bool", "additive")  # MASK_NONE, MASK_BOOL, MASK_ADD as the tuned buckets name them


def config_space(op: str, fixed: tuple, train: bool = False) -> dict:
    """The candidates of the forward ("fwd"; the backward is not tuned, in either mode) for a tuned
    masked_softmax bucket (`fixed` = (ceil_pow2(K), dtype, mask kind)), the default first; {} past MAX_K."""
    if fixed[0] > MAX_K:
        return {}
    return {"fwd": CANDIDATES[_config(fixed[0])[0]]}


# the tuned configs (kernels/_configs.py): installed per device by roberta_fast.tuned, forced by the tuner
_TUNED = ConfigTable(("masked_softmax",), config_space)
install_tuned, forced_configs = _TUNED.install, _TUNED.forced


def _launch_config(cls: str, scores, n_rows: int, K: int, kind: int):
    """(BLOCK_K, ROWS, num_warps) of a launch: the tuned (or forced) one of the call's bucket, else `_config`'s
    default."""
    if _TUNED.active:
        cfg = _TUNED.pick(cls, scores.device, "masked_softmax", (n_rows, K, scores.dtype,
                                                                  _KIND_NAMES[kind]))
        if cfg is not None:
            return cfg
    return _config(K)


def _mask_kind(mask) -> int:
    if mask is None:
        return MASK_NONE
    return MASK_BOOL if mask.dtype == torch.bool else MASK_ADD


# ----------------------------------------------------------------------------- host functions


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FWD = launcher(_masked_softmax_fwd_kernel)  # the forward's launches through cached compiled handles


def unsupported(scores, mask, scale):
    """Why these kernels cannot take the call, or None: scores' dtype and rows of at most MAX_K."""
    if scores.dtype not in KERNEL_DTYPES:
        return (f"backend 'triton' masked_softmax supports scores dtypes (float16, bfloat16, float32), "
                f"got {scores.dtype}")
    if scores.shape[-1] > MAX_K:
        return f"backend 'triton' masked_softmax takes rows of at most {MAX_K} elements, got K={scores.shape[-1]}"
    return None


def forward(scores, mask, scale):
    """scores (B, H, Q, K), stride(3) == 1; mask None or a (B, H, Q, K) view (stride 0 on broadcast
    dims), bool or any float dtype; scale float -> probs (B, H, Q, K) contiguous, scores.dtype."""
    B, H, Q, K = scores.shape
    n_rows = B * H * Q
    if n_rows >= 2**31:
        raise ValueError(f"masked_softmax: at most 2**31 - 1 rows, got {n_rows}")
    kind = _mask_kind(mask)
    block_k, rows, warps = _launch_config("fwd", scores, n_rows, K, kind)
    probs = torch.empty_like(scores, memory_format=torch.contiguous_format)  # (B, H, Q, K) contiguous
    if mask is None:
        mask, mstr = scores, (0, 0, 0, 0)
    else:
        mstr = mask.stride()
    ints = (n_rows, H, Q, K, *scores.stride()[:3], *mstr)
    # what fixes Triton's specialization (kernels/_launch.py); probs is a fresh, aligned allocation
    key = (scores.dtype, mask.dtype, kind, scores.data_ptr() & 15, mask.data_ptr() & 15, ints_key(ints), block_k,
           rows, warps)
    _FWD(key, (cdiv(n_rows, rows),), (scores, mask, probs, *ints, float(scale)),
         dict(BLOCK_K=block_k, ROWS=rows, MASK_KIND=kind, num_warps=warps))
    return probs


def bind_inference(scores, mask, scale):
    """`forward` for many calls of ONE signature (the public op's inference cache, docs/host_path.md): scores
    (B, H, Q, K) with stride(3) == 1 and mask None or a (B, H, Q, K) view as `forward` takes them, fixed here with
    everything but the addresses. Returns fn(scores, mask) -> probs, where later masks may be given unexpanded (a
    tensor of the same metadata as the one whose expanded view was bound: same address, same strides). The same
    launches (keys, configs) as `forward`."""
    B, H, Q, K = scores.shape
    n_rows = B * H * Q
    if n_rows >= 2**31:
        return None
    kind = _mask_kind(mask)
    block_k, rows, warps = _launch_config("fwd", scores, n_rows, K, kind)
    mstr = (0, 0, 0, 0) if mask is None else mask.stride()
    ints = (n_rows, H, Q, K, *scores.stride()[:3], *mstr)
    head = (scores.dtype, scores.dtype if mask is None else mask.dtype, kind)
    tail = (ints_key(ints), block_k, rows, warps)
    grid = (cdiv(n_rows, rows),)
    meta = dict(BLOCK_K=block_k, ROWS=rows, MASK_KIND=kind, num_warps=warps)
    empty, fmt, launch = torch.empty_like, torch.contiguous_format, _FWD

    def masked_softmax_bound(scores, mask):
        probs = empty(scores, memory_format=fmt)
        m = scores if mask is None else mask
        launch((*head, scores.data_ptr() & 15, m.data_ptr() & 15, *tail), grid, (scores, m, probs, *ints, scale),
               meta)
        return probs

    return masked_softmax_bound


def backward(dprobs, probs, scale):
    """dprobs, probs (B, H, Q, K) with stride(3) == 1 -> dscores (B, H, Q, K) contiguous, probs.dtype."""
    B, H, Q, K = probs.shape
    n_rows = B * H * Q
    if n_rows >= 2**31:
        raise ValueError(f"masked_softmax: at most 2**31 - 1 rows, got {n_rows}")
    block_k, rows, warps = _config(K)  # the default: the backward does not see the mask kind of the tuned bucket
    dscores = torch.empty((B, H, Q, K), dtype=probs.dtype, device=probs.device)
    _masked_softmax_bwd_kernel[(cdiv(n_rows, rows),)](
        dprobs, probs, dscores, n_rows, H, Q, K,
        dprobs.stride(0), dprobs.stride(1), dprobs.stride(2),
        probs.stride(0), probs.stride(1), probs.stride(2), float(scale),
        BLOCK_K=block_k, ROWS=rows, num_warps=warps,
    )
    return dscores


# ----------------------------------------------------------------------------- ahead-of-time specs


def _mask_dtypes(sd):
    """Mask dtypes the op layer passes for scores of dtype sd: none, bool, additive in sd or float32
    (an additive mask of another float dtype is converted to float32 before it is expanded)."""
    return [None, torch.bool] + list(dict.fromkeys((sd, torch.float32)))


def aot_specs():
    """Every specialization the host functions launch: for each row-length config (the defaults and the
    forward's tuning candidates), the forward per (scores dtype, mask dtype) pair, and for the defaults the
    backward per scores dtype."""
    specs = []
    ints = {n: "i32" for n in ("n_rows", "D1", "D2", "K")}
    fwd_cfgs = list(dict.fromkeys((*_CONFIGS, *(c for cs in CANDIDATES.values() for c in cs))))
    for block_k, rows, warps in fwd_cfgs:
        consts = {"BLOCK_K": block_k, "ROWS": rows}
        for sd in (torch.float16, torch.bfloat16, torch.float32):
            sp = ptr(sd)
            sname = str(sd)[6:]
            if (block_k, rows, warps) in _CONFIGS:  # the backward launches the defaults only
                sig = {"DP": sp, "P": sp, "DS": sp, **ints}
                sig.update({n: "i64" for n in ("ds0", "ds1", "ds2", "ps0", "ps1", "ps2")})
                sig.update({"scale": "fp32", "BLOCK_K": "constexpr", "ROWS": "constexpr"})
                specs.append(AOTSpec(
                    name=f"masked_softmax_bwd[{sname},K<={block_k}]", fn=_masked_softmax_bwd_kernel,
                    signature=sig, constexprs=consts, num_warps=warps))
            for md in _mask_dtypes(sd):
                kind = MASK_NONE if md is None else (MASK_BOOL if md == torch.bool else MASK_ADD)
                sig = {"S": sp, "MASK": ptr(md) if md is not None else sp, "P": sp, **ints}
                sig.update({n: "i64" for n in ("ss0", "ss1", "ss2", "ms0", "ms1", "ms2", "msk")})
                sig.update({"scale": "fp32", "BLOCK_K": "constexpr", "ROWS": "constexpr",
                            "MASK_KIND": "constexpr"})
                mname = "none" if md is None else str(md)[6:]
                specs.append(AOTSpec(
                    name=f"masked_softmax_fwd[{sname},mask={mname},K<={block_k},ROWS={rows},W={warps}]",
                    fn=_masked_softmax_fwd_kernel, signature=sig,
                    constexprs={**consts, "MASK_KIND": kind}, num_warps=warps))
    return specs
