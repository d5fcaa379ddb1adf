"""NormGrowthCap: the rule against hand-derived numbers, its invariants, and the optimizer interface."""

from __future__ import annotations

import copy
import io
import logging
import math
import pickle
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_opt.norm_growth import PREV_KEY, NormGrowthCap, norm_growth_rule

TAU = 1.01


def feed(grads, **kwargs):
    """Run a one-tensor NormGrowthCap(SGD(lr=1)) over ``grads``; return what the inner optimizer applied
    (read from the parameter change, the parameter reset to 0 before each step) and prev after each step."""
    p = torch.nn.Parameter(torch.zeros(len(grads[0])))
    opt = NormGrowthCap(torch.optim.SGD([p], lr=1.0), **kwargs)
    applied, prevs = [], []
    for g in grads:
        with torch.no_grad():
            p.zero_()
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        applied.append(-p.detach().clone())
        prevs.append(opt.state[p][PREV_KEY].item())
    return applied, prevs


def snapshot(opt, params):
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.clone() for p in params],
        "state": {
            i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
            for i, p in enumerate(params)
            if p in opt.state
        },
    }


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def assert_snapshot_equal(before, after):
    assert len(before["params"]) == len(after["params"])
    for x, y in zip(before["params"], after["params"]):
        assert_same(x, y)
    for x, y in zip(before["grads"], after["grads"]):
        assert (x is None) == (y is None)
        if x is not None:
            assert_same(x, y)
    assert before["state"].keys() == after["state"].keys()
    for i in before["state"]:
        assert before["state"][i].keys() == after["state"][i].keys()
        for k in before["state"][i]:
            assert_same(before["state"][i][k], after["state"][i][k])


def tiny_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(dtype)


def compute_grads(model, step, growth=1.0):
    """Deterministic loss-based gradients, multiplied by ``growth ** step`` so that norms grow and get capped."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 4, generator=gen).to(next(model.parameters()).dtype)
    loss = model(x).pow(2).mean() * growth**step
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss


# --- the rule -------------------------------------------------------------------------------------------


def test_reference_table():
    applied, prevs = feed([[0.6, 0.8], [3.0, 4.0], [0.3, 0.4], [1e-8, 0.0]], tau=TAU)
    torch.testing.assert_close(applied[0], torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(applied[1], torch.tensor([0.606, 0.808]))
    torch.testing.assert_close(applied[2], torch.tensor([0.3, 0.4]))
    torch.testing.assert_close(applied[3], torch.tensor([1e-8, 0.0]))
    assert prevs == pytest.approx([1.0, 1.01, 0.5, 1e-8], rel=1e-6)
    # Passed-through gradients are not touched at all (no multiplication by 1).
    assert_same(applied[0], torch.tensor([0.6, 0.8]))
    assert_same(applied[2], torch.tensor([0.3, 0.4]))


def test_pure_rule_matches_table():
    norm = torch.tensor([1.0, 5.0, 0.5, 1e-8, 7.0])
    prev = torch.tensor([0.0, 1.0, 1.01, 0.5, 0.0])
    floor = 1e-7 * math.sqrt(2)
    scale, new_prev, capped = norm_growth_rule(norm, prev, floor, tau=TAU, eps=1e-8)
    assert capped.tolist() == [False, True, False, False, False]
    assert scale[[0, 2, 3, 4]].tolist() == [1.0, 1.0, 1.0, 1.0]
    torch.testing.assert_close(scale[1], torch.tensor(TAU / 5))
    torch.testing.assert_close(new_prev, torch.tensor([1.0, 1.01, 0.5, 1e-8, 7.0]))


def test_prev_rearms_after_zero_gradient():
    applied, prevs = feed([[3.0, 4.0], [0.0, 0.0], [30.0, 40.0], [300.0, 400.0]], tau=TAU)
    assert prevs[1] == 0.0
    assert_same(applied[2], torch.tensor([30.0, 40.0]))  # prev == 0: passes and re-arms
    torch.testing.assert_close(applied[3], torch.tensor([30.3, 40.4]))


@pytest.mark.parametrize("scale_lb, capped", [(True, False), (False, True)])
def test_lower_bound_floor(scale_lb, capped):
    # numel 4, lb 1e-3: floor 2e-3 scaled, 1e-3 unscaled. Norm 1.5e-3 after prev 1e-6 is huge growth,
    # but passes only while under the floor.
    small = [5e-7, 5e-7, 5e-7, 5e-7]  # norm 1e-6
    grown = [7.5e-4, 7.5e-4, 7.5e-4, 7.5e-4]  # norm 1.5e-3
    applied, prevs = feed([small, grown], tau=TAU, lb=1e-3, scale_lb=scale_lb)
    if capped:
        torch.testing.assert_close(applied[1].norm(), torch.tensor(TAU * 1e-6), rtol=1e-4, atol=0)
        assert prevs[1] == pytest.approx(TAU * 1e-6, rel=1e-4)
    else:
        assert_same(applied[1], torch.tensor(grown))
        assert prevs[1] == pytest.approx(1.5e-3, rel=1e-6)


sequences = st.integers(1, 5).flatmap(
    lambda numel: st.lists(
        st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=numel, max_size=numel),
        min_size=1,
        max_size=8,
    )
)


@settings(max_examples=60, deadline=None)
@given(sequences)
def test_huge_tau_changes_nothing(grads):
    applied, _ = feed(grads, tau=1e12)
    for g, out in zip(grads, applied):
        assert_same(out, torch.tensor(g, dtype=torch.float32))


@settings(max_examples=60, deadline=None)
@given(sequences, st.sampled_from([1.0, 1.01, 1.5]))
def test_norm_grows_at_most_tau_per_step(grads, tau):
    applied, prevs = feed(grads, tau=tau)
    floor = 1e-7 * math.sqrt(len(grads[0]))
    for t in range(1, len(grads)):
        n_in = torch.tensor(grads[t]).norm().item()
        prev = prevs[t - 1]
        if prev > 0 and n_in >= floor:
            assert applied[t].norm().item() <= tau * (prev + 1e-8) * (1 + 1e-5)
        # prev tracks the norm of what was applied
        assert prevs[t] == pytest.approx(applied[t].norm().item(), rel=1e-5, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(sequences, st.sampled_from([1.0, 1.01, 2.0]))
def test_cap_is_idempotent(grads, tau):
    once, _ = feed(grads, tau=tau)
    twice, _ = feed([g.tolist() for g in once], tau=tau)
    for a, b in zip(once, twice):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-12)


# --- non-finite gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("after_steps", [0, 2])
def test_nonfinite_raise_changes_nothing(bad, after_steps):
    model = tiny_model()
    params = list(model.parameters())
    opt = NormGrowthCap(torch.optim.AdamW(model.named_parameters(), lr=1e-2))
    for t in range(after_steps):
        compute_grads(model, t)
        opt.step()
    compute_grads(model, after_steps)
    with torch.no_grad():
        model[2].weight.grad[0, 1] = bad
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"non-finite gradient \(inf or nan\) for '2\.weight'; no gradient") as info:
        opt.step()
    assert "'0.weight'" not in str(info.value)
    assert "nonfinite='skip'" in str(info.value)
    assert_snapshot_equal(before, snapshot(opt, params))
    assert len(opt.state) == (0 if after_steps == 0 else len(params))


def test_nonfinite_raise_names_unnamed_params_by_position():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3, 2))
    opt = NormGrowthCap(torch.optim.SGD([a, b], lr=1.0))
    a.grad, b.grad = torch.ones(2), torch.full((3, 2), float("inf"))
    with pytest.raises(RuntimeError, match=re.escape("for param 1 (shape (3, 2)) of its param group;")):
        opt.step()


def test_nonfinite_skip_skips_whole_step(caplog):
    model = tiny_model()
    params = list(model.parameters())
    opt = NormGrowthCap(torch.optim.AdamW(model.named_parameters(), lr=1e-2), nonfinite="skip")
    compute_grads(model, 0)
    opt.step()
    compute_grads(model, 1)
    with torch.no_grad():
        model[0].bias.grad[0] = float("nan")
    before = snapshot(opt, params)
    with caplog.at_level(logging.WARNING, logger="lowrank_opt.norm_growth"):
        assert opt.step() is None
    assert opt.skipped_steps == 1
    assert_snapshot_equal(before, snapshot(opt, params))  # AdamW's step count included: inner step not called
    assert opt.state[params[0]]["step"].item() == 1
    assert any("'0.bias'" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    compute_grads(model, 2)
    opt.step()
    assert opt.skipped_steps == 1
    assert opt.state[params[0]]["step"].item() == 2


@pytest.mark.parametrize("inner", ["adamw", "adamp"])
def test_gradient_whose_square_overflows_is_refused_like_a_nonfinite_one(inner):
    # 1e20 is finite, but its square (1e40) would make the inner second moment inf for good. The fp32 norm
    # overflows too, so this was refused before as well, but called "non-finite": the message now says why.
    from lowrank_opt.classic import AdamP

    model = tiny_model()
    params = list(model.parameters())
    make = torch.optim.AdamW if inner == "adamw" else AdamP
    opt = NormGrowthCap(make(model.named_parameters(), lr=1e-2))
    compute_grads(model, 0)
    opt.step()
    compute_grads(model, 1)
    with torch.no_grad():
        model[0].weight.grad[0, 0] = 1e20
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"gradient too large for float32 math \(max \|g\| = 1e\+20 > 1\.84e\+19: "
                                           r"its square overflows\) for '0\.weight'; no gradient"):
        opt.step()
    assert_snapshot_equal(before, snapshot(opt, params))


def test_finite_gradient_whose_norm_overflows_fp32_is_named_as_such():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = NormGrowthCap(torch.optim.SGD([("w", p)], lr=1.0))  # SGD squares nothing: only the norm matters
    p.grad = torch.full((4,), 3e38)
    with pytest.raises(RuntimeError, match=r"gradient too large: its 2-norm overflows float32 for 'w'"):
        opt.step()


def test_fp16_moments_of_torch_adamw_are_protected_but_sgd_is_not_limited():
    # torch's AdamW keeps fp16 moments for fp16 parameters: a gradient of 1e4 makes exp_avg_sq inf there.
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    opt = NormGrowthCap(torch.optim.AdamW([("w", p)], lr=1e-3, eps=1e-4), nonfinite="skip")
    p.grad = torch.full((3,), 1e4, dtype=torch.float16)
    opt.step()
    assert opt.skipped_steps == 1 and p not in opt.state
    q = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    sgd = NormGrowthCap(torch.optim.SGD([q], lr=1e-4))
    q.grad = torch.full((3,), 1e4, dtype=torch.float16)
    sgd.step()
    assert sgd.skipped_steps == 0 and torch.isfinite(q).all() and q[0].item() == pytest.approx(-1.0, rel=1e-3)


def test_load_refuses_bad_prev_and_inner_state_of_another_shape_before_changing_anything():
    model = tiny_model()
    params = list(model.parameters())
    opt = NormGrowthCap(torch.optim.AdamW(model.named_parameters(), lr=1e-2))
    compute_grads(model, 0)
    opt.step()
    saved = roundtrip(opt.state_dict())
    compute_grads(model, 1)
    opt.step()
    before = snapshot(opt, params)

    bad_prev = roundtrip(saved)
    bad_prev["state"][0][PREV_KEY] = torch.tensor(float("nan"))
    with pytest.raises(ValueError, match=rf"state '{PREV_KEY}' of '0\.weight' holds inf or nan"):
        opt.load_state_dict(bad_prev)
    wrong_prev = roundtrip(saved)
    wrong_prev["state"][1][PREV_KEY] = torch.zeros(3)
    with pytest.raises(ValueError, match=rf"state '{PREV_KEY}' of '0\.bias' has shape \(3,\) in the checkpoint, "
                                         r"but this optimizer needs \(\)"):
        opt.load_state_dict(wrong_prev)
    negative_prev = roundtrip(saved)
    negative_prev["state"][2][PREV_KEY] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match=rf"{PREV_KEY} of '2\.weight' is -1\.0 in the checkpoint; a norm is >= 0"):
        opt.load_state_dict(negative_prev)
    # torch's own loader would take this and fail later inside AdamW's math; refused here, naming both shapes
    other = roundtrip(saved)
    other["state"][0]["exp_avg"] = torch.zeros(2, 6)
    with pytest.raises(ValueError, match=r"AdamW\.load_state_dict: state 'exp_avg' of '0\.weight' has shape \(2, 6\) "
                                         r"in the checkpoint, but this optimizer needs \(3, 4\)"):
        opt.load_state_dict(other)
    assert_snapshot_equal(before, snapshot(opt, params))
    opt.load_state_dict(saved)  # the good one still loads
    assert opt.state[params[0]]["step"].item() == 1


def test_inner_optimizer_of_ours_checks_its_groups_through_the_wrapper():
    from lowrank_opt.classic import AdamP

    model = tiny_model()
    opt = NormGrowthCap(AdamP(model.named_parameters(), lr=1e-2))
    compute_grads(model, 0)
    opt.step()
    saved = roundtrip(opt.state_dict())
    saved["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -1\.0 in param_groups\[0\] of the loaded state dict"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 1e-2


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_identically_and_drop_hooks(how):
    model = tiny_model()
    opt = NormGrowthCap(torch.optim.AdamW(model.parameters(), lr=1e-2), tau=1.05, nonfinite="skip")
    opt.register_step_pre_hook(lambda o, args, kwargs: None)
    for t in range(3):
        compute_grads(model, t, growth=1.5)
        opt.step()
    clone_model, clone = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    assert len(clone._optimizer_step_pre_hooks) == 0 and len(opt._optimizer_step_pre_hooks) == 1
    for m, o in ((model, opt), (clone_model, clone)):
        for t in range(3, 6):
            compute_grads(m, t, growth=1.5)
            o.step()
    for a, b in zip(model.parameters(), clone_model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a][PREV_KEY], clone.state[b][PREV_KEY])


# --- identical to the wrapped optimizer when the cap never binds ----------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01),
    ],
    ids=["AdamW", "SGD"],
)
def test_huge_tau_trajectory_equals_bare_optimizer(make):
    bare_model, wrapped_model = tiny_model(), tiny_model()
    bare = make(bare_model.parameters())
    wrapped = NormGrowthCap(make(wrapped_model.parameters()), tau=1e9)
    for t in range(10):
        for model, opt in ((bare_model, bare), (wrapped_model, wrapped)):
            compute_grads(model, t)
            opt.step()
    for a, b in zip(bare_model.parameters(), wrapped_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(bare_model.parameters(), wrapped_model.parameters()):
        sa, sb = bare.state[a], wrapped.state[b]
        assert set(sb) == set(sa) | {PREV_KEY}
        for k in sa:
            assert_same(sa[k], sb[k])


# --- checkpoints ----------------------------------------------------------------------------------------


def roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_resume(dtype):
    n_steps, m_steps, growth = 4, 4, 1.5

    def make(model):
        return NormGrowthCap(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), tau=1.05)

    ref_model = tiny_model(dtype)
    ref = make(ref_model)
    capped_steps = set()
    for t in range(n_steps + m_steps):
        compute_grads(ref_model, t, growth)
        norms = [p.grad.float().norm() for p in ref_model.parameters()]
        ref.step()
        if any(p.grad.float().norm() < n * 0.99 for p, n in zip(ref_model.parameters(), norms)):
            capped_steps.add(t)
    assert capped_steps & set(range(n_steps)) and capped_steps & set(range(n_steps, n_steps + m_steps))

    model = tiny_model(dtype)
    opt = make(model)
    for t in range(n_steps):
        compute_grads(model, t, growth)
        opt.step()
    saved = roundtrip(opt.state_dict())
    assert all(entry[PREV_KEY].dtype == torch.float32 for entry in saved["state"].values())

    resumed_model = tiny_model(dtype, seed=123)
    with torch.no_grad():
        for dst, src in zip(resumed_model.parameters(), model.parameters()):
            dst.copy_(src)
    resumed = make(resumed_model)
    resumed.load_state_dict(saved)
    for p, q in zip(resumed_model.parameters(), model.parameters()):
        assert resumed.state[p][PREV_KEY].dtype == torch.float32
        assert torch.equal(resumed.state[p][PREV_KEY], opt.state[q][PREV_KEY])
    for t in range(n_steps, n_steps + m_steps):
        compute_grads(resumed_model, t, growth)
        resumed.step()

    for a, b in zip(ref_model.parameters(), resumed_model.parameters()):
        assert a.dtype == dtype
        assert torch.equal(a, b)
    for a, b in zip(ref_model.parameters(), resumed_model.parameters()):
        assert torch.equal(ref.state[a][PREV_KEY], resumed.state[b][PREV_KEY])


def test_state_dict_is_the_inner_format_plus_prev():
    model = tiny_model()
    opt = NormGrowthCap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    compute_grads(model, 0)
    opt.step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    for entry in sd["state"].values():
        assert set(entry) == {"momentum_buffer", PREV_KEY}
        assert entry[PREV_KEY].shape == () and entry[PREV_KEY].dtype == torch.float32


def test_loads_a_bare_optimizer_checkpoint():
    model = tiny_model()
    bare = torch.optim.AdamW(model.parameters(), lr=1e-2)
    compute_grads(model, 0)
    bare.step()
    opt = NormGrowthCap(torch.optim.AdamW(model.parameters(), lr=1e-2))
    opt.load_state_dict(roundtrip(bare.state_dict()))
    assert all(PREV_KEY not in opt.state[p] for p in model.parameters())
    compute_grads(model, 1, growth=100.0)  # prev restarts at 0: the first gradient passes
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
        assert opt.state[p]["step"].item() == 2
        assert opt.state[p][PREV_KEY].item() == pytest.approx(g.norm().item(), rel=1e-6)


def test_loaded_prev_does_not_alias_the_state_dict():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = NormGrowthCap(torch.optim.SGD([p], lr=1.0))
    p.grad = torch.tensor([3.0, 4.0])
    opt.step()
    sd = roundtrip(opt.state_dict())
    opt.load_state_dict(sd)
    p.grad = torch.tensor([0.3, 0.4])
    opt.step()
    assert sd["state"][0][PREV_KEY].item() == 5.0
    assert opt.state[p][PREV_KEY].item() == pytest.approx(0.5)


# --- the optimizer interface ----------------------------------------------------------------------------


def test_shares_inner_objects_and_is_an_optimizer():
    model = tiny_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = NormGrowthCap(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.optimizer is inner
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    compute_grads(model, 0)
    opt.step()
    opt.load_state_dict(roundtrip(opt.state_dict()))  # torch's loader replaces the inner lists
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5
    text = repr(opt)
    assert text.startswith("NormGrowthCap(tau=1.01, lb=1e-07, eps=1e-08, scale_lb=True, nonfinite='raise'")
    assert "AdamW (" in text


def test_lambda_lr_reaches_inner_without_warnings():
    model = tiny_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = NormGrowthCap(inner)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
        for t in range(4):
            compute_grads(model, t)
            opt.step()
            sched.step()
            assert inner.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (t + 1))
    assert sched.get_last_lr() == [pytest.approx(0.1 * 0.5**4)]


def test_cosine_annealing_and_misuse_warning():
    model = tiny_model()
    opt = NormGrowthCap(torch.optim.AdamW(model.parameters(), lr=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
        for t in range(4):
            compute_grads(model, t)
            opt.step()
            sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    # The scheduler still detects a wrong order on the wrapper.
    opt2 = NormGrowthCap(torch.optim.SGD(tiny_model().parameters(), lr=0.1))
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=4)
    with pytest.warns(UserWarning, match="before `optimizer.step\\(\\)`"):
        sched2.step()


def test_add_param_group_and_zero_grad_forward():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    inner = torch.optim.SGD([a], lr=1.0)
    opt = NormGrowthCap(inner)
    opt.add_param_group({"params": [b], "lr": 0.5})
    assert len(inner.param_groups) == 2 and inner.param_groups[1]["params"] == [b]
    assert inner.param_groups[1]["lr"] == 0.5
    for g in ([0.6, 0.8], [3.0, 4.0]):
        a.grad, b.grad = torch.tensor(g), torch.tensor(g)
        opt.step()
    torch.testing.assert_close(b.grad, torch.tensor([0.606, 0.808]))  # the new group is capped too
    assert opt.state[b][PREV_KEY].item() == pytest.approx(1.01)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(a.grad, torch.zeros(2)) and torch.equal(b.grad, torch.zeros(2))
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_hooks():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = NormGrowthCap(torch.optim.SGD([p], lr=1.0))
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load", sd.get("extra"))))
    p.grad = torch.ones(2)
    opt.step()
    assert calls == [("pre", opt), ("post", opt)]
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    assert calls[-1] == ("load", 1)


def test_global_step_hooks_fire_once_per_step_and_the_inner_optimizer_s_own_hooks_still_fire():
    # The wrapper's step() is one optimizer step: torch's global hooks see it once, with the wrapper; hooks
    # registered on the wrapped optimizer itself fire around its part of the step.
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    p = torch.nn.Parameter(torch.zeros(2))
    inner = torch.optim.SGD([p], lr=1.0)
    opt = NormGrowthCap(inner)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(("global pre", o))),
        register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(("global post", o))),
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o))),
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o))),
        inner.register_step_pre_hook(lambda o, args, kwargs: calls.append(("inner pre", o))),
        inner.register_step_post_hook(lambda o, args, kwargs: calls.append(("inner post", o))),
    ]
    try:
        p.grad = torch.ones(2)
        opt.step()
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [("global pre", opt), ("pre", opt), ("inner pre", inner), ("inner post", inner),
                     ("post", opt), ("global post", opt)]
    assert torch.equal(p.detach(), -torch.ones(2))


def test_closure():
    model = tiny_model()
    opt = NormGrowthCap(torch.optim.SGD(model.parameters(), lr=0.1), tau=1.0)
    compute_grads(model, 0)
    opt.step()
    prevs = [opt.state[p][PREV_KEY].clone() for p in model.parameters()]
    loss = opt.step(lambda: compute_grads(model, 1, growth=10.0))
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    for p, prev in zip(model.parameters(), prevs):
        assert p.grad.norm().item() <= prev.item() * (1 + 1e-5)


@pytest.mark.parametrize("shape", [(2,), (2, 0), ()])
def test_fp64_params(shape):
    # Before: "linalg.vector_norm: the dtype of the input (Double) should be convertible without narrowing".
    p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = NormGrowthCap(torch.optim.SGD([p], lr=1.0))
    grads = [torch.full(shape, 0.5, dtype=torch.float64), torch.full(shape, 5.0, dtype=torch.float64)]
    for g in grads:
        p.grad = g.clone()
        opt.step()
    prev = opt.state[p][PREV_KEY]
    assert prev.dtype == torch.float32 and p.dtype == torch.float64
    n = max(1, p.numel())
    if p.numel():  # the second gradient (norm 5 sqrt(n)) is capped to tau times the first (0.5 sqrt(n))
        assert prev.item() == pytest.approx(TAU * 0.5 * math.sqrt(n), rel=1e-6)
        assert p.grad.norm().item() == pytest.approx(TAU * 0.5 * math.sqrt(n), rel=1e-6)


def test_bf16_params():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    opt = NormGrowthCap(torch.optim.SGD([p], lr=1.0))
    for g in ([0.6, 0.8], [3.0, 4.0]):
        p.grad = torch.tensor(g, dtype=torch.bfloat16)
        opt.step()
    assert p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16
    prev = opt.state[p][PREV_KEY]
    assert prev.dtype == torch.float32 and prev.shape == ()
    assert prev.item() == pytest.approx(1.01, rel=1e-2)
    torch.testing.assert_close(p.grad.float(), torch.tensor([0.606, 0.808]), rtol=1e-2, atol=0)


def test_deepcopy_and_pickle():
    model = tiny_model()
    opt = NormGrowthCap(torch.optim.AdamW(model.parameters(), lr=1e-2), tau=1.1, nonfinite="skip")
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # patches opt.step on the instance
    compute_grads(model, 0)
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert isinstance(clone, NormGrowthCap) and clone.tau == 1.1 and clone.nonfinite == "skip"
        assert clone.param_groups is clone.optimizer.param_groups
        params = [p for g in clone.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.ones_like(p)
        clone.step()
        assert all(clone.state[p]["step"].item() == 2 for p in params)


def test_sparse_gradients_refused():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = NormGrowthCap(torch.optim.SGD(emb.parameters(), lr=0.1))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="NormGrowthCap does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"tau": 0.5}, ValueError, "tau must be >= 1, got 0.5"),
        ({"tau": float("inf")}, ValueError, "tau must be finite, got inf"),
        ({"tau": float("nan")}, ValueError, "tau must be finite, got nan"),
        ({"lb": -1.0}, ValueError, "lb must be >= 0, got -1.0"),
        ({"eps": -1e-8}, ValueError, "eps must be >= 0, got -1e-08"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite must be one of 'raise', 'skip', got 'ignore'"),
        ({"scale_lb": "yes"}, TypeError, "scale_lb must be a bool, got 'yes' (str)"),
        ({"tau": "1.01"}, TypeError, "tau must be a number, got '1.01' (str)"),
        ({"lb": "1e-7"}, TypeError, "lb must be a number, got '1e-7' (str)"),
    ],
)
def test_validation(kwargs, error, message):
    inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        NormGrowthCap(inner, **kwargs)


def test_validation_of_the_wrapped_object():
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(TypeError, match=r"^NormGrowthCap wraps a torch\.optim\.Optimizer, got list$"):
        NormGrowthCap([p])
    with pytest.raises(ValueError, match="already a NormGrowthCap"):
        NormGrowthCap(NormGrowthCap(torch.optim.SGD([p], lr=0.1)))
    with pytest.raises(TypeError, match="real floating point parameters only"):
        NormGrowthCap(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, dtype=torch.complex64))], lr=0.1))


def test_hf_trainer_accepts_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            gen = torch.Generator().manual_seed(i)
            return {"x": torch.randn(4, generator=gen), "labels": torch.randn((), generator=gen)}

    model = Model()
    opt = NormGrowthCap(torch.optim.AdamW(model.parameters(), lr=1e-2))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), optimizers=(opt, None))
        trainer.train()
    assert all(opt.state[p]["step"].item() == 3 for p in model.parameters())
    assert all(opt.state[p][PREV_KEY].item() > 0 for p in model.parameters())


def test_a_step_pre_hook_of_the_wrapped_optimizer_may_replace_its_arguments_only_by_args_and_kwargs():
    p = torch.nn.Parameter(torch.zeros(2))
    inner = torch.optim.SGD([p], lr=1.0)
    opt = NormGrowthCap(inner)
    handle = inner.register_step_pre_hook(lambda o, args, kwargs: (args, {}))  # what torch takes
    p.grad = torch.ones(2)
    opt.step()
    handle.remove()
    inner.register_step_pre_hook(lambda o, args, kwargs: "new args")
    with pytest.raises(RuntimeError, match=r"^a step pre-hook of SGD returned 'new args'; return None or a tuple"):
        opt.step()
    assert torch.equal(p.detach(), -torch.ones(2))
