"""Optimizer step time and optimizer-state bytes against model size, per shape class of the paper's LLaMA models.

    python benchmarks/scaling.py                          # 60m, 130m, 350m, 1b, 7b on CPU, writes docs/benchmarks.md
    python benchmarks/scaling.py --sizes 60m --rounds 1 --output -          # smoke run, print only
    python benchmarks/scaling.py --sizes 1b,7b --device cuda
    python benchmarks/scaling.py --custom 64,172,2,16 --vocab 256 --output /tmp/scaling.md   # tiny, for tests

A LLaMA model's parameters fall into five shape classes (h hidden, i intermediate, L layers, vocab 32000):
  attn        (h, h)       x 4L       q/k/v/o projections            low-rank group
  gate_up     (i, h)       x 2L       MLP gate and up projections    low-rank group
  down        (h, i)       x L        MLP down projection            low-rank group
  embed_head  (vocab, h)   x 2        embed_tokens and lm_head       plain AdamW in every optimizer
  norm        (h,)         x 2L+1     RMSNorm weights                plain AdamW in every optimizer
Per size and class only K = min(count, max(1, --max-elements // numel)) tensors are built (fp32, random,
seeded; gradients assigned once; every optimizer gets clones of the same weights and gradients), and the
per-matrix figures (class figures / K) are scaled back up by the class count: whole-model step time and
state bytes are the sums over the classes of per-matrix figure x count. The 7b classes are built one or two
matrices at a time, so a whole 7B model never has to fit in memory.

Optimizers: those of benchmarks/step_time.py (adamw, apollo-torch, galore, ours, ours-cached,
apollo-torch-mini, ours-mini; same settings, built by step_time.build_optimizer). On the dense classes
(embed_head, norm) every low-rank optimizer runs its plain-AdamW path, so only adamw, apollo-torch, galore
and ours run there; ours-cached and ours-mini take ours' figures for them, apollo-torch-mini apollo-torch's.

Timing (time.perf_counter, torch.cuda.synchronize around each step on CUDA, Python GC off while timing). All
optimizers of a class are alive at once:
  first step    each optimizer's first step() (allocates the state, draws P, GaLore's SVDs);
  steady        one untimed warm-up round, then --rounds rounds, each stepping every optimizer once in turn
                (the order rotates every round), so that load from other processes falls on all alike; the
                median per optimizer, and for (ours, apollo-torch), (ours-cached, apollo-torch) and
                (ours-mini, apollo-torch-mini) the median of the per-round time ratios;
  refresh       (matrix classes) step counters moved to the next multiple of update_proj_gap (200) with
                step_time.move_to_refresh_boundary, then one timed step, --refresh-rounds times per optimizer
                (round-robin, median): GaLore recomputes its SVDs, APOLLO draws new P. Refresh cost = refresh
                step - steady median (floored at a small positive value).
State bytes: every tensor in optimizer.state plus the projection matrices held between steps
(_common.state_bytes: counted by lowrank_opt.memory.measure).

Outputs: tables on stdout; unless --output is '-', the "scaling" section of --output (docs/benchmarks.md),
and beside it scaling.csv (one row per size/class/optimizer, per-matrix figures) and scaling.png (log-log:
whole-model step time and state bytes against parameter count). With --output - the CSV and PNG go to the
temporary directory.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402
from _common import (  # noqa: E402
    SIZES,
    VOCAB,
    LlamaShape,
    ShapeClass,
    begin,
    gc_paused,
    initial_weight,
    load_average,
    markers,
    mib,
    now_text,
    parameter_count,
    peak_rss_text,
    pyplot,
    random_tensor,
    release_memory,
    rotations,
    round_ratios,
    save_figure,
    shape_classes,
    split_list,
    state_bytes,
    timed,
    timed_rounds,
    write_section,
    write_text_atomic,
)
from step_time import UPDATE_PROJ_GAP, build_optimizer, move_to_refresh_boundary  # noqa: E402

SECTION_BEGIN, SECTION_END = markers("scaling", "benchmarks/scaling.py")
DEFAULT_SIZES = ("60m", "130m", "350m", "1b", "7b")
OPTIMIZERS = tuple(kind for kind in step_time.OPTIMIZERS if kind != "ours-simple")  # the same code per matrix
PAIRS = tuple(pair for pair in step_time.PAIRS if "ours-simple" not in pair)
# On the dense classes every low-rank optimizer is plain AdamW: the optimizer whose figures stand in.
DENSE_PROXY = {"ours-cached": "ours", "ours-mini": "ours", "apollo-torch-mini": "apollo-torch"}
DENSE_OPTIMIZERS = ("adamw", "apollo-torch", "galore", "ours")
DEFAULT_MAX_ELEMENTS = 2**24
REFRESH_FLOOR_MS = 1e-3  # per matrix: a refresh cost at or below this is reported as this (noise)
NOISE_FRACTION = 0.02  # a step-time difference below this share of the steady step is not told from noise
TARGET_REFRESH_RATIO = 100.0


@dataclass
class Measurement:
    """One optimizer on one shape class; times are for stepping all K tensors of the class."""

    size: str
    cls: ShapeClass
    k: int
    optimizer: str
    first_ms: float
    steady_ms: list[float]
    refresh_ms: Optional[float]
    state_bytes: int
    held_p_bytes: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.steady_ms)

    def per_matrix(self, value: Optional[float]) -> Optional[float]:
        return None if value is None else value / self.k

    @property
    def refresh_cost_ms(self) -> Optional[float]:
        """Per matrix, raw (may be negative when the refresh is lost in the noise)."""
        if self.refresh_ms is None:
            return None
        return (self.refresh_ms - self.median_ms) / self.k

    @property
    def spread_ms(self) -> float:
        """Per matrix: max - min of the steady steps."""
        return (max(self.steady_ms) - min(self.steady_ms)) / self.k

    @property
    def noise_ms(self) -> float:
        """Per matrix, what a refresh cost is read against: the steady spread, but at least NOISE_FRACTION of
        the steady step (a few rounds underestimate the spread) and at least REFRESH_FLOOR_MS."""
        return max(self.spread_ms, NOISE_FRACTION * self.median_ms / self.k, REFRESH_FLOOR_MS)


@dataclass
class ClassRun:
    size: str
    cls: ShapeClass
    k: int
    results: dict[str, Measurement]
    ratios: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def ratio(self, ours: str, theirs: str) -> Optional[float]:
        r = self.ratios.get((ours, theirs))
        return statistics.median(r) if r else None


# ----------------------------------------------------------------------------------------------------------
# Measuring one shape class


def make_optimizer(kind: str, low, rest, rank: int) -> torch.optim.Optimizer:
    """step_time.build_optimizer, except that ours gets bare tensors when one of its two groups is empty:
    torch refuses a named-parameter group next to an empty (hence unnamed) one. The names are labels only."""
    if kind.startswith("ours") and not (low and rest):
        return build_optimizer(kind, [p for _, p in low], [p for _, p in rest], rank)
    return build_optimizer(kind, low, rest, rank)


def run_class(size: str, cls: ShapeClass, kinds: list[str], rank: int, rounds: int, max_elements: int,
              device: torch.device, seed: int, refresh_rounds: int = 3) -> ClassRun:
    k = cls.built(max_elements)
    gen = torch.Generator(device=device).manual_seed(seed)
    weights, grads = [], []
    for _ in range(k):
        weights.append(initial_weight(cls.dims, gen, device))
        grads.append(random_tensor(cls.dims, gen, device, 1e-3))

    optimizers: dict[str, torch.optim.Optimizer] = {}
    for kind in kinds:
        named = []
        for j, (w, g) in enumerate(zip(weights, grads)):
            p = torch.nn.Parameter(w.clone())
            p.grad = g.clone()
            named.append((f"{cls.name}.{j}", p))
        low, rest = (named, []) if cls.matrix else ([], named)
        try:
            optimizers[kind] = make_optimizer(kind, low, rest, rank)
        except ImportError as exc:
            print(f"#     {kind}: skipped ({exc})", flush=True)
    del weights, grads
    names = list(optimizers)

    first: dict[str, float] = {}
    refresh: dict[str, Optional[float]] = {kind: None for kind in names}
    with gc_paused():
        for kind in names:
            first[kind] = timed(optimizers[kind].step, device)
            print(f"#     {kind:18s} first step {_ms(first[kind]):>9s} ms", flush=True)
        for kind in names:  # warm-up round
            optimizers[kind].step()
        steady = timed_rounds({kind: optimizers[kind].step for kind in names}, rounds, device)
        sizes = {kind: state_bytes(optimizers[kind]) for kind in names}
        if cls.matrix:
            refreshing = [kind for kind in names if kind != "adamw"]
            samples: dict[str, list[float]] = {kind: [] for kind in refreshing}
            for order in rotations(refreshing, refresh_rounds):
                for kind in order:
                    move_to_refresh_boundary(optimizers[kind], UPDATE_PROJ_GAP)
                    samples[kind].append(timed(optimizers[kind].step, device))
            for kind in refreshing:
                refresh[kind] = statistics.median(samples[kind])
    results = {kind: Measurement(size, cls, k, kind, first[kind], steady[kind], refresh[kind], *sizes[kind])
               for kind in names}
    ratios = {(a, b): round_ratios(steady, a, b) for a, b in PAIRS if a in steady and b in steady}
    run = ClassRun(size, cls, k, results, ratios)
    for kind in names:
        m = results[kind]
        print(f"#     {kind:18s} steady {_ms(m.per_matrix(m.median_ms)):>9s} ms/matrix  refresh "
              f"{_ms(m.per_matrix(m.refresh_ms)):>9s} ms/matrix  state "
              f"{_mib((m.state_bytes + m.held_p_bytes) / k)} MiB/matrix", flush=True)
    for a, b in ratios:
        print(f"#     {a} / {b}: per-round ratio median {run.ratio(a, b):.2f}", flush=True)
    del optimizers
    release_memory(device)
    return run


# ----------------------------------------------------------------------------------------------------------
# Aggregation


def class_result(run: ClassRun, kind: str) -> Optional[Measurement]:
    """``kind``'s measurement on this class, or on a dense class that of the optimizer standing in for it."""
    m = run.results.get(kind)
    if m is None and not run.cls.matrix:
        m = run.results.get(DENSE_PROXY.get(kind, ""))
    return m


@dataclass
class Whole:
    size: str
    optimizer: str
    params: int
    step_ms: float
    state_bytes: float


def whole_model(size: str, params: int, runs: list[ClassRun], kinds: list[str]) -> list[Whole]:
    out = []
    for kind in kinds:
        ms, nbytes = [], []
        for run in runs:
            m = class_result(run, kind)
            if m is None:
                break
            ms.append(m.median_ms / m.k * run.cls.count)
            nbytes.append((m.state_bytes + m.held_p_bytes) / m.k * run.cls.count)
        else:
            out.append(Whole(size, kind, params, sum(ms), sum(nbytes)))
    return out


@dataclass
class RefreshRow:
    size: str
    cls: str
    galore: Measurement
    ours: Measurement  # ours-cached
    apollo: Optional[Measurement]

    @staticmethod
    def cost(m: Measurement) -> float:
        return max(m.refresh_cost_ms, REFRESH_FLOOR_MS)

    @property
    def ours_in_noise(self) -> bool:
        return self.ours.refresh_cost_ms <= self.ours.noise_ms

    @property
    def ratio(self) -> float:
        """GaLore's refresh cost / ours-cached's. When ours' cost is lost in the noise of its steady steps it is
        taken to be as large as that noise, so the ratio is then a conservative lower bound."""
        ours = self.ours.noise_ms if self.ours_in_noise else self.cost(self.ours)
        return self.cost(self.galore) / ours

    @property
    def galore_in_noise(self) -> bool:
        return self.galore.refresh_cost_ms <= self.galore.noise_ms

    @property
    def verdict(self) -> str:
        """'met', 'NOT met' (a measured ratio below the target) or 'not shown' (noise hides one of the costs)."""
        if self.galore_in_noise:
            return "not shown"
        if self.ratio >= TARGET_REFRESH_RATIO:
            return "met"
        return "not shown" if self.ours_in_noise else "NOT met"

    @property
    def ratio_text(self) -> str:
        if self.galore_in_noise:
            return "n/a (GaLore's refresh in noise)"
        return ("≥ " if self.ours_in_noise else "") + f"{self.ratio:,.0f}x"


def refresh_rows(runs: list[ClassRun]) -> list[RefreshRow]:
    rows = []
    for run in runs:
        g, o = run.results.get("galore"), run.results.get("ours-cached")
        if run.cls.matrix and g is not None and o is not None:
            rows.append(RefreshRow(run.size, run.cls.name, g, o, run.results.get("apollo-torch")))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Reporting


def _ms(value: Optional[float]) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _mib(nbytes: float) -> str:
    return mib(nbytes) if nbytes >= 2**20 else mib(nbytes, 4)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _dims(cls: ShapeClass) -> str:
    return str(tuple(cls.dims))


def class_table(runs: list[ClassRun], kinds: list[str]) -> str:
    pairs = [(a, b) for a, b in PAIRS if any(run.ratio(a, b) is not None for run in runs)]
    head = ["class", "shape", "count", "K", *kinds, *(f"{a} / {b}" for a, b in pairs)]
    rows = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for run in runs:
        cells = [run.cls.name, _dims(run.cls), str(run.cls.count), str(run.k)]
        for kind in kinds:
            m = run.results.get(kind)
            cells.append(_ms(m.per_matrix(m.median_ms)) if m else "—")
        for a, b in pairs:
            r = run.ratio(a, b)
            cells.append(f"{r:.2f}" if r is not None else "—")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def whole_table(wholes: list[Whole]) -> str:
    by = {(w.size, w.optimizer): w for w in wholes}
    rows = ["| size | parameters | optimizer | step ms | step vs apollo-torch (Mini: -mini) | state MiB "
            "| state % of AdamW |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for w in wholes:
        ref = by.get((w.size, "apollo-torch-mini" if w.optimizer == "ours-mini" else "apollo-torch"))
        vs = f"{w.step_ms / ref.step_ms:.2f}" if ref and w.optimizer.startswith("ours") else ""
        adamw = by.get((w.size, "adamw"))
        share = f"{100 * w.state_bytes / adamw.state_bytes:.1f}%" if adamw else "—"
        rows.append(f"| {w.size} | {_count(w.params)} | {w.optimizer} | {_ms(w.step_ms)} | {vs} "
                    f"| {_mib(w.state_bytes)} | {share} |")
    return "\n".join(rows)


def refresh_table(rows: list[RefreshRow]) -> str:
    out = ["| size | class | GaLore refresh / steady ms (per matrix) | GaLore refresh cost "
           "| ours-cached refresh / steady ms | ours-cached refresh cost | (its noise) "
           "| apollo-torch refresh cost | GaLore / ours-cached |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        g, o, a = r.galore, r.ours, r.apollo
        noise = " (in noise)" if r.ours_in_noise else ""
        out.append(f"| {r.size} | {r.cls} | {_ms(g.per_matrix(g.refresh_ms))} / {_ms(g.per_matrix(g.median_ms))} "
                   f"| {_ms(g.refresh_cost_ms)} | {_ms(o.per_matrix(o.refresh_ms))} / "
                   f"{_ms(o.per_matrix(o.median_ms))} | {_ms(o.refresh_cost_ms)}{noise} | {_ms(o.noise_ms)} "
                   f"| {_ms(a.refresh_cost_ms) if a else '—'} | {r.ratio_text} |")
    return "\n".join(out)


def target_lines(runs: list[ClassRun], refreshes: list[RefreshRow]) -> list[str]:
    lines = []
    for ours, theirs in PAIRS:
        judged = [(run, run.ratio(ours, theirs)) for run in runs if run.ratio(ours, theirs) is not None]
        if not judged:
            continue
        if ours != "ours":  # the dense classes are ours' AdamW path for every ours-* optimizer
            judged = [(run, r) for run, r in judged if run.cls.matrix]
        missed = [f"{run.size} {run.cls.name} {r:.2f}" for run, r in judged if r > 1.0]
        worst = max(r for _, r in judged)
        verdict = "met" if not missed else f"NOT met on {len(missed)} of {len(judged)}: " + ", ".join(missed)
        lines.append(f"- **{ours} <= {theirs} on every shape class** (median per-round ratio <= 1.00, "
                     f"{len(judged)} size/class cells, worst {worst:.2f}): {verdict}.")
    if refreshes:
        cells = ", ".join(f"{r.size} {r.cls} {r.ratio_text}" for r in refreshes)
        verdicts = {v: [f"{r.size} {r.cls}" for r in refreshes if r.verdict == v] for v in ("NOT met", "not shown")}
        verdict = "; ".join(f"{v} on {', '.join(cells_)}" for v, cells_ in verdicts.items() if cells_) or "met"
        lines.append(f"- **Projection refresh >= {TARGET_REFRESH_RATIO:.0f}x cheaper than GaLore's SVD** (per "
                     f"matrix, GaLore's refresh cost / ours-cached's; uncached ours draws P on every step, so it "
                     f"has no separate refresh): {verdict}. Per cell: {cells}.")
    return lines


def render_section(command: str, machine: str, args, sizes: list[str], shapes: dict[str, LlamaShape],
                   runs: list[ClassRun], wholes: list[Whole], refreshes: list[RefreshRow],
                   loads: tuple[str, str], peak_rss: str, csv_name: str, png_name: Optional[str]) -> str:
    kinds = args.optimizer_list
    parts = [
        SECTION_BEGIN,
        "## Step time and state memory against model size, per shape class (`benchmarks/scaling.py`)",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Run {now_text()} on {args.device}: {machine}. "
        f"Load average (1/5/15 min) {loads[0]} at the start, {loads[1]} at the end.",
        "",
        "| size | hidden | intermediate | layers | rank | vocab | parameters |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        s = shapes[size]
        parts.append(f"| {size} | {s.hidden} | {s.intermediate} | {s.layers} | {s.rank} | {args.vocab} "
                     f"| {_count(parameter_count(s, args.vocab))} |")
    parts.append("")
    for size in sizes:
        size_runs = [run for run in runs if run.size == size]
        parts += [f"**{size}**: steady step ms per matrix (median over {args.rounds} rounds), and the median "
                  f"per-round time ratio of each pair (below 1: ours is faster):", "",
                  class_table(size_runs, kinds), ""]
    parts += ["Whole model (per-matrix figures x count, summed over the classes; state includes held P):", "",
              whole_table(wholes), ""]
    if refreshes:
        parts += ["Projection refresh, per matrix (refresh cost = refresh step - steady median, floored at "
                  f"{REFRESH_FLOOR_MS:g} ms; *in noise*: a cost within the noise of the same optimizer's steady "
                  f"steps, max(spread max - min, {NOISE_FRACTION:.0%} of the median); for ours-cached the ratio "
                  "then divides by that noise instead, a lower bound marked ≥ (a lower bound under the target, "
                  "or GaLore's cost in noise: *not shown*):", "", refresh_table(refreshes), ""]
    targets = target_lines(runs, refreshes)
    if targets:
        parts += ["Targets:", "", *targets, ""]
    if png_name:
        parts += [f"![step time and state bytes against parameter count]({png_name})", ""]
    notes = [
        "- Only the optimizer's `step()` is timed: no forward or backward pass. Per size and shape class, "
        f"K = min(count, max(1, {args.max_elements} // numel)) tensors are built (fp32, random, seeded; gradients "
        "assigned once); every optimizer gets clones of the same weights and gradients, and all optimizers of "
        "a class are alive at once. Per-matrix figures are the class's figures / K; whole-model figures are "
        "per-matrix figures x count, summed over the classes.",
        f"- *steady*: one untimed warm-up round, then {args.rounds} rounds, each stepping every optimizer once "
        "(the order rotates every round), so load from other processes falls on all alike; the median per "
        "optimizer, and the median of the per-round ratios for each pair. The targets are judged by the "
        "per-round ratios.",
        "- Dense classes (embed_head, norm): every low-rank optimizer takes its plain-AdamW path there, so "
        "only adamw, apollo-torch, galore and ours run; in the whole-model table ours-cached and ours-mini use "
        "ours' figures for them and apollo-torch-mini apollo-torch's. The ours-cached and ours-mini targets "
        "are judged on the matrix classes only (their dense classes are ours').",
        "- *refresh*: the step counters are moved to the next multiple of update_proj_gap="
        f"{UPDATE_PROJ_GAP} (they only enter the bias correction) and one step is timed, "
        f"{args.refresh_rounds} times per optimizer (round-robin; the median is used): GaLore recomputes "
        "its SVDs, APOLLO draws new P. Uncached ours draws P on every step, so its refresh step is an "
        "ordinary one; the refresh target uses ours-cached, which draws P only at a refresh. A small cost "
        "against a large step is still noisy: see the noise column.",
        "- *state*: every tensor in `optimizer.state` plus the projection matrices held between steps "
        "(apollo-torch's and GaLore's `projector.ortho_matrix`, ours' `_projection_cache` with "
        "`cache_projection=True`), exactly as allocated by the optimizer.",
        f"- Per size/class/optimizer figures (K, count, first/steady/refresh ms, state and held-P bytes per "
        f"matrix): `{csv_name}`.",
        "- Settings as in the step_time section: lr 1e-3, betas (0.9, 0.999), weight decay 0; APOLLO rank per "
        "size (Mini: 1), channel scaling, scale 1; GaLore scale 0.25, proj_type std.",
    ]
    if peak_rss:
        notes.append(f"- Peak resident memory of the benchmark process: {peak_rss}.")
    parts += ["Notes:", "", *notes, "", SECTION_END]
    return "\n".join(parts)


CSV_FIELDS = ["size", "class", "shape", "count", "K", "optimizer", "first_ms_per_matrix",
              "steady_median_ms_per_matrix", "steady_min_ms_per_matrix", "steady_max_ms_per_matrix",
              "refresh_ms_per_matrix", "state_bytes_per_matrix", "held_p_bytes_per_matrix"]


def csv_text(runs: list[ClassRun]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for run in runs:
        for kind, m in run.results.items():
            refresh = m.per_matrix(m.refresh_ms)
            writer.writerow([run.size, run.cls.name, "x".join(map(str, run.cls.dims)), run.cls.count, run.k, kind,
                             f"{m.first_ms / m.k:.6g}", f"{m.median_ms / m.k:.6g}",
                             f"{min(m.steady_ms) / m.k:.6g}", f"{max(m.steady_ms) / m.k:.6g}",
                             "" if refresh is None else f"{refresh:.6g}",
                             f"{m.state_bytes / m.k:.10g}", f"{m.held_p_bytes / m.k:.10g}"])
    return buf.getvalue()


def write_plot(path: Path, wholes: list[Whole]) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (time_ax, state_ax) = plt.subplots(1, 2, figsize=(13, 5))
    kinds = list(dict.fromkeys(w.optimizer for w in wholes))
    for ax, value, label in ((time_ax, lambda w: w.step_ms, "optimizer step, ms"),
                             (state_ax, lambda w: w.state_bytes, "optimizer state, bytes")):
        for kind in kinds:
            points = sorted((w.params, value(w)) for w in wholes if w.optimizer == kind)
            xs, ys = zip(*points)
            ax.plot(xs, ys, "--" if kind.endswith("mini") else "-", marker="o", markersize=4, label=kind)
        everything = [(w.params, value(w)) for w in wholes if value(w) > 0]
        if len({x for x, _ in everything}) > 1:
            x_lo = min(x for x, _ in everything)
            x_hi = max(x for x, _ in everything)
            y0 = statistics.median(y for x, y in everything if x == x_lo)
            ax.plot([x_lo, x_hi], [y0, y0 * x_hi / x_lo], color="grey", alpha=0.3, linewidth=3,
                    label="slope 1 (proportional)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    time_ax.set_title("whole-model optimizer step time")
    state_ax.set_title("whole-model optimizer state (incl. held P)")
    fig.tight_layout()
    save_figure(fig, path)
    return True


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="benchmarks/scaling.py",
        description=__doc__.split("\n\n")[0],
        epilog="Sizes: " + ", ".join(f"{k} (hidden {v.hidden}, intermediate {v.intermediate}, {v.layers} layers, "
                                      f"rank {v.rank})" for k, v in SIZES.items())
        + ". Optimizers: " + ", ".join(OPTIMIZERS) + ". See the module docstring for the method.",
    )
    parser.add_argument("--sizes", default=None,
                        help="comma-separated model sizes from: " + ", ".join(SIZES)
                             + f" (default: {','.join(DEFAULT_SIZES)}; none when --custom is given)")
    parser.add_argument("--custom", default=None, metavar="H,I,L,RANK",
                        help="also run a synthetic size 'custom' with this hidden, intermediate, layers and rank "
                             "(for smoke tests, e.g. 64,172,2,16 with --vocab 256)")
    parser.add_argument("--vocab", type=int, default=VOCAB,
                        help="rows of embed_tokens/lm_head (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed rounds after one untimed warm-up round (default: %(default)s)")
    parser.add_argument("--refresh-rounds", type=int, default=3,
                        help="refresh steps timed per optimizer, round-robin; their median is used (default: %(default)s)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help="comma-separated subset, in this order (default: all: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--output", default="docs/benchmarks.md",
                        help="markdown file whose scaling section is created or replaced, with scaling.csv and "
                             "scaling.png beside it; '-' to only print (CSV and PNG then go to the temporary "
                             "directory) (default: %(default)s)")
    parser.add_argument("--max-elements", type=int, default=DEFAULT_MAX_ELEMENTS,
                        help="elements built per shape class: K = min(count, max(1, this // numel)) "
                             "(default: %(default)s = 2**24)")
    args = parser.parse_args(argv)

    if args.sizes is None:
        args.size_list = [] if args.custom else list(DEFAULT_SIZES)
    else:
        args.size_list = [s.lower() for s in split_list(args.sizes)]
    for size in args.size_list:
        if size not in SIZES:
            parser.error(f"--sizes: unknown size {size!r}; choose from {', '.join(SIZES)}")
    if len(set(args.size_list)) != len(args.size_list):
        parser.error(f"--sizes: a size is repeated in {args.sizes!r}")
    args.shapes = {size: SIZES[size] for size in args.size_list}
    if args.custom is not None:
        try:
            h, i, layers, rank = (int(x) for x in args.custom.split(","))
        except ValueError:
            parser.error(f"--custom: expected four integers H,I,L,RANK, got {args.custom!r}")
        if min(h, i, layers, rank) < 1 or rank > min(h, i):
            parser.error(f"--custom: need H, I, L, RANK >= 1 and RANK <= min(H, I), got {args.custom!r}")
        args.shapes["custom"] = LlamaShape(h, i, layers, rank)
        args.size_list.append("custom")
    if not args.size_list:
        parser.error("--sizes: no size to run (give --sizes or --custom)")
    args.optimizer_list = split_list(args.optimizers)
    for kind in args.optimizer_list:
        if kind not in OPTIMIZERS:
            parser.error(f"--optimizers: unknown optimizer {kind!r}; choose from {', '.join(OPTIMIZERS)}")
    if not args.optimizer_list:
        parser.error("--optimizers: empty")
    if len(set(args.optimizer_list)) != len(args.optimizer_list):
        parser.error(f"--optimizers: an optimizer is repeated in {args.optimizers!r}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.refresh_rounds < 1:
        parser.error(f"--refresh-rounds must be >= 1, got {args.refresh_rounds}")
    if args.vocab < 1:
        parser.error(f"--vocab must be >= 1, got {args.vocab}")
    if args.max_elements < 1:
        parser.error(f"--max-elements must be >= 1, got {args.max_elements}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def dense_kinds(kinds: list[str]) -> list[str]:
    """The optimizers run on a dense class: each selected one, or the one standing in for it."""
    wanted = {DENSE_PROXY.get(kind, kind) for kind in kinds}
    return [kind for kind in DENSE_OPTIMIZERS if kind in wanted]


def main(argv=None) -> int:
    args = parse_args(argv)
    started = begin("scaling.py", args, argv)
    if started is None:
        return 2
    device, command, machine, load_start = started

    if args.output in ("", "-"):
        out_dir = Path(tempfile.gettempdir())
    else:
        out_dir = Path(args.output).resolve().parent
    csv_path, png_path = out_dir / "scaling.csv", out_dir / "scaling.png"

    runs: list[ClassRun] = []
    wholes: list[Whole] = []
    for size_index, size in enumerate(args.size_list):
        shape = args.shapes[size]
        params = parameter_count(shape, args.vocab)
        print(f"# {size}: {_count(params)} parameters, rank {shape.rank}", flush=True)
        size_runs = []
        for class_index, cls in enumerate(shape_classes(shape, args.vocab)):
            kinds = args.optimizer_list if cls.matrix else dense_kinds(args.optimizer_list)
            k = cls.built(args.max_elements)
            print(f"#   {size} {cls.name} {_dims(cls)} x {cls.count}: building K={k}, {len(kinds)} optimizers",
                  flush=True)
            run = run_class(size, cls, kinds, shape.rank, args.rounds, args.max_elements, device,
                            seed=1000 * size_index + class_index, refresh_rounds=args.refresh_rounds)
            size_runs.append(run)
            gc.collect()
        runs += size_runs
        wholes += whole_model(size, params, size_runs, args.optimizer_list)

    load_end = load_average()
    refreshes = refresh_rows(runs)
    print(f"\n# load average {load_end}\n")
    for size in args.size_list:
        print(f"## {size}: steady step ms per matrix, median per-round ratios\n")
        print(class_table([run for run in runs if run.size == size], args.optimizer_list))
        print()
    print(whole_table(wholes))
    if refreshes:
        print()
        print(refresh_table(refreshes))
    print()
    print("\n".join(target_lines(runs, refreshes)))

    write_text_atomic(csv_path, csv_text(runs))
    print(f"\nwrote {csv_path}")
    plotted = write_plot(png_path, wholes)
    if plotted:
        print(f"wrote {png_path}")
    if args.output not in ("", "-"):
        peak_rss = peak_rss_text()
        section = render_section(command, machine, args, args.size_list, args.shapes, runs, wholes, refreshes,
                                 (load_start, load_end), peak_rss, csv_path.name,
                                 png_path.name if plotted else None)
        write_section(args.output, section, SECTION_BEGIN, SECTION_END)
        print(f"wrote the scaling section of {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
