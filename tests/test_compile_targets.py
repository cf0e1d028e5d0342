"""Ahead-of-time compile check for real GPUs, with no GPU needed.

Every Triton kernel specialization and config the ops can launch (each kernels/<op>.py lists them in
`aot_specs()`) is compiled for sm_80 (A100) and sm_90 (H100) with triton.compile, and each cubin is
read with the cuobjdump shipped inside the triton package. Fails on a compile error, on local memory
(register spills), on shared memory over the chip's limit, and on a matrix kernel without the
architecture's tensor-core instructions (HGMMA on sm_90, HMMA on sm_80). Prints a table.

The compiles run in a subprocess without TRITON_INTERPRET (conftest sets it for the CPU tests, and
interpreted kernels cannot be compiled).
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from roberta_fast.kernels._aot import KERNEL_FILES, cuobjdump_path, format_table  # noqa: E402


def test_every_kernel_file_lists_specs():
    """Each kernel file that exists must say what it can launch."""
    kernels_dir = Path(importlib.import_module("roberta_fast.kernels").__file__).parent
    present = [f for f in KERNEL_FILES if (kernels_dir / f"{f}.py").exists()]
    assert present, "no kernel files found"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; from roberta_fast.kernels._aot import all_specs; "
            "print(json.dumps({f: len(all_specs([f])) for f in sys.argv[1:]}))")
    res = subprocess.run([sys.executable, "-c", code, *present], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    counts = json.loads(res.stdout.strip().splitlines()[-1])
    for f in present:
        assert counts[f] > 0, f"kernels/{f}.py aot_specs() is empty"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Both targets compiled at once, one subprocess each (the two cores of a CI machine; each compile is
    mostly ptxas): {cc: (returncode, stdout, stderr, rows or None)}."""
    if cuobjdump_path() is None:
        pytest.skip("no cuobjdump (neither in the triton package nor on PATH)")
    tmp = tmp_path_factory.mktemp("aot")
    procs = {}
    for cc in (80, 90):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        env["TRITON_CACHE_DIR"] = str(tmp / f"cache{cc}")
        out = tmp / f"rows{cc}.json"
        procs[cc] = (subprocess.Popen([sys.executable, "-m", "roberta_fast.kernels._aot", "--cc", str(cc),
                                       "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env), out)
    results = {}
    for cc, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=1800)
        results[cc] = (proc.returncode, stdout, stderr, json.loads(out.read_text()) if out.exists() else None)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("cc", [80, 90])
def test_compile_targets(cc, compiled, capsys):
    returncode, stdout, stderr, rows = compiled[cc]
    assert rows is not None, f"compile driver crashed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    with capsys.disabled():
        print("\n" + format_table(rows))
    assert rows, "no kernel specs compiled"
    problems = [f"{r['kernel']} {r['arch']}: {p}" for r in rows for p in r["problems"]]
    assert not problems, "\n".join(problems)
    gemm = [r for r in rows if r["kernel"].startswith(("linear_ffn1", "linear_proj"))]  # kernels/linear.py
    assert gemm, "the fused-epilogue GEMM (kernels/linear.py) was not compiled"
    assert all(r["mma"] == ("HGMMA" if cc >= 90 else "HMMA") for r in gemm), [(r["kernel"], r["mma"]) for r in gemm]
    from roberta_fast.kernels.linear import HAS_TMA  # the TMA variant: sm_90 only, where Triton has descriptors

    tma = [r for r in gemm if r["kernel"].startswith("linear_ffn1_tma")]
    assert len(tma) == (1 if HAS_TMA and cc >= 90 else 0), [r["kernel"] for r in tma]
    lsh = [r for r in rows if r["kernel"].startswith("lsh_attention_bwd")]  # kernels/lsh_attention.py's backward
    assert len(lsh) == 4 and all(r["mma"] == ("HGMMA" if cc >= 90 else "HMMA") for r in lsh), lsh  # dq, dkdv x2
    assert returncode == 0, stderr[-2000:]
