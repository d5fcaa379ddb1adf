"""A stock TRL SFT script, with lowrank-opt's optimizers by name: the only change from the TRL original is
the import line marked below.

    python docs/examples/trl_sft.py --output_dir out --optim apollo --optim_args rank=16 --max_steps 30 --use_cpu true
    python docs/examples/trl_sft.py --output_dir out --optim apollo_mini --max_steps 30 --save_steps 10 --use_cpu true
    python docs/examples/trl_sft.py --output_dir out --optim adamw_torch --max_steps 30 --use_cpu true  # HF's names too

Supervised fine-tuning of a tiny LLaMA (lowrank-opt's shipped config, random init) on the shipped
prompt/response JSONL (configs/data/sft_example.jsonl), loss on the responses only: on a CPU, in seconds.
Every SFTConfig/Trainer flag works.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

# The one changed line. Was: from trl import SFTConfig, SFTTrainer
from lowrank_opt.integrations.trl import SFTConfig, SFTTrainer  # noqa: E402


@dataclass
class ScriptArguments:
    model_config: str = field(default="llama_tiny", metadata={"help": "a shipped config name or a config JSON"})
    data_files: str = field(default="", metadata={"help": "prompt/response JSONL (default: the shipped example)"})


def to_prompt_completion(row: dict) -> dict:
    """The shipped example mixes the usual SFT schemas (prompt/response, instruction/input/output, chat messages);
    TRL's prompt-completion form for each (the loss then falls on the completion only)."""
    if row.get("messages"):
        *context, last = row["messages"]
        return {"prompt": "\n".join(m["content"] for m in context), "completion": " " + last["content"]}
    if row.get("instruction") is not None:
        prompt = row["instruction"] + (("\n" + row["input"]) if row.get("input") else "")
        return {"prompt": prompt, "completion": " " + row["output"]}
    prompt = ((row["system"] + "\n") if row.get("system") else "") + row["prompt"]
    return {"prompt": prompt, "completion": " " + row["response"]}


def main(argv=None):
    from lowrank_opt.data import load_tokenizer
    from lowrank_opt.resources import configs_dir, find_config

    parser = HfArgumentParser((ScriptArguments, SFTConfig))
    script_args, sft_config = parser.parse_args_into_dataclasses(argv)
    tokenizer = load_tokenizer(None)
    config = AutoConfig.from_pretrained(str(find_config(script_args.model_config)), vocab_size=len(tokenizer),
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    data_files = script_args.data_files or str(configs_dir() / "data" / "sft_example.jsonl")
    dataset = load_dataset("json", data_files=data_files, split="train")
    dataset = dataset.map(to_prompt_completion, remove_columns=dataset.column_names)
    trainer = SFTTrainer(model=model, args=sft_config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=sft_config.resume_from_checkpoint)
    return trainer


if __name__ == "__main__":
    main()
