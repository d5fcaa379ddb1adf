"""APOLLO: SGD-like memory, AdamW-level performance (Zhu et al., arXiv 2412.05270, MLSys 2025).

Adam's moments are kept for a random projection R of the gradient (r x max(m, n) instead of m x n); the ratio
between the Adam-normalised projected gradient and the projected gradient gives a per-channel (APOLLO) or
per-tensor (APOLLO-Mini) scaling factor that is applied to the raw full-rank gradient.

The math is :mod:`lowrank_opt.functional` (pure functions on the elements a process holds); which elements a
process holds (unsharded, FSDP2, DeepSpeed ZeRO 1-3) is :mod:`lowrank_opt.sharding`. :class:`Apollo` builds,
validates, keeps the state and runs ``step()``.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch.optim import Optimizer

from . import _common
from . import functional as F
from .projection import LEFT, RIGHT, ProjectionPlan, Rank, identity_key, matrix_shape, orientation, resolve_rank
from .projection import seeded_generator
from .quant.int8 import int8_module_of
from .quant.state8bit import MIN_8BIT_SIZE, adamw_step_8bit_, init_adam_state_8bit
from .rounding import rounding_seed
from .sharding import CountingComm, Part, Record, TorchDistComm, full_shape, is_dtensor, recognise

logger = logging.getLogger(__name__)

APOLLO_MINI = dict(rank=1, scale_type="tensor", scale=128.0)
_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# Sharded matrices are updated in batches whose projections hold at most this many bytes at once: one
# all-reduce per batch and round instead of one per matrix, without keeping every matrix's R alive.
_BATCH_BYTES = 64 << 20
SHARD_STATE_KEY = "shard_state"  # state of a DeepSpeed flat shard: {index in group: that parameter's state}

OPTION_SPECS = {
    "lr": _common.LR,
    "betas": _common.BETAS,
    "eps": _common.real(0.0, low_open=True, finite=True,
                        reason="with eps = 0 a zero row of R gives 0/0 and NaN weights"),
    "weight_decay": _common.WEIGHT_DECAY,
    "scale_type": _common.choice("channel", "tensor"),
    "scale": _common.real(0.0, low_open=True, finite=True),
    "update_proj_gap": _common.integer(1),
    "sort_dims": _common.boolean(),
    "transposed": _common.boolean(),
    "stacked": _common.boolean(),
    "norm_growth_limit": _common.real(1.0, finite=True, none=True),
    "seed": _common.integer(),
    "cache_projection": _common.boolean(),
    "correct_bias": _common.boolean(),
    "dense_state_bits": _common.choice(32, 8),
    "nonfinite": _common.NONFINITE,
    "stochastic_rounding": _common.boolean(),
    "foreach": _common.boolean(none=True),
}
# Keys other libraries put in param groups that are no options (DeepSpeed's MoE groups, LR schedulers).
_GROUP_METADATA = {"params", "param_names", "name", "moe", "initial_lr"}


def _state_dtype_name(value: Any, where: str = "") -> Optional[str]:
    if value is None:
        return None
    if value in (torch.float16, "float16"):
        raise ValueError(f"state_dtype float16 cannot hold Adam's second moment (squares beyond 65504 overflow){where}; "
                         "use bfloat16 to halve the moments")
    for name, dtype in _STATE_DTYPES.items():
        if value in (dtype, name):
            return name
    raise ValueError(f"state_dtype must be None or one of {', '.join(_STATE_DTYPES)}, got {value!r}{where}")


class Apollo(Optimizer):
    r"""APOLLO: AdamW-quality updates with SGD-like optimizer memory (arXiv 2412.05270).

    For a weight W (N-D weights are viewed as ``shape[0] x prod(shape[1:])``; with ``stacked=True`` a 3-D weight
    is E matrices, e.g. MoE experts) with gradient G, each step, for each matrix:

    1. Orientation: compress the smaller dimension (``sort_dims=True``): tall/square -> R = G P^T with
       P in R^{r x n}; wide -> R = P G with P in R^{r x m}. ``sort_dims=False`` always compresses the rows.
    2. P has N(0, 1/r) entries, a pure function of (``seed``, the parameter's identity, the matrix's index in
       its stack, ``step // update_proj_gap``): redrawn every ``update_proj_gap`` steps, never saved.
    3. Moments on R: m = b1 m + (1-b1) R, v = b2 v + (1-b2) R^2 (kept across redraws).
    4. R~ = m / (sqrt(v) + eps).
    5. Scaling: channel: s = ||R~|| / (||R|| + 1e-8) over the rank dimension (one factor per index of the
       larger dimension); tensor: one scalar from the Frobenius norms.
    6. U = G * s (the raw full-rank gradient), then
    7. the norm-growth limiter: if ||U|| > gamma * prev then U <- U * gamma * prev / ||U||; prev <- ||U||
       (no limit while prev is absent or 0),
    8. times sqrt(scale) (``scale`` is the paper's alpha squared),
    9. W <- W - lr * sqrt(1 - b2^t) / (1 - b1^t) * U, then decoupled weight decay W <- W - lr * wd * W.

    Parameters with ``ndim < 2`` (and 2-D ones of a ``stacked`` group: E vectors) and every parameter of a group
    whose ``rank`` is ``None`` get AdamW with the same betas/eps/weight decay (eps added to sqrt(v), decay after
    the update).

    The parameter's identity is a hash of its name (``(name, parameter)`` pairs) or of its position; it is
    saved in the state at the first update (``state["identity"]``), so a checkpoint resumed into renamed
    parameters (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``, unnamed ones) keeps its projections.

    **Sharded training.** The same optimizer, built on the model's parameters, trains exactly as unsharded
    under FSDP2 (``Shard(0)`` DTensors) and DeepSpeed ZeRO 1/2/3 (flat shards): each process projects what it
    holds and only what crosses a shard boundary is all-reduced (:mod:`lowrank_opt.sharding`). A layout it
    does not recognise raises; a matrix is never updated as something else because of how it was stored.

    Args:
        params: parameters, ``(name, parameter)`` pairs (``model.named_parameters()``) or param-group dicts
            overriding any option below.
        lr (float): learning rate. Default 1e-3.
        betas (tuple[float, float]): moment decay rates. Default (0.9, 0.999).
        eps (float): added to sqrt(v); > 0. Default 1e-6 (the published APOLLO's).
        weight_decay (float): decoupled weight decay. Default 0.
        rank (int | float | callable | None): an int (clipped to the compressed dimension), a fraction in (0, 1]
            of it, or ``dim -> int`` (saved as the integers it gives); ``None``: plain AdamW. Default 256.
        scale_type (str): ``"channel"`` (APOLLO) or ``"tensor"`` (APOLLO-Mini). Default "channel".
        scale (float): the update is multiplied by sqrt(scale); APOLLO-Mini uses 128. Default 1.
        update_proj_gap (int): steps between projection redraws (T). Default 200.
        sort_dims (bool): compress the smaller dimension; else always the rows. Default True.
        transposed (bool): matrices stored in x out (``transformers``' Conv1D, some experts): oriented as the out x
            in matrix they stand for. Default False.
        stacked (bool): a >= 3-D weight is E matrices along its first axis (MoE experts (E, out, in)), each with its
            own projection, moments (stored (E, ...)), scaling and limiter, computed together; a 2-D one is E
            vectors (AdamW). Default False: N-D weights are one ``shape[0] x prod(shape[1:])`` matrix (conv kernels).
        norm_growth_limit (float | None): gamma of the limiter; ``None``: off. Default 1.01.
        seed (int): seed of every projection and of the stochastic-rounding bits. Default 0.
        cache_projection (bool): keep P between redraws (r x min(m, n) per matrix, never saved). Default False.
        state_dtype (None | str | torch.dtype): dtype of the moments; ``None``: fp32 (fp64 for fp64 weights).
        dense_state_bits (int): 8 keeps the AdamW moments of plain tensors of >= 4,096 elements in bitsandbytes'
            blockwise 8-bit form (2 bytes per element instead of 8; not with FSDP2/ZeRO shards). Default 32.
        correct_bias (bool): fold Adam's bias correction into the step size. Default True.
        nonfinite (str): a gradient with inf/nan (or too large for the math) raises before anything changes
            (``"raise"``), or that tensor is skipped and counted in ``skipped_tensors`` (``"skip"``).
        layerwise (bool): update each parameter inside backward as soon as its gradient exists and free it (no
            gradient accumulation, data-parallel all-reduce, sharding or global clipping). Default False.
        stochastic_rounding (bool): write bf16 weights back with stochastic rounding. Default True.
        foreach (bool | None): ``None``/``True``: plain tensors batched with foreach ops or in pieces of 2^20 (CPU)
            / 2^22 (GPU) elements, narrower weights through fp32 pieces; ``False``: whole tensors, the same numbers.
        process_group: the group DeepSpeed's flat shards are split over (default: the world).
        comm: ``rank``, ``world_size`` and ``all_reduce_(tensor)`` to use instead of torch.distributed (tests).

    Attributes:
        skipped_tensors: tensor updates skipped for a non-finite gradient.
        comm_bytes_last_step / comm_bytes_total / comm_bytes_by_param: bytes all-reduced in the latest step, in
            all, and per shared parameter in the latest step.
        init_steps_skipped: DeepSpeed set-up calls recognised and skipped.

    Example:
        >>> groups = lowrank_param_groups(model, "all-linear", rank=128)
        >>> opt = Apollo(groups, lr=1e-3, weight_decay=0.0)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, rank: Rank = 256, scale_type: str = "channel",
                 scale: float = 1.0, update_proj_gap: int = 200, sort_dims: bool = True, transposed: bool = False,
                 stacked: bool = False, norm_growth_limit: Optional[float] = 1.01, seed: int = 0,
                 cache_projection: bool = False, state_dtype: Union[None, str, torch.dtype] = None,
                 dense_state_bits: int = 32, correct_bias: bool = True, nonfinite: str = "raise",
                 layerwise: bool = False, stochastic_rounding: bool = True, foreach: Optional[bool] = None,
                 process_group: Any = None, comm: Any = None):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas, eps=eps,
                        weight_decay=weight_decay, rank=rank, scale_type=scale_type, scale=scale,
                        update_proj_gap=update_proj_gap, sort_dims=sort_dims, transposed=transposed, stacked=stacked,
                        norm_growth_limit=norm_growth_limit, seed=seed, cache_projection=cache_projection,
                        state_dtype=state_dtype, dense_state_bits=dense_state_bits, correct_bias=correct_bias,
                        nonfinite=nonfinite, stochastic_rounding=stochastic_rounding, foreach=foreach)
        if not isinstance(layerwise, bool):
            raise TypeError(f"layerwise must be a bool, got {layerwise!r}")
        self.layerwise = layerwise
        self._process_group, self._comm = process_group, comm
        self._records: list[list[Record]] = []
        self._groups: list[dict] = []  # the group dicts the records belong to
        self._param_count = 0
        self.skipped_tensors = 0
        self.init_steps_skipped = 0
        self._counter = CountingComm()
        self._init_caches()
        super().__init__(params, defaults)
        _common.check_param_dtypes(self)
        if layerwise:
            self._register_layerwise_hooks()

    def _init_caches(self) -> None:
        """What is rebuilt from param_groups: lookups, plans, the projection cache, hooks."""
        self._plans: dict[int, tuple[Any, Optional[ProjectionPlan]]] = {}  # id(record) -> (key, plan)
        self._where: dict[torch.Tensor, tuple[int, int]] = {}  # parameter -> (group index, index in group)
        self._projection_cache: dict[torch.Tensor, dict] = {}  # parameter -> {shard index: ((refresh, identity), P)}
        self._flat_cache: dict = {}
        self._hooks: list = []
        self._warned_full_rank = False
        self._seen_sq: Optional[torch.Tensor] = None

    # -- construction-time validation ------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            unknown = sorted(set(group) - set(self.defaults) - _GROUP_METADATA)
            if unknown:
                raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}"
                                 f"{_common.group_where(len(self.param_groups) - 1)}; Apollo's options are "
                                 f"{', '.join(sorted(self.defaults))}")
            self._validate_group(group, _common.group_where(len(self.param_groups) - 1))
        except Exception:
            self.param_groups.pop()
            raise
        names = group.get("param_names")
        records = []
        for i, p in enumerate(group["params"]):
            name = names[i] if names is not None else None
            records.append(Record(name, full_shape(p), bool(p.requires_grad), weakref.ref(p),
                                  identity_key(name if name is not None else self._param_count), i))
            self._param_count += 1
        self._records.append(records)
        self._groups.append(group)

    def _validate_group(self, group: dict, where: str) -> None:
        """Every option by the declarative check (:data:`OPTION_SPECS`), then the rank rule against every matrix;
        at construction and on every group a checkpoint would load."""
        _common.validate_group(group, OPTION_SPECS, where)
        group["betas"] = tuple(group["betas"])
        group["state_dtype"] = _state_dtype_name(group["state_dtype"], where)
        if group["rank"] is None:
            return
        if isinstance(group["rank"], bool) or not (isinstance(group["rank"], (int, float)) or callable(group["rank"])):
            raise _common.OptionTypeError(f"rank must be None, an int, a float in (0, 1] or a callable, got "
                                          f"{group['rank']!r} ({type(group['rank']).__name__}){where}")
        for i, p in enumerate(group["params"]):
            shape = full_shape(p)
            label = _common.param_label(group, i, p) + where
            if group["transposed"] and len(shape) != (3 if group["stacked"] else 2):
                raise ValueError(f"transposed=True is for matrices stored as in x out ({'(E, in, out) stacks' if group['stacked'] else '2-D weights'}), "
                                 f"got shape {shape} for {label}")
            if _matrix_view(group, shape) is not None:
                _resolve_rank(group, shape, label)

    # -- records, plans, projections -------------------------------------------------------------------

    def _group_index(self, group: dict) -> int:
        """The index of ``group`` among the groups the optimizer was built with (DeepSpeed ZeRO 1/2 call
        ``step()`` with ``param_groups = [one group]``: the dict is one of ours, found by identity)."""
        for attempt in range(2):
            for gi, g in enumerate(self._groups):
                if g is group:
                    return gi
            if attempt == 0 and len(self.param_groups) == len(self._records):  # groups replaced since (a wrapper's load)
                self._groups = list(self.param_groups)
        raise RuntimeError("Apollo.step() got a param group it was not built with; build the optimizer on the "
                           "parameters it will train")

    @staticmethod
    def _label(group: dict, record: Record) -> str:
        if record.name is not None:
            return repr(record.name)
        return f"param {record.index} (shape {record.shape}) of its param group"

    def _plan(self, group: dict, record: Record) -> Optional[ProjectionPlan]:
        """How a parameter is projected, or None for plain AdamW; recomputed only when the group's rank rule,
        orientation or stacking changes."""
        view = _matrix_view(group, record.shape) if group["rank"] is not None else None
        if view is None:
            return None
        rule = id(group["rank"]) if callable(group["rank"]) else group["rank"]
        key = (rule, group["sort_dims"], group.get("transposed", False), group.get("stacked", False))
        cached = self._plans.get(id(record))
        if cached is not None and cached[0] == key:
            return cached[1]
        count, shape2d = view
        side = _side(group, shape2d)
        label = self._label(group, record)
        rank = _resolve_rank(group, record.shape, label)
        plan = ProjectionPlan(shape2d, side, rank, count, stacked=group.get("stacked", False) and len(record.shape) >= 3)
        compressed = shape2d[1] if side == RIGHT else shape2d[0]
        if rank >= compressed and not self._warned_full_rank:
            self._warned_full_rank = True
            logger.warning("Apollo: rank %d >= the compressed dimension %d of %s (shape %s): its moments are as large "
                           "as AdamW's; give it a smaller rank, or rank=None for plain AdamW (said once per optimizer)",
                           rank, compressed, label, record.shape)
        self._plans[id(record)] = (key, plan)
        return plan

    def _locate(self, param: torch.Tensor) -> tuple[dict, int, Record]:
        where = self._where.get(param)
        if where is None or where[0] >= len(self.param_groups) or \
                where[1] >= len(self.param_groups[where[0]]["params"]) or \
                self.param_groups[where[0]]["params"][where[1]] is not param:
            # groups replaced since (load_state_dict, accelerate swapping in sharded parameters)
            self._where = {p: (gi, i) for gi, g in enumerate(self.param_groups) for i, p in enumerate(g["params"])}
            where = self._where.get(param)
            if where is None:
                raise KeyError("the tensor is not a parameter of this optimizer")
        gi, i = where
        return self.param_groups[gi], i, self._records[gi][i]

    def _identity(self, state: dict, record: Record) -> int:
        return int(state.get("identity", record.identity))

    def projection_matrix(self, param: torch.Tensor, step: Optional[int] = None) -> Optional[torch.Tensor]:
        """The projection P (fp32, on the parameter's device) that ``param`` uses at optimizer step ``step``
        (counted from 0; default: its next update): (rank, compressed dim), or (E, rank, compressed dim) for a
        stacked parameter; ``None`` for plain AdamW. R = G P^T when P's last dimension is G's columns, else
        R = P G."""
        group, _, record = self._locate(param)
        plan = self._plan(group, record)
        if plan is None:
            return None
        state = self.state.get(param, {})
        step = state.get("step", 0) if step is None else step
        device = param.to_local().device if is_dtensor(param) else param.device
        return plan.matrix(group["seed"], self._identity(state, record), step, group["update_proj_gap"], device)

    def _projection(self, part: Part, plan: ProjectionPlan, identity: int, step: int, dtype: torch.dtype) -> torch.Tensor:
        """P of the matrices ``part`` holds, (k, r, d): drawn from (seed, identity, refresh), or kept between
        redraws with ``cache_projection``."""
        group = part.group
        gap = group["update_proj_gap"]
        device = part.weight.device

        def draw() -> torch.Tensor:
            full = plan.matrix(group["seed"], identity, step, gap, device, dtype)
            full = full.unsqueeze(0) if full.ndim == 2 else full
            first, count = part.layout.first_matrix, part.layout.num_matrices
            return full if count == full.shape[0] else full[first:first + count]

        if not group["cache_projection"]:
            return draw()
        cache = self._projection_cache.setdefault(part.key, {})  # keyed by the parameter: counted as its state bytes
        cached = cache.get(part.shard_index)
        if cached is None or cached[0] != (step // gap, identity) or cached[1].dtype != dtype:
            cached = cache[part.shard_index] = ((step // gap, identity), draw())
        return cached[1]

    # -- state, copies and checkpoints -----------------------------------------------------------------

    def __getstate__(self) -> dict:
        # Hooks, weak references, process groups and caches do not pickle; rebuilt in __setstate__.
        state = super().__getstate__()
        state.update(layerwise=self.layerwise, skipped_tensors=self.skipped_tensors, _param_count=self._param_count,
                     init_steps_skipped=self.init_steps_skipped,
                     _records=[[(r.name, r.shape, r.trainable, r.identity) for r in rs] for rs in self._records])
        return state

    def __setstate__(self, state: dict) -> None:
        if "_records" in self.__dict__ and "_records" not in state:
            # torch's load_state_dict ends with __setstate__({"state", "param_groups"}) on a live optimizer.
            super().__setstate__(state)
            self._fill_defaults()
            self._groups = list(self.param_groups)
            return
        records = state.pop("_records")
        extras = {k: state.pop(k) for k in ("layerwise", "skipped_tensors", "init_steps_skipped", "_param_count")}
        super().__setstate__(state)
        self._fill_defaults()
        self.__dict__.update(extras)
        self._process_group = self._comm = None
        self._counter = CountingComm()
        self._init_caches()
        self._groups = list(self.param_groups)
        self._records = []
        for group, rs in zip(self.param_groups, records):
            self._records.append([])
            for i, ((name, shape, trainable, identity), p) in enumerate(zip(rs, group["params"])):
                self._records[-1].append(Record(name, shape, trainable, weakref.ref(p), identity, i))
        if self.layerwise:
            self._register_layerwise_hooks()

    def _fill_defaults(self) -> None:
        """torch's ``__setstate__`` adds ``differentiable`` to ``defaults`` (a later group would then differ from
        the first ones), and a checkpoint's groups may predate an option: the constructor's values fill them."""
        self.defaults.pop("differentiable", None)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def state_dict(self) -> dict:
        """torch's state dict, with a callable ``rank`` replaced by the integer it gives each parameter (``None``
        for plain AdamW), so checkpoints load with ``torch.load(weights_only=True)``."""
        sd = super().state_dict()
        for saved, group, records in zip(sd["param_groups"], self.param_groups, self._records):
            if callable(group["rank"]):
                saved["rank"] = [_resolve_rank(group, r.shape, self._label(group, r))
                                 if _matrix_view(group, r.shape) is not None else None for r in records]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint, trusting nothing in it: every option is checked as the constructor checks it, and
        every state tensor must have the shape this parameter needs (a checkpoint of another model is refused
        naming the parameter and both shapes), all before anything changes. Saved state dtypes are kept. A
        rank saved as per-parameter integers keeps the constructor's rule, which must give the same integers."""
        state_dict = dict(state_dict)
        saved_groups = [dict(g) for g in state_dict.get("param_groups", [])]
        state_dict["param_groups"] = saved_groups
        for index, (saved, group, records) in enumerate(zip(saved_groups, self.param_groups, self._records)):
            if not isinstance(saved.get("rank"), (list, tuple)):
                continue
            rule = group["rank"]
            for i, (want, r) in enumerate(zip(saved["rank"], records)):
                if want is None or _matrix_view({**self.defaults, **saved}, r.shape) is None:
                    continue
                got = _resolve_rank({**self.defaults, **saved, "rank": rule}, r.shape, self._label(group, r)) \
                    if rule is not None else None
                if got != want:
                    raise ValueError(f"the checkpoint has rank {want} for {self._label(group, r)} in param_groups["
                                     f"{index}], but this optimizer's rank rule {rule!r} gives {got}: build the optimizer "
                                     "with the rank it was trained with")
            saved["rank"] = rule

        def layout(group: dict, i: int, p: torch.Tensor) -> dict:
            gi = self._group_index(group)
            records = self._records[gi]
            if len(group["params"]) != len(records) or tuple(p.shape) != records[i].shape:
                return {}  # a flat shard (DeepSpeed) or a copy: its pieces' shapes depend on the layout
            saved = {**self.defaults, **saved_groups[gi]}
            return _state_layout(saved, records[i], self._label(group, records[i]))

        self._projection_cache.clear()
        _common.load_state_dict_checked(self, state_dict, check_group=self._validate_group, layout=layout)

    def _state(self, part: Part) -> dict:
        """The part's state, or a new empty dict registered when the first update creates it."""
        state = self.state.get(part.key)
        if part.shard_index is not None:
            state = (state or {}).get(SHARD_STATE_KEY, {}).get(part.shard_index)
        return state if state is not None else {}

    def _register_state(self, part: Part, state: dict) -> None:
        if part.shard_index is None:
            self.state[part.key] = state
        else:
            self.state[part.key].setdefault(SHARD_STATE_KEY, {})[part.shard_index] = state

    def _init_state(self, part: Part, plan: Optional[ProjectionPlan]) -> dict:
        """The part's state, with zero moments on its first update."""
        state = self._state(part)
        if "step" in state:
            return state
        group = part.group
        dtype = _STATE_DTYPES[group["state_dtype"]] if group["state_dtype"] else F.compute_dtype(part.weight.dtype)
        state["step"] = 0
        state["identity"] = part.record.identity
        if plan is None:
            shape, global_shape = tuple(part.weight.shape), tuple(part.dtensor.shape) if part.dtensor is not None else None
        elif plan.side == RIGHT:
            layout = part.layout
            rows = (layout.num_matrices, plan.shape2d[0]) if plan.stacked and layout.whole else (layout.num_rows,)
            shape, global_shape = (*rows, plan.rank), plan.moment_shape
        else:
            shape = (part.layout.num_matrices, plan.rank, plan.shape2d[1]) if plan.stacked else plan.moment_shape
            global_shape = plan.moment_shape if plan.stacked else None
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = part.zeros(shape, dtype, global_shape)
        self._register_state(part, state)
        return state

    # -- step ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimization step. A gradient with inf/nan raises (before anything changes) or is skipped, per
        ``nonfinite``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update([(group, i, p) for group in self.param_groups for i, p in enumerate(group["params"])])
        self._seen_sq = None  # a layer-wise backward pass ends with this step()
        return loss

    @torch.no_grad()
    def step_parameter(self, param: torch.Tensor) -> None:
        """Update one parameter from its gradient (what the layer-wise hooks call)."""
        group, i, _ = self._locate(param)
        self._update([(group, i, param)])

    def gradient_norm_seen(self) -> Optional[float]:
        """Layer-wise mode: the 2-norm of all gradients updated since the last ``step()``, which global clipping
        would have measured (the HF Trainer glue logs it as ``grad_norm``); None when none was seen."""
        return None if self._seen_sq is None else float(self._seen_sq.sqrt())

    def _register_layerwise_hooks(self) -> None:
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                self.step_parameter(p)
                p.grad = None

        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    if is_dtensor(p):
                        raise ValueError("layerwise=True cannot run on FSDP2 parameters (their gradients are reduced "
                                         "after backward); use layerwise=False")
                    self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def remove_hooks(self) -> None:
        """Detach the layer-wise hooks (updates then happen in ``step()`` again)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @property
    def process_group(self) -> Any:
        """The process group flat (DeepSpeed) shards are reduced over; setting it takes effect at the next step."""
        return self._process_group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        self._process_group, self._comm = group, None
        self._flat_cache.clear()

    @property
    def comm_bytes_last_step(self) -> int:
        return sum(self._counter.last.values())

    @property
    def comm_bytes_total(self) -> int:
        return self._counter.total

    @property
    def comm_bytes_by_param(self) -> dict[str, int]:
        return self._counter.by_label

    def _flat_comm(self) -> Any:
        if self._comm is None:
            self._comm = TorchDistComm(self._process_group)
        return self._comm

    def _update(self, candidates: list) -> None:
        parts: list[Part] = []
        for group, i, p in candidates:
            if p.grad is None:
                continue
            _common.check_grad_supported(self, group, i, p)
            gi = self._group_index(group)
            records = self._records[gi]
            parts.extend(recognise(group, records, i, p, lambda r, g=group: _stack(self._plan(g, r)), self._flat_comm,
                                   self._flat_cache, _common.group_where(gi)))
        if not parts:
            return
        for part in parts:
            if part.shared:
                self._counter.by_label[self._part_label(part)] = 0
        if all(part.is_copy for part in parts) and not any(self._state(part) for part in parts):
            from .integrations.deepspeed import is_setup_step

            if is_setup_step([part.grad for part in parts]):
                self.init_steps_skipped += 1
                logger.info("Apollo: DeepSpeed's set-up step() (all-zero gradients on copies of the parameters) "
                            "skipped: no step counted, no state, no weight decay")
                return
        plans = {id(part): self._plan(part.group, part.record) for part in parts}
        sq = self._screen(parts, plans)
        lowrank = [part for part in parts if plans[id(part)] is not None and id(part) in sq]
        dense = [part for part in parts if plans[id(part)] is None and id(part) in sq
                 and (part.weight.numel() or part.shard_index is None)]
        batch, batch_bytes = [], 0
        for part in lowrank:  # whole matrices one at a time; shared ones in batches that share each all-reduce
            if not part.shared:
                self._lowrank_update([part], plans, sq)
                continue
            batch.append(part)
            batch_bytes += math.prod(plans[id(part)].moment_shape) * 4
            if batch_bytes >= _BATCH_BYTES:
                self._lowrank_update(batch, plans, sq)
                batch, batch_bytes = [], 0
        if batch:
            self._lowrank_update(batch, plans, sq)
        self._dense_update(dense)

    def _part_label(self, part: Part) -> str:
        return self._label(part.group, part.record)

    def _screen(self, parts: list[Part], plans: dict) -> dict[int, Optional[torch.Tensor]]:
        """Before anything changes: the squared gradient norms step 6 needs (:func:`_squared_norms`) and, from
        them, the parts whose gradient is faulty (a sum of squares that is not finite: inf/nan, or too large for
        the math), decided alike on every process. Faulty parts raise (``nonfinite="raise"``, the default) or
        are left out and counted. Returns the norms of the parts to update, by ``id(part)``."""
        sqs, totals = _squared_norms(parts, plans)
        if all(t.device.type == "meta" for t in totals):
            return sqs  # the estimator's dry run: no values to check
        if self.layerwise:  # what gradient clipping would have seen
            for t in totals:
                self._seen_sq = t.double() if self._seen_sq is None else self._seen_sq + t.double().to(self._seen_sq.device)
        flags = [not f for f in _host_bools([torch.isfinite(t) for t in totals])]
        raise_here = any(flag and part.group["nonfinite"] == "raise" for flag, part in zip(flags, parts))
        elsewhere = _share_faults(parts, plans, sqs, flags, raise_here, self._counter, self._part_label)
        bad = [k for k, flag in enumerate(flags) if flag]
        if bad and not (raise_here or elsewhere):
            self.skipped_tensors += len(bad)
            logger.warning("Apollo: skipped the update of %s (non-finite gradient)",
                           ", ".join(self._part_label(parts[k]) for k in bad))
        elif bad or elsewhere:
            faults = [(self._part_label(parts[k]), _fault_reason(parts[k])) for k in bad] or [
                ("a parameter held by another process", "non-finite gradient (inf or nan)")]
            changed = "no parameter or optimizer state was changed"
            if any(part.shared for part in parts):
                changed += " on any process"
            elif self.layerwise:
                changed = "nothing of these tensors was changed (parameters updated earlier in this backward keep their update)"
            raise RuntimeError(_common.gradient_fault_message(self, faults, changed=changed))
        return {id(part): sqs[id(part)] for k, part in enumerate(parts) if not flags[k]}

    # -- low-rank and plain updates ---------------------------------------------------------------------

    def _lowrank_update(self, batch: list[Part], plans: dict, sqs: dict) -> None:
        """Steps 1-9 (:func:`lowrank_opt.functional.apollo_update_`) for a batch sharing one comm. A process
        holding no element of a shared matrix adds zeros and keeps no state for it (except under FSDP2, where
        every process keeps every parameter's state, as torch.distributed.checkpoint expects)."""
        comm = batch[0].comm
        steps, states = [], []
        for part in batch:
            plan, group = plans[id(part)], part.group
            holds = part.weight.numel() > 0 or part.dtensor is not None
            state = self._init_state(part, plan) if holds else {"step": 0}  # else: adds zeros, keeps no state
            identity = self._identity(state, part.record)
            compute = F.compute_dtype(part.weight.dtype)
            proj = self._projection(part, plan, identity, state["step"], compute)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            limiter = state.get("limiter_norm")
            if holds:
                exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
            else:
                empty = (0, plan.rank) if plan.side == RIGHT else (0, plan.rank, plan.shape2d[1])
                exp_avg = exp_avg_sq = torch.zeros(empty, dtype=compute, device=part.weight.device)
            steps.append(F.LowRankStep(
                weight=part.weight, grad=part.grad, layout=part.layout, side=plan.side, proj=proj, exp_avg=exp_avg,
                exp_avg_sq=exp_avg_sq, limiter=None if limiter is None else _local(limiter).reshape(-1),
                sq=sqs[id(part)], beta1=beta1, beta2=beta2, eps=group["eps"],
                tensor_wise=group["scale_type"] == "tensor", scale=group["scale"], gamma=group["norm_growth_limit"],
                step_size=F.bias_corrected_step_size(float(group["lr"]), beta1, beta2, state["step"], group["correct_bias"]),
                decay=float(group["lr"]) * group["weight_decay"], shared=part.shared,
                chunk=F.chunk_elements(part.weight.device), fast=group["foreach"] is not False,
                rounding_seed=self._rounding_seed(part, state), int8=int8_module_of(part.weight),
                label=self._part_label(part) if part.weight.dtype == torch.float16 else ""))
            states.append((state, holds))

        rounds = iter(range(2))

        def reduce(tensors: list[list[torch.Tensor]]) -> None:
            """Sum each part's tensors over the processes of ``comm``, all in one buffer."""
            key = (next(rounds),) + tuple(id(p.key) for p in batch)
            flat = [t for ts in tensors for t in ts]
            if comm is None or not flat:
                return
            for part, ts in zip(batch, tensors):
                self._counter.attribute(self._part_label(part), comm, sum(t.numel() * t.element_size() for t in ts))
            dtype = torch.float64 if any(t.dtype == torch.float64 for t in flat) else flat[0].dtype
            buf = torch.cat([t.reshape(-1).to(dtype) for t in flat])
            self._counter.all_reduce_(comm, buf, key)
            pos = 0
            for t in flat:
                t.copy_(buf[pos:pos + t.numel()].view(t.shape))
                pos += t.numel()

        limiters = F.apollo_update_(steps, reduce)
        for (state, holds), limiter, part, plan in zip(states, limiters, batch, (plans[id(p)] for p in batch)):
            if not holds:
                continue
            if limiter is None:
                continue
            stacked = plan.stacked  # (E,) for a stack (a DTensor under FSDP2), () for a matrix
            if part.dtensor is not None and stacked:
                if "limiter_norm" not in state:
                    state["limiter_norm"] = part.zeros(limiter.shape, limiter.dtype, (plan.count,))
                state["limiter_norm"].to_local().copy_(limiter)
            else:
                state["limiter_norm"] = limiter if stacked else limiter.view(())

    def _dense_update(self, parts: list[Part]) -> None:
        """Plain AdamW (:func:`lowrank_opt.functional.dense_update_`; 8-bit moments through
        :func:`lowrank_opt.quant.state8bit.adamw_step_8bit_`)."""
        steps = []
        for part in parts:
            group = part.group
            beta1, beta2 = group["betas"]
            label = self._part_label(part)
            eight_bit = _uses_8bit(part, label)
            state = self._state(part)
            if "step" not in state:
                if eight_bit:
                    state.update(step=0, identity=part.record.identity, **init_adam_state_8bit(part.weight))
                    self._register_state(part, state)
                else:
                    state = self._init_state(part, None)
            state["step"] += 1
            lr, seed = float(group["lr"]), self._rounding_seed(part, state)
            if eight_bit:
                generator = None if seed is None else seeded_generator(part.weight.device, seed)
                adamw_step_8bit_(part.weight, part.grad, state, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                                 step=state["step"], weight_decay=group["weight_decay"],
                                 correct_bias=group["correct_bias"], generator=generator, label=label)
                continue
            steps.append(F.DenseStep(
                weight=part.weight, grad=part.grad, exp_avg=_local(state["exp_avg"]),
                exp_avg_sq=_local(state["exp_avg_sq"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                step_size=F.bias_corrected_step_size(lr, beta1, beta2, state["step"], group["correct_bias"]),
                decay=lr * group["weight_decay"], fast=group["foreach"] is not False,
                chunk=F.chunk_elements(part.weight.device), rounding_seed=seed, int8=int8_module_of(part.weight),
                label=label))
        F.dense_update_(steps)

    def _rounding_seed(self, part: Part, state: dict) -> Optional[int]:
        """The seed of this step's rounding bits (bf16 stochastic rounding, int8 re-quantization), a pure function
        of (seed, identity, step, first local element); None to round to nearest."""
        if int8_module_of(part.weight) is None and (part.weight.dtype != torch.bfloat16
                                                    or not part.group["stochastic_rounding"]):
            return None
        return rounding_seed(part.group["seed"], self._identity(state, part.record), state["step"], part.round_offset)

    def math_dtype(self, p: torch.Tensor) -> torch.dtype:
        """The dtype this optimizer computes in for ``p`` (what NormGrowthCap holds gradients to)."""
        return F.compute_dtype(p.dtype)


def _state_layout(group: dict, record: Record, label: str) -> dict:
    """What each state key of a whole parameter must hold under the options of ``group`` (load_state_dict's
    checks): its step count and identity, the limiter norm, and moments of the projection's shape (low-rank),
    the parameter's (AdamW) or 8-bit codes and block maxima."""
    keys = {"step": _common.StateKey(_common.COUNT), "identity": _common.StateKey(_common.COUNT, required=False),
            "limiter_norm": _common.StateKey(_limiter_shape(group, record.shape), required=False)}
    view = _matrix_view(group, record.shape) if group["rank"] is not None else None
    if view is not None:
        count, shape2d = view
        rank = _resolve_rank(group, record.shape, label)
        moments = ProjectionPlan(shape2d, _side(group, shape2d), rank, count,
                                 group.get("stacked", False) and len(record.shape) >= 3).moment_shape
    elif group.get("dense_state_bits", 32) == 8 and math.prod(record.shape) >= MIN_8BIT_SIZE:
        blocks = (-(-math.prod(record.shape) // 256),)
        return {**keys, "exp_avg_codes": _common.StateKey(record.shape, dtype=torch.uint8),
                "exp_avg_sq_codes": _common.StateKey(record.shape, dtype=torch.uint8),
                "exp_avg_absmax": _common.StateKey(blocks), "exp_avg_sq_absmax": _common.StateKey(blocks)}
    else:
        moments = record.shape
    return {**keys, "exp_avg": _common.StateKey(tuple(moments)), "exp_avg_sq": _common.StateKey(tuple(moments))}


def _squared_norms(parts: list[Part], plans: dict) -> tuple[dict, list[torch.Tensor]]:
    """The squared gradient norms step 6 needs (per channel or matrix, :func:`lowrank_opt.functional.grad_sq`;
    None for plain tensors), by ``id(part)``, and each part's total (plain tensors: one batched norm each)."""
    sqs: dict[int, Optional[torch.Tensor]] = {}
    totals: list[torch.Tensor] = [None] * len(parts)  # type: ignore[list-item]
    dense: dict[tuple, list[int]] = {}
    for k, part in enumerate(parts):
        plan = plans[id(part)]
        sqs[id(part)] = None
        if plan is None:
            dense.setdefault((part.grad.device, part.grad.dtype), []).append(k)
            continue
        sqs[id(part)] = F.grad_sq(part.grad, part.layout, plan.side, part.group["scale_type"] == "tensor",
                                  F.compute_dtype(part.weight.dtype), F.chunk_elements(part.weight.device))
        totals[k] = sqs[id(part)].sum()
    for (_, dtype), ks in dense.items():
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        for k, norm in zip(ks, _common.norms_wide([parts[k].grad for k in ks], wide)):
            totals[k] = norm.square()
    return sqs, totals


def _share_faults(parts: list[Part], plans: dict, sqs: dict, flags: list[bool], raise_here: bool,
                  counter: CountingComm, label_of: Callable[[Part], str]) -> bool:
    """One all-reduce per comm: "some process raises", each shared part's flag, and the squared norms other
    processes add to (left projections, tensor-wise). Updates ``flags`` and ``sqs`` in place; returns whether
    another process raises."""
    elsewhere = False
    by_comm: dict[int, list[int]] = {}
    for k, part in enumerate(parts):
        if part.shared:
            by_comm.setdefault(id(part.comm), []).append(k)
    for ks in by_comm.values():
        comm, device = parts[ks[0]].comm, parts[ks[0]].weight.device
        dtype = torch.float64 if any(parts[k].weight.dtype == torch.float64 for k in ks) else torch.float32
        buf_parts = [torch.tensor([float(raise_here)], dtype=dtype, device=device)]
        summed = {}
        for k in ks:
            part, plan = parts[k], plans[id(parts[k])]
            buf_parts.append(torch.tensor([float(flags[k])], dtype=dtype, device=device))
            summed[k] = F.reduced_sq_parts(sqs[id(part)], part.layout, plan.side,
                                           part.group["scale_type"] == "tensor") if plan is not None else []
            buf_parts.extend(t.reshape(-1).to(device, dtype) for t in summed[k])
            counter.attribute(label_of(part), comm, (1 + sum(t.numel() for t in summed[k])) * buf_parts[0].element_size())
        buf = torch.cat(buf_parts)
        counter.all_reduce_(comm, buf, ("check",) + tuple(id(parts[k].key) for k in ks))
        values = buf.cpu()
        elsewhere = elsewhere or float(values[0]) > 0
        pos = 1
        for k in ks:
            flags[k] = float(values[pos]) > 0
            pos += 1
            for t in summed[k]:
                t.copy_(buf[pos:pos + t.numel()].view(t.shape))
                pos += t.numel()
            if summed[k]:
                F.scatter_reduced_sq(sqs[id(parts[k])], summed[k], parts[k].layout)
    return elsewhere


def _side(group: dict, shape2d: tuple[int, int]) -> str:
    """Which side of the stored matrix is projected; a ``transposed`` matrix is oriented as the out x in matrix
    it stands for, so a Conv1D weight gets the Linear's channels and P."""
    if not group.get("transposed", False):
        return orientation(shape2d, group["sort_dims"])
    return LEFT if orientation((shape2d[1], shape2d[0]), group["sort_dims"]) == RIGHT else RIGHT


def _resolve_rank(group: dict, shape: tuple[int, ...], label: str) -> int:
    _, shape2d = _matrix_view(group, shape)
    return resolve_rank(group["rank"], shape2d[1] if _side(group, shape2d) == RIGHT else shape2d[0], label)


def _uses_8bit(part: Part, label: str) -> bool:
    """Whether a plain tensor keeps 8-bit moments (its group asks, and it is large enough)."""
    if part.group.get("dense_state_bits", 32) != 8 or part.weight.numel() < MIN_8BIT_SIZE:
        return False
    if part.dtensor is not None or part.shard_index is not None:
        raise NotImplementedError(f"dense_state_bits=8 for the sharded {label}: its 256-element blocks would cross "
                                  "shard boundaries; use dense_state_bits=32 with FSDP2/ZeRO")
    if int8_module_of(part.weight) is not None:
        raise NotImplementedError(f"dense_state_bits=8 for the int8 weight {label}: give it a low-rank group or "
                                  "dense_state_bits=32")
    return True


def _matrix_view(group: dict, shape: tuple[int, ...]) -> Optional[tuple[int, tuple[int, int]]]:
    """(E, (m, n)): how a parameter of ``shape`` in ``group`` is viewed as matrices, or None for plain AdamW (1-D,
    empty, or a stacked group's 2-D tensor of E vectors)."""
    if len(shape) < 2 or not math.prod(shape):
        return None
    if group.get("stacked", False):
        if len(shape) < 3:
            return None
        return shape[0], matrix_shape(shape[1:])
    return 1, matrix_shape(shape)


def _limiter_shape(group: dict, shape: tuple[int, ...]) -> tuple[int, ...]:
    view = _matrix_view(group, shape) if group.get("rank") is not None else None
    return (view[0],) if view is not None and group.get("stacked", False) else ()


def _stack(plan: Optional[ProjectionPlan]) -> Optional[tuple[int, int, int]]:
    return plan.stack if plan is not None else None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _host_bools(values: list[torch.Tensor]) -> list[bool]:
    """0-d bool tensors to Python bools with one host synchronisation per device."""
    out: list[bool] = [False] * len(values)
    by_device: dict = {}
    for k, v in enumerate(values):
        by_device.setdefault(v.device, []).append(k)
    for ks in by_device.values():
        for k, v in zip(ks, torch.stack([values[k] for k in ks]).tolist()):
            out[k] = bool(v)
    return out


def _fault_reason(part: Part) -> str:
    """Why a gradient was refused (reads it: the error path only)."""
    compute = F.compute_dtype(part.weight.dtype)
    grad = part.grad
    if grad.numel() == 0 or not bool(torch.isfinite(grad).all()):
        return "non-finite gradient (inf or nan)"
    largest = float(grad.abs().max().double())
    if largest > _common.square_limit(compute):
        return _common.describe_fault(grad, compute)
    return (f"gradient too large for {str(compute).replace('torch.', '')} math (max |g| = {largest:.3g}: the sum of "
            "its squares, per channel or in all, overflows)")


def apollo_mini(params: Iterable[Any], lr: float = 1e-3, **kwargs: Any) -> Apollo:
    """APOLLO-Mini: rank 1, one tensor-wise scaling factor, scale 128 (alpha = sqrt(128)); any other
    :class:`Apollo` option may be given. Optimizer state is about 2 x max(m, n) numbers per matrix."""
    return Apollo(params, lr=lr, **{**APOLLO_MINI, **kwargs})


def dense_chunk_elements(device: Union[str, torch.device]) -> int:
    """Elements per piece in which big tensors are updated on ``device`` (benchmarks build tensors of several)."""
    return F.chunk_elements(device)
