"""The seed optimizers low-rank APOLLO grew out of and is compared against.

- :class:`ApolloDQN` / :class:`ApolloW`: Ma et al. 2020, adaptive parameter-wise diagonal quasi-Newton
  (not the low-rank APOLLO of :class:`lowrank_opt.Apollo`).
- :class:`AdamP` / :class:`SGDP`: Heo et al., ICLR 2021.
- :class:`AdamW` (also AMSGrad): ``torch.optim.AdamW``'s math under the package's checks and non-finite policy.
"""

from .adamp import SGDP, AdamP
from .adamw import AdamW
from .apollo_dqn import ApolloDQN, ApolloW

__all__ = ["AdamP", "AdamW", "SGDP", "ApolloDQN", "ApolloW"]
