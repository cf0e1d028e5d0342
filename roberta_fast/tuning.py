"""Throughput tuning on the user's GPU: the fastest backend per op, shape bucket, dtype and mode, chosen by
measurement and cached.

    roberta_fast.tuning.tune()          # time every backend of every op at RoBERTa shapes, cache the winners
    roberta-fast tune [--quick]         # the same from the command line (prints the table)

For each op, shape (roberta_fast.testing.shape_grid "tune"), dtype and mode ("fwd": inference; "train":
forward + backward) `tune` first verifies every backend that can run the call ("torch", "triton", and
"cuda" when roberta_fast._C is built) against the oracle with the test suite's rule
(roberta_fast.testing: max|ours - oracle| <= 2 * max|plain PyTorch in the same dtype - oracle| + floor,
gradients too in "train" mode), frees the oracle, then times the verified ones with
triton.testing.do_bench (median, L2 flushed between repeats). A backend that fails the check is rejected
and never wins, however fast it is.

linear (Y = act(X W^T + b) [+ residual]) has three candidates of its own: "torch" (cuBLAS + separate
elementwise), "triton" (the fused-epilogue GEMM) and "cublaslt" (cuBLASLt's bias+GELU epilogue, tanh GELU: it
takes the exact-erf cases only with ROBERTA_FAST_LINEAR_CUBLASLT_ERF=1, so without it the FFN1 cases mark it
"n/a"); its cases are built here (`linear_case`, FFN1 + bias + GELU and output projection + bias + residual at
RoBERTa shapes), verified and timed like every other op's. Until a tuning exists the op layer keeps "torch".

The Triton backend is tuned further: each kernel file lists, per shape class, a few candidate block
configurations (block sizes, warps, stages; `config_space` in kernels/<op>.py, today's default first, every
one compiled by the ahead-of-time check). For each kernel class of the op (the forward's, and in "train"
mode the backward's) the candidates are tried in turn with the best so far for the other classes, each
verified with the same rule before it is timed (forced through the kernel file's `forced_configs`); the
fastest verified combination is the triton backend's time and its config is recorded with the entry.

The measured order and the Triton configs go to the cache (roberta_fast.tuned: one file per GPU, driver,
versions and kernel build); the op layer uses the order for calls of that exact bucket and mode when no
backend is named, and the Triton kernels launch the bucket's configs whenever they run it.

Environment:
  ROBERTA_FAST_TUNING=0     no lookups (the built-in default order applies)
  ROBERTA_FAST_CACHE_DIR    where the cache files live
  ROBERTA_FAST_BACKEND      (the op layer) a named backend overrides any tuned choice
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from pathlib import Path

import torch

from . import backends as registry
from . import testing, tuned
from ._utils import dtype_name
from .testing import OPS, OpCase, build_case, shape_label
from .tuned import MODES, cache_dir, clear, load_entries, reset  # noqa: F401  (the CLI's cache commands)

TUNE_OPS = OPS + ("linear",)  # the tuner's ops: testing.OPS and linear, whose cases are built below
ALL_BACKENDS = registry.BACKENDS + tuple(b for bs in registry.OP_BACKENDS.values() for b in bs if
                                         b not in registry.BACKENDS)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "f16": "float16", "bf16": "bfloat16",
                 "fp32": "float32", "float": "float32", "f32": "float32"}


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = DTYPE_ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of float16 (fp16), bfloat16 (bf16), float32 (fp32)")
    return DTYPES[key]


def default_shapes(quick: bool = False, device="cuda", ops=OPS) -> list[tuple[str, dict]]:
    """(op, params) the tuner runs: testing.shape_grid "tune" ("tune-quick" with quick); on a CPU the
    tiny "check" shapes (a smoke run of the machinery under the Triton interpreter). linear's: linear_shapes."""
    kind = "check" if torch.device(device).type != "cuda" else ("tune-quick" if quick else "tune")
    out = testing.shape_grid(kind, tuple(o for o in ops if o != "linear"))
    return out + (linear_shapes(kind) if "linear" in ops else [])


# ----------------------------------------------------------------------------- linear's cases

_LINEAR_ACTS = {"gelu": "none", "gelu_tanh": "tanh"}


def linear_shapes(kind: str) -> list[tuple[str, dict]]:
    """linear at RoBERTa shapes: FFN1 (hidden -> 4 hidden, bias + exact GELU) and the output projections
    (4 hidden -> hidden and hidden -> hidden, bias + residual); "check": tiny odd sizes."""
    if kind == "check":
        return [("linear", {"tokens": 7, "in": 24, "out": 40, "activation": "gelu_tanh", "residual": False}),
                ("linear", {"tokens": 7, "in": 40, "out": 24, "activation": None, "residual": True})]
    tokens = {"tune": (4096, 8192, 16384, 32768), "tune-quick": (16384,)}[kind]
    hiddens = (768,) if kind == "tune-quick" else (768, 1024)
    out = []
    for t in tokens:
        for h in hiddens:
            out += [("linear", {"tokens": t, "in": h, "out": 4 * h, "activation": "gelu", "residual": False}),
                    ("linear", {"tokens": t, "in": 4 * h, "out": h, "activation": None, "residual": True}),
                    ("linear", {"tokens": t, "in": h, "out": h, "activation": None, "residual": True})]
    return out


def linear_case(p: dict, dtype: torch.dtype, device, seed: int = 0) -> OpCase:
    """ops.linear at {"tokens", "in", "out", "activation", "residual"}: x (tokens, in), weight (out, in) scaled
    by in^-1/2, bias, residual (tokens, out) when asked. FLOPs 2 M N K (x3 with the backward)."""
    from . import ops

    device = torch.device(device)
    dgen = torch.Generator(device=device).manual_seed(seed)
    t, k, n, act, res = p["tokens"], p["in"], p["out"], p.get("activation"), p.get("residual", False)
    e = torch.finfo(dtype).bits // 8

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=dgen, device=device) * std).to(dtype)

    inputs = {"x": rnd(t, k), "weight": rnd(n, k, std=k ** -0.5), "bias": rnd(n, std=0.1)}
    if res:
        inputs["residual"] = rnd(t, n)

    def math(i):  # plain PyTorch in the inputs' dtype (the yardstick), in higher precision the oracle
        y = torch.nn.functional.linear(i["x"], i["weight"], i["bias"])
        if act is not None:
            y = torch.nn.functional.gelu(y, approximate=_LINEAR_ACTS[act])
        return y + i["residual"] if res else y

    fl = 2 * t * n * k
    by = e * (t * k + n * k + n + t * n * (2 if res else 1))
    return OpCase(
        "linear", dict(p), dtype, inputs, tuple(inputs),
        run=lambda b, i: ops.linear(i["x"], i["weight"], i["bias"], activation=act, residual=i.get("residual"),
                                    backend=b),
        eager=math, oracle=math, key=(t, n, k, dtype_name(dtype)), out_shape=(t, n),
        bytes_fwd=by, bytes_bwd=3 * by, flops_fwd=fl, flops_bwd=3 * fl)


def build_tune_case(op, params, dtype, device, seed: int = 0) -> OpCase:
    return linear_case(params, dtype, device, seed) if op == "linear" else build_case(op, params, dtype, device, seed)


def label(op: str, p: dict) -> str:
    if op == "linear":
        return (f"T={p['tokens']} {p['in']}->{p['out']}" + (f" {p['activation']}" if p.get("activation") else "")
                + (" +res" if p.get("residual") else ""))
    return shape_label(op, p)


# ----------------------------------------------------------------------------- timing


def cuda_timer(rep_ms: float = 100.0, warmup_ms: float = 25.0):
    """Median ms of fn by triton.testing.do_bench (testing.time_gpu_kernel)."""
    def timer(fn, **_info):
        return testing.time_gpu_kernel(fn, rep_ms=rep_ms, warmup_ms=warmup_ms, qs=(0.5,))[0]
    return timer


def host_timer(rep_ms: float = 20.0):
    """Median ms of fn by perf_counter (testing.time_cpu; CPU smoke runs, not a tuning)."""
    def timer(fn, **_info):
        return testing.time_cpu(fn, rep_ms=rep_ms, min_reps=3, max_reps=50, qs=(0.5,))[0]
    return timer


def _timed_fn(case: OpCase, backend: str, mode: str, dy):
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return case.run(backend, case.inputs)
        return fn
    inputs = {k: (v.detach().requires_grad_(True) if k in case.leaves else v) for k, v in case.inputs.items()}
    leaves = [inputs[k] for k in case.leaves]

    def fn():
        with torch.enable_grad():
            out = case.run(backend, inputs)
            return torch.autograd.grad(out, leaves, dy, allow_unused=True)
    return fn


# ----------------------------------------------------------------------------- tune


def _short(e: BaseException, limit: int = 200) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (oom and isinstance(e, oom)) or "out of memory" in str(e).lower()


@dataclasses.dataclass
class TuneResult:
    entries: list
    path: Path | None
    identity: dict
    device: str
    smoke: bool
    unavailable: dict = dataclasses.field(default_factory=dict)  # backend -> why it cannot run here

    def format_table(self) -> str:
        text = format_table(self.entries, smoke=self.smoke)
        for b, why in self.unavailable.items():
            text += f"\n{b}: not run here ({why})"
        return text


def tune(ops=None, shapes=None, dtypes=(torch.float16, torch.bfloat16), device="cuda", *, modes=("fwd",),
         quick: bool = False, rep_ms: float | None = None, warmup_ms: float | None = None, save: bool = True,
         timer=None, backends=None, verify: bool = True, log=None, seed: int = 0,
         configs: bool = True) -> TuneResult:
    """Time every backend of every op at every shape, dtype and mode; record the fastest verified one.

    ops      op names (default: all of OPS)
    shapes   [(op, params)] as default_shapes() makes them (default: RoBERTa shapes; quick: fewer)
    dtypes   torch dtypes or names ("float16", "bf16", ...)
    device   "cuda" (a tuning) or "cpu" (a smoke run of the machinery, Triton under TRITON_INTERPRET=1)
    modes    "fwd" (inference: forward under no_grad) and/or "train" (forward + backward)
    rep_ms   time per measurement (do_bench's rep); default 100 ms, 40 ms with quick
    save     merge the results into the cache file of this GPU (CUDA devices only; a CPU run with
             save=True writes the CPU's own file, which lookups never read)
    timer    callable(fn, *, op, backend, dtype, mode, params, configs) -> ms; default do_bench on CUDA, a
             perf_counter median on CPU (tests inject fake timers); configs: the Triton configs of a trial
             ({kernel class: [ints]}) or None for a plain backend timing
    backends restrict the candidates (default: every backend that can run on `device`)
    verify   check each backend (and each Triton config) against the oracle before it may win (off only
             for experiments)
    configs  also pick the Triton block configs per bucket among the kernel files' candidates (default);
             False: the triton backend is timed with its default configs and none are recorded
    log      callable(str) for one progress line per case (default: silent)
    returns  TuneResult(entries, path written or None, identity, device, smoke)
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("tune: no CUDA GPU is available (device='cuda')")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ops = tuple(ops) if ops is not None else TUNE_OPS
    for op in ops:
        if op not in TUNE_OPS:
            raise ValueError(f"tune: unknown op {op!r}; expected some of {TUNE_OPS}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"tune: unknown mode {m!r}; expected some of {MODES}")
    dtypes = tuple(parse_dtype(d) for d in dtypes)
    shapes = default_shapes(quick, device, ops) if shapes is None else [(o, p) for o, p in shapes if o in ops]
    smoke = device.type != "cuda"
    if timer is None:
        if device.type == "cuda":
            timer = cuda_timer(rep_ms or (40.0 if quick else 100.0), warmup_ms or (10.0 if quick else 25.0))
        else:
            timer = host_timer(rep_ms or 20.0)
    unavailable = {b: registry.why_unavailable(b, device) for b in (backends or registry.BACKENDS)
                   if not registry.can_run(b, device)}
    if device.type == "cpu" and "cuda" not in unavailable and (backends is None or "cuda" in backends):
        # CPU tensors reach the CUDA backend only through its emulation, a test harness: nothing to time
        unavailable["cuda"] = "the CUDA backend runs CPU tensors only through its emulation (tests, not timing)"
    cands = [b for b in (backends or registry.BACKENDS) if b not in unavailable]
    if "torch" not in cands:
        cands.insert(0, "torch")  # the reference the speedups are measured against

    entries = []
    total = len(shapes) * len(dtypes) * len(modes)
    n = 0
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        for op, params in shapes:
            for dtype in dtypes:
                for mode in modes:
                    n += 1
                    extra = [b for b in registry.OP_BACKENDS.get(op, ()) if backends is None or b in backends]
                    e = _tune_one(op, params, dtype, mode, device, cands + extra, timer, verify, seed, configs)
                    if e is not None:
                        entries.append(e)
                        if log:
                            log(f"[{n}/{total}] {_entry_line(e)}")
    path = None
    ident = tuned.identity(device)
    keep = [e for e in entries if e["order"]]
    if save and keep:
        path = tuned.save_entries(keep, ident)
    return TuneResult(entries, path, ident, str(device), smoke, unavailable)


def _tune_one(op, params, dtype, mode, device, cands, timer, verify, seed, configs=True):
    """Verify every candidate backend, search the Triton configs (each trial verified, then timed; the oracle
    is kept until the search ends), free the oracle, then time the other verified backends."""
    status, times = {}, {}

    def failed(e, what):
        if _is_oom(e) and device.type == "cuda":
            torch.cuda.empty_cache()
            return f"error: {what}out of memory"
        return f"error: {what}{_short(e)}"

    try:
        case = build_tune_case(op, params, dtype, device, seed)
    except Exception as e:  # noqa: BLE001
        return _entry(op, params, dtype, mode, None, {}, {"all": failed(e, "cannot build the inputs: ")})
    dy = None
    if mode == "train":
        dy = torch.randn(case.out_shape, generator=torch.Generator(device=device).manual_seed(seed + 1),
                         device=device).to(dtype)
    eligible = []
    try:
        verifier = testing.Verifier(case, mode == "train", dy) if verify else None
    except Exception as e:  # noqa: BLE001
        return _entry(op, params, dtype, mode, case, {}, {"all": failed(e, "cannot compute the reference: ")})
    for b in cands:
        try:
            why = verifier.judge(b) if verifier is not None else None
        except (ValueError, TypeError, registry.BackendUnavailableError) as e:
            status[b] = f"n/a: {_short(e)}"  # the backend does not take this call (dtype, head_dim, ...)
            continue
        except Exception as e:  # noqa: BLE001  (a crashing backend never wins; the others go on)
            status[b] = failed(e, "")
            continue
        if why is not None:
            status[b] = f"rejected: {why}"
        else:
            eligible.append(b)
    searched = None
    if configs and "triton" in eligible:
        searched = _search_configs(case, op, dtype, mode, dict(params), device, dy, verifier, timer, failed)
        if searched is not None and searched["ms"] is not None:
            times["triton"], status["triton"] = searched["ms"], "ok"
    del verifier
    for b in eligible:
        if b in times:
            continue
        try:
            ms = float(timer(_timed_fn(case, b, mode, dy), op=op, backend=b, dtype=dtype_name(dtype), mode=mode,
                             params=dict(params), configs=None))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except (ValueError, TypeError, registry.BackendUnavailableError) as e:
            status[b] = f"n/a: {_short(e)}"
            continue
        except Exception as e:  # noqa: BLE001
            status[b] = failed(e, "")
            continue
        if math.isfinite(ms) and ms > 0:
            times[b], status[b] = ms, "ok"
        else:
            status[b] = f"error: the timer returned {ms!r}"
    e = _entry(op, params, dtype, mode, case, times, status, searched)
    del case, dy
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return e


def _config_json(cfgs: dict) -> dict:
    return {cls: [int(v) for v in cfg] for cls, cfg in cfgs.items()}


def _search_configs(case, op, dtype, mode, params, device, dy, verifier, timer, failed):
    """The Triton block configs of one case: {"configs": {class: config} or None, "ms": the best verified
    trial's time or None, "trials": [{"configs", "ms", "status"}]}, or None when the op's kernel file has no
    candidates for this bucket.

    Trial 0 is the bucket's defaults. Then, class by class (the forward's first, then the backward's in
    "train" mode), every other candidate of that class replaces the best so far; a trial is verified with
    the rule (like a backend) before it is timed, and it becomes the best only when strictly faster. So
    every combination that can win was itself verified, and 1 + sum(candidates - 1) trials are timed instead
    of every combination."""
    mod = registry.implementation("triton", op)
    fixed, tok = tuned.bucket(op, case.key)
    # a file whose candidates depend on the bucket's tokens or the GPU (kernels/linear.py: pruned by the problem
    # size and the shared memory of this device) names them in CONFIG_SPACE_CONTEXT
    context = {"tokens_log2": tok, "capability": registry.capability(device)}
    extra = {k: context[k] for k in getattr(mod, "CONFIG_SPACE_CONTEXT", ())}
    space = mod.config_space(op, tuple(fixed), mode == "train", **extra) if hasattr(mod, "config_space") else None
    if not space:
        return None
    trials = []

    def trial(cfgs):
        rec = {"configs": _config_json(cfgs), "ms": None, "status": None}
        trials.append(rec)
        with mod.forced_configs(cfgs):
            try:
                why = verifier.judge("triton") if verifier is not None else None
            except Exception as e:  # noqa: BLE001  (a crashing config never wins; the others go on)
                rec["status"] = failed(e, "")
                return None
            if why is not None:
                rec["status"] = f"rejected: {why}"
                return None
            try:
                ms = float(timer(_timed_fn(case, "triton", mode, dy), op=op, backend="triton",
                                 dtype=dtype_name(dtype), mode=mode, params=params, configs=rec["configs"]))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as e:  # noqa: BLE001
                rec["status"] = failed(e, "")
                return None
        if not (math.isfinite(ms) and ms > 0):
            rec["status"] = f"error: the timer returned {ms!r}"
            return None
        rec["ms"], rec["status"] = ms, "ok"
        return ms

    best = {cls: cands[0] for cls, cands in space.items()}
    best_ms = trial(best)
    for cls, cands in space.items():
        for cand in cands[1:]:
            cfgs = {**best, cls: cand}
            ms = trial(cfgs)
            if ms is not None and (best_ms is None or ms < best_ms):
                best, best_ms = cfgs, ms
    return {"configs": best if best_ms is not None else None, "ms": best_ms, "trials": trials}


def _entry(op, params, dtype, mode, case, times, status, searched=None) -> dict:
    key = case.key if case is not None else None
    fixed, tok = tuned.bucket(op, key) if key is not None else (None, None)
    order = sorted(times, key=lambda b: (times[b], ALL_BACKENDS.index(b)))
    t_torch = times.get("torch")
    return {
        "op": op, "mode": mode, "dtype": dtype_name(dtype), "shape": dict(params),
        "key": list(key) if key is not None else None,
        "bucket": {"fixed": list(fixed) if fixed is not None else [], "tokens_log2": tok if tok is not None else -1},
        "times_ms": {b: round(t, 6) for b, t in times.items()},
        "status": status,
        "order": order,
        "winner": order[0] if order else None,
        "speedup_vs_torch": (round(t_torch / times[order[0]], 4) if order and t_torch else None),
        # the triton backend's block configs per kernel class (measured here), used whenever it runs the bucket
        "triton_configs": (_config_json(searched["configs"]) if searched is not None and searched["configs"]
                           and "triton" in times else None),
        "config_trials": [dict(t, ms=round(t["ms"], 6) if t["ms"] is not None else None)
                          for t in (searched["trials"] if searched is not None else ())],
    }


def config_label(e) -> str:
    """The triton configs of an entry for the table: "default", or the classes whose config differs from
    the defaults (trial 0), e.g. "fwd=128,64,8,3"; "-" when none were measured."""
    cfgs = e.get("triton_configs")
    if not cfgs:
        return "-"
    trials = e.get("config_trials") or []
    default = trials[0]["configs"] if trials else {}
    changed = [f"{c}={','.join(map(str, v))}" for c, v in cfgs.items() if default.get(c) != v]
    return " ".join(changed) if changed else "default"


# ----------------------------------------------------------------------------- report


def _entry_line(e) -> str:
    ts = " ".join(f"{b} {e['times_ms'][b]:.4g}ms" if b in e["times_ms"] else f"{b} {e['status'][b].split(':')[0]}"
                  for b in e["status"])
    cfg = config_label(e)
    return (f"{e['op']} {e['mode']} {e['dtype']} {label(e['op'], e['shape'])}: {ts} -> "
            f"{e['winner'] or 'none'}" + (f" (triton config: {cfg}, {len(e['config_trials'])} tried)"
                                          if cfg != "-" else ""))


def _bucket_label(e) -> str:
    fixed, tok = e["bucket"]["fixed"], e["bucket"]["tokens_log2"]
    if e["op"] in ("layer_norm", "bias_gelu"):
        return f"rows~2^{tok} N={fixed[0]}"
    if e["op"] == "masked_softmax":
        return f"rows~2^{tok} K<={fixed[0]} mask={fixed[2]}"
    if e["op"] == "attention":
        return f"tok~2^{tok} S<={fixed[0]} H={fixed[1]} D={fixed[2]}" + (" mask" if fixed[4] else "")
    if e["op"] == "linear":
        return f"rows~2^{tok} N={fixed[0]} K={fixed[1]}"
    return f"tok~2^{tok} S<={fixed[0]} H={fixed[1]} D={fixed[2]}"


def format_table(entries, smoke: bool = False) -> str:
    """A plain-text table: op, mode, dtype, measured shape, bucket, ms per backend, winner, speedup over
    the torch backend; rejected / failed backends are explained below the table."""
    shown = [b for b in ALL_BACKENDS if b in registry.BACKENDS or any(b in e["status"] for e in entries)]
    cols = ["op", "mode", "dtype", "shape", "bucket"] + shown + ["winner", "x torch",
                                                                                   "triton config"]
    rows, notes = [], []
    for e in entries:
        cells = [e["op"], e["mode"], e["dtype"], label(e["op"], e["shape"]), _bucket_label(e)]
        for b in shown:
            st = e["status"].get(b)
            if b in e["times_ms"]:
                cells.append(f"{e['times_ms'][b]:.4f}")
            elif st is None:
                cells.append("-")
            else:
                tag = st.split(":")[0]
                notes.append(f"{e['op']} {e['mode']} {e['dtype']} {label(e['op'], e['shape'])} {b}: {st}")
                cells.append(tag)
        if "all" in e["status"]:
            notes.append(f"{e['op']} {e['mode']} {e['dtype']} {label(e['op'], e['shape'])}: {e['status']['all']}")
        cells.append(e["winner"] or "none")
        sp = e.get("speedup_vs_torch")
        cells.append(f"{sp:.2f}x" if sp else "-")
        cells.append(config_label(e))
        for t in e.get("config_trials") or ():
            if t["status"] != "ok":
                cfg = " ".join(f"{c}={','.join(map(str, v))}" for c, v in t["configs"].items())
                notes.append(f"{e['op']} {e['mode']} {e['dtype']} {label(e['op'], e['shape'])} triton [{cfg}]: "
                             f"{t['status']}")
        rows.append(cells)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    lines = []
    if smoke:
        lines.append("SMOKE RUN on CPU (Triton interpreter): these timings are NOT a tuning and are never "
                     "used for dispatch")
    lines += [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines.append("times: median ms per call (do_bench on CUDA)" + ("; perf_counter here" if smoke else "")
                 + "; x torch = the torch backend's time / the winner's; triton: its best verified config "
                   "(triton config: the kernel classes where it is not the default)")
    if notes:
        lines.append("not eligible:")
        lines += [f"  {n}" for n in notes]
    return "\n".join(lines)


def log_stderr(msg: str):
    print(msg, file=sys.stderr, flush=True)
