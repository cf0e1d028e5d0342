"""pytest set-up for `pytest benchmarks/ --benchmark-only` (pytest-benchmark).

Like tests/conftest.py, this turns the Triton interpreter on before triton is first imported when
there is no GPU. `--bench-out DIR` keeps the harness run's JSON / markdown / plots (default: a
temporary directory).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-out", default=None, help="directory for the harness run's results")
    parser.addoption("--bench-full", action="store_true", help="run the full harness, not --quick")


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bench_out(request, tmp_path_factory):
    out = request.config.getoption("--bench-out")
    return out if out else str(tmp_path_factory.mktemp("bench_out"))
