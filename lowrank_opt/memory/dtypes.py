"""The dtypes the estimator takes, by name, and their sizes; sizes print in GB = 1e9 bytes."""

from __future__ import annotations

from typing import Any

import torch

GB = 1e9

_DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16",
                  "float16": "fp16", "half": "fp16", "fp16": "fp16"}
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _canonical_dtype(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    key = _DTYPE_ALIASES.get(str(dtype).lower())
    if key is None:
        raise ValueError(f"dtype must be one of fp32, bf16, fp16, got {dtype!r}")
    return key
