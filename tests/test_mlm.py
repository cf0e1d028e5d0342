"""Masked-LM parity with transformers in training: the loss and every parameter's gradient of
RobertaForMaskedLM / BertForMaskedLM equal transformers' on the same dynamically masked batch (fp32, 1e-5
relative), with the fused masked-only head (ops.linear_cross_entropy) on and off; the fused head makes no
(tokens x vocab) tensor."""

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from roberta_fast import BertForMaskedLM, RobertaForMaskedLM  # noqa: E402
from roberta_fast.data import MLMCollator  # noqa: E402

VOCAB = 1003  # odd, and larger than anything else in the model, so (tokens x vocab) is the largest possible tensor


def _config(family):
    roberta = family == "roberta"
    cls = transformers.RobertaConfig if roberta else transformers.BertConfig
    return cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=40 + (2 if roberta else 0), type_vocab_size=1 if roberta else 2,
               pad_token_id=1 if roberta else 0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               attn_implementation="eager")


def _models(family, tmp_path):
    cfg = _config(family)
    torch.manual_seed(0)
    hf_cls = transformers.RobertaForMaskedLM if family == "roberta" else transformers.BertForMaskedLM
    hf = hf_cls(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(str(tmp_path))
    ours = (RobertaForMaskedLM if family == "roberta" else BertForMaskedLM).from_pretrained(str(tmp_path))
    return hf.train(), ours.train(), cfg


def _masked_batch(cfg, B=4, S=24, step=0):
    """RoBERTa-style: <s> tokens </s> then padding, masked by the collator (80/10/10, 15%)."""
    g = torch.Generator().manual_seed(3)
    pad, bos, eos, mask_id = cfg.pad_token_id, 0 if cfg.pad_token_id == 1 else 101, 2 if cfg.pad_token_id == 1 \
        else 102, VOCAB - 1
    lengths = torch.tensor([S, S - 5, 9, S - 1])[:B]
    ids = torch.randint(5, VOCAB - 1, (B, S), generator=g)
    pos = torch.arange(S)[None]
    ids[:, 0] = bos
    ids = torch.where(pos == lengths[:, None] - 1, eos, ids)
    am = (pos < lengths[:, None]).long()
    ids = torch.where(am.bool(), ids, pad)
    col = MLMCollator(VOCAB, mask_id, (bos, eos, pad), pad_token_id=pad, seed=5, mlm_probability=0.3)
    inputs, labels = col(ids, step=step, attention_mask=am)
    assert (labels != -100).sum() > 5
    return inputs, am, labels


def _close(ours, ref, name, rtol=1e-5, floor=1e-12):
    """max|ours - ref| <= rtol * max|ref| + floor: 1e-5 relative to the tensor's scale (elements near zero carry
    fp32 summation noise of the scale, not of themselves). floor: for gradients that are zero in exact arithmetic
    (the attention's key bias: softmax ignores a constant per row), 1e-8 of the largest gradient of the model."""
    ref = ref.double()
    err = (ours.double() - ref).abs().max()
    scale = ref.abs().max()
    assert err <= rtol * scale + floor, f"{name}: max error {err:.3e} > {rtol} * max|ref| {scale:.3e} + {floor:.1e}"


@pytest.mark.parametrize("family", ["roberta", "bert"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_loss_and_gradients_equal_transformers(tmp_path, family, fused):
    hf, ours, cfg = _models(family, tmp_path)
    ours.fused_loss = fused
    inputs, am, labels = _masked_batch(cfg)
    a = hf(input_ids=inputs, attention_mask=am, labels=labels)
    o = ours(input_ids=inputs, attention_mask=am, labels=labels)
    a.loss.backward()
    o.loss.backward()
    _close(o.loss.detach(), a.loss.detach(), "loss")
    assert (o.logits is None) == fused
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    floor = 1e-8 * max(float(g.abs().max()) for g in hf_grads.values() if g is not None)
    n_checked = 0
    for n, p in ours.named_parameters():
        if n not in hf_grads or hf_grads[n] is None:
            continue
        assert p.grad is not None, f"{n}: no gradient"
        _close(p.grad, hf_grads[n], n, floor=floor)
        n_checked += 1
    assert n_checked >= 20


def test_logits_contract(tmp_path):
    """Default (fused_loss False): logits in training too, as transformers. Fused: logits None (loss only) in
    training with labels; logits as transformers' with return_logits=True, in eval mode, or without labels."""
    hf, ours, cfg = _models("roberta", tmp_path)
    inputs, am, labels = _masked_batch(cfg)
    assert ours.fused_loss is False
    default = ours(input_ids=inputs, attention_mask=am, labels=labels)
    assert default.logits.shape == (*inputs.shape, VOCAB)
    ours.fused_loss = True
    fused = ours(input_ids=inputs, attention_mask=am, labels=labels)
    torch.testing.assert_close(default.loss, fused.loss, rtol=1e-5, atol=1e-6)
    assert fused.logits is None and fused.loss.dim() == 0
    tup = ours(input_ids=inputs, attention_mask=am, labels=labels, return_dict=False)
    assert len(tup) == 1 and torch.equal(tup[0], fused.loss)
    full = ours(input_ids=inputs, attention_mask=am, labels=labels, return_logits=True)
    assert full.logits.shape == (*inputs.shape, VOCAB)
    torch.testing.assert_close(full.loss, fused.loss, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ref = hf(input_ids=inputs, attention_mask=am, labels=labels)
        ev = ours.eval()(input_ids=inputs, attention_mask=am, labels=labels)
    assert ev.logits is not None
    real = am.bool()
    torch.testing.assert_close(ev.logits[real], ref.logits[real], rtol=1e-4, atol=1e-5)
    assert ours.train()(input_ids=inputs, attention_mask=am).logits is not None


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_fused_head_makes_no_tokens_by_vocab_tensor(tmp_path):
    _, ours, cfg = _models("roberta", tmp_path)
    inputs, am, labels = _masked_batch(cfg)
    masked = int((labels != -100).sum())
    sizes = {}
    for fused in (True, False):
        ours.fused_loss = fused
        ours.zero_grad()
        with _Largest() as mode:
            ours(input_ids=inputs, attention_mask=am, labels=labels).loss.backward()
        sizes[fused] = mode.largest
    tokens = inputs.numel()
    assert sizes[False] >= tokens * VOCAB  # transformers' path: the full logits
    # ours: nothing larger than the tied embedding's own gradient (vocab x hidden), which every path makes
    assert sizes[True] <= VOCAB * cfg.hidden_size < tokens * VOCAB
    assert masked > 0
