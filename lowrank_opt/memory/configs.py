"""Model configs for the estimator: names in configs/, JSON files and directories, built on the meta device."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..resources import search_dirs

# Where config names are looked up (./configs of the working directory, then the shipped configs): a property of
# the moment, see lowrank_opt.resources.search_dirs.
CONFIG_DIRS = search_dirs()


def known_configs() -> list[str]:
    """The config names in ./configs and the shipped configs (``lowrank_opt.resources.search_dirs``)."""
    names = set()
    for d in search_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.json"))
    return sorted(names)


def resolve_config(config: Any):
    """A ``transformers.PretrainedConfig`` from a config object, a JSON path, a directory with a
    config.json, or a name in configs/ (``"llama_7b"``).

    Raises:
        ValueError: an unknown name, a missing file, a directory without config.json; a file that is not valid
            JSON (with the line and column) or that transformers cannot read as a config (its reason, one line).
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, dict):
        from transformers import CONFIG_MAPPING

        data = dict(config)
        return CONFIG_MAPPING[data.pop("model_type", "llama")](**data)
    if not isinstance(config, (str, Path)):
        raise TypeError(f"config must be a PretrainedConfig, a path or a name, got {type(config).__name__}")
    text = str(config)
    candidates = [Path(text)]
    for d in search_dirs():
        candidates += [d / text, d / f"{text}.json"]
    for path in candidates:
        if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
            _check_json(path / "config.json" if path.is_dir() else path)
            try:
                return AutoConfig.from_pretrained(str(path))
            except Exception as error:  # transformers' reasons come as many types; the first line says it
                raise ValueError(f"cannot read config {str(path)!r}: {_reason(error)}") from error
    names = ", ".join(known_configs()) or "(no configs found)"
    if Path(text).is_dir():
        raise ValueError(f"config directory {text!r} has no config.json; give a transformers config JSON file or "
                         f"directory, or one of: {names}")
    if text.endswith(".json") or "/" in text or os.sep in text:
        raise ValueError(f"config file {text!r} not found; give a transformers config JSON file or directory, or "
                         f"one of: {names}")
    raise ValueError(f"unknown config {text!r}: give a transformers config JSON file or directory, or one of: "
                     f"{names}")


def _check_json(file: Path) -> None:
    """The file holds one JSON object; otherwise a ValueError with the line and column of the fault."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"config file {str(file)!r} is not valid JSON ({error.msg} at line {error.lineno}, "
                         f"column {error.colno})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"config file {str(file)!r} is not UTF-8 text ({error.reason} at byte {error.start})") \
            from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(file)!r} must hold a JSON object of config fields, got a "
                         f"{type(data).__name__}")


def _reason(error: BaseException) -> str:
    """The first line of the innermost cause: transformers wraps validation errors and adds paragraphs of
    advice after the reason."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _config_label(config: Any, resolved) -> str:
    if isinstance(config, (str, Path)):
        return Path(str(config)).stem if str(config).endswith(".json") else str(config)
    return getattr(resolved, "name_or_path", "") or getattr(resolved, "model_type", "model")


def _meta_model(config) -> nn.Module:
    """The causal LM for ``config`` on the meta device: shapes and dtypes, nothing allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model
