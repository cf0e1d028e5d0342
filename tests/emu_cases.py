"""Kernel checks through the CUDA emulation, shared by tests/test_cuda_emulation.py (in process) and by the
subprocesses that run another build of the emulated module (the AddressSanitizer build, planted-bug builds):

    python tests/emu_cases.py --module path/to/_C_emu.so --cases attention_fwd_bug[,...] [--schedules ...]

prints one JSON object {case: {schedule: null (passed) or "why it failed"}}.

Every check runs the public op with backend="cuda" on CPU tensors (ROBERTA_FAST_CUDA_EMULATE=1), forward
and backward, and judges the output and every gradient with roberta_fast.testing's rule against the float64
reference: max|ours - ref64| <= 2 * max|torch in the same dtype - ref64| + floor. Outputs come from a
NaN-poisoned allocator (every element must be written); varlen inputs are views into a buffer whose gaps and
tail rows are NaN (an out-of-bounds read shows up).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import numpy as np
import torch

from roberta_fast import reference
from roberta_fast.cuda_ops import attention as cuda_attention
from roberta_fast.cuda_ops import layer_norm as cuda_layer_norm
from roberta_fast.ops import attention, attention_varlen, bias_gelu, layer_norm, masked_softmax
from roberta_fast.testing import assert_rule, dead_rows_softmax, eager_attention, poisoned_empty

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def _judge(fn_ours, fn_ref, fn_same, leaves, dy, names):
    """Runs the three on fresh leaf copies (float64 for the reference), backprops dy and applies the rule to
    the output and to the gradient of every leaf named in `names` (None: no gradient)."""
    results = []
    for fn, dt in ((fn_ours, None), (fn_ref, torch.float64), (fn_same, None)):
        ls = [None if t is None else t.detach().to(dt or t.dtype).clone().requires_grad_(n is not None)
              for t, n in zip(leaves, names)]
        if fn is fn_ours:
            with poisoned_empty():
                out = fn(*ls)
                out.backward(dy.to(out.dtype))
        else:
            out = fn(*ls)
            if out.requires_grad:
                out.backward(dy.to(out.dtype))
        results.append((out.detach(), [None if t is None or not t.requires_grad else
                                        (t.grad if t.grad is not None else torch.zeros_like(t)) for t in ls]))
    (o, g), (r, gr), (s, gs) = results
    assert o.dtype == leaves[0].dtype, f"output dtype {o.dtype}"
    assert_rule(o, r, s, name="output")
    for n, a, b, c in zip(names, g, gr, gs):
        if n is not None:
            assert a.dtype == c.dtype, f"grad of {n}: dtype {a.dtype}, expected {c.dtype}"
            assert_rule(a, b, c, name=f"grad of {n}")
    return o, g


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape, dtype, std=1.0):
    return (torch.randn(*shape, generator=gen) * std).to(dtype)


# ----------------------------------------------------------------------------- per-op checks


def check_layer_norm(dtype, M, N, *, param_dtype=None, residual=True, x_bias=True, affine=True, pad=0, seed=0):
    """x, residual as (M, N) views of rows N + pad wide; parameters in param_dtype (x's dtype by default)."""
    g = _gen(seed)
    pd = param_dtype or dtype
    x = _randn(g, M, N + pad, dtype=dtype)[:, :N]
    res = _randn(g, M, N + pad, dtype=dtype)[:, :N] if residual else None
    w = (1 + _randn(g, N, dtype=pd, std=0.1)) if affine else None
    b = _randn(g, N, dtype=pd, std=0.1) if affine else None
    xb = _randn(g, N, dtype=pd, std=0.1) if x_bias else None
    dy = _randn(g, M, N, dtype=dtype)
    names = ["x", "weight", "bias", "residual", "x_bias"]
    names = [n if t is not None else None for n, t in zip(names, (x, w, b, res, xb))]

    def ours(x_, w_, b_, r_, xb_):
        return layer_norm(x_, w_, b_, 1e-5, residual=r_, x_bias=xb_, backend="cuda")

    def ref(x_, w_, b_, r_, xb_):
        return reference.layer_norm(x_, w_, b_, 1e-5, r_, xb_)

    _judge(ours, ref, ref, [x, w, b, res, xb], dy, names)


def check_bias_gelu(dtype, M, N, *, approximate="none", bias="same", pad=0, seed=0):
    g = _gen(seed)
    x = _randn(g, M, N + pad, dtype=dtype, std=2.0)[:, :N]
    b = None if bias is None else _randn(g, N, dtype=F32 if bias == "f32" else dtype)
    dy = _randn(g, M, N, dtype=dtype)

    def ours(x_, b_):
        return bias_gelu(x_, b_, approximate, backend="cuda")

    def ref(x_, b_):
        return reference.bias_gelu(x_, b_, approximate)

    _judge(ours, ref, ref, [x, b], dy, ["x", None if b is None else "bias"])


def check_masked_softmax(dtype, K, *, mask_kind="bool_keys", B=2, H=3, Q=5, pad=2, seed=0):
    """mask_kind: None, "bool_keys" ((B, 1, 1, K), batch 1 fully masked), "additive_rows" ((1, 1, Q, 1) float,
    one row -inf), "bool_full" ((B, H, Q, K))."""
    g = _gen(seed)
    scores = _randn(g, B, H, Q, K + pad, dtype=dtype, std=3.0)[..., :K]
    if mask_kind is None:
        mask = None
    elif mask_kind == "bool_keys":
        mask = torch.rand(B, 1, 1, K, generator=g) > 0.3
        mask[1] = False
    elif mask_kind == "additive_rows":
        mask = torch.randn(1, 1, Q, 1, generator=g)
        mask[0, 0, 2] = float("-inf")
    else:
        mask = torch.rand(B, H, Q, K, generator=g) > 0.5
    dy = _randn(g, B, H, Q, K, dtype=dtype)
    scale = 0.37

    def ours(s):
        return masked_softmax(s, mask, scale, backend="cuda")

    def ref(s):
        return reference.masked_softmax(s, mask, scale)

    probs, _ = _judge(ours, ref, ref, [scores], dy, ["scores"])
    if mask_kind == "bool_keys":
        assert (probs[1] == 0).all(), "a fully masked row must be zeros"


def _same_varlen(q, k, v, cu, scale):
    """Plain PyTorch in q's dtype per sequence (matmuls in the dtype), zeros for rows of no sequence."""
    out = torch.zeros_like(q)
    b = cu.tolist()
    for s, e in zip(b[:-1], b[1:]):
        if e > s:
            out[s:e] = eager_attention(q[None, s:e], k[None, s:e], v[None, s:e], None, scale)[0]
    return out


def check_attention(dtype, D, *, B=3, S=37, H=2, mask_kind="prefix", scale=None, seed=0):
    """Padded layout, q, k, v as views into one fused (B, S, 3, H, D) buffer. mask_kind "prefix": lengths
    S, S // 2 + 1, 0, 1, ... (a sequence with no real key gives zeros); "random": holes anywhere; None."""
    g = _gen(seed)
    if mask_kind == "prefix":
        lens = torch.tensor(([S, S // 2 + 1, 0, 1] * B)[:B])
        mask = torch.arange(S)[None, :] < lens[:, None]
    elif mask_kind == "random":
        mask = torch.rand(B, S, generator=g) < 0.6
        mask[0] = False
    else:
        mask = None
    buf = _randn(g, B, S, 3, H, D, dtype=dtype)
    dy = _randn(g, B, S, H, D, dtype=dtype)
    sc = D**-0.5 if scale is None else scale

    def ours(t):
        return attention(*t.unbind(2), key_padding_mask=mask, scale=scale, backend="cuda")

    def ref(t):
        return reference.attention(*t.unbind(2), mask, sc)

    def same(t):
        return eager_attention(*t.unbind(2), mask, sc)

    o, (grad,) = _judge(ours, ref, same, [buf], dy, ["qkv"])
    if mask is not None:
        dead = ~mask.any(1)
        assert (o[dead] == 0).all() and (grad[dead] == 0).all(), "a sequence with no real key: zeros"


def check_attention_varlen(dtype, D, *, lens=(37, 0, 1, 36, 16, 5, 0), H=2, tail=3, gap=16, max_seqlen=None,
                           seed=0):
    """Packed layout, q, k, v = buf[:, i, :, :D] of a (T, 3, H, D + gap) buffer whose gap columns and the
    `tail` rows past cu_seqlens[-1] are NaN; zero-length sequences included."""
    g = _gen(seed)
    used = sum(lens)
    T = used + tail
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    ms = max(lens) if max_seqlen is None else max_seqlen
    buf = torch.full((T, 3, H, D + gap), float("nan"), dtype=dtype)
    buf[:used, :, :, :D] = _randn(g, used, 3, H, D, dtype=dtype)
    dy = _randn(g, T, H, D, dtype=dtype)
    dy[used:] = 0

    def split(t):
        return tuple(t[:, i, :, :D] for i in range(3))

    def ours(t):
        return attention_varlen(*split(t), cu, ms, backend="cuda")

    def ref(t):
        return reference.attention_varlen(*split(t), cu, ms)

    def same(t):
        return _same_varlen(*split(t), cu, D**-0.5)

    # the NaN gap and tail are part of the leaf: judge the used rows and columns (the tail must come out zero)
    outs = []
    for fn, dt in ((ours, None), (ref, torch.float64), (same, None)):
        leaf = buf.detach().to(dt or dtype).clone().requires_grad_(True)
        if fn is ours:
            with poisoned_empty():
                o = fn(leaf)
                o.backward(dy.to(o.dtype))
        else:
            o = fn(leaf)
            if o.requires_grad:
                o.backward(dy.to(o.dtype))
        gr = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        outs.append((o.detach(), gr[:used, :, :, :D]))
    (o, gq), (r, gr), (s, gs) = outs
    assert_rule(o[:used], r[:used], s[:used], name="output")
    assert (o[used:] == 0).all(), "rows past cu_seqlens[-1] must be zeros"
    assert_rule(gq, gr, gs, name="grad of the fused qkv")


# ----------------------------------------------------------------------------- dropout (csrc/philox.cuh)
# The masks predicted here from the documented keying (Philox4x32-10 of counter (pos, offset) under key
# seed, word i of group pos for element i; csrc/philox.cuh, csrc/attention.cuh), written from that text
# in numpy, independently of the kernels' code.

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
U32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr, key):
    """Random123's philox4x32_R(10, ctr, key) on uint64 arrays holding 32-bit words: ctr (..., 4), key (..., 2)."""
    c = [np.asarray(ctr, dtype=np.uint64)[..., i] for i in range(4)]
    k0, k1 = (np.asarray(key, dtype=np.uint64)[..., i].copy() for i in range(2))
    for _ in range(10):
        p0, p1 = np.uint64(M0) * c[0], np.uint64(M1) * c[2]  # < 2**64: exact in uint64
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & U32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & U32]
        k0, k1 = (k0 + np.uint64(W0)) & U32, (k1 + np.uint64(W1)) & U32
    return np.stack(c, -1)


def threshold(p):
    """Elements are kept iff their word >= round(p * 2**32) (p as the kernels get it: float32)."""
    return min(int(float(np.float32(p)) * 2.0**32 + 0.5), 2**32 - 1)


def _words(rng, pos):
    """The 4 words of groups pos (uint64 array) under rng = (seed, offset) int64 tensor."""
    seed, off = (int(v) % 2**64 for v in rng.tolist())
    pos = np.asarray(pos, dtype=np.uint64)
    ctr = np.stack([pos & U32, pos >> np.uint64(32), np.full_like(pos, off & 0xFFFFFFFF),
                    np.full_like(pos, off >> 32)], -1)
    key = np.broadcast_to(np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64), ctr.shape[:-1] + (2,))
    return philox4x32_10(ctr, key)


def layer_norm_mask(rng, M, N, p):
    """Keep mask (M, N) of layer_norm's dropout: flat index i = row * N + col, group i // 4, word i % 4."""
    lin = np.arange(M * N, dtype=np.uint64)
    w = _words(rng, lin // np.uint64(4))
    word = np.take_along_axis(w, (lin % np.uint64(4)).astype(np.int64)[:, None], 1)[:, 0]
    return torch.from_numpy(word >= threshold(p)).reshape(M, N)


def attention_mask(rng, B, H, S, p):
    """Keep mask (B, H, S, S) (query, key) of attention's dropout, S the padded length or max_seqlen: element
    (q, k) is word 2 * qh + kh of group pos = ((b * H + h) * S + q - 8 qh) * S + k - 8 kh, qh = q % 16 >= 8."""
    i = np.arange(S, dtype=np.uint64)
    half = (i % np.uint64(16)) >= np.uint64(8)
    base = i - np.uint64(8) * half.astype(np.uint64)
    bh = np.arange(B * H, dtype=np.uint64)[:, None, None]
    pos = (bh * np.uint64(S) + base[None, :, None]) * np.uint64(S) + base[None, None, :]
    w = _words(rng, pos)  # (BH, S, S, 4)
    idx = (2 * half[:, None].astype(np.int64) + half[None, :].astype(np.int64))[None, :, :, None]
    word = np.take_along_axis(w, np.broadcast_to(idx, w.shape[:-1] + (1,)), -1)[..., 0]
    return torch.from_numpy(word >= threshold(p)).reshape(B, H, S, S)


def check_layer_norm_dropout(dtype, M, N, p, rng, *, residual=True, x_bias=True, affine=True, pad=0, seed=0):
    """cuda_ops.layer_norm forward and backward with dropout against float64 with the predicted mask:
    y = LN(mask * (x + x_bias) / (1 - p) + residual) * w + b; dx, dweight, dbias, dx_bias, dresidual."""
    g = _gen(seed)
    x = _randn(g, M, N + pad, dtype=dtype)[:, :N]
    res = _randn(g, M, N + pad, dtype=dtype)[:, :N] if residual else None
    w = (1 + _randn(g, N, dtype=dtype, std=0.1)) if affine else None
    b = _randn(g, N, dtype=dtype, std=0.1) if affine else None
    xb = _randn(g, N, dtype=dtype, std=0.1) if x_bias else None
    dy = _randn(g, M, N, dtype=dtype)
    keep = layer_norm_mask(rng, M, N, p)
    with poisoned_empty():
        y, mean, rstd = cuda_layer_norm.forward(x, w, b, 1e-5, res, xb, p, rng)
        grads = cuda_layer_norm.backward(dy, x, w, b, mean, rstd, res, xb, p, rng)
    names = ["x", "weight", "bias", "x_bias", "residual"]
    leaves = [x, w, b, xb, res]

    def run(dt):
        ls = [None if t is None else t.detach().to(dt).clone().requires_grad_(True) for t in leaves]
        xx, ww, bb, xbb, rr = ls
        h = xx + (0 if xbb is None else xbb)
        h = h * keep.to(dt) * (1 / (1 - p))
        if rr is not None:
            h = h + rr
        out = reference.layer_norm(h, ww, bb, 1e-5)
        out.backward(dy.to(dt))
        return out.detach(), [None if t is None else t.grad for t in ls]

    (r, gr), (s_, gs) = run(torch.float64), run(dtype)
    assert_rule(y, r, s_, name="output")
    dx, dw, db, dxb, dres = grads
    assert (dres is None) == (res is None), "dresidual: a tensor exactly when residual is given"
    for n, a, ref64, same in zip(names, (dx, dw, db, dxb, dres), gr, gs):
        if ref64 is not None:
            assert a is not None and a.dtype == same.dtype, f"grad of {n}: {None if a is None else a.dtype}"
            assert_rule(a, ref64, same, name=f"grad of {n}")
    return y, keep


def _attn_ref(q, k, v, kpm, scale, keep, p):
    """dropout(softmax(scale q k^T)) v on (B, S, H, D) in q's dtype, keep (B, H, S, S)."""
    s = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) * scale
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    pr = dead_rows_softmax(s.double() if q.dtype == torch.float64 else s.float()).to(q.dtype)
    pr = pr * keep.to(q.dtype) * (1 / (1 - p))
    return torch.matmul(pr, v.transpose(1, 2)).transpose(1, 2)


def check_attention_dropout(dtype, D, p, rng, *, B=2, S=77, H=2, mask_kind="prefix", seed=0, lens=None):
    """cuda_ops.attention forward and backward with dropout, padded (lens None) or varlen (`lens`, packed
    with max_seqlen S), against float64 with the predicted mask: output, dq, dk, dv by the rule."""
    g = _gen(seed)
    scale = D**-0.5
    if lens is None:
        kpm = (torch.arange(S)[None, :] < torch.tensor(([S, S // 2 + 1, 0, 1] * B)[:B])[:, None]
               if mask_kind == "prefix" else None)
        q, k, v, dy = (_randn(g, B, S, H, D, dtype=dtype) for _ in range(4))
        cu = None
    else:
        kpm = None
        T = sum(lens)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        q, k, v, dy = (_randn(g, T, H, D, dtype=dtype) for _ in range(4))
        B = len(lens)
    keep = attention_mask(rng, B, H, S, p)
    with poisoned_empty():
        o, lse = cuda_attention.forward(q, k, v, kpm, cu, S, None, p, rng)
        dq, dk, dv = cuda_attention.backward(dy, q, k, v, o, lse, kpm, cu, S, None, p, rng)

    def run(dt):
        ls = [t.detach().to(dt).clone().requires_grad_(True) for t in (q, k, v)]
        if cu is None:
            out = _attn_ref(*ls, kpm, scale, keep, p)
        else:  # each sequence its own batch of one, at its own positions within max_seqlen
            outs = []
            for i, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
                n = e - a
                outs.append(_attn_ref(*(t[None, a:e] for t in ls), None, scale, keep[i:i + 1, :, :n, :n], p)[0]
                            if n else ls[0][a:e] * 0)
            out = torch.cat(outs) if outs else ls[0] * 0
        out.backward(dy.to(dt))
        return out.detach(), [t.grad for t in ls]

    (r, gr), (s_, gs) = run(torch.float64), run(dtype)
    assert_rule(o, r, s_, name="output")
    for n, a, ref64, same in zip("qkv", (dq, dk, dv), gr, gs):
        assert_rule(a, ref64, same, name=f"grad of {n}")
    return o


# ----------------------------------------------------------------------------- named cases (subprocesses)

CASES = {
    # planted-bug target: two key tiles (head_dim 64: 64 keys per tile), a short sequence, fp16
    "attention_fwd_bug": lambda: check_attention(F16, 64, B=2, S=77, H=1),
    # planted-bug target for the backward: several query blocks per key block
    "attention_bwd_bug": lambda: check_attention(F16, 64, B=2, S=77, H=1),
    # planted-bug target for the block reduction (rows of 4 / 8 warps)
    "layer_norm_bug": lambda: check_layer_norm(F32, 3, 4100),
    # the AddressSanitizer subset: every kernel, forward and backward, small
    "asan_layer_norm": lambda: (check_layer_norm(F16, 7, 96), check_layer_norm(F32, 2, 13000, pad=3),
                                check_layer_norm(BF16, 5, 1000, param_dtype=F32)),
    "asan_bias_gelu": lambda: (check_bias_gelu(F16, 7, 80), check_bias_gelu(BF16, 9, 1001, bias="f32", pad=3)),
    "asan_masked_softmax": lambda: (check_masked_softmax(F16, 7), check_masked_softmax(F32, 1500, pad=8),
                                    check_masked_softmax(BF16, 20000, mask_kind="additive_rows", B=1, H=1, Q=3)),
    "asan_attention": lambda: (check_attention(F16, 32), check_attention(BF16, 128, B=2, S=33)),
    "asan_attention_varlen": lambda: check_attention_varlen(F16, 64, lens=(37, 0, 1, 16)),
    "asan_dropout": lambda: (check_layer_norm_dropout(F16, 5, 96, 0.2, torch.tensor([7, 1])),
                             check_layer_norm_dropout(F32, 3, 13, 0.2, torch.tensor([7, 1])),
                             check_attention_dropout(F16, 32, 0.2, torch.tensor([7, 1]), B=2, S=33, H=1),
                             check_attention_dropout(BF16, 64, 0.2, torch.tensor([7, 1]), S=40, lens=(17, 0, 23))),
    # planted-bug targets of the dropout kernels: two key tiles and several query blocks per key block
    "attention_dropout_bug": lambda: check_attention_dropout(F16, 64, 0.3, torch.tensor([5, -9]), B=2, S=77, H=1),
    "layer_norm_dropout_bug": lambda: (check_layer_norm_dropout(F16, 9, 96, 0.3, torch.tensor([5, -9])),
                                       check_layer_norm_dropout(F32, 3, 13, 0.3, torch.tensor([5, -9]))),
}


def run_cases(names, schedules, emu):
    out = {}
    for name in names:
        out[name] = {}
        for sched in schedules:
            emu.set_schedule(sched, 0)
            try:
                CASES[name]()
                out[name][sched] = None
            except Exception as e:  # noqa: BLE001  (a RuntimeError from the module or an AssertionError)
                out[name][sched] = f"{type(e).__name__}: {e}"[:2000]
    return out


def load_module(path):
    """Loads the extension at `path` as roberta_fast._C_emu (before anything imports the installed one)."""
    spec = importlib.util.spec_from_file_location("roberta_fast._C_emu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["roberta_fast._C_emu"] = mod
    return mod


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--module", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--schedules", default="")
    a = ap.parse_args()
    os.environ["ROBERTA_FAST_CUDA_EMULATE"] = "1"
    mod = load_module(a.module)
    torch.manual_seed(0)
    res = run_cases(a.cases.split(","), a.schedules.split(",") if a.schedules else list(mod.emu.SCHEDULES), mod.emu)
    print("EMU_RESULT " + json.dumps(res))
