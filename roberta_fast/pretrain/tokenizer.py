"""The tokenizer of a pretraining run: byte-level BPE as RoBERTa's (GPT-2's scheme), trained on the corpus with the
`tokenizers` package, or an existing tokenizer.json reused.

RoBERTa's layout: every byte is in the base alphabet (no unknown token is ever needed), a space is part of the
token that follows it ("Ġworld"), the special tokens are <s>=0, <pad>=1, </s>=2, <unk>=3 and <mask> (which also
takes the space before it: lstrip), a single sequence is encoded <s> ... </s> and a pair <s> A </s></s> B </s>.
RoBERTa's own vocabulary has 50,265 entries and <mask> last (50264); ours has <mask> at 4, right after the other
special tokens, whatever the vocabulary size (config.json does not record the mask id; the tokenizer does).

Training reads the documents lazily (an iterator over the corpus files); what it keeps in memory is the word
counts, not the text. It is deterministic: the same corpus and options give the same tokenizer.json.
"""

from __future__ import annotations

import json
import os

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
# the names a tokenizer may give each role: RoBERTa's first, BERT's second
ROLES = {"bos": ("<s>", "[CLS]"), "pad": ("<pad>", "[PAD]"), "eos": ("</s>", "[SEP]"), "unk": ("<unk>", "[UNK]"),
         "mask": ("<mask>", "[MASK]")}
MIN_VOCAB = 256 + len(SPECIALS) + 1  # the byte alphabet, the special tokens and at least one merge


class TokenizerError(ValueError):
    """A tokenizer that cannot be used for MLM pretraining (missing file, no <mask> or <pad> token, ...)."""


def _tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise TokenizerError("pretraining tokenizes with the `tokenizers` package: pip install tokenizers "
                             "(or roberta_fast[train])") from None


def train_bpe(texts, vocab_size: int, *, min_frequency: int = 2):
    """A byte-level BPE tokenizers.Tokenizer with RoBERTa's special tokens and templates, trained on the strings
    of the iterable `texts` (read once, lazily)."""
    _tokenizers()
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB:
        raise TokenizerError(f"vocab_size must be >= {MIN_VOCAB} (256 bytes + {len(SPECIALS)} special tokens + a "
                             f"merge), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(s, special=True, lstrip=s == "<mask>") for s in SPECIALS]
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                  special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                      add_prefix_space=False)
    return tok


def load(path):
    """tokenizers.Tokenizer from a tokenizer.json file or a folder holding one (padding and truncation off)."""
    _tokenizers()
    from tokenizers import Tokenizer

    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise TokenizerError(f"tokenizer {path!r}: no such file (give a tokenizer.json, or a folder holding one)")
    try:
        tok = Tokenizer.from_file(file)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise TokenizerError(f"tokenizer {file!r} cannot be read: {e}") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def from_str(text: str):
    """tokenizers.Tokenizer from its JSON text (tokenizer.to_str())."""
    _tokenizers()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(text)
    tok.no_padding()
    tok.no_truncation()
    return tok


def special_ids(tok) -> dict:
    """{"bos", "pad", "eos", "unk", "mask", "all"}: the ids of the roles (unk may be None) and of every special
    token of `tok` (which dynamic masking never chooses)."""
    out = {}
    for role, names in ROLES.items():
        ids = [tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None]
        if not ids and role != "unk":
            raise TokenizerError(f"the tokenizer has no {role} token ({' or '.join(names)}); MLM pretraining needs "
                                 "<s>, </s>, <pad> and <mask> (RoBERTa's) or [CLS], [SEP], [PAD] and [MASK]")
        out[role] = ids[0] if ids else None
    special = {i for i in out.values() if i is not None}
    try:
        special |= {int(i) for i, t in tok.get_added_tokens_decoder().items() if t.special}
    except AttributeError:  # tokenizers < 0.15
        pass
    out["all"] = sorted(special)
    return out


def save(tok, folder, *, max_length: int):
    """tokenizer.json, and the tokenizer_config.json / special_tokens_map.json that let transformers'
    AutoTokenizer load the folder."""
    from ..train.checkpoint import atomic_text

    ids = special_ids(tok)
    names = {role: tok.id_to_token(ids[role]) for role in ROLES if ids[role] is not None}
    tok.save(os.path.join(folder, "tokenizer.json"))
    m = {"bos_token": names["bos"], "eos_token": names["eos"], "cls_token": names["bos"], "sep_token": names["eos"],
         "pad_token": names["pad"], "mask_token": names["mask"]}
    if "unk" in names:
        m["unk_token"] = names["unk"]
    atomic_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **m, "model_max_length": int(max_length)},
                           indent=1), os.path.join(folder, "tokenizer_config.json"))
    atomic_text(json.dumps(m, indent=1), os.path.join(folder, "special_tokens_map.json"))
