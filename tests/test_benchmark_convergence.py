"""benchmarks/convergence.py: a tiny end-to-end sweep (CSV, PNG, Markdown section, reuse of finished runs),
the judgement of its targets, the train.py flags of every optimizer, and its input checks."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "convergence.py"


def _load():
    spec = importlib.util.spec_from_file_location("convergence_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["convergence_bench"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.slow
def test_tiny_sweep_writes_csv_plot_and_section(tmp_path):
    output = tmp_path / "bench.md"
    output.write_text("# Benchmarks\n\nkept text\n")
    args = ["--model-config", str(ROOT / "configs" / "llama_tiny.json"), "--optimizers",
            "torch-adamw,apollo,apollo_layerwise", "--lrs", "3e-3,1e-2", "--steps", "4", "--eval-steps", "2",
            "--rank", "8", "--extend", "1", "--repeat-seeds", "43", "--repeat-optimizers", "apollo", "--work-dir", str(tmp_path / "w"),
            "--output", str(output), "--tag", "t"]
    proc = _run(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # adamw and apollo swept at both lrs; with two points the best is at an end, so each gets one more lr beyond
    # it (--extend 1); apollo_layerwise at apollo's best, apollo repeated there with seed 43
    runs = sorted(p.name for p in (tmp_path / "w" / "runs").glob("*_seed*.json") if not p.name.endswith(".spec.json"))
    assert len(runs) == 8, runs
    results = [json.loads((tmp_path / "w" / "runs" / name).read_text()) for name in runs]
    for result in results:
        assert [step for step, _ in result["eval_loss"]] == [2, 4]
        assert result["state_bytes"] > result["lowrank_state_bytes"] > 0
    by_key = {(r["spec"]["optimizer"], r["spec"]["lr"], r["spec"]["seed"]): r for r in results}
    for name in ("torch-adamw", "apollo"):
        first_best = min((1e-2, 3e-3), key=lambda lr: (by_key[(name, lr, 42)]["final_eval_loss"], lr))
        extra = {lr for (n, lr, seed) in by_key if n == name and seed == 42} - {1e-2, 3e-3}
        assert extra == ({0.03} if first_best == 1e-2 else {0.0009}), (name, extra)
    apollo_lrs = [lr for (n, lr, seed) in by_key if n == "apollo" and seed == 42]
    apollo_best = min(apollo_lrs, key=lambda lr: (by_key[("apollo", lr, 42)]["final_eval_loss"], lr))
    assert ("apollo_layerwise", apollo_best, 42) in by_key and ("apollo", apollo_best, 43) in by_key
    # APOLLO keeps far less state on the attention/MLP matrices than AdamW
    adamw = by_key[("torch-adamw", 1e-2, 42)]
    assert by_key[("apollo", apollo_best, 42)]["lowrank_state_bytes"] < 0.5 * adamw["lowrank_state_bytes"]
    rows = list(csv.DictReader(open(tmp_path / "convergence_t.csv")))
    assert len(rows) == 8 * 2 and {r["optimizer"] for r in rows} == {"torch-adamw", "apollo", "apollo_layerwise"}
    text = output.read_text()
    assert text.startswith("# Benchmarks\n\nkept text\n")
    assert "<!-- BEGIN convergence-t:" in text and "<!-- END convergence-t -->" in text  # named by --tag
    assert "python benchmarks/convergence.py --model-config" in text and "| apollo_layerwise |" in text
    pytest.importorskip("matplotlib")
    assert (tmp_path / "convergence_t.png").stat().st_size > 1000
    # A second call reuses every finished run (same settings) and rewrites the section in place.
    again = _run(*args)
    assert again.returncode == 0 and "4 runs: 4 reused" in again.stdout, again.stdout[-2000:]
    assert output.read_text().count("<!-- BEGIN convergence-t:") == 1


def _summary(module, name, loss, lowrank_bytes=1000, total=5000, repeats=None):
    best = {"final_eval_loss": loss, "lowrank_state_bytes": lowrank_bytes, "state_bytes": total}
    return module.Summary(name, {1e-3: loss}, 1e-3, best, repeats or [loss])


def test_targets_are_judged_from_the_numbers():
    module = _load()
    rows = module.targets([
        _summary(module, "torch-adamw", 3.00, lowrank_bytes=100_000, total=200_000),
        _summary(module, "apollo", 3.05, lowrank_bytes=20_000, repeats=[3.05, 3.07]),  # +1.67%: met
        _summary(module, "apollo_mini", 3.10, lowrank_bytes=2_000),  # +3.33%: missed; 2% of AdamW's: missed
        _summary(module, "apollo-torch", 3.20, repeats=[3.20, 3.21]),
    ])
    by = {row[0].split(",")[0]: row[1:] for row in rows}
    assert by["apollo vs torch-adamw"] == ["3.0500 vs 3.0000 = +1.67%", "within 2% (lower is better)", "**met**"]
    assert by["apollo_mini vs torch-adamw"] == ["3.1000 vs 3.0000 = +3.33%", "within 3% (lower is better)", "**missed**"]
    assert by["apollo_mini optimizer state on the low-rank matrices"] == ["2.000% (whole model 2.5%)", "< 1%", "**missed**"]
    assert by["apollo vs apollo-torch (the published implementation)"][2] == "**differs by more than the noise**"
    close = module.targets([_summary(module, "apollo", 3.05, repeats=[3.05, 3.09]),
                            _summary(module, "apollo-torch", 3.06, repeats=[3.04, 3.08])])
    assert close[0][3] == "**equal within noise**" and "3.0700 vs 3.0600, difference +0.0100" in close[0][1]


@pytest.mark.parametrize("args, message", [
    (["--optimizers", "torch-adamw,sgd"], "unknown optimizer 'sgd'"),
    (["--lrs", "1e-3,abc"], "--lrs must be comma-separated numbers"),
    (["--lrs", "-1"], "--lrs must be positive numbers"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--model-config", "nope.json"], "--model-config nope.json does not exist"),
    (["--optimizers", "q_apollo_mini"], "q_apollo_mini is measured against apollo_mini; list apollo_mini too"),
    (["--optimizers", "apollo_mini,apollo_mini+4bit_states"], "unknown optimizer 'apollo_mini+4bit_states'"),
    (["--sections", "sweep,curves"], "--sections must be a comma-separated list from sweep, variants"),
])
@pytest.mark.slow
def test_bad_input_fails_before_any_run(tmp_path, args, message):
    proc = _run(*args, "--work-dir", str(tmp_path / "w"), "--output", str(tmp_path / "b.md"), timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "w").exists() and not (tmp_path / "b.md").exists()


# ----------------------------------------------------------------------------------------------------------
# The variants of apollo_mini (issue 17's memory levers)


def _args(module, *extra):
    return module.parse_args(["--optimizers", "apollo,apollo_mini," + ",".join(module.VARIANTS), *extra])


def _flag(argv, flag):
    """The values after ``flag`` up to the next ``--`` flag."""
    i = argv.index(flag)
    values = []
    for value in argv[i + 1:]:
        if value.startswith("--"):
            break
        values.append(value)
    return values


def test_variant_names_build_their_train_flags(tmp_path):
    module = _load()
    args = _args(module)
    levers = {  # each variant's flags that differ from plain apollo_mini's
        "apollo_mini+8bit_states": {"--optim_args"},
        "apollo_mini+lowrank_embeddings": {"--optim_target_modules"},
        "q_apollo_mini": {"--weights"},
        "apollo_mini+16gb_setting": {"--optim_args", "--lean_loss"},
        "apollo_mini+lowrank_head": {"--optim_args", "--optim_target_modules", "--lean_loss"},
        "q_apollo_mini+12gb_setting": {"--optim_args", "--weights", "--lean_loss"},
        "apollo+dense_experts": {"--optim_target_modules"},  # MoE: the experts left to AdamW
        "apollo_mini+dense_experts": {"--optim_target_modules"},
    }
    assert set(module.VARIANTS) == set(levers)
    assert all(name in module.ALL_OPTIMIZERS for name in module.VARIANTS)
    plains = {base: module.train_argv(args, base, 3e-3, 42, tmp_path / "c.jsonl", tmp_path / "o")
              for base in ("apollo", "apollo_mini")}
    plain = plains["apollo_mini"]
    argvs = {name: module.train_argv(args, name, 3e-3, 42, tmp_path / "c.jsonl", tmp_path / "o")
             for name in module.VARIANTS}
    mini_args = "update_proj_gap=200"  # the registry's apollo_mini otherwise
    for name, argv in argvs.items():
        assert _flag(argv, "--optim") == [module.VARIANTS[name].base], name  # the variant's base underneath
        assert _flag(argv, "--learning_rate") == ["0.003"] and _flag(argv, "--seed") == ["42"]
    assert _flag(argvs["apollo_mini+8bit_states"], "--optim_args") == [mini_args + ",dense_state_bits=8"]
    assert _flag(argvs["apollo_mini+lowrank_embeddings"], "--optim_target_modules") == [
        module.TARGET_MODULES, "embed_tokens", "lm_head"]
    assert _flag(argvs["q_apollo_mini"], "--weights") == ["int8"]
    # The headline settings of docs/memory.md: every lever at once.
    assert _flag(argvs["apollo_mini+16gb_setting"], "--optim_args") == [mini_args + ",dense_state_bits=8"]
    assert "--lean_loss" in argvs["apollo_mini+16gb_setting"]
    assert "--optim_target_modules" not in [a for a in argvs["apollo_mini+16gb_setting"] if a not in plain]
    assert _flag(argvs["apollo_mini+lowrank_head"], "--optim_target_modules") == [module.TARGET_MODULES, "lm_head"]
    assert _flag(argvs["q_apollo_mini+12gb_setting"], "--weights") == ["int8"]
    assert _flag(argvs["q_apollo_mini+12gb_setting"], "--optim_args") == [mini_args + ",dense_state_bits=8"]
    for name in ("apollo+dense_experts", "apollo_mini+dense_experts"):  # only the attention matrices low-rank
        assert _flag(argvs[name], "--optim_target_modules") == [r".*\.self_attn\.[a-z]+_proj"]
    # Apart from its own levers, each variant's argv is its plain base's, flag for flag.
    for name, argv in argvs.items():
        plain = plains[module.VARIANTS[name].base]
        plain_flags = [a for a in plain if a.startswith("--")]
        assert "--weights" not in plain and "--lean_loss" not in plain and len(argv) >= len(plain)
        flags = [a for a in argv if a.startswith("--")]
        assert flags[: len(plain_flags)] == plain_flags
        assert set(flags[len(plain_flags):]) <= levers[name], name  # flags it adds are its levers
        for flag in (a for a in plain_flags if a not in levers[name]):
            assert _flag(argv, flag) == _flag(plain, flag), (name, flag)
        for flag in levers[name]:
            assert flag in argv and (flag not in plain or _flag(argv, flag) != _flag(plain, flag)), (name, flag)


def test_variant_argv_is_what_train_py_parses(tmp_path):
    """train.py's own parser reads each variant's argv into the lever it stands for, and the low-rank embeddings'
    target list selects embed_tokens and lm_head next to every attention/MLP matrix."""
    pytest.importorskip("transformers")
    module = _load()
    args = _args(module)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "hello"}) + "\n")
    sys.path.insert(0, str(ROOT))
    import train
    from lowrank_opt.registry import resolve
    from lowrank_opt.targets import lowrank_targets

    parsed = {name: train.parse_args(module.train_argv(args, name, 3e-3, 42, corpus, tmp_path / "o"))
              for name in ("apollo_mini", *module.VARIANTS)}
    for name, (model_args, _, training_args) in parsed.items():
        base = module.VARIANTS[name].base if name in module.VARIANTS else name
        assert training_args.lowrank_optim == base, name
        assert model_args.weights == ("int8" if name.startswith("q_apollo_mini") else "float"), name
        assert training_args.lean_loss == name.endswith(("_setting", "lowrank_head")), name
        assert ("dense_state_bits=8" in training_args.optim_args) == (
            name.endswith(("8bit_states", "_setting", "lowrank_head"))), name
        if base == "apollo_mini":
            options = resolve("apollo_mini", training_args.optim_args).options  # the registry's Mini, the run's gap
            assert (options["rank"], options["scale_type"], options["scale"], options["update_proj_gap"]) == \
                (1, "tensor", 128.0, 200), name
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_config))
    plain = {n for n, _ in lowrank_targets(model, parsed["apollo_mini"][2].optim_target_modules)}
    wide = {n for n, _ in lowrank_targets(model, parsed["apollo_mini+lowrank_embeddings"][2].optim_target_modules)}
    layers = model.config.num_hidden_layers
    assert len(plain) == 7 * layers and not any("embed" in n or "lm_head" in n for n in plain)
    assert wide - plain == {"model.embed_tokens.weight", "lm_head.weight"}
    head = {n for n, _ in lowrank_targets(model, parsed["apollo_mini+lowrank_head"][2].optim_target_modules)}
    assert head - plain == {"lm_head.weight"}
    attention = {n for n, _ in lowrank_targets(model, parsed["apollo+dense_experts"][2].optim_target_modules)}
    assert len(attention) == 4 * layers and attention < plain


def _result(name, lr, seed, loss, state=1000, runtime=10.0):
    return {"spec": {"optimizer": name, "lr": lr, "seed": seed}, "final_eval_loss": loss, "state_bytes": state,
            "weight_bytes": 4000, "train_runtime_s": runtime, "finished": "2026-01-01 00:00 UTC",
            "eval_loss": [[2, loss]], "train_loss": [[2, loss + 0.1]]}


def test_variants_are_compared_paired_and_judged_from_the_numbers():
    module = _load()
    rows = [
        ("apollo_mini", 3e-3, 42, 4.60), ("apollo_mini", 3e-3, 43, 4.64),  # spread 0.04, mean 4.62
        ("apollo_mini", 1e-2, 42, 5.00),  # another lr: not compared
        ("apollo_mini+8bit_states", 3e-3, 42, 4.64), ("apollo_mini+8bit_states", 3e-3, 43, 4.66),  # +0.03: met
        ("apollo_mini+lowrank_embeddings", 3e-3, 42, 4.80), ("apollo_mini+lowrank_embeddings", 3e-3, 43, 4.90),
        ("q_apollo_mini", 3e-3, 42, 4.78), ("q_apollo_mini", 3e-3, 43, 4.78),  # 4.78 / 4.62 = +3.46%: missed
        ("q_apollo_mini", 3e-3, 44, 1.00),  # a seed the base lacks: left out of the paired comparison
    ]
    results = {module.run_key(n, lr, s): _result(n, lr, s, loss) for n, lr, s, loss in rows}
    names = ["apollo_mini+8bit_states", "apollo_mini+lowrank_embeddings", "q_apollo_mini"]
    comparisons = module.compare_variants(results, names, {"apollo_mini": 3e-3})
    assert [c.name for c in comparisons] == ["apollo_mini", *names]
    by_name = {c.name: c for c in comparisons}
    assert by_name["q_apollo_mini"].seeds == [42, 43] and by_name["q_apollo_mini"].mean == pytest.approx(4.78)
    assert [r["spec"]["seed"] for r in by_name["q_apollo_mini"].runs] == [42, 43]
    assert by_name["apollo_mini"].spread == pytest.approx(0.04)
    rows = {row[0].split(" vs ")[0]: row[1:] for row in module.variant_targets(comparisons, "fp32 weights")}
    assert rows["apollo_mini+8bit_states"][0].startswith("4.6500 vs 4.6200, difference +0.0300 (+0.65%)")
    assert rows["apollo_mini+8bit_states"][1:] == ["|difference| within apollo_mini's seed spread", "**met**"]
    assert "+3.46%" in rows["q_apollo_mini"][0]
    assert rows["q_apollo_mini"][1:] == ["within 3% (lower is better)", "**missed**"]
    assert rows["apollo_mini+lowrank_embeddings"][1:] == ["none: a measured cost",
                                                          "the difference is beyond apollo_mini's seed spread"]
    table = module.variants_table(comparisons)
    assert "| apollo_mini+lowrank_embeddings |" in table and "+0.2000, +0.2600" in table  # per-seed differences
    # 8-bit states 0.045 above the base is beyond its 0.04 spread: missed
    results[module.run_key("apollo_mini+8bit_states", 3e-3, 43)]["final_eval_loss"] = 4.69
    worse = module.compare_variants(results, names[:1], {"apollo_mini": 3e-3})
    assert module.variant_targets(worse, "fp32 weights")[0][3] == "**missed**"
