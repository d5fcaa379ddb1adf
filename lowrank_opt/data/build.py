"""``build_datasets``: train and eval rows for ``train.py`` from local files, a hub dataset or the default corpus.

    1. Check the arguments and the files (they exist, one format, not all empty) before any work.
    2. Load the raw rows (``files``), a hub dataset's ``train`` split, or the default corpus (``corpus``).
    3. Make the task's rows: packed blocks for ``"pretrain"`` (``packing``), masked examples for ``"sft"``
       (``sft``).
    4. Hold out ``eval_fraction`` of the rows, chosen with ``seed``, then cap the train rows.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .corpus import default_corpus_documents
from .files import SFT_BUILDERS, TEXT_SAMPLE_BY_CHOICES, _check_not_empty, _load_files, _resolve_data_files
from .packing import _pack_blocks
from .sft import DEFAULT_SFT_FILE, _sft_examples

if TYPE_CHECKING:  # the heavy imports happen inside the functions that need them
    import datasets
    import transformers

TASKS = ("pretrain", "sft")


def build_datasets(
    tokenizer: "transformers.PreTrainedTokenizerBase",
    *,
    data_files: list[str] | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    task: str = "pretrain",
    block_size: int = 128,
    eval_fraction: float = 0.05,
    seed: int = 42,
    max_train_samples: int | None = None,
    text_field: str = "text",
    text_sample_by: str = "paragraph",
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
) -> "tuple[datasets.Dataset, datasets.Dataset | None]":
    """Train and eval datasets for ``task`` (the steps: this module's docstring; the pipelines: ``packing``
    and ``sft``).

    Args:
        tokenizer: a Hugging Face tokenizer with an eos token (``load_tokenizer`` output).
        data_files: local files (globs allowed), all with one builder: ``.txt`` (text), ``.json``/``.jsonl``
            (json), ``.parquet``, ``.csv``. Checked to exist before any work.
        dataset_name, dataset_config: a hub dataset (its ``train`` split); needs network.
            With neither ``data_files`` nor ``dataset_name``: the default corpus for ``"pretrain"``,
            ``DEFAULT_SFT_FILE`` for ``"sft"``.
        task: ``"pretrain"`` (packed blocks) or ``"sft"`` (one masked example per row).
        block_size: tokens per pretraining block; the maximum length of an SFT example.
        eval_fraction: share of the blocks (pretrain) or examples (sft) held out, in [0, 1); at least one row
            when > 0; 0 returns ``None`` for eval.
        seed: chooses the eval rows.
        max_train_samples: keep at most this many train rows (the first ones), after the eval split.
        text_field: the column holding the documents (pretrain with json/parquet/csv/hub data).
        text_sample_by: rows of a ``.txt`` file: ``"paragraph"`` (default; text between blank lines),
            ``"line"`` or ``"document"`` (the whole file). Each row gets its own eos.
        cache_dir: the ``datasets`` cache for loaded files (default: the HF cache).
        num_proc: processes for tokenization (``Dataset.map``).

    Returns:
        ``(train, eval)``; eval is ``None`` when ``eval_fraction == 0``. Columns: ``input_ids`` and ``labels``.

    Raises:
        FileNotFoundError: a data file (or glob) that does not exist, before anything is loaded.
        ValueError: bad arguments, an unsupported or mixed file extension, empty files (before anything is
            loaded), a JSON file that does not parse (naming the file and line), a missing column, too little
            data.
    """
    # 1. Arguments and files, before any work.
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(map(repr, TASKS))}, got {task!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if not (isinstance(eval_fraction, (int, float)) and 0.0 <= eval_fraction < 1.0):
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    if max_train_samples is not None and (isinstance(max_train_samples, bool) or not isinstance(max_train_samples, int)
                                          or max_train_samples < 1):
        raise ValueError(f"max_train_samples must be None or an integer >= 1, got {max_train_samples!r}")
    if text_sample_by not in TEXT_SAMPLE_BY_CHOICES:
        raise ValueError(f"text_sample_by must be one of {', '.join(map(repr, TEXT_SAMPLE_BY_CHOICES))}, "
                         f"got {text_sample_by!r}")
    if data_files is not None and dataset_name is not None:
        raise ValueError("pass data_files or dataset_name, not both")
    if dataset_config is not None and dataset_name is None:
        raise ValueError("dataset_config needs dataset_name")
    if data_files is None and dataset_name is None and task == "sft":
        data_files = [str(DEFAULT_SFT_FILE)]
    files, builder = _resolve_data_files(data_files) if data_files is not None else ([], None)
    if task == "sft" and builder is not None and builder not in SFT_BUILDERS:
        raise ValueError(f"task 'sft' reads records from .json, .jsonl or .parquet files, got {builder!r} files "
                         f"({files[0]})")
    if builder is not None:
        _check_not_empty(files, builder)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; pretraining needs it between documents and SFT after "
                         "each response")

    # 2. Raw rows.
    if builder is not None:
        source = f"data files {files}" if len(files) <= 3 else f"{len(files)} data files ({files[0]}, ...)"
        raw = _load_files(files, builder, text_sample_by=text_sample_by, cache_dir=cache_dir)
    elif dataset_name is not None:
        import datasets

        source = f"dataset {dataset_name!r}" + (f" ({dataset_config!r})" if dataset_config else "")
        raw = datasets.load_dataset(dataset_name, dataset_config, split="train",
                                    cache_dir=None if cache_dir is None else str(cache_dir))
    else:
        import datasets

        source = "the default corpus (pydoc_data.topics)"
        raw = datasets.Dataset.from_dict({"text": default_corpus_documents()})

    # 3. Rows for the task.
    if task == "pretrain":
        if text_field not in raw.column_names:
            raise ValueError(f"text field {text_field!r} not found in {source}; columns are {raw.column_names}. "
                             "Pass text_field=<column>.")
        rows = _pack_blocks(raw, tokenizer, text_field=text_field, block_size=block_size, num_proc=num_proc,
                            need_eval=eval_fraction > 0)
    else:
        rows = _sft_examples(raw, tokenizer, block_size=block_size, num_proc=num_proc, source=source)
        if eval_fraction > 0 and len(rows) < 2:
            raise ValueError(f"too little data: {len(rows)} SFT example(s) from {source}; eval_fraction="
                             f"{eval_fraction} needs at least 2 (one train, one eval), or pass eval_fraction=0")

    # 4. Held-out split, then the train cap.
    train, evaluation = _split(rows, eval_fraction=eval_fraction, seed=seed)
    if max_train_samples is not None and len(train) > max_train_samples:
        train = train.select(range(max_train_samples))
    return train, evaluation


def _split(rows: "datasets.Dataset", *, eval_fraction: float,
           seed: int) -> "tuple[datasets.Dataset, datasets.Dataset | None]":
    """Eval rows drawn with ``seed`` (at least one when ``eval_fraction > 0``, and at least one row is left to
    train on); both parts keep the row order (Trainer shuffles the train rows itself)."""
    import numpy as np

    if eval_fraction == 0:
        return rows, None
    n_rows = len(rows)
    n_eval = min(max(1, round(eval_fraction * n_rows)), n_rows - 1)
    permutation = np.random.default_rng(seed).permutation(n_rows)
    return rows.select(np.sort(permutation[n_eval:])), rows.select(np.sort(permutation[:n_eval]))
