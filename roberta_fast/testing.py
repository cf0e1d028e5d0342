"""The harness: what "correct" and "fast" mean, written once for the tests, the tuner, the benchmarks and
the demo.

Correct: the accuracy rule (from FlashAttention's tests)

    max|ours - ref| <= 2 * max|torch_same - ref| + floor

where ref is computed in higher precision (float64 in the tests) from the same inputs, torch_same is plain
PyTorch in the dtype under test, and floor (FLOOR, per dtype) absorbs the rounding of the output itself
where torch happens to be exact. NaN patterns must match. `assert_rule` raises with the worst index, both
values and the error ratio; `check_rule` returns that message (None when the rule holds).

Op cases (`build_case`): one op at one shape and dtype, with inputs as the encoder makes them (fused QKV
views, the model's masks), the eager PyTorch version (the yardstick and the benchmarks' baseline), the
oracle (the reference code, given higher-precision inputs), the tuning key, and the bytes and FLOPs the op
must move and compute. `Verifier` computes a case's oracle and yardstick once and judges backends on it.

Shape grids (`shape_grid`): the shapes each consumer runs, by name ("bench", "bench-quick", "tune",
"tune-quick", "cpu", "check").

Timers: `time_gpu_kernel` (triton.testing.do_bench: CUDA events, L2 flushed between repeats),
`time_gpu_loop` (CUDA events around whole calls, for latency percentiles), `time_cpu` (perf_counter).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
import torch.nn.functional as F

from . import flops, ops, reference
from ._utils import dtype_name

# ----------------------------------------------------------------------------- the accuracy rule

# floor per dtype: absorbs the rounding of the output itself where torch happens to be exact
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, torch.float64: 1e-10}
FACTOR = 2.0


def check_rule(ours, ref, torch_same, *, name="output", floor=None, factor=FACTOR) -> str | None:
    """None when max|ours - ref| <= factor * max|torch_same - ref| + floor (and the NaN patterns match),
    else the reason: the worst index, the three values there and the error ratio."""
    if tuple(ours.shape) != tuple(ref.shape):
        return f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    if ours.numel() == 0:
        return None
    if floor is None:
        floor = FLOOR[ours.dtype]
    o = ours.detach().double().cpu()
    r = ref.detach().double().cpu()
    t = torch_same.detach().double().cpu()
    nan_o, nan_r = torch.isnan(o), torch.isnan(r)
    if not torch.equal(nan_o, nan_r):
        return (f"{name}: NaN pattern differs from reference ({int(nan_o.sum())} NaN in ours, "
                f"{int(nan_r.sum())} in ref)")
    o, r, t = o.nan_to_num(0.0), r.nan_to_num(0.0), t.nan_to_num(0.0)
    err = (o - r).abs()
    torch_err = (t - r).abs().max().item()
    bound = factor * torch_err + floor
    worst = err.max().item()
    if worst <= bound:
        return None
    idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    return (f"{name}: max|ours - ref| = {worst:.3e} > {factor} * {torch_err:.3e} + {floor:.1e} = {bound:.3e} "
            f"(ratio {worst / max(torch_err, 1e-30):.2f}x torch's error); worst at {idx}: "
            f"ours={o[idx].item():.6g} ref={r[idx].item():.6g} torch={t[idx].item():.6g}")


def assert_rule(ours, ref, torch_same, *, name="output", floor=None, factor=FACTOR):
    """check_rule, raising AssertionError with its message."""
    why = check_rule(ours, ref, torch_same, name=name, floor=floor, factor=factor)
    if why is not None:
        raise AssertionError(why)


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| in float64 (NaN when either has a NaN the other lacks)."""
    d = (out.detach().double() - ref.detach().double()).abs()
    if torch.isnan(d).any():
        return float("nan")
    return d.max().item() if d.numel() else 0.0


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty / torch.empty_like / Tensor.new_empty return NaN-filled float tensors (ints: -7777) while
    active, so any output element a kernel forgets to write shows up as NaN (the tests' poison_empty)."""
    real_empty, real_like, real_new = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7777)
        return t

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: fill(real_new(self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = real_empty, real_like, real_new


# ----------------------------------------------------------------------------- op cases

OPS = ("layer_norm", "bias_gelu", "masked_softmax", "attention", "attention_varlen")
MEMORY_BOUND = ("layer_norm", "bias_gelu", "masked_softmax")
EPS = 1e-5
HEAD_DIM = 64


@dataclasses.dataclass
class OpCase:
    """One op at one shape and dtype.

    run(backend, inputs)  the public op on `backend` ("torch", "triton", "cuda")
    eager(inputs)         plain PyTorch in the inputs' dtype: the rule's yardstick, the benchmarks' baseline
    oracle(inputs)        the reference code; given inputs in higher precision it is the rule's ref
    sdpa(inputs)          torch's scaled_dot_product_attention doing the same (attention ops only)
    leaves                inputs that get gradients; `batched` inputs have the batch as dim 0, so the
                          yardstick and the oracle can run `chunk` sequences at a time (bounded memory)
    key                   the op's tuning key (what the op passes to the backend registry)
    """

    op: str
    params: dict
    dtype: torch.dtype
    inputs: dict
    leaves: tuple
    run: object
    eager: object
    oracle: object
    key: tuple
    out_shape: tuple
    bytes_fwd: int | None = None
    bytes_bwd: int | None = None
    flops_fwd: int | None = None
    flops_bwd: int | None = None
    sdpa: object = None
    batched: tuple = ()
    chunk: int = 0
    extra: dict = dataclasses.field(default_factory=dict)


def uniform_lengths(gen: torch.Generator, total: int, s: int) -> list[int]:
    """Seeded lengths uniform in [0.2 S, S] summing to exactly `total` (the last one trimmed)."""
    lens, lo = [], max(1, int(0.2 * s))
    while sum(lens) < total:
        n = int(torch.randint(lo, s + 1, (1,), generator=gen).item())
        lens.append(min(n, total - sum(lens)))
    return lens


def dead_rows_softmax(s):
    """softmax over the last dim with the ops' rule: a row with every element -inf gives zeros."""
    dead = s.amax(-1, keepdim=True) == float("-inf")
    return torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)


def eager_attention(q, k, v, kpm, scale):
    """Plain PyTorch attention in q's dtype on (B, S, H, D); kpm bool (B, S) (True = real key) or None."""
    s = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) * scale  # (B, H, S, S)
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    p = dead_rows_softmax(s).to(q.dtype)
    return torch.matmul(p, v.transpose(1, 2)).transpose(1, 2)  # (B, S, H, D)


def sdpa_attention(q, k, v, kpm, scale):
    """torch's scaled_dot_product_attention on (B, S, H, D) with a bool key padding mask (B, S) or None."""
    m = None if kpm is None else kpm[:, None, None, :]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m,
                                          scale=scale).transpose(1, 2)


def build_case(op: str, p: dict, dtype: torch.dtype, device, seed: int = 0) -> OpCase:
    """The inputs of `op` at shape `p` as the encoder makes them, on `device`, seeded.

    layer_norm        {"tokens", "hidden"}: x + x_bias + residual, weight, bias (the post-GEMM norm)
    bias_gelu         {"tokens", "n"}: the FFN1 output and its bias, exact erf
    masked_softmax    {"tokens", "seqlen", "heads"}: (B, heads, S, S) scores, the model's bool mask keeping
                      real keys of real queries (lengths uniform in [0.2 S, S]; padded query rows are zeros)
    attention         {"tokens", "seqlen", "heads", "head_dim"}: full-length sequences (dense FLOPs) with a
                      key padding mask that keeps every key; q, k, v are views into one fused QKV tensor
    attention_varlen  the same, packed: lengths uniform in [0.2 S, S] summing to `tokens`
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)  # lengths (host)
    dgen = torch.Generator(device=device).manual_seed(seed)  # tensors, drawn on the device
    dn, e = dtype_name(dtype), torch.finfo(dtype).bits // 8

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=dgen, device=device) * std).to(dtype)

    if op == "layer_norm":
        t, n = p["tokens"], p["hidden"]
        inputs = {"x": rnd(t, n), "residual": rnd(t, n), "x_bias": rnd(n, std=0.1),
                  "weight": 1 + rnd(n, std=0.1), "bias": rnd(n, std=0.1)}
        return OpCase(
            op, p, dtype, inputs, ("x", "residual", "x_bias", "weight", "bias"),
            run=lambda b, i: ops.layer_norm(i["x"], i["weight"], i["bias"], EPS, residual=i["residual"],
                                            x_bias=i["x_bias"], backend=b),
            eager=lambda i: F.layer_norm(i["x"] + i["x_bias"] + i["residual"], (n,), i["weight"], i["bias"], EPS),
            oracle=lambda i: reference.layer_norm(i["x"], i["weight"], i["bias"], EPS, i["residual"], i["x_bias"]),
            key=(t, n, dn), out_shape=(t, n),
            bytes_fwd=flops.layer_norm_bytes(t, n, e),
            bytes_bwd=flops.layer_norm_bytes(t, n, e, stats=True) + flops.layer_norm_bytes(t, n, e, backward=True))
    if op == "bias_gelu":
        t, n = p["tokens"], p["n"]
        inputs = {"x": rnd(t, n), "bias": rnd(n, std=0.1)}
        return OpCase(
            op, p, dtype, inputs, ("x", "bias"),
            run=lambda b, i: ops.bias_gelu(i["x"], i["bias"], "none", backend=b),
            eager=lambda i: F.gelu(i["x"] + i["bias"]),
            oracle=lambda i: reference.bias_gelu(i["x"], i["bias"], "none"),
            key=(t, n, dn), out_shape=(t, n),
            bytes_fwd=flops.bias_gelu_bytes(t, n, e),
            bytes_bwd=flops.bias_gelu_bytes(t, n, e) + flops.bias_gelu_bytes(t, n, e, backward=True))
    s, nh, d = p["seqlen"], p["heads"], p.get("head_dim", HEAD_DIM)
    scale = d ** -0.5
    if op == "masked_softmax":
        nb = max(1, p["tokens"] // s)
        lens = torch.randint(max(1, s // 5), s + 1, (nb,), generator=gen)
        keep = (torch.arange(s)[None, :] < lens[:, None]).to(device)  # (B, S)
        mask = keep[:, None, None, :] & keep[:, None, :, None]  # (B, 1, S, S)
        inputs = {"scores": rnd(nb, nh, s, s, std=3.0), "mask": mask}
        return OpCase(
            op, p, dtype, inputs, ("scores",),
            run=lambda b, i: ops.masked_softmax(i["scores"], i["mask"], scale, backend=b),
            eager=lambda i: dead_rows_softmax((i["scores"] * scale).masked_fill(~i["mask"], float("-inf"))),
            oracle=lambda i: reference.masked_softmax(i["scores"], i["mask"], scale),
            key=(nb * nh * s, s, dn, "bool"), out_shape=(nb, nh, s, s), batched=("scores", "mask"), chunk=8,
            bytes_fwd=flops.masked_softmax_bytes(nb, nh, s, s, e, mask_bytes=nb * s * s),
            bytes_bwd=(flops.masked_softmax_bytes(nb, nh, s, s, e, mask_bytes=nb * s * s)
                       + flops.masked_softmax_bytes(nb, nh, s, s, e, backward=True)),
            extra={"batch": nb})
    if op == "attention":
        nb = max(1, p["tokens"] // s)
        kpm = torch.ones(nb, s, dtype=torch.bool, device=device)  # every key real: the dense FLOPs
        inputs = {"qkv": rnd(nb, s, 3, nh, d), "kpm": kpm}

        def split(i):
            return i["qkv"][:, :, 0], i["qkv"][:, :, 1], i["qkv"][:, :, 2]  # (B, S, H, D) views

        fl = flops.attention_flops([s] * nb, nh, d)
        by = flops.attention_bytes(nb * s, nh, d, e, mask_bytes=nb * s)
        return OpCase(
            op, p, dtype, inputs, ("qkv",),
            run=lambda b, i: ops.attention(*split(i), key_padding_mask=i["kpm"], scale=scale, backend=b),
            eager=lambda i: eager_attention(*split(i), i["kpm"], scale),
            oracle=lambda i: reference.attention(*split(i), i["kpm"], scale),
            sdpa=lambda i: sdpa_attention(*split(i), i["kpm"], scale),
            key=(nb, s, nh, d, dn, True), out_shape=(nb, s, nh, d), batched=("qkv", "kpm"), chunk=8,
            bytes_fwd=by, bytes_bwd=by + flops.attention_bytes(nb * s, nh, d, e, mask_bytes=nb * s, backward=True),
            flops_fwd=fl, flops_bwd=fl + flops.attention_flops([s] * nb, nh, d, backward=True),
            extra={"batch": nb})
    if op == "attention_varlen":
        lens = uniform_lengths(gen, p["tokens"], s)
        nb, t, max_len = len(lens), sum(lens), max(lens)
        cu_host = [0] + torch.tensor(lens).cumsum(0).tolist()
        cu = torch.tensor(cu_host, dtype=torch.int32, device=device)
        inputs = {"qkv": rnd(t, 3, nh, d)}
        # the padded layout that eager PyTorch and SDPA need (what a user of those has to do)
        bi = torch.cat([torch.full((n,), j, dtype=torch.long) for j, n in enumerate(lens)]).to(device)
        pi = torch.cat([torch.arange(n) for n in lens]).to(device)
        keep = torch.zeros(nb, max_len, dtype=torch.bool, device=device)
        keep[bi, pi] = True

        def split(i):
            return i["qkv"][:, 0], i["qkv"][:, 1], i["qkv"][:, 2]  # (T, H, D) views

        def padded(fn):
            def run(i):
                q, k, v = (x.new_zeros(nb, max_len, nh, d).index_put_((bi, pi), x) for x in split(i))
                return fn(q, k, v, keep, scale)[bi, pi]
            return run

        fl = flops.attention_flops(lens, nh, d)
        by = flops.attention_bytes(t, nh, d, e, mask_bytes=4 * (nb + 1))
        return OpCase(
            op, p, dtype, inputs, ("qkv",),
            run=lambda b, i: ops.attention_varlen(*split(i), cu, max_len, scale=scale, backend=b),
            eager=padded(eager_attention),
            oracle=lambda i: reference.attention_varlen(*split(i), cu, max_len, scale),
            sdpa=padded(sdpa_attention),
            key=(t, max_len, nh, d, dn), out_shape=(t, nh, d),
            bytes_fwd=by, bytes_bwd=by + flops.attention_bytes(t, nh, d, e, mask_bytes=4 * (nb + 1), backward=True),
            flops_fwd=fl, flops_bwd=fl + flops.attention_flops(lens, nh, d, backward=True),
            extra={"batch": nb, "real_tokens": t})
    raise ValueError(f"unknown op {op!r}: expected one of {OPS}")


def evaluate(case: OpCase, fn, inputs: dict, dy, want_grads: bool):
    """(output, {leaf: grad}) of fn(inputs) (grads of the case's leaves for the upstream gradient dy), a
    chunk of `case.chunk` batch entries at a time for batched cases."""
    if want_grads:
        inputs = {k: (v.detach().requires_grad_(True) if k in case.leaves else v) for k, v in inputs.items()}
    batched = bool(case.batched and case.chunk)
    n = next(iter(inputs.values())).shape[0] if batched else 0
    spans = [(a, min(a + case.chunk, n)) for a in range(0, n, case.chunk)] if batched else [(None, None)]
    outs, grads = [], {k: [] for k in case.leaves} if want_grads else {}
    for a, e in spans:
        sub = inputs if a is None else {k: (v[a:e] if k in case.batched else v) for k, v in inputs.items()}
        if want_grads:
            with torch.enable_grad():
                out = fn(sub)
                leaves = [sub[k] for k in case.leaves]
                g = torch.autograd.grad(out, leaves, dy if a is None else dy[a:e], allow_unused=True)
            for k, gk, leaf in zip(case.leaves, g, leaves):
                grads[k].append(gk if gk is not None else torch.zeros_like(leaf))
        else:
            with torch.no_grad():
                out = fn(sub)
        outs.append(out.detach())
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    grads = {k: (v[0] if len(v) == 1 else torch.cat(v)) for k, v in grads.items()}
    return out, grads


class Verifier:
    """A case's oracle and yardstick, computed once (the oracle in float32, float64 for float32 or
    with `oracle_dtype`); judge(backend) runs the backend once and returns None (the rule holds for the
    output, and in "train" mode for every gradient) or why not. `worst` keeps the last judged errors."""

    def __init__(self, case: OpCase, train: bool = False, dy=None, oracle_dtype=None):
        self.case, self.train = case, train
        if train and dy is None:
            gen = torch.Generator(device=case.inputs[case.leaves[0]].device).manual_seed(1)
            dy = torch.randn(case.out_shape, generator=gen, device=gen.device).to(case.dtype)
        self.dy = dy
        hi = oracle_dtype or (torch.float64 if case.dtype == torch.float32 else torch.float32)
        up = {k: (v.to(hi) if v.is_floating_point() else v) for k, v in case.inputs.items()}
        self.ref, self.ref_grads = evaluate(case, case.oracle, up, dy.to(hi) if dy is not None else None, train)
        self.base, self.base_grads = evaluate(case, case.eager, case.inputs, dy, train)
        self.errors: list[tuple[str, float, float]] = []

    def judge(self, backend: str) -> str | None:
        c = self.case
        out, grads = evaluate(dataclasses.replace(c, batched=()), lambda i: c.run(backend, i), c.inputs,
                              self.dy, self.train)
        pairs = [("output", out, self.ref, self.base)]
        if self.train:
            pairs += [(f"grad of {k}", grads[k], self.ref_grads[k], self.base_grads[k]) for k in c.leaves]
        self.errors = []
        for name, got, ref, base in pairs:
            if name == "output" and got.dtype != c.dtype:
                return f"{name}: dtype {dtype_name(got.dtype)}, expected {dtype_name(c.dtype)}"
            torch_err = max_abs_err(base, ref)
            self.errors.append((name, max_abs_err(got, ref), FACTOR * torch_err + FLOOR[c.dtype]))
            why = check_rule(got.to(ref.dtype), ref, base.to(ref.dtype), name=name, floor=FLOOR[c.dtype])
            if why is not None:
                return why
        return None


# ----------------------------------------------------------------------------- shape grids


def _heads(hidden: int) -> int:
    return hidden // HEAD_DIM  # 768 -> 12, 1024 -> 16


def _roberta_grid(ops, tokens, hiddens, seqlens=(128, 512)) -> list[tuple[str, dict]]:
    out = []
    for op in ops:
        for t in tokens:
            for h in hiddens:
                if op == "layer_norm":
                    out.append((op, {"tokens": t, "hidden": h}))
                elif op == "bias_gelu":
                    out.append((op, {"tokens": t, "n": 4 * h}))
                else:
                    out += [(op, {"tokens": t, "seqlen": s, "heads": _heads(h), "head_dim": HEAD_DIM})
                            for s in seqlens]
    return out


def _table(ops, table) -> list[tuple[str, dict]]:
    return [(op, dict(p)) for op in ops for p in table[op]]


def shape_grid(kind: str, ops=OPS) -> list[tuple[str, dict]]:
    """(op, params) at RoBERTa shapes (hidden 768 / 1024, heads 12 / 16, head_dim 64, FFN 4 x hidden,
    seqlen 128 / 512) for each consumer:

      bench        the GPU benchmark: tokens 4K, 16K, 64K
      bench-quick  one or two shapes per op (what gpu_suite.sh runs)
      tune         the tuner on a GPU: every power of two of tokens from 4K to 64K
      tune-quick   32K tokens, hidden 768
      cpu          the reduced CPU benchmark (torch backend timings)
      check        tiny odd shapes for the interpreter / emulation correctness checks and the CPU tuner
    """
    if kind == "bench":
        return _roberta_grid(ops, (4096, 16384, 65536), (768, 1024))
    if kind == "tune":
        return _roberta_grid(ops, (4096, 8192, 16384, 32768, 65536), (768, 1024))
    if kind == "tune-quick":
        return _roberta_grid(ops, (32768,), (768,))
    if kind == "bench-quick":
        return _table(ops, {
            "layer_norm": [{"tokens": 32768, "hidden": 768}],
            "bias_gelu": [{"tokens": 32768, "n": 3072}],
            "masked_softmax": [{"tokens": 32768, "seqlen": 512, "heads": 12}],
            "attention": [{"tokens": 32768, "seqlen": 512, "heads": 12}, {"tokens": 16384, "seqlen": 128, "heads": 12}],
            "attention_varlen": [{"tokens": 32768, "seqlen": 512, "heads": 12}],
        })
    if kind == "cpu":
        return _table(ops, {
            "layer_norm": [{"tokens": 512, "hidden": 768}],
            "bias_gelu": [{"tokens": 512, "n": 3072}],
            "masked_softmax": [{"tokens": 512, "seqlen": 128, "heads": 12}],
            "attention": [{"tokens": 512, "seqlen": 128, "heads": 12}],
            "attention_varlen": [{"tokens": 512, "seqlen": 128, "heads": 12}],
        })
    if kind == "check":
        return _table(ops, {
            "layer_norm": [{"tokens": 7, "hidden": 96}],
            "bias_gelu": [{"tokens": 7, "n": 80}],
            "masked_softmax": [{"tokens": 24, "seqlen": 12, "heads": 2}],
            "attention": [{"tokens": 24, "seqlen": 12, "heads": 2, "head_dim": 16}],
            "attention_varlen": [{"tokens": 24, "seqlen": 12, "heads": 2, "head_dim": 16}],
        })
    raise ValueError(f"unknown shape grid {kind!r}: expected bench, bench-quick, tune, tune-quick, cpu or check")


def shape_label(op: str, p: dict) -> str:
    if op == "layer_norm":
        return f"T={p['tokens']} N={p['hidden']}"
    if op == "bias_gelu":
        return f"T={p['tokens']} N={p['n']}"
    if op == "masked_softmax":
        return f"T={p['tokens']} S={p['seqlen']} heads={p['heads']}"
    return f"T={p['tokens']} S={p['seqlen']} heads={p['heads']} D={p.get('head_dim', HEAD_DIM)}"


# ----------------------------------------------------------------------------- timers


def quantile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an already sorted list."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize_ms(samples: list[float], qs=(0.5, 0.2, 0.8)) -> list[float]:
    s = sorted(samples)
    return [quantile(s, q) for q in qs]


def time_cpu(fn, *, rep_ms: float = 50.0, min_reps: int = 5, max_reps: int = 200, warmup: int = 1,
             qs=(0.5, 0.2, 0.8), grad_to_none=None) -> list[float]:
    """perf_counter timing on the host: quantiles (ms) of per-call times."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() < t_end):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize_ms(samples, qs)


def time_gpu_kernel(fn, *, rep_ms: float = 100.0, warmup_ms: float = 25.0, grad_to_none=None,
                    qs=(0.5, 0.2, 0.8)) -> list[float]:
    """triton.testing.do_bench quantiles (ms): CUDA events, warm-up, L2 flushed between repeats."""
    from triton.testing import do_bench

    res = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=list(qs))
    return [float(v) for v in (res if isinstance(res, (list, tuple)) else [res])]


def time_gpu_loop(fn, *, rep_ms: float = 100.0, min_reps: int = 10, max_reps: int = 1000, warmup: int = 3,
                  qs=(0.5, 0.9)) -> list[float]:
    """CUDA-event timing of whole calls (the encoder): at least min_reps samples, about rep_ms in total."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    n = int(min(max_reps, max(min_reps, rep_ms / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return summarize_ms([s.elapsed_time(e) for s, e in zip(starts, ends)], qs)


def median_ms(fn, device, *, rep_ms: float = 100.0, warmup_ms: float = 25.0) -> float:
    """The median time of fn in ms: do_bench on a GPU, perf_counter on the host."""
    if torch.device(device).type == "cuda":
        return time_gpu_kernel(fn, rep_ms=rep_ms, warmup_ms=warmup_ms, qs=(0.5,))[0]
    return time_cpu(fn, rep_ms=rep_ms, min_reps=3, max_reps=50, qs=(0.5,))[0]
