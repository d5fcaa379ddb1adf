"""One table from optimizer name to builder and defaults.

``train.py``, the Hugging Face glue and the memory estimator all read this table, so a name means the same
thing everywhere. Any name may take the suffix ``_capped`` (or the option ``norm_growth_cap``) to wrap the
optimizer in :class:`~lowrank_opt.NormGrowthCap`.

Example:
    >>> from lowrank_opt.registry import build_optimizer
    >>> opt = build_optimizer("apollo", model, lr=1e-2, rank=128)             # low-rank on all linear layers
    >>> opt = build_optimizer("adamp_capped", model.parameters(), lr=1e-3)     # AdamP inside NormGrowthCap
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from .apollo import Apollo
from .classic import SGDP, AdamP, ApolloDQN, ApolloW
from .norm_growth import NormGrowthCap
from .targets import TargetModules, lowrank_param_groups

CAPPED_SUFFIX = "_capped"


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one named optimizer."""

    name: str
    cls: type  # the torch.optim.Optimizer subclass that is built
    defaults: dict = field(default_factory=dict)  # applied before the user's options
    lowrank: bool = False  # takes low-rank param groups (target modules) when given a model
    description: str = ""

    def options(self) -> set[str]:
        """The keyword options the optimizer accepts."""
        return {n for n in inspect.signature(self.cls.__init__).parameters if n not in ("self", "params")}


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in [
        OptimizerSpec("apollo", Apollo, dict(lr=1e-2, rank=256, scale_type="channel", scale=1.0, update_proj_gap=200),
                      lowrank=True, description="APOLLO, channel-wise scaling (arXiv 2412.05270)"),
        OptimizerSpec("apollo_mini", Apollo, dict(lr=1e-2, rank=1, scale_type="tensor", scale=128.0, update_proj_gap=200),
                      lowrank=True, description="APOLLO-Mini: rank 1, tensor-wise scaling, scale 128"),
        OptimizerSpec("apollo_layerwise", Apollo,
                      dict(lr=1e-2, rank=256, scale_type="channel", scale=1.0, update_proj_gap=200, layerwise=True),
                      lowrank=True, description="APOLLO with per-parameter updates inside backward (gradients freed)"),
        OptimizerSpec("apollo_mini_layerwise", Apollo,
                      dict(lr=1e-2, rank=1, scale_type="tensor", scale=128.0, update_proj_gap=200, layerwise=True),
                      lowrank=True, description="APOLLO-Mini with per-parameter updates inside backward"),
        OptimizerSpec("apollo_dqn", ApolloDQN, dict(lr=1e-2),
                      description="Ma et al. 2020 quasi-Newton Apollo (not low-rank APOLLO)"),
        OptimizerSpec("apollo_dqn_w", ApolloW, dict(lr=1e-2),
                      description="ApolloDQN with decoupled weight decay (ApolloW)"),
        OptimizerSpec("adamp", AdamP, dict(lr=1e-3), description="AdamP (Heo et al., ICLR 2021)"),
        OptimizerSpec("sgdp", SGDP, dict(lr=0.1, momentum=0.9, nesterov=True),
                      description="SGDP (Heo et al., ICLR 2021), Nesterov momentum 0.9 as in the paper's ImageNet runs"),
        OptimizerSpec("adamw", torch.optim.AdamW, dict(lr=1e-3), description="torch.optim.AdamW"),
        OptimizerSpec("amsgrad", torch.optim.AdamW, dict(lr=1e-3, amsgrad=True),
                      description="torch.optim.AdamW with amsgrad=True"),
    ]
}


def available() -> list[str]:
    """Every name :func:`build_optimizer` takes (each also with the ``_capped`` suffix)."""
    return sorted(OPTIMIZERS)


def parse_name(name: str) -> tuple[OptimizerSpec, bool]:
    """The spec for ``name`` and whether the ``_capped`` suffix asked for a NormGrowthCap."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {name!r}")
    key = name.strip().lower()
    capped = key.endswith(CAPPED_SUFFIX) and key not in OPTIMIZERS
    if capped:
        key = key[: -len(CAPPED_SUFFIX)]
    spec = OPTIMIZERS.get(key)
    if spec is None:
        known = ", ".join(available())
        raise ValueError(f"unknown optimizer {name!r}; known: {known} (each also as NAME{CAPPED_SUFFIX})")
    return spec, capped


def _cap_options(norm_growth_cap: Union[None, bool, dict]) -> Optional[dict]:
    if norm_growth_cap is None or norm_growth_cap is False:
        return None
    if norm_growth_cap is True:
        return {}
    if isinstance(norm_growth_cap, dict):
        return dict(norm_growth_cap)
    raise TypeError(f"norm_growth_cap must be a bool or a dict of NormGrowthCap options, got {norm_growth_cap!r}")


def build_optimizer(
    name: str,
    params: Union[nn.Module, Iterable[Any]],
    *,
    target_modules: Optional[TargetModules] = None,
    norm_growth_cap: Union[None, bool, dict] = None,
    **options: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``.

    Args:
        name: a registry name (see :func:`available`), optionally with the ``_capped`` suffix.
        params: a model, parameters, ``(name, parameter)`` pairs or param-group dicts. Given a model, a
            low-rank optimizer puts the ``target_modules`` matrices (default ``"all-linear"``) in its low-rank
            group and every other parameter in a plain AdamW group; other optimizers get
            ``model.named_parameters()``.
        target_modules: names, regexes or ``"all-linear"``; only with a model and a low-rank optimizer.
        norm_growth_cap: ``True`` or a dict of :class:`NormGrowthCap` options wraps the optimizer.
        **options: the optimizer's own keyword options, over the registry defaults. Unknown keys fail with
            the list of valid ones.
    """
    spec, capped = parse_name(name)
    cap = _cap_options(norm_growth_cap)
    if capped and cap is None:
        cap = {}
    valid = spec.options()
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for optimizer {name!r}; valid: {', '.join(sorted(valid))}"
        )
    kwargs = {**spec.defaults, **options}
    if isinstance(params, nn.Module):
        if spec.lowrank:
            params = lowrank_param_groups(params, target_modules or "all-linear")
        else:
            if target_modules is not None:
                raise ValueError(f"target_modules applies to low-rank optimizers only, not to {name!r}")
            params = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    elif target_modules is not None:
        raise ValueError("target_modules needs the model itself as params, not a list of parameters")
    optimizer = spec.cls(params, **kwargs)
    if cap is not None:
        optimizer = NormGrowthCap(optimizer, **cap)
    return optimizer


def lowrank_names() -> list[str]:
    return sorted(n for n, s in OPTIMIZERS.items() if s.lowrank)
