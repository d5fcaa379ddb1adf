"""Estimate the GPU memory of training a causal LM, without allocating it.

The model is built on the meta device (shapes and dtypes, no data), so ``estimate("llama_7b", ...)`` takes
about a second and a few hundred MB of host memory. Where the bytes go (per GPU), and where each is computed:

**weights** -- ``n x`` bytes of ``dtype`` (fp32 4, bf16/fp16 2); with ``master_weights`` (mixed precision)
also an fp32 master copy, ``4n``. (Under torch autocast the 16-bit copy is autocast's cache of weight casts,
alive through the forward pass; under DeepSpeed it is the model itself and the masters live in the
optimizer.)

**gradients** -- one per trainable parameter in the dtype of the tensors autograd accumulates into:
``dtype`` for pure 16-bit or fp32 training; fp32 (``4n``) under torch autocast with fp32 master weights
(the HF Trainer's ``--bf16`` with an fp32 model); ``2n`` 16-bit gradients plus an fp32 gradient partition
(``4n``) under DeepSpeed with master weights. With layer-wise updates (``layerwise``: each parameter is
updated inside backward and its gradient freed at once) only the largest single gradient.

**optimizer states** -- registry optimizers from their own code, one ``step()`` dry-run on the meta device
(:mod:`.dryrun`, with host reads answered by :mod:`.shadow`); Hugging Face optimizers backed by packages the
library must not import (bitsandbytes 8-bit AdamW, GaLore, apollo-torch) from their published state layouts
(:mod:`.external`). Names and options are resolved once, by :func:`lowrank_opt.registry.resolve`.

**activations** -- per LLaMA decoder layer, term by term, in :mod:`.activations`.

**freed during backward** -- gradients appear while activations are being freed (the Trainer sets
gradients to None after each step), so the peak of activations + gradients is found by walking the
backward pass from the loss to the embedding, layer by layer; the difference to the plain sum is shown
as a negative line. With layer-wise updates the same walk holds, at each point, only the largest gradient of
that segment (lm_head, one decoder layer, the embedding) and its update's scratch: the loss's own peak has
no gradient yet, so the largest gradient usually shows up here as freed.

**optimizer step temporaries** -- scratch tensors of ``step()``: measured in the dry run for registry
optimizers (:mod:`.dryrun`), from the published code for the others (:mod:`.external`). The step runs with all
gradients alive (or, layer-wise, inside backward, each update next to its own gradient and the activations
still alive at that point); the line shows how much it raises the peak.

**overhead** -- CUDA context plus library workspaces, ``CUDA_CONTEXT_BYTES`` = 0.75 GB (0.5-1 GB is typical
for CUDA 12 with cuBLAS/cuDNN on H100-class GPUs); the caching allocator's rounding of persistent tensors
(weights and optimizer states are allocated once and never freed: a tensor of 1 MB or more gets a segment
rounded up to 2 MiB, so each wastes what its size falls short of the next 2 MiB; counted exactly for the
weights, as half of 2 MiB on average per state tensor of 10 MB or more); plus ``fragmentation`` = 8 % of the
*transient* peak (activations, gradients, the loss, step scratch: the memory that is freed and re-allocated
every step, where fragmentation happens; 5-10 % is usual); plus, for ZeRO-3, DeepSpeed's gathered largest
layer ``4 x largest-layer params``. Not yet measured on a GPU: benchmarks/gpu_proof.py measures peak reserved
memory next to these figures.

**ZeRO** (``zero_stage``, ``num_gpus`` = N; same structure as DeepSpeed's
``estimate_zero2/3_model_states_mem_needs``): stage 1 divides the optimizer states, fp32 master weights
and fp32 gradient partition by N; stage 2 also the 16-bit gradients; stage 3 also the 16-bit weights (and
adds the gathered largest layer). For AdamW in bf16 with master weights this reproduces DeepSpeed's
ZeRO-2 figure ``2n + 18n/N`` exactly (18 = 2 + 4 + 4 + 8); DeepSpeed's ZeRO-3 formula prints ``18n/N``
where we count ``20n/N`` (the 16-bit weights and gradients are both partitioned). Master weights default
to on under ZeRO with a 16-bit dtype (DeepSpeed always keeps them), off otherwise. APOLLO under ZeRO runs
through :class:`~lowrank_opt.Apollo` on DeepSpeed's flat shards: moments of
right-projected (tall/square) matrices live with their rows and are divided by N (a row cut by a shard
boundary is replicated: at most r numbers per boundary, not counted); left-projected (wide) matrices keep
their full r x n moments on every rank, so they are not divided.

All sizes are bytes; the tables (:mod:`.report`) print GB = 1e9 bytes.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from typing import Any, Optional, Union

import torch
from torch import nn

from ..registry import ResolvedOptimizer, resolve
from ..targets import ALL_LINEAR, TargetModules, is_experts, lowrank_targets
from .activations import activation_bytes
from .configs import _config_label, _meta_model, resolve_config
from .dryrun import DryRun, dry_run
from .dtypes import _DTYPES, _TORCH_DTYPES, GB, _canonical_dtype
from .external import _external_states, _unique_params
from .report import KindDetail, MemoryEstimate

__all__ = ["CUDA_CONTEXT_BYTES", "FRAGMENTATION", "estimate"]

CUDA_CONTEXT_BYTES = 750_000_000
FRAGMENTATION = 0.08


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


def _optimizer_states(chosen: ResolvedOptimizer, model: nn.Module, config, names: dict[int, str], *,
                      dtype: torch.dtype, layerwise: bool, device: str) -> tuple:
    """The optimizer's state on the meta ``model`` (parameters of ``dtype``): bytes per ``id(parameter)``,
    bytes held for no single parameter, bytes per source, the treatment of each parameter (for the tables),
    the step's temporaries, the options to show and notes."""
    params = _unique_params(model)
    notes: list[str] = []
    spec = chosen.spec
    if spec.layout is not None:
        state_by_param, unattributed, sources, treatment, step_temp = _external_states(
            spec, model, chosen.options, chosen.target_modules)
        if spec.lowrank and chosen.target_modules == ALL_LINEAR:
            notes.append(f"{chosen.name}: HF's all-linear targets every nn.Linear, lm_head included")
        return state_by_param, unattributed, sources, treatment, step_temp, dict(chosen.options), notes
    lowrank = {id(p) for _, p in lowrank_targets(model, chosen.target_modules)} if spec.lowrank else set()
    # torch's optimizers default to foreach on CUDA, to their single-tensor loop on CPU.
    foreach = not layerwise and device == "cuda"
    run: DryRun = dry_run(chosen, model, config, names, dtype=dtype, foreach=foreach, device=device)
    state_by_param = {id(p): run.state_by_name.get(names[id(p)], 0) for p in params}
    treatment = {}
    for p in params:
        rank = run.ranks.get(names[id(p)])
        if id(p) in lowrank and p.ndim >= 2 and rank is not None:
            treatment[id(p)] = f"low-rank rank={rank}"
        elif spec.lowrank:
            treatment[id(p)] = "AdamW"
        else:
            treatment[id(p)] = spec.cls.__name__
    if chosen.capped:
        treatment = {k: v + " + NormGrowthCap" for k, v in treatment.items()}
    shown_args = dict(chosen.given)
    if spec.lowrank and "rank" not in shown_args:
        shown_args = {"rank": chosen.options["rank"], **shown_args}
    if issubclass(spec.cls, torch.optim.AdamW) and dtype != torch.float32:
        notes.append("torch.optim.AdamW keeps its moments in the parameter dtype; with fp32 master weights "
                     "(master_weights=True) they are fp32 (8 bytes/param)")
    return state_by_param, run.unattributed, run.sources, treatment, run.temporaries, shown_args, notes


def estimate(
    config: Any,
    optimizer: Union[str, ResolvedOptimizer] = "apollo",
    optim_args: Union[None, str, dict] = None,
    target_modules: Optional[TargetModules] = None,
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
    weights: str = "float",
    int8_group_size: int = 128,
    lean_loss: bool = False,
) -> MemoryEstimate:
    """Estimate per-GPU training memory for ``config`` and ``optimizer`` without allocating the model.

    Args:
        config: a ``PretrainedConfig``, a config JSON path (or directory), or a name in configs/
            (``"llama_7b"``).
        optimizer: a registry name (``lowrank_opt.registry.available()``, optionally ``_capped``) or one of
            Hugging Face's ``adamw_bnb_8bit`` (alias ``adamw_8bit``), ``paged_adamw_8bit``, ``galore_adamw``
            (alias ``galore``), ``apollo_adamw`` and their ``_layerwise`` variants; ``adamw_torch`` is
            ``adamw`` (:func:`lowrank_opt.registry.known_optimizers`); or a
            :class:`~lowrank_opt.registry.ResolvedOptimizer` (then without ``optim_args`` and ``target_modules``).
        optim_args: the optimizer's options over its defaults, as a dict or HF's "k=v,k=v" string
            (``"rank=256,state_dtype=bfloat16"``); ``cap_*`` keys go to NormGrowthCap for ``*_capped``.
        target_modules: the low-rank matrices (names, regexes, ``"all-linear"``) of low-rank optimizers only
            (default ``"all-linear"``).
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
            foreach, APOLLO updates in 2^20- instead of 2^22-element pieces, and there is no CUDA context or
            caching-allocator fragmentation (the overhead is 0: the total is the peak of live tensor bytes,
            not the process's RSS, which adds Python, torch and the allocator's own caching).
        cuda_context_bytes, fragmentation: the overhead model (``None``: ``CUDA_CONTEXT_BYTES`` and
            ``FRAGMENTATION`` on ``"cuda"``, 0 on ``"cpu"``).
        weights: ``"float"`` (``dtype``) or ``"int8"`` (Q-APOLLO, :func:`lowrank_opt.quant.quantize_model_`):
            every ``nn.Linear`` weight but the output head in int8 with an fp32 scale per row and
            ``int8_group_size`` columns; each layer's weight is dequantized (in ``dtype``) only while the layer
            runs, so the largest such weight is added to the peaks as a transient.
        lean_loss: the chunked cross-entropy of :mod:`lowrank_opt.loss` (``train.py --lean_loss``): no
            tokens x vocabulary tensor (see :mod:`lowrank_opt.memory.activations`).

    Returns:
        a :class:`MemoryEstimate` (bytes; ``.table()``, ``.to_dict()``).
    """
    started = time.perf_counter()
    dtype = _canonical_dtype(dtype)
    if isinstance(optimizer, ResolvedOptimizer):
        if optim_args is not None or target_modules is not None:
            raise ValueError(f"optimizer {optimizer.name!r} is already resolved with its options and targets; "
                             "drop optim_args and target_modules")
        chosen = optimizer
    else:
        chosen = resolve(optimizer, optim_args, target_modules)
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
    if layerwise is None:
        layerwise = chosen.layerwise
    elif chosen.layerwise and not layerwise:
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

    weight_format = weights  # (``weights`` is reused below for the bytes)
    if weight_format not in ("float", "int8"):
        raise ValueError(f"weights must be 'float' or 'int8', got {weight_format!r}")
    if weight_format == "int8" and (master_weights or zero_stage or num_gpus > 1):
        raise ValueError("weights='int8' is for one GPU without fp32 master weights (Q-APOLLO updates the int8 "
                         "weights themselves)")
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
    states = _optimizer_states(chosen, model, resolved, names, dtype=opt_dtype, layerwise=layerwise, device=device)
    state_by_param, unattributed, sources, treatment, step_temp, shown_args, state_notes = states
    notes += state_notes

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
    int8_saved = dequant_transient = int8_linear_bytes = 0
    int8_ids: set[int] = set()
    if weight_format == "int8":  # Linear weights (not the head) as int8 codes + fp32 group scales
        from ..quant.int8 import int8_weight_bytes
        from ..targets import is_linear

        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for module in model.modules():
            if is_linear(module) and module is not head and type(module) is nn.Linear:
                out_f, in_f = module.weight.shape
                int8_saved += out_f * in_f * wb - int8_weight_bytes(out_f, in_f, int8_group_size)
                int8_linear_bytes += out_f * in_f * wb
                dequant_transient = max(dequant_transient, out_f * in_f * wb)
                int8_ids.add(id(module.weight))
        weights_model -= int8_saved
    weights_master = n_params * 4 / n1 if master_weights else 0
    weights = weights_model + weights_master
    gradients_all = sum(per_param_grad.values())
    gradients = largest_grad if layerwise else gradients_all
    # ZeRO partitions optimizer state by N, except the r x n moments of a left-projected (wide) matrix, which
    # every rank holding a part of it keeps in full (counted as on every rank: an upper bound).
    replicated: set[int] = set()
    if n1 > 1 and chosen.spec.layout is None and chosen.spec.lowrank:
        from ..projection import LEFT, matrix_shape, orientation

        sort_dims = bool(chosen.options.get("sort_dims", True))
        for p in params:
            if treatment.get(id(p), "").startswith("low-rank") and orientation(matrix_shape(p.shape), sort_dims) == LEFT:
                replicated.add(id(p))
    state_share = {id(p): state_by_param.get(id(p), 0) / (1 if id(p) in replicated else n1) for p in params}
    optimizer_states = sum(state_share.values()) + unattributed / n1

    # -- activations and the backward walk ------------------------------------------------------------
    act = activation_bytes(resolved, batch_size=batch_size, seq_len=seq_len, dtype=dtype, autocast=autocast,
                           gradient_checkpointing=gradient_checkpointing, attn_implementation=attn_implementation,
                           lean_loss=lean_loss)
    if dequant_transient:  # one layer's weight, dequantized while the layer runs (forward and recompute/backward)
        act.per_layer += dequant_transient
        if act.recompute:
            act.recompute += dequant_transient
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
    loss_backward = top + act.logits_backward
    if lean_loss:
        # The lean loss's backward allocates the lm_head gradient first and fills it a vocabulary block at a
        # time: it is alive next to the backward's scratch (measured: LLaMA-7B on CPU, benchmarks/fit_7b.py).
        loss_backward += seg_largest.get(("head", 0), 0)
    loss_peaks = [top + act.logits_forward, loss_backward]  # the loss forward; its backward
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
    rounding = 0.0
    if fragmentation:  # the allocator's 2 MiB rounding of the persistent tensors (weights, states)
        mib2 = 2 * 1024 * 1024
        for p in params:
            nbytes = 0 if id(p) in int8_ids else p.numel() * wb / n3  # int8 weights: codes + scales below
            if id(p) in int8_ids and p.numel() >= 1 << 20:
                rounding += -p.numel() % mib2
            if nbytes >= 1 << 20:
                rounding += -nbytes % mib2
            if state_share.get(id(p), 0) >= 10e6:
                rounding += 2 * (mib2 / 2)  # two state tensors, half a rounding step each on average
    fragmentation_bytes = rounding + fragmentation * (peak_ag + gather)
    overhead = cuda_context_bytes + gather + fragmentation_bytes
    total = base_total + cuda_context_bytes + fragmentation_bytes

    # -- components, kinds, notes ---------------------------------------------------------------------
    components: dict[str, int] = {}
    if weight_format == "int8":
        int8_bytes = int8_linear_bytes - int8_saved  # the quantized Linear weights: codes + scales
        components[f"weights.{dtype} (embeddings, head, norms)"] = int(weights_model - int8_bytes)
        components["weights.int8 + scales"] = int(int8_bytes)
    else:
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
    components["overhead.allocator rounding"] = int(rounding)
    components["overhead.fragmentation"] = int(fragmentation_bytes - rounding)
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

    if zero_stage and chosen.spec.layout is None and chosen.spec.lowrank:
        notes.append("ZeRO (Apollo on DeepSpeed's flat shards, counted as if every matrix were split over all ranks): "
                     "moments of right-projected (tall/square) matrices are partitioned by row; left-projected "
                     "(wide) matrices keep their full r x n moments on every rank"
                     + (f" ({len(replicated)} here)" if replicated else ""))
    if zero_stage == 3:
        notes.append("ZeRO-3: 16-bit weights and gradients are both partitioned (20n/N bytes for AdamW; "
                     "DeepSpeed's own estimator prints 18n/N) plus 4 x the largest layer, gathered")
    if layerwise:
        notes.append("layer-wise: each gradient is freed right after its update, so at most the largest one "
                     "(here %.2f GB) is alive" % (largest_grad / GB))
    if weight_format == "int8":
        notes.append("int8 weights (Q-APOLLO): Linear weights but the head in int8 + fp32 scales per %d columns "
                     "(%.2f GB saved); one layer's weight is dequantized while it runs (%.2f GB, in the "
                     "activations)" % (int8_group_size, int8_saved / GB, dequant_transient / GB))
        stacked = sum(p.numel() for m in model.modules() if is_experts(m)
                      for p in m.parameters(recurse=False) if p.ndim >= 3)
        if stacked:
            notes.append("int8 weights apply to nn.Linear layers: the %.2f B parameters of fused experts stay %s"
                         % (stacked / 1e9, dtype))
    if lean_loss:
        notes.append("lean loss: cross-entropy in fp32 tiles, no tokens x vocabulary tensor")
    cfg_type = getattr(resolved, "model_type", "")
    if cfg_type not in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"):
        notes.append(f"activations use the LLaMA decoder-layer formula; model_type {cfg_type!r} is approximated")

    return MemoryEstimate(
        model=_config_label(config, resolved), optimizer=chosen.name, optim_args=shown_args,
        n_params=int(n_params), dtype=dtype, master_weights=master_weights, batch_size=int(batch_size),
        seq_len=int(seq_len), gradient_checkpointing=bool(gradient_checkpointing), layerwise=layerwise,
        zero_stage=int(zero_stage), num_gpus=num_gpus, weights=int(weights), gradients=int(gradients),
        optimizer_states=int(optimizer_states), activations=int(activations), freed_during_backward=int(freed),
        step_temporaries=int(step_extra), overhead=int(overhead), total=int(total), components=components, kinds=kind_list, notes=notes,
        seconds=round(time.perf_counter() - started, 3), device=device, weight_format=weight_format, lean_loss=bool(lean_loss),
    )
