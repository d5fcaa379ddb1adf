"""Estimate the GPU memory of training a causal LM, without allocating it.

The model is built on the meta device (shapes and dtypes, no data), so ``estimate("llama_7b", ...)`` takes
about a second and a few hundred MB of host memory. Where the bytes go (per GPU):

**weights** -- ``n x`` bytes of ``dtype`` (fp32 4, bf16/fp16 2); with ``master_weights`` (mixed precision)
also an fp32 master copy, ``4n``. (Under torch autocast the 16-bit copy is autocast's cache of weight casts,
alive through the forward pass; under DeepSpeed it is the model itself and the masters live in the
optimizer.)

**gradients** -- one per trainable parameter in the dtype of the tensors autograd accumulates into:
``dtype`` for pure 16-bit or fp32 training; fp32 (``4n``) under torch autocast with fp32 master weights
(the HF Trainer's ``--bf16`` with an fp32 model); ``2n`` 16-bit gradients plus an fp32 gradient partition
(``4n``) under DeepSpeed with master weights. With layer-wise updates (``layerwise``: each parameter is
updated inside backward and its gradient freed at once) only the largest single gradient.

**optimizer states** -- from the optimizer's *own* code: registry optimizers (``lowrank_opt.registry``)
are built on the meta parameters exactly as ``build_optimizer`` builds them and run for one real
``step()`` on meta gradients; the bytes are then counted by
:func:`~lowrank_opt.memory.measure.optimizer_state_bytes`, the same function that measures a real
optimizer. Meta tensors have no values, so the few host reads an optimizer makes (``bool(finite.all())``,
``.tolist()`` of flags) are served by a dispatch mode that keeps real CPU shadows of the *small* meta
tensors (norms, flags, counters), computed by the same ops, while large tensors stand for finite values
(see ``ShadowValues``); generators asked for on the meta device (APOLLO's seeded projections, stochastic
rounding) are CPU generators, whose meta draws allocate nothing. Optimizers outside
this package that need packages the library must not import (Hugging Face's ``adamw_bnb_8bit``,
``galore_adamw``, ``apollo_adamw``) are computed from their published state layouts:

- bitsandbytes 8-bit AdamW (bitsandbytes 0.45-0.50 ``Optimizer2State.init_state``): per tensor with at
  least ``min_8bit_size = 4096`` elements two uint8 moments (``2n`` bytes) plus two fp32 absmax vectors of
  ``ceil(n / 256)`` (block size 256), plus two shared 256-entry fp32 quantisation maps; smaller tensors,
  and ``nn.Embedding`` weights (the HF Trainer overrides them to 32-bit), keep two fp32 moments (``8n``).
- GaLore (galore-torch ``GaLoreAdamW`` + ``GaLoreProjector``, REFERENCE Table 1 ``2nr + mr``): for a target
  m x n matrix with r' = min(r, m, n) (truncated SVD) the moments are r' x max(m, n) and the projection
  matrix r' x min(m, n), all in the parameter dtype; other parameters: AdamW moments in the parameter dtype.
  With fp32 parameters galore-torch's P is a *view* of the SVD factor (``Vh[:r]``/``U[:, :r]``), which keeps
  the whole min(m, n)^2 factor allocated; that is what is counted then.
- apollo-torch ``APOLLOAdamW`` (HF ``apollo_adamw``): moments r x max(m, n) (r not clipped) plus the
  random projection matrix it caches for the whole gap, r x min(m, n), in the parameter dtype, plus a
  0-d limiter norm; others AdamW moments. Targets follow HF's rule: ``all-linear`` is every
  ``nn.Linear`` *including* ``lm_head`` (ours excludes the output embedding).

**activations** -- per LLaMA decoder layer, derived term by term from what the Hugging Face LLaMA
implementation saves for backward (checked byte-exact against ``torch.autograd.graph.saved_tensors_hooks``
in tests/test_memory.py), in the spirit of Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", Sec. 4.1, GPT layer: ``sbh(34 + 5as/h)`` bytes). With T = batch x seq tokens,
h hidden, i intermediate, a heads, k kv-heads, d head dim, e = 2 (16-bit) or 4 (fp32) bytes of matmul
activations and r the bytes of the residual stream (2 for pure 16-bit, 4 for fp32 or autocast):

- each RMSNorm (2 per layer): its fp32 input ``4Th``, the normalised tensor ``rTh``, ``rsqrt`` ``4T``;
- inputs of q/k/v, o, gate/up projections: ``3eTh`` (autocast casts the input once per linear:
  q/k/v ``3eTh``, gate/up ``2eTh``);
- attention, SDPA/flash: q ``eT·ad``, k and v ``eT·kd`` each, log-sum-exp ``4aT`` (the output is the o_proj
  input); eager: q, k, v at all heads ``3eT·ad`` plus the fp32 softmax ``4as²b`` and probabilities ``eas²b``
  (in fp32 they are the same tensor);
- SwiGLU MLP: gate output, SiLU output, up output and down-projection input, ``4eTi``.

So a pure-bf16 SDPA layer with k = a saves ``T(24h + 8i + 4a + 8)`` bytes: for LLaMA-7B at 2,048 tokens,
~0.38 GB per layer. The head adds the final norm, the lm_head input and the fp32 log-probabilities of the
loss (``4TV``); the loss also makes short-lived copies of the logits: forward ``eTV`` (16-bit logits) +
``4TV`` (fp32 upcast), backward ``8TV`` (the fp32 gradients of the nll and of the log-softmax, next to the
saved log-probabilities; the 16-bit gradient of the logits appears once those are freed). With
``gradient_checkpointing`` (HF's per-decoder-layer checkpointing) each layer keeps only its input
``rTh`` and one layer is recomputed at a time during backward (its full activations).

**freed during backward** -- gradients appear while activations are being freed (the Trainer sets
gradients to None after each step), so the peak of activations + gradients is found by walking the
backward pass from the loss to the embedding, layer by layer; the difference to the plain sum is shown
as a negative line. With layer-wise updates the same walk holds, at each point, only the largest gradient of
that segment (lm_head, one decoder layer, the embedding) and its update's scratch: the loss's own peak has
no gradient yet, so the largest gradient usually shows up here as freed.

**optimizer step temporaries** -- scratch tensors of ``step()``, measured in the dry run: the meta step's
allocations are recorded as a timeline, and the most bytes alive at once of the storages that do not
survive the step (the new state does) is its scratch (torch's optimizers are run
with ``foreach=True``, their CUDA default, whose AdamW makes one moment-sized ``sqrt(v)`` for all
parameters at once, or, for ``device="cpu"``, with their CPU default, the single-tensor loop; APOLLO's are
per tensor or per block of rows, e.g. fp32 working copies of a bf16 weight, with the device's chunk size). For the analytic
optimizers: bitsandbytes 0 (fused in-place kernels), apollo-torch one full-size tensor of the largest
parameter, GaLore the larger of that and an SVD refresh of the largest target (fp32 copy + U, S, Vh).
The step runs with all gradients alive (or, layer-wise, inside backward, each update next to its own
gradient and the activations still alive at that point); the line shows how much it raises the peak.

**overhead** -- CUDA context plus library workspaces, ``CUDA_CONTEXT_BYTES`` = 0.75 GB (0.5-1 GB is typical
for CUDA 12 with cuBLAS/cuDNN on H100-class GPUs), plus ``fragmentation`` = 8 % of everything else for the
caching allocator's fragmentation (5-10 % is usual), plus, for ZeRO-3, DeepSpeed's gathered largest layer
``4 x largest-layer params``.

**ZeRO** (``zero_stage``, ``num_gpus`` = N; same structure as DeepSpeed's
``estimate_zero2/3_model_states_mem_needs``): stage 1 divides the optimizer states, fp32 master weights
and fp32 gradient partition by N; stage 2 also the 16-bit gradients; stage 3 also the 16-bit weights (and
adds the gathered largest layer). For AdamW in bf16 with master weights this reproduces DeepSpeed's
ZeRO-2 figure ``2n + 18n/N`` exactly (18 = 2 + 4 + 4 + 8); DeepSpeed's ZeRO-3 formula prints ``18n/N``
where we count ``20n/N`` (the 16-bit weights and gradients are both partitioned). Master weights default
to on under ZeRO with a 16-bit dtype (DeepSpeed always keeps them), off otherwise. APOLLO under ZeRO runs
through ``lowrank_opt.integrations.deepspeed.ZeroApollo`` (one param group per low-rank matrix): moments of
right-projected (tall/square) matrices live with their rows and are divided by N (a row cut by a shard
boundary is replicated: at most r numbers per boundary, not counted); left-projected (wide) matrices keep
their full r x n moments on every rank, so they are not divided.

All sizes are bytes; the tables print GB = 1e9 bytes (the unit of DESIGN.md's "13.5 GB of bf16 weights").
"""

from __future__ import annotations

import gc
import json
import math
import re
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..apollo import META_STANDS_FOR
from ..registry import available, build_optimizer, parse_name
from ..targets import ALL_LINEAR, TargetModules, lowrank_targets, module_matches
from .measure import optimizer_state_breakdown

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "FRAGMENTATION",
    "EXTERNAL_OPTIMIZERS",
    "KindDetail",
    "MemoryEstimate",
    "activation_bytes",
    "estimate",
    "known_configs",
    "known_optimizers",
    "resolve_config",
]

GB = 1e9
CUDA_CONTEXT_BYTES = 750_000_000
FRAGMENTATION = 0.08
CONFIG_DIRS = [Path(__file__).resolve().parents[2] / "configs", Path.cwd() / "configs"]

_DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16",
                  "float16": "fp16", "half": "fp16", "fp16": "fp16"}
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

BNB_BLOCK_SIZE = 256  # bitsandbytes Optimizer2State.init_state: blocksize = 256 for the 8-bit absmax
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes default: smaller tensors keep 32-bit state
BNB_QMAP_BYTES = 2 * 256 * 4  # the "dynamic" and "udynamic" quantisation maps, shared by all tensors


# ----------------------------------------------------------------------------------------------------------
# Optimizers that are not in the registry (Hugging Face names backed by other packages)


@dataclass(frozen=True)
class ExternalOptimizer:
    name: str
    layout: str  # "bnb8bit" | "galore" | "apollo_torch"
    defaults: dict
    layerwise: bool = False
    description: str = ""


EXTERNAL_OPTIMIZERS: dict[str, ExternalOptimizer] = {
    o.name: o
    for o in [
        ExternalOptimizer("adamw_bnb_8bit", "bnb8bit", dict(min_8bit_size=BNB_MIN_8BIT_SIZE, embeddings_32bit=True),
                          description="bitsandbytes 8-bit AdamW (HF adamw_bnb_8bit; embeddings kept 32-bit)"),
        ExternalOptimizer("paged_adamw_8bit", "bnb8bit", dict(min_8bit_size=BNB_MIN_8BIT_SIZE, embeddings_32bit=True),
                          description="paged bitsandbytes 8-bit AdamW (same bytes, pageable to host)"),
        ExternalOptimizer("galore_adamw", "galore", dict(rank=128, update_proj_gap=200, scale=0.25, proj_type="std"),
                          description="GaLore AdamW (galore-torch, HF galore_adamw; SVD projection)"),
        ExternalOptimizer("galore_adamw_layerwise", "galore",
                          dict(rank=128, update_proj_gap=200, scale=0.25, proj_type="std"), layerwise=True,
                          description="GaLore AdamW, HF layer-wise variant"),
        ExternalOptimizer("apollo_adamw", "apollo_torch",
                          dict(rank=128, proj="random", scale_type="channel", update_proj_gap=200, scale=1.0,
                               proj_type="std"),
                          description="apollo-torch APOLLOAdamW (HF apollo_adamw; caches P)"),
        ExternalOptimizer("apollo_adamw_layerwise", "apollo_torch",
                          dict(rank=128, proj="random", scale_type="channel", update_proj_gap=200, scale=1.0,
                               proj_type="std"), layerwise=True,
                          description="apollo-torch APOLLOAdamW, HF layer-wise variant"),
    ]
}

ALIASES = {  # name -> (canonical name, options it implies)
    "adamw_torch": ("adamw", {}),
    "adamw_torch_fused": ("adamw", {"fused": True}),
    "adamw_8bit": ("adamw_bnb_8bit", {}),
    "adamw_bnb": ("adamw_bnb_8bit", {}),
    "galore": ("galore_adamw", {}),
    "galore_layerwise": ("galore_adamw_layerwise", {}),
}


def known_optimizers() -> list[str]:
    """Every optimizer name :func:`estimate` takes (registry names also with ``_capped``)."""
    return sorted(set(available()) | set(EXTERNAL_OPTIMIZERS) | set(ALIASES))


def _unknown_optimizer(name: str) -> ValueError:
    return ValueError(f"unknown optimizer {name!r}; known: {', '.join(known_optimizers())} "
                      f"(registry names also as NAME_capped)")


def _resolve_optimizer(name: str) -> tuple[str, Any, bool, dict]:
    """(canonical name, OptimizerSpec or ExternalOptimizer, capped, options implied by an alias)."""
    if not isinstance(name, str) or not name.strip():
        raise _unknown_optimizer(name)
    key = name.strip().lower()
    key, implied = ALIASES.get(key, (key, {}))
    if key in EXTERNAL_OPTIMIZERS:
        return key, EXTERNAL_OPTIMIZERS[key], False, dict(implied)
    try:
        spec, capped = parse_name(key)
    except ValueError:
        raise _unknown_optimizer(name) from None
    return spec.name, spec, capped, dict(implied)


# ----------------------------------------------------------------------------------------------------------
# Configs


def known_configs() -> list[str]:
    names = set()
    for d in CONFIG_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.json"))
    return sorted(names)


def resolve_config(config: Any):
    """A ``transformers.PretrainedConfig`` from a config object, a JSON path, a directory with a
    config.json, or a name in configs/ (``"llama_7b"``)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, dict):
        from transformers import CONFIG_MAPPING

        data = dict(config)
        return CONFIG_MAPPING[data.pop("model_type", "llama")](**data)
    if not isinstance(config, (str, Path)):
        raise TypeError(f"config must be a PretrainedConfig, a path or a name, got {type(config).__name__}")
    text = str(config)
    candidates = [Path(text)]
    for d in CONFIG_DIRS:
        candidates += [d / text, d / f"{text}.json"]
    for path in candidates:
        if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
            return AutoConfig.from_pretrained(str(path))
    raise ValueError(f"unknown config {text!r}: give a transformers config JSON file or directory, or one of: "
                     f"{', '.join(known_configs()) or '(no configs/ directory found)'}")


def _config_label(config: Any, resolved) -> str:
    if isinstance(config, (str, Path)):
        return Path(str(config)).stem if str(config).endswith(".json") else str(config)
    return getattr(resolved, "name_or_path", "") or getattr(resolved, "model_type", "model")


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model


# ----------------------------------------------------------------------------------------------------------
# Dry-running an optimizer step on meta tensors


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


def _split_cap_options(options: dict) -> tuple[dict, dict]:
    cap = {k[len("cap_"):]: options.pop(k) for k in list(options) if k.startswith("cap_")}
    return options, cap


def _registry_states(key: str, spec, capped: bool, model: nn.Module, options: dict,
                     target_modules: Optional[TargetModules], foreach: bool = True,
                     device: str = "cuda") -> tuple[dict, int, dict, Any, int]:
    """Per-parameter state bytes of a registry optimizer after one dry-run step on meta tensors (standing for
    ``device``), and the most bytes of that step's scratch tensors alive at once."""
    options, cap = _split_cap_options(dict(options))
    valid = spec.options()
    if "layerwise" in valid:
        options["layerwise"] = False  # same state; no backward hooks needed for a dry run
    if "foreach" in valid and "fused" in valid:
        # torch's own optimizers: on CUDA the default is the foreach implementation (fused only when asked);
        # meta tensors would take the single-tensor loop. Fused kernels make no temporaries, which the
        # single-tensor loop approximates from above; so does one optimizer per parameter (layer-wise,
        # ``foreach=False`` here). The states are the same either way.
        fused = bool(options.pop("fused", False))
        if fused:
            options["foreach"] = False
        else:
            options.setdefault("foreach", foreach)
    if cap and not capped:
        raise ValueError(f"optim_args {', '.join('cap_' + k for k in cap)} need a *_capped optimizer name")
    optimizer = build_optimizer(key + ("_capped" if capped else ""), model,
                                target_modules=(target_modules or ALL_LINEAR) if spec.lowrank else None,
                                norm_growth_cap=cap if capped else None, **options)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.empty_like(p)
    token = META_STANDS_FOR.set(device)  # APOLLO's chunk size on that device
    try:
        with meta_dry_run(track_allocations=True) as mode:
            optimizer.step()  # creates the state; everything else it allocates is scratch
            gc.collect()
            temporaries = mode.temporaries_peak()
    finally:
        META_STANDS_FOR.reset(token)
    breakdown = optimizer_state_breakdown(optimizer)
    for p in model.parameters():
        p.grad = None
    sources = {("states" if src == "state" else f"cache ({src.lstrip('_')})"): b
               for src, b in breakdown.by_source.items()}
    return dict(breakdown), breakdown.unattributed, sources, optimizer, temporaries


_DRY_RUNS: dict = {}  # dry-run results per (config, optimizer, options, dtype, targets), by parameter name
_DRY_RUNS_MAX = 32


def _dry_run_key(config, spec, capped: bool, options: dict, dtype: torch.dtype, target_modules) -> str:
    """What a dry run's result depends on: the model, the optimizer class and its effective options (the
    layer-wise flag aside: same state), the parameters' dtype and the low-rank targets."""
    effective = {**spec.defaults, **options}
    effective.pop("layerwise", None)
    return json.dumps([config.to_json_string(use_diff=False), f"{spec.cls.__module__}.{spec.cls.__qualname__}",
                       capped, sorted((k, repr(v)) for k, v in effective.items()), str(dtype),
                       repr(target_modules) if spec.lowrank else None])


def _remember_dry_run(key: str, value: tuple) -> None:
    if len(_DRY_RUNS) >= _DRY_RUNS_MAX:
        _DRY_RUNS.pop(next(iter(_DRY_RUNS)))
    _DRY_RUNS[key] = value


def _hf_targets(model: nn.Module, target_modules: Optional[TargetModules]) -> list[tuple[str, nn.Parameter]]:
    """Hugging Face's ``_setup_low_rank_optimizer`` rule: only ``nn.Linear`` modules; ``all-linear`` takes
    every one of them, lm_head included."""
    targets = target_modules or ALL_LINEAR
    all_linear = isinstance(targets, str) and targets.replace("_", "-").lower() == ALL_LINEAR
    if not isinstance(targets, str):
        targets = list(targets)
    chosen = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (all_linear or module_matches(targets, name)):
            chosen.append((name + ".weight", module.weight))
    if not chosen:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear module")
    return chosen


_EXTERNAL_KEYS = {
    "bnb8bit": {"min_8bit_size", "embeddings_32bit", "optim_bits", "is_paged"},
    "galore": {"rank", "update_proj_gap", "scale", "proj_type"},
    "apollo_torch": {"rank", "proj", "scale_type", "update_proj_gap", "scale", "proj_type"},
}


def _external_states(ext: ExternalOptimizer, model: nn.Module, options: dict,
                     target_modules: Optional[TargetModules]) -> tuple[dict, int, dict, dict, int]:
    """Analytic state bytes per parameter (see the module docstring), shared bytes, bytes per source,
    treatment per parameter, and the step's temporaries (largest at once)."""
    unknown = sorted(set(options) - _EXTERNAL_KEYS[ext.layout])
    if unknown:
        raise ValueError(f"unknown optim_args key(s) {', '.join(map(repr, unknown))} for {ext.name}; valid: "
                         f"{', '.join(sorted(_EXTERNAL_KEYS[ext.layout]))}")
    opts = {**ext.defaults, **options}
    per_param: dict[int, int] = {}
    treatment: dict[int, str] = {}
    shared = 0
    sources: dict[str, int] = {}
    if ext.layout == "bnb8bit":
        if int(opts.get("optim_bits", 8)) != 8:
            raise ValueError("adamw_bnb_8bit: optim_bits must be 8 (use adamw for 32-bit states)")
        embeddings = set()
        if opts["embeddings_32bit"]:
            embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        any8 = False
        for p in _unique_params(model):
            n = p.numel()
            if id(p) in embeddings or n < int(opts["min_8bit_size"]):
                per_param[id(p)] = 2 * n * 4
                treatment[id(p)] = "32-bit AdamW"
            else:
                per_param[id(p)] = 2 * n + 2 * math.ceil(n / BNB_BLOCK_SIZE) * 4
                treatment[id(p)] = "8-bit AdamW"
                any8 = True
        shared = BNB_QMAP_BYTES if any8 else 0
        sources = {"states": sum(per_param.values()) + shared}
        return per_param, shared, sources, treatment, 0  # fused in-place update kernels: no temporaries
    targets = {id(p) for _, p in _hf_targets(model, target_modules)}
    rank = int(opts["rank"])
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    proj_type = opts["proj_type"]
    if proj_type not in ("std", "reverse_std", "right", "left"):
        raise ValueError(f"proj_type must be std, reverse_std, right or left, got {proj_type!r}")
    if ext.layout == "apollo_torch" and opts.get("proj", "random") not in ("random", "svd"):
        raise ValueError(f"proj must be 'random' or 'svd', got {opts.get('proj')!r}")
    svd = ext.layout == "galore" or opts.get("proj") == "svd"
    moments = projections = temporaries = 0
    for p in _unique_params(model):
        pb = p.element_size()
        # One full-size temporary per update (AdamW's denominator, APOLLO's scaled gradient, GaLore's
        # projected-back update), in the parameter dtype.
        temporaries = max(temporaries, p.numel() * pb)
        if id(p) not in targets or p.ndim != 2:
            per_param[id(p)] = 2 * p.numel() * pb
            treatment[id(p)] = "AdamW"
            moments += per_param[id(p)]
            continue
        m, n = p.shape
        if svd:  # a refresh step: fp32 copy of the gradient (unless fp32) + U, S, Vh of the reduced SVD
            k = min(m, n)
            temporaries = max(temporaries, (0 if p.dtype == torch.float32 else 4 * m * n) + 4 * (m * k + k + k * n))
        side = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right",
                "right": "right", "left": "left"}[proj_type]
        r = min(rank, m, n) if svd else rank  # SVD truncates to min(m, n); a random projection does not
        moment = m * r if side == "right" else r * n
        if svd and p.dtype == torch.float32:
            # galore-torch keeps P as a view (Vh[:r, :] or U[:, :r]) of the fp32 SVD factor, which keeps the
            # whole factor alive: min(m, n) x n (right) or m x min(m, n) (left). Other dtypes copy r rows.
            proj = min(m, n) * n if side == "right" else m * min(m, n)
        else:
            proj = r * n if side == "right" else m * r
        limiter = pb if ext.layout == "apollo_torch" else 0  # apollo-torch's 0-d "scaled_grad" norm
        per_param[id(p)] = (2 * moment + proj) * pb + limiter
        moments += 2 * moment * pb + limiter
        projections += proj * pb
        treatment[id(p)] = f"low-rank r={r}" + (" (SVD)" if svd else "")
    sources = {"states": moments, "cache (projection)": projections}
    return per_param, shared, sources, treatment, temporaries


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------------
# Activations


@dataclass
class ActivationBreakdown:
    """Bytes saved for backward (per GPU, one micro-batch)."""

    per_layer: int  # a decoder layer's saved tensors without checkpointing
    per_layer_kept: int  # what each layer keeps until its backward (its input with checkpointing)
    layers: int
    head: int  # final norm + lm_head input + fp32 log-probabilities of the loss
    base: int  # rotary cos/sin, token ids, labels
    logits_forward: int  # short-lived: 16-bit logits and their fp32 upcast
    logits_backward: int  # short-lived: gradients of the log-probabilities and logits
    recompute: int  # with checkpointing: one layer's full activations during its backward

    @property
    def peak(self) -> int:
        return self.base + self.layers * self.per_layer_kept + max(
            self.head + max(self.logits_forward, self.logits_backward), self.recompute)


def activation_bytes(config, *, batch_size: int, seq_len: int, dtype: str = "bf16", autocast: bool = False,
                     gradient_checkpointing: bool = False, attn_implementation: str = "sdpa") -> ActivationBreakdown:
    """Activation memory of a LLaMA-style decoder (see the module docstring for every term).

    ``dtype`` is the matmul activation dtype; ``autocast`` means fp32 weights and residual stream with
    16-bit matmuls (torch autocast, the HF Trainer's ``--bf16`` on an fp32 model)."""
    dtype = _canonical_dtype(dtype)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = int(text.hidden_size)
    a = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or a)
    d = int(getattr(text, "head_dim", None) or h // a)
    i = int(getattr(text, "intermediate_size", None) or 4 * h)
    n_layers = int(text.num_hidden_layers)
    vocab = int(text.vocab_size)
    b, s = int(batch_size), int(seq_len)
    tokens = b * s
    e = _DTYPES[dtype]
    r = 4 if (e == 4 or autocast) else e
    norm = (4 + r) * tokens * h + 4 * tokens
    attn_in = (3 if autocast else 1) * e * tokens * h
    mlp_in = (2 if autocast else 1) * e * tokens * h
    if attn_implementation == "eager":
        core = 3 * e * tokens * a * d + (4 + (e if e != 4 else 0)) * a * s * s * b
    elif attn_implementation in ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"):
        core = e * tokens * (a * d + 2 * kv * d) + 4 * a * tokens
    else:
        raise ValueError(f"attn_implementation must be sdpa, eager or flash_attention_2, got {attn_implementation!r}")
    o_in = e * tokens * a * d
    mlp = 4 * e * tokens * i
    per_layer = 2 * norm + attn_in + core + o_in + mlp_in + mlp
    head = norm + e * tokens * h + 4 * tokens * vocab
    base = 2 * s * d * r + 16 * tokens + 4
    upcast = 4 * tokens * vocab if e != 4 else 0
    logits_forward = e * tokens * vocab + upcast
    # The loss backward's peak: the fp32 gradients of the nll and of the log-softmax, next to the saved
    # log-probabilities (in ``head``); the 16-bit gradient of the logits comes after those two are freed.
    logits_backward = 8 * tokens * vocab
    kept = r * tokens * h if gradient_checkpointing else per_layer
    return ActivationBreakdown(per_layer=per_layer, per_layer_kept=kept, layers=n_layers, head=head, base=base,
                               logits_forward=logits_forward, logits_backward=logits_backward,
                               recompute=per_layer if gradient_checkpointing else 0)


# ----------------------------------------------------------------------------------------------------------
# The result


@dataclass
class KindDetail:
    """Bytes per parameter kind (embedding, attention, mlp, norm/bias, lm_head, other), per GPU."""

    kind: str
    tensors: int
    params: int
    weights: int
    gradients: int
    optimizer_states: int
    treatment: str


@dataclass
class MemoryEstimate:
    """Estimated training memory per GPU, in bytes (see the module docstring for every formula).

    ``total = weights + gradients + optimizer_states + activations - freed_during_backward + step_temporaries
    + overhead``.
    ``components`` splits each category further; ``kinds`` gives per-parameter-kind detail."""

    model: str
    optimizer: str
    optim_args: dict
    n_params: int
    dtype: str
    master_weights: bool
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    layerwise: bool
    zero_stage: int
    num_gpus: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    freed_during_backward: int
    step_temporaries: int
    overhead: int
    total: int
    components: dict = field(default_factory=dict)
    kinds: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cuda"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_gb"] = round(self.total / GB, 3)
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    # -- text ------------------------------------------------------------------------------------------

    def title(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.optim_args.items())
        prec = self.dtype + (" + fp32 master" if self.master_weights else "")
        extra = []
        if self.gradient_checkpointing:
            extra.append("gradient checkpointing")
        if self.layerwise:
            extra.append("layer-wise updates")
        if self.zero_stage:
            extra.append(f"ZeRO-{self.zero_stage} x {self.num_gpus} GPUs")
        if self.device != "cuda":
            extra.append(f"on {self.device}")
        return (f"{self.model} ({self.n_params / 1e9:.2f} B params), {self.optimizer}"
                f"{'(' + args + ')' if args else ''}, {prec}, batch {self.batch_size} x {self.seq_len} tokens"
                + (", " + ", ".join(extra) if extra else ""))

    def rows(self) -> list[tuple[str, int, str]]:
        def sub(prefix: str) -> str:
            return ", ".join(f"{k.split('.', 1)[1]} {v / GB:.2f}" for k, v in self.components.items()
                             if k.startswith(prefix + ".") and v)

        return [
            ("weights", self.weights, sub("weights")),
            ("gradients", self.gradients, sub("gradients")),
            ("optimizer states", self.optimizer_states, sub("optimizer_states")),
            ("activations", self.activations, sub("activations")),
            ("freed during backward", -self.freed_during_backward, "activations freed as gradients appear"),
            ("optimizer step temporaries", self.step_temporaries, "raise of the peak by the step's scratch tensors"),
            ("overhead", self.overhead, sub("overhead")),
            ("total (peak per GPU)" if self.device == "cuda" else "total (peak live tensors)", self.total, ""),
        ]

    def table(self, detail: bool = False) -> str:
        lines = [f"Training memory estimate: {self.title()}", f"  {'':28s}{'GB':>9s}"]
        for label, value, note in self.rows():
            if label.startswith("total"):
                lines.append("  " + "-" * 37)
            lines.append(f"  {label:28s}{value / GB:9.2f}" + (f"   ({note})" if note else ""))
        if detail:
            lines.append("")
            lines.append(f"  {'kind':12s}{'tensors':>8s}{'params (M)':>12s}{'weights':>9s}{'grads':>9s}"
                         f"{'states':>9s}   optimizer")
            for k in self.kinds:
                lines.append(f"  {k['kind']:12s}{k['tensors']:8d}{k['params'] / 1e6:12.1f}{k['weights'] / GB:9.3f}"
                             f"{k['gradients'] / GB:9.3f}{k['optimizer_states'] / GB:9.3f}   {k['treatment']}")
        if self.notes:
            lines.append("")
            lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def compare_table(estimates: list[MemoryEstimate]) -> str:
    """Several estimates side by side (one column each), in GB."""
    if not estimates:
        return ""
    first = estimates[0]
    same_layerwise = len({e.layerwise for e in estimates}) == 1
    names = [e.optimizer + (" (layer-wise)" if e.layerwise and not same_layerwise else "") for e in estimates]
    for i, e in enumerate(estimates):
        if names.count(names[i]) > 1 and e.optim_args:  # same optimizer, different options
            names[i] += "(" + ",".join(f"{k}={v}" for k, v in e.optim_args.items() if k != "rank" or not e.layerwise) + ")"
    width = max(12, *(len(n) + 2 for n in names))
    head = (f"{first.model} ({first.n_params / 1e9:.2f} B params), {first.dtype}"
            f"{' + fp32 master' if first.master_weights else ''}, batch {first.batch_size} x {first.seq_len} tokens"
            f"{', gradient checkpointing' if first.gradient_checkpointing else ''}"
            f"{', layer-wise updates' if same_layerwise and first.layerwise else ''}"
            f"{f', ZeRO-{first.zero_stage} x {first.num_gpus} GPUs' if first.zero_stage else ''}"
            f"{f', on {first.device}' if first.device != 'cuda' else ''}  (GB)")
    lines = [head, f"  {'':28s}" + "".join(f"{n:>{width}s}" for n in names)]
    for idx, (label, _, _) in enumerate(first.rows()):
        if label.startswith("total"):
            lines.append("  " + "-" * (28 + width * len(names)))
        lines.append(f"  {label:28s}" + "".join(f"{e.rows()[idx][1] / GB:>{width}.2f}" for e in estimates))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# estimate()


def _canonical_dtype(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    key = _DTYPE_ALIASES.get(str(dtype).lower())
    if key is None:
        raise ValueError(f"dtype must be one of fp32, bf16, fp16, got {dtype!r}")
    return key


def _parse_options(optim_args: Union[None, str, dict]) -> dict:
    from ..integrations.hf import parse_optim_args

    return parse_optim_args(optim_args)


def _kind_of(model: nn.Module) -> tuple[dict[int, str], dict[int, str]]:
    """(id(param) -> kind, id(param) -> name), tied parameters under their first owner."""
    try:
        out_emb = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        out_emb = None
    kinds: dict[int, str] = {}
    names: dict[int, str] = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(prefix=mname, recurse=False):
            if id(p) in kinds:
                continue
            low = mname.lower()
            if isinstance(module, nn.Embedding):
                kind = "embedding"
            elif module is out_emb:
                kind = "lm_head"
            elif p.ndim < 2:
                kind = "norm/bias"
            elif "attn" in low or "attention" in low:
                kind = "attention"
            elif "mlp" in low or "feed_forward" in low or "ffn" in low:
                kind = "mlp"
            else:
                kind = "other"
            kinds[id(p)] = kind
            names[id(p)] = pname
    return kinds, names


_LAYER_RE = re.compile(r"\blayers?\.(\d+)\.|\bh\.(\d+)\.|\bblocks?\.(\d+)\.")


def _segment(name: str, kind: str) -> tuple[str, int]:
    """Where a parameter's gradient appears in the backward pass: ("head", 0), ("layer", index) or ("end", 0)."""
    m = _LAYER_RE.search(name)
    if m:
        return "layer", int(next(g for g in m.groups() if g is not None))
    if kind == "embedding":
        return "end", 0
    return "head", 0


def _largest_layer_params(model: nn.Module) -> int:
    # DeepSpeed's model_to_params: the largest module's own (non-recursive) parameters.
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def estimate(
    config: Any,
    optimizer: str = "apollo",
    optim_args: Union[None, str, dict] = None,
    target_modules: Optional[TargetModules] = ALL_LINEAR,
    dtype: str = "bf16",
    batch_size: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = False,
    layerwise: Optional[bool] = None,
    zero_stage: int = 0,
    num_gpus: int = 1,
    master_weights: Optional[bool] = None,
    *,
    attn_implementation: str = "sdpa",
    device: str = "cuda",
    cuda_context_bytes: Optional[int] = None,
    fragmentation: Optional[float] = None,
) -> MemoryEstimate:
    """Estimate per-GPU training memory for ``config`` and ``optimizer`` without allocating the model.

    Args:
        config: a ``PretrainedConfig``, a config JSON path (or directory), or a name in configs/
            (``"llama_7b"``).
        optimizer: a registry name (``lowrank_opt.registry.available()``, optionally ``_capped``) or one of
            Hugging Face's ``adamw_bnb_8bit`` (alias ``adamw_8bit``), ``paged_adamw_8bit``, ``galore_adamw``
            (alias ``galore``), ``apollo_adamw`` and their ``_layerwise`` variants; ``adamw_torch`` is
            ``adamw``. See :func:`known_optimizers`.
        optim_args: the optimizer's options over its defaults, as a dict or HF's "k=v,k=v" string
            (``"rank=256,state_dtype=bfloat16"``); ``cap_*`` keys go to NormGrowthCap for ``*_capped``.
        target_modules: the low-rank matrices (names, regexes, ``"all-linear"``) of low-rank optimizers.
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``: weights (and activations).
        batch_size, seq_len: the per-GPU micro-batch.
        gradient_checkpointing: HF's per-decoder-layer activation checkpointing.
        layerwise: per-parameter updates inside backward (gradients freed at once). ``None``: as the
            optimizer name says (``apollo_layerwise``, ``*_layerwise``).
        zero_stage, num_gpus: DeepSpeed ZeRO stage (0-3) and data-parallel GPUs; figures are per GPU.
        master_weights: keep fp32 master weights for a 16-bit ``dtype`` (mixed precision). ``None``: on
            under ZeRO (DeepSpeed keeps them), off otherwise (pure 16-bit training).
        attn_implementation: ``"sdpa"`` (also flash attention) or ``"eager"`` (stores the s x s scores).
        device: ``"cuda"`` (GPUs: the default) or ``"cpu"``, what the step's code paths and the overhead are
            taken for: on CPU torch's optimizers run their single-tensor loop (their CPU default) instead of
            foreach, APOLLO updates in 2^20- instead of 2^24-element pieces, and there is no CUDA context or
            caching-allocator fragmentation (the overhead is 0: the total is the peak of live tensor bytes,
            not the process's RSS, which adds Python, torch and the allocator's own caching).
        cuda_context_bytes, fragmentation: the overhead model (``None``: ``CUDA_CONTEXT_BYTES`` and
            ``FRAGMENTATION`` on ``"cuda"``, 0 on ``"cpu"``).

    Returns:
        a :class:`MemoryEstimate` (bytes; ``.table()``, ``.to_dict()``).
    """
    started = time.perf_counter()
    dtype = _canonical_dtype(dtype)
    key, spec, capped, implied = _resolve_optimizer(optimizer)
    options = {**implied, **_parse_options(optim_args)}
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if cuda_context_bytes is None:
        cuda_context_bytes = CUDA_CONTEXT_BYTES if device == "cuda" else 0
    if fragmentation is None:
        fragmentation = FRAGMENTATION if device == "cuda" else 0.0
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if int(num_gpus) < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus!r}")
    for label, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if int(value) < 1:
            raise ValueError(f"{label} must be >= 1, got {value!r}")
    num_gpus = int(num_gpus)
    name_layerwise = spec.layerwise if isinstance(spec, ExternalOptimizer) else bool(
        options.get("layerwise", spec.defaults.get("layerwise", False)))
    if layerwise is None:
        layerwise = name_layerwise
    elif name_layerwise and not layerwise:
        raise ValueError(f"optimizer {optimizer!r} updates layer-wise; drop layerwise=False or pick the "
                         f"non-layer-wise optimizer")
    layerwise = bool(layerwise)
    if layerwise and num_gpus > 1:
        raise ValueError("layer-wise updates run before gradients could be all-reduced: they cannot be combined "
                         f"with data parallelism over {num_gpus} GPUs (train.py refuses it too)")
    sixteen = dtype in ("bf16", "fp16")
    if master_weights is None:
        master_weights = sixteen and zero_stage >= 1
    master_weights = bool(master_weights) and sixteen
    autocast = master_weights and zero_stage == 0

    resolved = resolve_config(config)
    model = _meta_model(resolved)
    # The dtype of the parameters the optimizer sees: the fp32 masters in mixed precision.
    opt_dtype = torch.float32 if (master_weights or not sixteen) else _TORCH_DTYPES[dtype]
    model.to(opt_dtype)
    params = _unique_params(model)
    n_params = sum(p.numel() for p in params)
    kinds, names = _kind_of(model)
    notes: list[str] = []

    # -- optimizer states -----------------------------------------------------------------------------
    if isinstance(spec, ExternalOptimizer):
        state_by_param, unattributed, sources, treatment, step_temp = _external_states(spec, model, options,
                                                                                     target_modules)
        shown_args = {k: v for k, v in {**spec.defaults, **options}.items()}
        if spec.layout in ("galore", "apollo_torch") and (target_modules or ALL_LINEAR) == ALL_LINEAR:
            notes.append(f"{key}: HF's all-linear targets every nn.Linear, lm_head included")
    else:
        if spec.lowrank:
            lowrank = {id(p) for _, p in lowrank_targets(model, target_modules or ALL_LINEAR)}
        else:
            lowrank = set()
        # torch's optimizers default to foreach on CUDA, to their single-tensor loop on CPU.
        foreach = not layerwise and device == "cuda"
        cache_key = _dry_run_key(resolved, spec, capped, {**options, "_foreach": foreach, "_device": device},
                                 opt_dtype, target_modules)
        cached = _DRY_RUNS.get(cache_key)
        if cached is None:
            by_id, unattributed, sources, opt, step_temp = _registry_states(key, spec, capped, model, options,
                                                                            target_modules, foreach=foreach,
                                                                            device=device)
            ranks = {names[id(p)]: group.get("rank") for group in opt.param_groups for p in group["params"]}
            cached = ({names[i]: b for i, b in by_id.items()}, unattributed, sources, ranks, step_temp)
            _remember_dry_run(cache_key, cached)
        by_name, unattributed, sources, ranks, step_temp = cached
        state_by_param = {id(p): by_name.get(names[id(p)], 0) for p in params}
        treatment = {}
        for p in params:
            rank = ranks.get(names[id(p)])
            if id(p) in lowrank and p.ndim >= 2 and rank is not None:
                treatment[id(p)] = f"low-rank rank={rank}"
            elif spec.lowrank:
                treatment[id(p)] = "AdamW"
            else:
                treatment[id(p)] = spec.cls.__name__
        if capped:
            treatment = {k: v + " + NormGrowthCap" for k, v in treatment.items()}
        shown_args = dict(options)
        if spec.lowrank and "rank" not in shown_args:
            shown_args = {"rank": spec.defaults.get("rank"), **shown_args}
        if spec.cls is torch.optim.AdamW and opt_dtype != torch.float32:
            notes.append("torch.optim.AdamW keeps its moments in the parameter dtype; with fp32 master weights "
                         "(master_weights=True) they are fp32 (8 bytes/param)")

    # -- weights and gradients, per parameter ---------------------------------------------------------
    wb = _DTYPES[dtype]
    n1 = num_gpus if zero_stage >= 1 else 1
    n2 = num_gpus if zero_stage >= 2 else 1
    n3 = num_gpus if zero_stage >= 3 else 1
    if not sixteen:
        grad_model_bytes, grad_master_bytes = 4, 0  # fp32 gradients on fp32 weights
    elif not master_weights:
        grad_model_bytes, grad_master_bytes = 2, 0
    elif zero_stage == 0:
        grad_model_bytes, grad_master_bytes = 0, 4  # autocast: fp32 grads on the fp32 parameters
    else:
        grad_model_bytes, grad_master_bytes = 2, 4  # DeepSpeed: 16-bit grads + fp32 gradient partition
    per_param_grad = {id(p): p.numel() * (grad_model_bytes / n2 + grad_master_bytes / n1) for p in params}
    largest_grad = max(per_param_grad.values(), default=0)

    weights_model = n_params * wb / n3
    weights_master = n_params * 4 / n1 if master_weights else 0
    weights = weights_model + weights_master
    gradients_all = sum(per_param_grad.values())
    gradients = largest_grad if layerwise else gradients_all
    # ZeRO partitions optimizer state by N, except (lowrank_opt.integrations.deepspeed.ZeroApollo) the r x n
    # moments of a left-projected (wide) matrix, which every rank holds in full.
    replicated: set[int] = set()
    if n1 > 1 and not isinstance(spec, ExternalOptimizer) and spec.lowrank:
        from ..projection import LEFT, matrix_shape, orientation

        sort_dims = bool({**spec.defaults, **options}.get("sort_dims", True))
        for p in params:
            if treatment.get(id(p), "").startswith("low-rank") and orientation(matrix_shape(p.shape), sort_dims) == LEFT:
                replicated.add(id(p))
    state_share = {id(p): state_by_param.get(id(p), 0) / (1 if id(p) in replicated else n1) for p in params}
    optimizer_states = sum(state_share.values()) + unattributed / n1

    # -- activations and the backward walk ------------------------------------------------------------
    act = activation_bytes(resolved, batch_size=batch_size, seq_len=seq_len, dtype=dtype, autocast=autocast,
                           gradient_checkpointing=gradient_checkpointing, attn_implementation=attn_implementation)
    activations = act.peak
    seg_grad: dict[tuple[str, int], float] = {}  # gradient bytes per segment of the backward pass
    seg_largest: dict[tuple[str, int], float] = {}  # its largest single gradient (layer-wise updates)
    for p in params:
        seg = _segment(names.get(id(p), ""), kinds.get(id(p), "other"))
        seg_grad[seg] = seg_grad.get(seg, 0) + per_param_grad[id(p)]
        seg_largest[seg] = max(seg_largest.get(seg, 0), per_param_grad[id(p)])
    step_temp = step_temp / n1
    layer_ids = sorted({i for (s, i) in seg_grad if s == "layer"}, reverse=True)
    n_layers = act.layers
    kept = act.per_layer_kept
    top = act.base + n_layers * kept + act.head  # every activation of the forward pass, before the loss
    loss_peaks = [top + act.logits_forward, top + act.logits_backward]  # the loss forward; its backward
    if layerwise:
        # The same walk down the backward pass, but only the gradient being updated is alive, together with
        # that update's scratch (each update runs inside backward): the largest gradient of each segment.
        updates = [top + seg_largest.get(("head", 0), 0)]
        for position, layer in enumerate(layer_ids):
            remaining_layers = n_layers - position
            updates.append(act.base + remaining_layers * kept + act.recompute + seg_largest[("layer", layer)])
        updates.append(act.base + seg_largest.get(("end", 0), 0))
        peak_bwd = max(loss_peaks + updates)
        peak_ag = max(loss_peaks + [u + step_temp for u in updates])
    else:
        g_head = seg_grad.get(("head", 0), 0)
        candidates = loss_peaks + [top + g_head]  # the lm_head gradient appears
        done = g_head
        for position, layer in enumerate(layer_ids):
            remaining_layers = n_layers - position  # this layer and those below it still hold activations
            done += seg_grad.get(("layer", layer), 0)
            candidates.append(act.base + remaining_layers * kept + act.recompute + done)
        candidates.append(gradients_all)
        peak_bwd = max(candidates)
        peak_ag = max(peak_bwd, gradients_all + step_temp)  # the optimizer step: all gradients + its temporaries
    freed = max(0.0, activations + gradients - peak_bwd)
    step_extra = peak_ag - peak_bwd

    # -- overhead -------------------------------------------------------------------------------------
    gather = 4 * _largest_layer_params(model) if zero_stage == 3 else 0
    base_total = weights + optimizer_states + peak_ag + gather
    fragmentation_bytes = fragmentation * base_total
    overhead = cuda_context_bytes + gather + fragmentation_bytes
    total = base_total + cuda_context_bytes + fragmentation_bytes

    # -- components, kinds, notes ---------------------------------------------------------------------
    components: dict[str, int] = {}
    components[f"weights.{dtype}"] = int(weights_model)
    if master_weights:
        components["weights.fp32 master"] = int(weights_master)
    if layerwise:
        components["gradients.largest tensor"] = int(largest_grad)
    else:
        if grad_model_bytes:
            components[f"gradients.{'fp32' if not sixteen else dtype}"] = int(n_params * grad_model_bytes / n2)
        if grad_master_bytes:
            components["gradients.fp32"] = int(n_params * grad_master_bytes / n1)
    low_full = sum(v for k, v in state_by_param.items() if treatment.get(k, "").startswith("low-rank"))
    low = sum(v for k, v in state_share.items() if treatment.get(k, "").startswith("low-rank"))
    cache_full = sum(v for s, v in sources.items() if s.startswith("cache"))
    cache = cache_full * (low / low_full) if low_full else cache_full / n1  # caches belong to low-rank matrices
    if low:
        components["optimizer_states.low-rank"] = int(low - cache)
        components["optimizer_states.dense"] = int(sum(state_share.values()) - low)
    else:
        components["optimizer_states.moments"] = int(sum(state_share.values()) - cache)
    if cache:
        components["optimizer_states.projection cache"] = int(cache)
    if unattributed:
        components["optimizer_states.shared"] = int(unattributed / n1)
    components["activations.layers"] = int(act.base + act.layers * act.per_layer_kept)
    head_and_loss = act.head + max(act.logits_forward, act.logits_backward)
    if act.recompute > head_and_loss:  # checkpointing: the recomputed layer outweighs the loss
        components["activations.recomputed layer"] = int(act.recompute)
    else:
        components["activations.head+loss"] = int(head_and_loss)
    components["step.scratch tensors"] = int(step_temp)
    components["overhead.cuda context"] = int(cuda_context_bytes)
    components["overhead.fragmentation"] = int(fragmentation_bytes)
    if gather:
        components["overhead.zero-3 gathered layer"] = int(gather)

    kind_rows: dict[str, dict] = {}
    for p in params:
        k = kinds.get(id(p), "other")
        row = kind_rows.setdefault(k, dict(kind=k, tensors=0, params=0, weights=0, gradients=0, optimizer_states=0,
                                           treatment=set()))
        row["tensors"] += 1
        row["params"] += p.numel()
        row["weights"] += p.numel() * (wb / n3 + (4 / n1 if master_weights else 0))
        row["gradients"] += 0 if layerwise else per_param_grad[id(p)]
        row["optimizer_states"] += state_share[id(p)]
        row["treatment"].add(treatment.get(id(p), ""))
    order = ["embedding", "attention", "mlp", "norm/bias", "lm_head", "other"]
    kind_list = []
    for k in sorted(kind_rows, key=lambda k: order.index(k) if k in order else len(order)):
        row = kind_rows[k]
        row["treatment"] = " + ".join(sorted(t for t in row["treatment"] if t))
        for f in ("weights", "gradients", "optimizer_states"):
            row[f] = int(row[f])
        kind_list.append(asdict(KindDetail(**row)))

    if zero_stage and not isinstance(spec, ExternalOptimizer) and spec.lowrank:
        notes.append("ZeRO (lowrank_opt.integrations.deepspeed.ZeroApollo, one param group per low-rank matrix): "
                     "moments of right-projected (tall/square) matrices are partitioned by row; left-projected "
                     "(wide) matrices keep their full r x n moments on every rank"
                     + (f" ({len(replicated)} here)" if replicated else ""))
    if zero_stage == 3:
        notes.append("ZeRO-3: 16-bit weights and gradients are both partitioned (20n/N bytes for AdamW; "
                     "DeepSpeed's own estimator prints 18n/N) plus 4 x the largest layer, gathered")
    if layerwise:
        notes.append("layer-wise: each gradient is freed right after its update, so at most the largest one "
                     "(here %.2f GB) is alive" % (largest_grad / GB))
    cfg_type = getattr(resolved, "model_type", "")
    if cfg_type not in ("llama", "mistral", "qwen2", "qwen3"):
        notes.append(f"activations use the LLaMA decoder-layer formula; model_type {cfg_type!r} is approximated")

    return MemoryEstimate(
        model=_config_label(config, resolved), optimizer=key + ("_capped" if capped else ""), optim_args=shown_args,
        n_params=int(n_params), dtype=dtype, master_weights=master_weights, batch_size=int(batch_size),
        seq_len=int(seq_len), gradient_checkpointing=bool(gradient_checkpointing), layerwise=layerwise,
        zero_stage=int(zero_stage), num_gpus=num_gpus, weights=int(weights), gradients=int(gradients),
        optimizer_states=int(optimizer_states), activations=int(activations), freed_during_backward=int(freed),
        step_temporaries=int(step_extra), overhead=int(overhead), total=int(total), components=components, kinds=kind_list, notes=notes,
        seconds=round(time.perf_counter() - started, 3), device=device,
    )
