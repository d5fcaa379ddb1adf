"""lowrank-opt: memory-efficient LLM training (APOLLO, NormGrowthCap, seed optimizers).

The optimizers import with torch alone; Hugging Face, DeepSpeed and bitsandbytes glue lives in
``lowrank_opt.integrations`` and is imported only when used.
"""

from . import functional
from .apollo import Apollo, apollo_mini
from .functional import growth_limit_factor
from .classic import SGDP, AdamP, ApolloDQN, ApolloW
from .norm_growth import NormGrowthCap
from .projection import gaussian_projection, resolve_rank
from .rounding import stochastic_round_to_bf16
from .targets import lowrank_param_groups, lowrank_targets

__version__ = "0.1.0"

__all__ = [
    "Apollo",
    "apollo_mini",
    "functional",
    "growth_limit_factor",
    "gaussian_projection",
    "resolve_rank",
    "stochastic_round_to_bf16",
    "lowrank_param_groups",
    "lowrank_targets",
    "NormGrowthCap",
    "ApolloDQN",
    "ApolloW",
    "AdamP",
    "SGDP",
]
