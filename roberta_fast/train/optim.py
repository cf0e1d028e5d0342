"""Optimizer, learning-rate schedule and partial fine-tuning.

- Weight decay applies to matrices only: every parameter with fewer than two dimensions (biases, LayerNorm
  weights and biases) is in the no-decay group, which is transformers' Trainer rule for this family
  (it names biases and LayerNorm weights) written so that it does not depend on parameter names.
- AdamW: torch's fused implementation where the device supports it (CUDA; CPU on torch >= 2.4), the
  multi-tensor (foreach) one otherwise.
- Schedule: linear warmup from 0 to the peak over `warmup` steps, then linear decay to 0 at `total` steps
  (transformers' get_linear_schedule_with_warmup).
- Freezing: the embeddings and/or the first N encoder layers get requires_grad=False.
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """[decay group, no-decay group] of the trainable parameters (empty groups left out)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("no trainable parameters (everything is frozen)")
    return groups


def make_adamw(groups: list, lr: float, *, betas=(0.9, 0.999), eps=1e-8, device=None) -> torch.optim.AdamW:
    """AdamW over `groups`, fused where torch supports it on `device`, else foreach."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def is_fused(opt: torch.optim.Optimizer) -> bool:
    return bool(opt.defaults.get("fused"))


class LinearWarmupDecay:
    """lr multiplier at a step: step / warmup while warming up, then (total - step) / (total - warmup), >= 0.
    A callable object (not a lambda) so LambdaLR's state_dict keeps warmup and total."""

    def __init__(self, warmup: int, total: int):
        if warmup < 0 or total < 1:
            raise ValueError(f"warmup must be >= 0 and total steps >= 1, got warmup={warmup}, total={total}")
        self.warmup, self.total = int(warmup), int(total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def make_schedule(opt, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, LinearWarmupDecay(warmup, total))


def freeze(model: torch.nn.Module, *, embeddings: bool = False, layers: int = 0) -> list:
    """requires_grad=False on the embeddings (`*.embeddings.*`) and/or encoder layers 0..layers-1
    (`*.encoder.layer.{i}.*`); returns the frozen names. ValueError when `layers` exceeds the model's."""
    n_layers = 1 + max((int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER.search(name))),
                       default=-1)
    if layers < 0 or layers > n_layers:
        raise ValueError(f"freeze_layers must be in [0, {n_layers}] (the model has {n_layers} layers), got {layers}")
    frozen = []
    for name, p in model.named_parameters():
        m = _LAYER.search(name)
        if (embeddings and ".embeddings." in f".{name}") or (m and int(m.group(1)) < layers):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen
