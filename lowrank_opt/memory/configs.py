"""Model configs for the estimator: names in configs/, JSON files and directories, built on the meta device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_DIRS = [Path(__file__).resolve().parents[2] / "configs", Path.cwd() / "configs"]


def known_configs() -> list[str]:
    """The config names in ``CONFIG_DIRS`` (the package's configs/ and ./configs)."""
    names = set()
    for d in CONFIG_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.json"))
    return sorted(names)


def resolve_config(config: Any):
    """A ``transformers.PretrainedConfig`` from a config object, a JSON path, a directory with a
    config.json, or a name in configs/ (``"llama_7b"``)."""
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
    for d in CONFIG_DIRS:
        candidates += [d / text, d / f"{text}.json"]
    for path in candidates:
        if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
            return AutoConfig.from_pretrained(str(path))
    raise ValueError(f"unknown config {text!r}: give a transformers config JSON file or directory, or one of: "
                     f"{', '.join(known_configs()) or '(no configs/ directory found)'}")


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
