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
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..norm_growth import NormGrowthCap
from ..registry import OPTIMIZERS, OptimizerSpec, available, parse_name
from ..targets import TargetModules, full_ndim, lowrank_param_groups

logger = logging.getLogger(__name__)

# HF-style APOLLO keys accepted for drop-in compatibility with `--optim apollo_adamw` command lines.
_HF_APOLLO_KEYS = {"proj", "proj_type"}


def hf_optimizer_names() -> list[str]:
    from transformers.training_args import OptimizerNames

    return [o.value for o in OptimizerNames]


def is_registry_name(name: str) -> bool:
    try:
        parse_name(name)
    except ValueError:
        return False
    return True


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


def _typed(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def parse_optim_args(optim_args: Union[None, str, dict]) -> dict:
    """HF's ``--optim_args`` format ("rank=256,scale=1,scale_type=channel"), values typed (int, float,
    bool, None, else str); a dict passes through."""
    if optim_args is None or optim_args == "":
        return {}
    if isinstance(optim_args, dict):
        return dict(optim_args)
    options = {}
    for item in optim_args.replace(" ", "").split(","):
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"optim_args must be 'key=value' pairs separated by commas, got {item!r} in {optim_args!r}")
        key, value = item.split("=", 1)
        if not key:
            raise ValueError(f"optim_args has an empty key in {optim_args!r}")
        options[key] = _typed(value)
    return options


def _translate_hf_apollo_keys(options: dict) -> dict:
    """``proj``/``proj_type`` as HF's apollo_adamw takes them, mapped onto our options."""
    options = dict(options)
    proj = options.pop("proj", "random")
    if proj != "random":
        raise ValueError(f"optim_args proj={proj!r} is not supported: lowrank-opt's APOLLO uses proj=random")
    proj_type = options.pop("proj_type", None)
    if proj_type is not None:
        if proj_type not in ("std", "left"):
            raise ValueError(f"optim_args proj_type must be 'std' (compress the smaller dimension) or 'left' "
                             f"(always the rows), got {proj_type!r}")
        options.setdefault("sort_dims", proj_type == "std")
    return options


def _decay_split(named: list[tuple[str, torch.Tensor]], weight_decay: float, extra: dict) -> list[dict]:
    decay = [(n, p) for n, p in named if full_ndim(p) >= 2]  # full_ndim: also for ZeRO-3 placeholders
    no_decay = [(n, p) for n, p in named if full_ndim(p) < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, **extra})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, **extra})
    return groups


def param_groups_for(spec: OptimizerSpec, model: nn.Module, weight_decay: float,
                     target_modules: Optional[TargetModules]) -> list[dict]:
    """Named param groups: for a low-rank optimizer the target matrices (with decay) and the rest as AdamW
    (decay on matrices only); for others decay on matrices only."""
    if spec.lowrank:
        rest_group, target_group = (lowrank_param_groups(model, target_modules or "all-linear") + [None])[:2]
        if target_group is None:  # every trainable parameter is a target
            rest_group, target_group = {"params": []}, rest_group
        groups = _decay_split(rest_group["params"], weight_decay, {"rank": None})
        groups.append({"params": target_group["params"], "weight_decay": weight_decay})
        return groups
    if target_modules is not None:
        raise ValueError(f"optim_target_modules applies to low-rank optimizers only, not to {spec.name!r}")
    return _decay_split([(n, p) for n, p in model.named_parameters() if p.requires_grad], weight_decay, {})


def resolve_options(name: str, args: Any, optim_args: Union[None, str, dict] = None) -> tuple[OptimizerSpec, bool, dict]:
    """The spec, whether it is capped, and the full keyword options for ``name`` under ``args``."""
    spec, capped = parse_name(name)
    options = parse_optim_args(args.optim_args if optim_args is None else optim_args)
    if spec.cls.__name__ == "Apollo" and _HF_APOLLO_KEYS & set(options):
        options = _translate_hf_apollo_keys(options)
    for key, flag in (("lr", "--learning_rate"), ("weight_decay", "--weight_decay"), ("betas", "--adam_beta1/--adam_beta2")):
        if key in options:
            raise ValueError(f"optim_args {key}= is not used: set {flag} instead")
    cap_options = {k[len("cap_"):]: options.pop(k) for k in list(options) if k.startswith("cap_")}
    valid = spec.options()
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"unknown optim_args key(s) {', '.join(map(repr, unknown))} for --optim {name}; valid keys: "
            f"{', '.join(sorted(valid | ({'cap_tau', 'cap_lb', 'cap_eps', 'cap_on_nonfinite'} if capped else set())))}"
        )
    if cap_options and not capped:
        raise ValueError(f"optim_args {', '.join('cap_' + k for k in cap_options)} need a *_capped optimizer name")
    kwargs = {**spec.defaults, "lr": args.learning_rate}
    if "betas" in valid:  # Adam family: the Trainer's betas and epsilon, as HF's own optimizers take them
        kwargs["betas"] = (args.adam_beta1, args.adam_beta2)
        kwargs["eps"] = args.adam_epsilon
    kwargs.update(options)
    if capped:
        kwargs["_cap"] = cap_options
    return spec, capped, kwargs


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
) -> tuple[Callable[..., torch.optim.Optimizer], dict]:
    """``(optimizer class or builder, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: the kwargs
    carry the named param groups under ``params``, so the Trainer uses them instead of its own grouping."""
    spec, capped, kwargs = resolve_options(name, args, optim_args)
    targets = target_modules if target_modules is not None else getattr(args, "optim_target_modules", None)
    kwargs["params"] = param_groups_for(spec, model, args.weight_decay, targets)
    kwargs.pop("weight_decay", None)  # set per group above
    cap = kwargs.pop("_cap", None)
    if not capped:
        return spec.cls, kwargs

    def build_capped(params, **options):
        return NormGrowthCap(spec.cls(params, **options), **cap)

    build_capped.__name__ = f"{spec.cls.__name__}Capped"
    return build_capped, kwargs


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
    "optimizer_cls_and_kwargs",
    "parse_optim_args",
    "validate",
]
