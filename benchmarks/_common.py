"""What every benchmark script shares, so that each script holds only its experiment.

- **Shapes**: the paper's LLaMA sizes (:data:`SIZES`), their parameter tensors and shape classes.
- **Optimizers**: ours by registry name (:func:`build_ours`); the baselines from other packages in one table
  (:data:`BASELINES`, :func:`build_baseline`); their state bytes (:func:`state_bytes`).
- **Timing**: one timed call, calls after a warm-up, and rounds in which several steppers take turns in a
  rotating order (:func:`timed_rounds`), so that load from other processes falls on all of them alike; the peak
  of live CPU tensor bytes (:func:`cpu_peak_bytes`).
- **The machine** (:func:`machine_line`), the command line, table and CSV text, and generated Markdown sections
  between two marker lines (:func:`write_section`), every file written atomically.

Nothing here imports torch at import time: the scripts answer ``--help`` and bad flags before torch loads.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import gc
import io
import json
import math
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
MIB = 2**20
VOCAB = 32000

@dataclass(frozen=True)
class LlamaShape:
    """A LLaMA model's shape: paper Table 11 (shared with GaLore). ``rank`` is APOLLO's (a quarter of the hidden
    size, at most 256: the APOLLO paper's scripts), ``galore_rank`` GaLore's (its paper's Table 2; 1024 for 7B
    from its repository's 7B scripts)."""

    hidden: int
    intermediate: int
    layers: int
    rank: int
    galore_rank: int = 0
    key: str = "custom"

    label = property(lambda self: f"LLaMA-{self.key.upper()}")
    config = property(lambda self: f"llama_{self.key}")  # its config's name in configs/
    config_path = property(lambda self: ROOT / "configs" / f"{self.config}.json")


SIZES = {s.key: s for s in [
    LlamaShape(512, 1376, 8, 128, galore_rank=128, key="60m"),
    LlamaShape(768, 2048, 12, 192, galore_rank=256, key="130m"),
    LlamaShape(1024, 2736, 24, 256, galore_rank=256, key="350m"),
    LlamaShape(2048, 5461, 24, 256, galore_rank=512, key="1b"),
    LlamaShape(4096, 11008, 32, 256, galore_rank=1024, key="7b"),
]}


def llama_parameter_shapes(shape: LlamaShape, vocab: int = VOCAB) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, low-rank?) for every weight of a LLaMA, named as in Hugging Face's LlamaForCausalLM. The
    attention/MLP matrices are the low-rank group; embeddings, lm_head and norms are not."""
    h, i = shape.hidden, shape.intermediate
    out = [("model.embed_tokens.weight", (vocab, h), False)]
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        out += [(f"{prefix}.self_attn.{p}_proj.weight", (h, h), True) for p in "qkvo"]
        out += [(f"{prefix}.mlp.gate_proj.weight", (i, h), True), (f"{prefix}.mlp.up_proj.weight", (i, h), True),
                (f"{prefix}.mlp.down_proj.weight", (h, i), True)]
        out += [(f"{prefix}.input_layernorm.weight", (h,), False),
                (f"{prefix}.post_attention_layernorm.weight", (h,), False)]
    return out + [("model.norm.weight", (h,), False), ("lm_head.weight", (vocab, h), False)]


@dataclass(frozen=True)
class ShapeClass:
    """The tensors of a LLaMA that share one shape: ``count`` of ``dims``, low-rank (``matrix``) or not."""

    name: str
    dims: tuple[int, ...]
    count: int
    matrix: bool
    numel = property(lambda self: math.prod(self.dims))

    def built(self, max_elements: int) -> int:
        """K: how many tensors of this class are built when at most ``max_elements`` may be (at least one)."""
        return min(self.count, max(1, max_elements // self.numel))


def shape_classes(shape: LlamaShape, vocab: int = VOCAB) -> list[ShapeClass]:
    h, i, layers = shape.hidden, shape.intermediate, shape.layers
    return [ShapeClass("attn", (h, h), 4 * layers, True), ShapeClass("gate_up", (i, h), 2 * layers, True),
            ShapeClass("down", (h, i), layers, True), ShapeClass("embed_head", (vocab, h), 2, False),
            ShapeClass("norm", (h,), 2 * layers + 1, False)]


def parameter_count(shape: LlamaShape, vocab: int = VOCAB) -> int:
    return sum(c.numel * c.count for c in shape_classes(shape, vocab))


def random_tensor(dims: tuple[int, ...], generator, device, scale: float, dtype=None):
    """``randn(dims) * scale`` from ``generator``, drawn in fp32 and cast to ``dtype``."""
    import torch

    t = torch.randn(dims, generator=generator, device=device).mul_(scale)
    return t if dtype in (None, torch.float32) else t.to(dtype)


def initial_weight(dims: tuple[int, ...], generator, device, dtype=None):
    """A weight as a LLaMA starts: RMSNorm weights (1-D) at 1, matrices N(0, 0.02^2)."""
    import torch

    if len(dims) == 1:
        return torch.ones(dims, device=device, dtype=dtype or torch.float32)
    return random_tensor(dims, generator, device, 0.02, dtype)


def build_llama(config_path, seed: int, dtype, device: Optional[str] = None,
                attn_implementation: Optional[str] = None, gradient_checkpointing: bool = False):
    """A causal LM from a Hugging Face config, random init from ``seed``, built on ``device`` directly, in
    training mode; ``gradient_checkpointing``: per decoder layer, non-reentrant."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_path))
    config.use_cache = False
    torch.manual_seed(seed)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def build_ours(name: str, params, *, rank: Optional[int] = None, **options):
    """``lowrank_opt.registry``'s optimizer ``name`` on ``params`` with ``options`` over its defaults. ``rank``
    (a benchmark's rank for the model size) goes to the channel-wise optimizers only: APOLLO-Mini's rank 1 is
    part of what it is."""
    from lowrank_opt.registry import build_optimizer, resolve

    if rank is not None and resolve(name).options.get("scale_type") == "channel":
        options["rank"] = rank
    return build_optimizer(name, params, **options)


@dataclass(frozen=True)
class Baseline:
    """An optimizer of another package, with the settings every benchmark uses for it."""

    package: str  # the distribution it comes from
    hf_name: str  # the Hugging Face Trainer's --optim name (train.py takes it)
    estimator: str  # lowrank_opt.memory.estimate's name for it (the name implies its options)
    options: dict = field(default_factory=dict)  # constructor options
    lowrank: Optional[dict] = None  # options of its low-rank group (plus the run's rank and update_proj_gap)

    def lowrank_options(self, rank: Optional[int], update_proj_gap: int = 200) -> dict:
        return {"rank": rank, "update_proj_gap": update_proj_gap, **(self.lowrank or {})}


BASELINES = {
    "torch-adamw": Baseline("torch", "adamw_torch", "adamw_torch", {"foreach": True}),
    "torch-adamw-fused": Baseline("torch", "adamw_torch_fused", "adamw_torch_fused", {"fused": True}),
    "bnb-adamw8bit": Baseline("bitsandbytes", "adamw_bnb_8bit", "adamw_8bit"),  # embeddings keep 32-bit state
    "apollo-torch": Baseline("apollo-torch", "apollo_adamw", "apollo_adamw",
                             lowrank=dict(proj="random", scale_type="channel", scale=1.0, proj_type="std")),
    "apollo-torch-mini": Baseline("apollo-torch", "apollo_adamw", "apollo_adamw",
                                  lowrank=dict(rank=1, proj="random", scale_type="tensor", scale=128.0,
                                               proj_type="std")),
    "galore-torch": Baseline("galore-torch", "galore_adamw", "galore_adamw", lowrank=dict(scale=0.25, proj_type="std")),
}
_MODULES = {"bitsandbytes": "bitsandbytes", "apollo-torch": "apollo_torch", "galore-torch": "galore_torch"}


def baseline_missing(name: str) -> Optional[str]:
    """Why :data:`BASELINES`' ``name`` cannot be built here (its package), or None."""
    package = BASELINES[name].package
    if package not in _MODULES:
        return None
    try:
        __import__(_MODULES[package])
    except Exception as exc:  # not installed, or it fails to import (bitsandbytes without its libraries)
        return f"{package} not importable ({(str(exc).strip() or type(exc).__name__).splitlines()[0][:160]})"
    return None


def build_baseline(name: str, params, *, lr: float, lowrank_params: Sequence = (), rank: Optional[int] = None,
                   update_proj_gap: int = 200, betas=(0.9, 0.999), weight_decay: float = 0.0):
    """:data:`BASELINES`' ``name`` on ``params`` (a model, or tensors / (name, tensor) pairs), with
    ``lowrank_params`` the matrices a low-rank baseline projects (at ``rank``, ``update_proj_gap``)."""
    import torch

    spec = BASELINES[name]
    model = params if isinstance(params, torch.nn.Module) else None
    plain = [p if isinstance(p, torch.Tensor) else p[1] for p in (model.parameters() if model else params)]
    low = [p if isinstance(p, torch.Tensor) else p[1] for p in lowrank_params]
    common = dict(lr=lr, betas=betas, weight_decay=weight_decay, **spec.options)
    if spec.package == "torch":
        return torch.optim.AdamW(plain + low, **common)
    if spec.package == "bitsandbytes":
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(plain + low, **common)
        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules() if model else ():  # as the HF Trainer does for adamw_bnb_8bit
            if isinstance(module, torch.nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
        return optimizer
    groups = [g for g in ({"params": plain}, {"params": low, **spec.lowrank_options(rank, update_proj_gap)})
              if g["params"]]
    if spec.package == "apollo-torch":
        from apollo_torch import APOLLOAdamW

        return APOLLOAdamW(groups, **common)
    from galore_torch import GaLoreAdamW

    return GaLoreAdamW(groups, no_deprecation_warning=True, **common)


def baseline_train_args(name: str, rank: int, update_proj_gap: int) -> tuple[str, Optional[str]]:
    """(train.py's ``--optim``, its ``--optim_args`` or None) for :data:`BASELINES`' ``name``."""
    spec = BASELINES[name]
    if spec.lowrank is None:
        return spec.hf_name, None
    options = spec.lowrank_options(rank, update_proj_gap)
    return spec.hf_name, ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())


def state_bytes(optimizer) -> tuple[int, int]:
    """(optimizer-state bytes, bytes of projection matrices P held between steps), both counted by
    ``lowrank_opt.memory.measure.optimizer_state_breakdown``. Held P: apollo-torch's and GaLore's projector
    objects in the state (``state[p]["projector"].ortho_matrix``), and what an optimizer keeps beside its state
    (ours' P cache with ``cache_projection=True``)."""
    import torch
    from lowrank_opt.memory.measure import optimizer_state_breakdown, optimizer_state_bytes

    breakdown = optimizer_state_breakdown(optimizer)
    projectors = types.SimpleNamespace(param_groups=optimizer.param_groups, state={  # counted as an optimizer's
        p: {k: v for k, v in s.items() if not isinstance(v, (torch.Tensor, int, float, bool))}
        for p, s in optimizer.state.items()})
    held = breakdown.total - breakdown.by_source.get("state", 0) + optimizer_state_bytes(projectors)
    return breakdown.total - held, held


def storage_bytes(tensors: Iterable) -> int:
    """Bytes of the storages behind ``tensors``, each storage once (views and tied weights share one)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, or dicts/lists/tuples of them)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (dict, list, tuple)):
        return sum(map(tensor_bytes, obj.values() if isinstance(obj, dict) else obj))
    return 0


def timed(fn: Callable[[], object], device) -> float:
    """Milliseconds of one call of ``fn`` (on CUDA the device is synchronised before and after)."""
    import torch

    cuda = getattr(device, "type", device) == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


@contextlib.contextmanager
def gc_paused():
    """Python's collector off (after one collection) inside the block: a collection inside a timed call would
    be charged to it."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timed_calls(fn: Callable[[], object], calls: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        fn()
    return [timed(fn, device) for _ in range(calls)]


def rotations(names: Sequence[str], rounds: int) -> Iterable[list[str]]:
    """The order of each round: ``names`` rotated by one more every round (a b, b a, a b, ...)."""
    names = list(names)
    for index in range(rounds):
        shift = index % max(1, len(names))
        yield names[shift:] + names[:shift]


def timed_rounds(steppers: dict[str, Callable[[], object]], rounds: int, device) -> dict[str, list[float]]:
    """``rounds`` rounds in which every stepper is called once, timed, in the order of :func:`rotations`."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for order in rotations(list(steppers), rounds):
        for name in order:
            times[name].append(timed(steppers[name], device))
    return times


def round_ratios(times: dict[str, list[float]], a: str, b: str) -> list[float]:
    return [x / y for x, y in zip(times[a], times[b])]


def release_memory(device) -> None:
    """Collect garbage; on CUDA also return the cache and start the allocator's peaks afresh."""
    import torch

    gc.collect()
    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@contextlib.contextmanager
def cpu_peak_bytes():
    """The peak of live CPU tensor bytes inside the block, from torch.profiler with ``profile_memory=True``: the
    most bytes torch's CPU allocator had handed out at once (its running total, as each allocation event carries
    it), less that total just before the block's first allocation (the profiler keeps the total across
    sessions: a tensor of an earlier traced block freed after it stays in it). Yields a dict that gets
    ``peak_bytes``, ``baseline_bytes``, ``allocation_events`` and ``method`` on exit."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    result: dict = {"method": "allocator"}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    peak, count, first = 0, 0, None
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            fields = event.typed[1]
            count += 1
            peak = max(peak, fields.total_allocated)
            if first is None or event.start_time_ns < first[0]:
                first = (event.start_time_ns, fields.total_allocated - fields.alloc_size)
    result["baseline_bytes"] = first[1] if first is not None else 0
    result["peak_bytes"] = peak - result["baseline_bytes"]
    result["allocation_events"] = count


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def package_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(device: str = "cpu") -> dict:
    """Versions and the machine: what every result file records next to its figures."""
    import torch
    import transformers

    env = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
           "cores": os.cpu_count(), "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu=props.name, gpu_total_gb=props.total_memory / GB, cuda=torch.version.cuda)
    return env


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    """``python benchmarks/SCRIPT ARGS`` as it was run (``argv`` None: this process's own arguments)."""
    return shlex.join(["python", f"benchmarks/{script}", *map(str, sys.argv[1:] if argv is None else argv)])


def machine_line(device) -> str:
    """CPU, cores, torch and its threads, the GPU, the reference packages' versions, Python: one line."""
    import torch

    parts = [f"CPU {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} intra-op threads)"]
    if getattr(device, "type", device) == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    for package in ("apollo-torch", "galore-torch"):
        parts.append(f"{package} {package_version(package) or 'not installed'}")
    return ", ".join(parts + [f"Python {platform.python_version()}"])


def now_text() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def mib(nbytes: float, digits: int = 1) -> str:
    return f"{nbytes / MIB:,.{digits}f}"


def ms(value: Optional[float]) -> str:
    """Milliseconds, about three significant figures; a dash for None."""
    if value is None:
        return "—"
    for limit, digits in ((100, 0), (10, 1), (1, 2)):
        if abs(value) >= limit:
            return f"{value:,.{digits}f}"
    return f"{value:.3f}"


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [s.strip() for s in text.split(",") if s.strip()]


def check_at_least(fail: Callable[[str], object], *checks: tuple[str, float, float]) -> None:
    """``fail("FLAG must be >= LOW, got VALUE")`` (argparse's ``parser.error``, ``sys.exit``) for the first
    ``(FLAG, VALUE, LOW)`` with VALUE below LOW."""
    for flag, value, low in checks:
        if value < low:
            fail(f"{flag} must be >= {low}, got {value}")


def csv_text(head: Sequence[str], rows: Iterable[Sequence[Any]], lineterminator: str = "\n") -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=lineterminator)
    writer.writerow(head)
    writer.writerows(rows)
    return buf.getvalue()


def table(head: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column, ``l`` (default) or ``r``."""
    marks = ["---:" if (align[i:i + 1] == "r") else "---" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(marks) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def markers(name: str, script: str) -> tuple[str, str]:
    """The begin/end marker lines of the generated section ``name``."""
    return f"<!-- BEGIN {name}: generated by {script}, edits inside are overwritten -->", f"<!-- END {name} -->"


def section(name: str, script: str, command: str, machine: str, *tables: str) -> str:
    """A generated section: its markers around the command, the machine line and the tables."""
    begin, end = markers(name, script)
    return "\n\n".join([f"{begin}\n```bash\n{command}\n```", machine, *[t for t in tables if t], end])


def write_section(path, text: str, name: str) -> None:
    """Put the generated section ``text`` into the Markdown file at ``path`` in place of the section of the same
    ``name`` (whichever script wrote it), else at the end. The rest of the file is kept; written atomically."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(r"<!-- BEGIN " + re.escape(name) + r":.*?<!-- END " + re.escape(name) + r" -->", re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: text, old, count=1)
    else:
        new = old.rstrip("\n") + ("\n\n" if old.strip() else "") + text + "\n"
    write_text_atomic(path, new)


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside ``path`` that replaces it in one step when the block ends (removed on error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if path.exists():  # mkstemp's file is private (0600): give it the old file's mode, else the usual one
            mode = path.stat().st_mode & 0o777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path, payload: Any, indent: Optional[int] = 2) -> None:
    write_text_atomic(path, json.dumps(payload, indent=indent) + "\n")


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (after saying so) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("NOTE: matplotlib is not installed (pip install -e '.[bench]'): no plot written", flush=True)
        return None
    return plt


def save_figure(fig, path, dpi: int = 110) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
