"""One encoder layer: kernel launches and bytes moved, roberta_fast against transformers eager.

analytic   roberta_fast.flops.layer_kernels for a roberta-base / roberta-large layer (every kernel,
           its bytes and FLOPs) and the summary (launches, non-GEMM bytes, total bytes)
measured   the aten ops one layer dispatches, counted with a TorchDispatchMode as the difference
           between a 2-layer and a 1-layer model on a tiny config (so embeddings, mask building and
           unpad/repad, which run once per model, cancel out); view-only ops launch nothing and are
           not counted. Without a GPU, roberta_fast runs its Triton backend under TRITON_INTERPRET=1
           (each fused op is one custom op = one launch); on a GPU both run there, roberta_fast with
           its automatic backend choice, and the CUDA kernels of one layer are also counted with
           torch.profiler.
measured   train_launches / train_ops: the same difference for one training forward + backward (train mode,
(train)    hidden and attention-probs dropout TRAIN_DROPOUT, autograd on: the backward's ops count too; the
           gradients are reset to None between calls, as zero_grad() does).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import Counter

import torch

from roberta_fast import backends, flops
from roberta_fast.optimize import optimize

from .common import short_error

# aten ops that only make views or read metadata: no kernel launch
VIEW_OPS = {
    "view", "_unsafe_view", "t", "transpose", "expand", "permute", "unsqueeze", "squeeze", "select",
    "slice", "alias", "detach", "as_strided", "split", "split_with_sizes", "unbind", "chunk", "lift_fresh",
    "_reshape_alias", "reshape", "unflatten", "flatten", "narrow", "view_as", "expand_as", "diagonal",
    "sym_size", "sym_stride", "sym_numel", "is_same_size", "dim", "size", "stride", "numel", "_nested_tensor_size",
    "contiguous", "_local_scalar_dense", "is_nonzero", "item", "equal",
}
TRAIN_DROPOUT = 0.1  # hidden and attention-probs dropout of the training count (transformers' default)
TINY = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256, "vocab_size": 128,
        "max_position_embeddings": 40, "type_vocab_size": 1, "pad_token_id": 1}


def analytic(model: str = "roberta-base", batch: int = 32, seqlen: int = 128, dtype_bytes: int = 2) -> dict:
    from .bench_encoder import MODELS

    c = MODELS[model]
    dims = {"batch": batch, "seqlen": seqlen, "hidden": c["hidden_size"], "heads": c["num_attention_heads"],
            "intermediate": c["intermediate_size"], "dtype_bytes": dtype_bytes}
    out = {"model": model, **dims, "impls": {}}
    for impl in ("hf_eager", "roberta_fast_padded", "roberta_fast", "roberta_fast_epilogue"):
        ks = flops.layer_kernels(impl, **dims)
        out["impls"][impl] = {"kernels": [k.as_dict() for k in ks], "summary": flops.layer_summary(ks)}
    return out


def _op_name(func) -> str:
    ns = getattr(func, "namespace", "aten")
    base = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
    return base if ns == "aten" else f"{ns}::{base}"


def count_ops(fn, grad: bool = False) -> Counter:
    """aten (and custom) ops fn dispatches, views excluded; under no_grad unless grad (then a backward inside
    fn counts too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = _op_name(func)
            if name not in VIEW_OPS:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    mode = _Count()
    with (contextlib.nullcontext() if grad else torch.no_grad()), mode:
        fn()
    return mode.ops


def count_cuda_kernels(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    n = 0
    for e in prof.events():
        dt = getattr(e, "device_type", None)
        if dt is not None and "CUDA" in str(dt) and not str(e.name).startswith(("Memcpy", "Memset")):
            n += 1
    return n


def _tiny_models(layers: int, device, dtype, dropout: float = TRAIN_DROPOUT):
    from transformers import AutoModel, RobertaConfig

    torch.manual_seed(0)
    cfg = RobertaConfig(num_hidden_layers=layers, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        **TINY)
    return AutoModel.from_config(cfg, attn_implementation="eager").eval().to(device=device, dtype=dtype)


def _tiny_inputs(device):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, TINY["vocab_size"], (2, 16), generator=gen)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    ids[1, 11:] = TINY["pad_token_id"]
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def _env(key, value):
    """Set (or unset) one environment variable inside the block; the registry re-reads its settings on entry
    and exit (backends.reset(): it caches its choices per call signature)."""
    old = os.environ.get(key)
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
    backends.reset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
        backends.reset()


def _per_layer(build, device, counter, train: bool = False):
    """The count of one layer: a 2-layer model's minus a 1-layer model's. train: the models in train mode,
    one forward + backward (of the last hidden state's sum) per count, gradients reset to None first."""
    ids, mask = _tiny_inputs(device)
    if train and counter is count_ops:
        counter = functools.partial(count_ops, grad=True)
    counts = []
    for layers in (1, 2):
        m = build(layers)

        def fwd(m=m):
            with torch.no_grad():
                return m(input_ids=ids, attention_mask=mask)

        def step(m=m):
            for p in m.parameters():
                p.grad = None
            with torch.enable_grad():
                m(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()

        if train:
            m.train()
            fwd = step

        fwd()  # warm-up: caches (fused QKV weight, autotuning) are built outside the count
        counts.append(counter(fwd))
    if isinstance(counts[0], Counter):
        diff = Counter(counts[1])
        diff.subtract(counts[0])
        return {k: v for k, v in sorted(diff.items()) if v}
    return counts[1] - counts[0]


def measured(device: torch.device, kernel_backend: str | None) -> dict:
    """Per-layer op counts for transformers eager and roberta_fast (see the module docstring)."""
    out: dict = {"config": dict(TINY), "batch": 2, "seqlen": 16}
    dt = torch.float32 if device.type == "cpu" else torch.float16

    def hf(layers):
        return _tiny_models(layers, device, dt)

    def ours(layers):
        return optimize(_tiny_models(layers, device, dt))

    # the model's GEMMs: with their fused epilogues (ops.linear on Triton) or cuBLAS + the fused elementwise
    # kernels (ops.linear's choice "torch", the default until a GPU is tuned); "roberta_fast" is the automatic
    # choice (or kernel_backend for every op), the other row forces ops.linear the other way
    other = ("roberta_fast_split", "torch") if kernel_backend == "triton" else ("roberta_fast_epilogue", "triton")
    runs = (("hf_eager", hf, None, None), ("roberta_fast", ours, kernel_backend, None),
            (other[0], ours, kernel_backend, other[1]))
    for name, build, backend, linear in runs:
        label = backend or ("auto" if name != "hf_eager" else "-")
        if linear:
            label += f", linear {linear}"
        rec: dict = {}
        try:
            with _env("ROBERTA_FAST_BACKEND", backend), _env("ROBERTA_FAST_BACKEND_LINEAR", linear):
                ops = _per_layer(build, device, count_ops)
                rec = {"backend": label, "ops": ops, "launches": sum(ops.values())}
                if linear:  # the inference count is what the epilogues change (training keeps the dropout path)
                    out[name] = rec
                    continue
                train_ops = _per_layer(build, device, count_ops, train=True)  # forward + backward, dropout
                rec.update(train_ops=train_ops, train_launches=sum(train_ops.values()), train_dropout=TRAIN_DROPOUT)
                if device.type == "cuda":
                    rec["cuda_kernels"] = _per_layer(build, device, count_cuda_kernels)
        except NotImplementedError as e:
            rec = {"backend": label, "error": f"not implemented: {short_error(e)}"}
        except Exception as e:  # noqa: BLE001
            rec = {"backend": label, "error": short_error(e)}
        out[name] = rec
    return out


def run_layers(device: torch.device, avail: dict, quick: bool) -> dict:
    res = {"analytic": [analytic("roberta-base", 32, 128)]}
    if not quick:
        res["analytic"].append(analytic("roberta-large", 64, 512))
    # GPU: the automatic per-op choice (as users run it); CPU: Triton under the interpreter, since the
    # automatic choice there is the unfused torch reference
    kb = "triton" if device.type == "cpu" and avail.get("triton") else None
    res["measured"] = measured(device, kb)
    return res
