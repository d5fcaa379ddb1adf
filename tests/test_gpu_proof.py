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
FIT_FIELDS = ("key", "optim", "optim_args", "target_modules", "lean_loss", "weights", "cap_gb", "layerwise", "dtype",
              "steps_ok", "peak_allocated_gb", "peak_reserved_gb", "tokens_per_s", "first_loss", "last_loss",
              "estimate_total_gb", "error", "status")
# Issue 17's rows: the 16 GB and 12 GB settings of docs/memory.md, and the levers each key must say.
LEVER_ROWS = {
    "apollo_mini_layerwise@16GB[dense_state_bits=8;lean_loss]": "dense_state_bits=8, lean loss",
    "apollo_mini_layerwise@12GB[dense_state_bits=8;lean_loss;weights=int8]":
        "dense_state_bits=8, lean loss, int8 weights",
}


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
                    "apollo_layerwise@24GB", "adamw_fused@48GB", *LEVER_ROWS]
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


def test_issue_17_rows_carry_their_levers_into_the_plan(proof):
    fit_7b = proof.fit_7b
    specs = {spec.key: spec for spec in proof.FIT_SPECS}
    plain = fit_7b.resolve_choice("apollo_mini_layerwise")
    expected = {  # the settings of docs/memory.md's headline lines, built straight from fit_7b
        "apollo_mini_layerwise@16GB[dense_state_bits=8;lean_loss]": fit_7b.with_levers(
            plain, optim_args={"dense_state_bits": 8}, lean_loss=True),
        "apollo_mini_layerwise@12GB[dense_state_bits=8;lean_loss;weights=int8]": fit_7b.with_levers(
            plain, optim_args={"dense_state_bits": 8}, lean_loss=True, weights="int8"),
    }
    assert set(expected) == set(LEVER_ROWS)
    for smoke in (False, True):
        units = {u["key"]: u for u in proof.build_plan(["fit_7b"], smoke=smoke)}
        for key, choice in expected.items():
            assert proof.fit_choice(specs[key]) == choice
            unit = json.loads(json.dumps(units[key]))  # as the worker reads its plan
            # The worker's run and the parent's estimate both build their choice from the unit: the levers survive.
            assert proof.fit_choice(proof.unit_spec(unit)) == choice
            assert proof.levers_text(unit) == LEVER_ROWS[key] == fit_7b.describe_levers(choice)
            assert unit["layerwise"] and unit["settings"]["expect"] == "fit"
            assert unit["settings"]["config"] == ("configs/llama_tiny.json" if smoke else "configs/llama_7b.json")
    units = {u["key"]: u for u in proof.build_plan(["fit_7b"], smoke=False)}
    caps = [(units[k]["cap_gb"], units[k]["max_s"], units[k]["settings"]["seq_len"]) for k in LEVER_ROWS]
    assert caps == [(16, 100, 2048), (12, 150, 2048)]  # the int8 build and steps get their own limit
    # The plain rows are what they were: no lever fields set.
    assert all(proof.levers_text(units[k]) == "" for k in ("apollo_mini_layerwise@16GB", "adamw_fused@48GB"))


def test_bad_levers_are_refused_naming_the_spec_and_value(proof):
    bad = [
        (proof.FitSpec("apollo_mini", 12, layerwise=True, weights="int4"),
         r"FitSpec apollo_mini_layerwise@12GB\[weights=int4\]: weights must be one of \('float', 'int8'\), got 'int4'"),
        (proof.FitSpec("apollo_mini", 16, layerwise=True, lean_loss="yes"),
         "FitSpec apollo_mini_layerwise@16GB.*: lean_loss must be True or False, got 'yes'"),
        (proof.FitSpec("apollo", 16, target_modules=["all-linear", 3]),
         r"FitSpec apollo@16GB\[targets=all-linear\+3\]: target_modules must be .*got \['all-linear', 3\]"),
        (proof.FitSpec("apollo", 16, target_modules=[]), r"target_modules must be .*got \[\]"),
        (proof.FitSpec("adamw_fused", 48, weights="int8"),
         r"FitSpec adamw_fused@48GB\[weights=int8\]: int8 weights .*not 'adamw_fused'"),
        (proof.FitSpec("adamw_fused", 48, target_modules="all-linear"),
         "FitSpec adamw_fused@48GB.*: target modules 'all-linear': only for a lowrank-opt optimizer"),
        (proof.FitSpec("apollo", 16, settings={"max_s": 0}), "FitSpec apollo@16GB: max_s must be a positive number"),
    ]
    for spec, message in bad:
        with pytest.raises(ValueError, match=message):
            proof.check_fit_spec(spec)
        with pytest.raises(ValueError, match=message):  # the whole plan refuses, before any unit exists
            proof.build_plan(["fit_7b"], smoke=True, fit_specs=[*proof.FIT_SPECS, spec])
    # The lean loss is for any optimizer (fit_7b says so): a valid row.
    proof.check_fit_spec(proof.FitSpec("adamw_fused", 48, lean_loss=True))


def test_results_written_before_the_levers_still_load(proof):
    """A fit record (or plan unit) without target_modules / lean_loss / weights is a plain run: it reads back
    as one, merges with this run's lever rows, and renders."""
    old_record = {"key": "apollo_mini_layerwise@16GB", "optim": "apollo_mini_layerwise", "optim_args": {},
                  "cap_gb": 16, "layerwise": True, "dtype": "bfloat16", "status": "ok", "steps_ok": True,
                  "first_loss": 9.0, "last_loss": 8.0, "estimate_total_gb": 17.85}
    spec = proof.unit_spec(old_record)
    assert (spec.target_modules, spec.lean_loss, spec.weights) == (None, False, "float")
    assert spec.key == old_record["key"]
    assert proof.fit_choice(spec) == proof.fit_7b.resolve_choice("apollo_mini_layerwise")
    assert proof.levers_text(old_record) == ""
    older = {"device": "X", "commands": [], "fit_7b": [old_record], "stages": {}}
    key12 = next(k for k in LEVER_ROWS if "int8" in k)
    new_record = {"key": key12, "optim": "apollo_mini_layerwise", "optim_args": {"dense_state_bits": 8},
                  "target_modules": None, "lean_loss": True, "weights": "int8", "cap_gb": 12, "status": "ok"}
    merged = proof.merge_results(older, {"device": "X", "commands": [], "fit_7b": [new_record], "stages": {}})
    assert [r["key"] for r in merged["fit_7b"]] == [key12, old_record["key"]]
    table = proof.render_markdown(merged)
    assert f"| {old_record['key']} | — | 16 |" in table
    assert f"| {key12} | {LEVER_ROWS[key12]} | 12 |" in table


def test_issue_17_rows_run_on_cpu_with_their_levers(proof, tmp_path, monkeypatch):
    """The smoke plan's two lever rows (tiny model), run by the worker as the script does and estimated as the
    parent does: the record says which levers the run was built with, the estimate was computed with the same
    ones (its optimizer state is counted by the same function: equal to the measured bytes), and the levers
    changed what was measured against the plain 16 GB row."""
    import types

    import lowrank_opt.loss

    lean = lowrank_opt.loss.causal_lm_loss_from_model
    calls = []
    monkeypatch.setattr(lowrank_opt.loss, "causal_lm_loss_from_model",
                        lambda model, inputs: calls.append(1) or lean(model, inputs))
    keys = ["apollo_mini_layerwise@16GB", *LEVER_ROWS]
    plan = {u["key"]: u for u in proof.build_plan(["fit_7b"], smoke=True)}
    units = [json.loads(json.dumps(plan[k])) for k in keys]
    estimates = proof.Estimates(units, "cpu")
    estimates.start().wait(300)
    run = proof.Run(types.SimpleNamespace(log=tmp_path / "log"), units, ["fit_7b"], {"date": "now"}, estimates,
                    0.0, {}, None)
    worker = proof.Worker("cpu", tmp_path / "progress.jsonl", smoke=True)
    records = {}
    for unit in units:
        calls.clear()
        run.records[unit["key"]] = worker.fit(unit, progress=lambda record: None)
        records[unit["key"]] = run.unit_record(unit)
        assert len(calls) == (unit["settings"]["steps"] if unit.get("lean_loss") else 0), unit["key"]
    plain = records.pop("apollo_mini_layerwise@16GB")
    assert plain["levers"] == plain["estimate_levers"] == ""
    for key, record in records.items():
        assert record["status"] == "ok" and record["steps_ok"] and record["as_expected"] is True, record
        assert record["last_loss"] < record["first_loss"]  # one batch, twice: the update happened
        assert record["levers"] == record["estimate_levers"] == LEVER_ROWS[key]  # the run's and the estimate's
        assert record["lean_loss"] is True
        assert record["optimizer_state_gb"] == pytest.approx(record["estimate"]["optimizer_states_gb"], rel=1e-9)
    r16, r12 = records.values()
    assert r16["weights"] == "float" and r16["target_modules"] is None
    # Plain: fp32 AdamW moments (8 bytes a parameter) of the embeddings and of the head. With the levers they
    # are 8-bit (2 bytes, + 8 per 256 for the block maxima): about a quarter, under a third with the rest.
    assert r16["optimizer_state_gb"] < plain["optimizer_state_gb"] / 3
    assert r16["estimate"]["optimizer_states_gb"] < plain["estimate"]["optimizer_states_gb"] / 3
    assert r12["weights"] == "int8" and r12["target_modules"] is None
    # int8 codes (1 byte) + fp32 scales per 128 (1/32 byte) instead of 2 bf16 bytes for each Linear but the head.
    assert r12["weights_gb"] < plain["weights_gb"] and r12["estimate"]["weights_gb"] < plain["estimate"]["weights_gb"]
    # The estimate counts the same weights but each int8 layer's one-element bf16 gradient carrier (2 bytes).
    config = json.loads((ROOT / units[0]["settings"]["config"]).read_text())
    carriers = 7 * config["num_hidden_layers"]  # q, k, v, o, gate, up, down
    assert r12["weights_gb"] * 1e9 == pytest.approx(r12["estimate"]["weights_gb"] * 1e9 + 2 * carriers, abs=1e-3)


def test_a_lever_row_without_bitsandbytes_is_skipped_and_named(proof, tmp_path, monkeypatch):
    monkeypatch.setattr(proof.fit_7b, "bitsandbytes_available", lambda: "bitsandbytes not importable (test)")
    unit = next(u for u in proof.build_plan(["fit_7b"], smoke=True) if u["key"] in LEVER_ROWS)
    record = proof.Worker("cpu", tmp_path / "progress.jsonl", smoke=True).fit(unit, progress=lambda r: None)
    assert record == {"status": "skipped: bitsandbytes not importable (test)", "steps_ok": False}
    assert proof._package_skip(record)  # a missing package, not an unfinished unit


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
        # The run and its estimate were built with the spec's levers (issue 17's rows: see LEVER_ROWS).
        assert run["levers"] == run["estimate_levers"] == proof.levers_text(run) == LEVER_ROWS.get(spec.key, "")
        assert run["optimizer_state_gb"] == pytest.approx(run["estimate"]["optimizer_states_gb"], rel=1e-9)
    assert runs["adamw_fused@48GB"]["as_expected"] is False  # expected to run out of memory, on a GPU
    assert {runs[k]["weights"] for k in LEVER_ROWS} == {"float", "int8"}

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
