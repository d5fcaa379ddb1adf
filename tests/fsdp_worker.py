"""FSDP2 worker for tests/test_fsdp.py (not a test module itself).

Run under ``torchrun --standalone --nproc_per_node N tests/fsdp_worker.py OUT.json [CASE ...]`` (gloo, CPU).
Every case trains a small model sharded with ``torch.distributed.fsdp.fully_shard`` (per block and at the
root) with a plain :class:`Apollo`, next to an unsharded :class:`Apollo` fed the very gradients FSDP produced
(gathered with ``full_tensor()``), so the two optimizers see the same numbers and must agree. Rank 0 writes
what it measured to OUT.json.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
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


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.tall = nn.Linear(6, 19)  # 19 x 6: right projection, rows split unevenly
        self.wide = nn.Linear(19, 5)  # 5 x 19: left projection (r x n partial sums cross ranks)
        self.square = nn.Linear(5, 6)  # 6 x 5: right

    def forward(self, h):
        return torch.tanh(self.square(torch.tanh(self.wide(torch.tanh(self.tall(h))))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)  # 6 x 27 (4-D): left projection
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(6, 3)  # AdamW (not a target)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class MoENet(nn.Module):
    """A router (dense) and fused experts, which FSDP2 shards by whole experts (3 -> 2 + 1)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(75, 6)
        self.gate = nn.Linear(6, 3)
        self.blocks = nn.ModuleList([Experts()])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1)))
        return self.head(self.blocks[0](h, torch.softmax(self.gate(h), dim=-1)))


MOE_TARGETS = ["inp", "blocks"]


def batch(step: int, world_size: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world_size * MICRO_BATCH, 3, 5, 5, generator=gen)
    y = torch.randn(world_size * MICRO_BATCH, 3, generator=gen)
    return x.to(dtype), y


def shard(model: nn.Module, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def options_for(scale_type: str) -> dict:
    options = dict(rank=3, scale_type=scale_type, update_proj_gap=7)
    if scale_type == "tensor":
        options.update(rank=2, scale=4.0)
    return options


def local_batch(step: int, dtype=torch.float32):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = batch(step, world, dtype)
    part = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
    return x[part], y[part]


def train_step(model, opt, step, dtype=torch.float32):
    x, y = local_batch(step, dtype)
    loss = F.mse_loss(model(x).float(), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    p = p.detach()
    return p.full_tensor() if isinstance(p, DTensor) else p


def case_equal(scale_type: str, mixed_precision: bool = False, moe: bool = False) -> dict:
    """Plain Apollo on a fully_shard model == unsharded Apollo fed the same (gathered) gradients."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    from lowrank_opt import Apollo, lowrank_param_groups

    options = options_for(scale_type)
    net, targets = (MoENet, MOE_TARGETS) if moe else (Net, TARGETS)
    torch.manual_seed(1234)
    model = net()
    ref_model = copy.deepcopy(model)
    ref_opt = Apollo(lowrank_param_groups(ref_model, targets, **options), lr=LR, weight_decay=WEIGHT_DECAY)
    kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} \
        if mixed_precision else {}
    shard(model, **kwargs)
    opt = Apollo(lowrank_param_groups(model, targets, **options), lr=LR, weight_decay=WEIGHT_DECAY)
    ref_params = dict(ref_model.named_parameters())
    losses = []
    for step in range(STEPS):
        x, y = local_batch(step)
        loss = F.mse_loss(model(x).float(), y)
        loss.backward()
        for name, p in model.named_parameters():
            ref_params[name].grad = full(p.grad).detach().clone()
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    diffs = {name: float((full(p).detach() - ref_params[name].detach()).abs().max())
             for name, p in model.named_parameters()}
    torch.manual_seed(1234)
    moved = max(float((ref_params[n].detach() - p).abs().max()) for n, p in net().named_parameters())
    kinds = {}
    for name, p in model.named_parameters():
        state = opt.state[p]
        kinds[name] = dict(local_rows=int(p.to_local().shape[0]) if p.ndim else 0,
                           exp_avg=list(state["exp_avg"].shape),
                           exp_avg_dtensor=isinstance(state["exp_avg"], DTensor),
                           limiter=list(state["limiter_norm"].shape) if "limiter_norm" in state else None,
                           param_dtype=str(p.dtype))
    return dict(max_diff=max(diffs.values()), diffs=diffs, moved=moved, losses=losses, states=kinds,
                comm_bytes_last_step=opt.comm_bytes_last_step,
                grad_bytes=sum(p.numel() * 4 for p in ref_params.values()))


def case_accelerate_swap() -> dict:
    """Apollo built on the unsharded model, then accelerate's FSDP2 preparation: the entries of param_groups
    become placeholders carrying the old data_ptr, the model is sharded, and accelerate's own
    fsdp2_switch_optimizer_parameters puts the sharded parameters in. Must equal Apollo built on the
    sharded model."""
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    from lowrank_opt import Apollo, lowrank_param_groups

    options = options_for("channel")
    torch.manual_seed(1234)
    base = Net()
    results = {}
    for way in ("after", "swapped"):
        model = copy.deepcopy(base)
        if way == "after":
            shard(model)
            opt = Apollo(lowrank_param_groups(model, TARGETS, **options), lr=LR, weight_decay=WEIGHT_DECAY)
        else:
            opt = Apollo(lowrank_param_groups(model, TARGETS, **options), lr=LR, weight_decay=WEIGHT_DECAY)
            old = {name: p.data_ptr() for name, p in model.named_parameters()}
            for group in opt.param_groups:  # what Accelerator._prepare_fsdp2 does before fully_shard
                for i, p in enumerate(group["params"]):
                    placeholder = torch.empty(1, dtype=p.dtype, device=p.device)
                    placeholder.data_ptr = p.data_ptr()
                    group["params"][i] = placeholder
            shard(model)
            mapping = {old[name]: p for name, p in model.named_parameters()}
            fsdp2_switch_optimizer_parameters(opt, mapping)
        for step in range(STEPS):
            train_step(model, opt, step)
            opt.zero_grad(set_to_none=True)
        results[way] = {name: full(p).detach().clone() for name, p in model.named_parameters()}
        results[way + "_opt"] = opt
    diff = max(float((results["after"][n] - results["swapped"][n]).abs().max()) for n in results["after"])
    return dict(max_diff=diff, steps=sorted({s["step"] for s in results["swapped_opt"].state.values()}))


def case_dcp_resume(moe: bool = False) -> dict:
    """torch.distributed.checkpoint: save model and optimizer at step 10, a fresh model and optimizer load
    them, 10 more steps == 20 steps straight (bit for bit)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from lowrank_opt import Apollo, lowrank_param_groups

    options = dict(options_for("channel"), update_proj_gap=4)  # a projection refresh on each side of the save

    net, targets = (MoENet, MOE_TARGETS) if moe else (Net, TARGETS)

    def make():
        torch.manual_seed(1234)
        model = shard(net())
        return model, Apollo(lowrank_param_groups(model, targets, **options), lr=LR, weight_decay=WEIGHT_DECAY)

    def train(model, opt, steps):
        for step in steps:
            train_step(model, opt, step)
            opt.zero_grad(set_to_none=True)

    straight, straight_opt = make()
    train(straight, straight_opt, range(20))
    expected = {n: full(p).detach().clone() for n, p in straight.named_parameters()}
    first, first_opt = make()
    train(first, first_opt, range(10))
    holder = [tempfile.mkdtemp(prefix="apollo_dcp_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    model_sd, optim_sd = get_state_dict(first, first_opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=holder[0])
    resumed, resumed_opt = make()
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=holder[0])
    set_state_dict(resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(resumed, resumed_opt, range(10, 20))
    got = {n: full(p).detach() for n, p in resumed.named_parameters()}
    files = sorted(os.listdir(holder[0]))
    dist.barrier()
    if dist.get_rank() == 0:
        import shutil

        shutil.rmtree(holder[0], ignore_errors=True)
    return dict(max_diff=max(float((got[n] - expected[n]).abs().max()) for n in expected), files=files,
                steps=sorted({s["step"] for s in resumed_opt.state.values()}))


def case_pure_bf16() -> dict:
    """Pure-bf16 weights sharded by FSDP2 with stochastic rounding: deterministic for a given layout, and the
    loss close to the unsharded pure-bf16 run fed the same gradients."""
    from lowrank_opt import Apollo, lowrank_param_groups

    options = options_for("channel")
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        model = Net().to(torch.bfloat16)
        ref_model = copy.deepcopy(model)
        ref_opt = Apollo(lowrank_param_groups(ref_model, TARGETS, **options), lr=LR, weight_decay=WEIGHT_DECAY)
        shard(model)
        opt = Apollo(lowrank_param_groups(model, TARGETS, **options), lr=LR, weight_decay=WEIGHT_DECAY)
        ref_params = dict(ref_model.named_parameters())
        losses, ref_losses = [], []
        for step in range(STEPS):
            x, y = local_batch(step, torch.bfloat16)
            loss = F.mse_loss(model(x).float(), y)
            loss.backward()
            with torch.no_grad():
                ref_losses.append(float(F.mse_loss(ref_model(x).float(), y)))
            for name, p in model.named_parameters():
                ref_params[name].grad = full(p.grad).detach().clone()
            opt.step()
            ref_opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        weights = {n: full(p).detach().clone() for n, p in model.named_parameters()}
        bits_equal = all(torch.equal(weights[n], ref_params[n].detach()) for n in weights)
        max_diff = max(float((weights[n].float() - ref_params[n].detach().float()).abs().max()) for n in weights)
        runs.append(dict(weights=weights, losses=losses, ref_losses=ref_losses, bits_equal=bits_equal,
                         max_diff=max_diff, dtype=str(next(model.parameters()).dtype)))
    deterministic = all(torch.equal(runs[0]["weights"][n], runs[1]["weights"][n]) for n in runs[0]["weights"])
    first = runs[0]
    return dict(deterministic=deterministic, losses=first["losses"], ref_losses=first["ref_losses"],
                bits_equal_unsharded=first["bits_equal"], max_diff=first["max_diff"], dtype=first["dtype"])


def case_example() -> dict:
    """docs/examples/fsdp2.py end to end (LLaMA from configs, per-layer fully_shard, a DCP checkpoint at step
    3 of 6), then again resuming from that checkpoint: the same final weights and last losses."""
    import importlib.util

    import torch.distributed as dist

    path = Path(__file__).resolve().parents[1] / "docs" / "examples" / "fsdp2.py"
    spec = importlib.util.spec_from_file_location("fsdp2_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    holder = [tempfile.mkdtemp(prefix="apollo_fsdp2_example_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    common = ["--config", "llama_tiny", "--steps", "6", "--checkpoint-dir", holder[0]]
    straight = module.main(common + ["--save-every", "3"], init_process_group=False)
    resumed = module.main(common + ["--resume", "3"], init_process_group=False)
    dist.barrier()
    if dist.get_rank() == 0:
        import shutil

        shutil.rmtree(holder[0], ignore_errors=True)
    return dict(straight=straight, resumed=resumed)


CASES = {
    "equal_channel": lambda: case_equal("channel"),
    "equal_tensor": lambda: case_equal("tensor"),
    "mixed_precision": lambda: case_equal("channel", mixed_precision=True),
    "accelerate_swap": case_accelerate_swap,
    "dcp_resume": case_dcp_resume,
    "moe_channel": lambda: case_equal("channel", moe=True),
    "moe_tensor": lambda: case_equal("tensor", moe=True),
    "moe_dcp_resume": lambda: case_dcp_resume(moe=True),
    "pure_bf16": case_pure_bf16,
    "example": case_example,
}


def main() -> None:
    import torch.distributed as dist

    out_path = Path(sys.argv[1])
    names = sys.argv[2:] or list(CASES)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for name in names:
        start = time.time()
        try:
            results[name] = CASES[name]()
        except Exception:  # reported per case
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = time.time() - start
        dist.barrier()
    if dist.get_rank() == 0:
        results["world_size"] = dist.get_world_size()
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
