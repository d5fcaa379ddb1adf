"""Does LLaMA-7B really train on one GPU under 48, 24 and 16 GB? Measured peaks next to the estimator's.

    python benchmarks/fit_7b.py                                   # CUDA GPU: LLaMA-7B, caps 48,24,16
    python benchmarks/fit_7b.py --caps 24 --optims apollo_mini_layerwise --steps 20 --output fit_24.json
    python benchmarks/fit_7b.py --config configs/llama_1b.json --caps 0 --output fit_1b.json   # no cap
    python benchmarks/fit_7b.py --device cpu --config configs/llama_tiny.json --caps 0 --seq-len 64 --steps 2

Per cap (largest first; GB = 10^9 bytes, 0: none; ``torch.cuda.set_per_process_memory_fraction``, the CUDA
context outside it) and optimizer (ours by registry name, or a dense baseline of ``_common.BASELINES``): the model
of --config built on the device in pure bf16 (SDPA, per-layer gradient checkpointing), --steps steps on one random
batch; the allocator's peaks, tokens/s, losses and state bytes next to ``lowrank_opt.memory.estimate`` of the same
run (allocated = total - overhead; reserved = total - the CUDA context). Out of memory: again at each
--fallback-seq-lens (a smaller cap starts at the longest that fitted a larger one). Without CUDA it stops before
allocating anything (exit 3); ``--device cpu`` traces the CPU allocator's live tensor bytes instead
(docs/memory_measured_cpu.md). The memory levers apply to the run and its estimate alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    BASELINES, GB, baseline_missing, build_baseline, build_llama, check_at_least, command_line, cpu_peak_bytes,
    environment, release_memory, split_list, storage_bytes, table, utc_now, write_json_atomic)

EXIT_NO_CUDA = 3
DEFAULT_CONFIG = "configs/llama_7b.json"
DEFAULT_OPTIMS = "apollo,apollo_mini,apollo_layerwise,apollo_mini_layerwise,torch-adamw-fused,bnb-adamw8bit"
WEIGHT_FORMATS = ("float", "int8")
CPU_MATMUL_CHOICES = ("layout", "torch")


@dataclass(frozen=True)
class OptimChoice:
    """``--optims NAME`` (a registry name, or a key of ``_common.BASELINES``) with the run's options and memory
    levers, the same for the run and its estimate: ``options`` (the constructor's, over the registry's
    defaults), ``target_modules`` (None: the optimizer's default, ``"all-linear"``), ``lean_loss``, ``weights``."""

    name: str
    lr: float
    layerwise: bool = False
    options: dict = field(default_factory=dict)
    target_modules: Optional[object] = None
    lean_loss: bool = False
    weights: str = "float"

    baseline = property(lambda self: self.name in BASELINES)
    estimator = property(lambda self: BASELINES[self.name].estimator if self.baseline else self.name)
    estimator_args = property(lambda self: dict(self.options))


def resolve_choice(name: str) -> OptimChoice:
    """A key of ``_common.BASELINES`` or a registry name (ValueError naming both lists otherwise)."""
    key = name.strip().lower()
    if key in BASELINES:
        if BASELINES[key].lowrank is not None:
            raise ValueError(f"{key!r} projects matrices a model's targets would choose; fit_7b.py runs the dense "
                             f"baselines only: {', '.join(k for k, b in BASELINES.items() if b.lowrank is None)}")
        return OptimChoice(key, 1e-3)  # ours take the registry's lr
    from lowrank_opt.registry import resolve

    try:
        resolved = resolve(key)
    except ValueError as exc:
        raise ValueError(f"{exc}; or one of {', '.join(BASELINES)}") from None
    return OptimChoice(key, float(resolved.options.get("lr", 1e-3)), layerwise=resolved.layerwise)


def with_levers(choice: OptimChoice, *, optim_args: Optional[dict] = None, target_modules=None,
                lean_loss: bool = False, weights: str = "float") -> OptimChoice:
    """``choice`` with the memory levers of issue 17, for the run and its estimate alike. A ValueError, before
    any work, where a lever does not apply: options, targets and int8 weights need one of our optimizers."""
    from lowrank_opt.registry import normalize_target_modules

    optim_args = dict(optim_args or {})
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if not isinstance(lean_loss, bool):
        raise ValueError(f"lean_loss must be True or False, got {lean_loss!r}")
    for label, used in (("optimizer options " + ", ".join(f"{k}={v}" for k, v in optim_args.items()), optim_args),
                        (f"target modules {target_modules!r}", target_modules is not None),
                        ("int8 weights (APOLLO updates them)", weights == "int8")):
        if used and choice.baseline:
            raise ValueError(f"{label}: only for a lowrank-opt optimizer, not {choice.name!r} "
                             f"({BASELINES[choice.name].package})")
    if weights == "int8":
        from lowrank_opt.registry import lowrank_names

        if choice.name not in lowrank_names():
            raise ValueError(f"int8 weights (APOLLO updates them): only for {', '.join(lowrank_names())}, not "
                             f"{choice.name!r}")
    return dataclasses.replace(choice, options={**choice.options, **optim_args}, lean_loss=lean_loss,
                               target_modules=normalize_target_modules(target_modules), weights=weights)


def describe_levers(choice: OptimChoice) -> str:
    """``"dense_state_bits=8, targets all-linear,embed_tokens,lm_head, lean loss, int8 weights"`` ("" if none)."""
    targets = choice.target_modules
    parts = [f"{k}={v}" for k, v in choice.options.items()]
    parts += [] if targets is None else ["targets " + (targets if isinstance(targets, str) else ",".join(targets))]
    parts += ["lean loss"] if choice.lean_loss else []
    return ", ".join(parts + ([f"{choice.weights} weights"] if choice.weights != "float" else []))


# ----------------------------------------------------------------------------------------------------------
# Arguments


def _numbers(text: str, cast, what: str, low: float) -> list:
    """``"48,24,16"`` -> [48, 24, 16], each ``cast`` and >= ``low`` (argparse's error otherwise)."""
    values = []
    for item in split_list(text):
        try:
            value = cast(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be numbers separated by commas, got {item!r}") from None
        if not (math.isfinite(value) and value >= low):
            raise argparse.ArgumentTypeError(f"a {what[:-1]} must be >= {low:g}, got {item!r}")
        values.append(value)
    return values


def parse_caps(text: str) -> list[float]:
    """``"48,24,16"`` -> [48.0, 24.0, 16.0] (GB, largest first, 0 = no cap first)."""
    caps = _numbers(text, float, "caps", 0)
    if not caps:
        raise argparse.ArgumentTypeError("--caps needs at least one value (0: no cap)")
    return sorted(caps, key=lambda c: math.inf if c == 0 else c, reverse=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fit_7b.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"transformers config JSON (default {DEFAULT_CONFIG})")
    parser.add_argument("--caps", type=parse_caps, default=parse_caps("48,24,16"),
                        help="allocator caps in GB (1e9 bytes), comma-separated; 0 = no cap (default 48,24,16)")
    parser.add_argument("--optims", type=lambda t: split_list(t.lower()), default=DEFAULT_OPTIMS.split(","),
                        help=f"registry names and dense baselines, comma-separated (default {DEFAULT_OPTIMS})")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence to try first (default 2048)")
    parser.add_argument("--fallback-seq-lens", type=lambda t: _numbers(t, int, "lengths", 1), default=[1024, 512],
                        help="shorter lengths to try after an out-of-memory, in order (default 1024,512)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per run (default 10)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--lr", type=float, default=None, help="for every optimizer (default: the registry's for "
                        "ours, 1e-3 for the baselines)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and the random batch (default 0)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: no GPU numbers")
    levers = parser.add_argument_group("memory levers (issue 17), for every run and its estimate")
    levers.add_argument("--optim-args", default="", help="our optimizers' options, k=v,k=v (e.g. dense_state_bits=8)")
    levers.add_argument("--target-modules", default=None, help="the low-rank matrices, comma-separated names/regexes "
                        "(e.g. all-linear,embed_tokens,lm_head; default all-linear)")
    levers.add_argument("--lean-loss", action="store_true", help="lowrank_opt.loss.causal_lm_loss_from_model's loss")
    levers.add_argument("--weights", default="float", choices=list(WEIGHT_FORMATS),
                        help="int8: every Linear but the head in int8, updated by APOLLO (Q-APOLLO)")
    parser.add_argument("--cpu-matmul", default="layout", choices=list(CPU_MATMUL_CHOICES),
                        help="CPU: 'layout' (default) gives a bf16 matrix product one transposed operand "
                             "(CpuBf16MatmulLayout); 'torch': torch as is")
    parser.add_argument("--no-estimate", dest="estimate", action="store_false", help="skip the estimates")
    parser.add_argument("--output", type=Path, default=Path("fit_7b_results.json"), help="the results' JSON file")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.optims:
        parser.error("--optims needs at least one optimizer name")
    check_at_least(parser.error, ("--seq-len", args.seq_len, 1), ("--steps", args.steps, 1),
                   ("--batch-size", args.batch_size, 1))
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.device == "cpu" and any(c != 0 for c in args.caps):
        parser.error("--device cpu cannot cap memory: pass --caps 0 (the caps are for CUDA's allocator)")
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")


def seq_ladder(seq_len: int, fallbacks: list[int], start_at: Optional[int] = None) -> list[int]:
    """The lengths to try in order: ``seq_len``, then the shorter fallbacks, longest first, none above
    ``start_at`` (the longest length that fitted a larger cap)."""
    ladder = [seq_len] + sorted({s for s in fallbacks if s < seq_len}, reverse=True)
    return [s for s in ladder if start_at is None or s <= start_at]


def first_line(exc: BaseException, limit: int = 240) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def longest_fitting(run: Callable[[int], dict], ladder: list[int], cleanup: Callable[[], None] = lambda: None
                    ) -> tuple[Optional[dict], list[dict]]:
    """Call ``run(seq_len)`` down the ladder until one does not run out of memory.

    Returns (the result of the first length that fitted or ``None``, one ``{"seq_len", "outcome"}`` per
    attempt). Out-of-memory errors are caught (the exception, and with it every tensor its traceback holds,
    is dropped before ``cleanup()`` runs); any other error propagates."""
    import torch

    attempts: list[dict] = []
    for seq_len in ladder:
        message = None
        try:
            result = run(seq_len)
        except Exception as exc:  # only OOMs are handled here, the rest is re-raised
            # (OOMs from inside autograd hooks or bitsandbytes kernels may arrive as plain RuntimeErrors.)
            if not (isinstance(exc, torch.OutOfMemoryError)
                    or isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
                raise
            message = first_line(exc)
        # Outside the except block: the exception and its frames (model, activations) are gone now.
        cleanup()
        if message is None:
            attempts.append({"seq_len": seq_len, "outcome": "ok"})
            return result, attempts
        attempts.append({"seq_len": seq_len, "outcome": "oom", "error": message})
    return None, attempts


# ----------------------------------------------------------------------------------------------------------
# One training run


def set_cap(cap_gb: float) -> dict:
    """Cap PyTorch's allocator at ``cap_gb`` GB (0: the whole card). Returns what was set."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    fraction = 1.0 if cap_gb == 0 else min(1.0, cap_gb * GB / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return {"fraction": fraction, "card_total_gb": total / GB,
            "note": "cap above the card's memory: uncapped" if cap_gb and cap_gb * GB > total else ""}


def build_model(config_path: str, device: str, seed: int, dtype: str = "bfloat16", weights: str = "float"):
    """The model of ``config_path`` built directly on ``device`` in ``dtype`` (random init, no other copy),
    SDPA attention, per-decoder-layer gradient checkpointing (non-reentrant). ``weights="int8"``: see
    :func:`build_int8_model`."""
    import torch

    if weights == "int8":
        return build_int8_model(config_path, device, seed, dtype)
    if weights != "float":
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    return build_llama(config_path, seed, getattr(torch, dtype), device=device, attn_implementation="sdpa",
                       gradient_checkpointing=True)


def _post_order(module, prefix: str = ""):
    """``(name, module)`` children first, as Hugging Face's ``initialize_weights`` visits them."""
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}{name}.")
    yield prefix[:-1], module


def build_int8_model(config_path: str, device: str, seed: int, dtype: str = "bfloat16",
                     group_size: Optional[int] = None):
    """:func:`lowrank_opt.quant.quantize_model_` of :func:`build_model`'s model (every ``nn.Linear`` but the head in
    int8) without the float model ever existing: built on the meta device, then each module materialised
    (``to_empty``), initialised by the model's ``_init_weights`` and, a Linear, replaced at once by its int8 form,
    so that at most one float Linear is alive (a 12 GB cap cannot hold LLaMA-7B's 13.5 GB of bf16 weights)."""
    import torch
    from torch import nn

    from lowrank_opt.quant import DEFAULT_GROUP_SIZE, Int8Linear

    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    model = build_llama(config_path, seed, getattr(torch, dtype), device="meta", attn_implementation="sdpa",
                        gradient_checkpointing=True)
    head = model.get_output_embeddings()
    shared = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            shared[id(p)] = shared.get(id(p), 0) + 1
    # Names, not modules: a list of the modules would keep every replaced float Linear (and its weight) alive.
    for name in [name for name, _ in _post_order(model)]:
        module = model.get_submodule(name)
        if not any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
            continue
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            model._init_weights(module)
        if type(module) is nn.Linear and module is not head:
            if shared.get(id(module.weight), 0) > 1:
                raise ValueError(f"{name}.weight is tied to another module's; int8 weights need untied ones")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, Int8Linear.from_linear(module, group_size))
        del module
    model.train()
    return model


def weight_bytes(model) -> int:
    """Bytes of the model's weights as stored: each parameter's storage once (an int8 layer's gradient carrier
    holds one element), and an int8 layer's codes and scales (its buffers)."""
    from lowrank_opt.quant import Int8Linear

    return storage_bytes([*model.parameters(), *(b for m in model.modules() if isinstance(m, Int8Linear)
                                                 for b in (m.weight_int8, m.weight_scale))])


def _mm_layout(x) -> Optional[str]:
    """``"row"`` for a row-major 2-D operand, ``"col"`` for a column-major one (a transposed view), else None."""
    if x.dim() == 2 and x.stride(1) == 1 and x.size(1) > 1:
        return "row"
    if x.dim() == 2 and x.stride(0) == 1 and x.size(0) > 1:
        return "col"
    return None


class CpuBf16MatmulLayout:
    """A dispatch mode for bf16 CPU runs: an ``mm``/``addmm`` whose two operands share a memory layout first gets
    a copy of its *smaller* operand in the other layout (the product is the same). Without bf16 matrix units,
    torch's generic CPU kernel is some 100 times slower when both or neither operand is transposed, as in every
    Linear's input gradient (``grad_out @ weight``): one LLaMA-7B step took hours. The copy is activation-sized,
    made inside the traced block (so counted in the peak) and recorded in ``copies``/``largest_copy_bytes``."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        owner, first_operand = self, {torch.ops.aten.mm.default: 0, torch.ops.aten.addmm.default: 1}
        self.copies, self.largest_copy_bytes = 0, 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                first = first_operand.get(func)
                if first is not None and args[first].dtype == torch.bfloat16 and args[first].device.type == "cpu":
                    a, b = args[first], args[first + 1]
                    layout = _mm_layout(a)
                    if layout is not None and layout == _mm_layout(b):
                        which = first if a.numel() <= b.numel() else first + 1
                        x = args[which]
                        owner.copies += 1
                        owner.largest_copy_bytes = max(owner.largest_copy_bytes, x.numel() * x.element_size())
                        flipped = x.contiguous() if layout == "col" else x.t().contiguous().t()
                        args = (*args[:which], flipped, *args[which + 1:])
                return func(*args, **(kwargs or {}))

        self._mode = Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def summary(self) -> dict:
        return {"cpu_matmul": "layout", "layout_copies": self.copies,
                "largest_layout_copy_mb": self.largest_copy_bytes / 1e6}


def train_run(config_path: str, choice: OptimChoice, *, device: str, seq_len: int, batch_size: int, steps: int,
              lr: float, seed: int, dtype: str = "bfloat16", trace_cpu_peak: bool = True,
              cpu_matmul: str = "layout") -> dict:
    """Build model and optimizer, train ``steps`` steps on one random batch; measurements as a dict.
    Everything it allocates is local: gone (after ``gc.collect()``) once it returns or raises. On CPU the
    whole run is traced by torch.profiler for its peak of live tensor bytes (which slows it down; with
    ``trace_cpu_peak=False`` it is not, and the CPU peak is None)."""
    if cpu_matmul not in CPU_MATMUL_CHOICES:
        raise ValueError(f"cpu_matmul must be one of {CPU_MATMUL_CHOICES}, got {cpu_matmul!r}")
    run = dict(config_path=config_path, choice=choice, device=device, seq_len=seq_len, batch_size=batch_size,
               steps=steps, lr=lr, seed=seed, dtype=dtype)
    if device == "cuda":
        return _train_run(**run)
    layout = CpuBf16MatmulLayout() if cpu_matmul == "layout" else None
    with cpu_peak_bytes() if trace_cpu_peak else contextlib.nullcontext() as peak:
        with layout if layout is not None else contextlib.nullcontext():
            result = _train_run(**run)
    result.update(layout.summary() if layout is not None else {"cpu_matmul": "torch"})
    if peak is not None:
        result["peak_allocated_gb"] = peak["peak_bytes"] / GB
        result["cpu_peak_method"] = peak["method"]
    return result


def _train_run(config_path: str, choice: OptimChoice, *, device: str, seq_len: int, batch_size: int, steps: int,
               lr: float, seed: int, dtype: str) -> dict:
    import torch

    from lowrank_opt.loss import causal_lm_loss_from_model
    from lowrank_opt.memory import optimizer_state_bytes
    from lowrank_opt.registry import build_optimizer

    cuda = device == "cuda"
    model = build_model(config_path, device, seed, dtype, weights=choice.weights)
    after_model = torch.cuda.memory_allocated() if cuda else None
    optimizer = (build_baseline(choice.name, model, lr=lr) if choice.baseline else
                 build_optimizer(choice.name, model, lr=lr, target_modules=choice.target_modules, **choice.options))
    generator = torch.Generator(device=device).manual_seed(seed)
    vocab = int(model.config.vocab_size)
    batch = torch.randint(0, vocab, (batch_size, seq_len), generator=generator, device=device)
    losses, seconds = [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        if choice.lean_loss:
            loss = causal_lm_loss_from_model(model, {"input_ids": batch, "labels": batch})
        else:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()  # layer-wise optimizers have already updated everything inside backward
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())  # a host read: waits for the step's kernels on CUDA too
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        losses.append(value)
        del loss
    timed = seconds[1:] or seconds  # the first step allocates the state (and draws P / runs nothing else)
    tokens = batch_size * seq_len
    result = {
        "seq_len": seq_len, "losses": losses, "first_loss": losses[0], "last_loss": losses[-1],
        "loss_finite": all(math.isfinite(v) for v in losses), "step_seconds": seconds,
        "tokens_per_s": tokens / statistics.median(timed), "first_step_s": seconds[0],
        "optimizer_state_gb": optimizer_state_bytes(optimizer) / GB, "weights_gb": weight_bytes(model) / GB,
        "weights": choice.weights, "lean_loss": choice.lean_loss,
        "param_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "peak_allocated_gb": None, "peak_reserved_gb": None, "allocated_after_model_gb": None,
    }
    if cuda:
        result.update(peak_allocated_gb=torch.cuda.max_memory_allocated() / GB,
                      peak_reserved_gb=torch.cuda.max_memory_reserved() / GB, allocated_after_model_gb=after_model / GB)
    if hasattr(optimizer, "remove_hooks"):  # layer-wise APOLLO: drop the hooks' references to the optimizer
        optimizer.remove_hooks()
    return result


_ESTIMATES: dict = {}


def predict(config_path: str, choice: OptimChoice, seq_len: int, batch_size: int,
            device: str = "cuda", dtype: str = "bf16") -> Optional[dict]:
    """lowrank_opt.memory.estimate for this run (GB), or None when the estimator does not know the optimizer.
    On CPU the estimate is for ``device="cpu"``: torch's CPU code paths, no CUDA context, no fragmentation."""
    key = (config_path, choice.estimator, json.dumps(choice.estimator_args, sort_keys=True), seq_len, batch_size,
           device, dtype, json.dumps(choice.target_modules), choice.lean_loss, choice.weights)
    if key not in _ESTIMATES:
        from lowrank_opt.memory import estimate

        try:
            levers = {} if choice.target_modules is None else {"target_modules": choice.target_modules}
            e = estimate(config_path, choice.estimator, optim_args=choice.estimator_args, dtype=dtype,
                         batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=True, device=device,
                         weights=choice.weights, lean_loss=choice.lean_loss, **levers)
        except ValueError as exc:
            print(f"  (no estimate for {choice.name}: {exc})", file=sys.stderr)
            _ESTIMATES[key] = None
        else:
            context = e.components.get("overhead.cuda context", 0)
            _ESTIMATES[key] = {
                "total_gb": e.total / GB, "allocated_gb": (e.total - e.overhead) / GB,
                "reserved_gb": (e.total - context) / GB if device == "cuda" else None,
                "optimizer_states_gb": e.optimizer_states / GB, "weights_gb": e.weights / GB,
                "gradients_gb": e.gradients / GB, "activations_gb": e.activations / GB, "layerwise": e.layerwise}
    return _ESTIMATES[key]


# ----------------------------------------------------------------------------------------------------------
# Report


def _f(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(records: list[dict], device: str) -> str:
    rows = []
    for r in records:
        m, e = r.get("measured") or {}, r.get("estimate") or {}
        ratio = m.get("peak_allocated_gb") and e.get("allocated_gb") and m["peak_allocated_gb"] / e["allocated_gb"]
        rows.append([f"{r['cap_gb']:g}" if r["cap_gb"] else "none", r["optimizer"] + (f" ({r['levers']})" if
                     r.get("levers") else ""), r.get("seq_len") or "—", r["status"], _f(m.get("peak_allocated_gb")),
                     _f(e.get("allocated_gb")), _f(ratio), _f(m.get("peak_reserved_gb")), _f(e.get("reserved_gb")),
                     _f(e.get("total_gb")),
                     f"{_f(m.get('optimizer_state_gb'), 3)} / {_f(e.get('optimizer_states_gb'), 3)}",
                     _f(m.get("tokens_per_s"), 0), f"{m['first_loss']:.3f} → {m['last_loss']:.3f}" if m else "—"])
    out = table(["cap GB", "optimizer", "seq", "status", "peak alloc GB", "est. alloc GB", "meas/est",
                 "peak reserved GB", "est. reserved GB", "est. total GB", "states GB (meas / est)", "tokens/s",
                 "loss first → last"], rows, "rlrlrrrrrrrrl")
    if device == "cuda":
        return out
    return ("CPU run: the peak is of live tensor bytes in torch's CPU allocator (traced by torch.profiler), next to "
            "the estimate for device cpu; the timings are CPU timings. These are not GPU numbers.\n\n" + out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    import torch  # after the arguments, before anything else: no allocation happens without CUDA

    if args.device == "cuda" and not torch.cuda.is_available():
        print("fit_7b.py: error: no CUDA GPU is available (torch.cuda.is_available() is False), and this benchmark "
              "measures GPU memory; nothing was allocated. Run it on a machine with a CUDA GPU and a CUDA build of "
              "torch. To smoke-test the script itself on the CPU: python benchmarks/fit_7b.py --device cpu "
              "--config configs/llama_tiny.json --caps 0 --seq-len 64 --steps 2", file=sys.stderr)
        return EXIT_NO_CUDA

    try:
        choices = [resolve_choice(n) for n in args.optims]
    except ValueError as exc:
        parser.error(f"--optims: {exc}")
    from lowrank_opt.registry import parse_optim_args

    try:
        optim_args = parse_optim_args(args.optim_args)
        choices = [with_levers(c, optim_args=optim_args, target_modules=args.target_modules,
                               lean_loss=args.lean_loss, weights=args.weights) for c in choices]
    except (TypeError, ValueError) as exc:
        parser.error(f"--optim-args/--target-modules/--weights: {exc}")
    command = command_line("fit_7b.py", argv)
    device = args.device
    env = environment(device)
    print(f"{command}\n{json.dumps(env)}")
    if device != "cuda":
        print("device cpu: no GPU memory is measured and timings are CPU timings; the peak of live CPU tensor "
              "bytes is traced (torch.profiler) and compared with the estimate for device cpu")
    bnb_problem = baseline_missing("bnb-adamw8bit")  # also our 8-bit dense states
    settings = {"config": args.config, "caps_gb": args.caps, "optims": args.optims, "seq_len": args.seq_len,
                "fallback_seq_lens": args.fallback_seq_lens, "steps": args.steps, "batch_size": args.batch_size,
                "seed": args.seed, "dtype": "bfloat16 (pure, no master)", "optim_args": args.optim_args,
                "target_modules": args.target_modules, "lean_loss": args.lean_loss, "weights": args.weights,
                "cpu_matmul": args.cpu_matmul if device == "cpu" else None, "gradient_checkpointing": True,
                "attention": "sdpa", "gb": 1e9}

    records: list[dict] = []
    longest_so_far: dict[str, Optional[int]] = {}  # optimizer -> longest length that fitted a larger cap (0: none)
    for cap in args.caps:
        cap_info = set_cap(cap) if device == "cuda" else {"fraction": None, "note": "cpu: no cap"}
        for choice in choices:
            levers, lr = describe_levers(choice), args.lr if args.lr is not None else choice.lr
            record = {"cap_gb": cap, "optimizer": choice.name, "seq_len": None, "status": "", "measured": None,
                      "estimate": None, "attempts": [], "cap": cap_info, **({"levers": levers} if levers else {}),
                      "lr": lr}
            previous = longest_so_far.get(choice.name)
            if bnb_problem and (choice.name == "bnb-adamw8bit" or choice.options.get("dense_state_bits") == 8):
                record["status"] = f"skipped: {bnb_problem}"
            elif previous == 0:
                record["status"] = "oom (implied)"
                record["note"] = "ran out of memory at every length under a larger cap"
            else:
                ladder = seq_ladder(args.seq_len, args.fallback_seq_lens, previous)
                print(f"cap {cap:g} GB, {choice.name}{f' ({levers})' if levers else ''}: trying seq {ladder} ...",
                      flush=True)
                release_memory(device)
                if device == "cuda":
                    set_cap(cap)

                def run(seq_len: int, choice=choice, lr=lr) -> dict:
                    return train_run(args.config, choice, device=device, seq_len=seq_len,
                                     batch_size=args.batch_size, steps=args.steps, lr=lr, seed=args.seed,
                                     cpu_matmul=args.cpu_matmul)

                measured, attempts = None, []
                try:
                    measured, attempts = longest_fitting(run, ladder, cleanup=lambda: release_memory(device))
                except Exception as exc:  # one broken optimizer must not lose the other results
                    traceback.print_exc()
                    record["status"] = f"error: {type(exc).__name__}: {first_line(exc)}"
                release_memory(device)  # outside the except block, so the traceback's tensors are gone
                record["attempts"] = attempts
                if measured is not None:
                    record.update(measured=measured, seq_len=measured["seq_len"], status=(
                        "ok" if measured["seq_len"] == args.seq_len else "ok (shorter)")
                        + ("" if measured["loss_finite"] else ", non-finite loss"))
                    longest_so_far[choice.name] = measured["seq_len"]
                elif attempts:
                    record["status"] = "oom at " + ", ".join(str(a["seq_len"]) for a in attempts)
                    longest_so_far[choice.name] = 0
            if args.estimate:
                record["estimate"] = predict(args.config, choice, record["seq_len"] or args.seq_len, args.batch_size,
                                             device)
            records.append(record)
            table = markdown_table(records, device)  # written after every run: a cut-short call keeps what ran
            write_json_atomic(args.output, {"command": command, "date": utc_now(), "environment": env,
                                            "settings": settings, "results": records, "markdown": table})
            m = record["measured"] or {}
            print(f"  -> {record['status']}" + (f", peak allocated {_f(m.get('peak_allocated_gb'))} GB, "
                                                f"{_f(m.get('tokens_per_s'), 0)} tokens/s, loss "
                                                f"{m['first_loss']:.3f} -> {m['last_loss']:.3f}" if m else ""),
                  flush=True)
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)

    print(f"\n{markdown_table(records, device)}\n\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
