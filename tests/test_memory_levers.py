"""Issue 17's memory levers wired through the optimizer, train.py and the estimator: 8-bit dense states,
low-rank embeddings, the lean loss, int8 weights (Q-APOLLO); and the two headline settings of
docs/memory.md (LLaMA-7B at 2,048 tokens: at most 16 GB with bf16 weights, at most 12 GB with int8 weights).

The codecs themselves are tested in tests/test_quant_state8bit.py, tests/test_quant_int8.py and
tests/test_loss.py."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_opt import Apollo, lowrank_param_groups
from lowrank_opt.memory import estimate, optimizer_state_bytes

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402

GB = 1e9


def _model():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(REPO / "configs" / "llama_tiny.json"))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _grads(model, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _run(model, opt, steps, start=0):
    for step in range(start, start + steps):
        _grads(model, step)
        opt.step()


# ----------------------------------------------------------------------------------------------------------
# 8-bit dense states


def test_8bit_dense_states_bytes_and_exact_resume_through_weights_only_checkpoints():
    model = _model()
    groups = lowrank_param_groups(model, "all-linear", rank=1, scale_type="tensor", scale=128.0)
    for g in groups:
        g["dense_state_bits"] = 8
    opt = Apollo(groups, lr=1e-2)
    _run(model, opt, 3)
    embed = model.model.embed_tokens.weight
    state = opt.state[embed]
    n = embed.numel()
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_codes"].shape == embed.shape
    assert state["exp_avg_absmax"].shape == (math.ceil(n / 256),) and "exp_avg" not in state
    small = model.model.norm.weight  # under 4,096 elements: stays 32-bit, as bitsandbytes does
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    # The estimator counts the same bytes as the real optimizer holds.
    est = estimate(str(REPO / "configs" / "llama_tiny.json"), "apollo_mini", optim_args="dense_state_bits=8",
                   dtype="fp32", seq_len=16, device="cpu")
    assert est.optimizer_states == optimizer_state_bytes(opt)
    # Resume: save, torch.load(weights_only=True), load into a fresh optimizer, continue == uninterrupted.
    straight = _model()
    straight_groups = lowrank_param_groups(straight, "all-linear", rank=1, scale_type="tensor", scale=128.0)
    for g in straight_groups:
        g["dense_state_bits"] = 8
    straight_opt = Apollo(straight_groups, lr=1e-2)
    _run(straight, straight_opt, 6)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model()
    resumed.load_state_dict(model.state_dict())
    resumed_groups = lowrank_param_groups(resumed, "all-linear", rank=1, scale_type="tensor", scale=128.0)
    for g in resumed_groups:
        g["dense_state_bits"] = 8
    resumed_opt = Apollo(resumed_groups, lr=1e-2)
    resumed_opt.load_state_dict(saved)
    _run(resumed, resumed_opt, 3, start=3)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_8bit_dense_states_refuse_sharded_parameters_and_int8_weights():
    from lowrank_opt.quant import quantize_model_

    model = nn.Sequential(nn.Linear(128, 64))
    quantize_model_(model)
    opt = Apollo([{"params": [("w", model[0].weight)], "rank": None, "dense_state_bits": 8}])
    model[0].weight.grad = torch.randn(64, 128)
    with pytest.raises(NotImplementedError, match="int8 weight 'w'"):
        opt.step()


# ----------------------------------------------------------------------------------------------------------
# int8 weights and the lean loss through train.py

FAST = ["--max_steps", "6", "--block_size", "32", "--max_train_samples", "64", "--eval_strategy", "no",
        "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "4", "--data_seed", "4"]


def _losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


@pytest.mark.slow
def test_int8_weights_train_save_and_resume_exactly(tmp_path):
    from lowrank_opt.quant import Int8Linear

    common = [*FAST, "--optim", "apollo_mini_layerwise", "--weights", "int8", "--learning_rate", "1e-2",
              "--save_strategy", "steps", "--save_steps", "3"]
    straight, _ = train.main([*common, "--output_dir", str(tmp_path / "a")])
    assert sum(isinstance(m, Int8Linear) for m in straight.model.modules()) == 28  # every Linear but lm_head
    losses = _losses(straight)
    assert losses[-1] < losses[0]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a" / "checkpoint-3" / "model.safetensors"))
    assert saved["model.layers.0.self_attn.q_proj.weight_int8"].dtype == torch.int8
    assert "model.layers.0.self_attn.q_proj.weight" not in saved
    resumed, _ = train.main([*common, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint",
                             str(tmp_path / "a" / "checkpoint-3")])
    for (name, a), (_, b) in zip(straight.model.named_buffers(), resumed.model.named_buffers()):
        assert torch.equal(a, b), name
    assert _losses(resumed)[-3:] == losses[-3:]


def test_int8_weights_refuse_what_cannot_update_them(tmp_path):
    with pytest.raises(ValueError, match="--weights int8 needs a lowrank-opt optimizer"):
        train.main([*FAST, "--optim", "adamw_torch", "--weights", "int8", "--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_lean_loss_trains_like_the_plain_loss(tmp_path):
    common = [*FAST, "--optim", "apollo", "--optim_args", "rank=8", "--learning_rate", "1e-2"]
    plain, _ = train.main([*common, "--output_dir", str(tmp_path / "plain")])
    lean, _ = train.main([*common, "--output_dir", str(tmp_path / "lean"), "--lean_loss", "true"])
    assert _losses(lean) == pytest.approx(_losses(plain), rel=1e-4)
    for (name, a), (_, b) in zip(plain.model.named_parameters(), lean.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_lean_loss_is_refused_where_it_cannot_apply(tmp_path):
    from datasets import Dataset

    from lowrank_opt.data import load_tokenizer
    from lowrank_opt.integrations.trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(None)
    data = Dataset.from_list([{"prompt": f"what is {i}?", "completion": f" {i}."} for i in range(8)])
    args = SFTConfig(output_dir=str(tmp_path / "out"), optim="apollo_mini", max_steps=1, use_cpu=True,
                     report_to="none", save_strategy="no", max_length=32, lean_loss=True,
                     per_device_train_batch_size=2)
    model = _model()
    model.resize_token_embeddings(len(tokenizer))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    with pytest.raises(ValueError, match="computes its own loss"):
        trainer.train()


# ----------------------------------------------------------------------------------------------------------
# The headline settings (docs/memory.md)


@pytest.mark.slow
def test_llama_7b_headline_settings_fit_16_and_12_gb():
    """The two settings docs/memory.md recommends: bf16 weights with 8-bit AdamW moments for embed_tokens and
    lm_head (low-rank ones cost too much loss, docs/benchmarks.md), and int8 weights."""
    from lowrank_opt.cli import main

    common = ["memory", "llama_7b", "--optim", "apollo_mini_layerwise", "--gradient-checkpointing", "--lean-loss",
              "--optim-args", "dense_state_bits=8", "--json", "--seq-len", "2048"]
    for extra, limit in (([], 16e9), (["--weights", "int8"], 12e9)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(common + extra) == 0
        result = json.loads(out.getvalue())
        assert result["total"] <= limit, (extra, result["total"] / GB)
        assert result["seq_len"] == 2048 and result["gradient_checkpointing"] and result["lean_loss"]
    # Without the levers the same model is well above 16 GB: the levers, not the settings, make the difference.
    plain = estimate("llama_7b", "apollo_mini_layerwise", gradient_checkpointing=True, seq_len=2048)
    assert plain.total > 17e9
