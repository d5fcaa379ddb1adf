"""The Hugging Face surface: ``--optim NAME`` builds the optimizer NAME stands for, on every path a user takes.

* a table over every entry point (train.py, lowrank-opt's ``TrainingArguments``/``Trainer``, its TRL
  ``SFTConfig``/``SFTTrainer``, ``optimizer_cls_and_kwargs`` with a stock Trainer) and every registry name
  (and its ``_capped`` form): the optimizer built has the class and the resolved options of that name;
* a stock ``transformers.Trainer`` handed our arguments with one of our names refuses instead of training AdamW;
* docs/examples/hf_trainer.py and docs/examples/trl_sft.py (stock scripts, one import changed) build the named
  optimizer and resume from a checkpoint bit for bit;
* Conv1D (GPT-2): ``all-linear`` includes it and one APOLLO step on a Conv1D weight equals the step on the
  equivalent Linear; a GPT-2 model directory fine-tunes with the default targets;
* logging: perplexity, mem_* and the resolved optimizer settings reach log_history and TensorBoard; layer-wise
  runs log the gradient norm they saw; ``--report_to`` an integration that is not installed fails at once.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import transformers
import trl  # noqa: F401  (a test dependency: fail, do not skip)
from lowrank_opt import NormGrowthCap
from lowrank_opt.integrations import hf
from lowrank_opt.registry import available, parse_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402

NAMES = available() + ["apollo_capped", "apollo_mini_capped", "adamw_capped", "adamp_capped"]
COMMON = dict(use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, learning_rate=3e-3,
              per_device_train_batch_size=2, max_steps=2, logging_steps=1)


def _tiny_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowrank_opt.data import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = AutoConfig.from_pretrained(str(REPO / "configs" / "llama_tiny.json"), vocab_size=len(tokenizer),
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config), tokenizer


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


def _lm_rows(tokenizer, n=16, length=24):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tokenizer), (n, length), generator=gen)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def _check_built(name, optimizer, args_like, trained=False):
    """The optimizer has the class and the options ``name`` resolves to (registry defaults, the Trainer's
    learning rate/betas/epsilon, nothing else)."""
    spec, capped = parse_name(name)
    expected = hf.resolve_for_args(name, args_like)
    inner = optimizer
    if capped:
        assert isinstance(optimizer, NormGrowthCap), type(optimizer)
        inner = optimizer.optimizer
    else:
        assert not isinstance(optimizer, NormGrowthCap)
    assert type(inner) is spec.cls, (name, type(inner))
    groups = inner.param_groups
    target = next((g for g in groups if g.get("rank") is not None), groups[-1]) if spec.lowrank else groups[-1]
    for key, value in expected.options.items():
        if key == "layerwise":
            assert inner.layerwise is value
            continue
        if key == "weight_decay" or (key == "lr" and trained):  # decay is per group; a schedule moved lr
            continue
        got = target[key]
        assert got == value or (isinstance(value, tuple) and tuple(got) == value), (name, key, got, value)
    assert trained or target["lr"] == args_like.learning_rate
    if spec.lowrank:  # the low-rank matrices are the attention/MLP weights, not AdamW's
        assert any(g.get("rank") is not None and len(g["params"]) >= 7 for g in groups)


def _build_train_py(name, tmp_path):
    argv = ["--optim", name, "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--block_size", "32",
            "--max_train_samples", "32", "--eval_strategy", "no", "--disable_tqdm", "true"]
    trainer, _, args = train.build(argv)
    return trainer.create_optimizer(), args


def _build_hf_classes(name, tmp_path, tiny):
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    args = hf.TrainingArguments(output_dir=str(tmp_path / "out"), optim=name, **COMMON)
    trainer = hf.Trainer(model=model, args=args, train_dataset=_lm_rows(tokenizer))
    return trainer.create_optimizer(), args


def _build_trl_classes(name, tmp_path, tiny):
    from datasets import Dataset

    from lowrank_opt.integrations.trl import SFTConfig, SFTTrainer

    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    data = Dataset.from_list([{"prompt": f"what is {i}?", "completion": f" {i}."} for i in range(8)])
    args = SFTConfig(output_dir=str(tmp_path / "out"), optim=name, max_length=32, **COMMON)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    return trainer.create_optimizer(), args


def _build_cls_and_kwargs(name, tmp_path, tiny):
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), **COMMON)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_lm_rows(tokenizer),
                                   optimizer_cls_and_kwargs=hf.optimizer_cls_and_kwargs(name, model, args))
    return trainer.create_optimizer(), args


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("entry", ["train.py", "hf", "trl", "optimizer_cls_and_kwargs"])
def test_every_entry_point_builds_the_named_optimizer(entry, name, tmp_path, tiny):
    if entry == "train.py":
        optimizer, args = _build_train_py(name, tmp_path)
    elif entry == "hf":
        optimizer, args = _build_hf_classes(name, tmp_path, tiny)
    elif entry == "trl":
        optimizer, args = _build_trl_classes(name, tmp_path, tiny)
    else:
        optimizer, args = _build_cls_and_kwargs(name, tmp_path, tiny)
    _check_built(name, optimizer, args)
    if getattr(optimizer, "layerwise", False):
        optimizer.remove_hooks()


@pytest.mark.parametrize("name", ["apollo", "apollo_mini_capped"])
def test_stock_trainer_with_our_arguments_refuses_instead_of_training_adamw(name, tmp_path, tiny):
    args = hf.TrainingArguments(output_dir=str(tmp_path / "out"), optim=name, **COMMON)
    assert args.optim == name and args.lowrank_optim == name
    trainer = transformers.Trainer(model=copy.deepcopy(tiny[0]), args=args, train_dataset=_lm_rows(tiny[1]))
    with pytest.raises(ValueError, match=f"unsupported optimizer: {name}"):
        trainer.create_optimizer()


def test_arguments_refuse_bad_names_and_options_at_once(tmp_path):
    with pytest.raises(ValueError, match="unknown --optim 'apolo'"):
        hf.TrainingArguments(output_dir=str(tmp_path), optim="apolo", use_cpu=True)
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'rnak'"):
        hf.TrainingArguments(output_dir=str(tmp_path), optim="apollo", optim_args="rnak=4", use_cpu=True)
    with pytest.raises(ValueError, match="target_modules applies to low-rank optimizers only"):
        hf.TrainingArguments(output_dir=str(tmp_path), optim="adamp", optim_target_modules=["attn"], use_cpu=True)
    # Target modules as HF takes them, and as command lines give them.
    for given in (["attn", "mlp"], ["attn,mlp"], "attn,mlp"):
        args = hf.TrainingArguments(output_dir=str(tmp_path), optim="apollo", optim_target_modules=given, use_cpu=True)
        assert args.optim_target_modules == ["attn", "mlp"]
    parser = transformers.HfArgumentParser(hf.TrainingArguments)
    (parsed,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "apollo",
                                                    "--optim_target_modules", "attn", "mlp", "--use_cpu", "true"])
    assert parsed.optim_target_modules == ["attn", "mlp"]
    help_text = parser.format_help()
    assert "lowrank_optim" not in help_text and "cap_tau" in help_text


def test_target_regexes_reach_the_optimizer_whole_and_hf_names_keep_theirs(tmp_path, tiny):
    regex = r"model\.layers\.\d{1,2}\.self_attn\.q_proj"  # its {1,2} holds a comma
    args = hf.TrainingArguments(output_dir=str(tmp_path / "out"), optim="apollo", optim_target_modules=[regex],
                                **COMMON)
    assert args.optim_target_modules == [regex]
    trainer = hf.Trainer(model=copy.deepcopy(tiny[0]), args=args, train_dataset=_lm_rows(tiny[1]))
    low = [n for g in trainer.create_optimizer().param_groups if g.get("rank") is not None for n in g["param_names"]]
    assert low == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(tiny[0].config.num_hidden_layers)]
    for given in ([regex, "attn,mlp"], "attn,mlp"):  # Hugging Face's names: the targets as HF takes them
        hf_args = hf.TrainingArguments(output_dir=str(tmp_path / "hf"), optim="galore_adamw",
                                       optim_target_modules=given, use_cpu=True)
        assert hf_args.optim_target_modules == given


def test_hf_names_refuse_optim_args_their_optimizer_does_not_read(tmp_path, tiny):
    args = hf.TrainingArguments(output_dir=str(tmp_path / "out"), optim="adamw_torch", optim_args="rnak=4", **COMMON)
    trainer = hf.Trainer(model=copy.deepcopy(tiny[0]), args=args, train_dataset=_lm_rows(tiny[1]))
    with pytest.raises(ValueError, match="does not read"):
        trainer.create_optimizer()
    args = hf.TrainingArguments(output_dir=str(tmp_path / "out"), optim="sgd", optim_args="momentum=0.5", **COMMON)
    trainer = hf.Trainer(model=copy.deepcopy(tiny[0]), args=args, train_dataset=_lm_rows(tiny[1]))
    assert trainer.create_optimizer().param_groups[0]["momentum"] == 0.5  # a key HF does read


def test_hf_layerwise_name_with_optim_args_hooks_each_parameter_once(tmp_path, tiny, monkeypatch):
    """HF's layer-wise optimizers register their update hooks while HF looks the optimizer up: checking which
    optim_args it reads must not look it up a second time (every parameter would be updated twice a step)."""
    hooked = []
    register = torch.Tensor.register_post_accumulate_grad_hook
    monkeypatch.setattr(torch.Tensor, "register_post_accumulate_grad_hook",
                        lambda self, hook: (hooked.append(id(self)), register(self, hook))[1])
    model = copy.deepcopy(tiny[0])
    args = hf.TrainingArguments(output_dir=str(tmp_path / "out"), optim="galore_adamw_layerwise", optim_args="rank=4",
                                optim_target_modules="all-linear", **COMMON)
    trainer = hf.Trainer(model=model, args=args, train_dataset=_lm_rows(tiny[1]))
    trainer.create_optimizer()
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(hooked) == sorted(trainable)


# ----------------------------------------------------------------------------------------------------------
# The stock scripts of docs/examples, changed by one import line


def _example(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _script_args(out, optim, *extra):
    return ["--output_dir", str(out), "--optim", optim, "--max_steps", "4", "--use_cpu", "true",
            "--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "true", "--learning_rate", "1e-2",
            "--seed", "7", "--data_seed", "7", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["hf_trainer", "trl_sft"])
@pytest.mark.parametrize("optim", ["apollo", "apollo_mini", "apollo_capped", "apollo_layerwise", "adamw_torch"])
def test_example_scripts_build_the_named_optimizer(script, optim, tmp_path):
    module = _example(script)
    extra = ["--max_length", "48"] if script == "trl_sft" else ["--max_train_samples", "64", "--block_size", "32"]
    trainer = module.main(_script_args(tmp_path / "out", optim, "--save_strategy", "no", *extra))
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    if optim == "adamw_torch":
        assert type(optimizer) is torch.optim.AdamW  # HF's own name, through the same classes
    else:
        _check_built(optim, optimizer, trainer.args, trained=True)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(map(lambda x: x == x, losses))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["hf_trainer", "trl_sft"])
def test_example_scripts_resume_bit_exactly(script, tmp_path):
    module = _example(script)
    extra = ["--max_length", "48"] if script == "trl_sft" else ["--max_train_samples", "64", "--block_size", "32"]
    common = ["--optim_args", "rank=4,update_proj_gap=3", "--save_strategy", "steps", "--save_steps", "2", *extra]
    straight = module.main(_script_args(tmp_path / "a", "apollo", *common))
    resumed = module.main(_script_args(tmp_path / "b", "apollo", *common, "--resume_from_checkpoint",
                                       str(tmp_path / "a" / "checkpoint-2")))
    for (n, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n
    # The checkpoint holds plain data only.
    saved = torch.load(tmp_path / "a" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert saved["param_groups"][-1]["rank"] == 4


# ----------------------------------------------------------------------------------------------------------
# Conv1D (GPT-2 style weights, in x out)


@pytest.mark.parametrize("shape", [(6, 6), (4, 9), (9, 4)])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_conv1d_step_equals_the_equivalent_linear_step(shape, scale_type):
    from transformers.pytorch_utils import Conv1D

    from lowrank_opt import Apollo, lowrank_param_groups

    out_f, in_f = shape
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
    conv = nn.Sequential(Conv1D(out_f, in_f))
    with torch.no_grad():
        conv[0].weight.copy_(linear[0].weight.T)
    groups_c = lowrank_param_groups(conv, "all-linear", rank=2, scale_type=scale_type)
    assert groups_c[-1]["transposed"] is True and groups_c[-1]["params"][0][0] == "0.weight"
    opt_l = Apollo(lowrank_param_groups(linear, "all-linear", rank=2, scale_type=scale_type), lr=0.1)
    opt_c = Apollo(groups_c, lr=0.1)
    for step in range(3):
        g = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(step))
        linear[0].weight.grad, conv[0].weight.grad = g.clone(), g.T.clone()
        opt_l.step()
        opt_c.step()
        torch.testing.assert_close(conv[0].weight.T, linear[0].weight, rtol=1e-6, atol=1e-7)
    # The channels are the Linear's (the moments are the same numbers, transposed).
    torch.testing.assert_close(opt_c.state[conv[0].weight]["exp_avg"].T, opt_l.state[linear[0].weight]["exp_avg"],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_gpt2_model_directory_finetunes_with_default_targets(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lowrank_opt.data import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    trainer, _ = train.main(["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "out"),
                             "--max_steps", "6", "--block_size", "32", "--max_train_samples", "64",
                             "--eval_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1",
                             "--optim_args", "rank=8"])
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    low = [g for g in optimizer.param_groups if g.get("rank") is not None]
    names = [n for g in low for n in g["param_names"]]
    assert names and all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in names)
    assert all(g["transposed"] for g in low)
    for g in low:  # low-rank moments on the Conv1D weights: (r, out) for these (in x out) storages
        for p in g["params"]:
            assert min(optimizer.state[p]["exp_avg"].shape) <= 8
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------------------------------------
# Logging


@pytest.mark.slow
def test_settings_perplexity_and_memory_reach_log_history_and_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # transformers 5: where TensorBoard writes
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, _ = train.main(["--output_dir", str(tmp_path / "out"), "--max_steps", "4", "--block_size", "32",
                             "--max_train_samples", "64", "--eval_strategy", "no", "--disable_tqdm", "true",
                             "--logging_steps", "2", "--report_to", "tensorboard", "--memory_report", "true"])
    history = trainer.state.log_history
    settings = next(e for e in history if "optimizer" in e)
    assert "lowrank_opt.apollo.Apollo" in settings["optimizer"] and "rank=32" in settings["optimizer"]
    assert settings["optimizer/rank"] == 32 and settings["optimizer/lowrank_matrices"] == 28
    train_logs = [e for e in history if "loss" in e]
    assert all("perplexity" in e and "mem_optimizer_state_gb" in e for e in train_logs)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/perplexity", "train/mem_optimizer_state_gb", "optimizer/rank"} <= scalars, scalars
    assert "lowrank_opt/optimizer" in " ".join(events.Tags().get("tensors", []))


@pytest.mark.slow
def test_layerwise_logs_the_gradient_norm_it_saw(tmp_path):
    common = ["--max_steps", "1", "--block_size", "32", "--max_train_samples", "64", "--eval_strategy", "no",
              "--disable_tqdm", "true", "--logging_steps", "1", "--optim_args", "rank=8", "--max_grad_norm", "0"]
    normal, _ = train.main(["--output_dir", str(tmp_path / "a"), "--optim", "apollo", *common])
    layerwise, _ = train.main(["--output_dir", str(tmp_path / "b"), "--optim", "apollo_layerwise", *common])
    norm_a = next(e["grad_norm"] for e in normal.state.log_history if "grad_norm" in e)
    norm_b = next(e["grad_norm"] for e in layerwise.state.log_history if "grad_norm" in e)
    assert norm_b > 0 and norm_b == pytest.approx(norm_a, rel=1e-5)  # the same first gradient


def test_report_to_a_missing_integration_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(hf._REPORTERS, "tensorboard", ("a_package_that_is_not_installed",))
    with pytest.raises(ImportError, match="pip install a_package_that_is_not_installed"):
        train.main(["--output_dir", str(tmp_path / "out"), "--report_to", "tensorboard"])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# train.py: a name means what it says


def test_config_options_belong_to_the_config_optimizer(tmp_path):
    trainer, _, args = train.build(["--optim", "apollo_mini", "--output_dir", str(tmp_path / "out")])
    optimizer = trainer.create_optimizer()
    low = next(g for g in optimizer.param_groups if g.get("rank") is not None)
    assert (low["rank"], low["scale_type"], low["scale"]) == (1, "tensor", 128.0)  # not tiny.yaml's rank=32 channel
    trainer, _, args = train.build(["--output_dir", str(tmp_path / "out")])  # the config's own optimizer: its options
    low = next(g for g in trainer.create_optimizer().param_groups if g.get("rank") is not None)
    assert low["rank"] == 32


def test_config_paths_and_outputs_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer, _, args = train.build(["--config", "configs/tiny.yaml", "--max_steps", "1"])  # the shipped one
    assert Path(args.output_dir) == tmp_path / "outputs" / "tiny"
    local = tmp_path / "mine.yaml"
    local.write_text((REPO / "configs" / "tiny.yaml").read_text().replace("max_steps: 400", "max_steps: 3"))
    trainer, _, args = train.build(["--config", "mine.yaml"])
    assert args.max_steps == 3 and Path(args.output_dir) == tmp_path / "outputs" / "mine"


@pytest.mark.slow
def test_apollo_mini_checkpoint_shows_rank_one_tensor_scale_128(tmp_path):
    train.main(["--optim", "apollo_mini", "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                "--block_size", "32", "--max_train_samples", "32", "--eval_strategy", "no", "--disable_tqdm", "true",
                "--save_strategy", "steps", "--save_steps", "2"])
    saved = torch.load(tmp_path / "out" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    low = next(g for g in saved["param_groups"] if g.get("rank") is not None)
    assert (low["rank"], low["scale_type"], low["scale"]) == (1, "tensor", 128.0)
    assert not (tmp_path / "out" / ".lowrank_opt_staging").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", available() + ["apollo_capped", "adamw_torch", "adamw_torch_fused", "sgd",
                                                 "adafactor", "apollo_adamw", "galore_adamw", "adagrad", "rmsprop"])
def test_every_name_runs_from_the_default_config_with_no_extra_flags(name, tmp_path):
    trainer, _ = train.main(["--optim", name, "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                             "--eval_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1",
                             "--max_train_samples", "32"])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(map(lambda x: x == x, losses))
