"""attention (padded) and attention_varlen (padding-free): output and q/k/v gradients against a float64
reference, on every backend that can run here.

"torch" and, on CPU, "triton" under the interpreter; the `gpu` variants run the same checks on CUDA
tensors (triton, and cuda when built; a backend that cannot take a case, e.g. cuda with head_dim 16,
is skipped for it). Rule (roberta_fast.testing): max|ours - ref64| <= 2 * max|torch in q's dtype - ref64|
+ floor, where "torch in q's dtype" runs both matmuls in that dtype (FlashAttention's test rule).
Inputs are views into one fused QKV buffer; in the varlen cases the buffer's unused memory (between
the q / k / v views and after the last token) is NaN, so an out-of-bounds read shows up as NaN.
"""

import math

import pytest
import torch
from conftest import BACKEND_CASES, KERNEL_CASES, skip_unsupported, with_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roberta_fast import backends, reference
from roberta_fast.ops import BackendUnavailableError, attention, attention_varlen
from roberta_fast.testing import assert_rule

NEG_INF = float("-inf")
gpu = pytest.mark.gpu
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# (dtype, head_dim, sizes) per device and backend. CPU (interpreter): every dtype at small head dims, one
# head_dim 128 case. CUDA C++ through the emulation: head dims 32 / 64 / 128 in fp16 and bf16 (what it
# takes). GPU: fp16 / bf16 x every head_dim x lengths around the blocks.
CPU_SIZES, GPU_SIZES = dict(B=6, S=37, H=2), [dict(B=7, S=S, H=3) for S in (1, 77, 300)]
PADDED = {
    "cpu": [(dt, d, CPU_SIZES) for dt, d in ((F32, 16), (F16, 16), (BF16, 16), (F16, 32), (BF16, 32), (F32, 64),
                                              (F16, 64), (F16, 128))],
    ("cpu", "cuda"): [(dt, d, CPU_SIZES) for dt in (F16, BF16) for d in (32, 64, 128)],
    "cuda": [(dt, d, sz) for dt in (F16, BF16) for d in (16, 32, 64, 128) for sz in GPU_SIZES],
}
CPU_LENS, GPU_LENS = [37, 0, 1, 36, 16, 5, 0], [300, 0, 1, 299, 128, 129, 64, 7, 0, 511]
VARLEN = {
    "cpu": [(dt, d, dict(lens=CPU_LENS)) for dt, d, _ in PADDED["cpu"]],
    ("cpu", "cuda"): [(dt, d, dict(lens=CPU_LENS)) for dt, d, _ in PADDED[("cpu", "cuda")]],
    "cuda": [(dt, d, dict(lens=GPU_LENS, H=3)) for dt in (F16, BF16) for d in (16, 32, 64, 128)],
}


def _small(device, backend):
    """A (dtype, head_dim) every backend on `device` takes, for the tests of one behaviour."""
    if backend == "cuda":
        return F16, 32
    return (F32, 16) if device == "cpu" else (F16, 16)


# ---------------------------------------------------------------------------------------- helpers


def _same_dtype(q, k, v, mask, scale, flash=False):
    """Plain PyTorch in q's dtype: both matmuls and the probabilities round to it; the reference's rule
    for a row with no real key (zeros). With flash=True the backward is FlashAttention-2's, written in
    PyTorch in q's dtype (_FlashSame)."""
    if flash:
        return _FlashSame.apply(q, k, v, mask, scale)
    s = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) * scale  # (B, H, S, S)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], NEG_INF)
    dead = s.amax(-1, keepdim=True) == NEG_INF
    p = torch.softmax(s.masked_fill(dead, 0.0).float(), -1).masked_fill(dead, 0.0).to(q.dtype)
    return torch.matmul(p, v.transpose(1, 2)).transpose(1, 2)


class _FlashSame(torch.autograd.Function):
    """The yardstick of the flash backward: _same_dtype's forward, and FlashAttention-2's backward in
    PyTorch, rounding where a flash kernel rounds (P and dS to q's dtype for the matmuls; delta =
    rowsum(dO * O) from the stored low-precision O, in fp32). That backward is inherently less accurate
    than autograd's where dP - delta cancels, most visibly on very short sequences, so the rule's
    yardstick for attention gradients is the larger of the two errors (as FlashAttention's own tests
    compare against a reference that mimics the kernel's roundings)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        o = _same_dtype(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, o, mask)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, mask = ctx.saved_tensors
        dt, sc = q.dtype, ctx.scale
        qf, kf, vf, of, dof = (t.float().transpose(1, 2) for t in (q, k, v, o, do))  # (B, H, S, D)
        s = qf @ kf.transpose(-1, -2) * sc
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, :], NEG_INF)
        dead = s.amax(-1, keepdim=True) == NEG_INF
        p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
        delta = (of * dof).sum(-1, keepdim=True)
        ds = (p * (dof @ vf.transpose(-1, -2) - delta)).to(dt).float()
        dq = (ds @ kf) * sc
        dk = (ds.transpose(-1, -2) @ qf) * sc
        dv = p.to(dt).float().transpose(-1, -2) @ dof
        return (*(g.transpose(1, 2).to(dt) for g in (dq, dk, dv)), None, None)


def _same_dtype_varlen(q, k, v, cu, scale, flash=False):
    out = torch.zeros_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            out[s:e] = _same_dtype(q[None, s:e], k[None, s:e], v[None, s:e], None, scale, flash)[0]
    return out


def _compare(fn_ours, fn_ref, fn_same, buf, do):
    """Run the three on a fresh leaf copy of `buf` (float64 for the reference), backprop `do`, and
    judge the output and buf's gradient (= dq, dk, dv scattered into the fused buffer). The gradients'
    yardstick is the larger error of autograd through fn_same and of fn_same(flash=True) (_FlashSame)."""
    outs, grads = [], []
    runs = ((fn_ours, buf.dtype), (fn_ref, torch.float64), (fn_same, buf.dtype),
            (lambda t: fn_same(t, flash=True), buf.dtype))
    for fn, dt in runs:
        leaf = buf.detach().to(dt).clone().requires_grad_(True)
        o = fn(leaf)
        if o.requires_grad:  # (the reference's output has no graph when every sequence is empty)
            o.backward(do.to(dt))
        outs.append(o.detach())
        grads.append(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
    ours, ref, same = outs[:3]
    assert ours.dtype == buf.dtype and ours.shape == ref.shape
    assert_rule(ours, ref, same, name="output")
    assert grads[0].dtype == buf.dtype
    same_grad = max(grads[2:], key=lambda g: (g.double() - grads[1]).nan_to_num(0.0).abs().max().item())
    assert_rule(grads[0], grads[1], same_grad, name="grad of the fused qkv")
    return ours, grads[0]


def _lengths(S, batch, gen):
    """Per-sequence lengths covering 0, 1, S - 1 and S, the rest random."""
    fixed = [0, 1, S - 1, S]
    rand = torch.randint(0, S + 1, (max(batch - len(fixed), 0),), generator=gen).tolist()
    return (fixed + rand)[:batch]


def _padded_qkv(B, S, H, D, dtype, device):
    """A fused QKV buffer (B, S, 3, H, D) like the QKV projection's output, and its q, k, v views."""
    buf = torch.randn(B, S, 3, H, D, device=device).to(dtype)
    return buf, (lambda t: t.unbind(2))


def _varlen_qkv(T_used, T, H, D, dtype, device, gap=16):
    """A fused buffer (T, 3, H, D + gap): q, k, v are [:, i, :, :D]; the gap columns and the rows past
    T_used are NaN."""
    buf = torch.full((T, 3, H, D + gap), float("nan"), device=device, dtype=dtype)
    buf[:T_used, :, :, :D] = torch.randn(T_used, 3, H, D, device=device).to(dtype)
    return buf, (lambda t: tuple(t[:, i, :, :D] for i in range(3)))


# ------------------------------------------------------------------------------------ padded cases


def _check_padded(backend, dtype, D, device, *, B=6, S=37, H=2, mask_kind="prefix", scale=None):
    gen = torch.Generator().manual_seed(D + S)
    lens = _lengths(S, B, gen)
    if mask_kind == "prefix":
        mask = (torch.arange(S)[None, :] < torch.tensor(lens)[:, None]).to(device)
    elif mask_kind == "random":  # holes anywhere, one sequence with no real key
        mask = (torch.rand(B, S, generator=gen) < 0.6).to(device)
        mask[0] = False
    else:
        mask = None
    buf, split = _padded_qkv(B, S, H, D, dtype, device)
    q0 = buf[:, :, 0]
    skip_unsupported(backend, "attention", q0, q0, q0, mask, None, None, scale)
    sc = D**-0.5 if scale is None else scale

    def ours(t):
        return attention(*split(t), key_padding_mask=mask, scale=scale, backend=backend)

    def ref(t):
        return reference.attention(*split(t), mask, sc)

    def same(t, flash=False):
        return _same_dtype(*split(t), mask, sc, flash)

    do = torch.randn(B, S, H, D, device=device).to(dtype)
    o, g = _compare(ours, ref, same, buf, do)
    if mask is not None:  # a sequence with no real key: zeros and zero gradients, never NaN
        dead = ~mask.any(1)
        assert dead.any()
        assert (o[dead] == 0).all() and (g[dead] == 0).all()
    if backend != "torch":
        assert o.is_contiguous()
    return o


@pytest.mark.parametrize("device,backend,dtype,D,sizes", with_cases(PADDED))
def test_padded(device, backend, dtype, D, sizes, poison_empty):
    _check_padded(backend, dtype, D, device, **sizes)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("mask_kind", ["none", "random"])
def test_padded_mask_kinds(device, backend, mask_kind, poison_empty):
    _check_padded(backend, torch.float16, 32, device, mask_kind=mask_kind, scale=0.3)


@pytest.mark.parametrize("device,backend,S", with_cases(
    {"cpu": [1, 16, 17], ("cpu", "cuda"): [1, 17, 63, 65], "cuda": [1, 16, 17, 65]}, kernels_only=True))
def test_padded_short(device, backend, S, poison_empty):
    """Sequence lengths at and around one block (the interpreter's blocks are 16 rows, the CUDA kernels'
    64 queries and 32-64 keys)."""
    _check_padded(backend, *_small(device, backend), device, B=4 if S > 1 else 2, S=S)


@gpu
@pytest.mark.parametrize("device,backend", [c for c in KERNEL_CASES if c.values[0] == "cuda"])
def test_padded_gpu_long(device, backend):
    """Several full blocks per program in every kernel (the GPU configs hold up to 128 rows)."""
    _check_padded(backend, torch.float16, 64, device, B=4, S=1031, H=2)


# ------------------------------------------------------------------------------------ varlen cases


def _check_varlen(backend, dtype, D, device, *, lens, H=2, tail=3, max_seqlen=None, scale=None):
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    T_used = int(cu[-1])
    T = T_used + tail
    max_seqlen = max(lens) if max_seqlen is None else max_seqlen
    buf, split = _varlen_qkv(T_used, T, H, D, dtype, device)
    q0 = buf[:, 0, :, :D]
    skip_unsupported(backend, "attention_varlen", q0, q0, q0, None, cu, max_seqlen, scale)
    sc = D**-0.5 if scale is None else scale

    def ours(t):
        return attention_varlen(*split(t), cu, max_seqlen, scale=scale, backend=backend)

    def ref(t):
        return reference.attention_varlen(*split(t), cu, max_seqlen, sc)

    def same(t, flash=False):
        return _same_dtype_varlen(*split(t), cu, sc, flash)

    do = torch.randn(T, H, D, device=device).to(dtype)
    o, g = _compare(ours, ref, same, buf, do)
    assert (o[T_used:] == 0).all(), "rows past cu_seqlens[-1] must be zeros"
    assert not g[:, :, :, :D].isnan().any() and (g[T_used:] == 0).all() and (g[..., D:] == 0).all()
    return o


@pytest.mark.parametrize("device,backend,dtype,D,sizes", with_cases(VARLEN))
def test_varlen(device, backend, dtype, D, sizes, poison_empty):
    _check_varlen(backend, dtype, D, device, **sizes)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_varlen_edges(device, backend, poison_empty):
    """No tail, a max_seqlen larger than every length, one sequence only, all sequences empty."""
    dtype, D = _small(device, backend)
    _check_varlen(backend, dtype, D, device, lens=[33], tail=0, max_seqlen=50, scale=0.2)
    _check_varlen(backend, dtype, D, device, lens=[3, 17, 32], tail=0)
    _check_varlen(backend, F16, D, device, lens=[0, 0], tail=5, max_seqlen=0)


def _padded_vs_varlen(backend, device, dtype, D, S, B=5, H=2):
    """The same sequences as a right-padded batch with a key padding mask and as a packed batch."""
    gen = torch.Generator().manual_seed(S)
    lens = _lengths(S, B, gen)
    mask = (torch.arange(S)[None, :] < torch.tensor(lens)[:, None]).to(device)
    q, k, v = (torch.randn(B, S, H, D, device=device).to(dtype).requires_grad_() for _ in range(3))
    do = torch.randn(B, S, H, D, device=device).to(dtype) * mask[:, :, None, None]  # no grad at padding
    o = attention(q, k, v, key_padding_mask=mask, backend=backend)
    o.backward(do)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    packed = [t.detach()[mask].requires_grad_() for t in (q, k, v)]  # (T, H, D)
    ov = attention_varlen(*packed, cu, S, backend=backend)
    ov.backward(do[mask])
    # triton runs the same blocks from each sequence's start in both layouts: equal up to the sums'
    # order; another backend may take different paths for the two layouts (a few ulps apart)
    tol = dict(rtol=1e-5, atol=1e-5) if backend == "triton" else dict(rtol=4e-3, atol=4e-3)  # noqa: C408
    torch.testing.assert_close(ov, o[mask], **tol)
    for name, a, b in zip("qkv", packed, (q, k, v)):
        torch.testing.assert_close(a.grad, b.grad[mask], **tol, msg=lambda m, n=name: f"d{n}: {m}")
        assert (b.grad[~mask] == 0).all() or name == "q"  # padded keys get no gradient


@pytest.mark.parametrize("device,backend,S,sizes", with_cases(
    {"cpu": [(33, dict(B=4))], "cuda": [(77, dict(B=6, H=4)), (513, dict(B=6, H=4))]}, kernels_only=True))
def test_padded_equals_varlen(device, backend, S, sizes):
    D = 64 if device == "cuda" else (32 if backend == "cuda" else 16)
    _padded_vs_varlen(backend, device, F16, D, S, **sizes)


# ------------------------------------------------------------------------------ kernel-level checks


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("varlen", [False, True])
def test_lse(device, backend, varlen):
    """The kernels' log-sum-exp (natural log of the scaled scores per row; -inf for no real key)."""
    kernels = backends.implementation(backend, "attention")
    dtype, D = _small(device, backend)
    H, S, scale = 2, 21, 0.37
    lens = [S, 0, 5]
    cu = torch.tensor([0, S, S, S + 5], dtype=torch.int32, device=device)
    if varlen:
        q, k, v = (torch.randn(S + 5 + 2, H, D, device=device).to(dtype) for _ in range(3))
        o, lse = kernels.forward(q, k, v, None, cu, S, scale, 0.0, None)
        expect = torch.full((H, q.shape[0]), NEG_INF, dtype=torch.float64)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if e > s:
                sc = torch.einsum("qhd,khd->hqk", q[s:e].double(), k[s:e].double()) * scale
                expect[:, s:e] = sc.logsumexp(-1)
    else:
        q, k, v = (torch.randn(3, S, H, D, device=device).to(dtype) for _ in range(3))
        mask = (torch.arange(S)[None, :] < torch.tensor(lens)[:, None]).to(device)
        o, lse = kernels.forward(q, k, v, mask, None, None, scale, 0.0, None)
        sc = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
        expect = sc.masked_fill(~mask[:, None, None, :], NEG_INF).logsumexp(-1)  # (B, H, S)
    assert lse.dtype == torch.float32 and lse.shape == expect.shape
    assert torch.equal(lse.isneginf(), expect.isneginf())
    fin = expect.isfinite()
    tol = 1e-5 if dtype == F32 else 1e-3  # the 16-bit kernels' scores come from 16-bit inputs exactly
    torch.testing.assert_close(lse.double()[fin], expect[fin], rtol=tol, atol=tol)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_non_unit_last_stride(device, backend):
    """q with a non-unit last stride (a transposed view) is copied, not misread."""
    dtype, D = _small(device, backend)
    B, S, H = 2, 9, 2
    qt = torch.randn(B, S, D, H, device=device).to(dtype)
    q = qt.transpose(-1, -2)  # (B, S, H, D), stride(-1) == H
    k, v = torch.randn(B, S, H, D, device=device).to(dtype), torch.randn(B, S, H, D, device=device).to(dtype)
    o = attention(q, k, v, backend=backend)
    assert_rule(o, reference.attention(q.double(), k.double(), v.double()), reference.attention(q, k, v))


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_unaligned_views(device, backend):
    """q, k, v starting 2 bytes past a 16-byte boundary (a kernel that loads 16 bytes at a time copies)."""
    dtype, D = _small(device, backend)
    buf = torch.randn(2 * 9 * 2 * D + 1, device=device).to(dtype)
    q = buf[1:].view(2, 9, 2, D)
    assert q.data_ptr() % 16 != 0
    o = attention(q, q, q, backend=backend)
    assert_rule(o, reference.attention(q.double(), q.double(), q.double()), reference.attention(q, q, q))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_padded_keys_never_reach_real_rows(device, backend, poison):
    """Whatever K and V hold at padded key positions (NaN, inf) changes no real row's output or gradient."""
    dtype, D = _small(device, backend)
    B, S, H = 3, 21, 2
    lens = torch.tensor([21, 9, 0])
    mask = (torch.arange(S)[None, :] < lens[:, None]).to(device)
    q, k, v = (torch.randn(B, S, H, D, device=device).to(dtype) for _ in range(3))
    pad = ~mask[:, :, None, None]
    k_bad, v_bad = k.masked_fill(pad, poison), v.masked_fill(pad, poison)
    do = torch.randn(B, S, H, D, device=device).to(dtype)
    outs = []
    for kk, vv in ((k, v), (k_bad, v_bad)):
        leaves = [t.clone().requires_grad_() for t in (q, kk, vv)]
        o = attention(*leaves, key_padding_mask=mask, backend=backend)
        o.backward(do)
        outs.append((o.detach(), leaves[0].grad, leaves[1].grad, leaves[2].grad))
    (o_ref, dq_ref, dk_ref, dv_ref), (o, dq, dk, dv) = outs
    assert torch.isfinite(o).all() and torch.isfinite(dq).all()
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    # the CUDA C++ backward adds dq with fp32 atomics: on a GPU their order (the last bits) varies per run
    tol = dict(rtol=2e-3, atol=2e-3) if backend == "cuda" and device == "cuda" else dict(rtol=0, atol=0)  # noqa: C408
    torch.testing.assert_close(dq, dq_ref, **tol)
    real = mask[:, :, None, None].expand_as(dk)
    torch.testing.assert_close(dk[real], dk_ref[real], rtol=0, atol=0)
    torch.testing.assert_close(dv[real], dv_ref[real], rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_nan_in_gives_nan_out(device, backend):
    dtype, D = _small(device, backend)
    q, k, v = (torch.randn(1, 20, 2, D, device=device).to(dtype) for _ in range(3))
    q[0, 3, 1, 0] = float("nan")
    o = attention(q, k, v, backend=backend)
    assert o[0, 3, 1].isnan().all() and not o[0, :3].isnan().any() and not o[0, :, 0].isnan().any()
    v[0, 5, 0, 2] = float("nan")
    o = attention(q, k, v, backend=backend)
    assert o[:, :, 0, 2].isnan().all()


@pytest.mark.parametrize("device,backend", [c for c in KERNEL_CASES if c.values[1] == "triton"])
def test_backward_deterministic(device, backend):
    """The Triton backward has no atomics: bit-identical gradients run to run. (The CUDA C++ backward adds
    dQ with fp32 atomics, so it is not; docs/kernel_contracts.md.)"""
    dtype, D = _small(device, backend)
    q, k, v = (torch.randn(2, 33, 2, D, device=device).to(dtype).requires_grad_() for _ in range(3))
    do = torch.randn(2, 33, 2, D, device=device).to(dtype)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        attention(q, k, v, backend=backend).backward(do)
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@gpu
@pytest.mark.parametrize("device,backend", [c for c in KERNEL_CASES if c.values == ("cuda", "triton")])
def test_backward_deterministic_gpu(device, backend):
    lens = [513, 7, 300]
    cu = torch.tensor([0, 513, 520, 820], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(820, 12, 64, device="cuda", dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    do = torch.randn(820, 12, 64, device="cuda", dtype=torch.float16)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        attention_varlen(q, k, v, cu, max(lens), backend=backend).backward(do)
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# ------------------------------------------------------------------------------------ empty inputs


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("shape", [(0, 5, 2, 32), (3, 0, 2, 32), (2, 4, 0, 32)])
def test_empty_padded(device, backend, shape):
    q, k, v = (torch.randn(shape, device=device).half().requires_grad_() for _ in range(3))
    o = attention(q, k, v, key_padding_mask=torch.ones(shape[:2], dtype=torch.bool, device=device), backend=backend)
    assert o.shape == shape and o.dtype == q.dtype
    o.sum().backward()
    assert q.grad is not None and q.grad.shape == shape


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_empty_varlen(device, backend):
    q, k, v = (torch.randn(0, 2, 32, device=device).half().requires_grad_() for _ in range(3))
    o = attention_varlen(q, k, v, torch.zeros(3, dtype=torch.int32, device=device), 0, backend=backend)
    assert o.shape == (0, 2, 32)
    o.sum().backward()


# -------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs():
    q = torch.randn(2, 5, 2, 16)
    m = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"attention: q must be a torch.Tensor, got list"):
        attention([1.0], q, q)
    with pytest.raises(ValueError, match=r"attention: q must be 4-D .* got shape \(2, 5, 32\)"):
        attention(q.flatten(2), q.flatten(2), q.flatten(2))
    with pytest.raises(ValueError, match=r"attention: k must have shape \(2, 5, 2, 16\), got \(2, 6, 2, 16\)"):
        attention(q, torch.randn(2, 6, 2, 16), q)
    with pytest.raises(ValueError, match=r"attention: v must have shape"):
        attention(q, q, torch.randn(2, 5, 2, 32))
    with pytest.raises(TypeError, match=r"attention: k must have q's dtype \(float32\), got float16"):
        attention(q, q.half(), q)
    with pytest.raises(TypeError, match=r"attention: q must have dtype in .* got int64"):
        attention(q.long(), q.long(), q.long())
    with pytest.raises(ValueError, match=r"attention: key_padding_mask must have shape \(2, 5\), got \(2, 4\)"):
        attention(q, q, q, key_padding_mask=m[:, :4])
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 5\), got \(2, 1, 1, 5\)"):
        attention(q, q, q, key_padding_mask=m[:, None, None, :])
    with pytest.raises(TypeError, match=r"attention: key_padding_mask must have dtype in \(bool\), got float32"):
        attention(q, q, q, key_padding_mask=m.float())
    with pytest.raises(TypeError, match=r"attention: scale must be a Python float or None, got str"):
        attention(q, q, q, scale="0.1")
    with pytest.raises(ValueError, match=r"attention: backend must be one of"):
        attention(q, q, q, backend="cudnn")


def test_bad_head_dim():
    q = torch.randn(2, 5, 2, 24)
    ref = reference.attention(q, q, q)
    torch.testing.assert_close(attention(q, q, q), ref)  # the automatic choice falls back to torch
    if backends.can_run("triton", q.device):
        with pytest.raises(ValueError, match=r"attention: backend 'triton' supports head_dim in "
                                             r"\(16, 32, 64, 128\), got 24"):
            attention(q, q, q, backend="triton")
        with pytest.raises(ValueError, match=r"attention_varlen: backend 'triton' supports head_dim"):
            attention_varlen(q[0], q[0], q[0], torch.tensor([0, 5], dtype=torch.int32), 5, backend="triton")


def test_cuda_backend_missing_or_wrong_device(monkeypatch):
    q = torch.randn(1, 4, 2, 16)
    monkeypatch.setenv("ROBERTA_FAST_CUDA_EMULATE", "0")  # CPU tensors, no emulation: never runs
    err = BackendUnavailableError if not backends.cuda_built() else ValueError
    with pytest.raises(err, match=r"attention: backend 'cuda'"):
        attention(q, q, q, backend="cuda")
    if backends.emulation_built():  # through the emulation the backend runs, and says what it cannot take
        monkeypatch.setenv("ROBERTA_FAST_CUDA_EMULATE", "1")
        with pytest.raises(ValueError, match=r"backend 'cuda' attention supports dtypes \(float16, bfloat16\)"):
            attention(q, q, q, backend="cuda")
        with pytest.raises(ValueError, match=r"backend 'cuda' attention supports head_dim \(32, 64, 128\)"):
            attention(q.half(), q.half(), q.half(), backend="cuda")


def test_bad_varlen_inputs():
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"attention_varlen: cu_seqlens must have dtype in \(int32\), got int64"):
        attention_varlen(q, q, q, cu.long(), 6)
    with pytest.raises(ValueError, match=r"attention_varlen: cu_seqlens must be non-decreasing, got "
                                         r"cu_seqlens\[1\] = 6 > cu_seqlens\[2\] = 4"):
        attention_varlen(q, q, q, torch.tensor([0, 6, 4], dtype=torch.int32), 6)
    with pytest.raises(ValueError, match=r"attention_varlen: cu_seqlens must start at 0, got 1"):
        attention_varlen(q, q, q, torch.tensor([1, 4, 10], dtype=torch.int32), 6)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 11 exceeds the 10 tokens of q"):
        attention_varlen(q, q, q, torch.tensor([0, 4, 11], dtype=torch.int32), 7)
    with pytest.raises(ValueError, match=r"max_seqlen = 5 is smaller than the longest sequence \(6 tokens\)"):
        attention_varlen(q, q, q, cu, 5)
    with pytest.raises(ValueError, match=r"cu_seqlens must be 1-D"):
        attention_varlen(q, q, q, cu[None], 6)
    with pytest.raises(TypeError, match=r"attention_varlen: max_seqlen must be a Python int, got float"):
        attention_varlen(q, q, q, cu, 6.0)
    with pytest.raises(ValueError, match=r"attention_varlen: q must be 3-D"):
        attention_varlen(q[None], q[None], q[None], cu, 6)
    with pytest.raises(TypeError, match=r"attention_varlen: v must have q's dtype \(float32\), got bfloat16"):
        attention_varlen(q, q, q.bfloat16(), cu, 6)
    with pytest.raises(ValueError, match=r"attention_varlen: k must have shape \(10, 2, 16\), got \(9, 2, 16\)"):
        attention_varlen(q, q[:9], q, cu, 6)


@gpu
def test_mixed_devices_and_fp32_gpu():
    q = torch.randn(1, 4, 2, 16, device="cuda")
    with pytest.raises(ValueError, match=r"attention: all tensors must be on one device"):
        attention(q, q.cpu(), q)
    if backends.can_run("triton", q.device):
        with pytest.raises(ValueError, match=r"backend 'triton' supports q dtypes \(float16, bfloat16\) on CUDA"):
            attention(q, q, q, backend="triton")
        torch.testing.assert_close(attention(q, q, q), reference.attention(q, q, q))  # automatic: torch


# ------------------------------------------------------------------------ custom ops and compile


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_opcheck(device, backend):
    dtype, D = _small(device, backend)
    B, S, H = 2, 5, 2
    q, k, v = (torch.randn(B, S, H, D, device=device).to(dtype).requires_grad_() for _ in range(3))
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]], device=device)
    torch.library.opcheck(torch.ops.roberta_fast.attention_fwd.default, (q, k, v, mask, 0.25, backend))
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32, device=device)
    qv, kv, vv = (torch.randn(8, H, D, device=device).to(dtype).requires_grad_() for _ in range(3))
    torch.library.opcheck(torch.ops.roberta_fast.attention_varlen_fwd.default, (qv, kv, vv, cu, 4, 0.25, backend))
    o, lse = torch.ops.roberta_fast.attention_fwd(q, k, v, mask, 0.25, backend)
    torch.library.opcheck(torch.ops.roberta_fast.attention_bwd.default,
                          (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(), lse, mask,
                           0.25, backend), test_utils=("test_schema", "test_faketensor"))
    o, lse = torch.ops.roberta_fast.attention_varlen_fwd(qv, kv, vv, cu, 4, 0.25, backend)
    torch.library.opcheck(torch.ops.roberta_fast.attention_varlen_bwd.default,
                          (torch.randn_like(o), qv.detach(), kv.detach(), vv.detach(), o.detach(), lse, cu, 4,
                           0.25, backend), test_utils=("test_schema", "test_faketensor"))


def test_aot_specs_cover_the_config_table(monkeypatch):
    """Every config the GPU tuning can return is in aot_specs() (what the compile check builds)."""
    pytest.importorskip("triton")
    from roberta_fast.kernels import attention as kernels

    monkeypatch.setattr(kernels, "interpret_mode", lambda: False)  # the GPU configs
    specs = {(s.fn, s.signature["Q"], s.constexprs["HEAD_DIM"], s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"],
              s.num_warps, s.num_stages) for s in kernels.aot_specs()}
    fns = {"fwd": kernels._attn_fwd, "bwd_dq": kernels._attn_bwd_dq, "bwd_dkdv": kernels._attn_bwd_dkdv}
    for kernel, fn in fns.items():
        for dtype, ptr in ((torch.float16, "*fp16"), (torch.bfloat16, "*bf16")):
            for D in kernels.HEAD_DIMS:
                for seqlen in (1, 128, 129, 512, 8192):
                    c = kernels.attention_config(kernel, D, dtype, seqlen)
                    assert (fn, ptr, D, c.block_m, c.block_n, c.num_warps, c.num_stages) in specs, (kernel, D, seqlen)
    assert all(s.uses_mma for s in kernels.aot_specs())
    with pytest.raises(ValueError, match="float16 or bfloat16 on GPUs"):
        kernels.attention_config("fwd", 64, torch.float32, 128)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_compile_fullgraph(device, backend):
    dtype, D = _small(device, backend)
    q, k, v = (torch.randn(8, 2, D, device=device).to(dtype).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)

    def f(q, k, v, cu):
        return attention_varlen(q, k, v, cu, 5, backend=backend).float().square().sum()

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    out = compiled(q, k, v, cu)
    grads = torch.autograd.grad(out, (q, k, v))
    ref = f(q, k, v, cu)
    ref_grads = torch.autograd.grad(ref, (q, k, v))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------- property tests


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), S=st.integers(1, 24), H=st.integers(1, 2), D=st.sampled_from([16, 32]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       masked=st.booleans(), scale=st.floats(0.05, 1.0))
def test_property_padded(B, S, H, D, dtype, masked, scale):
    backend = "triton" if backends.can_run("triton", torch.device("cpu")) else "torch"
    torch.manual_seed(B * 1000 + S)
    buf, split = _padded_qkv(B, S, H, D, dtype, "cpu")
    mask = (torch.rand(B, S) < 0.7) if masked else None

    def ours(t):
        return attention(*split(t), key_padding_mask=mask, scale=scale, backend=backend)

    def ref(t):
        return reference.attention(*split(t), mask, scale)

    def same(t, flash=False):
        return _same_dtype(*split(t), mask, scale, flash)

    _compare(ours, ref, same, buf, torch.randn(B, S, H, D).to(dtype))
    assert math.isfinite(scale)


def test_torch_backend_computes_in_float32_under_autocast():
    """The reference (the torch backend) states float32 math: an autocast region around it changes nothing."""
    q, k, v = (torch.randn(2, 9, 2, 16) for _ in range(3))
    mask = torch.tensor([[True] * 9, [True] * 4 + [False] * 5])
    plain = attention(q, k, v, key_padding_mask=mask, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = attention(q, k, v, key_padding_mask=mask, backend="torch")
        auto_varlen = attention_varlen(q[0], k[0], v[0], torch.tensor([0, 9], dtype=torch.int32), 9, backend="torch")
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=0, atol=0)
    torch.testing.assert_close(auto_varlen, attention(q, k, v, backend="torch")[0], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------- the torch backend's CPU path (SDPA)
# On CPU tensors in float32 / float16 / bfloat16, reference.attention / attention_varlen (the torch backend) run
# scaled_dot_product_attention in float32; float64 (the oracle) stays the explicit math. The op tests above
# run that path on every case; these pin what it adds: the grouping, float32 math, and the semantics SDPA
# lacks (dead sequences, poisoned padded keys) whichever SDPA kernel runs: the default CPU kernel, and the
# math kernel, which gives NaN for a fully masked row.

SDPA_KERNELS = [pytest.param(None, id="sdpa-default"), pytest.param("MATH", id="sdpa-math")]


def _sdpa_kernel(name):
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return nullcontext() if name is None else sdpa_kernel([getattr(SDPBackend, name)])


@pytest.fixture
def sdpa_calls(monkeypatch):
    """(q's shape (n, heads, seqlen, head_dim), whether a mask was given, q's dtype) of every SDPA call."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((tuple(q.shape), attn_mask is not None, q.dtype))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def test_cpu_path_oracle_stays_explicit_math(sdpa_calls):
    """float64 runs the explicit math (bit for bit attention_math, no SDPA); float32 runs one SDPA call."""
    q, k, v = (torch.randn(3, 11, 2, 16, dtype=torch.float64) for _ in range(3))
    mask = torch.arange(11)[None, :] < torch.tensor([11, 4, 0])[:, None]
    cu = torch.tensor([0, 5, 5, 11], dtype=torch.int32)
    assert torch.equal(reference.attention(q, k, v, mask), reference.attention_math(q, k, v, mask))
    assert torch.equal(reference.attention_varlen(q[0], k[0], v[0], cu, 6),
                       reference.attention_varlen_math(q[0], k[0], v[0], cu, 6))
    assert sdpa_calls == []
    o = reference.attention(q.float(), k.float(), v.float(), mask)
    assert sdpa_calls == [((3, 2, 11, 16), True, torch.float32)]
    assert_rule(o, reference.attention_math(q, k, v, mask), reference.attention_math(*(t.float() for t in (q, k, v)),
                                                                                     mask))


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_cpu_varlen_one_call_per_run_of_equal_lengths(sdpa_calls, dtype):
    """Consecutive sequences of one length (empty ones in between included) share one SDPA call on a view of
    the packed rows; a packed batch of one length is one call; every call in float32; rows past
    cu_seqlens[-1] are zeros; the result is attention_varlen_math's."""
    H, D = 2, 16
    lens = [5, 5, 0, 5, 3, 3, 7, 0, 1]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1]) + 2
    q, k, v = (torch.randn(T, H, D).to(dtype) for _ in range(3))
    o = reference.attention_varlen(q, k, v, cu, 7)
    assert sdpa_calls == [((3, H, 5, D), False, F32), ((2, H, 3, D), False, F32), ((1, H, 7, D), False, F32),
                          ((1, H, 1, D), False, F32)]
    assert o.dtype == dtype and (o[int(cu[-1]):] == 0).all()
    assert_rule(o, reference.attention_varlen_math(*(t.double() for t in (q, k, v)), cu, 7),
                _same_dtype_varlen(q, k, v, cu, D**-0.5))
    sdpa_calls.clear()
    reference.attention_varlen(q[:12], k[:12], v[:12], torch.tensor([0, 4, 8, 12], dtype=torch.int32), 4)
    assert sdpa_calls == [((3, H, 4, D), False, F32)]


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_cpu_path_computes_in_float32(sdpa_calls, dtype):
    """float16 / bfloat16 inputs: the float32 result on the upcast inputs, rounded once."""
    q, k, v = (torch.randn(2, 13, 2, 16).to(dtype) for _ in range(3))
    mask = torch.arange(13)[None, :] < torch.tensor([13, 6])[:, None]
    o = reference.attention(q, k, v, mask)
    assert o.dtype == dtype and all(c[2] == F32 for c in sdpa_calls)
    assert torch.equal(o, reference.attention(q.float(), k.float(), v.float(), mask).to(dtype))
    cu = torch.tensor([0, 13, 20], dtype=torch.int32)
    ov = reference.attention_varlen(q[0].repeat(2, 1, 1), k[0].repeat(2, 1, 1), v[0].repeat(2, 1, 1), cu, 13)
    assert torch.equal(ov, reference.attention_varlen(*(t[0].repeat(2, 1, 1).float() for t in (q, k, v)), cu,
                                                      13).to(dtype))


@pytest.mark.parametrize("kernel", SDPA_KERNELS)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cpu_path_dead_sequences_and_poisoned_padding(kernel, dtype):
    """A sequence with no real key, NaN everywhere in its q, k and v, gives exact zeros and zero gradients;
    inf / NaN in K and V at the padded keys of the others reach no real row; outputs and gradients are the
    oracle's (float64 explicit math) by the accuracy rule, whichever SDPA kernel runs."""
    B, S, H, D = 3, 9, 2, 16
    mask = torch.arange(S)[None, :] < torch.tensor([9, 4, 0])[:, None]
    q, k, v = (torch.randn(B, S, H, D).to(dtype) for _ in range(3))
    q[2], k[2], v[2] = float("nan"), float("nan"), float("nan")
    k[1, 4:], v[1, 4:] = float("inf"), float("nan")
    do = torch.randn(B, S, H, D).to(dtype)
    res = []
    for dt in (dtype, torch.float64):
        leaves = [t.to(dt).clone().requires_grad_() for t in (q, k, v)]
        with _sdpa_kernel(kernel):
            o = reference.attention(*leaves, mask)
            o.backward(do.to(dt))
        res.append((o.detach(), *(t.grad for t in leaves)))
    (o, dq, dk, dv), (o64, dq64, dk64, dv64) = res
    assert (o[2] == 0).all() and all((g[2] == 0).all() for g in (dq, dk, dv))
    assert (dk[1, 4:] == 0).all() and (dv[1, 4:] == 0).all()
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
    # the yardstick (plain PyTorch in the same dtype) on finite inputs: the poison zeroed
    clean = [t.masked_fill(~mask[:, :, None, None], 0.0).requires_grad_() for t in (q, k, v)]
    same = _same_dtype(*clean, mask, D**-0.5)
    same.backward(do)
    assert_rule(o, o64, same.detach(), name="output")
    for name, g, g64, gs in zip(("dq", "dk", "dv"), (dq, dk, dv), (dq64, dk64, dv64), clean):
        assert_rule(g, g64, gs.grad, name=name)


def test_cpu_path_traces_without_host_reads():
    """Under torch.compile(fullgraph=True) the padded CPU path reads nothing back (the mask checks that skip
    work in eager mode are not taken) and gives eager's outputs and gradients, a dead sequence included."""
    B, S, H, D = 3, 7, 2, 16
    mask = torch.arange(S)[None, :] < torch.tensor([7, 3, 0])[:, None]
    q, k, v = (torch.randn(B, S, H, D, requires_grad=True) for _ in range(3))

    def f(q, k, v, mask):
        return reference.attention(q, k, v, mask, 0.3)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    want = f(q, k, v, mask)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    g_got, g_want = (torch.autograd.grad(o.square().sum(), (q, k, v)) for o in (got, want))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (got[2] == 0).all()
