"""layer_norm with dropout: y = LayerNorm(dropout(x + x_bias) + residual) * weight + bias (issue 13).

Every backend that runs here (conftest's BACKEND_CASES: "torch", "triton" under the interpreter, "cuda" through
the emulation) is judged by the same tests. The mask is the backend's own function of (seed, offset, position),
so the tests read it back from the op itself: dL/dx is zero exactly where an element was dropped. With that
mask the forward and every gradient must match a float64 reference (the accuracy rule of roberta_fast.testing),
which also proves the backward regenerated the forward's mask: a different mask changes y by O(1).
Statistics: the kept count is Binomial(n, 1 - p); the bounds below are 6 standard deviations (a false failure
about once in 10^9 runs).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND_CASES, KERNEL_CASES

from roberta_fast import backends, reference
from roberta_fast.ops import layer_norm, trusted
from roberta_fast.testing import assert_rule

NAMES = ("x", "weight", "bias", "residual", "x_bias")


def _rng(seed, offset=0, device="cpu"):
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def _make(M, N, dtype, device, *, residual=True, x_bias=True, weight=True, bias=True):
    pd = dtype
    return {
        "x": torch.randn(M, N, device=device).to(dtype),
        "weight": (1.0 + 0.5 * torch.randn(N, device=device)).to(pd) if weight else None,
        "bias": (0.5 * torch.randn(N, device=device)).to(pd) if bias else None,
        "residual": torch.randn(M, N, device=device).to(dtype) if residual else None,
        "x_bias": (0.5 * torch.randn(N, device=device)).to(pd) if x_bias else None,
    }


def _leaves(inputs, dtype=None):
    return {k: None if v is None else (v if dtype is None else v.to(dtype)).detach().clone().requires_grad_(True)
            for k, v in inputs.items()}


def _ours(a, p, rng, backend, eps=1e-5):
    return layer_norm(a["x"], a["weight"], a["bias"], eps, residual=a["residual"], x_bias=a["x_bias"],
                      dropout_p=p, rng=rng, backend=backend)


def _with_mask(a, keep, p, eps=1e-5):
    """LN(dropout(x + x_bias) + residual) with a given mask, in the leaves' dtype (float64: the reference)."""
    h = a["x"] if a["x_bias"] is None else a["x"] + a["x_bias"]
    h = h * keep.to(h.dtype) / (1 - p)
    if a["residual"] is not None:
        h = h + a["residual"]
    return F.layer_norm(h, (h.shape[-1],), a["weight"], a["bias"], eps)


def _run_and_mask(inputs, p, rng, backend):
    """ours forward + backward; returns (leaves, y, dy, keep) with keep read back from dL/dx."""
    ours_l = _leaves(inputs)
    y = _ours(ours_l, p, rng, backend)
    dy = torch.randn(y.shape, device=y.device).to(y.dtype)
    y.backward(dy)
    keep = ours_l["x"].grad != 0
    return ours_l, y, dy, keep


# ----------------------------------------------------------------------------- the mask: forward = backward


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("M,N,p", [(33, 96, 0.1), (7, 33, 0.5), (1, 768, 0.25)])
def test_forward_and_backward_use_one_mask(device, backend, dtype, M, N, p, poison_empty):
    """y and every gradient equal a float64 reference computed with the mask the backward reveals."""
    inputs = _make(M, N, dtype, device)
    ours_l, y, dy, keep = _run_and_mask(inputs, p, _rng(1234, 5, device), backend)
    ref_l, same_l = _leaves(inputs, torch.float64), _leaves(inputs)
    ref, same = _with_mask(ref_l, keep, p), _with_mask(same_l, keep, p)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_rule(y, ref, same, name="y")
    ref.backward(dy.double())
    same.backward(dy)
    for k in NAMES:
        assert ours_l[k].grad.dtype == dtype
        assert_rule(ours_l[k].grad, ref_l[k].grad, same_l[k].grad, name=f"d{k}")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("residual,x_bias", [(0, 0), (0, 1), (1, 0)])
def test_optional_inputs(device, backend, residual, x_bias):
    inputs = _make(9, 40, torch.float32, device, residual=residual, x_bias=x_bias, weight=False)
    ours_l, y, dy, keep = _run_and_mask(inputs, 0.3, _rng(7, 0, device), backend)
    ref_l = _leaves(inputs, torch.float64)
    ref = _with_mask(ref_l, keep, 0.3)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    ref.backward(dy.double())
    for k in NAMES:
        if inputs[k] is not None:
            torch.testing.assert_close(ours_l[k].grad.double(), ref_l[k].grad, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_and_scale(device, backend, p):
    """kept count within 6 sigma of Binomial(n, 1 - p); kept elements scaled by exactly 1 / (1 - p): the
    residual's gradient is dL/dh and x's is dL/dh * mask / (1 - p)."""
    M, N = 48, 128
    inputs = _make(M, N, torch.float32, device)
    ours_l, _, _, keep = _run_and_mask(inputs, p, _rng(99, 3, device), backend)
    n = M * N
    kept = int(keep.sum())
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) <= 6 * sigma, (kept, n * (1 - p), sigma)
    if p == 0.5:  # no gross structure: every row and every column keeps some and drops some (0.5^48 ~ 4e-15)
        assert keep.any(1).all() and keep.any(0).all() and (~keep).any(1).all() and (~keep).any(0).all()
    dx, dres = ours_l["x"].grad, ours_l["residual"].grad
    torch.testing.assert_close(dx[keep], dres[keep] / (1 - p), rtol=1e-6, atol=0)
    assert torch.all(dx[~keep] == 0)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_masks_of_different_keys_are_independent(device, backend):
    """Another seed or another offset gives another mask: two independent masks agree on p^2 + (1-p)^2 of the
    elements on average; the same key gives the same mask."""
    M, N, p = 32, 128, 0.5
    inputs = _make(M, N, torch.float32, device)
    masks = {key: _run_and_mask(inputs, p, _rng(*key, device=device), backend)[3]
             for key in ((1, 0), (2, 0), (1, 1), (-(2**63), 2**62))}
    again = _run_and_mask(inputs, p, _rng(1, 0, device), backend)[3]
    assert torch.equal(masks[(1, 0)], again)
    n = M * N
    keys = list(masks)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            agree = int((masks[keys[i]] == masks[keys[j]]).sum())
            assert abs(agree - n / 2) <= 6 * math.sqrt(n / 4), (keys[i], keys[j], agree)


# ----------------------------------------------------------------------------- determinism, p = 0, the rng


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_deterministic_per_rng(device, backend):
    inputs = _make(17, 64, torch.float16, device)
    torch.manual_seed(1)  # the same dy twice
    a = _run_and_mask(inputs, 0.2, _rng(5, 6, device), backend)
    torch.manual_seed(1)
    b = _run_and_mask(inputs, 0.2, _rng(5, 6, device), backend)
    assert torch.equal(a[1], b[1])
    for k in NAMES:
        assert torch.equal(a[0][k].grad, b[0][k].grad), k


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_rng_none_draws_from_torch_generator(device, backend):
    """dropout_p > 0 without rng: a key drawn from torch's default generator, so torch.manual_seed reproduces
    the output and two calls in a row differ."""
    a = _make(8, 64, torch.float32, device)
    torch.manual_seed(3)
    y1 = _ours(a, 0.3, None, backend)
    y2 = _ours(a, 0.3, None, backend)
    torch.manual_seed(3)
    y3 = _ours(a, 0.3, None, backend)
    assert torch.equal(y1, y3) and not torch.equal(y1, y2)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_p0_is_the_no_dropout_op_bit_for_bit(device, backend, grad):
    inputs = _make(13, 100, torch.bfloat16, device)
    with torch.set_grad_enabled(grad):
        la, lb = _leaves(inputs), _leaves(inputs)
        plain = layer_norm(la["x"], la["weight"], la["bias"], 1e-5, residual=la["residual"], x_bias=la["x_bias"],
                           backend=backend)
        p0 = _ours(lb, 0.0, _rng(1, 2, device), backend)
        assert torch.equal(plain, p0)
        t = trusted.layer_norm(lb["x"], lb["weight"], lb["bias"], 1e-5, lb["residual"], lb["x_bias"], None, 0.0,
                               None, backend)
        assert torch.equal(plain, t)
    if grad:
        dy = torch.randn(plain.shape, device=device).to(plain.dtype)
        plain.backward(dy)
        p0.backward(dy)
        for k in NAMES:
            assert torch.equal(la[k].grad, lb[k].grad), k


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_leading_dims_and_trusted_entry(device, backend):
    """(B, S, N) input and the trusted entry point: the same mask as the public op for the same rng."""
    x = torch.randn(2, 5, 48, device=device)
    r = torch.randn(2, 5, 48, device=device)
    w, b = torch.randn(48, device=device), torch.randn(48, device=device)
    rng = _rng(11, 0, device)
    y = layer_norm(x, w, b, 1e-5, residual=r, dropout_p=0.4, rng=rng, backend=backend)
    t = trusted.layer_norm(x, w, b, 1e-5, r, None, None, 0.4, rng, backend)
    assert y.shape == x.shape and torch.equal(y, t)
    flat = layer_norm(x.reshape(10, 48), w, b, 1e-5, residual=r.reshape(10, 48), dropout_p=0.4, rng=rng,
                      backend=backend)
    assert torch.equal(flat.view(2, 5, 48), y)


# ----------------------------------------------------------------------------- the backend contract


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_backend_dresidual_vs_dx(device, backend):
    """backward returns dresidual = dL/dh only with dropout and a residual; dx = dresidual * mask / (1 - p);
    dx_bias = dx summed over rows."""
    skip = backends.why_unavailable(backend, torch.device(device))
    if skip:
        pytest.skip(skip)
    mod = backends.implementation(backend, "layer_norm")
    a = _make(10, 64, torch.float32, device)
    x, w, b, r, xb = (a[k] for k in NAMES)
    rng = _rng(3, 4, device)
    y, mean, rstd = mod.forward(x, w, b, 1e-5, r, xb, 0.25, rng)
    dy = torch.randn_like(y)
    dx, dw, db, dxb, dres = mod.backward(dy, x, w, b, mean, rstd, r, xb, 0.25, rng)
    assert dres is not None and dres.shape == x.shape and dres.dtype == x.dtype
    keep = dx != 0
    torch.testing.assert_close(dx, torch.where(keep, dres / 0.75, 0.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(dxb, dx.sum(0), rtol=1e-5, atol=1e-5)
    assert mod.forward_inference(x, w, b, 1e-5, r, xb, 0.25, rng).equal(y)
    # no residual, or no dropout: no dresidual (the residual's gradient is dx)
    y2, m2, s2 = mod.forward(x, w, b, 1e-5, None, xb, 0.25, rng)
    assert mod.backward(dy, x, w, b, m2, s2, None, xb, 0.25, rng)[4] is None
    y3, m3, s3 = mod.forward(x, w, b, 1e-5, r, xb, 0.0, None)
    assert mod.backward(dy, x, w, b, m3, s3, r, xb, 0.0, None)[4] is None


def test_torch_backend_mask_is_computed_on_the_device():
    """reference.dropout_keep: a pure function of (seed, offset, position), no host read (it traces into a
    graph without breaks), uniform enough."""
    rng = _rng(42, 7)
    k1 = reference.dropout_keep(rng, (64, 64), 0.3, rng.device)
    assert torch.equal(k1, reference.dropout_keep(rng.clone(), (64, 64), 0.3, rng.device))
    assert k1.dtype == torch.bool and k1.shape == (64, 64)
    n = k1.numel()
    assert abs(int(k1.sum()) - 0.7 * n) <= 6 * math.sqrt(n * 0.21)
    compiled = torch.compile(reference.dropout_keep, fullgraph=True, backend="eager")
    assert torch.equal(compiled(rng, (64, 64), 0.3, rng.device), k1)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kw,err,match", [
    ({"dropout_p": 1.0}, ValueError, "dropout_p"),
    ({"dropout_p": -0.1}, ValueError, "dropout_p"),
    ({"dropout_p": float("nan")}, ValueError, "dropout_p"),
    ({"dropout_p": True}, TypeError, "dropout_p"),
    ({"dropout_p": "0.1"}, TypeError, "dropout_p"),
    ({"dropout_p": 0.1, "rng": [1, 2]}, TypeError, "rng"),
    ({"dropout_p": 0.1, "rng": torch.tensor([1, 2], dtype=torch.int32)}, TypeError, "rng.*int64"),
    ({"dropout_p": 0.1, "rng": torch.zeros(3, dtype=torch.int64)}, ValueError, r"rng.*\(2,\)"),
    ({"dropout_p": 0.1, "rng": torch.zeros(1, 2, dtype=torch.int64)}, ValueError, r"rng.*\(2,\)"),
    ({"dropout_p": 0.1, "rng": torch.zeros(2, dtype=torch.int64, device="meta")}, ValueError, "rng.*device"),
])
def test_bad_arguments(kw, err, match):
    x = torch.randn(4, 8)
    with pytest.raises(err, match=match):
        layer_norm(x, None, None, **kw)
