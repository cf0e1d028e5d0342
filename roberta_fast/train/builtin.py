"""A built-in synthetic task and a tiny random-init model, so that fine-tuning runs end to end with no
download and no data: `roberta-fast finetune --builtin --output DIR` (docs/finetune.md).

The language: sentences of 4-14 neutral filler words ("the river near a green house ...") with sentiment
words from two fixed lists, POSITIVE and NEGATIVE, inserted at random places.

- seq-cls: three classes, a third each: "positive" (one word of POSITIVE among the fillers), "negative" (one
  of NEGATIVE), "neutral" (fillers only). What the model learns: to find the one sentiment word among the
  fillers, wherever it is, and tell its list. Why it is learnable: the label is a deterministic function of
  which tokens occur (no noise, no word order needed), which one attention layer can gather into the first
  token; the 16 sentiment words are each seen ~80 times in 2,000 sentences, and the evaluation sentences are
  fresh combinations of the same words. (A harder variant, "not" flipping the next sentiment word, did not
  leave chance level within a CPU-minute budget for this 2-layer model, nor for transformers' own.)
- token-cls: 1-3 sentiment words per sentence; each word is labelled O (filler), POS or NEG by its
  list (no negation): a per-token lookup, learnable from the embeddings alone.
- qa: a context with one positive and one negative word; the question "which word is positive ?" or
  "which word is negative ?"; the answer is that word. Learnable: the question's word selects which of the
  two marked context tokens is the answer (attention between the pair's two segments).

The tokenizer is a word-level one over exactly this vocabulary (tokenizers' WordLevel, whitespace split,
RoBERTa's <s> ... </s></s> ... </s> template), saved as tokenizer.json beside a 2-layer, hidden-64 RoBERTa.
"""

from __future__ import annotations

import json
import os
import random

FILLER = ("the a an this that some every river house tree stone cloud road window garden city field bridge "
          "boat train letter table chair lamp door wall morning evening winter summer blue green red small large "
          "old new near under over behind with from into across walks sees holds finds opens carries").split()
POSITIVE = "good great happy lovely excellent wonderful bright pleasant".split()
NEGATIVE = "bad awful sad terrible horrible gloomy dreadful nasty".split()
QUESTION = "which word is positive negative ?".split()
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
VOCAB = list(SPECIALS) + sorted(set(FILLER) | set(POSITIVE) | set(NEGATIVE) | set(QUESTION))
MAX_LENGTH = 64

# hyperparameters that fit this task and model (random init needs a larger learning rate than fine-tuning)
DEFAULTS = {"lr": 1e-3, "epochs": 10, "batch_tokens": 1024, "warmup_ratio": 0.1, "weight_decay": 0.01, "dropout": 0.0}


def _fillers(rng, lo=4, hi=14):
    return [rng.choice(FILLER) for _ in range(rng.randint(lo, hi))]


def seq_cls_example(rng):
    words = _fillers(rng)
    label = rng.choice(("positive", "negative", "neutral"))
    if label != "neutral":
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
    return {"text": " ".join(words), "label": label}


def token_cls_example(rng):
    words = _fillers(rng)
    tags = ["O"] * len(words)
    for _ in range(rng.randint(1, 3)):
        positive = rng.random() < 0.5
        at = rng.randint(0, len(words))
        words.insert(at, rng.choice(POSITIVE if positive else NEGATIVE))
        tags.insert(at, "POS" if positive else "NEG")
    return {"tokens": words, "labels": tags}


def qa_example(rng):
    words = _fillers(rng)
    pos, neg = rng.choice(POSITIVE), rng.choice(NEGATIVE)
    for w in (pos, neg):
        words.insert(rng.randint(0, len(words)), w)
    ask_positive = rng.random() < 0.5
    answer = pos if ask_positive else neg
    context = " ".join(words)
    start = (" " + context + " ").index(" " + answer + " ")
    return {"question": f"which word is {'positive' if ask_positive else 'negative'} ?", "context": context,
            "answer_text": answer, "answer_start": start}


GENERATORS = {"seq-cls": seq_cls_example, "token-cls": token_cls_example, "qa": qa_example}


def write_data(path, task: str, n: int, seed: int):
    rng = random.Random(seed)
    gen = GENERATORS[task]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(gen(rng)) + "\n")
    return path


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)])
    return tok


def make_model_dir(path, *, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4):
    """A random-init RoBERTa encoder (config.json + model.safetensors) and its word-level tokenizer in `path`."""
    import torch

    from ..model import EncoderConfig, RobertaModel

    os.makedirs(path, exist_ok=True)
    cfg = EncoderConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=MAX_LENGTH + 2, type_vocab_size=1, layer_norm_eps=1e-5,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, model_type="roberta")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        RobertaModel(cfg).save_pretrained(path)
    make_tokenizer().save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "cls_token": "<s>", "sep_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "mask_token": "<mask>", "model_max_length": MAX_LENGTH}, f, indent=1)
    return path


def prepare(folder, task: str = "seq-cls", *, seed: int = 0, n_train: int = 2000, n_eval: int = 400,
            model: bool = True) -> dict:
    """Write train.jsonl, eval.jsonl (and the tiny model unless model=False) under `folder`; returns their
    paths as {"model_dir", "train", "eval"}."""
    if task not in GENERATORS:
        raise ValueError(f"task must be one of {', '.join(GENERATORS)}, got {task!r}")
    os.makedirs(folder, exist_ok=True)
    out = {"train": write_data(os.path.join(folder, f"{task}-train.jsonl"), task, n_train, seed),
           "eval": write_data(os.path.join(folder, f"{task}-eval.jsonl"), task, n_eval, seed + 1),
           "model_dir": None}
    if model:
        out["model_dir"] = make_model_dir(os.path.join(folder, "tiny-roberta"), seed=seed)
    return out
