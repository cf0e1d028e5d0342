"""lsh_attention / lsh_attention_varlen (Reformer-style LSH attention, opt-in) and the model's attention="lsh".

Reference properties on the torch backend (float64 where exactness is claimed): one chunk covering the
sequence is full attention; results depend on the seed only; padded keys never reach a real row; packed
sequences never mix; gradients match float64 autograd. The Triton chunked attention (under the interpreter on
CPU) against the float64 reference with the 2x rule (roberta_fast.testing), the yardstick being the same
algorithm with its matmuls in the dtype under test. The hashing is done in float32 from the inputs' values,
so the oracle sorts exactly as the call under test does. Sizes are small (the interpreter is slow).
"""

import math

import pytest
import torch
from conftest import HAS_CUDA

from roberta_fast import backends, lsh, reference
from roberta_fast.ops import lsh_attention, lsh_attention_varlen
from roberta_fast.testing import assert_rule

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DEV = "cuda" if HAS_CUDA else "cpu"
TRITON = pytest.mark.skipif(not backends.can_run("triton", torch.device(DEV)),
                            reason="triton cannot run here (no GPU and no TRITON_INTERPRET=1)")


def _qkv(B, S, H, D, dtype=F32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, H, D, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def _mask(B, S, lens, device="cpu"):
    return torch.arange(S, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]


def _full64(q, k, v, mask, shared=False):
    """Full attention in float64 with the op's conventions (padded query rows zero; shared QK: normalised
    keys, a token's score with itself SELF_SCORE)."""
    q, k, v = (t.double() for t in (q, q if shared else k, v))
    if shared:
        k = torch.nn.functional.normalize(q, dim=-1)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if shared:
        s = s.masked_fill(torch.eye(q.shape[1], dtype=torch.bool), lsh.SELF_SCORE)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], -math.inf)
    o = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
    return o if mask is None else torch.where(mask[:, :, None, None], o, 0.0)


def _same_dtype_chunks(qs, ks, vs, kvalid, chunk, scale, shared):
    return lsh.chunk_attention(qs, ks, vs, kvalid, chunk, scale, shared, same_dtype=True)


# --------------------------------------------------------------------------------- reference properties


@pytest.mark.parametrize("shared", [False, True])
def test_one_bucket_is_full_attention(shared):
    q, k, v = _qkv(2, 37, 3, 16, F64)
    mask = _mask(2, 37, [37, 21])
    for bucket in (37, 64):
        out = lsh.lsh_attention(q, None if shared else k, v, mask, bucket_size=bucket, num_hashes=3)
        torch.testing.assert_close(out, _full64(q, k, v, mask, shared), rtol=0, atol=1e-12)
    if not shared:  # and ops.attention agrees (its padded query rows attend; ours are zeros)
        ref = reference.attention_math(q, k, v, mask)
        torch.testing.assert_close(out[mask], ref[mask], rtol=0, atol=1e-12)


def test_op_one_bucket_matches_ops_attention():
    from roberta_fast.ops import attention

    q, k, v = _qkv(2, 30, 2, 16, F32)
    out = lsh_attention(q, k, v, bucket_size=32, backend="torch")
    torch.testing.assert_close(out, attention(q, k, v, backend="torch"), rtol=1e-5, atol=1e-5)


def test_seed_determines_the_result():
    q, k, v = _qkv(1, 64, 2, 16, F64)
    a = lsh.lsh_attention(q, k, v, None, bucket_size=8, num_hashes=2, seed=3)
    b = lsh.lsh_attention(q, k, v, None, bucket_size=8, num_hashes=2, seed=3)
    c = lsh.lsh_attention(q, k, v, None, bucket_size=8, num_hashes=2, seed=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # the rotations are drawn on the CPU: the same values whatever the device
    assert torch.equal(lsh.rotations(5, 2, 3, 16, 8, "cpu"), lsh.rotations(5, 2, 3, 16, 8, "cpu"))


def test_more_hashes_and_bigger_buckets_approximate_better():
    """On keys made to cluster (each query near a few keys), the error against full attention shrinks as the
    chunks grow; random inputs are the worst case and are only required to stay finite."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 16, generator=g)
    idx = torch.randint(0, 8, (1, 128, 1), generator=g)
    q = (centers[idx.squeeze(-1)] * 3 + 0.1 * torch.randn(1, 128, 16, generator=g)).unsqueeze(2).double()
    v = torch.randn(1, 128, 1, 16, generator=g).double()
    full = _full64(q, q, v, None)
    errs = [((lsh.lsh_attention(q, q, v, None, bucket_size=c, num_hashes=4) - full).norm() / full.norm()).item()
            for c in (8, 32, 128)]
    assert errs[2] < 1e-12 and errs[1] <= errs[0], errs


@pytest.mark.parametrize("shared", [False, True])
def test_one_round_is_attention_over_the_attended_pairs(shared):
    """With one round the op is exact attention restricted to lsh.attended's pairs (what the benchmark's
    attention-mass figure counts)."""
    q, k, v = _qkv(2, 50, 2, 8, F64, seed=6)
    mask = _mask(2, 50, [50, 31])
    seen = lsh.attended(q, None if shared else k, mask, bucket_size=8, num_hashes=1, seed=2)
    kk = torch.nn.functional.normalize(q, dim=-1) if shared else k
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * 8 ** -0.5
    if shared:
        s = s.masked_fill(torch.eye(50, dtype=torch.bool), lsh.SELF_SCORE)
    s = s.masked_fill(~seen, -math.inf)
    want = torch.where(mask[:, :, None, None], torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v), 0.0)
    got = lsh.lsh_attention(q, None if shared else k, v, mask, bucket_size=8, num_hashes=1, seed=2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # a query meets about 2C of the keys, not all of them
    assert 0.1 < seen[0].float().mean().item() < 0.6


def test_padded_keys_are_never_attended():
    q, k, v = _qkv(2, 40, 2, 16, F64)
    mask = _mask(2, 40, [40, 23])
    out = lsh.lsh_attention(q, k, v, mask, bucket_size=8, num_hashes=2)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[1, 23:] = float("nan")
    out2 = lsh.lsh_attention(q2, k2, v2, mask, bucket_size=8, num_hashes=2)
    assert torch.equal(out, out2)
    assert torch.all(out2[1, 23:] == 0)
    # and a sequence without a real key gives zeros
    none = lsh.lsh_attention(q, k, v, torch.zeros(2, 40, dtype=torch.bool), bucket_size=8)
    assert torch.all(none == 0)


def test_varlen_never_mixes_sequences_and_equals_padded():
    lens = [19, 0, 40, 7]
    T, S = sum(lens), max(lens)
    q, k, v = (t[0] for t in _qkv(1, T + 3, 2, 16, F64))  # 3 rows past cu_seqlens[-1]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    out = lsh.lsh_attention_varlen(q, k, v, cu, S, bucket_size=8, num_hashes=2)
    assert torch.all(out[T:] == 0)
    # the same as the padded batch with its key padding mask
    qp, mask, flat = lsh.to_padded(q, cu, S)
    kp, vp = lsh.to_padded(k, cu, S)[0], lsh.to_padded(v, cu, S)[0]
    padded = lsh.lsh_attention(qp, kp, vp, mask, bucket_size=8, num_hashes=2)
    torch.testing.assert_close(out[:T], padded.reshape(-1, 2, 16)[flat], rtol=0, atol=0)
    # changing another sequence leaves this one alone
    k2, v2 = k.clone(), v.clone()
    k2[19:59] += 5.0
    v2[19:59] -= 3.0
    out2 = lsh.lsh_attention_varlen(q, k2, v2, cu, S, bucket_size=8, num_hashes=2)
    assert torch.equal(out[:19], out2[:19]) and torch.equal(out[59:T], out2[59:T])


@pytest.mark.parametrize("shared", [False, True])
def test_gradients_match_float64(shared):
    q, k, v = _qkv(2, 33, 2, 16, F32, seed=1)
    mask = _mask(2, 33, [33, 20])
    do = torch.randn(2, 33, 2, 16, generator=torch.Generator().manual_seed(2))

    def grads(dtype, fn):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
        out = fn(leaves[0], None if shared else leaves[1], leaves[2])
        out.backward(do.to(dtype))
        return out, [t.grad for t in leaves]

    kw = dict(bucket_size=8, num_hashes=2)
    ours, g = grads(F32, lambda a, b, c: lsh_attention(a, b, c, key_padding_mask=mask, backend="torch", **kw))
    ref, g64 = grads(F64, lambda a, b, c: lsh.lsh_attention(a, b, c, mask, **kw))
    same, gs = grads(F32, lambda a, b, c: lsh.lsh_attention(a, b, c, mask, chunk_fn=_same_dtype_chunks, **kw))
    assert_rule(ours, ref, same)
    for name, a, r, s in zip("qkv", g, g64, gs):
        if shared and name == "k":
            assert a is None
            continue
        assert torch.isfinite(a).all()
        assert_rule(a, r, s, name=f"d{name}")


# ------------------------------------------------------------------------------ triton vs the reference


def _check_triton(dtype, shared, mask_lens=None, varlen=False, grads=False, num_hashes=2):
    """The triton op against the float64 reference (2x rule), forward and, with grads, dq / dk / dv; with a
    mask, the padded positions of q, k, v hold NaN (never read: every result stays finite)."""
    B, S, H, D, C = 2, 29, 2, 16, 8  # 4 chunks of 8 (shared QK) / 16 slots (separate keys), tails padded
    q, k, v = _qkv(B, S, H, D, dtype, seed=3, device=DEV)
    kw = dict(bucket_size=C, num_hashes=num_hashes, seed=1)
    do = torch.randn(B, S, H, D, generator=torch.Generator().manual_seed(4)).to(DEV, dtype)
    mask = None if mask_lens is None else _mask(B, S, mask_lens, DEV)
    if mask is not None:
        for t in (q, k, v):
            t[~mask] = float("nan")
    if varlen:
        lens = [S, 11]
        cu = torch.tensor([0, S, S + 11], dtype=torch.int32, device=DEV)
        q, k, v, do = (t.reshape(B * S, H, D)[: S + 11] for t in (q, k, v, do))

    def run(fn, dt):
        leaves = [t.detach().to(dt).clone().requires_grad_(grads) for t in (q, k, v)]
        kk = None if shared else leaves[1]
        if varlen:
            out = fn(leaves[0], kk, leaves[2], cu, max(lens))
        else:
            out = fn(leaves[0], kk, leaves[2], mask)
        if grads:
            out.backward(do.to(dt))
            return out, [t.grad for t in leaves]
        return out, []

    if varlen:
        ours = run(lambda a, b, c, cu, ms: lsh_attention_varlen(a, b, c, cu, ms, backend="triton", **kw), dtype)
        ref = run(lambda a, b, c, cu, ms: lsh.lsh_attention_varlen(a, b, c, cu, ms, **kw), F64)
        same = run(lambda a, b, c, cu, ms: lsh.lsh_attention_varlen(a, b, c, cu, ms, chunk_fn=_same_dtype_chunks,
                                                                    **kw), dtype)
    else:
        ours = run(lambda a, b, c, m: lsh_attention(a, b, c, key_padding_mask=m, backend="triton", **kw), dtype)
        ref = run(lambda a, b, c, m: lsh.lsh_attention(a, b, c, m, **kw), F64)
        same = run(lambda a, b, c, m: lsh.lsh_attention(a, b, c, m, chunk_fn=_same_dtype_chunks, **kw), dtype)
    assert ours[0].dtype == dtype
    assert_rule(ours[0], ref[0], same[0])
    for name, a, r, s in zip("qkv", ours[1], ref[1], same[1]):
        if a is not None:
            assert torch.isfinite(a).all(), f"d{name} not finite"
            assert_rule(a, r, s, name=f"d{name}")


@TRITON
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_triton_forward_matches_reference(dtype):
    _check_triton(dtype, shared=False, mask_lens=[29, 18])


@TRITON
@pytest.mark.parametrize("dtype, shared, mask_lens, num_hashes", [
    (F16, True, [29, 18], 2),  # shared QK, padded (NaN in the padding)
    (F16, False, [29, 18], 2),  # separate keys, padded: the joint sort's chunks of 2C slots
    (BF16, True, None, 3),  # no mask: every position written by every round; three rounds
    (F32, False, None, 1),  # one round
])
def test_triton_gradients(dtype, shared, mask_lens, num_hashes):
    """The Triton backward (dq, dk, dv from the combined lse) against float64 autograd of the reference."""
    _check_triton(dtype, shared=shared, mask_lens=mask_lens, grads=True, num_hashes=num_hashes)


@TRITON
def test_triton_varlen_and_gradients():
    _check_triton(F32, shared=False, varlen=True, grads=True)


@TRITON
@pytest.mark.slow
@pytest.mark.parametrize("shared", [False, True])
def test_triton_at_the_gpu_block_sizes(shared):
    """bucket 64, head_dim 64: the blocks the GPU runs (chunks of 128 slots with separate keys, two 64-slot
    tiles each way, 64 with shared QK), forward and backward."""
    q, k, v = _qkv(1, 300, 2, 64, F16, seed=7, device=DEV)
    mask = _mask(1, 300, [290], DEV)
    do = torch.randn(1, 300, 2, 64, generator=torch.Generator().manual_seed(8)).to(DEV, F16)

    def run(fn, dt):
        leaves = [t.detach().to(dt).clone().requires_grad_() for t in (q, k, v)]
        out = fn(leaves[0], None if shared else leaves[1], leaves[2])
        out.backward(do.to(dt))
        return [out] + [t.grad for t in (leaves if not shared else leaves[::2])]

    ours = run(lambda a, b, c: lsh_attention(a, b, c, key_padding_mask=mask, bucket_size=64, backend="triton"), F16)
    ref = run(lambda a, b, c: lsh.lsh_attention(a, b, c, mask, 64), F64)
    same = run(lambda a, b, c: lsh.lsh_attention(a, b, c, mask, 64, chunk_fn=_same_dtype_chunks), F16)
    for name, a, r, s in zip(["out", "dq", "dk" if not shared else "dv", "dv"], ours, ref, same):
        assert_rule(a, r, s, name=name)


@TRITON
def test_triton_one_bucket_is_full_attention():
    q, k, v = _qkv(1, 20, 2, 16, F32, device=DEV)
    out = lsh_attention(q, k, v, bucket_size=20, backend="triton")
    torch.testing.assert_close(out.cpu().double(), _full64(q.cpu(), k.cpu(), v.cpu(), None), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_argument():
    q, k, v = _qkv(1, 8, 2, 16)
    with pytest.raises(ValueError, match="bucket_size must be >= 1"):
        lsh_attention(q, k, v, bucket_size=0)
    with pytest.raises(ValueError, match="num_hashes must be >= 1"):
        lsh_attention(q, k, v, num_hashes=0)
    with pytest.raises(TypeError, match="bucket_size must be a Python int"):
        lsh_attention(q, k, v, bucket_size=8.0)
    with pytest.raises(ValueError, match="q must be 4-D"):
        lsh_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="k must have shape"):
        lsh_attention(q, k[:, :4], v)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        lsh_attention(q, k, v.half())
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        lsh_attention(q, k, v, key_padding_mask=torch.ones(1, 7, dtype=torch.bool))
    if backends.can_run("cuda", q.device):
        with pytest.raises(ValueError, match="no CUDA C\\+\\+ kernel"):
            lsh_attention(q, k, v, backend="cuda")
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen = 4 is smaller"):
        lsh_attention_varlen(q[0], k[0], v[0], cu, 4)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype"):
        lsh_attention_varlen(q[0], k[0], v[0], cu.long(), 5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=TRITON)])
def test_fused_qkv_views_and_odd_sizes(backend):
    """q, k, v as views into one (B, S, 3, H, D) buffer, odd S / head_dim / bucket_size: the contiguous result."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 13, 3, 1, 24, generator=g).to(DEV)
    q, k, v = qkv.unbind(2)
    kw = dict(bucket_size=5, num_hashes=3, backend=backend)
    out = lsh_attention(q, k, v, **kw)
    torch.testing.assert_close(out, lsh_attention(q.contiguous(), k.contiguous(), v.contiguous(), **kw))
    ref = lsh.lsh_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), None, 5, 3)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=1e-5)


def test_empty_input():
    q, k, v = _qkv(0, 8, 2, 16)
    assert lsh_attention(q, k, v).shape == q.shape


# ---------------------------------------------------------------------------------------------- the model


def _cfg(**kw):
    from roberta_fast.model.config import EncoderConfig

    return EncoderConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=80, model_type="roberta", pad_token_id=1,
                         **kw)


def test_config_checks():
    with pytest.raises(ValueError, match="attention must be 'full' or 'lsh'"):
        _cfg(attention="sparse")
    with pytest.raises(ValueError, match="lsh_bucket_size must be an int >= 1"):
        _cfg(attention="lsh", lsh_bucket_size=0)
    assert "attention" not in _cfg().to_dict()  # the default leaves config.json as it was


@pytest.mark.parametrize("padding_free", [True, False])
def test_model_lsh_option(tmp_path, padding_free):
    """One bucket covering the sequence: the LSH model equals the full-attention one; smaller buckets change
    it; the option survives save_pretrained / from_pretrained, and transformers still loads the config."""
    import json

    from roberta_fast import RobertaModel

    torch.manual_seed(0)
    full = RobertaModel(_cfg(), padding_free=padding_free).eval()
    ids = torch.randint(3, 100, (2, 40))
    am = torch.ones(2, 40, dtype=torch.long)
    am[1, 25:] = 0
    real = am.bool()
    one = RobertaModel(_cfg(attention="lsh", lsh_bucket_size=64), padding_free=padding_free).eval()
    one.load_state_dict(full.state_dict())
    small = RobertaModel(_cfg(attention="lsh", lsh_bucket_size=8, lsh_num_hashes=3), padding_free=padding_free)
    small.load_state_dict(full.state_dict())
    small.eval()
    with torch.no_grad():
        a = full(ids, attention_mask=am).last_hidden_state
        b = one(ids, attention_mask=am).last_hidden_state
        c = small(ids, attention_mask=am).last_hidden_state
    torch.testing.assert_close(b[real], a[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(c[real], a[real], atol=1e-6)
    small.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["attention"], saved["lsh_bucket_size"], saved["lsh_num_hashes"]) == ("lsh", 8, 3)
    back = RobertaModel.from_pretrained(tmp_path, padding_free=padding_free).eval()
    with torch.no_grad():
        assert torch.equal(back(ids, attention_mask=am).last_hidden_state, c)
        # from_pretrained's config overrides switch an existing checkpoint either way
        exact = RobertaModel.from_pretrained(tmp_path, padding_free=padding_free, attention="full")
        torch.testing.assert_close(exact(ids, attention_mask=am).last_hidden_state[real], a[real])
    transformers = pytest.importorskip("transformers")
    transformers.AutoConfig.from_pretrained(str(tmp_path))
    # training: gradients reach the projections
    small.train()
    out = small(ids, attention_mask=am).last_hidden_state
    (out * torch.randn_like(out)).sum().backward()
    assert small.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="output_attentions is not available with attention='lsh'"):
        small.eval()(ids, attention_mask=am, output_attentions=True)


# ------------------------------------------------------------------------------------------ the benchmark


def test_bench_rows_validate_and_render(monkeypatch):
    """bench_lsh's rows (tiny lengths here) pass the results schema and render as the markdown table; the
    crossover is the shortest length from which LSH stays faster."""
    from benchmarks import bench_lsh, report

    assert bench_lsh.crossover([512, 1024, 2048], [0.5, 1.2, 2.0]) == 1024
    assert bench_lsh.crossover([512, 1024, 2048], [1.5, 0.9, 2.0]) == 2048
    assert bench_lsh.crossover([512, 1024], [0.5, None]) is None
    monkeypatch.setitem(bench_lsh.LENGTHS, "cpu-quick", (32, 64))
    rows = bench_lsh.run_speed(torch.device("cpu"), quick=True, rep_ms=1.0)
    q, k, v = _qkv(1, 48, 2, 16, F64)
    acc = bench_lsh.approximation(q, k, v, None, bucket_size=48)
    assert acc["rel_err"] < 1e-12 and abs(acc["mass"] - 1) < 1e-12  # one bucket: exact, all mass kept
    rows.append(bench_lsh._row(workload="random", provider="lsh", dtype="float64", seqlen=48, bucket_size=48, **acc))
    doc = {"schema": report.SCHEMA, "created": "now", "mode": "cpu-reduced", "quick": True,
           "env": {k: None for k in report.ENV_KEYS}, "ceilings": {"copy_gbps": 1.0, "matmul_tflops": 1.0},
           "rows": rows, "notes": [], "elapsed_s": 1.0}
    assert report.validate(doc) == [], report.validate(doc)
    assert [r["provider"] for r in rows[:4]] == ["exact", "lsh", "exact", "lsh"]
    assert all(r["error"] is None and r["ms_p50"] > 0 for r in rows[:4])
    md = report.to_markdown(doc)
    assert "## LSH attention against exact attention" in md and "| random | 48 | 48 | 0.000 | 1.000 |" in md


# ----------------------------------------------------------------------------------- launches per call

_ALLOC_ONLY = {"empty", "empty_strided", "new_empty", "scalar_tensor"}  # allocation / host scalars: no kernel


def _launches(monkeypatch, fn, grad=False):
    """(torch ops that launch a kernel, Triton launches) of fn, the Triton kernels replaced by recorders (so
    the interpreter's own tensor traffic is not counted)."""
    from roberta_fast.kernels import lsh_attention as kmod

    from benchmarks.layers import count_ops

    launched = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append(self.name)

    for name in ("_lsh_hash", "_lsh_chunk_fwd", "_lsh_combine", "_lsh_chunk_bwd_dq", "_lsh_chunk_bwd_dkdv"):
        monkeypatch.setattr(kmod, name, Recorder(name))
    fn()  # the cached rotations and tie-break made outside the count
    launched.clear()
    ops = count_ops(fn, grad=grad)
    return {k: n for k, n in ops.items() if k not in _ALLOC_ONLY}, launched


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_launches_per_call(monkeypatch, shared, masked):
    """The triton backend's forward: one hashing kernel (every round, queries and keys together: the sort
    keys, the projections never leave registers), one sort, one launch for every round's chunked attention
    (q, k, v read through the sort's indices) and one combining the rounds; no gathers, no un-sort. Counted so
    it cannot regress (the figures docs/lsh_attention.md gives)."""
    q, k, v = _qkv(1, 64, 2, 16, F16)
    mask = _mask(1, 64, [50]) if masked else None
    kk = None if shared else k
    torch_ops, triton = _launches(monkeypatch, lambda: lsh_attention(
        q, kk, v, key_padding_mask=mask, bucket_size=8, num_hashes=2, backend="triton"))
    assert triton == ["_lsh_hash", "_lsh_chunk_fwd", "_lsh_combine"]
    # sort; with a mask also sum (real tokens per sequence). Shared QK's keys are normalised in the kernels.
    want = {(False, False): 1, (True, False): 1, (False, True): 2, (True, True): 2}[(shared, masked)]
    assert sum(torch_ops.values()) == want, sorted(torch_ops.items())


def test_triton_backward_launches(monkeypatch):
    """The backward: the two gradient kernels (dq also computes delta = rowsum(dO * out)) and one sum over the
    rounds of dq, dk, dv together. The rest is this test's: the loss's sum, its gradient (ones_like, made
    contiguous: clone) and the accumulation into .grad (add_, the warm-up filled it)."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 64, 2, 16, F16))

    def step():
        lsh_attention(q, k, v, bucket_size=8, num_hashes=2, backend="triton").sum().backward()

    torch_ops, triton = _launches(monkeypatch, step, grad=True)
    assert triton == ["_lsh_hash", "_lsh_chunk_fwd", "_lsh_combine", "_lsh_chunk_bwd_dq", "_lsh_chunk_bwd_dkdv"]
    assert not {"gather", "index_select", "scatter", "scatter_add", "argsort"} & set(torch_ops), torch_ops
    assert sorted(torch_ops.items()) == [("add_", 3), ("clone", 1), ("ones_like", 1), ("sort", 1), ("sum", 2)]


@TRITON
def test_triton_writes_every_element(monkeypatch):
    """Every buffer the triton backend allocates (torch.empty: per-round outputs and lse, the sort keys, the
    gradients of every round) poisoned with NaN (ints with -1): the results, padding included, are unchanged,
    so every element is written (padding tokens' rows as zeros, nothing zero-filled first)."""
    q, k, v = _qkv(2, 21, 1, 16, F16, seed=9, device=DEV)
    mask = _mask(2, 21, [21, 13], DEV)
    do = torch.randn(2, 21, 1, 16, generator=torch.Generator().manual_seed(1)).to(DEV, F16)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = lsh_attention(leaves[0], leaves[1], leaves[2], key_padding_mask=mask, bucket_size=8, num_hashes=2,
                            backend="triton")
        out.backward(do)
        return [out] + [t.grad for t in leaves]

    from roberta_fast.kernels import lsh_attention as kmod

    clean = run()

    class PoisonedTorch:  # the kernel file's torch, its torch.empty poisoned (the interpreter's left alone)
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*a, **kw):
            t = torch.empty(*a, **kw)
            return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(kmod, "torch", PoisonedTorch())
    dirty = run()
    monkeypatch.undo()
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)
    assert torch.all(clean[0][1, 13:] == 0) and torch.all(clean[1][1, 13:] == 0)
