"""The tuned-choice cache: what `roberta-fast tune` measured, stored per GPU and read back by the backend
registry when no backend is named.

One JSON file per (GPU name, compute capability, driver, torch + its CUDA, triton, roberta_fast version,
whether roberta_fast._C is built, a fingerprint of the kernel sources), in $ROBERTA_FAST_CACHE_DIR, else
$XDG_CACHE_HOME/roberta_fast, else ~/.cache/roberta_fast. A change of any of those starts a new file, so
stale choices are never reused. Writes are atomic (temporary file + rename); a corrupt or foreign file
is ignored with a one-line warning.

Lookups (`lookup`) give the measured order of backends for the exact bucket of a call and mode, or
None: nothing is borrowed from another bucket, mask kind or mode (a choice is used only where it was
measured). Buckets: token / row counts to the nearest power of two, sequence lengths (softmax K,
attention S, max_seqlen) up to the next power of two (the kernels pick their blocks by that class);
widths, heads, head_dim, dtype and mask kind exactly. Modes: "fwd" (no gradient needed) and "train"
(the op's inputs require grad under grad mode: forward + backward was timed).

Entries may also carry `triton_configs` ({kernel class: config}: the Triton block sizes, warps and stages the
tuner picked for the bucket, schema 2). When a device's table is read they go, per bucket, to the Triton
kernel files (`on_configs` sinks: each file's `install_tuned`, connected by the registry when it imports
it; this module never imports the kernels), which launch them for calls of that bucket (docs/tuning.md).

This module imports nothing from roberta_fast.ops or the tuner, so the registry can read it without a
cycle. ROBERTA_FAST_TUNING=0 turns lookups off (and with them the tuned configs).

`lookup` itself reads the environment and its table on every call; the ops reach it only through the
registry's resolve cache (`roberta_fast.backends.choose`), once per call signature. Every change of the
in-memory tables (first read, `save_entries`, `reset`, `clear`) calls the `on_change` listeners, which
empty that cache, so a new tuning applies from the next call on (docs/tuning.md).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import hashlib
import importlib.util
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

from . import cuda_ops
from ._version import __version__

SCHEMA = "roberta_fast.tuning/2"  # 2: entries may carry triton_configs (the Triton block configs measured)
OPS = ("layer_norm", "bias_gelu", "masked_softmax", "attention", "attention_varlen", "linear")
MODES = ("fwd", "train")
BACKENDS = ("torch", "triton", "cuda", "cublaslt")  # cublaslt: linear's only (roberta_fast.backends.OP_BACKENDS)
_OFF = ("0", "false", "no", "off")
FILE_GLOB = "tuning_*.json"


# ----------------------------------------------------------------------------- buckets (hot path)


def round_log2(n) -> int:
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


def ceil_pow2(n) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def bucket(op: str, key: tuple):
    """(fixed, tokens_log2) for an op's tune_key (the tuple the op passes to the registry), or None for
    an op that is not tuned. A lookup matches both exactly.

    layer_norm, bias_gelu  key (M, N, dtype)                         -> fixed (N, dtype)
    masked_softmax         key (rows, K, dtype, mask_kind)           -> fixed (ceil_pow2(K), dtype, mask_kind)
    attention              key (B, S, H, D, dtype, has_mask)         -> fixed (ceil_pow2(S), H, D, dtype, has_mask)
    attention_varlen       key (T, max_seqlen, H, D, dtype)          -> fixed (ceil_pow2(max_seqlen), H, D, dtype)
    linear                 key (M, N, K, dtype)                      -> fixed (N, K, dtype)
    tokens_log2 is the rounded log2 of M, rows, B * S or T.
    """
    if op == "layer_norm" or op == "bias_gelu":
        return (key[1], key[2]), round_log2(key[0])
    if op == "masked_softmax":
        return (ceil_pow2(key[1]), key[2], key[3]), round_log2(key[0])
    if op == "attention":
        return (ceil_pow2(key[1]), key[2], key[3], key[4], bool(key[5])), round_log2(key[0] * key[1])
    if op == "attention_varlen":
        return (ceil_pow2(key[1]), key[2], key[3], key[4]), round_log2(key[0])
    if op == "linear":
        return (key[1], key[2], key[3]), round_log2(key[0])
    return None


# in-memory tables: device index -> {(op, mode, *fixed, tokens_log2): (backend, ...) fastest first};
# configs: torch.device -> {(op, *fixed, tokens_log2): {kernel class: [ints]}} (build_configs)
_STATE = {"tables": {}, "configs": {}, "identity": {}, "warned": set()}
# called with no arguments whenever the in-memory tables change (first read, save, reset, clear): the
# registry's resolve cache (roberta_fast.backends) forgets its choices there, so a new tuning is seen
_LISTENERS: list = []
# called with (device, configs, bucket) whenever a device's tuned Triton configs are read, and with
# (None, None, None) when every table is forgotten: the Triton kernel files' install_tuned
# (roberta_fast.kernels.<op>), which the registry connects when it imports them
_SINKS: list = []


def on_change(fn):
    """Call fn() whenever the in-memory tables change (loaded, saved, reset or cleared)."""
    if fn not in _LISTENERS:
        _LISTENERS.append(fn)
    return fn


def _changed():
    for fn in _LISTENERS:
        fn()


def on_configs(fn):
    """Hand the tuned Triton configs to fn(device, configs, bucket) (a kernel file's install_tuned): now for
    every device whose table is read already, then whenever one is read; fn(None, None, None) when the tables
    are forgotten (reset, clear, a new tuning saved)."""
    if fn not in _SINKS:
        _SINKS.append(fn)
        for device, configs in _STATE["configs"].items():
            _hand(fn, device, configs)
    return fn


def _hand(fn, device, configs):
    """fn(device, configs, bucket); a failing sink warns once and never fails a lookup."""
    try:
        fn(device, configs, bucket if configs is not None else None)
    except Exception as e:  # noqa: BLE001
        warn_once(f"roberta_fast.tuning: the tuned Triton configs were not installed ({type(e).__name__}: {e})")


def _forget_configs():
    _STATE["configs"].clear()
    for fn in _SINKS:
        _hand(fn, None, None)


def tuning_on() -> bool:
    """ROBERTA_FAST_TUNING is not 0 / false / no / off."""
    return os.environ.get("ROBERTA_FAST_TUNING", "1").strip().lower() not in _OFF


def load(device) -> int:
    """Read the tuned table of a CUDA `device` now if it is not read yet (and tuning is on): what a lookup does
    first. The registry calls it for a named triton backend, whose kernels use the tuned configs without
    any lookup of the order. Returns the number of buckets (0 off a GPU or with tuning off)."""
    if device.type != "cuda" or not tuning_on():
        return 0
    return _ensure_table(device.index)


def lookup(op: str, key: tuple, device, mode: str = "fwd") -> tuple | None:
    """The measured order of backends (fastest first) for this op, shape bucket and mode on `device` (a
    CUDA device), or None when tuning is off, the device is not a GPU or nothing was measured there.

    Reads the cache file once per device, then works on an in-memory dict: no file IO and no device sync
    per call, plain Python that torch.compile traces."""
    if device.type != "cuda" or not tuning_on():
        return None
    index = device.index
    if not _ensure_table(index):  # loads the file on the first call; before any read of the tables
        return None
    b = bucket(op, key)
    if b is None:
        return None
    fixed, tok = b
    return _STATE["tables"][index].get((op, mode, *fixed, tok))


def assume_constant(fn):
    """torch.compiler.assume_constant_result, which only sets this attribute, without its import of
    torch._dynamo (1.5 s, and it imports triton) when roberta_fast is imported."""
    fn._dynamo_marked_constant = True
    return fn


@assume_constant
def _ensure_table(index) -> int:
    """Read the cache file of CUDA device `index` into _STATE["tables"][index] on the first call (the
    only file IO of a lookup); returns the number of buckets. A constant to torch.compile: a traced
    lookup runs it for real once and reads the table only after it, so the guards torch.compile puts
    on the table see it loaded. (Code compiled while nothing was cached keeps that answer until it
    recompiles, e.g. after torch._dynamo.reset().)"""
    tables = _STATE["tables"]
    if index not in tables:
        configs, dev = {}, None
        try:
            dev = torch.device("cuda", torch.cuda.current_device() if index is None else index)
            ident = identity(dev)
            entries = read_entries(cache_path(ident), ident)
            tables[index], configs = build_table(entries), build_configs(entries)
        except Exception as e:  # noqa: BLE001  (a lookup never raises)
            warn_once(f"roberta_fast.tuning: no tuned choices ({type(e).__name__}: {e})")
            tables[index] = {}
        if configs:
            _STATE["configs"][dev] = configs
            for fn in _SINKS:
                _hand(fn, dev, configs)
        _changed()
    return len(tables[index])


def build_table(entries) -> dict:
    table: dict = {}
    for e in entries:
        order = tuple(e.get("order") or ())
        if order:
            table[(e["op"], e["mode"], *e["bucket"]["fixed"], int(e["bucket"]["tokens_log2"]))] = order
    return table


def build_configs(entries) -> dict:
    """{(op, *fixed, tokens_log2): {kernel class: config as a list}} of the Triton configs the entries carry.
    A kernel runs alike in inference and training, and a forward kernel cannot tell which mode called it:
    the forward classes take the "fwd" entry's config where the bucket has one, else the "train" entry's;
    the backward classes come from the "train" entry (the only one that measured them)."""
    out: dict = {}
    for mode in ("train", "fwd"):  # the fwd entry's configs overwrite the train entry's forward ones
        for e in entries:
            cfgs = e.get("triton_configs")
            if e["mode"] == mode and cfgs:
                key = (e["op"], *e["bucket"]["fixed"], int(e["bucket"]["tokens_log2"]))
                out.setdefault(key, {}).update({c: list(v) for c, v in cfgs.items()})
    return out


def reset():
    """Forget the in-memory tables (the next lookup re-reads the cache files)."""
    _STATE["tables"].clear()
    _STATE["identity"].clear()
    _forget_configs()
    _changed()


def warn_once(msg: str):
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
    try:
        import triton

        triton_version = getattr(triton, "__version__", "unknown")
    except ImportError:
        triton_version = None
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
        "triton": triton_version,
        "roberta_fast": __version__,
        "cuda_ext": cuda_ops.native_module() is not None,
        "code": _code_fingerprint(),
        "triton_interpret": device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1",
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


def _valid_configs(cfgs) -> bool:
    """triton_configs: absent, or {kernel class: [int, ...]}."""
    if cfgs is None:
        return True
    return isinstance(cfgs, dict) and all(
        isinstance(c, str) and isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool)
                                                                for i in v)
        for c, v in cfgs.items())


def _valid_entry(e) -> bool:
    try:
        return (e["op"] in OPS and e["mode"] in MODES and isinstance(e["bucket"]["fixed"], list)
                and isinstance(e["bucket"]["tokens_log2"], int)
                and all(b in BACKENDS for b in e["order"]) and _valid_configs(e.get("triton_configs")))
    except (KeyError, TypeError, AttributeError):
        return False


def read_doc(path: Path, ident: dict | None):
    """The parsed file, or None when it is missing; a corrupt, foreign-schema or foreign-identity file
    gives None and one warning line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        warn_once(f"roberta_fast.tuning: ignoring {path} (cannot read it: {e})")
        return None
    try:
        doc = json.loads(text)
    except ValueError as e:
        warn_once(f"roberta_fast.tuning: ignoring corrupt cache file {path} ({e})")
        return None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        warn_once(f"roberta_fast.tuning: ignoring {path} (schema {got!r}, expected {SCHEMA!r})")
        return None
    if ident is not None and doc.get("identity") != ident:
        warn_once(f"roberta_fast.tuning: ignoring {path} (written for another GPU or library version)")
        return None
    entries = doc.get("entries")
    if not isinstance(entries, list) or not all(_valid_entry(e) for e in entries):
        warn_once(f"roberta_fast.tuning: ignoring {path} (malformed entries)")
        return None
    return doc


def read_entries(path: Path, ident: dict) -> list:
    doc = read_doc(path, ident)
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
    old = read_doc(path, ident)
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
    _forget_configs()
    _changed()
    return path


def load_entries(device="cuda") -> tuple[Path, list]:
    """(the cache file for `device`, its entries) - empty when nothing valid is cached."""
    ident = identity(device)
    path = cache_path(ident)
    return path, read_entries(path, ident)


def clear() -> list[Path]:
    """Delete every tuning file in the cache directory and forget the in-memory tables."""
    removed = []
    d = cache_dir()
    if d.is_dir():
        for f in sorted(d.glob(FILE_GLOB)):
            try:
                f.unlink()
                removed.append(f)
            except OSError as e:
                warnings.warn(f"roberta_fast.tuning: could not remove {f}: {e}", RuntimeWarning, stacklevel=2)
    reset()
    return removed
