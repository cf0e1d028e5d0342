"""Training checkpoints that survive a crash at any instant.

A checkpoint is a directory `OUTPUT/checkpoints/step-00000120/`:

    model.pt            the model's state dict (full, also under FSDP)
    optimizer.pt        the optimizer's state dict
    trainer_state.pt    step, data position (epoch, batch index, shuffling seed), scheduler, grad scaler,
                        skipped-step count, the options that decide the batches
    rng-rank{R}.pt      per rank: python `random`, numpy, torch CPU and CUDA generator states
    manifest.json       written LAST: format, step, and every file's size and sha256

It is built under `step-00000120.tmp/`; each file is written to a temporary name in the same directory,
flushed, fsync'ed and renamed over its final name (os.replace, atomic on POSIX); the manifest comes last,
then the directory is fsync'ed and renamed to its final name. A run killed at any point leaves either a
complete `step-*` directory or a `.tmp` one, which `--resume` reports and skips. A final directory whose
manifest is missing or disagrees with a file (size, sha256) raises CheckpointError naming the file: it is
never loaded silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings

import torch

FORMAT = "roberta_fast.train.checkpoint/1"
MANIFEST = "manifest.json"
REQUIRED = ("model.pt", "optimizer.pt", "trainer_state.pt")
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is partial or corrupt (the message names the file and what is wrong)."""


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """write(f) into a temporary file beside `path` (same directory, so the rename stays on one file system),
    flush + fsync, then os.replace it over `path`. A failure removes the temporary file and leaves `path`
    as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_save(obj, path):
    """torch.save(obj) to `path` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_text(text: str, path):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def sha256(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def begin(root, step: int) -> str:
    """A fresh temporary directory for the checkpoint of `step` (a stale one from a crash is replaced)."""
    tmp = os.path.join(os.fspath(root), step_dir_name(step) + ".tmp")
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def finish(tmp: str, step: int, keep: int | None = None) -> str:
    """Write the manifest of every file in `tmp` (last), then rename `tmp` to its final name; older complete
    checkpoints beyond the newest `keep` are deleted. Returns the final path."""
    files = {}
    for name in sorted(os.listdir(tmp)):
        p = os.path.join(tmp, name)
        if os.path.isfile(p) and not name.startswith("."):
            files[name] = {"size": os.path.getsize(p), "sha256": sha256(p)}
    missing = [n for n in REQUIRED if n not in files]
    if missing:
        raise CheckpointError(f"checkpoint {tmp}: {', '.join(missing)} not written; no manifest written")
    atomic_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1), os.path.join(tmp, MANIFEST))
    root = os.path.dirname(tmp)
    final = os.path.join(root, step_dir_name(step))
    if os.path.isdir(final):  # the same step saved again (a resumed run): the new one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep is not None and keep > 0:
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root) -> list:
    """[(step, path)] of the final-named checkpoint directories under root, oldest first."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def partial_checkpoints(root) -> list:
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, n) for n in os.listdir(root) if n.startswith("step-") and n.endswith(".tmp"))


def verify(path) -> dict:
    """The manifest of checkpoint `path` after checking every file it lists (present, same size, same sha256)
    and that the required files are there. CheckpointError naming the file otherwise."""
    path = os.fspath(path)
    man_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(man_path):
        raise CheckpointError(f"checkpoint {path} is partial or corrupt: {man_path} is missing (the manifest is "
                              "written last, so the checkpoint was never completed); delete the directory to "
                              "resume from an older checkpoint")
    try:
        with open(man_path, encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {man_path} cannot be read ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or not isinstance(man.get("files"), dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: {man_path} is not a {FORMAT} manifest")
    for name in REQUIRED:
        if name not in man["files"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {man_path} does not list {name}")
    for name, meta in man["files"].items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise CheckpointError(f"checkpoint {path} is corrupt: {p} is missing (listed in the manifest)")
        size = os.path.getsize(p)
        if size != meta.get("size"):
            raise CheckpointError(f"checkpoint {path} is corrupt: {p} has {size} bytes, the manifest says "
                                  f"{meta.get('size')} (truncated or overwritten)")
        digest = sha256(p)
        if digest != meta.get("sha256"):
            raise CheckpointError(f"checkpoint {path} is corrupt: {p} sha256 {digest[:16]}... does not match the "
                                  f"manifest's {str(meta.get('sha256'))[:16]}...")
    return man


def newest(root, warn=True):
    """(step, path) of the newest checkpoint under root, verified, or None when there is none. Unfinished
    `.tmp` directories (a run killed while saving) are reported and skipped; a newest final directory that
    fails verification raises CheckpointError (never skipped silently)."""
    if warn:
        for p in partial_checkpoints(root):
            warnings.warn(f"ignoring unfinished checkpoint {p} (the run stopped while writing it)", stacklevel=2)
    found = list_checkpoints(root)
    if not found:
        return None
    step, path = found[-1]
    verify(path)
    return step, path


def load(path, name, map_location="cpu"):
    """torch.load of one file of a verified checkpoint (weights_only: tensors and plain Python only)."""
    p = os.path.join(os.fspath(path), name)
    if not os.path.isfile(p):
        raise CheckpointError(f"checkpoint {path}: {p} is missing")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file
        raise CheckpointError(f"checkpoint {path}: {p} cannot be read ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------ RNG states


def rng_state() -> dict:
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    import random

    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
