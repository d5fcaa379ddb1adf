"""Stochastic rounding from fp32 to bf16, for training with pure-bf16 weights.

Round-to-nearest loses every update smaller than half a bf16 spacing (2^-9 just below 1.0, 2^-8 above), so
many small steps add up to nothing. Rounding up with probability proportional to the distance from the lower
neighbour makes the rounded value an unbiased estimate of the fp32 one, and small updates then add up to their
expected total.

bf16 is the upper 16 bits of fp32. Adding a uniform random integer in [0, 2^16) to the fp32 bit pattern and
clearing the low 16 bits rounds the magnitude up exactly when the random number is at least 2^16 minus the
discarded bits, i.e. with probability (|x| - |lo|) / (|hi| - |lo|): E[result] == x. The bit pattern is sign and
magnitude, so the same addition works for negative numbers (it rounds the magnitude), and a carry out of the
mantissa moves to the next exponent, which is the next bf16 value.
"""

from __future__ import annotations

from typing import Optional

import torch

from .projection import _stable_hash

_LOW_BITS = 1 << 16
_HIGH_MASK = -_LOW_BITS  # 0xFFFF0000 as an int32


def rounding_seed(seed: int, identity: int, step: int, offset: int = 0) -> int:
    """Generator seed for the rounding bits of one parameter at one optimizer step (a different salt from
    :func:`~lowrank_opt.projection.projection_seed`, so the bits are independent of the projection).
    ``offset``: the first element a process holds of a sharded parameter (0 for a whole one), so that each
    shard draws its own bits."""
    text = f"apollo-stochastic-rounding/{int(seed)}/{int(identity)}/{int(step)}"
    return _stable_hash(text + (f"/{int(offset)}" if offset else ""))


def stochastic_round_to_bf16_(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """In place: make every element of the fp32 tensor ``x`` a bf16 value, stochastically rounded; returns
    ``x`` (still fp32; ``x.to(torch.bfloat16)`` is then exact). See :func:`stochastic_round_to_bf16`."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding to bf16 needs a float32 tensor, got {x.dtype}")
    # NaNs become the canonical quiet NaN (low 16 bits zero, so it stays a NaN and the addition cannot carry
    # into the sign bit). +-inf has zero low bits and a sum below the next pattern: truncation gives it back.
    x.masked_fill_(torch.isnan(x), float("nan"))
    noise = torch.randint(0, _LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = x.view(torch.int32)
    bits.add_(noise).bitwise_and_(_HIGH_MASK)
    return x


def stochastic_round_to_bf16(x_fp32: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Round an fp32 tensor to bf16 stochastically: each element becomes one of its two bf16 neighbours, the
    upper one (in magnitude) with probability proportional to the distance from the lower one, so that
    ``E[result] == x`` exactly. The input is not modified.

    - bf16 values (zeros of either sign included) come back unchanged; the sign is always kept.
    - +-inf stays +-inf; NaN stays NaN (as the canonical quiet NaN).
    - Finite values up to the largest bf16 (about 3.39e38) never overflow. The few fp32 values beyond it
      round to +-bf16 max or to +-inf (the carry into the exponent, as round-to-nearest also overflows to
      inf there), with the probability they would have between bf16 max and 2^128.
    - Subnormals are rounded the same way (bf16 has fp32's exponent range).

    The random bits are one draw of ``torch.randint(0, 2**16, x.shape, dtype=torch.int32)`` from
    ``generator`` (the global generator when ``None``) on ``x``'s device, so the result is deterministic given
    the generator's seed (CPU and CUDA generators give different bits).
    """
    if not isinstance(x_fp32, torch.Tensor) or x_fp32.dtype != torch.float32:
        got = x_fp32.dtype if isinstance(x_fp32, torch.Tensor) else type(x_fp32).__name__
        raise TypeError(f"stochastic_round_to_bf16 needs a float32 tensor, got {got}")
    out = x_fp32.detach().clone(memory_format=torch.contiguous_format)
    return stochastic_round_to_bf16_(out, generator).to(torch.bfloat16)
