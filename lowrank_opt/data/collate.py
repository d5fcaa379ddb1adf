"""Collators for ``Trainer``: equal-length pretraining blocks need none of their own; SFT rows are padded."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from .build import TASKS
from .sft import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class SFTCollator:
    """Pads SFT rows on the right: ``input_ids`` with ``pad_token_id``, ``labels`` with -100,
    ``attention_mask`` 1 on real tokens. A plain object so DataLoader workers can pickle it."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, "Any"]:
        import torch

        width = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            length = len(ids)
            input_ids[row, :length] = ids
            labels[row, :length] = torch.as_tensor(feature["labels"] if "labels" in feature else ids, dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sft_collator(tokenizer, *, pad_to_multiple_of: int | None = None) -> SFTCollator:
    """A collator for ``task="sft"`` rows; see ``SFTCollator``."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token (load it with load_tokenizer, which sets pad = eos)")
    if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool)
                                           or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be None or an integer >= 1, got {pad_to_multiple_of!r}")
    return SFTCollator(pad_token_id=int(tokenizer.pad_token_id), pad_to_multiple_of=pad_to_multiple_of)


def collator_for(task: str, tokenizer) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The ``data_collator`` for ``Trainer``: ``default_data_collator`` for equal-length pretraining blocks,
    ``sft_collator(tokenizer)`` for SFT rows."""
    if task == "pretrain":
        from transformers import default_data_collator

        return default_data_collator
    if task == "sft":
        return sft_collator(tokenizer)
    raise ValueError(f"task must be one of {', '.join(map(repr, TASKS))}, got {task!r}")
