"""The benchmark harness itself, on the CPU: FLOP / byte counts against hand-computed values, the
per-layer kernel lists against transformers' real op sequence, the JSON schema of a real (reduced)
run, the markdown and plots made from a results document, and the CLI."""

import copy
import json
import subprocess
import sys
import types

import pytest
import torch
from roberta_fast.benchmarks import bench_ops, layers, report
from roberta_fast.benchmarks import run as bench

from roberta_fast import cli, flops, testing

# ----------------------------------------------------------------------------- FLOPs


def test_attention_flops_by_hand():
    # 4 * (3^2 + 5^2) * heads 2 * head_dim 4
    assert flops.attention_flops([3, 5], 2, 4) == 4 * 34 * 8 == 1088
    assert flops.attention_flops([3, 5], 2, 4, backward=True) == 2720  # 2.5x
    assert flops.attention_flops(128, 12, 64) == 4 * 128 * 128 * 12 * 64 == 50_331_648
    assert flops.attention_flops([], 12, 64) == 0
    with pytest.raises(ValueError, match="seqlens"):
        flops.attention_flops([4, -1], 2, 4)


def test_encoder_flops_roberta_base_by_hand():
    from roberta_fast.benchmarks.bench_encoder import make_config

    cfg = make_config("roberta-base")
    # per layer: GEMMs 2 * 4096 tokens * (4 * 768^2 + 2 * 768 * 3072) = 57_982_058_496
    #            attention 4 * 32 * 128^2 * 768 = 1_610_612_736
    per_layer = 57_982_058_496 + 1_610_612_736
    assert flops.encoder_flops(cfg, [128] * 32) == 12 * per_layer == 715_112_054_784
    assert flops.encoder_flops(cfg, [128] * 32, pooler=True) == 715_112_054_784 + 2 * 32 * 768 * 768


def test_encoder_flops_varied_lengths_and_config_kinds():
    d = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16}
    # tokens 6: GEMMs 2 * 6 * (4 * 64 + 2 * 8 * 16) = 6144; attention 4 * (1 + 4 + 9) * 2 * 4 = 448
    assert flops.encoder_flops(d, [1, 2, 3]) == 2 * (6144 + 448) == 13_184
    ns = types.SimpleNamespace(**d)
    assert flops.encoder_flops(ns, [1, 2, 3]) == 13_184
    with pytest.raises(ValueError, match="intermediate_size"):
        flops.encoder_flops({"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}, [3])


# ----------------------------------------------------------------------------- bytes


def test_layer_norm_bytes_by_hand():
    act = 4096 * 768 * 2  # 6_291_456
    # forward: read x, residual; write y; read weight, bias, x_bias
    assert flops.layer_norm_bytes(4096, 768, 2) == 3 * act + 3 * 768 * 2 == 18_878_976
    assert flops.layer_norm_bytes(4096, 768, 2, stats=True) == 18_878_976 + 8 * 4096
    assert flops.layer_norm_bytes(4096, 768, 2, residual=False, x_bias=False) == 2 * act + 2 * 768 * 2
    # backward: read dy, x, residual, mean, rstd, weight, x_bias; write dx, dweight, dbias, dx_bias
    assert flops.layer_norm_bytes(4096, 768, 2, backward=True) == (
        3 * act + 8 * 4096 + 2 * 768 * 2 + act + 3 * 768 * 2) == 25_206_272
    # fp32 parameters with fp16 activations
    assert flops.layer_norm_bytes(10, 4, 2, param_bytes=4) == 3 * 10 * 4 * 2 + 3 * 4 * 4


def test_bias_gelu_softmax_attention_bytes_by_hand():
    assert flops.bias_gelu_bytes(32768, 3072, 2) == 2 * 201_326_592 + 6144 == 402_659_328
    assert flops.bias_gelu_bytes(32768, 3072, 2, backward=True) == 3 * 201_326_592 + 2 * 6144
    assert flops.bias_gelu_bytes(4, 3, 4, bias=False) == 2 * 4 * 3 * 4
    sc = 64 * 12 * 512 * 512 * 2
    assert flops.masked_softmax_bytes(64, 12, 512, 512, 2, mask_bytes=64 * 512 * 2) == 2 * sc + 65_536
    assert flops.masked_softmax_bytes(64, 12, 512, 512, 2, backward=True) == 3 * sc == 1_207_959_552
    # attention forward: q, k, v, o + fp32 lse per (head, row)
    assert flops.attention_bytes(4096, 12, 64, 2) == 4 * 4096 * 768 * 2 + 4 * 4096 * 12 == 25_362_432
    assert flops.attention_bytes(8, 2, 4, 2, backward=True) == 8 * 128 + 4 * 8 * 2


# ----------------------------------------------------------------------------- one layer

SMALL = {"batch": 2, "seqlen": 4, "hidden": 8, "heads": 2, "intermediate": 16, "dtype_bytes": 2}


def test_layer_kernels_eager_by_hand():
    ks = flops.layer_kernels("hf_eager", **SMALL)
    s = flops.layer_summary(ks)
    assert (s["launches"], s["gemm_launches"], s["non_gemm_launches"]) == (20, 8, 12)
    # act = 8 tokens * 8 * 2 B = 128; scores = 2 * 2 * 4 * 4 * 2 B = 128; mask (2, 1, 1, 4) = 16
    copies = 4 * 256
    scores = 256 + (256 + 16) + 256  # mul, add mask, softmax
    adds = 2 * 384
    ln = 2 * (128 + 128 + 32 + 64)  # read h, write y, weight+bias, fp32 mean+rstd
    gelu = 2 * 8 * 16 * 2
    assert s["non_gemm_bytes"] == copies + scores + adds + ln + gelu == 3792
    q = ks[0]
    assert (q.name, q.kind, q.bytes, q.flops) == ("addmm Q", "gemm", (64 + 64 + 64) * 2 + 16, 2 * 8 * 8 * 8)
    # all GEMM FLOPs: 6 linears + 2 bmm = the encoder_flops of one layer
    cfg = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}
    assert s["flops"] == flops.encoder_flops(cfg, [4, 4])


def test_layer_kernels_ours_by_hand():
    ks = flops.layer_kernels("roberta_fast", **SMALL)
    s = flops.layer_summary(ks)
    assert (s["launches"], s["gemm_launches"], s["non_gemm_launches"]) == (8, 4, 4)
    attn = 4 * 128 + 4 * 8 * 2 + 4 * 3  # q, k, v, o; lse; cu_seqlens
    ln = 2 * 128 + 128 + 3 * 8 * 2 + 64  # x, residual; y; weight, bias, x_bias; mean, rstd
    gelu = 2 * 256 + 16 * 2
    assert s["non_gemm_bytes"] == attn + 2 * ln + gelu == 2124
    cfg = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}
    assert s["flops"] == flops.encoder_flops(cfg, [4, 4])
    # padding-free counts real tokens only
    varlen = flops.layer_summary(flops.layer_kernels("roberta_fast", **SMALL, seqlens=[1, 4]))
    assert varlen["flops"] == flops.encoder_flops(cfg, [1, 4])
    with pytest.raises(ValueError, match="impl"):
        flops.layer_kernels("nope", **SMALL)
    with pytest.raises(ValueError, match="seqlens"):
        flops.layer_kernels("roberta_fast", **SMALL, seqlens=[5, 1])


def test_layer_kernels_epilogue_by_hand():
    """GEMM epilogues (issue 16): 7 launches; the FFN intermediate is written once (FFN1) and read once (FFN2),
    against the fused-elementwise layer's write, read + write (bias_gelu), read."""
    ks = flops.layer_kernels("roberta_fast_epilogue", **SMALL)
    s = flops.layer_summary(ks)
    assert (s["launches"], s["gemm_launches"], s["non_gemm_launches"]) == (7, 4, 3)
    t, h, i, e = 8, 8, 16, 2
    by = {k.name: k for k in ks}
    assert by["linear FFN1 (+bias +GELU)"].bytes == (t * h + h * i + t * i) * e + i * e
    assert by["linear FFN2 (+bias +residual)"].bytes == (t * i + i * h + t * h) * e + h * e + t * h * e
    ours = flops.layer_summary(flops.layer_kernels("roberta_fast", **SMALL))
    # the intermediate round trip through bias_gelu (read + write t x i) is gone; LayerNorm no longer reads
    # the residual and bias (the epilogues do: + t x h residual reads, bias reads move into the GEMMs)
    assert ours["total_bytes"] - s["total_bytes"] == 2 * t * i * e
    cfg = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}
    assert s["flops"] == flops.encoder_flops(cfg, [4, 4])


def test_eager_layer_measured_matches_the_analytic_list():
    """The aten ops one transformers eager layer dispatches are exactly the kernels flops.py lists."""
    measured = layers._per_layer(lambda n: layers._tiny_models(n, torch.device("cpu"), torch.float32),
                                 torch.device("cpu"), layers.count_ops)
    expected = {"addmm": 6, "bmm": 2, "clone": 4, "mul": 1, "add": 3, "_softmax": 1, "gelu": 1,
                "native_layer_norm": 2}
    assert measured == expected, measured
    analytic = flops.layer_kernels("hf_eager", **SMALL)
    assert sum(measured.values()) == len(analytic) == 20


def test_our_layer_measured_has_the_fused_ops(monkeypatch):
    """roberta_fast's layer under its Triton backend: the GEMMs with their epilogues (ops.linear: FFN1 + bias +
    GELU, the output projections + bias + residual), one LayerNorm per sub-block: 7 launching ops (issue 16), no
    separate add / gelu / layer_norm aten ops. Without the epilogues (cuBLAS + fused elementwise, the default
    until a GPU is tuned): 8, with bias_gelu and the bias + residual inside layer_norm."""
    from roberta_fast.model import encoder
    from roberta_fast.optimize import optimize

    build = lambda n: optimize(layers._tiny_models(n, torch.device("cpu"), torch.float32))  # noqa: E731
    with layers._env("ROBERTA_FAST_BACKEND", "triton"):
        ops = layers._per_layer(build, torch.device("cpu"), layers.count_ops)
    for unfused in ("native_layer_norm", "gelu", "_softmax", "bmm", "clone", "add", "bias_gelu_fwd"):
        assert unfused not in ops, ops
    assert ops == {"addmm": 1, "roberta_fast::linear_fwd": 3, "roberta_fast::attention_varlen_fwd": 1,
                   "roberta_fast::layer_norm_fwd": 2}, ops
    assert sum(ops.values()) == len(flops.layer_kernels("roberta_fast_epilogue", **SMALL)) == 7

    monkeypatch.setattr(encoder, "_EPILOGUE_BACKENDS", ())  # as when ops.linear's choice is "torch"
    with layers._env("ROBERTA_FAST_BACKEND", "triton"):
        ops = layers._per_layer(build, torch.device("cpu"), layers.count_ops)
    assert ops == {"addmm": 1, "mm": 3, "roberta_fast::attention_varlen_fwd": 1,
                   "roberta_fast::layer_norm_fwd": 2, "roberta_fast::bias_gelu_fwd": 1}, ops
    assert sum(ops.values()) == len(flops.layer_kernels("roberta_fast", **SMALL)) == 8


@pytest.mark.slow  # ~25-50 s on 2 cores: four training steps per model under the Triton interpreter
def test_training_layer_launches():
    """One layer's forward + backward in train mode with dropout 0.1 (issue 13): at most 26 launching ops for
    roberta_fast (Triton backend: fused bias + dropout + residual + LayerNorm, dropout inside attention, no QKV
    concatenation and no zero gradients), against transformers eager's count."""
    from roberta_fast.optimize import optimize

    cpu = torch.device("cpu")
    hf = layers._per_layer(lambda n: layers._tiny_models(n, cpu, torch.float32), cpu, layers.count_ops, train=True)
    assert hf["bernoulli_"] == 3 and hf["native_layer_norm_backward"] == 2, hf  # three dropouts, two norms
    build = lambda n: optimize(layers._tiny_models(n, cpu, torch.float32))  # noqa: E731
    with layers._env("ROBERTA_FAST_BACKEND", "triton"):
        ops = layers._per_layer(build, cpu, layers.count_ops, train=True)
    assert sum(ops.values()) <= 26 < sum(hf.values()), (ops, hf)
    # FFN1 + bias + GELU is one ops.linear (Triton epilogue; issue 16): 21 launching ops, 24 with bias_gelu
    assert "roberta_fast::bias_gelu_fwd" not in ops and sum(ops.values()) == 21, ops
    for name in ("layer_norm", "attention_varlen", "linear"):
        assert ops[f"roberta_fast::{name}_fwd"] == ops[f"roberta_fast::{name}_bwd"], ops
    for unfused in ("bernoulli_", "native_dropout", "_softmax", "bmm", "cat", "zeros", "fill_", "native_layer_norm"):
        assert unfused not in ops, ops


# ----------------------------------------------------------------------------- grids and cases


def test_shape_grids():
    full = bench_ops.shape_grid("full")
    toks = {p["tokens"] for _, p in full}
    assert toks == {4096, 16384, 65536}
    assert {p["hidden"] for op, p in full if op == "layer_norm"} == {768, 1024}
    assert {p["seqlen"] for op, p in full if "seqlen" in p} == {128, 512}
    assert {p["heads"] for op, p in full if "heads" in p} == {12, 16}
    quick = bench_ops.shape_grid("quick")
    for op in testing.OPS:
        assert 1 <= sum(1 for o, _ in quick if o == op) <= 2
    # the tuner's grids: every power of two of tokens, one quick shape
    assert {p["tokens"] for _, p in testing.shape_grid("tune")} == {4096, 8192, 16384, 32768, 65536}
    assert {p["tokens"] for _, p in testing.shape_grid("tune-quick")} == {32768}
    with pytest.raises(ValueError, match="unknown shape grid"):
        testing.shape_grid("huge")


@pytest.mark.parametrize("op", testing.OPS)
def test_case_eager_matches_float64_reference(op):
    """The eager baseline computes the same math as the op (so speedups compare like with like)."""
    (_, p), = bench_ops.shape_grid("check", [op])
    case = testing.build_case(op, p, torch.float32, torch.device("cpu"))
    ref = bench_ops.reference_output(case)
    for fn in (case.eager, lambda i: case.run("torch", i)) + ((case.sdpa,) if case.sdpa else ()):
        out = fn(case.inputs)
        assert out.shape == ref.shape
        err = testing.max_abs_err(out, ref)
        assert err < 1e-5, f"{op}: max err {err:.3e} against float64"


def test_varlen_lengths_seeded_and_exact():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = testing.uniform_lengths(g1, 1000, 128), testing.uniform_lengths(g2, 1000, 128)
    assert a == b and sum(a) == 1000 and max(a) <= 128 and min(a[:-1]) >= 25


# ----------------------------------------------------------------------------- a real reduced run


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    lines = []
    doc = bench.run(only="layer_norm,layers", device="cpu", out=out, progress=False, echo=lines.append)
    return doc, out, lines


def test_run_writes_valid_json(cpu_run):
    doc, out, lines = cpu_run
    assert lines[0] == bench.CPU_NOTE  # the first line says GPU figures need a GPU
    written = json.loads((out / "results.json").read_text())
    assert report.validate(written) == []
    assert written["mode"] == "cpu-reduced"
    for k in ("gpu", "driver", "torch", "triton", "cuda", "git_sha"):
        assert k in written["env"]
    assert written["ceilings"]["copy_gbps"] > 0 and written["ceilings"]["matmul_tflops"] > 0
    kernel = [r for r in written["rows"] if r["suite"] == "kernel"]
    assert {(r["pass"], r["provider"]) for r in kernel} == {(p, v) for p in ("fwd", "fwd+bwd")
                                                            for v in ("eager", "torch")}
    for r in kernel:
        assert r["error"] is None, r
        assert r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["bytes"] == (flops.layer_norm_bytes(512, 768, 4) if r["pass"] == "fwd" else
                              flops.layer_norm_bytes(512, 768, 4, stats=True)
                              + flops.layer_norm_bytes(512, 768, 4, backward=True))
        assert r["gbps"] == pytest.approx(r["bytes"] / r["ms"] / 1e6)
    fwd = [r for r in kernel if r["pass"] == "fwd"]
    assert all(r["ok"] for r in fwd) and all(r["max_err"] < 1e-5 for r in fwd)
    checks = [r for r in written["rows"] if r["suite"] == "check"]
    assert len(checks) == 4 and all(r["op"] == "layer_norm" for r in checks)
    lay = written["layers"]
    assert lay["analytic"][0]["impls"]["hf_eager"]["summary"]["launches"] == 20
    assert lay["measured"]["hf_eager"]["launches"] == 20


def test_run_outputs_have_plain_names(cpu_run):
    doc, out, _ = cpu_run
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["results.json", "results.md", "speedup.png", "ceiling.png"])
    import re

    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    for n in names:
        if n.endswith(".png"):
            assert (out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert md == report.to_markdown(json.loads((out / "results.json").read_text()))


# ----------------------------------------------------------------------------- schema, markdown, plots


def _doc():
    kernel = {"suite": "kernel", "op": "bias_gelu", "pass": "fwd", "provider": "triton", "dtype": "float16",
              "shape": {"tokens": 32768, "n": 3072}, "label": "T=32768 N=3072", "ms": 0.25, "ms_p20": 0.24,
              "ms_p80": 0.26, "bytes": 402_659_328, "flops": None, "gbps": 1610.6, "pct_copy": 80.5,
              "tflops": None, "pct_matmul": None, "speedup": 2.5, "max_err": 9.8e-4, "err_bound": 2.9e-3,
              "ok": True, "error": None}
    bad = dict(kernel, provider="cuda", ms=0.2, ms_p20=0.19, ms_p80=0.21, speedup=3.125, max_err=0.5, ok=False)
    err = dict(kernel, provider="compile", ms=None, ms_p20=None, ms_p80=None, gbps=None, pct_copy=None,
               speedup=None, max_err=None, err_bound=None, ok=None, error="RuntimeError: boom")
    enc = {"suite": "encoder", "model": "roberta-base", "dtype": "float16", "workload": "b32_s128",
           "provider": "rf_padding_free", "cuda_graph": True, "batch": 32, "seqlen": 128, "real_tokens": 4096,
           "padded_tokens": 4096, "flops": 715_112_054_784, "ms_p50": 2.0, "ms_p90": 2.2,
           "tokens_per_s": 2_048_000.0, "tflops": 357.6, "mfu": 0.5, "mfu_datasheet": 0.36,
           "peak_mem_mib": 512.0, "max_err": 0.01, "speedup": 3.0, "error": None, "note": None}
    return {"schema": report.SCHEMA, "created": "2026-01-01T00:00:00+00:00", "mode": "gpu", "quick": True,
            "env": {"gpu": "NVIDIA H100 80GB HBM3", "driver": "550.54", "torch": "2.11.0", "triton": "3.6.0",
                    "cuda": "12.8", "git_sha": "abc123", "transformers": "5.17.0", "python": "3.11.7",
                    "backends": {"torch": True, "triton": True, "cuda": True}},
            "ceilings": {"copy_gbps": 2000.0, "copy_bytes": 2**31, "matmul_tflops": 715.0,
                         "matmul_dtype": "bfloat16", "matmul_shape": [8192] * 3, "datasheet_tflops": 989.4},
            "notes": ["a note"], "rows": [kernel, bad, err, enc], "layers": None, "elapsed_s": 12.0}


def test_validate_accepts_and_rejects():
    doc = _doc()
    assert report.validate(doc) == []
    broken = copy.deepcopy(doc)
    del broken["env"]["git_sha"]
    broken["rows"][0]["ms"] = "fast"
    del broken["rows"][3]["tokens_per_s"]
    broken["rows"][2]["error"] = None  # neither a time nor an error
    probs = report.validate(broken)
    assert any("git_sha" in p for p in probs)
    assert any("rows[0].ms" in p for p in probs)
    assert any("rows[3]" in p and "tokens_per_s" in p for p in probs)
    assert any("rows[2] has neither" in p for p in probs)
    assert report.validate({"rows": []})  # missing top-level keys
    nan = copy.deepcopy(doc)
    nan["rows"][0]["max_err"] = "nan"  # how write_json stores a NaN error
    assert report.validate(nan) == []


def test_json_round_trip_keeps_nan_as_strict_json(tmp_path):
    doc = _doc()
    doc["rows"][0]["max_err"] = float("nan")
    p = report.write_json(doc, tmp_path / "results.json")
    back = json.loads(p.read_text())  # strict JSON (no NaN literal)
    assert back["rows"][0]["max_err"] == "nan"
    assert report.validate(back) == []


def test_markdown_from_json():
    md = report.to_markdown(_doc())
    assert md.startswith("# roberta_fast benchmarks: NVIDIA H100 80GB HBM3")
    assert "copy ceiling 2000 GB/s" in md and "matmul ceiling 715.0 TFLOP/s" in md
    assert "git abc123" in md and "driver 550.54" in md and "triton 3.6.0" in md
    assert "### bias_gelu" in md
    row = next(line for line in md.splitlines() if "| triton |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:10] == ["fwd", "float16", "T=32768 N=3072", "triton", "0.25 (0.24-0.26)", "1.61e+03", "80%", "-",
                          "2.50x", "9.80e-04"]
    assert "5.00e-01 **FAIL**" in md  # a fast wrong answer shows
    assert "RuntimeError: boom" in md
    enc = next(line for line in md.splitlines() if "rf_padding_free" in line)
    assert "2,048,000" in enc and "50.0% / 36.0%" in enc and "3.00x" in enc and "| yes |" in enc
    assert "- a note" in md


def test_plots_from_json(tmp_path):
    files = report.make_plots(_doc(), tmp_path)
    assert sorted(f.name for f in files) == ["ceiling.png", "encoder.png", "speedup.png"]
    for f in files:
        assert f.read_bytes()[:4] == b"\x89PNG" and f.stat().st_size > 1000


# ----------------------------------------------------------------------------- CLI


def test_only_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown name"):
        bench.parse_only("layer_nrom")
    sel = bench.parse_only("attention,roberta-large")
    assert sel["ops"] == ["attention"] and sel["models"] == ["roberta-large"]
    assert {"kernels", "checks", "encoder"} <= sel["suites"] and "layers" not in sel["suites"]


def test_cli_demo_passes_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("roberta_fast.demo")
    fake.main = lambda argv=None: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "roberta_fast.demo", fake)
    assert cli.main(["demo", "--device", "cpu", "--layers", "2"]) == 0
    assert seen == [["--device", "cpu", "--layers", "2"]]


def test_cli_env(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "triton" in out
    assert "backends on cpu:" in out and "torch   available" in out


def test_cli_bench_first_line_without_gpu(tmp_path):
    """The console entry, in a fresh process without TRITON_INTERPRET: the first line of output says GPU
    figures need a GPU (the CLI turns the interpreter on itself)."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-m", "roberta_fast.cli", "bench", "--only", "layers", "--no-plots",
                          "--no-progress", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[0] == bench.CPU_NOTE
    doc = json.loads((tmp_path / "results.json").read_text())
    assert report.validate(doc) == [] and doc["env"]["triton_interpret"] is True
    with pytest.raises(SystemExit):
        cli.main(["bench", "--only"])  # argparse: missing value


# ----------------------------------------------------------------------------- bad setup: messages, not tracebacks


@pytest.mark.parametrize("value", ["garbage", "cuda"])
def test_cli_env_reports_a_bad_backend_setting(monkeypatch, capsys, value):
    """The diagnostic command must survive the setup it diagnoses: one problem line and exit status 1."""
    monkeypatch.setenv("ROBERTA_FAST_BACKEND", value)
    if value == "cuda":
        monkeypatch.setenv("ROBERTA_FAST_CUDA_EMULATE", "0")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["env"]) == 1
    out = capsys.readouterr().out
    assert "backends on cpu:" in out and "problem: layer_norm:" in out
    assert ("got 'garbage'" if value == "garbage" else "backend 'cuda'") in out


def test_cli_demo_bad_device(capsys):
    assert cli.main(["demo", "--device", "banana"]) == 2
    assert "--device must be cpu, cuda or cuda:N, got 'banana'" in capsys.readouterr().err


def test_cli_bench_cuda_without_gpu(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--device", "cuda", "--only", "layers", "--out", str(tmp_path)]) == 2
    assert "--device cuda, but no CUDA GPU is visible" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_bench_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert cli.main(["bench", "--only", "layers", "--device", "cpu", "--out", str(blocker / "out")]) == 2
    assert f"--out {blocker / 'out'}: cannot write there" in capsys.readouterr().err


# ----------------------------------------------------------------------------- host overhead


def _host_rows():
    from roberta_fast.benchmarks.bench_host import _row

    return [
        _row("baseline", "F.layer_norm", "torch", "tiny CPU tensors", us=4.0, us_median=4.5, ratio=1.0),
        _row("op", "layer_norm", "roberta_fast (triton), inference_mode", "x (128, 768)", us=10.0, us_median=11.0,
             ratio=2.5, target=3.0, ok=True),
        _row("forward", "roberta_fast (triton)", "roberta_fast (triton)", "roberta-base", us=900.0, us_median=950.0,
             ratio=0.45, target=0.5, ok=True, python_calls=2500, launches=122),
        _row("forward", "transformers eager", "transformers eager", "roberta-base", us=2000.0, us_median=2100.0,
             ratio=1.0, python_calls=2000, launches=237),
        _row("op", "attention", "roberta_fast (cuda), no_grad", "q", error="skipped: not here"),
    ]


def test_host_rows_validate_and_render():
    doc = _doc()
    doc["rows"] = doc["rows"] + _host_rows()
    assert report.validate(doc) == []
    md = report.to_markdown(doc)
    assert "## Host overhead" in md
    row = next(line for line in md.splitlines() if "| roberta_fast (triton) | roberta_fast (triton) |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:10] == ["900.0 (950.0)", "0.45x", "<= 0.5x", "ok", "2,500", "122"]
    broken = copy.deepcopy(doc)
    broken["rows"][-2]["us"] = None  # neither a time nor an error
    assert any("has neither" in p for p in report.validate(broken))


def test_only_host_selects_the_host_suite():
    sel = bench.parse_only("host")
    assert sel["suites"] == {"host"} and sel["ops"] == [] and sel["models"] is None
    assert "host" in bench.parse_only(None)["suites"]


def test_host_timer_and_counters():
    from roberta_fast.benchmarks import bench_host

    x = torch.randn(4, 4)
    res = bench_host.time_interleaved({"add": lambda: x + x, "mul": lambda: x * x}, rounds=3, target_s=0.002)
    assert set(res) == {"add", "mul"} and all(0 < best <= med for best, med in res.values())
    assert bench_host.count_launches(lambda: (x + x).view(16).sum(), None) == 2  # add, sum (the view is free)
    assert bench_host.count_python_calls(lambda: [abs(i) for i in range(3)]) >= 1


def test_host_rows_over_target_are_not_accuracy_failures():
    """A host-time row's `ok` is its speed target: over it is reported, not counted as a wrong answer (the exit
    status of `roberta-fast bench` is about accuracy)."""
    rows = [{"suite": "host", "ok": False}, {"suite": "kernel", "ok": True}, {"suite": "check", "ok": False}]
    assert bench._accuracy_failures(rows) == [rows[2]]
    lines = []
    bench._summary({"rows": rows, "elapsed_s": 1.0}, lines.append)
    assert "1 failing the accuracy rule, 1 host-time rows over their target" in lines[0]


def test_epilogue_provider_on_gpus_only():
    """The encoder suite's rf_epilogue row (the model's GEMMs on Triton's epilogues) runs on GPUs only, without a
    CUDA graph, and its environment is set only while it runs."""
    import os

    from roberta_fast.benchmarks import bench_encoder

    assert all(p != "rf_epilogue" for p, _ in bench_encoder.provider_variants(torch.device("cpu"), False))
    assert ("rf_epilogue", False) in bench_encoder.provider_variants(torch.device("cuda"), False)
    assert ("rf_epilogue", True) not in bench_encoder.provider_variants(torch.device("cuda"), False)
    assert "ROBERTA_FAST_BACKEND_LINEAR" not in os.environ
    with bench_encoder._environment(bench_encoder._EPILOGUE_ENV):
        assert os.environ["ROBERTA_FAST_BACKEND_LINEAR"] == "triton"
    assert "ROBERTA_FAST_BACKEND_LINEAR" not in os.environ
