"""The training-step suite of the harness (benchmarks/bench_train.py) on the CPU: its rows are valid results,
each provider takes a real optimizer step, the speedups are computed against the same run's baselines, and
the per-layer launch counter counts the backward too."""

import pytest
import torch
from roberta_fast.benchmarks import bench_train, report
from roberta_fast.benchmarks.common import Budget


def test_step_updates_the_weights_and_returns_the_loss():
    torch.manual_seed(0)
    fn_layers = bench_train._tiny_fwd_bwd("rf", 1)
    step = fn_layers.args[0]
    before = {n: p.detach().clone() for n, p in step.model.named_parameters()}
    loss = step()
    assert loss.ndim == 0 and torch.isfinite(loss)
    changed = [n for n, p in step.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(changed) == len(before), "an AdamW step moves every trainable weight"
    assert all(p.grad is None for p in step.model.parameters()), "the step leaves no gradients behind"


def test_launch_counter_sees_the_backward():
    fwd_bwd = bench_train._tiny_fwd_bwd("hf_eager", 1)
    fwd_bwd()
    ops = bench_train.count_step_ops(fwd_bwd)
    assert any(name.endswith("_backward") for name in ops), sorted(ops)
    counts = bench_train.launches_per_layer(["hf_eager", "rf"])
    assert set(counts) == {"hf_eager", "rf"}
    assert all(isinstance(v, int) and v > 10 for v in counts.values()), counts


def test_run_train_quick_rows_are_valid():
    notes = []
    rows = bench_train.run_train(device=torch.device("cpu"), model="roberta-base-2layers", dtypes=[torch.float32],
                                 quick=True, budget=Budget(None), rep_ms=1.0, progress=False, notes=notes)
    assert [r["provider"] for r in rows] == ["hf_eager", "hf_sdpa", "rf"], notes
    doc_problems = report.validate({"rows": rows})
    assert not [p for p in doc_problems if p.startswith("rows")], doc_problems
    for r in rows:
        assert r["error"] is None, r
        assert r["ms_p50"] > 0 and r["tokens_per_s"] == pytest.approx(r["real_tokens"] / (r["ms_p50"] / 1e3))
        assert 0 < r["loss"] < 5  # two labels: cross-entropy near log 2 at random init
    eager = next(r for r in rows if r["provider"] == "hf_eager")
    assert eager["speedup"] == pytest.approx(1.0)
    md = report.to_markdown({"rows": rows, "env": {}, "ceilings": {}, "mode": "cpu-reduced", "notes": []})
    assert "## Training step" in md and "| rf |" in md


def test_unknown_provider_is_named():
    with pytest.raises(ValueError, match="provider: unknown 'jax'"):
        bench_train.build("jax", None, torch.device("cpu"))
