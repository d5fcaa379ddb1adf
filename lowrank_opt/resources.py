"""Where the shipped configs are: ``configs/`` of a checkout, or the package data ``lowrank_opt.configs`` of an
installed package (the same files), and how a config given on a command line is found.

A name or path given by a user is looked up in this order: as a path from the working directory, in
``./configs/`` of the working directory, then among the shipped configs (by relative path or by name, with or
without its suffix). So ``python train.py --config configs/tiny.yaml`` works in a checkout and
``lowrank-opt memory llama_7b`` anywhere after ``pip install``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Sequence, Union


def configs_dir() -> Path:
    """The shipped configs folder (a real directory: setuptools installs package data unzipped)."""
    path = Path(str(resources.files("lowrank_opt.configs")))
    if not path.is_dir():  # pragma: no cover - a zipped install
        raise FileNotFoundError(f"lowrank-opt's configs are not a directory ({path}); install the package unzipped")
    return path


def tokenizer_dir() -> Path:
    """The shipped offline tokenizer (byte-level BPE, 4,096 tokens)."""
    return configs_dir() / "tokenizer"


def deepspeed_dir() -> Path:
    return configs_dir() / "deepspeed"


def search_dirs() -> list[Path]:
    """Where config names are looked up: ./configs of the working directory, then the shipped configs."""
    dirs = [Path.cwd() / "configs", configs_dir()]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def find_config(name_or_path: Union[str, os.PathLike], suffixes: Sequence[str] = (".json", ".yaml", ".yml")) -> Path:
    """A config file (or directory) from a path or a name: the path as given (from the working directory), then
    ``./configs/<it>``, then the shipped ``<it>``; a bare name also with each of ``suffixes``. Raises
    FileNotFoundError listing where it looked."""
    given = Path(name_or_path)
    if given.exists():
        return given
    candidates = []
    for base in search_dirs():
        relative = [given, Path(*given.parts[1:])] if given.parts and given.parts[0] == "configs" else [given]
        for rel in relative:
            candidates.append(base / rel)
            if not rel.suffix:
                candidates.extend(base / rel.with_suffix(s) for s in suffixes)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    looked = ", ".join(str(d) for d in search_dirs())
    raise FileNotFoundError(f"config {str(name_or_path)!r} not found: not a path from {Path.cwd()}, nor a name in "
                            f"{looked}")
