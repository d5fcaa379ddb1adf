"""A stock Hugging Face Trainer script, with lowrank-opt's optimizers by name: the only change from the
transformers original is the import line marked below.

    python docs/examples/hf_trainer.py --output_dir out --optim apollo --optim_args rank=32 --max_steps 50
    python docs/examples/hf_trainer.py --output_dir out --optim apollo_mini_layerwise --max_steps 50
    python docs/examples/hf_trainer.py --output_dir out --optim adamw_torch --max_steps 50     # HF's own names too
    python docs/examples/hf_trainer.py --output_dir out --optim apollo --max_steps 100 \\
        --save_strategy steps --save_steps 50 --resume_from_checkpoint out/checkpoint-50

Every Trainer flag works (``--learning_rate``, ``--save_steps``, ``--report_to``, ...). The model is a tiny
LLaMA from lowrank-opt's shipped configs (random init) and the data the shipped offline corpus, so it runs on a
CPU in seconds with no network.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorForLanguageModeling, HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

# The one changed line. Was: from transformers import Trainer, TrainingArguments
from lowrank_opt.integrations.hf import Trainer, TrainingArguments  # noqa: E402


@dataclass
class ScriptArguments:
    model_config: str = field(default="llama_tiny", metadata={"help": "a shipped config name or a config JSON"})
    block_size: int = field(default=64, metadata={"help": "tokens per training sequence"})
    max_train_samples: int = field(default=512, metadata={"help": "training sequences"})


def main(argv=None):
    from lowrank_opt.data import build_datasets, load_tokenizer
    from lowrank_opt.resources import find_config

    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    script_args, training_args = parser.parse_args_into_dataclasses(argv)
    tokenizer = load_tokenizer(None)  # the offline tokenizer shipped with lowrank-opt
    config = AutoConfig.from_pretrained(str(find_config(script_args.model_config)), vocab_size=len(tokenizer),
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    train_ds, _ = build_datasets(tokenizer, block_size=script_args.block_size, eval_fraction=0.0,
                                 max_train_samples=script_args.max_train_samples, seed=training_args.seed)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return trainer


if __name__ == "__main__":
    main()
