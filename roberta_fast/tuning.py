"""Throughput tuning on the user's GPU: the fastest backend per op and shape, chosen by measurement and
cached.

    roberta_fast.tuning.tune()          # time every backend of every op at RoBERTa shapes, cache the winners
    roberta-fast tune [--quick]         # the same from the command line (prints the table)

For each op, shape, dtype and mode ("fwd": inference; "train": forward + backward) `tune` times every
backend that can run the call ("torch", "triton", and "cuda" when roberta_fast._C is built) with
triton.testing.do_bench (median, L2 flushed between repeats), after checking each backend's output
(and, in "train" mode, its gradients) against an oracle: the torch backend's code (roberta_fast.reference)
run in float32 (float64 for float32 inputs). The rule is the test suite's: max|ours - oracle| <=
2 * max|plain PyTorch in the same dtype - oracle| + floor, the floor being the dtype's floor plus one
unit in the last place of the largest oracle value. A backend that fails the check is rejected and
never wins, however fast it is.

The winners go to one JSON file per (GPU name, compute capability, driver, torch + its CUDA, triton,
roberta_fast version, whether roberta_fast._C is built, a fingerprint of the kernel sources), in
$ROBERTA_FAST_CACHE_DIR, else $XDG_CACHE_HOME/roberta_fast, else ~/.cache/roberta_fast. A change of
any of those starts a new file, so stale choices are never reused. Writes are atomic (temporary file
+ rename); a corrupt or foreign file is ignored with a one-line warning.

At run time the op layer asks `lookup_backend(op, key, device)` (through
roberta_fast.ops._dispatch.resolve_backend) for CUDA tensors when no backend was named: an in-memory
dict after the first call, no file IO and no device sync per call, plain Python that torch.compile
traces. Keys are bucketed so that a tuned shape covers its neighbours: token / row counts to the
nearest power of two (a missing bucket borrows the tuned one a factor of two away), sequence lengths
(softmax K, attention S, max_seqlen) up to the next power of two (the kernels pick their blocks by
that class), widths, heads, head_dim, dtype and mask kind exactly (a bucket tuned with another mask
kind is borrowed when nothing closer was tuned). With grad mode on, "train" entries are preferred over
"fwd" ones where both exist. Only a backend that can still run here is returned.

Environment:
  ROBERTA_FAST_TUNING=0     no lookups (the built-in default order applies)
  ROBERTA_FAST_CACHE_DIR    where the cache files live
  ROBERTA_FAST_BACKEND      (the op layer) a named backend overrides any tuned choice
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime as _dt
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import reference
from .ops import _dispatch

SCHEMA = "roberta_fast.tuning/1"
OPS = ("layer_norm", "bias_gelu", "masked_softmax", "attention", "attention_varlen")
MODES = ("fwd", "train")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "f16": "float16", "bf16": "bfloat16",
                 "fp32": "float32", "float": "float32", "f32": "float32"}
EPS = 1e-5
HEAD_DIM = 64
# absolute floor of the verification rule per dtype (as in tests/_tol.py)
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}
_OFF = ("0", "false", "no", "off")
_FILE_GLOB = "tuning_*.json"


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = DTYPE_ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of float16 (fp16), bfloat16 (bf16), float32 (fp32)")
    return DTYPES[key]


# ----------------------------------------------------------------------------- buckets (hot path)


def _round_log2(n) -> int:
    """The exponent of the power of two nearest to n on a log scale (n >= 2**(k - 0.5) rounds up).
    Comparisons only, so a symbolic size under torch.compile adds guards instead of specializing."""
    if isinstance(n, int):
        if n <= 1:
            return 0
        k = n.bit_length() - 1
        return k + 1 if n * n >= 1 << (2 * k + 1) else k
    k = 0
    while n * n >= 1 << (2 * k + 1):
        k += 1
    return k


def _ceil_pow2(n) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def bucket(op: str, key: tuple):
    """(fixed, tokens_log2) for an op's tune_key (the tuple the op passes to resolve_backend), or None
    for an op this module does not tune. `fixed` must match exactly; tokens_log2 may borrow a neighbour.

    layer_norm, bias_gelu  key (M, N, dtype)                         -> fixed (N, dtype)
    masked_softmax         key (rows, K, dtype, mask_kind)           -> fixed (ceil_pow2(K), dtype, mask_kind)
    attention              key (B, S, H, D, dtype, has_mask)         -> fixed (ceil_pow2(S), H, D, dtype, has_mask)
    attention_varlen       key (T, max_seqlen, H, D, dtype)          -> fixed (ceil_pow2(max_seqlen), H, D, dtype)
    tokens_log2 is the rounded log2 of M, rows, B * S or T.
    """
    if op == "layer_norm" or op == "bias_gelu":
        return (key[1], key[2]), _round_log2(key[0])
    if op == "masked_softmax":
        return (_ceil_pow2(key[1]), key[2], key[3]), _round_log2(key[0])
    if op == "attention":
        return (_ceil_pow2(key[1]), key[2], key[3], key[4], bool(key[5])), _round_log2(key[0] * key[1])
    if op == "attention_varlen":
        return (_ceil_pow2(key[1]), key[2], key[3], key[4]), _round_log2(key[0])
    return None


def _can_run(backend: str, device) -> bool:
    return _dispatch._why_unavailable(backend, device) is None


# in-memory tables: device index -> {(op, mode, *fixed): {tokens_log2: (backend, ...) fastest first}}
_STATE = {"tables": {}, "identity": {}, "warned": set()}


def lookup_backend(op: str, key: tuple, device) -> str | None:
    """The tuned backend for this op and shape bucket on `device` (a CUDA device), or None.

    Called by the op layer on every automatic dispatch for CUDA tensors: reads the cache file once per
    device, then works on an in-memory dict. Returns the fastest verified backend of the bucket that
    can still run here (e.g. "cuda" only while roberta_fast._C is built); None when tuning is off
    (ROBERTA_FAST_TUNING=0), nothing was tuned for the bucket or its neighbours, or nothing tuned can run.
    """
    if os.environ.get("ROBERTA_FAST_TUNING", "1").strip().lower() in _OFF:
        return None
    index = device.index
    if not _ensure_table(index):  # loads the file on the first call; before any read of the tables
        return None
    table = _STATE["tables"][index]
    b = bucket(op, key)
    if b is None:
        return None
    fixed, tok = b
    modes = ("train", "fwd") if torch.is_grad_enabled() else ("fwd",)
    for mode in modes:
        for fx in _variants(op, fixed):
            group = table.get((op, mode) + fx)
            if group is None:
                continue
            for t in (tok, tok + 1, tok - 1):
                order = group.get(t)
                if order is None:
                    continue
                for backend in order:
                    if _can_run(backend, device):
                        return backend
                break
    return None


def _variants(op: str, fixed: tuple) -> tuple:
    """`fixed` first, then the same bucket with another mask kind (attention: with / without a key
    padding mask; masked_softmax: bool / none / additive): the mask changes the bytes a little, not
    which backend is fastest, so a bucket tuned with one covers calls with another when nothing closer
    was tuned."""
    if op == "attention":
        return (fixed, fixed[:-1] + (not fixed[-1],))
    if op == "masked_softmax":
        return (fixed,) + tuple(fixed[:-1] + (k,) for k in ("bool", "none", "additive") if k != fixed[-1])
    return (fixed,)


def _assume_constant(fn):
    deco = getattr(getattr(torch, "compiler", None), "assume_constant_result", None)
    return deco(fn) if deco is not None else fn


@_assume_constant
def _ensure_table(index) -> int:
    """Read the cache file of CUDA device `index` into _STATE["tables"][index] on the first call (the
    only file IO of a lookup); returns the number of buckets. A constant to torch.compile: a traced
    lookup runs it for real once and reads the table only after it, so the guards torch.compile puts
    on the table see it loaded. (Code compiled while nothing was cached keeps that answer until it
    recompiles, e.g. after torch._dynamo.reset().)"""
    tables = _STATE["tables"]
    if index not in tables:
        try:
            ident = _identity_for_index(index)
            tables[index] = _build_table(_read_entries(cache_path(ident), ident))
        except Exception as e:  # noqa: BLE001  (a lookup never raises)
            _warn_once(f"roberta_fast.tuning: no tuned choices ({type(e).__name__}: {e})")
            tables[index] = {}
    return len(tables[index])


def _identity_for_index(index):
    dev = torch.device("cuda", torch.cuda.current_device() if index is None else index)
    return identity(dev)


def _build_table(entries) -> dict:
    table: dict = {}
    for e in entries:
        order = tuple(e.get("order") or ())
        if not order:
            continue
        group = table.setdefault((e["op"], e["mode"]) + tuple(e["bucket"]["fixed"]), {})
        group[int(e["bucket"]["tokens_log2"])] = order
    return table


def reset():
    """Forget the in-memory tables (the next lookup re-reads the cache files)."""
    _STATE["tables"].clear()
    _STATE["identity"].clear()


def _warn_once(msg: str):
    if msg not in _STATE["warned"]:
        _STATE["warned"].add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- identity and files


def cache_dir() -> Path:
    env = os.environ.get("ROBERTA_FAST_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "roberta_fast"


def _driver_version() -> str | None:
    """The CUDA driver version from libcuda (e.g. "12.4"), without a subprocess; None if unknown."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value:
            return f"{v.value // 1000}.{(v.value % 1000) // 10}"
    except (OSError, AttributeError):
        pass
    return None


def _code_fingerprint() -> str:
    """A short hash of the kernel sources (Triton kernels, CUDA wrappers) and of the compiled module's
    size and mtime: a rebuilt or edited kernel invalidates the choices made with the old one."""
    h = hashlib.sha1()
    for pkg in ("roberta_fast.kernels", "roberta_fast.cuda_ops"):
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        for loc in (spec.submodule_search_locations or []) if spec else []:
            for f in sorted(Path(loc).glob("*.py")):
                h.update(f.name.encode())
                h.update(f.read_bytes())
    try:
        spec = importlib.util.find_spec("roberta_fast._C")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        st = os.stat(spec.origin)
        h.update(f"_C:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def identity(device) -> dict:
    """What a cache file is valid for: GPU, compute capability, driver, library versions, whether the
    CUDA extension is built, and the kernel sources' fingerprint (memoized per device)."""
    device = torch.device(device)
    memo_key = (device.type, device.index)
    got = _STATE["identity"].get(memo_key)
    if got is not None:
        return got
    import triton

    import roberta_fast

    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        gpu, cc, driver = p.name, f"{p.major}.{p.minor}", _driver_version()
    else:
        gpu, cc, driver = device.type, None, None
    ident = {
        "schema": SCHEMA,
        "gpu": gpu,
        "capability": cc,
        "driver": driver,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": getattr(triton, "__version__", "unknown"),
        "roberta_fast": roberta_fast.__version__,
        "cuda_ext": _dispatch.cuda_built(),
        "code": _code_fingerprint(),
        "triton_interpret": device.type == "cpu" and _dispatch.interpret_mode(),
    }
    _STATE["identity"][memo_key] = ident
    return ident


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s).strip()).strip("-._") or "unknown"


def cache_path(ident: dict) -> Path:
    """<cache_dir>/tuning_<gpu>_sm<cc>_<hash of the whole identity>.json"""
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    cc = "sm" + ident["capability"].replace(".", "") if ident.get("capability") else "nocc"
    return cache_dir() / f"tuning_{_slug(ident.get('gpu'))}_{cc}_{digest}.json"


def _valid_entry(e) -> bool:
    try:
        return (e["op"] in OPS and e["mode"] in MODES and isinstance(e["bucket"]["fixed"], list)
                and isinstance(e["bucket"]["tokens_log2"], int)
                and all(b in _dispatch.BACKENDS for b in e["order"]))
    except (KeyError, TypeError):
        return False


def _read_doc(path: Path, ident: dict | None):
    """The parsed file, or None when it is missing; a corrupt, foreign-schema or foreign-identity file
    gives None and one warning line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        _warn_once(f"roberta_fast.tuning: ignoring {path} (cannot read it: {e})")
        return None
    try:
        doc = json.loads(text)
    except ValueError as e:
        _warn_once(f"roberta_fast.tuning: ignoring corrupt cache file {path} ({e})")
        return None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        _warn_once(f"roberta_fast.tuning: ignoring {path} (schema {got!r}, expected {SCHEMA!r})")
        return None
    if ident is not None and doc.get("identity") != ident:
        _warn_once(f"roberta_fast.tuning: ignoring {path} (written for another GPU or library version)")
        return None
    entries = doc.get("entries")
    if not isinstance(entries, list) or not all(_valid_entry(e) for e in entries):
        _warn_once(f"roberta_fast.tuning: ignoring {path} (malformed entries)")
        return None
    return doc


def _read_entries(path: Path, ident: dict) -> list:
    doc = _read_doc(path, ident)
    return doc["entries"] if doc is not None else []


def _entry_id(e) -> tuple:
    return (e["op"], e["mode"], tuple(e["bucket"]["fixed"]), e["bucket"]["tokens_log2"])


def _write_atomic(path: Path, doc: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_entries(entries: list, ident: dict) -> Path:
    """Merge `entries` into the cache file of `ident` (a new entry replaces the one of its bucket) and
    write it atomically; the in-memory tables are dropped so the next lookup sees the new file."""
    path = cache_path(ident)
    old = _read_doc(path, ident)
    merged = {_entry_id(e): e for e in (old["entries"] if old else [])}
    for e in entries:
        merged[_entry_id(e)] = e
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    doc = {"schema": SCHEMA, "identity": ident, "created": (old or {}).get("created", now), "updated": now,
           "entries": sorted(merged.values(), key=lambda e: (OPS.index(e["op"]), e["mode"], e["dtype"],
                                                              json.dumps(e["bucket"]["fixed"]),
                                                              e["bucket"]["tokens_log2"]))}
    _write_atomic(path, doc)
    _STATE["tables"].clear()
    return path


def load_entries(device="cuda") -> tuple[Path, list]:
    """(the cache file for `device`, its entries) - empty when nothing valid is cached."""
    ident = identity(device)
    path = cache_path(ident)
    return path, _read_entries(path, ident)


def clear() -> list[Path]:
    """Delete every tuning file in the cache directory and forget the in-memory tables."""
    removed = []
    d = cache_dir()
    if d.is_dir():
        for f in sorted(d.glob(_FILE_GLOB)):
            try:
                f.unlink()
                removed.append(f)
            except OSError as e:
                warnings.warn(f"roberta_fast.tuning: could not remove {f}: {e}", RuntimeWarning, stacklevel=2)
    reset()
    return removed


# ----------------------------------------------------------------------------- shapes and cases


def default_shapes(quick: bool = False, device="cuda", ops=OPS) -> list[tuple[str, dict]]:
    """(op, params) at RoBERTa shapes: tokens 4096..65536 (every power of two; --quick: 32768),
    hidden 768 / 1024 (heads 12 / 16, head_dim 64), intermediate 3072 / 4096, seqlen 128 / 512.
    On a CPU: a few tiny shapes (a smoke run of the machinery under the Triton interpreter)."""
    if torch.device(device).type != "cuda":
        table = {
            "layer_norm": [{"tokens": 64, "hidden": 96}],
            "bias_gelu": [{"tokens": 64, "n": 80}],
            "masked_softmax": [{"tokens": 32, "seqlen": 16, "heads": 2, "head_dim": 16}],
            "attention": [{"tokens": 32, "seqlen": 16, "heads": 2, "head_dim": 16}],
            "attention_varlen": [{"tokens": 32, "seqlen": 16, "heads": 2, "head_dim": 16}],
        }
        return [(op, dict(p)) for op in ops for p in table[op]]
    tokens = (32768,) if quick else (4096, 8192, 16384, 32768, 65536)
    hiddens = (768,) if quick else (768, 1024)
    seqlens = (128, 512)
    out = []
    for op in ops:
        for t in tokens:
            for h in hiddens:
                if op == "layer_norm":
                    out.append((op, {"tokens": t, "hidden": h}))
                elif op == "bias_gelu":
                    out.append((op, {"tokens": t, "n": 4 * h}))
                else:
                    for s in seqlens:
                        out.append((op, {"tokens": t, "seqlen": s, "heads": h // HEAD_DIM, "head_dim": HEAD_DIM}))
    return out


def shape_label(op: str, p: dict) -> str:
    if op == "layer_norm":
        return f"T={p['tokens']} N={p['hidden']}"
    if op == "bias_gelu":
        return f"T={p['tokens']} N={p['n']}"
    return f"T={p['tokens']} S={p['seqlen']} H={p['heads']} D={p.get('head_dim', HEAD_DIM)}"


@dataclasses.dataclass
class Case:
    """One op at one shape and dtype. run(backend, inp) calls the public op; eager(inp) is plain PyTorch
    in the inputs' dtype (the verification's yardstick); oracle(inp) is the torch backend's code, given
    the inputs in higher precision. `batched` inputs have the batch as dim 0, so the yardstick and the
    oracle can run a few sequences at a time (bounded memory)."""

    op: str
    params: dict
    dtype: torch.dtype
    inputs: dict
    leaves: tuple
    run: object
    eager: object
    oracle: object
    key: tuple
    out_shape: tuple
    batched: tuple = ()
    chunk: int = 0


def _lengths(gen, total: int, s: int) -> list[int]:
    """Seeded lengths uniform in [0.2 S, S] summing to exactly `total` (the last one trimmed)."""
    lens, lo = [], max(1, int(0.2 * s))
    while sum(lens) < total:
        n = int(torch.randint(lo, s + 1, (1,), generator=gen).item())
        lens.append(min(n, total - sum(lens)))
    return lens


def _dead_rows_softmax(s):
    """softmax over the last dim with the op's rule: a row with every element -inf gives zeros."""
    dead = s.amax(-1, keepdim=True) == float("-inf")
    return torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)


def _eager_attention(q, k, v, kpm, scale):
    """Plain PyTorch attention in q's dtype on (B, S, H, D); kpm bool (B, S) or None."""
    s = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) * scale  # (B, H, S, S)
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    p = _dead_rows_softmax(s).to(q.dtype)
    return torch.matmul(p, v.transpose(1, 2)).transpose(1, 2)


def build_case(op: str, p: dict, dtype: torch.dtype, device, seed: int = 0) -> Case:
    """Inputs as the encoder makes them (fused QKV views, the model's masks), on `device`."""
    from . import ops

    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)  # lengths (host)
    dgen = torch.Generator(device=device).manual_seed(seed)  # tensors, drawn on the device
    dn = _dtype_name(dtype)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=dgen, device=device) * std).to(dtype)

    if op == "layer_norm":
        t, n = p["tokens"], p["hidden"]
        inputs = {"x": rnd(t, n), "residual": rnd(t, n), "x_bias": rnd(n, std=0.1),
                  "weight": 1 + rnd(n, std=0.1), "bias": rnd(n, std=0.1)}
        return Case(
            op, p, dtype, inputs, ("x", "residual", "x_bias", "weight", "bias"),
            run=lambda b, i: ops.layer_norm(i["x"], i["weight"], i["bias"], EPS, residual=i["residual"],
                                            x_bias=i["x_bias"], backend=b),
            eager=lambda i: F.layer_norm(i["x"] + i["x_bias"] + i["residual"], (n,), i["weight"], i["bias"], EPS),
            oracle=lambda i: reference.layer_norm(i["x"], i["weight"], i["bias"], EPS, i["residual"], i["x_bias"]),
            key=(t, n, dn), out_shape=(t, n))
    if op == "bias_gelu":
        t, n = p["tokens"], p["n"]
        inputs = {"x": rnd(t, n), "bias": rnd(n, std=0.1)}
        return Case(
            op, p, dtype, inputs, ("x", "bias"),
            run=lambda b, i: ops.bias_gelu(i["x"], i["bias"], "none", backend=b),
            eager=lambda i: F.gelu(i["x"] + i["bias"]),
            oracle=lambda i: reference.bias_gelu(i["x"], i["bias"], "none"),
            key=(t, n, dn), out_shape=(t, n))
    s, nh, d = p["seqlen"], p["heads"], p.get("head_dim", HEAD_DIM)
    scale = d ** -0.5
    if op == "masked_softmax":
        # the encoder's unfused path: (B, heads, S, S) scores, a bool (B, 1, S, S) mask keeping real
        # keys of real queries (padded query rows are fully masked: zeros)
        nb = max(1, p["tokens"] // s)
        lens = torch.randint(max(1, s // 5), s + 1, (nb,), generator=gen)
        keep = (torch.arange(s)[None, :] < lens[:, None]).to(device)  # (B, S)
        mask = keep[:, None, None, :] & keep[:, None, :, None]  # (B, 1, S, S)
        inputs = {"scores": rnd(nb, nh, s, s, std=3.0), "mask": mask}

        def eager(i):
            sc = i["scores"] * scale
            return _dead_rows_softmax(sc.masked_fill(~i["mask"], float("-inf")))

        return Case(
            op, p, dtype, inputs, ("scores",),
            run=lambda b, i: ops.masked_softmax(i["scores"], i["mask"], scale, backend=b),
            eager=eager,
            oracle=lambda i: reference.masked_softmax(i["scores"], i["mask"], scale),
            key=(nb * nh * s, s, dn, "bool"), out_shape=(nb, nh, s, s), batched=("scores", "mask"), chunk=8)
    if op == "attention":
        # padded batch, q / k / v views into one fused QKV projection (B, S, 3, H, D)
        nb = max(1, p["tokens"] // s)
        lens = torch.randint(max(1, s // 5), s + 1, (nb,), generator=gen)
        kpm = (torch.arange(s)[None, :] < lens[:, None]).to(device)  # (B, S) True = real token
        inputs = {"qkv": rnd(nb, s, 3, nh, d), "kpm": kpm}

        def split(i):
            qkv = i["qkv"]
            return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

        return Case(
            op, p, dtype, inputs, ("qkv",),
            run=lambda b, i: ops.attention(*split(i), key_padding_mask=i["kpm"], scale=scale, backend=b),
            eager=lambda i: _eager_attention(*split(i), i["kpm"], scale),
            oracle=lambda i: reference.attention(*split(i), i["kpm"], scale),
            key=(nb, s, nh, d, dn, True), out_shape=(nb, s, nh, d), batched=("qkv", "kpm"), chunk=8)
    if op == "attention_varlen":
        # packed batch (no padding), lengths uniform in [0.2 S, S], q / k / v views into (T, 3, H, D)
        lens = _lengths(gen, p["tokens"], s)
        t, max_len = sum(lens), max(lens)
        cu_host = [0] + torch.tensor(lens).cumsum(0).tolist()
        cu = torch.tensor(cu_host, dtype=torch.int32, device=device)
        inputs = {"qkv": rnd(t, 3, nh, d)}

        def split(i):
            qkv = i["qkv"]
            return qkv[:, 0], qkv[:, 1], qkv[:, 2]

        def eager(i):
            q, k, v = split(i)
            outs = [_eager_attention(q[None, a:e], k[None, a:e], v[None, a:e], None, scale)[0]
                    for a, e in zip(cu_host[:-1], cu_host[1:])]
            return torch.cat(outs)

        return Case(
            op, p, dtype, inputs, ("qkv",),
            run=lambda b, i: ops.attention_varlen(*split(i), cu, max_len, scale=scale, backend=b),
            eager=eager,
            oracle=lambda i: reference.attention_varlen(*split(i), cu, max_len, scale),
            key=(t, max_len, nh, d, dn), out_shape=(t, nh, d))
    raise ValueError(f"unknown op {op!r}: expected one of {OPS}")


# ----------------------------------------------------------------------------- verification


def _evaluate(case: Case, fn, inputs: dict, dy, want_grads: bool):
    """(output, {leaf: grad}) of fn on inputs (grads of the case's leaves for the upstream gradient dy),
    a chunk of `case.chunk` batch entries at a time for batched cases."""
    if want_grads:
        inputs = {k: (v.detach().requires_grad_(True) if k in case.leaves else v) for k, v in inputs.items()}
    n = next(iter(inputs.values())).shape[0] if case.batched else 0
    step = case.chunk if case.batched and case.chunk else max(n, 1)
    outs, grads = [], {k: [] for k in case.leaves} if want_grads else {}
    spans = [(a, min(a + step, n)) for a in range(0, n, step)] if case.batched else [(None, None)]
    for a, e in spans:
        sub = inputs if a is None else {k: (v[a:e] if k in case.batched else v) for k, v in inputs.items()}
        if want_grads:
            with torch.enable_grad():
                out = fn(sub)
                leaves = [sub[k] for k in case.leaves]
                g = torch.autograd.grad(out, leaves, dy if a is None else dy[a:e], allow_unused=True)
            for k, gk, leaf in zip(case.leaves, g, leaves):
                grads[k].append(gk if gk is not None else torch.zeros_like(leaf))
        else:
            with torch.no_grad():
                out = fn(sub)
        outs.append(out.detach())
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    grads = {k: (v[0] if len(v) == 1 else torch.cat(v)) for k, v in grads.items()}
    return out, grads


def _check(name: str, got, ref, base, dtype) -> str | None:
    """None if max|got - ref| <= 2 * max|base - ref| + floor + one ulp of max|ref|, else the reason."""
    if got.shape != ref.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if got.dtype != dtype:
        return f"{name}: dtype {_dtype_name(got.dtype)}, expected {_dtype_name(dtype)}"
    if got.numel() == 0:
        return None
    g, r, b = got.to(ref.dtype), ref, base.to(ref.dtype)
    nan_g, nan_r = torch.isnan(g), torch.isnan(r)
    if not torch.equal(nan_g, nan_r):
        return f"{name}: NaN pattern differs ({int(nan_g.sum())} NaN, the oracle has {int(nan_r.sum())})"
    g, r, b = g.nan_to_num(0.0), r.nan_to_num(0.0), b.nan_to_num(0.0)
    err = (g - r).abs()
    worst = err.max().item()
    base_err = (b - r).abs().max().item()
    bound = 2.0 * base_err + FLOOR[dtype] + torch.finfo(dtype).eps * r.abs().max().item()
    if not worst <= bound:  # (NaN-safe)
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        return (f"{name}: max error {worst:.3g} > bound {bound:.3g} (2 x plain PyTorch's {base_err:.3g} + floor) "
                f"at {idx}")
    return None


class _Verifier:
    """The oracle and the yardstick for one case and mode, computed once; judge(backend) runs the
    backend once and returns None (verified) or why it was rejected."""

    def __init__(self, case: Case, mode: str, dy):
        self.case, self.train, self.dy = case, mode == "train", dy
        hi = torch.float64 if case.dtype == torch.float32 else torch.float32
        up = {k: (v.to(hi) if v.is_floating_point() else v) for k, v in case.inputs.items()}
        self.ref, self.ref_grads = _evaluate(case, case.oracle, up, dy.to(hi) if dy is not None else None,
                                             self.train)
        self.base, self.base_grads = _evaluate(case, case.eager, case.inputs, dy, self.train)

    def judge(self, backend: str) -> str | None:
        c = self.case
        out, grads = _evaluate(dataclasses.replace(c, batched=()), lambda i: c.run(backend, i), c.inputs,
                               self.dy, self.train)
        why = _check("output", out, self.ref, self.base, c.dtype)
        for k in c.leaves if self.train and why is None else ():
            why = _check(f"grad of {k}", grads[k], self.ref_grads[k], self.base_grads[k], c.dtype)
            if why is not None:
                break
        return why


# ----------------------------------------------------------------------------- timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_timer(rep_ms: float = 100.0, warmup_ms: float = 25.0):
    """Median ms of fn by triton.testing.do_bench (CUDA events, L2 flushed between repeats)."""

    def timer(fn, **_info):
        from triton.testing import do_bench

        r = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return float(r[0] if isinstance(r, (list, tuple)) else r)

    return timer


def host_timer(rep_ms: float = 20.0, min_reps: int = 3, max_reps: int = 50):
    """Median ms of fn by time.perf_counter (CPU smoke runs; not a tuning)."""

    def timer(fn, **_info):
        fn()
        samples = []
        end = time.perf_counter() + rep_ms / 1e3
        while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() < end):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        samples.sort()
        return samples[len(samples) // 2]

    return timer


def _timed_fn(case: Case, backend: str, mode: str, dy):
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
         timer=None, backends=None, verify: bool = True, log=None, seed: int = 0) -> TuneResult:
    """Time every backend of every op at every shape, dtype and mode; record the fastest verified one.

    ops      op names (default: all of OPS)
    shapes   [(op, params)] as default_shapes() makes them (default: RoBERTa shapes; quick: fewer)
    dtypes   torch dtypes or names ("float16", "bf16", ...)
    device   "cuda" (a tuning) or "cpu" (a smoke run of the machinery, Triton under TRITON_INTERPRET=1)
    modes    "fwd" (inference: forward under no_grad) and/or "train" (forward + backward)
    rep_ms   time per measurement (do_bench's rep); default 100 ms, 40 ms with quick
    save     merge the results into the cache file of this GPU (CUDA devices only; a CPU run with
             save=True writes the CPU's own file, which lookups never read)
    timer    callable(fn, *, op, backend, dtype, mode, params) -> ms; default do_bench on CUDA, a
             perf_counter median on CPU (tests inject fake timers)
    backends restrict the candidates (default: every backend that can run on `device`)
    verify   check each backend against the oracle before it may win (off only for experiments)
    log      callable(str) for one progress line per case (default: silent)
    returns  TuneResult(entries, path written or None, identity, device, smoke)
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("tune: no CUDA GPU is available (device='cuda')")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ops = tuple(ops) if ops is not None else OPS
    for op in ops:
        if op not in OPS:
            raise ValueError(f"tune: unknown op {op!r}; expected some of {OPS}")
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
    unavailable = {b: _dispatch._why_unavailable(b, device) for b in (backends or _dispatch.BACKENDS)
                   if not _can_run(b, device)}
    cands = [b for b in (backends or _dispatch.BACKENDS) if b not in unavailable]
    if "torch" not in cands:
        cands.insert(0, "torch")  # the reference the speedups are measured against

    entries = []
    total = len(shapes) * len(dtypes) * len(modes)
    n = 0
    ctx = torch.cuda.device(device) if device.type == "cuda" else _nullctx()
    with ctx:
        for op, params in shapes:
            for dtype in dtypes:
                for mode in modes:
                    n += 1
                    e = _tune_one(op, params, dtype, mode, device, cands, timer, verify, seed)
                    if e is not None:
                        entries.append(e)
                        if log:
                            log(f"[{n}/{total}] {_entry_line(e)}")
    path = None
    ident = identity(device)
    keep = [e for e in entries if e["order"]]
    if save and keep:
        path = save_entries(keep, ident)
    return TuneResult(entries, path, ident, str(device), smoke, unavailable)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _tune_one(op, params, dtype, mode, device, cands, timer, verify, seed):
    """Verify every candidate (the oracle is freed before timing), then time the verified ones."""
    status, times = {}, {}

    def failed(e, what):
        if _is_oom(e) and device.type == "cuda":
            torch.cuda.empty_cache()
            return f"error: {what}out of memory"
        return f"error: {what}{_short(e)}"

    try:
        case = build_case(op, params, dtype, device, seed)
    except Exception as e:  # noqa: BLE001
        return _entry(op, params, dtype, mode, None, {}, {"all": failed(e, "cannot build the inputs: ")})
    dy = None
    if mode == "train":
        dy = torch.randn(case.out_shape, generator=torch.Generator(device=device).manual_seed(seed + 1),
                         device=device).to(dtype)
    eligible = []
    try:
        verifier = _Verifier(case, mode, dy) if verify else None
    except Exception as e:  # noqa: BLE001
        return _entry(op, params, dtype, mode, case, {}, {"all": failed(e, "cannot compute the reference: ")})
    for b in cands:
        try:
            why = verifier.judge(b) if verifier is not None else None
        except (ValueError, TypeError, _dispatch.BackendUnavailableError) as e:
            status[b] = f"n/a: {_short(e)}"  # the backend does not take this call (dtype, head_dim, ...)
            continue
        except Exception as e:  # noqa: BLE001  (a crashing backend never wins; the others go on)
            status[b] = failed(e, "")
            continue
        if why is not None:
            status[b] = f"rejected: {why}"
        else:
            eligible.append(b)
    del verifier
    for b in eligible:
        try:
            ms = float(timer(_timed_fn(case, b, mode, dy), op=op, backend=b, dtype=_dtype_name(dtype), mode=mode,
                             params=dict(params)))
            _sync(device)
        except (ValueError, TypeError, _dispatch.BackendUnavailableError) as e:
            status[b] = f"n/a: {_short(e)}"
            continue
        except Exception as e:  # noqa: BLE001
            status[b] = failed(e, "")
            continue
        if math.isfinite(ms) and ms > 0:
            times[b], status[b] = ms, "ok"
        else:
            status[b] = f"error: the timer returned {ms!r}"
    e = _entry(op, params, dtype, mode, case, times, status)
    del case, dy
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return e


def _entry(op, params, dtype, mode, case, times, status) -> dict:
    key = case.key if case is not None else None
    fixed, tok = bucket(op, key) if key is not None else (None, None)
    order = sorted(times, key=lambda b: (times[b], _dispatch.BACKENDS.index(b)))
    t_torch = times.get("torch")
    return {
        "op": op, "mode": mode, "dtype": _dtype_name(dtype), "shape": dict(params),
        "key": list(key) if key is not None else None,
        "bucket": {"fixed": list(fixed) if fixed is not None else [], "tokens_log2": tok if tok is not None else -1},
        "times_ms": {b: round(t, 6) for b, t in times.items()},
        "status": status,
        "order": order,
        "winner": order[0] if order else None,
        "speedup_vs_torch": (round(t_torch / times[order[0]], 4) if order and t_torch else None),
    }


# ----------------------------------------------------------------------------- report


def _entry_line(e) -> str:
    ts = " ".join(f"{b} {e['times_ms'][b]:.4g}ms" if b in e["times_ms"] else f"{b} {e['status'][b].split(':')[0]}"
                  for b in e["status"])
    return (f"{e['op']} {e['mode']} {e['dtype']} {shape_label(e['op'], e['shape'])}: {ts} -> "
            f"{e['winner'] or 'none'}")


def _bucket_label(e) -> str:
    fixed, tok = e["bucket"]["fixed"], e["bucket"]["tokens_log2"]
    if e["op"] in ("layer_norm", "bias_gelu"):
        return f"rows~2^{tok} N={fixed[0]}"
    if e["op"] == "masked_softmax":
        return f"rows~2^{tok} K<={fixed[0]} mask={fixed[2]}"
    if e["op"] == "attention":
        return f"tok~2^{tok} S<={fixed[0]} H={fixed[1]} D={fixed[2]}" + (" mask" if fixed[4] else "")
    return f"tok~2^{tok} S<={fixed[0]} H={fixed[1]} D={fixed[2]}"


def format_table(entries, smoke: bool = False) -> str:
    """A plain-text table: op, mode, dtype, measured shape, bucket, ms per backend, winner, speedup over
    the torch backend; rejected / failed backends are explained below the table."""
    cols = ["op", "mode", "dtype", "shape", "bucket"] + list(_dispatch.BACKENDS) + ["winner", "x torch"]
    rows, notes = [], []
    for e in entries:
        cells = [e["op"], e["mode"], e["dtype"], shape_label(e["op"], e["shape"]), _bucket_label(e)]
        for b in _dispatch.BACKENDS:
            st = e["status"].get(b)
            if b in e["times_ms"]:
                cells.append(f"{e['times_ms'][b]:.4f}")
            elif st is None:
                cells.append("-")
            else:
                tag = st.split(":")[0]
                notes.append(f"{e['op']} {e['mode']} {e['dtype']} {shape_label(e['op'], e['shape'])} {b}: {st}")
                cells.append(tag)
        if "all" in e["status"]:
            notes.append(f"{e['op']} {e['mode']} {e['dtype']} {shape_label(e['op'], e['shape'])}: {e['status']['all']}")
        cells.append(e["winner"] or "none")
        sp = e.get("speedup_vs_torch")
        cells.append(f"{sp:.2f}x" if sp else "-")
        rows.append(cells)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    lines = []
    if smoke:
        lines.append("SMOKE RUN on CPU (Triton interpreter): these timings are NOT a tuning and are never "
                     "used for dispatch")
    lines += [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines.append("times: median ms per call (do_bench on CUDA)" + ("; perf_counter here" if smoke else "")
                 + "; x torch = the torch backend's time / the winner's")
    if notes:
        lines.append("not eligible:")
        lines += [f"  {n}" for n in notes]
    return "\n".join(lines)


def _log_stderr(msg: str):
    print(msg, file=sys.stderr, flush=True)
