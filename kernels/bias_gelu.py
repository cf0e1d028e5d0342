"""Fused bias + GELU, forward and backward, over (M, N) rows.

    y  = GELU(x + bias)                         exact erf ("none") or the tanh approximation
    dx = dy * GELU'(x + bias),  dbias = sum over rows of dx (in fp32, before the cast)

Fewest bytes (e = element size of x): the forward reads x and writes y, 2*M*N*e; the backward
reads dy and x and writes dx, 3*M*N*e. The bias (N elements) and the backward's fp32 partial column
sums (a few hundred rows of N, see _bwd_grid) are noise next to that.

Both kernels tile 2-D blocks of BLOCK_M x BLOCK_N over a 1-D grid (column blocks fastest), so a
small N still gives many programs and neighbouring programs touch neighbouring memory. The
backward's dbias is deterministic: each program keeps an fp32 partial sum of its rows per column,
writes it to a (grid_m, N) buffer, and a second small kernel adds those rows in a fixed order.
"""


import torch
import triton
import triton.language as tl

from ._aot import AOTSpec, ptr
from ._configs import ConfigTable
from ._launch import INTERPRET, cdiv, int_key, launcher

# constants written inline in the jit functions below:
#   0.7071067811865476 = 1/sqrt(2), 0.3989422804014327 = 1/sqrt(2 pi), 0.7978845608028654 = sqrt(2/pi),
#   0.044715 = the tanh approximation's cubic coefficient (0.134145 = 3 * 0.044715)


@triton.jit
def _tanh(u):
    # tanh from exp (tl has no tanh on every Triton version we support); saturates cleanly:
    # exp overflows to inf -> 1, underflows to 0 -> -1.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _gelu(h, approximate_tanh):
    if approximate_tanh != 0:
        u = (h + 0.044715 * h * h * h) * 0.7978845608028654
        y = 0.5 * h * (1.0 + _tanh(u))
    else:
        y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    return y


@triton.jit
def _gelu_grad(h, approximate_tanh):
    if approximate_tanh != 0:
        h2 = h * h
        t = _tanh((h + 0.044715 * h2 * h) * 0.7978845608028654)
        d = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h2)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        d = cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    return d


@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # (M, N) input rows, row stride stride_xm, unit column stride
    B,  # (N,) bias, x's dtype or fp32 (any pointer when HAS_BIAS is False)
    Y,  # (M, N) output, contiguous, x's dtype
    M,
    N,
    stride_xm,
    approximate_tanh,  # 0: exact erf, 1: tanh approximation
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // grid_n
    pid_n = pid % grid_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ok = (rows < M)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    h = tl.load(X + rows64 * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = _gelu(h, approximate_tanh)
    tl.store(Y + rows64 * N + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY,  # (M, N) upstream gradient rows, row stride stride_dym, x's dtype
    X,  # (M, N) input rows, row stride stride_xm
    B,  # (N,) bias (any pointer when HAS_BIAS is False)
    DX,  # (M, N) output gradient, contiguous, x's dtype
    DBP,  # (grid_m, N) fp32 partial column sums of dx, contiguous (unused when HAS_BIAS is False)
    M,
    N,
    stride_dym,
    stride_xm,
    tiles_per_prog,  # row tiles of BLOCK_M each program walks
    approximate_tanh,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // grid_n
    pid_n = pid % grid_n
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row0 = pid_m * tiles_per_prog * BLOCK_M
    for t in range(0, tiles_per_prog):
        rows = row0 + t * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = (rows < M)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        h = tl.load(X + rows64 * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dym + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += b[None, :]
        dx = dy * _gelu_grad(h, approximate_tanh)
        tl.store(DX + rows64 * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
        if HAS_BIAS:
            acc += tl.where(ok, dx, 0.0)
    if HAS_BIAS:
        tl.store(DBP + pid_m.to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _column_sum_kernel(
    P,  # (R, N) fp32 partial sums, contiguous
    OUT,  # (N,) column sums, cast to OUT's dtype
    R,
    N,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < R)[:, None] & col_ok[None, :]
        acc += tl.load(P + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=ok, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------- tuning (one place)

# (BLOCK_M, BLOCK_N, num_warps) of the elementwise tile: 1024 elements, 8 per thread (one 16-byte
# vector of fp16). 128 columns keep every warp access on whole 128-byte lines for N >= 64; a small
# tile keeps erf's registers low (about 31 in the forward, 64 in the backward with bias on sm_90), so
# many programs stay resident and enough loads are in flight. The interpreter uses the same tile.
_TILE = (8, 128, 4)
# the backward walks several row tiles per program once there are more than this many programs,
# which bounds the partial-sum buffer to about this many * BLOCK_N fp32 values
_BWD_TARGET_PROGRAMS = 4096
# under the interpreter: at most this many programs along M, so that small test inputs still walk
# several row tiles per program (a ragged last one included) and sum several partial rows
_BWD_INTERPRET_GRID_M = 2
# (BLOCK_R, BLOCK_N, num_warps) of the column-sum kernel
_COLSUM = (32, 128, 4)


# What `roberta-fast tune` may try (docs/tuning.md), (BLOCK_M, BLOCK_N, num_warps), the default first: twice
# the rows per program at 16 elements per thread (two 16-byte vectors in flight per thread), and twice the
# columns on twice the warps (same 8 per thread, programs of 2048 elements). The backward holds more per
# element (dy, x, the dbias partial sums), so only the first. Every candidate is in aot_specs().
FWD_TILES = (_TILE, (16, 128, 4), (8, 256, 8))
BWD_TILES = (_TILE, (16, 128, 4))


def _tile(M: int, N: int):
    """(BLOCK_M, BLOCK_N, num_warps) for an (M, N) problem: the default."""
    return _TILE


def config_space(op: str, fixed: tuple, train: bool = False) -> dict:
    """The candidates per kernel class ("fwd", and "bwd" with `train`) for a tuned bias_gelu bucket (`fixed` =
    (N, dtype)), the default first."""
    return {"fwd": FWD_TILES, "bwd": BWD_TILES} if train else {"fwd": FWD_TILES}


# the tuned configs (kernels/_configs.py): installed per device by roberta_fast.tuned, forced by the tuner
_TUNED = ConfigTable(("bias_gelu",), config_space)
install_tuned, forced_configs = _TUNED.install, _TUNED.forced


def _config(cls: str, x):
    """(BLOCK_M, BLOCK_N, num_warps) of a launch on x (M, N): the tuned (or forced) one of its bucket, else
    the default tile."""
    M, N = x.shape
    if _TUNED.active:
        cfg = _TUNED.pick(cls, x.device, "bias_gelu", (M, N, x.dtype))
        if cfg is not None:
            return cfg
    return _tile(M, N)


def _bwd_grid(M: int, N: int, block_m: int, block_n: int, has_bias: bool):
    """(grid_m, grid_n, tiles_per_prog) of the backward."""
    grid_n = cdiv(N, block_n)
    tiles_m = cdiv(M, block_m)
    if not has_bias:
        return tiles_m, grid_n, 1
    if INTERPRET:
        grid_m = min(tiles_m, _BWD_INTERPRET_GRID_M)
    else:
        grid_m = max(1, min(tiles_m, cdiv(_BWD_TARGET_PROGRAMS, grid_n)))
    tiles_per_prog = cdiv(tiles_m, grid_m)
    return cdiv(tiles_m, tiles_per_prog), grid_n, tiles_per_prog


def _approx_flag(approximate: str) -> int:
    if approximate == "none":
        return 0
    if approximate == "tanh":
        return 1
    raise ValueError(f"bias_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


# ----------------------------------------------------------------------------- host functions


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FWD = launcher(_bias_gelu_fwd_kernel)  # the forward's launches through cached compiled handles


def unsupported(x, bias, approximate):
    """Why these kernels cannot take the call, or None (any N; x's dtype only)."""
    if x.dtype not in KERNEL_DTYPES:
        return f"backend 'triton' bias_gelu supports x dtypes (float16, bfloat16, float32), got {x.dtype}"
    return None


def forward(x, bias, approximate):
    """x (M, N) rows (unit column stride); bias (N,) contiguous or None -> y (M, N) x.dtype."""
    M, N = x.shape
    flag = _approx_flag(approximate)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)  # (M, N) contiguous
    block_m, block_n, warps = _config("fwd", x)
    grid = (cdiv(M, block_m) * cdiv(N, block_n),)
    b = bias if bias is not None else x
    # what fixes Triton's specialization (kernels/_launch.py); y is a fresh, aligned allocation
    px, pb, sx = x.data_ptr(), b.data_ptr(), x.stride()[0]
    key = (x.dtype, b.dtype, bias is None, "A" if not (px | pb) & 15 else (px & 15, pb & 15), int_key(M),
           int_key(N), int_key(sx), flag, block_m, block_n, warps)
    _FWD(key, grid, (x, b, y, M, N, sx, flag),
         dict(BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=bias is not None, num_warps=warps))
    return y


def backward(dy, x, bias, approximate):
    """dy, x (M, N) rows; bias (N,) or None -> (dx (M, N) x.dtype, dbias (N,) bias.dtype or None)."""
    M, N = x.shape
    flag = _approx_flag(approximate)
    has_bias = bias is not None
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_m, block_n, warps = _config("bwd", x)
    grid_m, grid_n, tiles_per_prog = _bwd_grid(M, N, block_m, block_n, has_bias)
    partial = torch.empty((grid_m, N), dtype=torch.float32, device=x.device) if has_bias else dx
    _bias_gelu_bwd_kernel[(grid_m * grid_n,)](
        dy, x, bias if has_bias else x, dx, partial, M, N, dy.stride(0), x.stride(0), tiles_per_prog, flag,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=has_bias, num_warps=warps,
    )
    if not has_bias:
        return dx, None
    dbias = torch.empty((N,), dtype=bias.dtype, device=x.device)
    block_r, block_c, warps_c = _COLSUM
    _column_sum_kernel[(cdiv(N, block_c),)](
        partial, dbias, grid_m, N, BLOCK_R=block_r, BLOCK_N=block_c, num_warps=warps_c,
    )
    return dx, dbias


# ----------------------------------------------------------------------------- ahead-of-time specs


def _dtype_combos():
    """(x dtype, bias dtype or None) pairs the op layer can pass: bias has x's dtype or float32."""
    out = []
    for xd in (torch.float16, torch.bfloat16, torch.float32):
        out.append((xd, None))
        for bd in dict.fromkeys((xd, torch.float32)):
            out.append((xd, bd))
    return out


def aot_specs():
    """Every specialization the host functions launch: 8 (x, bias) dtype pairs x {fwd, bwd} on every tile
    (the default and the tuning candidates; the tanh/erf choice is a runtime argument), plus the column sum
    per dbias dtype."""
    specs = []
    for xd, bd in _dtype_combos():
        xp = ptr(xd)
        bp = ptr(bd) if bd is not None else xp
        tag = f"{str(xd)[6:]},bias={str(bd)[6:] if bd is not None else 'none'}"
        for block_m, block_n, warps in FWD_TILES:
            consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "HAS_BIAS": bd is not None}
            specs.append(AOTSpec(
                name=f"bias_gelu_fwd[{tag},M{block_m}N{block_n}]", fn=_bias_gelu_fwd_kernel,
                signature={"X": xp, "B": bp, "Y": xp, "M": "i32", "N": "i32", "stride_xm": "i64",
                           "approximate_tanh": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                           "HAS_BIAS": "constexpr"},
                constexprs=consts, num_warps=warps))
        for block_m, block_n, warps in BWD_TILES:
            consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "HAS_BIAS": bd is not None}
            specs.append(AOTSpec(
                name=f"bias_gelu_bwd[{tag},M{block_m}N{block_n}]", fn=_bias_gelu_bwd_kernel,
                signature={"DY": xp, "X": xp, "B": bp, "DX": xp, "DBP": "*fp32" if bd is not None else xp,
                           "M": "i32", "N": "i32", "stride_dym": "i64", "stride_xm": "i64",
                           "tiles_per_prog": "i32", "approximate_tanh": "i32", "BLOCK_M": "constexpr",
                           "BLOCK_N": "constexpr", "HAS_BIAS": "constexpr"},
                constexprs=consts, num_warps=warps))
    block_r, block_c, warps_c = _COLSUM
    for od in (torch.float16, torch.bfloat16, torch.float32):
        specs.append(AOTSpec(
            name=f"bias_gelu_dbias_sum[{str(od)[6:]}]", fn=_column_sum_kernel,
            signature={"P": "*fp32", "OUT": ptr(od), "R": "i32", "N": "i32",
                       "BLOCK_R": "constexpr", "BLOCK_N": "constexpr"},
            constexprs={"BLOCK_R": block_r, "BLOCK_N": block_c}, num_warps=warps_c))
    return specs
