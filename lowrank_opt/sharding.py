"""Which rows of a matrix this process holds, and with whom it must sum what crosses a shard boundary.

:class:`~lowrank_opt.Apollo` runs the same math on every layout; a layout only says which elements of each
parameter are local (:class:`ShardLayout`) and over which process group partial sums are all-reduced. This
module recognises the layouts the optimizer is handed:

* **unsharded**: the parameter itself (every row);
* **FSDP2** (``torch.distributed.fsdp.fully_shard``): a ``DTensor`` with ``Shard(0)`` on one mesh dimension (and
  ``Replicate()`` on any other): whole rows ``[offset, offset + local rows)``, uneven last shards included
  (:func:`dtensor_rows`);
* **DeepSpeed ZeRO 1/2**: one flat 1-D fp32 tensor per param group, the rank's slice
  ``[rank * L, rank * L + L)`` of the group's trainable parameters concatenated in order (padded at the end),
  so a matrix may start or end in the middle of a row, or lie on another rank entirely
  (:func:`zero_flat_pieces`); checked against DeepSpeed's own ``_hp_mapping`` where it is set;
* **DeepSpeed ZeRO 3**: one flat tensor per sub-group (``ds_id`` ``"first_last"``), the concatenation of each
  parameter's own partition ``[rank * P, rank * P + P)`` with ``P = ceil(numel / world)``.

Nothing here knows the APOLLO math; nothing here touches an optimizer's private members.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

__all__ = [
    "Block",
    "ShardLayout",
    "TorchDistComm",
    "FlatPiece",
    "dtensor_rows",
    "is_dtensor",
    "full_shape",
    "zero_flat_pieces",
]


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's real shape: its own, ``ds_shape`` when DeepSpeed's zero.Init has already partitioned it
    (``p.shape == (0,)``), and the global shape of a DTensor (which ``p.shape`` already is)."""
    ds_shape = getattr(p, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(p.shape)


# ----------------------------------------------------------------------------------------------------------
# Layout of one matrix's local elements


@dataclass(frozen=True)
class Block:
    """A rectangle of the matrix held contiguously in local storage: rows [row, row + nrows), columns
    [col, col + ncols), starting at ``offset`` in the local (flat) storage of that matrix."""

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
    """Where one process's elements of an (m x n) matrix lie: elements [start, start + valid) of the row-major
    flattening, as at most three blocks (a partial first row, whole rows, a partial last row).
    ``cut_rows``: every row of the matrix split between processes (the same list on every process)."""

    shape2d: tuple[int, int]
    start: int
    valid: int
    blocks: tuple[Block, ...]
    cut_rows: tuple[int, ...]

    @classmethod
    def of_slice(cls, shape2d: tuple[int, int], start: int, valid: int, cut_rows: Sequence[int] = ()) -> "ShardLayout":
        """Elements [start, start + valid) of the matrix, cut into row blocks."""
        m, n = shape2d
        if start < 0 or valid < 0 or start + valid > m * n:
            raise ValueError(f"elements [{start}, {start + valid}) are not inside a {m}x{n} matrix")
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
        return cls((m, n), start, valid, tuple(blocks), tuple(sorted(set(cut_rows))))

    @classmethod
    def full(cls, shape2d: tuple[int, int]) -> "ShardLayout":
        return cls.of_slice(shape2d, 0, shape2d[0] * shape2d[1])

    @classmethod
    def rows(cls, shape2d: tuple[int, int], row_start: int, nrows: int) -> "ShardLayout":
        """Whole rows [row_start, row_start + nrows) (FSDP2's ``Shard(0)``): no row is cut."""
        return cls.of_slice(shape2d, row_start * shape2d[1], nrows * shape2d[1])

    @classmethod
    def build(cls, shape2d: tuple[int, int], shard_numel: int, rank: int, world_size: int) -> "ShardLayout":
        """The matrix flattened and split into ``world_size`` pieces of ``shard_numel`` elements (the tail of the
        last one padding): this rank's piece. DeepSpeed ZeRO 1/2 with one matrix per param group, and ZeRO 3."""
        m, n = shape2d
        total = m * n
        if shard_numel * world_size < total:
            raise RuntimeError(
                f"a flat shard of {shard_numel} elements on each of {world_size} ranks cannot hold a {m}x{n} matrix: "
                "the optimizer was not handed the layout it recorded (a DeepSpeed version that partitions "
                "differently?)")
        start = min(rank * shard_numel, total)
        valid = max(0, min(shard_numel, total - start))
        cuts = [b // n for b in range(shard_numel, total, shard_numel) if b % n] if shard_numel else []
        return cls.of_slice((m, n), start, valid, cuts)

    @property
    def is_full(self) -> bool:
        return self.start == 0 and self.valid == self.shape2d[0] * self.shape2d[1]

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
        """Whether this process holds column 0 of its first row: the process that counts a cut row in sums
        over rows (every other holder of the row skips it)."""
        return self.start % self.shape2d[1] == 0


# ----------------------------------------------------------------------------------------------------------
# Communication


class TorchDistComm:
    """All-reduce (sum, in place) over a torch.distributed process group (``None``: the world). CPU tensors
    go through the accelerator when the backend cannot take them (NCCL with an optimizer offloaded to CPU)."""

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
# FSDP2: DTensor parameters


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


_MESH_COMMS: "weakref.WeakKeyDictionary[Any, TorchDistComm]" = weakref.WeakKeyDictionary()


def dtensor_rows(p: torch.Tensor, label: str = "") -> tuple[int, int, Optional[TorchDistComm]]:
    """For a DTensor sharded by rows (FSDP2): ``(first local row, local rows, comm over the sharding mesh
    dimension)``; the comm is ``None`` when that dimension has one process. Other placements (tensor
    parallelism's ``Shard(1)``, partial sums) raise: APOLLO's rows would not be whole."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    where = f" for {label}" if label else ""
    mesh = p.device_mesh
    shard_dims = []
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            shard_dims.append(mesh_dim)
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"Apollo updates a sharded matrix from whole rows; got a DTensor with placements {p.placements}{where} "
                "(only Shard(0), as FSDP2's fully_shard makes, and Replicate() are supported)")
    if len(shard_dims) > 1:
        raise NotImplementedError(f"DTensor sharded on dim 0 over several mesh dimensions ({p.placements}){where}")
    if p.ndim == 0:
        return 0, 0, None
    _, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
    local_rows = p.to_local().shape[0] if p.to_local().ndim else 0
    if not shard_dims:
        return 0, local_rows, None
    group = mesh.get_group(shard_dims[0])
    comm = _MESH_COMMS.get(group)
    if comm is None:
        comm = TorchDistComm(group)
        _MESH_COMMS[group] = comm
    return int(offset[0]), int(local_rows), (comm if comm.world_size > 1 else None)


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO: flat shards


@dataclass(frozen=True)
class FlatPiece:
    """What one rank holds of parameter ``index`` (its position in the param group) inside a flat shard:
    ``numel`` elements at ``offset`` of the flat tensor, which are elements ``[start, start + numel)`` of the
    parameter's row-major flattening. ``cuts``: element positions of the parameter at which a shard boundary
    falls (the same on every rank). ``shared``: other ranks hold elements of the parameter too."""

    index: int
    shape: tuple[int, ...]
    offset: int
    start: int
    numel: int
    cuts: tuple[int, ...]
    shared: bool


def _slice_pieces(index: int, shape: tuple[int, ...], begin: int, shard: int, rank: int,
                  flat_offset_base: int) -> FlatPiece:
    """The part of a tensor occupying [begin, begin + numel) of a space split every ``shard`` elements that
    falls into rank ``rank``'s split, placed at ``flat_offset_base`` + its position in that split."""
    numel = math.prod(shape)
    lo, hi = rank * shard, (rank + 1) * shard
    a, b = max(begin, lo), min(begin + numel, hi)
    cuts = tuple(c - begin for c in range((begin // shard + 1) * shard, begin + numel, shard)) if shard else ()
    if a >= b:
        return FlatPiece(index, shape, 0, 0, 0, cuts, bool(cuts))
    return FlatPiece(index, shape, flat_offset_base + a - lo, a - begin, b - a, cuts, bool(cuts))


def zero_flat_pieces(flat: torch.Tensor, shapes: Sequence[tuple[int, ...]], trainable: Sequence[bool],
                     originals: Sequence[Optional[torch.Tensor]], rank: int, world_size: int,
                     label: str = "") -> list[FlatPiece]:
    """The pieces of a param group's parameters inside the flat tensor DeepSpeed hands the optimizer.

    ``shapes``/``trainable``/``originals``: every parameter of the group as recorded when the optimizer was
    built (frozen ones are not in DeepSpeed's flat groups). ZeRO 3 (the flat tensor carries ``ds_id``,
    ``"<first ds_id>_<last ds_id>"`` of its sub-group): each parameter is split on its own into
    ``ceil(numel / world)`` elements per rank and the flat tensor is this rank's partitions one after the
    other. ZeRO 1/2: the trainable parameters are concatenated and the concatenation split into
    ``flat.numel()`` elements per rank; where DeepSpeed's ``_hp_mapping`` is set on the original parameters,
    it must agree (a DeepSpeed version that lays groups out otherwise raises here).
    """
    live = [k for k in range(len(shapes)) if trainable[k]]
    ds_id = getattr(flat, "ds_id", None)
    where = f" ({label})" if label else ""
    pieces: list[FlatPiece] = []
    if isinstance(ds_id, str) and "_" in ds_id:  # ZeRO 3 sub-group
        first, last = ds_id.split("_", 1)
        ids = [str(getattr(originals[k], "ds_id", "")) if originals[k] is not None else "" for k in live]
        if first not in ids or last not in ids:
            raise RuntimeError(f"a ZeRO-3 flat partition ({ds_id!r}) does not belong to this param group{where}: "
                               "the optimizer's param groups changed after it was built")
        run = live[ids.index(first):ids.index(last) + 1]
        offset = 0
        for k in run:
            numel = math.prod(shapes[k])
            part = -(-numel // world_size)
            original = originals[k]
            if original is not None and hasattr(original, "partition_numel"):
                if int(original.partition_numel()) != part:
                    raise RuntimeError(f"DeepSpeed gave parameter {k} of shape {shapes[k]} a partition of "
                                       f"{original.partition_numel()} elements; expected {part}{where}")
            pieces.append(_slice_pieces(k, shapes[k], 0, part, rank, offset))
            offset += part
        if offset != flat.numel():
            raise RuntimeError(f"a ZeRO-3 flat partition of {flat.numel()} elements does not match its "
                               f"{len(run)} parameters ({offset} elements expected){where}")
        return pieces
    total = sum(math.prod(shapes[k]) for k in live)
    shard = flat.numel()
    if shard * world_size < total:
        raise RuntimeError(
            f"a flat shard of {shard} elements on each of {world_size} ranks cannot hold this param group's "
            f"{total} elements{where}: DeepSpeed partitions in a way this version of lowrank-opt does not know")
    begin = 0
    for k in live:
        piece = _slice_pieces(k, shapes[k], begin, shard, rank, 0)
        original = originals[k]
        mapping = getattr(original, "_hp_mapping", None) if original is not None else None
        if mapping is None and piece.numel and original is not None and hasattr(original, "_hp_mapping"):
            raise RuntimeError(f"DeepSpeed placed no element of parameter {k} on rank {rank}; lowrank-opt computed "
                               f"elements [{piece.start}, {piece.start + piece.numel}) there{where}")
        if mapping is not None:
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            if (lp.start, lp.numel, hp.start) != (piece.start, piece.numel, piece.offset):
                raise RuntimeError(
                    f"DeepSpeed placed elements [{lp.start}, {lp.start + lp.numel}) of parameter {k} at offset "
                    f"{hp.start} of rank {rank}'s shard; lowrank-opt computed [{piece.start}, "
                    f"{piece.start + piece.numel}) at {piece.offset}{where}")
        pieces.append(piece)
        begin += math.prod(shapes[k])
    return pieces
