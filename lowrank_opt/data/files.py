"""Local data files: expand and check them before any work, load them with ``datasets``.

One builder per call, named by the extension: ``.txt`` (``text``: one row per paragraph by default, or per line,
or the whole file), ``.json``/``.jsonl`` (``json``: JSON Lines, or one JSON array of records), ``.parquet``,
``.csv``.
"""

from __future__ import annotations

import glob
import os
from typing import TYPE_CHECKING, Sequence

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


def _load_files(files: list[str], builder: str, *, text_sample_by: str,
                cache_dir: str | os.PathLike | None) -> "datasets.Dataset":
    import datasets

    options = {"sample_by": text_sample_by} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=files, split="train",
                                 cache_dir=None if cache_dir is None else str(cache_dir), **options)
