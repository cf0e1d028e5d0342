"""Shared pieces of the harness: environment record, the measured ceilings, the time budget, the progress
bar and the row helpers. The timers are roberta_fast.testing's (time_gpu_kernel: do_bench quantiles;
time_gpu_loop: CUDA events around whole calls, for the encoder's latency percentiles; time_cpu:
perf_counter), the same ones the tuner uses.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from roberta_fast import backends
from roberta_fast._utils import dtype_name  # noqa: F401  (re-exported for the suites)
from roberta_fast.testing import time_cpu, time_gpu_kernel, time_gpu_loop  # noqa: F401

# the checkout this file lives in, when it runs from one (git sha of the results); installed: unknown
REPO = Path(__file__).resolve().parent.parent

# Dense (no sparsity) bf16 tensor-core peaks from vendor datasheets, TFLOP/s, matched on the device
# name (first match wins, so the longer names come first). Only used beside the measured ceiling.
DATASHEET_BF16_TFLOPS = [
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
    ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2),
]


def datasheet_tflops(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    for key, tf in DATASHEET_BF16_TFLOPS:
        if key.lower() in gpu_name.lower():
            return tf
    return None


def slug(s: str) -> str:
    """A file-name-safe version of s: letters, digits, '.', '_' and '-' only."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", s.strip()).strip("-._")
    return s or "unknown"


# ----------------------------------------------------------------------------- environment


def _run(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_sha() -> str:
    env = os.environ.get("ROBERTA_FAST_GIT_SHA")
    if env:
        return env
    sha = _run(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    if sha is None:
        return "unknown"
    dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return sha + ("-dirty" if dirty else "")


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except Exception:  # noqa: BLE001
        return None
    return getattr(m, "__version__", "unknown")


def backends_available(device: torch.device) -> dict:
    """Which op backends can run on `device`, with the reason when one cannot."""
    out = {"torch": True}
    for b in ("triton", "cuda"):
        why = backends.why_unavailable(b, device)
        out[b] = why is None
        if why is not None:
            out[f"{b}_why"] = why
    return out


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "git_sha": git_sha(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "device": device.type,
        "gpu": None,
        "gpu_capability": None,
        "gpu_memory_gib": None,
        "driver": None,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["gpu"] = p.name
        env["gpu_capability"] = f"{p.major}.{p.minor}"
        env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        env["sm_count"] = p.multi_processor_count
        drv = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = drv.splitlines()[0].strip() if drv else None
    try:
        env["backends"] = backends_available(device)
    except Exception as e:  # noqa: BLE001
        env["backends"] = {"error": f"{type(e).__name__}: {e}"}
    return env


def default_out_dir(env: dict) -> Path:
    date = _dt.date.today().isoformat()
    name = env.get("gpu") or "cpu"
    return Path("bench_out") / f"{date}_{slug(name)}"


# ----------------------------------------------------------------------------- time budget + progress


class Budget:
    """Wall-clock budget: rows are skipped (and say so) once the deadline has passed."""

    def __init__(self, seconds: float | None):
        self.start = time.monotonic()
        self.deadline = None if seconds is None else self.start + seconds

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def sub(self, fraction: float) -> Budget:
        """A child budget ending after `fraction` of what is left (or never, without a deadline)."""
        b = Budget(None)
        if self.deadline is not None:
            b.deadline = time.monotonic() + max(0.0, self.left()) * fraction
        return b

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class Progress:
    """tqdm when it is installed and stderr is a terminal or forced; else a line every few items."""

    def __init__(self, total: int, desc: str, enable: bool = True):
        self.total, self.desc, self.n, self._bar = total, desc, 0, None
        self._last = time.monotonic()
        self.enable = enable
        if not enable:
            return
        try:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False,
                             mininterval=1.0)
        except ImportError:
            self._bar = None

    def update(self, label: str = ""):
        self.n += 1
        if not self.enable:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label[:60], refresh=False)
            self._bar.update(1)
        elif time.monotonic() - self._last > 10 or self.n == self.total:
            self._last = time.monotonic()
            print(f"  [{self.desc}] {self.n}/{self.total} {label}", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()


# ----------------------------------------------------------------------------- ceilings


def measure_ceilings(device: torch.device, quick: bool) -> dict:
    """The copy ceiling (a large device-to-device copy, bytes read + written per second) and the
    matmul ceiling (a large bf16 GEMM on a GPU, an fp32 GEMM on a CPU), measured now."""
    out: dict = {"device": device.type}
    if device.type == "cuda":
        n = (512 if quick else 1024) * 2**20  # bytes per buffer
        src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
        dst = torch.empty_like(src)
        med = time_gpu_kernel(lambda: dst.copy_(src), rep_ms=100 if quick else 300)[0]
        out.update(copy_bytes=2 * n, copy_ms=med, copy_gbps=2 * n / med / 1e6)
        del src, dst
        m = 8192
        a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        med = time_gpu_kernel(lambda: a @ b, rep_ms=100 if quick else 300)[0]
        out.update(matmul_shape=[m, m, m], matmul_dtype="bfloat16", matmul_ms=med,
                   matmul_tflops=2 * m**3 / med / 1e9)
        del a, b
        torch.cuda.empty_cache()
    else:
        n = 64 * 2**20
        src = torch.ones(n, dtype=torch.uint8)
        dst = torch.empty_like(src)
        # the fastest sample: a shared CPU is rarely idle for the median one
        med = time_cpu(lambda: dst.copy_(src), rep_ms=100, min_reps=5, qs=(0.0,))[0]
        out.update(copy_bytes=2 * n, copy_ms=med, copy_gbps=2 * n / med / 1e6)
        m = 1024
        a, b = torch.randn(m, m), torch.randn(m, m)
        med = time_cpu(lambda: a @ b, rep_ms=100, min_reps=5, qs=(0.0,))[0]
        out.update(matmul_shape=[m, m, m], matmul_dtype="float32", matmul_ms=med,
                   matmul_tflops=2 * m**3 / med / 1e9)
    return out


def short_error(e: BaseException, limit: int = 300) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
