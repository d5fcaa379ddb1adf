"""Local data files: expand and check them before any work, load them with ``datasets``, and say what is wrong
with a file that does not load.

One builder per call, named by the extension: ``.txt`` (``text``: one row per paragraph by default, or per line,
or the whole file), ``.json``/``.jsonl`` (``json``: JSON Lines, or one JSON array of records), ``.parquet``,
``.csv``. ``datasets`` reports problems in the files themselves badly (an empty file is a bare
``StopIteration``; a broken JSON line is a ``DatasetGenerationError`` with the row number several causes deep),
so empty files are refused before loading, and a JSON file that fails to load is read again here to name the
file, the line and what is wrong on it.
"""

from __future__ import annotations

import glob
import json
import os
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:  # the heavy import happens inside the functions that need it
    import datasets

BUILDERS_BY_EXTENSION = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
SFT_BUILDERS = ("json", "parquet")
TEXT_SAMPLE_BY_CHOICES = ("line", "paragraph", "document")


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


# --------------------------------------------------------------------------------------------------------------
# Empty files


def _is_empty(path: str, builder: str) -> bool:
    """No byte at all (parquet), or nothing but whitespace (text formats). Reads until the first non-blank byte."""
    if builder == "parquet":
        return os.path.getsize(path) == 0
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 16), b""):
            if chunk.strip():
                return False
    return True


def _check_not_empty(files: list[str], builder: str) -> None:
    """Refuse data that is all empty files, and any empty csv or parquet file (their readers fail on one).

    The text and json builders skip an empty file among others, so that still loads; but when every file is
    empty ``datasets`` fails with a bare ``StopIteration`` (json) or a schema error (text).
    """
    empty = [path for path in files if _is_empty(path, builder)]
    if not empty:
        return
    if len(empty) == len(files):
        if len(files) == 1:
            raise ValueError(f"data file {files[0]!r} is empty (no records or text in it)")
        shown = ", ".join(map(repr, files[:3])) + (", ..." if len(files) > 3 else "")
        raise ValueError(f"all {len(files)} data files are empty (no records or text in them): {shown}")
    if builder in ("csv", "parquet"):
        raise ValueError(f"data file {empty[0]!r} is empty; the {builder} reader fails on an empty file, so remove "
                         "it from data_files")


# --------------------------------------------------------------------------------------------------------------
# Loading, and what is wrong with a JSON file that does not load


def _load_files(files: list[str], builder: str, *, text_sample_by: str,
                cache_dir: str | os.PathLike | None) -> "datasets.Dataset":
    """The files' rows through ``datasets.load_dataset``; a JSON file that fails to load raises a ``ValueError``
    naming the file, the line and the fault instead (see ``_json_problem``)."""
    import datasets

    options = {"sample_by": text_sample_by} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=files, split="train",
                                     cache_dir=None if cache_dir is None else str(cache_dir), **options)
    except Exception:
        problem = _json_problem(files) if builder == "json" else None
        if problem is None:
            raise  # not something we can point at in the files: the original error, unchanged
    raise ValueError(problem)  # outside the except block: one error, without datasets' chain of causes


_JSON_KINDS = ((type(None), "null"), (bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"),
               (dict, "object"))


def _json_kind(value: Any) -> str:
    return next(kind for types, kind in _JSON_KINDS if isinstance(value, types))


def _snippet(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _json_problem(files: list[str]) -> str | None:
    """The first fault in the JSON data files, as ``"data file '<path>', line <n>: <what>"``, or None if none is
    found.

    Faults, in file order: bytes that are not UTF-8, a line that is not valid JSON (JSON Lines) or a document
    that is not (a file that starts with ``[``), a record that is not a JSON object, and files that hold no record
    at all.
    """
    n_records = 0
    for path in files:
        try:
            for where, record in _json_records(path):
                if not isinstance(record, dict):
                    return f"{where}: a JSON {_json_kind(record)}, not an object; each record must be an object " \
                           f"such as {{\"text\": ...}} or {{\"prompt\": ..., \"response\": ...}}"
                n_records += 1
        except _JsonFault as fault:
            return str(fault)
    if n_records == 0:
        return f"no records in the data files {files}"
    return None


class _JsonFault(Exception):
    pass


def _json_records(path: str) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of a JSON Lines file or of a file holding one JSON array; a file that is
    one JSON object gives that object."""
    with open(path, "rb") as file:
        content = file.read()
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        line = content.count(b"\n", 0, error.start) + 1
        raise _JsonFault(f"data file {path!r}, line {line}: not UTF-8 text ({error.reason} at byte "
                         f"{error.start})") from None
    if text.lstrip().startswith("["):  # one JSON array of records, or JSON Lines whose first line is an array
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # "Extra data": more lines follow a complete first line
                raise _JsonFault(f"data file {path!r}, line {error.lineno}: not valid JSON ({error.msg} at column "
                                 f"{error.colno})") from None
        else:
            for index, record in enumerate(document):
                yield f"data file {path!r}, element {index} of the array", record
            return
    # JSON Lines. Split on "\n" only: a JSON string may hold U+2028 and other characters str.splitlines cuts at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == 1:
                try:  # a pretty-printed JSON document over several lines rather than JSON Lines
                    yield f"data file {path!r}", json.loads(text)
                    return
                except json.JSONDecodeError:
                    pass
            raise _JsonFault(f"data file {path!r}, line {number}: not valid JSON ({error.msg} at column "
                             f"{error.colno}): {_snippet(line.strip())}") from None
        yield f"data file {path!r}, line {number}", record
