"""Ahead-of-time compile check for real GPUs, with no GPU needed.

Every Triton kernel specialization and config the ops can launch (each kernels/<op>.py lists them in
`aot_specs()`) is compiled for sm_80 (A100) and sm_90 (H100) with triton.compile; the cubin is read
with the cuobjdump shipped inside the triton package. Fails on a compile error, on local memory
(register spills), on shared memory over the chip's limit, and on a matrix kernel without the
architecture's tensor-core instructions (HGMMA on sm_90, HMMA on sm_80). Prints a table.
"""

import importlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

KERNEL_FILES = ["layer_norm", "gelu", "softmax", "attention"]
ARCHS = (80, 90)
# opt-in shared memory per block: A100 163 KiB, H100 227 KiB
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _cuobjdump():
    cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cand.exists():
        return str(cand)
    return shutil.which("cuobjdump")


def _specs():
    out = []
    for f in KERNEL_FILES:
        try:
            mod = importlib.import_module(f"roberta_fast.kernels.{f}")
        except ImportError:
            continue
        if hasattr(mod, "aot_specs"):
            out += [(f, s) for s in mod.aot_specs()]
    return out


def _compile(spec, cc):
    src = ASTSource(spec.fn, dict(spec.signature), constexprs=dict(spec.constexprs))
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def _parse(res: str):
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", res, re.S)
    assert m, f"cannot parse cuobjdump output:\n{res}"
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def test_every_kernel_file_lists_specs():
    """Each kernel file that exists must say what it can launch."""
    kernels_dir = Path(importlib.import_module("roberta_fast.kernels").__file__).parent
    for f in KERNEL_FILES:
        if (kernels_dir / f"{f}.py").exists():
            mod = importlib.import_module(f"roberta_fast.kernels.{f}")
            assert hasattr(mod, "aot_specs"), f"kernels/{f}.py has no aot_specs()"
            assert len(mod.aot_specs()) > 0, f"kernels/{f}.py aot_specs() is empty"


@pytest.mark.parametrize("cc", ARCHS)
def test_compile_targets(cc, capsys):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither in the triton package nor on PATH)")
    specs = _specs()
    if not specs:
        pytest.skip("no Triton kernel files with aot_specs() yet")
    rows, failures = [], []
    for _f, spec in specs:
        try:
            c = _compile(spec, cc)
        except Exception as e:  # noqa: BLE001
            failures.append(f"{spec.name} sm_{cc}: compile error: {type(e).__name__}: {str(e)[:300]}")
            continue
        cubin = c.asm["cubin"]
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "k.cubin")
            with open(p, "wb") as fh:
                fh.write(cubin)
            res = subprocess.run([tool, "-res-usage", p], capture_output=True, text=True, check=True).stdout
            regs, _, local = _parse(res)
            smem = int(c.metadata.shared)
            mma = ""
            if spec.uses_mma:
                sass = subprocess.run([tool, "-sass", p], capture_output=True, text=True, check=True).stdout
                want = "HGMMA" if cc >= 90 else "HMMA"
                has = want in sass
                mma = want if has else f"no {want}"
                if not has:
                    failures.append(f"{spec.name} sm_{cc}: matrix kernel without {want} in its SASS")
        if local > 0:
            failures.append(f"{spec.name} sm_{cc}: {local} bytes of local memory (register spills)")
        if smem > SMEM_LIMIT[cc]:
            failures.append(f"{spec.name} sm_{cc}: {smem} bytes of shared memory > limit {SMEM_LIMIT[cc]}")
        rows.append((spec.name, f"w{spec.num_warps}s{spec.num_stages}", f"sm_{cc}", regs, smem, local, mma))
    with capsys.disabled():
        print(f"\n{'kernel':60s} {'config':7s} {'arch':6s} {'regs':>4s} {'smem':>7s} {'local':>5s} mma")
        for r in rows:
            print(f"{r[0]:60s} {r[1]:7s} {r[2]:6s} {r[3]:4d} {r[4]:7d} {r[5]:5d} {r[6]}")
    assert not failures, "\n".join(failures)
