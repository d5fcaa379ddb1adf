"""Helpers shared by every optimizer in the package: validation with exact messages, parameter labels,
and a ``load_state_dict`` that keeps the saved state dtypes.

Nothing here knows about a particular algorithm.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

NONFINITE_CHOICES = ("raise", "skip")


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def check_lr(lr: Any, where: str = "") -> None:
    value = _as_float(lr)
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"lr must be >= 0, got {lr}{where}")


def check_eps(eps: Any, where: str = "", name: str = "eps") -> None:
    value = _as_float(eps)
    if not value >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {eps}{where}")


def check_beta(beta: Any, name: str, where: str = "") -> None:
    value = _as_float(beta)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {beta}{where}")


def check_betas(betas: Any, where: str = "") -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}{where}")
    check_beta(betas[0], "betas[0]", where)
    check_beta(betas[1], "betas[1]", where)


def check_weight_decay(weight_decay: Any, where: str = "") -> None:
    value = _as_float(weight_decay)
    if not value >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}{where}")


def check_choice(value: Any, name: str, choices: Iterable[str], where: str = "") -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}{where}")


def check_positive_int(value: Any, name: str, where: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}{where}")


def check_finite_positive(value: Any, name: str, where: str = "") -> None:
    v = _as_float(value)
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}{where}")


def group_where(group_index: int) -> str:
    return f" in param_groups[{group_index}]"


def param_label(group: dict, index_in_group: int, param: torch.Tensor) -> str:
    """The parameter's name when the optimizer was given named parameters, else its position and shape."""
    names = group.get("param_names")
    if names is not None and index_in_group < len(names):
        return repr(names[index_in_group])
    return f"param {index_in_group} (shape {tuple(param.shape)}) of its param group"


def check_param_dtypes(optimizer: torch.optim.Optimizer, supported: str = "real floating point") -> None:
    """Complex or integer parameters are refused at construction, naming the parameter."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p.is_complex() or not p.is_floating_point():
                raise TypeError(
                    f"{type(optimizer).__name__} supports {supported} parameters only, got dtype {p.dtype} "
                    f"for {param_label(group, i, p)}"
                )


def check_grad_supported(optimizer: torch.optim.Optimizer, group: dict, index: int, p: torch.Tensor) -> None:
    grad = p.grad
    if grad.is_sparse:
        raise RuntimeError(
            f"{type(optimizer).__name__} does not support sparse gradients, got one for "
            f"{param_label(group, index, p)}; use dense gradients (e.g. nn.Embedding(sparse=False))"
        )
    if grad.is_complex():
        raise RuntimeError(
            f"{type(optimizer).__name__} does not support complex gradients, got one for "
            f"{param_label(group, index, p)}"
        )


def nonfinite_message(optimizer: torch.optim.Optimizer, labels: list[str], option: str = "nonfinite='skip'",
                      effect: str = "skip those tensors' updates") -> str:
    return (
        f"{type(optimizer).__name__}.step(): non-finite gradient (inf or nan) for {', '.join(labels)}; "
        f"no parameter or optimizer state was changed. Pass {option} to {effect} instead, "
        "or lower the learning rate / use loss scaling."
    )


def load_state_dict_keep_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its parameter's dtype,
    which would turn fp32 moments of a bf16 parameter into bf16 on resume. Load, then put back the dtypes
    the checkpoint was saved with, so that resume is exact whatever the parameter dtype."""
    saved_state = state_dict["state"]
    torch.optim.Optimizer.load_state_dict(optimizer, state_dict)
    saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, p in zip(saved_ids, params):
        saved = saved_state.get(pid)
        if not saved or p not in optimizer.state:
            continue
        state = optimizer.state[p]
        for key, value in saved.items():
            current = state.get(key)
            if (
                isinstance(value, torch.Tensor)
                and isinstance(current, torch.Tensor)
                and value.is_floating_point()
                and current.dtype != value.dtype
            ):
                state[key] = value.to(device=p.device, copy=True)
