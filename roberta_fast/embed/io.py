"""Streaming input and chunked, resumable output of `roberta-fast embed` (docs/embedding.md).

Input records, numbered from 1 in input order (the record number is the row's id in the output):
  text     one text per line (UTF-8; a trailing "\\r" is dropped): the id is the line number
  jsonl    one JSON object per line, the text in `field`: the id is the line number
  csv      a header row, the text in the column `field`: the id is the data row number (header excluded; a quoted
           field may span lines, so this is not always the file's line number, which the reports add)
  parquet  the text in the column `field`: the id is the row number

Bad records, never dropped silently: invalid UTF-8, empty text (nothing but whitespace), a missing field or
column value, a JSON line that does not parse or holds no object, a field that is not a string. Each is
reported on stderr with its record number and reason and listed in OUTPUT.bad.jsonl; the rule (`--bad-lines`)
says what happens to its row:
  skip   (default) no row in the output: the ids (parquet's `id` column, OUTPUT.ids.npy beside an .npy) say
         which records are there
  zero   a row of zeros in its place (the output keeps one row per record)
  error  the run stops at the first bad record with exit status 2 (finished chunks stay for --resume)

Output, streamed in chunks of `chunk_size` records: chunk k (records k*chunk_size+1 ...) is encoded and written
as OUTPUT.parts/chunk-<k>.npz (ids int64, embeddings float32 (n, dim), the chunk's bad records), first to a
temporary name and then renamed, so a chunk file is complete or absent. OUTPUT.parts/manifest.json records the
settings the parts were made with (model, pooling, max length, dtype, the input's path, size and mtime, format,
field, chunk size, bad-line rule); --resume checks them and skips every chunk whose file exists, so a stopped run
neither recomputes nor duplicates rows. Under torchrun, rank r encodes chunks k with k % world_size == r (each
rank writes its own chunk files and manifest-rank<r>.json) and rank 0 merges. The merge reads the chunks in
order into OUTPUT (.npy: float32 (rows, dim) plus OUTPUT.ids.npy; .parquet: columns id int64, embedding
fixed_size_list<float32>), written to a temporary name and renamed, then removes OUTPUT.parts (--keep-parts keeps
it). Memory: one chunk at a time (the .npy is written through a memory map, the parquet one row group per chunk).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

FORMATS = ("text", "jsonl", "csv", "parquet")
OUTPUT_FORMATS = ("npy", "parquet")
BAD_LINE_RULES = ("skip", "zero", "error")
MANIFEST_VERSION = 1


class EmbedInputError(ValueError):
    """A problem with the job's input, output or options that the user must fix (the CLI exits with status 2)."""


@dataclass
class Record:
    number: int  # 1-based record number (the id)
    text: str | None  # None for a bad record
    error: str | None = None  # the reason a record is bad
    line: int | None = None  # the file line where it starts (csv), when it differs from `number`


def detect_format(path: str, fmt: str | None = None) -> str:
    if fmt not in (None, "auto"):
        if fmt not in FORMATS:
            raise EmbedInputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(
        ext, "text")


def detect_output_format(path: str, fmt: str | None = None) -> str:
    if fmt not in (None, "auto"):
        if fmt not in OUTPUT_FORMATS:
            raise EmbedInputError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        return "npy"
    if ext in (".parquet", ".pq"):
        return "parquet"
    raise EmbedInputError(f"--output {path!r}: cannot tell the format from the name (use .npy or .parquet, or "
                          "--output-format)")


def _check_text(number: int, text, field: str | None) -> Record:
    if text is None:
        return Record(number, None, f"missing field {field!r}" if field else "missing text")
    if not isinstance(text, str):
        return Record(number, None, f"field {field!r} is {type(text).__name__}, not a string")
    if not text.strip():
        return Record(number, None, "empty text")
    return Record(number, text)


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            yield n, raw.rstrip(b"\n").rstrip(b"\r")


def read_text(path: str) -> Iterator[Record]:
    for n, raw in _lines(path):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Record(n, None, f"invalid UTF-8 at byte {e.start}")
            continue
        yield _check_text(n, text, None)


def read_jsonl(path: str, field: str) -> Iterator[Record]:
    for n, raw in _lines(path):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Record(n, None, f"invalid UTF-8 at byte {e.start}")
            continue
        if not text.strip():
            yield Record(n, None, "empty line")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield Record(n, None, f"invalid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            yield Record(n, None, f"a JSON {type(obj).__name__}, not an object")
            continue
        yield _check_text(n, obj.get(field), field)


def read_csv(path: str, field: str) -> Iterator[Record]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # one text may be long; the tokenizer truncates it
    with open(path, "rb") as fb:
        f = io.TextIOWrapper(fb, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        if field not in header:
            raise EmbedInputError(f"{path}: no column {field!r} in the csv header (columns: {header}); "
                                  "name it with --field")
        col = header.index(field)
        start = reader.line_num + 1
        n = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # malformed quoting, a field past the size limit: the file cannot be read on
                raise EmbedInputError(f"{path}: line {reader.line_num}: {e}") from e
            n += 1
            line, start = start, reader.line_num + 1
            if col >= len(row):
                yield Record(n, None, f"missing field {field!r} (the row has {len(row)} fields)", line)
                continue
            text = row[col]
            if any("\udc80" <= c <= "\udcff" for c in text):
                yield Record(n, None, "invalid UTF-8", line)
                continue
            r = _check_text(n, text, field)
            r.line = line
            yield r


def read_parquet(path: str, field: str, batch_rows: int = 65536) -> Iterator[Record]:
    pq = _pyarrow_parquet("parquet input")
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise EmbedInputError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names}); name it with --field")
    n = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[field]):
        for v in batch.column(0).to_pylist():
            n += 1
            if isinstance(v, bytes):
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Record(n, None, f"invalid UTF-8 at byte {e.start}")
                    continue
            yield _check_text(n, v, field)


def read_records(path: str, fmt: str, field: str = "text") -> Iterator[Record]:
    if not os.path.isfile(path):
        raise EmbedInputError(f"--input {path!r}: no such file")
    if fmt == "text":
        return read_text(path)
    if fmt == "jsonl":
        return read_jsonl(path, field)
    if fmt == "csv":
        return read_csv(path, field)
    return read_parquet(path, field)


def chunked(records: Iterator[Record], size: int) -> Iterator[tuple[int, list[Record]]]:
    """(chunk index, its records) for consecutive runs of `size` records."""
    buf, k = [], 0
    for r in records:
        buf.append(r)
        if len(buf) == size:
            yield k, buf
            buf, k = [], k + 1
    if buf:
        yield k, buf


def _pyarrow_parquet(what: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise EmbedInputError(f"{what} needs pyarrow: pip install 'roberta_fast[embed]'") from e
    return pq


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


class PartStore:
    """OUTPUT.parts/: the chunk files and manifests of one job (see the module docstring)."""

    def __init__(self, output: str):
        self.output = output
        self.dir = output + ".parts"

    def chunk_path(self, k: int) -> str:
        return os.path.join(self.dir, f"chunk-{k:06d}.npz")

    def has(self, k: int) -> bool:
        return os.path.exists(self.chunk_path(k))

    def manifest_path(self, rank: int | None = None) -> str:
        return os.path.join(self.dir, "manifest.json" if rank is None else f"manifest-rank{rank}.json")

    def prepare(self, settings: dict, *, resume: bool, rank: int = 0, create: bool = True) -> None:
        """Create the parts folder (rank 0; `create`), or check on --resume that its settings are these."""
        main = self.manifest_path()
        if os.path.isdir(self.dir) and os.path.exists(main):
            old = json.load(open(main, encoding="utf-8")).get("settings")
            if not resume:
                raise EmbedInputError(f"{self.dir} holds parts of an earlier run: pass --resume to continue it, "
                                      "or delete the folder to start over")
            if old != settings:
                diff = sorted(k for k in set(old or {}) | set(settings) if (old or {}).get(k) != settings.get(k))
                raise EmbedInputError(f"--resume: {self.dir} was made with other settings ({', '.join(diff)} "
                                      "differ); delete it to start over")
            return
        if create:
            os.makedirs(self.dir, exist_ok=True)
            _atomic_json(main, {"version": MANIFEST_VERSION, "settings": settings, "num_chunks": None})

    def write_chunk(self, k: int, ids: np.ndarray, emb: np.ndarray, bad: list[Record]) -> None:
        tmp = self.chunk_path(k) + ".tmp.npz"
        np.savez(tmp, ids=ids.astype(np.int64), embeddings=emb.astype(np.float32, copy=False),
                 bad_ids=np.array([r.number for r in bad], dtype=np.int64),
                 bad_lines=np.array([r.line or r.number for r in bad], dtype=np.int64),
                 bad_reasons=np.array([r.error for r in bad], dtype=str))
        os.replace(tmp, self.chunk_path(k))

    def read_chunk(self, k: int):
        with np.load(self.chunk_path(k), allow_pickle=False) as z:
            return {name: z[name] for name in z.files}

    def record_progress(self, rank: int, done: list[int], num_chunks: int | None) -> None:
        _atomic_json(self.manifest_path(rank), {"rank": rank, "chunks_done": sorted(done), "num_chunks": num_chunks})

    def finish_manifest(self, num_chunks: int) -> None:
        m = json.load(open(self.manifest_path(), encoding="utf-8"))
        m["num_chunks"] = num_chunks
        _atomic_json(self.manifest_path(), m)

    def merge(self, num_chunks: int, out_format: str, dim: int, *, keep_parts: bool = False) -> dict:
        """Concatenate chunks 0..num_chunks-1 in order into the output (atomic rename); returns counts and the
        bad records [(id, line, reason)]."""
        missing = [k for k in range(num_chunks) if not self.has(k)]
        if missing:
            raise EmbedInputError(f"merge: chunk files missing in {self.dir}: {missing[:10]}"
                                  f"{' ...' if len(missing) > 10 else ''} (rerun with --resume)")
        rows = 0
        for k in range(num_chunks):
            with np.load(self.chunk_path(k), allow_pickle=False) as z:
                rows += int(z["ids"].shape[0])
        bad = []
        tmp = self.output + ".tmp" + (".npy" if out_format == "npy" else ".parquet")
        if out_format == "npy":
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
            ids = np.empty(rows, dtype=np.int64)
            at = 0
            for k in range(num_chunks):
                c = self.read_chunk(k)
                n = c["ids"].shape[0]
                arr[at:at + n] = c["embeddings"]
                ids[at:at + n] = c["ids"]
                at += n
                bad += list(zip(c["bad_ids"].tolist(), c["bad_lines"].tolist(), c["bad_reasons"].tolist()))
            arr.flush()
            del arr
            np.save(self.output + ".ids.tmp.npy", ids)
            os.replace(self.output + ".ids.tmp.npy", ids_path(self.output))
        else:
            import pyarrow as pa

            pq = _pyarrow_parquet("parquet output")
            schema = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), dim))])
            with pq.ParquetWriter(tmp, schema) as w:
                for k in range(num_chunks):
                    c = self.read_chunk(k)
                    flat = pa.array(c["embeddings"].reshape(-1), type=pa.float32())
                    emb = pa.FixedSizeListArray.from_arrays(flat, dim)
                    w.write_table(pa.Table.from_arrays([pa.array(c["ids"], pa.int64()), emb], schema=schema))
                    bad += list(zip(c["bad_ids"].tolist(), c["bad_lines"].tolist(), c["bad_reasons"].tolist()))
        os.replace(tmp, self.output)
        with open(bad_path(self.output) + ".tmp", "w", encoding="utf-8") as f:
            for i, line, why in bad:
                f.write(json.dumps({"id": i, "line": line, "reason": why}) + "\n")
        if bad:
            os.replace(bad_path(self.output) + ".tmp", bad_path(self.output))
        else:
            os.remove(bad_path(self.output) + ".tmp")
            if os.path.exists(bad_path(self.output)):
                os.remove(bad_path(self.output))
        if not keep_parts:
            shutil.rmtree(self.dir, ignore_errors=True)
        return {"rows": rows, "bad": bad}


def ids_path(output: str) -> str:
    return output + ".ids.npy" if not output.endswith(".npy") else output[:-4] + ".ids.npy"


def bad_path(output: str) -> str:
    return output + ".bad.jsonl"


def read_output(path: str):
    """(ids int64 (rows,), embeddings float32 (rows, dim)) of a merged output file."""
    if path.endswith(".npy"):
        return np.load(ids_path(path)), np.load(path)
    pq = _pyarrow_parquet("reading parquet output")
    t = pq.read_table(path)
    dim = t.schema.field("embedding").type.list_size
    emb = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return t.column("id").to_numpy(), emb
