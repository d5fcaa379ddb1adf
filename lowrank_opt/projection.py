"""Seeded Gaussian random projection for APOLLO: orientation, rank rules, refresh schedule, N-D reshape.

The projection matrix P of a parameter is a pure function of ``(seed, parameter identity, refresh index)``
where the refresh index is ``step // update_proj_gap`` (``step`` counted before the increment, so P is
redrawn at steps 0, T, 2T, ...). Nothing about P is ever stored in a checkpoint: any process that builds the
optimizer the same way draws the same P, on the parameter's device, without communication.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass
from typing import Callable, Union

import torch

Rank = Union[int, float, Callable[[int], int], None]

RIGHT = "right"  # R = G @ P.T, P is (r, n): compresses the columns of G
LEFT = "left"  # R = P @ G,   P is (r, m): compresses the rows of G


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view APOLLO works on: ``shape[0] x prod(shape[1:])`` (conv and other N-D weights)."""
    if len(shape) < 2:
        raise ValueError(f"a low-rank parameter needs ndim >= 2, got shape {tuple(shape)}")
    return int(shape[0]), int(math.prod(shape[1:]))


def orientation(shape2d: tuple[int, int], sort_dims: bool = True) -> str:
    """Which side to project. With ``sort_dims`` the smaller dimension is compressed (tall or square:
    right; wide: left); without it the rows are always compressed (left)."""
    m, n = shape2d
    if not sort_dims:
        return LEFT
    return RIGHT if m >= n else LEFT


def compressed_dim(shape2d: tuple[int, int], side: str) -> int:
    return shape2d[1] if side == RIGHT else shape2d[0]


def kept_dim(shape2d: tuple[int, int], side: str) -> int:
    return shape2d[0] if side == RIGHT else shape2d[1]


def resolve_rank(rank: Rank, dim: int, label: str = "") -> int:
    """Turn a rank rule into an integer for a compressed dimension of size ``dim``.

    - int: clipped to ``dim``;
    - float in (0, 1]: that fraction of ``dim``, rounded to the nearest integer;
    - callable ``dim -> int`` (e.g. ``lambda d: math.ceil(math.sqrt(d))``): its result, clipped to ``dim``.
    A rank that resolves to less than 1 is an error naming the parameter.
    """
    where = f" for {label}" if label else ""
    if isinstance(rank, bool):
        raise TypeError(f"rank must be an int, a float in (0, 1] or a callable, got {rank!r}{where}")
    if isinstance(rank, int):
        resolved = rank
    elif isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"a fractional rank must be in (0, 1], got {rank}{where}")
        resolved = int(math.floor(rank * dim + 0.5))
    elif callable(rank):
        value = rank(dim)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise TypeError(f"a rank callable must return an integer, got {value!r} for dim {dim}{where}")
        resolved = int(value)
    else:
        raise TypeError(f"rank must be an int, a float in (0, 1] or a callable, got {rank!r}{where}")
    if resolved < 1:
        raise ValueError(f"rank must be >= 1, got {resolved} (from {rank!r}, dim {dim}){where}")
    return min(resolved, dim)


def _stable_hash(text: str) -> int:
    """A 63-bit integer from text, the same in every process and Python version (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def identity_key(name_or_index: Union[str, int]) -> int:
    """A parameter's identity as an integer: its name when the optimizer was given names, else its
    position in the optimizer."""
    if isinstance(name_or_index, str):
        return _stable_hash("name:" + name_or_index)
    return _stable_hash(f"index:{int(name_or_index)}")


def projection_seed(seed: int, identity: int, refresh_index: int) -> int:
    """Generator seed for a parameter's P in a refresh window."""
    return _stable_hash(f"apollo-projection/{int(seed)}/{int(identity)}/{int(refresh_index)}")


_GENERATORS = threading.local()  # .cache: {device: torch.Generator}, one set per thread


def seeded_generator(device: torch.device | str, generator_seed: int) -> torch.Generator:
    """A generator for ``device`` (one cached per device and thread, shared by every seeded draw in the
    package), re-seeded with ``generator_seed``. The meta device (dry runs of the memory estimator) gets a CPU
    generator: meta random ops accept one and draw nothing."""
    device = torch.device(device)
    if device.type == "meta":
        device = torch.device("cpu")
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cache = getattr(_GENERATORS, "cache", None)
    if cache is None:
        cache = _GENERATORS.cache = {}
    gen = cache.get(device)
    if gen is None:
        gen = torch.Generator(device=device)
        cache[device] = gen
    gen.manual_seed(generator_seed)
    return gen


def gaussian_projection(
    rank: int, dim: int, generator_seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """P in R^{rank x dim} with i.i.d. N(0, 1/rank) entries, drawn on ``device`` from ``generator_seed``.

    The draw is in fp32 (then cast), so the matrix does not depend on the parameter dtype. Different
    device types (CPU vs CUDA) have different generators and so give different matrices.
    """
    gen = seeded_generator(device, generator_seed)
    p = torch.randn((rank, dim), generator=gen, device=device, dtype=torch.float32)
    p.mul_(1.0 / math.sqrt(rank))
    return p if dtype == torch.float32 else p.to(dtype)


def stacked_gaussian_projection(count: int, rank: int, dim: int, generator_seed: int,
                                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``count`` matrices P of (rank x dim), N(0, 1/rank), from one draw seeded by ``generator_seed``: P[e] is
    a pure function of (seed, identity, refresh index, e). For ``count == 1`` the same numbers as
    :func:`gaussian_projection`."""
    gen = seeded_generator(device, generator_seed)
    p = torch.randn((count, rank, dim), generator=gen, device=device, dtype=torch.float32)
    p.mul_(1.0 / math.sqrt(rank))
    return p if dtype == torch.float32 else p.to(dtype)


@dataclass(frozen=True)
class ProjectionPlan:
    """Everything static about how one parameter is projected (rebuilt from the param group, never saved): a
    stack of ``count`` matrices of ``shape2d`` (storage orientation; ``stacked`` keeps the leading axis in the
    moments and P), projected on ``side`` at ``rank``."""

    shape2d: tuple[int, int]
    side: str
    rank: int
    count: int = 1
    stacked: bool = False

    @property
    def moment_shape(self) -> tuple[int, ...]:
        """Shape of R and of the moments: (m, r) for right projection, (r, n) for left; (E, ...) for a stack."""
        m, n = self.shape2d
        shape = (m, self.rank) if self.side == RIGHT else (self.rank, n)
        return (self.count, *shape) if self.stacked else shape

    @property
    def p_shape(self) -> tuple[int, int]:
        return (self.rank, compressed_dim(self.shape2d, self.side))

    @property
    def stack(self) -> tuple[int, int, int]:
        """(E, m, n): the stack's matrices, the row space being (E*m) x n."""
        return (self.count, *self.shape2d)

    def matrix(self, seed: int, identity: int, step: int, update_proj_gap: int, device,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """P used at optimizer step ``step`` (counted from 0, before the increment): (r, d), or (E, r, d) for a
        stack."""
        generator_seed = projection_seed(seed, identity, step // update_proj_gap)
        if not self.stacked:
            return gaussian_projection(self.rank, self.p_shape[1], generator_seed, device, dtype)
        return stacked_gaussian_projection(self.count, self.rank, self.p_shape[1], generator_seed, device, dtype)


def project(grad2d: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """R = G P^T (right) or R = P G (left)."""
    return grad2d @ proj.T if side == RIGHT else proj @ grad2d
