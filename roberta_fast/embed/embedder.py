"""Sentence embeddings: `Embedder.from_pretrained(path).encode(texts)`.

    from roberta_fast import Embedder
    emb = Embedder.from_pretrained("path/to/all-MiniLM-L6-v2")          # a sentence-transformers folder, or any
    vecs = emb.encode(["A man is eating food.", "A cat sleeps."])       # BERT-family transformers folder
    vecs.shape                                                          # (2, 384) float32 numpy, input order

What encode() does, in order:
  1. the texts are cut into windows (`window` texts each, default 8192); a background thread tokenizes a window
     (the `tokenizers` package: Rust, its encode_batch releases the GIL and runs on its own threads), truncates
     each text at `max_length` tokens (special tokens included) and counts the truncated ones;
  2. the same thread sorts the window's texts by token length (longest first) and packs them into batches by a
     token budget: a batch holds n texts of the same or shorter length than its first, with n * first_length <=
     `batch_tokens` (and n <= `max_batch`). Sorted lengths make the padding of a batch small, and the model
     unpads it anyway (roberta_fast.padding: every GEMM and kernel runs on real tokens only). The ids and the
     attention mask of each batch are built on the host (numpy, pinned when the model is on a GPU), so the
     host knows every length: nothing is read back from the device to plan a batch;
     on a GPU the model runs padding-free (the batch is packed once inside the model); on the CPU it runs the
     padded layout (padding_free=False): with sorted batches the padding is small, and the CPU's padding-free
     attention runs one SDPA call per distinct sequence length; on sorted all-MiniLM-L6-v2 batches (float32, 2
     shared cores) that measured 1.2-1.4x slower per batch under heavy load and even when the machine was quiet
     (2.82 s vs 2.65 s for 160 mixed-length texts), never clearly faster;
  3. the main thread takes the batches from a small queue (the thread stays at most `prefetch` batches ahead),
     copies them to the device without blocking, runs the encoder (`torch.inference_mode()`; CUDA graphs per
     token bucket with cuda_graphs=True, roberta_fast/model/graphs.py), pools the token states
     (roberta_fast.pool: sentence-transformers' Pooling and Normalize) and scatters the embeddings to their
     input positions in one (N, hidden) output on the device; one copy to the host at the end.
So the tokenization of the next batches overlaps the GPU work of this one. The encoder's forward itself makes
its one host sync (model/checks.py: input range checks and the packed token count).

Truncation is reported once per encode() call (a warning naming how many texts of how many were cut, and the
maximum length); `Embedder.last_truncated` keeps the count.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..model import BertModel, RobertaModel, pool
from ..model.config import MODEL_TYPES, ROBERTA_TYPES
from ..model.outputs import POOL_MODES

DEFAULT_WINDOW = 8192  # texts tokenized, sorted and packed together
DEFAULT_MAX_BATCH = 256  # sequences per batch at most (the largest batch bucket of the CUDA graphs)
OUTPUTS = ("numpy", "torch")


def default_batch_tokens(device: torch.device) -> int:
    """Padded tokens per batch: 16384 on a GPU (fills it; past the CUDA graphs' last token edge 8192 the
    forward runs eagerly, which is cheap at that size), 4096 on the CPU (measured: larger CPU batches are no
    faster, smaller ones pay the per-forward overhead more often)."""
    return 16384 if device.type == "cuda" else 4096


@dataclass(frozen=True)
class SentenceConfig:
    """What a checkpoint folder says about sentence embeddings (sentence-transformers' modules.json and its
    Pooling / Normalize / sentence_bert_config.json), or the defaults of a plain transformers folder."""

    model_dir: str  # the folder with config.json and the weights
    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None
    sentence_transformers: bool = False


def _read_json(path: str, who: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{who}: cannot read {path}: {e}") from e


def _pooling_mode(cfg: dict, path: str, who: str) -> str:
    if isinstance(cfg.get("pooling_mode"), str):  # newer sentence-transformers spell it this way
        modes = [cfg["pooling_mode"].replace("_tokens", "").replace("_token", "")]
    else:
        modes = [m for m, key in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                                  ("max", "pooling_mode_max_tokens")) if cfg.get(key)]
        modes += [k for k in ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                              "pooling_mode_lasttoken") if cfg.get(k)]
    if len(modes) != 1 or modes[0] not in POOL_MODES:
        raise ValueError(f"{who}: {path} asks for pooling {modes}; supported: exactly one of "
                         f"{', '.join(POOL_MODES)} (pass pooling= to override)")
    return modes[0]


def read_sentence_config(path: str, who: str = "Embedder.from_pretrained") -> SentenceConfig:
    """The folder's sentence-embedding settings. A sentence-transformers folder (modules.json) must hold a
    Transformer module, optionally Pooling and Normalize; any other module (Dense, ...) raises ValueError,
    since leaving it out would give different embeddings."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{who}: {path!r} is not a directory (a local checkpoint folder: config.json, "
                                "the weights and tokenizer.json; nothing is downloaded)")
    modules_file = os.path.join(path, "modules.json")
    if not os.path.exists(modules_file):
        return SentenceConfig(model_dir=path)
    modules = _read_json(modules_file, who)
    model_dir, pooling, normalize = None, "mean", False
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        sub = os.path.join(path, m.get("path", ""))
        if kind == "Transformer":
            model_dir = sub
        elif kind == "Pooling":
            pooling = _pooling_mode(_read_json(os.path.join(sub, "config.json"), who), sub, who)
        elif kind == "Normalize":
            normalize = True
        else:
            raise ValueError(f"{who}: {modules_file} has a {m.get('type')!r} module, which roberta_fast's "
                             "Embedder does not run (supported: Transformer, Pooling, Normalize)")
    if model_dir is None:
        raise ValueError(f"{who}: {modules_file} has no Transformer module")
    max_len = None
    st_cfg = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.exists(st_cfg):
        max_len = _read_json(st_cfg, who).get("max_seq_length")
    return SentenceConfig(model_dir=model_dir, pooling=pooling, normalize=normalize, max_seq_length=max_len,
                          sentence_transformers=True)


def load_tokenizer(model_dir: str, who: str):
    """tokenizers.Tokenizer of the folder (tokenizer.json; else transformers' fast tokenizer's backend, which
    converts vocab files), with its own padding and truncation switched off (set per call here)."""
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(f"{who} needs the `tokenizers` package: pip install 'roberta_fast[embed]'") from e
    tj = os.path.join(model_dir, "tokenizer.json")
    if os.path.exists(tj):
        tok = tokenizers.Tokenizer.from_file(tj)
    else:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise FileNotFoundError(f"{who}: {model_dir!r} has no tokenizer.json (and transformers, which could "
                                    "convert its vocabulary files, is not installed)") from e
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, use_fast=True).backend_tokenizer
    tok.no_padding()
    tok.no_truncation()
    return tok


def _model_max_length(model_dir: str, cfg: dict, roberta: bool) -> int:
    """Positions the model has for tokens: max_position_embeddings (RoBERTa's table starts after its padding
    row: pad_token_id + 1 rows fewer), capped by tokenizer_config.json's model_max_length when it is set."""
    n = int(cfg.get("max_position_embeddings", 512))
    if roberta:
        n -= int(cfg.get("pad_token_id", 1)) + 1
    tc = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.exists(tc):
        m = _read_json(tc, "Embedder").get("model_max_length")
        if isinstance(m, int) and 0 < m < n:
            n = m
    return n


@dataclass
class _Batch:
    index: np.ndarray  # (n,) int64: positions of the batch's texts in encode()'s input
    input_ids: torch.Tensor  # (n, S) int64, S = the batch's longest length (pinned on a GPU run)
    attention_mask: torch.Tensor  # (n, S) int64, 1 = real token
    tokens: int  # real tokens


class Embedder:
    """A BERT-family encoder + pooling (+ L2 normalization) + its tokenizer: texts in, embeddings out.

    Build it with `Embedder.from_pretrained(path, ...)`. Attributes: model (RobertaModel | BertModel), tokenizer
    (tokenizers.Tokenizer), pooling ("mean" | "cls" | "max"), normalize (bool), max_length (tokens, special
    tokens included), dim (embedding width), device, dtype, last_truncated (texts cut by the last encode())."""

    def __init__(self, model, tokenizer, *, pooling="mean", normalize=False, max_length=512):
        if pooling not in POOL_MODES:
            raise ValueError(f"Embedder: pooling must be one of {', '.join(map(repr, POOL_MODES))}, got {pooling!r}")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"Embedder: max_length must be an int >= 2, got {max_length!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.max_length = max_length
        self.pad_id = int(model.config.pad_token_id or 0)
        self.last_truncated = 0
        self.padding_free = None  # None: padding-free on a GPU, the padded layout on the CPU (module docstring)
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, pooling=None, normalize=None, max_length=None,
                        cuda_graphs=False, backend=None):
        """Load a local folder: a sentence-transformers model (modules.json: its Transformer, Pooling and
        Normalize modules and sentence_bert_config.json's max_seq_length are used) or a transformers
        BERT-family folder (config.json, model.safetensors / pytorch_model.bin, tokenizer.json).

        dtype: torch dtype or name; None: float16 on CUDA, float32 on the CPU. device: None = "cuda" when
        available, else "cpu". pooling ("mean" | "cls" | "max") and normalize (bool): None = the folder's
        (mean, no normalization for a plain transformers folder, as sentence-transformers does). max_length:
        tokens per text, special tokens included; None = sentence_bert_config.json's max_seq_length, else the
        model's positions. cuda_graphs: True or roberta_fast.CudaGraphs(...), on CUDA only (ignored on the CPU).
        backend: the op backend (None = automatic)."""
        who = "Embedder.from_pretrained"
        sc = read_sentence_config(path, who)
        cfg = _read_json(os.path.join(sc.model_dir, "config.json"), who)
        mtype = cfg.get("model_type")
        if mtype not in MODEL_TYPES:
            raise ValueError(f"{who}: {sc.model_dir!r} holds a {mtype!r} model; supported model types: "
                             f"{', '.join(MODEL_TYPES)}")
        roberta = mtype in ROBERTA_TYPES
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        model_cls = RobertaModel if roberta else BertModel
        model = model_cls.from_pretrained(sc.model_dir, dtype=dtype, device=device, backend=backend,
                                          cuda_graphs=cuda_graphs if device.type == "cuda" else False)
        limit = _model_max_length(sc.model_dir, cfg, roberta)
        if max_length is None:
            max_length = min(sc.max_seq_length or limit, limit)
        elif not isinstance(max_length, int) or not 2 <= max_length <= limit:
            raise ValueError(f"{who}: max_length must be an int in [2, {limit}] (the model's positions), "
                             f"got {max_length!r}")
        return cls(model, load_tokenizer(sc.model_dir, who), pooling=sc.pooling if pooling is None else pooling,
                   normalize=sc.normalize if normalize is None else normalize, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    # ---- host side: tokenize, sort, pack
    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """Token ids of each text (truncated at max_length, special tokens included) and how many were cut."""
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        return [e.ids for e in encs], sum(1 for e in encs if e.overflowing)

    def plan(self, lengths: np.ndarray, batch_tokens: int, max_batch: int = DEFAULT_MAX_BATCH) -> list[np.ndarray]:
        """Batches of positions into `lengths`: sorted longest first (stable), n per batch with n * (the batch's
        first length) <= batch_tokens (at least one) and n <= max_batch."""
        order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
        out, i = [], 0
        while i < len(order):
            n = max(1, min(max_batch, batch_tokens // int(lengths[order[i]])))
            out.append(order[i:i + n])
            i += n
        return out

    def _make_batches(self, ids: list[list[int]], offset: int, batch_tokens: int, max_batch: int, pin: bool):
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        for sel in self.plan(lengths, batch_tokens, max_batch):
            S = int(lengths[sel[0]])
            arr = np.full((len(sel), S), self.pad_id, dtype=np.int64)  # (n, S)
            mask = np.zeros((len(sel), S), dtype=np.int64)  # (n, S)
            for r, j in enumerate(sel):
                n = lengths[j]
                arr[r, :n] = ids[j]
                mask[r, :n] = 1
            t_ids, t_mask = torch.from_numpy(arr), torch.from_numpy(mask)
            if pin:
                t_ids, t_mask = t_ids.pin_memory(), t_mask.pin_memory()
            yield _Batch(index=sel + offset, input_ids=t_ids, attention_mask=t_mask, tokens=int(lengths[sel].sum()))

    def _producer(self, texts, window, batch_tokens, max_batch, pin, q, stop, counts):
        def put(item) -> bool:  # False once the consumer has stopped (it never blocks a stopped run)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for start in range(0, len(texts), window):
                ids, cut = self.tokenize(texts[start:start + window])
                counts["truncated"] += cut
                for b in self._make_batches(ids, start, batch_tokens, max_batch, pin):
                    if not put(b):
                        return
            put(None)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, which re-raises it)
            put(e)

    # ---- encode
    def encode(self, texts, *, batch_tokens: int | None = None, max_batch: int = DEFAULT_MAX_BATCH,
               show_progress: bool = False, output: str = "numpy", window: int = DEFAULT_WINDOW, prefetch: int = 4,
               warn_truncation: bool = True):
        """Embeddings of `texts` in input order.

        texts: a list (or sequence) of str, or one str. batch_tokens: padded tokens per batch (default 16384 on
        CUDA, 4096 on the CPU); max_batch: sequences per batch at most. show_progress: a tqdm bar (texts done).
        output: "numpy" -> float32 ndarray (N, dim) on the host; "torch" -> float32 tensor (N, dim) on the
        model's device. One str gives (dim,). window: texts tokenized and sorted together; prefetch: batches
        the tokenizing thread may be ahead. Texts longer than max_length tokens are truncated; their number is
        warned once per call (warn_truncation=False: not warned) and kept in `last_truncated`. An empty string
        is encoded as the special tokens alone (as sentence-transformers does)."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"Embedder.encode: texts must be strings; texts[{i}] is {type(t).__name__}")
        if output not in OUTPUTS:
            raise ValueError(f"Embedder.encode: output must be one of {OUTPUTS}, got {output!r}")
        device = self.device
        batch_tokens = default_batch_tokens(device) if batch_tokens is None else batch_tokens
        for name, v in (("batch_tokens", batch_tokens), ("max_batch", max_batch), ("window", window),
                        ("prefetch", prefetch)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Embedder.encode: {name} must be a positive int, got {v!r}")
        out = torch.empty((len(texts), self.dim), dtype=torch.float32, device=device)  # (N, dim)
        counts = {"truncated": 0}
        if texts:
            self._run(texts, out, batch_tokens, max_batch, window, prefetch, show_progress, counts)
        self.last_truncated = counts["truncated"]
        if warn_truncation and self.last_truncated:
            warnings.warn(f"roberta_fast.Embedder: {self.last_truncated} of {len(texts)} texts were longer than "
                          f"max_length={self.max_length} tokens and were truncated", stacklevel=2)
        if single:
            out = out[0]
        return out.cpu().numpy() if output == "numpy" else out

    def _run(self, texts, out, batch_tokens, max_batch, window, prefetch, show_progress, counts):
        device = self.device
        pin = device.type == "cuda"
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()
        th = threading.Thread(target=self._producer, name="roberta_fast-embed-tokenize", daemon=True,
                              args=(texts, window, batch_tokens, max_batch, pin, q, stop, counts))
        bar = None
        if show_progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(texts), unit="text", desc="encode")
            except ImportError:
                bar = None
        before = self.model.padding_free
        self.model.padding_free = device.type == "cuda" if self.padding_free is None else self.padding_free
        th.start()
        try:
            with torch.inference_mode():
                while True:
                    b = q.get()
                    if b is None:
                        break
                    if isinstance(b, BaseException):
                        raise b
                    ids = b.input_ids.to(device, non_blocking=True)
                    mask = b.attention_mask.to(device, non_blocking=True)
                    h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (n, S, hidden)
                    # pooled and normalized in float32 (one rounding of fp16/bf16 states, none after)
                    emb = pool(h.float(), mask, self.pooling, normalize=self.normalize)  # (n, hidden) float32
                    index = torch.from_numpy(b.index)
                    out.index_copy_(0, index.to(device, non_blocking=True), emb)
                    if bar is not None:
                        bar.update(len(b.index))
        finally:
            self.model.padding_free = before
            stop.set()
            th.join()
            if bar is not None:
                bar.close()
