"""benchmarks/gpu_proof.py on the CPU: the budget arithmetic, merging into an existing results.json, the JSON
schema from a --smoke run of every stage, a stage with too little budget skipped and recorded, and a unit
killed mid-way that keeps what it measured while the run goes on."""

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
FIT_FIELDS = ("key", "optim", "optim_args", "cap_gb", "layerwise", "dtype", "steps_ok", "peak_allocated_gb",
              "peak_reserved_gb", "tokens_per_s", "first_loss", "last_loss", "estimate_total_gb", "error", "status")


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_proof_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def proof():
    return _load()


def _run(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)


# ----------------------------------------------------------------------------------------------------------
# Pure functions


def test_each_stage_ends_at_the_budget_less_the_later_slices(proof):
    # 480 s in eighths 4/2/1/1: a stage keeps what earlier ones leave, never a later one's slice.
    ends = proof.stage_deadlines(list(proof.STAGES), start=1000.0, budget_s=480.0)
    assert ends == {"fit_7b": 1240.0, "step_time": 1360.0, "estimator": 1420.0, "cuda_checks": 1480.0}
    # Two stages of shares 2 and 1: 2/3 and 1/3 of the budget.
    assert proof.stage_deadlines(["step_time", "cuda_checks"], 0.0, 90.0) == {"step_time": 60.0, "cuda_checks": 90.0}
    assert proof.budget_skip(45, deadline=100.0, now=50.0) is None
    reason = proof.budget_skip(45, deadline=100.0, now=60.0)
    assert reason.startswith("skipped: budget") and "40 s left" in reason and "45 s" in reason


def test_merging_keeps_what_this_run_did_not_redo(proof):
    old = {"device": "X", "torch": "1", "cuda": "1", "date": "d0", "environment": {"a": 1},
           "commands": [{"command": "first"}],
           "fit_7b": [{"key": "a", "status": "ok", "v": 1}, {"key": "b", "status": "killed: late", "v": 2},
                      {"key": "c", "status": "oom", "v": 3}],
           "step_time": {"runs": [{"key": "s", "status": "ok"}]}, "estimator": {}, "cuda_checks": {},
           "stages": {"fit_7b": {"status": "done"}, "step_time": {"status": "done"}}}
    new = {"device": "X", "torch": "2", "cuda": "2", "date": "d1", "environment": {"a": 2},
           "commands": [{"command": "second"}],
           "fit_7b": [{"key": "a", "status": "skipped: budget"}, {"key": "b", "status": "ok", "v": 20},
                      {"key": "c", "status": "not run"}, {"key": "d", "status": "killed: late", "v": 4}],
           "step_time": {}, "estimator": {"runs": [{"key": "e", "status": "ok"}]}, "cuda_checks": {},
           "stages": {"fit_7b": {"status": "skipped: budget"}, "estimator": {"status": "done"}}}
    merged = proof.merge_results(old, new)
    assert [c["command"] for c in merged["commands"]] == ["first", "second"]
    assert (merged["torch"], merged["date"], merged["environment"]) == ("2", "d1", {"a": 2})
    by = {r["key"]: r for r in merged["fit_7b"]}
    assert by["a"]["v"] == 1  # skipped now, measured before: the measurement stays
    assert by["b"]["v"] == 20  # finished now, killed before: replaced
    assert by["c"]["v"] == 3  # not reached now (an interrupted run): the old result stays
    assert by["d"]["v"] == 4  # only in this run
    assert merged["step_time"]["runs"] == [{"key": "s", "status": "ok"}]
    assert merged["estimator"]["runs"] == [{"key": "e", "status": "ok"}]
    assert merged["stages"]["fit_7b"] == {"status": "done", "last_run": "skipped: budget"}
    assert merged["stages"]["estimator"] == {"status": "done"}


def test_fit_runs_are_data(proof):
    keys = [spec.key for spec in proof.FIT_SPECS]
    assert keys == ["apollo@48GB", "apollo_mini_layerwise@24GB", "apollo_mini_layerwise@16GB",
                    "apollo_layerwise@24GB", "adamw_fused@48GB"]
    # A row appended later (issue 17's kind): its own key, its options in the constructor and the estimate.
    extra = proof.FitSpec("apollo_mini", cap_gb=16, layerwise=True, optim_args={"state_dtype": "bfloat16"},
                          settings={"seq_len": 1024})
    assert extra.key == "apollo_mini_layerwise@16GB[state_dtype=bfloat16;seq_len=1024]"
    choice = proof.fit_choice(extra)
    assert choice.options["state_dtype"] == "bfloat16" and choice.estimator_args["state_dtype"] == "bfloat16"
    units = proof.build_plan(["fit_7b"], smoke=False, fit_specs=[*proof.FIT_SPECS, extra])
    assert [u["key"] for u in units] == keys + [extra.key]
    assert units[-1]["settings"]["seq_len"] == 1024 and units[-1]["settings"]["config"] == "configs/llama_7b.json"
    assert units[-1]["layerwise"] and units[0]["settings"]["steps"] == 10
    with pytest.raises(ValueError, match="unknown setting"):
        proof.build_plan(["fit_7b"], smoke=False, fit_specs=[proof.FitSpec("apollo", 24, settings={"sq_len": 1})])
    with pytest.raises(ValueError, match="cap_gb must be >= 0"):
        proof.check_fit_spec(proof.FitSpec("apollo", -1))


def test_a_missing_reference_package_is_named(proof, monkeypatch):
    monkeypatch.setitem(proof.PACKAGES, "nothing-here", ("nothing-here", "no_such_module_for_gpu_proof"))
    assert proof.missing_package("nothing-here") == "nothing-here not installed"
    assert proof.missing_package("ours") is None


# ----------------------------------------------------------------------------------------------------------
# Runs of the script


def test_too_little_budget_skips_every_stage_and_says_so(tmp_path):
    results = tmp_path / "results.json"
    proc = _run("--smoke", "--budget-s", "1", "--results", results, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(results.read_text())
    for stage in ("fit_7b", "step_time", "estimator", "cuda_checks"):
        assert data["stages"][stage]["status"].startswith("skipped: budget"), data["stages"][stage]
    assert all(r["status"].startswith("skipped: budget") for r in data["fit_7b"])
    assert all(r["status"].startswith("skipped: budget") for r in data["cuda_checks"]["runs"])
    log = (tmp_path / "gpu_proof.log").read_text()
    assert "cuda_checks: skipped: budget" in log and "started" not in log  # no worker ran


def test_a_unit_killed_midway_keeps_what_it_measured(tmp_path):
    results = tmp_path / "results.json"
    hung = "galore-refresh@tiny-fp32"  # reports its refresh step, then hangs (the test hook)
    proc = _run("--smoke", "--stages", "step_time,cuda_checks", "--only", f"{hung},dense_chunks", "--unit-max-s", "6",
                "--results", results, env={"GPU_PROOF_TEST_HANG": f"{hung}:2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(results.read_text())
    (run,) = data["step_time"]["runs"]
    assert run["status"].startswith("killed: ran") and "past its own limit" in run["status"], run
    assert run["refresh_step_ms"] > 0 and "steady_ms" not in run  # what it reported before the kill
    assert data["stages"]["step_time"]["status"].startswith("cut: 1 of 1")
    (check,) = data["cuda_checks"]["runs"]  # a new worker ran the rest
    assert check["key"] == "dense_chunks" and check["ok"] is True
    assert data["stages"]["cuda_checks"]["status"] == "done"
    assert "what it reported so far is kept" in (tmp_path / "gpu_proof.log").read_text()


def test_a_cut_training_run_reports_its_steps_so_far(proof):
    partial = {"model_built": True, "losses": [9.0, 8.5, 8.0], "step_seconds": [4.0, 1.0, 3.0],
               "peak_allocated_gb": 20.5}
    out = proof.summarize_steps(partial, tokens_per_step=2048)
    assert out["steps_done"] == 3 and (out["first_loss"], out["last_loss"]) == (9.0, 8.0)
    assert out["tokens_per_s"] == 2048 / 2.0  # median of the steps after the first
    assert out["peak_allocated_gb"] == 20.5 and "peak_reserved_gb" not in out
    assert proof.summarize_steps({"model_built": True}, 2048)["steps_done"] == 0


@pytest.mark.slow
def test_smoke_runs_every_stage_and_merges_into_the_file(tmp_path, proof):
    results = tmp_path / "results.json"
    earlier = {"device": "cpu", "torch": "0", "cuda": None, "date": "earlier", "commands": [{"command": "earlier"}],
               "fit_7b": [{"key": "older_run@99GB", "status": "ok"}], "step_time": {}, "estimator": {},
               "cuda_checks": {}, "stages": {}}
    results.write_text(json.dumps(earlier))
    proc = _run("--smoke", "--results", results)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(results.read_text())
    assert list(data)[:9] == ["device", "torch", "cuda", "date", "commands", "fit_7b", "step_time", "estimator",
                              "cuda_checks"]
    assert data["device"] == "cpu" and data["torch"] and data["cuda"] is None
    assert [c["command"] for c in data["commands"]] == ["earlier", "python benchmarks/gpu_proof.py --smoke "
                                                        f"--results {results}"]
    assert all(s["status"] == "done" for s in data["stages"].values()), data["stages"]

    runs = {r["key"]: r for r in data["fit_7b"]}
    assert set(runs) == {s.key for s in proof.FIT_SPECS} | {"older_run@99GB"}  # the earlier record is kept
    for spec in proof.FIT_SPECS:
        run = runs[spec.key]
        assert all(name in run for name in FIT_FIELDS), run
        assert run["status"] == "ok" and run["steps_ok"] is True and run["error"] is None
        assert run["optim"] == spec.name and run["cap_gb"] == spec.cap_gb
        assert run["last_loss"] < run["first_loss"]  # one batch, twice: the update happened
        assert run["tokens_per_s"] > 0 and run["estimate_total_gb"] > 0
        assert run["peak_allocated_gb"] is None  # CPU: no CUDA allocator, no GPU figure
    assert runs["adamw_fused@48GB"]["as_expected"] is False  # expected to run out of memory, on a GPU

    step = {r["key"]: r for r in data["step_time"]["runs"]}
    assert step["ours@tiny-bf16"]["steady_ms"] > 0 and step["ours@tiny-bf16"]["projection_bytes"] == 0
    pair = step["ours/adamw-fused@tiny-bf16"]
    assert len(pair["ratios"]) == 2 and pair["ratio_median"] > 0
    assert "ours / adamw-fused" in data["step_time"]["paired_ratio_median"]
    assert step["galore-refresh@tiny-fp32"]["refresh_step_ms"] > 0

    estimator = data["estimator"]["runs"]
    assert [r["key"] for r in estimator] == ["apollo@tiny", "apollo_mini@tiny", "adamw@tiny"]
    assert all(r["status"] == "ok" and r["estimate"]["total_gb"] > 0 for r in estimator)

    checks = {r["key"]: r for r in data["cuda_checks"]["runs"]}
    rounding = checks["bf16_row_block_rounding"]
    assert rounding["blocks"] >= 2 and rounding["each_element_a_bf16_neighbour"] and rounding["deterministic"]
    assert abs(rounding["z_total_rounding_error"]) < 5 and 0 < rounding["fraction_changed"] < 1
    assert rounding["row_blocks_equal_whole_tensor_draw"]  # on CPU one stream either way
    assert checks["dense_chunks"]["chunks"] >= 2 and checks["dense_chunks"]["chunked_equals_whole"]
    assert checks["projection_across_processes"]["equal_across_processes"]
    assert data["cuda_checks"]["all_ok"] is True

    log = (tmp_path / "gpu_proof.log").read_text()
    assert all(f"fit_7b {spec.key}: ok" in log for spec in proof.FIT_SPECS)
    assert "## fit_7b" in (tmp_path / "results.md").read_text()
    # A GPU run must not merge into CPU results (nor the reverse): refused before any work.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**earlier, "device": "NVIDIA H200"}))
    refused = _run("--smoke", "--results", other, timeout=120)
    assert refused.returncode == 2 and "are not merged" in refused.stderr
    assert json.loads(other.read_text())["device"] == "NVIDIA H200"


def test_bad_arguments_fail_before_any_work(tmp_path):
    results = tmp_path / "r.json"
    proc = _run("--smoke", "--stages", "fit_7b,warp_drive", "--results", results, timeout=120)
    assert proc.returncode == 2 and "unknown stage(s) warp_drive" in proc.stderr
    proc = _run("--smoke", "--only", "nope@1GB", "--results", results, timeout=120)
    assert proc.returncode == 2 and "no unit nope@1GB" in proc.stderr
    proc = _run("--smoke", "--budget-s", "-5", "--results", results, timeout=120)
    assert proc.returncode == 2 and "--budget-s must be a positive number" in proc.stderr
    assert not results.exists()
