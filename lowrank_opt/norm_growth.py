"""NormGrowthCap: cap how fast each tensor's gradient norm may grow, around any torch optimizer.

The rule is a pure function (:func:`norm_growth_rule`) on norms; :class:`NormGrowthCap` is a wrapper that is
itself a ``torch.optim.Optimizer``: it shares the wrapped optimizer's ``param_groups``, ``state`` and
``defaults``, rescales ``p.grad`` in place, then calls the wrapped ``step()``.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Optional

import torch

from ._common import (
    EPS,
    NONFINITE,
    StateKey,
    boolean,
    check_grad_supported,
    check_loaded_state,
    check_option,
    check_param_dtypes,
    compute_dtype,
    describe_fault,
    gradient_fault_flags,
    gradient_fault_message,
    norms_wide,
    param_label,
    real,
    square_limit,
)

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


# The wrapper's options (attributes of the wrapper, not group keys): checked at construction.
NORM_GROWTH_OPTIONS = {
    "lb": EPS,
    "eps": EPS,
    "scale_lb": boolean(),
    "nonfinite": NONFINITE,
}

# torch's optimizers whose every non-scalar state tensor has its parameter's shape: a checkpoint of another
# model is refused by shape before it loads (torch's own loader does not look).
_PARAM_SHAPED_STATE = tuple(
    getattr(torch.optim, name) for name in ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam")
    if hasattr(torch.optim, name)
)


def _check_tau(tau: Any) -> float:
    check_option("tau", tau, real())
    value = float(tau)
    if not math.isfinite(value):
        raise ValueError(f"tau must be finite, got {tau}")
    if not value >= 1.0:
        raise ValueError(f"tau must be >= 1, got {tau}")
    return value


def _fp32_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``||g||`` of each gradient as fp32 (computed in fp32 for fp32 and narrower gradients, in fp64 for fp64
    ones, which torch will not narrow inside the norm; a norm beyond fp32 becomes inf, a fault)."""
    if any(g.dtype == torch.float64 for g in grads):
        return [torch.linalg.vector_norm(g).float() if g.dtype == torch.float64
                else torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
    return norms_wide(grads, torch.float32)  # a bf16 gradient on CPU: no full-size fp32 copy


class NormGrowthCap(torch.optim.Optimizer):
    """Limit the growth of each tensor's gradient norm to a factor ``tau`` per step, then run ``optimizer``.

    Per parameter with a gradient, keeping ``prev`` (the last passed or capped norm, 0 at first) in
    ``optimizer.state[p]["norm_growth_prev"]`` as a 0-d fp32 tensor:

    1. ``n = ||g||`` (in fp32). A faulty gradient, one with an inf/nan, a norm beyond fp32, or an element
       whose square overflows the dtype the wrapped optimizer keeps its moments in (the package's shared
       non-finite policy): with ``nonfinite="raise"`` a ``RuntimeError`` names the parameters and why, and
       nothing (gradient, state, parameter) is changed; with ``"skip"`` the whole step is skipped for every
       parameter, counted in ``skipped_steps`` and logged as a warning.
    2. ``prev == 0``: ``g`` passes, ``prev <- n``.
    3. ``n < lb * sqrt(numel)`` (``n < lb`` when ``scale_lb=False``): ``g`` passes, ``prev <- n``.
    4. ``n / (prev + eps) > tau``: ``g <- g * tau * prev / (n + eps)``, ``prev <-`` that capped norm
       (about ``tau * prev``).
    5. Otherwise ``g`` passes, ``prev <- n``.

    Then the wrapped optimizer's ``step()`` runs on the modified ``p.grad`` (with the step hooks registered on
    it; torch's global step hooks fire once, around the wrapper's whole step). All norms are computed before
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
        nonfinite: ``"raise"`` (default) or ``"skip"``, see step 1.

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
        nonfinite: str = "raise",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"NormGrowthCap wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, NormGrowthCap):
            raise ValueError("optimizer is already a NormGrowthCap; wrap the inner optimizer only once")
        tau = _check_tau(tau)
        for name, value in (("lb", lb), ("eps", eps), ("scale_lb", scale_lb), ("nonfinite", nonfinite)):
            check_option(name, value, NORM_GROWTH_OPTIONS[name])

        # torch.optim.Optimizer.__init__ is not called: it would build new param_groups, and these must be the
        # wrapped optimizer's. What it sets up besides them (hook tables, the hooked step) is set up here.
        torch._C._log_api_usage_once("python.optimizer")
        self.optimizer = optimizer
        self.tau = tau
        self.lb = float(lb)
        self.eps = float(eps)
        self.scale_lb = scale_lb
        self.nonfinite = nonfinite
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
            f"nonfinite={self.nonfinite!r},\n  optimizer=\n{inner}\n)"
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
        floating state to the parameter dtype, which would round the ``prev`` of a bf16 parameter.

        Checked before anything changes: every ``prev`` is a finite 0-d floating tensor >= 0, and for torch's
        Adam/SGD family (whose own loader does not look) every state tensor has its parameter's shape; the
        package's optimizers check their own groups and state."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        check_loaded_state(self, state_dict, _prev_layout)
        if isinstance(self.optimizer, _PARAM_SHAPED_STATE):
            check_loaded_state(self.optimizer, state_dict, _param_shaped_layout(state_dict))
        saved_prevs = _saved_prevs(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, prev in saved_prevs.items():
            if float(prev) < 0:  # a negative norm would flip the sign of the gradients it caps
                raise ValueError(f"{type(self).__name__}.load_state_dict: {PREV_KEY} of "
                                 f"{_label_at(self, index, params)} is {float(prev)} in the checkpoint; a norm is >= 0")
        self.optimizer.load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]  # the loader may replace groups
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
        result = _step_without_global_hooks(self.optimizer)
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
        faults: list[tuple[str, str]] = []
        for device, entries in by_device.items():
            params = [p for _, _, p in entries]
            grads = [p.grad for p in params]
            # 1. Norms in fp32, all before anything is modified.
            norms = torch.stack(_fp32_norms(grads))
            prevs = []
            for p in params:
                prev = self.state.get(p, {}).get(PREV_KEY)  # .get: touching state[p] would create an entry
                prevs.append(torch.zeros((), dtype=torch.float32, device=device) if prev is None else prev.float())
            prevs = torch.stack(prevs)
            floors = self._floors(device, tuple(p.numel() for p in params))
            scale, new_prev, capped = norm_growth_rule(norms, prevs, floors, tau=self.tau, eps=self.eps)
            # A fault: an inf/nan, a norm that overflows fp32, or an element whose square overflows the dtype
            # the wrapped optimizer computes in (its second moment would become inf): the shared policy.
            if device.type == "meta":  # shapes without values (a dry run for memory): nothing to decide
                plan.prevs.append((params, new_prev))
                continue
            dtypes = [_inner_math_dtype(self.optimizer, p) for p in params]
            fault = ~torch.isfinite(norms) | gradient_fault_flags(grads, dtypes)
            # The one host synchronisation: which gradients are faulty, which are scaled.
            flags = torch.stack([fault, capped]).cpu().tolist()
            for (group, index, p), dtype, bad in zip(entries, dtypes, flags[0]):
                if bad:
                    faults.append((param_label(group, index, p), _describe(p.grad, dtype)))
            plan.scaled.extend((p, scale[i]) for i, (p, is_capped) in enumerate(zip(params, flags[1])) if is_capped)
            plan.prevs.append((params, new_prev))

        if faults:
            if self.nonfinite == "raise":
                raise RuntimeError(gradient_fault_message(
                    self, faults, effect="skip such steps",
                    changed="no gradient, parameter or optimizer state was changed",
                ))
            self.skipped_steps += 1
            logger.warning(
                "%s.step(): %s; skipped the whole step (%d step(s) skipped so far)",
                type(self).__name__,
                "; ".join(f"{reason} for {label}" for label, reason in faults),
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


def _step_without_global_hooks(optimizer: torch.optim.Optimizer) -> Any:
    """``optimizer.step()`` with the step hooks registered on ``optimizer`` but not torch's global ones: those
    fire once per step, around the wrapper's whole step (torch wraps every optimizer class's ``step`` with both)."""
    step = type(optimizer).step
    if not getattr(step, "hooked", False):  # a step torch has not wrapped fires no hooks
        return optimizer.step()
    args, kwargs = (optimizer,), {}
    for hook in optimizer._optimizer_step_pre_hooks.values():
        result = hook(optimizer, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(f"a step pre-hook of {type(optimizer).__name__} returned {result!r}; return None "
                                   "or a tuple (args, kwargs)")
            args, kwargs = result
    out = step.__wrapped__(*args, **kwargs)
    optimizer._optimizer_step_code()
    for hook in optimizer._optimizer_step_post_hooks.values():
        hook(optimizer, args, kwargs)
    return out


class _Plan:
    __slots__ = ("scaled", "prevs")

    def __init__(self) -> None:
        self.scaled: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, 0-d scale) for capped grads
        self.prevs: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # (params, new prev per param), per device


# torch's optimizers that keep a running square of the gradient in the parameter's dtype (fp16 moments for fp16
# parameters); torch's others (SGD, Adamax, Rprop, ...) square nothing.
_TORCH_SQUARING = tuple(
    getattr(torch.optim, name)
    for name in ("Adam", "AdamW", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam")
    if hasattr(torch.optim, name)
)


def _inner_math_dtype(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype whose square limit ``p``'s gradient is held to: what ``optimizer`` says (a ``math_dtype(p)``
    method, as the package's optimizers have: fp32 for 16-bit parameters); for torch's optimizers, the
    parameter's own dtype when they keep a square of the gradient, else ``None`` (no size limit); for any
    other optimizer fp32 for 16-bit parameters (they generally upcast)."""
    math_dtype = getattr(optimizer, "math_dtype", None)
    if callable(math_dtype):
        return math_dtype(p)
    if type(optimizer).__module__.startswith("torch.optim"):
        return p.dtype if isinstance(optimizer, _TORCH_SQUARING) else None
    return compute_dtype(p.dtype)


def _describe(grad: torch.Tensor, dtype: Optional[torch.dtype]) -> str:
    """Why ``grad`` was refused (error path only): inf/nan, an element whose square overflows ``dtype``, or
    (all elements fine) a 2-norm beyond fp32, which the cap cannot compare."""
    finite = bool(torch.isfinite(grad).all())
    if not finite or (dtype is not None and float(grad.abs().max().double()) > square_limit(dtype)):
        return describe_fault(grad, dtype)
    return "gradient too large: its 2-norm overflows float32"


def _prev_layout(group: dict, index: int, p: torch.Tensor) -> dict[str, StateKey]:
    return {PREV_KEY: StateKey((), required=False)}


def _param_shaped_layout(state_dict: dict[str, Any]) -> Callable[[dict, int, torch.Tensor], dict[str, StateKey]]:
    """Every state tensor of torch's Adam/SGD family that is not a 0-d scalar has its parameter's shape."""
    keys = {
        key
        for entry in state_dict.get("state", {}).values() if isinstance(entry, dict)
        for key, value in entry.items()
        if isinstance(value, torch.Tensor) and value.ndim > 0 and key != PREV_KEY
    }

    def layout(group: dict, index: int, p: torch.Tensor) -> dict[str, StateKey]:
        return {key: StateKey(tuple(p.shape), required=False) for key in keys}

    return layout


def _label_at(optimizer: torch.optim.Optimizer, index: int, params: list[torch.Tensor]) -> str:
    """The label of the parameter at ``index`` over all groups (in order)."""
    for group in optimizer.param_groups:
        if index < len(group["params"]):
            return param_label(group, index, group["params"][index])
        index -= len(group["params"])
    return f"parameter {index}"


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
