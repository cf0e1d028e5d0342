"""Encoder benchmarks: roberta-base / roberta-large (random init from transformers' RobertaConfig, no
download) in inference, every provider, four workloads.

Providers (cuda_graph=True rows replay one captured CUDA graph of the same forward, except rf_padding_free,
which turns on roberta_fast's own cuda_graphs=True: a graph per bucket of the padding-free path, replayed after
the forward's one host sync):
  hf_eager           transformers, attn_implementation="eager"
  hf_sdpa            transformers, attn_implementation="sdpa"
  hf_sdpa_compile    torch.compile(hf_sdpa, mode="max-autotune") (that mode captures CUDA graphs itself)
  rf_padded          roberta_fast.optimize(hf_model) with padding_free=False (ops.attention + mask)
  rf_padding_free    roberta_fast.optimize(hf_model) (unpad once, attention_varlen, repad once)
  rf_epilogue        GPU only: rf_padding_free with its GEMMs on ops.linear's Triton epilogues (FFN1 + bias +
                     GELU, the output projections + bias + residual; ROBERTA_FAST_BACKEND_LINEAR=triton), the
                     MFU change of fusing the elementwise work into the GEMMs (issue 16)

Workloads: batch 32 x seqlen 128; batch 64 x seqlen 512; batch 64 with lengths uniform in
[0.2 S, S] at S = 512 (seeded, padded to 512 with an attention mask); batch 1 x seqlen 128.
The reduced CPU run (roberta-base-2layers in float32, no CUDA graphs, no hf_sdpa_compile): fixed
lengths 128 and 512, lengths uniform in [0.2 S, S] at S = 128 and S = 512, batch 1 x seqlen 32;
--quick keeps three small shapes. On the CPU the providers are timed in interleaved rounds (one call
of each per round, medians over the rounds), so a change in the machine's load during the run (CPU
runs share their cores) hits every provider alike.

Each row: tokens/s counting real tokens only, latency p50/p90, MFU (encoder_flops of the real
lengths over p50, against the measured matmul ceiling and, where the GPU is in the table, the
datasheet dense bf16 peak), peak memory, the max error of last_hidden_state on real tokens
against transformers' eager model in float32 with the same weights, and the speedups against
hf_eager (speedup) and hf_sdpa (speedup_sdpa) without CUDA graphs in the same run.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import os
import time

import torch

from roberta_fast import flops
from roberta_fast._utils import dtype_name
from roberta_fast.optimize import optimize
from roberta_fast.testing import summarize_ms, time_gpu_loop

from .common import Budget, Progress, short_error

BASE = {"vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1,
        "bos_token_id": 0, "eos_token_id": 2, "layer_norm_eps": 1e-5, "hidden_act": "gelu"}
MODELS = {
    "roberta-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                     "intermediate_size": 3072},
    "roberta-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "intermediate_size": 4096},
    # the reduced CPU run: roberta-base's widths, two layers
    "roberta-base-2layers": {"hidden_size": 768, "num_hidden_layers": 2, "num_attention_heads": 12,
                             "intermediate_size": 3072},
}
WORKLOADS = {
    "gpu": [("b32_s128", 32, 128, False), ("b64_s512", 64, 512, False), ("b64_s512_var", 64, 512, True),
            ("b1_s128", 1, 128, False)],
    # the reduced CPU run: fixed and mixed lengths at S = 128 and 512 (the mixed batches hold enough
    # sequences for the padding's share to be near its expected 40%), one short sequence for latency
    "cpu": [("b4_s128", 4, 128, False), ("b1_s512", 1, 512, False), ("b8_s128_var", 8, 128, True),
            ("b4_s512_var", 4, 512, True), ("b1_s32", 1, 32, False)],
    "cpu-quick": [("b2_s64", 2, 64, False), ("b4_s64_var", 4, 64, True), ("b1_s32", 1, 32, False)],
}
CPU_ROUNDS = (5, 9)  # interleaved rounds on the CPU: at least, at most (within rep_ms per provider)
PAD_ID = 1


def make_config(name: str):
    from transformers import RobertaConfig

    return RobertaConfig(**BASE, **MODELS[name])


def make_workload(name: str, batch: int, seqlen: int, var: bool, device, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if var:
        lens = torch.randint(max(1, int(0.2 * seqlen)), seqlen + 1, (batch,), generator=gen)
    else:
        lens = torch.full((batch,), seqlen)
    mask = (torch.arange(seqlen)[None, :] < lens[:, None]).long()
    ids = torch.randint(3, vocab, (batch, seqlen), generator=gen)
    ids = ids.masked_fill(mask == 0, PAD_ID)
    return {"name": name, "batch": batch, "seqlen": seqlen, "lens": lens.tolist(),
            "input_ids": ids.to(device), "attention_mask": mask.to(device)}


# ----------------------------------------------------------------------------- model builders


def build_reference(config):
    """transformers' eager RobertaModel in float32 on the CPU, seeded random init, eval mode."""
    from transformers import AutoModel

    torch.manual_seed(0)
    return AutoModel.from_config(config, attn_implementation="eager").eval()


def hf_copy(ref, impl: str, dtype, device):
    """A copy of the reference with another attention implementation, in dtype on device."""
    m = copy.deepcopy(ref)
    if hasattr(m, "set_attn_implementation"):
        m.set_attn_implementation(impl)
    else:  # transformers 4.x picked the attention class at construction
        from transformers import AutoModel

        m = AutoModel.from_config(ref.config, attn_implementation=impl)
        m.load_state_dict(ref.state_dict())
    return m.to(device=device, dtype=dtype).eval()


def build_roberta_fast(ref, dtype, device, padding_free: bool):
    """roberta_fast.optimize(hf_model, padding_free=...) on a copy of the reference."""
    return optimize(hf_copy(ref, "eager", dtype, device), padding_free=padding_free).eval()


def _forward(model, wl):
    out = model(input_ids=wl["input_ids"], attention_mask=wl["attention_mask"])
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def _graphed(fn, model=None, provider=None):
    """Capture fn once into a CUDA graph; the returned callable replays it (static output). rf_padding_free
    uses the model's own graphs instead (optimize(model, cuda_graphs=True), captured on fn's first call)."""
    if provider == "rf_padding_free":
        optimize(model, cuda_graphs=True)
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()

    def replay():
        g.replay()
        return out

    replay.graph = g
    return replay


# ----------------------------------------------------------------------------- the suite


PROVIDERS = ("hf_eager", "hf_sdpa", "hf_sdpa_compile", "rf_padded", "rf_padding_free", "rf_epilogue")
# rf_epilogue (GPU only): the padding-free model with its GEMMs on ops.linear's Triton epilogues
# (ROBERTA_FAST_BACKEND_LINEAR=triton while it is built and timed), every other op on its automatic choice: the
# MFU change of issue 16 beside rf_padding_free (cuBLAS + the fused elementwise kernels, the untuned default)
_EPILOGUE_ENV = {"ROBERTA_FAST_BACKEND_LINEAR": "triton"}


def provider_variants(device, quick: bool):
    """(provider, cuda_graph) pairs in run order."""
    out = []
    for p in PROVIDERS:
        if p == "hf_sdpa_compile":
            if device.type == "cuda":
                out.append((p, None))  # max-autotune captures its own graphs
            continue
        if p == "rf_epilogue":
            if device.type == "cuda":
                out.append((p, False))
            continue
        out.append((p, False))
        if device.type == "cuda":
            out.append((p, True))
    return out


def run_encoder(*, device: torch.device, models, dtypes, quick: bool, ceilings: dict, datasheet: float | None,
                budget: Budget, rep_ms: float, progress: bool = True, notes: list | None = None) -> list[dict]:
    notes = [] if notes is None else notes
    wls_spec = WORKLOADS["gpu" if device.type == "cuda" else ("cpu-quick" if quick else "cpu")]
    variants = provider_variants(device, quick)
    total = len(models) * len(dtypes) * len(variants) * len(wls_spec)
    bar = Progress(total, "encoder", enable=progress)
    rows: list[dict] = []
    if device.type == "cpu":  # what the CPU figures depend on beside the machine's load (docs/cpu_path.md)
        notes.append(f"encoder suite on the CPU: {torch.get_num_threads()} torch threads, interleaved rounds "
                     "(medians); attention on CPU tensors through SDPA")
    if quick and device.type == "cuda":
        notes.append("hf_sdpa_compile (torch.compile mode='max-autotune') skipped under --quick: its compile "
                     "takes minutes per shape; run without --quick to include it")
    for mname in models:
        try:
            config = make_config(mname)
            ref = build_reference(config)
        except Exception as e:  # noqa: BLE001
            notes.append(f"encoder {mname}: cannot build the transformers model ({short_error(e)})")
            bar.update()
            continue
        wls = [make_workload(n, b, s, v, device, config.vocab_size) for n, b, s, v in wls_spec]
        # float32 reference outputs (TF32 off), computed once per model
        refs = _reference_outputs(ref, wls, device)
        for dt in dtypes:
            group: list[dict] = []
            if device.type == "cpu":
                group = _run_cpu_interleaved(mname, config, dt, ref, wls, refs, variants, budget, rep_ms, bar)
                _finish(group, config, ceilings, datasheet)
                rows.extend(group)
                continue
            for prov, graph in variants:
                wrows = [_row(mname, config, dt, wl, prov, graph) for wl in wls]
                group.extend(wrows)
                skip = None
                if prov == "hf_sdpa_compile" and quick:
                    skip = "skipped under --quick (max-autotune compile takes minutes)"
                elif budget.left() <= 0:
                    skip = "skipped: time budget"
                if skip:
                    for r in wrows:
                        r["error"] = skip
                        bar.update()
                    continue
                with _environment(_EPILOGUE_ENV if prov == "rf_epilogue" else {}):
                    try:
                        model = _build(prov, ref, dt, device)
                    except Exception as e:  # noqa: BLE001
                        msg = f"building the model: {short_error(e)}"
                        for r in wrows:
                            r["error"] = msg
                            bar.update()
                        continue
                    for wl, r, rf in zip(wls, wrows, refs):
                        bar.update(f"{mname} {dtype_name(dt)} {prov}{'+graph' if graph else ''} {wl['name']}")
                        if budget.left() <= 0:
                            r["error"] = "skipped: time budget"
                            continue
                        _measure(r, model, wl, rf, graph, device, rep_ms, quick)
                del model
                _free(device)
            _finish(group, config, ceilings, datasheet)
            rows.extend(group)
        del ref, refs
        _free(device)
    bar.close()
    return rows


def _build(prov, ref, dt, device):
    if prov == "hf_eager":
        return hf_copy(ref, "eager", dt, device)
    if prov == "hf_sdpa":
        return hf_copy(ref, "sdpa", dt, device)
    if prov == "hf_sdpa_compile":
        torch._dynamo.reset()
        return torch.compile(hf_copy(ref, "sdpa", dt, device), mode="max-autotune", dynamic=False)
    if prov == "rf_padded":
        return build_roberta_fast(ref, dt, device, padding_free=False)
    if prov in ("rf_padding_free", "rf_epilogue"):
        return build_roberta_fast(ref, dt, device, padding_free=True)
    raise ValueError(prov)


@contextlib.contextmanager
def _environment(values: dict):
    """Set environment variables inside the block (the backend registry re-reads its settings on entry and exit:
    backends.reset())."""
    if not values:
        yield
        return
    from roberta_fast import backends

    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    backends.reset()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        backends.reset()


def _reference_outputs(ref, wls, device):
    outs = []
    m = ref.to(device)
    prev = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            for wl in wls:
                outs.append(_forward(m, wl).float().cpu())
    finally:
        if prev is not None:
            torch.backends.cuda.matmul.allow_tf32 = prev
        ref.to("cpu")
        _free(device)
    return outs


def _row(mname, config, dt, wl, prov, graph) -> dict:
    return {
        "suite": "encoder", "model": mname, "dtype": dtype_name(dt), "workload": wl["name"],
        "provider": prov, "cuda_graph": graph, "batch": wl["batch"], "seqlen": wl["seqlen"],
        "real_tokens": int(sum(wl["lens"])), "padded_tokens": wl["batch"] * wl["seqlen"],
        "flops": flops.encoder_flops(config, wl["lens"]),
        "ms_p50": None, "ms_p90": None, "tokens_per_s": None, "tflops": None, "mfu": None,
        "mfu_datasheet": None, "peak_mem_mib": None, "max_err": None, "speedup": None, "speedup_sdpa": None,
        "error": None,
        "note": None,
    }


def _measure(r, model, wl, ref_out, graph, device, rep_ms, quick):
    """One GPU row: warm-up (and max_err), peak memory, CUDA-event timing (CPU rows: _run_cpu_interleaved)."""
    fn = None
    try:
        with torch.no_grad():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn = (lambda: _forward(model, wl))
            if graph:
                fn = _graphed(fn, model, r["provider"])
            out = fn()  # also compiles (hf_sdpa_compile)
            mask = wl["attention_mask"].bool().cpu()
            r["max_err"] = (out.float().cpu() - ref_out)[mask].abs().max().item()
            del out
            torch.cuda.synchronize()
            r["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
            r["ms_p50"], r["ms_p90"] = time_gpu_loop(fn, rep_ms=rep_ms, min_reps=10 if quick else 30)
    except NotImplementedError as e:
        r["error"] = f"not implemented: {short_error(e)}"
    except Exception as e:  # noqa: BLE001
        r["error"] = short_error(e)
    finally:
        fn = None
        _free(device)


def _run_cpu_interleaved(mname, config, dt, ref, wls, refs, variants, budget, rep_ms, bar) -> list[dict]:
    """Every provider built at once (CPU memory allows it), then per workload: one warm-up call each (which
    also gives max_err), and rounds of one timed call per provider, CPU_ROUNDS[0] at least, more while the
    round count stays under CPU_ROUNDS[1] and the workload has used less than rep_ms per provider."""
    device = torch.device("cpu")
    rows = {(prov, wl["name"]): _row(mname, config, dt, wl, prov, graph) for prov, graph in variants for wl in wls}
    models = {}
    for prov, _ in variants:
        try:
            models[prov] = _build(prov, ref, dt, device)
        except Exception as e:  # noqa: BLE001
            for wl in wls:
                rows[(prov, wl["name"])]["error"] = f"building the model: {short_error(e)}"
    for wl, rf in zip(wls, refs):
        fns = {}
        for prov, model in models.items():
            r = rows[(prov, wl["name"])]
            bar.update(f"{mname} {dtype_name(dt)} {prov} {wl['name']}")
            if budget.left() <= 0:
                r["error"] = "skipped: time budget"
                continue
            try:
                with torch.no_grad():
                    out = _forward(model, wl)  # the warm-up
                mask = wl["attention_mask"].bool()
                r["max_err"] = (out.float() - rf)[mask].abs().max().item()
                fns[prov] = functools.partial(_forward, model, wl)
            except NotImplementedError as e:
                r["error"] = f"not implemented: {short_error(e)}"
            except Exception as e:  # noqa: BLE001
                r["error"] = short_error(e)
        for _ in range(len(variants) - len(models)):  # providers whose model could not be built
            bar.update()
        samples = {prov: [] for prov in fns}
        t_end = time.perf_counter() + rep_ms * len(fns) / 1e3
        rounds = 0
        with torch.no_grad():
            while fns and rounds < CPU_ROUNDS[1] and (rounds < CPU_ROUNDS[0] or time.perf_counter() < t_end):
                for prov, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    samples[prov].append((time.perf_counter() - t0) * 1e3)
                rounds += 1
        for prov, ms in samples.items():
            rows[(prov, wl["name"])]["ms_p50"], rows[(prov, wl["name"])]["ms_p90"] = summarize_ms(ms, (0.5, 0.9))
    del models
    _free(device)
    return list(rows.values())


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _finish(rows, config, ceilings, datasheet):
    base = {(r["workload"]): r["ms_p50"] for r in rows
            if r["provider"] == "hf_eager" and not r["cuda_graph"] and r["ms_p50"]}
    sdpa = {(r["workload"]): r["ms_p50"] for r in rows
            if r["provider"] == "hf_sdpa" and not r["cuda_graph"] and r["ms_p50"]}
    peak = ceilings.get("matmul_tflops")
    for r in rows:
        ms = r["ms_p50"]
        if not ms:
            continue
        r["tokens_per_s"] = r["real_tokens"] / (ms / 1e3)
        r["tflops"] = r["flops"] / ms / 1e9
        if peak:
            r["mfu"] = r["tflops"] / peak
        if datasheet:
            r["mfu_datasheet"] = r["tflops"] / datasheet
        b, b_sdpa = base.get(r["workload"]), sdpa.get(r["workload"])
        if b:
            r["speedup"] = b / ms
        if b_sdpa:
            r["speedup_sdpa"] = b_sdpa / ms
