"""Regenerate tiny_default_loss.json from the default run:  python tests/golden/make_golden.py

Only after a deliberate change of the default run (configs/tiny.yaml, the model, the data or the optimizer's
math); the test then holds every later run to these numbers."""

import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import train  # noqa: E402

with tempfile.TemporaryDirectory() as out:
    trainer, metrics = train.main(["--output_dir", out, "--disable_tqdm", "true"])
golden = {
    "command": "python train.py  (configs/tiny.yaml), losses from trainer.state.log_history",
    "torch": torch.__version__,
    "python": platform.python_version(),
    "loss": {str(e["step"]): e["loss"] for e in trainer.state.log_history if "loss" in e},
    "eval_loss": metrics["eval_loss"],
}
path = Path(__file__).with_name("tiny_default_loss.json")
path.write_text(json.dumps(golden, indent=2) + "\n")
print(f"wrote {path}: {len(golden['loss'])} losses, eval_loss {golden['eval_loss']:.4f}")
