"""Which optimizer an estimate is for: a name, its options and its low-rank targets, resolved once.

This is the estimator's one place that reads optimizer names and options. :func:`resolve_optimizer` turns
``(name, optim_args, target_modules)`` into a :class:`ResolvedOptimizer`; the dry run (:mod:`.dryrun`), the
analytic layouts (:mod:`.external`) and :func:`~lowrank_opt.memory.estimate` see only that object. Registry
names go through the project-wide resolver, :func:`lowrank_opt.registry.resolve` (the one train.py, the HF
and DeepSpeed glue use), so an option one path takes is never refused here; this module adds the Hugging Face
names whose state layouts :mod:`.external` computes and their aliases.

Names: every ``lowrank_opt.registry`` name (also as ``NAME_capped``: inside NormGrowthCap, ``cap_*`` options
for the cap), the Hugging Face names backed by other packages whose state layouts :mod:`.external` computes,
and the ``ALIASES`` below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from ..registry import available, build_optimizer, parse_name, parse_optim_args
from ..registry import resolve as resolve_registry
from ..targets import ALL_LINEAR, TargetModules
from .external import _EXTERNAL_KEYS, EXTERNAL_OPTIMIZERS, ExternalOptimizer

ALIASES = {  # name -> (canonical name, options it implies)
    "adamw_torch": ("adamw", {}),
    "adamw_torch_fused": ("adamw", {"fused": True}),
    "adamw_8bit": ("adamw_bnb_8bit", {}),
    "adamw_bnb": ("adamw_bnb_8bit", {}),
    "galore": ("galore_adamw", {}),
    "galore_layerwise": ("galore_adamw_layerwise", {}),
}


@dataclass(frozen=True)
class ResolvedOptimizer:
    """An optimizer choice, as the estimator needs it.

    Attributes:
        name: the name the estimate shows: canonical, with ``_capped`` for a registry optimizer in NormGrowthCap.
        options: the options over the defaults: those an alias implies, then ``optim_args`` (``cap_*`` keys, for
            NormGrowthCap, included).
        defaults: the optimizer's own defaults.
        layerwise: the name or the options ask for per-parameter updates inside backward.
        target_modules: the low-rank targets (a single string is checked to be a valid regex where used).
        external: the published state layout of an optimizer from another package; None for a registry one.
        cls: a registry optimizer's class (the inner one when capped).
        option_names: the keyword options ``cls`` accepts.
        lowrank: a registry optimizer that takes low-rank param groups.
        capped: a registry optimizer wrapped in NormGrowthCap.
    """

    name: str
    options: dict
    defaults: dict
    layerwise: bool
    target_modules: Optional[TargetModules]
    external: Optional[ExternalOptimizer] = None
    cls: Optional[type] = None
    option_names: frozenset = frozenset()
    lowrank: bool = False
    capped: bool = False

    def build(self, model: nn.Module, options: Optional[dict] = None) -> torch.optim.Optimizer:
        """The registry optimizer on ``model``, as ``lowrank_opt.registry.build_optimizer`` builds it, with
        ``options`` (default ``self.options``; ``cap_*`` keys go to NormGrowthCap)."""
        if self.external is not None:
            raise TypeError(f"{self.name} is counted from its published state layout; it is not built")
        options, cap = _split_cap_options(dict(self.options if options is None else options))
        return build_optimizer(self.name, model,
                               target_modules=(self.target_modules or ALL_LINEAR) if self.lowrank else None,
                               norm_growth_cap=cap if self.capped else None, **options)


def resolve_optimizer(name: str, optim_args: Union[None, str, dict] = None,
                      target_modules: Optional[TargetModules] = ALL_LINEAR) -> ResolvedOptimizer:
    """``(name, optim_args, target_modules)`` checked and resolved for the estimator.

    Args:
        name: a registry name (optionally ``_capped``), a Hugging Face name in ``EXTERNAL_OPTIMIZERS``, or an
            alias in ``ALIASES``; case and surrounding spaces are ignored.
        optim_args: options over the defaults, as a dict or HF's ``"k=v,k=v"`` string.
        target_modules: names, a regex or ``"all-linear"``, for optimizers with low-rank targets.

    Raises:
        ValueError: an unknown name; a malformed ``optim_args``; ``cap_*`` options without ``_capped``; an option
            an external optimizer does not take; a ``target_modules`` string that is not a valid regex. (Options
            of registry optimizers are checked by the optimizer itself when the dry run builds it.)
    """
    if not isinstance(name, str) or not name.strip():
        raise _unknown_optimizer(name)
    key = name.strip().lower()
    key, implied = ALIASES.get(key, (key, {}))
    if key in EXTERNAL_OPTIMIZERS:
        external = EXTERNAL_OPTIMIZERS[key]
        options = {**implied, **_parse_options(optim_args)}
        unknown = sorted(set(options) - _EXTERNAL_KEYS[external.layout])
        if unknown:
            raise ValueError(f"unknown optim_args key(s) {', '.join(map(repr, unknown))} for {external.name}; "
                             f"valid: {', '.join(sorted(_EXTERNAL_KEYS[external.layout]))}")
        if external.layout in ("galore", "apollo_torch"):
            _check_target_modules(target_modules)
        return ResolvedOptimizer(name=key, options=options, defaults=dict(external.defaults),
                                 layerwise=external.layerwise, target_modules=target_modules, external=external)
    try:
        spec, capped = parse_name(key)
    except ValueError:
        raise _unknown_optimizer(name) from None
    options = {**implied, **_parse_options(optim_args)}
    if spec.lowrank:
        _check_target_modules(target_modules)
    # The project-wide resolver checks the options (unknown keys, cap_* without _capped) and translates HF's
    # APOLLO keys (proj_type=std -> sort_dims=True), exactly as train.py and the Trainer glue do.
    resolved = resolve_registry(key, options, target_modules if spec.lowrank else None)
    user_keys = set(options) - {"proj", "proj_type"}
    options = {k: v for k, v in resolved.options.items() if k in user_keys or k == "sort_dims" and
               "proj_type" in options}
    options.update({"cap_" + k: v for k, v in resolved.cap.items()})
    return ResolvedOptimizer(
        name=spec.name + ("_capped" if capped else ""), options=options, defaults=dict(spec.defaults),
        layerwise=bool(options.get("layerwise", spec.defaults.get("layerwise", False))),
        target_modules=target_modules, cls=spec.cls, option_names=frozenset(spec.options()), lowrank=spec.lowrank,
        capped=capped)


def known_optimizers() -> list[str]:
    """Every optimizer name :func:`estimate` takes (registry names also with ``_capped``)."""
    return sorted(set(available()) | set(EXTERNAL_OPTIMIZERS) | set(ALIASES))


def _unknown_optimizer(name: Any) -> ValueError:
    return ValueError(f"unknown optimizer {name!r}; known: {', '.join(known_optimizers())} "
                      f"(registry names also as NAME_capped)")


def _parse_options(optim_args: Union[None, str, dict]) -> dict:
    return parse_optim_args(optim_args)


def _split_cap_options(options: dict) -> tuple[dict, dict]:
    cap = {k[len("cap_"):]: options.pop(k) for k in list(options) if k.startswith("cap_")}
    return options, cap


def _check_target_modules(target_modules: Optional[TargetModules]) -> None:
    """A single string is a regex that must match whole module names (HF's rule), so it must compile; a list's
    entries also match as names or substrings, so an entry that is no regex is not an error there."""
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as error:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression ({error}); give "
                             "a regex, module names separated by commas, or 'all-linear'") from None
