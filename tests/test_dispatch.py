"""Backend choice and the package's import contract (no GPU, no compiled module needed)."""

import subprocess
import sys

import pytest
import torch

from roberta_fast.ops import _dispatch
from roberta_fast.ops._dispatch import BackendUnavailableError, resolve_backend

CPU = torch.device("cpu")


def test_import_without_gpu_or_compiled_module():
    code = ("import sys, roberta_fast, roberta_fast.ops as o; "
            "assert 'roberta_fast._C' not in sys.modules, 'the compiled module must be imported lazily'; "
            "print(sorted(o.__all__))")
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "layer_norm" in res.stdout and "attention_varlen" in res.stdout


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("ROBERTA_FAST_BACKEND", raising=False)
    assert resolve_backend("layer_norm", None, CPU) == "torch"


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'tritonn'"):
        resolve_backend("layer_norm", "tritonn", CPU)


def test_env_override(monkeypatch):
    monkeypatch.setenv("ROBERTA_FAST_BACKEND", "torch")
    assert resolve_backend("layer_norm", None, CPU) == "torch"
    monkeypatch.setenv("ROBERTA_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ROBERTA_FAST_BACKEND must be one of"):
        resolve_backend("layer_norm", None, CPU)
    monkeypatch.setenv("ROBERTA_FAST_BACKEND", "auto")
    assert resolve_backend("layer_norm", None, CPU) == "torch"


def test_named_cuda_backend_missing_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_dispatch, "cuda_built", lambda: False)
    with pytest.raises(BackendUnavailableError, match="ROBERTA_FAST_CUDA=1 pip install"):
        resolve_backend("layer_norm", "cuda", CPU)


def test_named_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(_dispatch, "interpret_mode", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("layer_norm", "triton", CPU)


def test_named_triton_on_cpu_under_interpreter(monkeypatch):
    monkeypatch.setattr(_dispatch, "interpret_mode", lambda: True)
    assert resolve_backend("layer_norm", "triton", CPU) == "triton"


def test_supports_reason_raises_when_named_and_is_skipped_when_automatic(monkeypatch):
    monkeypatch.delenv("ROBERTA_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "interpret_mode", lambda: True)

    def supports(b):
        return "head_dim 48 unsupported" if b == "triton" else None

    with pytest.raises(ValueError, match="head_dim 48 unsupported"):
        resolve_backend("attention", "triton", CPU, supports=supports)
    # automatic choice never raises: it falls back to the reference
    assert resolve_backend("attention", None, CPU, supports=supports) == "torch"


def test_check_helpers_name_argument_expected_and_given():
    x = torch.zeros(2, 3, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"op: weight must have x's dtype \(float16\) or float32, got bfloat16"):
        _dispatch.check_param_dtype("op", "weight", torch.zeros(3, dtype=torch.bfloat16), x)
    with pytest.raises(TypeError, match="op: x must be a torch.Tensor, got list"):
        _dispatch.check_tensor("op", "x", [1, 2])
    with pytest.raises(TypeError, match=r"op: x must have dtype in \(float16, bfloat16, float32\), got int64"):
        _dispatch.check_tensor("op", "x", torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"op: bias must have shape \(3,\), got \(4,\)"):
        _dispatch.check_shape("op", "bias", torch.zeros(4), (3,))
    with pytest.raises(ValueError, match="x is on cpu, y is on meta"):
        _dispatch.check_same_device("op", x=x, y=torch.zeros(1, device="meta"))
