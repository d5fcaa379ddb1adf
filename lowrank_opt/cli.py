"""The ``lowrank-opt`` command.

    lowrank-opt memory llama_7b --optim apollo --optim-args "rank=256" --dtype bf16 --seq-len 2048
    lowrank-opt memory configs/llama_1b.json --optim adamw,adamw_8bit,galore,apollo,apollo_mini --layerwise
    lowrank-opt memory llama_7b --optim adamw --zero-stage 2 --num-gpus 8 --json
    lowrank-opt optimizers
    lowrank-opt configs
    lowrank-opt run -- trl sft --model_name_or_path ./my-model --dataset_name ./data --optim apollo_mini
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

PROG = "lowrank-opt"


def _target_modules(text: Optional[str]):
    """The command line's names separated by commas, for every optimizer (Hugging Face's included)."""
    from .registry import normalize_target_modules

    return normalize_target_modules(text)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="lowrank-opt tools: memory estimates and listings.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    mem = sub.add_parser(
        "memory", help="estimate per-GPU training memory of a model config (nothing is allocated)",
        description="Estimate per-GPU training memory (weights, gradients, optimizer states, activations, "
                    "overhead) from a transformers config, building the model on the meta device. "
                    "Sizes are GB = 1e9 bytes.")
    mem.add_argument("config", help="a config JSON path or directory, or a name in configs/ (e.g. llama_7b)")
    mem.add_argument("--optim", default="apollo",
                     help="optimizer name, or several separated by commas to compare (default: apollo); "
                          "see `lowrank-opt optimizers`")
    mem.add_argument("--optim-args", default=None, help='options, HF style: "rank=256,scale_type=channel"')
    mem.add_argument("--target-modules", default=None,
                     help="low-rank targets of low-rank optimizers: all-linear (default), a regex, or names separated "
                          "by commas")
    mem.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weight dtype (default bf16)")
    mem.add_argument("--batch-size", type=int, default=1, help="per-GPU micro-batch (default 1)")
    mem.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    mem.add_argument("--gradient-checkpointing", action="store_true", help="per-layer activation checkpointing")
    mem.add_argument("--layerwise", action="store_true",
                     help="per-parameter updates inside backward (only the largest gradient is alive); implied "
                          "by *_layerwise optimizer names")
    mem.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    mem.add_argument("--num-gpus", type=int, default=1, help="data-parallel GPUs (per-GPU figures)")
    master = mem.add_mutually_exclusive_group()
    master.add_argument("--master-weights", dest="master_weights", action="store_true", default=None,
                        help="fp32 master weights with a 16-bit dtype (default: on under ZeRO, else off)")
    master.add_argument("--no-master-weights", dest="master_weights", action="store_false")
    mem.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                     help="attention kernel (eager stores the s x s scores)")
    mem.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                     help="what the run is estimated for (default cuda; cpu: torch's CPU code paths, no CUDA "
                          "context or fragmentation, i.e. the peak of live tensor bytes)")
    mem.add_argument("--weights", default="float", choices=["float", "int8"],
                     help="int8: Linear weights (not the head) in int8 with per-group scales, Q-APOLLO "
                          "(train.py --weights int8)")
    mem.add_argument("--lean-loss", action="store_true",
                     help="the chunked cross-entropy: no tokens x vocabulary tensors (train.py --lean_loss)")
    mem.add_argument("--detail", action="store_true", help="also a table per parameter kind")
    mem.add_argument("--json", action="store_true", help="machine-readable output")

    sub.add_parser("optimizers", help="list the optimizer names the tools and train.py take")
    sub.add_parser("configs", help="list the model configs (./configs and the shipped ones)")
    run = sub.add_parser(
        "run", help="run a stock Hugging Face/TRL script or command with --optim taking lowrank-opt's names",
        description="Run a training script you cannot edit (SCRIPT.py, -m MODULE, or a command such as trl, "
                    "torchrun, accelerate) with transformers' Trainer and TrainingArguments replaced by "
                    "lowrank-opt's, so --optim apollo (and every lowrank-opt name) works. Everything after "
                    "`run` (and an optional --) is the target's own command line.")
    run.add_argument("target", nargs=argparse.REMAINDER, help="SCRIPT.py | -m MODULE | COMMAND, then its arguments")
    return parser


def _memory(args: argparse.Namespace) -> int:
    from .memory import compare_table, estimate

    names = [n.strip() for n in args.optim.split(",") if n.strip()]
    if not names:
        raise ValueError("--optim needs at least one optimizer name")
    results = []
    for name in names:
        results.append(estimate(
            args.config, name, optim_args=args.optim_args, target_modules=_target_modules(args.target_modules),
            dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len,
            gradient_checkpointing=args.gradient_checkpointing, layerwise=True if args.layerwise else None,
            zero_stage=args.zero_stage, num_gpus=args.num_gpus, master_weights=args.master_weights,
            attn_implementation=args.attn_implementation, device=args.device, weights=args.weights,
            lean_loss=args.lean_loss,
        ))
    if args.json:
        payload = results[0].to_dict() if len(results) == 1 else [r.to_dict() for r in results]
        print(json.dumps(payload, indent=2))
    elif len(results) == 1:
        print(results[0].table(detail=args.detail))
    else:
        print(compare_table(results))
        if args.detail:
            for r in results:
                print()
                print(r.table(detail=True))
    return 0


def _optimizers() -> int:
    from .registry import ALIASES, HF_OPTIMIZERS, OPTIMIZERS

    print("lowrank-opt registry (train.py --optim, build_optimizer; each also as NAME_capped):")
    for name in sorted(OPTIMIZERS):
        print(f"  {name:26s}{OPTIMIZERS[name].description}")
    print("Hugging Face names the memory estimator also knows:")
    for name in sorted(HF_OPTIMIZERS):
        print(f"  {name:26s}{HF_OPTIMIZERS[name].description}")
    print("aliases: " + ", ".join(f"{a} -> {b}" + (f" ({', '.join(f'{k}={v}' for k, v in o.items())})" if o else "")
                                  for a, (b, o) in sorted(ALIASES.items())))
    return 0


def _configs() -> int:
    from .memory.configs import known_configs
    from .resources import search_dirs

    names = known_configs()
    if not names:
        print(f"no configs found in {', '.join(map(str, search_dirs()))}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


def _one_line(exc: BaseException) -> str:
    """The message on one line, as argparse prints its own errors (some libraries' messages span lines)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command in ``argv`` (default ``sys.argv[1:]``); returns the exit status. Bad input (an unknown
    config or optimizer, bad options, an invalid regex) prints one line, ``lowrank-opt COMMAND: error: ...``,
    to stderr and returns 2, as argparse does for bad arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":  # everything after it is the target's command line, not ours to parse
        from .integrations.launch import UnsupportedVersion, run

        try:
            return run(argv[1:])
        except ValueError as exc:
            print(f"{PROG} run: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        except UnsupportedVersion as exc:
            print(str(exc.code), file=sys.stderr)
            return 2
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "memory":
            return _memory(args)
        if args.command == "optimizers":
            return _optimizers()
        if args.command == "configs":
            return _configs()
    except (ValueError, TypeError, OSError) as exc:  # bad input; anything else is a bug and keeps its traceback
        print(f"{PROG} {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2


if __name__ == "__main__":
    sys.exit(main())
