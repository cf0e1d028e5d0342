"""The CUDA C++ backend (csrc/ -> roberta_fast._C): built, complete, compiled for sm_80 and sm_90a
without spills or warnings, with tensor-core code in attention; host-side error paths; and, on a
GPU (`gpu` marker), every cuda_ops host function against the float64 reference on small shapes.

Runs without a GPU: the build checks read the module with cuobjdump (the system one or the one
inside the triton package) and the ptxas report kept beside the module (_C_build.log). They skip
with a reason where nvcc is missing or the build was switched off (ROBERTA_FAST_CUDA=0).
"""

import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tol import assert_rule

from roberta_fast import reference
from roberta_fast.ops import _dispatch

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
KERNELS = ("layer_norm_fwd", "layer_norm_bwd", "bias_gelu_fwd", "bias_gelu_bwd", "masked_softmax_fwd",
           "masked_softmax_bwd", "attention_fwd", "attention_bwd")
SOURCES = ("attention", "attention_bwd", "gelu", "layer_norm", "softmax")  # csrc/<name>.cu
ARCHS = ("sm_80", "sm_90a")
# host functions of docs/kernel_contracts.md, exactly as the op layer calls them
CONTRACTS = {
    "layer_norm": {"layer_norm_fwd": "x, weight, bias, eps, residual, x_bias",
                   "layer_norm_bwd": "dy, x, weight, bias, mean, rstd, residual, x_bias"},
    "gelu": {"bias_gelu_fwd": "x, bias, approximate", "bias_gelu_bwd": "dy, x, bias, approximate"},
    "softmax": {"masked_softmax_fwd": "scores, mask, scale", "masked_softmax_bwd": "dprobs, probs, scale"},
    "attention": {"attention_fwd": "q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale",
                  "attention_bwd": "do, q, k, v, o, lse, key_padding_mask, cu_seqlens, max_seqlen, scale"},
}


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@pytest.fixture(scope="module")
def C():
    """roberta_fast._C; skips where it cannot have been built, fails where it should have been."""
    mod = _dispatch.cuda_module()
    if mod is not None:
        return mod
    if os.environ.get("ROBERTA_FAST_CUDA", "").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip("ROBERTA_FAST_CUDA=0: the CUDA extension was not built")
    if _nvcc() is None:
        pytest.skip("nvcc not found (CUDA_HOME or PATH): the CUDA extension cannot be built here")
    try:
        importlib.import_module("roberta_fast._C")
    except ImportError as e:
        pytest.fail(f"nvcc is here but roberta_fast._C does not import ({e}); rebuild with "
                    "`ROBERTA_FAST_CUDA=1 pip install --no-build-isolation -e .`")
    pytest.fail("roberta_fast._C imports but _dispatch.cuda_module() returned None")


@pytest.fixture(scope="module")
def so_path(C):
    return Path(C.__file__)


@pytest.fixture(scope="module")
def build_log(so_path):
    log = so_path.parent / "_C_build.log"
    if not log.exists():
        pytest.fail(f"no build log beside the module ({log}); setup.py writes it with the ptxas report")
    return log.read_text()


@pytest.fixture(scope="module")
def cuobjdump():
    cands = [shutil.which("cuobjdump")]
    try:
        import triton

        cands.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if c and Path(c).exists():
            return c
    pytest.skip("no cuobjdump (neither on PATH nor inside the triton package)")


def _run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


# ----------------------------------------------------------------------------- the build, no GPU needed


def test_module_exposes_every_kernel(C):
    assert tuple(C.KERNELS) == KERNELS
    for name in KERNELS:
        assert callable(getattr(C, name, None)), f"roberta_fast._C lacks {name}"
    assert C.DTYPES == {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3, "bool": 4}


@pytest.mark.parametrize("op_file", sorted(CONTRACTS))
def test_cuda_ops_follow_the_contracts(op_file):
    """cuda_ops.<file> has the contract's host functions with the contract's parameters (no _C needed)."""
    mod = _dispatch.kernel_module("cuda", op_file)
    for fn, params in CONTRACTS[op_file].items():
        f = getattr(mod, fn, None)
        assert callable(f), f"roberta_fast.cuda_ops.{op_file} lacks {fn}"
        got = ", ".join(inspect.signature(f).parameters)
        assert got == params, f"cuda_ops.{op_file}.{fn}({got}) != contract ({params})"


def test_attention_supports_reports_dtype_and_head_dim():
    from roberta_fast.cuda_ops import attention

    meta = torch.device("meta")
    ok = torch.empty(2, 8, 4, 64, dtype=torch.float16, device=meta)
    assert "CUDA tensors" in attention.supports(ok)  # a meta/CPU tensor is never taken
    assert "CUDA tensors" in attention.supports(ok, backward=True)


def test_module_holds_sm80_and_sm90a_code(so_path, cuobjdump):
    elfs = _run([cuobjdump, "--list-elf", str(so_path)])
    # cuobjdump from CUDA 12.x lists sm_90a cubins under the name sm_90; their ELF header still says sm_90a
    arch_a = None
    for src in SOURCES:
        for arch in ARCHS:
            if re.search(rf"\b{src}\.{arch}\.cubin", elfs):
                continue
            assert arch.endswith("a") and re.search(rf"\b{src}\.{arch[:-1]}\.cubin", elfs), (
                f"no {arch} code for csrc/{src}.cu:\n{elfs}")
            if arch_a is None:
                arch_a = set(re.findall(r"arch = (sm_\w+)", _run([cuobjdump, "-elf", str(so_path)])))
            assert arch in arch_a, f"no ELF with arch = {arch} in the module (found {sorted(arch_a)})"


def test_resource_usage_no_local_memory(so_path, cuobjdump):
    res = _run([cuobjdump, "-res-usage", str(so_path)])
    funcs = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    names = {f[0] for f in funcs}
    for k in ("layer_norm_fwd_kernel", "layer_norm_bwd_kernel", "layer_norm_bwd_cols_kernel", "bias_gelu_kernel",
              "masked_softmax_fwd_kernel", "masked_softmax_bwd_kernel", "attention_fwd_kernel",
              "attention_bwd_kernel"):
        assert any(k in n for n in names), f"no {k} in the module"
    for name, reg, stack, shared, local in funcs:
        assert int(local) == 0 and int(stack) == 0, f"{name}: LOCAL {local}, STACK {stack} (spills)"
        assert int(shared) <= 48 * 1024, f"{name}: {shared} bytes of static shared memory"
        assert int(reg) <= 255


def test_attention_uses_tensor_cores(so_path, cuobjdump):
    res = _run([cuobjdump, "-res-usage", str(so_path)])
    kernels = sorted(set(re.findall(r"Function (\S*attention_(?:fwd|bwd)_kernel\S*):", res)))
    assert len(kernels) == 12, kernels  # forward, backward x fp16, bf16 x head_dim 32, 64, 128
    sass = _run([cuobjdump, "-sass", "-fun", ",".join(kernels), str(so_path)])
    found = set()
    for section in sass.split("\narch = ")[1:]:  # one section per cubin
        arch = section.split()[0]
        for body in section.split("Function : ")[1:]:
            name = body.split()[0]
            assert "HMMA.16816.F32" in body, f"{arch} {name}: no HMMA.16816.F32 in its SASS"
            found.add((arch, name))
    missing = {(a, k) for a in ARCHS for k in kernels} - found
    assert not missing, f"no SASS for {sorted(missing)}"


def test_build_log_no_spills_no_warnings(build_log):
    compiled = re.findall(r"Compiling entry function '(\S+)' for '(sm_\w+)'", build_log)
    reports = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", build_log)
    assert compiled, "no ptxas report in the build log (is -Xptxas -v in setup.py's flags?)"
    assert {a for _, a in compiled} == set(ARCHS), sorted({a for _, a in compiled})
    assert len(reports) == len(compiled), f"{len(compiled)} functions compiled, {len(reports)} spill reports"
    spills = [(f, a, r) for (f, a), r in zip(compiled, reports) if r != ("0", "0")]
    assert not spills, f"register spills: {spills}"
    bad = [ln for ln in build_log.splitlines() if re.search(r"\bwarning\b|\berror\b", ln, re.I)]
    assert not bad, "warnings in the build log:\n" + "\n".join(bad[:20])
    for src in SOURCES:
        assert f"---- {src}.cu.o.log" in build_log, f"no report for csrc/{src}.cu"


def test_bad_arguments_raise_value_error(C):
    """Argument errors are found on the host before any CUDA call (no GPU needed)."""
    with pytest.raises(ValueError, match="unsupported dtype code 99"):
        C.layer_norm_fwd(x=0, x_stride=8, residual=0, res_stride=0, x_bias=0, x_bias_f32=False, weight=0,
                         weight_f32=False, bias=0, bias_f32=False, y=0, mean=0, rstd=0, M=1, N=8, eps=1e-5,
                         dtype=99, stream=0)
    z3 = (0, 0, 0)
    with pytest.raises(ValueError, match="head_dim must be 32, 64 or 128, got 48"):
        C.attention_fwd(q=0, q_strides=z3, k=0, k_strides=z3, v=0, v_strides=z3, o=0, o_strides=z3, lse=0,
                        lse_batch_stride=0, lse_head_stride=0, key_padding_mask=0, mask_batch_stride=0,
                        cu_seqlens=0, total_rows=0, batch=1, heads=1, seqlen=8, head_dim=48, scale=1.0,
                        dtype=0, stream=0)
    with pytest.raises(ValueError, match="fp16 or bf16 only"):
        C.attention_fwd(q=0, q_strides=z3, k=0, k_strides=z3, v=0, v_strides=z3, o=0, o_strides=z3, lse=0,
                        lse_batch_stride=0, lse_head_stride=0, key_padding_mask=0, mask_batch_stride=0,
                        cu_seqlens=0, total_rows=0, batch=1, heads=1, seqlen=8, head_dim=64, scale=1.0,
                        dtype=2, stream=0)
    with pytest.raises(ValueError, match="16-byte aligned"):
        C.attention_fwd(q=2, q_strides=z3, k=0, k_strides=z3, v=0, v_strides=z3, o=0, o_strides=z3, lse=0,
                        lse_batch_stride=0, lse_head_stride=0, key_padding_mask=0, mask_batch_stride=0,
                        cu_seqlens=0, total_rows=0, batch=1, heads=1, seqlen=8, head_dim=64, scale=1.0,
                        dtype=0, stream=0)


@pytest.mark.skipif(HAS_CUDA or Path("/dev/nvidiactl").exists(),
                    reason="needs a machine without a GPU (the launch must fail before reaching one)")
def test_failed_launch_raises_runtime_error_naming_the_kernel(C):
    with pytest.raises(RuntimeError, match=r"kernel bias_gelu_fwd_kernel failed to launch: cuda\w+"):
        C.bias_gelu_fwd(x=0, x_stride=8, bias=0, bias_f32=False, y=0, M=1, N=8, approximate=0, dtype=0, stream=0)


def _setup_py(env_update, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "ROBERTA_FAST_CUDA")}
    env.update(env_update)
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_setup_switches():
    off = _setup_py({"ROBERTA_FAST_CUDA": "0"}, "--name")
    assert off.returncode == 0 and "ROBERTA_FAST_CUDA=0, skipping the CUDA extension" in off.stdout
    no_nvcc = {"PATH": str(Path(sys.executable).parent)}  # python only: no nvcc there
    auto = _setup_py(no_nvcc, "--name")
    assert auto.returncode == 0 and "nvcc not found, skipping the CUDA extension" in auto.stdout, auto.stdout
    on = _setup_py({**no_nvcc, "ROBERTA_FAST_CUDA": "1"}, "--name")
    assert on.returncode != 0 and "ROBERTA_FAST_CUDA=1 but nvcc was not found" in on.stdout + on.stderr
    bad = _setup_py({"ROBERTA_FAST_CUDA": "1", "ROBERTA_FAST_CUDA_ARCHS": "70"}, "--name")
    assert bad.returncode != 0 and "not an architecture >= 80" in bad.stdout + bad.stderr


def test_setup_failed_build(tmp_path):
    """A failing nvcc: an error with ROBERTA_FAST_CUDA=1, one line and a normal finish without it."""
    fake = tmp_path / "cuda" / "bin"
    fake.mkdir(parents=True)
    (fake / "nvcc").write_text("#!/bin/sh\necho fake nvcc fails >&2\nexit 1\n")
    (fake / "nvcc").chmod(0o755)
    env = {"CUDA_HOME": str(tmp_path / "cuda"), "ROBERTA_FAST_CUDA_BUILD_DIR": str(tmp_path / "b")}
    args = ("build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp"))
    on = _setup_py({**env, "ROBERTA_FAST_CUDA": "1"}, *args)
    assert on.returncode != 0 and "the nvcc build failed" in on.stdout + on.stderr
    auto = _setup_py(env, *args)
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert "CUDA extension build failed" in auto.stdout and "continuing without roberta_fast._C" in auto.stdout
    assert not list((tmp_path / "lib").rglob("_C*.so"))


def test_package_imports_without_the_module():
    code = ("import sys; sys.modules['roberta_fast._C'] = None\n"
            "import roberta_fast, roberta_fast.cuda_ops.attention\n"
            "from roberta_fast.ops import _dispatch\n"
            "assert _dispatch.cuda_module() is None and not _dispatch.cuda_built()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------- on a GPU: cuda_ops vs reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _ops(name):
    if not _dispatch.cuda_built():
        pytest.skip("roberta_fast._C was not built")
    return importlib.import_module(f"roberta_fast.cuda_ops.{name}")


def _rows_view(M, N, dtype, pad=0):
    """(M, N) rows; with pad > 0 a view into a wider buffer (row stride N + pad)."""
    return torch.randn(M, N + pad, device="cuda").to(dtype)[:, :N]


def _grads(fn, inputs, dy):
    """Gradients of fn(*inputs) . dy w.r.t. every tensor input (None where an input is None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,pad,param_f32", [(7, 768, 0, False), (5, 1000, 24, True), (3, 129, 0, False),
                                                (4, 4096, 8, False), (2, 13000, 0, True)])
def test_gpu_layer_norm(poison_empty, dtype, M, N, pad, param_f32):
    ln = _ops("layer_norm")
    pd = torch.float32 if param_f32 else dtype
    x = _rows_view(M, N, dtype, pad)
    res = _rows_view(M, N, dtype, pad)
    w = (1 + 0.5 * torch.randn(N, device="cuda")).to(pd)
    b = (0.5 * torch.randn(N, device="cuda")).to(pd)
    xb = (0.5 * torch.randn(N, device="cuda")).to(pd)
    dy = _rows_view(M, N, dtype, pad)
    y, mean, rstd = ln.layer_norm_fwd(x, w, b, 1e-5, res, xb)
    dx, dw, db, dxb = ln.layer_norm_bwd(dy, x, w, b, mean, rstd, res, xb)

    def f(x_, w_, b_, r_, xb_):
        return reference.layer_norm(x_, w_, b_, 1e-5, r_, xb_)

    d64 = lambda t: t.double()  # noqa: E731
    ref, g_ref = _grads(f, [d64(x), d64(w), d64(b), d64(res), d64(xb)], dy.double())
    same, g_same = _grads(f, [x, w, b, res, xb], dy)
    assert_rule(y, ref.to(dtype), same, name="y")
    h = x.double() + xb.double() + res.double()
    torch.testing.assert_close(mean, h.mean(-1).float(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(rstd, (h.var(-1, unbiased=False) + 1e-5).rsqrt().float(), atol=1e-3, rtol=1e-3)
    for name, ours, r, s in zip(("dx", "dweight", "dbias", "dresidual", "dx_bias"), (dx, dw, db, dx, dxb),
                                g_ref, g_same):
        assert ours.dtype == s.dtype, name
        assert_rule(ours, r.to(s.dtype), s, name=name)
    # without optional inputs: no residual, no x_bias, no weight/bias
    y2, m2, r2 = ln.layer_norm_fwd(x, None, None, 1e-5, None, None)
    assert_rule(y2, reference.layer_norm(x.double(), None, None).to(dtype), reference.layer_norm(x, None, None))
    dx2, dw2, db2, dxb2 = ln.layer_norm_bwd(dy, x, None, None, m2, r2, None, None)
    assert dw2 is None and db2 is None and dxb2 is None
    _, (g64,) = _grads(lambda t: reference.layer_norm(t, None, None), [x.double()], dy.double())
    _, (gs,) = _grads(lambda t: reference.layer_norm(t, None, None), [x], dy)
    assert_rule(dx2, g64.to(dtype), gs, name="dx (no params)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("M,N,pad,bias", [(9, 3072, 0, "same"), (6, 1001, 3, "f32"), (300, 64, 8, None)])
def test_gpu_bias_gelu(poison_empty, dtype, approximate, M, N, pad, bias):
    ge = _ops("gelu")
    x = 2 * _rows_view(M, N, dtype, pad)
    dy = _rows_view(M, N, dtype, pad)
    b = None if bias is None else torch.randn(N, device="cuda").to(torch.float32 if bias == "f32" else dtype)
    y = ge.bias_gelu_fwd(x, b, approximate)
    dx, db = ge.bias_gelu_bwd(dy, x, b, approximate)
    f = lambda x_, b_: reference.bias_gelu(x_, b_, approximate)  # noqa: E731
    ref, g_ref = _grads(f, [x.double(), None if b is None else b.double()], dy.double())
    same, g_same = _grads(f, [x, b], dy)
    assert_rule(y, ref.to(dtype), same, name="y")
    assert_rule(dx, g_ref[0].to(dtype), g_same[0], name="dx")
    if b is None:
        assert db is None
    else:
        assert db.dtype == b.dtype
        assert_rule(db, g_ref[1].to(b.dtype), g_same[1], name="dbias")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [7, 128, 1000, 4096, 20000])
@pytest.mark.parametrize("mask_kind", [None, "bool_keys", "additive_rows", "bool_full"])
def test_gpu_masked_softmax(poison_empty, dtype, K, mask_kind):
    sm = _ops("softmax")
    B, H, Q = 2, 3, 5
    pad = 8 if K in (128, 4096) else 2  # row stride K + 8: 16-byte vector path; K + 2: scalar path
    scores = (3 * torch.randn(B, H, Q, K + pad, device="cuda")).to(dtype)[..., :K]
    if mask_kind is None:
        mask = None
    elif mask_kind == "bool_keys":  # (B, 1, 1, K) key padding, batch 1 fully masked
        m = torch.rand(B, 1, 1, K, device="cuda") > 0.3
        m[1] = False
        mask = m.expand(B, H, Q, K)
    elif mask_kind == "additive_rows":  # (1, 1, Q, 1) broadcast over keys: last stride 0, one row -inf
        m = torch.randn(1, 1, Q, 1, device="cuda", dtype=torch.float32)
        m[0, 0, 2] = float("-inf")
        mask = m.expand(B, H, Q, K)
    else:
        mask = torch.rand(B, H, Q, K, device="cuda") > 0.5
    scale = 0.37
    probs = sm.masked_softmax_fwd(scores, mask, scale)
    ref = reference.masked_softmax(scores.double(), mask, scale)
    same = reference.masked_softmax(scores, mask, scale)
    assert_rule(probs, ref.to(dtype), same, name="probs")
    if mask_kind == "bool_keys":
        assert (probs[1] == 0).all(), "a fully masked row must be zeros"
    dp = torch.randn(B, H, Q, K, device="cuda").to(dtype)
    ds = sm.masked_softmax_bwd(dp, probs, scale)
    p64 = probs.double()
    ds_ref = scale * p64 * (dp.double() - (dp.double() * p64).sum(-1, keepdim=True))
    ps = probs.float()
    ds_same = (scale * ps * (dp.float() - (dp.float() * ps).sum(-1, keepdim=True))).to(dtype)
    assert_rule(ds, ds_ref.to(dtype), ds_same, name="dscores")


@pytest.mark.gpu
def test_gpu_masked_softmax_nan_row():
    sm = _ops("softmax")
    s = torch.randn(1, 1, 3, 40, device="cuda", dtype=torch.float16)
    s[0, 0, 1, 5] = float("nan")
    p = sm.masked_softmax_fwd(s, None, 1.0)
    assert p[0, 0, 1].isnan().all() and not p[0, 0, [0, 2]].isnan().any()


def _attn_tol(o, ref, same, name):
    assert_rule(o, ref.to(o.dtype), same, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("S,fused", [(1, False), (77, True), (200, False)])
def test_gpu_attention_padded(poison_empty, dtype, D, S, fused):
    at = _ops("attention")
    B, H = 3, 2
    if fused:  # q, k, v as views into one (B, S, 3, H, D) projection
        qkv = torch.randn(B, S, 3, H, D, device="cuda").to(dtype)
        q, k, v = qkv.unbind(2)
    else:
        q, k, v = (torch.randn(B, S, H, D, device="cuda").to(dtype) for _ in range(3))
    lens = torch.tensor([S, max(1, S // 2), 0])  # the last sequence has no real key
    mask = torch.arange(S)[None, :] < lens[:, None]
    mask = mask.cuda()
    o, lse = at.attention_fwd(q, k, v, mask, None, None, None)
    ref = reference.attention(q.double(), k.double(), v.double(), mask)
    same = reference.attention(q, k, v, mask)
    _attn_tol(o, ref, same, "o")
    assert (o[2] == 0).all(), "no real key: zeros"
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * D ** -0.5
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse_ref = torch.logsumexp(s, -1)
    torch.testing.assert_close(lse[:2], lse_ref[:2].float(), atol=2e-3, rtol=1e-3)
    assert torch.isneginf(lse[2]).all()
    o2, _ = at.attention_fwd(q, k, v, None, None, None, 0.3)  # no mask, explicit scale
    _attn_tol(o2, reference.attention(q.double(), k.double(), v.double(), None, 0.3),
              reference.attention(q, k, v, None, 0.3), "o (no mask)")
    # backward
    do = torch.randn(B, S, H, D, device="cuda").to(dtype)
    dq, dk, dv = at.attention_bwd(do, q, k, v, o, lse, mask, None, None, None)
    f = lambda q_, k_, v_: reference.attention(q_, k_, v_, mask)  # noqa: E731
    _, g64 = _grads(f, [q.double(), k.double(), v.double()], do.double())
    _, gsame = _grads(f, [q, k, v], do)
    for name, ours, r, s_ in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, gsame):
        assert ours.shape == q.shape and ours.dtype == dtype and ours.is_contiguous(), name
        _attn_tol(ours, r, s_, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_gpu_attention_varlen(poison_empty, dtype, D):
    at = _ops("attention")
    lens = [5, 0, 130, 64, 1]
    T, H = sum(lens) + 3, 3  # 3 tail rows that belong to no sequence
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    qkv = torch.randn(T, 3, H, D, device="cuda").to(dtype)
    q, k, v = qkv.unbind(1)
    k[-3:] = float("nan")  # the tail must never be read
    v[-3:] = float("nan")
    o, lse = at.attention_fwd(q, k, v, None, cu, max(lens), None)
    ref = reference.attention_varlen(q.double(), k.double(), v.double(), cu)
    same = reference.attention_varlen(q, k, v, cu)
    _attn_tol(o, ref, same, "o")
    assert (o[-3:] == 0).all()
    assert lse.shape == (H, T) and torch.isneginf(lse[:, -3:]).all()
    s0, e0 = 135, 135 + 64  # the fourth sequence
    sc = torch.einsum("qhd,khd->hqk", q[s0:e0].double(), k[s0:e0].double()) * D ** -0.5
    torch.testing.assert_close(lse[:, s0:e0], torch.logsumexp(sc, -1).float(), atol=2e-3, rtol=1e-3)
    do = torch.randn(T, H, D, device="cuda").to(dtype)
    dq, dk, dv = at.attention_bwd(do, q, k, v, o, lse, None, cu, max(lens), None)
    f = lambda q_, k_, v_: reference.attention_varlen(q_, k_, v_, cu)  # noqa: E731
    _, g64 = _grads(f, [q.double(), k.double(), v.double()], do.double())
    _, gsame = _grads(f, [q, k, v], do)
    for name, ours, r, s_ in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, gsame):
        assert (ours[-3:] == 0).all(), f"{name}: rows past cu_seqlens[-1] must be zero"
        _attn_tol(ours[:-3], r[:-3], s_[:-3], name)
    assert at.supports(q) is None
    assert "head_dim" in at.supports(q[..., :48])
    assert "dtypes" in at.supports(q.float())


@pytest.mark.gpu
def test_gpu_attention_unaligned_view_is_copied():
    at = _ops("attention")
    buf = torch.randn(2 * 9 * 2 * 64 + 1, device="cuda", dtype=torch.float16)
    q = buf[1:].view(2, 9, 2, 64)  # 2-byte offset: not 16-byte aligned
    o, _ = at.attention_fwd(q, q, q, None, None, None, None)
    assert_rule(o, reference.attention(q.double(), q.double(), q.double()).half(), reference.attention(q, q, q))
