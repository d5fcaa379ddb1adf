"""APOLLO with FSDP2 (``torch.distributed.fsdp.fully_shard``), the torchtitan way: a LLaMA from configs/,
``fully_shard`` per decoder layer and at the root, a plain :class:`lowrank_opt.Apollo`, and a
``torch.distributed.checkpoint`` (DCP) checkpoint to resume from.

    torchrun --nproc_per_node 2 docs/examples/fsdp2.py --config llama_tiny --steps 40 \\
        --checkpoint-dir /tmp/apollo-fsdp2 --save-every 20            # CPU (gloo) or GPUs (nccl)
    torchrun --nproc_per_node 2 docs/examples/fsdp2.py --config llama_tiny --steps 40 \\
        --checkpoint-dir /tmp/apollo-fsdp2 --resume 20                # continue from step 20: same result

Apollo needs nothing FSDP-specific: built on the sharded model, it sees ``Shard(0)`` DTensors, projects the
rows each rank holds, and all-reduces only what crosses ranks (see docs/fsdp.md). Its state saves and loads
through DCP like any torch optimizer's; the projection matrices are never saved (they are a function of the
seed, the parameter's name and the refresh index).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="llama_tiny", help="a model config name in configs/ or a JSON path")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps in all (default 40)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step (default 4)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=16, help="APOLLO rank (default 16)")
    parser.add_argument("--checkpoint-dir", default=None, help="where DCP checkpoints go (one folder per step)")
    parser.add_argument("--save-every", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    parser.add_argument("--resume", type=int, default=None, help="resume from the checkpoint of this step")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if (args.save_every or args.resume is not None) and not args.checkpoint_dir:
        parser.error("--save-every/--resume need --checkpoint-dir")
    if args.resume is not None and not 0 <= args.resume <= args.steps:
        parser.error(f"--resume must be in [0, --steps], got {args.resume}")
    return args


def build(args: argparse.Namespace, vocab_size: int, device: torch.device):
    """The LLaMA (random init), sharded per decoder layer and at the root, and Apollo on it."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from lowrank_opt import Apollo, lowrank_param_groups
    from lowrank_opt.memory import resolve_config

    config = resolve_config(args.config)
    config.vocab_size = vocab_size
    torch.manual_seed(0)  # the same initial weights on every rank
    model = AutoModelForCausalLM.from_config(config).to(device)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    groups = lowrank_param_groups(model, "all-linear", rank=args.rank, update_proj_gap=20)
    return model, Apollo(groups, lr=args.lr, weight_decay=0.0)


def batches(tokens: torch.Tensor, args: argparse.Namespace, step: int) -> torch.Tensor:
    """This rank's sequences of the global batch of ``step`` (every rank a different slice)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per_step = args.batch_size * world
    n_seq = tokens.numel() // args.seq_len
    index = (torch.arange(per_step) + step * per_step) % n_seq
    index = index[rank * args.batch_size:(rank + 1) * args.batch_size]
    return tokens[: n_seq * args.seq_len].view(n_seq, args.seq_len)[index]


def checkpoint_path(args: argparse.Namespace, step: int) -> str:
    return os.path.join(args.checkpoint_dir, f"step_{step}")


def main(argv: Optional[list[str]] = None, init_process_group: bool = True) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from lowrank_opt.data import default_corpus_text, load_tokenizer

    args = parse_args(argv)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if init_process_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tokenizer = load_tokenizer(None)  # the package's offline tokenizer
    tokens = torch.tensor(tokenizer(default_corpus_text()[:200_000])["input_ids"], dtype=torch.long)
    model, optimizer = build(args, len(tokenizer), device)
    start = 0
    if args.resume is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=checkpoint_path(args, args.resume))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = args.resume
    losses = []
    for step in range(start, args.steps):
        ids = batches(tokens, args, step).to(device)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if args.save_every and (step + 1) % args.save_every == 0:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_path(args, step + 1))
        if dist.get_rank() == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1}: loss {losses[-1]:.4f}", flush=True)
    # A digest of the final weights, gathered (every rank takes part), to compare runs.
    digest = sum(float(p.detach().full_tensor().double().square().sum()) for p in model.parameters())
    result = dict(losses=losses, first_loss=losses[0] if losses else math.nan, final_loss=losses[-1] if losses
                  else math.nan, weights_digest=digest, comm_bytes_last_step=optimizer.comm_bytes_last_step)
    if dist.get_rank() == 0:
        print(f"done: {len(losses)} steps, loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}, "
              f"optimizer all-reduced {result['comm_bytes_last_step']} bytes in the last step", flush=True)
    if init_process_group:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
