"""`roberta-fast pretrain`: the options (add_arguments) and the run (run_from_args); roberta_fast/cli.py adds the
subcommand. Bad input (a missing corpus folder or tokenizer, a bad option value, a corrupt checkpoint, a resume
with other options) prints one line that names the argument and returns exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from ..train.cli import fail, run_main

# the PretrainArgs fields set from flags of the same name (dashes for underscores); None = PretrainArgs' default
_FLAGS = ("corpus", "eval_corpus", "model", "tokenizer", "vocab_size", "min_frequency", "max_seqlen", "packing",
          "max_steps", "batch_tokens", "accumulation", "lr", "weight_decay", "warmup_steps", "warmup_ratio", "clip",
          "precision", "mlm_probability", "mask_prob", "random_prob", "dropout", "seed", "save_every",
          "keep_checkpoints", "resume", "log_every", "device", "backend", "attention", "lsh_bucket_size",
          "lsh_num_hashes")


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--corpus", metavar="DIR",
                   help="folder of text files (documents separated by blank lines; read lazily); default: the built-in "
                        "corpus (docstrings of Python's standard library), written to OUTPUT/builtin-corpus")
    p.add_argument("--eval-corpus", metavar="DIR",
                   help="held-out text files: the masked-LM loss on them (every chosen token <mask>) against their "
                        "unigram entropy, at the end; default with the built-in corpus: its held-out tenth")
    p.add_argument("--output", metavar="DIR", help="output folder: the model (config.json, model.safetensors, "
                   "tokenizer.json), metrics.jsonl, checkpoints/")
    g = p.add_argument_group("model and tokenizer")
    g.add_argument("--model", metavar="PRESET|CONFIG",
                   help="tiny (default: hidden 128, 2 layers, vocabulary 512, sequences of 16), base (roberta-base's "
                        "shape) or a config.json whose encoder shape to use")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="reuse this tokenizer.json (or a folder with one); default: train byte-level BPE on the corpus")
    g.add_argument("--vocab-size", type=int, metavar="N", help="of the trained tokenizer (default: the preset's)")
    g.add_argument("--min-frequency", type=int, metavar="N", help="BPE: a merge must occur N times (default 2)")
    g.add_argument("--max-seqlen", type=int, metavar="N", help="tokens per sequence, <s> and </s> included")
    g.add_argument("--packing", choices=("full_sentences", "documents"),
                   help="full_sentences (RoBERTa's, default): sequences of max-seqlen across documents; documents: "
                        "one document per sequence, never attending across documents")
    g.add_argument("--dropout", type=float, help="hidden and attention dropout (tiny: 0, base: 0.1)")
    g.add_argument("--backend", choices=("torch", "triton", "cuda"), help="op backend (default: automatic)")
    g.add_argument("--attention", choices=("full", "lsh"),
                   help="self-attention: full (RoBERTa's, default) or lsh (opt-in, approximate; docs/lsh_attention.md)")
    g.add_argument("--lsh-bucket-size", type=int, metavar="N", help="LSH attention's bucket size (default 64)")
    g.add_argument("--lsh-num-hashes", type=int, metavar="N", help="LSH attention's hash rounds (default 2)")
    g = p.add_argument_group("schedule")
    g.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (tiny: 2000, base: 100000)")
    g.add_argument("--batch-tokens", type=int, metavar="N", help="tokens per device and micro-batch (tiny: 2048)")
    g.add_argument("--accumulation", type=int, metavar="K", help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (tiny: 2e-3, base: 6e-4)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay of matrices (default 0.01)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: --warmup-ratio of the steps)")
    g.add_argument("--warmup-ratio", type=float, help="default 0.06")
    g.add_argument("--clip", type=float, help="max gradient norm, 0 = off (default 1.0)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default fp32")
    g.add_argument("--seed", type=int, help="default 42")
    g = p.add_argument_group("masking")
    g.add_argument("--mlm-probability", type=float, help="share of tokens predicted (default 0.15)")
    g.add_argument("--mask-prob", type=float, help="of those, share replaced by <mask> (default 0.8)")
    g.add_argument("--random-prob", type=float, help="of those, share replaced by a random token (default 0.1)")
    g = p.add_argument_group("checkpoints and runs")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue from the newest complete checkpoint in OUTPUT/checkpoints")
    g.add_argument("--save-every", type=int, metavar="N",
                   help="checkpoint every N steps (default 100; 0: the end only)")
    g.add_argument("--keep-checkpoints", type=int, metavar="K", help="keep the newest K (default 2)")
    g.add_argument("--log-every", type=int, metavar="N", help="metrics.jsonl row every N steps (default 1)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")


def _fail(msg: str) -> int:
    return fail("roberta-fast pretrain", msg)


def _check(args) -> str | None:
    """The first bad argument, as a message naming it (None when all is well)."""
    if not args.output:
        return "--output DIR is required (where the model, metrics and checkpoints go)"
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        return f"--output {args.output!r} exists and is not a folder"
    if args.corpus is not None and not os.path.isdir(args.corpus):
        return f"--corpus {args.corpus!r} is not a folder (a folder of text files is expected)"
    if args.eval_corpus is not None and not os.path.isdir(args.eval_corpus):
        return f"--eval-corpus {args.eval_corpus!r} is not a folder (a folder of text files is expected)"
    if args.tokenizer is not None and not os.path.exists(args.tokenizer):
        return f"--tokenizer {args.tokenizer!r} does not exist (a tokenizer.json or a folder holding one)"
    from .trainer import PRESETS

    if args.model is not None and args.model not in PRESETS and not os.path.isfile(args.model):
        return f"--model {args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file"
    for flag in ("max_steps", "batch_tokens", "accumulation", "vocab_size", "max_seqlen", "log_every",
                 "min_frequency", "lsh_bucket_size", "lsh_num_hashes"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            return f"--{flag.replace('_', '-')} must be >= 1, got {v}"
    for flag in ("save_every", "keep_checkpoints", "warmup_steps", "clip", "weight_decay"):
        v = getattr(args, flag)
        if v is not None and v < 0:
            return f"--{flag.replace('_', '-')} must be >= 0, got {v}"
    if args.lr is not None and args.lr <= 0:
        return f"--lr must be > 0, got {args.lr}"
    for flag, lo, hi in (("mlm_probability", 0, 1), ("mask_prob", 0, 1), ("random_prob", 0, 1),
                         ("warmup_ratio", 0, 1), ("dropout", 0, 1)):
        v = getattr(args, flag)
        if v is not None and not lo <= v <= hi:
            return f"--{flag.replace('_', '-')} must be in [{lo}, {hi}], got {v}"
    return None


def run_from_args(args) -> int:
    from ..train.checkpoint import CheckpointError
    from .corpus import CorpusError
    from .tokenizer import TokenizerError
    from .trainer import PretrainArgs, Pretrainer

    bad = _check(args)
    if bad is not None:
        return _fail(bad)
    kw = {f: getattr(args, f) for f in _FLAGS if getattr(args, f, None) is not None}
    valid = {f.name for f in dataclasses.fields(PretrainArgs)}
    kw = {k: v for k, v in kw.items() if k in valid}
    try:
        result = Pretrainer(PretrainArgs(output=args.output, progress=not args.no_progress, **kw)).fit()
    except (CorpusError, TokenizerError, CheckpointError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports
        return 0
    print(f"model written to {result.output} ({result.steps} steps, {result.seconds:.1f} s)")
    return 0


def main(argv=None) -> int:
    return run_main("roberta-fast pretrain", add_arguments, run_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
