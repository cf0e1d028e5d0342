"""ops.linear_cross_entropy against a float64 reference (F.linear + F.cross_entropy in float64), on every
backend that runs here (torch; triton under the interpreter, at small sizes), and proof that no
(tokens x vocab) tensor is ever made."""

import pytest
import torch
import torch.nn.functional as F
from conftest import with_cases
from torch.utils._python_dispatch import TorchDispatchMode

from roberta_fast import backends, ops
from roberta_fast.ops.linear_cross_entropy import TorchBackend
from roberta_fast.testing import assert_rule


def _ours_only(cpu, cuda):
    """with_cases' table for the torch and triton backends (the cuda backend has no kernel for this op: it is
    tested to say so, below)."""
    return {(d, b): cases for d, cases in (("cpu", cpu), ("cuda", cuda)) for b in ("torch", "triton")}


# (dtype, (M, H, V)): vocabularies of odd sizes, RoBERTa's 50,265 scaled down to 5,027, BERT's 30,522
CASES = {
    ("cpu", "torch"): [(torch.float32, (67, 40, 1000)), (torch.float32, (24, 16, 30522)),
                       (torch.float32, (300, 24, 5027)), (torch.bfloat16, (67, 40, 1000)),
                       (torch.float16, (50, 32, 5027))],
    ("cpu", "triton"): [(torch.float32, (21, 40, 1000)), (torch.bfloat16, (19, 24, 251)),
                        (torch.float16, (19, 24, 251))],
    ("cuda", "torch"): [(torch.float32, (300, 64, 30522))],
    ("cuda", "triton"): [(d, (2457, 768, 50265)) for d in (torch.float16, torch.bfloat16)]
    + [(torch.float32, (300, 64, 30522))],
}


def _inputs(M, H, V, dtype, device, *, ignored_every=5, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, H, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(V, H, generator=g) * H ** -0.5 * 2).to(device=device, dtype=dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(device=device, dtype=dtype) if bias else None
    y = torch.randint(0, V, (M,), generator=g)
    if ignored_every:
        y[::ignored_every] = -100
    return h, w, b, y.to(device)


def _reference(h, w, b, y, **kw):
    """(loss, dh, dw, db) of F.linear + F.cross_entropy in h's dtype (float64 for the oracle)."""
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    loss = F.cross_entropy(F.linear(h, w, b), y, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def _ours(h, w, b, y, backend, **kw):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    loss = ops.linear_cross_entropy(h, w, b, y, backend=backend, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def _check_all(got, h, w, b, y, **kw):
    ref = _reference(*(None if t is None else t.double() for t in (h, w, b)), y, **kw)
    same = _reference(h, w, b, y, **kw)
    for name, o, r, t in zip(("loss", "dhidden", "dweight", "dbias"), got, ref, same):
        if r is None:
            assert o is None
            continue
        assert o.dtype == t.dtype, name
        assert_rule(o, r, t, name=name)


@pytest.mark.parametrize("device, backend, dtype, size", with_cases(CASES))
def test_against_float64(device, backend, dtype, size):
    h, w, b, y = _inputs(*size, dtype, device)
    _check_all(_ours(h, w, b, y, backend), h, w, b, y)


@pytest.mark.parametrize("device, backend, smoothing, reduction", with_cases(
    _ours_only([(0.0, "sum"), (0.0, "none"), (0.1, "mean"), (0.25, "none")], [(0.1, "mean")])))
def test_reductions_and_label_smoothing(device, backend, smoothing, reduction):
    h, w, b, y = _inputs(21, 24, 251, torch.float32, device)
    kw = dict(label_smoothing=smoothing, reduction=reduction)
    h, w = h.requires_grad_(), w.requires_grad_()
    got = ops.linear_cross_entropy(h, w, b, y, backend=backend, **kw)
    ref = F.cross_entropy(F.linear(h.double(), w.double(), b.double()), y, **kw)
    same = F.cross_entropy(F.linear(h, w, b), y, **kw)
    assert got.shape == ref.shape
    assert_rule(got, ref, same, name=f"loss[{reduction}]")
    if reduction == "none":  # through a weighted sum, so every row's gradient is checked
        wt = torch.linspace(0.5, 2.0, got.shape[0], device=device)
        (dh,) = torch.autograd.grad((got * wt).sum(), h)
        (dh_ref,) = torch.autograd.grad((ref * wt.double()).sum(), h)
        (dh_same,) = torch.autograd.grad((same * wt).sum(), h)
        assert_rule(dh, dh_ref, dh_same, name="dhidden")


@pytest.mark.parametrize("device, backend", with_cases(_ours_only([()], [()])))
def test_leading_dims_no_bias_and_all_ignored_rows(device, backend):
    """(B, S, H) hidden with (B, S) labels; whole rows of ignored tokens; no bias."""
    h, w, _, y = _inputs(3 * 7, 16, 300, torch.float32, device, bias=False)
    y = y.view(3, 7)
    y[1] = -100  # a sequence with nothing to predict
    h = h.view(3, 7, 16)
    got = _ours(h, w, None, y, backend)
    ref = _reference(h.double().view(-1, 16), w.double(), None, y.view(-1))
    same = _reference(h.view(-1, 16), w, None, y.view(-1))
    assert_rule(got[0], ref[0], same[0], name="loss")
    assert_rule(got[1].view(-1, 16), ref[1], same[1], name="dhidden")
    assert_rule(got[2], ref[2], same[2], name="dweight")
    assert torch.equal(got[1][1], torch.zeros_like(got[1][1]))  # ignored rows get exact zeros
    assert got[3] is None


@pytest.mark.parametrize("device, backend", with_cases(_ours_only([()], [()])))
def test_every_row_ignored(device, backend):
    """As torch: the mean is NaN (0 / 0), the sum 0, "none" all zeros; every gradient is zero."""
    h, w, b, y = _inputs(9, 16, 100, torch.float32, device)
    y[:] = -100
    for reduction in ("mean", "sum", "none"):
        got = _ours(h, w, b, y, backend, reduction=reduction) if reduction != "none" else None
        want = F.cross_entropy(F.linear(h, w, b), y, reduction=reduction)
        out = ops.linear_cross_entropy(h, w, b, y, reduction=reduction, backend=backend)
        torch.testing.assert_close(out, want, equal_nan=True)
        if reduction == "sum":
            assert all(torch.count_nonzero(g) == 0 for g in got[1:])


def test_empty_input():
    h, w, b, _ = _inputs(1, 8, 10, torch.float32, "cpu")
    y = torch.zeros(0, dtype=torch.long)
    assert ops.linear_cross_entropy(h[:0], w, b, y, reduction="sum").item() == 0.0
    assert ops.linear_cross_entropy(h[:0], w, b, y, reduction="none").shape == (0,)


def test_weight_in_float32_with_half_hidden():
    """Mixed precision: fp32 master weights with a bf16 hidden; gradients in each tensor's own dtype."""
    h, w, b, y = _inputs(33, 24, 301, torch.bfloat16, "cpu")
    w, b = w.float().requires_grad_(), b.float().requires_grad_()
    hh = h.clone().requires_grad_()
    loss = ops.linear_cross_entropy(hh, w, b, y, backend="torch")
    loss.backward()
    assert loss.dtype == torch.bfloat16 and hh.grad.dtype == torch.bfloat16
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    ref = F.cross_entropy(F.linear(h.double(), w.double(), b.double()), y)
    assert abs(loss.double().item() - ref.item()) < 0.05


def test_bad_inputs_name_the_argument():
    h, w, b, y = _inputs(5, 8, 10, torch.float32, "cpu")
    lce = ops.linear_cross_entropy
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        lce(h.tolist(), w, b, y)
    with pytest.raises(ValueError, match=r"weight must have shape \(vocab, 8\)"):
        lce(h, w[:, :4], b, y)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        lce(h, w.view(-1), b, y)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        lce(h, w, b[:3], y)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        lce(h.half(), w.bfloat16(), None, y)
    with pytest.raises(TypeError, match=r"labels must have dtype in \(int64, int32\), got float32"):
        lce(h, w, b, y.float())
    with pytest.raises(ValueError, match=r"labels must have hidden's leading shape \(5,\), got \(4,\)"):
        lce(h, w, b, y[:4])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\) or ignore_index \(-100\); got 10"):
        lce(h, w, b, torch.full((5,), 10))
    with pytest.raises(ValueError, match="reduction must be one of"):
        lce(h, w, b, y, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be a float in \[0, 1\], got 1.5"):
        lce(h, w, b, y, label_smoothing=1.5)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        lce(h, w, b, y, ignore_index=-100.0)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        lce(h, w.to("meta"), b, y)


def test_named_cuda_backend_says_there_is_no_kernel(monkeypatch):
    monkeypatch.setenv("ROBERTA_FAST_CUDA_EMULATE", "1")
    monkeypatch.setattr(backends, "emulation_built", lambda: True)
    backends.reset()
    h, w, b, y = _inputs(5, 8, 10, torch.float32, "cpu")
    try:
        with pytest.raises(ValueError, match="backend 'cuda' has no linear_cross_entropy kernel"):
            ops.linear_cross_entropy(h, w, b, y, backend="cuda")
    finally:
        backends.reset()


def test_opcheck_torch_backend():
    h, w, b, y = _inputs(7, 8, 30, torch.float32, "cpu")
    from roberta_fast.ops.linear_cross_entropy import _fwd

    torch.library.opcheck(_fwd, (h.requires_grad_(), w.requires_grad_(), b, y, -100, 0.1, "torch"))


# ----------------------------------------------------------------------------- no (tokens x vocab) tensor


class _Sizes(TorchDispatchMode):
    """Records the bytes of every tensor an aten op returns (every allocation goes through one; the Triton
    interpreter's copies of the arguments are byte tensors, hence bytes rather than elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("device, backend, size", with_cases({
    ("cpu", "torch"): [((1024, 32, 5027),)], ("cpu", "triton"): [((40, 16, 1000),)],
    ("cuda", "triton"): [((2457, 768, 50265),)]}))
def test_no_tokens_by_vocab_tensor(device, backend, size):
    """Every tensor made in the forward and the backward (the backend's own ops, seen by a TorchDispatchMode
    around its forward and backward) is smaller than the (M, V) logits: at most one (M, C) chunk, C < V."""
    M, H, V = size
    h, w, b, y = _inputs(M, H, V, torch.float32, device)
    mod = TorchBackend if backend == "torch" else backends.implementation(backend, "linear_cross_entropy")
    with _Sizes() as sizes:
        loss, lse = mod.forward(h, w, b, y, -100, 0.0)
        grads = mod.backward(torch.ones_like(loss), h, w, b, y, lse, -100, 0.0)
    chunk = TorchBackend.chunk_columns(M, V) if backend == "torch" else mod.chunk_columns(M, V)
    assert chunk < V
    # fp32 here: the largest tensor is one (M, chunk) slice of dz / logits, or the (V, H) weight's gradient
    assert sizes.largest <= 4 * max(M * chunk, V * H, M * H), (sizes.largest, 4 * M * V)
    assert sizes.largest < 4 * M * V
    # and what it computed is right (float64 oracle, sum of the per-row losses)
    ref = _reference(h.double(), w.double(), b.double(), y, reduction="sum")
    same = _reference(h, w, b, y, reduction="sum")
    assert_rule(loss.sum(), ref[0], same[0], name="loss")
    for name, o, r, t in zip(("dhidden", "dweight", "dbias"), grads, ref[1:], same[1:]):
        assert_rule(o, r, t, name=name)


def test_model_path_through_the_op_never_sees_full_logits():
    """Through the public op with autograd, under the dispatch mode: the op's own outputs are per row."""
    M, H, V = 512, 16, 3001
    h, w, b, y = _inputs(M, H, V, torch.float32, "cpu")
    h, w = h.requires_grad_(), w.requires_grad_()
    with _Sizes() as sizes:
        ops.linear_cross_entropy(h, w, b, y, backend="torch").backward()
    assert sizes.largest < 4 * M * V
