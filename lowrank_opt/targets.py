"""Choose which matrices of a model go low-rank: module names, regexes or ``"all-linear"``, as in the
Hugging Face Trainer's ``optim_target_modules``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence, Union

import torch
from torch import nn

TargetModules = Union[str, Sequence[str]]

ALL_LINEAR = "all-linear"


def _is_all_linear(targets: Any) -> bool:
    return isinstance(targets, str) and targets.replace("_", "-").lower() == ALL_LINEAR


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


def _output_embedding(model: nn.Module) -> Any:
    """The model's output embedding (``lm_head``), also through the wrappers that hide it: DDP's ``.module`` and
    ``torch.compile``'s ``._orig_mod``."""
    while not callable(getattr(model, "get_output_embeddings", None)):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    try:
        return model.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        return None


def _conv1d_class() -> Any:
    """transformers' Conv1D (GPT-2 style: a Linear whose weight is stored in x out), when transformers is loaded."""
    import sys

    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or ``transformers``' Conv1D (the same layer with its weight stored transposed)."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_transposed_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def full_ndim(p: torch.Tensor) -> int:
    """ndim of the parameter's real shape, also for a DeepSpeed ZeRO-3 placeholder (``ds_shape``)."""
    return len(getattr(p, "ds_shape", p.shape))


def lowrank_targets(
    model: nn.Module, target_modules: TargetModules = ALL_LINEAR, *, include_embeddings: bool = False
) -> list[tuple[str, torch.nn.Parameter]]:
    """The ``(name, parameter)`` pairs selected for low rank: the weights (ndim >= 2, requiring grad) that
    belong directly to a matched module. A list may hold ``"all-linear"`` next to names or regexes: the union
    (``["all-linear", "embed_tokens", "lm_head"]`` puts the embeddings low-rank too). ``"all-linear"`` takes every ``nn.Linear`` and ``transformers``' Conv1D
    (GPT-2's linear layers) except the model's output embedding (``lm_head``); embeddings are taken only when
    named explicitly or ``include_embeddings``."""
    if target_modules is None or (not isinstance(target_modules, str) and len(list(target_modules)) == 0):
        raise ValueError("target_modules must name at least one module (names, regexes or 'all-linear')")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    # "all-linear" alone, or in a list with more names (["all-linear", "embed_tokens", "lm_head"]: the union).
    entries = [target_modules] if isinstance(target_modules, str) else target_modules
    all_linear = any(_is_all_linear(t) for t in entries)
    named = [t for t in entries if not _is_all_linear(t)] if not isinstance(target_modules, str) else (
        [] if all_linear else target_modules)
    output_embedding = _output_embedding(model)
    seen: set[int] = set()
    selected = []
    for module_name, module in model.named_modules():
        chosen = all_linear and is_linear(module) and module is not output_embedding
        if not chosen and named:
            chosen = module_matches(named, module_name)
        if include_embeddings and isinstance(module, nn.Embedding):
            chosen = True
        if not chosen:
            continue
        for param_name, p in module.named_parameters(prefix=module_name, recurse=False):
            if full_ndim(p) >= 2 and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                selected.append((param_name, p))
    if not selected:
        sample = [name for name, _ in model.named_modules() if name][:12]
        raise ValueError(
            f"target_modules={target_modules!r} matched no weight with ndim >= 2 in {type(model).__name__}; "
            f"module names look like: {', '.join(sample)}"
        )
    return selected


def lowrank_param_groups(
    model: nn.Module,
    target_modules: TargetModules = ALL_LINEAR,
    *,
    include_embeddings: bool = False,
    **lowrank_options: Any,
) -> list[dict]:
    """Param groups for :class:`~lowrank_opt.Apollo`: the selected matrices in one group carrying
    ``lowrank_options`` (``rank``, ``scale``, ...), every other trainable parameter in a group with
    ``rank=None`` (plain AdamW). ``transformers``' Conv1D weights (stored in x out) get a group of their own
    with ``transposed=True``, so they are projected as the Linear they stand for. Parameters are given with
    their names, so errors name them and each matrix gets its own projection.

    Example:
        >>> groups = lowrank_param_groups(model, ["attn", "mlp"], rank=128, scale_type="channel")
        >>> optimizer = Apollo(groups, lr=1e-3)
    """
    targets = lowrank_targets(model, target_modules, include_embeddings=include_embeddings)
    chosen = {id(p) for _, p in targets}
    transposed = {id(m.weight) for m in model.modules() if is_transposed_linear(m) and isinstance(
        getattr(m, "weight", None), torch.Tensor)}
    rest = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in chosen and id(p) not in seen:
            seen.add(id(p))
            rest.append((name, p))
    groups = []
    if rest:
        groups.append({"params": rest, "rank": None})
    plain = [(n, p) for n, p in targets if id(p) not in transposed]
    stored_transposed = [(n, p) for n, p in targets if id(p) in transposed]
    if plain:
        groups.append({"params": plain, **lowrank_options})
    if stored_transposed:  # Conv1D weights (in x out): projected as the Linear they stand for
        groups.append({"params": stored_transposed, **lowrank_options, "transposed": True})
    return groups
