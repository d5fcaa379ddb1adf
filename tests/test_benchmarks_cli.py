"""The benchmark scripts' command lines and helpers: benchmarks/fit_7b.py (GPU only, with a CPU mode) and
benchmarks/memory_table.py (the estimator tables of docs/memory.md); and the links between the docs pages."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIT_7B = ROOT / "benchmarks" / "fit_7b.py"
MEMORY_TABLE = ROOT / "benchmarks" / "memory_table.py"


def _run(*args: str, timeout: float = 120, hide_gpus: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if hide_gpus:  # so that the no-CUDA path is taken even on a machine with a GPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


@pytest.fixture(scope="module")
def fit_7b():
    return _load(FIT_7B, "fit_7b_under_test")


# ----------------------------------------------------------------------------------------------------------
# fit_7b.py


@pytest.mark.slow
def test_fit_7b_without_cuda_exits_with_a_clear_message_before_allocating(tmp_path):
    output = tmp_path / "results.json"
    proc = _run(FIT_7B, "--output", output)
    assert proc.returncode == 3, proc.stderr
    assert "no CUDA GPU is available" in proc.stderr
    assert "nothing was allocated" in proc.stderr
    assert "--device cpu" in proc.stderr  # tells how to smoke-test instead
    assert not output.exists()
    assert proc.stdout == ""  # stopped before building or printing anything


@pytest.mark.slow
def test_fit_7b_cpu_refuses_caps_and_bad_arguments():
    proc = _run(FIT_7B, "--device", "cpu", "--config", "configs/llama_tiny.json", "--caps", "24")
    assert proc.returncode == 2 and "--caps 0" in proc.stderr
    proc = _run(FIT_7B, "--caps", "48,-1")
    assert proc.returncode == 2 and "cap must be >= 0" in proc.stderr
    proc = _run(FIT_7B, "--config", "configs/no_such_model.json")
    assert proc.returncode == 2 and "no such file" in proc.stderr


@pytest.mark.slow
def test_fit_7b_cpu_smoke_trains_and_reports_no_gpu_numbers(tmp_path):
    output = tmp_path / "smoke.json"
    proc = _run(FIT_7B, "--device", "cpu", "--config", "configs/llama_tiny.json", "--caps", "0", "--seq-len", "32",
                "--steps", "2", "--optims", "apollo_mini_layerwise,torch-adamw-fused", "--output", output, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU run" in proc.stdout and "not GPU numbers" in proc.stdout
    payload = json.loads(output.read_text())
    assert payload["environment"]["device"] == "cpu"
    assert "gpu" not in payload["environment"]
    assert [r["optimizer"] for r in payload["results"]] == ["apollo_mini_layerwise", "torch-adamw-fused"]
    for record in payload["results"]:
        assert record["status"] == "ok" and record["seq_len"] == 32
        measured, predicted = record["measured"], record["estimate"]
        assert measured["peak_reserved_gb"] is None and predicted["reserved_gb"] is None  # CUDA's allocator only
        # The peak of live CPU tensor bytes (torch.profiler), next to the estimate for device cpu.
        assert measured["peak_allocated_gb"] > measured["weights_gb"] + measured["optimizer_state_gb"]
        assert measured["param_dtype"] == "bfloat16"
        assert len(measured["losses"]) == 2 and measured["loss_finite"]
        assert measured["last_loss"] < measured["first_loss"]  # the same batch twice: the update happened
        # The estimator counts optimizer state with the same function on meta tensors: exact.
        assert measured["optimizer_state_gb"] == pytest.approx(predicted["optimizer_states_gb"], rel=1e-9)
        assert predicted["layerwise"] == (record["optimizer"] == "apollo_mini_layerwise")
    assert payload["results"][0]["measured"]["first_loss"] == payload["results"][1]["measured"]["first_loss"]
    # Layer-wise APOLLO-Mini: the estimate within 10% of the measured peak (60M/130M at 1,024 tokens agree to
    # 0.1%, docs/memory_measured_cpu.md); fused AdamW: the estimate takes no scratch for the fused kernel and
    # is an upper bound here.
    mini, fused = (r["measured"]["peak_allocated_gb"] / r["estimate"]["allocated_gb"] for r in payload["results"])
    assert 0.9 <= mini <= 1.1
    assert 0.8 <= fused <= 1.0


def test_fit_7b_falls_back_to_shorter_sequences_on_oom(fit_7b):
    calls, cleanups = [], []

    def run(seq_len):
        calls.append(seq_len)
        if seq_len > 1024:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"seq_len": seq_len}

    result, attempts = fit_7b.longest_fitting(run, [2048, 1024, 512], cleanup=lambda: cleanups.append(1))
    assert result == {"seq_len": 1024} and calls == [2048, 1024]
    assert attempts == [{"seq_len": 2048, "outcome": "oom", "error": "CUDA out of memory. Tried to allocate 2.00 GiB"},
                        {"seq_len": 1024, "outcome": "ok"}]
    assert len(cleanups) == 2  # memory is freed after every attempt

    def never(seq_len):
        raise RuntimeError("CUDA error: out of memory")  # as raised from inside an autograd hook

    result, attempts = fit_7b.longest_fitting(never, [2048, 1024, 512])
    assert result is None and [a["outcome"] for a in attempts] == ["oom"] * 3

    def broken(seq_len):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        fit_7b.longest_fitting(broken, [2048])


def test_fit_7b_ladder_and_caps(fit_7b):
    assert fit_7b.seq_ladder(2048, [1024, 512]) == [2048, 1024, 512]
    assert fit_7b.seq_ladder(2048, [512, 1024, 4096]) == [2048, 1024, 512]
    assert fit_7b.seq_ladder(2048, [1024, 512], start_at=1024) == [1024, 512]  # a larger cap fitted 1024 at most
    assert fit_7b.seq_ladder(512, [1024, 512]) == [512]
    assert fit_7b.parse_caps("16,48,24") == [48.0, 24.0, 16.0]
    assert fit_7b.parse_caps("0,24") == [0.0, 24.0]  # no cap first
    fused = fit_7b.resolve_choice("torch-adamw-fused")  # a baseline: _common.BASELINES' settings
    assert fused.baseline and fused.estimator == "adamw_torch_fused" and fused.lr == 1e-3
    with pytest.raises(ValueError, match="dense baselines only"):
        fit_7b.resolve_choice("apollo-torch")
    mini = fit_7b.resolve_choice("apollo_mini_layerwise")  # ours: the registry's name, lr and layer-wise flag
    assert mini.layerwise and not mini.baseline and mini.lr == 1e-2 and mini.estimator == "apollo_mini_layerwise"
    assert not fit_7b.resolve_choice("adamp").baseline
    with pytest.raises(ValueError, match="torch-adamw-fused"):  # the message names both lists
        fit_7b.resolve_choice("no_such_optimizer")


def test_fit_7b_table_marks_cpu_runs(fit_7b):
    record = {"cap_gb": 0, "optimizer": "apollo", "seq_len": 64, "status": "ok", "estimate": None,
              "measured": {"peak_allocated_gb": None, "peak_reserved_gb": None, "optimizer_state_gb": 0.01,
                           "tokens_per_s": 100.0, "first_loss": 8.0, "last_loss": 7.0}}
    cpu = fit_7b.markdown_table([record], "cpu")
    assert cpu.startswith("CPU run") and "| none | apollo | 64 | ok |" in cpu
    assert not fit_7b.markdown_table([record], "cuda").startswith("CPU")


TINY = str(ROOT / "configs" / "llama_tiny.json")
EMBEDDING_TARGETS = ["all-linear", "embed_tokens", "lm_head"]


@pytest.mark.slow
def test_fit_7b_levers_reach_the_run_and_the_estimate(fit_7b, monkeypatch):
    """Issue 17's 16 GB setting on the tiny model: 8-bit dense states, low-rank embeddings, the lean loss."""
    import lowrank_opt.loss

    calls = []
    lean = lowrank_opt.loss.causal_lm_loss_from_model
    monkeypatch.setattr(lowrank_opt.loss, "causal_lm_loss_from_model",
                        lambda model, inputs: calls.append(sorted(inputs)) or lean(model, inputs))
    plain = fit_7b.resolve_choice("apollo_mini_layerwise")
    choice = fit_7b.with_levers(plain, optim_args={"dense_state_bits": 8}, target_modules="all-linear,embed_tokens,lm_head",
                                lean_loss=True)
    assert choice.options == {"dense_state_bits": 8} == choice.estimator_args
    assert choice.target_modules == EMBEDDING_TARGETS and choice.lean_loss and choice.weights == "float"
    assert fit_7b.describe_levers(choice) == "dense_state_bits=8, targets all-linear,embed_tokens,lm_head, lean loss"
    assert fit_7b.describe_levers(plain) == "" and fit_7b.with_levers(plain) == plain  # no lever: the old run

    run = dict(device="cpu", seq_len=32, batch_size=1, steps=2, lr=1e-2, seed=0, trace_cpu_peak=False)
    measured = fit_7b.train_run(TINY, choice, **run)
    assert calls == [["input_ids", "labels"]] * 2  # every step's loss was the lean one
    assert measured["lean_loss"] and measured["weights"] == "float" and measured["loss_finite"]
    assert measured["last_loss"] < measured["first_loss"]
    # The estimate is told the same levers: its optimizer state is counted by the same function on meta
    # tensors (exact), and differs from the plain run's (the embeddings' AdamW moments are gone).
    predicted = fit_7b.predict(TINY, choice, 32, 1, device="cpu")
    assert measured["optimizer_state_gb"] == pytest.approx(predicted["optimizer_states_gb"], rel=1e-9)
    plain_states = fit_7b.predict(TINY, plain, 32, 1, device="cpu")["optimizer_states_gb"]
    assert predicted["optimizer_states_gb"] < plain_states / 10
    # Without the lean loss the first loss is the model's own, equal up to bf16 logits.
    calls.clear()
    own = fit_7b.train_run(TINY, fit_7b.with_levers(plain, optim_args={"dense_state_bits": 8}),
                           **{**run, "steps": 1})
    assert calls == [] and own["first_loss"] == pytest.approx(measured["first_loss"], abs=2e-2)


def test_fit_7b_int8_weights_run_and_match_the_estimate(fit_7b):
    """Issue 17's 12 GB setting on the tiny model: int8 weights (Q-APOLLO), 8-bit dense states, the lean loss."""
    from lowrank_opt.quant import Int8Linear

    choice = fit_7b.with_levers(fit_7b.resolve_choice("apollo_mini_layerwise"), optim_args={"dense_state_bits": 8},
                                lean_loss=True, weights="int8")
    measured = fit_7b.train_run(TINY, choice, device="cpu", seq_len=32, batch_size=1, steps=2, lr=1e-2, seed=0,
                                trace_cpu_peak=False)
    assert measured["weights"] == "int8" and measured["loss_finite"]
    assert measured["last_loss"] < measured["first_loss"]  # APOLLO updated the int8 weights
    predicted = fit_7b.predict(TINY, choice, 32, 1, device="cpu")
    assert measured["optimizer_state_gb"] == pytest.approx(predicted["optimizer_states_gb"], rel=1e-9)
    # Weights as stored: int8 codes + fp32 scales + the float embeddings, head and norms; the estimate counts the
    # same but for the int8 layers' one-element gradient carriers (2 bytes each).
    model = fit_7b.build_model(TINY, "cpu", 0, weights="int8")
    carriers = sum(isinstance(m, Int8Linear) for m in model.modules())
    assert carriers == 4 * 7
    assert measured["weights_gb"] * 1e9 == predicted["weights_gb"] * 1e9 + 2 * carriers
    float_bytes = fit_7b.weight_bytes(fit_7b.build_model(TINY, "cpu", 0))
    assert measured["weights_gb"] * 1e9 < 0.8 * float_bytes


def test_fit_7b_int8_build_never_holds_the_float_model(fit_7b):
    """build_int8_model is quantize_model_ of the float build without the float build: the same modules, buffers
    and parameters (other random draws), and a traced peak below the float model's bytes."""
    from lowrank_opt.quant import Int8Linear, quantize_model_

    reference = fit_7b.build_model(TINY, "cpu", 0)
    float_bytes = fit_7b.weight_bytes(reference)
    quantize_model_(reference)
    with fit_7b.cpu_peak_bytes() as peak:
        model = fit_7b.build_int8_model(TINY, "cpu", 0)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all((ours[k].shape, ours[k].dtype) == (theirs[k].shape, theirs[k].dtype) for k in ours)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert not isinstance(model.get_output_embeddings(), Int8Linear)  # the head stays float, as quantize_model_
    for name in ours:  # deterministic tensors equal, random ones drawn from the same distribution
        if "norm" in name or "rotary" in name:
            assert torch.equal(ours[name], theirs[name]), name
    q = model.model.layers[0].mlp.up_proj
    w = q.dequantized_weight(torch.float32)
    assert abs(w.std().item() - model.config.initializer_range) < 0.1 * model.config.initializer_range
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.training and model.is_gradient_checkpointing
    assert fit_7b.weight_bytes(model) < peak["peak_bytes"] < float_bytes


@pytest.mark.slow
def test_fit_7b_levers_refused_where_they_do_not_apply(fit_7b):
    fused = fit_7b.resolve_choice("torch-adamw-fused")
    with pytest.raises(ValueError, match="dense_state_bits=8: only for a lowrank-opt optimizer, not 'torch-adamw-fused'"):
        fit_7b.with_levers(fused, optim_args={"dense_state_bits": 8})
    with pytest.raises(ValueError, match="int8 weights .*not 'torch-adamw-fused'"):
        fit_7b.with_levers(fused, weights="int8")
    with pytest.raises(ValueError, match="int8 weights .*not 'adamp'"):  # ours, but not APOLLO
        fit_7b.with_levers(fit_7b.resolve_choice("adamp"), weights="int8")
    with pytest.raises(ValueError, match="target modules"):
        fit_7b.with_levers(fused, target_modules="all-linear")
    with pytest.raises(ValueError, match="weights must be one of"):
        fit_7b.with_levers(fit_7b.resolve_choice("apollo"), weights="int4")
    assert fit_7b.with_levers(fused, lean_loss=True).lean_loss  # the lean loss is for any optimizer


@pytest.mark.slow
def test_fit_7b_refuses_levers_on_the_command_line():
    proc = _run(FIT_7B, "--device", "cpu", "--config", TINY, "--caps", "0", "--optims", "apollo,torch-adamw",
                "--weights", "int8", timeout=120)
    assert proc.returncode == 2 and "int8 weights" in proc.stderr and "'torch-adamw'" in proc.stderr
    proc = _run(FIT_7B, "--device", "cpu", "--config", TINY, "--caps", "0", "--optim-args", "rank", timeout=120)
    assert proc.returncode == 2 and "'key=value' pairs" in proc.stderr


# ----------------------------------------------------------------------------------------------------------
# memory_table.py


@pytest.mark.slow
def test_memory_table_help_and_bad_sizes():
    proc = _run(MEMORY_TABLE, "--help", timeout=60)
    assert proc.returncode == 0 and "docs/memory.md" in proc.stdout, proc.stderr
    for flag in ("--sizes", "--optims", "--seq-len", "--batch-size", "--output", "--no-plots"):
        assert flag in proc.stdout
    proc = _run(MEMORY_TABLE, "--sizes", "3b", "--no-plots", timeout=60)
    assert proc.returncode == 2 and "unknown size 3b" in proc.stderr


@pytest.fixture(scope="module")
def memory_table():
    return _load(MEMORY_TABLE, "memory_table_under_test")


@pytest.mark.slow
def test_memory_table_replaces_its_section_and_keeps_the_page(memory_table, tmp_path):
    output = tmp_path / "memory.md"
    block = ("<!-- BEGIN fit-7b-cpu -->\n### Measured: LLaMA-7B on the CPU\n\n| setting | peak |\n|---|--:|\n"
             "| 16 GB  | 1.23 \u2014 kept as is |  \n\ttab, trailing spaces   \n<!-- END fit-7b-cpu -->")
    begin, end = "<!-- BEGIN memory-table: generated by benchmarks/memory_table.py, edits inside are overwritten -->", \
        "<!-- END memory-table -->"
    page = f"# page\n\nhand-written prose\n\n{block}\n\n## The table\n\n{begin}\nold figures\n{end}\n\nmore prose\n"
    output.write_bytes(page.encode())
    argv = ["--sizes", "60m", "--optims", "torch-adamw,apollo_mini", "--seq-len", "256", "--no-plots",
            "--moe-configs", "", "--output", str(output)]
    assert memory_table.main(argv) == 0
    text = output.read_text()
    assert text.startswith(f"# page\n\nhand-written prose\n\n{block}\n\n## The table\n\n{begin}\n```bash\n")
    assert text.endswith(f"{end}\n\nmore prose\n") and "old figures" not in text
    assert "python benchmarks/memory_table.py --sizes 60m --optims torch-adamw,apollo_mini --seq-len 256" in text
    assert "memory-moe" not in text  # --moe-configs '': no MoE section
    assert "| LLaMA-60M | 0.058 B |" in text  # the summary line: plain / layer-wise totals
    assert "| APOLLO-Mini | layer-wise |" in text  # the detail table
    assert "memory-levers" not in text  # LLaMA-7B's levers only with 7b among the sizes


def test_memory_table_rows_are_the_estimators_with_the_baselines_settings(memory_table):
    from lowrank_opt.memory import estimate

    setting, size = memory_table.Setting(seq_len=256), memory_table.SIZES["60m"]
    base = dict(dtype="bf16", seq_len=256, gradient_checkpointing=True)
    galore = memory_table.estimate_row(size, memory_table.METHODS["galore-torch"], True, setting).estimate
    expected = estimate("llama_60m", "galore_adamw_layerwise", target_modules=["attn", "mlp"], **base,
                        optim_args=dict(rank=128, update_proj_gap=200, scale=0.25))  # GaLore's paper settings
    assert galore.total == expected.total and galore.optimizer_states == expected.optimizer_states
    apollo = memory_table.estimate_row(size, memory_table.METHODS["apollo"], False, setting).estimate
    assert apollo.total == estimate("llama_60m", "apollo", optim_args="rank=128", **base).total


@pytest.fixture(scope="module")
def levers_60m(memory_table):
    """The levers' rows for LLaMA-60M at 256 tokens (7B's would cost minutes here)."""
    setting = memory_table.Setting(seq_len=256)
    return setting, memory_table.lever_rows(memory_table.SIZES["60m"], setting, log=lambda *a: None)


def test_memory_table_lever_rows_are_the_estimators(memory_table, levers_60m):
    from lowrank_opt.memory import estimate

    setting, rows = levers_60m
    base = dict(optimizer="apollo_mini_layerwise", dtype="bf16", seq_len=256, gradient_checkpointing=True)
    head, embed = ["all-linear", "lm_head"], ["all-linear", "embed_tokens", "lm_head"]
    expected = {  # the levers of issue 17, spelled out here rather than taken from the script
        "base": estimate("llama_60m", **base),
        "states8": estimate("llama_60m", **base, optim_args="dense_state_bits=8"),
        "lean": estimate("llama_60m", **base, optim_args="dense_state_bits=8", lean_loss=True),
        "head": estimate("llama_60m", **base, optim_args="dense_state_bits=8", lean_loss=True, target_modules=head),
        "embed": estimate("llama_60m", **base, optim_args="dense_state_bits=8", lean_loss=True, target_modules=embed),
        "int8": estimate("llama_60m", **base, lean_loss=True, weights="int8"),
        "int8_states8": estimate("llama_60m", **base, optim_args="dense_state_bits=8", lean_loss=True,
                                 weights="int8"),
    }
    assert [r.lever.key for r in rows] == list(expected)
    table = memory_table.lever_table(rows).splitlines()[2:]
    by_key = {r.lever.key: r for r in rows}
    for r, line in zip(rows, table):
        e = expected[r.lever.key]
        assert (r.estimate.total, r.estimate.weights, r.estimate.optimizer_states) == \
            (e.total, e.weights, e.optimizer_states)
        assert line.startswith(f"| {r.number} |") and f"| **{e.total / 1e9:.2f}** |" in line
        if r.lever.after is not None:  # what the row saved against the row it builds on
            before = expected[r.lever.after]
            assert f"| {(before.total - e.total) / 1e9:.2f} (vs {by_key[r.lever.after].number}) |" in line
    marked = {key: line for key, line in zip(expected, table) if "GB setting**" in line}
    assert set(marked) == {"lean", "int8_states8"}
    assert "**the 16 GB setting**" in marked["lean"] and "**the 12 GB setting**" in marked["int8_states8"]
    assert all("costly in loss" in table[list(expected).index(key)] for key in ("head", "embed"))


def test_memory_table_lever_flags_reproduce_the_rows(memory_table, levers_60m, capsys):
    """docs/memory.md: each row is `lowrank-opt memory CONFIG --optim apollo_mini_layerwise --gradient-checkpointing`
    plus its flags column."""
    from lowrank_opt.cli import main as cli_main

    setting, rows = levers_60m
    for r in rows:
        argv = ["memory", "llama_60m", "--optim", "apollo_mini_layerwise", "--gradient-checkpointing", "--seq-len",
                "256", *memory_table.lever_cli_flags(r.lever)]
        capsys.readouterr()
        assert cli_main(argv + ["--json"]) == 0
        assert json.loads(capsys.readouterr().out)["total"] == r.estimate.total, argv


def _anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_docs_links_between_pages_reach_a_heading():
    docs = ROOT / "docs"
    anchors = {page.name: {_anchor(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}
               for page in docs.glob("*.md")}
    links = [(page.name, target, fragment) for page in [*docs.glob("*.md"), *docs.glob("gpu/*.md")]
             for target, fragment in re.findall(r"\]\((?:\.\./)?([\w_]+\.md)#([\w-]+)\)", page.read_text())]
    assert len(links) >= 3
    for page, target, fragment in links:
        assert fragment in anchors[target], f"{page} links {target}#{fragment}, which has no such heading"


def test_fit_7b_cpu_bf16_matmul_layout_same_products_copies_only_the_smaller_operand(fit_7b):
    """--cpu-matmul layout: a bf16 mm/addmm whose operands share a layout gets a copy of the smaller one in the
    other layout (torch's generic CPU kernel is ~100x slower otherwise); the products are bitwise those of a
    product torch runs on the fast layout, nothing else is touched, and the copies are counted."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 40, generator=generator).bfloat16()  # a Linear's weight: (out, in), row-major
    grad_out = torch.randn(8, 96, generator=generator).bfloat16()
    bias = torch.randn(40, generator=generator).bfloat16()
    fast_layout = grad_out.t().contiguous().t()  # what the mode should hand the kernel: the 8 x 96 operand
    with fit_7b.CpuBf16MatmulLayout() as layout:
        same_row = grad_out @ weight  # both row-major: grad_out (768 elements) is copied, not weight (3,840)
        same_col = torch.mm(weight, weight.t())  # row-major @ column-major: untouched
        with_bias = torch.addmm(bias, grad_out, weight)
        in_fp32 = grad_out.float() @ weight.float()  # not bf16: untouched
    assert torch.equal(same_row, fast_layout @ weight)
    assert torch.equal(with_bias, torch.addmm(bias, fast_layout, weight))
    assert torch.equal(same_col, weight @ weight.t()) and torch.equal(in_fp32, grad_out.float() @ weight.float())
    assert layout.summary() == {"cpu_matmul": "layout", "layout_copies": 2,
                                "largest_layout_copy_mb": grad_out.numel() * 2 / 1e6}
    # Both column-major (two transposed views): the smaller one becomes row-major.
    left, right = grad_out.t().contiguous().t(), weight.t().contiguous().t()
    with fit_7b.CpuBf16MatmulLayout() as layout:
        product = left @ right
    assert torch.equal(product, grad_out @ right) and layout.copies == 1
    # The products stay close to fp32 (the layout only changes which kernel path runs).
    torch.testing.assert_close(same_row.float(), in_fp32, atol=0.25, rtol=0.02)


def test_fit_7b_cpu_matmul_choice_is_recorded_and_checked(fit_7b):
    choice = fit_7b.resolve_choice("apollo_mini_layerwise")
    run = dict(device="cpu", seq_len=16, batch_size=1, steps=1, lr=1e-2, seed=0, trace_cpu_peak=False)
    layout = fit_7b.train_run(TINY, choice, **run)
    plain = fit_7b.train_run(TINY, choice, cpu_matmul="torch", **run)
    assert layout["cpu_matmul"] == "layout" and layout["layout_copies"] > 0 and plain["cpu_matmul"] == "torch"
    assert "layout_copies" not in plain
    assert layout["first_loss"] == pytest.approx(plain["first_loss"], abs=1e-2)  # the same forward, bf16 sums
    with pytest.raises(ValueError, match="cpu_matmul must be one of .*'fast'"):
        fit_7b.train_run(TINY, choice, cpu_matmul="fast", **run)


@pytest.mark.slow
def test_fit_7b_cpu_peak_of_a_lean_layerwise_bf16_run_matches_the_estimate(fit_7b, tmp_path):
    """Issue 17's 16 GB setting on a model shaped like its peak: a large vocabulary next to small layers, so that
    the peak is the lean loss's backward, where the lm_head gradient (allocated first, filled a vocabulary block
    at a time) is alive next to the loss scratch. Traced on CPU (torch.profiler, every allocation), against
    ``estimate(..., device="cpu")``; also the layer-wise step's norms of the bf16 head gradient, which once made
    a full-size fp32 copy on CPU (found by the LLaMA-7B CPU run: 0.52 GB above the estimate)."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=32000, max_position_embeddings=128)
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    choice = fit_7b.with_levers(fit_7b.resolve_choice("apollo_mini_layerwise"), optim_args={"dense_state_bits": 8},
                                lean_loss=True)
    measured = fit_7b.train_run(str(path), choice, device="cpu", seq_len=64, batch_size=1, steps=2, lr=1e-2, seed=0)
    predicted = fit_7b.predict(str(path), choice, 64, 1, device="cpu")
    assert measured["loss_finite"] and measured["cpu_peak_method"] == "allocator"
    head_grad = 2 * 32000 * 256
    peak, estimate = measured["peak_allocated_gb"] * 1e9, predicted["allocated_gb"] * 1e9
    assert abs(peak / estimate - 1) < 0.02, (peak, estimate)
    assert peak - (estimate - head_grad) > 0.1 * estimate  # without the head gradient the estimate falls short


def test_fit_7b_cpu_peak_ignores_tensors_of_an_earlier_traced_block(fit_7b):
    """The profiler's running total outlives its session: a tensor allocated in one traced block and freed
    after it stays in the total, and once inflated the next run's peak by the previous model (this file's
    int8-build test, then a traced run: +2.9 MB)."""
    with fit_7b.cpu_peak_bytes() as first:
        kept = torch.ones(1_000_000)  # 4 MB, freed only after the block
    del kept
    with fit_7b.cpu_peak_bytes() as second:
        scratch = torch.ones(250_000)
        del scratch
    assert first["peak_bytes"] == 4_000_000 and second["peak_bytes"] == 1_000_000


@pytest.mark.parametrize("setting,weights", [("16gb", "float"), ("12gb", "int8")])
def test_docs_memory_shows_the_committed_llama_7b_cpu_runs(setting, weights):
    """Issue 17's LLaMA-7B CPU runs: docs/memory.md's fit-7b-cpu block carries the figures of the JSON that
    fit_7b.py wrote (docs/fit_7b_cpu_*.json), the command that wrote it, and a peak within 5 % of the estimate."""
    run = json.loads((ROOT / "docs" / f"fit_7b_cpu_{setting}.json").read_text())
    page = (ROOT / "docs" / "memory.md").read_text()
    block = page[page.index("<!-- BEGIN fit-7b-cpu -->"):page.index("<!-- END fit-7b-cpu -->")]
    (record,) = run["results"]
    measured, estimate = record["measured"], record["estimate"]
    assert record["status"] == "ok" and run["settings"]["config"].endswith("llama_7b.json")
    assert run["settings"]["weights"] == weights and run["settings"]["lean_loss"]
    assert run["settings"]["optim_args"] == "dense_state_bits=8" and run["settings"]["steps"] == 2
    assert run["environment"]["device"] == "cpu" and measured["cpu_peak_method"] == "allocator"
    assert run["command"] in block
    peak, predicted = measured["peak_allocated_gb"], estimate["allocated_gb"]
    assert f"| {peak:.3f} | {predicted:.3f} |" in block
    assert abs(peak / predicted - 1) < 0.05
    assert measured["last_loss"] < measured["first_loss"] and len(measured["losses"]) == 2
