"""The CUDA C++ backend's build (csrc/ -> roberta_fast._C): built, complete, compiled for sm_80 and sm_90a
without spills or warnings, with tensor-core code in attention; host-side error paths; the setup.py
switches. The kernels' numerics are tested with each op (tests/test_<op>.py: on a GPU, and on CPU
through the emulation).

Runs without a GPU: the build checks read the module with cuobjdump (the system one or the one
inside the triton package) and the ptxas report kept beside the module (_C_build.log). They skip
with a reason where nvcc is missing or the build was switched off (ROBERTA_FAST_CUDA=0).
"""

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from roberta_fast import backends

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
KERNELS = ("layer_norm_fwd", "layer_norm_bwd", "bias_gelu_fwd", "bias_gelu_bwd", "masked_softmax_fwd",
           "masked_softmax_bwd", "attention_fwd", "attention_bwd")
SOURCES = ("attention", "attention_bwd", "bias_gelu", "layer_norm", "masked_softmax")  # csrc/<name>.cu
ARCHS = ("sm_80", "sm_90a")
def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@pytest.fixture(scope="module")
def C():
    """roberta_fast._C; skips where it cannot have been built, fails where it should have been."""
    mod = backends.cuda_module()
    if mod is not None:
        return mod
    if os.environ.get("ROBERTA_FAST_CUDA", "").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip("ROBERTA_FAST_CUDA=0: the CUDA extension was not built")
    if _nvcc() is None:
        pytest.skip("nvcc not found (CUDA_HOME or PATH): the CUDA extension cannot be built here")
    try:
        importlib.import_module("roberta_fast._C")
    except ImportError as e:
        pytest.fail(f"nvcc is here but roberta_fast._C does not import ({e}); rebuild with "
                    "`ROBERTA_FAST_CUDA=1 pip install --no-build-isolation -e .`")
    pytest.fail("roberta_fast._C imports but backends.cuda_module() returned None")


@pytest.fixture(scope="module")
def so_path(C):
    return Path(C.__file__)


@pytest.fixture(scope="module")
def build_log(so_path):
    log = so_path.parent / "_C_build.log"
    if not log.exists():
        pytest.fail(f"no build log beside the module ({log}); setup.py writes it with the ptxas report")
    return log.read_text()


@pytest.fixture(scope="module")
def cuobjdump():
    cands = [shutil.which("cuobjdump")]
    try:
        import triton

        cands.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if c and Path(c).exists():
            return c
    pytest.skip("no cuobjdump (neither on PATH nor inside the triton package)")


def _run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


# ----------------------------------------------------------------------------- the build, no GPU needed


def test_module_exposes_every_kernel(C):
    assert tuple(C.KERNELS) == KERNELS
    for name in KERNELS:
        assert callable(getattr(C, name, None)), f"roberta_fast._C lacks {name}"
    assert C.DTYPES == {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3, "bool": 4}


def test_module_holds_sm80_and_sm90a_code(so_path, cuobjdump):
    elfs = _run([cuobjdump, "--list-elf", str(so_path)])
    # cuobjdump from CUDA 12.x lists sm_90a cubins under the name sm_90; their ELF header still says sm_90a
    arch_a = None
    for src in SOURCES:
        for arch in ARCHS:
            if re.search(rf"\b{src}\.{arch}\.cubin", elfs):
                continue
            assert arch.endswith("a") and re.search(rf"\b{src}\.{arch[:-1]}\.cubin", elfs), (
                f"no {arch} code for csrc/{src}.cu:\n{elfs}")
            if arch_a is None:
                arch_a = set(re.findall(r"arch = (sm_\w+)", _run([cuobjdump, "-elf", str(so_path)])))
            assert arch in arch_a, f"no ELF with arch = {arch} in the module (found {sorted(arch_a)})"


def test_resource_usage_no_local_memory(so_path, cuobjdump):
    res = _run([cuobjdump, "-res-usage", str(so_path)])
    funcs = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    names = {f[0] for f in funcs}
    for k in ("layer_norm_fwd_kernel", "layer_norm_bwd_kernel", "layer_norm_bwd_cols_kernel", "bias_gelu_kernel",
              "masked_softmax_fwd_kernel", "masked_softmax_bwd_kernel", "attention_fwd_kernel",
              "attention_bwd_kernel"):
        assert any(k in n for n in names), f"no {k} in the module"
    for name, reg, stack, shared, local in funcs:
        assert int(local) == 0 and int(stack) == 0, f"{name}: LOCAL {local}, STACK {stack} (spills)"
        assert int(shared) <= 48 * 1024, f"{name}: {shared} bytes of static shared memory"
        assert int(reg) <= 255


def test_attention_uses_tensor_cores(so_path, cuobjdump):
    res = _run([cuobjdump, "-res-usage", str(so_path)])
    kernels = sorted(set(re.findall(r"Function (\S*attention_(?:fwd|bwd)_kernel\S*):", res)))
    # forward, backward x fp16, bf16 x head_dim 32, 64, 128 x without / with dropout
    assert len(kernels) == 24, kernels
    sass = _run([cuobjdump, "-sass", "-fun", ",".join(kernels), str(so_path)])
    found = set()
    for section in sass.split("\narch = ")[1:]:  # one section per cubin
        arch = section.split()[0]
        for body in section.split("Function : ")[1:]:
            name = body.split()[0]
            assert "HMMA.16816.F32" in body, f"{arch} {name}: no HMMA.16816.F32 in its SASS"
            found.add((arch, name))
    missing = {(a, k) for a in ARCHS for k in kernels} - found
    assert not missing, f"no SASS for {sorted(missing)}"


def test_build_log_no_spills_no_warnings(build_log):
    compiled = re.findall(r"Compiling entry function '(\S+)' for '(sm_\w+)'", build_log)
    reports = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", build_log)
    assert compiled, "no ptxas report in the build log (is -Xptxas -v in setup.py's flags?)"
    assert {a for _, a in compiled} == set(ARCHS), sorted({a for _, a in compiled})
    assert len(reports) == len(compiled), f"{len(compiled)} functions compiled, {len(reports)} spill reports"
    spills = [(f, a, r) for (f, a), r in zip(compiled, reports) if r != ("0", "0")]
    assert not spills, f"register spills: {spills}"
    bad = [ln for ln in build_log.splitlines() if re.search(r"\bwarning\b|\berror\b", ln, re.I)]
    assert not bad, "warnings in the build log:\n" + "\n".join(bad[:20])
    for src in SOURCES:
        assert f"---- {src}.cu.o.log" in build_log, f"no report for csrc/{src}.cu"


def test_bad_arguments_raise_value_error(C):
    """Argument errors are found on the host before any CUDA call (no GPU needed)."""
    with pytest.raises(ValueError, match="unsupported dtype code 99"):
        C.layer_norm_fwd(x=0, x_stride=8, residual=0, res_stride=0, x_bias=0, x_bias_f32=False, weight=0,
                         weight_f32=False, bias=0, bias_f32=False, y=0, mean=0, rstd=0, M=1, N=8, eps=1e-5,
                         dtype=99, dropout_p=0.0, rng=0, stream=0)
    z3 = (0, 0, 0)
    with pytest.raises(ValueError, match="head_dim must be 32, 64 or 128, got 48"):
        C.attention_fwd(q=0, q_strides=z3, k=0, k_strides=z3, v=0, v_strides=z3, o=0, o_strides=z3, lse=0,
                        lse_batch_stride=0, lse_head_stride=0, key_padding_mask=0, mask_batch_stride=0,
                        cu_seqlens=0, total_rows=0, batch=1, heads=1, seqlen=8, head_dim=48, scale=1.0,
                        dtype=0, dropout_p=0.0, rng=0, stream=0)
    with pytest.raises(ValueError, match="fp16 or bf16 only"):
        C.attention_fwd(q=0, q_strides=z3, k=0, k_strides=z3, v=0, v_strides=z3, o=0, o_strides=z3, lse=0,
                        lse_batch_stride=0, lse_head_stride=0, key_padding_mask=0, mask_batch_stride=0,
                        cu_seqlens=0, total_rows=0, batch=1, heads=1, seqlen=8, head_dim=64, scale=1.0,
                        dtype=2, dropout_p=0.0, rng=0, stream=0)
    with pytest.raises(ValueError, match="16-byte aligned"):
        C.attention_fwd(q=2, q_strides=z3, k=0, k_strides=z3, v=0, v_strides=z3, o=0, o_strides=z3, lse=0,
                        lse_batch_stride=0, lse_head_stride=0, key_padding_mask=0, mask_batch_stride=0,
                        cu_seqlens=0, total_rows=0, batch=1, heads=1, seqlen=8, head_dim=64, scale=1.0,
                        dtype=0, dropout_p=0.0, rng=0, stream=0)


@pytest.mark.skipif(HAS_CUDA or Path("/dev/nvidiactl").exists(),
                    reason="needs a machine without a GPU (the launch must fail before reaching one)")
def test_failed_launch_raises_runtime_error_naming_the_kernel(C):
    with pytest.raises(RuntimeError, match=r"kernel bias_gelu_fwd_kernel failed to launch: cuda\w+"):
        C.bias_gelu_fwd(x=0, x_stride=8, bias=0, bias_f32=False, y=0, M=1, N=8, approximate=0, dtype=0, stream=0)


def _setup_py(env_update, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "ROBERTA_FAST_CUDA")}
    env.update(env_update)
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_setup_switches():
    off = _setup_py({"ROBERTA_FAST_CUDA": "0"}, "--name")
    assert off.returncode == 0 and "ROBERTA_FAST_CUDA=0, skipping the CUDA extension" in off.stdout
    no_nvcc = {"PATH": str(Path(sys.executable).parent)}  # python only: no nvcc there
    auto = _setup_py(no_nvcc, "--name")
    assert auto.returncode == 0 and "nvcc not found, skipping the CUDA extension" in auto.stdout, auto.stdout
    on = _setup_py({**no_nvcc, "ROBERTA_FAST_CUDA": "1"}, "--name")
    assert on.returncode != 0 and "ROBERTA_FAST_CUDA=1 but nvcc was not found" in on.stdout + on.stderr
    bad = _setup_py({"ROBERTA_FAST_CUDA": "1", "ROBERTA_FAST_CUDA_ARCHS": "70"}, "--name")
    assert bad.returncode != 0 and "not an architecture >= 80" in bad.stdout + bad.stderr


def test_setup_failed_build(tmp_path):
    """A failing nvcc: an error with ROBERTA_FAST_CUDA=1, one line and a normal finish without it."""
    fake = tmp_path / "cuda" / "bin"
    fake.mkdir(parents=True)
    (fake / "nvcc").write_text("#!/bin/sh\necho fake nvcc fails >&2\nexit 1\n")
    (fake / "nvcc").chmod(0o755)
    env = {"CUDA_HOME": str(tmp_path / "cuda"), "ROBERTA_FAST_CUDA_BUILD_DIR": str(tmp_path / "b")}
    args = ("build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp"))
    on = _setup_py({**env, "ROBERTA_FAST_CUDA": "1"}, *args)
    assert on.returncode != 0 and "the nvcc build failed" in on.stdout + on.stderr
    auto = _setup_py(env, *args)
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert "CUDA extension build failed" in auto.stdout and "continuing without roberta_fast._C" in auto.stdout
    assert not list((tmp_path / "lib").rglob("_C.*.so"))  # (the emulated _C_emu builds without nvcc)


def test_package_imports_without_the_module():
    code = ("import sys; sys.modules['roberta_fast._C'] = None\n"
            "import roberta_fast, roberta_fast.cuda_ops.attention\n"
            "from roberta_fast import backends\n"
            "assert backends.cuda_module() is None and not backends.cuda_built()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
