"""The pretraining corpus: a folder of text files read lazily, the built-in corpus, and the resumable stream of
packed batches made from it.

Corpus format: every regular file under the folder (recursively; names starting with "." skipped), read as UTF-8
(undecodable bytes replaced). A document is a run of non-blank lines; blank lines separate documents (RoBERTa's
input format: one document per paragraph block). A document longer than MAX_DOC_CHARS is cut there, so one
file without blank lines never has to fit in memory.

Reading order: epoch e visits the files in an order shuffled by (seed, e) (a seeded random.Random: nothing
global), each file from its first byte to its last. The position of the stream is (epoch, index in that order,
byte offset): a resumed run reopens the file, seeks to the offset and goes on, so nothing before it is read again.

The built-in corpus: the docstrings of a fixed list of Python standard-library modules (BUILTIN_MODULES, walked
in a fixed order: the module, then its classes and functions by name, then each class's members by name), about
1.4 MB of real English technical prose with code in it, on every machine that has Python and needs no download.
The text depends on the Python version (docstrings change between releases); within one version it is the same
on every run.
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import warnings

import torch

from ..data.packing import MODES, PackedBatch

MAX_DOC_CHARS = 100_000
_LINE_LIMIT = 1 << 16  # bytes read per readline: a line longer than this is taken in pieces

# modules importable on every platform that CPython supports (a module missing from this Python is skipped)
BUILTIN_MODULES = tuple("""
abc argparse ast asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.queues asyncio.streams
asyncio.tasks base64 bdb binascii bisect bz2 calendar cmd code codecs collections collections.abc concurrent.futures
configparser contextlib contextvars copy csv dataclasses datetime decimal difflib dis doctest email.message
email.parser email.utils enum filecmp fnmatch fractions ftplib functools getopt gettext glob graphlib gzip hashlib
heapq hmac html html.parser http.client http.cookiejar http.server imaplib importlib.metadata inspect io ipaddress
itertools json json.decoder json.encoder linecache locale logging logging.handlers lzma mailbox math mimetypes
multiprocessing.connection multiprocessing.pool numbers operator optparse os pathlib pdb pickle pickletools plistlib
poplib pprint pydoc queue quopri random re reprlib sched secrets selectors shelve shlex shutil signal smtplib socket
socketserver sqlite3 ssl stat statistics string struct subprocess symtable sysconfig tarfile tempfile textwrap
threading time timeit tokenize trace traceback types typing unittest.case unittest.mock urllib.parse urllib.request
uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree xml.sax xmlrpc.client zipfile zoneinfo
""".split())


class CorpusError(ValueError):
    """A corpus that cannot be used: a missing folder, no files, no text."""


# ------------------------------------------------------------------------------------------------ built-in corpus


def _doc_of(obj):
    d = getattr(obj, "__doc__", None)
    return inspect.cleandoc(d).strip() if isinstance(d, str) else ""


def builtin_documents():
    """(module name, [docstrings]) for each importable module of BUILTIN_MODULES, in that order; every docstring
    once (the first place it is met)."""
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io, ...) warn when touched
        for name in BUILTIN_MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            objs = [mod]
            for attr in sorted(vars(mod)):
                o = vars(mod)[attr]
                if (inspect.isclass(o) or inspect.isroutine(o)) and getattr(o, "__module__", None) == mod.__name__:
                    objs.append(o)
                    if inspect.isclass(o):
                        objs.extend(vars(o)[m] for m in sorted(vars(o)) if not isinstance(vars(o)[m], str))
            docs = []
            for o in objs:
                d = _doc_of(o)
                if d and d not in seen:
                    seen.add(d)
                    docs.append(d)
            yield name, docs


HELDOUT_EVERY = 10  # with a held-out folder: modules 9, 19, 29, ... of the built-in corpus go there


def write_builtin_corpus(folder, heldout=None) -> str:
    """The built-in corpus as text files in `folder` (one per module, its docstrings separated by blank lines),
    each written only when its content differs (so a resumed run finds the same files untouched). With `heldout`
    (a folder), every HELDOUT_EVERY-th module is written there instead: text the model never trains on."""
    from ..train.checkpoint import atomic_text

    os.makedirs(folder, exist_ok=True)
    if heldout is not None:
        os.makedirs(heldout, exist_ok=True)
    for i, (name, docs) in enumerate(builtin_documents()):
        text = "\n\n".join(docs) + "\n"
        held = heldout is not None and i % HELDOUT_EVERY == HELDOUT_EVERY - 1
        path = os.path.join(heldout if held else folder, f"{i:03d}-{name}.txt")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        atomic_text(text, path)
    return os.fspath(folder)


# ------------------------------------------------------------------------------------------------ lazy reading


class Corpus:
    """The files of a corpus folder (sorted relative paths) and a lazy reader of their documents."""

    def __init__(self, root, *, seed: int = 0):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise CorpusError(f"corpus folder {root!r} does not exist (or is not a folder)")
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for n in filenames:
                p = os.path.join(dirpath, n)
                if not n.startswith(".") and os.path.isfile(p):
                    files.append(os.path.relpath(p, root))
        files.sort()
        if not files:
            raise CorpusError(f"corpus folder {root!r} has no files (text files, documents separated by blank lines)")
        self.root, self.files, self.seed = root, files, int(seed)

    def fingerprint(self) -> list:
        """[(relative path, size in bytes)]: what a resumed run checks it reads the same corpus with."""
        return [[f, os.path.getsize(os.path.join(self.root, f))] for f in self.files]

    def order(self, epoch: int) -> list:
        """The file indices in the reading order of `epoch`."""
        idx = list(range(len(self.files)))
        random.Random(self.seed * 1_000_003 + int(epoch)).shuffle(idx)
        return idx

    def documents(self, epoch: int, k: int, offset: int):
        """(text, (k', offset')) for each document of `epoch` from file k of its order at byte `offset`, where
        (k', offset') is the position just after that document; ends at the end of the epoch."""
        return self._read(self.order(epoch), k, offset)

    def texts(self):
        """Every document once, the files in name order (one lazy pass: what the tokenizer is trained on)."""
        return (text for text, _ in self._read(range(len(self.files)), 0, 0))

    def _read(self, order, k, offset):
        while k < len(order):
            with open(os.path.join(self.root, self.files[order[k]]), "rb") as f:
                f.seek(offset)
                lines, size = [], 0
                while True:
                    raw = f.readline(_LINE_LIMIT)
                    line = raw.decode("utf-8", errors="replace").rstrip()
                    if line:
                        lines.append(line)
                        size += len(line) + 1
                    if lines and (not line or not raw or size >= MAX_DOC_CHARS):
                        yield "\n".join(lines), (k, f.tell())
                        lines, size = [], 0
                    if not raw:
                        break
            k, offset = k + 1, 0


# ------------------------------------------------------------------------------------------------ packed stream


class PackedStream:
    """Packed batches of a Corpus, tokenized on the fly, with a position to resume from.

    Within one epoch the batches are exactly `roberta_fast.data.pack(docs, max_tokens=..., max_seqlen=...,
    mode=...)` of that epoch's documents (tests/test_pretrain.py checks it); the stream then goes on with the next
    epoch (a new file order). Unlike pack()'s generator, its whole state is a small dict (state_dict /
    load_state_dict): the reading position, the tokens carried into the next sequence (FULL-SENTENCES) and the
    sequences made but not yet batched, so a resumed run continues with exactly the batch that came next.

    encode(list of str) -> list of token-id lists (no special tokens); documents are encoded `lookahead` at a time
    (a batch call to the tokenizer); the read-ahead is not part of the state and is simply read again on resume.
    """

    def __init__(self, corpus: Corpus, encode, *, max_tokens: int, max_seqlen: int, mode: str = "full_sentences",
                 bos: int = 0, eos: int = 2, sep: int | None = None, lookahead: int = 64):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if max_seqlen < 3:
            raise ValueError(f"max_seqlen must be >= 3 (<s>, a token, </s>), got {max_seqlen}")
        if max_tokens < max_seqlen:
            raise ValueError(f"batch tokens ({max_tokens}) must be >= max_seqlen ({max_seqlen})")
        self.corpus, self.encode = corpus, encode
        self.max_tokens, self.max_seqlen, self.mode = int(max_tokens), int(max_seqlen), mode
        self.bos, self.eos, self.sep = bos, eos, eos if sep is None else sep
        self.lookahead = int(lookahead)
        self.load_state_dict({"epoch": 0, "k": 0, "offset": 0, "buf": [], "first": True, "pending": [],
                              "ended": False, "batches": 0})

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "k": self.k, "offset": self.offset, "buf": list(self.buf), "first": self.first,
                "pending": [list(s) for s in self.pending], "ended": self.ended, "batches": self.batches}

    def load_state_dict(self, s: dict):
        self.epoch, self.k, self.offset = int(s["epoch"]), int(s["k"]), int(s["offset"])
        self.buf, self.first = list(s["buf"]), bool(s["first"])
        self.pending = [list(x) for x in s["pending"]]
        self.ended, self.batches = bool(s["ended"]), int(s["batches"])
        self._ahead, self._reader = [], None  # (ids, position after) read but not consumed

    # the next document's ids of this epoch (None at its end), advancing the position
    def _next_doc(self):
        if not self._ahead:
            if self._reader is None:
                self._reader = self.corpus.documents(self.epoch, self.k, self.offset)
            texts, ends = [], []
            for text, end in self._reader:
                texts.append(text)
                ends.append(end)
                if len(texts) >= self.lookahead:
                    break
            if not texts:
                return None
            self._ahead = list(zip(self.encode(texts), ends))[::-1]
        ids, (self.k, self.offset) = self._ahead.pop()
        return list(ids)

    def _fill(self) -> bool:
        """Make at least one pending sequence; False at the end of the epoch (all of it batched)."""
        body = self.max_seqlen - 2
        while not self.pending:
            if self.ended:
                return False
            doc = self._next_doc()
            if doc is None:
                self.ended = True
                if self.mode == "full_sentences" and self.buf:
                    self.pending.append([self.bos, *self.buf, self.eos])
                    self.buf = []
                continue
            if not doc:
                continue
            if self.mode == "full_sentences":
                if not self.first:
                    self.buf.append(self.sep)
                self.first = False
                self.buf.extend(doc)
                while len(self.buf) >= body:
                    self.pending.append([self.bos, *self.buf[:body], self.eos])
                    del self.buf[:body]
            else:
                self.pending.extend([self.bos, *doc[i:i + body], self.eos] for i in range(0, len(doc), body))
        return True

    def _next_epoch(self):
        self.epoch, self.k, self.offset = self.epoch + 1, 0, 0
        self.buf, self.first, self.ended = [], True, False
        self._ahead, self._reader = [], None

    def next_batch(self) -> PackedBatch:
        """The next batch (at most max_tokens tokens); the last one of an epoch may be smaller."""
        batch, used, empty_epochs = [], 0, 0
        while True:
            if not self._fill():
                self._next_epoch()
                if batch:
                    break
                empty_epochs += 1
                if empty_epochs > 1:
                    raise CorpusError(f"corpus {self.corpus.root!r} has no text (every file is empty or blank)")
                continue
            s = self.pending[0]
            if used + len(s) > self.max_tokens:
                break
            self.pending.pop(0)
            batch.append(s)
            used += len(s)
        self.batches += 1
        lengths = torch.tensor([len(s) for s in batch], dtype=torch.int32)
        cu = torch.zeros(len(batch) + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        ids = torch.tensor([t for s in batch for t in s], dtype=torch.int64)
        return PackedBatch(ids, cu, int(lengths.max()))
