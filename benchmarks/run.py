"""The one benchmark run behind `roberta-fast bench`, `python -m roberta_fast.benchmarks.run` and
`pytest benchmarks/ --benchmark-only`.

    run(quick=False, out=None, only=None, time_budget=None) -> the results document (also written)

GPU run: the copy and matmul ceilings, the kernel suite (bench_ops), the encoder suite (bench_encoder), the
per-layer launch/byte analysis (layers).
Without a GPU the same code runs a reduced mode: torch-backend timings on small CPU shapes with
perf_counter, Triton checked for correctness under TRITON_INTERPRET=1 on tiny shapes, a two-layer
roberta-base encoder on the CPU, and the FLOP / byte / launch counts. Its first output line says that
GPU figures need a GPU.

--only takes a comma-separated list of: kernels, encoder, layers, checks, host, train, mlm, embed, lsh, an op name
(layer_norm, bias_gelu, masked_softmax, attention, attention_varlen) or a model name (roberta-base, roberta-large).

host (bench_host): the host time of the GPU path per op and per roberta-base forward beside plain PyTorch ops and
transformers eager / SDPA, with Python-call and launch counts; without a GPU it runs in a child process over a
stub CUDA driver (docs/host_path.md).

train (bench_train): one fine-tuning step (forward + backward + AdamW) against transformers eager, SDPA and (GPU)
torch.compile of SDPA: tokens/s, peak memory, launches per layer; the CPU run times a small version.

embed (bench_embed): texts/s and real tokens/s of encoding a mixed-length corpus with all-MiniLM-L6-v2: ours
against sentence-transformers' encode() and transformers SDPA with the same pooling (fp16 on a GPU, fp32 on the CPU).

mlm (bench_mlm): the masked-LM head + loss alone (ours: masked rows only + ops.linear_cross_entropy) against
transformers' head + F.cross_entropy and (GPU) torch.compile of it: time and peak memory (CPU: bytes counted).

lsh (bench_lsh): LSH attention (ops.lsh_attention) against exact attention (ops.attention): time and memory per
length (GPU 512 .. 16,384 fp16; CPU 256 .. 2,048 on the torch backend), the crossover length, and the approximation
error (output relative error, attention mass kept) on random inputs and on all-MiniLM-L6-v2 over real text.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from pathlib import Path

CPU_NOTE = ("GPU figures need a GPU: no CUDA device here, so this is the reduced CPU run (torch-backend "
            "timings on small CPU shapes, Triton correctness under the interpreter, FLOP/byte/launch counts).")
SUITES = ("kernels", "encoder", "layers", "checks", "host", "train", "mlm", "embed", "lsh")


def _cuda_available() -> bool:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.cuda.is_available()


def prepare_environment(device: str | None = None) -> str:
    """Pick the device ("cuda" / "cpu") and, for the CPU, turn the Triton interpreter on before triton
    is imported. Returns the device type."""
    dev = device or ("cuda" if _cuda_available() else "cpu")
    if dev == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            pass  # too late to switch the interpreter on; the checks will report the backend as unavailable
        else:
            os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return dev


def parse_only(only) -> dict:
    """The selection: which suites, ops and models run (None = everything)."""
    from roberta_fast.testing import OPS

    from .bench_encoder import MODELS

    names = [] if not only else [x.strip() for x in (only.split(",") if isinstance(only, str) else only)]
    names = [n for n in names if n]
    valid = set(SUITES) | set(OPS) | {m for m in MODELS if "layers" not in m}
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"--only: unknown name(s) {bad}; choose from {sorted(valid)}")
    if not names:
        return {"suites": set(SUITES), "ops": list(OPS), "models": None}
    ops = [o for o in OPS if o in names] or (list(OPS) if ("kernels" in names or "checks" in names) else [])
    models = [m for m in MODELS if m in names]
    suites = {s for s in SUITES if s in names}
    if any(o in names for o in OPS):
        suites |= {"kernels", "checks"}
    if models:
        suites.add("encoder")
    return {"suites": suites, "ops": ops, "models": models or None}


def run(*, quick: bool = False, out=None, only=None, time_budget: float | None = None, device: str | None = None,
        plots: bool = True, progress: bool = True, echo=print) -> dict:
    t_start = time.monotonic()
    if device == "cuda" and not _cuda_available():
        raise ValueError("--device cuda, but no CUDA GPU is visible (leave --device out for the reduced CPU run)")
    dev_type = prepare_environment(device)
    if dev_type == "cpu":
        echo(CPU_NOTE)
    sel = parse_only(only)

    import torch

    from . import bench_embed, bench_encoder, bench_host, bench_lsh, bench_mlm, bench_ops, bench_train, layers, report
    from .common import Budget, datasheet_tflops, default_out_dir, environment, measure_ceilings, short_error

    dev = torch.device(dev_type)
    env = environment(dev)
    if dev_type == "cuda":
        echo(f"roberta_fast bench on {env['gpu']} (driver {env['driver']}, torch {env['torch']}, CUDA "
             f"{env['cuda']}, triton {env['triton']}), {'quick' if quick else 'full'} run")
    out_dir = Path(out) if out else default_out_dir(env)
    try:  # before any measurement: a run that cannot write its results does not start
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out_dir}: cannot write there ({e.strerror or e})") from None
    budget = Budget(time_budget)
    notes: list[str] = []
    avail = env.get("backends") or {}
    if dev_type == "cuda" and not avail.get("cuda"):
        notes.append("cuda backend not built (roberta_fast._C missing): no 'cuda' rows")
    if dev_type == "cpu":
        notes.append("reduced CPU run: kernel rows time eager PyTorch against roberta_fast's torch backend on "
                     "small shapes (fp32, perf_counter); no torch.compile, no Triton timings (the interpreter "
                     "is only a correctness check), no CUDA graphs; ceilings are the CPU's, and the small "
                     "inputs sit in its caches, so % of ceiling and MFU here say nothing about a GPU")

    seconds: dict = {}
    t0 = time.monotonic()
    ceilings = measure_ceilings(dev, quick)
    seconds["ceilings"] = time.monotonic() - t0
    ceilings["datasheet_tflops"] = datasheet_tflops(env.get("gpu"))
    echo(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, matmul {ceilings['matmul_tflops']:.2f} TFLOP/s "
         f"({ceilings['matmul_dtype']})")

    rows: list[dict] = []
    layers_res = None
    if dev_type == "cuda":
        kmode, kdtypes = ("quick", [torch.float16]) if quick else ("full", [torch.float16, torch.bfloat16])
        rep_ms = 100.0 if quick else 300.0
        models = sel["models"] or (["roberta-base"] if quick else ["roberta-base", "roberta-large"])
        edtypes = [torch.float16] if quick else [torch.float16, torch.bfloat16]
    else:
        kmode, kdtypes, rep_ms = "cpu", [torch.float32], 30.0
        models, edtypes = ["roberta-base-2layers"], [torch.float32]
        if sel["models"]:
            notes.append(f"reduced CPU run: {sel['models']} replaced by roberta-base-2layers")

    t0 = time.monotonic()
    if "kernels" in sel["suites"] and sel["ops"]:
        kb = budget.sub(0.45) if "encoder" in sel["suites"] else budget
        rows += bench_ops.run_kernels(device=dev, mode=kmode, ops=sel["ops"], dtypes=kdtypes, ceilings=ceilings,
                                      avail=avail, budget=kb, rep_ms=rep_ms, progress=progress, notes=notes)
    seconds["kernels"] = time.monotonic() - t0
    t0 = time.monotonic()
    if "checks" in sel["suites"] and sel["ops"] and dev_type == "cpu":
        if avail.get("triton"):
            rows += bench_ops.check_backend(device=dev, ops=sel["ops"], progress=progress)
        else:
            notes.append(f"Triton checks skipped: {avail.get('triton_why', 'triton unavailable')}")
    seconds["checks"] = time.monotonic() - t0
    t0 = time.monotonic()
    if "encoder" in sel["suites"]:
        rows += bench_encoder.run_encoder(device=dev, models=models, dtypes=edtypes, quick=quick,
                                          ceilings=ceilings, datasheet=ceilings["datasheet_tflops"], budget=budget,
                                          rep_ms=rep_ms * (1 if dev_type == "cpu" else 3), progress=progress,
                                          notes=notes)
    seconds["encoder"] = time.monotonic() - t0
    t0 = time.monotonic()
    if "layers" in sel["suites"]:
        try:
            layers_res = layers.run_layers(dev, avail, quick)
        except Exception as e:  # noqa: BLE001
            notes.append(f"layer analysis failed: {short_error(e)}")
    seconds["layers"] = time.monotonic() - t0
    t0 = time.monotonic()
    if "host" in sel["suites"]:
        if budget.left() <= 0:
            notes.append("host suite skipped: time budget spent")
        else:
            rows += bench_host.run_host(dev, quick=quick, notes=notes)
    seconds["host"] = time.monotonic() - t0
    t0 = time.monotonic()
    if "train" in sel["suites"]:
        if budget.left() <= 0:
            notes.append("train suite skipped: time budget spent")
        else:
            tmodel = (sel["models"] or ["roberta-base"])[0] if dev_type == "cuda" else "roberta-base-2layers"
            tdtypes = edtypes if dev_type == "cuda" else [torch.float32]
            rows += bench_train.run_train(device=dev, model=tmodel, dtypes=tdtypes, quick=quick, budget=budget,
                                          rep_ms=rep_ms * (1 if dev_type == "cpu" else 3), progress=progress,
                                          notes=notes)
    seconds["train"] = time.monotonic() - t0
    t0 = time.monotonic()
    if "mlm" in sel["suites"]:
        if budget.left() <= 0:
            notes.append("mlm suite skipped: time budget spent")
        else:
            rows += bench_mlm.run_mlm(dev, quick=quick, budget=budget, rep_ms=rep_ms, notes=notes)
    seconds["mlm"] = time.monotonic() - t0
    t0 = time.monotonic()
    if "embed" in sel["suites"]:
        if budget.left() <= 0:
            notes.append("embed suite skipped: time budget spent")
        else:
            rows += bench_embed.run_embed(device=dev, quick=quick, budget=budget, progress=progress, notes=notes)
    seconds["embed"] = time.monotonic() - t0
    t0 = time.monotonic()
    if "lsh" in sel["suites"]:
        if budget.left() <= 0:
            notes.append("lsh suite skipped: time budget spent")
        else:
            rows += bench_lsh.run_lsh(dev, quick=quick, budget=budget, rep_ms=rep_ms, notes=notes)
    seconds["lsh"] = time.monotonic() - t0

    doc = {
        "schema": report.SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": "gpu" if dev_type == "cuda" else "cpu-reduced",
        "quick": bool(quick),
        "only": sorted(sel["suites"]) + sel["ops"] + (sel["models"] or []) if only else None,
        "env": env,
        "ceilings": ceilings,
        "notes": notes,
        "rows": rows,
        "layers": layers_res,
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "suite_seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    plot_files = []
    if plots:
        try:
            plot_files = report.make_plots(doc, out_dir)
        except ImportError as e:
            notes.append(f"no plots: {short_error(e)}")
        except Exception as e:  # noqa: BLE001
            notes.append(f"plots failed: {short_error(e)}")
    problems = report.validate(doc)
    if problems:
        notes.append(f"schema problems: {problems[:5]}")
    files = [report.write_json(doc, out_dir / report.FILES["json"])]
    md = report.to_markdown(doc)
    (out_dir / report.FILES["markdown"]).write_text(md)
    files += [out_dir / report.FILES["markdown"], *plot_files]
    echo(md)
    _summary(doc, echo)
    echo("wrote " + ", ".join(str(f) for f in files))
    doc["files"] = [str(f) for f in files]
    return doc


def _summary(doc, echo):
    rows = doc["rows"]
    errs = [r for r in rows if r.get("error") and not str(r["error"]).startswith("skipped")]
    fails = _accuracy_failures(rows)
    over = [r for r in rows if r.get("suite") == "host" and r.get("ok") is False]
    echo(f"{len(rows)} rows, {len(errs)} with errors, {len(fails)} failing the accuracy rule"
         + (f", {len(over)} host-time rows over their target" if over else "") + f", {doc['elapsed_s']:.0f} s")


def _accuracy_failures(rows) -> list:
    """Rows whose result broke the accuracy rule (a host-time row's `ok` is its speed target instead)."""
    return [r for r in rows if r.get("ok") is False and r.get("suite") != "host"]


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--quick", action="store_true",
                   help="the small set (GPU: 1-2 shapes per kernel in fp16, roberta-base fp16, ~100 ms per timing)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output directory (default bench_out/<date>_<gpu>)")
    p.add_argument("--only", metavar="NAME", default=None,
                   help="comma-separated: kernels, encoder, layers, checks, host, train, mlm, embed, lsh, an op or a "
                        "model name")
    p.add_argument("--time-budget", metavar="SECONDS", type=float, default=None,
                   help="skip (and say so) what would start after this many seconds")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--no-plots", action="store_true", help="write JSON and markdown only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m roberta_fast.benchmarks.run", description="roberta_fast benchmarks")
    add_arguments(p)
    a = p.parse_args(argv)
    return run_from_args(a)


def run_from_args(a) -> int:
    try:
        doc = run(quick=a.quick, out=a.out, only=a.only, time_budget=a.time_budget, device=a.device,
                  plots=not a.no_plots, progress=not a.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fails = _accuracy_failures(doc["rows"])
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
