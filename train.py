"""Train a causal LM with APOLLO (or any registry / Hugging Face optimizer) on the Hugging Face Trainer.

    python train.py                                   # tiny LLaMA on CPython's docs, CPU, about a minute
    python train.py --config configs/tiny.yaml --optim apollo_mini --max_steps 100
    python train.py --model_config configs/llama_60m.json --data_files corpus.txt --optim apollo \\
        --optim_args "rank=128,scale=1,update_proj_gap=200,scale_type=channel" --optim_target_modules all-linear
    python train.py --model_name_or_path ./my-model --task sft --data_files chats.jsonl --optim apollo_layerwise

Reads top to bottom: parse -> check -> build (tokenizer, model, data, optimizer) -> Trainer.train().
Every option of ``transformers.TrainingArguments`` is accepted, plus ours below. ``--config FILE`` (YAML or
JSON) sets defaults that command-line flags override; without ``--config``, configs/tiny.yaml is used.
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

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "configs" / "tiny.yaml"
logger = logging.getLogger("train")


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A local model directory or a hub id (needs network): fine-tune it."})
    model_config: Optional[str] = field(
        default=None, metadata={"help": "A transformers config JSON (e.g. configs/llama_60m.json): random init."})
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer; default: the model directory's, else the offline one in configs/tokenizer."})
    model_dtype: str = field(default="float32", metadata={
        "help": "Dtype of the weights themselves: float32, or bfloat16 for pure-bf16 training (APOLLO writes its "
                "fp32 update back with stochastic rounding). --bf16 is the separate mixed-precision switch."})


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

    from lowrank_opt.integrations.hf import LowRankTrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, LowRankTrainingArguments))
    parser.add_argument("--config", default=None, help="YAML or JSON file of defaults (default: configs/tiny.yaml).")
    config_path = Path(_pop_flag(argv, "--config") or DEFAULT_CONFIG)
    if not config_path.is_file():
        raise FileNotFoundError(f"--config {config_path} does not exist")
    text = config_path.read_text()
    if config_path.suffix == ".json":
        defaults = json.loads(text)
    else:
        import yaml

        defaults = yaml.safe_load(text) or {}
    for key in ("model_config", "data_files", "model_name_or_path", "tokenizer_name_or_path"):
        defaults[key] = _resolve_repo_paths(defaults.get(key))
    defaults = {k: v for k, v in defaults.items() if v is not None}
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {config_path}")
    if any(a == "--model_name_or_path" or a.startswith("--model_name_or_path=") for a in argv):
        defaults.pop("model_config", None)  # fine-tuning a given model overrides the config's random-init model
    parser.set_defaults(**defaults)
    if "output_dir" not in defaults and "--output_dir" not in argv:
        argv = argv + ["--output_dir", str(REPO / "outputs" / config_path.stem)]
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)[:3]  # 4th: the --config namespace
    return model_args, data_args, training_args


def _resolve_repo_paths(value):
    """Relative paths in a config file name files in this repo when they are not found from the cwd."""
    if isinstance(value, list):
        return [_resolve_repo_paths(v) for v in value]
    if isinstance(value, str) and not Path(value).is_absolute() and not Path(value).exists() and (REPO / value).exists():
        return str(REPO / value)
    return value


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


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Everything that can be checked without building anything, before any file is written."""
    from lowrank_opt.integrations.hf import is_layerwise

    if model_args.model_name_or_path and model_args.model_config:
        raise ValueError("give --model_name_or_path (fine-tune) or --model_config (random init), not both")
    if not model_args.model_name_or_path and not model_args.model_config:
        raise ValueError("give --model_name_or_path or --model_config")
    if model_args.model_config and not Path(model_args.model_config).is_file():
        raise FileNotFoundError(f"--model_config {model_args.model_config} does not exist")
    for path in data_args.data_files or []:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--data_files {path} does not exist")
    if model_args.model_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--model_dtype must be 'float32' or 'bfloat16', got {model_args.model_dtype!r}")
    if data_args.task not in ("pretrain", "sft"):
        raise ValueError(f"--task must be 'pretrain' or 'sft', got {data_args.task!r}")
    name = training_args.lowrank_optim or training_args.optim.value
    if training_args.fsdp and _runs_on_cpu(training_args):
        raise ValueError(
            "--fsdp on CPU: accelerate runs FSDP only on GPUs and would silently train with plain data parallelism "
            "(DDP) instead. For FSDP2 on CPU use torch directly (docs/examples/fsdp2.py runs on CPU ranks with "
            "gloo); on GPUs --fsdp works with every --optim name")
    if training_args.deepspeed:
        from lowrank_opt.integrations.deepspeed import check_deepspeed_config

        check_deepspeed_config(training_args.deepspeed)  # e.g. offload that would swap our optimizer out
    if is_layerwise(name, training_args):
        if training_args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"--optim {name} updates each parameter inside backward and frees its gradient, so it cannot "
                f"accumulate gradients over {training_args.gradient_accumulation_steps} steps: set "
                "--gradient_accumulation_steps 1 and raise --per_device_train_batch_size, or use the non-layer-wise "
                "optimizer")
        if training_args.world_size > 1:
            raise ValueError(
                f"--optim {name} cannot run data parallel ({training_args.world_size} processes): its updates run "
                "before gradients are all-reduced. Use the non-layer-wise optimizer (or DeepSpeed) for multi-GPU")
        if training_args.max_grad_norm and training_args.max_grad_norm > 0:
            logger.warning("layer-wise updates leave no gradients to clip: --max_grad_norm %s is turned off; the "
                           "optimizer's norm_growth_limit (per tensor) replaces it", training_args.max_grad_norm)
            training_args.max_grad_norm = 0.0


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


def build_optimizer_option(training_args, model):
    """(optimizer class, kwargs) for our names (validated now, built by the Trainer); None for HF's names.
    Under DeepSpeed, APOLLO becomes ZeroApollo with one param group per matrix (shape-aware shards)."""
    from lowrank_opt.integrations.hf import optimizer_cls_and_kwargs, validate

    if training_args.lowrank_optim is None:
        return None
    if training_args.deepspeed:
        from lowrank_opt.integrations.deepspeed import hf_optimizer_cls_and_kwargs

        cls, kwargs = hf_optimizer_cls_and_kwargs(training_args.lowrank_optim, model, training_args)
        cls(**{**kwargs, "params": [dict(g) for g in kwargs["params"]]})  # validate: construction has no side effects
        return cls, kwargs
    validate(training_args.lowrank_optim, model, training_args)
    return optimizer_cls_and_kwargs(training_args.lowrank_optim, model, training_args)


def memory_callbacks(data_args: DataArguments, training_args, model) -> list:
    """[MemoryCallback] with this run's estimate when --memory_report is on (no estimate for optimizers the
    estimator does not know; the measurement is still logged)."""
    if not data_args.memory_report:
        return []
    import torch

    from lowrank_opt.memory import MemoryCallback, estimate

    name = training_args.lowrank_optim or training_args.optim.value
    weight_dtype = next(model.parameters()).dtype
    try:
        predicted = estimate(
            model.config, name, optim_args=training_args.optim_args,
            target_modules=training_args.optim_target_modules or "all-linear",
            dtype="bf16" if weight_dtype == torch.bfloat16 else "fp32",
            batch_size=training_args.per_device_train_batch_size, seq_len=data_args.block_size,
            gradient_checkpointing=training_args.gradient_checkpointing,
        )
    except (ValueError, KeyError, NotImplementedError) as error:
        logger.warning("--memory_report: no estimate for --optim %s (%s); measuring only", name, error)
        predicted = None
    return [MemoryCallback(estimate=predicted)]


def main(argv: Optional[list[str]] = None):
    from transformers import Trainer, set_seed

    from lowrank_opt.data import build_datasets, collator_for

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # 1. Parse and check: bad input fails here, before anything is built or written.
    model_args, data_args, training_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    check_arguments(model_args, data_args, training_args)
    if training_args.deepspeed:  # ZeRO-3 partitions the model while it is built: its process group must exist
        import deepspeed

        deepspeed.init_distributed()
    set_seed(training_args.seed)
    # 2. Build tokenizer, model, data and optimizer (still nothing written).
    tokenizer = build_tokenizer(model_args)
    model = build_model(model_args, tokenizer)
    train_ds, eval_ds = build_datasets(
        tokenizer, data_files=data_args.data_files, dataset_name=data_args.dataset_name,
        dataset_config=data_args.dataset_config, task=data_args.task, block_size=data_args.block_size,
        eval_fraction=data_args.eval_fraction, seed=training_args.seed,
        max_train_samples=data_args.max_train_samples, text_field=data_args.text_field,
    )
    optimizer_option = build_optimizer_option(training_args, model)
    name = training_args.lowrank_optim or training_args.optim.value
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model %.2fM parameters, optimizer %s, %d train / %d eval sequences of %d tokens", n_params / 1e6,
                name, len(train_ds), len(eval_ds) if eval_ds is not None else 0, data_args.block_size)
    # 3. Train.
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=collator_for(data_args.task, tokenizer), processing_class=tokenizer,
        optimizer_cls_and_kwargs=optimizer_option, callbacks=memory_callbacks(data_args, training_args, model),
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(result.metrics)
    if eval_ds is not None:
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
