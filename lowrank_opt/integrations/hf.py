"""Hugging Face Trainer glue: ``--optim apollo`` (every lowrank-opt name) next to HF's own ``--optim`` names.

Your existing Trainer script, one changed line::

    from lowrank_opt.integrations.hf import Trainer, TrainingArguments   # was: from transformers import ...

    args = TrainingArguments(output_dir="out", optim="apollo", optim_args="rank=256,update_proj_gap=200",
                             learning_rate=1e-2)        # HfArgumentParser: --optim apollo --optim_args ...
    trainer = Trainer(model=model, args=args, train_dataset=train_ds)
    trainer.train()

TRL: ``from lowrank_opt.integrations.trl import SFTConfig, SFTTrainer``. Any other Trainer or arguments
subclass: :func:`lowrank_trainer_class` and :func:`lowrank_arguments_class`. HF's own names (``adamw_torch``,
``galore_adamw``, ...) work through the same classes, unchanged.

A lowrank-opt name is resolved once (:func:`lowrank_opt.registry.resolve`, through
``TrainingArguments.lowrank_resolved``): the learning rate, betas (``adam_beta1/2``) and ``adam_epsilon`` come from
the arguments, everything else from ``optim_args`` (HF's "key=value,key=value"), low-rank targets from
``optim_target_modules``. ``weight_decay`` applies to matrices only (not biases or norm weights), as the Trainer
does. Without our Trainer class, :func:`optimizer_cls_and_kwargs` gives ``Trainer(optimizer_cls_and_kwargs=...)``
what it needs.
"""

import logging
import os
from typing import Any, Optional, Union

from torch import nn

from ..registry import ResolvedOptimizer, available, is_registry_name, parse_name, parse_optim_args, resolve
from ..targets import TargetModules

logger = logging.getLogger(__name__)


def hf_optimizer_names() -> list[str]:
    from transformers.training_args import OptimizerNames

    return [o.value for o in OptimizerNames]


def check_optim_name(name: str) -> str:
    """'ours' for a registry name, 'hf' for one of Hugging Face's; anything else fails listing both."""
    if is_registry_name(name):
        return "ours"
    hf_names = hf_optimizer_names()
    if name in hf_names:
        return "hf"
    raise ValueError(
        f"unknown --optim {name!r}. lowrank-opt names: {', '.join(available())} (each also as NAME_capped); "
        f"Hugging Face names: {', '.join(hf_names)}"
    )


def resolve_for_args(name: str, args: Any, optim_args: Union[None, str, dict] = None,
                     target_modules: Optional[TargetModules] = None) -> ResolvedOptimizer:
    """:func:`lowrank_opt.registry.resolve` with ``TrainingArguments``' settings: the learning rate, and for the
    Adam family betas (``adam_beta1/2``) and epsilon (``adam_epsilon``), as HF's own optimizers take them, between
    the registry's defaults and ``optim_args`` (default ``args.optim_args``); targets from ``target_modules``
    (default ``args.optim_target_modules``). The Trainer's settings are refused in ``optim_args``."""
    options = parse_optim_args(args.optim_args if optim_args is None else optim_args)
    for key, flag in (("lr", "--learning_rate"), ("weight_decay", "--weight_decay"),
                      ("betas", "--adam_beta1/--adam_beta2")):
        if key in options:
            raise ValueError(f"optim_args {key}={options[key]} is not used by the Trainer; set {flag} instead")
    defaults = {"lr": args.learning_rate}
    if "betas" in parse_name(name)[0].options():  # the Adam family: the Trainer's betas and epsilon
        defaults.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    targets = target_modules if target_modules is not None else getattr(args, "optim_target_modules", None)
    return resolve(name, options, targets, defaults=defaults)


OPTIM_HELP = (f"The optimizer: a lowrank-opt name ({', '.join(available())}, each also as NAME_capped) or any "
              "Hugging Face optim name (adamw_torch, apollo_adamw, galore_adamw, adamw_bnb_8bit, ...).")
OPTIM_ARGS_HELP = ("The optimizer's own options as 'key=value,key=value' (e.g. 'rank=256,scale_type=channel,"
                   "update_proj_gap=200,scale=1' for apollo; cap_tau=1.05 for a *_capped name; see `lowrank-opt "
                   "optimizers`). Learning rate, betas, epsilon and weight decay come from their own flags. An "
                   "option the optimizer does not take is an error, for lowrank-opt and Hugging Face names alike.")
TARGETS_HELP = ("The matrices that go low-rank (lowrank-opt's low-rank optimizers, HF's galore/apollo): "
                "'all-linear' (every Linear/Conv1D but the output head), module names or regexes, separated by "
                "spaces (or, for lowrank-opt's names, commas). Default for lowrank-opt names: all-linear.")


_REPORTERS = {  # --report_to name -> the package it needs (as transformers' integrations import them)
    "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",), "clearml": ("clearml",), "neptune": ("neptune",), "dvclive": ("dvclive",),
    "codecarbon": ("codecarbon",), "flyte": ("flytekit",), "swanlab": ("swanlab",), "trackio": ("trackio",),
    "azure_ml": ("azureml",),
}


def check_report_to(report_to: Any) -> None:
    """Fail at once (before a model is built) when ``--report_to`` names an integration whose package is not
    installed; transformers finds out only when the Trainer is built."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        packages = _REPORTERS.get(str(name).lower())
        if packages and not any(importlib.util.find_spec(p) is not None for p in packages):
            raise ImportError(f"--report_to {name} needs the package {packages[0]!r}, which is not installed: "
                              f"pip install {packages[0]} (or drop {name} from --report_to)")


def _our_name(optim: Any) -> Optional[str]:
    """The registry name ``optim`` stands for, or None for one of Hugging Face's."""
    name = getattr(optim, "value", optim)
    return name.strip().lower() if is_registry_name(name) else None


def lowrank_arguments_class(base: type, name: Optional[str] = None, module: Optional[str] = None) -> type:
    """A dataclass subclass of ``base`` (``transformers.TrainingArguments`` or a subclass of it, e.g. TRL's
    ``SFTConfig``) whose ``optim`` also takes every lowrank-opt registry name, with ``optim_args`` and
    ``optim_target_modules`` (a list: ``--optim_target_modules attn mlp``, or for lowrank-opt's names ``attn,mlp``)
    for it.

    A lowrank-opt name is resolved here, once (``lowrank_resolved``: an unknown option or misplaced targets fail
    now, not at the first step), and kept in ``optim`` as a plain string, so a *stock* ``transformers.Trainer``
    handed these arguments stops with
    "Trainer cannot instantiate unsupported optimizer" instead of training something else; use the matching
    :func:`lowrank_trainer_class` Trainer. Hugging Face's own names behave exactly as in ``base``."""
    import inspect
    from dataclasses import dataclass, field

    if isinstance(inspect.getattr_static(base, "lowrank_optim", None), property):
        return base  # already lowrank-opt's (e.g. TRL's classes defined under `lowrank-opt run`)

    @dataclass
    class Arguments(base):  # type: ignore[misc,valid-type]
        optim: str = field(default=base.__dataclass_fields__["optim"].default, metadata={"help": OPTIM_HELP})
        optim_args: Optional[str] = field(default=None, metadata={"help": OPTIM_ARGS_HELP})
        optim_target_modules: Optional[list[str]] = field(default=None, metadata={"help": TARGETS_HELP})
        lean_loss: bool = field(default=False, metadata={
            "help": "Compute the causal-LM loss in chunks (lowrank_opt.loss): no tokens x vocabulary logits or their "
                    "gradient in training (for LLaMA-7B at 2,048 tokens about 0.5 GB less at the peak). Training "
                    "steps only (evaluation keeps the model's own loss); one process; the plain Trainer."})

        def __post_init__(self):
            from ..registry import normalize_target_modules

            check_report_to(self.report_to)
            ours = _our_name(self.optim)
            if ours is None:  # Hugging Face's name: HF's own checks, its targets as HF takes them ...
                check_optim_name(getattr(self.optim, "value", self.optim))  # with our list on error
                targets = self.optim_target_modules
                if isinstance(targets, list) and len(targets) == 1 and targets[0].replace("_", "-") == "all-linear":
                    self.optim_target_modules = targets[0]  # ... HF's parser gives "all-linear" as a string
                super().__post_init__()
                return
            self.optim_target_modules = normalize_target_modules(self.optim_target_modules)
            self.lowrank_resolved  # unknown options and misplaced targets fail here
            self.optim = "adamw_torch"  # HF's own checks accept only its names ...
            try:
                super().__post_init__()
            finally:
                self.optim = ours  # ... and a stock Trainer must not mistake ours for one of them

        @property
        def lowrank_optim(self) -> Optional[str]:
            """The lowrank-opt name in ``optim``, or None for a Hugging Face name."""
            return _our_name(self.optim)

        @property
        def lowrank_resolved(self) -> Optional[ResolvedOptimizer]:
            """The optimizer ``optim`` names, resolved with these arguments (:func:`resolve_for_args`), or None for
            a Hugging Face name. Resolved once, and again only after one of its inputs changed."""
            name = self.lowrank_optim
            if name is None:
                return None
            key = (name, self.optim_args, repr(self.optim_target_modules), self.learning_rate, self.adam_beta1,
                   self.adam_beta2, self.adam_epsilon)
            cached = self.__dict__.get("_lowrank_resolved")
            if cached is None or cached[0] != key:
                cached = self.__dict__["_lowrank_resolved"] = (key, resolve_for_args(name, self))
            return cached[1]

    Arguments.__name__ = Arguments.__qualname__ = name or base.__name__
    Arguments.__module__ = module or __name__
    Arguments.__doc__ = (f"``{base.__module__}.{base.__qualname__}`` whose ``--optim`` also takes lowrank-opt's names "
                         "(see :func:`lowrank_opt.integrations.hf.lowrank_arguments_class`).")
    return Arguments


class LowRankTrainerMixin:
    """What a Trainer needs to build lowrank-opt's optimizers by name (use :func:`lowrank_trainer_class`):

    * ``create_optimizer``: a lowrank-opt name in ``args.optim`` is built from ``args.lowrank_resolved`` (the
      registry's defaults, then the learning rate, betas and epsilon of the arguments, then ``optim_args``) on
      the model (low-rank targets from ``optim_target_modules``, decay on matrices only); one line with every
      resolved option is logged. Under DeepSpeed, what ZeRO cannot run is refused first. Layer-wise optimizers
      refuse gradient accumulation and data parallelism, and turn global gradient clipping off (no gradient
      survives backward; the optimizer's per-tensor limiter stays). For a Hugging Face name, an ``optim_args``
      key its optimizer does not read is an error (HF would ignore it).
    * ``build_optimizer=True`` (a keyword of the constructor) builds the optimizer while the Trainer is
      constructed, once the model is placed and before the output folder is made, so that a bad option, target
      or rank fails before anything is written; training then uses that optimizer (DeepSpeed's too). The model's
      parameters must not change afterwards. Where the Trainer builds the optimizer only after wrapping the model
      (FSDP 1, FSDP on XLA, SageMaker model parallelism) it is built then, as without the keyword.
    * the gradient norm logged for a layer-wise optimizer is the norm of the gradients it consumed (not 0);
    * ``log``: ``perplexity``/``eval_perplexity`` next to every loss;
    * checkpoints are written to a staging folder and renamed into place when complete, so a run killed while
      saving leaves every earlier checkpoint loadable and no half-written ``checkpoint-N``;
    * resuming (and loading the best model) loads every tensor of the model from the checkpoint, or stops naming
      those it could not load (:func:`load_checkpoint_weights`), where HF would warn and train on.
    """

    def __init__(self, *args, build_optimizer: bool = False, **kwargs):
        self.lowrank_optimizer = None  # the ResolvedOptimizer of a lowrank-opt name, once built
        self._build_optimizer = build_optimizer
        self._built_at_init = None  # (model, optimizer) built while constructing, until the Trainer asks for it
        super().__init__(*args, **kwargs)
        self.add_callback(_OptimizerSettingsCallback(self))
        if _our_name(self.args.optim) and getattr(self.args, "deepspeed", None):
            from .deepspeed import check_deepspeed_config

            check_deepspeed_config(self.args.deepspeed)  # an "optimizer" section: DeepSpeed would build that one

    def _validate_args(self) -> None:
        """HF's checks of the constructor's arguments; then, with ``build_optimizer=True``, the optimizer (the
        model is placed on its device by now, and the output folder not yet made)."""
        super()._validate_args()
        if self._build_optimizer and not self._optimizer_built_after_wrapping():
            self.create_optimizer()
            self._built_at_init = (self.model, self.optimizer)

    def _optimizer_built_after_wrapping(self) -> bool:
        """HF builds the optimizer on the wrapped model under FSDP 1, FSDP on XLA and SageMaker model parallelism
        (the wrapping replaces the parameters); FSDP 2 swaps them inside the optimizer it built before."""
        from transformers.utils import is_sagemaker_mp_enabled

        fsdp_version = getattr(getattr(self.accelerator.state, "fsdp_plugin", None), "fsdp_version", 1)
        return bool(is_sagemaker_mp_enabled() or self.is_fsdp_xla_enabled
                    or (self.is_fsdp_enabled and fsdp_version != 2))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """With ``args.lean_loss``, training steps take the chunked cross-entropy of :mod:`lowrank_opt.loss`
        (same loss and gradients, no tokens x vocabulary tensors); otherwise the Trainer's own."""
        if not getattr(self.args, "lean_loss", False) or not model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        from ..loss import causal_lm_loss_from_model

        mro = type(self).__mro__
        base = mro[mro.index(LowRankTrainerMixin) + 1]
        if base.compute_loss is not _transformers_trainer().compute_loss:
            raise ValueError(f"--lean_loss: {base.__name__} computes its own loss (and metrics from the logits), "
                             "which the lean loss does not produce; use it with the plain Trainer")
        if self.args.world_size > 1:
            raise ValueError(f"--lean_loss runs the decoder outside the data-parallel wrapper, so it cannot run in "
                             f"{self.args.world_size} processes; use one process or drop --lean_loss")
        return causal_lm_loss_from_model(model, inputs, num_items_in_batch=num_items_in_batch)

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        built, self._built_at_init = self._built_at_init, None
        if self.optimizer is None and built is not None and built[0] is opt_model:
            self.optimizer = built[1]  # DeepSpeed's deepspeed_init drops the optimizer and asks for it again
            return self.optimizer
        name = _our_name(self.args.optim)
        given = self.optimizer is not None or getattr(self, "optimizer_cls_and_kwargs", None) is not None
        if given and name and self.lowrank_optimizer is None:
            what = (type(self.optimizer).__name__ if self.optimizer is not None
                    else getattr(self.optimizer_cls_and_kwargs[0], "__name__", "an optimizer"))
            raise ValueError(
                f"--optim {name}: the Trainer was also handed an optimizer ({what}, through "
                f"{'optimizers=' if self.optimizer is not None else 'optimizer_cls_and_kwargs='}), which it would "
                f"train instead of {name}: drop one of the two")
        if given:
            return super().create_optimizer(model)
        if name is None:
            return self._create_hf_optimizer(model)
        resolved = self.args.lowrank_resolved
        if getattr(self.args, "deepspeed", None):
            from .deepspeed import check_deepspeed_optimizer

            check_deepspeed_optimizer(resolved, self.args.deepspeed)
        if resolved.layerwise:
            check_layerwise_arguments(name, self.args)
        self.optimizer = resolved.build(opt_model, weight_decay=self.args.weight_decay)
        self.lowrank_optimizer = resolved
        logger.info("optimizer: %s", resolved.summary(self.optimizer))
        return self.optimizer

    def _create_hf_optimizer(self, model):
        """HF's own ``create_optimizer`` for a Hugging Face name, refusing an ``optim_args`` key its optimizer
        does not read (HF would ignore it silently): HF's ``_parse_optim_args`` hands the optimizer a dict that
        records which keys are read while it is built (once: HF's layer-wise optimizers register hooks)."""
        import transformers.trainer as hf_trainer

        parse = getattr(hf_trainer, "_parse_optim_args", None)
        if not self.args.optim_args or parse is None:
            if self.args.optim_args:  # another transformers layout: nothing to hook
                logger.warning("cannot check --optim_args against %s in this transformers version", self.args.optim)
            return super().create_optimizer(model)
        used: set[str] = set()

        class Recording(dict):
            def __getitem__(self, key):
                used.add(key)
                return super().__getitem__(key)

            def get(self, key, default=None):
                used.add(key)
                return super().get(key, default)

            def __contains__(self, key):
                used.add(key)
                return super().__contains__(key)

            def items(self):
                used.update(self.keys())
                return super().items()

            def copy(self):
                used.update(self.keys())
                return super().copy()

            def __iter__(self):
                used.update(self.keys())
                return super().__iter__()

            def pop(self, key, *default):
                used.add(key)
                return super().pop(key, *default)

        given = parse(self.args.optim_args)
        hf_trainer._parse_optim_args = lambda text: Recording(parse(text))
        try:
            optimizer = super().create_optimizer(model)
        finally:
            hf_trainer._parse_optim_args = parse
        unused = sorted(set(given) - used)
        if unused:
            them = "it" if len(unused) == 1 else "them"
            hf_name = getattr(self.args.optim, "value", self.args.optim)
            raise ValueError(
                f"--optim_args {', '.join(unused)}: Hugging Face's {hf_name} does not read {them} (it would ignore "
                f"{them} silently); it reads {', '.join(sorted(used)) or 'no optim_args at all'}: drop {them}")
        return optimizer

    def _get_grad_norm(self, model, grad_norm=None):
        seen = _layerwise_norm(self.optimizer)
        if seen is not None:
            return seen
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def log(self, logs: dict, *args, **kwargs) -> None:
        import math

        for key in ("loss", "eval_loss"):
            value = logs.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                logs[key.replace("loss", "perplexity")] = math.exp(min(value, 50.0))
        for callback in self.callback_handler.callbacks:  # e.g. MemoryCallback's mem_* figures
            values = getattr(callback, "log_values", None)
            if callable(values):
                for key, value in values().items():
                    logs.setdefault(key, value)
        return super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        """HF's checkpoint, written into ``<output_dir>/.lowrank_opt_staging/checkpoint-N`` and renamed to
        ``<output_dir>/checkpoint-N`` once complete (``os.replace``: atomic), before older checkpoints are
        rotated out. A run killed while saving leaves the earlier checkpoints, and nothing that
        ``get_last_checkpoint`` would pick up half-written."""
        import os
        import shutil

        import torch.distributed as dist

        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, ".lowrank_opt_staging")
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # what a run killed while saving left behind
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        legacy_rotate = hasattr(type(self), "_rotate_checkpoints")  # transformers < 5: a method; now a function
        self._get_output_dir = lambda trial=None: staging  # HF's rotation then sees only the staging folder
        if legacy_rotate:
            self._rotate_checkpoints = lambda *args, **kwargs: None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir  # back to the class's methods
            if legacy_rotate:
                del self._rotate_checkpoints
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its part into the staging folder
        if self.args.should_save and os.path.isdir(staging):
            if self.state.best_global_step:  # HF looked for the best checkpoint in the staging folder
                self.state.best_model_checkpoint = os.path.join(run_dir, f"checkpoint-{self.state.best_global_step}")
            for entry in sorted(os.listdir(staging)):
                state_file = os.path.join(staging, entry, "trainer_state.json")
                if os.path.isfile(state_file):
                    self.state.save_to_json(state_file)
                target = os.path.join(run_dir, entry)
                if os.path.exists(target):
                    shutil.rmtree(target)
                os.replace(os.path.join(staging, entry), target)  # complete or absent
            shutil.rmtree(staging, ignore_errors=True)
            if legacy_rotate:
                self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
            else:
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        """HF's, except that a plain model's weights load through :func:`load_checkpoint_weights`: every tensor,
        or an error naming those that did not load (HF warns and trains on their initial values)."""
        model = self.model if model is None else model
        if self._hf_loads_weights(model, resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Loading model from %s.", resume_from_checkpoint)
        load_checkpoint_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """HF's, except that a plain model's weights load through :func:`load_checkpoint_weights`."""
        folder = self.state.best_model_checkpoint
        if self.is_deepspeed_enabled or self._hf_loads_weights(self.model, folder):
            return super()._load_best_model()
        logger.info("Loading best model from %s (score: %s).", folder, self.state.best_metric)
        load_checkpoint_weights(self.model, folder)

    def _hf_loads_weights(self, model: nn.Module, folder: str) -> bool:
        """FSDP, SageMaker model parallelism and PEFT adapters keep HF's loading; so does a folder without a
        model weights file (HF's error names it)."""
        from transformers.utils import is_sagemaker_mp_enabled

        peft = getattr(model, "peft_config", None) is not None or getattr(model, "_hf_peft_config_loaded", False)
        return bool(self.is_fsdp_enabled or is_sagemaker_mp_enabled() or peft or not _weights_files(folder))


def load_checkpoint_weights(model: nn.Module, folder: str) -> None:
    """Load the model weights of checkpoint ``folder`` into ``model``'s own tensors (an optimizer built on them
    keeps its references): every tensor of the model, or a ValueError naming those that could not be loaded.

    ``save_pretrained`` (transformers 5) writes some tensors under other names or in another layout than the
    model holds them (gpt_neox's ``lm_head`` as ``embed_out``; MoE experts, one tensor in the model, as one
    tensor per expert) and ``from_pretrained`` converts them back. When the folder's names are the model's own
    (a tied weight saved once counts as loaded), they are copied directly; otherwise the folder is loaded with
    ``from_pretrained`` (the model's class, the folder's config), which applies those conversions, and that
    model's tensors are copied."""
    import safetensors.torch
    import torch

    state = {}
    for path in _weights_files(folder):
        state.update(safetensors.torch.load_file(path, device="cpu") if path.endswith(".safetensors")
                     else torch.load(path, map_location="cpu", weights_only=True))
    if not state:
        raise ValueError(f"checkpoint {folder} has no model weights file ({', '.join(_WEIGHTS)}); resume from a "
                         "checkpoint folder the Trainer wrote")
    result = model.load_state_dict(state, strict=False)
    del state
    missing, unexpected = _untied(model, result.missing_keys), list(result.unexpected_keys)
    if not missing and not unexpected:
        return
    from_pretrained = getattr(type(model), "from_pretrained", None)
    if from_pretrained is not None and os.path.isfile(os.path.join(folder, "config.json")):
        # The names differ: transformers' own loading converts the folder's tensors to the model's layout.
        loaded, info = from_pretrained(folder, dtype="auto", output_loading_info=True)
        result = model.load_state_dict(loaded.state_dict(), strict=False)
        del loaded
        missing = sorted(set(_untied(model, result.missing_keys)) | set(info.get("missing_keys", ())))
        unexpected = sorted(set(result.unexpected_keys) | set(info.get("unexpected_keys", ()))
                            | {str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys", ())})
        if not missing and not unexpected:
            return
    details = "; ".join(f"{what}: {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}" for what, keys in (
        ("not in it", sorted(missing)), ("in it but not in the model", sorted(unexpected))) if keys)
    raise ValueError(f"checkpoint {folder} does not hold every weight of the {type(model).__name__} ({details}), and "
                     "resuming would train those from their initial values; resume from a checkpoint of this model")


_WEIGHTS = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin")


def _weights_files(folder: Optional[str]) -> list[str]:
    """The model weights files of a checkpoint folder: the shards its index names, or its single file."""
    import json

    if not folder or not os.path.isdir(folder):
        return []
    for name in _WEIGHTS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            with open(path) as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
            return [os.path.join(folder, shard) for shard in shards]
        return [path]
    return []


def _untied(model: nn.Module, keys: list[str]) -> list[str]:
    """``keys`` of ``model``'s state dict less those whose tensor is also held under a key that is not in
    ``keys`` (a tied weight: saved, and loaded, once)."""
    held = model.state_dict(keep_vars=True)
    absent = set(keys)
    loaded = {id(t) for k, t in held.items() if k not in absent}
    return [k for k in keys if k not in held or id(held[k]) not in loaded]


def _callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover
        return object
    return TrainerCallback


class _OptimizerSettingsCallback(_callback_base()):
    """At the start of training: the resolved optimizer settings into ``log_history`` (numbers as
    ``optimizer/<option>`` entries) and, when TensorBoard reports, the whole line as text."""

    def __init__(self, trainer: Any):
        import weakref

        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        resolved = getattr(trainer, "lowrank_optimizer", None) if trainer is not None else None
        if resolved is None or not state.is_world_process_zero:
            return
        text = resolved.summary(trainer.optimizer)
        values = {f"optimizer/{key}": float(value) for key, value in sorted(resolved.options.items())
                  if isinstance(value, (int, float)) and not isinstance(value, bool)}
        values["optimizer/lowrank_matrices"] = float(sum(
            1 for group in getattr(trainer.optimizer, "param_groups", []) if group.get("rank") is not None
            for p in group["params"] if len(getattr(p, "ds_shape", p.shape)) >= 2)) if resolved.spec.lowrank else 0.0
        state.log_history.append({"optimizer": text, **values, "step": state.global_step})
        for callback in trainer.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None and hasattr(writer, "add_text"):
                writer.add_text("lowrank_opt/optimizer", text, state.global_step)
                for key, value in values.items():
                    writer.add_scalar(key, value, state.global_step)


def _transformers_trainer() -> type:
    import transformers

    return transformers.Trainer


def _layerwise_norm(optimizer: Any) -> Optional[float]:
    """The gradient norm a layer-wise lowrank-opt optimizer saw in the last backward pass, else None."""
    inner = optimizer
    while inner is not None:
        norm = getattr(inner, "gradient_norm_seen", None)
        if getattr(inner, "layerwise", False) and callable(norm):
            return norm()
        inner = getattr(inner, "optimizer", None)
    return None


def check_layerwise_arguments(name: str, args: Any) -> None:
    """Layer-wise updates happen inside backward: no gradient accumulation, no data-parallel all-reduce, no
    global clipping (turned off with a warning)."""
    if args.gradient_accumulation_steps != 1:
        raise ValueError(
            f"--optim {name} updates each parameter inside backward and frees its gradient, so it cannot "
            f"accumulate gradients over {args.gradient_accumulation_steps} steps: set --gradient_accumulation_steps "
            "1 and raise --per_device_train_batch_size, or use the non-layer-wise optimizer")
    if args.world_size > 1:
        raise ValueError(
            f"--optim {name} cannot run data parallel ({args.world_size} processes): its updates run before "
            "gradients are all-reduced; use the non-layer-wise optimizer (or DeepSpeed/FSDP) for several GPUs")
    if args.max_grad_norm and args.max_grad_norm > 0:
        logger.warning("layer-wise updates leave no gradients to clip: --max_grad_norm %s is turned off; the "
                       "optimizer's norm_growth_limit (per tensor) replaces it", args.max_grad_norm)
        args.max_grad_norm = 0.0


def lowrank_trainer_class(base: type, name: Optional[str] = None, module: Optional[str] = None) -> type:
    """``base`` (``transformers.Trainer`` or a subclass such as TRL's ``SFTTrainer``) with
    :class:`LowRankTrainerMixin`: builds lowrank-opt optimizers from ``args.optim`` (use it with arguments from
    :func:`lowrank_arguments_class`)."""
    if issubclass(base, LowRankTrainerMixin):
        return base  # already lowrank-opt's
    cls = type(name or base.__name__, (LowRankTrainerMixin, base), {
        "__doc__": f"``{base.__module__}.{base.__qualname__}`` that builds lowrank-opt optimizers from ``args.optim`` "
                   "(see :class:`lowrank_opt.integrations.hf.LowRankTrainerMixin`).",
        "__module__": module or __name__,
    })
    cls.__qualname__ = cls.__name__
    return cls


try:  # transformers is optional for the package; the classes exist when it is installed
    import transformers as _transformers

    TrainingArguments = lowrank_arguments_class(_transformers.TrainingArguments)
    Trainer = lowrank_trainer_class(_transformers.Trainer)
except ImportError:  # pragma: no cover - exercised only without transformers
    TrainingArguments = Trainer = None  # type: ignore[assignment,misc]


def optimizer_cls_and_kwargs(
    name: str, model: nn.Module, args: Any, optim_args: Union[None, str, dict] = None,
    target_modules: Optional[TargetModules] = None,
) -> tuple[type, dict]:
    """``(optimizer class, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: the kwargs carry the named
    param groups under ``params``, so the Trainer uses them instead of its own grouping. ``*_capped`` names give
    :class:`~lowrank_opt.registry.CappedOptimizer`, an optimizer class like any other. The same refusals as our
    Trainer's: what ZeRO cannot run under ``args.deepspeed``, and a layer-wise optimizer's arguments
    (:func:`check_layerwise_arguments`)."""
    resolved = resolve_for_args(name, args, optim_args, target_modules)
    if getattr(args, "deepspeed", None):
        from .deepspeed import check_deepspeed_optimizer

        check_deepspeed_optimizer(resolved, args.deepspeed)
    if resolved.layerwise:
        check_layerwise_arguments(name, args)
    kwargs = resolved.optimizer_kwargs()
    kwargs.pop("weight_decay", None)  # set per group
    kwargs["params"] = resolved.param_groups(model, args.weight_decay)
    return resolved.optimizer_cls, kwargs


__all__ = [
    "LowRankTrainerMixin",
    "Trainer",
    "TrainingArguments",
    "check_layerwise_arguments",
    "check_optim_name",
    "hf_optimizer_names",
    "load_checkpoint_weights",
    "lowrank_arguments_class",
    "lowrank_trainer_class",
    "optimizer_cls_and_kwargs",
    "parse_optim_args",
    "resolve_for_args",
]
