"""The accuracy rule of every kernel test (from FlashAttention's tests):

    max|ours - ref| <= 2 * max|torch_same_dtype - ref| + floor

where ref is computed in float64 from the same inputs and torch_same_dtype is plain PyTorch in the
dtype under test. A failure prints the worst index, both values and the error ratio.

On CPU tensors the Triton interpreter casts fp32 -> bf16 by truncation where a GPU rounds to nearest,
so there a bf16 result may be one bf16 step off: the default floor for bf16 on CPU is one bf16 step
(2^-7 relative) of the largest reference value. GPU tensors get no such allowance.
"""

import torch

# floor per dtype: absorbs rounding of the output itself when torch happens to be exact
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, torch.float64: 1e-10}


def assert_rule(ours, ref, torch_same, *, name="output", floor=None, factor=2.0):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    if ours.numel() == 0:
        return
    if floor is None:
        floor = FLOOR[ours.dtype]
        if ours.dtype == torch.bfloat16 and ours.device.type == "cpu":
            floor = max(floor, 2.0**-7 * ref.detach().double().nan_to_num(0.0).abs().max().item())
    o = ours.detach().double().cpu()
    r = ref.detach().double().cpu()
    t = torch_same.detach().double().cpu()
    nan_o, nan_r = torch.isnan(o), torch.isnan(r)
    assert torch.equal(nan_o, nan_r), (
        f"{name}: NaN pattern differs from reference ({int(nan_o.sum())} NaN in ours, {int(nan_r.sum())} in ref)"
    )
    o, r, t = o.nan_to_num(0.0), r.nan_to_num(0.0), t.nan_to_num(0.0)
    err = (o - r).abs()
    torch_err = (t - r).abs().max().item()
    bound = factor * torch_err + floor
    worst = err.max().item()
    if not worst <= bound:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name}: max|ours - ref| = {worst:.3e} > {factor} * {torch_err:.3e} + {floor:.1e} = {bound:.3e} "
            f"(ratio {worst / max(torch_err, 1e-30):.2f}x torch's error); worst at {idx}: "
            f"ours={o[idx].item():.6g} ref={r[idx].item():.6g} torch={t[idx].item():.6g}"
        )
