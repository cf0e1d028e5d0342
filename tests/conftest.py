"""Test set-up, and the one (device, backend) parametrization every op test uses.

Without a CUDA GPU every Triton kernel runs on CPU tensors through the interpreter (TRITON_INTERPRET=1,
set before triton is first imported, hence at the top of this file), and every CUDA C++ kernel runs on
CPU tensors through the emulated build roberta_fast._C_emu when it is built (ROBERTA_FAST_CUDA_EMULATE=1,
docs/cuda_emulation.md).

BACKEND_CASES / KERNEL_CASES: pytest params of (device, backend) for everything that can run an op here:
  ("cpu", "torch")      always
  ("cpu", "triton")     under the interpreter
  ("cpu", "cuda")       through the emulation, marked `cuda_emulated`
  ("cuda", backend)     marked `gpu` (skipped without a GPU); "cuda" and "triton" skipped below sm_80
KERNEL_CASES leaves out "torch" (tests of what only a kernel does). The accuracy rule and its floors
are roberta_fast.testing's; `skip_unsupported` skips a case a backend says it cannot take (its own
`unsupported`, e.g. head_dim 16 on the CUDA backend).
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("ROBERTA_FAST_CUDA_EMULATE", "1")

import pytest  # noqa: E402

from roberta_fast import backends  # noqa: E402
from roberta_fast.testing import poisoned_empty  # noqa: E402


def _capability():
    return torch.cuda.get_device_capability() if HAS_CUDA else (0, 0)


def _backend_cases(kernels_only: bool) -> list:
    cases = []
    cpu = torch.device("cpu")
    for b in backends.BACKENDS:
        if kernels_only and b == "torch":
            continue
        if backends.can_run(b, cpu):
            marks = [pytest.mark.cuda_emulated] if b == "cuda" else []
            cases.append(pytest.param("cpu", b, marks=marks, id=f"cpu-{b}" + ("-emulated" if b == "cuda" else "")))
    old_gpu = _capability() < (8, 0)
    for b in backends.BACKENDS:
        if kernels_only and b == "torch":
            continue
        marks = [pytest.mark.gpu]
        if HAS_CUDA and b != "torch":
            why = backends.why_unavailable(b, torch.device("cuda"))
            if why is not None:
                marks.append(pytest.mark.skip(reason=why))
            elif old_gpu:
                marks.append(pytest.mark.skip(reason=f"backend {b!r} needs sm_80 or newer"))
        cases.append(pytest.param("cuda", b, marks=marks, id=f"cuda-{b}"))
    return cases


BACKEND_CASES = _backend_cases(kernels_only=False)
KERNEL_CASES = _backend_cases(kernels_only=True)


def _short(v):
    return "x".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def with_cases(table: dict, *, kernels_only: bool = False) -> list:
    """BACKEND_CASES (or KERNEL_CASES) times per-device cases: pytest params (device, backend, *case) with the
    backend's marks. `table` maps a device ("cpu", "cuda") or a (device, backend) pair (which wins) to a list
    of case tuples (e.g. (dtype, head_dim, sizes)): tolerances are the rule's, sizes sit beside the dtypes."""
    out = []
    for param in KERNEL_CASES if kernels_only else BACKEND_CASES:
        device, backend = param.values
        for case in table.get((device, backend), table.get(device, [])):
            case = case if isinstance(case, tuple) else (case,)
            label = "-".join(str(c).removeprefix("torch.") if not isinstance(c, dict) else
                             ",".join(f"{k}{_short(v)}" for k, v in c.items()) for c in case)
            out.append(pytest.param(device, backend, *case, marks=param.marks, id=f"{param.id}-{label}"))
    return out


def skip_unsupported(backend: str, op: str, *args):
    """Skip the test when a kernel backend says it cannot take these arguments (its `unsupported`)."""
    if backend == "torch":
        return
    why = backends.implementation(backend, op).unsupported(*args)
    if why is not None:
        pytest.skip(why)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_capability(request):
    torch.manual_seed(0)
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("device") == "cuda" and params.get("dtype") == torch.bfloat16 and _capability() < (8, 0):
        pytest.skip("bfloat16 kernels need sm_80 or newer")
    yield


@pytest.fixture
def poison_empty():
    """torch.empty / torch.empty_like / new_empty return NaN-filled float tensors (ints: -7777) while the
    test runs, so any output element a kernel forgets to write shows up as NaN (testing.poisoned_empty)."""
    with poisoned_empty():
        yield
