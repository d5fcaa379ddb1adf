"""The GPU proof in one command: LLaMA-7B under 48 / 24 / 16 GB, optimizer step time, estimator accuracy, and
the CUDA-only code paths, within a time budget, keeping whatever it measured when it is cut short.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_proof.py --budget-s 480          # a CUDA GPU; docs/gpu/results.json
    python benchmarks/gpu_proof.py --smoke                                    # CPU, tiny configs, every stage
    python benchmarks/gpu_proof.py --stages estimator,cuda_checks --budget-s 120   # finish what a run missed

Stages, in this order, each with its slice of ``--budget-s`` (fit_7b 4/8, step_time 2/8, estimator 1/8,
cuda_checks 1/8; time a stage leaves unused goes to the next one, never to the cost of a later stage's slice):

1. **fit_7b**: the runs of :data:`FIT_SPECS` (one spec per row: optimizer, its options, memory cap, layer-wise,
   dtype, memory levers, other settings), each ``--steps`` real training steps of LLaMA-7B built on the GPU in
   bf16, sequence 2048, gradient checkpointing, under ``torch.cuda.set_per_process_memory_fraction``
   (benchmarks/fit_7b.py's ``train_run`` and ``set_cap``). The last two rows are issue 17's settings of
   docs/memory.md: layer-wise APOLLO-Mini with 8-bit dense states, the head low-rank and the lean loss under
   16 GB, and with int8 weights under 12 GB (the levers reach the run and its estimate alike:
   ``fit_7b.with_levers``). Per run: whether every step ran, the allocator's peaks, tokens/s, first and last
   loss, the optimizer-state and weight bytes, the estimator's figures for the same settings, the error text
   of a failure. Each run has its own limit (100 s; the int8 one 150 s) inside the stage's slice; a run the
   slice has no room left for is recorded ``skipped: budget`` (``--only KEY,...`` runs it later).
2. **step_time**: the optimizer step alone (benchmarks/step_time.py's ``run_one`` and ``run_paired``) at the 1B
   (fp32) and 7B (bf16: what fits next to fused AdamW's state) shapes: ours, ours-Mini, torch fused AdamW,
   apollo-torch APOLLO and Mini, paired rounds; GaLore at 1B, its first step (one SVD refresh) timed.
3. **estimator**: measured peaks against ``lowrank_opt.memory.estimate`` for LLaMA-60M, 130M, 350M, 1B with
   apollo, apollo_mini and adamw (bf16, sequence 2048, gradient checkpointing: docs/memory.md's setting).
4. **cuda_checks**: the code paths that only a GPU takes: bf16 stochastic rounding in row blocks
   (deterministic, unbiased), the dense update in GPU-sized chunks (equal to the unchunked one), and the
   projection draw on the GPU equal across two processes. Each is a function of a device; ``--smoke`` runs
   them on the CPU.

How it survives being cut short: the work runs in a worker process that writes one JSON line per event (a
unit started, progressed, finished) and checks the budget before each unit; this process watches those lines,
kills the worker when a unit runs past its stage's deadline (what the unit reported so far is kept, marked
``killed``), and starts a new worker for what is left. After every unit the results are merged into
``--results`` (written atomically) and a line goes to ``--log``. The estimates run meanwhile in a thread of
this process (they need no GPU). Results are merged unit by unit into what the file already holds, so a later
run can finish what an earlier one missed; a run on another device refuses to merge (``--replace`` starts over).

apollo-torch and galore-torch (and bitsandbytes, which both import) are used where installed; elsewhere
their rows say ``skipped: <package> not installed``. docs/memory.md ("Measured on a GPU") gives the exact
command for the device machine, with the wheels it carries.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fit_7b  # noqa: E402
from _common import (  # noqa: E402
    ROOT,
    SIZES,
    LlamaShape,
    command_line,
    gc_paused,
    median,
    release_memory,
    package_version,
    split_list,
    timed,
    timed_calls,
    utc_now,
    write_json_atomic,
    write_text_atomic,
)

STAGES = ("fit_7b", "step_time", "estimator", "cuda_checks")
SHARES = {"fit_7b": 4, "step_time": 2, "estimator": 1, "cuda_checks": 1}  # eighths of the budget
# Below this many seconds a stage is not started (its first unit could not finish), per mode.
STAGE_MIN_S = {"gpu": {"fit_7b": 45, "step_time": 30, "estimator": 20, "cuda_checks": 15},
               "smoke": {"fit_7b": 2, "step_time": 2, "estimator": 2, "cuda_checks": 2}}
DEFAULT_BUDGET_S = 480
RESULTS = ROOT / "docs" / "gpu" / "results.json"
LOG = ROOT / "docs" / "gpu" / "gpu_proof.log"
SMOKE_DIR = ROOT / "outputs" / "gpu_proof_smoke"
EXIT_NO_CUDA = 3
HANG_ENV = "GPU_PROOF_TEST_HANG"  # tests: "UNIT_KEY:N" makes the worker hang after the unit's N-th progress report
KILL_GRACE_S = 2.0  # a unit may overrun its deadline by this much before it is killed

# ----------------------------------------------------------------------------------------------------------
# Stage 1: which runs (append a FitSpec to add a row)


@dataclass(frozen=True)
class FitSpec:
    """One run of the fit_7b stage.

    ``optim``: a name of benchmarks/fit_7b.py (``apollo``, ``adamw_fused``, ``adamw_8bit``, ...) or of the
    registry; ``layerwise=True`` takes its ``_layerwise`` form. ``optim_args`` go to the optimizer's constructor
    and to the estimate. ``cap_gb``: the allocator's cap in GB (0: none). ``dtype``: the weights' dtype.
    ``settings``: anything else, from :data:`FIT_SETTINGS` (config, seq_len, steps, batch_size, seed, lr,
    env: environment variables for the run's own worker process, expect: "fit" or "oom", max_s: its time
    limit).

    The memory levers of issue 17, for the run and its estimate alike (``fit_7b.with_levers``; a lowrank-opt
    optimizer for all but the lean loss): ``target_modules`` (None: the optimizer's default, ``"all-linear"``;
    else as Hugging Face takes them, e.g. ``["all-linear", "lm_head"]``: the head low-rank too), ``lean_loss``
    (chunked cross-entropy, no tokens x vocabulary tensor) and ``weights`` (``"float"``: ``dtype``;
    ``"int8"``: every Linear but the head in int8, updated by APOLLO)."""

    optim: str
    cap_gb: float
    optim_args: dict = field(default_factory=dict)
    layerwise: bool = False
    dtype: str = "bfloat16"
    settings: dict = field(default_factory=dict)
    target_modules: Optional[Any] = None  # None | str | list of str
    lean_loss: bool = False
    weights: str = "float"

    @property
    def name(self) -> str:
        """The optimizer name that is built (``apollo_mini`` + layer-wise -> ``apollo_mini_layerwise``)."""
        if self.layerwise and not self.optim.endswith("_layerwise"):
            return f"{self.optim}_layerwise"
        return self.optim

    @property
    def key(self) -> str:
        """The run's name in results.json (unique per row), saying what differs from a plain run:
        ``apollo_mini_layerwise@12GB[dense_state_bits=8;lean_loss;weights=int8]``. No commas (``--only`` splits
        on them): targets are joined with ``+``."""
        extra = [f"{k}={v}" for k, v in sorted(self.optim_args.items())]
        if self.target_modules is not None:
            extra.append(f"targets={targets_label(self.target_modules)}")
        if self.lean_loss:
            extra.append("lean_loss")
        if self.weights != "float":
            extra.append(f"weights={self.weights}")
        if self.dtype != "bfloat16":
            extra.append(self.dtype)
        extra += [f"{k}={v}" for k, v in sorted(self.settings.items()) if k not in ("expect", "max_s")]
        return f"{self.name}@{self.cap_gb:g}GB" + (f"[{';'.join(extra)}]" if extra else "")


def targets_label(targets: Any, sep: str = "+") -> str:
    """``"all-linear,lm_head"`` or ``["all-linear", "lm_head"]`` -> ``"all-linear+lm_head"`` (``sep="+"``: for
    keys; never raises, whatever a spec holds: the spec's check names a bad value)."""
    items = [targets] if isinstance(targets, str) else list(targets) if isinstance(targets, (list, tuple)) else None
    if items is None:
        return repr(targets)
    return sep.join(split_list(",".join(str(t) for t in items)))


FIT_SETTINGS = {"config": "configs/llama_7b.json", "seq_len": 2048, "steps": 10, "batch_size": 1, "seed": 0,
                "lr": None, "env": {}, "expect": "fit", "max_s": 100}
SMOKE_FIT_SETTINGS = {"config": "configs/llama_tiny.json", "seq_len": 32, "steps": 2, "max_s": 60}
DTYPES = ("bfloat16", "float16", "float32")
SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# The fields of a fit unit (and of its record in results.json) that a FitSpec's levers add, with the values
# that a plan or record written before them means: a missing field is the plain run.
LEVER_DEFAULTS = {"target_modules": None, "lean_loss": False, "weights": "float"}

FIT_SPECS = [
    FitSpec("apollo", cap_gb=48),
    FitSpec("apollo_mini", cap_gb=24, layerwise=True),
    FitSpec("apollo_mini", cap_gb=16, layerwise=True),
    FitSpec("apollo", cap_gb=24, layerwise=True),
    FitSpec("adamw_fused", cap_gb=48, settings={"expect": "oom"}),  # bf16 weights + grads + moments: 54 GB
    # Issue 17's two headline settings of docs/memory.md (estimates at 2048 tokens: 15.90 GB and 9.83 GB).
    # 16 GB: 8-bit AdamW moments for the embeddings and the head, the lean loss.
    FitSpec("apollo_mini", cap_gb=16, layerwise=True, optim_args={"dense_state_bits": 8}, lean_loss=True),
    # 12 GB: int8 weights (Q-APOLLO-Mini), 8-bit dense moments, the lean loss. 150 s, not 100: the int8 model
    # is materialised one module at a time (fit_7b.build_int8_model: 292 modules of LLaMA-7B, each initialised,
    # its 224 Linears but the head quantized at once), and every step dequantizes each Linear in forward, again
    # in the checkpointed recomputation and in backward, and re-quantizes it (stochastic rounding) after its
    # update. The stage's slice still bounds it: a unit is killed at its own limit or the slice's end.
    FitSpec("apollo_mini", cap_gb=12, layerwise=True, optim_args={"dense_state_bits": 8}, lean_loss=True,
            weights="int8", settings={"max_s": 150}),
]


def check_fit_spec(spec: FitSpec) -> None:
    """A clear error for a spec that cannot run (before any work)."""
    unknown = set(spec.settings) - set(FIT_SETTINGS)
    if unknown:
        raise ValueError(f"FitSpec {spec.key}: unknown setting(s) {sorted(unknown)}; known: {sorted(FIT_SETTINGS)}")
    if spec.dtype not in DTYPES:
        raise ValueError(f"FitSpec {spec.key}: dtype must be one of {DTYPES}, got {spec.dtype!r}")
    if not (math.isfinite(spec.cap_gb) and spec.cap_gb >= 0):
        raise ValueError(f"FitSpec {spec.key}: cap_gb must be >= 0 (0: no cap), got {spec.cap_gb!r}")
    if spec.settings.get("expect", "fit") not in ("fit", "oom"):
        raise ValueError(f"FitSpec {spec.key}: expect must be 'fit' or 'oom', got {spec.settings['expect']!r}")
    max_s = spec.settings.get("max_s", FIT_SETTINGS["max_s"])
    if isinstance(max_s, bool) or not isinstance(max_s, (int, float)) or not (math.isfinite(max_s) and max_s > 0):
        raise ValueError(f"FitSpec {spec.key}: max_s must be a positive number of seconds, got {max_s!r}")
    if spec.weights not in fit_7b.WEIGHT_FORMATS:
        raise ValueError(f"FitSpec {spec.key}: weights must be one of {fit_7b.WEIGHT_FORMATS}, got {spec.weights!r}")
    if not isinstance(spec.lean_loss, bool):
        raise ValueError(f"FitSpec {spec.key}: lean_loss must be True or False, got {spec.lean_loss!r}")
    targets = spec.target_modules
    entries = [targets] if isinstance(targets, str) else targets if isinstance(targets, (list, tuple)) else None
    if targets is not None and (not entries or not all(isinstance(t, str) and t.strip() for t in entries)):
        raise ValueError(f"FitSpec {spec.key}: target_modules must be None, a name/regex or a non-empty list of "
                         f"them (e.g. ['all-linear', 'lm_head']), got {targets!r}")
    fit_7b.resolve_choice(spec.name)  # ValueError naming the known optimizers
    try:
        fit_choice(spec)  # the levers where they do not apply (int8 weights with torch's AdamW, ...)
    except ValueError as exc:
        raise ValueError(f"FitSpec {spec.key}: {exc}") from None


def fit_choice(spec: FitSpec) -> fit_7b.OptimChoice:
    """fit_7b's OptimChoice for the spec: its optim_args added to the constructor's options and the estimate's,
    its levers set (``fit_7b.with_levers``), so that the run and its estimate are of the same thing."""
    choice = fit_7b.resolve_choice(spec.name)
    optim_args = spec.optim_args
    if optim_args and choice.kind != "registry":  # torch's / bitsandbytes' AdamW options (as before the levers)
        choice = dataclasses.replace(choice, options={**choice.options, **optim_args},
                                     estimator_args={**choice.estimator_args, **optim_args})
        optim_args = {}
    if not optim_args and spec.target_modules is None and not spec.lean_loss and spec.weights == "float":
        return choice
    return fit_7b.with_levers(choice, optim_args=optim_args, target_modules=spec.target_modules,
                              lean_loss=spec.lean_loss, weights=spec.weights)


def unit_spec(unit: dict) -> FitSpec:
    """The FitSpec a fit unit (or a fit record of results.json) was made from, as far as the run and its estimate
    depend on it; the fields a plan or record written before the levers lacks take :data:`LEVER_DEFAULTS`."""
    levers = {name: unit.get(name, default) for name, default in LEVER_DEFAULTS.items()}
    return FitSpec(unit["optim"], unit["cap_gb"], dict(unit.get("optim_args") or {}),
                   dtype=unit.get("dtype", "bfloat16"), **levers)


def levers_text(record: dict) -> str:
    """What a fit unit or record sets beyond a plain run, in words (``""`` for a plain one; an old record
    without the lever fields is a plain one): ``"dense_state_bits=8, targets all-linear,lm_head, lean loss,
    int8 weights"``, as ``fit_7b.describe_levers`` words them."""
    parts = [f"{k}={v}" for k, v in sorted((record.get("optim_args") or {}).items())]
    if record.get("target_modules") is not None:
        parts.append(f"targets {targets_label(record['target_modules'], sep=',')}")
    if record.get("lean_loss"):
        parts.append("lean loss")
    if record.get("weights", "float") != "float":
        parts.append(f"{record['weights']} weights")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Stages 2-4: what they measure


@dataclass(frozen=True)
class StepTimePlan:
    sizes: tuple = (("1b", "float32"), ("7b", "bfloat16"))  # (size, dtype of weights and gradients)
    optimizers: tuple = ("ours", "ours-mini", "adamw-fused", "apollo-torch", "apollo-torch-mini")
    pairs: tuple = (("ours", "adamw-fused"), ("ours-mini", "adamw-fused"), ("ours", "apollo-torch"),
                    ("ours-mini", "apollo-torch-mini"))
    galore_sizes: tuple = ("1b",)
    steps: int = 5
    warmup: int = 2
    rounds: int = 8
    max_s: float = 60
    galore_max_s: float = 120


@dataclass(frozen=True)
class EstimatorPlan:
    sizes: tuple = ("60m", "130m", "350m", "1b")
    optims: tuple = ("apollo", "apollo_mini", "adamw")
    seq_len: int = 2048
    batch_size: int = 1
    steps: int = 3
    target: float = 0.10  # |measured / estimated - 1|
    max_s: float = 40


@dataclass(frozen=True)
class CheckPlan:
    rounding_shape: tuple = (8192, 8192)  # bf16, 16 chunks of the GPU's 2^22 elements
    dense_shape: tuple = (4 * 4096 + 1, 4096)  # fp32, 16 chunks of 2^22 and a ragged end
    projection_shapes: tuple = ((11008, 4096), (4096, 11008), (4096, 4096))
    projection_rank: int = 256
    max_s: float = 60


# The checks build tensors of several of the library's dense chunks (lowrank_opt.apollo.dense_chunk_elements:
# 2^20 elements on CPU, 2^22 on GPUs), so that the chunked and row-block paths are the ones taken.

SMOKE_SHAPE = LlamaShape(64, 172, 2, 16, galore_rank=16, key="tiny")
SMOKE_VOCAB = 256
SMOKE_STEP_TIME = StepTimePlan(sizes=(("tiny", "bfloat16"),), galore_sizes=("tiny",),
                               steps=2, warmup=1, rounds=2, max_s=30, galore_max_s=30)
SMOKE_ESTIMATOR = EstimatorPlan(sizes=("tiny",), seq_len=32, steps=2, max_s=30)
SMOKE_CHECKS = CheckPlan(rounding_shape=(1024, 2048), dense_shape=(2 * 256 + 1, 4096),
                         projection_shapes=((172, 64), (64, 172)), projection_rank=16, max_s=60)

PACKAGES = {"apollo-torch": ("apollo-torch", "apollo_torch"), "apollo-torch-mini": ("apollo-torch", "apollo_torch"),
            "galore": ("galore-torch", "galore_torch")}


def missing_package(kind: str) -> Optional[str]:
    """Why an optimizer of step_time.py cannot be built here (its package), or None."""
    if kind not in PACKAGES:
        return None
    dist, module = PACKAGES[kind]
    if importlib.util.find_spec(module) is None:
        return f"{dist} not installed"
    try:
        importlib.import_module(module)
    except Exception as exc:  # e.g. bitsandbytes missing: both packages import it
        return f"{dist} does not import ({fit_7b.first_line(exc, 160)})"
    return None


def shape_of(size: str) -> LlamaShape:
    return SMOKE_SHAPE if size == SMOKE_SHAPE.key else SIZES[size]


def config_of(size: str) -> str:
    return "configs/llama_tiny.json" if size == SMOKE_SHAPE.key else f"configs/{SIZES[size].config}.json"


# ----------------------------------------------------------------------------------------------------------
# The plan: stages of units, each unit a JSON-able dict the worker runs


def build_plan(stages: list[str], smoke: bool, fit_specs: list[FitSpec] = FIT_SPECS) -> list[dict]:
    """The units of the selected stages, in order. A unit: ``key`` (unique), ``stage``, ``kind``, what it
    needs, ``max_s`` (its own time limit) and ``env`` (extra environment: a unit with other variables gets its
    own worker)."""
    units: list[dict] = []
    if "fit_7b" in stages:
        for spec in fit_specs:
            check_fit_spec(spec)
            settings = {**FIT_SETTINGS, **(SMOKE_FIT_SETTINGS if smoke else {}), **spec.settings}
            if smoke:
                settings.update({k: v for k, v in SMOKE_FIT_SETTINGS.items() if k != "max_s"})
            choice = fit_choice(spec)
            units.append({"key": spec.key, "stage": "fit_7b", "kind": "fit", "optim": spec.name,
                          "optim_args": spec.optim_args, "layerwise": choice.layerwise,
                          "cap_gb": spec.cap_gb, "dtype": spec.dtype, "target_modules": choice.target_modules,
                          "lean_loss": spec.lean_loss, "weights": spec.weights, "settings": settings,
                          "max_s": settings["max_s"], "env": settings["env"]})
    if "step_time" in stages:
        plan = SMOKE_STEP_TIME if smoke else StepTimePlan()
        common = {"stage": "step_time", "steps": plan.steps, "warmup": plan.warmup, "max_s": plan.max_s, "env": {}}
        for size, dtype in plan.sizes:
            at = f"@{size}-{SHORT_DTYPES[dtype]}"
            for kind in plan.optimizers:
                units.append({"key": kind + at, "kind": "step_run", "size": size, "dtype": dtype,
                              "optimizer": kind, **common})
            for ours, theirs in plan.pairs:
                units.append({"key": f"{ours}/{theirs}" + at, "kind": "step_paired", "size": size,
                              "dtype": dtype, "ours": ours, "theirs": theirs, "rounds": plan.rounds, **common})
        for size in plan.galore_sizes:
            units.append({"key": f"galore-refresh@{size}-fp32", "kind": "galore_refresh", "size": size,
                          "dtype": "float32", **{**common, "max_s": plan.galore_max_s}})
    if "estimator" in stages:
        plan = SMOKE_ESTIMATOR if smoke else EstimatorPlan()
        for size in plan.sizes:
            for optim in plan.optims:
                units.append({"key": f"{optim}@{size}", "stage": "estimator", "kind": "estimator", "size": size,
                              "config": config_of(size), "optim": optim, "seq_len": plan.seq_len,
                              "batch_size": plan.batch_size, "steps": plan.steps, "target": plan.target,
                              "max_s": plan.max_s, "env": {}})
    if "cuda_checks" in stages:
        plan = SMOKE_CHECKS if smoke else CheckPlan()
        common = {"stage": "cuda_checks", "kind": "check", "max_s": plan.max_s, "env": {}}
        units += [
            {"key": "bf16_row_block_rounding", "check": "bf16_row_block_rounding",
             "args": {"shape": list(plan.rounding_shape)}, **common},
            {"key": "dense_chunks", "check": "dense_chunks", "args": {"shape": list(plan.dense_shape)}, **common},
            {"key": "projection_across_processes", "check": "projection_across_processes",
             "args": {"shapes": [list(s) for s in plan.projection_shapes], "rank": plan.projection_rank}, **common},
        ]
    return units


def stage_deadlines(stages: list[str], start: float, budget_s: float) -> dict[str, float]:
    """When each selected stage must be done: the budget's end less the slices of the stages after it. So a
    stage gets its own slice plus whatever the stages before it left unused, and never a later one's."""
    total = sum(SHARES[s] for s in stages)
    deadlines, later = {}, 0.0
    for stage in reversed(stages):
        deadlines[stage] = start + budget_s - later
        later += budget_s * SHARES[stage] / total
    return deadlines


def budget_skip(stage_min_s: float, deadline: float, now: float) -> Optional[str]:
    """Why a stage (or unit) needing ``stage_min_s`` seconds cannot start now, or None."""
    left = deadline - now
    if left < stage_min_s:
        return f"skipped: budget (its slice has {max(0.0, left):.0f} s left, it needs at least {stage_min_s:g} s)"
    return None


# ----------------------------------------------------------------------------------------------------------
# The CUDA checks: functions of a device (CPU in --smoke)


@contextlib.contextmanager
def scratch_bytes(device: str, measure: bool = True):
    """Yields a dict that gets ``"bytes"``: on CUDA the peak allocated inside the block above what was
    allocated when it began (the block's temporaries); None elsewhere or when ``measure`` is False."""
    import torch

    out: dict = {"bytes": None}
    if not (measure and device == "cuda"):
        yield out
        return
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    yield out
    torch.cuda.synchronize()
    out["bytes"] = torch.cuda.max_memory_allocated() - before


def _bf16_neighbours(x):
    """The two bf16 values around each fp32 value of ``x``: (toward zero, away from zero); equal when x is a
    bf16 value."""
    import torch

    bits = x.view(torch.int32)
    low = bits & -(1 << 16)
    high = torch.where(low == bits, low, low + (1 << 16))
    return low.view(torch.float32), high.view(torch.float32)


def check_bf16_row_block_rounding(device: str, shape: list[int], lr: float = 2.0**-11, seed: int = 0) -> dict:
    """APOLLO's update of a bf16 weight larger than one dense chunk, done in row blocks with stochastic rounding
    (the dense AdamW path of a ``rank=None`` group; the low-rank path writes back the same way).

    1. w0: random bf16 weights in [0.25, 4) (several binades, so the rounding probabilities differ), random
       gradients; x: the same step on an fp32 copy (the exact value the rounding starts from).
    2. Each element of the bf16 result is one of x's two bf16 neighbours.
    3. Unbiased: z = sum(w - x) / sqrt(sum((x - lo)(hi - x))), the total rounding error over its standard
       deviation under E[w] = x, is within 5.
    4. Deterministic: a second optimizer from the same inputs gives the same bits.
    5. Recorded: whether the row-block bits equal one whole-tensor draw (``foreach=False``; the same on CPU),
       and on CUDA the step's scratch (peak allocated above the state) with row blocks and whole.
    """
    import torch

    from lowrank_opt import Apollo
    from lowrank_opt.apollo import dense_chunk_elements

    gen = torch.Generator(device=device).manual_seed(seed)
    w0 = (torch.rand(shape, generator=gen, device=device) * 3.75 + 0.25).to(torch.bfloat16)
    grad = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)

    def stepped(dtype, foreach: bool, steps: int = 1, scratch: bool = False):
        p = torch.nn.Parameter(w0.to(dtype, copy=True))
        p.grad = grad.to(dtype, copy=True)
        opt = Apollo([{"params": [p], "rank": None}], lr=lr, weight_decay=0.0, foreach=foreach)
        for _ in range(steps - 1):
            opt.step()
        with scratch_bytes(device, scratch) as last:  # the state exists by then: what the step itself adds
            opt.step()
        return p.detach(), last["bytes"]

    x, _ = stepped(torch.float32, foreach=False)
    w, _ = stepped(torch.bfloat16, foreach=True)
    again, _ = stepped(torch.bfloat16, foreach=True)
    whole, _ = stepped(torch.bfloat16, foreach=False)
    wf = w.float()
    lo, hi = _bf16_neighbours(x.clone())
    neighbour = bool(((wf == lo) | (wf == hi)).all())
    variance = ((x - lo).double() * (hi - x).double()).sum()
    error = (wf - x).double().sum()
    z = float(error / variance.sqrt()) if float(variance) > 0 else 0.0
    changed = float((wf != w0.float()).double().mean())
    out = {
        "device": device, "shape": list(shape), "numel": w.numel(), "chunk_elements": dense_chunk_elements(device),
        "blocks": math.ceil(w.numel() / dense_chunk_elements(device)), "lr": lr,
        "each_element_a_bf16_neighbour": neighbour, "z_total_rounding_error": z,
        "mean_update": float((x - w0.float()).double().mean()), "mean_error": float(error / w.numel()),
        "fraction_changed": changed, "deterministic": bool(torch.equal(w, again)),
        "row_blocks_equal_whole_tensor_draw": bool(torch.equal(w, whole)),
    }
    if device == "cuda":
        _, blocked = stepped(torch.bfloat16, foreach=True, steps=2, scratch=True)
        _, full = stepped(torch.bfloat16, foreach=False, steps=2, scratch=True)
        out.update(scratch_bytes_row_blocks=blocked, scratch_bytes_whole=full)
    out["ok"] = neighbour and abs(z) < 5 and out["deterministic"] and changed > 0
    return out


def check_dense_chunks(device: str, shape: list[int], steps: int = 3, seed: int = 0) -> dict:
    """APOLLO's plain-AdamW update of an fp32 tensor larger than one dense chunk (``rank=None``, weight
    decay on): the chunked fast path (``foreach=True``) equals the whole-tensor path (``foreach=False``) bit for
    bit after ``steps`` steps, weights and moments; on CUDA also the scratch of the last step of each."""
    import torch

    from lowrank_opt import Apollo
    from lowrank_opt.apollo import dense_chunk_elements

    gen = torch.Generator(device=device).manual_seed(seed)
    w0 = torch.randn(shape, generator=gen, device=device).mul_(0.02)
    grads = [torch.randn(shape, generator=gen, device=device).mul_(1e-3) for _ in range(steps)]

    def run(foreach: bool):
        p = torch.nn.Parameter(w0.clone())
        opt = Apollo([{"params": [p], "rank": None}], lr=1e-3, weight_decay=0.1, foreach=foreach)
        for g in grads[:-1]:
            p.grad = g
            opt.step()
        p.grad = grads[-1]
        with scratch_bytes(device) as last:
            opt.step()
        state = opt.state[p]
        return p.detach(), state["exp_avg"], state["exp_avg_sq"], last["bytes"]

    fast, slow = run(True), run(False)
    equal = all(torch.equal(a, b) for a, b in zip(fast[:3], slow[:3]))
    out = {"device": device, "shape": list(shape), "numel": fast[0].numel(), "steps": steps,
           "chunk_elements": dense_chunk_elements(device),
           "chunks": math.ceil(fast[0].numel() / dense_chunk_elements(device)),
           "chunked_equals_whole": equal, "max_abs_difference": float((fast[0] - slow[0]).abs().max())}
    if device == "cuda":
        out.update(scratch_bytes_chunked=fast[3], scratch_bytes_whole=slow[3])
        out["ok"] = equal and fast[3] < 0.6 * slow[3]  # chunked scratch: about one chunk, not the tensor
    else:
        out["ok"] = equal
    return out


def projection_fingerprint(device: str, shapes: list[list[int]], rank: int, steps: int = 3) -> dict:
    """SHA-256 of what APOLLO draws and computes on ``device`` for bf16 matrices of ``shapes`` (named, seeded
    inputs): P at steps 0 and 2 (update_proj_gap 2: a refresh inside the run), and the weights and moments
    after ``steps`` steps. The same in every process if the draws are."""
    import torch

    from lowrank_opt import Apollo

    gen = torch.Generator(device=device).manual_seed(1234)
    named = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device).mul_(0.02).to(torch.bfloat16))
        named.append((f"layer.{i}.weight", p))
    opt = Apollo([{"params": named}], lr=1e-3, rank=rank, update_proj_gap=2)

    def digest(tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
        return h.hexdigest()

    out = {"P_step0": digest(opt.projection_matrix(p, 0) for _, p in named),
           "P_step2": digest(opt.projection_matrix(p, 2) for _, p in named)}
    for step in range(steps):
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=gen, device=device).mul_(1e-3).to(torch.bfloat16)
        opt.step()
    out["weights"] = digest(p for _, p in named)
    out["moments"] = digest(t for _, p in named for t in (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]))
    return out


def check_projection_across_processes(device: str, shapes: list[list[int]], rank: int,
                                      timeout_s: float = 120) -> dict:
    """A fresh process and this one (which has run other work on the device before) compute
    :func:`projection_fingerprint` on ``device`` at the same time: P depends on (seed, parameter name, refresh)
    only, so the two must agree, and the bf16 rounding bits, seeded the same way, with them."""
    command = [sys.executable, str(Path(__file__).resolve()), "--fingerprint", device, json.dumps(shapes), str(rank)]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    mine = projection_fingerprint(device, shapes, rank)
    prints, errors = [], []
    for child in children:
        try:
            stdout, stderr = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            stdout, stderr = child.communicate()
            errors.append(f"a process ran past {timeout_s:g} s")
            continue
        if child.returncode != 0:
            errors.append(f"exit {child.returncode}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}")
            continue
        prints.append(json.loads(stdout.strip().splitlines()[-1]))
    same = len(prints) == len(children) and all(p == mine for p in prints)
    return {"device": device, "shapes": shapes, "rank": rank, "this_process": mine, "other_processes": prints,
            "errors": errors, "equal_across_processes": same, "ok": same}


CHECKS: dict[str, Callable[..., dict]] = {
    "bf16_row_block_rounding": check_bf16_row_block_rounding,
    "dense_chunks": check_dense_chunks,
    "projection_across_processes": check_projection_across_processes,
}


# ----------------------------------------------------------------------------------------------------------
# The worker: runs units, one JSON line per event


class Worker:
    def __init__(self, device: str, progress_path: Path, smoke: bool):
        self.device = device
        self.smoke = smoke
        self.progress_file = open(progress_path, "a")
        self._params = None  # (size, dtype, ParameterSet): the step-time stage reuses one parameter set
        hang = os.environ.get(HANG_ENV, "")
        self.hang_key, _, count = hang.rpartition(":")
        self.hang_after = int(count) if hang else -1

    def emit(self, event: dict) -> None:
        self.progress_file.write(json.dumps({"t": time.time(), **event}) + "\n")
        self.progress_file.flush()
        os.fsync(self.progress_file.fileno())

    def run(self, stages: list[dict], units: list[dict]) -> None:
        import gc

        import torch

        import lowrank_opt  # noqa: F401

        kinds = {u["kind"] for u in units}
        if kinds & {"fit", "estimator"}:  # the model code too, so that no unit's clock pays for the import
            import transformers.models.llama.modeling_llama  # noqa: F401

            import lowrank_opt.registry  # noqa: F401
        if kinds & {"step_run", "step_paired", "galore_refresh"}:
            import step_time  # noqa: F401

            for kind in PACKAGES:  # apollo-torch, galore-torch (and bitsandbytes they import), where installed
                missing_package(kind)

        # What the imports made lives to the end: out of the collector's way, so that the collections around
        # each measurement take milliseconds, not a third of a second (again after every unit, below).
        gc.freeze()
        self.emit({"event": "hello", "pid": os.getpid(), "device": self.device, "torch": torch.__version__,
                   "cuda": torch.version.cuda})
        by_stage = {s["stage"]: s for s in stages}
        current, skipping = None, None
        for unit in units:
            stage = by_stage[unit["stage"]]
            if unit["stage"] != current:
                current = unit["stage"]
                reason = budget_skip(stage["min_s"], stage["deadline"], time.time()) if stage["first"] else None
                self.emit({"event": "stage", "stage": current, "skipped": reason})
                skipping = reason
            if skipping:
                self.emit({"event": "skipped", "key": unit["key"], "reason": skipping})
                continue
            reason = budget_skip(min(stage["min_s"], unit["max_s"]), stage["deadline"], time.time())
            if reason:
                self.emit({"event": "skipped", "key": unit["key"], "reason": reason.replace("its slice", "the stage")})
                continue
            self.emit({"event": "start", "key": unit["key"]})
            started = time.time()
            reports = [0]

            def progress(record: dict, key=unit["key"]) -> None:
                self.emit({"event": "progress", "key": key, "record": record})
                reports[0] += 1
                if key == self.hang_key and reports[0] >= self.hang_after:
                    time.sleep(3600)  # the test of a unit that runs past its deadline

            try:
                record = self.run_unit(unit, progress)
            except Exception as exc:  # one broken unit must not lose the others
                traceback.print_exc()
                record = {"status": f"error: {type(exc).__name__}: {fit_7b.first_line(exc, 2000)}",
                          "error": traceback.format_exc(limit=3)[-2000:]}
            self.free()
            gc.freeze()  # what is still alive now (the step-time parameter set) stays to the end
            record.setdefault("status", "ok")
            record["wall_s"] = time.time() - started
            self.emit({"event": "done", "key": unit["key"], "record": record})
        self.emit({"event": "bye"})

    def free(self) -> None:
        release_memory(self.device)

    def run_unit(self, unit: dict, progress: Callable[[dict], None]) -> dict:
        kind = unit["kind"]
        if kind == "fit":
            return self.fit(unit, progress)
        if kind in ("step_run", "step_paired", "galore_refresh"):
            return self.step_time(unit, progress)
        if kind == "estimator":
            return self.estimator(unit)
        if kind == "check":
            record = CHECKS[unit["check"]](self.device, **unit["args"])
            return {**record, "status": "passed" if record["ok"] else "FAILED"}
        raise ValueError(f"unknown unit kind {kind!r}")

    # -- stage 1 -------------------------------------------------------------------------------------------

    def fit(self, unit: dict, progress: Callable[[dict], None]) -> dict:
        import torch

        settings = unit["settings"]
        choice = fit_choice(unit_spec(unit))  # the levers too: the Estimates thread builds the same choice
        cuda = self.device == "cuda"
        if choice.kind == "bnb8bit" or choice.options.get("dense_state_bits") == 8:  # bitsandbytes' codec
            problem = fit_7b.bitsandbytes_available()
            if problem:
                return {"status": f"skipped: {problem}", "steps_ok": False}
        fit_7b.free_memory(self.device)
        cap = fit_7b.set_cap(unit["cap_gb"]) if cuda else {"fraction": None, "note": "cpu: no cap"}
        known: dict = {"cap": cap}

        def on_progress(partial: dict) -> None:
            known.update(summarize_steps(partial, settings["batch_size"] * settings["seq_len"]))
            progress(dict(known))

        measured, error, failure_peaks = None, None, {}
        try:
            measured = fit_7b.train_run(settings["config"], choice, device=self.device, seq_len=settings["seq_len"],
                                        batch_size=settings["batch_size"], steps=settings["steps"],
                                        lr=settings["lr"] if settings["lr"] is not None else choice.lr,
                                        seed=settings["seed"], dtype=unit["dtype"], on_progress=on_progress,
                                        trace_cpu_peak=False)
        except Exception as exc:  # an out-of-memory is a result here
            error = {"status": "oom" if fit_7b.is_oom(exc) else f"error: {type(exc).__name__}",
                     "error": f"{type(exc).__name__}: {str(exc).strip()[:2000]}"}
            if cuda:
                failure_peaks = fit_7b.cuda_peaks()
        # Outside the except block: the exception's frames (model, activations) are gone.
        fit_7b.free_memory(self.device)
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
        record = {**known, **failure_peaks}
        if measured is not None:
            record.update(summarize_steps(measured, settings["batch_size"] * settings["seq_len"]))
            record.update(optimizer_state_gb=measured["optimizer_state_gb"], weights_gb=measured["weights_gb"],
                          param_dtype=measured["param_dtype"], first_step_s=measured["first_step_s"],
                          allocated_after_model_gb=measured["allocated_after_model_gb"], status="ok",
                          levers=fit_7b.describe_levers(choice), lean_loss=measured["lean_loss"],
                          weights=measured["weights"])
            if not measured["loss_finite"]:
                record["status"] = "ok, non-finite loss"
        else:
            record.update(error)
        record["steps_ok"] = (record.get("status") == "ok" and record.get("steps_done") == settings["steps"])
        return record

    # -- stage 2 -------------------------------------------------------------------------------------------

    def parameter_set(self, size: str, dtype: str):
        import torch

        import step_time

        if self._params is None or self._params[:2] != (size, dtype):
            self._params = None
            self.free()
            vocab = SMOKE_VOCAB if size == SMOKE_SHAPE.key else step_time.VOCAB
            params = step_time.build_parameter_set(shape_of(size), torch.device(self.device),
                                                   dtype=getattr(torch, dtype), vocab=vocab)
            self._params = (size, dtype, params)
        return self._params[2]

    def step_time(self, unit: dict, progress: Callable[[dict], None]) -> dict:
        import torch

        import step_time

        device = torch.device(self.device)
        size, kind = unit["size"], unit["kind"]
        shape = shape_of(size)
        kinds = {"step_run": [unit.get("optimizer")], "step_paired": [unit.get("ours"), unit.get("theirs")],
                 "galore_refresh": ["galore"]}[kind]
        for name in kinds:
            problem = missing_package(name)
            if problem:
                return {"status": f"skipped: {problem}"}
        params = self.parameter_set(size, unit["dtype"])
        base = {"size": size, "dtype": unit["dtype"], "parameters": params.numel}
        if kind == "step_run":
            result = step_time.run_one(unit["optimizer"], size, params, shape.rank, unit["steps"], unit["warmup"],
                                       device, share_grads=True)
            return {**base, **dataclasses.asdict(result), "total_bytes": result.total_bytes}
        if kind == "step_paired":
            pair = step_time.run_paired(unit["ours"], unit["theirs"], size, params, shape.rank, unit["rounds"],
                                        unit["warmup"], device)
            return {**base, **dataclasses.asdict(pair), "ratio_median": median(pair.ratios),
                    "ratio_min": min(pair.ratios), "ratio_max": max(pair.ratios)}
        # GaLore: its first step computes every projection by SVD (a refresh) and then updates.
        low, rest = params.fresh(share_grads=True)
        optimizer = step_time.build_optimizer("galore", low, rest, shape.rank)
        progress({**base, "note": "first step (the SVD refresh) started"})
        with gc_paused():
            first = timed(optimizer.step, device)
            progress({**base, "refresh_step_ms": first})
            steady = timed_calls(optimizer.step, max(1, unit["steps"] // 2), 0, device)
        del optimizer, low, rest
        return {**base, "optimizer": "galore", "rank": shape.rank, "refresh_step_ms": first,
                "steady_ms": median(steady), "refresh_cost_ms": first - median(steady)}

    # -- stage 3 -------------------------------------------------------------------------------------------

    def estimator(self, unit: dict) -> dict:
        import torch

        choice = fit_7b.resolve_choice(unit["optim"])
        fit_7b.free_memory(self.device)
        if self.device == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
        measured = fit_7b.train_run(unit["config"], choice, device=self.device, seq_len=unit["seq_len"],
                                    batch_size=unit["batch_size"], steps=unit["steps"], lr=choice.lr, seed=0,
                                    trace_cpu_peak=False)
        return {"size": unit["size"], "optim": unit["optim"], "seq_len": unit["seq_len"], "steps": unit["steps"],
                **summarize_steps(measured, unit["batch_size"] * unit["seq_len"]),
                "peak_allocated_gb": measured["peak_allocated_gb"], "peak_reserved_gb": measured["peak_reserved_gb"],
                "optimizer_state_gb": measured["optimizer_state_gb"], "status": "ok"}


def summarize_steps(partial: dict, tokens_per_step: int) -> dict:
    """What a (partial) training run tells: steps done, first/last loss, tokens/s (steps after the first: the
    first allocates the optimizer state), and the allocator's peaks when known."""
    losses = partial.get("losses") or []
    seconds = partial.get("step_seconds") or []
    timed_steps = seconds[1:] or seconds
    out = {"steps_done": len(losses), "losses": list(losses),
           "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
           "tokens_per_s": tokens_per_step / median(timed_steps) if timed_steps else None}
    for key in ("peak_allocated_gb", "peak_reserved_gb"):
        if partial.get(key) is not None:
            out[key] = partial[key]
    return out


def worker_main(plan_path: str, progress_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    _die_with_parent()
    worker = Worker(plan["device"], Path(progress_path), plan["smoke"])
    worker.run(plan["stages"], plan["units"])
    return 0


def _die_with_parent() -> None:
    """The worker runs in its own process group (so that the parent can kill it with the processes it starts);
    it must not outlive the parent, or it would hold the GPU after a cut-short run."""
    parent = os.getppid()
    try:  # Linux: SIGKILL when the parent dies
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


# ----------------------------------------------------------------------------------------------------------
# The estimates (a thread of the parent: no GPU needed)


class Estimates:
    """``fit_7b.predict`` for every fit and estimator unit, computed in a background thread, in unit order."""

    def __init__(self, units: list[dict], device: str):
        self.jobs = []
        self.levers: dict[str, str] = {}  # fit units: the levers each estimate was computed with
        for unit in units:
            if unit["kind"] == "fit":
                s = unit["settings"]
                choice = fit_choice(unit_spec(unit))  # as the worker builds the run: the same levers
                self.levers[unit["key"]] = fit_7b.describe_levers(choice)
                self.jobs.append((unit["key"], s["config"], choice, s["seq_len"], s["batch_size"],
                                  _estimator_dtype(unit["dtype"])))
            elif unit["kind"] == "estimator":  # plain runs, as Worker.estimator builds them
                self.jobs.append((unit["key"], unit["config"], fit_7b.resolve_choice(unit["optim"]), unit["seq_len"],
                                  unit["batch_size"], "bf16"))
        self.device = device
        self.results: dict[str, Optional[dict]] = {}
        self.errors: dict[str, str] = {}
        self.version = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Estimates":
        """Started with the first worker: a run whose every stage is skipped never imports torch."""
        if not self.thread.is_alive() and self.thread.ident is None:
            self.thread.start()
        return self

    def _run(self) -> None:
        for key, config, choice, seq_len, batch_size, dtype in self.jobs:
            try:
                self.results[key] = fit_7b.predict(str(ROOT / config), choice, seq_len, batch_size,
                                                   device=self.device, dtype=dtype)
            except Exception as exc:  # the measurement stands without its estimate
                self.errors[key] = f"{type(exc).__name__}: {fit_7b.first_line(exc)}"
            self.version += 1

    def wait(self, timeout: float) -> None:
        if self.thread.ident is not None:
            self.thread.join(max(0.0, timeout))


def _estimator_dtype(dtype: str) -> str:
    return SHORT_DTYPES[dtype]


# ----------------------------------------------------------------------------------------------------------
# Results: assembled from the units, merged into the file


STATUS_RANK = {"skipped": 0, "not": 0, "killed": 1, "running": 1}  # else (ok, oom, error, ...) finished: 2


def status_rank(record: dict) -> int:
    status = str(record.get("status", ""))
    return STATUS_RANK.get(status.split(":")[0].split(" ")[0], 2)


def merge_records(old: list[dict], new: list[dict]) -> list[dict]:
    """Records by ``key``: a new one replaces an old one unless it got less far (skipped < killed < finished);
    old keys this run did not have are kept (after the new ones)."""
    old_by = {r.get("key"): r for r in old}
    out, seen = [], set()
    for record in new:
        previous = old_by.get(record.get("key"))
        keep_old = previous is not None and status_rank(previous) > status_rank(record)
        out.append(previous if keep_old else record)
        seen.add(record.get("key"))
    out += [r for r in old if r.get("key") not in seen]
    return out


def merge_results(old: Optional[dict], new: dict) -> dict:
    """``new`` (this run's results) merged into ``old`` (the file's): the top level is this run's, the commands
    are appended, every stage's records are merged by :func:`merge_records`, stage summaries recomputed."""
    if not old:
        return new
    merged = {**old, **{k: new[k] for k in ("device", "torch", "cuda", "date", "environment") if k in new}}
    merged["commands"] = list(old.get("commands", [])) + list(new.get("commands", []))
    merged["fit_7b"] = merge_records(old.get("fit_7b", []), new.get("fit_7b", []))
    for stage in ("step_time", "estimator", "cuda_checks"):
        before, now = old.get(stage) or {}, new.get(stage) or {}
        runs = merge_records(before.get("runs", []), now.get("runs", []))
        merged[stage] = {**before, **now, "runs": runs}
    stages = dict(old.get("stages", {}))
    for name, status in new.get("stages", {}).items():
        previous = stages.get(name)
        if str(status.get("status", "")).startswith("not run"):
            continue
        if previous and status_rank(status) < status_rank(previous):  # skipped now, measured before
            stages[name] = {**previous, "last_run": status.get("status")}
        else:
            stages[name] = status
    merged["stages"] = stages
    return summarize_results(merged)


def summarize_results(results: dict) -> dict:
    """The derived figures of each stage, from its records."""
    step = results.get("step_time")
    if step:
        headline = {}
        for r in step.get("runs", []):
            if "ratio_median" in r:
                headline.setdefault(f"{r['ours']} / {r['theirs']}", {})[f"{r['size']}-{SHORT_DTYPES[r['dtype']]}"] = (
                    r["ratio_median"])
        step["paired_ratio_median"] = headline
        step["headline"] = ("ours / adamw-fused (paired per-round median): "
                            + (", ".join(f"{k} {v:.2f}" for k, v in headline.get("ours / adamw-fused", {}).items())
                               or "not measured"))
    est = results.get("estimator")
    if est:
        for r in est.get("runs", []):
            e = r.get("estimate") or {}
            if r.get("peak_allocated_gb") and e.get("allocated_gb"):
                r["measured_over_estimate_allocated"] = r["peak_allocated_gb"] / e["allocated_gb"]
                r["within_target"] = abs(r["measured_over_estimate_allocated"] - 1) <= r.get("target", 0.1)
            if r.get("peak_reserved_gb") and e.get("reserved_gb"):
                r["measured_over_estimate_reserved"] = r["peak_reserved_gb"] / e["reserved_gb"]
        judged = [r["within_target"] for r in est.get("runs", []) if "within_target" in r]
        est["within_target"] = f"{sum(judged)} of {len(judged)}" if judged else "not measured"
    checks = results.get("cuda_checks")
    if checks:
        verdicts = [r.get("ok") for r in checks.get("runs", []) if "ok" in r]
        checks["all_ok"] = bool(verdicts) and all(verdicts) and len(verdicts) == len(checks.get("runs", []))
    return results


class Run:
    """This run's state: units, their records, stage statuses; assembles and writes the results."""

    def __init__(self, args, units: list[dict], stages: list[str], env: dict, estimates: Estimates,
                 start: float, deadlines: dict[str, float], base: Optional[dict]):
        self.args, self.units, self.stages, self.env = args, units, stages, env
        self.estimates, self.start, self.deadlines, self.base = estimates, start, deadlines, base
        self.records: dict[str, dict] = {u["key"]: {"status": "not run"} for u in units}
        self.stage_status: dict[str, dict] = {}
        self.log_file = open(args.log, "a")

    def log(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - self.start:5.0f}s] {text}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def unit_record(self, unit: dict) -> dict:
        record = {"key": unit["key"], **self.records[unit["key"]]}
        if unit["kind"] == "fit":
            levers = {name: unit.get(name, default) for name, default in LEVER_DEFAULTS.items()}
            record = {"key": unit["key"], "optim": unit["optim"], "optim_args": unit["optim_args"], **levers,
                      "cap_gb": unit["cap_gb"], "layerwise": unit["layerwise"], "dtype": unit["dtype"],
                      "config": unit["settings"]["config"], "seq_len": unit["settings"]["seq_len"],
                      "batch_size": unit["settings"]["batch_size"], "steps": unit["settings"]["steps"],
                      "expected": unit["settings"]["expect"], **record}
            record.setdefault("steps_ok", False)
            for name in ("peak_allocated_gb", "peak_reserved_gb", "tokens_per_s", "first_loss", "last_loss",
                         "error"):
                record.setdefault(name, None)
            if status_rank(record) == 2:
                failed = not record["steps_ok"]
                record["as_expected"] = failed if record["expected"] == "oom" else not failed
        if unit["kind"] in ("fit", "estimator"):
            estimate = self.estimates.results.get(unit["key"])
            record["estimate"] = estimate
            if unit["kind"] == "fit":
                record["estimate_total_gb"] = estimate["total_gb"] if estimate else None
                record["estimate_levers"] = self.estimates.levers.get(unit["key"])
            if unit["kind"] == "estimator":
                record["target"] = unit["target"]
            if unit["key"] in self.estimates.errors:
                record["estimate_error"] = self.estimates.errors[unit["key"]]
        record["date"] = self.env["date"]
        return record

    def results(self) -> dict:
        by_stage: dict[str, list[dict]] = {s: [] for s in STAGES}
        for unit in self.units:
            by_stage[unit["stage"]].append(self.unit_record(unit))
        new = {"device": self.env["device"], "torch": self.env["torch"], "cuda": self.env["cuda"],
               "date": self.env["date"],
               "commands": [{"command": self.env["command"], "date": self.env["date"], "device": self.env["device"],
                             "budget_s": self.args.budget_s, "wall_s": round(time.time() - self.start, 1),
                             "stages": self.stages}],
               "fit_7b": by_stage["fit_7b"]}
        for stage in ("step_time", "estimator", "cuda_checks"):
            new[stage] = {"runs": by_stage[stage]} if stage in self.stages else {}
        new["stages"] = {s: self.stage_status.get(s, {"status": "not run"}) for s in self.stages}
        new["environment"] = {k: v for k, v in self.env.items() if k not in ("command", "date")}
        return merge_results(self.base, summarize_results(new))

    def write(self) -> None:
        results = self.results()
        write_json_atomic(self.args.results, results)
        write_text_atomic(Path(self.args.results).with_suffix(".md"), render_markdown(results))


# ----------------------------------------------------------------------------------------------------------
# The parent: runs the workers within the budget


def run_plan(run: Run, plan_units: list[dict], stage_info: dict[str, dict], device: str, smoke: bool) -> None:
    """Start a worker for the units left (those of one environment at a time), follow its events, kill it when
    its unit runs past its deadline, start another for what is left, until nothing is."""
    pending = list(plan_units)
    while pending:
        # What can no longer start is dropped here: no worker is started only to skip it.
        now = time.time()
        head = pending[0]
        name = head["stage"]
        stage = stage_info[name]
        if stage["first"]:
            reason = budget_skip(stage["min_s"], stage["deadline"], now)
            if reason:
                for unit in pending:
                    if unit["stage"] == name:
                        run.records[unit["key"]] = {"status": reason}
                run.stage_status[name] = {"status": reason, "allowed_s": round(max(0.0, stage["deadline"] - now), 1)}
                run.log(f"{name}: {reason}")
                pending = [u for u in pending if u["stage"] != name]
                run.write()
                continue
        else:
            reason = budget_skip(min(stage["min_s"], head["max_s"]), stage["deadline"], now)
            if reason:
                run.records[head["key"]] = {"status": reason.replace("its slice", "the stage")}
                pending.pop(0)
                if not any(u["stage"] == name for u in pending):
                    finish_stage(run, name, stage_info)
                run.write()
                continue
        cut = next((i for i, u in enumerate(pending) if u["env"] != head["env"]), len(pending))
        run.estimates.start()
        finished = run_worker(run, pending[:cut], stage_info, device, smoke)
        pending = [u for u in pending if u["key"] not in finished]
    run.write()


def run_worker(run: Run, units: list[dict], stage_info: dict[str, dict], device: str, smoke: bool) -> set[str]:
    """One worker over ``units``; returns the keys it settled (done, skipped or killed)."""
    work_dir = Path(tempfile.mkdtemp(prefix="gpu_proof_"))  # not beside the results: $OUT brings back 8 files
    plan_path = work_dir / "plan.json"
    progress_path = work_dir / "progress.jsonl"
    stages = []
    for name in dict.fromkeys(u["stage"] for u in units):
        info = stage_info[name]
        stages.append({"stage": name, "deadline": info["deadline"], "min_s": info["min_s"], "first": info["first"]})
    write_json_atomic(plan_path, {"device": device, "smoke": smoke, "stages": stages, "units": units})
    progress_path.touch()
    env = {**os.environ, **{k: str(v) for k, v in units[0]["env"].items()}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(plan_path), str(progress_path)]
    by_key = {u["key"]: u for u in units}
    settled: set[str] = set()
    current: Optional[str] = None
    current_started = time.time()
    run.log_file.flush()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=run.log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    offset, buffer, seen_estimates = 0, "", -1
    try:
        while True:
            exited = proc.poll() is not None  # before reading: then the read gets every line it wrote
            with open(progress_path) as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            buffer += chunk
            *lines, buffer = buffer.split("\n")
            for line in lines:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind = event["event"]
                if kind == "hello":
                    run.env.setdefault("worker_device", event["device"])
                elif kind == "stage" and stage_info[event["stage"]]["first"]:  # not again from a new worker
                    info = stage_info[event["stage"]]
                    info["first"] = False
                    info["started"] = event["t"]
                    if event["skipped"]:
                        run.stage_status[event["stage"]] = {"status": event["skipped"],
                                                            "allowed_s": max(0.0, info["deadline"] - event["t"])}
                        run.log(f"{event['stage']}: {event['skipped']}")
                    else:
                        run.stage_status[event["stage"]] = {"status": "running",
                                                            "allowed_s": round(info["deadline"] - event["t"], 1)}
                        run.log(f"{event['stage']}: started, {info['deadline'] - event['t']:.0f} s allowed")
                elif kind == "start":
                    current, current_started = event["key"], event["t"]
                    run.records[current] = {"status": "running"}
                elif kind == "progress":
                    run.records[event["key"]] = {**event["record"], "status": "running"}
                elif kind in ("done", "skipped"):
                    key = event["key"]
                    record = event["record"] if kind == "done" else {"status": event["reason"]}
                    run.records[key] = record
                    settled.add(key)
                    current = None if key == current else current
                    run.log(f"{by_key[key]['stage']} {key}: {describe(record)}")
                    stage = by_key[key]["stage"]
                    if not any(u["stage"] == stage and u["key"] not in settled for u in units):
                        finish_stage(run, stage, stage_info)
                    run.write()
            if exited and not chunk:
                break
            if run.estimates.version != seen_estimates:  # an estimate arrived: the records show it
                seen_estimates = run.estimates.version
                run.write()
            # The deadline of what runs now: its own limit, and its stage's end.
            now = time.time()
            if current is not None:
                unit = by_key[current]
                limit = min(current_started + unit["max_s"], stage_info[unit["stage"]]["deadline"])
            else:
                waiting = next((u for u in units if u["key"] not in settled), None)
                limit = stage_info[waiting["stage"]]["deadline"] if waiting else now + 60
            if now > limit + KILL_GRACE_S:
                kill(proc)
                if current is not None:
                    unit = by_key[current]
                    why = ("its own limit" if current_started + unit["max_s"] < stage_info[unit["stage"]]["deadline"]
                           else "the stage's slice of the budget")
                    partial = {k: v for k, v in run.records.get(current, {}).items() if k != "status"}
                    run.records[current] = {**partial, "status": f"killed: ran {now - current_started:.0f} s, "
                                                                 f"past {why}"}
                    settled.add(current)
                    run.log(f"{unit['stage']} {current}: {run.records[current]['status']} (what it reported so far "
                            "is kept)")
                    stage = unit["stage"]
                    if not any(u["stage"] == stage and u["key"] not in settled for u in units):
                        finish_stage(run, stage, stage_info)
                    run.write()
                break
            time.sleep(0.2 if run.args.smoke else 0.5)
    finally:
        kill(proc)
        for path in (plan_path, progress_path):
            path.unlink(missing_ok=True)
        work_dir.rmdir()
    if current is not None and current not in settled:  # the worker died inside a unit
        partial = {k: v for k, v in run.records.get(current, {}).items() if k != "status"}
        run.records[current] = {**partial, "status": f"error: the worker exited with code {proc.returncode} "
                                                     "inside this unit (see the log)"}
        settled.add(current)
        run.write()
    if not settled and current is None:  # the worker died before its first unit: do not retry forever
        for unit in units[:1]:
            run.records[unit["key"]] = {"status": f"error: the worker exited with code {proc.returncode} "
                                                  "before this unit (see the log)"}
            settled.add(unit["key"])
    return settled


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()


def finish_stage(run: Run, stage: str, stage_info: dict[str, dict]) -> None:
    status = run.stage_status.get(stage, {})
    if str(status.get("status", "")).startswith("skipped"):
        return
    keys = [u["key"] for u in run.units if u["stage"] == stage]
    unfinished = [k for k in keys if status_rank(run.records[k]) < 2 and not _package_skip(run.records[k])]
    info = stage_info[stage]
    status = {"status": "done" if not unfinished else f"cut: {len(unfinished)} of {len(keys)} units not finished "
                                                        "(budget)",
              "allowed_s": status.get("allowed_s"),
              "wall_s": round(time.time() - info.get("started", time.time()), 1)}
    run.stage_status[stage] = status
    run.log(f"{stage}: {status['status']} in {status['wall_s']:.0f} s")


def _package_skip(record: dict) -> bool:
    status = str(record.get("status", ""))
    return status.startswith("skipped:") and ("not installed" in status or "not import" in status)


def describe(record: dict) -> str:
    status = record.get("status", "?")
    parts = [status]
    for key, fmt in (("peak_allocated_gb", "peak alloc {:.2f} GB"), ("peak_reserved_gb", "reserved {:.2f} GB"),
                     ("tokens_per_s", "{:.0f} tokens/s"), ("steady_ms", "steady {:.1f} ms"),
                     ("ratio_median", "paired ratio {:.2f}"), ("refresh_step_ms", "refresh step {:.0f} ms")):
        if isinstance(record.get(key), (int, float)):
            parts.append(fmt.format(record[key]))
    if record.get("first_loss") is not None and record.get("last_loss") is not None:
        parts.append(f"loss {record['first_loss']:.3f} -> {record['last_loss']:.3f}")
    if "ok" in record:
        parts.append(f"ok={record['ok']}")
    if record.get("error") and status_rank(record) == 2 and status != "ok":
        parts.append(str(record["error"]).splitlines()[0][:300])
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Markdown


def _f(value: Any, digits: int = 2) -> str:
    return "—" if not isinstance(value, (int, float)) else f"{value:,.{digits}f}"


def render_markdown(results: dict) -> str:
    """results.json as tables (docs/gpu/results.md): what the docs' GPU sections are written from."""
    lines = [f"# GPU proof: {results.get('device')}", "",
             f"torch {results.get('torch')}, CUDA {results.get('cuda')}, last run {results.get('date')}. "
             "Generated from results.json by benchmarks/gpu_proof.py; the commands:", ""]
    lines += [f"- `{c.get('command')}` ({c.get('date')}, {c.get('device')}, {c.get('wall_s')} s)"
              for c in results.get("commands", [])]
    lines += ["", "| stage | status |", "|---|---|"]
    lines += [f"| {k} | {v.get('status')} |" for k, v in results.get("stages", {}).items()]
    lines += ["", "## fit_7b", "", "| run | levers | cap GB | status | steps | peak alloc GB | peak reserved GB "
              "| est. total GB | est. alloc GB | tokens/s | loss first → last | as expected |",
              "|---|---|--:|---|--:|--:|--:|--:|--:|--:|---|---|"]
    for r in results.get("fit_7b", []):
        e = r.get("estimate") or {}
        loss = (f"{r['first_loss']:.3f} → {r['last_loss']:.3f}" if r.get("first_loss") is not None
                and r.get("last_loss") is not None else "—")
        lines.append(f"| {r['key']} | {levers_text(r) or '—'} | {r.get('cap_gb', 0):g} | {r.get('status')} "
                     f"| {r.get('steps_done', 0)}/{r.get('steps')} | {_f(r.get('peak_allocated_gb'))} "
                     f"| {_f(r.get('peak_reserved_gb'))} | "
                     f"{_f(r.get('estimate_total_gb'))} | {_f(e.get('allocated_gb'))} | {_f(r.get('tokens_per_s'), 0)} "
                     f"| {loss} | {r.get('as_expected', '—')} |")
    errors = [r for r in results.get("fit_7b", []) if r.get("error")]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {r['key']}: `{str(r['error'])[:600]}`" for r in errors]
    step = results.get("step_time") or {}
    lines += ["", "## step_time", "", step.get("headline", "not run"), "",
              "| run | status | first ms | steady ms | refresh ms | state MiB | P held MiB | paired ratio (median, min, max) |",
              "|---|---|--:|--:|--:|--:|--:|---|"]
    for r in step.get("runs", []):
        ratio = (f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}, {r['ratio_max']:.2f})" if "ratio_median" in r
                 else "")
        lines.append(f"| {r['key']} | {r.get('status')} | {_f(r.get('first_ms'), 1)} | {_f(r.get('steady_ms'), 1)} "
                     f"| {_f(r.get('refresh_ms', r.get('refresh_step_ms')), 1)} "
                     f"| {_f((r.get('state_bytes') or 0) / 2**20 if 'state_bytes' in r else None, 1)} "
                     f"| {_f((r.get('projection_bytes') or 0) / 2**20 if 'projection_bytes' in r else None, 1)} "
                     f"| {ratio} |")
    est = results.get("estimator") or {}
    lines += ["", "## estimator", "", f"Within {100 * 0.1:.0f}%: {est.get('within_target', 'not run')}.", "",
              "| run | status | peak alloc GB | est. alloc GB | measured / est. | peak reserved GB "
              "| est. reserved GB | measured / est. |", "|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in est.get("runs", []):
        e = r.get("estimate") or {}
        lines.append(f"| {r['key']} | {r.get('status')} | {_f(r.get('peak_allocated_gb'))} | {_f(e.get('allocated_gb'))} "
                     f"| {_f(r.get('measured_over_estimate_allocated'), 3)} | {_f(r.get('peak_reserved_gb'))} "
                     f"| {_f(e.get('reserved_gb'))} | {_f(r.get('measured_over_estimate_reserved'), 3)} |")
    checks = results.get("cuda_checks") or {}
    lines += ["", "## cuda_checks", "", f"All ok: {checks.get('all_ok', 'not run')}.", "",
              "| check | status | ok |", "|---|---|---|"]
    lines += [f"| {r['key']} | {r.get('status')} | {r.get('ok', '—')} |" for r in checks.get("runs", [])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu_proof.py",
        description="The GPU proof in one command: fit_7b, step_time, estimator and cuda_checks stages within "
                    "--budget-s, each writing its results to --results (merged, atomically) and --log as it goes. "
                    "--smoke runs every stage on the CPU on tiny configs.",
        epilog="Stage slices: " + ", ".join(f"{s} {SHARES[s]}/8" for s in STAGES) + " of the budget; time a stage "
               "leaves goes to the next. See the module docstring.")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"seconds for all stages together (default {DEFAULT_BUDGET_S}; --smoke: 600)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated stages to run, kept in the order " + ", ".join(STAGES))
    parser.add_argument("--smoke", action="store_true",
                        help="every stage on the CPU on tiny configs (seconds): the script, not GPU numbers")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"results JSON, merged into (default {RESULTS.relative_to(ROOT)}; --smoke: "
                             f"{(SMOKE_DIR / 'results.json').relative_to(ROOT)}); results.md is written beside it")
    parser.add_argument("--log", type=Path, default=None,
                        help="log file, appended to (default: gpu_proof.log beside --results)")
    parser.add_argument("--only", default=None,
                        help="comma-separated unit keys (as in results.json, e.g. apollo_mini_layerwise@16GB): run "
                             "only these, e.g. to redo what an earlier run missed")
    parser.add_argument("--unit-max-s", type=float, default=None,
                        help="no single unit (one training run, one timing, one check) may run longer than this; "
                             "the default is each unit's own limit (fit_7b runs 100 s, its int8 run 150 s, the "
                             "others 40-120 s)")
    parser.add_argument("--replace", action="store_true",
                        help="start --results afresh instead of merging into it (needed when it holds another "
                             "device's results)")
    parser.add_argument("--worker", nargs=2, metavar=("PLAN", "PROGRESS"), help=argparse.SUPPRESS)
    parser.add_argument("--fingerprint", nargs=3, metavar=("DEVICE", "SHAPES", "RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.fingerprint:
        return args
    args.stage_list = [s.lower() for s in split_list(args.stages)]
    unknown = [s for s in args.stage_list if s not in STAGES]
    if unknown or not args.stage_list:
        parser.error(f"--stages: unknown stage(s) {', '.join(unknown) or '(none given)'}; choose from "
                     f"{', '.join(STAGES)}")
    args.stage_list = [s for s in STAGES if s in args.stage_list]
    if args.budget_s is None:
        args.budget_s = 600.0 if args.smoke else float(DEFAULT_BUDGET_S)
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        parser.error(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    if args.results is None:
        args.results = SMOKE_DIR / "results.json" if args.smoke else RESULTS
    if args.log is None:
        args.log = Path(args.results).parent / "gpu_proof.log"
    if args.unit_max_s is not None and not (math.isfinite(args.unit_max_s) and args.unit_max_s > 0):
        parser.error(f"--unit-max-s must be a positive number of seconds, got {args.unit_max_s}")
    args.only_list = split_list(args.only) if args.only is not None else None
    return args


def read_existing(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"gpu_proof.py: error: --results {path} is not valid JSON ({exc}); fix or move it, or "
                         "pass --replace") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    if args.fingerprint:
        device, shapes, rank = args.fingerprint
        print(json.dumps(projection_fingerprint(device, json.loads(shapes), int(rank))))
        return 0
    start = time.time()
    units = build_plan(args.stage_list, args.smoke)  # spec errors before any work
    if args.only_list is not None:
        known = {u["key"] for u in units}
        unknown = [k for k in args.only_list if k not in known]
        if unknown:
            print(f"gpu_proof.py: error: --only: no unit {', '.join(unknown)} in the stages "
                  f"{','.join(args.stage_list)}; the units: {', '.join(sorted(known))}", file=sys.stderr)
            return 2
        units = [u for u in units if u["key"] in args.only_list]
    if args.unit_max_s is not None:
        units = [{**u, "max_s": min(u["max_s"], args.unit_max_s)} for u in units]
    if args.smoke:  # no torch in this process: the worker imports it
        device, device_name = "cpu", "cpu"
        torch_version, cuda_version = package_version("torch"), None
    else:
        import torch

        torch_version, cuda_version = torch.__version__, torch.version.cuda
        if not torch.cuda.is_available():
            print("gpu_proof.py: error: no CUDA GPU is available (torch.cuda.is_available() is False); nothing was "
                  "run or written. On a CPU: python benchmarks/gpu_proof.py --smoke", file=sys.stderr)
            return EXIT_NO_CUDA
        device, device_name = "cuda", torch.cuda.get_device_name(0)
    base = None if args.replace else read_existing(Path(args.results))
    if base and base.get("device") != device_name:
        print(f"gpu_proof.py: error: {args.results} holds results from {base.get('device')!r}, this run is on "
              f"{device_name!r}: results of two devices are not merged. Pass another --results, or --replace to "
              "start it afresh.", file=sys.stderr)
        return 2
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    env = {"device": device_name, "torch": torch_version, "cuda": cuda_version, "date": utc_now(),
           "command": command_line("gpu_proof.py", argv), "smoke": args.smoke,
           "python": sys.version.split()[0], "cpu_count": os.cpu_count()}
    stages = [s for s in args.stage_list if any(u["stage"] == s for u in units)]  # --only may leave some out
    deadlines = stage_deadlines(stages, start, args.budget_s)
    mode = "smoke" if args.smoke else "gpu"
    stage_info = {s: {"deadline": deadlines[s], "min_s": STAGE_MIN_S[mode][s], "first": True} for s in stages}
    estimates = Estimates(units, device)
    run = Run(args, units, stages, env, estimates, start, deadlines, base)
    run.log(f"{env['command']} | {device_name}, torch {env['torch']}, CUDA {env['cuda']} | budget "
            f"{args.budget_s:.0f} s: " + ", ".join(f"{s} until +{deadlines[s] - start:.0f} s" for s in stages))

    def stop(signum, frame):  # a cut-short run still writes what it has
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        run_plan(run, units, stage_info, device, args.smoke)
        if any(status_rank(run.records[key]) == 2 for key, *_ in estimates.jobs):  # measured: wait for its estimate
            estimates.wait(start + args.budget_s - time.time() + 5)
    except KeyboardInterrupt as exc:
        for key, record in run.records.items():
            if record.get("status") == "running":
                run.records[key] = {**record, "status": f"killed: the run was interrupted ({exc})"}
        run.log(f"interrupted ({exc}): writing what was measured")
    finally:
        run.write()
        run.log(f"wrote {args.results} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
