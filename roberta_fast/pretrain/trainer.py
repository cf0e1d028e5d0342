"""The pretraining loop: masked language modelling of a RobertaForMaskedLM from scratch on a streamed corpus.

One optimizer step takes world_size x accumulation micro-batches from the stream (PackedStream: packed batches of
`batch_tokens` tokens); micro-batch j of step s is masked by the collator with step index s * n + j (n micro-batches
a step), so the masks depend only on the step, never on what ran before: a resumed run masks every batch as the
uninterrupted run did. Every rank reads (and masks) every micro-batch of the step and trains on those with
j % world_size == rank, so the step's global count of masked tokens is known everywhere without communication.
The loss of a step is the SUM of the cross entropies at the masked positions over its micro-batches divided by
that count: the exact mean over the step, the same for any split into ranks and accumulation (DDP averages the
gradients, so each rank's part is multiplied by the world size, as in the fine-tuning trainer).

The model computes the loss through its fused masked-only head (RobertaForMaskedLM with fused_loss: no
(tokens x vocab) logits). Optimizer, schedule, checkpoints, RNG states and the process group are the fine-tuning
trainer's (roberta_fast.train: optim, checkpoint, trainer.Dist).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from ..data.masking import IGNORE_INDEX, MLMCollator
from ..model.config import EncoderConfig
from ..model.heads import RobertaForMaskedLM
from ..train import checkpoint as ckpt
from ..train import optim as O
from ..train.trainer import Dist, RunBase, seed_all
from . import tokenizer as T
from .corpus import Corpus, PackedStream, write_builtin_corpus
from .evaluate import mlm_eval, unigram_entropy

PRECISIONS = ("fp32", "bf16", "fp16")

# model presets: the encoder's shape and the run's defaults that go with it
PRESETS = {
    # 0.5 M parameters, sequences of 16 tokens. On the built-in corpus a masked token's prediction starts to use its
    # neighbours after ~300 steps (the plateau at the unigram entropy lasts longer the longer the sequences: 128
    # tokens had not left it after 1,200 steps); docs/pretraining.md has the figures. A few CPU minutes
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512,
             "vocab_size": 512, "max_seqlen": 16, "batch_tokens": 2048, "lr": 2e-3, "max_steps": 2000,
             "dropout": 0.0},
    # roberta-base's shape (125 M parameters with a 50,265 vocabulary); RoBERTa's peak lr for a batch of 8k x 512
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "vocab_size": 50265, "max_seqlen": 512, "batch_tokens": 16384, "lr": 6e-4, "max_steps": 100_000,
             "dropout": 0.1},
}
# the options that decide what each step trains on: a resumed run must keep them
_PLAN_KEYS = ("seed", "max_steps", "batch_tokens", "accumulation", "max_seqlen", "packing", "mlm_probability",
              "mask_prob", "random_prob")


@dataclass
class PretrainArgs:
    """Every option of a pretraining run (the CLI's flags, same names with dashes)."""

    corpus: str | None = None  # folder of text files; None: the built-in corpus, written to OUTPUT/builtin-corpus
    eval_corpus: str | None = None  # held-out text files evaluated at the end (built-in: OUTPUT/builtin-heldout)
    output: str = "pretrain_out"
    model: str = "tiny"  # a preset (tiny | base) or a config.json whose encoder shape to use
    tokenizer: str | None = None  # reuse this tokenizer.json (or folder); None: train byte-level BPE on the corpus
    vocab_size: int | None = None  # of the trained tokenizer (default: the preset's)
    min_frequency: int = 2  # BPE: a merge must occur this often
    max_seqlen: int | None = None  # tokens per sequence, <s> and </s> included (default: the preset's)
    packing: str = "full_sentences"  # full_sentences (RoBERTa's) | documents
    max_steps: int | None = None  # optimizer steps (default: the preset's)
    batch_tokens: int | None = None  # per device and micro-batch (default: the preset's)
    accumulation: int = 1
    lr: float | None = None  # peak learning rate (default: the preset's)
    weight_decay: float = 0.01
    adam_betas: tuple = (0.9, 0.98)  # RoBERTa's
    adam_eps: float = 1e-6  # RoBERTa's
    warmup_steps: int = 0
    warmup_ratio: float = 0.06  # used when warmup_steps is 0
    clip: float = 1.0
    precision: str = "fp32"
    mlm_probability: float = 0.15
    mask_prob: float = 0.8
    random_prob: float = 0.1
    dropout: float | None = None  # hidden and attention dropout (default: the preset's; config.json's for a file)
    seed: int = 42
    save_every: int = 100  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2
    resume: bool = False
    log_every: int = 1
    progress: bool = True
    device: str | None = None
    backend: str | None = None
    attention: str = "full"  # "full" (RoBERTa's) or "lsh" (opt-in LSH self-attention for long sequences)
    lsh_bucket_size: int = 64
    lsh_num_hashes: int = 2

    def check(self):
        if self.model not in PRESETS and not os.path.isfile(str(self.model)):
            raise ValueError(f"model must be a preset ({' | '.join(PRESETS)}) or a config.json file, got "
                             f"{self.model!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        from ..data.packing import MODES

        if self.packing not in MODES:
            raise ValueError(f"packing must be one of {', '.join(MODES)}, got {self.packing!r}")
        for name in ("max_steps", "batch_tokens", "vocab_size", "max_seqlen"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.attention not in ("full", "lsh"):
            raise ValueError(f"attention must be 'full' or 'lsh', got {self.attention!r}")
        for name in ("accumulation", "log_every", "min_frequency", "lsh_bucket_size", "lsh_num_hashes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seqlen is not None and self.max_seqlen < 3:
            raise ValueError(f"max_seqlen must be >= 3 (<s>, a token, </s>), got {self.max_seqlen}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_steps must be >= 0 and warmup_ratio in [0, 1)")
        if self.clip < 0 or self.save_every < 0 or self.keep_checkpoints < 0:
            raise ValueError("clip, save_every and keep_checkpoints must be >= 0")
        if not 0 < self.mlm_probability <= 1:
            raise ValueError(f"mlm_probability must be in (0, 1], got {self.mlm_probability}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.corpus is not None and not os.path.isdir(self.corpus):
            raise ValueError(f"corpus folder {self.corpus!r} does not exist (or is not a folder)")
        if self.eval_corpus is not None and not os.path.isdir(self.eval_corpus):
            raise ValueError(f"eval_corpus folder {self.eval_corpus!r} does not exist (or is not a folder)")
        return self

    def resolved(self) -> PretrainArgs:
        """A copy with every None default filled in: from the preset, or for a config.json its vocab_size and
        sequence length and the base preset's schedule."""
        a = dataclasses.replace(self)
        if self.model in PRESETS:
            base = dict(PRESETS[self.model])
        else:
            base = dict(PRESETS["base"])
            with open(self.model, encoding="utf-8") as f:
                d = json.load(f)
            base["vocab_size"] = int(d.get("vocab_size", base["vocab_size"]))
            positions = int(d.get("max_position_embeddings", 514)) - int(d.get("pad_token_id", 1)) - 1
            base["max_seqlen"] = min(512, positions)
            base["dropout"] = None  # the file's
        for name in ("vocab_size", "max_seqlen", "batch_tokens", "lr", "max_steps", "dropout"):
            if getattr(a, name) is None:
                setattr(a, name, base[name])
        if a.batch_tokens < a.max_seqlen:
            raise ValueError(f"batch_tokens ({a.batch_tokens}) must be >= max_seqlen ({a.max_seqlen}): the longest "
                             "sequence has to fit in a micro-batch")
        return a


@dataclass
class PretrainResult:
    output: str
    steps: int
    losses: list = field(default_factory=list)  # (step, loss) of the steps this process ran
    tokens: int = 0  # real tokens trained on by this process's steps (all ranks)
    seconds: float = 0.0
    unigram_entropy: float | None = None  # nats: the entropy of the masked targets' token distribution (all steps)
    eval: dict | None = None  # pretrain.evaluate.mlm_eval on the held-out corpus at the end (rank 0)
    skipped_steps: int = 0
    resumed_from: str | None = None


class Pretrainer(RunBase):
    """Pretrain RobertaForMaskedLM with masked language modelling (see the module docstring)."""

    def __init__(self, args: PretrainArgs, *, on_step=None, log=None):
        self.args = a = args.check().resolved()
        self.on_step = on_step  # on_step(step, loss) after every optimizer step (tests, callbacks)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.dist = Dist()
        self._init_run()  # device, is_main, checkpoint and metrics paths (RunBase)
        if self.is_main:
            os.makedirs(a.output, exist_ok=True)
        # the corpus (the built-in one: each rank writes its own copy, as the fine-tuning --builtin does, so that
        # nodes need not share a file system) and the tokenizer (decided on rank 0 and sent to the others)
        corpus_dir, self.eval_dir = a.corpus, a.eval_corpus
        if corpus_dir is None:  # a tenth of its modules held out for the evaluation at the end
            r = self.dist.rank
            suffix = "" if r == 0 else f"-rank{r}"
            held = os.path.join(a.output, "builtin-heldout" + suffix)
            corpus_dir = write_builtin_corpus(os.path.join(a.output, "builtin-corpus" + suffix), heldout=held)
            self.eval_dir = self.eval_dir or held
        self.corpus = Corpus(corpus_dir, seed=a.seed)
        self.tokenizer = self._tokenizer()
        ids = T.special_ids(self.tokenizer)
        self.ids = ids
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.config = self._config()
        seed_all(a.seed)  # the same initialization on every rank (DDP broadcasts rank 0's anyway)
        model = RobertaForMaskedLM(self.config, backend=a.backend)
        model.fused_loss = True  # the masked-only head + ops.linear_cross_entropy (off by default: logits as HF)
        model.to(self.device)
        self.raw = model
        self.model = model
        if self.dist.on:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = O.make_adamw(O.param_groups(model, a.weight_decay), a.lr, betas=tuple(a.adam_betas),
                                      eps=a.adam_eps, device=self.device)
        self._fused = O.is_fused(self.optimizer)
        warm = a.warmup_steps or int(a.warmup_ratio * a.max_steps)
        self.scheduler = O.make_schedule(self.optimizer, warm, a.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=a.precision == "fp16")
        self.collator = MLMCollator(self.vocab_size, ids["mask"], ids["all"], pad_token_id=ids["pad"],
                                    mlm_probability=a.mlm_probability, mask_prob=a.mask_prob,
                                    random_prob=a.random_prob, seed=a.seed)
        self.stream = PackedStream(self.corpus, self._encode, max_tokens=a.batch_tokens, max_seqlen=a.max_seqlen,
                                   mode=a.packing, bos=ids["bos"], eos=ids["eos"])
        self.target_counts = torch.zeros(self.vocab_size, dtype=torch.int64)
        self.tokens_total = 0
        seed_all(a.seed + self.dist.rank)  # dropout streams: one per rank

    # ---------------------------------------------------------------------------------------------- setup
    def _tokenizer(self):
        """Rank 0's choice, sent to every rank: on --resume the output's tokenizer.json (the ids the checkpoint's
        embeddings were trained with: never trained again), else the given one, else byte-level BPE trained on the
        corpus. Saved into the output folder, so that it is a self-contained checkpoint."""
        a = self.args
        saved = os.path.join(a.output, "tokenizer.json")
        text = None
        if self.is_main:
            if a.resume and os.path.isfile(saved):
                tok = T.load(saved)
            elif a.tokenizer is not None:
                tok = T.load(a.tokenizer)
                T.special_ids(tok)  # fail now, naming the missing token, not at the first batch
            else:
                t0 = time.perf_counter()
                tok = T.train_bpe(self.corpus.texts(), a.vocab_size, min_frequency=a.min_frequency)
                self.log(f"trained a byte-level BPE tokenizer on {self.corpus.root}: {tok.get_vocab_size()} tokens "
                         f"in {time.perf_counter() - t0:.1f} s")
            T.save(tok, a.output, max_length=a.max_seqlen)
            text = tok.to_str()
        if self.dist.on:
            box = [text]
            torch.distributed.broadcast_object_list(box, src=0)
            text = box[0]
        self.tokenizer_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return tok if self.is_main else T.from_str(text)

    def _config(self) -> EncoderConfig:
        a, ids = self.args, self.ids
        if a.model in PRESETS:
            p = PRESETS[a.model]
            shape = {k: p[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                       "initializer_range") if k in p}
        else:
            with open(a.model, encoding="utf-8") as f:
                d = json.load(f)
            keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                    "initializer_range", "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob")
            shape = {k: d[k] for k in keep if k in d}
        cfg = {"layer_norm_eps": 1e-5, **shape, "vocab_size": self.vocab_size, "model_type": "roberta",
               "type_vocab_size": 1, "pad_token_id": ids["pad"], "bos_token_id": ids["bos"],
               "eos_token_id": ids["eos"],
               # RoBERTa's positions start after the padding index
               "max_position_embeddings": a.max_seqlen + ids["pad"] + 1}
        if a.dropout is not None:
            cfg.update(hidden_dropout_prob=a.dropout, attention_probs_dropout_prob=a.dropout)
        if a.attention != "full":  # long context: --max-seqlen sizes the position table past 512 too
            cfg.update(attention=a.attention, lsh_bucket_size=a.lsh_bucket_size, lsh_num_hashes=a.lsh_num_hashes)
        return EncoderConfig(**cfg)

    def _encode(self, texts):
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def plan(self) -> dict:
        a = self.args
        return {"world_size": self.dist.world, **{k: getattr(a, k) for k in _PLAN_KEYS},
                "tokenizer_sha256": self.tokenizer_sha256,
                "corpus": self.corpus.fingerprint(), "config": self.config.to_dict()}

    # ---------------------------------------------------------------------------------------------- a step
    def masked_batch(self, step: int, j: int, packed):
        """(input_ids, attention_mask, labels) (n, width) of micro-batch j of `step`: the packed batch padded to its
        longest sequence, masked by the collator with step index step * n + j."""
        n = self.dist.world * self.args.accumulation
        ids, attention = packed.to_padded(self.ids["pad"])
        inputs, labels = self.collator(ids, step=step * n + j, attention_mask=attention)
        return inputs, attention, labels

    def train_step(self, step: int) -> dict:
        """Optimizer step `step` (0-based): its n = world x accumulation micro-batches from the stream."""
        a, w, rank = self.args, self.dist.world, self.dist.rank
        n = w * a.accumulation
        self.model.train()
        batches = [self.masked_batch(step, j, self.stream.next_batch()) for j in range(n)]
        masked = sum(int((lab != IGNORE_INDEX).sum()) for _, _, lab in batches)
        tokens = sum(int(att.sum()) for _, att, _ in batches)
        for _, _, lab in batches:
            t = lab[lab != IGNORE_INDEX]
            self.target_counts += torch.bincount(t, minlength=self.vocab_size)
        denom = max(1, masked)
        mine = [b for j, b in enumerate(batches) if j % w == rank]
        acc = torch.zeros(1, dtype=torch.float64, device=self.device)  # this rank's loss sum
        for k, (inputs, attention, labels) in enumerate(mine):
            last = k == len(mine) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            count = int((labels != IGNORE_INDEX).sum())
            inputs, attention, labels = (t.to(self.device) for t in (inputs, attention, labels))
            with sync:
                with self._autocast():
                    if count:
                        loss_sum = self.model(input_ids=inputs, attention_mask=attention, labels=labels).loss * count
                    else:  # nothing masked (a tiny last batch of an epoch): zero loss, every parameter in the graph
                        loss_sum = self.model(input_ids=inputs, attention_mask=attention).logits.sum() * 0.0
                loss_sum = loss_sum.float()
                self.scaler.scale(loss_sum * (w / denom)).backward()
            acc[0] += loss_sum.detach().double()
        o = self._optimizer_step()
        self.dist.sum_(acc)
        return {"loss": acc[0].item() / denom, "tokens": tokens, "masked": masked, **o}

    # ---------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int) -> str | None:
        state = {"stream": self.stream.state_dict(), "target_counts": self.target_counts.clone(),
                 "tokens_total": self.tokens_total, "plan": json.dumps(self.plan(), sort_keys=True)}
        return self._write_checkpoint(step, self.raw.state_dict(), self.optimizer.state_dict(), state)

    def load_checkpoint(self, path) -> dict:
        ckpt.verify(path)
        state = ckpt.load(path, "trainer_state.pt")
        saved, mine = json.loads(state["plan"]), json.loads(json.dumps(self.plan(), sort_keys=True))
        diff = [f"{k}: checkpoint {_short(saved.get(k))}, now {_short(mine[k])}" for k in mine
                if saved.get(k) != mine[k]]
        if diff:
            raise ValueError(f"cannot resume from {path}: the run would differ ({'; '.join(diff)}); use the same "
                             "options and corpus, or a new output folder")
        self.raw.load_state_dict(ckpt.load(path, "model.pt"))
        self.optimizer.load_state_dict(ckpt.load(path, "optimizer.pt"))
        self.stream.load_state_dict(state["stream"])
        self.target_counts = state["target_counts"].clone()
        self.tokens_total = int(state["tokens_total"])
        self._restore_common(path, state)
        return state

    # ---------------------------------------------------------------------------------------------- the run
    def fit(self) -> PretrainResult:
        a = self.args
        step = 0
        result = PretrainResult(output=a.output, steps=0)
        state, result.resumed_from = self._start()
        if state is not None:
            step = state["step"]
            if self.is_main:
                self.log(f"resumed from {result.resumed_from} (step {step}, corpus epoch {self.stream.epoch})")
        if self.is_main:
            n_params = sum(p.numel() for p in self.raw.parameters())
            self.log(f"pretraining a {n_params / 1e6:.2f} M-parameter RoBERTa (hidden {self.config.hidden_size}, "
                     f"{self.config.num_hidden_layers} layers, vocabulary {self.vocab_size}) on {self.corpus.root} "
                     f"({len(self.corpus.files)} files): {a.max_steps} steps of {self.dist.world} x "
                     f"{a.accumulation} x {a.batch_tokens} tokens, {a.precision}, {self.device}")
        bar = self._progress(a.max_steps, step, "pretrain")
        t0, tokens = time.perf_counter(), 0
        try:
            while step < a.max_steps:
                r = self.train_step(step)
                step += 1
                tokens += r["tokens"]
                self.tokens_total += r["tokens"]
                self.skipped += r["skipped"]
                if r["skipped"] and self.is_main:
                    self.log(f"step {step}: fp16 gradients overflowed, step skipped (loss scale now "
                             f"{self.scaler.get_scale():g})")
                result.losses.append((step, r["loss"]))
                elapsed = time.perf_counter() - t0
                tps = tokens / max(1e-9, elapsed)
                if step % a.log_every == 0 or step == a.max_steps:
                    row = {"type": "train", "step": step, "loss": r["loss"], "lr": r["lr"], "grad_norm": r["grad_norm"],
                           "tokens": r["tokens"], "masked": r["masked"], "tokens_per_s": tps,
                           "corpus_epoch": self.stream.epoch, "skipped_steps": self.skipped}
                    if self.scaler.is_enabled():
                        row["loss_scale"] = self.scaler.get_scale()
                    self._write_metrics(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{r['loss']:.3f}", tok_s=f"{tps:,.0f}", lr=f"{r['lr']:.1e}", refresh=False)
                if self.on_step is not None:
                    self.on_step(step, r["loss"])
                if a.save_every and step % a.save_every == 0 and step < a.max_steps:
                    self.save_checkpoint(step)
        finally:
            if bar is not None:
                bar.close()
        result.seconds = time.perf_counter() - t0
        result.tokens = tokens
        self.save_checkpoint(step)
        self.save_pretrained(a.output)
        result.steps, result.skipped_steps = step, self.skipped
        if self.target_counts.sum() > 0:
            result.unigram_entropy = unigram_entropy(self.target_counts)
        if self.is_main and self.eval_dir is not None:
            t1 = time.perf_counter()
            result.eval = mlm_eval(a.output, self.eval_dir, train_counts=self.target_counts, random_context=True)
            e = result.eval
            self.log(f"held-out ({self.eval_dir}, {e['targets']:,} targets, every one <mask>): MLM loss "
                     f"{e['loss']:.3f} nats; unigram entropy of its tokens {e['unigram_entropy']:.3f} "
                     f"({e['unigram_entropy'] - e['loss']:+.3f} below it), the training targets' unigram "
                     f"{e['unigram_cross_entropy']:.3f}; with a random context {e['random_loss']:.3f} "
                     f"({time.perf_counter() - t1:.1f} s)")
        if self.is_main:
            last = [v for _, v in result.losses[-10:]]
            tail = f"; mean loss of the last {len(last)} steps {sum(last) / len(last):.3f} nats" if last else ""
            uni = "" if result.unigram_entropy is None else \
                f" (unigram entropy of the masked targets {result.unigram_entropy:.3f} nats)"
            self.log(f"done: {step} steps, {tokens:,} tokens in {result.seconds:.1f} s "
                     f"({tokens / max(1e-9, result.seconds):,.0f} tokens/s){tail}{uni}; model written to {a.output}")
            self._write_metrics({"type": "summary", "step": step, "tokens": self.tokens_total,
                                 "unigram_entropy": result.unigram_entropy, "seconds": result.seconds,
                                 "eval": result.eval})
        self.dist.close()
        return result

    def save_pretrained(self, path):
        """config.json + model.safetensors (transformers' layout: AutoModelForMaskedLM loads it, and
        roberta_fast's RobertaForMaskedLM) + the tokenizer files + pretrain_args.json."""
        if not self.is_main:
            return
        os.makedirs(path, exist_ok=True)
        self.raw.save_pretrained(path)
        if os.path.abspath(path) != os.path.abspath(self.args.output) or not os.path.isfile(
                os.path.join(path, "tokenizer.json")):
            T.save(self.tokenizer, path, max_length=self.args.max_seqlen)
        args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.args).items()}
        args["corpus"] = self.corpus.root
        ckpt.atomic_text(json.dumps(args, indent=1), os.path.join(path, "pretrain_args.json"))


def _short(v, n=80):
    s = json.dumps(v)
    return s if len(s) <= n else s[:n] + "..."


def pretrain(args: PretrainArgs | None = None, **kwargs) -> PretrainResult:
    """Pretrainer(PretrainArgs(**kwargs)).fit()."""
    return Pretrainer(args if args is not None else PretrainArgs(**kwargs)).fit()


