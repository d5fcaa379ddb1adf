"""Adam moments in 8 bits, stored as bitsandbytes' 8-bit optimizers store them.

Format (bitsandbytes ``Optimizer2State`` with ``optim_bits=8``, block-wise): the tensor is flattened and cut
into blocks of 256 consecutive elements; each block keeps its absolute maximum (fp32) and each element the
uint8 index of the code nearest to ``x / absmax`` in a 256-entry *dynamic* map (``create_dynamic_map``: a
sign bit, a run of zero bits giving a power-of-ten exponent, the remaining bits a linear fraction, so the
codes are dense near 0 and sparse near 1). The first moment uses the signed map, the second moment (never
negative) the unsigned one, which spends the sign bit on precision. Codec and maps are bitsandbytes' own
(``bitsandbytes.functional.quantize_blockwise`` / ``dequantize_blockwise`` / ``create_dynamic_map``; all
three run on CPU in bitsandbytes 0.50.2, through its native CPU library).

Error of one round trip (per element, with ``s = x / absmax`` of its block): the code chosen is the nearest
to ``s`` up to the quantizer's own resolution, so ``|x - decode(encode(x))| <= absmax * (d(s) + r)`` where
``d(s)`` is the distance from ``s`` to the nearest code (at most half the gap between the two codes around
``s``; outside the outermost codes, the distance to the outermost one) and ``r`` the resolution of the
search: 0 for an exact nearest-code search, ``2/65535`` for bitsandbytes' CPU kernel, which looks codes up in
a 65,536-entry table over [-1, 1] (so, for example, an exact 0 comes back as about ``2e-5 * absmax``).

State layout (plain tensors only, so ``torch.load(weights_only=True)`` reads a checkpoint): ``exp_avg_codes``
and ``exp_avg_sq_codes`` (uint8, the parameter's shape), ``exp_avg_absmax`` and ``exp_avg_sq_absmax``
(fp32, ``ceil(numel / 256)``). The maps are not state: they are rebuilt from bitsandbytes. 2 bytes per
parameter plus 8 bytes per 256, against 8 bytes per parameter for fp32 moments.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

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
]

BLOCK_SIZE = 256  # bitsandbytes' block size for its 8-bit optimizer states
# bitsandbytes keeps tensors below this size in 32-bit state (``min_8bit_size``): a policy for the caller.
MIN_8BIT_SIZE = 4096
STATE_KEYS = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
# Elements updated per piece: a multiple of BLOCK_SIZE, so every piece starts on a block boundary and the
# fp32 scratch of a step (moments, weight, gradient copies) never exceeds a few pieces.
_CHUNK = 1 << 20

_MAPS: dict = {}


def _bnb_functional() -> Any:
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as error:  # pragma: no cover - bitsandbytes is a declared dependency
        raise ImportError(
            "8-bit optimizer states need bitsandbytes (pip install bitsandbytes); it could not be imported: "
            f"{error}") from error
    return bnb_functional


def dynamic_map(signed: bool, device: Any = "cpu") -> torch.Tensor:
    """bitsandbytes' 256-entry dynamic map (``create_dynamic_map(signed=signed)``, sorted, fp32) on
    ``device``: the signed one for the first moment, the unsigned one for the second. Cached; do not modify."""
    key = (bool(signed), str(torch.device(device)))
    if key not in _MAPS:
        _MAPS[key] = _bnb_functional().create_dynamic_map(signed=bool(signed)).to(torch.device(device))
    return _MAPS[key]


def encode(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (fp32/bf16/fp16) block-wise to 8 bits: ``(codes, absmax)``, codes uint8 of ``x``'s shape,
    absmax fp32 of shape ``(ceil(x.numel() / 256),)``, blocks taken over ``x`` flattened (row-major)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"encode needs a float32/bfloat16/float16 tensor, got {getattr(x, 'dtype', type(x))}")
    flat = x.reshape(-1)
    codes, quant_state = _bnb_functional().quantize_blockwise(flat, code=dynamic_map(signed, x.device),
                                                              blocksize=BLOCK_SIZE)
    return codes.view(x.shape), quant_state.absmax


def decode(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of :func:`encode`: the fp32 tensor ``map[codes] * absmax[block]`` of ``codes``' shape."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"decode needs uint8 codes, got {codes.dtype}")
    blocks = -(-codes.numel() // BLOCK_SIZE)
    if absmax.dtype != torch.float32 or tuple(absmax.shape) != (blocks,):
        raise ValueError(f"absmax must be float32 of shape ({blocks},) for {codes.numel()} codes, got "
                         f"{absmax.dtype} {tuple(absmax.shape)}")
    flat = _bnb_functional().dequantize_blockwise(codes.reshape(-1), absmax=absmax,
                                                  code=dynamic_map(signed, codes.device), blocksize=BLOCK_SIZE)
    return flat.view(codes.shape)


def state_8bit_bytes(numel: int) -> int:
    """Bytes of the 8-bit Adam state of a tensor with ``numel`` elements (both moments)."""
    return 2 * numel + 2 * 4 * (-(-numel // BLOCK_SIZE))


def init_adam_state_8bit(param: torch.Tensor) -> dict:
    """Zero moments for ``param`` in 8-bit form (codes 0 with absmax 0 decode to 0): the four tensors of
    :data:`STATE_KEYS`, on ``param``'s device. The caller keeps its own ``step`` count."""
    blocks = -(-param.numel() // BLOCK_SIZE)
    return {
        "exp_avg_codes": torch.zeros(param.shape, dtype=torch.uint8, device=param.device),
        "exp_avg_absmax": torch.zeros(blocks, dtype=torch.float32, device=param.device),
        "exp_avg_sq_codes": torch.zeros(param.shape, dtype=torch.uint8, device=param.device),
        "exp_avg_sq_absmax": torch.zeros(blocks, dtype=torch.float32, device=param.device),
    }


def _check_state(state: dict, shape: torch.Size, where: str) -> None:
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise KeyError(f"8-bit Adam state{where} lacks {', '.join(missing)} (make it with init_adam_state_8bit)")
    blocks = -(-math.prod(shape) // BLOCK_SIZE)
    for key in ("exp_avg_codes", "exp_avg_sq_codes"):
        t = state[key]
        if t.dtype != torch.uint8 or tuple(t.shape) != tuple(shape) or not t.is_contiguous():
            raise ValueError(f"state[{key!r}]{where} must be contiguous uint8 of shape {tuple(shape)}, got "
                             f"{t.dtype} {tuple(t.shape)}")
    for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        t = state[key]
        if t.dtype != torch.float32 or tuple(t.shape) != (blocks,):
            raise ValueError(f"state[{key!r}]{where} must be float32 of shape ({blocks},), got {t.dtype} "
                             f"{tuple(t.shape)}")


def adamw_step_8bit_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    weight_decay: float = 0.0,
    correct_bias: bool = True,
    generator: Optional[torch.Generator] = None,
    chunk_size: int = _CHUNK,
    label: str = "",
) -> None:
    """One AdamW step on ``param`` (in place) with 8-bit moments in ``state`` (see :func:`init_adam_state_8bit`).

    For each piece of ``chunk_size`` consecutive elements (a multiple of 256, so pieces start on block
    boundaries; the scratch is a few pieces of fp32, never a full-size tensor): decode the piece's moments to
    fp32, run AdamW's one body (:func:`lowrank_opt.functional.adamw_`: moments, then
    ``w -= step_size * m / (sqrt(v) + eps)`` with the bias correction folded into ``step_size``) and decoupled
    weight decay on the fp32 weight (a half-precision one through an fp32 copy, written back with stochastic
    rounding to bf16 when ``generator`` is given, else to nearest), then encode the moments back. The update
    uses the fp32 moments before re-quantization, as bitsandbytes' 8-bit kernels do. ``step`` is the count
    after this step (1 on the first).
    """
    from ..functional import adamw_, bias_corrected_step_size, flat_pieces, update_pieces_

    where = f" for a parameter of shape {tuple(param.shape)}"
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an integer >= 1 (the count after this step), got {step!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < BLOCK_SIZE \
            or chunk_size % BLOCK_SIZE:
        raise ValueError(f"chunk_size must be a positive multiple of {BLOCK_SIZE}, got {chunk_size!r}")
    if tuple(grad.shape) != tuple(param.shape):
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match param shape {tuple(param.shape)}")
    if not param.is_contiguous():
        raise ValueError(f"the 8-bit AdamW step needs a contiguous parameter{where}")
    if generator is not None and param.dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding (generator) is for bf16 parameters, got {param.dtype}{where}")
    _check_state(state, param.shape, where)
    step_size = bias_corrected_step_size(lr, beta1, beta2, step, correct_bias)
    flat_grad = grad.detach().reshape(-1)
    codes_m, codes_v = state["exp_avg_codes"].view(-1), state["exp_avg_sq_codes"].view(-1)

    def update(w: torch.Tensor, piece: slice) -> None:
        blocks = slice(piece.start // BLOCK_SIZE, -(-(piece.start + w.numel()) // BLOCK_SIZE))
        m = decode(codes_m[piece], state["exp_avg_absmax"][blocks], signed=True)
        v = decode(codes_v[piece], state["exp_avg_sq_absmax"][blocks], signed=False)
        adamw_([w], [flat_grad[piece].float()], [m], [v], beta1=beta1, beta2=beta2, eps=eps, step_sizes=[step_size])
        for codes, absmax, moment, signed in ((codes_m, "exp_avg_absmax", m, True),
                                              (codes_v, "exp_avg_sq_absmax", v, False)):
            new_codes, new_absmax = encode(moment, signed=signed)
            codes[piece].copy_(new_codes)
            state[absmax][blocks].copy_(new_absmax)

    update_pieces_(flat_pieces(param.detach(), chunk_size), update, decay=lr * weight_decay, generator=generator,
                   label=label or f"a parameter of shape {tuple(param.shape)}")
