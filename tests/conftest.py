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
