"""DeepSpeed ZeRO (stages 0-3) for APOLLO: the same training as the unsharded :class:`~lowrank_opt.Apollo`.

DeepSpeed hands a client optimizer flat 1-D fp32 shards instead of matrices (stage 1/2: one flat tensor per
param group, split across the data-parallel ranks; stage 3: every parameter split on its own). Projecting a
flat shard is meaningless, so:

1. :func:`deepspeed_param_groups` puts every low-rank matrix alone in its param group. Each rank then holds
   a contiguous row-major slice ``[rank * L, rank * L + L)`` of that matrix (``L`` = the local shard's numel,
   the tail padded with zeros), at every stage.
2. :class:`ZeroApollo` records each matrix's full shape and projection identity at construction (while it
   still sees real parameters), recovers ``(shape, start, numel)`` of its shard at each step, projects the
   rows it holds, and all-reduces only what must cross ranks:

   * right projection (tall/square, R = G Pᵀ, one R row per W row): the partial products of the rows cut by
     a shard boundary (at most ``world_size - 1`` rows of r numbers), then ``||U||²`` (one scalar) for the
     growth limiter, or ``||R̃||²`` and ``||R||²`` (two scalars) for tensor-wise scaling;
   * left projection (wide, R = P G, every row contributes to every R column): the r x n partial sums (plus,
     with channel scaling and the limiter, the n partial column norms² of G, so no second round is needed);
   * two flags (non-finite gradient, non-zero gradient), so that every rank takes the same decision.

   Moments live where their rows are: right projection, the local rows (a cut row is replicated on the
   ranks sharing it); left projection, the full r x n moments on every rank (they are r/m of the gradient).
   The per-channel factor is applied to the local gradient slice; the limiter state (one scalar) is
   replicated. The result equals the unsharded optimizer up to float summation order.
3. :func:`check_deepspeed_config` fails loudly on the offload trap (``offload_optimizer`` with
   ``zero_force_ds_cpu_optimizer`` not false silently swaps any client optimizer for DeepSpeedCPUAdam in
   accelerate / the HF Trainer), on an ``"optimizer"`` section (the Trainer would then ignore ours) and on
   NVMe optimizer offload (its swapper assumes state tensors shaped like the flat shard).
4. bf16/fp16 at stage 0 (DeepSpeed's ``FP16_UnfusedOptimizer``) calls ``step()`` once with all-zero
   gradients inside ``deepspeed.initialize`` to create optimizer state. For APOLLO that step would count as
   step 1 (bias correction and projection schedule shifted by one), apply weight decay, and store a
   growth-limiter norm of 0 that then freezes training (every later update is limited to 1.01 x 1e-8).
   ``ZeroApollo`` therefore treats a ``step()`` in which no parameter has state yet and every gradient is
   exactly zero (decided across ranks when sharded) as that set-up call and leaves everything untouched
   (``skip_zero_init_step=True``, counted in ``init_steps_skipped``); :meth:`ZeroApollo.deepspeed_setup` (used
   by :func:`initialize`) marks the set-up explicitly.

Typical use::

    from lowrank_opt.integrations.deepspeed import ZeroApollo, deepspeed_param_groups, initialize

    groups = deepspeed_param_groups(model, "all-linear", rank=256, scale_type="channel")
    optimizer = ZeroApollo(groups, lr=1e-3, weight_decay=0.0)
    engine, optimizer, _, _ = initialize(model, optimizer, "configs/deepspeed/zero2.json")

With the Hugging Face Trainer: ``Trainer(..., optimizer_cls_and_kwargs=hf_optimizer_cls_and_kwargs(name,
model, args))`` and ``--deepspeed configs/deepspeed/zero2.json`` (run :func:`check_deepspeed_config` on it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .. import _common
from ..apollo import Apollo, adam_moments_, bias_corrected_step_size, channel_norms, growth_limit_factor
from ..projection import RIGHT, ProjectionPlan, identity_key, matrix_shape, orientation, resolve_rank
from ..targets import ALL_LINEAR, TargetModules, lowrank_param_groups, lowrank_targets

logger = logging.getLogger(__name__)

# Keys ZeroApollo adds to each param group at construction (they survive DeepSpeed's flattening and are saved
# with the optimizer's state dict).
SHAPES_KEY = "zero_shapes"  # full shape of every parameter of the group (ds_shape under zero.Init)
IDENTITIES_KEY = "zero_identities"  # projection identity of every parameter (as the unsharded Apollo computes it)
TRAINABLE_KEY = "zero_trainable"  # requires_grad of every parameter (DeepSpeed drops frozen ones)

_SCALING_EPS = 1e-8  # as in apollo.py: s = ||R~|| / (||R|| + 1e-8)
_FLAG_NONFINITE, _FLAG_NONZERO, _HEADER = 0, 1, 2  # layout of the start of every all-reduce buffer


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
        raise ValueError(
            "the DeepSpeed config has an \"optimizer\" section: DeepSpeed (and the HF Trainer) would build that "
            f"optimizer ({cfg['optimizer'].get('type', '?') if isinstance(cfg['optimizer'], dict) else '?'}) and never "
            "call APOLLO. Remove the \"optimizer\" section and pass the optimizer in code (--optim apollo)")
    device = _offload_device(zero.get("offload_optimizer"))
    if device is not None:
        force = cfg.get("zero_force_ds_cpu_optimizer", True)
        if force is not False and str(force).lower() != "false":
            raise ValueError(
                f"the DeepSpeed config offloads the optimizer (zero_optimization.offload_optimizer.device="
                f"{device!r}) without \"zero_force_ds_cpu_optimizer\": false. With it left at its default (true) "
                "accelerate and the HF Trainer silently replace APOLLO with DeepSpeedCPUAdam (plain AdamW on the "
                "full gradients; APOLLO is never called), and deepspeed.initialize refuses the client optimizer. "
                "Set \"zero_force_ds_cpu_optimizer\": false at the top level of the config: APOLLO then runs on "
                "the offloaded CPU shards (see configs/deepspeed/zero2-offload.json)")
        if device == "nvme":
            raise ValueError(
                "offload_optimizer.device=\"nvme\" is not supported with APOLLO: DeepSpeed's optimizer swapper "
                "assumes state tensors shaped like the flat shard, and APOLLO's low-rank moments are not. Use "
                "\"device\": \"cpu\" (APOLLO's state is small)")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Param groups


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's real shape, also when zero.Init has already partitioned it (``p.shape == (0,)``)."""
    ds_shape = getattr(p, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(p.shape)


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
            raise ValueError("a param group mixes named and unnamed parameters")
        params: list = [(name, p) for name, p in named]
    else:
        params = [p for _, p in named]
    return {**options, "params": params}


def deepspeed_param_groups(
    model_or_groups: Union[nn.Module, Iterable[Any]],
    target_modules: TargetModules = ALL_LINEAR,
    **lowrank_options: Any,
) -> list[dict]:
    """Param groups for :class:`ZeroApollo` under DeepSpeed: every low-rank matrix alone in its group, so that
    ZeRO 1/2 gives each rank a contiguous row-major slice of it (ZeRO 3 splits parameters one by one anyway).

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
            if len(_full_shape(p)) >= 2:
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
# Shard layout


@dataclass(frozen=True)
class Block:
    """A rectangle of the matrix held contiguously in the flat shard: rows [row, row + nrows), columns
    [col, col + ncols), starting at ``offset`` in the shard. ``partial``: a row cut by a shard boundary."""

    row: int
    nrows: int
    col: int
    ncols: int
    offset: int

    @property
    def numel(self) -> int:
        return self.nrows * self.ncols


@dataclass(frozen=True)
class ShardLayout:
    """Where one rank's flat shard of an (m x n) matrix lies: elements [start, start + valid) of the
    row-major flattening (the rest of the shard, if any, is padding), as at most three blocks: a partial
    first row, whole rows, a partial last row."""

    shape2d: tuple[int, int]
    start: int
    valid: int
    blocks: tuple[Block, ...]
    cut_rows: tuple[int, ...]  # every row of the matrix cut by any shard boundary (the same on all ranks)

    @classmethod
    def build(cls, shape2d: tuple[int, int], shard_numel: int, rank: int, world_size: int) -> "ShardLayout":
        m, n = shape2d
        total = m * n
        if shard_numel * world_size < total:
            raise RuntimeError(
                f"a flat shard of {shard_numel} elements on each of {world_size} ranks cannot hold a {m}x{n} matrix: "
                "the optimizer is not seeing one matrix per param group (build the groups with "
                "deepspeed_param_groups) or DeepSpeed partitions in a way this version does not know")
        start = rank * shard_numel
        valid = max(0, min(shard_numel, total - start))
        blocks = []
        pos, end, offset = start, start + valid, 0
        while pos < end:
            row, col = divmod(pos, n)
            if col != 0 or end - pos < n:
                width = min(n - col, end - pos)
                blocks.append(Block(row, 1, col, width, offset))
                step = width
            else:
                nrows = (end - pos) // n
                blocks.append(Block(row, nrows, 0, n, offset))
                step = nrows * n
            pos += step
            offset += step
        cuts = sorted({b // n for b in range(shard_numel, total, shard_numel) if b % n})
        return cls((m, n), start, valid, tuple(blocks), tuple(cuts))

    @property
    def first_row(self) -> int:
        return self.blocks[0].row if self.blocks else 0

    @property
    def num_rows(self) -> int:
        if not self.blocks:
            return 0
        last = self.blocks[-1]
        return last.row + last.nrows - self.first_row

    def is_partial(self, block: Block) -> bool:
        return block.ncols < self.shape2d[1]

    @property
    def owns_first_row(self) -> bool:
        """Whether this rank holds column 0 of its first row (the rank that counts a cut row in global norms)."""
        return self.start % self.shape2d[1] == 0


# ----------------------------------------------------------------------------------------------------------
# Communication


class TorchDistComm:
    """All-reduce (sum) over a torch.distributed process group (default: the world, DeepSpeed's data-parallel
    group without model parallelism). CPU tensors are sent through the accelerator when the backend cannot
    take them (NCCL with an offloaded optimizer)."""

    def __init__(self, process_group: Any = None):
        import torch.distributed as dist

        self._dist = dist
        self.group = process_group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group=process_group) if self.distributed else 0
        self.world_size = dist.get_world_size(group=process_group) if self.distributed else 1
        self._backend = str(dist.get_backend(process_group)).lower() if self.distributed else ""

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        if self.world_size == 1:
            return
        if tensor.device.type == "cpu" and "nccl" in self._backend:
            on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            self._dist.all_reduce(on_device, group=self.group)
            tensor.copy_(on_device)
            return
        self._dist.all_reduce(tensor, group=self.group)


# ----------------------------------------------------------------------------------------------------------
# The optimizer


class ZeroApollo(Apollo):
    r""":class:`~lowrank_opt.Apollo` that gives the same result under DeepSpeed ZeRO stages 0, 1, 2 and 3 as
    unsharded (see the module docstring for what crosses ranks).

    Build it from :func:`deepspeed_param_groups` (one low-rank matrix per group) before
    ``deepspeed.initialize``, from real (or zero.Init-partitioned) parameters. Every option of
    :class:`~lowrank_opt.Apollo` is accepted except ``layerwise``, plus:

    Args:
        process_group: the data-parallel process group the shards are split over (default: the world;
            :func:`initialize` sets DeepSpeed's).
        comm: an object with ``rank``, ``world_size`` and ``all_reduce_(tensor)`` (sum in place), replacing
            torch.distributed (tests, custom transports).
        skip_zero_init_step (bool): treat a ``step()`` in which no parameter has state yet and every gradient
            is exactly zero as DeepSpeed's set-up call (bf16/fp16 at stage 0) and change nothing. Default True.

    Attributes:
        comm_bytes_last_step: bytes this optimizer all-reduced in its latest step (summed over the per-group
            calls DeepSpeed makes), to set next to the gradient bytes DeepSpeed reduces.
        comm_bytes_total: bytes all-reduced since construction.
        init_steps_skipped: set-up calls recognised and skipped.
        sharded_updates: updates done on flat shards (0 at stage 0).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        process_group: Any = None,
        comm: Any = None,
        skip_zero_init_step: bool = True,
        **options: Any,
    ):
        if options.get("layerwise"):
            raise ValueError("ZeroApollo cannot be layer-wise: DeepSpeed owns the gradients (reduction, "
                             "partitioning, offload) and calls step() itself")
        self.process_group = process_group
        self._comm = comm
        self.skip_zero_init_step = skip_zero_init_step
        self._setup_depth = 0
        self.init_steps_skipped = 0
        self.sharded_updates = 0
        self.comm_bytes_total = 0
        self._comm_bytes_by_key: dict[Any, int] = {}
        self._current_bytes = 0
        super().__init__(params, lr, betas, eps, weight_decay, **options)

    # -- construction: remember what DeepSpeed will hide -----------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        params = group["params"]
        names = group.get("param_names")
        shapes, identities = [], []
        for i, p in enumerate(params):
            shapes.append(_full_shape(p))
            identities.append(identity_key(names[i] if names is not None else self._param_index[p]))
        group[SHAPES_KEY] = shapes
        group[IDENTITIES_KEY] = identities
        group[TRAINABLE_KEY] = [bool(p.requires_grad) for p in params]
        if group["rank"] is not None:
            where = _common.group_where(len(self.param_groups) - 1)
            for i, (shape, p) in enumerate(zip(shapes, params)):
                if len(shape) >= 2 and p.ndim < 2:  # zero.Init: Apollo's own validation saw a flat placeholder
                    shape2d = matrix_shape(shape)
                    side = orientation(shape2d, group["sort_dims"])
                    dim = shape2d[1] if side == RIGHT else shape2d[0]
                    resolve_rank(group["rank"], dim, _common.param_label(group, i, p) + where)

    def load_state_dict(self, state_dict: dict) -> None:
        """Apollo's load; a checkpoint without ZeroApollo's layout keys (e.g. from a plain Apollo) keeps the
        ones recorded at construction."""
        recorded = [{k: g[k] for k in (SHAPES_KEY, IDENTITIES_KEY, TRAINABLE_KEY) if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, keys in zip(self.param_groups, recorded):
            for key, value in keys.items():
                group.setdefault(key, value)

    def _get_comm(self):
        if self._comm is None:
            self._comm = TorchDistComm(self.process_group)
        return self._comm

    @contextlib.contextmanager
    def deepspeed_setup(self):
        """Inside this block ``step()`` changes nothing: wrap ``deepspeed.initialize`` in it (as
        :func:`initialize` does) so that DeepSpeed's set-up step is ignored whatever its gradients."""
        self._setup_depth += 1
        try:
            yield self
        finally:
            self._setup_depth -= 1

    @property
    def comm_bytes_last_step(self) -> int:
        return sum(self._comm_bytes_by_key.values())

    # -- which view of each parameter does DeepSpeed hand us? ------------------------------------------------

    def _live_index(self, group: dict) -> Optional[list[int]]:
        """For real-shaped parameters (stage 0, possibly fp32 copies without the frozen ones): the index of
        each live parameter in the recorded lists. None when the group holds flat shards."""
        shapes = group.get(SHAPES_KEY)
        if shapes is None:
            return list(range(len(group["params"])))
        live = [tuple(p.shape) for p in group["params"]]
        if live == [tuple(s) for s in shapes]:
            return list(range(len(shapes)))
        trainable = [k for k, t in enumerate(group[TRAINABLE_KEY]) if t]
        if live == [tuple(shapes[k]) for k in trainable]:
            return trainable
        return None

    def _identity(self, group: dict, index_in_group: int, p: torch.Tensor) -> int:
        identities = group.get(IDENTITIES_KEY)
        if identities is not None:
            index = self._live_index(group)
            if index is not None:
                return identities[index[index_in_group]]
        return super()._identity(group, index_in_group, p)

    def _lowrank_plan(self, group: dict, shape: tuple[int, ...], identity: int, label: str) -> ProjectionPlan:
        shape2d = matrix_shape(shape)
        side = orientation(shape2d, group["sort_dims"])
        dim = shape2d[1] if side == RIGHT else shape2d[0]
        return ProjectionPlan(shape2d, side, resolve_rank(group["rank"], dim, label), identity)

    # -- step ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._setup_depth:
            self.init_steps_skipped += 1
            return loss
        plain, sharded = [], []
        for group in self.param_groups:
            if not group["params"]:
                continue
            index = self._live_index(group)
            if index is not None:
                plain.extend((group, i, p) for i, p in enumerate(group["params"]))
            else:
                sharded.append(group)
        if plain:
            self._plain_update(plain)
        dense: list[tuple[dict, torch.Tensor]] = []
        for group in sharded:
            matrices = [k for k, s in enumerate(group[SHAPES_KEY]) if len(s) >= 2 and group[TRAINABLE_KEY][k]]
            if group["rank"] is None or not matrices:
                dense.extend((group, p) for p in group["params"] if p.grad is not None)
                continue
            if len(matrices) > 1 or len(group["params"]) != 1:
                raise RuntimeError(
                    f"ZeroApollo got flat shards for a param group with {len(matrices)} low-rank matrices: under "
                    "ZeRO each low-rank matrix must be alone in its param group. Build the groups with "
                    "lowrank_opt.integrations.deepspeed.deepspeed_param_groups(...)")
            self._sharded_lowrank_update(group, group["params"][0], matrices[0])
        if dense:
            self._sharded_dense_update(dense)
        return loss

    def _begin(self) -> None:
        self._current_bytes = 0

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        comm = self._get_comm()
        if comm.world_size > 1:
            nbytes = tensor.numel() * tensor.element_size()
            self._current_bytes += nbytes
            self.comm_bytes_total += nbytes
        comm.all_reduce_(tensor)

    def _end(self, key: Any) -> None:
        self._comm_bytes_by_key[key] = self._current_bytes

    def _is_init_step(self, params: Iterable[torch.Tensor]) -> bool:
        """No state yet anywhere in this call (DeepSpeed's set-up step comes first)."""
        return self.skip_zero_init_step and all(len(self.state.get(p, {})) == 0 for p in params)

    def _plain_update(self, candidates: list) -> None:
        """Real-shaped parameters (stage 0): Apollo's own update, except for the zero-gradient set-up call.
        Stage 0 gradients are already all-reduced, so every rank takes the same decision locally."""
        with_grad = [(g, i, p) for g, i, p in candidates if p.grad is not None]
        if with_grad and self._is_init_step(p for _, _, p in with_grad):
            if not any(bool(p.grad.any()) for _, _, p in with_grad):
                self.init_steps_skipped += 1
                logger.info("ZeroApollo: step() with all-zero gradients before any state (DeepSpeed set-up) "
                            "skipped: no step counted, no state, no weight decay")
                return
        self._update(candidates)

    def _flags(self, grads: Iterable[torch.Tensor], first: bool, buf: torch.Tensor) -> None:
        nonfinite = nonzero = False
        for g in grads:
            nonfinite = nonfinite or not bool(torch.isfinite(g).all())
            if first:
                nonzero = nonzero or bool(g.any())
        buf[_FLAG_NONFINITE] = float(nonfinite)
        buf[_FLAG_NONZERO] = float(nonzero)

    def _decide(self, buf: torch.Tensor, first: bool, labels: list[str], policies: set[str]) -> bool:
        """After the all-reduce: True to go on with the update, False to skip it (the same on every rank)."""
        if float(buf[_FLAG_NONFINITE]) > 0:
            if "raise" in policies:
                raise RuntimeError(_common.nonfinite_message(self, labels).replace(
                    "no parameter or optimizer state was changed",
                    "no parameter or optimizer state of these tensors was changed (on any rank)"))
            self.skipped_tensors += len(labels)
            logger.warning("ZeroApollo: skipped the update of %s (non-finite gradient on some rank)", ", ".join(labels))
            return False
        if first and self.skip_zero_init_step and float(buf[_FLAG_NONZERO]) == 0:
            self.init_steps_skipped += 1
            logger.info("ZeroApollo: step() with all-zero gradients before any state (DeepSpeed set-up) skipped "
                        "for %s", ", ".join(labels))
            return False
        return True

    def _label(self, group: dict, k: int) -> str:
        names = group.get("param_names")
        if names is not None and k < len(names):
            return repr(names[k])
        return f"matrix of shape {tuple(group[SHAPES_KEY][k])} (identity {group[IDENTITIES_KEY][k]})"

    def _rounding_generator(self, group: dict, p: torch.Tensor) -> Optional[torch.Generator]:
        # A low-precision tensor DeepSpeed made (not one of ours) is rounded to nearest.
        return super()._rounding_generator(group, p) if p in self._location else None

    # -- element-wise AdamW on flat shards ------------------------------------------------------------------

    def _sharded_dense_update(self, items: list[tuple[dict, torch.Tensor]]) -> None:
        self._begin()
        first = self._is_init_step(p for _, p in items)
        compute = torch.float64 if any(p.dtype == torch.float64 for _, p in items) else torch.float32
        buf = torch.zeros(_HEADER, dtype=compute, device=items[0][1].device)
        self._flags((p.grad for _, p in items), first, buf)
        self._all_reduce(buf)
        labels = [f"flat shard of param group with {len(g[SHAPES_KEY])} parameter(s)" for g, _ in items]
        go = self._decide(buf, first, labels, {g["nonfinite"] for g, _ in items})
        if go:
            for group, p in items:
                _common.check_grad_supported(self, group, 0, p)
                self._adamw_update(group, p)
            self.sharded_updates += len(items)
        self._end(("dense",) + tuple(id(p) for _, p in items))

    # -- low-rank update of one matrix from its flat shard -------------------------------------------------

    def _sharded_lowrank_update(self, group: dict, p: torch.Tensor, k: int) -> None:
        if p.grad is None:
            return
        _common.check_grad_supported(self, group, 0, p)
        comm = self._get_comm()
        shape = tuple(group[SHAPES_KEY][k])
        identity = group[IDENTITIES_KEY][k]
        label = self._label(group, k)
        plan = self._lowrank_plan(group, shape, identity, label)
        layout = ShardLayout.build(plan.shape2d, p.numel(), comm.rank, comm.world_size)
        m, n = plan.shape2d
        r = plan.rank
        compute = torch.float64 if p.dtype == torch.float64 else torch.float32
        device = p.device
        grad = p.grad.reshape(-1).narrow(0, 0, layout.valid)
        if grad.dtype != compute:
            grad = grad.to(compute)
        blocks = [(b, grad.narrow(0, b.offset, b.numel).view(b.nrows, b.ncols)) for b in layout.blocks]

        state = self.state[p]
        first = len(state) == 0 and self.skip_zero_init_step
        step = state.get("step", 0)
        beta1, beta2 = group["betas"]
        channel = group["scale_type"] == "channel"
        gamma = group["norm_growth_limit"]
        proj = self._projection(group, plan, p, step, compute)
        self._begin()

        # Round 1: the partial projections (+ what else is already known) and the flags.
        if plan.side == RIGHT:
            cut_index = {row: j for j, row in enumerate(layout.cut_rows)}
            extra = 0 if channel else 1  # tensor: ||G||^2
            buf = torch.zeros(_HEADER + extra + len(layout.cut_rows) * r, dtype=compute, device=device)
            cut_part = buf.narrow(0, _HEADER + extra, len(layout.cut_rows) * r).view(len(layout.cut_rows), r)
            low_rank = torch.empty((layout.num_rows, r), dtype=compute, device=device)
            for b, g in blocks:
                part = g @ proj[:, b.col:b.col + b.ncols].T
                if layout.is_partial(b):
                    cut_part[cut_index[b.row]] = part[0]
                else:
                    low_rank[b.row - layout.first_row:b.row - layout.first_row + b.nrows] = part
            if not channel:
                buf[_HEADER] = grad.square().sum()
        else:
            colsq = channel and gamma is not None
            extra = 0 if channel else 1
            size = _HEADER + extra + r * n + (n if colsq else 0)
            buf = torch.zeros(size, dtype=compute, device=device)
            low_rank = buf.narrow(0, _HEADER + extra, r * n).view(r, n)
            col_sq = buf.narrow(0, _HEADER + extra + r * n, n) if colsq else None
            for b, g in blocks:
                low_rank[:, b.col:b.col + b.ncols].addmm_(proj[:, b.row:b.row + b.nrows], g)
                if col_sq is not None:
                    col_sq[b.col:b.col + b.ncols] += g.square().sum(dim=0)
            if not channel:
                buf[_HEADER] = grad.square().sum()
        self._flags([grad], first, buf)
        self._all_reduce(buf)
        if not self._decide(buf, first, [label], {group["nonfinite"]}):
            self._end(identity)
            return
        if plan.side == RIGHT:
            for b, _ in blocks:
                if layout.is_partial(b):
                    low_rank[b.row - layout.first_row] = cut_part[cut_index[b.row]]

        # Moments on the local rows of R (right) or on the full R (left), as apollo_scaling does.
        if "step" in state and tuple(state["exp_avg"].shape) != tuple(low_rank.shape):
            raise RuntimeError(
                f"ZeroApollo: the saved moments of {label} have shape {tuple(state['exp_avg'].shape)} but this rank's "
                f"shard needs {tuple(low_rank.shape)}: the checkpoint was written with another world size or "
                "partitioning, which resuming does not support")
        state = self._init_state(group, p, tuple(low_rank.shape))
        mom, var = adam_moments_(state["exp_avg"], state["exp_avg_sq"], low_rank, beta1, beta2)
        normalized = mom / var.sqrt().add_(group["eps"])
        state["step"] = step = step + 1

        # Scaling factor and ||U|| (round 2 where the rows are spread over ranks).
        if plan.side == RIGHT:
            if channel:
                factor = torch.linalg.vector_norm(normalized, dim=1) / (
                    torch.linalg.vector_norm(low_rank, dim=1) + _SCALING_EPS)
                update_norm = None
                if gamma is not None:
                    u2 = torch.zeros(1, dtype=compute, device=device)
                    for b, g in blocks:
                        rows = factor[b.row - layout.first_row:b.row - layout.first_row + b.nrows]
                        u2 += (rows.square() * g.square().sum(dim=1)).sum()
                    self._all_reduce(u2)
                    update_norm = u2[0].sqrt()
            else:
                owned = 0 if layout.owns_first_row else 1
                sums = torch.stack([normalized[owned:].square().sum(), low_rank[owned:].square().sum()])
                self._all_reduce(sums)
                factor = sums[0].sqrt() / (sums[1].sqrt() + _SCALING_EPS)
                update_norm = factor * buf[_HEADER].sqrt()
        else:
            if channel:
                factor = channel_norms(normalized, 0) / (channel_norms(low_rank, 0) + _SCALING_EPS)
                update_norm = (factor.square() * col_sq).sum().sqrt() if gamma is not None else None
            else:
                factor = torch.linalg.vector_norm(normalized) / (torch.linalg.vector_norm(low_rank) + _SCALING_EPS)
                update_norm = factor * buf[_HEADER].sqrt()
        if gamma is not None:
            limit, state["limiter_norm"] = growth_limit_factor(update_norm, state.get("limiter_norm"), gamma)
            factor = factor * limit
        if group["scale"] != 1.0:
            factor = factor * math.sqrt(group["scale"])

        # W <- W - step_size * G * s on the local slice, then decoupled weight decay.
        step_size = bias_corrected_step_size(float(group["lr"]), beta1, beta2, step, group["correct_bias"])
        weight = p if p.dtype == compute else p.to(compute)
        flat_w = weight.view(-1)
        for b, g in blocks:
            w = flat_w.narrow(0, b.offset, b.numel).view(b.nrows, b.ncols)
            if factor.ndim == 0:
                f = factor
            elif plan.side == RIGHT:
                f = factor[b.row - layout.first_row:b.row - layout.first_row + b.nrows].view(b.nrows, 1)
            else:
                f = factor[b.col:b.col + b.ncols].view(1, b.ncols)
            w.addcmul_(g, f, value=-step_size)
        decay = float(group["lr"]) * group["weight_decay"]
        if decay:
            weight.mul_(1.0 - decay)
        if weight is not p:
            p.copy_(weight)
        self.sharded_updates += 1
        self._end(identity)


# ----------------------------------------------------------------------------------------------------------
# Engine glue


def _zero_stage(cfg: dict) -> int:
    return int((cfg.get("zero_optimization") or {}).get("stage", 0) or 0)


def check_partition_layout(engine: Any, optimizer: Optional[ZeroApollo] = None) -> int:
    """Check, against DeepSpeed's own bookkeeping, that every low-rank matrix of ``optimizer`` is where
    ZeroApollo computes it to be on this rank (stage 1/2: ``lp._hp_mapping``; stage 3: the parameter's
    partition size). Returns the number of matrices checked; raises RuntimeError on a mismatch (a DeepSpeed
    version that partitions differently)."""
    zero_opt = getattr(engine, "optimizer", None)
    optimizer = optimizer if optimizer is not None else getattr(engine, "basic_optimizer", None)
    if not isinstance(optimizer, ZeroApollo) or zero_opt is None:
        return 0
    comm = optimizer._get_comm()
    checked = 0
    if hasattr(zero_opt, "bit16_groups") and hasattr(zero_opt, "single_partition_of_fp32_groups"):  # stage 1/2
        for i, lps in enumerate(zero_opt.bit16_groups):
            group = optimizer.param_groups[i]
            matrices = [k for k, s in enumerate(group[SHAPES_KEY]) if len(s) >= 2 and group[TRAINABLE_KEY][k]]
            if group["rank"] is None or not matrices:
                continue
            if len(lps) != 1:
                raise RuntimeError(f"param group {i} holds {len(lps)} parameters; low-rank matrices need one each")
            shard = zero_opt.single_partition_of_fp32_groups[i]
            layout = ShardLayout.build(matrix_shape(group[SHAPES_KEY][matrices[0]]), shard.numel(), comm.rank,
                                       comm.world_size)
            mapping = getattr(lps[0], "_hp_mapping", None)
            if mapping is None:
                ok = layout.valid == 0
            else:
                lp_addr, hp_addr = mapping.lp_fragment_address, mapping.hp_fragment_address
                ok = (lp_addr.start, lp_addr.numel, hp_addr.start) == (layout.start, layout.valid, 0)
            if not ok:
                raise RuntimeError(f"DeepSpeed placed param group {i} differently from what ZeroApollo assumes "
                                   f"(rank {comm.rank}: expected elements [{layout.start}, "
                                   f"{layout.start + layout.valid}))")
            checked += 1
    elif hasattr(zero_opt, "fp16_groups") and hasattr(zero_opt, "fp32_partitioned_groups_flat"):  # stage 3
        for sub, lps in enumerate(zero_opt.fp16_groups):
            flat = zero_opt.fp32_partitioned_groups_flat[sub]
            group = optimizer.param_groups[zero_opt.sub_group_to_group_id[sub]]
            matrices = [k for k, s in enumerate(group[SHAPES_KEY]) if len(s) >= 2 and group[TRAINABLE_KEY][k]]
            if group["rank"] is None or not matrices:
                continue
            if len(lps) != 1:
                raise RuntimeError(f"sub-group {sub} holds {len(lps)} parameters; low-rank matrices need one each")
            lp = lps[0]
            expected = -(-lp.ds_numel // comm.world_size)
            if tuple(lp.ds_shape) != tuple(group[SHAPES_KEY][matrices[0]]) or lp.partition_numel() != expected or \
                    flat.numel() not in (0, expected):
                raise RuntimeError(f"DeepSpeed partitioned {tuple(lp.ds_shape)} into {lp.partition_numel()} elements "
                                   f"per rank; ZeroApollo expects {expected}")
            checked += 1
    return checked


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, config: Union[str, Path, dict], **kwargs: Any):
    """``deepspeed.initialize`` with the checks APOLLO needs: the config (:func:`check_deepspeed_config`),
    DeepSpeed's set-up step ignored (:meth:`ZeroApollo.deepspeed_setup`), the optimizer put on DeepSpeed's
    data-parallel group, and the partition layout checked (:func:`check_partition_layout`). Returns what
    ``deepspeed.initialize`` returns."""
    import deepspeed

    cfg = check_deepspeed_config(config)
    if isinstance(optimizer, Apollo) and not isinstance(optimizer, ZeroApollo) and _zero_stage(cfg) >= 1:
        raise TypeError("plain Apollo under ZeRO stage >= 1 would project flat shards: use ZeroApollo with "
                        "deepspeed_param_groups(...)")
    setup = optimizer.deepspeed_setup() if isinstance(optimizer, ZeroApollo) else contextlib.nullcontext()
    with setup:
        result = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, **kwargs)
    engine = result[0]
    if isinstance(optimizer, ZeroApollo):
        group = getattr(engine.optimizer, "dp_process_group", None)
        if group is not None and optimizer._comm is None:
            optimizer.process_group = group
        check_partition_layout(engine, optimizer)
    return result


def _zero_init_partitioned(model: nn.Module) -> bool:
    return any(getattr(p, "ds_shape", None) is not None and tuple(p.shape) != tuple(p.ds_shape)
               for p in model.parameters())


def partitioned_lowrank_targets(model: nn.Module, target_modules: TargetModules = ALL_LINEAR
                                ) -> list[tuple[str, torch.nn.Parameter]]:
    """:func:`~lowrank_opt.lowrank_targets`, which reads each parameter's real shape from ``ds_shape`` and so
    also works on a model zero.Init has already partitioned."""
    return lowrank_targets(model, target_modules)


def _partitioned_hf_groups(lowrank: bool, model: nn.Module, weight_decay: float,
                           targets: Optional[TargetModules]) -> list[dict]:
    """What hf.param_groups_for builds (shape-aware, so also for a zero.Init-partitioned model)."""
    from ..registry import OPTIMIZERS
    from .hf import param_groups_for

    spec = next(s for s in OPTIMIZERS.values() if s.lowrank == lowrank)
    return param_groups_for(spec, model, weight_decay, targets)


def hf_optimizer_cls_and_kwargs(name: str, model: nn.Module, args: Any, optim_args: Union[None, str, dict] = None,
                                target_modules: Optional[TargetModules] = None):
    """:func:`lowrank_opt.integrations.hf.optimizer_cls_and_kwargs` for a DeepSpeed run of the HF Trainer:
    APOLLO becomes :class:`ZeroApollo` on :func:`deepspeed_param_groups`; other optimizers are returned as
    they are (element-wise ones are correct on flat shards; per-tensor ones such as AdamP are not). Also
    works on a model built under ZeRO-3's zero.Init (parameters already partitioned when the Trainer builds
    the optimizer): matrices are then recognised by ``ds_shape``."""
    from .hf import optimizer_cls_and_kwargs, resolve_options

    if _zero_init_partitioned(model):
        spec, capped, kwargs = resolve_options(name, args, optim_args)
        kwargs.pop("_cap", None)
        targets = target_modules if target_modules is not None else getattr(args, "optim_target_modules", None)
        if targets is not None and not spec.lowrank:
            raise ValueError(f"optim_target_modules applies to low-rank optimizers only, not to {spec.name!r}")
        kwargs["params"] = _partitioned_hf_groups(spec.lowrank, model, args.weight_decay, targets)
        kwargs.pop("weight_decay", None)
        cls = spec.cls
        if capped:
            raise ValueError(f"--optim {name}: NormGrowthCap limits per-tensor norms, which flat ZeRO shards do "
                             "not have; it is not supported under DeepSpeed yet")
    else:
        cls, kwargs = optimizer_cls_and_kwargs(name, model, args, optim_args, target_modules)
    if cls is Apollo:
        kwargs = dict(kwargs)
        kwargs["params"] = deepspeed_param_groups(kwargs["params"])
        if kwargs.pop("layerwise", False):
            raise ValueError(f"--optim {name} is layer-wise, which DeepSpeed cannot run; use the non-layer-wise name")
        return ZeroApollo, kwargs
    if getattr(cls, "__name__", "").endswith("Capped"):
        raise ValueError(f"--optim {name}: NormGrowthCap limits per-tensor norms, which flat ZeRO shards do not "
                         "have; it is not supported under DeepSpeed yet")
    return cls, kwargs


__all__ = [
    "Block",
    "ShardLayout",
    "TorchDistComm",
    "ZeroApollo",
    "check_deepspeed_config",
    "check_partition_layout",
    "deepspeed_param_groups",
    "hf_optimizer_cls_and_kwargs",
    "initialize",
    "partitioned_lowrank_targets",
]
