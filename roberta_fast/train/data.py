"""Fine-tuning data: local jsonl / json / csv / tsv files, tokenized with the checkpoint folder's own
tokenizer (tokenizer.json, the `tokenizers` package), batched by a token budget.

Schema (one example per jsonl line or csv row; docs/finetune.md has examples):

  seq-cls    text, optional text_pair, label (an int class id, or a string class name)
  token-cls  tokens (a list of words; in csv a space-separated string) or text (split on whitespace), and labels
             (one per word, ints or strings). Rule: a word's label goes to its FIRST sub-token; its other
             sub-tokens and the special tokens get -100 (ignored by the loss and the metrics), or every
             sub-token with label_all_subtokens=True. Already tokenized rows: input_ids and labels of the
             same length (one label per token, -100 = ignored) are used as they are.
  qa         question, context, and the answer as answer_text + answer_start (character offset into context;
             answer_start may be left out: the first occurrence of answer_text is used), or SQuAD's
             answers = {"text": [...], "answer_start": [...]} (the first answer trains, all of them count in
             evaluation). The pair is encoded question first, context truncated ("only_second"); an answer
             cut off by the truncation points at the first token (position 0), as transformers' run_qa does.

Every sequence is truncated at the model's maximum length (max_position_embeddings, less RoBERTa's
padding offset; or a smaller max_length). A bad row raises DataError naming the file and the line.

Batches: examples are shuffled per epoch (a seeded random.Random, nothing global), sorted by length within
windows, and packed greedily so that a batch padded to its longest sequence holds at most `budget` tokens
(an example longer than the budget gets a batch of its own); the batch order is then shuffled. Padding is
small because lengths inside a batch are close, and the model drops it anyway (padding-free inside).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field

import torch

TASKS = ("seq-cls", "token-cls", "qa")
IGNORE = -100
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "sentencepiece.bpe.model", "added_tokens.json")


class DataError(ValueError):
    """A data file that cannot be used: missing, unreadable, or a row without the task's columns."""


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return task


# ------------------------------------------------------------------------------------------------ tokenizer


def load_tokenizer(model_dir):
    """The folder's tokenizer.json as a tokenizers.Tokenizer, with its saved padding turned off (batches are
    padded here) and its truncation removed (set per task by `tokenize`)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError("the trainer reads tokenizer.json with the `tokenizers` package: pip install tokenizers "
                        "(or roberta_fast[hf])") from None

    path = os.path.join(os.fspath(model_dir), "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"no tokenizer.json in {os.fspath(model_dir)!r}: the trainer needs the checkpoint's fast "
                        "tokenizer file (transformers writes it with AutoTokenizer.from_pretrained(...)"
                        ".save_pretrained(folder))")
    tok = Tokenizer.from_file(path)
    tok.no_padding()
    tok.no_truncation()
    return tok


def max_model_length(config: dict, model_dir=None) -> int:
    """The longest sequence the model takes: max_position_embeddings, less pad_token_id + 1 for RoBERTa-style
    positions (which start after the padding index), capped by tokenizer_config.json's model_max_length."""
    n = int(config.get("max_position_embeddings", 512))
    if config.get("model_type", "bert") in ("roberta", "xlm-roberta", "camembert"):
        n -= int(config.get("pad_token_id", 1)) + 1
    if model_dir is not None:
        tc = os.path.join(os.fspath(model_dir), "tokenizer_config.json")
        if os.path.isfile(tc):
            with open(tc, encoding="utf-8") as f:
                m = json.load(f).get("model_max_length")
            if isinstance(m, int) and 0 < m < n:
                n = m
    return n


def pad_token_id(tokenizer, config: dict) -> int:
    p = config.get("pad_token_id")
    if p is not None:
        return int(p)
    for name in ("<pad>", "[PAD]"):
        i = tokenizer.token_to_id(name)
        if i is not None:
            return i
    return 0


# ------------------------------------------------------------------------------------------------ reading rows


def read_rows(path) -> list:
    """[(line number, dict)] from a .jsonl, .json (a list of objects, or one per line), .csv or .tsv file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        if ext in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            if not reader.fieldnames:
                raise DataError(f"{path}: no header row (the first line must name the columns)")
            for row in reader:
                rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
        elif ext in (".jsonl", ".json"):
            text = f.read()
            stripped = text.lstrip()
            if ext == ".json" and stripped.startswith("["):
                try:
                    items = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: not valid JSON ({e})") from None
                rows = [(i + 1, r) for i, r in enumerate(items)]
            else:
                for i, line in enumerate(text.splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append((i, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        else:
            raise DataError(f"{path}: unknown data format {ext!r} (use .jsonl, .json, .csv or .tsv)")
    for line, r in rows:
        if not isinstance(r, dict):
            raise DataError(f"{path}:{line}: expected an object with named fields, got {type(r).__name__}")
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def _need(path, line, row, *names):
    for n in names:
        if n not in row or row[n] is None or row[n] == "":
            have = ", ".join(sorted(row)) or "none"
            raise DataError(f"{path}:{line}: missing column {n!r} (columns here: {have})")


def _as_list(path, line, value, name):
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{line}: column {name!r} is not a valid JSON list") from None
        else:
            value = s.split()
    if not isinstance(value, list):
        raise DataError(f"{path}:{line}: column {name!r} must be a list, got {type(value).__name__}")
    return value


def _label_value(v):
    """An int label stays an int (a csv's "3" too); anything else is a class name."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
        return int(v)
    return str(v)


# ------------------------------------------------------------------------------------------------ labels


@dataclass
class Labels:
    """Class ids: ints are their own ids; names map to ids in sorted order (or the config's id2label)."""

    names: list | None = None  # id -> name, None when the labels are ints
    num_labels: int = 0

    @classmethod
    def build(cls, values, num_labels=None, id2label=None, where="labels"):
        values = [v for v in values if v != IGNORE]
        if any(isinstance(v, str) for v in values):
            if not all(isinstance(v, str) for v in values):
                raise DataError(f"{where}: labels mix class ids (ints) and class names (strings)")
            known = [id2label[i] for i in sorted(id2label)] if id2label else []
            names = known if known and set(values) <= set(known) else sorted(set(values))
            if num_labels is not None and num_labels != len(names):
                raise DataError(f"{where}: {len(names)} class names ({', '.join(names[:10])}) but num_labels="
                                f"{num_labels}")
            return cls(names=names, num_labels=len(names))
        top = max(values, default=-1)
        if min(values, default=0) < 0:
            raise DataError(f"{where}: class ids must be >= 0 (or {IGNORE} = ignored), got {min(values)}")
        n = top + 1 if num_labels is None else num_labels
        if top >= n:
            raise DataError(f"{where}: class id {top} but num_labels={n}")
        return cls(names=None, num_labels=max(n, 2) if num_labels is None else n)

    def id(self, value, where):
        if value == IGNORE:
            return IGNORE
        if self.names is None:
            if not isinstance(value, int) or not 0 <= value < self.num_labels:
                raise DataError(f"{where}: label {value!r} is not a class id in [0, {self.num_labels})")
            return value
        try:
            return self.names.index(value)
        except ValueError:
            raise DataError(f"{where}: label {value!r} is not one of the training labels "
                            f"({', '.join(map(str, self.names[:20]))})") from None


# ------------------------------------------------------------------------------------------------ examples


@dataclass
class Example:
    input_ids: list
    type_ids: list
    label: object  # seq-cls: int; token-cls: list of ints (IGNORE = ignored); qa: (start, end) token positions
    qa: dict | None = None  # qa evaluation: context, offsets of the context tokens, gold answer texts


@dataclass
class Dataset:
    task: str
    examples: list
    labels: Labels | None = None
    source: str = ""
    truncated: int = 0
    extra: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.examples)

    def lengths(self) -> list:
        return [len(e.input_ids) for e in self.examples]


def _raw_labels(task, path, rows):
    out = []
    for line, r in rows:
        if task == "seq-cls":
            _need(path, line, r, "label")
            out.append(_label_value(r["label"]))
        elif task == "token-cls":
            _need(path, line, r, "labels")
            out.extend(_label_value(v) for v in _as_list(path, line, r["labels"], "labels"))
    return out


def load_dataset(path, task, tokenizer, *, max_length, labels: Labels | None = None, num_labels=None,
                 id2label=None, label_all_subtokens=False) -> Dataset:
    """Read and tokenize one file. `labels` (the training set's) maps class names of an evaluation file;
    without it they are built from this file's labels (num_labels / id2label as given)."""
    check_task(task)
    path = os.fspath(path)
    rows = read_rows(path)
    if task != "qa" and labels is None:
        labels = Labels.build(_raw_labels(task, path, rows), num_labels, id2label, where=path)
    strategy = "only_second" if task == "qa" else "longest_first"
    tokenizer.enable_truncation(max_length, strategy=strategy)
    examples, truncated = [], 0
    for line, r in rows:
        where = f"{path}:{line}"
        if task == "seq-cls":
            _need(path, line, r, "text", "label")
            pair = r.get("text_pair") or None
            enc = tokenizer.encode(str(r["text"]), None if pair is None else str(pair))
            ex = Example(enc.ids, enc.type_ids, labels.id(_label_value(r["label"]), where))
        elif task == "token-cls":
            ex = _token_example(path, line, r, tokenizer, labels, max_length, label_all_subtokens)
        else:
            ex = _qa_example(path, line, r, tokenizer)
        truncated += len(ex.input_ids) >= max_length
        examples.append(ex)
    return Dataset(task, examples, labels, source=path, truncated=truncated)


def _token_example(path, line, r, tokenizer, labels, max_length, label_all_subtokens):
    where = f"{path}:{line}"
    if "input_ids" in r:
        _need(path, line, r, "input_ids", "labels")
        ids = _as_list(path, line, r["input_ids"], "input_ids")
        labs = _as_list(path, line, r["labels"], "labels")
        if len(ids) != len(labs):
            raise DataError(f"{where}: {len(ids)} input_ids but {len(labs)} labels (one label per token)")
        ids = [int(i) for i in ids][:max_length]
        labs = [labels.id(_label_value(v), where) for v in labs][:max_length]
        return Example(ids, [0] * len(ids), labs)
    if "tokens" in r:
        words = _as_list(path, line, r["tokens"], "tokens")
    else:
        _need(path, line, r, "text")
        words = str(r["text"]).split()
    _need(path, line, r, "labels")
    word_labels = _as_list(path, line, r["labels"], "labels")
    if len(words) != len(word_labels):
        raise DataError(f"{where}: {len(words)} words but {len(word_labels)} labels (one label per word)")
    if not words:
        raise DataError(f"{where}: no words")
    ids_of_words = [labels.id(_label_value(v), where) for v in word_labels]
    enc = tokenizer.encode([str(w) for w in words], is_pretokenized=True)
    out, prev = [], None
    for w in enc.word_ids:
        if w is None:
            out.append(IGNORE)
        elif w != prev or label_all_subtokens:
            out.append(ids_of_words[w])
        else:
            out.append(IGNORE)
        prev = w
    return Example(enc.ids, enc.type_ids, out)


def _qa_answers(path, line, r, context):
    """[(start_char, text)] of the row's answers, each checked against the context."""
    where = f"{path}:{line}"
    if "answers" in r and r["answers"] is not None:
        a = r["answers"]
        if isinstance(a, str):
            try:
                a = json.loads(a)
            except json.JSONDecodeError:
                raise DataError(f"{where}: column 'answers' is not valid JSON") from None
        if not isinstance(a, dict) or "text" not in a:
            raise DataError(f"{where}: 'answers' must be {{'text': [...], 'answer_start': [...]}}")
        texts = a["text"] if isinstance(a["text"], list) else [a["text"]]
        starts = a.get("answer_start", [None] * len(texts))
        starts = starts if isinstance(starts, list) else [starts]
        pairs = list(zip(starts, texts))
    else:
        if "answer_text" not in r and "answer" not in r:
            have = ", ".join(sorted(r))
            raise DataError(f"{where}: missing the answer: give answer_text (+ answer_start) or answers "
                            f"(columns here: {have})")
        pairs = [(r.get("answer_start"), r.get("answer_text", r.get("answer")))]
    out = []
    for start, text in pairs:
        text = str(text)
        if start is None or start == "":
            start = context.find(text)
            if start < 0:
                raise DataError(f"{where}: answer {text!r} does not occur in the context")
        start = int(start)
        if context[start:start + len(text)] != text:
            raise DataError(f"{where}: answer_start {start} does not point at {text!r} in the context "
                            f"(found {context[start:start + len(text)]!r})")
        out.append((start, text))
    if not out:
        raise DataError(f"{where}: no answer")
    return out


def _qa_example(path, line, r, tokenizer):
    _need(path, line, r, "question", "context")
    question, context = str(r["question"]), str(r["context"])
    answers = _qa_answers(path, line, r, context)
    enc = tokenizer.encode(question, context)
    seq = enc.sequence_ids
    ctx = [i for i, s in enumerate(seq) if s == 1]
    if not ctx:
        raise DataError(f"{path}:{line}: the question leaves no room for the context at this max length")
    start_char, text = answers[0]
    end_char = start_char + len(text)
    offsets = enc.offsets
    start = end = 0  # the first token: the answer was truncated away
    if offsets[ctx[0]][0] <= start_char and offsets[ctx[-1]][1] >= end_char:
        start = next(i for i in ctx if offsets[i][1] > start_char)
        end = next(i for i in reversed(ctx) if offsets[i][0] < end_char)
        if end < start:
            start = end = 0
    qa = {"context": context, "ctx_tokens": ctx, "offsets": [offsets[i] for i in ctx],
          "answers": [t for _, t in answers]}
    return Example(enc.ids, enc.type_ids, (start, end), qa)


# ------------------------------------------------------------------------------------------------ batches


def plan_batches(lengths, budget: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 min_size: int = 1, window: int = 2048) -> list:
    """Lists of example indices: one list per (global) batch, deterministic in (lengths, budget, seed, epoch).

    Each batch padded to its longest example holds at most `budget` tokens (one longer example: alone), and at
    least `min_size` examples (data-parallel: one per rank; a short tail joins the batch before it)."""
    if budget <= 0:
        raise ValueError(f"batch token budget must be > 0, got {budget}")
    n = len(lengths)
    if n < min_size:
        raise DataError(f"{n} examples cannot fill a batch for {min_size} data-parallel ranks")
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n))
    if shuffle:
        rng.shuffle(order)
    batches = []
    for w in range(0, n, window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])  # stable: ties keep the shuffled order
        cur, longest = [], 0
        for i in chunk:
            m = max(longest, lengths[i])
            if cur and len(cur) >= min_size and m * (len(cur) + 1) > budget:
                batches.append(cur)
                cur, m = [], lengths[i]
            cur.append(i)
            longest = m
        if cur:
            if len(cur) < min_size and batches:
                batches[-1].extend(cur)
            else:
                batches.append(cur)
    if shuffle:
        rng.shuffle(batches)
    return batches


def shard(batch: list, rank: int, world_size: int) -> list:
    """This rank's part of a global batch (sorted by length, so interleaving balances the ranks)."""
    return batch[rank::world_size]


def collate(examples: list, task: str, pad_id: int, use_type_ids: bool) -> dict:
    """Tensors of a padded batch: input_ids, attention_mask (B, S) (token_type_ids when the model has
    several), and labels: seq-cls (B,), token-cls (B, S) with -100 at padding, qa start/end_positions (B,)."""
    s = max(len(e.input_ids) for e in examples)
    b = len(examples)
    ids = torch.full((b, s), pad_id, dtype=torch.long)
    mask = torch.zeros((b, s), dtype=torch.long)
    types = torch.zeros((b, s), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, :n] = 1
        types[i, :n] = torch.tensor(e.type_ids[:n], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if use_type_ids:
        out["token_type_ids"] = types
    if task == "seq-cls":
        out["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    elif task == "token-cls":
        lab = torch.full((b, s), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            lab[i, :len(e.label)] = torch.tensor(e.label, dtype=torch.long)
        out["labels"] = lab
    else:
        out["start_positions"] = torch.tensor([e.label[0] for e in examples], dtype=torch.long)
        out["end_positions"] = torch.tensor([e.label[1] for e in examples], dtype=torch.long)
    return out


def loss_count(examples: list, task: str) -> int:
    """What the loss of these examples is averaged over: examples (seq-cls), labelled tokens (token-cls),
    start and end positions (qa: two per example)."""
    if task == "seq-cls":
        return len(examples)
    if task == "token-cls":
        return sum(sum(1 for v in e.label if v != IGNORE) for e in examples)
    return 2 * len(examples)


# ------------------------------------------------------------------------------------------------ QA text metrics


def normalize_answer(s: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def answer_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)
