"""Dropout inside attention and attention_varlen (dropout_p, rng), on every backend that can run here.

The mask is read back through the output: with v = one-hot rows (v[key j] = e_j, head_dim >= keys), o's
first columns are dropout(P) itself, so every test sees each element's keep decision and its scale. The
rest follows from that extracted mask:
  - statistics: the kept fraction is Binomial(n, 1 - p) (bounds of 5 standard deviations, false alarm
    < 1e-6), kept elements are P / (1 - p), pairs of neighbours (same row, same key, next head) are kept
    together with probability (1 - p)^2 (a counter that ignores a coordinate would fail it);
  - determinism (same rng, same bits), a new seed or a new offset gives a new mask (disagreement
    fraction Binomial(n, 2 p (1 - p)));
  - forward/backward consistency: o, dq, dk, dv with random inputs against a float64 recomputation that
    applies the extracted mask (the 2x-PyTorch-error rule): the backward kernels must regenerate the
    forward's mask;
  - dropout_p == 0 (with or without an rng) is bit for bit the no-dropout result, gradients included;
  - padded keys are never kept and never read (NaN there), varlen sequences never mix;
  - bad dropout_p / rng raise errors that name them.
Masks differ between backends (each has its own position indexing); each must agree with itself.
"""

import math

import pytest
import torch
from conftest import BACKEND_CASES, KERNEL_CASES
from torch.utils._python_dispatch import TorchDispatchMode

from roberta_fast.ops import attention, attention_varlen, trusted
from roberta_fast.testing import assert_rule

F16, F32, F64 = torch.float16, torch.float32, torch.float64
B, S, H, D = 2, 29, 2, 32  # S <= D: one-hot values; S spans two interpreter blocks (16) and ends mid-block
LENS = [9, 0, 1, 20, 1]  # varlen: 31 tokens and one spare row (T = D = 32 with the one-hot-per-token values)


def _dtype(device, backend):
    """float32 where the backend takes it on CPU (torch, triton under the interpreter), else float16."""
    return F32 if device == "cpu" and backend != "cuda" else F16


def _rng(seed, offset, device):
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def _sigmas(count, n, prob, k=5.0):
    """|count - n prob| / (k standard deviations of Binomial(n, prob)): <= 1 passes."""
    return abs(count - n * prob) / (k * math.sqrt(n * prob * (1 - prob)))


def _pad_mask(device):
    mask = torch.ones(B, S, dtype=torch.bool, device=device)
    mask[1, 17:] = False  # a partly padded sequence
    return mask


def _qk(device, dtype, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(0.5 * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype) for _ in range(2)]


def _probs64(q, k, kpm, scale):
    """Undropped P (B, H, Sq, Sk) in float64; padded keys 0."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1)


def _extract_padded(device, backend, p, rng, kpm=None, seed=1):
    """(dropout(P) as the backend computed it, P in float64), both (B, H, S, S), with q, k of `seed`; the K and
    V rows of padded keys hold NaN (a read would show)."""
    dt = _dtype(device, backend)
    q, k = _qk(device, dt, (B, S, H, D), seed)
    v = torch.zeros(B, S, H, D, device=device, dtype=dt)
    v[:, torch.arange(S), :, torch.arange(S)] = 1.0  # v[b, j, h] = e_j
    if kpm is not None:
        k, v = k.masked_fill(~kpm[:, :, None, None], float("nan")), v.masked_fill(~kpm[:, :, None, None], float("nan"))
    o = attention(q, k, v, key_padding_mask=kpm, dropout_p=p, rng=rng, backend=backend)
    assert not torch.isnan(o).any()
    pd = o.double()[..., :S].permute(0, 2, 1, 3).cpu()  # (B, H, Sq, Sk)
    return pd, _probs64(q, torch.nan_to_num(k), kpm, D ** -0.5).cpu()


def _kept(pd, P, p, dtype):
    """The keep decisions (bool like pd), after checking that every element is either P / (1 - p) (kept) or 0
    (to the rounding of P and o in `dtype`, the backend's)."""
    kept = pd > 0.5 * P / (1 - p)
    tol = 2e-3 if dtype == F16 else 1e-4
    want = torch.where(kept, P / (1 - p), 0.0)
    torch.testing.assert_close(pd, want, rtol=tol, atol=tol * P.max().item())
    return kept


# ------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_kept_fraction_scaling_and_independence(device, backend, p):
    """Kept with probability 1 - p (binomial bounds), kept elements scaled by 1 / (1 - p), neighbours kept
    independently."""
    kept_all = []
    for seed in range(3):
        pd, P = _extract_padded(device, backend, p, _rng(1000 + seed, 77 * seed, device))
        kept_all.append(_kept(pd, P, p, _dtype(device, backend)))
    kept = torch.stack(kept_all)  # (3, B, H, S, S)
    n, q = kept.numel(), 1 - p
    assert _sigmas(int(kept.sum()), n, q) <= 1, (int(kept.sum()), n, q)
    # disjoint pairs of neighbours along keys, query rows, heads: both kept with probability q^2
    for name, a, b in (("keys", kept[..., 0:S - 1:2], kept[..., 1:S:2]),
                       ("rows", kept[..., 0:S - 1:2, :], kept[..., 1:S:2, :]),
                       ("heads", kept[:, :, 0], kept[:, :, 1])):
        both = int((a & b).sum())
        assert _sigmas(both, a.numel(), q * q) <= 1, (name, both, a.numel(), q * q)
    # each query row's kept count: no row is all kept or all dropped when that is wildly unlikely
    per_row = kept.sum(-1).double()
    assert per_row.mean().item() == pytest.approx(S * q, rel=0.1)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_same_rng_same_mask_new_seed_or_offset_new_mask(device, backend):
    p = 0.3
    rng = _rng(5, 9, device)
    pd1, P = _extract_padded(device, backend, p, rng)
    pd2, _ = _extract_padded(device, backend, p, rng.clone())
    assert torch.equal(pd1, pd2)
    base = _kept(pd1, P, p, _dtype(device, backend))
    for other in (_rng(6, 9, device), _rng(5, 10, device), _rng(5 + 2**40, 9, device), _rng(5, 9 + 2**40, device)):
        kept = _kept(_extract_padded(device, backend, p, other)[0], P, p, _dtype(device, backend))
        differ = int((kept != base).sum())
        assert _sigmas(differ, base.numel(), 2 * p * (1 - p)) <= 1, (other.tolist(), differ, base.numel())


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_no_rng_draws_from_the_default_generator(device, backend):
    """rng=None with dropout_p > 0: a (seed, offset) from torch's generator, so manual_seed reproduces a run."""
    dt = _dtype(device, backend)
    q, k = _qk(device, dt, (B, S, H, D))
    torch.manual_seed(3)
    o1 = attention(q, k, k, dropout_p=0.4, backend=backend)
    torch.manual_seed(3)
    o2 = attention(q, k, k, dropout_p=0.4, backend=backend)
    o3 = attention(q, k, k, dropout_p=0.4, backend=backend)
    assert torch.equal(o1, o2)
    assert not torch.equal(o1, o3)


# ----------------------------------------------------------------------------- padded and varlen


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_padded_keys_are_never_kept_or_read(device, backend):
    kpm = _pad_mask(device)
    pd, P = _extract_padded(device, backend, 0.2, _rng(11, 12, device), kpm=kpm)
    kept = _kept(pd, P, 0.2, _dtype(device, backend))
    assert not kept[1, :, :, 17:].any() and (pd[1, :, :, 17:] == 0).all()
    real = P > 0
    assert _sigmas(int(kept[real].sum()), int(real.sum()), 0.8) <= 1


def _varlen_extract(device, backend, p, rng):
    """(o (T, H, T) float64: o[t, h, t'] = dropout(P)[t -> t'] with v = e_t per token, P (H, T, T) float64 with
    0 across sequences, cu_seqlens)."""
    dt = _dtype(device, backend)
    T = D
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k = _qk(device, dt, (T, H, D), seed=2)
    v = torch.eye(T, D, device=device, dtype=dt)[:, None, :].expand(T, H, D).contiguous()
    o = attention_varlen(q, k, v, cu, max(LENS), dropout_p=p, rng=rng, backend=backend)
    P = torch.zeros(H, T, T, dtype=F64)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            P[:, s:e, s:e] = _probs64(q[None, s:e], k[None, s:e], None, D ** -0.5)[0].cpu()
    return o.double().cpu(), P, bounds


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_varlen_sequences_never_mix(device, backend):
    p = 0.25
    o, P, bounds = _varlen_extract(device, backend, p, _rng(21, 22, device))
    pd = o.permute(1, 0, 2)  # (H, T, T)
    kept = _kept(pd, P, p, _dtype(device, backend))
    seq_of = torch.zeros(D, dtype=torch.long)
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        seq_of[s:e] = i
    seq_of[bounds[-1]:] = -1
    across = seq_of[:, None] != seq_of[None, :]
    assert (pd[:, across] == 0).all()  # nothing from another sequence, nothing in the spare row
    assert (o[bounds[-1]:] == 0).all()
    real = P > 0
    assert _sigmas(int(kept[real].sum()), int(real.sum()), 1 - p) <= 1
    o2, _, _ = _varlen_extract(device, backend, p, _rng(21, 22, device))
    assert torch.equal(o, o2)


# ------------------------------------------------------------------------ forward / backward consistency


def _recompute(q, k, v, allow, kept, p, dtype):
    """O = (P * kept / (1 - p)) V with both matmuls in `dtype` (float64: the reference), differentiable.
    q, k, v (B, S, H, D); allow None or bool broadcastable to (B, H, S, S) (the keys a row sees; a row that
    sees none gives 0); kept (B, H, S, S) bool."""
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd).to(torch.promote_types(dtype, F32)) * (q.shape[-1] ** -0.5)
    if allow is not None:
        dead = ~allow.any(-1, keepdim=True)
        s = s.masked_fill(~allow | dead, float("-inf")).masked_fill(dead, 0.0)
    prob = torch.softmax(s, -1)
    if allow is not None:
        prob = prob.masked_fill(~allow, 0.0)
    prob = prob.to(dtype)
    prob = torch.where(kept.to(prob.device), prob / (1 - p), torch.zeros((), dtype=dtype, device=prob.device))
    return torch.einsum("bhqk,bkhd->bqhd", prob, vd)


def _check_grads(ours, ref, same, names):
    for name, a, r, t in zip(names, ours, ref, same):
        assert_rule(a, r, t, name=name)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "key_padding_mask"])
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_backward_regenerates_the_forward_mask(device, backend, masked):
    """o, dq, dk, dv with random inputs against a float64 recomputation under the mask extracted from the
    forward (same rng, same positions): a backward with another mask would be off by whole elements of P."""
    p, rng = 0.3, _rng(31, 32, device)
    kpm = _pad_mask(device) if masked else None
    pd, P = _extract_padded(device, backend, p, rng, kpm=kpm)
    kept = _kept(pd, P, p, _dtype(device, backend))
    dt = _dtype(device, backend)
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(B, S, H, D, generator=g).to(device=device, dtype=dt) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = attention(*leaves, key_padding_mask=kpm, dropout_p=p, rng=rng, backend=backend)
    grads = torch.autograd.grad(o, leaves, do)
    refs, sames = [], []
    for dtype in (F64, dt):
        lv = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = _recompute(*lv, None if kpm is None else kpm[:, None, None, :], kept, p, dtype)
        refs.append((out, *torch.autograd.grad(out, lv, do.to(dtype))))
    if masked:  # padded keys get exactly zero gradients
        assert (grads[1][1, 17:] == 0).all() and (grads[2][1, 17:] == 0).all()
    sames = refs[1]
    _check_grads((o, *grads), refs[0], sames, ("o", "dq", "dk", "dv"))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_varlen_backward_regenerates_the_forward_mask(device, backend):
    p, rng = 0.3, _rng(41, 42, device)
    o1, P, bounds = _varlen_extract(device, backend, p, rng)
    kept = _kept(o1.permute(1, 0, 2), P, p, _dtype(device, backend))  # (H, T, T)
    dt = _dtype(device, backend)
    T = D
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    seq_of = torch.full((T,), -1, dtype=torch.long)
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        seq_of[s:e] = i
    same_seq = ((seq_of[:, None] == seq_of[None, :]) & (seq_of[:, None] >= 0)).to(device)
    g = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(T, H, D, generator=g).to(device=device, dtype=dt) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = attention_varlen(*leaves, cu, max(LENS), dropout_p=p, rng=rng, backend=backend)
    grads = torch.autograd.grad(o, leaves, do)
    refs = []
    for dtype in (F64, dt):
        lv = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        # one batch row of T tokens, each row seeing the keys of its own sequence (the spare row none)
        out = _recompute(*(t[None] for t in lv), same_seq, kept[None], p, dtype)[0]
        refs.append((out, *torch.autograd.grad(out, lv, do.to(dtype))))
    _check_grads((o, *grads), refs[0], refs[1], ("o", "dq", "dk", "dv"))


# ------------------------------------------------------------------------------------- dropout_p == 0


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_p_zero_is_bit_for_bit_no_dropout(device, backend):
    dt = _dtype(device, backend)
    g = torch.Generator().manual_seed(6)
    q, k, v, do = (torch.randn(B, S, H, D, generator=g).to(device=device, dtype=dt) for _ in range(4))
    kpm = _pad_mask(device)
    cu = torch.tensor([0, 5, 5, 17], dtype=torch.int32, device=device)
    runs = {}
    for name, kw in (("none", {}), ("zero", dict(dropout_p=0.0)),
                     ("zero+rng", dict(dropout_p=0.0, rng=_rng(1, 2, device)))):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = attention(*leaves, key_padding_mask=kpm, backend=backend, **kw)
        ov = attention_varlen(*(t.flatten(0, 1)[:20] for t in leaves), cu, 12, backend=backend, **kw)
        grads = torch.autograd.grad((o, ov), leaves, (do, do.flatten(0, 1)[:20]))
        with torch.no_grad():
            inf = attention(q, k, v, key_padding_mask=kpm, backend=backend, **kw)
            inf_t = trusted.attention(q, k, v, kpm, None, backend=backend, **kw)
        runs[name] = (o, ov, *grads, inf, inf_t)
    for name in ("zero", "zero+rng"):
        for a, b in zip(runs[name], runs["none"]):
            assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------ the op layer


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_bad_dropout_arguments_are_named(device, backend):
    dt = _dtype(device, backend)
    q = torch.zeros(1, 4, 1, D, device=device, dtype=dt)
    qv = q[0]
    cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
    calls = (lambda **kw: attention(q, q, q, backend=backend, **kw),
             lambda **kw: attention_varlen(qv, qv, qv, cu, 4, backend=backend, **kw))
    for call in calls:
        for bad in (-0.1, 1.0, 1.5, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="dropout_p must be in"):
                call(dropout_p=bad)
        for bad in ("0.1", True, None, torch.tensor(0.1)):
            with pytest.raises(TypeError, match="dropout_p must be a Python float"):
                call(dropout_p=bad)
        with pytest.raises(TypeError, match="rng must have dtype in \\(int64\\)"):
            call(dropout_p=0.1, rng=torch.zeros(2, dtype=torch.int32, device=device))
        with pytest.raises(ValueError, match=r"rng must have shape \(2,\)"):
            call(dropout_p=0.1, rng=torch.zeros(3, dtype=torch.int64, device=device))
        with pytest.raises(TypeError, match="rng must be a torch.Tensor"):
            call(dropout_p=0.1, rng=(1, 2))
        if device == "cuda":
            with pytest.raises(ValueError, match="rng is on cpu"):
                call(dropout_p=0.1, rng=torch.zeros(2, dtype=torch.int64))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_no_zero_gradient_is_filled_for_lse(device, backend):
    """lse is non-differentiable and its gradient is not materialized: nothing runs before the backward op."""
    dt = _dtype(device, backend)
    q, k, v = (torch.randn(1, 8, 1, D, device=device).to(dt).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    for p in (0.0, 0.2):
        for o in (attention(q, k, v, dropout_p=p, backend=backend),
                  attention_varlen(q[0], k[0], v[0], cu, 5, dropout_p=p, backend=backend)):
            do = torch.ones_like(o)
            with _Ops() as mode:
                torch.autograd.grad(o, (q, k, v), do)
            bwd = [i for i, n in enumerate(mode.seen) if n.startswith("roberta_fast.attention")]
            assert bwd, mode.seen
            assert not any("zero" in n for n in mode.seen[:bwd[0]]), mode.seen


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_opcheck_with_dropout(device, backend):
    dt = _dtype(device, backend)
    q, k, v = (torch.randn(2, 5, 2, D, device=device).to(dt).requires_grad_() for _ in range(3))
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]], device=device)
    rng = _rng(7, 8, device)
    torch.library.opcheck(torch.ops.roberta_fast.attention_fwd.default, (q, k, v, mask, 0.25, backend, 0.3, rng))
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32, device=device)
    qv, kv, vv = (torch.randn(8, 2, D, device=device).to(dt).requires_grad_() for _ in range(3))
    torch.library.opcheck(torch.ops.roberta_fast.attention_varlen_fwd.default,
                          (qv, kv, vv, cu, 4, 0.25, backend, 0.3, rng))
