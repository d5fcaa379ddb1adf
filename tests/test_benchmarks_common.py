"""benchmarks/_common.py: the shared machinery of the benchmark scripts (shapes, timing rounds, state bytes via
the library, Markdown sections, atomic files)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _common  # noqa: E402


@pytest.mark.parametrize("key", list(_common.SIZES))
def test_sizes_are_the_configs(key):
    shape = _common.SIZES[key]
    config = json.loads(shape.config_path.read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == \
        (shape.hidden, shape.intermediate, shape.layers)
    assert config["vocab_size"] == _common.VOCAB and not config.get("tie_word_embeddings", False)
    # Every weight once: the tensors of llama_parameter_shapes, the shape classes and the model agree.
    per_tensor = sum(torch.Size(dims).numel() for _, dims, _ in _common.llama_parameter_shapes(shape))
    assert per_tensor == _common.parameter_count(shape)
    h, i, layers, vocab = shape.hidden, shape.intermediate, shape.layers, _common.VOCAB
    assert per_tensor == 2 * vocab * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h
    assert shape.label == f"LLaMA-{key.upper()}" and 1 <= shape.rank <= shape.hidden


def test_rounds_rotate_the_order_and_time_every_call():
    calls = []
    steppers = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = _common.timed_rounds(steppers, rounds=4, device="cpu")
    assert calls == list("abc" "bca" "cab" "abc")
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in times.values() for t in v)
    assert _common.round_ratios({"a": [2.0, 6.0], "b": [1.0, 3.0]}, "a", "b") == [2.0, 2.0]


def test_state_bytes_split_held_projections_from_the_rest():
    from lowrank_opt import Apollo

    m, n, r = 48, 40, 8  # tall: right projection, P is r x n, moments m x r
    for cache in (False, True):
        p = torch.nn.Parameter(torch.randn(m, n))
        p.grad = torch.randn(m, n)
        opt = Apollo([p], lr=1e-3, rank=r, cache_projection=cache)
        opt.step()
        state, held = _common.state_bytes(opt)
        moments = 2 * m * r * 4
        assert moments <= state <= moments + 64  # plus the step and limiter scalars
        assert held == (r * n * 4 if cache else 0)


def test_state_bytes_count_a_projector_object_in_the_state():
    class Projector:  # what apollo-torch and GaLore keep in state["projector"]
        def __init__(self):
            self.ortho_matrix = torch.zeros(6, 5)

    p = torch.nn.Parameter(torch.zeros(5, 5))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p] = {"exp_avg": torch.zeros(5, 5), "step": 3, "projector": Projector()}
    assert _common.state_bytes(opt) == (5 * 5 * 4, 6 * 5 * 4)


def test_sections_are_replaced_by_name_and_files_keep_their_mode(tmp_path):
    old_begin, end = _common.markers("demo", "benchmarks/old_name.py")
    doc = tmp_path / "bench.md"
    doc.write_text(f"# Title\n\nabove\n\n{old_begin}\nold\n{end}\n\nbelow\n")
    os.chmod(doc, 0o640)
    new = _common.section("demo", "benchmarks/demo.py", "python benchmarks/demo.py --x 1", "Run on a machine.",
                          "| a |\n|---|\n| 1 |")
    _common.write_section(doc, new, "demo")  # the section of the same name, whichever script wrote it
    assert doc.read_text() == f"# Title\n\nabove\n\n{new}\n\nbelow\n"
    assert new.startswith(_common.markers("demo", "benchmarks/demo.py")[0] + "\n```bash\npython benchmarks/demo.py")
    assert stat.S_IMODE(doc.stat().st_mode) == 0o640
    _common.write_section(doc, _common.section("other", "b.py", "cmd", "machine"), "other")  # a new one: at the end
    assert doc.read_text().startswith(f"# Title\n\nabove\n\n{new}\n\nbelow\n\n<!-- BEGIN other:")
    fresh = tmp_path / "fresh.md"
    _common.write_section(fresh, new, "demo")
    assert fresh.read_text() == new + "\n"
    assert stat.S_IMODE(fresh.stat().st_mode) != 0o600  # not mkstemp's private mode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_ours_get_the_runs_rank_only_where_it_is_not_part_of_the_optimizer():
    p = [torch.nn.Parameter(torch.randn(16, 8))]
    assert _common.build_ours("apollo", [{"params": p}], rank=4).param_groups[0]["rank"] == 4
    assert _common.build_ours("apollo_mini", [{"params": p}], rank=4).param_groups[0]["rank"] == 1


def test_baselines_build_and_name_their_train_py_options():
    assert _common.baseline_train_args("torch-adamw", 64, 200) == ("adamw_torch", None)
    assert _common.baseline_train_args("apollo-torch", 64, 50) == (
        "apollo_adamw", "rank=64,update_proj_gap=50,proj=random,scale_type=channel,scale=1,proj_type=std")
    assert _common.baseline_train_args("apollo-torch-mini", 64, 200)[1].startswith("rank=1,")
    assert _common.baseline_train_args("galore-torch", 8, 200) == (
        "galore_adamw", "rank=8,update_proj_gap=200,scale=0.25,proj_type=std")
    low, rest = [torch.nn.Parameter(torch.randn(16, 8))], [torch.nn.Parameter(torch.randn(8))]
    fused = _common.build_baseline("torch-adamw-fused", rest, lowrank_params=low, lr=1e-3)
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"] and len(fused.param_groups[0]["params"]) == 2
    for name in ("apollo-torch", "galore-torch"):
        if _common.baseline_missing(name) is None:
            opt = _common.build_baseline(name, rest, lowrank_params=low, lr=1e-3, rank=4)
            assert [len(g["params"]) for g in opt.param_groups] == [1, 1] and opt.param_groups[1]["rank"] == 4
