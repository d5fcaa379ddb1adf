"""``python -m lowrank_opt.data build-tokenizer [--check]`` (see ``lowrank_opt.data.cli``)."""

import sys

from .cli import main

sys.exit(main())
