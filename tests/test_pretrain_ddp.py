"""Data-parallel pretraining: `torchrun --nproc-per-node 2 roberta-fast pretrain ...` with gloo on CPU gives the loss
curve of a single-process run with the same global batch, within fp32 reduction-order tolerance (1e-5 relative).

A step of the 2-rank run takes 2 micro-batches of --batch-tokens from the stream (every rank reads both; rank r
trains on micro-batch r); the single process takes the same 2 as accumulation 2. Micro-batch j of step s is masked
with step index 2 s + j in both, and the loss of a step is the sum of the masked tokens' cross entropies over both
micro-batches divided by their global count (times the world size under DDP, which averages gradients), so the
gradients and the curve are the same. Dropout is off (each rank draws its own dropout masks)."""

import itertools
import json
import os
import socket
import subprocess
import sys

import pytest

from roberta_fast.pretrain import PretrainArgs, Pretrainer, builtin_documents

pytest.importorskip("tokenizers")

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _curve(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(path)) if r["type"] == "train"]


@pytest.mark.slow  # 29-43 s on the 2-core machine under loads of 6-8 (two process starts, two runs)
def test_two_ranks_match_one_process(tmp_path):
    corpus = tmp_path / "corpus"  # the built-in corpus's first modules: enough text for 6 steps of 2 x 128 tokens
    corpus.mkdir()
    for name, docs in itertools.islice(builtin_documents(), 6):
        (corpus / f"{name}.txt").write_text("\n\n".join(docs), encoding="utf-8")
    corpus = str(corpus)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(SMALL))
    common = dict(corpus=corpus, model=str(cfg), vocab_size=300, max_seqlen=32, batch_tokens=128, max_steps=6,
                  lr=3e-3, dropout=0.0, save_every=3, device="cpu")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "roberta_fast.cli", "pretrain", "--output",
           str(tmp_path / "ddp"), "--no-progress", *flags]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]

    single = Pretrainer(PretrainArgs(output=str(tmp_path / "one"), accumulation=2, progress=False, **common),
                        log=lambda msg: None).fit()
    ddp = _curve(tmp_path / "ddp" / "metrics.jsonl")
    assert [s for s, _ in ddp] == [s for s, _ in single.losses] == list(range(1, 7))
    for (step, a), (_, b) in zip(ddp, single.losses):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: 2 ranks {a!r}, one process {b!r}"
    # both trained on the same tokens and masked targets: the summaries' unigram entropies agree exactly
    summary = [r for r in map(json.loads, open(tmp_path / "ddp" / "metrics.jsonl")) if r["type"] == "summary"]
    assert summary[-1]["unigram_entropy"] == pytest.approx(single.unigram_entropy, rel=1e-12)
    assert os.path.isfile(tmp_path / "ddp" / "checkpoints" / "step-00000006" / "rng-rank1.pt")
    assert (tmp_path / "ddp" / "tokenizer.json").read_text() == (tmp_path / "one" / "tokenizer.json").read_text()
    assert os.path.isfile(tmp_path / "ddp" / "model.safetensors")
