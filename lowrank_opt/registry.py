"""One table from optimizer name to builder and defaults, and ONE resolver from (name, options, targets) to
the optimizer that is built.

``train.py``, the Hugging Face glue, the DeepSpeed/FSDP glue, the memory estimator and the ``lowrank-opt``
command all call :func:`resolve`, so a name means the same optimizer with the same options everywhere (and an
option that one path would take is never refused by another). Any name may take the suffix ``_capped`` (or the
option ``norm_growth_cap``) to wrap the optimizer in :class:`~lowrank_opt.NormGrowthCap`.

Example:
    >>> from lowrank_opt.registry import build_optimizer, resolve
    >>> opt = build_optimizer("apollo", model, lr=1e-2, rank=128)             # low-rank on all linear layers
    >>> opt = build_optimizer("adamp_capped", model.parameters(), lr=1e-3)     # AdamP inside NormGrowthCap
    >>> spec = resolve("apollo_mini", "rank=1,update_proj_gap=100", ["attn", "mlp"])
    >>> spec.options["scale"], spec.target_modules
    (128.0, ['attn', 'mlp'])
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from .apollo import Apollo
from .classic import SGDP, AdamP, AdamW, ApolloDQN, ApolloW
from .norm_growth import NormGrowthCap
from .targets import ALL_LINEAR, TargetModules, full_ndim, lowrank_param_groups

CAPPED_SUFFIX = "_capped"
CAP_PREFIX = "cap_"  # optim_args keys for NormGrowthCap: cap_tau=1.05


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one named optimizer."""

    name: str
    cls: type  # the torch.optim.Optimizer subclass that is built
    defaults: dict = field(default_factory=dict)  # applied before the user's options
    lowrank: bool = False  # takes low-rank param groups (target modules) when given a model
    description: str = ""
    elementwise: bool = True  # its update of an element depends on that element only (correct on flat shards)

    def options(self) -> set[str]:
        """The keyword options the optimizer accepts."""
        return {n for n in inspect.signature(self.cls.__init__).parameters
                if n not in ("self", "params", "process_group", "comm")}


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
        OptimizerSpec("apollo_dqn", ApolloDQN, dict(lr=1e-2), elementwise=False,
                      description="Ma et al. 2020 quasi-Newton Apollo (not low-rank APOLLO)"),
        OptimizerSpec("apollo_dqn_w", ApolloW, dict(lr=1e-2), elementwise=False,
                      description="ApolloDQN with decoupled weight decay (ApolloW)"),
        OptimizerSpec("adamp", AdamP, dict(lr=1e-3), elementwise=False, description="AdamP (Heo et al., ICLR 2021)"),
        OptimizerSpec("sgdp", SGDP, dict(lr=0.1, momentum=0.9, nesterov=True), elementwise=False,
                      description="SGDP (Heo et al., ICLR 2021), Nesterov momentum 0.9 as in the paper's ImageNet runs"),
        OptimizerSpec("adamw", AdamW, dict(lr=1e-3),
                      description="torch.optim.AdamW's math under the package's checks and non-finite policy"),
        OptimizerSpec("amsgrad", AdamW, dict(lr=1e-3, amsgrad=True), description="AdamW with amsgrad=True"),
    ]
}


def available() -> list[str]:
    """Every name :func:`build_optimizer` takes (each also with the ``_capped`` suffix)."""
    return sorted(OPTIMIZERS)


def lowrank_names() -> list[str]:
    return sorted(n for n, s in OPTIMIZERS.items() if s.lowrank)


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


def is_registry_name(name: Any) -> bool:
    try:
        parse_name(name)
    except (TypeError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# Options: HF's "key=value,key=value" strings, HF's APOLLO keys, target modules


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
    if not isinstance(optim_args, str):
        raise TypeError(f"optim_args must be a 'key=value,...' string or a dict, got {optim_args!r}")
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


_HF_APOLLO_KEYS = {"proj", "proj_type"}  # as HF's apollo_adamw takes them


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


def normalize_target_modules(targets: Optional[TargetModules]) -> Optional[TargetModules]:
    """Target modules as HF takes them: ``None``; ``"all-linear"`` or one regex; a list of names/regexes. A
    string with commas (``"attn,mlp"``) and list entries with commas are split, as command lines give them."""
    if targets is None:
        return None
    if isinstance(targets, str):
        if "," in targets:
            return [t.strip() for t in targets.split(",") if t.strip()]
        return targets
    out: list[str] = []
    for entry in targets:
        if not isinstance(entry, str):
            raise TypeError(f"target modules must be strings, got {entry!r}")
        out.extend(t.strip() for t in entry.split(",") if t.strip())
    if len(out) == 1 and out[0].replace("_", "-").lower() == ALL_LINEAR:
        return out[0]
    return out


# ----------------------------------------------------------------------------------------------------------
# The capped optimizer as a class (so that callers which instantiate "optimizer classes", e.g. the HF Trainer,
# can build it like any other)


class CappedOptimizer(NormGrowthCap):
    """:class:`~lowrank_opt.NormGrowthCap` around ``optimizer_cls(params, **options)``: a
    ``torch.optim.Optimizer`` subclass built from parameters, like any optimizer class.

    Args:
        params: what ``optimizer_cls`` takes.
        optimizer_cls: the optimizer to wrap.
        cap: NormGrowthCap's options (``tau``, ``lb``, ``eps``, ...).
        **options: ``optimizer_cls``'s options.
    """

    def __init__(self, params: Any, optimizer_cls: type, cap: Optional[dict] = None, **options: Any):
        super().__init__(optimizer_cls(params, **options), **(cap or {}))


# ----------------------------------------------------------------------------------------------------------
# The resolver


@dataclass(frozen=True)
class ResolvedOptimizer:
    """A name resolved to the optimizer it stands for: the spec, every keyword option (registry defaults, then
    the caller's defaults, then the user's options), NormGrowthCap's options, and the low-rank targets."""

    name: str  # as asked, normalised (e.g. "apollo_mini_capped")
    spec: OptimizerSpec
    capped: bool
    options: dict
    cap: dict
    target_modules: Optional[TargetModules]  # low-rank optimizers only (default "all-linear")

    @property
    def layerwise(self) -> bool:
        return bool(self.options.get("layerwise", False))

    @property
    def optimizer_cls(self) -> type:
        """The class to call with ``(params, **self.optimizer_kwargs())``."""
        return CappedOptimizer if self.capped else self.spec.cls

    def optimizer_kwargs(self) -> dict:
        if self.capped:
            return {"optimizer_cls": self.spec.cls, "cap": dict(self.cap), **self.options}
        return dict(self.options)

    def param_groups(self, model: nn.Module, weight_decay: Optional[float] = None) -> list[dict]:
        """Named param groups of ``model``: for a low-rank optimizer the target matrices in one group and every
        other trainable parameter in a ``rank=None`` (AdamW) group; for others, every trainable parameter.
        With ``weight_decay`` given, decay is set per group and applied to matrices only (biases and norm
        weights get none, as the HF Trainer does)."""
        if self.spec.lowrank:
            groups = lowrank_param_groups(model, self.target_modules or ALL_LINEAR)
            rest = [g for g in groups if g.get("rank", "target") is None]
            targets = [g for g in groups if g.get("rank", "target") is not None]
            out = []
            for group in rest:
                out.extend(_decay_split(group["params"], weight_decay, {"rank": None}))
            for group in targets:  # keeps what lowrank_param_groups marks (transposed=True for Conv1D weights)
                out.append({**group, **({} if weight_decay is None else {"weight_decay": weight_decay})})
            return out
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return _decay_split(named, weight_decay, {})

    def build(self, params: Union[nn.Module, Iterable[Any]], weight_decay: Optional[float] = None
              ) -> torch.optim.Optimizer:
        """Build the optimizer on a model (param groups from :meth:`param_groups`) or on parameters / groups."""
        if isinstance(params, nn.Module):
            params = self.param_groups(params, weight_decay)
        elif weight_decay is not None:
            raise ValueError("weight_decay is split per group only for a model; pass it as an option instead")
        return self.optimizer_cls(params, **self.optimizer_kwargs())

    def summary(self, optimizer: Optional[torch.optim.Optimizer] = None) -> str:
        """One line: the optimizer class and every resolved option; with the built optimizer also the rank of
        each low-rank group and how many matrices it holds."""
        shown = {k: v for k, v in sorted(self.options.items())}
        parts = [f"{self.name} -> {self.spec.cls.__module__}.{self.spec.cls.__qualname__}"]
        if self.capped:
            parts.append(f"inside NormGrowthCap({', '.join(f'{k}={v!r}' for k, v in sorted(self.cap.items()))})")
        parts.append(", ".join(f"{k}={_show(v)}" for k, v in shown.items()))
        if self.spec.lowrank:
            parts.append(f"targets={self.target_modules or ALL_LINEAR!r}")
        if optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)
            groups = []
            for group in inner.param_groups:
                if self.spec.lowrank and group.get("rank", None) is not None:
                    matrices = sum(1 for p in group["params"] if full_ndim(p) >= 2)
                    groups.append(f"{matrices} low-rank matrices (rank {_show(group['rank'])}, scale_type "
                                  f"{group.get('scale_type')}, scale {group.get('scale')}, gap "
                                  f"{group.get('update_proj_gap')})")
                else:
                    groups.append(f"{len(group['params'])} tensors {'AdamW' if self.spec.lowrank else ''}".strip())
            parts.append("groups: " + "; ".join(groups))
        return " | ".join(p for p in parts if p)


def _show(value: Any) -> str:
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return repr(value)


def _decay_split(named: list, weight_decay: Optional[float], extra: dict) -> list[dict]:
    if weight_decay is None:
        return [{"params": named, **extra}] if named else []
    decay = [(n, p) for n, p in named if full_ndim(p) >= 2]  # full_ndim: also for ZeRO-3 placeholders
    no_decay = [(n, p) for n, p in named if full_ndim(p) < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, **extra})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, **extra})
    return groups


def _cap_options(norm_growth_cap: Union[None, bool, dict]) -> Optional[dict]:
    if norm_growth_cap is None or norm_growth_cap is False:
        return None
    if norm_growth_cap is True:
        return {}
    if isinstance(norm_growth_cap, dict):
        return dict(norm_growth_cap)
    raise TypeError(f"norm_growth_cap must be a bool or a dict of NormGrowthCap options, got {norm_growth_cap!r}")


_CAP_KEYS = {n for n in inspect.signature(NormGrowthCap.__init__).parameters if n not in ("self", "optimizer")}


def resolve(
    name: str,
    optim_args: Union[None, str, dict] = None,
    target_modules: Optional[TargetModules] = None,
    *,
    defaults: Optional[dict] = None,
    norm_growth_cap: Union[None, bool, dict] = None,
) -> ResolvedOptimizer:
    """Resolve an optimizer name and its options: THE place where a name gets its options.

    Args:
        name: a registry name (:func:`available`), optionally with the ``_capped`` suffix.
        optim_args: the user's options: HF's "key=value,..." string or a dict. HF's APOLLO keys
            ``proj=random`` and ``proj_type=std|left`` are understood; ``cap_<option>`` keys go to NormGrowthCap.
        target_modules: the low-rank matrices (names, regexes, ``"all-linear"``, or "a,b" strings); only for
            low-rank optimizers (default ``"all-linear"``).
        defaults: options a caller supplies between the registry defaults and the user's (the HF Trainer's
            learning rate, betas and epsilon); keys the optimizer does not take are dropped.
        norm_growth_cap: ``True`` or a dict of NormGrowthCap options wraps the optimizer (as ``_capped`` does).

    Raises ValueError naming the valid keys for an unknown option, and for target modules given to an
    optimizer that has none.
    """
    spec, capped = parse_name(name)
    user = parse_optim_args(optim_args)
    if spec.lowrank and _HF_APOLLO_KEYS & set(user):
        user = _translate_hf_apollo_keys(user)
    cap = {k[len(CAP_PREFIX):]: user.pop(k) for k in list(user) if k.startswith(CAP_PREFIX)}
    explicit_cap = _cap_options(norm_growth_cap)
    if explicit_cap is not None:
        capped = True
        cap = {**explicit_cap, **cap}
    valid = spec.options()
    unknown = sorted(set(user) - valid)
    if unknown:
        cap_keys = sorted(CAP_PREFIX + k for k in _CAP_KEYS) if capped else []
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for optimizer {name!r}; valid: "
            f"{', '.join(sorted(valid) + cap_keys)}")
    if cap and not capped:
        raise ValueError(f"optim_args {', '.join(CAP_PREFIX + k for k in cap)} need a *{CAPPED_SUFFIX} optimizer name")
    bad_cap = sorted(set(cap) - _CAP_KEYS)
    if bad_cap:
        raise ValueError(f"unknown NormGrowthCap option(s) {', '.join(map(repr, bad_cap))}; valid: "
                         f"{', '.join(sorted(_CAP_KEYS))}")
    options = dict(spec.defaults)
    options.update({k: v for k, v in (defaults or {}).items() if k in valid})
    options.update(user)
    targets = normalize_target_modules(target_modules)
    if targets is not None and not spec.lowrank:
        raise ValueError(f"target_modules applies to low-rank optimizers only, not to {name!r} (got {targets!r})")
    if spec.lowrank and targets is None:
        targets = ALL_LINEAR
    shown = spec.name + (CAPPED_SUFFIX if capped else "")
    return ResolvedOptimizer(shown, spec, capped, options, cap, targets)


def build_optimizer(
    name: str,
    params: Union[nn.Module, Iterable[Any]],
    *,
    target_modules: Optional[TargetModules] = None,
    norm_growth_cap: Union[None, bool, dict] = None,
    **options: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` (:func:`resolve`, then :meth:`ResolvedOptimizer.build`).

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
    if target_modules is not None and not isinstance(params, nn.Module):
        raise ValueError("target_modules needs the model itself as params, not a list of parameters")
    return resolve(name, options, target_modules, norm_growth_cap=norm_growth_cap).build(params)
