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
  adamw-fused       torch.optim.AdamW(fused=True); not run unless named in --optimizers

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
dict); ours keeps them only with cache_projection=True (a cache inside Apollo, never saved). Counted by
lowrank_opt.memory.measure (each storage once, at the size allocated: a view counts its whole storage).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    SIZES,
    VOCAB,
    LlamaShape,
    begin,
    gc_paused,
    initial_weight,
    llama_parameter_shapes,
    load_average,
    markers,
    peak_rss_text,
    random_tensor,
    release_memory,
    round_ratios,
    split_list,
    state_bytes,
    timed,
    timed_calls,
    timed_rounds,
    write_section,
)
from _common import mib as _mib  # noqa: E402
from _common import ms as _ms  # noqa: E402
from _common import now_text  # noqa: E402

SECTION_BEGIN, SECTION_END = markers("step_time", "benchmarks/step_time.py")
UPDATE_PROJ_GAP = 200
LR = 1e-3
BETAS = (0.9, 0.999)

OPTIMIZERS = ("adamw", "apollo-torch", "galore", "ours", "ours-cached", "apollo-torch-mini", "ours-mini",
              "ours-simple")
# Accepted by --optimizers but not run by default: torch's fused AdamW (the baseline of the GPU proof).
EXTRA_OPTIMIZERS = ("adamw-fused",)
# (ours, reference) pairs compared in the comparison table and, with --paired-rounds, stepped alternately.
PAIRS = (("ours", "apollo-torch"), ("ours-cached", "apollo-torch"), ("ours-mini", "apollo-torch-mini"),
         ("ours", "ours-simple"))


# ----------------------------------------------------------------------------------------------------------
# The parameter set


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


def build_parameter_set(shape: LlamaShape, device: torch.device, seed: int = 0,
                        dtype: torch.dtype = torch.float32, vocab: int = VOCAB) -> ParameterSet:
    """Every weight of the LLaMA ``shape`` with a random gradient, in ``dtype`` (drawn in fp32)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    names, lowrank, weights, grads = [], [], [], []
    for name, dims, is_low in llama_parameter_shapes(shape, vocab):
        names.append(name)
        lowrank.append(is_low)
        weights.append(initial_weight(dims, gen, device, dtype))
        grads.append(random_tensor(dims, gen, device, 1e-3, dtype))
    return ParameterSet(names, lowrank, weights, grads)


# ----------------------------------------------------------------------------------------------------------
# The optimizers under test


def _plain(named):
    return [p for _, p in named]


def build_optimizer(kind: str, low, rest, rank: int) -> torch.optim.Optimizer:
    if kind in ("adamw", "adamw-fused"):
        fast = dict(foreach=True) if kind == "adamw" else dict(fused=True)
        return torch.optim.AdamW(_plain(low) + _plain(rest), lr=LR, betas=BETAS, weight_decay=0.0, **fast)
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
    return not kind.startswith("adamw")


# ----------------------------------------------------------------------------------------------------------
# Measurements


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


def run_one(kind: str, size: str, params: ParameterSet, rank: int, steps: int, warmup: int,
            device: torch.device, share_grads: bool = False) -> Result:
    """One optimizer on fresh clones of the weights (and of the gradients, unless ``share_grads``): the first
    step, the median of ``steps`` steady steps after ``warmup`` untimed ones, the state bytes, and one step
    at a projection-refresh boundary."""
    low, rest = params.fresh(share_grads=share_grads)
    optimizer = build_optimizer(kind, low, rest, rank)
    with gc_paused():
        first = timed(optimizer.step, device)
        steady = timed_calls(optimizer.step, steps, warmup, device)
        tensors, projections = state_bytes(optimizer)
        refresh = None
        if has_projection_refresh(kind):
            move_to_refresh_boundary(optimizer, UPDATE_PROJ_GAP)
            refresh = timed(optimizer.step, device)
    result = Result(kind, size, 1 if kind.endswith("mini") else rank, first, statistics.median(steady),
                    min(steady), refresh, tensors, projections, steady)
    del optimizer, low, rest
    release_memory(device)
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
    optimizers = {}
    for kind in (ours, theirs):
        low, rest = params.fresh(share_grads=True)
        optimizers[kind] = build_optimizer(kind, low, rest, rank)
        for _ in range(1 + warmup):
            optimizers[kind].step()
    with gc_paused():
        times = timed_rounds({kind: opt.step for kind, opt in optimizers.items()}, rounds, device)
    del optimizers
    release_memory(device)
    return Paired(size, ours, theirs, round_ratios(times, ours, theirs), times[ours], times[theirs])


# ----------------------------------------------------------------------------------------------------------
# Reporting


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
        "`cache_projection=True` (a cache inside Apollo, never saved). *total* is the sum; the "
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
        f"Run {now_text()} on {args.device}: {machine}. "
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
        + ". Optimizers: " + ", ".join(OPTIMIZERS) + " (also " + ", ".join(EXTRA_OPTIMIZERS)
        + "). See the module docstring for what is timed and counted.",
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
    args.size_list = [s.lower() for s in split_list(args.sizes)]
    for size in args.size_list:
        if size not in SIZES:
            parser.error(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    args.optimizer_list = split_list(args.optimizers)
    for kind in args.optimizer_list:
        if kind not in OPTIMIZERS + EXTRA_OPTIMIZERS:
            parser.error(f"unknown optimizer {kind!r}; choose from {', '.join(OPTIMIZERS + EXTRA_OPTIMIZERS)}")
    if args.steps < 1 or args.warmup < 0 or args.paired_rounds < 0:
        parser.error("--steps must be >= 1, --warmup and --paired-rounds >= 0")
    if args.rank is not None and args.rank < 1:
        parser.error("--rank must be >= 1")
    return args


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

    peak_rss = peak_rss_text()
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
