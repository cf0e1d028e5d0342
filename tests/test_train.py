"""roberta_fast.train: data, batches, schedule, parameter groups, freezing, checkpoints (atomic writes,
corruption, exact resume), fp16 skipped steps, the output folder, the CLI's errors, the built-in task.

Models are tiny (2 layers, hidden 32-64, a word-level vocabulary of ~80) and run on CPU in fp32."""

import json
import os
import subprocess
import sys

import pytest
import torch

from roberta_fast.train import CheckpointError, DataError, TrainArgs, Trainer, builtin, checkpoint, data, optim


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random-init RoBERTa with its word-level tokenizer, and the built-in data of every task."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = builtin.make_model_dir(str(root / "model"), seed=0, hidden=32, layers=2, heads=2)
    files = {t: builtin.prepare(str(root / "data"), t, n_train=160, n_eval=40, model=False) for t in data.TASKS}
    return model_dir, files


def _args(tiny, tmp_path, task="seq-cls", **kw):
    model_dir, files = tiny
    base = dict(model_dir=model_dir, train=files[task]["train"], eval=files[task]["eval"], task=task,
                output=str(tmp_path / "out"), lr=1e-3, batch_tokens=256, dropout=0.0, progress=False, max_steps=6)
    base.update(kw)
    return TrainArgs(**base)


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _wordpiece(tmp_path):
    """A WordPiece tokenizer in which 'playing' is two sub-tokens (play, ##ing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "play", "##ing", "ball", "we", "like"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


# ------------------------------------------------------------------------------------------------ data


def test_read_rows_errors_name_file_and_line(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.read_rows(tmp_path / "nope.jsonl")
    bad = _write(tmp_path / "bad.jsonl", [{"text": "a", "label": 0}, "{not json"])
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        data.read_rows(bad)
    with pytest.raises(DataError, match="unknown data format"):
        data.read_rows(_write(tmp_path / "x.txt", ["a"]))
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,lab\nhello,1\n")
    tok = _wordpiece(tmp_path)
    with pytest.raises(DataError, match=r"d.csv:2: missing column 'label' \(columns here: lab, text\)"):
        data.load_dataset(csv_path, "seq-cls", tok, max_length=16)


def test_seq_cls_labels_names_and_ids(tmp_path):
    tok = _wordpiece(tmp_path)
    tr = _write(tmp_path / "tr.jsonl", [{"text": "we like ball", "label": "pos"},
                                        {"text": "we", "text_pair": "ball", "label": "neg"}])
    ds = data.load_dataset(tr, "seq-cls", tok, max_length=16)
    assert ds.labels.names == ["neg", "pos"] and [e.label for e in ds.examples] == [1, 0]
    assert ds.examples[1].type_ids == [0, 0, 0, 1, 1]  # the pair is encoded as a pair
    ev = _write(tmp_path / "ev.jsonl", [{"text": "we", "label": "pos"}, {"text": "ball", "label": "meh"}])
    with pytest.raises(DataError, match=r"ev.jsonl:2: label 'meh' is not one of the training labels"):
        data.load_dataset(ev, "seq-cls", tok, max_length=16, labels=ds.labels)
    ints = data.load_dataset(_write(tmp_path / "i.csv.jsonl", [{"text": "we", "label": 3}]), "seq-cls", tok,
                             max_length=16)
    assert ints.labels.num_labels == 4 and ints.examples[0].label == 3
    # truncation at the model's maximum
    long = data.load_dataset(_write(tmp_path / "l.jsonl", [{"text": "we " * 50, "label": 0}]), "seq-cls", tok,
                             max_length=8)
    assert len(long.examples[0].input_ids) == 8 and long.truncated == 1


def test_token_labels_first_subtoken_rule(tmp_path):
    tok = _wordpiece(tmp_path)
    f = _write(tmp_path / "t.jsonl", [{"tokens": ["we", "like", "playing", "ball"], "labels": ["O", "O", "V", "N"]}])
    ds = data.load_dataset(f, "token-cls", tok, max_length=16)
    names = ds.labels.names  # ['N', 'O', 'V']
    ex = ds.examples[0]
    assert ex.input_ids == [2, 7, 8, 4, 5, 6, 3]  # [CLS] we like play ##ing ball [SEP]
    o, v, n = names.index("O"), names.index("V"), names.index("N")
    assert ex.label == [-100, o, o, v, -100, n, -100]
    every = data.load_dataset(f, "token-cls", tok, max_length=16, label_all_subtokens=True).examples[0]
    assert every.label == [-100, o, o, v, v, n, -100]
    # text split on whitespace, and the per-token form (input_ids + labels used as given)
    g = _write(tmp_path / "g.jsonl", [{"text": "we ball", "labels": [0, 1]}, {"input_ids": [2, 7, 3],
                                                                             "labels": [-100, 1, -100]}])
    ds = data.load_dataset(g, "token-cls", tok, max_length=16)
    assert ds.examples[0].label == [-100, 0, 1, -100] and ds.examples[1].label == [-100, 1, -100]
    bad = _write(tmp_path / "b.jsonl", [{"tokens": ["we", "like"], "labels": ["O"]}])
    with pytest.raises(DataError, match=r"b.jsonl:1: 2 words but 1 labels"):
        data.load_dataset(bad, "token-cls", tok, max_length=16)


def test_qa_spans(tmp_path):
    tok = _wordpiece(tmp_path)
    rows = [{"question": "we like", "context": "we like playing ball", "answer_text": "playing", "answer_start": 8},
            {"question": "we", "context": "ball we like", "answers": {"text": ["like"], "answer_start": [8]}},
            {"question": "we", "context": "ball we like ball", "answer_text": "ball"}]
    ds = data.load_dataset(_write(tmp_path / "q.jsonl", rows), "qa", tok, max_length=32)
    e0 = ds.examples[0]  # [CLS] we like [SEP] we like play ##ing ball [SEP]
    assert e0.label == (6, 7) and e0.input_ids[6:8] == [4, 5]  # play ##ing
    assert ds.examples[1].label == (5, 5) and ds.examples[2].label == (3, 3)  # [CLS] we [SEP] ball we like; first
    cut = data.load_dataset(_write(tmp_path / "c.jsonl", rows[:1]), "qa", tok, max_length=7)
    assert cut.examples[0].label == (0, 0)  # the answer was truncated away
    bad = _write(tmp_path / "bad.jsonl", [{"question": "q", "context": "we like", "answer_text": "like",
                                           "answer_start": 0}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: answer_start 0 does not point at 'like'"):
        data.load_dataset(bad, "qa", tok, max_length=16)
    assert data.answer_f1("the ball", "ball") == 1.0 and data.normalize_answer("The  Ball!") == "ball"


def test_plan_batches_budget_cover_and_determinism():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (500,), generator=g).tolist()
    plan = data.plan_batches(lengths, 256, seed=1, epoch=0)
    flat = sorted(i for b in plan for i in b)
    assert flat == list(range(500))  # every example once
    for b in plan:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 256
    assert plan == data.plan_batches(lengths, 256, seed=1, epoch=0)
    assert plan != data.plan_batches(lengths, 256, seed=1, epoch=1)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in plan)
    assert padded < 1.1 * sum(lengths)  # similar lengths together: little padding
    two = data.plan_batches(lengths, 512, seed=1, epoch=0, min_size=2)
    assert min(len(b) for b in two) >= 2
    shards = [data.shard(two[0], r, 2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(two[0])
    with pytest.raises(ValueError, match="budget"):
        data.plan_batches(lengths, 0)


# ------------------------------------------------------------------------------------------------ optimizer


def test_schedule_groups_and_freezing(tiny):
    sched = optim.LinearWarmupDecay(4, 10)
    assert [round(sched(s), 4) for s in (0, 2, 4, 7, 10, 12)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    import roberta_fast as rf

    m = rf.RobertaForSequenceClassification.from_pretrained(tiny[0], num_labels=3)
    groups = optim.param_groups(m, 0.01)
    decay = {id(p) for p in groups[0]["params"]}
    for name, p in m.named_parameters():
        assert (id(p) in decay) == (p.dim() >= 2), name  # biases and LayerNorm weights: no decay
    assert groups[1]["weight_decay"] == 0.0
    frozen = optim.freeze(m, embeddings=True, layers=1)
    assert frozen and all(".embeddings." in n or ".encoder.layer.0." in n for n in frozen)
    for name, p in m.named_parameters():
        assert p.requires_grad == (name not in frozen)
    assert any(".encoder.layer.1." in n for n, p in m.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="freeze_layers must be in"):
        optim.freeze(m, layers=3)


def test_frozen_parameters_do_not_change(tiny, tmp_path):
    tr = Trainer(_args(tiny, tmp_path, freeze_embeddings=True, freeze_layers=1, max_steps=3, eval=None))
    before = {n: p.detach().clone() for n, p in tr.raw.named_parameters()}
    tr.fit()
    for n, p in tr.raw.named_parameters():
        same = torch.equal(before[n], p.detach())
        assert same == (n in tr.frozen), n


# ------------------------------------------------------------------------------------------------ checkpoints


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.pt"
    checkpoint.atomic_save({"a": 1}, path)

    def boom(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(path, boom)
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert os.listdir(tmp_path) == ["f.pt"]  # no temporary file left


def test_corrupt_checkpoints_are_reported_by_file(tiny, tmp_path):
    Trainer(_args(tiny, tmp_path, max_steps=2, eval=None)).fit()
    root = tmp_path / "out" / "checkpoints"
    (step, path), = checkpoint.list_checkpoints(root)
    assert step == 2 and checkpoint.verify(path)["step"] == 2
    model = os.path.join(path, "model.pt")
    blob = open(model, "rb").read()
    with open(model, "wb") as f:  # truncated
        f.write(blob[:100])
    with pytest.raises(CheckpointError, match=r"model.pt has 100 bytes, the manifest says"):
        checkpoint.newest(root)
    with open(model, "wb") as f:  # same size, one byte changed
        f.write(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(CheckpointError, match=r"model.pt sha256 .* does not match"):
        checkpoint.verify(path)
    with open(model, "wb") as f:
        f.write(blob)
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(CheckpointError, match=r"manifest.json is missing"):
        checkpoint.newest(root)
    # --resume on it: a clear error, not a silent load (the CLI exits 2)
    with pytest.raises(CheckpointError, match="manifest.json"):
        Trainer(_args(tiny, tmp_path, max_steps=4, eval=None, resume=True)).fit()


def test_crash_while_saving_leaves_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    args = _args(tiny, tmp_path, max_steps=6, save_every=2, eval=None)
    real = checkpoint.atomic_save

    def failing(obj, path):
        if "step-00000004.tmp" in str(path) and str(path).endswith("optimizer.pt"):
            raise KeyboardInterrupt("killed while saving")
        return real(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_save", failing)
    with pytest.raises(KeyboardInterrupt):
        Trainer(args).fit()
    root = tmp_path / "out" / "checkpoints"
    assert [s for s, _ in checkpoint.list_checkpoints(root)] == [2]
    assert checkpoint.partial_checkpoints(root)  # the unfinished step-4 directory, never loaded
    with pytest.warns(UserWarning, match="ignoring unfinished checkpoint .*step-00000004.tmp"):
        assert checkpoint.newest(root)[0] == 2


@pytest.mark.parametrize("task", ["seq-cls", "token-cls"])
def test_resume_gives_the_same_loss_curve(tiny, tmp_path, task):
    """An uninterrupted run against one killed (an exception) after step 7 and resumed from its step-6
    checkpoint: the same per-step losses, bit for bit on CPU fp32, dropout on (the RNG states are restored),
    and the same final weights."""
    kw = dict(task=task, max_steps=10, save_every=3, dropout=0.1, keep_checkpoints=5, accumulation=2)
    full = Trainer(_args(tiny, tmp_path / "a", **kw)).fit()

    def crash(step, loss):
        if step == 7:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(_args(tiny, tmp_path / "b", **kw), on_step=crash).fit()
    resumed = Trainer(_args(tiny, tmp_path / "b", resume=True, **kw)).fit()
    assert resumed.resumed_from.endswith("step-00000006")
    assert [s for s, _ in resumed.losses] == [7, 8, 9, 10]
    assert full.losses[6:] == resumed.losses
    rows = [json.loads(x) for x in open(tmp_path / "b" / "out" / "metrics.jsonl")]
    curve = [r["loss"] for r in rows if r["type"] == "train"]
    assert curve == [loss for _, loss in full.losses]  # the interrupted run's rows after step 6 were dropped
    a = torch.load(tmp_path / "a" / "out" / "checkpoints" / "step-00000010" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "out" / "checkpoints" / "step-00000010" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_different_batches(tiny, tmp_path):
    Trainer(_args(tiny, tmp_path, max_steps=2, eval=None)).fit()
    with pytest.raises(ValueError, match=r"seed: checkpoint 42, now 7"):
        Trainer(_args(tiny, tmp_path, max_steps=2, eval=None, seed=7, resume=True)).fit()


def test_fp16_overflow_steps_are_skipped_and_counted(tiny, tmp_path):
    tr = Trainer(_args(tiny, tmp_path, precision="fp16", eval=None))
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # the first steps overflow
    before = {n: p.detach().clone() for n, p in tr.raw.named_parameters()}
    plan = tr._plan(0)
    r = tr.train_step(plan[:1])
    assert r["skipped"] and tr.scaler.get_scale() < 2.0**60
    assert all(torch.equal(before[n], p.detach()) for n, p in tr.raw.named_parameters())


# ------------------------------------------------------------------------------------------------ outputs


def test_output_loads_in_transformers_and_ours(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    import roberta_fast as rf

    res = Trainer(_args(tiny, tmp_path, max_steps=3)).fit()
    out = res.output
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.jsonl",
              "training_args.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3]
    assert {"loss", "lr", "tokens_per_s", "skipped_steps"} <= set(rows[0]) and rows[-1]["type"] == "eval"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ours = rf.RobertaForSequenceClassification.from_pretrained(out)
    assert hf.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    ids = torch.tensor([[0, 10, 20, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_optimized_transformers_model_trains(tiny, tmp_path):
    pytest.importorskip("transformers")
    res = Trainer(_args(tiny, tmp_path, task="qa", hf=True, max_steps=3)).fit()
    assert len(res.losses) == 3 and all(loss > 0 for _, loss in res.losses)
    assert {"exact_match", "f1"} <= set(res.eval[-1])


# ------------------------------------------------------------------------------------------------ CLI


def _cli(*argv):
    from roberta_fast import cli

    return cli.main(["finetune", *map(str, argv)])


def test_cli_errors_exit_2(tiny, tmp_path, capsys):
    model_dir, files = tiny
    assert _cli(model_dir, "--train", tmp_path / "missing.jsonl", "--output", tmp_path / "o") == 2
    assert "--train file" in capsys.readouterr().err
    assert _cli(model_dir, "--train", files["seq-cls"]["train"], "--task", "ner", "--output", tmp_path / "o") == 2
    assert "unknown task 'ner'" in capsys.readouterr().err
    bad = _write(tmp_path / "bad.jsonl", [{"text": "a", "label": 0}, {"sentence": "b", "label": 1}])
    assert _cli(model_dir, "--train", bad, "--output", tmp_path / "o", "--no-progress") == 2
    assert "bad.jsonl:2: missing column 'text'" in capsys.readouterr().err
    assert _cli(tmp_path / "nomodel", "--train", bad, "--output", tmp_path / "o") == 2
    assert "is not a directory" in capsys.readouterr().err
    assert _cli("--train", bad, "--output", tmp_path / "o") == 2
    assert "MODEL_DIR is required" in capsys.readouterr().err


def test_cli_runs(tiny, tmp_path, capsys):
    model_dir, files = tiny
    rc = _cli(model_dir, "--train", files["token-cls"]["train"], "--eval", files["token-cls"]["eval"], "--task",
              "token-cls", "--output", tmp_path / "o", "--max-steps", "2", "--batch-tokens", "256", "--lr", "1e-3",
              "--precision", "bf16", "--no-progress")
    assert rc == 0
    assert "token_accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tiny, tmp_path):
    """A CLI run killed with SIGKILL once it has logged step 9 (maybe while writing a checkpoint), then resumed
    with --resume, gives the loss curve of an uninterrupted run (both in fresh processes, one thread, CPU fp32)."""
    import signal
    import time

    model_dir, files = tiny
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def cmd(out, *extra):
        return [sys.executable, "-m", "roberta_fast.cli", "finetune", model_dir, "--train", files["seq-cls"]["train"],
                "--output", str(out), "--max-steps", "24", "--batch-tokens", "128", "--lr", "1e-3", "--save-every",
                "2", "--no-progress", "--device", "cpu", "--keep-checkpoints", "3", *extra]

    def curve(out):
        return [(r["step"], r["loss"]) for r in map(json.loads, open(out / "metrics.jsonl")) if r["type"] == "train"]

    p = subprocess.run(cmd(tmp_path / "full"), capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(cmd(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (cut / "metrics.jsonl").exists() and len(curve(cut)) >= 9:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(curve(cut)) < 24
    p = subprocess.run(cmd(cut, "--resume"), capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr
    assert curve(cut) == curve(tmp_path / "full")


@pytest.mark.slow
def test_builtin_task_reaches_high_accuracy(tmp_path):
    """`roberta-fast finetune --builtin` end to end in a fresh process (CPU, one thread): the tiny RoBERTa learns
    the built-in sentiment-word task (roberta_fast/train/builtin.py says what it learns and why it is learnable)
    to >= 95% accuracy on fresh sentences within two minutes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "b"
    p = subprocess.run([sys.executable, "-m", "roberta_fast.cli", "finetune", "--builtin", "--output", str(out),
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    final = [r for r in rows if r["type"] == "eval"][-1]
    assert final["accuracy"] >= 0.95, final
