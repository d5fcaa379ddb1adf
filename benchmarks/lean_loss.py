"""Peak memory of the LM-head loss on the CPU: the plain logits path, torch's linear_cross_entropy and ours.

    python benchmarks/lean_loss.py --threads 1 --output lean_loss.json     # the cases of docs/quantization.md
    python benchmarks/lean_loss.py --cases 512x8000x128:fp32 --paths plain,lean
    python benchmarks/lean_loss.py --cases 2048x32000x4096:bf16 --skip ""  # also the bf16 plain path (minutes)

For each case ``TOKENSxVOCABxHIDDEN:DTYPE`` and path (``plain``: ``F.cross_entropy(F.linear(h, w).float(), y)``;
``torch``: ``F.linear_cross_entropy`` with ``torch.nn.LinearCrossEntropyOptions()``, its chunked path; ``lean``:
``lowrank_opt.loss.linear_cross_entropy``), one loss + backward inside ``_common.cpu_peak_bytes``, the inputs
cloned inside so that they and their gradients are counted; scratch = peak - (inputs + gradients), next to the
lean path's formula (:func:`formula_scratch_bytes`; a bf16 ``h.grad`` is made after its peak, T*H*2 bytes less).
``--skip CASE:PATH`` leaves a path out, by default the bf16 plain path at LLaMA-7B's head shape (minutes on a CPU).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    check_at_least, command_line, cpu_peak_bytes, environment, machine_line, split_list, table, utc_now,
    write_json_atomic)

MB = 1e6
PATHS = ("plain", "torch", "lean")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEFAULT_CASES = "2048x32000x256:bf16,2048x32000x4096:fp32,2048x32000x4096:bf16"
DEFAULT_SKIP = "2048x32000x4096:bf16:plain"
DEFAULT_SKIP_REASON = ("skipped by default (--skip): its bf16 GEMMs take minutes on a CPU without bf16 matrix "
                       "units; --skip '' runs it")
WEIGHT_STD = 0.02  # LLaMA's initializer_range: logits of order 0.02 * sqrt(H), a loss near ln(V)
_CASE = re.compile(r"(\d+)x(\d+)x(\d+):([a-z0-9]+)")


@dataclass(frozen=True)
class Case:
    tokens: int
    vocab: int
    hidden: int
    dtype: str  # "fp32" | "bf16" | "fp16"
    label = property(lambda self: f"{self.tokens}x{self.vocab}x{self.hidden}:{self.dtype}")


def parse_case(text: str) -> Case:
    """``"2048x32000x256:bf16"`` -> Case(2048, 32000, 256, "bf16")."""
    match = _CASE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"bad case {text!r}: expected TOKENSxVOCABxHIDDEN:DTYPE with DTYPE one of "
                         f"{', '.join(DTYPES)}, e.g. 2048x32000x256:bf16")
    tokens, vocab, hidden, dtype = int(match[1]), int(match[2]), int(match[3]), match[4]
    if dtype not in DTYPES:
        raise ValueError(f"bad case {text!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if min(tokens, vocab, hidden) < 1:
        raise ValueError(f"bad case {text!r}: tokens, vocabulary and hidden size must be >= 1")
    return Case(tokens, vocab, hidden, dtype)


def parse_cases(text: str) -> list[Case]:
    try:
        cases = [parse_case(item) for item in split_list(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not cases:
        raise argparse.ArgumentTypeError(f"no case given in {text!r}")
    labels = [c.label for c in cases]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"case {', '.join(repeated)} given twice in {text!r}")
    return cases


def parse_paths(text: str) -> list[str]:
    paths = split_list(text)
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise argparse.ArgumentTypeError(f"unknown path {', '.join(map(repr, unknown)) or '(none given)'} in "
                                         f"{text!r}; choose from {', '.join(PATHS)}")
    if len(set(paths)) != len(paths):
        raise argparse.ArgumentTypeError(f"a path is given twice in {text!r}")
    return paths


def parse_skip(text: str) -> list[tuple[str, str]]:
    """``"2048x32000x4096:bf16:plain,..."`` -> [(case label, path), ...]; ``""`` -> []."""
    out = []
    for item in split_list(text):
        case_text, _, path = item.rpartition(":")
        if path not in PATHS:
            raise argparse.ArgumentTypeError(f"bad --skip entry {item!r}: expected CASE:PATH with PATH one of "
                                             f"{', '.join(PATHS)}, e.g. {DEFAULT_SKIP}")
        try:
            out.append((parse_case(case_text).label, path))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"bad --skip entry {item!r}: {exc}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lean_loss.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=parse_cases, default=DEFAULT_CASES,
                        help=f"comma-separated TOKENSxVOCABxHIDDEN:DTYPE (fp32, bf16, fp16); default {DEFAULT_CASES}")
    parser.add_argument("--paths", type=parse_paths, default=",".join(PATHS),
                        help=f"which of {', '.join(PATHS)} to measure (default all)")
    parser.add_argument("--skip", type=parse_skip, default=None,
                        help=f"CASE:PATH pairs to leave out (default {DEFAULT_SKIP}: minutes on a CPU); '' for none")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON to this path")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse's types cannot see: a --skip naming no case of --cases, an --output that is a folder."""
    if args.threads is not None:
        check_at_least(parser.error, ("--threads", args.threads, 1))
    args.skip_given = args.skip is not None
    args.skip = parse_skip(DEFAULT_SKIP) if args.skip is None else args.skip
    if args.skip_given:
        labels = {c.label for c in args.cases}
        stray = [f"{case}:{path}" for case, path in args.skip if case not in labels]
        if stray:
            parser.error(f"--skip {', '.join(stray)} names no case of --cases ({', '.join(sorted(labels))})")
    if args.output is not None and args.output.is_dir():
        parser.error(f"--output {str(args.output)!r} is a directory; give a file path")


def formula_scratch_bytes(tokens: int, vocab: int, hidden: int, dtype: str, token_chunk: int,
                          vocab_chunk: int) -> int:
    """Bytes the lean loss needs beyond its inputs and gradients, by ``lowrank_opt/loss.py``'s docstring:
    ``16*T`` (labels, per-token weights, log-sum-exp) + ``4*T*H`` (the fp32 ``grad_h`` accumulator) +
    ``4*Ct*Cv`` (the tile) and, for half-precision inputs, ``4*Ct*H + 4*Cv*H + 4*Cv*H`` (fp32 token chunk,
    weight block, weight-gradient block). Ct, Cv are the chunk sizes, capped at T and V (a chunk is never
    larger than its input). Taken as written: for fp32 inputs the accumulator *is* the returned ``grad_h``,
    already counted among the gradients, so there the formula is 4*T*H above the measurement."""
    ct, cv = min(token_chunk, tokens), min(vocab_chunk, vocab)
    scratch = 16 * tokens + 4 * tokens * hidden + 4 * ct * cv
    if dtype != "fp32":
        scratch += 4 * ct * hidden + 8 * cv * hidden
    return scratch


def torch_path_missing() -> Optional[str]:
    """Why torch's chunked linear_cross_entropy cannot run here, or None."""
    import torch

    if not hasattr(torch.nn.functional, "linear_cross_entropy"):
        return f"absent: torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return (f"absent: torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions (the chunked path; "
                "without it linear_cross_entropy is the plain path)")
    return None


def loss_function(path: str):
    """The loss of ``path`` as a function of (hidden, weight, labels)."""
    import torch
    import torch.nn.functional as F

    if path == "plain":
        return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y)
    if path == "torch":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, y: F.linear_cross_entropy(h, w, y, options=options)
    if path == "lean":
        from lowrank_opt.loss import linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(h, w, y)
    raise ValueError(f"unknown path {path!r}")


def make_inputs(case: Case, seed: int):
    """(hidden, weight, labels) of ``case``, drawn in fp32 from ``seed`` and cast to the case's dtype."""
    import torch

    dtype = getattr(torch, DTYPES[case.dtype])
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(case.tokens, case.hidden, generator=g).to(dtype)
    weight = torch.randn(case.vocab, case.hidden, generator=g).mul_(WEIGHT_STD).to(dtype)
    labels = torch.randint(0, case.vocab, (case.tokens,), generator=g)
    return hidden, weight, labels


def measure(fn, inputs) -> dict:
    """Peak live CPU tensor bytes (from the profiler's baseline), inputs+gradients bytes, loss and seconds
    of one ``fn(h, w, y).backward()`` on clones of ``inputs`` made inside the measurement."""
    hidden0, weight0, labels0 = inputs
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cpu_peak_bytes() as peak:
            h, w, y = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_(), labels0.clone()
            start = time.perf_counter()
            loss = fn(h, w, y)
            loss.backward()
            seconds = time.perf_counter() - start
            loss_value = float(loss.detach().float())
            inputs_bytes = sum(t.nbytes for t in (h, w, y))
            grad_bytes = h.grad.nbytes + w.grad.nbytes
            loss_dtype = str(loss.dtype).replace("torch.", "")
            # Freed while the profiler still watches, so its running total comes back to where it started.
            del h, w, y, loss
            gc.collect()
    peak_bytes = peak["peak_bytes"]
    return {"status": "ok", "peak_bytes": peak_bytes, "inputs_bytes": inputs_bytes, "grad_bytes": grad_bytes,
            "scratch_bytes": peak_bytes - inputs_bytes - grad_bytes, "loss": loss_value, "loss_dtype": loss_dtype,
            "seconds": seconds, "allocation_events": peak["allocation_events"],
            "profiler_baseline_bytes": peak["baseline_bytes"],
            "warnings": sorted({str(c.message).splitlines()[0] for c in caught})}


def run_case(case: Case, paths: list[str], skip: set, seed: int, skip_given: bool) -> tuple[list[dict], dict]:
    """The rows of one case (one per path) and its loss comparison."""
    from lowrank_opt.loss import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK

    inputs = None  # drawn on the first path measured: nothing at all for a case whose paths are all skipped
    rows = []
    for path in paths:
        row = {"case": case.label, **asdict(case), "path": path}
        if path == "lean":
            row["formula_scratch_bytes"] = formula_scratch_bytes(case.tokens, case.vocab, case.hidden, case.dtype,
                                                                 DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK)
        missing = torch_path_missing() if path == "torch" else None
        if (case.label, path) in skip:
            row.update(status="skipped", reason="skipped by --skip" if skip_given else DEFAULT_SKIP_REASON)
        elif missing:
            row.update(status="absent", reason=missing)
        else:
            try:
                if inputs is None:
                    inputs = make_inputs(case, seed)
                row.update(measure(loss_function(path), inputs))
            except Exception as exc:  # one failing path must not lose the others
                traceback.print_exc()
                row.update(status="error", reason=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
            gc.collect()
        print(f"{case.label} {path}: " + (f"peak {row['peak_bytes'] / MB:,.1f} MB, loss {row['loss']:.6f}, "
                                          f"{row['seconds']:.1f} s" if row["status"] == "ok"
                                          else f"{row['status']}: {row['reason']}"), flush=True)
        rows.append(row)
    return rows, compare_losses(case.label, {r["path"]: r["loss"] for r in rows if r["status"] == "ok"})


def compare_losses(label: str, losses: dict[str, float]) -> dict:
    """Each path's loss minus the reference path's (plain where measured, else the first one measured), and
    the largest difference between any two paths."""
    values = list(losses.values())
    reference = "plain" if "plain" in losses else next(iter(losses), None)
    return {"case": label, "losses": losses, "reference": reference,
            "differences": {p: v - losses[reference] for p, v in losses.items() if p != reference},
            "max_loss_difference": (max(values) - min(values)) if len(values) > 1 else None}


def _mb(value: Optional[float]) -> str:
    return "—" if value is None else f"{value / MB:,.1f}"


def markdown_table(rows: list[dict], comparisons: list[dict], command: str, machine: str) -> str:
    def cells(r: dict) -> list:
        if r["status"] != "ok":
            return ["—"] * 3 + [_mb(r.get("formula_scratch_bytes")), "—", "—", f"{r['status']}: {r['reason']}"]
        note = "; ".join(([f"loss returned in {r['loss_dtype']}"] if r["loss_dtype"] != "float32" else [])
                         + list(r["warnings"]))
        return [_mb(r["peak_bytes"]), _mb(r["inputs_bytes"] + r["grad_bytes"]), _mb(r["scratch_bytes"]),
                _mb(r.get("formula_scratch_bytes")), f"{r['loss']:.5f}", f"{r['seconds']:.1f}", note]

    losses = table(["case", "loss minus the reference's", "largest difference between paths"],
                   [[c["case"], ", ".join(f"{p} {d:+.3g}" for p, d in c["differences"].items()) + f" ({c['reference']})",
                     "—" if c["max_loss_difference"] is None else f"{c['max_loss_difference']:.3g}"]
                    for c in comparisons], "llr")
    return "\n\n".join([f"```bash\n{command}\n```", machine, table(
        ["case (T×V×H:dtype)", "path", "peak MB", "inputs + grads MB", "scratch MB", "loss.py formula MB", "loss",
         "seconds", "note"], [[r["case"], r["path"], *cells(r)] for r in rows], "llrrrrrrl"), losses])


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    command = command_line("lean_loss.py", argv)
    machine = machine_line("cpu")
    print(f"# {command}\n# {machine}", flush=True)
    skip = set(args.skip)
    started = time.perf_counter()
    rows, comparisons = [], []
    for case in args.cases:
        case_rows, comparison = run_case(case, args.paths, skip, args.seed, args.skip_given)
        rows += case_rows
        comparisons.append(comparison)
    table_text, total = markdown_table(rows, comparisons, command, machine), time.perf_counter() - started
    print(f"\n{table_text}\n\ntotal {total:.0f} s")
    if args.output is not None:
        from lowrank_opt.loss import DEFAULT_TOKEN_CHUNK, DEFAULT_VOCAB_CHUNK

        payload = {"command": command, "date": utc_now(), "total_seconds": total, "markdown": table_text,
                   "environment": {**environment("cpu"), "threads": torch.get_num_threads()},
                   "settings": {"cases": [c.label for c in args.cases], "paths": args.paths, "seed": args.seed,
                                "skip": [f"{c}:{p}" for c, p in args.skip], "threads": args.threads,
                                "weight_std": WEIGHT_STD, "mb": MB, "peak_method": "_common.cpu_peak_bytes()",
                                "lean_chunks": {"token_chunk_size": DEFAULT_TOKEN_CHUNK,
                                                "vocab_chunk_size": DEFAULT_VOCAB_CHUNK},
                                "torch_options": (repr(torch.nn.LinearCrossEntropyOptions())
                                                  if torch_path_missing() is None else None)},
                   "results": rows, "loss_comparison": comparisons}
        write_json_atomic(args.output, payload)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
