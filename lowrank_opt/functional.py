r"""APOLLO and AdamW as pure functions on the tensors a process holds.

A low-rank parameter is a stack of E >= 1 matrices of m x n in storage orientation (E = 1 for an ordinary
matrix; E for MoE experts stored as one (E, m, n) tensor). Its *side* says how it is projected: ``RIGHT``
(tall or square: R = G P^T, r numbers per row) or ``LEFT`` (wide: R = P G, r x n). The elements a process holds
are a :class:`~lowrank_opt.sharding.ShardLayout` of the stack's row space ((E*m) x n); sums that cross
processes go through ``reduce(tensors)``, which sums a list of tensors in place over the processes sharing them
(nothing to do when a process holds whole matrices). The steps, numbered as in docs/apollo.md, for each matrix:

1. R = G P^T (right) or R = P G (left), P the matrix's (r x compressed dim) projection;
3. moments m = b1 m + (1-b1) R, v = b2 v + (1-b2) R^2;
4. R~ = m / (sqrt(v) + eps);
5. channel scaling s = ||R~|| / (||R|| + 1e-8) over the rank dimension (one factor per row for a right
   projection, per column for a left one), or one tensor-wise factor from the Frobenius norms;
6. U = G * s, whose norm comes from the squared gradient norms per channel (no U is built);
7. the norm-growth limiter: ||U|| <= gamma * previous ||U|| (no limit without a positive previous norm);
8. times sqrt(scale);
9. W <- W - step_size * U, then decoupled weight decay W <- W (1 - lr wd).

Plain tensors get AdamW (:func:`adamw_`): the same moments, W <- W - step_size * m / (sqrt(v) + eps), decay.
Weights narrower than the math (bf16/fp16) are updated through fp32 copies of pieces and written back by
:func:`write_back_` (stochastic rounding into bf16 when a generator is given).
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from ._common import compute_dtype, vector_norm_wide, write_back_
from .projection import LEFT, RIGHT, seeded_generator
from .sharding import ShardLayout, Tile

SCALING_EPS = 1e-8  # s = ||R~|| / (||R|| + 1e-8)
LIMITER_EPS = 1e-8  # the limiter divides by (prev + 1e-8)
# Big tensors are updated in pieces of this many elements (a multiple of every vector width and of 8-bit
# states' 256-element blocks, so results equal one whole-tensor op and no full-size temporary is made): 4 MiB
# of fp32 on CPU; 2^22 on accelerators, where a piece still streams longer than its kernels take to launch
# and the update's scratch stays at 32 MiB (docs/memory.md's 16 GB setting needs that).
CHUNK_CPU = 1 << 20
CHUNK_ACCELERATOR = 1 << 22
_NORM_BLOCK = 1 << 18  # elements squared at a time by the CPU column-norm loop (a 1 MiB fp32 block)


# The device type meta tensors stand for: the memory estimator's dry run of a step on meta tensors sets it to
# the device it estimates for, so the dry run takes that device's piece size.
META_STANDS_FOR: contextvars.ContextVar[str] = contextvars.ContextVar("lowrank_opt_meta_stands_for", default="cuda")


def chunk_elements(device: Union[str, torch.device]) -> int:
    """Elements per piece on ``device`` (2^20 on CPU, 2^22 on accelerators)."""
    device = torch.device(device)
    kind = META_STANDS_FOR.get() if device.type == "meta" else device.type
    return CHUNK_CPU if kind == "cpu" else CHUNK_ACCELERATOR


# ----------------------------------------------------------------------------------------------------------
# Norms


def channel_norms(x: torch.Tensor, dim: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Norms of a matrix (a, b) or a stack of them (k, a, b) along ``dim`` (rows: one per column; columns: one
    per row), in ``dtype`` (default ``x``'s). Column norms on CPU are summed from blocks of rows: torch's CPU norm
    over a leading dimension is 4-20x slower, and squaring all of ``x`` would need a full-size temporary."""
    if x.ndim == 2:
        return channel_norms(x.unsqueeze(0), dim + 1, dtype)[0]
    k, a, b = x.shape
    if dim == 2:
        if x.is_contiguous():
            return vector_norm_wide(x.view(k * a, b), dtype, dim=1).view(k, a)
        return torch.linalg.vector_norm(x, dim=2, dtype=dtype)
    if x.device.type != "cpu":
        return torch.linalg.vector_norm(x, dim=1, dtype=dtype)
    dtype = dtype or x.dtype
    rows = max(1, _NORM_BLOCK // max(1, b * k))
    total = torch.zeros((k, b), dtype=dtype)
    for start in range(0, a, rows):
        total.add_(x[:, start:start + rows].to(dtype).square().sum(dim=1))
    return total.sqrt_()


# ----------------------------------------------------------------------------------------------------------
# Adam's moments and AdamW (one body; a list of one tensor is the single-tensor path)


def adam_moment_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2, in the gradient's dtype; moments kept in another dtype (bf16
    state, fp32 math) are stored back. Returns (m, v) in the gradient's dtype."""
    if exp_avg.dtype == grad.dtype:
        m, v = exp_avg, exp_avg_sq
    else:
        m, v = exp_avg.to(grad.dtype), exp_avg_sq.to(grad.dtype)
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    if m is not exp_avg:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    return m, v


def adam_moments_(exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], grads: list[torch.Tensor],
                  beta1: float, beta2: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """:func:`adam_moment_` over lists, with torch's foreach ops: the same element-wise
    operations in the same order (as torch's ``_single_tensor_adam`` and ``_multi_tensor_adam``)."""
    wide = [(m.to(g.dtype), v.to(g.dtype)) if m.dtype != g.dtype else (m, v)
            for m, v, g in zip(exp_avgs, exp_avg_sqs, grads)]
    ms, vs = [w[0] for w in wide], [w[1] for w in wide]
    torch._foreach_mul_(ms, beta1)
    torch._foreach_add_(ms, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)
    for (m, v), exp_avg, exp_avg_sq in zip(wide, exp_avgs, exp_avg_sqs):
        if m is not exp_avg:
            exp_avg.copy_(m)
            exp_avg_sq.copy_(v)
    return ms, vs


def adamw_(weights: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
           exp_avg_sqs: list[torch.Tensor], *, beta1: float, beta2: float, eps: float,
           step_sizes: Sequence[float]) -> None:
    """AdamW without the decay (see :func:`update_pieces_`): moments, then w <- w - step_size m/(sqrt(v)+eps)."""
    if len(weights) == 1:
        m, v = adam_moment_(exp_avgs[0], exp_avg_sqs[0], grads[0], beta1, beta2)
        weights[0].addcdiv_(m, v.sqrt().add_(eps), value=-step_sizes[0])
        return
    ms, vs = adam_moments_(exp_avgs, exp_avg_sqs, grads, beta1, beta2)
    denoms = torch._foreach_sqrt(vs)
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(weights, ms, denoms, [-s for s in step_sizes])


def bias_corrected_step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool) -> float:
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


# ----------------------------------------------------------------------------------------------------------
# Writing an update into a weight


def update_pieces_(pieces: Iterable[tuple[torch.Tensor, Any]], update: Callable[[torch.Tensor, Any], None], *,
                   decay: float, generator: Optional[torch.Generator], label: str) -> None:
    """For each ``(target, where)``: ``update(w, where)`` on ``w``, the target in the compute dtype (an fp32 copy
    of a 16-bit one), then decoupled weight decay, then the write-back. Pieces are visited in storage order,
    so stochastic-rounding bits come from one stream whatever the piece size (on CPU)."""
    for target, where in pieces:
        compute = compute_dtype(target.dtype)
        work = target if target.dtype == compute else target.to(compute)
        update(work, where)
        if decay:
            work.mul_(1.0 - decay)
        if work is not target:
            write_back_(target, work, generator, label)


def flat_pieces(weight: torch.Tensor, chunk: int) -> list[tuple[torch.Tensor, slice]]:
    """``(weight.view(-1)[s], s)`` for consecutive slices of ``chunk`` elements (the whole tensor when it is not
    contiguous)."""
    if not weight.is_contiguous():
        return [(weight, ...)]
    flat = weight.view(-1)
    return [(flat[s:s + chunk], slice(s, s + chunk)) for s in range(0, flat.numel(), chunk)]


# ----------------------------------------------------------------------------------------------------------
# APOLLO on the local elements of a stack of matrices


@dataclass(eq=False, slots=True)
class LowRankStep:
    """One low-rank parameter's update in this step, as this process holds it.

    ``weight``/``grad``: local storage (elements of ``layout``'s row space, row-major); ``proj``: P of the
    held matrices, (k, r, d), fp32 (or fp64); ``exp_avg``/``exp_avg_sq``: local moments in R's layout
    (right: one row of r per local row; left: (k, r, n)); ``limiter``: previous ||U|| per held matrix, (k,),
    None before the first update; ``sq``: squared gradient norms from :func:`grad_sq` (reduced where shared).
    """

    weight: torch.Tensor
    grad: torch.Tensor
    layout: ShardLayout
    side: str
    proj: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    limiter: Optional[torch.Tensor]
    sq: torch.Tensor
    beta1: float
    beta2: float
    eps: float
    tensor_wise: bool
    scale: float
    gamma: Optional[float]
    step_size: float
    decay: float
    shared: bool
    chunk: int  # a narrower gradient is upcast (and, with ``fast``, a narrower weight updated) in pieces of this size
    fast: bool
    rounding_seed: Optional[int] = None  # seeds the stochastic rounding of a bf16 weight (int8: re-quantization)
    int8: Any = None  # the Int8Linear whose gradient carrier the weight is
    label: str = ""


def _grad_tiles(grad: torch.Tensor, layout: ShardLayout, compute: torch.dtype, chunk: Optional[int]):
    """(tile, the gradient of the tile as (count, nrows, ncols) in ``compute``); a narrower gradient is upcast
    in sub-tiles of about ``chunk`` elements, never whole."""
    flat = grad.reshape(-1)
    for tile in layout.tiles:
        for sub in _subtiles(tile, chunk if grad.dtype != compute else None, layout.matrix_rows):
            g = flat.narrow(0, sub.offset, sub.numel).view(sub.count, sub.nrows, sub.ncols)
            yield sub, (g if g.dtype == compute else g.to(compute))


def _subtiles(tile: Tile, chunk: Optional[int], m: int) -> list[Tile]:
    """``tile`` cut into tiles of at most about ``chunk`` elements (None: not cut), in storage order."""
    if chunk is None or tile.numel <= chunk:
        return [tile]
    per_matrix = tile.nrows * tile.ncols
    if per_matrix <= chunk:  # groups of whole matrices
        step = chunk // per_matrix
        return [Tile(tile.matrix + i, min(step, tile.count - i), 0, tile.nrows, 0, tile.ncols, tile.offset + i * per_matrix)
                for i in range(0, tile.count, step)]
    rows = max(1, chunk // tile.ncols)
    out = []
    for i in range(tile.count):
        for r in range(0, tile.nrows, rows):
            n = min(rows, tile.nrows - r)
            out.append(Tile(tile.matrix + i, 1, tile.row + r, n, tile.col, tile.ncols,
                            tile.offset + i * per_matrix + r * tile.ncols))
    return out


def grad_sq(grad: torch.Tensor, layout: ShardLayout, side: str, tensor_wise: bool, compute: torch.dtype,
            chunk: int) -> torch.Tensor:
    """Squared norms of the local gradient, as step 6 needs them: per local row (right, channel), per held
    matrix and column (left, channel: (k, n)), or per held matrix (tensor-wise: (k,)). Partial where a row or
    matrix is split between processes (the caller reduces what must be)."""
    m, n = layout.matrix_rows, layout.shape2d[1]
    k, first = layout.num_matrices, layout.first_matrix
    if layout.whole:
        g = grad.reshape(k, m, n)
        if tensor_wise:
            if k == 1:
                return vector_norm_wide(g[0], compute).square().reshape(1)
            return channel_norms(g, 2, compute).square_().sum(1)
        if side == RIGHT:
            return channel_norms(g, 2, compute).square_().reshape(-1)
        return channel_norms(g, 1, compute).square_()
    device = grad.device
    if tensor_wise:
        sq = torch.zeros(k, dtype=compute, device=device)
    elif side == RIGHT:
        sq = torch.zeros(layout.num_rows, dtype=compute, device=device)
    else:
        sq = torch.zeros((k, n), dtype=compute, device=device)
    for t, g in _grad_tiles(grad, layout, compute, None):
        if tensor_wise:
            sq[t.matrix - first:t.matrix - first + t.count] += torch.linalg.vector_norm(g, dim=(1, 2), dtype=compute).square()
        elif side == RIGHT:
            r0 = t.matrix * m + t.row - layout.first_row
            sq[r0:r0 + t.count * t.nrows] += torch.linalg.vector_norm(g, dim=2, dtype=compute).square().reshape(-1)
        else:
            sq[t.matrix - first:t.matrix - first + t.count, t.col:t.col + t.ncols] += channel_norms(g, 1, compute).square_()
    return sq


def reduced_sq_parts(sq: torch.Tensor, layout: ShardLayout, side: str, tensor_wise: bool) -> list[torch.Tensor]:
    """What of :func:`grad_sq`'s result other processes add to: the values of the matrices split between
    processes (left projections and tensor-wise; a right projection's row norms stay local)."""
    if side == RIGHT and not tensor_wise:
        return []
    return [_gather_cut(sq, layout)]


def scatter_reduced_sq(sq: torch.Tensor, reduced: list[torch.Tensor], layout: ShardLayout) -> None:
    for part in reduced:
        _scatter_cut(sq, part, layout)


def _gather_cut(values: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """The rows of ``values`` (one per held matrix) for the matrices split between processes, zeros for those
    not held: a buffer of the same shape on every process."""
    out = values.new_zeros((len(layout.cut_matrices),) + tuple(values.shape[1:]))
    first, k = layout.first_matrix, layout.num_matrices
    for j, matrix in enumerate(layout.cut_matrices):
        if first <= matrix < first + k:
            out[j] = values[matrix - first]
    return out


def _scatter_cut(values: torch.Tensor, reduced: torch.Tensor, layout: ShardLayout) -> None:
    first, k = layout.first_matrix, layout.num_matrices
    for j, matrix in enumerate(layout.cut_matrices):
        if first <= matrix < first + k:
            values[matrix - first] = reduced[j]


def project(step: LowRankStep, compute: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Step 1 on the local elements. Right: (R for the local rows (rows, r), the partial R rows of the rows
    split between processes (len(cut_rows), r), or None). Left: (this process's partial sums of R, (k, r, n);
    None)."""
    layout, proj, side = step.layout, step.proj, step.side
    m, n = layout.matrix_rows, layout.shape2d[1]
    k, first, r = layout.num_matrices, layout.first_matrix, proj.shape[1]
    chunk = step.chunk if step.grad.dtype != compute else None
    if layout.whole and chunk is None:
        g = step.grad.reshape(k, m, n)
        if k == 1:
            low = g[0] @ proj[0].T if side == RIGHT else proj[0] @ g[0]
            return (low if side == RIGHT else low.unsqueeze(0)), None
        return ((g @ proj.transpose(1, 2)).reshape(k * m, r) if side == RIGHT else proj @ g), None
    device = proj.device
    if side == LEFT:
        low = torch.zeros((k, r, n), dtype=compute, device=device)
        for t, g in _grad_tiles(step.grad, layout, compute, step.chunk):
            held = slice(t.matrix - first, t.matrix - first + t.count)
            low[held, :, t.col:t.col + t.ncols].baddbmm_(proj[held, :, t.row:t.row + t.nrows], g)
        return low, None
    low = torch.zeros((layout.num_rows, r), dtype=compute, device=device)
    cut_index = {row: j for j, row in enumerate(layout.cut_rows)}
    cut = torch.zeros((len(layout.cut_rows), r), dtype=compute, device=device) if layout.cut_rows else None
    for t, g in _grad_tiles(step.grad, layout, compute, step.chunk):
        p = proj[t.matrix - first:t.matrix - first + t.count, :, t.col:t.col + t.ncols]
        part = (g @ p.transpose(1, 2)).reshape(-1, r)
        row = t.matrix * m + t.row
        if t.ncols < n and row in cut_index:
            cut[cut_index[row]] = part[0]
        else:
            low[row - layout.first_row:row - layout.first_row + part.shape[0]] = part
    return low, cut


def reduced_projection_parts(low: torch.Tensor, cut: Optional[torch.Tensor], step: LowRankStep) -> list[torch.Tensor]:
    """What other processes add to: the cut rows' partial products (right), the partial R of the matrices split
    between processes (left)."""
    if step.side == RIGHT:
        return [cut] if cut is not None else []
    return [_gather_cut(low, step.layout)] if step.layout.cut_matrices else []


def merge_reduced_projection(low: torch.Tensor, cut: Optional[torch.Tensor], reduced: list[torch.Tensor],
                             step: LowRankStep) -> None:
    layout = step.layout
    if step.side == RIGHT:
        for j, row in enumerate(layout.cut_rows):
            local = row - layout.first_row
            if 0 <= local < layout.num_rows:
                low[local] = cut[j]
    elif reduced:
        _scatter_cut(low, reduced[0], layout)


def _per_matrix_sum(values: torch.Tensor, layout: ShardLayout, skip_first: bool = False) -> torch.Tensor:
    """Sums of per-local-row ``values`` by held matrix, (k,). ``skip_first``: leave out the first local row
    (a cut row another process counts)."""
    k, m = layout.num_matrices, layout.matrix_rows
    if layout.whole:
        return values.view(k, m).sum(1)
    ids = (torch.arange(layout.first_row, layout.first_row + layout.num_rows, device=values.device) // m
           - layout.first_matrix)
    if skip_first:
        values, ids = values[1:], ids[1:]
    return torch.zeros(k, dtype=values.dtype, device=values.device).index_add_(0, ids, values)


def scaling(step: LowRankStep, low: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Steps 3-5: moments on R (in place), R~, and the scaling factor: per local row (right, channel), (k, n)
    (left, channel) or (k,) (tensor-wise). Returns (factor, partial sums other processes add to, or None):
    right projections split between processes need ||U||^2 per matrix (channel, with the limiter on) or
    ||R~||^2 and ||R||^2 per matrix (tensor-wise), which are then finished by :func:`finish_scaling`."""
    layout = step.layout
    exp_avg, exp_avg_sq = step.exp_avg, step.exp_avg_sq
    if exp_avg.shape != low.shape:
        exp_avg, exp_avg_sq = exp_avg.view(low.shape), exp_avg_sq.view(low.shape)
    m, v = adam_moment_(exp_avg, exp_avg_sq, low, step.beta1, step.beta2)
    normalized = m / v.sqrt().add_(step.eps)  # R~ (step 4)
    sharded_rows = step.shared and step.side == RIGHT and bool(layout.cut_matrices)
    if step.side == RIGHT:
        if not step.tensor_wise:
            factor = vector_norm_wide(normalized, None, dim=1) / (vector_norm_wide(low, None, dim=1) + SCALING_EPS)
            partial = None
            if sharded_rows and step.gamma is not None:
                partial = _gather_cut(_per_matrix_sum(factor.square() * step.sq, layout), layout)
            return factor, partial
        if not sharded_rows and layout.whole:
            k = layout.num_matrices
            if k == 1:
                return _tensor_factor(normalized.square().sum(), low.square().sum()).view(1), None
            return _tensor_factor(normalized.view(k, -1).square().sum(1), low.view(k, -1).square().sum(1)), None
        skip = not layout.owns_first_row  # a cut first row is counted by the process holding its column 0
        nsq = _per_matrix_sum(normalized.square().sum(1), layout, skip)
        rsq = _per_matrix_sum(low.square().sum(1), layout, skip)
        if sharded_rows:
            return torch.stack([nsq, rsq]), _gather_cut(torch.stack([nsq, rsq], 1), layout)
        return _tensor_factor(nsq, rsq), None
    if not step.tensor_wise:
        return channel_norms(normalized, 1) / (channel_norms(low, 1) + SCALING_EPS), None
    k = low.shape[0]
    if k == 1:
        return _tensor_factor(normalized.square().sum(), low.square().sum()).view(1), None
    return _tensor_factor(normalized.square().sum((1, 2)), low.square().sum((1, 2))), None


def _tensor_factor(nsq: torch.Tensor, rsq: torch.Tensor) -> torch.Tensor:
    """Step 5, tensor-wise: ||R~||_F / (||R||_F + 1e-8) from the squared norms."""
    return nsq.sqrt() / (rsq.sqrt() + SCALING_EPS)


def finish_scaling(step: LowRankStep, factor: torch.Tensor, partial: Optional[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the factor, ||U||^2 per held matrix), with what other processes added to ``partial``."""
    layout = step.layout
    if step.side == RIGHT and step.tensor_wise and partial is not None:
        sums = factor.clone()  # (2, k): this process's ||R~||^2 and ||R||^2 per matrix
        _scatter_cut(sums.T, partial, layout)
        factor = _tensor_factor(sums[0], sums[1])
        return factor, factor.square() * step.sq
    if step.tensor_wise:
        return factor, factor.square() * step.sq
    if step.side == LEFT:
        return factor, (factor.square() * step.sq).sum(1)
    update_sq = _per_matrix_sum(factor.square() * step.sq, layout) if step.gamma is not None else None
    if partial is not None and update_sq is not None:
        _scatter_cut(update_sq, partial, layout)
    return factor, update_sq


def growth_limit_factor(update_norm: torch.Tensor, prev_norm: Optional[torch.Tensor], gamma: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 7 (Fira's limiter): the factor that keeps ||U|| <= gamma * previous ||U||, and the norm to remember.
    Decreases are never limited; without a previous norm (first step), or with a previous norm of 0 (an
    all-zero gradient: no history to grow from), nothing is limited."""
    if prev_norm is None:
        return torch.ones_like(update_norm), update_norm.clone()
    ratio = update_norm / (prev_norm + LIMITER_EPS)
    factor = torch.where((ratio > gamma) & (prev_norm > 0), gamma / ratio, torch.ones_like(ratio))
    return factor, update_norm * factor


def apply_update(step: LowRankStep, factor: torch.Tensor, update_sq: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Steps 7-9: the limiter (per matrix), sqrt(scale), then W <- W - step_size * G * s on every local tile,
    weight decay and the write-back (:func:`write_tiles_`). Returns the new limiter norms (None when off)."""
    layout = step.layout
    limit = new_limiter = None
    if step.gamma is not None:
        limit, new_limiter = growth_limit_factor(update_sq.sqrt(), step.limiter, step.gamma)
    alpha = math.sqrt(step.scale) if step.scale != 1.0 else None
    if step.tensor_wise:  # one factor per matrix: combined once
        factor = factor if limit is None else factor * limit
        factor = factor if alpha is None else factor * alpha
        limit = alpha = None
    m, first = layout.matrix_rows, layout.first_matrix
    grad = step.grad.reshape(-1)

    def update(w: torch.Tensor, t: Tile) -> None:
        g = grad.narrow(0, t.offset, t.numel).view(t.count, t.nrows, t.ncols)
        held = slice(t.matrix - first, t.matrix - first + t.count)
        if step.tensor_wise:
            s = factor[held].view(t.count, 1, 1)
        elif step.side == RIGHT:
            r0 = t.matrix * m + t.row - layout.first_row
            s = factor[r0:r0 + t.count * t.nrows].view(t.count, t.nrows, 1)
        else:
            s = factor[held, t.col:t.col + t.ncols].unsqueeze(1)
        if limit is not None:
            s = s * limit[held].view(t.count, 1, 1)
        if alpha is not None:
            s = s * alpha
        w.view(t.count, t.nrows, t.ncols).addcmul_(g, s, value=-step.step_size)

    write_tiles_(step, update)
    return new_limiter


def write_tiles_(step: LowRankStep, update: Callable[[torch.Tensor, Tile], None]) -> None:
    """Run ``update(w, tile)`` on every local tile of ``step.weight``, then weight decay and the write-back: an
    int8 weight a block of rows at a time (re-quantized), a narrower weight in fp32 sub-tiles of about one
    chunk (its fp32 copy never reaches full size), a full-precision one in place, tile by tile."""
    if step.int8 is not None:  # a whole 2-D weight
        from .quant.int8 import apply_int8_update_

        n = step.layout.shape2d[1]

        def rows_update(w: torch.Tensor, rows: slice) -> None:
            update(w, Tile(0, 1, rows.start, w.shape[0], 0, n, rows.start * n))
            if step.decay:
                w.mul_(1.0 - step.decay)

        apply_int8_update_(step.int8, rows_update, generator=_generator(step.weight, step.rounding_seed))
        return
    weight = step.weight if step.weight.is_contiguous() else step.weight.contiguous()
    flat = weight.view(-1)
    chunk = step.chunk if step.fast and weight.dtype != compute_dtype(weight.dtype) else None
    tiles = step.layout.tiles
    if chunk is None and len(tiles) == 1 and tiles[0].numel == flat.numel():  # one whole tile
        pieces = ((flat, tiles[0]),)
    else:
        pieces = ((flat.narrow(0, sub.offset, sub.numel), sub)
                  for tile in tiles for sub in _subtiles(tile, chunk, step.layout.matrix_rows))
    update_pieces_(pieces, update, decay=step.decay, generator=_generator(weight, step.rounding_seed), label=step.label)
    if weight is not step.weight:
        step.weight.copy_(weight)


def apollo_update_(steps: list[LowRankStep], reduce: Callable[[list[list[torch.Tensor]]], None]
                   ) -> list[Optional[torch.Tensor]]:
    """Steps 1-9 for several low-rank parameters sharing one ``reduce``, called twice with each parameter's list of
    tensors to sum over processes (empty where nothing is split). Returns each parameter's new limiter norms."""
    compute = [compute_dtype(s.weight.dtype) for s in steps]
    lows = [project(s, c) for s, c in zip(steps, compute)]
    parts = [reduced_projection_parts(low, cut, s) for (low, cut), s in zip(lows, steps)]
    reduce(parts)
    for (low, cut), ps, s in zip(lows, parts, steps):
        merge_reduced_projection(low, cut, ps, s)
    scaled = [scaling(s, low) for (low, _), s in zip(lows, steps)]
    del lows
    reduce([[partial] if partial is not None else [] for _, partial in scaled])
    out = []
    for s, (factor, partial) in zip(steps, scaled):
        factor, update_sq = finish_scaling(s, factor, partial)
        out.append(apply_update(s, factor, update_sq))
    return out


# ----------------------------------------------------------------------------------------------------------
# AdamW on plain tensors


@dataclass(eq=False, slots=True)
class DenseStep:
    """One plain tensor's AdamW update: local ``weight``/``grad``/moments, the step's ``step_size`` (bias
    correction folded in) and ``decay`` (lr * weight_decay). ``fast``: big tensors in pieces of ``chunk``
    elements and small fp32/fp64 ones batched with foreach ops (else one whole tensor at a time: the same
    numbers). ``int8``: the Int8Linear whose gradient carrier ``weight`` is."""

    weight: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    beta1: float
    beta2: float
    eps: float
    step_size: float
    decay: float
    fast: bool
    chunk: int
    rounding_seed: Optional[int] = None
    int8: Any = None
    label: str = ""


def _generator(weight: torch.Tensor, seed: Optional[int]) -> Optional[torch.Generator]:
    """The generator of the rounding bits, seeded just before use (generators are shared per device)."""
    return None if seed is None else seeded_generator(weight.device, seed)


def _batchable(s: DenseStep) -> bool:
    return (s.fast and s.int8 is None and s.weight.dtype in (torch.float32, torch.float64)
            and s.exp_avg.dtype == s.weight.dtype and s.weight.numel() < s.chunk
            and all(t.is_contiguous() for t in (s.weight, s.grad, s.exp_avg, s.exp_avg_sq)))


def dense_update_(steps: Sequence[DenseStep]) -> None:
    """AdamW on plain tensors: small full-precision ones batched (at most a chunk of elements per batch, so the
    scratch never exceeds one chunk) through torch's foreach ops, the others one at a time in pieces."""
    batches: dict[tuple, list[list]] = {}
    for s in steps:
        if not _batchable(s):
            _dense_one_(s)
            continue
        runs = batches.setdefault((s.weight.device, s.weight.dtype, s.beta1, s.beta2, s.eps, s.decay), [[0, []]])
        if runs[-1][0] + s.weight.numel() > s.chunk:
            runs.append([0, []])
        runs[-1][0] += s.weight.numel()
        runs[-1][1].append(s)
    for runs in batches.values():
        for _, batch in runs:
            head = batch[0]
            weights = [s.weight for s in batch]
            adamw_(weights, [s.grad for s in batch], [s.exp_avg for s in batch], [s.exp_avg_sq for s in batch],
                   beta1=head.beta1, beta2=head.beta2, eps=head.eps, step_sizes=[s.step_size for s in batch])
            if head.decay:
                torch._foreach_mul_(weights, 1.0 - head.decay)


def _dense_one_(s: DenseStep) -> None:
    compute = compute_dtype(s.weight.dtype)
    if s.int8 is not None:
        from .quant.int8 import apply_int8_update_

        def rows_update(w: torch.Tensor, rows: slice) -> None:
            adamw_([w], [s.grad[rows].to(compute)], [s.exp_avg[rows]], [s.exp_avg_sq[rows]], beta1=s.beta1,
                   beta2=s.beta2, eps=s.eps, step_sizes=[s.step_size])
            if s.decay:
                w.mul_(1.0 - s.decay)

        apply_int8_update_(s.int8, rows_update, generator=_generator(s.weight, s.rounding_seed))
        return
    pieced = s.fast and all(t.is_contiguous() for t in (s.weight, s.exp_avg, s.exp_avg_sq))
    grad = s.grad.reshape(-1) if pieced else s.grad
    exp_avg = s.exp_avg.view(-1) if pieced else s.exp_avg
    exp_avg_sq = s.exp_avg_sq.view(-1) if pieced else s.exp_avg_sq

    def update(w: torch.Tensor, where: Any) -> None:
        g = grad[where]
        adamw_([w], [g if g.dtype == compute else g.to(compute)], [exp_avg[where]], [exp_avg_sq[where]],
               beta1=s.beta1, beta2=s.beta2, eps=s.eps, step_sizes=[s.step_size])

    pieces = flat_pieces(s.weight, s.chunk) if pieced else [(s.weight, ...)]
    update_pieces_(pieces, update, decay=s.decay, generator=_generator(s.weight, s.rounding_seed), label=s.label)
