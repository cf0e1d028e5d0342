"""Tuned launch configurations of the Triton kernels (block sizes, warps, stages per shape bucket).

Each kernel file keeps its defaults in one place (what it launches when nothing is tuned: exactly the
configs it always had) and `config_space(op, fixed, train)`: for a tuned bucket (`fixed` as
roberta_fast.tuned.bucket gives it), the pruned candidates per kernel class, today's default first. Every
candidate is in the file's `aot_specs()`, so the ahead-of-time compile check covers each config a tuning
can pick (no spills, shared memory within the limit, HGMMA on sm_90 / HMMA on sm_80).

A `ConfigTable` per kernel file holds what `roberta-fast tune` measured, per device:

    install(device, table, bucket)   the winners of one device, {(op, *fixed, tokens_log2): {class: [ints]}},
                                     and the bucketing function (roberta_fast.tuned.bucket); device None:
                                     forget every device. Called by roberta_fast.tuned (this package imports
                                     nothing above it; the registry connects the two when it imports a kernel
                                     file). A config that is not one of the bucket's candidates is dropped
                                     with a warning: only configs the compile check covers are launched.
    forced(configs)                  a context in which every launch of the file uses `configs` ({class:
                                     config}; the classes not named keep their default): the tuner's trials.
    pick(cls, device, op, key)       the tuned (or forced) config of kernel class `cls` for a call whose tune
                                     key (the op's; torch dtypes or their names) is `key`; None: the file's
                                     default. Remembered per key: a repeated shape costs one dict lookup.

The host functions call `pick` only while `active` (a table or a forced config is there), so a process
without a tuning pays one attribute read per launch.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from .._utils import dtype_name


class ConfigTable:
    """The tuned configs of one kernel file (see the module docstring)."""

    __slots__ = ("ops", "space", "tables", "bucket", "forced_cfgs", "active", "memo")

    MEMO_MAX = 4096  # call keys remembered (a server with ever new shapes starts over past this)

    def __init__(self, ops: tuple, space):
        self.ops = ops  # the op names whose buckets this file's kernels serve
        self.space = space  # config_space(op, fixed, train) -> {class: (config, ...)}, default first
        self.tables: dict = {}  # device -> {(op, *fixed, tokens_log2): {class: config}}
        self.bucket = None  # roberta_fast.tuned.bucket, handed over with the tables
        self.forced_cfgs = None  # {class: config} while the tuner forces a trial
        self.active = False
        self.memo: dict = {}  # (class, device, op, call key) -> config or None: the bucketing once per key

    def _update(self):
        self.active = bool(self.tables) or self.forced_cfgs is not None
        self.memo.clear()

    def install(self, device, table, bucket=None):
        """Replace the tuned configs of `device` (a torch.device) by `table`; device None forgets all."""
        if device is None:
            self.tables.clear()
            self._update()
            return
        kept = {}
        for key, cfgs in (table or {}).items():
            op, fixed = key[0], tuple(key[1:-1])
            if op not in self.ops:
                continue
            try:
                space = self.space(op, fixed, True)
            except (TypeError, ValueError, KeyError, IndexError) as e:  # a bucket this file cannot read
                warnings.warn(f"roberta_fast.kernels: ignoring the tuned {op} configs of bucket {list(key[1:])} "
                              f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=2)
                continue
            good = {}
            for cls, cfg in cfgs.items():
                cands = {tuple(c): c for c in space.get(cls, ())}
                got = cands.get(tuple(cfg))
                if got is None:
                    warnings.warn(f"roberta_fast.kernels: ignoring the tuned {op} {cls} config {list(cfg)} for "
                                  f"bucket {list(key[1:])}: not one of its candidates {[list(c) for c in cands]}",
                                  RuntimeWarning, stacklevel=2)
                    continue
                good[cls] = got
            if good:
                kept[tuple(key)] = good
        if kept:
            self.tables[device] = kept
            self.bucket = bucket
        else:
            self.tables.pop(device, None)
        self._update()

    @contextlib.contextmanager
    def forced(self, configs: dict):
        """Every launch of this kernel file uses `configs` ({class: config}) inside the block."""
        prev = self.forced_cfgs
        self.forced_cfgs = dict(configs)
        self._update()
        try:
            yield
        finally:
            self.forced_cfgs = prev
            self._update()

    def pick(self, cls: str, device, op: str, key: tuple):
        """The forced or tuned config of kernel class `cls` for this call, or None (the default applies). key:
        the op's tune key, torch dtypes as they are (named here, on a miss only); the answer is remembered per
        key, so a repeated shape costs one dict lookup."""
        forced = self.forced_cfgs
        if forced is not None:
            return forced.get(cls)
        mkey = (cls, device, op, key)
        memo = self.memo
        if mkey in memo:
            return memo[mkey]
        got = None
        table = self.tables.get(device)
        if table is not None:
            named = tuple(dtype_name(k) if isinstance(k, torch.dtype) else k for k in key)
            fixed, tok = self.bucket(op, named)
            cfgs = table.get((op, *fixed, tok))
            got = None if cfgs is None else cfgs.get(cls)
        if len(memo) >= self.MEMO_MAX:
            memo.clear()
        memo[mkey] = got
        return got


def with_default(default, candidates) -> tuple:
    """candidates with `default` first (added when missing), each once."""
    return (default, *(c for c in candidates if tuple(c) != tuple(default)))
