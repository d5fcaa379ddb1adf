"""The estimator's training-memory table for docs/memory.md: LLaMA 60M..7B x optimizers x {plain, layer-wise}.

    pip install -e ".[hf,bench]"          # transformers for the configs, matplotlib for the plots
    python benchmarks/memory_table.py     # writes docs/memory.md and docs/memory_{60m,130m,350m,1b,7b}.png
    python benchmarks/memory_table.py --sizes 7b --seq-len 4096 --output /tmp/memory.md --plots-dir /tmp

Every number comes from :func:`lowrank_opt.memory.estimate` (the model is built on the meta device, nothing
is allocated, no GPU is needed); nothing here is measured. The setting, unless changed by the flags: pure
bf16 weights (no fp32 master copy; one row adds it for AdamW), micro-batch 1 x 2048 tokens, Hugging Face
per-decoder-layer gradient checkpointing, SDPA attention, one GPU, no ZeRO. The optimizers and their ranks:

  adamw              torch.optim.AdamW, foreach (its CUDA default); its moments are in the parameter dtype
  adamw_fp32_master  torch.optim.AdamW on fp32 master weights (torch autocast, the HF Trainer's --bf16 on an
                     fp32 model): fp32 weights, gradients and moments plus autocast's bf16 weight copies
  adamw_8bit         bitsandbytes AdamW8bit as the HF Trainer builds it (embeddings keep 32-bit state)
  galore_adamw       galore-torch GaLoreAdamW on the attention and MLP matrices (the GaLore repo's targets),
                     rank 128/256/256/512 (GaLore paper Table 2, r/d_model) and 1024 for 7B (the GaLore repo's
                     7B scripts), update_proj_gap 200, scale 0.25
  apollo             lowrank_opt APOLLO (registry "apollo"), rank 1/4 of the hidden size up to 256:
                     128/192/256/256/256 (the APOLLO paper and its repository's scripts); fp32 moments
                     (state_dtype None, the default)
  apollo_mini        lowrank_opt APOLLO-Mini (rank 1, tensor-wise scaling, scale 128)

Layer-wise: the registry's ``apollo_layerwise``/``apollo_mini_layerwise``, Hugging Face's
``galore_adamw_layerwise``; for the AdamW rows it is one optimizer per parameter stepped from a
post-accumulate-grad hook (PyTorch's "fuse the optimizer step into backward" recipe), which neither the HF
Trainer nor train.py offers: an estimate of what that technique would give, nothing more.

With LLaMA-7B among the sizes, the page opens with "LLaMA-7B in 16 GB and in 12 GB" (:data:`LEVERS`):
layer-wise APOLLO-Mini with issue 17's memory levers added one per row (8-bit dense states, the lean loss,
low-rank ``lm_head``; int8 weights), each row an estimate with the ``lowrank-opt memory`` flags that reproduce it.
Right after it comes a block between ``<!-- BEGIN fit-7b-cpu -->`` and ``<!-- END fit-7b-cpu -->`` that this
script does not write: it is copied, byte for byte, from the output file being replaced (a measured LLaMA-7B CPU
run of ``benchmarks/fit_7b.py``, pasted by hand); without one, the markers are written with a comment between.

The plots need matplotlib (``pip install matplotlib`` or the ``bench`` extra); ``--no-plots`` skips them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    GB,
    ROOT,
    SIZES,
    LlamaShape,
    command_line,
    package_version,
    pyplot,
    save_figure,
    write_text_atomic,
)

CARDS_GB = (8, 12, 16, 24, 32, 40, 48, 80, 141)  # common single-GPU memory sizes (marketing GB), smallest first
PLOT_LINES_GB = (16, 24, 48, 80)  # horizontal guides on the plots


ModelSize = LlamaShape  # a size of _common.SIZES: .key, .config (name in configs/), .label, .apollo_rank, .galore_rank


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    plain: str  # estimator name, plain mode
    layerwise: str  # estimator name, layer-wise mode
    optim_args: Callable[[ModelSize], dict] = lambda size: {}
    target_modules: Any = None  # low-rank methods only (None: the optimizer's default, all-linear)
    master_weights: Optional[bool] = None
    what: str = ""


GALORE_TARGETS = ["attn", "mlp"]  # the GaLore repo: modules whose name contains "attn" or "mlp"

METHODS = {
    m.key: m
    for m in [
        Method("adamw", "AdamW", "adamw", "adamw",
               what="`torch.optim.AdamW` (foreach, its CUDA default) on the bf16 weights: its two moments "
                    "are bf16 too (4 bytes/param)"),
        Method("adamw_fp32_master", "AdamW, fp32 master", "adamw", "adamw", master_weights=True,
               what="`torch.optim.AdamW` on fp32 master weights under torch autocast (the HF Trainer's "
                    "`--bf16` with an fp32 model): fp32 moments (8 bytes/param), fp32 gradients, plus "
                    "autocast's bf16 weight copies"),
        Method("adamw_8bit", "AdamW 8-bit", "adamw_8bit", "adamw_8bit",
               what="bitsandbytes `AdamW8bit` as the HF Trainer builds it (`adamw_bnb_8bit`; embeddings "
                    "keep 32-bit state)"),
        Method("galore_adamw", "GaLore", "galore_adamw", "galore_adamw_layerwise",
               optim_args=lambda size: dict(rank=size.galore_rank, update_proj_gap=200, scale=0.25),
               target_modules=GALORE_TARGETS,
               what="galore-torch `GaLoreAdamW` (HF `galore_adamw`/`galore_adamw_layerwise`) on the "
                    "attention and MLP matrices"),
        Method("apollo", "APOLLO", "apollo", "apollo_layerwise",
               optim_args=lambda size: dict(rank=size.apollo_rank),
               what="`lowrank_opt` APOLLO (`apollo`/`apollo_layerwise`), channel-wise scaling, fp32 "
                    "moments (the default `state_dtype`)"),
        Method("apollo_mini", "APOLLO-Mini", "apollo_mini", "apollo_mini_layerwise",
               what="`lowrank_opt` APOLLO-Mini (`apollo_mini`/`apollo_mini_layerwise`): rank 1, "
                    "tensor-wise scaling, scale 128"),
    ]
}


@dataclass
class Row:
    size: ModelSize
    method: Method
    layerwise: bool
    estimate: Any  # lowrank_opt.memory.MemoryEstimate

    @property
    def mode(self) -> str:
        return "layer-wise" if self.layerwise else "plain"

    def segments(self) -> dict[str, float]:
        """The total split into parts that add up to it (GB): activations net of what backward frees."""
        e = self.estimate
        return {
            "weights": e.weights / GB,
            "gradients": e.gradients / GB,
            "optimizer states": e.optimizer_states / GB,
            "activations": (e.activations - e.freed_during_backward) / GB,
            "step scratch": e.step_temporaries / GB,
            "overhead": e.overhead / GB,
        }


@dataclass
class Setting:
    batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = True
    extras: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Estimating


def estimate_row(size: ModelSize, method: Method, layerwise: bool, setting: Setting) -> Row:
    from lowrank_opt.memory import estimate

    name = method.layerwise if layerwise else method.plain
    result = estimate(
        size.config, name, optim_args=method.optim_args(size) or None, target_modules=method.target_modules,
        dtype="bf16", batch_size=setting.batch_size, seq_len=setting.seq_len,
        gradient_checkpointing=setting.gradient_checkpointing, layerwise=True if layerwise else None,
        master_weights=method.master_weights,
    )
    return Row(size, method, layerwise, result)


def collect(sizes: list[ModelSize], methods: list[Method], setting: Setting, log=print) -> list[Row]:
    rows = []
    for size in sizes:
        for method in methods:
            for layerwise in (False, True):
                started = time.perf_counter()
                row = estimate_row(size, method, layerwise, setting)
                parts = sum(row.segments().values())
                if abs(parts - row.estimate.total / GB) > 1e-3:  # the plot's stack must be the total
                    raise AssertionError(f"{size.key} {method.key} {row.mode}: parts {parts:.3f} GB != total "
                                         f"{row.estimate.total / GB:.3f} GB")
                rows.append(row)
                log(f"  {size.key:5s} {method.key:18s} {row.mode:10s} {row.estimate.total / GB:7.2f} GB "
                    f"({time.perf_counter() - started:.1f} s)")
    return rows


# ----------------------------------------------------------------------------------------------------------
# Tables


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def _negative_gb(x: float) -> str:
    return f"-{x / GB:.2f}" if round(x / GB, 2) else "0.00"


def smallest_card(total_bytes: float) -> str:
    for card in CARDS_GB:
        if total_bytes <= card * GB:
            return f"{card} GB"
    return f"> {CARDS_GB[-1]} GB"


def method_header(method: Method, sizes: list[ModelSize]) -> str:
    if method.key == "galore_adamw":
        return "GaLore (r " + "/".join(str(s.galore_rank) for s in sizes) + ")"
    if method.key == "apollo":
        return "APOLLO (r " + "/".join(str(s.apollo_rank) for s in sizes) + ")"
    return method.label


def summary_table(rows: list[Row], sizes: list[ModelSize], methods: list[Method]) -> str:
    """Totals: one line per model, one column per optimizer, 'plain / layer-wise' in each cell."""
    by = {(r.size.key, r.method.key, r.layerwise): r for r in rows}
    head = "| model | params | " + " | ".join(method_header(m, sizes) for m in methods) + " |"
    lines = [head, "|---|--:|" + "--:|" * len(methods)]
    for size in sizes:
        first = by[(size.key, methods[0].key, False)].estimate
        cells = []
        for m in methods:
            plain, lw = by[(size.key, m.key, False)].estimate, by[(size.key, m.key, True)].estimate
            cells.append(f"{_gb(plain.total)} / {_gb(lw.total)}")
        lines.append(f"| {size.label} | {first.n_params / 1e9:.3f} B | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(rows: list[Row], size: ModelSize) -> str:
    """Every row of the estimate for one model (GB), one line per optimizer and mode."""
    head = ("| optimizer | mode | weights | gradients | optimizer states | activations | freed during backward "
            "| step temporaries | overhead | **total** | smallest card |")
    lines = [head, "|---|---|" + "--:|" * 9]
    for r in rows:
        if r.size.key != size.key:
            continue
        e = r.estimate
        args = ", ".join(f"{k}={v}" for k, v in r.method.optim_args(size).items() if k == "rank")
        label = r.method.label + (f" ({args})" if args else "")
        lines.append(
            f"| {label} | {r.mode} | {_gb(e.weights)} | {_gb(e.gradients)} | {_gb(e.optimizer_states)} | "
            f"{_gb(e.activations)} | {_negative_gb(e.freed_during_backward)} | {_gb(e.step_temporaries)} | "
            f"{_gb(e.overhead)} | **{_gb(e.total)}** | {smallest_card(e.total)} |")
    return "\n".join(lines)


def state_split_table(rows: list[Row], size: ModelSize) -> str:
    """Where the optimizer-state bytes of one model go (the estimate's components)."""
    lines = ["| optimizer | optimizer states | of which |", "|---|--:|---|"]
    for r in rows:
        if r.size.key != size.key or r.layerwise:
            continue
        e = r.estimate
        parts = ", ".join(f"{k.split('.', 1)[1]} {v / GB:.2f}" for k, v in e.components.items()
                          if k.startswith("optimizer_states.") and v >= 5e5)
        lines.append(f"| {r.method.label} | {_gb(e.optimizer_states)} | {parts} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The headline section: LLaMA-7B in 16 GB and in 12 GB (issue 17's memory levers)


HEADLINE_OPTIMIZER = "apollo_mini_layerwise"
HEADLINE_TITLE = "LLaMA-7B in 16 GB and in 12 GB"
LEVERS_HEADING = "Memory levers against plain APOLLO-Mini"  # the start of docs/benchmarks.md's section on their loss
FIT_BEGIN = "<!-- BEGIN fit-7b-cpu"  # the block's begin marker, up to its closing "-->"
FIT_END = "<!-- END fit-7b-cpu -->"
FIT_EMPTY = ("<!-- BEGIN fit-7b-cpu -->\n"
             "<!-- (empty) A measured LLaMA-7B CPU run of benchmarks/fit_7b.py goes here; memory_table.py copies "
             "this block unchanged. -->\n"
             "<!-- END fit-7b-cpu -->")


@dataclass(frozen=True)
class Lever:
    """One row of the headline section: layer-wise APOLLO-Mini on bf16 weights with some of issue 17's memory
    levers. The options are exactly what goes to :func:`lowrank_opt.memory.estimate`, ``lowrank-opt memory`` and
    ``train.py`` (:func:`lever_estimate_args`, :func:`lever_cli_flags`, :func:`lever_train_flags`)."""
    key: str
    label: str  # "+ what this row adds to the row it is compared with"
    after: Optional[str] = None  # the key of that row ("saved" is its total minus this one); None: the baseline
    dense_state_bits: int = 32  # 8: the dense part's AdamW moments in bitsandbytes' 8-bit blockwise form
    lean_loss: bool = False
    target_modules: tuple = ("all-linear",)
    weights: str = "float"  # or "int8" (Q-APOLLO)
    setting_gb: Optional[int] = None  # 16 or 12: this row is that headline setting
    recommended: bool = True  # False: an estimate only, its loss cost measured too high


LEVERS = [
    Lever("base", "layer-wise APOLLO-Mini, bf16 weights"),
    Lever("states8", "+ 8-bit dense states", after="base", dense_state_bits=8),
    Lever("lean", "+ lean loss", after="states8", dense_state_bits=8, lean_loss=True, setting_gb=16),
    Lever("head", "+ `lm_head` low-rank", after="lean", dense_state_bits=8, lean_loss=True,
          target_modules=("all-linear", "lm_head"), recommended=False),
    Lever("embed", "+ `embed_tokens` low-rank too", after="head", dense_state_bits=8, lean_loss=True,
          target_modules=("all-linear", "embed_tokens", "lm_head"), recommended=False),
    Lever("int8", "+ int8 weights + lean loss", after="base", lean_loss=True, weights="int8"),
    Lever("int8_states8", "+ 8-bit dense states", after="int8", dense_state_bits=8, lean_loss=True,
          weights="int8", setting_gb=12),
]


@dataclass
class HeadlineRow:
    number: int  # 1-based, as the table shows it
    size: ModelSize
    lever: Lever
    estimate: Any  # lowrank_opt.memory.MemoryEstimate


def lever_estimate_args(lever: Lever, setting: Setting) -> dict:
    """The keyword arguments of ``estimate(config, **args)`` for this row."""
    return dict(
        optimizer=HEADLINE_OPTIMIZER,
        optim_args=f"dense_state_bits={lever.dense_state_bits}" if lever.dense_state_bits != 32 else None,
        target_modules=list(lever.target_modules), dtype="bf16", batch_size=setting.batch_size,
        seq_len=setting.seq_len, gradient_checkpointing=setting.gradient_checkpointing, weights=lever.weights,
        lean_loss=lever.lean_loss)


def lever_cli_flags(lever: Lever) -> list[str]:
    """The flags this row adds to ``lowrank-opt memory CONFIG --optim apollo_mini_layerwise ...``."""
    flags = []
    if lever.dense_state_bits != 32:
        flags += ["--optim-args", f"dense_state_bits={lever.dense_state_bits}"]
    if lever.lean_loss:
        flags.append("--lean-loss")
    if list(lever.target_modules) != ["all-linear"]:
        flags += ["--target-modules", ",".join(lever.target_modules)]
    if lever.weights != "float":
        flags += ["--weights", lever.weights]
    return flags


def lever_command(size: ModelSize, lever: Lever, setting: Setting) -> list[str]:
    """The whole ``lowrank-opt memory`` command line of a row (the CLI's defaults left out)."""
    argv = ["lowrank-opt", "memory", size.config, "--optim", HEADLINE_OPTIMIZER]
    if setting.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    if setting.batch_size != 1:
        argv += ["--batch-size", str(setting.batch_size)]
    if setting.seq_len != 2048:
        argv += ["--seq-len", str(setting.seq_len)]
    return argv + lever_cli_flags(lever)


def lever_train_flags(lever: Lever) -> list[str]:
    """train.py's flags for the optimizer and the levers of a row (its shape flags are in the section's text)."""
    flags = ["--optim", HEADLINE_OPTIMIZER]
    if lever.dense_state_bits != 32:
        flags += ["--optim_args", f"dense_state_bits={lever.dense_state_bits}"]
    if lever.lean_loss:
        flags.append("--lean_loss")
    if list(lever.target_modules) != ["all-linear"]:
        flags += ["--optim_target_modules", *lever.target_modules]
    if lever.weights != "float":
        flags += ["--weights", lever.weights]
    return flags


def headline_rows(size: ModelSize, setting: Setting, levers: list[Lever] = LEVERS, log=print) -> list[HeadlineRow]:
    """Estimate every row of the headline section for ``size`` (LLaMA-7B in the document)."""
    from lowrank_opt.memory import estimate

    rows = []
    for number, lever in enumerate(levers, start=1):
        started = time.perf_counter()
        result = estimate(size.config, **lever_estimate_args(lever, setting))
        rows.append(HeadlineRow(number, size, lever, result))
        log(f"  {size.key:5s} {lever.key:14s} {result.total / GB:7.2f} GB ({time.perf_counter() - started:.1f} s)")
    return rows


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def levers_loss_link(doc_dir: Path) -> str:
    """A Markdown link to docs/benchmarks.md's section on the levers' loss cost, its anchor taken from the
    heading as it is now (the heading is generated by benchmarks/convergence.py)."""
    path = ROOT / "docs" / "benchmarks.md"
    target = os.path.relpath(path, doc_dir)
    heading = None
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("#") and line.lstrip("#").strip().startswith(LEVERS_HEADING):
                heading = line.lstrip("#").strip()
                break
    if heading is None:
        return f"[{target}, section \"{LEVERS_HEADING}\"]({target})"
    return f"[{target}: {LEVERS_HEADING}]({target}#{github_anchor(heading)})"


def headline_table(rows: list[HeadlineRow]) -> str:
    """One line per row: the flags it adds, where the bytes are, the total and what it saved (GB)."""
    by_key = {r.lever.key: r for r in rows}
    lines = ["| # | levers | `lowrank-opt memory` flags | weights | optimizer states | activations and loss "
             "(net) | gradient, step scratch, overhead | **total** | saved | smallest card |",
             "|--:|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        e, lever = r.estimate, r.lever
        label = lever.label if lever.after is None else f"{by_key[lever.after].number} {lever.label}"
        if lever.setting_gb is not None:
            label += f" = **the {lever.setting_gb} GB setting**"
            if e.total > lever.setting_gb * GB:
                label += f" (over {lever.setting_gb} GB at this setting)"
        if not lever.recommended:
            label += " (estimate only: costly in loss)"
        flags = " ".join(lever_cli_flags(lever))
        activations = e.activations - e.freed_during_backward
        rest = e.gradients + e.step_temporaries + e.overhead
        if lever.after is None:
            saved = "—"
        else:
            before = by_key[lever.after]
            saved = f"{(before.estimate.total - e.total) / GB:.2f} (vs {before.number})"
        lines.append(f"| {r.number} | {label} | {'`' + flags + '`' if flags else '—'} | {_gb(e.weights)} | "
                     f"{_gb(e.optimizer_states)} | {_gb(activations)} | {_gb(rest)} | **{_gb(e.total)}** | {saved} | "
                     f"{smallest_card(e.total)} |")
    return "\n".join(lines)


def headline_section(rows: list[HeadlineRow], setting: Setting, doc_dir: Path) -> list[str]:
    """The lines of the "LLaMA-7B in 16 GB and in 12 GB" section (every figure from ``rows``)."""
    import inspect

    from lowrank_opt.memory import estimate
    from lowrank_opt.quant.state8bit import MIN_8BIT_SIZE

    group = inspect.signature(estimate).parameters["int8_group_size"].default  # train.py's default too
    size = rows[0].size
    by_key = {r.lever.key: r for r in rows}
    title = HEADLINE_TITLE.replace("LLaMA-7B", size.label)
    ckpt = "with" if setting.gradient_checkpointing else "without"
    out = [f"## {title}", ""]
    out.append(
        f"Full-parameter training of {size.label} (every weight updated) on one GPU, micro-batch "
        f"{setting.batch_size} x {setting.seq_len} tokens, {ckpt} gradient checkpointing, estimated as on the rest "
        "of this page (CUDA overhead model included; not measured on a GPU). Row 1 is layer-wise APOLLO-Mini on "
        "bf16 weights as in the table below; each further row adds a lever to the row whose number it starts "
        "with, and \"saved\" is its total's drop from that row (GB = 10^9 bytes):")
    out.append("")
    out.append(headline_table(rows))
    out.append("")
    out.append("The levers (docs/quantization.md describes each piece):")
    out.append("")
    out.append(
        "- **8-bit dense states** (`dense_state_bits=8`, an `Apollo` option): the AdamW moments of the part "
        "that is not low-rank (embeddings, `lm_head`, norms) in bitsandbytes' 8-bit blockwise form, 2 + 8/256 "
        f"bytes per parameter instead of 8, for every tensor of at least {MIN_8BIT_SIZE} elements (smaller ones "
        "keep fp32 moments, as in bitsandbytes' own optimizers); checkpoints hold plain tensors.")
    out.append(
        "- **lean loss** (`lowrank_opt.loss`): the cross-entropy computed over tiles of tokens x vocabulary "
        "entries, so no fp32 logits or their gradient for all tokens x the whole vocabulary exist; exact to the "
        "plain loss.")
    out.append(
        "- **`lm_head` low-rank**: `lm_head` gets APOLLO-Mini's rank-1 moments instead of AdamW's; `all-linear` "
        "leaves the output head out, so it is named.")
    out.append(
        "- **int8 weights** (Q-APOLLO, `weights=\"int8\"`): every Linear weight but the head in int8 with an fp32 "
        f"scale per row and {group} columns, dequantized one layer at a time, updated in fp32 and re-quantized with "
        "stochastic rounding.")
    out.append("")
    out.append("Each row from the shell (same estimate, same figures):")
    out.append("")
    out.append("```bash")
    for r in rows:
        mark = f"   # {r.number}" + (f": the {r.lever.setting_gb} GB setting" if r.lever.setting_gb else "")
        out.append(" ".join(lever_command(size, r.lever, setting)) + mark)
    out.append("```")
    out.append("")
    settings = [r for r in rows if r.lever.setting_gb is not None]
    if settings:
        shape = (f"--model_config {size.config} --model_dtype bfloat16 --block_size {setting.seq_len} "
                 f"--per_device_train_batch_size {setting.batch_size}"
                 + (" --gradient_checkpointing" if setting.gradient_checkpointing else ""))
        out.append(
            "To train with them, `train.py` takes the same levers (`--memory_report true` prints the measured "
            "peak next to this estimate at the end). Add your data, steps and learning rate; without `--config`, "
            "train.py starts from configs/tiny.yaml, which sets `use_cpu: true`, hence `--use_cpu false`:")
        out.append("")
        out.append("```bash")
        for r in settings:
            out.append(f"python train.py {shape} \\")
            out.append("    --use_cpu false --memory_report true \\")
            out.append(f"    {' '.join(lever_train_flags(r.lever))}   # the {r.lever.setting_gb} GB setting")
        out.append("```")
        out.append("")
    link = levers_loss_link(doc_dir)
    out.append(
        "What the levers cost in loss was measured, each against plain APOLLO-Mini with the same seeds, on a "
        f"small LLaMA on a CPU: {link}. ")
    costly = [r for r in rows if not r.lever.recommended]
    if costly:
        parts = []
        for c in costly:
            before = by_key[c.lever.after] if c.lever.after else None
            saved = (f", {(before.estimate.total - c.estimate.total) / GB:.2f} GB below row {before.number}"
                     if before is not None else "")
            parts.append(f"row {c.number} (`{','.join(c.lever.target_modules)}`{saved})")
        out[-1] += (
            f"{' and '.join(parts).capitalize()} {'are estimates' if len(parts) > 1 else 'is an estimate'} only: "
            "the same benchmark measured low-rank `lm_head` and embeddings (APOLLO-Mini's rank-1 moments for them) "
            "as costly in loss, so neither setting uses them.")
    out.append("")
    return out


def preserved_block(text: str) -> Optional[str]:
    """The fit-7b-cpu block of an existing page, markers included, byte for byte; None if it has none. A begin
    marker without an end marker after it is an error (writing the page would lose what it holds)."""
    start = text.find(FIT_BEGIN)
    if start < 0:
        return None
    end = text.find(FIT_END, start)
    if end < 0:
        raise ValueError(f"{FIT_BEGIN} ... --> without {FIT_END} after it: fix the block by hand, else "
                         "regenerating would drop it")
    return text[start:end + len(FIT_END)]


# ----------------------------------------------------------------------------------------------------------
# Plots


SEGMENT_COLORS = {
    "weights": "#4c72b0",
    "gradients": "#dd8452",
    "optimizer states": "#c44e52",
    "activations": "#55a868",
    "step scratch": "#8172b3",
    "overhead": "#937860",
}


def plot_size(rows: list[Row], size: ModelSize, setting: Setting, path: Path, command: str) -> None:
    plt = pyplot()
    mine = [r for r in rows if r.size.key == size.key]
    fig, ax = plt.subplots(figsize=(13, 6))
    xs, labels = [], []
    x = 0.0
    previous = None
    for r in mine:
        if previous is not None and previous != r.method.key:
            x += 0.5  # a gap between optimizers
        previous = r.method.key
        bottom = 0.0
        for name, value in r.segments().items():
            ax.bar(x, value, bottom=bottom, width=0.8, color=SEGMENT_COLORS[name],
                   hatch="//" if r.layerwise else None, edgecolor="white", linewidth=0.5,
                   label=name if not xs else None)
            bottom += value
        ax.text(x, bottom, f"{bottom:.1f}", ha="center", va="bottom", fontsize=8)
        xs.append(x)
        labels.append(r.method.label.replace(", ", "\n") + f"\n{r.mode}")
        x += 1.0
    top = max(sum(r.segments().values()) for r in mine)
    for card in PLOT_LINES_GB:
        if card < top * 1.15:
            ax.axhline(card, color="grey", linestyle="--", linewidth=0.8)
            ax.text(xs[-1] + 0.6, card, f"{card} GB", va="center", fontsize=8, color="grey",
                    bbox=dict(facecolor="white", edgecolor="none", pad=1.0))
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7.5)
    ax.set_xlim(xs[0] - 0.7, xs[-1] + 1.4)
    ax.set_ylabel("estimated peak per GPU (GB = 1e9 bytes)")
    e = mine[0].estimate
    ax.set_title(f"{size.label} ({e.n_params / 1e9:.2f} B params), bf16 weights, batch {setting.batch_size} x "
                 f"{setting.seq_len} tokens" + (", gradient checkpointing" if setting.gradient_checkpointing else "")
                 + "\nestimate (lowrank_opt.memory.estimate), not a measurement; hatched = layer-wise updates",
                 fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
    ax.set_ylim(0, top * 1.12)
    fig.text(0.01, 0.005, command, fontsize=6.5, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# The document


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path)


def _total(rows: list[Row], size: str, method: str, layerwise: bool) -> Optional[Any]:
    for r in rows:
        if r.size.key == size and r.method.key == method and r.layerwise == layerwise:
            return r.estimate
    return None


def _highlights(rows: list[Row], setting: Setting, small_vocab: Optional[Any] = None,
                headline: Optional[list[HeadlineRow]] = None) -> list[str]:
    """A few sentences about the figures, only for the rows that were computed. ``small_vocab``: the 7B
    layer-wise APOLLO-Mini estimate with a 1000-token vocabulary (what the embeddings cost); ``headline``: the
    rows of the 16 GB / 12 GB section, if the page has it."""
    out = []
    def get(method: str, layerwise: bool):
        return _total(rows, "7b", method, layerwise)

    mini, apollo, adamw = get("apollo_mini", True), get("apollo", True), get("adamw", False)
    if mini is not None and apollo is not None and adamw is not None:
        out.append(
            f"- **LLaMA-7B**: plain AdamW needs about {adamw.total / GB:.0f} GB; layer-wise APOLLO "
            f"{apollo.total / GB:.1f} GB and layer-wise APOLLO-Mini {mini.total / GB:.1f} GB. Of these, "
            f"{mini.weights / GB:.1f} GB are the bf16 weights, which no optimizer can shrink (int8 weights can). "
            f"The estimate puts layer-wise APOLLO-Mini {'under' if mini.total <= 24 * GB else 'over'} a 24 GB "
            f"card and {'under' if mini.total <= 16 * GB else 'over'} 16 GB as it stands"
            + (f"; the levers that take it under 16 GB, and with int8 weights under 12 GB, are in "
               f"[{HEADLINE_TITLE}](#{github_anchor(HEADLINE_TITLE)})" if headline else "")
            + " (see \"What the estimator does not know\" before relying on a margin of a few GB). A "
            "back-of-the-envelope count of weights, the largest gradient and activations gives "
            f"{(mini.weights + mini.gradients + mini.activations) / GB:.1f} GB (the \"about 16 GB\" one often "
            "hears); the estimate adds the optimizer states, almost all of them the AdamW moments of the embeddings "
            f"and `lm_head` ({mini.optimizer_states / GB:.1f} GB), the update's scratch tensors "
            f"({mini.step_temporaries / GB:.2f} GB) and the overhead: CUDA context, the allocator's rounding and "
            f"fragmentation ({mini.overhead / GB:.1f} GB).")
        if small_vocab is not None:
            out.append(
                f"- **The step's scratch does not grow with the embeddings**: "
                f"{mini.step_temporaries / GB:.2f} GB for layer-wise APOLLO-Mini at 7B, and "
                f"{small_vocab.step_temporaries / GB:.2f} GB for the same model with a 1000-token vocabulary "
                "(same command, estimated by this script). Updates of bf16 weights work on fp32 copies, "
                "a block of rows (at most 2^22 elements on a GPU) at a time, so the 32000 x 4096 "
                "`embed_tokens` and `lm_head` no longer need full-size fp32 copies of the weight, gradient, "
                "`sqrt(v)` and rounding bits inside backward (2.10 GB when they were updated whole).")
    plain_apollo = get("apollo", False)
    if plain_apollo is not None and apollo is not None:
        out.append(
            f"- **Layer-wise updates** matter more than the optimizer state at 7B: they drop the gradients from "
            f"{plain_apollo.gradients / GB:.1f} GB (one bf16 gradient per parameter) to the largest single "
            f"gradient, {apollo.gradients / GB:.2f} GB (the 32000 x 4096 embedding).")
    if plain_apollo is not None:
        c = plain_apollo.components
        low = c.get("optimizer_states.low-rank", 0)
        dense = c.get("optimizer_states.dense", 0)
        out.append(
            f"- **APOLLO's states at 7B are {plain_apollo.optimizer_states / GB:.2f} GB, not the paper's 1.6 GB**: "
            f"{low / GB:.2f} GB are the rank-256 moments of the attention/MLP matrices, kept in fp32 by default "
            f"(`state_dtype=bfloat16` halves them to the paper's 1.6 GB), and {dense / GB:.2f} GB are the plain "
            "AdamW moments (fp32) of `embed_tokens` and `lm_head` (2 x 131 M parameters), which the paper's "
            "optimizer-memory figures leave out. The same dense part is why APOLLO-Mini is not \"about 0\" here "
            "(`dense_state_bits=8` keeps those moments in 8 bits"
            + (f": [{HEADLINE_TITLE}](#{github_anchor(HEADLINE_TITLE)})" if headline else "") + ").")
    adamw_plain, adamw_master = get("adamw", False), get("adamw_fp32_master", False)
    if adamw_plain is not None and adamw_master is not None:
        out.append(
            f"- **AdamW's states depend on the weight dtype**: `torch.optim.AdamW` keeps its moments in the "
            f"parameter dtype, so on pure bf16 weights they are {adamw_plain.optimizer_states / GB:.1f} GB "
            f"(4 bytes/param), not the 54 GB of fp32 states (8 bytes/param) usually quoted; those need fp32 "
            f"master weights, the `AdamW, fp32 master` row ({adamw_master.total / GB:.0f} GB in all). Plain "
            f"foreach AdamW also makes a moment-sized `sqrt(v)` for all parameters at once in its step "
            f"({adamw_plain.step_temporaries / GB:.1f} GB at 7B); `fused=True` (`adamw_torch_fused`) avoids it.")
    sizes = list(dict.fromkeys(r.size for r in rows))
    worse = [s.label for s in sizes
             if _total(rows, s.key, "apollo", True) is not None and _total(rows, s.key, "apollo", False) is not None
             and _total(rows, s.key, "apollo", True).total > _total(rows, s.key, "apollo", False).total]
    if worse:
        out.append(
            f"- **Small models: layer-wise is not smaller** ({', '.join(worse)}, APOLLO): there the gradients are "
            "tiny and the peak is the loss's logits (tokens x 32000 vocabulary); a layer-wise update runs inside "
            "backward, on top of that peak, so its scratch tensors add to it, while a plain `step()` runs after "
            "the activations are gone.")
    dense_heavy = [f"{METHODS[m].label} at {s.label}" for s in sizes for m in ("apollo", "apollo_mini")
                   if _total(rows, s.key, m, False) is not None
                   and _total(rows, s.key, "adamw", False) is not None
                   and _total(rows, s.key, m, False).optimizer_states
                   > _total(rows, s.key, "adamw", False).optimizer_states]
    if dense_heavy:
        out.append(
            f"- **APOLLO's states can exceed pure-bf16 AdamW's** ({', '.join(dense_heavy)}): the embeddings and "
            "`lm_head` (32000 x hidden each) are a large share of a small model, APOLLO gives them plain AdamW "
            "with fp32 moments (8 bytes/param), while `torch.optim.AdamW` on bf16 weights keeps bf16 moments "
            "(4 bytes/param) for everything.")
    return out


def render(rows: list[Row], sizes: list[ModelSize], methods: list[Method], setting: Setting, command: str,
           plots: dict[str, Path], output: Path, extra: list[Row], small_vocab: Optional[Any] = None,
           headline: Optional[list[HeadlineRow]] = None, preserved: Optional[str] = None) -> str:
    """The page. ``headline``: the rows of the 16 GB / 12 GB section (:func:`headline_rows`), None to leave it
    out; ``preserved``: the fit-7b-cpu block of the page being replaced (:func:`preserved_block`), None for the
    empty block."""
    from lowrank_opt.memory.estimate import CUDA_CONTEXT_BYTES, FRAGMENTATION

    doc_dir = output.parent
    ckpt = "on" if setting.gradient_checkpointing else "off"
    lines: list[str] = []
    add = lines.append
    add("# Training memory: estimates per model size and optimizer")
    add("")
    add("How much GPU memory does training a LLaMA model take with each optimizer, and what fits on which card? "
        "This page answers with **estimates** from `lowrank_opt.memory.estimate`, which builds the model on "
        "PyTorch's meta device (shapes only, nothing allocated) and counts bytes from formulas and from a dry "
        "run of the optimizer's own `step()`. No number on this page was measured on a GPU; see "
        "[Measured on a GPU: pending](#measured-on-a-gpu-pending).")
    add("")
    add("## Estimate your own run")
    add("")
    add("From the shell (the console script installed with the package; add `--json` for machine-readable "
        "output, `--detail` for a split per parameter kind):")
    add("")
    add("```bash")
    add("lowrank-opt memory llama_7b --optim apollo_mini --layerwise --gradient-checkpointing --seq-len 2048")
    add("lowrank-opt memory configs/llama_1b.json --optim adamw,adamw_8bit,galore,apollo,apollo_mini \\")
    add("    --gradient-checkpointing                     # several optimizers side by side, default options")
    add("lowrank-opt memory path/to/config.json --optim apollo --dtype bf16 --batch-size 4 --seq-len 4096")
    add("lowrank-opt memory llama_7b --optim adamw --zero-stage 2 --num-gpus 8   # per-GPU figure under ZeRO-2")
    add("lowrank-opt optimizers   # every name it takes;  lowrank-opt configs   # the configs/ names")
    add("```")
    add("")
    add("`--optim-args` (HF style, `\"rank=128,scale_type=channel\"`) goes to every optimizer named, so "
        "compare optimizers with different options in separate calls. "
        "`CONFIG` is a name in `configs/`, a transformers `config.json` or a directory holding one (no weights "
        "are read). From Python: `from lowrank_opt.memory import estimate; print(estimate(\"llama_7b\", "
        "\"apollo\", layerwise=True, gradient_checkpointing=True).table())`; the result's fields are bytes "
        "(`.to_dict()`, `.components` for the split).")
    add("")
    add("During training, `train.py --memory_report true` adds a `MemoryCallback` "
        "(`lowrank_opt.memory.MemoryCallback`) that logs the measured memory at every step (on CUDA the "
        "peaks `torch.cuda.max_memory_allocated` / `max_memory_reserved`; on CPU the optimizer-state bytes and "
        "the process's peak RSS) and, at the end of training, prints the measured peak next to the estimate "
        "for the same run (model, optimizer and `--optim_args`, dtype, batch size, `--block_size`, gradient "
        "checkpointing). For example:")
    add("")
    add("```bash")
    add("python train.py --model_config configs/llama_60m.json --model_dtype bfloat16 --optim apollo \\")
    add("    --optim_args rank=128 --block_size 256 --gradient_checkpointing --max_steps 50 --memory_report true")
    add("```")
    add("")
    add("The log then carries `mem_*` keys (GB) each step, and the run ends with the measured peak beside the "
        "estimate. On CPU the comparable figure is the optimizer state (exact); peak RSS also holds Python, "
        "torch and the data. With your own `transformers.Trainer`, pass "
        "`callbacks=[MemoryCallback(estimate=estimate(...))]`.")
    add("")
    if headline:
        lines.extend(headline_section(headline, setting, doc_dir))
    add(preserved if preserved is not None else FIT_EMPTY)
    add("")
    add("## The table")
    add("")
    add("Produced by (takes a few minutes on a 2-core CPU; no GPU involved):")
    add("")
    add("```bash")
    add(command)
    add("```")
    add("")
    add(f"Setting: **bf16 weights** (pure bf16: no fp32 master copy, except in the `AdamW, fp32 master` "
        f"column), **micro-batch {setting.batch_size} x {setting.seq_len} tokens**, gradient checkpointing "
        f"**{ckpt}** (Hugging Face's per-decoder-layer checkpointing), SDPA attention, one GPU, no ZeRO. "
        "Sizes are GB = 10^9 bytes, per GPU, at the peak of one training step. Configs: `configs/llama_*.json` "
        "(the APOLLO/GaLore papers' LLaMA shapes, vocabulary 32000, untied embeddings).")
    add("")
    add("Optimizers:")
    add("")
    for m in methods:
        add(f"- **{m.label}**: {m.what}.")
    add("")
    add("Ranks. GaLore: " + ", ".join(f"{s.label} {s.galore_rank}" for s in sizes)
        + " — the GaLore paper's pre-training ranks (Table 2, r/d_model 128/256, 256/768, 256/1024, "
        "512/2048) and, for 7B, rank 1024 from the GaLore repository's 7B scripts "
        "(`scripts/benchmark_c4/llama_7b.sh`, `scripts/single_gpu/llama_7b*.sh`); note that the repository's "
        "`scripts/benchmark_c4/llama_1b.sh` passes rank 1024, not the paper's 512. update_proj_gap 200, scale "
        "0.25, SVD projection. APOLLO: " + ", ".join(f"{s.label} {s.apollo_rank}" for s in sizes)
        + " — a quarter of the hidden size, at most 256, as in the APOLLO paper's tables and scripts "
        "(the APOLLO repository's pre-training scripts; the paper runs 1B and 7B at rank 256, and its LLaMA-7B optimizer-state figure, 1.6 GB, is for r = 256). APOLLO-Mini: rank 1.")
    add("")
    add("Layer-wise (\"plain / layer-wise\" in each cell): every parameter is updated inside the backward pass "
        "as soon as its gradient is ready, and the gradient is freed at once (`apollo_layerwise`, "
        "`apollo_mini_layerwise`, HF's `galore_adamw_layerwise`). For the three AdamW columns the layer-wise "
        "figure is what one optimizer per parameter stepped from `register_post_accumulate_grad_hook` would "
        "need (PyTorch's tutorial recipe); neither `train.py` nor the HF Trainer offers that, so it is only an "
        "estimate of the technique. Layer-wise updates cannot be combined with gradient accumulation, "
        "data-parallel all-reduce or global-norm clipping.")
    add("")
    add("### Totals (GB, plain / layer-wise)")
    add("")
    add(summary_table(rows, sizes, methods))
    add("")
    highlights = _highlights(rows, setting, small_vocab, headline)
    if highlights:
        add("What stands out:")
        add("")
        lines.extend(highlights)
        add("")
    for size in sizes:
        add(f"### {size.label}")
        add("")
        add(detail_table(rows, size))
        add("")
        add(f"Optimizer states, {size.label}, by part (GB; the same in both modes):")
        add("")
        add(state_split_table(rows, size))
        add("")
        if size.key in plots:
            rel = _relative(plots[size.key], doc_dir)
            add(f"![{size.label} estimated memory per optimizer]({rel})")
            add("")
            add(f"*{rel}: the total of each bar split into weights, gradients, optimizer states, activations "
                "(net of what backward frees while gradients appear), optimizer step scratch and overhead; "
                "hatched bars are layer-wise. Same command as above.*")
            add("")
    if extra:
        add("### LLaMA-7B: a few other settings")
        add("")
        add("Same command (the script adds these rows for 7B): the AdamW that `benchmarks/fit_7b.py` runs "
            "(fused), and APOLLO and APOLLO-Mini with bf16 moments (the dense AdamW moments of the embeddings "
            "and `lm_head` included; the published APOLLO's AdamW keeps them in the weights' dtype, bf16 here).")
        add("")
        bf16 = [r for r in extra if r.method.key == "apollo_bf16" and r.layerwise]
        base = _total(rows, "7b", "apollo", True)
        if bf16 and base is not None:
            e = bf16[0].estimate
            add(f"bf16 moments save {(base.optimizer_states - e.optimizer_states) / GB:.2f} GB of state in "
                f"layer-wise APOLLO; the update reads them through fp32 copies, a block at a time, so its scratch "
                f"changes by {(e.step_temporaries - base.step_temporaries) / GB:+.2f} GB and the peak drops by "
                f"{(base.total - e.total) / GB:.2f} GB.")
            add("")
        add("| optimizer | mode | optimizer states | step temporaries | **total** |")
        add("|---|---|--:|--:|--:|")
        for r in extra:
            e = r.estimate
            args = ",".join(f"{k}={v}" for k, v in e.optim_args.items())
            add(f"| `{e.optimizer}`{'(' + args + ')' if args else ''} | {r.mode} | {_gb(e.optimizer_states)} | "
                f"{_gb(e.step_temporaries)} | **{_gb(e.total)}** |")
        add("")
    add("## What each row means")
    add("")
    add("The formulas live in the docstring of `lowrank_opt/memory/estimate.py`; in plain words:")
    add("")
    add("- **weights**: number of parameters x bytes per parameter (bf16: 2). With fp32 master weights "
        "(mixed precision) also a 4-byte fp32 copy per parameter; the bf16 copy is then autocast's cache of "
        "cast weights. LLaMA-7B: 6.74 B x 2 = 13.5 GB. With int8 weights (Q-APOLLO, `weights=\"int8\"`) every "
        "Linear weight but the output head is 1 byte per parameter plus an fp32 scale per row and 128 columns; "
        "the embeddings, head and norms stay bf16, and the one layer's weight dequantized while it runs is "
        "counted with the activations.")
    add("- **gradients**: one gradient per trainable parameter, in the dtype autograd accumulates into (bf16 "
        "for pure bf16, fp32 under autocast with fp32 master weights). With layer-wise updates only the "
        "largest single gradient is counted, because each one is freed right after its update.")
    add("- **optimizer states**: for `lowrank_opt`'s own optimizers and torch's AdamW, the optimizer is "
        "really built on the meta-device model and runs one `step()` on meta gradients; its state is then "
        "counted by `lowrank_opt.memory.optimizer_state_bytes`, the same function that measures a real "
        "optimizer (so the two agree to the byte: tests/test_memory.py, and train.py's `--memory_report` test). "
        "APOLLO: two moments of r x max(m, n) per low-rank matrix, plus AdamW moments for the embeddings, "
        "`lm_head` and norms (APOLLO paper Table 1: 2nr + 2 numbers per matrix); with `dense_state_bits=8` "
        "those AdamW moments of tensors of 4096 elements or more are 1 byte each plus an fp32 absmax per "
        "256-element block (bitsandbytes' blockwise format), measured by the same dry run. For packages the "
        "library must "
        "not import, the published state layouts are used: bitsandbytes 8-bit AdamW (bitsandbytes 0.45-0.50 "
        "`Optimizer2State`: 1 byte per moment plus an fp32 absmax per 256-element block, tensors under 4096 "
        "elements and embeddings in 32-bit), GaLore (galore-torch 1.0 `GaLoreAdamW`: moments r x max(m, n) "
        "and the projection r x min(m, n), 2nr + mr in the GaLore/APOLLO papers' notation, in the parameter "
        "dtype).")
    add("- **activations**: what the Hugging Face LLaMA implementation saves for backward, term by term per "
        "decoder layer (the norms' inputs, the projections' inputs, SDPA's q/k/v and log-sum-exp, the SwiGLU "
        "intermediates), checked byte-exact against `torch.autograd.graph.saved_tensors_hooks` in "
        "tests/test_memory.py; in the spirit of Korthikanti et al. 2022 (\"Reducing Activation Recomputation "
        "in Large Transformer Models\", Sec. 4.1). With gradient checkpointing each layer keeps only its input "
        "(tokens x hidden x 2 bytes) and one layer is recomputed at a time; the loss adds the fp32 "
        "log-probabilities and short-lived logits copies (tokens x vocabulary x several bytes — at 2048 "
        "tokens and a 32000 vocabulary these are larger than all checkpointed layers of 7B together). With the "
        "lean loss (`lean_loss=True`, `train.py --lean_loss`) no tokens x vocabulary tensor exists: the loss "
        "holds one fp32 tile of tokens x vocabulary entries, an fp32 accumulator of the hidden states' gradient "
        "and, for bf16 inputs, fp32 copies of a token chunk and a weight block (the docstring of "
        "`lowrank_opt/memory/activations.py`).")
    add("- **freed during backward** (negative): while backward runs, gradients appear as activations are "
        "freed; the estimator walks the backward pass layer by layer from the loss to the embedding and "
        "takes the highest point instead of adding activations and gradients. With layer-wise updates only "
        "the gradient being updated (and its update's scratch) is alive at each point of that walk; the loss's "
        "own peak comes before any gradient, so the largest gradient usually shows up here as freed.")
    add("- **step temporaries**: scratch tensors of the optimizer step, by how much they raise the peak. "
        "Measured in the same meta dry run as a timeline of allocations (torch's AdamW with `foreach=True`, "
        "its CUDA default, makes one `sqrt(v)` for all parameters at once; APOLLO's are per tensor, e.g. "
        "fp32 working copies of a bf16 weight). bitsandbytes: 0 (in-place fused kernels); GaLore: the larger "
        "of one full-size update and an SVD refresh of the largest target.")
    add(f"- **overhead**: three parts. The CUDA context and library workspaces, a flat "
        f"{CUDA_CONTEXT_BYTES / GB:.2f} GB (0.5-1 GB is typical for CUDA 12 with cuBLAS/cuDNN on H100-class "
        "GPUs). The caching allocator's rounding of the persistent tensors: weights and optimizer states are "
        "allocated once and kept, and a tensor of 1 MB or more gets a segment rounded up to 2 MiB, so each "
        "wastes what it falls short of the next 2 MiB (counted exactly for the weights, as half of 2 MiB on "
        f"average per state tensor of 10 MB or more). Fragmentation, {FRAGMENTATION * 100:g} % of the transient "
        "peak only: activations, gradients, the loss and the step's scratch, the memory that is freed and "
        "re-allocated every step (5-10 % is usual); earlier versions of this page charged it on everything, "
        "the weights included. Neither the rounding nor the fragmentation has been measured on a GPU yet.")
    add("- **total**: weights + gradients + optimizer states + activations - freed during backward + step "
        "temporaries + overhead: the peak that `nvidia-smi` would show, roughly. **smallest card**: the "
        f"smallest of {', '.join(str(c) for c in CARDS_GB)} GB at or above the total (the usual sizes, "
        "taken as 10^9 bytes, so a card sold as 24 GB with 24 GiB has 1.8 GB of slack the table ignores).")
    add("")
    add("## What the estimator does not know")
    add("")
    add(f"- **The allocator's real behaviour.** Fragmentation is taken as {FRAGMENTATION * 100:g} % of the "
        "transient peak plus the 2 MiB rounding of the persistent tensors; the true figure depends on the order "
        "of allocations, on `PYTORCH_CUDA_ALLOC_CONF` (e.g. `expandable_segments:True` lowers it) and on how "
        "close to the limit the run is (the allocator frees cached blocks and retries before it gives up).")
    add(f"- **The CUDA context** is a fixed {CUDA_CONTEXT_BYTES / GB:.2f} GB; it varies with the driver, the GPU "
        "and which libraries load (cuDNN, NCCL, Triton, flash-attention), and multi-GPU runs add NCCL buffers.")
    add("- **Kernel workspaces and compilers**: SDPA/flash backward workspaces, cuBLAS workspaces, "
        "`torch.compile` and CUDA-graph memory pools. The loss is modelled as Hugging Face's default path "
        "(bf16 logits, fp32 upcast) or, with `lean_loss`, as `lowrank_opt.loss`'s chunked cross-entropy; other "
        "fused cross-entropy kernels (Liger-Kernel, cut-cross-entropy) are not.")
    add("- **Other architectures**: activations are the LLaMA decoder's; other `model_type`s are approximated "
        "by the same formula (the estimate says so in a note). Mixture-of-experts, vision towers, LoRA "
        "adapters, 4-bit weights (QLoRA's NF4) and CPU offloading are not modelled; int8 weights (Q-APOLLO) "
        "are.")
    add("- **Training-loop details**: every sequence is taken as full length (no packing/padding effects); "
        "gradients are taken as set to `None` after each step (the Trainer's default) — with gradient "
        "accumulation they stay alive through the next forward, so the peak is gradients plus full "
        "activations; evaluation, generation and checkpoint saving are not counted; host (CPU) memory is not "
        "estimated.")
    add("- **Layer-wise timing**: exactly one gradient (the largest) is taken to be alive at a time; in "
        "reality a second one can exist for a moment while the previous hook runs.")
    add("- **Other package versions**: the bitsandbytes and galore-torch layouts are those of the versions "
        "named above; torch's optimizers are dry-run with the installed torch, so their figures follow torch.")
    add("- **Whether training works**: memory only — not speed, not whether bf16 updates are lost without "
        "stochastic rounding (APOLLO rounds stochastically by default), not convergence (the memory levers' "
        f"loss cost is measured apart: {levers_loss_link(doc_dir)}).")
    add("")
    add("## Measured on a GPU: pending")
    add("")
    add("**None of the figures on this page were measured on a GPU.** They come from the estimator, run on a "
        "CPU-only machine. What has been measured is the estimator's model of live tensor bytes (weights, "
        "gradients, states, activations, the loss, step scratch; not the CUDA context or fragmentation) "
        "against real CPU training runs of LLaMA-60M and 130M, traced allocation by allocation: "
        "[memory_measured_cpu.md](memory_measured_cpu.md)"
        + (f"; and LLaMA-7B at the two settings of [{HEADLINE_TITLE}](#{github_anchor(HEADLINE_TITLE)}), in the "
           "block under that section" if preserved is not None and preserved.strip() != FIT_EMPTY else "")
        + ". The check that matters — real peaks on a GPU next to these estimates, with the aim that "
        "the estimate is within 10 % of the measured peak for LLaMA-60M to 1B, and whether LLaMA-7B really "
        "trains under 48, 24, 16 and 12 GB caps — is **pending a session with a CUDA GPU**; none was available "
        "when this page was written, so no measured number is reported here and none should be inferred.")
    add("")
    add("The run is prepared and tested on CPU (`tests/test_gpu_proof.py`): `benchmarks/gpu_proof.py` does it "
        "in one command of about 8 minutes, in four budgeted stages, keeping whatever it measured if it is cut "
        "short: **fit_7b** (LLaMA-7B from `configs/llama_7b.json`, built on the GPU in bf16, sequence 2048, "
        "gradient checkpointing, 10 real optimizer steps under `torch.cuda.set_per_process_memory_fraction` "
        "caps: `apollo` at 48 GB, `apollo_mini_layerwise` at 24 and 16 GB, `apollo_layerwise` at 24 GB, fused "
        "AdamW at 48 GB, expected to run out of memory; and the two settings of the headline section: "
        "layer-wise APOLLO-Mini with 8-bit dense states and the lean loss under a 16 GB cap, and the same with "
        "int8 weights under a 12 GB cap), **step_time** (the optimizer step alone at the 1B and "
        "7B shapes, paired against fused AdamW and apollo-torch), **estimator** (measured peaks against these "
        "estimates for LLaMA-60M to 1B) and **cuda_checks** (bf16 stochastic rounding in row blocks, the dense "
        "update in GPU-sized chunks, the projection draw equal across processes). What the files hold: "
        "[gpu/README.md](gpu/README.md).")
    add("")
    add("On the device machine (no network there; the reference packages travel as wheels, and bitsandbytes "
        "too, which both import): once, in the repository root of the checkout the device tool sends,")
    add("")
    add("```bash")
    add("python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\")
    add("    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \\")
    add("    -d .whl apollo-torch==1.0.3 galore-torch==1.0 bitsandbytes==0.50.2    # 43 MB; .whl/ is git-ignored")
    add("```")
    add("")
    add("then one device call with `carry: [\".whl\"]` and `timeout_s: 600`:")
    add("")
    add("```bash")
    add("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \\")
    add("  && export PYTHONPATH=$PWD:/tmp/site || exit 1; cp docs/gpu/results.json \"$OUT/\" 2>/dev/null; \\")
    add("  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_proof.py --budget-s 480 \\")
    add("    --results \"$OUT/results.json\" --log \"$OUT/gpu_proof.log\"")
    add("```")
    add("")
    add("Results, log and `results.md` are written under `$OUT` after every unit, so they come back even when "
        "the call is cut; copy them from the tool's `files_at` into `docs/gpu/`. The run merges into the "
        "`results.json` it was given, unit by unit: if a stage was cut, run again at once, while the machine is "
        "still warm, with `--stages` naming what is missing and a smaller `--budget-s`. Without the wheels, "
        "the apollo-torch and GaLore rows say `skipped: apollo-torch not installed` and the rest runs. "
        "`python benchmarks/gpu_proof.py --smoke` runs every stage on the CPU on tiny configs (not GPU numbers).")
    add("")
    add("`benchmarks/fit_7b.py` remains the tool for other caps, optimizers and models, one process, with "
        "fallback to shorter sequences on out-of-memory; it takes the memory levers (`--optim-args`, "
        "`--target-modules`, `--lean-loss`, `--weights int8`), and `--device cpu` runs it on the CPU against "
        "the estimate's live tensor bytes (its docstring has the LLaMA-7B commands of the two settings):")
    add("")
    add("```bash")
    add("python benchmarks/fit_7b.py --caps 48,24,16 --output fit_7b.json          # LLaMA-7B, the defaults")
    add("python benchmarks/fit_7b.py --config configs/llama_1b.json --caps 0 \\")
    add("    --optims apollo,apollo_layerwise,adamw_fused --output fit_1b.json        # no cap: estimate check")
    add("```")
    add("")
    add("When the GPU numbers exist, they belong in a table here next to the estimates, with the command, the "
        "GPU and the torch/CUDA versions.")
    add("")
    add("---")
    add(f"*Generated by `benchmarks/memory_table.py` on {datetime.date.today().isoformat()} "
        f"(torch {_torch_version()}, transformers {_transformers_version()}).*")
    add("")
    return "\n".join(lines)


def _torch_version() -> str:
    import torch

    return torch.__version__


def _transformers_version() -> str:
    return package_version("transformers") or "?"


# ----------------------------------------------------------------------------------------------------------
# Command line


def _small_vocab_estimate(setting: Setting):
    """Layer-wise APOLLO-Mini on LLaMA-7B with a 1000-token vocabulary: the step scratch without the big
    embedding matrices."""
    import json

    from lowrank_opt.memory import estimate

    config = json.loads((ROOT / "configs" / "llama_7b.json").read_text())
    config["vocab_size"] = 1000
    return estimate(config, "apollo_mini_layerwise", dtype="bf16", batch_size=setting.batch_size,
                    seq_len=setting.seq_len, gradient_checkpointing=setting.gradient_checkpointing)


def _csv(text: str, known: dict, what: str) -> list:
    keys = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [k for k in keys if k not in known]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none given)'}; "
                                         f"known: {', '.join(known)}")
    return [known[k] for k in keys]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memory_table.py",
        description="Write docs/memory.md: estimated training memory (lowrank_opt.memory.estimate, nothing "
                    "allocated, no GPU) for LLaMA 60M..7B x optimizers x {plain, layer-wise}, plus one "
                    "stacked-bar PNG per model size.")
    parser.add_argument("--sizes", default=",".join(SIZES), type=lambda t: _csv(t, SIZES, "size"),
                        help=f"model sizes, comma-separated (default: {','.join(SIZES)})")
    parser.add_argument("--optims", default=",".join(METHODS), type=lambda t: _csv(t, METHODS, "optimizer"),
                        help=f"optimizers, comma-separated (default: {','.join(METHODS)})")
    parser.add_argument("--batch-size", type=int, default=1, help="per-GPU micro-batch (default 1)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="estimate without gradient checkpointing (default: on)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "memory.md",
                        help="the markdown file to write (default docs/memory.md)")
    parser.add_argument("--plots-dir", type=Path, default=None,
                        help="where the PNGs go (default: the output's folder), as memory_<size>.png")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for label, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            parser.error(f"{label} must be >= 1, got {value}")
    if not args.no_plots:
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            parser.error("the plots need matplotlib: pip install matplotlib (or .[bench]), or pass --no-plots")
    # The hand-filled block of the page being replaced, read before any work: a broken one stops the run here.
    try:
        preserved = preserved_block(args.output.read_text()) if args.output.exists() else None
    except ValueError as error:
        parser.error(f"{args.output}: {error}")
    setting = Setting(batch_size=args.batch_size, seq_len=args.seq_len,
                      gradient_checkpointing=args.gradient_checkpointing)
    command = command_line("memory_table.py", argv)
    print(f"estimating {len(args.sizes)} sizes x {len(args.optims)} optimizers x 2 modes ...")
    rows = collect(args.sizes, args.optims, setting)
    extra: list[Row] = []
    seven = SIZES["7b"]
    if seven in args.sizes:
        for method in (Method("adamw_fused", "AdamW fused", "adamw_torch_fused", "adamw_torch_fused"),
                       Method("apollo_bf16", "APOLLO, bf16 states", "apollo", "apollo_layerwise",
                              optim_args=lambda size: dict(rank=size.apollo_rank, state_dtype="bfloat16")),
                       Method("apollo_mini_bf16", "APOLLO-Mini, bf16 states", "apollo_mini", "apollo_mini_layerwise",
                              optim_args=lambda size: dict(state_dtype="bfloat16"))):
            for layerwise in (False, True):
                extra.append(estimate_row(seven, method, layerwise, setting))
        small_vocab = _small_vocab_estimate(setting)
        print("estimating the 16 GB / 12 GB section ...")
        headline = headline_rows(seven, setting)
    else:
        small_vocab = headline = None
    output = args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    if not args.no_plots:
        plots_dir = args.plots_dir or output.parent
        plots_dir.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            path = plots_dir / f"memory_{size.key}.png"
            plot_size(rows, size, setting, path, command)
            plots[size.key] = path
            print(f"wrote {path}")
    text = render(rows, args.sizes, args.optims, setting, command, plots, output, extra, small_vocab,
                  headline=headline, preserved=preserved)
    write_text_atomic(output, text)
    print(f"wrote {output}")
    print()
    print(summary_table(rows, args.sizes, args.optims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
