"""FLOP and byte counts: what each op and the encoder must compute and move, for the benchmark harness.

All counts are analytical and exact for the formulas stated; nothing here touches a device.

FLOPs (multiply-add = 2 FLOPs):
  attention_flops   forward 4 * sum(len^2) * heads * head_dim (QK^T and PV); backward 2.5x the forward
  encoder_flops     per layer 2 * tokens * (4 H^2 + 2 H I) for the six GEMMs + the attention above

Bytes ("fewest bytes"): every input is read once and every output written once; nothing else. A
kernel that moves exactly these bytes runs at the copy ceiling when it is memory-bound.

Per-layer kernel lists (`layer_kernels`): every kernel one encoder layer launches in inference, with
its bytes and FLOPs, for transformers' eager RobertaLayer and for roberta_fast's fused layer. The
eager list is what transformers 4.4x/5.x run (eager attention, bias folded into addmm):

   GEMM  addmm Q, K, V               3 launches
   copy  q, k to (B*heads, S, D)     2   (torch.matmul on transposed heads makes them contiguous)
   GEMM  bmm Q K^T                   1
   mul   scores * scaling            1
   add   scores + additive mask      1
   softmax                           1
   copy  v to (B*heads, S, D)        1
   GEMM  bmm P V                     1
   copy  transpose(1, 2).contiguous  1
   GEMM  addmm attention output      1
   add   residual                    1
   layer_norm                        1
   GEMM  addmm FFN1                  1
   gelu                              1
   GEMM  addmm FFN2                  1
   add   residual                    1
   layer_norm                        1      = 20 launches, 8 of them GEMMs

roberta_fast's layer (DESIGN.md): QKV GEMM (bias in the addmm), attention (one kernel), out GEMM
(no bias), bias+residual+LayerNorm, FFN1 GEMM (no bias), bias+GELU, FFN2 GEMM (no bias),
bias+residual+LayerNorm = 8 launches, 4 of them GEMMs.

With GEMM epilogues (ops.linear, issue 16; impl "roberta_fast_epilogue"): QKV GEMM (bias), attention,
out GEMM + bias + residual, LayerNorm, FFN1 GEMM + bias + GELU, FFN2 GEMM + bias + residual, LayerNorm
= 7 launches, 4 of them GEMMs; the (tokens, intermediate) FFN tensor is written once (FFN1) and read once
(FFN2) instead of written, read and written again by bias+GELU, then read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

# ----------------------------------------------------------------------------- FLOPs


def _lengths(seqlens) -> list[int]:
    if isinstance(seqlens, int):
        return [seqlens]
    out = [int(s) for s in seqlens]
    if any(s < 0 for s in out):
        raise ValueError(f"seqlens must be >= 0, got {out}")
    return out


def attention_flops(seqlens, heads: int, head_dim: int, backward: bool = False) -> int:
    """FLOPs of non-causal attention over sequences of the given lengths.

    seqlens: one int (a single sequence) or an iterable of ints (a batch; padded attention over
    B sequences of length S is seqlens=[S] * B). Forward: QK^T and PV, 2 * 2 * len^2 * head_dim per
    head = 4 * sum(len^2) * heads * head_dim. backward=True gives the backward pass alone, 2.5x the
    forward (dQ, dK, dV, dP and the recomputed QK^T); forward + backward is 3.5x.
    """
    fwd = 4 * sum(s * s for s in _lengths(seqlens)) * heads * head_dim
    return fwd * 5 // 2 if backward else fwd


def _cfg(config, name: str, *alts: str) -> int:
    for n in (name, *alts):
        if isinstance(config, dict) and n in config:
            return int(config[n])
        if hasattr(config, n):
            return int(getattr(config, n))
    raise ValueError(f"config has no {name!r} (tried {(name, *alts)})")


def config_dims(config) -> dict:
    """hidden, layers, heads, intermediate of a transformers config, our EncoderConfig or a dict."""
    hidden = _cfg(config, "hidden_size", "hidden")
    return {
        "hidden": hidden,
        "layers": _cfg(config, "num_hidden_layers", "layers", "num_layers"),
        "heads": _cfg(config, "num_attention_heads", "heads", "num_heads"),
        "intermediate": _cfg(config, "intermediate_size", "intermediate"),
    }


def encoder_flops(config, seqlens, *, pooler: bool = False) -> int:
    """Forward FLOPs of the encoder layers for a batch of real sequence lengths.

    Per layer: 2 * T * (4 H^2 + 2 H I) for the Q, K, V, output, FFN1 and FFN2 GEMMs (T = real
    tokens = sum(seqlens)) + attention_flops(seqlens, heads, H / heads). pooler=True adds the
    pooler's dense layer, 2 * B * H^2. Embeddings, bias adds, LayerNorm and GELU are not counted:
    they are memory-bound and below 1% of the total. Padded positions are never counted, so MFU
    computed from this is useful work only.
    """
    d = config_dims(config)
    lens = _lengths(seqlens)
    h, inter, heads = d["hidden"], d["intermediate"], d["heads"]
    tokens = sum(lens)
    gemm = 2 * tokens * (4 * h * h + 2 * h * inter)
    attn = attention_flops(lens, heads, h // heads)
    total = d["layers"] * (gemm + attn)
    if pooler:
        total += 2 * len(lens) * h * h
    return total


# ----------------------------------------------------------------------------- bytes (fewest)


def layer_norm_bytes(tokens: int, hidden: int, dtype_bytes: int = 2, *, residual: bool = True,
                     x_bias: bool = True, affine: bool = True, param_bytes: int | None = None,
                     stats: bool = False, backward: bool = False) -> int:
    """Fewest bytes of y = LayerNorm(x + x_bias + residual) * weight + bias over (tokens, hidden).

    Forward: read x (+ residual), read the (hidden,) parameters, write y; stats=True also writes the
    float32 mean and rstd per row (the training forward). backward=True gives the backward alone:
    read dy, x (+ residual), mean, rstd, weight (+ x_bias); write dx and the (hidden,) gradients of
    weight, bias (+ x_bias). param_bytes defaults to dtype_bytes.
    """
    pb = dtype_bytes if param_bytes is None else param_bytes
    act = tokens * hidden * dtype_bytes
    n_in = 1 + int(residual)
    if not backward:
        params = (2 * int(affine) + int(x_bias)) * hidden * pb
        return n_in * act + act + params + (8 * tokens if stats else 0)
    reads = (1 + n_in) * act + 8 * tokens + (int(affine) + int(x_bias)) * hidden * pb
    writes = act + (2 * int(affine) + int(x_bias)) * hidden * pb
    return reads + writes


def bias_gelu_bytes(tokens: int, n: int, dtype_bytes: int = 2, *, bias: bool = True,
                    param_bytes: int | None = None, backward: bool = False) -> int:
    """Fewest bytes of y = GELU(x + bias) over (tokens, n). Forward: read x and bias, write y.
    backward=True: read dy, x and bias, write dx and dbias."""
    pb = dtype_bytes if param_bytes is None else param_bytes
    act = tokens * n * dtype_bytes
    b = n * pb if bias else 0
    if not backward:
        return 2 * act + b
    return 3 * act + 2 * b


def masked_softmax_bytes(batch: int, heads: int, q_len: int, k_len: int, dtype_bytes: int = 2, *,
                         mask_bytes: int = 0, backward: bool = False) -> int:
    """Fewest bytes of softmax(scale * scores + mask) over scores (batch, heads, q_len, k_len).

    Forward: read scores and the mask (mask_bytes: its own size, e.g. batch * k_len * 2 for an
    additive fp16 mask of shape (batch, 1, 1, k_len); a broadcast mask is read once), write probs.
    backward=True: read dprobs and probs, write dscores (the mask gets no gradient).
    """
    act = batch * heads * q_len * k_len * dtype_bytes
    if not backward:
        return 2 * act + mask_bytes
    return 3 * act


def attention_bytes(tokens: int, heads: int, head_dim: int, dtype_bytes: int = 2, *,
                    mask_bytes: int = 0, backward: bool = False) -> int:
    """Fewest bytes of fused attention over `tokens` query/key rows (padded tokens count when the
    layout is padded). Forward: read q, k, v and the mask, write o and the float32 log-sum-exp per
    (head, row). backward=True: read do, q, k, v, o, lse, write dq, dk, dv."""
    act = tokens * heads * head_dim * dtype_bytes
    lse = 4 * tokens * heads
    if not backward:
        return 4 * act + lse + mask_bytes
    return 8 * act + lse + mask_bytes


# ----------------------------------------------------------------------------- one encoder layer


@dataclass(frozen=True)
class Kernel:
    """One kernel launch of an encoder layer. kind: "gemm", "attention" (a fused attention kernel)
    or "memory" (elementwise / reduction / copy)."""

    name: str
    kind: str
    bytes: int
    flops: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _gemm(name, m, k, n, e, *, bias=False, batch=1, residual=False) -> Kernel:
    """(batch x) (m, k) @ (k, n): reads both operands (+ bias, + an (m, n) residual added in the epilogue),
    writes the (m, n) result once."""
    byts = batch * (m * k + k * n + m * n) * e + (n * e if bias else 0) + (batch * m * n * e if residual else 0)
    return Kernel(name, "gemm", byts, 2 * batch * m * n * k)


def layer_kernels(impl: str, *, batch: int, seqlen: int, hidden: int, heads: int, intermediate: int,
                  dtype_bytes: int = 2, seqlens: Iterable[int] | None = None) -> list[Kernel]:
    """The kernels one encoder layer launches in inference, with their bytes and FLOPs.

    impl: "hf_eager" (transformers' RobertaLayer, eager attention, on the padded (batch, seqlen)
    layout), "roberta_fast" (padding-free: real tokens only), "roberta_fast_padded" (fused kernels
    on the padded layout, attention with a key padding mask) or "roberta_fast_epilogue" (padding-free, the
    GEMMs with fused epilogues of ops.linear: FFN1 + bias + GELU, the two output projections + bias +
    residual, each LayerNorm alone; the FFN intermediate written once by FFN1 and read once by FFN2).
    seqlens: the real lengths (default all `seqlen`). See the module docstring for the lists.
    """
    e, h, i, nh = dtype_bytes, hidden, intermediate, heads
    d = h // nh
    lens = [seqlen] * batch if seqlens is None else _lengths(seqlens)
    if len(lens) != batch or max(lens, default=0) > seqlen:
        raise ValueError(f"seqlens must hold {batch} lengths <= {seqlen}, got {lens}")
    tp = batch * seqlen  # padded tokens
    act = tp * h * e
    if impl == "hf_eager":
        sc = batch * nh * seqlen * seqlen * e  # one (B, heads, S, S) score tensor
        mask = batch * seqlen * e  # additive (B, 1, 1, S) mask in the compute dtype
        return [
            _gemm("addmm Q", tp, h, h, e, bias=True),
            _gemm("addmm K", tp, h, h, e, bias=True),
            _gemm("addmm V", tp, h, h, e, bias=True),
            Kernel("copy q -> (B*heads, S, D)", "memory", 2 * act),
            Kernel("copy k -> (B*heads, S, D)", "memory", 2 * act),
            _gemm("bmm Q K^T", seqlen, d, seqlen, e, batch=batch * nh),
            Kernel("mul scores * scaling", "memory", 2 * sc),
            Kernel("add scores + mask", "memory", 2 * sc + mask),
            Kernel("softmax", "memory", 2 * sc),
            Kernel("copy v -> (B*heads, S, D)", "memory", 2 * act),
            _gemm("bmm P V", seqlen, seqlen, d, e, batch=batch * nh),
            Kernel("copy transpose(1, 2).contiguous", "memory", 2 * act),
            _gemm("addmm attention out", tp, h, h, e, bias=True),
            Kernel("add residual", "memory", 3 * act),
            Kernel("layer_norm", "memory", layer_norm_bytes(tp, h, e, residual=False, x_bias=False,
                                                            stats=True)),
            _gemm("addmm FFN1", tp, h, i, e, bias=True),
            Kernel("gelu", "memory", bias_gelu_bytes(tp, i, e, bias=False)),
            _gemm("addmm FFN2", tp, i, h, e, bias=True),
            Kernel("add residual", "memory", 3 * act),
            Kernel("layer_norm", "memory", layer_norm_bytes(tp, h, e, residual=False, x_bias=False,
                                                            stats=True)),
        ]
    if impl in ("roberta_fast", "roberta_fast_padded"):
        padded = impl == "roberta_fast_padded"
        t = tp if padded else sum(lens)
        attn = Kernel("attention" + (" (key padding mask)" if padded else "_varlen"), "attention",
                      attention_bytes(t, nh, d, e, mask_bytes=batch * seqlen if padded else 4 * (batch + 1)),
                      attention_flops([seqlen] * batch if padded else lens, nh, d))
        ln = layer_norm_bytes(t, h, e, residual=True, x_bias=True, stats=True)
        return [
            _gemm("addmm QKV", t, h, 3 * h, e, bias=True),
            attn,
            _gemm("mm attention out", t, h, h, e),
            Kernel("layer_norm(+bias +residual)", "memory", ln),
            _gemm("mm FFN1", t, h, i, e),
            Kernel("bias_gelu", "memory", bias_gelu_bytes(t, i, e, bias=True)),
            _gemm("mm FFN2", t, i, h, e),
            Kernel("layer_norm(+bias +residual)", "memory", ln),
        ]
    if impl == "roberta_fast_epilogue":
        t = sum(lens)
        ln = layer_norm_bytes(t, h, e, residual=False, x_bias=False, stats=True)
        return [
            _gemm("addmm QKV", t, h, 3 * h, e, bias=True),
            Kernel("attention_varlen", "attention", attention_bytes(t, nh, d, e, mask_bytes=4 * (batch + 1)),
                   attention_flops(lens, nh, d)),
            _gemm("linear attention out (+bias +residual)", t, h, h, e, bias=True, residual=True),
            Kernel("layer_norm", "memory", ln),
            _gemm("linear FFN1 (+bias +GELU)", t, h, i, e, bias=True),
            _gemm("linear FFN2 (+bias +residual)", t, i, h, e, bias=True, residual=True),
            Kernel("layer_norm", "memory", ln),
        ]
    raise ValueError("impl must be 'hf_eager', 'roberta_fast', 'roberta_fast_padded' or 'roberta_fast_epilogue', "
                     f"got {impl!r}")


def layer_summary(kernels: list[Kernel]) -> dict:
    """Launch counts and bytes of a kernel list: non-GEMM = memory-bound kernels + fused attention."""
    non_gemm = [k for k in kernels if k.kind != "gemm"]
    return {
        "launches": len(kernels),
        "gemm_launches": len(kernels) - len(non_gemm),
        "non_gemm_launches": len(non_gemm),
        "non_gemm_bytes": sum(k.bytes for k in non_gemm),
        "memory_bound_bytes": sum(k.bytes for k in kernels if k.kind == "memory"),
        "total_bytes": sum(k.bytes for k in kernels),
        "flops": sum(k.flops for k in kernels),
    }
