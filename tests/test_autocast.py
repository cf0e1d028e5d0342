"""Mixed precision: torch.autocast with float32 weights (what transformers' Trainer does with bf16=True / fp16=True).

Our models and optimize()d transformers models, in train and eval, with and without dropout, padded and
padding-free, against transformers under the same autocast: outputs and parameter gradients by the rule of
roberta_fast.testing (ref: transformers in float64 without autocast; torch_same: transformers under the same
autocast). On CPU in bfloat16 and float16; on a GPU (`gpu`) the same with the automatic backend. The fused ops
get the autocast dtype's activations with float32 weights; layer_norm's out_dtype is the op-level part.
"""

import copy

import pytest
import torch

from roberta_fast import ops
from roberta_fast.ops import trusted  # what the model calls
from roberta_fast.testing import FLOOR, assert_rule

transformers = pytest.importorskip("transformers")

from conftest import BACKEND_CASES  # noqa: E402
from test_model import hf_config, make_batch, make_hf, real, save  # noqa: E402

import roberta_fast  # noqa: E402

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
HF_NAMES = {("roberta", "Model"): "RobertaModel", ("bert", "Model"): "BertModel",
            ("roberta", "ForMaskedLM"): "RobertaForMaskedLM"}


# ----------------------------------------------------------------------------------------- the op


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_float32_residual(device, backend, dtype):
    """layer_norm(x fp16/bf16, residual fp32, fp32 params, out_dtype=float32) = LayerNorm(x + x_bias + residual)
    in float32 with a float32 output (autocast's float32 residual stream); gradients in each input's dtype."""
    g = torch.Generator().manual_seed(0)
    rows, n = 37, 96
    x = torch.randn(rows, n, generator=g).to(device, dtype).requires_grad_()
    res = torch.randn(rows, n, generator=g, device="cpu").to(device).requires_grad_()
    w, b, xb = (torch.randn(n, generator=g).to(device).requires_grad_() for _ in range(3))
    y = ops.layer_norm(x, w, b, 1e-5, residual=res, x_bias=xb, out_dtype=torch.float32, backend=backend)
    assert y.dtype == torch.float32
    dy = torch.randn(rows, n, generator=g).to(device)
    y.backward(dy)
    grads = [t.grad for t in (x, res, w, b, xb)]
    assert [t.dtype for t in grads] == [dtype] + [torch.float32] * 4

    def eager(dt):  # plain torch: x upcast, LayerNorm in dt
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, res, w, b, xb)]
        xx, rr, ww, bb, xbb = leaves
        out = torch.nn.functional.layer_norm(xx + xbb + rr, (n,), ww, bb, 1e-5)
        out.backward(dy.to(dt))
        return out, [t.grad for t in leaves]

    ref, ref_grads = eager(torch.float64)
    same, same_grads = eager(torch.float32)
    assert_rule(y, ref, same, name="y")
    for name, a, r, s in zip(("dx", "dresidual", "dweight", "dbias", "dx_bias"), grads, ref_grads, same_grads):
        assert_rule(a.float(), r, s, name=name, floor=FLOOR[a.dtype])


def test_layer_norm_out_dtype():
    """out_dtype=float32 upcasts a low-precision x (and takes the float32 residual); without it the residual
    must have x's dtype, as before; other out_dtypes are refused."""
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    y = ops.layer_norm(x, None, None, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ops.layer_norm(x.float(), None, None))
    assert ops.layer_norm(x, None, None, residual=x, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"residual must have x's dtype \(bfloat16\), got float32"):
        ops.layer_norm(x, None, None, residual=x.float())
    with pytest.raises(TypeError, match=r"residual must have out_dtype \(float32\), got bfloat16"):
        ops.layer_norm(x, None, None, residual=x, out_dtype=torch.float32)
    with pytest.raises(TypeError, match=r"out_dtype must be None, x's dtype \(bfloat16\) or float32, got torch.fl"):
        ops.layer_norm(x, None, None, out_dtype=torch.float16)


# ----------------------------------------------------------------------------------------- the model


def _build(impl, family, kind, tmp_path, *, padding_free=True, **cfg_kw):
    """(transformers model, ours): ours is our class loaded from the same checkpoint, or an optimize()d copy."""
    cfg = hf_config(family, 2, 4, 64, 128, **cfg_kw)
    hf = make_hf(getattr(transformers, HF_NAMES[(family, kind)]), cfg)
    if impl == "ours":
        cls = getattr(roberta_fast, HF_NAMES[(family, kind)])
        return hf, cls.from_pretrained(save(hf, tmp_path), padding_free=padding_free)
    return hf, roberta_fast.optimize(copy.deepcopy(hf), padding_free=padding_free)


def _step(model, batch, w, dtype, *, amp=True, labels=None):
    """Forward under autocast (in train mode), a weighted loss over real tokens, backward. Returns (outputs,
    {name: grad})."""
    ids, mask = batch
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype, enabled=amp):
        out = model(ids, attention_mask=mask, labels=labels) if labels is not None else model(ids, attention_mask=mask)
        if labels is not None:
            loss = out.loss
        else:
            loss = (out.last_hidden_state.double() * w).sum() + out.pooler_output.double().square().sum()
    loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
@pytest.mark.parametrize("impl", ["ours", "optimized"])
@pytest.mark.parametrize("family", ["roberta", "bert"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_autocast_parity_cpu(tmp_path, dtype, family, impl, padding_free):
    """Eval outputs and train gradients under autocast within 2x transformers' own error under it."""
    hf, ours = _build(impl, family, "Model", tmp_path, padding_free=padding_free)
    hf64 = copy.deepcopy(hf).double()
    batch = make_batch(6, 12, hf.config.pad_token_id, seed=3)
    mask = batch[1]
    w = torch.randn(6, 12, 64, dtype=torch.float64) * mask[..., None]
    for m in (hf, hf64, ours):
        m.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        o, t = ours(*batch), hf(*batch)
    with torch.no_grad():
        r = hf64(*batch)
    assert (o.last_hidden_state.dtype, o.pooler_output.dtype) == (t.last_hidden_state.dtype, t.pooler_output.dtype)
    assert_rule(real(o.last_hidden_state, mask), real(r.last_hidden_state, mask), real(t.last_hidden_state, mask),
                name="eval last_hidden_state")
    assert_rule(o.pooler_output, r.pooler_output, t.pooler_output, name="eval pooler_output")

    for m in (hf, hf64, ours):
        m.train()  # dropout 0: deterministic, comparable
    _, g_ours = _step(ours, batch, w, dtype)
    _, g_hf = _step(hf, batch, w, dtype)
    _, g_ref = _step(hf64, batch, w, dtype, amp=False)
    assert g_ours.keys() == g_ref.keys()
    for n, g in g_ours.items():
        assert g.dtype == torch.float32, n
        assert_rule(g, g_ref[n], g_hf[n], name=f"grad {n}")


def test_autocast_mlm_head_parity_cpu(tmp_path):
    """A head on top: the MLM loss and every gradient under bf16 autocast."""
    hf, ours = _build("ours", "roberta", "ForMaskedLM", tmp_path)
    hf64 = copy.deepcopy(hf).double()
    ids, mask = make_batch(5, 9, hf.config.pad_token_id, seed=4)
    labels = ids.masked_fill(mask == 0, -100)
    for m in (hf, hf64, ours):
        m.train()
    o, g_ours = _step(ours, (ids, mask), None, torch.bfloat16, labels=labels)
    t, g_hf = _step(hf, (ids, mask), None, torch.bfloat16, labels=labels)
    r, g_ref = _step(hf64, (ids, mask), None, torch.bfloat16, amp=False, labels=labels)
    assert (o.loss.dtype, o.logits.dtype) == (t.loss.dtype, t.logits.dtype) == (torch.float32, torch.bfloat16)
    assert_rule(o.loss, r.loss, t.loss, name="loss", floor=FLOOR[torch.bfloat16])  # one scalar: bf16 resolution
    for n, g in g_ours.items():
        assert_rule(g, g_ref[n], g_hf[n], name=f"grad {n}")


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
@pytest.mark.parametrize("impl", ["ours", "optimized"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_autocast_train_with_dropout(tmp_path, dtype, impl, padding_free):
    """Dropout in train mode under autocast: the dtypes transformers gives, finite float32 gradients on every
    parameter, and the same result for the same seed."""
    hf, ours = _build(impl, "roberta", "Model", tmp_path, padding_free=padding_free, hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1)
    batch = make_batch(4, 10, hf.config.pad_token_id, seed=5)
    w = torch.randn(4, 10, 64, dtype=torch.float64) * batch[1][..., None]
    hf.train(), ours.train()
    t, _ = _step(hf, batch, w, dtype)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        o, g = _step(ours, batch, w, dtype)
        runs.append((o.last_hidden_state.detach(), {n: x.clone() for n, x in g.items()}))
        assert (o.last_hidden_state.dtype, o.pooler_output.dtype) == (t.last_hidden_state.dtype, t.pooler_output.dtype)
        assert g.keys() == dict(ours.named_parameters()).keys()
        assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in g.values())
    assert torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_ops_get_autocast_activations_and_float32_weights(monkeypatch, dtype):
    """Under autocast every fused op gets activations in the autocast dtype and the float32 parameters as they
    are (no copy in the low dtype), except the embedding LayerNorm, which reads rows of the float32 tables."""
    calls = []
    for name in ("layer_norm", "bias_gelu", "masked_softmax", "attention", "attention_varlen"):
        op = getattr(trusted, name)

        def spy(*args, _op=op, _name=name, **kw):
            calls.append((_name, args[0].dtype, [a.dtype for a in (*args[1:], *kw.values())
                                                  if isinstance(a, torch.Tensor) and a.is_floating_point()]))
            return _op(*args, **kw)

        monkeypatch.setattr(trusted, name, spy)
    cfg = hf_config("roberta", 2, 4, 64, 128, hidden_dropout_prob=0.1)
    model = roberta_fast.RobertaForMaskedLM(cfg).train()
    ids, mask = make_batch(3, 8, cfg.pad_token_id)
    with torch.autocast("cpu", dtype=dtype):
        model(ids, attention_mask=mask, labels=ids, output_attentions=True).loss.backward()
    assert {c[0] for c in calls} == {"layer_norm", "bias_gelu", "masked_softmax"}
    embedding_ln, rest = calls[0], calls[1:]
    assert embedding_ln[0] == "layer_norm" and embedding_ln[1] == torch.float32
    for name, x_dtype, others in rest:
        assert x_dtype == dtype, (name, x_dtype)
        assert all(d in (dtype, torch.float32) for d in others), (name, others)
    ln_params = [others for name, _, others in rest if name == "layer_norm"]
    assert all(d == torch.float32 for others in ln_params for d in others), "layer_norm: float32 params/residual"
    model.eval()
    calls.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        model(ids, attention_mask=mask)
    assert {c[0] for c in calls} == {"layer_norm", "bias_gelu", "attention_varlen"}
    assert all(x == dtype for name, x, _ in calls[1:])


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
@pytest.mark.parametrize("impl", ["ours", "optimized"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_autocast_parity_gpu(tmp_path, dtype, impl, padding_free):
    """On a GPU (automatic backend: cuda or triton kernels) under autocast: eval outputs and train gradients
    within 2x transformers' error under the same autocast (ref: transformers in float64)."""
    cfg = hf_config("roberta", 2, 4, 256, 1024, max_position_embeddings=130)
    hf = make_hf(transformers.RobertaModel, cfg, seed=3)
    ours = (roberta_fast.RobertaModel.from_pretrained(save(hf, tmp_path), padding_free=padding_free, device="cuda")
            if impl == "ours" else roberta_fast.optimize(copy.deepcopy(hf).cuda(), padding_free=padding_free))
    hf64 = copy.deepcopy(hf).to("cuda", torch.float64)
    hf = hf.cuda()
    ids, mask = make_batch(8, 96, cfg.pad_token_id, seed=4, lengths=[96, 1, 17, 64, 33, 95, 8, 50])
    ids, mask = ids.cuda(), mask.cuda()
    w = torch.randn(8, 96, 256, dtype=torch.float64, device="cuda") * mask[..., None]

    def step(model, amp):
        model.train().zero_grad()
        with torch.autocast("cuda", dtype=dtype, enabled=amp):
            out = model(ids, attention_mask=mask)
            loss = (out.last_hidden_state.double() * w).sum() + out.pooler_output.double().square().sum()
        loss.backward()
        return out, {n: p.grad for n, p in model.named_parameters()}

    o, g_ours = step(ours, True)
    t, g_hf = step(hf, True)
    r, g_ref = step(hf64, False)
    assert o.last_hidden_state.dtype == t.last_hidden_state.dtype == torch.float32
    assert_rule(real(o.last_hidden_state, mask), real(r.last_hidden_state, mask), real(t.last_hidden_state, mask),
                name="last_hidden_state")
    for n, g in g_ours.items():
        assert_rule(g, g_ref[n], g_hf[n], name=f"grad {n}")
