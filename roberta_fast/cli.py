"""The `roberta-fast` command.

    roberta-fast bench [--quick] [--out DIR] [--only NAME] [--time-budget S] [--device cuda|cpu]
    roberta-fast demo [demo options]        (roberta_fast.demo.main)
    roberta-fast embed [MODEL_DIR] [--input FILE --output FILE ...]
                                            (sentence embeddings: roberta_fast.embed.job; without --input the
                                            main job on the built-in all-MiniLM-L6-v2)
    roberta-fast finetune [MODEL_DIR] --train FILE [--eval FILE] --task seq-cls|token-cls|qa --output DIR ...
                                            (fine-tuning: roberta_fast.train; --builtin: the built-in task)
    roberta-fast pretrain [--corpus DIR] --output DIR [--max-steps N] [--resume] ...
                                            (MLM pretraining from scratch: roberta_fast.pretrain; without
                                            --corpus the built-in corpus and the tiny model)
    roberta-fast env                        (versions, GPU, which backends can run here; exit 1 when a
                                            setting such as ROBERTA_FAST_BACKEND is invalid)
    roberta-fast tune [--quick] [--ops ...] [--dtypes ...] [--train] [--show] [--clear] [--device cuda|cpu]
                                            (time every backend per op and shape on this GPU and cache
                                            the fastest verified one: roberta_fast.tuning)

`bench` runs the harness, roberta_fast.benchmarks (the repository's benchmarks/ folder, installed inside
the package), so it works from any directory after `pip install .`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from roberta_fast.benchmarks import run as bench_run
from roberta_fast.embed import job as embed_job


def _needs_interpreter_restart(argv) -> bool:
    """On a machine without a GPU, Triton must run under TRITON_INTERPRET=1, which has to be set before
    any Triton kernel is defined. If triton was already imported without it (importing roberta_fast
    may do so), the bench re-executes itself with the variable set."""
    if os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules:
        return False
    if "--device" in argv:
        i = argv.index("--device")
        if i + 1 < len(argv) and argv[i + 1] == "cuda":
            return False
    import torch

    return not torch.cuda.is_available()


def cmd_env() -> int:
    import platform

    import torch

    from roberta_fast import backends

    def ver(name):
        try:
            return getattr(importlib.import_module(name), "__version__", "unknown")
        except Exception as e:  # noqa: BLE001
            return f"not installed ({type(e).__name__})"

    import roberta_fast

    print(f"roberta_fast {roberta_fast.__version__} ({Path(roberta_fast.__file__).parent})")
    print(f"python {platform.python_version()} on {platform.platform()}")
    print(f"torch {torch.__version__}, CUDA (torch build) {torch.version.cuda}")
    print(f"triton {ver('triton')}, transformers {ver('transformers')}")
    cuda = torch.cuda.is_available()
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
                  f"{p.multi_processor_count} SMs")
        try:
            import subprocess

            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            print(f"driver {drv[0] if drv else 'unknown'}")
        except Exception:  # noqa: BLE001
            print("driver unknown (nvidia-smi not found)")
    else:
        print("GPU: none (CUDA not available)")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
          f"ROBERTA_FAST_BACKEND={os.environ.get('ROBERTA_FAST_BACKEND', '(unset)')}")
    dev = torch.device("cuda" if cuda else "cpu")
    print(f"backends on {dev.type}:")
    for b, why in backends.available(dev).items():
        print(f"  {b:7s} {'available' if why is None else 'unavailable: ' + why}")
    mod = backends.cuda_module()
    print(f"compiled module roberta_fast._C: {'built (' + str(mod.__file__) + ')' if mod else 'not built'}")
    emu = backends.cuda_ops.emulated_module()
    print(f"emulated build roberta_fast._C_emu: {'built (' + str(emu.__file__) + ')' if emu else 'not built'}")
    try:
        default = backends.resolve("layer_norm", None, dev)
    except (ValueError, backends.BackendUnavailableError) as e:  # a bad setting is what this command reports
        print(f"default backend for {dev.type} tensors: none; problem: {e}")
        return 1
    print(f"default backend for {dev.type} tensors: {default}")
    return 0


def _split(values) -> list[str]:
    return [v.strip() for item in values or () for v in item.split(",") if v.strip()]


def cmd_tune(args, argv) -> int:
    import torch

    from roberta_fast import backends, tuning

    if args.clear:
        removed = tuning.clear()
        print(f"removed {len(removed)} tuning file(s) from {tuning.cache_dir()}")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if args.show:
        if device != "cuda":
            files = sorted(tuning.cache_dir().glob("tuning_*.json"))
            print(f"no CUDA GPU here; {len(files)} tuning file(s) in {tuning.cache_dir()}"
                  + "".join(f"\n  {f.name}" for f in files))
            return 0
        path, entries = tuning.load_entries(device)
        if not entries:
            print(f"nothing tuned for this GPU and these versions yet ({path} does not exist or is not valid); "
                  "run `roberta-fast tune`")
            return 0
        print(tuning.format_table(entries))
        print(f"cache: {path} ({len(entries)} buckets)")
        return 0
    if device is None or (device == "cuda" and not torch.cuda.is_available()):
        print("roberta-fast tune: no CUDA GPU here, nothing tuned and nothing written "
              "(`--device cpu` runs a smoke test of the tuner under TRITON_INTERPRET=1)")
        return 0
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton must run under the interpreter on CPU tensors, set before triton is imported
        env = dict(os.environ, TRITON_INTERPRET="1")
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "roberta_fast.cli", *argv], env)
    try:
        dtypes = [tuning.parse_dtype(d) for d in _split(args.dtypes)] or ["float16", "bfloat16"]
        ops = _split(args.ops) or None
        modes = ("fwd", "train") if args.train else ("fwd",)
        if device == "cuda":
            p = torch.cuda.get_device_properties(torch.cuda.current_device())
            print(f"tuning on {p.name} (sm_{p.major}{p.minor}); torch {torch.__version__}, "
                  f"roberta_fast._C {'built' if backends.cuda_built() else 'not built'}")
        res = tuning.tune(ops=ops, dtypes=dtypes, device=device, modes=modes, quick=args.quick,
                          rep_ms=args.rep_ms, save=device == "cuda" and not args.no_save,
                          log=None if args.quiet else tuning.log_stderr, configs=not args.no_configs)
    except ValueError as e:
        print(f"roberta-fast tune: {e}", file=sys.stderr)
        return 2
    print(res.format_table())
    if res.path is not None:
        print(f"cache: written to {res.path}")
    else:
        print("cache: nothing written" + (" (smoke run)" if res.smoke else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="roberta-fast", description="roberta_fast: a fast BERT-family encoder")
    sub = p.add_subparsers(dest="cmd", metavar="{bench,demo,embed,env,finetune,pretrain,tune}")
    sub.required = True
    b = sub.add_parser("bench", help="kernel and encoder benchmarks (JSON, markdown, plots)",
                       description="Benchmarks every op and the encoder against eager PyTorch and the "
                                   "measured hardware ceilings. Without a GPU: the reduced CPU run.")
    bench_run.add_arguments(b)  # the options live with the harness (its module imports nothing heavy)
    d = sub.add_parser("demo", help="encode sample sentences and check parity with transformers", add_help=False)
    d.add_argument("args", nargs=argparse.REMAINDER)
    e = sub.add_parser("embed", help="sentence embeddings of a file (text lines, jsonl, csv, parquet) or, without "
                                     "--input, the main job on the built-in all-MiniLM-L6-v2",
                       description=embed_job.__doc__.split("\n\n")[0])
    embed_job.add_arguments(e)  # the options live with the job (roberta_fast/embed/job.py)
    sub.add_parser("env", help="versions, GPU and the backends available here")
    from roberta_fast.train import cli as train_cli

    f = sub.add_parser("finetune", help="fine-tune a checkpoint: seq-cls, token-cls or qa (docs/finetune.md)",
                       description=train_cli.__doc__.split("\n\n")[0])
    train_cli.add_arguments(f)  # the options live with the trainer (roberta_fast/train/cli.py)
    from roberta_fast.pretrain import cli as pretrain_cli

    pt = sub.add_parser("pretrain", help="MLM pretraining from scratch on a folder of text files or the built-in "
                                         "corpus (docs/pretraining.md)",
                        description=pretrain_cli.__doc__.split("\n\n")[0])
    pretrain_cli.add_arguments(pt)  # the options live with the loop (roberta_fast/pretrain/cli.py)
    t = sub.add_parser("tune", help="pick the fastest verified backend per op and shape on this GPU and cache it",
                       description="Times every backend (torch, triton, cuda when built) of every op at RoBERTa "
                                   "shapes on this GPU, and the Triton kernels' candidate block configs, checks "
                                   "each one's output against the reference, and caches the fastest verified "
                                   "backend and Triton config per shape bucket; the ops then use them "
                                   "automatically. ROBERTA_FAST_TUNING=0 turns the lookups off; "
                                   "ROBERTA_FAST_CACHE_DIR moves the cache.")
    t.add_argument("--ops", nargs="+", metavar="OP", default=None,
                   help="ops to tune (space or comma separated): layer_norm bias_gelu masked_softmax attention "
                        "attention_varlen (default: all)")
    t.add_argument("--dtypes", nargs="+", metavar="DTYPE", default=None,
                   help="float16 / bfloat16 / float32 (or fp16, bf16, fp32); default: float16 bfloat16")
    t.add_argument("--quick", action="store_true", help="one token count (32768) and hidden 768, shorter timings")
    t.add_argument("--train", action="store_true",
                   help="also tune forward+backward (used when grad mode is on); default: forward only")
    t.add_argument("--rep-ms", type=float, default=None, metavar="MS",
                   help="time per measurement (default 100, --quick 40)")
    t.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available; cpu: a smoke run under TRITON_INTERPRET=1 (not a tuning)")
    t.add_argument("--show", action="store_true", help="print what is cached for this GPU and exit")
    t.add_argument("--clear", action="store_true", help="delete every cached tuning file and exit")
    t.add_argument("--no-configs", action="store_true",
                   help="pick backends only: time triton with its default block configs and record none "
                        "(default: also pick the Triton block configs per bucket among each kernel's candidates)")
    t.add_argument("--no-save", action="store_true", help="measure and print, write nothing")
    t.add_argument("--quiet", action="store_true", help="no per-case progress lines on stderr")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # everything after `demo` belongs to the demo's own parser
        demo = importlib.import_module("roberta_fast.demo")
        rc = demo.main(argv[1:])
        return int(rc or 0)
    args = build_parser().parse_args(argv)
    if args.cmd == "env":
        return cmd_env()
    if args.cmd == "embed":
        return embed_job.run_from_args(args)
    if args.cmd == "finetune":
        from roberta_fast.train import cli as train_cli

        return train_cli.run_from_args(args)
    if args.cmd == "pretrain":
        from roberta_fast.pretrain import cli as pretrain_cli

        return pretrain_cli.run_from_args(args)
    if args.cmd == "tune":
        return cmd_tune(args, argv)
    if args.cmd == "bench":
        if _needs_interpreter_restart(argv):
            env = dict(os.environ, TRITON_INTERPRET="1")
            sys.stdout.flush()
            os.execve(sys.executable, [sys.executable, "-m", "roberta_fast.cli", *argv], env)
        return bench_run.run_from_args(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
