"""Checkpoints survive a crash: a run killed while writing a checkpoint leaves every earlier checkpoint
loadable, nothing half-written where ``get_last_checkpoint`` looks, and resuming from the last complete one
equals the uninterrupted run bit for bit. And a regular (non-editable) install works from any directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402

COMMON = ["--optim", "apollo", "--optim_args", "rank=8,update_proj_gap=3", "--max_steps", "6", "--block_size", "32",
          "--max_train_samples", "64", "--eval_strategy", "no", "--disable_tqdm", "true", "--save_strategy", "steps",
          "--save_steps", "2", "--seed", "5", "--data_seed", "5", "--logging_steps", "1"]

# Runs train.py and kills the process (no cleanup, as a power cut or an OOM kill would) in the middle of writing
# checkpoint-4: after its model file, before its optimizer state.
KILLER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    import transformers
    import train

    original = transformers.Trainer._save_optimizer_and_scheduler

    def save(self, output_dir):
        if output_dir.rstrip("/").endswith("checkpoint-4"):
            os._exit(3)
        return original(self, output_dir)

    transformers.Trainer._save_optimizer_and_scheduler = save
    train.main(sys.argv[1:])
""")


@pytest.mark.slow
def test_killed_while_saving_leaves_earlier_checkpoints_and_resume_is_exact(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=str(REPO)))
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(script), *COMMON, "--output_dir", str(out)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    # The half-written checkpoint is not where checkpoints are looked for; the earlier one is complete.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    last = get_last_checkpoint(str(out))
    assert last == str(out / "checkpoint-2")
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"):
        assert (out / "checkpoint-2" / name).is_file(), name
    torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)  # plain data, loadable
    straight, _ = train.main([*COMMON, "--output_dir", str(tmp_path / "straight")])
    resumed, _ = train.main([*COMMON, "--output_dir", str(out), "--resume_from_checkpoint", last])
    for (n, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n
    assert not (out / ".lowrank_opt_staging").exists()  # the next save cleared what the crash left
    assert (out / "checkpoint-6").is_dir()


@pytest.mark.slow
def test_save_total_limit_rotates_only_complete_checkpoints(tmp_path):
    trainer, _ = train.main([*COMMON, "--output_dir", str(tmp_path / "out"), "--save_total_limit", "1"])
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-6"]


GPT_NEOX = dict(model_type="gpt_neox", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, tie_word_embeddings=False)


@pytest.mark.slow
def test_resume_loads_weights_that_transformers_saves_under_other_names(tmp_path):
    """transformers 5 saves gpt_neox's lm_head as ``embed_out`` and renames it back only in from_pretrained; the
    stock Trainer's resume leaves it at its initial values. Resuming equals the uninterrupted run bit for bit."""
    from safetensors import safe_open

    config = tmp_path / "gpt_neox.json"
    config.write_text(json.dumps(GPT_NEOX))
    args = [*COMMON, "--model_config", str(config)]
    straight, _ = train.main([*args, "--output_dir", str(tmp_path / "straight")])
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    with safe_open(checkpoint / "model.safetensors", "pt") as saved:
        assert "embed_out.weight" in saved.keys() and "lm_head.weight" not in saved.keys()
    resumed, _ = train.main([*args, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
                             str(checkpoint)])
    for (n, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.slow
def test_resume_from_a_checkpoint_without_a_weight_stops_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    train.main([*COMMON, "--max_steps", "2", "--output_dir", str(tmp_path / "first")])
    weights = tmp_path / "first" / "checkpoint-2" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not hold every weight of the LlamaForCausalLM \(not in it: "
                                         r"model\.layers\.1\.mlp\.up_proj\.weight\)"):
        train.main([*COMMON, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
                    str(tmp_path / "first" / "checkpoint-2")])


@pytest.mark.slow
def test_checkpoint_weights_load_into_the_models_own_tensors_through_transformers_conversions(tmp_path):
    """A MoE model holds its experts as one tensor each for gate/up and down; save_pretrained writes one tensor per
    expert. load_checkpoint_weights converts them back (transformers' own loading) into the same tensors."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from lowrank_opt.integrations.hf import load_checkpoint_weights

    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                           max_position_embeddings=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    tensors = {n: p for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    load_checkpoint_weights(model, str(tmp_path))
    for name, p in model.named_parameters():
        assert p is tensors[name] and torch.equal(p, expected[name]), name


@pytest.mark.slow
def test_regular_install_works_from_any_directory(tmp_path):
    """``pip install .`` (not editable) into a fresh environment: the shipped configs and tokenizer are package
    data, found from another working directory."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(REPO)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import lowrank_opt, lowrank_opt.resources as r; from lowrank_opt.data import load_tokenizer; "
            "print(lowrank_opt.__file__); print(r.configs_dir()); print(len(load_tokenizer(None)))")
    probe = subprocess.run([str(python), "-c", code], cwd=elsewhere, capture_output=True, text=True, env=env,
                           timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    module_file, configs, vocab = probe.stdout.split()
    assert module_file.startswith(str(venv)) and configs.startswith(str(venv)) and vocab == "4096"
    memory = subprocess.run([str(venv / "bin" / "lowrank-opt"), "memory", "llama_7b", "--optim", "apollo_mini",
                             "--layerwise", "--json"], cwd=elsewhere, capture_output=True, text=True, env=env,
                            timeout=300)
    assert memory.returncode == 0, memory.stderr[-3000:]
    assert '"total"' in memory.stdout and "llama_7b" in memory.stdout
