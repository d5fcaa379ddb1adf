"""APOLLO: SGD-like memory, AdamW-level performance (Zhu et al., arXiv 2412.05270, MLSys 2025).

Adam's moments are kept for a random projection R of the gradient (r x max(m, n) instead of m x n); the
ratio between the Adam-normalised projected gradient and the projected gradient gives a per-channel (APOLLO)
or per-tensor (APOLLO-Mini) scaling factor that is applied to the raw full-rank gradient.

The math is written once, as pure functions on the rows of a matrix a process holds
(:func:`project_rows`, :func:`adam_moments_`, :func:`channel_scaling`, :func:`tensor_scaling`,
:func:`growth_limit_factor`, :func:`bias_corrected_step_size`); the few sums that cross a shard boundary
(partial projections of cut rows, the r x n partial sums of a left projection, squared norms) are all-reduced
between the steps. Unsharded, every row is local and nothing is reduced. :class:`Apollo` is the one
optimizer: it recognises unsharded parameters, FSDP2's ``Shard(0)`` DTensors and DeepSpeed ZeRO's flat shards
(:mod:`lowrank_opt.sharding`) and gives the same result on each.
"""

from __future__ import annotations

import contextvars
import logging
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch.optim import Optimizer

from . import _common
from .projection import (
    LEFT, RIGHT, ProjectionPlan, Rank, identity_key, matrix_shape, orientation, project, resolve_rank,
    seeded_generator,
)
from .quant.int8 import apply_int8_update_, int8_module_of
from .quant.state8bit import MIN_8BIT_SIZE, adamw_step_8bit_, init_adam_state_8bit
from .rounding import rounding_seed, stochastic_round_to_bf16_
from .sharding import (
    ShardLayout, TorchDistComm, dtensor_rows, full_shape, is_dtensor, zero_flat_pieces,
)

logger = logging.getLogger(__name__)

SCALE_TYPES = ("channel", "tensor")
_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_LIMITER_EPS = 1e-8  # the published limiter divides by (prev + 1e-8)
_SCALING_EPS = 1e-8  # s = ||R~|| / (||R|| + 1e-8)
# The fast path updates big dense tensors in pieces of this many elements (a multiple of every vector width,
# so each element sees the same kernels as in one whole-tensor op: results are bit-identical) and never
# holds a full-size temporary; smaller ones together with torch's foreach ops. On CPU 4 MiB pieces stay in
# cache-friendly, already-mapped memory. On GPUs 2^22 elements (16 MiB in fp32): each piece still takes
# longer to stream than its kernels take to launch, and the update's scratch (two fp32 pieces) stays at
# 32 MiB, which counts at LLaMA-7B in 16 GB (2^24 would be 128 MiB: the 16 GB setting of docs/memory.md would
# not fit); the int8 weights' update uses the same size (lowrank_opt/quant/int8.py).
_DENSE_CHUNK = 1 << 20
_DENSE_CHUNK_ACCELERATOR = 1 << 22
# Sharded matrices are updated in batches whose projections hold at most this many bytes at once: one
# all-reduce per batch and round instead of one per matrix, without keeping every matrix's R alive.
_BATCH_BYTES = 64 << 20
SHARD_STATE_KEY = "shard_state"  # state of a DeepSpeed flat shard: {index in group: that parameter's state}

# Every option, checked at construction and on load (rank and state_dtype have their own checks).
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


# The device type that meta tensors stand for: the memory estimator dry-runs ``step()`` on meta tensors and
# sets this to the device it estimates for, so the dry run takes that device's chunk size.
META_STANDS_FOR: contextvars.ContextVar[str] = contextvars.ContextVar("lowrank_opt_meta_stands_for", default="cuda")


def _dense_chunk(device: torch.device) -> int:
    kind = META_STANDS_FOR.get() if device.type == "meta" else device.type
    return _DENSE_CHUNK if kind == "cpu" else _DENSE_CHUNK_ACCELERATOR


def dense_chunk_elements(device: Union[str, torch.device]) -> int:
    """Elements per piece in which the fast path updates big tensors on ``device`` (benchmarks and checks
    build tensors of several pieces from it)."""
    return _dense_chunk(torch.device(device))


def _state_dtype_name(value: Any, where: str = "") -> Optional[str]:
    if value is None:
        return None
    if value in (torch.float16, "float16"):
        raise ValueError(f"state_dtype float16 cannot hold Adam's second moment (squares beyond 65504 overflow to "
                         f"inf and the weight stops moving): use bfloat16 (fp32's range) to halve the moments{where}")
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
        return _common.vector_norm_wide(x, dtype, dim=dim)  # row norms of a bf16 x on CPU: no fp32 copy of x
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


def normalized_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, low_rank: torch.Tensor, beta1: float,
                       beta2: float, eps: float) -> torch.Tensor:
    """Steps 3-4: Adam's moments on R (in place, no bias correction: it is folded into the step size), then
    R~ = m / (sqrt(v) + eps), the Adam direction in the subspace."""
    m, v = adam_moments_(exp_avg, exp_avg_sq, low_rank, beta1, beta2)
    return m / v.sqrt().add_(eps)


def channel_scaling(normalized: torch.Tensor, low_rank: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """Step 5, channel-wise: s = ||R~|| / (||R|| + 1e-8) over the rank dimension, one factor per channel."""
    return channel_norms(normalized, rank_dim) / (channel_norms(low_rank, rank_dim) + _SCALING_EPS)


def tensor_scaling(normalized_sq: torch.Tensor, low_rank_sq: torch.Tensor) -> torch.Tensor:
    """Step 5, tensor-wise (APOLLO-Mini): s = ||R~||_F / (||R||_F + 1e-8), from the two squared norms (which
    add up over shards)."""
    return normalized_sq.sqrt() / (low_rank_sq.sqrt() + _SCALING_EPS)


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
    """Steps 1-5 of APOLLO for one whole matrix: project, update the moments, return the scaling factor.

    ``grad2d`` (m x n) and ``proj`` are in the compute dtype; ``exp_avg``/``exp_avg_sq`` have the shape of R
    and are updated in place (in their own dtype). Returns s: shape (m,) for a right projection (one factor
    per row), (n,) for a left projection (one per column), or a 0-d tensor for ``scale_type="tensor"``.
    """
    low_rank = project(grad2d, proj, side)  # 1. R = G P^T (tall/square) or P G (wide)
    normalized = normalized_moments(exp_avg, exp_avg_sq, low_rank, beta1, beta2, eps)  # 3.-4.
    if scale_type == "channel":  # 5.
        return channel_scaling(normalized, low_rank, 1 if side == RIGHT else 0)
    return tensor_scaling(normalized.square().sum(), low_rank.square().sum())


def project_rows(blocks: list[tuple[Any, torch.Tensor]], proj: torch.Tensor, layout: ShardLayout, side: str,
                 compute: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Step 1 on the rows a process holds: ``blocks`` are ``(Block, G[rows, cols])`` pieces of the gradient.

    Right projection (R = G P^T, one R row per G row): returns (the local rows of R, the partial products of
    the cut rows, one row each in ``layout.cut_rows`` order, to be summed over the processes that share them;
    rows this process does not hold stay 0). Left projection (R = P G, every G row contributes to every R
    column): returns (this process's partial sum of R, r x n, to be summed over all processes; None)."""
    m, n = layout.shape2d
    r = proj.shape[0]
    device = proj.device
    if side == RIGHT:
        low_rank = torch.zeros((layout.num_rows, r), dtype=compute, device=device)
        cut_index = {row: j for j, row in enumerate(layout.cut_rows)}
        cut_part = torch.zeros((len(layout.cut_rows), r), dtype=compute, device=device) if layout.cut_rows else None
        for b, g in blocks:
            part = g @ proj[:, b.col:b.col + b.ncols].T
            if layout.is_partial(b) and b.row in cut_index:
                cut_part[cut_index[b.row]] = part[0]
            else:
                low_rank[b.row - layout.first_row:b.row - layout.first_row + b.nrows] = part
        return low_rank, cut_part
    low_rank = torch.zeros((r, n), dtype=compute, device=device)
    for b, g in blocks:
        low_rank[:, b.col:b.col + b.ncols].addmm_(proj[:, b.row:b.row + b.nrows], g)
    return low_rank, None


def growth_limit_factor(
    update_norm: torch.Tensor, prev_norm: Optional[torch.Tensor], gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fira's norm-growth limiter: the factor that keeps ||U|| <= gamma * previous ||U||, and the norm to
    remember. Decreases are never limited. With no previous norm (first step), or a previous norm of 0 (an
    all-zero gradient: no history to grow from), nothing is limited.

    The published APOLLO limits against a stored 0 too, which caps every later update near gamma * 1e-8 and
    grows it by 1% a step: a matrix whose gradient was once all zero (a zero-initialised partner, a layer
    frozen and then unfrozen, a masked head) is frozen for good. We treat 0 as "no history", as
    :class:`~lowrank_opt.NormGrowthCap` does.
    """
    if prev_norm is None:
        return torch.ones_like(update_norm), update_norm.clone()
    ratio = update_norm / (prev_norm + _LIMITER_EPS)
    factor = torch.where((ratio > gamma) & (prev_norm > 0), gamma / ratio, torch.ones_like(ratio))
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
# What the optimizer holds of each parameter in this step


@dataclass(eq=False)
class _Piece:
    """One parameter as this process holds it in this step: all of it (``layout`` None), its rows under FSDP2,
    or its slice of a DeepSpeed flat shard. ``weight``/``grad`` are local storage (flat 1-D for sharded
    matrices); ``comm`` is where partial sums go (None: nothing crosses processes)."""

    group: dict
    index: int  # position in the group
    label: str
    identity: int
    weight: torch.Tensor
    grad: torch.Tensor
    state: dict
    plan: Optional[ProjectionPlan]  # None: plain AdamW
    layout: Optional[ShardLayout] = None  # None: the whole parameter
    comm: Any = None
    shared: bool = False  # other processes hold parts of it: decisions and sums go through ``comm``
    round_offset: int = 0  # first local element (salts the stochastic-rounding bits of a shard)
    dtensor: Any = None  # the DTensor parameter (FSDP2): moments sharded like it are made DTensors
    key: Any = None  # the tensor in param_groups (the parameter, or DeepSpeed's flat shard)
    shard_index: Optional[int] = None  # position in the group, for a piece of a flat shard
    is_copy: bool = False  # a copy of the parameter the optimizer was built with (DeepSpeed's stage-0 wrapper)
    skip_state: bool = False  # holds no element of a shared matrix: adds zeros to the sums, keeps no state
    # filled while the step runs
    sq: Optional[torch.Tensor] = None  # squared gradient norms: per kept channel or total
    bad: bool = False
    low_rank: Optional[torch.Tensor] = None
    cut_part: Optional[torch.Tensor] = None
    factor: Optional[torch.Tensor] = None
    partial: Optional[torch.Tensor] = None


@dataclass
class _Record:
    """What the optimizer recorded about a parameter when it was built (so it recognises the parameter however
    it is later sharded or swapped): identity, full shape, name, trainable, and a weak reference to it."""

    identity: int
    shape: tuple[int, ...]
    name: Optional[str]
    trainable: bool
    original: Any = None  # weakref.ref or None
    plan_key: Any = None
    plan: Optional[ProjectionPlan] = None

    def tensor(self) -> Optional[torch.Tensor]:
        return self.original() if self.original is not None else None


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
    7. the norm-growth limiter: if ||U|| > gamma * prev then U <- U * gamma * prev / ||U||; prev <- ||U||
       (no limit while prev is absent or 0),
    8. times sqrt(scale) (``scale`` is the paper's alpha squared),
    9. W <- W - lr * sqrt(1 - b2^t) / (1 - b1^t) * U, then decoupled weight decay W <- W - lr * wd * W.

    Parameters with ``ndim < 2`` and every parameter of a group whose ``rank`` is ``None`` get AdamW with the
    same betas/eps/weight decay (in the published form: eps added to sqrt(v), decay after the update).

    **Sharded training.** The same optimizer, built on the model's parameters as usual, trains exactly as
    unsharded when the parameters are sharded: FSDP2 (``fully_shard``: ``Shard(0)`` DTensors, also when
    accelerate swaps the entries of ``param_groups`` for the sharded parameters after building it) and
    DeepSpeed ZeRO 1/2/3 (``deepspeed.initialize(model=..., optimizer=Apollo(...))``: flat shards). Each
    parameter's full shape and identity are recorded at construction; each process projects the rows it
    holds, and only what crosses a shard boundary is all-reduced (see :mod:`lowrank_opt.sharding`). A layout
    it cannot recognise raises, naming the fix; a matrix is never updated as AdamW because of how it was
    stored.

    Args:
        params: parameters, ``(name, parameter)`` pairs (``model.named_parameters()``; names then appear in
            errors and fix each parameter's projection), or param-group dicts overriding any option below.
        lr (float): learning rate. Default 1e-3.
        betas (tuple[float, float]): moment decay rates. Default (0.9, 0.999).
        eps (float): added to sqrt(v). Default 1e-6 (the published APOLLO's).
        weight_decay (float): decoupled weight decay. Default 0.
        rank (int | float | callable | None): projection rank. An int (clipped to the compressed dimension),
            a fraction in (0, 1] of it, or ``dim -> int``. ``None`` makes the group plain AdamW. Default 256.
            A callable is resolved to one integer per parameter in ``state_dict()`` (checkpoints hold plain
            data); on load the rule comes from the constructor and must resolve to the same integers.
        scale_type (str): ``"channel"`` (APOLLO) or ``"tensor"`` (APOLLO-Mini). Default "channel".
        scale (float): the update is multiplied by sqrt(scale). APOLLO-Mini uses 128. Default 1.
        update_proj_gap (int): steps between projection redraws (T). Default 200.
        sort_dims (bool): compress the smaller dimension; else always the rows. Default True.
        transposed (bool): the group's weights are stored transposed (in x out, as ``transformers``' Conv1D
            keeps them): orientation and channels are those of the (out x in) matrix they stand for, so the
            update equals the equivalent ``nn.Linear``'s. 2-D weights only. Default False
            (:func:`~lowrank_opt.lowrank_param_groups` sets it for Conv1D weights).
        norm_growth_limit (float | None): gamma of the limiter, ``None`` turns it off. Default 1.01.
        seed (int): seed of every projection. Default 0.
        cache_projection (bool): keep each P in memory between redraws (faster on slow RNGs, costs
            r x min(m, n) per matrix, never saved); else P is regenerated each step. Default False.
        state_dtype (None | str | torch.dtype): dtype of the moments; ``None`` is fp32 (fp64 for fp64
            parameters); ``torch.bfloat16`` halves optimizer memory. Math is always fp32 or wider.
        dense_state_bits (int): ``8`` keeps the AdamW moments of the group's plain-AdamW tensors (embeddings,
            lm_head, ``rank=None`` groups) in bitsandbytes' blockwise 8-bit form (dynamic map, 256-element
            blocks, as its 8-bit optimizers store them; tensors under 4,096 elements stay 32-bit, as there):
            2 bytes per element instead of 8 (LLaMA-7B's embed_tokens and lm_head: 2.10 -> 0.53 GB). Decoded,
            updated in fp32 and re-encoded a piece at a time; saved as plain uint8/fp32 tensors. Needs
            bitsandbytes; not with FSDP2/ZeRO shards. Default 32.
        correct_bias (bool): fold Adam's bias correction into the step size. Default True.
        nonfinite (str): a gradient with inf/nan makes ``step()`` raise, naming the parameter, before any
            parameter or state changes (``"raise"``, default), or that tensor's update is skipped and counted
            in ``skipped_tensors`` (``"skip"``).
        layerwise (bool): update each parameter inside backward, as soon as its gradient is accumulated, and
            free that gradient at once, so only about one matrix of gradients is alive at a time. ``step()``
            then has nothing left to do; schedulers and checkpoints work unchanged (same state dict as the
            normal mode). Not compatible with gradient accumulation over several backward passes, nor with
            data-parallel gradient all-reduce or sharding, and global-norm clipping sees no gradients (use
            the built-in per-tensor ``norm_growth_limit``). With ``nonfinite="raise"`` an inf/nan gradient
            raises out of ``backward()``; parameters updated earlier in that backward pass keep their update.
        stochastic_rounding (bool): for bf16 parameters (pure-bf16 training, no fp32 master weights), write
            the fp32 result of the update and weight decay back with stochastic rounding
            (:func:`~lowrank_opt.rounding.stochastic_round_to_bf16`), so that updates smaller than half a
            bf16 spacing (2^-9 to 2^-8 of the weight) are not lost but kept in expectation; ``False`` rounds
            to nearest. The random bits are a pure function of (``seed``, parameter identity, the parameter's step
            count, and, for a shard, its first element): runs are reproducible, resume is bit-exact, and
            data-parallel replicas round alike. fp16 parameters are always rounded to nearest (fp16 training
            normally keeps fp32 master weights); fp32/fp64 parameters need no rounding. Default True.
        foreach (bool | None): the fast path (``None``, default, or ``True``): plain-AdamW tensors are updated
            with torch's foreach ops (small ones) or in pieces (2^20 elements on CPU, 2^22 on GPUs: no
            full-size temporaries). Same numbers as ``False``, the simple one-tensor-at-a-time reference path
            it is tested against (bit for bit on CPU).
        process_group: the process group DeepSpeed ZeRO's flat shards are split over (default: the world;
            :func:`lowrank_opt.integrations.deepspeed.initialize` sets DeepSpeed's data-parallel group).
            FSDP2 parameters use their own device mesh. Not saved.
        comm: an object with ``rank``, ``world_size`` and ``all_reduce_(tensor)`` (sum in place) to use instead
            of torch.distributed for flat shards (tests, custom transports). Not saved.

    Attributes:
        skipped_tensors: tensor updates skipped for a non-finite gradient.
        comm_bytes_last_step / comm_bytes_total: bytes this optimizer all-reduced in its latest ``step()``
            (summed over the per-group calls DeepSpeed makes) and since construction.
        comm_bytes_by_param: each shared parameter's share of the latest step's all-reduces, by its label (the
            one flag per batch that says "some process raises" is not attributed).
        init_steps_skipped: DeepSpeed set-up calls recognised and skipped (see :meth:`step`).

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
        transposed: bool = False,
        norm_growth_limit: Optional[float] = 1.01,
        seed: int = 0,
        cache_projection: bool = False,
        state_dtype: Union[None, str, torch.dtype] = None,
        dense_state_bits: int = 32,
        correct_bias: bool = True,
        nonfinite: str = "raise",
        layerwise: bool = False,
        stochastic_rounding: bool = True,
        foreach: Optional[bool] = None,
        process_group: Any = None,
        comm: Any = None,
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
            transposed=transposed,
            norm_growth_limit=norm_growth_limit,
            seed=seed,
            cache_projection=cache_projection,
            state_dtype=state_dtype,
            dense_state_bits=dense_state_bits,
            correct_bias=correct_bias,
            nonfinite=nonfinite,
            stochastic_rounding=stochastic_rounding,
            foreach=foreach,
        )
        if not isinstance(layerwise, bool):
            raise TypeError(f"layerwise must be a bool, got {layerwise!r}")
        self.layerwise = layerwise
        self._process_group = process_group
        self._comm = comm
        self._init_caches()
        self._records: list[list[_Record]] = []
        self._param_count = 0
        self.skipped_tensors = 0
        self.init_steps_skipped = 0
        self.comm_bytes_total = 0
        self._comm_bytes_by_key: dict[Any, int] = {}
        self.comm_bytes_by_param: dict[str, int] = {}
        super().__init__(params, defaults)
        _common.check_param_dtypes(self)
        if layerwise:
            self._register_layerwise_hooks()

    def _init_caches(self) -> None:
        """Everything rebuilt from param_groups: lookups, projection cache, hooks."""
        self._group_of: dict[int, int] = {}  # id(group dict) -> group index
        self._group_dicts: list[dict] = []
        self._where: dict[torch.Tensor, tuple[int, int]] = {}  # param -> (group index, index in group)
        self._projection_cache: dict[torch.Tensor, tuple[int, torch.Tensor]] = {}
        self._projection_cache_shards: dict[tuple, tuple[int, torch.Tensor]] = {}
        self._hooks: list = []
        self._flat_cache: dict[tuple, list] = {}
        self._warned_full_rank = False
        self._seen_sq: Optional[torch.Tensor] = None

    # -- construction-time validation ------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        group = self.param_groups[group_index]
        try:
            self._check_group_keys(group, group_index)
            self._validate_group(group, group_index)
        except Exception:
            self.param_groups.pop()
            raise
        names = group.get("param_names")
        records = []
        for i, p in enumerate(group["params"]):
            name = names[i] if names is not None else None
            identity = identity_key(name if name is not None else self._param_count)
            self._param_count += 1
            try:
                ref = weakref.ref(p)
            except TypeError:  # pragma: no cover - every torch tensor is weak-referenceable
                ref = None
            records.append(_Record(identity, full_shape(p), name, bool(p.requires_grad), ref))
        self._records.append(records)
        self._reindex()

    def _reindex(self) -> None:
        self._group_dicts = list(self.param_groups)
        self._group_of = {id(g): gi for gi, g in enumerate(self.param_groups)}
        self._where = {p: (gi, i) for gi, g in enumerate(self.param_groups) for i, p in enumerate(g["params"])}

    def _validate_group(self, group: dict, group_index: int, where: Optional[str] = None) -> None:
        """Every option of a param group, by the one declarative check (:data:`OPTION_SPECS`), then the rank rule
        against every matrix. Used at construction and on every group a checkpoint would load."""
        where = _common.group_where(group_index) if where is None else where
        _common.validate_group(group, OPTION_SPECS, where)
        group["betas"] = tuple(group["betas"])
        group["state_dtype"] = _state_dtype_name(group["state_dtype"], where)
        if group["rank"] is not None:
            if isinstance(group["rank"], bool) or not (isinstance(group["rank"], (int, float)) or callable(group["rank"])):
                raise _common.OptionTypeError(
                    f"rank must be None, an int, a float in (0, 1] or a callable, got {group['rank']!r} "
                    f"({type(group['rank']).__name__}){where}")
            for i, p in enumerate(group["params"]):
                shape = full_shape(p)
                if group["transposed"] and len(shape) != 2 and len(shape) >= 2:
                    raise ValueError(f"transposed=True is for 2-D weights stored as in x out, got shape {shape} for "
                                     f"{_common.param_label(group, i, p)}{where}")
                if len(shape) >= 2 and math.prod(shape):
                    self._resolve_rank(group, shape, _common.param_label(group, i, p) + where)

    def _check_group_keys(self, group: dict, group_index: int) -> None:
        """A key that is no option (a typo such as ``rnak=4``) would be kept and silently ignored: refuse it."""
        unknown = sorted(set(group) - set(self.defaults) - _GROUP_METADATA)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))}{_common.group_where(group_index)}; Apollo's "
                f"options are {', '.join(sorted(self.defaults))}")

    @staticmethod
    def _side(group: dict, shape: tuple[int, ...]) -> str:
        """Which side of the stored 2-D view is projected. A ``transposed`` group holds weights stored as the
        transpose of the matrix they stand for (``transformers``' Conv1D: in x out): the orientation is chosen
        on that matrix, so a Conv1D weight gets the same channels and P as the equivalent Linear (R = G P^T of
        the Linear's gradient is (P G_stored)^T)."""
        shape2d = matrix_shape(shape)
        if not group.get("transposed", False):
            return orientation(shape2d, group["sort_dims"])
        side = orientation((shape2d[1], shape2d[0]), group["sort_dims"])
        return LEFT if side == RIGHT else RIGHT

    @classmethod
    def _resolve_rank(cls, group: dict, shape: tuple[int, ...], label: str) -> int:
        shape2d = matrix_shape(shape)
        dim = shape2d[1] if cls._side(group, shape) == RIGHT else shape2d[0]
        return resolve_rank(group["rank"], dim, label)

    # -- parameters and their records ------------------------------------------------------------------

    def _group_index(self, group: dict) -> int:
        """The index of a param group among those the optimizer was built with. DeepSpeed ZeRO 1/2 call
        ``step()`` with ``param_groups = [that one group]``: the dict is ours, found by identity."""
        index = self._group_of.get(id(group))
        if index is not None and self._group_dicts[index] is group:
            return index
        self._reindex()  # groups replaced since (load_state_dict through a wrapper)
        index = self._group_of.get(id(group))
        if index is not None:
            return index
        raise RuntimeError("Apollo.step() got a param group it was not built with (a wrapper replaced the group "
                           "dicts); build the optimizer on the parameters it will train")

    def _label(self, group: dict, i: int, p: Optional[torch.Tensor] = None, record: Optional[_Record] = None) -> str:
        if record is not None and record.name is not None:
            return repr(record.name)
        if p is not None and i < len(group["params"]) and group["params"][i] is p:
            return _common.param_label(group, i, p)
        shape = record.shape if record is not None else tuple(p.shape)
        return f"param {i} (shape {shape}) of its param group"

    def _plan_for(self, group: dict, record: _Record, label: str) -> Optional[ProjectionPlan]:
        """How a parameter is projected (computed once, recomputed only if the group's rank rule or
        orientation changes), or None when it is updated with plain AdamW."""
        if group["rank"] is None or len(record.shape) < 2 or not math.prod(record.shape):
            return None  # plain AdamW (an empty matrix has nothing to project)
        key = (id(group["rank"]) if callable(group["rank"]) else group["rank"], group["sort_dims"],
               group.get("transposed", False))
        if record.plan is None or record.plan_key != key:
            shape2d = matrix_shape(record.shape)
            side = self._side(group, record.shape)
            rank = self._resolve_rank(group, record.shape, label)
            record.plan, record.plan_key = ProjectionPlan(shape2d, side, rank, record.identity), key
            compressed = shape2d[1] if side == RIGHT else shape2d[0]
            if rank >= compressed and not self._warned_full_rank:
                self._warned_full_rank = True
                logger.warning(
                    "Apollo: rank %d >= the compressed dimension %d of %s (shape %s): its projection is a square "
                    "Gaussian and its moments are as large as AdamW's (%d x %d); give it a smaller rank, or "
                    "rank=None for plain AdamW (said once per optimizer)", rank, compressed, label,
                    tuple(record.shape), *ProjectionPlan(shape2d, side, rank, record.identity).moment_shape)
        return record.plan

    def _locate(self, param: torch.Tensor) -> tuple[dict, int]:
        location = self._where.get(param)
        if location is None or location[0] >= len(self.param_groups) or \
                self.param_groups[location[0]]["params"][location[1]] is not param:
            self._reindex()  # the entries were swapped (accelerate's FSDP2 preparation) or groups reloaded
            location = self._where.get(param)
            if location is None:
                raise KeyError("the tensor is not a parameter of this optimizer")
        return self.param_groups[location[0]], location[1]

    def projection_matrix(self, param: torch.Tensor, step: Optional[int] = None) -> Optional[torch.Tensor]:
        """The projection matrix P (rank x compressed dim, fp32, on the parameter's device) that ``param``
        uses at optimizer step ``step`` (counted from 0; default: the step its next update will take).
        ``None`` for parameters updated with plain AdamW. The orientation follows the class docstring:
        R = G P^T when P's second dimension is G's columns, else R = P G."""
        group, i = self._locate(param)
        record = self._records[self._group_index(group)][i]
        plan = self._plan_for(group, record, self._label(group, i, param, record))
        if plan is None:
            return None
        if step is None:
            step = self.state[param].get("step", 0) if param in self.state else 0
        device = param.to_local().device if is_dtensor(param) else param.device
        return plan.matrix(group["seed"], step, group["update_proj_gap"], device)

    def _projection(self, group: dict, plan: ProjectionPlan, key: Any, step: int, device, dtype) -> torch.Tensor:
        """P for this step: drawn from (seed, identity, refresh), or kept between redraws with
        ``cache_projection`` (keyed by the parameter, or (flat shard, position) for a piece of one)."""
        gap = group["update_proj_gap"]
        if not group["cache_projection"]:
            return plan.matrix(group["seed"], step, gap, device, dtype)
        refresh_index = step // gap
        cache = self._projection_cache if isinstance(key, torch.Tensor) else self._projection_cache_shards
        cached = cache.get(key)
        if cached is None or cached[0] != refresh_index or cached[1].dtype != dtype:
            cached = (refresh_index, plan.matrix(group["seed"], step, gap, device, dtype))
            cache[key] = cached
        return cached[1]

    # -- state, copies and checkpoints -----------------------------------------------------------------

    def __getstate__(self) -> dict:
        # Hooks, weak references, process groups and caches do not pickle; everything is rebuilt from
        # param_groups in __setstate__ (torch's Optimizer.__getstate__ keeps only defaults, state, groups).
        state = super().__getstate__()
        state["layerwise"] = self.layerwise
        state["skipped_tensors"] = self.skipped_tensors
        state["init_steps_skipped"] = self.init_steps_skipped
        state["comm_bytes_total"] = self.comm_bytes_total
        state["_records"] = [[_Record(r.identity, r.shape, r.name, r.trainable) for r in rs] for rs in self._records]
        state["_param_count"] = self._param_count
        return state

    def __setstate__(self, state: dict) -> None:
        if "_records" in self.__dict__ and "_records" not in state:
            # torch's load_state_dict ends with __setstate__({"state", "param_groups"}) on a live optimizer:
            # keep what it recorded at construction (the layout it recognises shards by), just reindex.
            super().__setstate__(state)
            self._fill_group_defaults()
            self._reindex()
            return
        records = state.pop("_records", None)
        extras = {k: state.pop(k, 0) for k in ("layerwise", "skipped_tensors", "init_steps_skipped",
                                                "comm_bytes_total", "_param_count")}
        super().__setstate__(state)
        self.layerwise = bool(extras["layerwise"])
        self.skipped_tensors = extras["skipped_tensors"]
        self.init_steps_skipped = extras["init_steps_skipped"]
        self.comm_bytes_total = extras["comm_bytes_total"]
        self._process_group = None
        self._comm = None
        self._comm_bytes_by_key = {}
        self.comm_bytes_by_param = {}
        self._init_caches()
        self._fill_group_defaults()
        if records is None:  # pickled by an older version: rebuild from the groups
            records, count = [], 0
            for group in self.param_groups:
                names = group.get("param_names")
                rs = []
                for i, p in enumerate(group["params"]):
                    name = names[i] if names is not None else None
                    rs.append(_Record(identity_key(name if name is not None else count), full_shape(p), name,
                                      bool(p.requires_grad)))
                    count += 1
                records.append(rs)
            extras["_param_count"] = count
        for group, rs in zip(self.param_groups, records):
            for r, p in zip(rs, group["params"]):
                r.original = weakref.ref(p)
        self._records = records
        self._param_count = extras["_param_count"]
        self._reindex()
        if self.layerwise:
            self._register_layerwise_hooks()

    def _fill_group_defaults(self) -> None:
        for group in self.param_groups:  # checkpoints from before the option: the constructor's choice
            group.setdefault("stochastic_rounding", self.defaults.get("stochastic_rounding", True))
            group.setdefault("foreach", self.defaults.get("foreach"))
            group.setdefault("transposed", self.defaults.get("transposed", False))
            group.setdefault("dense_state_bits", self.defaults.get("dense_state_bits", 32))

    def state_dict(self) -> dict:
        """torch's state dict, with a callable ``rank`` replaced by the integer it resolves to for each
        parameter (``None`` for the plain-AdamW ones), so checkpoints hold only tensors and plain data and load
        with ``torch.load(weights_only=True)``."""
        sd = super().state_dict()
        for saved, group, records in zip(sd["param_groups"], self.param_groups, self._records):
            if callable(group["rank"]):
                saved["rank"] = [
                    self._resolve_rank(group, r.shape, self._label(group, i, record=r))
                    if len(r.shape) >= 2 and math.prod(r.shape) else None
                    for i, r in enumerate(records)]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint, trusting nothing in it: every loaded option is checked as the constructor checks
        it, and every state tensor must have the shape this parameter needs under the loaded options (a
        checkpoint of another model is refused naming the parameter and both shapes), all before anything
        changes. Saved state dtypes are kept (fp32 moments of bf16 weights stay fp32). A rank saved as
        per-parameter integers (from a callable rule) keeps the constructor's rule, which must resolve to the
        same integers."""
        state_dict = dict(state_dict)
        saved_groups = [dict(g) for g in state_dict.get("param_groups", [])]
        state_dict["param_groups"] = saved_groups
        for index, (saved, group, records) in enumerate(zip(saved_groups, self.param_groups, self._records)):
            if not isinstance(saved.get("rank"), (list, tuple)):
                continue
            rule = group["rank"]
            for i, (want, r) in enumerate(zip(saved["rank"], records)):
                if want is None or len(r.shape) < 2 or not math.prod(r.shape):
                    continue
                probe = dict(saved, rank=rule)
                got = self._resolve_rank(probe, r.shape, self._label(group, i, record=r)) if rule is not None else None
                if got != want:
                    raise ValueError(
                        f"the checkpoint was saved with rank {want} for {self._label(group, i, record=r)} in "
                        f"param_groups[{index}], but this optimizer's rank rule {rule!r} gives {got}: build the "
                        "optimizer with the rank it was trained with")
            saved["rank"] = rule

        def check_group(candidate: dict, where: str) -> None:
            self._validate_group(dict(candidate), 0, where)

        def layout(group: dict, i: int, p: torch.Tensor) -> dict:
            gi = self._group_index(group)
            records = self._records[gi]
            if len(group["params"]) != len(records) or tuple(p.shape) != records[i].shape:
                return {}  # a flat shard (DeepSpeed) or a copy: its pieces' shapes depend on the layout
            saved = {**self.defaults, **saved_groups[gi]}
            record = records[i]
            keys = {"step": _common.StateKey(_common.COUNT),
                    "limiter_norm": _common.StateKey((), required=False)}
            if saved["rank"] is not None and len(record.shape) >= 2 and math.prod(record.shape):
                shape2d = matrix_shape(record.shape)
                side = self._side(saved, record.shape)
                rank = self._resolve_rank(saved, record.shape, self._label(group, i, p, record))
                moments = ProjectionPlan(shape2d, side, rank, record.identity).moment_shape
            else:
                moments = record.shape
                if saved.get("dense_state_bits", 32) == 8 and math.prod(record.shape) >= MIN_8BIT_SIZE:
                    blocks = (-(-math.prod(record.shape) // 256),)
                    keys.update(exp_avg_codes=_common.StateKey(tuple(record.shape), dtype=torch.uint8),
                                exp_avg_sq_codes=_common.StateKey(tuple(record.shape), dtype=torch.uint8),
                                exp_avg_absmax=_common.StateKey(blocks), exp_avg_sq_absmax=_common.StateKey(blocks))
                    return keys
            keys.update(exp_avg=_common.StateKey(tuple(moments)), exp_avg_sq=_common.StateKey(tuple(moments)))
            return keys

        self._projection_cache.clear()
        self._projection_cache_shards.clear()
        _common.load_state_dict_checked(self, state_dict, check_group=check_group, layout=layout)
        self._reindex()

    def _state_for(self, key: torch.Tensor, shard_index: Optional[int]) -> dict:
        """The state of a parameter (or of one parameter's piece of a flat shard), or a new empty dict that
        :meth:`_init_state` registers on the first update (looking does not create state)."""
        state = self.state.get(key)
        if shard_index is not None:
            state = (state or {}).get(SHARD_STATE_KEY, {}).get(shard_index)
        return state if state is not None else {}

    def _init_state(self, piece: _Piece, shape: tuple[int, ...], global_shape: Optional[tuple[int, ...]] = None) -> dict:
        """The piece's state, with zero moments of ``shape`` (local) on its first update. Under FSDP2 moments
        whose rows are the weight's rows (dense, right projection) are DTensors sharded like it, so that
        ``torch.distributed.checkpoint`` saves and reshards them."""
        state = piece.state
        if "step" not in state:
            group = piece.group
            dtype = _STATE_DTYPES[group["state_dtype"]] if group["state_dtype"] else _compute_dtype(piece.weight.dtype)
            state["step"] = 0
            for key in ("exp_avg", "exp_avg_sq"):
                local = torch.zeros(shape, dtype=dtype, device=piece.weight.device)
                if piece.dtensor is not None and global_shape is not None:
                    from torch.distributed.tensor import DTensor

                    stride = tuple(math.prod(global_shape[d + 1:]) for d in range(len(global_shape)))
                    local = DTensor.from_local(local, piece.dtensor.device_mesh, piece.dtensor.placements,
                                               run_check=False, shape=torch.Size(global_shape), stride=stride)
                state[key] = local
            if piece.shard_index is None:
                self.state[piece.key] = state
            else:
                self.state[piece.key].setdefault(SHARD_STATE_KEY, {})[piece.shard_index] = state
        return state

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if is_dtensor(t) else t

    # -- step ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimization step. A gradient with inf/nan raises (before anything changes) or is skipped,
        per ``nonfinite``.

        DeepSpeed's bf16/fp16 stage-0 wrapper calls ``step()`` once inside ``deepspeed.initialize`` with fp32
        copies of the parameters and all-zero gradients, to create optimizer state. That call would count as
        step 1 (bias correction and projection schedule shifted by one) and apply weight decay; a ``step()`` on
        parameters that are not the ones the optimizer was built with, none of them with state yet, and every
        gradient exactly zero, is recognised as it and changes nothing (counted in ``init_steps_skipped``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update([(group, i, p) for group in self.param_groups for i, p in enumerate(group["params"])])
        self._seen_sq = None  # a layer-wise backward pass ends with this step()
        return loss

    def gradient_norm_seen(self) -> Optional[float]:
        """Layer-wise mode: the 2-norm of all gradients updated since the last ``step()`` (the backward pass
        just run), which global clipping would have measured; None when none was seen. The HF Trainer glue logs
        it as ``grad_norm`` (there is no gradient left to measure after backward)."""
        return None if self._seen_sq is None else float(self._seen_sq.sqrt())

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
                    if is_dtensor(p):
                        raise ValueError("layerwise=True cannot run on sharded (FSDP2) parameters: their gradients "
                                         "are reduced after backward; use layerwise=False")
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
        self._process_group = group
        self._comm = None
        self._flat_cache.clear()

    @property
    def comm_bytes_last_step(self) -> int:
        return sum(self._comm_bytes_by_key.values())

    def _get_comm(self):
        if self._comm is None:
            self._comm = TorchDistComm(self._process_group)
        return self._comm

    # -- recognising what each parameter is in this step ----------------------------------------------

    def _pieces(self, group: dict, i: int, p: torch.Tensor) -> list[_Piece]:
        gi = self._group_index(group)
        records = self._records[gi]
        live = group["params"]
        if is_dtensor(p):
            return [self._dtensor_piece(group, i, p, records[i] if len(live) == len(records) else None)]
        if len(live) == len(records) and tuple(p.shape) == records[i].shape:
            return [self._whole_piece(group, i, p, records[i])]
        trainable = [k for k, r in enumerate(records) if r.trainable]
        if len(live) == len(trainable) and all(tuple(q.shape) == records[k].shape for q, k in zip(live, trainable)):
            # fp32 copies of the trainable parameters (DeepSpeed's bf16/fp16 stage-0 wrapper)
            return [self._whole_piece(group, i, p, records[trainable[i]])]
        if len(live) == 1 and p.ndim == 1:
            return self._flat_pieces(group, gi, p)
        shapes = [tuple(q.shape) for q in live]
        raise RuntimeError(
            f"Apollo was built with parameters of shapes {[r.shape for r in records]} in param_groups[{gi}] but "
            f"step() sees {shapes}: a wrapper changed the parameters in a way Apollo does not recognise (it knows "
            "unsharded parameters, FSDP2 DTensors and DeepSpeed ZeRO 1-3 flat shards). Rather than update these "
            "matrices as something else, it stops here: build the optimizer on the parameters the wrapper trains")

    def _whole_piece(self, group: dict, i: int, p: torch.Tensor, record: _Record) -> _Piece:
        label = self._label(group, i, p, record)
        original = record.tensor()
        return _Piece(group, i, label, record.identity, p, p.grad, self._state_for(p, None),
                      self._plan_for(group, record, label),
                      key=p, is_copy=original is not None and original is not p)

    def _dtensor_piece(self, group: dict, i: int, p: torch.Tensor, record: Optional[_Record]) -> _Piece:
        if record is None or tuple(p.shape) != record.shape:
            raise RuntimeError(
                f"Apollo got a sharded parameter of shape {tuple(p.shape)} at position {i} of a param group built "
                f"with {'another parameter' if record is not None else 'a different number of parameters'}: the "
                "parameters were swapped for others")
        label = self._label(group, i, p, record)
        plan = self._plan_for(group, record, label)
        row0, nrows, comm = dtensor_rows(p, label)
        grad = p.grad
        if not is_dtensor(grad):
            raise RuntimeError(f"the gradient of the DTensor parameter {label} is not a DTensor")
        weight, local_grad = p.to_local(), grad.to_local()
        layout = None
        shared = comm is not None
        if plan is not None and (shared or nrows != record.shape[0]):
            layout = ShardLayout.rows(plan.shape2d, row0, nrows)
        n_row = math.prod(record.shape[1:]) if len(record.shape) > 1 else 1
        return _Piece(group, i, label, record.identity, weight, local_grad, self._state_for(p, None), plan, layout, comm,
                      shared, round_offset=row0 * n_row, dtensor=p, key=p)

    def _flat_pieces(self, group: dict, gi: int, flat: torch.Tensor) -> list[_Piece]:
        records = self._records[gi]
        comm = self._get_comm()
        key = (id(flat), gi, comm.rank, comm.world_size, flat.numel())
        layout_pieces = self._flat_cache.get(key)
        if layout_pieces is None:
            originals = [r.tensor() for r in records]
            trainable = [bool(o.requires_grad) if o is not None else r.trainable for r, o in zip(records, originals)]
            layout_pieces = zero_flat_pieces(flat, [r.shape for r in records], trainable, originals, comm.rank,
                                             comm.world_size, f"param_groups[{gi}]")
            self._flat_cache[key] = layout_pieces
        grad = flat.grad
        pieces = []
        for fp in layout_pieces:
            if fp.numel == 0 and not fp.shared:
                continue
            record = records[fp.index]
            label = self._label(group, fp.index, record=record)
            plan = self._plan_for(group, record, label)
            weight = flat.narrow(0, fp.offset, fp.numel)
            g = grad.narrow(0, fp.offset, fp.numel)
            layout = None
            if plan is not None:
                n = plan.shape2d[1]
                layout = ShardLayout.of_slice(plan.shape2d, fp.start, fp.numel, sorted({c // n for c in fp.cuts if c % n}))
            pieces.append(_Piece(group, fp.index, label, record.identity, weight, g,
                                 self._state_for(flat, fp.index), plan, layout, comm if fp.shared else None,
                                 fp.shared, round_offset=fp.start, key=flat, shard_index=fp.index))
        return pieces

    # -- the update ------------------------------------------------------------------------------------

    def _update(self, candidates: list) -> None:
        pieces: list[_Piece] = []
        for group, i, p in candidates:
            if p.grad is None:
                continue
            _common.check_grad_supported(self, group, i, p)
            pieces.extend(self._pieces(group, i, p))
        if not pieces:
            return
        for piece in pieces:
            if piece.shared:
                self.comm_bytes_by_param[piece.label] = 0
        if self._is_setup_call(pieces):
            self.init_steps_skipped += 1
            logger.info("Apollo: step() with all-zero gradients on copies of the parameters before any state "
                        "(DeepSpeed set-up) skipped: no step counted, no state, no weight decay")
            return
        # 1. Read only: squared gradient norms (needed for ||U|| anyway) and the finiteness of every gradient,
        #    decided on every process alike, before any parameter or state changes.
        skip = self._check(pieces)
        work = [piece for piece in pieces if piece not in skip]
        # (a process holding no element of a flat shard's tensor keeps no state for it)
        dense = [piece for piece in work if piece.plan is None and (piece.weight.numel() or piece.shard_index is None)]
        lowrank = [piece for piece in work if piece.plan is not None]
        # 2. Low-rank matrices: whole ones one after the other (one R alive at a time); sharded ones in
        #    batches that share each all-reduce.
        batch: list[_Piece] = []
        batch_bytes = 0
        for piece in lowrank:
            if not piece.shared:
                self._lowrank_update([piece])
                continue
            batch.append(piece)
            batch_bytes += math.prod(piece.plan.moment_shape) * 4
            if batch_bytes >= _BATCH_BYTES:
                self._lowrank_update(batch)
                batch, batch_bytes = [], 0
        if batch:
            self._lowrank_update(batch)
        # 3. Plain AdamW.
        self._dense_updates(dense)

    @staticmethod
    def _is_setup_call(pieces: list[_Piece]) -> bool:
        """DeepSpeed's stage-0 set-up call: copies of the parameters, no state yet, every gradient zero."""
        if not all(piece.is_copy for piece in pieces) or any(len(piece.state) for piece in pieces):
            return False
        return all(piece.grad.device.type != "meta" and not bool(piece.grad.any()) for piece in pieces)

    def _check(self, pieces: list[_Piece]) -> set:
        """Before anything changes: squared gradient norms per kept channel (or in total), which ||U|| needs
        anyway, and whether each gradient is finite. A gradient whose squares overflow the compute dtype counts
        as non-finite (its second moment would become inf and freeze the weight). Pieces shared with other
        processes decide through their comm, so that every process takes the same decision. Returns the pieces
        to skip; raises when a non-finite gradient meets ``nonfinite="raise"`` (on any process)."""
        totals: list[torch.Tensor] = [None] * len(pieces)  # type: ignore[list-item]
        dense: dict[tuple, list[int]] = {}
        for k, piece in enumerate(pieces):
            plan = piece.plan
            if plan is None:
                dense.setdefault((piece.grad.device, piece.grad.dtype), []).append(k)
                continue
            compute = _compute_dtype(piece.weight.dtype)
            tensor_wise = piece.group["scale_type"] == "tensor"
            if piece.layout is None:
                grad2d = piece.grad.reshape(plan.shape2d)
                if tensor_wise:
                    piece.sq = _common.vector_norm_wide(grad2d, compute).square()
                else:
                    piece.sq = channel_norms(grad2d, plan.rank_dim, compute).square_()
            else:
                blocks = self._blocks(piece, compute)
                device = piece.weight.device
                if tensor_wise:
                    piece.sq = torch.zeros((), dtype=compute, device=device)
                    for _, g in blocks:
                        piece.sq += torch.linalg.vector_norm(g, dtype=compute).square()
                elif plan.side == RIGHT:
                    piece.sq = torch.zeros(piece.layout.num_rows, dtype=compute, device=device)
                    for b, g in blocks:
                        r0 = b.row - piece.layout.first_row
                        piece.sq[r0:r0 + b.nrows] += torch.linalg.vector_norm(g, dim=1, dtype=compute).square()
                else:
                    piece.sq = torch.zeros(plan.shape2d[1], dtype=compute, device=device)
                    for b, g in blocks:
                        piece.sq[b.col:b.col + b.ncols] += channel_norms(g, 0, compute).square_()
            totals[k] = piece.sq.sum()
        for (_, dtype), ks in dense.items():  # plain-AdamW tensors: one batched norm each
            grads = [pieces[k].grad for k in ks]
            wide = dtype if dtype == torch.float64 else torch.float32
            for k, norm in zip(ks, _common.norms_wide(grads, wide)):
                totals[k] = norm.square()
        if all(t.device.type == "meta" for t in totals):
            return set()  # meta tensors (the memory estimator's dry run) have no values to check
        if self.layerwise:  # what gradient clipping would have seen: the norm of every gradient of this backward
            for t in totals:
                self._seen_sq = t.double() if self._seen_sq is None else self._seen_sq + t.double().to(self._seen_sq.device)
        flags = [not f for f in self._host_bools([torch.isfinite(t) for t in totals])]
        raise_here = any(flag and piece.group["nonfinite"] == "raise" for flag, piece in zip(flags, pieces))
        elsewhere = False
        by_comm: dict[int, list[int]] = {}
        for k, piece in enumerate(pieces):
            if piece.shared:
                by_comm.setdefault(id(piece.comm), []).append(k)
        for ks in by_comm.values():
            # One all-reduce per comm: "some process raises", each shared piece's flag, and the squared norms
            # that other processes add to (left projections: per column; tensor-wise: the total).
            comm = pieces[ks[0]].comm
            device = pieces[ks[0]].weight.device
            dtype = torch.float64 if any(pieces[k].weight.dtype == torch.float64 for k in ks) else torch.float32
            parts = [torch.tensor([float(raise_here)], dtype=dtype, device=device)]
            summed = []
            for k in ks:
                piece = pieces[k]
                parts.append(torch.tensor([float(flags[k])], dtype=dtype, device=device))
                if piece.plan is not None and not (piece.plan.side == RIGHT and piece.group["scale_type"] == "channel"):
                    parts.append(piece.sq.reshape(-1).to(device, dtype))
                    summed.append(k)
                self._count(piece, (1 + (piece.sq.numel() if k in summed else 0)) * parts[0].element_size())
            buf = torch.cat(parts)
            self._all_reduce(comm, buf, ("check",) + tuple(pieces[k].identity for k in ks))
            values = buf.cpu()
            elsewhere = elsewhere or float(values[0]) > 0
            pos = 1
            for k in ks:
                flags[k] = float(values[pos]) > 0
                pos += 1
                if k in summed:
                    piece = pieces[k]
                    size = piece.sq.numel()
                    piece.sq = buf[pos:pos + size].reshape(piece.sq.shape).to(piece.sq.dtype)
                    pos += size
        bad = [k for k in range(len(pieces)) if flags[k]]
        if not bad and not elsewhere:
            return set()
        labels = [pieces[k].label for k in bad]
        if raise_here or elsewhere or any(pieces[k].group["nonfinite"] == "raise" for k in bad):
            faults = [(pieces[k].label, self._fault_reason(pieces[k])) for k in bad] or [
                ("a parameter held by another process", "non-finite gradient (inf or nan)")]
            changed = "no parameter or optimizer state was changed"
            if any(piece.shared for piece in pieces):
                changed += " on any process"
            elif self.layerwise:
                changed = ("nothing of these tensors was changed (parameters updated earlier in this backward pass "
                           "keep their update)")
            raise RuntimeError(_common.gradient_fault_message(self, faults, changed=changed))
        self.skipped_tensors += len(bad)
        logger.warning("Apollo: skipped the update of %s (non-finite gradient)", ", ".join(labels))
        return {pieces[k] for k in bad}

    @staticmethod
    def _fault_reason(piece: _Piece) -> str:
        """Why a gradient was refused (reads it: only on the error path)."""
        compute = _compute_dtype(piece.weight.dtype)
        grad = piece.grad
        if grad.numel() == 0 or not bool(torch.isfinite(grad).all()):
            return "non-finite gradient (inf or nan)"
        largest = float(grad.abs().max().double())
        if largest > _common.square_limit(compute):
            return _common.describe_fault(grad, compute)
        return (f"gradient too large for {str(compute).replace('torch.', '')} math (max |g| = {largest:.3g}: the sum "
                "of its squares, per channel or in all, overflows)")

    @staticmethod
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

    def _all_reduce(self, comm: Any, tensor: torch.Tensor, key: Any) -> None:
        if comm is None or comm.world_size == 1:
            return
        nbytes = tensor.numel() * tensor.element_size()
        self._comm_bytes_by_key[key] = nbytes  # the latest bytes of this reduction (one per step)
        self.comm_bytes_total += nbytes
        comm.all_reduce_(tensor)

    def _count(self, piece: _Piece, nbytes: int) -> None:
        """Attribute all-reduced bytes to a parameter (``comm_bytes_by_param``: its share in the latest step)."""
        if piece.comm is not None and piece.comm.world_size > 1:
            self.comm_bytes_by_param[piece.label] = self.comm_bytes_by_param.get(piece.label, 0) + nbytes

    @staticmethod
    def _row_blocks(grad2d: torch.Tensor, compute: torch.dtype):
        """(Block, rows of the gradient in the compute dtype) for whole blocks of rows of about one dense chunk:
        a half-precision gradient is upcast a block at a time (for LLaMA-7B's bf16 embedding a 64 MB fp32 block
        instead of a 524 MB copy)."""
        from .sharding import Block

        m, n = grad2d.shape
        rows = max(1, _dense_chunk(grad2d.device) // max(1, n))
        for start in range(0, m, rows):
            block = grad2d[start:start + rows]
            yield Block(start, block.shape[0], 0, n, start * n), block.to(compute)

    def _blocks(self, piece: _Piece, compute: torch.dtype) -> list:
        """(Block, gradient rectangle in the compute dtype) for each block of a sharded matrix piece."""
        flat = piece.grad.reshape(-1)
        out = []
        for b in piece.layout.blocks:
            g = flat.narrow(0, b.offset, b.numel).view(b.nrows, b.ncols)
            out.append((b, g if g.dtype == compute else g.to(compute)))
        return out

    def _lowrank_update(self, batch: list[_Piece]) -> None:
        """Steps 1-9 for a batch of matrices. Sums that cross processes are all-reduced once per round for the
        whole batch; a whole matrix (nothing shared) reduces nothing. A process holding no element of a shared
        matrix adds zeros and keeps no state for it (except under FSDP2, where every process keeps the state
        of every parameter, as torch.distributed.checkpoint expects)."""
        comm = batch[0].comm
        key = tuple(piece.identity for piece in batch)
        # 1. Projections: whole rows of R locally; cut rows and left projections as partial sums.
        payload = []
        for piece in batch:
            group, plan = piece.group, piece.plan
            compute = _compute_dtype(piece.weight.dtype)
            piece.skip_state = piece.weight.numel() == 0 and piece.dtensor is None
            step = piece.state.get("step", 0)
            if not piece.skip_state:
                global_shape = plan.moment_shape if (piece.dtensor is not None and plan.side == RIGHT) else None
                step = self._init_state(piece, self._moment_shape(piece), global_shape)["step"]
            cache_key = piece.key if piece.shard_index is None else (id(piece.key), piece.shard_index)
            proj = self._projection(group, plan, cache_key, step, piece.weight.device, compute)
            if piece.layout is None:
                grad2d = piece.grad.reshape(plan.shape2d)
                if grad2d.dtype == compute:
                    piece.low_rank = project(grad2d, proj, plan.side)
                else:  # a half-precision gradient: projected from fp32 copies of row blocks, never a full one
                    piece.low_rank, _ = project_rows(self._row_blocks(grad2d, compute), proj,
                                                     ShardLayout.full(plan.shape2d), plan.side, compute)
            else:
                piece.low_rank, piece.cut_part = project_rows(self._blocks(piece, compute), proj, piece.layout,
                                                              plan.side, compute)
                if piece.shared:
                    part = piece.cut_part if plan.side == RIGHT else piece.low_rank
                    payload.append(part)
                    if part is not None:
                        self._count(piece, part.numel() * part.element_size())
        self._reduce_parts(comm, [t for t in payload if t is not None], ("project",) + key)
        # 3.-5. Moments and scaling on the local rows of R (right; cut rows now whole) or on all of R (left).
        payload = []
        for piece in batch:
            group, plan = piece.group, piece.plan
            sharded_rows = piece.layout is not None and plan.side == RIGHT and piece.shared
            if piece.skip_state:
                if sharded_rows and (group["scale_type"] == "tensor" or group["norm_growth_limit"] is not None):
                    size = 2 if group["scale_type"] == "tensor" else 1
                    payload.append(torch.zeros(size, dtype=piece.low_rank.dtype, device=piece.low_rank.device))
                    self._count(piece, size * piece.low_rank.element_size())
                piece.low_rank = piece.cut_part = None
                continue
            if piece.cut_part is not None:
                for j, row in enumerate(piece.layout.cut_rows):
                    local = row - piece.layout.first_row
                    if 0 <= local < piece.layout.num_rows:
                        piece.low_rank[local] = piece.cut_part[j]
            beta1, beta2 = group["betas"]
            state = piece.state
            exp_avg, exp_avg_sq = self._local(state["exp_avg"]), self._local(state["exp_avg_sq"])
            normalized = normalized_moments(exp_avg, exp_avg_sq, piece.low_rank, beta1, beta2, group["eps"])
            state["step"] += 1
            if group["scale_type"] == "channel":
                piece.factor = channel_scaling(normalized, piece.low_rank, plan.rank_dim)
                if sharded_rows and group["norm_growth_limit"] is not None:
                    piece.partial = (piece.factor.square() * piece.sq).sum().reshape(1)
                    payload.append(piece.partial)
                    self._count(piece, piece.partial.numel() * piece.partial.element_size())
            elif sharded_rows:
                owned = 0 if piece.layout.owns_first_row else 1  # a cut row is counted by one process
                piece.partial = torch.stack([normalized[owned:].square().sum(), piece.low_rank[owned:].square().sum()])
                payload.append(piece.partial)
                self._count(piece, piece.partial.numel() * piece.partial.element_size())
            else:
                piece.factor = tensor_scaling(normalized.square().sum(), piece.low_rank.square().sum())
            piece.low_rank = piece.cut_part = None
        # Round 2 (right projections split over processes): ||U||^2, or the squared norms of R~ and R.
        self._reduce_parts(comm, payload, ("scale",) + key)
        for piece in batch:
            if not piece.skip_state:
                self._finish(piece)

    def _moment_shape(self, piece: _Piece) -> tuple[int, int]:
        plan = piece.plan
        if piece.layout is None or plan.side == LEFT:
            return plan.moment_shape
        return (piece.layout.num_rows, plan.rank)

    def _reduce_parts(self, comm: Any, parts: list[torch.Tensor], key: Any) -> None:
        """All-reduce several tensors as one buffer (sum, in place)."""
        if not parts or comm is None:
            return
        if len(parts) == 1:
            self._all_reduce(comm, parts[0], key)
            return
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in parts) else parts[0].dtype
        buf = torch.cat([t.reshape(-1).to(dtype) for t in parts])
        self._all_reduce(comm, buf, key)
        pos = 0
        for t in parts:
            t.copy_(buf[pos:pos + t.numel()].view(t.shape))
            pos += t.numel()

    def _finish(self, piece: _Piece) -> None:
        """Steps 6-9: ||U||, the growth limiter, sqrt(scale), the update of the local rows and weight decay."""
        group, plan, state = piece.group, piece.plan, piece.state
        beta1, beta2 = group["betas"]
        gamma = group["norm_growth_limit"]
        sharded_rows = piece.layout is not None and plan.side == RIGHT and piece.shared
        if group["scale_type"] == "tensor":
            if sharded_rows:
                piece.factor = tensor_scaling(piece.partial[0], piece.partial[1])
            update_sq = piece.factor.square() * piece.sq
        elif sharded_rows:
            update_sq = piece.partial[0] if gamma is not None else None
        else:
            update_sq = (piece.factor.square() * piece.sq).sum()
        factor = piece.factor
        if gamma is not None:
            limit, state["limiter_norm"] = growth_limit_factor(update_sq.sqrt(), state.get("limiter_norm"), gamma)
            factor = factor * limit
        if group["scale"] != 1.0:
            factor = factor * math.sqrt(group["scale"])
        step_size = bias_corrected_step_size(float(group["lr"]), beta1, beta2, state["step"], group["correct_bias"])
        generator = self._rounding_generator(piece)
        if piece.layout is None:
            grad = piece.grad
            scale = _channel_view(factor, piece.weight.shape, plan.side)
            per_row = scale.ndim > 0 and scale.shape[0] > 1  # one factor per row: sliced with the rows
            self._apply(piece.weight, group, generator,
                        lambda w, rows: w.addcmul_(grad[rows], scale[rows] if per_row else scale, value=-step_size),
                        piece.label)
        else:
            flat_w, flat_g = piece.weight.reshape(-1), piece.grad.reshape(-1)
            layout = piece.layout
            for b in layout.blocks:
                w = flat_w.narrow(0, b.offset, b.numel).view(b.nrows, b.ncols)
                g = flat_g.narrow(0, b.offset, b.numel).view(b.nrows, b.ncols)
                if factor.ndim == 0:
                    f = factor
                elif plan.side == RIGHT:
                    f = factor[b.row - layout.first_row:b.row - layout.first_row + b.nrows].view(b.nrows, 1)
                else:
                    f = factor[b.col:b.col + b.ncols].view(1, b.ncols)
                per_row = f.ndim > 0 and f.shape[0] > 1
                self._apply(w, group, generator,
                            lambda w_, rows, g=g, f=f, per_row=per_row: w_.addcmul_(g[rows], f[rows] if per_row else f,
                                                                                    value=-step_size), piece.label)
        piece.sq = piece.factor = piece.partial = None

    # -- plain AdamW --------------------------------------------------------------------------------------

    def _dense_updates(self, pieces: list[_Piece]) -> None:
        """The plain-AdamW tensors: on the fast path (fp32/fp64 weights) large ones in pieces, small ones
        batched per (group, device, dtype) with foreach ops, at most a chunk's worth of elements per batch (so
        the scratch never exceeds one chunk); else one at a time. The same element-wise operations, in the same
        order, either way."""
        batches: dict[tuple, list] = {}
        for piece in pieces:
            group, weight = piece.group, piece.weight
            if self._uses_8bit(piece):
                self._adamw_update_8bit(piece)
                continue
            state = self._init_state(piece, tuple(weight.shape), tuple(piece.dtensor.shape)
                                     if piece.dtensor is not None else None)
            exp_avg, exp_avg_sq = self._local(state["exp_avg"]), self._local(state["exp_avg_sq"])
            fast = group["foreach"] is not False and weight.dtype in (torch.float32, torch.float64) and \
                int8_module_of(weight) is None
            chunk = _dense_chunk(weight.device)
            if not fast or not (weight.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
                self._adamw_update(piece)
            elif weight.numel() >= chunk or exp_avg.dtype != weight.dtype or not piece.grad.is_contiguous():
                self._adamw_update_chunked(piece)
            else:
                key_batches = batches.setdefault((id(group), weight.device, weight.dtype), [[0, []]])
                if key_batches[-1][0] + weight.numel() > chunk:
                    key_batches.append([0, []])
                key_batches[-1][0] += weight.numel()
                key_batches[-1][1].append(piece)
        for batch in (b for key_batches in batches.values() for _, b in key_batches):
            group = batch[0].group
            beta1, beta2 = group["betas"]
            params = [piece.weight for piece in batch]
            grads = [piece.grad for piece in batch]
            exp_avgs = [self._local(piece.state["exp_avg"]) for piece in batch]
            exp_avg_sqs = [self._local(piece.state["exp_avg_sq"]) for piece in batch]
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
            step_sizes = []
            for piece in batch:
                piece.state["step"] += 1
                step_sizes.append(-bias_corrected_step_size(float(group["lr"]), beta1, beta2, piece.state["step"],
                                                            group["correct_bias"]))
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denoms, group["eps"])
            torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
            decay = float(group["lr"]) * group["weight_decay"]
            if decay:
                torch._foreach_mul_(params, 1.0 - decay)

    @staticmethod
    def _uses_8bit(piece: _Piece) -> bool:
        """Whether a plain-AdamW piece keeps 8-bit moments (its group asks, and it is large enough)."""
        if piece.group.get("dense_state_bits", 32) != 8 or piece.weight.numel() < MIN_8BIT_SIZE:
            return False
        if piece.layout is not None or piece.dtensor is not None or piece.shard_index is not None:
            raise NotImplementedError(
                f"dense_state_bits=8 for {piece.label}: 8-bit states of FSDP2/ZeRO shards are not supported (their "
                "256-element blocks would cross shard boundaries); use dense_state_bits=32 when sharding")
        if int8_module_of(piece.weight) is not None:
            raise NotImplementedError(
                f"dense_state_bits=8 for the int8 weight {piece.label}: give int8 weights a low-rank group (they are "
                "Linear weights: all-linear targets them) or dense_state_bits=32")
        return True

    def _adamw_update_8bit(self, piece: _Piece) -> None:
        """Plain AdamW with the moments in 8-bit blockwise form (:mod:`lowrank_opt.quant.state8bit`): the same
        element-wise math in fp32, a piece of 2^20 elements at a time."""
        group, state = piece.group, piece.state
        if "step" not in state:
            state["step"] = 0
            state.update(init_adam_state_8bit(piece.weight))
            if piece.shard_index is None:
                self.state[piece.key] = state
        state["step"] += 1
        beta1, beta2 = group["betas"]
        # Meta tensors too (the memory estimator's dry run): its scratch, a few fp32 pieces, is part of the step.
        adamw_step_8bit_(piece.weight, piece.grad, state, lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                         eps=group["eps"], step=state["step"], weight_decay=group["weight_decay"],
                         correct_bias=group["correct_bias"], generator=self._rounding_generator(piece))

    def _adamw_update_chunked(self, piece: _Piece) -> None:
        """:meth:`_adamw_update` for an fp32/fp64 weight, a chunk of elements at a time."""
        group, state = piece.group, piece.state
        beta1, beta2 = group["betas"]
        state["step"] = step = state["step"] + 1
        step_size = bias_corrected_step_size(float(group["lr"]), beta1, beta2, step, group["correct_bias"])
        decay = float(group["lr"]) * group["weight_decay"]
        weight, grad = piece.weight.view(-1), piece.grad.reshape(-1)
        exp_avg, exp_avg_sq = self._local(state["exp_avg"]).view(-1), self._local(state["exp_avg_sq"]).view(-1)
        chunk = _dense_chunk(weight.device)
        for start in range(0, weight.numel(), chunk):
            part = slice(start, start + chunk)
            m, v = adam_moments_(exp_avg[part], exp_avg_sq[part], grad[part], beta1, beta2)
            w = weight[part]
            w.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
            if decay:
                w.mul_(1.0 - decay)

    def _adamw_update(self, piece: _Piece) -> None:
        group, state = piece.group, piece.state
        beta1, beta2 = group["betas"]
        compute = _compute_dtype(piece.weight.dtype)
        state["step"] = step = state["step"] + 1
        step_size = bias_corrected_step_size(float(group["lr"]), beta1, beta2, step, group["correct_bias"])
        exp_avg, exp_avg_sq, grad_all = self._local(state["exp_avg"]), self._local(state["exp_avg_sq"]), piece.grad

        def update(w: torch.Tensor, rows) -> None:
            grad = grad_all[rows]
            if grad.dtype != compute:
                grad = grad.to(compute)
            m, v = adam_moments_(exp_avg[rows], exp_avg_sq[rows], grad, beta1, beta2)
            w.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)

        self._apply(piece.weight, group, self._rounding_generator(piece), update, piece.label)

    def _apply(self, target: torch.Tensor, group: dict, generator: Optional[torch.Generator],
               update: Callable[[torch.Tensor, Any], Any], label: str = "a parameter") -> None:
        """Run ``update(w, rows)`` on ``target`` (a weight or a block of its rows, in the compute dtype) and
        then decoupled weight decay; ``rows`` indexes ``target``'s first dimension (``...``: all of it), for
        the update to slice the gradient, state and per-row factors alike. A bf16 weight is written back with
        stochastic rounding when ``generator`` is given, else (and for fp16) rounded to nearest.

        A half-precision weight is updated through an fp32 copy. On the fast path (``foreach`` not False) a
        contiguous one is done a block of rows at a time (at most about one dense chunk of elements), so the
        fp32 copy, the rounding bits and the update's own scratch never reach full size (for LLaMA-7B's
        embedding that is 2 GB less at the step's peak). The rounding bits are drawn block after block from
        the one generator seeded for this tensor and step: on CPU the same stream as one whole-tensor draw,
        so both paths give the same bits there."""
        decay = float(group["lr"]) * group["weight_decay"]
        module = int8_module_of(target)
        if module is not None:  # an int8 weight (Q-APOLLO): fp32 row blocks, stochastically re-quantized
            def update_and_decay(w: torch.Tensor, rows) -> None:
                update(w, rows)
                if decay:
                    w.mul_(1.0 - decay)

            apply_int8_update_(module, update_and_decay, generator=generator)
            return
        compute = _compute_dtype(target.dtype)
        if target.dtype == compute:
            update(target, ...)
            if decay:
                target.mul_(1.0 - decay)
            return
        if group["foreach"] is False or target.ndim == 0 or not target.is_contiguous():
            blocks = [...]
        else:
            row_numel = max(1, target.numel() // max(1, target.shape[0]))
            step_rows = max(1, _dense_chunk(target.device) // row_numel)
            blocks = [slice(start, start + step_rows) for start in range(0, target.shape[0], step_rows)]
        for rows in blocks:
            part = target[rows]
            weight = part.to(compute)
            update(weight, rows)
            if decay:
                weight.mul_(1.0 - decay)
            if generator is not None:
                stochastic_round_to_bf16_(weight, generator)  # now exact in bf16
            elif target.dtype == torch.float16 and weight.numel() and weight.device.type != "meta":
                largest = float(torch.linalg.vector_norm(weight, ord=math.inf))
                if not largest <= torch.finfo(torch.float16).max:
                    written = "" if rows is ... or rows.start == 0 else " (its rows before this block were written)"
                    raise RuntimeError(
                        f"Apollo.step(): the updated fp16 weight of {label} does not fit float16 (max |w| = {largest:.4g} > "
                        f"65504){written}: it was not written. Lower the learning rate, or keep fp32 master weights")
            part.copy_(weight)

    def _rounding_generator(self, piece: _Piece) -> Optional[torch.Generator]:
        """The generator of a bf16 weight's stochastic-rounding bits for this step, or None to round to nearest
        (not bf16, or the group turned rounding off)."""
        int8 = int8_module_of(piece.weight) is not None  # int8 weights are always re-quantized stochastically
        if not int8 and (piece.weight.dtype != torch.bfloat16 or not piece.group["stochastic_rounding"]):
            return None
        # Bits seeded by (seed, identity, step[, first local element]): the step count is in the state dict, so
        # resume is exact; a shard's offset gives each process its own bits.
        seed = rounding_seed(piece.group["seed"], piece.identity, piece.state["step"], piece.round_offset)
        return seeded_generator(piece.weight.device, seed)


APOLLO_MINI = dict(rank=1, scale_type="tensor", scale=128.0)  # APOLLO-Mini's settings (the registry's too)


def apollo_mini(params: Iterable[Any], lr: float = 1e-3, **kwargs: Any) -> Apollo:
    """APOLLO-Mini: rank 1, one tensor-wise scaling factor, scale 128 (alpha = sqrt(128)); any other
    :class:`Apollo` option may be given. Optimizer state is about 2 x max(m, n) numbers per matrix."""
    return Apollo(params, lr=lr, **{**APOLLO_MINI, **kwargs})
