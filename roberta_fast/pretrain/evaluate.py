"""What a pretrained checkpoint has learned: its masked-LM loss on a corpus against the best loss that ignores the
context.

    from roberta_fast.pretrain.evaluate import mlm_eval
    r = mlm_eval("out", "held_out_texts/")   # {"loss", "unigram_entropy", "unigram_cross_entropy", "targets", ...}

The positions are chosen as in training (RoBERTa's 15% of the ordinary tokens, seeded) but every chosen token is
replaced by `<mask>` (mask_prob 1): the input never shows the answer, so the loss measures what the model reads from
the context. (The training loss does not: at the 10% of targets left unchanged the input shows the answer, worth
about 0.45 nats at a unigram entropy of 6 without reading any context.)

The baselines are context-free predictors, one fixed distribution q for every masked position, whose loss is
H(p) + KL(p || q) >= H(p), p the targets' distribution:

* `unigram_entropy`: H of the token distribution of the whole corpus read (every ordinary token, not only the
  chosen ones): the best any context-free predictor can do there, fitted to the evaluated text itself (an oracle).
  It is computed from every token rather than from the chosen ones because the plug-in entropy of a small sample
  is biased low by about (K - 1) / 2n nats for K distinct tokens in n: 0.3 nats for 1,200 targets of a 1,024-token
  vocabulary, which made an earlier comparison look worse than it was.
* `unigram_cross_entropy` (when `train_counts` is given): the chosen targets' cross entropy under the training
  targets' distribution (add-0.5 smoothed), i.e. the loss of the context-free predictor one can actually learn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.masking import MLMCollator
from . import tokenizer as T
from .corpus import Corpus, PackedStream


def unigram_entropy(counts: torch.Tensor) -> float:
    """Entropy in nats of the distribution given by `counts` (e.g. the masked targets' token counts)."""
    c = counts.double()
    p = c[c > 0] / c.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def mlm_eval(model_dir, corpus_dir, *, max_tokens: int = 4096, max_batches: int | None = None, seed: int = 1234,
             train_counts: torch.Tensor | None = None, random_context: bool = False) -> dict:
    """Masked-LM loss of the checkpoint in `model_dir` (config.json, model.safetensors, tokenizer.json) on the text
    files of `corpus_dir` (see the module docstring), packed as RoBERTa's full sentences of the model's length.
    `random_context`: also the loss with every other ordinary token replaced by a random one (the context destroyed,
    the positions kept). Returns loss, unigram_entropy, targets, tokens (and unigram_cross_entropy, random_loss)."""
    from ..model.heads import RobertaForMaskedLM

    model = RobertaForMaskedLM.from_pretrained(str(model_dir)).eval()
    tok = T.load(model_dir)
    ids = T.special_ids(tok)
    V = tok.get_vocab_size()
    specials = torch.tensor(ids["all"])
    seqlen = model.config.max_position_embeddings - ids["pad"] - 1
    encode = lambda ts: [e.ids for e in tok.encode_batch(ts, add_special_tokens=False)]  # noqa: E731
    stream = PackedStream(Corpus(corpus_dir), encode, max_tokens=max_tokens, max_seqlen=seqlen,
                          bos=ids["bos"], eos=ids["eos"])
    col = MLMCollator(V, ids["mask"], ids["all"], pad_token_id=ids["pad"], mask_prob=1.0, random_prob=0.0, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    token_counts = torch.zeros(V, dtype=torch.int64)
    target_counts = torch.zeros(V, dtype=torch.int64)
    loss = rand = 0.0
    k = 0
    while stream.epoch == 0 and (max_batches is None or k < max_batches):
        x, att = stream.next_batch().to_padded(ids["pad"])
        inputs, labels = col(x, step=k, attention_mask=att)
        k += 1
        keep = labels != -100
        ordinary = att.bool() & ~torch.isin(x, specials)
        token_counts += torch.bincount(x[ordinary], minlength=V)
        target_counts += torch.bincount(labels[keep], minlength=V)
        logits = model(input_ids=inputs, attention_mask=att).logits
        loss += F.cross_entropy(logits[keep].double(), labels[keep], reduction="sum").item()
        if random_context:
            other = ordinary & ~keep
            noisy = inputs.clone()
            noisy[other] = torch.randint(int(specials.max()) + 1, V, (int(other.sum()),), generator=gen)
            logits = model(input_ids=noisy, attention_mask=att).logits
            rand += F.cross_entropy(logits[keep].double(), labels[keep], reduction="sum").item()
    n = int(target_counts.sum())
    out = {"loss": loss / max(1, n), "unigram_entropy": unigram_entropy(token_counts), "targets": n,
           "tokens": int(token_counts.sum())}
    if random_context:
        out["random_loss"] = rand / max(1, n)
    if train_counts is not None:
        q = train_counts.double() + 0.5
        q = q / q.sum()
        out["unigram_cross_entropy"] = float(-(target_counts.double() * q.log()).sum() / max(1, n))
    return out
