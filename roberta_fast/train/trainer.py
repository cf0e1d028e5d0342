"""The fine-tuning loop: sequence classification, token classification and extractive QA.

    from roberta_fast.train import TrainArgs, Trainer
    result = Trainer(TrainArgs(model_dir="ckpt", train="train.jsonl", eval="dev.jsonl", task="seq-cls",
                               output="out", precision="bf16")).fit()

One optimizer step = `accumulation` micro-batches of the global batch plan (data.plan_batches); each rank
takes its shard of every micro-batch (data.shard). The loss of a step is the SUM of the per-example (or
per-token) losses over the whole step, divided by the step's global count (examples; labelled tokens for
token-cls; 2 x examples for QA's start+end), computed from the logits here: so it is the exact mean over the
step whatever the micro-batch and shard sizes, and a data-parallel run gives the loss curve of a
single-process run with the same global batch. Under DDP each rank's loss is multiplied by the world size
because DDP averages gradients.

The QA loss masks padded positions of the start/end logits (they cannot be an answer; transformers' own QA
loss lets them compete, which makes it depend on how much padding a batch has).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import data as D
from . import optim as O

PRECISIONS = ("fp32", "bf16", "fp16")
# the options that decide which examples make each step: a resumed run must keep them
_PLAN_KEYS = ("task", "seed", "accumulation", "max_steps", "epochs", "fsdp")


@dataclass
class TrainArgs:
    """Every option of a fine-tuning run (the CLI's flags, same names with dashes)."""

    model_dir: str | None = None  # checkpoint folder: config.json, model.safetensors, tokenizer.json
    train: str | None = None  # training data (.jsonl / .json / .csv / .tsv)
    eval: str | None = None  # evaluation data, evaluated after every epoch and at the end
    task: str = "seq-cls"  # seq-cls | token-cls | qa
    output: str = "finetune_out"
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 5e-5
    weight_decay: float = 0.01
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    batch_tokens: int = 4096  # per device and micro-batch: examples x longest length <= this
    eval_batch_tokens: int | None = None  # default: 2 x batch_tokens
    accumulation: int = 1  # micro-batches per optimizer step
    clip: float = 1.0  # max gradient norm (0: no clipping)
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + dynamic loss scaling)
    freeze_embeddings: bool = False
    freeze_layers: int = 0  # freeze encoder layers 0 .. N-1
    seed: int = 42
    num_labels: int | None = None  # default: from the training labels
    max_length: int | None = None  # default: the model's maximum
    label_all_subtokens: bool = False  # token-cls: label every sub-token of a word, not only the first
    max_answer_length: int = 30  # qa evaluation: longest predicted span, in tokens
    dropout: float | None = None  # override hidden, attention and classifier dropout of the config
    save_every: int = 0  # checkpoint every N optimizer steps (and always at each epoch end); 0: epochs only
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest complete checkpoint in OUTPUT/checkpoints
    log_every: int = 1
    progress: bool = True
    fsdp: bool = False  # FSDP2 (torch.distributed.fsdp.fully_shard, per encoder layer) instead of DDP
    device: str | None = None  # default: cuda:LOCAL_RANK when CUDA is available, else cpu
    backend: str | None = None  # roberta_fast op backend (torch | triton | cuda | None = automatic)
    hf: bool = False  # load the transformers model and roberta_fast.optimize() it instead of ours

    def check(self):
        D.check_task(self.task)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("batch_tokens", "accumulation", "epochs", "log_every", "max_answer_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_steps must be >= 0 and warmup_ratio in [0, 1)")
        if self.clip < 0 or self.freeze_layers < 0 or self.save_every < 0:
            raise ValueError("clip, freeze_layers and save_every must be >= 0")
        if self.train is None:
            raise ValueError("no training data: give train= (a .jsonl / .json / .csv / .tsv file)")
        return self


@dataclass
class TrainResult:
    output: str
    steps: int
    losses: list = field(default_factory=list)  # (step, loss) of the steps this process ran
    eval: list = field(default_factory=list)  # evaluation dicts
    skipped_steps: int = 0
    resumed_from: str | None = None


class _Dist:
    def __init__(self):
        self.owned = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not (dist.is_available() and dist.is_initialized()):
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
            self.owned = True
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.on else 0

    def barrier(self):
        if self.on:
            dist.barrier()

    def sum_(self, t):
        if self.on:
            dist.all_reduce(t)
        return t

    def close(self):
        if self.owned:
            dist.destroy_process_group()


Dist = _Dist  # the process group of a run (torchrun's environment); roberta_fast.pretrain uses it too


def seed_all(seed: int):
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _read_config(model_dir) -> dict:
    p = os.path.join(os.fspath(model_dir), "config.json")
    if not os.path.isfile(p):
        if not os.path.isdir(os.fspath(model_dir)):
            raise D.DataError(f"model folder {os.fspath(model_dir)!r} does not exist")
        raise D.DataError(f"no config.json in {os.fspath(model_dir)!r} (a checkpoint folder written by "
                          "save_pretrained is expected)")
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def _named_labels(config: dict):
    """config.json's id2label when it names real classes (not transformers' LABEL_i defaults)."""
    m = config.get("id2label")
    if not m:
        return None
    m = {int(k): v for k, v in m.items()}
    return None if all(v == f"LABEL_{k}" for k, v in m.items()) else m


def load_model(model_dir, task: str, num_labels: int, *, hf=False, backend=None, dropout=None):
    """The head model for `task` from a checkpoint folder: roberta_fast's (RoBERTa or BERT family by
    config.json's model_type), or transformers' AutoModelFor... passed through roberta_fast.optimize (hf=True)."""
    from .. import model as rf
    from ..optimize import optimize

    config = _read_config(model_dir)
    overrides = {"num_labels": num_labels}
    if dropout is not None:
        overrides.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, classifier_dropout=dropout)
    if hf:
        import transformers

        auto = {"seq-cls": transformers.AutoModelForSequenceClassification,
                "token-cls": transformers.AutoModelForTokenClassification,
                "qa": transformers.AutoModelForQuestionAnswering}[task]
        return optimize(auto.from_pretrained(os.fspath(model_dir), dtype=torch.float32, **overrides))
    roberta = config.get("model_type", "bert") in ("roberta", "xlm-roberta", "camembert")
    cls = {("seq-cls", True): rf.RobertaForSequenceClassification, ("seq-cls", False): rf.BertForSequenceClassification,
           ("token-cls", True): rf.RobertaForTokenClassification, ("token-cls", False): rf.BertForTokenClassification,
           ("qa", True): rf.RobertaForQuestionAnswering, ("qa", False): rf.BertForQuestionAnswering}[(task, roberta)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*freshly initialized.*|.*newly initialized.*")
        return cls.from_pretrained(os.fspath(model_dir), dtype=torch.float32, backend=backend, **overrides)


def _up(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def loss_sum(task: str, out, batch: dict) -> torch.Tensor:
    """The SUM of the per-example (seq-cls), per-labelled-token (token-cls) or start + end (qa) cross entropies,
    in fp32 (float64 for a float64 model), from a model output with transformers' field names."""
    if task == "seq-cls":
        return F.cross_entropy(_up(out.logits), batch["labels"], reduction="sum")
    if task == "token-cls":
        logits = _up(out.logits)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                               ignore_index=D.IGNORE, reduction="sum")
    pad = batch["attention_mask"] == 0
    s, e = _up(out.start_logits), _up(out.end_logits)
    lo = torch.finfo(s.dtype).min
    s, e = s.masked_fill(pad, lo), e.masked_fill(pad, lo)
    return (F.cross_entropy(s, batch["start_positions"], reduction="sum")
            + F.cross_entropy(e, batch["end_positions"], reduction="sum"))


def _f1s(conf: torch.Tensor) -> tuple:
    """accuracy and macro F1 from a confusion matrix (rows gold, columns predicted); classes that occur in
    neither the gold labels nor the predictions are left out of the macro average."""
    conf = conf.double()
    total = conf.sum().item()
    tp = conf.diag()
    gold, pred = conf.sum(1), conf.sum(0)
    present = (gold + pred) > 0
    f1 = torch.where(present, 2 * tp / (gold + pred).clamp_min(1), torch.zeros_like(tp))
    macro = (f1[present].mean().item() if present.any() else 0.0)
    return (tp.sum().item() / total if total else 0.0), macro


class RunBase:
    """What a training run does alike whether it fine-tunes (Trainer) or pretrains (roberta_fast.pretrain's
    Pretrainer): the device, autocast, the optimizer step (fp16 unscaling, clipping, skipped steps, the schedule),
    writing a checkpoint (manifest last, RNG states per rank), restoring its common parts, the resume preamble of
    fit(), metrics.jsonl and the progress bar. The subclass sets args (precision, clip, device, output,
    keep_checkpoints, resume, progress), log, dist, model (wrapped), raw, optimizer, scheduler, scaler and _fused,
    and calls _init_run() once it has dist and args."""

    def _init_run(self):
        a = self.args
        if a.device is not None:
            self.device = torch.device(a.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", self.dist.local_rank)
        else:
            self.device = torch.device("cpu")
        self.is_main = self.dist.rank == 0
        self.ckpt_root = os.path.join(a.output, "checkpoints")
        self.metrics_path = os.path.join(a.output, "metrics.jsonl")

    def _autocast(self):
        p = self.args.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def _params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def _optimizer_step(self) -> dict:
        """After the backward passes of a step: unscale (fp16), clip, step (or skip on an fp16 overflow), zero the
        gradients, advance the schedule. Returns the step's lr, grad_norm (None unclipped) and skipped."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        norm = None
        if self.args.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self._params(), self.args.clip)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
                norm = norm.full_tensor()
        skipped = False
        if self.scaler.is_enabled():
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < before
        else:
            self.optimizer.step()
        if self._fused:
            # torch's fused AdamW updates the parameters without bumping their version counters, so caches
            # keyed on Tensor._version (the model's fused QKV weight in inference) would not see the update
            for p in self._params():
                torch.autograd.graph.increment_version(p)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return {"lr": lr, "grad_norm": None if norm is None else float(norm), "skipped": skipped}

    def _write_checkpoint(self, step: int, model_sd, opt_sd, state: dict) -> str | None:
        """Checkpoint `step` (every rank takes part: its RNG state; rank 0 writes the model, the optimizer and
        `state` plus the scheduler's and scaler's, then the manifest). Returns the folder on rank 0."""
        if self.is_main:
            os.makedirs(self.ckpt_root, exist_ok=True)
            ckpt.begin(self.ckpt_root, step)
        self.dist.barrier()
        tmp = os.path.join(self.ckpt_root, ckpt.step_dir_name(step) + ".tmp")
        ckpt.atomic_save(ckpt.rng_state(), os.path.join(tmp, f"rng-rank{self.dist.rank}.pt"))
        self.dist.barrier()
        final = None
        if self.is_main:
            ckpt.atomic_save(model_sd, os.path.join(tmp, "model.pt"))
            ckpt.atomic_save(opt_sd, os.path.join(tmp, "optimizer.pt"))
            state = {"step": step, **state, "skipped_steps": self.skipped,
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
            ckpt.atomic_save(state, os.path.join(tmp, "trainer_state.pt"))
            final = ckpt.finish(tmp, step, keep=self.args.keep_checkpoints)
        self.dist.barrier()
        return final

    def _restore_common(self, path, state: dict):
        """The scheduler, the loss scaler and this rank's RNG states of the checkpoint at `path`."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(ckpt.load(path, f"rng-rank{self.dist.rank}.pt"))

    def _start(self):
        """The start of fit(): on resume the newest checkpoint loaded (load_checkpoint) and the metrics rows after
        it dropped, else the old metrics file removed. Returns (trainer state, its folder) or (None, None)."""
        self.skipped = 0
        state = path = None
        if self.args.resume:
            found = ckpt.newest(self.ckpt_root)
            if found is None:
                if self.is_main:
                    self.log(f"--resume: no checkpoint in {self.ckpt_root}, starting from the beginning")
            else:
                path = found[1]
                state = self.load_checkpoint(path)
                self.skipped = state["skipped_steps"]
                self._trim_metrics(state["step"])
        elif self.is_main and os.path.isfile(self.metrics_path):
            os.remove(self.metrics_path)
        self.dist.barrier()
        return state, path

    def _progress(self, total: int, initial: int, desc: str):
        """A tqdm bar on rank 0 when args.progress (None without tqdm)."""
        if not (self.args.progress and self.is_main):
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def _write_metrics(self, row: dict):
        if not self.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def _trim_metrics(self, step: int):
        """After a resume: drop the rows the interrupted run wrote after the checkpoint's step."""
        if not self.is_main or not os.path.isfile(self.metrics_path):
            return
        with open(self.metrics_path, encoding="utf-8") as f:
            rows = [json.loads(x) for x in f if x.strip()]
        kept = [r for r in rows if r.get("step", 0) <= step]
        ckpt.atomic_text("".join(json.dumps(r) + "\n" for r in kept), self.metrics_path)


class Trainer(RunBase):
    """Fine-tune a BERT-family head model (roberta_fast's, or a transformers one passed through optimize())."""

    def __init__(self, args: TrainArgs, *, model=None, tokenizer=None, on_step=None, log=None):
        self.args = args.check()
        self.on_step = on_step  # called as on_step(step, loss) after every optimizer step (tests, callbacks)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.dist = _Dist()
        a = self.args
        if a.fsdp and not self.dist.on:
            raise ValueError("fsdp needs several processes (launch with torchrun --nproc-per-node N)")
        self._init_run()
        self.config = _read_config(a.model_dir) if a.model_dir is not None else {}
        if tokenizer is None:
            if a.model_dir is None:
                raise ValueError("give model_dir (the checkpoint folder with tokenizer.json) or a tokenizer")
            tokenizer = D.load_tokenizer(a.model_dir)
        self.tokenizer = tokenizer
        cfg = self.config or self._config_of(model)
        limit = D.max_model_length(cfg, a.model_dir)
        if a.max_length is not None and not 1 < a.max_length <= limit:
            raise ValueError(f"max_length must be in [2, {limit}] (the model's maximum), got {a.max_length}")
        self.max_length = a.max_length or limit
        self.pad_id = D.pad_token_id(tokenizer, cfg)
        self.train_ds = D.load_dataset(a.train, a.task, tokenizer, max_length=self.max_length,
                                       num_labels=a.num_labels if a.task != "qa" else None,
                                       id2label=_named_labels(cfg), label_all_subtokens=a.label_all_subtokens)
        self.eval_ds = None
        if a.eval is not None:
            self.eval_ds = D.load_dataset(a.eval, a.task, tokenizer, max_length=self.max_length,
                                          labels=self.train_ds.labels, label_all_subtokens=a.label_all_subtokens)
        self.num_labels = 2 if a.task == "qa" else self.train_ds.labels.num_labels
        seed_all(a.seed)  # the same head initialization on every rank (DDP also broadcasts rank 0's)
        if model is None:
            model = load_model(a.model_dir, a.task, self.num_labels, hf=a.hf, backend=a.backend, dropout=a.dropout)
        self.raw = model
        self._set_label_names()
        self.use_type_ids = int(cfg.get("type_vocab_size", 2)) > 1
        self.frozen = O.freeze(model, embeddings=a.freeze_embeddings, layers=a.freeze_layers)
        model.to(self.device)
        self.model = self._wrap(model)
        self.optimizer = O.make_adamw(O.param_groups(self.model if a.fsdp else model, a.weight_decay), a.lr,
                                      betas=tuple(a.adam_betas), eps=a.adam_eps, device=self.device)
        self._fused = O.is_fused(self.optimizer)
        self._plans = {}
        self.total_steps = self._count_steps()
        warm = a.warmup_steps or int(a.warmup_ratio * self.total_steps)
        self.scheduler = O.make_schedule(self.optimizer, warm, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=a.precision == "fp16")
        seed_all(a.seed + self.dist.rank)  # dropout streams: one per rank

    # ---------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _config_of(model):
        c = getattr(model, "config", None)
        if c is None:
            return {}
        return c.to_dict() if hasattr(c, "to_dict") else dict(vars(c))

    def _set_label_names(self):
        labels = self.train_ds.labels
        if labels is None or labels.names is None:
            return
        cfg = self.raw.config
        cfg.id2label = dict(enumerate(labels.names))
        if hasattr(cfg, "label2id"):
            cfg.label2id = {n: i for i, n in enumerate(labels.names)}

    def _wrap(self, model):
        if not self.dist.on:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        if self.args.fsdp:
            try:
                from torch.distributed.fsdp import fully_shard  # FSDP2: torch >= 2.6
            except ImportError as e:
                raise ValueError(f"--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard): {e}") from None
            self._plain_cls = type(model)
            for name, m in model.named_modules():  # one unit per encoder layer, then the rest
                if name.rsplit(".", 1)[0].endswith("encoder.layer"):
                    fully_shard(m)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=ids)

    def _plan(self, epoch: int) -> list:
        if epoch not in self._plans:
            self._plans = {epoch: D.plan_batches(self.train_ds.lengths(), self.args.batch_tokens * self.dist.world,
                                                 seed=self.args.seed, epoch=epoch, min_size=self.dist.world)}
        return self._plans[epoch]

    def _count_steps(self) -> int:
        if self.args.max_steps is not None:
            return self.args.max_steps
        acc = self.args.accumulation
        return sum(math.ceil(len(self._plan(e)) / acc) for e in range(self.args.epochs))

    def _inputs(self, batch):
        return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}

    # ---------------------------------------------------------------------------------------------- steps
    def train_step(self, group: list) -> dict:
        """One optimizer step over the micro-batches `group` (lists of example indices of the global plan)."""
        a, ds, w = self.args, self.train_ds, self.dist.world
        self.model.train()
        denom = max(1, D.loss_count([ds.examples[i] for b in group for i in b], a.task))
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, real tokens
        for k, gb in enumerate(group):
            exs = [ds.examples[i] for i in D.shard(gb, self.dist.rank, w)]
            batch = {t: v.to(self.device) for t, v in D.collate(exs, a.task, self.pad_id, self.use_type_ids).items()}
            last = k == len(group) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self._autocast():
                    out = self.model(**self._inputs(batch))
                ls = loss_sum(a.task, out, batch)
                self.scaler.scale(ls * (w / denom)).backward()
            acc[0] += ls.detach().double()
            acc[1] += batch["attention_mask"].sum()
        o = self._optimizer_step()
        self.dist.sum_(acc)
        return {"loss": acc[0].item() / denom, "tokens": int(acc[1].item()), **o}

    # ---------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, ds=None) -> dict:
        """Metrics on `ds` (default: the eval file): loss; accuracy and macro F1 (seq-cls); token accuracy and
        token macro F1 over labelled tokens (token-cls); exact match and F1 in percent, SQuAD's normalization
        (qa). Every rank evaluates its shard of each batch; the counts are summed across ranks."""
        ds = ds or self.eval_ds
        a, w = self.args, self.dist.world
        self.model.eval()
        k = self.num_labels
        conf = torch.zeros((k, k), dtype=torch.float64, device=self.device)
        qa = torch.zeros(3, dtype=torch.float64, device=self.device)  # em, f1, n
        loss = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum, count
        budget = (a.eval_batch_tokens or 2 * a.batch_tokens) * w
        for gb in D.plan_batches(ds.lengths(), budget, shuffle=False, min_size=w):
            exs = [ds.examples[i] for i in D.shard(gb, self.dist.rank, w)]
            batch = {t: v.to(self.device) for t, v in D.collate(exs, a.task, self.pad_id, self.use_type_ids).items()}
            with self._autocast():
                out = self.model(**self._inputs(batch))
            loss[0] += loss_sum(a.task, out, batch).double()
            loss[1] += D.loss_count(exs, a.task)
            if a.task == "seq-cls":
                pred = out.logits.argmax(-1)
                conf.index_put_((batch["labels"], pred), torch.ones_like(pred, dtype=conf.dtype), accumulate=True)
            elif a.task == "token-cls":
                keep = batch["labels"] != D.IGNORE
                gold, pred = batch["labels"][keep], out.logits.argmax(-1)[keep]
                conf.index_put_((gold, pred), torch.ones_like(pred, dtype=conf.dtype), accumulate=True)
            else:
                for i, ex in enumerate(exs):
                    em, f1 = self._qa_score(ex, out.start_logits[i].float().cpu(), out.end_logits[i].float().cpu())
                    qa += torch.tensor([em, f1, 1.0], dtype=torch.float64, device=self.device)
        self.dist.sum_(conf)
        self.dist.sum_(qa)
        self.dist.sum_(loss)
        res = {"loss": loss[0].item() / max(1.0, loss[1].item()), "examples": len(ds)}
        if a.task == "qa":
            n = max(1.0, qa[2].item())
            res.update(exact_match=100 * qa[0].item() / n, f1=100 * qa[1].item() / n)
        else:
            accuracy, macro = _f1s(conf)
            prefix = "token_" if a.task == "token-cls" else ""
            res.update({f"{prefix}accuracy": accuracy, f"{prefix}macro_f1": macro})
        return res

    def _qa_score(self, ex, start, end) -> tuple:
        """(exact match, F1) of the best span inside the context: start <= end < start + max_answer_length."""
        ctx = ex.qa["ctx_tokens"]
        s, e = start[ctx[0]:ctx[-1] + 1], end[ctx[0]:ctx[-1] + 1]
        n = s.shape[0]
        scores = s[:, None] + e[None, :]
        ok = torch.ones(n, n, dtype=torch.bool).triu() & ~torch.ones(n, n, dtype=torch.bool).triu(
            self.args.max_answer_length)
        i, j = divmod(int(scores.masked_fill(~ok, float("-inf")).argmax()), n)
        offs = ex.qa["offsets"]
        pred = ex.qa["context"][offs[i][0]:offs[j][1]]
        golds = ex.qa["answers"]
        em = max(float(D.normalize_answer(pred) == D.normalize_answer(g)) for g in golds)
        return em, max(D.answer_f1(pred, g) for g in golds)

    # ---------------------------------------------------------------------------------------------- checkpoints
    def _model_state(self):
        if self.args.fsdp:  # gathered: full tensors on CPU (keyed by parameter name for the optimizer)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            return get_state_dict(self.model, self.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.raw.state_dict(), self.optimizer.state_dict()

    def save_checkpoint(self, step: int, epoch: int, batch_index: int) -> str | None:
        """Write the checkpoint of `step` (every rank takes part; rank 0 writes the shared files)."""
        a = self.args
        model_sd, opt_sd = self._model_state()
        state = {"epoch": epoch, "batch_index": batch_index, "seed": a.seed, "world_size": self.dist.world,
                 "global_batch_tokens": a.batch_tokens * self.dist.world, "total_steps": self.total_steps,
                 "plan": {k: getattr(a, k) for k in _PLAN_KEYS}}
        return self._write_checkpoint(step, model_sd, opt_sd, state)

    def load_checkpoint(self, path) -> dict:
        """Restore everything from a checkpoint directory (verified first) and return its trainer state."""
        ckpt.verify(path)
        a = self.args
        state = ckpt.load(path, "trainer_state.pt")
        mine = {"world_size": self.dist.world, "global_batch_tokens": a.batch_tokens * self.dist.world,
                **{k: getattr(a, k) for k in _PLAN_KEYS}}
        saved = {"world_size": state["world_size"], "global_batch_tokens": state["global_batch_tokens"],
                 **state["plan"]}
        diff = [f"{k}: checkpoint {saved.get(k)!r}, now {mine[k]!r}" for k in mine if saved.get(k) != mine[k]]
        if diff:
            raise ValueError(f"cannot resume from {path}: the run's batches would differ ({'; '.join(diff)}); "
                             "use the same options, or a new output folder")
        model_sd = ckpt.load(path, "model.pt")
        opt_sd = ckpt.load(path, "optimizer.pt")
        if a.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=opt_sd,
                           options=StateDictOptions(full_state_dict=True))
        else:
            self.raw.load_state_dict(model_sd)
            self.optimizer.load_state_dict(opt_sd)
        self._restore_common(path, state)
        return state

    # ---------------------------------------------------------------------------------------------- the run
    def _eval_row(self, step, epoch):
        res = self.evaluate()
        row = {"type": "eval", "step": step, "epoch": epoch, **res}
        self._write_metrics(row)
        if self.is_main:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float))
            self.log(f"eval after step {step} (epoch {epoch}): {shown}")
        return row

    def fit(self) -> TrainResult:
        a = self.args
        if self.is_main:
            os.makedirs(a.output, exist_ok=True)
        step, epoch, bi = 0, 0, 0
        result = TrainResult(output=a.output, steps=0)
        state, result.resumed_from = self._start()
        if state is not None:
            step, epoch, bi = state["step"], state["epoch"], state["batch_index"]
            if self.is_main:
                self.log(f"resumed from {result.resumed_from} (step {step}, epoch {epoch}, batch {bi})")
        bar = self._progress(self.total_steps, step, f"finetune {a.task}")
        t0, tokens = time.perf_counter(), 0
        evaluated_at = None
        try:
            while step < self.total_steps:
                plan = self._plan(epoch)
                while bi < len(plan) and step < self.total_steps:
                    group = plan[bi:bi + a.accumulation]
                    r = self.train_step(group)
                    bi += len(group)
                    step += 1
                    tokens += r["tokens"]
                    self.skipped += r["skipped"]
                    if r["skipped"] and self.is_main:
                        self.log(f"step {step}: fp16 gradients overflowed, step skipped (loss scale now "
                                 f"{self.scaler.get_scale():g}; {self.skipped} skipped so far)")
                    result.losses.append((step, r["loss"]))
                    tps = tokens / max(1e-9, time.perf_counter() - t0)
                    if step % a.log_every == 0 or step == self.total_steps:
                        row = {"type": "train", "step": step, "epoch": epoch, "loss": r["loss"], "lr": r["lr"],
                               "grad_norm": r["grad_norm"], "tokens": r["tokens"], "tokens_per_s": tps,
                               "skipped_steps": self.skipped}
                        if self.scaler.is_enabled():
                            row["loss_scale"] = self.scaler.get_scale()
                        self._write_metrics(row)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{r['loss']:.4f}", tok_s=f"{tps:,.0f}", lr=f"{r['lr']:.2e}",
                                        refresh=False)
                    if self.on_step is not None:
                        self.on_step(step, r["loss"])
                    if a.save_every and step % a.save_every == 0 and step < self.total_steps:
                        self.save_checkpoint(step, epoch, bi)
                if bi >= len(plan):
                    epoch, bi = epoch + 1, 0
                    if self.eval_ds is not None:
                        result.eval.append(self._eval_row(step, epoch))
                        evaluated_at = step
                    if step < self.total_steps:
                        self.save_checkpoint(step, epoch, bi)
        finally:
            if bar is not None:
                bar.close()
        if self.eval_ds is not None and evaluated_at != step:
            result.eval.append(self._eval_row(step, epoch))
        self.save_checkpoint(step, epoch, bi)
        self.save_pretrained(a.output)
        result.steps = step
        result.skipped_steps = self.skipped
        if self.is_main:
            self.log(f"done: {step} steps, {self.skipped} skipped; model written to {a.output}")
        self.dist.close()
        return result

    def save_pretrained(self, path):
        """config.json + model.safetensors (transformers' layout) + the tokenizer files, loadable by
        transformers' AutoModelFor... and by roberta_fast's classes."""
        model = self.raw
        if self.args.fsdp:  # gather the full weights into a plain copy of the model on rank 0
            full, _ = self._model_state()
            if self.is_main:
                with torch.device("meta"):
                    model = self._plain_cls(self.raw.config)
                model.load_state_dict(full, assign=True)
        if self.is_main:
            os.makedirs(path, exist_ok=True)
            model.save_pretrained(path)
        if not self.is_main:
            return
        src = self.args.model_dir
        copied = False
        for name in D.TOKENIZER_FILES:
            if src is not None and os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(path, name))
                copied |= name == "tokenizer.json"
        if not copied:
            self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.args).items()}
        ckpt.atomic_text(json.dumps(args, indent=1), os.path.join(path, "training_args.json"))


def train(args: TrainArgs | None = None, **kwargs) -> TrainResult:
    """Trainer(TrainArgs(**kwargs)).fit()."""
    return Trainer(args if args is not None else TrainArgs(**kwargs)).fit()
