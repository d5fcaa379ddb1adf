"""Choose which matrices of a model go low-rank: module names, regexes or ``"all-linear"``, as in the Hugging
Face Trainer's ``optim_target_modules``; and how each is viewed (a matrix, a transposed one, a conv kernel, or a
stack of E matrices such as a MoE model's fused experts).

``"all-linear"`` (the default) takes every ``nn.Linear`` and ``transformers``' Conv1D weight except the output
head, and the fused expert weights of MoE models (transformers stores them as one (E, out, in) parameter of an
``...Experts`` module): each expert is then its own matrix. Routers and gates (the modules that score experts,
``shared_expert_gate`` included), embeddings, the head, norms and biases stay dense unless asked for.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

TargetModules = Union[str, Sequence[str]]

ALL_LINEAR = "all-linear"
# A module whose name has one of these components scores experts: it stays dense unless include_routers.
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate", "router_gate"})
# Expert modules without transformers' ``is_transposed`` attribute, and how they store each expert.
_EXPERTS_WITHOUT_FLAG = {"Llama4TextExperts": "in_out", "LongcatFlashExperts": "out_in",
                         "JetMoeParallelExperts": "out_in", "InklingSharedExperts": "out_in"}
# Experts kept as 2-D (E * F, H) weights, which cannot be told from one matrix without the model's config.
_FLATTENED_EXPERTS = {"DbrxExpertGLU"}
STACK_LAYOUTS = ("out_in", "in_out")

# How a selected parameter is viewed: one matrix; a matrix stored in x out (Conv1D); E stacked matrices stored
# (E, out, in) or (E, in, out).
MATRIX, TRANSPOSED, STACKED, STACKED_TRANSPOSED = "matrix", "transposed", "stacked", "stacked_transposed"
_GROUP_OPTIONS = {MATRIX: {}, TRANSPOSED: {"transposed": True}, STACKED: {"stacked": True},
                  STACKED_TRANSPOSED: {"stacked": True, "transposed": True}}


def _is_all_linear(target: Any) -> bool:
    return isinstance(target, str) and target.replace("_", "-").lower() == ALL_LINEAR


def module_matches(targets: TargetModules, module_name: str) -> bool:
    """HF's rule: a single string is a regex that must match the whole module name; in a list, an entry
    matches when it equals the name, is a substring of it, or fully matches it as a regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    for target in targets:
        if target == module_name or target in module_name:
            return True
        try:
            if re.fullmatch(target, module_name) is not None:
                return True
        except re.error:
            continue
    return False


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside data-parallel and compile wrappers (``.module``, ``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None) if isinstance(model, (nn.parallel.DistributedDataParallel,
                                                                     nn.DataParallel)) else None
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def output_embedding(model: nn.Module) -> Any:
    """The model's output embedding (``lm_head``), also through the wrappers that hide it."""
    getter = getattr(unwrap(model), "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def _conv1d_class() -> Any:
    """transformers' Conv1D (GPT-2 style: a Linear whose weight is stored in x out), when transformers is loaded."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or ``transformers``' Conv1D (the same layer with its weight stored transposed)."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_transposed_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def is_router(module_name: str) -> bool:
    """Whether a module scores experts (MoE routers and gates), by its name's components."""
    return any(part in ROUTER_NAMES for part in module_name.split("."))


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module (a ``...Experts`` class: its >= 3-D parameters are E
    stacked matrices, its 2-D ones E bias vectors)."""
    return "Experts" in type(module).__name__


def experts_layout(module: nn.Module) -> Optional[str]:
    """``"out_in"`` or ``"in_out"`` for an experts module (:func:`is_experts`), None for any other module or an
    experts class whose layout is unknown."""
    if not is_experts(module):
        return None
    transposed = getattr(module, "is_transposed", None)
    if isinstance(transposed, bool):
        return "in_out" if transposed else "out_in"
    return _EXPERTS_WITHOUT_FLAG.get(type(module).__name__)


def full_ndim(p: torch.Tensor) -> int:
    """ndim of the parameter's real shape, also for a DeepSpeed ZeRO-3 placeholder (``ds_shape``)."""
    return len(getattr(p, "ds_shape", p.shape))


def _entries(target_modules: TargetModules) -> tuple[bool, Optional[TargetModules]]:
    """(all-linear asked for, the named targets or None)."""
    if isinstance(target_modules, str):
        return (True, None) if _is_all_linear(target_modules) else (False, target_modules)
    entries = list(target_modules)
    named = [t for t in entries if not _is_all_linear(t)]
    return len(named) < len(entries), (named or None)


def _view(module: nn.Module, module_name: str, param_name: str, p: torch.Tensor,
          stacked: dict[str, str]) -> Optional[str]:
    """How parameter ``p`` of a selected module is viewed, None to leave it dense; raises for a >= 3-D weight
    whose matrices cannot be told apart."""
    ndim = full_ndim(p)
    layout = next((how for pattern, how in stacked.items() if module_matches([pattern], param_name)), None)
    if layout is None:
        layout = experts_layout(module) if ndim >= 3 else None
    if layout is not None:
        if ndim < 3:
            return None  # 2-D expert biases: E vectors
        return STACKED if layout == "out_in" else STACKED_TRANSPOSED
    if ndim == 2:
        if is_experts(module):
            return None  # (E, d) expert biases
        return TRANSPOSED if is_transposed_linear(module) else MATRIX
    if isinstance(module, nn.modules.conv._ConvNd):
        return MATRIX  # a conv kernel: out x (in * kernel)
    raise ValueError(
        f"{param_name} (shape {tuple(getattr(p, 'ds_shape', p.shape))}, in a {type(module).__name__}) is a "
        f"{ndim}-D weight whose matrices lowrank-opt cannot tell apart: name it in stacked= as 'out_in' (E stacked "
        "matrices stored out x in) or 'in_out', or leave its module out of target_modules")


def classify(model: nn.Module, target_modules: TargetModules = ALL_LINEAR, *, include_embeddings: bool = False,
             include_routers: bool = False, stacked: Optional[dict[str, str]] = None
             ) -> list[tuple[str, torch.nn.Parameter, str]]:
    """``(name, parameter, view)`` for every parameter selected for low rank (see :func:`lowrank_targets`);
    ``view`` is ``MATRIX``, ``TRANSPOSED`` (Conv1D), ``STACKED`` or ``STACKED_TRANSPOSED``."""
    if target_modules is None or (not isinstance(target_modules, str) and len(list(target_modules)) == 0):
        raise ValueError("target_modules must name at least one module (names, regexes or 'all-linear')")
    stacked = dict(stacked or {})
    for pattern, how in stacked.items():
        if how not in STACK_LAYOUTS:
            raise ValueError(f"stacked[{pattern!r}] must be one of {', '.join(STACK_LAYOUTS)}, got {how!r}")
    all_linear, named = _entries(target_modules)
    head = output_embedding(model)
    seen: set[int] = set()
    selected, routers_only = [], []
    for module_name, module in model.named_modules():
        if type(module).__name__ in _FLATTENED_EXPERTS and (all_linear or (named and module_matches(named, module_name))):
            raise ValueError(f"{module_name} ({type(module).__name__}) keeps its experts as 2-D (E * F, H) weights, "
                             "which lowrank-opt cannot split into experts: leave it out of the targets (name the "
                             "matrices to train low-rank, e.g. ['attn']; the experts then get AdamW)")
        embedding = isinstance(module, nn.Embedding)
        router = is_router(module_name)
        by_name = named is not None and module_matches(named, module_name)
        chosen = (all_linear and (is_linear(module) or experts_layout(module) is not None) and module is not head
                  and not router) or by_name or (include_embeddings and embedding)
        if router and chosen and not include_routers:
            routers_only.append(module_name)
            continue
        if not chosen:
            continue
        for param_name, p in module.named_parameters(prefix=module_name, recurse=False):
            if full_ndim(p) < 2 or not p.requires_grad or id(p) in seen:
                continue
            view = _view(module, module_name, param_name, p, stacked)
            if view is not None:
                seen.add(id(p))
                selected.append((param_name, p, view))
    if routers_only and named is not None:  # a target that names routers only was asked for on purpose
        for target in ([named] if isinstance(named, str) else named):
            hits = [name for name, _ in model.named_modules() if name and module_matches(
                target if isinstance(named, str) else [target], name)]
            if hits and all(is_router(name) for name in hits):
                raise ValueError(f"target {target!r} names only routers ({', '.join(hits[:4])}), which stay dense "
                                 "unless include_routers=True")
    if not selected:
        sample = [name for name, _ in model.named_modules() if name][:12]
        extra = (f"; it matched only routers ({', '.join(routers_only[:4])}), which stay dense unless "
                 "include_routers=True") if routers_only else ""
        raise ValueError(f"target_modules={target_modules!r} matched no weight with ndim >= 2 in "
                         f"{type(model).__name__}{extra}; module names look like: {', '.join(sample)}")
    return selected


def lowrank_targets(model: nn.Module, target_modules: TargetModules = ALL_LINEAR, *,
                    include_embeddings: bool = False, include_routers: bool = False,
                    stacked: Optional[dict[str, str]] = None) -> list[tuple[str, torch.nn.Parameter]]:
    """The ``(name, parameter)`` pairs selected for low rank: the weights (ndim >= 2, requiring grad) that belong
    directly to a matched module. A list may hold ``"all-linear"`` next to names or regexes: the union.
    ``"all-linear"`` takes every ``nn.Linear``/Conv1D but the output head, and MoE fused expert weights;
    routers (modules named ``gate``/``router``/``shared_expert_gate``/``router_gate``) only with
    ``include_routers``; embeddings only when named or with ``include_embeddings``. ``stacked`` maps parameter
    names (substrings or regexes) to ``"out_in"``/``"in_out"``: those are E matrices stacked on their first axis.
    A >= 3-D weight that is neither a conv kernel nor known experts is refused, naming that fix."""
    return [(name, p) for name, p, _ in classify(model, target_modules, include_embeddings=include_embeddings,
                                                 include_routers=include_routers, stacked=stacked)]


def lowrank_param_groups(model: nn.Module, target_modules: TargetModules = ALL_LINEAR, *,
                         include_embeddings: bool = False, include_routers: bool = False,
                         stacked: Optional[dict[str, str]] = None, **lowrank_options: Any) -> list[dict]:
    """Param groups for :class:`~lowrank_opt.Apollo`: the selected matrices in groups carrying ``lowrank_options``
    (``rank``, ``scale``, ...), one per view (Conv1D weights with ``transposed=True``, fused experts with
    ``stacked=True``), and every other trainable parameter in a ``rank=None`` (AdamW) group. Parameters are named,
    so errors name them and each matrix gets its own projection.

    Example:
        >>> groups = lowrank_param_groups(model, ["attn", "mlp"], rank=128, scale_type="channel")
        >>> optimizer = Apollo(groups, lr=1e-3)
    """
    chosen = classify(model, target_modules, include_embeddings=include_embeddings, include_routers=include_routers,
                      stacked=stacked)
    views = {id(p): view for _, p, view in chosen}
    rest, seen = [], set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in views and id(p) not in seen:
            seen.add(id(p))
            rest.append((name, p))
    groups = [{"params": rest, "rank": None}] if rest else []
    for view, options in _GROUP_OPTIONS.items():
        params = [(n, p) for n, p, v in chosen if v == view]
        if params:
            groups.append({"params": params, **lowrank_options, **options})
    return groups
