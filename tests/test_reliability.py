"""Issue 15, across the package's own optimizers (AdamP, SGDP, ApolloDQN, ApolloW, NormGrowthCap): no input
trains something silently wrong, and what a checkpoint brings is checked before anything changes.

Each test here failed on the commit before the shared machinery of ``lowrank_opt._common`` (68fc348):
numeric strings passed construction, AdamP/SGDP wrote NaN into weights, a 1e30 gradient froze AdamP's weight,
eps = 0 gave NaN weights, ``load_state_dict`` took rank/lr/choice values and shapes it should refuse, and a
deepcopy of ApolloDQN lost its skip counter.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re

import pytest
import torch

from lowrank_opt import NormGrowthCap
from lowrank_opt._common import (
    BETAS,
    LR,
    OptionTypeError,
    check_option,
    integer,
    real,
    square_limit,
    validate_group,
)
from lowrank_opt.classic import SGDP, AdamP, AdamW, ApolloDQN, ApolloW


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Every optimizer of ours that updates tensors, with options that make a few steps do visible work.
OURS = [
    pytest.param(AdamP, dict(lr=1e-2), id="AdamP"),
    pytest.param(SGDP, dict(lr=0.1, momentum=0.9, nesterov=True), id="SGDP"),
    pytest.param(ApolloDQN, dict(lr=1e-2, warmup=0), id="ApolloDQN"),
    pytest.param(ApolloW, dict(lr=1e-2, warmup=0, rebound="belief"), id="ApolloW-belief"),
]
WITH_ADAMW = OURS + [pytest.param(AdamW, dict(lr=1e-2), id="AdamW")]


def _named(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        ("layer.weight", torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64).to(dtype))),
        ("layer.bias", torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64).to(dtype))),
    ]


def _grads(named, step: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for _, p in named:
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)


def _snapshot(opt, named) -> dict:
    inner = getattr(opt, "optimizer", opt)
    return {
        "params": [p.detach().clone() for _, p in named],
        "state": {
            i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inner.state[p].items()}
            for i, (_, p) in enumerate(named) if p in inner.state
        },
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups],
    }


def _assert_same(a: dict, b: dict) -> None:
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y)
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for k in a["state"][i]:
            x, y = a["state"][i][k], b["state"][i][k]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert a["groups"] == b["groups"]


def _all_finite(opt, named) -> bool:
    inner = getattr(opt, "optimizer", opt)
    tensors = [p for _, p in named] + [
        v for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
    ]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# --------------------------------------------------------------------------------------------------------
# Item 5: numeric strings (YAML's `lr: 1e-3`) are refused at construction, naming option, value and type
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda ps: AdamP(ps, lr="1e-3"), "lr must be a number, got '1e-3' (str)"),
        (lambda ps: AdamP(ps, eps="1e-8"), "eps must be a number, got '1e-8' (str)"),
        (lambda ps: AdamP(ps, betas=("0.9", 0.999)), "betas[0] must be a number, got '0.9' (str)"),
        (lambda ps: AdamP(ps, weight_decay="0.1"), "weight_decay must be a number, got '0.1' (str)"),
        (lambda ps: AdamP(ps, nesterov="yes"), "nesterov must be a bool, got 'yes' (str)"),
        (lambda ps: SGDP(ps, lr="0.1"), "lr must be a number, got '0.1' (str)"),
        (lambda ps: SGDP(ps, lr=0.1, momentum="0.9"), "momentum must be a number, got '0.9' (str)"),
        (lambda ps: ApolloDQN(ps, lr="1e-2"), "lr must be a number, got '1e-2' (str)"),
        (lambda ps: ApolloDQN(ps, beta="0.9"), "beta must be a number, got '0.9' (str)"),
        (lambda ps: ApolloDQN(ps, warmup="10"), "warmup must be an integer >= 0, got '10' (str)"),
        (lambda ps: ApolloDQN(ps, init_lr="1e-5"), "init_lr must be None or a number, got '1e-5' (str)"),
        (lambda ps: ApolloW(ps, weight_decay="0.01"), "weight_decay must be a number, got '0.01' (str)"),
        (lambda ps: NormGrowthCap(AdamP(ps), tau="1.01"), "tau must be a number, got '1.01' (str)"),
        (lambda ps: NormGrowthCap(AdamP(ps), eps="1e-8"), "eps must be a number, got '1e-8' (str)"),
    ],
)
def test_numeric_strings_are_refused_at_construction(build, message):
    with pytest.raises(TypeError) as info:
        build([torch.nn.Parameter(torch.zeros(2))])
    assert str(info.value).startswith(message)
    # also a ValueError, as every bad hyperparameter was before: callers catching ValueError still do
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("cls, kwargs", OURS)
def test_numeric_string_in_an_added_group_is_refused_and_not_kept(cls, kwargs):
    opt = cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    with pytest.raises(TypeError, match=re.escape("lr must be a number, got '0.5' (str) in param_groups[1]")):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": "0.5"})
    assert len(opt.param_groups) == 1


def test_option_specs_say_what_is_wrong():
    # The declarative check itself: type first (with the type's name), then range, then finiteness.
    with pytest.raises(OptionTypeError, match=r"^lr must be a number, got None \(NoneType\) in param_groups\[2\]$"):
        check_option("lr", None, LR, " in param_groups[2]")
    with pytest.raises(ValueError, match=r"^lr must be >= 0, got -1$"):
        check_option("lr", -1, LR)
    with pytest.raises(ValueError, match=r"^lr must be finite, got inf$"):
        check_option("lr", math.inf, LR)
    check_option("lr", torch.tensor(1e-3), LR)  # a one-element tensor, as torch accepts
    with pytest.raises(OptionTypeError, match=r"one-element real tensor"):
        check_option("lr", torch.tensor([1e-3, 1e-3]), LR)
    with pytest.raises(OptionTypeError, match=r"^n must be an integer in \[1, 3\], got 2\.0 \(float\)$"):
        check_option("n", 2.0, integer(1, 3))
    with pytest.raises(ValueError, match=r"^x must be in \(0, 1\] \(why\), got 0$"):
        check_option("x", 0, real(0, 1, low_open=True, reason="why"))
    with pytest.raises(ValueError, match=re.escape("betas must be a pair (beta1, beta2), got (0.9, 0.9, 0.9)")):
        check_option("betas", (0.9, 0.9, 0.9), BETAS)
    validate_group({"lr": 0.1, "other": "not checked"}, {"lr": LR, "absent": LR})


# --------------------------------------------------------------------------------------------------------
# Item 7: a non-finite value never reaches a weight or a moment without a raise or a counted skip
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e30], ids=["nan", "inf", "1e30"])
@pytest.mark.parametrize("cls, kwargs", OURS)
def test_bad_gradient_raises_before_anything_changes(cls, kwargs, bad):
    named = _named()
    opt = cls(named, **kwargs)
    _grads(named, 0)
    opt.step()
    _grads(named, 1)
    named[0][1].grad[1, 2] = bad
    before = _snapshot(opt, named)
    with pytest.raises(RuntimeError) as info:
        opt.step()
    text = str(info.value)
    assert "'layer.weight'" in text and "'layer.bias'" not in text
    assert ("non-finite gradient (inf or nan)" in text) == (not math.isfinite(bad))
    if math.isfinite(bad):  # a finite gradient whose square overflows fp32: named as too large
        assert "gradient too large for float32 math (max |g| = 1e+30 > 1.84e+19: its square overflows)" in text
    assert "no parameter or optimizer state was changed" in text and "nonfinite='skip'" in text
    _assert_same(before, _snapshot(opt, named))


@pytest.mark.parametrize("bad", [math.nan, 1e30], ids=["nan", "1e30"])
@pytest.mark.parametrize("cls, kwargs", OURS)
def test_bad_gradient_skip_counts_and_the_weight_keeps_training(cls, kwargs, bad):
    # AdamP on a 1e30 gradient used to store exp_avg_sq = inf: every later update m / sqrt(v) was 0, so the
    # weight never moved again. Skipped, the tensor trains on as if that gradient never came.
    named = _named()
    opt = cls(named, **kwargs, nonfinite="skip")
    twin_named = _named()
    twin = cls(twin_named, **kwargs)
    for step in range(3):
        _grads(named, step)
        _grads(twin_named, step)
        if step == 1:
            named[0][1].grad[0, 0] = bad
            opt.step()  # the weight is skipped, the bias is updated
            twin_named[0][1].grad = None
            twin.step()
        else:
            opt.step()
            twin.step()
    assert opt.skipped_tensors == 1
    assert _all_finite(opt, named)
    for (_, p), (_, q) in zip(named, twin_named):
        assert torch.equal(p, q)  # the skipped tensor took exactly the steps of one that had no gradient
    before = named[0][1].detach().clone()
    _grads(named, 3)
    opt.step()
    assert (named[0][1] - before).abs().max() > 1e-4  # not frozen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_the_size_limit_is_the_compute_dtype_s(dtype):
    # bf16/fp16 parameters are updated in fp32, so their gradients are held to fp32's limit; fp64 to fp64's.
    limit = square_limit(torch.float64 if dtype == torch.float64 else torch.float32)
    p = torch.nn.Parameter(torch.ones(3, dtype=dtype))
    opt = AdamP([p])
    fits = torch.tensor([min(limit / 2, torch.finfo(dtype).max), 1.0, -1.0], dtype=torch.float64).to(dtype)
    p.grad = fits
    opt.step()
    assert torch.isfinite(opt.state[p]["exp_avg_sq"]).all()
    if dtype == torch.float64:
        p.grad = torch.tensor([limit * 2, 1.0, 1.0], dtype=dtype)
        with pytest.raises(RuntimeError, match="too large for float64 math"):
            opt.step()


def test_adamp_eps_zero_is_refused_because_it_divides_zero_by_zero():
    # Before: AdamP(eps=0) took a zero gradient to m / (sqrt(v) + 0) = 0 / 0 and wrote NaN into the weight.
    with pytest.raises(ValueError, match=r"^eps must be > 0 \(eps = 0 makes m / \(sqrt\(v\) \+ eps\) = 0/0 = nan"):
        AdamP([torch.nn.Parameter(torch.ones(3))], eps=0.0)


def test_sgdp_eps_zero_stays_finite_on_zero_gradients_and_zero_weights():
    # SGDP uses eps only as the norm floor of its projection test: a 0/0 cosine there never fires the
    # projection, so eps = 0 stays allowed; zero weights and zero gradients leave everything finite.
    p = torch.nn.Parameter(torch.zeros(3, 4))
    q = torch.nn.Parameter(torch.ones(3, 4))
    opt = SGDP([p, q], lr=0.1, momentum=0.9, eps=0.0)
    for grad in (torch.zeros(3, 4), torch.ones(3, 4)):
        p.grad, q.grad = grad.clone(), torch.zeros(3, 4)
        opt.step()
    assert _all_finite(opt, [("p", p), ("q", q)])


def test_apollo_dqn_belief_eps_zero_is_refused_constant_stays_finite():
    # Before: belief rebound, eps = 0 and a zero gradient gave D = 0 and the weight m / D = 0 / 0 = NaN.
    with pytest.raises(ValueError, match=r"^eps must be > 0 with rebound='belief'"):
        ApolloDQN([torch.nn.Parameter(torch.ones(3))], rebound="belief", eps=0.0)
    with pytest.raises(ValueError, match=r"eps must be > 0 with rebound='belief'.* in param_groups\[1\]"):
        ApolloDQN([{"params": [torch.nn.Parameter(torch.ones(3))]},
                   {"params": [torch.nn.Parameter(torch.ones(3))], "rebound": "belief"}], eps=0.0)
    p = torch.nn.Parameter(torch.ones(3))
    opt = ApolloDQN([p], rebound="constant", eps=0.0, warmup=0)  # D >= 0.01 always: fine
    for _ in range(3):
        p.grad = torch.zeros(3)
        opt.step()
    assert _all_finite(opt, [("p", p)])


@pytest.mark.parametrize("cls, kwargs", [
    pytest.param(SGDP, dict(lr=10.0, momentum=0.9), id="SGDP"),
    pytest.param(ApolloDQN, dict(lr=10.0, warmup=0), id="ApolloDQN"),
])
def test_fp16_weight_that_would_overflow_raises_instead_of_becoming_inf(cls, kwargs):
    # fp16 holds at most 65504; the fp32 result of a big step used to be rounded to inf.
    p = torch.nn.Parameter(torch.full((4,), 60000.0, dtype=torch.float16))
    opt = cls([("w", p)], **kwargs)
    with pytest.raises(RuntimeError, match=r"the updated weight of 'w' does not fit float16 \(max \|w\| = "):
        for _ in range(20):
            p.grad = torch.full((4,), -30000.0, dtype=torch.float16)
            opt.step()
    assert torch.isfinite(p).all()


# --------------------------------------------------------------------------------------------------------
# Item 6: load_state_dict trusts nothing it loads
# --------------------------------------------------------------------------------------------------------


def _trained(cls, kwargs, seed=0, steps=2):
    named = _named(seed)
    opt = cls(named, **kwargs)
    for step in range(steps):
        _grads(named, step)
        opt.step()
    return named, opt


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "cls, kwargs, key, value, message",
    [
        (AdamP, dict(lr=1e-2), "lr", -1.0, "lr must be >= 0, got -1.0"),
        (AdamP, dict(lr=1e-2), "betas", (0.9, 1.5), "betas[1] must be in [0, 1), got 1.5"),
        (AdamP, dict(lr=1e-2), "nonfinite", "ignore", "nonfinite must be one of 'raise', 'skip', got 'ignore'"),
        (AdamP, dict(lr=1e-2), "lr", "1e-3", "lr must be a number, got '1e-3' (str)"),
        (SGDP, dict(lr=0.1, momentum=0.9), "momentum", 1.0, "momentum must be in [0, 1), got 1.0"),
        (SGDP, dict(lr=0.1, momentum=0.9, nesterov=True), "dampening", 0.5,
         "nesterov=True requires momentum > 0 and dampening == 0, got momentum=0.9, dampening=0.5"),
        (ApolloDQN, dict(warmup=0), "rebound", "row", "rebound must be one of 'constant', 'belief', got 'row'"),
        (ApolloDQN, dict(warmup=0), "warmup", -1, "warmup must be an integer >= 0, got -1"),
        (ApolloDQN, dict(warmup=0), "init_lr", 1.0, "init_lr must be in [0, lr] = [0, 0.01], got 1.0"),
        (ApolloW, dict(warmup=0), "weight_decay_type", "l2", "weight_decay_type must be None or one of"),
    ],
)
def test_loaded_hyperparameters_are_validated_before_anything_changes(cls, kwargs, key, value, message):
    named, opt = _trained(cls, kwargs)
    saved = _roundtrip(opt.state_dict())
    saved["param_groups"][0][key] = value
    other_named, other = _trained(cls, kwargs, seed=1, steps=1)
    before = _snapshot(other, other_named)
    with pytest.raises(ValueError) as info:
        other.load_state_dict(saved)
    assert message in str(info.value)
    assert "in param_groups[0] of the loaded state dict" in str(info.value)
    _assert_same(before, _snapshot(other, other_named))


@pytest.mark.parametrize("cls, kwargs", OURS)
def test_checkpoint_of_another_shape_is_refused_naming_the_parameter_and_both_shapes(cls, kwargs):
    _, opt = _trained(cls, kwargs)
    saved = _roundtrip(opt.state_dict())
    gen = torch.Generator().manual_seed(3)
    other_named = [("layer.weight", torch.nn.Parameter(torch.randn(2, 6, generator=gen))),
                   ("layer.bias", torch.nn.Parameter(torch.randn(4, generator=gen)))]
    other = cls(other_named, **kwargs)
    _grads(other_named, 0)
    other.step()
    before = _snapshot(other, other_named)
    with pytest.raises(ValueError, match=re.escape("of 'layer.weight' has shape (4, 3) in the checkpoint, but "
                                                   "this optimizer needs (2, 6) (parameter shape (2, 6))")):
        other.load_state_dict(saved)
    _assert_same(before, _snapshot(other, other_named))


@pytest.mark.parametrize("cls, kwargs", OURS)
def test_checkpoint_with_nonfinite_state_or_missing_keys_is_refused(cls, kwargs):
    _, opt = _trained(cls, kwargs)
    saved = _roundtrip(opt.state_dict())
    key = next(k for k, v in saved["state"][0].items() if isinstance(v, torch.Tensor))
    poisoned = copy.deepcopy(saved)
    poisoned["state"][0][key].view(-1)[0] = math.nan
    with pytest.raises(ValueError, match=rf"state '{key}' of 'layer.weight' holds inf or nan in the checkpoint"):
        cls(_named(), **kwargs).load_state_dict(poisoned)
    partial = copy.deepcopy(saved)
    del partial["state"][0][key]
    if partial["state"][0]:
        with pytest.raises(ValueError, match=rf"state of 'layer.weight' has no '{key}'"):
            cls(_named(), **kwargs).load_state_dict(partial)


@pytest.mark.parametrize("cls, kwargs", OURS)
def test_checkpoint_with_another_group_structure_is_refused_clearly(cls, kwargs):
    _, opt = _trained(cls, kwargs)
    saved = _roundtrip(opt.state_dict())
    named = _named()
    two_groups = cls([{"params": [named[0]]}, {"params": [named[1]]}], **kwargs)
    with pytest.raises(ValueError, match=r"the checkpoint has 1 param group\(s\), this optimizer has 2"):
        two_groups.load_state_dict(saved)
    one_param = cls(_named()[:1], **kwargs)
    with pytest.raises(ValueError, match=r"param_groups\[0\] of the checkpoint has 2 parameter\(s\), this "
                                         r"optimizer's has 1"):
        one_param.load_state_dict(saved)


def test_checkpoint_from_before_the_nonfinite_option_loads_with_the_constructor_s_choice():
    named, opt = _trained(AdamP, dict(lr=1e-2))
    saved = _roundtrip(opt.state_dict())
    for group in saved["param_groups"]:
        del group["nonfinite"]
    fresh = AdamP(_named(), lr=1e-2, nonfinite="skip")
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["nonfinite"] == "skip"


def test_load_pre_hooks_run_once_and_their_result_is_what_is_checked():
    _, opt = _trained(AdamP, dict(lr=1e-2))
    saved = _roundtrip(opt.state_dict())
    saved["param_groups"][0]["lr"] = -1.0  # a pre-hook repairs it: the check must see the repaired dict
    fresh = AdamP(_named(), lr=1e-2)
    calls = []

    def repair(optimizer, state_dict):
        calls.append(1)
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.5
        return state_dict

    fresh.register_load_state_dict_pre_hook(repair)
    fresh.load_state_dict(saved)
    assert calls == [1] and fresh.param_groups[0]["lr"] == 0.5


# --------------------------------------------------------------------------------------------------------
# deepcopy / pickle keep what the optimizer needs (torch keeps only defaults, state and param_groups)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, kwargs", WITH_ADAMW)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_skip_count_and_continue_identically(cls, kwargs, how):
    # Before: a deepcopy of ApolloDQN had no skipped_tensors and its next skip raised AttributeError; one of
    # AdamW started again from 0.
    model = torch.nn.Linear(3, 4)
    opt = cls(model.named_parameters(), **kwargs, nonfinite="skip")
    for step in range(3):
        model.zero_grad()
        model(torch.randn(5, 3, generator=torch.Generator().manual_seed(step))).pow(2).sum().backward()
        if step == 1:
            model.weight.grad[0, 0] = math.nan
        opt.step()
    assert opt.skipped_tensors == 1
    pair = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    clone_model, clone = pair
    assert clone.skipped_tensors == 1
    for m, o in ((model, opt), (clone_model, clone)):
        for step in range(3, 6):
            m.zero_grad()
            m(torch.randn(5, 3, generator=torch.Generator().manual_seed(step))).pow(2).sum().backward()
            if step == 4:
                m.bias.grad[0] = math.inf
            o.step()
    assert clone.skipped_tensors == opt.skipped_tensors == 2
    for a, b in zip(model.parameters(), clone_model.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------
# Item 8 (our part): parameters on the meta device step, as torch's AdamW does (the memory estimator's dry run)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capped", [False, True], ids=["bare", "capped"])
@pytest.mark.parametrize("cls, kwargs", OURS)
def test_meta_parameters_step_and_get_state_of_the_right_shape_and_dtype(cls, kwargs, capped):
    # Before: AdamP/SGDP and any NormGrowthCap failed with "Tensor.item() cannot be called on meta tensors".
    named = [("w", torch.nn.Parameter(torch.empty(4, 3, device="meta"))),
             ("b", torch.nn.Parameter(torch.empty(3, device="meta", dtype=torch.bfloat16)))]
    opt = cls(named, **kwargs)
    if capped:
        opt = NormGrowthCap(opt)
    for _ in range(2):
        for _, p in named:
            p.grad = torch.empty(p.shape, device="meta", dtype=p.dtype)
        opt.step()
    for _, p in named:
        tensors = {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.ndim > 0}
        assert tensors and all(v.shape == p.shape and v.device.type == "meta" for v in tensors.values())
        assert all(v.dtype == torch.float32 for v in tensors.values())  # fp32 moments for the bf16 bias too


# --------------------------------------------------------------------------------------------------------
# Apollo (issue 15): loaded options and shapes, eps, gradients too large
# --------------------------------------------------------------------------------------------------------


def _apollo(named, **kwargs):
    from lowrank_opt import Apollo

    return Apollo(named, **{"rank": 2, **kwargs})


@pytest.mark.parametrize("key, value, message", [
    ("lr", -1.0, "lr must be >= 0, got -1.0"),
    ("scale_type", "row", "scale_type must be one of 'channel', 'tensor', got 'row'"),
    ("nonfinite", "ignore", "nonfinite must be one of 'raise', 'skip', got 'ignore'"),
    ("rank", 0, "rank must be >= 1"),
])
def test_apollo_validates_loaded_hyperparameters_before_anything_changes(key, value, message):
    named = [("w", torch.nn.Parameter(torch.randn(4, 3)))]
    opt = _apollo(named)
    _grads(named, 0)
    opt.step()
    saved = _roundtrip(opt.state_dict())
    saved["param_groups"][0][key] = value
    before = _snapshot(opt, named)
    with pytest.raises(ValueError, match=re.escape(message)):
        opt.load_state_dict(saved)  # on main: loads (rank=0 raises only at the next step, groups replaced)
    _assert_same(before, _snapshot(opt, named))


def test_apollo_refuses_a_checkpoint_of_another_shape_naming_the_parameter():
    a = [("w", torch.nn.Parameter(torch.randn(4, 3)))]
    opt = _apollo(a)
    _grads(a, 0)
    opt.step()
    b = [("w", torch.nn.Parameter(torch.randn(4, 5)))]
    other = _apollo(b)
    _grads(b, 0)
    other.step()
    before = _snapshot(other, b)
    # on main: loads, then the step fails with "The size of tensor a (2) must match the size of tensor b (5)"
    with pytest.raises(ValueError, match=r"'w'.*shape"):
        other.load_state_dict(_roundtrip(opt.state_dict()))
    _assert_same(before, _snapshot(other, b))


def test_apollo_eps_zero_with_a_zero_row_is_refused_or_finite():
    # On main: eps = 0 and a gradient with an all-zero row write NaN into that row (0/0 in the channel scaling).
    w = torch.nn.Parameter(torch.zeros(4, 3))
    try:
        opt = _apollo([("w", w)], eps=0.0)
    except ValueError as error:
        assert "eps" in str(error)
        return
    w.grad = torch.zeros(4, 3)
    w.grad[0] = 1.0
    opt.step()
    assert _all_finite(opt, [("w", w)])


def test_apollo_names_a_gradient_too_large_rather_than_non_finite():
    # On main: 1e30 is refused, but as "non-finite gradient (inf or nan)"; the shared policy says why.
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = _apollo([("w", w)])
    w.grad = torch.full((4, 3), 1e30)
    with pytest.raises(RuntimeError, match="gradient too large for float32 math"):
        opt.step()


@pytest.mark.parametrize("cls, kwargs", WITH_ADAMW)
def test_load_state_dict_keeps_the_skip_count(cls, kwargs):
    # The count is this object's, not the checkpoint's (which does not hold it); loading used to reset it to 0.
    named = _named()
    opt = cls(named, **kwargs, nonfinite="skip")
    _grads(named, 0)
    named[1][1].grad[0] = math.nan
    opt.step()
    opt.load_state_dict(_roundtrip(opt.state_dict()))
    assert opt.skipped_tensors == 1
