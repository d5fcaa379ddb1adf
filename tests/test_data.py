"""lowrank_opt.data: the shipped tokenizer, pretraining packing, SFT label masks, collators and error messages.

Everything is offline and fast: the tokenizer is the one in configs/tokenizer, data files are written to
tmp_path, and the ``datasets`` cache goes to tmp_path too.
"""

import json
import pickle
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import torch  # noqa: E402
import transformers  # noqa: E402

from lowrank_opt import data  # noqa: E402
from lowrank_opt.data import sft  # noqa: E402
from lowrank_opt.data import (  # noqa: E402
    DEFAULT_SFT_FILE,
    DEFAULT_TOKENIZER_DIR,
    IGNORE_INDEX,
    build_datasets,
    collator_for,
    default_corpus_text,
    load_tokenizer,
    sft_collator,
)

PARAGRAPHS = [
    "The optimizer keeps two moments for every weight.\nBoth are averages over past steps.",
    "A projection maps a tall matrix to a few rows; the rows are random and seeded.",
    "Checkpoints hold the weights and the optimizer state, so a run can resume exactly.",
    "Short one.",
    "Gradients are scaled per channel, and the scale comes from the small projected space.",
    "Memory is the point: the states of AdamW take twice the size of the weights in fp32.",
]

PAIRS = [
    {"prompt": "What is a learning rate?", "response": "How far each update moves the weights."},
    {"prompt": "Name a first-order optimizer.", "response": "SGD with momentum."},
    {"prompt": "Write a loop in Python.", "response": "for i in range(3):\n    print(i)"},
    {"prompt": "Is 7 prime?", "response": "Yes, 7 is prime."},
    {"system": "Answer briefly.", "prompt": "What is fp32?", "response": "A 32-bit float."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]

CHATS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tensor?"},
     {"role": "assistant", "content": "An array with axes."}, {"role": "user", "content": "And a scalar?"},
     {"role": "assistant", "content": "A tensor with no axes."}],
    [{"role": "user", "content": "Count to two."}, {"role": "assistant", "content": "One, two."},
     {"role": "user", "content": "Backwards?"}, {"role": "assistant", "content": "Two, one."}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf-cache"


def write_text(path, paragraphs):
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")  # no final newline: the last row is exact
    return str(path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def token_stream(tokenizer, documents):
    stream = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return stream


def response_text(record):
    return record.get("response", record.get("output"))


# ---------------------------------------------------------------------------------------------------------------
# Corpus and tokenizer


def test_default_corpus_is_offline_deterministic_and_large():
    text = default_corpus_text()
    assert len(text) > 100_000
    assert text == default_corpus_text()
    documents = data.default_corpus_documents()
    assert len(documents) > 1000 and all(document.strip() for document in documents)


def test_shipped_tokenizer_has_its_special_tokens_and_round_trips(tokenizer):
    assert len(tokenizer) == data.TOKENIZER_VOCAB_SIZE == 4096
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(list(data.ROLE_TOKENS)) == [3, 4, 5]
    texts = [
        "def f(x):\n    return x ** 2  # square\n",
        "  leading and trailing spaces  ",
        "Tabs\tand\n\nblank lines, punctuation: ;.,!?'\"()[]{} and digits 0123456789.",
        "The \"assert\" statement is a convenient way to insert debugging assertions into a program.",
        "naive cafe -- UTF-8 too: caf\u00e9, \u65e5\u672c, \U0001f600",
    ]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids  # nothing added
    # Trained on English reference text: far fewer tokens than characters.
    sample = default_corpus_text()[:20_000]
    assert len(tokenizer(sample)["input_ids"]) < len(sample) / 3


def test_shipped_chat_template(tokenizer):
    messages = CHATS[1]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|system|>\nBe brief.\n<|user|>\nWhat is a tensor?\n<|assistant|>\nAn array with axes.<|eos|>"
        "<|user|>\nAnd a scalar?\n<|assistant|>\nA tensor with no axes.<|eos|>")
    assert tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == (
        "<|system|>\nBe brief.\n<|user|>\nWhat is a tensor?\n<|assistant|>\n")


def test_shipped_tokenizer_matches_a_fresh_build(tmp_path):
    info = json.loads((DEFAULT_TOKENIZER_DIR / "build_info.json").read_text())
    corpus = default_corpus_text()
    import hashlib

    if hashlib.sha256(corpus.encode()).hexdigest() != info["corpus_sha256"]:
        pytest.skip(f"this Python's pydoc topics differ from the build's (Python {info['python']})")
    assert data.main(["build-tokenizer", "--check", "--output", str(DEFAULT_TOKENIZER_DIR)]) == 0
    assert (DEFAULT_TOKENIZER_DIR / "tokenizer.json").stat().st_size < 400_000


def test_load_tokenizer_from_a_directory_sets_pad_to_eos(tmp_path):
    copy = tmp_path / "tok"
    shutil.copytree(DEFAULT_TOKENIZER_DIR, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(copy))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|eos|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2


def test_load_tokenizer_errors(tmp_path, monkeypatch):
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        load_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer("./configs/no-such-tokenizer")
    with pytest.raises(ValueError, match="is a file"):
        load_tokenizer(str(DEFAULT_TOKENIZER_DIR / "tokenizer.json"))

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError, match="not a local directory.*Without network"):
        load_tokenizer("some-org/some-model")


# ---------------------------------------------------------------------------------------------------------------
# Pretraining


def check_blocks(rows, block_size):
    for row in rows:
        assert len(row["input_ids"]) == block_size
        assert row["labels"] == row["input_ids"]


def test_pretrain_packs_a_txt_file_into_a_prefix_of_the_token_stream(tokenizer, tmp_path, cache):
    path = write_text(tmp_path / "corpus.txt", PARAGRAPHS)
    stream = token_stream(tokenizer, PARAGRAPHS)  # one document per paragraph, eos after each
    block_size = 16
    n_blocks = len(stream) // block_size
    assert n_blocks >= 5 and len(stream) % block_size != 0  # the test covers a dropped remainder

    train, evaluation = build_datasets(tokenizer, data_files=[path], block_size=block_size, eval_fraction=0,
                                       cache_dir=cache)
    assert evaluation is None
    assert len(train) == n_blocks
    check_blocks(train, block_size)
    assert [token for row in train for token in row["input_ids"]] == stream[:n_blocks * block_size]


def test_pretrain_eval_split_size_and_seed(tokenizer, tmp_path, cache):
    path = write_text(tmp_path / "corpus.txt", PARAGRAPHS * 4)
    stream = token_stream(tokenizer, PARAGRAPHS * 4)
    block_size = 8
    expected = [stream[i:i + block_size] for i in range(0, len(stream) // block_size * block_size, block_size)]

    def split(seed, eval_fraction=0.2):
        train, evaluation = build_datasets(tokenizer, data_files=[path], block_size=block_size,
                                           eval_fraction=eval_fraction, seed=seed, cache_dir=cache)
        check_blocks(train, block_size)
        check_blocks(evaluation, block_size)
        return [row["input_ids"] for row in train], [row["input_ids"] for row in evaluation]

    train, evaluation = split(seed=0)
    assert len(evaluation) == round(0.2 * len(expected))
    assert sorted(train + evaluation) == sorted(expected)
    eval_positions = [expected.index(block) for block in evaluation]
    assert [block for i, block in enumerate(expected) if i not in eval_positions] == train  # order kept
    assert split(seed=0) == (train, evaluation)
    assert split(seed=1) != (train, evaluation)
    assert len(split(seed=0, eval_fraction=1e-6)[1]) == 1  # at least one eval block


def test_pretrain_from_jsonl_with_a_text_field(tokenizer, tmp_path, cache):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"id": i, "content": p} for i, p in enumerate(PARAGRAPHS)])
    stream = token_stream(tokenizer, PARAGRAPHS)
    train, evaluation = build_datasets(tokenizer, data_files=[path], text_field="content", block_size=12,
                                       eval_fraction=0, cache_dir=cache)
    check_blocks(train, 12)
    assert [token for row in train for token in row["input_ids"]] == stream[:len(stream) // 12 * 12]
    assert train.column_names == ["input_ids", "labels"]

    capped, _ = build_datasets(tokenizer, data_files=[path], text_field="content", block_size=12, eval_fraction=0,
                               max_train_samples=2, cache_dir=cache)
    assert capped["input_ids"][:] == train["input_ids"][:2]


def test_pretrain_default_corpus(tokenizer):
    train, evaluation = build_datasets(tokenizer, block_size=128, eval_fraction=0.05)
    assert len(train) > 500 and len(evaluation) == round(0.05 * (len(train) + len(evaluation)))
    check_blocks(train.select(range(5)), 128)
    batch = collator_for("pretrain", tokenizer)([train[0], train[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 128)
    assert torch.equal(batch["input_ids"], batch["labels"])


# ---------------------------------------------------------------------------------------------------------------
# SFT


def check_against_template(tokenizer, row, messages):
    """Our ids are the canonical tokenization of the rendered chat and our label mask is the template's own
    {% generation %} mask (HF's return_assistant_tokens_mask)."""
    reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    assert row["input_ids"] == list(reference["input_ids"])
    assert [label != IGNORE_INDEX for label in row["labels"]] == [bool(m) for m in reference["assistant_masks"]]


def test_sft_prompt_response_labels_only_the_response(tokenizer, tmp_path, cache):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    train, evaluation = build_datasets(tokenizer, task="sft", data_files=[path], block_size=256, eval_fraction=0,
                                       cache_dir=cache)
    assert evaluation is None and len(train) == len(PAIRS)
    for row, record in zip(train, PAIRS):
        ids, labels = row["input_ids"], row["labels"]
        n_prompt = labels.count(IGNORE_INDEX)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # the prompt is a prefix, fully masked
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tokenizer.decode(ids[n_prompt:]) == response_text(record) + tokenizer.eos_token
        assert ids[-1] == tokenizer.eos_token_id
        prompt = tokenizer.decode(ids[:n_prompt])
        assert prompt.endswith("<|assistant|>\n") and record.get("prompt", record.get("instruction")) in prompt
        messages = sft._record_messages(record, 0)
        check_against_template(tokenizer, row, messages)
    assert "<|system|>\nAnswer briefly.\n" in tokenizer.decode(train[4]["input_ids"])
    assert "Add the numbers.\n\n2 and 3" in tokenizer.decode(train[5]["input_ids"])


def test_sft_chat_messages_label_every_assistant_turn(tokenizer, tmp_path, cache):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": messages} for messages in CHATS])
    train, _ = build_datasets(tokenizer, task="sft", data_files=[path], block_size=256, eval_fraction=0,
                              cache_dir=cache)
    assert len(train) == len(CHATS)
    for row, messages in zip(train, CHATS):
        ids, labels = row["input_ids"], row["labels"]
        # Runs of labelled tokens, in order, are exactly the assistant turns, each with its eos.
        runs, current = [], []
        for token, label in zip(ids, labels):
            if label == IGNORE_INDEX:
                if current:
                    runs.append(current)
                current = []
            else:
                assert label == token
                current.append(token)
        runs += [current] if current else []
        replies = [m["content"] + tokenizer.eos_token for m in messages if m["role"] == "assistant"]
        assert [tokenizer.decode(run) for run in runs] == replies
        # User and system turns are masked.
        masked = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
        for message in messages:
            assert (message["content"] in masked) == (message["role"] != "assistant")
        check_against_template(tokenizer, row, messages)


def test_sft_plain_format_without_a_chat_template(tmp_path, cache):
    tokenizer = load_tokenizer(None)
    tokenizer.chat_template = None
    path = write_jsonl(tmp_path / "mixed.jsonl", PAIRS[:2] + [{"messages": CHATS[1]}])
    train, _ = build_datasets(tokenizer, task="sft", data_files=[path], block_size=256, eval_fraction=0,
                              cache_dir=cache)
    text = tokenizer.decode(train[0]["input_ids"])
    assert text == "### User:\nWhat is a learning rate?\n### Assistant:\nHow far each update moves the weights.<|eos|>"
    labelled = [t for t, label in zip(train[0]["input_ids"], train[0]["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "How far each update moves the weights.<|eos|>"
    chat = train[2]
    assert tokenizer.decode(chat["input_ids"]) == (
        "### System:\nBe brief.\n### User:\nWhat is a tensor?\n### Assistant:\nAn array with axes.<|eos|>"
        "### User:\nAnd a scalar?\n### Assistant:\nA tensor with no axes.<|eos|>")
    labelled = [t for t, label in zip(chat["input_ids"], chat["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "An array with axes.<|eos|>A tensor with no axes.<|eos|>"
    # The boundaries fall between tokens, so the ids are the canonical tokenization of the whole text.
    assert chat["input_ids"] == tokenizer(tokenizer.decode(chat["input_ids"]), add_special_tokens=False)["input_ids"]


def test_segment_boundaries_inside_a_token_stay_exact(tokenizer):
    whole = tokenizer("The statement", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(whole[-1:]) == " statement"  # one token, so a boundary inside it cannot be kept
    segments = [("The sta", False), ("tement", True)]
    ids, labels, canonical = sft._tokenize_segments(segments, tokenizer)
    assert not canonical
    n_prompt = len(tokenizer("The sta", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(ids[:n_prompt]) == "The sta" and tokenizer.decode(ids[n_prompt:]) == "tement"

    ids, labels, canonical = sft._tokenize_segments([("The", False), (" statement", True)], tokenizer)
    assert canonical and ids == whole and labels == [IGNORE_INDEX] * (len(whole) - 1) + whole[-1:]


# Earlier assistant turns are elided, as templates that strip past reasoning do: renderings do not grow by
# appending, so only the last assistant turn can be located.
ELIDING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}assistant: (earlier reply)\n"
    "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}")
# The last message is marked, so the prompt is never a prefix of the conversation.
MARKING_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if loop.last %} [last]{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


def test_sft_template_that_does_not_append_turns(tmp_path, cache):
    tokenizer = load_tokenizer(None)
    tokenizer.chat_template = ELIDING_TEMPLATE
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHATS[2]}])
    with pytest.warns(UserWarning, match="only the last assistant turn"):
        train, _ = build_datasets(tokenizer, task="sft", data_files=[path], eval_fraction=0, cache_dir=cache)
    ids, labels = train[0]["input_ids"], train[0]["labels"]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHATS[2], tokenize=False)
    assert tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX]) == "Two, one.\n"

    tokenizer.chat_template = MARKING_TEMPLATE
    with pytest.raises(ValueError, match="SFT record 0: the chat template's rendering"):
        build_datasets(tokenizer, task="sft", data_files=[path], eval_fraction=0, cache_dir=cache)


def test_sft_truncates_and_drops_examples_without_a_response(tokenizer, tmp_path, cache):
    records = [{"prompt": "Short?", "response": "Yes, and this answer is long enough to be cut off " * 3},
               {"prompt": "A prompt that alone is longer than the block. " * 4, "response": "Lost."}]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    with pytest.warns(UserWarning, match="dropped 1 of 2 SFT records"):
        train, _ = build_datasets(tokenizer, task="sft", data_files=[path], block_size=24, eval_fraction=0,
                                  cache_dir=cache)
    assert len(train) == 1 and len(train[0]["input_ids"]) == len(train[0]["labels"]) == 24
    assert train[0]["labels"][-1] != IGNORE_INDEX


def test_sft_example_file_and_eval_split(tokenizer, cache):
    n_records = sum(1 for line in DEFAULT_SFT_FILE.read_text().splitlines() if line.strip())
    assert 10 <= n_records <= 20
    train, evaluation = build_datasets(tokenizer, task="sft", eval_fraction=0.25, seed=3, cache_dir=cache)
    assert len(train) + len(evaluation) == n_records and len(evaluation) == round(0.25 * n_records)
    again, _ = build_datasets(tokenizer, task="sft", data_files=[str(DEFAULT_SFT_FILE)], eval_fraction=0.25, seed=3,
                              cache_dir=cache)
    assert again["input_ids"][:] == train["input_ids"][:]


def test_sft_collator_pads(tokenizer):
    collate = sft_collator(tokenizer)
    features = [{"input_ids": [10, 11, 12, 2], "labels": [-100, -100, 12, 2]},
                {"input_ids": [20, 2], "labels": [20, 2]}]
    batch = collate(features)
    assert torch.equal(batch["input_ids"], torch.tensor([[10, 11, 12, 2], [20, 2, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, -100, 12, 2], [20, 2, -100, -100]]))
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    wide = sft_collator(tokenizer, pad_to_multiple_of=8)(features)
    assert wide["input_ids"].shape == (2, 8) and wide["labels"][0, 4:].eq(-100).all()
    assert pickle.loads(pickle.dumps(collate)) == collate  # DataLoader workers can take it
    assert isinstance(collator_for("sft", tokenizer), data.SFTCollator)
    assert collator_for("pretrain", tokenizer) is transformers.default_data_collator
    with pytest.raises(ValueError, match="task must be one of 'pretrain', 'sft', got 'rl'"):
        collator_for("rl", tokenizer)


def test_sft_collator_pads_with_eos_when_pad_is_eos(tokenizer):
    # pad == eos (load_tokenizer's fallback): a real eos keeps its label, padding does not.
    collate = data.SFTCollator(pad_token_id=tokenizer.eos_token_id)
    batch = collate([{"input_ids": [5, 7, 2], "labels": [-100, 7, 2]}, {"input_ids": [9], "labels": [9]}])
    assert batch["input_ids"].tolist() == [[5, 7, 2], [9, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 7, 2], [9, -100, -100]]


# ---------------------------------------------------------------------------------------------------------------
# Errors


class Untouchable:
    """A tokenizer that fails the test if build_datasets uses it."""

    def __getattr__(self, name):
        raise AssertionError(f"tokenizer.{name} used before the data files were checked")

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenizer called before the data files were checked")


def test_missing_file_fails_before_any_work(tmp_path, cache):
    good = write_text(tmp_path / "good.txt", PARAGRAPHS)
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_datasets(Untouchable(), data_files=[good, missing], cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"no data file matches .*\*\.jsonl"):
        build_datasets(Untouchable(), data_files=[str(tmp_path / "*.jsonl")], cache_dir=cache)
    assert not cache.exists()


def test_bad_and_mixed_extensions(tmp_path, cache):
    bad = tmp_path / "notes.md"
    bad.write_text("# hello\n")
    with pytest.raises(ValueError, match=r"unsupported data file extension '\.md'.*\.csv, \.json, \.jsonl, "
                                         r"\.parquet, \.txt"):
        build_datasets(Untouchable(), data_files=[str(bad)], cache_dir=cache)
    txt = write_text(tmp_path / "a.txt", PARAGRAPHS)
    jsonl = write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match="all data files must share one format"):
        build_datasets(Untouchable(), data_files=[txt, jsonl], cache_dir=cache)
    with pytest.raises(ValueError, match="task 'sft' reads records from .json, .jsonl or .parquet"):
        build_datasets(Untouchable(), task="sft", data_files=[txt], cache_dir=cache)
    with pytest.raises(ValueError, match="is a directory"):
        build_datasets(Untouchable(), data_files=[str(tmp_path)], cache_dir=cache)
    assert not cache.exists()


def test_argument_errors(tokenizer):
    with pytest.raises(ValueError, match="task must be one of 'pretrain', 'sft', got 'dpo'"):
        build_datasets(tokenizer, task="dpo")
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 0"):
        build_datasets(tokenizer, block_size=0)
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\), got 1.0"):
        build_datasets(tokenizer, eval_fraction=1.0)
    with pytest.raises(ValueError, match="not both"):
        build_datasets(tokenizer, data_files=["x.txt"], dataset_name="wikitext")


def test_missing_text_field_names_the_field_and_the_columns(tokenizer, tmp_path, cache):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": p, "id": i} for i, p in enumerate(PARAGRAPHS)])
    with pytest.raises(ValueError, match=r"text field 'text' not found .*columns are \['body', 'id'\]"):
        build_datasets(tokenizer, data_files=[path], cache_dir=cache)


def test_sft_records_with_no_known_schema(tokenizer, tmp_path, cache):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(ValueError, match=r"match no known schema; columns are \['question', 'answer'\]"):
        build_datasets(tokenizer, task="sft", data_files=[path], cache_dir=cache)


def test_too_little_data_says_tokens_and_block_size(tokenizer, tmp_path, cache):
    path = write_text(tmp_path / "tiny.txt", ["Just a few words."])
    n_tokens = len(token_stream(tokenizer, ["Just a few words."]))
    with pytest.raises(ValueError, match=rf"too little data: {n_tokens} tokens, fewer than block_size=128"):
        build_datasets(tokenizer, data_files=[path], block_size=128, cache_dir=cache)
    one_block = n_tokens  # exactly one block: enough to train, not enough to hold one out as well
    with pytest.raises(ValueError, match=rf"make 1 block of block_size={one_block}; a train/eval split needs at "
                                         "least 2 blocks"):
        build_datasets(tokenizer, data_files=[path], block_size=one_block, cache_dir=cache)
    train, evaluation = build_datasets(tokenizer, data_files=[path], block_size=one_block, eval_fraction=0,
                                       cache_dir=cache)
    assert len(train) == 1 and evaluation is None


# ---------------------------------------------------------------------------------------------------------------
# Files that are empty or do not parse: one error naming the file (and the line), not datasets' internals


def test_empty_data_files_fail_before_any_work(tmp_path, cache):
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("")
    blank_txt = tmp_path / "blank.txt"
    blank_txt.write_text("\n  \n\t\n")
    for task, path in (("sft", empty_jsonl), ("pretrain", empty_jsonl), ("pretrain", blank_txt)):
        with pytest.raises(ValueError, match=rf"data file '{path}' is empty") as caught:
            build_datasets(Untouchable(), task=task, data_files=[str(path)], cache_dir=cache)
        assert caught.value.__cause__ is None and caught.value.__context__ is None
    other = tmp_path / "other.jsonl"
    other.write_text("\n")
    with pytest.raises(ValueError, match=r"all 2 data files are empty .*empty\.jsonl.*other\.jsonl"):
        build_datasets(Untouchable(), data_files=[str(empty_jsonl), str(other)], cache_dir=cache)
    # The csv reader fails on any empty file, even next to good ones.
    good_csv = tmp_path / "good.csv"
    good_csv.write_text("text\nhello world\n")
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("")
    with pytest.raises(ValueError, match=rf"data file '{empty_csv}' is empty; the csv reader fails"):
        build_datasets(Untouchable(), data_files=[str(good_csv), str(empty_csv)], cache_dir=cache)
    assert not cache.exists()


def test_an_empty_json_file_next_to_good_ones_still_loads(tokenizer, tmp_path, cache):
    good = write_jsonl(tmp_path / "good.jsonl", PAIRS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    train, _ = build_datasets(tokenizer, task="sft", data_files=[str(empty), good], eval_fraction=0, cache_dir=cache)
    assert len(train) == len(PAIRS)


@pytest.mark.parametrize("bad_line,message", [
    # The column is where the value is missing: one past the 28 characters of the line, which ends with a space.
    ('{"prompt": "a", "response": ', r"line 3: not valid JSON \(Expecting value at column 29\): "
                                     r"'\{\"prompt\": \"a\", \"response\":'"),
    ('{"prompt": "a", "response": "b",}', r"line 3: not valid JSON \(Expecting property name"),
    ('["a", "b"]', r"line 3: a JSON array, not an object"),
])
def test_malformed_jsonl_names_the_file_and_the_line(tokenizer, tmp_path, cache, bad_line, message):
    lines = [json.dumps(record) for record in PAIRS[:4]]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines[:2] + [bad_line] + lines[2:]) + "\n")
    for task in ("sft", "pretrain"):
        with pytest.raises(ValueError, match=rf"^data file '{path}', {message}") as caught:
            build_datasets(tokenizer, task=task, data_files=[str(path)], cache_dir=cache)
        assert caught.value.__cause__ is None and caught.value.__context__ is None  # one error, not a chain


def test_malformed_json_array_names_the_line(tokenizer, tmp_path, cache):
    array = tmp_path / "records.json"
    broken = '  {"prompt": "c", "response": }'
    array.write_text('[\n  {"prompt": "a", "response": "b"},\n' + broken + '\n]\n')
    column = broken.index("}") + 1  # where a value was expected
    with pytest.raises(ValueError, match=rf"^data file '{array}', line 3: not valid JSON \(Expecting value at "
                                         rf"column {column}\)"):
        build_datasets(tokenizer, task="sft", data_files=[str(array)], cache_dir=cache)


def test_train_py_reports_an_empty_data_file_before_writing_anything(tmp_path):
    import sys

    sys.path.insert(0, str(DEFAULT_SFT_FILE.parents[2]))
    import train

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"data file '{empty}' is empty"):
        train.main(["--task", "sft", "--data_files", str(empty), "--output_dir", str(output_dir), "--max_steps", "1"])
    assert not output_dir.exists()
