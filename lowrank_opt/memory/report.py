"""The result of an estimate: :class:`MemoryEstimate` (bytes per category, per GPU) and its text tables.

All sizes are bytes; the tables print GB = 1e9 bytes (the unit of DESIGN.md's "13.5 GB of bf16 weights").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .dtypes import GB


@dataclass
class KindDetail:
    """Bytes per parameter kind (embedding, attention, mlp, norm/bias, lm_head, other), per GPU."""

    kind: str
    tensors: int
    params: int
    weights: int
    gradients: int
    optimizer_states: int
    treatment: str


@dataclass
class MemoryEstimate:
    """Estimated training memory per GPU, in bytes (every formula: :mod:`lowrank_opt.memory.estimate`).

    ``total = weights + gradients + optimizer_states + activations - freed_during_backward + step_temporaries
    + overhead``.
    ``components`` splits each category further; ``kinds`` gives per-parameter-kind detail."""

    model: str
    optimizer: str
    optim_args: dict
    n_params: int
    dtype: str
    master_weights: bool
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    layerwise: bool
    zero_stage: int
    num_gpus: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    freed_during_backward: int
    step_temporaries: int
    overhead: int
    total: int
    components: dict = field(default_factory=dict)
    kinds: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cuda"
    weight_format: str = "float"  # "int8": Linear weights in int8 with per-group scales (Q-APOLLO)
    lean_loss: bool = False  # the chunked cross-entropy (lowrank_opt.loss): no tokens x vocab tensors

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_gb"] = round(self.total / GB, 3)
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    # -- text ------------------------------------------------------------------------------------------

    def title(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.optim_args.items())
        prec = self.dtype + (" + fp32 master" if self.master_weights else "")
        extra = []
        if self.gradient_checkpointing:
            extra.append("gradient checkpointing")
        if self.layerwise:
            extra.append("layer-wise updates")
        if self.zero_stage:
            extra.append(f"ZeRO-{self.zero_stage} x {self.num_gpus} GPUs")
        if self.weight_format == "int8":
            extra.append("int8 weights")
        if self.lean_loss:
            extra.append("lean loss")
        if self.device != "cuda":
            extra.append(f"on {self.device}")
        return (f"{self.model} ({self.n_params / 1e9:.2f} B params), {self.optimizer}"
                f"{'(' + args + ')' if args else ''}, {prec}, batch {self.batch_size} x {self.seq_len} tokens"
                + (", " + ", ".join(extra) if extra else ""))

    def rows(self) -> list[tuple[str, int, str]]:
        def sub(prefix: str) -> str:
            return ", ".join(f"{k.split('.', 1)[1]} {v / GB:.2f}" for k, v in self.components.items()
                             if k.startswith(prefix + ".") and v)

        return [
            ("weights", self.weights, sub("weights")),
            ("gradients", self.gradients, sub("gradients")),
            ("optimizer states", self.optimizer_states, sub("optimizer_states")),
            ("activations", self.activations, sub("activations")),
            ("freed during backward", -self.freed_during_backward, "activations freed as gradients appear"),
            ("optimizer step temporaries", self.step_temporaries, "raise of the peak by the step's scratch tensors"),
            ("overhead", self.overhead, sub("overhead")),
            ("total (peak per GPU)" if self.device == "cuda" else "total (peak live tensors)", self.total, ""),
        ]

    def table(self, detail: bool = False) -> str:
        lines = [f"Training memory estimate: {self.title()}", f"  {'':28s}{'GB':>9s}"]
        for label, value, note in self.rows():
            if label.startswith("total"):
                lines.append("  " + "-" * 37)
            lines.append(f"  {label:28s}{value / GB:9.2f}" + (f"   ({note})" if note else ""))
        if detail:
            lines.append("")
            lines.append(f"  {'kind':12s}{'tensors':>8s}{'params (M)':>12s}{'weights':>9s}{'grads':>9s}"
                         f"{'states':>9s}   optimizer")
            for k in self.kinds:
                lines.append(f"  {k['kind']:12s}{k['tensors']:8d}{k['params'] / 1e6:12.1f}{k['weights'] / GB:9.3f}"
                             f"{k['gradients'] / GB:9.3f}{k['optimizer_states'] / GB:9.3f}   {k['treatment']}")
        if self.notes:
            lines.append("")
            lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def compare_table(estimates: list[MemoryEstimate]) -> str:
    """Several estimates side by side (one column each), in GB."""
    if not estimates:
        return ""
    first = estimates[0]
    same_layerwise = len({e.layerwise for e in estimates}) == 1
    names = [e.optimizer + (" (layer-wise)" if e.layerwise and not same_layerwise else "") for e in estimates]
    for i, e in enumerate(estimates):
        if names.count(names[i]) > 1 and e.optim_args:  # same optimizer, different options
            names[i] += "(" + ",".join(f"{k}={v}" for k, v in e.optim_args.items() if k != "rank" or not e.layerwise) + ")"
    width = max(12, *(len(n) + 2 for n in names))
    head = (f"{first.model} ({first.n_params / 1e9:.2f} B params), {first.dtype}"
            f"{' + fp32 master' if first.master_weights else ''}, batch {first.batch_size} x {first.seq_len} tokens"
            f"{', gradient checkpointing' if first.gradient_checkpointing else ''}"
            f"{', layer-wise updates' if same_layerwise and first.layerwise else ''}"
            f"{f', ZeRO-{first.zero_stage} x {first.num_gpus} GPUs' if first.zero_stage else ''}"
            f"{f', on {first.device}' if first.device != 'cuda' else ''}  (GB)")
    lines = [head, f"  {'':28s}" + "".join(f"{n:>{width}s}" for n in names)]
    for idx, (label, _, _) in enumerate(first.rows()):
        if label.startswith("total"):
            lines.append("  " + "-" * (28 + width * len(names)))
        lines.append(f"  {label:28s}" + "".join(f"{e.rows()[idx][1] / GB:>{width}.2f}" for e in estimates))
    return "\n".join(lines)
