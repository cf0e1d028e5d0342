"""Data-parallel fine-tuning: `torchrun --nproc-per-node 2 roberta-fast finetune ...` with gloo on CPU gives the
loss curve of a single-process run with the same global batch (2 x --batch-tokens), within fp32 reduction-order
tolerance; then the 2-process run resumes from its own checkpoint.

Each rank takes its shard of every global batch (roberta_fast/train/data.py: plan_batches + shard) and its loss
is the sum over its examples divided by the global count, times the world size (DDP averages gradients), so the
gradient is the global batch's. Dropout is off: each rank draws its own dropout masks."""

import json
import os
import socket
import subprocess
import sys

import pytest

from roberta_fast.train import TrainArgs, Trainer, builtin


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _curve(path):
    rows = [json.loads(x) for x in open(path)]
    return [(r["step"], r["loss"]) for r in rows if r["type"] == "train"]


def test_two_ranks_match_one_process(tmp_path):
    model_dir = builtin.make_model_dir(str(tmp_path / "model"), seed=0, hidden=32, layers=2, heads=2)
    files = builtin.prepare(str(tmp_path / "data"), "token-cls", n_train=96, n_eval=12, model=False)
    common = ["--task", "token-cls", "--max-steps", "6", "--lr", "1e-3", "--dropout", "0", "--accumulation", "2",
              "--save-every", "3", "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "roberta_fast.cli", "finetune", model_dir,
           "--train", files["train"], "--eval", files["eval"], "--output", str(tmp_path / "ddp"),
           "--batch-tokens", "128", *common]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]

    single = Trainer(TrainArgs(model_dir=model_dir, train=files["train"], eval=files["eval"], task="token-cls",
                               output=str(tmp_path / "one"), max_steps=6, lr=1e-3, dropout=0.0, accumulation=2,
                               batch_tokens=256, progress=False)).fit()
    ddp = _curve(tmp_path / "ddp" / "metrics.jsonl")
    assert [s for s, _ in ddp] == [s for s, _ in single.losses] == list(range(1, 7))
    for (step, a), (_, b) in zip(ddp, single.losses):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: 2 ranks {a!r}, one process {b!r}"
    evals = [json.loads(x) for x in open(tmp_path / "ddp" / "metrics.jsonl") if '"eval"' in x]
    assert evals and abs(evals[-1]["loss"] - single.eval[-1]["loss"]) <= 1e-5 * single.eval[-1]["loss"]
    assert os.path.isfile(tmp_path / "ddp" / "checkpoints" / "step-00000006" / "rng-rank1.pt")
    assert os.path.isfile(tmp_path / "ddp" / "model.safetensors")


@pytest.mark.slow
def test_two_ranks_resume(tmp_path):
    """The 2-process run, stopped after its step-3 checkpoint and resumed, continues the uninterrupted curve."""
    model_dir = builtin.make_model_dir(str(tmp_path / "model"), seed=0, hidden=32, layers=2, heads=2)
    files = builtin.prepare(str(tmp_path / "data"), "seq-cls", n_train=96, n_eval=12, model=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(out, steps, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "roberta_fast.cli", "finetune", model_dir, "--train",
               files["train"], "--output", str(out), "--batch-tokens", "128", "--max-steps", str(steps), "--lr",
               "1e-3", "--save-every", "3", "--no-progress", "--device", "cpu", "--keep-checkpoints", "5", *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert p.returncode == 0, p.stderr[-4000:]

    run(tmp_path / "full", 6)
    run(tmp_path / "cut", 6)
    # drop the newest checkpoint: the resumed run starts from step 3
    import shutil

    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000006")
    run(tmp_path / "cut", 6, "--resume")
    assert _curve(tmp_path / "cut" / "metrics.jsonl") == _curve(tmp_path / "full" / "metrics.jsonl")


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes(tmp_path):
    """--fsdp (FSDP2, one unit per encoder layer) with 2 gloo ranks on CPU: the single-process loss curve, and a
    resume from its step-2 checkpoint continues it exactly."""
    model_dir = builtin.make_model_dir(str(tmp_path / "model"), seed=0, hidden=32, layers=2, heads=2)
    files = builtin.prepare(str(tmp_path / "data"), "seq-cls", n_train=96, n_eval=12, model=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "roberta_fast.cli", "finetune", model_dir, "--train",
               files["train"], "--output", str(tmp_path / "fsdp"), "--batch-tokens", "128", "--max-steps", "4",
               "--lr", "1e-3", "--dropout", "0", "--save-every", "2", "--no-progress", "--device", "cpu", "--fsdp",
               "--keep-checkpoints", "5", *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert p.returncode == 0, p.stderr[-4000:]
        return _curve(tmp_path / "fsdp" / "metrics.jsonl")

    full = run()
    single = Trainer(TrainArgs(model_dir=model_dir, train=files["train"], task="seq-cls", output=str(tmp_path / "one"),
                               max_steps=4, lr=1e-3, dropout=0.0, batch_tokens=256, progress=False)).fit()
    for (step, a), (_, b) in zip(full, single.losses):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: fsdp {a!r}, one process {b!r}"
    import shutil

    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-00000004")
    assert run("--resume") == full
    from roberta_fast import RobertaForSequenceClassification

    RobertaForSequenceClassification.from_pretrained(str(tmp_path / "fsdp"))  # the gathered output loads
