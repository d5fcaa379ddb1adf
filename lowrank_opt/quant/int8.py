"""Int8 weights for training (Q-APOLLO): Linear weights stored as int8 with per-group fp32 scales.

Format: a weight W (out x in) is cut along its input dimension into groups of ``group_size`` consecutive
columns (128 by default, the APOLLO paper's Q-APOLLO setting; the last group of a row may be shorter); each
(row, group) has a scale ``s`` and each element an int8 code ``q`` in [-127, 127] (symmetric, -128 unused),
``W ~ q * s``. Quantizing a float weight rounds to nearest with ``s = max|W_group| / 127``, so
``|W - q s| <= s / 2`` per element.

Forward/backward (:class:`Int8Linear`): the layer dequantizes its weight into the activations' dtype, runs
``F.linear``, and drops the float copy; backward dequantizes again instead of saving it. So at most one
layer's float weight exists at a time (plus, transiently, one fp32 row block of it).

Where the gradient goes. Autograd can only deliver a gradient to a floating-point leaf tensor, and an
optimizer wants ``p.grad`` of the weight's full shape on a parameter it was given. ``Int8Linear.weight`` is
therefore a *gradient carrier*: a float parameter of shape (out, in) whose storage is a single element (a
zero-stride view of one NaN; it holds no weight). The layer's autograd function takes it as an input and
returns the weight gradient for it, so ``weight.grad`` is an ordinary dense (out, in) tensor, post-accumulate-
grad hooks fire (layer-wise updates free it at once), and parameter names, counts and target-module rules
are those of the float model. Reading its values gives NaN, and every in-place write to it raises (its
elements share one memory location), so an optimizer that does not know the int8 form fails loudly instead
of silently updating nothing. The real weight is the module's ``weight_int8`` / ``weight_scale`` buffers,
which are what ``state_dict`` saves (plain tensors: ``torch.load(weights_only=True)`` reads them).

Update (:func:`apply_int8_update_`, for the optimizer): a block of rows at a time, dequantize to fp32, let the
optimizer subtract its update (and weight decay) in fp32, and re-quantize with *stochastic rounding*:
``q = floor(W / s + u)``, ``u ~ U[0, 1)`` from a generator the caller seeds (so a resumed run draws the same
bits), which makes ``E[q s] = W``: updates far below one int8 step (s is ~1% of the group's range) survive on
average instead of being rounded away. The scale of a group is kept between updates and only grows when the
updated group no longer fits (``max|W| > 127 s``, then ``s = max|W| / 127``): re-scaling every step, as
Q-GaLore does, would re-round every element of the group on a new grid each step (noise of the order of
``s^2`` per element per step, where a kept grid adds about ``|U| s``). The scale never shrinks.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "QMAX",
    "Int8Linear",
    "apply_int8_update_",
    "dequantize_int8",
    "int8_module_of",
    "int8_weight_bytes",
    "quantize_int8",
    "quantize_model_",
    "stochastic_requantize_int8_",
]

DEFAULT_GROUP_SIZE = 128  # Q-APOLLO's group size (APOLLO paper, Sec. 5)
QMAX = 127
# Elements per row block of the dequantize/requantize loops: the fp32 scratch stays at a few blocks.
_BLOCK = 1 << 20
_BLOCK_ACCELERATOR = 1 << 22

_MODULE_OF: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _block_elements(device: torch.device) -> int:
    return _BLOCK if device.type in ("cpu", "meta") else _BLOCK_ACCELERATOR


def _row_blocks(rows: int, cols: int, device: torch.device, block_elements: Optional[int] = None):
    step = max(1, (block_elements or _block_elements(device)) // max(1, cols))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _num_groups(cols: int, group_size: int) -> int:
    return -(-cols // group_size)


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r, c) -> (r, groups, group_size), zero-padding a short last group (zeros change no group maximum)."""
    rows, cols = x.shape
    groups = _num_groups(cols, group_size)
    pad = groups * group_size - cols
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(rows, groups, group_size)


def _ungrouped(x: torch.Tensor, cols: int) -> torch.Tensor:
    rows = x.shape[0]
    return x.reshape(rows, -1)[:, :cols]


def _check_group_size(group_size: Optional[int], cols: int) -> int:
    if group_size is None:
        return cols
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1 or None (one group per row), got {group_size!r}")
    return min(group_size, cols)


def int8_weight_bytes(out_features: int, in_features: int, group_size: Optional[int] = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of an int8 weight with its fp32 scales: ``out*in + 4*out*ceil(in/group_size)``."""
    group = in_features if group_size is None else min(group_size, in_features)
    return out_features * in_features + 4 * out_features * _num_groups(in_features, group)


# ----------------------------------------------------------------------------------------------------------
# The codec, as pure functions on row blocks


def _quantize_block(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    grouped = _grouped(w.float(), group_size)
    scales = grouped.abs().amax(dim=-1) / QMAX
    safe = torch.where(scales > 0, scales, 1.0)  # an all-zero group: scale 0, codes 0
    codes = torch.round(grouped / safe[..., None]).clamp_(-QMAX, QMAX)
    return _ungrouped(codes, w.shape[1]).to(torch.int8), scales


def quantize_int8(
    weight: torch.Tensor, group_size: Optional[int] = DEFAULT_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest int8 quantization of a 2-D float weight: ``(codes, scales)``, codes int8 (out, in),
    scales fp32 (out, ceil(in / group_size)) with ``s = max|W_group| / 127``; ``group_size=None`` gives one
    group per row. Error: ``|W - q s| <= s / 2`` per element. Works a block of rows at a time."""
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int8 needs a 2-D float weight, got {getattr(weight, 'shape', type(weight))}")
    rows, cols = weight.shape
    group = _check_group_size(group_size, cols)
    codes = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    scales = torch.empty(rows, _num_groups(cols, group), dtype=torch.float32, device=weight.device)
    for block in _row_blocks(rows, cols, weight.device):
        codes[block], scales[block] = _quantize_block(weight[block].detach(), group)
    return codes, scales


def _dequantize_block(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    grouped = _grouped(codes.float(), group_size)
    return _ungrouped(grouped.mul_(scales[..., None]), codes.shape[1])


def dequantize_int8(
    codes: torch.Tensor, scales: torch.Tensor, group_size: Optional[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``q * s`` as a (out, in) tensor of ``dtype``, computed in fp32 a block of rows at a time (one rounding
    to ``dtype``). ``group_size`` as given to :func:`quantize_int8`."""
    rows, cols = codes.shape
    group = _check_group_size(group_size, cols)
    if tuple(scales.shape) != (rows, _num_groups(cols, group)):
        raise ValueError(f"scales shape {tuple(scales.shape)} does not match codes {tuple(codes.shape)} with "
                         f"group_size {group}")
    out = torch.empty(rows, cols, dtype=dtype, device=codes.device)
    for block in _row_blocks(rows, cols, codes.device):
        out[block] = _dequantize_block(codes[block], scales[block], group)
    return out


def stochastic_requantize_int8_(
    weight: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    generator: Optional[torch.Generator],
) -> None:
    """Write the fp32 rows ``weight`` (r, in) into ``codes`` (r, in, int8) and ``scales`` (r, groups) in place,
    with stochastic rounding on the kept grid:

    1. a group whose values no longer fit (``max|W| > 127 s``) gets ``s = max|W| / 127``; others keep ``s``;
    2. ``q = clamp(floor(W / s + u), -127, 127)`` with ``u ~ U[0, 1)`` drawn from ``generator`` (one draw of
       ``torch.rand`` of the padded (r, groups, group_size) shape), so ``E[q s] = W``.

    ``weight`` may be modified (it is scratch)."""
    cols = weight.shape[1]
    grouped = _grouped(weight, group_size)
    largest = grouped.abs().amax(dim=-1)
    new_scales = torch.where(largest > scales * QMAX, largest / QMAX, scales)
    safe = torch.where(new_scales > 0, new_scales, 1.0)
    noise = torch.rand(grouped.shape, generator=generator, dtype=torch.float32, device=grouped.device)
    # floor(x + u) is x rounded up with probability frac(x): unbiased. A zero scale means an all-zero group.
    levels = grouped.div_(safe[..., None]).add_(noise).floor_().clamp_(-QMAX, QMAX)
    codes.copy_(_ungrouped(levels, cols))
    scales.copy_(new_scales)


# ----------------------------------------------------------------------------------------------------------
# The layer


def _carrier(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, requires_grad: bool) -> nn.Parameter:
    """A float parameter of ``shape`` backed by one NaN element (zero strides): it receives gradients, holds no
    weight, and refuses in-place writes (its elements overlap)."""
    data = torch.full((), float("nan"), dtype=dtype, device=device).expand(*shape)
    return nn.Parameter(data, requires_grad=requires_grad)


class _Int8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, carrier, codes, scales, bias, group_size):
        weight = dequantize_int8(codes, scales, group_size, dtype=x.dtype)
        out = F.linear(x, weight, bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias)
        del weight  # the float weight lives only inside this call; backward dequantizes again
        ctx.save_for_backward(x, codes, scales)
        ctx.group_size = group_size
        ctx.carrier_dtype = carrier.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, codes, scales = ctx.saved_tensors
        out_features, in_features = codes.shape
        grad_x = grad_w = grad_b = None
        flat_grad = grad_out.reshape(-1, out_features)
        if ctx.needs_input_grad[0]:
            weight = dequantize_int8(codes, scales, ctx.group_size, dtype=grad_out.dtype)
            grad_x = (grad_out @ weight).to(x.dtype)
            del weight
        if ctx.needs_input_grad[1]:
            grad_w = (flat_grad.T @ x.reshape(-1, in_features).to(grad_out.dtype)).to(ctx.carrier_dtype)
        if ctx.needs_input_grad[4]:
            grad_b = flat_grad.sum(dim=0).to(ctx.bias_dtype)
        return grad_x, grad_w, None, None, grad_b, None


class Int8Linear(nn.Linear):
    """A ``nn.Linear`` whose weight is stored in int8 with per-group fp32 scales (see the module docstring).

    Buffers: ``weight_int8`` (int8, out x in), ``weight_scale`` (fp32, out x ceil(in / group_size)). Parameters:
    ``weight``, the gradient carrier (float, shape (out, in), one element of storage), and ``bias`` (float,
    unchanged). ``state_dict`` holds ``weight_int8``, ``weight_scale`` and ``bias``; loading a float
    ``weight`` into it is an error (quantize the float model instead). Make one with :meth:`from_linear` or
    :func:`quantize_model_`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 group_size: Optional[int] = DEFAULT_GROUP_SIZE, device=None, dtype=None) -> None:
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a float weight
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = _check_group_size(group_size, in_features)
        dtype = dtype or torch.get_default_dtype()
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, _num_groups(in_features, self.group_size),
                                                         dtype=torch.float32, device=device))
        self.weight = _carrier((out_features, in_features), dtype, device, True)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        _MODULE_OF[self.weight] = self

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: Optional[int] = DEFAULT_GROUP_SIZE) -> "Int8Linear":
        """The int8 form of ``linear`` (round to nearest); its bias parameter is reused as is."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, bias=False, group_size=group_size,
                     device=weight.device, dtype=weight.dtype)
        codes, scales = quantize_int8(weight.detach(), module.group_size)
        module.weight_int8.copy_(codes)
        module.weight_scale.copy_(scales)
        module.weight.requires_grad_(weight.requires_grad)
        module.bias = linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8LinearFunction.apply(x, self.weight, self.weight_int8, self.weight_scale, self.bias,
                                         self.group_size)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full float weight ``q * s`` (for export or inspection; allocates out x in)."""
        return dequantize_int8(self.weight_int8, self.weight_scale, self.group_size, dtype or self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, dtype={self.weight.dtype}")

    # -- keep the carrier out of checkpoints and conversions -------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        carrier = self._parameters.pop("weight")
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._parameters["weight"] = carrier

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" in state_dict:
            error_msgs.append(
                f"{prefix}weight: a float weight cannot be loaded into Int8Linear (it stores weight_int8 and "
                "weight_scale); load it into the float model and quantize with quantize_model_")
        carrier = self._parameters.pop("weight")
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          [k for k in unexpected_keys], error_msgs)
        finally:
            self._parameters["weight"] = carrier

    def _apply(self, fn, recurse=True):
        # Module.to()/.cuda()/.bfloat16() apply fn to every tensor: on the carrier that would materialise a
        # full-size tensor, on the fp32 scales a dtype cast would lose precision. Learn the target device and
        # dtype from a one-element probe instead, move the scales without casting, rebuild the carrier.
        carrier = self._parameters.pop("weight")
        scales = self._buffers.pop("weight_scale")
        try:
            super()._apply(fn, recurse)
            probe = fn(torch.zeros((), dtype=carrier.dtype, device=carrier.device))
        finally:
            self._parameters["weight"] = carrier
            self._buffers["weight_scale"] = scales
        self._buffers["weight_scale"] = scales.to(device=probe.device)
        carrier.data = torch.full((), float("nan"), dtype=probe.dtype, device=probe.device).expand(*carrier.shape)
        return self

    def __deepcopy__(self, memo):
        carrier = self._parameters.pop("weight")
        try:
            new = type(self).__new__(type(self))
            memo[id(self)] = new
            for key, value in self.__dict__.items():
                new.__dict__[key] = copy.deepcopy(value, memo)
        finally:
            self._parameters["weight"] = carrier
        new._parameters["weight"] = _carrier(tuple(carrier.shape), carrier.dtype, carrier.device,
                                             carrier.requires_grad)
        _MODULE_OF[new.weight] = new
        return new

    def __setstate__(self, state):
        super().__setstate__(state)
        if "weight" in self._parameters:
            _MODULE_OF[self._parameters["weight"]] = self


def int8_module_of(param: torch.Tensor) -> Optional[Int8Linear]:
    """The :class:`Int8Linear` whose gradient carrier ``param`` is, or None for an ordinary parameter: how an
    optimizer recognises an int8 weight."""
    return _MODULE_OF.get(param)


def apply_int8_update_(
    target: Union[Int8Linear, torch.Tensor],
    update: Union[Callable[[torch.Tensor, slice], None], torch.Tensor],
    *,
    generator: Optional[torch.Generator],
    block_elements: Optional[int] = None,
) -> None:
    """Update an int8 weight in place, a block of rows at a time (never the whole fp32 weight):

    1. ``w = q * s`` for the block's rows, in fp32;
    2. ``update(w, rows)`` changes ``w`` in place (e.g. ``w.addcmul_(grad[rows], factor, value=-lr)`` and weight
       decay ``w.mul_(1 - lr * wd)``), ``rows`` being the slice of the weight's first dimension; or, given a
       tensor ``U`` of the weight's shape instead of a callable: ``w -= U[rows]``;
    3. re-quantize with :func:`stochastic_requantize_int8_` (bits from ``generator``; pass one seeded by
       (seed, parameter, step) so a resumed run is exact; ``None`` draws from torch's global generator).

    ``target``: the :class:`Int8Linear` or its gradient carrier parameter. ``block_elements``: the fp32 block
    size (default 2^20 elements on CPU, 2^22 on accelerators); the result depends on it only through the
    order in which random bits are drawn, which is fixed for a given value.
    """
    module = target if isinstance(target, Int8Linear) else int8_module_of(target)
    if module is None:
        raise TypeError(f"apply_int8_update_ needs an Int8Linear or its weight parameter, got a "
                        f"{type(target).__name__} of shape {tuple(getattr(target, 'shape', ()))}")
    codes, scales = module.weight_int8, module.weight_scale
    rows_total, cols = codes.shape
    if isinstance(update, torch.Tensor):
        if tuple(update.shape) != (rows_total, cols):
            raise ValueError(f"update shape {tuple(update.shape)} does not match the weight {(rows_total, cols)}")
        delta = update
        update = lambda w, rows: w.sub_(delta[rows].to(torch.float32))  # noqa: E731
    elif not callable(update):
        raise TypeError(f"update must be a callable (w, rows) or a tensor, got {type(update).__name__}")
    if block_elements is not None and (isinstance(block_elements, bool) or not isinstance(block_elements, int)
                                       or block_elements < 1):
        raise ValueError(f"block_elements must be an integer >= 1, got {block_elements!r}")
    with torch.no_grad():
        for rows in _row_blocks(rows_total, cols, codes.device, block_elements):
            weight = _dequantize_block(codes[rows], scales[rows], module.group_size)
            update(weight, rows)
            stochastic_requantize_int8_(weight, codes[rows], scales[rows], module.group_size, generator)


def _output_embedding(model: nn.Module) -> Optional[nn.Module]:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def quantize_model_(
    model: nn.Module,
    *,
    group_size: Optional[int] = DEFAULT_GROUP_SIZE,
    include_output_embedding: bool = False,
    skip: Iterable[str] = (),
) -> list[str]:
    """Replace the model's ``nn.Linear`` layers by :class:`Int8Linear` (round to nearest), one layer at a time,
    in place; returns the names replaced. The output embedding (``lm_head``) is kept in float unless
    ``include_output_embedding``; embeddings (``nn.Embedding``) are never quantized; module names containing
    any string of ``skip`` are left alone. A weight shared with another module (tied) is refused."""
    skip = tuple(skip)
    output_embedding = _output_embedding(model)
    counts: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    chosen = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or any(s in name for s in skip):
            continue
        if module is output_embedding and not include_output_embedding:
            continue
        if counts.get(id(module.weight), 0) > 1:
            raise ValueError(f"{name}.weight is shared with another module (tied weights); quantizing it would "
                             "untie them: pass skip=[{name!r}] or untie first")
        chosen.append(name)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(getattr(parent, child), group_size))
    return chosen
