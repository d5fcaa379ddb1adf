"""SFT rows: conversations rendered, tokenized and masked so the loss covers the responses only.

Records in JSON/JSONL/parquet, one of: ``{"prompt": ..., "response": ...}`` (``"completion"`` is accepted for
``"response"``; optional ``"system"``), alpaca style ``{"instruction": ..., "input": ..., "output": ...}``
(``input`` optional and joined to the instruction with a blank line), or chat
``{"messages": [{"role": ..., "content": ...}]}`` with roles ``system``/``user``/``assistant``. One file may mix
them (each record uses the first schema whose keys it sets, in the order just given).

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

A tiny SFT file ships at ``configs/data/sft_example.jsonl`` (16 records in all three schemas, for smoke runs
and as a format example); it is also the data of ``task="sft"`` when no files or dataset are given.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from ..resources import configs_dir

if TYPE_CHECKING:  # the heavy import happens inside the function that needs it
    import datasets


DEFAULT_SFT_FILE = configs_dir() / "data" / "sft_example.jsonl"
IGNORE_INDEX = -100  # the label torch's cross-entropy (and every HF model) skips

# The plain SFT format, for tokenizers without a chat template.
PLAIN_ROLE_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}

_SFT_SCHEMAS = {
    "messages": ("messages",),
    "prompt/response": ("prompt", "response"),
    "prompt/completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}
_SCHEMA_NAMES = "; ".join(f"{name} ({', '.join(keys)})" for name, keys in _SFT_SCHEMAS.items())


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
