"""The optimizer names, and THE resolver from (name, options, targets) to the optimizer they stand for.

:func:`resolve` is the one place where a name and its options become an optimizer: ``train.py`` and the
Hugging Face glue (once per run, through ``TrainingArguments.lowrank_resolved``), the DeepSpeed glue, the memory
estimator and the ``lowrank-opt`` command all call it, so a name means the same optimizer with the same options
everywhere (and an option that one path would take is never refused by another). The names:

* :data:`OPTIMIZERS`, lowrank-opt's own, each also as ``NAME_capped`` (or with ``norm_growth_cap``) inside
  :class:`~lowrank_opt.NormGrowthCap`;
* :data:`HF_OPTIMIZERS`, Hugging Face names backed by other packages (bitsandbytes, GaLore, apollo-torch): the HF
  Trainer builds them; they resolve for the memory estimator, which counts their state from their published
  layouts (:mod:`lowrank_opt.memory.external`);
* :data:`ALIASES`, names that are one of the above with options implied (``adamw_torch_fused`` is ``adamw`` with
  ``fused=True``).

Example:
    >>> from lowrank_opt.registry import build_optimizer, resolve
    >>> opt = build_optimizer("apollo", model, lr=1e-2, rank=128)             # low-rank on all linear layers
    >>> opt = build_optimizer("adamp_capped", model.parameters(), lr=1e-3)     # AdamP inside NormGrowthCap
    >>> spec = resolve("apollo_mini", "rank=1,update_proj_gap=100", ["attn", "mlp"])
    >>> spec.options["scale"], spec.target_modules, spec.layerwise
    (128.0, ['attn', 'mlp'], False)
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from .apollo import APOLLO_MINI, Apollo
from .classic import SGDP, AdamP, AdamW, ApolloDQN, ApolloW
from .norm_growth import NormGrowthCap
from .targets import ALL_LINEAR, TargetModules, full_ndim, lowrank_param_groups

CAPPED_SUFFIX = "_capped"
CAP_PREFIX = "cap_"  # optim_args keys for NormGrowthCap: cap_tau=1.05


@dataclass(frozen=True)
class OptimizerSpec:
    """A named optimizer: what is built (``cls``), or, for a Hugging Face name lowrank-opt does not build, the
    published state layout the memory estimator counts (``layout``)."""

    name: str
    cls: Optional[type]  # the torch.optim.Optimizer subclass built; None for a Hugging Face name (layout instead)
    defaults: dict = field(default_factory=dict)  # applied before the caller's and the user's options
    lowrank: bool = False  # takes low-rank targets (target modules)
    description: str = ""
    elementwise: bool = True  # its update of an element depends on that element only (correct on flat shards)
    layout: Optional[str] = None  # Hugging Face names: "bnb8bit" | "galore" | "apollo_torch" (memory.external)
    layerwise: bool = False  # Hugging Face names: updates inside backward (ours take the option layerwise)

    def options(self) -> set[str]:
        """The keyword options the optimizer accepts (for a layout: the keys of its defaults)."""
        if self.cls is None:
            return set(self.defaults)
        return {n for n in inspect.signature(self.cls.__init__).parameters
                if n not in ("self", "params", "process_group", "comm")}


_APOLLO = dict(lr=1e-2, rank=256, scale_type="channel", scale=1.0, update_proj_gap=200)
_MINI = {**_APOLLO, **APOLLO_MINI}

OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in [
        OptimizerSpec("apollo", Apollo, _APOLLO, lowrank=True,
                      description="APOLLO, channel-wise scaling (arXiv 2412.05270)"),
        OptimizerSpec("apollo_mini", Apollo, _MINI, lowrank=True,
                      description="APOLLO-Mini: rank 1, tensor-wise scaling, scale 128"),
        OptimizerSpec("apollo_layerwise", Apollo, {**_APOLLO, "layerwise": True}, lowrank=True,
                      description="APOLLO with per-parameter updates inside backward (gradients freed)"),
        OptimizerSpec("apollo_mini_layerwise", Apollo, {**_MINI, "layerwise": True}, lowrank=True,
                      description="APOLLO-Mini with per-parameter updates inside backward"),
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

_BNB8 = dict(min_8bit_size=4096, embeddings_32bit=True, optim_bits=8, is_paged=False)  # bitsandbytes' defaults
_GALORE = dict(rank=128, update_proj_gap=200, scale=0.25, proj_type="std")
_APOLLO_TORCH = dict(rank=128, proj="random", scale_type="channel", update_proj_gap=200, scale=1.0, proj_type="std")

HF_OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in [
        OptimizerSpec("adamw_bnb_8bit", None, _BNB8, layout="bnb8bit",
                      description="bitsandbytes 8-bit AdamW (HF adamw_bnb_8bit; embeddings kept 32-bit)"),
        OptimizerSpec("paged_adamw_8bit", None, {**_BNB8, "is_paged": True}, layout="bnb8bit",
                      description="paged bitsandbytes 8-bit AdamW (same bytes, pageable to host)"),
        OptimizerSpec("galore_adamw", None, _GALORE, lowrank=True, layout="galore",
                      description="GaLore AdamW (galore-torch, HF galore_adamw; SVD projection)"),
        OptimizerSpec("galore_adamw_layerwise", None, _GALORE, lowrank=True, layout="galore", layerwise=True,
                      description="GaLore AdamW, HF layer-wise variant"),
        OptimizerSpec("apollo_adamw", None, _APOLLO_TORCH, lowrank=True, layout="apollo_torch",
                      description="apollo-torch APOLLOAdamW (HF apollo_adamw; caches P)"),
        OptimizerSpec("apollo_adamw_layerwise", None, _APOLLO_TORCH, lowrank=True, layout="apollo_torch",
                      layerwise=True, description="apollo-torch APOLLOAdamW, HF layer-wise variant"),
    ]
}

ALIASES: dict[str, tuple[str, dict]] = {  # name -> (the name it stands for, the options it implies)
    "adamw_torch": ("adamw", {}),  # Hugging Face's names for torch.optim.AdamW
    "adamw_torch_fused": ("adamw", {"fused": True}),
    "adamw_8bit": ("adamw_bnb_8bit", {}),
    "galore": ("galore_adamw", {}),
    "galore_layerwise": ("galore_adamw_layerwise", {}),
}


def available() -> list[str]:
    """Every name :func:`build_optimizer` builds (each also with the ``_capped`` suffix)."""
    return sorted(OPTIMIZERS)


def lowrank_names() -> list[str]:
    """The registry names whose optimizer takes low-rank targets (APOLLO and its forms)."""
    return sorted(name for name, spec in OPTIMIZERS.items() if spec.lowrank)


def known_optimizers() -> list[str]:
    """Every name :func:`resolve` takes: :func:`available` (also as ``NAME_capped``), the Hugging Face names the
    memory estimator counts, and the aliases."""
    return sorted(set(OPTIMIZERS) | set(HF_OPTIMIZERS) | set(ALIASES))


def _unknown(name: Any) -> ValueError:
    estimated = sorted(set(known_optimizers()) - set(OPTIMIZERS))
    return ValueError(f"unknown optimizer {name!r}; known: {', '.join(available())} (each also as "
                      f"NAME{CAPPED_SUFFIX}), and for memory estimates {', '.join(estimated)}")


def parse_name(name: str) -> tuple[OptimizerSpec, bool]:
    """The spec of lowrank-opt's optimizer ``name`` and whether the ``_capped`` suffix asked for a NormGrowthCap."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {name!r}")
    key = name.strip().lower()
    capped = key.endswith(CAPPED_SUFFIX) and key not in OPTIMIZERS
    if capped:
        key = key[: -len(CAPPED_SUFFIX)]
    if key not in OPTIMIZERS:
        raise _unknown(name)
    return OPTIMIZERS[key], capped


def is_registry_name(name: Any) -> bool:
    """Whether lowrank-opt builds ``name`` (a Hugging Face name, even one the estimator knows, is not)."""
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
            raise ValueError(f"optim_args has an empty key in {optim_args!r}; write key=value pairs")
        options[key] = _typed(value)
    return options


_HF_APOLLO_KEYS = {"proj", "proj_type"}  # as HF's apollo_adamw takes them


def _translate_hf_apollo_keys(options: dict) -> dict:
    """``proj``/``proj_type`` as HF's apollo_adamw takes them, mapped onto our options."""
    options = dict(options)
    proj = options.pop("proj", "random")
    if proj != "random":
        raise ValueError(f"optim_args proj={proj!r} is not supported by lowrank-opt's APOLLO, which projects at "
                         "random; drop proj or set proj=random")
    proj_type = options.pop("proj_type", None)
    if proj_type is not None:
        if proj_type not in ("std", "left"):
            raise ValueError(f"optim_args proj_type must be 'std' (compress the smaller dimension) or 'left' "
                             f"(always the rows), got {proj_type!r}")
        options.setdefault("sort_dims", proj_type == "std")
    return options


def split_targets(text: str) -> list[str]:
    """``text`` split at the commas that separate names or regexes (``"attn,mlp"``), not at those inside a
    regex's ``{m,n}``, ``[...]`` or ``(...)`` (``"layers\\.\\d{1,2}\\.q_proj"`` stays whole); pieces stripped, empty
    ones dropped."""
    pieces, start, depth, in_class, class_start, i = [], 0, 0, False, 0, 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character is never a separator or a bracket
            continue
        if in_class:
            in_class = char != "]" or i == class_start
        elif char == "[":
            in_class, class_start = True, i + 1 + (text[i + 1 : i + 2] == "^")  # "[]" / "[^]": "]" is literal
        elif char in "({":
            depth += 1
        elif char in ")}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
        i += 1
    pieces.append(text[start:])
    return [p.strip() for p in pieces if p.strip()]


def normalize_target_modules(targets: Optional[TargetModules]) -> Optional[TargetModules]:
    """lowrank-opt's target modules as command lines give them: ``None``; ``"all-linear"`` or one regex; a list
    of names/regexes. Strings and list entries are split at separating commas (:func:`split_targets`:
    ``"attn,mlp"`` is two names, a regex's ``{1,2}`` is not split); one piece stays a string."""
    if targets is None:
        return None
    entries = [targets] if isinstance(targets, str) else list(targets)
    out: list[str] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise TypeError(f"target modules must be strings, got {entry!r}; give names, regexes or 'all-linear'")
        out.extend(split_targets(entry))
    if len(out) == 1 and (isinstance(targets, str) or out[0].replace("_", "-").lower() == ALL_LINEAR):
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
    """A name resolved to the optimizer it stands for: the spec, every keyword option (the spec's defaults, then
    the caller's defaults, then the user's options), NormGrowthCap's options, and the low-rank targets."""

    name: str  # the name it stands for, normalised (e.g. "apollo_mini_capped"; "adamw" for "adamw_torch")
    spec: OptimizerSpec
    capped: bool
    options: dict
    cap: dict
    target_modules: Optional[TargetModules]  # low-rank optimizers only (default "all-linear")
    given: dict = field(default_factory=dict)  # the options the user gave or the name implied (cap_* included)

    @property
    def layerwise(self) -> bool:
        """Each parameter is updated inside backward and its gradient freed (no accumulation, no all-reduce)."""
        return bool(self.options.get("layerwise", self.spec.layerwise))

    @property
    def optimizer_cls(self) -> type:
        """The class to call with ``(params, **self.optimizer_kwargs())``."""
        if self.spec.cls is None:
            raise TypeError(f"optimizer {self.name!r} is not built by lowrank-opt: the Hugging Face Trainer builds it "
                            f"(--optim {self.name}), and the memory estimator counts it from its published layout")
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
        cls = self.optimizer_cls
        if isinstance(params, nn.Module):
            params = self.param_groups(params, weight_decay)
        elif weight_decay is not None:
            raise ValueError(f"weight_decay={weight_decay} is split per group only when a model is given; pass the "
                             "model, or weight_decay as an option")
        return cls(params, **self.optimizer_kwargs())

    def summary(self, optimizer: Optional[torch.optim.Optimizer] = None) -> str:
        """One line: the optimizer class and every resolved option; with the built optimizer also the rank of
        each low-rank group and how many matrices it holds."""
        shown = {k: v for k, v in sorted(self.options.items())}
        parts = [f"{self.name} -> " + (f"{self.spec.cls.__module__}.{self.spec.cls.__qualname__}" if self.spec.cls
                                      else f"Hugging Face's {self.name}")]
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
    raise TypeError(f"norm_growth_cap must be True or a dict of NormGrowthCap options, got {norm_growth_cap!r}")


_CAP_KEYS = {n for n in inspect.signature(NormGrowthCap.__init__).parameters if n not in ("self", "optimizer")}


def _lookup(name: Any) -> tuple[OptimizerSpec, bool, dict]:
    """(spec, capped, implied options) of any name :func:`resolve` takes."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {name!r}")
    key, implied = ALIASES.get(name.strip().lower(), (name, {}))
    spec = HF_OPTIMIZERS.get(key.strip().lower())
    if spec is not None:
        return spec, False, dict(implied)
    spec, capped = parse_name(key)
    return spec, capped, dict(implied)


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
        name: any name of :func:`known_optimizers` (lowrank-opt's also with the ``_capped`` suffix); case and
            surrounding spaces are ignored.
        optim_args: the user's options: HF's "key=value,..." string or a dict. For lowrank-opt's low-rank
            optimizers HF's APOLLO keys ``proj=random`` and ``proj_type=std|left`` are understood; ``cap_<option>``
            keys go to NormGrowthCap.
        target_modules: the low-rank matrices, for low-rank optimizers only (default ``"all-linear"``):
            lowrank-opt's take names, regexes, ``"all-linear"`` or "a,b" strings (:func:`normalize_target_modules`);
            Hugging Face's names take them as HF does, unchanged. A single string must be a valid regex.
        defaults: options a caller supplies between the spec's defaults and the user's (the HF Trainer's
            learning rate, betas and epsilon); keys the optimizer does not take are dropped.
        norm_growth_cap: ``True`` or a dict of NormGrowthCap options wraps the optimizer (as ``_capped`` does).

    Raises ValueError for an unknown name or option (naming the valid ones), ``cap_*`` options without a capped
    name, target modules given to an optimizer that has none, and a target regex that does not compile.
    """
    spec, capped, implied = _lookup(name)
    user = {**implied, **parse_optim_args(optim_args)}
    if spec.cls is not None and spec.lowrank and _HF_APOLLO_KEYS & set(user):
        user = _translate_hf_apollo_keys(user)
    cap = {k[len(CAP_PREFIX):]: user.pop(k) for k in list(user) if spec.cls is not None and k.startswith(CAP_PREFIX)}
    explicit_cap = _cap_options(norm_growth_cap)
    if explicit_cap is not None:
        if spec.cls is None:
            raise ValueError(f"norm_growth_cap wraps lowrank-opt's optimizers only, not Hugging Face's {spec.name}; "
                             "drop it")
        capped = True
        cap = {**explicit_cap, **cap}
    valid = spec.options()
    unknown = sorted(set(user) - valid)
    if unknown:
        keys = ", ".join(map(repr, unknown))
        what = f"option(s) {keys} for optimizer {name!r}" if spec.cls else f"optim_args key(s) {keys} for {spec.name}"
        cap_keys = sorted(CAP_PREFIX + k for k in _CAP_KEYS) if capped else []
        raise ValueError(f"unknown {what}; valid: {', '.join(sorted(valid) + cap_keys)}")
    if cap and not capped:
        raise ValueError(f"optim_args {', '.join(CAP_PREFIX + k for k in cap)} need a *{CAPPED_SUFFIX} optimizer name: "
                         f"use {spec.name}{CAPPED_SUFFIX}")
    bad_cap = sorted(set(cap) - _CAP_KEYS)
    if bad_cap:
        raise ValueError(f"unknown NormGrowthCap option(s) {', '.join(map(repr, bad_cap))}; valid: "
                         f"{', '.join(sorted(_CAP_KEYS))}")
    options = {**spec.defaults, **{k: v for k, v in (defaults or {}).items() if k in valid}, **user}
    targets = normalize_target_modules(target_modules) if spec.cls is not None else target_modules
    if targets is not None and not spec.lowrank:
        raise ValueError(f"target_modules applies to low-rank optimizers only, not to {name!r} (got {targets!r}); "
                         "drop it")
    if spec.lowrank and targets is None:
        targets = ALL_LINEAR
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as error:
            raise ValueError(f"target_modules {targets!r} is not a valid regular expression ({error}); give a regex, "
                             "module names separated by commas, or 'all-linear'") from None
    given = {**{k: options[k] for k in user}, **{CAP_PREFIX + k: v for k, v in cap.items()}}
    return ResolvedOptimizer(spec.name + (CAPPED_SUFFIX if capped else ""), spec, capped, options, cap, targets, given)


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
        raise ValueError(f"target_modules={target_modules!r} needs the model itself as params, not a list of "
                         "parameters; pass the model")
    return resolve(name, options, target_modules, norm_growth_cap=norm_growth_cap).build(params)
