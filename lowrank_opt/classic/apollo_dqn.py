"""Ma et al. 2020 Apollo, the diagonal quasi-Newton optimizer (arXiv 2009.13586).

Named ``ApolloDQN`` ("diagonal quasi-Newton") so that nobody confuses it with the low-rank APOLLO of
Zhu et al. 2024 that the rest of this package is about. The math follows the authors' code
(XuezheMax/apollo ``optim/apollo.py`` as of ``852991f``, "sigma=0.01"); see :class:`ApolloDQN`.

Published ports, checked in ``tests/test_apollo_dqn.py``:

* ``pytorch-optimizer`` (kozistr, ``pytorch_optimizer.ApolloDQN``, checked with 4.1.0): same math, but
  its step counter is incremented *before* the warmup learning rate is computed, so its step ``k`` uses
  the learning rate that the reference uses at step ``k + 1`` (step 1 is ``init_lr + (lr - init_lr) / warmup``,
  not ``init_lr``). With ``warmup=0`` (or ``init_lr == lr``) it agrees with this class for both rebound
  types and all three weight-decay types; with warmup it agrees with ``ApolloDQN(warmup=W - 1,
  init_lr=init_lr + (lr - init_lr) / W)``. It also counts steps per param group rather than per tensor
  (equal unless some tensors get no gradient on some steps), spells the L2 type ``'l2'``, and adds the L2
  term into ``p.grad`` in place.
* ``torch-optimizer`` (jettify, ``torch_optimizer.Apollo``, checked with 0.3.0): the pre-``852991f``
  code: rebound floor sigma = 1 instead of 0.01, eps not divided by sigma, L2 weight decay only, no belief
  rebound, warmup 0 and init_lr 0.01 by default. Because the direction ``d = m / max(|B|, sigma)`` is
  invariant to scaling the gradient and sigma together, it equals this class (constant rebound, L2) when its
  loss is multiplied by ``1 / 0.01 = 100`` and it is given ``eps = 100 * eps`` and
  ``weight_decay = 100 * weight_decay``; it does not agree with this class on the same loss.

Deviations from the reference code, none of which changes a result it produces:

* ``eps = 0``: the reference divides the previous direction by ``||d||_4 + eps'`` which is ``0 / 0`` on the
  first step when ``eps' = 0``. Here ``u = 0`` when ``d`` is all zero, which is what every ``eps > 0`` gives.
  With belief rebound ``eps = 0`` is refused: the denominator ``D`` is 0 whenever a gradient equals its
  running mean exactly (a gradient that is 0 from the start), and ``m / D`` is then 0/0.
* ``lr`` is validated ``>= 0`` like every optimizer in this package (the reference requires ``> 0``).
* Non-finite gradients, and gradients whose squares overflow the compute dtype, are refused (or skipped)
  before anything changes, by the package's shared policy; the reference would write NaN into the parameter
  and the state.
* ``load_state_dict`` checks the hyperparameters and the shape of every state tensor before loading.
* Parameters in bf16/fp16 are updated in fp32 with fp32 state and written back in their own dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from lowrank_opt._common import (
    BETA,
    EPS,
    LR,
    NONFINITE,
    WEIGHT_DECAY,
    check_grad_supported,
    check_option,
    check_param_dtypes,
    choice,
    compute_dtype,
    group_where,
    integer,
    like_param,
    load_state_dict_checked,
    param_label,
    real,
    screen_gradients,
    validate_group,
    write_back_,
)

__all__ = ["ApolloDQN", "ApolloW", "apollo_dqn_lr", "apollo_dqn_update_"]

REBOUND_CHOICES = ("constant", "belief")
WEIGHT_DECAY_TYPE_CHOICES = ("L2", "decoupled", "stable")

# The rebound floor of the "constant" rebound (the reference's sigma since 852991f; it was 1.0 before).
CONSTANT_REBOUND = 0.01

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def apollo_dqn_lr(steps_done: int, *, lr: float, base_lr: float, init_lr: float, warmup: int) -> float:
    """Learning rate of the next step of a tensor that has taken ``steps_done`` steps (step 1 uses ``init_lr``).

    Linear warmup from ``init_lr`` to ``base_lr`` (the constructor's ``lr``) over ``warmup`` steps, then the
    group's current ``lr``. A group that overrides ``lr`` therefore still warms up toward ``base_lr`` and
    switches to its own ``lr`` when warmup ends, as in the reference. A group whose ``lr`` is 0 gets 0 at every
    step: ``lr = 0`` freezes a group's weights in every torch optimizer (DCP creates state by such a step).
    """
    if lr == 0:
        return 0.0
    if steps_done < warmup:
        return init_lr + (base_lr - init_lr) * steps_done / warmup
    return lr


def apollo_dqn_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_grad: torch.Tensor,
    approx_hessian: torch.Tensor,
    update: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta: float,
    eps: float,
    rebound: str,
    weight_decay: float,
    weight_decay_type: str,
) -> None:
    """One Apollo step for one tensor, in place on ``param`` and the three state tensors.

    All tensors share one dtype (the caller upcasts low-precision parameters). ``step`` counts this step
    (1 on the first call); ``lr`` is the already warmed-up learning rate. The numbered comments are the steps
    of :class:`ApolloDQN`'s docstring.
    """
    if param.numel() == 0:
        return

    # 1. L2 weight decay enters the gradient.
    if weight_decay != 0 and weight_decay_type == "L2":
        grad = grad.add(param, alpha=weight_decay)

    # 2. Bias-corrected averaging weight; the only bias correction Apollo has.
    alpha = (1.0 - beta) / (1.0 - beta**step)

    # 3. Gradient change against the running mean, and the rebound floor sigma.
    delta = grad - exp_avg_grad
    if rebound == "belief":
        sigma = delta.abs().amax()
        eps_prime = eps
    else:
        sigma = CONSTANT_REBOUND
        eps_prime = eps / CONSTANT_REBOUND

    # 4. Running mean of the gradient.
    exp_avg_grad.add_(delta, alpha=alpha)

    # 5. Normalise the previous direction by its 4-norm (of the whole tensor); the buffer is free to reuse
    #    because the new direction overwrites it in step 8.
    norm = torch.linalg.vector_norm(update, ord=4).add_(eps_prime)
    if eps_prime == 0:
        # d = 0 on the first step: make u = 0, as every eps > 0 does, instead of 0 / 0.
        norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    direction = update.div_(norm)
    direction_sq = direction * direction

    # 6. Secant correction of the diagonal Hessian: c = -alpha * sum(delta * u) / n - sum(B * u^2).
    correction = delta.div_(norm).mul_(direction).sum().mul_(-alpha) - approx_hessian.mul(direction_sq).sum()
    approx_hessian.addcmul_(direction_sq, correction)

    # 7. Rectified denominator D = max(|B|, sigma) (+ eps' / alpha for belief).
    denom = approx_hessian.abs().clamp_(min=sigma)
    if rebound == "belief":
        denom.add_(eps_prime / alpha)

    # 8. New direction d = m / D (kept as state for the next step).
    torch.div(exp_avg_grad, denom, out=update)

    # 9. Decoupled / stable weight decay joins the stored direction.
    if weight_decay != 0 and weight_decay_type == "decoupled":
        update.add_(param, alpha=weight_decay)
    elif weight_decay != 0 and weight_decay_type == "stable":
        update.addcmul_(param, weight_decay / denom.mean())

    # 10. theta <- theta - lr_t * d.
    param.add_(update, alpha=-lr)


# Checked at construction, for every added group, and on every loaded checkpoint (in this order).
APOLLO_DQN_OPTIONS = {
    "lr": LR,
    "base_lr": real(0.0, finite=True),  # a float even for a tensor lr, which a scheduler may change in place
    "beta": BETA,
    "eps": EPS,
    "rebound": choice(*REBOUND_CHOICES),
    "warmup": integer(0),
    "init_lr": real(finite=True, none=True),  # its range, [0, base_lr], is checked after resolution
    "weight_decay": WEIGHT_DECAY,
    "weight_decay_type": choice(*WEIGHT_DECAY_TYPE_CHOICES, none=True),
    "nonfinite": NONFINITE,
}


class ApolloDQN(torch.optim.Optimizer):
    r"""Apollo (Ma et al. 2020): adaptive parameter-wise diagonal quasi-Newton optimizer.

    Keeps, per tensor, a running mean of the gradient ``m``, a diagonal Hessian approximation ``B`` updated
    by a weak-secant rule along the previous step, and the previous direction ``d``. With ``k`` the number of
    steps the tensor has already taken, one step is:

    0. ``lr_t = init_lr + (base_lr - init_lr) * k / warmup`` while ``k < warmup``, else the group's ``lr``
       (step 1 uses ``init_lr``; ``base_lr`` is the constructor's ``lr``); ``lr_t = 0`` while the group's
       ``lr`` is 0 (a frozen group, as in every torch optimizer).
    1. L2 weight decay: ``g <- g + weight_decay * theta``.
    2. ``k <- k + 1``; ``alpha = (1 - beta) / (1 - beta^k)``.
    3. ``delta = g - m``; constant rebound: ``sigma = 0.01``, ``eps' = eps / sigma``; belief rebound:
       ``sigma = ||delta||_inf`` (whole tensor), ``eps' = eps``.
    4. ``m <- m + alpha * delta``.
    5. ``n = ||d||_4 + eps'`` (whole tensor); ``u = d / n``.
    6. ``c = -alpha * sum(delta * u) / n - sum(B * u^2)``; ``B <- B + c * u^2``.
    7. ``D = max(|B|, sigma)``, plus ``eps' / alpha`` for belief rebound.
    8. ``d <- m / D``.
    9. Decoupled: ``d <- d + weight_decay * theta``; stable: ``d <- d + weight_decay / mean(D) * theta``
       (the stored ``d`` keeps this term and is reused in step 5 of the next step).
    10. ``theta <- theta - lr_t * d``.

    Args:
        params: parameters, named parameters (``model.named_parameters()``) or param group dicts.
        lr (float | Tensor): learning rate after warmup (default 0.01); the warmup target is its value here,
            whatever a scheduler later writes into a tensor ``lr``.
        beta (float): averaging coefficient of the gradient mean, in [0, 1) (default 0.9).
        eps (float): >= 0, and > 0 for belief rebound (default 1e-4); divided by 0.01 for constant rebound.
        rebound (str): ``"constant"`` (sigma = 0.01) or ``"belief"`` (sigma = inf-norm of the gradient change)
            (default ``"constant"``).
        warmup (int): number of linear warmup steps, >= 0 (default 500).
        init_lr (float | None): learning rate of the first step, in [0, lr] (default ``None`` -> ``lr / 1000``).
        weight_decay (float): >= 0 (default 0.0).
        weight_decay_type (str | None): ``"L2"``, ``"decoupled"`` or ``"stable"`` (default ``None`` -> ``"L2"``
            for constant rebound, ``"decoupled"`` for belief).
        nonfinite (str): what a step does with a gradient holding an inf/nan, or an element whose square
            overflows the compute dtype (fp32 for bf16/fp16/fp32 parameters): ``"raise"`` a RuntimeError
            before changing anything, or ``"skip"`` that tensor for this step, counted in
            ``skipped_tensors`` (default ``"raise"``). An fp16 weight that would overflow 65504 raises.

    Every hyperparameter lives in the param groups, together with ``base_lr`` (the target of warmup), so
    groups can override them and checkpoints carry them. ``init_lr=None`` and ``weight_decay_type=None``
    are resolved per group (from that group's ``base_lr`` and ``rebound``).

    State per tensor: ``step`` (int), ``exp_avg_grad`` (m), ``approx_hessian`` (B) and ``update`` (d), the
    last three the shape of the parameter, in fp32 for bf16/fp16 parameters and in the parameter's dtype
    otherwise.

    Reference: X. Ma, "Apollo: An Adaptive Parameter-wise Diagonal Quasi-Newton Method for Nonconvex
    Stochastic Optimization", arXiv:2009.13586; code github.com/XuezheMax/apollo (``optim/apollo.py``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        beta: float = 0.9,
        eps: float = 1e-4,
        rebound: str = "constant",
        warmup: int = 500,
        init_lr: Optional[float] = None,
        weight_decay: float = 0.0,
        weight_decay_type: Optional[str] = None,
        nonfinite: str = "raise",
    ) -> None:
        check_option("lr", lr, LR)
        defaults = dict(
            lr=lr,
            base_lr=float(lr),  # the warmup target: not the lr tensor itself, which a scheduler changes in place
            beta=beta,
            eps=eps,
            rebound=rebound,
            warmup=warmup,
            init_lr=init_lr,
            weight_decay=weight_decay,
            weight_decay_type=weight_decay_type,
            nonfinite=nonfinite,
        )
        self.skipped_tensors = 0  # (tensor, step) pairs skipped for a non-finite gradient
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._resolve_and_check(group, group_where(len(self.param_groups) - 1))
            check_param_dtypes(self)
        except (ValueError, TypeError):
            self.param_groups.pop()  # a refused group must not stay half-added
            raise

    @staticmethod
    def _resolve_and_check(group: dict, where: str) -> None:
        validate_group(group, APOLLO_DQN_OPTIONS, where)
        if group["rebound"] == "belief" and group["eps"] == 0:
            # D = max(|B|, ||delta||_inf) + eps / alpha is 0 when the gradient equals its running mean (e.g.
            # a gradient that is 0 from the start), and the new direction m / D is then 0/0.
            raise ValueError(
                "eps must be > 0 with rebound='belief' (with eps = 0 the denominator is 0 when a gradient equals "
                f"its running mean, and m / D is 0/0 = nan), got {group['eps']}{where}"
            )
        if group["init_lr"] is None:
            group["init_lr"] = group["base_lr"] / 1000.0
        init_lr = float(group["init_lr"])
        if not 0.0 <= init_lr <= float(group["base_lr"]):
            raise ValueError(f"init_lr must be in [0, lr] = [0, {group['base_lr']}], got {group['init_lr']}{where}")
        if group["weight_decay_type"] is None:
            group["weight_decay_type"] = "L2" if group["rebound"] == "constant" else "decoupled"

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint, after checking its hyperparameters and that every state tensor has its
        parameter's shape (nothing changes when either check fails)."""
        load_state_dict_checked(
            self, state_dict, check_group=self._resolve_and_check,
            layout=like_param("exp_avg_grad", "approx_hessian", "update"),
        )

    @staticmethod
    def math_dtype(p: torch.Tensor) -> torch.dtype:
        """The dtype ``p``'s update is computed in (fp32 for 16-bit parameters): what the non-finite policy
        checks gradients against, here and in a :class:`~lowrank_opt.NormGrowthCap` around this optimizer."""
        return compute_dtype(p.dtype)

    # torch keeps only defaults, state and param_groups through copy/pickle; the skip count is ours.
    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "skipped_tensors": self.skipped_tensors}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # torch adds this option of its own optimizers here (on copy and load); it would reach groups added later.
        self.defaults.pop("differentiable", None)
        for group in self.param_groups:  # an option a loaded checkpoint lacks: the constructor's value
            for key in APOLLO_DQN_OPTIONS:
                if key in self.defaults:
                    group.setdefault(key, self.defaults[key])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        entries = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    check_grad_supported(self, group, i, p)
                    entries.append((group, i, p))
        # One check of every gradient before anything changes: inf/nan, or squares that overflow fp32.
        skip = screen_gradients(self, entries, dtype_of=self.math_dtype)

        for k, (group, index, p) in enumerate(entries):
            if k in skip:
                continue
            state = self.state[p]
            low_precision = p.dtype in _LOW_PRECISION
            if len(state) == 0:
                state_dtype = torch.float32 if low_precision else p.dtype
                state["step"] = 0
                for key in ("exp_avg_grad", "approx_hessian", "update"):
                    state[key] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)

            # 0. Warmup learning rate from the steps already taken.
            lr_t = apollo_dqn_lr(
                state["step"], lr=float(group["lr"]), base_lr=float(group["base_lr"]),
                init_lr=float(group["init_lr"]), warmup=group["warmup"],
            )
            state["step"] += 1
            work_dtype = state["exp_avg_grad"].dtype
            param = p.to(work_dtype) if low_precision else p
            apollo_dqn_update_(
                param,
                p.grad.to(work_dtype),
                state["exp_avg_grad"],
                state["approx_hessian"],
                state["update"],
                step=state["step"],
                lr=lr_t,
                beta=float(group["beta"]),
                eps=group["eps"],
                rebound=group["rebound"],
                weight_decay=group["weight_decay"],
                weight_decay_type=group["weight_decay_type"],
            )
            write_back_(p, param, label=param_label(group, index, p))
        return loss


class ApolloW(ApolloDQN):
    """Apollo with decoupled weight decay: :class:`ApolloDQN` with ``weight_decay_type="decoupled"``.

    "ApolloW" is the name the authors' README tables use for exactly this configuration (their separate
    ``apollow.py`` was deleted in ``ed903ec``). Same arguments and defaults as :class:`ApolloDQN` except
    that ``weight_decay_type`` is fixed to ``"decoupled"`` (``d <- m / D + weight_decay * theta``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        beta: float = 0.9,
        eps: float = 1e-4,
        rebound: str = "constant",
        warmup: int = 500,
        init_lr: Optional[float] = None,
        weight_decay: float = 0.0,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            beta=beta,
            eps=eps,
            rebound=rebound,
            warmup=warmup,
            init_lr=init_lr,
            weight_decay=weight_decay,
            weight_decay_type="decoupled",
            nonfinite=nonfinite,
        )
