"""torch's AdamW (and AMSGrad) under the package's one policy: the math is ``torch.optim.AdamW``'s, unchanged;
around it the same checks every other optimizer here makes.

``torch.optim.AdamW`` itself writes NaN into the weights and moments from an inf/nan gradient, lets a finite
1e30 gradient overflow ``exp_avg_sq`` to inf (the weight then never moves again), accepts ``lr="1e-3"`` until a
scheduler multiplies it, and loads any checkpoint. :class:`AdamW` refuses each of those, as the rest of the
package does:

1. options checked by :data:`~lowrank_opt._common.validate_group` at construction and on load (numeric
   strings refused); an ``eps`` that rounds to 0 in a parameter's dtype (1e-8 in fp16) is refused, since a zero
   gradient would then give 0/0;
2. before ``torch.optim.AdamW.step`` runs, every gradient is screened (:func:`~lowrank_opt._common.
   screen_gradients`): inf/nan, or an element whose square overflows the moments' dtype (the parameter's own:
   torch keeps moments in it), raises naming the tensor before anything changes (``nonfinite="raise"``), or that
   tensor's update is skipped and counted in ``skipped_tensors`` (``"skip"``);
3. ``load_state_dict`` checks every loaded option and every state tensor's shape before anything changes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from .._common import (
    BETAS, EPS, LR, NONFINITE, WEIGHT_DECAY, StateKey, boolean, check_param_dtypes, group_where,
    load_state_dict_checked, param_label, screen_gradients, validate_group,
)
from .._common import COUNT

__all__ = ["AdamW"]

ADAMW_OPTIONS = {
    "lr": LR,
    "betas": BETAS,
    "eps": EPS,
    "weight_decay": WEIGHT_DECAY,
    "amsgrad": boolean(),
    "maximize": boolean(),
    "nonfinite": NONFINITE,
}


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with the package's checks (see the module docstring); every argument of torch's
    class is accepted, plus ``nonfinite`` (``"raise"``, default, or ``"skip"``).

    Attributes:
        skipped_tensors: tensor updates skipped for a faulty gradient.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, nonfinite: str = "raise",
                 maximize: bool = False, foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None):
        validate_group(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                            maximize=maximize, nonfinite=nonfinite), ADAMW_OPTIONS)
        self.skipped_tensors = 0
        self._nonfinite_default = nonfinite
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)
        self.defaults["nonfinite"] = nonfinite
        check_param_dtypes(self)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("nonfinite", getattr(self, "_nonfinite_default", "raise"))
        try:
            self._check_group(group, group_where(len(self.param_groups) - 1))
        except Exception:
            self.param_groups.pop()
            raise

    @staticmethod
    def _check_group(group: dict, where: str) -> None:
        validate_group(group, ADAMW_OPTIONS, where)
        for i, p in enumerate(group["params"]):
            if p.is_floating_point() and group["eps"] > 0 and torch.tensor(group["eps"], dtype=p.dtype) == 0:
                raise ValueError(f"eps={group['eps']} rounds to 0 in {p.dtype} (the dtype torch keeps AdamW's "
                                 f"moments in) for {param_label(group, i, p)}: a zero gradient would give 0/0; "
                                 "use a larger eps (e.g. 1e-7 for fp16) or fp32 master weights" + where)

    # torch keeps only defaults, state and param_groups through copy/pickle; the skip count is ours.
    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "skipped_tensors": self.skipped_tensors}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a torch.optim.AdamW checkpoint has no nonfinite: the constructor's value
            group.setdefault("nonfinite", self.defaults["nonfinite"])

    def load_state_dict(self, state_dict: dict) -> None:
        def layout(group: dict, index: int, p: torch.Tensor) -> dict:
            keys = {"step": StateKey(COUNT), "exp_avg": StateKey(tuple(p.shape)),
                    "exp_avg_sq": StateKey(tuple(p.shape))}
            keys["max_exp_avg_sq"] = StateKey(tuple(p.shape), required=False)
            return keys

        load_state_dict_checked(self, state_dict, check_group=self._check_group, layout=layout)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = [(group, i, p) for group in self.param_groups for i, p in enumerate(group["params"])
                   if p.grad is not None]
        # torch keeps the moments in the parameter's dtype: that is where a square would overflow.
        skip = screen_gradients(self, entries, dtype_of=lambda p: p.dtype)
        held = [(entries[k][2], entries[k][2].grad) for k in sorted(skip)]
        for p, _ in held:
            p.grad = None  # torch's step leaves parameters without a gradient alone
        # torch wraps torch.optim.AdamW.step with the global step hooks once one is built; they fired around this step.
        torch_step = torch.optim.AdamW.step
        try:
            (torch_step.__wrapped__ if getattr(torch_step, "hooked", False) else torch_step)(self)
        finally:
            for p, grad in held:
                p.grad = grad
        return loss
