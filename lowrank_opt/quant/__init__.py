"""Quantized storage for memory-lean training.

- :mod:`lowrank_opt.quant.state8bit`: Adam moments in bitsandbytes' blockwise 8-bit form (dynamic map,
  256-element blocks, as bitsandbytes' 8-bit optimizers store them), with an AdamW step that works a piece
  at a time. Needs ``bitsandbytes`` (imported when first used).
- :mod:`lowrank_opt.quant.int8`: Linear weights stored in int8 with per-group scales, dequantized one layer at
  a time in forward/backward, updated in fp32 row blocks and re-quantized with seeded stochastic rounding
  (Q-APOLLO). Torch only.

This package imports with torch alone; bitsandbytes is imported lazily, with a clear error when missing.
"""

from .int8 import (
    DEFAULT_GROUP_SIZE,
    Int8Linear,
    apply_int8_update_,
    dequantize_int8,
    int8_module_of,
    int8_weight_bytes,
    quantize_int8,
    quantize_model_,
    stochastic_requantize_int8_,
)
from .state8bit import (
    BLOCK_SIZE,
    MIN_8BIT_SIZE,
    STATE_KEYS,
    adamw_step_8bit_,
    decode,
    dynamic_map,
    encode,
    init_adam_state_8bit,
    state_8bit_bytes,
)

__all__ = [
    "BLOCK_SIZE",
    "MIN_8BIT_SIZE",
    "STATE_KEYS",
    "adamw_step_8bit_",
    "decode",
    "dynamic_map",
    "encode",
    "init_adam_state_8bit",
    "state_8bit_bytes",
    "DEFAULT_GROUP_SIZE",
    "Int8Linear",
    "apply_int8_update_",
    "dequantize_int8",
    "int8_module_of",
    "int8_weight_bytes",
    "quantize_int8",
    "quantize_model_",
    "stochastic_requantize_int8_",
]
