"""8-bit Adam moments (lowrank_opt.quant.state8bit): bitsandbytes' block-wise dynamic-map format, an AdamW
step in pieces, exact resume, weights_only checkpoints, convergence next to fp32 Adam."""

from __future__ import annotations

import io
import math

import pytest
import torch

pytest.importorskip("bitsandbytes")

from lowrank_opt.quant.state8bit import (  # noqa: E402
    BLOCK_SIZE,
    STATE_KEYS,
    adamw_step_8bit_,
    decode,
    dynamic_map,
    encode,
    init_adam_state_8bit,
    state_8bit_bytes,
)

# bitsandbytes' CPU quantizer looks the nearest code up in a 65,536-entry table over [-1, 1] (its
# csrc/cpu_ops.cpp, norm_to_lut_index): the code it returns is the nearest one to x/absmax rounded to that
# grid, i.e. at most one grid step (2/65535) further from x/absmax than the nearest code.
LOOKUP_RESOLUTION = 2.0 / 65535


def test_maps_are_bitsandbytes_dynamic_maps():
    import bitsandbytes.functional as bnb_functional

    signed, unsigned = dynamic_map(True), dynamic_map(False)
    assert torch.equal(signed, bnb_functional.create_dynamic_map(signed=True))
    assert torch.equal(unsigned, bnb_functional.create_dynamic_map(signed=False))
    for code in (signed, unsigned):
        assert code.shape == (256,) and code.dtype == torch.float32
        assert (code[1:] > code[:-1]).all()  # sorted, distinct
        assert code.max().item() == 1.0 and (code == 0).any()
    assert signed.min().item() < 0 <= unsigned.min().item()


def _bound(x: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Per element: absmax * (half the gap between the two codes around s = x/absmax, or the distance to
    the outermost code outside them, + the lookup resolution)."""
    flat = x.reshape(-1)
    scale = absmax.repeat_interleave(BLOCK_SIZE)[: flat.numel()]
    s = torch.where(scale > 0, flat / scale, 0.0)
    hi = torch.searchsorted(code, s).clamp(1, code.numel() - 1)
    lo = hi - 1
    half_gap = (code[hi] - code[lo]) / 2
    outside = torch.where(s < code[0], code[0] - s, torch.where(s > code[-1], s - code[-1], 0.0))
    nearest = torch.where((s < code[0]) | (s > code[-1]), outside, half_gap)
    # fp32 slack: one rounding of x/absmax and of code*absmax
    return (scale * (nearest + LOOKUP_RESOLUTION) + 2 * torch.finfo(torch.float32).eps * flat.abs()).view(x.shape)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel", [256 * 7, 1000, 5])
def test_roundtrip_error_within_the_maps_spacing(signed, numel):
    g = torch.Generator().manual_seed(numel + signed)
    x = torch.randn(numel, generator=g) * torch.logspace(-6, 2, numel)[torch.randperm(numel, generator=g)]
    if not signed:
        x = x.square()  # a second moment: never negative
    x[::13] = 0.0
    codes, absmax = encode(x, signed=signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    blocks = -(-numel // BLOCK_SIZE)
    assert absmax.dtype == torch.float32 and absmax.shape == (blocks,)
    padded = torch.nn.functional.pad(x.abs(), (0, blocks * BLOCK_SIZE - numel))
    assert torch.equal(absmax, padded.view(blocks, BLOCK_SIZE).amax(dim=1))
    back = decode(codes, absmax, signed=signed)
    assert back.dtype == torch.float32
    bound = _bound(x, absmax, dynamic_map(signed))
    assert ((back - x).abs() <= bound).all()
    # the bound is not vacuous: it is a small fraction of each block's range
    assert (bound <= absmax.repeat_interleave(BLOCK_SIZE)[:numel] * 0.02 + 1e-30).all()


def test_decode_rejects_mismatched_absmax():
    codes, absmax = encode(torch.randn(600), signed=True)
    with pytest.raises(ValueError, match=r"absmax must be float32 of shape \(3,\) for 600 codes"):
        decode(codes, absmax[:2], signed=True)


def test_state_layout_and_bytes():
    p = torch.zeros(10, 70)
    state = init_adam_state_8bit(p)
    assert set(state) == set(STATE_KEYS)
    assert state["exp_avg_codes"].shape == (10, 70) and state["exp_avg_codes"].dtype == torch.uint8
    assert state["exp_avg_absmax"].shape == (3,) and state["exp_avg_absmax"].dtype == torch.float32
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert total == state_8bit_bytes(700) == 2 * 700 + 8 * 3


def _reference_adamw_(w, m, v, g, *, lr, beta1, beta2, eps, step, weight_decay):
    """The dense AdamW step of DESIGN.md (steps 8-9) in fp32, the operations in the same order."""
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    w.addcdiv_(m, v.sqrt().add_(eps), value=-step_size)
    if weight_decay:
        w.mul_(1 - lr * weight_decay)


HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def test_first_step_equals_fp32_adamw_exactly():
    # from zero state the moments the step uses are computed in fp32 before any quantization
    g = torch.Generator().manual_seed(0)
    w = torch.randn(33, 40, generator=g)
    grad = torch.randn(33, 40, generator=g)
    ref = w.clone()
    _reference_adamw_(ref, torch.zeros_like(w), torch.zeros_like(w), grad, step=1, **HYPER)
    state = init_adam_state_8bit(w)
    adamw_step_8bit_(w, grad, state, step=1, **HYPER)
    assert torch.equal(w, ref)


def test_steps_use_the_decoded_state_and_store_it_back():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(700, generator=g)
    state = init_adam_state_8bit(w)
    for step in (1, 2):
        grad = torch.randn(700, generator=g)
        m_prev = decode(state["exp_avg_codes"], state["exp_avg_absmax"], signed=True)
        v_prev = decode(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], signed=False)
        ref = w.clone()
        m_ref, v_ref = m_prev.clone(), v_prev.clone()
        _reference_adamw_(ref, m_ref, v_ref, grad, step=step, **HYPER)
        adamw_step_8bit_(w, grad, state, step=step, **HYPER)
        assert torch.equal(w, ref)
        # stored back as encode(m), encode(v) with the signed and unsigned maps
        codes, absmax = encode(m_ref, signed=True)
        assert torch.equal(state["exp_avg_codes"], codes) and torch.equal(state["exp_avg_absmax"], absmax)
        codes, absmax = encode(v_ref, signed=False)
        assert torch.equal(state["exp_avg_sq_codes"], codes) and torch.equal(state["exp_avg_sq_absmax"], absmax)


def test_pieces_give_the_same_result_as_one_piece():
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(37, 100, generator=g)
    grads = [torch.randn(37, 100, generator=g) for _ in range(3)]
    results = []
    for chunk in (256, 512 * 3, 1 << 20):
        w = w0.clone()
        state = init_adam_state_8bit(w)
        for step, grad in enumerate(grads, start=1):
            adamw_step_8bit_(w, grad, state, step=step, chunk_size=chunk, **HYPER)
        results.append((w, state))
    for w, state in results[1:]:
        assert torch.equal(w, results[0][0])
        for key in STATE_KEYS:
            assert torch.equal(state[key], results[0][1][key])


def _run(w, state, grads, first_step, generator_seed=None):
    for step, grad in enumerate(grads, start=first_step):
        generator = None
        if generator_seed is not None:
            generator = torch.Generator().manual_seed(generator_seed * 1000 + step)  # seeded by (seed, step)
        adamw_step_8bit_(w, grad, state, step=step, generator=generator, **HYPER)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_exact_and_checkpoint_loads_weights_only(dtype):
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(20, 300, generator=g).to(dtype)
    grads = [torch.randn(20, 300, generator=g).to(dtype) for _ in range(6)]
    seed = 7 if dtype == torch.bfloat16 else None

    straight = w0.clone()
    state = init_adam_state_8bit(straight)
    _run(straight, state, grads, 1, seed)

    resumed = w0.clone()
    state = init_adam_state_8bit(resumed)
    _run(resumed, state, grads[:4], 1, seed)
    buffer = io.BytesIO()
    torch.save({"param": resumed, "state": state, "step": 4}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert all(isinstance(t, torch.Tensor) for t in loaded["state"].values())
    w, state = loaded["param"], loaded["state"]
    _run(w, state, grads[4:], loaded["step"] + 1, seed)
    assert torch.equal(w, straight)


def test_bf16_weight_is_rounded_stochastically_with_the_generator():
    # an update far below bf16's spacing: round-to-nearest loses it, stochastic rounding keeps it on average
    w = torch.full((4096,), 1.0, dtype=torch.bfloat16)
    state = init_adam_state_8bit(w)
    grad = torch.full((4096,), 1.0, dtype=torch.bfloat16)
    # first step with eps = 0: m / sqrt(v) = (1-b1) g / (sqrt(1-b2) |g|), times the bias-corrected step size
    # lr * sqrt(1-b2) / (1-b1): exactly lr. So w = 1 - lr.
    lr = 1e-4
    step_size = lr
    nearest = w.clone()
    adamw_step_8bit_(nearest, grad, init_adam_state_8bit(w), lr=lr, beta1=0.9, beta2=0.999, eps=0.0, step=1)
    assert torch.equal(nearest, w)  # 1 - 1e-4 rounds back to 1 (bf16 spacing below 1 is 2^-8)
    adamw_step_8bit_(w, grad, state, lr=lr, beta1=0.9, beta2=0.999, eps=0.0, step=1,
                     generator=torch.Generator().manual_seed(0))
    moved = w.float().mean().item()
    # E[w] = 1 - lr; rounded values are 1 or 1 - 2^-8: std of the mean 2^-8 sqrt(p(1-p)/n)
    p = step_size / 2.0**-8
    sem = 2.0**-8 * math.sqrt(p * (1 - p) / w.numel())
    assert abs(moved - (1 - step_size)) < 5 * sem


def test_bad_arguments_are_rejected():
    w = torch.zeros(300)
    state = init_adam_state_8bit(w)
    with pytest.raises(ValueError, match="chunk_size must be a positive multiple of 256, got 300"):
        adamw_step_8bit_(w, w, state, step=1, chunk_size=300, **HYPER)
    with pytest.raises(ValueError, match="step must be an integer >= 1"):
        adamw_step_8bit_(w, w, state, step=0, **HYPER)
    with pytest.raises(ValueError, match="stochastic rounding .* is for bf16 parameters"):
        adamw_step_8bit_(w, w, state, step=1, generator=torch.Generator(), **HYPER)
    with pytest.raises(KeyError, match="lacks exp_avg_codes"):
        adamw_step_8bit_(w, w, {}, step=1, **HYPER)
    with pytest.raises(ValueError, match=r"state\['exp_avg_codes'\] for a parameter of shape \(301,\)"):
        adamw_step_8bit_(torch.zeros(301), torch.zeros(301), state, step=1, **HYPER)


def _regression_run(seed: int, eight_bit: bool, steps: int = 150) -> float:
    """Noisy linear regression, minibatches drawn with ``seed``: the final full-data loss."""
    data = torch.Generator().manual_seed(1234)
    features = torch.randn(2048, 64, generator=data)
    true_w = torch.randn(64, 32, generator=data)
    targets = features @ true_w + 0.1 * torch.randn(2048, 32, generator=data)
    w = torch.zeros(64, 32)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    state = init_adam_state_8bit(w)
    batches = torch.Generator().manual_seed(seed)
    hyper = dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    for step in range(1, steps + 1):
        idx = torch.randint(0, 2048, (32,), generator=batches)
        grad = features[idx].T @ (features[idx] @ w - targets[idx]) / 32
        if eight_bit:
            adamw_step_8bit_(w, grad, state, step=step, **hyper)
        else:
            _reference_adamw_(w, m, v, grad, step=step, **hyper)
    return ((features @ w - targets) ** 2).mean().item()


@pytest.mark.slow
def test_8bit_adam_converges_within_the_seed_noise_of_fp32_adam():
    seeds = range(4)
    fp32 = [_regression_run(s, eight_bit=False) for s in seeds]
    eight = [_regression_run(s, eight_bit=True) for s in seeds]
    initial = _regression_run(0, eight_bit=False, steps=0)
    assert max(fp32) < initial / 20  # the problem is being solved at all
    spread = max(fp32) - min(fp32)
    mean_fp32, mean_8 = sum(fp32) / len(fp32), sum(eight) / len(eight)
    assert abs(mean_8 - mean_fp32) <= spread, (fp32, eight)
