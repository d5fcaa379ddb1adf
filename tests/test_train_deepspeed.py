"""train.py --deepspeed on 2 CPU ranks (gloo): ZeRO-2 and ZeRO-3 train the tiny config with falling loss,
resuming from a checkpoint reproduces the uninterrupted run's losses, and each rank resolves the optimizer
name once and builds the optimizer once (the one DeepSpeed trains)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--max_steps", "8", "--block_size", "64", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--eval_strategy", "no", "--max_train_samples", "200", "--disable_tqdm", "true", "--warmup_steps", "0",
        "--optim", "apollo", "--optim_args", "rank=8", "--save_strategy", "steps", "--save_steps", "4"]


# train.py, counting on each rank the names resolved (ResolvedOptimizer made) and the Apollo optimizers built.
COUNTING = textwrap.dedent("""
    import functools, os, sys
    sys.path.insert(0, {repo!r})
    from lowrank_opt import registry
    from lowrank_opt.apollo import Apollo
    import train

    counts = {{}}
    for cls in (registry.ResolvedOptimizer, Apollo):
        def wrapped(self, *args, _init=cls.__init__, _name=cls.__name__, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            _init(self, *args, **kwargs)
        cls.__init__ = functools.wraps(cls.__init__)(wrapped)
    train.main(sys.argv[1:])
    with open(os.path.join({out!r}, "counts-rank" + os.environ["RANK"]), "w") as f:  # stdout lines interleave
        f.write(f"{{counts.get('ResolvedOptimizer', 0)}} {{counts.get('Apollo', 0)}}")
""")


def _torchrun(out, *extra):
    script = out.parent / f"{out.name}_counting.py"
    out.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(COUNTING.format(repo=str(REPO), out=str(out.parent / out.name)))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *ARGS,
           "--output_dir", str(out), *extra]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    counts = [(out / f"counts-rank{rank}").read_text() for rank in (0, 1)]
    assert counts == ["1 1", "1 1"], counts  # per rank: one resolution, one optimizer
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_stage_trains_and_resumes(tmp_path, stage):
    config = str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")
    straight = _torchrun(tmp_path / "straight", "--deepspeed", config)
    assert len(straight) == 8 and sum(straight[-2:]) < 0.9 * sum(straight[:2]), straight
    resumed = _torchrun(tmp_path / "resumed", "--deepspeed", config,
                        "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoint-4"))
    assert resumed == pytest.approx(straight, rel=1e-6, abs=1e-6)


def test_offload_config_that_would_swap_the_optimizer_fails_before_training(tmp_path):
    config = tmp_path / "offload.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    }))
    out = tmp_path / "out"
    sys.path.insert(0, str(REPO))
    import train

    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer"):
        train.main([*ARGS, "--output_dir", str(out), "--deepspeed", str(config)])
    assert not out.exists()
