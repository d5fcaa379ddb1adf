"""AdamP / SGDP: the authors' package as oracle, the REFERENCE worked example, the no-projection case,
validation, dtypes, state and exact resume."""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
import torch.nn.functional as F

from lowrank_opt.classic.adamp import SGDP, AdamP, radial_projection

DELTA = 0.1


# --------------------------------------------------------------------------------------------------------
# Gradients that steer the projection: channel view fires, layer view fires, or nothing fires
# --------------------------------------------------------------------------------------------------------

KINDS = ("channel", "layer", "none")


def _rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x.reshape(rows, -1)


def _make_grad(param: torch.Tensor, step: int, kind: str) -> torch.Tensor:
    """A gradient for ``param`` at ``step``, a pure function of both, in float64.

    channel: orthogonal to every row of the weight, so the channel view fires.
    layer:   each row has a large radial part (alternating sign), removed only as a whole, so the channel
             view does not fire but the layer view does.
    none:    has a large component along the weight, so neither view fires.
    """
    gen = torch.Generator().manual_seed(1000 + 17 * step + param.numel())
    p = param.detach().to(torch.float64)
    noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    if p.ndim <= 1 or kind == "none":
        return noise + 2 * p
    p_rows, n_rows = _rows(p, p.shape[0]), _rows(noise, p.shape[0])
    unit = p_rows / p_rows.norm(dim=1, keepdim=True)
    orth = n_rows - unit * (unit * n_rows).sum(dim=1, keepdim=True)
    if kind == "channel":
        return orth.reshape(p.shape)
    signs = torch.tensor([(-1.0) ** i for i in range(p.shape[0])], dtype=torch.float64).unsqueeze(1)
    g = orth + signs * orth.norm(dim=1, keepdim=True) * unit
    flat_p, flat_g = p.reshape(-1), g.reshape(-1)
    flat_g = flat_g - flat_p * (flat_p @ flat_g) / (flat_p @ flat_p)
    return flat_g.reshape(p.shape)


def _fired_view(grad: torch.Tensor, param: torch.Tensor, eps: float = 1e-8) -> str:
    """Which view fires, computed the oracle's way (F.cosine_similarity), independently of our code."""
    if param.ndim <= 1:
        return "none"
    for name, rows in (("channel", param.shape[0]), ("layer", 1)):
        cos = F.cosine_similarity(_rows(grad, rows), _rows(param, rows), dim=1, eps=eps).abs()
        if cos.max() < DELTA / math.sqrt(_rows(param, rows).shape[1]):
            return name
    return "none"


def _make_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.nn.Parameter]:
    """A conv weight (4-D), a linear weight (2-D) and a bias (1-D)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 3, 3, 3), (5, 8), (5,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def _set_grads(params, step: int) -> None:
    kind = KINDS[step % len(KINDS)]
    for p in params:
        p.grad = _make_grad(p, step, kind).to(p.dtype)


# --------------------------------------------------------------------------------------------------------
# Against the authors' package
# --------------------------------------------------------------------------------------------------------

STEPS = 20


def test_gradient_schedule_exercises_every_branch():
    params = _make_params()
    for step in range(len(KINDS)):
        for p in params[:2]:
            grad = _make_grad(p, step, KINDS[step])
            assert _fired_view(grad, p) == KINDS[step]
        assert _fired_view(_make_grad(params[2], step, KINDS[step]), params[2]) == "none"


def _run_against_oracle(ours_cls, oracle_cls, kwargs):
    ours_params = _make_params()
    oracle_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    ours = ours_cls(ours_params, **kwargs)
    oracle = oracle_cls(oracle_params, **kwargs)
    for step in range(STEPS):
        _set_grads(ours_params, step)
        for o, p in zip(oracle_params, ours_params):
            o.grad = p.grad.clone()  # the very same gradients for both
        ours.step()
        oracle.step()
        for o, p in zip(oracle_params, ours_params):
            torch.testing.assert_close(p.detach(), o.detach(), rtol=1e-6, atol=1e-12)
    return ours, oracle, ours_params, oracle_params


@pytest.mark.parametrize("nesterov", [False, True])
def test_adamp_matches_authors_package(nesterov):
    adamp = pytest.importorskip("adamp")
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, delta=DELTA, wd_ratio=0.1,
                  nesterov=nesterov)
    ours, oracle, ours_params, oracle_params = _run_against_oracle(AdamP, adamp.AdamP, kwargs)
    for o, p in zip(oracle_params, ours_params):
        assert ours.state[p]["step"] == oracle.state[o]["step"] == STEPS
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[p][key], oracle.state[o][key], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(
    "momentum, dampening, nesterov",
    [(0.9, 0.0, False), (0.9, 0.0, True), (0.9, 0.3, False), (0.0, 0.0, False), (0.0, 0.5, False)],
)
def test_sgdp_matches_authors_package(momentum, dampening, nesterov):
    adamp = pytest.importorskip("adamp")
    kwargs = dict(lr=0.05, momentum=momentum, dampening=dampening, weight_decay=0.1, nesterov=nesterov,
                  eps=1e-8, delta=DELTA, wd_ratio=0.1)
    ours, oracle, ours_params, oracle_params = _run_against_oracle(SGDP, adamp.SGDP, kwargs)
    for o, p in zip(oracle_params, ours_params):
        if momentum:
            torch.testing.assert_close(
                ours.state[p]["momentum_buffer"], oracle.state[o]["momentum"], rtol=1e-6, atol=1e-12
            )
        else:
            assert p not in ours.state  # nothing kept for momentum 0


def test_cosine_floors_each_norm_at_eps_like_the_authors_package():
    # Weight and gradient aligned, row norms about 3e-7: with each norm floored at eps (torch 2.x
    # F.cosine_similarity, used by adamp 0.3.0) the cosine is 1 and nothing fires; flooring the product of
    # the norms instead (the torch 1.x docs) gives about 1e-5 and would wrongly fire the projection.
    scale = 1e-7
    adamp = pytest.importorskip("adamp")
    gen = torch.Generator().manual_seed(5)
    weight = scale * torch.randn(5, 8, generator=gen, dtype=torch.float64)
    ours_p, oracle_p = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    ours_p.grad, oracle_p.grad = weight.clone(), weight.clone()
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    AdamP([ours_p], **kwargs).step()
    adamp.AdamP([oracle_p], **kwargs).step()
    torch.testing.assert_close(ours_p.detach(), oracle_p.detach(), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------------
# REFERENCE worked example: p = I2, g = [[0.001, 1], [1, 0.001]], lr = 0.1, weight_decay = 0.01
# --------------------------------------------------------------------------------------------------------

# The reference's values are exact up to eps-sized terms (about 2e-9 on the diagonal, 1e-9 off it);
# 1e-6 is far above those and far below any hyperparameter mix-up (decay 0.999 vs 0.9999 differs by 9e-4).
EXAMPLE_ATOL = 1e-6


def _example_param():
    p = torch.nn.Parameter(torch.eye(2, dtype=torch.float64))
    p.grad = torch.tensor([[0.001, 1.0], [1.0, 0.001]], dtype=torch.float64)
    return p


def test_reference_example_projection():
    p = _example_param()
    update = torch.full((2, 2), 0.1, dtype=torch.float64)
    projected, ratio = radial_projection(update, p.grad, p.detach(), delta=DELTA, wd_ratio=0.1, eps=1e-8)
    assert ratio == 0.1
    torch.testing.assert_close(
        projected, torch.tensor([[0.0, 0.1], [0.1, 0.0]], dtype=torch.float64), rtol=0, atol=1e-8
    )


def test_reference_example_adamp():
    p = _example_param()
    AdamP([p], lr=0.1, weight_decay=0.01).step()
    expected = torch.tensor([[0.9999, -0.1], [-0.1, 0.9999]], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=EXAMPLE_ATOL)


def test_reference_example_sgdp():
    p = _example_param()
    SGDP([p], lr=0.1, momentum=0.9, weight_decay=0.01).step()
    expected = torch.tensor([[0.999, -0.1], [-0.1, 0.999]], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=EXAMPLE_ATOL)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgdp_buffer_keeps_the_projection_only_without_nesterov(nesterov):
    # The authors' SGDP projects its update in place, and without Nesterov the update is the buffer.
    p = _example_param()
    opt = SGDP([p], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    opt.step()
    buffer = opt.state[p]["momentum_buffer"]
    expected = p.grad if nesterov else torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(buffer, expected, rtol=0, atol=1e-8)


# --------------------------------------------------------------------------------------------------------
# When the projection does not fire: plain Adam / SGD with full decoupled weight decay
# --------------------------------------------------------------------------------------------------------


def _aligned_grads(params, step):
    for p in params:
        p.grad = _make_grad(p, step, "none")
        assert _fired_view(p.grad, p.detach()) == "none"


@pytest.mark.parametrize("nesterov", [False, True])
def test_adamp_without_projection_is_adamw(nesterov):
    params = _make_params()
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lr, betas, wd = 1e-2, (0.9, 0.99), 0.1
    ours = AdamP(params, lr=lr, betas=betas, weight_decay=wd, wd_ratio=0.1, nesterov=nesterov)
    adamw = torch.optim.AdamW(reference, lr=lr, betas=betas, weight_decay=wd, foreach=False)
    state = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for p in reference}
    for step in range(10):
        _aligned_grads(params, step)
        for r, p in zip(reference, params):
            r.grad = p.grad.clone()
        ours.step()
        if nesterov:  # torch has no Nesterov AdamW; write it out: full decay, then the Nesterov direction
            with torch.no_grad():
                for r in reference:
                    m, v = state[id(r)]
                    m.mul_(betas[0]).add_(r.grad, alpha=1 - betas[0])
                    v.mul_(betas[1]).addcmul_(r.grad, r.grad, value=1 - betas[1])
                    denom = v.sqrt() / math.sqrt(1 - betas[1] ** (step + 1)) + 1e-8
                    direction = (betas[0] * m + (1 - betas[0]) * r.grad) / denom
                    r.mul_(1 - lr * wd).sub_(direction * lr / (1 - betas[0] ** (step + 1)))
        else:
            adamw.step()
        for r, p in zip(reference, params):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgdp_without_projection_is_sgd_with_decoupled_decay(nesterov):
    params = _make_params()
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lr, momentum, wd = 0.05, 0.9, 0.1
    ours = SGDP(params, lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    # With dampening 0 the zero-started buffer equals torch's buf = g on step 1, so torch SGD (no decay)
    # after the full decoupled decay 1 - lr * wd / (1 - momentum) is the same rule.
    sgd = torch.optim.SGD(reference, lr=lr, momentum=momentum, nesterov=nesterov, foreach=False)
    for step in range(10):
        _aligned_grads(params, step)
        for r, p in zip(reference, params):
            r.grad = p.grad.clone()
        ours.step()
        with torch.no_grad():
            for r in reference:
                r.mul_(1 - lr * wd / (1 - momentum))
        sgd.step()
        for r, p in zip(reference, params):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-12, atol=1e-14)


def test_projection_leaves_vectors_and_aligned_weights_alone():
    update = torch.randn(5, 8, dtype=torch.float64)
    param = torch.randn(5, 8, dtype=torch.float64)
    same, ratio = radial_projection(update, param * 3, param, delta=DELTA, wd_ratio=0.1, eps=1e-8)
    assert same is update and ratio == 1.0
    bias = torch.randn(5, dtype=torch.float64)
    orthogonal = torch.zeros(5, dtype=torch.float64)  # cosine 0, but vectors are never projected
    same, ratio = radial_projection(bias, orthogonal, bias, delta=DELTA, wd_ratio=0.1, eps=1e-8)
    assert same is bias and ratio == 1.0


@pytest.mark.parametrize("kind", ["channel", "layer"])
def test_projection_removes_the_radial_part_in_the_view_that_fires(kind):
    param = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    grad = _make_grad(param, 0, kind)
    update = torch.randn_like(param)
    projected, ratio = radial_projection(update, grad, param, delta=DELTA, wd_ratio=0.25, eps=1e-8)
    assert ratio == 0.25
    rows = param.shape[0] if kind == "channel" else 1
    # The weight is normalized by |p| + eps, so a fraction of about 2 * eps / |p| of the radial part stays.
    radial = (_rows(projected, rows) * _rows(param, rows)).sum(dim=1)
    before = (_rows(update, rows) * _rows(param, rows)).sum(dim=1)
    assert (radial.abs() <= 1e-6 * before.abs()).all()
    if kind == "layer":  # only the whole-tensor radial part went, not each row's
        assert (_rows(projected, 6) * _rows(param, 6)).sum(dim=1).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


def _p():
    return [torch.nn.Parameter(torch.randn(3, 4))]


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (AdamP, dict(lr=-1.0), "lr must be >= 0, got -1.0"),
        (AdamP, dict(lr=float("nan")), "lr must be >= 0, got nan"),
        (AdamP, dict(betas=(1.0, 0.999)), "betas[0] must be in [0, 1), got 1.0"),
        (AdamP, dict(betas=(0.9, -0.1)), "betas[1] must be in [0, 1), got -0.1"),
        (AdamP, dict(betas=(0.9,)), "betas must be a pair (beta1, beta2), got (0.9,)"),
        (AdamP, dict(eps=-1e-8), "eps must be > 0 (eps = 0 makes m / (sqrt(v) + eps) = 0/0 = nan where every "
                                 "gradient so far was 0), got -1e-08"),
        (AdamP, dict(eps=0.0), "eps must be > 0 (eps = 0 makes m / (sqrt(v) + eps) = 0/0 = nan where every "
                               "gradient so far was 0), got 0.0"),
        (AdamP, dict(lr=float("inf")), "lr must be finite, got inf"),
        (AdamP, dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
        (AdamP, dict(delta=-0.1), "delta must be >= 0, got -0.1"),
        (AdamP, dict(wd_ratio=1.5), "wd_ratio must be in [0, 1], got 1.5"),
        (AdamP, dict(wd_ratio=-0.5), "wd_ratio must be in [0, 1], got -0.5"),
        (SGDP, dict(lr=-0.1), "lr must be >= 0, got -0.1"),
        (SGDP, dict(lr=0.1, momentum=-0.1), "momentum must be in [0, 1), got -0.1"),
        (SGDP, dict(lr=0.1, momentum=1.0), "momentum must be in [0, 1), got 1.0"),
        (SGDP, dict(lr=0.1, dampening=1.5), "dampening must be in [0, 1], got 1.5"),
        (SGDP, dict(lr=0.1, weight_decay=-1.0), "weight_decay must be >= 0, got -1.0"),
        (
            SGDP,
            dict(lr=0.1, nesterov=True),
            "nesterov=True requires momentum > 0 and dampening == 0, got momentum=0.0, dampening=0.0",
        ),
        (
            SGDP,
            dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
            "nesterov=True requires momentum > 0 and dampening == 0, got momentum=0.9, dampening=0.1",
        ),
        (SGDP, dict(lr=0.1, eps=-1.0), "eps must be >= 0, got -1.0"),
        (SGDP, dict(lr=0.1, delta=-1.0), "delta must be >= 0, got -1.0"),
        (SGDP, dict(lr=0.1, wd_ratio=2), "wd_ratio must be in [0, 1], got 2"),
    ],
)
def test_bad_hyperparameters_are_refused_with_name_and_value(cls, kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cls(_p(), **kwargs)


def test_sgdp_needs_lr():
    with pytest.raises(TypeError):
        SGDP(_p())


@pytest.mark.parametrize("cls, kwargs", [(AdamP, {}), (SGDP, dict(lr=0.1))])
def test_bad_group_hyperparameters_name_the_group(cls, kwargs):
    with pytest.raises(ValueError, match=re.escape("wd_ratio must be in [0, 1], got 3 in param_groups[1]")):
        cls([{"params": _p()}, {"params": _p(), "wd_ratio": 3}], **kwargs)
    opt = cls(_p(), **kwargs)
    with pytest.raises(ValueError, match=re.escape("lr must be >= 0, got -2 in param_groups[1]")):
        opt.add_param_group({"params": _p(), "lr": -2})
    assert len(opt.param_groups) == 1  # the refused group was not kept


@pytest.mark.parametrize("cls, kwargs", [(AdamP, {}), (SGDP, dict(lr=0.1))])
def test_integer_params_are_refused_by_name(cls, kwargs):
    named = [
        ("layer.weight", torch.nn.Parameter(torch.randn(2, 2))),
        ("counter", torch.zeros(3, dtype=torch.long)),
    ]
    message = (
        f"{cls.__name__} supports real floating point parameters only, got dtype torch.int64 for 'counter'"
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        cls(named, **kwargs)


@pytest.mark.parametrize("cls, kwargs", [(AdamP, {}), (SGDP, dict(lr=0.1))])
def test_sparse_gradients_are_refused_by_name(cls, kwargs):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = cls(emb.named_parameters(), **kwargs)
    emb(torch.tensor([1, 2])).sum().backward()
    message = f"{cls.__name__} does not support sparse gradients, got one for 'weight'"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        opt.step()


# --------------------------------------------------------------------------------------------------------
# Behaviour of step(): no grad, closure, groups, state, dtypes
# --------------------------------------------------------------------------------------------------------

OPTIMIZERS = [
    pytest.param(AdamP, dict(lr=1e-2, weight_decay=0.1), id="AdamP"),
    pytest.param(AdamP, dict(lr=1e-2, weight_decay=0.1, nesterov=True), id="AdamP-nesterov"),
    pytest.param(SGDP, dict(lr=0.05, momentum=0.9, weight_decay=0.1), id="SGDP-momentum"),
    pytest.param(SGDP, dict(lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True), id="SGDP-nesterov"),
    pytest.param(SGDP, dict(lr=0.05, weight_decay=0.1), id="SGDP-plain"),
]


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
def test_param_without_grad_is_untouched(cls, kwargs):
    params = _make_params(torch.float32)
    before = [p.detach().clone() for p in params]
    opt = cls(params, **kwargs)
    _set_grads(params, 0)
    params[1].grad = None
    opt.step()
    assert torch.equal(params[1], before[1]) and params[1] not in opt.state
    assert not torch.equal(params[0], before[0])


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
def test_closure_runs_with_grad_and_training_converges(cls, kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    opt = cls(model.named_parameters(), **{**kwargs, "weight_decay": 0.0})

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(60):
        last = opt.step(closure).item()
    assert last < 0.2 * first


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
def test_param_groups_use_their_own_hyperparameters(cls, kwargs):
    a, b = _make_params(seed=1)[:2], _make_params(seed=2)[:2]
    a2 = [torch.nn.Parameter(p.detach().clone()) for p in a]
    b2 = [torch.nn.Parameter(p.detach().clone()) for p in b]
    override = dict(lr=kwargs["lr"] * 3, weight_decay=0.3, wd_ratio=0.5, delta=0.05)
    grouped = cls([{"params": a}, {"params": b, **override}], **kwargs)
    alone_a, alone_b = cls(a2, **kwargs), cls(b2, **{**kwargs, **override})
    for step in range(6):
        for params in (a, b, a2, b2):
            _set_grads(params, step)
        grouped.step()
        alone_a.step()
        alone_b.step()
    for x, y in zip(a + b, a2 + b2):
        assert torch.equal(x, y)


def test_state_holds_only_what_is_needed():
    params = _make_params(torch.bfloat16)
    adamp, sgdp, plain = AdamP(params), SGDP(params, lr=0.1, momentum=0.9), SGDP(params, lr=0.1)
    for opt in (adamp, sgdp, plain):
        _set_grads(params, 0)
        opt.step()
    for p in params:
        assert set(adamp.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        assert type(adamp.state[p]["step"]) is int and adamp.state[p]["step"] == 1
        for key in ("exp_avg", "exp_avg_sq"):
            assert adamp.state[p][key].shape == p.shape and adamp.state[p][key].dtype == torch.float32
        assert set(sgdp.state[p]) == {"momentum_buffer"}
        assert sgdp.state[p]["momentum_buffer"].dtype == torch.float32
        assert p not in plain.state


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_dtype_and_use_fp32_math(cls, kwargs, dtype):
    low = _make_params(dtype)
    high = [torch.nn.Parameter(p.detach().float()) for p in low]  # the same values, in fp32
    opt_low, opt_high = cls(low, **kwargs), cls(high, **kwargs)
    _set_grads(low, 0)
    for h, p in zip(high, low):
        h.grad = p.grad.float()
    opt_low.step()
    opt_high.step()
    for h, p in zip(high, low):
        assert p.dtype == dtype
        assert torch.equal(p.detach(), h.detach().to(dtype))  # one step: fp32 math, rounded once
    for step in range(1, 5):
        _set_grads(low, step)
        opt_low.step()
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in low)


# --------------------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        for name, p in zip(("conv", "linear", "bias"), _make_params(dtype, seed=3)):
            self.register_parameter(name, p)


@pytest.mark.parametrize("cls, kwargs", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_exact(cls, kwargs, dtype):
    n_before, n_after = 4, 5
    full = _Net(dtype)
    opt_full = cls(full.named_parameters(), **kwargs)
    for step in range(n_before + n_after):
        _set_grads(list(full.parameters()), step)
        opt_full.step()

    first = _Net(dtype)
    opt_first = cls(first.named_parameters(), **kwargs)
    for step in range(n_before):
        _set_grads(list(first.parameters()), step)
        opt_first.step()
    buffer = io.BytesIO()
    torch.save(opt_first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = copy.deepcopy(first)
    opt_resumed = cls(resumed.named_parameters(), **kwargs)
    opt_resumed.load_state_dict(saved)
    for p in resumed.parameters():
        for key, value in opt_resumed.state[p].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == torch.float32  # fp32 state stays fp32 on a bf16 param
    for step in range(n_before, n_before + n_after):
        _set_grads(list(resumed.parameters()), step)
        opt_resumed.step()

    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt_full.state_dict()["param_groups"] == opt_resumed.state_dict()["param_groups"]
