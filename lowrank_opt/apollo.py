"""APOLLO: SGD-like memory, AdamW-level performance (Zhu et al., arXiv 2412.05270, MLSys 2025).

Adam's moments are kept for a random projection R of the gradient (r x max(m, n) instead of m x n); the
ratio between the Adam-normalised projected gradient and the projected gradient gives a per-channel (APOLLO)
or per-tensor (APOLLO-Mini) scaling factor that is applied to the raw full-rank gradient.
"""

from __future__ import annotations

import contextvars
import logging
import math
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch.optim import Optimizer

from . import _common
from .projection import (
    RIGHT, ProjectionPlan, Rank, identity_key, matrix_shape, orientation, project, resolve_rank, seeded_generator,
)
from .rounding import rounding_seed, stochastic_round_to_bf16_

logger = logging.getLogger(__name__)

SCALE_TYPES = ("channel", "tensor")
_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_LIMITER_EPS = 1e-8  # the published limiter divides by (prev + 1e-8)
_SCALING_EPS = 1e-8  # s = ||R~|| / (||R|| + 1e-8)
# The fast path updates big dense tensors in pieces of this many elements (a multiple of every vector width,
# so each element sees the same kernels as in one whole-tensor op: results are bit-identical) and never
# holds a full-size temporary; smaller ones together with torch's foreach ops. On CPU 4 MiB pieces stay in
# cache-friendly, already-mapped memory; on GPUs larger pieces keep the number of kernel launches small.
_DENSE_CHUNK = 1 << 20
_DENSE_CHUNK_ACCELERATOR = 1 << 24


# The device type that meta tensors stand for: the memory estimator dry-runs ``step()`` on meta tensors and
# sets this to the device it estimates for, so the dry run takes that device's chunk size.
META_STANDS_FOR: contextvars.ContextVar[str] = contextvars.ContextVar("lowrank_opt_meta_stands_for", default="cuda")


def _dense_chunk(device: torch.device) -> int:
    kind = META_STANDS_FOR.get() if device.type == "meta" else device.type
    return _DENSE_CHUNK if kind == "cpu" else _DENSE_CHUNK_ACCELERATOR


def _state_dtype_name(value: Any, where: str = "") -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        for name, dt in _STATE_DTYPES.items():
            if dt == value:
                return name
    elif isinstance(value, str) and value in _STATE_DTYPES:
        return value
    raise ValueError(f"state_dtype must be None or one of {', '.join(_STATE_DTYPES)}, got {value!r}{where}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math runs in fp32 for half-precision parameters, else in the parameter's own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ----------------------------------------------------------------------------------------------------------
# The math, as pure functions on tensors (state tensors are updated in place, as torch's functional optimizers do)


_NORM_BLOCK = 1 << 18  # elements per block of the CPU column-norm loop (a 1 MiB fp32 temporary)


def channel_norms(x: torch.Tensor, dim: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Euclidean norms of a 2-D tensor along ``dim`` (``dim=1``: one per row; ``dim=0``: one per column),
    computed in ``dtype`` (default: ``x``'s). Column norms on CPU are summed from blocks of rows (squares of
    at most ``_NORM_BLOCK`` elements at a time): torch's CPU norm over the leading dimension of a row-major
    matrix is 4-20x slower than that, and squaring the whole matrix would need a full-size temporary."""
    if dim != 0 or x.device.type != "cpu" or x.ndim != 2:
        return torch.linalg.vector_norm(x, dim=dim, dtype=dtype)
    dtype = dtype or x.dtype
    rows = max(1, _NORM_BLOCK // max(1, x.shape[1]))
    total = torch.zeros(x.shape[1], dtype=dtype)
    for start in range(0, x.shape[0], rows):
        block = x[start:start + rows]
        if block.dtype != dtype:
            block = block.to(dtype)
        total.add_(block.square().sum(dim=0))
    return total.sqrt_()


def adam_moments_(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, x: torch.Tensor, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's moments m = b1 m + (1-b1) x, v = b2 v + (1-b2) x^2, computed in ``x``'s dtype and stored back
    in the state's own dtype (e.g. bf16 state, fp32 math). Returns (m, v) in ``x``'s dtype."""
    compute = x.dtype
    m = exp_avg if exp_avg.dtype == compute else exp_avg.to(compute)
    v = exp_avg_sq if exp_avg_sq.dtype == compute else exp_avg_sq.to(compute)
    m.mul_(beta1).add_(x, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(x, x, value=1.0 - beta2)
    if m is not exp_avg:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    return m, v


def apollo_scaling(
    grad2d: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    proj: torch.Tensor,
    *,
    side: str,
    beta1: float,
    beta2: float,
    eps: float,
    scale_type: str,
) -> torch.Tensor:
    """Steps 1-5 of APOLLO for one matrix: project, update the moments, return the scaling factor.

    ``grad2d`` (m x n) and ``proj`` are in the compute dtype; ``exp_avg``/``exp_avg_sq`` have the shape of R
    and are updated in place (in their own dtype). Returns s: shape (m,) for a right projection (one factor
    per row), (n,) for a left projection (one per column), or a 0-d tensor for ``scale_type="tensor"``.
    """
    # 1. R = G P^T (tall/square) or P G (wide): the gradient in the random subspace.
    low_rank = project(grad2d, proj, side)
    rank_dim = 1 if side == RIGHT else 0
    # 2.-3. Adam moments on R, without bias correction here (it is folded into the step size).
    m, v = adam_moments_(exp_avg, exp_avg_sq, low_rank, beta1, beta2)
    # 4. R~ = m / (sqrt(v) + eps): the Adam direction in the subspace.
    normalized = m / v.sqrt().add_(eps)
    # 5. Scaling: how much Adam stretches each channel (or the whole tensor) of the projected gradient.
    if scale_type == "channel":
        return channel_norms(normalized, rank_dim) / (channel_norms(low_rank, rank_dim) + _SCALING_EPS)
    return torch.linalg.vector_norm(normalized) / (torch.linalg.vector_norm(low_rank) + _SCALING_EPS)


def growth_limit_factor(
    update_norm: torch.Tensor, prev_norm: Optional[torch.Tensor], gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fira's norm-growth limiter: the factor that keeps ||U|| <= gamma * previous ||U||, and the norm to
    remember. Decreases are never limited. With no previous norm (first step) nothing is limited."""
    if prev_norm is None:
        return torch.ones_like(update_norm), update_norm.clone()
    ratio = update_norm / (prev_norm + _LIMITER_EPS)
    factor = torch.where(ratio > gamma, gamma / ratio, torch.ones_like(ratio))
    return factor, update_norm * factor


def bias_corrected_step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool) -> float:
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def _channel_view(factor: torch.Tensor, shape: torch.Size, side: str) -> torch.Tensor:
    """Broadcast a per-channel factor of the 2-D view back onto the parameter's own (possibly N-D) shape."""
    if factor.ndim == 0:
        return factor
    if side == RIGHT:  # one factor per row (shape[0])
        return factor.view(shape[0], *([1] * (len(shape) - 1)))
    return factor.view(1, *shape[1:])  # one factor per column of the flattened trailing dims


# ----------------------------------------------------------------------------------------------------------


class Apollo(Optimizer):
    r"""APOLLO: AdamW-quality updates with SGD-like optimizer memory (arXiv 2412.05270).

    For a weight W (N-D weights are viewed as ``shape[0] x prod(shape[1:])``) with gradient G, each step:

    1. Orientation: compress the smaller dimension (``sort_dims=True``): tall/square -> R = G P^T with
       P in R^{r x n}; wide -> R = P G with P in R^{r x m}. ``sort_dims=False`` always compresses the rows.
    2. P has N(0, 1/r) entries, a pure function of (``seed``, parameter identity, ``step // update_proj_gap``):
       redrawn every ``update_proj_gap`` steps, never saved, the same on every process.
    3. Moments on R: m = b1 m + (1-b1) R, v = b2 v + (1-b2) R^2 (kept across redraws).
    4. R~ = m / (sqrt(v) + eps).
    5. Scaling: channel: s = ||R~|| / (||R|| + 1e-8) over the rank dimension (one factor per index of the
       larger dimension); tensor: one scalar from the Frobenius norms.
    6. U = G * s (the raw full-rank gradient), then
    7. the norm-growth limiter: if ||U|| > gamma * prev then U <- U * gamma * prev / ||U||; prev <- ||U||,
    8. times sqrt(scale) (``scale`` is the paper's alpha squared),
    9. W <- W - lr * sqrt(1 - b2^t) / (1 - b1^t) * U, then decoupled weight decay W <- W - lr * wd * W.

    Parameters with ``ndim < 2`` and every parameter of a group whose ``rank`` is ``None`` get AdamW with the
    same betas/eps/weight decay (in the published form: eps added to sqrt(v), decay after the update).

    Args:
        params: parameters, ``(name, parameter)`` pairs (``model.named_parameters()``; names then appear in
            errors and fix each parameter's projection), or param-group dicts overriding any option below.
        lr (float): learning rate. Default 1e-3.
        betas (tuple[float, float]): moment decay rates. Default (0.9, 0.999).
        eps (float): added to sqrt(v). Default 1e-6 (the published APOLLO's).
        weight_decay (float): decoupled weight decay. Default 0.
        rank (int | float | callable | None): projection rank. An int (clipped to the compressed dimension),
            a fraction in (0, 1] of it, or ``dim -> int``. ``None`` makes the group plain AdamW. Default 256.
        scale_type (str): ``"channel"`` (APOLLO) or ``"tensor"`` (APOLLO-Mini). Default "channel".
        scale (float): the update is multiplied by sqrt(scale). APOLLO-Mini uses 128. Default 1.
        update_proj_gap (int): steps between projection redraws (T). Default 200.
        sort_dims (bool): compress the smaller dimension; else always the rows. Default True.
        norm_growth_limit (float | None): gamma of the limiter, ``None`` turns it off. Default 1.01.
        seed (int): seed of every projection. Default 0.
        cache_projection (bool): keep each P in memory between redraws (faster on slow RNGs, costs
            r x min(m, n) per matrix, never saved); else P is regenerated each step. Default False.
        state_dtype (None | str | torch.dtype): dtype of the moments; ``None`` is fp32 (fp64 for fp64
            parameters); ``torch.bfloat16`` halves optimizer memory. Math is always fp32 or wider.
        correct_bias (bool): fold Adam's bias correction into the step size. Default True.
        nonfinite (str): a gradient with inf/nan makes ``step()`` raise, naming the parameter, before any
            parameter or state changes (``"raise"``, default), or that tensor's update is skipped and counted
            in ``skipped_tensors`` (``"skip"``).
        layerwise (bool): update each parameter inside backward, as soon as its gradient is accumulated, and
            free that gradient at once, so only about one matrix of gradients is alive at a time. ``step()``
            then has nothing left to do; schedulers and checkpoints work unchanged (same state dict as the
            normal mode). Not compatible with gradient accumulation over several backward passes, nor with
            data-parallel gradient all-reduce, and global-norm clipping sees no gradients (use
            :class:`~lowrank_opt.NormGrowthCap`-style per-tensor limits: the built-in ``norm_growth_limit``).
            With ``nonfinite="raise"`` an inf/nan gradient raises out of ``backward()``; parameters updated
            earlier in that backward pass keep their update.
        stochastic_rounding (bool): for bf16 parameters (pure-bf16 training, no fp32 master weights), write
            the fp32 result of the update and weight decay back with stochastic rounding
            (:func:`~lowrank_opt.rounding.stochastic_round_to_bf16`), so that updates smaller than half a
            bf16 spacing (2^-9 to 2^-8 of the weight) are not lost but kept in expectation; ``False`` rounds
            to nearest. The random bits are a pure function of (``seed``, parameter identity, the parameter's step
            count): runs are reproducible, resume is bit-exact, and data-parallel replicas round alike.
            fp16 parameters are always rounded to nearest (fp16 training normally keeps fp32 master
            weights); fp32/fp64 parameters need no rounding. Default True.
        foreach (bool | None): the fast path (``None``, default, or ``True``): plain-AdamW tensors are updated
            with torch's foreach ops (small ones) or in pieces (2^20 elements on CPU, 2^24 on GPUs: no
            full-size temporaries). Same numbers as ``False``, the simple one-tensor-at-a-time reference path
            it is tested against (bit for bit on CPU).

    Example:
        >>> groups = lowrank_param_groups(model, "all-linear", rank=128)
        >>> opt = Apollo(groups, lr=1e-3, weight_decay=0.0)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        rank: Rank = 256,
        scale_type: str = "channel",
        scale: float = 1.0,
        update_proj_gap: int = 200,
        sort_dims: bool = True,
        norm_growth_limit: Optional[float] = 1.01,
        seed: int = 0,
        cache_projection: bool = False,
        state_dtype: Union[None, str, torch.dtype] = None,
        correct_bias: bool = True,
        nonfinite: str = "raise",
        layerwise: bool = False,
        stochastic_rounding: bool = True,
        foreach: Optional[bool] = None,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            scale_type=scale_type,
            scale=scale,
            update_proj_gap=update_proj_gap,
            sort_dims=sort_dims,
            norm_growth_limit=norm_growth_limit,
            seed=seed,
            cache_projection=cache_projection,
            state_dtype=state_dtype,
            correct_bias=correct_bias,
            nonfinite=nonfinite,
            stochastic_rounding=stochastic_rounding,
            foreach=foreach,
        )
        self._param_index: dict[torch.Tensor, int] = {}
        self._location: dict[torch.Tensor, tuple[int, int]] = {}  # param -> (group index, index in group)
        self._identity_cache: dict[torch.Tensor, int] = {}
        self._projection_cache: dict[torch.Tensor, tuple[int, torch.Tensor]] = {}
        self.skipped_tensors = 0
        self._hooks: list = []
        super().__init__(params, defaults)
        _common.check_param_dtypes(self)
        if layerwise:
            self._register_layerwise_hooks()

    # -- construction-time validation ------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        group = self.param_groups[group_index]
        try:
            self._validate_group(group, group_index)
        except Exception:
            self.param_groups.pop()
            raise
        for i, p in enumerate(group["params"]):
            self._param_index.setdefault(p, len(self._param_index))
            self._location[p] = (group_index, i)

    def _validate_group(self, group: dict, group_index: int) -> None:
        where = _common.group_where(group_index)
        _common.check_lr(group["lr"], where)
        _common.check_betas(group["betas"], where)
        group["betas"] = tuple(group["betas"])
        _common.check_eps(group["eps"], where)
        _common.check_weight_decay(group["weight_decay"], where)
        _common.check_choice(group["scale_type"], "scale_type", SCALE_TYPES, where)
        _common.check_finite_positive(group["scale"], "scale", where)
        _common.check_positive_int(group["update_proj_gap"], "update_proj_gap", where)
        _common.check_choice(group["nonfinite"], "nonfinite", _common.NONFINITE_CHOICES, where)
        if group["norm_growth_limit"] is not None:
            gamma = float(group["norm_growth_limit"])
            if not (math.isfinite(gamma) and gamma >= 1.0):
                raise ValueError(f"norm_growth_limit must be None or a finite number >= 1, got "
                                 f"{group['norm_growth_limit']!r}{where}")
        if isinstance(group["seed"], bool) or not isinstance(group["seed"], int):
            raise ValueError(f"seed must be an int, got {group['seed']!r}{where}")
        if group["foreach"] is not None and not isinstance(group["foreach"], bool):
            raise TypeError(f"foreach must be None or a bool, got {group['foreach']!r}{where}")
        if not isinstance(group["stochastic_rounding"], bool):
            raise TypeError(f"stochastic_rounding must be a bool, got {group['stochastic_rounding']!r}{where}")
        group["state_dtype"] = _state_dtype_name(group["state_dtype"], where)
        if group["rank"] is not None:
            for i, p in enumerate(group["params"]):
                if p.ndim >= 2:
                    shape2d = matrix_shape(p.shape)
                    side = orientation(shape2d, group["sort_dims"])
                    dim = shape2d[1] if side == RIGHT else shape2d[0]
                    resolve_rank(group["rank"], dim, _common.param_label(group, i, p))

    # -- projection ------------------------------------------------------------------------------------

    def _identity(self, group: dict, index_in_group: int, p: torch.Tensor) -> int:
        identity = self._identity_cache.get(p)
        if identity is None:
            names = group.get("param_names")
            key = names[index_in_group] if names is not None else self._param_index[p]
            identity = identity_key(key)
            self._identity_cache[p] = identity
        return identity

    def _plan(self, group: dict, index_in_group: int, p: torch.Tensor) -> Optional[ProjectionPlan]:
        """How ``p`` is projected, or None when it is updated with plain AdamW."""
        if group["rank"] is None or p.ndim < 2:
            return None
        shape2d = matrix_shape(p.shape)
        side = orientation(shape2d, group["sort_dims"])
        dim = shape2d[1] if side == RIGHT else shape2d[0]
        rank = resolve_rank(group["rank"], dim, _common.param_label(group, index_in_group, p))
        return ProjectionPlan(shape2d, side, rank, self._identity(group, index_in_group, p))

    def _locate(self, param: torch.Tensor) -> tuple[dict, int]:
        # Indices, not group dicts: load_state_dict replaces the group dicts.
        location = self._location.get(param)
        if location is None:
            raise KeyError("the tensor is not a parameter of this optimizer")
        return self.param_groups[location[0]], location[1]

    def projection_matrix(self, param: torch.Tensor, step: Optional[int] = None) -> Optional[torch.Tensor]:
        """The projection matrix P (rank x compressed dim, fp32, on the parameter's device) that ``param``
        uses at optimizer step ``step`` (counted from 0; default: the step its next update will take).
        ``None`` for parameters updated with plain AdamW. The orientation follows the class docstring:
        R = G P^T when P's second dimension is G's columns, else R = P G."""
        group, i = self._locate(param)
        plan = self._plan(group, i, param)
        if plan is None:
            return None
        if step is None:
            step = self.state[param].get("step", 0) if param in self.state else 0
        return plan.matrix(group["seed"], step, group["update_proj_gap"], param.device)

    def _projection(self, group: dict, plan: ProjectionPlan, p: torch.Tensor, step: int, dtype) -> torch.Tensor:
        gap = group["update_proj_gap"]
        if not group["cache_projection"]:
            return plan.matrix(group["seed"], step, gap, p.device, dtype)
        refresh_index = step // gap
        cached = self._projection_cache.get(p)
        if cached is None or cached[0] != refresh_index or cached[1].dtype != dtype:
            cached = (refresh_index, plan.matrix(group["seed"], step, gap, p.device, dtype))
            self._projection_cache[p] = cached
        return cached[1]

    # -- state -----------------------------------------------------------------------------------------

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints from before the option: the constructor's choice
            group.setdefault("stochastic_rounding", self.defaults.get("stochastic_rounding", True))
            group.setdefault("foreach", self.defaults.get("foreach"))

    def load_state_dict(self, state_dict: dict) -> None:
        self._projection_cache.clear()
        self._identity_cache.clear()
        _common.load_state_dict_keep_dtypes(self, state_dict)

    def _init_state(self, group: dict, p: torch.Tensor, shape: tuple[int, ...]) -> dict:
        """The parameter's state, with zero moments of ``shape`` on its first update."""
        state = self.state[p]
        if "step" not in state:
            dtype = _STATE_DTYPES[group["state_dtype"]] if group["state_dtype"] else _compute_dtype(p.dtype)
            state["step"] = 0
            state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=p.device)
        return state

    # -- step ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimization step. A gradient with inf/nan raises (before anything changes) or is skipped,
        per ``nonfinite``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update([(group, i, p) for group in self.param_groups for i, p in enumerate(group["params"])])
        return loss

    @torch.no_grad()
    def step_parameter(self, param: torch.Tensor) -> None:
        """Update one parameter from its gradient (what the layer-wise hooks call). Same result as
        ``step()`` restricted to that parameter."""
        group, i = self._locate(param)
        self._update([(group, i, param)])

    def _register_layerwise_hooks(self) -> None:
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                self.step_parameter(p)
                p.grad = None

        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def remove_hooks(self) -> None:
        """Detach the layer-wise hooks (updates then happen in ``step()`` again)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _update(self, candidates: list) -> None:
        # Pass 1 (read only): gather work and the gradient norms the update needs anyway, and check that
        # every gradient is finite before any parameter or state is touched.
        work = []  # (group, index, p, plan, per-channel gradient norms or None)
        checks = []
        dense = []
        for group, i, p in candidates:
            if p.grad is None:
                continue
            _common.check_grad_supported(self, group, i, p)
            plan = self._plan(group, i, p)
            if plan is None:
                work.append((group, i, p, None, None))
                dense.append(len(work) - 1)
                continue
            grad2d = p.grad.reshape(plan.shape2d)
            # Norms of G per kept channel (rows for a right projection, columns for a left one), or its
            # Frobenius norm for tensor-wise scaling: ||G * s|| is computed from them without materialising G * s.
            if group["scale_type"] == "tensor":
                norms = torch.linalg.vector_norm(grad2d, dtype=_compute_dtype(p.dtype))
            else:
                norms = channel_norms(grad2d, 1 if plan.side == RIGHT else 0, _compute_dtype(p.dtype))
            work.append((group, i, p, plan, norms))
            checks.append(norms.sum())
        if not work:
            return
        if dense:
            checks.extend(torch._foreach_norm([work[k][2].grad for k in dense]))
            dense_set = set(dense)
            order = [k for k in range(len(work)) if k not in dense_set] + dense
        else:
            order = list(range(len(work)))
        skip = self._nonfinite(work, order, checks)

        # Pass 2: the updates (the fast path batches or chunks the plain-AdamW tensors).
        dense_fast = []
        for k, (group, i, p, plan, norms) in enumerate(work):
            if k in skip:
                continue
            if plan is not None:
                self._apollo_update(group, p, plan, norms)
            elif group["foreach"] is not False and p.dtype in (torch.float32, torch.float64):
                dense_fast.append((group, p))
            else:
                self._adamw_update(group, p)
        if dense_fast:
            self._adamw_updates_fast(dense_fast)

    def _nonfinite(self, work: list, order: list[int], checks: list[torch.Tensor]) -> set[int]:
        flags = torch.isfinite(torch.stack([c.float() for c in checks]))
        if bool(flags.all()):
            return set()
        bad = []
        for flag, k in zip(flags.tolist(), order):
            if not flag and not bool(torch.isfinite(work[k][2].grad).all()):  # norm overflow is not a bad grad
                bad.append(k)
        if not bad:
            return set()
        labels = [_common.param_label(work[k][0], work[k][1], work[k][2]) for k in bad]
        policies = {work[k][0]["nonfinite"] for k in bad}
        if "raise" in policies:
            raise RuntimeError(_common.nonfinite_message(self, labels))
        self.skipped_tensors += len(bad)
        logger.warning("Apollo: skipped the update of %s (non-finite gradient)", ", ".join(labels))
        return set(bad)

    def _apollo_update(self, group: dict, p: torch.Tensor, plan: ProjectionPlan, grad_norms: torch.Tensor):
        state = self._init_state(group, p, plan.moment_shape)
        beta1, beta2 = group["betas"]
        compute = _compute_dtype(p.dtype)
        grad = p.grad
        step = state["step"]
        # Steps 1-5 on the 2-D view of the gradient.
        proj = self._projection(group, plan, p, step, compute)
        grad2d = grad.reshape(plan.shape2d)
        if grad2d.dtype != compute:
            grad2d = grad2d.to(compute)
        factor = apollo_scaling(
            grad2d, state["exp_avg"], state["exp_avg_sq"], proj,
            side=plan.side, beta1=beta1, beta2=beta2, eps=group["eps"], scale_type=group["scale_type"],
        )
        state["step"] = step = step + 1
        # 6.-7. ||U|| = ||G * s|| from the per-channel gradient norms, then the growth limiter.
        gamma = group["norm_growth_limit"]
        if gamma is not None:
            if factor.ndim == 0:
                update_norm = factor * torch.linalg.vector_norm(grad_norms)
            else:
                update_norm = torch.linalg.vector_norm(factor * grad_norms)
            limit, state["limiter_norm"] = growth_limit_factor(update_norm, state.get("limiter_norm"), gamma)
            factor = factor * limit
        # 8. alpha = sqrt(scale).
        if group["scale"] != 1.0:
            factor = factor * math.sqrt(group["scale"])
        # 9. W <- W - step_size * G * s, then decoupled weight decay; no full-size temporary for U.
        step_size = bias_corrected_step_size(float(group["lr"]), beta1, beta2, step, group["correct_bias"])
        scale = _channel_view(factor, p.shape, plan.side)
        per_row = scale.ndim > 0 and scale.shape[0] > 1  # one factor per row of p: sliced with the rows
        self._apply(p, group, lambda w, rows: w.addcmul_(grad[rows], scale[rows] if per_row else scale,
                                                         value=-step_size))

    def _adamw_updates_fast(self, items: list) -> None:
        """The plain-AdamW tensors of the fast path (fp32/fp64 weights): large ones in pieces, small ones
        batched per (group, device, dtype) with foreach ops, at most a chunk's worth of elements per batch (so
        the scratch never exceeds one chunk). The same element-wise operations, in the same order, as
        :meth:`_adamw_update`."""
        batches: dict[tuple, list] = {}
        for group, p in items:
            state = self._init_state(group, p, p.shape)
            chunk = _dense_chunk(p.device)
            if not (p.is_contiguous() and state["exp_avg"].is_contiguous() and state["exp_avg_sq"].is_contiguous()):
                self._adamw_update(group, p)
            elif p.numel() >= chunk or state["exp_avg"].dtype != p.dtype:
                self._adamw_update_chunked(group, p)
            else:
                key_batches = batches.setdefault((id(group), p.device, p.dtype), [[0, []]])
                if key_batches[-1][0] + p.numel() > chunk:
                    key_batches.append([0, []])
                key_batches[-1][0] += p.numel()
                key_batches[-1][1].append((group, p))
        for batch in (b for key_batches in batches.values() for _, b in key_batches):
            group = batch[0][0]
            beta1, beta2 = group["betas"]
            params = [p for _, p in batch]
            grads = [p.grad for p in params]
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
            step_sizes = []
            for p in params:
                self.state[p]["step"] += 1
                step_sizes.append(-bias_corrected_step_size(float(group["lr"]), beta1, beta2, self.state[p]["step"],
                                                            group["correct_bias"]))
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denoms, group["eps"])
            torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
            decay = float(group["lr"]) * group["weight_decay"]
            if decay:
                torch._foreach_mul_(params, 1.0 - decay)

    def _adamw_update_chunked(self, group: dict, p: torch.Tensor) -> None:
        """:meth:`_adamw_update` for an fp32/fp64 weight, a chunk of elements at a time."""
        state = self._init_state(group, p, p.shape)
        beta1, beta2 = group["betas"]
        state["step"] = step = state["step"] + 1
        step_size = bias_corrected_step_size(float(group["lr"]), beta1, beta2, step, group["correct_bias"])
        decay = float(group["lr"]) * group["weight_decay"]
        weight, grad = p.view(-1), p.grad.reshape(-1)
        exp_avg, exp_avg_sq = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        chunk = _dense_chunk(p.device)
        for start in range(0, weight.numel(), chunk):
            piece = slice(start, start + chunk)
            m, v = adam_moments_(exp_avg[piece], exp_avg_sq[piece], grad[piece], beta1, beta2)
            w = weight[piece]
            w.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
            if decay:
                w.mul_(1.0 - decay)

    def _adamw_update(self, group: dict, p: torch.Tensor) -> None:
        state = self._init_state(group, p, p.shape)
        beta1, beta2 = group["betas"]
        compute = _compute_dtype(p.dtype)
        state["step"] = step = state["step"] + 1
        step_size = bias_corrected_step_size(float(group["lr"]), beta1, beta2, step, group["correct_bias"])

        def update(w: torch.Tensor, rows) -> None:
            grad = p.grad[rows]
            if grad.dtype != compute:
                grad = grad.to(compute)
            m, v = adam_moments_(state["exp_avg"][rows], state["exp_avg_sq"][rows], grad, beta1, beta2)
            w.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)

        self._apply(p, group, update)

    def _apply(self, p: torch.Tensor, group: dict, update: Callable[[torch.Tensor, Any], Any]) -> None:
        """Run ``update(w, rows)`` on the weight (in the compute dtype) and then decoupled weight decay;
        ``rows`` indexes ``p``'s first dimension (``...``: all of it), for the update to slice the gradient,
        state and per-row factors alike. A bf16 weight is written back with stochastic rounding when the
        group asks for it, else (and for fp16) rounded to nearest.

        A half-precision weight is updated through an fp32 copy. On the fast path (``foreach`` not False) a
        contiguous one is done a block of rows at a time (at most about one dense chunk of elements), so the
        fp32 copy, the rounding bits and the update's own scratch never reach full size (for LLaMA-7B's
        embedding that is 2 GB less at the step's peak). The rounding bits are drawn block after block from
        the one generator seeded for this tensor and step: on CPU the same stream as one whole-tensor draw,
        so both paths give the same bits there."""
        decay = float(group["lr"]) * group["weight_decay"]
        compute = _compute_dtype(p.dtype)
        if p.dtype == compute:
            update(p, ...)
            if decay:
                p.mul_(1.0 - decay)
            return
        generator = self._rounding_generator(group, p)
        if group["foreach"] is False or p.ndim == 0 or not p.is_contiguous():
            blocks = [...]
        else:
            row_numel = max(1, p.numel() // max(1, p.shape[0]))
            step_rows = max(1, _dense_chunk(p.device) // row_numel)
            blocks = [slice(start, start + step_rows) for start in range(0, p.shape[0], step_rows)]
        for rows in blocks:
            target = p[rows]
            weight = target.to(compute)
            update(weight, rows)
            if decay:
                weight.mul_(1.0 - decay)
            if generator is not None:
                stochastic_round_to_bf16_(weight, generator)  # now exact in bf16
            target.copy_(weight)

    def _rounding_generator(self, group: dict, p: torch.Tensor) -> Optional[torch.Generator]:
        """The generator of ``p``'s stochastic-rounding bits for this step, or None to round to nearest (not
        bf16, or the group turned rounding off)."""
        if p.dtype != torch.bfloat16 or not group["stochastic_rounding"]:
            return None
        # Bits seeded by (seed, identity, step): the step count is in the state dict, so resume is exact.
        identity = self._identity(group, self._location[p][1], p)
        return seeded_generator(p.device, rounding_seed(group["seed"], identity, self.state[p]["step"]))


def apollo_mini(params: Iterable[Any], lr: float = 1e-3, **kwargs: Any) -> Apollo:
    """APOLLO-Mini: rank 1, one tensor-wise scaling factor, scale 128 (alpha = sqrt(128)); any other
    :class:`Apollo` option may be given. Optimizer state is about 2 x max(m, n) numbers per matrix."""
    options = dict(rank=1, scale_type="tensor", scale=128.0)
    options.update(kwargs)
    return Apollo(params, lr=lr, **options)
