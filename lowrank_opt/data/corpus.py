"""The default corpus: the English reference text CPython ships in ``pydoc_data.topics``.

It needs no network and no download, so the shipped tokenizer is trained on it and ``build_datasets`` packs it
when no data is given. It differs a little between Python versions.
"""

from __future__ import annotations

import re


def default_corpus_text() -> str:
    """The English reference text CPython ships in ``pydoc_data.topics``: every topic, in sorted key order,
    joined with a blank line. About 460k characters; it differs a little between Python versions."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip("\n") for key in sorted(topics))


def default_corpus_documents() -> list[str]:
    """``default_corpus_text()`` cut into paragraphs (runs of non-blank lines), the documents of the default
    pretraining dataset and of the tokenizer's training data."""
    return [paragraph for paragraph in re.split(r"\n[ \t]*\n", default_corpus_text()) if paragraph.strip()]
