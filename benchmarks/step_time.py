"""Optimizer step time and optimizer-state memory on the parameter set of the paper's LLaMA models.

    python benchmarks/step_time.py                       # 130m and 350m on CPU, writes docs/benchmarks.md
    python benchmarks/step_time.py --sizes 60m --steps 3 --output /tmp/bench.md
    python benchmarks/step_time.py --sizes 1b --device cuda

Only the parameter tensors of a LLaMA model are built (no modules, no forward/backward): per layer
q/k/v/o (hidden x hidden), gate/up (intermediate x hidden), down (hidden x intermediate) and two RMSNorm
weights; embed_tokens and lm_head (vocab x hidden) and the final norm. Weights and gradients are fp32 and
random; the gradients are assigned once and every optimizer gets fresh clones of the same weights and
gradients, in one process, one optimizer at a time. The attention/MLP matrices form the low-rank group;
embeddings, lm_head and norms get plain AdamW in every low-rank optimizer (the paper's setup).

Optimizers (all lr 1e-3, betas (0.9, 0.999), weight decay 0):
  adamw             torch.optim.AdamW(foreach=True)
  apollo-torch      apollo_torch.APOLLOAdamW: proj random, channel, scale 1, update_proj_gap 200, proj_type std
  galore            galore_torch.GaLoreAdamW: update_proj_gap 200, scale 0.25, proj_type std (SVD projector)
  ours              lowrank_opt.Apollo, channel, scale 1, update_proj_gap 200 (P regenerated every step)
  ours-cached       the same with cache_projection=True (P kept between refreshes, never saved)
  apollo-torch-mini APOLLOAdamW as APOLLO-Mini: rank 1, tensor, scale 128
  ours-mini         lowrank_opt.apollo_mini (rank 1, tensor, scale 128)
  ours-simple       ours with foreach=False: the simple one-tensor-at-a-time reference path the fast path
                    (foreach and chunked updates of the plain-AdamW tensors) is tested against

Timing (time.perf_counter, torch.cuda.synchronize around each step on CUDA, Python GC off while timing):
  first step    the first step() call: allocates the state, draws P (APOLLO) or runs the SVDs (GaLore);
  steady step   median of --steps step() calls after --warmup untimed ones;
  refresh step  one step() at a projection-refresh boundary: the step counters in the optimizer state are
                moved to the next multiple of update_proj_gap (200) so that GaLore recomputes its SVDs and
                APOLLO draws new P without running 200 steps (the counters only enter the bias correction);
  paired        (--paired-rounds) ours and apollo-torch alive at once, stepped alternately: the per-round
                time ratio holds up on a shared machine where other processes come and go.
State bytes: every tensor in optimizer.state, plus the projection matrices P an optimizer holds between
steps: apollo-torch and GaLore keep them in state["projector"].ortho_matrix (a pickled object in the state
dict); ours keeps them only with cache_projection=True (Apollo._projection_cache, never saved).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import cpu_model, load_average, markers, write_section  # noqa: E402

SECTION_BEGIN, SECTION_END = markers("step_time", "benchmarks/step_time.py")
VOCAB = 32000
UPDATE_PROJ_GAP = 200
LR = 1e-3
BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class LlamaShape:
    """Paper Table 11 (shared with GaLore): hidden / intermediate / layers; ranks are the paper's scripts'."""

    hidden: int
    intermediate: int
    layers: int
    rank: int


SIZES = {
    "60m": LlamaShape(512, 1376, 8, 128),
    "130m": LlamaShape(768, 2048, 12, 192),
    "350m": LlamaShape(1024, 2736, 24, 256),
    "1b": LlamaShape(2048, 5461, 32, 256),
    "7b": LlamaShape(4096, 11008, 32, 256),
}

OPTIMIZERS = ("adamw", "apollo-torch", "galore", "ours", "ours-cached", "apollo-torch-mini", "ours-mini",
              "ours-simple")
# (ours, reference) pairs compared in the comparison table and, with --paired-rounds, stepped alternately.
PAIRS = (("ours", "apollo-torch"), ("ours-cached", "apollo-torch"), ("ours-mini", "apollo-torch-mini"),
         ("ours", "ours-simple"))


# ----------------------------------------------------------------------------------------------------------
# The parameter set


def llama_parameter_shapes(shape: LlamaShape) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, low-rank?) for every weight of a LLaMA model, named as in Hugging Face's LlamaForCausalLM."""
    h, i = shape.hidden, shape.intermediate
    out = [("model.embed_tokens.weight", (VOCAB, h), False)]
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((f"{prefix}.self_attn.{proj}.weight", (h, h), True))
        out.append((f"{prefix}.mlp.gate_proj.weight", (i, h), True))
        out.append((f"{prefix}.mlp.up_proj.weight", (i, h), True))
        out.append((f"{prefix}.mlp.down_proj.weight", (h, i), True))
        out.append((f"{prefix}.input_layernorm.weight", (h,), False))
        out.append((f"{prefix}.post_attention_layernorm.weight", (h,), False))
    out.append(("model.norm.weight", (h,), False))
    out.append(("lm_head.weight", (VOCAB, h), False))
    return out


@dataclass
class ParameterSet:
    names: list[str]
    lowrank: list[bool]
    weights: list[torch.Tensor]
    grads: list[torch.Tensor]

    @property
    def numel(self) -> int:
        return sum(w.numel() for w in self.weights)

    @property
    def lowrank_numel(self) -> int:
        return sum(w.numel() for w, low in zip(self.weights, self.lowrank) if low)

    def fresh(self, share_grads: bool = False):
        """Cloned weights with cloned gradients (or the shared ones: every optimizer here only reads
        ``p.grad``), split into (low-rank matrices, the rest), as lists of (name, param)."""
        low, rest = [], []
        for name, is_low, w, g in zip(self.names, self.lowrank, self.weights, self.grads):
            p = torch.nn.Parameter(w.clone())
            p.grad = g if share_grads else g.clone()
            (low if is_low else rest).append((name, p))
        return low, rest


def build_parameter_set(shape: LlamaShape, device: torch.device, seed: int = 0) -> ParameterSet:
    gen = torch.Generator(device=device).manual_seed(seed)
    names, lowrank, weights, grads = [], [], [], []
    for name, dims, is_low in llama_parameter_shapes(shape):
        names.append(name)
        lowrank.append(is_low)
        if len(dims) == 1:
            weights.append(torch.ones(dims, device=device))  # RMSNorm weights start at 1
        else:
            weights.append(torch.randn(dims, generator=gen, device=device).mul_(0.02))
        grads.append(torch.randn(dims, generator=gen, device=device).mul_(1e-3))
    return ParameterSet(names, lowrank, weights, grads)


# ----------------------------------------------------------------------------------------------------------
# The optimizers under test


def _plain(named):
    return [p for _, p in named]


def build_optimizer(kind: str, low, rest, rank: int) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(_plain(low) + _plain(rest), lr=LR, betas=BETAS, weight_decay=0.0, foreach=True)
    if kind in ("apollo-torch", "apollo-torch-mini"):
        from apollo_torch import APOLLOAdamW

        if kind == "apollo-torch":
            lowrank = dict(rank=rank, proj="random", scale_type="channel", scale=1.0)
        else:
            lowrank = dict(rank=1, proj="random", scale_type="tensor", scale=128.0)
        lowrank.update(update_proj_gap=UPDATE_PROJ_GAP, proj_type="std")
        groups = [{"params": _plain(rest)}, {"params": _plain(low), **lowrank}]
        return APOLLOAdamW(groups, lr=LR, betas=BETAS, weight_decay=0.0)
    if kind == "galore":
        from galore_torch import GaLoreAdamW

        lowrank = dict(rank=rank, update_proj_gap=UPDATE_PROJ_GAP, scale=0.25, proj_type="std")
        groups = [{"params": _plain(rest)}, {"params": _plain(low), **lowrank}]
        return GaLoreAdamW(groups, lr=LR, betas=BETAS, weight_decay=0.0, no_deprecation_warning=True)
    if kind in ("ours", "ours-cached", "ours-mini", "ours-simple"):
        from lowrank_opt import Apollo, apollo_mini

        groups = [{"params": rest, "rank": None}, {"params": low}]
        cache = kind == "ours-cached"
        if kind == "ours-mini":
            return apollo_mini(groups, lr=LR, betas=BETAS, weight_decay=0.0, update_proj_gap=UPDATE_PROJ_GAP)
        return Apollo(groups, lr=LR, betas=BETAS, weight_decay=0.0, rank=rank, scale_type="channel", scale=1.0,
                      update_proj_gap=UPDATE_PROJ_GAP, cache_projection=cache, foreach=kind != "ours-simple")
    raise ValueError(f"unknown optimizer {kind!r}")


def has_projection_refresh(kind: str) -> bool:
    return kind != "adamw"


# ----------------------------------------------------------------------------------------------------------
# Measurements


def state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes of tensors in optimizer.state, bytes of projection matrices held between steps)."""
    tensors = projections = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                tensors += value.nbytes
            elif hasattr(value, "ortho_matrix"):  # apollo-torch / GaLore projector objects kept in state
                matrix = value.ortho_matrix
                for m in matrix if isinstance(matrix, (list, tuple)) else [matrix]:
                    if isinstance(m, torch.Tensor):
                        projections += m.nbytes
    for _, matrix in getattr(optimizer, "_projection_cache", {}).values():  # ours, cache_projection=True
        projections += matrix.nbytes
    return tensors, projections


def move_to_refresh_boundary(optimizer: torch.optim.Optimizer, gap: int) -> None:
    """Set every step counter to the next multiple of ``gap`` so the next step() refreshes the projection."""
    for state in optimizer.state.values():
        step = state.get("step")
        if step is None:
            continue
        current = int(step)
        target = (current // gap + 1) * gap
        if isinstance(step, torch.Tensor):
            step.fill_(target)
        else:
            state["step"] = target


@dataclass
class Result:
    optimizer: str
    size: str
    rank: int
    first_ms: float
    steady_ms: float
    steady_min_ms: float
    refresh_ms: Optional[float]
    state_bytes: int
    projection_bytes: int
    steady_all_ms: list[float] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.projection_bytes


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def run_one(kind: str, size: str, params: ParameterSet, rank: int, steps: int, warmup: int,
            device: torch.device) -> Result:
    low, rest = params.fresh()
    optimizer = build_optimizer(kind, low, rest, rank)
    gc.collect()
    gc.disable()
    try:
        first = timed(optimizer.step, device)
        for _ in range(warmup):
            optimizer.step()
        steady = [timed(optimizer.step, device) for _ in range(steps)]
        tensors, projections = state_bytes(optimizer)
        refresh = None
        if has_projection_refresh(kind):
            move_to_refresh_boundary(optimizer, UPDATE_PROJ_GAP)
            refresh = timed(optimizer.step, device)
    finally:
        gc.enable()
    result = Result(kind, size, 1 if kind.endswith("mini") else rank, first, statistics.median(steady),
                    min(steady), refresh, tensors, projections, steady)
    del optimizer, low, rest
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


@dataclass
class Paired:
    size: str
    ours: str
    theirs: str
    ratios: list[float]
    ours_ms: list[float]
    theirs_ms: list[float]


def run_paired(ours: str, theirs: str, size: str, params: ParameterSet, rank: int, rounds: int, warmup: int,
               device: torch.device) -> Paired:
    """Both optimizers alive at once, stepped alternately (order swapped every round): background load on a
    shared machine then hits both alike, and the per-round time ratio stays meaningful when medians do not.
    Gradients are shared (read only) to halve the memory."""
    kinds = (ours, theirs)
    optimizers = {}
    for kind in kinds:
        low, rest = params.fresh(share_grads=True)
        optimizers[kind] = build_optimizer(kind, low, rest, rank)
        for _ in range(1 + warmup):
            optimizers[kind].step()
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    gc.collect()
    gc.disable()
    try:
        for round_index in range(rounds):
            for kind in kinds if round_index % 2 == 0 else kinds[::-1]:
                times[kind].append(timed(optimizers[kind].step, device))
    finally:
        gc.enable()
    del optimizers
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ratios = [a / b for a, b in zip(times[ours], times[theirs])]
    return Paired(size, ours, theirs, ratios, times[ours], times[theirs])


# ----------------------------------------------------------------------------------------------------------
# Reporting


def machine_line(device: torch.device) -> str:
    parts = [f"CPU {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} intra-op threads)"]
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    for package in ("apollo-torch", "galore-torch"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} not installed")
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


def _ms(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f}"


def results_table(results: list[Result]) -> str:
    adamw = {r.size: r.total_bytes for r in results if r.optimizer == "adamw"}
    rows = [
        "| optimizer | size | rank | first step ms | steady step ms (median) | steady min ms | refresh step ms "
        "| state MiB | P held MiB | total MiB | total as % of AdamW |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        share = f"{100.0 * r.total_bytes / adamw[r.size]:.1f}%" if r.size in adamw else "—"
        rank = "—" if r.optimizer == "adamw" else str(r.rank)
        rows.append(
            f"| {r.optimizer} | {r.size} | {rank} | {_ms(r.first_ms)} | {_ms(r.steady_ms)} | {_ms(r.steady_min_ms)} "
            f"| {_ms(r.refresh_ms)} "
            f"| {_mib(r.state_bytes)} | {_mib(r.projection_bytes)} | {_mib(r.total_bytes)} | {share} |"
        )
    return "\n".join(rows)


def comparison_table(results: list[Result]) -> str:
    """Ours against apollo-torch, per size: step-time ratio (< 1 is faster) and total bytes ratio."""
    by = {(r.size, r.optimizer): r for r in results}
    rows = ["| size | ours vs | steady step time ratio (median) | (min) | refresh step time ratio "
            "| total state ratio |",
            "|---|---|---:|---:|---:|---:|"]
    for size in dict.fromkeys(r.size for r in results):
        for ours, theirs in PAIRS:
            a, b = by.get((size, ours)), by.get((size, theirs))
            if a is None or b is None:
                continue
            refresh = f"{a.refresh_ms / b.refresh_ms:.2f}" if a.refresh_ms and b.refresh_ms else "—"
            rows.append(f"| {size} | {ours} / {theirs} | {a.steady_ms / b.steady_ms:.2f} "
                        f"| {a.steady_min_ms / b.steady_min_ms:.2f} | {refresh} "
                        f"| {a.total_bytes / b.total_bytes:.3f} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def paired_table(paired: list[Paired]) -> str:
    rows = ["| size | ours vs | rounds | per-round step time ratio: median | min | max "
            "| ours median ms | theirs median ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for p in paired:
        rows.append(f"| {p.size} | {p.ours} / {p.theirs} | {len(p.ratios)} | {statistics.median(p.ratios):.2f} "
                    f"| {min(p.ratios):.2f} | {max(p.ratios):.2f} | {_ms(statistics.median(p.ours_ms))} "
                    f"| {_ms(statistics.median(p.theirs_ms))} |")
    return "\n".join(rows)


def target_lines(results: list[Result], paired: list[Paired]) -> list[str]:
    """The issue's targets, checked on this run: our step no slower than apollo-torch's, our state smaller."""
    by = {(r.size, r.optimizer): r for r in results}
    by_pair = {(p.size, p.ours, p.theirs): p for p in paired}
    lines = []
    for size in dict.fromkeys(r.size for r in results):
        for ours, theirs in (("ours", "apollo-torch"), ("ours-mini", "apollo-torch-mini")):
            a, b = by.get((size, ours)), by.get((size, theirs))
            if a is None or b is None:
                continue
            ratio = a.steady_ms / b.steady_ms
            pair = by_pair.get((size, ours, theirs))
            paired_ratio = statistics.median(pair.ratios) if pair else None
            deciding = paired_ratio if paired_ratio is not None else ratio
            speed = "met" if deciding <= 1.0 else "NOT met"
            paired_text = f", paired per-round median {paired_ratio:.2f}" if paired_ratio is not None else ""
            memory = "met" if a.total_bytes < b.total_bytes else "NOT met"
            lines.append(
                f"- {size}, {ours} vs {theirs}: step time {speed} (steady median ratio {ratio:.2f}{paired_text}); "
                f"smaller state {memory} ({_mib(a.total_bytes)} vs {_mib(b.total_bytes)} MiB, "
                f"{_mib(b.total_bytes - a.total_bytes)} MiB less: the P matrices apollo-torch keeps in its state)."
            )
    return lines


def sizes_table(sizes: list[str], params_numel: dict[str, tuple[int, int]]) -> str:
    rows = ["| size | hidden | intermediate | layers | parameters | in low-rank matrices | default rank |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for size in sizes:
        s = SIZES[size]
        total, low = params_numel[size]
        rows.append(f"| {size} | {s.hidden} | {s.intermediate} | {s.layers} | {total / 1e6:.1f} M "
                    f"| {low / 1e6:.1f} M ({100 * low / total:.0f}%) | {s.rank} |")
    return "\n".join(rows)


def render_section(command: str, machine: str, args, results: list[Result], sizes_md: str, peak_rss: str,
                   loads: tuple[str, str], paired: list[Paired]) -> str:
    comparison = comparison_table(results)
    notes = [
        "- Step time is the optimizer's `step()` alone: no forward or backward pass. Gradients are random "
        "fp32 tensors assigned once, every optimizer gets fresh clones of the same weights and gradients, "
        "all in one process, one optimizer at a time.",
        "- Low-rank group: every attention and MLP matrix (q, k, v, o, gate, up, down). Embeddings, lm_head and "
        "RMSNorm weights get plain AdamW in every optimizer, so at these sizes most of the remaining state is "
        "the AdamW state of the two vocab x hidden matrices.",
        f"- *first step*: the first `step()` (allocates state, draws P or, for GaLore, runs the SVDs). "
        f"*steady*: median (and minimum) of {args.steps} calls after {args.warmup} untimed ones; a median far "
        f"above the minimum means the machine was busy. *refresh*: one call at a "
        f"projection-refresh boundary, reached by moving the step counters in the state to the next multiple "
        f"of update_proj_gap={UPDATE_PROJ_GAP} (they only enter the bias correction): GaLore recomputes its "
        "SVDs, APOLLO draws new P. Ours without caching draws P on every step, so its refresh step is "
        "an ordinary step.",
        "- *state MiB*: all tensors in `optimizer.state` (moments, step and limiter-norm tensors). *P held MiB*: "
        "projection matrices kept in memory between steps: apollo-torch and GaLore store them in the state "
        "(`state[p][\"projector\"].ortho_matrix`, a pickled object in the state dict); ours only with "
        "`cache_projection=True` (`Apollo._projection_cache`, never saved). *total* is the sum; the "
        "percentage is of AdamW's total for the same size.",
        "- GaLore is `galore_torch.GaLoreAdamW` (scale 0.25, proj_type std); apollo-torch Mini is "
        "`APOLLOAdamW` with rank 1, scale_type tensor, scale 128. Learning rate 1e-3, weight decay 0 for all.",
    ]
    if peak_rss:
        notes.append(f"- Peak resident memory of the whole benchmark process: {peak_rss}.")
    parts = [
        SECTION_BEGIN,
        "## Optimizer step time and state memory (`benchmarks/step_time.py`)",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Run {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} on {args.device}: {machine}. "
        f"Load average (1/5/15 min) {loads[0]} at the start, {loads[1]} at the end.",
        "",
        "Parameter sets (LLaMA, paper Table 11, vocab 32000, fp32):",
        "",
        sizes_md,
        "",
        results_table(results),
        "",
    ]
    if comparison:
        parts += ["Ours relative to apollo-torch, from the table above (below 1 means ours is faster or smaller):",
                  "", comparison, ""]
    if paired:
        parts += ["Paired runs: ours and apollo-torch both alive, stepped alternately, so that load from other "
                  "processes falls on both (ratio below 1 means ours is faster):", "", paired_table(paired), ""]
    targets = target_lines(results, paired)
    if targets:
        parts += ["Targets (\"our step is no slower than apollo-torch's and our state is smaller, no cached P unless "
                  "asked\"), judged by the paired ratio where there is one:", "", *targets, ""]
    parts += ["Notes:", "", *notes, "", SECTION_END]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="benchmarks/step_time.py",
        description=__doc__.split("\n\n")[0] + " Writes a markdown table to stdout and to --output.",
        epilog="Sizes: " + ", ".join(f"{k} (hidden {v.hidden}, intermediate {v.intermediate}, {v.layers} layers, "
                                      f"rank {v.rank})" for k, v in SIZES.items())
        + ". Optimizers: " + ", ".join(OPTIMIZERS) + ". See the module docstring for what is timed and counted.",
    )
    parser.add_argument("--sizes", default="130m,350m",
                        help="comma-separated model sizes from: " + ", ".join(SIZES) + " (default: %(default)s)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help="comma-separated optimizers to run, in this order (default: all: %(default)s)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steady-state steps per optimizer; the median is reported (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps after the (separately timed) first step (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=None,
                        help="rank of the APOLLO/GaLore projection for every size (default: the paper's per size: "
                             + ", ".join(f"{k} {v.rank}" for k, v in SIZES.items()) + "); Mini always uses 1")
    parser.add_argument("--paired-rounds", type=int, default=8,
                        help="after the table, step ours and apollo-torch alternately for this many rounds per "
                             "pair and report per-round time ratios, which survive a busy machine; 0 skips it "
                             "(default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, usually the core count)")
    parser.add_argument("--output", default="docs/benchmarks.md",
                        help="markdown file whose step_time section is created or replaced; '' or '-' to only "
                             "print (default: %(default)s)")
    args = parser.parse_args(argv)
    args.size_list = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    for size in args.size_list:
        if size not in SIZES:
            parser.error(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    args.optimizer_list = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for kind in args.optimizer_list:
        if kind not in OPTIMIZERS:
            parser.error(f"unknown optimizer {kind!r}; choose from {', '.join(OPTIMIZERS)}")
    if args.steps < 1 or args.warmup < 0 or args.paired_rounds < 0:
        parser.error("--steps must be >= 1, --warmup and --paired-rounds >= 0")
    if args.rank is not None and args.rank < 1:
        parser.error("--rank must be >= 1")
    return args


def begin(script: str, args, argv) -> Optional[tuple[torch.device, str, str, str]]:
    """The start of a benchmark run (step_time.py, scaling.py): check --device, apply --threads, print the
    command line, machine and load. Returns (device, command, machine, load average), or None (after saying
    why) when --device cuda finds no CUDA device."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{script}: --device cuda was asked for, but torch finds no CUDA device "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Rerun with --device cpu.",
              file=sys.stderr)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    command = shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])
    machine = machine_line(device)
    load_start = load_average()
    print(f"# {command}\n# {machine}\n# load average {load_start}", flush=True)
    return device, command, machine, load_start


def main(argv=None) -> int:
    args = parse_args(argv)
    started = begin("step_time.py", args, argv)
    if started is None:
        return 2
    device, command, machine, load_start = started

    results: list[Result] = []
    paired: list[Paired] = []
    numel: dict[str, tuple[int, int]] = {}
    for size in args.size_list:
        shape = SIZES[size]
        rank = args.rank if args.rank is not None else shape.rank
        params = build_parameter_set(shape, device)
        numel[size] = (params.numel, params.lowrank_numel)
        print(f"# {size}: {params.numel / 1e6:.1f} M parameters, rank {rank}", flush=True)
        for kind in args.optimizer_list:
            try:
                result = run_one(kind, size, params, rank, args.steps, args.warmup, device)
            except ImportError as exc:
                print(f"#   {kind}: skipped ({exc})", flush=True)
                continue
            results.append(result)
            print(f"#   {kind:18s} first {_ms(result.first_ms):>8s} ms  steady {_ms(result.steady_ms):>8s} ms "
                  f"(min {_ms(result.steady_min_ms)})  refresh {_ms(result.refresh_ms):>8s} ms  "
                  f"state {_mib(result.state_bytes)} MiB + P {_mib(result.projection_bytes)} MiB", flush=True)
        if args.paired_rounds:
            for ours, theirs in PAIRS:
                if ours not in args.optimizer_list or theirs not in args.optimizer_list:
                    continue
                try:
                    pair = run_paired(ours, theirs, size, params, rank, args.paired_rounds, args.warmup, device)
                except ImportError as exc:
                    print(f"#   paired {ours} / {theirs}: skipped ({exc})", flush=True)
                    continue
                paired.append(pair)
                print(f"#   paired {ours} / {theirs}: per-round ratio median {statistics.median(pair.ratios):.2f} "
                      f"(min {min(pair.ratios):.2f}, max {max(pair.ratios):.2f})", flush=True)
        del params
        gc.collect()

    peak_rss = ""
    if sys.platform.startswith("linux"):
        peak_rss = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
    print(f"\n# load average {load_average()}\n")
    print(results_table(results))
    comparison = comparison_table(results)
    if comparison:
        print()
        print(comparison)
    if paired:
        print()
        print(paired_table(paired))
    if args.output not in ("", "-"):
        write_section(args.output, render_section(command, machine, args, results, sizes_table(args.size_list, numel),
                                                  peak_rss, (load_start, load_average()), paired),
                      SECTION_BEGIN, SECTION_END)
        print(f"\nwrote the step_time section of {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
