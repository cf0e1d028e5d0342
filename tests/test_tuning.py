"""roberta_fast.tuning (selection by measurement, the verification veto) and roberta_fast.tuned (bucketing,
the cache files, the lookup the backend registry makes).

Runs on CPU: fake timers (a parameter of `tune`) decide who is fastest, the Triton interpreter runs the
real kernels for the verification, and a fake CUDA identity stands in for a GPU where the lookup needs
one (the lookup itself never touches the device). The `gpu` test runs a real quick tune on one shape.
"""

import json
import os

import pytest
import torch
from roberta_fast.kernels import attention as kattn
from roberta_fast.kernels import bias_gelu as kgelu
from roberta_fast.kernels import layer_norm as kln
from roberta_fast.kernels import linear as klin
from roberta_fast.kernels import masked_softmax as ksm

from roberta_fast import backends, ops, testing, tuned, tuning
from roberta_fast.ops import _checks

CUDA0 = torch.device("cuda", 0)
FAKE_ID = {"schema": tuned.SCHEMA, "gpu": "Fake GPU 80GB HBM3", "capability": "9.0", "driver": "12.4",
           "torch": "2.11.0", "torch_cuda": "12.8", "triton": "3.6.0", "roberta_fast": "0.1.0", "cuda_ext": True,
           "code": "0123456789abcdef", "triton_interpret": False}
SMALL = {"layer_norm": {"tokens": 8, "hidden": 24}, "bias_gelu": {"tokens": 8, "n": 16}}
needs_interpreter = pytest.mark.skipif(not backends.can_run("triton", torch.device("cpu")),
                                       reason="needs TRITON_INTERPRET=1 and triton (the CPU runs)")


@pytest.fixture(autouse=True)
def _clean(tmp_path, monkeypatch):
    """A private cache directory, no overrides from the environment, fresh in-memory tables."""
    monkeypatch.setenv("ROBERTA_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ROBERTA_FAST_TUNING", raising=False)
    monkeypatch.delenv("ROBERTA_FAST_BACKEND", raising=False)
    tuned.reset()
    yield
    tuned.reset()


@pytest.fixture
def fake_gpu(monkeypatch):
    """Every device reports FAKE_ID, so a table saved for it is what lookups on cuda:0 read."""
    monkeypatch.setattr(tuned, "identity", lambda device: dict(FAKE_ID))
    return FAKE_ID


def first(op, key, device=CUDA0, mode="fwd"):
    """The fastest backend the cache holds for this exact bucket and mode (None: nothing measured)."""
    order = tuned.lookup(op, key, device, mode)
    return order[0] if order else None


def fake_timer(ms: dict):
    """A timer that returns fixed times per backend (and never runs fn)."""
    seen = []

    def timer(fn, *, backend, **info):
        seen.append((backend, info["op"], info["mode"]))
        return ms[backend]

    timer.seen = seen
    return timer


def entry(op, fixed, tok, order, mode="fwd"):
    return {"op": op, "mode": mode, "dtype": "float16", "shape": {}, "key": None,
            "bucket": {"fixed": list(fixed), "tokens_log2": tok}, "times_ms": {}, "status": {},
            "order": list(order), "winner": order[0] if order else None, "speedup_vs_torch": None}


# ------------------------------------------------------------------------------------------ bucketing


def test_round_log2_and_ceil_pow2():
    class Sym:  # anything that is not an int takes the comparison-only path (symbolic sizes)
        def __init__(self, n):
            self.n = n

        def __mul__(self, o):
            return self.n * (o.n if isinstance(o, Sym) else o)

    for n in list(range(0, 3000)) + [4095, 4096, 5792, 5793, 65535, 65536, 92681, 92682]:
        want = 0 if n <= 1 else round(__import__("math").log2(n) - 1e-12)
        assert tuned.round_log2(n) == tuned.round_log2(Sym(n)) == want, n
    assert [tuned.ceil_pow2(n) for n in (0, 1, 2, 3, 97, 128, 129, 512, 513)] == [1, 1, 2, 4, 128, 128, 256,
                                                                                    512, 1024]


def test_bucket_rounds_sizes_and_keeps_exact_fields():
    b = tuned.bucket
    assert b("layer_norm", (4096, 768, "float16")) == ((768, "float16"), 12)
    assert b("layer_norm", (5000, 768, "float16")) == b("layer_norm", (3000, 768, "float16"))
    assert b("layer_norm", (4096, 1024, "float16"))[0] != b("layer_norm", (4096, 768, "float16"))[0]
    assert b("bias_gelu", (4096, 3072, "bfloat16"))[0] != b("bias_gelu", (4096, 3072, "float16"))[0]
    # sequence lengths go up to the kernels' power-of-two class, mask kind and widths stay exact
    assert b("masked_softmax", (3000, 97, "float16", "bool")) == ((128, "float16", "bool"), 12)
    assert b("masked_softmax", (3000, 97, "float16", "none"))[0] != b("masked_softmax", (3000, 97, "float16",
                                                                                      "bool"))[0]
    assert b("attention", (32, 128, 12, 64, "float16", True)) == ((128, 12, 64, "float16", True), 12)
    assert b("attention", (40, 100, 12, 64, "float16", True)) == ((128, 12, 64, "float16", True), 12)
    assert b("attention", (32, 128, 12, 64, "float16", False))[0][-1] is False
    assert b("attention_varlen", (4000, 500, 16, 64, "bfloat16")) == ((512, 16, 64, "bfloat16"), 12)
    assert b("not_an_op", (1, 2)) is None


def test_op_keys_and_modes_match_what_the_ops_pass(monkeypatch):
    """The key a tuning case records is exactly the tune_key its op hands to the registry, and the mode is
    "train" exactly when the op's inputs need gradients under grad mode."""
    seen = []
    monkeypatch.setattr(tuned, "lookup", lambda op, key, device, mode: seen.append((op, key, mode)))
    for op, params in tuning.default_shapes(device="cpu"):
        case = testing.build_case(op, params, torch.float16, "cpu")
        seen.clear()
        with torch.no_grad():
            case.run(None, case.inputs)
        assert seen == [(op, case.key, "fwd")], (op, seen, case.key)
        seen.clear()
        leaves = {k: (v.detach().requires_grad_() if k in case.leaves else v) for k, v in case.inputs.items()}
        case.run(None, leaves)
        assert seen == [(op, case.key, "train")], (op, seen)


def test_train_mode_needs_grad_mode_and_an_input_that_requires_grad():
    x, w = torch.zeros(2, requires_grad=True), torch.zeros(2)
    assert _checks.train_mode(x, None) == "train" and _checks.train_mode(w, None) == "fwd"
    with torch.no_grad():
        assert _checks.train_mode(x) == "fwd"


# ------------------------------------------------------------------------------------- selection


@needs_interpreter
@pytest.mark.parametrize("times, winner", [({"torch": 3.0, "triton": 1.0}, "triton"),
                                           ({"torch": 1.0, "triton": 3.0}, "torch")])
def test_fastest_verified_backend_wins(times, winner):
    timer = fake_timer(times)
    res = tuning.tune(ops=["bias_gelu"], shapes=[("bias_gelu", SMALL["bias_gelu"])], dtypes=["fp16"],
                      device="cpu", timer=timer, save=False)
    (e,) = res.entries
    assert e["status"] == {"torch": "ok", "triton": "ok"}
    assert e["winner"] == winner and e["order"][0] == winner and set(e["order"]) == {"torch", "triton"}
    assert e["speedup_vs_torch"] == pytest.approx(times["torch"] / times[winner])
    assert e["key"] == [8, 16, "float16"] and e["bucket"] == {"fixed": [16, "float16"], "tokens_log2": 3}
    # torch once; triton once per config trial (equal fake times: the default tile stays)
    assert sorted(b for b, *_ in timer.seen) == ["torch"] + ["triton"] * len(kgelu.FWD_TILES)
    assert e["triton_configs"] == {"fwd": list(kgelu._TILE)} and len(e["config_trials"]) == len(kgelu.FWD_TILES)
    assert res.path is None and res.smoke and "cuda" in res.unavailable
    table = res.format_table()
    assert "SMOKE RUN" in table and "bias_gelu" in table and winner in table


@needs_interpreter
@pytest.mark.parametrize("mode", ["fwd", "train"])
def test_a_wrong_answer_never_wins(monkeypatch, mode):
    """triton is made 100x 'faster' but subtly wrong (forward, or only the backward in train mode):
    it is rejected and torch wins."""
    import roberta_fast.kernels.bias_gelu as kgelu

    if mode == "fwd":
        real = kgelu.forward
        monkeypatch.setattr(kgelu, "forward", lambda x, b, a: real(x, b, a) * 1.01)
    else:
        real = kgelu.backward

        def wrong_bwd(dy, x, b, a):
            dx, db = real(dy, x, b, a)
            return dx.flip(0), db
        monkeypatch.setattr(kgelu, "backward", wrong_bwd)
    timer = fake_timer({"torch": 1.0, "triton": 0.01})
    res = tuning.tune(ops=["bias_gelu"], shapes=[("bias_gelu", SMALL["bias_gelu"])], dtypes=["fp16"],
                      device="cpu", modes=(mode,), timer=timer, save=False)
    (e,) = res.entries
    assert e["winner"] == "torch" and e["order"] == ["torch"]
    assert e["status"]["triton"].startswith("rejected: " + ("output" if mode == "fwd" else "grad of x"))
    assert "triton" not in e["times_ms"] and ("triton", "bias_gelu", mode) not in timer.seen
    assert "rejected" in res.format_table()


@needs_interpreter
def test_nan_output_and_crashes_never_win(monkeypatch):
    import roberta_fast.kernels.bias_gelu as kgelu
    import roberta_fast.kernels.layer_norm as kln

    real = kgelu.forward

    def nan_fwd(x, b, a):
        y = real(x, b, a)
        y[3, 5] = float("nan")
        return y

    def boom(*a):
        raise RuntimeError("illegal instruction (simulated)")

    monkeypatch.setattr(kgelu, "forward", nan_fwd)
    monkeypatch.setattr(kln, "forward", boom)
    res = tuning.tune(ops=["bias_gelu", "layer_norm"], shapes=list(SMALL.items()), dtypes=["fp16"],
                      device="cpu", timer=fake_timer({"torch": 1.0, "triton": 0.01}), save=False)
    by_op = {e["op"]: e for e in res.entries}
    assert by_op["bias_gelu"]["winner"] == "torch" and "NaN pattern" in by_op["bias_gelu"]["status"]["triton"]
    assert by_op["layer_norm"]["winner"] == "torch"
    assert by_op["layer_norm"]["status"]["triton"].startswith("error: RuntimeError: illegal instruction")


@needs_interpreter
def test_a_backend_that_cannot_take_the_shape_is_not_applicable():
    """head_dim 24 is not a Triton attention head_dim: n/a, and torch wins."""
    res = tuning.tune(ops=["attention"], shapes=[("attention", {"tokens": 16, "seqlen": 8, "heads": 1,
                                                               "head_dim": 24})],
                      dtypes=["fp16"], device="cpu", timer=fake_timer({"torch": 1.0, "triton": 0.01}), save=False)
    (e,) = res.entries
    assert e["status"]["triton"].startswith("n/a:") and "head_dim" in e["status"]["triton"]
    assert e["winner"] == "torch"


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        tuning.tune(ops=["softmax"], device="cpu")
    with pytest.raises(ValueError, match="unknown mode"):
        tuning.tune(ops=["bias_gelu"], modes=("backward",), device="cpu")
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        tuning.tune(ops=["bias_gelu"], dtypes=["int8"], device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            tuning.tune(device="cuda")


# ------------------------------------------------------------------------------------- cache files


@needs_interpreter
def test_cache_round_trip_and_lookup(fake_gpu):
    timer = fake_timer({"torch": 2.0, "triton": 1.0})
    res = tuning.tune(ops=["bias_gelu"], shapes=[("bias_gelu", SMALL["bias_gelu"])], dtypes=["fp16"],
                      device="cpu", timer=timer, save=True)
    path = tuned.cache_path(FAKE_ID)
    assert res.path == path and path.is_file() and path.parent == tuned.cache_dir()
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temporary behind
    doc = json.loads(path.read_text())
    assert doc["schema"] == tuned.SCHEMA and doc["identity"] == FAKE_ID
    assert [e["winner"] for e in doc["entries"]] == ["triton"]
    assert tuned.load_entries(CUDA0) == (path, doc["entries"])
    assert tuned.lookup("bias_gelu", (8, 16, "float16"), CUDA0) == ("triton", "torch")
    assert first("bias_gelu", (11, 16, "float16")) == "triton"  # same bucket
    assert first("bias_gelu", (16, 16, "float16")) is None  # the next bucket: nothing is borrowed
    assert first("bias_gelu", (8, 16, "float16"), mode="train") is None  # another mode
    assert first("bias_gelu", (8, 32, "float16")) is None  # another width
    assert first("bias_gelu", (8, 16, "bfloat16")) is None  # another dtype
    assert first("layer_norm", (8, 16, "float16")) is None  # another op
    # a second tune merges: the first op's entry stays, the new one joins
    tuning.tune(ops=["layer_norm"], shapes=[("layer_norm", SMALL["layer_norm"])], dtypes=["fp16"], device="cpu",
                timer=fake_timer({"torch": 1.0, "triton": 2.0}), save=True)
    doc = json.loads(path.read_text())
    assert sorted((e["op"], e["winner"]) for e in doc["entries"]) == [("bias_gelu", "triton"),
                                                                     ("layer_norm", "torch")]
    assert first("layer_norm", (8, 24, "float16")) == "torch"


def test_lookup_reads_the_file_once(fake_gpu, monkeypatch):
    tuned.save_entries([entry("layer_norm", (768, "float16"), 12, ["triton", "torch"])], FAKE_ID)
    calls = []
    real = tuned.read_entries
    monkeypatch.setattr(tuned, "read_entries", lambda *a: calls.append(1) or real(*a))
    for _ in range(50):
        assert first("layer_norm", (4096, 768, "float16")) == "triton"
    assert len(calls) == 1


def test_file_name_per_gpu_and_versions():
    ident = tuned.identity("cpu")
    assert set(FAKE_ID) == set(ident) and ident["schema"] == tuned.SCHEMA
    assert ident["cuda_ext"] == backends.cuda_built() and ident["gpu"] == "cpu"
    base = tuned.cache_path(FAKE_ID)
    assert base.name.startswith("tuning_Fake-GPU-80GB-HBM3_sm90_") and base.suffix == ".json"
    changes = {"gpu": "NVIDIA A100-SXM4-80GB", "capability": "8.0", "driver": "12.8", "torch": "2.12.0",
               "torch_cuda": "13.0", "triton": "3.7.0", "roberta_fast": "0.2.0", "cuda_ext": False,
               "code": "fedcba9876543210", "schema": "roberta_fast.tuning/1"}
    paths = {base}
    for field, value in changes.items():
        p = tuned.cache_path(dict(FAKE_ID, **{field: value}))
        assert p not in paths, field
        paths.add(p)
    assert tuned.cache_path(dict(FAKE_ID)) == base  # the same identity, the same file


@pytest.mark.parametrize("content, message", [
    ("{not json", "corrupt"),
    ("[1, 2, 3]", "schema"),
    (json.dumps({"schema": "someone_else/7", "entries": []}), "schema"),
    (json.dumps({"schema": tuned.SCHEMA, "identity": dict(FAKE_ID, gpu="Other GPU"), "entries": []}),
     "another GPU"),
    (json.dumps({"schema": tuned.SCHEMA, "identity": FAKE_ID, "entries": [{"op": "layer_norm"}]}), "malformed"),
    (json.dumps({"schema": tuned.SCHEMA, "identity": FAKE_ID,
                 "entries": [entry("layer_norm", (768, "float16"), 12, ["rocm"])]}), "malformed"),
    (json.dumps({"schema": tuned.SCHEMA, "identity": FAKE_ID,
                 "entries": [dict(entry("layer_norm", (768, "float16"), 12, ["triton"]),
                                  triton_configs={"fwd": "big"})]}), "malformed"),
    # a file of the first schema (no Triton configs) that somehow sits at this path
    (json.dumps({"schema": "roberta_fast.tuning/1", "identity": dict(FAKE_ID, schema="roberta_fast.tuning/1"),
                 "entries": [entry("layer_norm", (768, "float16"), 12, ["torch"])]}), "schema"),
])
def test_corrupt_or_foreign_file_is_ignored_with_a_warning(fake_gpu, content, message):
    path = tuned.cache_path(FAKE_ID)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match=message):
        assert first("layer_norm", (4096, 768, "float16")) is None
    assert tuned.load_entries(CUDA0)[1] == []
    # a save over it replaces it with a valid file
    tuned.save_entries([entry("layer_norm", (768, "float16"), 12, ["torch"])], FAKE_ID)
    with torch.no_grad():
        assert first("layer_norm", (4096, 768, "float16")) == "torch"


def test_a_failing_identity_never_raises(monkeypatch):
    def broken(device):
        raise RuntimeError("no driver")

    monkeypatch.setattr(tuned, "identity", broken)
    with pytest.warns(RuntimeWarning, match="no driver"):
        assert first("layer_norm", (4096, 768, "float16")) is None


def test_clear(fake_gpu):
    tuned.save_entries([entry("layer_norm", (768, "float16"), 12, ["torch"])], FAKE_ID)
    other = tuned.cache_path(dict(FAKE_ID, gpu="Other"))
    other.write_text("{}")
    keep = tuned.cache_dir() / "notes.txt"
    keep.write_text("not ours")
    with torch.no_grad():
        assert first("layer_norm", (4096, 768, "float16")) == "torch"
    removed = tuned.clear()
    assert sorted(removed) == sorted([tuned.cache_path(FAKE_ID), other]) and keep.exists()
    with torch.no_grad():
        assert first("layer_norm", (4096, 768, "float16")) is None
    assert tuned.clear() == []


# ------------------------------------------------------------------------------------- lookup rules


def test_env_switch_disables_lookups(fake_gpu, monkeypatch):
    tuned.save_entries([entry("layer_norm", (768, "float16"), 12, ["triton"])], FAKE_ID)
    with torch.no_grad():
        for off in ("0", "off", "false"):
            monkeypatch.setenv("ROBERTA_FAST_TUNING", off)
            assert first("layer_norm", (4096, 768, "float16")) is None
        monkeypatch.setenv("ROBERTA_FAST_TUNING", "1")
        assert first("layer_norm", (4096, 768, "float16")) == "triton"


def test_the_registry_skips_a_tuned_backend_that_cannot_run(fake_gpu, monkeypatch):
    tuned.save_entries([entry("layer_norm", (768, "float16"), 12, ["cuda", "triton", "torch"])], FAKE_ID)
    key = (4096, 768, "float16")
    resolve = backends.resolve
    monkeypatch.setattr(backends, "cuda_built", lambda: True)
    assert resolve("layer_norm", None, CUDA0, tune_key=key) == "cuda"
    monkeypatch.setattr(backends, "cuda_built", lambda: False)  # _C gone since the tuning
    assert resolve("layer_norm", None, CUDA0, tune_key=key) == "triton"
    monkeypatch.setattr(backends, "triton_import_error", lambda: "ImportError: no triton")
    assert resolve("layer_norm", None, CUDA0, tune_key=key) == "torch"


def test_modes_and_mask_kinds_are_never_borrowed(fake_gpu):
    """A choice applies only where it was measured: its mode ("fwd" / "train") and its mask kind."""
    tuned.save_entries([entry("bias_gelu", (3072, "float16"), 12, ["triton"]),
                        entry("bias_gelu", (3072, "float16"), 12, ["torch"], mode="train"),
                        entry("layer_norm", (768, "float16"), 12, ["triton"]),
                        entry("attention", (128, 12, 64, "float16", True), 12, ["torch"]),
                        entry("masked_softmax", (512, "float16", "bool"), 17, ["torch"])], FAKE_ID)
    assert first("bias_gelu", (4096, 3072, "float16")) == "triton"
    assert first("bias_gelu", (4096, 3072, "float16"), mode="train") == "torch"
    assert first("layer_norm", (4096, 768, "float16"), mode="train") is None  # only fwd was measured
    assert first("attention", (32, 128, 12, 64, "float16", True)) == "torch"
    assert first("attention", (32, 128, 12, 64, "float16", False)) is None
    assert first("masked_softmax", (1 << 17, 512, "float16", "bool")) == "torch"
    assert first("masked_softmax", (1 << 17, 512, "float16", "none")) is None
    assert first("masked_softmax", (1 << 17, 512, "float16", "additive")) is None


def test_resolve_uses_the_tuned_choice(fake_gpu, monkeypatch):
    monkeypatch.setattr(backends, "cuda_built", lambda: True)
    key = (4096, 768, "float16")
    resolve = backends.resolve
    assert resolve("layer_norm", None, CUDA0, tune_key=key) == "cuda"  # nothing tuned: the default order
    tuned.save_entries([entry("layer_norm", (768, "float16"), 12, ["torch", "triton"])], FAKE_ID)
    assert resolve("layer_norm", None, CUDA0, tune_key=key) == "torch"
    assert resolve("layer_norm", None, CUDA0, tune_key=key, mode="train") == "cuda"  # train not measured
    assert resolve("layer_norm", None, CUDA0, tune_key=(4096, 1024, "float16")) == "cuda"  # not tuned
    # a tuned backend that cannot take the call falls back to the next one, then to the default order
    tuned.save_entries([entry("layer_norm", (768, "float16"), 12, ["triton", "torch"])], FAKE_ID)
    no_triton = lambda b: "no" if b == "triton" else None  # noqa: E731
    assert resolve("layer_norm", None, CUDA0, unsupported=no_triton, tune_key=key) == "torch"
    assert resolve("layer_norm", "cuda", CUDA0, tune_key=key) == "cuda"  # a named backend wins
    monkeypatch.setenv("ROBERTA_FAST_BACKEND", "cuda")
    assert resolve("layer_norm", None, CUDA0, tune_key=key) == "cuda"
    monkeypatch.delenv("ROBERTA_FAST_BACKEND")
    monkeypatch.setenv("ROBERTA_FAST_TUNING", "0")
    assert resolve("layer_norm", None, CUDA0, tune_key=key) == "cuda"
    # CPU tensors never consult the tuner
    assert resolve("layer_norm", None, torch.device("cpu"), tune_key=key) == "torch"


@pytest.mark.parametrize("dynamic", [False, True])
def test_lookup_traces_under_torch_compile(fake_gpu, monkeypatch, dynamic):
    """fullgraph: the lookup (env switch, first file read, bucketing of symbolic sizes) traces without a
    graph break, and the compiled answers are the eager ones."""
    monkeypatch.setattr(backends, "cuda_built", lambda: True)
    tuned.save_entries([entry("layer_norm", (768, "float32"), 12, ["triton", "torch"]),
                         entry("attention", (128, 12, 64, "float32", True), 12, ["torch"])], FAKE_ID)
    tuned.reset()  # the first read happens inside the traced call

    def f(x):
        b1 = backends.resolve("layer_norm", None, CUDA0, tune_key=(x.shape[0], x.shape[1], "float32"))
        b2 = backends.resolve("attention", None, CUDA0, tune_key=(x.shape[0] // 128, 128, 12, 64, "float32", True))
        return x + (1.0 if b1 == "triton" else 2.0) + (10.0 if b2 == "torch" else 20.0)

    torch._dynamo.reset()
    g = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="eager")
    with torch.no_grad():
        for n in (4096, 4000, 8192, 1024):
            x = torch.zeros(n, 768)
            assert g(x)[0, 0].item() == f(x)[0, 0].item(), n
        assert f(torch.zeros(4096, 768))[0, 0].item() == 11.0 and f(torch.zeros(1024, 768))[0, 0].item() == 22.0
    torch._dynamo.reset()


# ------------------------------------------------------------------------------- the default order per GPU


def test_a_tuned_order_wins_over_the_architecture_default(fake_gpu, monkeypatch):
    """On sm_90 attention defaults to triton before cuda; a tuning that measured cuda faster for a bucket wins
    there (and only there)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(backends, "cuda_built", lambda: True)
    backends.reset()
    key, other = (32, 128, 12, 64, "float16", True), (64, 128, 12, 64, "float16", True)
    assert backends.resolve("attention", None, CUDA0, tune_key=key) == "triton"  # nothing tuned: sm_90's default
    tuned.save_entries([entry("attention", (128, 12, 64, "float16", True), 12, ["cuda", "triton", "torch"])],
                       FAKE_ID)
    assert backends.resolve("attention", None, CUDA0, tune_key=key) == "cuda"
    assert backends.resolve("attention", None, CUDA0, tune_key=other) == "triton"  # another bucket
    assert backends.resolve("attention", None, CUDA0, tune_key=key, mode="train") == "triton"  # another mode
    monkeypatch.setenv("ROBERTA_FAST_TUNING", "0")
    backends.reset()
    assert backends.resolve("attention", None, CUDA0, tune_key=key) == "triton"
    backends.reset()


# ------------------------------------------------------------------------------- Triton block configs

KERNEL_FILES = {"attention": kattn, "attention_varlen": kattn, "layer_norm": kln, "bias_gelu": kgelu,
                "masked_softmax": ksm, "linear": klin}
CPU = torch.device("cpu")


def config_timer(base: dict, bonus):
    """A fake timer: base[backend] ms, minus bonus(configs) for a triton config trial."""
    seen = []

    def timer(fn, *, backend, configs=None, **info):
        seen.append((backend, configs))
        return base[backend] - (bonus(configs) if backend == "triton" and configs is not None else 0.0)

    timer.seen = seen
    return timer


def test_without_a_tuning_the_configs_are_todays():
    """The defaults are exactly the configs the kernels launched before config tuning, and each is the first
    candidate of its class; nothing is installed until a tuning is read."""
    A = kattn.AttnConfig
    assert kattn.INTERPRET_CONFIG == A(16, 16, 4, 1)
    today = {"fwd": {"short": A(64, 64, 4, 2), "long": A(128, 128, 8, 3)}, "bwd_dq": A(128, 64, 8, 3),
             "bwd_dkdv": A(64, 128, 8, 3)}
    for d in kattn.HEAD_DIMS:
        assert kattn.CONFIGS[("fwd", d, "short")] == today["fwd"]["short"]
        assert kattn.CONFIGS[("fwd", d, "long")] == (A(128, 64, 8, 3) if d == 128 else today["fwd"]["long"])
        assert kattn.CONFIGS[("bwd_dq", d, "any")] == (A(128, 32, 8, 2) if d == 128 else today["bwd_dq"])
        assert kattn.CONFIGS[("bwd_dkdv", d, "any")] == {64: A(32, 128, 8, 3), 128: A(32, 128, 8, 2)}.get(
            d, today["bwd_dkdv"])
    assert [kln._row_config(b) for b in kln._BLOCKS] == [(128, 16, 8), (512, 4, 8), (1024, 2, 8), (2048, 1, 8),
                                                       (4096, 1, 16), (8192, 1, 32)]
    assert [kln._row_config(b, True) for b in kln._BLOCKS] == [(128, 8, 8), (512, 2, 8), (1024, 1, 8),
                                                             (2048, 1, 16), (4096, 1, 32), (8192, 1, 32)]
    assert kgelu._TILE == (8, 128, 4) and kgelu._tile(32768, 3072) == (8, 128, 4)
    assert ksm._CONFIGS == ((128, 8, 8), (512, 4, 8), (2048, 1, 8), (8192, 1, 16))
    # each class's first candidate is the default of its bucket
    for seq, d in [(s, d) for s in (16, 128, 256, 512) for d in kattn.HEAD_DIMS]:
        space = kattn.config_space("attention", (seq, 12, d, "float16", True), True)
        assert space["fwd"][0] == kattn.CONFIGS[("fwd", d, kattn.seqlen_bucket(seq))]
        assert space["bwd_dq"][0] == kattn.CONFIGS[("bwd_dq", d, "any")]
        assert space["bwd_dkdv"][0] == kattn.CONFIGS[("bwd_dkdv", d, "any")]
    for n in (1, 96, 768, 1024, 3000, 8192):
        space = kln.config_space("layer_norm", (n, "float16"), True)
        assert space["fwd"][0] == kln._row_config(n) and space["bwd"][0] == kln._row_config(n, True)
        assert kgelu.config_space("bias_gelu", (n, "float16"), True)["fwd"][0] == kgelu._TILE
        assert ksm.config_space("masked_softmax", (tuned.ceil_pow2(n), "float16", "bool"))["fwd"][0] == \
            ksm._config(n)
    assert kattn.config_space("attention", (128, 12, 48, "float16", True)) == {}
    assert kln.config_space("layer_norm", (8193, "float16")) == {}
    assert ksm.config_space("masked_softmax", (16384, "float16", "none")) == {}
    # with nothing installed no launch looks anything up
    assert not any(m._TUNED.active for m in KERNEL_FILES.values())


def test_every_candidate_is_compiled_ahead_of_time():
    """Each config a tuning can pick is in its kernel file's aot_specs(), so the compile check covers it."""
    specs = {(s.fn, tuple(sorted((k, v) for k, v in s.constexprs.items() if k not in ("HAS_BIAS", "MASK_KIND",
                                                                                    "UPCAST", "DROPOUT"))),
              s.num_warps, s.num_stages) for m in (kattn, kln, kgelu, ksm) for s in m.aot_specs()}
    n = 0
    for d in kattn.HEAD_DIMS:
        for seq in (128, 512):
            for cls, cands in kattn.config_space("attention", (seq, 12, d, "float16", True), True).items():
                for c in cands:
                    key = (kattn._KERNELS[cls], tuple(sorted({"HEAD_DIM": d, "BLOCK_M": c.block_m,
                                                              "BLOCK_N": c.block_n}.items())), c.num_warps,
                           c.num_stages)
                    assert key in specs, (cls, d, c)
                    n += 1
    for b in kln._BLOCKS:
        space = kln.config_space("layer_norm", (b, "float16"), True)
        for cls, fn in (("fwd", kln._layer_norm_fwd_kernel), ("bwd", kln._layer_norm_bwd_kernel)):
            for blk, rows, w in space[cls]:
                assert (fn, (("BLOCK", blk), ("ROWS", rows)), w, kln._NUM_STAGES) in specs, (cls, blk, rows, w)
                n += 1
    space = kgelu.config_space("bias_gelu", (3072, "float16"), True)
    for cls, fn in (("fwd", kgelu._bias_gelu_fwd_kernel), ("bwd", kgelu._bias_gelu_bwd_kernel)):
        for bm, bn, w in space[cls]:
            assert (fn, (("BLOCK_M", bm), ("BLOCK_N", bn)), w, 2) in specs, (cls, bm, bn, w)
            n += 1
    for k in (128, 512, 2048, 8192):
        for bk, rows, w in ksm.config_space("masked_softmax", (k, "float16", "bool"), True)["fwd"]:
            assert (ksm._masked_softmax_fwd_kernel, (("BLOCK_K", bk), ("ROWS", rows)), w, 2) in specs, (bk, rows, w)
            n += 1
    assert n > 40
    # the candidate lists stay small: 2-3 per class (the compile check's time)
    for d in kattn.HEAD_DIMS:
        assert all(1 <= len(c) <= 3 for c in kattn.config_space("attention", (512, 1, d, "f", False), True).values())


def test_the_tuner_enumerates_and_verifies_config_candidates():
    """train mode, attention head_dim 32: the defaults, then each class's other candidates with the best so
    far for the rest (1 + 2 + 1 + 1 trials), each verified then timed; the fastest verified combination is
    the triton backend's time and is recorded."""
    A = kattn.AttnConfig
    fast_fwd, fast_dkdv = [128, 64, 8, 3], [64, 64, 4, 3]
    timer = config_timer({"torch": 2.0, "triton": 1.0},
                         lambda c: 0.2 * (c["fwd"] == fast_fwd) + 0.1 * (c["bwd_dkdv"] == fast_dkdv))
    shape = {"tokens": 24, "seqlen": 12, "heads": 2, "head_dim": 32}
    res = tuning.tune(ops=["attention"], shapes=[("attention", shape)], dtypes=["fp16"], device="cpu",
                      modes=("train",), timer=timer, save=False)
    (e,) = res.entries
    d = A(64, 64, 4, 2), A(128, 64, 8, 3), A(64, 128, 8, 3)  # the short bucket's defaults at head_dim 32
    want = [(d[0], d[1], d[2]), (A(128, 128, 8, 3), d[1], d[2]), (A(128, 64, 8, 3), d[1], d[2]),
            (A(128, 64, 8, 3), A(64, 64, 4, 3), d[2]), (A(128, 64, 8, 3), d[1], A(64, 64, 4, 3))]
    assert [c for b, c in timer.seen if b == "triton"] == [
        {"fwd": list(f), "bwd_dq": list(q), "bwd_dkdv": list(k)} for f, q, k in want]
    assert [t["status"] for t in e["config_trials"]] == ["ok"] * 5
    assert e["triton_configs"] == {"fwd": fast_fwd, "bwd_dq": [128, 64, 8, 3], "bwd_dkdv": fast_dkdv}
    assert e["times_ms"]["triton"] == pytest.approx(0.7) and e["winner"] == "triton"
    assert "fwd=128,64,8,3 bwd_dkdv=64,64,4,3" in res.format_table()


def test_a_wrong_config_is_rejected_however_fast(monkeypatch):
    """A candidate whose tile misses part of the row gives a wrong LayerNorm: the verification rejects it, it
    is never timed, and a verified config wins."""
    wrong = (64, 16, 8)  # BLOCK 64 < N = 96: the last 32 columns are never computed
    monkeypatch.setitem(kln.FWD_CANDIDATES, 128, ((128, 16, 8), wrong, (128, 8, 4)))
    timer = config_timer({"torch": 2.0, "triton": 1.0},
                         lambda c: {(64, 16, 8): 0.99, (128, 8, 4): 0.5}.get(tuple(c["fwd"]), 0.0))
    res = tuning.tune(ops=["layer_norm"], shapes=[("layer_norm", {"tokens": 7, "hidden": 96})], dtypes=["fp16"],
                      device="cpu", timer=timer, save=False)
    (e,) = res.entries
    st = [t["status"] for t in e["config_trials"]]
    assert st[0] == "ok" and st[1].startswith("rejected: ") and st[2] == "ok", st
    assert ("triton", {"fwd": list(wrong)}) not in timer.seen
    assert e["triton_configs"] == {"fwd": [128, 8, 4]} and e["times_ms"]["triton"] == pytest.approx(0.5)
    assert "rejected" in res.format_table()


def test_no_configs_times_the_defaults_only():
    timer = config_timer({"torch": 2.0, "triton": 1.0}, lambda c: 0.5)
    res = tuning.tune(ops=["bias_gelu"], shapes=[("bias_gelu", SMALL["bias_gelu"])], dtypes=["fp16"],
                      device="cpu", timer=timer, save=False, configs=False)
    (e,) = res.entries
    assert timer.seen == [("torch", None), ("triton", None)]
    assert e["triton_configs"] is None and e["config_trials"] == [] and e["times_ms"]["triton"] == 1.0


class _Spy:
    """Stands in for a kernel's launcher (`fn[grid](...)` or a Launcher call) and records each launch's meta."""

    def __init__(self, real, log, name):
        self.real, self.log, self.name = real, log, name

    def __getitem__(self, grid):  # fn[grid](*args, **meta)
        def launch(*args, **meta):
            self.log.append((self.name, meta))
            return self.real[grid](*args, **meta)
        return launch

    def __call__(self, key, grid, args, meta):  # Launcher(key, grid, args, meta)
        self.log.append((self.name, meta))
        return self.real(key, grid, args, meta)


def _spy(monkeypatch, mod, names):
    log = []
    for n in names:
        monkeypatch.setattr(mod, n, _Spy(getattr(mod, n), log, n))
    return log


def _metas(log):
    return {name: (meta.get("BLOCK_M", meta.get("BLOCK")), meta.get("BLOCK_N", meta.get("ROWS")), meta["num_warps"],
                   meta.get("num_stages")) for name, meta in log}


def test_a_tuned_config_reaches_the_launch(monkeypatch):
    """Installed for a device and a bucket, the configs are what the forward and backward kernels launch with
    (on CPU tensors under the interpreter, where the default is INTERPRET_CONFIG); other buckets keep the
    defaults; forgetting the table restores them."""
    A = kattn.AttnConfig
    log = _spy(monkeypatch, kattn, ["_FWD", "_attn_bwd_dq", "_attn_bwd_dkdv"])
    B, S, H, D = 2, 12, 2, 16
    fixed, tok = tuned.bucket("attention", (B, S, H, D, "float32", False))
    cfgs = {"fwd": A(128, 128, 8, 3), "bwd_dq": A(128, 64, 8, 3), "bwd_dkdv": A(64, 128, 8, 3)}

    def run(batch):
        q, k, v = (torch.randn(batch, S, H, D, requires_grad=True) for _ in range(3))
        o = ops.attention(q, k, v, backend="triton")
        torch.autograd.grad(o.float().square().sum(), (q, k, v))
        got = _metas(log)
        log.clear()
        return got

    default = {"_FWD": (16, 16, 4, 1), "_attn_bwd_dq": (16, 16, 4, 1), "_attn_bwd_dkdv": (16, 16, 4, 1)}
    assert run(B) == default
    try:
        kattn.install_tuned(CPU, {("attention", *fixed, tok): {c: list(v) for c, v in cfgs.items()}}, tuned.bucket)
        assert kattn._TUNED.active
        assert run(B) == {"_FWD": (128, 128, 8, 3), "_attn_bwd_dq": (128, 64, 8, 3), "_attn_bwd_dkdv": (64, 128, 8, 3)}
        assert run(8 * B) == default  # another tokens bucket
    finally:
        kattn.install_tuned(None, None)
    assert not kattn._TUNED.active and run(B) == default

    log = _spy(monkeypatch, kln, ["_FWD", "_layer_norm_bwd_kernel"])
    x, w, b = torch.randn(7, 400, requires_grad=True), torch.randn(400), torch.randn(400)
    fixed, tok = tuned.bucket("layer_norm", (7, 400, "float32"))
    try:
        kln.install_tuned(CPU, {("layer_norm", *fixed, tok): {"fwd": [512, 2, 4], "bwd": [512, 2, 4]}}, tuned.bucket)
        y = ops.layer_norm(x, w, b, backend="triton")
        torch.autograd.grad(y.sum(), x)
        assert _metas(log) == {"_FWD": (512, 2, 4, 2), "_layer_norm_bwd_kernel": (512, 2, 4, 2)}
    finally:
        kln.install_tuned(None, None)
    log.clear()
    y = ops.layer_norm(x, w, b, backend="triton")
    torch.autograd.grad(y.sum(), x)
    assert _metas(log) == {"_FWD": (512, 4, 8, 2), "_layer_norm_bwd_kernel": (512, 2, 8, 2)}


def test_install_keeps_only_candidates():
    """A config that is not among its bucket's candidates (so not compiled ahead of time) is dropped with a
    warning; the others of the table stay."""
    fixed, tok = tuned.bucket("bias_gelu", (4096, 3072, "float16"))
    try:
        with pytest.warns(RuntimeWarning, match="not one of its candidates"):
            kgelu.install_tuned(CUDA0, {("bias_gelu", *fixed, tok): {"fwd": [16, 128, 4], "bwd": [32, 64, 2]},
                                        ("layer_norm", 768, "float16", 12): {"fwd": [1024, 1, 4]}}, tuned.bucket)
        assert kgelu._TUNED.pick("fwd", CUDA0, "bias_gelu", (4096, 3072, "float16")) == (16, 128, 4)
        assert kgelu._TUNED.pick("bwd", CUDA0, "bias_gelu", (4096, 3072, "float16")) is None  # the default
        assert kgelu._TUNED.pick("fwd", torch.device("cuda", 1), "bias_gelu", (4096, 3072, "float16")) is None
        with kgelu.forced_configs({"fwd": (8, 256, 8)}):  # the tuner's trials win over the table
            assert kgelu._TUNED.pick("fwd", CUDA0, "bias_gelu", (4096, 3072, "float16")) == (8, 256, 8)
            assert kgelu._TUNED.pick("bwd", CUDA0, "bias_gelu", (4096, 3072, "float16")) is None
        assert kgelu._TUNED.pick("fwd", CUDA0, "bias_gelu", (4096, 3072, "float16")) == (16, 128, 4)
    finally:
        kgelu.install_tuned(None, None)
    assert not kgelu._TUNED.active
    with pytest.warns(RuntimeWarning, match="ignoring the tuned attention configs"):  # a bucket it cannot read
        kattn.install_tuned(CUDA0, {("attention", 128, 12): {"fwd": [64, 64, 4, 2]}}, tuned.bucket)
    assert not kattn._TUNED.active


def test_a_repeated_shape_is_bucketed_once():
    """The host functions look a tuned config up per launch: after the first call of a key it is one dict lookup
    (no bucketing, no dtype naming); a new table forgets the remembered answers."""
    calls = []

    def counting_bucket(op, key):
        calls.append(key)
        return tuned.bucket(op, key)

    fixed, tok = tuned.bucket("layer_norm", (4096, 768, "float16"))
    try:
        kln.install_tuned(CUDA0, {("layer_norm", *fixed, tok): {"fwd": [1024, 1, 4]}}, counting_bucket)
        for _ in range(20):
            assert kln._TUNED.pick("fwd", CUDA0, "layer_norm", (4096, 768, torch.float16)) == (1024, 1, 4)
            assert kln._TUNED.pick("bwd", CUDA0, "layer_norm", (4096, 768, torch.float16)) is None
        assert calls == [(4096, 768, "float16")] * 2
        kln.install_tuned(CUDA0, {("layer_norm", *fixed, tok): {"fwd": [1024, 2, 8]}}, counting_bucket)
        assert kln._TUNED.pick("fwd", CUDA0, "layer_norm", (4096, 768, torch.float16)) == (1024, 2, 8)
    finally:
        kln.install_tuned(None, None)
    assert kln._TUNED.memo == {} and not kln._TUNED.active


def test_forward_kernels_take_the_fwd_entry_backward_ones_the_train_entry():
    e_fwd = dict(entry("attention", (128, 12, 64, "float16", True), 12, ["triton"]),
                 triton_configs={"fwd": [128, 64, 8, 3]})
    e_train = dict(entry("attention", (128, 12, 64, "float16", True), 12, ["triton"], mode="train"),
                   triton_configs={"fwd": [64, 64, 4, 2], "bwd_dq": [64, 64, 4, 3], "bwd_dkdv": [32, 64, 4, 3]})
    e_only_train = dict(entry("attention", (512, 12, 64, "float16", True), 12, ["triton"], mode="train"),
                        triton_configs={"fwd": [128, 128, 8, 3], "bwd_dq": [128, 64, 8, 3]})
    got = tuned.build_configs([e_fwd, e_train, e_only_train, entry("layer_norm", (768, "float16"), 12, ["cuda"])])
    assert got == {("attention", 128, 12, 64, "float16", True, 12): {"fwd": [128, 64, 8, 3], "bwd_dq": [64, 64, 4, 3],
                                                                    "bwd_dkdv": [32, 64, 4, 3]},
                   ("attention", 512, 12, 64, "float16", True, 12): {"fwd": [128, 128, 8, 3],
                                                                    "bwd_dq": [128, 64, 8, 3]}}


@needs_interpreter
def test_cache_round_trip_with_configs(fake_gpu, monkeypatch):
    """tune -> file (triton_configs, config_trials) -> read back for cuda:0 -> the kernel file's lookup; a named
    triton backend reads the table too; reset / ROBERTA_FAST_TUNING=0 leave the defaults."""
    timer = config_timer({"torch": 2.0, "triton": 1.0}, lambda c: 0.5 * (c["fwd"] == [16, 128, 4]))
    res = tuning.tune(ops=["bias_gelu"], shapes=[("bias_gelu", SMALL["bias_gelu"])], dtypes=["fp16"],
                      device="cpu", timer=timer, save=True)
    doc = json.loads(res.path.read_text())
    (e,) = doc["entries"]
    assert doc["schema"] == tuned.SCHEMA == "roberta_fast.tuning/2"
    assert e["triton_configs"] == {"fwd": [16, 128, 4]} and len(e["config_trials"]) == 3
    assert [t["configs"]["fwd"] for t in e["config_trials"]] == [list(c) for c in kgelu.FWD_TILES]
    key = (8, 16, "float16")
    backends.implementation("triton", "bias_gelu")  # the registry connects the kernel file (as on any use)
    assert kgelu._TUNED.pick("fwd", CUDA0, "bias_gelu", key) is None  # nothing read yet
    assert backends.resolve("bias_gelu", "triton", CUDA0, tune_key=key) == "triton"  # named: reads the table
    assert kgelu._TUNED.pick("fwd", CUDA0, "bias_gelu", key) == (16, 128, 4)
    assert kgelu._TUNED.pick("fwd", CUDA0, "bias_gelu", (8, 32, "float16")) is None  # another width
    assert kgelu._TUNED.pick("fwd", CUDA0, "bias_gelu", (64, 16, "float16")) is None  # another tokens bucket
    tuned.reset()
    assert not kgelu._TUNED.active
    assert first("bias_gelu", key) == "triton"  # an automatic lookup reads the table too
    assert kgelu._TUNED.pick("fwd", CUDA0, "bias_gelu", key) == (16, 128, 4)
    tuned.reset()
    monkeypatch.setenv("ROBERTA_FAST_TUNING", "0")
    assert backends.resolve("bias_gelu", "triton", CUDA0, tune_key=key) == "triton"
    assert not kgelu._TUNED.active
    # a new tuning replaces the configs from the next call on
    monkeypatch.delenv("ROBERTA_FAST_TUNING")
    tuned.save_entries([dict(e, triton_configs={"fwd": [8, 256, 8]})], FAKE_ID)
    assert not kgelu._TUNED.active and first("bias_gelu", key) == "triton"
    assert kgelu._TUNED.pick("fwd", CUDA0, "bias_gelu", key) == (8, 256, 8)


def test_linear_configs_reach_the_kernel_file_through_the_registry(fake_gpu):
    """A saved linear tuning with Triton configs (FFN1 at 16k tokens, train: the forward's and the two backward
    GEMMs' classes) is read for cuda:0 and installed in kernels/linear.py (connected by the registry like the
    other kernel files); another bucket keeps the defaults."""
    fixed, tok = tuned.bucket("linear", (16384, 3072, 768, "float16"))
    cfgs = {"fwd": [128, 256, 64, 8, 8, 4], "bwd_dx": [256, 128, 64, 8, 8, 3], "bwd_dw": [128, 64, 64, 8, 4, 4]}
    tuned.save_entries([dict(entry("linear", fixed, tok, ["triton", "torch"], mode="train"), triton_configs=cfgs)],
                       FAKE_ID)
    key = (16384, 3072, 768, torch.float16)
    backends.implementation("triton", "linear")  # the registry connects the kernel files (as on any use)
    assert backends.resolve("linear", "triton", CUDA0, tune_key=(16384, 3072, 768, "float16")) == "triton"
    assert {c: klin._TUNED.pick(c, CUDA0, "linear", key) for c in cfgs} == {c: tuple(v) for c, v in cfgs.items()}
    assert klin._TUNED.pick("fwd", CUDA0, "linear", (16384, 768, 3072, torch.float16)) is None  # another bucket
    tuned.reset()
    assert not klin._TUNED.active


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_without_gpu_writes_nothing(monkeypatch, capsys):
    from roberta_fast import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["tune", "--quick"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA GPU" in out[0]
    assert cli.main(["tune", "--device", "cuda"]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not tuned.cache_dir().exists()
    assert cli.main(["tune", "--show"]) == 0
    assert "no CUDA GPU here; 0 tuning file(s)" in capsys.readouterr().out


@needs_interpreter
def test_cli_cpu_smoke_run(monkeypatch, capsys):
    from roberta_fast import cli

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CLI would re-execute itself under TRITON_INTERPRET=1")
    assert cli.main(["tune", "--device", "cpu", "--ops", "bias_gelu,layer_norm", "--dtypes", "fp16",
                     "--quiet", "--rep-ms", "1"]) == 0
    out = capsys.readouterr().out
    assert "SMOKE RUN" in out and "NOT a tuning" in out and "nothing written (smoke run)" in out
    assert "bias_gelu" in out and "layer_norm" in out and "winner" in out
    assert not tuned.cache_dir().exists()
    assert cli.main(["tune", "--device", "cpu", "--ops", "bias_gelu", "--dtypes", "fp16", "--quiet", "--rep-ms", "1",
                     "--no-configs"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("bias_gelu"))
    assert "triton config" in out and row.split()[-1] == "-"  # no config measured, none recorded
    assert cli.main(["tune", "--device", "cpu", "--dtypes", "int8"]) == 2


def test_cli_clear(fake_gpu, capsys):
    from roberta_fast import cli

    tuned.save_entries([entry("layer_norm", (768, "float16"), 12, ["torch"])], FAKE_ID)
    assert cli.main(["tune", "--clear"]) == 0
    assert "removed 1 tuning file(s)" in capsys.readouterr().out
    assert not list(tuned.cache_dir().glob("tuning_*.json"))


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_real_quick_tune_on_one_shape():
    shape = {"tokens": 4096, "hidden": 768}
    res = tuning.tune(ops=["layer_norm"], shapes=[("layer_norm", shape)], dtypes=["fp16"], device="cuda",
                      rep_ms=10, warmup_ms=5)
    (e,) = res.entries
    assert e["status"]["torch"] == "ok" and e["status"]["triton"] == "ok", e["status"]
    if backends.cuda_built():
        assert e["status"]["cuda"] == "ok", e["status"]
    assert all(t > 0 for t in e["times_ms"].values())
    assert e["winner"] == min(e["times_ms"], key=e["times_ms"].get)
    assert res.path is not None and res.path.is_file()
    doc = json.loads(res.path.read_text())
    assert doc["identity"]["gpu"] == torch.cuda.get_device_name() and doc["entries"][0]["winner"] == e["winner"]
    dev = torch.device("cuda", torch.cuda.current_device())
    assert first("layer_norm", (4096, 768, "float16"), dev) == e["winner"]
    assert backends.resolve("layer_norm", None, dev, tune_key=(4096, 768, "float16")) == e["winner"]
