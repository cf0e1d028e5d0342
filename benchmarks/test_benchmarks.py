"""pytest-benchmark entry: `pytest benchmarks/ --benchmark-only`.

test_kernel times each kernel case of the quick set (the CPU set without a GPU) through the same
case builders as the harness, one test per (op, pass, provider), and stores GB/s / TFLOP/s in
extra_info. test_harness runs the whole harness once (roberta_fast.benchmarks.run.run, --quick unless
--bench-full) and writes its JSON, markdown and plots.
"""

import json
from pathlib import Path

import pytest
import torch
from roberta_fast.benchmarks import bench_ops
from roberta_fast.benchmarks import run as bench_run
from roberta_fast.benchmarks.common import backends_available

from roberta_fast.testing import MEMORY_BOUND, shape_label

_DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_MODE = "quick" if _DEV.type == "cuda" else "cpu"
_DTYPE = torch.float16 if _DEV.type == "cuda" else torch.float32
_AVAIL = backends_available(_DEV)
CASES = [
    pytest.param(op, p, ps, prov, id=f"{op}-{ps}-{prov}-{shape_label(op, p).replace(' ', '_')}")
    for op, p in bench_ops.shape_grid(_MODE)
    for ps in ("fwd", "fwd+bwd")
    for prov in bench_ops.providers_for(op, _DEV, _AVAIL)
]


@pytest.mark.parametrize("op,params,ps,provider", CASES)
def test_kernel(benchmark, op, params, ps, provider):
    case = bench_ops.build_case(op, params, _DTYPE, _DEV)
    try:
        fn, leaves, _ = bench_ops.make_runnable(case, provider, ps == "fwd+bwd")
    except NotImplementedError as e:
        pytest.skip(f"{provider}: {e}")

    def call():
        if leaves:
            for t in leaves:
                t.grad = None
        fn()
        if _DEV.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=20 if _DEV.type == "cuda" else 5, iterations=1, warmup_rounds=2)
    med_ms = benchmark.stats.stats.median * 1e3
    nbytes = case.bytes_bwd if ps == "fwd+bwd" else case.bytes_fwd
    nflops = case.flops_bwd if ps == "fwd+bwd" else case.flops_fwd
    benchmark.extra_info.update(op=op, pass_=ps, provider=provider, shape=params, dtype=str(_DTYPE),
                                bytes=nbytes, flops=nflops, note="wall clock incl. synchronize")
    if nbytes and op in MEMORY_BOUND:
        benchmark.extra_info["gbps"] = nbytes / med_ms / 1e6
    if nflops:
        benchmark.extra_info["tflops"] = nflops / med_ms / 1e9


def test_harness(benchmark, bench_out, request):
    full = request.config.getoption("--bench-full")
    doc = benchmark.pedantic(lambda: bench_run.run(quick=not full, out=bench_out, progress=False),
                             rounds=1, iterations=1)
    written = json.loads((Path(bench_out) / "results.json").read_text())
    from roberta_fast.benchmarks.report import validate

    assert validate(written) == []
    assert written["rows"], "the harness produced no rows"
    benchmark.extra_info.update(out=str(bench_out), rows=len(doc["rows"]), mode=doc["mode"])
