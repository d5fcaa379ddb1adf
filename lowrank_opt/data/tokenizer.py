"""The shipped offline tokenizer: build it from the default corpus, load it (or any other) for training.

The shipped tokenizer (``configs/tokenizer``): byte-level BPE, 4096 tokens in all, trained on
``default_corpus_text()``. Special tokens ``<|pad|>`` (0), ``<|bos|>`` (1), ``<|eos|>`` (2) and the chat role
tokens ``<|system|>``, ``<|user|>``, ``<|assistant|>`` (3-5). No token is added automatically when encoding
(``bos`` is defined for users who want it), so ``decode(encode(text)) == text`` for any text. The chat
template renders ``<|role|>\\n{content}\\n`` for system/user turns and ``<|assistant|>\\n{content}<|eos|>`` for
assistant turns. Rebuild it with ``python -m lowrank_opt.data build-tokenizer`` (``--check`` compares a fresh
build with the shipped files). The corpus is whatever the running Python ships, so a Python version other than
the one recorded in ``configs/tokenizer/build_info.json`` gives slightly different merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .corpus import default_corpus_documents, default_corpus_text

if TYPE_CHECKING:  # the heavy import happens inside the functions that need it
    import transformers


from ..resources import tokenizer_dir

DEFAULT_TOKENIZER_DIR = tokenizer_dir()  # configs/tokenizer of a checkout, or the installed package's copy

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
