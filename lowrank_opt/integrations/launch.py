"""``lowrank-opt run``: a stock Hugging Face or TRL script, which you cannot edit, with ``--optim apollo``.

    lowrank-opt run train_stock.py --optim apollo_mini --output_dir out ...      # a script file
    lowrank-opt run -m my_package.train --optim apollo --optim_args rank=128 ...  # a module
    lowrank-opt run -- trl sft --model_name_or_path ./my-model --optim apollo ...  # a console script
    lowrank-opt run -- accelerate launch train_stock.py --optim apollo_capped ...  # any launcher

The target runs as it would without us, in a new process, with one difference: in every Python process of
the run (the target and whatever it starts: ``accelerate launch``, ``torchrun``, ``trl``'s own launch),
``transformers.Trainer`` and ``transformers.TrainingArguments`` are lowrank-opt's
(:data:`lowrank_opt.integrations.hf.Trainer`, :data:`~lowrank_opt.integrations.hf.TrainingArguments`) from
the moment ``transformers`` is imported, before the script or TRL can take them. What it does, step by step:

1. The launcher refuses a transformers (or, for ``trl``, a TRL) version it is not tested with
   (:data:`TESTED`), before starting anything.
2. It writes a ``sitecustomize.py`` into a temporary folder, puts the folder first on ``PYTHONPATH`` and sets
   ``LOWRANK_OPT_RUN=1``; Python imports ``sitecustomize`` at start-up in the target and in every child that
   inherits the environment. The file adds an import hook and then runs the ``sitecustomize`` it shadows, if
   any. It imports nothing else: a child that never imports transformers pays nothing.
3. On the first ``import transformers`` the hook (:class:`_ImportHook`) checks the version again, lets
   transformers load, then :func:`install` swaps the two classes in ``transformers``,
   ``transformers.trainer`` and ``transformers.training_args``. Everything that subclasses them afterwards
   (every TRL config and trainer, ``Seq2SeqTrainer``, the script's own subclasses) is then built on
   lowrank-opt's classes: ``--optim`` takes every registry name with ``--optim_args`` and
   ``--optim_target_modules`` (``attn mlp`` or ``attn,mlp``), a name is checked when the arguments are made,
   and the Trainer builds the optimizer the name stands for. Hugging Face's own names are unchanged. On the
   first ``import trl`` the hook checks TRL's version before TRL loads.
4. The Trainer put in place also refuses, for one of our names, what would train something else: a script
   that hands the Trainer its own optimizer (``optimizers=`` or ``optimizer_cls_and_kwargs=``), and a
   DeepSpeed config with an ``"optimizer"`` section (DeepSpeed would build that one and never ask the
   Trainer).

A Python that ignores ``PYTHONPATH`` (``python -I``/``-E``) gets no hook; ``--optim apollo`` then fails in
Hugging Face's own argument check ("invalid choice"), it never trains another optimizer.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any, Optional, Sequence

PROG = "lowrank-opt run"
ENV_FLAG = "LOWRANK_OPT_RUN"

# The transformers and TRL release series (major.minor) this launcher is tested with (tests/test_launch.py).
# Its patch is small (two class attributes of transformers, see install), but what it puts in place is
# lowrank-opt's Trainer glue, whose use of Trainer internals is tested against these versions only; the
# one-line import change (docs/quickstart.md) is the way with other versions.
TESTED = {"transformers": ("5.24",), "trl": ("1.16",)}


class UnsupportedVersion(SystemExit):
    """A transformers/TRL version the launcher is not tested with: the process stops with this message (a
    SystemExit, so that a script's ``except Exception`` cannot swallow it)."""


# ----------------------------------------------------------------------------------------------------------
# Versions


def installed_version(package: str) -> Optional[str]:
    """The installed distribution's version, from its metadata (cheap: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _series(version: str) -> str:
    parts = version.split(".")
    return ".".join(parts[:2])


def check_version(package: str, version: Optional[str] = None) -> str:
    """``version`` (default: the installed one) of ``package`` must be in a series of :data:`TESTED`; raises
    :class:`UnsupportedVersion` naming it, the tested series and the ways out. Returns the version."""
    version = installed_version(package) if version is None else version
    tested = TESTED[package]
    if version is None:
        raise UnsupportedVersion(f"{PROG}: {package} is not installed (tested with {package} "
                                 f"{' or '.join(s + '.x' for s in tested)})")
    if _series(version) not in tested:
        raise UnsupportedVersion(
            f"{PROG}: {package} {version} is installed, and the launcher patches only the {package} versions it "
            f"is tested with: {', '.join(s + '.x' for s in tested)} (pip install '{package}=={tested[-1]}.*'). "
            f"With any other version change the script's import line instead, e.g. `from "
            f"lowrank_opt.integrations.hf import Trainer, TrainingArguments` or `from lowrank_opt.integrations.trl "
            f"import SFTConfig, SFTTrainer` (docs/quickstart.md)")
    return version


# ----------------------------------------------------------------------------------------------------------
# The patch, in the launched processes


_state = {"installed": False, "installing": False}


def install() -> None:
    """Put lowrank-opt's ``Trainer``/``TrainingArguments`` in place of transformers' (see the module doc).
    Idempotent. Raises :class:`UnsupportedVersion` for an untested transformers and SystemExit when the
    classes cannot be put in place (then nothing would build our optimizers, and the run stops)."""
    if _state["installed"] or _state["installing"]:
        return
    _state["installing"] = True
    try:
        check_version("transformers")
        import transformers
        import transformers.trainer
        import transformers.training_args

        from . import hf

        original_trainer = transformers.trainer.Trainer
        original_arguments = transformers.training_args.TrainingArguments
        if not (isinstance(hf.Trainer, type) and issubclass(hf.Trainer, original_trainer)
                and issubclass(hf.TrainingArguments, original_arguments)):
            raise SystemExit(f"{PROG}: lowrank_opt.integrations.hf was built on other transformers classes than "
                             "the ones loaded; nothing was patched")
        trainer_cls = hf.Trainer  # its mixin refuses a script's own optimizer for one of our names
        for module in (transformers, transformers.trainer):
            setattr(module, "Trainer", trainer_cls)
        for module in (transformers, transformers.training_args):
            setattr(module, "TrainingArguments", hf.TrainingArguments)
        # What `from transformers import Trainer` and `from transformers.trainer import Trainer` now give.
        from transformers import Trainer, TrainingArguments  # noqa: F401 - the check is the point
        from transformers.trainer import Trainer as trainer_in_module

        if Trainer is not trainer_cls or trainer_in_module is not trainer_cls or \
                TrainingArguments is not hf.TrainingArguments:
            raise SystemExit(f"{PROG}: transformers {transformers.__version__} did not take lowrank-opt's "
                             "Trainer/TrainingArguments in place of its own; nothing would build our optimizers")
        _state["installed"] = True
    finally:
        _state["installing"] = False


def installed() -> bool:
    return _state["installed"]


def _after_transformers() -> None:
    """transformers has loaded. When lowrank_opt.integrations.hf imported it, hf is still half-built (its
    classes do not exist yet): :func:`_after_hf` installs once it is done."""
    hf = sys.modules.get(__package__ + ".hf")
    if hf is not None and getattr(getattr(hf, "__spec__", None), "_initializing", False):
        return
    install()


def _after_hf() -> None:
    if "transformers" in sys.modules:
        install()


class _AfterExec(importlib.abc.Loader):
    """A module's own loader, with ``before`` called before it runs and ``after`` once it has run."""

    def __init__(self, loader: Any, before, after) -> None:
        self._loader, self._before, self._after = loader, before, after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._before()
        self._loader.exec_module(module)
        module.__loader__ = self._loader  # the module keeps its own loader (resources, reloads)
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._after()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _ImportHook(importlib.abc.MetaPathFinder):
    """Watches the first import of transformers, trl and lowrank_opt.integrations.hf (see :func:`install`)."""

    def __init__(self) -> None:
        self._busy: set[str] = set()
        self._actions = {
            "transformers": (lambda: check_version("transformers"), _after_transformers),
            "trl": (lambda: check_version("trl"), lambda: None),
            __package__ + ".hf": (lambda: None, _after_hf),
        }

    def find_spec(self, name: str, path: Optional[Sequence[str]] = None, target: Any = None):
        if name not in self._actions or name in self._busy:
            return None
        self._busy.add(name)
        try:
            spec = None
            for finder in sys.meta_path:  # the finder that would have found it without us
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.discard(name)
        if spec is None or spec.loader is None:
            return spec
        before, after = self._actions[name]
        spec.loader = _AfterExec(spec.loader, before, after)
        return spec


_hook: Optional[_ImportHook] = None


def activate() -> _ImportHook:
    """Called by the launched processes' ``sitecustomize`` on the first import of a watched module: put the
    import hook in place (and install at once if transformers is already loaded)."""
    global _hook
    if _hook is None:
        _hook = _ImportHook()
        sys.meta_path.insert(0, _hook)
        if "transformers" in sys.modules:
            _after_transformers()
    return _hook


# What the launched processes run at start-up. Kept to the standard library: lowrank_opt (and torch) are
# imported only when transformers, trl or lowrank_opt.integrations.hf is.
SITECUSTOMIZE = '''\
"""Written by `lowrank-opt run` (lowrank_opt/integrations/launch.py): with LOWRANK_OPT_RUN=1, the first import
of transformers or trl hands over to lowrank_opt.integrations.launch. Then runs the sitecustomize it shadows."""
import os as _os
import sys as _sys


class _LowRankOptRunStub:
    names = ("transformers", "trl", "lowrank_opt.integrations.hf")

    def find_spec(self, name, path=None, target=None):
        if name not in self.names:
            return None
        _sys.meta_path.remove(self)
        try:
            from lowrank_opt.integrations import launch
        except ImportError as error:
            raise SystemExit("lowrank-opt run: %s cannot import lowrank_opt (%s): run the target with the Python "
                             "that lowrank-opt is installed in" % (_sys.executable, error))
        return launch.activate().find_spec(name, path, target)


def _run_shadowed_sitecustomize():
    here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != here]
    this = _sys.modules.pop("sitecustomize", None)
    try:
        import sitecustomize  # noqa: F401 - the next one on sys.path, as Python would have run it
    except ImportError as error:
        if error.name != "sitecustomize":
            raise
        if this is not None:
            _sys.modules["sitecustomize"] = this


if _os.environ.get("LOWRANK_OPT_RUN") == "1":
    _sys.meta_path.insert(0, _LowRankOptRunStub())
_run_shadowed_sitecustomize()
'''


# ----------------------------------------------------------------------------------------------------------
# The launcher


USAGE = f"""usage: {PROG} [--] SCRIPT.py [ARGS...]
       {PROG} [--] -m MODULE [ARGS...]
       {PROG} [--] COMMAND [ARGS...]         (a console script such as trl, torchrun, accelerate)

Runs a Hugging Face / TRL training script you cannot edit with lowrank-opt's optimizers: `--optim apollo`
(every lowrank-opt name, with --optim_args and --optim_target_modules) works as in a script whose import line
was changed to lowrank_opt.integrations.hf / .trl; Hugging Face's own --optim names are unchanged. Tested with
{', '.join(f"{p} {' or '.join(s + '.x' for s in v)}" for p, v in TESTED.items())}; other versions are refused.
`python` as COMMAND means this Python ({sys.executable})."""


def command_for(argv: Sequence[str]) -> tuple[list[str], Optional[str]]:
    """The command line that runs ``argv`` (``SCRIPT [ARGS]``, ``-m MODULE [ARGS]``, ``python ...`` or a
    console script / program ``NAME [ARGS]``), and the distribution the target belongs to when it is a
    console script (None otherwise). Raises ValueError naming a target that is none of these."""
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ValueError("no target given: SCRIPT.py, -m MODULE or a command")
    target, rest = argv[0], argv[1:]
    if target == "-m":
        if not rest:
            raise ValueError("-m needs a module name")
        return [sys.executable, "-m", *rest], None
    if target.startswith("-"):
        raise ValueError(f"unknown option {target!r} (the target comes first: SCRIPT.py, -m MODULE or a command)")
    if target in ("python", "python3", f"python3.{sys.version_info[1]}"):
        return [sys.executable, *rest], None  # this Python, the one lowrank-opt is installed in
    if target.endswith(".py") or (os.path.isfile(target) and not os.access(target, os.X_OK)):
        if not os.path.isfile(target):
            raise ValueError(f"script {target!r} not found (from {os.getcwd()})")
        return [sys.executable, target, *rest], None
    if os.path.isfile(target):  # an executable file (a program, or a script with its own #! line)
        return [os.path.abspath(target), *rest], None
    if os.path.isdir(target):
        if not os.path.isfile(os.path.join(target, "__main__.py")):
            raise ValueError(f"{target!r} is a folder without __main__.py")
        return [sys.executable, target, *rest], None
    from importlib.metadata import entry_points

    for entry in entry_points(group="console_scripts", name=target):
        # Loaded in this Python, as its console script would be (and so with this lowrank_opt importable).
        code = ("import sys; from importlib.metadata import EntryPoint; "
                f"sys.argv[0] = {target!r}; "
                f"sys.exit(EntryPoint(name={entry.name!r}, value={entry.value!r}, group='console_scripts').load()())")
        dist = getattr(getattr(entry, "dist", None), "name", None)
        return [sys.executable, "-c", code, *rest], dist
    program = shutil.which(target)
    if program is None:
        raise ValueError(f"{target!r} is not a script, a console script of this Python's packages, nor a program "
                         "on PATH (for a module use -m MODULE)")
    return [program, *rest], None


def launch_environment(hook_dir: str, base: Optional[dict] = None) -> dict:
    """``base`` (default: this process's environment) with the hook folder first on PYTHONPATH and the flag
    that turns the hook on."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([hook_dir] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env[ENV_FLAG] = "1"
    return env


def run(argv: Sequence[str]) -> int:
    """``lowrank-opt run ARGV``: check versions, start the target with the hook, wait, return its exit status
    (128 + N when a signal N ended it). SIGTERM/SIGHUP are passed on to the target; Ctrl-C reaches it directly
    (same process group) and the launcher waits for it."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, dist = command_for(argv)
    check_version("transformers")
    if dist == "trl":
        check_version("trl")
    hook_dir = tempfile.mkdtemp(prefix="lowrank-opt-run-")
    try:
        with open(os.path.join(hook_dir, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
        child = subprocess.Popen(command, env=launch_environment(hook_dir))
        forwarded = {}

        def forward(signum, frame):
            child.send_signal(signum)

        for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if signum is not None:
                forwarded[signum] = signal.signal(signum, forward)
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child gets Ctrl-C itself
        try:
            code = child.wait()
        finally:
            signal.signal(signal.SIGINT, previous_int)
            for signum, handler in forwarded.items():
                signal.signal(signum, handler)
        return 128 - code if code < 0 else code
    finally:
        shutil.rmtree(hook_dir, ignore_errors=True)


__all__ = ["TESTED", "UnsupportedVersion", "activate", "check_version", "command_for", "install", "installed",
           "launch_environment", "run"]
