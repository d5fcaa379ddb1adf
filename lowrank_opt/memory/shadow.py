"""A dispatch mode in which an optimizer ``step()`` runs on meta tensors: values where the host reads them, and
a record of what the step allocates.

Meta tensors have no values, so the few host reads an optimizer makes (``bool(finite.all())``, ``.tolist()`` of
flags, ``.item()`` of a norm) would fail. ``ShadowValues`` keeps real CPU *shadows* of the small meta tensors
(norms, flags, counters), computed by the same ops, while large tensors (weights, gradients, moments) stand for
finite values; nothing large is ever allocated. With ``track_allocations`` it also records every meta storage
created and released, so the step's scratch can be told from the state it leaves (``temporaries_peak``).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch

_SHADOW_LIMIT = 4096  # meta tensors up to this many elements get a real CPU shadow during a dry run (flags,
# norms and counters are far smaller; weights, gradients and moments stay shadowless)


def _shadow_values_mode(track_allocations: bool = False):
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    cpu = torch.device("cpu")

    def is_meta(x) -> bool:
        return isinstance(x, torch.Tensor) and x.device.type == "meta"

    def tensors(obj) -> list:
        """The tensors in an op's arguments or outputs (lists, tuples and dicts of them), in order; much
        cheaper than a full pytree flatten on this hot path."""
        if isinstance(obj, torch.Tensor):
            return [obj]
        found = []
        stack = [obj]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif isinstance(item, (list, tuple)):
                stack.extend(reversed(item))
            elif isinstance(item, dict):
                stack.extend(reversed(list(item.values())))
        return found

    def small(t: torch.Tensor) -> bool:
        return t.numel() <= _SHADOW_LIMIT

    class ShadowValues(TorchDispatchMode):
        """Give meta tensors values where an optimizer reads them on the host.

        Every small meta tensor (at most ``_SHADOW_LIMIT`` elements: norms, flags, per-channel factors,
        step counters) gets a real CPU *shadow*, computed by running the same op on the shadows of its
        inputs; large ones (weights, gradients, moments) stand for tensors of ones, i.e. finite values. A
        small result of a large input (a reduction) takes a neutral value: ``all`` True, ``any`` False,
        anything else ones. Host reads (``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``) return the shadow.
        So ``isfinite(g).all()`` is True and a NormGrowthCap's first-step "cap" flags are False, as for
        real finite gradients, and nothing large is ever allocated."""

        def __init__(self, track_allocations: bool = False):
            super().__init__()
            self.shadows: dict[int, tuple] = {}
            # Allocation tracking: a timeline of meta storages created inside the mode, each released when
            # the last tensor using it is collected.
            self.track = track_allocations
            self.storages: dict[int, list] = {}  # StorageImpl address -> [live tensors, bytes, serial]
            self.events: list[tuple[int, int]] = []  # (serial, +bytes on allocation / -bytes on release)

        def _release(self, key: int) -> None:
            entry = self.storages.get(key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] <= 0:
                del self.storages[key]
                self.events.append((entry[2], -entry[1]))

        def temporaries_peak(self) -> int:
            """The most bytes alive at once of the storages that did not survive: the step's scratch
            tensors, without the state it created (still alive at the end)."""
            kept = {entry[2] for entry in self.storages.values()}
            live = peak = 0
            for serial, delta in self.events:
                if serial not in kept:
                    live += delta
                    peak = max(peak, live)
            return peak

        def _track(self, args, kwargs, out) -> None:
            inputs = None
            for t in tensors(out):
                if not is_meta(t):
                    continue
                storage = t.untyped_storage()
                key = storage._cdata
                entry = self.storages.get(key)
                if entry is None:
                    if inputs is None:
                        inputs = {a.untyped_storage()._cdata for a in tensors((args, kwargs)) if is_meta(a)}
                    if key in inputs:  # in place on, or a view of, a tensor from before: not a new allocation
                        continue
                    entry = self.storages[key] = [0, storage.nbytes(), len(self.events)]
                    self.events.append((entry[2], entry[1]))
                entry[0] += 1
                weakref.finalize(t, self._release, key)

        def get(self, t: torch.Tensor, materialize: bool = True):
            entry = self.shadows.get(id(t))
            if entry is not None and entry[0]() is t:
                return entry[1]
            if materialize and small(t):  # created before the dry run: stands for ones
                value = torch.ones(t.shape, dtype=t.dtype, device=cpu)
                self.put(t, value)
                return value
            return None

        def put(self, t: torch.Tensor, value: torch.Tensor) -> None:
            self.shadows[id(t)] = (weakref.ref(t), value)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            packet = func.overloadpacket
            if packet is aten._local_scalar_dense and is_meta(args[0]):
                return self.get(args[0]).item()
            if packet is aten._to_copy and is_meta(args[0]):
                target = kwargs.get("device")
                if target is not None and torch.device(target).type != "meta":
                    value = self.get(args[0])
                    if value is None:
                        raise RuntimeError(f"dry run: cannot copy a {tuple(args[0].shape)} meta tensor to {target}")
                    return value.to(dtype=kwargs.get("dtype") or value.dtype, device=target, copy=True)
            if packet is aten.copy_ and is_meta(args[1]) and not is_meta(args[0]):
                value = self.get(args[1])
                return args[0].copy_(value if value is not None else torch.ones((), dtype=args[0].dtype))
            if packet is aten.equal and any(is_meta(a) for a in args):
                values = [self.get(a) if is_meta(a) else a for a in args]
                return True if any(v is None for v in values) else bool(torch.equal(*values))
            out = func(*args, **kwargs)
            if self.track:
                self._track(args, kwargs, out)
            if not any(is_meta(t) and small(t) for t in tensors(out)):
                return out
            self._shadow(func, packet, args, kwargs, out)
            return out

        def _shadow(self, func, packet, args, kwargs, out) -> None:
            flat_in = [a for a in tensors((args, kwargs)) if is_meta(a)]
            missing = any(self.get(a) is None for a in flat_in)
            result = None
            if not missing:
                def to_cpu(x):
                    if isinstance(x, torch.Tensor):
                        return self.get(x) if x.device.type == "meta" else x
                    if isinstance(x, (list, tuple)):
                        return type(x)(to_cpu(v) for v in x)
                    if isinstance(x, torch.device) and x.type == "meta":
                        return cpu
                    return x

                try:
                    result = func(*to_cpu(args), **{k: to_cpu(v) for k, v in kwargs.items()})
                except Exception:  # an op with no CPU kernel for these inputs: fall back to neutral values
                    result = None
            metas = tensors(out)
            values = tensors(result) if result is not None else [None] * len(metas)
            if len(values) != len(metas):
                values = [None] * len(metas)
            for t, value in zip(metas, values):
                if not is_meta(t) or not small(t):
                    continue
                if not isinstance(value, torch.Tensor) or value.shape != t.shape:
                    if packet is aten.any:
                        fill = False
                    elif packet is aten.all:
                        fill = True
                    else:
                        fill = 1
                    value = torch.full(t.shape, fill, dtype=t.dtype, device=cpu)
                self.put(t, value)

    return ShadowValues(track_allocations)


@contextmanager
def meta_dry_run(track_allocations: bool = False):
    """Context in which an optimizer ``step()`` on meta parameters with meta gradients runs through: host
    reads are answered (see ``ShadowValues``); APOLLO's seeded draws on meta tensors get a CPU generator from
    :func:`lowrank_opt.projection.seeded_generator`. With ``track_allocations`` the yielded mode records meta
    allocations (``temporaries_peak()``)."""
    with _shadow_values_mode(track_allocations) as mode:
        yield mode
