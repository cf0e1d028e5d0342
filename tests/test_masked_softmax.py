"""masked_softmax: softmax(scale * scores, masked) over the last dim, forward and backward, against a
float64 reference.

Every backend that can run here is judged by the same tests (conftest's BACKEND_CASES): "torch"; on CPU
"triton" under the interpreter and "cuda" through the emulation (`cuda_emulated`); the `gpu` variants
run the same cases on CUDA tensors.
Rule (roberta_fast.testing): max|ours - ref64| <= 2 * max|torch in scores' dtype - ref64| + floor.
"""

import pytest
import torch
from conftest import BACKEND_CASES, KERNEL_CASES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roberta_fast import backends, reference
from roberta_fast.ops import masked_softmax
from roberta_fast.testing import assert_rule

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LAST_DIMS = [1, 7, 384, 768, 1000, 1023, 4096]
CASES = BACKEND_CASES
NEG_INF = float("-inf")


def _torch_same(scores, mask, scale):
    """Plain PyTorch in scores' dtype (the scaled scores and the mask round to it), with the reference's
    fully-masked-row rule."""
    s = scores * scale
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    dead = s.amax(-1, keepdim=True) == NEG_INF
    return torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)


def _check(scores, mask, scale, backend, *, view=None, dy=None, backward=True):
    """Ours, the float64 reference and torch in scores' dtype on the same inputs: compare probs and
    dscores. `view` is applied to the scores leaf before the op."""
    view = view or (lambda t: t)
    dtype = scores.dtype

    def run(kind):
        leaf = (scores.double() if kind == "ref" else scores).detach().clone().requires_grad_(True)
        s = view(leaf)
        if kind == "ours":
            p = masked_softmax(s, mask, scale, backend=backend)
        elif kind == "ref":
            m = mask if mask is None or mask.dtype == torch.bool else mask.double()
            p = reference.masked_softmax(s, m, scale)
        else:
            p = _torch_same(s, mask, scale)
        return leaf, p

    lo, ours = run("ours")
    lr, ref = run("ref")
    ls, same = run("same")
    assert ours.dtype == dtype and ours.shape == ref.shape
    assert ours.is_contiguous() or backend == "torch"
    assert_rule(ours, ref, same, name="probs")
    if backward:
        g = torch.randn(ours.shape, device=ours.device).to(dtype) if dy is None else dy
        for p in (ours, ref, same):
            p.backward(g.to(p.dtype))
        assert lo.grad.dtype == dtype
        assert_rule(lo.grad, lr.grad, ls.grad, name="dscores")
    return ours, lo.grad


def _bool_mask(shape, device, p_keep=0.7):
    return torch.rand(shape, device=device) < p_keep


def _additive(keep):
    return torch.zeros(keep.shape, device=keep.device).masked_fill(~keep, NEG_INF)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("K", LAST_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward(device, backend, dtype, K, poison_empty):
    B, H, Q = (2, 2, 3) if K >= 1000 else (2, 3, 5)
    scores = (3.0 * torch.randn(B, H, Q, K, device=device)).to(dtype)
    mask = _bool_mask((B, 1, 1, K), device)
    _check(scores, mask, 0.125, backend)
    _check(scores, None, 1.0, backend)


MASK_CASES = ["bool_B11K", "add_B11K", "add_BHQK", "bool_K", "bool_11QK", "add_11QK_fp32", "bool_BHQ1",
              "add_B1Q1_bf16"]


def _mask_case(case, B, H, Q, K, dtype, device):
    kind, shape = case.split("_")[:2]
    dims = {"B": B, "H": H, "Q": Q, "K": K, "1": 1}
    size = tuple(dims[c] for c in shape)
    keep = _bool_mask(size, device)
    if kind == "bool":
        return keep
    add = _additive(keep) + 0.3 * torch.randn(size, device=device)  # finite values are added too
    mdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(case.split("_")[-1], dtype)
    return add.to(mdtype)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_mask_broadcasts(device, backend, dtype, case, poison_empty):
    B, H, Q, K = 2, 3, 4, 37
    scores = torch.randn(B, H, Q, K, device=device).to(dtype)
    mask = _mask_case(case, B, H, Q, K, dtype, device)
    _check(scores, mask, 0.7, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows_are_zero(device, backend, kind, poison_empty):
    B, H, Q, K = 3, 2, 4, 50
    keep = _bool_mask((B, 1, Q, K), device)
    keep[1] = False  # every row of batch 1
    keep[2, 0, 3] = False  # one row of batch 2
    mask = keep if kind == "bool" else _additive(keep)
    scores = torch.randn(B, H, Q, K, device=device, dtype=torch.float16)
    probs, dscores = _check(scores, mask, 0.5, backend)
    dead = ~keep.expand(B, H, Q, K).any(-1)
    assert dead.sum() == H * Q + H
    assert torch.equal(probs[dead], torch.zeros_like(probs[dead]))
    assert torch.equal(dscores[dead], torch.zeros_like(dscores[dead]))
    live = probs.float().sum(-1)[~dead]
    torch.testing.assert_close(live, torch.ones_like(live), atol=5e-3, rtol=0)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hf_finfo_min_mask_matches_torch(device, backend, dtype, poison_empty):
    """transformers' extended mask: (B, 1, 1, K) holding 0 (keep) or finfo(dtype).min (drop), added
    after scaling; a fully padded sequence gives a uniform row, as in transformers."""
    B, H, Q, K = 3, 2, 5, 24
    keep = _bool_mask((B, K), device)
    keep[2] = False
    ext = (1.0 - keep[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    scores = torch.randn(B, H, Q, K, device=device).to(dtype)
    probs, _ = _check(scores, ext, 0.125, backend)
    hf = torch.softmax(scores.float() * 0.125 + ext.float(), -1).to(dtype)
    torch.testing.assert_close(probs, hf, atol=2e-3 if dtype != torch.bfloat16 else 8e-3, rtol=0)


@pytest.mark.parametrize("device,backend", CASES)
def test_nan_propagates(device, backend):
    B, H, Q, K = 1, 2, 3, 20
    scores = torch.randn(B, H, Q, K, device=device)
    keep = torch.ones(B, 1, 1, K, dtype=torch.bool, device=device)
    keep[..., 5] = False
    scores[0, 0, 1, 3] = float("nan")  # kept: the whole row is NaN
    scores[0, 1, 2, 5] = float("nan")  # masked by the bool mask: the row is finite
    p = masked_softmax(scores, keep, backend=backend)
    nan_rows = torch.isnan(p).all(-1)
    assert nan_rows[0, 0, 1] and nan_rows.sum() == 1 and torch.isnan(p).sum() == K
    # the additive mask adds -inf to NaN: NaN, like the reference
    p = masked_softmax(scores, _additive(keep), backend=backend)
    assert torch.isnan(p[0, 1, 2]).all() and torch.isnan(p[0, 0, 1]).all()
    assert not torch.isnan(p[0, 0, 0]).any()
    # a NaN that is the only kept score of its row is not taken for a fully masked row
    keep_one = torch.zeros(1, 1, 1, K, dtype=torch.bool, device=device)
    keep_one[..., 3] = True
    p = masked_softmax(scores, keep_one, backend=backend)
    assert torch.isnan(p[0, 0, 1]).all() and not torch.isnan(p[0, 0, 0]).any()


@pytest.mark.parametrize("device,backend", CASES)
def test_nan_padding_is_never_read(device, backend, poison_empty):
    """Scores are a window of a NaN-filled buffer: nothing outside it may be read."""
    K = 45
    base = torch.full((2, 3, 4, 64), float("nan"), device=device)
    base[..., 2:2 + K] = torch.randn(2, 3, 4, K, device=device)
    mask = _bool_mask((2, 1, 1, K), device)
    probs, dscores = _check(base.half(), mask, 1.0, backend, view=lambda t: t[..., 2:2 + K])
    assert not torch.isnan(probs).any()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("case", ["1d", "2d", "3d", "5d", "5d_unmergeable_mask", "6d"])
def test_leading_dims(device, backend, case, poison_empty):
    K = 19
    shape, mshape = {
        "1d": ((K,), (K,)),
        "2d": ((6, K), (1, K)),
        "3d": ((4, 6, K), (4, 1, K)),
        "5d": ((2, 3, 2, 4, K), (2, 1, 1, 1, K)),
        "5d_unmergeable_mask": ((2, 3, 2, 4, K), (1, 3, 1, 4, K)),
        "6d": ((2, 1, 3, 2, 3, K), (2, 1, 1, 2, 1, K)),
    }[case]
    scores = torch.randn(shape, device=device).half()
    mask = _bool_mask(mshape, device)
    probs, _ = _check(scores, mask, 0.9, backend)
    assert probs.shape == shape


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("case", ["transposed", "col_stride", "row_window", "mask_col_stride", "dy_strided"])
def test_non_contiguous(device, backend, case, poison_empty):
    B, H, Q, K = 2, 3, 5, 40
    if case == "transposed":  # (B, Q, H, K) memory viewed as (B, H, Q, K), as from a fused QK^T
        base = torch.randn(B, Q, H, K, device=device).bfloat16()
        _check(base, _bool_mask((B, 1, 1, K), device), 0.5, backend, view=lambda t: t.transpose(1, 2))
    elif case == "col_stride":  # last stride 2
        base = torch.randn(B, H, Q, 2 * K, device=device).bfloat16()
        _check(base, _bool_mask((B, 1, 1, K), device), 0.5, backend, view=lambda t: t[..., ::2])
    elif case == "row_window":  # every other query row of a wider buffer
        base = torch.randn(B, H, 2 * Q, K + 8, device=device).bfloat16()
        _check(base, _bool_mask((B, H, Q, K), device), 0.5, backend, view=lambda t: t[:, :, ::2, 3:3 + K])
    elif case == "mask_col_stride":  # the mask itself is a strided view
        scores = torch.randn(B, H, Q, K, device=device).bfloat16()
        mbase = torch.randn(B, 1, Q, 2 * K, device=device).bfloat16()
        _check(scores, mbase[..., ::2], 0.5, backend)
        _check(scores, mbase[..., :K].transpose(0, 2).transpose(0, 2), 0.5, backend)
    else:
        scores = torch.randn(B, H, Q, K, device=device).bfloat16()
        dy = torch.randn(K, Q, H, B, device=device).bfloat16().permute(3, 2, 1, 0)
        _check(scores, _bool_mask((B, 1, 1, K), device), 0.5, backend, dy=dy)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_broadcast_mask_is_not_materialized(device, backend, monkeypatch):
    """The kernel receives the caller's mask memory through stride-0 views."""
    seen = []
    mod = backends.implementation(backend, "masked_softmax")
    real = mod.forward

    def spy(scores, mask, scale):
        seen.append((scores.shape, scores.stride(), mask.shape, mask.stride(), mask.data_ptr()))
        return real(scores, mask, scale)

    monkeypatch.setattr(mod, "forward", spy)
    B, H, Q, K = 2, 3, 4, 16
    scores = torch.randn(B, H, Q, K, device=device)
    for m in (_bool_mask((B, 1, 1, K), device), _additive(_bool_mask((1, 1, Q, K), device)),
              _bool_mask((K,), device)):
        seen.clear()
        masked_softmax(scores, m, backend=backend)
        (sshape, _, mshape, mstride, ptr), = seen
        assert len(sshape) == 4 and mshape == sshape and ptr == m.data_ptr()
        assert 0 in mstride[:3]
    # 5-D scores whose mask leaves four row dims: one kernel call per leading index, same memory
    scores5 = torch.randn(2, 3, 2, 4, K, device=device)
    m5 = _bool_mask((1, 3, 1, 4, K), device)
    seen.clear()
    masked_softmax(scores5, m5, backend=backend)
    assert len(seen) == 2 and all(s[4] == m5.data_ptr() for s in seen)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_kernel_sees_unit_last_stride(device, backend, monkeypatch):
    """K == 1 views with any last stride reach the kernel with stride(3) == 1, as the contract says."""
    mod = backends.implementation(backend, "masked_softmax")
    real_f, real_b, seen = mod.forward, mod.backward, []
    monkeypatch.setattr(mod, "forward", lambda s, m, c: (seen.append(s.stride(-1)), real_f(s, m, c))[1])
    monkeypatch.setattr(mod, "backward", lambda d, p, c: (seen.append(d.stride(-1)), real_b(d, p, c))[1])
    base = torch.randn(2, 3, 1, 5, device=device, requires_grad=True)
    keep = _bool_mask((2, 1, 5, 1), device)
    p = masked_softmax(base.transpose(-1, -2), keep, backend=backend)
    p.backward(torch.randn(2, 3, 1, 5, device=device).transpose(-1, -2))
    assert seen == [1, 1]
    expect = keep.expand(2, 3, 5, 1).to(p.dtype)
    assert torch.equal(p, expect) and torch.equal(base.grad, torch.zeros_like(base))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape", [(0, 3, 8), (2, 0, 8), (4, 0)])
def test_empty(device, backend, shape):
    scores = torch.randn(shape, device=device, requires_grad=True)
    mask = torch.ones(shape[-1], dtype=torch.bool, device=device)
    p = masked_softmax(scores, mask, backend=backend)
    assert p.shape == shape
    p.sum().backward()
    assert scores.grad.shape == shape


def test_mask_gets_no_gradient():
    scores = torch.randn(2, 3, 8, requires_grad=True)
    mask = torch.zeros(2, 1, 8, requires_grad=True)
    masked_softmax(scores, mask, backend="torch").sum().backward()
    assert scores.grad is not None and mask.grad is None


def test_bad_inputs():
    s = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 1, 4\) does not broadcast to scores of "
                                         r"shape \(2, 3, 4, 5\)"):
        masked_softmax(s, torch.ones(2, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 2, 3, 4, 5\) does not broadcast to scores"):
        masked_softmax(s, torch.ones(3, 2, 3, 4, 5, dtype=torch.bool))  # would grow the scores
    with pytest.raises(TypeError, match=r"mask must have dtype in \(bool, float16, bfloat16, float32\), "
                                        r"got int64"):
        masked_softmax(s, torch.ones(5, dtype=torch.long))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor, got list"):
        masked_softmax(s, [True] * 5)
    with pytest.raises(TypeError, match="scores must have dtype in .* got int32"):
        masked_softmax(torch.ones(2, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="scores must have at least 1 dimension"):
        masked_softmax(torch.tensor(1.0))
    with pytest.raises(TypeError, match="scale must be a Python float, got Tensor"):
        masked_softmax(s, None, torch.tensor(0.5))
    with pytest.raises(ValueError, match="scores is on cpu, mask is on meta"):
        masked_softmax(s, torch.ones(5, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        masked_softmax(s, backend="tritonn")


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_rows_longer_than_the_kernel_takes(device, backend):
    max_k = getattr(backends.implementation(backend, "masked_softmax"), "MAX_K", None)
    s = torch.randn(1, (max_k or 8192) + 1, device=device)
    if max_k is None:  # a backend without a row limit takes it
        torch.testing.assert_close(masked_softmax(s, backend=backend), torch.softmax(s, -1), rtol=1e-5, atol=1e-7)
        return
    with pytest.raises(ValueError, match=f"at most {max_k} elements, got K={max_k + 1}"):
        masked_softmax(s, backend=backend)
    assert masked_softmax(s).shape == s.shape  # the automatic choice falls back instead of raising


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_opcheck(device, backend):
    s = torch.randn(2, 3, 4, 10, device=device, requires_grad=True)
    m = _bool_mask((2, 1, 1, 10), device).expand(2, 3, 4, 10)
    op = torch.ops.roberta_fast.masked_softmax_fwd.default
    torch.library.opcheck(op, (s, m, 0.5, backend))
    torch.library.opcheck(op, (s, None, 1.0, backend))
    p = masked_softmax(s.detach(), m, 0.5, backend=backend)
    torch.library.opcheck(torch.ops.roberta_fast.masked_softmax_bwd.default,
                          (torch.randn_like(p), p, 0.5, backend))


@pytest.mark.parametrize("device,backend", CASES)
def test_torch_compile_fullgraph(device, backend):
    fn = torch.compile(lambda s, m: masked_softmax(s, m, 0.25, backend=backend), fullgraph=True,
                       backend="aot_eager")
    s = torch.randn(2, 3, 4, 12, device=device, requires_grad=True)
    m = _additive(_bool_mask((2, 1, 1, 12), device))
    p = fn(s, m)
    p.backward(torch.randn_like(p))
    ref = reference.masked_softmax(s.detach(), m, 0.25)
    torch.testing.assert_close(p, ref)
    assert s.grad is not None and s.grad.shape == s.shape


@pytest.mark.parametrize("device,backend", CASES)
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    K=st.integers(1, 600),
    dtype=st.sampled_from(DTYPES),
    mask_kind=st.sampled_from(["none", "bool", "additive"]),
    bcast=st.lists(st.booleans(), min_size=4, max_size=4),
    drop=st.integers(0, 3),
    scale=st.floats(0.05, 2.0),
)
def test_property_random_shapes(device, backend, lead, K, dtype, mask_kind, bcast, drop, scale):
    """Random shapes, dtypes, scales and masks broadcast along random dims (and with fewer dims)."""
    shape = (*lead, K)
    scores = (2.0 * torch.randn(shape, device=device)).to(dtype)
    mshape = tuple(1 if b else n for b, n in zip(bcast, shape))[min(drop, len(shape) - 1):]
    mask = None
    if mask_kind != "none":
        keep = _bool_mask(mshape, device)
        mask = keep if mask_kind == "bool" else _additive(keep).to(dtype)
    _check(scores, mask, scale, backend)


def test_float_keep_mask_is_refused():
    """A 0/1 float mask is a keep-mask given as float: as an additive mask it would mask nothing."""
    s = torch.randn(2, 5)
    keep = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="float tensor of 0s and 1s.*pass a bool mask"):
        masked_softmax(s, keep)
    torch.testing.assert_close(masked_softmax(s, keep.bool()),
                               torch.softmax(s.masked_fill(keep == 0, float("-inf")), -1))
    additive = torch.zeros(2, 5)  # all zeros: masks nothing, and says so by being additive
    torch.testing.assert_close(masked_softmax(s, additive), torch.softmax(s, -1))
    masked_softmax(s, torch.tensor([0.0, -1e4, 0, 0, 1]))  # a real additive bias: accepted
