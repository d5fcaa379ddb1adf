"""Which elements of each parameter a process holds, and with whom it sums what crosses a shard boundary.

:class:`~lowrank_opt.Apollo` runs one math (:mod:`lowrank_opt.functional`) on every layout; a layout only says
which elements of a parameter are local. A low-rank parameter is a stack of E >= 1 matrices of m x n (E = 1
for an ordinary matrix; MoE experts stored as one (E, m, n) tensor); its elements are addressed in the *row
space*, the (E*m) x n matrix of the stack's rows, flattened row-major. :class:`ShardLayout` describes the local
elements of that space; its :attr:`~ShardLayout.tiles` cut them into rectangles of one matrix, or runs of whole
matrices, for the batched math. The layouts recognised (:func:`recognise`):

* **unsharded**: the parameter itself (every element);
* **FSDP2** (``fully_shard``): a ``DTensor`` with ``Shard(0)`` on one mesh dimension (and ``Replicate()`` on
  any other): whole rows of a matrix, or whole matrices of a stack (:func:`dtensor_rows`);
* **DeepSpeed ZeRO 1/2**: one flat 1-D fp32 tensor per param group, the rank's slice of the group's trainable
  parameters concatenated in order (padded at the end), so a matrix may start or end mid-row or lie on
  another rank entirely (:func:`zero_flat_pieces`), checked against DeepSpeed's ``_hp_mapping`` where set;
* **DeepSpeed ZeRO 3**: one flat tensor per sub-group (``ds_id`` ``"first_last"``), each parameter's own
  partition ``[rank * P, rank * P + P)`` with ``P = ceil(numel / world)``, concatenated;
* **DeepSpeed's bf16/fp16 stage-0 wrapper**: fp32 copies of the trainable parameters.

Nothing here knows the APOLLO math.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = [
    "Block", "CountingComm", "FlatPiece", "Part", "Record", "ShardLayout", "Tile", "TorchDistComm",
    "dtensor_rows", "full_shape", "is_dtensor", "recognise", "zero_flat_pieces",
]


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's real shape: ``ds_shape`` when DeepSpeed's zero.Init has partitioned it (``p.shape`` is
    then ``(0,)``), else its own (a DTensor's global shape)."""
    ds_shape = getattr(p, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(p.shape)


# ----------------------------------------------------------------------------------------------------------
# Layout of the local elements of one parameter's row space


@dataclass(frozen=True)
class Block:
    """A rectangle of the row space held contiguously: rows [row, row + nrows), columns [col, col + ncols),
    at ``offset`` of the local flat storage."""

    row: int
    nrows: int
    col: int
    ncols: int
    offset: int

    @property
    def numel(self) -> int:
        return self.nrows * self.ncols


@dataclass(frozen=True)
class Tile:
    """Local elements of ``count`` consecutive matrices of a stack, from ``matrix`` on: rows [row, row + nrows)
    and columns [col, col + ncols) of each, at ``offset`` of the local flat storage. ``count > 1`` only for
    whole matrices."""

    matrix: int
    count: int
    row: int
    nrows: int
    col: int
    ncols: int
    offset: int

    @property
    def numel(self) -> int:
        return self.count * self.nrows * self.ncols


@dataclass(frozen=True)
class ShardLayout:
    """Where one process's elements of the row space ((E*m) x n, ``shape2d``) lie: elements
    [start, start + valid) of its row-major flattening, as at most three blocks (a partial first row, whole
    rows, a partial last row). ``matrix_rows`` is m (default: one matrix). ``cut_rows`` and
    ``cut_matrices``: every row / matrix split between processes (the same lists on every process)."""

    shape2d: tuple[int, int]
    start: int
    valid: int
    blocks: tuple[Block, ...]
    cut_rows: tuple[int, ...] = ()
    matrix_rows: int = 0
    cut_matrices: tuple[int, ...] = ()
    tiles: tuple[Tile, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.matrix_rows:
            object.__setattr__(self, "matrix_rows", self.shape2d[0])
        object.__setattr__(self, "tiles", tuple(self._tiles()))

    @classmethod
    def of_slice(cls, shape2d: tuple[int, int], start: int, valid: int, cuts: Sequence[int] = (),
                 matrix_rows: Optional[int] = None) -> "ShardLayout":
        """Elements [start, start + valid) of the row space; ``cuts``: the element positions where a shard
        boundary falls (on every process alike)."""
        rows, n = shape2d
        m = matrix_rows or rows
        if start < 0 or valid < 0 or start + valid > rows * n:
            raise ValueError(f"elements [{start}, {start + valid}) are not inside a {rows}x{n} matrix")
        blocks = []
        pos, end, offset = start, start + valid, 0
        while pos < end:
            row, col = divmod(pos, n)
            if col != 0 or end - pos < n:
                width = min(n - col, end - pos)
                blocks.append(Block(row, 1, col, width, offset))
                taken = width
            else:
                nrows = (end - pos) // n
                blocks.append(Block(row, nrows, 0, n, offset))
                taken = nrows * n
            pos += taken
            offset += taken
        cut_rows = sorted({c // n for c in cuts if c % n})
        cut_matrices = sorted({c // (m * n) for c in cuts if c % (m * n)})
        return cls((rows, n), start, valid, tuple(blocks), tuple(cut_rows), m, tuple(cut_matrices))

    @classmethod
    def full(cls, shape2d: tuple[int, int], matrix_rows: Optional[int] = None) -> "ShardLayout":
        return cls.of_slice(shape2d, 0, shape2d[0] * shape2d[1], matrix_rows=matrix_rows)

    @classmethod
    def rows(cls, shape2d: tuple[int, int], row_start: int, nrows: int, matrix_rows: Optional[int] = None,
             cut_matrices: Sequence[int] = ()) -> "ShardLayout":
        """Whole rows [row_start, row_start + nrows) (FSDP2's ``Shard(0)``): no row is cut; ``cut_matrices``
        are the matrices whose rows are split between processes."""
        layout = cls.of_slice(shape2d, row_start * shape2d[1], nrows * shape2d[1], matrix_rows=matrix_rows)
        return cls(layout.shape2d, layout.start, layout.valid, layout.blocks, (), layout.matrix_rows,
                   tuple(cut_matrices))

    @classmethod
    def build(cls, shape2d: tuple[int, int], shard_numel: int, rank: int, world_size: int,
              matrix_rows: Optional[int] = None) -> "ShardLayout":
        """The row space flattened and split into ``world_size`` pieces of ``shard_numel`` elements (the tail
        of the last one padding): this rank's piece (ZeRO 3, and ZeRO 1/2 with one parameter per group)."""
        m, n = shape2d
        total = m * n
        if shard_numel * world_size < total:
            raise RuntimeError(
                f"a flat shard of {shard_numel} elements on each of {world_size} ranks cannot hold a {m}x{n} matrix: "
                "the optimizer was not handed the layout it recorded (a DeepSpeed version that partitions "
                "differently?)")
        start = min(rank * shard_numel, total)
        valid = max(0, min(shard_numel, total - start))
        cuts = range(shard_numel, total, shard_numel) if shard_numel else ()
        return cls.of_slice((m, n), start, valid, cuts, matrix_rows)

    def _tiles(self):
        m, n = self.matrix_rows, self.shape2d[1]
        for b in self.blocks:
            if b.ncols < n:  # part of one row
                yield Tile(b.row // m, 1, b.row % m, 1, b.col, b.ncols, b.offset)
                continue
            pos, end, offset = b.row, b.row + b.nrows, b.offset
            while pos < end:
                matrix, row = divmod(pos, m)
                if row == 0 and end - pos >= m:  # whole matrices
                    count = (end - pos) // m
                    yield Tile(matrix, count, 0, m, 0, n, offset)
                    taken = count * m
                else:
                    taken = min(m - row, end - pos)
                    yield Tile(matrix, 1, row, taken, 0, n, offset)
                pos += taken
                offset += taken * n

    @cached_property
    def is_full(self) -> bool:
        return self.start == 0 and self.valid == self.shape2d[0] * self.shape2d[1]

    @cached_property
    def whole(self) -> bool:
        """The local elements are whole matrices, one tile (unsharded; FSDP2 shards of a stack)."""
        return len(self.tiles) == 1 and self.tiles[0].nrows == self.matrix_rows and \
            self.tiles[0].ncols == self.shape2d[1]

    @cached_property
    def first_row(self) -> int:
        return self.blocks[0].row if self.blocks else 0

    @cached_property
    def num_rows(self) -> int:
        if not self.blocks:
            return 0
        last = self.blocks[-1]
        return last.row + last.nrows - self.first_row

    @cached_property
    def first_matrix(self) -> int:
        return self.first_row // self.matrix_rows

    @cached_property
    def num_matrices(self) -> int:
        """Matrices this process holds elements of."""
        if not self.num_rows:
            return 0
        return (self.first_row + self.num_rows - 1) // self.matrix_rows - self.first_matrix + 1

    def is_partial(self, block: Block) -> bool:
        return block.ncols < self.shape2d[1]

    @cached_property
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


class CountingComm:
    """A comm that counts what it all-reduces: ``last`` (bytes of the latest reduction under each key),
    ``total`` and ``by_label`` (each shared parameter's share of the latest step). One per optimizer."""

    def __init__(self) -> None:
        self.last: dict[Any, int] = {}
        self.total = 0
        self.by_label: dict[str, int] = {}

    def all_reduce_(self, comm: Any, tensor: torch.Tensor, key: Any) -> None:
        if comm is None or comm.world_size == 1:
            return
        nbytes = tensor.numel() * tensor.element_size()
        self.last[key] = nbytes
        self.total += nbytes
        comm.all_reduce_(tensor)

    def attribute(self, label: str, comm: Any, nbytes: int) -> None:
        if comm is not None and comm.world_size > 1:
            self.by_label[label] = self.by_label.get(label, 0) + nbytes


# ----------------------------------------------------------------------------------------------------------
# FSDP2: DTensor parameters


@lru_cache(maxsize=None)
def _dtensor_class() -> type:
    """torch's DTensor class, imported once (``type(None)`` for a torch without distributed)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return type(None)
    return DTensor


def is_dtensor(t: Any) -> bool:
    return isinstance(t, _dtensor_class())


_MESH_COMMS: "weakref.WeakKeyDictionary[Any, TorchDistComm]" = weakref.WeakKeyDictionary()


def dtensor_rows(p: torch.Tensor, label: str = "") -> tuple[int, int, Optional[TorchDistComm]]:
    """For a DTensor sharded by rows (FSDP2): ``(first local row, local rows, comm over the sharding mesh
    dimension)``; the comm is ``None`` when that dimension has one process. Other placements (tensor
    parallelism's ``Shard(1)``, partial sums) raise: APOLLO's rows would not be whole."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    where = f" for {label}" if label else ""
    shard_dims = []
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            shard_dims.append(mesh_dim)
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(f"Apollo needs whole rows: placements {p.placements}{where} are not Shard(0) "
                                      "or Replicate(); shard parameters with FSDP2's fully_shard")
    if len(shard_dims) > 1:
        raise NotImplementedError(f"a DTensor sharded on dim 0 over several mesh dimensions ({p.placements}){where} "
                                  "is not supported; shard it over one")
    if p.ndim == 0:
        return 0, 0, None
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    local_rows = p.to_local().shape[0] if p.to_local().ndim else 0
    if not shard_dims:
        return 0, local_rows, None
    group = p.device_mesh.get_group(shard_dims[0])
    comm = _MESH_COMMS.get(group)
    if comm is None:
        comm = _MESH_COMMS[group] = TorchDistComm(group)
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


def _slice_piece(index: int, shape: tuple[int, ...], begin: int, shard: int, rank: int,
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
    it must agree.
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
                               "build the optimizer on the parameters DeepSpeed trains")
        offset = 0
        for k in live[ids.index(first):ids.index(last) + 1]:
            part = -(-math.prod(shapes[k]) // world_size)
            original = originals[k]
            if original is not None and hasattr(original, "partition_numel") and \
                    int(original.partition_numel()) != part:
                raise RuntimeError(f"DeepSpeed gave parameter {k} of shape {shapes[k]} a partition of "
                                   f"{original.partition_numel()} elements, not {part}{where}")
            pieces.append(_slice_piece(k, shapes[k], 0, part, rank, offset))
            offset += part
        if offset != flat.numel():
            raise RuntimeError(f"a ZeRO-3 flat partition of {flat.numel()} elements does not match its "
                               f"parameters' {offset}{where}")
        return pieces
    total = sum(math.prod(shapes[k]) for k in live)
    shard = flat.numel()
    if shard * world_size < total:
        raise RuntimeError(
            f"a flat shard of {shard} elements on each of {world_size} ranks cannot hold this param group's "
            f"{total} elements{where}: DeepSpeed partitions in a way this version of lowrank-opt does not know")
    begin = 0
    for k in live:
        piece = _slice_piece(k, shapes[k], begin, shard, rank, 0)
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


# ----------------------------------------------------------------------------------------------------------
# Recognising what the optimizer is handed


@dataclass
class Record:
    """What an optimizer records about a parameter when it is built, to recognise it however it is later
    sharded or swapped: its name, full shape, whether it trains, and a weak reference to it."""

    name: Optional[str]
    shape: tuple[int, ...]
    trainable: bool
    original: Any = None  # weakref.ref or None
    identity: int = 0  # seeds the projection and rounding bits until the state holds its own
    index: int = 0  # position in its param group

    def tensor(self) -> Optional[torch.Tensor]:
        return self.original() if self.original is not None else None


@dataclass(eq=False)
class Part:
    """What this process holds of parameter ``index`` of a param group in this step: ``weight``/``grad`` are
    local storage; ``layout`` the local elements of its row space (None for a plain-AdamW tensor); ``comm``
    where partial sums go (None: nothing crosses processes). State lives in ``optimizer.state[key]`` (for a
    piece of a flat shard, under its ``shard_index``)."""

    group: dict
    index: int
    record: Record
    weight: torch.Tensor
    grad: torch.Tensor
    key: torch.Tensor
    layout: Optional[ShardLayout] = None
    comm: Any = None
    shard_index: Optional[int] = None
    round_offset: int = 0  # first local element: salts a shard's stochastic-rounding bits
    dtensor: Any = None  # the DTensor parameter (FSDP2)
    is_copy: bool = False  # a copy of the recorded parameter (DeepSpeed's stage-0 wrapper)

    @property
    def shared(self) -> bool:
        """Other processes hold elements of this parameter: decisions and sums go through ``comm``."""
        return self.comm is not None

    def zeros(self, local_shape: tuple[int, ...], dtype: torch.dtype,
              global_shape: Optional[tuple[int, ...]] = None) -> torch.Tensor:
        """Zeros on the part's device; under FSDP2 with ``global_shape``, a DTensor sharded like the parameter (its
        leading axis is the parameter's), so ``torch.distributed.checkpoint`` saves and reshards it."""
        local = torch.zeros(local_shape, dtype=dtype, device=self.weight.device)
        if self.dtensor is None or global_shape is None:
            return local
        from torch.distributed.tensor import DTensor

        stride = tuple(math.prod(global_shape[d + 1:]) for d in range(len(global_shape)))
        return DTensor.from_local(local, self.dtensor.device_mesh, self.dtensor.placements, run_check=False,
                                  shape=torch.Size(global_shape), stride=stride)


# (record) -> (E, m, n) of a low-rank parameter's stack in storage orientation, or None for plain AdamW
StackOf = Callable[[Record], Optional[tuple[int, int, int]]]


def _layout(stack: Optional[tuple[int, int, int]]) -> Optional[ShardLayout]:
    return None if stack is None else _whole_layout(*stack)


@lru_cache(maxsize=4096)
def _whole_layout(count: int, m: int, n: int) -> ShardLayout:
    """Every element of a stack of ``count`` m x n matrices (layouts are immutable: one per shape)."""
    return ShardLayout.full((count * m, n), m)


def recognise(group: dict, records: list[Record], i: int, p: torch.Tensor, stack_of: StackOf,
              comm_for_flat: Callable[[], Any], flat_cache: dict, where: str) -> list[Part]:
    """The parts this process holds of entry ``i`` of ``group["params"]`` (``records``: the group as built)."""
    live = group["params"]
    if is_dtensor(p):
        if len(live) != len(records) or tuple(p.shape) != records[i].shape:
            raise RuntimeError(f"Apollo got a sharded parameter of shape {tuple(p.shape)} at position {i}{where} "
                               "that it was not built with; build the optimizer on the parameters it trains")
        return [_dtensor_part(group, i, p, records[i], stack_of(records[i]))]
    if len(live) == len(records) and tuple(p.shape) == records[i].shape:
        original = records[i].tensor()
        return [Part(group, i, records[i], p, p.grad, p, _layout(stack_of(records[i])),
                     is_copy=original is not None and original is not p)]
    trainable = [k for k, r in enumerate(records) if r.trainable]
    if len(live) == len(trainable) and all(tuple(q.shape) == records[k].shape for q, k in zip(live, trainable)):
        record = records[trainable[i]]  # fp32 copies of the trainable parameters (DeepSpeed's stage-0 wrapper)
        return [Part(group, trainable[i], record, p, p.grad, p, _layout(stack_of(record)), is_copy=True)]
    if len(live) == 1 and p.ndim == 1:
        return _flat_parts(group, records, p, stack_of, comm_for_flat(), flat_cache, where)
    raise RuntimeError(
        f"Apollo was built with parameters of shapes {[r.shape for r in records]}{where} but step() sees "
        f"{[tuple(q.shape) for q in live]}: Apollo does not recognise this layout (it knows unsharded parameters, "
        "FSDP2 DTensors and DeepSpeed ZeRO 1-3 flat shards); build the optimizer on the parameters the wrapper trains")


def _dtensor_part(group: dict, i: int, p: torch.Tensor, record: Record,
                  stack: Optional[tuple[int, int, int]]) -> Part:
    label = repr(record.name) if record.name is not None else f"param {i} of its group"
    row0, nrows, comm = dtensor_rows(p, label)
    if not is_dtensor(p.grad):
        raise RuntimeError(f"the gradient of the DTensor parameter {label} is not a DTensor")
    n_row = math.prod(record.shape[1:]) if len(record.shape) > 1 else 1
    layout = None
    if stack is not None:
        count, m, n = stack
        if count > 1:  # Shard(0) of a stack: whole matrices on each process, nothing crosses
            layout = ShardLayout.rows((count * m, n), row0 * m, nrows * m, m)
            comm = None
        else:
            layout = ShardLayout.rows((m, n), row0, nrows, m, (0,) if comm is not None else ())
    return Part(group, i, record, p.to_local(), p.grad.to_local(), p, layout, comm, round_offset=row0 * n_row,
                dtensor=p)


def _flat_parts(group: dict, records: list[Record], flat: torch.Tensor, stack_of: StackOf, comm: Any,
                cache: dict, where: str) -> list[Part]:
    key = (id(flat), id(group), comm.rank, comm.world_size, flat.numel())
    pieces = cache.get(key)
    if pieces is None:
        originals = [r.tensor() for r in records]
        trainable = [bool(o.requires_grad) if o is not None else r.trainable for r, o in zip(records, originals)]
        pieces = cache[key] = zero_flat_pieces(flat, [r.shape for r in records], trainable, originals, comm.rank,
                                               comm.world_size, where.strip())
    parts = []
    for fp in pieces:
        if fp.numel == 0 and not fp.shared:
            continue
        record = records[fp.index]
        stack = stack_of(record)
        layout = None
        if stack is not None:
            count, m, n = stack
            layout = ShardLayout.of_slice((count * m, n), fp.start, fp.numel, fp.cuts, m)
        parts.append(Part(group, fp.index, record, flat.narrow(0, fp.offset, fp.numel),
                          flat.grad.narrow(0, fp.offset, fp.numel), flat, layout, comm if fp.shared else None,
                          fp.index, round_offset=fp.start))
    return parts
