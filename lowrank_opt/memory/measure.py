"""Measure what training really uses: optimizer-state bytes, CUDA peaks, process peak RSS.

``optimizer_state_bytes(optimizer)`` is the single definition of "optimizer memory" in this package: the
estimator's dry run (:mod:`lowrank_opt.memory.dryrun`) applies the very same function to an optimizer built on
meta tensors, so an estimate and a measurement of the same set-up agree to the byte.

What it counts: every tensor reachable from the optimizer's per-parameter dicts (``optimizer.state`` and
any other dict attribute keyed by parameters, e.g. APOLLO's cache of projection matrices), including
tensors held one level down inside objects stored there (the projector objects of galore-torch and
apollo-torch keep their matrix that way), each storage counted once. Wrappers are looked through:
:class:`~lowrank_opt.NormGrowthCap`, accelerate's ``AcceleratedOptimizer`` (``.optimizer``) and Hugging Face's
layer-wise ``LayerWiseDummyOptimizer`` (``.optimizer_dict``). Parameters themselves are never counted.

``MemoryCallback`` is a ``transformers.TrainerCallback`` that records these numbers every step and prints the
measured peak next to an estimate at the end of training.
"""

from __future__ import annotations

import logging
import resource
import sys
from collections import defaultdict
from typing import Any, Iterator, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "MemoryCallback",
    "StateBytes",
    "optimizer_state_bytes",
    "optimizer_state_breakdown",
    "peak_rss_bytes",
    "unwrap_optimizers",
]

GB = 1e9


# ----------------------------------------------------------------------------------------------------------
# Optimizer state


def unwrap_optimizers(optimizer: Any) -> list:
    """The optimizers that actually hold state behind ``optimizer``: itself plus everything reachable via
    ``.optimizer`` (NormGrowthCap, accelerate's AcceleratedOptimizer, DeepSpeed wrappers) and via
    ``.optimizer_dict`` (HF's layer-wise dummy optimizer: one optimizer per parameter)."""
    found: list = []
    seen: set[int] = set()
    todo = [optimizer]
    while todo:
        opt = todo.pop()
        if opt is None or id(opt) in seen:
            continue
        seen.add(id(opt))
        found.append(opt)
        inner = getattr(opt, "optimizer", None)
        if inner is not None and inner is not opt:
            todo.append(inner)
        per_param = getattr(opt, "optimizer_dict", None)
        if isinstance(per_param, dict):
            todo.extend(per_param.values())
    return found


def _params_of(optimizers: list) -> dict[int, torch.Tensor]:
    params: dict[int, torch.Tensor] = {}
    for opt in optimizers:
        for group in getattr(opt, "param_groups", []) or []:
            for p in group.get("params", []):
                if isinstance(p, torch.Tensor):
                    params[id(p)] = p
    return params


def _tensors_in(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors in a state value: the value itself, containers of them, and (one level) attributes of
    plain objects such as projector instances."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, depth)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v, depth)
    elif (depth < 1 and hasattr(value, "__dict__") and not isinstance(value, (type, nn.Module))
          and not isinstance(value, torch.optim.Optimizer)):
        for v in vars(value).values():
            yield from _tensors_in(v, depth + 1)


def _storage_key_and_bytes(t: torch.Tensor) -> tuple[tuple, int]:
    """Real tensors: their storage (shared storages counted once, at the size actually allocated). A DTensor
    (FSDP2 state): the shard this process holds. Meta tensors have no storage address: each tensor counts as
    numel x element size."""
    to_local = getattr(t, "to_local", None)
    if callable(to_local) and type(t).__name__ == "DTensor":
        t = to_local()
    if t.device.type == "meta":
        return ("meta", id(t)), t.numel() * t.element_size()
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr()), storage.nbytes()


class StateBytes(dict):
    """``optimizer_state_breakdown`` result: ``{id(param): bytes}`` plus ``unattributed`` (tensors not keyed
    by a parameter, e.g. shared quantisation maps) and ``by_source`` (bytes per attribute name, e.g.
    ``{"state": ..., "_projection_cache": ...}``)."""

    unattributed: int = 0
    by_source: dict

    @property
    def total(self) -> int:
        return sum(self.values()) + self.unattributed


def optimizer_state_breakdown(optimizer: Any) -> StateBytes:
    """Optimizer-state bytes per parameter (keyed by ``id(param)``); see the module docstring."""
    optimizers = unwrap_optimizers(optimizer)
    params = _params_of(optimizers)
    seen: set[tuple] = set()
    result = StateBytes()
    result.by_source = defaultdict(int)
    for opt in optimizers:
        for attr, value in vars(opt).items():
            if attr in ("param_groups", "defaults", "optimizer", "optimizer_dict") or not isinstance(value, dict):
                continue
            if not value or (attr != "state" and not any(isinstance(k, torch.Tensor) and id(k) in params
                                                          for k in value)):
                # only dicts keyed by this optimizer's parameters; ``state`` always (under ZeRO-3 DeepSpeed puts its
                # own parameters back into param_groups after step(), while the state stays keyed by its flat
                # partitions: it is counted, as held for no parameter of param_groups)
                continue
            for key, entry in value.items():
                for t in _tensors_in(entry):
                    if id(t) in params:
                        continue
                    storage_key, nbytes = _storage_key_and_bytes(t)
                    if storage_key in seen:
                        continue
                    seen.add(storage_key)
                    result.by_source[attr] += nbytes
                    if isinstance(key, torch.Tensor) and id(key) in params:
                        result[id(key)] = result.get(id(key), 0) + nbytes
                    else:
                        result.unattributed += nbytes
    result.by_source = dict(result.by_source)
    return result


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of optimizer state (moments, quantisation maps, cached projections, norm-growth scalars, ...)
    held by ``optimizer`` and any optimizer it wraps. Works on meta tensors too (shape x dtype)."""
    return optimizer_state_breakdown(optimizer).total


# ----------------------------------------------------------------------------------------------------------
# Process memory


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (``getrusage``; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _cuda_in_use(model: Optional[nn.Module]) -> bool:
    if not torch.cuda.is_available():
        return False
    if model is None:
        return True
    try:
        return next(model.parameters()).device.type == "cuda"
    except StopIteration:
        return True


def _callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - the package imports without transformers
        return object
    return TrainerCallback


class MemoryCallback(_callback_base()):
    """Record memory every training step and compare the peak with an estimate at the end.

    Each step appends to ``self.history`` a dict with ``step``, ``optimizer_state_bytes`` and either (CUDA)
    ``cuda_max_allocated`` / ``cuda_max_reserved`` (``torch.cuda.max_memory_allocated/reserved`` since
    training began) or (CPU) ``peak_rss`` (the process's peak resident set, ``getrusage``). These also go
    to the ``lowrank_opt.memory.measure`` logger (every ``log_every`` steps) and into the Trainer's logs
    (``on_log``) as ``mem_*`` keys in GB. At the end of training the measured peak is printed next to
    ``estimate`` (a :class:`~lowrank_opt.memory.MemoryEstimate`) when one is given.

    On CPU the comparable number is the optimizer state: the estimate's ``optimizer_states`` is exact for
    the same model, dtype and optimizer options, while peak RSS also holds Python, torch, the data and
    the allocator's cache.

    Example:
        >>> from lowrank_opt.memory import MemoryCallback, estimate
        >>> est = estimate("configs/llama_60m.json", "apollo", optim_args="rank=128", dtype="bf16", seq_len=256)
        >>> trainer = Trainer(..., callbacks=[MemoryCallback(estimate=est)])
    """

    def __init__(self, estimate: Any = None, log_every: int = 1, print_summary: bool = True):
        self.estimate = estimate
        self.log_every = max(1, int(log_every))
        self.print_summary = print_summary
        self.history: list[dict] = []
        self.summary: Optional[dict] = None
        self._cuda = False

    # -- events ----------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._cuda = _cuda_in_use(model)
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        record = {"step": int(state.global_step)}
        record["optimizer_state_bytes"] = optimizer_state_bytes(optimizer) if optimizer is not None else None
        if self._cuda:
            record["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated())
            record["cuda_max_reserved"] = int(torch.cuda.max_memory_reserved())
        else:
            record["peak_rss"] = peak_rss_bytes()
        self.history.append(record)
        if record["step"] % self.log_every == 0:
            logger.info("memory at step %d: %s", record["step"], self._format(record))

    def log_values(self) -> dict:
        """The latest measurement as ``mem_*_gb`` log entries (and the estimate's total, when given).
        lowrank-opt's Trainer (:mod:`lowrank_opt.integrations.hf`) adds them to every log, so they reach
        ``log_history`` and every reporting integration (TensorBoard, ...)."""
        if not self.history:
            return {}
        values = {f"mem_{key.replace('_bytes', '')}_gb": round(value / GB, 4)
                  for key, value in self.history[-1].items() if key != "step" and value is not None}
        if self.estimate is not None:
            values["mem_estimate_total_gb"] = round(self.estimate.total / GB, 4)
        return values

    def on_log(self, args, state, control, logs=None, **kwargs):
        # For a stock Trainer (whose log_history is written before callbacks run): the integrations that come
        # after this callback see the values. lowrank-opt's Trainer adds them before logging (log_values).
        if logs is not None:
            for key, value in self.log_values().items():
                logs.setdefault(key, value)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.history:
            return
        self.summary = self._summarise()
        if self.print_summary:
            print(self.format_summary())

    # -- reporting -------------------------------------------------------------------------------------

    @staticmethod
    def _format(record: dict) -> str:
        parts = []
        for key, value in record.items():
            if key != "step" and value is not None:
                parts.append(f"{key}={value / GB:.3f} GB")
        return ", ".join(parts)

    def _summarise(self) -> dict:
        states = [r["optimizer_state_bytes"] for r in self.history if r["optimizer_state_bytes"] is not None]
        summary: dict = {"steps": len(self.history), "device": "cuda" if self._cuda else "cpu",
                         "optimizer_state_bytes": max(states) if states else None}
        if self._cuda:
            summary["cuda_max_allocated"] = max(r["cuda_max_allocated"] for r in self.history)
            summary["cuda_max_reserved"] = max(r["cuda_max_reserved"] for r in self.history)
        else:
            summary["peak_rss"] = max(r["peak_rss"] for r in self.history)
        if self.estimate is not None:
            summary["estimate_total"] = int(self.estimate.total)
            summary["estimate_optimizer_states"] = int(self.estimate.optimizer_states)
        return summary

    def format_summary(self) -> str:
        s = self.summary or self._summarise()

        def gb(value):
            return "-" if value is None else f"{value / GB:.3f} GB"

        est = self.estimate
        lines = [f"MemoryCallback: {s['steps']} steps on {s['device']}", f"  {'':28s}{'measured':>14s}{'estimated':>14s}"]
        lines.append(f"  {'optimizer states':28s}{gb(s['optimizer_state_bytes']):>14s}"
                     f"{gb(est.optimizer_states) if est is not None else '-':>14s}")
        if s["device"] == "cuda":
            lines.append(f"  {'peak allocated (CUDA)':28s}{gb(s['cuda_max_allocated']):>14s}"
                         f"{gb(est.total - est.overhead) if est is not None else '-':>14s}")
            lines.append(f"  {'peak reserved (CUDA)':28s}{gb(s['cuda_max_reserved']):>14s}"
                         f"{gb(est.total) if est is not None else '-':>14s}")
        else:
            lines.append(f"  {'peak RSS (whole process)':28s}{gb(s['peak_rss']):>14s}"
                         f"{gb(est.total) if est is not None else '-':>14s}")
            lines.append("  (CPU: RSS includes Python, torch and data; the estimate models a GPU, so compare the "
                         "optimizer states)")
        return "\n".join(lines)
