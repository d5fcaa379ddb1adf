"""Stochastic rounding to bf16: the pure function (unbiased, neighbours only, special values, determinism) and
Apollo's ``stochastic_rounding`` option for pure-bf16 weights (small updates accumulate, off == round-to-nearest,
exact resume)."""

import math

import pytest
import torch
from torch import nn

from lowrank_opt import Apollo, stochastic_round_to_bf16
from lowrank_opt.rounding import rounding_seed

BF16_MAX = (2 - 2**-7) * 2.0**127
ULP_BELOW_1 = 2.0**-8  # bf16 spacing in [0.5, 1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- the pure function -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lo,hi",
    [
        (1.0, 1.0 + 2**-7),  # positive
        (-1.0, -(1.0 + 2**-7)),  # negative: the pair is ordered by magnitude
        (2.0 - 2**-7, 2.0),  # the upper neighbour is in the next binade
        (3 * 2.0**-133, 4 * 2.0**-133),  # bf16 subnormals
        ((2 - 2**-6) * 2.0**127, BF16_MAX),  # just below the largest bf16: never inf
        (-1e-3, None),  # an arbitrary value: neighbours computed below
    ],
)
@pytest.mark.parametrize("frac", [0.3, 0.9])
def test_unbiased_and_only_the_two_neighbours(lo, hi, frac):
    if hi is None:  # lo: -1e-3 truncated toward zero to bf16; hi: the next bf16 away from zero
        lo_bits = torch.tensor([lo]).view(torch.int32) & -(1 << 16)
        lo = lo_bits.view(torch.float32).item()
        hi = (lo_bits + (1 << 16)).view(torch.float32).item()  # sign-magnitude: + grows the magnitude
    x = torch.tensor(lo + frac * (hi - lo)).item()  # the nearest fp32 value
    frac = (x - lo) / (hi - lo)
    assert 0.2 < frac < 0.95
    n = 200_000
    xs = torch.full((n,), x, dtype=torch.float32)
    out = stochastic_round_to_bf16(xs, _gen(0))
    assert out.dtype == torch.bfloat16 and out.shape == xs.shape
    values = out.double()
    is_hi = values == hi
    assert bool(((values == lo) | is_hi).all()), set(values.unique().tolist())
    # mean within 5 standard errors of x; the upper neighbour chosen with probability frac
    se = abs(hi - lo) * math.sqrt(frac * (1 - frac) / n)
    assert abs(values.mean().item() - x) < 5 * se
    assert abs(is_hi.double().mean().item() - frac) < 5 * math.sqrt(frac * (1 - frac) / n)
    # round-to-nearest is biased by min(frac, 1-frac) ulps, hundreds of standard errors
    assert abs(xs.to(torch.bfloat16).double().mean().item() - x) > 50 * se
    assert torch.equal(xs, torch.full((n,), x))  # the input is not modified


def test_bf16_values_signs_zeros_inf_nan():
    g = _gen(1)
    exact = torch.randn(10_000).to(torch.bfloat16)
    assert torch.equal(stochastic_round_to_bf16(exact.float(), g), exact)
    x = torch.randn(10_000) * torch.logspace(-30, 30, 10_000)
    out = stochastic_round_to_bf16(x, g)
    assert torch.equal(torch.signbit(out), torch.signbit(x))
    # between the bf16 truncation toward zero and the next value away from zero
    lo = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)
    assert bool(((out.float().abs() >= lo.abs()) & (out.float().abs() - lo.abs() <= lo.abs() * 2**-7)).all())

    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), BF16_MAX, -BF16_MAX])
    for seed in range(20):
        out = stochastic_round_to_bf16(special, _gen(seed)).float()
        assert out[0].item() == 0.0 and not torch.signbit(out[0])
        assert out[1].item() == 0.0 and torch.signbit(out[1])
        assert out[2].item() == math.inf and out[3].item() == -math.inf
        assert math.isnan(out[4].item())
        assert out[5].item() == BF16_MAX and out[6].item() == -BF16_MAX
    # NaNs whose payload is only in the discarded bits stay NaN (not inf)
    nans = torch.tensor([0x7F800001, -1, 0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    assert bool(torch.isnan(stochastic_round_to_bf16(nans, g)).all())
    # values just below the largest bf16 never overflow
    near_max = torch.full((100_000,), BF16_MAX).view(torch.int32).sub(torch.arange(100_000) % (1 << 16))
    assert bool(torch.isfinite(stochastic_round_to_bf16(near_max.view(torch.float32), g)).all())


def test_deterministic_given_the_generator_seed():
    x = torch.randn(1000, 37)
    a = stochastic_round_to_bf16(x, _gen(5))
    b = stochastic_round_to_bf16(x, _gen(5))
    c = stochastic_round_to_bf16(x, _gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = stochastic_round_to_bf16(x)
    torch.manual_seed(3)
    assert torch.equal(d, stochastic_round_to_bf16(x))
    # non-contiguous input
    assert torch.equal(stochastic_round_to_bf16(x.T, _gen(5)), stochastic_round_to_bf16(x.T.contiguous(), _gen(5)))


def test_rejects_non_float32():
    with pytest.raises(TypeError, match=r"stochastic_round_to_bf16 needs a float32 tensor, got torch.float64"):
        stochastic_round_to_bf16(torch.ones(3, dtype=torch.float64))


def _walk_bound(total_moves, ulp):
    """Upper bound on the standard deviation of a sum of stochastic roundings: a step of size d < ulp from a
    bf16 value has rounding variance d * (ulp - d) <= d * ulp, so var <= ulp * sum |d| (given per element)."""
    return torch.sqrt(total_moves.abs() * ulp)


def test_many_tiny_updates_move_a_bf16_weight_by_their_total():
    n, steps, delta = 4096, 1000, 1e-4  # delta far below bf16's spacing at 1.0 (2^-8 below, 2^-7 above)
    nearest = torch.ones(n, dtype=torch.bfloat16)
    stochastic = torch.ones(n, dtype=torch.bfloat16)
    exact = torch.ones(n, dtype=torch.float64)
    g = _gen(0)
    for _ in range(steps):
        nearest = (nearest.float() - delta).to(torch.bfloat16)
        stochastic = stochastic_round_to_bf16(stochastic.float() - delta, g)
        exact -= delta
    assert torch.equal(nearest, torch.ones(n, dtype=torch.bfloat16))  # every update lost
    moved = 1.0 - stochastic.double()
    # every step from a bf16 value in [0.5, 1] has variance delta * (ulp - delta): the sum's std is exact
    std = math.sqrt(steps * delta * (ULP_BELOW_1 - delta))
    assert abs(moved.mean().item() - steps * delta) < 5 * std / math.sqrt(n)
    assert 0.9 * std < moved.std().item() < 1.1 * std
    assert abs(exact.mean().item() - (1 - steps * delta)) < 1e-9


# -- Apollo ----------------------------------------------------------------------------------------------


def _run_dense(dtype, steps, lr, **kwargs):
    """A 1-D parameter (AdamW path) of ones with a constant gradient of ones: with bias correction each
    Adam update is lr * sqrt(1-b2^t) / (sqrt(1-b2^t) + eps), i.e. lr up to eps."""
    p = nn.Parameter(torch.ones(4096, dtype=dtype))
    opt = Apollo([("bias", p)], lr=lr, **kwargs)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    return p.detach()


@pytest.mark.slow
def test_apollo_dense_path_tiny_updates_accumulate_with_stochastic_rounding():
    steps, lr = 400, 2.5e-4  # each update far below half of bf16's spacing at 1.0 (2^-9)
    exact = _run_dense(torch.float32, steps, lr)
    nearest = _run_dense(torch.bfloat16, steps, lr, stochastic_rounding=False)
    stochastic = _run_dense(torch.bfloat16, steps, lr)
    total = 1.0 - exact.double()  # the fp32 run's movement: the same Adam updates, kept exactly
    assert torch.allclose(total, torch.full_like(total, steps * lr), rtol=1e-3)
    assert torch.equal(nearest, torch.ones_like(nearest))  # round-to-nearest: stuck at 1.0
    moved = 1.0 - stochastic.double()
    std = math.sqrt(steps * lr * (ULP_BELOW_1 - lr))
    n = moved.numel()
    assert abs(moved.mean().item() - total.mean().item()) < 5 * std / math.sqrt(n)
    assert 0.9 * std < moved.std().item() < 1.1 * std  # independent bits per element and per step


@pytest.mark.slow
def test_apollo_lowrank_path_tiny_updates_accumulate_with_stochastic_rounding():
    # APOLLO's update depends on the gradients only (no weight decay), so an fp32 run with the same gradients
    # gives each element's exact total movement; constant gradients keep each element's direction fixed.
    torch.manual_seed(0)
    init = torch.ones(64, 48)
    grad = torch.randn(64, 48).to(torch.bfloat16).float()  # the same gradient in both dtypes
    steps, lr = 300, 1e-4

    def run(dtype, **kwargs):
        w = nn.Parameter(init.to(dtype, copy=True))
        opt = Apollo([("w", w)], lr=lr, rank=4, update_proj_gap=50, **kwargs)
        for _ in range(steps):
            w.grad = grad.to(dtype)
            opt.step()
        return w.detach().double()

    total = run(torch.float32) - 1.0
    assert total.abs().max().item() < 2**-7 * 20 and total.abs().mean().item() > 2**-9  # beyond half an ulp
    nearest = run(torch.bfloat16, stochastic_rounding=False)
    assert torch.equal(nearest, torch.ones_like(nearest))  # every single update was below half an ulp
    moved = run(torch.bfloat16) - 1.0
    # per element: E[moved] = total, std <= sqrt(ulp * |total|) with ulp <= 2^-7 in [0.5, 2)
    bound = _walk_bound(total, 2**-7)
    n = total.numel()
    mean_err = (moved - total).mean().item()
    assert abs(mean_err) < 5 * bound.square().sum().sqrt().item() / n
    # the same per sign, so opposite biases cannot cancel
    for mask in (total > 0, total < 0):
        m = int(mask.sum())
        assert abs((moved - total)[mask].mean().item()) < 5 * bound[mask].square().sum().sqrt().item() / m
    assert torch.corrcoef(torch.stack([moved.flatten(), total.flatten()]))[0, 1] > 0.6


def _build(params, **kwargs):
    options = dict(lr=1e-3, rank=3, update_proj_gap=4, weight_decay=0.01)
    options.update(kwargs)
    return Apollo(
        [{"params": [("w1", params[0]), ("w2", params[1])]}, {"params": [("b", params[2])], "rank": None}], **options
    )


def _init(dtype):
    torch.manual_seed(0)
    return [torch.randn(12, 7).to(dtype), torch.randn(5, 3, 3).to(dtype), torch.randn(7).to(dtype)]


def _run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        g = _gen(1000 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()


def test_option_off_is_round_to_nearest_of_the_fp32_update():
    """stochastic_rounding=False is the previous behaviour: the fp32 step of the bf16 values, rounded to
    nearest, bit for bit."""
    init = _init(torch.bfloat16)
    low = [nn.Parameter(t.clone()) for t in init]
    ref = [nn.Parameter(t.float()) for t in init]
    opt_low, opt_ref = _build(low, stochastic_rounding=False), _build(ref)
    for t in range(8):
        g = _gen(t)
        for a, b in zip(low, ref):
            a.grad = torch.randn(a.shape, generator=g).to(torch.bfloat16)
            b.grad = a.grad.float()
        opt_low.step()
        opt_ref.step()
        with torch.no_grad():
            for b in ref:
                b.copy_(b.to(torch.bfloat16).float())
        for a, b in zip(low, ref):
            assert torch.equal(a.float(), b)
    on = [nn.Parameter(t.clone()) for t in init]
    _run(_build(on), on, 8)
    off = [nn.Parameter(t.clone()) for t in init]
    _run(_build(off, stochastic_rounding=False), off, 8)
    assert not all(torch.equal(a, b) for a, b in zip(on, off))  # the option does something for bf16


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_option_changes_nothing_for_fp16_and_fp32(dtype):
    init = _init(dtype)
    on = [nn.Parameter(t.clone()) for t in init]
    off = [nn.Parameter(t.clone()) for t in init]
    _run(_build(on, stochastic_rounding=True), on, 6)
    _run(_build(off, stochastic_rounding=False), off, 6)
    for a, b in zip(on, off):
        assert a.dtype == dtype and torch.equal(a, b)


@pytest.mark.parametrize("cache", [False, True])
def test_resume_is_exact_with_bf16_and_stochastic_rounding(tmp_path, cache):
    init = _init(torch.bfloat16)
    straight = [nn.Parameter(t.clone()) for t in init]
    _run(_build(straight, cache_projection=cache), straight, 10)

    first = [nn.Parameter(t.clone()) for t in init]
    opt1 = _build(first, cache_projection=cache)
    _run(opt1, first, 6)
    torch.save(opt1.state_dict(), tmp_path / "opt.pt")
    resumed = [nn.Parameter(p.detach().clone()) for p in first]
    opt2 = _build(resumed, cache_projection=cache)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert all(g["stochastic_rounding"] is True for g in opt2.param_groups)
    _run(opt2, resumed, 4, start=6)
    for a, b in zip(straight, resumed):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_reproducible_and_seeded_by_seed_identity_and_step():
    init = _init(torch.bfloat16)
    runs = {}
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        params = [nn.Parameter(t.clone()) for t in init]
        _run(_build(params, seed=seed, rank=None), params, 5)  # AdamW everywhere: only the rounding sees seed
        runs[key] = params
    assert all(torch.equal(x, y) for x, y in zip(runs["a"], runs["b"]))
    assert not all(torch.equal(x, y) for x, y in zip(runs["a"], runs["c"]))
    # two same-shaped parameters with the same values and gradients round with different bits
    w1 = nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    w2 = nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    opt = Apollo([("w1", w1), ("w2", w2)], lr=1e-3, rank=None)
    for _ in range(3):
        w1.grad = torch.ones_like(w1)
        w2.grad = torch.ones_like(w2)
        opt.step()
    assert not torch.equal(w1, w2)
    # and every step draws new bits
    assert len({rounding_seed(0, 7, step) for step in range(100)}) == 100


def test_layerwise_equals_normal_with_stochastic_rounding():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 3)).to(torch.bfloat16) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    normal = Apollo(models[0].named_parameters(), lr=1e-3, rank=2)
    layerwise = Apollo(models[1].named_parameters(), lr=1e-3, rank=2, layerwise=True)
    for t in range(4):
        x = torch.randn(5, 12, generator=_gen(t)).to(torch.bfloat16)
        models[0](x).square().mean().backward()
        normal.step()
        normal.zero_grad()
        models[1](x).square().mean().backward()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_checkpoint_from_before_the_option_loads():
    w = nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16))
    opt = Apollo([("w", w)], rank=2, stochastic_rounding=False)
    w.grad = torch.ones_like(w)
    opt.step()
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["stochastic_rounding"]
    fresh = Apollo([("w", w)], rank=2, stochastic_rounding=False)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["stochastic_rounding"] is False
    w.grad = torch.ones_like(w)
    fresh.step()


@pytest.mark.parametrize("value", [1, "yes", None])
def test_option_must_be_a_bool(value):
    w = nn.Parameter(torch.randn(8, 6))
    with pytest.raises(TypeError) as info:
        Apollo([("w", w)], stochastic_rounding=value)
    assert str(info.value) == (f"stochastic_rounding must be a bool, got {value!r} ({type(value).__name__}) "
                               "in param_groups[0]")
    b = nn.Parameter(torch.randn(6))
    with pytest.raises(TypeError, match=r"^stochastic_rounding must be a bool, got 0 \(int\) in param_groups\[1\]$"):
        Apollo([{"params": [w]}, {"params": [b], "stochastic_rounding": 0}])
