"""The backend registry (roberta_fast.backends), the per-op backend contracts, and the package's import
structure: imports flow one way (model -> ops -> registry -> backends), no cycles, no hidden imports."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import roberta_fast
from roberta_fast import backends
from roberta_fast.backends import BackendUnavailableError, resolve
from roberta_fast.ops import _checks

CPU = torch.device("cpu")
PKG = Path(roberta_fast.__file__).parent


def test_import_without_gpu_or_compiled_module():
    code = ("import sys, roberta_fast, roberta_fast.ops as o; "
            "assert 'roberta_fast._C' not in sys.modules, 'the compiled module must be imported lazily'; "
            "assert 'roberta_fast._C_emu' not in sys.modules; assert 'triton' not in sys.modules; "
            "print(sorted(o.__all__))")
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "layer_norm" in res.stdout and "attention_varlen" in res.stdout


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("ROBERTA_FAST_BACKEND", raising=False)
    assert resolve("layer_norm", None, CPU) == "torch"


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'tritonn'"):
        resolve("layer_norm", "tritonn", CPU)


def test_env_override(monkeypatch):
    monkeypatch.setenv("ROBERTA_FAST_BACKEND", "torch")
    assert resolve("layer_norm", None, CPU) == "torch"
    monkeypatch.setenv("ROBERTA_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ROBERTA_FAST_BACKEND must be one of"):
        resolve("layer_norm", None, CPU)
    monkeypatch.setenv("ROBERTA_FAST_BACKEND", "auto")
    assert resolve("layer_norm", None, CPU) == "torch"


def test_named_cuda_backend_missing_says_how_to_build(monkeypatch):
    monkeypatch.setattr(backends, "cuda_built", lambda: False)
    monkeypatch.setenv("ROBERTA_FAST_CUDA_EMULATE", "0")
    with pytest.raises(BackendUnavailableError, match="ROBERTA_FAST_CUDA=1 pip install"):
        resolve("layer_norm", "cuda", CPU)


def test_named_cuda_backend_on_cpu_without_emulation(monkeypatch):
    monkeypatch.setattr(backends, "cuda_built", lambda: True)
    monkeypatch.setenv("ROBERTA_FAST_CUDA_EMULATE", "0")
    with pytest.raises(ValueError, match="runs on CUDA tensors .*ROBERTA_FAST_CUDA_EMULATE=1"):
        resolve("layer_norm", "cuda", CPU)


def test_cuda_backend_on_cpu_through_the_emulation(monkeypatch):
    monkeypatch.setenv("ROBERTA_FAST_CUDA_EMULATE", "1")
    monkeypatch.setattr(backends, "emulation_built", lambda: True)
    assert backends.why_unavailable("cuda", CPU) is None
    assert resolve("layer_norm", "cuda", CPU) == "cuda"
    monkeypatch.delenv("ROBERTA_FAST_BACKEND", raising=False)
    assert resolve("layer_norm", None, CPU) == "torch"  # the automatic choice never picks the emulation


def test_named_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "interpret_mode", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve("layer_norm", "triton", CPU)


def test_named_triton_on_cpu_under_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "interpret_mode", lambda: True)
    assert resolve("layer_norm", "triton", CPU) == "triton"


def test_unsupported_reason_raises_when_named_and_is_skipped_when_automatic(monkeypatch):
    monkeypatch.delenv("ROBERTA_FAST_BACKEND", raising=False)
    monkeypatch.setattr(backends, "interpret_mode", lambda: True)

    def unsupported(b):
        return "head_dim 48 unsupported" if b == "triton" else None

    with pytest.raises(ValueError, match="head_dim 48 unsupported"):
        resolve("attention", "triton", CPU, unsupported=unsupported)
    # automatic choice never raises: it falls back to the reference
    assert resolve("attention", None, CPU, unsupported=unsupported) == "torch"


def test_available_lists_every_backend_with_a_reason():
    got = backends.available(CPU)
    assert set(got) == set(backends.BACKENDS) and got["torch"] is None
    assert all(v is None or isinstance(v, str) and v for v in got.values())


def test_check_helpers_name_argument_expected_and_given():
    x = torch.zeros(2, 3, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"op: weight must have x's dtype \(float16\) or float32, got bfloat16"):
        _checks.check_param_dtype("op", "weight", torch.zeros(3, dtype=torch.bfloat16), x)
    with pytest.raises(TypeError, match="op: x must be a torch.Tensor, got list"):
        _checks.check_tensor("op", "x", [1, 2])
    with pytest.raises(TypeError, match=r"op: x must have dtype in \(float16, bfloat16, float32\), got int64"):
        _checks.check_tensor("op", "x", torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"op: bias must have shape \(3,\), got \(4,\)"):
        _checks.check_shape("op", "bias", torch.zeros(4), (3,))
    with pytest.raises(ValueError, match="x is on cpu, y is on meta"):
        _checks.check_same_device("op", x=x, y=torch.zeros(1, device="meta"))


# ----------------------------------------------------------------------------- the default order per GPU

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture
def fake_caps(monkeypatch):
    """CUDA devices report the capability in `caps` (index -> (major, minor)); `reads` counts the reads."""
    caps, reads = {0: (9, 0), 1: (8, 0)}, []

    def get_device_capability(index=None):
        reads.append(index)
        return caps[index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    monkeypatch.setattr(backends, "cuda_built", lambda: True)
    monkeypatch.delenv("ROBERTA_FAST_BACKEND", raising=False)
    monkeypatch.setenv("ROBERTA_FAST_TUNING", "0")  # no tuned table: the default order alone
    backends.reset()
    yield caps, reads
    backends.reset()


@pytest.mark.parametrize("cap, attention_first", [((9, 0), "triton"), ((8, 0), "cuda"), ((8, 9), "cuda"),
                                                  ((10, 0), "cuda"), ((12, 0), "cuda"), ((7, 5), "cuda")])
def test_default_order_per_capability(fake_caps, cap, attention_first):
    """attention and attention_varlen take Triton's wgmma kernels before the mma.sync CUDA ones on sm_90 only;
    every other op, and every other GPU, keeps cuda then triton (docs/tuning.md)."""
    caps, _ = fake_caps
    caps[0] = cap
    for op in ("attention", "attention_varlen"):
        assert backends.default_order(op, CUDA0)[0] == attention_first
        assert resolve(op, None, CUDA0) == attention_first
    for op in ("layer_norm", "bias_gelu", "masked_softmax"):
        assert backends.default_order(op, CUDA0) == backends.GENERAL_ORDER == ("cuda", "triton")
        assert resolve(op, None, CUDA0) == "cuda"
    # a backend that cannot take the call is skipped in the default order too, and never raises
    no_triton = lambda b: "float32" if b == "triton" else None  # noqa: E731
    no_cuda = lambda b: "head_dim 48" if b == "cuda" else None  # noqa: E731
    assert resolve("attention", None, CUDA0, unsupported=no_triton) == "cuda"
    assert resolve("attention", None, CUDA0, unsupported=no_cuda) == "triton"
    assert resolve("attention", None, CUDA0, unsupported=lambda b: "no") == "torch"


def test_default_order_without_the_cuda_build(fake_caps, monkeypatch):
    monkeypatch.setattr(backends, "cuda_built", lambda: False)
    fake_caps[0][0] = (8, 0)
    assert resolve("attention", None, CUDA0) == "triton"  # cuda first, but not built
    assert resolve("layer_norm", None, CUDA0) == "triton"


def test_capability_is_read_once_per_device(fake_caps):
    """A dict lookup per call after the first: no CUDA call per op call, one read per device."""
    caps, reads = fake_caps
    for _ in range(100):
        assert resolve("attention", None, CUDA0) == "triton"
        assert resolve("attention_varlen", None, CUDA1) == "cuda"
    assert sorted(reads) == [0, 1]
    assert backends.capability(torch.device("cpu")) is None and sorted(reads) == [0, 1]  # not a CUDA device
    backends.reset()  # forgets it (a test may fake another GPU)
    caps[0] = (8, 0)
    assert resolve("attention", None, CUDA0) == "cuda" and reads.count(0) == 2


def test_an_unreadable_capability_keeps_the_general_order(fake_caps, monkeypatch):
    def broken(index=None):
        raise RuntimeError("no driver")

    monkeypatch.setattr(torch.cuda, "get_device_capability", broken)
    assert backends.capability(CUDA0) is None
    assert backends.default_order("attention", CUDA0) == ("cuda", "triton")


def test_the_choice_cache_keys_on_the_device(fake_caps, monkeypatch):
    """backends.choose keeps one answer per (op, backend argument, device, signature, mode): two GPUs of
    different architectures in one process get each their own default, each resolved once."""
    calls = []
    real = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    sig = (torch.float16, 12, 64)
    for _ in range(10):
        assert backends.choose("attention", None, CUDA0, sig, "fwd")[0] == "triton"
        assert backends.choose("attention", None, CUDA1, sig, "fwd")[0] == "cuda"
    assert calls == [CUDA0, CUDA1]


def test_the_host_benchmark_stub_keeps_the_general_order(monkeypatch):
    """With "cpu" among the GPU device types (the stub driver of bench_host) there is no capability to read:
    cuda, then triton, as before."""
    monkeypatch.setattr(backends, "GPU_DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(backends, "cuda_built", lambda: True)
    monkeypatch.setenv("ROBERTA_FAST_CUDA_EMULATE", "1")
    monkeypatch.setattr(backends, "emulation_built", lambda: True)
    monkeypatch.delenv("ROBERTA_FAST_BACKEND", raising=False)
    assert backends.default_order("attention", CPU) == ("cuda", "triton")
    assert resolve("attention", None, CPU) == "cuda"


# ----------------------------------------------------------------------------- the contracts


def _protocol_methods(proto):
    names = ("unsupported", "forward", "forward_inference", "backward")
    return {n: inspect.signature(getattr(proto, n)) for n in names if hasattr(proto, n)}


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", sorted(backends.CONTRACTS))
def test_every_backend_module_follows_its_op_contract(backend, op):
    """kernels/<op>.py and cuda_ops/<op>.py have forward, backward and unsupported with exactly the
    Protocol's parameters (the contract is written once, in roberta_fast.backends)."""
    if backend == "triton":
        pytest.importorskip("triton")
    mod = backends.implementation(backend, op)
    proto = backends.CONTRACTS[op]
    assert isinstance(mod, proto), f"{mod.__name__} lacks a method of {proto.__name__}"
    for name, sig in _protocol_methods(proto).items():
        want = [p for p in sig.parameters if p != "self"]
        got = list(inspect.signature(getattr(mod, name)).parameters)
        assert got == want, f"{mod.__name__}.{name}{tuple(got)} != {proto.__name__}.{name}{tuple(want)}"


# ----------------------------------------------------------------------------- import structure


def _modules():
    """{module name: path} of every module of the installed package, kernels/ and benchmarks/ (installed as
    roberta_fast.kernels and roberta_fast.benchmarks) included; the pytest entry of benchmarks/ left out."""
    import importlib.util

    out = {}
    for pkg in ("roberta_fast", "roberta_fast.kernels", "roberta_fast.benchmarks"):
        root = Path(importlib.util.find_spec(pkg).submodule_search_locations[0])
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [*pkg.split("."), *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts[-1].startswith("test_") or parts[-1] == "conftest":
                continue
            out.setdefault(".".join(parts), path)
    return out


def _imports(name, path, modules):
    """The roberta_fast modules that `name` imports anywhere in its source (function-level imports too)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph():
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert "roberta_fast.backends" in graph and "roberta_fast.kernels.attention" in graph
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)


# Layers, lowest first (longest matching prefix wins). A module may import from lower layers, and inside its
# own layer only from its own family (roberta_fast.<family>...) or an allowed pair; the leaves from anywhere.
LEAVES = ("roberta_fast._utils", "roberta_fast._version")
LAYERS = [
    ["roberta_fast.kernels", "roberta_fast.cuda_ops", "roberta_fast.reference", "roberta_fast.flops",
     "roberta_fast.lsh"],  # lsh: LSH attention's plain-PyTorch reference (ops.lsh_attention's torch backend)
    ["roberta_fast.tuned", "roberta_fast.backends"],
    ["roberta_fast.ops", "roberta_fast.padding"],
    ["roberta_fast.model", "roberta_fast.testing", "roberta_fast.data"],  # data: MLM masking, packing (torch only)
    ["roberta_fast.optimize", "roberta_fast.embed"],  # embed: Embedder, the embed job (model + tokenizer)
    ["roberta_fast.tuning", "roberta_fast.demo", "roberta_fast.train"],  # train: finetune
    ["roberta_fast.pretrain"],  # MLM pretraining: on data, model and train's optimizer/checkpoints/process group
    ["roberta_fast.benchmarks"],  # the harness measures every layer below (tuner's cases, jobs, pretrain corpus)
    ["roberta_fast"],
    ["roberta_fast.cli"],
]
SAME_LAYER_OK = {("roberta_fast.backends", "roberta_fast.tuned")}  # the registry reads the tuned cache


def _layer(name):
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    assert best is not None, f"{name} is in no layer of this test: add it to LAYERS"
    return best[0]


def _family(name):
    return ".".join(name.split(".")[:2])


def test_imports_flow_one_way():
    """model -> ops -> registry -> backends (kernels | cuda_ops | reference) -> nothing of ours."""
    upward = []
    for name, deps in _graph().items():
        for d in deps:
            if d in LEAVES or _layer(d) < _layer(name):
                continue
            same_layer_ok = _family(d) == _family(name) or (_family(name), _family(d)) in SAME_LAYER_OK
            if _layer(d) == _layer(name) and same_layer_ok:
                continue
            upward.append(f"{name} (layer {_layer(name)}) imports {d} (layer {_layer(d)})")
    assert not upward, "\n".join(sorted(upward))


def test_no_except_importerror_around_our_own_modules():
    """A broken import of one of our modules must fail loudly, not switch a feature off."""
    bad = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Try):
                continue
            catches = [h for h in node.handlers
                       if h.type is not None and "ImportError" in ast.unparse(h.type)]
            if not catches:
                continue
            for stmt in ast.walk(ast.Module(body=node.body, type_ignores=[])):
                mod = None
                if isinstance(stmt, ast.ImportFrom):
                    mod = "." * stmt.level + (stmt.module or "")
                elif isinstance(stmt, ast.Import):
                    mod = stmt.names[0].name
                if mod is not None and (mod.startswith(".") or mod.startswith("roberta_fast")):
                    bad.append(f"{name}:{stmt.lineno} imports {mod} under except ImportError")
    assert not bad, "\n".join(bad)


def test_small_helpers_are_written_once():
    """One helper for "last stride 1" and one for dtype names (roberta_fast._utils)."""
    offenders = []
    for name, path in _modules().items():
        if name == "roberta_fast._utils":
            continue
        text = path.read_text()
        for needle in ('str(dtype).replace("torch.", "")', "str(dt).replace(\"torch.\", \"\")", "def _unit_last_stride",
                       "def _dtype_name", "def dtype_name"):
            if needle in text:
                offenders.append(f"{name}: {needle}")
    assert not offenders, "\n".join(offenders)


def test_one_ops_environment_variable_before_the_global_one(monkeypatch):
    """ROBERTA_FAST_BACKEND_<OP> names one op's backend (read before ROBERTA_FAST_BACKEND); other ops keep theirs."""
    from roberta_fast.ops.linear import choice

    x, w = torch.randn(5, 8), torch.randn(6, 8)
    monkeypatch.delenv("ROBERTA_FAST_BACKEND", raising=False)
    monkeypatch.setenv("ROBERTA_FAST_BACKEND_LINEAR", "cublaslt")
    backends.reset()
    try:
        assert choice(x, w, activation="gelu_tanh") == "cublaslt"
        assert backends.resolve("layer_norm", None, torch.device("cpu")) == "torch"
        monkeypatch.setenv("ROBERTA_FAST_BACKEND", "torch")
        backends.reset()
        assert choice(x, w, activation="gelu_tanh") == "cublaslt"  # the op's own variable wins
        monkeypatch.setenv("ROBERTA_FAST_BACKEND_LINEAR", "auto")
        backends.reset()
        assert choice(x, w) == "torch"  # "auto": the global one applies again
        monkeypatch.setenv("ROBERTA_FAST_BACKEND_LINEAR", "bogus")
        backends.reset()
        with pytest.raises(ValueError, match="ROBERTA_FAST_BACKEND_LINEAR must be one of"):
            choice(x, w)
    finally:
        monkeypatch.delenv("ROBERTA_FAST_BACKEND_LINEAR")
        backends.reset()
