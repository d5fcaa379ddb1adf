"""What every optimizer in the package shares, so that each rule is written once:

* **Hyperparameters**: one declarative check (:class:`Option` specs, :func:`validate_group`) used by every
  constructor and again by ``load_state_dict`` on the groups a checkpoint brings. A value of the wrong type
  (YAML's ``lr: 1e-3`` is the string ``'1e-3'``) is refused with its name, value and type, as torch does.
* **Non-finite gradients**: one policy (:func:`screen_gradients`, option ``nonfinite="raise" | "skip"``). A
  gradient with an inf/nan, or one whose squares overflow the dtype the optimizer computes in (a finite
  ``1e30`` in fp32 turns Adam's second moment into inf and freezes the weight for good), either makes
  ``step()`` raise before anything changes or is skipped and counted. The promise: a non-finite value never
  reaches a weight or a moment without a raise or a counted skip.
* **Checkpoints**: :func:`load_state_dict_checked` refuses a checkpoint whose hyperparameters or state tensors
  do not fit the optimizer (naming the parameter and both shapes) before anything changes, and keeps the
  saved state dtypes.
* **Writing back** a weight computed in a wider dtype (:func:`write_back_`): stochastic rounding into bf16, and
  an fp16 weight that would overflow 65504 raises instead of becoming inf.
* Parameter labels.

Nothing here knows about a particular algorithm.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

NONFINITE_CHOICES = ("raise", "skip")


class OptionTypeError(TypeError, ValueError):
    """A hyperparameter of the wrong type (``lr='1e-3'``). A ``TypeError`` as torch raises for these, and a
    ``ValueError`` so that code written against the earlier checks, which raised ``ValueError``, still
    catches it."""


# --------------------------------------------------------------------------------------------------------
# Hyperparameters: one declarative check
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """How one hyperparameter is checked. Build it with :func:`real`, :func:`integer`, :func:`boolean`,
    :func:`choice` or :func:`pair`.

    Attributes:
        kind: ``"real"``, ``"int"``, ``"bool"``, ``"choice"`` or ``"pair"``.
        low, high: the range (``None``: unbounded); ``low_open``/``high_open`` make an end exclusive.
        finite: refuse +-inf and NaN (NaN also fails any bound).
        tensor: a one-element real tensor is accepted (torch accepts a tensor ``lr``).
        none: ``None`` is accepted.
        choices: the accepted values of a ``"choice"``.
        item: how each item of a ``"pair"`` is checked.
        what: how a ``"pair"`` is described in messages (``"a pair (beta1, beta2)"``).
        reason: appended to a range error, to say why the range is what it is.
    """

    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    finite: bool = False
    tensor: bool = False
    none: bool = False
    choices: tuple = ()
    item: Optional["Option"] = None
    what: str = ""
    reason: str = ""


def real(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
         high_open: bool = False, finite: bool = False, tensor: bool = False, none: bool = False,
         reason: str = "") -> Option:
    """A real number (``int`` or ``float``, not ``bool`` nor a string) in the given range."""
    return Option("real", low, high, low_open, high_open, finite, tensor, none, reason=reason)


def integer(low: Optional[int] = None, high: Optional[int] = None, *, none: bool = False) -> Option:
    """An ``int`` (not ``bool``, not ``2.0``) in ``[low, high]``."""
    return Option("int", low, high, none=none)


def boolean(*, none: bool = False) -> Option:
    """``True`` or ``False``."""
    return Option("bool", none=none)


def choice(*choices: Any, none: bool = False) -> Option:
    """One of ``choices`` (compared with ``==``, so ``"L2"`` and ``"l2"`` differ)."""
    return Option("choice", none=none, choices=tuple(choices))


def pair(item: Option, what: str = "a pair") -> Option:
    """A tuple or list of two items, each checked by ``item`` under the name ``name[i]``."""
    return Option("pair", item=item, what=what)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _range_text(spec: Option) -> str:
    if spec.low is not None and spec.high is not None:
        return f"in {'(' if spec.low_open else '['}{_num(spec.low)}, {_num(spec.high)}{')' if spec.high_open else ']'}"
    if spec.low is not None:
        return f"{'>' if spec.low_open else '>='} {_num(spec.low)}"
    if spec.high is not None:
        return f"{'<' if spec.high_open else '<='} {_num(spec.high)}"
    return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _in_range(value: float, spec: Option) -> bool:
    if spec.low is not None and not (value > spec.low if spec.low_open else value >= spec.low):
        return False  # also NaN
    if spec.high is not None and not (value < spec.high if spec.high_open else value <= spec.high):
        return False
    return True  # an unbounded range takes NaN too: ``finite`` refuses it


def _type_error(name: str, value: Any, noun: str, where: str) -> OptionTypeError:
    return OptionTypeError(f"{name} must be {noun}, got {value!r} ({type(value).__name__}){where}")


def check_option(name: str, value: Any, spec: Option, where: str = "") -> None:
    """Raise (``OptionTypeError`` for a wrong type, ``ValueError`` for a bad value) unless ``value`` fits
    ``spec``; the message names the option, the value (and its type) and ``where`` it was given."""
    if value is None and spec.none:
        return
    none_text = "None or " if spec.none else ""
    if spec.kind == "real":
        if isinstance(value, torch.Tensor) and spec.tensor:
            if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                raise _type_error(name, value, f"{none_text}a number or a one-element real tensor", where)
            number = float(value.item())
        elif _is_real(value):
            number = float(value)
        else:
            raise _type_error(name, value, f"{none_text}a number", where)
        if not _in_range(number, spec):
            reason = f" ({spec.reason})" if spec.reason else ""
            raise ValueError(f"{name} must be {none_text}{_range_text(spec) or 'a number'}{reason}, got {value}{where}")
        if spec.finite and not math.isfinite(number):
            raise ValueError(f"{name} must be finite, got {value}{where}")
    elif spec.kind == "int":
        noun = f"{none_text}an integer" + (f" {_range_text(spec)}" if _range_text(spec) else "")
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise _type_error(name, value, noun, where)
        if not _in_range(int(value), spec):
            raise ValueError(f"{name} must be {noun}, got {value!r}{where}")
    elif spec.kind == "bool":
        if not isinstance(value, bool):
            raise _type_error(name, value, f"{none_text}a bool", where)
    elif spec.kind == "choice":
        listed = ", ".join(map(repr, spec.choices))
        try:
            ok = any(isinstance(value, type(c)) and value == c for c in spec.choices)
        except Exception:  # an object whose == raises is not one of the choices either
            ok = False
        if not ok:
            raise ValueError(f"{name} must be {none_text}one of {listed}, got {value!r}{where}")
    elif spec.kind == "pair":
        if not isinstance(value, (tuple, list)):
            raise _type_error(name, value, spec.what, where)
        if len(value) != 2:
            raise ValueError(f"{name} must be {spec.what}, got {value!r}{where}")
        for i, item in enumerate(value):
            check_option(f"{name}[{i}]", item, spec.item, where)
    else:  # pragma: no cover - a programming error in a spec table
        raise AssertionError(f"unknown option kind {spec.kind!r}")


def validate_group(group: Mapping[str, Any], specs: Mapping[str, Option], where: str = "") -> None:
    """Check every option of ``specs`` that ``group`` holds, in the order of ``specs``; the first bad one
    raises (see :func:`check_option`). Keys of ``group`` that ``specs`` does not name are not checked."""
    for name, spec in specs.items():
        if name in group:
            check_option(name, group[name], spec, where)


# The options most optimizers share, with the messages the package has always given.
LR = real(0.0, finite=True, tensor=True)
EPS = real(0.0, finite=True)
BETA = real(0.0, 1.0, high_open=True, tensor=True)
BETAS = pair(BETA, "a pair (beta1, beta2)")
WEIGHT_DECAY = real(0.0, finite=True)
NONFINITE = choice(*NONFINITE_CHOICES)


# --------------------------------------------------------------------------------------------------------
# Labels and parameter checks
# --------------------------------------------------------------------------------------------------------


def group_where(group_index: int) -> str:
    return f" in param_groups[{group_index}]"


def param_label(group: dict, index_in_group: int, param: torch.Tensor) -> str:
    """The parameter's name when the optimizer was given named parameters, else its position and shape."""
    names = group.get("param_names")
    if names is not None and index_in_group < len(names):
        return repr(names[index_in_group])
    return f"param {index_in_group} (shape {tuple(param.shape)}) of its param group"


def check_param_dtypes(optimizer: torch.optim.Optimizer, supported: str = "real floating point") -> None:
    """Complex or integer parameters are refused at construction, naming the parameter."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p.is_complex() or not p.is_floating_point():
                raise TypeError(
                    f"{type(optimizer).__name__} supports {supported} parameters only, got dtype {p.dtype} "
                    f"for {param_label(group, i, p)}"
                )


def check_grad_supported(optimizer: torch.optim.Optimizer, group: dict, index: int, p: torch.Tensor) -> None:
    grad = p.grad
    if grad.is_sparse:
        raise RuntimeError(
            f"{type(optimizer).__name__} does not support sparse gradients, got one for "
            f"{param_label(group, index, p)}; use dense gradients (e.g. nn.Embedding(sparse=False))"
        )
    if grad.is_complex():
        raise RuntimeError(
            f"{type(optimizer).__name__} does not support complex gradients, got one for "
            f"{param_label(group, index, p)}"
        )


# --------------------------------------------------------------------------------------------------------
# Norms in a wider dtype, without a widened copy of the whole tensor
# --------------------------------------------------------------------------------------------------------

_WIDEN_BLOCK = 1 << 18  # elements widened at a time on CPU (a 1 MiB fp32 temporary)


def _widens_whole_on_cpu(x: torch.Tensor, dtype: Optional[torch.dtype]) -> bool:
    return (x.device.type == "cpu" and dtype is not None and x.dtype != dtype and x.numel() > _WIDEN_BLOCK
            and x.is_contiguous())


def vector_norm_wide(x: torch.Tensor, dtype: Optional[torch.dtype], dim: Optional[int] = None) -> torch.Tensor:
    """``torch.linalg.vector_norm(x, dim=dim, dtype=dtype)`` (the 2-norm; ``dim`` None, or 1 for the row norms
    of a 2-D ``x``), without the copy that torch's CPU reductions make of the *whole* of a narrower ``x`` to
    widen it: for a bf16 gradient of LLaMA-7B's lm_head (131 M elements) a 524 MB fp32 temporary, the largest
    tensor of a layer-wise step. On CPU such an ``x`` is widened a block of ``_WIDEN_BLOCK`` elements at a
    time (the block norms combined by a norm of norms, as overflow-safe as torch's); on CUDA (which widens as
    it loads), on meta tensors, and where nothing is widened, it is torch's own call."""
    rows_2d = dim in (1, -1) and x.ndim == 2
    if not _widens_whole_on_cpu(x, dtype) or not (dim is None or rows_2d):
        return torch.linalg.vector_norm(x, dim=dim, dtype=dtype)
    if dim is None:
        flat = x.view(-1)
        parts = [torch.linalg.vector_norm(flat[start:start + _WIDEN_BLOCK].to(dtype))
                 for start in range(0, flat.numel(), _WIDEN_BLOCK)]
        return torch.linalg.vector_norm(torch.stack(parts))
    if x.shape[1] > _WIDEN_BLOCK:  # rows longer than a block: each row a block at a time
        return torch.stack([vector_norm_wide(row, dtype) for row in x])
    rows = _WIDEN_BLOCK // x.shape[1]
    return torch.cat([torch.linalg.vector_norm(x[start:start + rows].to(dtype), dim=1)
                      for start in range(0, x.shape[0], rows)])


def norms_wide(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The 2-norm of each tensor computed in ``dtype``: one batched ``torch._foreach_norm``, unless one of
    them is a large narrower CPU tensor, which :func:`vector_norm_wide` takes without a full-size copy."""
    if any(_widens_whole_on_cpu(t, dtype) for t in tensors):
        return [vector_norm_wide(t, dtype) for t in tensors]
    try:
        return list(torch._foreach_norm(tensors, 2, dtype=dtype))
    except (TypeError, RuntimeError):  # pragma: no cover - torch without the dtype argument of _foreach_norm
        return [torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]


# --------------------------------------------------------------------------------------------------------
# Non-finite gradients: one policy
# --------------------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the package's optimizers compute in for parameters of ``dtype``: fp32 for 16-bit and
    narrower floats, else ``dtype`` itself."""
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def square_limit(dtype: torch.dtype) -> float:
    """The largest ``|g|`` whose square is finite in ``dtype``: ``sqrt(finfo(dtype).max)`` (1.8e19 for fp32,
    1.3e154 for fp64, 255.9 for fp16). A larger gradient overflows Adam's second moment to inf (after which
    the update ``m / sqrt(v)`` is 0 and the weight never moves again), so it is treated as non-finite."""
    return math.sqrt(torch.finfo(dtype).max)


def gradient_fault_flags(grads: Sequence[torch.Tensor], dtypes: Sequence[Optional[torch.dtype]]) -> torch.Tensor:
    """One bool per gradient, on the gradients' (common) device, True where the gradient holds an inf/nan or
    an element beyond ``square_limit(dtypes[i])`` (``None``: no size limit, for math that squares nothing).
    One read of each gradient (its max-abs), no host sync. Empty gradients have no fault."""
    if not grads:
        return torch.zeros(0, dtype=torch.bool)
    live = [i for i, g in enumerate(grads) if g.numel() > 0]
    if not live:
        return torch.zeros(len(grads), dtype=torch.bool, device=grads[0].device)
    # max |g| per tensor (NaN propagates; the inf-norm of a finite tensor cannot overflow, unlike its 2-norm),
    # as a fraction of its limit: <= 1 is fine, > 1, inf and nan are faults.
    maxabs = torch._foreach_norm([grads[i] for i in live], math.inf)
    ratios = torch._foreach_mul(maxabs, [0.0 if dtypes[i] is None else 1.0 / square_limit(dtypes[i]) for i in live])
    live_flags = ~(torch.stack(ratios) <= 1.0)
    if len(live) == len(grads):
        return live_flags
    flags = torch.zeros(len(grads), dtype=torch.bool, device=live_flags.device)
    flags[live] = live_flags
    return flags


def describe_fault(grad: torch.Tensor, dtype: Optional[torch.dtype]) -> str:
    """Why ``grad`` was refused, for the error message (this reads the gradient: only on the error path)."""
    if dtype is None or not bool(torch.isfinite(grad).all()):
        return "non-finite gradient (inf or nan)"
    largest = float(grad.abs().max().double())
    dtype_name = str(dtype).replace("torch.", "")
    return (f"gradient too large for {dtype_name} math (max |g| = {largest:.3g} > {square_limit(dtype):.3g}: "
            "its square overflows)")


def gradient_fault_message(optimizer: torch.optim.Optimizer, faults: Sequence[tuple[str, str]],
                           option: str = "nonfinite='skip'", effect: str = "skip those tensors' updates",
                           changed: str = "no parameter or optimizer state was changed") -> str:
    """The error of a step refused for ``faults``: ``(label, reason)`` pairs, reasons from
    :func:`describe_fault`; labels with the same reason are listed together."""
    by_reason: dict[str, list[str]] = {}
    for label, reason in faults:
        by_reason.setdefault(reason, []).append(label)
    parts = "; ".join(f"{reason} for {', '.join(labels)}" for reason, labels in by_reason.items())
    return (
        f"{type(optimizer).__name__}.step(): {parts}; {changed}. Pass {option} to {effect} instead, "
        "or lower the learning rate / use loss scaling."
    )


Entry = tuple  # (group, index in group, parameter)


def screen_gradients(
    optimizer: torch.optim.Optimizer,
    entries: Sequence[Entry],
    *,
    policy: Union[str, Callable[[dict], str]] = lambda group: group["nonfinite"],
    dtype_of: Callable[[torch.Tensor], torch.dtype] = lambda p: compute_dtype(p.dtype),
    counter: str = "skipped_tensors",
) -> set[int]:
    """The shared non-finite policy, for optimizers that update each tensor on its own.

    ``entries`` are ``(group, index_in_group, param)`` for every parameter about to be updated (each with a
    gradient). Every gradient is checked before anything changes (one read of each, one host sync per device):
    an inf/nan or an element whose square overflows ``dtype_of(param)`` is a fault. If any faulty tensor's
    ``policy`` (a group's ``nonfinite`` option by default) is ``"raise"``, a ``RuntimeError`` names every
    faulty tensor and why; otherwise the faulty ones are counted in ``optimizer.<counter>`` and their
    positions in ``entries`` returned, for the caller to skip. Meta tensors (no values) are not checked.
    """
    by_device: dict[torch.device, list[int]] = {}
    for k, (_, _, p) in enumerate(entries):
        if p.grad.device.type != "meta":
            by_device.setdefault(p.grad.device, []).append(k)
    bad: list[int] = []
    for ks in by_device.values():
        flags = gradient_fault_flags([entries[k][2].grad for k in ks], [dtype_of(entries[k][2]) for k in ks])
        bad.extend(k for k, flag in zip(ks, flags.tolist()) if flag)  # the one host sync
    if not bad:
        return set()
    bad.sort()
    policy_of = (lambda group: policy) if isinstance(policy, str) else policy
    faults = [(param_label(g, i, p), describe_fault(p.grad, dtype_of(p))) for g, i, p in (entries[k] for k in bad)]
    if any(policy_of(entries[k][0]) == "raise" for k in bad):
        raise RuntimeError(gradient_fault_message(optimizer, faults))
    setattr(optimizer, counter, getattr(optimizer, counter, 0) + len(bad))
    logging.getLogger(type(optimizer).__module__).warning(
        "%s.step(): skipped the update of %s", type(optimizer).__name__,
        "; ".join(f"{label} ({reason})" for label, reason in faults))
    return set(bad)


def write_back_(target: torch.Tensor, work: torch.Tensor, generator: Optional[torch.Generator] = None,
                label: str = "a parameter") -> None:
    """Copy ``work``, the updated value of ``target`` computed in a wider dtype, into ``target``: into bf16 with
    stochastic rounding when ``generator`` is given, else to nearest. An fp16 result beyond 65504 raises
    instead of becoming inf (bf16 has fp32's range). Nothing to do when ``work`` is ``target``."""
    if work is target:
        return
    if generator is not None:
        from .rounding import stochastic_round_to_bf16_

        stochastic_round_to_bf16_(work, generator)  # now exact in bf16
    elif target.dtype == torch.float16 and work.numel() and work.device.type != "meta":
        largest = float(torch.linalg.vector_norm(work, ord=math.inf))
        if not largest <= torch.finfo(torch.float16).max:
            raise RuntimeError(f"the updated weight of {label} does not fit float16 (max |w| = {largest:.4g} > 65504) "
                               "and was not written: lower the learning rate, or keep fp32 master weights")
    target.copy_(work)


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------

COUNT = "count"  # a state entry that is a step count: an int >= 0 (or a one-element tensor of one)


@dataclass(frozen=True)
class StateKey:
    """What one key of a parameter's state must hold: ``shape`` (a tuple) for a tensor, or :data:`COUNT`;
    ``required`` keys must be present whenever the parameter has any state. A tensor is floating (and finite)
    unless ``dtype`` names another dtype it must have (``torch.uint8`` for 8-bit codes)."""

    shape: Union[tuple, str]
    required: bool = True
    dtype: Optional[torch.dtype] = None


# (group, index of the parameter in its group, parameter) -> what each state key of that parameter must hold
StateLayout = Callable[[dict, int, torch.Tensor], Mapping[str, StateKey]]


def like_param(*keys: str, counts: Sequence[str] = ("step",)) -> StateLayout:
    """A :data:`StateLayout` where each of ``keys`` has the parameter's shape and each of ``counts`` is a
    step count (the layout of Adam-style optimizers)."""

    def layout(group: dict, index: int, p: torch.Tensor) -> Mapping[str, StateKey]:
        out = {key: StateKey(COUNT) for key in counts}
        out.update({key: StateKey(tuple(p.shape)) for key in keys})
        return out

    return layout


def _saved_state_entries(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]):
    """(group, index in group, param, saved entry or None) for every parameter, after the structural checks
    torch makes (same number of groups, same number of parameters per group), with clearer messages."""
    name = type(optimizer).__name__
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups', got "
                         f"{type(state_dict).__name__}" + (f" with keys {sorted(map(str, state_dict))}"
                                                           if isinstance(state_dict, Mapping) else ""))
    groups, saved_groups = optimizer.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(f"{name}.load_state_dict: the checkpoint has {len(saved_groups)} param group(s), this "
                         f"optimizer has {len(groups)}")
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(f"{name}.load_state_dict: param_groups[{gi}] of the checkpoint has "
                             f"{len(saved['params'])} parameter(s), this optimizer's has {len(group['params'])}")
    saved_state = state_dict["state"]
    for group, saved in zip(groups, saved_groups):
        for i, (p, pid) in enumerate(zip(group["params"], saved["params"])):
            yield group, i, p, saved_state.get(pid)


def check_loaded_state(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any],
                       layout: Optional[StateLayout]) -> None:
    """Refuse (``ValueError``) a checkpoint whose state does not fit the parameters: a missing required key,
    a tensor of another shape (the message names the parameter and both shapes), a non-floating or
    non-finite moment, a negative or non-integer step count. Reads only; changes nothing."""
    name = type(optimizer).__name__
    for group, i, p, entry in _saved_state_entries(optimizer, state_dict):
        if entry is None or layout is None:
            continue
        label = param_label(group, i, p)
        if not isinstance(entry, Mapping):
            raise ValueError(f"{name}.load_state_dict: the state of {label} is a {type(entry).__name__}, "
                             "not a dict")
        if not entry:
            continue
        for key, rule in layout(group, i, p).items():
            if key not in entry:
                if rule.required:
                    raise ValueError(f"{name}.load_state_dict: the checkpoint's state of {label} has no "
                                     f"{key!r} (it has {sorted(map(str, entry))})")
                continue
            value = entry[key]
            if rule.shape == COUNT:
                number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
                if (not isinstance(number, numbers.Real) or isinstance(number, bool) or not number >= 0
                        or not float(number).is_integer()):
                    raise ValueError(f"{name}.load_state_dict: state {key!r} of {label} must be a step count "
                                     f"(an integer >= 0), got {value!r}")
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{name}.load_state_dict: state {key!r} of {label} must be a tensor, got "
                                 f"{type(value).__name__}")
            if tuple(value.shape) != tuple(rule.shape):
                raise ValueError(f"{name}.load_state_dict: state {key!r} of {label} has shape "
                                 f"{tuple(value.shape)} in the checkpoint, but this optimizer needs "
                                 f"{tuple(rule.shape)} (parameter shape {tuple(p.shape)}); the checkpoint is "
                                 "of another model")
            if rule.dtype is not None:
                if value.dtype != rule.dtype:
                    raise ValueError(f"{name}.load_state_dict: state {key!r} of {label} must be {rule.dtype}, got "
                                     f"{value.dtype}")
                continue
            if not value.is_floating_point():
                raise ValueError(f"{name}.load_state_dict: state {key!r} of {label} must be a floating "
                                 f"tensor, got dtype {value.dtype}")
            if value.device.type != "meta" and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name}.load_state_dict: state {key!r} of {label} holds inf or nan in the "
                                 "checkpoint; it would reach the weights")


def check_loaded_groups(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any],
                        check_group: Callable[[dict, str], None]) -> None:
    """Run ``check_group(group, where)`` on a copy of each group the checkpoint would install (the saved
    hyperparameters with this optimizer's parameters, missing options taken from its defaults: an option a
    checkpoint predates gets the constructor's value, as ``__setstate__`` should give it). Changes
    nothing; raises what ``check_group`` raises."""
    list(_saved_state_entries(optimizer, state_dict))  # the structural checks, with clear messages
    for gi, (group, saved) in enumerate(zip(optimizer.param_groups, state_dict["param_groups"])):
        candidate = {**optimizer.defaults, **saved, "params": group["params"]}
        if "param_names" in group and "param_names" not in saved:
            candidate["param_names"] = group["param_names"]
        check_group(candidate, f" in param_groups[{gi}] of the loaded state dict")


def load_state_dict_checked(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any], *,
                            check_group: Optional[Callable[[dict, str], None]] = None,
                            layout: Optional[StateLayout] = None) -> None:
    """``load_state_dict`` that trusts nothing it loads: after the load pre-hooks, every group is checked with
    ``check_group`` and every state entry against ``layout``, all before anything changes; then the state is
    loaded keeping its saved dtypes (:func:`load_state_dict_keep_dtypes`)."""
    state_dict = dict(state_dict)
    hooks = optimizer._optimizer_load_state_dict_pre_hooks
    for hook in hooks.values():
        result = hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    if check_group is not None:
        check_loaded_groups(optimizer, state_dict, check_group)
    check_loaded_state(optimizer, state_dict, layout)
    # The hooks ran above (the checks must see what they return); torch's loader must not run them twice.
    optimizer._optimizer_load_state_dict_pre_hooks = OrderedDict()
    try:
        load_state_dict_keep_dtypes(optimizer, state_dict)
    finally:
        optimizer._optimizer_load_state_dict_pre_hooks = hooks


def load_state_dict_keep_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its parameter's dtype,
    which would turn fp32 moments of a bf16 parameter into bf16 on resume. Load, then put back the dtypes
    the checkpoint was saved with, so that resume is exact whatever the parameter dtype."""
    saved_state = state_dict["state"]
    torch.optim.Optimizer.load_state_dict(optimizer, state_dict)
    saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, p in zip(saved_ids, params):
        saved = saved_state.get(pid)
        if not saved or p not in optimizer.state:
            continue
        _restore_dtypes(optimizer.state[p], saved, p.device)


def _restore_dtypes(state: dict, saved: Mapping[str, Any], device: torch.device) -> None:
    """Put back every saved tensor whose dtype the loader changed (fp32 moments of a bf16 parameter, uint8 codes
    of 8-bit moments), also in nested dicts (the per-piece state of a flat shard)."""
    for key, value in saved.items():
        current = state.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict):
            _restore_dtypes(current, value, device)
        elif isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor) and current.dtype != value.dtype:
            state[key] = value.to(device=current.device, copy=True)
