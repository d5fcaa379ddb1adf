"""``lowrank-opt run``: stock scripts that import ``transformers``/``trl`` directly (no lowrank_opt import) get
lowrank-opt's optimizers by name, through the launcher, in a new process.

* a stock Trainer script with ``--optim apollo_mini`` builds APOLLO-Mini (class and every resolved option, and
  the checkpoint's param groups), a stock TRL SFT script ``apollo_capped`` (NormGrowthCap around APOLLO, its
  ``cap_tau``, targets given HF-style as ``attn mlp``), and Hugging Face's ``adamw_torch`` stays torch's AdamW;
* an unknown name fails, and so does a script that hands the Trainer its own optimizer (it would train that
  one instead of the name);
* versions the launcher is not tested with are refused before anything runs (transformers) or before TRL loads;
* how a target becomes a command line (script, ``-m``, ``python``, console script, program).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from lowrank_opt.integrations import launch

REPO = Path(__file__).resolve().parents[1]

STOCK_RESULT = '''
def report(trainer, args):
    """One line for the test: the optimizer built, its groups' options, the Trainer's classes."""
    import json

    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    inner = getattr(opt, "optimizer", opt)  # NormGrowthCap's inner optimizer
    groups = [{k: v for k, v in g.items() if isinstance(v, (int, float, str, bool, tuple, type(None)))}
              for g in inner.param_groups]
    print("RESULT " + json.dumps({
        "optimizer": type(opt).__module__ + "." + type(opt).__qualname__,
        "inner": type(inner).__module__ + "." + type(inner).__qualname__,
        "tau": getattr(opt, "tau", None), "groups": groups, "optim": str(args.optim),
        "trainer_mro": [c.__module__ + "." + c.__qualname__ for c in type(trainer).__mro__]}), flush=True)
'''

STOCK_HF = '''"""A stock transformers Trainer script: nothing of lowrank_opt is imported."""
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
''' + STOCK_RESULT + '''

@dataclass
class ScriptArguments:
    own_optimizer: bool = field(default=False, metadata={"help": "hand the Trainer an SGD of the script's own"})


def main():
    script_args, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32))
    ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    own = torch.optim.SGD(model.parameters(), lr=0.1) if script_args.own_optimizer else None
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(own, None))
    trainer.train()
    report(trainer, args)


if __name__ == "__main__":
    main()
'''

STOCK_TRL = '''"""A stock TRL SFT script: nothing of lowrank_opt is imported."""
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import AutoTokenizer, HfArgumentParser, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer
''' + STOCK_RESULT + '''

@dataclass
class ScriptArguments:
    tokenizer: str = ""


def main():
    script_args, args = HfArgumentParser((ScriptArguments, SFTConfig)).parse_args_into_dataclasses()
    tokenizer = AutoTokenizer.from_pretrained(script_args.tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))
    data = Dataset.from_list([{"prompt": f"What is {i} plus one?", "completion": f" {i + 1}."} for i in range(16)])
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    report(trainer, args)


if __name__ == "__main__":
    main()
'''

COMMON = ["--max_steps", "2", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
          "--per_device_train_batch_size", "4", "--lr_scheduler_type", "constant", "--learning_rate", "3e-3",
          "--logging_steps", "1"]


@pytest.fixture
def launched_env(monkeypatch):
    """The children import this checkout's lowrank_opt, on one thread each."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO)] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _launch(capfd, argv):
    """``lowrank-opt run ARGV`` (the launcher in this process, the target in its own): exit code, the target's
    RESULT line (or None) and its output."""
    code = launch.run(argv)
    out, err = capfd.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    return code, (json.loads(lines[-1][len("RESULT "):]) if lines else None), out + err


def _expected(name, tmp_path, **args):
    """What ``name`` resolves to under these TrainingArguments (the registry's defaults, the Trainer's lr,
    betas and epsilon, then optim_args): the options the built optimizer must carry."""
    from lowrank_opt.integrations import hf

    training_args = hf.TrainingArguments(output_dir=str(tmp_path / "expected"), optim=name, use_cpu=True,
                                         learning_rate=3e-3, **args)
    return hf.resolve_for_args(name, training_args)


def _check_options(result, resolved):
    low = [g for g in result["groups"] if g.get("rank") is not None]
    assert low, result["groups"]
    for key, value in resolved.options.items():
        if key in ("weight_decay", "layerwise"):  # decay is per group
            continue
        got = low[0][key]
        assert got == value or (isinstance(value, tuple) and tuple(got) == value), (key, got, value)


@pytest.mark.slow
def test_stock_trainer_script_trains_apollo_mini(tmp_path, capfd, launched_env):
    import torch

    script = _write(tmp_path, "stock_hf.py", STOCK_HF)
    out = tmp_path / "out"
    code, result, text = _launch(capfd, [script, "--output_dir", str(out), "--optim", "apollo_mini", *COMMON,
                                         "--save_strategy", "steps", "--save_steps", "2"])
    assert code == 0, text[-3000:]
    assert result["optimizer"] == result["inner"] == "lowrank_opt.apollo.Apollo"
    assert result["optim"] == "apollo_mini"
    assert result["trainer_mro"][:2] == ["lowrank_opt.integrations.hf.Trainer",
                                         "lowrank_opt.integrations.hf.LowRankTrainerMixin"]
    resolved = _expected("apollo_mini", tmp_path)
    assert (resolved.options["rank"], resolved.options["scale_type"], resolved.options["scale"]) == (1, "tensor", 128.0)
    _check_options(result, resolved)
    # The checkpoint says the same, in plain data.
    saved = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    low = [g for g in saved["param_groups"] if g.get("rank") is not None]
    assert [(g["rank"], g["scale_type"], g["scale"]) for g in low] == [(1, "tensor", 128.0)]
    assert len(low[0]["params"]) == 14  # 2 layers x (q, k, v, o, gate, up, down): every decoder matrix


@pytest.mark.slow
def test_stock_trl_script_trains_a_capped_name_with_hf_style_targets(tmp_path, capfd, launched_env):
    from lowrank_opt.resources import tokenizer_dir

    script = _write(tmp_path, "stock_trl.py", STOCK_TRL)
    code, result, text = _launch(capfd, [
        "--", script, "--tokenizer", str(tokenizer_dir()), "--output_dir", str(tmp_path / "out"),
        "--optim", "apollo_capped", "--optim_args", "rank=4,cap_tau=1.05", "--optim_target_modules", "attn", "mlp",
        "--max_length", "32", "--save_strategy", "no", *COMMON])
    assert code == 0, text[-3000:]
    assert result["optimizer"] == "lowrank_opt.registry.CappedOptimizer", result
    assert result["inner"] == "lowrank_opt.apollo.Apollo" and result["tau"] == 1.05
    assert result["trainer_mro"][0] == "trl.trainer.sft_trainer.SFTTrainer"
    assert "lowrank_opt.integrations.hf.LowRankTrainerMixin" in result["trainer_mro"]
    resolved = _expected("apollo_capped", tmp_path, optim_args="rank=4,cap_tau=1.05",
                         optim_target_modules=["attn", "mlp"])
    assert resolved.options["rank"] == 4
    _check_options(result, resolved)


@pytest.mark.slow
def test_hugging_face_names_are_unchanged(tmp_path, capfd, launched_env):
    script = _write(tmp_path, "stock_hf.py", STOCK_HF)
    code, result, text = _launch(capfd, [script, "--output_dir", str(tmp_path / "out"), "--optim", "adamw_torch",
                                         "--save_strategy", "no", *COMMON])
    assert code == 0, text[-3000:]
    assert result["optimizer"] == "torch.optim.adamw.AdamW"
    assert result["trainer_mro"][0] == "lowrank_opt.integrations.hf.Trainer"  # the patch was in place
    assert all(g["lr"] == 3e-3 for g in result["groups"])


@pytest.mark.slow
def test_an_unknown_name_fails(tmp_path, capfd, launched_env):
    from lowrank_opt import cli

    script = _write(tmp_path, "stock_hf.py", STOCK_HF)
    code = cli.main(["run", script, "--output_dir", str(tmp_path / "out"), "--optim", "apolo", "--save_strategy",
                     "no", *COMMON])
    err = capfd.readouterr().err
    assert code != 0
    assert "unknown --optim 'apolo'" in err and "apollo_mini" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_scripts_own_optimizer_is_refused_for_our_names(tmp_path, capfd, launched_env):
    script = _write(tmp_path, "stock_hf.py", STOCK_HF)
    code, result, text = _launch(capfd, [script, "--output_dir", str(tmp_path / "out"), "--optim", "apollo",
                                         "--own_optimizer", "true", "--save_strategy", "no", *COMMON])
    assert code != 0 and result is None
    assert "--optim apollo: the Trainer was also handed an optimizer (SGD, through optimizers=)" in text


@pytest.mark.slow
def test_trl_cli_and_a_converted_script_run_under_the_launcher(tmp_path, capfd, launched_env):
    """``trl sft`` re-launches its script through ``accelerate launch``: the patch reaches that process too.
    And a script already converted by the import line (docs/examples/trl_sft.py) runs unchanged."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowrank_opt.data import load_tokenizer
    from lowrank_opt.resources import find_config

    tokenizer = load_tokenizer(None)
    config = AutoConfig.from_pretrained(str(find_config("llama_tiny")), vocab_size=len(tokenizer),
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(
        json.dumps({"prompt": f"What is {i} plus one?", "completion": f" {i + 1}."}) + "\n" for i in range(16)))
    code, _, text = _launch(capfd, ["--", "trl", "sft", "--model_name_or_path", str(tmp_path / "model"),
                                    "--dataset_name", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
                                    "--optim", "apollo_mini", "--max_length", "32", "--save_strategy", "steps",
                                    "--save_steps", "2", *COMMON])
    assert code == 0, text[-3000:]
    saved = torch.load(tmp_path / "out" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    low = [g for g in saved["param_groups"] if g.get("rank") is not None]
    assert [(g["rank"], g["scale_type"], g["scale"]) for g in low] == [(1, "tensor", 128.0)]
    assert len(low[0]["params"]) == 28  # llama_tiny: 4 layers x 7 matrices

    code, _, text = _launch(capfd, [str(REPO / "docs" / "examples" / "trl_sft.py"), "--output_dir",
                                    str(tmp_path / "converted"), "--optim", "apollo", "--optim_args", "rank=4",
                                    "--max_length", "48", "--save_strategy", "steps", "--save_steps", "2", *COMMON])
    assert code == 0, text[-3000:]
    saved = torch.load(tmp_path / "converted" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert [g["rank"] for g in saved["param_groups"] if g.get("rank") is not None] == [4]


# ----------------------------------------------------------------------------------------------------------
# Versions and command lines (no training)


def test_untested_versions_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    from lowrank_opt import cli

    assert launch.check_version("transformers") == launch.installed_version("transformers")
    assert launch.check_version("trl", "1.16.7") == "1.16.7"
    with pytest.raises(launch.UnsupportedVersion, match=r"transformers 5\.25\.0 is installed.*5\.24\.x"):
        launch.check_version("transformers", "5.25.0")
    with pytest.raises(launch.UnsupportedVersion, match=r"trl 1\.2\.0 is installed.*lowrank_opt\.integrations\.trl"):
        launch.check_version("trl", "1.2.0")
    monkeypatch.setitem(launch.TESTED, "transformers", ("4.0",))
    marker = tmp_path / "ran"
    script = _write(tmp_path, "touch.py", f"open({str(marker)!r}, 'w').close()\n")
    assert cli.main(["run", script]) == 2
    assert "is installed, and the launcher patches only" in capsys.readouterr().err
    assert not marker.exists()


def test_the_import_hook_refuses_an_untested_trl_before_it_loads(monkeypatch):
    import importlib.util

    monkeypatch.setitem(launch.TESTED, "trl", ("0.1",))
    spec = launch._ImportHook().find_spec("trl")
    assert isinstance(spec.loader, launch._AfterExec)
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(launch.UnsupportedVersion, match=r"trl .* is installed"):
        spec.loader.exec_module(module)
    assert not hasattr(module, "SFTTrainer")  # TRL's own code never ran


def test_targets_become_command_lines(tmp_path):
    script = _write(tmp_path, "train.py", "")
    assert launch.command_for(["--", script, "--optim", "apollo"]) == (
        [sys.executable, script, "--optim", "apollo"], None)
    assert launch.command_for(["-m", "pkg.train", "-x"]) == ([sys.executable, "-m", "pkg.train", "-x"], None)
    assert launch.command_for(["python", "-m", "torch.distributed.run", "a.py"])[0] == [
        sys.executable, "-m", "torch.distributed.run", "a.py"]
    command, dist = launch.command_for(["trl", "sft", "--optim", "apollo"])
    assert dist == "trl" and command[:2] == [sys.executable, "-c"] and command[3:] == ["sft", "--optim", "apollo"]
    assert "trl.cli:main" in command[2]
    program = tmp_path / "prog"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    assert launch.command_for([str(program), "x"]) == ([str(program), "x"], None)
    for bad, message in ([[], "no target"], [["missing.py"], "not found"], [["-x"], "unknown option"],
                         [["no-such-command-anywhere"], "not a script"]):
        with pytest.raises(ValueError, match=message):
            launch.command_for(bad)
    env = launch.launch_environment("/hook", {"PYTHONPATH": "/a"})
    assert env["PYTHONPATH"] == os.pathsep.join(["/hook", "/a"]) and env["LOWRANK_OPT_RUN"] == "1"
