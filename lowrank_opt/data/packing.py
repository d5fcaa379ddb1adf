"""Pretraining rows: documents tokenized, joined into one stream and cut into equal blocks (causal LM packing).

    1. Tokenize each document without special tokens and append ``eos`` (documents that are empty or only
       whitespace are skipped).
    2. Concatenate all documents, in order, into one stream and cut it into blocks of ``block_size`` tokens;
       the remainder shorter than a block is dropped. ``labels`` equals ``input_ids`` (the model shifts).
       The packing is global, so the blocks are exactly a prefix of the stream; it holds the stream in memory
       (4 bytes a token), which suits corpora up to a few hundred million tokens.

Rows are equal length, so ``transformers.default_data_collator`` batches them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the heavy import happens inside the function that needs it
    import datasets


def _pack_blocks(raw: "datasets.Dataset", tokenizer, *, text_field: str, block_size: int, num_proc: int | None,
                 need_eval: bool) -> "datasets.Dataset":
    """Tokenize documents (+ eos each), concatenate in order and cut into ``block_size`` blocks."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = [text for text in batch[text_field] if text is not None]
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"text field {text_field!r} must hold strings, got {type(text).__name__}")
        texts = [text for text in texts if text.strip()]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return {"input_ids": [ids + [eos] for ids in encoded]}

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names, features=features,
                        num_proc=num_proc, desc="Tokenizing")
    # The packing is global (not per map batch), so the blocks are exactly a prefix of the token stream.
    # It holds the stream in memory once, 4 bytes a token.
    stream = pc.list_flatten(tokenized.with_format("arrow")[:]["input_ids"])
    n_tokens = len(stream)
    n_blocks = n_tokens // block_size
    if n_blocks == 0:
        raise ValueError(f"too little data: {n_tokens} tokens, fewer than block_size={block_size}; need at least "
                         f"{block_size} tokens for one block")
    if need_eval and n_blocks < 2:
        raise ValueError(f"too little data: {n_tokens} tokens make {n_blocks} block of block_size={block_size}; a "
                         f"train/eval split needs at least 2 blocks ({2 * block_size} tokens), or pass eval_fraction=0")
    values = stream.slice(0, n_blocks * block_size)
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    blocks = pa.FixedSizeListArray.from_arrays(values, block_size)
    return datasets.Dataset(pa.table({"input_ids": blocks, "labels": blocks}))
