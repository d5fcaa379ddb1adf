"""DeepSpeed worker for tests/test_deepspeed.py (not a test module itself).

Run under ``DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/ds_worker.py OUT.json [CASE ...]``.
Every case trains the same small model (a 4-D conv, a tall, a wide and a square matrix, all with odd sizes so
that shard boundaries cut rows, plus an AdamW head and biases) for STEPS steps under DeepSpeed with a plain
:class:`Apollo` handed to ``deepspeed.initialize``, next to an unsharded :class:`Apollo` fed the same averaged
gradients in the same process,
and rank 0 writes what it measured to OUT.json: max |param diff|, the optimizer's all-reduced bytes next to
the gradient bytes, and state checks. One launch runs every case (each launch costs ~10 s of start-up).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import Experts  # noqa: E402

STEPS = 20
MICRO_BATCH = 4
TARGETS = ["conv", "tall", "wide", "square"]
LR, WEIGHT_DECAY = 1e-2, 0.01


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)  # 5 x 27 (4-D): wide, left projection, 135 elements
        self.tall = nn.Linear(5, 19)  # 19 x 5: right projection, 95 elements, shard boundary inside row 9
        self.wide = nn.Linear(19, 6)  # 6 x 19: left projection, 114 elements
        self.square = nn.Linear(6, 6)  # 6 x 6: right projection, boundary on a row edge
        self.head = nn.Linear(6, 3)  # AdamW (not a target)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        h = torch.tanh(self.tall(h))
        h = torch.tanh(self.wide(h))
        h = torch.tanh(self.square(h))
        return self.head(h)


class MoENet(nn.Module):
    """A router (dense), fused experts (each expert low-rank on its own) and an odd-sized input matrix."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(48, 6)  # 6 x 48: left projection
        self.gate = nn.Linear(6, 3)  # the router: dense
        self.experts = Experts()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1)))
        return self.head(self.experts(h, torch.softmax(self.gate(h), dim=-1)))


MOE_TARGETS = ["inp", "experts"]


def batch(step: int, world_size: int):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world_size * MICRO_BATCH, 3, 4, 4, generator=gen)
    y = torch.randn(world_size * MICRO_BATCH, 3, generator=gen)
    return x, y


def ds_config(stage: int, offload: bool = False, bf16: bool = False) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; the reference does not clip
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        cfg["zero_force_ds_cpu_optimizer"] = False
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def full_fp32(engine, stage: int) -> list[torch.Tensor]:
    """The fp32 (master) value of every model parameter, in model order (a collective at stages 1-3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = list(engine.module.parameters())
    if stage == 0:
        wrapper = engine.optimizer
        if hasattr(wrapper, "fp32_groups") and hasattr(wrapper, "fp16_groups"):  # bf16/fp16: fp32 copies
            master = {id(lp): hp for lps, hps in zip(wrapper.fp16_groups, wrapper.fp32_groups)
                      for lp, hp in zip(lps, hps)}
            return [master[id(p)].detach().clone() for p in params]
        return [p.detach().float().clone() for p in params]
    return [safe_get_full_fp32_param(p).detach().clone() for p in params]


def case_equal(name: str, stage: int, scale_type: str, offload: bool = False, groups: str = "concat",
               moe: bool = False) -> dict:
    """Plain Apollo handed to ``deepspeed.initialize`` vs unsharded Apollo, fp32, STEPS steps. ``groups``:
    "concat" (lowrank_param_groups: all matrices in one group, as users build it) or "per_matrix"
    (deepspeed_param_groups). ``moe``: the model with fused experts (their shards cut inside experts)."""
    import deepspeed
    import torch.distributed as dist

    from lowrank_opt import Apollo, lowrank_param_groups
    from lowrank_opt.integrations.deepspeed import check_partition_layout, deepspeed_param_groups

    rank, world = dist.get_rank(), dist.get_world_size()
    options = dict(rank=3, scale_type=scale_type, update_proj_gap=7)
    if scale_type == "tensor":
        options.update(rank=2, scale=4.0)
    net, targets = (MoENet, MOE_TARGETS) if moe else (Net, TARGETS)
    torch.manual_seed(1234)
    model = net()
    ref_model = copy.deepcopy(model)
    ref_opt = Apollo(lowrank_param_groups(ref_model, targets, **options), lr=LR, weight_decay=WEIGHT_DECAY)
    param_groups = lowrank_param_groups(model, targets, **options)
    if groups == "per_matrix":
        param_groups = deepspeed_param_groups(param_groups)
    opt = Apollo(param_groups, lr=LR, weight_decay=WEIGHT_DECAY)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, offload))
    checked = check_partition_layout(engine)
    ref_params = list(ref_model.parameters())
    losses = []
    for step in range(STEPS):
        x, y = batch(step, world)
        sl = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
        loss = F.mse_loss(engine(x[sl]), y[sl])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        # The reference: each rank's micro-batch separately, averaged as DeepSpeed averages them.
        grads = []
        for k in range(world):
            ref_model.zero_grad(set_to_none=True)
            part = slice(k * MICRO_BATCH, (k + 1) * MICRO_BATCH)
            F.mse_loss(ref_model(x[part]), y[part]).backward()
            grads.append([p.grad.clone() for p in ref_params])
        for i, p in enumerate(ref_params):
            total = grads[0][i].clone()
            for g in grads[1:]:
                total += g[i]
            p.grad = total / world
        ref_opt.step()
    got = full_fp32(engine, stage)
    diffs = [float((a - b.detach()).abs().max()) for a, b in zip(got, ref_params)]
    torch.manual_seed(1234)
    moved = max(float((b.detach() - a).abs().max()) for a, b in zip(net().parameters(), ref_params))
    grad_bytes = sum(p.numel() * 4 for p in ref_params)
    lowrank_grad_bytes = sum(p.numel() * 4 for n, p in ref_model.named_parameters()
                             if p.ndim >= 2 and n.split(".")[0] in targets)
    # Every matrix kept low-rank moments (never AdamW's full-size ones) wherever DeepSpeed put its elements.
    shard_states = [s for state in opt.state.values() for s in state.get("shard_state", {}).values()]
    moment_shapes = sorted({tuple(s["exp_avg"].shape) for s in shard_states if s["exp_avg"].ndim >= 2})
    return dict(
        max_diff=max(diffs), diffs=diffs, moved=moved, losses=losses,
        comm_bytes_last_step=opt.comm_bytes_last_step, grad_bytes=grad_bytes, lowrank_grad_bytes=lowrank_grad_bytes,
        flat_pieces=len(shard_states), moment_shapes=[list(m) for m in moment_shapes], layout_checked=checked,
        init_steps_skipped=opt.init_steps_skipped,
    )


def case_bf16_stage0(name: str) -> dict:
    """bf16 at stage 0: DeepSpeed's FP16_UnfusedOptimizer calls step() once with zero gradients at set-up."""
    import deepspeed

    from lowrank_opt import Apollo, lowrank_param_groups
    from lowrank_opt.integrations.deepspeed import initialize

    out = {}

    def states(opt):
        return [dict(step=s.get("step"), limiter=float(s["limiter_norm"]) if "limiter_norm" in s else None)
                for s in opt.state.values()]

    def master_drift(engine):
        """max |fp32 master - its bf16 model weight|: 0 right after set-up unless the set-up step moved it."""
        wrapper = engine.optimizer
        pairs = zip((p for g in wrapper.fp32_groups for p in g), (p for g in wrapper.fp16_groups for p in g))
        return max(float((master - lp.float()).abs().max()) for master, lp in pairs)

    options = dict(rank=3, scale_type="channel", update_proj_gap=7)
    runs = {
        # plain Apollo through deepspeed.initialize: recognises the set-up call by itself
        "plain": lambda m: (Apollo(lowrank_param_groups(m, TARGETS, **options), lr=LR, weight_decay=WEIGHT_DECAY),
                            deepspeed.initialize),
        # through our initialize()
        "wrapped": lambda m: (Apollo(lowrank_param_groups(m, TARGETS, **options), lr=LR, weight_decay=WEIGHT_DECAY),
                              initialize),
    }
    for key, build in runs.items():
        torch.manual_seed(1234)
        model = Net()
        opt, init = build(model)
        if init is deepspeed.initialize:
            engine, _, _, _ = init(model=model, optimizer=opt, config=ds_config(0, bf16=True))
        else:
            engine, _, _, _ = init(model, opt, ds_config(0, bf16=True))
        entry = dict(wrapper=type(engine.optimizer).__name__,
                     model_dtype=str(next(model.parameters()).dtype),
                     state_after_init=states(opt),
                     init_steps_skipped=getattr(opt, "init_steps_skipped", None),
                     master_drift_after_init=master_drift(engine))
        losses = []
        for step in range(6):
            x, y = batch(step, 2)
            sl = slice(engine.global_rank * MICRO_BATCH, (engine.global_rank + 1) * MICRO_BATCH)
            loss = F.mse_loss(engine(x[sl].to(torch.bfloat16)).float(), y[sl])
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        entry["state_after_6"] = states(opt)
        entry["losses"] = losses
        out[key] = entry
    return out


def case_bf16_sharded(name: str) -> dict:
    """bf16 weights with fp32 masters at stages 0-3 (and the BF16_Optimizer of stage 1 with fp32 gradient
    accumulation): the same 6 steps everywhere; masters compared with the stage-0 run (bf16 gradients are
    reduced in different orders and precisions, so this is loose) and the state step counts checked."""
    import torch.distributed as dist

    from lowrank_opt import Apollo, lowrank_param_groups
    from lowrank_opt.integrations.deepspeed import initialize

    rank = dist.get_rank()
    options = dict(rank=3, scale_type="channel", update_proj_gap=7)
    out, finals = {}, {}
    for key, stage, accum in (("stage0", 0, None), ("stage1", 1, None), ("stage1_fp32_accum", 1, "fp32"),
                              ("stage2", 2, None), ("stage3", 3, None)):
        torch.manual_seed(1234)
        model = Net()
        opt = Apollo(lowrank_param_groups(model, TARGETS, **options), lr=LR, weight_decay=WEIGHT_DECAY)
        cfg = ds_config(stage, bf16=True)
        if accum:
            cfg["data_types"] = {"grad_accum_dtype": accum}
        engine, _, _, _ = initialize(model, opt, cfg)
        losses = []
        for step in range(6):
            x, y = batch(step, 2)
            sl = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
            loss = F.mse_loss(engine(x[sl].to(torch.bfloat16)).float(), y[sl])
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        finals[key] = full_fp32(engine, stage)
        out[key] = dict(wrapper=type(engine.optimizer).__name__, losses=losses,
                        steps=sorted({s["step"] for state in opt.state.values()
                                      for s in (state["shard_state"].values() if "shard_state" in state else [state])}),
                        init_steps_skipped=opt.init_steps_skipped,
                        flat=any("shard_state" in state for state in opt.state.values()),
                        diff_vs_stage0=max(float((a - b).abs().max()) for a, b in zip(finals[key], finals["stage0"])))
    return out


def case_resume(name: str) -> dict:
    """Checkpoint resume through DeepSpeed (same world size): 10 steps, save_checkpoint, a fresh engine,
    load_checkpoint, 10 more steps == 20 steps straight."""
    import tempfile

    import torch.distributed as dist

    import deepspeed

    from lowrank_opt import Apollo, lowrank_param_groups

    rank, world = dist.get_rank(), dist.get_world_size()
    options = dict(rank=3, scale_type="channel", update_proj_gap=7)

    def make(stage):
        torch.manual_seed(1234)
        model = Net()
        opt = Apollo(lowrank_param_groups(model, TARGETS, **options), lr=LR, weight_decay=WEIGHT_DECAY)
        return deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage))[0]

    def train(engine, steps):
        for step in steps:
            x, y = batch(step, world)
            sl = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
            engine.backward(F.mse_loss(engine(x[sl]), y[sl]))
            engine.step()

    out = {}
    for stage in (1, 2, 3):
        straight = make(stage)
        train(straight, range(20))
        expected = full_fp32(straight, stage)
        first = make(stage)
        train(first, range(10))
        directory = tempfile.mkdtemp(prefix="zero_apollo_ckpt_") if rank == 0 else None
        holder = [directory]
        dist.broadcast_object_list(holder, src=0)
        first.save_checkpoint(holder[0], tag="step10")
        resumed = make(stage)
        resumed.load_checkpoint(holder[0], tag="step10")
        train(resumed, range(10, 20))
        got = full_fp32(resumed, stage)
        out[f"stage{stage}"] = max(float((a - b).abs().max()) for a, b in zip(got, expected))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(holder[0], ignore_errors=True)
    return out


def case_hf_zero3(name: str) -> dict:
    """The HF Trainer with configs/deepspeed/zero3.json: the model is built under zero.Init (parameters are
    already (0,)-shaped placeholders when the Trainer builds the optimizer)."""
    try:
        from transformers import AutoModelForCausalLM, LlamaConfig, Trainer
    except ImportError as exc:
        return {"skipped": f"transformers not available: {exc}"}
    import tempfile

    from lowrank_opt.integrations.deepspeed import check_deepspeed_config
    from lowrank_opt.integrations.hf import TrainingArguments, optimizer_cls_and_kwargs

    config_path = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero3.json"
    check_deepspeed_config(config_path)
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, optim="apollo", optim_args="rank=8,update_proj_gap=200",
            optim_target_modules="all-linear", learning_rate=1e-2, max_steps=3, per_device_train_batch_size=2,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, deepspeed=str(config_path),
            disable_tqdm=True)
        config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                             use_cache=False)
        model = AutoModelForCausalLM.from_config(config)  # under zero.Init: ZeRO-3 is on in args
        partitioned = all(p.numel() == 0 for p in model.parameters())
        ids = torch.randint(3, 250, (16, 16), generator=torch.Generator().manual_seed(0))
        data = [{"input_ids": row, "labels": row} for row in ids]
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args.lowrank_optim, model, args))
        trainer.train()
        opt = trainer.optimizer
        while hasattr(opt, "optimizer"):
            opt = opt.optimizer
        return dict(optimizer=type(opt).__name__, partitioned_at_build=partitioned,
                    flat=any("shard_state" in state for state in opt.state.values()),
                    comm_bytes_last_step=getattr(opt, "comm_bytes_last_step", None),
                    losses=[e["loss"] for e in trainer.state.log_history if "loss" in e])


CASES = {
    "stage0_channel": lambda: case_equal("stage0_channel", 0, "channel"),
    "stage1_channel": lambda: case_equal("stage1_channel", 1, "channel"),
    "stage1_tensor": lambda: case_equal("stage1_tensor", 1, "tensor"),
    "stage2_channel": lambda: case_equal("stage2_channel", 2, "channel"),
    "stage2_tensor": lambda: case_equal("stage2_tensor", 2, "tensor"),
    "stage3_channel": lambda: case_equal("stage3_channel", 3, "channel"),
    "stage3_tensor": lambda: case_equal("stage3_tensor", 3, "tensor"),
    "stage2_offload": lambda: case_equal("stage2_offload", 2, "channel", offload=True),
    "stage2_per_matrix": lambda: case_equal("stage2_per_matrix", 2, "channel", groups="per_matrix"),
    "stage3_per_matrix": lambda: case_equal("stage3_per_matrix", 3, "tensor", groups="per_matrix"),
    "stage3_offload": lambda: case_equal("stage3_offload", 3, "tensor", offload=True),
    "moe_stage1": lambda: case_equal("moe_stage1", 1, "channel", moe=True),
    "moe_stage2": lambda: case_equal("moe_stage2", 2, "tensor", moe=True),
    "moe_stage3": lambda: case_equal("moe_stage3", 3, "channel", moe=True),
    "bf16_stage0": lambda: case_bf16_stage0("bf16_stage0"),
    "bf16_sharded": lambda: case_bf16_sharded("bf16_sharded"),
    "resume": lambda: case_resume("resume"),
    "hf_zero3": lambda: case_hf_zero3("hf_zero3"),  # last: the HF Trainer leaves global state behind
}


def main() -> None:
    out_path = Path(sys.argv[1])
    names = sys.argv[2:] or list(CASES)
    torch.set_num_threads(1)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch as ds_comm_torch

    # The shared-memory kernel serves DeepSpeed's inference all-reduce only; skip its JIT build (~45 s).
    ds_comm_torch.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist

    results = {}
    for name in names:
        start = time.time()
        try:
            results[name] = CASES[name]()
        except Exception:  # reported per case; the other rank fails the same way or at its next collective
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = time.time() - start
        dist.barrier()
    if dist.get_rank() == 0:
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out_path)  # complete or absent
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: background comm threads sometimes abort it ("terminate called ...")


if __name__ == "__main__":
    main()
