"""The GPU proof in one command: LLaMA-7B under 48, 16 and 12 GB caps, the optimizer step against fused AdamW and
apollo-torch, the memory estimator against measured peaks, and the CUDA-only tests, within a time budget.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_proof.py --budget-s 480     # CUDA GPU: docs/gpu/results.json
    python benchmarks/gpu_proof.py --smoke                               # CPU, tiny configs, every stage
    python benchmarks/gpu_proof.py --render                              # docs/memory.md's "gpu" section again

Every unit of :func:`plan` is one command of another script (fit_7b.py, step_time.py, pytest on tests/test_cuda.py)
in a process of its own, most important first, limited to its own time and to what is left of --budget-s (a unit
past it is killed; what it wrote is kept). After every unit, --results is written (merged by unit key, so --only
can finish what a cut run missed; another device's results are refused) and --doc's "gpu" section rendered from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    ROOT, command_line, package_version, section, split_list, table, utc_now, write_json_atomic, write_section)

RESULTS, DOC = ROOT / "docs" / "gpu" / "results.json", ROOT / "docs" / "memory.md"
SMOKE_DIR = ROOT / "outputs" / "gpu_proof_smoke"
SECTION = "gpu"
EXIT_NO_CUDA = 3
MIN_START_S = 5  # a unit is not started with less budget than this left


@dataclass(frozen=True)
class Unit:
    key: str
    stage: str  # fit_7b | step_time | estimator | cuda_tests
    argv: list  # after "python"
    max_s: float
    expect: str = "fit"  # fit_7b: "fit" or "oom"
    smoke: list = field(default_factory=list)  # arguments added in --smoke


FIT_SMOKE = ["--device", "cpu", "--config", "configs/llama_tiny.json", "--caps", "0", "--seq-len", "32", "--steps", "2"]
STEP_SMOKE = ["--device", "cpu", "--sizes", "", "--custom", "64,172,2,16", "--vocab", "256", "--steps", "2",
              "--warmup", "1", "--paired-rounds", "2"]
SETTING_16GB = ["--optim-args", "dense_state_bits=8", "--lean-loss"]  # docs/memory.md's two settings
MOE_SMOKE = [a if a != "configs/llama_tiny.json" else "configs/mixtral_12m.json" for a in FIT_SMOKE]


def fit(key: str, cap: int, optim: str, *extra: str, max_s: float = 150, expect: str = "fit") -> Unit:
    """LLaMA-7B, bf16, 2048 tokens, 5 steps under a cap (no fallback to shorter sequences)."""
    return Unit(key, "fit_7b", ["benchmarks/fit_7b.py", "--caps", str(cap), "--optims", optim, "--steps", "5",
                                "--fallback-seq-lens", "", *extra], max_s, expect, FIT_SMOKE)


def step_time(key: str, size: str, dtype: str, optimizers: str, pairs: str) -> Unit:
    argv = ["benchmarks/step_time.py", "--device", "cuda", "--sizes", size, "--dtype", dtype, "--optimizers",
            optimizers, "--pairs", pairs, "--output", "-"]
    return Unit(key, "step_time", argv, 150, smoke=STEP_SMOKE)


def estimator(size: str) -> Unit:
    """Measured peaks against the estimate, LLaMA-60M..1B, bf16, 2048 tokens: docs/memory.md's setting."""
    return Unit(f"estimator@{size}", "estimator", ["benchmarks/fit_7b.py", "--config", f"configs/llama_{size}.json",
                                                  "--caps", "0", "--optims", "apollo,apollo_mini,torch-adamw",
                                                  "--steps", "3"], 90, smoke=FIT_SMOKE)


def plan() -> list[Unit]:
    """Every unit, the most important first."""
    units = [
        fit("apollo@48GB", 48, "apollo"),
        fit("16GB-setting", 16, "apollo_mini_layerwise", *SETTING_16GB),
        fit("12GB-setting", 12, "apollo_mini_layerwise", *SETTING_16GB, "--weights", "int8", max_s=200),
        step_time("step_time@1b-fp32", "1b", "float32",
                  "ours,ours-mini,torch-adamw-fused,apollo-torch,apollo-torch-mini,galore-torch",
                  "ours/torch-adamw-fused,ours-mini/torch-adamw-fused,ours/apollo-torch,ours-mini/apollo-torch-mini"),
        Unit("cuda_tests", "cuda_tests", ["-m", "pytest", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"], 120),
        # Fused experts: Qwen3-30B-A3B's shapes (128 experts of 768 x 2048 per matrix), 4 of its 48 layers, 3.1 B
        # parameters: per-expert APOLLO's peak and tokens/s next to fused AdamW's.
        Unit("moe@qwen3-4-layers", "fit_7b", ["benchmarks/fit_7b.py", "--config", "configs/qwen3_moe_3b.json", "--caps",
                                              "0", "--optims", "apollo,apollo_mini_layerwise,torch-adamw-fused",
                                              "--steps", "5", "--fallback-seq-lens", ""], 150, smoke=MOE_SMOKE),
        step_time("step_time@7b-bf16", "7b", "bfloat16", "ours,ours-mini,apollo-torch,apollo-torch-mini",
                  "ours/apollo-torch,ours-mini/apollo-torch-mini"),
        *[estimator(size) for size in ("60m", "130m", "350m", "1b")],
        fit("apollo_mini_layerwise@24GB", 24, "apollo_mini_layerwise"),
        fit("apollo_mini_layerwise@16GB", 16, "apollo_mini_layerwise"),
        fit("apollo_layerwise@24GB", 24, "apollo_layerwise"),
        fit("torch-adamw-fused@48GB", 48, "torch-adamw-fused", expect="oom"),  # bf16 weights+grads+moments: 54 GB
    ]
    assert len({u.key for u in units}) == len(units)
    return units


SMOKE_KEYS = ("apollo@48GB", "16GB-setting", "12GB-setting", "step_time@1b-fp32", "cuda_tests", "moe@qwen3-4-layers",
              "estimator@60m")


def run_unit(unit: Unit, smoke: bool, budget_left: float, log) -> dict:
    """The unit's record: its command, status, wall time and what its script wrote (fit_7b's or step_time's
    JSON; pytest's last line)."""
    out_file = Path(tempfile.mkdtemp(prefix="gpu_proof_")) / "out.json"
    argv = list(unit.argv) + (unit.smoke if smoke else [])
    if unit.stage == "step_time":
        argv += ["--json", str(out_file)]
    elif unit.stage != "cuda_tests":
        argv += ["--output", str(out_file)]
    limit = min(unit.max_s, budget_left)
    record = {"key": unit.key, "stage": unit.stage, "command": shlex.join(["python", *argv]), "date": utc_now(),
              **({"expected": unit.expect} if unit.stage == "fit_7b" else {})}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    started = time.time()
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit)
        record["status"] = "ok" if proc.returncode == 0 else f"error: exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # with what the unit started (pytest's fingerprint process)
        output, _ = proc.communicate()
        record["status"] = f"killed: ran past {limit:.0f} s"
    record["wall_s"] = round(time.time() - started, 1)
    log(output)
    if out_file.exists():
        record["output"] = json.loads(out_file.read_text())
        out_file.unlink()
    out_file.parent.rmdir()
    if unit.stage == "cuda_tests":
        record["output"] = {"summary": (output.strip().splitlines() or [""])[-1]}
    if not record["status"].startswith("ok"):
        record["log_tail"] = output[-3000:]
    return record


def merge(old: Optional[dict], new: dict) -> dict:
    """``new`` (this run) into ``old`` (the file): the top level and the commands from both; units by key, a unit
    this run skipped keeping its earlier record."""
    if not old:
        return new
    units = dict(old.get("units", {}))
    for key, record in new["units"].items():
        if not (record["status"].startswith("skipped") and key in units):
            units[key] = record
    return {**old, **{k: v for k, v in new.items() if k != "units"}, "units": units,
            "commands": old.get("commands", []) + [c for c in new["commands"] if c not in old.get("commands", [])]}


def _f(value, digits: int = 2) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else "—"


def render(results: Optional[dict]) -> str:
    script = "benchmarks/gpu_proof.py"
    if not results or not results.get("units"):
        return section(SECTION, script, "python benchmarks/gpu_proof.py --budget-s 480",
                       "**Pending**: no GPU run yet; the command above, on a CUDA GPU, measures what goes here.")
    units = results["units"].values()
    fits, estimates, steps, status = [], [], [], []
    for u in units:
        status.append([u["key"], u["status"], _f(u.get("wall_s"), 0), (u.get("output") or {}).get("summary", "")])
        out = u.get("output") or {}
        for r in out.get("results", []) if u["stage"] in ("fit_7b", "estimator") else []:
            m, e = r.get("measured") or {}, r.get("estimate") or {}
            ratio = m.get("peak_allocated_gb") and e.get("allocated_gb") and m["peak_allocated_gb"] / e["allocated_gb"]
            cells = [u["key"], f"{r['cap_gb']:g}" if r["cap_gb"] else "none", r["optimizer"], r.get("levers", ""),
                     r["status"], f"{len(m.get('losses', []))}", _f(m.get("peak_allocated_gb")),
                     _f(e.get("allocated_gb")),
                     _f(ratio, 3), _f(m.get("peak_reserved_gb")), _f(e.get("total_gb")), _f(m.get("tokens_per_s"), 0),
                     f"{m['first_loss']:.3f} → {m['last_loss']:.3f}" if m else "—"]
            if u["stage"] == "fit_7b":
                fits.append(cells + [("yes" if r["status"].startswith("ok") == (u["expected"] == "fit") else "NO")])
            else:
                estimates.append(cells)
        for p in out.get("paired", []):
            ratios = p["ratios"]
            steps.append([u["key"], f"{p['ours']} / {p['theirs']}", len(ratios), f"{statistics.median(ratios):.2f}",
                          f"{min(ratios):.2f}", f"{max(ratios):.2f}"])
    head = ["unit", "cap GB", "optimizer", "levers", "status", "steps", "peak allocated GB", "estimate allocated GB",
            "measured / estimate", "peak reserved GB", "estimate total GB", "tokens/s", "loss first → last"]
    commands = "\n".join(c["command"] for c in results.get("commands", []))
    machine = (f"{results.get('device')}, torch {results.get('torch')}, CUDA {results.get('cuda')}; last run "
               f"{results.get('date')}. Each unit's own command is in docs/gpu/results.json.")
    return section(SECTION, script, commands, machine,
                   table(head + ["as expected"], fits, "lrllllrrrrrrll") if fits else "",
                   table(["unit", "pair", "rounds", "per-round step time ratio: median", "min", "max"], steps,
                         "llrrrr") if steps else "",
                   table(head, estimates, "lrllllrrrrrrl") if estimates else "",
                   table(["unit", "status", "wall s", "summary"], status, "llrl"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_proof.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for all units (default 480; --smoke 600)")
    parser.add_argument("--smoke", action="store_true", help="every stage on the CPU on tiny configs")
    parser.add_argument("--only", default=None, help="comma-separated unit keys to run (default: every unit)")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"results JSON, merged into (default {RESULTS.relative_to(ROOT)}; --smoke: "
                             f"{SMOKE_DIR.relative_to(ROOT)}/)")
    parser.add_argument("--doc", type=Path, default=None,
                        help=f"Markdown file whose gpu section is rendered (default {DOC.relative_to(ROOT)}; --smoke: "
                             "memory.md beside --results)")
    parser.add_argument("--log", type=Path, default=None, help="log, appended to (default: beside --results)")
    parser.add_argument("--replace", action="store_true", help="start --results afresh instead of merging")
    parser.add_argument("--render", action="store_true", help="only render --doc's section from --results")
    args = parser.parse_args(argv)
    args.budget_s = args.budget_s if args.budget_s is not None else (600.0 if args.smoke else 480.0)
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    args.results = args.results or (SMOKE_DIR / "results.json" if args.smoke else RESULTS)
    args.doc = args.doc or (args.results.parent / "memory.md" if args.smoke else DOC)
    args.log = args.log or args.results.parent / "gpu_proof.log"
    units = [u for u in plan() if not args.smoke or u.key in SMOKE_KEYS]
    if args.only is not None:
        wanted = split_list(args.only)
        unknown = sorted(set(wanted) - {u.key for u in units})
        if unknown:
            parser.error(f"--only: no unit {', '.join(unknown)}; the units: {', '.join(u.key for u in units)}")
        units = [u for u in units if u.key in wanted]
    args.units = units
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    old = json.loads(args.results.read_text()) if args.results.exists() and not args.replace else None
    if args.render:
        write_section(args.doc, render(old), SECTION)
        print(f"wrote the {SECTION} section of {args.doc}")
        return 0
    if args.smoke:
        device, torch_version, cuda = "cpu", package_version("torch"), None
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_proof.py: error: no CUDA GPU is available (torch.cuda.is_available() is False); nothing was "
                  "run or written. On a CPU: python benchmarks/gpu_proof.py --smoke", file=sys.stderr)
            return EXIT_NO_CUDA
        device, torch_version, cuda = torch.cuda.get_device_name(0), torch.__version__, torch.version.cuda
    if old and old.get("device") != device:
        print(f"gpu_proof.py: error: {args.results} holds results from {old.get('device')!r}, this run is on "
              f"{device!r}: results of two devices are not merged. Pass another --results, or --replace.",
              file=sys.stderr)
        return 2
    args.results.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    command = command_line("gpu_proof.py", argv)
    new = {"device": device, "torch": torch_version, "cuda": cuda, "date": utc_now(), "commands": [
        {"command": command, "date": utc_now(), "budget_s": args.budget_s}], "units": {}}
    with open(args.log, "a") as log_file:
        def log(text: str) -> None:
            log_file.write(text if text.endswith("\n") else text + "\n")
            log_file.flush()

        def say(text: str) -> None:
            print(text, flush=True)
            log(f"[{time.strftime('%H:%M:%S')}] {text}")

        say(f"{command} | {device}, torch {torch_version}, CUDA {cuda} | budget {args.budget_s:.0f} s")
        for unit in args.units:
            left = deadline - time.time()
            if left < MIN_START_S:
                record = {"key": unit.key, "stage": unit.stage,
                          "status": f"skipped: budget ({max(left, 0):.0f} s left)"}
            else:
                say(f"{unit.key}: started, {min(unit.max_s, left):.0f} s allowed")
                record = run_unit(unit, args.smoke, left, log)
            say(f"{unit.key}: {record['status']}" + (f" in {record['wall_s']:.0f} s" if "wall_s" in record else ""))
            new["units"][unit.key] = record
            results = merge(old, new)
            write_json_atomic(args.results, results)
            write_section(args.doc, render(results), SECTION)
        say(f"wrote {args.results} and the {SECTION} section of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
