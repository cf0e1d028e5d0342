"""bias_gelu: GELU(x + bias), forward and backward, against a float64 reference.

Every backend that can run here is judged by the same tests (conftest's BACKEND_CASES): "torch"; on CPU
"triton" under the interpreter and "cuda" through the emulation (`cuda_emulated`); the `gpu` variants
run the same cases on CUDA tensors.
Rule (roberta_fast.testing): max|ours - ref64| <= 2 * max|torch in x's dtype - ref64| + floor.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND_CASES, KERNEL_CASES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roberta_fast import reference
from roberta_fast.ops import bias_gelu
from roberta_fast.testing import assert_rule

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
LAST_DIMS = [1, 7, 384, 768, 1000, 1023, 4096]
CASES = BACKEND_CASES


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _check(x, bias, approximate, backend, *, view=None, dy=None):
    """Ours, the float64 reference and plain PyTorch in x's dtype on the same inputs: compare y, dx and
    dbias. `view` is applied to the x leaf before the op (a non-contiguous view reaches the op and its
    gradient lands in the base)."""
    view = view or (lambda t: t)
    dtype = x.dtype

    def run(kind):
        xl = _leaf(x.double() if kind == "ref" else x)
        bl = _leaf(None if bias is None else (bias.double() if kind == "ref" else bias))
        xv = view(xl)
        if kind == "ours":
            y = bias_gelu(xv, bl, approximate, backend=backend)
        elif kind == "ref":
            y = reference.bias_gelu(xv, bl, approximate)
        else:  # plain PyTorch in x's dtype: the bias is cast to it, the sum rounds to it
            y = F.gelu(xv if bl is None else xv + bl.to(dtype), approximate=approximate)
        return xl, bl, y

    xo, bo, ours = run("ours")
    xr, br, ref = run("ref")
    xs, bs, same = run("same")
    assert ours.dtype == dtype and ours.shape == ref.shape
    assert ours.is_contiguous() or backend == "torch"
    assert_rule(ours, ref, same, name="y")
    g = torch.randn(ours.shape, device=ours.device).to(dtype) if dy is None else dy
    for y in (ours, ref, same):
        y.backward(g.to(y.dtype))
    assert xo.grad.dtype == dtype
    assert_rule(xo.grad, xr.grad, xs.grad, name="dx")
    if bias is not None:
        assert bo.grad.dtype == bias.dtype
        assert_rule(bo.grad, br.grad, bs.grad, name="dbias")
    return ours


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("N", LAST_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward(device, backend, dtype, N, approximate, poison_empty):
    M = 3 if N >= 1000 else 37  # several row tiles where it is cheap, odd counts everywhere
    x = (2.0 * torch.randn(M, N, device=device)).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    _check(x, bias, approximate, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("bias_kind", ["none", "float32"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_none_or_float32(device, backend, dtype, bias_kind, poison_empty):
    x = (2.0 * torch.randn(45, 200, device=device)).to(dtype)
    bias = None if bias_kind == "none" else torch.randn(200, device=device)
    _check(x, bias, "none", backend)
    _check(x, bias, "tanh", backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("lead", [(2, 3), (2, 3, 5), (1, 1, 1)], ids=["3d", "4d", "4d-ones"])
def test_leading_dims(device, backend, lead, poison_empty):
    x = torch.randn(*lead, 130, device=device).to(torch.float16)
    bias = torch.randn(130, device=device).to(torch.float16)
    y = _check(x, bias, "none", backend)
    assert y.shape == (*lead, 130)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("case", ["row_stride", "col_stride", "transposed", "dy_strided"])
def test_non_contiguous(device, backend, case, poison_empty):
    N = 96
    bias = torch.randn(N, device=device).to(torch.bfloat16)
    if case == "row_stride":  # rows every other row of a wider, taller buffer (a view reaches the kernel)
        base = torch.randn(50, N + 40, device=device).to(torch.bfloat16)
        _check(base, bias, "none", backend, view=lambda t: t[::2, 5:5 + N])
    elif case == "col_stride":  # every other column: last stride 2
        base = torch.randn(20, 2 * N, device=device).to(torch.bfloat16)
        _check(base, bias, "tanh", backend, view=lambda t: t[:, ::2])
    elif case == "transposed":  # (B, S, N) viewed from (S, B, N)
        base = torch.randn(9, 4, N, device=device).to(torch.bfloat16)
        _check(base, bias, "none", backend, view=lambda t: t.transpose(0, 1))
    else:  # the upstream gradient is itself a strided view
        x = torch.randn(33, N, device=device).to(torch.bfloat16)
        dy = torch.randn(N, 33, device=device).to(torch.bfloat16).t()
        _check(x, bias, "none", backend, dy=dy)


@pytest.mark.parametrize("device,backend", CASES)
def test_nan_padding_is_never_read(device, backend, poison_empty):
    """x is a window of a NaN-filled buffer: no NaN may leak into y or the gradients."""
    N = 70
    base = torch.full((40, 128), float("nan"), device=device)
    base[:, 3:3 + N] = torch.randn(40, N, device=device)
    base = base.to(torch.float16)
    bias = torch.randn(N, device=device).to(torch.float16)
    y = _check(base, bias, "none", backend, view=lambda t: t[:, 3:3 + N])
    assert not torch.isnan(y).any()


@pytest.mark.parametrize("device,backend", CASES)
def test_nan_propagates(device, backend):
    x = torch.randn(10, 33, device=device)
    x[3, 7] = float("nan")
    bias = torch.randn(33, device=device)
    bias[20] = float("nan")
    y = bias_gelu(x, bias, backend=backend)
    expect = torch.zeros_like(y, dtype=torch.bool)
    expect[3, 7] = True
    expect[:, 20] = True
    assert torch.equal(torch.isnan(y), expect)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64), (5, 0)])
def test_empty(device, backend, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    bias = torch.randn(shape[-1], device=device, requires_grad=True)
    y = bias_gelu(x, bias, backend=backend)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape and bias.grad.shape == (shape[-1],)
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_bad_inputs():
    x = torch.randn(4, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"bias_gelu: bias must have shape \(8,\), got \(9,\)"):
        bias_gelu(x, torch.randn(9, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"bias_gelu: bias must have shape \(8,\), got \(1, 8\)"):
        bias_gelu(x, torch.randn(1, 8, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"bias must have x's dtype \(float16\) or float32, got bfloat16"):
        bias_gelu(x, torch.randn(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"approximate must be one of \('none', 'tanh'\), got 'erf'"):
        bias_gelu(x, None, "erf")
    with pytest.raises(ValueError, match="got None"):
        bias_gelu(x, None, None)
    with pytest.raises(TypeError, match="x must have dtype in .* got int64"):
        bias_gelu(torch.zeros(4, 8, dtype=torch.long), None)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        bias_gelu([1.0, 2.0], None)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor, got float"):
        bias_gelu(x, 1.0)
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        bias_gelu(torch.tensor(1.0), None)
    with pytest.raises(ValueError, match="x is on cpu, bias is on meta"):
        bias_gelu(x, torch.zeros(8, dtype=torch.float16, device="meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        bias_gelu(x, None, backend="tritonn")


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_opcheck(device, backend):
    x = torch.randn(10, 40, device=device, requires_grad=True)
    bias = torch.randn(40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.roberta_fast.bias_gelu_fwd.default, (x, bias, "none", backend))
    torch.library.opcheck(torch.ops.roberta_fast.bias_gelu_fwd.default, (x, None, "tanh", backend))
    dy = torch.randn(10, 40, device=device)
    torch.library.opcheck(torch.ops.roberta_fast.bias_gelu_bwd.default,
                          (dy, x.detach(), bias.detach(), "tanh", backend))


@pytest.mark.parametrize("device,backend", CASES)
def test_torch_compile_fullgraph(device, backend):
    fn = torch.compile(lambda x, b: bias_gelu(x, b, "tanh", backend=backend), fullgraph=True,
                       backend="aot_eager")
    x = torch.randn(2, 5, 48, device=device, requires_grad=True)
    bias = torch.randn(48, device=device, requires_grad=True)
    y = fn(x, bias)
    y.sum().backward()
    ref = reference.bias_gelu(x.detach(), bias.detach(), "tanh")
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(bias.grad, x.grad.sum((0, 1)))


@pytest.mark.parametrize("device,backend", CASES)
def test_dbias_is_deterministic(device, backend):
    """Several row tiles per program and several programs: dbias is bit-identical across runs."""
    x = torch.randn(301, 200, device=device, requires_grad=True)
    bias = torch.randn(200, device=device, requires_grad=True)
    g = torch.randn(301, 200, device=device)
    grads = []
    for _ in range(2):
        bias.grad = None
        bias_gelu(x, bias, backend=backend).backward(g)
        grads.append(bias.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("device,backend", CASES)
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lead=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    N=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    approximate=st.sampled_from(["none", "tanh"]),
    bias_kind=st.sampled_from(["none", "same", "float32"]),
)
def test_property_random_shapes(device, backend, lead, N, dtype, approximate, bias_kind):
    x = (2.0 * torch.randn(*lead, N, device=device)).to(dtype)
    bias = {"none": None, "same": torch.randn(N, device=device).to(dtype),
            "float32": torch.randn(N, device=device)}[bias_kind]
    _check(x, bias, approximate, backend)


@pytest.mark.parametrize("M,N", [(32768, 3072), (1, 1), (7, 4096), (100000, 7), (4096, 768)])
def test_backward_grid_covers_every_row_tile(monkeypatch, M, N):
    """The GPU grid of the backward: every row tile belongs to exactly one program, no program is
    empty, about _BWD_TARGET_PROGRAMS programs at most, and at the FFN size the fp32 partial-sum
    buffer is under 1% of dx's elements."""
    from roberta_fast.kernels import bias_gelu as kernels

    monkeypatch.setattr(kernels, "INTERPRET", False)  # the GPU grid
    block_m, block_n, _ = kernels._tile(M, N)
    grid_m, grid_n, per = kernels._bwd_grid(M, N, block_m, block_n, True)
    tiles_m = -(-M // block_m)
    assert grid_m * per >= tiles_m and (grid_m - 1) * per < tiles_m
    assert grid_n * block_n >= N
    assert per == 1 or grid_m * grid_n <= kernels._BWD_TARGET_PROGRAMS + grid_n
    if (M, N) == (32768, 3072):
        assert grid_m * N < M * N // 100
