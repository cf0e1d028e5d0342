"""`roberta-fast finetune`: the options (add_arguments) and the run (run_from_args); roberta_fast/cli.py
adds the subcommand. Bad input (a missing file, a row without the task's columns, an unknown task, a
corrupt checkpoint) prints one clear line and returns exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .data import TASKS

# the TrainArgs fields set from flags of the same name (dashes for underscores); None = TrainArgs' default
_FLAGS = ("epochs", "max_steps", "lr", "weight_decay", "warmup_steps", "warmup_ratio", "batch_tokens",
          "eval_batch_tokens", "accumulation", "clip", "precision", "freeze_embeddings", "freeze_layers", "seed",
          "num_labels", "max_length", "label_all_subtokens", "max_answer_length", "dropout", "save_every",
          "keep_checkpoints", "resume", "log_every", "fsdp", "device", "backend", "hf")


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR",
                   help="checkpoint folder (config.json, model.safetensors, tokenizer.json); with --builtin it may "
                        "be left out: a tiny random-init RoBERTa is made")
    p.add_argument("--train", metavar="FILE", help="training data: .jsonl, .json, .csv or .tsv (docs/finetune.md)")
    p.add_argument("--eval", metavar="FILE", help="evaluation data, evaluated after every epoch and at the end")
    p.add_argument("--task", default="seq-cls", help=f"{' | '.join(TASKS)} (default seq-cls)")
    p.add_argument("--output", metavar="DIR", help="output folder: the fine-tuned model (config.json, "
                   "model.safetensors, tokenizer), metrics.jsonl, checkpoints/")
    p.add_argument("--builtin", action="store_true",
                   help="train on the built-in synthetic task (roberta_fast/train/builtin.py): data written to "
                        "OUTPUT/builtin/, and a tiny model unless MODEL_DIR is given")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, help="passes over the data (default 3)")
    g.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 5e-5)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay of matrices (default 0.01)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 0)")
    g.add_argument("--warmup-ratio", type=float, help="warmup as a fraction of all steps (when --warmup-steps is 0)")
    g.add_argument("--batch-tokens", type=int, metavar="N",
                   help="per device and micro-batch: examples x longest length <= N (default 4096)")
    g.add_argument("--eval-batch-tokens", type=int, metavar="N", help="default: 2 x --batch-tokens")
    g.add_argument("--accumulation", type=int, metavar="K", help="micro-batches per optimizer step (default 1)")
    g.add_argument("--clip", type=float, help="max gradient norm, 0 = off (default 1.0)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default fp32")
    g.add_argument("--seed", type=int, help="default 42")
    g = p.add_argument_group("model")
    g.add_argument("--num-labels", type=int, help="default: from the training labels")
    g.add_argument("--max-length", type=int, help="truncate longer sequences (default: the model's maximum)")
    g.add_argument("--freeze-embeddings", action="store_true", default=None, help="train without the embeddings")
    g.add_argument("--freeze-layers", type=int, metavar="N", help="freeze encoder layers 0..N-1")
    g.add_argument("--dropout", type=float, help="override the config's hidden/attention/classifier dropout")
    g.add_argument("--label-all-subtokens", action="store_true", default=None,
                   help="token-cls: every sub-token of a word gets its label (default: the first only)")
    g.add_argument("--max-answer-length", type=int, help="qa evaluation: longest span in tokens (default 30)")
    g.add_argument("--backend", choices=("torch", "triton", "cuda"), help="op backend (default: automatic)")
    g.add_argument("--hf", action="store_true", default=None,
                   help="load the transformers model and roberta_fast.optimize() it instead of roberta_fast's")
    g = p.add_argument_group("checkpoints and runs")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue from the newest complete checkpoint in OUTPUT/checkpoints")
    g.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps (always at epoch ends)")
    g.add_argument("--keep-checkpoints", type=int, metavar="K", help="keep the newest K (default 2)")
    g.add_argument("--log-every", type=int, metavar="N", help="metrics.jsonl row every N steps (default 1)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--fsdp", action="store_true", default=None,
                   help="FullyShardedDataParallel instead of DDP (under torchrun)")
    g.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")


def fail(prog: str, msg: str) -> int:
    """The one-line error of a subcommand (`roberta-fast finetune: ...`, `roberta-fast pretrain: ...`): exit code 2."""
    print(f"{prog}: {msg}", file=sys.stderr)
    return 2


def _fail(msg: str) -> int:
    return fail("roberta-fast finetune", msg)


def run_main(prog: str, add, run, argv=None) -> int:
    """A subcommand as its own program: parse `argv` with the options `add` puts on a parser, then `run`."""
    p = argparse.ArgumentParser(prog=prog)
    add(p)
    return run(p.parse_args(argv))


def run_from_args(args) -> int:
    from . import builtin
    from .checkpoint import CheckpointError
    from .data import DataError
    from .trainer import TrainArgs, Trainer

    if args.task not in TASKS:
        return _fail(f"unknown task {args.task!r}; use one of {', '.join(TASKS)}")
    if not args.output:
        return _fail("--output DIR is required (where the model, metrics and checkpoints go)")
    kw = {}
    model_dir, train, ev = args.model_dir, args.train, args.eval
    if args.builtin:
        kw.update(builtin.DEFAULTS)
        if train is None or model_dir is None:
            rank = int(os.environ.get("RANK", "0"))  # under torchrun each rank writes its own (identical) copy
            folder = os.path.join(args.output, "builtin" if rank == 0 else f"builtin-rank{rank}")
            paths = builtin.prepare(folder, args.task, model=model_dir is None)
            model_dir = model_dir or paths["model_dir"]
            if train is None:
                train, ev = paths["train"], ev or paths["eval"]
    if model_dir is None:
        return _fail("MODEL_DIR is required (a checkpoint folder), or --builtin for the built-in tiny model")
    if not os.path.isdir(model_dir):
        return _fail(f"MODEL_DIR {model_dir!r} is not a directory")
    if train is None:
        return _fail("--train FILE is required (or --builtin)")
    for name, path in (("--train", train), ("--eval", ev)):
        if path is not None and not os.path.isfile(path):
            return _fail(f"{name} file {path!r} does not exist")
    for f in _FLAGS:
        v = getattr(args, f, None)
        if v is not None:
            kw[f] = v
    valid = {f.name for f in dataclasses.fields(TrainArgs)}
    kw = {k: v for k, v in kw.items() if k in valid}
    try:
        targs = TrainArgs(model_dir=model_dir, train=train, eval=ev, task=args.task, output=args.output,
                          progress=not args.no_progress, **kw)
        result = Trainer(targs).fit()
    except (DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports
        return 0
    if result.eval:
        last = result.eval[-1]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if isinstance(v, float))
        print(f"final eval: {shown}")
    print(f"model written to {result.output}")
    return 0


def main(argv=None) -> int:
    return run_main("roberta-fast finetune", add_arguments, run_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
