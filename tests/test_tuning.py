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

from roberta_fast import backends, testing, tuned, tuning
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
    import roberta_fast.kernels.bias_gelu as kgelu

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
