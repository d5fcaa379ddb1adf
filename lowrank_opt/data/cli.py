"""``python -m lowrank_opt.data build-tokenizer [--check]``: rebuild the shipped tokenizer, or check that a
fresh build matches it."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Iterable

from .tokenizer import DEFAULT_TOKENIZER_DIR, TOKENIZER_VOCAB_SIZE, build_tokenizer

DESCRIPTION = "Data for ``train.py``: the shipped offline tokenizer, packed pretraining blocks and masked SFT examples."


def _differing_tokenizer_files(built: Path, shipped: Path) -> list[str]:
    """Names of the tokenizer files that differ between two directories (build_info.json is metadata)."""
    return [name for name in ("tokenizer.json", "tokenizer_config.json")
            if not (shipped / name).is_file() or (built / name).read_bytes() != (shipped / name).read_bytes()]


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank_opt.data", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-tokenizer", help="train the shipped byte-level BPE on the default corpus")
    build.add_argument("--output", default=str(DEFAULT_TOKENIZER_DIR), help="directory (default: %(default)s)")
    build.add_argument("--vocab-size", type=int, default=TOKENIZER_VOCAB_SIZE)
    build.add_argument("--check", action="store_true",
                       help="build into a temporary directory and compare with --output instead of writing it")
    args = parser.parse_args(None if argv is None else list(argv))

    if args.check:
        with tempfile.TemporaryDirectory() as scratch:
            build_tokenizer(scratch, vocab_size=args.vocab_size)
            different = _differing_tokenizer_files(Path(scratch), Path(args.output))
        if different:
            print(f"differs from {args.output}: {', '.join(different)}")
            return 1
        print(f"{args.output} matches a fresh build")
        return 0
    output = build_tokenizer(args.output, vocab_size=args.vocab_size)
    size = (output / "tokenizer.json").stat().st_size
    print(f"wrote {output} (tokenizer.json {size / 1024:.0f} KiB, vocab {args.vocab_size})")
    return 0

