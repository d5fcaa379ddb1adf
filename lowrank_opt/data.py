"""Data for ``train.py``: the shipped offline tokenizer, packed pretraining blocks and masked SFT examples.

Everything works without network: the default tokenizer lives in ``configs/tokenizer`` and the default
corpus is the English reference text CPython ships in ``pydoc_data.topics``. Hub names (tokenizers,
datasets) are accepted for users who have network; nothing in the tests touches the hub.

Tasks (``build_datasets(task=...)``):

``"pretrain"`` -- causal LM packing.
    1. Load documents: local files (``.txt`` through the ``text`` builder, one row per paragraph by default;
       ``.json``/``.jsonl`` through ``json``; ``.parquet``; ``.csv``), a hub dataset, or the default corpus.
    2. Tokenize each document without special tokens and append ``eos`` (documents that are empty or only
       whitespace are skipped).
    3. Concatenate all documents, in order, into one stream and cut it into blocks of ``block_size`` tokens;
       the remainder shorter than a block is dropped. ``labels`` equals ``input_ids`` (the model shifts).
       The packing is global, so the blocks are exactly a prefix of the stream; it holds the stream in memory
       (4 bytes a token), which suits corpora up to a few hundred million tokens.
    4. Hold out ``eval_fraction`` of the blocks, chosen with ``seed``.
    Rows are equal length, so ``transformers.default_data_collator`` batches them.

``"sft"`` -- supervised fine-tuning with the loss on the responses only.
    Records in JSON/JSONL/parquet, one of:
    ``{"prompt": ..., "response": ...}`` (``"completion"`` is accepted for ``"response"``; optional
    ``"system"``), alpaca style ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional and
    joined to the instruction with a blank line), or chat ``{"messages": [{"role": ..., "content": ...}]}``
    with roles ``system``/``user``/``assistant``. One file may mix them (each record uses the first schema
    whose keys it sets, in the order just given).

    1. Render the conversation with the tokenizer's chat template when it has one, else with the plain format
       (``PLAIN_ROLE_HEADERS``)::

           ### System:\\n{system}\\n### User:\\n{prompt}\\n### Assistant:\\n{response}<eos>

       The text is cut into segments: prompt parts (system and user turns, role headers) and response parts
       (each assistant turn's content and the end-of-turn text the template puts after it, ``eos`` for the
       shipped template and the plain format).
    2. Tokenize the whole text once, then find each segment boundary by tokenizing the text up to it and
       checking that the result is a prefix of the whole tokenization. If a token straddles a boundary
       (no such prefix), the segments are tokenized separately and concatenated instead, so the boundary is
       always exact. A template whose renderings do not grow by appending turns (some elide earlier turns)
       gets labels on the last assistant turn only, with a warning.
    3. ``labels`` are ``-100`` on prompt tokens and the token ids on response tokens.
    4. Truncate to ``block_size`` (no packing across examples). Examples left with no response token are
       dropped with a warning.
    Rows have different lengths: batch them with ``sft_collator(tokenizer)``, which pads on the right.
    ``collator_for(task, tokenizer)`` returns the right collator for either task.

A tiny SFT file ships at ``configs/data/sft_example.jsonl`` (16 records in all three schemas, for smoke runs
and as a format example); it is also the data of ``task="sft"`` when no files or dataset are given.

The shipped tokenizer (``configs/tokenizer``): byte-level BPE, 4096 tokens in all, trained on
``default_corpus_text()``. Special tokens ``<|pad|>`` (0), ``<|bos|>`` (1), ``<|eos|>`` (2) and the chat role
tokens ``<|system|>``, ``<|user|>``, ``<|assistant|>`` (3-5). No token is added automatically when encoding
(``bos`` is defined for users who want it), so ``decode(encode(text)) == text`` for any text. The chat
template renders ``<|role|>\\n{content}\\n`` for system/user turns and ``<|assistant|>\\n{content}<|eos|>`` for
assistant turns. Rebuild it with ``python -m lowrank_opt.data build-tokenizer`` (``--check`` compares a fresh
build with the shipped files). The corpus is whatever the running Python ships, so a Python version other than
the one recorded in ``configs/tokenizer/build_info.json`` gives slightly different merges.

Example:
    >>> from lowrank_opt.data import build_datasets, collator_for, load_tokenizer
    >>> tokenizer = load_tokenizer(None)                                    # the shipped offline tokenizer
    >>> train, evaluation = build_datasets(tokenizer, block_size=128)       # default corpus, packed
    >>> train, evaluation = build_datasets(tokenizer, task="sft", data_files=["configs/data/sft_example.jsonl"])
    >>> data_collator = collator_for("sft", tokenizer)
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:  # the heavy imports happen inside the functions that need them
    import datasets
    import transformers


REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER_DIR = REPO_ROOT / "configs" / "tokenizer"
DEFAULT_SFT_FILE = REPO_ROOT / "configs" / "data" / "sft_example.jsonl"

TASKS = ("pretrain", "sft")
IGNORE_INDEX = -100  # the label torch's cross-entropy (and every HF model) skips

BUILDERS_BY_EXTENSION = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
SFT_BUILDERS = ("json", "parquet")
TEXT_SAMPLE_BY_CHOICES = ("line", "paragraph", "document")

# The shipped tokenizer.
TOKENIZER_VOCAB_SIZE = 4096  # all tokens, special ones included: len(load_tokenizer(None)) == 4096
TOKENIZER_MIN_FREQUENCY = 2
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
CHAT_ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in CHAT_ROLES)
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN) + ROLE_TOKENS  # ids 0..5 in this order
# System/user turns: "<|role|>\n{content}\n". Assistant turns: "<|assistant|>\n{content}<|eos|>", the content and
# the eos inside {% generation %} so HF's return_assistant_tokens_mask agrees with our labels.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# The plain SFT format, for tokenizers without a chat template.
PLAIN_ROLE_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}

_SFT_SCHEMAS = {
    "messages": ("messages",),
    "prompt/response": ("prompt", "response"),
    "prompt/completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}
_SCHEMA_NAMES = "; ".join(f"{name} ({', '.join(keys)})" for name, keys in _SFT_SCHEMAS.items())


# --------------------------------------------------------------------------------------------------------------
# The default corpus


def default_corpus_text() -> str:
    """The English reference text CPython ships in ``pydoc_data.topics``: every topic, in sorted key order,
    joined with a blank line. About 460k characters; it differs a little between Python versions."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip("\n") for key in sorted(topics))


def default_corpus_documents() -> list[str]:
    """``default_corpus_text()`` cut into paragraphs (runs of non-blank lines), the documents of the default
    pretraining dataset and of the tokenizer's training data."""
    return [paragraph for paragraph in re.split(r"\n[ \t]*\n", default_corpus_text()) if paragraph.strip()]


# --------------------------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(output_dir: str | os.PathLike = DEFAULT_TOKENIZER_DIR, *,
                    vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Path:
    """Train the shipped byte-level BPE on ``default_corpus_documents()`` and write it to ``output_dir``.

    Writes ``tokenizer.json`` (the ``tokenizers`` model), ``tokenizer_config.json`` (special tokens and chat
    template, readable by transformers 4.46+ and 5) and ``build_info.json`` (corpus hash, versions). The build
    is deterministic for a given corpus and ``tokenizers`` version.
    """
    import tokenizers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an integer > {256 + len(SPECIAL_TOKENS)} (256 bytes plus "
                         f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
    documents = default_corpus_documents()
    tokenizer = Tokenizer(models.BPE())
    # No normalizer and byte-level pieces: any text, whitespace included, decodes back to itself.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=TOKENIZER_MIN_FREQUENCY,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output_dir / "tokenizer.json"), pretty=True)
    # Written by hand rather than by save_pretrained so that both transformers 4.x (PreTrainedTokenizerFast,
    # additional_special_tokens, chat_template in the config) and 5.x (which maps those names) can load it.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": list(ROLE_TOKENS),
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(output_dir / "tokenizer_config.json", config)
    corpus = default_corpus_text()
    _write_json(output_dir / "build_info.json", {
        "command": "python -m lowrank_opt.data build-tokenizer",
        "corpus": "pydoc_data.topics, sorted keys, paragraphs (lowrank_opt.data.default_corpus_documents)",
        "corpus_sha256": hashlib.sha256(corpus.encode("utf-8")).hexdigest(),
        "corpus_characters": len(corpus),
        "python": ".".join(map(str, sys.version_info[:3])),
        "tokenizers": tokenizers.__version__,
        "vocab_size": tokenizer.get_vocab_size(),
        "min_frequency": TOKENIZER_MIN_FREQUENCY,
        "special_tokens": list(SPECIAL_TOKENS),
    })
    return output_dir


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith((".json", ".model"))


def load_tokenizer(name_or_path: str | os.PathLike | None) -> "transformers.PreTrainedTokenizerBase":
    """The tokenizer for training.

    ``None`` loads the shipped offline tokenizer (``DEFAULT_TOKENIZER_DIR``); a local directory or a hub id goes
    to ``AutoTokenizer.from_pretrained``. A tokenizer without a pad token gets ``pad = eos`` (the SFT collator
    masks padding through ``attention_mask`` and ``labels``, so a real eos keeps its label).

    Raises:
        FileNotFoundError: the shipped tokenizer is missing, or ``name_or_path`` is neither an existing path nor
            shaped like a hub id (``name`` or ``org/name``).
        OSError: a hub id that could not be loaded (no network, unknown name), with the reason.
    """
    from transformers import AutoTokenizer

    if name_or_path is None:
        if not (DEFAULT_TOKENIZER_DIR / "tokenizer.json").is_file():
            raise FileNotFoundError(f"the shipped tokenizer is missing from {DEFAULT_TOKENIZER_DIR}; rebuild it with "
                                    "`python -m lowrank_opt.data build-tokenizer`")
        tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_TOKENIZER_DIR))
    else:
        name = os.fspath(name_or_path)
        path = Path(name).expanduser()
        if path.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        elif path.exists():
            raise ValueError(f"tokenizer path {name!r} is a file; pass the directory that holds tokenizer.json / "
                             "tokenizer_config.json")
        elif _looks_like_hub_id(name):
            try:
                tokenizer = AutoTokenizer.from_pretrained(name)
            except OSError as error:
                raise OSError(f"could not load tokenizer {name!r}: it is not a local directory, and loading it from "
                              f"the Hugging Face Hub failed ({error}). Without network, pass a local directory, or "
                              f"None for the shipped tokenizer in {DEFAULT_TOKENIZER_DIR}.") from error
        else:
            raise FileNotFoundError(f"tokenizer directory not found: {name!r} (and it is not a hub id like 'gpt2' "
                                    "or 'org/name')")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# Datasets


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
    """Train and eval datasets for ``task`` (see the module docstring for both pipelines).

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
        ValueError: bad arguments, an unsupported or mixed file extension, a missing column, too little data.
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


def _resolve_data_files(data_files: Sequence[str] | str) -> tuple[list[str], str]:
    """Existing files (globs expanded, in the given order) and the one builder their extension names."""
    if isinstance(data_files, (str, os.PathLike)):
        data_files = [data_files]
    if len(data_files) == 0:
        raise ValueError("data_files is empty")
    files: list[str] = []
    for entry in data_files:
        entry = os.path.expanduser(os.fspath(entry))
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no data file matches {entry!r}")
            files.extend(matches)
        elif os.path.isdir(entry):
            raise ValueError(f"data file {entry!r} is a directory; pass files or a glob such as "
                             f"'{os.path.join(entry, '*.jsonl')}'")
        elif not os.path.isfile(entry):
            raise FileNotFoundError(f"data file not found: {entry!r}")
        else:
            files.append(entry)
    builders: dict[str, str] = {}
    supported = ", ".join(sorted(BUILDERS_BY_EXTENSION))
    for path in files:
        extension = os.path.splitext(path)[1].lower()
        if extension not in BUILDERS_BY_EXTENSION:
            raise ValueError(f"unsupported data file extension {extension or '(none)'!r} for {path!r}; supported "
                             f"extensions are {supported}")
        builders.setdefault(BUILDERS_BY_EXTENSION[extension], path)
    if len(builders) > 1:
        examples = ", ".join(f"{builder} ({path})" for builder, path in builders.items())
        raise ValueError(f"all data files must share one format, got {examples}")
    return files, next(iter(builders))


def _load_files(files: list[str], builder: str, *, text_sample_by: str,
                cache_dir: str | os.PathLike | None) -> "datasets.Dataset":
    import datasets

    options = {"sample_by": text_sample_by} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=files, split="train",
                                 cache_dir=None if cache_dir is None else str(cache_dir), **options)


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


# --------------------------------------------------------------------------------------------------------------
# SFT


def _check_sft_columns(columns: list[str], source: str) -> None:
    """At least one schema's columns are present (a file may mix schemas: json fills absent keys with null)."""
    if any(all(column in columns for column in required) for required in _SFT_SCHEMAS.values()):
        return
    raise ValueError(f"SFT records in {source} match no known schema; columns are {columns}. "
                     f"Accepted: {_SCHEMA_NAMES} (alpaca also reads an optional 'input', the prompt schemas an "
                     "optional 'system').")


def _record_messages(record: dict[str, Any], index: int) -> list[dict[str, str]]:
    """The record as a list of ``{"role", "content"}`` messages; its schema is the first whose keys are set."""
    where = f"SFT record {index}"
    schema = next((name for name, required in _SFT_SCHEMAS.items()
                   if all(record.get(key) is not None for key in required)), None)
    if schema is None:
        present = sorted(key for key, value in record.items() if value is not None)
        raise ValueError(f"{where} matches no known schema; its keys are {present}. Accepted: {_SCHEMA_NAMES}")
    if schema == "messages":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list, got {messages!r:.80}")
        result = []
        for turn, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise ValueError(f"{where}: messages[{turn}] must have string 'role' and 'content', got "
                                 f"{message!r:.80}")
            result.append({"role": message["role"], "content": message["content"]})
        return result
    if schema == "alpaca":
        prompt, response = record["instruction"], record["output"]
        extra = record.get("input")
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
    else:
        prompt, response = record["prompt"], record["response" if schema == "prompt/response" else "completion"]
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(f"{where}: prompt and response must be strings, got {type(prompt).__name__} and "
                         f"{type(response).__name__}")
    system = record.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


class _TemplateNotIncremental(Exception):
    pass


def _plain_segments(messages: list[dict[str, str]], eos_token: str, index: int) -> list[tuple[str, bool]]:
    """``PLAIN_ROLE_HEADERS`` format as (text, is_response) segments."""
    segments = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role not in PLAIN_ROLE_HEADERS:
            raise ValueError(f"SFT record {index}: unknown chat role {role!r}; expected one of "
                             f"{', '.join(PLAIN_ROLE_HEADERS)}")
        if role == "assistant":
            segments += [(PLAIN_ROLE_HEADERS[role], False), (content + eos_token, True)]
        else:
            segments.append((f"{PLAIN_ROLE_HEADERS[role]}{content}\n", False))
    return segments


def _template_segments(messages: list[dict[str, str]], tokenizer, *, every_turn: bool) -> list[tuple[str, bool]]:
    """Chat-template text as (text, is_response) segments.

    Every assistant turn i is a response: the text between ``render(messages[:i], add_generation_prompt=True)``
    and ``render(messages[:i + 1])``. That needs a template whose renderings grow by appending; with
    ``every_turn=False`` only the last assistant turn is a response, which needs that property once.
    """
    def render(prefix: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)

    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not every_turn:
        turns = turns[-1:]
    segments: list[tuple[str, bool]] = []
    done = ""
    for turn in turns:
        prompt, through = render(messages[:turn], True), render(messages[:turn + 1], False)
        if not (prompt.startswith(done) and through.startswith(prompt)):
            raise _TemplateNotIncremental
        segments += [(prompt[len(done):], False), (through[len(prompt):], True)]
        done = through
    if every_turn:
        whole = render(messages, False)
        if not whole.startswith(done):
            raise _TemplateNotIncremental
        segments.append((whole[len(done):], False))
    return [(text, is_response) for text, is_response in segments if text]


def _tokenize_segments(segments: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int], bool]:
    """Token ids and labels for (text, is_response) segments, plus whether the canonical tokenization was kept.

    The whole text is tokenized once; each boundary is located by tokenizing the text before it and checking
    that it is a prefix of the whole. If some boundary falls inside a token, the segments are tokenized apart
    and concatenated, which makes every boundary exact at the price of a non-canonical split there.
    """
    texts = [text for text, _ in segments]
    whole = "".join(texts)
    ends = [sum(len(text) for text in texts[:k + 1]) for k in range(len(texts))]
    encoded = tokenizer([whole] + [whole[:end] for end in ends[:-1]], add_special_tokens=False)["input_ids"]
    ids, prefixes = encoded[0], encoded[1:]
    token_ends = [len(prefix) for prefix in prefixes] + [len(ids)]
    canonical = all(ids[:len(prefix)] == prefix for prefix in prefixes) and token_ends == sorted(token_ends)
    if not canonical:
        pieces = tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = [token for piece in pieces for token in piece]
        token_ends = [sum(len(piece) for piece in pieces[:k + 1]) for k in range(len(pieces))]
    labels: list[int] = []
    start = 0
    for (_, is_response), end in zip(segments, token_ends):
        labels += ids[start:end] if is_response else [IGNORE_INDEX] * (end - start)
        start = end
    return list(ids), labels, canonical


def _sft_examples(raw: "datasets.Dataset", tokenizer, *, block_size: int, num_proc: int | None,
                  source: str) -> "datasets.Dataset":
    import datasets

    columns = raw.column_names
    _check_sft_columns(columns, source)
    use_template = bool(getattr(tokenizer, "chat_template", None))
    eos_token = tokenizer.eos_token
    state = {"every_turn": True}

    def segments_for(messages: list[dict[str, str]], index: int) -> list[tuple[str, bool]]:
        if not use_template:
            return _plain_segments(messages, eos_token, index)
        if state["every_turn"]:
            try:
                return _template_segments(messages, tokenizer, every_turn=True)
            except _TemplateNotIncremental:
                pass
        try:
            segments = _template_segments(messages, tokenizer, every_turn=False)
        except _TemplateNotIncremental:
            raise ValueError(f"SFT record {index}: the chat template's rendering of the conversation does not start "
                             "with its rendering of the prompt (add_generation_prompt=True), so the response "
                             "cannot be located; use a tokenizer without this template (plain format) or "
                             "another template") from None
        if state["every_turn"]:
            state["every_turn"] = False
            warnings.warn("the tokenizer's chat template does not render conversations by appending turns; SFT "
                          "labels cover only the last assistant turn of each conversation", stacklevel=2)
        return segments

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for row, index in enumerate(indices):
            record = {column: batch[column][row] for column in columns}
            segments = segments_for(_record_messages(record, index), index)
            ids, labels, _ = _tokenize_segments(segments, tokenizer)
            ids, labels = ids[:block_size], labels[:block_size]
            if any(label != IGNORE_INDEX for label in labels):  # an all-masked row gives a 0/0 loss
                out["input_ids"].append(ids)
                out["labels"].append(labels)
        return out

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32"))})
    examples = raw.map(encode, batched=True, with_indices=True, remove_columns=columns, features=features,
                       num_proc=num_proc, desc="Tokenizing SFT examples")
    dropped = len(raw) - len(examples)
    if len(examples) == 0:
        raise ValueError(f"too little data: none of the {len(raw)} SFT records in {source} has a response token "
                         f"within block_size={block_size}")
    if dropped:
        warnings.warn(f"dropped {dropped} of {len(raw)} SFT records with no response token within "
                      f"block_size={block_size} (prompt too long, or no assistant turn)", stacklevel=3)
    return examples


# --------------------------------------------------------------------------------------------------------------
# Collators


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


# --------------------------------------------------------------------------------------------------------------
# Command line


def _differing_tokenizer_files(built: Path, shipped: Path) -> list[str]:
    """Names of the tokenizer files that differ between two directories (build_info.json is metadata)."""
    return [name for name in ("tokenizer.json", "tokenizer_config.json")
            if not (shipped / name).is_file() or (built / name).read_bytes() != (shipped / name).read_bytes()]


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank_opt.data", description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-tokenizer", help="train the shipped byte-level BPE on the default corpus")
    build.add_argument("--output", default=str(DEFAULT_TOKENIZER_DIR), help="directory (default: %(default)s)")
    build.add_argument("--vocab-size", type=int, default=TOKENIZER_VOCAB_SIZE)
    build.add_argument("--check", action="store_true",
                       help="build into a temporary directory and compare with --output instead of writing it")
    args = parser.parse_args(None if argv is None else list(argv))

    if args.check:
        with tempfile.TemporaryDirectory() as scratch:
            build_tokenizer(scratch, vocab_size=args.vocab_size)
            different = _differing_tokenizer_files(Path(scratch), Path(args.output))
        if different:
            print(f"differs from {args.output}: {', '.join(different)}")
            return 1
        print(f"{args.output} matches a fresh build")
        return 0
    output = build_tokenizer(args.output, vocab_size=args.vocab_size)
    size = (output / "tokenizer.json").stat().st_size
    print(f"wrote {output} (tokenizer.json {size / 1024:.0f} KiB, vocab {args.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
