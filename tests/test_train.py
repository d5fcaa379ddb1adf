"""train.py end to end on the tiny config (CPU): optimizers by our and HF's names, fine-tuning with
response-only loss, exact resume, the golden loss of the default run, and bad input failing early."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402

GOLDEN = REPO / "tests" / "golden" / "tiny_default_loss.json"
# A short run of the tiny config: small blocks and batches so each run takes seconds.
FAST = ["--max_steps", "12", "--block_size", "64", "--per_device_train_batch_size", "8", "--logging_steps", "1",
        "--eval_strategy", "no", "--max_train_samples", "400", "--disable_tqdm", "true", "--warmup_steps", "0"]


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _run(tmp_path, *extra, name="run"):
    return train.main([*FAST, "--output_dir", str(tmp_path / name), *extra])


@pytest.mark.slow
@pytest.mark.parametrize(
    "optim,optim_args",
    [
        ("apollo", "rank=16,scale=1,update_proj_gap=200,scale_type=channel"),
        ("apollo_mini", ""),
        ("apollo_layerwise", "rank=16"),
        ("adamw_torch", ""),
        ("apollo_adamw", "rank=16,proj=random,scale_type=channel,update_proj_gap=200,scale=1,proj_type=std"),
        ("galore_adamw", "rank=16,update_proj_gap=200,scale=0.25,proj_type=std"),
    ],
)
def test_optimizers_train_with_falling_loss(tmp_path, optim, optim_args):
    lr = "1e-2"
    trainer, _ = _run(tmp_path, "--optim", optim, "--optim_args", optim_args, "--learning_rate", lr,
                      "--optim_target_modules", "all-linear" if "galore" not in optim else r".*(self_attn|mlp).*")
    losses = _losses(trainer)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    # The optimizer the Trainer stepped is the one the name stands for (ours or HF's), not a fallback.
    built = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
    expected = {"apollo": "Apollo", "apollo_mini": "Apollo", "apollo_layerwise": "Apollo", "adamw_torch": "AdamW",
                "apollo_adamw": "AdamW", "galore_adamw": "AdamW"}[optim]
    assert type(built).__name__ == expected, type(built)
    assert type(built).__module__.startswith({"apollo_adamw": "apollo_torch", "galore_adamw": "galore_torch",
                                               "adamw_torch": "torch.optim"}.get(optim, "lowrank_opt"))
    if optim == "apollo_layerwise":
        assert built.layerwise and all(p.grad is None for p in trainer.model.parameters())


@pytest.mark.slow
def test_pure_bf16_training_keeps_bf16_weights(tmp_path):
    trainer, _ = _run(tmp_path, "--optim", "apollo", "--optim_args", "rank=8", "--learning_rate", "1e-2",
                      "--model_dtype", "bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
    assert trainer.optimizer.param_groups[-1]["stochastic_rounding"] is True
    losses = _losses(trainer)
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses


@pytest.mark.slow
def test_memory_report_measures_optimizer_state_equal_to_estimate(tmp_path, capsys):
    from lowrank_opt.memory import MemoryCallback, optimizer_state_bytes

    trainer, _ = _run(tmp_path, "--optim", "apollo", "--optim_args", "rank=8", "--memory_report", "true")
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, MemoryCallback))
    assert callback.estimate is not None
    assert optimizer_state_bytes(trainer.optimizer) == callback.estimate.optimizer_states
    assert "optimizer" in capsys.readouterr().out.lower()


@pytest.mark.slow
def test_finetune_saved_model_on_prompt_response_jsonl(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowrank_opt.data import build_datasets, load_tokenizer

    tokenizer = load_tokenizer(None)
    config = AutoConfig.from_pretrained(REPO / "configs" / "llama_tiny.json", vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "sft.jsonl"
    records = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(60)]
    data.write_text("\n".join(json.dumps(r) for r in records))

    trainer, _ = _run(tmp_path, "--model_name_or_path", str(model_dir), "--task", "sft",
                      "--data_files", str(data), "--optim", "apollo", "--optim_args", "rank=8", "--learning_rate", "1e-2",
                      "--eval_fraction", "0")
    losses = _losses(trainer)
    assert losses[-1] < losses[0]
    # Prompt tokens carry no loss: labels are -100 exactly on the prompt part of each example.
    train_ds, _ = build_datasets(trainer.processing_class, data_files=[str(data)], task="sft", block_size=64,
                                 eval_fraction=0.0)
    example = train_ds[0]
    labelled = [t for t, l in zip(example["input_ids"], example["labels"]) if l != -100]
    assert example["labels"][0] == -100
    assert "It is 0." in trainer.processing_class.decode(labelled)
    assert "What is" not in trainer.processing_class.decode(labelled)
    # And the Trainer's loss on a batch is the cross-entropy over the labelled tokens only.
    model = trainer.model.eval()
    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor([example["labels"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
        target = labels[0, 1:]
        keep = target != -100
        manual = torch.nn.functional.cross_entropy(logits[keep], target[keep])
        assert model(input_ids=ids, labels=labels).loss.item() == pytest.approx(manual.item(), rel=1e-5)


@pytest.mark.slow
def test_resume_equals_straight_run(tmp_path):
    common = ["--optim", "apollo", "--optim_args", "rank=8,update_proj_gap=4", "--max_steps", "8",
              "--save_strategy", "steps", "--save_steps", "4", "--seed", "3", "--data_seed", "3"]
    straight, _ = _run(tmp_path, *common, name="straight")
    resumed, _ = _run(tmp_path, *common, "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoint-4"),
                      name="resumed")
    for (n, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n
    # The resumed run's history holds the checkpoint's 4 losses and its own 4: all equal to the straight run's.
    assert len(_losses(resumed)) == 8 and _losses(straight) == _losses(resumed)


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["apollo_mini", "apollo_layerwise"])
def test_a_run_resolves_its_optimizer_once_and_builds_it_once(tmp_path, monkeypatch, optim):
    """One resolution of the name (registry.resolve, when the arguments are parsed) and one optimizer, built with
    the Trainer and trained, in a run and in the run resuming from its checkpoint."""
    import functools

    from lowrank_opt import registry
    from lowrank_opt.apollo import Apollo

    resolved, built = [], []
    resolved_init, apollo_init = registry.ResolvedOptimizer.__init__, Apollo.__init__
    monkeypatch.setattr(registry.ResolvedOptimizer, "__init__", functools.wraps(resolved_init)(
        lambda self, *a, **k: (resolved.append(a[0]), resolved_init(self, *a, **k))[1]))
    monkeypatch.setattr(Apollo, "__init__", functools.wraps(apollo_init)(
        lambda self, *a, **k: (built.append(self), apollo_init(self, *a, **k))[1]))
    common = ["--optim", optim, "--optim_args", "rank=4", "--save_strategy", "steps", "--save_steps", "2"]
    resume = ["--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-2")]
    for extra in (["--max_steps", "2"], ["--max_steps", "3", *resume]):
        resolved.clear()
        built.clear()
        trainer, _ = _run(tmp_path, *common, *extra, name="run" if len(extra) == 2 else "resumed")
        assert resolved == [optim] and len(built) == 1
        assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is built[0]


@pytest.mark.slow
def test_default_run_matches_golden_loss(tmp_path):
    trainer, metrics = train.main(["--output_dir", str(tmp_path / "default"), "--disable_tqdm", "true"])
    logged = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    golden = json.loads(GOLDEN.read_text())
    assert sorted(int(k) for k in golden["loss"]) == sorted(logged)
    for step, value in golden["loss"].items():
        assert logged[int(step)] == pytest.approx(value, rel=0.02, abs=0.02), step
    assert metrics["eval_loss"] == pytest.approx(golden["eval_loss"], rel=0.02)
    assert logged[max(logged)] < 0.7 * logged[min(logged)]


@pytest.mark.parametrize(
    "extra,error,message",
    [
        (["--optim", "adafactorr"], ValueError, "unknown --optim 'adafactorr'. lowrank-opt names: .*apollo.*Hugging Face names: .*adamw_torch"),
        (["--optim", "apollo", "--optim_args", "rnak=4"], ValueError, r"unknown option\(s\) 'rnak'.*valid: .*rank"),
        (["--fsdp", "full_shard"], ValueError, "--fsdp on CPU"),
        (["--optim", "apollo", "--optim_args", "rank=0"], ValueError, "rank must be >= 1, got 0"),
        (["--data_files", "/nonexistent/corpus.txt"], FileNotFoundError, "/nonexistent/corpus.txt"),
        (["--optim", "apollo", "--optim_target_modules", "q_proj_typo"], ValueError, "matched no weight"),
        (["--optim", "apollo_layerwise", "--gradient_accumulation_steps", "2"], ValueError, "cannot accumulate gradients"),
    ],
)
def test_bad_input_fails_before_writing(tmp_path, extra, error, message):
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        train.main([*FAST, "--output_dir", str(out), *extra])
    assert not out.exists()
