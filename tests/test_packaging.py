"""The package boundary: a wheel holds everything the CLI runs (roberta_fast.kernels, roberta_fast.benchmarks),
works from any directory once installed outside the checkout, and the sdist carries csrc/."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(extra)
    return env


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the checkout (no CUDA build: ROBERTA_FAST_CUDA=0)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                              "*.so", ".pytest_cache", "bench_out"))
    env = _env(ROBERTA_FAST_CUDA="0", ROBERTA_FAST_CUDA_EMULATE_BUILD="0")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
          str(src)], env=env, cwd=tmp)
    (whl,) = (tmp / "dist").glob("roberta_fast-*.whl")
    return whl


def test_wheel_holds_kernels_and_benchmarks_not_the_pytest_entry(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for must in ("roberta_fast/kernels/attention.py", "roberta_fast/kernels/layer_norm.py",
                 "roberta_fast/benchmarks/run.py", "roberta_fast/benchmarks/bench_ops.py",
                 "roberta_fast/backends.py", "roberta_fast/testing.py", "roberta_fast/benchmarks/gpu_suite.sh"):
        assert must in names, must
    assert not [n for n in names if n.startswith("benchmarks/") or n.startswith("kernels/")], "top-level packages"
    assert not [n for n in names if n.endswith(("test_benchmarks.py", "conftest.py"))]


def test_installed_wheel_runs_bench_and_env_from_another_directory(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)])
    # a foreign top-level `benchmarks` package on the path must not be the one that runs
    (elsewhere / "benchmarks").mkdir()
    (elsewhere / "benchmarks" / "__init__.py").write_text("raise RuntimeError('the wrong benchmarks package')\n")
    env = _env(PYTHONPATH=str(target), CUDA_VISIBLE_DEVICES="")
    script = target / "bin" / "roberta-fast"
    cmd = [sys.executable, str(script)] if script.exists() else [sys.executable, "-m", "roberta_fast.cli"]
    out = _run(cmd + ["env"], cwd=elsewhere, env=env).stdout
    assert f"({target / 'roberta_fast'})" in out, out  # the installed copy, not the checkout
    assert "backends on cpu:" in out
    res = _run(cmd + ["bench", "--quick", "--only", "layer_norm", "--no-plots", "--no-progress", "--out",
                      str(tmp_path / "out")], cwd=elsewhere, env=env)
    assert res.stdout.splitlines()[0].startswith("GPU figures need a GPU"), res.stdout[:500]
    assert (tmp_path / "out" / "results.json").is_file() and (tmp_path / "out" / "results.md").is_file()


def test_sdist_carries_the_cuda_sources(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                              "*.so", ".pytest_cache", "bench_out"))
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
         env=_env(ROBERTA_FAST_CUDA="0", ROBERTA_FAST_CUDA_EMULATE_BUILD="0"))
    (sdist,) = (tmp_path / "dist").glob("roberta_fast-*.tar.gz")
    names = tarfile.open(sdist).getnames()
    cu = sorted(n.split("/csrc/", 1)[1] for n in names if "/csrc/" in n and n.endswith((".cu", ".cuh", ".h", ".cpp")))
    expected = sorted(str(p.relative_to(ROOT / "csrc")) for p in (ROOT / "csrc").rglob("*")
                      if p.suffix in (".cu", ".cuh", ".h", ".cpp"))
    assert cu == expected and "attention.cu" in cu


def test_required_cuda_build_without_sources_is_an_error(tmp_path):
    """ROBERTA_FAST_CUDA=1 where csrc/ has no sources (e.g. an incomplete copy) stops the install."""
    for f in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, tmp_path / f)
    (tmp_path / "csrc").mkdir()
    res = subprocess.run([sys.executable, "setup.py", "--name"], cwd=tmp_path, capture_output=True, text=True,
                         env=_env(ROBERTA_FAST_CUDA="1"), timeout=120)
    assert res.returncode != 0
    assert "ROBERTA_FAST_CUDA=1 but there are no CUDA sources" in res.stdout + res.stderr
