"""APOLLO under FSDP2 (``fully_shard``): what the optimizer all-reduces per step, per matrix kind, next to the
gradient bytes FSDP reduce-scatters; what each rank holds; step time.

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_comm.py \\
        --config configs/llama_130m.json --steps 4 --output docs/fsdp.md
    python benchmarks/fsdp_comm.py --config configs/llama_tiny.json --steps 2   # re-launches itself under torchrun

A plain ``python benchmarks/fsdp_comm.py ...`` (no torchrun environment) re-launches itself as
``python -m torch.distributed.run --standalone --nproc_per_node N benchmarks/fsdp_comm.py ...`` (N = --nproc,
default 2), so both forms run the same thing.

What runs, per optimizer variant (--variants: ``apollo``, channel-wise scaling at --rank, the paper's 192 for
LLaMA-130M; ``apollo_mini``, rank 1, tensor-wise scaling, scale 128), on every rank (fp32, gloo on CPU):

* the LLaMA model of --config (``AutoModelForCausalLM.from_config``, random init, the same seed on every
  rank), ``fully_shard`` on every decoder layer and then on the root (torchtitan's wrapping; FSDP2's defaults:
  fp32, parameters resharded after forward);
* a plain :class:`lowrank_opt.Apollo` on ``lowrank_param_groups(model, "all-linear", ...)`` built on the sharded
  model (lr 1e-3, weight decay 0): the attention and MLP matrices are low-rank, the embeddings, lm_head and
  RMSNorm weights get AdamW;
* --warmup + --steps iterations: a forward/backward of a random micro-batch (--micro-batch sequences of
  --seq-len tokens, different on each rank), then ``optimizer.step()``.

Measured:

* per matrix kind (q, k, v, o, gate, up, down, embeddings, lm_head, norms; by parameter name), the bytes the
  optimizer all-reduced in the last step (``Apollo.comm_bytes_by_param``, summed over the kind), next to the
  fp32 gradient bytes FSDP reduce-scatters for that kind (numel x 4); the one flag per step that no parameter
  owns ("some rank raises") is shown on its own row, so the kinds plus that row are
  ``Apollo.comm_bytes_last_step``;
* the collectives themselves, counted by wrapping ``torch.distributed``'s functions: FSDP's all-gathers and
  reduce-scatters during forward/backward, the optimizer's all-reduces inside ``step()`` (which must equal
  ``comm_bytes_last_step``);
* per rank: optimizer-state bytes (the library's counter, :func:`lowrank_opt.memory.measure.optimizer_state_bytes`,
  on each rank's local shards), parameter and gradient bytes held (the local shards), per kind;
* ``optimizer.step()`` wall time between two ``dist.barrier()`` calls (so the slower rank's), median and
  minimum over --steps, the time inside its all-reduces, and the forward/backward time;
* the reference: the unsharded ``Apollo`` on the same model and param groups, in rank 0 alone while the other
  ranks wait (one forward/backward, then --warmup + --steps ``step()`` calls): its step time and state.

With --output, the section between this script's marker lines in that Markdown file is created or replaced.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's lowrank_opt
from _common import (  # noqa: E402
    KIND_ORDER,
    UNATTRIBUTED,
    CommCounter,
    _pct,
    add_sharded_run_arguments,
    build_llama,
    group_by_kind,
    kind_of,
    cpu_model,
    load_average,
    markers,
    median,
    mib,
    now_text,
    write_json_atomic,
    write_section,
)

COMMAND_ENV = "FSDP_COMM_BENCH_COMMAND"  # the user's command line, handed to the torchrun re-launch
SECTION_HEADER = "## Benchmark: benchmarks/fsdp_comm.py"
SECTION_BEGIN, SECTION_END = markers("fsdp_comm benchmark", "benchmarks/fsdp_comm.py")
LR = 1e-3
VARIANTS = {
    # name -> (label, low-rank options given --rank)
    "apollo": ("APOLLO", lambda rank: dict(rank=rank, scale_type="channel", scale=1.0)),
    "apollo_mini": ("APOLLO-Mini", lambda rank: dict(rank=1, scale_type="tensor", scale=128.0)),
}
# Matrix kinds of a LLaMA, by parameter name (the first pattern that matches).
# ----------------------------------------------------------------------------------------------------------
# Arguments and the torchrun re-launch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/fsdp_comm.py",
        description="APOLLO under FSDP2 (fully_shard per decoder layer and root) on CPU ranks (gloo): the bytes the "
                    "optimizer all-reduces per step per matrix kind next to FSDP's gradient reduce-scatter, what "
                    "each rank holds, and step time. Prints markdown tables; with --output, writes this script's "
                    "section of that file.",
        epilog="Launch: torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_comm.py ARGS. A plain 'python "
               "benchmarks/fsdp_comm.py ARGS' re-launches itself that way (--nproc processes). See the module "
               "docstring for what is counted.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--variants", default="apollo,apollo_mini",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    add_sharded_run_arguments(parser, steps=4, warmup=1,
                              output_help="markdown file whose generated section is created or replaced (e.g. "
                                          "docs/fsdp.md); empty: print only")
    args = parser.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown or not args.variant_list:
        parser.error(f"--variants takes names from {', '.join(VARIANTS)}, got {args.variants!r}")
    for name, low in (("steps", 1), ("warmup", 0), ("rank", 1), ("update_proj_gap", 1), ("seq_len", 2),
                      ("micro_batch", 1), ("threads", 1), ("nproc", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config} does not exist")
    return args


def relaunch_under_torchrun(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    env[COMMAND_ENV] = "python " + shlex.join(["benchmarks/fsdp_comm.py"] + sys.argv[1:])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           str(Path(__file__).resolve())] + sys.argv[1:]
    print("re-launching:", shlex.join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


# ----------------------------------------------------------------------------------------------------------
# Measurements


class _LocalState:
    """An optimizer's state with every DTensor replaced by the shard this rank holds, shaped like an
    optimizer (``param_groups``, ``state``) so that the library's counter counts what the rank holds.
    (``optimizer_state_bytes`` itself cannot take DTensor state in this version: a DTensor has no storage.)"""

    def __init__(self, optimizer):
        self.param_groups = optimizer.param_groups
        self.state = {p: {k: local(v) for k, v in s.items()} for p, s in optimizer.state.items()}


def local(t: Any) -> Any:
    """A DTensor's local shard; anything else as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def state_by_name(optimizer, model) -> dict[str, int]:
    """Optimizer-state bytes this rank holds, per parameter name (the library's breakdown, on local shards)."""
    from lowrank_opt.memory.measure import optimizer_state_breakdown

    breakdown = optimizer_state_breakdown(_LocalState(optimizer))
    return {name: breakdown.get(id(p), 0) for name, p in model.named_parameters()}


def tensor_local_bytes(t) -> int:
    if t is None:
        return 0
    t = local(t)
    return t.numel() * t.element_size()


def micro_batch(args, step: int, rank: int, vocab: int):
    import torch

    gen = torch.Generator().manual_seed(args.seed * 100003 + step * 1009 + rank)
    return torch.randint(3, vocab, (args.micro_batch, args.seq_len), generator=gen)


def build_optimizer(variant: str, model, args):
    from lowrank_opt import Apollo, lowrank_param_groups

    options = VARIANTS[variant][1](args.rank)
    groups = lowrank_param_groups(model, "all-linear", update_proj_gap=args.update_proj_gap, **options)
    return Apollo(groups, lr=LR, weight_decay=0.0)


def update_kind(shape: tuple[int, ...], lowrank: bool) -> str:
    """How Apollo updates a parameter of this shape: the side it projects, or AdamW."""
    from lowrank_opt.projection import RIGHT, matrix_shape, orientation

    if not lowrank or len(shape) < 2:
        return "AdamW"
    return "right projection" if orientation(matrix_shape(shape), True) == RIGHT else "left projection"


def model_table(model, optimizer) -> dict[str, dict]:
    """Per kind: tensors, their (global) shapes, numel, how they are updated."""
    lowrank = {id(p) for g in optimizer.param_groups if g["rank"] is not None for p in g["params"]}
    out: dict[str, dict] = {}
    for name, p in model.named_parameters():
        entry = out.setdefault(kind_of(name), dict(count=0, numel=0, shapes=[], update=set()))
        entry["count"] += 1
        entry["numel"] += p.numel()
        shape = tuple(p.shape)
        if list(shape) not in entry["shapes"]:
            entry["shapes"].append(list(shape))
        entry["update"].add(update_kind(shape, id(p) in lowrank))
    for entry in out.values():
        entry["update"] = sorted(entry["update"])
    return {k: out[k] for k in KIND_ORDER if k in out}


def run_reference(args, variant: str) -> dict:
    """The unsharded Apollo, this process alone: one forward/backward, then warmup + steps step() calls."""
    import torch

    from _common import gc_paused, timed_calls

    model = build_llama(args.config, args.seed, torch.float32)
    opt = build_optimizer(variant, model, args)
    ids = micro_batch(args, 0, 0, model.config.vocab_size)
    model(input_ids=ids, labels=ids).loss.backward()
    with gc_paused():
        times = timed_calls(opt.step, args.steps, args.warmup, "cpu")
    by_name = state_by_name(opt, model)
    out = dict(step_ms=median(times), step_min_ms=min(times), state_bytes=sum(by_name.values()),
               state_by_kind=group_by_kind(by_name))
    del opt, model
    gc.collect()
    return out


def run_variant(args, variant: str, counter) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.perf_counter()
    model = build_llama(args.config, args.seed, torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = build_optimizer(variant, model, args)
    kinds = model_table(model, opt)
    vocab = model.config.vocab_size
    # comm_bytes_by_param is keyed by Apollo's label of a named parameter, repr(name): back to the name
    labels = {repr(name): name for name, _ in model.named_parameters()}
    init_s = time.perf_counter() - t0

    def pre_hook(optimizer, a, kw):
        counter.inner = "optimizer"

    def post_hook(optimizer, a, kw):
        counter.inner = None

    h1, h2 = opt.register_step_pre_hook(pre_hook), opt.register_step_post_hook(post_hook)
    step_ms, fwdbwd_ms, comm_ms, per_step = [], [], [], []
    for i in range(args.warmup + args.steps):
        ids = micro_batch(args, i, rank, vocab)
        counter.reset()
        dist.barrier()
        start = time.perf_counter()
        counter.phase = "backward"
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        counter.phase = None
        dist.barrier()
        middle = time.perf_counter()
        counter.phase = "step"
        opt.step()
        counter.phase = None
        dist.barrier()
        end = time.perf_counter()
        if i >= args.warmup:
            fwdbwd_ms.append(1e3 * (middle - start))
            step_ms.append(1e3 * (end - middle))
            comm_ms.append(1e3 * counter.seconds("optimizer"))
            by_param = {labels.get(k, k): v for k, v in opt.comm_bytes_by_param.items()}
            per_step.append(dict(optimizer_bytes=opt.comm_bytes_last_step, by_param=by_param,
                                 backward=counter.summary("backward"), inside_optimizer=counter.summary("optimizer")))
        if i + 1 < args.warmup + args.steps:
            opt.zero_grad(set_to_none=True)
    h1.remove()
    h2.remove()
    last = per_step[-1]
    counted = [sum(b for op, (c, b) in p["inside_optimizer"].items() if op == "all_reduce") for p in per_step]
    by_kind = group_by_kind(last["by_param"])
    params = {name: tensor_local_bytes(p) for name, p in model.named_parameters()}
    grads = {name: tensor_local_bytes(p.grad) for name, p in model.named_parameters()}
    state = state_by_name(opt, model)
    out = dict(
        variant=variant, rank=rank, world=world, init_s=init_s, kinds=kinds,
        numel=sum(p.numel() for p in model.parameters()),
        step_ms=statistics.median(step_ms), step_min_ms=min(step_ms), comm_ms=statistics.median(comm_ms),
        fwdbwd_ms=statistics.median(fwdbwd_ms),
        optimizer_bytes=last["optimizer_bytes"], optimizer_by_kind=by_kind,
        unattributed_bytes=last["optimizer_bytes"] - sum(by_kind.values()),
        comm_backward=last["backward"], comm_inside_optimizer=last["inside_optimizer"],
        optimizer_bytes_match=all(c == p["optimizer_bytes"] for c, p in zip(counted, per_step)),
        counts_constant=all(json.dumps(p, sort_keys=True) == json.dumps(last, sort_keys=True) for p in per_step),
        state_bytes=sum(state.values()), state_by_kind=group_by_kind(state),
        param_bytes=sum(params.values()), param_by_kind=group_by_kind(params),
        grad_bytes=sum(grads.values()),
        load_end=load_average(),
    )
    del opt, model, loss
    gc.collect()
    return out


# ----------------------------------------------------------------------------------------------------------
# Report


def _per_rank(values: list[int]) -> str:
    """'a' when every rank has the same value, else 'a / b / ...' (rank order)."""
    return f"{values[0]:,}" if len(set(values)) == 1 else " / ".join(f"{v:,}" for v in values)


def _per_rank_mib(values: list[int]) -> str:
    texts = [mib(v, 2) for v in values]
    return texts[0] if len(set(texts)) == 1 else " / ".join(texts)


def render(args, results: dict[str, list[dict]], references: dict[str, dict], meta: dict) -> tuple[str, str]:
    """(tables for stdout, the whole markdown section)."""
    world = meta["world"]
    variants = list(results)
    first = results[variants[0]][0]
    kinds = first["kinds"]
    numel = first["numel"]
    grad_bytes = numel * 4
    labels = {v: VARIANTS[v][0] for v in variants}

    # Table 1: bytes per kind.
    head = ["kind", "tensors", "shape", "how APOLLO updates it", "FSDP reduce-scatter / step (numel × 4)"]
    for v in variants:
        head += [f"{labels[v]} all-reduce / step", "÷ FSDP's"]
    rows = ["| " + " | ".join(head) + " |", "|---|---:|---|---|" + "---:|" * (1 + 2 * len(variants))]
    for kind, entry in kinds.items():
        shapes = ", ".join("×".join(map(str, s)) for s in entry["shapes"])
        cells = [kind, str(entry["count"]), shapes, ", ".join(entry["update"]), f"{entry['numel'] * 4:,} B"]
        for v in variants:
            sent = [r["optimizer_by_kind"].get(kind, 0) for r in results[v]]
            cells += [_per_rank(sent) + " B", _pct(max(sent), entry["numel"] * 4)]
        rows.append("| " + " | ".join(cells) + " |")
    cells = [UNATTRIBUTED, "", "", "", ""]
    for v in variants:
        cells += [_per_rank([r["unattributed_bytes"] for r in results[v]]) + " B", ""]
    rows.append("| " + " | ".join(cells) + " |")
    cells = ["**total**", str(sum(e["count"] for e in kinds.values())), "", "", f"**{grad_bytes:,} B**"]
    for v in variants:
        sent = [r["optimizer_bytes"] for r in results[v]]
        cells += [f"**{_per_rank(sent)} B**", f"**{_pct(max(sent), grad_bytes)}**"]
    rows.append("| " + " | ".join(cells) + " |")
    bytes_table = "\n".join(rows)

    # Table 2: what each rank holds, per kind.
    head = ["kind", "parameters / rank, MiB"]
    for v in variants:
        head += [f"{labels[v]} state / rank, MiB"] + ([f"{labels[v]} state unsharded, MiB"] if v in references else [])
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for kind in kinds:
        cells = [kind, _per_rank_mib([r["param_by_kind"].get(kind, 0) for r in results[variants[0]]])]
        for v in variants:
            cells.append(_per_rank_mib([r["state_by_kind"].get(kind, 0) for r in results[v]]))
            if v in references:
                cells.append(mib(references[v]["state_by_kind"].get(kind, 0), 2))
        rows.append("| " + " | ".join(cells) + " |")
    cells = ["**total**", "**" + _per_rank_mib([r["param_bytes"] for r in results[variants[0]]]) + "**"]
    for v in variants:
        cells.append("**" + _per_rank_mib([r["state_bytes"] for r in results[v]]) + "**")
        if v in references:
            cells.append(f"**{mib(references[v]['state_bytes'], 2)}**")
    rows.append("| " + " | ".join(cells) + " |")
    memory_table = "\n".join(rows)

    # Table 3: time and the collectives counted.
    rows = ["| run | `optimizer.step()` ms, median / min | of which in its all-reduces, ms (rank 0 / rank 1) "
            "| forward+backward ms (median) | FSDP during forward+backward (rank 0's payloads) "
            "| optimizer all-reduces counted inside `step()` | load average (1 min) after |",
            "|---|---:|---:|---:|---|---|---:|"]
    for v in variants:
        ref = references.get(v)
        if ref is not None:
            rows.append(f"| {labels[v]}, unsharded, 1 process | {ref['step_ms']:,.0f} / {ref['step_min_ms']:,.0f} "
                        "| — | — | — | — | — |")
        r0 = results[v][0]
        comm = " / ".join(f"{r['comm_ms']:,.0f}" for r in results[v])
        rows.append(f"| {labels[v]}, FSDP2, {world} ranks | {r0['step_ms']:,.0f} / {r0['step_min_ms']:,.0f} | {comm} "
                    f"| {r0['fwdbwd_ms']:,.0f} | {fmt_ops(r0['comm_backward'])} "
                    f"| {fmt_ops(r0['comm_inside_optimizer'])} | {r0['load_end'].split('/')[0]} |")
    time_table = "\n".join(rows)
    stdout = "\n\n".join([bytes_table, memory_table, time_table])

    notes = _notes(args, results, references, meta, kinds, grad_bytes)
    parts = [
        SECTION_BEGIN,
        SECTION_HEADER,
        "",
        f"Plain `Apollo` on a `fully_shard`ed LLaMA, {world} CPU ranks over gloo: the bytes the optimizer all-reduces "
        "per step for each kind of matrix, next to the gradient bytes FSDP itself reduce-scatters for it; what each "
        "rank holds; step time. Rerunning the command replaces this section.",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"Run {meta['date']} on {meta['cpu']} ({meta['cores']} cores), {world} ranks over gloo, {args.threads} torch "
        f"thread(s) per rank; torch {meta['torch']}, transformers {meta['transformers']}, Python {meta['python']}. "
        f"Load average (1/5/15 min) {meta['load_start']} at the start, {meta['load_end']} at the end. Whole run "
        f"{meta['wall_s']:.0f} s.",
        "",
        f"Model: `{args.config}` ({numel:,} parameters, fp32; gradient bytes {grad_bytes:,} B = {mib(grad_bytes)} "
        f"MiB), random init, `fully_shard` on each of its {meta['layers']} decoder layers and on the root. "
        + " ".join(f"{labels[v]}: `Apollo` on `{_options_text(v, args)}`, lr {LR:g}, weight decay 0." for v in variants)
        + f" Micro-batch {args.micro_batch}×{args.seq_len} random tokens per rank; {args.steps} timed steps after "
        f"{args.warmup} warm-up step(s).",
        "",
        "Bytes per step, per kind (rank 0's payloads; \"a / b\" where the ranks differ):",
        "",
        bytes_table,
        "",
        "What each rank holds (rank 0 / rank 1 where they differ), next to the unsharded optimizer's state:",
        "",
        memory_table,
        "",
        "Time and the collectives counted, per step:",
        "",
        time_table,
        "",
        "Notes:",
        "",
        *notes,
        "",
        SECTION_END,
    ]
    return stdout, "\n".join(parts)


def _options_text(variant: str, args) -> str:
    options = VARIANTS[variant][1](args.rank)
    inner = ", ".join(f"{k}={json.dumps(v)}" for k, v in options.items())
    return f"lowrank_param_groups(model, \"all-linear\", {inner}, update_proj_gap={args.update_proj_gap})"


def _notes(args, results, references, meta, kinds, grad_bytes) -> list[str]:
    world = meta["world"]
    notes = []
    for v, per_rank in results.items():
        r0 = per_rank[0]
        by_kind = r0["optimizer_by_kind"]
        total = r0["optimizer_bytes"]
        top = max(by_kind, key=by_kind.get) if by_kind else None
        if top is None:
            continue
        text = (f"- **{VARIANTS[v][0]}.** The optimizer all-reduces {total:,} B per step, {_pct(total, grad_bytes)} "
                f"of the {grad_bytes:,} B of fp32 gradients FSDP reduce-scatters. {by_kind[top]:,} B of it "
                f"({_pct(by_kind[top], total)}) is `{top}`")
        if "left projection" in kinds.get(top, {}).get("update", []):
            text += (" (wide matrices, left projection: every rank holds some rows of G, and each row contributes to "
                     "every column of R = P G, so the r × n partial sums are all-reduced"
                     + (", with the n partial column norms² of G" if VARIANTS[v][1](args.rank)["scale_type"] == "channel"
                        else "") + ")")
        text += ". "
        right = [k for k, e in kinds.items() if e["update"] == ["right projection"]]
        if right:
            each = sorted({by_kind.get(k, 0) // kinds[k]["count"] for k in right})
            text += (f"The square and tall matrices ({', '.join(right)}: right projection, rows sharded, no row cut) "
                     f"send {' or '.join(f'{b} B' for b in each)} each: ")
            text += ("a non-finite flag and the partial ‖U‖² of the growth limiter. "
                     if VARIANTS[v][1](args.rank)["scale_type"] == "channel"
                     else "a non-finite flag, the partial ‖G‖² and the partial ‖R̃‖² and ‖R‖² of tensor-wise scaling. ")
        dense = [k for k, e in kinds.items() if e["update"] == ["AdamW"]]
        if dense:
            text += (f"The AdamW tensors ({', '.join(dense)}) send one 4-byte non-finite flag each: AdamW is "
                     "element-wise, so its moments are sharded like the weight and nothing else crosses. ")
        text += (f"The row of its own is the one flag per step that says \"some rank raises\" "
                 f"({r0['unattributed_bytes']} B).")
        notes.append(text)
    v0 = next(iter(results))
    r0 = results[v0][0]
    fsdp_rs = sum(b for op, (c, b) in r0["comm_backward"].items() if op.startswith("reduce_scatter"))
    fsdp_ag = sum(b for op, (c, b) in r0["comm_backward"].items() if op.startswith("all_gather"))
    notes.append(
        f"- **FSDP's own traffic**, counted: {fsdp_rs:,} B reduce-scattered (the gradients, numel × 4 = "
        f"{grad_bytes:,} B{' plus padding' if fsdp_rs > grad_bytes else ''}) and {fsdp_ag:,} B all-gathered "
        f"({fsdp_ag / max(grad_bytes, 1):.2f}× the parameters: once for the forward, once again for the backward of "
        "every layer resharded after forward) per step. The per-kind FSDP column is numel × 4, the kind's share of "
        "the reduce-scatter.")
    r_all = [r for per_rank in results.values() for r in per_rank]
    notes.append(
        "- **How bytes are counted.** Payload one rank hands to the collective: the tensor of an all-reduce, the "
        "input of a reduce-scatter, the output of an all-gather (a ring sends about 2(N−1)/N of an all-reduce's "
        "payload per rank and (N−1)/N of the others'). The optimizer's figures are `Apollo.comm_bytes_by_param`, "
        "summed per kind, and `comm_bytes_last_step`; the latter "
        + ("equals the all-reduces counted inside `step()` on every timed step"
           if all(r["optimizer_bytes_match"] for r in r_all)
           else "**differs from the all-reduces counted inside `step()`** (see the raw JSON)")
        + "; counts " + ("were the same on every timed step." if all(r["counts_constant"] for r in r_all)
                         else "varied between timed steps; the last step's are shown."))
    mem = []
    for v, per_rank in results.items():
        r0 = per_rank[0]
        ref = references.get(v)
        line = f"{VARIANTS[v][0]} state {mib(r0['state_bytes'])} MiB per rank"
        if ref is not None:
            line += f" against {mib(ref['state_bytes'])} MiB unsharded ({r0['state_bytes'] / ref['state_bytes']:.3f}×)"
        mem.append(line)
    notes.append(
        f"- **What each rank holds.** Parameters: the local shard of every parameter ({mib(r0['param_bytes'])} MiB of "
        f"{mib(grad_bytes)} MiB; the gradients, reduce-scattered, are the same size: {mib(r0['grad_bytes'])} MiB). "
        "Optimizer state, counted by `lowrank_opt.memory.measure` on the local shards: " + "; ".join(mem) + ". "
        "Right-projection moments are DTensors sharded like the weight (rows/N × r each); left-projection (`down`) "
        "moments are the whole r × n on every rank; AdamW moments (embeddings, lm_head, norms) are sharded like "
        "their weights, and they are most of the state. The growth limiter's norm is one scalar per matrix on every "
        "rank.")
    if references:
        text = "- **Step time.** "
        parts = []
        for v, per_rank in results.items():
            ref = references.get(v)
            if ref is None:
                continue
            r0 = per_rank[0]
            comm = " / ".join(f"{r['comm_ms']:,.0f}" for r in per_rank)
            parts.append(f"{VARIANTS[v][0]}: {r0['step_ms']:,.0f} ms sharded ({comm} "
                         f"ms of it inside all-reduces, waits for the other rank included) against "
                         f"{ref['step_ms']:,.0f} ms unsharded on one process")
        text += "; ".join(parts) + (". Each rank does about half of the row-sharded matrices' and the AdamW "
                                    "tensors' work, but every rank still draws the whole P of every matrix and "
                                    "updates the whole r × n moments of the wide ones. The unsharded step ran with "
                                    "the other rank idle; the sharded one shares the machine's cores between the "
                                    "ranks (and whatever else runs: see the load average), so the ratio of the two "
                                    "says little about a GPU.")
        notes.append(text)
    notes.append(
        f"- **These are CPU timings over gloo** ({world} processes on a {meta['cores']}-core machine, {args.threads} "
        "torch thread(s) each), not GPU/NCCL timings; the byte counts do not depend on the machine. A 1-minute load "
        f"average much above {world} means something else was running and the timings are inflated.")
    return notes


def fmt_ops(ops: dict[str, list[int]]) -> str:
    if not ops:
        return "—"
    return ", ".join(f"{op} ×{calls}: {nbytes:,} B" for op, (calls, nbytes) in ops.items())


# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        return relaunch_under_torchrun(args)
    started = time.time()
    load_start = load_average()
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    torch.set_num_threads(args.threads)
    counter = CommCounter()
    counter.install()
    import torch.distributed as dist
    import transformers

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)

    references: dict[str, dict] = {}
    if not args.no_reference:
        for variant in args.variant_list:
            if rank == 0:
                log(f"reference: unsharded {VARIANTS[variant][0]} on one process ...")
                references[variant] = run_reference(args, variant)
                log(f"  step {references[variant]['step_ms']:.0f} ms, state {mib(references[variant]['state_bytes'])} MiB")
            dist.barrier()

    results: dict[str, list[dict]] = {}
    layers = 0
    for variant in args.variant_list:
        log(f"FSDP2, {VARIANTS[variant][0]} ...")
        mine = run_variant(args, variant, counter)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        results[variant] = gathered
        log(f"  step {mine['step_ms']:.0f} ms, optimizer all-reduce {mine['optimizer_bytes']:,} B, state "
            f"{mib(mine['state_bytes'])} MiB, fwd+bwd {mine['fwdbwd_ms']:.0f} ms, init {mine['init_s']:.0f} s")

    if rank == 0:
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(args.config).num_hidden_layers
        command = os.environ.get(COMMAND_ENV) or (
            f"torchrun --standalone --nproc_per_node {world} "
            + shlex.join(["benchmarks/fsdp_comm.py"] + (sys.argv[1:] if argv is None else list(argv))))
        meta = dict(command=command, world=world, cores=os.cpu_count(), cpu=cpu_model(), date=now_text(),
                    torch=torch.__version__, transformers=transformers.__version__,
                    python=platform.python_version(), load_start=load_start, load_end=load_average(),
                    wall_s=time.time() - started, layers=layers)
        stdout, section = render(args, results, references, meta)
        print()
        print(stdout)
        if args.json:
            write_json_atomic(args.json, dict(meta=meta, references=references, results=results), indent=1)
        if args.output:
            write_section(args.output, section, SECTION_BEGIN, SECTION_END)
            print(f"\nwrote the '{SECTION_HEADER}' section of {args.output}")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: gloo's background threads sometimes abort it


if __name__ == "__main__":
    sys.exit(main())
