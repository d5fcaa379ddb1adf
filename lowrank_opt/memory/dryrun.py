"""Optimizer states of registry optimizers, from their own code: one real ``step()`` on the meta device.

Registry optimizers (``lowrank_opt.registry``) are built on the meta parameters exactly as ``build_optimizer``
builds them and run for one real ``step()`` on meta gradients; the bytes are then counted by
:func:`~lowrank_opt.memory.measure.optimizer_state_bytes`, the same function that measures a real optimizer.
Meta tensors have no values, so the few host reads an optimizer makes are answered by the dispatch mode of
:mod:`.shadow`; generators asked for on the meta device (APOLLO's seeded projections, stochastic rounding) are
CPU generators, whose meta draws allocate nothing.

**Step temporaries**: the meta step's allocations are recorded as a timeline, and the most bytes alive at once
of the storages that do not survive the step (the new state does) is its scratch. torch's optimizers are run
with ``foreach=True``, their CUDA default, whose AdamW makes one moment-sized ``sqrt(v)`` for all parameters at
once, or, for ``device="cpu"``, with their CPU default, the single-tensor loop; APOLLO's are per tensor or per
block of rows (e.g. fp32 working copies of a bf16 weight), with the device's chunk size.

Results are cached per (model config, optimizer class and effective options, parameter dtype, targets, code
path, device), so comparing several set-ups of one model dry-runs each optimizer once.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from dataclasses import dataclass

import torch
from torch import nn

from ..functional import META_STANDS_FOR
from ..registry import ResolvedOptimizer
from .measure import optimizer_state_breakdown
from .shadow import meta_dry_run


@dataclass(frozen=True)
class DryRun:
    """What one dry-run step of a registry optimizer leaves, by parameter name (tied parameters under their
    first owner)."""

    state_by_name: dict  # parameter name -> bytes of its state
    unattributed: int  # state bytes held for no single parameter
    sources: dict  # "states" / "cache (<attribute>)" -> bytes
    ranks: dict  # parameter name -> its param group's "rank" (None: no low-rank group option)
    temporaries: int  # the most bytes of the step's scratch tensors alive at once


def dry_run(optimizer: ResolvedOptimizer, model: nn.Module, config, names: dict[int, str], *,
            dtype: torch.dtype, foreach: bool, device: str) -> DryRun:
    """One step of the registry ``optimizer`` on the meta ``model`` (parameters of ``dtype``; ``config`` is its
    transformers config), as run on ``device``; ``names`` maps ``id(parameter)`` to its name. Cached."""
    key = _dry_run_key(config, optimizer, {"_foreach": foreach, "_device": device}, dtype)
    cached = _DRY_RUNS.get(key)
    if cached is None:
        by_id, unattributed, sources, built, temporaries = _registry_states(optimizer, model, foreach=foreach,
                                                                            device=device)
        ranks = {names[id(p)]: group.get("rank") for group in built.param_groups for p in group["params"]}
        cached = DryRun({names[i]: b for i, b in by_id.items()}, unattributed, sources, ranks, temporaries)
        _remember_dry_run(key, cached)
    return cached


def _registry_states(optimizer: ResolvedOptimizer, model: nn.Module, foreach: bool = True,
                     device: str = "cuda") -> tuple[dict, int, dict, torch.optim.Optimizer, int]:
    """Per-parameter state bytes of a registry optimizer after one dry-run step on meta tensors (standing for
    ``device``), and the most bytes of that step's scratch tensors alive at once."""
    options = dict(optimizer.options)
    valid = optimizer.spec.options()
    if "layerwise" in valid:
        options["layerwise"] = False  # same state; no backward hooks needed for a dry run
    if "foreach" in valid and "fused" in valid:
        # torch's own optimizers: on CUDA the default is the foreach implementation (fused only when asked);
        # meta tensors would take the single-tensor loop. Fused kernels make no temporaries, which the
        # single-tensor loop approximates from above; so does one optimizer per parameter (layer-wise,
        # ``foreach=False`` here). The states are the same either way.
        fused = bool(options.pop("fused", False))
        if fused:
            options["foreach"] = False
        else:
            options.setdefault("foreach", foreach)
    built = dataclasses.replace(optimizer, options=options).build(model)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.empty_like(p)
    token = META_STANDS_FOR.set(device)  # APOLLO's chunk size on that device
    try:
        with meta_dry_run(track_allocations=True) as mode:
            built.step()  # creates the state; everything else it allocates is scratch
            gc.collect()
            temporaries = mode.temporaries_peak()
    finally:
        META_STANDS_FOR.reset(token)
    breakdown = optimizer_state_breakdown(built)
    for p in model.parameters():
        p.grad = None
    sources = {("states" if src == "state" else f"cache ({src.lstrip('_')})"): b
               for src, b in breakdown.by_source.items()}
    return dict(breakdown), breakdown.unattributed, sources, built, temporaries


_DRY_RUNS: dict = {}  # dry-run results per (config, optimizer, options, dtype, targets), by parameter name
_DRY_RUNS_MAX = 32


def _dry_run_key(config, optimizer: ResolvedOptimizer, code_path: dict, dtype: torch.dtype) -> str:
    """What a dry run's result depends on: the model, the optimizer class and its options (the layer-wise flag
    aside: same state), NormGrowthCap's, the code path, the parameters' dtype and the low-rank targets."""
    effective = {**optimizer.options, **code_path}
    effective.pop("layerwise", None)
    cls = optimizer.spec.cls
    return json.dumps([config.to_json_string(use_diff=False), f"{cls.__module__}.{cls.__qualname__}",
                       optimizer.capped, sorted((k, repr(v)) for k, v in effective.items()),
                       sorted((k, repr(v)) for k, v in optimizer.cap.items()), str(dtype),
                       repr(optimizer.target_modules) if optimizer.spec.lowrank else None])


def _remember_dry_run(key: str, value: DryRun) -> None:
    if len(_DRY_RUNS) >= _DRY_RUNS_MAX:
        _DRY_RUNS.pop(next(iter(_DRY_RUNS)))
    _DRY_RUNS[key] = value
