"""TRL with lowrank-opt's optimizers: your SFT script, one changed line::

    from lowrank_opt.integrations.trl import SFTConfig, SFTTrainer   # was: from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir="out", optim="apollo_mini", learning_rate=1e-2)   # or --optim apollo_mini ...
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()

``SFTConfig``/``SFTTrainer`` are TRL's classes with ``--optim`` also taking every lowrank-opt name (with
``--optim_args`` and ``--optim_target_modules``), built by :func:`lowrank_opt.integrations.hf.lowrank_arguments_class`
and :func:`~lowrank_opt.integrations.hf.lowrank_trainer_class`; TRL's other trainers the same way: any
``<Name>Config`` / ``<Name>Trainer`` of ``trl`` is available here under its own name (``DPOConfig``,
``DPOTrainer``, ...). Hugging Face's own optimizer names work unchanged through the same classes.

Tested with trl 1.16 and transformers 5.24 (the versions pinned in the test extra).
"""

from __future__ import annotations

from typing import Any

import trl

from .hf import lowrank_arguments_class, lowrank_trainer_class

SFTConfig = lowrank_arguments_class(trl.SFTConfig, "SFTConfig", __name__)
SFTTrainer = lowrank_trainer_class(trl.SFTTrainer, "SFTTrainer", __name__)


def __getattr__(name: str) -> Any:
    """TRL's other ``<Name>Config`` and ``<Name>Trainer`` classes, made on first use (and kept, so that pickled
    arguments find their class here again)."""
    base = getattr(trl, name, None) if name.endswith(("Config", "Trainer")) else None
    if not isinstance(base, type):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from transformers import Trainer, TrainingArguments

    if issubclass(base, TrainingArguments):
        cls = lowrank_arguments_class(base, name, __name__)
    elif issubclass(base, Trainer):
        cls = lowrank_trainer_class(base, name, __name__)
    else:
        raise AttributeError(f"trl.{name} is neither a TrainingArguments nor a Trainer class")
    globals()[name] = cls
    return cls


__all__ = ["SFTConfig", "SFTTrainer"]
