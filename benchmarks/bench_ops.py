"""Kernel benchmarks: every op, forward and forward+backward, at RoBERTa shapes, every provider.

The cases (inputs as the encoder makes them, the eager version, the oracle, the bytes and FLOPs) and the
shape grids are roberta_fast.testing's, the same ones the tests' rule and the tuner use.

Providers (one row each):
  eager    plain PyTorch doing the same math in the benchmarked dtype (testing's yardstick)
  compile  torch.compile of that eager code (default mode, static shapes)
  torch    roberta_fast's "torch" backend (the fp32-accumulating reference); CPU runs only
  triton   roberta_fast's Triton backend
  cuda     roberta_fast's CUDA C++ backend (when roberta_fast._C was built)
  sdpa     torch.nn.functional.scaled_dot_product_attention (attention ops only)

linear (ops.linear, the GEMM with its bias + GELU / bias + residual epilogue) runs with the whole kernel suite
(`--only kernels`, or everything): FFN1 + bias + GELU and the FFN2 output projection + bias + residual at
roberta-base and roberta-large shapes (>= 8k tokens on a GPU; 256 tokens in the reduced CPU run), providers
eager, torch (cuBLAS + separate elementwise ops: the baseline a fused GEMM must beat), triton, cublaslt and
compile-max-autotune (torch.compile(mode="max-autotune") of the same math; GPU only), in TFLOP/s and % of the
measured matmul ceiling.

attention uses full-length sequences with a key padding mask that keeps every key (the FLOPs are
those of the dense shape); attention_varlen packs sequences of seeded lengths uniform in
[0.2 S, S], and its eager / compile / sdpa baselines pad the batch, run padded attention with a
mask and unpad again (what a user of those would have to do).

Each row: median, p20 and p80 time, the fewest bytes / the FLOPs of the op (roberta_fast.flops),
GB/s and % of the copy ceiling (memory-bound ops), TFLOP/s and % of the matmul ceiling (attention),
speedup over eager, and for forward rows the max error against a float64 reference beside the
bound 2 * eager's error + floor (so a fast wrong answer shows).
"""

from __future__ import annotations

import torch

from roberta_fast import testing, tuning
from roberta_fast._utils import dtype_name
from roberta_fast.testing import MEMORY_BOUND, OPS, OpCase, build_case, shape_label

from .common import Budget, Progress, short_error

# the harness's run modes -> testing's shape grids
GRIDS = {"full": "bench", "quick": "bench-quick", "cpu": "cpu", "check": "check"}


def shape_grid(mode: str, ops=OPS) -> list[tuple[str, dict]]:
    """(op, params) for "full" (GPU), "quick" (GPU), "cpu" (reduced) or "check" (interpreter) runs."""
    if mode not in GRIDS:
        raise ValueError(f"unknown mode {mode!r}")
    return testing.shape_grid(GRIDS[mode], ops)


# ----------------------------------------------------------------------------- runnables


def _impl(case: OpCase, provider: str):
    """callable(inputs dict) -> output for one provider."""
    if provider == "eager":
        return case.eager
    if provider == "sdpa":
        if case.sdpa is None:
            raise ValueError(f"{case.op} has no sdpa provider")
        return case.sdpa
    if provider == "compile":
        torch._dynamo.reset()  # fresh caches: no silent fallback to eager after the recompile limit
        return torch.compile(case.eager, dynamic=False)
    if provider == "compile-max-autotune":
        if case.inputs[case.leaves[0]].device.type != "cuda":
            raise ValueError("skipped: torch.compile(mode='max-autotune') is measured on a GPU only")
        torch._dynamo.reset()
        return torch.compile(case.eager, dynamic=False, mode="max-autotune")
    if provider in ("torch", "triton", "cuda", "cublaslt"):
        return lambda i: case.run(provider, i)
    raise ValueError(f"unknown provider {provider!r}")


def make_runnable(case: OpCase, provider: str, backward: bool):
    """(fn, grad_to_none, first_output): fn runs the provider once (forward, or forward+backward)."""
    impl = _impl(case, provider)
    if not backward:
        def fn():
            with torch.no_grad():
                return impl(case.inputs)

        return fn, None, fn()
    tensors = {k: (v.detach().clone().requires_grad_(k in case.leaves) if v.is_floating_point() else v)
               for k, v in case.inputs.items()}
    out = impl(tensors)
    gen = torch.Generator(device=out.device).manual_seed(1)
    dy = torch.randn(out.shape, generator=gen, device=out.device).to(out.dtype)
    out.backward(dy)
    leaves = [tensors[k] for k in case.leaves]

    def fn_bwd():
        impl(tensors).backward(dy)

    return fn_bwd, leaves, out.detach()


def reference_output(case: OpCase) -> torch.Tensor:
    """The oracle's output on float64 inputs (chunked over the batch for the S x S ops)."""
    inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in case.inputs.items()}
    return testing.evaluate(case, case.oracle, inputs, None, False)[0]


# ----------------------------------------------------------------------------- the suite


def providers_for(op: str, device: torch.device, avail: dict) -> list[str]:
    if device.type == "cpu":
        return ["eager", "torch"]  # the reduced mode: Triton runs under the interpreter only as a check
    out = ["eager"] + [b for b in ("triton", "cuda") if avail.get(b)]
    if op in ("attention", "attention_varlen"):
        out.append("sdpa")
    out.append("compile")
    return out


def run_kernels(*, device: torch.device, mode: str, ops, dtypes, ceilings: dict, avail: dict,
                budget: Budget, rep_ms: float, progress: bool = True, notes: list | None = None) -> list[dict]:
    grid = shape_grid(mode, ops)
    passes = ("fwd", "fwd+bwd")
    todo = [(op, p, dt, ps) for op, p in grid for dt in dtypes for ps in passes]
    total = sum(len(providers_for(op, device, avail)) for op, *_ in todo)
    bar = Progress(total, "kernels", enable=progress)
    rows: list[dict] = []
    for op, p, dt, ps in todo:
        provs = providers_for(op, device, avail)
        try:
            case = build_case(op, p, dt, device)
        except Exception as e:  # noqa: BLE001
            for prov in provs:
                rows.append(_row(op, p, dt, ps, prov, None, error=f"building inputs: {short_error(e)}"))
                bar.update()
            continue
        ref = None
        eager_err = None
        case_rows = []
        for prov in provs:
            bar.update(f"{op} {ps} {prov}")
            row = _row(op, p, dt, ps, prov, case)
            case_rows.append(row)
            if budget.left() <= 0 or (prov == "compile" and budget.left() < 45):
                row["error"] = "skipped: time budget"
                continue
            try:
                fn, leaves, out = make_runnable(case, prov, ps == "fwd+bwd")
                if ps == "fwd":
                    if ref is None:
                        ref = reference_output(case)
                    row["max_err"] = testing.max_abs_err(out, ref)
                    if prov == "eager":
                        eager_err = row["max_err"]
                del out
                if device.type == "cuda":
                    ms = testing.time_gpu_kernel(fn, rep_ms=rep_ms, grad_to_none=leaves)
                else:
                    ms = testing.time_cpu(fn, rep_ms=rep_ms, grad_to_none=leaves)
                row["ms"], row["ms_p20"], row["ms_p80"] = ms
            except NotImplementedError as e:
                row["error"] = f"not implemented: {short_error(e)}"
            except Exception as e:  # noqa: BLE001
                row["error"] = short_error(e)
            finally:
                fn = leaves = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        _finish_case(case_rows, eager_err, dt, ceilings)
        rows.extend(case_rows)
        del case, ref
    bar.close()
    if set(OPS) <= set(ops):  # the whole kernel suite: the linear rows too
        rows += run_linear(device=device, mode=mode, dtypes=dtypes, ceilings=ceilings, avail=avail, budget=budget,
                           rep_ms=rep_ms)
    return rows


# ----------------------------------------------------------------------------- linear


def linear_shapes(mode: str) -> list[dict]:
    """FFN1 (hidden -> 4 hidden, bias + exact GELU) and FFN2 (4 hidden -> hidden, bias + residual)."""
    if mode == "check":
        return [p for _, p in tuning.linear_shapes("check")]
    tokens = {"full": (8192, 16384), "quick": (8192,), "cpu": (256,)}[mode]
    hiddens = (768,) if mode == "cpu" else (768, 1024)
    return [p for t in tokens for h in hiddens for p in (
        {"tokens": t, "in": h, "out": 4 * h, "activation": "gelu", "residual": False},
        {"tokens": t, "in": 4 * h, "out": h, "activation": None, "residual": True})]


def linear_providers(device: torch.device, avail: dict) -> list[str]:
    if device.type == "cpu":  # the Triton interpreter is a correctness check, not a timing
        return ["eager", "torch", "cublaslt", "compile-max-autotune"]
    return ["eager", "torch"] + (["triton"] if avail.get("triton") else []) + ["cublaslt", "compile-max-autotune"]


def run_linear(*, device, mode, dtypes, ceilings, avail, budget, rep_ms) -> list[dict]:
    """The linear rows: each fused GEMM against cuBLAS + separate elementwise ops ("torch"), cuBLASLt's
    epilogue and torch.compile max-autotune of the same math; the speedup column is over eager."""
    rows = []
    for p in linear_shapes(mode):
        for dt in dtypes:
            case = tuning.linear_case(p, dt, device)
            for ps in ("fwd", "fwd+bwd"):
                ref, eager_err, case_rows = None, None, []
                for prov in linear_providers(device, avail):
                    row = _row("linear", p, dt, ps, prov, case)
                    case_rows.append(row)
                    if budget.left() <= 0 or (prov.startswith("compile") and budget.left() < 90):
                        row["error"] = "skipped: time budget"
                        continue
                    try:
                        fn, leaves, out = make_runnable(case, prov, ps == "fwd+bwd")
                        if ps == "fwd":
                            ref = reference_output(case) if ref is None else ref
                            row["max_err"] = testing.max_abs_err(out, ref)
                            eager_err = row["max_err"] if prov == "eager" else eager_err
                        del out
                        if device.type == "cuda":
                            row["ms"], row["ms_p20"], row["ms_p80"] = testing.time_gpu_kernel(
                                fn, rep_ms=rep_ms, grad_to_none=leaves)
                        else:
                            row["ms"], row["ms_p20"], row["ms_p80"] = testing.time_cpu(
                                fn, rep_ms=rep_ms, grad_to_none=leaves)
                    except Exception as e:  # noqa: BLE001  (n/a backends and skips are rows with a reason)
                        row["error"] = short_error(e)
                    finally:
                        fn = leaves = None
                _finish_case(case_rows, eager_err, dt, ceilings)
                rows.extend(case_rows)
            del case
    return rows


def _row(op, p, dt, ps, prov, case, error=None) -> dict:
    backward = ps == "fwd+bwd"
    row = {
        "suite": "kernel", "op": op, "pass": ps, "provider": prov, "dtype": dtype_name(dt),
        "shape": dict(p), "label": tuning.label(op, p), "ms": None, "ms_p20": None, "ms_p80": None,
        "bytes": None, "flops": None, "gbps": None, "pct_copy": None, "tflops": None, "pct_matmul": None,
        "speedup": None, "max_err": None, "err_bound": None, "ok": None, "error": error,
    }
    if case is not None:
        row["bytes"] = case.bytes_bwd if backward else case.bytes_fwd
        row["flops"] = case.flops_bwd if backward else case.flops_fwd
        row["shape"].update(case.extra)
    return row


def _finish_case(rows: list[dict], eager_err, dt, ceilings: dict):
    eager_ms = next((r["ms"] for r in rows if r["provider"] == "eager" and r["ms"]), None)
    for r in rows:
        if r["max_err"] is not None and eager_err is not None:
            r["err_bound"] = testing.FACTOR * eager_err + testing.FLOOR[dt]
            r["ok"] = bool(r["max_err"] <= r["err_bound"])
        ms = r["ms"]
        if not ms:
            continue
        if r["bytes"] and r["op"] in MEMORY_BOUND:
            r["gbps"] = r["bytes"] / ms / 1e6
            if ceilings.get("copy_gbps"):
                r["pct_copy"] = 100 * r["gbps"] / ceilings["copy_gbps"]
        if r["flops"]:
            r["tflops"] = r["flops"] / ms / 1e9
            if ceilings.get("matmul_tflops"):
                r["pct_matmul"] = 100 * r["tflops"] / ceilings["matmul_tflops"]
        if eager_ms:
            r["speedup"] = eager_ms / ms


# ----------------------------------------------------------------------------- correctness checks


def check_backend(*, device: torch.device, ops, dtypes=(torch.float32, torch.float16), backend="triton",
                  progress: bool = True) -> list[dict]:
    """Correctness of a kernel backend on tiny shapes (CPU: Triton under TRITON_INTERPRET=1): the output
    and every input gradient against float64, by testing's rule (testing.Verifier)."""
    todo = [(op, p, dt, ps) for op, p in shape_grid("check", ops) for dt in dtypes for ps in ("fwd", "fwd+bwd")]
    bar = Progress(len(todo), f"{backend} checks", enable=progress)
    rows = []
    for op, p, dt, ps in todo:
        bar.update(f"{op} {ps} {dtype_name(dt)}")
        row = {"suite": "check", "op": op, "pass": ps, "provider": backend, "dtype": dtype_name(dt),
               "shape": dict(p), "label": shape_label(op, p), "max_err": None, "err_bound": None, "ok": None,
               "worst": None, "error": None}
        rows.append(row)
        try:
            verifier = testing.Verifier(build_case(op, p, dt, device, seed=3), train=ps == "fwd+bwd",
                                        oracle_dtype=torch.float64)
            why = verifier.judge(backend)
            if verifier.errors:
                name, err, bound = max(verifier.errors, key=lambda e: e[1] / e[2] if e[2] else float("inf"))
                row["max_err"], row["err_bound"], row["worst"] = err, bound, name
            row["ok"] = why is None
            if why is not None:
                row["error"] = why
        except NotImplementedError as e:
            row["error"] = f"not implemented: {short_error(e)}"
        except Exception as e:  # noqa: BLE001
            row["error"] = short_error(e)
    bar.close()
    return rows
