"""linear: Y = act(X W^T + b) [+ residual], one tiled GEMM with the elementwise work in its epilogue.

    pre = X W^T + b        X (M, K), W (N, K): fp32 accumulator tile, bias added in registers
    Y   = act(pre) + R     act none / exact-erf GELU / tanh GELU, residual R (M, N) read in the epilogue
    backward: dZ = dY * gelu'(pre)  (pre saved by the training forward),
              dX = dZ W,  dW = dZ^T X,  db = sum_rows dZ,  dR = dY

FLOPs 2 M N K per GEMM (the backward has two). Bytes: the forward reads X and W (once per tile row / column,
L2 permitting: GROUP_M swizzle), R when given, and writes Y once (and pre in training); the separate ops it
replaces write the (M, N) product, then read and write it again per elementwise op.

`_linear_kernel` is one tile loop for all three GEMMs: C = epilogue(A B) with A (M, K) and B (K, N) given
by strides, so X W^T (B = W^T: strides (1, stride_wn)), dZ W and dZ^T X are the same kernel with different
strides and no epilogue. fp16 / bf16 tiles go to tl.dot (HMMA on sm_80; wgmma / HGMMA on sm_90 with 4+ warps
and 3+ stages, checked ahead of time by tests/test_compile_targets.py); fp32 takes the ieee dot (no TF32, as
torch's default matmul). Plain tl.load tiles by default; `_linear_tma_kernel` is the forward with X and W tiles
fetched through in-kernel TMA descriptors (tl.make_tensor_descriptor, where the installed Triton has it), one
more tuning candidate on sm_90 only. `_dgelu_kernel` makes dZ (one read of dY and pre, one write).

Configs: `config` is each GEMM's built-in one by its output size; `config_space` lists the tuner's candidates
per class ("fwd", "bwd_dx", "bwd_dw"), pruned per bucket; a tuned config (kernels/_configs.py) replaces the
built-in one for every launch of its class in its bucket (docs/tuning.md, "linear: three backends").
"""

import torch
import triton
import triton.language as tl

from ._aot import SMEM_LIMIT, AOTSpec, ptr
from ._configs import ConfigTable
from ._launch import INTERPRET, cdiv, ints_key, launcher
from .bias_gelu import _gelu, _gelu_grad

ACT_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _linear_kernel(
    A,  # (M, K) strides (stride_am, stride_ak)
    B,  # (K, N) strides (stride_bk, stride_bn)
    BIAS,  # (N,) contiguous (unused unless HAS_BIAS)
    R,  # (M, N) residual, row stride stride_rm, unit column stride (unused unless HAS_RES)
    C,  # (M, N) output, row stride stride_cm, unit column stride
    PRE,  # (M, N) pre-activation, C's strides (written only when SAVE_PRE)
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_rm,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,  # 0 none, 1 exact-erf GELU, 2 tanh GELU
    HAS_RES: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row tiles per group: consecutive programs share B's column tiles in L2
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter + bfloat16 only: tl.dot on float32 copies of the tiles
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptr = A + rows[:, None] * stride_am + ks[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptr = B + ks[:, None] * stride_bk + cols[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (ks + k0) < K
        a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptr += BLOCK_K * stride_ak
        b_ptr += BLOCK_K * stride_bk

    _epilogue(acc, rows, cols, M, N, BIAS, R, C, PRE, stride_rm, stride_cm, HAS_BIAS, ACT, HAS_RES, SAVE_PRE)


@triton.jit
def _epilogue(acc, rows, cols, M, N, BIAS, R, C, PRE, stride_rm, stride_cm, HAS_BIAS: tl.constexpr,
              ACT: tl.constexpr, HAS_RES: tl.constexpr, SAVE_PRE: tl.constexpr):
    """The epilogue, in registers: + bias, store pre, act, + residual, one store of C (rows, cols: int64)."""
    row_ok = rows < M
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SAVE_PRE:
        tl.store(PRE + rows[:, None] * stride_cm + cols[None, :], acc.to(PRE.dtype.element_ty), mask=ok)
    if ACT != 0:
        acc = _gelu(acc, ACT - 1)
    if HAS_RES:
        acc += tl.load(R + rows[:, None] * stride_rm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(C + rows[:, None] * stride_cm + cols[None, :], acc.to(C.dtype.element_ty), mask=ok)


@triton.jit
def _linear_tma_kernel(
    X,  # (M, K) contiguous, 16-byte aligned, K * element size a multiple of 16 (a TMA descriptor's rules)
    W,  # (N, K) contiguous, the same rules
    BIAS,  # (N,) contiguous (unused unless HAS_BIAS)
    R,  # (M, N) residual, row stride stride_rm, unit column stride (unused unless HAS_RES)
    C,  # (M, N) output, row stride stride_cm, unit column stride
    PRE,  # (M, N) pre-activation, C's strides (written only when SAVE_PRE)
    M,
    N,
    K,
    stride_rm,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter + bfloat16 only
):
    """The forward Y = epilogue(X W^T) with X and W tiles fetched by TMA (tensor descriptors made in the kernel:
    out-of-range rows / columns read as zeros, no address arithmetic or masks in the loop). sm_90 only."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    x_desc = tl.make_tensor_descriptor(X, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = x_desc.load([pid_m * BLOCK_M, k0])  # (BLOCK_M, BLOCK_K)
        b = w_desc.load([pid_n * BLOCK_N, k0])  # (BLOCK_N, BLOCK_K)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32).T, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.T, acc)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    _epilogue(acc, rows, cols, M, N, BIAS, R, C, PRE, stride_rm, stride_cm, HAS_BIAS, ACT, HAS_RES, SAVE_PRE)


@triton.jit
def _dgelu_kernel(
    DY,  # (n,) flat, contiguous
    PRE,  # (n,) flat, contiguous
    DZ,  # (n,) flat output, dy's dtype
    n,
    TANH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    h = tl.load(PRE + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DZ + offs, (dy * _gelu_grad(h, TANH)).to(DZ.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- tuning (one place)

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) per shape bucket, pruned by hand to what the
# bucket can use (smem per stage = (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes in fp16: 48 KB for 128 x 256 x 64,
# 3 stages = 144 KB, under sm_80's 163 KB and sm_90's 227 KB). What a launch uses when nothing is tuned (and
# the first candidate of every tuned class, `config_space`). Not yet measured on a GPU: the tuner's backend
# choice keeps "torch" until it has timed these (docs/tuning.md).
CONFIGS = {
    "large": (128, 256, 64, 8, 8, 3),  # M >= 2048 and N >= 2048 (FFN1 at >= 2k tokens)
    "medium": (128, 128, 64, 8, 4, 4),  # M >= 512 (out-proj, FFN2)
    "small": (64, 128, 64, 8, 4, 3),  # fewer tokens: more programs per SM
    "fp32": (64, 64, 32, 8, 4, 3),  # ieee fp32 dot
}
CONFIG_INTERPRET = (16, 32, 32, 2, 4, 1)  # the interpreter: small tiles, several per test input
DGELU_BLOCK = 1024

# What `roberta-fast tune` may try for each of the three GEMMs (docs/tuning.md), before pruning. fp16 / bf16:
# the three defaults; the large tile on 4 stages; a tall 256 x 128 tile; 128 x 128 on 8
# warps (two warpgroups on sm_90) with 3 stages; 128 x 64 for narrow outputs (hidden 768 / 1024 columns at a few
# thousand tokens); 64 x 64 for small problems. fp32 (ieee dots, 4-byte tiles): the default and three larger
# tiles. Shared memory per candidate: `smem_bytes` (sm_90 figures beside each; the ahead-of-time check reports
# what Triton really allocates: `python -m roberta_fast.kernels._aot --files linear --every-candidate`).
CANDIDATES_HALF = (
    CONFIGS["large"], CONFIGS["medium"], CONFIGS["small"],
    (128, 256, 64, 8, 8, 4),  # 192 KB on sm_90, 144 KB on sm_80 (smem_bytes)
    (256, 128, 64, 8, 8, 3),  # 144 KB
    (128, 128, 64, 8, 8, 3),  # 96 KB
    (128, 64, 64, 8, 4, 4),  # 96 KB
    (64, 64, 64, 8, 4, 4),  # 64 KB
)
# sm_90 only, the forward only: the large tile with X and W fetched by TMA (`_linear_tma_kernel`); the 7th value
# marks the variant. Offered where the installed Triton has in-kernel tensor descriptors (3.4 on; checked by
# feature, so Triton versions without them simply never list it).
TMA_CANDIDATE = (128, 256, 64, 8, 8, 3, 1)
HAS_TMA = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")
CANDIDATES_FP32 = (
    CONFIGS["fp32"],
    (128, 64, 32, 8, 4, 3),  # 72 KB
    (64, 128, 32, 8, 4, 3),  # 72 KB
    (128, 128, 32, 8, 8, 3),  # 96 KB
)
ONE_WAVE = 108  # output tiles that fill an A100 once (H100 SXM: 132): fewer, and only tiles <= 128 x 128 stay
# the kernel classes: each GEMM's (rows, columns, reduction) in terms of the op's (M, N, K)
CLASSES = {"fwd": ("M", "N", "K"), "bwd_dx": ("M", "K", "N"), "bwd_dw": ("N", "K", "M")}
# roberta_fast.tuning passes these to config_space (the space depends on the bucket's tokens and the GPU)
CONFIG_SPACE_CONTEXT = ("tokens_log2", "capability")


def bucket(M: int, N: int, dtype) -> str:
    """The config bucket of a GEMM of M rows and N columns."""
    if dtype == torch.float32:
        return "fp32"
    if M >= 2048 and N >= 2048:
        return "large"
    return "medium" if M >= 512 else "small"


def config(M: int, N: int, dtype):
    """The default config of a GEMM of M rows and N columns (no tuning)."""
    return CONFIG_INTERPRET if INTERPRET else CONFIGS[bucket(M, N, dtype)]


def smem_bytes(cfg, elem_size: int, cc=None) -> int:
    """The operand ring's shared memory on sm_<cc>: buffers * (BLOCK_M + BLOCK_N) * BLOCK_K * element size, with
    `stages` buffers on sm_90 (the wgmma pipeline; also the bound when cc is None) and stages - 1 on sm_80 (the
    cp.async pipeline). Measured by the ahead-of-time check (Triton 3.9, aligned fp16 operands): 128 x 256 x 64
    takes 147,456 B on sm_90 at 3 stages and 196,608 B at 4; on sm_80 98,304 B at 3 and 147,456 B at 4."""
    bm, bn, bk, _gm, _w, stages = cfg[:6]
    return (stages - 1 if cc is not None and cc < 90 else stages) * (bm + bn) * bk * elem_size


def _pow2(n: int) -> int:
    return 1 << max(4, (int(n) - 1).bit_length())  # the next power of two, at least 16 (tl.dot's minimum)


def _keep(cfg, rows, cols, red, elem_size: int, cc) -> bool:
    """Whether a candidate is worth timing on sm_<cc> (None: any) for a GEMM of rows x cols with reduction red
    (None: unknown)."""
    bm, bn, bk = cfg[:3]
    if smem_bytes(cfg, elem_size, cc) > SMEM_LIMIT.get(cc, max(SMEM_LIMIT.values())):
        return False
    if (rows is not None and bm > _pow2(rows)) or (cols is not None and bn > _pow2(cols)) or \
            (red is not None and bk > _pow2(red)):
        return False  # a tile larger than the whole problem: masked work only
    if rows is not None and cols is not None and cdiv(rows, bm) * cdiv(cols, bn) < ONE_WAVE and bm * bn > 128 * 128:
        return False  # under one wave of programs: the big tile leaves most SMs idle
    return True


def config_space(op: str, fixed: tuple, train: bool = False, tokens_log2=None, capability=None) -> dict:
    """The candidates per kernel class ("fwd"; with `train` also "bwd_dx" and "bwd_dw", the backward's two
    GEMMs) for a tuned linear bucket (`fixed` = (N, K, dtype) as roberta_fast.tuned.bucket gives it), the class's
    default first, pruned: shared memory (`smem_bytes`) over the GPU's limit (capability (major, minor) or None:
    sm_90's rule and limit), a tile or K step larger than the problem, a tile over 128 x 128 with under one wave
    of programs; the forward's TMA variant (TMA_CANDIDATE) only for sm_90 (or capability None) and K a multiple of 8.
    tokens_log2 (the bucket's rounded log2 of M) or None: M unknown, no pruning by M and every default of the
    class (what installing a tuned table checks against)."""
    N, K, dtype = int(fixed[0]), int(fixed[1]), str(fixed[2]).removeprefix("torch.")
    half = dtype != "float32"
    pool, elem = (CANDIDATES_HALF, 2) if half else (CANDIDATES_FP32, 4)
    cc = None if capability is None else (capability[0] * 10 + capability[1] if isinstance(capability, tuple)
                                          else int(capability))
    M = None if tokens_log2 is None else 1 << int(tokens_log2)
    dims = {"M": M, "N": N, "K": K}
    tdtype = torch.float16 if half else torch.float32
    space = {}
    for cls in (("fwd", "bwd_dx", "bwd_dw") if train else ("fwd",)):
        rows, cols, red = (dims[d] for d in CLASSES[cls])
        if rows is None:  # every default the class can have, whatever M is
            defaults = tuple(dict.fromkeys(CONFIGS[bucket(m, cols, tdtype)] for m in (1, 512, 2048)))
        else:
            defaults = (CONFIGS[bucket(rows, cols, tdtype)],)
        rest = tuple(c for c in pool if c not in defaults and _keep(c, rows, cols, red, elem, cc))
        if cls == "fwd" and half and HAS_TMA and (cc is None or cc >= 90) and K % 8 == 0 and \
                _keep(TMA_CANDIDATE, rows, cols, red, elem, cc):
            rest += (TMA_CANDIDATE,)  # TMA's rule: K * 2 bytes, the row pitch, a multiple of 16
        space[cls] = defaults + rest
    return space


# the tuned configs (kernels/_configs.py): installed per device by roberta_fast.tuned, forced by the tuner
_TUNED = ConfigTable(("linear",), config_space)
install_tuned, forced_configs = _TUNED.install, _TUNED.forced


def _config(cls: str, rows: int, cols: int, dtype, device, key):
    """The config of one GEMM launch of class `cls` (rows x cols output): the tuned (or forced) one of the op
    call's bucket (key = the op's (M, N, K, dtype)), else the default of its size."""
    if _TUNED.active:
        cfg = _TUNED.pick(cls, device, "linear", key)
        if cfg is not None:
            return cfg
    return config(rows, cols, dtype)


def _prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored by fp16 / bf16 dots


def _gemm(a, b, c, *, cls="fwd", tkey=None, bias=None, act=0, residual=None, pre=None):
    """c (M, N) = epilogue(a @ b); a (M, K) and b (K, N) any strides; c, pre, residual unit column stride.
    cls / tkey: the kernel class and the op call's tune key (M, N, K, dtype), for a tuned config."""
    M, K = a.shape
    N = b.shape[1]
    bm, bn, bk, gm, warps, stages, *variant = _config(cls, M, N, a.dtype, a.device, tkey)
    grid = (cdiv(M, bm) * cdiv(N, bn),)
    bt = bias if bias is not None else c
    rt = residual if residual is not None else c
    pt = pre if pre is not None else c
    if variant and variant[0] == 1 and _tma_ok(a, b):
        return _gemm_tma(a, b.t(), c, bt, rt, pt, bias is not None, act, residual, pre is not None,
                         (bm, bn, bk, gm, warps, stages))
    args = (a, b, bt, rt, c, pt, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            residual.stride(0) if residual is not None else 0, c.stride(0))
    # what fixes Triton's specialization (kernels/_launch.py): dtypes, 16-byte alignment, int classes, constexprs
    key = (a.dtype, b.dtype, bt.dtype, rt.dtype, c.dtype, pt.dtype,
           tuple(t.data_ptr() & 15 for t in (a, b, bt, rt, c, pt)), ints_key(args[6:]),
           bias is not None, act, residual is not None, pre is not None, bm, bn, bk, gm, warps, stages)
    _LINEAR(key, grid, args, dict(
        HAS_BIAS=bias is not None, ACT=act, HAS_RES=residual is not None, SAVE_PRE=pre is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, DOT_PREC=_prec(a.dtype),
        UPCAST=INTERPRET and a.dtype == torch.bfloat16, num_warps=warps, num_stages=stages))
    return c


_LINEAR = launcher(_linear_kernel)  # launches through the cached compiled handle (docs/host_path.md)


def _tma_ok(a, w_t) -> bool:
    """Whether the TMA kernel can take a (M, K) @ w_t (K, N): a and w = w_t.t() contiguous rows of a 2-byte dtype,
    16-byte aligned, K a multiple of 8 (the descriptor's row pitch a multiple of 16 bytes). Else the plain kernel
    runs the same tile."""
    K = a.shape[1]
    return (HAS_TMA and a.dtype in (torch.float16, torch.bfloat16) and K % 8 == 0 and a.stride() == (K, 1)
            and w_t.stride() == (1, K) and not (a.data_ptr() | w_t.data_ptr()) & 15)


def _scratch(size: int, alignment: int, stream):
    """Global scratch for the in-kernel tensor descriptors (Triton asks for it at launch)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    """Triton needs an allocator for the TMA kernel's descriptors; set ours only where none is set (a context
    variable: per thread)."""
    try:
        from triton.runtime import _allocation

        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # another Triton layout: set ours
        unset = True
    if unset:
        triton.set_allocator(_scratch)


def _gemm_tma(x, w, c, bt, rt, pt, has_bias, act, residual, save_pre, cfg):
    """c (M, N) = epilogue(x w^T) through `_linear_tma_kernel` (x (M, K), w (N, K) as `_tma_ok` checked)."""
    bm, bn, bk, gm, warps, stages = cfg
    M, K = x.shape
    N = w.shape[0]
    if not INTERPRET:
        _ensure_allocator()
    args = (x, w, bt, rt, c, pt, M, N, K, residual.stride(0) if residual is not None else 0, c.stride(0))
    key = (x.dtype, bt.dtype, rt.dtype, c.dtype, pt.dtype, tuple(t.data_ptr() & 15 for t in (bt, rt, c, pt)),
           ints_key(args[6:]), has_bias, act, residual is not None, save_pre, cfg)
    _LINEAR_TMA(key, (cdiv(M, bm) * cdiv(N, bn),), args, dict(
        HAS_BIAS=has_bias, ACT=act, HAS_RES=residual is not None, SAVE_PRE=save_pre, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, GROUP_M=gm, UPCAST=INTERPRET and x.dtype == torch.bfloat16, num_warps=warps, num_stages=stages))
    return c


_LINEAR_TMA = launcher(_linear_tma_kernel)


# ----------------------------------------------------------------------------- host functions

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported(x, weight, bias, activation, residual):
    """Why this kernel cannot take the call, or None (any M, N, K; x's dtype; parameters in x's dtype)."""
    if x.dtype not in KERNEL_DTYPES:
        return f"backend 'triton' linear supports float16, bfloat16 and float32, got {x.dtype}"
    return None


def forward_inference(x, weight, bias, activation, residual):
    """x (M, K) rows, weight (N, K), bias (N,) or None contiguous, x's dtype; residual (M, N) contiguous or None;
    activation "none" | "gelu" | "gelu_tanh" -> y (M, N) x.dtype."""
    M, N = x.shape[0], weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    return _gemm(x, weight.t(), y, tkey=(M, N, x.shape[1], x.dtype), bias=bias, act=ACT_CODES[activation],
                 residual=residual)


def forward(x, weight, bias, activation, residual, save_pre):
    """-> (y (M, N), pre (M, N) x.dtype when save_pre and an activation is set, else an empty tensor)."""
    M, N = x.shape[0], weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    keep = save_pre and activation != "none"
    pre = torch.empty((M, N), dtype=x.dtype, device=x.device) if keep else x.new_empty(0)
    _gemm(x, weight.t(), y, tkey=(M, N, x.shape[1], x.dtype), bias=bias, act=ACT_CODES[activation],
          residual=residual, pre=pre if keep else None)
    return y, pre


def backward(dy, x, weight, bias, pre, activation, needs=(True, True, True)):
    """dy (M, N) contiguous -> (dx (M, K), dw (N, K), db (N,) or None), x's dtype; db summed in fp32.
    needs: which of (dx, dw, db) to compute; the others are None and their GEMMs are not launched (a frozen
    weight costs no dW GEMM, an input without grad no dX GEMM)."""
    need_dx, need_dw, need_db = needs
    need_db = need_db and bias is not None
    if not (need_dx or need_dw or need_db):
        return None, None, None
    if activation != "none":
        dz = torch.empty_like(dy)
        n = dy.numel()
        _dgelu_kernel[(cdiv(n, DGELU_BLOCK),)](dy, pre, dz, n, TANH=activation == "gelu_tanh", BLOCK=DGELU_BLOCK)
    else:
        dz = dy
    M, K = x.shape
    N = weight.shape[0]
    tkey = (M, N, K, x.dtype)
    dx = dw = db = None
    if need_dx:  # (M, N) @ (N, K)
        dx = _gemm(dz, weight, torch.empty((M, K), dtype=x.dtype, device=x.device), cls="bwd_dx", tkey=tkey)
    if need_dw:  # (N, M) @ (M, K)
        dw = _gemm(dz.t(), x, torch.empty((N, K), dtype=weight.dtype, device=x.device), cls="bwd_dw", tkey=tkey)
    if need_db:
        db = dz.sum(0, dtype=torch.float32).to(bias.dtype)
    return dx, dw, db


# ----------------------------------------------------------------------------- ahead-of-time specs


def _gemm_spec(name, dt, cfg, epilogue, layout="fwd"):
    """The AOTSpec of `_linear_kernel` at one config, epilogue ({HAS_BIAS, ACT, HAS_RES, SAVE_PRE}) and operand
    layout: "fwd" X W^T (A rows, B = W^T), "bwd_dx" dZ W (A rows, B rows), "bwd_dw" dZ^T X (A = dZ^T, B rows)."""
    bm, bn, bk, gm, warps, stages = cfg[:6]
    unit = {"fwd": ("stride_ak", "stride_bk"), "bwd_dx": ("stride_ak", "stride_bn"),
            "bwd_dw": ("stride_am", "stride_bn")}[layout]  # the strides equal to 1 (Triton specializes them)
    consts = {**epilogue, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "DOT_PREC": _prec(dt),
              "UPCAST": False}
    p = ptr(dt)
    strides = ("stride_am", "stride_ak", "stride_bk", "stride_bn")
    sig = {"A": p, "B": p, "BIAS": p, "R": p, "C": p, "PRE": p, "M": "i32", "N": "i32", "K": "i32",
           **{st: "constexpr" if st in unit else "i64" for st in strides}, "stride_rm": "i64", "stride_cm": "i64",
           **{k: "constexpr" for k in consts}}
    aligned = ("A", "B", "C", "K", *(st for st in strides if st not in unit), "stride_cm")
    return AOTSpec(name=f"{name}[{bm}x{bn}x{bk},w{warps}s{stages}]", fn=_linear_kernel, signature=sig,
                   constexprs={**consts, **{st: 1 for st in unit}}, num_warps=warps, num_stages=stages,
                   uses_mma=dt != torch.float32, aligned=aligned)


def _tma_spec(dt, cfg, epilogue):
    """The AOTSpec of `_linear_tma_kernel` (sm_90 only; launched only on aligned tensors)."""
    bm, bn, bk, gm, warps, stages = cfg[:6]
    consts = {**epilogue, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "UPCAST": False}
    p = ptr(dt)
    sig = {"X": p, "W": p, "BIAS": p, "R": p, "C": p, "PRE": p, "M": "i32", "N": "i32", "K": "i32",
           "stride_rm": "i64", "stride_cm": "i64", **{k: "constexpr" for k in consts}}
    tag = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dt]
    return AOTSpec(name=f"linear_ffn1_tma[{tag},bias,gelu,save_pre][{bm}x{bn}x{bk},w{warps}s{stages}]",
                   fn=_linear_tma_kernel, signature=sig, constexprs=consts, num_warps=warps, num_stages=stages,
                   uses_mma=True, aligned=("X", "W", "C", "K", "stride_cm"), aligned_only=True, min_cc=90)


_FFN1 = {"HAS_BIAS": True, "ACT": 1, "HAS_RES": False, "SAVE_PRE": True}
_PROJ = {"HAS_BIAS": True, "ACT": 0, "HAS_RES": True, "SAVE_PRE": False}
_PLAIN = {"HAS_BIAS": False, "ACT": 0, "HAS_RES": False, "SAVE_PRE": False}


def aot_specs(every_candidate: bool = False):
    """The CI check (the compile check already takes minutes): two representative GEMM specializations, FFN1's
    (fp16, bias, exact GELU, pre saved, the "large" tile) and an output projection's (bf16, bias + residual, the
    "medium" tile); the TMA variant of FFN1's (sm_90 only, when the installed Triton has tensor descriptors);
    the backward's dZ kernel.

    every_candidate (`python -m roberta_fast.kernels._aot --files linear --every-candidate`): also every tuning
    candidate with FFN1's epilogue (fp16; fp32 for the fp32 list) and the backward GEMMs' operand layouts (dZ W,
    dZ^T X; no epilogue) at each half-precision candidate: what a tuning can launch, by tile, register and
    shared memory use."""
    specs = [_gemm_spec("linear_ffn1[fp16,bias,gelu,save_pre]", torch.float16, CONFIGS["large"], _FFN1),
             _gemm_spec("linear_proj[bf16,bias,residual]", torch.bfloat16, CONFIGS["medium"], _PROJ)]
    if HAS_TMA:
        specs.append(_tma_spec(torch.float16, TMA_CANDIDATE, _FFN1))
    specs.append(AOTSpec(name="linear_dgelu[fp16,erf]", fn=_dgelu_kernel,
                         signature={"DY": "*fp16", "PRE": "*fp16", "DZ": "*fp16", "n": "i32", "TANH": "constexpr",
                                    "BLOCK": "constexpr"},
                         constexprs={"TANH": False, "BLOCK": DGELU_BLOCK}, num_warps=4, num_stages=1))
    if every_candidate:
        for cfg in CANDIDATES_HALF:
            if cfg != CONFIGS["large"]:
                specs.append(_gemm_spec("linear_cand_ffn1[fp16,bias,gelu,save_pre]", torch.float16, cfg, _FFN1))
            for layout in ("bwd_dx", "bwd_dw"):
                specs.append(_gemm_spec(f"linear_cand_{layout}[fp16]", torch.float16, cfg, _PLAIN, layout))
        for cfg in CANDIDATES_FP32:
            specs.append(_gemm_spec("linear_cand_ffn1[fp32,bias,gelu,save_pre]", torch.float32, cfg, _FFN1))
    return specs
