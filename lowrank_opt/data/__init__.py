"""Data for ``train.py``: the shipped offline tokenizer, packed pretraining blocks and masked SFT examples.

Everything works without network: the default tokenizer lives in ``configs/tokenizer`` and the default
corpus is the English reference text CPython ships in ``pydoc_data.topics``. Hub names (tokenizers,
datasets) are accepted for users who have network; nothing in the tests touches the hub.

One job per module:

- ``corpus``: the default corpus (``default_corpus_text``, ``default_corpus_documents``).
- ``tokenizer``: the shipped byte-level BPE and its chat template (``build_tokenizer``), ``load_tokenizer``.
- ``files``: local data files: expanded and checked before any work, loaded with ``datasets``, and a JSON file
  that does not load reported by file and line.
- ``packing``: ``task="pretrain"`` rows: documents + eos, one stream, equal blocks.
- ``sft``: ``task="sft"`` rows: the record schemas, rendering, exact prompt/response boundaries, label masks.
- ``build``: ``build_datasets(task=...)``: arguments and files checked, rows loaded and made, eval held out.
- ``collate``: ``collator_for(task, tokenizer)``, ``sft_collator`` (right padding).
- ``cli``: ``python -m lowrank_opt.data build-tokenizer [--check]``.

Example:
    >>> from lowrank_opt.data import build_datasets, collator_for, load_tokenizer
    >>> tokenizer = load_tokenizer(None)                                    # the shipped offline tokenizer
    >>> train, evaluation = build_datasets(tokenizer, block_size=128)       # default corpus, packed
    >>> train, evaluation = build_datasets(tokenizer, task="sft", data_files=["configs/data/sft_example.jsonl"])
    >>> data_collator = collator_for("sft", tokenizer)
"""

from .build import TASKS, build_datasets
from .cli import main
from .collate import SFTCollator, collator_for, sft_collator
from .corpus import default_corpus_documents, default_corpus_text
from .files import BUILDERS_BY_EXTENSION, SFT_BUILDERS, TEXT_SAMPLE_BY_CHOICES
from .sft import DEFAULT_SFT_FILE, IGNORE_INDEX, PLAIN_ROLE_HEADERS
from .tokenizer import (
    BOS_TOKEN,
    CHAT_ROLES,
    CHAT_TEMPLATE,
    DEFAULT_TOKENIZER_DIR,
    EOS_TOKEN,
    PAD_TOKEN,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    TOKENIZER_MIN_FREQUENCY,
    TOKENIZER_VOCAB_SIZE,
    build_tokenizer,
    load_tokenizer,
)

__all__ = [
    "BOS_TOKEN",
    "BUILDERS_BY_EXTENSION",
    "CHAT_ROLES",
    "CHAT_TEMPLATE",
    "DEFAULT_SFT_FILE",
    "DEFAULT_TOKENIZER_DIR",
    "EOS_TOKEN",
    "IGNORE_INDEX",
    "PAD_TOKEN",
    "PLAIN_ROLE_HEADERS",
    "ROLE_TOKENS",
    "SFTCollator",
    "SFT_BUILDERS",
    "SPECIAL_TOKENS",
    "TASKS",
    "TEXT_SAMPLE_BY_CHOICES",
    "TOKENIZER_MIN_FREQUENCY",
    "TOKENIZER_VOCAB_SIZE",
    "build_datasets",
    "build_tokenizer",
    "collator_for",
    "default_corpus_documents",
    "default_corpus_text",
    "load_tokenizer",
    "main",
    "sft_collator",
]
