"""The estimator's training-memory tables of docs/memory.md: LLaMA 60M..7B x optimizers x {plain, layer-wise}, and
LLaMA-7B with the memory levers of issue 17 (the 16 GB and 12 GB settings).

    pip install -e ".[hf,bench]"          # transformers for the configs, matplotlib for the plots
    python benchmarks/memory_table.py     # docs/memory.md's sections and docs/memory_{60m,...,7b}.png
    python benchmarks/memory_table.py --sizes 7b --seq-len 4096 --output /tmp/memory.md --plots-dir /tmp

Every number is :func:`lowrank_opt.memory.estimate`'s (meta device: nothing allocated, no GPU); the setting and
the optimizers are described in docs/memory.md ("The table"). Rerunning replaces the memory-levers, memory-table
and memory-moe sections of --output.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    BASELINES, GB, ROOT, SIZES, LlamaShape, check_at_least, command_line, now_text, package_version, pyplot,
    save_figure, section, split_list, table, write_section)

CARDS_GB = (8, 12, 16, 24, 32, 40, 48, 80, 141)  # common single-GPU memory sizes, smallest first
PLOT_LINES_GB = (16, 24, 48, 80)
SCRIPT = "benchmarks/memory_table.py"


@dataclass(frozen=True)
class Method:
    """A column: ours by registry ``name``, or a ``baseline`` of ``_common.BASELINES``, with per-size options."""

    key: str
    label: str
    name: str = ""
    baseline: str = ""
    optim_args: Callable[[LlamaShape], dict] = lambda size: {}
    target_modules: Any = None  # low-rank methods only (None: the optimizer's default, all-linear)
    master_weights: Optional[bool] = None

    def estimate_args(self, size: LlamaShape) -> dict:
        name = BASELINES[self.baseline].estimator if self.baseline else self.name
        return dict(optimizer=name, optim_args=self.optim_args(size) or None)


def _galore(size: LlamaShape) -> dict:
    return BASELINES["galore-torch"].lowrank_options(size.galore_rank)


METHODS = {m.key: m for m in [
    Method("torch-adamw", "AdamW", baseline="torch-adamw"),
    Method("torch-adamw-fp32-master", "AdamW, fp32 master", baseline="torch-adamw", master_weights=True),
    Method("bnb-adamw8bit", "AdamW 8-bit", baseline="bnb-adamw8bit"),
    Method("galore-torch", "GaLore", baseline="galore-torch", optim_args=_galore,
           target_modules=["attn", "mlp"]),  # the GaLore repository's targets
    Method("apollo", "APOLLO", "apollo", optim_args=lambda size: dict(rank=size.rank)),
    Method("apollo_mini", "APOLLO-Mini", "apollo_mini"),
]}
EXTRA_7B = [  # LLaMA-7B's "other settings" rows
    Method("torch-adamw-fused", "AdamW fused", baseline="torch-adamw-fused"),
    Method("apollo_bf16", "APOLLO, bf16 states", "apollo",
           optim_args=lambda s: dict(rank=s.rank, state_dtype="bfloat16")),
    Method("apollo_mini_bf16", "APOLLO-Mini, bf16 states", "apollo_mini",
           optim_args=lambda s: dict(state_dtype="bfloat16")),
]


@dataclass
class Setting:
    batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = True

    def estimate_args(self) -> dict:
        return dict(dtype="bf16", batch_size=self.batch_size, seq_len=self.seq_len,
                    gradient_checkpointing=self.gradient_checkpointing)


@dataclass
class Row:
    size: LlamaShape
    method: Method
    layerwise: bool
    estimate: Any  # lowrank_opt.memory.MemoryEstimate

    def segments(self) -> dict[str, float]:
        """The total split into parts that add up to it (GB): activations net of what backward frees."""
        e = self.estimate
        return {"weights": e.weights / GB, "gradients": e.gradients / GB, "optimizer states": e.optimizer_states / GB,
                "activations": (e.activations - e.freed_during_backward) / GB,
                "step scratch": e.step_temporaries / GB, "overhead": e.overhead / GB}


def estimate_row(size: LlamaShape, method: Method, layerwise: bool, setting: Setting) -> Row:
    from lowrank_opt.memory import estimate

    result = estimate(size.config, **method.estimate_args(size), target_modules=method.target_modules,
                      layerwise=True if layerwise else None, master_weights=method.master_weights,
                      **setting.estimate_args())
    row = Row(size, method, layerwise, result)
    if abs(sum(row.segments().values()) - result.total / GB) > 1e-3:  # the plot's stack must be the total
        raise AssertionError(f"{size.key} {method.key}: the parts do not add up to {result.total / GB:.3f} GB")
    return row


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


NET_HEAD = ["weights", "optimizer states", "activations and loss (net)", "gradient, step scratch, overhead",
            "**total**"]


def net_parts(e) -> list[str]:
    """The columns of :data:`NET_HEAD` (GB): activations net of what backward frees, the small parts together."""
    return [_gb(e.weights), _gb(e.optimizer_states), _gb(e.activations - e.freed_during_backward),
            _gb(e.gradients + e.step_temporaries + e.overhead), f"**{_gb(e.total)}**"]


def smallest_card(total_bytes: float) -> str:
    return next((f"{card} GB" for card in CARDS_GB if total_bytes <= card * GB), f"> {CARDS_GB[-1]} GB")


def _mode(layerwise: bool) -> str:
    return "layer-wise" if layerwise else "plain"


def summary_table(rows: list[Row], sizes: list[LlamaShape], methods: list[Method]) -> str:
    """Totals: one line per model, one column per optimizer, 'plain / layer-wise' in each cell."""
    by = {(r.size.key, r.method.key, r.layerwise): r.estimate for r in rows}
    ranks = {"galore-torch": lambda s: s.galore_rank, "apollo": lambda s: s.rank}
    head = [m.label + (f" (r {'/'.join(str(ranks[m.key](s)) for s in sizes)})" if m.key in ranks else "")
            for m in methods]
    return table(["model", "params", *head],
                 [[s.label, f"{by[(s.key, methods[0].key, False)].n_params / 1e9:.3f} B",
                   *[f"{_gb(by[(s.key, m.key, False)].total)} / {_gb(by[(s.key, m.key, True)].total)}"
                     for m in methods]]
                  for s in sizes], "lr" + "r" * len(methods))


def detail_table(rows: list[Row]) -> str:
    """Every part of the estimate (GB), one line per optimizer and mode."""
    return table(["optimizer", "mode", "weights", "gradients", "optimizer states", "activations",
                  "freed during backward", "step temporaries", "overhead", "**total**", "smallest card"],
                 [[r.method.label + (f" (rank={r.method.optim_args(r.size)['rank']})"
                                     if "rank" in r.method.optim_args(r.size) else ""), _mode(r.layerwise),
                   _gb(r.estimate.weights), _gb(r.estimate.gradients),
                   _gb(r.estimate.optimizer_states), _gb(r.estimate.activations),
                   f"-{r.estimate.freed_during_backward / GB:.2f}" if round(r.estimate.freed_during_backward / GB, 2)
                   else "0.00", _gb(r.estimate.step_temporaries), _gb(r.estimate.overhead),
                   f"**{_gb(r.estimate.total)}**", smallest_card(r.estimate.total)] for r in rows], "ll" + "r" * 9)


def state_split_table(rows: list[Row]) -> str:
    """Where the optimizer-state bytes go (the estimate's components), plain mode."""
    return table(["optimizer", "optimizer states", "of which"],
                 [[r.method.label, _gb(r.estimate.optimizer_states),
                   ", ".join(f"{k.split('.', 1)[1]} {v / GB:.2f}" for k, v in r.estimate.components.items()
                             if k.startswith("optimizer_states.") and v >= 5e5)]
                  for r in rows if not r.layerwise], "lrl")


@dataclass(frozen=True)
class Lever:
    """A row of the levers table: layer-wise APOLLO-Mini on bf16 weights with some of issue 17's levers. ``after``:
    the row it adds to ("saved" is that row's total minus this one's); ``setting_gb``: this row is that setting."""

    key: str
    label: str
    after: Optional[str] = None
    dense_state_bits: int = 32
    lean_loss: bool = False
    target_modules: tuple = ("all-linear",)
    weights: str = "float"
    setting_gb: Optional[int] = None
    recommended: bool = True  # False: an estimate only, measured as too costly in loss


LEVERS = [
    Lever("base", "layer-wise APOLLO-Mini, bf16 weights"),
    Lever("states8", "+ 8-bit dense states", after="base", dense_state_bits=8),
    Lever("lean", "+ lean loss", after="states8", dense_state_bits=8, lean_loss=True, setting_gb=16),
    Lever("head", "+ `lm_head` low-rank", after="lean", dense_state_bits=8, lean_loss=True,
          target_modules=("all-linear", "lm_head"), recommended=False),
    Lever("embed", "+ `embed_tokens` low-rank too", after="head", dense_state_bits=8, lean_loss=True,
          target_modules=("all-linear", "embed_tokens", "lm_head"), recommended=False),
    Lever("int8", "+ int8 weights + lean loss", after="base", lean_loss=True, weights="int8"),
    Lever("int8_states8", "+ 8-bit dense states", after="int8", dense_state_bits=8, lean_loss=True, weights="int8",
          setting_gb=12),
]
LEVER_OPTIMIZER = "apollo_mini_layerwise"


def lever_cli_flags(lever: Lever) -> list[str]:
    """The flags this row adds to ``lowrank-opt memory CONFIG --optim apollo_mini_layerwise
    --gradient-checkpointing``."""
    flags = ["--optim-args", f"dense_state_bits={lever.dense_state_bits}"] if lever.dense_state_bits != 32 else []
    flags += ["--lean-loss"] if lever.lean_loss else []
    if list(lever.target_modules) != ["all-linear"]:
        flags += ["--target-modules", ",".join(lever.target_modules)]
    return flags + (["--weights", lever.weights] if lever.weights != "float" else [])


@dataclass
class LeverRow:
    number: int
    lever: Lever
    estimate: Any


def lever_rows(size: LlamaShape, setting: Setting, log=print) -> list[LeverRow]:
    from lowrank_opt.memory import estimate

    rows = []
    for number, lever in enumerate(LEVERS, start=1):
        result = estimate(size.config, LEVER_OPTIMIZER, target_modules=list(lever.target_modules),
                          optim_args=f"dense_state_bits={lever.dense_state_bits}" if lever.dense_state_bits != 32
                          else None, weights=lever.weights, lean_loss=lever.lean_loss, **setting.estimate_args())
        rows.append(LeverRow(number, lever, result))
        log(f"  {size.key:5s} {lever.key:14s} {result.total / GB:7.2f} GB")
    return rows


def lever_table(rows: list[LeverRow]) -> str:
    by_key = {r.lever.key: r for r in rows}
    out = []
    for r in rows:
        e, lever = r.estimate, r.lever
        label = lever.label if lever.after is None else f"{by_key[lever.after].number} {lever.label}"
        if lever.setting_gb is not None:
            label += f" = **the {lever.setting_gb} GB setting**" + (
                f" (over {lever.setting_gb} GB at this setting)" if e.total > lever.setting_gb * GB else "")
        if not lever.recommended:
            label += " (estimate only: costly in loss)"
        before = by_key.get(lever.after)
        flags = " ".join(lever_cli_flags(lever))
        out.append([r.number, label, f"`{flags}`" if flags else "—", *net_parts(e),
                    f"{(before.estimate.total - e.total) / GB:.2f} (vs {before.number})" if before else "—",
                    smallest_card(e.total)])
    return table(["#", "levers", "`lowrank-opt memory` flags", *NET_HEAD, "saved", "smallest card"], out, "rllrrrrrrl")


MOE_CONFIGS = {"mixtral_8x7b": "Mixtral-8x7B", "qwen3_30b_a3b": "Qwen3-30B-A3B"}


@dataclass(frozen=True)
class MoeRow:
    label: str
    optimizer: str
    optim_args: Optional[str] = None
    lean_loss: bool = False
    weights: str = "float"

    def flags(self) -> str:
        flags = [f"--optim {self.optimizer}"] + ([f"--optim-args {self.optim_args}"] if self.optim_args else [])
        flags += ["--lean-loss"] if self.lean_loss else []
        return " ".join(flags + ([f"--weights {self.weights}"] if self.weights != "float" else []))


MOE_ROWS = [
    MoeRow("AdamW", BASELINES["torch-adamw"].estimator),
    MoeRow("APOLLO, rank 256 per expert", "apollo", "rank=256"),
    MoeRow("APOLLO-Mini", "apollo_mini"),
    MoeRow("APOLLO-Mini, layer-wise", "apollo_mini_layerwise"),
    MoeRow("+ 8-bit dense states + lean loss", "apollo_mini_layerwise", "dense_state_bits=8", lean_loss=True),
    MoeRow("+ int8 weights (nn.Linear only)", "apollo_mini_layerwise", "dense_state_bits=8", lean_loss=True,
           weights="int8"),
]


def moe_table(configs: list[str], setting: Setting, log=print) -> str:
    from lowrank_opt.memory import estimate

    out = []
    for config in configs:
        for row in MOE_ROWS:
            started = time.perf_counter()
            e = estimate(config, row.optimizer, optim_args=row.optim_args, lean_loss=row.lean_loss,
                         weights=row.weights, **setting.estimate_args())
            log(f"  {config:14s} {row.label:36s} {e.total / GB:7.2f} GB ({time.perf_counter() - started:.0f} s)")
            out.append([f"{MOE_CONFIGS.get(config, config)} ({e.n_params / 1e9:.2f} B)", row.label, f"`{row.flags()}`",
                        *net_parts(e), smallest_card(e.total)])
    return table(["model", "optimizer", "`lowrank-opt memory CONFIG` flags", *NET_HEAD, "smallest card"], out,
                 "lllrrrrrl")


COLORS = {"weights": "#4c72b0", "gradients": "#dd8452", "optimizer states": "#c44e52", "activations": "#55a868",
          "step scratch": "#8172b3", "overhead": "#937860"}


def plot_size(rows: list[Row], size: LlamaShape, setting: Setting, path: Path, command: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(13, 6))
    xs, labels, x, previous = [], [], 0.0, None
    for r in rows:
        x += 0.5 if previous not in (None, r.method.key) else 0.0  # a gap between optimizers
        previous, bottom = r.method.key, 0.0
        for name, value in r.segments().items():
            ax.bar(x, value, bottom=bottom, width=0.8, color=COLORS[name], hatch="//" if r.layerwise else None,
                   edgecolor="white", linewidth=0.5, label=name if not xs else None)
            bottom += value
        ax.text(x, bottom, f"{bottom:.1f}", ha="center", va="bottom", fontsize=8)
        xs.append(x)
        labels.append(r.method.label.replace(", ", "\n") + f"\n{_mode(r.layerwise)}")
        x += 1.0
    top = max(sum(r.segments().values()) for r in rows)
    for card in (c for c in PLOT_LINES_GB if c < top * 1.15):
        ax.axhline(card, color="grey", linestyle="--", linewidth=0.8)
        ax.text(xs[-1] + 0.6, card, f"{card} GB", va="center", fontsize=8, color="grey",
                bbox=dict(facecolor="white", edgecolor="none", pad=1.0))
    ax.set_xticks(xs, labels, fontsize=7.5)
    ax.set(xlim=(xs[0] - 0.7, xs[-1] + 1.4), ylim=(0, top * 1.12), ylabel="estimated peak per GPU (GB = 1e9 bytes)")
    ax.set_title(f"{size.label} ({rows[0].estimate.n_params / 1e9:.2f} B params), bf16 weights, batch "
                 f"{setting.batch_size} x {setting.seq_len} tokens"
                 + (", gradient checkpointing" if setting.gradient_checkpointing else "")
                 + "\nestimate (lowrank_opt.memory.estimate), not a measurement; hatched = layer-wise updates",
                 fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
    fig.text(0.01, 0.005, command, fontsize=6.5, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    save_figure(fig, path)


def _choices(known: dict, what: str):
    def parse(text: str) -> list:
        unknown = [k for k in split_list(text.lower()) if k not in known]
        if unknown or not split_list(text):
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none given)'}; known: "
                                             f"{', '.join(known)}")
        return [known[k] for k in split_list(text.lower())]
    return parse


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="memory_table.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=list(SIZES.values()), type=_choices(SIZES, "size"),
                        help=f"model sizes, comma-separated (default {','.join(SIZES)})")
    parser.add_argument("--optims", default=list(METHODS.values()), type=_choices(METHODS, "optimizer"),
                        help=f"optimizers, comma-separated (default {','.join(METHODS)})")
    parser.add_argument("--batch-size", type=int, default=1, help="per-GPU micro-batch (default 1)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "memory.md",
                        help="the Markdown file whose sections are replaced (default docs/memory.md)")
    parser.add_argument("--plots-dir", type=Path, default=None, help="where memory_<size>.png go (default: beside "
                        "--output)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    parser.add_argument("--moe-configs", default=",".join(MOE_CONFIGS), help="MoE configs of the memory-moe section, "
                        "comma-separated ('' skips it; about a minute per estimate); default %(default)s")
    args = parser.parse_args(argv)
    check_at_least(parser.error, ("--batch-size", args.batch_size, 1), ("--seq-len", args.seq_len, 1))
    if not args.no_plots and pyplot() is None:
        parser.error("the plots need matplotlib: pip install matplotlib (or .[bench]), or pass --no-plots")
    setting = Setting(args.batch_size, args.seq_len, args.gradient_checkpointing)
    command = command_line("memory_table.py", argv)
    import torch

    machine = (f"Estimated {now_text()} (torch {torch.__version__}, transformers {package_version('transformers')}; "
               f"nothing allocated, no GPU): bf16 weights, micro-batch {setting.batch_size} x {setting.seq_len} "
               f"tokens, gradient checkpointing {'on' if setting.gradient_checkpointing else 'off'}; GB = 10^9 bytes.")
    rows = []
    for size in args.sizes:
        for method in args.optims:
            for layerwise in (False, True):
                started = time.perf_counter()
                rows.append(estimate_row(size, method, layerwise, setting))
                print(f"  {size.key:5s} {method.key:24s} {_mode(layerwise):10s} {rows[-1].estimate.total / GB:7.2f} GB "
                      f"({time.perf_counter() - started:.1f} s)", flush=True)
    tables = [summary_table(rows, args.sizes, args.optims)]
    plots_dir = args.plots_dir or args.output.parent
    for size in args.sizes:
        mine = [r for r in rows if r.size.key == size.key]
        tables += [f"**{size.label}**, every part of the estimate (GB):", detail_table(mine),
                   f"{size.label}, optimizer states by part (GB; the same in both modes):", state_split_table(mine)]
        if not args.no_plots:
            path = plots_dir / f"memory_{size.key}.png"
            plot_size(mine, size, setting, path, command)
            link = os.path.relpath(path, args.output.parent)
            tables.append(f"![{size.label} estimated memory per optimizer]({link})")
    seven = SIZES["7b"]
    if seven in args.sizes:
        extra = [estimate_row(seven, m, lw, setting) for m in EXTRA_7B for lw in (False, True)]
        tables += ["**LLaMA-7B, other settings**:", table(
            ["optimizer", "mode", "optimizer states", "step temporaries", "**total**"],
            [[f"`{r.estimate.optimizer}`" + (f"({','.join(f'{k}={v}' for k, v in r.estimate.optim_args.items())})"
                                             if r.estimate.optim_args else ""), _mode(r.layerwise),
              _gb(r.estimate.optimizer_states), _gb(r.estimate.step_temporaries), f"**{_gb(r.estimate.total)}**"]
             for r in extra], "llrrr")]
        print("estimating the levers of LLaMA-7B ...", flush=True)
        write_section(args.output, section("memory-levers", SCRIPT, command, machine,
                                           lever_table(lever_rows(seven, setting))), "memory-levers")
    write_section(args.output, section("memory-table", SCRIPT, command, machine, *tables), "memory-table")
    moe_configs = split_list(args.moe_configs)
    if moe_configs:
        print("estimating the MoE models ...", flush=True)
        write_section(args.output, section("memory-moe", SCRIPT, command, machine, moe_table(moe_configs, setting)),
                      "memory-moe")
    print(f"wrote {args.output}")
    print(tables[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
