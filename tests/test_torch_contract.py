"""torch's optimizer contract (issue 23), over every registry optimizer and its ``_capped`` form, each built by
``build_optimizer(name, model)`` on a tiny model:

1. a step whose group ``lr`` is 0 leaves every weight as it is, weight decay included (DCP's
   ``get_optimizer_state_dict`` creates the state of a fresh optimizer by such a step, with zero gradients);
2. ``lr`` given as a tensor trains exactly as the same float, under a scheduler that writes it in place;
3. the global step hooks fire once per ``step()``, with the optimizer that was stepped;
4. a param group added after ``load_state_dict`` or ``copy.deepcopy`` equals one added before.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lowrank_opt.registry import available, build_optimizer, parse_name

NAMES = available() + [n + "_capped" for n in available()]


@pytest.fixture(autouse=True, scope="module")
def _quiet_and_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # e.g. Apollo's note on ranks; nothing here is about logs
    yield
    logging.disable(logging.NOTSET)
    torch.set_num_threads(threads)


def _build(name: str, **options) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    if parse_name(name)[0].lowrank:
        options.setdefault("rank", 2)
    return model, build_optimizer(name, model, **options)


def _backward(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    model(x).pow(2).mean().backward()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, scheduler=None) -> None:
    for k in range(steps):
        opt.zero_grad()
        _backward(model, k)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", NAMES)
def test_a_step_with_lr_zero_leaves_the_weights(name):
    model, opt = _build(name, weight_decay=0.1)
    before = _weights(model)
    get_optimizer_state_dict(model, opt)  # a fresh optimizer: one step with lr = 0 and zero gradients
    assert opt.state and _same(_weights(model), before)

    _train(model, opt, 2)
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = _weights(model)
    _train(model, opt, 2)  # real gradients
    assert _same(_weights(model), before)


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_trains_exactly_as_the_same_float_under_a_scheduler(name):
    runs = []
    for lr in (0.01, torch.tensor(0.01, dtype=torch.float64)):  # fp64: the same number as the float
        model, opt = _build(name, lr=lr)
        _train(model, opt, 6, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5))  # writes a tensor lr in place
        runs.append(_weights(model))
    assert _same(*runs)


@pytest.mark.parametrize("name", NAMES)
def test_global_step_hooks_fire_once_per_step(name):
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])  # hooks torch's AdamW.step, which ours calls
    model, opt = _build(name)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(("global pre", o))),
        register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(("global post", o))),
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o))),
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o))),
    ]
    try:
        _train(model, opt, 2)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [("global pre", opt), ("pre", opt), ("post", opt), ("global post", opt)] * 2


@pytest.mark.parametrize("how", ["load_state_dict", "deepcopy"])
@pytest.mark.parametrize("name", NAMES)
def test_a_group_added_later_equals_one_added_before(name, how):
    def added_group(opt: torch.optim.Optimizer) -> dict:
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3, 2, dtype=torch.float64))], "param_names": ["extra"]})
        return {k: v for k, v in opt.param_groups[-1].items() if k != "params"}

    model, opt = _build(name)
    before = added_group(opt)

    model, opt = _build(name)
    _train(model, opt, 1)
    if how == "deepcopy":
        opt = copy.deepcopy(opt)
    else:
        opt.load_state_dict(opt.state_dict())
    assert added_group(opt) == before
