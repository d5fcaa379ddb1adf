"""Train a causal LM with APOLLO (or any registry / Hugging Face optimizer) on the Hugging Face Trainer.

    python train.py                                   # tiny LLaMA on CPython's docs, CPU, about a minute
    python train.py --config configs/tiny.yaml --optim apollo_mini --max_steps 100
    python train.py --model_config configs/llama_60m.json --data_files corpus.txt --optim apollo \\
        --optim_args "rank=128,scale=1,update_proj_gap=200,scale_type=channel" --optim_target_modules all-linear
    python train.py --model_name_or_path ./my-model --task sft --data_files chats.jsonl --optim apollo_layerwise

Reads top to bottom: parse -> check -> build (tokenizer, model, data, optimizer) -> Trainer.train().
Every option of ``transformers.TrainingArguments`` is accepted, plus ours below. ``--config FILE`` (YAML or
JSON; a path from the working directory, or a name among the shipped configs) sets defaults that
command-line flags override; without ``--config``, the shipped tiny.yaml is used. A config's ``optim_args``
and ``optim_target_modules`` belong to the config's ``optim``: ``--optim`` naming another optimizer gets that
optimizer's own defaults. Outputs go to ./outputs/<config name> unless ``--output_dir`` says otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

DEFAULT_CONFIG = "tiny.yaml"  # among the shipped configs (lowrank_opt.resources)
logger = logging.getLogger("train")


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A local model directory or a hub id (needs network): fine-tune it."})
    model_config: Optional[str] = field(
        default=None, metadata={"help": "A transformers config JSON or a shipped config name (e.g. llama_60m or "
                                        "configs/llama_60m.json): random init."})
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer; default: the model directory's, else the offline one in configs/tokenizer."})
    model_dtype: str = field(default="float32", metadata={
        "help": "Dtype of the weights themselves: float32, or bfloat16 for pure-bf16 training (APOLLO writes its "
                "fp32 update back with stochastic rounding). --bf16 is the separate mixed-precision switch."})
    weights: str = field(default="float", metadata={
        "help": "float, or int8 (Q-APOLLO): every Linear weight but the output head stored in int8 with an fp32 "
                "scale per row and --int8_group_size columns, dequantized one layer at a time, updated by the "
                "optimizer in fp32 row blocks and re-quantized with seeded stochastic rounding (lowrank-opt "
                "optimizers only; one process)."})
    int8_group_size: int = field(default=128, metadata={"help": "Columns per int8 scale (--weights int8)."})


@dataclass
class DataArguments:
    task: str = field(default="pretrain", metadata={"help": "pretrain (packed causal LM) or sft (loss on responses only)."})
    data_files: Optional[list[str]] = field(
        default=None, metadata={"help": "Local .txt/.json/.jsonl/.parquet files; default: the embedded corpus."})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A hub dataset name (needs network)."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "The hub dataset's config name."})
    text_field: str = field(default="text", metadata={"help": "Column holding the text for pretraining."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Held-out fraction for eval loss/perplexity."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Cap on training sequences."})
    memory_report: bool = field(default=False, metadata={
        "help": "Log measured memory each step (CUDA peaks; on CPU optimizer-state bytes and peak RSS) and print "
                "it at the end next to lowrank_opt.memory.estimate's prediction for this run."})


def parse_args(argv: list[str]):
    """Dataclasses from --config (YAML/JSON) overridden by the command line."""
    from transformers import HfArgumentParser

    from lowrank_opt.integrations.hf import TrainingArguments
    from lowrank_opt.resources import find_config

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.add_argument("--config", default=None, help="YAML or JSON file of defaults: a path, or a shipped "
                                                       "config name (default: tiny.yaml).")
    config_path = find_config(_pop_flag(argv, "--config") or DEFAULT_CONFIG)
    text = config_path.read_text()
    if config_path.suffix == ".json":
        defaults = json.loads(text)
    else:
        import yaml

        defaults = yaml.safe_load(text) or {}
    if not isinstance(defaults, dict):
        raise ValueError(f"--config {config_path} must hold a mapping of option: value, got {type(defaults).__name__}")
    for key in ("model_config", "data_files"):
        defaults[key] = _resolve_config_paths(defaults.get(key), config_path)
    defaults = {k: v for k, v in defaults.items() if v is not None}
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {config_path}; use the options of "
                         "`python train.py --help`")
    if _given(argv, "--model_name_or_path"):
        defaults.pop("model_config", None)  # fine-tuning a given model overrides the config's random-init model
    cli_optim = _flag_value(argv, "--optim")
    if cli_optim is not None and defaults.get("optim") is not None and cli_optim != defaults["optim"]:
        # The file's optimizer options were written for its optimizer, not for the one asked for here.
        dropped = {k: defaults.pop(k) for k in ("optim_args", "optim_target_modules") if k in defaults}
        if dropped:
            logger.info("--optim %s: %s's %s (for %s) not used; %s gets its own defaults", cli_optim, config_path.name,
                        ", ".join(f"{k}={v!r}" for k, v in dropped.items()), defaults["optim"], cli_optim)
    parser.set_defaults(**defaults)
    if "output_dir" not in defaults and not _given(argv, "--output_dir"):
        argv = argv + ["--output_dir", str(Path.cwd() / "outputs" / config_path.stem)]
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)[:3]  # 4th: the --config namespace
    return model_args, data_args, training_args


def _resolve_config_paths(value, config_path: Path):
    """Paths in a config file: from the working directory if they exist there, else next to the config file,
    else a shipped config name (``llama_tiny``) or relative path (``configs/llama_tiny.json``)."""
    from lowrank_opt.resources import find_config

    if isinstance(value, list):
        return [_resolve_config_paths(v, config_path) for v in value]
    if not isinstance(value, str) or Path(value).is_absolute() or Path(value).exists():
        return value
    beside = config_path.parent / value
    if beside.exists():
        return str(beside)
    try:
        return str(find_config(value))
    except FileNotFoundError:
        return value  # check_arguments names it


def _pop_flag(argv: list[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(flag + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _flag_value(argv: list[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Everything that can be checked without building anything, before any file is written (a lowrank-opt
    name and its options were resolved when the arguments were parsed)."""
    if model_args.model_name_or_path and model_args.model_config:
        raise ValueError("give --model_name_or_path (fine-tune) or --model_config (random init), not both")
    if not model_args.model_name_or_path and not model_args.model_config:
        raise ValueError("give --model_name_or_path or --model_config")
    if model_args.model_config:
        from lowrank_opt.resources import find_config

        model_args.model_config = str(find_config(model_args.model_config))  # FileNotFoundError names it
    for path in data_args.data_files or []:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--data_files {path} does not exist")
    if model_args.model_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--model_dtype must be 'float32' or 'bfloat16', got {model_args.model_dtype!r}")
    if model_args.weights not in ("float", "int8"):
        raise ValueError(f"--weights must be 'float' or 'int8', got {model_args.weights!r}")
    if model_args.weights == "int8":
        if training_args.lowrank_optim is None:
            raise ValueError(f"--weights int8 needs a lowrank-opt optimizer (it updates the int8 weights itself); "
                             f"--optim {optimizer_name(training_args)} cannot")
        if training_args.deepspeed or training_args.fsdp or training_args.world_size > 1:
            raise ValueError("--weights int8 runs in one process (no DeepSpeed, FSDP or data parallelism)")
        if model_args.int8_group_size < 1:
            raise ValueError(f"--int8_group_size must be >= 1, got {model_args.int8_group_size}")
    if data_args.task not in ("pretrain", "sft"):
        raise ValueError(f"--task must be 'pretrain' or 'sft', got {data_args.task!r}")
    name = optimizer_name(training_args)
    if training_args.fsdp and _runs_on_cpu(training_args):
        raise ValueError(
            "--fsdp on CPU: accelerate runs FSDP only on GPUs and would silently train with plain data parallelism "
            "(DDP) instead; for FSDP2 on CPU use torch directly (docs/examples/fsdp2.py runs on CPU ranks with "
            "gloo), on GPUs --fsdp works with every non-layer-wise --optim name")
    if training_args.deepspeed:
        from lowrank_opt.integrations.deepspeed import check_deepspeed_config

        check_deepspeed_config(training_args.deepspeed)  # e.g. offload that would swap our optimizer out
    if training_args.lowrank_optim is None and training_args.optim_target_modules is None and \
            any(k in name for k in ("galore", "apollo_adamw")):
        training_args.optim_target_modules = "all-linear"  # HF's low-rank optimizers need targets; as ours default
        logger.info("--optim %s: --optim_target_modules all-linear (the default of lowrank-opt's names)", name)


def optimizer_name(training_args) -> str:
    """The --optim name as given: a lowrank-opt name or one of Hugging Face's."""
    return training_args.lowrank_optim or getattr(training_args.optim, "value", training_args.optim)


def _runs_on_cpu(training_args) -> bool:
    import torch

    return bool(training_args.use_cpu) or not torch.cuda.is_available()


def build_tokenizer(model_args: ModelArguments):
    from lowrank_opt.data import load_tokenizer

    return load_tokenizer(model_args.tokenizer_name_or_path or model_args.model_name_or_path)


def build_model(model_args: ModelArguments, tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, model_args.model_dtype)
    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype)
    config = AutoConfig.from_pretrained(model_args.model_config)
    if config.vocab_size != len(tokenizer):
        logger.info("vocab_size %d -> %d to match the tokenizer", config.vocab_size, len(tokenizer))
        config.vocab_size = len(tokenizer)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, key, getattr(tokenizer, key))
    return AutoModelForCausalLM.from_config(config).to(dtype)


def memory_callbacks(data_args: DataArguments, training_args, model) -> list:
    """[MemoryCallback] with this run's estimate when --memory_report is on (no estimate for optimizers the
    estimator does not know; the measurement is still logged)."""
    if not data_args.memory_report:
        return []
    import torch

    from lowrank_opt.memory import MemoryCallback, estimate

    from lowrank_opt.quant import Int8Linear

    name = optimizer_name(training_args)
    resolved = training_args.lowrank_resolved  # None for a Hugging Face name: the estimator resolves it
    weight_dtype = next(model.parameters()).dtype
    int8 = any(isinstance(m, Int8Linear) for m in model.modules())
    try:
        predicted = estimate(
            model.config, resolved or name, optim_args=None if resolved else training_args.optim_args,
            target_modules=None if resolved else training_args.optim_target_modules,
            dtype="bf16" if weight_dtype == torch.bfloat16 else "fp32",
            batch_size=training_args.per_device_train_batch_size, seq_len=data_args.block_size,
            gradient_checkpointing=training_args.gradient_checkpointing,
            weights="int8" if int8 else "float", lean_loss=bool(getattr(training_args, "lean_loss", False)),
        )
    except (ValueError, KeyError, NotImplementedError) as error:
        logger.warning("--memory_report: no estimate for --optim %s (%s); measuring only", name, error)
        predicted = None
    return [MemoryCallback(estimate=predicted)]


def build(argv: list[str]):
    """Steps 1-2 of :func:`main`: parse, check, build tokenizer, data, model and the Trainer, which builds the
    optimizer the ``--optim`` name stands for while it is constructed (so a bad option, target or rank fails
    before anything is written) and trains with it. Returns (trainer, data_args, training_args)."""
    from transformers import set_seed

    from lowrank_opt.data import build_datasets, collator_for
    from lowrank_opt.integrations.hf import Trainer

    # 1. Parse and check: bad input fails here, before anything is built or written.
    model_args, data_args, training_args = parse_args(list(argv))
    check_arguments(model_args, data_args, training_args)
    if training_args.deepspeed:  # ZeRO-3 partitions the model while it is built: its process group must exist
        import deepspeed

        deepspeed.init_distributed()
    set_seed(training_args.seed)
    # 2. Build tokenizer, data, model, and the Trainer with its optimizer (still nothing written).
    tokenizer = build_tokenizer(model_args)
    train_ds, eval_ds = build_datasets(
        tokenizer, data_files=data_args.data_files, dataset_name=data_args.dataset_name,
        dataset_config=data_args.dataset_config, task=data_args.task, block_size=data_args.block_size,
        eval_fraction=data_args.eval_fraction, seed=training_args.seed,
        max_train_samples=data_args.max_train_samples, text_field=data_args.text_field,
    )
    model = build_model(model_args, tokenizer)
    if model_args.weights == "int8":
        from lowrank_opt.quant import quantize_model_

        quantized = quantize_model_(model, group_size=model_args.int8_group_size)
        logger.info("--weights int8: %d Linear weights in int8 (group %d)", len(quantized), model_args.int8_group_size)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model %.2fM parameters, optimizer %s, %d train / %d eval sequences of %d tokens", n_params / 1e6,
                optimizer_name(training_args), len(train_ds), len(eval_ds) if eval_ds is not None else 0,
                data_args.block_size)
    # lowrank-opt's Trainer builds the optimizer the --optim name stands for, ours or Hugging Face's, now.
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=collator_for(data_args.task, tokenizer), processing_class=tokenizer,
        callbacks=memory_callbacks(data_args, training_args, model), build_optimizer=True,
    )
    return trainer, data_args, training_args


def main(argv: Optional[list[str]] = None):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    trainer, data_args, training_args = build(list(sys.argv[1:] if argv is None else argv))
    # 3. Train.
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
        metrics.update(eval_metrics)
    trainer.log_metrics("final", metrics)
    trainer.save_model()  # on every rank: ZeRO-3 gathers the weights collectively; only rank 0 writes
    trainer.save_metrics("all", metrics)
    _shutdown_process_group()
    return trainer, metrics


def _shutdown_process_group() -> None:
    """End the run's process group on every rank together. Left to interpreter exit, gloo's threads can
    outlive it and abort a rank (seen with ZeRO-3 on CPU)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
