"""The machinery every benchmark script shares, so that each script holds only its experiment.

- **Shapes**: the paper's LLaMA sizes (:data:`SIZES`), their parameter tensors and shape classes.
- **Timing**: one timed call (:func:`timed`), calls after a warm-up (:func:`timed_calls`), and rounds in which
  several steppers take turns in a rotating order (:func:`timed_rounds`), so that load from other processes
  falls on all of them alike and per-round ratios (:func:`round_ratios`) stay meaningful on a busy machine.
- **The machine**: CPU model, load average, versions (:func:`environment`), the command line that ran.
- **Reports**: a generated section of a Markdown file between two marker lines, replaced on each run with
  the rest of the file untouched; every file written atomically (:func:`write_text_atomic`).
- **Plots**: matplotlib without a display, and a figure saved atomically.
- **Optimizer-state bytes**: counted by the library (:func:`lowrank_opt.memory.measure.optimizer_state_breakdown`),
  the same definition the estimator and ``train.py --memory_report`` use.

Why one ``_common.py`` and not a larger ``_report.py``: most of this is not about reporting (shapes, timing,
state bytes), and one module with one name is what every script imports. Nothing here imports torch at
import time: the scripts parse their arguments (and answer ``--help``) before torch loads.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
MIB = 2**20
VOCAB = 32000

# ----------------------------------------------------------------------------------------------------------
# LLaMA shapes


@dataclass(frozen=True)
class LlamaShape:
    """A LLaMA model's shape. The named sizes are paper Table 11 (shared with GaLore): hidden / intermediate /
    layers; ``rank`` is APOLLO's (a quarter of the hidden size, at most 256: the APOLLO paper's scripts),
    ``galore_rank`` GaLore's (its paper's Table 2, and 1024 for 7B from its repository's 7B scripts)."""

    hidden: int
    intermediate: int
    layers: int
    rank: int
    galore_rank: int = 0
    key: str = "custom"

    @property
    def apollo_rank(self) -> int:
        return self.rank

    @property
    def label(self) -> str:
        """``LLaMA-60M`` ... ``LLaMA-7B``."""
        return f"LLaMA-{self.key.upper()}"

    @property
    def config(self) -> str:
        """The name of its config in ``configs/`` (``llama_60m``)."""
        return f"llama_{self.key}"

    @property
    def config_path(self) -> Path:
        return ROOT / "configs" / f"{self.config}.json"


SIZES = {
    s.key: s
    for s in [
        LlamaShape(512, 1376, 8, 128, galore_rank=128, key="60m"),
        LlamaShape(768, 2048, 12, 192, galore_rank=256, key="130m"),
        LlamaShape(1024, 2736, 24, 256, galore_rank=256, key="350m"),
        LlamaShape(2048, 5461, 24, 256, galore_rank=512, key="1b"),
        LlamaShape(4096, 11008, 32, 256, galore_rank=1024, key="7b"),
    ]
}


def llama_parameter_shapes(shape: LlamaShape, vocab: int = VOCAB) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, low-rank?) for every weight of a LLaMA model, named as in Hugging Face's LlamaForCausalLM.
    The attention/MLP matrices are the low-rank group; embeddings, lm_head and norms are not."""
    h, i = shape.hidden, shape.intermediate
    out = [("model.embed_tokens.weight", (vocab, h), False)]
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((f"{prefix}.self_attn.{proj}.weight", (h, h), True))
        out.append((f"{prefix}.mlp.gate_proj.weight", (i, h), True))
        out.append((f"{prefix}.mlp.up_proj.weight", (i, h), True))
        out.append((f"{prefix}.mlp.down_proj.weight", (h, i), True))
        out.append((f"{prefix}.input_layernorm.weight", (h,), False))
        out.append((f"{prefix}.post_attention_layernorm.weight", (h,), False))
    out.append(("model.norm.weight", (h,), False))
    out.append(("lm_head.weight", (vocab, h), False))
    return out


@dataclass(frozen=True)
class ShapeClass:
    """The tensors of a LLaMA model that share one shape: ``count`` of ``dims``, low-rank (``matrix``) or not."""

    name: str
    dims: tuple[int, ...]
    count: int
    matrix: bool  # in the low-rank group (else plain AdamW everywhere)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    def built(self, max_elements: int) -> int:
        """K: how many tensors of this class are built when at most ``max_elements`` may be (at least one)."""
        return min(self.count, max(1, max_elements // self.numel))


def shape_classes(shape: LlamaShape, vocab: int = VOCAB) -> list[ShapeClass]:
    """The five shape classes of :func:`llama_parameter_shapes`, with their counts."""
    h, i, layers = shape.hidden, shape.intermediate, shape.layers
    return [
        ShapeClass("attn", (h, h), 4 * layers, True),
        ShapeClass("gate_up", (i, h), 2 * layers, True),
        ShapeClass("down", (h, i), layers, True),
        ShapeClass("embed_head", (vocab, h), 2, False),
        ShapeClass("norm", (h,), 2 * layers + 1, False),
    ]


def parameter_count(shape: LlamaShape, vocab: int = VOCAB) -> int:
    return sum(c.numel * c.count for c in shape_classes(shape, vocab))


def random_tensor(dims: tuple[int, ...], generator, device, scale: float, dtype=None):
    """``randn(dims) * scale`` from ``generator`` (drawn in fp32, then cast to ``dtype``)."""
    import torch

    t = torch.randn(dims, generator=generator, device=device).mul_(scale)
    return t if dtype in (None, torch.float32) else t.to(dtype)


def initial_weight(dims: tuple[int, ...], generator, device, dtype=None):
    """A weight as a LLaMA starts: RMSNorm weights (1-D) at 1, matrices N(0, 0.02^2)."""
    import torch

    if len(dims) == 1:
        return torch.ones(dims, device=device, dtype=dtype or torch.float32)
    return random_tensor(dims, generator, device, 0.02, dtype)


def build_llama(config_path: str | os.PathLike, seed: int, dtype, device: Optional[str] = None,
                attn_implementation: Optional[str] = None, gradient_checkpointing: bool = False):
    """A LLaMA (any causal LM) from a Hugging Face config, random init from ``seed``, in training mode.
    ``device``: built there directly (no CPU copy); ``gradient_checkpointing``: per decoder layer,
    non-reentrant."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_path))
    config.use_cache = False
    torch.manual_seed(seed)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.x
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


# ----------------------------------------------------------------------------------------------------------
# Timing


def synchronize(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize(device if not isinstance(device, str) else None)


def timed(fn: Callable[[], object], device) -> float:
    """Milliseconds of one call of ``fn`` (``time.perf_counter``; on CUDA the device is synchronised before
    and after, so the kernels it launched are counted)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


@contextlib.contextmanager
def gc_paused():
    """Python's garbage collector off (after one collection) inside the block: a collection in the middle of
    a timed call would be charged to it."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timed_calls(fn: Callable[[], object], calls: int, warmup: int, device) -> list[float]:
    """Milliseconds of each of ``calls`` calls of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn, device) for _ in range(calls)]


def rotations(names: Sequence[str], rounds: int) -> Iterable[list[str]]:
    """The order of each of ``rounds`` rounds: ``names`` rotated by one more every round (with two: a b,
    b a, a b, ...), so that load from other processes falls on every one alike."""
    names = list(names)
    for round_index in range(rounds):
        shift = round_index % max(1, len(names))
        yield names[shift:] + names[:shift]


def timed_rounds(steppers: dict[str, Callable[[], object]], rounds: int, device) -> dict[str, list[float]]:
    """``rounds`` rounds in which every stepper is called once, timed, in the order of :func:`rotations`.
    Milliseconds per stepper, one per round."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for order in rotations(list(steppers), rounds):
        for name in order:
            times[name].append(timed(steppers[name], device))
    return times


def round_ratios(times: dict[str, list[float]], a: str, b: str) -> list[float]:
    """Per-round time ratios a / b from :func:`timed_rounds`."""
    return [x / y for x, y in zip(times[a], times[b])]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def release_memory(device) -> None:
    """Collect garbage and, on CUDA, hand the allocator's cached blocks back (between measurements)."""
    import torch

    gc.collect()
    if getattr(device, "type", device) == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# Optimizer-state bytes, counted by the library


class _Projectors:
    """The projector objects kept in an optimizer's state (apollo-torch's and GaLore's
    ``state[p]["projector"]``, which hold P as ``ortho_matrix``), shaped like an optimizer so that the
    library's counter can count them: its ``state`` holds only those objects, keyed by the same parameters."""

    def __init__(self, optimizer):
        import torch

        self.param_groups = optimizer.param_groups
        self.state = {p: {k: v for k, v in s.items() if not isinstance(v, (torch.Tensor, int, float, bool))}
                      for p, s in optimizer.state.items()}


def state_bytes(optimizer) -> tuple[int, int]:
    """(optimizer-state bytes other than held projections, bytes of the projection matrices P held between
    steps), both counted by :func:`lowrank_opt.memory.measure.optimizer_state_breakdown` (each storage once,
    wrappers looked through). Held P: apollo-torch's and GaLore's projector objects in the state, and ours'
    ``_projection_cache`` (with ``cache_projection=True``; never saved)."""
    from lowrank_opt.memory.measure import optimizer_state_breakdown, optimizer_state_bytes

    breakdown = optimizer_state_breakdown(optimizer)
    held = breakdown.by_source.get("_projection_cache", 0) + optimizer_state_bytes(_Projectors(optimizer))
    return breakdown.total - held, held


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, or dicts/lists/tuples of them): numel x element size."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# ----------------------------------------------------------------------------------------------------------
# The machine and the command


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
    """The installed version of a distribution, or None."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def peak_rss_text() -> str:
    """The process's peak resident memory so far, in GiB ('' off Linux, where getrusage's unit differs)."""
    if not sys.platform.startswith("linux"):
        return ""
    from lowrank_opt.memory.measure import peak_rss_bytes

    return f"{peak_rss_bytes() / 2**30:.1f} GiB"


def gpu_name(device=None) -> str:
    import torch

    return torch.cuda.get_device_name(device)


def environment(device: str = "cpu") -> dict:
    """Versions and the machine: what every result file records next to its figures."""
    import torch

    env = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    try:  # the module's own version: importlib.metadata would load every distribution's metadata, and a
        # process full of objects makes torch.profiler's start (fit_7b.py --device cpu) markedly slower
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - the model needs it anyway
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu=props.name, gpu_total_gb=props.total_memory / GB, cuda=torch.version.cuda)
    return env


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    """``python benchmarks/SCRIPT ARGS`` as it was run (``argv`` None: this process's own arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", f"benchmarks/{script}", *map(str, args)])


def begin(script: str, args, argv) -> Optional[tuple[Any, str, str, str]]:
    """The start of a timing run (step_time.py, scaling.py): check --device, apply --threads, print the
    command line, machine and load. Returns (device, command, machine, load average), or None (after saying
    why) when --device cuda finds no CUDA device."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{script}: --device cuda was asked for, but torch finds no CUDA device "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Rerun with --device cpu.",
              file=sys.stderr)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    command = command_line(script, argv)
    machine = machine_line(device)
    load_start = load_average()
    print(f"# {command}\n# {machine}\n# load average {load_start}", flush=True)
    return device, command, machine, load_start


def machine_line(device) -> str:
    """CPU, cores, torch and its threads, the GPU, the reference packages' versions, Python: one line."""
    import torch

    parts = [f"CPU {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} intra-op threads)"]
    if getattr(device, "type", device) == "cuda":
        parts.append(f"GPU {gpu_name(device)}")
    for package in ("apollo-torch", "galore-torch"):
        version = package_version(package)
        parts.append(f"{package} {version}" if version else f"{package} not installed")
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


def now_text() -> str:
    """The local time, as the generated sections print it."""
    import datetime

    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def utc_now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------------
# Formatting


def mib(nbytes: float, digits: int = 1) -> str:
    return f"{nbytes / MIB:,.{digits}f}"


def ms(value: Optional[float]) -> str:
    """Milliseconds: no decimals from 100 up, one below; a dash for None."""
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def add_sharded_run_arguments(parser, *, steps: int, warmup: int, output_help: str,
                               threads_help: str = "torch threads per process") -> None:
    """The options the two-rank sharding benchmarks (zero.py, fsdp_comm.py) share: the model, the APOLLO
    projection, the timed iterations, the random micro-batch, the launch and the outputs."""
    parser.add_argument("--config", default="configs/llama_130m.json", help="Hugging Face LLaMA config (JSON)")
    parser.add_argument("--rank", type=int, default=192, help="APOLLO's projection rank (APOLLO-Mini: always 1)")
    parser.add_argument("--update-proj-gap", type=int, default=200)
    parser.add_argument("--steps", type=int, default=steps, help="timed iterations per run (median reported)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed iterations before them")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence of the random micro-batch")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per step")
    parser.add_argument("--threads", type=int, default=1, help=threads_help)
    parser.add_argument("--nproc", type=int, default=2, help="processes when re-launching under torchrun")
    parser.add_argument("--no-reference", action="store_true", help="skip the unsharded Apollo reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="", help=output_help)
    parser.add_argument("--json", default="", help="also write the raw measurements to this JSON file")


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [s.strip() for s in text.split(",") if s.strip()]


# ----------------------------------------------------------------------------------------------------------
# Markdown sections and atomic files


DOC_INTROS = {
    "benchmarks.md": "# Benchmarks\n\nReproducible measurements of lowrank-opt against the published implementations. "
                     "Every section names the\ncommand that produced it and the machine it ran on; rerunning the "
                     "command replaces its section.\n",
}


def markers(name: str, script: str) -> tuple[str, str]:
    """The begin/end marker lines of a generated section."""
    return (f"<!-- BEGIN {name}: generated by {script}, edits inside are overwritten -->", f"<!-- END {name} -->")


def write_section(path: str | os.PathLike, section: str, begin: str, end: str,
                  legacy_header: Optional[str] = None) -> None:
    """Put ``section`` (which starts with ``begin`` and ends with ``end``) into the Markdown file at ``path``:
    in place of the previous section between the same markers, else (``legacy_header``) of an unmarked
    section starting with that heading line, else at the end. Written atomically."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    if not text.strip():
        text = DOC_INTROS.get(path.name, "")
    marked = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    bare = re.compile(r"^" + re.escape(legacy_header) + r"\n.*?(?=^## |\Z)", re.S | re.M) if legacy_header else None
    if marked.search(text):
        text = marked.sub(lambda _: section, text, count=1)
    elif bare is not None and bare.search(text):
        text = bare.sub(lambda _: section + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section + "\n"
    write_text_atomic(path, text if text.endswith("\n") else text + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside ``path``; when the block finishes, it replaces ``path`` in one step
    (readers see the old file or the new one, never half of one); on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600): give it the mode the file had, else the usual one.
        if path.exists():
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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: Optional[int] = 2) -> None:
    import json

    write_text_atomic(path, json.dumps(payload, indent=indent) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Plots


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display), or None (after saying so) when matplotlib is not
    installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("NOTE: matplotlib is not installed (pip install -e '.[bench]'): no plot written", flush=True)
        return None
    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """Save ``fig`` to ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Distributed benchmarks (zero.py, fsdp_comm.py): matrix kinds, collectives counted


KINDS = [
    ("q", r"\.q_proj\."),
    ("k", r"\.k_proj\."),
    ("v", r"\.v_proj\."),
    ("o", r"\.o_proj\."),
    ("gate", r"\.gate_proj\."),
    ("up", r"\.up_proj\."),
    ("down", r"\.down_proj\."),
    ("embeddings", r"embed_tokens\."),
    ("lm_head", r"(^|\.)lm_head\."),
    ("norms", r"norm\.weight$"),
]
KIND_ORDER = [k for k, _ in KINDS] + ["other"]
UNATTRIBUTED = "(no parameter: the \"some rank raises\" flag)"


def kind_of(name: str) -> str:
    """The matrix kind of a parameter name (``model.layers.3.mlp.down_proj.weight`` -> ``down``), ``other`` if
    none matches."""
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def group_by_kind(by_name: dict[str, int]) -> dict[str, int]:
    """Sum a ``{parameter name: bytes}`` map per kind, in :data:`KIND_ORDER`, kinds without entries left out."""
    out: dict[str, int] = {}
    for name, nbytes in by_name.items():
        kind = kind_of(name)
        out[kind] = out.get(kind, 0) + int(nbytes)
    return {k: out[k] for k in KIND_ORDER if k in out}


def _pct(part: float, whole: float) -> str:
    """A percentage with two decimals; more where that would round a part to 0% or 100%."""
    if not whole:
        return "—"
    value = 100 * part / whole
    if part == whole or part == 0:
        return f"{value:.0f}%"
    if value < 0.01:
        return f"{value:.1e}%"
    digits = 2
    while digits < 6 and round(value, digits) == 100:
        digits += 1
    return f"{value:.{digits}f}%"


# op -> which argument carries the payload (positional index, keyword name)
_PAYLOAD = {
    "all_reduce": (0, "tensor"),
    "reduce": (0, "tensor"),
    "broadcast": (0, "tensor"),
    "all_reduce_coalesced": (0, "tensors"),
    "all_gather": (0, "tensor_list"),
    "all_gather_into_tensor": (0, "output_tensor"),
    "all_gather_single": (0, "output_tensor"),  # torch >= 2.13's names (FSDP2 calls these)
    "_all_gather_base": (0, "output_tensor"),
    "reduce_scatter": (1, "input_list"),
    "reduce_scatter_tensor": (1, "input"),
    "_reduce_scatter_base": (1, "input"),
    "reduce_scatter_single": (1, "input"),
    "all_to_all_single": (1, "input"),
}


class CommCounter:
    """Calls, bytes and seconds in the call per (phase, op) of the torch.distributed collectives issued while a
    phase is set."""

    def __init__(self):
        self.phase: Optional[str] = None
        self.inner: Optional[str] = None  # set while the optimizer's step() runs inside engine.step()
        self.counts: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, 0.0])
        self._depth = 0

    def reset(self) -> None:
        self.counts.clear()

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for op, (pos, key) in _PAYLOAD.items():
            original = getattr(c10d, op, None)
            if original is None:
                continue
            wrapped = self._wrap(op, original, pos, key)
            setattr(c10d, op, wrapped)
            if hasattr(dist, op):
                setattr(dist, op, wrapped)

    def _wrap(self, op, original, pos, key):
        counter = self

        def wrapped(*a, **kw):
            phase = counter.inner or counter.phase
            entry = None
            if phase is not None and counter._depth == 0:  # count the outermost call only
                payload = a[pos] if len(a) > pos else kw.get(key)
                entry = counter.counts[(phase, op)]
                entry[0] += 1
                entry[1] += tensor_bytes(payload)
            counter._depth += 1
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                counter._depth -= 1
                if entry is not None:  # for async_op=True this is the launch only
                    entry[2] += time.perf_counter() - start

        wrapped.__name__ = getattr(original, "__name__", op)
        wrapped.__wrapped__ = original
        return wrapped

    def summary(self, phase: str) -> dict[str, list[int]]:
        """op -> [calls, bytes] (deterministic, compared across steps)."""
        return {op: v[:2] for (ph, op), v in sorted(self.counts.items()) if ph == phase}

    def seconds(self, phase: str) -> float:
        return sum(v[2] for (ph, op), v in self.counts.items() if ph == phase)
