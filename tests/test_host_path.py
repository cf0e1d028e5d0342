"""The lean host path (docs/host_path.md): the registry's resolve cache and its invalidation, the argument
checks cached per call signature, the direct backend call in inference, the trusted entry points, and the
Triton launches through cached compiled handles (their launch keys checked against Triton's own binder over
the stub CUDA driver of the host benchmark, in a child process without TRITON_INTERPRET)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from roberta_fast import backends, ops, tuned
from roberta_fast.ops import trusted

CPU = torch.device("cpu")
needs_triton = pytest.mark.skipif(not backends.can_run("triton", CPU),
                                  reason="needs triton under TRITON_INTERPRET=1 (the CPU runs)")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("ROBERTA_FAST_BACKEND", raising=False)
    backends.reset()
    yield
    backends.reset()


def _ln_args(M=6, N=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, N, generator=g).to(dtype)
    return x, torch.randn(N, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)


# ----------------------------------------------------------------------------------- the resolve cache


def test_choose_resolves_once_per_signature(monkeypatch):
    calls = []
    real = backends.resolve

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(backends, "resolve", counting)
    for _ in range(3):
        assert backends.choose("layer_norm", None, CPU, ("sig", 1), "fwd") == ("torch", None)
    assert calls == ["layer_norm"]
    backends.choose("layer_norm", None, CPU, ("sig", 2), "fwd")
    backends.choose("layer_norm", None, CPU, ("sig", 1), "train")
    assert len(calls) == 3


def test_environment_is_read_once_until_reset(monkeypatch):
    x, w, b = _ln_args()
    ops.layer_norm(x, w, b)
    monkeypatch.setenv("ROBERTA_FAST_BACKEND", "bogus")
    ops.layer_norm(x, w, b)  # the cached choice: the environment is not read per call
    backends.reset()
    with pytest.raises(ValueError, match="ROBERTA_FAST_BACKEND must be one of"):
        ops.layer_norm(x, w, b)


def test_a_tuning_change_empties_the_cache():
    backends.choose("bias_gelu", None, CPU, ("sig",), "fwd")
    assert backends._RESOLVED
    tuned.reset()
    assert not backends._RESOLVED
    backends.choose("bias_gelu", None, CPU, ("sig",), "fwd")
    tuned._changed()  # what save_entries / a first table read call
    assert not backends._RESOLVED


def test_named_backend_errors_are_not_cached():
    x, w, b = _ln_args()
    for _ in range(2):
        with pytest.raises(ValueError, match="backend must be one of"):
            ops.layer_norm(x, w, b, backend="nope")


# ------------------------------------------------------------------------------------ cached checks


def test_checks_run_once_per_signature_and_still_name_bad_arguments(monkeypatch):
    ln = sys.modules["roberta_fast.ops.layer_norm"]  # the function shadows the module in roberta_fast.ops
    seen = []
    real = ln._check_args
    monkeypatch.setattr(ln, "_check_args", lambda *a: (seen.append(1), real(*a)))
    ln._CHECKED.clear()
    x, w, b = _ln_args()
    for _ in range(3):
        ops.layer_norm(x, w, b)
    assert len(seen) == 1
    ops.layer_norm(x[:3], w, b)  # another shape: checked again
    assert len(seen) == 2
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.layer_norm(x, w[:5], b)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.layer_norm([1.0], w, b)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        ops.layer_norm(x, w, [0.0] * 16)
    with pytest.raises(ValueError, match="eps must be a finite float"):
        ops.layer_norm(x, w, b, float("nan"))


def test_cpu_value_checks_still_run_every_call():
    s = torch.randn(1, 2, 3, 4)
    ok = torch.zeros(1, 1, 1, 4)
    ops.masked_softmax(s, ok)
    with pytest.raises(ValueError, match="float tensor of 0s and 1s"):
        ops.masked_softmax(s, torch.ones(1, 1, 1, 4))  # same signature as the good call
    q = torch.randn(5, 2, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    ops.attention_varlen(q, q, q, cu, 3)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.attention_varlen(q, q, q, torch.tensor([0, 3, 2], dtype=torch.int32), 3)


# ------------------------------------------------------------------------- direct calls and trusted


def _op_cases():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, w, b = _ln_args()
    q = r(2, 5, 2, 32)
    tq = r(7, 2, 32)
    return {
        "layer_norm": ((x, w, b, 1e-5), dict(residual=r(6, 16), x_bias=r(16))),
        "bias_gelu": ((r(3, 4, 8), r(8)), {}),
        "masked_softmax": ((r(2, 2, 3, 5), torch.rand(2, 1, 1, 5) > 0.3, 0.5), {}),
        "attention": ((q, q, q), dict(key_padding_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool())),
        "attention_varlen": ((tq, tq, tq, torch.tensor([0, 3, 7], dtype=torch.int32), 4), {}),
    }


def _custom_ops_called(fn) -> set:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("roberta_fast::")}


@needs_triton
@pytest.mark.parametrize("op", list(_op_cases()))
def test_inference_skips_the_custom_op_and_autograd_keeps_it(op):
    args, kwargs = _op_cases()[op]
    fn = getattr(ops, op)
    with torch.no_grad():
        want = fn(*args, **kwargs, backend="torch")
    with torch.inference_mode():
        assert _custom_ops_called(lambda: fn(*args, **kwargs, backend="triton")) == set()
        got = fn(*args, **kwargs, backend="triton")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    leaf = args[0].clone().requires_grad_()
    names = _custom_ops_called(lambda: fn(leaf, *args[1:], **kwargs, backend="triton").sum().backward())
    assert any(n.endswith("_fwd") for n in names) and leaf.grad is not None, names


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", list(_op_cases()))
def test_trusted_entry_points_match_the_public_ops_without_checking(op, backend, monkeypatch):
    """Same results (in inference through the backends' forward_inference where they have one, which keeps
    no statistics), and no check runs."""
    if not backends.can_run(backend, CPU):
        pytest.skip(f"backend {backend!r} cannot run on CPU tensors here")
    args, kwargs = _op_cases()[op]
    if backend == "cuda" and op.startswith("attention"):  # the CUDA C++ attention takes float16 / bfloat16
        args = tuple(a.half() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    with torch.inference_mode():
        want = getattr(ops, op)(*args, **kwargs, backend=backend)
    mod = sys.modules[f"roberta_fast.ops.{'attention' if op.startswith('attention') else op}"]
    for name in ("_check_args", "_check_padded", "_check_varlen", "_check_additive", "_check_cu_seqlens"):
        if hasattr(mod, name):
            monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("a trusted call ran a check"))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = getattr(trusted, op)(*args, **kwargs, backend=backend)
        torch.testing.assert_close(got, want)


def test_trusted_entry_points_take_the_public_signatures():
    import inspect

    for op in trusted.__all__:
        if op.startswith("bind_"):
            continue
        pub = inspect.signature(getattr(ops, op)).parameters
        tr = inspect.signature(getattr(trusted, op)).parameters
        assert list(pub) == list(tr), op


@needs_triton
def test_a_dispatch_mode_sees_the_custom_op():
    """Op counters (TorchDispatchMode) and FakeTensorMode see the opaque op even in inference."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w, b = _ln_args()
    with torch.inference_mode(), Mode():
        ops.layer_norm(x, w, b, backend="triton")
    assert any("roberta_fast.layer_norm_fwd" in s for s in seen), seen


# ------------------------------------------------------------- launches through cached compiled handles

_STUB_SCRIPT = textwrap.dedent("""
    import torch
    from roberta_fast.benchmarks import bench_host
    stub = bench_host.install_stub()
    from roberta_fast import ops
    from roberta_fast.kernels import _launch, attention, bias_gelu, layer_norm, masked_softmax
    _launch.check_keys(True)  # every cached launch is checked against Triton's own binder
    h = torch.float16
    def r(*s, dtype=h):
        return torch.randn(*s).to(dtype)
    n0 = stub.launches()
    with torch.inference_mode():
        for M in (1, 16, 17, 33):
            base = r(M * 64 + 8)
            for off in (0, 1, 8):  # 16-byte aligned or not
                x = base[off:off + M * 48].view(M, 48)
                ops.layer_norm(x, r(48), r(48), residual=r(M, 48), x_bias=r(48, dtype=torch.float32))
                ops.layer_norm(x, None, r(48))
                ops.bias_gelu(x, r(48))
                ops.bias_gelu(x, None, "tanh")
                s = base[off:off + M * 32].view(1, 2, M, 16)
                ops.masked_softmax(s, torch.rand(1, 1, 1, 16) > 0.5, 0.5)
                ops.masked_softmax(s, None)
            qkv = r(M, 3, 2, 16)
            q, k, v = qkv.unbind(1)
            ops.attention_varlen(q, k, v, torch.tensor([0, M], dtype=torch.int32), M)
            ops.attention(q[None], k[None], v[None], key_padding_mask=torch.ones(1, M, dtype=torch.bool))
    n1 = stub.launches()
    _launch.check_keys(False)
    with torch.inference_mode():
        ops.layer_norm(x, r(48), r(48))
    assert stub.launches() == n1 + 1
    cached = sum(len(keys) for lc in _launch._LAUNCHERS for keys in lc.cache.values())
    print("OK", n1 - n0, cached)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="the stub libcuda.so.1 is a Linux shared library")
def test_cached_launches_pick_the_kernel_tritons_binder_picks(tmp_path):
    """Over the host benchmark's stub CUDA driver (real Triton compiler and launcher, no GPU): each launch key
    (pointer alignment, int specialization, dtypes, constexprs) maps to exactly the compiled kernel that
    Triton's own binder picks for the same arguments."""
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia.driver")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ROBERTA_FAST_CUDA_EMULATE"] = "0"  # the automatic choice is then "triton", as on a GPU without _C
    proc = subprocess.run([sys.executable, "-c", _STUB_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1].split()
    assert last[0] == "OK" and int(last[1]) == 4 * (3 * 6 + 2) and int(last[2]) > 4, proc.stdout


# ----------------------------------------------------------------------------------- the model's inference path


def _tiny_pair(padding_free=True, layers=3, act="gelu"):
    import copy

    import transformers

    import roberta_fast

    cfg = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=40, pad_token_id=1, hidden_act=act)
    torch.manual_seed(0)
    hf = transformers.AutoModel.from_config(cfg, attn_implementation="eager").eval()
    ours = roberta_fast.optimize(copy.deepcopy(hf), padding_free=padding_free).eval()
    ids = torch.randint(3, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    ids[1, 10:] = 1
    return hf, ours, ids, mask


@pytest.fixture
def spy_fast(monkeypatch):
    from roberta_fast.model import encoder

    calls = []
    real = encoder._inference_layers
    monkeypatch.setattr(encoder, "_inference_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("padding_free", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_inference_path_equals_the_module_path_bit_for_bit(monkeypatch, spy_fast, backend, padding_free, act):
    """In inference the encoder runs its layers without their module calls (Encoder._inference_plan): the same ops
    on the same arguments, so the same bits as the module path (forced here by a forward pre-hook)."""
    monkeypatch.setenv("ROBERTA_FAST_BACKEND", backend)
    backends.reset()
    hf, ours, ids, mask = _tiny_pair(padding_free, act=act)
    with torch.inference_mode():
        fast = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert spy_fast == [1]
    handle = ours.encoder.layer[1].register_forward_pre_hook(lambda *a: None)
    with torch.inference_mode():
        slow = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    handle.remove()
    assert spy_fast == [1], "a forward hook must send the forward through the modules"
    assert torch.equal(fast.last_hidden_state, slow.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(fast.hidden_states, slow.hidden_states))
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(fast.last_hidden_state[real], want[real], rtol=1e-5, atol=1e-5)


def test_inference_path_only_where_nothing_else_is_asked(spy_fast):
    hf, ours, ids, mask = _tiny_pair()
    run = lambda **kw: ours(input_ids=ids, attention_mask=mask, **kw)  # noqa: E731
    with torch.no_grad():
        run()
        assert len(spy_fast) == 1, "no_grad in eval mode takes it"
        run(output_attentions=True)
        ours.train()
        run()
        ours.eval()
        ours.encoder.layer[2].attention.self.train()  # one module in train mode: its dropout must run
        run()
        ours.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run()  # autocast: the ops take their entry points (bind_* say None), the layers still skip modules
    assert len(spy_fast) == 2
    run()  # grad mode on: the module path (autograd records)
    assert len(spy_fast) == 2
    global_hook = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        with torch.no_grad():
            run()
    finally:
        global_hook.remove()
    assert len(spy_fast) == 2, "a global forward hook must send the forward through the modules"
    import copy

    layer = ours.encoder.layer[0]
    replacement = copy.copy(layer.intermediate)
    replacement.__class__ = type("MyIntermediate", (type(layer.intermediate),), {})
    layer.intermediate = replacement  # a replaced module (a subclass): the plan is looked up again and says no
    with torch.no_grad():
        run()
    assert len(spy_fast) == 2


def test_bind_functions_say_none_where_the_entry_points_must_run(monkeypatch):
    x, w, b = _ln_args()
    assert trusted.bind_layer_norm(x, w, b, None, None) is None  # grad mode on
    with torch.no_grad():
        monkeypatch.setenv("ROBERTA_FAST_BACKEND", "torch")
        backends.reset()
        assert trusted.bind_layer_norm(x, w, b, None, None) is None  # the torch backend has no kernel to bind
        assert trusted.bind_bias_gelu(x, b, "none") is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert trusted.bind_layer_norm(x, w, b, None, None) is None
        assert trusted.bind_layer_norm(x.t(), w, b, None, None) is None  # not contiguous rows


@needs_triton
def test_bound_ops_equal_the_trusted_entry_points(monkeypatch):
    monkeypatch.setenv("ROBERTA_FAST_BACKEND", "triton")
    backends.reset()
    x, w, b = _ln_args(M=5, N=32)
    r, xb = torch.randn_like(x), torch.randn_like(w)
    qkv = torch.randn(9, 3, 2, 16)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with torch.inference_mode():
        ln = trusted.bind_layer_norm(x, w, b, r, xb)
        assert torch.equal(ln(x, w, b, 1e-5, r, xb), trusted.layer_norm(x, w, b, 1e-5, residual=r, x_bias=xb))
        gelu = trusted.bind_bias_gelu(x, xb, "tanh")
        assert torch.equal(gelu(x, xb, "tanh"), trusted.bias_gelu(x, xb, "tanh"))
        att = trusted.bind_attention_varlen(q, k, v, cu, 5)
        assert torch.equal(att(q, k, v, cu, 5, 0.25), trusted.attention_varlen(q, k, v, cu, 5))
        pq, pk, pv = (t.reshape(1, 9, 2, 16) for t in (q, k, v))
        kpm = torch.ones(1, 9, dtype=torch.bool)
        att = trusted.bind_attention(pq, pk, pv, kpm)
        assert torch.equal(att(pq, pk, pv, kpm, 0.25), trusted.attention(pq, pk, pv, key_padding_mask=kpm))


# ------------------------------------------------------------------- the public ops' inference cache

_FULL_PATH = {"layer_norm": ("layer_norm", "_layer_norm", "_FAST"), "bias_gelu": ("bias_gelu", "_bias_gelu", "_FAST"),
              "masked_softmax": ("masked_softmax", "_masked_softmax", "_FAST"),
              "attention": ("attention", "_attention", "_FAST"),
              "attention_varlen": ("attention", "_attention_varlen", "_FASTV")}


def _kernel_case(op, backend):
    if not backends.can_run(backend, CPU):
        pytest.skip(f"backend {backend!r} cannot run on CPU tensors here")
    args, kwargs = _op_cases()[op]
    if backend == "cuda" and op.startswith("attention"):  # the CUDA C++ attention takes float16 / bfloat16
        args = tuple(a.half() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    if op.startswith("attention"):  # distinct q, k, v (a call passing one tensor twice is never cached)
        args = (args[0], args[1] * 0.5, args[2] * 2, *args[3:])
    return args, kwargs


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", list(_op_cases()))
def test_inference_cache_is_bit_identical_to_the_custom_op(op, backend, monkeypatch):
    """In inference a public op's second call of a signature skips its checks, the choice and the custom op
    (the cached backend function); its output equals the custom op's (autograd) bit for bit."""
    args, kwargs = _kernel_case(op, backend)
    fn = getattr(ops, op)
    leaf = args[0].clone().requires_grad_()
    want = fn(leaf, *args[1:], **kwargs, backend=backend).detach()  # the custom op, under autograd
    name, full, cache = _FULL_PATH[op]
    mod = sys.modules[f"roberta_fast.ops.{name}"]
    for mode in (torch.inference_mode, torch.no_grad):
        getattr(mod, cache).clear()
        with mode():
            first = fn(*args, **kwargs, backend=backend)
            assert len(getattr(mod, cache).entries) == 1
            with monkeypatch.context() as m:
                m.setattr(mod, full, lambda *a, **k: pytest.fail("the cached call took the full path"))
                got = fn(*args, **kwargs, backend=backend)
        assert torch.equal(first, want) and torch.equal(got, want), (op, mode)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", list(_op_cases()))
def test_trusted_inference_cache_equals_the_public_op(op, backend):
    args, kwargs = _kernel_case(op, backend)
    with torch.inference_mode():
        want = getattr(ops, op)(*args, **kwargs, backend=backend)
        for _ in range(2):  # fills the cache, then takes it
            assert torch.equal(getattr(trusted, op)(*args, **kwargs, backend=backend), want)


@needs_triton
def test_inference_cache_misses_on_another_signature_and_checks_it():
    x, w, b = _ln_args()
    with torch.inference_mode():
        ops.layer_norm(x, w, b, backend="triton")
        with pytest.raises(ValueError, match="weight must have shape"):
            ops.layer_norm(x, w[:5], b, backend="triton")
        with pytest.raises(TypeError, match="weight must have x's dtype"):
            ops.layer_norm(x, w.half(), b, backend="triton")
        with pytest.raises(TypeError, match="eps must be a float"):
            ops.layer_norm(x, w, b, True, backend="triton")
        with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
            ops.layer_norm(x, w, [0.0] * 16, backend="triton")
        # a transposed x (other strides) and 3-D rows are other signatures, computed right
        xt = torch.randn(16, 6).t()
        assert torch.equal(ops.layer_norm(xt, w, b, backend="triton"), ops.layer_norm(xt.contiguous(), w, b,
                                                                                      backend="triton"))
        x3 = x.view(2, 3, 16)
        for _ in range(2):
            assert torch.equal(ops.layer_norm(x3, w, b, backend="triton"), ops.layer_norm(x, w, b, backend="triton")
                               .view(2, 3, 16))
        s = torch.randn(1, 2, 3, 4)
        ops.masked_softmax(s, torch.zeros(1, 1, 1, 4), backend="triton")
        ops.masked_softmax(s, torch.zeros(1, 1, 1, 4), backend="triton")  # cached
        with pytest.raises(ValueError, match="float tensor of 0s and 1s"):  # CPU value checks: every call
            ops.masked_softmax(s, torch.ones(1, 1, 1, 4), backend="triton")
        q = torch.randn(5, 2, 16)
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        ops.attention_varlen(q, q, q, cu, 3, backend="triton")
        ops.attention_varlen(q, q, q, cu, 3, backend="triton")
        with pytest.raises(ValueError, match="non-decreasing"):
            ops.attention_varlen(q, q, q, torch.tensor([0, 3, 2], dtype=torch.int32), 3, backend="triton")


@needs_triton
def test_inference_cache_is_emptied_with_the_choices(monkeypatch):
    ln = sys.modules["roberta_fast.ops.layer_norm"]
    x, w, b = _ln_args()
    with torch.inference_mode():
        ops.layer_norm(x, w, b, backend="triton")
    assert ln._FAST.entries
    backends.reset()
    assert not ln._FAST.entries
    with torch.inference_mode():
        ops.layer_norm(x, w, b, backend="triton")
    tuned.reset()  # any change of the tuned tables
    assert not ln._FAST.entries
    monkeypatch.setenv("ROBERTA_FAST_BACKEND", "torch")  # seen after backends.reset(), as every choice
    backends.reset()
    with torch.inference_mode():
        ops.layer_norm(x, w, b)
    assert not ln._FAST.entries  # the torch backend has no kernel function to cache


def test_cuda_calls_follow_the_bindings_argument_order():
    """The CUDA C++ backend passes its arguments positionally (cuda_ops._common.ARGS); the table must be the
    built modules' own order."""
    from roberta_fast import cuda_ops
    from roberta_fast.cuda_ops._common import ARGS, binding_args

    built = [m for m in (cuda_ops.native_module(), cuda_ops.emulated_module()) if m is not None]
    if not built:
        pytest.skip("neither roberta_fast._C nor roberta_fast._C_emu is built")
    for mod in built:
        assert set(mod.KERNELS) == set(ARGS)
        for k in mod.KERNELS:
            assert binding_args(mod, k) == ARGS[k], k


def test_cuda_bound_attention_equals_forward_inference_misaligned_too():
    from roberta_fast import cuda_ops

    if cuda_ops.emulated_module() is None:
        pytest.skip("needs roberta_fast._C_emu")
    from roberta_fast.cuda_ops import attention as ca

    base = torch.randn(9 * 3 * 2 * 32 + 8).half()
    qkv = base[:9 * 3 * 2 * 32].view(9, 3, 2, 32)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    fn = ca.bind_inference(q, k, v, None, cu, 5, None)
    assert torch.equal(fn(q, k, v, None, cu, 5, None), ca.forward_inference(q, k, v, None, cu, 5, None, 0.0, None))
    mis = base[1:1 + 9 * 3 * 2 * 32].view(9, 3, 2, 32)  # 2-byte offset: not 16-byte aligned, same strides
    mq, mk, mv = mis.unbind(1)
    assert torch.equal(fn(mq, mk, mv, None, cu, 5, 0.2),
                       ca.forward_inference(mq, mk, mv, None, cu, 5, 0.2, 0.0, None))


@needs_triton
def test_triton_layer_norm_bound_equals_forward_inference():
    """kernels/layer_norm.bind_inference (everything but the addresses fixed once) launches what forward_inference
    launches: bit-identical outputs with and without each parameter, residual and x_bias, misaligned rows, float32
    parameters on half x; None where the parameters would need a cast per call (mixed dtypes)."""
    from roberta_fast.kernels import layer_norm as k

    g = torch.Generator().manual_seed(5)
    base = torch.randn(9 * 48 + 8, generator=g).half()
    for off in (0, 1):
        x = base[off:off + 9 * 48].view(9, 48)
        for pdt in (torch.float16, torch.float32):
            w, b, xb = (torch.randn(48, generator=g).to(pdt) for _ in range(3))
            r = torch.randn(9, 48, generator=g).half()
            for args in ((w, b, r, xb), (None, b, None, None), (w, None, r, None), (None, None, None, xb)):
                fn = k.bind_inference(x, args[0], args[1], args[2], args[3])
                want = k.forward_inference(x, args[0], args[1], 1e-5, args[2], args[3], 0.0, None)
                assert torch.equal(fn(x, args[0], args[1], 1e-5, args[2], args[3]), want)
    assert k.bind_inference(x, w.half(), b.float(), None, None) is None
