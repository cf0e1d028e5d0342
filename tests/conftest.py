"""Test set-up: without a CUDA GPU every Triton kernel runs on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of this file.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def kernel_backends(device: str):
    """Kernel backends that can run on `device` here ("triton" under the interpreter on CPU)."""
    from roberta_fast.ops import _dispatch

    out = []
    dev = torch.device(device)
    if _dispatch.triton_can_run(dev):
        out.append("triton")
    if _dispatch.cuda_can_run(dev):
        out.append("cuda")
    return out


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty / torch.empty_like / new_empty return NaN-filled float tensors (ints: -7777)
    while the test runs, so any output element a kernel forgets to write shows up as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    real_new_empty = torch.Tensor.new_empty

    def _fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7777)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _fill(real_new_empty(self, *a, **k)))
    yield
