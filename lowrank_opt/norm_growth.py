"""NormGrowthCap: cap how fast each tensor's gradient norm may grow, around any torch optimizer.

The rule is a pure function (:func:`norm_growth_rule`) on norms; :class:`NormGrowthCap` is a wrapper that is
itself a ``torch.optim.Optimizer``: it shares the wrapped optimizer's ``param_groups``, ``state`` and
``defaults``, rescales ``p.grad`` in place, then calls the wrapped ``step()``.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, defaultdict
from typing import Any, Callable

import torch

from ._common import NONFINITE_CHOICES, check_choice, check_eps, check_grad_supported, check_param_dtypes, param_label

__all__ = ["NormGrowthCap", "norm_growth_rule", "PREV_KEY"]

logger = logging.getLogger(__name__)

PREV_KEY = "norm_growth_prev"
"""Key of the per-tensor state (a 0-d fp32 tensor: the last passed or capped norm) in ``optimizer.state[p]``."""

_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def norm_growth_rule(
    norm: torch.Tensor, prev: torch.Tensor, floor: torch.Tensor | float, *, tau: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2-5 of the NormGrowthCap rule, elementwise over finite gradient norms.

    Args:
        norm: ``||g||`` of each tensor (finite; step 1 is the caller's).
        prev: the previous passed or capped norm of each tensor, 0 before the first gradient.
        floor: ``lb * sqrt(numel)`` (or ``lb``): norms below it always pass.
        tau: allowed growth factor per step, >= 1.
        eps: added to denominators.

    Returns:
        ``(scale, new_prev, capped)``: multiply the gradient by ``scale`` (exactly 1 where not capped),
        store ``new_prev``; ``capped`` marks the tensors whose gradient was scaled down.
    """
    # 2. prev == 0: the first gradient (or the first after an all-zero one) passes and arms the cap.
    armed = prev != 0
    # 3. A norm below the floor passes: growth from a near-zero norm is not a spike.
    above_floor = norm >= floor
    # 4. Growth beyond tau: scale g to the norm tau * prev, and remember that capped norm.
    capped = armed & above_floor & (norm / (prev + eps) > tau)
    scale = torch.where(capped, tau * prev / (norm + eps), torch.ones_like(norm))
    # 5. Otherwise g passes unchanged and prev <- n.
    new_prev = torch.where(capped, scale * norm, norm)
    return scale, new_prev, capped


def _check_tau(tau: Any) -> float:
    value = float(tau)
    if not math.isfinite(value):
        raise ValueError(f"tau must be finite, got {tau}")
    if not value >= 1.0:
        raise ValueError(f"tau must be >= 1, got {tau}")
    return value


def _fp32_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    try:
        return list(torch._foreach_norm(grads, 2, dtype=torch.float32))
    except (TypeError, RuntimeError):  # torch without the dtype argument of _foreach_norm
        return [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]


class NormGrowthCap(torch.optim.Optimizer):
    """Limit the growth of each tensor's gradient norm to a factor ``tau`` per step, then run ``optimizer``.

    Per parameter with a gradient, keeping ``prev`` (the last passed or capped norm, 0 at first) in
    ``optimizer.state[p]["norm_growth_prev"]`` as a 0-d fp32 tensor:

    1. ``n = ||g||`` (in fp32). If any ``n`` is inf or nan: with ``on_nonfinite="raise"`` a ``RuntimeError``
       names the parameters and nothing (gradient, state, parameter) is changed; with ``"skip"`` the whole
       step is skipped for every parameter, counted in ``skipped_steps`` and logged as a warning.
    2. ``prev == 0``: ``g`` passes, ``prev <- n``.
    3. ``n < lb * sqrt(numel)`` (``n < lb`` when ``scale_lb=False``): ``g`` passes, ``prev <- n``.
    4. ``n / (prev + eps) > tau``: ``g <- g * tau * prev / (n + eps)``, ``prev <-`` that capped norm
       (about ``tau * prev``).
    5. Otherwise ``g`` passes, ``prev <- n``.

    Then the wrapped optimizer's ``step()`` runs on the modified ``p.grad``. All norms are computed before
    anything is modified; the step costs one host synchronisation (per device) for the non-finite check.

    This is the per-tensor substitute for global-norm gradient clipping where updates are layer-wise (each
    tensor is updated as soon as its gradient exists, so no global norm is ever available). It is off the
    Hugging Face ``Trainer``'s path of global clipping: set ``max_grad_norm=0`` if only this cap is wanted.

    The wrapper is a full ``torch.optim.Optimizer``: ``param_groups``, ``state`` and ``defaults`` are the
    wrapped optimizer's own objects (an LR scheduler on the wrapper sets the inner learning rate), and
    ``zero_grad``, ``add_param_group``, ``state_dict`` and ``load_state_dict`` forward to it. Its state dict
    is the wrapped optimizer's, with ``prev`` inside each parameter's state; a checkpoint of the bare
    optimizer loads too (every ``prev`` then restarts at 0). Hyperparameters are attributes of the wrapper
    (not group keys) so the wrapped optimizer's groups stay exactly its own.

    ``step(closure)`` evaluates the closure once, caps, then calls the inner ``step()`` without it, so
    optimizers that re-evaluate the closure (LBFGS) are not supported.

    Args:
        optimizer: the ``torch.optim.Optimizer`` to wrap.
        tau: allowed growth factor of a tensor's gradient norm per step; finite, >= 1. Default 1.01.
        lb: norm floor below which gradients always pass; >= 0. Default 1e-7.
        eps: added to denominators; >= 0. Default 1e-8.
        scale_lb: scale the floor by ``sqrt(numel)`` of the tensor. Default True.
        on_nonfinite: ``"raise"`` (default) or ``"skip"``, see step 1.

    Origin: ``NormGrowthCap`` of Optimisers.jl (PR #196, first named ``GradNormGrowthLimiter``), after the
    norm-growth limiter of Fira (Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
    Constraint?", arXiv:2410.01623), also used by APOLLO.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        tau: float = 1.01,
        lb: float = 1e-7,
        eps: float = 1e-8,
        scale_lb: bool = True,
        on_nonfinite: str = "raise",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"NormGrowthCap wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, NormGrowthCap):
            raise ValueError("optimizer is already a NormGrowthCap; wrap the inner optimizer only once")
        tau = _check_tau(tau)
        check_eps(lb, name="lb")
        check_eps(eps)
        if not isinstance(scale_lb, bool):
            raise TypeError(f"scale_lb must be a bool, got {scale_lb!r}")
        check_choice(on_nonfinite, "on_nonfinite", NONFINITE_CHOICES)

        # torch.optim.Optimizer.__init__ is not called: it would build new param_groups, and these must be the
        # wrapped optimizer's. What it sets up besides them (hook tables, the hooked step) is set up here.
        torch._C._log_api_usage_once("python.optimizer")
        self.optimizer = optimizer
        self.tau = tau
        self.lb = float(lb)
        self.eps = float(eps)
        self.scale_lb = scale_lb
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self._init_hooks()
        self._warned_capturable_if_run_uncaptured = True
        check_param_dtypes(self)

    def _init_hooks(self) -> None:
        for name in _HOOK_DICTS:
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())
        self._floor_cache: dict[tuple, torch.Tensor] = {}
        self._patch_step_function()  # runs step pre/post hooks registered on the wrapper

    # Always the wrapped optimizer's current objects: its load_state_dict replaces param_groups and state.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> defaultdict:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: defaultdict) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        # Hooks may not pickle (torch drops them too); "step" is an LR scheduler's per-instance patch.
        skip = set(_HOOK_DICTS) | {"step", "_floor_cache"}
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"{type(self).__name__}(tau={self.tau}, lb={self.lb}, eps={self.eps}, scale_lb={self.scale_lb}, "
            f"on_nonfinite={self.on_nonfinite!r},\n  optimizer=\n{inner}\n)"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict; each ``prev`` sits in its parameter's state under ``PREV_KEY``."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped optimizer, then put each ``prev`` back as fp32: torch's loader casts
        floating state to the parameter dtype, which would round the ``prev`` of a bf16 parameter."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_prevs = _saved_prevs(state_dict)
        self.optimizer.load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, prev in saved_prevs.items():
            if index < len(params):
                p = params[index]
                self.state[p][PREV_KEY] = torch.as_tensor(prev).to(device=p.device, dtype=torch.float32, copy=True)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Cap the gradients (steps 1-5 of the class docstring), then run the wrapped optimizer's step.

        Returns the closure's loss when a closure is given, else what the wrapped ``step()`` returned (None
        when the step was skipped)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            plan = self._plan()
            if plan is None:
                return loss
            for p, scale in plan.scaled:
                p.grad.mul_(scale)
        result = self.optimizer.step()
        with torch.no_grad():
            self._store_prevs(plan)
        return loss if closure is not None else result

    def _floors(self, device: torch.device, numels: tuple[int, ...]) -> torch.Tensor:
        # Cached, so the steady state pays no host-to-device copy (which would synchronise) per step.
        key = (device, numels, self.lb, self.scale_lb)
        floors = self._floor_cache.get(key)
        if floors is None:
            if len(self._floor_cache) > 16:
                self._floor_cache.clear()
            values = [self.lb * math.sqrt(n) if self.scale_lb else self.lb for n in numels]
            floors = torch.tensor(values, dtype=torch.float32).to(device)
            self._floor_cache[key] = floors
        return floors

    def _plan(self) -> "_Plan | None":
        """Steps 1-5 for every parameter with a gradient, modifying nothing. None when the step is skipped."""
        by_device: dict[torch.device, list[tuple[dict, int, torch.Tensor]]] = defaultdict(list)
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                check_grad_supported(self, group, index, p)
                by_device[p.grad.device].append((group, index, p))

        plan = _Plan()
        nonfinite_labels: list[str] = []
        for device, entries in by_device.items():
            params = [p for _, _, p in entries]
            # 1. Norms in fp32, all before anything is modified.
            norms = torch.stack(_fp32_norms([p.grad for p in params]))
            prevs = []
            for p in params:
                prev = self.state.get(p, {}).get(PREV_KEY)  # .get: touching state[p] would create an entry
                prevs.append(torch.zeros((), dtype=torch.float32, device=device) if prev is None else prev.float())
            prevs = torch.stack(prevs)
            floors = self._floors(device, tuple(p.numel() for p in params))
            scale, new_prev, capped = norm_growth_rule(norms, prevs, floors, tau=self.tau, eps=self.eps)
            # The one host synchronisation: which norms are non-finite, which gradients are scaled.
            flags = torch.stack([~torch.isfinite(norms), capped]).cpu().tolist()
            for (group, index, p), bad in zip(entries, flags[0]):
                if bad:
                    nonfinite_labels.append(param_label(group, index, p))
            plan.scaled.extend((p, scale[i]) for i, (p, is_capped) in enumerate(zip(params, flags[1])) if is_capped)
            plan.prevs.append((params, new_prev))

        if nonfinite_labels:
            labels = ", ".join(nonfinite_labels)
            if self.on_nonfinite == "raise":
                raise RuntimeError(
                    f"{type(self).__name__}.step(): non-finite gradient norm (inf or nan) for {labels}; no "
                    "gradient, parameter or optimizer state was changed. Pass on_nonfinite='skip' to skip such "
                    "steps instead, or lower the learning rate / use loss scaling."
                )
            self.skipped_steps += 1
            logger.warning(
                "%s.step(): non-finite gradient norm (inf or nan) for %s; skipped the whole step "
                "(%d step(s) skipped so far)",
                type(self).__name__,
                labels,
                self.skipped_steps,
            )
            return None
        return plan

    def _store_prevs(self, plan: "_Plan") -> None:
        # Written after the wrapped step: optimizers such as Adam initialise a parameter's state only while it
        # is empty, so a key written before their first step would stop them from creating their own.
        existing: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for params, new_prev in plan.prevs:
            for p, value in zip(params, new_prev.unbind(0)):
                state = self.state[p]
                prev = state.get(PREV_KEY)
                if isinstance(prev, torch.Tensor) and prev.dtype == torch.float32 and prev.device == value.device:
                    existing.append(prev)
                    values.append(value)
                else:
                    state[PREV_KEY] = value.clone()
        if existing:
            torch._foreach_copy_(existing, values)


class _Plan:
    __slots__ = ("scaled", "prevs")

    def __init__(self) -> None:
        self.scaled: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, 0-d scale) for capped grads
        self.prevs: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # (params, new prev per param), per device


def _saved_prevs(state_dict: dict[str, Any]) -> dict[int, Any]:
    """Position (over all groups, in order) -> saved ``prev``, for parameters whose saved state has one."""
    saved_state = state_dict.get("state", {})
    saved_ids = [pid for group in state_dict.get("param_groups", []) for pid in group.get("params", [])]
    prevs = {}
    for index, pid in enumerate(saved_ids):
        entry = saved_state.get(pid)
        if isinstance(entry, dict) and PREV_KEY in entry:
            prevs[index] = entry[PREV_KEY]
    return prevs
