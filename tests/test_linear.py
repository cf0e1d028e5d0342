"""linear: Y = act(X W^T + b) [+ residual], forward and backward, against a float64 reference.

Backends judged here: "torch", "triton" (the interpreter on CPU) and "cublaslt" (torch._addmm_activation; on
CPU the same tanh-GELU semantics computed explicitly); the `gpu` variants run the same cases on CUDA tensors.
Rule (roberta_fast.testing): max|ours - ref64| <= 2 * max|torch in x's dtype - ref64| + floor, for y, dx, dw,
db and dresidual. Interpreted sizes stay small (M = 37, K = 72, N = 100): the interpreter runs each GEMM in
Python.
"""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND_CASES, HAS_CUDA

from roberta_fast import backends
from roberta_fast.ops import linear
from roberta_fast.testing import assert_rule

lin = importlib.import_module("roberta_fast.ops.linear")  # the module (ops.linear is the function)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ACTS = [None, "gelu", "gelu_tanh"]
_APPROX = {"gelu": "none", "gelu_tanh": "tanh"}


def _cases():
    """(device, backend) params: conftest's torch / triton cases (not "cuda": no kernel for this op) and
    cublaslt on CPU and (marked gpu) CUDA."""
    out = [p for p in BACKEND_CASES if p.values[1] != "cuda"]
    out.append(pytest.param("cpu", "cublaslt", id="cpu-cublaslt"))
    out.append(pytest.param("cuda", "cublaslt", marks=[pytest.mark.gpu], id="cuda-cublaslt"))
    return out


CASES = _cases()


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _plain(x, w, b, activation, r, dtype):
    """Plain PyTorch in x's dtype (parameters cast to it): the yardstick, and in float64 the reference."""
    y = F.linear(x, w.to(dtype), None if b is None else b.to(dtype))
    if activation is not None:
        y = F.gelu(y, approximate=_APPROX[activation])
    return y if r is None else y + r


def _check(x, w, b, activation, r, backend, *, view=None, ref_activation=None):
    """Ours, the float64 reference and plain PyTorch in x's dtype on the same inputs: y and every gradient.
    ref_activation: the activation the reference and yardstick use (cublaslt computes tanh for "gelu" when
    opted in)."""
    view = view or (lambda t: t)
    dtype = x.dtype
    ref_act = activation if ref_activation is None else ref_activation

    def run(kind):
        cast = (lambda t: None if t is None else t.double()) if kind == "ref" else (lambda t: t)
        leaves = [_leaf(cast(t)) for t in (x, w, b, r)]
        xl, wl, bl, rl = leaves
        if kind == "ours":
            y = linear(view(xl), wl, bl, activation=activation, residual=rl, backend=backend)
        else:
            y = _plain(view(xl), wl, bl, ref_act, rl, torch.float64 if kind == "ref" else dtype)
        return leaves, y

    ours_l, ours = run("ours")
    ref_l, ref = run("ref")
    same_l, same = run("same")
    assert ours.dtype == dtype and ours.shape == ref.shape
    assert_rule(ours, ref, same, name="y")
    g = torch.randn(ours.shape, device=ours.device).to(dtype)
    for y in (ours, ref, same):
        y.backward(g.to(y.dtype))
    for name, o, rf, s in zip(("dx", "dw", "db", "dresidual"), ours_l, ref_l, same_l):
        if o is None:
            continue
        assert o.grad is not None and o.grad.dtype == o.dtype, name
        assert_rule(o.grad, rf.grad, s.grad, name=name)
    return ours


def _inputs(device, dtype, M=37, K=72, N=100, *, bias=True, residual=True, lead=None, wdtype=None):
    lead = (M,) if lead is None else lead
    x = torch.randn(*lead, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K ** 0.5).to(wdtype or dtype)
    b = torch.randn(N, device=device).to(wdtype or dtype) if bias else None
    r = torch.randn(*lead, N, device=device).to(dtype) if residual else None
    return x, w, b, r


def _skip(backend, activation):
    if backend == "cublaslt" and activation == "gelu":
        pytest.skip("cublaslt takes exact-erf GELU only with the opt-in (test_cublaslt_erf_opt_in)")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("activation", ACTS, ids=["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extras", ["bias+residual", "plain"])
def test_forward_backward(device, backend, dtype, activation, extras, poison_empty):
    _skip(backend, activation)
    full = extras == "bias+residual"
    x, w, b, r = _inputs(device, dtype, bias=full, residual=full)
    _check(x, w, b, activation, r, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("activation", ["gelu_tanh", None], ids=["gelu_tanh", "none"])
def test_3d_input_float32_params(device, backend, activation, poison_empty):
    """(B, S, K) input, parameters in float32 (mixed precision): products in x's dtype, gradients in the
    parameters' dtypes."""
    x, w, b, r = _inputs(device, torch.bfloat16, lead=(3, 5), K=40, N=24, wdtype=torch.float32)
    y = _check(x, w, b, activation, r, backend)
    assert y.shape == (3, 5, 24)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("case", ["col_stride", "transposed"])
def test_non_contiguous(device, backend, case, poison_empty):
    _, w, b, r = _inputs(device, torch.float16, M=30, K=48, N=40)
    if case == "col_stride":  # x's last stride is 2
        base = torch.randn(30, 96, device=device).to(torch.float16)
        _check(base, w, b, "gelu_tanh", r, backend, view=lambda t: t[:, ::2])
    else:  # (B, S, K) viewed from (S, B, K)
        base = torch.randn(6, 5, 48, device=device).to(torch.float16)
        _check(base, w, b, "gelu_tanh", r.view(5, 6, 40), backend, view=lambda t: t.transpose(0, 1))


@pytest.mark.parametrize("device,backend", CASES)
def test_nan_padding_is_never_read(device, backend, poison_empty):
    """x is a window of a NaN-filled buffer: no NaN may leak into y."""
    base = torch.full((20, 64), float("nan"), device=device)
    base[:, 5:5 + 33] = torch.randn(20, 33, device=device)
    w = torch.randn(17, 33, device=device)
    with torch.no_grad():
        y = linear(base[:, 5:5 + 33], w, torch.randn(17, device=device), activation="gelu_tanh", backend=backend)
    assert not torch.isnan(y).any()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (5, 0)], ids=["M0", "3d-M0", "K0"])
def test_empty(device, backend, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.randn(8, shape[-1], device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    y = linear(x, w, b, activation="gelu_tanh", backend=backend)
    assert y.shape == (*shape[:-1], 8)
    y.sum().backward()
    assert x.grad.shape == shape and w.grad.shape == w.shape and b.grad.shape == (8,)
    if x.numel() == 0 and shape[-1] != 0:
        assert torch.equal(b.grad, torch.zeros_like(b))


def test_bad_inputs():
    x = torch.randn(4, 8, dtype=torch.float16)
    w = torch.randn(6, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"linear: weight must have shape \(out_features, 8\) .* got \(6, 7\)"):
        linear(x, torch.randn(6, 7, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"linear: weight must be 2-D"):
        linear(x, torch.randn(8, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"linear: weight must have x's dtype \(float16\) or float32, got bfloat16"):
        linear(x, w.bfloat16())
    with pytest.raises(ValueError, match=r"linear: bias must have shape \(6,\), got \(8,\)"):
        linear(x, w, torch.randn(8, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"linear: bias must have x's dtype \(float16\) or float32, got bfloat16"):
        linear(x, w, torch.randn(6, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"linear: activation must be one of \(None, 'gelu', 'gelu_tanh'\), "
                                         r"got 'relu'"):
        linear(x, w, activation="relu")
    with pytest.raises(ValueError, match=r"linear: residual must have shape \(4, 6\), got \(4, 8\)"):
        linear(x, w, residual=torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"linear: residual must have x's dtype \(float16\), got float32"):
        linear(x, w, residual=torch.randn(4, 6))
    with pytest.raises(TypeError, match="linear: x must have dtype in .* got int64"):
        linear(torch.zeros(4, 8, dtype=torch.long), w)
    with pytest.raises(TypeError, match="linear: weight must be a torch.Tensor, got list"):
        linear(x, [1.0])
    with pytest.raises(ValueError, match="x is on cpu, weight is on meta"):
        linear(x, torch.zeros(6, 8, dtype=torch.float16, device="meta"))
    with pytest.raises(ValueError, match="x is on cpu, residual is on meta"):
        linear(x, w, residual=torch.zeros(4, 6, dtype=torch.float16, device="meta"))
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'triton', 'cuda', 'cublaslt'\)"):
        linear(x, w, backend="cublas")


def test_cuda_backend_says_it_has_no_kernel():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises((ValueError, backends.BackendUnavailableError), match="backend 'cuda'"):
        linear(x, w, backend="cuda")
    if backends.emulate_mode() and backends.emulation_built():
        with pytest.raises(ValueError, match="backend 'cuda' has no linear kernel"):
            linear(x, w, backend="cuda")


def test_automatic_choice_stays_torch_until_tuned(monkeypatch):
    """backend=None: "torch" on CPU tensors, and on GPUs of every capability while nothing tuned covers the
    call (DEFAULT_ORDERS' linear row), even where triton and cublaslt could run."""
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert backends.resolve("linear", None, x.device, unsupported=lambda b: None) == "torch"
    for cap in ((8, 0), (8, 6), (9, 0), (12, 0)):
        monkeypatch.setitem(backends._CAPABILITY, 0, cap)
        assert backends.default_order("linear", torch.device("cuda", 0)) == ("torch",)
    monkeypatch.setattr(backends, "can_run", lambda b, d: True)
    assert backends.resolve("linear", None, torch.device("cuda", 0), unsupported=lambda b: None) == "torch"
    y = linear(x, w, activation="gelu")
    torch.testing.assert_close(y, F.gelu(F.linear(x, w)))


def test_cublaslt_semantics_on_cpu():
    """aten's CPU _addmm_activation applies exact-erf GELU (CUDA's cuBLASLt epilogue is tanh): the backend
    computes the tanh GELU itself on CPU, so its output is the tanh formula on every device."""
    x, w, b = torch.randn(9, 16), torch.randn(12, 16), torch.randn(12)
    pre = torch.addmm(b, x, w.t())
    torch.testing.assert_close(torch._addmm_activation(b, x, w.t(), use_gelu=True), F.gelu(pre))  # erf on CPU
    with torch.no_grad():
        y = linear(x, w, b, activation="gelu_tanh", backend="cublaslt")
    torch.testing.assert_close(y, F.gelu(pre, approximate="tanh"))


def test_cublaslt_erf_opt_in(monkeypatch):
    """activation="gelu" on cublaslt: refused without the opt-in, with it the tanh result (within 1 fp16 ulp,
    the difference documented in ops/linear.py)."""
    x, w, b, r = _inputs("cpu", torch.float16, M=20, K=32, N=24)
    with pytest.raises(ValueError, match="ROBERTA_FAST_LINEAR_CUBLASLT_ERF=1"):
        linear(x, w, b, activation="gelu", backend="cublaslt")
    monkeypatch.setenv(lin.CUBLASLT_ERF_ENV, "1")
    backends.reset()
    try:
        y = _check(x, w, b, "gelu", r, "cublaslt", ref_activation="gelu_tanh")
        erf = _plain(x.double(), w.double(), b.double(), "gelu", r.double(), torch.float64)
        assert (y.double() - erf).abs().max().item() <= 2 * 1.95e-3
    finally:
        monkeypatch.delenv(lin.CUBLASLT_ERF_ENV)
        backends.reset()


def test_tanh_vs_erf_difference_as_documented():
    """The figures in ops/linear.py's docstring: 4.7e-4 in float64, at most one fp16 ulp (1.95e-3) after
    rounding, over a dense grid and a wide normal sample."""
    t = torch.linspace(-8, 8, 200001, dtype=torch.float64)
    d64 = (F.gelu(t) - F.gelu(t, approximate="tanh")).abs()
    assert 4.6e-4 < d64.max().item() < 4.8e-4 and abs(abs(t[d64.argmax()].item()) - 2.70) < 0.01
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(1 << 16, generator=g, dtype=torch.float64) * 1.5).half().float()
    d16 = (F.gelu(h).half().double() - F.gelu(h, approximate="tanh").half().double()).abs()
    assert d16.max().item() <= 1.953125e-3


@pytest.mark.parametrize("device,backend", [p for p in CASES if p.values[1] != "torch"])
def test_opcheck(device, backend):
    x = torch.randn(10, 24, device=device, requires_grad=True)
    w = torch.randn(16, 24, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    r = torch.randn(10, 16, device=device, requires_grad=True)
    op = torch.ops.roberta_fast.linear_fwd.default
    torch.library.opcheck(op, (x, w, b, r, "gelu_tanh", True, backend))
    torch.library.opcheck(op, (x, w, None, None, "none", False, backend))
    pre = torch.randn(10, 16, device=device)
    for needs in ((True, True, True), (False, True, False)):  # every gradient; a frozen-input dW only
        torch.library.opcheck(torch.ops.roberta_fast.linear_bwd.default,
                              (torch.randn(10, 16, device=device), x.detach(), w.detach(), b.detach(), pre,
                               "gelu_tanh", backend, *needs))


@pytest.mark.parametrize("device,backend", CASES)
def test_torch_compile_fullgraph(device, backend):
    fn = torch.compile(lambda x, w, b, r: linear(x, w, b, activation="gelu_tanh", residual=r, backend=backend),
                       fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 24, device=device, requires_grad=True)
    w = torch.randn(16, 24, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    r = torch.randn(2, 5, 16, device=device)
    y = fn(x, w, b, r)
    y.sum().backward()
    ref = F.gelu(F.linear(x.detach(), w.detach(), b.detach()), approximate="tanh") + r
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert b.grad.shape == (16,) and w.grad.shape == (16, 24)


@pytest.mark.skipif(HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's config")
def test_config_buckets():
    """The GPU config per shape bucket: FFN1 at >= 2k tokens takes the large tile, fp32 its own."""
    from roberta_fast.kernels import linear as kernels

    assert kernels.bucket(8192, 3072, torch.float16) == "large"
    assert kernels.bucket(8192, 768, torch.bfloat16) == "medium"
    assert kernels.bucket(128, 3072, torch.float16) == "small"
    assert kernels.bucket(8192, 3072, torch.float32) == "fp32"
    for name, (bm, bn, bk, _, _, stages) in kernels.CONFIGS.items():
        size = 4 if name == "fp32" else 2
        assert (bm + bn) * bk * size * stages <= 163 * 1024  # sm_80's shared memory per block


@pytest.mark.skipif(HAS_CUDA, reason="the CPU smoke run of the tuner")
def test_tuner_verifies_and_times_the_three_backends(monkeypatch):
    """The tuner's linear cases: every backend verified against the oracle (the rule), then timed (a fake
    timer here); cublaslt is "n/a" for exact-erf GELU without the opt-in; the bucket is (N, K, dtype)."""
    from roberta_fast import tuning

    times = {"torch": 3.0, "triton": 2.0, "cublaslt": 1.0}
    shapes = [("linear", {"tokens": 9, "in": 24, "out": 40, "activation": "gelu_tanh", "residual": False}),
              ("linear", {"tokens": 9, "in": 24, "out": 40, "activation": "gelu", "residual": True})]
    res = tuning.tune(ops=["linear"], shapes=shapes, dtypes=["fp16"], device="cpu", modes=("fwd", "train"),
                      save=False, timer=lambda fn, backend, **kw: (fn(), times[backend])[1])
    assert len(res.entries) == 4
    for e in res.entries:
        assert e["bucket"] == {"fixed": [40, 24, "float16"], "tokens_log2": 3}
        want = ["cublaslt", "triton", "torch"] if e["shape"]["activation"] == "gelu_tanh" else ["triton", "torch"]
        if not backends.can_run("triton", torch.device("cpu")):
            want.remove("triton")
        assert e["order"] == want, (e["order"], e["status"])
        if e["shape"]["activation"] == "gelu":
            assert e["status"]["cublaslt"].startswith("n/a") and "CUBLASLT_ERF" in e["status"]["cublaslt"]
    assert "cublaslt" in res.format_table()


def test_a_tuned_order_wins_over_the_default(monkeypatch):
    from roberta_fast import tuned

    dev = torch.device("cuda", 0)
    monkeypatch.setattr(backends, "can_run", lambda b, d: True)
    monkeypatch.setattr(tuned, "lookup", lambda op, key, device, mode: ("cublaslt", "torch"))
    assert backends.resolve("linear", None, dev, unsupported=lambda b: None, tune_key=(8192, 3072, 768, "float16"),
                            mode="fwd") == "cublaslt"
    assert tuned.bucket("linear", (8192, 3072, 768, "float16")) == ((3072, 768, "float16"), 13)


@pytest.mark.skipif(not backends.interpret_mode(), reason="the Triton backend on CPU needs TRITON_INTERPRET=1")
def test_bound_inference_equals_the_op_and_binds_only_inference():
    """bind_inference (the model's inference path, bound once per forward) gives the op's result bit for bit, and
    None wherever the op's own path must run (autograd, the torch backend, non-contiguous or mixed-dtype input)."""
    from roberta_fast.ops.linear import bind_inference

    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=g) for s in ((37, 24), (40, 24), (40,)))
    r = torch.randn(37, 40, generator=g)
    with torch.inference_mode():
        for act, res in ((None, r), ("gelu", None), ("gelu_tanh", r)):
            fn = bind_inference(x, w, b, act, res, "triton")
            assert fn is not None
            assert torch.equal(fn(x, w, b, res), linear(x, w, b, activation=act, residual=res, backend="triton"))
        assert bind_inference(x, w, b, "gelu", None, "torch") is None  # the torch backend: the op itself
        assert bind_inference(x, w, b, "gelu", None, None) is None  # the automatic choice on CPU is torch
        assert bind_inference(x.t().contiguous().t(), w, b, None, None, "triton") is None  # not contiguous rows
        assert bind_inference(x, w.double(), b, None, None, "triton") is None  # parameters of another dtype
        assert bind_inference(x, w, b, None, r[:, :8], "triton") is None  # residual of the wrong shape
    with torch.enable_grad():
        assert bind_inference(x, w.requires_grad_(), b, None, None, "triton") is None  # autograd records


# ----------------------------------------------------------------------------- the Triton GEMM's tuned configs


def test_config_space_is_well_formed_and_pruned():
    """Per tuned bucket (N, K, dtype) and tokens: the three GEMMs' classes, each a short list of distinct
    6-int configs from the file's candidates, the GEMM's default first, pruned by the GPU's shared memory, by the
    problem's size and by the wave rule; with M unknown (installing a table) every default the class can have."""
    from roberta_fast.kernels import linear as k

    for fixed in ((3072, 768, "float16"), (768, 3072, "bfloat16"), (1024, 1024, "float16"), (100, 72, "float32")):
        N, K, dt = fixed
        half = dt != "float32"
        pool, elem = (k.CANDIDATES_HALF, 2) if half else (k.CANDIDATES_FP32, 4)
        tdt = torch.float16 if half else torch.float32
        tma = half and k.HAS_TMA
        for tok in (3, 7, 11, 14, None):
            for cc in ((8, 0), (9, 0), None):
                space = k.config_space("linear", fixed, True, tokens_log2=tok, capability=cc)
                assert tuple(space) == ("fwd", "bwd_dx", "bwd_dw")
                assert k.config_space("linear", fixed, False, tokens_log2=tok, capability=cc) == {"fwd": space["fwd"]}
                arch = 80 if cc == (8, 0) else 90 if cc == (9, 0) else None
                limit = k.SMEM_LIMIT[arch or 90]
                M = None if tok is None else 1 << tok
                for cls, cands in space.items():
                    rows, cols, red = ({"M": M, "N": N, "K": K}[d] for d in k.CLASSES[cls])
                    assert 1 <= len(cands) <= 8 + (cls == "fwd") and len(set(cands)) == len(cands), (cls, cands)
                    assert all(all(isinstance(v, int) for v in c) for c in cands)
                    assert all(c in pool for c in cands if c != k.TMA_CANDIDATE)  # 6 ints each
                    has_tma = k.TMA_CANDIDATE in cands  # the forward's TMA variant: sm_90 (or any) only
                    assert has_tma == (tma and cls == "fwd" and cc != (8, 0)
                                       and k._keep(k.TMA_CANDIDATE, rows, cols, red, elem, arch)), (cls, tok, cc)
                    if rows is not None:
                        assert cands[0] == k.CONFIGS[k.bucket(rows, cols, tdt)]  # the launch's default first
                    else:
                        assert {k.CONFIGS[k.bucket(m, cols, tdt)] for m in (1, 600, 4096)} <= set(cands)
                    for c in cands[1:]:
                        assert k.smem_bytes(c, elem, arch) <= limit
                        assert c[1] <= max(16, 1 << (cols - 1).bit_length())
                        if rows is not None:
                            assert c[0] <= max(16, 1 << (rows - 1).bit_length())
    # what pruning keeps at roberta-base's FFN1 (16k tokens) and dW (3072 x 768 outputs: under a wave of big tiles)
    ffn1 = k.config_space("linear", (3072, 768, "float16"), True, tokens_log2=14, capability=(9, 0))
    assert len(ffn1["fwd"]) == 8 + k.HAS_TMA and (128, 256, 64, 8, 8, 4) in ffn1["fwd"]
    # shared memory as the compile check measured it: the 4-stage 128 x 256 tile takes 192 KB on sm_90 (fits 227),
    # 144 KB on sm_80 (stages - 1 buffers; fits 163); a 5-stage one would fit neither
    big = (128, 256, 64, 8, 8, 4)
    assert k.smem_bytes(big, 2, 90) == 196608 and k.smem_bytes(big, 2, 80) == 147456
    assert k.smem_bytes(k.CONFIGS["large"], 2, 90) == 147456 and k.smem_bytes(k.CONFIGS["large"], 2, 80) == 98304
    sm80 = k.config_space("linear", (3072, 768, "float16"), True, tokens_log2=14, capability=(8, 0))["fwd"]
    assert (128, 256, 64, 8, 8, 4) in sm80 and len(sm80) == 8 and k.TMA_CANDIDATE not in sm80
    assert not any(k._keep((*big[:5], 5), 16384, 3072, 768, 2, cc) for cc in (80, 90))
    assert not {(128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3)} & set(ffn1["bwd_dw"])
    assert k.config_space("linear", (40, 24, "float16"), True, tokens_log2=3) == {
        c: (k.CONFIGS["small"],) for c in ("fwd", "bwd_dx", "bwd_dw")}  # a tiny problem: the default only
    for name, cfg in k.CONFIGS.items():  # the defaults fit both GPUs
        assert k.smem_bytes(cfg, 4 if name == "fp32" else 2, 80) <= k.smem_bytes(cfg, 4 if name == "fp32" else 2) \
            <= k.SMEM_LIMIT[80]


def test_every_candidate_is_in_the_compile_check():
    """Each config a tuning can pick is an ahead-of-time spec: the CI list holds the defaults of FFN1 / the output
    projections and the TMA variant (sm_90 only, aligned only); `every_candidate` adds every other candidate with
    FFN1's epilogue and the backward GEMMs' layouts."""
    from roberta_fast.kernels import linear as k

    def key(spec):
        c = spec.constexprs
        return (spec.fn, c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["GROUP_M"], spec.num_warps, spec.num_stages)

    gemm = (k._linear_kernel, k._linear_tma_kernel)
    ci = [s for s in k.aot_specs() if s.fn in gemm]
    every = {key(s) for s in k.aot_specs(every_candidate=True) if s.fn in gemm}
    assert {key(s) for s in ci} <= every and len(ci) == 2 + k.HAS_TMA
    for fixed in ((3072, 768, "float16"), (768, 3072, "float16"), (1024, 4096, "bfloat16"), (768, 768, "float32")):
        for cls, cands in k.config_space("linear", fixed, True).items():
            for c in cands:
                fn = k._linear_tma_kernel if c == k.TMA_CANDIDATE else k._linear_kernel
                assert (fn, *c[:6]) in every, (cls, c)
    if k.HAS_TMA:
        (tma,) = [s for s in ci if s.fn is k._linear_tma_kernel]
        assert tma.min_cc == 90 and tma.aligned_only and tma.uses_mma


@pytest.mark.skipif(not backends.interpret_mode(), reason="the Triton backend on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_tma_variant(monkeypatch, dtype, poison_empty):
    """The forward's TMA candidate (forced as a tuning would install it): the TMA kernel runs where its rules hold
    (K a multiple of 8, contiguous aligned rows) and is right by the rule, out-of-range rows and columns of the
    128 x 256 tile included; elsewhere (K = 36) the plain kernel runs the same tile."""
    from roberta_fast.kernels import linear as k

    if not k.HAS_TMA:
        pytest.skip("this Triton has no tl.make_tensor_descriptor")
    launches = []
    for name in ("_LINEAR", "_LINEAR_TMA"):
        real = getattr(k, name)
        monkeypatch.setattr(k, name, lambda key, grid, args, meta, real=real, name=name: (
            launches.append(name), real(key, grid, args, meta)))
    g = torch.Generator().manual_seed(7)
    for K, want in ((72, "_LINEAR_TMA"), (36, "_LINEAR")):
        x, w, b, r = (torch.randn(*s, generator=g).to(dtype) for s in ((37, K), (100, K), (100,), (37, 100)))
        w = w * K ** -0.5
        with k.forced_configs({"fwd": k.TMA_CANDIDATE}), torch.no_grad():
            y = linear(x, w, b, activation="gelu", residual=r, backend="triton")
        ref = _plain(x.double(), w.double(), b.double(), "gelu", r.double(), torch.float64)
        assert_rule(y, ref, _plain(x, w, b, "gelu", r, dtype), name=f"y K={K}")
        assert launches == [want], launches
        launches.clear()


class _GemmSpy:
    """Stands in for kernels/linear's Launcher and records each GEMM launch: (rows, cols, config)."""

    def __init__(self, real):
        self.real, self.log = real, []

    def __call__(self, key, grid, args, meta):
        self.log.append((args[6], args[7], tuple(meta[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M",
                                                                   "num_warps", "num_stages"))))
        return self.real(key, grid, args, meta)


@pytest.mark.skipif(not backends.interpret_mode(), reason="the Triton backend on CPU needs TRITON_INTERPRET=1")
def test_a_tuned_config_reaches_the_three_gemms(monkeypatch):
    """Installed for a device and bucket, each class's config is what its GEMM launches with (forward, dX, dW),
    the results stay right; another bucket keeps the defaults; the tuner's forced configs win over the table;
    forgetting the table restores the defaults."""
    from roberta_fast.kernels import linear as k

    from roberta_fast import tuned

    spy = _GemmSpy(k._LINEAR)
    monkeypatch.setattr(k, "_LINEAR", spy)
    g = torch.Generator().manual_seed(5)
    M, K, N = 7, 72, 100  # K and N large enough for the candidates (a tile past the problem's size is pruned)
    x, w, b = (torch.randn(*s, generator=g) for s in ((M, K), (N, K), (N,)))
    dy = torch.randn(M, N, generator=g)

    def run(rows):
        xl, wl, bl = (_leaf(t) for t in (x[:rows], w, b))
        y = linear(xl, wl, bl, activation="gelu", backend="triton")
        y.backward(dy[:rows])
        ref = [_leaf(t) for t in (x[:rows], w, b)]
        yr = F.gelu(F.linear(*ref))
        yr.backward(dy[:rows])
        for o, r in zip((y, xl.grad, wl.grad, bl.grad), (yr, *(t.grad for t in ref))):
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
        got = {(r, c): cfg for r, c, cfg in spy.log}
        spy.log.clear()
        return got

    fixed, tok = tuned.bucket("linear", (M, N, K, "float32"))
    cfgs = {"fwd": [128, 64, 32, 8, 4, 3], "bwd_dx": [64, 128, 32, 8, 4, 3], "bwd_dw": [128, 128, 32, 8, 8, 3]}
    default = {(M, N): k.CONFIG_INTERPRET, (M, K): k.CONFIG_INTERPRET, (N, K): k.CONFIG_INTERPRET}
    assert run(M) == default
    try:
        k.install_tuned(torch.device("cpu"), {("linear", *fixed, tok): cfgs}, tuned.bucket)
        assert k._TUNED.active
        assert run(M) == {(M, N): (128, 64, 32, 8, 4, 3), (M, K): (64, 128, 32, 8, 4, 3),
                          (N, K): (128, 128, 32, 8, 8, 3)}
        assert run(2) == {(2, N): k.CONFIG_INTERPRET, (2, K): k.CONFIG_INTERPRET, (N, K): k.CONFIG_INTERPRET}
        with k.forced_configs({"fwd": (64, 64, 32, 8, 4, 3)}):  # a tuner trial: the classes it names, else default
            assert run(M) == {**default, (M, N): (64, 64, 32, 8, 4, 3)}
    finally:
        k.install_tuned(None, None)
    assert not k._TUNED.active and run(M) == default


@pytest.mark.skipif(not backends.interpret_mode(), reason="the Triton backend on CPU needs TRITON_INTERPRET=1")
def test_install_drops_a_config_outside_the_space():
    from roberta_fast.kernels import linear as k

    from roberta_fast import tuned

    fixed, tok = tuned.bucket("linear", (16384, 3072, 768, "float16"))
    try:
        with pytest.warns(RuntimeWarning, match="not one of its candidates"):
            k.install_tuned(torch.device("cuda", 0), {("linear", *fixed, tok): {
                "fwd": [128, 256, 64, 8, 8, 4], "bwd_dw": [32, 32, 32, 1, 1, 1]}}, tuned.bucket)
        key = (16384, 3072, 768, torch.float16)
        assert k._TUNED.pick("fwd", torch.device("cuda", 0), "linear", key) == (128, 256, 64, 8, 8, 4)
        assert k._TUNED.pick("bwd_dw", torch.device("cuda", 0), "linear", key) is None
    finally:
        k.install_tuned(None, None)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU smoke run of the tuner")
def test_tuner_searches_the_gemm_configs(monkeypatch):
    """train mode: the tuner asks config_space with the bucket's tokens and the GPU (none on CPU), verifies every
    trial, and records the fastest verified classes' configs with the entry."""
    from roberta_fast.kernels import linear as k

    from roberta_fast import tuning

    if not backends.can_run("triton", torch.device("cpu")):
        pytest.skip("the Triton backend on CPU needs TRITON_INTERPRET=1")
    asked = []
    small = {"fwd": (k.CONFIGS["fp32"], (128, 64, 32, 8, 4, 3)), "bwd_dx": (k.CONFIGS["fp32"],),
             "bwd_dw": (k.CONFIGS["fp32"], (64, 128, 32, 8, 4, 3))}

    def space(op, fixed, train=False, tokens_log2=None, capability=None):
        asked.append((fixed, tokens_log2, capability))
        return small

    monkeypatch.setattr(k, "config_space", space)
    fast = {(128, 64, 32, 8, 4, 3): 0.5, (64, 128, 32, 8, 4, 3): 0.25}

    def timer(fn, backend, configs=None, **kw):
        fn()
        if configs is None:
            return {"torch": 3.0, "cublaslt": 4.0}[backend]
        return 2.0 - sum(fast.get(tuple(c), 0.0) for c in configs.values())

    shapes = [("linear", {"tokens": 9, "in": 24, "out": 40, "activation": "gelu_tanh", "residual": True})]
    res = tuning.tune(ops=["linear"], shapes=shapes, dtypes=["fp32"], device="cpu", modes=("train",), save=False,
                      timer=timer)
    (e,) = res.entries
    assert asked == [((40, 24, "float32"), 3, None)]
    assert [t["status"] for t in e["config_trials"]] == ["ok"] * 3
    assert e["triton_configs"] == {"fwd": [128, 64, 32, 8, 4, 3], "bwd_dx": list(k.CONFIGS["fp32"]),
                                   "bwd_dw": [64, 128, 32, 8, 4, 3]}
    assert e["times_ms"]["triton"] == pytest.approx(1.25) and e["order"][0] == "triton"


# ----------------------------------------------------------------------------- only the gradients asked for


@pytest.mark.parametrize("backend", ["triton", "cublaslt"])
@pytest.mark.parametrize("trainable", ["x", "w", "b", "xw", "wb", "r"])
def test_backward_computes_only_the_gradients_asked_for(monkeypatch, backend, trainable):
    """A frozen weight costs no dW GEMM (and no db), an input without grad no dX GEMM: the custom backward op
    returns only the gradients autograd asks for, the Triton backend launches only their GEMMs (the torch path,
    cublaslt's backward, skips their matmuls), and those gradients are right."""
    if backend == "triton" and not backends.can_run("triton", torch.device("cpu")):
        pytest.skip("the Triton backend on CPU needs TRITON_INTERPRET=1")
    from roberta_fast.kernels import linear as k

    spy = _GemmSpy(k._LINEAR)
    monkeypatch.setattr(k, "_LINEAR", spy)
    outputs = []
    real_bwd = lin._bwd

    def counting_bwd(*args):
        out = real_bwd(*args)
        outputs.append(len(out))
        return out

    monkeypatch.setattr(lin, "_bwd", counting_bwd)
    g = torch.Generator().manual_seed(11)
    M, K, N = 9, 24, 40
    x, w, b, r = (torch.randn(*s, generator=g) for s in ((M, K), (N, K), (N,), (M, N)))
    dy = torch.randn(M, N, generator=g)
    flags = {"x": "x" in trainable, "w": "w" in trainable, "b": "b" in trainable, "r": "r" in trainable}

    def leaves():
        return [t.clone().requires_grad_(flags[n]) for n, t in zip("xwbr", (x, w, b, r))]

    ours = leaves()
    y = linear(*ours[:3], activation="gelu_tanh", residual=ours[3], backend=backend)
    y.backward(dy)
    ref = leaves()
    yr = F.gelu(F.linear(*ref[:3]), approximate="tanh") + ref[3]
    yr.backward(dy)
    for n, o, rf in zip("xwbr", ours, ref):
        if flags[n]:
            torch.testing.assert_close(o.grad, rf.grad, rtol=1e-4, atol=1e-4)
        else:
            assert o.grad is None
    n_grads = flags["x"] + flags["w"] + flags["b"]
    assert outputs == ([n_grads] if n_grads else [])  # no backward op at all when only the residual trains
    if backend == "triton":
        gemms = [(rows, cols) for rows, cols, _ in spy.log]
        assert gemms == [(M, N)] + [(M, K)] * flags["x"] + [(N, K)] * flags["w"]  # the forward, dX, dW


def test_backward_torch_skips_the_matmuls_not_asked_for():
    g = torch.Generator().manual_seed(2)
    dy, x, w, pre = (torch.randn(*s, generator=g) for s in ((5, 8), (5, 3), (8, 3), (5, 8)))
    full = lin.backward_torch(dy, x, w, True, pre, "gelu")
    for needs in ((True, False, False), (False, True, False), (False, False, True), (False, False, False)):
        got = lin.backward_torch(dy, x, w, True, pre, "gelu", needs)
        for want, g_, need in zip(full, got, needs):
            assert (g_ is None) == (not need)
            if need:
                assert torch.equal(g_, want)
