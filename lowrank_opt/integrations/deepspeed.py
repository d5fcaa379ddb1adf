"""DeepSpeed ZeRO (stages 0-3) with lowrank-opt's optimizers: the same training as unsharded.

DeepSpeed hands a client optimizer flat 1-D fp32 shards instead of matrices (stage 1/2: one flat tensor per
param group, the group's parameters concatenated and split across the data-parallel ranks; stage 3: every
parameter split on its own, a sub-group's partitions concatenated). :class:`~lowrank_opt.Apollo` itself
recognises those shards (it records every parameter's shape and identity when it is built, see
:mod:`lowrank_opt.sharding`), projects the rows each rank holds and all-reduces only what crosses a shard
boundary, so ``deepspeed.initialize(model=model, optimizer=Apollo(...), config=...)`` trains exactly as
unsharded, with any param groups (``lowrank_param_groups``, HF's, or :func:`deepspeed_param_groups`). What
crosses ranks per step, per matrix cut by a shard boundary:

* right projection (tall/square, R = G Pᵀ, one R row per W row): the partial products of the rows cut by the
  boundary (r numbers per row), then ``||U||²`` (one scalar) for the growth limiter, or ``||R̃||²`` and
  ``||R||²`` (two scalars) for tensor-wise scaling;
* left projection (wide, R = P G, every row contributes to every R column): the r x n partial sums (plus, with
  channel scaling, the n partial column norms² of G);
* one flag per shared tensor (non-finite gradient), and one "some rank raises", so every rank decides alike.

A matrix held whole by one rank (most of them at stage 1/2, where groups are concatenated) crosses nothing.
Moments live where their rows are; left-projected matrices keep their r x n moments on every rank holding a
part of them.

This module adds what is DeepSpeed-specific and holds no math:

* :func:`check_deepspeed_config` fails loudly on the offload trap (``offload_optimizer`` with
  ``zero_force_ds_cpu_optimizer`` not false silently swaps any client optimizer for DeepSpeedCPUAdam in
  accelerate / the HF Trainer), on an ``"optimizer"`` section (the Trainer would then ignore ours) and on
  NVMe optimizer offload (its swapper assumes state tensors shaped like the flat shard);
* :func:`check_optimizer_for_zero` refuses built optimizers whose update needs whole tensors (AdamP, SGDP,
  ApolloDQN, NormGrowthCap) at stages 1-3, and :func:`check_deepspeed_optimizer` the same (and layer-wise
  updates) for an optimizer resolved by name, before it is built (the HF glue calls it under ``--deepspeed``);
* :func:`initialize` runs the checks, puts Apollo on DeepSpeed's data-parallel group and checks the layout
  against DeepSpeed's own bookkeeping (:func:`check_partition_layout`).

bf16/fp16 at stage 0 (DeepSpeed's ``FP16_UnfusedOptimizer``) calls ``step()`` once with all-zero gradients on
fp32 copies of the parameters inside ``deepspeed.initialize``; Apollo recognises that set-up call and changes
nothing (``init_steps_skipped``).

Typical use::

    from lowrank_opt import Apollo, lowrank_param_groups
    from lowrank_opt.integrations.deepspeed import initialize

    optimizer = Apollo(lowrank_param_groups(model, "all-linear", rank=256), lr=1e-3)
    engine, optimizer, _, _ = initialize(model, optimizer, "configs/deepspeed/zero2.json")

With the Hugging Face Trainer: ``--deepspeed configs/deepspeed/zero2.json`` with any of our ``--optim``
names (train.py, lowrank-opt's Trainer, or ``lowrank_opt.integrations.hf.optimizer_cls_and_kwargs``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..apollo import Apollo
from ..sharding import full_shape, zero_flat_pieces
from ..targets import ALL_LINEAR, TargetModules, lowrank_param_groups

if TYPE_CHECKING:
    from ..registry import ResolvedOptimizer

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Configuration


def _load_config(config: Union[str, Path, dict]) -> dict:
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist")
    return json.loads(path.read_text())


def _offload_device(section: Any) -> Optional[str]:
    if not isinstance(section, dict):
        return None
    device = section.get("device")
    device = getattr(device, "value", device)
    if device is None or str(device).lower() == "none":
        return None
    return str(device).lower()


def check_deepspeed_config(config: Union[str, Path, dict]) -> dict:
    """Check a DeepSpeed config (dict or JSON file) for settings under which our optimizer would not run or
    not run as written; return the config as a dict.

    Raises ``ValueError`` when:

    * ``zero_optimization.offload_optimizer`` is enabled and ``zero_force_ds_cpu_optimizer`` is not false:
      accelerate (and so the HF Trainer) then silently replaces any client optimizer with DeepSpeedCPUAdam
      (plain DeepSpeed refuses it instead);
    * the optimizer is offloaded to NVMe: DeepSpeed's swapper assumes optimizer state shaped like the flat
      shard, which APOLLO's low-rank moments are not;
    * the config has an ``"optimizer"`` section: DeepSpeed (and the Trainer) would build that optimizer and
      never call ours.
    """
    cfg = _load_config(config)
    zero = cfg.get("zero_optimization") or {}
    if "optimizer" in cfg:
        kind = cfg["optimizer"].get("type", "?") if isinstance(cfg["optimizer"], dict) else "?"
        raise ValueError(
            f"the DeepSpeed config has an \"optimizer\" section ({kind}), which DeepSpeed (and the HF Trainer) would "
            "build and train instead of lowrank-opt's optimizer; remove the section and name the optimizer in code "
            "(--optim apollo)")
    device = _offload_device(zero.get("offload_optimizer"))
    if device is not None:
        force = cfg.get("zero_force_ds_cpu_optimizer", True)
        if force is not False and str(force).lower() != "false":
            raise ValueError(
                f"the DeepSpeed config offloads the optimizer (zero_optimization.offload_optimizer.device="
                f"{device!r}) without \"zero_force_ds_cpu_optimizer\": false, so accelerate and the HF Trainer would "
                "silently replace APOLLO with DeepSpeedCPUAdam (plain AdamW; deepspeed.initialize refuses the "
                "client optimizer instead); set \"zero_force_ds_cpu_optimizer\": false at the top level of the "
                "config, and APOLLO runs on the offloaded CPU shards (configs/deepspeed/zero2-offload.json)")
        if device == "nvme":
            raise ValueError(
                "offload_optimizer.device=\"nvme\" is not supported with APOLLO, whose low-rank moments are not "
                "shaped like the flat shard DeepSpeed's optimizer swapper assumes; use \"device\": \"cpu\" "
                "(APOLLO's state is small)")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Param groups


def _split_named(items: Sequence[Any]) -> list[tuple[Optional[str], torch.Tensor]]:
    out = []
    for item in items:
        if isinstance(item, tuple):
            out.append((item[0], item[1]))
        else:
            out.append((None, item))
    return out


def _rebuild(named: list[tuple[Optional[str], torch.Tensor]], options: dict) -> dict:
    if any(name is not None for name, _ in named):
        if not all(name is not None for name, _ in named):
            raise ValueError("a param group mixes named and unnamed parameters; give (name, parameter) pairs for all "
                             "of them, or for none")
        params: list = [(name, p) for name, p in named]
    else:
        params = [p for _, p in named]
    return {**options, "params": params}


def deepspeed_param_groups(
    model_or_groups: Union[nn.Module, Iterable[Any]],
    target_modules: TargetModules = ALL_LINEAR,
    **lowrank_options: Any,
) -> list[dict]:
    """Param groups with every low-rank matrix alone in its group. Optional: :class:`~lowrank_opt.Apollo`
    handles any param groups under DeepSpeed. With one matrix per group, ZeRO 1/2 give every rank a contiguous
    row-major slice of *every* matrix (as ZeRO 3 does anyway): each rank projects a share of each matrix, at the
    cost of an all-reduce for each one; with concatenated groups most matrices sit whole on one rank and cross
    nothing.

    ``model_or_groups`` is a model (then ``lowrank_param_groups(model, target_modules, **lowrank_options)``
    chooses the matrices) or param groups as :class:`~lowrank_opt.Apollo` takes them (dicts, or a plain list
    of parameters / ``(name, parameter)`` pairs meaning one group). A group is low-rank unless its ``rank`` is
    ``None``; its matrices (ndim >= 2, real shape also under zero.Init) each get a group with the group's
    options; its runs of 1-D parameters are kept together (AdamW, element-wise, so flat shards are fine).
    ``rank=None`` groups are kept whole. Frozen parameters are dropped. The order of the parameters is
    preserved, so unnamed parameters keep the projection identities the unsharded optimizer gives them;
    names (``model.named_parameters()``, as ``lowrank_param_groups`` gives them) are recommended.
    """
    if isinstance(model_or_groups, nn.Module):
        groups = lowrank_param_groups(model_or_groups, target_modules, **lowrank_options)
    else:
        if lowrank_options:
            raise TypeError("low-rank options are taken only with a model; put them in the param groups instead")
        groups = list(model_or_groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
    out: list[dict] = []
    for group in groups:
        options = {k: v for k, v in group.items() if k != "params"}
        params = group["params"]
        named = _split_named([params] if isinstance(params, torch.Tensor) else list(params))
        named = [(name, p) for name, p in named if p.requires_grad]
        if not named:
            continue
        if options.get("rank", "default") is None:
            out.append(_rebuild(named, options))
            continue
        run: list = []
        for name, p in named:
            if len(full_shape(p)) >= 2:
                if run:
                    out.append(_rebuild(run, options))
                    run = []
                out.append(_rebuild([(name, p)], options))
            else:
                run.append((name, p))
        if run:
            out.append(_rebuild(run, options))
    return out


# ----------------------------------------------------------------------------------------------------------
# Engine glue


def _zero_stage(cfg: dict) -> int:
    return int((cfg.get("zero_optimization") or {}).get("stage", 0) or 0)


def check_partition_layout(engine: Any, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Check, against DeepSpeed's own bookkeeping, that every parameter is where :class:`~lowrank_opt.Apollo`
    computes it to be on this rank (stage 1/2: each parameter's ``_hp_mapping``; stage 3: each parameter's
    partition size and the sub-group's ``ds_id``). Apollo makes the same check at its first step; this runs it
    right after ``deepspeed.initialize``. Returns the number of parameters checked; raises RuntimeError on a
    mismatch (a DeepSpeed version that partitions differently)."""
    zero_opt = getattr(engine, "optimizer", None)
    if zero_opt is None:
        return 0
    import torch.distributed as dist

    checked = 0
    if hasattr(zero_opt, "bit16_groups") and hasattr(zero_opt, "single_partition_of_fp32_groups"):  # stage 1/2
        for i, lps in enumerate(zero_opt.bit16_groups):
            group = zero_opt.real_dp_process_group[i] if hasattr(zero_opt, "real_dp_process_group") else None
            rank, world = dist.get_rank(group), dist.get_world_size(group)
            pieces = zero_flat_pieces(zero_opt.single_partition_of_fp32_groups[i], [full_shape(p) for p in lps],
                                      [True] * len(lps), list(lps), rank, world, f"param group {i}")
            checked += sum(1 for piece in pieces if getattr(lps[piece.index], "_hp_mapping", None) is not None)
    elif hasattr(zero_opt, "fp16_groups") and hasattr(zero_opt, "fp32_partitioned_groups_flat"):  # stage 3
        for sub, lps in enumerate(zero_opt.fp16_groups):
            flat = zero_opt.fp32_partitioned_groups_flat[sub]
            group = getattr(lps[0], "ds_process_group", None) if lps else None
            rank, world = dist.get_rank(group), dist.get_world_size(group)
            checked += len(zero_flat_pieces(flat, [full_shape(p) for p in lps], [True] * len(lps), list(lps), rank,
                                            world, f"sub-group {sub}"))
    return checked


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, config: Union[str, Path, dict], **kwargs: Any):
    """``deepspeed.initialize`` with the checks lowrank-opt's optimizers need: the config
    (:func:`check_deepspeed_config`), optimizers that are only correct on whole tensors refused at ZeRO
    stages 1-3 (:func:`check_optimizer_for_zero`), Apollo put on DeepSpeed's data-parallel group, and the
    partition layout checked (:func:`check_partition_layout`). Returns what ``deepspeed.initialize`` returns.
    (A plain ``deepspeed.initialize(model=..., optimizer=Apollo(...))`` trains the same; this adds the early
    checks.)"""
    import deepspeed

    cfg = check_deepspeed_config(config)
    check_optimizer_for_zero(optimizer, _zero_stage(cfg))
    result = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, **kwargs)
    engine = result[0]
    if isinstance(optimizer, Apollo):
        group = getattr(engine.optimizer, "dp_process_group", None)
        if group is not None and optimizer.process_group is None:
            optimizer.process_group = group
    check_partition_layout(engine, optimizer)
    return result


def check_optimizer_for_zero(optimizer: Any, zero_stage: int) -> None:
    """ZeRO stages 1-3 hand the optimizer flat shards. :class:`~lowrank_opt.Apollo` recognises them and
    element-wise optimizers (AdamW, AMSGrad) are correct on them; optimizers whose update depends on a whole
    tensor (AdamP/SGDP's projection, ApolloDQN's norms, NormGrowthCap's per-tensor norms) would silently
    compute something else: they are refused here, naming the fix."""
    if zero_stage < 1:
        return
    from ..classic import SGDP, AdamP, ApolloDQN
    from ..norm_growth import NormGrowthCap

    if isinstance(optimizer, NormGrowthCap):
        raise ValueError("NormGrowthCap limits each tensor's gradient norm, which ZeRO stages 1-3 do not hand the "
                         "optimizer (it sees flat shards): use the optimizer without the cap (Apollo has its own "
                         "per-matrix norm_growth_limit) or ZeRO stage 0")
    if isinstance(optimizer, (AdamP, SGDP, ApolloDQN)):
        raise ValueError(f"{type(optimizer).__name__}'s update depends on whole tensors (norms, projections), which "
                         "ZeRO stages 1-3 do not hand the optimizer (it sees flat shards): use ZeRO stage 0, or "
                         "Apollo / AdamW")


def check_deepspeed_optimizer(resolved: "ResolvedOptimizer", config: Union[str, Path, dict]) -> dict:
    """Refuse, before it is built, an optimizer resolved by name (:func:`lowrank_opt.registry.resolve`) that
    DeepSpeed cannot run with ``config``: layer-wise updates (DeepSpeed owns the gradients), and at ZeRO stages
    1-3 (flat shards) NormGrowthCap and optimizers whose update needs whole tensors. Also checks the config
    (:func:`check_deepspeed_config`) and returns it as a dict."""
    cfg = check_deepspeed_config(config)
    stage = _zero_stage(cfg)
    if resolved.layerwise:
        raise ValueError(f"--optim {resolved.name} is layer-wise, which DeepSpeed cannot run (DeepSpeed owns the "
                         "gradients); use the name without _layerwise")
    if resolved.capped and stage >= 1:
        raise ValueError(f"--optim {resolved.name}: NormGrowthCap limits per-tensor norms, which ZeRO stage {stage} "
                         "does not hand the optimizer; use the name without _capped (Apollo keeps its per-matrix "
                         "norm_growth_limit) or ZeRO stage 0")
    if stage >= 1 and not resolved.spec.elementwise:
        raise ValueError(f"--optim {resolved.name}: its update depends on whole tensors, which ZeRO stage {stage} does "
                         "not hand the optimizer; use ZeRO stage 0, or apollo / adamw")
    return cfg


__all__ = [
    "check_deepspeed_config",
    "check_deepspeed_optimizer",
    "check_optimizer_for_zero",
    "check_partition_layout",
    "deepspeed_param_groups",
    "initialize",
]


def is_setup_step(grads: Sequence[torch.Tensor]) -> bool:
    """Whether a ``step()`` on copies of the parameters, none with optimizer state yet, is DeepSpeed's set-up
    call: its bf16/fp16 stage-0 wrapper (``FP16_UnfusedOptimizer``) steps once inside ``deepspeed.initialize``
    with all-zero gradients to create state. :class:`~lowrank_opt.Apollo` skips it (no step counted, no state,
    no weight decay) rather than shift the bias correction and projection schedule by one."""
    return all(g.device.type != "meta" and not bool(g.any()) for g in grads)
