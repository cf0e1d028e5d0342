"""Kernel benchmarks: every op, forward and forward+backward, at RoBERTa shapes, every provider.

Providers (one row each):
  eager    plain PyTorch composing the same math in the benchmarked dtype
           (add + add + F.layer_norm; add + F.gelu; mul + add mask + softmax; matmul attention)
  compile  torch.compile of that eager code (default mode, static shapes)
  torch    roberta_fast's "torch" backend (the fp32-accumulating reference); CPU runs only
  triton   roberta_fast's Triton backend
  cuda     roberta_fast's CUDA C++ backend (when roberta_fast._C was built)
  sdpa     torch.nn.functional.scaled_dot_product_attention (attention ops only)

attention uses full-length sequences with a key padding mask that keeps every key (the FLOPs are
those of the dense shape); attention_varlen packs sequences of seeded lengths uniform in
[0.2 S, S], and its eager / compile / sdpa baselines pad the batch, run padded attention with a
mask and unpad again (what a user of those would have to do).

Each row: median, p20 and p80 time, the fewest bytes / the FLOPs of the op (roberta_fast.flops),
GB/s and % of the copy ceiling (memory-bound ops), TFLOP/s and % of the matmul ceiling (attention),
speedup over eager, and for forward rows the max error against a float64 reference beside the
bound 2 * eager's error + floor (so a fast wrong answer shows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from roberta_fast import flops, reference

from .common import Budget, Progress, dtype_name, short_error, time_cpu, time_gpu_kernel

OPS = ("layer_norm", "bias_gelu", "masked_softmax", "attention", "attention_varlen")
MEMORY_BOUND = ("layer_norm", "bias_gelu", "masked_softmax")
HEAD_DIM = 64
EPS = 1e-5
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, torch.float64: 1e-10}


# ----------------------------------------------------------------------------- shape grids


def _heads(hidden: int) -> int:
    return hidden // HEAD_DIM  # 768 -> 12, 1024 -> 16


def shape_grid(mode: str, ops=OPS) -> list[tuple[str, dict]]:
    """(op, params) for "full" (GPU), "quick" (GPU) or "cpu" (reduced) runs."""
    out: list[tuple[str, dict]] = []
    if mode == "full":
        tokens, hiddens, seqlens = (4096, 16384, 65536), (768, 1024), (128, 512)
        for op in ops:
            for t in tokens:
                for h in hiddens:
                    if op == "layer_norm":
                        out.append((op, {"tokens": t, "hidden": h}))
                    elif op == "bias_gelu":
                        out.append((op, {"tokens": t, "n": 4 * h}))
                    else:
                        for s in seqlens:
                            out.append((op, {"tokens": t, "seqlen": s, "heads": _heads(h)}))
    elif mode == "quick":
        table = {
            "layer_norm": [{"tokens": 32768, "hidden": 768}],
            "bias_gelu": [{"tokens": 32768, "n": 3072}],
            "masked_softmax": [{"tokens": 32768, "seqlen": 512, "heads": 12}],
            "attention": [{"tokens": 32768, "seqlen": 512, "heads": 12},
                          {"tokens": 16384, "seqlen": 128, "heads": 12}],
            "attention_varlen": [{"tokens": 32768, "seqlen": 512, "heads": 12}],
        }
        out = [(op, p) for op in ops for p in table[op]]
    elif mode == "cpu":
        table = {
            "layer_norm": [{"tokens": 512, "hidden": 768}],
            "bias_gelu": [{"tokens": 512, "n": 3072}],
            "masked_softmax": [{"tokens": 512, "seqlen": 128, "heads": 12}],
            "attention": [{"tokens": 512, "seqlen": 128, "heads": 12}],
            "attention_varlen": [{"tokens": 512, "seqlen": 128, "heads": 12}],
        }
        out = [(op, p) for op in ops for p in table[op]]
    elif mode == "check":  # tiny shapes for Triton under the interpreter (odd sizes on purpose)
        table = {
            "layer_norm": [{"tokens": 7, "hidden": 96}],
            "bias_gelu": [{"tokens": 7, "n": 80}],
            "masked_softmax": [{"tokens": 24, "seqlen": 12, "heads": 2}],
            "attention": [{"tokens": 24, "seqlen": 12, "heads": 2, "head_dim": 16}],
            "attention_varlen": [{"tokens": 24, "seqlen": 12, "heads": 2, "head_dim": 16}],
        }
        out = [(op, p) for op in ops for p in table[op]]
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return out


def label(op: str, p: dict) -> str:
    if op == "layer_norm":
        return f"T={p['tokens']} H={p['hidden']}"
    if op == "bias_gelu":
        return f"T={p['tokens']} N={p['n']}"
    if op == "masked_softmax":
        return f"T={p['tokens']} S={p['seqlen']} heads={p['heads']}"
    return f"T={p['tokens']} S={p['seqlen']} heads={p['heads']} D={p.get('head_dim', HEAD_DIM)}"


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One op at one shape and dtype: inputs, the implementations, the counts."""

    op: str
    params: dict
    dtype: torch.dtype
    inputs: dict
    grad_names: tuple
    eager: object  # callable(**inputs) -> output, the same math in the input dtype
    ours: object  # callable(backend, **inputs) -> output
    ref64: object  # callable(**inputs in float64) -> output
    bytes_fwd: int | None
    bytes_bwd: int | None
    flops_fwd: int | None = None
    flops_bwd: int | None = None
    sdpa: object = None
    extra: dict = field(default_factory=dict)


def _seqlens(gen: torch.Generator, total: int, s: int) -> list[int]:
    """Seeded lengths uniform in [0.2 S, S] summing to exactly `total` (the last one trimmed)."""
    lens, lo = [], max(1, int(0.2 * s))
    while sum(lens) < total:
        n = int(torch.randint(lo, s + 1, (1,), generator=gen).item())
        lens.append(min(n, total - sum(lens)))
    return lens


def _eager_attention(q, k, v, add_mask, scale):
    """Plain matmul attention on (B, S, H, D) in the input dtype; add_mask (B, 1, 1, S) or None."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    s = torch.matmul(qt, kt.transpose(-1, -2)) * scale  # (B, H, S, S)
    if add_mask is not None:
        s = s + add_mask
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, vt).transpose(1, 2)  # (B, S, H, D)


def _sdpa_attention(q, k, v, bool_mask, scale):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    m = None if bool_mask is None else bool_mask[:, None, None, :]
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=m, scale=scale).transpose(1, 2)


def _chunked_ref_attention(q, k, v, key_padding_mask, scale, chunk=8):
    """float64 reference attention over batch chunks (bounds the S x S memory)."""
    outs = []
    for i in range(0, q.shape[0], chunk):
        m = None if key_padding_mask is None else key_padding_mask[i:i + chunk]
        outs.append(reference.attention(q[i:i + chunk], k[i:i + chunk], v[i:i + chunk], m, scale))
    return torch.cat(outs)


def build_case(op: str, p: dict, dtype: torch.dtype, device, seed: int = 0) -> Case:
    from roberta_fast import ops

    gen = torch.Generator().manual_seed(seed)  # lengths and masks (host)
    dgen = torch.Generator(device=device).manual_seed(seed)  # tensors, drawn on the device

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=dgen, device=device) * std).to(dtype)

    e = torch.finfo(dtype).bits // 8
    if op == "layer_norm":
        t, h = p["tokens"], p["hidden"]
        inputs = {"x": rnd(t, h), "residual": rnd(t, h), "x_bias": rnd(h, std=0.1),
                  "weight": 1 + rnd(h, std=0.1), "bias": rnd(h, std=0.1)}
        return Case(
            op, p, dtype, inputs, ("x", "residual", "x_bias", "weight", "bias"),
            eager=lambda x, residual, x_bias, weight, bias: F.layer_norm(x + x_bias + residual, (h,), weight,
                                                                         bias, EPS),
            ours=lambda backend, x, residual, x_bias, weight, bias: ops.layer_norm(
                x, weight, bias, EPS, residual=residual, x_bias=x_bias, backend=backend),
            ref64=lambda x, residual, x_bias, weight, bias: reference.layer_norm(x, weight, bias, EPS, residual,
                                                                                 x_bias),
            bytes_fwd=flops.layer_norm_bytes(t, h, e),
            bytes_bwd=flops.layer_norm_bytes(t, h, e, stats=True) + flops.layer_norm_bytes(t, h, e, backward=True),
        )
    if op == "bias_gelu":
        t, n = p["tokens"], p["n"]
        inputs = {"x": rnd(t, n), "bias": rnd(n, std=0.1)}
        return Case(
            op, p, dtype, inputs, ("x", "bias"),
            eager=lambda x, bias: F.gelu(x + bias),
            ours=lambda backend, x, bias: ops.bias_gelu(x, bias, "none", backend=backend),
            ref64=lambda x, bias: reference.bias_gelu(x, bias, "none"),
            bytes_fwd=flops.bias_gelu_bytes(t, n, e),
            bytes_bwd=flops.bias_gelu_bytes(t, n, e) + flops.bias_gelu_bytes(t, n, e, backward=True),
        )
    s, nh, d = p["seqlen"], p["heads"], p.get("head_dim", HEAD_DIM)
    b = p["tokens"] // s
    scale = d ** -0.5
    if op == "masked_softmax":
        lens = torch.tensor([int(x) for x in torch.randint(max(1, s // 5), s + 1, (b,), generator=gen)])
        keep = torch.arange(s)[None, :] < lens[:, None]  # (B, S)
        mask = torch.zeros(b, 1, 1, s, dtype=dtype)
        mask.masked_fill_(~keep[:, None, None, :], torch.finfo(dtype).min)  # HF's additive mask
        mask = mask.to(device)
        inputs = {"scores": rnd(b, nh, s, s, std=3.0)}

        def ref64(scores):
            return torch.cat([reference.masked_softmax(scores[i:i + 8], mask[i:i + 8], scale)
                              for i in range(0, b, 8)])

        return Case(
            op, p, dtype, inputs, ("scores",),
            eager=lambda scores: torch.softmax(scores * scale + mask, dim=-1),
            ours=lambda backend, scores: ops.masked_softmax(scores, mask, scale, backend=backend),
            ref64=ref64,
            bytes_fwd=flops.masked_softmax_bytes(b, nh, s, s, e, mask_bytes=b * s * e),
            bytes_bwd=(flops.masked_softmax_bytes(b, nh, s, s, e, mask_bytes=b * s * e)
                       + flops.masked_softmax_bytes(b, nh, s, s, e, backward=True)),
            extra={"batch": b},
        )
    if op == "attention":
        kpm = torch.ones(b, s, dtype=torch.bool, device=device)  # every key real: dense FLOPs
        add_mask = torch.zeros(b, 1, 1, s, dtype=dtype, device=device)
        inputs = {"q": rnd(b, s, nh, d), "k": rnd(b, s, nh, d), "v": rnd(b, s, nh, d)}
        fl = flops.attention_flops([s] * b, nh, d)
        return Case(
            op, p, dtype, inputs, ("q", "k", "v"),
            eager=lambda q, k, v: _eager_attention(q, k, v, add_mask, scale),
            ours=lambda backend, q, k, v: ops.attention(q, k, v, key_padding_mask=kpm, scale=scale,
                                                        backend=backend),
            ref64=lambda q, k, v: _chunked_ref_attention(q, k, v, kpm, scale),
            sdpa=lambda q, k, v: _sdpa_attention(q, k, v, kpm, scale),
            bytes_fwd=flops.attention_bytes(b * s, nh, d, e, mask_bytes=b * s),
            bytes_bwd=(flops.attention_bytes(b * s, nh, d, e, mask_bytes=b * s)
                       + flops.attention_bytes(b * s, nh, d, e, mask_bytes=b * s, backward=True)),
            flops_fwd=fl, flops_bwd=fl + flops.attention_flops([s] * b, nh, d, backward=True),
            extra={"batch": b},
        )
    if op == "attention_varlen":
        lens = _seqlens(gen, p["tokens"], s)
        nb, t = len(lens), sum(lens)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
        bi = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lens)]).to(device)
        pi = torch.cat([torch.arange(n) for n in lens]).to(device)
        keep = torch.zeros(nb, s, dtype=torch.bool, device=device)
        keep[bi, pi] = True
        add_mask = torch.zeros(nb, 1, 1, s, dtype=dtype, device=device)
        add_mask.masked_fill_(~keep[:, None, None, :], torch.finfo(dtype).min)

        def pad(x):
            out = x.new_zeros(nb, s, *x.shape[1:])
            out[bi, pi] = x
            return out

        def eager(q, k, v):
            return _eager_attention(pad(q), pad(k), pad(v), add_mask, scale)[bi, pi]

        def sdpa(q, k, v):
            return _sdpa_attention(pad(q), pad(k), pad(v), keep, scale)[bi, pi]

        inputs = {"q": rnd(t, nh, d), "k": rnd(t, nh, d), "v": rnd(t, nh, d)}
        fl = flops.attention_flops(lens, nh, d)
        cu_bytes = 4 * (nb + 1)
        return Case(
            op, p, dtype, inputs, ("q", "k", "v"),
            eager=eager,
            ours=lambda backend, q, k, v: ops.attention_varlen(q, k, v, cu, s, scale=scale, backend=backend),
            ref64=lambda q, k, v: reference.attention_varlen(q, k, v, cu, s, scale),
            sdpa=sdpa,
            bytes_fwd=flops.attention_bytes(t, nh, d, e, mask_bytes=cu_bytes),
            bytes_bwd=(flops.attention_bytes(t, nh, d, e, mask_bytes=cu_bytes)
                       + flops.attention_bytes(t, nh, d, e, mask_bytes=cu_bytes, backward=True)),
            flops_fwd=fl, flops_bwd=fl + flops.attention_flops(lens, nh, d, backward=True),
            extra={"batch": nb, "real_tokens": t},
        )
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


# ----------------------------------------------------------------------------- runnables


def _impl(case: Case, provider: str):
    if provider == "eager":
        return case.eager
    if provider == "sdpa":
        if case.sdpa is None:
            raise ValueError(f"{case.op} has no sdpa provider")
        return case.sdpa
    if provider == "compile":
        torch._dynamo.reset()  # fresh caches: no silent fallback to eager after the recompile limit
        return torch.compile(case.eager, dynamic=False)
    if provider in ("torch", "triton", "cuda"):
        return lambda **kw: case.ours(provider, **kw)
    raise ValueError(f"unknown provider {provider!r}")


def make_runnable(case: Case, provider: str, backward: bool):
    """(fn, grad_to_none, first_output): fn runs the provider once (forward, or forward+backward)."""
    impl = _impl(case, provider)
    if not backward:
        inputs = case.inputs

        def fn():
            with torch.no_grad():
                return impl(**inputs)

        return fn, None, fn()
    tensors = {k: v.detach().clone().requires_grad_(k in case.grad_names) for k, v in case.inputs.items()}
    out = impl(**tensors)
    gen = torch.Generator(device=out.device).manual_seed(1)
    dy = torch.randn(out.shape, generator=gen, device=out.device).to(out.dtype)
    out.backward(dy)
    leaves = [tensors[k] for k in case.grad_names]

    def fn_bwd():
        impl(**tensors).backward(dy)

    return fn_bwd, leaves, out.detach()


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    d = (out.double() - ref.double()).abs()
    if torch.isnan(d).any():
        return float("nan")
    return d.max().item() if d.numel() else 0.0


# ----------------------------------------------------------------------------- the suite


def providers_for(op: str, device: torch.device, avail: dict) -> list[str]:
    if device.type == "cpu":
        return ["eager", "torch"]  # the reduced mode: Triton runs under the interpreter only as a check
    out = ["eager"]
    if avail.get("triton"):
        out.append("triton")
    if avail.get("cuda"):
        out.append("cuda")
    if op in ("attention", "attention_varlen"):
        out.append("sdpa")
    out.append("compile")
    return out


def run_kernels(*, device: torch.device, mode: str, ops, dtypes, ceilings: dict, avail: dict,
                budget: Budget, rep_ms: float, progress: bool = True, notes: list | None = None) -> list[dict]:
    notes = [] if notes is None else notes
    grid = shape_grid(mode, ops)
    passes = ("fwd", "fwd+bwd")
    todo = [(op, p, dt, ps) for op, p in grid for dt in dtypes for ps in passes]
    total = sum(len(providers_for(op, device, avail)) for op, *_ in todo)
    bar = Progress(total, "kernels", enable=progress)
    rows: list[dict] = []
    for op, p, dt, ps in todo:
        provs = providers_for(op, device, avail)
        try:
            case = build_case(op, p, dt, device)
        except Exception as e:  # noqa: BLE001
            for prov in provs:
                rows.append(_row(op, p, dt, ps, prov, None, error=f"building inputs: {short_error(e)}"))
                bar.update()
            continue
        ref = None
        eager_err = None
        case_rows = []
        for prov in provs:
            bar.update(f"{op} {ps} {prov}")
            row = _row(op, p, dt, ps, prov, case)
            case_rows.append(row)
            if budget.left() <= 0 or (prov == "compile" and budget.left() < 45):
                row["error"] = "skipped: time budget"
                continue
            try:
                fn, leaves, out = make_runnable(case, prov, ps == "fwd+bwd")
                if ps == "fwd":
                    if ref is None:
                        with torch.no_grad():
                            ref = case.ref64(**{k: v.double() for k, v in case.inputs.items()})
                    row["max_err"] = max_err(out, ref)
                    if prov == "eager":
                        eager_err = row["max_err"]
                del out
                if device.type == "cuda":
                    ms = time_gpu_kernel(fn, rep_ms=rep_ms, grad_to_none=leaves)
                else:
                    ms = time_cpu(fn, rep_ms=rep_ms, grad_to_none=leaves)
                row["ms"], row["ms_p20"], row["ms_p80"] = ms
            except NotImplementedError as e:
                row["error"] = f"not implemented: {short_error(e)}"
            except Exception as e:  # noqa: BLE001
                row["error"] = short_error(e)
            finally:
                fn = leaves = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        _finish_case(case_rows, eager_err, dt, ceilings)
        rows.extend(case_rows)
        del case, ref
    bar.close()
    return rows


def _row(op, p, dt, ps, prov, case) -> dict:
    backward = ps == "fwd+bwd"
    row = {
        "suite": "kernel", "op": op, "pass": ps, "provider": prov, "dtype": dtype_name(dt),
        "shape": dict(p), "label": label(op, p), "ms": None, "ms_p20": None, "ms_p80": None,
        "bytes": None, "flops": None, "gbps": None, "pct_copy": None, "tflops": None, "pct_matmul": None,
        "speedup": None, "max_err": None, "err_bound": None, "ok": None, "error": None,
    }
    if case is not None:
        row["bytes"] = case.bytes_bwd if backward else case.bytes_fwd
        row["flops"] = case.flops_bwd if backward else case.flops_fwd
        row["shape"].update(case.extra)
    return row


def _finish_case(rows: list[dict], eager_err, dt, ceilings: dict):
    eager_ms = next((r["ms"] for r in rows if r["provider"] == "eager" and r["ms"]), None)
    for r in rows:
        if r["max_err"] is not None and eager_err is not None:
            r["err_bound"] = 2 * eager_err + FLOOR[dt]
            r["ok"] = bool(r["max_err"] <= r["err_bound"])
        ms = r["ms"]
        if not ms:
            continue
        if r["bytes"] and r["op"] in MEMORY_BOUND:
            r["gbps"] = r["bytes"] / ms / 1e6
            if ceilings.get("copy_gbps"):
                r["pct_copy"] = 100 * r["gbps"] / ceilings["copy_gbps"]
        if r["flops"]:
            r["tflops"] = r["flops"] / ms / 1e9
            if ceilings.get("matmul_tflops"):
                r["pct_matmul"] = 100 * r["tflops"] / ceilings["matmul_tflops"]
        if eager_ms:
            r["speedup"] = eager_ms / ms


# ----------------------------------------------------------------------------- interpreter checks


def check_triton(*, device: torch.device, ops, dtypes=(torch.float32, torch.float16), backend="triton",
                 progress: bool = True) -> list[dict]:
    """Correctness of a kernel backend on tiny shapes (CPU: Triton under TRITON_INTERPRET=1): output
    and every input gradient against float64, with the rule max|ours - ref| <= 2 * max|eager - ref|
    + floor (eager = the same math in the same dtype)."""
    grid = shape_grid("check", ops)
    todo = [(op, p, dt, ps) for op, p in grid for dt in dtypes for ps in ("fwd", "fwd+bwd")]
    bar = Progress(len(todo), f"{backend} checks", enable=progress)
    rows = []
    for op, p, dt, ps in todo:
        bar.update(f"{op} {ps} {dtype_name(dt)}")
        row = {"suite": "check", "op": op, "pass": ps, "provider": backend, "dtype": dtype_name(dt),
               "shape": dict(p), "label": label(op, p), "max_err": None, "err_bound": None, "ok": None,
               "worst": None, "error": None}
        rows.append(row)
        try:
            case = build_case(op, p, dt, device, seed=3)
            results = _check_one(case, backend, ps == "fwd+bwd")
            worst = max(results, key=lambda r: r[1] / r[2] if r[2] else float("inf"))
            row["max_err"], row["err_bound"] = worst[1], worst[2]
            row["worst"] = worst[0]
            row["ok"] = all(err <= bound for _, err, bound in results)
        except NotImplementedError as e:
            row["error"] = f"not implemented: {short_error(e)}"
        except Exception as e:  # noqa: BLE001
            row["error"] = short_error(e)
    bar.close()
    return rows


def _check_one(case: Case, backend: str, backward: bool):
    """[(tensor name, max err, bound)] for the output (and each gradient when backward)."""
    def run(fn, tensors):
        t = {k: v.detach().clone().requires_grad_(backward and k in case.grad_names) for k, v in tensors.items()}
        out = fn(**t)
        grads = {}
        if backward:
            gen = torch.Generator().manual_seed(1)
            dy = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
            out.backward(dy)
            grads = {k: t[k].grad for k in case.grad_names}
        return out.detach(), grads

    ours = run(lambda **kw: case.ours(backend, **kw), case.inputs)
    eager = run(case.eager, case.inputs)
    ref = run(case.ref64, {k: v.double() for k, v in case.inputs.items()})
    floor = FLOOR[case.dtype]
    res = []
    pairs = [("output", ours[0], eager[0], ref[0])]
    pairs += [(f"grad {k}", ours[1][k], eager[1][k], ref[1][k]) for k in (case.grad_names if backward else ())]
    for name, o, e, r in pairs:
        if o is None or r is None:
            res.append((name, float("inf"), 0.0))
            continue
        err = max_err(o, r)
        bound = 2 * max_err(e, r) + floor * max(1.0, r.abs().max().item())
        res.append((name, err, bound))
    return res
