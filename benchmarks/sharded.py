"""APOLLO sharded over CPU ranks (gloo), under DeepSpeed ZeRO or FSDP2: what the optimizer all-reduces per step,
in all and per matrix kind, next to the gradient bytes; the optimizer state each rank holds; step time.

    python benchmarks/sharded.py --backend zero --config configs/llama_130m.json --stages 0,1,2,3 --steps 10 \\
        --output docs/deepspeed.md
    python benchmarks/sharded.py --backend fsdp --config configs/llama_130m.json --steps 4 --output docs/fsdp.md

A plain ``python`` call re-launches itself under ``torch.distributed.run`` (--nproc CPU ranks over gloo). Every rank
builds the LLaMA of --config and runs --warmup + --steps real forward/backward passes and steps: per ZeRO stage and
param-group layout (``lowrank``: ``lowrank_param_groups``; ``per-matrix``: ``deepspeed_param_groups``), or under
FSDP2 per decoder layer. Every ``torch.distributed`` collective is counted by phase (:class:`CommCounter`); the
reference is the unsharded optimizer on rank 0. What is measured: docs/deepspeed.md and docs/fsdp.md, "Benchmark".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    build_llama, build_ours, check_at_least, gc_paused, load_average, machine_line, mib, now_text, section,
    split_list, table, tensor_bytes, timed_calls, write_json_atomic, write_section)

LR = 1e-3
COMMAND_ENV = "SHARDED_BENCH_COMMAND"  # the user's command line, handed to the torchrun re-launch
SECTIONS = {"zero": "zero benchmark", "fsdp": "fsdp_comm benchmark"}  # section ids in docs/deepspeed.md, fsdp.md
GROUPINGS = ("lowrank", "per-matrix")
KINDS = [("q", r"\.q_proj\."), ("k", r"\.k_proj\."), ("v", r"\.v_proj\."), ("o", r"\.o_proj\."),
         ("gate", r"\.gate_proj\."), ("up", r"\.up_proj\."), ("down", r"\.down_proj\."),
         ("embeddings", r"embed_tokens\."), ("lm_head", r"(^|\.)lm_head\."), ("norms", r"norm\.weight$")]
KIND_ORDER = [k for k, _ in KINDS] + ["other"]
UNATTRIBUTED = "(no parameter: the \"some rank raises\" flag)"


def kind_of(name: str) -> str:
    """``model.layers.3.mlp.down_proj.weight`` -> ``down``; ``other`` if no kind matches."""
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def group_by_kind(by_name: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for name, nbytes in by_name.items():
        out[kind_of(name)] += int(nbytes)
    return {k: out[k] for k in KIND_ORDER if k in out}


def pct(part: float, whole: float) -> str:
    """A percentage with two decimals; more where that would round a part to 0% or 100%."""
    if not whole:
        return "—"
    value = 100 * part / whole
    if part in (0, whole):
        return f"{value:.0f}%"
    if value < 0.01:
        return f"{value:.1e}%"
    digits = 2
    while digits < 6 and round(value, digits) == 100:
        digits += 1
    return f"{value:.{digits}f}%"


# op -> (positional index, keyword) of the argument that carries the payload
_PAYLOAD = {"all_reduce": (0, "tensor"), "reduce": (0, "tensor"), "broadcast": (0, "tensor"),
            "all_reduce_coalesced": (0, "tensors"), "all_gather": (0, "tensor_list"),
            "all_gather_into_tensor": (0, "output_tensor"), "all_gather_single": (0, "output_tensor"),
            "_all_gather_base": (0, "output_tensor"), "reduce_scatter": (1, "input_list"),
            "reduce_scatter_tensor": (1, "input"), "_reduce_scatter_base": (1, "input"),
            "reduce_scatter_single": (1, "input"), "all_to_all_single": (1, "input")}


class CommCounter:
    """Calls, payload bytes and seconds per (phase, op) of the ``torch.distributed`` collectives issued while a
    phase is set; ``inner`` overrides the phase while the optimizer's own ``step()`` runs."""

    def __init__(self):
        self.phase: Optional[str] = None
        self.inner: Optional[str] = None
        self.counts: dict = defaultdict(lambda: [0, 0, 0.0])
        self._depth = 0

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for op, (pos, key) in _PAYLOAD.items():
            original = getattr(c10d, op, None)
            if original is not None:
                wrapped = self._wrap(op, original, pos, key)
                setattr(c10d, op, wrapped)
                if hasattr(dist, op):
                    setattr(dist, op, wrapped)

    def _wrap(self, op, original, pos, key):
        def wrapped(*a, **kw):
            phase, entry = self.inner or self.phase, None
            if phase is not None and self._depth == 0:  # the outermost call only
                entry = self.counts[(phase, op)]
                entry[0] += 1
                entry[1] += tensor_bytes(a[pos] if len(a) > pos else kw.get(key))
            self._depth += 1
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                self._depth -= 1
                if entry is not None:  # for async_op=True: the launch only
                    entry[2] += time.perf_counter() - start

        wrapped.__name__, wrapped.__wrapped__ = getattr(original, "__name__", op), original
        return wrapped

    def summary(self, phase: str) -> dict[str, list[int]]:
        """op -> [calls, bytes]."""
        return {op: v[:2] for (ph, op), v in sorted(self.counts.items()) if ph == phase}

    def seconds(self, phase: str) -> float:
        return sum(v[2] for (ph, _), v in self.counts.items() if ph == phase)


# ----------------------------------------------------------------------------------------------------------
# Arguments and the torchrun re-launch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/sharded.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backend", required=True, choices=("zero", "fsdp"))
    parser.add_argument("--config", default="configs/llama_130m.json", help="Hugging Face LLaMA config (JSON)")
    parser.add_argument("--optimizers", default=None, help="registry names (default zero: apollo; fsdp: "
                        "apollo,apollo_mini)")
    parser.add_argument("--stages", default=None, help="zero: comma-separated ZeRO stages (default 0,1,2,3)")
    parser.add_argument("--groups", default=None, help=f"zero: param-group layouts (default {','.join(GROUPINGS)})")
    parser.add_argument("--rank", type=int, default=192, help="rank of the channel-wise optimizers")
    parser.add_argument("--update-proj-gap", type=int, default=200)
    parser.add_argument("--steps", type=int, default=None, help="timed iterations (default zero 10, fsdp 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default zero 2, fsdp 1)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the torchrun re-launch")
    parser.add_argument("--no-reference", action="store_true", help="skip the unsharded reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="", help="Markdown file whose section is replaced; empty: print only")
    parser.add_argument("--json", default="", help="also write the raw measurements to this JSON file")
    args = parser.parse_args(argv)
    zero = args.backend == "zero"
    args.optimizer_list = split_list(args.optimizers or ("apollo" if zero else "apollo,apollo_mini"))
    from lowrank_opt.registry import lowrank_names

    if not args.optimizer_list or any(name not in lowrank_names() for name in args.optimizer_list):
        parser.error(f"--optimizers takes low-rank registry names ({', '.join(lowrank_names())}), got "
                     f"{args.optimizers!r}")
    if not zero and (args.stages, args.groups) != (None, None):
        parser.error("--stages and --groups are ZeRO's: they need --backend zero")
    args.stages, args.groups = args.stages or "0,1,2,3", args.groups or ",".join(GROUPINGS)
    args.steps = args.steps if args.steps is not None else (10 if zero else 4)
    args.warmup = args.warmup if args.warmup is not None else (2 if zero else 1)
    try:
        args.stage_list = [int(s) for s in split_list(args.stages)]
    except ValueError:
        args.stage_list = []
    if not args.stage_list or any(s not in (0, 1, 2, 3) for s in args.stage_list):
        parser.error(f"--stages takes stages from 0, 1, 2, 3, got {args.stages!r}")
    args.group_list = split_list(args.groups)
    if not args.group_list or any(g not in GROUPINGS for g in args.group_list):
        parser.error(f"--groups takes layouts from {', '.join(GROUPINGS)}, got {args.groups!r}")
    check_at_least(parser.error, *((f"--{name.replace('_', '-')}", getattr(args, name), low) for name, low in (
        ("steps", 1), ("warmup", 0), ("rank", 1), ("update_proj_gap", 1), ("seq_len", 2), ("micro_batch", 1),
        ("threads", 1), ("nproc", 1))))
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config} does not exist")
    return args


def runs(args) -> list[dict]:
    if args.backend == "fsdp":
        return [{"optimizer": name} for name in args.optimizer_list]
    return [{"optimizer": name, "grouping": g, "stage": s} for name in args.optimizer_list for g in args.group_list
            for s in args.stage_list if not (g == "per-matrix" and s == 0)]  # stage 0: whole tensors either way


def run_label(run: dict, world: int) -> str:
    if "stage" in run:
        return f"ZeRO-{run['stage']}, {run['grouping']}, {run['optimizer']}, {world} ranks"
    return f"FSDP2, {run['optimizer']}, {world} ranks"


def relaunch_under_torchrun(args) -> int:
    env = dict(os.environ, **{COMMAND_ENV: shlex.join(["python", "benchmarks/sharded.py", *sys.argv[1:]])})
    if args.backend == "zero":
        env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           str(Path(__file__).resolve()), *sys.argv[1:]]
    print("re-launching:", shlex.join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


# ----------------------------------------------------------------------------------------------------------
# Measurements


def micro_batch(args, step: int, rank: int, vocab: int):
    import torch

    gen = torch.Generator().manual_seed(args.seed * 100003 + step * 1009 + rank)
    return torch.randint(3, vocab, (args.micro_batch, args.seq_len), generator=gen)


def build_optimizer(args, name: str, groups):
    return build_ours(name, groups, rank=args.rank, lr=LR, weight_decay=0.0, update_proj_gap=args.update_proj_gap)


def local_bytes(t) -> int:
    """A tensor's bytes on this rank (a DTensor's local shard); 0 for None."""
    if t is None:
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def kind_table(model, optimizer) -> dict[str, dict]:
    """Per kind: tensors, their global shapes, numel, and how APOLLO updates them."""
    from lowrank_opt.projection import RIGHT, matrix_shape, orientation

    lowrank = {id(p) for g in optimizer.param_groups if g.get("rank") is not None for p in g["params"]}
    out: dict[str, dict] = {}
    for name, p in model.named_parameters():
        entry = out.setdefault(kind_of(name), dict(count=0, numel=0, shapes=[], update=set()))
        entry["count"] += 1
        entry["numel"] += p.numel()
        if list(p.shape) not in entry["shapes"]:
            entry["shapes"].append(list(p.shape))
        if id(p) not in lowrank or p.dim() < 2:
            entry["update"].add("AdamW")
        else:
            right = orientation(matrix_shape(tuple(p.shape)), True) == RIGHT
            entry["update"].add("right projection" if right else "left projection")
    return {k: {**out[k], "update": sorted(out[k]["update"])} for k in KIND_ORDER if k in out}


def state_by_name(optimizer, model) -> tuple[int, dict[str, int]]:
    """(this rank's optimizer-state bytes, those held for each parameter name)."""
    from lowrank_opt.memory.measure import optimizer_state_breakdown

    breakdown = optimizer_state_breakdown(optimizer)
    return breakdown.total, {name: breakdown.get(id(p), 0) for name, p in model.named_parameters()}


def run_reference(args, name: str) -> dict:
    """The unsharded optimizer, this process alone: one forward/backward, then warmup + steps step() calls."""
    import torch

    from lowrank_opt import lowrank_param_groups

    model = build_llama(args.config, args.seed, torch.float32)
    opt = build_optimizer(args, name, lowrank_param_groups(model, "all-linear"))
    ids = micro_batch(args, 0, 0, model.config.vocab_size)
    model(input_ids=ids, labels=ids).loss.backward()
    with gc_paused():
        times = timed_calls(opt.step, args.steps, args.warmup, "cpu")
    total, by_name = state_by_name(opt, model)
    del opt, model
    gc.collect()
    return dict(step_ms=statistics.median(times), step_min_ms=min(times), state_bytes=total,
                state_by_kind=group_by_kind(by_name))


def run_sharded(args, run: dict, counter: CommCounter) -> dict:
    import torch
    import torch.distributed as dist

    from lowrank_opt import lowrank_param_groups

    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.perf_counter()
    model = build_llama(args.config, args.seed, torch.float32)
    labels = {repr(name): name for name, _ in model.named_parameters()}  # comm_bytes_by_param's keys -> names
    numel, vocab = sum(p.numel() for p in model.parameters()), model.config.vocab_size
    if args.backend == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = build_optimizer(args, run["optimizer"], lowrank_param_groups(model, "all-linear"))
        kinds, engine = kind_table(model, opt), model
        backward, step = (lambda loss: loss.backward()), opt.step
    else:
        from lowrank_opt.integrations.deepspeed import deepspeed_param_groups, initialize

        layout = lowrank_param_groups if run["grouping"] == "lowrank" else deepspeed_param_groups
        opt = build_optimizer(args, run["optimizer"], layout(model, "all-linear"))
        kinds = kind_table(model, opt)
        config = {"train_micro_batch_size_per_gpu": args.micro_batch, "train_batch_size": args.micro_batch * world,
                  "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1
                  "zero_optimization": {"stage": run["stage"]}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**9, "wall_clock_breakdown": False}
        engine = initialize(model, opt, config)[0]
        backward, step = engine.backward, engine.step
    groups, init_s = len(opt.param_groups), time.perf_counter() - t0

    inner = {"ms": 0.0, "calls": 0, "start": 0.0}

    def pre_hook(*_):
        counter.inner = "optimizer"
        inner["calls"] += 1
        inner["start"] = time.perf_counter()

    def post_hook(*_):
        inner["ms"] += 1e3 * (time.perf_counter() - inner["start"])
        counter.inner = None

    hooks = opt.register_step_pre_hook(pre_hook), opt.register_step_post_hook(post_hook)
    timing, per_step = defaultdict(list), []
    for i in range(args.warmup + args.steps):
        ids = micro_batch(args, i, rank, vocab)
        counter.counts.clear()
        inner.update(ms=0.0, calls=0)
        dist.barrier()
        start = time.perf_counter()
        counter.phase = "backward"
        backward(engine(input_ids=ids, labels=ids).loss)
        counter.phase = None
        dist.barrier()
        middle = time.perf_counter()
        counter.phase = "step"
        step()
        counter.phase = None
        dist.barrier()
        if i >= args.warmup:
            timing["fwdbwd_ms"].append(1e3 * (middle - start))
            timing["step_ms"].append(1e3 * (time.perf_counter() - middle))
            timing["inner_ms"].append(inner["ms"])
            timing["comm_ms"].append(1e3 * counter.seconds("optimizer"))
            per_step.append(dict(optimizer_bytes=opt.comm_bytes_last_step, calls=inner["calls"],
                                 by_param={labels.get(k, k): v for k, v in opt.comm_bytes_by_param.items()},
                                 backward=counter.summary("backward"), step=counter.summary("step"),
                                 inside=counter.summary("optimizer")))
        if args.backend == "fsdp" and i + 1 < args.warmup + args.steps:  # the last step's gradients are counted
            opt.zero_grad(set_to_none=True)
    for hook in hooks:
        hook.remove()
    last = per_step[-1]
    counted = [sum(b for op, (_, b) in p["inside"].items() if op == "all_reduce") for p in per_step]
    by_kind = group_by_kind(last["by_param"])
    state_total, state = state_by_name(opt, model)
    out = dict(
        **run, rank=rank, world=world, groups=groups, init_s=init_s, numel=numel, kinds=kinds,
        **{k: statistics.median(v) for k, v in timing.items()}, step_min_ms=min(timing["step_ms"]),
        optimizer_calls=last["calls"], optimizer_bytes=last["optimizer_bytes"], optimizer_by_kind=by_kind,
        unattributed_bytes=last["optimizer_bytes"] - sum(by_kind.values()),
        comm_backward=last["backward"], comm_step=last["step"], comm_inside_optimizer=last["inside"],
        optimizer_bytes_match=all(c == p["optimizer_bytes"] for c, p in zip(counted, per_step)),
        counts_constant=all(json.dumps(p, sort_keys=True) == json.dumps(last, sort_keys=True) for p in per_step),
        state_bytes=state_total, state_by_kind=group_by_kind(state),
        param_by_kind=group_by_kind({n: local_bytes(p) for n, p in model.named_parameters()}),
        grad_bytes=sum(local_bytes(p.grad) for p in model.parameters()), load_end=load_average())
    out["param_bytes"] = sum(out["param_by_kind"].values())
    if args.backend == "zero":  # the fp32 partition DeepSpeed keeps for the optimizer (stage 0 fp32: the model)
        attr = {1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups",
                3: "fp32_partitioned_groups_flat"}.get(run["stage"])
        out["master_bytes"] = tensor_bytes(list(getattr(engine.optimizer, attr, []))) if attr else 0
        out["wrapper"] = type(engine.optimizer).__name__
        if hasattr(engine, "destroy"):
            engine.destroy()
    del engine, opt, model
    gc.collect()
    return out


# ----------------------------------------------------------------------------------------------------------
# Report


def per_rank(values: list, fmt=lambda v: f"{v:,}") -> str:
    """'a' when every rank has the same value, else 'a / b / ...' (rank order)."""
    texts = [fmt(v) for v in values]
    return texts[0] if len(set(texts)) == 1 else " / ".join(texts)


def fmt_ops(ops: dict[str, list[int]]) -> str:
    return ", ".join(f"{op} ×{calls}: {nbytes:,} B" for op, (calls, nbytes) in ops.items()) or "—"


def render(args, results: list[list[dict]], references: dict[str, dict], world: int) -> list[str]:
    """The tables: runs; bytes per kind; state per kind (fsdp); every collective counted."""
    first = results[0][0]
    kinds, grad_bytes, zero = first["kinds"], first["numel"] * 4, args.backend == "zero"
    rows = [[f"unsharded, 1 process, {name}", f"{r['step_ms']:,.0f} / {r['step_min_ms']:,.0f}", "(the whole step)",
             "—", "—", "—", "—", mib(r["state_bytes"]), "—", "—"] for name, r in references.items()]
    for rs in results:
        r0 = rs[0]
        rows.append([run_label(r0, world) + (f" ({r0['groups']} groups)" if zero else ""),
                     f"{r0['step_ms']:,.0f} / {r0['step_min_ms']:,.0f}",
                     f"{r0['optimizer_calls']} calls: " + " / ".join(f"{r['inner_ms']:,.0f}" for r in rs),
                     " / ".join(f"{r['comm_ms']:,.0f}" for r in rs), f"{r0['fwdbwd_ms']:,.0f}",
                     per_rank([r["optimizer_bytes"] for r in rs]) + " B",
                     pct(max(r["optimizer_bytes"] for r in rs), grad_bytes),
                     per_rank([r["state_bytes"] for r in rs], mib),
                     per_rank([r["master_bytes" if zero else "param_bytes"] for r in rs], mib),
                     r0["load_end"].split("/")[0]])
    out = [table(["run", "step ms, median / min", "optimizer step() calls inside, ms per rank",
                  "in its all-reduces, ms per rank", "forward+backward ms", "optimizer all-reduce / step",
                  "÷ fp32 gradient bytes", "optimizer state / rank, MiB",
                  "fp32 master partition / rank, MiB" if zero else "parameters / rank, MiB", "load (1 min) after"],
                 rows, "lrrrrrrrrr")]
    labels = [run_label(rs[0], world) for rs in results]
    rows = [[kind, e["count"], ", ".join("×".join(map(str, s)) for s in e["shapes"]), ", ".join(e["update"]),
             f"{e['numel'] * 4:,} B", *[per_rank([r["optimizer_by_kind"].get(kind, 0) for r in rs]) + " B"
                                        for rs in results]] for kind, e in kinds.items()]
    rows.append([UNATTRIBUTED, "", "", "", "",
                 *[per_rank([r["unattributed_bytes"] for r in rs]) + " B" for rs in results]])
    rows.append(["**total**", sum(e["count"] for e in kinds.values()), "", "", f"**{grad_bytes:,} B**",
                 *[f"**{per_rank([r['optimizer_bytes'] for r in rs])} B**" for rs in results]])
    out.append(table(["kind", "tensors", "shape", "how APOLLO updates it", "fp32 gradient bytes",
                      *[f"{label}: optimizer all-reduce" for label in labels]], rows, "lrllr" + "r" * len(labels)))
    if not zero:  # ZeRO keys the state by its flat partitions: no per-kind split
        rows = [[kind, per_rank([r["param_by_kind"].get(kind, 0) for r in results[0]], lambda v: mib(v, 2)),
                 *[per_rank([r["state_by_kind"].get(kind, 0) for r in rs], lambda v: mib(v, 2)) for rs in results],
                 *[mib(ref["state_by_kind"].get(kind, 0), 2) for ref in references.values()]] for kind in kinds]
        rows.append(["**total**", per_rank([r["param_bytes"] for r in results[0]], lambda v: mib(v, 2)),
                     *[per_rank([r["state_bytes"] for r in rs], lambda v: mib(v, 2)) for rs in results],
                     *[mib(ref["state_bytes"], 2) for ref in references.values()]])
        out.append(table(["kind", "parameters / rank, MiB", *[f"{label}: state / rank, MiB" for label in labels],
                          *[f"{name} unsharded: state, MiB" for name in references]], rows,
                         "l" + "r" * (1 + len(labels) + len(references))))
    out.append(table(["run", "forward+backward (rank 0's payloads)", "step, outside the optimizer",
                      "inside the optimizer's step()"],
                     [[label, fmt_ops(rs[0]["comm_backward"]), fmt_ops(rs[0]["comm_step"]),
                       fmt_ops(rs[0]["comm_inside_optimizer"])] for label, rs in zip(labels, results)]))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        return relaunch_under_torchrun(args)
    started, load_start = time.time(), load_average()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's deprecation notes on every collective
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    counter = CommCounter()
    counter.install()  # before DeepSpeed or FSDP keep references to the collectives
    if args.backend == "zero":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        import deepspeed.comm.torch as ds_comm_torch

        ds_comm_torch.build_shm_op = lambda: None  # a ~45 s JIT build for inference all-reduces training never uses
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)

    references: dict[str, dict] = {}
    for name in [] if args.no_reference else args.optimizer_list:
        if rank == 0:
            log(f"reference: unsharded {name} on one process ...")
            references[name] = run_reference(args, name)
        dist.barrier()
    results = []
    for run in runs(args):
        log(f"{run_label(run, world)} ...")
        mine = run_sharded(args, run, counter)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        results.append(gathered)
        log(f"  step {mine['step_ms']:.0f} ms, optimizer all-reduce {mine['optimizer_bytes']:,} B, state "
            f"{mib(mine['state_bytes'])} MiB, fwd+bwd {mine['fwdbwd_ms']:.0f} ms, init {mine['init_s']:.0f} s")

    if rank == 0:
        command = os.environ.get(COMMAND_ENV) or shlex.join(
            ["torchrun", "--standalone", "--nproc_per_node", str(world), "benchmarks/sharded.py",
             *(sys.argv[1:] if argv is None else argv)])
        machine = (f"Run {now_text()}: {world} ranks over gloo, {args.threads} torch thread(s) each; "
                   f"{machine_line('cpu')}" + (f", deepspeed {deepspeed.__version__}" if args.backend == "zero" else "")
                   + f". Load average {load_start} at the start, {load_average()} at the end; "
                   f"{time.time() - started:.0f} s.")
        tables = render(args, results, references, world)
        print("\n\n".join(tables))
        if args.json:
            write_json_atomic(args.json, dict(command=command, machine=machine, references=references,
                                              results=results), indent=1)
        if args.output:
            name = SECTIONS[args.backend]
            write_section(args.output, section(name, "benchmarks/sharded.py", command, machine, *tables), name)
            print(f"\nwrote the {name} section of {args.output}")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: gloo's background threads sometimes abort it


if __name__ == "__main__":
    sys.exit(main())
