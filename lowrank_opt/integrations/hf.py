"""Hugging Face Trainer glue: our registry names next to HF's own ``--optim`` names.

Programmatic use with your own Trainer script::

    from transformers import Trainer, TrainingArguments
    from lowrank_opt.integrations.hf import optimizer_cls_and_kwargs

    args = TrainingArguments(output_dir="out", learning_rate=1e-2, optim_target_modules=["attn", "mlp"])
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("apollo", model, args, "rank=256,scale_type=channel"),
    )
    trainer.train()

The learning rate, betas (``adam_beta1/2``), ``adam_epsilon`` and ``weight_decay`` come from the
``TrainingArguments``; everything else from ``optim_args`` (HF's "key=value,key=value" string or a dict).
Weight decay is not applied to 1-D parameters (biases, norm weights), as the Trainer does.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

import torch
from torch import nn

from ..registry import (
    OPTIMIZERS, ResolvedOptimizer, available, is_registry_name, parse_name, parse_optim_args, resolve,
)
from ..targets import TargetModules

logger = logging.getLogger(__name__)


def hf_optimizer_names() -> list[str]:
    from transformers.training_args import OptimizerNames

    return [o.value for o in OptimizerNames]


def check_optim_name(name: str) -> str:
    """'ours' for a registry name, 'hf' for one of Hugging Face's; anything else fails listing both."""
    if is_registry_name(name):
        return "ours"
    hf_names = hf_optimizer_names()
    if name in hf_names:
        return "hf"
    raise ValueError(
        f"unknown --optim {name!r}. lowrank-opt names: {', '.join(available())} (each also as NAME_capped); "
        f"Hugging Face names: {', '.join(hf_names)}"
    )


def resolve_for_args(name: str, args: Any, optim_args: Union[None, str, dict] = None,
                     target_modules: Optional[TargetModules] = None) -> ResolvedOptimizer:
    """:func:`lowrank_opt.registry.resolve` under ``TrainingArguments``: the learning rate, and for the Adam
    family betas (``adam_beta1/2``) and epsilon (``adam_epsilon``), come from ``args``, as HF's own optimizers
    take them; everything else from ``optim_args`` (default ``args.optim_args``) and ``target_modules``
    (default ``args.optim_target_modules``). The Trainer's settings are not taken from ``optim_args``."""
    options = parse_optim_args(args.optim_args if optim_args is None else optim_args)
    for key, flag in (("lr", "--learning_rate"), ("weight_decay", "--weight_decay"),
                      ("betas", "--adam_beta1/--adam_beta2")):
        if key in options:
            raise ValueError(f"optim_args {key}= is not used: set {flag} instead")
    spec, _ = parse_name(name)
    defaults = {"lr": args.learning_rate}
    if "betas" in spec.options():  # Adam family: the Trainer's betas and epsilon
        defaults.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    targets = target_modules if target_modules is not None else getattr(args, "optim_target_modules", None)
    return resolve(name, options, targets, defaults=defaults)


def param_groups_for(resolved: ResolvedOptimizer, model: nn.Module, weight_decay: float) -> list[dict]:
    """Named param groups with the Trainer's weight decay on matrices only (see
    :meth:`~lowrank_opt.registry.ResolvedOptimizer.param_groups`)."""
    return resolved.param_groups(model, weight_decay)


def _training_arguments_base():
    from transformers import TrainingArguments

    return TrainingArguments


try:  # transformers is optional for the package; the class exists when it is installed
    from dataclasses import dataclass, field

    @dataclass
    class LowRankTrainingArguments(_training_arguments_base()):
        """``TrainingArguments`` whose ``optim`` also takes every lowrank-opt registry name. A registry name is
        kept in ``lowrank_optim`` (and ``optim`` set to HF's default so the Trainer's own checks pass)."""

        optim: str = field(default="apollo", metadata={
            "help": "A lowrank-opt name (apollo, apollo_mini, apollo_layerwise, apollo_mini_layerwise, apollo_dqn, "
                    "adamp, sgdp, adamw, amsgrad, NAME_capped) or any Hugging Face optim name (adamw_torch, "
                    "apollo_adamw, galore_adamw, adamw_bnb_8bit, ...)."})
        lowrank_optim: Optional[str] = field(default=None, metadata={"help": "Set from --optim; not a flag to use."})

        def __post_init__(self):
            name = getattr(self.optim, "value", self.optim)
            if check_optim_name(name) == "ours":
                self.lowrank_optim, self.optim = name, "adamw_torch"  # HF's field only takes its own names
            super().__post_init__()

except ImportError:  # pragma: no cover - exercised only without transformers
    LowRankTrainingArguments = None  # type: ignore[assignment,misc]


def optimizer_cls_and_kwargs(
    name: str, model: nn.Module, args: Any, optim_args: Union[None, str, dict] = None,
    target_modules: Optional[TargetModules] = None,
) -> tuple[type, dict]:
    """``(optimizer class, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: the kwargs carry the named
    param groups under ``params``, so the Trainer uses them instead of its own grouping. ``*_capped`` names give
    :class:`~lowrank_opt.registry.CappedOptimizer`, an optimizer class like any other."""
    resolved = resolve_for_args(name, args, optim_args, target_modules)
    kwargs = resolved.optimizer_kwargs()
    kwargs.pop("weight_decay", None)  # set per group
    kwargs["params"] = resolved.param_groups(model, args.weight_decay)
    return resolved.optimizer_cls, kwargs


def validate(name: str, model: nn.Module, args: Any) -> None:
    """Build the optimizer once, without side effects (no layer-wise hooks), so a bad name, option or
    target fails before anything is written."""
    cls, kwargs = optimizer_cls_and_kwargs(name, model, args)
    params = kwargs.pop("params")
    if kwargs.get("layerwise"):
        kwargs["layerwise"] = False
    cls(params, **kwargs)


def is_layerwise(name: str, args: Any) -> bool:
    if not is_registry_name(name):
        return name.endswith("_layerwise")
    spec, _ = parse_name(name)
    options = parse_optim_args(args.optim_args)
    return bool(options.get("layerwise", spec.defaults.get("layerwise", False)))


__all__ = [
    "LowRankTrainingArguments",
    "OPTIMIZERS",
    "check_optim_name",
    "hf_optimizer_names",
    "is_layerwise",
    "is_registry_name",
    "optimizer_cls_and_kwargs",
    "param_groups_for",
    "parse_optim_args",
    "resolve_for_args",
    "validate",
]
