"""The encoder in training (issue 13): the fused dropouts, the QKV weight without a copy per step, state dicts.

With dropout 0 a training step is deterministic: gradients and a few AdamW steps must equal transformers'
(fp32 on CPU). With dropout the masks cannot match transformers' (another generator), so the test compares
what both estimate: the expected gradient over the dropout masks, averaged over many steps, within a few
standard errors (and checks the comparison has the power to see a wrong dropout).
"""

import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from roberta_fast import RobertaModel  # noqa: E402
from roberta_fast.model import encoder as enc_mod  # noqa: E402
from roberta_fast.optimize import optimize  # noqa: E402

VOCAB = 50


def _config(dropout=0.0, layers=2, hidden=32, heads=4, inter=64):
    return transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=26,
                                      type_vocab_size=1, pad_token_id=1, hidden_dropout_prob=dropout,
                                      attention_probs_dropout_prob=dropout, attn_implementation="eager")


def _hf(cfg, seed=0):
    torch.manual_seed(seed)
    m = transformers.RobertaModel(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LayerNorm weights away from 1, biases away from 0
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.train()


def _batch(B=3, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for i, n in enumerate([S, S - 3, 2][:B]):
        mask[i, n:] = 0
        ids[i, n:] = 1
    w = torch.randn(B, S, 32, generator=g) * mask[..., None]  # the loss reads real tokens only
    return ids, mask, w


def _loss(model, ids, mask, w):
    out = model(input_ids=ids, attention_mask=mask)
    return (out.last_hidden_state * w).sum() + out.pooler_output.square().sum()


# ----------------------------------------------------------------------------- dropout 0: exact


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
def test_sgd_steps_match_transformers_without_dropout(padding_free):
    """Three SGD-with-momentum steps in train mode (dropout 0): the same losses and parameters as transformers
    (fp32, CPU); the QKV parameters keep their identity and names through the steps. (Not AdamW: the key bias's
    gradient is zero in exact arithmetic, softmax being shift invariant, and Adam would amplify its rounding
    noise to full-size steps in both models, differently.)"""
    cfg = _config(0.0)
    hf = _hf(cfg)
    ours = RobertaModel(cfg, padding_free=padding_free).train()
    ours.load_state_dict(hf.state_dict())
    params_before = dict(ours.named_parameters())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (hf, ours)]
    ids, mask, w = _batch()
    for _ in range(3):
        losses = []
        for m, opt in zip((hf, ours), opts):
            opt.zero_grad()
            loss = _loss(m, ids, mask, w)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    after = dict(ours.named_parameters())
    assert after.keys() == params_before.keys() and all(after[k] is params_before[k] for k in after)
    sd_hf, sd = hf.state_dict(), ours.state_dict()
    assert set(sd) <= set(sd_hf) and "encoder.layer.0.attention.self.query.weight" in sd
    for k, v in sd.items():
        torch.testing.assert_close(v, sd_hf[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_qkv_joined_once_not_concatenated_per_step():
    """Training reads the query / key / value parameters as one view of a joined storage: no cat per forward,
    the parameters stay the same objects, and their gradients land in them."""
    cfg = _config(0.0, layers=1)
    ours = RobertaModel(cfg).train()
    sa = ours.encoder.layer[0].attention.self
    srcs = sa.qkv_sources()
    assert enc_mod._adjacent(srcs[:3]) and enc_mod._adjacent(srcs[3:])  # joined at construction
    ours.to(torch.float64).to(torch.float32)  # .to() gives each its own storage: joined again
    ids, mask, w = _batch()
    _loss(ours, ids, mask, w).backward()
    assert all(a is b for a, b in zip(srcs, sa.qkv_sources()))
    assert enc_mod._adjacent(srcs[:3]) and enc_mod._adjacent(srcs[3:])
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("cat", "stack", "_to_copy", "clone", "copy_"):
                seen.append(tuple(out.shape))
            return out

    grads = [p.grad.clone() for p in srcs]
    for p in ours.parameters():
        p.grad = None
    with Spy():
        _loss(ours, ids, mask, w).backward()
    assert (96, 32) not in seen and (96,) not in seen, "the fused QKV weight must not be rebuilt per step"
    for p, g in zip(srcs, grads):
        torch.testing.assert_close(p.grad, g)
    # something else's flat buffer (e.g. FSDP's) is not rearranged: plain concatenation then
    flat = torch.zeros(3 * 32 * 32 + 5)
    views = [flat[5 + i * 1024: 5 + (i + 1) * 1024].view(32, 32) for i in (0, 2, 1)]
    assert not enc_mod._adjacent(views) and torch.equal(enc_mod._joined(views), torch.cat(views))


def test_optimize_training_keeps_names_and_parameters(tmp_path):
    """An optimize()d transformers model trained a step: same Parameter objects, transformers' state-dict names,
    and save_pretrained / from_pretrained round trip."""
    cfg = _config(0.1)
    hf = _hf(cfg)
    names = list(hf.state_dict())
    model = optimize(hf)
    params = dict(model.named_parameters())
    ids, mask, w = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _loss(model, ids, mask, w).backward()
    opt.step()
    assert set(model.state_dict()) == set(names)
    assert all(p is params[n] for n, p in model.named_parameters())
    model.save_pretrained(tmp_path)
    back = transformers.RobertaModel.from_pretrained(tmp_path)
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=0)


# ----------------------------------------------------------------------------- dropout 0.1: statistics


def _mean_grads(model, n, seed, ids, mask, w):
    """Mean and variance over n training steps (fresh masks each) of the loss and every gradient."""
    torch.manual_seed(seed)
    s1, s2 = {}, {}
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        loss = _loss(model, ids, mask, w)
        loss.backward()
        vals = {"loss": loss.detach()} | {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        for k, v in vals.items():
            s1[k] = s1.get(k, 0) + v.double()
            s2[k] = s2.get(k, 0) + v.double() ** 2
    return {k: (s1[k] / n, (s2[k] / n - (s1[k] / n) ** 2) * n / (n - 1)) for k in s1}


def _z2(a, b, n):
    """mean z^2 over every gradient element of two independent n-sample means (about 1 when they estimate the
    same expectation)."""
    zs = []
    for k, (m1, v1) in a.items():
        m2, v2 = b[k]
        se = ((v1 + v2) / n).clamp_min(1e-20).sqrt()
        zs.append(((m1 - m2) / se).flatten())
    z = torch.cat(zs)
    return float(z.square().mean()), z


def _var_ratio(a, b):
    """median over gradient elements of Var_b / Var_a (elements with a variance in both)."""
    r = []
    for k, (_, v1) in a.items():
        v2 = b[k][1]
        keep = (v1 > 1e-12) & (v2 > 1e-12)
        r.append((v2[keep] / v1[keep]).flatten())
    return float(torch.cat(r).median())


@pytest.mark.slow  # 300 training steps of a tiny model: ~5 s idle, over a minute on a loaded 2-core machine
def test_gradients_with_dropout_match_transformers_statistically():
    """Hidden and attention-probs dropout 0.1, ours (fused dropouts; torch backend on CPU) against transformers
    eager, over 100 steps each with fresh masks: the mean gradients agree (mean z^2 about 1 over every element)
    and so does their spread across masks (median variance ratio about 1). Dropout being unbiased, the mean
    barely depends on p; the variance does, which gives the test its power: p = 0.3 gives a ratio near 4
    (checked). The embeddings' dropout is off in both: its noise would swamp the layers'."""
    n = 100
    small = dict(layers=1, hidden=16, heads=2, inter=32)
    hf = _hf(_config(0.1, **small))
    hf.embeddings.dropout.p = 0.0

    def ours(p):
        m = RobertaModel(_config(p, **small)).train()
        m.load_state_dict(hf.state_dict())
        m.embeddings.dropout_p = 0.0
        return m

    ids, mask, _ = _batch(B=2, S=6)
    w = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(5)) * mask[..., None]
    g_hf = _mean_grads(hf, n, 1, ids, mask, w)
    g_ours = _mean_grads(ours(0.1), n, 2, ids, mask, w)
    z2, z = _z2(g_hf, g_ours, n)
    ratio = _var_ratio(g_hf, g_ours)
    assert 0.5 < z2 < 1.6 and float(z.abs().max()) < 7, (z2, float(z.abs().max()))
    assert 0.8 < ratio < 1.25, ratio
    assert _var_ratio(g_hf, _mean_grads(ours(0.3), n, 3, ids, mask, w)) > 2.5  # the test's power


def test_dropout_changes_with_the_seed_and_repeats_with_it():
    cfg = _config(0.1)
    ours = RobertaModel(cfg).train()
    ids, mask, w = _batch()
    losses = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        losses.append(_loss(ours, ids, mask, w).item())
    assert losses[0] == losses[1] != losses[2]
    ours.eval()
    assert _loss(ours, ids, mask, w).item() == _loss(ours, ids, mask, w).item()


def test_one_rng_draw_per_forward_and_checkpointing_replays_it():
    """The layers' dropout keys come from one (layers * 3, 2) draw per forward; gradient checkpointing
    recomputes a layer with the same keys, so its gradients equal those without checkpointing."""
    cfg = _config(0.1, layers=3)
    ours = RobertaModel(cfg).train()
    ids, mask, w = _batch()
    calls = []
    real = enc_mod._dropout_keys

    def spy(layers, device):
        r = real(layers, device)
        calls.append(None if r is None else tuple(r.shape))
        return r

    enc_mod._dropout_keys = spy
    try:
        grads = []
        for ckpt in (False, True):
            if ckpt:
                ours.gradient_checkpointing_enable()
            ours.zero_grad(set_to_none=True)
            torch.manual_seed(4)
            _loss(ours, ids, mask, w).backward()
            grads.append({k: p.grad.clone() for k, p in ours.named_parameters()})
    finally:
        enc_mod._dropout_keys = real
    assert calls == [(9, 2), (9, 2)]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert math.isfinite(sum(float(g.sum()) for g in grads[0].values()))
