"""Convergence: pre-train a small LLaMA from scratch with each optimizer on the same data, seed and schedule.

    python benchmarks/convergence.py                  # CPU: configs/llama_5m.json, 400 steps, the full sweep
    python benchmarks/convergence.py --optimizers torch-adamw,apollo --lrs 1e-2 --steps 50 --output /tmp/c.md
    python benchmarks/convergence.py --device cuda --model-config configs/llama_60m.json --rank 128 \\
        --steps 2000 --batch-size 64 --block-size 256 --parallel 1 --threads 0 --tag gpu

Every run is ``train.py`` in its own process; finished runs under --work-dir are reused while their settings are
unchanged. Optimizers: ours by registry name, ``_common.BASELINES`` by their Hugging Face names, and
:data:`VARIANTS` (apollo_mini with a memory lever). The setting and how to read the tables: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BASELINES, baseline_train_args, check_at_least, command_line, csv_text, load_average, machine_line, mib, pyplot,
    save_figure, section, split_list, storage_bytes, table, write_section, write_text_atomic)

SCRIPT = "benchmarks/convergence.py"
SECTIONS = ("sweep", "variants")


@dataclass(frozen=True)
class Variant:
    """A memory lever on top of a plain optimizer: the same run with more train.py flags."""

    base: str  # the optimizer it is compared against (its --optim)
    what: str  # for the report
    optim_args: str = ""  # appended to the base's --optim_args
    extra_targets: tuple[str, ...] = ()  # low-rank next to the run's targets
    targets: tuple[str, ...] = ()  # low-rank instead of the run's targets
    flags: tuple[str, ...] = ()  # more train.py flags
    max_gap_pct: Optional[float] = None  # target: mean eval loss at most this % above the base's
    within_noise: bool = False  # target: |mean difference| at most the base's seed spread


VARIANTS = {
    "apollo_mini+8bit_states": Variant(
        "apollo_mini", "AdamW moments of embed_tokens and lm_head in 8-bit blockwise form (`dense_state_bits=8`)",
        optim_args="dense_state_bits=8", within_noise=True),
    "apollo_mini+lowrank_embeddings": Variant(
        "apollo_mini", "embed_tokens and lm_head low-rank too, Mini's settings (`--optim_target_modules ... "
        "embed_tokens lm_head`)", extra_targets=("embed_tokens", "lm_head")),
    "q_apollo_mini": Variant(
        "apollo_mini", "Q-APOLLO-Mini: every Linear but lm_head in int8, group 128, stochastic re-quantization "
        "(`--weights int8`)", flags=("--weights", "int8"), max_gap_pct=3.0),
    # The headline settings of docs/memory.md, as they are run: every lever of the setting at once.
    "apollo_mini+16gb_setting": Variant(
        "apollo_mini", "the 16 GB setting: 8-bit AdamW moments of embed_tokens and lm_head, lean loss "
        "(`dense_state_bits=8`, `--lean_loss`)", optim_args="dense_state_bits=8", flags=("--lean_loss",),
        within_noise=True),
    "apollo_mini+lowrank_head": Variant(
        "apollo_mini", "the 16 GB setting with lm_head low-rank too, Mini's settings (`dense_state_bits=8`, "
        "`--optim_target_modules ... lm_head`, `--lean_loss`)", optim_args="dense_state_bits=8",
        extra_targets=("lm_head",), flags=("--lean_loss",)),
    "q_apollo_mini+12gb_setting": Variant(
        "apollo_mini", "the 12 GB setting: int8 weights as q_apollo_mini, 8-bit AdamW moments of embed_tokens and "
        "lm_head, lean loss (`--weights int8`, `dense_state_bits=8`, `--lean_loss`)",
        optim_args="dense_state_bits=8", flags=("--weights", "int8", "--lean_loss"), max_gap_pct=3.0),
    # MoE models: the experts left to AdamW (what every other APOLLO implementation does with fused experts).
    "apollo+dense_experts": Variant("apollo", "fused experts left to AdamW: only the attention matrices low-rank",
                                    targets=(r".*\.self_attn\.[a-z]+_proj",)),
    "apollo_mini+dense_experts": Variant("apollo_mini", "fused experts left to AdamW: only the attention matrices "
                                         "low-rank", targets=(r".*\.self_attn\.[a-z]+_proj",)),
}
OURS = ("apollo", "apollo_mini", "apollo_layerwise", "apollo_mini_layerwise")
ALL_OPTIMIZERS = ("torch-adamw", *OURS, "apollo-torch", "galore-torch", *VARIANTS)
LAYERWISE_OF = {"apollo_layerwise": "apollo", "apollo_mini_layerwise": "apollo_mini"}
BASELINE = "torch-adamw"
# The attention and MLP matrices, for every optimizer alike (HF's "all-linear" for apollo_adamw/galore_adamw also
# takes lm_head; ours leaves it out, as PEFT does: an explicit pattern keeps the comparison equal).
TARGET_MODULES = r".*\.(self_attn|mlp)\.[a-z]+_proj"


def train_optimizer(name: str, rank: int, gap: int) -> tuple[str, Optional[str]]:
    """(train.py's --optim, its --optim_args or None) for ``name``."""
    if name in VARIANTS:
        optim, base_args = train_optimizer(VARIANTS[name].base, rank, gap)
        return optim, ",".join(x for x in (base_args, VARIANTS[name].optim_args) if x)
    if name in BASELINES:
        return baseline_train_args(name, rank, gap)
    if name in OURS:  # the registry's options but for the run's rank (channel-wise only) and gap
        return name, (f"rank={rank}," if "mini" not in name else "") + f"update_proj_gap={gap}"
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(ALL_OPTIMIZERS)}")


def build_corpus(path: Path, min_chars: int = 200) -> dict:
    """A JSONL corpus of English text that every CPython installation has: the pydoc topics (the default
    corpus of train.py) and the docstrings of the standard library's modules, classes and functions
    (at least ``min_chars`` long; test packages, idlelib and site-packages left out), in a fixed order.
    Returns a summary (documents, characters, Python version)."""
    from lowrank_opt.data import default_corpus_documents

    docs = list(default_corpus_documents())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for source in sorted(stdlib.rglob("*.py")):
        parts = set(source.relative_to(stdlib).parts)
        if parts & {"test", "tests", "idlelib", "site-packages"}:
            continue
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    text = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    write_text_atomic(path, text)
    return {"documents": len(docs), "characters": sum(map(len, docs)), "python": platform.python_version()}


# ----------------------------------------------------------------------------------------------------------
# One run (a child process)


def run_key(optimizer: str, lr: float, seed: int) -> str:
    """A run's name: its result file, its output directory."""
    return f"{optimizer}_lr{lr:g}_seed{seed}"


@dataclass
class RunSpec:
    optimizer: str
    lr: float
    seed: int
    argv: list[str]
    threads: int
    targets: list[str]  # the run's low-rank matrices (for AdamW: the same matrices, to compare state bytes)

    @property
    def key(self) -> str:
        return run_key(self.optimizer, self.lr, self.seed)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def worker(spec_path: str, result_path: str) -> int:
    """Run train.main() with the spec's argv in this process and write what the report needs."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(ROOT))
    import train
    from lowrank_opt.memory.measure import optimizer_state_breakdown, peak_rss_bytes, unwrap_optimizers
    from lowrank_opt.targets import lowrank_targets

    started = time.perf_counter()
    trainer, metrics = train.main(spec["argv"])
    wall = time.perf_counter() - started
    evals: dict[int, float] = {}
    train_losses: dict[int, float] = {}
    for entry in trainer.state.log_history:
        if "eval_loss" in entry:
            evals[int(entry["step"])] = float(entry["eval_loss"])
        elif "loss" in entry:
            train_losses[int(entry["step"])] = float(entry["loss"])
    model = trainer.model
    breakdown = optimizer_state_breakdown(trainer.optimizer)
    lowrank = [p for _, p in lowrank_targets(model, spec["targets"])]
    lowrank_ids = {id(p) for p in lowrank}
    inner = type(unwrap_optimizers(trainer.optimizer)[-1])  # the optimizer behind accelerate's wrapper
    result = dict(
        spec=spec, eval_loss=sorted(evals.items()), train_loss=sorted(train_losses.items()),
        final_eval_loss=float(metrics["eval_loss"]), final_perplexity=float(metrics["eval_perplexity"]),
        train_runtime_s=float(metrics["train_runtime"]), wall_s=wall,
        parameters=sum(p.numel() for p in model.parameters()), lowrank_parameters=sum(p.numel() for p in lowrank),
        state_bytes=breakdown.total, lowrank_state_bytes=sum(b for k, b in breakdown.items() if k in lowrank_ids),
        peak_rss_bytes=peak_rss_bytes(), weight_bytes=weight_bytes(model),
        tokens=int(trainer.state.global_step) * trainer.args.per_device_train_batch_size * spec["block_size"],
        optimizer_class=f"{inner.__module__}.{inner.__name__}", torch=torch.__version__)
    write_text_atomic(result_path, json.dumps(result, indent=1))
    return 0


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers as stored (each storage once): int8 weights count their
    int8 codes and scales, not the one-element float carrier their gradient flows through."""
    return storage_bytes([*model.parameters(), *model.buffers()])


def run_targets(args, name: str) -> list[str]:
    """The low-rank targets of a run: --target-modules, or a variant's own, plus a variant's extra ones."""
    variant = VARIANTS.get(name)
    base = list(variant.targets) if variant is not None and variant.targets else [args.target_modules]
    return base + list(variant.extra_targets if variant is not None else ())


def train_argv(args, name: str, lr: float, seed: int, corpus: Path, output_dir: Path) -> list[str]:
    optim, optim_args = train_optimizer(name, args.rank, args.update_proj_gap)
    argv = [
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--model_config", str(args.model_config),
        "--data_files", str(corpus),
        "--optim", optim,
        "--optim_target_modules", *run_targets(args, name),
        "--learning_rate", f"{lr:g}",
        "--lr_scheduler_type", "cosine_with_min_lr",
        "--lr_scheduler_kwargs", json.dumps({"min_lr_rate": 0.1}),
        "--warmup_steps", "0.1",
        "--weight_decay", "0",
        "--max_grad_norm", "1.0",
        "--max_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch_size),
        "--per_device_eval_batch_size", str(max(args.batch_size, 16)),
        "--block_size", str(args.block_size),
        "--eval_fraction", str(args.eval_fraction),
        "--eval_strategy", "steps",
        "--eval_steps", str(args.eval_steps),
        "--logging_steps", str(args.eval_steps),
        "--save_strategy", "no",
        "--report_to", "none",
        "--seed", str(seed),
        "--data_seed", str(args.data_seed if args.data_seed is not None else seed),
        "--output_dir", str(output_dir),
        "--disable_tqdm", "true",
        "--use_cpu", "true" if args.device == "cpu" else "false",
    ]
    if optim_args is not None:
        argv += ["--optim_args", optim_args]
    if name in VARIANTS:
        argv += list(VARIANTS[name].flags)
    if args.bf16:
        argv += ["--bf16", "true"]
    return argv


def _utc(timestamp: Optional[float] = None) -> str:
    """``timestamp`` (default: now) as ``2026-01-31 12:00 UTC``."""
    when = datetime.datetime.fromtimestamp(time.time() if timestamp is None else timestamp, datetime.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def run_all(specs: list[RunSpec], args) -> dict[str, dict]:
    """Run the specs (``--parallel`` at a time), reusing finished runs with unchanged settings."""
    runs_dir = Path(args.work_dir) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    todo = []
    for spec in specs:
        path = runs_dir / f"{spec.key}.json"
        if path.exists() and not args.force:
            cached = json.loads(path.read_text())
            if cached.get("digest") == spec.digest():
                cached.setdefault("finished", _utc(path.stat().st_mtime))
                results[spec.key] = cached
                continue
        todo.append(spec)
    print(f"{len(specs)} runs: {len(specs) - len(todo)} reused from {runs_dir}, {len(todo)} to run "
          f"({args.parallel} at a time)", flush=True)

    def one(index_spec):
        index, spec = index_spec
        spec_path, result_path, log_path = (runs_dir / f"{spec.key}{ext}" for ext in (".spec.json", ".json", ".log"))
        tmp_path = Path(f"{result_path}.tmp")
        spec_path.write_text(json.dumps({**asdict(spec), "block_size": args.block_size}))
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        if spec.threads > 0:
            env["OMP_NUM_THREADS"] = str(spec.threads)
        started = time.time()
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path),
                                   str(tmp_path)], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            tail = log_path.read_text()[-2000:]
            raise RuntimeError(f"run {spec.key} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
        result = {**json.loads(tmp_path.read_text()), "digest": spec.digest(), "finished": _utc()}
        write_text_atomic(result_path, json.dumps(result, indent=1))
        tmp_path.unlink()
        print(f"[{index + 1}/{len(todo)}] {spec.key}: final eval loss {result['final_eval_loss']:.4f} "
              f"({time.time() - started:.0f} s)", flush=True)
        return spec.key, result

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        results.update(pool.map(one, enumerate(todo)))
    return results


# ----------------------------------------------------------------------------------------------------------
# The variants against their base


@dataclass
class VariantComparison:
    name: str  # a VARIANTS name, or the base itself (its own row)
    base: str
    lr: float
    losses: dict[int, float]  # seed -> final eval loss
    base_losses: dict[int, float]  # seed -> the base's final eval loss at the same lr
    runs: list[dict]  # the variant's runs, by seed

    @property
    def seeds(self) -> list[int]:
        """The seeds both have: the comparison is paired (same init and data order)."""
        return sorted(set(self.losses) & set(self.base_losses))

    def _over_seeds(self, losses: dict[int, float]) -> list[float]:
        return [losses[s] for s in self.seeds]

    mean = property(lambda self: statistics.fmean(self._over_seeds(self.losses)))
    base_mean = property(lambda self: statistics.fmean(self._over_seeds(self.base_losses)))
    spread = property(lambda self: _range(self._over_seeds(self.losses)))
    base_spread = property(lambda self: _range(self._over_seeds(self.base_losses)))


def _range(values: list[float]) -> float:
    return max(values) - min(values)


def compare_variants(results: dict[str, dict], names: list[str], best_lr: dict[str, float]) -> list[VariantComparison]:
    """For each variant in ``names`` whose base has a best lr: its final eval loss per seed at that lr and the
    base's at the same lr and seeds. Each base comes first, compared with itself (its row of the table)."""
    def losses(name: str, lr: float) -> tuple[dict[int, float], list[dict]]:
        runs = sorted((r for r in results.values() if r["spec"]["optimizer"] == name and r["spec"]["lr"] == lr),
                      key=lambda r: r["spec"]["seed"])
        return {r["spec"]["seed"]: r["final_eval_loss"] for r in runs}, runs

    out: list[VariantComparison] = []
    for name in names:
        if name not in VARIANTS or VARIANTS[name].base not in best_lr:
            continue
        base, lr = VARIANTS[name].base, best_lr[VARIANTS[name].base]
        base_losses, base_runs = losses(base, lr)
        mine, runs = losses(name, lr)
        paired = set(mine) & set(base_losses)
        if not paired:
            continue
        runs = [r for r in runs if r["spec"]["seed"] in paired]
        if not any(c.name == base for c in out):
            out.append(VariantComparison(base, base, lr, base_losses, base_losses, base_runs))
        out.append(VariantComparison(name, base, lr, mine, base_losses, runs))
    return out


def variants_table(comparisons: list[VariantComparison]) -> str:
    seeds = sorted({s for c in comparisons for s in c.seeds})
    rows = []
    for c in comparisons:
        own, first = c.name == c.base, c.runs[0]
        rows.append([c.name, "— (the baseline)" if own else VARIANTS[c.name].what, f"{c.lr:g}",
                     *[f"{c.losses[s]:.4f}" if s in c.seeds else "—" for s in seeds], f"{c.mean:.4f}",
                     "—" if own else f"{c.mean - c.base_mean:+.4f} ({100 * (c.mean / c.base_mean - 1):+.2f}%)",
                     "—" if own else ", ".join(f"{c.losses[s] - c.base_losses[s]:+.4f}" for s in c.seeds),
                     f"{c.spread:.4f}", mib(first["state_bytes"], 2),
                     "—" if first.get("weight_bytes") is None else mib(first["weight_bytes"], 2),
                     f"{sum(r['train_runtime_s'] for r in c.runs) / len(c.runs):.0f}"])
    return table(["run", "what changes", "lr", *[f"seed {s}" for s in seeds], "mean", "vs plain (mean)",
                  "vs plain, per seed", "seed spread (max - min)", "state MiB", "weights MiB", "train time s (mean)"],
                 rows, "llr" + "r" * len(seeds) + "rrlrrrr")


def variant_targets(comparisons: list[VariantComparison], precision: str) -> list[list[str]]:
    """The targets of issue 17, judged on the means over the seeds both runs have (lower loss is better)."""
    rows = []
    for c in (c for c in comparisons if c.name != c.base):
        variant = VARIANTS[c.name]
        diff, pct = c.mean - c.base_mean, 100 * (c.mean / c.base_mean - 1)
        measured = (f"{c.mean:.4f} vs {c.base_mean:.4f}, difference {diff:+.4f} ({pct:+.2f}%); seed spread of "
                    f"{c.base} {c.base_spread:.4f}, of {c.name} {c.spread:.4f}")
        if len(c.seeds) < 2:
            bound, verdict = "—", "one seed only, no noise estimate (give --repeat-seeds)"
        elif variant.within_noise:
            bound, verdict = f"|difference| within {c.base}'s seed spread", abs(diff) <= c.base_spread
        elif variant.max_gap_pct is not None:
            bound, verdict = f"within {variant.max_gap_pct:g}% (lower is better)", pct <= variant.max_gap_pct
        else:
            where = "within" if abs(diff) <= c.base_spread else "beyond"
            bound, verdict = "none: a measured cost", f"the difference is {where} {c.base}'s seed spread"
        rows.append([f"{c.name} vs {c.base} ({precision}), mean over seeds {', '.join(map(str, c.seeds))} at lr "
                     f"{c.lr:g}", measured, bound,
                     verdict if isinstance(verdict, str) else f"**{'met' if verdict else 'missed'}**"])
    return rows


# ----------------------------------------------------------------------------------------------------------
# The report


@dataclass
class Summary:
    optimizer: str
    sweep: dict[float, float]  # lr -> final eval loss (seed --seed)
    best_lr: float
    best: dict
    repeats: list[float] = field(default_factory=list)  # final eval losses at best_lr, every seed


def summarize(results: dict[str, dict], optimizers: list[str], args) -> list[Summary]:
    summaries = []
    for name in optimizers:
        sweep = {r["spec"]["lr"]: r["final_eval_loss"] for r in results.values()
                 if r["spec"]["optimizer"] == name and r["spec"]["seed"] == args.seed}
        if not sweep:
            continue
        best_lr = min(sweep, key=lambda lr: (sweep[lr], lr))
        best = results[run_key(name, best_lr, args.seed)]
        repeats = sorted(r["final_eval_loss"] for r in results.values()
                         if r["spec"]["optimizer"] == name and r["spec"]["lr"] == best_lr)
        summaries.append(Summary(name, dict(sorted(sweep.items())), best_lr, best, repeats))
    return summaries


def results_table(summaries: list[Summary], lrs: list[float]) -> str:
    base = next((s for s in summaries if s.optimizer == BASELINE), None)
    rows = []
    for s in summaries:
        best = s.best
        versus = ("—" if base is None
                  else f"{100 * (best['final_eval_loss'] / base.best['final_eval_loss'] - 1):+.2f}%")
        share = ("—" if base is None or not base.best["lowrank_state_bytes"]
                 else f"{100 * best['lowrank_state_bytes'] / base.best['lowrank_state_bytes']:.2f}%")
        rows.append([s.optimizer, *[f"**{s.sweep[lr]:.4f}**" if lr == s.best_lr else (
            f"{s.sweep[lr]:.4f}" if lr in s.sweep else "—") for lr in lrs], f"{s.best_lr:g}",
            f"{best['final_eval_loss']:.4f}", f"{best['final_perplexity']:.2f}", versus, mib(best["state_bytes"], 2),
            mib(best["lowrank_state_bytes"], 2), share, f"{best['train_runtime_s']:.0f}",
            f"{best['tokens'] / best['train_runtime_s']:,.0f}"])
    return table(["optimizer", *[f"lr {lr:g}" for lr in lrs], "best lr", "final eval loss", "perplexity",
                  f"vs {BASELINE}", "state MiB", "state of low-rank matrices MiB", f"(% of {BASELINE}'s)",
                  "train time s", "tokens/s"], rows, "l" + "r" * (len(lrs) + 9))


def noise_table(summaries: list[Summary], seeds: list[int]) -> str:
    rows = [[s.optimizer, f"{s.best_lr:g}", ", ".join(f"{x:.4f}" for x in s.repeats),
             f"{sum(s.repeats) / len(s.repeats):.4f}", f"{max(s.repeats) - min(s.repeats):.4f}"]
            for s in summaries if len(s.repeats) > 1]
    return table(["optimizer", "lr", f"final eval loss per seed ({', '.join(map(str, seeds))})", "mean",
                  "spread (max - min)"], rows, "lrlrr") if rows else ""


TARGET_HEAD = ["target", "measured", "bound", "verdict"]


def targets(summaries: list[Summary]) -> list[list[str]]:
    """The issue's targets, judged from the numbers: one row each."""
    by_name = {s.optimizer: s for s in summaries}
    base = by_name.get(BASELINE)
    rows = []
    spreads = [max(s.repeats) - min(s.repeats) for s in summaries if len(s.repeats) > 1]
    noise = max(spreads) if spreads else None
    for name, bound in (("apollo", 2.0), ("apollo_mini", 3.0), ("apollo_layerwise", 2.0),
                        ("apollo_mini_layerwise", 3.0)):
        if base is not None and name in by_name:
            ours, theirs = by_name[name].best["final_eval_loss"], base.best["final_eval_loss"]
            gap = 100 * (ours / theirs - 1)
            rows.append([f"{name} vs {BASELINE}, final eval loss at each one's best lr",
                         f"{ours:.4f} vs {theirs:.4f} = {gap:+.2f}%", f"within {bound:g}% (lower is better)",
                         f"**{'met' if gap <= bound else 'missed'}**"])
    if "apollo" in by_name and "apollo-torch" in by_name:
        mean = lambda s: sum(s.repeats) / len(s.repeats)  # noqa: E731
        diff = mean(by_name["apollo"]) - mean(by_name["apollo-torch"])
        rows.append(["apollo vs apollo-torch (the published implementation), mean over seeds at each one's best lr",
                     f"{mean(by_name['apollo']):.4f} vs {mean(by_name['apollo-torch']):.4f}, difference {diff:+.4f}",
                     "no noise estimate (give --repeat-seeds)" if noise is None else
                     f"the largest seed spread of one optimizer, {noise:.4f}", "—" if noise is None else
                     f"**{'equal within noise' if abs(diff) <= noise else 'differs by more than the noise'}**"])
    for name in ("apollo_mini", "apollo_mini_layerwise"):
        if base is not None and name in by_name and base.best["lowrank_state_bytes"]:
            share = 100 * by_name[name].best["lowrank_state_bytes"] / base.best["lowrank_state_bytes"]
            whole = 100 * by_name[name].best["state_bytes"] / base.best["state_bytes"]
            rows.append([f"{name} optimizer state on the low-rank matrices, vs {BASELINE}'s on them",
                         f"{share:.3f}% (whole model {whole:.1f}%)", "< 1%", f"**{'met' if share < 1 else 'missed'}**"])
    return rows


def write_csv(path: Path, results: dict[str, dict]) -> None:
    rows = []
    for key in sorted(results):
        r = results[key]
        train = dict(map(tuple, r["train_loss"]))
        for step, loss in r["eval_loss"]:
            rows.append([r["spec"]["optimizer"], f"{r['spec']['lr']:g}", r["spec"]["seed"], step, f"{loss:.6f}",
                         f"{train[step]:.6f}" if step in train else ""])
    write_text_atomic(path, csv_text(["optimizer", "lr", "seed", "step", "eval_loss", "train_loss"], rows, "\r\n"))


def write_plot(path: Path, summaries: list[Summary], lrs: list[float], title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (curves, sweep) = plt.subplots(1, 2, figsize=(13, 5))
    for s in summaries:
        steps, losses = zip(*s.best["eval_loss"])
        style = "--" if s.optimizer.endswith("_layerwise") else "-"
        curves.plot(steps, losses, style, marker="o", markersize=3, label=f"{s.optimizer} (lr {s.best_lr:g})")
        lr_points = sorted(s.sweep)
        sweep.plot(lr_points, [s.sweep[lr] for lr in lr_points], style, marker="o", label=s.optimizer)
    finals = [s.best["final_eval_loss"] for s in summaries]
    if finals:
        curves.set_ylim(min(finals) - 0.2, min(finals) + 2.5)
    curves.set(xlabel="step", ylabel="eval loss", title="eval loss, best lr of each optimizer")
    sweep.set(xscale="log", xlabel="peak learning rate", ylabel="final eval loss", title="learning-rate sweep")
    sweep.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    for ax in (curves, sweep):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def setting_table(args, base: dict, corpus_info: dict) -> str:
    """What every run of a section trained, on what data, for how long."""
    tokens = args.batch_size * args.block_size
    return table(["model", "parameters", "in attention/MLP matrices", "init seed", "corpus (Python's docs)",
                  "block, held out", "steps x tokens", "rank, update_proj_gap"],
                 [[f"`{os.path.relpath(args.model_config, ROOT)}`", f"{base.get('parameters', 0) / 1e6:.2f}M",
                   f"{base.get('lowrank_parameters', 0) / 1e6:.2f}M", args.seed,
                   f"Python {corpus_info.get('python')}: {corpus_info.get('documents', 0):,} documents, "
                   f"{corpus_info.get('characters', 0) / 1e6:.2f}M characters", f"{args.block_size}, "
                   f"{args.eval_fraction:.0%}", f"{args.steps} x {tokens:,} = {args.steps * tokens / 1e6:.2f}M",
                   f"{args.rank}, {args.update_proj_gap}"]], "lrrrlrrr")


def machine_text(args, machine: str, finished: list[str], loads: tuple[str, str]) -> str:
    return (f"Runs finished between {min(finished)} and {max(finished)}, {args.parallel} at a time, "
            f"{args.threads or 'default'} thread(s) each ({'bf16 mixed precision' if args.bf16 else 'fp32'}), on "
            f"{machine}; load average {loads[0]} / {loads[1]} at the start / end of this invocation.")


def link(args, path: Path) -> str:
    return os.path.relpath(path, Path(args.output).parent) if args.output not in ("", "-") else str(path)


# ----------------------------------------------------------------------------------------------------------
# The command line


def _round_lr(lr: float) -> float:
    """1e-3 * 1e-3 / 3e-3 -> 3e-4 (not 3.333e-4): two significant digits, like the grid's own points."""
    return float(f"{lr:.1g}") if abs(float(f"{lr:.1g}") / lr - 1) < 0.2 else float(f"{lr:.2g}")


def _float_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise SystemExit(f"{flag} must be positive numbers, got {text!r}")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", default=",".join(ALL_OPTIMIZERS), help="Comma-separated, from: "
                        + ", ".join(ALL_OPTIMIZERS))
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="Peak learning rates swept for every optimizer.")
    parser.add_argument("--extend", type=int, default=2, help="Where an optimizer's best lr is at an end of the grid, "
                        "add the next point beyond it (same ratio as the grid's last step), up to this many times.")
    parser.add_argument("--sweep-layerwise", action="store_true",
                        help="Sweep the layer-wise forms too (default: their plain form's best lr only).")
    parser.add_argument("--repeat-seeds", default="43", help="Extra seeds for --repeat-optimizers at their best lr "
                        "('' for none): the run-to-run noise.")
    parser.add_argument("--repeat-optimizers", default="apollo,apollo-torch")
    parser.add_argument("--model-config", default=str(ROOT / "configs" / "llama_5m.json"))
    parser.add_argument("--target-modules", default=TARGET_MODULES, help="The low-rank matrices of every run (a "
                        "regex, or all-linear: attention, MLP and MoE experts); default: %(default)s")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--eval-steps", type=int, default=50)
    parser.add_argument("--eval-fraction", type=float, default=0.05)
    parser.add_argument("--rank", type=int, default=64, help="APOLLO/apollo-torch/GaLore rank (paper: hidden/4).")
    parser.add_argument("--update-proj-gap", type=int, default=200)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-seed", type=int, default=None, help="Data order seed (default: each run's seed).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="Mixed precision (GPU).")
    parser.add_argument("--parallel", type=int, default=2, help="Runs at a time.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default).")
    parser.add_argument("--data-files", default=None, help="A local corpus (.txt/.jsonl) instead of the built one.")
    parser.add_argument("--work-dir", default=str(ROOT / "outputs" / "convergence"))
    parser.add_argument("--force", action="store_true", help="Rerun finished runs.")
    parser.add_argument("--tag", default="cpu", help="Names the CSV/PNG (convergence_TAG.* beside --output).")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"), help="'-' to write no Markdown.")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="Which sections of --output (and their "
                        "CSV/PNG) to write: sweep (the optimizer table, convergence_TAG.*), variants (the variants "
                        "against their base, convergence_TAG_variants.csv), or both.")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    args.optimizer_list = split_list(args.optimizers)
    for name in args.optimizer_list:
        try:
            train_optimizer(name, 1, 1)  # unknown names fail here, before any run
        except ValueError as error:
            raise SystemExit(f"--optimizers: {error}") from None
        if name in VARIANTS and VARIANTS[name].base not in args.optimizer_list:
            raise SystemExit(f"--optimizers: {name} is measured against {VARIANTS[name].base}; "
                             f"list {VARIANTS[name].base} too")
    args.section_list = split_list(args.sections)
    if not args.section_list or any(x not in SECTIONS for x in args.section_list):
        raise SystemExit(f"--sections must be a comma-separated list from {', '.join(SECTIONS)}, got {args.sections!r}")
    args.lr_list = sorted(_float_list(args.lrs, "--lrs"))
    args.seed_list = [int(x) for x in args.repeat_seeds.split(",") if x.strip()]
    args.repeat_list = split_list(args.repeat_optimizers)
    check_at_least(sys.exit, *((f"--{k.replace('_', '-')}", getattr(args, k), 1) for k in (
        "steps", "batch_size", "block_size", "eval_steps", "rank", "update_proj_gap", "parallel")),
        ("--threads", args.threads, 0))
    if not Path(args.model_config).is_file():
        raise SystemExit(f"--model-config {args.model_config} does not exist")
    if args.data_files and not Path(args.data_files).is_file():
        raise SystemExit(f"--data-files {args.data_files} does not exist")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    command = command_line("convergence.py", argv)
    load_start = load_average()
    work = Path(args.work_dir)
    if args.data_files:
        corpus = Path(args.data_files).resolve()
        corpus_info = {"documents": 0, "characters": corpus.stat().st_size, "python": platform.python_version()}
    else:
        corpus = work / "corpus.jsonl"
        corpus_info = build_corpus(corpus)
        print(f"corpus {corpus}: {corpus_info['documents']:,} documents, {corpus_info['characters']:,} characters",
              flush=True)

    def spec(name: str, lr: float, seed: int) -> RunSpec:
        output_dir = work / "train" / run_key(name, lr, seed)
        return RunSpec(name, lr, seed, train_argv(args, name, lr, seed, corpus, output_dir), args.threads,
                       run_targets(args, name))

    # 1. The sweep (plain forms; layer-wise forms too with --sweep-layerwise; variants never).
    swept = [n for n in args.optimizer_list
             if (args.sweep_layerwise or n not in LAYERWISE_OF) and n not in VARIANTS]
    results = run_all([spec(n, lr, args.seed) for n in swept for lr in args.lr_list], args)
    # An optimum at an end of the grid is not an optimum: extend the grid there (every optimizer alike).
    for _ in range(args.extend):
        extra = []
        for summary in summarize(results, swept, args):
            lrs = sorted(summary.sweep)
            if len(lrs) >= 2 and summary.best_lr in (lrs[0], lrs[-1]):
                end, next_in = (lrs[0], lrs[1]) if summary.best_lr == lrs[0] else (lrs[-1], lrs[-2])
                extra.append(spec(summary.optimizer, _round_lr(end * end / next_in), args.seed))
        if not extra:
            break
        print("best lr at an end of the grid for " + ", ".join(f"{x.optimizer} (adding {x.lr:g})" for x in extra),
              flush=True)
        results.update(run_all(extra, args))
    best = {s.optimizer: s.best_lr for s in summarize(results, swept, args)}
    # 2. Layer-wise forms at their plain form's best lr, and repeats with other seeds at each best lr.
    follow = []
    for name in args.optimizer_list:
        if name in LAYERWISE_OF and not args.sweep_layerwise:
            lr = best.get(LAYERWISE_OF[name], args.lr_list[len(args.lr_list) // 2])
            follow.append(spec(name, lr, args.seed))
    # Variants at their base's best lr, with every seed; their base repeated there with the same seeds.
    variants = [n for n in args.optimizer_list if n in VARIANTS and VARIANTS[n].base in best]
    repeated = list(args.repeat_list) + [VARIANTS[n].base for n in variants]
    for name in dict.fromkeys(repeated):
        if name in best:
            follow += [spec(name, best[name], seed) for seed in args.seed_list]
    for name in variants:
        follow += [spec(name, best[VARIANTS[name].base], seed) for seed in [args.seed, *args.seed_list]]
    if follow:
        results.update(run_all(follow, args))
    summaries = summarize(results, [n for n in args.optimizer_list if n not in VARIANTS], args)
    all_lrs = sorted({lr for s in summaries for lr in s.sweep} | set(args.lr_list))
    comparisons = compare_variants(results, variants, best)

    machine = machine_line(args.device)
    folder = work if args.output in ("", "-") else Path(args.output).resolve().parent
    loads = (load_start, load_average())

    def report(suffix: str, tables: list[str], finished: list[str]) -> None:
        """Print ``tables``; write them as the section convergence[-TAG]SUFFIX of --output."""
        tables = [t for t in tables if t]
        print("\n\n".join(tables))
        if args.output not in ("", "-"):
            name = "convergence" + ("" if args.tag == "cpu" else f"-{args.tag}") + suffix
            text = section(name, SCRIPT, command, machine_text(args, machine, finished, loads), *tables)
            write_section(args.output, text, name)
            print(f"wrote the convergence{suffix} section of {args.output}")

    if "sweep" in args.section_list:
        csv_path, png_path = folder / f"convergence_{args.tag}.csv", folder / f"convergence_{args.tag}.png"
        write_csv(csv_path, results)
        title = f"{Path(args.model_config).name}, {args.steps} steps x {args.batch_size * args.block_size} tokens"
        plotted = write_plot(png_path, summaries, all_lrs, title)
        tables = [setting_table(args, summaries[0].best if summaries else {}, corpus_info),
                  results_table(summaries, all_lrs), noise_table(summaries, [args.seed, *args.seed_list]),
                  table(TARGET_HEAD, targets(summaries)) if targets(summaries) else "",
                  f"Curves: [{link(args, csv_path)}]({link(args, csv_path)})"
                  + (f"\n\n![convergence]({link(args, png_path)})" if plotted else "")]
        report("", tables, [r["finished"] for r in results.values()])
    if "variants" in args.section_list and comparisons:
        csv_path = folder / f"convergence_{args.tag}_variants.csv"
        write_csv(csv_path, {run_key(r["spec"]["optimizer"], r["spec"]["lr"], r["spec"]["seed"]): r
                             for c in comparisons for r in c.runs})
        precision = "bf16 mixed precision" if args.bf16 else "fp32 weights"
        tables = [setting_table(args, comparisons[0].runs[0], corpus_info), variants_table(comparisons),
                  table(TARGET_HEAD, variant_targets(comparisons, precision)),
                  f"Curves: [{link(args, csv_path)}]({link(args, csv_path)})"]
        report("-variants", tables, [r["finished"] for c in comparisons for r in c.runs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
