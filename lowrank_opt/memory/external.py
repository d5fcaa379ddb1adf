"""Optimizer states of optimizers from other packages, from their published state layouts.

The library must not import these packages, so their states are computed, not dry-run (Hugging Face's
``adamw_bnb_8bit``, ``galore_adamw``, ``apollo_adamw``; their names, defaults and options are
:data:`lowrank_opt.registry.HF_OPTIMIZERS`):

- bitsandbytes 8-bit AdamW (bitsandbytes 0.45-0.50 ``Optimizer2State.init_state``): per tensor with at
  least ``min_8bit_size = 4096`` elements two uint8 moments (``2n`` bytes) plus two fp32 absmax vectors of
  ``ceil(n / 256)`` (block size 256), plus two shared 256-entry fp32 quantisation maps; smaller tensors,
  and ``nn.Embedding`` weights (the HF Trainer overrides them to 32-bit), keep two fp32 moments (``8n``).
- GaLore (galore-torch ``GaLoreAdamW`` + ``GaLoreProjector``, REFERENCE Table 1 ``2nr + mr``): for a target
  m x n matrix with r' = min(r, m, n) (truncated SVD) the moments are r' x max(m, n) and the projection
  matrix r' x min(m, n), all in the parameter dtype; other parameters: AdamW moments in the parameter dtype.
  With fp32 parameters galore-torch's P is a *view* of the SVD factor (``Vh[:r]``/``U[:, :r]``), which keeps
  the whole min(m, n)^2 factor allocated; that is what is counted then.
- apollo-torch ``APOLLOAdamW`` (HF ``apollo_adamw``): moments r x max(m, n) (r not clipped) plus the
  random projection matrix it caches for the whole gap, r x min(m, n), in the parameter dtype, plus a
  0-d limiter norm; others AdamW moments. Targets follow HF's rule: ``all-linear`` is every
  ``nn.Linear`` *including* ``lm_head`` (ours excludes the output embedding).

Their step temporaries: bitsandbytes 0 (fused in-place kernels), apollo-torch one full-size tensor of the
largest parameter, GaLore the larger of that and an SVD refresh of the largest target (fp32 copy + U, S, Vh).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..registry import OptimizerSpec
from ..targets import ALL_LINEAR, TargetModules, module_matches

BNB_BLOCK_SIZE = 256  # bitsandbytes Optimizer2State.init_state: blocksize = 256 for the 8-bit absmax
BNB_QMAP_BYTES = 2 * 256 * 4  # the "dynamic" and "udynamic" quantisation maps, shared by all tensors


def _hf_targets(model: nn.Module, target_modules: Optional[TargetModules]) -> list[tuple[str, nn.Parameter]]:
    """Hugging Face's ``_setup_low_rank_optimizer`` rule: only ``nn.Linear`` modules; ``all-linear`` takes
    every one of them, lm_head included."""
    targets = target_modules or ALL_LINEAR
    all_linear = isinstance(targets, str) and targets.replace("_", "-").lower() == ALL_LINEAR
    if not isinstance(targets, str):
        targets = list(targets)
    chosen = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (all_linear or module_matches(targets, name)):
            chosen.append((name + ".weight", module.weight))
    if not chosen:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear module; give names or regexes of "
                         "nn.Linear modules, or 'all-linear'")
    return chosen


def _external_states(ext: OptimizerSpec, model: nn.Module, opts: dict,
                     target_modules: Optional[TargetModules]) -> tuple[dict, int, dict, dict, int]:
    """Analytic state bytes per parameter (see the module docstring), shared bytes, bytes per source,
    treatment per parameter, and the step's temporaries (largest at once), for the Hugging Face optimizer
    ``ext`` (a :data:`lowrank_opt.registry.HF_OPTIMIZERS` spec) with its resolved options ``opts``."""
    per_param: dict[int, int] = {}
    treatment: dict[int, str] = {}
    shared = 0
    sources: dict[str, int] = {}
    if ext.layout == "bnb8bit":
        if _integer(opts["optim_bits"], "optim_bits", ext) != 8:
            raise ValueError(f"optim_args optim_bits={opts['optim_bits']!r} for {ext.name} must be 8; for 32-bit "
                             "states estimate adamw")
        min_8bit_size = _integer(opts["min_8bit_size"], "min_8bit_size", ext)
        embeddings = set()
        if opts["embeddings_32bit"]:
            embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        any8 = False
        for p in _unique_params(model):
            n = p.numel()
            if id(p) in embeddings or n < min_8bit_size:
                per_param[id(p)] = 2 * n * 4
                treatment[id(p)] = "32-bit AdamW"
            else:
                per_param[id(p)] = 2 * n + 2 * math.ceil(n / BNB_BLOCK_SIZE) * 4
                treatment[id(p)] = "8-bit AdamW"
                any8 = True
        shared = BNB_QMAP_BYTES if any8 else 0
        sources = {"states": sum(per_param.values()) + shared}
        return per_param, shared, sources, treatment, 0  # fused in-place update kernels: no temporaries
    targets = {id(p) for _, p in _hf_targets(model, target_modules)}
    rank = _integer(opts["rank"], "rank", ext)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    proj_type = opts["proj_type"]
    if proj_type not in ("std", "reverse_std", "right", "left"):
        raise ValueError(f"proj_type must be std, reverse_std, right or left, got {proj_type!r}")
    if ext.layout == "apollo_torch" and opts.get("proj", "random") not in ("random", "svd"):
        raise ValueError(f"proj must be 'random' or 'svd', got {opts.get('proj')!r}")
    svd = ext.layout == "galore" or opts.get("proj") == "svd"
    moments = projections = temporaries = 0
    for p in _unique_params(model):
        pb = p.element_size()
        # One full-size temporary per update (AdamW's denominator, APOLLO's scaled gradient, GaLore's
        # projected-back update), in the parameter dtype.
        temporaries = max(temporaries, p.numel() * pb)
        if id(p) not in targets or p.ndim != 2:
            per_param[id(p)] = 2 * p.numel() * pb
            treatment[id(p)] = "AdamW"
            moments += per_param[id(p)]
            continue
        m, n = p.shape
        if svd:  # a refresh step: fp32 copy of the gradient (unless fp32) + U, S, Vh of the reduced SVD
            k = min(m, n)
            temporaries = max(temporaries, (0 if p.dtype == torch.float32 else 4 * m * n) + 4 * (m * k + k + k * n))
        side = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right",
                "right": "right", "left": "left"}[proj_type]
        r = min(rank, m, n) if svd else rank  # SVD truncates to min(m, n); a random projection does not
        moment = m * r if side == "right" else r * n
        if svd and p.dtype == torch.float32:
            # galore-torch keeps P as a view (Vh[:r, :] or U[:, :r]) of the fp32 SVD factor, which keeps the
            # whole factor alive: min(m, n) x n (right) or m x min(m, n) (left). Other dtypes copy r rows.
            proj = min(m, n) * n if side == "right" else m * min(m, n)
        else:
            proj = r * n if side == "right" else m * r
        limiter = pb if ext.layout == "apollo_torch" else 0  # apollo-torch's 0-d "scaled_grad" norm
        per_param[id(p)] = (2 * moment + proj) * pb + limiter
        moments += 2 * moment * pb + limiter
        projections += proj * pb
        treatment[id(p)] = f"low-rank r={r}" + (" (SVD)" if svd else "")
    sources = {"states": moments, "cache (projection)": projections}
    return per_param, shared, sources, treatment, temporaries


def _integer(value, name: str, ext: OptimizerSpec) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"optim_args {name} must be an integer for {ext.name}, got {value!r}") from None


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
