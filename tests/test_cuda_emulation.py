"""The CUDA C++ kernels executed on CPU through the emulation (roberta_fast._C_emu; docs/cuda_emulation.md).

1. The module: the same functions, arguments and dtype codes as roberta_fast._C.
2. The emulation layer pinned independently of our kernels: mma.sync m16n8k16 and ldmatrix (.x4, .trans)
   against the thread/value layouts CUTLASS's CuTe publishes for SM80_16x8x16_F32{F16,BF16}... and
   SM75_U32x4_LDSM_N / SM75_U16x8_LDSM_T (evaluated here by a small layout interpreter); shuffles against
   the CUDA programming guide's rules; fp16 / bf16 rounding on every representable value, every tie and its
   neighbours, and random floats, against torch; cp.async zero fill and landing at the wait; barriers,
   exited threads, per-block NaN-poisoned shared memory, deadlock and divergence detection; launch limits.
3. Every kernel, forward and backward, with the accuracy rule of the op tests (tests/emu_cases.py): odd
   sizes, fully masked rows, zero-length varlen sequences, head dims 32 / 64 / 128, fp16 / bf16 (fp32 where
   the kernel takes it), NaN-poisoned outputs, NaN around varlen inputs; the kernels with cross-warp
   communication under every schedule.
4. An AddressSanitizer build of the same harness on a subset (a subprocess with libasan preloaded).
5. Planted bugs: mutated copies of csrc/ (a removed __syncthreads, swapped mma operands, a wrong ldmatrix
   address, a missing cp.async wait, and two more barriers) are built and each is caught.

All marked `cuda_emulated`; they skip where the emulated build was switched off
(ROBERTA_FAST_CUDA_EMULATE_BUILD=0) or no host compiler exists, and fail where it should have been built.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import emu_cases as C
import pytest
import torch

from roberta_fast import cuda_ops

pytestmark = pytest.mark.cuda_emulated

ROOT = Path(__file__).resolve().parents[1]
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
SCHEDULES = ("lockstep", "warp_ahead", "warp_ahead_reverse", "random")
KERNELS = ("layer_norm_fwd", "layer_norm_bwd", "bias_gelu_fwd", "bias_gelu_bwd", "masked_softmax_fwd",
           "masked_softmax_bwd", "attention_fwd", "attention_bwd")


def _builder():
    spec = importlib.util.spec_from_file_location("roberta_fast_emu_build", ROOT / "csrc" / "emu" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUILD = _builder()


@pytest.fixture(scope="module")
def emu():
    """roberta_fast._C_emu; skips where it cannot have been built, fails where it should have been."""
    mod = cuda_ops.emulated_module()
    if mod is not None:
        return mod
    if os.environ.get("ROBERTA_FAST_CUDA_EMULATE_BUILD", "").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip("ROBERTA_FAST_CUDA_EMULATE_BUILD=0: roberta_fast._C_emu was not built")
    if BUILD.find_cxx() is None:
        pytest.skip("no host C++ compiler: roberta_fast._C_emu cannot be built here")
    pytest.fail("roberta_fast._C_emu does not import although a host compiler is here; rebuild with "
                "`pip install --no-build-isolation -e .` (the build's error says what is wrong)")


@pytest.fixture(autouse=True)
def _emulate(monkeypatch, emu):
    """CPU tensors go to the CUDA backend through the emulation; the default schedule afterwards."""
    monkeypatch.setenv("ROBERTA_FAST_CUDA_EMULATE", "1")
    yield
    emu.emu.set_schedule("warp_ahead", 0)


def _ptr(t):
    return t.data_ptr()


# =============================================================================== 1. the module


def test_same_interface_as_the_native_module(emu):
    assert tuple(emu.KERNELS) == KERNELS
    assert emu.DTYPES == {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3, "bool": 4}
    native = cuda_ops.native_module()
    for name in KERNELS:
        sig = getattr(emu, name).__doc__.splitlines()[0]
        assert sig.startswith(f"{name}("), sig
        if native is not None:  # argument names and types, line for line
            assert sig == getattr(native, name).__doc__.splitlines()[0]
    if native is not None:
        public = {n for n in dir(native) if not n.startswith("_")}
        assert {n for n in dir(emu) if not n.startswith("_")} == public | {"emu"}
        assert native.DTYPES == emu.DTYPES


def test_backend_runs_cpu_tensors_through_the_emulation(emu):
    from roberta_fast import backends, ops, reference

    x = torch.randn(4, 64)
    emu.emu.reset_stats()
    y = ops.layer_norm(x, None, None, backend="cuda")
    assert emu.emu.stats()["launches"] == 1 and emu.emu.stats()["threads"] == 128
    torch.testing.assert_close(y, reference.layer_norm(x, None, None), atol=1e-5, rtol=1e-5)
    assert backends.why_unavailable("cuda", torch.device("cpu")) is None


def test_schedule_controls(emu):
    assert tuple(emu.emu.SCHEDULES) == SCHEDULES
    emu.emu.set_schedule("random", 7)
    assert emu.emu.schedule() == ("random", 7)
    with pytest.raises(ValueError, match="unknown schedule 'bogus'"):
        emu.emu.set_schedule("bogus")
    code = "import roberta_fast._C_emu as m; print(m.emu.schedule()[0])"
    for env, want in (("", "warp_ahead"), ("lockstep", "lockstep")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "ROBERTA_FAST_EMU_SCHEDULE": env})
        assert out.stdout.strip() == want, out.stderr


# =============================================================================== 2. the emulation layer

# --------------------------------------------------------------------- CuTe layouts, evaluated here


def _size(shape):
    return shape if isinstance(shape, int) else int(torch.tensor([_size(s) for s in shape]).prod())


def _index(shape, stride, coord):
    """CuTe: the index of the flat (colexicographic) coordinate `coord` in the layout shape:stride."""
    if isinstance(shape, int):
        return coord * stride
    idx = 0
    for s, d in zip(shape, stride):
        n = _size(s)
        idx += _index(s, d, coord % n)
        coord //= n
    return idx


def _tv(layout, t, v):
    """A (thread, value) -> index layout ((thr_shape, val_shape), (thr_stride, val_stride)) at (t, v)."""
    (ts, vs), (td, vd) = layout
    return _index(ts, td, t) + _index(vs, vd, v)


# cute/atom/mma_traits_sm80.hpp, SM80_16x8x16_F32F16F16F32_TN and ..._F32BF16BF16F32_TN:
# A (M16, K16) and B (N8, K16) and C (M16, N8), each column-major in its two coordinates
CUTE_MMA_A = (((4, 8), (2, 2, 2)), ((32, 1), (16, 8, 128)))
CUTE_MMA_B = (((4, 8), (2, 2)), ((16, 1), (8, 64)))
CUTE_MMA_C = (((4, 8), (2, 2)), ((32, 1), (16, 8)))
# cute/atom/copy_traits_sm75.hpp, destination (thread, value) -> bit of the 32 source rows of 128 bits,
# source row s being the 16 bytes at lane s's address
CUTE_LDSM_N = ((32, (32, 4)), (32, (1, 1024)))             # SM75_U32x4_LDSM_N
CUTE_LDSM_T = (((4, 8), (16, 2, 4)), ((256, 16), (1, 128, 1024)))  # SM75_U16x8_LDSM_T


def _bits16(x):
    """A 16-bit float tensor's bit patterns as int64."""
    return x.view(torch.int16).to(torch.int64) & 0xFFFF


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_mma_m16n8k16_follows_the_cute_layouts(emu, dtype):
    g = torch.Generator().manual_seed(1)
    A = torch.randint(-8, 9, (16, 16), generator=g).to(dtype)  # small integers: every sum is exact
    B = torch.randint(-8, 9, (16, 8), generator=g).to(dtype)   # (K, N)
    Cm = torch.randint(-64, 65, (16, 8), generator=g).float()
    a = torch.zeros(32, 4, dtype=torch.int64)
    b = torch.zeros(32, 2, dtype=torch.int64)
    c = torch.zeros(32, 4)
    for t in range(32):
        for v in range(8):
            i = _tv(CUTE_MMA_A, t, v)
            a[t, v // 2] |= _bits16(A[i % 16, i // 16].reshape(1)).item() << (16 * (v % 2))
        for v in range(4):
            i = _tv(CUTE_MMA_B, t, v)
            b[t, v // 2] |= _bits16(B[i // 8, i % 8].reshape(1)).item() << (16 * (v % 2))
            i = _tv(CUTE_MMA_C, t, v)
            c[t, v] = Cm[i % 16, i // 16]
    a32, b32 = a.to(torch.int32).contiguous(), b.to(torch.int32).contiguous()
    d = torch.full((32, 4), float("nan"))
    emu.emu.mma_16816(emu.DTYPES[str(dtype).split(".")[1]], _ptr(a32), _ptr(b32), _ptr(c), _ptr(d))
    D = A.double() @ B.double() + Cm.double()
    want = torch.tensor([[D[_tv(CUTE_MMA_C, t, v) % 16, _tv(CUTE_MMA_C, t, v) // 16].item() for v in range(4)]
                         for t in range(32)], dtype=torch.float32)
    assert torch.equal(d, want)


def test_mma_accumulates_exactly_and_propagates_nan(emu):
    """Each D element is the exact sum rounded once to fp32 (documented), and 0 * inf gives NaN."""
    a = torch.zeros(32, 4, dtype=torch.int32)
    b = torch.zeros(32, 2, dtype=torch.int32)
    one = _bits16(torch.tensor([1.0], dtype=F16)).item()
    eps = _bits16(torch.tensor([2.0**-24], dtype=F16)).item()
    for t in range(32):  # A row g, columns 2c, 2c + 1 and B column g, rows 2c, 2c + 1 (register 0 each)
        a[t, 0] = one | (eps << 16)
        b[t, 0] = one | (one << 16)
    c = torch.full((32, 4), 2.0**24)
    d = torch.empty(32, 4)
    emu.emu.mma_16816(0, _ptr(a), _ptr(b), _ptr(c), _ptr(d))
    # row g of D: 2^24 + 4 * (1 + 2^-24): exact 2^24 + 4 + 2^-22 rounds to 2^24 + 4 (fp32 spacing 2 there)
    assert torch.equal(d[:, 0], torch.full((32,), 2.0**24 + 4))
    inf = _bits16(torch.tensor([float("inf")], dtype=F16)).item()
    a[:, 0] = inf  # A[g, 2c] = inf, A[g, 2c + 1] = 0; B = 1: inf + 0 * ... = inf; with B = 0: inf * 0 = NaN
    b[:, 0] = 0
    emu.emu.mma_16816(0, _ptr(a), _ptr(b), _ptr(c), _ptr(d))
    assert d[:, :2].isnan().all() and not d[:, 2:].isnan().any()


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_x4_follows_the_cute_layouts(emu, trans):
    """32 rows of 8 b16 values (4 matrices) at scattered 16-byte aligned addresses (row pitch 24
    elements, rows in a random order): lane s passes the address of row s."""
    g = torch.Generator().manual_seed(2)
    pitch, slots, col0 = 24, 40, 8  # elements: 48-byte rows, each matrix row at column 8 (byte 16)
    raw = torch.full((slots, pitch), -1, dtype=torch.int16)
    where = torch.randperm(slots, generator=g)[:32]  # row s lives in slot where[s]
    rows = (torch.arange(32 * 8, dtype=torch.int32).reshape(32, 8) * 3 + 1).to(torch.int16)  # distinct
    for s in range(32):
        raw[where[s], col0:col0 + 8] = rows[s]
    raw = raw.flatten().contiguous()
    offsets = ((where * pitch + col0) * 2).to(torch.int32)
    assert (offsets % 16 == 0).all()
    out = torch.zeros(32, 4, dtype=torch.int32)
    emu.emu.ldmatrix_x4(_ptr(raw), raw.numel() * 2, _ptr(offsets), trans, _ptr(out))
    layout = CUTE_LDSM_T if trans else CUTE_LDSM_N
    nvals = 8 if trans else 4  # values per thread: 16-bit (.trans) or 32-bit
    for t in range(32):
        for v in range(nvals):
            bit = _tv(layout, t, v * (16 if trans else 32))  # the value's first bit
            s, col = bit // 128, (bit % 128) // 16
            reg, shift = (v // 2, 16 * (v % 2)) if trans else (v, 0)
            got = (out[t, reg].item() >> shift) & 0xFFFF
            assert got == rows[s, col].item() & 0xFFFF, (t, v, s, col)
            if not trans:
                got_hi = (out[t, reg].item() >> 16) & 0xFFFF
                assert got_hi == rows[s, col + 1].item() & 0xFFFF


def test_ldmatrix_checks_its_addresses(emu):
    raw = torch.zeros(512, dtype=torch.int16)
    out = torch.zeros(32, 4, dtype=torch.int32)
    offs = torch.arange(32, dtype=torch.int32) * 16
    offs[5] = 8  # not 16-byte aligned
    with pytest.raises(RuntimeError, match=r"ldmatrix_probe_kernel.*cudaErrorMisalignedAddress.*lane 5"):
        emu.emu.ldmatrix_x4(_ptr(raw), 1024, _ptr(offs), False, _ptr(out))
    offs[5] = 1024  # one row past the 1024 bytes of shared memory
    with pytest.raises(RuntimeError, match=r"cudaErrorIllegalAddress.*lane 5.*not inside the block's shared"):
        emu.emu.ldmatrix_x4(_ptr(raw), 1024, _ptr(offs), False, _ptr(out))


@pytest.mark.parametrize("use_wrapper", [False, True])
def test_cp_async_zero_fills_and_lands_at_the_wait(emu, use_wrapper):
    src = torch.arange(32 * 16, dtype=torch.int32).to(torch.uint8).contiguous()
    sizes = torch.tensor([16 * (i % 2) for i in range(32)] if use_wrapper else [i % 17 for i in range(32)],
                         dtype=torch.int32)
    before = torch.zeros(32, dtype=torch.int32)
    after = torch.zeros(32 * 16, dtype=torch.uint8)
    emu.emu.cp_async(_ptr(src), _ptr(sizes), use_wrapper, _ptr(before), _ptr(after))
    assert (before == -1).all(), "a copy must not land before its thread waits (shared memory is 0xff)"
    for i in range(32):
        n = int(sizes[i])
        got = after[16 * i:16 * i + 16]
        assert torch.equal(got[:n], src[16 * i:16 * i + n]) and (got[n:] == 0).all(), (i, n, got)


def _shfl_expected(mode, v, b, width, lane):
    """The CUDA C++ programming guide's warp shuffle rules."""
    base = lane - lane % width
    if mode == 0:  # __shfl_sync: lane srcLane % width of this lane's group
        src = base + b % width
    elif mode == 1:  # __shfl_up_sync: the lower delta lanes of each group keep their value
        src = lane - b if lane % width >= b else lane
    elif mode == 2:  # __shfl_down_sync: the upper delta lanes of each group keep their value
        src = lane + b if lane % width + b < width else lane
    else:  # __shfl_xor_sync: a lane of a later group returns its own value
        src = lane ^ b
        src = lane if src // width > lane // width else src
    return src


@pytest.mark.parametrize("width", [32, 16, 8, 2])
@pytest.mark.parametrize("mode", [0, 1, 2, 3], ids=["idx", "up", "down", "xor"])
def test_shuffles_follow_the_programming_guide(emu, mode, width):
    g = torch.Generator().manual_seed(mode * 100 + width)
    for mask in (0xFFFFFFFF, 0x0000FFFF if width <= 16 else 0xFFFFFFFF):
        v = torch.randint(0, 2**31 - 1, (32,), generator=g, dtype=torch.int64).to(torch.int32)
        b = torch.randint(0, 32 if mode in (0, 3) else width, (32,), generator=g, dtype=torch.int32)
        out = torch.zeros(32, dtype=torch.int32)
        emu.emu.shfl(mode, _ptr(v), _ptr(b), width, mask, _ptr(out))
        for lane in range(32):
            if not mask >> lane & 1:
                continue
            src = _shfl_expected(mode, v, int(b[lane]), width, lane)
            if mask >> src & 1:  # a source outside the mask is undefined
                assert out[lane] == v[src], (lane, src, int(b[lane]))


def test_votes(emu):
    pred = torch.tensor([i % 3 == 0 for i in range(32)], dtype=torch.int32)
    for mask in (0xFFFFFFFF, 0x00FF00FF):
        out = torch.zeros(32, 3, dtype=torch.int64).to(torch.int32)
        emu.emu.vote(_ptr(pred), mask, _ptr(out))
        ballot = sum(1 << i for i in range(32) if pred[i] and mask >> i & 1)
        for lane in (i for i in range(32) if mask >> i & 1):
            assert out[lane, 0].item() & 0xFFFFFFFF == ballot
            assert out[lane, 1] == 1 and out[lane, 2] == 0
    pred[:] = 1
    out = torch.zeros(32, 3, dtype=torch.int32)
    emu.emu.vote(_ptr(pred), 0xFFFFFFFF, _ptr(out))
    assert (out[:, 2] == 1).all()


# ---------------------------------------------------------------------------- rounding


def _f32_to_16(emu, x, kind):
    out = torch.empty(x.numel(), dtype=torch.int16)
    x = x.contiguous()
    emu.emu.convert(kind, _ptr(x), _ptr(out), x.numel())
    return out.to(torch.int64) & 0xFFFF


def _ties_and_neighbours(dtype):
    """Every finite value of dtype, the midpoint between each two neighbours (exact in fp32) and the
    fp32 values just below and above each midpoint, with both signs."""
    allv = torch.arange(0, 0x7C00 if dtype == F16 else 0x7F80, dtype=torch.int32).to(torch.int16).view(dtype)
    vals = allv.double()
    mids = (vals[:-1] + vals[1:]) / 2
    if dtype == F16:  # the tie above the largest finite value, 65520, rounds to inf
        mids = torch.cat([mids, torch.tensor([65520.0])])
    m32 = mids.float()
    assert torch.equal(m32.double(), mids), "midpoints must be exact in fp32"
    below = torch.nextafter(m32, torch.tensor(0.0))
    above = torch.nextafter(m32, torch.tensor(float("inf")))
    x = torch.cat([vals.float(), m32, below, above])
    return torch.cat([x, -x])


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_conversions_round_to_nearest_even(emu, dtype):
    kind = 0 if dtype == F16 else 1
    g = torch.Generator().manual_seed(3)
    randbits = torch.randint(-(2**31), 2**31 - 1, (2_000_000,), generator=g, dtype=torch.int64)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.99, 65520.0, 65536.0, 1e-8,
                            2.0**-25, 2.0**-24, 3 * 2.0**-26, 2.0**-14, 3.4e38, 1e-45])
    x = torch.cat([_ties_and_neighbours(dtype), randbits.to(torch.int32).view(torch.float32), special])
    ours = _f32_to_16(emu, x, kind)
    want = _bits16(x.to(dtype))
    nan = x.isnan()
    bad = (ours != want) & ~nan
    assert not bad.any(), f"{int(bad.sum())} values round differently, e.g. {x[bad][:5].tolist()}"
    assert (ours[nan] == 0x7FFF).all(), "NaN converts to the canonical NaN 0x7fff (PTX cvt)"
    # 16-bit -> fp32: every bit pattern, exactly
    allbits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).contiguous()
    back = torch.empty(allbits.numel(), dtype=torch.float32)
    emu.emu.convert(2 if dtype == F16 else 3, _ptr(allbits), _ptr(back), allbits.numel())
    ref = allbits.view(dtype).float()
    assert torch.equal(back.view(torch.int32)[~ref.isnan()], ref.view(torch.int32)[~ref.isnan()])
    assert back[ref.isnan()].isnan().all()
    # pairs: the first value in the low half (pack2 in attention.cuh relies on it)
    pairs = torch.tensor([1.0, -2.0, 3.5, 65536.0])
    packed = torch.empty(2, dtype=torch.int32)
    emu.emu.convert(4 if dtype == F16 else 5, _ptr(pairs), _ptr(packed), 2)
    assert torch.equal(packed.view(torch.int16).view(dtype), pairs.to(dtype))


# ---------------------------------------------------------------------------- blocks and schedules


def _block(emu, variant, blocks=2, threads=64, live=0):
    out = torch.full((blocks, threads), -1.0)
    emu.emu.block_probe(variant, blocks, threads, live, _ptr(out))
    return out


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_barrier_and_the_race_without_it(emu, schedule):
    emu.emu.set_schedule(schedule, 0)
    want = ((torch.arange(64) + 32) % 64).float().expand(2, 64)
    assert torch.equal(_block(emu, 0), want)
    raced = _block(emu, 1)  # the same without __syncthreads: another warp's slot is read too early
    assert not torch.equal(raced, want) and raced.isnan().any()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_exited_threads_do_not_hold_a_barrier(emu, schedule):
    emu.emu.set_schedule(schedule, 3)
    out = _block(emu, 2, blocks=2, threads=128, live=45)  # a partial warp exits too
    assert torch.equal(out[:, :45], ((torch.arange(45) + 1) % 45).float().expand(2, 45))
    assert (out[:, 45:] == -1).all()


def test_shared_memory_is_poisoned_for_every_block(emu):
    for schedule in SCHEDULES:
        emu.emu.set_schedule(schedule, 0)
        out = _block(emu, 3, blocks=3, threads=32)  # block 0 writes the slot, the others only read it
        assert (out[0] == 1).all() and out[1:].isnan().all(), schedule


def test_deadlock_divergence_and_mask_errors_name_the_kernel(emu):
    with pytest.raises(RuntimeError, match=r"block_probe_kernel failed to launch: cudaErrorLaunchTimeout: deadlock"
                                           r".*warp 0 lanes \{1-31\} wait at shfl\.sync\.bfly for lanes \{0\}"):
        _block(emu, 4)
    with pytest.raises(RuntimeError, match=r"cudaErrorIllegalInstruction: divergent warp collectives"):
        _block(emu, 5)
    with pytest.raises(RuntimeError, match=r"the calling lane 0 is not in its member mask 0xfffffffe"):
        _block(emu, 6)
    # the module keeps working after an error
    assert torch.equal(_block(emu, 0), ((torch.arange(64) + 32) % 64).float().expand(2, 64))


def test_launch_limits(emu):
    out = torch.zeros(1)
    probe = emu.emu.launch_probe
    assert emu.emu.static_shared("big_static_probe_kernel") == (40960 + 32, 2)  # float[10240], double[3]
    assert emu.emu.static_shared("block_probe_kernel") == (1024 + 16, 2)
    probe(1024, 1, 1, 1, 0, -1, _ptr(out))
    assert out.item() == 3.0
    with pytest.raises(RuntimeError, match=r"cudaErrorInvalidConfiguration.*1025 threads"):
        probe(1025, 1, 1, 1, 0, -1, _ptr(out))
    with pytest.raises(RuntimeError, match="cudaErrorInvalidConfiguration"):
        probe(1, 1, 65, 1, 0, -1, _ptr(out))
    with pytest.raises(RuntimeError, match=r"cudaErrorInvalidConfiguration.*grid \(1,65536,1\)"):
        probe(32, 1, 1, 65536, 0, -1, _ptr(out))
    dyn_max = 48 * 1024 - (40960 + 32)  # static and dynamic together within 48 KB without the opt-in
    probe(32, 1, 1, 1, dyn_max, -1, _ptr(out))
    with pytest.raises(RuntimeError, match=r"cudaErrorInvalidValue.*cudaFuncAttributeMaxDynamicSharedMemorySize"):
        probe(32, 1, 1, 1, dyn_max + 1, -1, _ptr(out))
    probe(32, 1, 1, 1, 64 * 1024, 64 * 1024, _ptr(out))  # with the opt-in
    optin = emu.emu.MAX_SHARED_PER_BLOCK_OPTIN
    with pytest.raises(RuntimeError, match=r"cudaFuncSetAttribute: cudaErrorInvalidValue"):
        probe(32, 1, 1, 1, 0, optin - 40992 + 1, _ptr(out))


# =============================================================================== 3. every kernel

LN_CASES = [  # (M, N, options): rows of 1, 4 and 8 warps, cached and not, vector and scalar paths
    (7, 96, {}), (5, 1000, {}), (3, 4100, {}), (4, 257, {"param_dtype": F32}),
    (2, 13000, {"pad": 3, "residual": False}), (6, 512, {"affine": False, "x_bias": False}),
]


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("M,N,opts", LN_CASES, ids=[f"{m}x{n}" for m, n, _ in LN_CASES])
def test_layer_norm(emu, dtype, M, N, opts):
    C.check_layer_norm(dtype, M, N, **opts)


GELU_CASES = [(7, 80, "same", 0), (33, 1001, "f32", 3), (300, 64, None, 8), (2, 4096, "same", 0)]


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("M,N,bias,pad", GELU_CASES, ids=[f"{m}x{n}-{b}" for m, n, b, _ in GELU_CASES])
def test_bias_gelu(emu, dtype, approximate, M, N, bias, pad):
    C.check_bias_gelu(dtype, M, N, approximate=approximate, bias=bias, pad=pad)


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("K,pad", [(7, 2), (128, 8), (1500, 2)])
@pytest.mark.parametrize("mask_kind", [None, "bool_keys", "additive_rows", "bool_full"])
def test_masked_softmax(emu, dtype, K, pad, mask_kind):
    C.check_masked_softmax(dtype, K, mask_kind=mask_kind, pad=pad)


def test_masked_softmax_long_rows_without_cache(emu):
    C.check_masked_softmax(F32, 20000, mask_kind="bool_keys", B=2, H=1, Q=2)


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_attention(emu, dtype, D):
    C.check_attention(dtype, D, B=4, S=37, H=2)


@pytest.mark.parametrize("mask_kind,S,scale", [("random", 40, None), (None, 17, 0.3), ("prefix", 1, None)])
def test_attention_masks_and_lengths(emu, mask_kind, S, scale):
    C.check_attention(F16, 64, B=3, S=S, H=2, mask_kind=mask_kind, scale=scale)


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_attention_varlen(emu, dtype, D):
    C.check_attention_varlen(dtype, D)


def test_attention_varlen_edges(emu):
    C.check_attention_varlen(F16, 32, lens=(70,), tail=0, max_seqlen=90)  # several key tiles, no tail
    C.check_attention_varlen(BF16, 64, lens=(0, 0), tail=5)  # every sequence empty


# ------------------------------------------------------------------ dropout (csrc/philox.cuh)

# Random123's tests/kat_vectors, the "philox4x32 10" lines: counter (4 words), key (2 words) -> output (4 words)
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _philox_emu(emu, ctr, key):
    import numpy as np

    ctr = np.ascontiguousarray(ctr, dtype=np.uint32)
    key = np.ascontiguousarray(key, dtype=np.uint32)
    out = np.zeros_like(ctr)
    emu.emu.philox4x32_10(ctr.ctypes.data, key.ctypes.data, out.ctypes.data, ctr.shape[0])
    return out


def test_philox_known_answers(emu):
    """csrc/philox.cuh (through a probe kernel) and the tests' numpy Philox against Random123's vectors, then
    against each other on random counters and keys."""
    import numpy as np

    ctr = np.array([c for c, _, _ in PHILOX_KAT])
    key = np.array([k for _, k, _ in PHILOX_KAT])
    want = np.array([o for _, _, o in PHILOX_KAT])
    assert (_philox_emu(emu, ctr, key) == want).all()
    assert (C.philox4x32_10(ctr, key) == want).all()
    r = np.random.default_rng(0)
    ctr, key = r.integers(0, 2**32, (500, 4)), r.integers(0, 2**32, (500, 2))
    assert (_philox_emu(emu, ctr, key) == C.philox4x32_10(ctr, key)).all()


RNG = torch.tensor([0x1234_5678_9ABC_DEF0, -3], dtype=torch.int64)  # a negative offset: the sign bit is data

LN_DROPOUT_CASES = [  # vector (fp16: 8 wide, fp32: 4 wide) and scalar paths, cached and not, every operand
    (F16, 9, 96, 0.1, {}), (BF16, 5, 1000, 0.3, {"pad": 8}), (F32, 3, 13, 0.5, {"residual": False}),
    (F32, 2, 13000, 0.2, {"pad": 3}), (F16, 4, 4100, 0.1, {"x_bias": False}),
    (BF16, 6, 64, 0.7, {"affine": False, "x_bias": False}),
]


@pytest.mark.parametrize("dtype,M,N,p,opts", LN_DROPOUT_CASES,
                         ids=[f"{m}x{n}-p{p}" for _, m, n, p, _ in LN_DROPOUT_CASES])
def test_layer_norm_dropout(emu, dtype, M, N, p, opts):
    """Output and every gradient (dresidual = dL/dh, dx = dh * mask / (1 - p)) against float64 with the mask
    predicted from the documented keying: the forward and the backward both use exactly that mask."""
    C.check_layer_norm_dropout(dtype, M, N, p, RNG, **opts)


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_attention_dropout(emu, dtype, D):
    C.check_attention_dropout(dtype, D, 0.2, RNG, B=3, S=45, H=2)


def test_attention_dropout_varlen_and_masks(emu):
    C.check_attention_dropout(F16, 64, 0.3, RNG, S=77, lens=(37, 0, 1, 70, 16))  # max_seqlen above every length
    C.check_attention_dropout(BF16, 128, 0.1, RNG, B=2, S=70, H=1, mask_kind=None)  # several key tiles


def _kept_fraction_ok(kept, n, p):
    """|kept - n (1 - p)| within 5 standard deviations of the binomial (a false alarm about once in 3.5M)."""
    sd = (n * p * (1 - p)) ** 0.5
    return abs(kept - n * (1 - p)) <= 5 * sd, f"kept {kept} of {n}, expected {n * (1 - p):.0f} +- {sd:.0f}"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_layer_norm_dropout_statistics_and_consistency(emu, p):
    """The kernels' own masks, read from their outputs: the forward's from h = (y - b) / w / rstd + mean minus
    the residual, the backward's from dx / dresidual. They agree element for element, keep 1 - p of the
    elements (binomial bound), scale kept values by exactly 1 / (1 - p), and equal the predicted mask."""
    from roberta_fast.cuda_ops import layer_norm as L

    M, N = 64, 1000
    g = torch.Generator().manual_seed(3)
    x = 1 + torch.rand(M, N, generator=g)  # never near 0: a dropped element is unmistakable
    res, dy = torch.randn(M, N, generator=g), torch.randn(M, N, generator=g)
    y, mean, rstd = L.forward(x, None, None, 1e-5, res, None, p, RNG)
    kept_fwd = ((y / rstd[:, None] + mean[:, None]) - res).abs() > 0.5
    dx, _, _, _, dres = L.backward(dy, x, None, None, mean, rstd, res, None, p, RNG)
    kept_bwd = dx != 0
    assert torch.equal(kept_fwd, kept_bwd)
    ok, why = _kept_fraction_ok(int(kept_fwd.sum()), M * N, p)
    assert ok, why
    h = y / rstd[:, None] + mean[:, None] - res
    torch.testing.assert_close(h[kept_fwd], x[kept_fwd] / (1 - p), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx[kept_bwd], dres[kept_bwd] / (1 - p), rtol=1e-6, atol=0)
    assert torch.equal(kept_fwd, C.layer_norm_mask(RNG, M, N, p))
    # deterministic for one rng; another offset or seed gives another mask
    assert torch.equal(L.forward(x, None, None, 1e-5, res, None, p, RNG)[0], y)
    for other in (RNG + torch.tensor([0, 1]), RNG + torch.tensor([1, 0])):
        assert not torch.equal(C.layer_norm_mask(other, M, N, p), kept_fwd)
        assert not torch.equal(L.forward(x, None, None, 1e-5, res, None, p, other)[0], y)


@pytest.mark.parametrize("p", [0.1, 0.4])
def test_attention_dropout_statistics_and_consistency(emu, p):
    """The kernels' own masks, read from their outputs: q = 0 makes P uniform (1/S), v = I (S = D) makes
    O[b, q, h, :] the dropped row of P, and dO = I makes dV[b, k, h, q] the dropped P[q, k]. The forward's
    and the backward's masks agree, keep 1 - p (binomial bound), scale by 1 / (1 - p), equal the prediction."""
    from roberta_fast.cuda_ops import attention as A

    B, S, H = 4, 64, 2
    q = torch.zeros(B, S, H, S, dtype=F16)
    k = torch.randn(B, S, H, S).to(F16)
    eye = torch.eye(S, dtype=F16)[None, :, None, :].expand(B, S, H, S).contiguous()
    o, lse = A.forward(q, k, eye, None, None, None, None, p, RNG)
    dq, dk, dv = A.backward(eye, q, k, eye, o, lse, None, None, None, None, p, RNG)
    kept_fwd = (o != 0).permute(0, 2, 1, 3)  # (B, H, q, k)
    kept_bwd = (dv != 0).permute(0, 2, 3, 1)  # dv (B, k, H, q) -> (B, H, q, k)
    assert torch.equal(kept_fwd, kept_bwd)
    ok, why = _kept_fraction_ok(int(kept_fwd.sum()), B * H * S * S, p)
    assert ok, why
    want = torch.tensor(1 / S / (1 - p), dtype=F16)
    assert (o.permute(0, 2, 1, 3)[kept_fwd] == want).all() and (dv.permute(0, 2, 3, 1)[kept_bwd] == want).all()
    assert torch.equal(kept_fwd, C.attention_mask(RNG, B, H, S, p))
    assert torch.equal(A.forward(q, k, eye, None, None, None, None, p, RNG)[0], o)  # deterministic


def test_dropout_zero_is_the_kernel_without_dropout(emu):
    """dropout_p == 0 launches the plain kernels (rng ignored): bit for bit the output of rng=None."""
    from roberta_fast.cuda_ops import attention as A
    from roberta_fast.cuda_ops import layer_norm as L

    x, r = torch.randn(5, 96, dtype=F16), torch.randn(5, 96, dtype=F16)
    assert torch.equal(L.forward(x, None, None, 1e-5, r, None, 0.0, None)[0],
                       L.forward(x, None, None, 1e-5, r, None, 0.0, RNG)[0])
    q, k, v = (torch.randn(2, 20, 2, 32, dtype=F16) for _ in range(3))
    assert torch.equal(A.forward(q, k, v, None, None, None, None, 0.0, None)[0],
                       A.forward(q, k, v, None, None, None, None, 0.0, RNG)[0])


def test_dropout_bad_arguments(emu):
    from roberta_fast.cuda_ops import attention as A
    from roberta_fast.cuda_ops import layer_norm as L

    x = torch.randn(3, 64)
    q = torch.randn(1, 16, 1, 32, dtype=F16)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        L.forward(x, None, None, 1e-5, None, None, 1.0, RNG)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        A.forward(q, q, q, None, None, None, None, -0.1, RNG)
    with pytest.raises(ValueError, match="rng"):
        L.forward(x, None, None, 1e-5, None, None, 0.1, None)
    with pytest.raises(ValueError, match="rng"):
        A.forward(q, q, q, None, None, None, None, 0.1, RNG.to(torch.int32))


# the kernels whose warps talk through shared memory, under every schedule
SCHEDULED = {
    "layer_norm_8_warps": lambda: C.check_layer_norm(F32, 3, 4100),
    "layer_norm_cols": lambda: C.check_layer_norm(BF16, 70, 200),
    "bias_gelu_dbias": lambda: C.check_bias_gelu(F16, 70, 300),
    "masked_softmax_8_warps": lambda: C.check_masked_softmax(F16, 1500),
    "attention_3_key_tiles": lambda: C.check_attention(F16, 128, B=2, S=77, H=1),
    "attention_varlen": lambda: C.check_attention_varlen(BF16, 64, lens=(70, 0, 9), H=1),
    "attention_dropout": lambda: C.check_attention_dropout(F16, 64, 0.3, RNG, B=2, S=77, H=1),
    "layer_norm_dropout_8_warps": lambda: C.check_layer_norm_dropout(F32, 3, 4100, 0.2, RNG),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", sorted(SCHEDULED))
def test_every_schedule(emu, schedule, case):
    emu.emu.set_schedule(schedule, 11)
    SCHEDULED[case]()


# =============================================================================== 4. AddressSanitizer


def _child(so, cases, schedules, env=None, timeout=600):
    cmd = [sys.executable, str(ROOT / "tests" / "emu_cases.py"), "--module", str(so), "--cases", ",".join(cases),
           "--schedules", ",".join(schedules)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
                          timeout=timeout)


def _result(res):
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("EMU_RESULT ")]
    assert line, f"the child run failed (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return json.loads(line[0][len("EMU_RESULT "):])


def _libasan(cxx):
    """The AddressSanitizer runtime to preload into python: GCC's libasan, or clang's."""
    for name in ("libasan.so", "libclang_rt.asan-x86_64.so", "libclang_rt.asan.so"):
        res = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True)
        path = res.stdout.strip()
        if res.returncode == 0 and os.path.isabs(path) and os.path.exists(path):
            return path
    return None


def test_address_sanitizer_subset(emu):
    """The harness built with -fsanitize=address (build/csrc_emu_asan, incremental) runs every kernel on a
    few cases under two schedules in a subprocess with libasan preloaded; a canary read one byte past the
    dynamic shared memory proves the sanitizer is live."""
    cxx = BUILD.find_cxx()
    lib = _libasan(cxx)
    if lib is None:
        pytest.skip(f"{cxx} has no AddressSanitizer runtime (libasan.so or libclang_rt.asan)")
    so = BUILD.build(ROOT / "build" / "csrc_emu_asan", opt="-O1", asan=True, quiet=True)
    env = {"LD_PRELOAD": lib, "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1"}
    cases = sorted(k for k in C.CASES if k.startswith("asan_"))
    res = _child(so, cases, ["warp_ahead", "random"], env)
    assert res.returncode == 0 and "AddressSanitizer" not in res.stderr, res.stderr[-6000:]
    failed = {k: v for k, v in _result(res).items() if any(v.values())}
    assert not failed, failed
    canary = subprocess.run(
        [sys.executable, "-c", "import sys, torch; sys.path.insert(0, 'tests'); import emu_cases as c; "
         f"m = c.load_module({str(so)!r}); out = torch.zeros(1); m.emu.read_past_shared(64, out.data_ptr())"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300)
    assert canary.returncode != 0 and "heap-buffer-overflow" in canary.stderr, canary.stderr[-3000:]


# =============================================================================== 5. planted bugs

# (file in csrc/, the exact text, its replacement, the case that must catch it, schedules that must catch it)
ALL = SCHEDULES
PLANTED = {
    "removed_syncthreads": ("attention.cuh",
                            "    __syncthreads();      // ... for every thread; and every warp is done reading sK\n",
                            "", "attention_fwd_bug", ALL),
    "swapped_mma_b_registers": ("attention.cuh", "mma_16816<T>(s[2 * nn], qf[kk], kb[0], kb[1]);",
                                "mma_16816<T>(s[2 * nn], qf[kk], kb[1], kb[0]);", "attention_fwd_bug", ALL),
    "wrong_ldmatrix_address": ("attention.cuh", "ldmatrix_x4(kb, sK + r * LD + kk * 16 + 8 * ((lane / 8) % 2));",
                               "ldmatrix_x4(kb, sK + r * LD + kk * 16 + 8 * (lane / 16));", "attention_fwd_bug", ALL),
    "missing_cp_async_wait": ("attention.cuh", "    cp_async_wait_all();  // K tile j + 1 has landed\n", "",
                              "attention_fwd_bug", ALL),
    # barriers whose removal only some interleavings expose: what the warp-ahead schedules are for
    "removed_syncthreads_backward": ("attention_bwd.cuh", "    __syncthreads();  // dS^T complete\n", "",
                                     "attention_bwd_bug", ("warp_ahead", "warp_ahead_reverse")),
    "removed_syncthreads_row_reduce": ("common.cuh",
                                       "  __syncthreads();  // red may still be read by a previous reduction\n", "",
                                       "layer_norm_bug", ("warp_ahead", "warp_ahead_reverse")),
    # dropout: the backward regenerating another mask than the forward's, a missing 1 / (1 - p), a mask
    # left out of one of the three places layer_norm recomputes it
    "dropout_backward_mask_transposed": ("attention.cuh", "(ROWS_ARE_KEYS ? w10 : w01) >= r.threshold;",
                                         "w01 >= r.threshold;", "attention_dropout_bug", ALL),
    "dropout_forward_scale_missing": ("attention.cuh", "    if constexpr (DROPOUT) inv[half] *= p.drop_scale;\n",
                                      "", "attention_dropout_bug", ALL),
    "dropout_dx_bias_unmasked": ("layer_norm.cuh", "adxb += kp[0] ? dh * p.drop_scale : 0.f;",
                                 "adxb += dh * p.drop_scale;", "layer_norm_dropout_bug", ALL),
}


@pytest.fixture(scope="module")
def package_objects(emu):
    """The runtime and bindings objects of the package's emulated build (brought up to date; normally a
    no-op), linked into every mutated build so that only the kernels recompile."""
    bdir = Path(os.environ.get("ROBERTA_FAST_CUDA_EMULATE_BUILD_DIR") or ROOT / "build" / "csrc_emu")
    BUILD.build(bdir, quiet=True)
    return {k: v for k, v in BUILD.objects(bdir).items() if not k.endswith(".cu")}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_is_caught(emu, bug, package_objects, tmp_path):
    fname, old, new, case, must = PLANTED[bug]
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "csrc" / fname
    text = path.read_text()
    assert text.count(old) == 1, f"csrc/{fname} no longer holds the text this bug removes; update PLANTED"
    path.write_text(text.replace(old, new))
    so = BUILD.build(tmp_path / "build", csrc=tmp_path / "csrc", opt="-O0", prebuilt=package_objects, quiet=True)
    got = _result(_child(so, [case], SCHEDULES))[case]
    missed = [s for s in must if got[s] is None]
    assert not missed, f"{bug} went unnoticed under {missed}: {got}"
    caught = re.compile(r"AssertionError: (output|grad of)|RuntimeError: roberta_fast\._C_emu: kernel")
    for s in must:  # by the accuracy rule (wrong or NaN values) or by the emulation raising
        assert caught.match(got[s]), got[s]
