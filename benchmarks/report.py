"""The run's outputs: one JSON document, a markdown report made from it, PNG plots made from it.

Files (plain names, at most five): results.json, results.md, speedup.png, ceiling.png, encoder.png.
`python -m roberta_fast.benchmarks.report results.json [OUTDIR]` remakes the markdown and plots from a JSON file.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

SCHEMA = "roberta_fast.bench/1"
FILES = {"json": "results.json", "markdown": "results.md", "speedup": "speedup.png",
         "ceiling": "ceiling.png", "encoder": "encoder.png"}

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))
_NONFINITE = ("nan", "inf", "-inf")  # how write_json stores non-finite numbers
# required keys per row kind and their allowed types
ROW_KEYS = {
    "kernel": {"op": str, "pass": str, "provider": str, "dtype": str, "shape": dict, "label": str,
               "ms": _OPT_NUM, "ms_p20": _OPT_NUM, "ms_p80": _OPT_NUM, "bytes": _OPT_NUM, "flops": _OPT_NUM,
               "gbps": _OPT_NUM, "pct_copy": _OPT_NUM, "tflops": _OPT_NUM, "pct_matmul": _OPT_NUM,
               "speedup": _OPT_NUM, "max_err": _OPT_NUM, "err_bound": _OPT_NUM, "ok": (bool, type(None)),
               "error": _OPT_STR},
    "encoder": {"model": str, "dtype": str, "workload": str, "provider": str, "cuda_graph": (bool, type(None)),
                "batch": int, "seqlen": int, "real_tokens": int, "padded_tokens": int, "flops": _NUM,
                "ms_p50": _OPT_NUM, "ms_p90": _OPT_NUM, "tokens_per_s": _OPT_NUM, "tflops": _OPT_NUM,
                "mfu": _OPT_NUM, "mfu_datasheet": _OPT_NUM, "peak_mem_mib": _OPT_NUM, "max_err": _OPT_NUM,
                "speedup": _OPT_NUM, "error": _OPT_STR},
    "check": {"op": str, "pass": str, "provider": str, "dtype": str, "shape": dict, "label": str,
              "max_err": _OPT_NUM, "err_bound": _OPT_NUM, "ok": (bool, type(None)), "error": _OPT_STR},
    "host": {"kind": str, "name": str, "provider": str, "label": str, "us": _OPT_NUM, "us_median": _OPT_NUM,
             "ratio": _OPT_NUM, "target": _OPT_NUM, "ok": (bool, type(None)), "python_calls": (int, type(None)),
             "launches": (int, type(None)), "error": _OPT_STR},
    "train": {"model": str, "dtype": str, "workload": str, "provider": str, "batch": int, "seqlen": int,
              "real_tokens": int, "padded_tokens": int, "ms_p50": _OPT_NUM, "ms_p90": _OPT_NUM,
              "tokens_per_s": _OPT_NUM, "peak_mem_mib": _OPT_NUM, "loss": _OPT_NUM,
              "launches_per_layer": (int, type(None)), "speedup": _OPT_NUM, "speedup_sdpa": _OPT_NUM,
              "error": _OPT_STR},
    "mlm": {"workload": str, "provider": str, "dtype": str, "batch": int, "seqlen": int, "hidden": int, "vocab": int,
            "masked": int, "ms_p50": _OPT_NUM, "ms_p90": _OPT_NUM, "peak_mem_mib": _OPT_NUM, "alloc_mib": _OPT_NUM,
            "largest_mib": _OPT_NUM, "mem_method": str, "loss": _OPT_NUM, "speedup": _OPT_NUM,
            "mem_ratio": _OPT_NUM, "error": _OPT_STR},
    "embed": {"model": str, "dtype": str, "workload": str, "provider": str, "texts": int, "real_tokens": int,
              "ms_p50": _OPT_NUM, "sentences_per_s": _OPT_NUM, "tokens_per_s": _OPT_NUM, "speedup_st": _OPT_NUM,
              "speedup_sdpa": _OPT_NUM, "min_cos": _OPT_NUM, "error": _OPT_STR},
    "lsh": {"workload": str, "provider": str, "dtype": str, "seqlen": int, "bucket_size": int, "num_hashes": int,
            "ms_p50": _OPT_NUM, "peak_mem_mib": _OPT_NUM, "alloc_mib": _OPT_NUM, "speedup": _OPT_NUM,
            "crossover_seqlen": (int, type(None)), "rel_err": _OPT_NUM, "mass": _OPT_NUM, "min_cos": _OPT_NUM,
            "error": _OPT_STR},
}
TOP_KEYS = {"schema": str, "created": str, "mode": str, "quick": bool, "env": dict, "ceilings": dict,
            "rows": list, "notes": list, "elapsed_s": _NUM}
ENV_KEYS = ("gpu", "driver", "torch", "triton", "cuda", "git_sha", "transformers", "python")


def validate(doc: dict) -> list[str]:
    """Problems with a results document (empty list = valid)."""
    probs = []
    if not isinstance(doc, dict):
        return ["document is not an object"]
    for k, t in TOP_KEYS.items():
        if k not in doc:
            probs.append(f"missing top-level key {k!r}")
        elif not isinstance(doc[k], t) or (t is _NUM and isinstance(doc[k], bool)):
            probs.append(f"top-level {k!r} has type {type(doc[k]).__name__}")
    if doc.get("schema") not in (None, SCHEMA):
        probs.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    if doc.get("mode") not in (None, "gpu", "cpu-reduced"):
        probs.append(f"mode is {doc.get('mode')!r}")
    env = doc.get("env") if isinstance(doc.get("env"), dict) else {}
    for k in ENV_KEYS:
        if k not in env:
            probs.append(f"env misses {k!r}")
    ceil = doc.get("ceilings") if isinstance(doc.get("ceilings"), dict) else {}
    for k in ("copy_gbps", "matmul_tflops"):
        if not isinstance(ceil.get(k), _NUM):
            probs.append(f"ceilings.{k} is missing or not a number")
    for i, r in enumerate(doc.get("rows") or []):
        if not isinstance(r, dict):
            probs.append(f"rows[{i}] is not an object")
            continue
        kind = r.get("suite")
        keys = ROW_KEYS.get(kind)
        if keys is None:
            probs.append(f"rows[{i}].suite is {kind!r}")
            continue
        for k, t in keys.items():
            if k not in r:
                probs.append(f"rows[{i}] ({kind}) misses {k!r}")
            elif not isinstance(r[k], t) and not (t in (_NUM, _OPT_NUM) and r[k] in _NONFINITE):
                probs.append(f"rows[{i}].{k} has type {type(r[k]).__name__}")
        if kind in ("kernel", "encoder", "host", "train", "mlm", "embed") and r.get("error") is None:
            ms = {"kernel": r.get("ms"), "encoder": r.get("ms_p50"), "host": r.get("us"),
                  "train": r.get("ms_p50"), "mlm": r.get("ms_p50"), "embed": r.get("ms_p50")}[kind]
            if ms is None:
                probs.append(f"rows[{i}] has neither a time nor an error")
        if kind == "lsh" and r.get("error") is None and all(r.get(k) is None for k in ("ms_p50", "rel_err", "min_cos")):
            probs.append(f"rows[{i}] has neither a time, an error figure nor an error")
    return probs


def _clean(x):
    """JSON-safe: NaN / inf become strings so the file stays strict JSON."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(doc: dict, path: Path) -> Path:
    path.write_text(json.dumps(_clean(doc), indent=1, sort_keys=False, allow_nan=False) + "\n")
    return path


# ----------------------------------------------------------------------------- markdown


def _f(x, fmt="{:.3g}", none="-"):
    if x is None:
        return none
    if isinstance(x, str):
        return x
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return fmt.format(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return out


def _err_cell(r) -> str:
    if r.get("max_err") is None:
        return "-"
    s = _f(r["max_err"], "{:.2e}")
    if r.get("ok") is False:
        s += " **FAIL**"
    return s


def to_markdown(doc: dict) -> str:
    env, ceil = doc.get("env", {}), doc.get("ceilings", {})
    device = env.get("gpu") or f"CPU ({env.get('cpu') or 'unknown'})"
    lines = [f"# roberta_fast benchmarks: {device}", ""]
    if doc.get("mode") == "cpu-reduced":
        lines += ["**GPU figures need a GPU.** This is the reduced CPU run: torch-backend timings on small "
                  "shapes, Triton checked for correctness under the interpreter, FLOP and byte counts.", ""]
    lines += [
        f"- created {doc.get('created')} ({'quick' if doc.get('quick') else 'full'} run, "
        f"{_f(doc.get('elapsed_s'), '{:.0f}')} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in (doc.get("suite_seconds") or {}).items())
        + f"), git {env.get('git_sha')}",
        f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
        f"transformers {env.get('transformers')}, driver {env.get('driver')}, python {env.get('python')}",
        f"- backends: {_backends(env.get('backends'))}",
        f"- copy ceiling {_f(ceil.get('copy_gbps'), '{:.0f}')} GB/s (read + write of "
        f"{_f((ceil.get('copy_bytes') or 0) / 2**21, '{:.0f}')} MiB buffers); matmul ceiling "
        f"{_f(ceil.get('matmul_tflops'), '{:.1f}')} TFLOP/s ({ceil.get('matmul_dtype')} "
        f"{'x'.join(str(s) for s in ceil.get('matmul_shape') or [])}); datasheet dense bf16: "
        f"{_f(ceil.get('datasheet_tflops'), '{:.0f}')} TFLOP/s",
    ]
    notes = doc.get("notes") or []
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    rows = doc.get("rows", [])
    krows = [r for r in rows if r.get("suite") == "kernel"]
    if krows:
        lines += ["", "## Kernels", "",
                  "Time: median (p20-p80) ms. GB/s counts the fewest bytes (each input read once, each output "
                  "written once); % copy is against the copy ceiling above; attention TFLOP/s counts "
                  "4 * sum(len^2) * heads * head_dim forward (3.5x for fwd+bwd). max err: forward output "
                  "against float64, FAIL when above 2 x eager's error + floor."]
        for op in dict.fromkeys(r["op"] for r in krows):
            lines += ["", f"### {op}", ""]
            body = []
            for r in (r for r in krows if r["op"] == op):
                t = "-" if r.get("ms") is None else (
                    f"{_f(r['ms'], '{:.4g}')} ({_f(r['ms_p20'], '{:.4g}')}-{_f(r['ms_p80'], '{:.4g}')})")
                body.append([r["pass"], r["dtype"], r["label"], r["provider"], t,
                             _f(r.get("gbps"), "{:.3g}"), _f(r.get("pct_copy"), "{:.0f}%"),
                             _f(r.get("tflops"), "{:.3g}"), _f(r.get("speedup"), "{:.2f}x"),
                             _err_cell(r), r.get("error") or ""])
            lines += _table(["pass", "dtype", "shape", "provider", "ms", "GB/s", "% copy", "TFLOP/s",
                             "vs eager", "max err", "error"], body)
    erows = [r for r in rows if r.get("suite") == "encoder"]
    if erows:
        lines += ["", "## Encoder (inference)", "",
                  "tokens/s counts real tokens only; MFU = encoder FLOPs of the real lengths / p50 / matmul "
                  "ceiling (datasheet MFU beside it when the GPU is known); max err: last_hidden_state on real "
                  "tokens against transformers eager in float32 with the same weights.", ""]
        body = []
        for r in erows:
            g = {True: "yes", False: "no", None: "(own)"}[r.get("cuda_graph")]
            mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            if r.get("mfu_datasheet") is not None:
                mfu += f" / {100 * r['mfu_datasheet']:.1f}%"
            body.append([r["model"], r["dtype"], r["workload"], r["provider"], g,
                         _f(r.get("tokens_per_s"), "{:,.0f}"), _f(r.get("ms_p50"), "{:.3g}"),
                         _f(r.get("ms_p90"), "{:.3g}"), mfu, _f(r.get("peak_mem_mib"), "{:,.0f}"),
                         _f(r.get("max_err"), "{:.2e}"), _f(r.get("speedup"), "{:.2f}x"), r.get("error") or ""])
        lines += _table(["model", "dtype", "workload", "provider", "CUDA graph", "tokens/s", "p50 ms", "p90 ms",
                         "MFU (meas./sheet)", "peak MiB", "max err", "vs eager", "error"], body)
    trows = [r for r in rows if r.get("suite") == "train"]
    if trows:
        lines += _train_md(trows)
    mrows = [r for r in rows if r.get("suite") == "mlm"]
    if mrows:
        lines += _mlm_md(mrows)
    embrows = [r for r in rows if r.get("suite") == "embed"]
    if embrows:
        lines += _embed_md(embrows)
    lrows = [r for r in rows if r.get("suite") == "lsh"]
    if lrows:
        lines += _lsh_md(lrows)
    crows = [r for r in rows if r.get("suite") == "check"]
    if crows:
        lines += ["", "## Kernel correctness checks", "",
                  "Output and every input gradient against float64; ok when max err <= 2 x eager's error + floor "
                  "(the worst tensor is shown).", ""]
        body = [[r["op"], r["pass"], r["dtype"], r["label"], r["provider"], _f(r.get("max_err"), "{:.2e}"),
                 _f(r.get("err_bound"), "{:.2e}"), {True: "ok", False: "**FAIL**", None: "-"}[r.get("ok")],
                 r.get("worst") or "", r.get("error") or ""] for r in crows]
        lines += _table(["op", "pass", "dtype", "shape", "backend", "max err", "bound", "result", "worst",
                         "error"], body)
    la = doc.get("layers")
    if la:
        lines += _layers_md(la)
    hrows = [r for r in rows if r.get("suite") == "host"]
    if hrows:
        lines += _host_md(hrows)
    return "\n".join(lines) + "\n"


def _train_md(trows) -> list[str]:
    lines = ["", "## Training step (forward + backward + AdamW)", "",
             "Sequence classification, float32 master weights, autocast in the row's dtype (fp16 with GradScaler), "
             "dropout 0.1; tokens/s counts real tokens only; launches per layer: forward + backward, counted on the "
             "CPU (one per launching aten or custom op).", ""]
    body = [[r["model"], r["dtype"], r["workload"], r["provider"], _f(r.get("tokens_per_s"), "{:,.0f}"),
             _f(r.get("ms_p50"), "{:.3g}"), _f(r.get("ms_p90"), "{:.3g}"), _f(r.get("peak_mem_mib"), "{:,.0f}"),
             _f(r.get("launches_per_layer"), "{}"), _f(r.get("loss"), "{:.4f}"), _f(r.get("speedup"), "{:.2f}x"),
             _f(r.get("speedup_sdpa"), "{:.2f}x"), r.get("error") or ""] for r in trows]
    lines += _table(["model", "dtype", "workload", "provider", "tokens/s", "p50 ms", "p90 ms", "peak MiB",
                     "launches/layer", "loss", "vs eager", "vs SDPA", "error"], body)
    return lines


def _embed_md(rows) -> list[str]:
    lines = ["", "## Embedding a mixed-length corpus (benchmarks/bench_embed.py)", "",
             "Texts/s and real tokens/s (after truncation) of encode() with all-MiniLM-L6-v2, pooled and "
             "normalized: roberta_fast.Embedder (rf), sentence-transformers encode() (st), transformers SDPA with "
             "the same pooling (hf_sdpa); min cos: against st's embeddings.", ""]
    body = [[r["model"], r["dtype"], r["workload"], r["provider"], _f(r.get("sentences_per_s"), "{:,.1f}"),
             _f(r.get("tokens_per_s"), "{:,.0f}"), _f(r.get("ms_p50"), "{:,.0f}"), _f(r.get("speedup_st"), "{:.2f}x"),
             _f(r.get("speedup_sdpa"), "{:.2f}x"), _f(r.get("min_cos"), "{:.7f}"), r.get("error") or ""]
            for r in rows]
    lines += _table(["model", "dtype", "corpus", "provider", "texts/s", "tokens/s", "p50 ms", "vs st", "vs hf_sdpa",
                     "min cos", "error"], body)
    return lines


def _lsh_md(rows) -> list[str]:
    lines = ["", "## LSH attention against exact attention (benchmarks/bench_lsh.py)", ""]
    speed = [r for r in rows if r.get("workload", "").startswith("b1_")]
    if speed:
        cross = next((r.get("crossover_seqlen") for r in speed if r["provider"] == "lsh"), None)
        lines += ["Forward, batch 1, heads 12, head_dim 64, bucket 64, 2 hash rounds: ops.attention (exact) and "
                  "ops.lsh_attention. Memory: GPU peak (max_memory_allocated); CPU: bytes of every tensor made. "
                  f"**LSH is faster from {cross} tokens on**." if cross else
                  "Forward, batch 1, heads 12, head_dim 64, bucket 64, 2 hash rounds: ops.attention (exact) and "
                  "ops.lsh_attention. **LSH is not faster at any measured length here.**", ""]
        body = [[_f(r.get("seqlen"), "{:,}"), r["dtype"], r["provider"], _f(r.get("ms_p50"), "{:.3g}"),
                 _f(r.get("peak_mem_mib"), "{:,.1f}"), _f(r.get("alloc_mib"), "{:,.1f}"),
                 _f(r.get("speedup"), "{:.2f}x"), _f(r.get("mem_ratio"), "{:.2f}x"), r.get("error") or ""]
                for r in speed]
        lines += _table(["tokens", "dtype", "provider", "p50 ms", "peak MiB", "allocated MiB", "vs exact",
                         "memory vs exact", "error"], body)
    acc = [r for r in rows if not r.get("workload", "").startswith("b1_")]
    if acc:
        lines += ["", "Approximation error against exact attention (2 hash rounds): rel err = ||lsh - exact|| / "
                  "||exact|| (the whole model's last hidden state for minilm-embeddings); mass = the exact attention "
                  "probability on the keys LSH lets a query see (1 = nothing lost); cos: sentence embeddings of "
                  "all-MiniLM-L6-v2 with attention='lsh' in every layer against the exact model.", ""]
        body = [[r["workload"], _f(r.get("seqlen"), "{:,}"), _f(r.get("bucket_size"), "{}"),
                 _f(r.get("rel_err"), "{:.3f}"), _f(r.get("mass"), "{:.3f}"), _f(r.get("min_cos"), "{:.4f}"),
                 _f(r.get("mean_cos"), "{:.4f}"), r.get("error") or ""] for r in acc]
        lines += _table(["workload", "tokens", "bucket", "rel err", "mass", "min cos", "mean cos", "error"], body)
    return lines


def _mlm_md(mrows) -> list[str]:
    lines = ["", "## Masked-LM head + loss (forward + backward)", "",
             "transformers' RobertaLMHead on every token + F.cross_entropy against ours (head on the masked rows, "
             "ops.linear_cross_entropy: no logits tensor). Memory: GPU peak (max_memory_allocated); CPU: bytes of "
             "every tensor made, counted by a TorchDispatchMode (mem_method).", ""]
    body = [[r["workload"], r["dtype"], r["provider"], _f(r.get("masked"), "{:,}"), _f(r.get("ms_p50"), "{:.3g}"),
             _f(r.get("peak_mem_mib"), "{:,.1f}"), _f(r.get("alloc_mib"), "{:,.1f}"),
             _f(r.get("largest_mib"), "{:,.1f}"), _f(r.get("speedup"), "{:.2f}x"), _f(r.get("mem_ratio"), "{:.1f}x"),
             r.get("error") or ""] for r in mrows]
    lines += _table(["workload", "dtype", "provider", "masked", "p50 ms", "peak MiB", "allocated MiB",
                     "largest MiB", "vs hf", "memory vs hf", "error"], body)
    return lines


def _host_md(hrows) -> list[str]:
    lines = ["", "## Host overhead (the GPU path's host time)", "",
             "Microseconds of host time per call: best (median) of interleaved rounds. Ops: x one plain aten op "
             "(F.layer_norm on a tiny tensor), target <= 3x. Forward: x transformers eager, target <= 0.5x; Python "
             "calls and kernel launches per forward. Without a GPU: over a stub CUDA driver (docs/host_path.md).", ""]
    body = []
    for r in hrows:
        t = "-" if r.get("us") is None else f"{_f(r['us'], '{:,.1f}')} ({_f(r.get('us_median'), '{:,.1f}')})"
        ok = {True: "ok", False: "**over**", None: ""}[r.get("ok")]
        body.append([r["kind"], r["name"], r["provider"], r["label"], t, _f(r.get("ratio"), "{:.2f}x"),
                     _f(r.get("target"), "<= {:g}x", none=""), ok, _f(r.get("python_calls"), "{:,}"),
                     _f(r.get("launches"), "{}"), r.get("error") or ""])
    lines += _table(["kind", "name", "provider", "shape", "us", "ratio", "target", "", "Python calls", "launches",
                     "error"], body)
    return lines


def _backends(b) -> str:
    if not isinstance(b, dict):
        return "unknown"
    return ", ".join(f"{k} {'yes' if b.get(k) else 'no'}" for k in ("torch", "triton", "cuda"))


def _layers_md(la: dict) -> list[str]:
    lines = ["", "## One encoder layer: launches and bytes", ""]
    for a in la.get("analytic", []):
        lines += [f"Analytic, {a['model']} layer, batch {a['batch']} x seqlen {a['seqlen']}, "
                  f"{a['dtype_bytes']}-byte activations (roberta_fast.flops.layer_kernels):", ""]
        body = []
        for impl, v in a["impls"].items():
            s = v["summary"]
            body.append([impl, str(s["launches"]), str(s["gemm_launches"]), str(s["non_gemm_launches"]),
                         _f(s["non_gemm_bytes"] / 1e6, "{:,.1f}"), _f(s["total_bytes"] / 1e6, "{:,.1f}"),
                         _f(s["flops"] / 1e9, "{:,.1f}")])
        lines += _table(["impl", "launches", "GEMM", "non-GEMM", "non-GEMM MB", "total MB", "GFLOP"], body)
        lines += [""]
        for impl in ("hf_eager", "roberta_fast", "roberta_fast_epilogue"):
            ks = a["impls"].get(impl, {}).get("kernels", [])
            lines.append(f"- {impl}: " + "; ".join(
                f"{k['name']} ({k['bytes'] / 1e6:,.1f} MB)" for k in ks))
        lines.append("")
    m = la.get("measured")
    if m:
        lines += [f"Measured (aten ops per layer, 2-layer minus 1-layer model, batch {m.get('batch')} x seqlen "
                  f"{m.get('seqlen')}, views not counted):", ""]
        body = []
        for impl in ("hf_eager", "roberta_fast", "roberta_fast_split", "roberta_fast_epilogue"):
            if impl not in m:
                continue
            rec = m.get(impl) or {}
            if rec.get("error"):
                body.append([impl, str(rec.get("backend")), "-", "-", rec["error"]])
            else:
                ops = ", ".join(f"{k} x{v}" for k, v in (rec.get("ops") or {}).items())
                body.append([impl, str(rec.get("backend")), str(rec.get("launches")),
                             _f(rec.get("cuda_kernels"), "{}"), ops])
        lines += _table(["impl", "backend", "launches", "CUDA kernels", "ops / error"], body)
    return lines


# ----------------------------------------------------------------------------- plots


def make_plots(doc: dict, out_dir: Path) -> list[Path]:
    """speedup.png (kernels, over eager), ceiling.png (% of copy / matmul ceiling), encoder.png
    (tokens/s speedup over transformers eager). Returns the files written (none without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = doc.get("rows", [])
    title_dev = doc.get("env", {}).get("gpu") or "CPU (reduced run)"
    krows = [r for r in rows if r.get("suite") == "kernel" and r.get("ms")]
    if krows:
        p = _grouped_barh(plt, krows, lambda r: r.get("speedup"), "speedup over eager (x)",
                          f"Kernels: speedup over eager PyTorch, {title_dev}", ref_line=1.0,
                          skip=lambda r: r["provider"] == "eager")
        written.append(_save(plt, p, out_dir / FILES["speedup"]))

        def pct(r):
            return r.get("pct_copy") if r["op"] in ("layer_norm", "bias_gelu", "masked_softmax") \
                else r.get("pct_matmul")

        p = _grouped_barh(plt, krows, pct, "% of ceiling (copy GB/s for memory-bound ops, matmul TFLOP/s for "
                          "attention)", f"Kernels: % of the measured ceiling, {title_dev}", ref_line=100.0)
        written.append(_save(plt, p, out_dir / FILES["ceiling"]))
    erows = [r for r in rows if r.get("suite") == "encoder" and r.get("ms_p50")]
    if erows:
        fig_rows = []
        for r in erows:
            r2 = dict(r)
            r2["op"] = f"{r['model']} {r['dtype']}"
            r2["label"] = r["workload"]
            r2["pass"] = r2["dtype"] = ""
            g = r.get("cuda_graph")
            r2["provider"] = r["provider"] + ("+graph" if g else "")
            fig_rows.append(r2)
        p = _grouped_barh(plt, fig_rows, lambda r: r.get("speedup"), "tokens/s over transformers eager (x)",
                          f"Encoder inference, {title_dev}", ref_line=1.0)
        written.append(_save(plt, p, out_dir / FILES["encoder"]))
    return written


def _save(plt, fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _grouped_barh(plt, rows, value, xlabel, title, ref_line=None, skip=None):
    """One panel per op; one group of horizontal bars per (pass, dtype, shape); one bar per provider."""
    ops = list(dict.fromkeys(r["op"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows if not (skip and skip(r))))
    groups = {op: list(dict.fromkeys(_gkey(r) for r in rows if r["op"] == op)) for op in ops}
    heights = [max(1, len(groups[op])) * (0.18 * max(1, len(providers)) + 0.3) + 0.9 for op in ops]
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights}, constrained_layout=True)
    cmap = plt.get_cmap("tab10")
    bar_h = 0.8 / max(1, len(providers))
    for ax, op in zip(axes[:, 0], ops):
        keys = groups[op]
        for j, prov in enumerate(providers):
            ys, xs = [], []
            for i, k in enumerate(keys):
                r = next((r for r in rows if r["op"] == op and _gkey(r) == k and r["provider"] == prov), None)
                v = None if r is None else value(r)
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    ys.append(i + j * bar_h - 0.4 + bar_h / 2)
                    xs.append(v)
            if xs:
                ax.barh(ys, xs, height=bar_h, color=cmap(j % 10), label=prov)
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels(keys, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(op, fontsize=9, loc="left")
        if ref_line is not None:
            ax.axvline(ref_line, color="grey", lw=0.8, ls="--")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel(xlabel, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def _gkey(r) -> str:
    return " ".join(x for x in (r.get("pass", ""), r.get("dtype", ""), r.get("label", "")) if x)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m roberta_fast.benchmarks.report results.json [OUTDIR]", file=sys.stderr)
        return 2
    src = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else src.parent
    doc = json.loads(src.read_text())
    probs = validate(doc)
    for p in probs:
        print(f"schema: {p}", file=sys.stderr)
    (out / FILES["markdown"]).write_text(to_markdown(doc))
    make_plots(doc, out)
    return 1 if probs else 0


if __name__ == "__main__":
    sys.exit(main())
