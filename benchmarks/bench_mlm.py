"""Masked-LM head + loss benchmarks: the LM head and its cross-entropy alone, forward + backward, at RoBERTa's
vocabulary (50,265) with 15% of the tokens masked.

Providers:
  hf_head_ce          transformers' RobertaLMHead on every token (dense, GELU, LayerNorm, decoder) then
                      F.cross_entropy(ignore_index=-100) over the (tokens, vocab) logits, as RobertaForMaskedLM
  hf_head_ce_compile  torch.compile of the same function; GPU only
  rf_fused            ours: roberta_fast.model.heads.masked_lm_loss: dense + GELU + LayerNorm on the masked rows only,
                      decoder + loss through ops.linear_cross_entropy (no logits tensor)

Workloads: GPU 32 x 512 tokens, hidden 768, vocab 50,265, 15% masked (fp16 and bf16); the reduced CPU run:
4 x 128 tokens, hidden 64, vocab 50,265 and 5,027, float32.

Memory: on a GPU, peak memory is torch.cuda.max_memory_allocated during the step minus what was allocated before
it (inputs, parameters). On the CPU there is no allocator statistic, so the row gives `alloc_mib`: the bytes of
every tensor an aten op returns during the step, counted by a TorchDispatchMode (an upper bound of the peak: a
tensor freed early still counts), and `largest_mib`, the largest single tensor; mem_method says which.
"""

from __future__ import annotations

import copy
import functools
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from roberta_fast._utils import dtype_name
from roberta_fast.testing import time_cpu, time_gpu_loop

from .common import short_error

WORKLOADS = {
    "gpu": [("b32_s512", 32, 512, 768, 50265)],
    "cpu": [("b4_s128_v50265", 4, 128, 64, 50265), ("b4_s128_v5027", 4, 128, 64, 5027)],
    "cpu-quick": [("b2_s64_v5027", 2, 64, 32, 5027)],
}
PROVIDERS = ("hf_head_ce", "hf_head_ce_compile", "rf_fused")
MASKED = 0.15


class _Bytes(TorchDispatchMode):
    """Bytes of every tensor an aten op returns (each storage once), and the largest one."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.largest = 0
        self._seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                key = t.untyped_storage().data_ptr()
                if key not in self._seen:
                    self._seen.add(key)
                    n = t.untyped_storage().nbytes()
                    self.total += n
                    self.largest = max(self.largest, n)
        return out


def _heads(hidden, vocab, device, dtype):
    """(transformers' RobertaLMHead, ours with the same weights), decoder tied to a word-embedding-like matrix."""
    from transformers import RobertaConfig
    from transformers.models.roberta.modeling_roberta import RobertaLMHead as HFHead

    from roberta_fast.model.config import as_config
    from roberta_fast.model.heads import RobertaLMHead

    cfg = RobertaConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=max(1, hidden // 64))
    torch.manual_seed(0)
    hf = HFHead(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
    ours = RobertaLMHead(as_config(cfg))
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k in ours.state_dict()}, strict=False)
    ours.decoder.bias = ours.bias
    with torch.no_grad():
        ours.bias.copy_(hf.bias)
    return hf.to(device=device, dtype=dtype), ours.to(device=device, dtype=dtype)


def _inputs(B, S, hidden, vocab, device, dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, S, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (B, S), generator=g)
    labels[torch.rand(B, S, generator=g) >= MASKED] = -100
    return h, labels.to(device)


def _hf_step(head, h, labels):
    logits = head(h)  # (B, S, vocab)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float() if logits.dtype == torch.float32 else
                           logits.view(-1, logits.shape[-1]), labels.view(-1))
    loss.backward()
    return loss


def _rf_step(head, h, labels):
    from roberta_fast.model.heads import masked_lm_loss

    loss = masked_lm_loss(head, h, labels)
    loss.backward()
    return loss


def _measure(fn, device, rep_ms):
    """(ms_p50, ms_p90, memory dict, loss) of fn() (one forward + backward)."""
    loss = fn()  # warm-up (and compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        mem = {"peak_mem_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
               "mem_method": "cuda max_memory_allocated - allocated before"}
        p50, p90 = time_gpu_loop(fn, rep_ms=rep_ms, qs=(0.5, 0.9))
    else:
        with _Bytes() as counter:
            fn()
        mem = {"alloc_mib": counter.total / 2**20, "largest_mib": counter.largest / 2**20,
               "mem_method": "TorchDispatchMode: bytes of every tensor made (upper bound of the peak)"}
        p50, p90 = time_cpu(fn, rep_ms=rep_ms, qs=(0.5, 0.9))
    return p50, p90, mem, float(loss)


def run_mlm(device, *, dtypes=None, quick=False, budget=None, rep_ms=100.0, progress=None, notes=None):
    """The mlm suite's rows (suite "mlm")."""
    gpu = device.type == "cuda"
    workloads = WORKLOADS["gpu" if gpu else ("cpu-quick" if quick else "cpu")]
    dtypes = dtypes or ([torch.float16, torch.bfloat16] if gpu else [torch.float32])
    rows = []
    for name, B, S, H, V in workloads:
        for dtype in dtypes:
            hf, ours = _heads(H, V, device, dtype)
            h, labels = _inputs(B, S, H, V, device, dtype)
            base = None
            for prov in PROVIDERS:
                if prov == "hf_head_ce_compile" and not gpu:
                    continue
                if budget is not None and budget.left() <= 0:
                    (notes if notes is not None else []).append("mlm suite cut short: time budget spent")
                    return rows
                row = {"suite": "mlm", "workload": name, "provider": prov, "dtype": dtype_name(dtype), "batch": B,
                       "seqlen": S, "hidden": H, "vocab": V, "masked": int((labels != -100).sum()), "ms_p50": None,
                       "ms_p90": None, "peak_mem_mib": None, "alloc_mib": None, "largest_mib": None,
                       "mem_method": "", "loss": None, "speedup": None, "mem_ratio": None, "error": None}
                try:
                    if prov == "rf_fused":
                        fn = functools.partial(_rf_step, ours, h, labels)
                    elif prov == "hf_head_ce":
                        fn = functools.partial(_hf_step, hf, h, labels)
                    else:
                        fn = functools.partial(torch.compile(_hf_step), copy.deepcopy(hf), h, labels)
                    p50, p90, mem, loss = _measure(fn, device, rep_ms)
                    row.update(ms_p50=p50, ms_p90=p90, loss=loss, **mem)
                except Exception as e:  # noqa: BLE001  (a provider that fails is a row with an error)
                    row["error"] = short_error(e)
                h.grad = None
                if prov == "hf_head_ce":
                    base = row
                if base is not None and row["error"] is None and base.get("error") is None and prov != "hf_head_ce":
                    row["speedup"] = base["ms_p50"] / row["ms_p50"]
                    key = "peak_mem_mib" if gpu else "alloc_mib"
                    if base.get(key) and row.get(key):
                        row["mem_ratio"] = base[key] / row[key]
                print(f"  [mlm] {name} {row['dtype']} {prov}: {row['ms_p50']} ms, "
                      f"{row.get('peak_mem_mib') or row.get('alloc_mib')} MiB {row['error'] or ''}", file=sys.stderr)
                rows.append(row)
    return rows
