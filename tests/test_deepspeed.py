"""lowrank-opt under DeepSpeed ZeRO 0-3: the training of the unsharded Apollo.

* in one process: the param-group split, the config checks (the offload trap), optimizers refused at stages
  1-3, the HF glue;
* one ``torchrun --nproc_per_node 2`` launch of tests/ds_worker.py with ``DS_ACCELERATOR=cpu`` (gloo) that
  trains a small model under real DeepSpeed at stages 0-3 with a plain ``Apollo`` handed to
  ``deepspeed.initialize`` (fp32, channel and tensor, concatenated and per-matrix groups, CPU offload, bf16,
  checkpoint resume) and the HF Trainer at ZeRO-3 with zero.Init, next to an unsharded Apollo.

The sharded math itself (world sizes 1-5, every layout) is held equal to the unsharded one without DeepSpeed,
in tests/test_sharding.py. deepspeed is a test dependency: a missing one fails here rather than skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (a test dependency: fail, do not skip, when it is missing)
import pytest
import torch
from torch import nn

from lowrank_opt import AdamP, Apollo, NormGrowthCap, lowrank_param_groups
from lowrank_opt.integrations.deepspeed import (
    check_deepspeed_config,
    deepspeed_param_groups,
    initialize,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "deepspeed"
TOL = 1e-6


# ----------------------------------------------------------------------------------------------------------
# Param groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 6)
        self.down = nn.Linear(6, 3)
        self.norm = nn.LayerNorm(3)
        self.out = nn.Linear(3, 2)


def test_param_groups_one_matrix_each_order_and_names():
    model = Tiny()
    model.out.bias.requires_grad_(False)
    groups = deepspeed_param_groups(model, ["up", "down"], rank=2, scale_type="tensor")
    summary = [([n for n, _ in g["params"]], g["rank"]) for g in groups]
    assert summary == [
        (["up.bias", "down.bias", "norm.weight", "norm.bias", "out.weight"], None),  # AdamW group kept whole
        (["up.weight"], 2), (["down.weight"], 2),  # each matrix alone; frozen out.bias dropped
    ]
    assert all(g["scale_type"] == "tensor" for g in groups[1:])
    # Explicit groups: matrices split out, runs of 1-D parameters kept together, global order kept (so
    # unnamed parameters keep their projection identities).
    plain = [{"params": [model.up.weight, model.up.bias, model.norm.weight, model.down.weight], "scale": 2.0},
             {"params": [model.out.weight], "rank": None}]
    split = deepspeed_param_groups(plain)
    assert [g["params"] for g in split] == [[model.up.weight], [model.up.bias, model.norm.weight],
                                            [model.down.weight], [model.out.weight]]
    assert [g.get("scale") for g in split] == [2.0, 2.0, 2.0, None]
    opt = Apollo(split)
    ref = Apollo(plain)
    for p in (model.up.weight, model.down.weight):
        assert torch.equal(opt.projection_matrix(p), ref.projection_matrix(p))


def test_param_groups_see_zero_init_shapes():
    w = nn.Parameter(torch.empty(0))
    w.ds_shape = torch.Size([5, 7])  # what zero.Init leaves
    b = nn.Parameter(torch.empty(0))
    b.ds_shape = torch.Size([5])
    groups = deepspeed_param_groups([{"params": [("w", w), ("b", b)], "rank": 3}])
    assert [[n for n, _ in g["params"]] for g in groups] == [["w"], ["b"]]
    Apollo(groups)  # the rank is resolved against the real shape
    with pytest.raises(ValueError, match="rank must be >= 1"):
        Apollo([{"params": [("w", w)], "rank": 0.01}])


# ----------------------------------------------------------------------------------------------------------
# Config checks: the offload trap


def test_offload_trap_raises_with_the_fix_in_the_message(tmp_path):
    trap = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ValueError, match='"zero_force_ds_cpu_optimizer": false') as err:
        check_deepspeed_config(trap)
    assert "DeepSpeedCPUAdam" in str(err.value)
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer"):
        check_deepspeed_config({**trap, "zero_force_ds_cpu_optimizer": True})
    path = tmp_path / "trap.json"
    path.write_text(json.dumps(trap))
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer"):
        check_deepspeed_config(str(path))
    # Our initialize() refuses it before DeepSpeed is touched.
    model = Tiny()
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer"):
        initialize(model, Apollo(lowrank_param_groups(model)), trap)
    fixed = check_deepspeed_config({**trap, "zero_force_ds_cpu_optimizer": False})
    assert fixed["zero_force_ds_cpu_optimizer"] is False
    check_deepspeed_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}})


def test_other_config_refusals():
    with pytest.raises(ValueError, match="optimizer\" section"):
        check_deepspeed_config({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match="nvme"):
        check_deepspeed_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}},
                                "zero_force_ds_cpu_optimizer": False})
    model = Tiny()  # optimizers that need whole tensors are refused at stages 1-3, before DeepSpeed is touched
    for opt in (AdamP(model.parameters()), NormGrowthCap(Apollo(model.parameters()))):
        with pytest.raises(ValueError, match="ZeRO stage 0"):
            initialize(model, opt, {"zero_optimization": {"stage": 2}})


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero2-offload", "zero3-offload"])
def test_shipped_configs(name):
    cfg = check_deepspeed_config(CONFIGS / f"{name}.json")
    assert cfg["zero_optimization"]["stage"] == int(name[4])
    assert cfg["zero_allow_untested_optimizer"] is True
    assert cfg["train_micro_batch_size_per_gpu"] == "auto"
    if "offload" in name:
        assert cfg["zero_force_ds_cpu_optimizer"] is False
        assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


# ----------------------------------------------------------------------------------------------------------
# The HF glue


def test_optimizer_cls_and_kwargs_builds_apollo_and_refuses_what_zero_cannot_run():
    from types import SimpleNamespace

    from lowrank_opt.integrations.hf import optimizer_cls_and_kwargs as hf_optimizer_cls_and_kwargs

    args = SimpleNamespace(optim_args="rank=2", learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999,
                           adam_epsilon=1e-6, weight_decay=0.0, optim_target_modules=["up", "down"],
                           deepspeed=str(CONFIGS / "zero2.json"))
    cls, kwargs = hf_optimizer_cls_and_kwargs("apollo", Tiny(), args)
    assert cls is Apollo
    cls(**kwargs)
    for name, match in (("apollo_capped", "NormGrowthCap"), ("apollo_layerwise", "layer-wise")):
        with pytest.raises(ValueError, match=match):
            hf_optimizer_cls_and_kwargs(name, Tiny(), args)
    args.optim_args, args.optim_target_modules = None, None
    with pytest.raises(ValueError, match="whole tensors"):
        hf_optimizer_cls_and_kwargs("adamp", Tiny(), args)
    args.deepspeed = str(CONFIGS / "zero0.json")  # stage 0 hands over whole tensors: fine
    assert hf_optimizer_cls_and_kwargs("adamp", Tiny(), args)[0] is AdamP


# ----------------------------------------------------------------------------------------------------------
# Real DeepSpeed: one torchrun launch, two ranks, gloo on CPU


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "results.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ds_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def _case(ds_run, name):
    result = ds_run[name]
    assert "error" not in result, result.get("error")
    return result


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["stage1_channel", "stage1_tensor", "stage2_channel", "stage2_tensor",
                                  "stage3_channel", "stage3_tensor", "stage2_offload", "stage3_offload",
                                  "stage2_per_matrix", "stage3_per_matrix", "moe_stage1", "moe_stage2", "moe_stage3"])
def test_deepspeed_zero_equals_unsharded(ds_run, name):
    r = _case(ds_run, name)
    assert r["max_diff"] < TOL, r["diffs"]
    assert r["moved"] > 0.1  # the parameters really trained
    # Plain Apollo recognised DeepSpeed's flat shards: every matrix kept low-rank moments (rank 3 or 2), no
    # flat AdamW moments; and DeepSpeed's own bookkeeping agrees with Apollo's layout.
    assert r["flat_pieces"] >= 1 and r["layout_checked"] >= 1
    assert r["moment_shapes"] and all(min(shape) <= 3 for shape in r["moment_shapes"]), r["moment_shapes"]
    assert 0 < r["comm_bytes_last_step"] < r["lowrank_grad_bytes"] < r["grad_bytes"]


@pytest.mark.distributed
def test_deepspeed_stage0_is_apollo(ds_run):
    r = _case(ds_run, "stage0_channel")
    assert r["max_diff"] == 0.0
    assert r["flat_pieces"] == 0 and r["comm_bytes_last_step"] == 0


@pytest.mark.distributed
def test_deepspeed_bf16_stage0_setup_step(ds_run):
    r = _case(ds_run, "bf16_stage0")
    for entry in (r["plain"], r["wrapped"]):
        assert entry["wrapper"] == "FP16_UnfusedOptimizer" and entry["model_dtype"] == "torch.bfloat16"
        assert entry["state_after_init"] == [] and entry["init_steps_skipped"] == 1
        assert entry["master_drift_after_init"] == 0.0  # not even weight decay
        assert {s["step"] for s in entry["state_after_6"]} == {6}
        assert min(s["limiter"] for s in entry["state_after_6"] if s["limiter"] is not None) > 1e-3
    assert r["plain"]["losses"] == r["wrapped"]["losses"]


@pytest.mark.distributed
def test_deepspeed_bf16_sharded_match_stage0(ds_run):
    r = _case(ds_run, "bf16_sharded")
    assert r["stage1_fp32_accum"]["wrapper"] == "BF16_Optimizer"
    assert r["stage0"]["init_steps_skipped"] == 1 and not r["stage0"]["flat"]
    for key in ("stage1", "stage1_fp32_accum", "stage2", "stage3"):
        assert r[key]["steps"] == [6] and r[key]["flat"]
        assert r[key]["diff_vs_stage0"] < TOL


@pytest.mark.distributed
def test_deepspeed_checkpoint_resume_is_exact(ds_run):
    r = _case(ds_run, "resume")
    assert r["stage1"] == r["stage2"] == r["stage3"] == 0.0


@pytest.mark.distributed
def test_hf_trainer_zero3_zero_init(ds_run):
    r = _case(ds_run, "hf_zero3")
    assert r["optimizer"] == "Apollo" and r["partitioned_at_build"] and r["flat"]
    assert all(map(lambda x: x == x, r["losses"]))
