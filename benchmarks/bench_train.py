"""Training-step benchmarks: one fine-tuning step (forward + backward + AdamW step) of a sequence-classification
model (roberta-base widths, random init from transformers' RobertaConfig, no download), every provider.

Providers:
  hf_eager           transformers' RobertaForSequenceClassification, attn_implementation="eager"
  hf_sdpa            the same with attn_implementation="sdpa"
  hf_sdpa_compile    torch.compile(hf_sdpa) (default mode: max-autotune's CUDA graphs do not apply to a training
                     step with an optimizer outside the graph); GPU only
  rf                 roberta_fast.optimize(a copy of hf_eager) (padding-free, fused kernels, dropout inside them)

Precision: float32 master weights and torch.autocast in the row's dtype (fp16 adds torch.amp.GradScaler: scale,
unscale, a skipped step when the gradients overflow), as fine-tuning runs. Dropout 0.1 everywhere (train mode).
The optimizer is torch's AdamW (fused=True where torch has it for the device, else foreach).

Workloads (GPU): batch 32 x seqlen 128; batch 64 with lengths uniform in [0.2 S, S] at S = 512 (seeded, padded
to 512 with an attention mask). The reduced CPU run: roberta-base-2layers in float32 (no autocast), batch 2 x 64
and batch 4 with lengths uniform in [0.2 S, S] at S = 128, providers timed in interleaved rounds.

Each row: tokens/s counting real tokens only, step time p50/p90, peak memory (GPU), the step's loss, launches
per layer (forward + backward, counted on the CPU by the dispatch counter of benchmarks/layers.py over a one-
and a two-layer model with the row's provider, dropout 0.1: each aten or custom op that launches work counts
one) and the speedups against hf_eager (speedup) and hf_sdpa (speedup_sdpa) in the same run.
"""

from __future__ import annotations

import copy
import functools
import gc
import time
from collections import Counter

import torch

from roberta_fast._utils import dtype_name
from roberta_fast.optimize import optimize
from roberta_fast.testing import summarize_ms, time_gpu_loop

from .bench_encoder import BASE, MODELS, make_workload
from .common import Budget, Progress, short_error

WORKLOADS = {
    "gpu": [("b32_s128", 32, 128, False), ("b64_s512_var", 64, 512, True)],
    "cpu": [("b2_s64", 2, 64, False), ("b4_s128_var", 4, 128, True)],
    "cpu-quick": [("b2_s32", 2, 32, False)],
}
PROVIDERS = ("hf_eager", "hf_sdpa", "hf_sdpa_compile", "rf")
CPU_ROUNDS = (3, 7)
NUM_LABELS = 2
DROPOUT = 0.1
LR = 1e-5


def make_config(name: str, layers: int | None = None):
    from transformers import RobertaConfig

    widths = dict(MODELS[name])
    if layers is not None:
        widths["num_hidden_layers"] = layers
    return RobertaConfig(**BASE, **widths, num_labels=NUM_LABELS, hidden_dropout_prob=DROPOUT,
                         attention_probs_dropout_prob=DROPOUT)


def build_reference(config):
    """transformers' eager RobertaForSequenceClassification in float32 on the CPU, seeded random init."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")


def _hf_copy(ref, impl: str, device):
    m = copy.deepcopy(ref)
    if impl != "eager":
        m.set_attn_implementation(impl)
    return m.to(device).train()


def build(prov: str, ref, device):
    """The provider's model (float32 weights, train mode) on device."""
    if prov == "hf_eager":
        return _hf_copy(ref, "eager", device)
    if prov == "hf_sdpa":
        return _hf_copy(ref, "sdpa", device)
    if prov == "hf_sdpa_compile":
        torch._dynamo.reset()
        return torch.compile(_hf_copy(ref, "sdpa", device))
    if prov == "rf":
        return optimize(_hf_copy(ref, "eager", device)).train()
    raise ValueError(f"provider: unknown {prov!r}; expected one of {PROVIDERS}")


def _adamw(model, device):
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=LR, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused AdamW for this device / torch
        return torch.optim.AdamW(params, lr=LR, foreach=device.type == "cuda")


class Step:
    """One training step of `model` on one workload: autocast in `dtype` (none for float32), GradScaler for
    float16. Calling it returns the loss (a tensor; no host sync)."""

    def __init__(self, model, wl, dtype, device):
        self.model, self.wl, self.device = model, wl, device
        self.opt = _adamw(model, device)
        self.autocast = dtype != torch.float32
        self.dtype = dtype
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        self.labels = torch.arange(wl["batch"], device=device) % NUM_LABELS

    def forward_backward(self):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            out = self.model(input_ids=self.wl["input_ids"], attention_mask=self.wl["attention_mask"],
                             labels=self.labels)
        loss = out[0] if isinstance(out, (tuple, list)) else out.loss
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return loss

    def __call__(self):
        loss = self.forward_backward()
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def _row(mname, dt, wl, prov) -> dict:
    return {
        "suite": "train", "model": mname, "dtype": dtype_name(dt), "workload": wl["name"], "provider": prov,
        "batch": wl["batch"], "seqlen": wl["seqlen"], "real_tokens": int(sum(wl["lens"])),
        "padded_tokens": wl["batch"] * wl["seqlen"], "ms_p50": None, "ms_p90": None, "tokens_per_s": None,
        "peak_mem_mib": None, "loss": None, "launches_per_layer": None, "speedup": None, "speedup_sdpa": None,
        "error": None, "note": None,
    }


def providers_for(device) -> list[str]:
    return [p for p in PROVIDERS if device.type == "cuda" or p != "hf_sdpa_compile"]


def run_train(*, device: torch.device, model: str, dtypes, quick: bool, budget: Budget, rep_ms: float,
              progress: bool = True, notes: list | None = None) -> list[dict]:
    notes = [] if notes is None else notes
    wls_spec = WORKLOADS["gpu" if device.type == "cuda" else ("cpu-quick" if quick else "cpu")]
    provs = providers_for(device)
    bar = Progress(len(dtypes) * len(provs) * len(wls_spec), "train", enable=progress)
    try:
        config = make_config(model)
        ref = build_reference(config)
    except Exception as e:  # noqa: BLE001
        notes.append(f"train {model}: cannot build the transformers model ({short_error(e)})")
        bar.close()
        return []
    launches = launches_per_layer(provs)
    wls = [make_workload(n, b, s, v, device, config.vocab_size) for n, b, s, v in wls_spec]
    rows: list[dict] = []
    for dt in dtypes:
        group = {(p, wl["name"]): _row(model, dt, wl, p) for p in provs for wl in wls}
        for (p, _), r in group.items():
            r["launches_per_layer"] = launches.get(p)
        if budget.left() <= 0:
            for r in group.values():
                r["error"] = "skipped: time budget"
            for _ in group:
                bar.update()
        elif device.type == "cpu":
            _cpu_interleaved(group, provs, ref, wls, dt, device, budget, rep_ms, bar)
        else:
            _gpu(group, provs, ref, wls, dt, device, budget, rep_ms, quick, bar)
        _finish(list(group.values()))
        rows.extend(group.values())
    bar.close()
    return rows


def _gpu(group, provs, ref, wls, dt, device, budget, rep_ms, quick, bar):
    for prov in provs:
        try:
            model = build(prov, ref, device)
        except Exception as e:  # noqa: BLE001
            for wl in wls:
                group[(prov, wl["name"])]["error"] = f"building the model: {short_error(e)}"
                bar.update()
            continue
        for wl in wls:
            r = group[(prov, wl["name"])]
            bar.update(f"train {dtype_name(dt)} {prov} {wl['name']}")
            if budget.left() <= 0:
                r["error"] = "skipped: time budget"
                continue
            try:
                step = Step(model, wl, dt, device)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                for _ in range(3):  # warm-up (and the compile)
                    loss = step()
                r["loss"] = loss.item()
                r["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
                r["ms_p50"], r["ms_p90"] = time_gpu_loop(step, rep_ms=rep_ms, min_reps=5 if quick else 20)
            except Exception as e:  # noqa: BLE001
                r["error"] = short_error(e)
            finally:
                step = None
                _free(device)
        del model
        _free(device)


def _cpu_interleaved(group, provs, ref, wls, dt, device, budget, rep_ms, bar):
    models = {}
    for prov in provs:
        try:
            models[prov] = build(prov, ref, device)
        except Exception as e:  # noqa: BLE001
            for wl in wls:
                group[(prov, wl["name"])]["error"] = f"building the model: {short_error(e)}"
    for wl in wls:
        steps = {}
        for prov, model in models.items():
            r = group[(prov, wl["name"])]
            bar.update(f"train {dtype_name(dt)} {prov} {wl['name']}")
            try:
                steps[prov] = Step(model, wl, dt, device)
                r["loss"] = steps[prov]().item()  # the warm-up
            except Exception as e:  # noqa: BLE001
                r["error"] = short_error(e)
                steps.pop(prov, None)
        for _ in range(len(provs) - len(models)):  # providers whose model could not be built
            bar.update()
        samples = {p: [] for p in steps}
        t_end = time.perf_counter() + rep_ms * len(steps) / 1e3
        rounds = 0
        while steps and rounds < CPU_ROUNDS[1] and (rounds < CPU_ROUNDS[0] or time.perf_counter() < t_end):
            if budget.left() <= 0 and rounds >= 1:
                break
            for prov, step in steps.items():
                t0 = time.perf_counter()
                step()
                samples[prov].append((time.perf_counter() - t0) * 1e3)
            rounds += 1
        for prov, ms in samples.items():
            r = group[(prov, wl["name"])]
            if ms:
                r["ms_p50"], r["ms_p90"] = summarize_ms(ms, (0.5, 0.9))
            else:
                r["error"] = "skipped: time budget"
    models.clear()
    _free(device)


def _finish(rows):
    base = {r["workload"]: r["ms_p50"] for r in rows if r["provider"] == "hf_eager" and r["ms_p50"]}
    sdpa = {r["workload"]: r["ms_p50"] for r in rows if r["provider"] == "hf_sdpa" and r["ms_p50"]}
    for r in rows:
        ms = r["ms_p50"]
        if not ms:
            continue
        r["tokens_per_s"] = r["real_tokens"] / (ms / 1e3)
        if base.get(r["workload"]):
            r["speedup"] = base[r["workload"]] / ms
        if sdpa.get(r["workload"]):
            r["speedup_sdpa"] = sdpa[r["workload"]] / ms


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- launches per layer

TINY_WIDTHS = {"vocab_size": 100, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
               "max_position_embeddings": 40, "type_vocab_size": 1, "pad_token_id": 1, "num_labels": NUM_LABELS,
               "hidden_dropout_prob": DROPOUT, "attention_probs_dropout_prob": DROPOUT}


def count_step_ops(fn) -> Counter:
    """The launching ops (aten and custom, views excluded) that fn dispatches, autograd on: the backward's ops
    count too (benchmarks/layers.py's counter)."""
    from .layers import count_ops

    return count_ops(fn, grad=True)


def _tiny_fwd_bwd(prov: str, layers: int):
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    torch.manual_seed(0)
    ref = AutoModelForSequenceClassification.from_config(RobertaConfig(num_hidden_layers=layers, **TINY_WIDTHS),
                                                         attn_implementation="eager")
    model = build(prov, ref, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, TINY_WIDTHS["vocab_size"], (2, 16), generator=gen)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    ids[1, 11:] = TINY_WIDTHS["pad_token_id"]
    wl = {"input_ids": ids, "attention_mask": mask, "batch": 2}
    step = Step(model, wl, torch.float32, torch.device("cpu"))
    return functools.partial(_fwd_bwd_once, step)


def _fwd_bwd_once(step):
    step.forward_backward()
    step.model.zero_grad(set_to_none=True)


def launches_per_layer(provs) -> dict:
    """{provider: launching ops per layer, forward + backward, train mode with dropout 0.1} (CPU counts; the
    GPU-only compiled provider is not counted)."""
    out = {}
    for prov in provs:
        if prov == "hf_sdpa_compile":
            continue
        try:
            counts = []
            for layers in (1, 2):
                fn = _tiny_fwd_bwd(prov, layers)
                fn()  # warm-up: caches built outside the count
                counts.append(sum(count_step_ops(fn).values()))
            out[prov] = counts[1] - counts[0]
        except Exception:  # noqa: BLE001  (a row without the count says nothing wrong about the step itself)
            out[prov] = None
    return out
