"""Fine-tuning parity with transformers: 20 steps from the same initial weights on the same batches, for every
head (seq-cls, token-cls, qa), through the same Trainer (same batches, loss, AdamW, schedule, clipping).

- fp32 on CPU: the per-step losses agree within 1e-5 relative. Dropout is off (dropout=0 in the config):
  our dropout and transformers' draw different masks from the same seed, so only dropout-free runs can be
  compared step by step (resume equality with dropout on is tests/test_train.py's).
- bf16 autocast: the accuracy rule (roberta_fast.testing.assert_rule) against a float64 transformers run on the
  same batches: after 20 steps our logits (real tokens) may be at most 2x as far from float64 as transformers'
  own bf16 logits (+ the bf16 floor); the loss curve likewise.

The QA loss masks padded positions in both (the Trainer's loss; transformers' own QA loss would let padding
compete, see trainer.py), so padding-free and padded models see the same loss.
"""

import pytest
import torch

from roberta_fast.testing import assert_rule
from roberta_fast.train import TrainArgs, Trainer, builtin, data

transformers = pytest.importorskip("transformers")

HEADS = {"seq-cls": "RobertaForSequenceClassification", "token-cls": "RobertaForTokenClassification",
         "qa": "RobertaForQuestionAnswering"}
NUM_LABELS = {"seq-cls": 3, "token-cls": 3, "qa": 2}


@pytest.fixture(scope="module", params=list(HEADS))
def setup(request, tmp_path_factory):
    task = request.param
    root = tmp_path_factory.mktemp(task)
    cfg = transformers.RobertaConfig(vocab_size=len(builtin.VOCAB), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=66,
                                     type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5,
                                     num_labels=NUM_LABELS[task])
    torch.manual_seed(0)
    hf = getattr(transformers, HEADS[task])(cfg)
    model_dir = str(root / "model")
    hf.save_pretrained(model_dir)
    builtin.make_tokenizer().save(str(root / "model" / "tokenizer.json"))
    files = builtin.prepare(str(root / "data"), task, n_train=160, n_eval=16, model=False)
    return task, model_dir, files


def _run(setup, tmp_path, model, name, precision="fp32"):
    task, model_dir, files = setup
    args = TrainArgs(model_dir=model_dir, train=files["train"], task=task, output=str(tmp_path / name), lr=3e-3,
                     warmup_steps=3, batch_tokens=192, max_steps=20, precision=precision, progress=False,
                     keep_checkpoints=1)
    tr = Trainer(args, model=model)
    res = tr.fit()
    assert [s for s, _ in res.losses] == list(range(1, 21))
    return tr, [loss for _, loss in res.losses]


def _ours(model_dir, task):
    import roberta_fast as rf

    cls = {"seq-cls": rf.RobertaForSequenceClassification, "token-cls": rf.RobertaForTokenClassification,
           "qa": rf.RobertaForQuestionAnswering}[task]
    return cls.from_pretrained(model_dir, dtype=torch.float32)


def _hf(model_dir, task, dtype=torch.float32):
    return getattr(transformers, HEADS[task]).from_pretrained(model_dir).to(dtype)


def _logits(tr, precision):
    """Logits of the first 16 evaluation examples, real tokens only, as one flat tensor."""
    ds = data.load_dataset(tr.args.train, tr.args.task, tr.tokenizer, max_length=tr.max_length,
                           labels=tr.train_ds.labels)
    batch = data.collate(ds.examples[:16], tr.args.task, tr.pad_id, tr.use_type_ids)
    tr.raw.eval()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        out = tr.raw(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    real = batch["attention_mask"].bool()
    if tr.args.task == "seq-cls":
        return out.logits
    if tr.args.task == "token-cls":
        return out.logits[real]
    return torch.cat([out.start_logits[real], out.end_logits[real]])


def test_fp32_losses_match_transformers(setup, tmp_path):
    task, model_dir, _ = setup
    init = _hf(model_dir, task).state_dict()
    ours_tr, ours = _run(setup, tmp_path, _ours(model_dir, task), "ours")
    _, theirs = _run(setup, tmp_path, _hf(model_dir, task), "hf")
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: ours {a!r} transformers {b!r} ({abs(a - b) / abs(b):.2e})"
    # every trained weight moved (weights are not compared element by element: Adam's update is ~lr whatever
    # the gradient's size, so a near-zero gradient that differs in the last bit can move an element either way)
    moved = [n for n, w in ours_tr.raw.state_dict().items() if n in init and not torch.equal(w, init[n])]
    assert len(moved) >= len([n for n, _ in ours_tr.raw.named_parameters()]) - 2, sorted(set(init) - set(moved))


def test_bf16_autocast_within_the_rule(setup, tmp_path):
    task, model_dir, _ = setup
    ref_tr, ref = _run(setup, tmp_path, _hf(model_dir, task, torch.float64), "ref64")
    ours_tr, ours = _run(setup, tmp_path, _ours(model_dir, task), "ours16", "bf16")
    hf_tr, theirs = _run(setup, tmp_path, _hf(model_dir, task), "hf16", "bf16")
    ref_logits = _logits(ref_tr, "fp32")
    assert ref_logits.dtype == torch.float64
    assert_rule(_logits(ours_tr, "bf16"), ref_logits, _logits(hf_tr, "bf16"), name=f"{task} logits after 20 steps")
    assert_rule(torch.tensor(ours), torch.tensor(ref), torch.tensor(theirs), name=f"{task} losses", floor=8e-3)
