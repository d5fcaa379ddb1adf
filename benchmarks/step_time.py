"""Optimizer step time and optimizer-state bytes on the parameters of the paper's LLaMA models.

    python benchmarks/step_time.py --threads 1                   # 130m and 350m, writes docs/benchmarks.md
    python benchmarks/step_time.py --sizes 130m --optimizers ours,apollo-torch,ours-mini,apollo-torch-mini \\
        --threads 1 --paired-rounds 12 --output FILE             # the paired ours / apollo-torch ratio
    python benchmarks/step_time.py --scaling                     # per shape class, 60m..7b, + CSV and PNG
    python benchmarks/step_time.py --scaling --custom 64,172,2,16 --vocab 256 --output -    # tiny, print only

Only parameter tensors are built, random gradients assigned once, every optimizer on clones of the same ones: ours
by registry name (:data:`OURS`), the others from ``_common.BASELINES``. Default mode: one optimizer at a time, then
each of --pairs stepped alternately; --scaling: per shape class, scaled to the whole model. What is measured, and
how to read it: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    BASELINES, SIZES, VOCAB, LlamaShape, baseline_missing, build_baseline, build_ours, check_at_least, command_line,
    csv_text, gc_paused, initial_weight, llama_parameter_shapes, load_average, machine_line, mib, ms, now_text,
    parameter_count, pyplot, random_tensor, release_memory, rotations, round_ratios, save_figure,
    section, shape_classes, split_list, state_bytes, table, timed, timed_calls, timed_rounds, write_json_atomic,
    write_section, write_text_atomic)

LR, BETAS, UPDATE_PROJ_GAP = 1e-3, (0.9, 0.999), 200
# Our variants: (registry name, options). ours-simple is the one-tensor-at-a-time path the fast one is tested
# against; ours-cached keeps P between refreshes (never saved).
OURS = {"ours": ("apollo", {}), "ours-cached": ("apollo", {"cache_projection": True}),
        "ours-mini": ("apollo_mini", {}), "ours-simple": ("apollo", {"foreach": False})}
KNOWN = (*OURS, *BASELINES)
DEFAULT_OPTIMIZERS = ("torch-adamw", "apollo-torch", "galore-torch", "ours", "ours-cached", "apollo-torch-mini",
                      "ours-mini", "ours-simple")
DEFAULT_PAIRS = "ours/apollo-torch,ours-cached/apollo-torch,ours-mini/apollo-torch-mini,ours/ours-simple"
DEFAULT_SIZES = {"step": "130m,350m", "scaling": "60m,130m,350m,1b,7b"}
DENSE_PROXY = {"ours-cached": "ours", "ours-mini": "ours", "ours-simple": "ours", "apollo-torch-mini": "apollo-torch"}
REFRESH_TARGET = 100.0  # GaLore's refresh cost / ours-cached's
NOISE_FRACTION, NOISE_FLOOR_MS = 0.02, 1e-3


def build(kind: str, low: list, rest: list, rank: int):
    """Optimizer ``kind`` on the (name, parameter) lists ``low`` (the low-rank matrices) and ``rest``."""
    if kind in OURS:
        name, options = OURS[kind]
        groups = [g for g in ({"params": rest, "rank": None}, {"params": low}) if g["params"]]
        return build_ours(name, groups, rank=rank, lr=LR, betas=BETAS, weight_decay=0.0,
                          update_proj_gap=UPDATE_PROJ_GAP, **options)
    return build_baseline(kind, rest, lowrank_params=low, lr=LR, rank=rank, update_proj_gap=UPDATE_PROJ_GAP,
                          betas=BETAS)


def projects(kind: str) -> bool:
    return kind in OURS or BASELINES[kind].lowrank is not None


def move_to_refresh_boundary(optimizer) -> None:
    """Every step counter to the next multiple of update_proj_gap, so that the next step() refreshes P (the
    counters only enter the bias correction)."""
    import torch

    for state in optimizer.state.values():
        step = state.get("step")
        if step is not None:
            target = (int(step) // UPDATE_PROJ_GAP + 1) * UPDATE_PROJ_GAP
            if isinstance(step, torch.Tensor):
                step.fill_(target)
            else:
                state["step"] = target


def fresh(named: list, share_grads: bool) -> list:
    """Clones of (name, weight, gradient) triples as (name, parameter) pairs; gradients shared on request (the
    optimizers only read them)."""
    import torch

    out = []
    for name, w, g in named:
        p = torch.nn.Parameter(w.clone())
        p.grad = g if share_grads else g.clone()
        out.append((name, p))
    return out


# ----------------------------------------------------------------------------------------------------------
# Default mode: the whole parameter set, one optimizer at a time


@dataclass
class Result:
    optimizer: str
    size: str
    rank: Optional[int]  # None: no projection
    first_ms: float
    steady_ms: float
    steady_min_ms: float
    refresh_ms: Optional[float]
    state_bytes: int
    projection_bytes: int
    total_bytes = property(lambda self: self.state_bytes + self.projection_bytes)


@dataclass
class Paired:
    size: str
    ours: str
    theirs: str
    ratios: list[float]
    ours_ms: list[float]
    theirs_ms: list[float]


def parameter_set(shape: LlamaShape, vocab: int, device, dtype) -> dict[str, list]:
    """Every weight of ``shape`` with a random gradient: {"low": [(name, w, g)], "rest": [...]}."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    out = {"low": [], "rest": []}
    for name, dims, is_low in llama_parameter_shapes(shape, vocab):
        w = initial_weight(dims, gen, device, dtype)
        out["low" if is_low else "rest"].append((name, w, random_tensor(dims, gen, device, 1e-3, dtype)))
    return out


def run_one(kind: str, size: str, params: dict, rank: int, args, device) -> Result:
    optimizer = build(kind, fresh(params["low"], False), fresh(params["rest"], False), rank)
    with gc_paused():
        first = timed(optimizer.step, device)
        steady = timed_calls(optimizer.step, args.steps, args.warmup, device)
        state, held = state_bytes(optimizer)
        refresh = None
        if projects(kind):
            move_to_refresh_boundary(optimizer)
            refresh = timed(optimizer.step, device)
    del optimizer
    release_memory(device)
    return Result(kind, size, (1 if "mini" in kind else rank) if projects(kind) else None, first,
                  statistics.median(steady), min(steady),
                  refresh, state, held)


def run_paired(ours: str, theirs: str, size: str, params: dict, rank: int, args, device) -> Paired:
    """Both optimizers alive, stepped alternately (the order swapped every round), gradients shared."""
    optimizers = {}
    for kind in (ours, theirs):
        optimizers[kind] = build(kind, fresh(params["low"], True), fresh(params["rest"], True), rank)
        for _ in range(1 + args.warmup):
            optimizers[kind].step()
    with gc_paused():
        times = timed_rounds({k: o.step for k, o in optimizers.items()}, args.paired_rounds, device)
    del optimizers
    release_memory(device)
    return Paired(size, ours, theirs, round_ratios(times, ours, theirs), times[ours], times[theirs])


def step_tables(results: list[Result], paired: list[Paired], pairs) -> list[str]:
    adamw = {r.size: r.total_bytes for r in results if r.optimizer == "torch-adamw"}
    main = table(["optimizer", "size", "rank", "first step ms", "steady ms (median)", "steady min ms",
                  "refresh step ms", "state MiB", "P held MiB", "total MiB", "total % of torch-adamw"],
                 [[r.optimizer, r.size, r.rank or "—", ms(r.first_ms), ms(r.steady_ms), ms(r.steady_min_ms),
                   ms(r.refresh_ms), mib(r.state_bytes), mib(r.projection_bytes), mib(r.total_bytes),
                   f"{100 * r.total_bytes / adamw[r.size]:.1f}%" if r.size in adamw else "—"] for r in results],
                 "lllrrrrrrrr")
    by = {(r.size, r.optimizer): r for r in results}
    rows = []
    for size in dict.fromkeys(r.size for r in results):
        for a, b in pairs:
            x, y = by.get((size, a)), by.get((size, b))
            if x and y:
                refresh = f"{x.refresh_ms / y.refresh_ms:.2f}" if x.refresh_ms and y.refresh_ms else "—"
                rows.append([size, f"{a} / {b}", f"{x.steady_ms / y.steady_ms:.2f}",
                             f"{x.steady_min_ms / y.steady_min_ms:.2f}", refresh,
                             f"{x.total_bytes / y.total_bytes:.3f}"])
    ratios = table(["size", "pair", "steady ratio (median)", "(min)", "refresh ratio", "total state ratio"], rows,
                   "llrrrr") if rows else ""
    pair_table = table(["size", "ours vs", "rounds", "per-round step time ratio: median", "min", "max",
                        "ours median ms", "theirs median ms"],
                       [[p.size, f"{p.ours} / {p.theirs}", len(p.ratios), f"{statistics.median(p.ratios):.2f}",
                         f"{min(p.ratios):.2f}", f"{max(p.ratios):.2f}", ms(statistics.median(p.ours_ms)),
                         ms(statistics.median(p.theirs_ms))] for p in paired], "llrrrrrr") if paired else ""
    return [main, ratios, pair_table]


def sizes_table(shapes: dict[str, LlamaShape], vocab: int) -> str:
    return table(["size", "hidden", "intermediate", "layers", "rank", "vocab", "parameters"],
                 [[k, s.hidden, s.intermediate, s.layers, s.rank, vocab, _count(parameter_count(s, vocab))]
                  for k, s in shapes.items()], "lrrrrrr")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


# ----------------------------------------------------------------------------------------------------------
# --scaling: per shape class


@dataclass
class Measurement:
    """One optimizer on one shape class; times are for stepping all K tensors of the class."""

    optimizer: str
    first_ms: float
    steady_ms: list[float]
    refresh_ms: Optional[float]
    state_bytes: int
    held_bytes: int
    median_ms = property(lambda self: statistics.median(self.steady_ms))


@dataclass
class ClassRun:
    size: str
    cls: object  # _common.ShapeClass
    k: int
    results: dict[str, Measurement]
    ratios: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def per_matrix(self, value: Optional[float]) -> Optional[float]:
        return None if value is None else value / self.k

    def ratio(self, a: str, b: str) -> Optional[float]:
        r = self.ratios.get((a, b))
        return statistics.median(r) if r else None

    def get(self, kind: str) -> Optional[Measurement]:
        """``kind``'s measurement, on a dense class that of the optimizer standing in for it."""
        return self.results.get(kind) or (None if self.cls.matrix else self.results.get(DENSE_PROXY.get(kind, "")))

    def refresh_cost(self, kind: str) -> tuple[Optional[float], float]:
        """Per matrix: (refresh step - steady median, the noise it is read against: the steady spread, at least
        NOISE_FRACTION of the steady step and NOISE_FLOOR_MS)."""
        m = self.results.get(kind)
        if m is None or m.refresh_ms is None:
            return None, 0.0
        noise = max(max(m.steady_ms) - min(m.steady_ms), NOISE_FRACTION * m.median_ms) / self.k
        return (m.refresh_ms - m.median_ms) / self.k, max(noise, NOISE_FLOOR_MS)


def run_class(size: str, cls, kinds: list[str], rank: int, args, device, seed: int, pairs) -> ClassRun:
    import torch

    k = cls.built(args.max_elements)
    gen = torch.Generator(device=device).manual_seed(seed)
    named = [(f"{cls.name}.{j}", initial_weight(cls.dims, gen, device, args.torch_dtype),
              random_tensor(cls.dims, gen, device, 1e-3, args.torch_dtype)) for j in range(k)]
    optimizers = {}
    for kind in kinds:
        params = fresh(named, False)
        optimizers[kind] = build(kind, params if cls.matrix else [], [] if cls.matrix else params, rank)
    del named
    results = {}
    with gc_paused():
        first = {kind: timed(opt.step, device) for kind, opt in optimizers.items()}
        for opt in optimizers.values():  # warm-up round
            opt.step()
        steady = timed_rounds({kind: opt.step for kind, opt in optimizers.items()}, args.steps, device)
        refresh: dict[str, list[float]] = {kind: [] for kind in kinds if cls.matrix and projects(kind)}
        for order in rotations(list(refresh), args.refresh_steps):
            for kind in order:
                move_to_refresh_boundary(optimizers[kind])
                refresh[kind].append(timed(optimizers[kind].step, device))
        for kind, opt in optimizers.items():
            results[kind] = Measurement(kind, first[kind], steady[kind],
                                        statistics.median(refresh[kind]) if refresh.get(kind) else None,
                                        *state_bytes(opt))
    run = ClassRun(size, cls, k, results, {(a, b): round_ratios(steady, a, b) for a, b in pairs
                                           if a in steady and b in steady})
    for kind, m in results.items():
        print(f"#     {kind:18s} steady {ms(run.per_matrix(m.median_ms)):>8s} ms/matrix  refresh "
              f"{ms(run.per_matrix(m.refresh_ms)):>8s} ms/matrix", flush=True)
    del optimizers
    release_memory(device)
    return run


def whole_model(size: str, runs: list[ClassRun], kinds: list[str]) -> dict[str, tuple[float, float]]:
    """optimizer -> (step ms, state bytes incl. held P) of the whole model: per-matrix figures x count."""
    out = {}
    for kind in kinds:
        found = [(run, run.get(kind)) for run in runs if run.size == size]
        if found and all(m is not None for _, m in found):
            out[kind] = (sum(m.median_ms / r.k * r.cls.count for r, m in found),
                         sum((m.state_bytes + m.held_bytes) / r.k * r.cls.count for r, m in found))
    return out


def scaling_tables(runs: list[ClassRun], sizes: dict, args, pairs) -> list[str]:
    kinds, out = args.optimizer_list, []
    pairs = [(a, b) for a, b in pairs if any(run.ratio(a, b) is not None for run in runs)]
    for size in sizes:
        rows = [[r.cls.name, str(tuple(r.cls.dims)), r.cls.count, r.k,
                 *[ms(r.per_matrix(r.results[k].median_ms)) if k in r.results else "—" for k in kinds],
                 *[f"{r.ratio(a, b):.2f}" if r.ratio(a, b) is not None else "—" for a, b in pairs]]
                for r in runs if r.size == size]
        out.append(f"**{size}**, steady step ms per matrix and median per-round ratios:\n\n"
                   + table(["class", "shape", "count", "K", *kinds, *(f"{a} / {b}" for a, b in pairs)], rows,
                           "llrr" + "r" * (len(kinds) + len(pairs))))
    rows = []
    for size, shape in sizes.items():
        whole = whole_model(size, runs, kinds)
        for kind, (step, nbytes) in whole.items():
            ref = whole.get("apollo-torch-mini" if kind == "ours-mini" else "apollo-torch")
            adamw = whole.get("torch-adamw")
            rows.append([size, _count(parameter_count(shape, args.vocab)), kind, ms(step),
                         f"{step / ref[0]:.2f}" if ref and kind in OURS else "", mib(nbytes),
                         f"{100 * nbytes / adamw[1]:.1f}%" if adamw else "—"])
    out.append(table(["size", "parameters", "optimizer", "whole-model step ms", "vs apollo-torch (-mini)",
                      "state MiB", "% of torch-adamw"], rows, "lrlrrrr"))
    rows = []
    for r in runs:
        galore, galore_noise = r.refresh_cost("galore-torch")
        ours, ours_noise = r.refresh_cost("ours-cached")
        if galore is None or ours is None:
            continue
        in_noise = ours <= ours_noise
        ratio = galore / (ours_noise if in_noise else ours)
        verdict = ("not shown" if galore <= galore_noise or (in_noise and ratio < REFRESH_TARGET)
                   else "met" if ratio >= REFRESH_TARGET else "NOT met")
        rows.append([r.size, r.cls.name, ms(galore), ms(ours) + (" (in noise)" if in_noise else ""), ms(ours_noise),
                     ("≥ " if in_noise else "") + f"{ratio:,.0f}x", verdict])
    if rows:
        out.append(table(["size", "class", "GaLore refresh cost ms/matrix", "ours-cached refresh cost",
                          "ours-cached noise", f"GaLore / ours-cached (target ≥ {REFRESH_TARGET:g}x)", "verdict"],
                         rows, "llrrrrl"))
    rows = []
    for a, b in pairs:
        judged = [(r, r.ratio(a, b)) for r in runs if r.ratio(a, b) is not None and (a == "ours" or r.cls.matrix)]
        missed = [f"{r.size} {r.cls.name} {x:.2f}" for r, x in judged if x > 1.0]
        rows.append([f"{a} ≤ {b} on every class", len(judged), f"{max(x for _, x in judged):.2f}",
                     ", ".join(missed) or "— (met)"])
    out.append(table(["target (median per-round ratio)", "cells", "worst", "not met on"], rows, "lrrl"))
    return out


CSV_FIELDS = ["size", "class", "shape", "count", "K", "optimizer", "first_ms_per_matrix",
              "steady_median_ms_per_matrix", "steady_min_ms_per_matrix", "steady_max_ms_per_matrix",
              "refresh_ms_per_matrix", "state_bytes_per_matrix", "held_p_bytes_per_matrix"]


def scaling_csv(runs: list[ClassRun]) -> str:
    return csv_text(CSV_FIELDS, [
        [r.size, r.cls.name, "x".join(map(str, r.cls.dims)), r.cls.count, r.k, kind, f"{m.first_ms / r.k:.6g}",
         f"{m.median_ms / r.k:.6g}", f"{min(m.steady_ms) / r.k:.6g}", f"{max(m.steady_ms) / r.k:.6g}",
         "" if m.refresh_ms is None else f"{m.refresh_ms / r.k:.6g}", f"{m.state_bytes / r.k:.10g}",
         f"{m.held_bytes / r.k:.10g}"] for r in runs for kind, m in r.results.items()])


def write_plot(path: Path, runs: list[ClassRun], sizes: dict, args) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    points = {size: whole_model(size, runs, args.optimizer_list) for size in sizes}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, index, label in ((axes[0], 0, "whole-model optimizer step, ms"),
                             (axes[1], 1, "whole-model optimizer state incl. held P, bytes")):
        for kind in args.optimizer_list:
            xy = sorted((parameter_count(sizes[s], args.vocab), w[kind][index]) for s, w in points.items() if kind in w)
            if xy:
                ax.plot(*zip(*xy), "--" if "mini" in kind else "-", marker="o", markersize=4, label=kind)
        ax.set(xscale="log", yscale="log", xlabel="model parameters", ylabel=label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return True


# ----------------------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="benchmarks/step_time.py", description=__doc__.split("\n\n")[0],
                                     epilog="Optimizers: " + ", ".join(KNOWN) + ". See the module docstring.")
    parser.add_argument("--scaling", action="store_true", help="per shape class, scaled to the whole model")
    parser.add_argument("--sizes", default=None, help="comma-separated, from " + ", ".join(SIZES)
                        + f" (default {DEFAULT_SIZES['step']}; --scaling: {DEFAULT_SIZES['scaling']})")
    parser.add_argument("--custom", default=None, metavar="H,I,L,RANK",
                        help="also a synthetic size 'custom' of this hidden, intermediate, layers and rank")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="rows of embed_tokens/lm_head (default %(default)s)")
    parser.add_argument("--optimizers", default=None, help="comma-separated, in this order (default: "
                        + ",".join(DEFAULT_OPTIMIZERS) + "; --scaling: the same but ours-simple)")
    parser.add_argument("--pairs", default=DEFAULT_PAIRS, help="A/B pairs compared (those whose both are run)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer, --scaling: rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (default 2)")
    parser.add_argument("--refresh-steps", type=int, default=None,
                        help="refresh steps timed per optimizer, median used (default 1; --scaling: 3)")
    parser.add_argument("--paired-rounds", type=int, default=8, help="rounds per pair, 0: none (default 8)")
    parser.add_argument("--rank", type=int, default=None, help="rank for every size (default: the paper's per size)")
    parser.add_argument("--max-elements", type=int, default=2**24, help="--scaling: elements built per class")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights and gradients")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", default="docs/benchmarks.md",
                        help="Markdown file whose section is replaced ('-': print only)")
    parser.add_argument("--json", default="", help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    mode = "scaling" if args.scaling else "step"
    sizes = args.sizes if args.sizes is not None else ("" if args.custom else DEFAULT_SIZES[mode])
    args.shapes = {}
    for size in split_list(sizes.lower()):
        if size not in SIZES or size in args.shapes:
            parser.error(f"--sizes: unknown or repeated size {size!r}; choose from {', '.join(SIZES)}")
        args.shapes[size] = SIZES[size]
    if args.custom is not None:
        try:
            h, i, layers, rank = (int(x) for x in args.custom.split(","))
        except ValueError:
            parser.error(f"--custom: expected four integers H,I,L,RANK, got {args.custom!r}")
        if min(h, i, layers, rank) < 1 or rank > min(h, i):
            parser.error(f"--custom: need H, I, L, RANK >= 1 and RANK <= min(H, I), got {args.custom!r}")
        args.shapes["custom"] = LlamaShape(h, i, layers, rank)
    if not args.shapes:
        parser.error("--sizes: no size to run (give --sizes or --custom)")
    default = [k for k in DEFAULT_OPTIMIZERS if not (args.scaling and k == "ours-simple")]
    args.optimizer_list = split_list(args.optimizers) if args.optimizers is not None else default
    unknown = [k for k in args.optimizer_list if k not in KNOWN]
    if unknown or not args.optimizer_list or len(set(args.optimizer_list)) != len(args.optimizer_list):
        parser.error(f"--optimizers: unknown, repeated or none in {args.optimizers!r}; choose from {', '.join(KNOWN)}")
    args.pair_list = []
    for pair in split_list(args.pairs):
        a, _, b = pair.partition("/")
        if a not in KNOWN or b not in KNOWN:
            parser.error(f"--pairs: {pair!r} is not A/B with A and B from {', '.join(KNOWN)}")
        args.pair_list.append((a, b))
    if args.refresh_steps is None:
        args.refresh_steps = 3 if args.scaling else 1
    check_at_least(parser.error, ("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--vocab", args.vocab, 1),
                   ("--paired-rounds", args.paired_rounds, 0), ("--refresh-steps", args.refresh_steps, 1),
                   ("--max-elements", args.max_elements, 1), ("--rank", 1 if args.rank is None else args.rank, 1),
                   ("--threads", 1 if args.threads is None else args.threads, 1))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"step_time.py: --device cuda was asked for, but torch finds no CUDA device (torch {torch.__version__},"
              f" CUDA build: {torch.version.cuda or 'no'}). Rerun with --device cpu.", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device, args.torch_dtype = torch.device(args.device), getattr(torch, args.dtype)
    command, load_start = command_line("step_time.py", argv), load_average()
    machine = f"{machine_line(device)}; {args.dtype} weights"
    print(f"# {command}\n# {machine}\n# load average {load_start}", flush=True)
    usable = [k for k in args.optimizer_list if k in OURS or not baseline_missing(k)]
    for kind in set(args.optimizer_list) - set(usable):
        print(f"# {kind}: skipped ({baseline_missing(kind)})", flush=True)
    args.optimizer_list = usable
    pairs = [(a, b) for a, b in args.pair_list if a in usable and b in usable]
    results, paired, runs = [], [], []
    for index, (size, shape) in enumerate(args.shapes.items()):
        rank = args.rank or shape.rank
        print(f"# {size}: {_count(parameter_count(shape, args.vocab))} parameters, rank {rank}", flush=True)
        if args.scaling:
            for cls_index, cls in enumerate(shape_classes(shape, args.vocab)):
                kinds = usable if cls.matrix else list(dict.fromkeys(DENSE_PROXY.get(k, k) for k in usable))
                print(f"#   {size} {cls.name} {tuple(cls.dims)} x {cls.count}: building "
                      f"K={cls.built(args.max_elements)}, {len(kinds)} optimizers", flush=True)
                runs.append(run_class(size, cls, kinds, rank, args, device, 1000 * index + cls_index, pairs))
            continue
        params = parameter_set(shape, args.vocab, device, args.torch_dtype)
        for kind in usable:
            results.append(r := run_one(kind, size, params, rank, args, device))
            print(f"#   {kind:18s} first {ms(r.first_ms):>8s} ms  steady {ms(r.steady_ms):>8s} ms  refresh "
                  f"{ms(r.refresh_ms):>8s} ms  state {mib(r.state_bytes)} MiB + P {mib(r.projection_bytes)} MiB",
                  flush=True)
        for a, b in pairs if args.paired_rounds else []:
            paired.append(run_paired(a, b, size, params, rank, args, device))
            print(f"#   paired {a} / {b}: per-round ratio median {statistics.median(paired[-1].ratios):.2f}",
                  flush=True)
        del params
        release_memory(device)

    machine += f"; load average {load_start} at the start, {load_average()} at the end"
    if sys.platform.startswith("linux"):  # getrusage's unit differs elsewhere
        from lowrank_opt.memory.measure import peak_rss_bytes

        machine += f"; peak RSS {peak_rss_bytes() / 2**30:.1f} GiB"
    printing = args.output in ("", "-")
    folder = Path(tempfile.gettempdir()) if printing else Path(args.output).resolve().parent
    if args.scaling:
        tables = [sizes_table(args.shapes, args.vocab), *scaling_tables(runs, args.shapes, args, pairs),
                  "Per-matrix figures: `scaling.csv`."]
        write_text_atomic(folder / "scaling.csv", scaling_csv(runs))
        if write_plot(folder / "scaling.png", runs, args.shapes, args):
            tables.append("![step time and state bytes against parameter count](scaling.png)")
        print(f"# wrote {folder / 'scaling.csv'}")
    else:
        tables = [sizes_table(args.shapes, args.vocab), *step_tables(results, paired, pairs)]
    print("\n\n".join(t for t in tables if t))
    if args.json:
        write_json_atomic(args.json, {"command": command, "machine": machine,
                                      "results": [asdict(r) for r in results], "paired": [asdict(p) for p in paired],
                                      "classes": [{"size": r.size, "class": r.cls.name, "k": r.k,
                                                   "results": {k: asdict(m) for k, m in r.results.items()}}
                                                  for r in runs]})
    if not printing:
        name = "scaling" if args.scaling else "step_time"
        text = section(name, "benchmarks/step_time.py", command, f"Run {now_text()} on {machine}.", *tables)
        write_section(args.output, text, name)
        print(f"# wrote the {name} section of {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
