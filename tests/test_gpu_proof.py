"""benchmarks/gpu_proof.py on the CPU: the plan (the essential LLaMA-7B runs first, issue 17's levers on their
runs), merging into an existing results.json, the docs section rendered from it, a --smoke run of every stage,
units skipped or killed by the budget, and its refusals."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_proof.py"


@pytest.fixture(scope="module")
def proof():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_proof_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _run(*args, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_the_plan_runs_the_essentials_first_with_their_levers(proof):
    units = proof.plan()
    keys = [u.key for u in units]
    assert keys[:3] == ["apollo@48GB", "16GB-setting", "12GB-setting"]  # LLaMA-7B under 48 GB, the two settings
    argv = {u.key: " ".join(u.argv) for u in units}
    assert "--caps 48 --optims apollo " in argv["apollo@48GB"]
    assert "--caps 16 --optims apollo_mini_layerwise" in argv["16GB-setting"]
    assert "--optim-args dense_state_bits=8 --lean-loss" in argv["16GB-setting"] and "int8" not in argv["16GB-setting"]
    assert "--caps 12" in argv["12GB-setting"] and argv["12GB-setting"].endswith("--lean-loss --weights int8")
    assert all(u.argv[0] == "benchmarks/fit_7b.py" and "--steps" in u.argv for u in units if u.stage == "fit_7b")
    assert {u.stage for u in units} == {"fit_7b", "step_time", "cuda_tests", "estimator"}
    assert {u.stage for u in units if u.key in proof.SMOKE_KEYS} == {u.stage for u in units}  # --smoke: every stage
    assert next(u for u in units if u.key == "torch-adamw-fused@48GB").expect == "oom"
    assert "ours/torch-adamw-fused" in argv["step_time@1b-fp32"] and "--device cuda" in argv["step_time@7b-bf16"]


def test_merging_keeps_what_this_run_skipped(proof):
    old = {"device": "X", "torch": "1", "date": "d0", "commands": [{"command": "first"}],
           "units": {"a": {"status": "ok", "v": 1}, "b": {"status": "killed: ran past 9 s", "v": 2},
                     "c": {"status": "ok", "v": 3}}}
    new = {"device": "X", "torch": "2", "date": "d1", "commands": [{"command": "second"}],
           "units": {"a": {"status": "skipped: budget (0 s left)"}, "b": {"status": "ok", "v": 20},
                     "d": {"status": "skipped: budget (0 s left)"}}}
    merged = proof.merge(old, new)
    assert [c["command"] for c in merged["commands"]] == ["first", "second"]
    assert (merged["torch"], merged["date"]) == ("2", "d1")
    assert merged["units"]["a"]["v"] == 1  # skipped now, measured before: the measurement stays
    assert merged["units"]["b"]["v"] == 20 and merged["units"]["c"]["v"] == 3
    assert merged["units"]["d"]["status"].startswith("skipped")  # only in this run
    assert proof.merge(None, new) == new


def test_the_section_says_pending_until_there_are_results_then_shows_them(proof):
    assert "**Pending**" in proof.render(None) and "**Pending**" in proof.render({"units": {}})
    fit = {"cap_gb": 16.0, "optimizer": "apollo_mini_layerwise", "status": "ok", "levers": "dense_state_bits=8, lean loss",
           "measured": {"losses": [9.0, 8.0], "first_loss": 9.0, "last_loss": 8.0, "peak_allocated_gb": 15.0,
                        "peak_reserved_gb": 15.5, "tokens_per_s": 1000.0},
           "estimate": {"allocated_gb": 15.1, "total_gb": 15.9}}
    results = {"device": "NVIDIA H100", "torch": "2.13", "cuda": "12.8", "date": "d", "commands": [{"command": "cmd"}],
               "units": {"16GB-setting": {"key": "16GB-setting", "stage": "fit_7b", "status": "ok", "wall_s": 60,
                                          "expected": "fit", "output": {"results": [fit]}},
                         "step": {"key": "step", "stage": "step_time", "status": "ok", "wall_s": 30, "output": {
                             "paired": [{"ours": "ours", "theirs": "apollo-torch", "ratios": [0.5, 0.7, 0.6]}]}}}}
    text = proof.render(results)
    assert "Pending" not in text and "```bash\ncmd\n```" in text and "NVIDIA H100, torch 2.13, CUDA 12.8" in text
    assert ("| 16GB-setting | 16 | apollo_mini_layerwise | dense_state_bits=8, lean loss | ok | 2 | 15.00 | 15.10 "
            "| 0.993 | 15.50 | 15.90 | 1,000 | 9.000 → 8.000 | yes |") in text
    assert "| step | ours / apollo-torch | 3 | 0.60 | 0.50 | 0.70 |" in text


@pytest.mark.slow
def test_without_cuda_nothing_is_run_or_written(tmp_path):
    proc = _run("--results", tmp_path / "r.json", "--doc", tmp_path / "m.md", timeout=120)
    assert proc.returncode == 3 and "no CUDA GPU is available" in proc.stderr and "--smoke" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bad_arguments_fail_before_any_work(tmp_path):
    results = tmp_path / "r.json"
    proc = _run("--smoke", "--only", "nope@1GB", "--results", results, timeout=120)
    assert proc.returncode == 2 and "no unit nope@1GB" in proc.stderr
    proc = _run("--smoke", "--budget-s", "-5", "--results", results, timeout=120)
    assert proc.returncode == 2 and "--budget-s must be a positive number" in proc.stderr
    assert not results.exists()


@pytest.mark.slow
def test_too_little_budget_skips_every_unit_and_says_so(tmp_path, proof):
    results = tmp_path / "results.json"
    proc = _run("--smoke", "--budget-s", "1", "--results", results, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    units = json.loads(results.read_text())["units"]
    assert set(units) == set(proof.SMOKE_KEYS) and all(u["status"].startswith("skipped: budget") for u in units.values())
    assert "| cuda_tests | skipped: budget" in (tmp_path / "memory.md").read_text()


@pytest.mark.slow
def test_a_unit_past_the_budget_is_killed_and_the_run_goes_on(tmp_path):
    results = tmp_path / "results.json"
    proc = _run("--smoke", "--only", "step_time@1b-fp32,cuda_tests", "--budget-s", "6", "--results", results)
    assert proc.returncode == 0, proc.stderr[-3000:]
    units = json.loads(results.read_text())["units"]
    assert units["step_time@1b-fp32"]["status"].startswith("killed: ran past"), units
    assert units["cuda_tests"]["status"].startswith("skipped: budget")
    assert "step_time@1b-fp32: killed" in (tmp_path / "gpu_proof.log").read_text()


@pytest.mark.slow
def test_smoke_runs_every_stage_and_merges_into_the_file(tmp_path):
    results = tmp_path / "results.json"
    earlier = {"device": "cpu", "torch": "0", "cuda": None, "date": "earlier", "commands": [{"command": "earlier"}],
               "units": {"older_run@99GB": {"key": "older_run@99GB", "stage": "fit_7b", "status": "ok"}}}
    results.write_text(json.dumps(earlier))
    proc = _run("--smoke", "--results", results)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(results.read_text())
    assert data["device"] == "cpu" and data["torch"] and data["cuda"] is None and data["date"] != "earlier"
    assert [c["command"] for c in data["commands"]] == ["earlier", f"python benchmarks/gpu_proof.py --smoke --results {results}"]
    units = data["units"]
    assert set(units) == {"older_run@99GB", "apollo@48GB", "16GB-setting", "12GB-setting", "step_time@1b-fp32",
                          "cuda_tests", "moe@qwen3-4-layers", "estimator@60m"}  # the earlier record is kept
    assert all(u["status"] == "ok" for u in units.values()), {k: u["status"] for k, u in units.items()}
    for key, levers in (("apollo@48GB", None), ("16GB-setting", "dense_state_bits=8, lean loss"),
                        ("12GB-setting", "dense_state_bits=8, lean loss, int8 weights")):
        (run,) = units[key]["output"]["results"]
        m, e = run["measured"], run["estimate"]
        assert run["status"] == "ok" and run.get("levers") == levers and units[key]["command"].startswith("python ")
        assert len(m["losses"]) == 2 and m["last_loss"] < m["first_loss"]  # one batch, twice: the update happened
        assert m["optimizer_state_gb"] == pytest.approx(e["optimizer_states_gb"], rel=1e-9)  # run and estimate alike
    assert [r["optimizer"] for r in units["estimator@60m"]["output"]["results"]] == ["apollo", "apollo_mini",
                                                                                    "torch-adamw"]
    # The fused-expert row: per-expert APOLLO's peak next to its estimate (the smoke runs a 12M Mixtral).
    moe = {r["optimizer"]: r for r in units["moe@qwen3-4-layers"]["output"]["results"]}
    assert set(moe) == {"apollo", "apollo_mini_layerwise", "torch-adamw-fused"}
    assert moe["apollo"]["measured"]["optimizer_state_gb"] == pytest.approx(
        moe["apollo"]["estimate"]["optimizer_states_gb"], rel=1e-9)
    paired = units["step_time@1b-fp32"]["output"]["paired"]
    assert [(p["ours"], p["theirs"]) for p in paired] == [("ours", "torch-adamw-fused"), ("ours-mini", "torch-adamw-fused"),
                                                           ("ours", "apollo-torch"), ("ours-mini", "apollo-torch-mini")]
    assert "skipped" in units["cuda_tests"]["output"]["summary"]  # no CUDA here
    doc = (tmp_path / "memory.md").read_text()
    assert "Pending" not in doc and "| 12GB-setting | none | apollo_mini_layerwise |" in doc
    # A run on another device must not merge into these results: refused before any work.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**earlier, "device": "NVIDIA H200"}))
    refused = _run("--smoke", "--results", other, timeout=120)
    assert refused.returncode == 2 and "are not merged" in refused.stderr
    assert json.loads(other.read_text())["device"] == "NVIDIA H200"
