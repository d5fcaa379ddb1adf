"""AdamP and SGDP: Adam and SGD that slow down the growth of scale-invariant weights.

A weight followed by a normalization layer (BatchNorm, LayerNorm, ...) is scale-invariant: its gradient is
orthogonal to it, so every step makes it longer and the effective learning rate shrinks. AdamP and SGDP
detect such weights (the raw gradient is nearly orthogonal to the weight, row by row or as a whole) and
remove the radial part of the update, and weaken the weight decay for them by ``wd_ratio``.

Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights",
ICLR 2021, https://arxiv.org/abs/2006.08217. Numbers are held equal to the authors' ``adamp`` 0.3.0
package in ``tests/test_adamp.py``; this is an independent implementation of the formulas.

The math lives in the pure functions :func:`radial_projection`, :func:`adamp_update` and
:func:`sgdp_update`, which work on plain tensors; the optimizer classes only keep state and handle dtypes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from lowrank_opt._common import (
    BETAS,
    LR,
    NONFINITE,
    WEIGHT_DECAY,
    boolean,
    check_grad_supported,
    check_param_dtypes,
    compute_dtype,
    group_where,
    like_param,
    load_state_dict_checked,
    param_label,
    real,
    screen_gradients,
    validate_group,
    write_back_,
)

__all__ = ["AdamP", "SGDP", "radial_projection", "adamp_update", "sgdp_update"]


# --------------------------------------------------------------------------------------------------------
# Pure math
# --------------------------------------------------------------------------------------------------------


def radial_projection(
    update: torch.Tensor,
    grad: torch.Tensor,
    param: torch.Tensor,
    *,
    delta: float,
    wd_ratio: float,
    eps: float,
) -> tuple[torch.Tensor, float]:
    """Remove the radial part of ``update`` if ``param`` looks scale-invariant.

    Only tensors with ``ndim > 1`` are considered; vectors (biases, norm gains) return ``(update, 1.0)``.
    The views are tried in order, channel-wise (one row per output channel, ``reshape(shape[0], -1)``)
    then layer-wise (one row, ``reshape(1, -1)``). For a view with rows of length ``n``:

    1. ``cos_i = |<g_i, p_i>| / (max(|g_i|, eps) * max(|p_i|, eps))`` per row, on the RAW gradient.
    2. If ``max_i cos_i < delta / sqrt(n)``, the weight is taken as scale-invariant in that view:
       with ``unit_i = p_i / (|p_i| + eps)``, ``update_i <- update_i - unit_i * <unit_i, update_i>``,
       and ``(update, wd_ratio)`` is returned without trying the next view.
    3. If no view fires, ``(update, 1.0)`` is returned unchanged.

    Args:
        update: the step direction to project (same shape as ``param``); not modified.
        grad: the raw gradient, used only to decide whether to project; not modified.
        param: the current weight; not modified.
        delta: threshold on the cosine, scaled by ``1 / sqrt(row length)``.
        wd_ratio: weight-decay multiplier returned when the projection fires.
        eps: floor of the norms in the cosine, and added to the norm when normalizing the weight.

    Returns:
        ``(projected update, weight-decay ratio)``; the update is a new tensor when the projection fires.
    """
    if param.ndim <= 1 or param.numel() == 0 or param.device.type == "meta":
        return update, 1.0  # meta tensors have shapes but no values to decide on (a dry run for memory)
    for rows in (param.shape[0], 1):  # 1. channel view first, then layer view
        param_rows = param.reshape(rows, -1)
        grad_rows = grad.reshape(rows, -1)
        param_norm = torch.linalg.vector_norm(param_rows, dim=1)
        grad_norm = torch.linalg.vector_norm(grad_rows, dim=1)
        cosine = (grad_rows * param_rows).sum(dim=1).abs() / (
            grad_norm.clamp_min(eps) * param_norm.clamp_min(eps)
        )
        if cosine.max() < delta / math.sqrt(param_rows.shape[1]):
            # 2. scale-invariant in this view: drop the component of the update along each weight row
            unit = param_rows / (param_norm.unsqueeze(1) + eps)
            update_rows = update.reshape(rows, -1)
            radial = (unit * update_rows).sum(dim=1, keepdim=True)
            return (update_rows - unit * radial).reshape(param.shape), wd_ratio
    return update, 1.0  # 3. not scale-invariant: full weight decay


def adamp_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
) -> None:
    """One AdamP step on plain tensors of one dtype; updates ``param``, ``exp_avg``, ``exp_avg_sq`` in place.

    ``step`` is the 1-based index of this step (used for bias correction). The numbered steps are those of
    :class:`AdamP`.
    """
    # 1. moments
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # 2. bias-corrected direction; the first-moment correction is folded into the step size
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    step_size = lr / bias_correction1
    if nesterov:
        update = (beta1 * exp_avg + (1 - beta1) * grad) / denom
    else:
        update = exp_avg / denom
    # 3. projection, decided on the raw gradient
    update, ratio = radial_projection(update, grad, param, delta=delta, wd_ratio=wd_ratio, eps=eps)
    # 4. decoupled weight decay, weakened by wd_ratio for scale-invariant weights, before the step
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay * ratio)
    # 5. step
    param.add_(update, alpha=-step_size)


def sgdp_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
) -> None:
    """One SGDP step on plain tensors of one dtype; updates ``param`` and ``momentum_buffer`` in place.

    ``momentum_buffer`` must be given (zeros before the first step) when ``momentum > 0`` and may be
    ``None`` when ``momentum == 0``. The numbered steps are those of :class:`SGDP`; note that without
    Nesterov a fired projection is written into ``momentum_buffer`` too.
    """
    # 1. momentum; the buffer starts at zero, so step 1 gives (1 - dampening) * g, not g as in torch SGD
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError("sgdp_update needs a momentum_buffer when momentum > 0")
        momentum_buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
        update = grad + momentum * momentum_buffer if nesterov else momentum_buffer
    else:
        # with momentum 0 a buffer would only ever hold (1 - dampening) * g, so none is kept
        update = grad if dampening == 0 else grad * (1 - dampening)
    # 2. projection, decided on the raw gradient
    projected, ratio = radial_projection(update, grad, param, delta=delta, wd_ratio=wd_ratio, eps=eps)
    if momentum != 0 and not nesterov and projected is not update:
        # The authors' code projects its update in place, and without Nesterov the update IS the buffer,
        # so the buffer keeps the projected value. Kept on purpose so the numbers equal the published SGDP.
        momentum_buffer.copy_(projected)
    update = projected
    # 3. decoupled weight decay, scaled by 1 / (1 - momentum) to match the momentum's effective step
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay * ratio / (1 - momentum))
    # 4. step
    param.add_(update, alpha=-lr)


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


# One table per optimizer: checked at construction, for every added group, and on every loaded checkpoint.
_PROJECTION_OPTIONS = {
    "delta": real(0.0, finite=True),
    "wd_ratio": real(0.0, 1.0),
    "nonfinite": NONFINITE,
}

ADAMP_OPTIONS = {
    "lr": LR,
    "betas": BETAS,
    # AdamP divides m by sqrt(v) + eps: with eps = 0 an entry whose gradient has been 0 so far gives 0/0.
    "eps": real(0.0, low_open=True, finite=True,
                reason="eps = 0 makes m / (sqrt(v) + eps) = 0/0 = nan where every gradient so far was 0"),
    "weight_decay": WEIGHT_DECAY,
    "nesterov": boolean(),
    **_PROJECTION_OPTIONS,
}

SGDP_OPTIONS = {
    "lr": LR,
    "momentum": real(0.0, 1.0, high_open=True),  # < 1: the weight decay divides by (1 - momentum)
    "dampening": real(0.0, 1.0),
    "weight_decay": WEIGHT_DECAY,
    "nesterov": boolean(),
    # only the norm floor of the projection: with eps = 0 a zero norm gives a nan cosine, which never fires
    "eps": real(0.0, finite=True),
    **_PROJECTION_OPTIONS,
}


def _check_adamp_hyperparameters(hp: dict, where: str = "") -> None:
    validate_group(hp, ADAMP_OPTIONS, where)


def _check_sgdp_hyperparameters(hp: dict, where: str = "") -> None:
    validate_group(hp, SGDP_OPTIONS, where)
    if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
        raise ValueError(
            "nesterov=True requires momentum > 0 and dampening == 0, "
            f"got momentum={hp['momentum']}, dampening={hp['dampening']}{where}"
        )


def _math_dtype(param: torch.Tensor) -> torch.dtype:
    """fp32 for low-precision parameters (bf16, fp16, ...), else the parameter's own dtype."""
    return compute_dtype(param.dtype)


def _zeros_for(param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param, dtype=_math_dtype(param), memory_format=torch.preserve_format)


class _ProjectedOptimizer(torch.optim.Optimizer):
    """What AdamP and SGDP share: groups validated when added and when loaded, the shared non-finite
    policy, checkpoints checked against the parameters and loaded keeping their state dtypes."""

    _state_layout = staticmethod(like_param())  # each subclass names its state and its options
    _options: dict = {}

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self.skipped_tensors = 0  # (tensor, step) pairs skipped for a non-finite or too large gradient
        super().__init__(params, defaults)

    def _check_group(self, group: dict, where: str) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            self._check_group(self.param_groups[index], group_where(index))
            check_param_dtypes(self)
        except (ValueError, TypeError):
            self.param_groups.pop()  # a refused group must not stay half-added
            raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_state_dict_checked(self, state_dict, check_group=self._check_group, layout=self._state_layout)

    # torch keeps only defaults, state and param_groups through copy/pickle; the skip count is ours.
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "skipped_tensors": self.skipped_tensors}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch adds this option of its own optimizers here (on copy and load); it would reach groups added later.
        self.defaults.pop("differentiable", None)
        for group in self.param_groups:  # an option a loaded checkpoint lacks: the constructor's value
            for key in self._options:
                if key in self.defaults:
                    group.setdefault(key, self.defaults[key])

    def _screened(self) -> list[tuple[dict, int, torch.Tensor]]:
        """The parameters to update this step: those with a gradient, less those the non-finite policy skips
        (it raises first when a group says ``nonfinite="raise"``)."""
        entries = []
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                if p.grad is not None:
                    check_grad_supported(self, group, index, p)
                    entries.append((group, index, p))
        skip = screen_gradients(self, entries, dtype_of=self.math_dtype)
        return [entry for k, entry in enumerate(entries) if k not in skip]

    @staticmethod
    def math_dtype(p: torch.Tensor) -> torch.dtype:
        """The dtype ``p``'s update is computed in (fp32 for 16-bit parameters): what the non-finite policy
        checks gradients against, here and in a :class:`~lowrank_opt.NormGrowthCap` around this optimizer."""
        return compute_dtype(p.dtype)

    def _working_copies(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parameter and gradient in the math dtype: the tensors themselves when it is theirs."""
        dtype = _math_dtype(p)
        param = p if p.dtype == dtype else p.to(dtype)
        return param, p.grad.to(dtype)


class AdamP(_ProjectedOptimizer):
    """Adam with decoupled weight decay whose update loses its radial part on scale-invariant weights.

    For each parameter with a gradient, at step ``t``:

    1. ``m <- beta1 * m + (1 - beta1) * g``, ``v <- beta2 * v + (1 - beta2) * g^2``.
    2. ``denom = sqrt(v) / sqrt(1 - beta2^t) + eps``, ``step_size = lr / (1 - beta1^t)``,
       ``update = m / denom`` (nesterov: ``(beta1 * m + (1 - beta1) * g) / denom`` with the new ``m``).
    3. ``update, r = radial_projection(update, g, theta, delta, wd_ratio, eps)``: for ``ndim > 1``, if the
       raw gradient is nearly orthogonal to the weight (channel-wise, else layer-wise), the radial part of
       the update is removed and ``r = wd_ratio``; otherwise ``r = 1``.
    4. ``theta <- theta * (1 - lr * weight_decay * r)``.
    5. ``theta <- theta - step_size * update``.

    bf16/fp16 parameters are updated in fp32 with fp32 moments and written back in their own dtype (an fp16
    weight that would overflow 65504 raises instead). State per parameter: ``step`` (int), ``exp_avg``,
    ``exp_avg_sq``. ``load_state_dict`` checks the hyperparameters and the state shapes it is given before
    anything changes.

    Args:
        params: parameters, ``(name, parameter)`` pairs (e.g. ``model.named_parameters()``) or param groups.
        lr: learning rate (default ``1e-3``).
        betas: decay rates of the first and second moments (default ``(0.9, 0.999)``).
        eps: added to the denominator, and the norm floor of the projection; > 0, since 0 gives 0/0 where
            every gradient so far was 0 (default ``1e-8``).
        weight_decay: decoupled weight decay (default ``0``).
        delta: cosine threshold of the projection, divided by ``sqrt(row length)`` (default ``0.1``).
        wd_ratio: weight-decay multiplier for weights the projection fires on, in [0, 1] (default ``0.1``).
        nesterov: use the Nesterov form of the first moment (default ``False``).
        nonfinite: a gradient with an inf/nan, or with an element whose square overflows fp32 (fp64 for fp64
            parameters) and would turn ``exp_avg_sq`` into inf, makes ``step()`` raise before anything
            changes (``"raise"``, default), or that tensor is skipped for the step and counted in
            ``skipped_tensors`` (``"skip"``).

    Reference: Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant
    Weights", ICLR 2021, https://arxiv.org/abs/2006.08217.
    """

    _state_layout = staticmethod(like_param("exp_avg", "exp_avg_sq"))
    _options = ADAMP_OPTIONS

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
            nonfinite=nonfinite,
        )
        _check_adamp_hyperparameters(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: dict, where: str) -> None:
        _check_adamp_hyperparameters(group, where)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one AdamP step; ``closure`` (re-evaluating the loss) is run with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group, index, p in self._screened():
            beta1, beta2 = group["betas"]
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = _zeros_for(p)
                state["exp_avg_sq"] = _zeros_for(p)
            state["step"] += 1

            param, grad = self._working_copies(p)
            adamp_update(
                param,
                grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                step=state["step"],
                lr=float(group["lr"]),
                beta1=float(beta1),
                beta2=float(beta2),
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                delta=group["delta"],
                wd_ratio=group["wd_ratio"],
                nesterov=group["nesterov"],
            )
            write_back_(p, param, label=param_label(group, index, p))
        return loss


class SGDP(_ProjectedOptimizer):
    """SGD with decoupled weight decay whose update loses its radial part on scale-invariant weights.

    For each parameter with a gradient:

    1. ``buf <- momentum * buf + (1 - dampening) * g`` (``buf`` starts at zero, so unlike torch SGD the
       first step gives ``(1 - dampening) * g``); ``update = g + momentum * buf`` if nesterov else ``buf``.
       With ``momentum == 0`` no buffer is kept and ``update = (1 - dampening) * g``.
    2. ``update, r = radial_projection(update, g, theta, delta, wd_ratio, eps)`` (see :class:`AdamP`).
       Without Nesterov the update is the buffer itself, and, as in the authors' code, the buffer keeps
       the projected value when the projection fires (with Nesterov the buffer is left as it is).
    3. ``theta <- theta * (1 - lr * weight_decay * r / (1 - momentum))``.
    4. ``theta <- theta - lr * update``.

    bf16/fp16 parameters are updated in fp32 with an fp32 buffer and written back in their own dtype (an fp16
    weight that would overflow 65504 raises instead). State per parameter: ``momentum_buffer`` (only when
    ``momentum > 0``).

    Args:
        params: parameters, ``(name, parameter)`` pairs (e.g. ``model.named_parameters()``) or param groups.
        lr: learning rate (required).
        momentum: momentum factor, in [0, 1) (default ``0``).
        dampening: dampening of the gradient in the momentum, in [0, 1] (default ``0``).
        weight_decay: decoupled weight decay, divided by ``1 - momentum`` (default ``0``).
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0`` (default ``False``).
        eps: norm floor of the projection, >= 0 (default ``1e-8``).
        delta: cosine threshold of the projection, divided by ``sqrt(row length)`` (default ``0.1``).
        wd_ratio: weight-decay multiplier for weights the projection fires on, in [0, 1] (default ``0.1``).
        nonfinite: ``"raise"`` (default) or ``"skip"``, as for :class:`AdamP`.

    Reference: Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant
    Weights", ICLR 2021, https://arxiv.org/abs/2006.08217.
    """

    _state_layout = staticmethod(like_param("momentum_buffer", counts=()))
    _options = SGDP_OPTIONS

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            eps=eps,
            delta=delta,
            wd_ratio=wd_ratio,
            nonfinite=nonfinite,
        )
        _check_sgdp_hyperparameters(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: dict, where: str) -> None:
        _check_sgdp_hyperparameters(group, where)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one SGDP step; ``closure`` (re-evaluating the loss) is run with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group, index, p in self._screened():
            momentum = float(group["momentum"])
            buffer = None
            if momentum != 0:  # nothing is stored without momentum, not even an empty state
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = _zeros_for(p)
                buffer = state["momentum_buffer"]

            param, grad = self._working_copies(p)
            sgdp_update(
                param,
                grad,
                buffer,
                lr=float(group["lr"]),
                momentum=momentum,
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                eps=group["eps"],
                delta=group["delta"],
                wd_ratio=group["wd_ratio"],
            )
            write_back_(p, param, label=param_label(group, index, p))
        return loss
