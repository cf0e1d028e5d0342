"""layer_norm: LayerNorm(x + x_bias + residual), forward and backward, against a float64 reference.

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

from roberta_fast import backends, reference
from roberta_fast.ops import BackendUnavailableError, layer_norm
from roberta_fast.testing import assert_rule

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
CASES = BACKEND_CASES
NAMES = ("x", "weight", "bias", "residual", "x_bias")


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _make(M, N, dtype, device, *, weight=True, bias=True, residual=True, x_bias=True, param_dtype=None,
          lead=None):
    """Random inputs; leading dims `lead` (default (M,)); params in param_dtype (default x's)."""
    pd = dtype if param_dtype is None else param_dtype
    shape = (*(lead if lead is not None else (M,)), N)
    x = torch.randn(shape, device=device).to(dtype)
    return {
        "x": x,
        "weight": (1.0 + 0.5 * torch.randn(N, device=device)).to(pd) if weight else None,
        "bias": (0.5 * torch.randn(N, device=device)).to(pd) if bias else None,
        "residual": torch.randn(shape, device=device).to(dtype) if residual else None,
        "x_bias": (0.5 * torch.randn(N, device=device)).to(pd) if x_bias else None,
    }


def _check(inputs, backend, *, eps=1e-5, views=None, dy=None, backward=True):
    """Run ours, the float64 reference and torch in x's dtype on the same inputs; compare y and every
    gradient. `inputs` are the leaves; `views` maps a name to a function applied before the op (so a
    non-contiguous view reaches the op and the gradient lands in its base)."""
    views = views or {}
    dtype = inputs["x"].dtype

    def run(kind):
        leaves = {k: _leaf(v if kind != "ref" or v is None else v.double()) for k, v in inputs.items()}
        a = {k: (views[k](v) if k in views and v is not None else v) for k, v in leaves.items()}
        if kind == "ours":
            y = layer_norm(a["x"], a["weight"], a["bias"], eps, residual=a["residual"], x_bias=a["x_bias"],
                           backend=backend)
        elif kind == "ref":
            y = reference.layer_norm(a["x"], a["weight"], a["bias"], eps, a["residual"], a["x_bias"])
        else:  # plain PyTorch in x's dtype: the sum rounds to x's dtype, params cast to it
            h = a["x"]
            if a["x_bias"] is not None:
                h = h + a["x_bias"].to(dtype)
            if a["residual"] is not None:
                h = h + a["residual"]
            cast = lambda p: None if p is None else p.to(dtype)
            y = F.layer_norm(h, (h.shape[-1],), cast(a["weight"]), cast(a["bias"]), eps)
        return leaves, y

    ours_l, ours = run("ours")
    ref_l, ref = run("ref")
    same_l, same = run("same")
    assert ours.dtype == dtype and ours.shape == ref.shape
    assert_rule(ours, ref, same, name="y")
    if not backward:
        return ours
    g = torch.randn(ours.shape, device=ours.device).to(dtype) if dy is None else dy
    for y in (ours, ref, same):
        y.backward(g(y) if callable(g) else g.to(y.dtype))
    for k in NAMES:
        if inputs[k] is None:
            continue
        o, r, s = ours_l[k].grad, ref_l[k].grad, same_l[k].grad
        assert o is not None, f"no gradient for {k}"
        assert o.dtype == inputs[k].dtype, f"d{k} dtype {o.dtype} != {inputs[k].dtype}"
        assert_rule(o, r, s, name=f"d{k}")
    return ours


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("M,N", [(37, 1), (37, 7), (19, 384), (9, 768), (7, 1000), (5, 1023), (3, 4096)])
def test_fused_all_inputs(device, backend, dtype, M, N, poison_empty):
    _check(_make(M, N, dtype, device), backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_n8192(device, backend, poison_empty):
    _check(_make(3, 8192, torch.bfloat16, device), backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("weight,bias,residual,x_bias",
                         [(w, b, r, xb) for w in (0, 1) for b in (0, 1) for r in (0, 1) for xb in (0, 1)])
def test_optional_inputs(device, backend, weight, bias, residual, x_bias, poison_empty):
    inp = _make(21, 100, torch.float16, device, weight=weight, bias=bias, residual=residual, x_bias=x_bias)
    _check(inp, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mix", ["all_fp32", "mixed"])
def test_float32_params_with_half_x(device, backend, dtype, mix, poison_empty):
    """Mixed-precision training: fp32 master weights with fp16/bf16 activations; gradients come back
    in each parameter's own dtype."""
    inp = _make(13, 96, dtype, device, param_dtype=torch.float32)
    if mix == "mixed":  # weight fp32, bias and x_bias in x's dtype
        inp["bias"], inp["x_bias"] = inp["bias"].to(dtype), inp["x_bias"].to(dtype)
    _check(inp, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_3d_input_and_large_offset(device, backend, poison_empty):
    inp = _make(0, 384, torch.float32, device, lead=(2, 5))
    inp["x"] = inp["x"] + 300.0  # the variance must not cancel (two-pass in registers)
    _check(inp, backend, eps=1e-3)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_rows(device, backend, lead, poison_empty):
    inp = _make(0, 768, torch.float16, device, lead=lead)
    y = _check(inp, backend)
    assert y.shape == (*lead, 768)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("kind", ["row_strided", "col_strided", "transposed_sliced"])
def test_non_contiguous_views(device, backend, kind, poison_empty):
    M, N = 11, 200
    inp = _make(M, N, torch.float16, device)
    if kind == "row_strided":  # rows of a wider tensor: the kernel reads them in place
        inp["x"] = torch.randn(M, 2 * N, device=device).half()
        inp["residual"] = torch.randn(2 * M, N, device=device).half()
        views = {"x": lambda t: t[:, N:], "residual": lambda t: t[::2]}
    elif kind == "col_strided":  # every other column
        inp["x"] = torch.randn(M, 2 * N, device=device).half()
        inp["weight"] = torch.randn(2 * N, device=device).half()
        views = {"x": lambda t: t[:, ::2], "weight": lambda t: t[::2]}
    else:  # a transposed tensor, then sliced: last stride != 1
        inp["x"] = torch.randn(N, M + 4, device=device).half()
        inp["residual"] = torch.randn(N, M, device=device).half()
        views = {"x": lambda t: t.t()[2:-2], "residual": lambda t: t.t()}
    dy = torch.randn(M, 3 * N, device=device).half()[:, N:2 * N]  # a row-strided upstream gradient
    _check(inp, backend, views=views, dy=dy)


@pytest.mark.parametrize("device,backend", CASES)
def test_expanded_upstream_gradient(device, backend):
    """y.sum().backward() hands the op an expanded dy (all strides 0)."""
    inp = _make(6, 50, torch.float32, device)
    _check(inp, backend, dy=lambda y: torch.ones((), device=y.device, dtype=y.dtype).expand(y.shape))


@pytest.mark.parametrize("device,backend", CASES)
def test_nan_row_stays_in_its_row(device, backend, poison_empty):
    inp = _make(9, 130, torch.float16, device)
    inp["x"][4, 17] = float("nan")
    y = _check(inp, backend)
    assert torch.isnan(y[4]).all()
    assert torch.isfinite(torch.cat([y[:4], y[5:]])).all()


# ----------------------------------------------------------------------------- gradients, determinism


@pytest.mark.parametrize("device,backend", CASES)
def test_residual_gradient_is_dx_and_deterministic(device, backend):
    inp = _make(50, 300, torch.float16, device)
    grads = []
    for _ in range(2):
        leaves = {k: _leaf(v) for k, v in inp.items()}
        y = layer_norm(leaves["x"], leaves["weight"], leaves["bias"], residual=leaves["residual"],
                       x_bias=leaves["x_bias"], backend=backend)
        y.backward(torch.ones_like(y))
        grads.append({k: v.grad for k, v in leaves.items()})
        assert torch.equal(leaves["x"].grad, leaves["residual"].grad)
    for k in NAMES:  # bit-identical across runs: fixed-order partial sums
        assert torch.equal(grads[0][k], grads[1][k]), k


@pytest.mark.parametrize("device,backend", CASES)
def test_no_grad_needed(device, backend):
    inp = _make(4, 64, torch.bfloat16, device)
    with torch.no_grad():
        y = layer_norm(inp["x"], inp["weight"], inp["bias"], residual=inp["residual"], backend=backend)
    assert not y.requires_grad and y.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- property test


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.integers(0, 9), N=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       flags=st.tuples(*[st.booleans()] * 5), seed=st.integers(0, 2**16))
def test_property_random_shapes(device, backend, M, N, dtype, flags, seed):
    torch.manual_seed(seed)
    w, b, r, xb, p32 = flags
    inp = _make(M, N, dtype, device, weight=w, bias=b, residual=r, x_bias=xb,
                param_dtype=torch.float32 if p32 else None)
    _check(inp, backend)


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_opcheck(device, backend):
    inp = {k: _leaf(v) for k, v in _make(5, 33, torch.float16, device, param_dtype=torch.float32).items()}
    args = (inp["x"], inp["weight"], inp["bias"], 1e-5, inp["residual"], inp["x_bias"], backend)
    torch.library.opcheck(torch.ops.roberta_fast.layer_norm_fwd.default, args)
    _, mean, rstd = torch.ops.roberta_fast.layer_norm_fwd(*[a.detach() if torch.is_tensor(a) else a for a in args])
    dy = torch.randn(5, 33, device=device).half()
    bargs = (dy, inp["x"].detach(), inp["weight"].detach(), None, mean, rstd, None, inp["x_bias"].detach(),
             backend)
    torch.library.opcheck(torch.ops.roberta_fast.layer_norm_bwd.default, bargs)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    inp = _make(2, 40, torch.float32, device, lead=(2, 3))

    def f(x, w, b, r, xb):
        return layer_norm(x, w, b, 1e-5, residual=r, x_bias=xb, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_l = {k: _leaf(v) for k, v in inp.items()}
    comp_l = {k: _leaf(v) for k, v in inp.items()}
    ye = f(*(eager_l[k] for k in ("x", "weight", "bias", "residual", "x_bias")))
    yc = compiled(*(comp_l[k] for k in ("x", "weight", "bias", "residual", "x_bias")))
    torch.testing.assert_close(yc, ye, rtol=0, atol=0)
    ye.sum().backward()
    yc.sum().backward()
    for k in NAMES:
        torch.testing.assert_close(comp_l[k].grad, eager_l[k].grad, rtol=0, atol=0)


# ----------------------------------------------------------------------------- bad input


def _bad(match, exc=ValueError, **over):
    a = _make(4, 16, torch.float16, "cpu")
    a.update(over)
    with pytest.raises(exc, match=match):
        layer_norm(a["x"], a["weight"], a["bias"], residual=a["residual"], x_bias=a["x_bias"],
                   backend=over.pop("backend", "torch"))


def test_bad_weight_shape():
    _bad(r"weight must have shape \(16,\), got \(15,\)", weight=torch.ones(15).half())


def test_bad_x_bias_shape():
    _bad(r"x_bias must have shape \(16,\), got \(1, 16\)", x_bias=torch.ones(1, 16).half())


def test_bad_residual_shape():
    _bad(r"residual must have shape \(4, 16\), got \(3, 16\)", residual=torch.ones(3, 16).half())


def test_bad_residual_dtype():
    _bad(r"residual must have x's dtype \(float16\), got float32", TypeError, residual=torch.ones(4, 16))


def test_bad_param_dtype_mix():
    _bad(r"weight must have x's dtype \(float16\) or float32, got bfloat16", TypeError,
         weight=torch.ones(16, dtype=torch.bfloat16))


def test_bad_x_dtype_and_type():
    _bad(r"x must have dtype in .* got int64", TypeError, x=torch.ones(4, 16, dtype=torch.long))
    _bad(r"bias must be a torch.Tensor, got list", TypeError, bias=[0.0] * 16)


def test_bad_device_mix():
    _bad(r"one device; x is on cpu, weight is on meta", weight=torch.ones(16, device="meta").half())


def test_bad_eps():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
        layer_norm(x, None, None, -1.0)
    with pytest.raises(TypeError, match="eps must be a float"):
        layer_norm(x, None, None, "1e-5")


def test_unknown_backend():
    _bad(r"backend must be one of .* got 'trition'", backend="trition")


def test_cuda_backend_missing(monkeypatch):
    monkeypatch.setattr(backends, "cuda_built", lambda: False)
    monkeypatch.setattr(backends, "emulation_built", lambda: False)
    monkeypatch.setenv("ROBERTA_FAST_CUDA_EMULATE", "0")
    _bad("ROBERTA_FAST_CUDA=1 pip install", BackendUnavailableError, backend="cuda")
    monkeypatch.setenv("ROBERTA_FAST_CUDA_EMULATE", "1")  # CPU tensors then need the emulated build
    _bad(r"roberta_fast._C_emu, which was not built: reinstall", BackendUnavailableError, backend="cuda")


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_rows_wider_than_8192(device, backend, poison_empty):
    """A backend without a row limit (no MAX_N) takes very wide rows, every input at once."""
    if getattr(backends.implementation(backend, "layer_norm"), "MAX_N", None) is not None:
        pytest.skip(f"backend {backend!r} has a row limit (test_kernel_backend_rejects_too_wide_rows)")
    _check(_make(2, 13000, torch.float16, device, param_dtype=torch.float32), backend)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_kernel_backend_rejects_too_wide_rows(device, backend):
    max_n = getattr(backends.implementation(backend, "layer_norm"), "MAX_N", None)
    if max_n is None:
        pytest.skip(f"backend {backend!r} takes rows of any width")
    x = torch.randn(2, max_n + 1, device=device)
    with pytest.raises(ValueError, match=f"N <= {max_n}"):
        layer_norm(x, None, None, backend=backend)
    # the automatic choice falls back instead of raising
    assert layer_norm(x, None, None).shape == x.shape
