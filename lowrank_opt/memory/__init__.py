"""Training memory: estimate it before you train (meta device, nothing allocated), measure it while you do.

    >>> from lowrank_opt.memory import estimate
    >>> print(estimate("llama_7b", "apollo", optim_args="rank=256", dtype="bf16", layerwise=True).table())

or from the shell: ``lowrank-opt memory llama_7b --optim apollo --optim-args rank=256 --layerwise``.

:func:`estimate` returns a :class:`MemoryEstimate` (bytes per category, per GPU); the formulas and their
sources are in :mod:`lowrank_opt.memory.estimate`, which points to the module of each part. :class:`MemoryCallback`
(a ``transformers.TrainerCallback``) records the real numbers during training; :func:`optimizer_state_bytes`
counts an optimizer's state.

Optimizer names and options are resolved by :func:`lowrank_opt.registry.resolve`, as everywhere else. Modules, one
job each:

- ``estimate``: :func:`estimate`: weights, gradients, the backward walk, ZeRO and overhead, put together.
- ``dryrun``: registry optimizers' state and step scratch from one ``step()`` on the meta device.
- ``shadow``: the dispatch mode that answers host reads of meta tensors during that step.
- ``external``: state layouts of optimizers from other packages (bitsandbytes, GaLore, apollo-torch).
- ``activations``: the bytes autograd saves for backward, per decoder layer.
- ``configs``: model configs by name or path, built on the meta device.
- ``report``: :class:`MemoryEstimate` and its tables; ``dtypes``: dtype names and sizes.
- ``measure``: measured numbers (:class:`MemoryCallback`, :func:`optimizer_state_bytes`).
"""

from ..registry import known_optimizers
from .activations import activation_bytes
from .configs import known_configs, resolve_config
from .estimate import CUDA_CONTEXT_BYTES, FRAGMENTATION, estimate
from .measure import MemoryCallback, optimizer_state_breakdown, optimizer_state_bytes, peak_rss_bytes
from .report import MemoryEstimate, compare_table

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "FRAGMENTATION",
    "MemoryCallback",
    "MemoryEstimate",
    "activation_bytes",
    "compare_table",
    "estimate",
    "known_configs",
    "known_optimizers",
    "optimizer_state_breakdown",
    "optimizer_state_bytes",
    "peak_rss_bytes",
    "resolve_config",
]
